//! Encryption of secrets at rest in the shared tier: AES-256-GCM with a fresh
//! random 96-bit nonce per write.
//!
//! Contract:
//! - A [`Keyring`] holds one or more named 256-bit keys; the first one not
//!   marked `decrypt-only` encrypts, every key decrypts. So a key is rotated
//!   safely in three roll-outs: add the new key as decrypt-only everywhere,
//!   then make it the encrypting key (every pod can already read what it
//!   writes), then drop the old key once no row names it.
//! - With keys configured, a value without a key id (plaintext) is refused:
//!   a row written without the key (a hand edit, an attacker with write access
//!   to the table) is never served.
//! - A sealed value is `nonce || ciphertext || tag` plus the id of its key; the
//!   associated data binds it to its collection and field, so a ciphertext moved
//!   to another row or column fails to open.
//! - A keyring without keys stores plaintext (key id `None`); the caller warns.
//! - Neither keys nor plaintexts appear in `Debug` output or errors.

use std::collections::HashMap;
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;

use crate::token::Secret;

const NONCE_LEN: usize = 12;

/// Named AES-256-GCM keys; the first one encrypts.
#[derive(Clone, Default)]
pub struct Keyring {
    current: Option<String>,
    keys: HashMap<String, Aes256Gcm>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("keys", &ids)
            .finish()
    }
}

/// A value as stored: bytes and the id of the key that sealed them (`None`:
/// plaintext).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub bytes: Vec<u8>,
    pub key_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("sealed with key {0:?}, which is not in the configured keyring")]
    UnknownKey(String),
    #[error(
        "value sealed with key {0:?} does not decrypt (wrong key material, or a damaged or moved value)"
    )]
    Corrupt(String),
    #[error("stored plaintext is not valid UTF-8")]
    NotUtf8,
    #[error("value is stored without a key id although keys are configured; refused")]
    Unsealed,
}

impl Keyring {
    /// No keys: values are stored as plaintext.
    pub fn plaintext() -> Self {
        Self::default()
    }

    /// Parses key material: entries `<id>:<base64 of 32 bytes>` separated by
    /// whitespace or commas, each optionally followed by `:decrypt-only`; the
    /// first entry that is not decrypt-only encrypts. Errors never include key
    /// material.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut ring = Self::default();
        for (i, entry) in text
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let n = i + 1;
            let (id, rest) = entry
                .split_once(':')
                .ok_or_else(|| format!("entry {n} must be <key id>:<base64 key>[:decrypt-only]"))?;
            let (b64, decrypt_only) = match rest.split_once(':') {
                None => (rest, false),
                Some((b64, "decrypt-only")) => (b64, true),
                Some(_) => {
                    return Err(format!(
                        "entry {n}: after the key only \":decrypt-only\" may follow"
                    ));
                }
            };
            if id.is_empty()
                || id.len() > 64
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err(format!(
                    "entry {n}: the key id must be 1 to 64 characters of [A-Za-z0-9._-]"
                ));
            }
            let key = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| format!("key {id:?} is not valid base64"))?;
            let cipher = Aes256Gcm::new_from_slice(&key)
                .map_err(|_| format!("key {id:?} must be 32 bytes (AES-256), got {}", key.len()))?;
            if ring.keys.insert(id.to_owned(), cipher).is_some() {
                return Err(format!("key id {id:?} is listed twice"));
            }
            if !decrypt_only {
                ring.current.get_or_insert_with(|| id.to_owned());
            }
        }
        if ring.keys.is_empty() {
            return Err("no key given".into());
        }
        if ring.current.is_none() {
            return Err("every key is decrypt-only: one must encrypt".into());
        }
        Ok(ring)
    }

    /// The id new writes are sealed with (`None`: plaintext).
    pub fn current_id(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// Seals `value` for `field` of `collection` with the current key.
    pub fn seal(&self, collection: &str, field: &str, value: &Secret) -> Sealed {
        let Some((id, cipher)) = self
            .current
            .as_ref()
            .and_then(|id| self.keys.get(id).map(|c| (id, c)))
        else {
            return Sealed {
                bytes: value.expose().as_bytes().to_vec(),
                key_id: None,
            };
        };
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let aad = aad(collection, field);
        let nonce = Nonce::from(nonce_bytes);
        let mut bytes = nonce_bytes.to_vec();
        // Encryption with a valid key and an in-memory buffer cannot fail
        // (only messages over 64 GiB can).
        if let Ok(ct) = cipher.encrypt(
            &nonce,
            Payload {
                msg: value.expose().as_bytes(),
                aad: aad.as_bytes(),
            },
        ) {
            bytes.extend_from_slice(&ct);
        }
        Sealed {
            bytes,
            key_id: Some(id.clone()),
        }
    }

    /// Opens a value sealed by [`seal`](Self::seal) for the same collection and field.
    pub fn open(
        &self,
        collection: &str,
        field: &str,
        sealed: &Sealed,
    ) -> Result<Secret, CryptoError> {
        let plain = match &sealed.key_id {
            None if !self.keys.is_empty() => return Err(CryptoError::Unsealed),
            None => sealed.bytes.clone(),
            Some(id) => {
                let cipher = self
                    .keys
                    .get(id)
                    .ok_or_else(|| CryptoError::UnknownKey(id.clone()))?;
                if sealed.bytes.len() < NONCE_LEN {
                    return Err(CryptoError::Corrupt(id.clone()));
                }
                let (nonce, ct) = sealed.bytes.split_at(NONCE_LEN);
                let nonce: [u8; NONCE_LEN] = nonce
                    .try_into()
                    .map_err(|_| CryptoError::Corrupt(id.clone()))?;
                let aad = aad(collection, field);
                cipher
                    .decrypt(
                        &Nonce::from(nonce),
                        Payload {
                            msg: ct,
                            aad: aad.as_bytes(),
                        },
                    )
                    .map_err(|_| CryptoError::Corrupt(id.clone()))?
            }
        };
        String::from_utf8(plain)
            .map(Secret::new)
            .map_err(|_| CryptoError::NotUtf8)
    }
}

fn aad(collection: &str, field: &str) -> String {
    format!("token-broker/v1/{collection}/{field}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    #[test]
    fn round_trip_with_fresh_nonce_and_no_plaintext() {
        let ring = Keyring::parse(&format!("k1:{}", key(1))).unwrap();
        let secret = Secret::new("access-token-value-123");
        let a = ring.seal("c", "value", &secret);
        let b = ring.seal("c", "value", &secret);
        assert_ne!(a.bytes, b.bytes, "each write has its own nonce");
        assert_eq!(a.key_id.as_deref(), Some("k1"));
        assert!(
            !a.bytes
                .windows(secret.expose().len())
                .any(|w| w == secret.expose().as_bytes())
        );
        assert_eq!(ring.open("c", "value", &a).unwrap(), secret);
    }

    #[test]
    fn rotation_keeps_old_values_readable_and_writes_with_the_new_key() {
        let old = Keyring::parse(&format!("k1:{}", key(1))).unwrap();
        let sealed = old.seal("c", "value", &Secret::new("t"));
        let rotated = Keyring::parse(&format!("k2:{}\nk1:{}", key(2), key(1))).unwrap();
        assert_eq!(
            rotated.open("c", "value", &sealed).unwrap(),
            Secret::new("t")
        );
        assert_eq!(
            rotated
                .seal("c", "value", &Secret::new("t"))
                .key_id
                .as_deref(),
            Some("k2")
        );
        let dropped = Keyring::parse(&format!("k2:{}", key(2))).unwrap();
        assert_eq!(
            dropped.open("c", "value", &sealed),
            Err(CryptoError::UnknownKey("k1".into()))
        );
    }

    #[test]
    fn decrypt_only_keys_read_but_never_write() {
        let old = Keyring::parse(&format!("k1:{}", key(1))).unwrap();
        // Step 1 of a rotation: k2 is known everywhere before anyone writes with it.
        let staged = Keyring::parse(&format!("k2:{}:decrypt-only k1:{}", key(2), key(1))).unwrap();
        assert_eq!(staged.current_id(), Some("k1"));
        let by_staged = staged.seal("c", "value", &Secret::new("t"));
        assert_eq!(
            old.open("c", "value", &by_staged).unwrap(),
            Secret::new("t")
        );
        // Step 2: k2 encrypts; a pod still on step 1 reads what it writes.
        let switched = Keyring::parse(&format!("k2:{} k1:{}", key(2), key(1))).unwrap();
        let by_switched = switched.seal("c", "value", &Secret::new("u"));
        assert_eq!(by_switched.key_id.as_deref(), Some("k2"));
        assert_eq!(
            staged.open("c", "value", &by_switched).unwrap(),
            Secret::new("u")
        );
        for (text, want) in [
            (
                format!("k1:{}:decrypt-only", key(1)),
                "every key is decrypt-only",
            ),
            (format!("k1:{}:other", key(1)), "decrypt-only\" may follow"),
        ] {
            let err = Keyring::parse(&text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_keyed_ring_refuses_plaintext_values() {
        let ring = Keyring::parse(&format!("k1:{}", key(1))).unwrap();
        let forged = Sealed {
            bytes: b"attacker-chosen-token".to_vec(),
            key_id: None,
        };
        assert_eq!(ring.open("c", "value", &forged), Err(CryptoError::Unsealed));
    }

    #[test]
    fn values_are_bound_to_their_collection_and_field() {
        let ring = Keyring::parse(&format!("k1:{}", key(1))).unwrap();
        let sealed = ring.seal("c", "value", &Secret::new("t"));
        assert!(ring.open("d", "value", &sealed).is_err());
        assert!(ring.open("c", "refresh_token", &sealed).is_err());
        let wrong = Keyring::parse(&format!("k1:{}", key(9))).unwrap();
        assert_eq!(
            wrong.open("c", "value", &sealed),
            Err(CryptoError::Corrupt("k1".into()))
        );
    }

    #[test]
    fn plaintext_keyring_and_parse_errors() {
        let ring = Keyring::plaintext();
        let sealed = ring.seal("c", "value", &Secret::new("t"));
        assert_eq!(
            sealed,
            Sealed {
                bytes: b"t".to_vec(),
                key_id: None
            }
        );
        assert_eq!(ring.open("c", "value", &sealed).unwrap(), Secret::new("t"));
        let material = key(1);
        for (text, want) in [
            ("", "no key given"),
            ("k1", "entry 1 must be"),
            ("k1:!!", "not valid base64"),
            ("k1:AAAA", "must be 32 bytes"),
            ("bad/id:AAAA", "key id must be"),
        ] {
            let err = Keyring::parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let twice = Keyring::parse(&format!("k1:{material},k1:{material}")).unwrap_err();
        assert!(twice.contains("listed twice") && !twice.contains(&material));
        assert!(
            !format!("{:?}", Keyring::parse(&format!("k1:{material}")).unwrap())
                .contains(&material)
        );
    }
}
