//! aloft's internal DNS: the resolver machines are given (`fdaa::3` in their `/etc/resolv.conf`,
//! ADR 0007), one per host, run by `aloftd` beside the agent. It answers Fly's `.internal` names
//! from the service catalog and forwards every other name to the host's own resolvers.
//!
//! - [`Zone`] is the view: the machines of the service catalog (`/catalog/…`, as agents publish
//!   them), apps' organizations (`/apps/…`) and organizations' private network numbers
//!   (`/org-networks/…`), kept in step with the control store through
//!   [`aloft_store::follow`] ([`PREFIXES`]). It answers `AAAA` for `<app>.internal`,
//!   `global.`, `<region>.`, `top<N>.nearest.of.`, `<id>.vm.` and `<group>.process.` names
//!   (started machines only), and `TXT` for `vms.`, `regions.` (each with an `all.` form),
//!   `_apps.internal` and `_instances.internal` (and `all.`), in Fly's formats.
//! - **Organizations are isolated by the asker's address**: a query from a 6PN address
//!   `fdaa:<network>:…` sees only the apps and machines of that network's organization (for any
//!   other app the name does not exist); a query from anywhere else can only come from the host
//!   itself (nftables lets guests reach the resolver only from their own 6PN addresses, and it
//!   listens on the platform's address) and sees every organization: the operator's view.
//! - [`Server`] serves DNS over UDP and TCP (RFC 1035, EDNS0 sizes, truncation), answers from the
//!   zone, and relays other names to upstream resolvers (from the host's `/etc/resolv.conf`
//!   unless configured), bounded in flight; bad input gets `FORMERR`, `NOTIMP` or nothing, never
//!   a crash.
//! - [`wire`] is the message codec, written here for the small part of DNS this needs (no
//!   resolver crate: ADR 0018).
//!
//! Must not depend on the proxy, the agent or the control plane: it reads the store, nothing
//! else, and it never writes.

#![warn(missing_docs)]

mod follow;
mod names;
mod server;
pub mod wire;
mod zone;

pub use follow::PREFIXES;
pub use server::{Server, ServerConfig, ServerError, resolv_conf_upstreams};
pub use zone::Zone;

/// Time to live of `.internal` answers, and the negative-caching time of names that do not
/// exist there, in seconds: machines start and stop often, so askers must not keep answers long.
pub const TTL_SECS: u32 = 5;
