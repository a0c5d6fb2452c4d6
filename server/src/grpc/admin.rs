//! The `Admin` service: volumes, membership and status. Changes need an admin token and run on
//! the leader; reads are answered locally.
use std::sync::Arc;
use std::time::Duration;

use codafs_common::join::JoinToken;
use codafs_proto::limits::MAX_REMOVE_NODES;
use codafs_proto::pb;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{
    convert, forward_request, internal, is_forwarded, on_leader, peer_node_id, refuse, require_peer, status, token_of,
    ErrorKind,
};
use crate::access::Caller;
use crate::fsm::{AccountRec, Actor, ApplyError, Command, Outcome, StateView, VolumeChanges, VolumeSpec};
use crate::node::{Node, NodeError};
use crate::raft::NodeInfo;

pub struct AdminService(pub Arc<Node>);

fn client(ch: Channel) -> pb::admin_client::AdminClient<Channel> {
    pb::admin_client::AdminClient::new(ch)
}

const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// Refuses an explicit write quorum that the cluster's data servers could never meet: it used
/// to be accepted and silently capped, so a volume asked to keep 3 copies kept 2. (0 asks for
/// the default, which is capped: a one-server development cluster still writes.)
fn check_write_quorum(node: &Node, quorum: u32) -> Result<(), NodeError> {
    let data = node.data_replicas().len();
    if quorum as usize > data {
        return Err(NodeError::Invalid(format!(
            "a write quorum of {quorum} needs {quorum} data servers; the cluster has {data} \
             (join more data servers first, or ask for at most {data})"
        )));
    }
    Ok(())
}

fn volume_reply(o: Outcome) -> Result<pb::VolumeInfo, NodeError> {
    match o {
        Outcome::Volume(v) => Ok(convert::volume_info(&v)),
        other => Err(NodeError::Internal(format!("unexpected outcome {other:?}"))),
    }
}

impl AdminService {
    /// An admin-only change: authenticate, build the command here (so passwords are hashed by
    /// the server that received them), and propose it on the leader (forwarding if needed).
    async fn leader_write<Req, T, B, D, F, Fut>(
        &self,
        req: Request<Req>,
        build: B,
        done: D,
        forward: F,
    ) -> Result<Response<T>, Status>
    where
        Req: Clone,
        B: FnOnce(Actor, &Req) -> Result<Command, NodeError>,
        D: Fn(Outcome) -> Result<T, NodeError>,
        F: Fn(pb::admin_client::AdminClient<Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        self.leader_write_as(req, Node::authenticate_admin, build, done, forward)
            .await
    }

    /// [`Self::leader_write`] for a change that `authenticate` decides who may ask for (the
    /// state machine still checks the actor's rights).
    async fn leader_write_as<Req, T, A, B, D, F, Fut>(
        &self,
        req: Request<Req>,
        authenticate: A,
        build: B,
        done: D,
        forward: F,
    ) -> Result<Response<T>, Status>
    where
        Req: Clone,
        A: FnOnce(&Node, Option<&str>) -> Result<Actor, NodeError>,
        B: FnOnce(Actor, &Req) -> Result<Command, NodeError>,
        D: Fn(Outcome) -> Result<T, NodeError>,
        F: Fn(pb::admin_client::AdminClient<Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let token = token_of(&req);
        let forwarded = is_forwarded(&self.0, &req)?;
        let body = req.into_inner();
        let node = &self.0;
        let actor = authenticate(node, token.as_deref()).map_err(status)?;
        let cmd = build(actor, &body).map_err(status)?;
        let local = || async { done(node.propose(cmd.clone()).await?) };
        let remote = |ch| {
            let r = forward_request(body.clone(), token.as_deref(), FORWARD_TIMEOUT);
            let f = forward(client(ch), r);
            async move { f.await.map(|r| r.into_inner()) }
        };
        Ok(Response::new(on_leader(node, forwarded, local, remote).await?))
    }

    /// The cluster record, if join token `join_key` may admit server `node_id` (as far as this
    /// replica knows; spending it on the leader decides).
    fn check_join_token(&self, join_key: &str, node_id: u64) -> Result<crate::fsm::ClusterRec, Status> {
        let t = self.0.tables();
        let cluster = t.cluster().map_err(internal)?.ok_or_else(|| {
            refuse(
                ErrorKind::Unavailable,
                "this server has not caught up with the cluster yet",
            )
        })?;
        let token = t.join_token(&crate::join::secret_hash(join_key)).map_err(internal)?;
        let removed = t.removed_server(node_id).map_err(internal)?.is_some();
        let now = codafs_common::now_ns();
        match crate::fsm::join_token_refusal(token.as_ref(), removed, node_id, now) {
            // Not a credential of this cluster at all (or one this replica has not applied yet:
            // joiners retry this answer a few times on other servers).
            Some(why) if token.is_none() && !removed => Err(status(NodeError::Unauthenticated(why))),
            Some(why) => Err(status(NodeError::Denied(why))),
            None => Ok(cluster),
        }
    }

    fn servers(&self) -> pb::ServerList {
        let servers = self
            .0
            .members()
            .into_iter()
            .map(|m| pb::ServerInfo {
                node_id: m.id,
                addr: m.info.addr,
                witness: m.info.witness,
                voter: m.voter,
            })
            .collect();
        pb::ServerList {
            servers,
            leader_id: self.0.leader().unwrap_or(0),
        }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().name))]
    async fn create_volume(&self, req: Request<pb::VolumeSpec>) -> Result<Response<pb::VolumeInfo>, Status> {
        let node = self.0.clone();
        self.leader_write(
            req,
            |actor, spec| {
                check_write_quorum(&node, spec.write_quorum)?;
                Ok(Command::CreateVolume {
                    spec: VolumeSpec {
                        name: spec.name.clone(),
                        owner: if spec.owner.is_empty() {
                            actor.user.clone()
                        } else {
                            spec.owner.clone()
                        },
                        quota_bytes: spec.quota_bytes,
                        quota_files: spec.quota_files,
                        write_quorum: spec.write_quorum,
                        public_read: spec.public_read,
                    },
                    actor,
                    now_ns: codafs_common::now_ns(),
                })
            },
            volume_reply,
            |mut c, r| async move { c.create_volume(r).await },
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().name))]
    async fn set_volume(&self, req: Request<pb::VolumeChanges>) -> Result<Response<pb::VolumeInfo>, Status> {
        let node = self.0.clone();
        self.leader_write(
            req,
            |actor, c| {
                if let Some(q) = c.write_quorum {
                    check_write_quorum(&node, q)?;
                }
                let changes = VolumeChanges {
                    owner: c.owner.clone(),
                    add_writers: c.add_writers.clone(),
                    remove_writers: c.remove_writers.clone(),
                    quota_bytes: c.quota_bytes,
                    quota_files: c.quota_files,
                    write_quorum: c.write_quorum,
                    public_read: c.public_read,
                };
                Ok(Command::SetVolume {
                    actor,
                    name: c.name.clone(),
                    changes,
                })
            },
            volume_reply,
            |mut c, r| async move { c.set_volume(r).await },
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(user = %req.get_ref().name))]
    async fn put_user(&self, req: Request<pb::UserSpec>) -> Result<Response<pb::Empty>, Status> {
        // Only an admin may make this server hash a password (argon2 is expensive); the hash is
        // made here, on the blocking pool within the argon2 bound, before the command exists.
        self.0.authenticate_admin(token_of(&req).as_deref()).map_err(status)?;
        let password = req.get_ref().password.clone();
        let password_hash = self
            .0
            .logins
            .argon2(move || crate::auth::hash_password(&password))
            .await
            .map_err(|e| refuse(ErrorKind::Busy, e.to_string()))?
            .map_err(|e| status(NodeError::Invalid(e.to_string())))?;
        self.leader_write(
            req,
            |actor, u| {
                let account = AccountRec {
                    name: u.name.clone(),
                    admin: u.admin,
                    password_hash,
                    created_ns: codafs_common::now_ns(),
                };
                Ok(Command::PutAccount {
                    actor,
                    account,
                    create: u.create,
                })
            },
            |_| Ok(pb::Empty {}),
            |mut c, r| async move { c.put_user(r).await },
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().name))]
    async fn delete_volume(&self, req: Request<pb::VolumeName>) -> Result<Response<pb::Empty>, Status> {
        let node = &self.0;
        self.leader_write(
            req,
            |actor, v| {
                check_delete_bound(node, &v.name)?;
                Ok(Command::DeleteVolume {
                    actor,
                    name: v.name.clone(),
                    now_ns: codafs_common::now_ns(),
                })
            },
            |_| Ok(pb::Empty {}),
            |mut c, r| async move { c.delete_volume(r).await },
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(user = %req.get_ref().name))]
    async fn remove_user(&self, req: Request<pb::UserName>) -> Result<Response<pb::Empty>, Status> {
        self.leader_write(
            req,
            |actor, u| {
                Ok(Command::RemoveAccount {
                    actor,
                    name: u.name.clone(),
                })
            },
            |_| Ok(pb::Empty {}),
            |mut c, r| async move { c.remove_user(r).await },
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(user = %req.get_ref().name))]
    async fn revoke_user(&self, req: Request<pb::UserName>) -> Result<Response<pb::Empty>, Status> {
        // Any valid token may ask; the state machine lets admins revoke anyone's tokens and
        // users only their own.
        self.leader_write_as(
            req,
            |node, token| {
                let c = node.authenticate(token)?;
                Ok(Actor {
                    admin: c.role == codafs_common::token::Role::Admin,
                    user: c.user,
                })
            },
            |actor, u| {
                Ok(Command::RevokeTokens {
                    actor,
                    name: u.name.clone(),
                })
            },
            |_| Ok(pb::Empty {}),
            |mut c, r| async move { c.revoke_user(r).await },
        )
        .await
    }

    #[tracing::instrument(skip_all)]
    async fn rotate_key(&self, req: Request<pb::RotateKeyRequest>) -> Result<Response<pb::KeyList>, Status> {
        let node = self.0.clone();
        self.leader_write(
            req,
            // The new key is drawn by the server that received the request.
            |actor, r| {
                Ok(Command::RotateKey {
                    actor,
                    new_key: r.add.then(rand::random::<[u8; 32]>),
                    retire: r.retire,
                })
            },
            move |_| {
                let c = node
                    .tables()
                    .cluster()
                    .map_err(|e| NodeError::Internal(e.to_string()))?;
                let keys = c.map(|c| {
                    (
                        c.keys.iter().map(|(id, _)| *id).collect(),
                        c.current_key().map_or(0, |(id, _)| id),
                    )
                });
                let (key_ids, current) = keys.unwrap_or_default();
                Ok(pb::KeyList { key_ids, current })
            },
            |mut c, r| async move { c.rotate_key(r).await },
        )
        .await
    }

    async fn list_users(&self, req: Request<pb::Empty>) -> Result<Response<pb::UserList>, Status> {
        self.0.authenticate_admin(token_of(&req).as_deref()).map_err(status)?;
        let accounts = self.0.tables().accounts().map_err(internal)?;
        let users = accounts
            .into_iter()
            .map(|a| pb::UserInfo {
                has_password: !a.password_hash.is_empty(),
                name: a.name,
                admin: a.admin,
                created_ns: a.created_ns,
            })
            .collect();
        Ok(Response::new(pb::UserList { users }))
    }

    /// Exchanges a password for a token. Answered by the server that receives it (no leader
    /// needed). Rate-limited per address and per account name, and bounded in argon2 work; an
    /// unknown account costs the same argon2 verification as a known one.
    #[tracing::instrument(skip_all)]
    async fn login(&self, req: Request<pb::LoginRequest>) -> Result<Response<pb::LoginReply>, Status> {
        let addr = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        // Before anything logs the name or hashes the password: no account has a longer name,
        // and no password set here is longer, so neither can match (and a request of tens of
        // MiB must not become a log line or an argon2 input).
        if r.user.len() > codafs_common::names::MAX_NAME_BYTES || r.password.len() > crate::auth::MAX_PASSWORD {
            tracing::info!(
                ?addr,
                user_bytes = r.user.len(),
                password_bytes = r.password.len(),
                "login refused: user name or password too long"
            );
            return Err(status(NodeError::Unauthenticated("wrong user name or password".into())));
        }
        let node = &self.0;
        let t = node.tables();
        let cluster = t
            .cluster()
            .map_err(internal)?
            .ok_or_else(|| refuse(ErrorKind::Unavailable, "cluster is not bootstrapped yet"))?;
        let exhausted = |e: crate::auth::LimitError| {
            tracing::info!(user = %r.user, ?addr, "login refused: {e}");
            refuse(ErrorKind::Busy, e.to_string())
        };
        let attempt = node.logins.admit(&r.user, addr).map_err(exhausted)?;
        // A name no account can have is looked up like any other: not found.
        let account = match codafs_common::names::validate_name(&r.user) {
            Ok(()) => t.account(&r.user).map_err(internal)?,
            Err(_) => None,
        };
        // Read with the account, so a token never carries a generation older than the password
        // it was checked against.
        let generation = t.token_generation(&r.user).map_err(internal)?;
        let checked = account.clone();
        let password = r.password;
        let ok = node
            .logins
            .argon2(move || crate::auth::password_matches(checked.as_ref(), &password))
            .await
            .map_err(exhausted)?;
        let account = match (ok, account) {
            (true, Some(a)) => a,
            _ => {
                tracing::info!(user = %r.user, ?addr, "login refused: wrong user name or password");
                return Err(status(NodeError::Unauthenticated("wrong user name or password".into())));
            }
        };
        node.logins.succeeded(attempt);
        let (token, expires) =
            crate::auth::issue_token(&account, &cluster, r.ttl_secs, generation).map_err(internal)?;
        Ok(Response::new(pb::LoginReply { token, expires }))
    }

    async fn who_am_i(&self, req: Request<pb::Empty>) -> Result<Response<pb::WhoAmIReply>, Status> {
        let claims = self.0.authenticate(token_of(&req).as_deref()).map_err(status)?;
        Ok(Response::new(pb::WhoAmIReply {
            admin: claims.role == codafs_common::token::Role::Admin,
            user: claims.user,
            expires: claims.expires,
        }))
    }

    /// The volumes the caller may read: public ones, plus with a token those it owns or writes
    /// (an admin sees all). A bad token is refused rather than silently shown less.
    async fn list_volumes(&self, req: Request<pb::Empty>) -> Result<Response<pb::VolumeList>, Status> {
        let caller = Caller::of(&self.0, &req);
        if let Some(t) = caller.token.as_deref() {
            self.0.authenticate(Some(t)).map_err(status)?;
        }
        let vols = self.0.tables().volumes().map_err(internal)?;
        Ok(Response::new(pb::VolumeList {
            volumes: vols
                .iter()
                .filter(|v| self.0.may_read(&caller, v))
                .map(convert::volume_info)
                .collect(),
        }))
    }

    async fn get_volume(&self, req: Request<pb::VolumeName>) -> Result<Response<pb::VolumeInfo>, Status> {
        let caller = Caller::of(&self.0, &req);
        let v = self.0.volume_named(&req.get_ref().name)?;
        self.0.check_read(&caller, &v)?;
        let mut info = convert::volume_info(&v);
        // The addresses of the nodes that follow it: for those who run the volume (its owner,
        // writers, admins), not for every reader of a public site.
        if self.0.check_runs(&caller, &v).is_ok() {
            info.subscribers = self
                .0
                .subscribers
                .of(&v.name)
                .into_iter()
                .map(|s| pb::Subscriber {
                    peer: s.peer,
                    since_ns: s.since_ns,
                })
                .collect();
        }
        Ok(Response::new(info))
    }

    async fn servers(&self, req: Request<pb::Empty>) -> Result<Response<pb::ServerList>, Status> {
        self.0.check_known(&Caller::of(&self.0, &req))?;
        Ok(Response::new(self.servers()))
    }

    async fn status(&self, req: Request<pb::Empty>) -> Result<Response<pb::ServerStatus>, Status> {
        self.0.check_known(&Caller::of(&self.0, &req))?;
        Ok(Response::new(self.0.status()))
    }

    /// Answered to anyone: whether this server can serve (for load balancers' health checks).
    async fn health(&self, _req: Request<pb::Empty>) -> Result<Response<pb::HealthReply>, Status> {
        let cluster = self.0.tables().cluster().ok().flatten();
        Ok(Response::new(pb::HealthReply {
            ready: cluster.is_some() && self.0.leader().is_some(),
            witness: self.0.is_witness(),
            cluster_id: cluster.map(|c| c.cluster_id).unwrap_or_default(),
        }))
    }

    /// Adds a server that holds an unspent join token, spending it (on the leader) first. Over
    /// TLS the caller must present the certificate issued to the node id it joins as.
    #[tracing::instrument(skip_all, fields(node = req.get_ref().node_id, addr = %req.get_ref().addr))]
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let forwarded = is_forwarded(&self.0, &req)?;
        let caller_node = peer_node_id(&req);
        let r = req.into_inner();
        let node = &self.0;
        if r.node_id == 0 || r.addr.is_empty() {
            return Err(refuse(ErrorKind::Invalid, "join needs a node id and an address"));
        }
        let cluster = self.check_join_token(&r.join_key, r.node_id)?;
        if !forwarded && !node.cfg.insecure && caller_node != Some(r.node_id) {
            return Err(refuse(
                ErrorKind::Denied,
                format!(
                    "a joining server must present the certificate issued to node {} (from JoinCredentials)",
                    r.node_id
                ),
            ));
        }
        let secret_hash = crate::join::secret_hash(&r.join_key);
        let local = || async {
            let spend = Command::UseJoinToken {
                secret_hash,
                node_id: r.node_id,
                now_ns: codafs_common::now_ns(),
            };
            node.propose(spend).await?;
            node.add_server(
                r.node_id,
                NodeInfo {
                    addr: r.addr.clone(),
                    witness: r.witness,
                },
            )
            .await?;
            Ok(pb::JoinReply {
                cluster_id: cluster.cluster_id.clone(),
                leader_id: node.id,
            })
        };
        let remote = |ch| {
            let fr = forward_request(r.clone(), None, Duration::from_secs(120));
            async move { client(ch).join(fr).await.map(|r| r.into_inner()) }
        };
        Ok(Response::new(on_leader(node, forwarded, local, remote).await?))
    }

    /// Makes a single-use join token valid for `ttl_secs` (default one hour). The secret is drawn
    /// here; the cluster records only its hash.
    async fn join_token(&self, req: Request<pb::JoinTokenRequest>) -> Result<Response<pb::JoinTokenReply>, Status> {
        let ttl = match req.get_ref().ttl_secs {
            0 => crate::join::DEFAULT_TOKEN_TTL,
            n => Duration::from_secs(n),
        };
        if ttl > crate::join::MAX_TOKEN_TTL {
            return Err(refuse(
                ErrorKind::Invalid,
                format!(
                    "a join token may live at most {} hours",
                    crate::join::MAX_TOKEN_TTL.as_secs() / 3600
                ),
            ));
        }
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let secret_hash = crate::join::secret_hash(&secret);
        let now_ns = codafs_common::now_ns();
        let expires_ns = now_ns.saturating_add(i64::try_from(ttl.as_nanos()).unwrap_or(i64::MAX));
        let node = self.0.clone();
        self.leader_write(
            req,
            |actor, _| {
                Ok(Command::IssueJoinToken {
                    actor,
                    secret_hash,
                    expires_ns,
                    now_ns,
                })
            },
            move |_| {
                let cluster = node
                    .tables()
                    .cluster()
                    .map_err(|e| NodeError::Internal(e.to_string()))?
                    .ok_or_else(|| NodeError::Unavailable("cluster is not bootstrapped yet".into()))?;
                let token = JoinToken {
                    cluster_id: cluster.cluster_id,
                    join_key: secret.clone(),
                    servers: node.members().into_iter().map(|m| m.info.addr).collect(),
                    ca_cert: node.tls.as_ref().map(|t| t.ca_cert_pem.clone()).unwrap_or_default(),
                    insecure: node.cfg.insecure,
                    expires: u64::try_from(expires_ns / 1_000_000_000).unwrap_or(0),
                };
                Ok(pb::JoinTokenReply { token: token.encode() })
            },
            |mut c, r| async move { c.join_token(r).await },
        )
        .await
    }

    /// Signs the certificate of a server about to join (before it is added: the leader dials a
    /// new member over mutual TLS right away), over the public key of its signing request and
    /// for the node id it will join as. Only a server holding the CA key can answer; the others
    /// say so and the joiner asks the next server of its token. The CA key never leaves.
    #[tracing::instrument(skip_all, fields(node = req.get_ref().node_id, addr = %req.get_ref().addr))]
    async fn join_credentials(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinCredentialsReply>, Status> {
        let r = req.into_inner();
        if r.node_id == 0 || r.addr.is_empty() {
            return Err(refuse(ErrorKind::Invalid, "join needs a node id and an address"));
        }
        let cluster = self.check_join_token(&r.join_key, r.node_id)?;
        if self.0.members().iter().any(|m| m.id == r.node_id) {
            return Err(refuse(
                ErrorKind::Denied,
                format!(
                    "server {} is already a member; a joiner needs a node id of its own",
                    r.node_id
                ),
            ));
        }
        let Some(tls) = &self.0.tls else {
            return Err(refuse(
                ErrorKind::Invalid,
                "this cluster runs without TLS (--insecure): there are no certificates to hand out",
            ));
        };
        let Some(ca) = tls.signer() else {
            return Err(refuse(
                ErrorKind::Unavailable,
                "this server does not hold the cluster CA key, so it cannot sign certificates (see docs/SECURITY.md)",
            ));
        };
        if r.csr_pem.is_empty() {
            return Err(refuse(
                ErrorKind::Invalid,
                "no certificate signing request: the joining server is older than this cluster; upgrade it",
            ));
        }
        let cert_pem = crate::tls::sign_csr(&ca, r.node_id, &r.addr, &r.csr_pem)
            .map_err(|e| refuse(ErrorKind::Invalid, e.to_string()))?;
        tracing::info!("signed the certificate of a joining server");
        Ok(Response::new(pb::JoinCredentialsReply {
            cluster_id: cluster.cluster_id,
            ca_cert_pem: ca.cert_pem,
            ca_key_pem: String::new(),
            cert_pem,
        }))
    }

    /// Signs a new certificate for the calling server (`codafs server --rotate-cert`), for the
    /// node id its current certificate names; that node must be a current member.
    #[tracing::instrument(skip_all)]
    async fn renew_certificate(
        &self,
        req: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateReply>, Status> {
        require_peer(&self.0, &req, "certificate renewals")?;
        let node = &self.0;
        let (Some(tls), Some(id)) = (&node.tls, peer_node_id(&req)) else {
            return Err(refuse(
                ErrorKind::Invalid,
                "this cluster runs without TLS (--insecure): there are no certificates to renew",
            ));
        };
        let Some(ca) = tls.signer() else {
            return Err(refuse(
                ErrorKind::Unavailable,
                "this server does not hold the cluster CA key, so it cannot sign certificates (see docs/SECURITY.md)",
            ));
        };
        let addr = node.addr_of(id).unwrap_or_default();
        let cert_pem = crate::tls::sign_csr(&ca, id, &addr, &req.get_ref().csr_pem)
            .map_err(|e| refuse(ErrorKind::Invalid, e.to_string()))?;
        tracing::info!(node = id, "signed a renewed certificate");
        Ok(Response::new(pb::RenewCertificateReply { cert_pem }))
    }

    /// Removes a server, first recording that its node id may never join again. Its certificate
    /// is refused by every peer-only call as soon as the membership change is applied.
    async fn remove_server(&self, req: Request<pb::RemoveServerRequest>) -> Result<Response<pb::ServerList>, Status> {
        let token = token_of(&req);
        let forwarded = is_forwarded(&self.0, &req)?;
        let r = req.into_inner();
        let node = &self.0;
        let actor = node.authenticate_admin(token.as_deref()).map_err(status)?;
        let local = || async {
            // Refused removals record nothing (the id would be barred for good).
            node.check_removable(r.node_id)?;
            let forget = Command::ForgetServer {
                actor: actor.clone(),
                node_id: r.node_id,
                now_ns: codafs_common::now_ns(),
            };
            node.propose(forget).await?;
            node.remove_server(r.node_id).await?;
            Ok(self.servers())
        };
        let remote = |ch| {
            let fr = forward_request(r, token.as_deref(), FORWARD_TIMEOUT);
            async move { client(ch).remove_server(fr).await.map(|r| r.into_inner()) }
        };
        Ok(Response::new(on_leader(node, forwarded, local, remote).await?))
    }

    /// Makes a server a witness or a data replica (`Node::set_role`; the server itself follows,
    /// see `role`).
    async fn set_role(&self, req: Request<pb::SetRoleRequest>) -> Result<Response<pb::ServerList>, Status> {
        let token = token_of(&req);
        let forwarded = is_forwarded(&self.0, &req)?;
        let r = req.into_inner();
        let node = &self.0;
        node.authenticate_admin(token.as_deref()).map_err(status)?;
        let local = || async {
            node.set_role(r.node_id, r.witness).await?;
            Ok(self.servers())
        };
        let remote = |ch| {
            let fr = forward_request(r, token.as_deref(), FORWARD_TIMEOUT);
            async move { client(ch).set_role(fr).await.map(|r| r.into_inner()) }
        };
        Ok(Response::new(on_leader(node, forwarded, local, remote).await?))
    }
}

/// Refuses to delete a volume of more than [`MAX_REMOVE_NODES`] nodes, as a recursive remove of
/// that many is refused (`fsm::bounds`): the state machine drops every node of the volume in
/// one apply, in memory and in one write batch, while no other commit applies, so a volume of
/// millions of files could exhaust every replica's memory at the same log entry, again at each
/// restart. Checked where the command is built: on the leader (a follower's check may lag; the
/// leader checks the forwarded request again), not by the state machine.
fn check_delete_bound(node: &Node, name: &str) -> Result<(), NodeError> {
    let vol = node
        .tables()
        .volume(name)
        .map_err(|e| NodeError::Internal(format!("reading volume {name}: {e}")))?;
    match vol {
        Some(v) if v.used_files > MAX_REMOVE_NODES as u64 => Err(NodeError::Refused(ApplyError::Invalid(format!(
            "volume {name} holds {} files and directories, and a delete removes at most {MAX_REMOVE_NODES} at \
             once: empty it first (`find /coda/{name} -mindepth 1 -delete` on a writable mount removes in bounded \
             commits), then delete it",
            v.used_files
        )))),
        _ => Ok(()),
    }
}
