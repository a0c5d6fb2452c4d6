//! openraft's own storage test suite, run against the RocksDB log store and state machine.
use openraft::testing::{StoreBuilder, Suite};

use super::log_store::LogStore;
use super::state_machine::StateMachine;
use super::{StoreErr, TypeConfig};
use crate::db::{self, Tables};

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StoreErr> {
        let dir = tempfile::tempdir().map_err(super::write_err)?;
        let db = db::open(&dir.path().join("db")).map_err(super::write_err)?;
        let (sm, _) = StateMachine::new(Tables::new(db.clone()), dir.path().join("snapshot.bin"))?;
        Ok((dir, LogStore::new(db), sm))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), StoreErr> {
    Suite::test_all(RocksBuilder)
}
