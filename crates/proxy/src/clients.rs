//! Per-client connection limits: one address cannot hold more than its share of the edge.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Open connections per client address.
#[derive(Debug, Default)]
pub(crate) struct ClientLimits {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One admitted connection; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct ClientSlot {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl ClientLimits {
    /// Admits a connection from `ip` unless it already has `max` open.
    pub(crate) fn admit(&self, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            open: self.open.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_at_most_max_and_slots_come_back() {
        let limits = ClientLimits::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = limits.admit(a, 2).unwrap();
        let _s2 = limits.admit(a, 2).unwrap();
        assert!(limits.admit(a, 2).is_none());
        assert!(limits.admit(b, 2).is_some(), "another client is not affected");
        drop(s1);
        // Kept: a slot dropped at once would free its place again.
        let _s3 = limits.admit(a, 2).unwrap();
        // IPv4-mapped IPv6 is the same client.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert!(limits.admit(mapped, 2).is_none());
    }
}
