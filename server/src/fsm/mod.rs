//! The metadata state machine's logic, free of RocksDB and Raft.
//!
//! `apply` turns one command into a [`Delta`] against a read-only [`StateView`]; the caller
//! writes the delta atomically (a RocksDB `WriteBatch` in production, a `BTreeMap` in tests). A
//! refused command yields an empty delta, so a failed commit changes nothing. Applying is
//! deterministic: time and identity come from the command, never from the replica.
pub mod bounds;
pub mod cost;
pub mod mem;
mod ops;
pub use ops::MAX_RESERVE;
pub mod records;

use std::collections::{BTreeMap, BTreeSet};

use codafs_common::ids::VOLUME_ROOT_INODE;
use codafs_common::names::{split_path, validate_name, validate_volume_name};
use codafs_common::{make_ino, split_ino, Hash};

pub use records::*;

/// Failure of the underlying store while applying (not a refusal: the replica cannot go on).
#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

/// Read access to the applied state.
pub trait StateView {
    fn object(&self, ino: u64) -> Result<Option<ObjectRec>, StoreError>;
    fn dirent(&self, parent: u64, name: &str) -> Result<Option<u64>, StoreError>;
    /// Entries of `parent` with names strictly after `after`, in byte order, at most `limit`.
    fn dirents(&self, parent: u64, after: &str, limit: usize) -> Result<Vec<(String, u64)>, StoreError>;
    fn volume(&self, name: &str) -> Result<Option<VolumeRec>, StoreError>;
    fn volume_name(&self, id: u32) -> Result<Option<String>, StoreError>;
    fn cluster(&self) -> Result<Option<ClusterRec>, StoreError>;
    fn account(&self, name: &str) -> Result<Option<AccountRec>, StoreError>;
    /// The account's token generation: tokens carrying an older one are refused. 0 for an
    /// account whose tokens were never revoked. Kept after the account is removed, so a new
    /// account of the same name does not bring old tokens back.
    fn token_generation(&self, user: &str) -> Result<u64, StoreError>;
    fn blobref(&self, hash: &Hash) -> Result<u64, StoreError>;
    /// How many file contents name `hash` as their chunk manifest (contents over
    /// `chunks::CHUNK_THRESHOLD`). Such a hash is also counted by [`StateView::blobref`]; this
    /// second count tells repair and GC which referenced blobs list chunks they must keep.
    fn manifestref(&self, hash: &Hash) -> Result<u64, StoreError>;
    /// Version of the oldest change record kept for a volume.
    fn oldest_change(&self, volume: u32) -> Result<Option<u64>, StoreError>;
    /// Name of some volume owned by `user`, if any.
    fn volume_owned_by(&self, user: &str) -> Result<Option<String>, StoreError>;
    /// Names of the volumes that list `user` among their writers.
    fn volumes_written_by(&self, user: &str) -> Result<Vec<String>, StoreError>;
    /// The remembered outcome of commit request `id`, if it was applied recently.
    fn request(&self, id: &RequestId) -> Result<Option<RequestRec>, StoreError>;
    /// Up to `limit` remembered requests applied before log index `before`, oldest first.
    fn requests_before(&self, before: u64, limit: usize) -> Result<Vec<(u64, RequestId)>, StoreError>;
    /// A join token by the hash of its secret.
    fn join_token(&self, secret_hash: &[u8; 32]) -> Result<Option<JoinTokenRec>, StoreError>;
    /// Every join token kept (they are few: made by hand, trimmed a day after they expire).
    fn join_tokens(&self) -> Result<Vec<([u8; 32], JoinTokenRec)>, StoreError>;
    /// Whether server `node_id` was removed from the cluster.
    fn removed_server(&self, node_id: u64) -> Result<Option<RemovedServerRec>, StoreError>;
}

/// Why join token `token` cannot admit server `node_id` at `now_ns`, if it cannot. `removed` says
/// whether that node id was removed from the cluster. Shared by the servers' early checks and
/// the state machine, so both give the same answer.
pub fn join_token_refusal(token: Option<&JoinTokenRec>, removed: bool, node_id: u64, now_ns: i64) -> Option<String> {
    if removed {
        return Some(format!(
            "server {node_id} was removed from this cluster and cannot join again with that node id: start it from an empty directory with a new join token"
        ));
    }
    let Some(t) = token else {
        return Some(
            "this join token is unknown to the cluster (another cluster's, or long expired): make a new one with `codafs cluster join-token`".into(),
        );
    };
    match t.used_by {
        Some(n) if n == node_id => None,
        Some(n) => Some(format!(
            "this join token was already used by server {n}; a join token admits one server: make a new one with `codafs cluster join-token`"
        )),
        None if now_ns >= t.expires_ns => {
            Some("this join token has expired: make a new one with `codafs cluster join-token`".into())
        }
        None => None,
    }
}

/// Join tokens are kept this long after they expire (so a late retry is told "expired", not
/// "unknown"), then trimmed.
pub const JOIN_TOKEN_KEEP_NS: i64 = 24 * 3600 * 1_000_000_000;
/// Most expired join tokens one new token trims.
const JOIN_TOKEN_TRIM_BATCH: usize = 8;

/// Commit requests are remembered for this many log entries: far longer than any client or
/// forwarding server retries (seconds), bounded so the table does not grow forever.
pub const REQUEST_RETAIN: u64 = 100_000;
/// Most expired request records one commit deletes (one is added per commit, so this keeps up).
const REQUEST_TRIM_BATCH: usize = 8;

/// Change records kept per volume for resuming subscribers; older ones are trimmed and a
/// subscriber that needs them revalidates instead.
pub const CHANGE_RETAIN: u64 = 4096;

/// Most names one file may have (as ext4).
pub const MAX_LINKS: u32 = 65_000;

/// Deepest directory nesting a rename checks for cycles; deeper trees cannot be moved.
pub const MAX_DIR_DEPTH: usize = 4096;

/// The writes one command makes. `None` values are deletions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    pub objects: BTreeMap<u64, Option<ObjectRec>>,
    pub dirents: BTreeMap<(u64, String), Option<u64>>,
    pub volumes: BTreeMap<String, VolumeRec>,
    /// Volumes deleted, with their ids (their change records go too).
    pub volume_deletes: BTreeMap<String, u32>,
    pub cluster: Option<ClusterRec>,
    pub accounts: BTreeMap<String, Option<AccountRec>>,
    /// New token generations of accounts whose tokens this command revokes.
    pub token_generations: BTreeMap<String, u64>,
    /// Final reference counts of blobs whose count changed (0 = unreferenced).
    pub blobrefs: BTreeMap<Hash, u64>,
    /// Final counts of references to chunk manifests whose count changed (0 = none).
    pub manifestrefs: BTreeMap<Hash, u64>,
    /// Change records: (volume id, version, what changed).
    pub changes: Vec<(u32, u64, ChangeRec)>,
    /// Change records trimmed: (volume id, version).
    pub change_deletes: Vec<(u32, u64)>,
    /// Commit requests remembered (`Some`) or forgotten (`None`, with the index they had).
    pub requests: Vec<(RequestId, Option<RequestRec>, u64)>,
    /// Join tokens written (`Some`) or trimmed (`None`).
    pub join_tokens: BTreeMap<[u8; 32], Option<JoinTokenRec>>,
    /// Servers removed from the cluster.
    pub removed_servers: BTreeMap<u64, RemovedServerRec>,
}

/// Applies `cmd` as log entry `index`.
pub fn apply(view: &dyn StateView, index: u64, cmd: &Command) -> Result<(Delta, Response), StoreError> {
    // The proposing server checked the role against its state at that moment. An entry applied
    // in between may have demoted or removed the proposer (two admins demoting each other at
    // once would otherwise leave none), so the role is checked again against the state it
    // applies to. Only admins pay the account read.
    let demoted;
    let cmd = match cmd.actor() {
        Some(a) if a.admin && !view.account(&a.user)?.is_some_and(|r| r.admin) => {
            let mut c = cmd.clone();
            if let Some(a) = c.actor_mut() {
                a.admin = false;
            }
            demoted = c;
            &demoted
        }
        _ => cmd,
    };
    let mut txn = Txn::new(view, index);
    let res = match cmd {
        Command::Bootstrap { cluster_id, key, admin } => txn.bootstrap(cluster_id, key, admin),
        Command::CreateVolume { actor, spec, now_ns } => txn.create_volume(actor, spec, *now_ns),
        Command::Commit {
            actor,
            volume,
            ops,
            expect_volume_version,
            now_ns,
            request,
        } => txn.commit(actor, volume, ops, *expect_volume_version, *now_ns, request.as_ref()),
        Command::PutAccount { actor, account, create } => txn.put_account(actor, account, *create),
        Command::RemoveAccount { actor, name } => txn.remove_account(actor, name),
        Command::SetVolume { actor, name, changes } => txn.set_volume(actor, name, changes),
        Command::DeleteVolume { actor, name, now_ns } => txn.delete_volume(actor, name, *now_ns),
        Command::RotateKey { actor, new_key, retire } => txn.rotate_key(actor, *new_key, *retire),
        Command::RevokeTokens { actor, name } => txn.revoke_tokens(actor, name),
        Command::IssueJoinToken {
            actor,
            secret_hash,
            expires_ns,
            now_ns,
        } => txn.issue_join_token(actor, secret_hash, *expires_ns, *now_ns),
        Command::UseJoinToken {
            secret_hash,
            node_id,
            now_ns,
        } => txn.use_join_token(secret_hash, *node_id, *now_ns),
        Command::ForgetServer { actor, node_id, now_ns } => txn.forget_server(actor, *node_id, *now_ns),
    };
    match res {
        Ok(outcome) => Ok((txn.finish()?, Ok(outcome))),
        Err(TxnError::Refused(e)) => Ok((Delta::default(), Err(e))),
        Err(TxnError::Store(e)) => Err(e),
    }
}

enum TxnError {
    Refused(ApplyError),
    Store(StoreError),
}

impl From<StoreError> for TxnError {
    fn from(e: StoreError) -> Self {
        TxnError::Store(e)
    }
}
impl From<ApplyError> for TxnError {
    fn from(e: ApplyError) -> Self {
        TxnError::Refused(e)
    }
}

type TxnResult<T> = Result<T, TxnError>;

fn refuse<T>(e: ApplyError) -> TxnResult<T> {
    Err(TxnError::Refused(e))
}

/// An overlay of pending writes over the applied state.
struct Txn<'a> {
    view: &'a dyn StateView,
    index: u64,
    delta: Delta,
    blob_deltas: BTreeMap<Hash, i64>,
    manifest_deltas: BTreeMap<Hash, i64>,
    changed_inos: BTreeSet<u64>,
    changed_dirs: BTreeSet<u64>,
    /// Names changed in `changed_dirs`, with where each leads now (`None`: removed).
    changed_names: BTreeMap<(u64, String), Option<u64>>,
    /// Nodes whose mode, owner or group an operation changed.
    changed_perms: BTreeSet<u64>,
    /// The version the node of the operation being applied had just before it (set by
    /// set_attr, set_content, link and rename; 0 for the others): answered per operation, so a
    /// client can tell whether anyone else's commit came between its view of a node and its
    /// own unchecked change of it.
    op_prior: u64,
}

impl<'a> Txn<'a> {
    fn new(view: &'a dyn StateView, index: u64) -> Self {
        Txn {
            view,
            index,
            delta: Delta::default(),
            blob_deltas: BTreeMap::new(),
            manifest_deltas: BTreeMap::new(),
            changed_inos: BTreeSet::new(),
            changed_dirs: BTreeSet::new(),
            changed_names: BTreeMap::new(),
            changed_perms: BTreeSet::new(),
            op_prior: 0,
        }
    }

    fn finish(mut self) -> Result<Delta, StoreError> {
        let view = self.view;
        self.delta.blobrefs = final_counts(std::mem::take(&mut self.blob_deltas), |h| view.blobref(h))?;
        self.delta.manifestrefs = final_counts(std::mem::take(&mut self.manifest_deltas), |h| view.manifestref(h))?;
        Ok(self.delta)
    }

    // ---- overlay reads

    fn object(&self, ino: u64) -> TxnResult<Option<ObjectRec>> {
        match self.delta.objects.get(&ino) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.view.object(ino)?),
        }
    }

    fn dirent(&self, parent: u64, name: &str) -> TxnResult<Option<u64>> {
        match self.delta.dirents.get(&(parent, name.to_string())) {
            Some(v) => Ok(*v),
            None => Ok(self.view.dirent(parent, name)?),
        }
    }

    /// All entries of a directory, overlay applied.
    /// Whether directory `parent` has any entry: the names this transaction changed decide
    /// first, then stored pages are read only until a name it did not remove turns up (an
    /// rmdir never loads a large directory's whole listing).
    fn has_children(&self, parent: u64) -> TxnResult<bool> {
        const PAGE: usize = 64;
        let mut removed = BTreeSet::new();
        for ((p, name), v) in self.delta.dirents.range((parent, String::new())..) {
            if *p != parent {
                break;
            }
            match v {
                Some(_) => return Ok(true),
                None => {
                    removed.insert(name.as_str());
                }
            }
        }
        let mut after = String::new();
        loop {
            let page = self.view.dirents(parent, &after, PAGE)?;
            if page.iter().any(|(n, _)| !removed.contains(n.as_str())) {
                return Ok(true);
            }
            match page.last() {
                Some((last, _)) if page.len() == PAGE => after.clone_from(last),
                _ => return Ok(false),
            }
        }
    }

    fn children(&self, parent: u64) -> TxnResult<Vec<(String, u64)>> {
        let mut all: BTreeMap<String, u64> = BTreeMap::new();
        let mut after = String::new();
        loop {
            let page = self.view.dirents(parent, &after, 4096)?;
            let done = page.len() < 4096;
            if let Some((last, _)) = page.last() {
                after = last.clone();
            }
            all.extend(page);
            if done {
                break;
            }
        }
        for ((p, name), v) in self.delta.dirents.range((parent, String::new())..) {
            if *p != parent {
                break;
            }
            match v {
                Some(ino) => all.insert(name.clone(), *ino),
                None => all.remove(name),
            };
        }
        Ok(all.into_iter().collect())
    }

    fn volume(&self, name: &str) -> TxnResult<Option<VolumeRec>> {
        match self.delta.volumes.get(name) {
            Some(v) => Ok(Some(v.clone())),
            None => Ok(self.view.volume(name)?),
        }
    }

    fn cluster(&self) -> TxnResult<ClusterRec> {
        match &self.delta.cluster {
            Some(c) => Ok(c.clone()),
            None => self
                .view
                .cluster()?
                .ok_or(TxnError::Refused(ApplyError::NotBootstrapped)),
        }
    }

    // ---- overlay writes

    fn put_object(&mut self, o: ObjectRec) {
        self.changed_inos.insert(o.ino);
        self.delta.objects.insert(o.ino, Some(o));
    }

    fn put_dirent(&mut self, parent: u64, name: &str, child: Option<u64>) {
        self.changed_dirs.insert(parent);
        self.changed_names.insert((parent, name.to_string()), child);
        self.delta.dirents.insert((parent, name.to_string()), child);
    }

    /// Counts `d` more (or fewer) references to file content `hash` of `size` bytes: always in
    /// `blobrefs`, and also in `manifestrefs` when content of that size is chunked (the hash
    /// then names a manifest). The rule depends only on the size, so the record's own size says
    /// which count to undo when the content is replaced or dropped.
    fn blob_ref(&mut self, hash: Option<Hash>, size: u64, d: i64) {
        if let Some(h) = hash {
            *self.blob_deltas.entry(h).or_insert(0) += d;
            if codafs_common::chunks::is_chunked(size) {
                *self.manifest_deltas.entry(h).or_insert(0) += d;
            }
        }
    }

    /// Revokes every token `user` holds now: their generation becomes this entry's index, which
    /// is larger than any generation a token could carry so far (tokens copy the generation
    /// current at login, and indexes only grow).
    fn revoke(&mut self, user: &str) {
        self.delta.token_generations.insert(user.to_string(), self.index);
    }

    // ---- commands

    fn bootstrap(&mut self, cluster_id: &str, key: &[u8; 32], admin: &AccountRec) -> TxnResult<Outcome> {
        if self.view.cluster()?.is_some() {
            return refuse(ApplyError::Invalid("cluster already bootstrapped".into()));
        }
        self.delta.cluster = Some(ClusterRec {
            cluster_id: cluster_id.to_string(),
            keys: vec![(1, *key)],
            next_volume_id: 1,
        });
        self.delta.accounts.insert(admin.name.clone(), Some(admin.clone()));
        Ok(Outcome::Done)
    }

    fn issue_join_token(
        &mut self,
        actor: &Actor,
        secret_hash: &[u8; 32],
        expires_ns: i64,
        now_ns: i64,
    ) -> TxnResult<Outcome> {
        if !actor.admin {
            return refuse(ApplyError::Denied("making join tokens needs the admin role".into()));
        }
        self.cluster()?;
        if self.view.join_token(secret_hash)?.is_some() {
            return refuse(ApplyError::Exists("join token".into()));
        }
        let stale: Vec<[u8; 32]> = self
            .view
            .join_tokens()?
            .into_iter()
            .filter(|(_, t)| t.expires_ns.saturating_add(JOIN_TOKEN_KEEP_NS) < now_ns)
            .map(|(h, _)| h)
            .take(JOIN_TOKEN_TRIM_BATCH)
            .collect();
        for h in stale {
            self.delta.join_tokens.insert(h, None);
        }
        let rec = JoinTokenRec {
            created_ns: now_ns,
            created_by: actor.user.clone(),
            expires_ns,
            used_by: None,
            used_ns: 0,
        };
        self.delta.join_tokens.insert(*secret_hash, Some(rec));
        Ok(Outcome::Done)
    }

    fn use_join_token(&mut self, secret_hash: &[u8; 32], node_id: u64, now_ns: i64) -> TxnResult<Outcome> {
        self.cluster()?;
        let removed = self.view.removed_server(node_id)?.is_some();
        let token = self.view.join_token(secret_hash)?;
        if let Some(why) = join_token_refusal(token.as_ref(), removed, node_id, now_ns) {
            return refuse(ApplyError::Denied(why));
        }
        if let Some(mut t) = token.filter(|t| t.used_by.is_none()) {
            t.used_by = Some(node_id);
            t.used_ns = now_ns;
            self.delta.join_tokens.insert(*secret_hash, Some(t));
        }
        Ok(Outcome::Done)
    }

    fn forget_server(&mut self, actor: &Actor, node_id: u64, now_ns: i64) -> TxnResult<Outcome> {
        if !actor.admin {
            return refuse(ApplyError::Denied("removing servers needs the admin role".into()));
        }
        self.cluster()?;
        if self.view.removed_server(node_id)?.is_none() {
            let rec = RemovedServerRec {
                removed_ns: now_ns,
                removed_by: actor.user.clone(),
            };
            self.delta.removed_servers.insert(node_id, rec);
        }
        Ok(Outcome::Done)
    }

    fn rotate_key(&mut self, actor: &Actor, new_key: Option<[u8; 32]>, retire: Option<u32>) -> TxnResult<Outcome> {
        if !actor.admin {
            return refuse(ApplyError::Denied("rotating keys needs the admin role".into()));
        }
        let mut cluster = self.cluster()?;
        if let Some(k) = new_key {
            let next = cluster.keys.iter().map(|(id, _)| *id).max().unwrap_or(0) + 1;
            cluster.keys.push((next, k));
        }
        if let Some(id) = retire {
            if cluster.current_key().is_some_and(|(cur, _)| cur == id) {
                return refuse(ApplyError::Invalid(format!(
                    "key {id} is the current signing key; add a new one first"
                )));
            }
            let before = cluster.keys.len();
            cluster.keys.retain(|(k, _)| *k != id);
            if cluster.keys.len() == before {
                return refuse(ApplyError::NoSuchKey(id));
            }
        }
        self.delta.cluster = Some(cluster);
        Ok(Outcome::Done)
    }

    fn put_account(&mut self, actor: &Actor, account: &AccountRec, create: bool) -> TxnResult<Outcome> {
        if !actor.admin {
            return refuse(ApplyError::Denied("managing accounts needs the admin role".into()));
        }
        // New names only: an account made before the rule keeps working.
        if create {
            codafs_common::names::validate_account_name(&account.name).map_err(ApplyError::from)?;
        }
        validate_name(&account.name).map_err(ApplyError::from)?;
        let existing = self.view.account(&account.name)?;
        match (create, existing) {
            (true, Some(_)) => return refuse(ApplyError::Exists(format!("account {}", account.name))),
            (false, None) => return refuse(ApplyError::NoSuchAccount(account.name.clone())),
            _ => {}
        }
        if !create && actor.user == account.name && !account.admin {
            // As with removing one's own account: some admin must always remain.
            return refuse(ApplyError::Invalid(
                "an admin cannot take the admin role from their own account; another admin can".into(),
            ));
        }
        self.delta.accounts.insert(account.name.clone(), Some(account.clone()));
        // A new password or role: tokens issued under the old ones end here.
        self.revoke(&account.name);
        Ok(Outcome::Done)
    }

    fn revoke_tokens(&mut self, actor: &Actor, name: &str) -> TxnResult<Outcome> {
        if !(actor.admin || actor.user == name) {
            return refuse(ApplyError::Denied(format!(
                "{} may not revoke the tokens of {name} (admins may revoke anyone's; users their own)",
                actor.user
            )));
        }
        if self.view.account(name)?.is_none() {
            return refuse(ApplyError::NoSuchAccount(name.to_string()));
        }
        self.revoke(name);
        Ok(Outcome::Done)
    }

    fn remove_account(&mut self, actor: &Actor, name: &str) -> TxnResult<Outcome> {
        if !actor.admin {
            return refuse(ApplyError::Denied("managing accounts needs the admin role".into()));
        }
        if self.view.account(name)?.is_none() {
            return refuse(ApplyError::NoSuchAccount(name.to_string()));
        }
        if actor.user == name {
            return refuse(ApplyError::Invalid("an admin cannot remove their own account".into()));
        }
        if let Some(v) = self.view.volume_owned_by(name)? {
            return refuse(ApplyError::Invalid(format!(
                "{name} still owns volume {v}; give it a new owner first"
            )));
        }
        // Its write rights go with it: a new account of the same name starts with none.
        for v in self.view.volumes_written_by(name)? {
            if let Some(mut vol) = self.volume(&v)? {
                vol.writers.retain(|w| w != name);
                self.delta.volumes.insert(v, vol);
            }
        }
        self.delta.accounts.insert(name.to_string(), None);
        self.revoke(name);
        Ok(Outcome::Done)
    }

    fn set_volume(&mut self, actor: &Actor, name: &str, c: &VolumeChanges) -> TxnResult<Outcome> {
        if !actor.admin {
            return refuse(ApplyError::Denied(
                "changing volume settings needs the admin role".into(),
            ));
        }
        let mut vol = self
            .volume(name)?
            .ok_or_else(|| ApplyError::NoSuchVolume(name.to_string()))?;
        let before = vol.clone();
        for user in c.owner.iter().chain(&c.add_writers) {
            if self.view.account(user)?.is_none() {
                return refuse(ApplyError::NoSuchAccount(user.clone()));
            }
        }
        if let Some(o) = &c.owner {
            vol.owner = o.clone();
        }
        for w in &c.add_writers {
            if !vol.writers.contains(w) {
                vol.writers.push(w.clone());
            }
        }
        vol.writers.retain(|w| !c.remove_writers.contains(w));
        vol.writers.sort();
        if let Some(q) = c.quota_bytes {
            vol.quota_bytes = q;
        }
        if let Some(q) = c.quota_files {
            vol.quota_files = q;
        }
        if let Some(w) = c.write_quorum {
            if w == 0 {
                return refuse(ApplyError::Invalid("write quorum must be at least 1".into()));
            }
            vol.write_quorum = w;
        }
        if let Some(p) = c.public_read {
            vol.public_read = p;
        }
        // Whoever loses the right to write this volume (a removed writer, a former owner who is
        // not made a writer) loses their tokens too. Rights are checked against the current
        // state at every call anyway; the revocation also ends sessions that were granted on
        // the strength of those rights. Gaining rights revokes nothing, and admins, who may
        // write every volume, lose nothing here.
        let may_write = |v: &VolumeRec, u: &str| v.owner == u || v.writers.iter().any(|w| w == u);
        let losers: Vec<String> = std::iter::once(&before.owner)
            .chain(&before.writers)
            .filter(|u| !may_write(&vol, u))
            .cloned()
            .collect();
        for u in &losers {
            if self.view.account(u)?.is_some_and(|a| !a.admin) {
                self.revoke(u);
            }
        }
        self.delta.volumes.insert(name.to_string(), vol.clone());
        Ok(Outcome::Volume(vol))
    }

    /// Deletes a volume: every object and name in it (their contents lose a reference each, so
    /// GC collects what nothing else holds), its change records and its record. Mounts drop
    /// it at their next volume poll; its change streams end.
    fn delete_volume(&mut self, actor: &Actor, name: &str, now_ns: i64) -> TxnResult<Outcome> {
        if !actor.admin {
            return refuse(ApplyError::Denied("deleting volumes needs the admin role".into()));
        }
        let mut vol = self
            .volume(name)?
            .ok_or_else(|| ApplyError::NoSuchVolume(name.to_string()))?;
        let root_ino = make_ino(vol.id, VOLUME_ROOT_INODE);
        if let Some(root) = self.object(root_ino)? {
            self.drop_tree(&mut vol, root, now_ns)?;
        }
        // Nobody is told about these nodes: the volume is gone as a whole.
        self.changed_inos.clear();
        self.changed_dirs.clear();
        self.changed_names.clear();
        self.changed_perms.clear();
        self.delta.volumes.remove(name);
        self.delta.volume_deletes.insert(name.to_string(), vol.id);
        Ok(Outcome::Done)
    }

    fn create_volume(&mut self, actor: &Actor, spec: &VolumeSpec, now_ns: i64) -> TxnResult<Outcome> {
        if !actor.admin {
            return refuse(ApplyError::Denied("creating volumes needs the admin role".into()));
        }
        validate_volume_name(&spec.name).map_err(ApplyError::from)?;
        if self.volume(&spec.name)?.is_some() {
            return refuse(ApplyError::Exists(format!("volume {}", spec.name)));
        }
        if self.view.account(&spec.owner)?.is_none() {
            return refuse(ApplyError::NoSuchAccount(spec.owner.clone()));
        }
        let mut cluster = self.cluster()?;
        let id = cluster.next_volume_id;
        if id > codafs_common::ids::MAX_VOLUME_ID {
            return refuse(ApplyError::Invalid("volume ids exhausted".into()));
        }
        cluster.next_volume_id += 1;
        self.delta.cluster = Some(cluster);
        let root = make_ino(id, VOLUME_ROOT_INODE);
        self.put_object(ObjectRec {
            ino: root,
            generation: self.index,
            kind: Kind::Dir,
            size: 0,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_ns: now_ns,
            ctime_ns: now_ns,
            nlink: 2,
            hash: None,
            symlink: String::new(),
            version: self.index,
            parent: root,
            atime_ns: now_ns,
        });
        let vol = VolumeRec {
            id,
            name: spec.name.clone(),
            owner: spec.owner.clone(),
            writers: Vec::new(),
            quota_bytes: spec.quota_bytes,
            quota_files: spec.quota_files,
            write_quorum: if spec.write_quorum == 0 {
                codafs_proto::limits::DEFAULT_WRITE_QUORUM
            } else {
                spec.write_quorum
            },
            public_read: spec.public_read,
            version: self.index,
            used_bytes: 0,
            used_files: 0,
            next_inode: VOLUME_ROOT_INODE + 1,
            created_ns: now_ns,
            history_floor: self.index,
            change_count: 0,
        };
        self.delta.volumes.insert(spec.name.clone(), vol.clone());
        Ok(Outcome::Volume(vol))
    }

    fn commit(
        &mut self,
        actor: &Actor,
        volume: &str,
        ops: &[Op],
        expect_volume_version: Option<u64>,
        now_ns: i64,
        request: Option<&RequestId>,
    ) -> TxnResult<Outcome> {
        if let Some(id) = request {
            if let Some(done) = self.view.request(id)? {
                // Already applied: answer as the first time, change nothing.
                return Ok(Outcome::Committed {
                    version: done.index,
                    created: done.created,
                    prior: Vec::new(),
                });
            }
        }
        let mut vol = self
            .volume(volume)?
            .ok_or_else(|| ApplyError::NoSuchVolume(volume.to_string()))?;
        if !(actor.admin || vol.owner == actor.user || vol.writers.contains(&actor.user)) {
            return refuse(ApplyError::Denied(format!(
                "{} may not write volume {volume}",
                actor.user
            )));
        }
        if let Some(expected) = expect_volume_version {
            if expected != vol.version {
                return refuse(ApplyError::Conflict {
                    what: format!("volume {volume}"),
                    expected,
                    actual: vol.version,
                });
            }
        }
        if ops.is_empty() {
            return refuse(ApplyError::Invalid("empty commit".into()));
        }
        let (before_bytes, before_files) = (vol.used_bytes, vol.used_files);
        let mut created = Vec::with_capacity(ops.len());
        let mut prior = Vec::with_capacity(ops.len());
        for op in ops {
            self.op_prior = 0;
            created.push(self.op(&mut vol, op, now_ns)?);
            prior.push(self.op_prior);
        }
        check_quota("bytes", vol.quota_bytes, before_bytes, vol.used_bytes)?;
        check_quota("files", vol.quota_files, before_files, vol.used_files)?;
        vol.version = self.index;
        let change = self.take_change()?;
        self.delta.changes.push((vol.id, self.index, change));
        vol.change_count += 1;
        if vol.change_count > CHANGE_RETAIN {
            if let Some(oldest) = self.view.oldest_change(vol.id)? {
                self.delta.change_deletes.push((vol.id, oldest));
                vol.history_floor = oldest;
                vol.change_count -= 1;
            }
        }
        self.delta.volumes.insert(volume.to_string(), vol);
        if let Some(id) = request {
            let rec = RequestRec {
                index: self.index,
                created: created.clone(),
            };
            self.delta.requests.push((*id, Some(rec), self.index));
        }
        if let Some(before) = self.index.checked_sub(REQUEST_RETAIN) {
            for (index, id) in self.view.requests_before(before, REQUEST_TRIM_BATCH)? {
                self.delta.requests.push((id, None, index));
            }
        }
        Ok(Outcome::Committed {
            version: self.index,
            created,
            prior,
        })
    }

    /// What this commit changed, for the change stream: with every name it touched and the
    /// nodes it deleted, unless it touched more than `MAX_CHANGE_NAMES` names (mounts then read
    /// the changed directories again).
    fn take_change(&mut self) -> TxnResult<ChangeRec> {
        let inos: Vec<u64> = std::mem::take(&mut self.changed_inos).into_iter().collect();
        let dirs = std::mem::take(&mut self.changed_dirs).into_iter().collect();
        let touched = std::mem::take(&mut self.changed_names);
        let perms: Vec<u64> = std::mem::take(&mut self.changed_perms).into_iter().collect();
        let without_names = |inos, dirs| ChangeRec {
            inos,
            dirs,
            names: None,
            removed: Vec::new(),
            perms: perms.clone(),
        };
        if touched.len() > codafs_proto::limits::MAX_CHANGE_NAMES {
            return Ok(without_names(inos, dirs));
        }
        let mut names = Vec::with_capacity(touched.len());
        for ((dir, name), child) in touched {
            let target = match child {
                Some(ino) => match self.object(ino)? {
                    Some(o) => Some((ino, o.kind)),
                    // Cannot happen (a name always leads to a node); mounts then read `dirs`.
                    None => return Ok(without_names(inos, dirs)),
                },
                None => None,
            };
            names.push(NameRec { dir, name, target });
        }
        let removed = inos
            .iter()
            .copied()
            .filter(|i| matches!(self.delta.objects.get(i), Some(None)))
            .collect();
        Ok(ChangeRec {
            inos,
            dirs,
            names: Some(names),
            removed,
            perms,
        })
    }

    fn resolve(&self, vol: &VolumeRec, node: &NodeRef) -> TxnResult<ObjectRec> {
        let ino = match node {
            NodeRef::Ino(ino) => {
                if split_ino(*ino).0 != vol.id {
                    return refuse(ApplyError::Invalid(format!(
                        "node {ino:#x} is not in volume {}",
                        vol.name
                    )));
                }
                *ino
            }
            NodeRef::Path(p) => {
                let parts = split_path(p).map_err(ApplyError::from)?;
                walk_path(vol, &parts, |dir, name| self.dirent(dir, name))?
                    .ok_or_else(|| ApplyError::NotFound(p.clone()))?
            }
        };
        self.object(ino)?
            .ok_or_else(|| ApplyError::NotFound(format!("node {ino:#x}")).into())
    }

    fn resolve_dir(&self, vol: &VolumeRec, node: &NodeRef) -> TxnResult<ObjectRec> {
        let o = self.resolve(vol, node)?;
        if o.kind != Kind::Dir {
            return refuse(ApplyError::NotDir(describe(node)));
        }
        Ok(o)
    }

    fn touch_dir(&mut self, mut dir: ObjectRec, now_ns: i64) {
        dir.mtime_ns = now_ns;
        dir.ctime_ns = now_ns;
        dir.version = self.index;
        self.put_object(dir);
    }

    /// Removes one name of an object: a file or symlink with other hard links loses a link
    /// count; the last name (and any directory) deletes the object.
    fn unlink_object(&mut self, vol: &mut VolumeRec, mut o: ObjectRec, now_ns: i64) -> TxnResult<()> {
        if o.kind != Kind::Dir && o.nlink > 1 {
            o.nlink -= 1;
            o.ctime_ns = now_ns;
            o.version = self.index;
            self.put_object(o);
            return Ok(());
        }
        self.drop_object(vol, o)
    }

    /// Deletes one object record and its accounting (not its directory entry).
    fn drop_object(&mut self, vol: &mut VolumeRec, o: ObjectRec) -> TxnResult<()> {
        self.blob_ref(o.hash, o.size, -1);
        vol.used_files = vol.used_files.saturating_sub(1);
        if o.kind != Kind::Dir {
            vol.used_bytes = vol.used_bytes.saturating_sub(o.size);
        }
        self.changed_inos.insert(o.ino);
        self.delta.objects.insert(o.ino, None);
        Ok(())
    }

    /// Deletes an object and, for a directory, everything below it (iteratively: no recursion
    /// depth to exhaust).
    fn drop_tree(&mut self, vol: &mut VolumeRec, root: ObjectRec, now_ns: i64) -> TxnResult<()> {
        let mut stack = vec![root];
        while let Some(o) = stack.pop() {
            if o.kind == Kind::Dir {
                for (name, child) in self.children(o.ino)? {
                    self.put_dirent(o.ino, &name, None);
                    // Re-read: an earlier name of the same hard-linked file may have changed it.
                    if let Some(c) = self.object(child)? {
                        stack.push(c);
                    }
                }
                self.drop_object(vol, o)?;
            } else {
                // Fresh copy: another name of this file in the same subtree may have been
                // unlinked already in this walk.
                let current = self.object(o.ino)?;
                if let Some(c) = current {
                    self.unlink_object(vol, c, now_ns)?;
                }
            }
        }
        Ok(())
    }
}

/// The new value of every count that changed: the applied count plus the net change, never
/// below 0. A read failure stops the replica instead of silently resetting a count.
fn final_counts(
    deltas: BTreeMap<Hash, i64>,
    base: impl Fn(&Hash) -> Result<u64, StoreError>,
) -> Result<BTreeMap<Hash, u64>, StoreError> {
    let mut out = BTreeMap::new();
    for (hash, d) in deltas {
        if d != 0 {
            let v = (i128::from(base(&hash)?) + i128::from(d)).max(0);
            out.insert(hash, u64::try_from(v).unwrap_or(u64::MAX));
        }
    }
    Ok(out)
}

fn describe(node: &NodeRef) -> String {
    match node {
        NodeRef::Ino(i) => format!("node {i:#x}"),
        NodeRef::Path(p) => p.clone(),
    }
}

/// Checks an operation's expected version against the object it targets (absent = version 0).
fn expect(expected: Option<u64>, actual: Option<&ObjectRec>, what: &str) -> TxnResult<()> {
    let actual = actual.map_or(0, |o| o.version);
    match expected {
        Some(e) if e != actual => refuse(ApplyError::Conflict {
            what: what.to_string(),
            expected: e,
            actual,
        }),
        _ => Ok(()),
    }
}

/// Largest file size a commit may declare (1 PiB): far above any real file, far below overflow.
pub const MAX_FILE_SIZE: u64 = 1 << 50;

/// Adds a file size to a volume's usage, refusing absurd sizes instead of overflowing (an
/// overflow here would panic or wrap on every replica replaying the entry).
fn add_bytes(used: u64, size: u64) -> TxnResult<u64> {
    if size > MAX_FILE_SIZE {
        return refuse(ApplyError::Invalid(format!(
            "file size {size} exceeds the limit of {MAX_FILE_SIZE} bytes"
        )));
    }
    used.checked_add(size)
        .ok_or_else(|| ApplyError::Invalid("volume usage would overflow".into()).into())
}

fn check_quota(what: &str, limit: u64, before: u64, after: u64) -> TxnResult<()> {
    // Only growth is refused: a volume already over quota may still shrink.
    if limit > 0 && after > limit && after > before {
        return refuse(ApplyError::Quota {
            what: what.to_string(),
            limit,
            would_be: after,
        });
    }
    Ok(())
}

/// Follows `parts` from the root of `vol` with `dirent` (the transaction's view, or the state's
/// alone): the node they name, or `None` at the first name missing.
pub(crate) fn walk_path<E>(
    vol: &VolumeRec,
    parts: &[&str],
    mut dirent: impl FnMut(u64, &str) -> Result<Option<u64>, E>,
) -> Result<Option<u64>, E> {
    let mut cur = make_ino(vol.id, VOLUME_ROOT_INODE);
    for part in parts {
        match dirent(cur, part)? {
            Some(next) => cur = next,
            None => return Ok(None),
        }
    }
    Ok(Some(cur))
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod twin;
