//! Trust roots: roles, thresholds, versions, expiry, and the rotation rule.
//!
//! A trust root lists keys and, per role (`root`, `release`, `controller`), which key ids count
//! and how many must sign. Rotation (DESIGN.md "Trust model", after TUF §5.3.4): root N+k is
//! accepted only when signed by a threshold of root keys of the trusted root **and** a
//! threshold of its own root keys, and never with a lower version. Versions may skip (the
//! trust topic retains only the newest root), but the old root's keys must still vouch.

use crate::envelope::{Envelope, TRUST_TYPE};
use crate::error::{Reason, Rejection, Result};
use crate::keys::{KeyId, PublicKey};
use crate::limits::{check_list, MAX_KEYS};
use ed25519_dalek::VerifyingKey;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which keys count for a role and how many must sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    /// Key ids that count toward the threshold.
    pub keyids: Vec<KeyId>,
    /// Distinct valid signatures required (≥ 1, ≤ number of key ids).
    pub threshold: u32,
}

/// The three roles of a trust root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    /// Signs trust roots. Offline, k-of-n.
    pub root: RoleSpec,
    /// Signs release manifests.
    pub release: RoleSpec,
    /// Signs directives.
    pub controller: RoleSpec,
}

/// Role names, for messages and CLI flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Signs trust roots.
    Root,
    /// Signs releases.
    Release,
    /// Signs directives.
    Controller,
}

impl Role {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Root => "root",
            Role::Release => "release",
            Role::Controller => "controller",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = Rejection;
    fn from_str(s: &str) -> Result<Role> {
        match s {
            "root" => Ok(Role::Root),
            "release" => Ok(Role::Release),
            "controller" => Ok(Role::Controller),
            other => Err(Rejection::malformed(format!(
                "role {other:?} is not one of root, release, controller"
            ))),
        }
    }
}

/// The signed body of a trust root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustDoc {
    /// Monotonic version; rotations only go up.
    pub version: u64,
    /// After this instant the root no longer vouches for anything (rotation is still allowed).
    pub expires_at: Timestamp,
    /// Keys by key id.
    pub keys: BTreeMap<KeyId, PublicKey>,
    /// Role assignments.
    pub roles: Roles,
}

/// A parsed and internally consistent trust root, with its keys decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustRoot {
    /// The document as signed.
    pub doc: TrustDoc,
    /// Convenience copy of `doc.roles`.
    pub roles: Roles,
    decoded: BTreeMap<KeyId, VerifyingKey>,
}

impl TrustRoot {
    /// Check a document's internal consistency: key ids recomputed from the key bytes, every
    /// role key listed, thresholds between 1 and the number of keys.
    pub fn from_doc(doc: TrustDoc) -> Result<TrustRoot> {
        if doc.keys.len() > MAX_KEYS {
            return Err(Rejection::new(
                Reason::TooLarge,
                format!("trust root lists more than {MAX_KEYS} keys"),
            ));
        }
        let mut decoded = BTreeMap::new();
        for (id, pk) in &doc.keys {
            let vk = pk.verifying_key()?;
            // Key ids are recomputed from the bytes, never taken on trust.
            if KeyId::of(&vk) != *id {
                return Err(Rejection::malformed(format!(
                    "key id {id} does not match its public key"
                )));
            }
            decoded.insert(id.clone(), vk);
        }
        for (name, role) in [
            ("root", &doc.roles.root),
            ("release", &doc.roles.release),
            ("controller", &doc.roles.controller),
        ] {
            check_list(name, &role.keyids, MAX_KEYS)?;
            let mut uniq = role.keyids.clone();
            uniq.sort();
            uniq.dedup();
            if uniq.len() != role.keyids.len() {
                return Err(Rejection::malformed(format!(
                    "role {name} lists a key id twice"
                )));
            }
            for id in &role.keyids {
                if !decoded.contains_key(id) {
                    return Err(Rejection::malformed(format!(
                        "role {name} lists key {id}, which the trust root does not define"
                    )));
                }
            }
            if role.threshold == 0 || role.threshold as usize > role.keyids.len() {
                return Err(Rejection::malformed(format!(
                    "role {name} has threshold {} with {} key(s); it must be between 1 and the number of keys",
                    role.threshold,
                    role.keyids.len()
                )));
            }
        }
        Ok(TrustRoot {
            roles: doc.roles.clone(),
            doc,
            decoded,
        })
    }

    /// Parse the payload bytes of a trust envelope (no signature check).
    pub fn parse_payload(bytes: &[u8]) -> Result<TrustRoot> {
        let doc: TrustDoc = serde_json::from_slice(bytes)
            .map_err(|e| Rejection::malformed(format!("trust root: {e}")))?;
        TrustRoot::from_doc(doc)
    }

    /// Verify a self-signed trust root (the initial root a device ships with, or the one an
    /// operator checks): its own root role threshold must sign it. Expiry is not judged here.
    pub fn from_envelope_self_signed(env: &Envelope) -> Result<TrustRoot> {
        if env.payload_type != TRUST_TYPE {
            return Err(Rejection::new(
                Reason::WrongPayloadType,
                format!("payload type is not {TRUST_TYPE}"),
            ));
        }
        let root = TrustRoot::parse_payload(&env.payload)?;
        env.verify(TRUST_TYPE, &root, &root.roles.root)?;
        Ok(root)
    }

    /// Parse and verify self-signed trust root bytes.
    pub fn from_bytes_self_signed(bytes: &[u8]) -> Result<TrustRoot> {
        TrustRoot::from_envelope_self_signed(&Envelope::from_slice(bytes)?)
    }

    /// The decoded key for `id`, if this root defines it.
    pub fn key(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.decoded.get(id)
    }

    /// The version.
    pub fn version(&self) -> u64 {
        self.doc.version
    }

    /// The role spec by role.
    pub fn role(&self, role: Role) -> &RoleSpec {
        match role {
            Role::Root => &self.roles.root,
            Role::Release => &self.roles.release,
            Role::Controller => &self.roles.controller,
        }
    }

    /// Refuse if this root has expired at `now` beyond `skew`.
    pub fn check_fresh(&self, now: Timestamp, skew: SignedDuration) -> Result<()> {
        check_not_expired("trust root", self.doc.expires_at, now, skew)
    }

    /// Decide on a rotation to the root in `env` (DESIGN.md "Rotation").
    pub fn rotate(&self, env: &Envelope, now: Timestamp, skew: SignedDuration) -> Result<Rotation> {
        if env.payload_type != TRUST_TYPE {
            return Err(Rejection::new(
                Reason::WrongPayloadType,
                format!("payload type is not {TRUST_TYPE}"),
            ));
        }
        let next = TrustRoot::parse_payload(&env.payload)?;
        if next.version() < self.version() {
            return Err(Rejection::new(
                Reason::TrustRollback,
                format!(
                    "trust root version {} is lower than the trusted version {}",
                    next.version(),
                    self.version()
                ),
            ));
        }
        if next.version() == self.version() {
            if next.doc == self.doc {
                return Ok(Rotation::Unchanged);
            }
            return Err(Rejection::new(
                Reason::TrustRollback,
                format!(
                    "a different trust root with the trusted version {}",
                    self.version()
                ),
            ));
        }
        // Both thresholds: the old root vouches for the new, and the new keys prove possession.
        env.verify(TRUST_TYPE, self, &self.roles.root)
            .map_err(|e| Rejection::new(e.reason, format!("old root keys: {}", e.detail)))?;
        env.verify(TRUST_TYPE, &next, &next.roles.root)
            .map_err(|e| Rejection::new(e.reason, format!("new root keys: {}", e.detail)))?;
        next.check_fresh(now, skew)?;
        Ok(Rotation::Accepted(Box::new(next)))
    }
}

/// Outcome of [`TrustRoot::rotate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The same root again (a retained message seen on reconnect): nothing to do.
    Unchanged,
    /// A newer root, verified: persist it, then use it.
    Accepted(Box<TrustRoot>),
}

/// Refuse `what` if `expires_at` is before `now - skew`.
pub fn check_not_expired(
    what: &str,
    expires_at: Timestamp,
    now: Timestamp,
    skew: SignedDuration,
) -> Result<()> {
    let limit = expires_at.checked_add(skew).unwrap_or(expires_at);
    if now > limit {
        return Err(Rejection::new(
            Reason::Expired,
            format!("{what} expired at {expires_at} (now {now}, skew {skew:#})"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    fn skew() -> SignedDuration {
        SignedDuration::from_secs(300)
    }

    #[test]
    fn self_signed_root_verifies() {
        let f = Fixture::new();
        let back = TrustRoot::from_bytes_self_signed(&f.trust_env.to_vec()).unwrap();
        assert_eq!(back, f.trust);
    }

    #[test]
    fn root_signed_by_non_root_key_is_refused() {
        let f = Fixture::new();
        let env = Envelope::sign(TRUST_TYPE, f.trust_env.payload.clone(), &[&f.release]);
        assert_eq!(
            TrustRoot::from_envelope_self_signed(&env)
                .unwrap_err()
                .reason,
            Reason::UnknownKey
        );
    }

    #[test]
    fn mismatched_key_id_is_malformed() {
        let f = Fixture::new();
        let mut doc = f.trust.doc.clone();
        let (id, pk) = doc.keys.pop_first().unwrap();
        let other = key(55).public();
        doc.keys.insert(id, other);
        let _ = pk;
        assert_eq!(
            TrustRoot::from_doc(doc).unwrap_err().reason,
            Reason::Malformed
        );
    }

    #[test]
    fn bad_thresholds_are_malformed() {
        let f = Fixture::new();
        let mut doc = f.trust.doc.clone();
        doc.roles.release.threshold = 0;
        assert!(TrustRoot::from_doc(doc.clone()).is_err());
        doc.roles.release.threshold = 5;
        assert!(TrustRoot::from_doc(doc).is_err());
        let mut doc = f.trust.doc.clone();
        doc.roles
            .release
            .keyids
            .push(doc.roles.release.keyids[0].clone());
        assert!(TrustRoot::from_doc(doc).is_err());
        let mut doc = f.trust.doc.clone();
        doc.roles.release.keyids.push(key(77).key_id().clone());
        assert!(TrustRoot::from_doc(doc).is_err());
    }

    /// ACCEPTANCE 3: old keys only, new keys only, both, and an older root afterwards.
    #[test]
    fn rotation_needs_both_thresholds_and_never_goes_back() {
        let f = Fixture::new();
        let new_root = key(40);
        let next_doc = rotated_doc(&f.trust, &new_root, 2);
        let payload = serde_json::to_vec(&next_doc).unwrap();

        let old_only = Envelope::sign(TRUST_TYPE, payload.clone(), &[&f.root]);
        let err = f.trust.rotate(&old_only, now(), skew()).unwrap_err();
        assert!(
            matches!(err.reason, Reason::UnknownKey | Reason::ThresholdNotMet),
            "{err}"
        );
        assert!(err.detail.contains("new root keys"), "{err}");

        let new_only = Envelope::sign(TRUST_TYPE, payload.clone(), &[&new_root]);
        let err = f.trust.rotate(&new_only, now(), skew()).unwrap_err();
        assert!(err.detail.contains("old root keys"), "{err}");

        let both = Envelope::sign(TRUST_TYPE, payload, &[&f.root, &new_root]);
        let Rotation::Accepted(next) = f.trust.rotate(&both, now(), skew()).unwrap() else {
            panic!("rotation not accepted");
        };
        assert_eq!(next.version(), 2);
        assert_eq!(
            next.rotate(&both, now(), skew()).unwrap(),
            Rotation::Unchanged
        );
        let err = next.rotate(&f.trust_env, now(), skew()).unwrap_err();
        assert_eq!(err.reason, Reason::TrustRollback);
    }

    #[test]
    fn same_version_different_content_is_refused() {
        let f = Fixture::new();
        let mut doc = f.trust.doc.clone();
        doc.expires_at = doc
            .expires_at
            .checked_add(SignedDuration::from_secs(1))
            .unwrap();
        let env = Envelope::sign(TRUST_TYPE, serde_json::to_vec(&doc).unwrap(), &[&f.root]);
        assert_eq!(
            f.trust.rotate(&env, now(), skew()).unwrap_err().reason,
            Reason::TrustRollback
        );
    }

    #[test]
    fn expired_rotation_target_is_refused() {
        let f = Fixture::new();
        let new_root = key(40);
        let mut doc = rotated_doc(&f.trust, &new_root, 2);
        doc.expires_at = now().checked_sub(SignedDuration::from_hours(1)).unwrap();
        let env = Envelope::sign(
            TRUST_TYPE,
            serde_json::to_vec(&doc).unwrap(),
            &[&f.root, &new_root],
        );
        assert_eq!(
            f.trust.rotate(&env, now(), skew()).unwrap_err().reason,
            Reason::Expired
        );
    }

    #[test]
    fn expiry_allows_skew() {
        let at = now();
        assert!(check_not_expired(
            "x",
            at,
            at.checked_add(SignedDuration::from_secs(299)).unwrap(),
            skew()
        )
        .is_ok());
        assert_eq!(
            check_not_expired(
                "x",
                at,
                at.checked_add(SignedDuration::from_secs(301)).unwrap(),
                skew()
            )
            .unwrap_err()
            .reason,
            Reason::Expired
        );
    }
}
