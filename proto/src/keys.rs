//! ed25519 keys: key ids, the JSON public-key form, and PEM encodings.
//!
//! Private keys are PKCS#8 PEM and public keys SubjectPublicKeyInfo PEM, the formats OpenSSL
//! reads. Reading and writing key *files* (with their 0600 permission rule) is I/O and lives in
//! the controller's `keyfile` module; this module only encodes and decodes.

use crate::error::{Rejection, Result};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Lowercase hex SHA-256 of a 32-byte ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(String);

impl KeyId {
    /// The key id of a verifying key.
    pub fn of(key: &VerifyingKey) -> KeyId {
        KeyId(hex::encode(Sha256::digest(key.as_bytes())))
    }

    /// Parse a key id: exactly 64 lowercase hex characters.
    pub fn parse(s: &str) -> Result<KeyId> {
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(KeyId(s.to_owned()))
        } else {
            Err(Rejection::malformed(format!(
                "key id {:?} is not 64 lowercase hex characters",
                truncate(s, 80)
            )))
        }
    }

    /// The hex string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A public key as it appears in JSON documents: `{"scheme": "ed25519", "public": "<hex>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKey {
    /// Always `ed25519`.
    pub scheme: String,
    /// 64 lowercase hex characters: the 32 public key bytes.
    pub public: String,
}

impl PublicKey {
    /// The JSON form of a verifying key.
    pub fn from_verifying(key: &VerifyingKey) -> PublicKey {
        PublicKey {
            scheme: "ed25519".to_owned(),
            public: hex::encode(key.as_bytes()),
        }
    }

    /// Decode into a verifying key; the key id is always recomputed from these bytes.
    pub fn verifying_key(&self) -> Result<VerifyingKey> {
        if self.scheme != "ed25519" {
            return Err(Rejection::malformed(format!(
                "key scheme {:?} is not supported (only ed25519)",
                truncate(&self.scheme, 40)
            )));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(&self.public, &mut bytes)
            .map_err(|_| Rejection::malformed("public key is not 64 hex characters"))?;
        VerifyingKey::from_bytes(&bytes)
            .map_err(|_| Rejection::malformed("public key is not a valid ed25519 point"))
    }

    /// The key id of this key.
    pub fn key_id(&self) -> Result<KeyId> {
        Ok(KeyId::of(&self.verifying_key()?))
    }
}

/// A private signing key with its key id.
#[derive(Clone)]
pub struct SecretKey {
    key: SigningKey,
    id: KeyId,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SecretKey {
    /// A key from 32 secret bytes (from the OS random source in real use; fixed in test vectors).
    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        let key = SigningKey::from_bytes(&seed);
        let id = KeyId::of(&key.verifying_key());
        SecretKey { key, id }
    }

    /// Parse a PKCS#8 PEM private key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<SecretKey> {
        let key = SigningKey::from_pkcs8_pem(pem).map_err(|e| {
            Rejection::malformed(format!("not a PKCS#8 PEM ed25519 private key: {e}"))
        })?;
        let id = KeyId::of(&key.verifying_key());
        Ok(SecretKey { key, id })
    }

    /// Encode as PKCS#8 PEM.
    pub fn to_pkcs8_pem(&self) -> String {
        // PKCS#8 v1 (RFC 8410: the seed only), as OpenSSL writes it: OpenSSL 3.0 cannot read
        // the v2 form (with the public key attached) that `SigningKey::to_pkcs8_pem` produces.
        let v1 = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        };
        // Encoding a valid in-memory key cannot fail; fall back to an empty string defensively.
        v1.to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map(|z| z.to_string())
            .unwrap_or_default()
    }

    /// The key id.
    pub fn key_id(&self) -> &KeyId {
        &self.id
    }

    /// The verifying key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The public key in JSON form.
    pub fn public(&self) -> PublicKey {
        PublicKey::from_verifying(&self.key.verifying_key())
    }

    /// Sign raw bytes (callers sign PAE bytes; see [`crate::envelope`]).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

/// Encode a public key as SubjectPublicKeyInfo PEM.
pub fn public_to_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .unwrap_or_default()
}

/// Parse a SubjectPublicKeyInfo PEM public key.
pub fn public_from_pem(pem: &str) -> Result<VerifyingKey> {
    VerifyingKey::from_public_key_pem(pem)
        .map_err(|e| Rejection::malformed(format!("not an SPKI PEM ed25519 public key: {e}")))
}

pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;

    #[test]
    fn key_id_is_sha256_of_public_bytes() {
        let k = SecretKey::from_seed([7; 32]);
        let expect = hex::encode(Sha256::digest(k.verifying_key().as_bytes()));
        assert_eq!(k.key_id().as_str(), expect);
        assert_eq!(k.public().key_id().unwrap(), *k.key_id());
    }

    #[test]
    fn pem_round_trips() {
        let k = SecretKey::from_seed([9; 32]);
        let pem = k.to_pkcs8_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let back = SecretKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.key_id(), k.key_id());
        // RFC 8410 v1 encoding of the seed, byte for byte what `openssl genpkey` writes.
        let der = [
            &[
                0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70,
            ][..],
            &[0x04, 0x22, 0x04, 0x20],
            &[9; 32],
        ]
        .concat();
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        assert_eq!(
            pem,
            format!("-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n")
        );
        let pubpem = public_to_pem(&k.verifying_key());
        assert!(pubpem.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(public_from_pem(&pubpem).unwrap(), k.verifying_key());
    }

    #[test]
    fn bad_pem_is_malformed() {
        assert_eq!(
            SecretKey::from_pkcs8_pem("nope").unwrap_err().reason,
            Reason::Malformed
        );
        assert_eq!(
            public_from_pem("nope").unwrap_err().reason,
            Reason::Malformed
        );
        // A public key PEM is not a private key.
        let k = SecretKey::from_seed([1; 32]);
        let pubpem = public_to_pem(&k.verifying_key());
        assert!(SecretKey::from_pkcs8_pem(&pubpem).is_err());
    }

    #[test]
    fn public_key_json_is_checked() {
        let bad_scheme = PublicKey {
            scheme: "rsa".into(),
            public: "00".repeat(32),
        };
        assert_eq!(
            bad_scheme.verifying_key().unwrap_err().reason,
            Reason::Malformed
        );
        let bad_hex = PublicKey {
            scheme: "ed25519".into(),
            public: "zz".repeat(32),
        };
        assert_eq!(
            bad_hex.verifying_key().unwrap_err().reason,
            Reason::Malformed
        );
        let short = PublicKey {
            scheme: "ed25519".into(),
            public: "00".repeat(31),
        };
        assert!(short.verifying_key().is_err());
    }

    #[test]
    fn key_id_parse_is_strict() {
        assert!(KeyId::parse(&"a".repeat(64)).is_ok());
        assert!(KeyId::parse(&"A".repeat(64)).is_err());
        assert!(KeyId::parse(&"a".repeat(63)).is_err());
    }
}
