//! Domain types for credentials: [`Secret`] (a string that never prints) and
//! [`Token`] (a value with its version and absolute timestamps).
//!
//! Contract: a `Secret` has no `Display`, and its `Debug` prints a placeholder, so
//! a token can be carried in structs that are logged without leaking.

use std::fmt;
use std::time::SystemTime;

use subtle::ConstantTimeEq;

/// A credential or other secret string. `Debug` is redacted; there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call sites are the only places a secret leaves this type.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares with `other` in time that does not depend on where they differ.
    pub fn ct_eq(&self, other: &str) -> bool {
        self.0.as_bytes().ct_eq(other.as_bytes()).into()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A one-way fingerprint (truncated SHA-256, hex) that tells two secrets
    /// apart without revealing either; safe to store and compare.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"token-broker fingerprint v1\0")
            .chain_update(self.0.as_bytes())
            .finalize();
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A token as held in L1 and L2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub value: Secret,
    /// +1 per rotation of the collection, starting at 1; assigned by the store.
    pub version: u64,
    pub fetched_at: SystemTime,
    /// Hard expiry: never served at or after this instant.
    pub expires_at: SystemTime,
    /// Soft expiry: a background refresh starts from here.
    pub refresh_at: SystemTime,
    /// The version of the parent collection's token it was fetched with (for
    /// sources that depend on another collection).
    pub parent_version: Option<u64>,
}

impl Token {
    /// Servable means strictly before the hard expiry.
    pub fn servable_at(&self, now: SystemTime) -> bool {
        now < self.expires_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("hunter2-token");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(s.ct_eq("hunter2-token"));
        assert!(!s.ct_eq("hunter2-tokeN"));
        assert!(!s.ct_eq("hunter2"));
    }
}
