//! Tenant isolation on a real nats-server configured with the shipped
//! accounts (`deploy/accounts.conf`, its placeholder passwords replaced),
//! and the real service connected as the service's users: one tenant's bot
//! can do its own work and nothing else (threats.md, "what must never
//! happen" 1–3). A last test runs the same probes in a single-account set-up
//! and shows that there they do reach other tenants: the isolation comes from
//! the accounts, and the probes would notice if it went.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use bstore_api::client::{ClientError, SessionClient, key_data};
use bstore_testkit::{NatsServer, ServiceProcess, TempDir};
use futures_util::StreamExt as _;

use crate::harness::{KEY1, Stack, rid, start_service, with_retries};

const STREAM: &str = "BSTORE_EVENTS";
/// How long a probe listens for something it must not receive.
const QUIET: Duration = Duration::from_millis(400);

/// A nats-server with the shipped accounts and the service on it.
pub(crate) struct Fleet {
    service: ServiceProcess,
    nats: NatsServer,
    passwords: HashMap<String, String>,
    _dir: TempDir,
}

/// `deploy/accounts.conf` with every `change-me-<user>` password replaced by
/// a random one; the passwords by user.
fn shipped_accounts() -> (String, HashMap<String, String>) {
    let text = std::fs::read_to_string(bstore_testkit::repo_root().join("deploy/accounts.conf")).unwrap();
    let mut passwords = HashMap::new();
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("\"change-me-") {
        let end = at + 1 + rest[at + 1..].find('"').unwrap();
        let user = rest[at + "\"change-me-".len()..end].to_owned();
        let password = passwords.entry(user.clone()).or_insert_with(|| format!("{user}-{}", rid())).clone();
        out.push_str(&rest[..at]);
        out.push_str(&format!("\"{password}\""));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    for user in ["bstore", "bstore-serve", "acme-bot", "globex-bot"] {
        assert!(passwords.contains_key(user), "deploy/accounts.conf has no user {user}");
    }
    (out, passwords)
}

impl Fleet {
    pub(crate) async fn start() -> Self {
        Self::start_with_accounts("").await
    }

    /// With `more` (account entries) added inside the shipped `accounts { }`.
    async fn start_with_accounts(more: &str) -> Self {
        let (mut accounts, passwords) = shipped_accounts();
        let end = accounts.rfind('}').expect("the accounts block closes the file");
        accounts.insert_str(end, more);
        let nats = NatsServer::start_conf(&accounts);
        let dir = TempDir::new("isolation");
        let env = [
            ("BSTORE_KEYS", KEY1),
            ("BSTORE__NATS__USER", "bstore"),
            ("BSTORE__NATS__PASSWORD", passwords["bstore"].as_str()),
            ("BSTORE__NATS__SERVE__USER", "bstore-serve"),
            ("BSTORE__NATS__SERVE__PASSWORD", passwords["bstore-serve"].as_str()),
        ];
        let service = start_service(&nats, &dir, &env);
        let fleet = Self { service, nats, passwords, _dir: dir };
        // The service serves once it holds its partitions.
        let acme = fleet.session(&fleet.bot("acme").await, "acme", "warm-up");
        with_retries(Duration::from_secs(20), crate::harness::retryable, || acme.info()).await.expect("the service answers a tenant");
        fleet
    }

    /// A connection as `user` (with its password from the shipped file).
    pub(crate) async fn connect_as(&self, user: &str) -> async_nats::Client {
        async_nats::ConnectOptions::with_user_and_password(user.into(), self.passwords[user].clone())
            .skip_subject_validation(true)
            .connect(self.nats.url())
            .await
            .unwrap_or_else(|e| panic!("connecting as {user}: {e}"))
    }

    /// A bot of `tenant`.
    pub(crate) async fn bot(&self, tenant: &str) -> async_nats::Client {
        self.connect_as(&format!("{tenant}-bot")).await
    }

    /// The service account's JetStream, as the service sees it.
    async fn service_js(&self) -> jetstream::Context {
        jetstream::new(self.connect_as("bstore").await)
    }

    pub(crate) fn session(&self, nc: &async_nats::Client, tenant: &str, session: &str) -> SessionClient {
        SessionClient::new(nc.clone(), "bstore", tenant, session).with_timeout(Duration::from_secs(3))
    }
}

async fn stream_messages(js: &jetstream::Context) -> u64 {
    js.get_stream(STREAM).await.expect("the event stream").info().await.unwrap().state.messages
}

/// Subscriptions that must stay silent: every message they got within `QUIET`.
async fn collected(subs: Vec<async_nats::Subscriber>) -> Vec<String> {
    let mut all = futures_util::stream::select_all(subs);
    let mut got = Vec::new();
    let deadline = tokio::time::sleep(QUIET);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            msg = all.next() => match msg {
                Some(m) => got.push(m.subject.to_string()),
                None => break,
            },
        }
    }
    got
}

/// A round trip on `nc`, so that its subscriptions are in place on the
/// server; then whatever `subs` got from that round trip itself (a `>` or
/// `_INBOX.>` sees the bot's own request and its answer) is dropped.
async fn settle(nc: &async_nats::Client, subs: &mut [async_nats::Subscriber]) {
    nc.flush().await.unwrap();
    let _ = nc.request("isolation.settle", "".into()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for sub in subs.iter_mut() {
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(20), sub.next()).await {}
    }
}

/// What `n` writes and reads of `tenant`'s bot look like from outside.
async fn tenant_traffic(fleet: &Fleet, nc: &async_nats::Client, tenant: &str, n: usize) {
    for i in 0..n {
        let s = fleet.session(nc, tenant, &format!("busy-{i}"));
        s.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"v"[..]))])).await.unwrap();
        assert_eq!(s.keys_get("pre-key", &["1"]).await.unwrap()["1"], b"v");
    }
}

#[tokio::test]
async fn each_tenants_bot_works_on_its_own_sessions() {
    let fleet = Fleet::start().await;
    let (acme, globex) = (fleet.bot("acme").await, fleet.bot("globex").await);
    // The same session name in two tenants: two sessions.
    let a = fleet.session(&acme, "acme", "bot-1");
    let g = fleet.session(&globex, "globex", "bot-1");
    assert!(a.creds_put(&rid(), b"acme creds").await.unwrap() > 0);
    a.keys_set(&rid(), &key_data([("pre-key", "1", Some(&b"acme key"[..]))])).await.unwrap();
    assert_eq!(g.creds_get().await.unwrap(), None, "globex/bot-1 is not acme/bot-1");
    g.creds_put(&rid(), b"globex creds").await.unwrap();
    assert_eq!(a.creds_get().await.unwrap().as_deref(), Some(&b"acme creds"[..]));
    assert_eq!(g.creds_get().await.unwrap().as_deref(), Some(&b"globex creds"[..]));
    assert_eq!(a.keys_get("pre-key", &["1"]).await.unwrap()["1"], b"acme key");
    assert!(g.keys_get("pre-key", &["1"]).await.unwrap().is_empty());
    // Coded errors reach a tenant's bot too.
    assert_eq!(a.raw("no.such", Vec::new()).await.unwrap_err().code(), Some(404));
    // The confined serving user of the shipped file was enough for all of it.
    let log = fleet.service.log_text();
    assert!(!log.contains("Permissions Violation"), "the shipped permissions refused the service something:\n{log}");
}

#[tokio::test]
async fn a_bot_cannot_call_another_tenants_subjects() {
    let fleet = Fleet::start().await;
    let (acme, globex) = (fleet.bot("acme").await, fleet.bot("globex").await);
    let victim = fleet.session(&globex, "globex", "victim");
    let seq = victim.creds_put(&rid(), b"globex creds").await.unwrap();

    // acme's bot names globex's session: nothing in acme's account answers.
    let as_acme = fleet.session(&acme, "globex", "victim");
    assert_eq!(as_acme.creds_get().await.unwrap_err(), ClientError::NoResponders);
    assert_eq!(as_acme.creds_put(&rid(), b"overwritten").await.unwrap_err(), ClientError::NoResponders);
    assert_eq!(as_acme.delete(&rid()).await.unwrap_err(), ClientError::NoResponders);
    // Nor the partition subjects, where the service really listens.
    for p in 0..16 {
        let subject = format!("bstore-p.{p}.globex.victim.creds.get");
        let err = acme.request(subject, "".into()).await.unwrap_err();
        assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);
    }
    // globex's session is as globex left it.
    let info = victim.info().await.unwrap();
    assert_eq!(info.seq, seq);
    assert_eq!(victim.creds_get().await.unwrap().as_deref(), Some(&b"globex creds"[..]));
    // And acme's own session of that name works (the calls above were refused for the tenant, not for the name).
    fleet.session(&acme, "acme", "victim").creds_put(&rid(), b"acme").await.unwrap();
}

#[tokio::test]
async fn a_bot_sees_no_other_tenants_requests_and_cannot_join_the_queue_group() {
    let fleet = Fleet::start().await;
    let (acme, globex) = (fleet.bot("acme").await, fleet.bot("globex").await);
    let mut subs = Vec::new();
    for subject in ["bstore.>", "bstore.globex.>", "bstore-p.>", ">"] {
        subs.push(acme.subscribe(subject).await.unwrap());
    }
    // The service's queue group, on its request and partition subjects: in
    // one account this would take a share of the requests.
    subs.push(acme.queue_subscribe("bstore.>", "q".into()).await.unwrap());
    subs.push(acme.queue_subscribe("bstore-p.>", "q".into()).await.unwrap());
    let mut control = acme.subscribe("acme-local.>").await.unwrap();
    settle(&acme, &mut subs).await;

    // Every one of globex's requests is answered by the service: none went to acme's queue subscribers.
    tenant_traffic(&fleet, &globex, "globex", 20).await;
    let got = collected(subs).await;
    assert!(got.is_empty(), "acme's bot received globex traffic: {got:?}");
    // The subscriptions were live: acme's own publish reaches them.
    acme.publish("acme-local.ping", "".into()).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(2), control.next()).await.expect("a live subscription").unwrap();
    assert_eq!(msg.subject.as_str(), "acme-local.ping");
}

#[tokio::test]
async fn a_bot_cannot_read_other_tenants_replies() {
    let fleet = Fleet::start().await;
    let (acme, globex) = (fleet.bot("acme").await, fleet.bot("globex").await);
    let mut subs = Vec::new();
    for subject in ["_INBOX.>", "_R_.>", "_BSTORE_JS.>", ">"] {
        subs.push(acme.subscribe(subject).await.unwrap());
    }
    settle(&acme, &mut subs).await;
    // globex's bot writes creds and reads them back: both replies travel to
    // globex's inbox, and carry data worth stealing.
    let g = fleet.session(&globex, "globex", "secret");
    g.creds_put(&rid(), b"GLOBEX-SECRET").await.unwrap();
    assert_eq!(g.creds_get().await.unwrap().as_deref(), Some(&b"GLOBEX-SECRET"[..]));
    tenant_traffic(&fleet, &globex, "globex", 5).await;
    let got = collected(subs).await;
    assert!(got.is_empty(), "acme's bot saw: {got:?}");
}

#[tokio::test]
async fn a_bot_cannot_reach_jetstream_the_service_api_or_the_event_subjects() {
    let fleet = Fleet::start().await;
    let (acme, globex) = (fleet.bot("acme").await, fleet.bot("globex").await);
    fleet.session(&globex, "globex", "s").creds_put(&rid(), b"c").await.unwrap();
    let js = fleet.service_js().await;
    let before = stream_messages(&js).await;
    assert!(before > 0);

    // The JetStream API of the service's account is not in acme's account:
    // the server answers (if at all) that acme has no JetStream.
    for subject in [
        "$JS.API.INFO",
        "$JS.API.STREAM.LIST",
        "$JS.API.STREAM.INFO.BSTORE_EVENTS",
        "$JS.API.STREAM.PURGE.BSTORE_EVENTS",
        "$JS.API.STREAM.DELETE.BSTORE_EVENTS",
        "$JS.API.STREAM.MSG.GET.BSTORE_EVENTS",
        "$JS.API.STREAM.INFO.KV_BSTORE_LEASES",
    ] {
        let body = match tokio::time::timeout(Duration::from_secs(2), acme.request(subject, r#"{"seq":1}"#.into())).await {
            Ok(Ok(msg)) => String::from_utf8_lossy(&msg.payload).into_owned(),
            Ok(Err(_)) | Err(_) => String::new(),
        };
        assert!(body.is_empty() || body.contains("not enabled"), "{subject} answered acme: {body}");
        assert!(!body.contains(STREAM), "{subject} told acme about the stream: {body}");
    }
    // The service's own account does reach it: the subjects above were the right ones.
    let mut stream = js.get_stream(STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.name, STREAM);

    // $SRV: no responder in acme's account; one in the service's.
    for subject in ["$SRV.PING", "$SRV.INFO", "$SRV.STATS", "$SRV.PING.baileys-store"] {
        let err = acme.request(subject, "".into()).await.unwrap_err();
        assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders, "{subject}");
    }
    let ops = fleet.connect_as("bstore").await;
    assert!(ops.request("$SRV.PING.baileys-store", "".into()).await.is_ok(), "the service answers $SRV in its account");

    // Publishing on the event or lease subjects writes nothing there.
    acme.publish("bstore-events.globex.s", "forged".into()).await.unwrap();
    acme.publish("$KV.BSTORE_LEASES.0", "forged".into()).await.unwrap();
    let mut events = [acme.subscribe("bstore-events.>").await.unwrap()];
    settle(&acme, &mut events).await;
    fleet.session(&globex, "globex", "s").creds_put(&rid(), b"c2").await.unwrap();
    assert!(tokio::time::timeout(QUIET, events[0].next()).await.is_err(), "acme's bot saw an event");
    assert_eq!(stream_messages(&js).await, before + 1, "only globex's own write was appended");
}

#[tokio::test]
async fn a_reply_subject_naming_the_jetstream_api_purges_nothing() {
    let fleet = Fleet::start().await;
    let (acme, globex) = (fleet.bot("acme").await, fleet.bot("globex").await);
    tenant_traffic(&fleet, &globex, "globex", 3).await;
    let js = fleet.service_js().await;
    let before = stream_messages(&js).await;
    assert!(before >= 3);

    // acme's bot asks the service something and names the purge API as the
    // reply subject. Through the import the service answers a `_R_.` subject
    // of its own account, which the server carries back to that subject in
    // acme's account: the answer lands there, and purges nothing.
    let mut landed = [acme.subscribe("$JS.API.STREAM.PURGE.BSTORE_EVENTS").await.unwrap()];
    settle(&acme, &mut landed).await;
    for op in ["session.info", "creds.get"] {
        acme.publish_with_reply(format!("bstore.acme.probe.{op}"), "$JS.API.STREAM.PURGE.BSTORE_EVENTS", "".into()).await.unwrap();
    }
    acme.flush().await.unwrap();
    for _ in 0..2 {
        let msg =
            tokio::time::timeout(Duration::from_secs(5), landed[0].next()).await.expect("the service answered in acme's account").unwrap();
        assert!(msg.headers.as_ref().and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR_CODE)).is_none(), "a normal answer");
    }
    tokio::time::sleep(QUIET).await;
    assert_eq!(stream_messages(&js).await, before, "the event stream was not purged");
    // And globex's data is all there.
    let g = fleet.session(&globex, "globex", "busy-0");
    assert_eq!(g.keys_get("pre-key", &["1"]).await.unwrap()["1"], b"v");
}

#[tokio::test]
async fn a_tenant_added_with_the_tenant_command_works_and_is_isolated() {
    let out = std::process::Command::new(crate::harness::service_bin()).args(["tenant", "add", "newco"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let block = String::from_utf8(out.stdout).unwrap();
    let password = block.split("password: \"").nth(1).and_then(|r| r.split('"').next()).expect("a generated password").to_owned();
    let mut fleet = Fleet::start_with_accounts(&block).await;
    fleet.passwords.insert("newco-bot".into(), password);
    let newco = fleet.bot("newco").await;
    let s = fleet.session(&newco, "newco", "first");
    s.creds_put(&rid(), b"newco creds").await.unwrap();
    assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"newco creds"[..]));
    // Its import is its own tenant's subjects only.
    fleet.session(&fleet.bot("acme").await, "acme", "s").creds_put(&rid(), b"acme").await.unwrap();
    assert_eq!(fleet.session(&newco, "acme", "s").creds_get().await.unwrap_err(), ClientError::NoResponders);
    assert!(
        newco
            .request("$JS.API.STREAM.INFO.BSTORE_EVENTS", "".into())
            .await
            .map(|m| !String::from_utf8_lossy(&m.payload).contains(STREAM))
            .unwrap_or(true)
    );
}

/// The control: the same probes in one account (the plain test server, no
/// accounts) do reach another tenant, so the tests above would fail if the
/// tenants shared an account.
#[tokio::test]
async fn in_one_shared_account_the_same_probes_do_reach_other_tenants() {
    let stack = Stack::start().await;
    let warm = stack.session("acme", "warm-up");
    with_retries(Duration::from_secs(20), crate::harness::retryable, || warm.info()).await.unwrap();
    let acme = crate::harness::connect(&stack.nats.url()).await;
    let mut subs = vec![acme.subscribe("bstore.globex.>").await.unwrap(), acme.subscribe("_INBOX.>").await.unwrap()];
    settle(&acme, &mut subs).await;

    let g = stack.session("globex", "secret");
    g.creds_put(&rid(), b"GLOBEX-SECRET").await.unwrap();
    let seen = collected(subs).await;
    assert!(seen.iter().any(|s| s.starts_with("bstore.globex.secret.")), "{seen:?}");
    assert!(seen.iter().any(|s| s.starts_with("_INBOX.")), "{seen:?}");

    // The JetStream API is reachable: a purge through it is answered by the
    // stream itself, which denies purges (the tests above see no answer).
    let js = jetstream::new(stack.nc.clone());
    assert!(stream_messages(&js).await > 0);
    let reply = acme.request("$JS.API.STREAM.PURGE.BSTORE_EVENTS", "".into()).await.unwrap();
    assert!(String::from_utf8_lossy(&reply.payload).contains("stream purge not permitted"), "{:?}", reply.payload);
    assert!(stream_messages(&js).await > 0);
}

// The service's own connection to Redis: TLS (rediss://, a private CA) and an
// ACL user, as docs/deploy.md recommends for a fleet.

mod redis_over_tls {
    use bstore_redis::redis::AsyncCommands as _;
    use bstore_redis::{RedisConfig, RedisProjection, RedisTls};
    use bstore_testkit::RedisServer;

    use super::*;

    fn looking_glass(server: &RedisServer) -> RedisProjection {
        let cfg = RedisConfig {
            url: Some(server.url()),
            tls: RedisTls { ca_file: Some(server.tls_ca_file()), ..Default::default() },
            ..Default::default()
        };
        let keyring = bstore_codec::Keyring::new(bstore_codec::Keyring::parse_entries(KEY1).unwrap(), None).unwrap();
        let codec = bstore_codec::Codec::new(keyring);
        RedisProjection::new(cfg, codec).unwrap()
    }

    #[tokio::test]
    async fn the_service_projects_into_redis_as_an_acl_user_over_tls() {
        let redis = RedisServer::start_secure("bstore", "redis-pass-1", false);
        let url = redis.url();
        assert!(url.starts_with("rediss://bstore:redis-pass-1@127.0.0.1:"), "{url}");
        let ca = redis.tls_ca_file();
        let stack = Stack::start_with(&[("BSTORE_REDIS_URL", &url), ("BSTORE__REDIS__TLS__CA_FILE", ca.to_str().unwrap())]).await;
        let s = stack.session("acme", "projected");
        let data = key_data([("pre-key", "1", Some(&b"v1"[..])), ("pre-key", "2", Some(&b"v2"[..]))]);
        let seq = with_retries(Duration::from_secs(20), crate::harness::retryable, || s.keys_set("r-proj", &data)).await.unwrap();
        let glass = looking_glass(&redis);
        let key = bstore_domain::SessionKey::parse("acme", "projected").unwrap();
        let start = std::time::Instant::now();
        while glass.stored_seq(&key).await.ok().flatten() != Some(seq) {
            assert!(start.elapsed() < Duration::from_secs(10), "the write was not projected into Redis:\n{}", stack.service.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut conn = glass.connection();
        let fields: usize = conn.hlen(glass.key(&key)).await.unwrap();
        assert!(fields >= 3, "seq and two keys at least: {fields}");
        assert_eq!(glass.load(&key).await.unwrap().unwrap().info().keys["pre-key"], 2);
        assert!(!stack.service.log_text().contains("redis projection failed"), "{}", stack.service.log_text());
    }

    #[tokio::test]
    async fn with_a_wrong_redis_password_the_service_logs_and_keeps_serving() {
        let redis = RedisServer::start_secure("bstore", "redis-pass-1", false);
        let url = format!("rediss://bstore:wrong@127.0.0.1:{}/", redis.port());
        let ca = redis.tls_ca_file();
        let stack = Stack::start_with(&[("BSTORE_REDIS_URL", &url), ("BSTORE__REDIS__TLS__CA_FILE", ca.to_str().unwrap())]).await;
        let s = stack.session("acme", "unprojected");
        with_retries(Duration::from_secs(20), crate::harness::retryable, || s.creds_put("r-c", b"creds")).await.unwrap();
        for i in 0..5 {
            let id = i.to_string();
            s.keys_set(&rid(), &key_data([("pre-key", id.as_str(), Some(&b"v"[..]))])).await.unwrap();
        }
        assert_eq!(s.keys_get("pre-key", &["0", "4"]).await.unwrap().len(), 2);
        assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"creds"[..]));
        bstore_testkit::wait_for(10, "the refused projection in the log", || {
            let log = stack.service.log_text();
            (log.contains("redis projection failed") || log.contains("redis snapshot failed")).then_some(())
        });
        // Nothing reached Redis.
        let key = bstore_domain::SessionKey::parse("acme", "unprojected").unwrap();
        assert_eq!(looking_glass(&redis).stored_seq(&key).await.unwrap(), None);
    }
}

// The shipped deployment files themselves: they agree with each other, bind
// nothing beyond loopback, and the three cluster files form a cluster that
// serves tenants with the event stream on three nodes.

mod shipped {
    use std::process::{Child, Command, Stdio};

    use super::*;

    fn deploy(file: &str) -> String {
        std::fs::read_to_string(bstore_testkit::repo_root().join("deploy").join(file)).unwrap_or_else(|e| panic!("deploy/{file}: {e}"))
    }

    /// The `n` of `{{partition(n,1,2)}}` in the BSTORE account's mapping.
    fn mapped_partitions() -> u32 {
        let text = deploy("accounts.conf");
        let at = text.find("{{partition(").expect("a partition mapping") + "{{partition(".len();
        text[at..].split(',').next().unwrap().trim().parse().unwrap()
    }

    /// Lines that are not comments.
    fn live_lines(text: &str) -> impl Iterator<Item = &str> {
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'))
    }

    #[test]
    fn the_fleet_settings_agree_with_the_accounts_and_the_mapping() {
        let partitions = mapped_partitions();
        let cfg =
            baileys_store::Config::load_from(Some(&bstore_testkit::repo_root().join("deploy/baileys-store.toml")), Vec::new()).unwrap();
        assert_eq!(cfg.cluster.partitions, partitions, "cluster.partitions must equal the mapping's partition count");
        assert_eq!(bstore_cluster::ClusterConfig::default().partitions, partitions, "the default must equal the mapping too");
        assert_eq!(cfg.stream.replicas, 3);
        assert!(cfg.nats.tls.required && cfg.nats.tls.ca_file.is_some(), "the fleet speaks TLS to NATS");
        assert!(cfg.redis.url.as_deref().unwrap().starts_with("rediss://"), "and to Redis");
        assert_eq!(cfg.api.prefix, "bstore");
        let accounts = deploy("accounts.conf");
        for user in [cfg.nats.user.as_deref().unwrap(), cfg.nats.serve.user.as_deref().unwrap()] {
            assert!(accounts.contains(&format!("user: \"{user}\"")), "{user} is not a user of deploy/accounts.conf");
        }
        for secret in [&cfg.nats.password, &cfg.nats.serve.password, &cfg.redis.password] {
            assert!(secret.is_none(), "no secret in the shared file");
        }
        let compose = deploy("compose.yaml");
        assert!(compose.contains(&format!("BSTORE__CLUSTER__PARTITIONS: \"{partitions}\"")), "compose.yaml's partitions");
        assert!(compose.contains("BSTORE__STREAM__REPLICAS: \"3\""));
    }

    #[test]
    fn nothing_listens_beyond_loopback_without_tls() {
        let mut checked = 0;
        for entry in std::fs::read_dir(bstore_testkit::repo_root().join("deploy")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "conf") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for line in live_lines(&text) {
                if let Some(addr) = line.strip_prefix("listen:").or_else(|| line.strip_prefix("http:")) {
                    let addr = addr.trim().trim_matches('"');
                    assert!(addr.starts_with("127.0.0.1:"), "{}: {line}", path.display());
                    checked += 1;
                }
                assert!(!line.contains("0.0.0.0"), "{}: {line}", path.display());
            }
        }
        // Single: client + monitoring; each cluster node: client, monitoring, routes.
        assert_eq!(checked, 2 + 3 * 3);
    }

    /// A nats-server process, killed on drop.
    struct Node(Option<Child>);

    impl Drop for Node {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// A monitoring endpoint's JSON body.
    fn monitor(port: u16, path: &str) -> Option<(u16, serde_json::Value)> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let (head, body) = resp.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, serde_json::from_str(body).ok()?))
    }

    /// The JetStream meta leader a healthy node at `port` knows, and whether
    /// it sees both of its peers current (only the leader does).
    fn meta_view(port: u16) -> Option<(String, bool)> {
        let (_, jsz) = monitor(port, "/jsz")?;
        let leader = jsz["meta_cluster"]["leader"].as_str().filter(|l| !l.is_empty())?.to_owned();
        let peers = jsz["meta_cluster"]["replicas"].as_array()?;
        let current = peers.len() == 2 && peers.iter().all(|p| p["current"].as_bool() == Some(true));
        let (health, _) = monitor(port, "/healthz")?;
        (health == 200).then_some((leader, current))
    }

    /// `deploy/nats-single.conf` with its TLS block uncommented (pointing at
    /// `certs`), on free ports, with its own store and the shipped accounts.
    fn single_with_tls(dir: &TempDir, certs: &bstore_testkit::TestCerts, accounts: &str) -> (Node, u16) {
        let (client, monitor) = (bstore_testkit::free_port(), bstore_testkit::free_port());
        let mut conf = String::new();
        let mut in_tls = false;
        for line in deploy("nats-single.conf").lines() {
            in_tls |= line.starts_with("# tls {");
            let line = if in_tls { line.strip_prefix("# ").unwrap_or(line) } else { line };
            in_tls &= line != "}";
            conf.push_str(line);
            conf.push('\n');
        }
        let conf = conf
            .replace("\"/etc/nats/tls/server.pem\"", &format!("{:?}", certs.server_cert().display().to_string()))
            .replace("\"/etc/nats/tls/server-key.pem\"", &format!("{:?}", certs.server_key().display().to_string()))
            .replace("\"/etc/nats/tls/ca.pem\"", &format!("{:?}", certs.ca().display().to_string()))
            .replace("\"127.0.0.1:4222\"", &format!("\"127.0.0.1:{client}\""))
            .replace("\"127.0.0.1:8222\"", &format!("\"127.0.0.1:{monitor}\""))
            .replace("\"/var/lib/nats\"", &format!("{:?}", dir.path().join("js").display().to_string()));
        assert!(conf.contains("\ntls {") && !conf.contains("/etc/nats"), "the TLS block was not found:\n{conf}");
        std::fs::write(dir.path().join("accounts.conf"), accounts).unwrap();
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, conf).unwrap();
        let bin = bstore_testkit::find_bin("NATS_SERVER_BIN", ".tools/nats/bin/nats-server", "nats-server");
        let log = std::fs::File::create(dir.path().join("nats.log")).unwrap();
        let child =
            Command::new(bin).arg("-c").arg(&path).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
        let node = Node(Some(child));
        bstore_testkit::wait_for(20, "the TLS nats-server", || js_healthy(monitor).then_some(()));
        (node, client)
    }

    fn js_healthy(port: u16) -> bool {
        use std::io::{Read as _, Write as _};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
        let _ = s.write_all(b"GET /healthz?js-enabled-only=true HTTP/1.0\r\n\r\n");
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200")
    }

    /// The single server's TLS block, turned on as its comment says: the
    /// service and bots connect with the CA and client certificates; a
    /// connection without a client certificate, or without TLS, is refused.
    #[tokio::test]
    async fn the_single_servers_tls_block_turned_on_serves_over_mutual_tls() {
        let dir = TempDir::new("shipped-tls");
        let certs = bstore_testkit::TestCerts::generate();
        let (accounts, passwords) = shipped_accounts();
        let (_node, port) = single_with_tls(&dir, &certs, &accounts);
        let url = format!("tls://127.0.0.1:{port}");
        let (ca, cert, key) = (certs.ca(), certs.client_cert(), certs.client_key());
        let service = crate::harness::start_service_at(
            &url,
            &dir,
            "tls",
            &[
                ("BSTORE_NATS_CA", ca.to_str().unwrap()),
                ("BSTORE_NATS_CERT", cert.to_str().unwrap()),
                ("BSTORE_NATS_KEY", key.to_str().unwrap()),
                ("BSTORE__NATS__TLS__REQUIRED", "true"),
                ("BSTORE__NATS__USER", "bstore"),
                ("BSTORE__NATS__PASSWORD", passwords["bstore"].as_str()),
                ("BSTORE__NATS__SERVE__USER", "bstore-serve"),
                ("BSTORE__NATS__SERVE__PASSWORD", passwords["bstore-serve"].as_str()),
            ],
        );
        let opts = || {
            async_nats::ConnectOptions::with_user_and_password("acme-bot".into(), passwords["acme-bot"].clone())
                .add_root_certificates(ca.clone())
                .require_tls(true)
        };
        let bot = opts().add_client_certificate(cert.clone(), key.clone()).connect(url.clone()).await.unwrap();
        let s = SessionClient::new(bot, "bstore", "acme", "tls").with_timeout(Duration::from_secs(3));
        with_retries(Duration::from_secs(20), crate::harness::retryable, || s.creds_put("r-t", b"over tls"))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", service.log_text()));
        assert_eq!(s.creds_get().await.unwrap().as_deref(), Some(&b"over tls"[..]));
        // verify: true — no client certificate, no connection.
        let refused = tokio::time::timeout(Duration::from_secs(5), opts().connect(url.clone())).await;
        assert!(!matches!(refused, Ok(Ok(_))), "connected without a client certificate");
        // And no plain-text connection at all: the server demands TLS and a
        // verified client certificate before anything else.
        let mut info = String::new();
        {
            use std::io::BufRead as _;
            let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            std::io::BufReader::new(tcp).read_line(&mut info).unwrap();
        }
        assert!(info.starts_with("INFO ") && info.contains("\"tls_required\":true") && info.contains("\"tls_verify\":true"), "{info}");
    }

    /// The three shipped cluster files, run as they are apart from their
    /// ports (free ones instead of 4222-4224, 6222-6224, 8222-8224), store
    /// directories and placeholder passwords.
    #[tokio::test]
    async fn the_cluster_files_form_a_cluster_that_serves_tenants_with_three_replicas() {
        let dir = TempDir::new("shipped-cluster");
        let (accounts, passwords) = shipped_accounts();
        std::fs::write(dir.path().join("accounts.conf"), accounts).unwrap();
        let ports: Vec<(u16, u16)> =
            [4222, 4223, 4224, 6222, 6223, 6224, 8222, 8223, 8224].into_iter().map(|p| (p, bstore_testkit::free_port())).collect();
        let route_password = format!("route-{}", rid());
        let bin = bstore_testkit::find_bin("NATS_SERVER_BIN", ".tools/nats/bin/nats-server", "nats-server");
        let mut nodes = Vec::new();
        for n in 1..=3 {
            let mut conf = deploy(&format!("nats-cluster-{n}.conf")).replace("change-me-route", &route_password);
            for (from, to) in &ports {
                conf = conf.replace(&format!("127.0.0.1:{from}\""), &format!("127.0.0.1:{to}\""));
            }
            let store = dir.path().join(format!("js-{n}"));
            conf = conf.replace(&format!("\"/var/lib/nats/bstore-nats-{n}\""), &format!("{:?}", store.display().to_string()));
            for line in live_lines(&conf) {
                let shipped_port = ["4222", "4223", "4224", "6222", "6223", "6224", "8222", "8223", "8224"]
                    .iter()
                    .any(|p| line.contains(&format!(":{p}")));
                assert!(!line.contains("/var/lib/nats") && !shipped_port, "not rewritten: {line}");
            }
            let path = dir.path().join(format!("nats-{n}.conf"));
            std::fs::write(&path, conf).unwrap();
            let log = std::fs::File::create(dir.path().join(format!("nats-{n}.log"))).unwrap();
            let child =
                Command::new(&bin).arg("-c").arg(&path).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
            nodes.push(Node(Some(child)));
        }
        let port = |p: u16| ports.iter().find(|(from, _)| *from == p).unwrap().1;
        let monitors = [port(8222), port(8223), port(8224)];
        bstore_testkit::wait_for(60, "the three shipped nodes to agree on a JetStream meta leader", || {
            let views: Option<Vec<(String, bool)>> = monitors.iter().map(|m| meta_view(*m)).collect();
            let views = views?;
            (views.iter().all(|(l, _)| *l == views[0].0) && views.iter().any(|(_, current)| *current)).then_some(())
        });
        let urls: Vec<String> = [4222, 4223, 4224].iter().map(|p| format!("nats://127.0.0.1:{}", port(*p))).collect();
        let log_of = |n: usize| std::fs::read_to_string(dir.path().join(format!("nats-{n}.log"))).unwrap_or_default();

        let joined = urls.join(",");
        let service = crate::harness::start_service_at(
            &joined,
            &dir,
            "shipped",
            &[
                ("BSTORE__STREAM__REPLICAS", "3"),
                ("BSTORE__NATS__USER", "bstore"),
                ("BSTORE__NATS__PASSWORD", passwords["bstore"].as_str()),
                ("BSTORE__NATS__SERVE__USER", "bstore-serve"),
                ("BSTORE__NATS__SERVE__PASSWORD", passwords["bstore-serve"].as_str()),
            ],
        );
        let bot = |user: &str, url: &str| {
            let opts = async_nats::ConnectOptions::with_user_and_password(user.into(), passwords[user].clone());
            let url = url.to_owned();
            async move { opts.connect(url).await.unwrap() }
        };
        // acme's bot on the third node, globex's on the second: requests cross routes to the service.
        let acme = bot("acme-bot", &urls[2]).await;
        let globex = bot("globex-bot", &urls[1]).await;
        let a = SessionClient::new(acme.clone(), "bstore", "acme", "clustered").with_timeout(Duration::from_secs(3));
        let budget = Duration::from_secs(30);
        let retry = crate::harness::retryable;
        with_retries(budget, retry, || a.creds_put("r-1", b"acme creds")).await.unwrap_or_else(|e| panic!("{e}\n{}", service.log_text()));

        let js = jetstream::new(
            async_nats::ConnectOptions::with_user_and_password("bstore".into(), passwords["bstore"].clone())
                .connect(urls[0].clone())
                .await
                .unwrap(),
        );
        let mut stream = js.get_stream(STREAM).await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(info.config.num_replicas, 3);
        assert_eq!(info.cluster.as_ref().map(|c| c.replicas.len()), Some(2), "a leader and two replicas: {:?}", info.cluster);

        // globex's bot, elsewhere in the cluster, still cannot reach acme's session.
        let across = SessionClient::new(globex.clone(), "bstore", "acme", "clustered").with_timeout(Duration::from_secs(3));
        assert_eq!(across.creds_get().await.unwrap_err(), ClientError::NoResponders);

        // Lose the first node: the stream keeps a majority and acme's writes go on.
        drop(nodes.remove(0));
        let data = key_data([("pre-key", "1", Some(&b"after"[..]))]);
        with_retries(budget, retry, || a.keys_set("r-2", &data))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}\n{}", service.log_text(), log_of(2)));
        assert_eq!(with_retries(budget, retry, || a.creds_get()).await.unwrap().as_deref(), Some(&b"acme creds"[..]));
        assert_eq!(with_retries(budget, retry, || a.keys_get("pre-key", &["1"])).await.unwrap()["1"], b"after");
    }
}

// The service's connection to MongoDB: TLS and SCRAM authentication, both
// given in the driver's URL (docs/deploy.md).

mod mongo_over_tls {
    use std::process::{Child, Command, Stdio};

    use bstore_mongo::mongodb::bson::doc;
    use bstore_testkit::TestCerts;

    use super::*;

    /// The Mongo-compatible test server with TLS (and SCRAM with `auth`),
    /// killed on drop.
    struct TlsMongo(Option<Child>);

    impl Drop for TlsMongo {
        fn drop(&mut self) {
            if let Some(mut c) = self.0.take() {
                bstore_testkit::sigterm(c.id());
                let _ = c.wait();
            }
        }
    }

    fn start(dir: &TempDir, certs: &TestCerts, port: u16, auth: bool) -> TlsMongo {
        let bin = bstore_testkit::find_bin("MONGO_SERVER_BIN", ".tools/secantus/bin/secantusd-py", "secantusd-py");
        let data = dir.path().join("mongo-data");
        std::fs::create_dir_all(&data).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.path().join("mongo.log")).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--log-level", "WARNING"]).arg("--storage-path").arg(&data);
        cmd.arg("--tls-cert-file").arg(certs.server_cert()).arg("--tls-key-file").arg(certs.server_key());
        if auth {
            cmd.arg("--auth");
        }
        TlsMongo(Some(cmd.stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap()))
    }

    async fn client(url: &str) -> bstore_mongo::mongodb::Client {
        let start = std::time::Instant::now();
        loop {
            let c = bstore_mongo::mongodb::Client::with_uri_str(url).await.unwrap();
            match c.database("admin").run_command(doc! { "ping": 1 }).await {
                Ok(_) => return c,
                Err(e) => assert!(start.elapsed() < Duration::from_secs(60), "the TLS Mongo server never answered: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    #[tokio::test]
    async fn the_service_materializes_into_mongo_over_tls_as_an_authenticated_user() {
        let dir = TempDir::new("mongo-tls");
        let certs = TestCerts::generate();
        let port = bstore_testkit::free_port();
        let tls = format!("tls=true&tlsCAFile={}", certs.ca().display());
        let base = format!("127.0.0.1:{port}/?{tls}&retryWrites=false&directConnection=true&serverSelectionTimeoutMS=2000");
        // Provision the user without auth, then restart with it required.
        let mut server = start(&dir, &certs, port, false);
        let admin = client(&format!("mongodb://{base}")).await;
        admin
            .database("admin")
            .run_command(doc! { "createUser": "bstore", "pwd": "mongo-pass-1", "roles": [ { "role": "readWrite", "db": "bstore" } ] })
            .await
            .unwrap();
        drop(admin);
        drop(server);
        server = start(&dir, &certs, port, true);
        let url = format!("mongodb://bstore:mongo-pass-1@{base}&authSource=admin");
        let reader = client(&url).await;
        // Without the password the server refuses: authentication is on.
        let anonymous = bstore_mongo::mongodb::Client::with_uri_str(format!("mongodb://{base}")).await.unwrap();
        assert!(
            anonymous.database("bstore").collection::<bstore_mongo::mongodb::bson::Document>("sessions").find_one(doc! {}).await.is_err()
        );

        let stack = Stack::start_with(&[("BSTORE_MONGO_URL", &url)]).await;
        let s = stack.session("acme", "materialized");
        let seq = with_retries(Duration::from_secs(20), crate::harness::retryable, || s.creds_put("r-m", b"creds")).await.unwrap();
        let sessions = reader.database("bstore").collection::<bstore_mongo::mongodb::bson::Document>("sessions");
        let start = std::time::Instant::now();
        loop {
            let found = sessions.find_one(doc! {}).await.unwrap();
            if let Some(d) = found
                && d.get_i64("seq").ok().map(|v| v as u64) == Some(seq)
            {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "not materialized over TLS:\n{}", stack.service.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(stack);
        drop(server);
    }
}
