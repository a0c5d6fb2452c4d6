//! Small blobs packed in one RocksDB instance inside the blob store (`<store>/packed/`).
//!
//! One file per blob costs a whole filesystem block (4 KiB) and an inode, so a 1 KiB page took
//! four times its size on every data server, and a million tiny files took gigabytes. Blobs of at
//! most [`PACK_MAX_BYTES`] are stored here instead, as rows of two column families:
//! - `data`: hash -> content;
//! - `meta`: hash -> size and when the blob was stored or last touched (nanoseconds since the
//!   epoch, big-endian u64 each): what `list`, `stats` and the GC grace period read without
//!   reading the content.
//!
//! Both rows of a blob are written in one batch, and every write that stores a blob is synced
//! (one sync for a whole batch): a blob is never visible before it is durable. A touch only
//! refreshes `meta` and is not synced, like a file's mtime; nor is a removal, like a file's. Writes go through [`Pack::begin`],
//! which serializes them, so "is it stored already?" and the write that follows cannot race
//! with another writer or a removal of the same blob (the store's counts stay exact).
//!
//! Memory is kept small and bounded: 8 MiB of memtables in all, an 8 MiB block cache shared by
//! both column families, and a Bloom filter on `meta` only (lookups of `data` follow a hit in
//! `meta`). So is the disk beside the blobs themselves: the write-ahead logs are capped at
//! 8 MiB and preallocate at most 4.4 MiB, the MANIFEST 64 KiB (docs/SCALING.md, "Small
//! files", measures it).
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use codafs_common::Hash;
use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use super::store::BlobError;

/// Blobs of at most this many bytes are packed; larger ones stay one file each. At 16 KiB a
/// file's last partly used 4 KiB block wastes at most a quarter of it (an eighth on average),
/// while every smaller blob, where that waste dominates, is packed. Measured in docs/SCALING.md
/// (small files).
pub const PACK_MAX_BYTES: u64 = 16 << 10;

/// The pack's directory inside the blob store.
pub const PACK_DIR: &str = "packed";

const CF_DATA: &str = "data";
const CF_META: &str = "meta";
/// Memtables of both column families together (RocksDB flushes past it).
const WRITE_BUFFERS: usize = 8 << 20;
/// The block cache both column families share.
const BLOCK_CACHE: usize = 8 << 20;

/// A packed blob's `meta` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub size: u64,
    /// When the blob was stored or last touched, nanoseconds since the epoch.
    pub touched_ns: u64,
}

impl Meta {
    fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.size.to_be_bytes());
        b[8..].copy_from_slice(&self.touched_ns.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Meta> {
        let size = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
        let touched_ns = u64::from_be_bytes(b.get(8..16)?.try_into().ok()?);
        (b.len() == 16).then_some(Meta { size, touched_ns })
    }
}

/// Now, nanoseconds since the epoch.
pub fn now_ns() -> u64 {
    u64::try_from(codafs_common::now_ns()).unwrap_or(0)
}

/// A RocksDB failure as a blob error (a full disk says so, for the caller's answer).
fn pack_err(e: rocksdb::Error) -> BlobError {
    let message = e.into_string();
    let disk_full = message.contains("No space left on device") || message.contains("quota exceeded");
    BlobError::Pack { message, disk_full }
}

/// The packed blobs of one store.
pub struct Pack {
    db: DB,
    writes: Mutex<()>,
}

/// The pack while one writer holds it (see [`Pack::begin`]).
pub struct PackWrite<'a> {
    pack: &'a Pack,
    _held: MutexGuard<'a, ()>,
}

impl Pack {
    /// Opens (or creates) the pack in `dir`.
    pub fn open(dir: &Path) -> Result<Pack, BlobError> {
        let cache = Cache::new_lru_cache(BLOCK_CACHE);
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(2);
        opts.set_max_log_file_size(1 << 20);
        // Bounds the memtables and so the write-ahead log's preallocation (RocksDB reserves
        // 1.1 x the write buffer on disk for each log otherwise: 70 MiB by default). Past
        // `max_total_wal_size` RocksDB flushes the column family that keeps old logs alive
        // (`meta` fills slowly), so the logs hold no more than about that beside the tables.
        opts.set_db_write_buffer_size(WRITE_BUFFERS);
        opts.set_max_total_wal_size(WRITE_BUFFERS as u64);
        // The MANIFEST (a log of table files) preallocates 4 MiB otherwise.
        opts.set_manifest_preallocation_size(64 << 10);
        opts.set_max_background_jobs(2);
        let mut data = Options::default();
        data.set_write_buffer_size(WRITE_BUFFERS / 2);
        data.set_target_file_size_base(32 << 20);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        // Blobs are up to 16 KiB: larger blocks keep the index (held in memory) small.
        table.set_block_size(16 << 10);
        data.set_block_based_table_factory(&table);
        let mut meta = Options::default();
        meta.set_write_buffer_size(WRITE_BUFFERS / 4);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        meta.set_block_based_table_factory(&table);
        let cfs = [
            ColumnFamilyDescriptor::new(CF_DATA, data),
            ColumnFamilyDescriptor::new(CF_META, meta),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(pack_err)?;
        Ok(Pack {
            db,
            writes: Mutex::new(()),
        })
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, BlobError> {
        self.db.cf_handle(name).ok_or_else(|| BlobError::Pack {
            message: format!("column family {name} missing"),
            disk_full: false,
        })
    }

    /// The `meta` row of `h`, if packed here.
    pub fn meta(&self, h: &Hash) -> Result<Option<Meta>, BlobError> {
        let Some(raw) = self.db.get_pinned_cf(self.cf(CF_META)?, h.0).map_err(pack_err)? else {
            return Ok(None);
        };
        Meta::decode(&raw).map(Some).ok_or_else(|| BlobError::Pack {
            message: format!("malformed entry for blob {h} ({} bytes)", raw.len()),
            disk_full: false,
        })
    }

    /// The content of `h` as stored (unverified), if its `data` row exists. A read that fails
    /// RocksDB's own checksums is `Corrupt`.
    pub fn data(&self, h: &Hash) -> Result<Option<Vec<u8>>, BlobError> {
        match self.db.get_cf(self.cf(CF_DATA)?, h.0) {
            Ok(d) => Ok(d),
            Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => {
                tracing::warn!(hash = %h, error = %e, "a packed blob failed RocksDB's checksums");
                Err(BlobError::Corrupt(*h))
            }
            Err(e) => Err(pack_err(e)),
        }
    }

    /// Every packed blob with its size, in hash order. A malformed `meta` row is listed with
    /// size 0, so scrub reads the blob and quarantines it.
    pub fn list(&self) -> Result<Vec<(Hash, u64)>, BlobError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_META)?, IteratorMode::Start) {
            let (k, v) = item.map_err(pack_err)?;
            let Ok(h) = Hash::from_slice(&k) else {
                tracing::warn!(key = %hex::encode(&k), "packed blob store: a row that names no blob");
                continue;
            };
            out.push((h, Meta::decode(&v).map_or(0, |m| m.size)));
        }
        Ok(out)
    }

    /// Takes the pack for writing: one writer at a time.
    pub fn begin(&self) -> PackWrite<'_> {
        PackWrite {
            pack: self,
            _held: self.writes.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }
}

impl PackWrite<'_> {
    /// Stores `blobs` (verified by the caller, at most one of each hash) in one synced batch,
    /// and refreshes the time of those already packed. Returns the new ones' sizes.
    pub fn put(&self, blobs: &[(Hash, &[u8])]) -> Result<Vec<u64>, BlobError> {
        let (data, meta) = (self.pack.cf(CF_DATA)?, self.pack.cf(CF_META)?);
        let now = now_ns();
        let mut batch = WriteBatch::default();
        let mut new = Vec::new();
        for (h, bytes) in blobs {
            let size = bytes.len() as u64;
            if self.pack.meta(h)?.is_none() {
                batch.put_cf(data, h.0, bytes);
                new.push(size);
            }
            batch.put_cf(meta, h.0, Meta { size, touched_ns: now }.encode());
        }
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.pack.db.write_opt(batch, &sync).map_err(pack_err)?;
        Ok(new)
    }

    /// Refreshes the time of a packed blob (not synced, like a file's mtime). False if `h` is
    /// not packed.
    pub fn touch(&self, h: &Hash) -> Result<bool, BlobError> {
        let Some(m) = self.pack.meta(h)? else {
            return Ok(false);
        };
        let meta = Meta {
            touched_ns: now_ns(),
            ..m
        };
        self.pack
            .db
            .put_cf(self.pack.cf(CF_META)?, h.0, meta.encode())
            .map_err(pack_err)?;
        Ok(true)
    }

    /// Deletes a packed blob. Returns its size, `None` if it was not packed. A blob whose `meta`
    /// row is malformed is deleted too, as size 0. Not synced, like a file's removal: a crash
    /// may bring the blob back, and GC, handoff or a verified read remove it again; GC and
    /// handoff remove thousands one by one.
    pub fn remove(&self, h: &Hash) -> Result<Option<u64>, BlobError> {
        let (data, meta) = (self.pack.cf(CF_DATA)?, self.pack.cf(CF_META)?);
        let size = match self.pack.meta(h) {
            Ok(Some(m)) => m.size,
            Ok(None) => return Ok(None),
            Err(BlobError::Pack { disk_full: false, .. }) => 0,
            Err(e) => return Err(e),
        };
        let mut batch = WriteBatch::default();
        batch.delete_cf(data, h.0);
        batch.delete_cf(meta, h.0);
        self.pack.db.write(batch).map_err(pack_err)?;
        Ok(Some(size))
    }

    /// Replaces a packed blob's content with `bytes`, unverified, keeping its `meta` row: how
    /// tests damage a packed copy. False if `h` is not packed.
    pub fn overwrite(&self, h: &Hash, bytes: &[u8]) -> Result<bool, BlobError> {
        if self.pack.meta(h)?.is_none() {
            return Ok(false);
        }
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.pack
            .db
            .put_cf_opt(self.pack.cf(CF_DATA)?, h.0, bytes, &sync)
            .map_err(pack_err)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_rows_round_trip_and_malformed_ones_are_refused() {
        let m = Meta {
            size: 1234,
            touched_ns: 5678,
        };
        assert_eq!(Meta::decode(&m.encode()), Some(m));
        assert_eq!(Meta::decode(&m.encode()[..15]), None);
        assert_eq!(Meta::decode(&[0u8; 17]), None);
    }
}
