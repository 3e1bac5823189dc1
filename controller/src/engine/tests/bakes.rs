//! Bakes: a step's bake starts when its gate is first met and the gate must hold through it;
//! `step_timeout` ends a step that cannot reach its gate.

use super::*;

#[test]
fn the_bake_starts_when_the_gate_is_met_not_at_publish() {
    let mut h = Harness::new(policy(vec![ring("canary"), ring("broad")]));
    let devs = h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    let published = h.now;
    assert_eq!(
        h.position(&id),
        Some(("canary".into(), 0, Stage::Publishing { since: published }))
    );

    // A bake's worth of time with nothing committed: no promotion.
    h.tick(hours(1));
    h.tick(hours(1));
    assert_eq!(h.phase(&id), "publishing");
    assert_eq!(h.audited("promote"), 0);

    h.report(&devs[0], Phase::Committed);
    h.report(&devs[1], Phase::Committed);
    h.eval();
    let met = h.now;
    assert_eq!(
        h.position(&id),
        Some((
            "canary".into(),
            0,
            Stage::Baking {
                since: met,
                published: Some(published)
            }
        ))
    );
    h.tick(mins(59));
    assert_eq!(
        h.phase(&id),
        "baking",
        "the bake counts from the gate, not the publish"
    );
    h.tick(mins(1));
    assert_eq!(h.position(&id).map(|p| p.0), Some("broad".into()));
    let passed = &h.rollout(&id).history[0];
    assert_eq!(
        (passed.published_at, passed.passed_at),
        (published, Some(h.now))
    );
}

#[test]
fn a_gate_lost_during_the_bake_goes_back_to_publishing_and_the_bake_restarts() {
    let mut canary = ring("canary");
    canary.gate.max_failure_rate = 0.5;
    let mut h = Harness::new(policy(vec![canary, ring("broad")]));
    let devs = h.devices("canary", 3);
    let id = h.submit(2);
    h.eval();
    let published = h.now;
    h.report(&devs[0], Phase::Committed);
    h.report(&devs[1], Phase::Committed);
    h.tick(mins(10));
    assert_eq!(h.phase(&id), "baking");

    // One of the two reverts (1 of 3 is under the 50 % limit, so no halt): the gate is lost.
    h.tick(mins(20));
    h.report(&devs[1], Phase::Reverted);
    h.eval();
    assert_eq!(
        h.position(&id),
        Some(("canary".into(), 0, Stage::Publishing { since: published })),
        "back to publishing, still timed from the publish"
    );
    assert_eq!(h.audited("gate_lost"), 1);

    h.tick(mins(15));
    h.report(&devs[2], Phase::Committed);
    h.eval();
    let met_again = h.now;
    assert_eq!(h.phase(&id), "baking");
    // An hour after the *first* gate met is not enough: the bake restarted.
    h.tick(mins(40));
    assert!(h.now.duration_since(published) > hours(1));
    assert_eq!(h.phase(&id), "baking");
    h.tick_to(met_again.checked_add(hours(1)).unwrap());
    assert_eq!(h.position(&id).map(|p| p.0), Some("broad".into()));
    assert_eq!(h.phase(&id), "publishing");
}

#[test]
fn a_restart_that_has_not_reread_the_fleet_keeps_the_bake_clock() {
    let mut h = Harness::new(policy(vec![ring("canary"), ring("broad")]));
    let devs = h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    h.report(&devs[0], Phase::Committed);
    h.report(&devs[1], Phase::Committed);
    h.tick(mins(10));
    let baking = h.position(&id);
    assert!(
        matches!(baking, Some((_, 0, Stage::Baking { .. }))),
        "{baking:?}"
    );

    // Restarted, and the reports of the last seconds before the crash are not back yet.
    h.restart();
    h.fleet_complete = false;
    let late = h.forget(&devs[1]);
    h.tick(mins(5));
    assert_eq!(h.position(&id), baking, "an absence is no evidence yet");
    assert_eq!(h.audited("gate_lost"), 0);

    // The re-read brings it back: the bake ends at its original time.
    h.remember(late);
    h.fleet_complete = true;
    h.tick(mins(54));
    assert_eq!(h.phase(&id), "baking", "59 minutes into a one-hour bake");
    h.tick(mins(1));
    assert_eq!(h.position(&id).map(|p| p.0), Some("broad".into()));
}

#[test]
fn once_the_fleet_is_read_a_missing_commit_loses_the_gate() {
    let mut h = Harness::new(policy(vec![ring("canary"), ring("broad")]));
    let devs = h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    h.report(&devs[0], Phase::Committed);
    h.report(&devs[1], Phase::Committed);
    h.tick(mins(10));
    assert_eq!(h.phase(&id), "baking");
    let _ = h.forget(&devs[1]);
    h.tick(mins(1));
    assert_eq!(h.phase(&id), "publishing");
    assert_eq!(h.audited("gate_lost"), 1);
}

#[test]
fn step_timeout_ends_a_step_that_cannot_reach_its_gate() {
    let mut canary = ring("canary");
    canary.gate.min_reports = 3;
    canary.step_timeout_setting = Some(Dur::secs(6 * 3600));
    let mut h = Harness::new(policy(vec![canary]));
    let devs = h.devices("canary", 3);
    let id = h.submit(2);
    h.eval();
    h.report(&devs[0], Phase::Committed);
    h.report(&devs[1], Phase::Probation);
    h.tick(hours(5) + mins(59));
    assert_eq!(h.phase(&id), "publishing");
    h.tick(mins(1));
    assert_eq!(h.phase(&id), "halted");
    let reason = h.stop_reason(&id);
    assert!(
        reason.starts_with(
            "step timed out in ring canary: gate not met after 6h (1 of 3 needed committed; 0 \
             pending, 0 deferred, 1 unresponsive, 0 refused, 0 failed, 1 of 3 devices in the \
             ramp not reporting for this rollout)"
        ),
        "{reason}"
    );
    assert_eq!(h.directive("canary").action, ringcast_proto::Action::Hold);
}

#[test]
fn step_timeout_counts_from_the_publish_even_across_a_lost_gate() {
    let mut canary = ring("canary");
    canary.gate.max_failure_rate = 0.5;
    canary.bake = Dur::secs(2 * 3600);
    canary.step_timeout_setting = Some(Dur::secs(3 * 3600));
    let mut h = Harness::new(policy(vec![canary]));
    let devs = h.devices("canary", 3);
    let id = h.submit(2);
    h.eval();
    h.tick(mins(30));
    h.report(&devs[0], Phase::Committed);
    h.report(&devs[1], Phase::Committed);
    h.eval();
    assert_eq!(h.phase(&id), "baking");
    h.tick(hours(1));
    h.report(&devs[1], Phase::Reverted);
    h.eval();
    assert_eq!(h.phase(&id), "publishing");
    h.tick(hours(1) + mins(29));
    assert_eq!(h.phase(&id), "publishing");
    h.tick(mins(1));
    assert!(
        h.stop_reason(&id)
            .starts_with("step timed out in ring canary"),
        "{}",
        h.stop_reason(&id)
    );
}

#[test]
fn a_zero_step_timeout_waits_for_the_gate_without_limit() {
    let mut canary = ring("canary");
    canary.step_timeout_setting = Some(Dur::secs(0));
    let mut h = Harness::new(policy(vec![canary]));
    let devs = h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    h.tick(hours(24 * 30));
    assert_eq!(h.phase(&id), "publishing");
    h.report(&devs[0], Phase::Committed);
    h.report(&devs[1], Phase::Committed);
    h.tick(hours(1));
    h.tick(hours(1));
    assert_eq!(h.phase(&id), "completed");
}
