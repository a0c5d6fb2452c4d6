//! The `Write` service: atomic commits, proposed on the leader after the referenced blobs are
//! known to have reached their write quorum.
use std::sync::Arc;
use std::time::Duration;

use codafs_common::token::Role;
use codafs_proto::limits::{MAX_COMMIT_OPS, MAX_REMOVE_NODES};
use codafs_proto::pb;
use tonic::{Request, Response, Status};

use super::{convert, forward_request, is_forwarded, on_leader, status, token_of};
use crate::fsm::bounds::CheckError;
use crate::fsm::cost;
use crate::fsm::{Actor, Command, Outcome, StateView, MAX_RESERVE};
use crate::node::{Node, NodeError};

pub struct WriteService(pub Arc<Node>);

/// Refuses a commit without a valid token (or with a forwarding claim from a non-server) from
/// its headers, before tonic reads its message (up to `MAX_MESSAGE`): the handler makes the
/// same checks first, but only once the whole message is buffered, which anyone who can reach
/// the server could otherwise make it hold.
pub fn signed_only(node: Arc<Node>) -> impl tonic::service::Interceptor + Clone {
    move |req: Request<()>| {
        is_forwarded(&node, &req)?;
        node.authenticate(token_of(&req).as_deref()).map_err(status)?;
        Ok(req)
    }
}

async fn commit_local(
    node: &Arc<Node>,
    token: Option<&str>,
    body: &pb::CommitRequest,
) -> Result<pb::CommitReply, NodeError> {
    let claims = node.authenticate(token)?;
    let actor = Actor {
        user: claims.user.clone(),
        admin: claims.role == Role::Admin,
    };
    if body.ops.len() > MAX_COMMIT_OPS {
        return Err(NodeError::Invalid(format!(
            "{} operations in one commit; the limit is {MAX_COMMIT_OPS}",
            body.ops.len()
        )));
    }
    // Each Reserve may set aside up to MAX_RESERVE node ids; many in one commit would use up a
    // volume's 2^40 ids in a few dozen commits, after which nothing could be created in it.
    let reserved: u64 = body
        .ops
        .iter()
        .filter_map(|o| match &o.op {
            Some(pb::op::Op::Reserve(r)) => Some(u64::from(r.count)),
            _ => None,
        })
        .sum();
    if reserved > u64::from(MAX_RESERVE) {
        return Err(NodeError::Invalid(format!(
            "{reserved} node ids reserved in one commit; the limit is {MAX_RESERVE}"
        )));
    }
    let ops = body
        .ops
        .iter()
        .cloned()
        .map(convert::op)
        .collect::<Result<Vec<_>, Status>>()
        .map_err(|s| NodeError::Invalid(s.message().to_string()))?;
    let vol = node
        .tables()
        .volume(&body.volume)
        .map_err(|e| NodeError::Internal(e.to_string()))?
        .ok_or_else(|| NodeError::Refused(crate::fsm::ApplyError::NoSuchVolume(body.volume.clone())))?;
    // Checked here as well as in the state machine: before the blob checks and manifest
    // fetches below (work on every replica, and a fresh GC grace for each blob named) and
    // before a request id's earlier outcome is told to someone who may not write here.
    if !crate::access::may_write(&claims, &vol) {
        return Err(NodeError::Refused(crate::fsm::ApplyError::Denied(format!(
            "{} may not write volume {}",
            actor.user, body.volume
        ))));
    }
    let request = match body.request_id.len() {
        0 => None,
        16 => body.request_id.as_ref().try_into().ok(),
        n => return Err(NodeError::Invalid(format!("request id is {n} bytes; it must be 16"))),
    };
    if let Some(id) = &request {
        // Already applied (a retry): answer as the first time before anything else can fail.
        if let Some(done) = node
            .tables()
            .request(id)
            .map_err(|e| NodeError::Internal(e.to_string()))?
        {
            return Ok(pb::CommitReply {
                version: done.index,
                created: done.created,
                prior: Vec::new(),
            });
        }
    }
    check_space(node, body)?;
    let mut blobs: Vec<_> = ops.iter().filter_map(|o| o.referenced_blob()).collect();
    blobs.sort();
    blobs.dedup();
    node.check_blob_copies(&blobs, vol.write_quorum).await?;
    let recursive = ops
        .iter()
        .any(|o| matches!(o.kind, crate::fsm::OpKind::Remove { recursive: true, .. }));
    let costly = cost::reads_bound(&ops) > cost::APPLY_READS;
    let checked = recursive || costly;
    // A commit checked against the state holds its volume's lock alone until it is applied,
    // after everything proposed before it is applied here: the apply then reads what the check
    // read (see `fsm::bounds` and `fsm::cost`).
    let lock = node.commit_lock(&body.volume);
    let (held, checked_in) = if checked {
        let alone = lock.write_owned().await;
        node.raft
            .ensure_linearizable()
            .await
            .map_err(|e| NodeError::Unavailable(format!("waiting for earlier commits to apply: {e}")))?;
        let term = node.leading_term().ok_or_else(leadership_moved)?;
        if recursive {
            check_remove_bound(node, &vol, &ops).await?;
        }
        ((None, Some(alone)), Some(term))
    } else {
        ((Some(lock.read_owned().await), None), None)
    };
    let cmd = Command::Commit {
        actor,
        volume: body.volume.clone(),
        ops,
        expect_volume_version: body.expect_volume_version,
        now_ns: codafs_common::now_ns(),
        request,
    };
    // Still under the lock taken alone (`costly` is part of `checked`).
    if costly {
        check_apply_cost(node, &cmd).await?;
    }
    // Proposed by a task of its own that holds the lock: a request cancelled meanwhile (its
    // deadline passed, its caller went) leaves an entry that may still commit, and the lock
    // must stay taken until it has.
    let proposer = node.clone();
    let proposed = tokio::spawn(async move {
        let _held = held;
        // A checked commit goes only in the term it was checked in: had this server lost and
        // won back its leadership meanwhile, another leader's commits could have come between
        // the check and the apply. What is left is the moment between this look and the
        // proposal reaching the Raft core, too short for an election.
        if checked_in.is_some() && proposer.leading_term() != checked_in {
            return Err(leadership_moved());
        }
        proposer.propose(cmd).await
    });
    match proposed
        .await
        .map_err(|e| NodeError::Internal(format!("proposing a commit: {e}")))??
    {
        Outcome::Committed {
            version,
            created,
            prior,
        } => Ok(pb::CommitReply {
            version,
            created,
            prior,
        }),
        other => Err(NodeError::Internal(format!("unexpected outcome {other:?}"))),
    }
}

/// The refusal of a checked commit whose server stopped leading, or started a new term, before
/// it was proposed: nothing was proposed, so the client may send it again.
fn leadership_moved() -> NodeError {
    NodeError::Unavailable("this server's Raft leadership changed while the commit was checked; send it again".into())
}

/// Refuses a commit whose recursive removes would delete more than [`MAX_REMOVE_NODES`] nodes
/// (see `fsm::bounds`). The count reads up to that many records: off the async workers.
async fn check_remove_bound(node: &Node, vol: &crate::fsm::VolumeRec, ops: &[crate::fsm::Op]) -> Result<(), NodeError> {
    use crate::fsm::OpKind;
    // Renames too: a tree renamed first may be removed under its new name.
    let counted =
        |o: &&crate::fsm::Op| matches!(o.kind, OpKind::Remove { recursive: true, .. } | OpKind::Rename { .. });
    let removes: Vec<crate::fsm::Op> = ops.iter().filter(counted).cloned().collect();
    let (tables, vol) = (node.tables().clone(), vol.clone());
    tokio::task::spawn_blocking(move || {
        crate::fsm::bounds::check_remove_bound(&tables, &vol, &removes, MAX_REMOVE_NODES)
    })
    .await
    .map_err(|e| NodeError::Internal(format!("counting a recursive remove: {e}")))?
    .map_err(|e| match e {
        CheckError::Refused(a) => NodeError::Refused(a),
        CheckError::Store(s) => NodeError::Internal(s.to_string()),
    })
}

/// Refuses a commit whose apply would read more than [`cost::APPLY_READS`] records, found by
/// applying it to a scratch overlay of this server's state (see `fsm::cost`). Off the async
/// workers: it reads up to that many records.
async fn check_apply_cost(node: &Node, cmd: &Command) -> Result<(), NodeError> {
    let (tables, cmd, index) = (node.tables().clone(), cmd.clone(), node.applied_index() + 1);
    let within = tokio::task::spawn_blocking(move || cost::within(&tables, index, &cmd, cost::APPLY_READS))
        .await
        .map_err(|e| NodeError::Internal(format!("measuring a commit's apply: {e}")))?
        .map_err(|e| NodeError::Internal(e.to_string()))?;
    if within {
        return Ok(());
    }
    Err(NodeError::Refused(crate::fsm::ApplyError::Invalid(format!(
        "this commit would read more than {} records when applied (each directory rename walks up to \
         the volume root, each path its components): send it as several smaller commits",
        cost::APPLY_READS
    ))))
}

/// Refuses a commit that adds data while this server's disk is below its free-space watermark
/// (checked where a commit arrives and again on the leader). Commits that only remove pass, so
/// an operator can always free space.
fn check_space(node: &Node, body: &pb::CommitRequest) -> Result<(), NodeError> {
    if crate::blobs::space::only_removes(&body.ops) {
        return Ok(());
    }
    // A retry of a commit already applied is answered as the first time (see `commit_local`).
    let applied = <[u8; 16]>::try_from(body.request_id.as_ref())
        .ok()
        .is_some_and(|id| node.tables().request(&id).ok().flatten().is_some());
    if applied {
        return Ok(());
    }
    Ok(node.space.check_commit()?)
}

#[tonic::async_trait]
impl pb::write_server::Write for WriteService {
    #[tracing::instrument(skip_all, fields(volume = %req.get_ref().volume, ops = req.get_ref().ops.len()))]
    async fn commit(&self, req: Request<pb::CommitRequest>) -> Result<Response<pb::CommitReply>, Status> {
        let token = token_of(&req);
        let forwarded = is_forwarded(&self.0, &req)?;
        let body = req.into_inner();
        let node = &self.0;
        // Refuse bad tokens here rather than after a forward: same answer, one hop sooner.
        node.authenticate(token.as_deref()).map_err(status)?;
        check_space(node, &body).map_err(status)?;
        let reply = on_leader(
            node,
            forwarded,
            || commit_local(node, token.as_deref(), &body),
            |ch| {
                let r = forward_request(body.clone(), token.as_deref(), Duration::from_secs(60));
                async move {
                    let mut c = pb::write_client::WriteClient::new(ch)
                        .max_decoding_message_size(codafs_proto::limits::MAX_MESSAGE)
                        .max_encoding_message_size(codafs_proto::limits::MAX_MESSAGE);
                    c.commit(r).await.map(|r| r.into_inner())
                }
            },
        )
        .await?;
        // Read-your-writes: the client prefers the server that answered, so answer only once
        // this replica has applied the commit (a follower usually has within a heartbeat).
        if !node.wait_applied(reply.version, Duration::from_secs(5)).await {
            tracing::warn!(version = reply.version, "committed, but not yet applied here after 5 s");
        }
        Ok(Response::new(reply))
    }
}
