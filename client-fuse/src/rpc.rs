//! One method per RPC on [`Cluster`]. A call site names the RPC and its arguments; which server
//! answers, the deadline, and when a failure moves on to the next server are decided by
//! [`Cluster`] and its [`crate::policy::RequestPolicy`], never at the call site.
//!
//! Methods that a mount calls on behalf of a local user take `token: Option<&str>` (`None`: the
//! cluster's own token, or none on a web node); administrative ones always use the cluster's own.
//! Streams, blob transfers and commits live in `transport.rs`.
use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use codafs_common::Hash;
use codafs_proto::pb;
use futures::stream::{FuturesUnordered, StreamExt};
use tonic::transport::Channel;
use tonic::{Response, Status, Streaming};

use crate::heartbeat::{self, Subscription};
use crate::policy::Retry;
use crate::transport::{ClientError, Cluster};

/// Hashes per `Missing` query (the servers take at most `MAX_MISSING_QUERY`; this keeps a
/// request well under the message limit).
const MISSING_QUERY: usize = 10_000;

/// How long the other data replicas get to say which blobs they lack once one has (see
/// `Cluster::lacking`).
const MISSING_LAG: Duration = Duration::from_secs(2);
/// How long a replica that went quiet lately gets once every other one has answered.
const QUIET_LAG: Duration = Duration::from_millis(300);

impl Cluster {
    /// Sends `req` with `token` (or the cluster's own) to servers in preference order, moving on
    /// after any failure another server may cure, and returns the reply body. For calls that
    /// may run twice (a login issues one more token); see [`Cluster::unary_write`].
    async fn unary<Req, Rep, F, Fut>(&self, token: Option<&str>, req: Req, rpc: F) -> Result<Rep, ClientError>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Rep>, Status>>,
    {
        self.unary_retrying(token, req, rpc, Retry::Elsewhere).await
    }

    /// [`Cluster::unary`] for a change without a request id (volume, account, key and server
    /// changes): it moves on only when a server was unavailable, never after a call whose
    /// outcome is unknown, which another server would apply a second time (a second key, a
    /// volume reported missing after its deletion succeeded).
    async fn unary_write<Req, Rep, F, Fut>(&self, req: Req, rpc: F) -> Result<Rep, ClientError>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Rep>, Status>>,
    {
        self.unary_retrying(None, req, rpc, Retry::IfNotRun).await
    }

    async fn unary_retrying<Req, Rep, F, Fut>(
        &self,
        token: Option<&str>,
        req: Req,
        rpc: F,
        retry: Retry,
    ) -> Result<Rep, ClientError>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Rep>, Status>>,
    {
        let call = |ch| {
            let reply = rpc(ch, self.request_opt(token, req.clone()));
            async move { reply.await.map(Response::into_inner) }
        };
        self.call_retrying(call, retry).await
    }

    /// [`Cluster::unary`] for a read any server answers alike (see [`Cluster::read`]).
    async fn unary_read<Req, Rep, F, Fut>(&self, token: Option<&str>, req: Req, rpc: F) -> Result<Rep, ClientError>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Rep>, Status>>,
    {
        self.read(|ch| {
            let reply = rpc(ch, self.request_opt(token, req.clone()));
            async move { reply.await.map(Response::into_inner) }
        })
        .await
    }

    /// [`Cluster::unary`] against the server at `addr` only, within `timeout`.
    async fn unary_on<Req, Rep, F, Fut>(
        &self,
        addr: &str,
        timeout: Duration,
        req: Req,
        rpc: F,
    ) -> Result<Rep, ClientError>
    where
        F: FnOnce(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Rep>, Status>>,
    {
        let mut r = self.request(req);
        r.set_timeout(timeout);
        self.call_on_within(
            addr,
            timeout,
            |ch| async move { rpc(ch, r).await.map(Response::into_inner) },
        )
        .await
    }

    // ----------------------------------------------------------------------------- Meta

    /// A node's attributes, with the answering replica's applied index.
    pub async fn get_attr(&self, token: Option<&str>, ino: u64) -> Result<pb::AttrReply, ClientError> {
        self.unary_read(token, pb::GetAttrRequest { ino }, |ch, r| async move {
            Cluster::meta(ch).get_attr(r).await
        })
        .await
    }

    /// The attributes of `volume:path` (`""` is the volume's root).
    pub async fn resolve(&self, token: Option<&str>, volume: &str, path: &str) -> Result<pb::AttrReply, ClientError> {
        let req = pb::ResolveRequest {
            volume: volume.into(),
            path: path.into(),
        };
        self.unary_read(token, req, |ch, r| async move { Cluster::meta(ch).resolve(r).await })
            .await
    }

    /// [`Cluster::volume_stamps`] with the applied index of the state they were read from.
    pub async fn volume_stamps_applied(
        &self,
        token: Option<&str>,
        volumes: Vec<String>,
    ) -> Result<pb::VolumeStampsReply, ClientError> {
        let req = pb::VolumeStampsRequest { volumes };
        self.unary_read(
            token,
            req,
            |ch, r| async move { Cluster::meta(ch).volume_stamps(r).await },
        )
        .await
    }

    /// The current version of each of `volumes`.
    pub async fn volume_stamps(
        &self,
        token: Option<&str>,
        volumes: Vec<String>,
    ) -> Result<Vec<pb::VolumeStamp>, ClientError> {
        Ok(self.volume_stamps_applied(token, volumes).await?.stamps)
    }

    /// Every change to `volume` after version `from`, then live changes, with ticks asked for
    /// every [`heartbeat::TICK_EVERY`] (see [`heartbeat::watched`]). The stream lives as long
    /// as its reader wants it.
    pub async fn subscribe(&self, token: Option<&str>, volume: &str, from: u64) -> Result<Subscription, ClientError> {
        let req = pb::SubscribeRequest {
            volume: volume.into(),
            from_version: from,
            tick_ms: u32::try_from(heartbeat::TICK_EVERY.as_millis()).unwrap_or(1000),
        };
        let limit = self.policy.call_timeout;
        let ((events, ticks), server) = self
            .call_at(
                limit,
                |ch| {
                    let mut r = self.request_opt(token, req.clone());
                    r.set_timeout(Duration::from_secs(365 * 86400));
                    async move {
                        let reply = Cluster::meta(ch).subscribe(r).await?;
                        let ticks = codafs_proto::ticks::announced(reply.metadata());
                        Ok((reply.into_inner(), ticks))
                    }
                },
                Retry::Elsewhere,
            )
            .await?;
        Ok(Subscription { events, ticks, server })
    }

    // ---------------------------------------------------------------------------- Blobs

    /// Which of `hashes` the server at `addr` does not store (a health check: nothing is
    /// touched, and an unreferenced blob counts while it is stored).
    pub async fn missing_on(&self, addr: &str, hashes: &[Hash]) -> Result<Vec<Hash>, ClientError> {
        self.ask_missing(addr, None, hashes, true).await
    }

    /// Which of `hashes` a commit could not reference on the server at `addr`, asked as
    /// `token`'s holder (asking needs the right to store): those it lacks, and unreferenced
    /// ones near the end of their GC grace period, which are to be sent again.
    pub async fn missing_on_as(
        &self,
        addr: &str,
        token: Option<&str>,
        hashes: &[Hash],
    ) -> Result<Vec<Hash>, ClientError> {
        self.ask_missing(addr, token, hashes, false).await
    }

    async fn ask_missing(
        &self,
        addr: &str,
        token: Option<&str>,
        hashes: &[Hash],
        exists_only: bool,
    ) -> Result<Vec<Hash>, ClientError> {
        let req = pb::MissingBlobsRequest {
            hashes: hashes.iter().map(|h| bytes::Bytes::copy_from_slice(&h.0)).collect(),
            sizes: Vec::new(),
            exists_only,
        };
        // A status probe's deadline, doubled: a replica that cannot say in that time is
        // counted as lacking, which costs a resend at worst.
        let limit = (self.policy.probe_timeout * 2).min(self.policy.call_timeout);
        let mut r = self.request_opt(token, req);
        r.set_timeout(limit);
        let reply = self
            .call_on_within(addr, limit, |ch| async move {
                Cluster::blobs(ch).missing(r).await.map(Response::into_inner)
            })
            .await?;
        Ok(reply.missing.iter().filter_map(|b| Hash::from_slice(b).ok()).collect())
    }

    /// The hashes of `hashes` that some data replica lacks, asked as `token`'s holder. A
    /// replica that cannot be asked counts as lacking everything (a put succeeds once W copies
    /// exist, so sending too much is safe; sending too little fails the commit).
    pub async fn lacking(&self, token: Option<&str>, hashes: &[Hash]) -> Result<HashSet<Hash>, ClientError> {
        let data: Vec<String> = self
            .list_servers_as(token)
            .await?
            .servers
            .into_iter()
            .filter(|s| !s.witness)
            .map(|s| s.addr)
            .collect();
        let mut lacking = HashSet::new();
        // A replica that did not answer one part is not asked the rest: each would wait on it
        // again (a stopped server keeps its connections and answers nothing). One that went
        // quiet lately (a hedged read gave up on it) is asked, but waited for only
        // `QUIET_LAG` once the others have answered: counted as lacking everything, it would
        // be sent every blob again, and it may well be back.
        let quiet: HashSet<String> = data.iter().filter(|a| self.is_quiet(a)).cloned().collect();
        let mut silent: HashSet<String> = HashSet::new();
        for part in hashes.chunks(MISSING_QUERY) {
            let start = tokio::time::Instant::now();
            let mut waiting: HashSet<&String> = data.iter().filter(|a| !silent.contains(*a)).collect();
            let mut asked: FuturesUnordered<_> = waiting
                .iter()
                .map(|&addr| async move { (addr, self.missing_on_as(addr, token, part).await) })
                .collect();
            // The replicas are asked at once; after the first answer the others get
            // `MISSING_LAG` (or three times the first's time, if longer) more, so a stopped
            // replica costs seconds, not the whole query deadline.
            let mut cutoff: Option<tokio::time::Instant> = None;
            loop {
                if cutoff.is_some() && !waiting.is_empty() && waiting.iter().all(|a| quiet.contains(*a)) {
                    let soon = tokio::time::Instant::now() + QUIET_LAG;
                    cutoff = cutoff.map(|c| c.min(soon));
                }
                let next = match cutoff {
                    Some(c) => match tokio::time::timeout_at(c, asked.next()).await {
                        Ok(n) => n,
                        Err(_) => break,
                    },
                    None => asked.next().await,
                };
                let Some((addr, r)) = next else { break };
                waiting.remove(addr);
                match r {
                    Ok(m) => {
                        lacking.extend(m);
                        cutoff
                            .get_or_insert_with(|| tokio::time::Instant::now() + MISSING_LAG.max(start.elapsed() * 3));
                    }
                    Err(e) => {
                        tracing::debug!(server = %addr, error = %e, "could not ask which blobs a replica lacks");
                        silent.insert(addr.clone());
                    }
                }
            }
            for addr in waiting {
                tracing::debug!(server = %addr, "a replica did not say which blobs it lacks as fast as the others; counting it as lacking all");
                self.quiet(addr);
                silent.insert(addr.clone());
            }
            // Silent replicas, earlier or now, count as lacking the whole part.
            if data.iter().any(|a| silent.contains(a)) {
                lacking.extend(part.iter().copied());
            }
        }
        Ok(lacking)
    }

    /// Opens the chunk stream of a blob on the server at `addr` (the caller verifies it).
    pub async fn open_blob_on(
        &self,
        addr: &str,
        token: Option<&str>,
        req: pb::GetBlobRequest,
    ) -> Result<Streaming<pb::BlobChunk>, ClientError> {
        let r = self.request_opt(token, req);
        self.call_on(addr, |ch| async move {
            Cluster::blobs(ch).get(r).await.map(Response::into_inner)
        })
        .await
    }

    /// Several small blobs in one call (each request carries its ticket or file); the reply
    /// holds those the answering server had, unverified (the caller hashes each).
    pub async fn get_small(
        &self,
        token: Option<&str>,
        blobs: Vec<pb::GetBlobRequest>,
    ) -> Result<Vec<pb::SmallBlob>, ClientError> {
        let reply = self
            .unary_read(token, pb::GetSmallRequest { blobs }, |ch, r| async move {
                Cluster::blobs(ch).get_small(r).await
            })
            .await?;
        Ok(reply.blobs)
    }

    // ---------------------------------------------------------------------------- Admin

    /// The volumes `token` (or the cluster's own token) may see.
    pub async fn list_volumes(&self, token: Option<&str>) -> Result<Vec<pb::VolumeInfo>, ClientError> {
        let reply = self
            .unary_read(token, pb::Empty {}, |ch, r| async move {
                Cluster::admin(ch).list_volumes(r).await
            })
            .await?;
        Ok(reply.volumes)
    }

    /// One volume's settings and usage.
    pub async fn get_volume(&self, name: &str) -> Result<pb::VolumeInfo, ClientError> {
        let req = pb::VolumeName { name: name.into() };
        self.unary_read(None, req, |ch, r| async move { Cluster::admin(ch).get_volume(r).await })
            .await
    }

    pub async fn create_volume(&self, spec: pb::VolumeSpec) -> Result<pb::VolumeInfo, ClientError> {
        self.unary_write(spec, |ch, r| async move { Cluster::admin(ch).create_volume(r).await })
            .await
    }

    pub async fn set_volume(&self, changes: pb::VolumeChanges) -> Result<pb::VolumeInfo, ClientError> {
        self.unary_write(changes, |ch, r| async move { Cluster::admin(ch).set_volume(r).await })
            .await
    }

    /// One volume as the server at `addr` sees it (with that server's change streams of it).
    pub async fn get_volume_on(&self, addr: &str, name: &str) -> Result<pb::VolumeInfo, ClientError> {
        let timeout = self.policy.probe_timeout;
        let req = pb::VolumeName { name: name.into() };
        self.unary_on(addr, timeout, req, |ch, r| async move {
            Cluster::admin(ch).get_volume(r).await
        })
        .await
    }

    /// Deletes a volume and everything in it (admin).
    pub async fn delete_volume(&self, name: &str) -> Result<(), ClientError> {
        let req = pb::VolumeName { name: name.into() };
        self.unary_write(req, |ch, r| async move { Cluster::admin(ch).delete_volume(r).await })
            .await
            .map(|_| ())
    }

    /// The cluster's servers, as the membership records them.
    pub async fn list_servers(&self) -> Result<pb::ServerList, ClientError> {
        self.list_servers_as(None).await
    }

    /// [`Cluster::list_servers`] as `token`'s holder (the cluster's own token if `None`).
    pub async fn list_servers_as(&self, token: Option<&str>) -> Result<pb::ServerList, ClientError> {
        let list = self
            .unary_read(token, pb::Empty {}, |ch, r| async move {
                Cluster::admin(ch).servers(r).await
            })
            .await?;
        for s in &list.servers {
            self.note_role(&s.addr, s.witness);
        }
        Ok(list)
    }

    /// The status of whichever server answers first.
    pub async fn status(&self) -> Result<pb::ServerStatus, ClientError> {
        self.unary_read(
            None,
            pb::Empty {},
            |ch, r| async move { Cluster::admin(ch).status(r).await },
        )
        .await
    }

    /// The status of the server at `addr`, within the policy's probe deadline.
    pub async fn status_on(&self, addr: &str) -> Result<pb::ServerStatus, ClientError> {
        let timeout = self.policy.probe_timeout;
        self.unary_on(addr, timeout, pb::Empty {}, |ch, r| async move {
            Cluster::admin(ch).status(r).await
        })
        .await
    }

    /// The status of each server of `addrs`, in that order, asked at once: an unreachable one
    /// costs one probe deadline, not one per server before it.
    pub async fn status_each(&self, addrs: &[String]) -> Vec<Result<pb::ServerStatus, ClientError>> {
        futures::future::join_all(addrs.iter().map(|a| self.status_on(a))).await
    }

    /// Whether the server at `addr` is ready (needs no token: load balancers ask it).
    pub async fn health_on(&self, addr: &str) -> Result<pb::HealthReply, ClientError> {
        let timeout = self.policy.probe_timeout;
        let h: pb::HealthReply = self
            .unary_on(addr, timeout, pb::Empty {}, |ch, r| async move {
                Cluster::admin(ch).health(r).await
            })
            .await?;
        self.note_role(addr, h.witness);
        Ok(h)
    }

    /// A single-use join token valid for `ttl_secs` (0: the servers' default).
    pub async fn join_token(&self, ttl_secs: u64) -> Result<String, ClientError> {
        let req = pb::JoinTokenRequest { ttl_secs };
        let reply = self
            .unary_write(req, |ch, r| async move { Cluster::admin(ch).join_token(r).await })
            .await?;
        Ok(reply.token)
    }

    /// Removes server `node_id` from the cluster; returns the servers that remain.
    pub async fn remove_server(&self, node_id: u64) -> Result<pb::ServerList, ClientError> {
        let req = pb::RemoveServerRequest { node_id };
        self.unary_write(req, |ch, r| async move { Cluster::admin(ch).remove_server(r).await })
            .await
    }

    /// Makes server `node_id` a witness or a data server (admin).
    pub async fn set_role(&self, node_id: u64, witness: bool) -> Result<pb::ServerList, ClientError> {
        let req = pb::SetRoleRequest { node_id, witness };
        self.unary_write(req, |ch, r| async move { Cluster::admin(ch).set_role(r).await })
            .await
    }

    pub async fn rotate_key(&self, req: pb::RotateKeyRequest) -> Result<pb::KeyList, ClientError> {
        self.unary_write(req, |ch, r| async move { Cluster::admin(ch).rotate_key(r).await })
            .await
    }

    /// Creates an account or changes its password or role.
    pub async fn put_user(&self, spec: pb::UserSpec) -> Result<(), ClientError> {
        self.unary_write(spec, |ch, r| async move { Cluster::admin(ch).put_user(r).await })
            .await
            .map(drop)
    }

    pub async fn remove_user(&self, name: &str) -> Result<(), ClientError> {
        let req = pb::UserName { name: name.into() };
        self.unary_write(req, |ch, r| async move { Cluster::admin(ch).remove_user(r).await })
            .await
            .map(drop)
    }

    /// Ends every token of `name` issued until now.
    pub async fn revoke_user(&self, name: &str) -> Result<(), ClientError> {
        let req = pb::UserName { name: name.into() };
        self.unary_write(req, |ch, r| async move { Cluster::admin(ch).revoke_user(r).await })
            .await
            .map(drop)
    }

    pub async fn list_users(&self) -> Result<pb::UserList, ClientError> {
        self.unary_read(None, pb::Empty {}, |ch, r| async move {
            Cluster::admin(ch).list_users(r).await
        })
        .await
    }

    /// Exchanges a user name and password for a token.
    pub async fn login(&self, req: pb::LoginRequest) -> Result<pb::LoginReply, ClientError> {
        self.unary(None, req, |ch, r| async move { Cluster::admin(ch).login(r).await })
            .await
    }

    /// Whom `token` (or the cluster's own token) speaks for, if the servers accept it.
    pub async fn who_am_i(&self, token: Option<&str>) -> Result<pb::WhoAmIReply, ClientError> {
        self.unary_read(token, pb::Empty {}, |ch, r| async move {
            Cluster::admin(ch).who_am_i(r).await
        })
        .await
    }
}
