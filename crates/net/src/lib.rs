//! `aloft-net`: the host side of every machine's network.
//!
//! - [`plan`]: the addressing plan (pure): a 6PN-style IPv6 address per machine inside its
//!   organization's prefix, a host-local IPv4 `/31` for egress and the proxy, the guest's
//!   `NetConfig`/`DnsConfig`/`/etc/hosts`, and a slot allocator whose state the caller persists.
//!
//! Used by the agent (and tests). Depends on `aloft-netlink` and `aloft-guest-proto` only among
//! aloft crates; must not depend on `aloft-vm`, the store or any async runtime: every call blocks
//! the caller's thread (the agent runs them in `spawn_blocking`).

#![warn(missing_docs)]

pub mod plan;

pub use plan::{MachineNet, Plan, PlanConfig, PlanError, SlotAllocator, SlotState};
