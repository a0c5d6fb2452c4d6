//! The commit-time check that the blobs a commit references have W durable copies: the
//! leader asks every data replica which of them it lacks (`Blobs.Missing`), and counts. Hints
//! that witnesses hold for data replicas that are down count too, beside at least one data
//! copy (see `handoff`).
//!
//! Content over `chunks::CHUNK_THRESHOLD` bytes is named by a chunk manifest: the check first
//! makes sure the manifest is one and describes the declared size, then counts copies of the
//! manifest and of every chunk it lists. A large file lists many chunks, so blobs are checked
//! in rounds of at most [`ROUND`]: memory and each query stay bounded whatever a commit names.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use codafs_common::chunks::is_chunked;
use codafs_common::Hash;
use codafs_proto::limits::MAX_MISSING_QUERY;
use codafs_proto::pb;

use crate::blobs::asked::Held;
use crate::node::{Member, Node, NodeError};

/// How long a replica is given to say which blobs of a round it lacks.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// Most distinct blobs one round of the check holds and asks each replica about.
const ROUND: usize = MAX_MISSING_QUERY;

/// The blobs of one round, by hash, with the size each must have.
#[derive(Default)]
struct Round {
    blobs: BTreeMap<Hash, u64>,
}

impl Round {
    /// Adds a blob; the same hash declared with two sizes cannot both be right.
    fn add(&mut self, hash: Hash, size: u64) -> Result<(), NodeError> {
        match self.blobs.insert(hash, size) {
            Some(other) if other != size => Err(NodeError::Invalid(format!(
                "blob {hash} is declared both as {other} and as {size} bytes"
            ))),
            _ => Ok(()),
        }
    }

    fn full(&self) -> bool {
        self.blobs.len() >= ROUND
    }
}

/// Where to ask and how many copies each blob needs.
struct Quorum {
    replicas: Vec<Member>,
    witnesses: Vec<Member>,
    need: usize,
}

/// Copies of one blob found so far.
#[derive(Debug, Default, Clone, Copy)]
struct Found {
    data: usize,
    hints: usize,
}

impl Found {
    /// Copies that count toward the quorum: hints only beside a data copy.
    fn counted(self) -> usize {
        if self.data == 0 {
            0
        } else {
            self.data + self.hints
        }
    }
}

impl Node {
    /// Checks that every blob a commit references has reached the volume's write quorum, and
    /// that declared sizes match the stored content on every replica that holds a copy (a
    /// commit that lied about a size would be charged against quota wrongly). For chunked
    /// content (by its declared size) that is the manifest and each of its chunks, after the
    /// manifest is found valid and of the declared size. What each replica counts as held, and
    /// what asking does to a blob's GC grace, is `blobs::asked`'s.
    pub async fn check_blob_copies(
        self: &Arc<Self>,
        blobs: &[(Hash, u64)],
        write_quorum: u32,
    ) -> Result<(), NodeError> {
        if blobs.is_empty() {
            return Ok(());
        }
        let replicas = self.data_replicas();
        let need = crate::blobs::quorum::effective_write_quorum(write_quorum, replicas.len());
        let quorum = Quorum {
            replicas,
            witnesses: self.witnesses(),
            need,
        };
        let mut round = Round::default();
        let whole = blobs.iter().filter(|(_, size)| !is_chunked(*size));
        let chunked = blobs.iter().filter(|(_, size)| is_chunked(*size));
        for &(hash, size) in whole {
            self.add_to_round(&quorum, &mut round, hash, size).await?;
        }
        for &(hash, size) in chunked {
            let m = self.commit_manifest(&hash, size, need).await?;
            self.add_to_round(&quorum, &mut round, hash, m.len).await?;
            for c in &m.manifest.chunks {
                self.add_to_round(&quorum, &mut round, c.hash, u64::from(c.len)).await?;
            }
        }
        self.count_copies(&quorum, std::mem::take(&mut round)).await
    }

    /// Adds a blob to the round, checking the round first when it is full.
    async fn add_to_round(
        self: &Arc<Self>,
        q: &Quorum,
        round: &mut Round,
        hash: Hash,
        size: u64,
    ) -> Result<(), NodeError> {
        if round.full() {
            self.count_copies(q, std::mem::take(round)).await?;
        }
        round.add(hash, size)
    }

    /// The manifest that content of `size` bytes names, refused unless it is a manifest of
    /// exactly that size. Fetched from a peer when this server lacks it.
    async fn commit_manifest(
        &self,
        hash: &Hash,
        size: u64,
        need: usize,
    ) -> Result<std::sync::Arc<crate::blobs::manifests::ManifestEntry>, NodeError> {
        let m = match self.manifest_anywhere(hash).await {
            Ok(m) => m,
            Err(NodeError::Invalid(why)) => {
                return Err(NodeError::Invalid(format!(
                    "content of {size} bytes is stored in chunks; {why}"
                )))
            }
            Err(NodeError::NotFound(_)) => {
                return Err(NodeError::NotEnoughCopies {
                    hash: *hash,
                    have: 0,
                    need,
                })
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = m.manifest.check_cut() {
            return Err(NodeError::Invalid(format!("manifest {hash}: {e}")));
        }
        if m.size != size {
            return Err(NodeError::Invalid(format!(
                "manifest {hash} describes {} bytes, the file declares {size}",
                m.size
            )));
        }
        Ok(m)
    }

    /// Counts the copies of one round's blobs on every data replica, and the hints witnesses
    /// hold; refuses unless each has `need` (see [`Found::counted`]).
    async fn count_copies(self: &Arc<Self>, q: &Quorum, round: Round) -> Result<(), NodeError> {
        if round.blobs.is_empty() {
            return Ok(());
        }
        let round_sizes = round.blobs;
        let blobs: Vec<(Hash, u64)> = round_sizes.iter().map(|(h, s)| (*h, *s)).collect();
        let mut have: HashMap<Hash, Found> = blobs.iter().map(|(h, _)| (*h, Found::default())).collect();
        let mut failures = Vec::new();
        let mut queries = Vec::new();
        let holders = q.replicas.iter().map(|m| (m, false));
        let holders = holders.chain(q.witnesses.iter().map(|m| (m, true)));
        let count = |f: &mut Found, hint: bool| {
            if hint {
                f.hints += 1
            } else {
                f.data += 1
            }
        };
        let mut wrong: Vec<(Hash, String)> = Vec::new();
        for (m, hint) in holders {
            if m.id == self.id {
                let (held, other_size) = self.held_here(&blobs).await?;
                for h in held {
                    if let Some(f) = have.get_mut(&h) {
                        count(f, hint);
                    }
                }
                wrong.extend(other_size.into_iter().map(|h| (h, m.info.addr.clone())));
                continue;
            }
            let peers = self.peers.clone();
            let addr = m.info.addr.clone();
            let asked_blobs = blobs.clone();
            queries.push(async move {
                let (mut missing, mut wrong_size) = (Vec::new(), Vec::new());
                let answer = |r| (r, hint);
                for chunk in asked_blobs.chunks(MAX_MISSING_QUERY) {
                    let wire = chunk.iter().map(|(h, _)| bytes::Bytes::copy_from_slice(&h.0)).collect();
                    let sizes = chunk.iter().map(|(_, s)| *s).collect();
                    let mut c = match peers.blobs(&addr) {
                        Ok(c) => c,
                        Err(e) => return answer(Err(format!("{addr}: {e}"))),
                    };
                    let mut req = tonic::Request::new(pb::MissingBlobsRequest {
                        hashes: wire,
                        sizes,
                        exists_only: false,
                    });
                    req.set_timeout(ASK_TIMEOUT);
                    // Bounded here too: a new connection to a stopped peer waits for its TLS
                    // handshake for ever, before the request's own deadline starts.
                    let r = match tokio::time::timeout(ASK_TIMEOUT, c.missing(req)).await {
                        Ok(Ok(r)) => r.into_inner(),
                        Ok(Err(s)) => return answer(Err(format!("{addr}: {}", s.message()))),
                        Err(_) => return answer(Err(format!("{addr}: no answer within {ASK_TIMEOUT:?}"))),
                    };
                    missing.extend(r.missing);
                    wrong_size.extend(r.wrong_size.into_iter().map(|b| (b, addr.clone())));
                }
                answer(Ok((missing, wrong_size)))
            });
        }
        // Answers as they come: once every blob has its copies, the replicas still to answer
        // are not waited for (one stopped, or stalled on its disk, would hold every commit
        // that names content for the whole deadline).
        let mut queries: futures::stream::FuturesUnordered<_> = queries.into_iter().collect();
        while !have.values().all(|f| f.counted() >= q.need) {
            let Some((result, hint)) = futures::StreamExt::next(&mut queries).await else {
                break;
            };
            match result {
                Ok((missing, wrong_size)) => {
                    wrong.extend(
                        wrong_size
                            .into_iter()
                            .filter_map(|(h, addr)| Some((Hash::from_slice(&h).ok()?, addr))),
                    );
                    let missing: HashSet<&[u8]> = missing.iter().map(|b| b.as_ref()).collect();
                    for (h, f) in have.iter_mut() {
                        if !missing.contains(&h.0[..]) {
                            count(f, hint);
                        }
                    }
                }
                // A witness that cannot be asked holds no hint that counts.
                Err(_) if hint => {}
                Err(e) => failures.push(e),
            }
        }
        // Content addresses fix sizes: a copy of another size and none of the declared one
        // means the commit declared a false size (seen on any replica, not only the leader's
        // own copy). One damaged copy beside good ones is only a missing copy.
        for (hash, addr) in &wrong {
            if have.get(hash).is_some_and(|f| f.data + f.hints == 0) {
                let size = round_sizes.get(hash).copied().unwrap_or_default();
                return Err(NodeError::Invalid(format!(
                    "declared size {size} of blob {hash} does not match the copy stored on {addr}"
                )));
            }
        }
        for (hash, found) in have {
            let n = found.counted();
            if n < q.need {
                if !failures.is_empty() {
                    return Err(NodeError::Unavailable(format!(
                        "only {n} of {} copies of blob {hash} confirmed; could not ask: {}",
                        q.need,
                        failures.join("; ")
                    )));
                }
                return Err(NodeError::NotEnoughCopies {
                    hash,
                    have: n,
                    need: q.need,
                });
            }
        }
        Ok(())
    }

    /// The blobs of `blobs` held here with their declared size (touched or pinned as
    /// `blobs::asked` says; an unreferenced blob near the end of its grace period counts as
    /// missing), and those stored here with another size: like a peer's, a local copy of
    /// another size counts as missing, and refuses the commit only if no copy has the declared
    /// size. Off the async workers: a round may stat many thousands of files.
    async fn held_here(self: &Arc<Self>, blobs: &[(Hash, u64)]) -> Result<(Vec<Hash>, Vec<Hash>), NodeError> {
        let node = self.clone();
        let blobs = blobs.to_vec();
        tokio::task::spawn_blocking(move || {
            let asked: Vec<(Hash, Option<u64>)> = blobs.iter().map(|(h, s)| (*h, Some(*s))).collect();
            let (mut held, mut other_size) = (Vec::new(), Vec::new());
            for ((h, _), answer) in blobs.into_iter().zip(node.held_for_commit(&asked)) {
                match answer {
                    Held::Yes => held.push(h),
                    Held::OtherSize => other_size.push(h),
                    Held::No => {}
                }
            }
            (held, other_size)
        })
        .await
        .map_err(|e| NodeError::Internal(format!("checking local blob copies: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::Found;

    #[test]
    fn hints_count_only_beside_a_data_copy() {
        let f = |data, hints| Found { data, hints }.counted();
        assert_eq!(f(1, 1), 2, "one data copy and the witness's hint make W=2");
        assert_eq!(f(2, 0), 2);
        assert_eq!(f(0, 2), 0, "hints alone are no copy a reader can use");
        assert_eq!(f(0, 0), 0);
    }
}
