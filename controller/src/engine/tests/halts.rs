//! Halts and rollbacks: a crossed gate stops the rollout with a reason naming the cause;
//! `on_failure = rollback` sends the rings back to the last completed release.

use super::*;
use ringcast_proto::{Action, EventKind};

fn reverted(h: &mut Harness, device: &str, check: &str, output: &str) {
    let rollout = h.rollout.clone();
    h.events.0.entry(device.into()).or_default().push(Event {
        id: format!("{device}-revert"),
        device: device.into(),
        at: h.now,
        rollout_id: Some(rollout),
        release: None,
        kind: EventKind::Reverted {
            reason: "health_check_failed".into(),
            check: Some(check.into()),
            output: Some(output.into()),
        },
    });
    h.report(device, Phase::Reverted);
}

#[test]
fn a_failure_rate_over_the_limit_halts_naming_the_failing_check() {
    let mut h = Harness::new(policy(vec![ring("canary"), ring("broad")]));
    let devs = h.devices("canary", 5);
    let id = h.submit(2);
    h.eval();
    h.report(&devs[0], Phase::Committed);
    h.report(&devs[1], Phase::Committed);
    reverted(
        &mut h,
        &devs[3],
        "self-test",
        "exit 1\nsegfault in sensord\n",
    );
    h.eval();
    assert_eq!(
        h.phase(&id),
        "baking",
        "1 of 5 failed is at the limit, not over"
    );
    reverted(
        &mut h,
        &devs[4],
        "self-test",
        "exit 1\nsegfault in sensord\n",
    );
    h.eval();

    assert_eq!(h.phase(&id), "halted");
    let reason = h.stop_reason(&id);
    assert_eq!(
        reason,
        format!(
            "gate crossed in ring canary: 2 of 5 failed (rate 0.40 > 0.20); most common \
             failure: check \"self-test\" on 2 devices, e.g. {}: \"exit 1: segfault in \
             sensord\"",
            devs[3]
        )
    );
    let r = h.rollout(&id);
    assert_eq!(r.ended_at, Some(h.now));
    // The release is blocked with that reason, the ring holds, broad never heard of it.
    assert_eq!(
        h.state().releases["app-2"].blocked.as_deref(),
        Some(reason.as_str())
    );
    let d = h.directive("canary");
    assert_eq!(
        (d.action, d.rollout_id.as_str()),
        (Action::Hold, id.as_str())
    );
    assert!(d.release.is_none());
    assert!(h.directives("broad").is_empty());
    let kinds = h.audit_kinds();
    assert_eq!(&kinds[kinds.len() - 2..], ["hold", "halt"]);
    assert_eq!(h.audit_details("halt"), vec![reason]);

    // Nothing moves afterwards.
    h.report_all("canary", Phase::Committed);
    h.tick(hours(24));
    assert_eq!(h.phase(&id), "halted");
}

/// canary then broad, both `rollback`; app-1 completed through both.
fn app_1_completed() -> Harness {
    let mut canary = ring("canary");
    canary.on_failure = OnFailure::Rollback;
    let mut broad = ring("broad");
    broad.on_failure = OnFailure::Rollback;
    let mut h = Harness::new(policy(vec![canary, broad]));
    h.devices("canary", 2);
    h.devices("broad", 4);
    let first = h.submit(1);
    h.eval();
    h.report_all("canary", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    h.report_all("broad", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    assert_eq!(h.phase(&first), "completed");
    assert_eq!(h.state().last_good[APP], "app-1");
    h
}

#[test]
fn rollback_publishes_the_last_good_release_on_every_ring_it_reached() {
    let mut h = app_1_completed();
    let id = h.submit(2);
    h.eval();
    h.report_all("canary", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    assert_eq!(h.position(&id).map(|p| p.0), Some("broad".into()));

    // broad fails: both rings the release reached go back to app-1.
    let broad = h.ring_devices("broad");
    for d in &broad[..2] {
        h.report(d, Phase::Reverted);
    }
    h.eval();
    match h.rollout_state(&id) {
        RolloutState::RolledBack { reason, to } => {
            assert_eq!(to, "app-1");
            assert!(
                reason.starts_with("gate crossed in ring broad: 2 of 4 failed"),
                "{reason}"
            );
        }
        other => panic!("not rolled back: {other:?}"),
    }
    for ring in ["canary", "broad"] {
        let d = h.directive(ring);
        assert_eq!(d.action, Action::Install, "{ring}");
        assert_eq!(d.rollout_id, format!("{id}-rollback"), "{ring}");
        assert_eq!(d.percent, Percent::FULL, "{ring}");
        assert_eq!(Harness::embedded(&d).sequence, 1, "{ring}: back to app-1");
        assert_eq!(h.state().rings[ring].release_id.as_deref(), Some("app-1"));
    }
    assert_eq!(h.audited("rollback"), 2);
    assert!(h.state().releases["app-2"].blocked.is_some());
    assert_eq!(h.state().last_good[APP], "app-1");
}

#[test]
fn rollback_with_no_completed_release_holds_instead() {
    let mut canary = ring("canary");
    canary.on_failure = OnFailure::Rollback;
    let mut h = Harness::new(policy(vec![canary]));
    h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    h.report_all("canary", Phase::Failed);
    h.eval();
    assert_eq!(h.phase(&id), "halted");
    assert_eq!(h.directive("canary").action, Action::Hold);
    assert_eq!(h.audited("rollback"), 0);
}

#[test]
fn a_release_that_halted_is_not_offered_again_until_unblocked() {
    let mut h = Harness::new(policy(vec![ring("canary")]));
    h.devices("canary", 2);
    let env = release(2).sign(&[&h.fx.release]);
    h.submit_envelope(env.clone(), None).expect("submitted");
    h.eval();
    h.report_all("canary", Phase::Reverted);
    h.eval();
    assert_eq!(h.phase("app-2"), "halted");

    let e = h.submit_envelope(env.clone(), None).expect_err("blocked");
    assert_eq!(e.code(), "release_blocked");
    assert!(h.last.persists_nothing());

    let reply = h.handle(Input::Unblock {
        release: "app-2".into(),
        actor: Actor {
            name: "bob".into(),
            role: "approver".into(),
        },
    });
    assert!(matches!(reply, Ok(Reply::Release(ref r)) if r.blocked.is_none()));
    let (again, _) = h.submit_envelope(env, None).expect("offered again");
    assert_eq!(again.id, "app-2-2", "a new rollout of the same release");
    let e = h
        .handle(Input::Unblock {
            release: "app-2".into(),
            actor: Actor {
                name: "bob".into(),
                role: "approver".into(),
            },
        })
        .expect_err("not blocked any more");
    assert_eq!(e.code(), "not_blocked");
}

#[test]
fn a_halted_rollouts_tallies_stay_as_they_were_when_it_ended() {
    let mut policy = policy(vec![ring("canary"), ring("broad")]);
    policy.rings[0].gate.max_failure_rate = 0.0;
    let mut h = Harness::new(policy);
    let devs = h.devices("canary", 3);
    let bad = h.submit(2);
    h.eval();
    h.report(&devs[0], Phase::Committed);
    h.report(&devs[1], Phase::Reverted);
    h.eval();
    assert_eq!(h.phase(&bad), "halted");
    let frozen = h.rollout(&bad).final_tallies.get("canary").copied();
    let frozen = frozen.expect("tallies kept at the halt");
    assert_eq!((frozen.committed, frozen.failed), (1, 1));
    assert!(
        !h.rollout(&bad).final_tallies.contains_key("broad"),
        "not reached"
    );

    // The next release moves every device on: the halted rollout's record does not change.
    let next = h.submit(3);
    h.eval();
    for d in &devs {
        h.report_for(d, &next, Phase::Committed);
    }
    h.eval();
    assert_eq!(
        h.rollout(&bad).final_tallies.get("canary").copied(),
        Some(frozen)
    );
    assert!(h.rollout(&next).final_tallies.is_empty(), "live: none kept");
}
