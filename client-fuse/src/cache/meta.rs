//! Persistent metadata cache in RocksDB: attributes by node id, complete directory listings, and
//! per-volume state (last seen change version). Survives daemon restarts so a warm node revalidates
//! with one stamp check per volume instead of refetching its tree.
//!
//! Writes are not fsynced: RocksDB's WAL loses at most a suffix in a crash, and the seen version
//! of a volume is written after the invalidations it covers, so a lost suffix means the changes are
//! replayed from the server, never skipped.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use codafs_proto::pb;

use super::listings::{find, Listing, Listings};
use crate::core::types::Attr;
use prost::Message;
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};

const CF_ATTRS: &str = "attrs";
const CF_DIRS: &str = "dirs";
const CF_VOLUMES: &str = "volumes";
/// Attributes of directories a change made the cache forget, kept only to be served when a
/// call found no server answering within its deadline: a publish that adds a name to a directory changes its attributes, and
/// without them every path through it failed with EIO once the servers went away, cached
/// files included (the listing itself is patched by the change and kept).
const CF_STALE: &str = "stale_attrs";
/// All memtables of the metadata cache together (see [`MetaStore::open`]).
const WRITE_BUFFERS: usize = 16 << 20;
/// The block cache the column families share.
const BLOCK_CACHE: usize = 16 << 20;

/// A name change of a cached listing: (directory, name, new node and kind code; `None`: gone).
pub type DirPatch = (u64, String, Option<(u64, i32)>);

/// Where each changed name of one directory leads now (`None`: gone), sorted by name.
type NameChanges<'a> = std::collections::BTreeMap<&'a str, Option<(u64, i32)>>;

/// A directory entry as cached (its attributes are cached separately by node id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEnt {
    pub name: String,
    pub ino: u64,
    pub kind: i32,
}

/// What the client remembers about a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolState {
    pub name: String,
    pub id: u32,
    pub root_ino: u64,
    pub public_read: bool,
    /// Every change up to this version has been applied to the cache.
    pub seen: u64,
}

/// Metadata store failures.
#[derive(Debug, thiserror::Error)]
#[error("metadata cache: {0}")]
pub struct MetaError(String);

/// Attributes are stored as the wire message (the cache's on-disk format).
fn encode(a: &Attr) -> Vec<u8> {
    pb::Attr::from(a).encode_to_vec()
}

fn me(e: impl std::fmt::Display) -> MetaError {
    MetaError(e.to_string())
}

/// The metadata cache.
pub struct MetaStore {
    db: DB,
    /// Decoded listings (see `listings.rs`). Every write of a listing takes this lock around
    /// its RocksDB write, so the memory copy never lags the stored one.
    listings: std::sync::Mutex<Listings>,
}

impl MetaStore {
    /// Opens (or creates) the metadata cache in `dir`.
    ///
    /// Its memory is bounded: RocksDB's defaults let each column family hold two 64 MiB
    /// memtables, so a mount that cached a million files' attributes held over 100 MiB of them.
    /// All memtables together are capped at [`WRITE_BUFFERS`] (RocksDB flushes past it, and
    /// the write-ahead log stays about that size), and the column families share one small
    /// block cache.
    pub fn open(dir: &Path) -> Result<Self, MetaError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(2);
        opts.set_db_write_buffer_size(WRITE_BUFFERS);
        opts.set_max_total_wal_size(WRITE_BUFFERS as u64);
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE);
        let cf_opts = |buffer: usize| {
            let mut o = Options::default();
            o.set_write_buffer_size(buffer);
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_block_cache(&cache);
            o.set_block_based_table_factory(&table);
            o
        };
        let cfs = [
            ColumnFamilyDescriptor::new(CF_ATTRS, cf_opts(WRITE_BUFFERS / 2)),
            ColumnFamilyDescriptor::new(CF_DIRS, cf_opts(WRITE_BUFFERS / 2)),
            ColumnFamilyDescriptor::new(CF_VOLUMES, cf_opts(1 << 20)),
            ColumnFamilyDescriptor::new(CF_STALE, cf_opts(1 << 20)),
        ];
        Ok(MetaStore {
            db: DB::open_cf_descriptors(&opts, dir, cfs).map_err(me)?,
            listings: Default::default(),
        })
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, MetaError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| MetaError(format!("column family {name} missing")))
    }

    pub fn attr(&self, ino: u64) -> Result<Option<Attr>, MetaError> {
        self.attr_in(CF_ATTRS, ino)
    }

    fn attr_in(&self, cf: &str, ino: u64) -> Result<Option<Attr>, MetaError> {
        match self.db.get_pinned_cf(self.cf(cf)?, ino.to_be_bytes()).map_err(me)? {
            Some(v) => Ok(Some(pb::Attr::decode(v.as_ref()).map_err(me)?.into())),
            None => Ok(None),
        }
    }

    pub fn put_attr(&self, a: &Attr) -> Result<(), MetaError> {
        self.db
            .put_cf(self.cf(CF_ATTRS)?, a.ino.to_be_bytes(), encode(a))
            .map_err(me)
    }

    fn listings(&self) -> std::sync::MutexGuard<'_, Listings> {
        self.listings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A cached listing, sorted by name, from memory or decoded from the store (under the
    /// listings lock, so no write slips between the read and keeping it in memory).
    fn listing_locked(&self, g: &mut Listings, ino: u64) -> Result<Option<Listing>, MetaError> {
        if let Some(l) = g.get(ino) {
            return Ok(Some(l));
        }
        let Some(v) = self
            .db
            .get_pinned_cf(self.cf(CF_DIRS)?, ino.to_be_bytes())
            .map_err(me)?
        else {
            return Ok(None);
        };
        let mut l: Vec<DirEnt> = bincode::deserialize(&v).map_err(me)?;
        if !l.is_sorted_by(|a, b| a.name <= b.name) {
            l.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        }
        let l: Listing = Arc::new(l);
        g.insert(ino, l.clone());
        Ok(Some(l))
    }

    /// A cached listing, shared (no copy of its entries).
    pub fn listing(&self, ino: u64) -> Result<Option<Listing>, MetaError> {
        self.listing_locked(&mut self.listings(), ino)
    }

    pub fn dir(&self, ino: u64) -> Result<Option<Vec<DirEnt>>, MetaError> {
        Ok(self.listing(ino)?.map(|l| l.as_ref().clone()))
    }

    /// The node `name` in cached listing `dir` leads to: `None` if the listing is not cached,
    /// `Some(None)` if it has no such name.
    pub fn dir_entry(&self, dir: u64, name: &str) -> Result<Option<Option<DirEnt>>, MetaError> {
        Ok(self.listing(dir)?.map(|l| find(&l, name).cloned()))
    }

    /// Writes `listing` of `dir` (under the listings lock, held by the caller).
    fn store_listing(&self, g: &mut Listings, dir: u64, listing: Vec<DirEnt>) -> Result<(), MetaError> {
        self.db
            .put_cf(
                self.cf(CF_DIRS)?,
                dir.to_be_bytes(),
                bincode::serialize(&listing).map_err(me)?,
            )
            .map_err(me)?;
        g.insert(dir, Arc::new(listing));
        Ok(())
    }

    /// Stores a complete listing and the attributes of its entries in one batch.
    pub fn put_dir(&self, ino: u64, entries: &[(String, Attr)]) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        let mut listing: Vec<DirEnt> = entries
            .iter()
            .map(|(n, a)| DirEnt {
                name: n.clone(),
                ino: a.ino,
                kind: crate::core::kind_code(a.kind),
            })
            .collect();
        // Stored sorted, as held in memory (lookups search it by name).
        listing.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        batch.put_cf(
            self.cf(CF_DIRS)?,
            ino.to_be_bytes(),
            bincode::serialize(&listing).map_err(me)?,
        );
        for (_, a) in entries {
            batch.put_cf(self.cf(CF_ATTRS)?, a.ino.to_be_bytes(), encode(a));
        }
        let mut g = self.listings();
        self.db.write(batch).map_err(me)?;
        g.insert(ino, Arc::new(listing));
        Ok(())
    }

    /// Forgets the attributes of these nodes, keeping directory listings. A directory's are
    /// kept aside, to be served only when no server answers (see [`CF_STALE`]), unless its
    /// mode, owner or group changed (`perms`): those are dropped, and any older ones kept
    /// aside too, so no older permission is ever served.
    pub fn forget_attrs(&self, inos: &[u64], perms: &[u64]) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        for i in perms {
            batch.delete_cf(self.cf(CF_STALE)?, i.to_be_bytes());
        }
        let perms: std::collections::HashSet<&u64> = perms.iter().collect();
        for i in inos {
            let key = i.to_be_bytes();
            if perms.contains(i) {
                batch.delete_cf(self.cf(CF_ATTRS)?, key);
                continue;
            }
            if let Some(v) = self.db.get_pinned_cf(self.cf(CF_ATTRS)?, key).map_err(me)? {
                let kind = pb::Attr::decode(v.as_ref()).map(|a| a.kind).unwrap_or_default();
                if kind == pb::ObjectKind::Directory as i32 {
                    batch.put_cf(self.cf(CF_STALE)?, key, v.as_ref());
                }
            }
            batch.delete_cf(self.cf(CF_ATTRS)?, key);
        }
        self.db.write(batch).map_err(me)
    }

    /// The last attributes of a directory whose attributes were forgotten after a change (see
    /// [`CF_STALE`]): only for answers while no server can be reached.
    pub fn stale_attr(&self, ino: u64) -> Result<Option<Attr>, MetaError> {
        self.attr_in(CF_STALE, ino)
    }

    /// Applies name changes to cached listings (those not cached are left alone), in order:
    /// each listing is read and written once, however many of its names change. The sorted
    /// listing and the sorted changes are merged in one pass, so a change to one entry of a
    /// huge directory costs a copy of its listing, not a rebuild.
    pub fn patch_dirs(&self, patches: &[DirPatch]) -> Result<(), MetaError> {
        // Per directory, each name's last change (later patches win).
        let mut by_dir: HashMap<u64, NameChanges<'_>> = HashMap::new();
        for (dir, name, entry) in patches {
            by_dir.entry(*dir).or_default().insert(name.as_str(), *entry);
        }
        let mut g = self.listings();
        for (dir, changes) in by_dir {
            let Some(listing) = self.listing_locked(&mut g, dir)? else {
                continue;
            };
            // Not shared any more once out of the memory copy (unless a reader holds it).
            g.remove(dir);
            let old = Arc::try_unwrap(listing).unwrap_or_else(|shared| shared.as_ref().clone());
            let mut out = Vec::with_capacity(old.len() + changes.len());
            let mut old = old.into_iter().peekable();
            for (name, entry) in changes {
                while let Some(e) = old.next_if(|e| e.name.as_str() < name) {
                    out.push(e);
                }
                old.next_if(|e| e.name == name);
                if let Some((ino, kind)) = entry {
                    out.push(DirEnt {
                        name: name.to_string(),
                        ino,
                        kind,
                    });
                }
            }
            out.extend(old);
            self.store_listing(&mut g, dir, out)?;
        }
        Ok(())
    }

    /// Applies one name change to a cached listing, if the listing is cached: `Some` adds or
    /// replaces `name`, `None` removes it. Keeps a listing current after this mount's own change
    /// without refetching it (read-your-writes until the change's event arrives).
    pub fn patch_dir(&self, dir: u64, name: &str, entry: Option<(u64, i32)>) -> Result<(), MetaError> {
        self.patch_dirs(&[(dir, name.to_string(), entry)])
    }

    /// Forgets attributes and listings of these nodes.
    pub fn forget(&self, inos: &[u64], dirs: &[u64]) -> Result<(), MetaError> {
        let mut batch = WriteBatch::default();
        for i in inos {
            batch.delete_cf(self.cf(CF_ATTRS)?, i.to_be_bytes());
            batch.delete_cf(self.cf(CF_STALE)?, i.to_be_bytes());
            batch.delete_cf(self.cf(CF_DIRS)?, i.to_be_bytes());
        }
        for d in dirs {
            batch.delete_cf(self.cf(CF_DIRS)?, d.to_be_bytes());
        }
        let mut g = self.listings();
        self.db.write(batch).map_err(me)?;
        for d in inos.iter().chain(dirs) {
            g.remove(*d);
        }
        Ok(())
    }

    /// Forgets everything cached about one volume (its history is gone: revalidate lazily).
    pub fn forget_volume(&self, id: u32) -> Result<(), MetaError> {
        let from = codafs_common::make_ino(id, 0).to_be_bytes();
        let to = codafs_common::make_ino(id + 1, 0).to_be_bytes();
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_ATTRS)?, from, to);
        batch.delete_range_cf(self.cf(CF_STALE)?, from, to);
        batch.delete_range_cf(self.cf(CF_DIRS)?, from, to);
        let mut g = self.listings();
        self.db.write(batch).map_err(me)?;
        g.clear();
        Ok(())
    }

    pub fn volume(&self, name: &str) -> Result<Option<VolState>, MetaError> {
        match self
            .db
            .get_pinned_cf(self.cf(CF_VOLUMES)?, name.as_bytes())
            .map_err(me)?
        {
            Some(v) => Ok(Some(bincode::deserialize(&v).map_err(me)?)),
            None => Ok(None),
        }
    }

    pub fn put_volume(&self, v: &VolState) -> Result<(), MetaError> {
        self.db
            .put_cf(
                self.cf(CF_VOLUMES)?,
                v.name.as_bytes(),
                bincode::serialize(v).map_err(me)?,
            )
            .map_err(me)
    }

    pub fn delete_volume(&self, name: &str) -> Result<(), MetaError> {
        self.db.delete_cf(self.cf(CF_VOLUMES)?, name.as_bytes()).map_err(me)
    }

    pub fn volumes(&self) -> Result<Vec<VolState>, MetaError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_VOLUMES)?, IteratorMode::Start) {
            let (_, v) = item.map_err(me)?;
            out.push(bincode::deserialize(&v).map_err(me)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::NodeKind;

    #[test]
    fn round_trips_and_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        let a = Attr {
            ino: codafs_common::make_ino(1, 5),
            size: 3,
            ..Default::default()
        };
        m.put_dir(codafs_common::make_ino(1, 1), &[("x".into(), a.clone())])
            .unwrap();
        assert_eq!(m.attr(a.ino).unwrap(), Some(a.clone()));
        assert_eq!(m.dir(codafs_common::make_ino(1, 1)).unwrap().unwrap()[0].name, "x");
        let v = VolState {
            name: "www".into(),
            id: 1,
            root_ino: codafs_common::make_ino(1, 1),
            public_read: true,
            seen: 9,
        };
        m.put_volume(&v).unwrap();
        drop(m);
        let m = MetaStore::open(dir.path()).unwrap();
        assert_eq!(m.volume("www").unwrap(), Some(v));
        m.forget_volume(1).unwrap();
        assert_eq!(m.attr(a.ino).unwrap(), None);
        assert_eq!(m.dir(codafs_common::make_ino(1, 1)).unwrap(), None);
    }

    /// A directory's forgotten attributes are kept aside (a file's are not) until the node or
    /// its volume is forgotten for good.
    #[test]
    fn forgotten_directory_attributes_are_kept_aside_until_forgotten_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        let node = |i, kind| Attr {
            ino: codafs_common::make_ino(1, i),
            kind,
            version: 4,
            ..Default::default()
        };
        let (d, f, e) = (node(2, NodeKind::Dir), node(3, NodeKind::File), node(4, NodeKind::Dir));
        for a in [&d, &f, &e] {
            m.put_attr(a).unwrap();
        }
        m.forget_attrs(&[d.ino, f.ino, e.ino], &[]).unwrap();
        assert_eq!(m.attr(d.ino).unwrap(), None);
        assert_eq!(m.stale_attr(d.ino).unwrap(), Some(d.clone()));
        // A chmod or chown drops what was kept aside, and keeps nothing of the change's.
        let g = node(5, NodeKind::Dir);
        m.put_attr(&g).unwrap();
        m.forget_attrs(&[g.ino], &[]).unwrap();
        assert_eq!(m.stale_attr(g.ino).unwrap(), Some(g.clone()));
        m.put_attr(&g).unwrap();
        m.forget_attrs(&[g.ino], &[g.ino]).unwrap();
        assert_eq!((m.attr(g.ino).unwrap(), m.stale_attr(g.ino).unwrap()), (None, None));
        m.forget_attrs(&[g.ino], &[]).unwrap();
        m.forget_attrs(&[], &[g.ino]).unwrap();
        assert_eq!(m.stale_attr(g.ino).unwrap(), None, "an older kept copy goes too");
        assert_eq!(m.stale_attr(f.ino).unwrap(), None, "a file's content may have changed");
        m.forget(&[e.ino], &[]).unwrap();
        assert_eq!(m.stale_attr(e.ino).unwrap(), None, "a removed directory");
        drop(m);
        let m = MetaStore::open(dir.path()).unwrap();
        assert_eq!(m.stale_attr(d.ino).unwrap(), Some(d.clone()), "kept across a restart");
        m.forget_volume(1).unwrap();
        assert_eq!(m.stale_attr(d.ino).unwrap(), None);
    }

    #[test]
    fn patches_apply_in_order_to_cached_listings_only() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open(dir.path()).unwrap();
        let (d, other) = (codafs_common::make_ino(1, 1), codafs_common::make_ino(1, 2));
        let a = |i| Attr {
            ino: codafs_common::make_ino(1, i),
            ..Default::default()
        };
        m.put_dir(d, &[("b".into(), a(5)), ("d".into(), a(6))]).unwrap();
        m.patch_dirs(&[
            (d, "c".into(), Some((7, 1))),
            (d, "b".into(), None),
            (d, "a".into(), Some((8, 1))),
            (d, "c".into(), Some((9, 1))),
            (other, "x".into(), Some((10, 1))),
        ])
        .unwrap();
        let names: Vec<(String, u64)> = m
            .dir(d)
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.ino))
            .collect();
        let want = [("a", 8), ("c", 9), ("d", codafs_common::make_ino(1, 6))];
        assert_eq!(
            names,
            want.map(|(n, i)| (n.to_string(), i)),
            "sorted, later patches win"
        );
        assert_eq!(m.dir(other).unwrap(), None, "a listing not cached stays unknown");
        // A name past the end, a replaced one, and a removal of a name that is not there; the
        // stored copy (read back after a reopen) is the patched one.
        m.patch_dirs(&[
            (d, "z".into(), Some((11, 2))),
            (d, "d".into(), Some((12, 1))),
            (d, "q".into(), None),
        ])
        .unwrap();
        drop(m);
        let m = MetaStore::open(dir.path()).unwrap();
        let names: Vec<(String, u64, i32)> = m
            .dir(d)
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.ino, e.kind))
            .collect();
        let want = [("a", 8, 1), ("c", 9, 1), ("d", 12, 1), ("z", 11, 2)];
        assert_eq!(names, want.map(|(n, i, k)| (n.to_string(), i, k)));
    }
}
