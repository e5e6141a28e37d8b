//! `baileys-store tenant add <name>`: what an operator adds to the NATS
//! configuration for a new tenant.
//!
//! A tenant is a NATS account that imports only its own request subjects,
//! `<prefix>.<tenant>.>`, from the service's account (see
//! `deploy/accounts.conf` and `docs/deploy.md`). The command prints the
//! account block for a static configuration, with a bot user and a freshly
//! generated password, and the `nsc` commands that make the same account in
//! the decentralized (JWT) form. It changes nothing itself.

use bstore_domain::TenantId;
use clap::Subcommand;

/// The service's account in `deploy/accounts.conf`.
pub const SERVICE_ACCOUNT: &str = "BSTORE";

/// `baileys-store tenant ...`
#[derive(Subcommand)]
pub enum TenantCmd {
    /// Print the NATS account of a new tenant: a static `accounts {}` entry
    /// with a bot user and a fresh random password, and the matching nsc
    /// commands.
    ///
    /// Example: `baileys-store tenant add acme >> /etc/nats/tenants.conf`, then reload
    /// nats-server; the bots of `acme` connect with the user and password it printed.
    Add {
        /// The tenant id, as bots send it: 1–128 characters of [A-Za-z0-9_-].
        name: String,
        /// The request subject prefix (the service's `api.prefix`).
        #[arg(long, default_value = "bstore")]
        prefix: String,
        /// The account that exports the request subjects.
        #[arg(long, default_value = SERVICE_ACCOUNT)]
        service_account: String,
    },
}

/// Runs a `tenant` subcommand, printing to stdout.
pub fn run(cmd: TenantCmd) -> anyhow::Result<()> {
    match cmd {
        TenantCmd::Add { name, prefix, service_account } => {
            print!("{}", add(&name, &prefix, &service_account, &random_password())?);
            Ok(())
        }
    }
}

/// The text `tenant add` prints for `name` with `password`.
pub fn add(name: &str, prefix: &str, service_account: &str, password: &str) -> anyhow::Result<String> {
    let tenant = TenantId::parse(name)?;
    let tenant = tenant.as_str();
    anyhow::ensure!(tenant != service_account, "a tenant cannot be named after the service's account {service_account:?}");
    anyhow::ensure!(
        !prefix.is_empty()
            && prefix.split('.').all(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')),
        "bad subject prefix {prefix:?}"
    );
    let subject = format!("{prefix}.{tenant}.>");
    let user = format!("{tenant}-bot");
    Ok(format!(
        r#"# Tenant "{tenant}": its bots connect as "{user}" and can call only
# {subject}. Static configuration: add this entry inside accounts {{ }}
# (deploy/accounts.conf) on every server, then reload them
# (nats-server --signal reload). The password is shown only here.

  "{tenant}" {{
    users: [
      {{ user: "{user}", password: "{password}" }}
    ]
    imports: [
      {{ service: {{ account: "{service_account}", subject: "{subject}" }} }}
    ]
  }}

# The same with nsc (decentralized JWT form; see docs/deploy.md):
#
#   nsc add account --name {tenant}
#   nsc add import --account {tenant} --service --name bstore \
#       --src-account <public key of {service_account}> --remote-subject "{subject}"
#   nsc add user --account {tenant} --name {user}
#   nsc generate creds --account {tenant} --name {user} > {user}.creds
#   nsc push --account {tenant}
"#
    ))
}

/// 24 random bytes from the OS, hex: 192 bits, safe in any quoting.
fn random_password() -> String {
    baileys_store::keys::random_hex(24)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_an_account_importing_only_its_own_subjects() {
        let text = add("acme", "bstore", SERVICE_ACCOUNT, "pw123").unwrap();
        assert!(text.contains(r#""acme" {"#), "{text}");
        assert!(text.contains(r#"{ user: "acme-bot", password: "pw123" }"#), "{text}");
        assert!(text.contains(r#"{ service: { account: "BSTORE", subject: "bstore.acme.>" } }"#), "{text}");
        // One import, nothing wider than the tenant's own subjects, no JetStream.
        assert_eq!(text.matches("service: {").count(), 1);
        assert!(!text.contains("bstore.>") && !text.contains("bstore.*") && !text.contains("jetstream"), "{text}");
        assert!(text.contains(r#"nsc add import --account acme --service"#), "{text}");
        assert!(text.contains(r#"--remote-subject "bstore.acme.>""#), "{text}");
        assert!(text.contains("nsc generate creds --account acme --name acme-bot"), "{text}");
    }

    #[test]
    fn a_prefix_with_dots_is_kept() {
        let text = add("t-1", "bots.v1", SERVICE_ACCOUNT, "x").unwrap();
        assert!(text.contains(r#"subject: "bots.v1.t-1.>""#), "{text}");
    }

    #[test]
    fn names_the_service_would_refuse_are_refused() {
        for bad in ["", "a.b", "a*", ">", "a b", "ü", &"x".repeat(129), "BSTORE"] {
            assert!(add(bad, "bstore", SERVICE_ACCOUNT, "x").is_err(), "{bad:?} accepted");
        }
        assert!(add("ok", "bad..prefix", SERVICE_ACCOUNT, "x").is_err());
        assert!(add("ok", "bstore.>", SERVICE_ACCOUNT, "x").is_err());
    }

    #[test]
    fn passwords_are_fresh_and_long() {
        let (a, b) = (random_password(), random_password());
        assert_eq!(a.len(), 48);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    /// The printed block, added to the shipped accounts, is a configuration
    /// nats-server accepts.
    #[test]
    fn the_block_is_valid_nats_server_configuration() {
        let root = bstore_testkit::repo_root();
        let shipped = std::fs::read_to_string(root.join("deploy/accounts.conf")).unwrap();
        let block = add("newco", "bstore", SERVICE_ACCOUNT, &random_password()).unwrap();
        // Into the accounts { } block: before its closing brace (the file's last).
        let end = shipped.rfind('}').unwrap();
        let conf = format!("{}{}\n}}\n", &shipped[..end], block);
        let dir = bstore_testkit::TempDir::new("tenant-conf");
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, &conf).unwrap();
        let bin = bstore_testkit::find_bin("NATS_SERVER_BIN", ".tools/nats/bin/nats-server", "nats-server");
        let out = std::process::Command::new(bin).arg("-t").arg("-c").arg(&path).output().unwrap();
        assert!(out.status.success(), "{}\n{conf}", String::from_utf8_lossy(&out.stderr));
    }
}
