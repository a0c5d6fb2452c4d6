//! codafs client side: the replica transport with failover, the persistent whole-file and
//! metadata caches, the filesystem core (no FUSE types), callbacks, and the FUSE adaptor.
pub mod backup;
pub mod blocking;
pub mod bundle;
pub mod cache;
pub mod callbacks;
pub mod copies;
pub mod core;
pub mod fuse;
pub mod heartbeat;
pub mod metrics;
pub mod mount;
pub mod ops;
pub mod policy;
pub mod rpc;
pub mod status;
pub mod tokens;
pub mod transport;
pub mod upload;
pub mod wblog;
pub mod webtree;

pub use bundle::ClientBundle;
pub use transport::{ClientError, Cluster};
