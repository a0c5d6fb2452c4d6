//! The Prometheus endpoint a server or a mount daemon runs with `--metrics-listen ADDR`, and the
//! helpers both use to turn their existing counters into metric families at scrape time (so
//! neither keeps a second set of books).
//!
//! The endpoint is plain HTTP without authentication (what Prometheus scrapes): bind it to
//! loopback or a management network. It answers `GET /metrics` (and `HEAD`) and nothing else,
//! serves [`MAX_CONNECTIONS`] connections at a time, one request each, and closes any that take
//! longer than [`CONNECTION_LIMIT`]. docs/METRICS.md lists the metrics.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Registry, TextEncoder};
use tokio::net::TcpListener;

/// Connections the endpoint serves at once (a scraper uses one).
pub const MAX_CONNECTIONS: usize = 8;
/// How long one connection (one request) may take.
pub const CONNECTION_LIMIT: Duration = Duration::from_secs(10);

/// Why the metrics endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {0} for metrics (--metrics-listen): {1}")]
    Listen(String, std::io::Error),
    #[error("setting up metrics: {0}")]
    Registry(#[from] prometheus::Error),
}

/// Binds the metrics listener (before anything else starts, so a taken port or a bad address
/// is a startup error naming the address).
pub async fn bind(addr: &str) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| MetricsError::Listen(addr.to_string(), e))
}

/// Serves `GET /metrics` from `registry` on `listener` until dropped.
pub async fn serve(listener: TcpListener, registry: Registry) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: back off instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc =
                hyper::service::service_fn(move |req| std::future::ready(Ok::<_, Infallible>(answer(&registry, &req))));
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_LIMIT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics endpoint: connection failed"),
                Err(_) => tracing::debug!("metrics endpoint: closed a connection that took too long"),
            }
        });
    }
}

/// The answer to one HTTP request: the metrics for `GET /metrics`, an error otherwise.
fn answer<B>(registry: &Registry, req: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "not found: the metrics are at /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics\n".into());
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match TextEncoder::new().encode_to_string(&registry.gather()) {
        Ok(text) => {
            let mut r = reply(StatusCode::OK, text);
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(prometheus::TEXT_FORMAT));
            r
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics endpoint: encoding failed");
            reply(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n"))
        }
    }
}

/// Metric families built at scrape time.
#[derive(Default)]
pub struct Families(pub Vec<MetricFamily>);

impl Families {
    pub fn add(&mut self, name: &str, help: &str, kind: MetricType, samples: Vec<Metric>) {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(kind);
        mf.set_metric(samples);
        self.0.push(mf);
    }

    /// A family of one unlabelled sample.
    pub fn single(&mut self, kind: MetricType, name: &str, help: &str, value: f64) {
        self.add(name, help, kind, vec![sample(kind, &[], value)]);
    }
}

/// One sample of a counter or gauge.
pub fn sample(kind: MetricType, labels: &[(&str, &str)], value: f64) -> Metric {
    let mut m = Metric::default();
    m.set_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut l = LabelPair::default();
                l.set_name(k.to_string());
                l.set_value(v.to_string());
                l
            })
            .collect(),
    );
    if kind == MetricType::COUNTER {
        let mut c = proto::Counter::default();
        c.set_value(value);
        m.set_counter(c);
    } else {
        let mut g = proto::Gauge::default();
        g.set_value(value);
        m.set_gauge(g);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_answers_get_metrics_only() {
        let registry = Registry::new();
        let req = |m: Method, path: &str| Request::builder().method(m).uri(path).body(()).expect("request");
        let ok = answer(&registry, &req(Method::GET, "/metrics"));
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            ok.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()),
            Some(prometheus::TEXT_FORMAT)
        );
        assert_eq!(
            answer(&registry, &req(Method::HEAD, "/metrics")).status(),
            StatusCode::OK
        );
        assert_eq!(
            answer(&registry, &req(Method::GET, "/other")).status(),
            StatusCode::NOT_FOUND
        );
        let put = answer(&registry, &req(Method::PUT, "/metrics"));
        assert_eq!(put.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            put.headers().get(ALLOW).and_then(|v| v.to_str().ok()),
            Some("GET, HEAD")
        );
    }

    #[test]
    fn scrape_time_families_encode() {
        let mut f = Families::default();
        f.single(MetricType::COUNTER, "x_total", "help", 3.0);
        f.add(
            "y",
            "help",
            MetricType::GAUGE,
            vec![sample(MetricType::GAUGE, &[("role", "leader")], 1.0)],
        );
        let text = TextEncoder::new().encode_to_string(&f.0).expect("encodes");
        assert!(
            text.contains("x_total 3") && text.contains("y{role=\"leader\"} 1"),
            "{text}"
        );
    }
}
