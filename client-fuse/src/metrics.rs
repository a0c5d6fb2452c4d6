//! Prometheus metrics of a mount daemon: `GET /metrics` on `codafs mount --metrics-listen ADDR`
//! (off by default).
//!
//! The mount already counts what `codafs status MNT` shows (cache hits, misses, evictions and
//! bytes, kernel requests, commits, the write-back backlog): [`StatusCollector`] reads those at
//! each scrape through [`Core::status_counters`] rather than keeping a second set of books.
//! What `codafs status` has no counter for is measured here, in [`Timings`], which the core
//! keeps whether or not an endpoint runs (an observation is a few atomic adds): how long blob
//! and listing fetches take, and how many change events (callbacks) arrive and how long applying them takes.
//!
//! The endpoint is plain HTTP without authentication (what Prometheus scrapes): bind it to
//! loopback or a management network. It answers `GET /metrics` and nothing else, serves a few
//! connections at a time, one request each, and closes any that take longer than
//! [`CONNECTION_LIMIT`]. docs/METRICS.md lists the metrics.
use std::sync::Arc;
use std::time::Instant;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

pub use codafs_metrics::{bind, serve, MetricsError};
use codafs_metrics::{sample, Families};

use crate::core::remote::Remote;
use crate::core::Core;
use crate::status::VolumeStatus;

/// Blob fetch buckets, seconds.
const FETCH_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Callback delay buckets, seconds.
const CALLBACK_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// What the mount measures for the metrics endpoint beyond `codafs status`'s counters.
pub struct Timings {
    fetch: HistogramVec,
    listing: HistogramVec,
    callbacks: IntCounterVec,
    callback_delay: Histogram,
}

impl Timings {
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(Timings {
            fetch: HistogramVec::new(
                HistogramOpts::new(
                    "codafs_mount_fetch_duration_seconds",
                    "Time to fetch one file's content (a single blob, files up to 4 MiB) from the \
                     servers into the cache, verified, by result (ok or error). Large files, \
                     fetched chunk by chunk as they are read, are not included.",
                )
                .buckets(FETCH_BUCKETS.to_vec()),
                &["result"],
            )?,
            listing: HistogramVec::new(
                HistogramOpts::new(
                    "codafs_mount_listing_fetch_duration_seconds",
                    "Time a name lookup in a directory not cached yet waited for the servers, by \
                     part: the directory's listing, then its small files' content (one GetSmall \
                     call; only when there were two or more to bring).",
                )
                .buckets(FETCH_BUCKETS.to_vec()),
                &["part"],
            )?,
            callbacks: IntCounterVec::new(
                Opts::new(
                    "codafs_mount_callbacks_total",
                    "Change events (callbacks) received from the servers' change streams, by volume.",
                ),
                &["volume"],
            )?,
            callback_delay: Histogram::with_opts(
                HistogramOpts::new(
                    "codafs_mount_callback_delay_seconds",
                    "Time from a change event's arrival at the mount to its being applied (cache \
                     entries dropped, kernel invalidations queued). Events carry no commit time, \
                     so the time between the commit and the event's arrival is not included.",
                )
                .buckets(CALLBACK_BUCKETS.to_vec()),
            )?,
        })
    }

    /// A blob fetch that began at `started` ended (`ok`: cached and verified).
    pub fn fetched(&self, started: Instant, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.fetch
            .with_label_values(&[result])
            .observe(started.elapsed().as_secs_f64());
    }

    /// A directory's listing, fetched for a lookup, arrived (it was asked for at `started`).
    pub fn listed(&self, started: Instant) {
        self.listing
            .with_label_values(&["listing"])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The small files of a just-fetched listing, asked for at `started`, arrived (or failed to).
    pub fn small_files_fetched(&self, started: Instant) {
        self.listing
            .with_label_values(&["small_files"])
            .observe(started.elapsed().as_secs_f64());
    }

    /// A change event of `volume` arrived.
    pub fn callback_received(&self, volume: &str) {
        self.callbacks.with_label_values(&[volume]).inc();
    }

    /// A change event that arrived at `received` has been applied.
    pub fn callback_applied(&self, received: Instant) {
        self.callback_delay.observe(received.elapsed().as_secs_f64());
    }

    fn register(&self, r: &Registry) -> Result<(), prometheus::Error> {
        r.register(Box::new(self.fetch.clone()))?;
        r.register(Box::new(self.listing.clone()))?;
        r.register(Box::new(self.callbacks.clone()))?;
        r.register(Box::new(self.callback_delay.clone()))
    }
}

/// The registry the endpoint serves: `core`'s counters, read at each scrape, and its timings.
pub fn registry<R: Remote>(core: Arc<Core<R>>) -> Result<Registry, MetricsError> {
    let r = Registry::new();
    core.timings().register(&r)?;
    r.register(Box::new(StatusCollector { core }))?;
    Ok(r)
}

/// The mount's `codafs status` counters as metric families, read at each scrape.
struct StatusCollector<R: Remote> {
    core: Arc<Core<R>>,
}

impl<R: Remote> Collector for StatusCollector<R> {
    /// None: the families are built at each scrape (an unchecked collector, in Prometheus
    /// terms). Their names are this module's own and differ from the [`Timings`] ones.
    fn desc(&self) -> Vec<&Desc> {
        Vec::new()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        use MetricType::{COUNTER, GAUGE};
        let st = self.core.status_counters();
        let c = &st.cache;
        let mut f = Families::default();
        f.single(
            GAUGE,
            "codafs_mount_connected",
            "1 while the servers answer, 0 while the mount serves its cache disconnected.",
            f64::from(u8::from(st.connected)),
        );
        let counters: [(&str, &str, u64); 13] = [
            (
                "codafs_mount_cache_hits_total",
                "File content found in the whole-file cache (per read request that needed it).",
                c.hits,
            ),
            (
                "codafs_mount_cache_misses_total",
                "File content not in the whole-file cache, fetched from the servers.",
                c.misses,
            ),
            (
                "codafs_mount_cache_evictions_total",
                "Cache entries evicted to stay within --cache-size.",
                c.evictions,
            ),
            (
                "codafs_mount_cache_fetched_bytes_total",
                "Bytes fetched from the servers into the cache.",
                c.fetched_bytes,
            ),
            (
                "codafs_mount_cache_prefetched_total",
                "Small files brought into the cache with their directory's listing.",
                c.prefetched,
            ),
            (
                "codafs_mount_cache_reused_chunk_bytes_total",
                "Bytes of large files' new versions copied from chunks already cached instead of fetched.",
                c.reused_chunk_bytes,
            ),
            (
                "codafs_mount_cache_corrupt_dropped_total",
                "Cached files that failed verification and were dropped.",
                c.corrupt_dropped,
            ),
            (
                "codafs_mount_cache_bad_copies_refetched_total",
                "Copies a server sent that failed verification, fetched again elsewhere.",
                c.bad_copies_refetched,
            ),
            (
                "codafs_mount_cache_streamed_uncached_total",
                "Reads served through memory because the cache disk was full.",
                c.streamed_uncached,
            ),
            (
                "codafs_mount_commits_total",
                "Commits this mount sent.",
                st.writes.commits,
            ),
            (
                "codafs_mount_failed_commits_total",
                "Stores the servers refused or that failed.",
                st.writes.failed_commits,
            ),
            (
                "codafs_mount_stored_bytes_total",
                "Content bytes this mount stored on the servers.",
                st.writes.stored_bytes,
            ),
            (
                "codafs_mount_stale_page_drops_total",
                "Kernel page caches dropped because a change kept a file's size and mtime.",
                st.stale_page_drops,
            ),
        ];
        for (name, help, v) in counters {
            f.single(COUNTER, name, help, v as f64);
        }
        f.single(
            GAUGE,
            "codafs_mount_cache_entries",
            "Files (blobs) in the whole-file cache.",
            c.entries as f64,
        );
        f.single(
            GAUGE,
            "codafs_mount_cache_bytes",
            "Bytes in the whole-file cache.",
            c.bytes as f64,
        );
        f.single(
            GAUGE,
            "codafs_mount_cache_max_bytes",
            "The cache's bound (--cache-size).",
            c.max_bytes as f64,
        );
        f.single(
            GAUGE,
            "codafs_mount_cache_packs",
            "Packs in the cache: a listing's small files, or sent contents, kept as one file.",
            c.packs as f64,
        );
        f.single(
            GAUGE,
            "codafs_mount_cache_packed_files",
            "Cached files kept in packs (counted in codafs_mount_cache_entries too).",
            c.packed_files as f64,
        );
        f.add(
            "codafs_mount_fuse_requests_total",
            "Kernel (FUSE) requests the daemon answered, by operation.",
            COUNTER,
            st.fuse_requests
                .iter()
                .map(|(op, n)| sample(COUNTER, &[("op", op)], *n as f64))
                .collect(),
        );
        f.add(
            "codafs_mount_fuse_answers_total",
            "Kernel requests answered on the kernel's thread without waiting (inline) or handed to \
             the runtime because they waited for a server, a lock or a timer (handed_off).",
            COUNTER,
            vec![
                sample(COUNTER, &[("how", "inline")], st.answered_inline as f64),
                sample(COUNTER, &[("how", "handed_off")], st.handed_off as f64),
            ],
        );
        let vols = &st.volumes;
        per_volume(
            &mut f,
            COUNTER,
            "codafs_mount_volume_cache_hits_total",
            "Cache hits by volume.",
            vols,
            |v| v.hits as f64,
        );
        per_volume(
            &mut f,
            COUNTER,
            "codafs_mount_volume_cache_misses_total",
            "Cache misses by volume.",
            vols,
            |v| v.misses as f64,
        );
        per_volume(
            &mut f,
            GAUGE,
            "codafs_mount_volume_version",
            "The last version of the volume whose change event the mount applied.",
            vols,
            |v| v.version as f64,
        );
        per_volume(
            &mut f,
            GAUGE,
            "codafs_mount_volume_subscribed",
            "1 while the volume's change stream (callbacks) is live.",
            vols,
            |v| f64::from(u8::from(v.connected)),
        );
        // Write-back mounts only (the log does not exist on read-only and write-through mounts).
        if let Some(b) = &st.writes.write_back {
            f.single(
                GAUGE,
                "codafs_mount_write_back_changes",
                "Write-back backlog: changes logged and not yet on the servers.",
                b.changes as f64,
            );
            f.single(
                GAUGE,
                "codafs_mount_write_back_log_bytes",
                "Bytes the write-back log holds.",
                b.log_bytes as f64,
            );
            f.single(
                GAUGE,
                "codafs_mount_write_back_log_limit_bytes",
                "The write-back log's bound (--log-limit); writes fail with ENOSPC past it.",
                b.log_limit as f64,
            );
            f.single(
                GAUGE,
                "codafs_mount_write_back_blocked",
                "1 while nothing is being sent (servers unreachable, a batch refused); the mount log says why.",
                f64::from(u8::from(b.blocked.is_some())),
            );
            let counters: [(&str, &str, u64); 4] = [
                (
                    "codafs_mount_write_back_batches_sent_total",
                    "Write-back batches sent (one commit each).",
                    b.batches_sent,
                ),
                (
                    "codafs_mount_write_back_changes_sent_total",
                    "Logged changes that reached the servers.",
                    b.changes_sent,
                ),
                (
                    "codafs_mount_write_back_conflicts_total",
                    "Changes kept as NAME.conflict-HOST-TIME siblings.",
                    b.conflicts,
                ),
                (
                    "codafs_mount_write_back_refused_total",
                    "Changes the servers refused outright (no right, over quota), set aside in wblog/lost+found.",
                    b.refused,
                ),
            ];
            for (name, help, v) in counters {
                f.single(COUNTER, name, help, v as f64);
            }
        }
        f.0
    }
}

/// A family of one sample per volume, labelled `volume`.
fn per_volume(
    f: &mut Families,
    kind: MetricType,
    name: &str,
    help: &str,
    volumes: &[VolumeStatus],
    value: impl Fn(&VolumeStatus) -> f64,
) {
    let samples = volumes
        .iter()
        .map(|v| sample(kind, &[("volume", &v.name)], value(v)))
        .collect();
    f.add(name, help, kind, samples);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::TextEncoder;

    #[test]
    fn timings_are_valid_and_encode() {
        let t = Timings::new().expect("valid metric options");
        let r = Registry::new();
        t.register(&r).expect("registered");
        t.fetched(Instant::now(), true);
        t.callback_received("www");
        t.callback_applied(Instant::now());
        t.listed(Instant::now());
        t.listed(Instant::now());
        t.small_files_fetched(Instant::now());
        let text = TextEncoder::new().encode_to_string(&r.gather()).expect("encodes");
        assert!(
            text.contains("codafs_mount_fetch_duration_seconds_count{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("codafs_mount_callbacks_total{volume=\"www\"} 1"),
            "{text}"
        );
        assert!(text.contains("codafs_mount_callback_delay_seconds_count 1"), "{text}");
        for series in [
            "codafs_mount_listing_fetch_duration_seconds_count{part=\"listing\"} 2",
            "codafs_mount_listing_fetch_duration_seconds_count{part=\"small_files\"} 1",
        ] {
            assert!(text.contains(series), "{series} missing from {text}");
        }
    }
}
