//! The `baileys-store` command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use baileys_store::{Config, telemetry};
use clap::{Parser, Subcommand};

mod tenant;

/// Auth-state store for fleets of Baileys bots.
///
/// Example: `baileys-store serve` runs the service on its embedded default (its own nats-server
/// under ./data); `baileys-store history --tenant acme --session bot-1` reads a session's audit.
/// Every command has `--help` with an example.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Configuration file (TOML). Default: none, or $BSTORE_CONFIG.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve requests until SIGINT or SIGTERM. With no NATS URL configured it
    /// starts its own nats-server under the data dir.
    ///
    /// Example: `BSTORE_NATS_URL=nats://n1:4222 BSTORE_KEY_FILE=/etc/bstore/keys baileys-store serve`;
    /// with no settings at all it runs the embedded default under `./data`.
    Serve,
    /// Print a new random sealing key entry (`id:base64`) for BSTORE_KEYS or a key file.
    ///
    /// Example: `baileys-store gen-key --id 2 >> /etc/bstore/keys` (then `rotate-key 2`).
    GenKey {
        /// The key id; use one higher than every key in use to rotate.
        #[arg(long, default_value_t = 1)]
        id: u32,
    },
    /// Make key ID the sealing key of the whole cluster, then re-seal the projections.
    ///
    /// Refused unless every live instance holds that very key (add it to every instance's keys and
    /// restart them one at a time first). Then Redis and Mongo, when configured, are written again
    /// from the log under the new key (each session from its newest snapshot). Events in the log
    /// stay under the key that sealed them: `keys status` says what is left under each key.
    /// Example: `baileys-store gen-key --id 2 >> keys` on every instance, restart them one at a
    /// time, then `baileys-store rotate-key 2`.
    RotateKey {
        /// The id of the key to seal under.
        id: u32,
        /// Switch the key only; leave the projections as they are.
        #[arg(long)]
        no_reseal: bool,
    },
    /// Sealing keys: what is sealed under each, and the index key.
    ///
    /// Example: `baileys-store keys status` before retiring a key.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Print the audit history of one session as JSON lines: what changed, when, by which request (never the values).
    ///
    /// Example: `baileys-store history --tenant acme --session bot-1 --type creds` lists every
    /// change of the creds (the identity key lives there); `--type session --id 491511234.0`
    /// every change of one Signal session. A session's deletion is always listed.
    History {
        /// Tenant id.
        #[arg(long)]
        tenant: String,
        /// Session id.
        #[arg(long)]
        session: String,
        /// Only events that changed keys of this type (`creds`: the creds).
        #[arg(long = "type")]
        ty: Option<String>,
        /// With --type: only events that changed this key id.
        #[arg(long, requires = "ty")]
        id: Option<String>,
    },
    /// Print a session as it stood at a past sequence or moment: every key's type, id, size, SHA-256
    /// and the event that last wrote it (values only with --values).
    ///
    /// Example: `baileys-store state-at --tenant acme --session bot-1 --seq 1200`, or
    /// `--at-ms 1764680700000` for the state as of a moment.
    StateAt {
        /// Tenant id.
        #[arg(long)]
        tenant: String,
        /// Session id.
        #[arg(long)]
        session: String,
        /// The last event to include, by stream sequence (as `history` lists them).
        #[arg(long, conflicts_with = "at_ms", required_unless_present = "at_ms")]
        seq: Option<u64>,
        /// Include every event decided at or before this time, in ms since the Unix epoch.
        #[arg(long)]
        at_ms: Option<u64>,
        /// Also print each value (base64). They are secrets: handle the output accordingly.
        #[arg(long)]
        values: bool,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print what changed in a session between two sequences: keys added, removed and changed (by
    /// digest; never a value).
    ///
    /// Example: `baileys-store diff --tenant acme --session bot-1 --from 1100 --to 1200`.
    Diff {
        /// Tenant id.
        #[arg(long)]
        tenant: String,
        /// Session id.
        #[arg(long)]
        session: String,
        /// The earlier point: the last event included, by stream sequence.
        #[arg(long)]
        from: u64,
        /// The later point (default: the session's latest state).
        #[arg(long)]
        to: Option<u64>,
        /// One JSON object instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Write sessions out as `useMultiFileAuthState` folders (`OUT/<session>/creds.json` and
    /// `<type>-<id>.json`, each file as Baileys would have written it), or as Redis hashes, read
    /// from the log.
    ///
    /// Nothing is overwritten without --force; every file is converted before any is written.
    /// Example: `baileys-store export --tenant acme --session bot-1 --out ./auth` gives
    /// `./auth/bot-1`, which `useMultiFileAuthState('./auth/bot-1')` opens; without --session every
    /// session of the tenant is written. `baileys-store export --tenant acme --to-redis
    /// redis://r1:6379/0` writes each session as the hash `<session>:auth` that baileys-redis-auth's
    /// `useRedisAuthStateWithHSet(options, '<session>')` opens; for Evolution API
    /// `--key-pattern 'evolution-cache:instance:{session}' --raw-ids`.
    Export {
        /// Tenant id.
        #[arg(long)]
        tenant: String,
        /// Only this session; without it, every session of the tenant.
        #[arg(long)]
        session: Option<String>,
        /// The parent folder of the session folders.
        #[arg(long, required_unless_present = "to_redis", conflicts_with = "to_redis")]
        out: Option<PathBuf>,
        /// Write one Redis hash per session instead (fields `creds` and `<type>-<id>`, values as
        /// Baileys' BufferJSON writes them): `redis://host:port/db`, or `rediss://`.
        #[arg(long, value_name = "URL")]
        to_redis: Option<String>,
        /// With --to-redis: the hash's name, `{session}` in it as a whole `:`-separated part.
        /// Default `{session}:auth` (baileys-redis-auth 2.x).
        #[arg(long, requires = "to_redis")]
        key_pattern: Option<String>,
        /// With --to-redis: ids in field names as they are (Evolution API, baileys-redis-auth 1.x)
        /// instead of escaped as in file names (`/` as `__`, `:` as `-`; baileys-redis-auth 2.x).
        #[arg(long, requires = "to_redis")]
        raw_ids: bool,
        /// Overwrite files (or replace hashes) that exist.
        #[arg(long)]
        force: bool,
        /// One JSON object per session instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Move `useMultiFileAuthState` folders, or a Redis-direct store, into the store through the
    /// running service, so bots switch to `useNatsAuthState` without pairing again.
    ///
    /// A folder holding creds.json is one session (--session names it); with --all, every such
    /// folder under --from is imported as the session its name says. With --from-redis, sessions
    /// are hashes with a `creds` field (baileys-redis-auth's `useRedisAuthStateWithHSet`, Evolution
    /// API) or keys `<session>:creds`, `<session>:<type>-<id>` (baileys-redis-auth's
    /// `useRedisAuthState`), each imported as the session its name holds; the layout and where the
    /// session sits in a name are found (SCAN) unless --layout and --key-pattern say. Values are
    /// stored exactly as the Node client would store them; an entry that does not read is skipped
    /// and reported. A session with state is refused unless --force (or reported unchanged if it
    /// holds exactly this already); running the same import again writes nothing new.
    /// Example: `baileys-store import --tenant acme --session bot-1 --from ./auth_info_baileys`,
    /// `baileys-store import --tenant acme --all --from /srv/bots/auth --dry-run`,
    /// `baileys-store import --tenant acme --all --from-redis redis://r1:6379/0`, or for Evolution
    /// API `--from-redis redis://r1:6379/0 --layout hash --key-pattern 'evolution-cache:instance:{session}'`.
    Import {
        /// Tenant id.
        #[arg(long)]
        tenant: String,
        /// The session to import: the folder --from into it, or the one of this name in --from-redis.
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        session: Option<String>,
        /// Import every session folder under --from, or every session in --from-redis.
        #[arg(long)]
        all: bool,
        /// The session's folder, or with --all their parent.
        #[arg(long, required_unless_present = "from_redis", conflicts_with = "from_redis")]
        from: Option<PathBuf>,
        /// A Redis-direct store instead: `redis://host:port/db`, or `rediss://`.
        #[arg(long, value_name = "URL")]
        from_redis: Option<String>,
        /// With --from-redis: a hash per session, a key per record, or found from what is there.
        #[arg(long, value_enum, requires = "from_redis")]
        layout: Option<baileys_store::tools::redis_layouts::Layout>,
        /// With --from-redis: where the session sits in a hash's name (keys layout: in the name
        /// before `:creds`), `{session}` as a whole `:`-separated part, e.g. `{session}:auth`,
        /// `authState:{session}` or `evolution-cache:instance:{session}`. Found when not given.
        #[arg(long, requires = "from_redis")]
        key_pattern: Option<String>,
        /// Read and check everything, write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Import into sessions that already have state.
        #[arg(long)]
        force: bool,
        /// One JSON object per session instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put sessions back to their state at a sequence or a moment, each as one new event in its
    /// history (`history` lists it as `restored`, with the point), through the running service.
    ///
    /// With --session (one or more), those sessions; without it, every session of the tenant that
    /// changed after the point. A moment stands for each session's last event before the first one
    /// decided after it. The owner of each session decides the restore against the session's state
    /// when it runs: writes acknowledged after it stay. A session already at that state is reported
    /// and nothing is written; a point before the kept history (audit retention, erasure), beyond the
    /// log or where the session held nothing is refused. More than one session needs --yes.
    /// Example: `baileys-store restore --tenant acme --at-ms 1764680700000 --dry-run`, then the same
    /// with `--yes`; or `baileys-store restore --tenant acme --session bot-1 --seq 1200`.
    Restore {
        /// Tenant id.
        #[arg(long)]
        tenant: String,
        /// Only these sessions (repeat --session); without it, every session of the tenant that
        /// changed after the point.
        #[arg(long)]
        session: Vec<String>,
        /// The point: the state after the session's events through this stream sequence.
        #[arg(long, conflicts_with = "at_ms", required_unless_present = "at_ms")]
        seq: Option<u64>,
        /// The point: the state as of this moment, in ms since the Unix epoch.
        #[arg(long)]
        at_ms: Option<u64>,
        /// Have each session's owner say what it would change; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Really restore more than one session.
        #[arg(long)]
        yes: bool,
        /// One JSON object per session instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Run the Mongo materializer alone (no request serving) until SIGINT or SIGTERM.
    ///
    /// Example: `BSTORE_NATS_URL=nats://n1:4222 BSTORE_MONGO_URL=mongodb://m1/ baileys-store materialize`;
    /// several may run at once on the same durable consumer.
    Materialize,
    /// Write a projection again from the log alone: every session's Redis hash, or its Mongo
    /// documents, from its newest snapshot plus the events after it (time proportional to the
    /// states, not the history). Safe while the service runs; Mongo's materializers resume after
    /// what was rebuilt.
    ///
    /// Example: `baileys-store rebuild redis` after losing the cache, `baileys-store rebuild mongo`
    /// after losing or damaging Mongo, or to clear its quarantine.
    Rebuild {
        /// Which projection.
        #[arg(value_enum)]
        target: baileys_store::tools::rebuild::Target,
        /// Replay every event of each session (from its first kept one) instead of starting from
        /// its newest snapshot.
        #[arg(long)]
        from_scratch: bool,
        /// Print the summary as one JSON object (progress goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Erase a session (or every session of a tenant) for good: its data key is destroyed, so its
    /// events, Redis and Mongo values cannot be read by anyone, and it starts empty.
    ///
    /// The audit log keeps its messages (purges are denied) and records the erasure as a session
    /// deletion. Events written before the cluster had data keys stay readable to the holder of
    /// the sealing key; the report says how many. Without --yes it lists what would be erased.
    /// Example: `baileys-store erase --tenant acme --session bot-1 --yes`.
    Erase {
        /// Tenant id.
        #[arg(long)]
        tenant: String,
        /// Only this session; without it, every session of the tenant.
        #[arg(long)]
        session: Option<String>,
        /// Really erase (it cannot be undone).
        #[arg(long)]
        yes: bool,
        /// One JSON object per session instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Tenants' NATS accounts.
    ///
    /// Example: `baileys-store tenant add acme` prints the account block for tenant `acme`.
    Tenant {
        #[command(subcommand)]
        cmd: tenant::TenantCmd,
    },
    /// Replay the log and compare it with Redis and Mongo (those configured); report every session
    /// and difference, and exit non-zero, naming the failing sessions, on any.
    ///
    /// Every event must open and sit where it was written, and each session's chain must hold;
    /// with no projection configured (the embedded default) only the log is checked.
    /// Example: `baileys-store verify --tenant acme --session bot-1`, or `baileys-store verify --json`.
    Verify {
        /// Only this tenant's session (with --session).
        #[arg(long, requires = "session")]
        tenant: Option<String>,
        /// Only this session (with --tenant).
        #[arg(long, requires = "tenant")]
        session: Option<String>,
        /// One JSON object (per-session reports, differences, failing sessions) instead of lines.
        #[arg(long)]
        json: bool,
        /// Replay every event of each session and compare every snapshot with the events up to
        /// it, instead of checking each session from its newest snapshot on (time proportional to
        /// the history rather than to the state).
        #[arg(long)]
        from_scratch: bool,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Per key id: how many log events, Redis values and Mongo values are sealed under it, which
    /// live instances hold it, and whether it can be retired.
    ///
    /// Example: `baileys-store keys status --json | jq '.keys[] | select(.retirable)'`.
    Status {
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Give sessions data keys of their own from now on (a cluster upgraded from a release without
    /// them; a new cluster has them from its first start). Refused unless every live process reads
    /// them. Needed for `erase` to make a session's events unreadable.
    ///
    /// Example: `baileys-store keys enable-data-keys`, once every instance runs this release.
    EnableDataKeys,
    /// Print the index key as an `index:base64` entry: added to every instance's keys, it keeps
    /// the names in Redis and Mongo when the key it is derived from (the lowest id) is retired.
    ///
    /// Example: `baileys-store keys index >> /etc/bstore/keys` on every instance before retiring
    /// key 1.
    Index,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baileys-store: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::GenKey { id } => {
            println!("{}", bstore_codec::Keyring::format_entry(id, &bstore_codec::Keyring::generate_key()));
            Ok(())
        }
        Cmd::Tenant { cmd } => tenant::run(cmd),
        Cmd::RotateKey { id, no_reseal } => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            actix::System::new().block_on(baileys_store::tools::keys::rotate(cfg, id, !no_reseal))
        }
        Cmd::Keys { cmd: KeysCmd::Status { json } } => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            actix::System::new().block_on(baileys_store::tools::keys::status(cfg, json))
        }
        Cmd::Keys { cmd: KeysCmd::EnableDataKeys } => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            actix::System::new().block_on(baileys_store::tools::keys::enable_data_keys(cfg))
        }
        Cmd::Erase { tenant, session, yes, json } => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            let tenant = bstore_domain::TenantId::parse(&tenant)?;
            let only = session.map(|s| bstore_domain::SessionKey::parse(tenant.as_str(), &s)).transpose()?;
            actix::System::new().block_on(baileys_store::tools::erase::run(cfg, tenant, only, yes, json))
        }
        Cmd::Keys { cmd: KeysCmd::Index } => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            baileys_store::tools::keys::index(&cfg)
        }
        Cmd::Serve => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            actix::System::new().block_on(baileys_store::run(cfg, shutdown_signal()))
        }
        Cmd::History { tenant, session, ty, id } => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            let key = bstore_domain::SessionKey::parse(&tenant, &session)?;
            let only = ty.map(|ty| baileys_store::tools::history::Filter { ty, id });
            actix::System::new().block_on(baileys_store::tools::history::run(cfg, key, only))
        }
        Cmd::StateAt { tenant, session, seq, at_ms, values, json } => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            let key = bstore_domain::SessionKey::parse(&tenant, &session)?;
            let point = match (seq, at_ms) {
                (Some(n), _) => baileys_store::tools::state_at::Point::Seq(n),
                (None, Some(t)) => baileys_store::tools::state_at::Point::TimeMs(t),
                (None, None) => unreachable!("clap requires one"),
            };
            actix::System::new().block_on(baileys_store::tools::state_at::run(cfg, key, point, values, json))
        }
        Cmd::Diff { tenant, session, from, to, json } => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            let key = bstore_domain::SessionKey::parse(&tenant, &session)?;
            use baileys_store::tools::state_at::Point;
            let to = to.map_or(Point::Seq(u64::MAX), Point::Seq);
            actix::System::new().block_on(baileys_store::tools::state_at::run_diff(cfg, key, Point::Seq(from), to, json))
        }
        Cmd::Export { tenant, session, out, to_redis, key_pattern, raw_ids, force, json } => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            let tenant = bstore_domain::TenantId::parse(&tenant)?;
            let only = session.map(|s| bstore_domain::SessionKey::parse(tenant.as_str(), &s)).transpose()?;
            use baileys_store::tools::export::Target;
            let target = match (out, to_redis) {
                (_, Some(url)) => {
                    let pattern = baileys_store::tools::redis_layouts::Pattern::parse(key_pattern.as_deref().unwrap_or("{session}:auth"))?;
                    Target::RedisHash { url, pattern, escaped: !raw_ids }
                }
                (Some(out), None) => {
                    // clap leaves `requires` unchecked beside a conflicting argument.
                    anyhow::ensure!(key_pattern.is_none() && !raw_ids, "--key-pattern and --raw-ids go with --to-redis");
                    Target::Folders(out)
                }
                (None, None) => unreachable!("clap requires --out or --to-redis"),
            };
            actix::System::new().block_on(baileys_store::tools::export::run(cfg, tenant, only, target, force, json))
        }
        Cmd::Import { tenant, session, all: _, from, from_redis, layout, key_pattern, dry_run, force, json } => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            let tenant = bstore_domain::TenantId::parse(&tenant)?;
            use baileys_store::tools::import::{Options, Source};
            use baileys_store::tools::redis_layouts::{Layout, Wanted};
            // clap leaves `requires` unchecked beside a conflicting argument.
            anyhow::ensure!(
                from_redis.is_some() || (layout.is_none() && key_pattern.is_none()),
                "--layout and --key-pattern go with --from-redis"
            );
            let source = match (from, from_redis, session) {
                (_, Some(url), session) => {
                    Source::Redis(Wanted { url, layout: layout.unwrap_or(Layout::Auto), pattern: key_pattern, session })
                }
                (Some(dir), None, Some(session)) => Source::One { session, dir },
                (Some(parent), None, None) => Source::All { parent },
                (None, None, _) => unreachable!("clap requires --from or --from-redis"),
            };
            actix::System::new().block_on(baileys_store::tools::import::run(cfg, tenant, source, Options { dry_run, force, json }))
        }
        Cmd::Restore { tenant, session, seq, at_ms, dry_run, yes, json } => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            let tenant = bstore_domain::TenantId::parse(&tenant)?;
            use baileys_store::tools::restore::{Options, Sessions};
            let which = if session.is_empty() {
                Sessions::ChangedAfter
            } else {
                Sessions::Listed(session.iter().map(|s| bstore_domain::SessionKey::parse(tenant.as_str(), s)).collect::<Result<_, _>>()?)
            };
            let point = match (seq, at_ms) {
                (Some(n), _) => baileys_store::tools::state_at::Point::Seq(n),
                (None, Some(t)) => baileys_store::tools::state_at::Point::TimeMs(t),
                (None, None) => unreachable!("clap requires one"),
            };
            let opts = Options { dry_run, yes, json };
            actix::System::new().block_on(baileys_store::tools::restore::run(cfg, tenant, which, point, opts))
        }
        Cmd::Materialize => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            actix::System::new().block_on(baileys_store::projections::materialize(cfg, shutdown_signal()))
        }
        Cmd::Rebuild { target, from_scratch, json } => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            actix::System::new().block_on(baileys_store::tools::rebuild::rebuild_reporting(cfg, target, from_scratch, json))
        }
        Cmd::Verify { tenant, session, json, from_scratch } => {
            let cfg = Config::load(cli.config.as_deref())?;
            telemetry::init(&cfg.telemetry)?;
            let only = match (tenant, session) {
                (Some(t), Some(s)) => Some(bstore_domain::SessionKey::parse(&t, &s)?),
                _ => None,
            };
            let found = actix::System::new().block_on(baileys_store::tools::verify::verify(cfg, only, json, from_scratch))?;
            anyhow::ensure!(
                found.differences == 0,
                "{} differences or failures; failing sessions: {}",
                found.differences,
                found.failing.join(", ")
            );
            Ok(())
        }
    }
    .context("failed")
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    /// Every command, and every subcommand under it, says in its `--help`
    /// how it is used: a new command without an example fails here.
    #[test]
    fn every_command_has_an_example_in_its_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) -> usize {
            let mut seen = 0;
            for sub in cmd.get_subcommands() {
                seen += 1;
                let path = format!("{path} {}", sub.get_name());
                let help = sub.get_long_about().or(sub.get_about()).map(|s| s.to_string()).unwrap_or_default();
                if !help.contains("Example") {
                    missing.push(path.clone());
                }
                seen += walk(sub, &path, missing);
            }
            seen
        }
        let cli = Cli::command();
        cli.clone().debug_assert();
        let mut missing = Vec::new();
        let seen = walk(&cli, "baileys-store", &mut missing);
        assert!(seen >= 18, "only {seen} commands walked");
        assert!(missing.is_empty(), "commands without an example in --help: {missing:?}");
    }
}
