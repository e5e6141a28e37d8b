//! Request counters and latency histograms, reported in the `data` field of
//! `$SRV.STATS` — the NATS micro-service way of exposing service figures, so
//! an operator needs nothing but NATS to read them — and, per tenant, in the
//! Prometheus families [`Metrics::register`] adds to a registry (served on
//! the operator's HTTP endpoint, never over NATS: tenant names are in them).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bstore_domain::TenantId;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::{Map, Value, json};

use crate::ErrorCode;
use crate::protocol::ApiOp;
use crate::route::RouteMetrics;

/// Upper bounds of the Prometheus latency buckets, in seconds (+Inf follows).
pub const LATENCY_BOUNDS_S: [f64; 12] = [0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];
/// The `tenant` label of requests whose subject did not decode.
pub const NO_TENANT: &str = "(none)";
/// The `tenant` label of tenants past the labelled ones.
pub const OTHER_TENANT: &str = "(other)";
/// The `op` label of requests whose subject named no known op.
pub const NO_OP: &str = "(none)";
/// Tenants labelled by name unless told otherwise ([`Metrics::new`]).
pub const DEFAULT_TENANT_LABELS: usize = 1000;

/// Upper bounds of the latency buckets, in microseconds (the last is +Inf).
const BOUNDS_US: [u64; 10] = [250, 500, 1_000, 2_000, 5_000, 10_000, 50_000, 250_000, 1_000_000, u64::MAX];
const CODES: [ErrorCode; 10] = [
    ErrorCode::BadRequest,
    ErrorCode::UnknownOp,
    ErrorCode::Conflict,
    ErrorCode::TooLarge,
    ErrorCode::InvalidId,
    ErrorCode::Internal,
    ErrorCode::Unavailable,
    ErrorCode::Timeout,
    ErrorCode::Unreadable,
    ErrorCode::Superseded,
];

#[derive(Default)]
struct OpMetrics {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BOUNDS_US.len()],
}

type OpLabel = [(&'static str, String); 1];
type Labels = [(&'static str, String); 2];
type ErrorLabels = [(&'static str, String); 3];
type HistogramFamily = Family<OpLabel, Histogram, fn() -> Histogram>;

/// Counters shared by every request task. The `$SRV.STATS` figures are
/// atomics only; the Prometheus families take a read lock per request (a
/// write lock the first time a label set is seen).
pub struct Metrics {
    ops: [OpMetrics; ApiOp::ALL.len()],
    /// Requests whose subject named no known op.
    unknown: AtomicU64,
    codes: [AtomicU64; CODES.len()],
    pub(crate) routing: Arc<RouteMetrics>,
    /// Latency per op only: a histogram per tenant would be a dozen series
    /// per tenant and op; the tenant is on the counters.
    latency: HistogramFamily,
    requests: Family<Labels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    /// Tenants labelled by name so far; past `max_tenants` the others share
    /// [`OTHER_TENANT`], so a flood of tenant names cannot grow the figures
    /// without bound.
    tenants: RwLock<HashSet<String>>,
    max_tenants: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(DEFAULT_TENANT_LABELS)
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BOUNDS_S)
}

impl Metrics {
    /// Figures that label at most `max_tenants` tenants by name (0: none).
    pub fn new(max_tenants: usize) -> Self {
        Self {
            ops: Default::default(),
            unknown: AtomicU64::new(0),
            codes: Default::default(),
            routing: Arc::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            requests: Family::default(),
            errors: Family::default(),
            tenants: RwLock::new(HashSet::new()),
            max_tenants,
        }
    }

    /// Adds the Prometheus families to `registry`: request latency per op
    /// (`request_duration_seconds`), requests by op and tenant
    /// (`requests_total`), errors by op, code and tenant
    /// (`request_errors_total`), and the routing counts.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("request_duration_seconds", "Time from a request's arrival to its answer, by op", self.latency.clone());
        registry.register("requests", "Requests answered, by op and tenant", self.requests.clone());
        registry.register("request_errors", "Requests answered with an error, by op, code and tenant", self.errors.clone());
        registry.register_collector(Box::new(RoutingCollector(self.routing.clone())));
    }

    /// The label a tenant's figures go under.
    fn tenant_label(&self, tenant: &TenantId) -> String {
        let name = tenant.as_str();
        if self.tenants.read().expect("not poisoned").contains(name) {
            return name.to_owned();
        }
        let mut tenants = self.tenants.write().expect("not poisoned");
        if tenants.contains(name) || tenants.len() < self.max_tenants {
            tenants.insert(name.to_owned());
            return name.to_owned();
        }
        OTHER_TENANT.to_owned()
    }

    /// Records one answered request; `op` is its op token, if the subject
    /// named a known op, and `tenant` its tenant, if the subject decoded.
    pub(crate) fn record(&self, op: Option<&str>, tenant: Option<&TenantId>, error: Option<ErrorCode>, took: Duration) {
        let tenant = tenant.map_or_else(|| NO_TENANT.to_owned(), |t| self.tenant_label(t));
        let known = op.and_then(ApiOp::parse);
        let op_label = known.map_or(NO_OP, |op| op.as_str()).to_owned();
        if let Some(code) = error {
            self.errors.get_or_create(&[("op", op_label.clone()), ("code", code.number().to_string()), ("tenant", tenant.clone())]).inc();
        }
        if known.is_some() {
            self.latency.get_or_create(&[("op", op_label.clone())]).observe(took.as_secs_f64());
            self.requests.get_or_create(&[("op", op_label), ("tenant", tenant)]).inc();
        }
        if let Some(code) = error
            && let Some(i) = CODES.iter().position(|c| *c == code)
        {
            self.codes[i].fetch_add(1, Relaxed);
        }
        let Some(m) = op.and_then(ApiOp::parse).map(|op| &self.ops[op.index()]) else {
            self.unknown.fetch_add(1, Relaxed);
            return;
        };
        m.requests.fetch_add(1, Relaxed);
        if error.is_some() {
            m.errors.fetch_add(1, Relaxed);
        }
        let us = took.as_micros() as u64;
        let b = BOUNDS_US.iter().position(|&b| us <= b).unwrap_or(BOUNDS_US.len() - 1);
        m.buckets[b].fetch_add(1, Relaxed);
    }

    /// The figures as JSON for `$SRV.STATS`.
    pub fn snapshot(&self) -> Value {
        let mut ops = Map::new();
        for (op, m) in ApiOp::ALL.iter().zip(&self.ops) {
            // Cumulative buckets, as Prometheus histograms count them.
            let mut total = 0;
            let mut buckets = Map::new();
            for (bound, count) in BOUNDS_US.iter().zip(&m.buckets) {
                total += count.load(Relaxed);
                let le = if *bound == u64::MAX { "+Inf".to_string() } else { bound.to_string() };
                buckets.insert(le, total.into());
            }
            ops.insert(
                op.as_str().to_string(),
                json!({ "requests": m.requests.load(Relaxed), "errors": m.errors.load(Relaxed), "latency_us_le": buckets }),
            );
        }
        let codes: Map<String, Value> =
            CODES.iter().zip(&self.codes).map(|(c, n)| (c.number().to_string(), n.load(Relaxed).into())).collect();
        json!({ "ops": ops, "unknown_op_requests": self.unknown.load(Relaxed), "errors_by_code": codes })
    }
}

/// The routing counts, read when scraped.
#[derive(Debug)]
struct RoutingCollector(Arc<RouteMetrics>);

impl prometheus_client::collector::Collector for RoutingCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::counter::ConstCounter;
        let (refused, shed, forwarded) = self.0.counts();
        for (name, help, value) in [
            (
                "routing_refused_reply_subjects",
                "Requests refused without a reply: their reply subject is outside the inbox prefixes",
                refused,
            ),
            ("routing_shed_overloaded", "Requests answered 503 at once because api.max_in_flight were in flight", shed),
            ("routing_forwarded_to_owner", "Requests forwarded to the instance owning their partition", forwarded),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_cumulative_buckets_and_errors_by_code() {
        let m = Metrics::default();
        m.record(Some("keys.get"), None, None, Duration::from_micros(300));
        m.record(Some("keys.get"), None, Some(ErrorCode::Unreadable), Duration::from_millis(3));
        m.record(None, None, Some(ErrorCode::UnknownOp), Duration::ZERO);
        let s = m.snapshot();
        assert_eq!(s["ops"]["keys.get"]["requests"], 2);
        assert_eq!(s["ops"]["keys.get"]["errors"], 1);
        assert_eq!(s["ops"]["keys.get"]["latency_us_le"]["250"], 0);
        assert_eq!(s["ops"]["keys.get"]["latency_us_le"]["500"], 1);
        assert_eq!(s["ops"]["keys.get"]["latency_us_le"]["5000"], 2);
        assert_eq!(s["ops"]["keys.get"]["latency_us_le"]["+Inf"], 2);
        assert_eq!(s["errors_by_code"]["520"], 1);
        assert_eq!(s["unknown_op_requests"], 1);
    }
}

#[cfg(test)]
mod prometheus_tests {
    use super::*;

    fn scrape(m: &Metrics) -> String {
        let mut registry = Registry::with_prefix("bstore");
        m.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn requests_are_labelled_by_op_and_tenant_and_errors_by_code() {
        let m = Metrics::new(2);
        let (a, b, c) = (TenantId::parse("acme").unwrap(), TenantId::parse("bravo").unwrap(), TenantId::parse("carol").unwrap());
        m.record(Some("keys.get"), Some(&a), None, Duration::from_micros(300));
        m.record(Some("keys.get"), Some(&a), Some(ErrorCode::Unreadable), Duration::from_millis(3));
        m.record(Some("creds.put"), Some(&b), None, Duration::from_millis(20));
        m.record(Some("creds.put"), Some(&c), Some(ErrorCode::Conflict), Duration::from_millis(20));
        m.record(None, None, Some(ErrorCode::BadRequest), Duration::ZERO);
        let text = scrape(&m);
        assert!(text.contains(r#"bstore_requests_total{op="keys.get",tenant="acme"} 2"#), "{text}");
        assert!(text.contains(r#"bstore_request_duration_seconds_count{op="keys.get"} 2"#), "{text}");
        assert!(text.contains(r#"bstore_request_duration_seconds_bucket{le="0.0005",op="keys.get"} 1"#), "{text}");
        assert!(text.contains(r#"bstore_requests_total{op="creds.put",tenant="bravo"} 1"#), "{text}");
        assert!(text.contains(r#"bstore_request_duration_seconds_count{op="creds.put"} 2"#), "{text}");
        assert!(text.contains(r#"bstore_request_errors_total{op="keys.get",code="520",tenant="acme"} 1"#), "{text}");
        // Past two tenants the third shares the "(other)" label.
        assert!(text.contains(r#"bstore_request_errors_total{op="creds.put",code="409",tenant="(other)"} 1"#), "{text}");
        assert!(text.contains(r#"bstore_request_errors_total{op="(none)",code="400",tenant="(none)"} 1"#), "{text}");
        assert!(text.contains("bstore_routing_shed_overloaded_total 0"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
