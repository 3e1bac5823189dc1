//! Rejections with stable, machine-readable reason codes.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why a document, artifact or message was refused. The `snake_case` code of each variant is
/// part of the wire contract: it reaches device events, controller reports and the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A signature from a listed key does not verify over the payload.
    BadSignature,
    /// No signature came from a key the role lists.
    UnknownKey,
    /// Fewer distinct listed keys signed than the role's threshold.
    ThresholdNotMet,
    /// The envelope's `payloadType` is not the one this role signs.
    WrongPayloadType,
    /// The document expired (beyond the allowed clock skew).
    Expired,
    /// A directive's sequence is not above the last one accepted on its topic.
    Replayed,
    /// The release's sequence is below the device's rollback floor.
    RollbackFloor,
    /// The release does not list the device's class.
    Incompatible,
    /// The directive names another fleet.
    WrongFleet,
    /// The directive names another ring or another device.
    WrongTarget,
    /// Over a size limit (envelope over 64 KiB, artifact longer than declared, field too long).
    TooLarge,
    /// Not parseable: bad JSON, unknown fields, bad base64, bad value.
    Malformed,
    /// A trust root with a version lower than the one already trusted.
    TrustRollback,
    /// Artifact bytes do not hash to the declared SHA-256.
    DigestMismatch,
    /// Artifact ended before its declared size.
    SizeMismatch,
}

impl Reason {
    /// Every reason, for exhaustive tests and documentation.
    pub const ALL: [Reason; 15] = [
        Reason::BadSignature,
        Reason::UnknownKey,
        Reason::ThresholdNotMet,
        Reason::WrongPayloadType,
        Reason::Expired,
        Reason::Replayed,
        Reason::RollbackFloor,
        Reason::Incompatible,
        Reason::WrongFleet,
        Reason::WrongTarget,
        Reason::TooLarge,
        Reason::Malformed,
        Reason::TrustRollback,
        Reason::DigestMismatch,
        Reason::SizeMismatch,
    ];

    /// The stable `snake_case` code.
    pub fn code(self) -> &'static str {
        match self {
            Reason::BadSignature => "bad_signature",
            Reason::UnknownKey => "unknown_key",
            Reason::ThresholdNotMet => "threshold_not_met",
            Reason::WrongPayloadType => "wrong_payload_type",
            Reason::Expired => "expired",
            Reason::Replayed => "replayed",
            Reason::RollbackFloor => "rollback_floor",
            Reason::Incompatible => "incompatible",
            Reason::WrongFleet => "wrong_fleet",
            Reason::WrongTarget => "wrong_target",
            Reason::TooLarge => "too_large",
            Reason::Malformed => "malformed",
            Reason::TrustRollback => "trust_rollback",
            Reason::DigestMismatch => "digest_mismatch",
            Reason::SizeMismatch => "size_mismatch",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refusal: the stable reason plus a human explanation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    /// Stable machine-readable reason.
    pub reason: Reason,
    /// What exactly was wrong, for people.
    pub detail: String,
}

impl Rejection {
    /// A rejection with the given reason and explanation.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }

    /// Shorthand for [`Reason::Malformed`].
    pub fn malformed(detail: impl Into<String>) -> Self {
        Self::new(Reason::Malformed, detail)
    }
}

/// Result alias for this crate.
pub type Result<T, E = Rejection> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_match_serde() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.code()), "duplicate code {}", r.code());
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.code()));
        }
    }
}
