//! Deterministic percent ramps (DESIGN.md "Directive"):
//! a device is in the ramp when `u64::from_be_bytes(sha256(rollout_id || 0x00 || device_id)[..8])
//! % 10000 < percent * 100`. Raising `percent` only adds devices; no per-device message needed.

use crate::error::{Rejection, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::fmt;

/// A percentage with two decimals, held exactly as basis points (0..=10000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Percent(u16);

impl Percent {
    /// 100%.
    pub const FULL: Percent = Percent(10_000);
    /// 0%.
    pub const ZERO: Percent = Percent(0);

    /// From basis points (hundredths of a percent).
    pub fn from_basis_points(bp: u16) -> Result<Percent> {
        if bp > 10_000 {
            return Err(Rejection::malformed(format!(
                "percent {} is over 100",
                f64::from(bp) / 100.0
            )));
        }
        Ok(Percent(bp))
    }

    /// From a number like `12.5`: at most two decimals, 0 to 100.
    pub fn from_f64(v: f64) -> Result<Percent> {
        if !v.is_finite() || !(0.0..=100.0).contains(&v) {
            return Err(Rejection::malformed(format!(
                "percent {v} is not between 0 and 100"
            )));
        }
        let bp = (v * 100.0).round();
        if ((v * 100.0) - bp).abs() > 1e-6 {
            return Err(Rejection::malformed(format!(
                "percent {v} has more than two decimals"
            )));
        }
        Percent::from_basis_points(bp as u16)
    }

    /// Basis points.
    pub fn basis_points(self) -> u16 {
        self.0
    }

    /// As a float (for display and JSON).
    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(100) {
            write!(f, "{}%", self.0 / 100)
        } else {
            write!(f, "{}%", self.as_f64())
        }
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.0.is_multiple_of(100) {
            s.serialize_u64(u64::from(self.0 / 100))
        } else {
            s.serialize_f64(self.as_f64())
        }
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Percent, D::Error> {
        let v = f64::deserialize(d)?;
        Percent::from_f64(v).map_err(|e| serde::de::Error::custom(e.detail))
    }
}

/// The device's bucket in `0..10000` for a rollout.
pub fn bucket(rollout_id: &str, device_id: &str) -> u16 {
    let mut h = Sha256::new();
    h.update(rollout_id.as_bytes());
    h.update([0u8]);
    h.update(device_id.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(first) % 10_000) as u16
}

/// Whether the device is in the ramp at `percent`.
pub fn in_ramp(rollout_id: &str, device_id: &str, percent: Percent) -> bool {
    bucket(rollout_id, device_id) < percent.basis_points()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed vectors: other implementations must produce the same buckets.
    #[test]
    fn bucket_vectors() {
        let vectors = crate::testkit::RAMP_VECTORS;
        for (rollout, device, expect) in vectors {
            assert_eq!(bucket(rollout, device), *expect, "{rollout}/{device}");
        }
    }

    #[test]
    fn bucket_is_computed_as_specified() {
        let d = Sha256::digest(b"r1\0dev-1");
        let want = u64::from_be_bytes(d[..8].try_into().unwrap()) % 10_000;
        assert_eq!(u64::from(bucket("r1", "dev-1")), want);
    }

    #[test]
    fn raising_percent_only_adds_devices() {
        let devices: Vec<String> = (0..2000).map(|i| format!("dev-{i}")).collect();
        let mut prev = 0usize;
        let mut prev_set: Vec<bool> = vec![false; devices.len()];
        for bp in [0u16, 100, 500, 1000, 2500, 5000, 9999, 10000] {
            let p = Percent::from_basis_points(bp).unwrap();
            let set: Vec<bool> = devices.iter().map(|d| in_ramp("rollout-x", d, p)).collect();
            for (was, is) in prev_set.iter().zip(&set) {
                assert!(!was || *is, "a device left the ramp when percent rose");
            }
            let n = set.iter().filter(|b| **b).count();
            assert!(n >= prev);
            prev = n;
            prev_set = set;
        }
        assert_eq!(prev, devices.len());
        // Roughly proportional: 25% of 2000 within a generous margin.
        let quarter = devices
            .iter()
            .filter(|d| in_ramp("rollout-x", d, Percent::from_basis_points(2500).unwrap()))
            .count();
        assert!((400..600).contains(&quarter), "{quarter}");
    }

    #[test]
    fn percent_parsing() {
        assert_eq!(Percent::from_f64(12.5).unwrap().basis_points(), 1250);
        assert_eq!(Percent::from_f64(0.01).unwrap().basis_points(), 1);
        assert_eq!(Percent::from_f64(100.0).unwrap(), Percent::FULL);
        assert!(Percent::from_f64(100.01).is_err());
        assert!(Percent::from_f64(-1.0).is_err());
        assert!(Percent::from_f64(1.234).is_err());
        assert!(Percent::from_f64(f64::NAN).is_err());
        let p: Percent = serde_json::from_str("33.33").unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), "33.33");
        assert_eq!(serde_json::to_string(&Percent::FULL).unwrap(), "100");
    }
}
