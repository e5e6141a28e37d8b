//! Durations written as (fractional) seconds in configuration files, for
//! `#[serde(with = "bstore_domain::secs")]` on every crate's settings.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// Writes a duration as seconds.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Reads seconds (integer or fractional, never negative) as a duration.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v = f64::deserialize(d)?;
    Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
}
