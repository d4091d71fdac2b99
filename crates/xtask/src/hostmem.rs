//! The host's free memory before a timed restore.
//!
//! Some hosts hand free memory back to their own hypervisor: ours is a Firecracker guest whose
//! kernel reports free 2 MiB blocks (free page reporting) ~0.5–2 s after they were freed. The next
//! huge page made of such a block is faulted in again outside, a 4 KiB page at a time: measured
//! here, touching 64 MiB of fresh transparent huge pages takes 6 ms on blocks freed just before and
//! 100–140 ms on reported ones (4 KiB pages: ~33 ms either way, reporting leaves small blocks
//! alone). QEMU asks for huge pages for guest memory and for TCG's code buffer, so a restore that
//! lands on reported blocks costs ~100 ms more, and whether it does is decided per restore by
//! which free blocks the kernel hands out: a coin toss that swamps what aloft adds.
//!
//! [`warm`] takes such blocks back right before a timed restore (huge pages, touched, freed), so
//! the restore finds warm memory, as on a host without reporting. Both sides of a comparison get
//! it, or neither.

#![expect(
    unsafe_code,
    reason = "mmap(2) and madvise(2) of a scratch mapping, to control the host's free memory"
)]

use std::io;
use std::time::{Duration, Instant};

/// How much [`warm`] takes: a 128 MiB guest's restore touches ~60 MiB of huge pages for its memory
/// and tens more for TCG's code buffer and QEMU's own start.
pub(crate) const WARM_MIB: usize = 256;

/// Maps `mib` MiB of anonymous memory as transparent huge pages, writes to every 4 KiB of it and
/// unmaps it: the blocks it was given are free again and warm. Returns how long that took (slow
/// when the host had taken them back).
pub(crate) fn warm(mib: usize) -> io::Result<Duration> {
    let len = mib << 20;
    let t0 = Instant::now();
    // SAFETY: a new private anonymous mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `p..p+len` is the mapping made above. Huge pages are a hint: without them the
    // touch still runs, it just warms nothing that matters.
    let _ = unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
    let base = p.cast::<u8>();
    for off in (0..len).step_by(4096) {
        // SAFETY: `off < len`, inside the writable mapping; volatile so the write is not elided.
        unsafe { base.add(off).write_volatile(1) };
    }
    // SAFETY: unmaps exactly the mapping made above; nothing refers to it any more.
    if unsafe { libc::munmap(p, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t0.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS line");
        line.split_whitespace()
            .nth(1)
            .expect("VmRSS value")
            .parse()
            .expect("VmRSS in kB")
    }

    #[test]
    fn warming_touches_memory_and_gives_it_all_back() {
        let before = rss_kib();
        let took = warm(64).expect("warm 64 MiB");
        let after = rss_kib();
        // Touching 16,384 pages is not free, and none of them is still held.
        assert!(took > Duration::from_micros(100), "{took:?}");
        assert!(after < before + 8 * 1024, "RSS {before} kB → {after} kB");
    }
}
