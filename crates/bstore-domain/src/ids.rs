//! Identifiers. Tenant and session ids become NATS subject tokens and Redis
//! key parts, so they are validated strictly here and nowhere else; key types
//! and key ids travel only inside bodies and are validated for size and
//! characters so that any future Baileys type round-trips untouched.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest tenant or session id, in characters.
pub const MAX_NAME_LEN: usize = 128;
/// Longest key type, in bytes.
pub const MAX_KEY_TYPE_LEN: usize = 64;
/// Longest key id, in bytes.
pub const MAX_KEY_ID_LEN: usize = 512;

/// The key types Baileys v7 writes. The set is open: other types are accepted
/// as long as they are well-formed, and are stored and returned unchanged.
pub const KNOWN_KEY_TYPES: [&str; 10] = [
    "pre-key",
    "session",
    "sender-key",
    "sender-key-memory",
    "app-state-sync-key",
    "app-state-sync-version",
    "lid-mapping",
    "device-list",
    "tctoken",
    "identity-key",
];

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {shown}: {reason}")]
pub struct IdError {
    /// `tenant`, `session`, `key type` or `key id`.
    pub what: &'static str,
    /// The offending value, quoted and cut to a readable length.
    pub shown: String,
    /// What rule it broke.
    pub reason: &'static str,
}

impl IdError {
    fn new(what: &'static str, value: &str, reason: &'static str) -> Self {
        let mut shown: String = value.chars().take(40).collect();
        if shown.len() < value.len() {
            shown.push('…');
        }
        Self { what, shown: format!("{shown:?}"), reason }
    }
}

fn validate_name(what: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::new(what, value, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(IdError::new(what, value, "is longer than 128 characters"));
    }
    if !value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(IdError::new(what, value, "may hold only A-Z, a-z, 0-9, '_' and '-'"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `value`: 1–128 characters of `[A-Za-z0-9_-]`.
            pub fn parse(value: &str) -> Result<Self, IdError> {
                validate_name($what, value)?;
                Ok(Self(value.to_owned()))
            }

            /// The id as text; always a valid NATS subject token.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A tenant: the unit of NATS permissions (`<prefix>.<tenant>.>`).
    TenantId,
    "tenant"
);
name_type!(
    /// A session: one Baileys account (one set of creds and keys) of a tenant.
    SessionId,
    "session"
);

/// A session's full address. Sessions of different tenants never share state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionKey {
    /// The owning tenant.
    pub tenant: TenantId,
    /// The session within the tenant.
    pub session: SessionId,
}

impl SessionKey {
    /// Builds a key from already validated parts.
    pub fn new(tenant: TenantId, session: SessionId) -> Self {
        Self { tenant, session }
    }

    /// Validates both parts.
    pub fn parse(tenant: &str, session: &str) -> Result<Self, IdError> {
        Ok(Self::new(TenantId::parse(tenant)?, SessionId::parse(session)?))
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.session)
    }
}

/// A Signal key type such as `pre-key` or `session`: 1–64 bytes of
/// `[A-Za-z0-9_.:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct KeyType(String);

impl KeyType {
    /// Validates a key type.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        if value.is_empty() {
            return Err(IdError::new("key type", value, "must not be empty"));
        }
        if value.len() > MAX_KEY_TYPE_LEN {
            return Err(IdError::new("key type", value, "is longer than 64 bytes"));
        }
        let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':');
        if !value.bytes().all(ok) {
            return Err(IdError::new("key type", value, "may hold only A-Z, a-z, 0-9, '_', '-', '.' and ':'"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The type as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for KeyType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A key id within a type, such as `"42"` or `"123@g.us::456::0"`: 1–512 bytes
/// of UTF-8 without control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct KeyId(String);

impl KeyId {
    /// Validates a key id.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        if value.is_empty() {
            return Err(IdError::new("key id", value, "must not be empty"));
        }
        if value.len() > MAX_KEY_ID_LEN {
            return Err(IdError::new("key id", value, "is longer than 512 bytes"));
        }
        if value.chars().any(char::is_control) {
            return Err(IdError::new("key id", value, "must not hold control characters"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_the_allowed_alphabet() {
        assert!(TenantId::parse("acme_Bots-01").is_ok());
        assert!(SessionId::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn names_refuse_subject_syntax_and_whitespace() {
        for bad in ["", "a.b", "*", ">", "a b", "a\tb", "é", "a/b"] {
            let err = SessionId::parse(bad).unwrap_err();
            assert_eq!(err.what, "session", "{bad:?}");
        }
        assert!(TenantId::parse(&"a".repeat(129)).is_err());
    }

    #[test]
    fn every_known_key_type_is_valid() {
        for t in KNOWN_KEY_TYPES {
            KeyType::parse(t).unwrap();
        }
        assert!(KeyType::parse("future-type.v2").is_ok());
        assert!(KeyType::parse("bad type").is_err());
        assert!(KeyType::parse(&"t".repeat(65)).is_err());
    }

    #[test]
    fn key_ids_take_signal_addresses_and_refuse_controls() {
        for ok in ["1", "123@g.us::456_1::0", "AAAA+/==", "__index", "user.0"] {
            KeyId::parse(ok).unwrap();
        }
        assert!(KeyId::parse("").is_err());
        assert!(KeyId::parse("a\nb").is_err());
        assert!(KeyId::parse(&"x".repeat(513)).is_err());
    }

    #[test]
    fn error_text_shows_a_bounded_value() {
        let err = SessionId::parse(&format!("{}.", "x".repeat(200))).unwrap_err();
        assert!(err.to_string().len() < 120, "{err}");
    }
}
