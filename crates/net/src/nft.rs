//! aloft's nftables table, `inet aloft`: text scripts for `nft -f -` (each script is one
//! transaction) and the parsing of `nft -j` listings. Nothing here names another table.
//!
//! The rules are fixed; machines are elements of three sets keyed by tap name, so adding or
//! removing a machine never edits a rule:
//!
//! - `guest6` (`ifname . ipv6_addr`, intervals): the `/112` a tap's guest may send from;
//! - `guest4` (`ifname . ipv4_addr`): the IPv4 a tap's guest may send from;
//! - `reach6` (`ifname . ipv6_addr`, intervals): the 6PN prefixes a tap's guest may talk to (its
//!   organization's `/48` and the platform's `fdaa::/48`).
//!
//! A tap named `aloft-m*` with no elements (a stray) can send nothing.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use aloft_guest_proto::IpNet;
use serde_json::Value;

use crate::plan::{MachineNet, Plan, SIXPN, TAP_PREFIX, platform_prefix};
use crate::{Namespace, NetError};

/// The table's family and name.
pub(crate) const TABLE: &str = "inet aloft";

/// The three per-machine sets.
pub(crate) const SETS: [&str; 3] = ["guest6", "guest4", "reach6"];

/// One set element: `"<tap>" . <value>` in set `set`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Elem {
    pub(crate) set: String,
    pub(crate) tap: String,
    /// The address part as nft reads it: `ADDR`, `ADDR/LEN` or `A-B`.
    pub(crate) value: String,
}

impl Elem {
    fn new(set: &str, tap: &str, value: &IpNet) -> Self {
        Self {
            set: set.to_owned(),
            tap: tap.to_owned(),
            value: canonical(value.addr, value.prefix_len),
        }
    }

    fn render(&self) -> String {
        format!("\"{}\" . {}", self.tap, self.value)
    }
}

/// `ADDR` for a full-length prefix, else `NETWORK/LEN` (how nft lists interval elements).
fn canonical(addr: IpAddr, len: u8) -> String {
    let full = if addr.is_ipv4() { 32 } else { 128 };
    if len >= full {
        addr.to_string()
    } else {
        format!("{addr}/{len}")
    }
}

/// The elements machine `m` needs.
pub(crate) fn machine_elements(m: &MachineNet) -> Vec<Elem> {
    let ip4 = IpNet {
        addr: m.ip4.into(),
        prefix_len: 32,
    };
    vec![
        Elem::new("guest6", &m.tap, &m.ip6_prefix),
        Elem::new("guest4", &m.tap, &ip4),
        Elem::new("reach6", &m.tap, &m.org_prefix),
        Elem::new("reach6", &m.tap, &platform_prefix()),
    ]
}

/// The table, its sets and chains, and every rule, for `plan`. Idempotent: the sets keep their
/// elements, the chains are flushed and refilled in the same transaction.
pub(crate) fn base_script(plan: &Plan) -> String {
    let pool = plan.ipv4_pool();
    let dns = plan.dns();
    let taps = format!("\"{TAP_PREFIX}*\"");
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(format!("add table {TABLE}"));
    line(format!(
        "add set {TABLE} guest6 {{ type ifname . ipv6_addr; flags interval; }}"
    ));
    line(format!("add set {TABLE} guest4 {{ type ifname . ipv4_addr; }}"));
    line(format!(
        "add set {TABLE} reach6 {{ type ifname . ipv6_addr; flags interval; }}"
    ));
    for (chain, hook) in [
        (
            "forward",
            "type filter hook forward priority filter; policy accept;",
        ),
        ("input", "type filter hook input priority filter; policy accept;"),
        (
            "postrouting",
            "type nat hook postrouting priority srcnat; policy accept;",
        ),
    ] {
        line(format!("add chain {TABLE} {chain} {{ {hook} }}"));
    }
    for chain in ["from_guest", "to_guest", "guest_to_host"] {
        line(format!("add chain {TABLE} {chain}"));
    }
    for chain in [
        "forward",
        "input",
        "postrouting",
        "from_guest",
        "to_guest",
        "guest_to_host",
    ] {
        line(format!("flush chain {TABLE} {chain}"));
    }
    let mut rule = |chain: &str, r: &str| line(format!("add rule {TABLE} {chain} {r}"));
    // Forwarded traffic from and to machines.
    rule("forward", &format!("iifname {taps} jump from_guest"));
    rule("forward", &format!("oifname {taps} jump to_guest"));
    // From a guest: only its own addresses (no spoofing, nothing from strays)…
    rule(
        "from_guest",
        "meta nfproto ipv6 iifname . ip6 saddr != @guest6 drop",
    );
    rule(
        "from_guest",
        "meta nfproto ipv4 iifname . ip saddr != @guest4 drop",
    );
    // …to its own organization or the platform only; 6PN is private (no IPv6 egress)…
    rule(
        "from_guest",
        &format!("ip6 daddr {SIXPN} iifname . ip6 daddr != @reach6 drop"),
    );
    rule(
        "from_guest",
        &format!("ip6 daddr != {SIXPN} reject with icmpv6 type no-route"),
    );
    // …and the IPv4 pool is no path between machines (IPv4 is for egress and the proxy).
    rule("from_guest", &format!("ip daddr {pool} drop"));
    // To a guest: 6PN sources from its organization or the platform only.
    rule(
        "to_guest",
        &format!("ip6 saddr {SIXPN} oifname . ip6 saddr != @reach6 drop"),
    );
    // Guests reach the host only for replies, ICMP (neighbour discovery, ping) and DNS.
    rule("input", &format!("iifname {taps} jump guest_to_host"));
    rule("guest_to_host", "ct state established,related accept");
    rule("guest_to_host", "meta l4proto { icmp, ipv6-icmp } accept");
    rule(
        "guest_to_host",
        "meta nfproto ipv6 iifname . ip6 saddr != @guest6 drop",
    );
    rule(
        "guest_to_host",
        "meta nfproto ipv4 iifname . ip saddr != @guest4 drop",
    );
    rule(
        "guest_to_host",
        &format!("ip6 daddr {dns} meta l4proto {{ tcp, udp }} th dport 53 accept"),
    );
    rule("guest_to_host", "drop");
    // Egress: the pool is masqueraded behind whatever interface the packet leaves by.
    rule(
        "postrouting",
        &format!("ip saddr {pool} oifname != {taps} masquerade"),
    );
    s
}

/// `add element` lines (idempotent: an element already there is no error).
pub(crate) fn add_script(elems: &[Elem]) -> String {
    elems.iter().fold(String::new(), |mut s, e| {
        let _ = writeln!(s, "add element {TABLE} {} {{ {} }}", e.set, e.render());
        s
    })
}

/// `delete element` lines. Every element must exist (nft 1.0.6 has no `destroy`): list first.
pub(crate) fn delete_script(elems: &[Elem]) -> String {
    elems.iter().fold(String::new(), |mut s, e| {
        let _ = writeln!(s, "delete element {TABLE} {} {{ {} }}", e.set, e.render());
        s
    })
}

/// The per-machine elements in `nft -j list table inet aloft` output.
pub(crate) fn parse_elements(json: &str) -> Result<Vec<Elem>, NetError> {
    let bad = |what: &str| NetError::NftOutput {
        reason: what.to_owned(),
    };
    let v: Value = serde_json::from_str(json).map_err(|e| bad(&e.to_string()))?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no nftables array"))?;
    let mut out = Vec::new();
    for item in items {
        let Some(set) = item.get("set") else { continue };
        let name = set.get("name").and_then(Value::as_str).unwrap_or_default();
        if !SETS.contains(&name) {
            continue;
        }
        let Some(elems) = set.get("elem").and_then(Value::as_array) else {
            continue;
        };
        for e in elems {
            // `{"elem": {"val": …}}` wraps elements that carry timeouts or comments.
            let e = e.get("elem").and_then(|w| w.get("val")).unwrap_or(e);
            let parts = e
                .get("concat")
                .and_then(Value::as_array)
                .filter(|p| p.len() == 2)
                .ok_or_else(|| bad("set element is not a two-part concatenation"))?;
            let tap = parts[0]
                .as_str()
                .ok_or_else(|| bad("set element without an interface name"))?;
            let value = value_text(&parts[1]).ok_or_else(|| bad("set element address"))?;
            out.push(Elem {
                set: name.to_owned(),
                tap: tap.to_owned(),
                value,
            });
        }
    }
    out.sort();
    Ok(out)
}

fn value_text(v: &Value) -> Option<String> {
    if let Some(s) = v.as_str() {
        let addr: IpAddr = s.parse().ok()?;
        return Some(addr.to_string());
    }
    if let Some(p) = v.get("prefix") {
        let addr: IpAddr = p.get("addr")?.as_str()?.parse().ok()?;
        let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
        return Some(canonical(addr, len));
    }
    if let Some(r) = v.get("range").and_then(Value::as_array) {
        let a: IpAddr = r.first()?.as_str()?.parse().ok()?;
        let b: IpAddr = r.get(1)?.as_str()?.parse().ok()?;
        return Some(format!("{a}-{b}"));
    }
    None
}

/// Runs `nft` in a namespace.
#[derive(Debug, Clone)]
pub(crate) struct Nft {
    pub(crate) ns: Namespace,
}

impl Nft {
    /// Applies `script` as one transaction (`nft -f -`).
    pub(crate) fn apply(&self, script: &str) -> Result<(), NetError> {
        if script.is_empty() {
            return Ok(());
        }
        self.nft(&["-f", "-"], Some(script)).map(drop)
    }

    /// `nft -j list table inet aloft`, or `None` when the table does not exist. No other table is
    /// listed.
    pub(crate) fn list_table(&self) -> Result<Option<String>, NetError> {
        match self.nft(&["-j", "list", "table", "inet", "aloft"], None) {
            Ok(json) => Ok(Some(json)),
            Err(NetError::Nft { stderr, .. }) if stderr.contains("No such file or directory") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The per-machine elements now in the table.
    pub(crate) fn elements(&self) -> Result<Vec<Elem>, NetError> {
        match self.list_table()? {
            Some(json) => parse_elements(&json),
            None => Ok(Vec::new()),
        }
    }

    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
        let ns = self.ns.clone();
        let run = || -> Result<std::process::Output, std::io::Error> {
            let mut child = Command::new("nft")
                .args(args)
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
                pipe.write_all(text.as_bytes())?;
            }
            child.wait_with_output()
        };
        let out = ns
            .run(run)
            .map_err(|source| NetError::Namespace {
                ns: ns.describe(),
                source,
            })?
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    NetError::NftMissing
                } else {
                    NetError::NftRun { source }
                }
            })?;
        if !out.status.success() {
            return Err(NetError::Nft {
                command: format!("nft {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlanConfig;

    #[test]
    fn base_script_names_only_aloft_table_and_has_the_policy() {
        let plan = Plan::new(&PlanConfig::new(1)).unwrap();
        let s = base_script(&plan);
        for l in s.lines() {
            let words: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(&words[2..4], ["inet", "aloft"], "{l}");
        }
        assert!(s.contains("ip saddr 172.19.0.0/16 oifname != \"aloft-m*\" masquerade"));
        assert!(s.contains("ip6 daddr fdaa::/16 iifname . ip6 daddr != @reach6 drop"));
        assert!(s.contains("ip6 daddr fdaa::3 meta l4proto { tcp, udp } th dport 53 accept"));
        assert!(s.contains("flush chain inet aloft forward"));
    }

    #[test]
    fn machine_elements_render_as_nft_lists_them() {
        let plan = Plan::new(&PlanConfig::new(2)).unwrap();
        let m = plan.machine(7, 3).unwrap();
        let add = add_script(&machine_elements(&m));
        assert_eq!(
            add,
            "add element inet aloft guest6 { \"aloft-m3\" . fdaa:0:7:0:2:0:3:0/112 }\n\
             add element inet aloft guest4 { \"aloft-m3\" . 172.19.0.7 }\n\
             add element inet aloft reach6 { \"aloft-m3\" . fdaa:0:7::/48 }\n\
             add element inet aloft reach6 { \"aloft-m3\" . fdaa::/48 }\n"
        );
        assert!(delete_script(&machine_elements(&m)).starts_with("delete element inet aloft guest6"));
    }

    #[test]
    fn parses_listing() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"table": {"family": "inet", "name": "aloft", "handle": 1}},
          {"set": {"family": "inet", "name": "reach6", "table": "aloft", "type": ["ifname", "ipv6_addr"],
            "flags": ["interval"], "elem": [{"concat": ["aloft-m1", {"prefix": {"addr": "fdaa:0:1::", "len": 48}}]},
            {"concat": ["aloft-m1", {"range": ["fdaa::1", "fdaa::9"]}]}]}},
          {"set": {"family": "inet", "name": "guest4", "table": "aloft", "type": ["ifname", "ipv4_addr"],
            "elem": [{"concat": ["aloft-m9", "172.19.0.19"]}]}},
          {"set": {"family": "inet", "name": "other", "table": "aloft", "elem": ["x"]}},
          {"chain": {"family": "inet", "table": "aloft", "name": "forward"}}]}"#;
        let e = parse_elements(json).unwrap();
        let text: Vec<String> = e.iter().map(|e| format!("{} {}", e.set, e.render())).collect();
        assert_eq!(
            text,
            [
                "guest4 \"aloft-m9\" . 172.19.0.19",
                "reach6 \"aloft-m1\" . fdaa:0:1::/48",
                "reach6 \"aloft-m1\" . fdaa::1-fdaa::9",
            ]
        );
        assert!(parse_elements("not json").is_err());
        assert!(parse_elements(r#"{"nftables": [{"set": {"name": "guest4", "elem": [1]}}]}"#).is_err());
    }
}
