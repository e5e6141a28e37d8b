//! Running clients and summarizing latencies.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Latencies and errors of one measured row.
pub struct Outcome {
    pub latencies: Vec<Duration>,
    pub errors: usize,
    pub elapsed: Duration,
    /// Open loop only: how late the dispatcher issued requests, on average.
    pub mean_lateness: Option<Duration>,
}

impl Outcome {
    /// The latency at quantile `p` (0..1), in microseconds.
    pub fn pct_us(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        self.latencies[i].as_secs_f64() * 1e6
    }

    /// Completed requests per second.
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `c` closed-loop clients for `secs`; client `i` calls `op(i, n)` for
/// its n-th request and sends the next only when that one is answered.
pub async fn closed_loop<F, Fut>(c: usize, secs: Duration, op: F) -> Outcome
where
    F: Fn(usize, usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let start = Instant::now();
    let deadline = start + secs;
    let mut tasks = Vec::new();
    for client in 0..c {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut n) = (Vec::new(), 0usize, 0usize);
            while Instant::now() < deadline {
                let t = Instant::now();
                match op(client, n).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        if errors == 1 {
                            eprintln!("client {client}: {e}");
                        }
                    }
                }
                n += 1;
            }
            (lat, errors)
        }));
    }
    let mut out = Outcome { latencies: Vec::new(), errors: 0, elapsed: Duration::ZERO, mean_lateness: None };
    for t in tasks {
        let (lat, errors) = t.await.expect("client task");
        out.latencies.extend(lat);
        out.errors += errors;
    }
    out.elapsed = start.elapsed();
    out.latencies.sort_unstable();
    out
}

/// Issues `op(k)` at a fixed `rate` per second for `secs`, whatever the
/// replies do (open loop), and measures each latency from the time the
/// request was *scheduled*, not sent: a stall shows up in every request it
/// delays (no coordinated omission). The schedule runs on its own thread
/// with `thread::sleep`, so timer slack (tens of µs) is counted against the
/// service, not hidden.
pub async fn open_loop<F, Fut>(rate: f64, secs: Duration, op: F) -> Outcome
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let total = (rate * secs.as_secs_f64()).round() as usize;
    let handle = tokio::runtime::Handle::current();
    let op = Arc::new(op);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now() + Duration::from_millis(5);
    let dispatcher = std::thread::spawn(move || {
        let mut late = Duration::ZERO;
        for k in 0..total {
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            late += Instant::now().saturating_duration_since(due);
            let op = op.clone();
            let tx = tx.clone();
            handle.spawn(async move {
                let r = op(k).await;
                let _ = tx.send((r, due.elapsed()));
            });
        }
        late / total.max(1) as u32
    });
    let mut out = Outcome { latencies: Vec::with_capacity(total), errors: 0, elapsed: Duration::ZERO, mean_lateness: None };
    for _ in 0..total {
        let Some((r, lat)) = rx.recv().await else { break };
        match r {
            Ok(()) => out.latencies.push(lat),
            Err(e) => {
                out.errors += 1;
                if out.errors == 1 {
                    eprintln!("open loop: {e}");
                }
            }
        }
    }
    out.elapsed = start.elapsed();
    out.mean_lateness = dispatcher.join().ok();
    out.latencies.sort_unstable();
    out
}

/// The header of the latency tables.
pub fn print_header() {
    println!("{:<44} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9}", "operation", "conc", "sess", "p50 µs", "p99 µs", "p999 µs", "req/s");
}

/// One row: `sessions` is `-` for floors.
pub fn print_row(name: &str, c: &str, sessions: &str, o: &Outcome) {
    let mut extra = String::new();
    if o.errors > 0 {
        extra.push_str(&format!("  ({} errors)", o.errors));
    }
    if let Some(l) = o.mean_lateness {
        extra.push_str(&format!("  (dispatch lateness {:.0} µs mean)", l.as_secs_f64() * 1e6));
    }
    println!(
        "{name:<44} {c:>5} {sessions:>6} {:>9.0} {:>9.0} {:>9.0} {:>9.0}{extra}",
        o.pct_us(0.50),
        o.pct_us(0.99),
        o.pct_us(0.999),
        o.rate()
    );
}
