//! The client's persistent caches: whole-file blobs and metadata.
pub mod blobs;
pub mod index;
pub mod listings;
pub mod lock;
pub mod meta;
pub mod pack;
pub mod stream;
