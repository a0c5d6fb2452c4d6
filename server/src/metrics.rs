//! Prometheus metrics of a server: `GET /metrics` on `--metrics-listen ADDR` (off by default).
//!
//! Almost everything an operator watches is already counted for `codafs status`: Raft state
//! (openraft's metrics), blob counts and bytes, the repair backlog, scrub and GC counters, disk
//! space. [`StatusCollector`] reads those at each scrape through [`Node::status`] and
//! [`Node::counters`] instead of keeping a second set of books that could drift from the first.
//! The one new measurement is the latency of every RPC, taken by [`RpcTimingLayer`] around the
//! gRPC router.
//!
//! The endpoint is plain HTTP without authentication (what Prometheus scrapes): bind it to
//! loopback or a management network. It answers `GET /metrics` and nothing else, serves a few
//! connections at a time, one request each, and closes any that take longer than
//! [`CONNECTION_LIMIT`]. docs/METRICS.md lists the metrics.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::{HistogramOpts, HistogramVec, Registry};
use tonic::codegen::http;

pub use codafs_metrics::{bind, serve, MetricsError};
use codafs_metrics::{sample, Families};

use crate::node::Node;

/// RPC latency buckets, seconds.
const RPC_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every Raft role a server reports, one `codafs_server_raft_role` series each.
const ROLES: [&str; 5] = ["leader", "follower", "candidate", "learner", "shutdown"];

/// A server's metrics: the registry the endpoint serves and the RPC timings the gRPC layer
/// records into.
pub struct Metrics {
    pub registry: Registry,
    rpc: HistogramVec,
}

impl Metrics {
    /// The metrics of `node`: its status read at each scrape, and RPC timings.
    pub fn new(node: Arc<Node>) -> Result<Self, MetricsError> {
        let rpc = HistogramVec::new(
            HistogramOpts::new(
                "codafs_server_rpc_duration_seconds",
                "Time from a gRPC request's arrival to its response headers, by method \
                 (for server-streaming methods such as Blobs/Get and Meta/Subscribe: until the \
                 stream starts). Unknown methods are counted as \"unknown\".",
            )
            .buckets(RPC_BUCKETS.to_vec()),
            &["method"],
        )?;
        let registry = Registry::new();
        registry.register(Box::new(rpc.clone()))?;
        registry.register(Box::new(StatusCollector { node }))?;
        Ok(Metrics { registry, rpc })
    }

    /// The layer that times every RPC into this registry.
    pub fn rpc_layer(&self) -> RpcTimingLayer {
        RpcTimingLayer(Some(self.rpc.clone()))
    }
}

/// The server's `codafs status` counters as metric families, read at each scrape.
struct StatusCollector {
    node: Arc<Node>,
}

impl Collector for StatusCollector {
    /// None: the families are built at each scrape (an unchecked collector, in Prometheus
    /// terms). The names are this module's own and cannot clash with the RPC histogram.
    fn desc(&self) -> Vec<&Desc> {
        Vec::new()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        use std::sync::atomic::Ordering::Relaxed;
        let n = &self.node;
        let st = n.status();
        let c = &n.counters;
        let mut f = Families::default();
        f.add(
            "codafs_server_info",
            "Always 1; the labels name this server (node id, advertised address, witness or data replica).",
            MetricType::GAUGE,
            vec![sample(
                MetricType::GAUGE,
                &[
                    ("node_id", &st.node_id.to_string()),
                    ("addr", &st.addr),
                    ("witness", if st.witness { "true" } else { "false" }),
                ],
                1.0,
            )],
        );
        f.add(
            "codafs_server_raft_role",
            "1 for this server's current Raft role, 0 for the others.",
            MetricType::GAUGE,
            ROLES
                .iter()
                .map(|r| sample(MetricType::GAUGE, &[("role", r)], f64::from(u8::from(st.role == *r))))
                .collect(),
        );
        let gauges: [(&str, &str, u64); 15] = [
            ("codafs_server_raft_term", "Current Raft term.", st.term),
            (
                "codafs_server_raft_last_log_index",
                "Index of the last entry in this server's Raft log.",
                st.last_log_index,
            ),
            (
                "codafs_server_raft_commit_index",
                "Highest Raft log index this server knows to be committed.",
                st.commit_index,
            ),
            (
                "codafs_server_raft_applied_index",
                "Highest Raft log index this server has applied (what its reads answer from).",
                st.applied_index,
            ),
            (
                "codafs_server_raft_snapshot_index",
                "Raft log index of this server's latest snapshot.",
                st.snapshot_index,
            ),
            (
                "codafs_server_raft_voters",
                "Voting members in the Raft membership.",
                u64::from(st.voters),
            ),
            (
                "codafs_server_raft_members",
                "Servers in the Raft membership (voters and learners).",
                u64::from(st.servers),
            ),
            (
                "codafs_server_blobs",
                "Blobs stored here (0 on a witness).",
                st.blob_count,
            ),
            (
                "codafs_server_blob_bytes",
                "Bytes of the blobs stored here (0 on a witness).",
                st.blob_bytes,
            ),
            (
                "codafs_server_spool_blobs",
                "On a witness: blobs in its spool, relayed or kept as hints for data replicas that are down (hinted handoff).",
                st.spool_blobs,
            ),
            (
                "codafs_server_spool_bytes",
                "On a witness: bytes in its spool (bounded by codafs_server_spool_limit_bytes).",
                st.spool_bytes,
            ),
            (
                "codafs_server_spool_limit_bytes",
                "On a witness: the spool's bound (spool_max_bytes); hints past it are refused.",
                st.spool_limit_bytes,
            ),
            (
                "codafs_server_repair_backlog_blobs",
                "Referenced blobs (and chunks) missing here that repair has yet to fetch.",
                st.repair_backlog,
            ),
            (
                "codafs_server_disk_free_bytes",
                "Free bytes on the server directory's filesystem.",
                st.disk_free_bytes,
            ),
            (
                "codafs_server_disk_min_free_bytes",
                "Free-space watermark (--min-free): puts and growing commits are refused below it.",
                st.disk_min_free_bytes,
            ),
        ];
        for (name, help, v) in gauges {
            f.single(MetricType::GAUGE, name, help, v as f64);
        }
        f.single(
            MetricType::GAUGE,
            "codafs_server_disk_total_bytes",
            "Size of the server directory's filesystem.",
            st.disk_total_bytes as f64,
        );
        let counters: [(&str, &str, u64); 8] = [
            (
                "codafs_server_scrubbed_blobs_total",
                "Blobs re-hashed by scrub (scrub progress: compare with codafs_server_blobs).",
                c.scrubbed.load(Relaxed),
            ),
            (
                "codafs_server_repaired_blobs_total",
                "Blobs fetched from peers by repair.",
                c.repaired.load(Relaxed),
            ),
            (
                "codafs_server_gc_removed_blobs_total",
                "Unreferenced blobs deleted by GC.",
                c.gc_removed.load(Relaxed),
            ),
            (
                "codafs_server_corrupt_blobs_total",
                "Corrupt blob copies found (by reads or scrub) and quarantined.",
                st.corrupt_found,
            ),
            (
                "codafs_server_blob_gets_total",
                "Blob reads served (Blobs/Get).",
                st.blob_gets,
            ),
            (
                "codafs_server_blob_received_bytes_total",
                "Blob bytes newly stored here by puts (from clients or forwarded by peers; not repair).",
                st.blob_bytes_received,
            ),
            (
                "codafs_server_space_refusals_total",
                "Puts and commits refused because free space was under the watermark.",
                st.space_refusals,
            ),
            (
                "codafs_server_stalled_connections_closed_total",
                "Connections closed for leaving a reply unread past the stall timeout (--reply-stall-timeout).",
                c.stalled_connections_closed.load(Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            f.single(MetricType::COUNTER, name, help, v as f64);
        }
        f.0
    }
}

/// Times every RPC into `codafs_server_rpc_duration_seconds` (a pass-through when metrics
/// are off).
#[derive(Clone, Default)]
pub struct RpcTimingLayer(Option<HistogramVec>);

impl<S> tower_layer::Layer<S> for RpcTimingLayer {
    type Service = RpcTiming<S>;

    fn layer(&self, inner: S) -> RpcTiming<S> {
        RpcTiming {
            inner,
            times: self.0.clone(),
        }
    }
}

/// The service [`RpcTimingLayer`] wraps around the router.
#[derive(Clone)]
pub struct RpcTiming<S> {
    inner: S,
    times: Option<HistogramVec>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, RB> tower_service::Service<Request<B>> for RpcTiming<S>
where
    S: tower_service::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(times) = self.times.clone() else {
            return Box::pin(self.inner.call(req));
        };
        let method = method_label(req.uri().path());
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            // Paths are chosen by callers: only methods that exist get a series of their own
            // (an unknown one is answered UNIMPLEMENTED in the headers), so the label set
            // stays bounded.
            let known = r.as_ref().is_ok_and(|resp| !unimplemented(resp));
            let label = if known { method.as_str() } else { "unknown" };
            times.with_label_values(&[label]).observe(start.elapsed().as_secs_f64());
            r
        })
    }
}

/// `Meta/Lookup` for `/codafs.v1.Meta/Lookup`.
fn method_label(path: &str) -> String {
    let p = path.trim_start_matches('/');
    match p.split_once('/') {
        Some((service, method)) => {
            let service = service.rsplit('.').next().unwrap_or(service);
            format!("{service}/{method}")
        }
        None => p.to_string(),
    }
}

/// Whether a response says UNIMPLEMENTED in its headers (what tonic answers for a path that
/// names no method).
fn unimplemented<B>(resp: &Response<B>) -> bool {
    let code = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok());
    code.and_then(|c| c.parse::<i32>().ok()) == Some(tonic::Code::Unimplemented as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    #[test]
    fn method_labels_name_service_and_method() {
        assert_eq!(method_label("/codafs.v1.Meta/Lookup"), "Meta/Lookup");
        assert_eq!(method_label("/codafs.v1.Blobs/Get"), "Blobs/Get");
        assert_eq!(method_label("/Plain/Call"), "Plain/Call");
    }

    #[test]
    fn unknown_methods_share_one_label() {
        let mut resp = Response::new(());
        assert!(!unimplemented(&resp));
        resp.headers_mut().insert("grpc-status", HeaderValue::from_static("12"));
        assert!(unimplemented(&resp));
    }
}
