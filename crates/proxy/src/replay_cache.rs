//! Replay caching: remembering where an app replays a kind of request, so the edge sends the
//! next such request there directly instead of asking the app again.
//!
//! Two kinds of entries, both per app and per hostname:
//!
//! - **path-based**, asked for by the replaying answer: the header form adds
//!   `fly-replay-cache: <host?/path/*>` (a path, optionally after a hostname; a trailing `*`
//!   matches every path starting with what precedes it), `fly-replay-cache-ttl-secs: N` (at
//!   least [`MIN_TTL_SECS`], else nothing is cached) and optionally
//!   `fly-replay-cache-allow-bypass: yes`; the JSON form carries the same as
//!   `"cache": {"prefix": "/path/*", "ttl": 30, "allow_bypass": true}` ([`Directive`]);
//! - **session-based**, configured on the service's port (`http_options.replay_cache[]`): a
//!   rule's `path_prefix` (the longest matching one wins) plus the value of a cookie or header,
//!   so each session is replayed to its own target.
//!
//! `fly-replay-cache: invalidate` (JSON `"cache": {"invalidate": true}`) in a machine's answer
//! drops the entries that machine's answers created for that host and path.
//!
//! A client bypasses an entry with the request header `fly-replay-cache-control: skip` when the
//! entry allows it. Entries expire on read after their TTL; each app holds at most
//! [`MAX_ENTRIES_PER_APP`] (the oldest stored goes first), keys longer than [`MAX_KEY_BYTES`]
//! are not cached, and an app's entries go when the app leaves the routing table. Hostile
//! clients (random cookie values) thus only churn their own app's entries.
//!
//! The whole edge holds at most [`MAX_ENTRIES`]. Storing past it evicts from the app holding
//! the most entries (the storing app on a tie, else the first by name), its oldest stored: so an
//! app at or under its fair share (the cap over the number of apps caching) never loses an entry
//! to another app's growth, and a noisy app, once the largest, only evicts its own entries.
//!
//! Figures (`aloft_edge_replay_cache_*` in the edge's metrics, [`ReplayCache::render`]): the
//! entries held (one gauge for the edge: the bound is edge-wide, and an app label would add a
//! series per app for a cache most apps never use), the answers given each
//! `fly-replay-cache-status` (hit, miss, bypass), the entries stored, and the entries evicted by
//! the app's or the edge's cap; none carries an app label, so their number of series is fixed.
//!
//! The first part of this file ([`ReplayCache`], [`Directive`], [`RequestKeys`]) is pure: it
//! takes the time as an argument and does no I/O. The second part is the glue `Edge::forward`
//! calls ([`CacheCtx`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aloft_api::{MachineId, ReplayCacheType};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use crate::Edge;
use crate::replay::Replay;
use crate::routes::{AppRoutes, MachineRoute, Snapshot};

/// Response header: path pattern to cache the replay for, or `invalidate`.
pub(crate) const FLY_REPLAY_CACHE: HeaderName = HeaderName::from_static("fly-replay-cache");
/// Response header: how long the entry lives, in seconds (at least [`MIN_TTL_SECS`]).
pub(crate) const FLY_REPLAY_CACHE_TTL_SECS: HeaderName = HeaderName::from_static("fly-replay-cache-ttl-secs");
/// Response header: `yes` lets clients bypass the entry.
pub(crate) const FLY_REPLAY_CACHE_ALLOW_BYPASS: HeaderName =
    HeaderName::from_static("fly-replay-cache-allow-bypass");
/// Request header: `skip` bypasses an entry that allows it.
pub(crate) const FLY_REPLAY_CACHE_CONTROL: HeaderName = HeaderName::from_static("fly-replay-cache-control");
/// Response header the edge adds: `miss`, `hit` or `bypass`.
pub(crate) const FLY_REPLAY_CACHE_STATUS: HeaderName = HeaderName::from_static("fly-replay-cache-status");

/// Entries shorter-lived than this are not cached (Fly's minimum).
pub(crate) const MIN_TTL_SECS: u64 = 10;
/// At most this many entries per app; storing one more evicts the oldest stored.
pub(crate) const MAX_ENTRIES_PER_APP: usize = 10_000;
/// A path, pattern, or cookie/header value longer than this is not cached.
pub(crate) const MAX_KEY_BYTES: usize = 1024;
/// At most this many entries on the edge, every app together; storing one more evicts from the
/// app holding the most (module docs). Five apps' worth of [`MAX_ENTRIES_PER_APP`]: an entry is a
/// few hundred bytes with typical hostnames, paths and cookies (about 15 MiB at the cap), and at
/// most about 3 KiB with every key part at [`MAX_KEY_BYTES`] (its key is kept twice: the map and
/// the store order), so a hostile fill stays near 150 MiB instead of growing with the number of
/// apps.
pub(crate) const MAX_ENTRIES: usize = 50_000;

// ---------------------------------------------------------------------------------------------
// What an answer asks for.

/// A path pattern: an exact path, or a prefix (written with a trailing `*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Pattern {
    /// The path, or the prefix without its `*`.
    pub(crate) path: String,
    /// Whether it matches every path starting with `path`.
    pub(crate) prefix: bool,
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        if self.prefix {
            path.starts_with(self.path.as_str())
        } else {
            path == self.path
        }
    }
}

/// A cache instruction in a machine's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Directive {
    /// Cache this replay for requests matching `pattern` on `host` (the request's own host when
    /// `None`).
    Store {
        /// Hostname, lowercase.
        host: Option<String>,
        /// Paths covered.
        pattern: Pattern,
        /// Entry lifetime.
        ttl: Duration,
        /// Clients may bypass it.
        allow_bypass: bool,
    },
    /// Drop the entries the answering machine created for the request's host and path.
    Invalidate,
}

impl Directive {
    /// The directive of an answer's `fly-replay-cache*` headers; `None` without one, or when it
    /// is not usable (bad pattern, TTL missing or under [`MIN_TTL_SECS`]): then nothing is
    /// cached.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let text = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let value = text(FLY_REPLAY_CACHE)?;
        if value.eq_ignore_ascii_case("invalidate") {
            return Some(Self::Invalidate);
        }
        let ttl = text(FLY_REPLAY_CACHE_TTL_SECS)?.parse::<u64>().ok()?;
        let allow_bypass = text(FLY_REPLAY_CACHE_ALLOW_BYPASS)
            .is_some_and(|v| v.eq_ignore_ascii_case("yes") || v.eq_ignore_ascii_case("true"));
        Self::store(value, ttl, allow_bypass)
    }

    /// The directive of a JSON replay's `cache` object (`prefix`, `ttl`, `allow_bypass`,
    /// `invalidate`); `None` when it is not usable.
    pub(crate) fn from_json(v: &Value) -> Option<Self> {
        let Value::Object(map) = v else { return None };
        let flag = |k: &str| match map.get(k) {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("yes"),
            _ => false,
        };
        if flag("invalidate") {
            return Some(Self::Invalidate);
        }
        let prefix = map.get("prefix")?.as_str()?;
        let ttl = match map.get("ttl")? {
            Value::Number(n) => n.as_u64()?,
            Value::String(s) => s.trim().parse().ok()?,
            _ => return None,
        };
        Self::store(prefix.trim(), ttl, flag("allow_bypass"))
    }

    fn store(pattern: &str, ttl: u64, allow_bypass: bool) -> Option<Self> {
        if ttl < MIN_TTL_SECS || pattern.len() > MAX_KEY_BYTES {
            return None;
        }
        let (host, path) = match pattern.find('/') {
            Some(0) => (None, pattern),
            Some(i) => {
                let h = crate::routes::normalize_host(&pattern[..i])?;
                (Some(h.into_owned()), &pattern[i..])
            }
            None => return None,
        };
        if !path.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        let pattern = match path.strip_suffix('*') {
            Some(p) => Pattern {
                path: p.to_owned(),
                prefix: true,
            },
            None => Pattern {
                path: path.to_owned(),
                prefix: false,
            },
        };
        Some(Self::Store {
            host,
            pattern,
            ttl: Duration::from_secs(ttl),
            allow_bypass,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// What a request is looked up by.

/// An entry's key within an app.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// Path-based.
    Path {
        /// Hostname.
        host: String,
        /// Paths covered.
        pattern: Pattern,
    },
    /// Session-based.
    Session {
        /// Hostname.
        host: String,
        /// The rule's path prefix.
        prefix: String,
        /// The cookie's or header's value.
        value: String,
    },
}

/// The session rule that applies to a request, with the request's key under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionKey {
    key: Key,
    ttl: Duration,
    allow_bypass: bool,
}

/// What a request is looked up and stored by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestKeys {
    /// When the app last entered the routing table (its `AppRoutes::since`).
    since: u64,
    host: String,
    path: String,
    session: Option<SessionKey>,
}

impl RequestKeys {
    /// The keys of a request for `host` and `path` with `headers`, under the session `rules` of
    /// the service's port; `None` when it cannot be cached (no usable host, path too long).
    pub(crate) fn new(
        host: &str,
        path: &str,
        headers: &HeaderMap,
        rules: &[aloft_api::ReplayCache],
    ) -> Option<Self> {
        let host = crate::routes::normalize_host(host)?.into_owned();
        if path.len() > MAX_KEY_BYTES {
            return None;
        }
        let rule = rules
            .iter()
            .filter(|r| path.starts_with(r.path_prefix.as_deref().unwrap_or("/")))
            .max_by_key(|r| r.path_prefix.as_deref().unwrap_or("/").len());
        let session = rule.and_then(|r| {
            let ttl = u64::from(r.ttl_seconds?);
            let name = r.name.as_deref()?;
            if ttl < MIN_TTL_SECS {
                return None;
            }
            let value = match r.r#type? {
                ReplayCacheType::Cookie => cookie(headers, name)?,
                ReplayCacheType::Header => headers.get(name)?.to_str().ok()?.to_owned(),
            };
            if value.is_empty() || value.len() > MAX_KEY_BYTES {
                return None;
            }
            Some(SessionKey {
                key: Key::Session {
                    host: host.clone(),
                    prefix: r.path_prefix.clone().unwrap_or_else(|| "/".to_owned()),
                    value,
                },
                ttl: Duration::from_secs(ttl),
                allow_bypass: r.allow_bypass.unwrap_or(false),
            })
        });
        Some(Self {
            since: 0,
            host,
            path: path.to_owned(),
            session,
        })
    }

    /// The keys for an app that last entered the routing table at generation `since`.
    pub(crate) fn since(self, since: u64) -> Self {
        Self { since, ..self }
    }

    /// Whether a session rule applies (its cookie or header is present).
    pub(crate) fn has_session(&self) -> bool {
        self.session.is_some()
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
        })
}

/// The session rules of `app`'s service on public `port` (on every one of its ports).
pub(crate) fn session_rules(app: &AppRoutes, port: u16) -> Vec<aloft_api::ReplayCache> {
    app.machines
        .iter()
        .find_map(|m| m.service_for_port(port))
        .into_iter()
        .flat_map(|service| &service.ports)
        .filter_map(|p| p.http_options.as_ref())
        .flat_map(|o| o.replay_cache.iter().cloned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The cache.

#[derive(Debug)]
struct Entry {
    replay: Arc<Replay>,
    source: MachineId,
    expires: Instant,
    allow_bypass: bool,
    /// Its place in the store order.
    seq: u64,
}

#[derive(Debug, Default)]
struct AppCache {
    /// The app's `since` in the routing table when these entries were made.
    since: u64,
    entries: HashMap<Key, Entry>,
    /// Store order: oldest first.
    order: BTreeMap<u64, Key>,
    next_seq: u64,
    /// Lengths of the prefix patterns stored, with how many have each: a lookup tries only these.
    prefix_lens: BTreeMap<usize, usize>,
}

impl AppCache {
    /// Stores `entry` under `key` (replacing one there), then evicts the oldest stored while
    /// more than `cap`; returns how many it evicted.
    fn insert(&mut self, key: Key, mut entry: Entry, cap: usize) -> usize {
        self.remove(&key);
        entry.seq = self.next_seq;
        self.next_seq += 1;
        if let Key::Path { pattern, .. } = &key
            && pattern.prefix
        {
            *self.prefix_lens.entry(pattern.path.len()).or_default() += 1;
        }
        self.order.insert(entry.seq, key.clone());
        self.entries.insert(key, entry);
        let mut evicted = 0;
        while self.entries.len() > cap {
            if !self.evict_oldest() {
                break;
            }
            evicted += 1;
        }
        evicted
    }

    /// Drops the oldest stored entry; `false` when there was none.
    fn evict_oldest(&mut self) -> bool {
        let Some(oldest) = self.order.first_key_value().map(|(_, k)| k.clone()) else {
            return false;
        };
        self.remove(&oldest).is_some()
    }

    fn remove(&mut self, key: &Key) -> Option<Entry> {
        let entry = self.entries.remove(key)?;
        self.order.remove(&entry.seq);
        if let Key::Path { pattern, .. } = key
            && pattern.prefix
            && let Some(n) = self.prefix_lens.get_mut(&pattern.path.len())
        {
            *n -= 1;
            if *n == 0 {
                self.prefix_lens.remove(&pattern.path.len());
            }
        }
        Some(entry)
    }

    /// The live entry under `key`, dropping it when expired.
    fn live(&mut self, key: &Key, now: Instant) -> Option<&Entry> {
        if self.entries.get(key)?.expires <= now {
            self.remove(key);
            return None;
        }
        self.entries.get(key)
    }

    /// The key of the live entry for `keys`: the session's, else the exact path's, else the
    /// longest matching prefix's.
    fn find(&mut self, keys: &RequestKeys, now: Instant) -> Option<Key> {
        if let Some(s) = &keys.session
            && self.live(&s.key, now).is_some()
        {
            return Some(s.key.clone());
        }
        let exact = Key::Path {
            host: keys.host.clone(),
            pattern: Pattern {
                path: keys.path.clone(),
                prefix: false,
            },
        };
        if self.live(&exact, now).is_some() {
            return Some(exact);
        }
        let lens: Vec<usize> = self
            .prefix_lens
            .range(..=keys.path.len())
            .rev()
            .map(|(l, _)| *l)
            .collect();
        for len in lens {
            let Some(p) = keys.path.get(..len) else { continue };
            let key = Key::Path {
                host: keys.host.clone(),
                pattern: Pattern {
                    path: p.to_owned(),
                    prefix: true,
                },
            };
            if self.live(&key, now).is_some() {
                return Some(key);
            }
        }
        None
    }
}

/// A cached replay found for a request.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    /// Its key (to drop it when the target can't be reached).
    pub(crate) key: Key,
    /// The replay to apply.
    pub(crate) replay: Arc<Replay>,
    /// The machine whose answer created it.
    pub(crate) source: MachineId,
}

/// What a lookup found.
#[derive(Debug, Clone)]
pub(crate) enum Lookup {
    /// Nothing live.
    Miss,
    /// An entry, to use.
    Hit(Hit),
    /// An entry the client bypassed (it allows that).
    Bypass,
}

/// The replay cache of every app (see the module docs). Short std locks, never held across an
/// `.await`.
#[derive(Debug)]
pub(crate) struct ReplayCache {
    apps: Mutex<Apps>,
    /// How many apps hold entries, as of the last unlock: while none does (most edges, most
    /// of the time), [`ReplayCache::holds`] answers without the lock every request would take.
    held: AtomicUsize,
    cap: usize,
    edge_cap: usize,
    figures: Figures,
}

#[derive(Debug, Default)]
struct Apps {
    by_app: HashMap<String, AppCache>,
    /// Entries of every app together (expired ones included until read or evicted).
    total: usize,
    /// The routing table generation apps were last pruned at.
    generation: u64,
}

impl Apps {
    /// The app to evict from when the edge is over its cap: the one holding the most entries;
    /// on a tie `storing` if it is one of them, else the first by name.
    fn largest(&self, storing: &str) -> Option<String> {
        self.by_app
            .iter()
            .max_by(|(a, ca), (b, cb)| {
                ca.entries
                    .len()
                    .cmp(&cb.entries.len())
                    .then_with(|| (a.as_str() == storing).cmp(&(b.as_str() == storing)))
                    .then_with(|| b.cmp(a))
            })
            .map(|(name, _)| name.clone())
    }
}

/// The apps, locked; unlocking publishes how many hold entries ([`ReplayCache::held`]).
struct AppsGuard<'a> {
    apps: MutexGuard<'a, Apps>,
    held: &'a AtomicUsize,
}

impl std::ops::Deref for AppsGuard<'_> {
    type Target = Apps;

    fn deref(&self) -> &Apps {
        &self.apps
    }
}

impl std::ops::DerefMut for AppsGuard<'_> {
    fn deref_mut(&mut self) -> &mut Apps {
        &mut self.apps
    }
}

impl Drop for AppsGuard<'_> {
    fn drop(&mut self) {
        self.held.store(self.apps.by_app.len(), Ordering::Release);
    }
}

/// The cache's counters (see the module docs).
#[derive(Debug, Default)]
struct Figures {
    hits: AtomicU64,
    misses: AtomicU64,
    bypasses: AtomicU64,
    stores: AtomicU64,
    evicted_app_cap: AtomicU64,
    evicted_edge_cap: AtomicU64,
}

fn count(c: &AtomicU64, n: usize) {
    c.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
}

impl Default for ReplayCache {
    fn default() -> Self {
        Self::new(MAX_ENTRIES_PER_APP, MAX_ENTRIES)
    }
}

impl ReplayCache {
    /// A cache holding at most `cap` entries per app and `edge_cap` in all.
    pub(crate) fn new(cap: usize, edge_cap: usize) -> Self {
        Self {
            apps: Mutex::default(),
            held: AtomicUsize::new(0),
            cap: cap.max(1),
            edge_cap: edge_cap.max(1),
            figures: Figures::default(),
        }
    }

    fn lock(&self) -> AppsGuard<'_> {
        AppsGuard {
            apps: self
                .apps
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            held: &self.held,
        }
    }

    /// Looks `keys` up in `app`'s entries; `skip` is the client's bypass request. Entries made
    /// before the app last entered the routing table ([`RequestKeys::since`]) are dropped.
    /// Whether anything is cached for `app` (one short lock, no allocation): most apps never
    /// replay, and their requests skip the rest.
    pub(crate) fn holds(&self, app: &str) -> bool {
        self.held.load(Ordering::Acquire) > 0 && self.lock().by_app.contains_key(app)
    }

    pub(crate) fn lookup(&self, app: &str, keys: &RequestKeys, skip: bool, now: Instant) -> Lookup {
        let mut apps = self.lock();
        let Apps { by_app, total, .. } = &mut *apps;
        let Some(cache) = by_app.get_mut(app) else {
            return Lookup::Miss;
        };
        if cache.since != keys.since {
            *total -= cache.entries.len();
            by_app.remove(app);
            return Lookup::Miss;
        }
        let before = cache.entries.len();
        let found = cache.find(keys, now);
        *total -= before - cache.entries.len();
        let Some(key) = found else {
            return Lookup::Miss;
        };
        let Some(e) = cache.entries.get(&key) else {
            return Lookup::Miss;
        };
        if skip && e.allow_bypass {
            return Lookup::Bypass;
        }
        Lookup::Hit(Hit {
            replay: e.replay.clone(),
            source: e.source.clone(),
            key,
        })
    }

    /// Remembers `replay`, answered by machine `source` of `app` to a request with `keys`: under
    /// the answer's `directive` (path-based) and under the request's session rule, if any. An
    /// [`Directive::Invalidate`] drops instead what `source` created for this host and path.
    pub(crate) fn store(
        &self,
        app: &str,
        keys: &RequestKeys,
        directive: Option<&Directive>,
        replay: &Replay,
        source: &MachineId,
        now: Instant,
    ) {
        if matches!(directive, Some(Directive::Invalidate)) {
            self.invalidate(app, keys, source);
            return;
        }
        let mut stored: Vec<(Key, Duration, bool)> = Vec::new();
        if let Some(Directive::Store {
            host,
            pattern,
            ttl,
            allow_bypass,
        }) = directive
        {
            let host = host.clone().unwrap_or_else(|| keys.host.clone());
            stored.push((
                Key::Path {
                    host,
                    pattern: pattern.clone(),
                },
                *ttl,
                *allow_bypass,
            ));
        }
        if let Some(s) = &keys.session {
            stored.push((s.key.clone(), s.ttl, s.allow_bypass));
        }
        if stored.is_empty() {
            return;
        }
        let replay = Arc::new(Replay {
            cache: None,
            ..replay.clone()
        });
        let mut apps = self.lock();
        let Apps { by_app, total, .. } = &mut *apps;
        let cache = by_app.entry(app.to_owned()).or_default();
        if cache.since != keys.since {
            *total -= cache.entries.len();
            *cache = AppCache {
                since: keys.since,
                ..AppCache::default()
            };
        }
        let before = cache.entries.len();
        let mut evicted = 0;
        let mut written = 0;
        for (key, ttl, allow_bypass) in stored {
            let Some(expires) = now.checked_add(ttl) else {
                continue;
            };
            let entry = Entry {
                replay: replay.clone(),
                source: source.clone(),
                expires,
                allow_bypass,
                seq: 0,
            };
            evicted += cache.insert(key, entry, self.cap);
            written += 1;
        }
        *total = *total - before + cache.entries.len();
        count(&self.figures.stores, written);
        count(&self.figures.evicted_app_cap, evicted);
        self.within_edge_cap(&mut apps, app);
    }

    /// Evicts while the edge holds more than its cap: from the app holding the most, its oldest
    /// stored (module docs).
    fn within_edge_cap(&self, apps: &mut Apps, storing: &str) {
        while apps.total > self.edge_cap {
            let Some(victim) = apps.largest(storing) else {
                break;
            };
            let Some(cache) = apps.by_app.get_mut(&victim) else {
                break;
            };
            if !cache.evict_oldest() {
                break;
            }
            apps.total -= 1;
            count(&self.figures.evicted_edge_cap, 1);
            if cache.entries.is_empty() {
                apps.by_app.remove(&victim);
            }
        }
    }

    /// Drops the entries of `app` created by `source` that cover `keys`' host and path.
    pub(crate) fn invalidate(&self, app: &str, keys: &RequestKeys, source: &MachineId) {
        let mut apps = self.lock();
        let Apps { by_app, total, .. } = &mut *apps;
        let Some(cache) = by_app.get_mut(app) else {
            return;
        };
        let doomed: Vec<Key> = cache
            .entries
            .iter()
            .filter(|(k, e)| {
                e.source == *source
                    && match k {
                        Key::Path { host, pattern } => *host == keys.host && pattern.matches(&keys.path),
                        Key::Session { host, prefix, .. } => {
                            *host == keys.host && keys.path.starts_with(prefix.as_str())
                        }
                    }
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            if cache.remove(&k).is_some() {
                *total -= 1;
            }
        }
    }

    /// Drops one entry (its target could not be reached).
    pub(crate) fn remove(&self, app: &str, key: &Key) {
        let mut apps = self.lock();
        let Apps { by_app, total, .. } = &mut *apps;
        if let Some(cache) = by_app.get_mut(app)
            && cache.remove(key).is_some()
        {
            *total -= 1;
        }
    }

    /// Drops the entries of apps no longer in the routing table at `generation` (`live` says
    /// whether an app is); does nothing when it already pruned at that generation.
    pub(crate) fn prune(&self, generation: u64, live: impl Fn(&str) -> bool) {
        let mut apps = self.lock();
        if apps.generation == generation {
            return;
        }
        apps.generation = generation;
        let Apps { by_app, total, .. } = &mut *apps;
        by_app.retain(|name, cache| {
            let keep = live(name);
            if !keep {
                *total -= cache.entries.len();
            }
            keep
        });
    }

    /// Counts an answer given `fly-replay-cache-status: status`.
    pub(crate) fn answered(&self, status: &str) {
        let c = match status {
            "hit" => &self.figures.hits,
            "bypass" => &self.figures.bypasses,
            _ => &self.figures.misses,
        };
        count(c, 1);
    }

    /// The cache's figures in Prometheus's text format (`aloft_edge_replay_cache_*`).
    pub(crate) fn render(&self, out: &mut String) {
        let entries = self.lock().total;
        let f = &self.figures;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = write!(
            out,
            "# HELP aloft_edge_replay_cache_entries Replay cache entries held, every app together \
             (expired ones until read or evicted).\n\
             # TYPE aloft_edge_replay_cache_entries gauge\n\
             aloft_edge_replay_cache_entries {entries}\n\
             # HELP aloft_edge_replay_cache_requests_count Requests answered with a fly-replay-cache-status, \
             by status.\n\
             # TYPE aloft_edge_replay_cache_requests_count counter\n\
             aloft_edge_replay_cache_requests_count{{status=\"hit\"}} {}\n\
             aloft_edge_replay_cache_requests_count{{status=\"miss\"}} {}\n\
             aloft_edge_replay_cache_requests_count{{status=\"bypass\"}} {}\n\
             # HELP aloft_edge_replay_cache_stores_count Replay cache entries stored (a key stored \
             again counts again).\n\
             # TYPE aloft_edge_replay_cache_stores_count counter\n\
             aloft_edge_replay_cache_stores_count {}\n\
             # HELP aloft_edge_replay_cache_evictions_count Replay cache entries evicted to stay \
             within a cap, by cap (app: an app's own; edge: every app together).\n\
             # TYPE aloft_edge_replay_cache_evictions_count counter\n\
             aloft_edge_replay_cache_evictions_count{{cap=\"app\"}} {}\n\
             aloft_edge_replay_cache_evictions_count{{cap=\"edge\"}} {}\n",
            n(&f.hits),
            n(&f.misses),
            n(&f.bypasses),
            n(&f.stores),
            n(&f.evicted_app_cap),
            n(&f.evicted_edge_cap),
        );
    }

    /// How many entries `app` holds (expired ones included until read or evicted).
    #[cfg(test)]
    fn len(&self, app: &str) -> usize {
        self.lock().by_app.get(app).map_or(0, |c| c.entries.len())
    }
}

// ---------------------------------------------------------------------------------------------
// The glue `Edge::forward` calls.

/// The cache's part in forwarding one request.
#[derive(Debug, Default)]
pub(crate) struct CacheCtx {
    app: String,
    /// Keys not computed yet (nothing was cached for the app and it has no session rules):
    /// the app and public port to compute them from if an answer asks to be cached.
    deferred: Option<(Arc<AppRoutes>, u16)>,
    keys: Option<RequestKeys>,
    status: Option<&'static str>,
    /// The entry used, while its target has not answered yet, with what to restore to ask the
    /// app instead.
    pending: Option<Pending>,
    /// The entry used, kept after its target answered (its answer may invalidate it).
    used: Option<Key>,
}

#[derive(Debug)]
struct Pending {
    key: Key,
    first_app: Arc<AppRoutes>,
    route: crate::http::Route,
    uri: http::Uri,
    headers: HeaderMap,
}

/// A cache hit applied to the request: the app it goes to and the replay's source.
pub(crate) type Applied = (Arc<AppRoutes>, (Arc<MachineRoute>, Replay));

impl Edge {
    /// Looks the request up before its first attempt. On a hit the request is pointed at the
    /// cached target as a live replay would (`Some`, with the target app and the replay's
    /// source); else it goes the normal way.
    pub(crate) fn replay_cache_lookup(
        &self,
        app: &Arc<AppRoutes>,
        port: u16,
        route: &mut crate::http::Route,
        parts: &mut http::request::Parts,
        replayable: bool,
    ) -> (CacheCtx, Option<Applied>) {
        // A client's forced routing, or a body that cannot be sent twice, keeps the normal way.
        if !replayable || route.force_instance.is_some() || !route.regions.is_empty() {
            return (CacheCtx::default(), None);
        }
        let rules = session_rules(app, port);
        if rules.is_empty() && !self.replay_cache.holds(&app.name) {
            let ctx = CacheCtx {
                deferred: Some((app.clone(), port)),
                ..CacheCtx::default()
            };
            return (ctx, None);
        }
        let mut ctx = CacheCtx {
            app: app.name.clone(),
            ..CacheCtx::default()
        };
        let Some(keys) = request_keys(app, parts, &rules) else {
            return (ctx, None);
        };
        if keys.has_session() {
            ctx.status = Some("miss");
        }
        let skip = parts
            .headers
            .get(FLY_REPLAY_CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("skip"));
        let lookup = self.replay_cache.lookup(&app.name, &keys, skip, Instant::now());
        ctx.keys = Some(keys);
        let hit = match lookup {
            Lookup::Miss => return (ctx, None),
            Lookup::Bypass => {
                ctx.status = Some("bypass");
                return (ctx, None);
            }
            Lookup::Hit(hit) => hit,
        };
        // The source machine is gone: its decision may be stale too.
        let Some(source) = snap_machine(&self.routes.snapshot(), &app.name, &hit.source) else {
            self.replay_cache.remove(&app.name, &hit.key);
            return (ctx, None);
        };
        let pending = Pending {
            key: hit.key.clone(),
            first_app: app.clone(),
            route: route.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        };
        match self.apply_replay(&hit.replay, &source, app, route, parts) {
            Ok(next) => {
                ctx.status = Some("hit");
                ctx.pending = Some(pending);
                (ctx, Some((next, (source, (*hit.replay).clone()))))
            }
            Err(_) => {
                // The target app is gone or foreign now: ask the app.
                self.replay_cache.remove(&app.name, &hit.key);
                *route = pending.route;
                parts.uri = pending.uri;
                parts.headers = pending.headers;
                (ctx, None)
            }
        }
    }
}

/// The cache keys of a request to `app` (its host, path and session values).
fn request_keys(
    app: &AppRoutes,
    parts: &http::request::Parts,
    rules: &[aloft_api::ReplayCache],
) -> Option<RequestKeys> {
    let host = parts
        .uri
        .host()
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()))?;
    RequestKeys::new(host, parts.uri.path(), &parts.headers, rules).map(|k| k.since(app.since))
}

fn snap_machine(snap: &Snapshot, app: &str, id: &MachineId) -> Option<Arc<MachineRoute>> {
    snap.app(app)?.machine(id.as_str()).cloned()
}

impl CacheCtx {
    /// The cached target could not be reached: drops the entry and restores the request to go
    /// the normal way, returning the app to ask (`None` when no cached target was being tried).
    pub(crate) fn unreachable(
        &mut self,
        edge: &Edge,
        route: &mut crate::http::Route,
        parts: &mut http::request::Parts,
    ) -> Option<Arc<AppRoutes>> {
        let p = self.pending.take()?;
        edge.replay_cache.remove(&self.app, &p.key);
        self.status = Some("miss");
        *route = p.route;
        parts.uri = p.uri;
        parts.headers = p.headers;
        Some(p.first_app)
    }

    /// A machine answered with a replay; `first` when it is the request's first answer (the
    /// one a cache entry stands for).
    /// `parts`: the request as the client sent it (keys are computed from it when the lookup
    /// deferred them).
    pub(crate) fn replayed(
        &mut self,
        edge: &Edge,
        machine: &MachineRoute,
        replay: &Replay,
        first: bool,
        parts: &http::request::Parts,
    ) {
        // Replays are rare: their keys are worth computing here.
        if let Some((app, port)) = self.deferred.take()
            && first
        {
            let rules = session_rules(&app, port);
            self.app.clone_from(&app.name);
            self.keys = request_keys(&app, parts, &rules);
        }
        self.answered(edge, replay.cache.as_ref());
        let Some(keys) = &self.keys else { return };
        if first && self.used.is_none() {
            if self.status.is_none() {
                self.status = Some("miss");
            }
            // Entries only grow here: the place to forget apps that left the table (an app that
            // comes back is told apart by its `since`).
            let snap = edge.routes.snapshot();
            edge.replay_cache
                .prune(snap.generation, |a| snap.app(a).is_some());
            edge.replay_cache.store(
                &self.app,
                keys,
                replay.cache.as_ref(),
                replay,
                &machine.entry.id,
                Instant::now(),
            );
        } else if matches!(replay.cache, Some(Directive::Invalidate)) && machine.entry.app == self.app {
            edge.replay_cache.invalidate(&self.app, keys, &machine.entry.id);
        }
    }

    /// A machine's final answer (no replay): reads an invalidation from its headers, removes
    /// the `fly-replay-cache*` headers and adds `fly-replay-cache-status`.
    pub(crate) fn finished(&mut self, edge: &Edge, machine: &MachineRoute, headers: &mut HeaderMap) {
        // Nearly every answer has no `fly-` header: one pass over its names instead of three
        // lookups and three more.
        let fly = crate::http::has_fly_header(headers);
        let directive = if fly {
            Directive::from_headers(headers)
        } else {
            None
        };
        self.answered(edge, directive.as_ref());
        if matches!(directive, Some(Directive::Invalidate))
            && let Some(keys) = &self.keys
            && machine.entry.app == self.app
        {
            edge.replay_cache.invalidate(&self.app, keys, &machine.entry.id);
        }
        if fly
            && (headers.contains_key(FLY_REPLAY_CACHE)
                || headers.contains_key(FLY_REPLAY_CACHE_TTL_SECS)
                || headers.contains_key(FLY_REPLAY_CACHE_ALLOW_BYPASS))
        {
            for name in [
                FLY_REPLAY_CACHE,
                FLY_REPLAY_CACHE_TTL_SECS,
                FLY_REPLAY_CACHE_ALLOW_BYPASS,
            ] {
                headers.remove(name);
            }
        }
        if let Some(s) = self.status {
            headers.insert(FLY_REPLAY_CACHE_STATUS, HeaderValue::from_static(s));
            edge.replay_cache.answered(s);
        }
    }

    /// Any answer: the cached target (if one was tried) was reached; when it says `invalidate`,
    /// the entry that sent the request there goes too.
    fn answered(&mut self, edge: &Edge, directive: Option<&Directive>) {
        if let Some(p) = self.pending.take() {
            self.used = Some(p.key);
        }
        if matches!(directive, Some(Directive::Invalidate))
            && let Some(key) = self.used.take()
        {
            edge.replay_cache.remove(&self.app, &key);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use super::*;
    use aloft_api::ReplayCache as Rule;

    const A: &str = "3d8d9e1f2a9e48";
    const B: &str = "0123456789abcd";

    fn id(s: &str) -> MachineId {
        s.parse().unwrap()
    }

    fn replay(instance: &str) -> Replay {
        Replay {
            instance: Some(id(instance)),
            ..Replay::default()
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn keys(host: &str, path: &str) -> RequestKeys {
        RequestKeys::new(host, path, &HeaderMap::new(), &[]).unwrap()
    }

    fn store_dir(pattern: &str, ttl: u64, bypass: bool) -> Directive {
        Directive::store(pattern, ttl, bypass).unwrap()
    }

    fn hit_of(l: Lookup) -> Hit {
        match l {
            Lookup::Hit(h) => h,
            other => panic!("not a hit: {other:?}"),
        }
    }

    fn is_miss(l: &Lookup) -> bool {
        matches!(l, Lookup::Miss)
    }

    fn cookie_rule(prefix: &str, name: &str, ttl: u32, bypass: bool) -> Rule {
        Rule {
            allow_bypass: Some(bypass),
            name: Some(name.to_owned()),
            path_prefix: Some(prefix.to_owned()),
            ttl_seconds: Some(ttl),
            r#type: Some(ReplayCacheType::Cookie),
        }
    }

    #[test]
    fn header_directives() {
        let h = headers(&[
            ("fly-replay-cache", "/api/*"),
            ("fly-replay-cache-ttl-secs", "30"),
            ("fly-replay-cache-allow-bypass", "yes"),
        ]);
        assert_eq!(
            Directive::from_headers(&h),
            Some(Directive::Store {
                host: None,
                pattern: Pattern {
                    path: "/api/".to_owned(),
                    prefix: true
                },
                ttl: Duration::from_secs(30),
                allow_bypass: true,
            })
        );
        let h = headers(&[
            ("fly-replay-cache", "Shop.Example.com/cart"),
            ("fly-replay-cache-ttl-secs", "10"),
        ]);
        let Some(Directive::Store {
            host,
            pattern,
            allow_bypass,
            ..
        }) = Directive::from_headers(&h)
        else {
            panic!("no directive")
        };
        assert_eq!(host.as_deref(), Some("shop.example.com"));
        assert_eq!(pattern.path, "/cart");
        assert!(!pattern.prefix);
        assert!(!allow_bypass);
        assert_eq!(
            Directive::from_headers(&headers(&[("fly-replay-cache", " Invalidate ")])),
            Some(Directive::Invalidate)
        );
        // Not cached: TTL missing, under 10 s or not a number; no path; bad host.
        for bad in [
            vec![("fly-replay-cache", "/a")],
            vec![("fly-replay-cache", "/a"), ("fly-replay-cache-ttl-secs", "9")],
            vec![("fly-replay-cache", "/a"), ("fly-replay-cache-ttl-secs", "ten")],
            vec![
                ("fly-replay-cache", "nopath"),
                ("fly-replay-cache-ttl-secs", "30"),
            ],
            vec![("fly-replay-cache", "b@d/x"), ("fly-replay-cache-ttl-secs", "30")],
            vec![("fly-replay-cache-ttl-secs", "30")],
        ] {
            assert_eq!(Directive::from_headers(&headers(&bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn json_directives() {
        let v = serde_json::json!({"prefix": "/some/path/*", "ttl": 30});
        assert_eq!(
            Directive::from_json(&v),
            Some(store_dir("/some/path/*", 30, false))
        );
        let v = serde_json::json!({"prefix": "/x", "ttl": "12", "allow_bypass": true});
        assert_eq!(Directive::from_json(&v), Some(store_dir("/x", 12, true)));
        let v = serde_json::json!({"invalidate": true});
        assert_eq!(Directive::from_json(&v), Some(Directive::Invalidate));
        for bad in [
            serde_json::json!({"prefix": "/x", "ttl": 5}),
            serde_json::json!({"prefix": "/x"}),
            serde_json::json!({"prefix": 3, "ttl": 30}),
            serde_json::json!({"prefix": "/x", "ttl": -1}),
            serde_json::json!({"invalidate": false}),
            serde_json::json!("/x"),
        ] {
            assert_eq!(Directive::from_json(&bad), None, "{bad}");
        }
    }

    #[test]
    fn exact_and_prefix_patterns_match_longest_first() {
        let c = ReplayCache::default();
        let now = Instant::now();
        let k = keys("a.example.com", "/x");
        c.store(
            "app",
            &k,
            Some(&store_dir("/api/*", 30, false)),
            &replay(A),
            &id(A),
            now,
        );
        c.store(
            "app",
            &k,
            Some(&store_dir("/api/v2/*", 30, false)),
            &replay(B),
            &id(A),
            now,
        );
        c.store(
            "app",
            &k,
            Some(&store_dir("/exact", 30, false)),
            &replay(B),
            &id(A),
            now,
        );
        let inst = |path: &str| {
            hit_of(c.lookup("app", &keys("a.example.com", path), false, now))
                .replay
                .instance
                .clone()
                .unwrap()
        };
        assert_eq!(inst("/api/users"), id(A));
        assert_eq!(inst("/api/"), id(A));
        assert_eq!(inst("/api/v2/users"), id(B), "the longest prefix wins");
        assert_eq!(inst("/exact"), id(B));
        for miss in ["/api", "/exact/more", "/", "/ap"] {
            assert!(
                is_miss(&c.lookup("app", &keys("a.example.com", miss), false, now)),
                "{miss}"
            );
        }
        // Per hostname and per app.
        assert!(is_miss(&c.lookup(
            "app",
            &keys("b.example.com", "/api/x"),
            false,
            now
        )));
        assert!(is_miss(&c.lookup(
            "other",
            &keys("a.example.com", "/api/x"),
            false,
            now
        )));
        // The host is normalized (case, port).
        assert_eq!(
            hit_of(c.lookup("app", &keys("A.Example.com:8080", "/api/x"), false, now)).source,
            id(A)
        );
    }

    #[test]
    fn a_pattern_may_name_another_host() {
        let c = ReplayCache::default();
        let now = Instant::now();
        c.store(
            "app",
            &keys("a.example.com", "/x"),
            Some(&store_dir("b.example.com/p/*", 30, false)),
            &replay(A),
            &id(A),
            now,
        );
        assert!(is_miss(&c.lookup(
            "app",
            &keys("a.example.com", "/p/1"),
            false,
            now
        )));
        hit_of(c.lookup("app", &keys("b.example.com", "/p/1"), false, now));
    }

    #[test]
    fn entries_expire_on_read() {
        let c = ReplayCache::default();
        let now = Instant::now();
        let k = keys("a.example.com", "/p");
        c.store(
            "app",
            &k,
            Some(&store_dir("/p", 10, false)),
            &replay(A),
            &id(A),
            now,
        );
        hit_of(c.lookup("app", &k, false, now + Duration::from_millis(9_999)));
        assert!(is_miss(&c.lookup(
            "app",
            &k,
            false,
            now + Duration::from_secs(10)
        )));
        assert_eq!(c.len("app"), 0, "the expired entry was dropped");
    }

    #[test]
    fn nothing_is_cached_without_a_directive_or_session() {
        let c = ReplayCache::default();
        let now = Instant::now();
        let k = keys("a.example.com", "/p");
        c.store("app", &k, None, &replay(A), &id(A), now);
        assert_eq!(c.len("app"), 0);
        assert!(is_miss(&c.lookup("app", &k, false, now)));
    }

    #[test]
    fn bypass_only_where_allowed() {
        let c = ReplayCache::default();
        let now = Instant::now();
        let k = keys("a.example.com", "/x");
        c.store(
            "app",
            &k,
            Some(&store_dir("/open/*", 30, true)),
            &replay(A),
            &id(A),
            now,
        );
        c.store(
            "app",
            &k,
            Some(&store_dir("/closed/*", 30, false)),
            &replay(A),
            &id(A),
            now,
        );
        let open = keys("a.example.com", "/open/1");
        let closed = keys("a.example.com", "/closed/1");
        assert!(matches!(c.lookup("app", &open, true, now), Lookup::Bypass));
        hit_of(c.lookup("app", &open, false, now));
        hit_of(c.lookup("app", &closed, true, now));
    }

    #[test]
    fn invalidate_drops_only_the_sources_entries_for_the_path() {
        let c = ReplayCache::default();
        let now = Instant::now();
        let k = keys("a.example.com", "/x");
        c.store(
            "app",
            &k,
            Some(&store_dir("/p/*", 30, false)),
            &replay(B),
            &id(A),
            now,
        );
        c.store(
            "app",
            &k,
            Some(&store_dir("/q/*", 30, false)),
            &replay(B),
            &id(A),
            now,
        );
        c.store(
            "app",
            &k,
            Some(&store_dir("/p/b/*", 30, false)),
            &replay(A),
            &id(B),
            now,
        );
        // B's invalidate for /p/b/1 drops B's entry only.
        c.store(
            "app",
            &keys("a.example.com", "/p/b/1"),
            Some(&Directive::Invalidate),
            &replay(A),
            &id(B),
            now,
        );
        assert_eq!(c.len("app"), 2);
        assert_eq!(
            hit_of(c.lookup("app", &keys("a.example.com", "/p/b/1"), false, now)).source,
            id(A)
        );
        // A's invalidate for /p/1 drops /p/* but not /q/*.
        c.invalidate("app", &keys("a.example.com", "/p/1"), &id(A));
        assert!(is_miss(&c.lookup(
            "app",
            &keys("a.example.com", "/p/1"),
            false,
            now
        )));
        hit_of(c.lookup("app", &keys("a.example.com", "/q/1"), false, now));
    }

    #[test]
    fn bounded_per_app_oldest_evicted() {
        let c = ReplayCache::new(3, MAX_ENTRIES);
        let now = Instant::now();
        let k = keys("a.example.com", "/x");
        for i in 0..5 {
            c.store(
                "app",
                &k,
                Some(&store_dir(&format!("/p{i}/*"), 30, false)),
                &replay(A),
                &id(A),
                now,
            );
        }
        assert_eq!(c.len("app"), 3);
        for i in 0..2 {
            assert!(is_miss(&c.lookup(
                "app",
                &keys("a.example.com", &format!("/p{i}/x")),
                false,
                now
            )));
        }
        for i in 2..5 {
            hit_of(c.lookup("app", &keys("a.example.com", &format!("/p{i}/x")), false, now));
        }
        // Storing the same key again refreshes it instead of adding one.
        c.store(
            "app",
            &k,
            Some(&store_dir("/p2/*", 30, false)),
            &replay(B),
            &id(A),
            now,
        );
        assert_eq!(c.len("app"), 3);
        c.store(
            "app",
            &k,
            Some(&store_dir("/p9/*", 30, false)),
            &replay(A),
            &id(A),
            now,
        );
        hit_of(c.lookup("app", &keys("a.example.com", "/p2/x"), false, now));
        assert!(is_miss(&c.lookup(
            "app",
            &keys("a.example.com", "/p3/x"),
            false,
            now
        )));
        // Another app has its own room.
        c.store(
            "b",
            &k,
            Some(&store_dir("/z/*", 30, false)),
            &replay(A),
            &id(A),
            now,
        );
        assert_eq!(c.len("app"), 3);
        assert_eq!(c.len("b"), 1);
    }

    #[test]
    fn the_edge_cap_holds_across_apps_and_evicts_from_the_largest() {
        let c = ReplayCache::new(100, 20);
        let now = Instant::now();
        let k = keys("a.example.com", "/x");
        let put = |app: &str, i: usize| {
            c.store(
                app,
                &k,
                Some(&store_dir(&format!("/p{i}/*"), 30, false)),
                &replay(A),
                &id(A),
                now,
            );
            assert!(c.lock().total <= 20, "over the edge cap");
        };
        let held = |app: &str, i: usize| {
            matches!(
                c.lookup(app, &keys("a.example.com", &format!("/p{i}/x")), false, now),
                Lookup::Hit(_)
            )
        };
        // Four quiet apps hold three entries each.
        for app in ["a", "b", "c", "d"] {
            for i in 0..3 {
                put(app, i);
            }
        }
        // A noisy app stores 500 (under its own cap of 100 each time): once it is the largest it
        // evicts only its own oldest, and the quiet apps keep every entry.
        for i in 0..500 {
            put("noisy", i);
        }
        assert_eq!(c.lock().total, 20);
        for app in ["a", "b", "c", "d"] {
            assert_eq!(c.len(app), 3, "{app}");
            assert!((0..3).all(|i| held(app, i)), "{app}");
        }
        assert_eq!(c.len("noisy"), 8);
        assert!((492..500).all(|i| held("noisy", i)), "its newest stay");
        assert!(!held("noisy", 491));

        // Ten more apps store one entry each: the largest gives first (noisy down to the others'
        // three), then, level, one each in name order.
        for n in 0..10 {
            put(&format!("m{n}"), 0);
        }
        assert_eq!(c.lock().total, 20);
        for app in ["a", "b", "c", "d", "noisy"] {
            assert_eq!(c.len(app), 2, "{app}");
        }
        for n in 0..10 {
            assert_eq!(c.len(&format!("m{n}")), 1);
        }
        assert!(!held("a", 0) && held("a", 1) && held("a", 2), "a's oldest went");

        let f = &c.figures;
        assert_eq!(f.stores.load(Ordering::Relaxed), 12 + 500 + 10);
        assert_eq!(f.evicted_edge_cap.load(Ordering::Relaxed), 12 + 500 + 10 - 20);
        assert_eq!(f.evicted_app_cap.load(Ordering::Relaxed), 0);
        // The count follows removals of every kind.
        c.remove(
            "m0",
            &hit_of(c.lookup("m0", &keys("a.example.com", "/p0/x"), false, now)).key,
        );
        c.prune(1, |a| a != "m1");
        let apps = c.lock();
        assert_eq!(apps.total, 18);
        assert_eq!(
            apps.total,
            apps.by_app.values().map(|a| a.entries.len()).sum::<usize>()
        );
    }

    #[test]
    fn hostile_session_values_stay_bounded() {
        let c = ReplayCache::new(100, MAX_ENTRIES);
        let now = Instant::now();
        let rules = [cookie_rule("/", "sid", 60, false)];
        for i in 0..1000 {
            let h = headers(&[("cookie", &format!("sid=random{i}"))]);
            let k = RequestKeys::new("a.example.com", "/", &h, &rules).unwrap();
            c.store("app", &k, None, &replay(A), &id(A), now);
        }
        assert_eq!(c.len("app"), 100);
        // Values too long are not cached at all.
        let long = format!("sid={}", "x".repeat(MAX_KEY_BYTES + 1));
        let k = RequestKeys::new("a.example.com", "/", &headers(&[("cookie", &long)]), &rules).unwrap();
        assert!(!k.has_session());
        assert!(
            RequestKeys::new(
                "a.example.com",
                &"/x".repeat(MAX_KEY_BYTES),
                &HeaderMap::new(),
                &[]
            )
            .is_none()
        );
    }

    #[test]
    fn session_keys_by_cookie_and_header_longest_prefix_wins() {
        let rules = [
            cookie_rule("/", "sid", 60, false),
            Rule {
                r#type: Some(ReplayCacheType::Header),
                name: Some("x-tenant".to_owned()),
                path_prefix: Some("/api".to_owned()),
                ..cookie_rule("", "", 30, true)
            },
        ];
        let h = headers(&[("cookie", "a=1; sid=s1"), ("x-tenant", "t1")]);
        let root = RequestKeys::new("a.example.com", "/page", &h, &rules).unwrap();
        let api = RequestKeys::new("a.example.com", "/api/x", &h, &rules).unwrap();
        assert!(matches!(&root.session.as_ref().unwrap().key, Key::Session { value, .. } if value == "s1"));
        let s = api.session.as_ref().unwrap();
        assert!(matches!(&s.key, Key::Session { value, prefix, .. } if value == "t1" && prefix == "/api"));
        assert!(s.allow_bypass);
        // The winning rule's key is missing: no session key (no fallback to a shorter rule).
        let only_cookie = headers(&[("cookie", "sid=s1")]);
        let k = RequestKeys::new("a.example.com", "/api/x", &only_cookie, &rules).unwrap();
        assert!(!k.has_session());
        // A rule under 10 s is ignored.
        let short = [cookie_rule("/", "sid", 5, false)];
        assert!(
            !RequestKeys::new("a.example.com", "/", &only_cookie, &short)
                .unwrap()
                .has_session()
        );
    }

    #[test]
    fn session_values_are_cached_apart() {
        let c = ReplayCache::default();
        let now = Instant::now();
        let rules = [cookie_rule("/", "sid", 60, false)];
        let k = |v: &str| {
            RequestKeys::new(
                "a.example.com",
                "/",
                &headers(&[("cookie", &format!("sid={v}"))]),
                &rules,
            )
            .unwrap()
        };
        c.store("app", &k("one"), None, &replay(A), &id(B), now);
        c.store("app", &k("two"), None, &replay(B), &id(B), now);
        assert_eq!(
            hit_of(c.lookup("app", &k("one"), false, now)).replay.instance,
            Some(id(A))
        );
        assert_eq!(
            hit_of(c.lookup("app", &k("two"), false, now)).replay.instance,
            Some(id(B))
        );
        assert!(is_miss(&c.lookup("app", &k("three"), false, now)));
        assert!(is_miss(&c.lookup("app", &keys("a.example.com", "/"), false, now)));
    }

    #[test]
    fn apps_leaving_the_table_are_dropped() {
        let c = ReplayCache::default();
        let now = Instant::now();
        let k = keys("a.example.com", "/p");
        c.store(
            "gone",
            &k,
            Some(&store_dir("/p", 30, false)),
            &replay(A),
            &id(A),
            now,
        );
        c.store(
            "kept",
            &k,
            Some(&store_dir("/p", 30, false)),
            &replay(A),
            &id(A),
            now,
        );
        c.prune(1, |a| a == "kept");
        assert_eq!(c.len("gone"), 0);
        assert_eq!(c.len("kept"), 1);
        // Same generation: not pruned again.
        c.prune(1, |_| false);
        assert_eq!(c.len("kept"), 1);
        c.prune(2, |_| false);
        assert_eq!(c.len("kept"), 0);
    }

    #[test]
    fn an_app_back_in_the_table_starts_empty() {
        let c = ReplayCache::default();
        let now = Instant::now();
        let k3 = keys("a.example.com", "/p").since(3);
        let k7 = keys("a.example.com", "/p").since(7);
        let p = store_dir("/p", 30, false);
        c.store("app", &k3, Some(&p), &replay(A), &id(A), now);
        hit_of(c.lookup("app", &k3, false, now));
        // The app left the table and came back (at generation 7): its old entries are stale.
        assert!(is_miss(&c.lookup("app", &k7, false, now)));
        assert_eq!(c.len("app"), 0);
        c.store("app", &k3, Some(&p), &replay(A), &id(A), now);
        c.store(
            "app",
            &k7,
            Some(&store_dir("/q", 30, false)),
            &replay(A),
            &id(A),
            now,
        );
        assert_eq!(c.len("app"), 1, "storing for the new app dropped the old entries");
    }

    #[test]
    fn remove_drops_one_entry_and_its_prefix_length() {
        let c = ReplayCache::default();
        let now = Instant::now();
        let k = keys("a.example.com", "/x");
        c.store(
            "app",
            &k,
            Some(&store_dir("/p/*", 30, false)),
            &replay(A),
            &id(A),
            now,
        );
        let hit = hit_of(c.lookup("app", &keys("a.example.com", "/p/1"), false, now));
        c.remove("app", &hit.key);
        assert!(is_miss(&c.lookup(
            "app",
            &keys("a.example.com", "/p/1"),
            false,
            now
        )));
        assert!(c.lock().by_app.get("app").unwrap().prefix_lens.is_empty());
    }
}
