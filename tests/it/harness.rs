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
