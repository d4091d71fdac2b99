//! The edge's threads: one single-threaded tokio runtime per core ("thread-per-core"), each
//! accepting on a listener of its own that shares the public port with the others
//! (`SO_REUSEPORT`, so the kernel spreads new connections over them).
//!
//! A client connection, the requests on it and the machine connections they use then live on
//! one thread from accept to close: no work stealing, no wake-ups handed to another thread, no
//! connection registered with one thread's reactor and polled from another. Measured against
//! tokio's work-stealing runtime on the same edge, this served ~20–30 % more requests per second
//! with fewer context switches per request (`docs/perf.md`, "Runtime shape"; ADR 0015's threads
//! addendum).
//!
//! Loops that run once per edge (autostop, health checks, certificates) run wherever the embedder
//! spawns them (aloftd: its own runtime); a UDP port is one socket, served on one worker. State
//! shared by the workers lives in the [`crate::Edge`] behind short locks and atomics; what is per
//! worker is the idle pool of machine connections (see `upstream.rs`), chosen by [`current`].

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

thread_local! {
    /// The index of the worker this thread is, if it is one.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the edge worker running on this thread; 0 on any other thread (a test's
/// runtime, a multi-threaded one), which then all share worker 0's per-worker state.
pub(crate) fn current() -> usize {
    WORKER.with(Cell::get).unwrap_or(0)
}

/// Whether this thread is one of the edge's workers.
pub(crate) fn is_worker() -> bool {
    WORKER.with(Cell::get).is_some()
}

/// Tells one shared structure from another of its kind, for the copies or handles worker
/// threads keep of it in thread-locals (an edge has one of each; tests make many, and a new
/// one may reuse a dropped one's address, never its id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OwnerId(u64);

impl Default for OwnerId {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Self(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

/// How long a worker's runtime waits, on shutdown, for its blocking tasks.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Backlog of each listener (tokio's own default for its listeners).
const BACKLOG: i32 = 1024;

/// The edge's worker threads, owned: dropping this stops them (their runtimes end, and with
/// them every task and connection they were running) and waits for their threads.
#[derive(Debug)]
pub struct WorkerThreads {
    workers: Workers,
    /// Each worker's stop signal and thread.
    threads: Vec<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl WorkerThreads {
    /// Starts `count` worker threads (`None`: one per CPU), named `NAME-N`.
    pub fn start(count: Option<NonZeroUsize>, name: &str) -> io::Result<Self> {
        let count = match count {
            Some(n) => n.get(),
            None => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        };
        let mut started = Self {
            workers: Workers {
                handles: Arc::from(Vec::new()),
            },
            threads: Vec::with_capacity(count),
        };
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            // On failure the workers started so far stop as `started` is dropped.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("{name}-{index}-blocking"))
                .build()?;
            let handle = runtime.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(Some(index)));
                    runtime.block_on(async {
                        // A dropped sender stops the worker as well as a sent stop.
                        let _ = stopped.await;
                    });
                    runtime.shutdown_timeout(SHUTDOWN_GRACE);
                })?;
            handles.push(handle);
            started.threads.push((stop, thread));
        }
        started.workers.handles = Arc::from(handles);
        Ok(started)
    }

    /// The workers, to spawn on and bind for. Tasks may keep a clone: it does not keep the
    /// threads alive.
    pub fn workers(&self) -> &Workers {
        &self.workers
    }
}

impl Drop for WorkerThreads {
    /// Stops the workers and waits for their threads, except the calling thread's own (a worker
    /// dropping this ends by itself once the task doing it returns).
    fn drop(&mut self) {
        let me = std::thread::current().id();
        let threads = std::mem::take(&mut self.threads);
        let mut joins = Vec::with_capacity(threads.len());
        for (stop, thread) in threads {
            let _ = stop.send(());
            joins.push(thread);
        }
        for thread in joins {
            if thread.thread().id() != me {
                let _ = thread.join();
            }
        }
    }
}

/// Where the edge's tasks run: the workers of a [`WorkerThreads`], or the current runtime
/// ([`Workers::current`]). Cheap to clone; a clone does not keep worker threads alive (tasks
/// spawned once they stopped are cancelled at once).
#[derive(Debug, Clone)]
pub struct Workers {
    handles: Arc<[Handle]>,
}

impl Workers {
    /// The calling task's runtime as a single worker: for tests and embedders that run the edge
    /// on a runtime they own. Panics outside a tokio runtime.
    pub fn current() -> Self {
        Self {
            handles: Arc::from(vec![Handle::current()]),
        }
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (only while [`WorkerThreads::start`] runs).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs `task` on worker `index` (modulo the number of workers).
    pub fn spawn<F>(&self, index: usize, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[index % self.handles.len()].spawn(task)
    }

    /// Runs `serve(listener)` for each listener [`Workers::bind_tcp`] returned, each on the
    /// worker it was bound for.
    pub fn spawn_each<F, Fut>(&self, listeners: Vec<TcpListener>, mut serve: F) -> Vec<JoinHandle<()>>
    where
        F: FnMut(TcpListener) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        listeners
            .into_iter()
            .enumerate()
            .map(|(i, l)| self.spawn(i, serve(l)))
            .collect()
    }

    /// One listener on `addr` per worker, all sharing the address (`SO_REUSEPORT`), each
    /// registered with its worker's reactor. Port 0 picks one free port for all of them.
    ///
    /// Sharing a port is only possible between sockets that all ask for it and belong to one
    /// user, so before binding the group this checks that nothing listens on the address yet:
    /// a second aloftd (or anything else) on the same port is an error here, as with a plain
    /// bind, not a silent split of the traffic.
    pub fn bind_tcp(&self, addr: SocketAddr) -> io::Result<Vec<TcpListener>> {
        let addr = probe_free(addr)?;
        let mut out = Vec::with_capacity(self.len());
        for handle in self.handles.iter() {
            let std = bind_shared(addr)?;
            let _entered = handle.enter();
            out.push(TcpListener::from_std(std)?);
        }
        Ok(out)
    }
}

/// A listening TCP socket on `addr` that other sockets of this user may share
/// (`SO_REUSEPORT`), non-blocking.
fn bind_shared(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Checks that nothing listens on `addr` yet by binding it without `SO_REUSEPORT` (a bind that
/// conflicts with any listener, sharing or not); returns the address with the port the kernel
/// picked when `addr`'s was 0. Nothing stays bound.
fn probe_free(addr: SocketAddr) -> io::Result<SocketAddr> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("a TCP socket's address is not an IP address"))?;
    Ok(local)
}

/// For the crate's tests: edge workers and a runtime to wait on them from the test's thread.
#[cfg(test)]
pub(crate) struct TestWorkers {
    _threads: WorkerThreads,
    workers: Workers,
    rt: tokio::runtime::Runtime,
}

#[cfg(test)]
impl TestWorkers {
    /// `count` workers named `name-N`.
    pub(crate) fn start(count: usize, name: &str) -> Self {
        let threads = WorkerThreads::start(NonZeroUsize::new(count), name).expect("start workers");
        let workers = threads.workers().clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Self {
            _threads: threads,
            workers,
            rt,
        }
    }

    /// Runs `task` on worker `index` and waits for its output.
    pub(crate) fn run<F>(&self, index: usize, task: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.rt
            .block_on(self.workers.spawn(index, task))
            .expect("worker task")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_share_one_port_and_refuse_a_taken_one() {
        let threads = WorkerThreads::start(NonZeroUsize::new(2), "test-edge").expect("start workers");
        let workers = threads.workers();
        let listeners = workers
            .bind_tcp(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        assert_eq!(listeners.len(), 2);
        let a = listeners[0].local_addr().expect("addr");
        let b = listeners[1].local_addr().expect("addr");
        assert_eq!(a, b, "both workers listen on one port");
        assert_ne!(a.port(), 0);
        // A second group on the same port is refused, not silently sharing the traffic.
        let err = workers.bind_tcp(a).expect_err("the port is taken");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        // So is a plain listener.
        assert!(std::net::TcpListener::bind(a).is_err());
        drop(listeners);
        // Once they are gone the port is free again.
        workers.bind_tcp(a).expect("free again");
    }

    #[test]
    fn tasks_run_on_their_worker_and_stop_with_the_workers() {
        let threads = WorkerThreads::start(NonZeroUsize::new(2), "test-edge").expect("start workers");
        let workers = threads.workers().clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (on0, on1) = rt.block_on(async {
            let a = workers.spawn(0, async {
                (current(), std::thread::current().name().map(str::to_owned))
            });
            let b = workers.spawn(3, async {
                (current(), std::thread::current().name().map(str::to_owned))
            });
            (a.await.expect("worker 0"), b.await.expect("worker 1"))
        });
        assert_eq!(on0, (0, Some("test-edge-0".to_owned())));
        assert_eq!(
            on1,
            (1, Some("test-edge-1".to_owned())),
            "index 3 of 2 workers is worker 1"
        );
        assert_eq!(current(), 0, "any other thread counts as worker 0");

        // A task that never ends is cancelled when the workers stop; its resources go with it.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        workers.spawn(1, async move {
            let _held = tx;
            std::future::pending::<()>().await;
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(50)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout),
            "the task runs while its worker does"
        );
        // A clone of the workers does not keep them running.
        drop(threads);
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected),
            "the task was dropped, and its sender with it, when its worker stopped"
        );
        // Spawning on stopped workers cancels the task instead of panicking.
        let late = rt.block_on(workers.spawn(0, async { 1 }));
        assert!(late.is_err_and(|e| e.is_cancelled()));
    }
}
