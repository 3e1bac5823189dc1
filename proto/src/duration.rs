//! Human durations: `"500ms"`, `"90s"`, `"10m"`, `"2h"`, `"7d"`, and sums like `"1h30m"`.

use crate::error::{Rejection, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// A duration written the way people write them in policy files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Dur(pub Duration);

impl Dur {
    /// From whole seconds.
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }

    /// The std duration.
    pub fn get(self) -> Duration {
        self.0
    }

    /// As a jiff signed duration (saturating).
    pub fn signed(self) -> jiff::SignedDuration {
        jiff::SignedDuration::try_from(self.0).unwrap_or(jiff::SignedDuration::MAX)
    }
}

/// Longest duration accepted: ten years, far beyond any sane bake or expiry.
const MAX: Duration = Duration::from_secs(10 * 366 * 86_400);

impl std::str::FromStr for Dur {
    type Err = Rejection;
    fn from_str(s: &str) -> Result<Dur> {
        let bad = || {
            Rejection::malformed(format!(
                "duration {:?} is not like \"500ms\", \"90s\", \"10m\", \"2h\", \"7d\" or \"1h30m\"",
                crate::keys::truncate(s, 40)
            ))
        };
        let s = s.trim();
        if s.is_empty() || s.len() > 32 {
            return Err(bad());
        }
        let bytes = s.as_bytes();
        let mut i = 0;
        let mut total: u128 = 0;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if start == i {
                return Err(bad());
            }
            let n: u128 = s[start..i].parse().map_err(|_| bad())?;
            let ustart = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let unit_ms: u128 = match &s[ustart..i] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(bad()),
            };
            total = total
                .checked_add(n.checked_mul(unit_ms).ok_or_else(bad)?)
                .ok_or_else(bad)?;
        }
        if total > MAX.as_millis() {
            return Err(Rejection::malformed(format!(
                "duration {s:?} is over ten years"
            )));
        }
        Ok(Dur(Duration::from_millis(total as u64)))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let mut s = (ms / 1000) as u64;
        for (unit, len) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
            if s >= len {
                write!(f, "{}{unit}", s / len)?;
                s %= len;
            }
        }
        if s > 0 {
            write!(f, "{s}s")?;
        }
        Ok(())
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Dur, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse()
            .map_err(|e: Rejection| serde::de::Error::custom(e.detail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        let p = |s: &str| s.parse::<Dur>().unwrap().0;
        assert_eq!(p("90s"), Duration::from_secs(90));
        assert_eq!(p("10m"), Duration::from_secs(600));
        assert_eq!(p("2h"), Duration::from_secs(7200));
        assert_eq!(p("7d"), Duration::from_secs(7 * 86400));
        assert_eq!(p("500ms"), Duration::from_millis(500));
        assert_eq!(p("1h30m"), Duration::from_secs(5400));
        assert_eq!(p("0s"), Duration::ZERO);
    }

    #[test]
    fn rejects_nonsense() {
        for s in [
            "",
            "10",
            "m",
            "10x",
            "-5s",
            "1.5h",
            "10 m",
            "99999999999999999999d",
            "4000d",
        ] {
            assert!(s.parse::<Dur>().is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["90s", "10m", "1h30m", "7d", "500ms", "1d2h3m4s", "0s"] {
            let d: Dur = s.parse().unwrap();
            let shown = d.to_string();
            assert_eq!(shown.parse::<Dur>().unwrap(), d, "{s} -> {shown}");
        }
        assert_eq!(Dur::secs(90).to_string(), "1m30s");
    }
}
