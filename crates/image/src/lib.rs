//! Images: an OCI image becomes a root filesystem a machine boots from.
//!
//! Pulls from any OCI registry (the embedded one is Debian's `docker-registry` on loopback), keeps
//! blobs in a content-addressed cache verified by digest, applies layers into a directory without
//! ever touching a byte outside it (layers come from strangers), and builds one read-only base root
//! filesystem per image digest that every machine of that image shares.
//!
//! Host-side only. Must not depend on the VM driver, the guest (`aloft-guest-proto`, the host↔guest
//! contract, is fine: [`runconfig`] produces its image section), the store or the control plane; the
//! agent wires it to them.

pub mod blobs;
pub mod bootstrap;
pub mod digest;
pub mod gc;
pub mod images;
pub mod manifest;
pub mod progress;
pub mod pull;
pub mod push;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod runconfig;
pub mod unpack;

pub use blobs::{BlobError, BlobStore};
pub use digest::Digest;
pub use images::{ImageRecord, ImageStore};
pub use manifest::{Compression, ImageConfig};
pub use progress::{Progress, PullEvent};
pub use pull::{Layer, PulledImage, Puller};
pub use push::Pusher;
pub use reference::Reference;
pub use registry::{Credentials, Limits, RegistryConfig, RegistryError, RetryPolicy};
pub use rootfs::{
    Base, CloneMethod, DataExtents, RootfsFormat, RootfsStore, WritableDisks, clone_file, data_extents,
};
pub use runconfig::{GuestConfig, RunConfigWarning, guest_image_config};
