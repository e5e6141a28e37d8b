//! A service over a real nats-server, and clients for it.

use std::path::Path;

use bstore_api::client::SessionClient;
use bstore_testkit::{NatsServer, ServiceProcess, TempDir};

/// A fixed test key (never used outside tests).
pub const KEY1: &str = "1:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
/// A second test key, for rotation tests.
pub const KEY2: &str = "2:AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

pub fn service_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_baileys-store"))
}

/// One nats-server and one service process pointed at it.
/// Fields drop in order: the service stops before its server.
pub struct Stack {
    pub service: ServiceProcess,
    pub nats: NatsServer,
    pub nc: async_nats::Client,
    pub dir: TempDir,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// `extra` environment variables are added to the service's.
    pub async fn start_with(extra: &[(&str, &str)]) -> Self {
        let nats = NatsServer::start();
        let dir = TempDir::new("it");
        let service = start_service(&nats, &dir, &[&[("BSTORE_KEYS", KEY1)], extra].concat());
        let nc = connect(&nats.url()).await;
        Self { nats, service, dir, nc }
    }

    pub fn session(&self, tenant: &str, session: &str) -> SessionClient {
        SessionClient::new(self.nc.clone(), "bstore", tenant, session)
    }

    /// Another service process on the same nats-server.
    pub fn another_service(&self, extra: &[(&str, &str)]) -> ServiceProcess {
        start_service(&self.nats, &self.dir, &[&[("BSTORE_KEYS", KEY1)], extra].concat())
    }
}

pub fn start_service(nats: &NatsServer, dir: &TempDir, env: &[(&str, &str)]) -> ServiceProcess {
    let url = nats.url();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let mut all = vec![("BSTORE_NATS_URL", url.as_str()), ("BSTORE_DATA_DIR", data)];
    all.extend_from_slice(env);
    ServiceProcess::start(service_bin(), &all, &dir.path().join("logs"))
}

pub async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new().skip_subject_validation(true).connect(url).await.expect("connecting to nats-server")
}

/// A request id unique within the test run.
pub fn rid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Short partition leases, so that ownership changes take seconds in tests.
pub fn fast_leases() -> [(&'static str, &'static str); 3] {
    [("BSTORE__CLUSTER__LEASE_TTL", "3"), ("BSTORE__CLUSTER__RENEW_INTERVAL", "0.5"), ("BSTORE__CLUSTER__MARGIN", "1")]
}

/// A service process pointed at `urls` (comma-separated), with its own data
/// directory `<dir>/data-<label>` and its log under `<dir>/logs`.
pub fn start_service_at(urls: &str, dir: &TempDir, label: &str, env: &[(&str, &str)]) -> ServiceProcess {
    let data = dir.path().join(format!("data-{label}"));
    let data = data.to_str().unwrap();
    let mut all = vec![("BSTORE_NATS_URL", urls), ("BSTORE_DATA_DIR", data), ("BSTORE_KEYS", KEY1)];
    all.extend_from_slice(env);
    ServiceProcess::start(service_bin(), &all, &dir.path().join("logs"))
}

/// A client connection that tries `urls` in the order given (the first is
/// its home node) and reconnects for ever.
pub async fn connect_ordered(urls: &[String]) -> async_nats::Client {
    let addrs: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().expect("a NATS URL")).collect();
    async_nats::ConnectOptions::new()
        .skip_subject_validation(true)
        .retain_servers_order()
        .max_reconnects(None)
        .connect(addrs)
        .await
        .expect("connecting to nats-server")
}

/// What the Node client retries with the same `rid`: the service was
/// unreachable, unavailable or out of time.
pub fn retryable(e: &bstore_api::client::ClientError) -> bool {
    use bstore_api::client::ClientError;
    matches!(e, ClientError::TimedOut | ClientError::NoResponders) || matches!(e.code(), Some(503 | 504))
}

/// Calls `f` until it succeeds, fails with an error `retry` rejects, or
/// `budget` has passed (then the last error), pausing 50 ms to 500 ms between
/// attempts. A write's closure must reuse its `rid`.
pub async fn with_retries<T, F, Fut>(
    budget: std::time::Duration,
    retry: impl Fn(&bstore_api::client::ClientError) -> bool,
    mut f: F,
) -> Result<T, bstore_api::client::ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, bstore_api::client::ClientError>>,
{
    let start = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(50);
    loop {
        match f().await {
            Err(e) if retry(&e) && start.elapsed() < budget => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

/// `baileys-store history` of one session, read from the log at `urls`: one
/// JSON object per event (`seq`, `rid`, `kind`, ...), in log order.
pub fn history(urls: &str, tenant: &str, session: &str) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(service_bin())
        .args(["history", "--tenant", tenant, "--session", session])
        .env("BSTORE_NATS_URL", urls)
        .env("BSTORE_KEYS", KEY1)
        .env("BSTORE_LOG", "warn")
        .output()
        .expect("running baileys-store history");
    assert!(out.status.success(), "history of {tenant}/{session} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}
