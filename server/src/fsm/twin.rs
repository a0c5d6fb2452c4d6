//! The state the fsm unit tests drive: every command is applied to the in-memory reference
//! ([`MemState`]) and to real RocksDB tables, and after each one both must have answered the
//! same and hold the same records. So every apply test also tests the RocksDB encoding, and a
//! table one backend forgets to write cannot hide.
use std::ops::Deref;

use super::mem::MemState;
use super::*;
use crate::db::Tables;

pub struct Twin {
    mem: MemState,
    db: Tables,
    _dir: tempfile::TempDir,
}

impl Default for Twin {
    fn default() -> Self {
        let (dir, db) = crate::db::temp_tables();
        Twin {
            mem: MemState::default(),
            db,
            _dir: dir,
        }
    }
}

/// Tests read the reference state's maps directly.
impl Deref for Twin {
    type Target = MemState;
    fn deref(&self) -> &MemState {
        &self.mem
    }
}

impl Twin {
    /// Applies `cmd` as entry `index` to both backends; panics if they disagree.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Response {
        let want = self.mem.apply(index, cmd);
        let (delta, got) = apply(&self.db, index, cmd).expect("RocksDB reads");
        self.db.write_now(&delta).expect("RocksDB writes");
        assert_eq!(
            got, want,
            "RocksDB and the reference answered entry {index} differently"
        );
        self.check_same(index);
        want
    }

    /// Every record of the reference is in RocksDB, equal, and RocksDB holds no other rows.
    fn check_same(&self, index: u64) {
        let (m, db) = (&self.mem, &self.db);
        let rows = db.row_counts().expect("RocksDB dump");
        let count = |t: &str| rows.get(t).copied().unwrap_or(0);
        let at = format!("after entry {index}");
        for (ino, o) in &m.objects {
            assert_eq!(db.object(*ino).unwrap().as_ref(), Some(o), "object {ino:#x} {at}");
        }
        assert_eq!(count(crate::db::CF_OBJECTS), m.objects.len(), "objects {at}");
        for ((parent, name), ino) in &m.dirents {
            assert_eq!(db.dirent(*parent, name).unwrap(), Some(*ino), "entry {name} {at}");
        }
        assert_eq!(count(crate::db::CF_DIRENTS), m.dirents.len(), "entries {at}");
        for (name, v) in &m.volumes {
            assert_eq!(db.volume(name).unwrap().as_ref(), Some(v), "volume {name} {at}");
        }
        assert_eq!(count(crate::db::CF_VOLUMES), m.volumes.len(), "volumes {at}");
        assert_eq!(db.cluster().unwrap(), m.cluster, "cluster record {at}");
        for (name, a) in &m.accounts {
            assert_eq!(db.account(name).unwrap().as_ref(), Some(a), "account {name} {at}");
        }
        assert_eq!(count(crate::db::CF_ACCOUNTS), m.accounts.len(), "accounts {at}");
        for (name, g) in &m.token_generations {
            assert_eq!(db.token_generation(name).unwrap(), *g, "generation of {name} {at}");
        }
        assert_eq!(
            count(crate::db::CF_TOKEN_GENERATIONS),
            m.token_generations.len(),
            "generations {at}"
        );
        for (h, n) in &m.blobrefs {
            assert_eq!(db.blobref(h).unwrap(), *n, "references to {h} {at}");
        }
        assert_eq!(count(crate::db::CF_BLOBREFS), m.blobrefs.len(), "blob references {at}");
        for (h, n) in &m.manifestrefs {
            assert_eq!(db.manifestref(h).unwrap(), *n, "manifest references to {h} {at}");
        }
        assert_eq!(
            count(crate::db::CF_MANIFESTREFS),
            m.manifestrefs.len(),
            "manifest references {at}"
        );
        assert_eq!(count(crate::db::CF_CHANGES), m.changes.len(), "change records {at}");
        for (id, r) in &m.requests {
            assert_eq!(db.request(id).unwrap().as_ref(), Some(r), "request record {at}");
        }
        // Each request has its record and an entry in the trimming order.
        assert_eq!(
            count(crate::db::CF_REQUESTS),
            2 * m.requests.len(),
            "request records {at}"
        );
        assert_eq!(
            db.join_tokens().unwrap(),
            m.join_tokens.clone().into_iter().collect::<Vec<_>>(),
            "join tokens {at}"
        );
        for (id, r) in &m.removed_servers {
            assert_eq!(
                db.removed_server(*id).unwrap().as_ref(),
                Some(r),
                "removed server {id} {at}"
            );
        }
        assert_eq!(
            count(crate::db::CF_PKI),
            m.join_tokens.len() + m.removed_servers.len(),
            "join tokens and removed servers {at}"
        );
    }
}

mod tests {
    use super::*;

    /// The check is not vacuous: a record only one backend holds is reported.
    #[test]
    #[should_panic(expected = "account ghost after entry 1")]
    fn a_record_only_the_reference_holds_is_caught() {
        let mut t = Twin::default();
        let admin = AccountRec {
            name: "admin".into(),
            admin: true,
            password_hash: String::new(),
            created_ns: 0,
        };
        let boot = Command::Bootstrap {
            cluster_id: "c".into(),
            key: [1; 32],
            admin: admin.clone(),
        };
        t.apply(1, &boot).expect("bootstrap");
        t.mem.accounts.insert(
            "ghost".into(),
            AccountRec {
                name: "ghost".into(),
                ..admin
            },
        );
        t.check_same(1);
    }
}
