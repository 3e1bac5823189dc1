//! One case per rejection reason, through the public API only, plus the boundary of every
//! ordered check (so turning `<` into `<=`, or deleting a check, fails a test here), and a
//! completeness test: every `Reason` in `Reason::ALL` is produced by at least one case.

use jiff::{SignedDuration, Timestamp};
use ringcast_proto::directive::Directive;
use ringcast_proto::envelope::{DIRECTIVE_TYPE, RELEASE_TYPE, TRUST_TYPE};
use ringcast_proto::limits::{MAX_ENVELOPE_BYTES, MAX_KEYS, MAX_NAME_LEN, MAX_SIGNATURES};
use ringcast_proto::release::InstallKind;
use ringcast_proto::testkit::{key, now, rotated_doc, sample_release, Fixture, FLEET};
use ringcast_proto::{
    accept_directive, verify_release, Accepted, AgentView, ArtifactVerifier, DeviceIdentity,
    Envelope, Reason, Rejection, Release, Source, TrustRoot,
};
use std::collections::BTreeSet;

const SKEW: SignedDuration = SignedDuration::from_secs(300);

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
        skew: SKEW,
    }
}

fn accept(f: &Fixture, d: &Directive) -> Result<Accepted, Rejection> {
    accept_directive(
        &me(),
        &view(f),
        Source::Ring,
        &d.sign(&[&f.controller]).to_vec(),
    )
}

fn accept_env(f: &Fixture, env: &Envelope) -> Result<Accepted, Rejection> {
    accept_directive(&me(), &view(f), Source::Ring, &env.to_vec())
}

fn with_release(f: &Fixture, r: &Release) -> Directive {
    let mut d = f.directive("canary", 101, r.sequence);
    d.release = Some(r.sign(&[&f.release]));
    d
}

type Case = (&'static str, Reason, Box<dyn Fn() -> Result<(), Rejection>>);

fn ok<T>(r: Result<T, Rejection>) -> Result<(), Rejection> {
    r.map(|_| ())
}

/// Each case must fail with its reason.
fn cases() -> Vec<Case> {
    vec![
        (
            "flipped directive byte",
            Reason::BadSignature,
            Box::new(|| {
                let f = Fixture::new();
                let mut env = f.directive("canary", 101, 3).sign(&[&f.controller]);
                env.payload[10] ^= 0x04;
                ok(accept_env(&f, &env))
            }),
        ),
        (
            "directive signed by a release key",
            Reason::UnknownKey,
            Box::new(|| {
                let f = Fixture::new();
                ok(accept_env(
                    &f,
                    &f.directive("canary", 101, 3).sign(&[&f.release]),
                ))
            }),
        ),
        (
            "threshold 2 met only by a repeated signature",
            Reason::ThresholdNotMet,
            Box::new(|| {
                let f = Fixture::with_controller_threshold(2);
                let mut env = f.directive("canary", 101, 3).sign(&[&f.controller]);
                env.signatures.push(env.signatures[0].clone());
                ok(accept_env(&f, &env))
            }),
        ),
        (
            "directive bytes under the release payload type",
            Reason::WrongPayloadType,
            Box::new(|| {
                let f = Fixture::new();
                let d = f.directive("canary", 101, 3);
                ok(accept_env(
                    &f,
                    &Envelope::sign(RELEASE_TYPE, d.to_bytes(), &[&f.controller]),
                ))
            }),
        ),
        (
            "directive expired beyond the skew",
            Reason::Expired,
            Box::new(|| {
                let f = Fixture::new();
                let mut d = f.directive("canary", 101, 3);
                d.issued_at = now() - SignedDuration::from_hours(1);
                d.expires_at = now() - SKEW - SignedDuration::from_secs(1);
                ok(accept(&f, &d))
            }),
        ),
        (
            "directive sequence equal to the last accepted",
            Reason::Replayed,
            Box::new(|| {
                let f = Fixture::new();
                ok(accept(&f, &f.directive("canary", 100, 3)))
            }),
        ),
        (
            "release one below the rollback floor",
            Reason::RollbackFloor,
            Box::new(|| {
                let f = Fixture::new();
                ok(accept(&f, &f.directive("canary", 101, 1)))
            }),
        ),
        (
            "release for another device class",
            Reason::Incompatible,
            Box::new(|| {
                let f = Fixture::new();
                let mut r = sample_release("app", 3, 1);
                r.compatible = vec!["sensor-v1".into(), "camera".into()];
                ok(accept(&f, &with_release(&f, &r)))
            }),
        ),
        (
            "directive for another fleet",
            Reason::WrongFleet,
            Box::new(|| {
                let f = Fixture::new();
                let mut d = f.directive("canary", 101, 3);
                d.fleet = format!("{FLEET}2");
                ok(accept(&f, &d))
            }),
        ),
        (
            "directive for another ring",
            Reason::WrongTarget,
            Box::new(|| {
                let f = Fixture::new();
                ok(accept(&f, &f.directive("canary2", 101, 3)))
            }),
        ),
        (
            "envelope one byte over 64 KiB",
            Reason::TooLarge,
            Box::new(|| {
                let f = Fixture::new();
                let mut bytes = f
                    .directive("canary", 101, 3)
                    .sign(&[&f.controller])
                    .to_vec();
                bytes.resize(MAX_ENVELOPE_BYTES + 1, b' ');
                ok(accept_directive(&me(), &view(&f), Source::Ring, &bytes))
            }),
        ),
        (
            "unknown field in the directive",
            Reason::Malformed,
            Box::new(|| {
                let f = Fixture::new();
                let d = f.directive("canary", 101, 3);
                let mut v: serde_json::Value = serde_json::from_slice(&d.to_bytes()).unwrap();
                v["force"] = true.into();
                let env = Envelope::sign(
                    DIRECTIVE_TYPE,
                    serde_json::to_vec(&v).unwrap(),
                    &[&f.controller],
                );
                ok(accept_env(&f, &env))
            }),
        ),
        (
            "trust root with a lower version",
            Reason::TrustRollback,
            Box::new(|| {
                let f = Fixture::new();
                let new_root = key(40);
                let doc = rotated_doc(&f.trust, &new_root, 3);
                let env = Envelope::sign(
                    TRUST_TYPE,
                    serde_json::to_vec(&doc).unwrap(),
                    &[&f.root, &new_root],
                );
                let ringcast_proto::Rotation::Accepted(v3) = f.trust.rotate(&env, now(), SKEW)?
                else {
                    panic!("rotation to v3 not accepted");
                };
                let doc2 = rotated_doc(&f.trust, &new_root, 2);
                let env2 = Envelope::sign(
                    TRUST_TYPE,
                    serde_json::to_vec(&doc2).unwrap(),
                    &[&f.root, &new_root],
                );
                ok(v3.rotate(&env2, now(), SKEW))
            }),
        ),
        (
            "artifact bytes that hash differently",
            Reason::DigestMismatch,
            Box::new(|| {
                let sha = ringcast_proto::digest::sha256_hex(b"artifact");
                let mut v = ArtifactVerifier::new(&sha, 8)?;
                v.update(b"artifacT")?;
                v.finish()
            }),
        ),
        (
            "artifact one byte short",
            Reason::SizeMismatch,
            Box::new(|| {
                let sha = ringcast_proto::digest::sha256_hex(b"artifact");
                let mut v = ArtifactVerifier::new(&sha, 8)?;
                v.update(b"artifac")?;
                v.finish()
            }),
        ),
    ]
}

#[test]
fn each_case_is_rejected_with_its_reason() {
    for (what, reason, case) in cases() {
        match case() {
            Ok(()) => panic!("{what}: accepted, expected {reason}"),
            Err(e) => assert_eq!(e.reason, reason, "{what}: {e}"),
        }
    }
}

#[test]
fn every_reason_has_a_case() {
    let covered: BTreeSet<&str> = cases().iter().map(|(_, r, _)| r.code()).collect();
    let all: BTreeSet<&str> = Reason::ALL.iter().map(|r| r.code()).collect();
    assert_eq!(covered, all, "reasons without a rejection case");
}

// ---- Boundaries: the last accepted value next to the first refused one. --------------------

#[test]
fn sequence_just_above_last_is_accepted() {
    let f = Fixture::new();
    assert!(accept(&f, &f.directive("canary", 101, 3)).is_ok());
    let mut v = view(&f);
    v.last_sequence = None;
    let env = f.directive("canary", 0, 3).sign(&[&f.controller]);
    assert!(
        accept_directive(&me(), &v, Source::Ring, &env.to_vec()).is_ok(),
        "a first directive has nothing to replay"
    );
}

#[test]
fn release_at_the_rollback_floor_is_accepted() {
    let f = Fixture::new();
    // view(): floor 2.
    assert!(accept(&f, &f.directive("canary", 101, 2)).is_ok());
    assert_eq!(
        accept(&f, &f.directive("canary", 101, 1))
            .unwrap_err()
            .reason,
        Reason::RollbackFloor
    );
}

#[test]
fn expiry_is_judged_with_the_skew_to_the_second() {
    let f = Fixture::new();
    let mut d = f.directive("canary", 101, 3);
    d.issued_at = now() - SignedDuration::from_hours(1);
    d.expires_at = now() - SKEW;
    assert!(
        accept(&f, &d).is_ok(),
        "exactly at expiry + skew is still fresh"
    );
    d.expires_at = now() - SKEW - SignedDuration::from_secs(1);
    assert_eq!(accept(&f, &d).unwrap_err().reason, Reason::Expired);
}

#[test]
fn expired_release_inside_a_fresh_directive_is_refused() {
    let f = Fixture::new();
    let mut r = sample_release("app", 3, 1);
    r.issued_at = now() - SignedDuration::from_hours(48);
    r.expires_at = Some(now() - SKEW - SignedDuration::from_secs(1));
    assert_eq!(
        accept(&f, &with_release(&f, &r)).unwrap_err().reason,
        Reason::Expired
    );
    r.expires_at = Some(now() - SKEW);
    assert!(accept(&f, &with_release(&f, &r)).is_ok());
}

#[test]
fn release_verification_needs_the_release_role() {
    let f = Fixture::new();
    let r = sample_release("app", 3, 1);
    assert!(verify_release(&f.trust, &r.sign(&[&f.release2]), now(), SKEW).is_ok());
    for wrong in [&f.root, &f.controller] {
        assert_eq!(
            verify_release(&f.trust, &r.sign(&[wrong]), now(), SKEW)
                .unwrap_err()
                .reason,
            Reason::UnknownKey
        );
    }
    // A listed key's signature that fails outranks an unknown one: report the forgery.
    let mut env = r.sign(&[&f.release, &key(99)]);
    env.signatures[0].sig[5] ^= 1;
    assert_eq!(
        verify_release(&f.trust, &env, now(), SKEW)
            .unwrap_err()
            .reason,
        Reason::BadSignature
    );
}

#[test]
fn threshold_counts_distinct_keys_not_signatures() {
    let f = Fixture::with_release_threshold(2);
    let r = sample_release("app", 3, 1);
    // Same key twice, plus an unlisted key: still one listed key.
    let env = r.sign(&[&f.release, &f.release, &key(77)]);
    assert_eq!(
        verify_release(&f.trust, &env, now(), SKEW)
            .unwrap_err()
            .reason,
        Reason::ThresholdNotMet
    );
    // A valid signature relabelled with the other listed key's id does not count for it.
    let mut env = r.sign(&[&f.release]);
    let mut forged = env.signatures[0].clone();
    forged.keyid = f.release2.key_id().to_string();
    env.signatures.push(forged);
    assert_eq!(
        verify_release(&f.trust, &env, now(), SKEW)
            .unwrap_err()
            .reason,
        Reason::BadSignature
    );
    assert!(verify_release(&f.trust, &r.sign(&[&f.release, &f.release2]), now(), SKEW).is_ok());
}

#[test]
fn too_many_signatures_are_refused_before_verifying() {
    let f = Fixture::new();
    let mut env = f.directive("canary", 101, 3).sign(&[&f.controller]);
    let s = env.signatures[0].clone();
    env.signatures = vec![s; MAX_SIGNATURES + 1];
    assert_eq!(
        Envelope::from_slice(&env.to_vec()).unwrap_err().reason,
        Reason::TooLarge
    );
    env.signatures.truncate(MAX_SIGNATURES);
    assert!(Envelope::from_slice(&env.to_vec()).is_ok());
}

#[test]
fn trust_root_with_too_many_keys_is_refused() {
    let f = Fixture::new();
    let mut doc = f.trust.doc.clone();
    for seed in 100..(100 + MAX_KEYS as u8) {
        let k = key(seed);
        doc.keys.insert(k.key_id().clone(), k.public());
    }
    assert!(doc.keys.len() > MAX_KEYS);
    assert_eq!(
        TrustRoot::from_doc(doc).unwrap_err().reason,
        Reason::TooLarge
    );
}

#[test]
fn over_long_names_are_too_large() {
    let f = Fixture::new();
    let mut d = f.directive("canary", 101, 3);
    d.rollout_id = "r".repeat(MAX_NAME_LEN + 1);
    assert_eq!(accept(&f, &d).unwrap_err().reason, Reason::TooLarge);
    let mut d = f.directive("canary", 101, 3);
    d.rollout_id = "r".repeat(MAX_NAME_LEN);
    assert!(accept(&f, &d).is_ok());
}

#[test]
fn artifact_longer_than_declared_fails_at_the_first_extra_byte() {
    let sha = ringcast_proto::digest::sha256_hex(b"artifact");
    let mut v = ArtifactVerifier::new(&sha, 8).unwrap();
    v.update(b"artifact").unwrap();
    assert_eq!(v.update(b"!").unwrap_err().reason, Reason::TooLarge);
    let mut v = ArtifactVerifier::new(&sha, 8).unwrap();
    v.update(b"artifact").unwrap();
    v.update(b"").unwrap();
    v.finish().unwrap();
}

#[test]
fn manifest_checks_each_refuse() {
    let base = sample_release("app", 3, 1);
    type Mutate = Box<dyn Fn(&mut Release)>;
    let cases: Vec<(&str, Mutate)> = vec![
        (
            "expires before issued",
            Box::new(|r| r.expires_at = Some(r.issued_at - SignedDuration::from_secs(1))),
        ),
        (
            "expires at issued",
            Box::new(|r| r.expires_at = Some(r.issued_at)),
        ),
        (
            "zero interval",
            Box::new(|r| r.health.interval = ringcast_proto::Dur::secs(0)),
        ),
        (
            "bad class name",
            Box::new(|r| r.compatible = vec!["a b".into()]),
        ),
        ("empty url", Box::new(|r| r.artifact.url.clear())),
        (
            "uppercase sha",
            Box::new(|r| r.artifact.sha256 = "A".repeat(64)),
        ),
        (
            "relative file path",
            Box::new(|r| {
                r.install.kind = InstallKind::File;
                r.install.path = Some("etc/app.conf".into());
            }),
        ),
        (
            "empty revert argv",
            Box::new(|r| r.install.revert = Some(vec![])),
        ),
        (
            "http check without url",
            Box::new(|r| {
                r.health.checks = vec![ringcast_proto::release::HealthCheck {
                    name: "web".into(),
                    kind: ringcast_proto::release::CheckKind::Http,
                    command: None,
                    url: None,
                    timeout: ringcast_proto::Dur::secs(1),
                }]
            }),
        ),
        (
            "command check without argv",
            Box::new(|r| {
                r.health.checks = vec![ringcast_proto::release::HealthCheck {
                    name: "cmd".into(),
                    kind: ringcast_proto::release::CheckKind::Command,
                    command: None,
                    url: None,
                    timeout: ringcast_proto::Dur::secs(1),
                }]
            }),
        ),
        (
            "too many classes",
            Box::new(|r| r.compatible = (0..65).map(|i| format!("c{i}")).collect()),
        ),
    ];
    assert!(base.validate().is_ok());
    for (what, mutate) in cases {
        let mut r = base.clone();
        mutate(&mut r);
        assert!(r.validate().is_err(), "{what} accepted");
        // And a signed manifest carrying it is refused by devices, not just by the signer.
        let f = Fixture::new();
        let env = r.sign(&[&f.release]);
        assert!(
            verify_release(&f.trust, &env, now(), SKEW).is_err(),
            "{what} verified"
        );
    }
}

#[test]
fn fixture_time_is_what_the_vectors_assume() {
    assert_eq!(now(), "2026-11-23T00:00:00Z".parse::<Timestamp>().unwrap());
}

#[test]
fn expired_trust_root_vouches_even_for_no_hold() {
    // A hold carries no release, so only the directive-level trust freshness check stands
    // between an expired root and a frozen fleet.
    let f = Fixture::new();
    let mut d = f.directive("canary", 101, 3);
    d.action = ringcast_proto::Action::Hold;
    d.release = None;
    let env = d.sign(&[&f.controller]);
    let mut v = view(&f);
    assert!(accept_directive(&me(), &v, Source::Ring, &env.to_vec()).is_ok());
    v.trusted_now = f.trust.doc.expires_at + SKEW + SignedDuration::from_secs(1);
    let err = accept_directive(&me(), &v, Source::Ring, &env.to_vec()).unwrap_err();
    assert_eq!(err.reason, Reason::Expired);
    assert!(err.detail.contains("trust root"), "{err}");
}

/// A product topic binds the directive (its signed `product`) and the release (its `name`)
/// to the product, so an `os` directive replayed onto the `app` topic, or an `os` release
/// sent on the `app` topic, is refused; the single-product topics take no product.
#[test]
fn product_topics_bind_the_directive_and_the_release_to_the_product() {
    let f = Fixture::new();
    let r = sample_release("app", 3, 1);
    let app = DeviceIdentity {
        product: Some(r.name.as_str()),
        ..me()
    };
    let take = |who: &DeviceIdentity<'_>, d: &Directive| {
        accept_directive(
            who,
            &view(&f),
            Source::Ring,
            &d.sign(&[&f.controller]).to_vec(),
        )
    };
    let mut d = with_release(&f, &r);
    d.product = Some(r.name.clone());
    assert!(take(&app, &d).is_ok(), "its own product's directive");
    let err = take(&me(), &d).unwrap_err();
    assert_eq!(err.reason, Reason::WrongTarget, "{}", err.detail);
    let other = DeviceIdentity {
        product: Some("os"),
        ..me()
    };
    let err = take(&other, &d).unwrap_err();
    assert_eq!(err.reason, Reason::WrongTarget, "{}", err.detail);
    // Signed for os, carrying a release of another name: the release is refused.
    d.product = Some("os".into());
    let err = take(&other, &d).unwrap_err();
    assert_eq!(err.reason, Reason::WrongTarget, "{}", err.detail);
    assert!(err.detail.contains("not of product"), "{}", err.detail);
    // An unmarked directive is for single-product agents only.
    d.product = None;
    assert_eq!(take(&app, &d).unwrap_err().reason, Reason::WrongTarget);
    assert!(take(&me(), &d).is_ok());
}
