//! Launches: a rollout with `activate_at` pre-stages every ring at its start; rings activate
//! at the launch (`all`) or ring by ring after it (`rings`); an operator moves or holds the
//! launch and devices keep what they staged.

use super::*;
use crate::model::{LaunchMode, HELD};
use ringcast_proto::Action;

fn three_rings() -> Policy {
    policy(vec![ring("canary"), ring("early"), ring("broad")])
}

fn not_before(h: &Harness, ring: &str) -> Option<Timestamp> {
    h.directive(ring).activation.not_before
}

#[test]
fn every_ring_prestages_at_the_start_and_later_rings_wait_for_their_turn() {
    let mut h = Harness::new(three_rings());
    for r in ["canary", "early", "broad"] {
        h.devices(r, 2);
    }
    let launch = h.now.checked_add(hours(6)).unwrap();
    let id = h.submit_launch(2, launch, LaunchMode::Rings);
    h.eval();
    for r in ["canary", "early", "broad"] {
        let d = h.directive(r);
        assert_eq!(d.action, Action::Install, "{r}");
        assert_eq!(d.rollout_id, id, "{r}");
    }
    assert_eq!(not_before(&h, "canary"), Some(launch));
    assert_eq!(
        not_before(&h, "early"),
        Some(HELD),
        "early activates on its turn"
    );
    assert_eq!(not_before(&h, "broad"), Some(HELD));
    assert_eq!(h.audited("prestage"), 2);

    // Staged devices are no success: nothing moves before the launch.
    h.report_all("canary", Phase::Staged);
    h.report_all("early", Phase::Staged);
    h.tick(hours(5));
    assert_eq!(h.phase(&id), "publishing");
    assert_eq!(h.position(&id).map(|p| p.0), Some("canary".into()));

    // After the launch canary commits, bakes and early's turn comes: activate now.
    h.tick_to(launch);
    h.report_all("canary", Phase::Committed);
    h.eval();
    assert_eq!(h.phase(&id), "baking");
    h.tick(hours(1));
    assert_eq!(h.position(&id).map(|p| p.0), Some("early".into()));
    assert_eq!(
        not_before(&h, "early"),
        Some(launch),
        "early's turn: it may activate"
    );
    assert_eq!(not_before(&h, "broad"), Some(HELD), "broad still waits");
}

#[test]
fn a_launch_in_all_mode_activates_every_ring_at_once_and_gates_watch_them_all() {
    let mut h = Harness::new(three_rings());
    for r in ["canary", "early", "broad"] {
        h.devices(r, 10);
    }
    let launch = h.now.checked_add(hours(2)).unwrap();
    let id = h.submit_launch(2, launch, LaunchMode::All);
    h.eval();
    for r in ["canary", "early", "broad"] {
        assert_eq!(not_before(&h, r), Some(launch), "{r}");
    }
    // A failure in broad halts the rollout even while canary is the current ring.
    h.tick_to(launch);
    for d in h.ring_devices("broad")[..3].to_vec() {
        h.report(&d, Phase::Reverted);
    }
    h.eval();
    assert_eq!(h.phase(&id), "halted");
    assert_eq!(h.directive("broad").action, Action::Hold);
}

#[test]
fn moving_and_holding_a_launch_resigns_what_stands_and_keeps_turns() {
    let mut h = Harness::new(three_rings());
    h.devices("canary", 2);
    let t1 = h.now.checked_add(hours(6)).unwrap();
    let id = h.submit_launch(2, t1, LaunchMode::Rings);
    h.eval();
    let seq = h.directive("canary").sequence;

    let t2 = h.now.checked_add(hours(8)).unwrap();
    let r = h.relaunch(&id, Some(t2)).expect("moved");
    assert_eq!(r.activate_at, Some(t2));
    assert_eq!(not_before(&h, "canary"), Some(t2));
    assert!(h.directive("canary").sequence > seq, "re-signed");
    assert_eq!(
        not_before(&h, "early"),
        Some(HELD),
        "a later ring keeps waiting"
    );
    assert_eq!(
        h.directive("early").action,
        Action::Install,
        "staged bytes stay wanted"
    );

    // Held: nothing activates, no ring is dropped.
    h.relaunch(&id, None).expect("held");
    assert_eq!(not_before(&h, "canary"), Some(HELD));
    assert_eq!(h.directive("canary").action, Action::Install);
    // Held past both times: no step timeout, nothing activates.
    h.tick(hours(48));
    assert_eq!(h.phase(&id), "publishing");
    let t3 = h.now.checked_add(hours(1)).unwrap();
    h.relaunch(&id, Some(t3)).expect("rescheduled");
    assert_eq!(not_before(&h, "canary"), Some(t3));
    assert_eq!(h.audited("launch"), 3);

    let e = h
        .relaunch(&id, Some(h.now))
        .expect_err("a launch time must be ahead");
    assert_eq!(e.code(), "launch_in_past");
    h.tick(hours(2));
    let e = h
        .relaunch(&id, Some(h.now.checked_add(hours(1)).unwrap()))
        .expect_err("launched");
    assert_eq!(e.code(), "already_launched");
}

#[test]
fn only_a_launch_can_be_moved() {
    let mut h = Harness::new(three_rings());
    h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    let e = h
        .relaunch(&id, Some(h.now.checked_add(hours(1)).unwrap()))
        .expect_err("no launch");
    assert_eq!(e.code(), "not_a_launch");
    assert!(h.last.persists_nothing());
}

#[test]
fn the_step_timeout_of_a_launch_counts_from_the_launch() {
    let mut h = Harness::new(three_rings());
    h.devices("canary", 2);
    let launch = h.now.checked_add(hours(48)).unwrap();
    let id = h.submit_launch(2, launch, LaunchMode::Rings);
    h.eval();
    h.tick(hours(47));
    assert_eq!(
        h.phase(&id),
        "publishing",
        "24 h before the launch is not a timeout"
    );
    h.tick_to(launch.checked_add(hours(24)).unwrap());
    assert_eq!(h.phase(&id), "halted", "24 h after the launch is");
}

#[test]
fn abort_holds_the_prestaged_rings_too() {
    let mut h = Harness::new(three_rings());
    h.devices("canary", 2);
    let launch = h.now.checked_add(hours(6)).unwrap();
    let id = h.submit_launch(2, launch, LaunchMode::Rings);
    h.eval();
    h.act(&id, RolloutAction::Abort).expect("aborted");
    for r in ["canary", "early", "broad"] {
        assert_eq!(h.directive(r).action, Action::Hold, "{r}");
    }
}

#[test]
fn a_launch_stages_whole_rings_whatever_their_steps_and_a_plain_rollout_does_not() {
    let mut broad = ring("broad");
    broad.steps = vec![pct(10.0), pct(100.0)];
    let mut h = Harness::new(policy(vec![ring("canary"), broad.clone()]));
    h.devices("canary", 2);
    h.devices("broad", 10);
    let launch = h.now.checked_add(hours(6)).unwrap();
    h.submit_launch(2, launch, LaunchMode::Rings);
    h.eval();
    let d = h.directive("broad");
    assert_eq!(d.percent, pct(10.0), "activation still ramps");
    assert_eq!(
        d.stage_percent,
        Some(Percent::FULL),
        "every broad device stages ahead of its step"
    );
    assert_eq!(
        h.directive("canary").stage_percent,
        None,
        "a ring at 100 % needs no stage ramp: directives stay as they were"
    );

    let mut h = Harness::new(policy(vec![ring("canary"), broad]));
    h.devices("canary", 2);
    h.devices("broad", 10);
    h.submit(2);
    h.eval();
    assert!(h
        .directives("canary")
        .iter()
        .all(|d| d.stage_percent.is_none()));
}
