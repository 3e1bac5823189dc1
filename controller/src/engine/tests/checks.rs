//! Acceptance checks: bounded attempts, then the ring's `on_failure`; a result the rollout
//! does not wait for is refused; `checks_passed` is audited before the promotion.

use super::*;
use crate::config::{Check, CheckKind};

fn smoke() -> Check {
    Check {
        name: "smoke".into(),
        kind: CheckKind::Http,
        command: vec![],
        url: Some("http://127.0.0.1:9/smoke".into()),
        timeout: Dur::secs(30),
    }
}

/// canary (with checks, `on_failure`) then broad; the rollout's first check run started.
fn checking(on_failure: OnFailure, attempts: u32) -> (Harness, String) {
    let mut canary = ring("canary");
    canary.checks = vec![smoke()];
    canary.check_attempts = attempts;
    canary.on_failure = on_failure;
    let mut h = Harness::new(policy(vec![canary, ring("broad")]));
    h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    h.report_all("canary", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    assert_eq!(
        h.position(&id),
        Some((
            "canary".into(),
            0,
            Stage::Checking {
                since: h.now,
                attempt: 1
            }
        ))
    );
    (h, id)
}

#[test]
fn checks_run_with_the_rings_devices_after_the_last_steps_bake() {
    let (h, id) = checking(OnFailure::Halt, 3);
    let run = h
        .effects
        .iter()
        .find_map(|e| match e {
            Effect::RunChecks {
                rollout,
                ring,
                release,
                attempt,
                checks,
                devices,
            } => Some((
                rollout.clone(),
                ring.clone(),
                release.clone(),
                *attempt,
                checks.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
                devices.clone(),
            )),
            _ => None,
        })
        .expect("checks asked for");
    assert_eq!(
        run,
        (
            id,
            "canary".into(),
            "app-2".into(),
            1,
            vec!["smoke".to_owned()],
            h.ring_devices("canary")
        )
    );
    assert_eq!(h.audited("promote"), 0, "not before the checks pass");
}

#[test]
fn a_failing_check_is_retried_up_to_check_attempts_then_the_ring_halts() {
    let (mut h, id) = checking(OnFailure::Halt, 3);
    for attempt in 1..=3u32 {
        let detail = format!("smoke: answered 500 (run {attempt})");
        h.checks_done(&id, "canary", attempt, Err(&detail))
            .expect("the running attempt");
        if attempt == 3 {
            break;
        }
        assert_eq!(h.phase(&id), "checks_failed");
        h.tick(mins(4));
        assert_eq!(
            h.check_runs().len(),
            attempt as usize,
            "not before check_retry"
        );
        h.tick(mins(1));
        assert_eq!(
            h.check_runs().last(),
            Some(&(id.clone(), "canary".into(), attempt + 1))
        );
        assert_eq!(h.phase(&id), "checking");
    }
    assert_eq!(h.check_runs().len(), 3, "exactly check_attempts runs");
    assert_eq!(
        h.stop_reason(&id),
        "acceptance checks of ring canary failed 3 time(s): smoke: answered 500 (run 3)"
    );
    assert_eq!(h.phase(&id), "halted");
    assert_eq!(
        h.audit_details("checks_failed"),
        (1..=3)
            .map(|a| format!("attempt {a} of 3: smoke: answered 500 (run {a})"))
            .collect::<Vec<_>>()
    );
    assert!(h.state().releases["app-2"].blocked.is_some());
    assert_eq!(h.directive("canary").action, ringcast_proto::Action::Hold);
    h.tick(hours(1));
    assert_eq!(h.check_runs().len(), 3);
}

#[test]
fn after_the_last_attempt_a_rollback_ring_rolls_back() {
    let mut canary = ring("canary");
    canary.checks = vec![smoke()];
    canary.check_attempts = 1;
    canary.on_failure = OnFailure::Rollback;
    let mut h = Harness::new(policy(vec![canary]));
    h.devices("canary", 2);
    // A good release to roll back to: app-1 completes first.
    let first = h.submit(1);
    h.eval();
    h.report_all("canary", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    h.checks_done(&first, "canary", 1, Ok(())).expect("awaited");
    assert_eq!(h.phase(&first), "completed");

    let id = h.submit(2);
    h.eval();
    h.report_all("canary", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    h.checks_done(&id, "canary", 1, Err("smoke: timed out"))
        .expect("awaited");
    assert_eq!(
        h.rollout_state(&id),
        &RolloutState::RolledBack {
            reason: "acceptance checks of ring canary failed 1 time(s): smoke: timed out".into(),
            to: "app-1".into()
        }
    );
    let d = h.directive("canary");
    assert_eq!(d.rollout_id, format!("{id}-rollback"));
    assert_eq!(Harness::embedded(&d).sequence, 1);
}

#[test]
fn checks_passed_is_audited_before_the_promotion() {
    let (mut h, id) = checking(OnFailure::Halt, 3);
    h.checks_done(&id, "canary", 1, Ok(())).expect("awaited");
    let kinds = h.audit_kinds();
    let pos = |k: &str| {
        kinds
            .iter()
            .position(|x| x == k)
            .unwrap_or_else(|| panic!("no {k} in {kinds:?}"))
    };
    assert!(pos("checks_started") < pos("checks_passed"), "{kinds:?}");
    assert!(pos("checks_passed") < pos("promote"), "{kinds:?}");
    assert_eq!(
        &kinds[kinds.len() - 2..],
        ["checks_passed", "promote"],
        "in one decision, in that order"
    );
    assert_eq!(h.position(&id).map(|p| p.0), Some("broad".into()));
}

#[test]
fn a_check_result_the_rollout_does_not_wait_for_is_refused() {
    // Publishing: no checks run.
    let mut canary = ring("canary");
    canary.checks = vec![smoke()];
    let mut h = Harness::new(policy(vec![canary, ring("broad")]));
    h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    let before = state_json(h.state());
    let e = h
        .checks_done(&id, "canary", 1, Ok(()))
        .expect_err("not checking");
    assert_eq!(e.code(), "disallowed");
    assert!(e.to_string().contains("publishing"), "{e}");
    assert!(h.last.persists_nothing());
    assert_eq!(state_json(h.state()), before);

    let e = h
        .checks_done("no-such-rollout", "canary", 1, Ok(()))
        .expect_err("unknown");
    assert_eq!(e.code(), "not_found");
}

#[test]
fn a_stale_or_repeated_check_result_is_refused() {
    let (mut h, id) = checking(OnFailure::Halt, 3);
    h.checks_done(&id, "canary", 1, Err("smoke: 500"))
        .expect("awaited");
    h.tick(mins(5));
    // Attempt 2 runs; a late answer for attempt 1, or for another ring, is not its result.
    for (ring, attempt) in [("canary", 1), ("broad", 2)] {
        let e = h
            .checks_done(&id, ring, attempt, Ok(()))
            .expect_err("not awaited");
        assert_eq!(e.code(), "disallowed", "{ring} {attempt}");
        assert!(h.last.persists_nothing());
    }
    assert_eq!(h.phase(&id), "checking");
    h.checks_done(&id, "canary", 2, Ok(())).expect("awaited");
    let e = h
        .checks_done(&id, "canary", 2, Ok(()))
        .expect_err("counted once");
    assert_eq!(e.code(), "disallowed");
    assert_eq!(h.audited("promote"), 1);
}
