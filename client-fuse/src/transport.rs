//! Talking to replica servers with failover.
//!
//! A [`Cluster`] knows every server. Each call goes to the preferred server first; on an
//! unavailable server, a timeout or a transport error it moves on to another one, so one
//! server failing never fails a read. The server that answered becomes the preferred one.
//! Blob reads verify the hash while streaming and fall back to another replica on a mismatch.
//!
//! A client starts at the first listed server ([`Cluster::prefer`] picks another). Every web
//! node of a farm is given the same server list, so a mount starts at a random one instead
//! ([`Cluster::spread`]) and moves off a witness ([`Cluster::avoid_witness`]). After a failure
//! a client tries the others from a random one on. A farm's reads, cold fetches and change
//! streams so spread over the servers, and the clients of a server that fails spread over the
//! rest instead of all landing on the next one in the list.
//!
//! Connections use TLS verified against the cluster CA unless the caller explicitly asks for
//! plaintext ([`Tls::Insecure`]); there is no fallback from one to the other.
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use codafs_common::Hash;
use codafs_proto::error::{kind_of, status, ErrorKind};
use codafs_proto::limits::{MAX_MESSAGE, TOKEN_HEADER};
use codafs_proto::pb;
pub use codafs_proto::tls::Tls;
use codafs_proto::tls::TlsError;

use crate::policy::{RequestPolicy, Retry};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Client failures, one line each.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Every server asked failed in a way another might not: each one's reason, `ADDR: why`.
    #[error("no server could take the call ({0})")]
    Unreachable(String),
    /// One server asked by name (a status probe, a replica's blobs) did not answer in time.
    #[error("{0} did not answer within {1:?} (down, stopped or cut off)")]
    NoAnswer(String, Duration),
    /// One server asked by name failed the call in a way another server might not (refused
    /// connections, shutting down, out of time on its side).
    #[error("{0} failed: {1}")]
    Down(String, String),
    #[error("{}", .0.message())]
    Server(Status),
    #[error("blob {0} failed verification on every replica")]
    Corrupt(Hash),
    #[error("bad server address {0}: {1}")]
    Address(String, String),
    #[error("{0}")]
    Tls(String),
}

impl From<TlsError> for ClientError {
    fn from(e: TlsError) -> Self {
        match e {
            TlsError::Address(a, m) => ClientError::Address(a, m),
            e @ TlsError::Config(..) => ClientError::Tls(e.to_string()),
        }
    }
}

impl ClientError {
    /// The gRPC status behind a server refusal, if any.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Server(s) => Some(s),
            _ => None,
        }
    }

    /// What went wrong, as the error contract names it: decide by this, never by the message.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClientError::Server(s) => kind_of(s),
            ClientError::Unreachable(_) | ClientError::NoAnswer(..) | ClientError::Down(..) => ErrorKind::Unavailable,
            ClientError::Corrupt(_) => ErrorKind::Corrupt,
            ClientError::Address(..) | ClientError::Tls(_) => ErrorKind::Invalid,
        }
    }

    /// The message, naming server `addr` once: some errors name the server already.
    pub fn about(&self, addr: &str) -> String {
        match self {
            ClientError::NoAnswer(..) | ClientError::Down(..) => self.to_string(),
            e => format!("{addr}: {e}"),
        }
    }

    /// The gRPC code (for tools and tests that show or compare codes).
    pub fn code(&self) -> Code {
        match self {
            ClientError::Server(s) => s.code(),
            other => other.kind().code(),
        }
    }
}

/// A blob to read and the caller's right to it: the read ticket that came with the attributes
/// of the file that holds it, and that file (servers also accept a readable file whose current
/// content it is, for when the ticket has expired).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub hash: Hash,
    pub ticket: bytes::Bytes,
    pub ino: u64,
    /// Set when `hash` is a chunk of a large file: that file's manifest (the ticket and `ino`
    /// then show the right to the manifest).
    pub manifest: Option<Hash>,
}

impl BlobRef {
    /// The content of the file these attributes describe.
    pub fn of(attr: &pb::Attr) -> Result<Self, codafs_common::hash::BadHash> {
        Ok(BlobRef {
            hash: Hash::from_slice(&attr.hash)?,
            ticket: attr.read_ticket.clone(),
            ino: attr.ino,
            manifest: None,
        })
    }

    /// Chunk `chunk` of the large file this names (read under this file's right).
    pub fn chunk(&self, chunk: Hash) -> Self {
        BlobRef {
            hash: chunk,
            ticket: self.ticket.clone(),
            ino: self.ino,
            manifest: Some(self.hash),
        }
    }

    /// The request that reads it from byte `offset` on.
    pub fn request(&self, offset: u64) -> pb::GetBlobRequest {
        pb::GetBlobRequest {
            hash: bytes::Bytes::copy_from_slice(&self.hash.0),
            offset,
            ticket: self.ticket.clone(),
            ino: self.ino,
            manifest: self
                .manifest
                .map(|m| bytes::Bytes::copy_from_slice(&m.0))
                .unwrap_or_default(),
        }
    }
}

/// A directory's whole listing as one replica had it.
#[derive(Debug, Clone)]
pub struct DirListing {
    pub entries: Vec<(String, pb::Attr)>,
    /// The directory's own version (log index of its last change).
    pub dir_version: u64,
    /// The lowest applied index the pages were read at: the listing is at least this fresh.
    pub applied: u64,
}

/// Connections to every server of a cluster.
pub struct Cluster {
    servers: Vec<(String, Channel)>,
    tls: Tls,
    preferred: AtomicUsize,
    /// When each server last left a read unanswered in its time (ms since `epoch`; 0: not
    /// lately). Such a server goes last in every order for [`QUIET_FOR`], so the calls after
    /// the one that waited on a hung server do not wait on it again (blob fetches, which skip
    /// witnesses, would otherwise find it next after a metadata read failed over to one).
    quiet: Vec<AtomicU64>,
    /// Which servers said they are witnesses (in a health answer or the membership). A read a
    /// witness answered first does not make it the preferred server: it stores no blobs, so
    /// the next content fetch would be refused there first.
    witness: Vec<AtomicBool>,
    /// When each server last answered anything (ms since `epoch`; 0: never). A call sent to a
    /// server that has not answered for [`FRESH_FOR`] is preceded by a health probe (see
    /// `call_within`).
    answered: Vec<AtomicU64>,
    /// The log index of this client's latest commit (0: none yet). A read's refusal from a
    /// server whose state covers it is final even while the preferred server has not answered
    /// (see [`Cluster::read`]).
    committed: AtomicU64,
    epoch: std::time::Instant,
    token: Option<String>,
    /// Deadlines of every call (see [`RequestPolicy`]).
    pub policy: RequestPolicy,
}

impl Cluster {
    /// Prepares lazy connections to `servers` over `tls` (nothing is contacted yet); the
    /// first one is preferred.
    pub fn new(servers: &[String], tls: Tls, token: Option<String>) -> Result<Self, ClientError> {
        if servers.is_empty() {
            return Err(ClientError::Unreachable("no servers configured".into()));
        }
        let mut chans = Vec::new();
        for s in servers {
            let ep = tuned(tls.endpoint(s)?);
            chans.push((s.clone(), ep.connect_lazy()));
        }
        Ok(Cluster {
            servers: chans,
            tls,
            preferred: AtomicUsize::new(0),
            quiet: servers.iter().map(|_| AtomicU64::new(0)).collect(),
            witness: servers.iter().map(|_| AtomicBool::new(false)).collect(),
            answered: servers.iter().map(|_| AtomicU64::new(0)).collect(),
            committed: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            token,
            policy: RequestPolicy::default(),
        })
    }

    /// The transport security these connections use.
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    pub fn servers(&self) -> Vec<String> {
        self.servers.iter().map(|(a, _)| a.clone()).collect()
    }

    /// A request with the token header and deadline set.
    pub fn request<T>(&self, body: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(body);
        if let Some(t) = self.token.as_deref().and_then(|t| t.parse().ok()) {
            r.metadata_mut().insert(TOKEN_HEADER, t);
        }
        r.set_timeout(self.policy.call_timeout);
        r
    }

    /// A request carrying `token` instead of the cluster's own: a mount acts for many local
    /// users, each with their own token.
    pub fn request_as<T>(&self, token: &str, body: T) -> tonic::Request<T> {
        let mut r = self.request(body);
        if let Ok(v) = token.parse() {
            r.metadata_mut().insert(TOKEN_HEADER, v);
        }
        r
    }

    /// [`Cluster::request_as`] when a token is given, else [`Cluster::request`].
    pub fn request_opt<T>(&self, token: Option<&str>, body: T) -> tonic::Request<T> {
        match token {
            Some(t) => self.request_as(t, body),
            None => self.request(body),
        }
    }

    /// Sends this client's calls to server `addr` first (one of the configured servers), until
    /// it fails: a web node placed beside one server, or a test that must know which server a
    /// client uses.
    pub fn prefer(&self, addr: &str) -> Result<(), ClientError> {
        let i = self.index_of(addr).ok_or_else(|| {
            ClientError::Address(
                addr.to_string(),
                format!("not one of the configured servers ({})", self.servers().join(", ")),
            )
        })?;
        self.preferred.store(i, Ordering::Relaxed);
        Ok(())
    }

    /// Prefers one of the servers at random (a mount: see the module doc).
    pub fn spread(&self) {
        self.preferred
            .store(rand::random::<usize>() % self.servers.len(), Ordering::Relaxed);
    }

    /// Moves the preference off a witness, to a data server at random: a witness stores no
    /// blobs, so a client starting there would have its first read refused, and its writes
    /// relayed. Asks `Health` (answered to anyone) of every server at once, each within the
    /// probe deadline, and so also learns which servers are witnesses (see `witness`). A
    /// preference that moved meanwhile (a failover) is left as it is.
    pub async fn avoid_witness(&self) {
        let n = self.servers.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let answers = futures::future::join_all(self.servers.iter().map(|(a, _)| self.health_on(a))).await;
        for (i, a) in answers.iter().enumerate() {
            if let Err(e) = a {
                tracing::debug!(server = %self.servers[i].0, error = %e, "no health answer");
            }
        }
        if matches!(&answers[start], Ok(h) if !h.witness) {
            return;
        }
        let data = failover_order(n, start, rand::random()).find(|&i| matches!(&answers[i], Ok(h) if !h.witness));
        if let Some(i) = data {
            tracing::info!(server = %self.servers[i].0, "preferring a data server over a witness");
            self.move_preference(start, i);
        }
    }

    /// Makes sure the preferred server answers: it is probed (within the probe deadline), and
    /// if it does not answer, every server is, and the preference moves to a data server that
    /// answers (see [`Cluster::avoid_witness`]). `codafs status MNT` calls it first, so it does
    /// not name a server killed a moment ago as the one reads go to.
    pub async fn recheck_preferred(&self) {
        let i = self.preferred.load(Ordering::Relaxed) % self.servers.len();
        if !matches!(self.health_on(&self.servers[i].0).await, Ok(h) if !h.witness) {
            self.avoid_witness().await;
        }
    }

    /// Notes what server `addr` said its role is (a health answer, the membership).
    pub(crate) fn note_role(&self, addr: &str, witness: bool) {
        if let Some(i) = self.index_of(addr) {
            self.witness[i].store(witness, Ordering::Relaxed);
        }
    }

    /// The cluster's id: the one its CA certificate names ([`Tls::cluster_id`]); else (in
    /// plaintext, or a CA named otherwise) from the first server that tells it (health checks
    /// need no token). A server without its cluster's record yet (one still joining) tells
    /// none, so the others are asked. `None` only if every server answered, ready and without
    /// an id (servers older than the field).
    pub async fn cluster_id(&self) -> Result<Option<String>, ClientError> {
        // The CA's own name first: servers could claim another cluster's id (to be handed
        // that cluster's tokens), a CA cannot.
        if let Some(id) = self.tls.cluster_id() {
            return Ok(Some(id));
        }
        let mut last = None;
        let mut all_old = true;
        for i in self.order().1 {
            match self.health_on(&self.servers[i].0).await {
                Ok(h) if !h.cluster_id.is_empty() => return Ok(Some(h.cluster_id)),
                Ok(h) => all_old &= h.ready,
                Err(e) => {
                    all_old = false;
                    last = Some(e);
                }
            }
        }
        if all_old {
            return Ok(None);
        }
        Err(last.unwrap_or_else(|| ClientError::Unreachable("no server told its cluster id yet".into())))
    }

    /// Moves the preference off the server calls go to first now, to another picked at random:
    /// a call to it ran out of the caller's time. A hung server (stopped, or its disk stuck)
    /// accepts connections and answers nothing, so calls never fail over from it by
    /// themselves: each used up its whole time there, and a mount started against it stayed
    /// disconnected while the other servers were fine.
    ///
    /// `from`: the server preferred when the call began. Only if it still is does the
    /// preference move (the calls that waited on a hung server time out one after another, and
    /// each must not move it again, off the server the first one moved it to).
    pub fn skip_preferred(&self, from: Option<&str>) {
        let n = self.servers.len();
        let now = self.preferred.load(Ordering::Relaxed) % n;
        let from = from
            .and_then(|a| self.servers.iter().position(|(s, _)| s == a))
            .unwrap_or(now);
        if from != now {
            return;
        }
        let to = failover_order(n, from, rand::random())
            .skip(1)
            .find(|&i| !self.witness[i].load(Ordering::Relaxed));
        if let Some(to) = to {
            tracing::info!(from = %self.servers[from].0, to = %self.servers[to].0, "no answer in time; asking another server first");
            self.move_preference(from, to);
        }
    }

    /// Prefers server `to` if the preference is still `from`: a move decided on an older
    /// preference (a call that started before another one failed over) never undoes a newer.
    /// A known witness is never made preferred this way (see `witness`).
    fn move_preference(&self, from: usize, to: usize) {
        if self.witness[to].load(Ordering::Relaxed) {
            return;
        }
        let _ = self
            .preferred
            .compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// [`Cluster::move_preference`] by address: from `from` to `to` (both of the servers).
    pub fn moved_to(&self, from: &str, to: &str) {
        if let (Some(f), Some(t)) = (self.index_of(from), self.index_of(to)) {
            self.move_preference(f, t);
        }
    }

    /// Where server `addr` is in the list, if it is one of the servers.
    fn index_of(&self, addr: &str) -> Option<usize> {
        self.servers.iter().position(|(a, _)| a == addr)
    }

    /// The server calls go to first now.
    pub fn preferred(&self) -> String {
        self.servers[self.preferred.load(Ordering::Relaxed) % self.servers.len()]
            .0
            .clone()
    }

    /// Order in which to try servers: the preferred one (also returned), then the others from
    /// a random one on (see the module doc).
    /// Servers that left a read unanswered lately go last (see `quiet`).
    fn order(&self) -> (usize, impl Iterator<Item = usize> + '_) {
        let n = self.servers.len();
        let p = self.preferred.load(Ordering::Relaxed) % n;
        let mut order: Vec<usize> = failover_order(n, p, rand::random::<usize>()).collect();
        // Stable: the others keep their order; of the quiet ones, the one quiet most lately
        // goes last.
        let now = self.now_ms();
        order.sort_by_key(|&i| self.quiet_since(i, now));
        (p, order.into_iter())
    }

    /// Milliseconds since `epoch`: what `quiet` and `answered` hold.
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Stores the time now in `slot` (never 0, which means "never").
    fn stamp(&self, slot: &AtomicU64) {
        slot.store(self.now_ms().max(1), Ordering::Relaxed);
    }

    /// The time `slot` holds if it is at most `within` before `now`, else 0.
    fn recent(slot: &AtomicU64, within: Duration, now: u64) -> u64 {
        let at = slot.load(Ordering::Relaxed);
        if at != 0 && now <= at + within.as_millis() as u64 {
            at
        } else {
            0
        }
    }

    /// Notes that server `i` answered (see `answered`).
    fn heard_from(&self, i: usize) {
        self.stamp(&self.answered[i]);
    }

    /// Whether server `i` answered within [`FRESH_FOR`].
    fn answered_lately(&self, i: usize) -> bool {
        Self::recent(&self.answered[i], FRESH_FOR, self.now_ms()) != 0
    }

    /// Notes that server `i` did not answer in time (see `quiet`).
    fn mark_quiet(&self, i: usize) {
        self.stamp(&self.quiet[i]);
    }

    /// [`Cluster::mark_quiet`] by address (a blob stream the server did not open in time).
    pub fn quiet(&self, addr: &str) {
        if let Some(i) = self.index_of(addr) {
            self.mark_quiet(i);
        }
    }

    /// Whether the server at `addr` went quiet lately (did not answer a call in time within
    /// the last [`QUIET_FOR`]).
    pub fn is_quiet(&self, addr: &str) -> bool {
        self.index_of(addr)
            .is_some_and(|i| self.quiet_since(i, self.now_ms()) != 0)
    }

    /// When server `i` went quiet, if it did lately (0: not quiet); `now` in ms since `epoch`.
    fn quiet_since(&self, i: usize, now: u64) -> u64 {
        Self::recent(&self.quiet[i], QUIET_FOR, now)
    }

    /// Server addresses in preference order.
    pub fn ordered_servers(&self) -> Vec<String> {
        self.order().1.map(|i| self.servers[i].0.clone()).collect()
    }

    /// Runs `f` against servers in preference order until one answers (success or a
    /// non-retryable refusal).
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_retrying(f, Retry::Elsewhere).await
    }

    /// Like [`Cluster::call`], moving on to the next server only when `retry` says so.
    pub async fn call_retrying<T, F, Fut>(&self, f: F, retry: Retry) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_within(self.policy.call_timeout, f, retry).await
    }

    /// [`Cluster::call_retrying`] for calls whose requests are given `limit` (a blob put, in
    /// proportion to its size). Each server's attempt ends by then on this side too: a
    /// request's own deadline starts only once a connection carries it, and a new connection
    /// to a hung server (stopped, or stalled) completes TCP in the kernel and then waits for
    /// the TLS handshake for ever.
    pub async fn call_within<T, F, Fut>(&self, limit: Duration, f: F, retry: Retry) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        Ok(self.call_at(limit, f, retry).await?.0)
    }

    /// [`Cluster::call_within`], also naming the server that answered (a change stream's
    /// reader marks it quiet if the stream goes silent).
    pub async fn call_at<T, F, Fut>(&self, limit: Duration, f: F, retry: Retry) -> Result<(T, String), ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut errors = Vec::new();
        let (first, order) = self.order();
        for i in order {
            let (addr, ch) = &self.servers[i];
            if retry == Retry::IfNotRun || !self.answered_lately(i) {
                // A change that must not run twice is sent only on a connection that answers:
                // its timeout would leave the outcome unknown and end the call there, so a
                // hung server (stopped, stalled) would fail it although another could take it.
                // Any other call to a server not heard from lately is probed first too: a
                // stopped one would otherwise cost the whole deadline (a command's first put
                // waited 30 s on a stopped first server).
                if let Err(e) = self.answers(i).await {
                    tracing::debug!(server = %addr, error = %e, "server does not answer; trying the next");
                    errors.push(e.about(addr));
                    continue;
                }
            }
            let s = match tokio::time::timeout(limit, f(ch.clone())).await {
                Ok(Ok(v)) => {
                    self.heard_from(i);
                    self.move_preference(first, i);
                    return Ok((v, addr.clone()));
                }
                Ok(Err(s)) => s,
                Err(_) => Status::deadline_exceeded(format!("no answer within {limit:?}")),
            };
            if !retry.moves_on(&s) {
                return Err(ClientError::Server(explained(s, &self.tls)));
            }
            let why = explain(&s, &self.tls);
            tracing::debug!(server = %addr, error = %why, "server failed; trying the next");
            errors.push(format!("{addr}: {why}"));
        }
        Err(ClientError::Unreachable(errors.join("; ")))
    }

    /// Whether server `i` answers a health probe ([`Cluster::health_on`], which carries the
    /// token: a stranger's request shares the servers' smallest budget) on the connection calls
    /// use, so that connection is made, TLS included. `Err`: why not.
    async fn answers(&self, i: usize) -> Result<(), ClientError> {
        let r = self.health_on(&self.servers[i].0).await.map(drop);
        if let Err(ClientError::NoAnswer(..)) = r {
            self.mark_quiet(i);
        }
        r
    }

    /// A read that any server answers alike (attributes, listing pages, small contents, the
    /// membership): like [`Cluster::call`], but a server that has not answered within
    /// [`HEDGE_AFTER`] (or half the call deadline, if shorter) is left to go on while the next
    /// one is asked too, and the first answer wins; the whole call ends within the call
    /// deadline. A hung server (stopped, or stalled on its disk) keeps its connection open and
    /// never answers: waiting the whole deadline on it failed every cache miss whose preferred
    /// server it was, and made `codafs status` wait 30 s per hung server, although another
    /// server could answer in milliseconds. The server that answers becomes the preferred one.
    pub async fn read<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        use futures::stream::{FuturesUnordered, StreamExt};
        use tokio::time::{sleep_until, Instant};
        let deadline = Instant::now() + self.policy.call_timeout;
        let hedge = (self.policy.call_timeout / 2).min(HEDGE_AFTER);
        let (first, order) = self.order();
        let mut order = order.collect::<Vec<usize>>().into_iter();
        let ask = |i: usize| {
            let reply = f(self.servers[i].1.clone());
            async move { (i, reply.await) }
        };
        let mut asked = FuturesUnordered::new();
        let mut unanswered = Vec::new();
        let mut errors = Vec::new();
        // A refusal from a server asked besides the preferred one (a follower that has not
        // applied the caller's create yet says "not found") waits for the others' answers,
        // unless a majority of the servers refused, each on state that holds this client's
        // own commits: then the preferred server could hardly say otherwise (or it is the one
        // that stopped, and waiting on it cost the whole deadline). One server alone may be
        // behind what this client read elsewhere (a joiner still catching up, a follower
        // behind a listing this mount has), so it never settles the answer.
        let committed = self.committed.load(Ordering::Relaxed);
        let majority = self.servers.len() / 2 + 1;
        let mut fresh_refusals = 0;
        let mut refused = None;
        let lead = order.next();
        if let Some(i) = lead {
            asked.push(ask(i));
            unanswered.push(i);
        }
        let mut next_hedge = Instant::now() + hedge;
        while !asked.is_empty() {
            tokio::select! {
                Some((i, r)) = asked.next() => {
                    unanswered.retain(|&u| u != i);
                    let addr = &self.servers[i].0;
                    match r {
                        Ok(v) => {
                            self.heard_from(i);
                            self.quiet[i].store(0, Ordering::Relaxed);
                            if self.witness[i].load(Ordering::Relaxed) {
                                // A witness answered while the preferred server did not (or
                                // went quiet lately): move to another data server instead, as
                                // a witness is never preferred.
                                let now = self.now_ms();
                                if unanswered.contains(&first) || self.quiet_since(first, now) != 0 {
                                    self.skip_preferred(Some(&self.servers[first].0));
                                }
                            } else {
                                self.move_preference(first, i);
                            }
                            return Ok(v);
                        }
                        Err(s) if Retry::Elsewhere.moves_on(&s) => {
                            let why = explain(&s, &self.tls);
                            tracing::debug!(server = %addr, error = %why, "server failed; trying the next");
                            errors.push(format!("{addr}: {why}"));
                            if let Some(n) = order.next() {
                                asked.push(ask(n));
                                unanswered.push(n);
                                next_hedge = Instant::now() + hedge;
                            }
                        }
                        Err(s) => {
                            let applied = codafs_proto::error::applied_of(&s);
                            let fresh = applied.is_some_and(|a| a >= committed);
                            // The preferred server's refusal is final, unless it names a state
                            // older than this client's own last commit: then it has not applied
                            // that commit (a follower saying "not found" of the file this client
                            // just created), and the others are asked as for any other refusal.
                            let behind = applied.is_some_and(|a| a < committed);
                            fresh_refusals += usize::from(fresh);
                            let last = asked.is_empty() && order.len() == 0;
                            if Some(i) == lead && !behind || last || fresh && fresh_refusals >= majority {
                                return Err(ClientError::Server(explained(s, &self.tls)));
                            }
                            tracing::debug!(server = %addr, error = %explain(&s, &self.tls), "refused; waiting for the other servers asked");
                            refused.get_or_insert(s);
                            if asked.is_empty() {
                                if let Some(n) = order.next() {
                                    asked.push(ask(n));
                                    unanswered.push(n);
                                    next_hedge = Instant::now() + hedge;
                                }
                            }
                        }
                    }
                }
                _ = sleep_until(next_hedge), if order.len() > 0 => {
                    for &u in &unanswered {
                        self.mark_quiet(u);
                        tracing::debug!(server = %self.servers[u].0, ?hedge, "no answer yet; asking the next server too");
                    }
                    if let Some(n) = order.next() {
                        asked.push(ask(n));
                        unanswered.push(n);
                    }
                    next_hedge = Instant::now() + hedge;
                }
                _ = sleep_until(deadline) => {
                    for &u in &unanswered {
                        self.mark_quiet(u);
                        errors.push(format!("{}: no answer within {:?}", self.servers[u].0, self.policy.call_timeout));
                    }
                    break;
                }
            }
        }
        match refused {
            Some(s) => Err(ClientError::Server(explained(s, &self.tls))),
            None => Err(ClientError::Unreachable(errors.join("; "))),
        }
    }

    /// Runs `f` against one specific server, within the call deadline.
    pub async fn call_on<T, F, Fut>(&self, addr: &str, f: F) -> Result<T, ClientError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_on_within(addr, self.policy.call_timeout, f).await
    }

    /// [`Cluster::call_on`] within `limit` (a probe's shorter deadline).
    pub async fn call_on_within<T, F, Fut>(&self, addr: &str, limit: Duration, f: F) -> Result<T, ClientError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let ch = match self.servers.iter().find(|(a, _)| a == addr) {
            Some((_, c)) => c.clone(),
            None => tuned(self.tls.endpoint(addr)?).connect_lazy(),
        };
        // Bounded here too (see `call_within`).
        let Ok(r) = tokio::time::timeout(limit, f(ch)).await else {
            return Err(ClientError::NoAnswer(addr.to_string(), limit));
        };
        if let (Ok(_), Some(i)) = (&r, self.index_of(addr)) {
            self.heard_from(i);
        }
        r.map_err(|s| {
            if Retry::Elsewhere.moves_on(&s) {
                ClientError::Down(addr.to_string(), explain(&s, &self.tls))
            } else {
                ClientError::Server(explained(s, &self.tls))
            }
        })
    }

    pub fn meta(ch: Channel) -> pb::meta_client::MetaClient<Channel> {
        pb::meta_client::MetaClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
    pub fn admin(ch: Channel) -> pb::admin_client::AdminClient<Channel> {
        pb::admin_client::AdminClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
    pub fn write(ch: Channel) -> pb::write_client::WriteClient<Channel> {
        pb::write_client::WriteClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
    pub fn blobs(ch: Channel) -> pb::blobs_client::BlobsClient<Channel> {
        pb::blobs_client::BlobsClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// Commits a batch (any server forwards it to the leader). With a request id (see
    /// [`crate::ops::commit`]) it is idempotent, so a timeout or a broken call moves on to the
    /// next server like any read; without one it moves on only when a server was unavailable,
    /// never after a call whose outcome is unknown.
    pub async fn commit(&self, req: pb::CommitRequest) -> Result<pb::CommitReply, ClientError> {
        self.commit_as(None, req).await
    }

    /// [`Cluster::commit`] with `token` instead of the cluster's own, if given.
    pub async fn commit_as(&self, token: Option<&str>, req: pb::CommitRequest) -> Result<pb::CommitReply, ClientError> {
        let idempotent = !req.request_id.is_empty();
        let reply = self
            .call_retrying(
                |ch| {
                    let r = self.request_opt(token, req.clone());
                    async move { Self::write(ch).commit(r).await.map(|r| r.into_inner()) }
                },
                if idempotent { Retry::Elsewhere } else { Retry::IfNotRun },
            )
            .await?;
        self.committed.fetch_max(reply.version, Ordering::Relaxed);
        Ok(reply)
    }

    /// Every entry of a directory with its attributes, as of one state of the directory: pages
    /// are each read from one snapshot, and a listing whose pages saw different versions of the
    /// directory (a change landed between two pages) is read again, up to 5 times.
    pub async fn read_dir_all(&self, ino: u64) -> Result<Vec<(String, pb::Attr)>, ClientError> {
        Ok(self.read_dir_fresh(ino).await?.entries)
    }

    /// Every entry of a directory, with the freshness a mount needs to order the listing against
    /// change events.
    pub async fn read_dir_fresh(&self, ino: u64) -> Result<DirListing, ClientError> {
        self.read_dir_as(None, ino).await
    }

    /// [`Cluster::read_dir_fresh`] with `token` instead of the cluster's own, if given (a mount
    /// reads a private volume with the token of a local user who may read it).
    pub async fn read_dir_as(&self, token: Option<&str>, ino: u64) -> Result<DirListing, ClientError> {
        for _ in 0..5 {
            if let Some(listing) = self.read_dir_once(token, ino).await? {
                return Ok(listing);
            }
        }
        Err(ClientError::Server(status(
            ErrorKind::Conflict,
            format!("directory {ino:#x} kept changing while it was listed"),
        )))
    }

    /// One pass over the pages (at most 1,000 pages of 8,192 entries; a larger directory is
    /// refused rather than read forever); `None` if the directory changed between pages.
    async fn read_dir_once(&self, token: Option<&str>, ino: u64) -> Result<Option<DirListing>, ClientError> {
        let mut out = DirListing {
            entries: Vec::new(),
            dir_version: 0,
            applied: u64::MAX,
        };
        let mut after = String::new();
        let mut version = None;
        for _ in 0..1000 {
            let page = self
                .read(|ch| {
                    let r = self.request_opt(
                        token,
                        pb::ReadDirRequest {
                            ino,
                            after: after.clone(),
                            limit: 8192,
                        },
                    );
                    async move { Self::meta(ch).read_dir(r).await.map(|r| r.into_inner()) }
                })
                .await?;
            if *version.get_or_insert(page.dir_version) != page.dir_version {
                return Ok(None);
            }
            out.dir_version = page.dir_version;
            out.applied = out.applied.min(page.applied_index);
            out.entries
                .extend(page.entries.into_iter().filter_map(|e| e.attr.map(|a| (e.name, a))));
            match (page.more, out.entries.last()) {
                (true, Some((last, _))) => after = last.clone(),
                _ => return Ok(Some(out)),
            }
        }
        Err(ClientError::Server(status(
            ErrorKind::TooLarge,
            format!("directory {ino:#x} has more than 8 M entries"),
        )))
    }

    /// Uploads a blob held in memory; returns the durable copy count.
    pub async fn put_blob(&self, data: bytes::Bytes, write_quorum: u32) -> Result<u32, ClientError> {
        self.put_blob_as(None, data, write_quorum).await
    }

    /// [`Cluster::put_blob`] with `token` instead of the cluster's own, if given; given time in
    /// proportion to its size.
    pub async fn put_blob_as(
        &self,
        token: Option<&str>,
        data: bytes::Bytes,
        write_quorum: u32,
    ) -> Result<u32, ClientError> {
        let timeout = self.policy.for_bytes(data.len() as u64);
        self.call_within(
            timeout,
            |ch| {
                let msgs = crate::ops::put_chunks(&data, write_quorum);
                let mut r = self.request_opt(token, futures::stream::iter(msgs));
                r.set_timeout(timeout);
                async move { Self::blobs(ch).put(r).await.map(|r| r.into_inner().copies) }
            },
            Retry::Elsewhere,
        )
        .await
    }

    /// Stores file content held in memory the way files are stored: one blob, or (over the
    /// chunk threshold) its chunks and then its manifest. Returns the content's hash, what a
    /// create or set-content operation names (`ops::file` computes the same).
    pub async fn put_content(&self, data: &[u8], write_quorum: u32) -> Result<Hash, ClientError> {
        if !codafs_common::chunks::is_chunked(data.len() as u64) {
            self.put_blob(bytes::Bytes::copy_from_slice(data), write_quorum).await?;
            return Ok(Hash::of(data));
        }
        let mut chunks = Vec::new();
        let manifest = codafs_common::chunks::chunk_reader(data, |off, c, _| {
            chunks.push((off as usize, c.len as usize));
            Ok(())
        })
        .map_err(|e| ClientError::Server(status(ErrorKind::Invalid, e.to_string())))?;
        for (off, len) in chunks {
            self.put_blob(bytes::Bytes::copy_from_slice(&data[off..off + len]), write_quorum)
                .await?;
        }
        let encoded = manifest.encode();
        self.put_blob(encoded.into(), write_quorum).await?;
        Ok(manifest.hash())
    }

    /// Reads the whole content of a file of `size` bytes (`blob` from its attributes) into
    /// memory: the blob, or the manifest and then each chunk, every one verified.
    pub async fn get_content(&self, blob: &BlobRef, size: u64) -> Result<Vec<u8>, ClientError> {
        if !codafs_common::chunks::is_chunked(size) {
            return self.get_blob(blob).await;
        }
        let bytes = self.get_blob(blob).await?;
        let manifest = codafs_common::chunks::Manifest::decode(&bytes)
            .map_err(|e| ClientError::Server(status(ErrorKind::Corrupt, format!("{}: {e}", blob.hash))))?;
        let mut out = Vec::with_capacity(size as usize);
        for c in &manifest.chunks {
            out.extend_from_slice(&self.get_blob(&blob.chunk(c.hash)).await?);
        }
        Ok(out)
    }

    /// Uploads a batch of small blobs (each at most 1 MiB) in one request; returns the durable
    /// copy count of the whole batch.
    pub async fn put_small(&self, blobs: &[(Hash, bytes::Bytes)], write_quorum: u32) -> Result<u32, ClientError> {
        self.put_small_as(None, blobs, write_quorum).await
    }

    /// [`Cluster::put_small`] with `token` instead of the cluster's own, if given.
    pub async fn put_small_as(
        &self,
        token: Option<&str>,
        blobs: &[(Hash, bytes::Bytes)],
        write_quorum: u32,
    ) -> Result<u32, ClientError> {
        let req = pb::PutSmallRequest {
            blobs: blobs
                .iter()
                .map(|(h, d)| pb::SmallBlob {
                    hash: bytes::Bytes::copy_from_slice(&h.0),
                    data: d.clone(),
                })
                .collect(),
            write_quorum,
            forwarded: false,
        };
        self.call(|ch| {
            let r = self.request_opt(token, req.clone());
            async move { Self::blobs(ch).put_small(r).await.map(|r| r.into_inner().copies) }
        })
        .await
    }

    /// Fetches a whole blob, verifying it; falls back to other replicas on a miss, an error
    /// mid-stream or a hash mismatch.
    pub async fn get_blob(&self, blob: &BlobRef) -> Result<Vec<u8>, ClientError> {
        let hash = blob.hash;
        let mut last = None;
        let mut corrupt = false;
        let (first, order) = self.order();
        let idle = self.policy.call_timeout;
        for i in order {
            let (addr, ch) = &self.servers[i];
            match fetch_one(ch.clone(), self.request(blob.request(0)), hash, idle).await {
                Ok(data) => {
                    self.heard_from(i);
                    // It stores blobs: a data server (a witness may have been made one).
                    self.witness[i].store(false, Ordering::Relaxed);
                    self.move_preference(first, i);
                    return Ok(data);
                }
                Err(FetchError::Mismatch) => {
                    tracing::warn!(server = %addr, %hash, "blob failed verification; trying another replica");
                    corrupt = true;
                }
                Err(FetchError::Status(s)) => {
                    if s.code() == Code::DeadlineExceeded {
                        self.mark_quiet(i);
                    }
                    tracing::debug!(server = %addr, error = %explain(&s, &self.tls), "blob fetch failed; trying another replica");
                    last = Some(s);
                }
            }
        }
        if corrupt {
            return Err(ClientError::Corrupt(hash));
        }
        Err(match last {
            // A refusal every replica would repeat; a missing or corrupt copy, or a server
            // that could not answer, says nothing about the others and reads as unreachable.
            Some(s)
                if !Retry::Elsewhere.moves_on(&s)
                    && !matches!(kind_of(&s), ErrorKind::NotFound | ErrorKind::Corrupt) =>
            {
                ClientError::Server(explained(s, &self.tls))
            }
            Some(s) => ClientError::Unreachable(explain(&s, &self.tls)),
            None => ClientError::Unreachable("no servers".into()),
        })
    }
}

/// How long a read waits for a server's answer before it asks the next server too (see
/// [`Cluster::read`]). A healthy server answers a read in milliseconds; one that takes a second
/// is hung or overloaded, and a second server's answer costs it little.
const HEDGE_AFTER: Duration = Duration::from_secs(1);

/// How long a server's last answer counts as showing it answers: a call to a server silent for
/// longer is preceded by a health probe (one round trip; a mount that calls all the time never
/// pays it, a command pays it once per server it uses).
const FRESH_FOR: Duration = Duration::from_secs(10);

/// How long a server that left a read unanswered goes last in every order. A hung server is so
/// asked again at most this often (a read that finds it still hung waits its share of the
/// deadline, then moves on).
const QUIET_FOR: Duration = Duration::from_secs(10);

/// Every index below `n` once: `preferred` first, then the others in list order starting from
/// the one `r` picks, so the next server after a failure is any of the others alike.
fn failover_order(n: usize, preferred: usize, r: usize) -> impl Iterator<Item = usize> {
    let p = preferred % n;
    let others = n - 1;
    let start = if others == 0 { 0 } else { r % others };
    std::iter::once(p).chain((0..others).map(move |k| (p + 1 + (start + k) % others) % n))
}

/// The channel tuning every client connection gets.
fn tuned(ep: Endpoint) -> Endpoint {
    ep.connect_timeout(Duration::from_millis(800))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(3))
}

/// A failed call in one line: the message, the transport cause, and for the failures that a
/// TLS/plaintext mismatch or a wrong CA produce, what probably went wrong.
pub fn explain(s: &Status, tls: &Tls) -> String {
    let text = codafs_proto::tls::describe(s);
    let hint = codafs_proto::tls::mismatch_hint(&text, tls);
    match hint {
        Some(h) => format!("{text} ({h})"),
        None => text,
    }
}

/// A status from the transport (not from a server) rewritten with [`explain`]'s message, same
/// code; a server's own refusals are returned as they are.
fn explained(s: Status, tls: &Tls) -> Status {
    use std::error::Error as _;
    if s.source().is_none() {
        return s;
    }
    Status::new(s.code(), explain(&s, tls))
}

enum FetchError {
    Status(Status),
    Mismatch,
}

/// Fetches and verifies one blob from one server. The stream's opening and each of its
/// messages must come within `idle` (see `Cluster::call_within` for why the request's own
/// deadline is not enough): a stopped server is left, however large the blob.
async fn fetch_one(
    ch: Channel,
    req: tonic::Request<pb::GetBlobRequest>,
    hash: Hash,
    idle: Duration,
) -> Result<Vec<u8>, FetchError> {
    let silent = || FetchError::Status(Status::deadline_exceeded(format!("no answer within {idle:?}")));
    let opened = tokio::time::timeout(idle, Cluster::blobs(ch).get(req))
        .await
        .map_err(|_| silent())?;
    let mut stream = opened.map_err(FetchError::Status)?.into_inner();
    let mut out = Vec::new();
    let mut hasher = blake3::Hasher::new();
    loop {
        let next = tokio::time::timeout(idle, stream.message())
            .await
            .map_err(|_| silent())?;
        let Some(chunk) = next.map_err(FetchError::Status)? else {
            break;
        };
        if out.is_empty() && chunk.total_size > 0 {
            out.reserve(chunk.total_size.min(1 << 30) as usize);
        }
        hasher.update(&chunk.data);
        out.extend_from_slice(&chunk.data);
    }
    if Hash::from(hasher.finalize()) != hash {
        return Err(FetchError::Mismatch);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_tries_every_server_once_preferred_first() {
        for n in 1..6 {
            for p in 0..n {
                for r in 0..12 {
                    let order: Vec<usize> = failover_order(n, p, r).collect();
                    assert_eq!(order[0], p, "n={n} p={p} r={r}");
                    let mut sorted = order.clone();
                    sorted.sort_unstable();
                    assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n={n} p={p} r={r}: {order:?}");
                }
            }
        }
    }

    #[test]
    fn after_a_failure_any_other_server_can_be_next() {
        // Three servers, the first preferred: the next one tried is the second or the third
        // alike, so the clients of a failed server spread over the rest.
        let next: std::collections::BTreeSet<usize> =
            (0..4).map(|r| failover_order(3, 0, r).nth(1).unwrap_or(9)).collect();
        assert_eq!(next, [1, 2].into());
    }

    /// Runs [`Cluster::read`] over three unreachable addresses with `answers` in the order
    /// the servers are asked (the preferred one first; the channels are never used), after
    /// this client committed at log index 5. Returns the outcome and how many were asked.
    async fn read_with(answers: Vec<Result<u32, Status>>) -> (Result<u32, ClientError>, usize) {
        let servers: Vec<String> = (1..=3).map(|i| format!("127.0.0.1:{i}")).collect();
        let Ok(c) = Cluster::new(&servers, Tls::Insecure, None) else {
            panic!("three loopback addresses make a cluster");
        };
        c.committed.store(5, Ordering::Relaxed);
        let answers = std::sync::Mutex::new(answers.into_iter());
        let asked = AtomicU64::new(0);
        let r = c
            .read(|_ch| {
                asked.fetch_add(1, Ordering::Relaxed);
                let a = answers.lock().unwrap_or_else(|p| p.into_inner()).next();
                async move { a.unwrap_or_else(|| Err(Status::unavailable("no answer left"))) }
            })
            .await;
        (r, asked.load(Ordering::Relaxed) as usize)
    }

    #[tokio::test]
    async fn a_refusal_from_a_server_behind_this_clients_commit_is_not_final() {
        use codafs_proto::error::as_of;
        let gone = |applied| as_of(Status::not_found("x not found"), applied);
        // The preferred server has not applied the client's create: the next one answers.
        let (r, asked) = read_with(vec![Err(gone(4)), Ok(7)]).await;
        assert_eq!((r.ok(), asked), (Some(7), 2), "a behind refusal is asked elsewhere");
        // One that has applied it (or names no index, as older servers) is final at once.
        let (r, asked) = read_with(vec![Err(gone(5)), Ok(7)]).await;
        assert!(
            r.is_err() && asked == 1,
            "a fresh refusal is final: {r:?} after {asked}"
        );
        let (r, asked) = read_with(vec![Err(Status::not_found("x not found")), Ok(7)]).await;
        assert!(
            r.is_err() && asked == 1,
            "no index: final as before: {r:?} after {asked}"
        );
        // Every server behind: the refusal, once all were asked.
        let (r, asked) = read_with(vec![Err(gone(4)), Err(gone(3)), Err(gone(2))]).await;
        assert!(
            matches!(&r, Err(ClientError::Server(_))) && asked == 3,
            "{r:?} after {asked}"
        );
    }

    #[tokio::test]
    async fn clients_start_at_the_first_server_and_spread_at_random() -> Result<(), ClientError> {
        let servers: Vec<String> = (1..=3).map(|i| format!("127.0.0.1:{i}")).collect();
        assert_eq!(Cluster::new(&servers, Tls::Insecure, None)?.preferred(), "127.0.0.1:1");
        let mut seen = std::collections::BTreeSet::new();
        // The chance that 200 spread clients all miss one of three servers is below 1e-34.
        for _ in 0..200 {
            let c = Cluster::new(&servers, Tls::Insecure, None)?;
            c.spread();
            seen.insert(c.preferred());
        }
        assert_eq!(seen.len(), 3, "{seen:?}");

        // A move decided on an older preference does not undo a newer one.
        let c = Cluster::new(&servers, Tls::Insecure, None)?;
        c.move_preference(0, 2);
        assert_eq!(c.preferred(), "127.0.0.1:3");
        c.move_preference(0, 1);
        assert_eq!(c.preferred(), "127.0.0.1:3", "the preference had moved from the first");

        // A server known to be a witness is never moved to (an answer it gave first, a
        // failover off a hung server), only picked explicitly.
        let c = Cluster::new(&servers, Tls::Insecure, None)?;
        c.note_role("127.0.0.1:2", true);
        c.move_preference(0, 1);
        assert_eq!(
            c.preferred(),
            "127.0.0.1:1",
            "a witness's answer does not make it preferred"
        );
        for _ in 0..50 {
            c.skip_preferred(None);
            assert_ne!(c.preferred(), "127.0.0.1:2", "a failover never lands on the witness");
        }
        c.note_role("127.0.0.1:2", false);
        c.moved_to(&c.preferred(), "127.0.0.1:2");
        assert_eq!(
            c.preferred(),
            "127.0.0.1:2",
            "a witness made a data server can be preferred"
        );

        let c = Cluster::new(&servers, Tls::Insecure, None)?;
        c.prefer("127.0.0.1:2")?;
        assert_eq!(c.preferred(), "127.0.0.1:2");
        assert_eq!(c.ordered_servers()[0], "127.0.0.1:2");
        let err = c.prefer("127.0.0.1:9").expect_err("not a configured server");
        assert!(err.to_string().contains("not one of the configured servers"), "{err}");
        assert_eq!(c.preferred(), "127.0.0.1:2", "a refused preference changes nothing");
        Ok(())
    }
}
