//! Connections to NATS: authentication, TLS and the connection's role.
//!
//! Every way nats-server authenticates a client is supported: user and
//! password (in the config or in the URLs), a token, an NKey, a creds file
//! (user JWT + seed), and TLS with a client certificate. A server that
//! refuses the credentials, or a TLS handshake that fails, ends the start at
//! once with a message that says so; only an unreachable server is retried,
//! for `nats.connect_timeout`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::{ConnectErrorKind, ServerAddr};

use crate::config::{NatsAuth, NatsConfig, redact_url};

/// The inbox prefix of the connection that reaches JetStream. Bots choose
/// the reply subjects of their requests, and the service answers only to
/// `_INBOX.` and `_R_.` subjects; a prefix of its own keeps every answer
/// away from the JetStream replies the service waits for.
pub const STORE_INBOX_PREFIX: &str = "_BSTORE_JS";

/// What a connection is for. The service keeps the connection that serves
/// bots' requests apart from the one that reaches JetStream, so that the
/// serving identity can be confined to publishing replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves requests: subscribes to the request subjects, publishes replies.
    Serve,
    /// Reaches JetStream (the event log, the lease bucket) and forwards.
    Store,
    /// A command-line tool.
    Tool,
    /// A command-line tool that sends requests to the service as a bot
    /// does (`import`): its replies come to `_INBOX.`, which the service
    /// answers, not to the store's own prefix, which it refuses.
    Requester,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Serve => "baileys-store",
            Role::Store => "baileys-store-store",
            Role::Tool => "baileys-store-tool",
            Role::Requester => "baileys-store-requester",
        }
    }
}

static CLOSING: AtomicBool = AtomicBool::new(false);

/// Tells the connections that the process is shutting down: a disconnect
/// from then on is expected (the embedded server stops after the service)
/// and is no longer logged as a warning.
pub fn mark_closing() {
    CLOSING.store(true, Ordering::Relaxed);
}

fn closing() -> bool {
    CLOSING.load(Ordering::Relaxed)
}

/// The credentials a connection of `role` uses: `[nats.serve]` for the
/// serving connection when any of it is set, the main ones otherwise.
pub fn auth_for(cfg: &NatsConfig, role: Role) -> NatsAuth {
    if role == Role::Serve && cfg.serve.is_set() { cfg.serve.clone() } else { cfg.auth() }
}

/// Connects to `urls` with the credentials and TLS settings of `cfg` and
/// waits for the first connection. Credentials written into the URLs are
/// sent (user and password, or a lone user as a token).
pub async fn connect(cfg: &NatsConfig, urls: &[String], role: Role) -> anyhow::Result<async_nats::Client> {
    if urls.is_empty() {
        bail!("no NATS server URL to connect to");
    }
    let shown: Vec<String> = urls.iter().map(|u| redact_url(u)).collect();
    let (addrs, from_urls) = split_urls(urls)?;
    let serve_section = role == Role::Serve && cfg.serve.is_set();
    let auth = resolve_auth(auth_for(cfg, role), from_urls, serve_section)?;
    let method = check_files(cfg, &auth)?;
    let deadline = Instant::now() + cfg.connect_timeout;
    let mut attempt = 0u32;
    loop {
        let opts = options(cfg, &auth, role).await?;
        let err = match opts.connect(addrs.clone()).await {
            Ok(client) => return Ok(client),
            Err(err) => err,
        };
        match err.kind() {
            ConnectErrorKind::AuthorizationViolation => bail!(
                "the NATS server at {} refused the {} connection's credentials ({method}): authorization violation; \
                 check the user and password (in the URL or under [nats]), token, NKey or creds file{}",
                shown.join(", "),
                role.name(),
                if serve_section { " (here: [nats.serve])" } else { "" },
            ),
            ConnectErrorKind::Authentication => {
                bail!("could not sign the NATS server's challenge with the configured {method}: {err}; is it a valid user seed?")
            }
            ConnectErrorKind::Tls => bail!("TLS set-up for NATS failed: {err} (check [nats.tls])"),
            ConnectErrorKind::ServerParse => bail!("bad NATS server address in {}: {err}", shown.join(", ")),
            _ if tls_failure(&err) => bail!(
                "the TLS handshake with the NATS server at {} failed: {err} (check [nats.tls]: the CA that signed the server's \
                 certificate, and the client certificate if the server verifies clients)",
                shown.join(", ")
            ),
            _ => {}
        }
        if Instant::now() >= deadline {
            bail!("could not reach NATS at {} within {:?}: {err}", shown.join(", "), cfg.connect_timeout);
        }
        if attempt.is_multiple_of(10) {
            tracing::warn!(servers = ?shown, error = %err, "NATS not reachable yet; retrying");
        }
        attempt += 1;
        let pause = Duration::from_millis(50u64 << attempt.min(5)).min(Duration::from_secs(1));
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// The addresses without credentials, and the credentials found in them
/// (which must be the same in every URL that has any).
fn split_urls(urls: &[String]) -> anyhow::Result<(Vec<ServerAddr>, Option<UrlCreds>)> {
    let mut addrs = Vec::with_capacity(urls.len());
    let mut found: Option<UrlCreds> = None;
    for url in urls {
        let (bare, creds) = strip_userinfo(url);
        let addr = bare.parse::<ServerAddr>().with_context(|| format!("bad NATS URL {:?}", redact_url(url)))?;
        addrs.push(addr);
        if let Some(creds) = creds {
            match &found {
                Some(other) if *other != creds => bail!("the NATS URLs carry different credentials; one connection has one identity"),
                _ => found = Some(creds),
            }
        }
    }
    Ok((addrs, found))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum UrlCreds {
    UserPassword(String, String),
    Token(String),
}

/// Splits `nats://user:pass@host:port` into `nats://host:port` and the
/// (percent-decoded) credentials.
fn strip_userinfo(url: &str) -> (String, Option<UrlCreds>) {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return (url.to_owned(), None) };
    let userinfo = &rest[..at];
    let bare = format!("{scheme}{}", &rest[at + 1..]);
    let creds = match userinfo.split_once(':') {
        Some((user, pass)) => UrlCreds::UserPassword(percent_decode(user), percent_decode(pass)),
        None => UrlCreds::Token(percent_decode(userinfo)),
    };
    (bare, Some(creds))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The credentials to send: those configured, or those in the URLs — not both.
/// `serve_section`: `auth` is the serving identity of `[nats.serve]`, which
/// stands in for the URL's.
fn resolve_auth(mut auth: NatsAuth, from_urls: Option<UrlCreds>, serve_section: bool) -> anyhow::Result<NatsAuth> {
    if let Some(creds) = from_urls {
        if auth.is_set() && !serve_section {
            bail!("NATS credentials are given both in the URL and under [nats]; give them in one place");
        }
        if !auth.is_set() {
            match creds {
                UrlCreds::UserPassword(user, password) => {
                    auth.user = Some(user);
                    auth.password = Some(password);
                }
                UrlCreds::Token(token) => auth.token = Some(token),
            }
        }
    }
    let kinds = [
        auth.user.is_some() || auth.password.is_some(),
        auth.token.is_some(),
        auth.nkey.is_some() || auth.nkey_file.is_some(),
        auth.creds_file.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() > 1 {
        bail!("more than one kind of NATS credential is configured (user/password, token, nkey, creds_file): set one");
    }
    if auth.nkey.is_some() && auth.nkey_file.is_some() {
        bail!("both nats.nkey and nats.nkey_file are set: set one");
    }
    if auth.user.is_some() != auth.password.is_some() {
        bail!("nats.user and nats.password go together: set both or neither");
    }
    Ok(auth)
}

/// Checks that every configured file is there before connecting, and names
/// the kind of credential for messages.
fn check_files(cfg: &NatsConfig, auth: &NatsAuth) -> anyhow::Result<&'static str> {
    let readable = |what: &str, path: &Path| -> anyhow::Result<()> {
        std::fs::File::open(path).map(drop).with_context(|| format!("{what} {} cannot be read", path.display()))
    };
    if let Some(p) = &cfg.tls.ca_file {
        readable("the NATS CA file (nats.tls.ca_file)", p)?;
    }
    match (&cfg.tls.cert_file, &cfg.tls.key_file) {
        (Some(cert), Some(key)) => {
            readable("the NATS client certificate (nats.tls.cert_file)", cert)?;
            readable("the NATS client key (nats.tls.key_file)", key)?;
        }
        (None, None) => {}
        _ => bail!("nats.tls.cert_file and nats.tls.key_file go together: set both or neither"),
    }
    if let Some(p) = &auth.creds_file {
        readable("the NATS creds file", p)?;
        return Ok("creds file");
    }
    if let Some(p) = &auth.nkey_file {
        readable("the NATS NKey seed file", p)?;
    }
    if auth.nkey.is_some() || auth.nkey_file.is_some() {
        let seed = nkey_seed(auth)?.unwrap_or_default();
        nkeys::KeyPair::from_seed(&seed).map_err(|e| anyhow::anyhow!("the configured NATS NKey is not a valid seed: {e}"))?;
        return Ok("NKey");
    }
    Ok(if auth.token.is_some() {
        "token"
    } else if auth.user.is_some() {
        "user and password"
    } else if cfg.tls.cert_file.is_some() {
        "client certificate"
    } else {
        "no credentials"
    })
}

fn nkey_seed(auth: &NatsAuth) -> anyhow::Result<Option<String>> {
    if let Some(seed) = &auth.nkey {
        return Ok(Some(seed.trim().to_owned()));
    }
    match &auth.nkey_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading the NKey seed file {}", path.display()))?;
            // A seed file may hold comments or the public key beside the seed.
            let seed = text.lines().map(str::trim).find(|l| l.starts_with('S')).map(str::to_owned);
            seed.map(Some).with_context(|| format!("no NKey seed (a line starting with S) in {}", path.display()))
        }
        None => Ok(None),
    }
}

async fn options(cfg: &NatsConfig, auth: &NatsAuth, role: Role) -> anyhow::Result<async_nats::ConnectOptions> {
    let mut opts = async_nats::ConnectOptions::new().name(role.name()).max_reconnects(None).event_callback(move |event| async move {
        match event {
            async_nats::Event::Connected => tracing::info!(connection = role.name(), "connected to NATS"),
            async_nats::Event::Disconnected if closing() => {
                tracing::debug!(connection = role.name(), "disconnected from NATS while shutting down")
            }
            async_nats::Event::Disconnected => tracing::warn!(connection = role.name(), "disconnected from NATS; reconnecting"),
            async_nats::Event::ClientError(e) if !closing() => {
                tracing::warn!(connection = role.name(), error = %e, "NATS connection problem")
            }
            async_nats::Event::ServerError(e) => tracing::warn!(connection = role.name(), error = %e, "NATS server error"),
            other => tracing::debug!(connection = role.name(), event = %other, "NATS event"),
        }
    });
    if matches!(role, Role::Store | Role::Tool) {
        opts = opts.custom_inbox_prefix(STORE_INBOX_PREFIX);
    }
    if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &auth.token {
        opts = opts.token(token.clone());
    }
    if let Some(seed) = nkey_seed(auth)? {
        opts = opts.nkey(seed);
    }
    if let Some(path) = &auth.creds_file {
        opts = opts.credentials_file(path).await.with_context(|| format!("reading the NATS creds file {}", path.display()))?;
    }
    if let Some(ca) = &cfg.tls.ca_file {
        opts = opts.add_root_certificates(PathBuf::from(ca));
    }
    if let (Some(cert), Some(key)) = (&cfg.tls.cert_file, &cfg.tls.key_file) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if cfg.tls.required {
        opts = opts.require_tls(true);
    }
    Ok(opts)
}

/// Whether a connection error is a TLS failure (a certificate not trusted,
/// a client certificate refused): permanent, not worth retrying.
fn tls_failure(err: &async_nats::ConnectError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = source {
        if e.downcast_ref::<async_nats::rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.get_ref().is_some_and(|inner| inner.downcast_ref::<async_nats::rustls::Error>().is_some())
        {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_a_url_are_taken_out_of_it_and_decoded() {
        let (bare, creds) = strip_userinfo("nats://bot:p%40ss:w@127.0.0.1:4222");
        assert_eq!(bare, "nats://127.0.0.1:4222");
        assert_eq!(creds, Some(UrlCreds::UserPassword("bot".into(), "p@ss:w".into())));
        let (bare, creds) = strip_userinfo("tls://s3cret@nats-1:4222/");
        assert_eq!(bare, "tls://nats-1:4222/");
        assert_eq!(creds, Some(UrlCreds::Token("s3cret".into())));
        assert_eq!(strip_userinfo("nats://h:1"), ("nats://h:1".into(), None));
        assert_eq!(strip_userinfo("u:p@h:1"), ("h:1".into(), Some(UrlCreds::UserPassword("u".into(), "p".into()))));
    }

    #[test]
    fn urls_with_different_credentials_are_refused() {
        let urls = ["nats://a:1@h1:4222".to_owned(), "nats://a:2@h2:4222".to_owned()];
        assert!(split_urls(&urls).is_err());
        let urls = ["nats://a:1@h1:4222".to_owned(), "nats://h2:4222".to_owned()];
        let (addrs, creds) = split_urls(&urls).unwrap();
        assert_eq!(addrs.len(), 2);
        assert_eq!(addrs[0].username(), None, "no credentials are left in the address");
        assert_eq!(creds, Some(UrlCreds::UserPassword("a".into(), "1".into())));
    }

    #[test]
    fn url_credentials_fill_in_and_never_mix_with_configured_ones() {
        let url = Some(UrlCreds::UserPassword("u".into(), "p".into()));
        let auth = resolve_auth(NatsAuth::default(), url.clone(), false).unwrap();
        assert_eq!((auth.user.as_deref(), auth.password.as_deref()), (Some("u"), Some("p")));
        let token = NatsAuth { token: Some("t".into()), ..Default::default() };
        assert!(resolve_auth(token.clone(), url.clone(), false).is_err());
        // The serving identity of [nats.serve] stands in for the URL's.
        assert_eq!(resolve_auth(token.clone(), url, true).unwrap(), token);
        let two = NatsAuth { token: Some("t".into()), user: Some("u".into()), password: Some("p".into()), ..Default::default() };
        assert!(resolve_auth(two, None, false).is_err());
        let half = NatsAuth { user: Some("u".into()), ..Default::default() };
        assert!(resolve_auth(half, None, false).is_err());
    }

    #[test]
    fn the_serving_connection_falls_back_to_the_main_credentials() {
        let mut cfg = NatsConfig { user: Some("store".into()), password: Some("a".into()), ..Default::default() };
        assert_eq!(auth_for(&cfg, Role::Serve).user.as_deref(), Some("store"));
        cfg.serve = NatsAuth { user: Some("responder".into()), password: Some("b".into()), ..Default::default() };
        assert_eq!(auth_for(&cfg, Role::Serve).user.as_deref(), Some("responder"));
        assert_eq!(auth_for(&cfg, Role::Store).user.as_deref(), Some("store"));
        assert_eq!(auth_for(&cfg, Role::Tool).user.as_deref(), Some("store"));
    }

    #[test]
    fn missing_files_and_bad_seeds_are_named_before_connecting() {
        let cfg = NatsConfig {
            tls: crate::config::NatsTls { ca_file: Some("/nonexistent/ca.pem".into()), ..Default::default() },
            ..Default::default()
        };
        let err = check_files(&cfg, &cfg.auth()).unwrap_err();
        assert!(format!("{err:#}").contains("nats.tls.ca_file"), "{err:#}");
        let cfg = NatsConfig { nkey: Some("SUNOTASEED".into()), ..Default::default() };
        let err = check_files(&cfg, &cfg.auth()).unwrap_err();
        assert!(format!("{err:#}").contains("not a valid seed"), "{err:#}");
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let cfg = NatsConfig { nkey: Some(seed), ..Default::default() };
        assert_eq!(check_files(&cfg, &cfg.auth()).unwrap(), "NKey");
    }
}
