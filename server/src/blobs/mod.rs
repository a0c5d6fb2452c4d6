//! File contents as content-addressed blobs: local storage (`store`; blobs up to 16 KiB packed
//! in RocksDB by `pack`), quorum writes across data replicas (`replicate`: the fan-out;
//! `copies`: the commit-time check; `asked`: what asking whether a blob is held answers and
//! does to its GC grace), chunk manifests of large files (`manifests`: parsed and
//! cached), background repair, scrub and garbage collection, and the witnesses' hinted handoff
//! (`handoff`).
pub mod asked;
pub mod copies;
pub mod handoff;
pub mod maintenance;
pub mod manifests;
pub mod pack;
pub mod quorum;
pub mod replicate;
pub mod space;
pub mod store;
pub mod suspects;

pub use store::{BlobError, BlobReader, BlobStore, BlobWriter, PACK_MAX_BYTES};
