//! Where the sealing keys come from.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use bstore_codec::Keyring;

use crate::config::KeysConfig;

/// Builds the keyring from the configured keys and key file. With neither:
/// on the embedded default a key is generated into `data_dir` (owner-only)
/// on first start and reused after; pointed at external servers the service
/// refuses to start, because a key that lives on one machine's disk is a
/// key that a fleet cannot share and an operator will lose.
pub fn load(cfg: &KeysConfig, data_dir: &Path, embedded: bool) -> anyhow::Result<Keyring> {
    let mut entries = Vec::new();
    if let Some(text) = &cfg.keys {
        entries.extend(Keyring::parse_entries(text).context("in BSTORE_KEYS / keys.keys")?);
    }
    if let Some(file) = &cfg.file {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading key file {}", file.display()))?;
        entries.extend(Keyring::parse_entries(&text).with_context(|| format!("in key file {}", file.display()))?);
    }
    if entries.is_empty() {
        if !embedded {
            bail!("no sealing key configured: set BSTORE_KEYS or keys.file (generate one with `baileys-store gen-key`)");
        }
        let file = data_dir.join("sealing.keys");
        if !file.exists() {
            generate(&file)?;
            tracing::warn!(
                file = %file.display(),
                "GENERATED A NEW SEALING KEY. Everything stored is sealed under it: back this file up, \
                 and keep it secret. Without it the data cannot be read."
            );
        } else {
            tracing::info!(file = %file.display(), "using the sealing key generated earlier");
        }
        let text = std::fs::read_to_string(&file)?;
        entries = Keyring::parse_entries(&text).with_context(|| format!("in key file {}", file.display()))?;
    }
    Ok(Keyring::new(entries, cfg.current)?)
}

fn generate(file: &Path) -> anyhow::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let entry = Keyring::format_entry(1, &Keyring::generate_key());
    create_private(file, &format!("# baileys-store sealing keys (id:base64). Add a higher id to rotate.\n{entry}\n"))
}

/// Creates `path` owner-only (0600) from the start — it must not exist —
/// writes `contents` and syncs it: for generated secrets.
pub(crate) fn create_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// `bytes` random bytes from the OS (at most 32), as lowercase hex: for
/// generated passwords, safe in any quoting.
pub fn random_hex(bytes: usize) -> String {
    Keyring::generate_key().iter().take(bytes).map(|b| format!("{b:02x}")).collect()
}
