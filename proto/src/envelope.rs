//! DSSE envelopes: encoding, PAE, signing and threshold verification.
//!
//! Signatures are ed25519 over `PAE(type, payload)`; payloads are signed as bytes and never
//! re-serialised. Verification follows TUF's rule (cf. awslabs/tough `schema/verify.rs`): each
//! key id counts at most once, only keys the role lists count, and the role is satisfied only
//! when the count reaches its threshold.

use crate::error::{Reason, Rejection, Result};
use crate::keys::{KeyId, SecretKey};
use crate::limits::{MAX_ENVELOPE_BYTES, MAX_SIGNATURES};
use crate::trust::{RoleSpec, TrustRoot};
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::Signature as EdSignature;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// `payloadType` of trust roots.
pub const TRUST_TYPE: &str = "application/vnd.ringcast.trust+json";
/// `payloadType` of release manifests.
pub const RELEASE_TYPE: &str = "application/vnd.ringcast.release+json";
/// `payloadType` of directives.
pub const DIRECTIVE_TYPE: &str = "application/vnd.ringcast.directive+json";

/// A DSSE envelope. On the wire, `payload` and each `sig` are standard base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Envelope {
    /// Media type of the payload.
    pub payload_type: String,
    /// The signed bytes.
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
    /// Signatures over `PAE(payload_type, payload)`.
    pub signatures: Vec<Signature>,
}

/// One signature of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// Key id of the signer (a hint; the role decides which keys count).
    pub keyid: String,
    /// ed25519 signature, 64 bytes.
    #[serde(with = "b64")]
    pub sig: Vec<u8>,
}

/// DSSE pre-authentication encoding: `"DSSEv1" SP len(T) SP T SP len(P) SP P`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + payload_type.len() + payload.len());
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// Sign `payload` with every key given.
    pub fn sign(payload_type: &str, payload: Vec<u8>, keys: &[&SecretKey]) -> Envelope {
        let mut env = Envelope {
            payload_type: payload_type.to_owned(),
            payload,
            signatures: Vec::new(),
        };
        for k in keys {
            env.add_signature(k);
        }
        env
    }

    /// Add one signature by `key`.
    pub fn add_signature(&mut self, key: &SecretKey) {
        let sig = key.sign(&pae(&self.payload_type, &self.payload));
        self.signatures.push(Signature {
            keyid: key.key_id().to_string(),
            sig: sig.to_vec(),
        });
    }

    /// Parse an envelope, refusing anything over [`MAX_ENVELOPE_BYTES`] before parsing.
    pub fn from_slice(bytes: &[u8]) -> Result<Envelope> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(Rejection::new(
                Reason::TooLarge,
                format!(
                    "envelope is {} bytes, over the {MAX_ENVELOPE_BYTES}-byte limit",
                    bytes.len()
                ),
            ));
        }
        let env: Envelope = serde_json::from_slice(bytes)
            .map_err(|e| Rejection::malformed(format!("envelope: {e}")))?;
        if env.signatures.len() > MAX_SIGNATURES {
            return Err(Rejection::new(
                Reason::TooLarge,
                format!("envelope carries more than {MAX_SIGNATURES} signatures"),
            ));
        }
        Ok(env)
    }

    /// Serialise as compact JSON.
    pub fn to_vec(&self) -> Vec<u8> {
        // Serialising strings and byte vectors cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Serialise as pretty JSON (for files people read).
    pub fn to_vec_pretty(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Verify this envelope for `role` of `trust` and return the payload bytes.
    pub fn verify(&self, expected_type: &str, trust: &TrustRoot, role: &RoleSpec) -> Result<&[u8]> {
        self.verify_with(expected_type, role, |id| trust.key(id))
    }

    /// Verify against a role whose keys are found by `lookup` (used for trust rotation, where
    /// the keys of two roots are in play).
    pub fn verify_with<'k>(
        &self,
        expected_type: &str,
        role: &RoleSpec,
        lookup: impl Fn(&KeyId) -> Option<&'k ed25519_dalek::VerifyingKey>,
    ) -> Result<&[u8]> {
        if self.payload_type != expected_type {
            return Err(Rejection::new(
                Reason::WrongPayloadType,
                format!(
                    "payload type is {:?}, expected {expected_type:?}",
                    crate::keys::truncate(&self.payload_type, 80)
                ),
            ));
        }
        let message = pae(&self.payload_type, &self.payload);
        let listed: BTreeSet<&KeyId> = role.keyids.iter().collect();
        let mut counted: BTreeSet<KeyId> = BTreeSet::new();
        let mut bad = 0usize;
        let mut unknown = 0usize;
        for s in &self.signatures {
            let Ok(id) = KeyId::parse(&s.keyid) else {
                unknown += 1;
                continue;
            };
            if !listed.contains(&id) {
                unknown += 1;
                continue;
            }
            if counted.contains(&id) {
                // TUF: a key counts once toward a threshold, however often it appears.
                continue;
            }
            let Some(key) = lookup(&id) else {
                unknown += 1;
                continue;
            };
            let Ok(sig) = EdSignature::from_slice(&s.sig) else {
                bad += 1;
                continue;
            };
            // verify_strict rejects malleable (non-canonical) signatures and small-order keys.
            if key.verify_strict(&message, &sig).is_ok() {
                counted.insert(id);
            } else {
                bad += 1;
            }
        }
        let threshold = role.threshold as usize;
        if threshold > 0 && counted.len() >= threshold {
            return Ok(&self.payload);
        }
        let (reason, what) = if bad > 0 {
            (
                Reason::BadSignature,
                format!("{bad} signature(s) by listed keys do not verify"),
            )
        } else if counted.is_empty() && unknown > 0 {
            (
                Reason::UnknownKey,
                format!("{unknown} signature(s) by keys the role does not list"),
            )
        } else {
            (
                Reason::ThresholdNotMet,
                String::from("not enough distinct listed keys signed"),
            )
        };
        Err(Rejection::new(
            reason,
            format!("{what}; {} of {threshold} required valid", counted.len()),
        ))
    }
}

mod b64 {
    use super::B64;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        B64.decode(s.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("bad base64: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    #[test]
    fn pae_matches_dsse_spec_example() {
        // From the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }

    #[test]
    fn encode_decode_round_trip() {
        let k = key(1);
        let env = Envelope::sign(RELEASE_TYPE, b"{\"a\":1}".to_vec(), &[&k]);
        let back = Envelope::from_slice(&env.to_vec()).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn valid_signature_meets_threshold_one() {
        let f = Fixture::new();
        let env = Envelope::sign(RELEASE_TYPE, b"x".to_vec(), &[&f.release]);
        assert_eq!(
            env.verify(RELEASE_TYPE, &f.trust, &f.trust.roles.release)
                .unwrap(),
            b"x"
        );
    }

    #[test]
    fn flipped_payload_byte_is_bad_signature() {
        let f = Fixture::new();
        let mut env = Envelope::sign(RELEASE_TYPE, b"payload".to_vec(), &[&f.release]);
        env.payload[0] ^= 1;
        let err = env
            .verify(RELEASE_TYPE, &f.trust, &f.trust.roles.release)
            .unwrap_err();
        assert_eq!(err.reason, Reason::BadSignature);
    }

    #[test]
    fn key_not_in_role_is_unknown_key() {
        let f = Fixture::new();
        // The controller key is in the trust root, but not in the release role.
        let env = Envelope::sign(RELEASE_TYPE, b"x".to_vec(), &[&f.controller]);
        let err = env
            .verify(RELEASE_TYPE, &f.trust, &f.trust.roles.release)
            .unwrap_err();
        assert_eq!(err.reason, Reason::UnknownKey);
        let stranger = Envelope::sign(RELEASE_TYPE, b"x".to_vec(), &[&key(99)]);
        let err = stranger
            .verify(RELEASE_TYPE, &f.trust, &f.trust.roles.release)
            .unwrap_err();
        assert_eq!(err.reason, Reason::UnknownKey);
    }

    #[test]
    fn wrong_payload_type_is_refused() {
        let f = Fixture::new();
        let env = Envelope::sign(DIRECTIVE_TYPE, b"x".to_vec(), &[&f.release]);
        let err = env
            .verify(RELEASE_TYPE, &f.trust, &f.trust.roles.release)
            .unwrap_err();
        assert_eq!(err.reason, Reason::WrongPayloadType);
        // Relabelling the type breaks the signature, which covers the type through PAE.
        let mut relabelled = env.clone();
        relabelled.payload_type = RELEASE_TYPE.into();
        let err = relabelled
            .verify(RELEASE_TYPE, &f.trust, &f.trust.roles.release)
            .unwrap_err();
        assert_eq!(err.reason, Reason::BadSignature);
    }

    #[test]
    fn repeated_signature_counts_once() {
        let f = Fixture::with_release_threshold(2);
        let mut env = Envelope::sign(RELEASE_TYPE, b"x".to_vec(), &[&f.release]);
        env.signatures.push(env.signatures[0].clone());
        let err = env
            .verify(RELEASE_TYPE, &f.trust, &f.trust.roles.release)
            .unwrap_err();
        assert_eq!(err.reason, Reason::ThresholdNotMet);
        // Same key signing twice (ed25519 is deterministic, but a different encoding would
        // still be the same key id) also counts once.
        let env2 = Envelope::sign(RELEASE_TYPE, b"x".to_vec(), &[&f.release, &f.release]);
        assert_eq!(
            env2.verify(RELEASE_TYPE, &f.trust, &f.trust.roles.release)
                .unwrap_err()
                .reason,
            Reason::ThresholdNotMet
        );
        // Two distinct listed keys meet it.
        let env3 = Envelope::sign(RELEASE_TYPE, b"x".to_vec(), &[&f.release, &f.release2]);
        assert!(env3
            .verify(RELEASE_TYPE, &f.trust, &f.trust.roles.release)
            .is_ok());
    }

    #[test]
    fn no_signatures_is_threshold_not_met() {
        let f = Fixture::new();
        let env = Envelope::sign(RELEASE_TYPE, b"x".to_vec(), &[]);
        let err = env
            .verify(RELEASE_TYPE, &f.trust, &f.trust.roles.release)
            .unwrap_err();
        assert_eq!(err.reason, Reason::ThresholdNotMet);
    }

    #[test]
    fn truncated_signature_is_bad_signature() {
        let f = Fixture::new();
        let mut env = Envelope::sign(RELEASE_TYPE, b"x".to_vec(), &[&f.release]);
        env.signatures[0].sig.truncate(10);
        let err = env
            .verify(RELEASE_TYPE, &f.trust, &f.trust.roles.release)
            .unwrap_err();
        assert_eq!(err.reason, Reason::BadSignature);
    }

    #[test]
    fn oversized_envelope_is_refused_before_parsing() {
        let big = vec![b' '; MAX_ENVELOPE_BYTES + 1];
        assert_eq!(
            Envelope::from_slice(&big).unwrap_err().reason,
            Reason::TooLarge
        );
    }

    #[test]
    fn unknown_fields_and_bad_base64_are_malformed() {
        let extra = br#"{"payloadType":"t","payload":"","signatures":[],"x":1}"#;
        assert_eq!(
            Envelope::from_slice(extra).unwrap_err().reason,
            Reason::Malformed
        );
        let b64 = br#"{"payloadType":"t","payload":"!!!","signatures":[]}"#;
        assert_eq!(
            Envelope::from_slice(b64).unwrap_err().reason,
            Reason::Malformed
        );
        assert_eq!(
            Envelope::from_slice(b"not json").unwrap_err().reason,
            Reason::Malformed
        );
    }
}
