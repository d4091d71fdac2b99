//! Wire types shared by aloft's API server, its client and the CLI: the Fly Machines API shapes.
//!
//! Types appear here as the API grows; today: identifiers. This crate must stay free of I/O and of
//! every other aloft crate, so that clients never pull in the server.

mod ids;

pub use ids::{MachineId, ParseIdError};
