//! A release submitted while another of the same name is live: `on_new_release` says
//! whether it supersedes the older rollout or queues behind it.

use super::*;
use crate::config::OnNewRelease;

/// canary (auto) then broad (manual), with `rule`; app-2 past canary, waiting for broad.
fn app_2_waiting_for_approval(rule: Option<OnNewRelease>) -> Harness {
    let mut broad = ring("broad");
    broad.promotion = Promotion::Manual;
    let mut p = policy(vec![ring("canary"), broad]);
    p.on_new_release = rule;
    let mut h = Harness::new(p);
    h.devices("canary", 2);
    h.devices("broad", 2);
    let id = h.submit(2);
    h.eval();
    h.report_all("canary", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    assert_eq!(h.phase(&id), "waiting_approval");
    h
}

#[test]
fn supersede_lets_a_hotfix_overtake_a_release_waiting_for_approval() {
    let mut h = app_2_waiting_for_approval(Some(OnNewRelease::Supersede));
    h.tick(mins(5));
    let hotfix = h.submit(3);
    assert_eq!(
        h.rollout_state("app-2"),
        &RolloutState::Superseded { by: hotfix.clone() }
    );
    assert_eq!(h.rollout("app-2").ended_at, Some(h.now));
    assert_eq!(
        h.audit_details("supersede"),
        vec![format!("superseded by {hotfix}")]
    );
    assert_eq!(h.phase(&hotfix), "pending");

    h.eval();
    assert_eq!(h.position(&hotfix).map(|p| p.0), Some("canary".into()));
    assert_eq!(h.phase(&hotfix), "publishing");
    assert_eq!(Harness::embedded(&h.directive("canary")).sequence, 3);
    // The superseded rollout is over: approving it is refused.
    let e = h.approve("app-2").expect_err("superseded");
    assert_eq!(e.code(), "rollout_finished");
}

#[test]
fn queue_keeps_a_new_release_waiting_until_the_running_one_finishes() {
    let mut h = app_2_waiting_for_approval(Some(OnNewRelease::Queue));
    let next = h.submit(3);
    h.tick(mins(1));
    let after = h.submit(4);
    assert_eq!(h.phase(&next), "queued");
    assert_eq!(h.phase(&after), "queued");
    h.tick(hours(24 * 3));
    assert_eq!(h.phase("app-2"), "waiting_approval", "not superseded");
    assert_eq!(h.phase(&next), "queued");
    assert_eq!(Harness::embedded(&h.directive("canary")).sequence, 2);

    h.approve("app-2").expect("approved");
    h.eval();
    for d in h.ring_devices("broad") {
        h.report_for(&d, "app-2", Phase::Committed);
    }
    h.eval();
    h.tick(hours(1));
    assert_eq!(h.phase("app-2"), "completed");
    // First come, first served: app-3 starts, app-4 waits for it.
    assert_eq!(h.phase(&next), "publishing");
    assert_eq!(h.phase(&after), "queued");
    let kinds = h.audit_kinds();
    let complete = kinds.iter().position(|k| k == "complete").unwrap();
    let dequeue = kinds.iter().position(|k| k == "dequeue").unwrap();
    assert!(complete < dequeue, "{kinds:?}");
    assert_eq!(h.audited("dequeue"), 1);
}

#[test]
fn by_default_automatic_rings_supersede_and_manual_ones_queue() {
    let mut h = app_2_waiting_for_approval(None);
    let next = h.submit(3);
    assert_eq!(h.phase(&next), "queued", "a manual ring: queue");

    let mut h = Harness::new(policy(vec![ring("canary"), ring("broad")]));
    h.devices("canary", 2);
    let first = h.submit(2);
    h.eval();
    let next = h.submit(3);
    assert_eq!(
        h.rollout_state(&first),
        &RolloutState::Superseded { by: next.clone() },
        "every ring automatic: supersede"
    );
}
