//! Submission rules, applied before anything changes: size before parsing, signatures,
//! expiry, a sequence strictly above every earlier one of the name, a device class the fleet
//! has, the artifact in the store.

use super::*;
use ringcast_proto::RELEASE_TYPE;

fn fleet() -> Harness {
    let mut h = Harness::new(policy(vec![ring("canary")]));
    h.devices("canary", 2);
    h
}

/// Submit `release` and expect it refused with `code`, changing nothing.
fn refused(h: &mut Harness, release: &Release, code: &str) {
    let before = state_json(h.state());
    let e = h.submit_release(release).expect_err("refused");
    assert_eq!(e.code(), code, "{e}");
    assert!(h.last.persists_nothing(), "{code}: {:?}", h.last);
    assert_eq!(state_json(h.state()), before, "{code}");
}

#[test]
fn a_sequence_must_be_above_every_earlier_one_of_the_name() {
    let mut h = fleet();
    h.submit(5);
    h.tick(mins(1));
    h.submit(7);
    // 6 is above 5 but not above 7: every earlier release counts, not the one with the id.
    refused(&mut h, &release(6), "sequence_not_increasing");
    refused(&mut h, &release(3), "sequence_not_increasing");
    // The same sequence with other content is not the same release.
    let mut other = release(7);
    other.artifact.url = "http://127.0.0.1:1/artifacts/other.tar.gz".into();
    refused(&mut h, &other, "sequence_reused");
    // An identical app-5 is app-5 again, still below 7.
    refused(&mut h, &release(5), "sequence_not_increasing");
    // While app-7 rolls out it cannot be submitted twice.
    refused(&mut h, &release(7), "already_rolling_out");
    // Sequences are per name.
    h.submit_release(&testkit::sample_release("tool", 1, 1))
        .expect("another name");
    h.submit_release(&release(8)).expect("above 7");
}

#[test]
fn an_expired_release_is_refused() {
    let mut h = fleet();
    let mut r = release(2);
    r.expires_at = Some(h.now.checked_sub(mins(10)).unwrap());
    refused(&mut h, &r, "expired");
    // Within the allowed clock skew (5 min) it is still good.
    r.expires_at = Some(h.now.checked_sub(mins(1)).unwrap());
    h.submit_release(&r).expect("within the skew");
}

#[test]
fn a_release_for_no_device_class_of_the_fleet_is_refused() {
    let mut h = fleet();
    let mut r = release(2);
    r.compatible = vec!["gateway-v1".into()];
    refused(&mut h, &r, "incompatible");

    // With no device known yet there is nothing to compare: accepted, with a warning.
    let mut h = Harness::new(policy(vec![ring("canary")]));
    let (_, warnings) = h
        .submit_envelope(r.sign(&[&h.fx.release]), None)
        .expect("nothing to compare with");
    assert!(
        warnings
            .iter()
            .any(|w| w == "no device has reported yet: compatibility not checked"),
        "{warnings:?}"
    );
}

#[test]
fn an_envelope_over_the_size_limit_is_refused_before_it_is_parsed() {
    let mut h = fleet();
    let big = Envelope::sign(
        RELEASE_TYPE,
        vec![b' '; ringcast_proto::limits::MAX_ENVELOPE_BYTES],
        &[&h.fx.release],
    );
    let e = h.submit_envelope(big, None).expect_err("too large");
    assert_eq!(e.code(), "too_large");
    assert!(h.last.persists_nothing());
    assert!(h.state().releases.is_empty());
}

#[test]
fn a_release_not_signed_by_the_release_role_is_refused() {
    let mut h = fleet();
    // The controller key is in the trust root, but not for releases.
    let env = release(2).sign(&[&h.fx.controller]);
    let e = h.submit_envelope(env, None).expect_err("wrong role");
    assert!(
        matches!(e, crate::error::Error::Rejected(_)),
        "a rejection: {e}"
    );
    assert!(h.last.persists_nothing());
    assert!(h.state().releases.is_empty());
}

#[test]
fn an_artifact_the_controller_serves_must_be_in_its_store() {
    let mut h = fleet();
    let mut r = release(2);
    r.artifact.url = format!("/artifacts/sha256/{}", r.artifact.sha256);
    let reply = h.handle(Input::Submit {
        submit: Submit {
            envelope: r.sign(&[&h.fx.release]),
            start_at: None,
            activate_at: None,
            launch: None,
        },
        actor: Actor {
            name: "alice".into(),
            role: "operator".into(),
        },
        artifact_stored: false,
    });
    assert_eq!(reply.expect_err("not stored").code(), "artifact_missing");
    assert!(h.last.persists_nothing());
    // Once it is stored the same release goes.
    h.submit_release(&r).expect("stored");
}

#[test]
fn a_scheduled_rollout_starts_at_its_time() {
    let mut h = fleet();
    let at = h.now.checked_add(hours(3)).unwrap();
    let (r, _) = h
        .submit_envelope(release(2).sign(&[&h.fx.release]), Some(at))
        .expect("submitted");
    h.tick(hours(2) + mins(59));
    assert_eq!(h.phase(&r.id), "pending");
    assert!(h.directives("canary").is_empty());
    h.tick(mins(1));
    assert_eq!(h.phase(&r.id), "publishing");
}
