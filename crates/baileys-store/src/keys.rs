//! Where the sealing keys come from.
//!
//! Keys are configured (`BSTORE_KEYS`, a key file) everywhere but on the
//! embedded default, where a key is generated on the first start. That key
//! is kept apart from the data it protects — by default in
//! `<data_dir>.keys/`, beside the data dir, not in it — so a copy of the
//! data dir (a backup, a disk image of the JetStream store) does not carry
//! the key that opens it.
//!
//! Which of the ring's keys seals is the cluster's choice, not this
//! module's: see [`crate::rotation`].

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use bstore_codec::{KeySpec, Keyring};

use crate::config::KeysConfig;

/// The name of the generated key file.
pub const GENERATED_FILE: &str = "sealing.keys";

/// Builds the keyring from the configured keys and key file. With neither:
/// on the embedded default a key is generated on first start into
/// [`generated_file`] (owner-only, outside the data dir) and reused after;
/// pointed at external servers the service refuses to start, because a key
/// that lives on one machine's disk is a key that a fleet cannot share and
/// an operator will lose.
pub fn load(cfg: &KeysConfig, data_dir: &Path, embedded: bool) -> anyhow::Result<Keyring> {
    load_with(cfg, data_dir, embedded, true)
}

/// Like [`load`] for the command-line tools, which never generate a key:
/// on the embedded default they use the one the service generated.
pub fn load_for_tool(cfg: &KeysConfig, data_dir: &Path, embedded: bool) -> anyhow::Result<Keyring> {
    load_with(cfg, data_dir, embedded, false)
}

fn load_with(cfg: &KeysConfig, data_dir: &Path, embedded: bool, may_generate: bool) -> anyhow::Result<Keyring> {
    let mut spec = KeySpec::default();
    if let Some(text) = &cfg.keys {
        spec.extend(Keyring::parse_spec(text).context("in BSTORE_KEYS / keys.keys")?)?;
    }
    if let Some(file) = &cfg.file {
        spec.extend(read_file(file)?)?;
    }
    if spec.keys.is_empty() {
        if !embedded {
            bail!("no sealing key configured: set BSTORE_KEYS or keys.file (generate one with `baileys-store gen-key`)");
        }
        let file = generated_file(cfg, data_dir)?;
        move_from_data_dir(&data_dir.join(GENERATED_FILE), &file)?;
        if !file.exists() {
            if !may_generate {
                bail!("no sealing key: {} does not exist (the service generates it on its first start)", file.display());
            }
            generate(&file)?;
            tracing::warn!(
                file = %file.display(),
                data_dir = %data_dir.display(),
                "GENERATED A NEW SEALING KEY into the file named here, outside the data dir: a copy of the data dir does not \
                 carry it. Back this file up separately from the data, and keep it secret: without it the data cannot be read."
            );
        } else {
            tracing::info!(
                file = %file.display(),
                "using the sealing key generated earlier (kept outside the data dir: back it up separately from the data)"
            );
        }
        spec.extend(read_file(&file)?)?;
    }
    Ok(Keyring::from_spec(spec, cfg.current)?)
}

/// Where the embedded default keeps its generated key: `keys.generated_file`,
/// or `sealing.keys` in `<data_dir>.keys/`, the directory beside the data dir.
pub fn generated_file(cfg: &KeysConfig, data_dir: &Path) -> anyhow::Result<PathBuf> {
    if let Some(file) = &cfg.generated_file {
        return Ok(file.clone());
    }
    // `data/`, `./data` and `/var/lib/bstore` name their last part; `.`
    // does not, and is resolved first.
    let dir = match data_dir.file_name() {
        Some(_) => data_dir.to_path_buf(),
        None => data_dir.canonicalize().with_context(|| format!("resolving the data dir {}", data_dir.display()))?,
    };
    let Some(name) = dir.file_name() else {
        bail!("the data dir {} has no name to put a key directory beside: set keys.generated_file", data_dir.display());
    };
    let mut keys_dir = name.to_owned();
    keys_dir.push(".keys");
    Ok(dir.with_file_name(keys_dir).join(GENERATED_FILE))
}

fn read_file(file: &Path) -> anyhow::Result<KeySpec> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading key file {}", file.display()))?;
    Keyring::parse_spec(&text).with_context(|| format!("in key file {}", file.display()))
}

fn generate(file: &Path) -> anyhow::Result<()> {
    if let Some(dir) = file.parent() {
        private_dir(dir)?;
    }
    let entry = Keyring::format_entry(1, &Keyring::generate_key());
    create_private(
        file,
        &format!(
            "# baileys-store sealing keys (id:base64), generated for the embedded default.\n\
             # Back this file up apart from the data dir. To rotate: add a higher id here, restart,\n\
             # then `baileys-store rotate-key <id>`.\n{entry}\n"
        ),
    )
}

/// Releases before this one generated the key into the data dir itself.
/// Moves such a file to `to` (written and synced before the old one is
/// removed), or removes it when `to` already holds the same keys.
fn move_from_data_dir(legacy: &Path, to: &Path) -> anyhow::Result<()> {
    if !legacy.exists() || same_file(legacy, to) {
        return Ok(());
    }
    let text = std::fs::read_to_string(legacy).with_context(|| format!("reading {}", legacy.display()))?;
    let spec = Keyring::parse_spec(&text).with_context(|| format!("in key file {}", legacy.display()))?;
    if to.exists() {
        if read_file(to)? != spec {
            bail!(
                "two generated key files hold different keys: {} (inside the data dir, left by an older release) and {}; \
                 keep the one that opens the data and remove the other",
                legacy.display(),
                to.display()
            );
        }
    } else {
        if let Some(dir) = to.parent() {
            private_dir(dir)?;
        }
        create_private(to, &text)?;
        if read_file(to)? != spec {
            bail!("the sealing key copied to {} does not read back; {} is left in place", to.display(), legacy.display());
        }
    }
    std::fs::remove_file(legacy).with_context(|| format!("removing {}", legacy.display()))?;
    tracing::warn!(
        from = %legacy.display(),
        to = %to.display(),
        "MOVED THE GENERATED SEALING KEY out of the data dir, so that a copy of the data does not carry its key. \
         Back the new file up separately from the data."
    );
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Creates `dir` (and its parents) owner-only (0700), or tightens it to
/// that if it exists: it holds a secret.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("restricting {}", dir.display()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn temp(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bstore-keys-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_generated_key_goes_beside_the_data_dir() {
        let cfg = KeysConfig::default();
        assert_eq!(generated_file(&cfg, Path::new("data")).unwrap(), Path::new("data.keys/sealing.keys"));
        assert_eq!(generated_file(&cfg, Path::new("./data/")).unwrap(), Path::new("./data.keys/sealing.keys"));
        assert_eq!(generated_file(&cfg, Path::new("/var/lib/bstore")).unwrap(), Path::new("/var/lib/bstore.keys/sealing.keys"));
        let here = std::env::current_dir().unwrap();
        let beside = here.with_file_name(format!("{}.keys", here.file_name().unwrap().to_str().unwrap()));
        assert_eq!(generated_file(&cfg, Path::new(".")).unwrap(), beside.join(GENERATED_FILE));
        let set = KeysConfig { generated_file: Some("/etc/k".into()), ..Default::default() };
        assert_eq!(generated_file(&set, Path::new("data")).unwrap(), Path::new("/etc/k"));
    }

    #[test]
    fn a_key_is_generated_once_owner_only_outside_the_data_dir() {
        let root = temp("gen");
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let ring = load(&KeysConfig::default(), &data, true).unwrap();
        let file = root.join("data.keys").join(GENERATED_FILE);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().unwrap()), 0o700);
        assert!(std::fs::read_dir(&data).unwrap().next().is_none(), "nothing written into the data dir");
        let again = load(&KeysConfig::default(), &data, true).unwrap();
        assert_eq!(again.fingerprint(1), ring.fingerprint(1), "the same key on the next start");
        assert!(load(&KeysConfig::default(), &data, false).is_err(), "never generated for external servers");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_key_left_in_the_data_dir_by_an_older_release_is_moved_out() {
        let root = temp("move");
        let data = root.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let entry = Keyring::format_entry(1, &[4; 32]);
        std::fs::write(data.join(GENERATED_FILE), format!("{entry}\n")).unwrap();
        let ring = load(&KeysConfig::default(), &data, true).unwrap();
        assert_eq!(ring.fingerprint(1), Keyring::new([(1, [4; 32])], None).unwrap().fingerprint(1));
        assert!(!data.join(GENERATED_FILE).exists());
        let moved = root.join("data.keys").join(GENERATED_FILE);
        assert_eq!(mode(&moved), 0o600);
        // A different key left behind next to a moved one is not guessed at.
        std::fs::write(data.join(GENERATED_FILE), Keyring::format_entry(1, &[5; 32])).unwrap();
        let err = load(&KeysConfig::default(), &data, true).unwrap_err();
        assert!(format!("{err:#}").contains("different keys"), "{err:#}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn an_index_entry_in_the_keys_pins_the_index_key() {
        let keys = format!("{},{}", Keyring::format_entry(2, &[2; 32]), Keyring::format_index(&[9; 32]));
        let ring = load(&KeysConfig { keys: Some(keys), ..Default::default() }, Path::new("unused"), false).unwrap();
        assert!(ring.index_pinned());
        assert_eq!(ring.index_key(), &[9; 32]);
    }
}
