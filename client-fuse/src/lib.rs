//! codafs client side. For now the replica transport (every server known, failover between
//! them, verified blob transfer); the FUSE mount and its cache build on it.
pub mod bundle;
pub mod transport;

pub use bundle::ClientBundle;
pub use transport::{ClientError, Cluster};
