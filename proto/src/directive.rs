//! Directives (signed by the `controller` role): what a ring or one device should run.

use crate::envelope::{Envelope, DIRECTIVE_TYPE};
use crate::error::{Rejection, Result};
use crate::limits::{check_list, check_name};
use crate::ramp::Percent;
use crate::window::{Schedule, Window};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// What the directive asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Install the embedded release (if the device is in the ramp).
    Install,
    /// Stop: start nothing new, keep what is installed.
    Hold,
}

/// When an accepted release may be activated.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Activation {
    /// Do not activate before this instant (store-scheduled releases pre-stage, then switch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Timestamp>,
    /// Delivery windows; empty means any time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Window>,
    /// IANA zone of the windows; absent means the device's own zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

impl Activation {
    /// The schedule, resolving the zone (or `device_tz` when the directive names none).
    pub fn schedule(&self, device_tz: &str) -> Result<Schedule> {
        Schedule::new(
            self.windows.clone(),
            self.timezone.as_deref().unwrap_or(device_tz),
        )
    }

    /// Whether activation is allowed at `now`.
    pub fn allows(&self, now: Timestamp, device_tz: &str) -> Result<bool> {
        if self.not_before.is_some_and(|nb| now < nb) {
            return Ok(false);
        }
        Ok(self.schedule(device_tz)?.is_open(now))
    }
}

/// A directive, exactly as DESIGN.md lists its fields, plus `device` for per-device directives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directive {
    /// Fleet name.
    pub fleet: String,
    /// Ring name (for a per-device directive: the ring the device was in when pinned).
    pub ring: String,
    /// Set only on per-device directives: the device it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The product (release name) this directive is for, on a product topic
    /// (`…/rings/{ring}/products/{product}/directive`); absent on the single-product topics.
    /// Signed, so a directive cannot be replayed from one product's topic onto another's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// Rollout this directive belongs to; also the ramp seed.
    pub rollout_id: String,
    /// Strictly increasing per topic (replay protection).
    pub sequence: u64,
    /// When the controller signed it.
    pub issued_at: Timestamp,
    /// Short expiry; the controller re-signs before it (freeze protection).
    pub expires_at: Timestamp,
    /// Install or hold.
    pub action: Action,
    /// The release envelope, embedded whole (required for `install`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<Envelope>,
    /// Share of the ring in the ramp.
    pub percent: Percent,
    /// Share of the ring that may download and verify the release ahead of its turn (a
    /// launch pre-stages whole rings): a device in this ramp but not in `percent`'s stages the
    /// release and activates nothing until a directive's `percent` takes it in. Never below
    /// `percent`; absent: only `percent`'s devices fetch anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_percent: Option<Percent>,
    /// Activation constraints.
    #[serde(default)]
    pub activation: Activation,
    /// Which attempt of the rollout on this ring (1, 2, …). A device whose install of the
    /// release failed in this rollout at attempt `n` tries it again only when a directive asks
    /// with an attempt above `n`: a retry, never a loop on a re-signed directive. Absent on
    /// the wire when 1.
    #[serde(default = "first_attempt", skip_serializing_if = "is_first_attempt")]
    pub attempt: u32,
}

/// The first attempt (the default of [`Directive::attempt`] and [`crate::StateReport::attempt`]).
pub fn first_attempt() -> u32 {
    1
}

/// Whether `n` is the first attempt (then the field is left off the wire).
pub fn is_first_attempt(n: &u32) -> bool {
    *n == 1
}

impl Directive {
    /// Parse directive bytes strictly and validate them.
    pub fn parse(bytes: &[u8]) -> Result<Directive> {
        let d: Directive = serde_json::from_slice(bytes)
            .map_err(|e| Rejection::malformed(format!("directive: {e}")))?;
        d.validate()?;
        Ok(d)
    }

    /// Bounded names, consistent fields.
    pub fn validate(&self) -> Result<()> {
        check_name("fleet", &self.fleet)?;
        check_name("ring", &self.ring)?;
        check_name("rollout_id", &self.rollout_id)?;
        if let Some(d) = &self.device {
            check_name("device", d)?;
        }
        if let Some(p) = &self.product {
            check_name("product", p)?;
        }
        if self.expires_at <= self.issued_at {
            return Err(Rejection::malformed(
                "directive expires_at is not after issued_at",
            ));
        }
        if self.action == Action::Install && self.release.is_none() {
            return Err(Rejection::malformed("install directive carries no release"));
        }
        if self.stage_percent.is_some_and(|s| s < self.percent) {
            return Err(Rejection::malformed(
                "directive stage_percent is below its percent",
            ));
        }
        if self.attempt == 0 {
            return Err(Rejection::malformed(
                "directive attempt is 0 (attempts count from 1)",
            ));
        }
        check_list("activation.windows", &self.activation.windows, 16)?;
        if let Some(tz) = &self.activation.timezone {
            crate::limits::check_len("activation.timezone", tz, 64)?;
        }
        Ok(())
    }

    /// Serialise to the bytes that get signed.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Sign into an envelope.
    pub fn sign(&self, keys: &[&crate::keys::SecretKey]) -> Envelope {
        Envelope::sign(DIRECTIVE_TYPE, self.to_bytes(), keys)
    }
}

/// The controller's sequence rule: `max(last + 1, unix time in ms)`, so a controller restored
/// from an old backup never issues a sequence devices would take for a replay.
pub fn next_sequence(last: u64, now: Timestamp) -> u64 {
    let ms = u64::try_from(now.as_millisecond()).unwrap_or(0);
    last.saturating_add(1).max(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    #[test]
    fn round_trip_and_strictness() {
        let f = Fixture::new();
        let d = f.directive("canary", 10, 5);
        assert_eq!(Directive::parse(&d.to_bytes()).unwrap(), d);
        let mut v: serde_json::Value = serde_json::from_slice(&d.to_bytes()).unwrap();
        v["extra"] = 1.into();
        assert!(Directive::parse(&serde_json::to_vec(&v).unwrap()).is_err());
    }

    #[test]
    fn install_needs_release_and_sane_expiry() {
        let f = Fixture::new();
        let mut d = f.directive("canary", 10, 5);
        d.release = None;
        assert!(d.validate().is_err());
        let mut d = f.directive("canary", 10, 5);
        d.expires_at = d.issued_at;
        assert!(d.validate().is_err());
        let mut d = f.directive("canary", 10, 5);
        d.action = Action::Hold;
        d.release = None;
        assert!(d.validate().is_ok());
    }

    #[test]
    fn a_stage_ramp_never_below_the_activation_ramp() {
        let f = Fixture::new();
        let mut d = f.directive("canary", 10, 5);
        d.percent = Percent::from_f64(10.0).unwrap();
        d.stage_percent = Some(Percent::FULL);
        assert!(d.validate().is_ok());
        assert_eq!(Directive::parse(&d.to_bytes()).unwrap(), d);
        d.stage_percent = Some(Percent::from_f64(5.0).unwrap());
        assert!(d.validate().is_err());
        d.stage_percent = None;
        let v: serde_json::Value = serde_json::from_slice(&d.to_bytes()).unwrap();
        assert!(
            v.get("stage_percent").is_none(),
            "absent on the wire when unset"
        );
    }

    #[test]
    fn sequence_rule() {
        let now: Timestamp = "2026-11-23T00:00:00Z".parse().unwrap();
        let ms = now.as_millisecond() as u64;
        assert_eq!(next_sequence(0, now), ms);
        assert_eq!(next_sequence(ms + 10, now), ms + 11);
    }

    #[test]
    fn activation_honours_not_before_and_windows() {
        let now: Timestamp = "2026-11-23T03:00:00Z".parse().unwrap(); // Monday
        let mut a = Activation::default();
        assert!(a.allows(now, "UTC").unwrap());
        a.not_before = Some("2026-11-23T04:00:00Z".parse().unwrap());
        assert!(!a.allows(now, "UTC").unwrap());
        a.not_before = None;
        a.windows = vec![Window::parse("Mon 02:00-04:00").unwrap()];
        assert!(a.allows(now, "UTC").unwrap());
        // In New York it is 22:00 on Sunday: closed.
        assert!(!a.allows(now, "America/New_York").unwrap());
        a.timezone = Some("UTC".into());
        assert!(a.allows(now, "America/New_York").unwrap());
    }
}
