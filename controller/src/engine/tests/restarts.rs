//! Restarts: the state goes through serde, a new core is built from it, and the rollout
//! continues where it was, to the same result as without the restart. Rings are named: an
//! edited policy never moves a rollout to another ring.

use super::*;
use crate::config::{Check, CheckKind};
use ringcast_proto::Action;

/// Where the scenario restarts the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Never,
    MidBake,
    MidCheck,
    ChecksFailed,
    WaitingApproval,
}

fn smoke() -> Check {
    Check {
        name: "smoke".into(),
        kind: CheckKind::Command,
        command: vec!["./smoke.sh".into()],
        url: None,
        timeout: Dur::secs(60),
    }
}

/// canary (automatic, acceptance checks) then broad (manual).
fn two_rings() -> Policy {
    let mut canary = ring("canary");
    canary.checks = vec![smoke()];
    let mut broad = ring("broad");
    broad.promotion = Promotion::Manual;
    policy(vec![canary, broad])
}

/// One rollout through both rings (a failed check run, a retry, an approval), restarting
/// the engine once at `at`.
fn scenario(at: At) -> Harness {
    let mut h = Harness::new(two_rings());
    h.devices("canary", 2);
    h.devices("broad", 3);
    let id = h.submit(2);
    h.eval();
    h.report_all("canary", Phase::Committed);
    h.tick(mins(10));
    assert_eq!(h.phase(&id), "baking");
    h.tick(mins(20));
    if at == At::MidBake {
        h.restart();
        assert_eq!(h.phase(&id), "baking");
    }
    h.tick(mins(30));
    assert_eq!(h.phase(&id), "baking", "the bake counts from the gate met");
    h.tick(mins(10));
    assert_eq!(h.phase(&id), "checking");
    if at == At::MidCheck {
        h.restart();
        assert_eq!(h.phase(&id), "checking");
    }
    h.checks_done(&id, "canary", 1, Err("smoke: exit 1"))
        .expect("attempt 1 is awaited");
    assert_eq!(h.phase(&id), "checks_failed");
    h.tick(mins(2));
    if at == At::ChecksFailed {
        h.restart();
        assert_eq!(h.phase(&id), "checks_failed");
    }
    h.tick(mins(3));
    assert_eq!(h.phase(&id), "checking");
    h.checks_done(&id, "canary", 2, Ok(()))
        .expect("attempt 2 is awaited");
    h.eval();
    assert_eq!(h.phase(&id), "waiting_approval");
    h.tick(hours(2));
    if at == At::WaitingApproval {
        h.restart();
        assert_eq!(h.phase(&id), "waiting_approval");
    }
    h.tick(mins(1));
    h.approve(&id).expect("approved");
    h.eval();
    h.report_all("broad", Phase::Committed);
    h.tick(mins(5));
    h.tick(hours(1));
    assert_eq!(h.phase(&id), "completed");
    h
}

#[test]
fn a_restart_anywhere_continues_to_the_same_result() {
    let base = scenario(At::Never);
    let expected = state_json(base.state());
    for at in [
        At::MidBake,
        At::MidCheck,
        At::ChecksFailed,
        At::WaitingApproval,
    ] {
        let h = scenario(at);
        assert_eq!(state_json(h.state()), expected, "restarted {at:?}");
        assert_eq!(h.audit_kinds(), base.audit_kinds(), "restarted {at:?}");
    }
}

#[test]
fn a_restart_resigns_what_stands_with_a_higher_sequence() {
    let mut h = Harness::new(two_rings());
    h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    let before = h.directive("canary");
    h.restart();
    let after = h.directive("canary");
    assert!(
        after.sequence > before.sequence,
        "no replay after a restart"
    );
    assert_eq!(after.rollout_id, id);
    assert_eq!(after.action, Action::Install);
    assert_eq!(after.percent, before.percent);
    let trust = h.trust_topic();
    assert!(
        h.last
            .effects
            .iter()
            .any(|e| matches!(e, Effect::Publish { topic, .. } if *topic == trust)),
        "the trust root is republished"
    );
}

#[test]
fn a_restart_while_checks_run_runs_them_again() {
    let mut h = Harness::new(two_rings());
    h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    h.report_all("canary", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    assert_eq!(h.check_runs(), vec![(id.clone(), "canary".into(), 1)]);
    // The run in flight died with the old process: nothing would ever report attempt 1.
    h.restart();
    assert_eq!(
        h.check_runs(),
        vec![
            (id.clone(), "canary".into(), 1),
            (id.clone(), "canary".into(), 1)
        ],
        "the new engine runs the awaited attempt again"
    );
    let devices = h
        .last
        .effects
        .iter()
        .find_map(|e| match e {
            Effect::RunChecks {
                devices, checks, ..
            } => Some((devices.clone(), checks.len())),
            _ => None,
        })
        .expect("asked for on start");
    assert_eq!(devices, (h.ring_devices("canary"), 1));
    h.checks_done(&id, "canary", 1, Ok(())).expect("awaited");
    assert_eq!(h.position(&id).map(|p| p.0), Some("broad".into()));
}

// ----- rings by name -------------------------------------------------------------------------

/// canary, broad, fleet (automatic); the rollout passed canary and publishes on broad.
fn on_broad() -> (Harness, String) {
    let mut h = Harness::new(policy(vec![ring("canary"), ring("broad"), ring("fleet")]));
    h.devices("canary", 2);
    h.devices("broad", 2);
    h.devices("fleet", 2);
    let id = h.submit(2);
    h.eval();
    h.report_all("canary", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    assert_eq!(
        h.position(&id),
        Some(("broad".into(), 0, Stage::Publishing { since: h.now }))
    );
    (h, id)
}

#[test]
fn an_inserted_ring_does_not_move_the_rollout() {
    let (mut h, id) = on_broad();
    let before = h.position(&id);
    // "pilot" now sits where broad was (index 1).
    h.restart_with(policy(vec![
        ring("canary"),
        ring("pilot"),
        ring("broad"),
        ring("fleet"),
    ]));
    assert_eq!(
        h.position(&id),
        before,
        "still on broad, same step and stage"
    );
    assert!(h.last.changes.rollouts.is_empty(), "nothing to change");
    h.report_all("broad", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    assert_eq!(h.position(&id).map(|p| p.0), Some("fleet".into()));
    assert!(h.directives("pilot").is_empty(), "pilot was never visited");
}

#[test]
fn reordered_rings_keep_the_ring_and_promote_in_the_new_order() {
    let (mut h, id) = on_broad();
    h.restart_with(policy(vec![ring("broad"), ring("fleet"), ring("canary")]));
    assert_eq!(h.position(&id).map(|p| p.0), Some("broad".into()));
    h.report_all("broad", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    assert_eq!(h.position(&id).map(|p| p.0), Some("fleet".into()));
    h.report_all("fleet", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    // canary comes after fleet now: the rollout walks the new order.
    assert_eq!(h.position(&id).map(|p| p.0), Some("canary".into()));
}

#[test]
fn a_removed_ring_stops_the_rollout_with_a_reason() {
    let (mut h, id) = on_broad();
    h.restart_with(policy(vec![ring("canary"), ring("fleet")]));
    assert_eq!(
        h.rollout_state(&id),
        &RolloutState::Halted {
            reason: "policy changed: ring broad is no longer in the policy".into()
        }
    );
    assert_eq!(h.rollout(&id).ended_at, Some(h.now));
    assert_eq!(
        h.audit_details("halt"),
        vec!["policy changed: ring broad is no longer in the policy".to_owned()]
    );
    // Every ring it stood on holds; the release itself did nothing wrong.
    for ring in ["canary", "broad"] {
        assert_eq!(h.directive(ring).action, Action::Hold, "{ring}");
    }
    assert!(h.state().releases["app-2"].blocked.is_none());
    assert!(h.directives("fleet").is_empty());
    h.tick(hours(24));
    assert_eq!(h.phase(&id), "halted");
}

#[test]
fn a_ring_with_fewer_steps_than_the_rollout_reached_stops_it() {
    let mut canary = ring("canary");
    canary.steps = vec![pct(50.0), Percent::FULL];
    canary.gate.min_reports = 1;
    let mut h = Harness::new(policy(vec![canary]));
    h.devices("canary", 4);
    let id = h.submit(2);
    h.eval();
    h.report_all("canary", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    assert_eq!(h.position(&id).map(|p| p.1), Some(1));
    h.restart_with(policy(vec![ring("canary")]));
    assert_eq!(
        h.stop_reason(&id),
        "policy changed: ring canary has 1 step(s) now; the rollout was at step 2"
    );
}

#[test]
fn a_rollout_persisted_with_a_ring_index_resolves_to_that_rings_name_once() {
    let (mut h, id) = on_broad();
    // An older version persisted the ring as its position.
    let mut v = serde_json::to_value(h.rollout(&id)).unwrap();
    v["state"]["ring"] = serde_json::json!(1);
    let old: Rollout = serde_json::from_value(v).unwrap();
    let mut state = roundtrip(h.state());
    state.rollouts.insert(id.clone(), old);
    h.restart_from(
        policy(vec![ring("canary"), ring("broad"), ring("fleet")]),
        state,
    );
    assert_eq!(h.position(&id).map(|p| p.0), Some("broad".into()));
    assert!(h.last.changes.rollouts.contains(&id), "persisted by name");
}
