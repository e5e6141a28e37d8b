//! Log set-up: pretty for people, JSON for collectors, filtered by an
//! `EnvFilter` directive.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(cfg: &TelemetryConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&cfg.filter).map_err(|e| anyhow::anyhow!("bad log filter {:?}: {e}", cfg.filter))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    match cfg.format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}
