//! The one function that decides whether an agent may act on a directive (DESIGN.md
//! "Directive": "An agent accepts a directive only if …"). Agents, the simulator and the
//! tests all call [`accept_directive`]; nothing else decides.

use crate::directive::{Action, Directive};
use crate::envelope::{Envelope, DIRECTIVE_TYPE, RELEASE_TYPE};
use crate::error::{Reason, Rejection, Result};
use crate::release::Release;
use crate::trust::{check_not_expired, TrustRoot};
use jiff::{SignedDuration, Timestamp};

/// Who the agent is.
#[derive(Debug, Clone, Copy)]
pub struct DeviceIdentity<'a> {
    /// Device id.
    pub id: &'a str,
    /// Fleet.
    pub fleet: &'a str,
    /// Ring.
    pub ring: &'a str,
    /// Device class.
    pub class: &'a str,
    /// The product this decision is for (a release name), when the agent runs several and the
    /// directive came from that product's topic; `None` on the single-product topics.
    pub product: Option<&'a str>,
}

/// What the agent has persisted that the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct AgentView<'a> {
    /// Current trust root.
    pub trust: &'a TrustRoot,
    /// Last directive sequence accepted on the topic this directive came from.
    pub last_sequence: Option<u64>,
    /// Highest `rollback_floor` among releases installed.
    pub rollback_floor: u64,
    /// `max(local clock, newest issued_at verified)` (DESIGN.md "Time without trusting the
    /// device clock").
    pub trusted_now: Timestamp,
    /// Allowed clock skew when judging expiry.
    pub skew: SignedDuration,
}

/// Which topic the directive arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `…/rings/{ring}/directive`
    Ring,
    /// `…/devices/{device}/directive`
    Device,
}

/// A directive the agent may act on.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The verified directive.
    pub directive: Directive,
    /// The verified release (`None` for `hold`).
    pub release: Option<Release>,
    /// The trusted time after this directive: persist it.
    pub trusted_now: Timestamp,
}

/// Verify a release envelope against a trust root at `now` (used by agents through
/// [`accept_directive`], by `ringcast release verify` and by the controller on submit).
pub fn verify_release(
    trust: &TrustRoot,
    env: &Envelope,
    now: Timestamp,
    skew: SignedDuration,
) -> Result<Release> {
    trust.check_fresh(now, skew)?;
    let bytes = env
        .verify(RELEASE_TYPE, trust, &trust.roles.release)
        .map_err(|e| Rejection::new(e.reason, format!("release: {}", e.detail)))?;
    let release = Release::parse(bytes)?;
    if let Some(exp) = release.expires_at {
        check_not_expired("release", exp, now, skew)?;
    }
    Ok(release)
}

/// A directive that passed the directive half of [`accept_directive`]: signed by the
/// controller, for this device, fresh and not a replay. Its `rollout_id` can be trusted as
/// much as the controller key; whether the device can take its release is
/// [`check_release`]'s question.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The verified directive.
    pub directive: Directive,
    /// The trusted time after this directive: persist it.
    pub trusted_now: Timestamp,
}

/// Decide on a directive. Checks, in order: size and shape; controller signatures at
/// threshold; fleet and ring (or device) match; expiry; sequence above the last accepted; then
/// for `install`: release signatures at threshold, release expiry, device class, rollback floor.
/// The two halves are [`verify_directive`] and [`check_release`]: a directive that fails the
/// second was still the controller's word, and the device *refuses* that rollout (it reports
/// the refusal in its state, so the controller counts it as `refused`).
pub fn accept_directive(
    me: &DeviceIdentity<'_>,
    view: &AgentView<'_>,
    source: Source,
    bytes: &[u8],
) -> Result<Accepted> {
    let v = verify_directive(me, view, source, bytes)?;
    let release = check_release(me, view, &v)?;
    Ok(Accepted {
        directive: v.directive,
        release,
        trusted_now: v.trusted_now,
    })
}

/// The directive half of [`accept_directive`]: size and shape, controller signatures, fleet
/// and target, freshness, replay.
pub fn verify_directive(
    me: &DeviceIdentity<'_>,
    view: &AgentView<'_>,
    source: Source,
    bytes: &[u8],
) -> Result<Verified> {
    let env = Envelope::from_slice(bytes)?;
    let trust = view.trust;
    let payload = env
        .verify(DIRECTIVE_TYPE, trust, &trust.roles.controller)
        .map_err(|e| Rejection::new(e.reason, format!("directive: {}", e.detail)))?;
    let d = Directive::parse(payload)?;

    if d.fleet != me.fleet {
        return Err(Rejection::new(
            Reason::WrongFleet,
            format!(
                "directive is for fleet {:?}, this device is in {:?}",
                d.fleet, me.fleet
            ),
        ));
    }
    match source {
        Source::Ring => {
            if d.device.is_some() || d.ring != me.ring {
                return Err(Rejection::new(
                    Reason::WrongTarget,
                    format!(
                        "directive is for ring {:?}, this device is in {:?}",
                        d.ring, me.ring
                    ),
                ));
            }
        }
        Source::Device => {
            if d.device.as_deref() != Some(me.id) {
                return Err(Rejection::new(
                    Reason::WrongTarget,
                    format!("directive is for device {:?}, not {:?}", d.device, me.id),
                ));
            }
        }
    }

    if d.product.as_deref() != me.product {
        return Err(Rejection::new(
            Reason::WrongTarget,
            format!(
                "directive is for product {:?}, this topic is for {:?}",
                d.product, me.product
            ),
        ));
    }

    // A verified issued_at moves trusted time forward; a device with a clock far behind still
    // judges expiry from the newest signed time it has seen.
    let now = view.trusted_now.max(d.issued_at);
    trust.check_fresh(now, view.skew)?;
    check_not_expired("directive", d.expires_at, now, view.skew)?;

    if let Some(last) = view.last_sequence {
        if d.sequence <= last {
            return Err(Rejection::new(
                Reason::Replayed,
                format!(
                    "directive sequence {} is not above the last accepted {last}",
                    d.sequence
                ),
            ));
        }
    }

    Ok(Verified {
        directive: d,
        trusted_now: now,
    })
}

/// The release half of [`accept_directive`] for a [`Verified`] directive: for `install`, the
/// release's signatures and expiry, the device class and the rollback floor.
pub fn check_release(
    me: &DeviceIdentity<'_>,
    view: &AgentView<'_>,
    v: &Verified,
) -> Result<Option<Release>> {
    let (d, now, trust) = (&v.directive, v.trusted_now, view.trust);
    let release = match (d.action, &d.release) {
        (Action::Install, Some(renv)) => {
            let r = verify_release(trust, renv, now, view.skew)?;
            if let Some(p) = me.product.filter(|p| *p != r.name) {
                return Err(Rejection::new(
                    Reason::WrongTarget,
                    format!("release {} {} is not of product {p:?}", r.name, r.version),
                ));
            }
            if !r.is_compatible(me.class) {
                return Err(Rejection::new(
                    Reason::Incompatible,
                    format!(
                        "release {} {} is not for device class {:?}",
                        r.name, r.version, me.class
                    ),
                ));
            }
            if r.sequence < view.rollback_floor {
                return Err(Rejection::new(
                    Reason::RollbackFloor,
                    format!(
                        "release {} {} has sequence {}, below this device's rollback floor {}",
                        r.name, r.version, r.sequence, view.rollback_floor
                    ),
                ));
            }
            Some(r)
        }
        (Action::Install, None) => {
            return Err(Rejection::malformed("install directive carries no release"))
        }
        (Action::Hold, _) => None,
    };
    Ok(release)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    fn me() -> DeviceIdentity<'static> {
        DeviceIdentity {
            id: "dev-1",
            fleet: FLEET,
            ring: "canary",
            class: "sensor-v2",
            product: None,
        }
    }

    fn view(f: &Fixture) -> AgentView<'_> {
        AgentView {
            trust: &f.trust,
            last_sequence: Some(100),
            rollback_floor: 2,
            trusted_now: now(),
            skew: SignedDuration::from_secs(300),
        }
    }

    fn reason(f: &Fixture, env: &Envelope) -> Reason {
        accept_directive(&me(), &view(f), Source::Ring, &env.to_vec())
            .unwrap_err()
            .reason
    }

    #[test]
    fn good_directive_is_accepted() {
        let f = Fixture::new();
        let env = f.directive("canary", 101, 3).sign(&[&f.controller]);
        let ok = accept_directive(&me(), &view(&f), Source::Ring, &env.to_vec()).unwrap();
        assert_eq!(ok.release.unwrap().sequence, 3);
        assert_eq!(ok.trusted_now, now());
    }

    #[test]
    fn tampered_directive_is_bad_signature() {
        let f = Fixture::new();
        let mut env = f.directive("canary", 101, 3).sign(&[&f.controller]);
        let last = env.payload.len() - 2;
        env.payload[last] ^= 0x01;
        assert_eq!(reason(&f, &env), Reason::BadSignature);
    }

    #[test]
    fn tampered_release_inside_is_bad_signature() {
        let f = Fixture::new();
        let mut d = f.directive("canary", 101, 3);
        if let Some(r) = d.release.as_mut() {
            let i = r.payload.len() / 2;
            r.payload[i] ^= 0x20;
        }
        let env = d.sign(&[&f.controller]);
        assert_eq!(reason(&f, &env), Reason::BadSignature);
    }

    #[test]
    fn directive_signed_by_release_key_is_unknown_key() {
        let f = Fixture::new();
        let env = f.directive("canary", 101, 3).sign(&[&f.release]);
        assert_eq!(reason(&f, &env), Reason::UnknownKey);
    }

    #[test]
    fn release_signed_by_controller_key_is_refused() {
        // A stolen controller key cannot inject software.
        let f = Fixture::new();
        let mut d = f.directive("canary", 101, 3);
        d.release = Some(sample_release("app", 3, 1).sign(&[&f.controller]));
        assert_eq!(reason(&f, &d.sign(&[&f.controller])), Reason::UnknownKey);
    }

    #[test]
    fn threshold_two_with_duplicated_signature_is_refused() {
        let f = Fixture::with_controller_threshold(2);
        let mut env = f.directive("canary", 101, 3).sign(&[&f.controller]);
        env.signatures.push(env.signatures[0].clone());
        assert_eq!(reason(&f, &env), Reason::ThresholdNotMet);
        let both = f
            .directive("canary", 101, 3)
            .sign(&[&f.controller, &f.controller2]);
        assert!(accept_directive(&me(), &view(&f), Source::Ring, &both.to_vec()).is_ok());
    }

    #[test]
    fn expired_directive_is_refused() {
        let f = Fixture::new();
        let mut d = f.directive("canary", 101, 3);
        d.issued_at = now().checked_sub(SignedDuration::from_hours(3)).unwrap();
        d.expires_at = now().checked_sub(SignedDuration::from_hours(2)).unwrap();
        assert_eq!(reason(&f, &d.sign(&[&f.controller])), Reason::Expired);
    }

    #[test]
    fn expired_release_is_refused() {
        let f = Fixture::new();
        let mut r = sample_release("app", 3, 1);
        r.issued_at = now().checked_sub(SignedDuration::from_hours(48)).unwrap();
        r.expires_at = Some(now().checked_sub(SignedDuration::from_hours(1)).unwrap());
        let mut d = f.directive("canary", 101, 3);
        d.release = Some(r.sign(&[&f.release]));
        assert_eq!(reason(&f, &d.sign(&[&f.controller])), Reason::Expired);
    }

    #[test]
    fn expired_trust_root_vouches_for_nothing() {
        let f = Fixture::new();
        let env = f.directive("canary", 101, 3).sign(&[&f.controller]);
        let mut v = view(&f);
        v.trusted_now = "2100-01-01T00:00:00Z".parse().unwrap();
        let err = accept_directive(&me(), &v, Source::Ring, &env.to_vec()).unwrap_err();
        assert_eq!(err.reason, Reason::Expired);
    }

    #[test]
    fn replayed_directive_is_refused() {
        let f = Fixture::new();
        let env = f.directive("canary", 100, 3).sign(&[&f.controller]);
        assert_eq!(reason(&f, &env), Reason::Replayed);
        let env = f.directive("canary", 99, 3).sign(&[&f.controller]);
        assert_eq!(reason(&f, &env), Reason::Replayed);
    }

    #[test]
    fn release_below_rollback_floor_is_refused() {
        let f = Fixture::new();
        let env = f.directive("canary", 101, 1).sign(&[&f.controller]);
        assert_eq!(reason(&f, &env), Reason::RollbackFloor);
    }

    #[test]
    fn incompatible_release_is_refused() {
        let f = Fixture::new();
        let mut r = sample_release("app", 3, 1);
        r.compatible = vec!["camera-v1".into()];
        let mut d = f.directive("canary", 101, 3);
        d.release = Some(r.sign(&[&f.release]));
        assert_eq!(reason(&f, &d.sign(&[&f.controller])), Reason::Incompatible);
    }

    #[test]
    fn other_fleet_or_ring_is_refused() {
        let f = Fixture::new();
        let mut d = f.directive("canary", 101, 3);
        d.fleet = "other".into();
        assert_eq!(reason(&f, &d.sign(&[&f.controller])), Reason::WrongFleet);
        let d = f.directive("broad", 101, 3);
        assert_eq!(reason(&f, &d.sign(&[&f.controller])), Reason::WrongTarget);
    }

    #[test]
    fn device_directive_must_name_this_device() {
        let f = Fixture::new();
        let mut d = f.directive("canary", 101, 3);
        d.device = Some("dev-2".into());
        let env = d.sign(&[&f.controller]);
        let err = accept_directive(&me(), &view(&f), Source::Device, &env.to_vec()).unwrap_err();
        assert_eq!(err.reason, Reason::WrongTarget);
        // A ring directive posted on the device topic is refused too.
        let env = f.directive("canary", 101, 3).sign(&[&f.controller]);
        let err = accept_directive(&me(), &view(&f), Source::Device, &env.to_vec()).unwrap_err();
        assert_eq!(err.reason, Reason::WrongTarget);
        let mut d = f.directive("canary", 101, 3);
        d.device = Some("dev-1".into());
        let env = d.sign(&[&f.controller]);
        assert!(accept_directive(&me(), &view(&f), Source::Device, &env.to_vec()).is_ok());
        // …and a device directive on the ring topic.
        assert_eq!(reason(&f, &env), Reason::WrongTarget);
    }

    #[test]
    fn oversized_and_malformed_are_refused_before_work() {
        let f = Fixture::new();
        let big = vec![b'{'; crate::limits::MAX_ENVELOPE_BYTES + 1];
        let err = accept_directive(&me(), &view(&f), Source::Ring, &big).unwrap_err();
        assert_eq!(err.reason, Reason::TooLarge);
        for junk in [&b"garbage"[..], b"{}", b"[]", b"\xff\xfe"] {
            let err = accept_directive(&me(), &view(&f), Source::Ring, junk).unwrap_err();
            assert_eq!(err.reason, Reason::Malformed);
        }
    }

    #[test]
    fn device_clock_far_behind_uses_issued_at() {
        let f = Fixture::new();
        let env = f.directive("canary", 101, 3).sign(&[&f.controller]);
        let mut v = view(&f);
        v.trusted_now = "1970-01-01T00:00:00Z".parse().unwrap();
        let ok = accept_directive(&me(), &v, Source::Ring, &env.to_vec()).unwrap();
        assert_eq!(ok.trusted_now, now());
    }

    #[test]
    fn device_clock_far_ahead_refuses_what_it_cannot_judge_fresh() {
        let f = Fixture::new();
        let env = f.directive("canary", 101, 3).sign(&[&f.controller]);
        let mut v = view(&f);
        v.trusted_now = now().checked_add(SignedDuration::from_hours(5)).unwrap();
        let err = accept_directive(&me(), &v, Source::Ring, &env.to_vec()).unwrap_err();
        assert_eq!(err.reason, Reason::Expired);
    }

    #[test]
    fn hold_needs_no_release() {
        let f = Fixture::new();
        let mut d = f.directive("canary", 101, 3);
        d.action = Action::Hold;
        d.release = None;
        let ok = accept_directive(
            &me(),
            &view(&f),
            Source::Ring,
            &d.sign(&[&f.controller]).to_vec(),
        )
        .unwrap();
        assert!(ok.release.is_none());
    }

    #[test]
    fn wrong_payload_type_is_refused() {
        let f = Fixture::new();
        let d = f.directive("canary", 101, 3);
        let env = Envelope::sign(RELEASE_TYPE, d.to_bytes(), &[&f.controller]);
        assert_eq!(reason(&f, &env), Reason::WrongPayloadType);
    }
}
