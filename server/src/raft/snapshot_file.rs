//! The snapshot file, streamed: neither building, sending, receiving nor installing a snapshot
//! holds the state in memory (a million-file volume's state is hundreds of MB, and a snapshot
//! is built every few thousand entries).
//!
//! Layout (bincode): openraft's [`SnapshotMeta`], then `u64::MAX` (this layout; the one before
//! it had the number of tables there, each then whole), then frames: `Table(name)` followed by
//! that table's rows as `Row(key, value)`, and `End`. Files in the earlier layout are still
//! read, so a server keeps working with a snapshot an older build wrote or sent.
use std::io::{BufReader, BufWriter, Read, Write};

use openraft::{LogId, SnapshotMeta, StoredMembership};
use serde::{Deserialize, Serialize};

use super::{read_err, write_err, NodeId, NodeInfo, StoreErr};
use crate::db::{decode, Tables, CF_SM_META, SM_TABLES};
use crate::fsm::StoreError;

/// Marks the streamed layout where the earlier one had its table count.
const STREAMED: u64 = u64::MAX;
/// Bytes of rows written to RocksDB in one batch while installing.
const INSTALL_BATCH_BYTES: usize = 16 << 20;

/// A whole table in the earlier layout: its name and every (key, value).
type OldTable = (String, Vec<(Vec<u8>, Vec<u8>)>);

/// One frame, as read.
#[derive(Deserialize)]
enum Frame {
    Table(String),
    Row(Vec<u8>, Vec<u8>),
    End,
}

/// One frame, as written (borrowing: the same encoding as [`Frame`]).
#[derive(Serialize)]
enum FrameRef<'a> {
    Table(&'a str),
    Row(
        #[serde(with = "serde_bytes")] &'a [u8],
        #[serde(with = "serde_bytes")] &'a [u8],
    ),
    End,
}

/// Writes a snapshot of `tables` to `out` from one consistent view; returns its metadata.
/// `id` names the snapshot (openraft's snapshot id).
pub fn write(
    tables: &Tables,
    out: impl Write,
    id: impl FnOnce(Option<LogId<NodeId>>) -> String,
) -> Result<SnapshotMeta<NodeId, NodeInfo>, StoreErr> {
    let snap = tables.state_snapshot();
    let applied: Option<LogId<NodeId>> = match snap
        .get(CF_SM_META, super::state_machine::KEY_APPLIED)
        .map_err(read_err)?
    {
        Some(v) => decode(&v).map_err(read_err)?,
        None => None,
    };
    let membership: StoredMembership<NodeId, NodeInfo> = match snap
        .get(CF_SM_META, super::state_machine::KEY_MEMBERSHIP)
        .map_err(read_err)?
    {
        Some(v) => decode(&v).map_err(read_err)?,
        None => StoredMembership::default(),
    };
    let meta = SnapshotMeta {
        last_log_id: applied,
        last_membership: membership,
        snapshot_id: id(applied),
    };
    let mut w = BufWriter::with_capacity(1 << 20, out);
    let put = |w: &mut BufWriter<_>, f: &FrameRef| bincode::serialize_into(w, f).map_err(|e| StoreError(e.to_string()));
    bincode::serialize_into(&mut w, &meta).map_err(write_err)?;
    bincode::serialize_into(&mut w, &STREAMED).map_err(write_err)?;
    for name in SM_TABLES {
        put(&mut w, &FrameRef::Table(name)).map_err(write_err)?;
        snap.each_row(name, |k, v| put(&mut w, &FrameRef::Row(k, v)))
            .map_err(write_err)?;
    }
    put(&mut w, &FrameRef::End).map_err(write_err)?;
    w.flush().map_err(write_err)?;
    Ok(meta)
}

/// The metadata at the start of a snapshot file (reads nothing past it).
pub fn read_meta(r: impl Read) -> Result<SnapshotMeta<NodeId, NodeInfo>, StoreErr> {
    bincode::deserialize_from(BufReader::new(r)).map_err(read_err)
}

/// Replaces every state table with the snapshot read from `r` (either layout), in batches of
/// bounded size; returns the snapshot's metadata. Interrupted, it leaves
/// `Tables::replace_pending` set, and the next start installs the kept snapshot again.
pub fn install(tables: &Tables, r: impl Read) -> Result<SnapshotMeta<NodeId, NodeInfo>, StoreErr> {
    let mut r = BufReader::with_capacity(1 << 20, r);
    let meta: SnapshotMeta<NodeId, NodeInfo> = bincode::deserialize_from(&mut r).map_err(read_err)?;
    let layout: u64 = bincode::deserialize_from(&mut r).map_err(read_err)?;
    tables.replace_start().map_err(write_err)?;
    let mut batch = Batch::default();
    if layout == STREAMED {
        let mut table = None;
        loop {
            match bincode::deserialize_from::<_, Frame>(&mut r).map_err(read_err)? {
                Frame::Table(name) => table = Some(known_table(&name)?),
                Frame::Row(k, v) => {
                    let t = table.ok_or_else(|| read_err(StoreError("a snapshot row before its table".into())))?;
                    batch.push(tables, t, k, v)?;
                }
                Frame::End => break,
            }
        }
    } else {
        // The earlier layout: `layout` tables, each its name and all its rows.
        for _ in 0..layout {
            let (name, rows): OldTable = bincode::deserialize_from(&mut r).map_err(read_err)?;
            let t = known_table(&name)?;
            for (k, v) in rows {
                batch.push(tables, t, k, v)?;
            }
        }
    }
    batch.flush(tables)?;
    tables.replace_finish().map_err(write_err)?;
    Ok(meta)
}

/// The state table called `name`; a snapshot naming another is refused.
fn known_table(name: &str) -> Result<&'static str, StoreErr> {
    SM_TABLES
        .iter()
        .find(|t| **t == name)
        .copied()
        .ok_or_else(|| read_err(StoreError(format!("snapshot has unknown table {name}"))))
}

/// Rows waiting to be written while installing.
#[derive(Default)]
struct Batch {
    rows: Vec<(&'static str, Vec<u8>, Vec<u8>)>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, tables: &Tables, t: &'static str, k: Vec<u8>, v: Vec<u8>) -> Result<(), StoreErr> {
        self.bytes += k.len() + v.len();
        self.rows.push((t, k, v));
        if self.bytes >= INSTALL_BATCH_BYTES {
            self.flush(tables)?;
        }
        Ok(())
    }

    fn flush(&mut self, tables: &Tables) -> Result<(), StoreErr> {
        tables.replace_rows(&self.rows).map_err(write_err)?;
        self.rows.clear();
        self.bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db;

    fn tables() -> (tempfile::TempDir, Tables) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = db::open(&dir.path().join("db")).expect("open");
        (dir, Tables::new(db))
    }

    fn rows(t: &Tables) -> Vec<(String, Vec<u8>, Vec<u8>)> {
        let snap = t.state_snapshot();
        let mut out = Vec::new();
        for name in SM_TABLES {
            snap.each_row::<StoreError>(name, |k, v| {
                out.push((name.to_string(), k.to_vec(), v.to_vec()));
                Ok(())
            })
            .expect("rows");
        }
        out
    }

    #[test]
    fn a_streamed_snapshot_replaces_every_table_and_an_old_layout_still_installs() {
        let (_d1, a) = tables();
        let many: Vec<(&str, Vec<u8>, Vec<u8>)> = (0..5000u32)
            .map(|i| (db::CF_OBJECTS, i.to_be_bytes().to_vec(), vec![i as u8; 300]))
            .chain([(db::CF_VOLUMES, b"www".to_vec(), b"v".to_vec())])
            .collect();
        a.replace_rows(&many).expect("rows");
        let mut file = Vec::new();
        let meta = write(&a, &mut file, |_| "s1".into()).expect("write");
        assert_eq!(meta.snapshot_id, "s1");
        assert_eq!(read_meta(&file[..]).expect("meta").snapshot_id, "s1");

        let (_d2, b) = tables();
        b.replace_rows(&[(db::CF_DIRENTS, b"stale".to_vec(), b"x".to_vec())])
            .expect("stale row");
        install(&b, &file[..]).expect("install");
        assert_eq!(rows(&b), rows(&a), "the same rows, and the stale one gone");
        assert!(!b.replace_pending().expect("marker"), "the install finished");

        // The layout of earlier builds: metadata, then every table whole.
        #[derive(Serialize)]
        struct Old {
            meta: SnapshotMeta<NodeId, NodeInfo>,
            tables: Vec<OldTable>,
        }
        let old = bincode::serialize(&Old {
            meta,
            tables: vec![(db::CF_VOLUMES.to_string(), vec![(b"old".to_vec(), b"o".to_vec())])],
        })
        .expect("old");
        let (_d3, c) = tables();
        install(&c, &old[..]).expect("old layout");
        assert_eq!(
            rows(&c),
            vec![(db::CF_VOLUMES.to_string(), b"old".to_vec(), b"o".to_vec())]
        );
    }

    #[test]
    fn an_unknown_table_or_a_truncated_file_is_refused() {
        let (_d, a) = tables();
        let mut file = Vec::new();
        write(&a, &mut file, |_| "s".into()).expect("write");
        let (_d2, b) = tables();
        assert!(install(&b, &file[..file.len() - 1]).is_err(), "truncated");
        assert!(
            b.replace_pending().expect("marker"),
            "an interrupted install is remembered"
        );
        let mut bad = Vec::new();
        bincode::serialize_into(&mut bad, &read_meta(&file[..]).expect("meta")).expect("meta");
        bincode::serialize_into(&mut bad, &STREAMED).expect("marker");
        bincode::serialize_into(&mut bad, &FrameRef::Table("nope")).expect("frame");
        assert!(install(&b, &bad[..]).is_err(), "unknown table");
    }
}
