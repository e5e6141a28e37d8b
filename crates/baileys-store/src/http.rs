//! The operator's HTTP endpoint: `GET /metrics` (Prometheus, in the
//! OpenMetrics text format), `GET /healthz` (the process is up) and
//! `GET /readyz` (200 once it is connected to NATS and JetStream and takes
//! requests — its lease keeper runs, so it owns partitions or is ready to;
//! 503 otherwise, with the checks in a JSON body).
//!
//! It is the operator's, never the bots': the figures name tenants, so it
//! listens on HTTP on the address `[http] listen` names (loopback on the
//! embedded default), not on NATS, which bots reach. `$SRV.STATS` keeps its
//! tenant-free figures for discovery over NATS.
//!
//! The responder is a few lines of HTTP/1.1 on tokio rather than an HTTP
//! library: it answers three GETs, one request per connection, with a
//! bounded request head, a read deadline and a bounded number of
//! connections at once.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::connection::State;
use bstore_mongo::Materializer;
use bstore_session::Sessions;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Written into the data dir with the address the endpoint listens on.
pub const ADDR_FILE: &str = "http.addr";
/// Every metric name starts so.
pub const PREFIX: &str = "bstore";

/// The largest request head read (request line and headers).
const MAX_HEAD: usize = 8 << 10;
/// How long a client may take to send its request head.
const READ_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; past it new ones are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// How long one connection may take altogether (a client that stops
/// reading the answer must not hold its place for ever).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// How long a scrape waits for a figure that needs a round trip.
const FIGURE_DEADLINE: Duration = Duration::from_secs(2);

/// What the running service hands the endpoint once it has connected.
pub struct Live {
    /// The store connection (JetStream).
    pub store: async_nats::Client,
    /// The serving connection (bots' requests).
    pub serving: async_nats::Client,
    /// The session actors, for the active count and the partitions owned.
    pub sessions: Sessions,
}

/// The endpoint's view of the service; cheap to clone.
#[derive(Clone)]
pub struct Endpoint(Arc<Inner>);

struct Inner {
    registry: Registry,
    dynamic: Arc<Dynamic>,
    live: OnceLock<Live>,
    active_sessions: Gauge,
    partitions_owned: Gauge,
    partitions: Gauge,
    ready_gauge: Gauge,
}

/// Figures a collector reads when scraped, set as the service starts.
#[derive(Debug, Default)]
struct Dynamic {
    materializer: OnceLock<MaterializerHandle>,
    /// The Mongo materializer's lag as last asked of JetStream, +1 (0:
    /// not known yet).
    mongo_lag: AtomicU64,
    /// Whether the API takes requests (set when it starts serving, cleared
    /// when it begins to shut down).
    taking: AtomicBool,
}

struct MaterializerHandle(Materializer);

impl std::fmt::Debug for MaterializerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Materializer")
    }
}

impl Endpoint {
    /// The figures of `metrics` (the request API's) and of the whole process.
    pub fn new(metrics: &bstore_api::Metrics) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        metrics.register(&mut registry);
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let active_sessions = gauge(&mut registry, "active_sessions", "Sessions held in memory by this instance");
        let partitions_owned = gauge(&mut registry, "partitions_owned", "Partitions whose lease this instance holds");
        let partitions = gauge(&mut registry, "partitions", "Partitions of the cluster (cluster.partitions)");
        let ready_gauge = gauge(&mut registry, "ready", "1 while the instance takes requests and both NATS connections are up");
        registry.register("build", "The running release", Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]));
        let dynamic = Arc::new(Dynamic::default());
        registry.register_collector(Box::new(ProcessCollector(dynamic.clone())));
        Self(Arc::new(Inner { registry, dynamic, live: OnceLock::new(), active_sessions, partitions_owned, partitions, ready_gauge }))
    }

    /// Hands over the running service's connections and sessions.
    pub fn set_live(&self, live: Live) {
        self.0.partitions.set(i64::from(live.sessions.ownership().partitions()));
        let _ = self.0.live.set(live);
    }

    /// The in-process Mongo materializer, for its figures.
    pub fn set_materializer(&self, m: Materializer) {
        let _ = self.0.dynamic.materializer.set(MaterializerHandle(m));
    }

    /// Whether the API takes requests.
    pub fn set_taking(&self, taking: bool) {
        self.0.dynamic.taking.store(taking, Relaxed);
    }

    /// Binds `addr` — failing with a message that says what to change when
    /// the address is taken — writes it into `<data_dir>/http.addr` and
    /// serves until the process ends. Returns the address bound.
    pub async fn listen(&self, addr: SocketAddr, data_dir: &Path) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                " (another process listens there: another instance on this host? set http.listen, e.g. BSTORE__HTTP__LISTEN=127.0.0.1:9479, or `off`)"
            } else {
                ""
            };
            anyhow::anyhow!("cannot listen on {addr} for the metrics and health endpoint: {e}{hint}")
        })?;
        let bound = listener.local_addr()?;
        std::fs::create_dir_all(data_dir)
            .and_then(|()| std::fs::write(data_dir.join(ADDR_FILE), format!("{bound}\n")))
            .with_context(|| format!("writing {}", data_dir.join(ADDR_FILE).display()))?;
        let me = self.clone();
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CONNECTION_DEADLINE, me.answer(stream)).await;
                    drop(permit);
                });
            }
        });
        tracing::info!(address = %bound, "metrics and health on http://{bound}/metrics, /healthz, /readyz");
        if bound.ip().is_unspecified() {
            tracing::warn!(address = %bound, "the metrics endpoint listens on every interface: its figures name tenants, so make sure only the operator's Prometheus can reach it");
        }
        Ok(bound)
    }

    async fn answer(&self, mut stream: TcpStream) {
        let head = match tokio::time::timeout(READ_DEADLINE, read_head(&mut stream)).await {
            Ok(Ok(head)) => head,
            Ok(Err(status)) => {
                let _ = respond(&mut stream, status, "text/plain", "bad request\n", false).await;
                return;
            }
            Err(_) => return,
        };
        let Some((method, path)) = parse_request_line(&head) else {
            let _ = respond(&mut stream, 400, "text/plain", "bad request\n", false).await;
            return;
        };
        let head_only = method == "HEAD";
        if method != "GET" && !head_only {
            let _ = respond(&mut stream, 405, "text/plain", "only GET\n", false).await;
            return;
        }
        let path = path.split('?').next().unwrap_or_default();
        let (status, kind, body) = match path {
            "/metrics" => (200, "application/openmetrics-text; version=1.0.0; charset=utf-8", self.scrape().await),
            "/healthz" => (200, "text/plain", "ok\n".to_owned()),
            "/readyz" => {
                let (ready, checks) = self.readiness().await;
                (if ready { 200 } else { 503 }, "application/json", format!("{checks}\n"))
            }
            _ => (404, "text/plain", "not found: /metrics, /healthz, /readyz\n".to_owned()),
        };
        let _ = respond(&mut stream, status, kind, &body, head_only).await;
    }

    /// The figures, refreshed and encoded.
    pub async fn scrape(&self) -> String {
        let inner = &self.0;
        if let Some(live) = inner.live.get() {
            if let Ok(n) = tokio::time::timeout(FIGURE_DEADLINE, live.sessions.active()).await {
                inner.active_sessions.set(n as i64);
            }
            inner.partitions_owned.set(live.sessions.ownership().served().len() as i64);
            let connected = live.store.connection_state() == State::Connected && live.serving.connection_state() == State::Connected;
            inner.ready_gauge.set(i64::from(connected && inner.dynamic.taking.load(Relaxed)));
        }
        if let Some(m) = inner.dynamic.materializer.get()
            && let Ok(Ok(lag)) = tokio::time::timeout(FIGURE_DEADLINE, m.0.lag()).await
        {
            inner.dynamic.mongo_lag.store(lag.events() + 1, Relaxed);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &inner.registry) {
            tracing::warn!(error = %e, "could not encode the metrics");
        }
        out
    }

    /// Whether the instance is ready, and the checks that say so.
    pub async fn readiness(&self) -> (bool, serde_json::Value) {
        let inner = &self.0;
        let Some(live) = inner.live.get() else {
            return (false, serde_json::json!({ "ready": false, "nats": "connecting" }));
        };
        let state = |c: &async_nats::Client| c.connection_state() == State::Connected;
        let (store, serving) = (state(&live.store), state(&live.serving));
        let js = async_nats::jetstream::new(live.store.clone());
        let jetstream = store && matches!(tokio::time::timeout(FIGURE_DEADLINE, js.query_account()).await, Ok(Ok(_)));
        let taking = inner.dynamic.taking.load(Relaxed);
        let ready = store && serving && jetstream && taking;
        let checks = serde_json::json!({
            "ready": ready,
            "nats_store_connection": store,
            "nats_serving_connection": serving,
            "jetstream": jetstream,
            "taking_requests": taking,
            "partitions_owned": live.sessions.ownership().served().len(),
        });
        (ready, checks)
    }
}

/// Reads up to the blank line that ends a request head; an HTTP status on
/// a head that is too large or a connection closed early.
async fn read_head(stream: &mut TcpStream) -> Result<String, u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Err(400);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return String::from_utf8(buf).map_err(|_| 400);
        }
        if buf.len() > MAX_HEAD {
            return Err(431);
        }
    }
}

/// `GET /path HTTP/1.1` → ("GET", "/path").
fn parse_request_line(head: &str) -> Option<(&str, &str)> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let (method, path, version) = (parts.next()?, parts.next()?, parts.next()?);
    (parts.next().is_none() && version.starts_with("HTTP/1.") && path.starts_with('/')).then_some((method, path))
}

async fn respond(stream: &mut TcpStream, status: u16, kind: &str, body: &str, head_only: bool) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let allow = if status == 405 { "Allow: GET, HEAD\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// The process-wide counters, read when scraped: loads by source, the
/// Redis projection, the log's integrity checks, append latency, and the
/// in-process Mongo materializer.
#[derive(Debug)]
struct ProcessCollector(Arc<Dynamic>);

fn counter(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use bstore_session::stats;
        {
            let mut family = encoder.encode_descriptor(
                "session_loads",
                "Sessions loaded into memory, by where their state came from",
                None,
                MetricType::Counter,
            )?;
            for (source, n) in stats::loads_by_source() {
                let labels = [("source", source)];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut encoder,
            "redis_projection_behind",
            "Redis projections of an event dropped or failed, leaving a session's copy behind until a snapshot repairs it",
            stats::redis_behind(),
        )?;
        counter(
            &mut encoder,
            "redis_projection_repaired",
            "Snapshots written into Redis to repair a session's copy",
            stats::redis_repaired(),
        )?;
        counter(
            &mut encoder,
            "redis_untrusted_copies",
            "Redis copies not believed (changed behind the service's back) and loaded from the log",
            bstore_redis::untrusted_copies(),
        )?;
        counter(
            &mut encoder,
            "log_refused_events",
            "Events refused by replays as not where they were written (copies put back in the log)",
            bstore_log::refused_events(),
        )?;
        {
            let claims = stats::claim_counts();
            let mut family = encoder.encode_descriptor(
                "writer_claims",
                "Writer claim decisions (session.claim and claimed writes), by outcome",
                None,
                MetricType::Counter,
            )?;
            for (outcome, n) in [
                ("granted", claims.granted),
                ("renewed", claims.renewed),
                ("waited", claims.waited),
                ("superseded", claims.superseded),
                ("held_off", claims.held_off),
            ] {
                ConstCounter::new(n).encode(family.encode_family(&[("outcome", outcome)])?)?;
            }
        }
        let (written, failed, purged) = bstore_session::snapshot_counts();
        counter(&mut encoder, "snapshots_written", "Session snapshots written to the log's snapshot stream", written)?;
        counter(
            &mut encoder,
            "snapshots_failed",
            "Session snapshots that could not be written (loads replay more until the next)",
            failed,
        )?;
        counter(
            &mut encoder,
            "snapshots_skipped",
            "Snapshots a load did not believe (unreadable, another session's, or not followed by the log) and passed over",
            bstore_log::skipped_snapshots(),
        )?;
        counter(&mut encoder, "retention_purged_events", "Events the audit retention dropped once a base snapshot stood for them", purged)?;
        counter(
            &mut encoder,
            "log_broken_chains",
            "Replays stopped by a gap in a session's chain of events (answered 520)",
            bstore_log::broken_chains(),
        )?;
        {
            let (counts, sum) = stats::append_latency();
            let mut buckets: Vec<(f64, u64)> = stats::APPEND_BOUNDS_S.iter().copied().zip(counts).collect();
            // f64::MAX is how the encoder spells +Inf.
            buckets.push((f64::MAX, counts[stats::APPEND_BOUNDS_S.len()]));
            let m = encoder.encode_descriptor(
                "jetstream_append_duration_seconds",
                "Time JetStream took to acknowledge (or refuse) an append of an event",
                None,
                MetricType::Histogram,
            )?;
            let mut m = m;
            m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, counts.iter().sum(), &buckets, None)?;
        }
        // Declared even when no materializer runs here, with no sample.
        let stats = self.0.materializer.get().map(|m| m.0.stats());
        let lag = self.0.mongo_lag.load(Relaxed);
        let m = encoder.encode_descriptor(
            "mongo_lag_events",
            "Events of the log the Mongo materializer has yet to apply (stream last sequence minus its ack floor)",
            None,
            MetricType::Gauge,
        )?;
        if stats.is_some() && lag > 0 {
            ConstGauge::new((lag - 1) as i64).encode(m)?;
        }
        let m = encoder.encode_descriptor(
            "mongo_applied_seq",
            "The highest stream sequence this process materialized",
            None,
            MetricType::Gauge,
        )?;
        if let Some(s) = stats {
            ConstGauge::new(s.applied_seq as i64).encode(m)?;
        }
        let m = encoder.encode_descriptor(
            "mongo_quarantined_events",
            "Events the materializer set aside for good (listed by `verify`)",
            None,
            MetricType::Counter,
        )?;
        if let Some(s) = stats {
            ConstCounter::new(s.quarantined_events).encode(m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse_strictly() {
        assert_eq!(parse_request_line("GET /metrics HTTP/1.1\r\nHost: x"), Some(("GET", "/metrics")));
        assert_eq!(parse_request_line("GET /readyz?x=1 HTTP/1.0"), Some(("GET", "/readyz?x=1")));
        for bad in ["GET /metrics", "GET metrics HTTP/1.1", "GET /a b HTTP/1.1", "GET /m SPDY/3", ""] {
            assert_eq!(parse_request_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_process_figures_are_declared_even_before_anything_happened() {
        let endpoint = Endpoint::new(&bstore_api::Metrics::default());
        let text = futures_util::FutureExt::now_or_never(endpoint.scrape()).expect("no round trip without a live service");
        for name in [
            "bstore_session_loads",
            "bstore_jetstream_append_duration_seconds",
            "bstore_mongo_lag_events",
            "bstore_request_duration_seconds",
            "bstore_active_sessions",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing:\n{text}");
        }
        assert!(text.contains("bstore_build_info{version=\""), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
