//! Operator control: pause and resume; abort in every phase of the life cycle.

use super::*;
use crate::config::{Check, CheckKind, OnNewRelease};
use ringcast_proto::{Action, Window};

#[test]
fn a_paused_rollout_makes_no_progress_until_resumed() {
    let mut h = Harness::new(policy(vec![ring("canary"), ring("broad")]));
    h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    let r = h.act(&id, RolloutAction::Pause).expect("paused");
    assert!(r.paused);
    assert_eq!(h.audit_kinds().last().map(String::as_str), Some("pause"));

    h.report_all("canary", Phase::Committed);
    h.tick(hours(1));
    h.tick(hours(1));
    assert_eq!(h.phase(&id), "publishing", "paused: no bake starts");
    assert!(h.rollout(&id).paused);

    let e = h.act(&id, RolloutAction::Pause).expect_err("twice");
    assert_eq!(e.code(), "already_paused");
    assert!(h.last.persists_nothing());

    let r = h.act(&id, RolloutAction::Resume).expect("resumed");
    assert!(!r.paused);
    h.eval();
    assert_eq!(
        h.position(&id),
        Some((
            "canary".into(),
            0,
            Stage::Baking {
                since: h.now,
                // The step's timeout counts from the resume, not from the publish.
                published: Some(h.now)
            }
        )),
        "the bake starts at resume"
    );
    h.tick(hours(1));
    assert_eq!(h.position(&id).map(|p| p.0), Some("broad".into()));

    let e = h.act(&id, RolloutAction::Resume).expect_err("not paused");
    assert_eq!(e.code(), "not_paused");
    assert!(h.last.persists_nothing());
}

#[test]
fn a_paused_rollout_still_halts_on_a_crossed_gate() {
    let mut h = Harness::new(policy(vec![ring("canary")]));
    h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    h.act(&id, RolloutAction::Pause).expect("paused");
    h.report_all("canary", Phase::Reverted);
    h.eval();
    assert_eq!(h.phase(&id), "halted");
    assert_eq!(h.directive("canary").action, Action::Hold);
}

#[test]
fn a_paused_rollout_does_not_time_out_its_step() {
    let mut h = Harness::new(policy(vec![ring("canary")]));
    h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    h.act(&id, RolloutAction::Pause).expect("paused");
    h.tick(hours(48));
    assert_eq!(h.phase(&id), "publishing");
    // Resumed, the step gets its whole timeout again (24 h by default), not none at all.
    h.act(&id, RolloutAction::Resume).expect("resumed");
    h.tick(hours(23));
    assert_eq!(
        h.phase(&id),
        "publishing",
        "timed out by the time spent paused"
    );
    h.tick(hours(1));
    assert_eq!(h.phase(&id), "halted");
    assert!(
        h.stop_reason(&id).contains("after 1d"),
        "{}",
        h.stop_reason(&id)
    );
}

#[test]
fn a_ring_with_delivery_windows_waits_days_for_its_devices_by_default() {
    use crate::config::{DEFAULT_STEP_TIMEOUT, DEFAULT_WINDOWED_STEP_TIMEOUT};
    let mut weekly = ring("canary");
    assert_eq!(weekly.step_timeout(), DEFAULT_STEP_TIMEOUT);
    weekly.windows = vec![Window::parse("Mon 00:00-02:00").unwrap()];
    assert_eq!(weekly.step_timeout(), DEFAULT_WINDOWED_STEP_TIMEOUT);
    // The test kit's "now" is Monday 00:00Z: inside the window.
    let mut h = Harness::new(policy(vec![weekly]));
    h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    assert_eq!(h.phase(&id), "publishing");
    // Devices that missed this Monday's window install next Monday: still in time.
    h.tick(hours(7 * 24 + 1));
    assert_eq!(h.phase(&id), "publishing");
    h.report_all("canary", Phase::Committed);
    h.eval();
    assert_eq!(h.phase(&id), "baking");
}

fn smoke() -> Check {
    Check {
        name: "smoke".into(),
        kind: CheckKind::Command,
        command: vec!["true".into()],
        url: None,
        timeout: Dur::secs(60),
    }
}

/// A harness with a rollout brought to `phase`; whether its ring was published.
fn in_phase(phase: &str) -> (Harness, String, bool) {
    let mut canary = ring("canary");
    let mut p = policy(vec![]);
    match phase {
        "queued" => p.on_new_release = Some(OnNewRelease::Queue),
        "waiting_window" => {
            canary.windows = vec![Window::parse("Sun 02:00-04:00").unwrap()];
        }
        "waiting_approval" => canary.promotion = Promotion::Manual,
        "checking" | "checks_failed" => canary.checks = vec![smoke()],
        _ => {}
    }
    p.rings = vec![canary];
    // The test kit's "now" is Monday 2026-11-23 00:00Z: Sunday's window is days away.
    let mut h = Harness::new(p);
    h.devices("canary", 2);
    let start_at = (phase == "pending").then(|| h.now.checked_add(hours(5)).unwrap());
    if phase == "queued" {
        h.submit(1);
        h.eval();
    }
    let env = release(2).sign(&[&h.fx.release]);
    let (r, _) = h.submit_envelope(env, start_at).expect("submitted");
    let id = r.id;
    h.eval();
    if matches!(phase, "baking" | "checking" | "checks_failed") {
        h.report_all("canary", Phase::Committed);
        h.eval();
    }
    if matches!(phase, "checking" | "checks_failed") {
        h.tick(hours(1));
    }
    if phase == "checks_failed" {
        h.checks_done(&id, "canary", 1, Err("smoke: exit 1"))
            .expect("a result for the running checks");
    }
    assert_eq!(h.phase(&id), phase);
    let published = !h.directives("canary").is_empty();
    (h, id, published)
}

#[test]
fn abort_ends_the_rollout_in_every_phase() {
    for phase in [
        "queued",
        "pending",
        "waiting_window",
        "waiting_approval",
        "publishing",
        "baking",
        "checking",
        "checks_failed",
    ] {
        let (mut h, id, published) = in_phase(phase);
        let on_ring_before = h.directives("canary").len();
        let r = h.act(&id, RolloutAction::Abort).expect("aborted");
        assert_eq!(r.state, RolloutState::Aborted, "{phase}");
        assert_eq!(r.ended_at, Some(h.now), "{phase}");
        assert_eq!(h.phase(&id), "aborted", "{phase}");
        assert!(h.audit_kinds().contains(&"abort".to_owned()), "{phase}");
        let standing = h.state().rings.get("canary").map(|d| d.rollout_id.clone());
        if published && standing.as_deref() == Some(id.as_str()) {
            // The ring it stood on now holds.
            let d = h.directive("canary");
            assert_eq!(
                (d.action, d.rollout_id.as_str()),
                (Action::Hold, id.as_str())
            );
            assert_eq!(h.audited("hold"), 1, "{phase}");
        } else {
            assert_eq!(h.directives("canary").len(), on_ring_before, "{phase}");
        }

        // Nothing happens afterwards, and it cannot be aborted twice.
        h.report_all("canary", Phase::Committed);
        let runs = h.check_runs().len();
        h.tick(hours(24 * 8));
        assert_eq!(h.phase(&id), "aborted", "{phase}");
        assert_eq!(h.check_runs().len(), runs, "{phase}: no checks after abort");
        let e = h.act(&id, RolloutAction::Abort).expect_err("finished");
        assert_eq!(e.code(), "rollout_finished", "{phase}");
        assert!(h.last.persists_nothing(), "{phase}");
        if phase == "checking" {
            let e = h
                .checks_done(&id, "canary", 1, Ok(()))
                .expect_err("the checks' rollout is gone");
            assert_eq!(e.code(), "disallowed");
            assert!(h.last.persists_nothing());
        }
    }
}

#[test]
fn aborting_a_queued_rollout_leaves_the_running_one_alone() {
    let (mut h, id, _) = in_phase("queued");
    h.act(&id, RolloutAction::Abort).expect("aborted");
    h.eval();
    assert_eq!(h.phase("app-1"), "publishing");
    assert_eq!(h.directive("canary").rollout_id, "app-1");
}
