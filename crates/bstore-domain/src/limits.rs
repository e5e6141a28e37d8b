//! Per-request limits, enforced by [`SessionState::handle`](crate::SessionState::handle)
//! so that every adapter enforces the same ones.

use serde::{Deserialize, Serialize};

/// Bounds on what one request may carry. The defaults admit the largest calls
/// Baileys makes (812 pre-keys in one `set`, app-state versions of ~1.3 MB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most ids one `keys.get` may ask for, or one `keys.set` may write or
    /// delete across all of its types. Default 10 000.
    pub max_ids_per_call: usize,
    /// Largest single key value or creds object, in bytes. Default 2 MiB.
    pub max_value_bytes: usize,
    /// Largest sum of value bytes in one `keys.set`. Default 4 MiB.
    pub max_set_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_ids_per_call: 10_000, max_value_bytes: 2 << 20, max_set_bytes: 4 << 20 }
    }
}
