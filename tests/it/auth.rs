//! The service authenticates to NATS every way nats-server offers, says
//! clearly when it cannot, and its embedded default is safe on a shared
//! machine: every client needs a password, bots reach only the request
//! subjects, and the private server never outlives the service.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bstore_api::client::SessionClient;
use bstore_testkit::{NatsServer, ServiceProcess, TempDir, TestCerts, wait_for};

use crate::harness::{KEY1, rid, service_bin, start_service};

/// A write and a read back through the service, over `nc`. The write is
/// retried while nobody answers yet: a service that has just started may
/// still be taking up its partitions.
async fn round_trip(nc: async_nats::Client, tenant: &str) {
    let s = SessionClient::new(nc, "bstore", tenant, "s").with_timeout(Duration::from_secs(10));
    let rid = rid();
    let start = Instant::now();
    loop {
        match s.creds_put(&rid, b"creds of the bot").await {
            Ok(_) => break,
            Err(bstore_api::client::ClientError::NoResponders) if start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("a write through the service: {e:?}"),
        }
    }
    assert_eq!(s.creds_get().await.expect("a read through the service").as_deref(), Some(&b"creds of the bot"[..]));
}

/// Runs `baileys-store serve` with `env` until it exits (at most 30 s) and
/// returns its exit status and everything it printed.
fn serve_until_exit(env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let dir = TempDir::new("auth-exit");
    let mut cmd = std::process::Command::new(service_bin());
    cmd.arg("serve");
    for (k, _) in std::env::vars() {
        if k.starts_with("BSTORE") {
            cmd.env_remove(k);
        }
    }
    cmd.env("NO_COLOR", "1").env("BSTORE_DATA_DIR", dir.path()).env("BSTORE_KEYS", KEY1);
    cmd.envs(env.iter().copied());
    let out_file = dir.path().join("out.log");
    let out = std::fs::File::create(&out_file).unwrap();
    cmd.stdout(out.try_clone().unwrap()).stderr(out).stdin(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("starting the service");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the service did not exit within 30 s; output:\n{}", std::fs::read_to_string(&out_file).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(&out_file).unwrap_or_default())
}

fn url_with(nats: &NatsServer, userinfo: &str) -> String {
    nats.url().replacen("nats://", &format!("nats://{userinfo}@"), 1)
}

#[tokio::test]
async fn serves_with_user_and_password_from_the_config_and_from_the_url() {
    let nats = NatsServer::start_conf("authorization { users: [ { user: store, password: \"s3cret-pw\" } ] }");
    let dir = TempDir::new("auth-userpass");
    let client = async_nats::ConnectOptions::with_user_and_password("store".into(), "s3cret-pw".into()).connect(nats.url()).await.unwrap();

    let mut by_config =
        start_service(&nats, &dir, &[("BSTORE_KEYS", KEY1), ("BSTORE_NATS_USER", "store"), ("BSTORE_NATS_PASSWORD", "s3cret-pw")]);
    round_trip(client.clone(), "config").await;
    by_config.terminate();

    let url = url_with(&nats, "store:s3cret-pw");
    let by_url = start_service(&nats, &dir, &[("BSTORE_KEYS", KEY1), ("BSTORE_NATS_URL", url.as_str())]);
    round_trip(client, "url").await;
    assert!(!by_url.log_text().contains("s3cret-pw"), "the password stays out of the log");
}

#[tokio::test]
async fn the_store_connection_takes_its_jetstream_replies_on_an_inbox_of_its_own() {
    // The store identity may not subscribe to _INBOX.>: its JetStream
    // replies must come to _BSTORE_JS.>, where no bot-named reply lands.
    let nats = NatsServer::start_conf(
        "authorization { users: [\n\
         { user: store, password: store-pw, permissions: { subscribe: { deny: [\"_INBOX.>\"] } } }\n\
         { user: serve, password: serve-pw }\n\
         { user: bot, password: bot-pw }\n] }",
    );
    let dir = TempDir::new("auth-inbox");
    let _service = start_service(
        &nats,
        &dir,
        &[
            ("BSTORE_KEYS", KEY1),
            ("BSTORE_NATS_USER", "store"),
            ("BSTORE_NATS_PASSWORD", "store-pw"),
            ("BSTORE__NATS__SERVE__USER", "serve"),
            ("BSTORE__NATS__SERVE__PASSWORD", "serve-pw"),
        ],
    );
    let client = async_nats::ConnectOptions::with_user_and_password("bot".into(), "bot-pw".into()).connect(nats.url()).await.unwrap();
    round_trip(client, "inbox").await;
    // The tools too.
    let out = std::process::Command::new(service_bin())
        .args(["history", "--tenant", "inbox", "--session", "s"])
        .env("BSTORE_NATS_URL", nats.url().replacen("nats://", "nats://store:store-pw@", 1))
        .env("BSTORE_KEYS", KEY1)
        .env("BSTORE_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("creds_put"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test]
async fn serves_with_a_token() {
    let nats = NatsServer::start_conf("authorization { token: \"t0ken-for-the-store\" }");
    let dir = TempDir::new("auth-token");
    let _service = start_service(&nats, &dir, &[("BSTORE_KEYS", KEY1), ("BSTORE_NATS_TOKEN", "t0ken-for-the-store")]);
    let client = async_nats::ConnectOptions::with_token("t0ken-for-the-store".into()).connect(nats.url()).await.unwrap();
    round_trip(client, "token").await;
}

#[tokio::test]
async fn serves_with_an_nkey_seed_file() {
    let store = nkeys::KeyPair::new_user();
    let bot = nkeys::KeyPair::new_user();
    let nats = NatsServer::start_conf(&format!(
        "authorization {{ users: [ {{ nkey: {} }}, {{ nkey: {} }} ] }}",
        store.public_key(),
        bot.public_key()
    ));
    let dir = TempDir::new("auth-nkey");
    let seed_file = dir.path().join("store.nk");
    std::fs::write(&seed_file, format!("{}\n", store.seed().unwrap())).unwrap();
    let _service = start_service(&nats, &dir, &[("BSTORE_KEYS", KEY1), ("BSTORE_NATS_NKEY_FILE", seed_file.to_str().unwrap())]);
    let client = async_nats::ConnectOptions::with_nkey(bot.seed().unwrap()).connect(nats.url()).await.unwrap();
    round_trip(client, "nkey").await;
}

/// nats-server in operator mode (decentralized auth), with an account and
/// users signed here with NKeys, as `nsc` would sign them.
struct Operator {
    account: nkeys::KeyPair,
    conf: String,
}

impl Operator {
    fn new() -> Self {
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        let op_jwt = jwt(&operator, &operator.public_key(), "test-operator", serde_json::json!({ "type": "operator", "version": 2 }));
        let limits = serde_json::json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
        });
        let acct_jwt = jwt(
            &operator,
            &account.public_key(),
            "bstore",
            serde_json::json!({ "type": "account", "version": 2, "limits": limits, "default_permissions": { "pub": {}, "sub": {} } }),
        );
        // JetStream needs a system account.
        let system = nkeys::KeyPair::new_account();
        let sys_jwt = jwt(&operator, &system.public_key(), "SYS", serde_json::json!({ "type": "account", "version": 2 }));
        let conf = format!(
            "operator: {op_jwt}\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {acct}: {acct_jwt}\n  {sys}: {sys_jwt}\n}}\n",
            sys = system.public_key(),
            acct = account.public_key()
        );
        Self { account, conf }
    }

    /// A creds file for a new user of the account.
    fn creds(&self, name: &str) -> String {
        let user = nkeys::KeyPair::new_user();
        let user_jwt = jwt(
            &self.account,
            &user.public_key(),
            name,
            serde_json::json!({ "type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1 }),
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        )
    }
}

fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({
        "jti": rid().to_uppercase(), "iat": now, "iss": issuer.public_key(), "name": name, "sub": subject, "nats": nats
    });
    let body = b64(claims.to_string().as_bytes());
    let signature = issuer.sign(format!("{header}.{body}").as_bytes()).unwrap();
    format!("{header}.{body}.{}", b64(&signature))
}

#[tokio::test]
async fn serves_with_a_creds_file_under_decentralized_auth() {
    let operator = Operator::new();
    let nats = NatsServer::start_conf(&operator.conf);
    let dir = TempDir::new("auth-creds");
    let store_creds = dir.path().join("store.creds");
    std::fs::write(&store_creds, operator.creds("store")).unwrap();
    let bot_creds = dir.path().join("bot.creds");
    std::fs::write(&bot_creds, operator.creds("bot")).unwrap();
    let _service = start_service(&nats, &dir, &[("BSTORE_KEYS", KEY1), ("BSTORE_NATS_CREDS", store_creds.to_str().unwrap())]);
    let client = async_nats::ConnectOptions::with_credentials_file(&bot_creds).await.unwrap().connect(nats.url()).await.unwrap();
    round_trip(client, "jwt").await;
    // A user the account did not sign is refused: the server really checks.
    let stranger = {
        let other = Operator::new();
        let file = dir.path().join("stranger.creds");
        std::fs::write(&file, other.creds("stranger")).unwrap();
        file
    };
    let refused = async_nats::ConnectOptions::with_credentials_file(&stranger).await.unwrap().connect(nats.url()).await;
    assert!(refused.is_err(), "a user of another operator must be refused");
}

#[tokio::test]
async fn serves_over_tls_with_a_ca_and_a_client_certificate() {
    let certs = TestCerts::generate();
    let nats = NatsServer::start_conf(&certs.nats_server_block());
    let dir = TempDir::new("auth-tls");
    let ca = certs.ca();
    let (cert, key) = (certs.client_cert(), certs.client_key());
    let tls_env = [
        ("BSTORE_KEYS", KEY1),
        ("BSTORE_NATS_CA", ca.to_str().unwrap()),
        ("BSTORE_NATS_CERT", cert.to_str().unwrap()),
        ("BSTORE_NATS_KEY", key.to_str().unwrap()),
        ("BSTORE__NATS__TLS__REQUIRED", "true"),
    ];
    let _service = start_service(&nats, &dir, &tls_env);
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(ca.clone())
        .add_client_certificate(cert.clone(), key.clone())
        .require_tls(true)
        .connect(nats.url())
        .await
        .unwrap();
    round_trip(client, "tls").await;

    // Without the client certificate the server refuses the handshake, and
    // the service says so instead of retrying.
    let (status, out) = serve_until_exit(&[
        ("BSTORE_NATS_URL", nats.url().as_str()),
        ("BSTORE_NATS_CA", ca.to_str().unwrap()),
        ("BSTORE__NATS__CONNECT_TIMEOUT", "5"),
    ]);
    assert!(!status.success());
    assert!(out.contains("TLS handshake"), "{out}");
    // Without the CA the server's certificate is not trusted.
    let (status, out) = serve_until_exit(&[
        ("BSTORE_NATS_URL", nats.url().as_str()),
        ("BSTORE_NATS_CERT", cert.to_str().unwrap()),
        ("BSTORE_NATS_KEY", key.to_str().unwrap()),
        ("BSTORE__NATS__CONNECT_TIMEOUT", "5"),
    ]);
    assert!(!status.success());
    assert!(out.contains("TLS handshake"), "{out}");
    // A certificate file that is not there is named.
    let (status, out) = serve_until_exit(&[
        ("BSTORE_NATS_URL", nats.url().as_str()),
        ("BSTORE_NATS_CA", ca.to_str().unwrap()),
        ("BSTORE_NATS_CERT", "/nonexistent/client.pem"),
        ("BSTORE_NATS_KEY", key.to_str().unwrap()),
    ]);
    assert!(!status.success());
    assert!(out.contains("nats.tls.cert_file") && out.contains("/nonexistent/client.pem"), "{out}");
}

#[tokio::test]
async fn a_wrong_password_ends_the_start_with_a_clear_message() {
    let nats = NatsServer::start_conf("authorization { users: [ { user: store, password: \"right-password\" } ] }");
    let start = Instant::now();
    let (status, out) = serve_until_exit(&[
        ("BSTORE_NATS_URL", nats.url().as_str()),
        ("BSTORE_NATS_USER", "store"),
        ("BSTORE_NATS_PASSWORD", "wrong-password"),
    ]);
    assert!(!status.success(), "{out}");
    assert!(out.contains("refused") && out.contains("authorization violation"), "{out}");
    assert!(!out.contains("wrong-password"), "the password stays out of the output: {out}");
    assert!(start.elapsed() < Duration::from_secs(20), "no retry loop on a refused credential");
    // In the URL too.
    let (status, out) = serve_until_exit(&[("BSTORE_NATS_URL", url_with(&nats, "store:wrong-password").as_str())]);
    assert!(!status.success(), "{out}");
    assert!(out.contains("authorization violation"), "{out}");
    assert!(!out.contains("wrong-password"), "the password stays out of the output: {out}");
}

#[tokio::test]
async fn an_unreachable_server_ends_the_start_after_the_connect_timeout() {
    let port = bstore_testkit::free_port();
    let (status, out) =
        serve_until_exit(&[("BSTORE_NATS_URL", format!("nats://127.0.0.1:{port}").as_str()), ("BSTORE__NATS__CONNECT_TIMEOUT", "1")]);
    assert!(!status.success(), "{out}");
    assert!(out.contains("could not reach NATS"), "{out}");
}

// ---- the embedded default ----

pub(crate) struct Embedded {
    service: ServiceProcess,
    pub(crate) data: PathBuf,
    _dir: TempDir,
}

impl Embedded {
    pub(crate) fn start() -> Self {
        let dir = TempDir::new("auth-embedded");
        let data = dir.path().join("data");
        let bin = bstore_testkit::find_bin("NATS_SERVER_BIN", ".tools/nats/bin/nats-server", "nats-server");
        let env = [
            ("BSTORE_DATA_DIR", data.to_str().unwrap()),
            ("BSTORE__EMBEDDED__PORT", "-1"),
            ("BSTORE_NATS_SERVER_BIN", bin.to_str().unwrap()),
        ];
        let service = ServiceProcess::start(service_bin(), &env, &dir.path().join("logs"));
        Self { service, data, _dir: dir }
    }

    pub(crate) fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.data.join(file)).unwrap().trim().to_owned()
    }

    fn server_pid(&self) -> String {
        self.read("nats/nats-server.pid")
    }

    /// A connection as the service user, as the command-line tools make it.
    async fn as_service(&self) -> async_nats::Client {
        let password = self.read("nats/service.password");
        async_nats::ConnectOptions::with_user_and_password("bstore-service".into(), password)
            .connect(self.read("nats.url"))
            .await
            .expect("the service user connects")
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Connects with the credentials written into `url`, collecting the
/// errors the server reports.
pub(crate) async fn connect_as(url: &str) -> (async_nats::Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (rest, host) = url.strip_prefix("nats://").unwrap().rsplit_once('@').expect("credentials in the URL");
    let (user, password) = rest.split_once(':').unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let nc = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(format!("nats://{host}"))
        .await
        .expect("the bot URL connects");
    (nc, rx)
}

async fn next_error(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("the server reports an error").unwrap()
}

#[tokio::test]
async fn the_embedded_default_requires_credentials_and_confines_bots_to_the_request_subjects() {
    let embedded = Embedded::start();
    assert_eq!(mode(&embedded.data.join("bot.url")), 0o600, "the bot URL holds a password");
    assert_eq!(mode(&embedded.data.join("nats")), 0o700);
    for file in ["nats/service.password", "nats/bot.password", "nats/nats-server.conf"] {
        assert_eq!(mode(&embedded.data.join(file)), 0o600, "{file}");
    }
    let url = embedded.read("nats.url");
    let bot_url = embedded.read("bot.url");
    assert!(bot_url.starts_with("nats://bot:") && bot_url.ends_with(url.strip_prefix("nats://").unwrap()), "{bot_url}");

    let anonymous = async_nats::ConnectOptions::new().connect(url.as_str()).await;
    match anonymous {
        Err(e) => assert_eq!(e.kind(), async_nats::ConnectErrorKind::AuthorizationViolation, "{e}"),
        Ok(_) => panic!("a client without credentials must be refused"),
    }

    let (bot, mut errors) = connect_as(&bot_url).await;
    round_trip(bot.clone(), "embedded").await;
    let service = embedded.as_service().await;
    let js = async_nats::jetstream::new(service);
    let before = js.get_stream("BSTORE_EVENTS").await.unwrap().info().await.unwrap().state.messages;
    assert!(before >= 1, "the bot's write is in the stream");

    // Nothing beyond the request subjects and its own replies.
    let _everything = bot.subscribe(">").await.unwrap();
    assert!(next_error(&mut errors).await.contains("Permissions Violation for Subscription to \">\""));
    let _js_api = bot.subscribe("$JS.API.>").await.unwrap();
    assert!(next_error(&mut errors).await.contains("Permissions Violation for Subscription to \"$JS.API.>\""));
    let purge = bot.request("$JS.API.STREAM.PURGE.BSTORE_EVENTS", "".into());
    assert!(tokio::time::timeout(Duration::from_secs(3), purge).await.map(|r| r.is_err()).unwrap_or(true), "no purge reply");
    assert!(next_error(&mut errors).await.contains("Permissions Violation for Publish to \"$JS.API.STREAM.PURGE.BSTORE_EVENTS\""));
    let after = js.get_stream("BSTORE_EVENTS").await.unwrap().info().await.unwrap().state.messages;
    assert_eq!(after, before, "the stream survives");
    // The bot still works after its refused attempts.
    round_trip(bot, "embedded-after").await;

    // The tools reach the embedded server as the service user.
    let out = std::process::Command::new(service_bin())
        .args(["history", "--tenant", "embedded", "--session", "s"])
        .env("BSTORE_DATA_DIR", &embedded.data)
        .env_remove("BSTORE_NATS_URL")
        .env("BSTORE_LOG", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("creds_put"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test]
async fn requests_on_the_embedded_server_are_mapped_to_partitions() {
    let embedded = Embedded::start();
    let service = embedded.as_service().await;
    let mut mapped = service.subscribe("bstore-p.>").await.unwrap();
    service.flush().await.unwrap();
    let (bot, _errors) = connect_as(&embedded.read("bot.url")).await;
    let s = SessionClient::new(bot, "bstore", "acme", "s1").with_timeout(Duration::from_secs(5));
    let _ = s.info().await;
    let msg = tokio::time::timeout(Duration::from_secs(5), futures_util::StreamExt::next(&mut mapped))
        .await
        .expect("the request arrives on a partition subject")
        .unwrap();
    let key = bstore_domain::SessionKey::parse("acme", "s1").unwrap();
    let p = bstore_cluster::partition_of(&key, bstore_cluster::ClusterConfig::default().partitions);
    assert_eq!(msg.subject.as_str(), format!("bstore-p.{p}.acme.s1.session.info"));
}

#[tokio::test]
async fn a_killed_service_leaves_no_nats_server_behind_and_passwords_survive_restarts() {
    let mut embedded = Embedded::start();
    let bot_url = embedded.read("bot.url");
    let pid = embedded.server_pid();
    assert!(is_nats_server(&pid), "the pid file names the running nats-server");

    embedded.service.kill9();
    wait_for(10, "the embedded nats-server to stop after its service was killed", || (!is_nats_server(&pid)).then_some(()));

    embedded.service.start_again();
    assert_ne!(embedded.server_pid(), pid, "a new server");
    let password = |url: &str| url.rsplit_once('@').unwrap().0.to_owned();
    let new_url = embedded.read("bot.url");
    assert_eq!(password(&new_url), password(&bot_url), "the bot's password survives a restart");
    let (bot, _errors) = connect_as(&new_url).await;
    round_trip(bot, "after-kill").await;
    let log = embedded.read("nats/nats-server.log");
    assert_eq!(log.matches("starts nats-server").count(), 2, "the log of the killed run is kept");
    assert!(!embedded.service.log_text().contains("still running on this data dir"), "nothing was left to stop");

    // A clean stop says nothing about a lost connection after "stopped".
    let pid = embedded.server_pid();
    embedded.service.terminate();
    let log = embedded.service.log_text();
    let last_run = log.rsplit("serving requests").next().unwrap();
    assert!(last_run.contains("stopped"), "{last_run}");
    assert!(!last_run.contains("disconnected from NATS; reconnecting"), "{last_run}");
    assert!(!is_nats_server(&pid), "the server stopped with the service");
}

fn is_nats_server(pid: &str) -> bool {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).contains("nats-server")
}

/// The parent of process `pid`, if it still runs.
fn parent_of(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": the command may hold spaces, not ')'.
    Some(stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.to_owned())
}

/// The children of process `pid`.
fn children_of(pid: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| parent_of(p).is_some_and(|parent| parent == pid))
        .collect()
}

#[tokio::test]
async fn a_server_left_without_its_supervisor_is_stopped_at_the_next_start() {
    let mut embedded = Embedded::start();
    let pid = embedded.server_pid();
    // Kill the supervising shell and its pipe watcher first, then the
    // service: nothing is left to stop the server, as with a server from a
    // version before the supervisor.
    let shell = parent_of(&pid).unwrap();
    assert!(String::from_utf8_lossy(&std::fs::read(format!("/proc/{shell}/cmdline")).unwrap()).starts_with("/bin/sh"));
    let mut doomed: Vec<String> = children_of(&shell).into_iter().filter(|c| *c != pid).collect();
    doomed.push(shell);
    for p in &doomed {
        std::process::Command::new("kill").args(["-KILL", p]).status().unwrap();
    }
    embedded.service.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(is_nats_server(&pid), "the server was left running");

    embedded.service.start_again();
    assert!(!is_nats_server(&pid), "the next start stopped the leftover server");
    assert!(embedded.service.log_text().contains("still running on this data dir"));
    let (bot, _errors) = connect_as(&embedded.read("bot.url")).await;
    round_trip(bot, "after-leftover").await;
}
