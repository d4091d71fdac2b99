//! The process list (`ps`) from `/proc`, with listening sockets matched by socket inode.

use std::collections::HashMap;
use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};

use aloft_guest_proto::{ListenSocket, ProcessInfo};

use crate::users::{PasswdEntry, parse_passwd, user_name};

/// Listening sockets in one `/proc/net/{tcp,tcp6,udp,udp6}` file, keyed by inode. TCP: state
/// `0A` (LISTEN); UDP: state `07` (unconnected, bound).
pub(crate) fn parse_proc_net(text: &str, proto: &str, v6: bool) -> Vec<(u64, ListenSocket)> {
    let want_state = if proto == "tcp" { "0A" } else { "07" };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != want_state {
                return None;
            }
            let (addr, port) = f[1].split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let address = if v6 {
                if addr.len() != 32 {
                    return None;
                }
                let mut octets = [0u8; 16];
                for i in 0..4 {
                    let word = u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok()?;
                    octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
                }
                format!("[{}]:{port}", Ipv6Addr::from(octets))
            } else {
                let word = u32::from_str_radix(addr, 16).ok()?;
                format!("{}:{port}", Ipv4Addr::from(word.to_ne_bytes()))
            };
            let inode = f[9].parse().ok()?;
            Some((
                inode,
                ListenSocket {
                    proto: proto.to_owned(),
                    address,
                },
            ))
        })
        .collect()
}

/// Parsed `/proc/PID/stat`: (comm, ppid, utime + stime in ticks). The comm may hold spaces and
/// parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<(String, i32, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] = state (field 3), rest[1] = ppid (4), rest[11] = utime (14), rest[12] = stime (15)
    let ppid = rest.get(1)?.parse().ok()?;
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, ppid, utime + stime))
}

/// (real uid, VmRSS in KiB) from `/proc/PID/status`.
fn parse_status(text: &str) -> (u32, u64) {
    let mut uid = 0;
    let mut rss = 0;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Uid:") {
            uid = v
                .split_whitespace()
                .next()
                .and_then(|u| u.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("VmRSS:") {
            rss = v
                .split_whitespace()
                .next()
                .and_then(|u| u.parse().ok())
                .unwrap_or(0);
        }
    }
    (uid, rss)
}

fn listening_sockets() -> HashMap<u64, ListenSocket> {
    let mut out = HashMap::new();
    for (file, proto, v6) in [
        ("/proc/net/tcp", "tcp", false),
        ("/proc/net/tcp6", "tcp", true),
        ("/proc/net/udp", "udp", false),
        ("/proc/net/udp6", "udp", true),
    ] {
        if let Ok(text) = fs::read_to_string(file) {
            out.extend(parse_proc_net(&text, proto, v6));
        }
    }
    out
}

fn process(
    pid: i32,
    passwd: &[PasswdEntry],
    sockets: &HashMap<u64, ListenSocket>,
    tck: u64,
) -> Option<ProcessInfo> {
    let dir = format!("/proc/{pid}");
    let (stat_comm, ppid, ticks) = parse_stat(&fs::read_to_string(format!("{dir}/stat")).ok()?)?;
    let (uid, rss_kib) = parse_status(&fs::read_to_string(format!("{dir}/status")).unwrap_or_default());
    let command = fs::read_to_string(format!("{dir}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or(stat_comm);
    let cmdline = fs::read(format!("{dir}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let directory = fs::read_link(format!("{dir}/cwd"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut listen_sockets = Vec::new();
    if let Ok(fds) = fs::read_dir(format!("{dir}/fd")) {
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            let inode = target
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(sock) = inode.and_then(|i| sockets.get(&i))
                && !listen_sockets.contains(sock)
            {
                listen_sockets.push(sock.clone());
            }
        }
    }
    Some(ProcessInfo {
        pid,
        ppid,
        user: user_name(uid, passwd),
        command,
        cmdline,
        directory,
        rss_kib,
        cpu_ms: ticks * 1000 / tck,
        listen_sockets,
    })
}

/// Every user-space process in the guest, by pid.
pub(crate) fn list_processes() -> Vec<ProcessInfo> {
    let passwd = parse_passwd(&fs::read_to_string("/etc/passwd").unwrap_or_default());
    let sockets = listening_sockets();
    let tck = crate::sys::clock_ticks();
    let mut pids: Vec<i32> = fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    // Kernel threads (kthreadd, pid 2, and its children) are not the user's business.
    pids.into_iter()
        .filter(|&pid| pid != 2)
        .filter_map(|pid| process(pid, &passwd, &sockets, tck))
        .filter(|p| p.ppid != 2)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1235 1 0000000000000000 100 0 0 10 0
   2: 0100007F:0BB8 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000  1000        0 1236 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2222 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2223 1 0000000000000000 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3333 2 0000000000000000 0
";

    #[test]
    fn tcp_listeners_only() {
        let got = parse_proc_net(TCP, "tcp", false);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, 1234);
        assert_eq!(got[0].1.address, "0.0.0.0:8080");
        assert_eq!(got[1].1.address, "127.0.0.1:3000");
        assert_eq!(got[1].1.proto, "tcp");
    }

    #[test]
    fn tcp6_addresses() {
        let got = parse_proc_net(TCP6, "tcp", true);
        assert_eq!(got[0].1.address, "[::]:8080");
        assert_eq!(got[1].1.address, "[::1]:80");
    }

    #[test]
    fn udp_bound_sockets() {
        let got = parse_proc_net(UDP, "udp", false);
        assert_eq!(
            got,
            vec![(
                3333,
                ListenSocket {
                    proto: "udp".into(),
                    address: "0.0.0.0:53".into()
                }
            )]
        );
    }

    #[test]
    fn stat_with_odd_comm() {
        let stat = "42 (my (weird) app) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 200";
        assert_eq!(parse_stat(stat), Some(("my (weird) app".into(), 1, 300)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nVmRSS:\t    1234 kB\n";
        assert_eq!(parse_status(s), (1000, 1234));
    }
}
