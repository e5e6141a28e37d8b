//! Request counters and latency histograms, reported in the `data` field of
//! `$SRV.STATS` — the NATS micro-service way of exposing service figures, so
//! an operator needs nothing but NATS to read them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::ErrorCode;
use crate::protocol::ApiOp;

/// Upper bounds of the latency buckets, in microseconds (the last is +Inf).
const BOUNDS_US: [u64; 10] = [250, 500, 1_000, 2_000, 5_000, 10_000, 50_000, 250_000, 1_000_000, u64::MAX];
const CODES: [ErrorCode; 9] = [
    ErrorCode::BadRequest,
    ErrorCode::UnknownOp,
    ErrorCode::Conflict,
    ErrorCode::TooLarge,
    ErrorCode::InvalidId,
    ErrorCode::Internal,
    ErrorCode::Unavailable,
    ErrorCode::Timeout,
    ErrorCode::Unreadable,
];

#[derive(Default)]
struct OpMetrics {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BOUNDS_US.len()],
}

/// Counters shared by every request task. Lock-free: only atomics.
#[derive(Default)]
pub struct Metrics {
    ops: [OpMetrics; ApiOp::ALL.len()],
    /// Requests whose subject named no known op.
    unknown: AtomicU64,
    codes: [AtomicU64; CODES.len()],
}

impl Metrics {
    /// Records one answered request; `op` is its op token, if the subject
    /// named a known op.
    pub(crate) fn record(&self, op: Option<&str>, error: Option<ErrorCode>, took: Duration) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_cumulative_buckets_and_errors_by_code() {
        let m = Metrics::default();
        m.record(Some("keys.get"), None, Duration::from_micros(300));
        m.record(Some("keys.get"), Some(ErrorCode::Unreadable), Duration::from_millis(3));
        m.record(None, Some(ErrorCode::UnknownOp), Duration::ZERO);
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
