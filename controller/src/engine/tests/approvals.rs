//! Approvals: a `manual` ring waits for an approver; an approval that nothing waits for is
//! refused and changes nothing.

use super::*;
use ringcast_proto::Action;

fn manual(name: &str) -> RingPolicy {
    let mut r = ring(name);
    r.promotion = Promotion::Manual;
    r
}

/// canary (auto) then broad (manual), two devices each; the rollout published on canary.
fn on_canary() -> (Harness, String) {
    let mut h = Harness::new(policy(vec![ring("canary"), manual("broad")]));
    h.devices("canary", 2);
    h.devices("broad", 2);
    let id = h.submit(2);
    h.eval();
    assert_eq!(h.phase(&id), "publishing");
    (h, id)
}

/// Past canary: waiting for broad's approval.
fn waiting_for_broad() -> (Harness, String) {
    let (mut h, id) = on_canary();
    h.report_all("canary", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    assert_eq!(
        h.position(&id),
        Some(("broad".into(), 0, Stage::WaitingApproval))
    );
    (h, id)
}

#[test]
fn a_manual_ring_waits_for_its_approval() {
    let (mut h, id) = waiting_for_broad();
    assert_eq!(h.audited("wait_approval"), 1);
    h.tick(hours(24 * 7));
    assert_eq!(h.phase(&id), "waiting_approval");
    assert!(h.directives("broad").is_empty(), "nothing offered to broad");
    assert_eq!(h.audited("wait_approval"), 1, "said once, not every tick");
}

#[test]
fn approving_moves_the_rollout_into_the_ring() {
    let (mut h, id) = waiting_for_broad();
    let r = h.approve(&id).expect("approved");
    let approval = &r.approvals["broad"];
    assert_eq!((approval.by.as_str(), approval.at), ("alice", h.now));
    assert_eq!(h.audit_kinds().last().map(String::as_str), Some("approve"));
    h.eval();
    assert_eq!(
        h.position(&id),
        Some(("broad".into(), 0, Stage::Publishing { since: h.now }))
    );
    let d = h.directive("broad");
    assert_eq!(
        (d.action, d.rollout_id.as_str()),
        (Action::Install, id.as_str())
    );
    assert_eq!(Harness::embedded(&d).sequence, 2);
}

#[test]
fn a_manual_first_ring_waits_before_anything_is_published() {
    let mut h = Harness::new(policy(vec![manual("canary")]));
    h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    assert_eq!(h.phase(&id), "waiting_approval");
    assert!(h.directives("canary").is_empty());
    h.approve(&id).expect("approved");
    h.eval();
    assert_eq!(h.phase(&id), "publishing");
}

#[test]
fn approving_a_rollout_that_waits_for_no_approval_is_refused_and_changes_nothing() {
    let (mut h, id) = on_canary();
    let before = state_json(h.state());
    let e = h.approve(&id).expect_err("nothing waits for an approval");
    assert_eq!(e.code(), "not_waiting_approval");
    assert!(e.to_string().contains("publishing"), "{e}");
    assert!(h.last.persists_nothing(), "{:?}", h.last);
    assert_eq!(state_json(h.state()), before);
    h.eval();
    assert_eq!(h.phase(&id), "publishing");
}

#[test]
fn approvals_that_do_not_fit_are_refused_with_their_code() {
    let (mut h, id) = waiting_for_broad();
    let before = state_json(h.state());
    for (ring, code) in [
        (Some("canary"), "not_manual"),
        (Some("nowhere"), "not_found"),
    ] {
        let e = h
            .act_on(&id, RolloutAction::Approve, ring)
            .expect_err("refused");
        assert_eq!(e.code(), code, "{ring:?}: {e}");
        assert!(h.last.persists_nothing());
    }
    assert_eq!(state_json(h.state()), before);

    h.approve(&id).expect("approved");
    let e = h.approve(&id).expect_err("twice");
    assert_eq!(e.code(), "already_approved");
    assert!(h.last.persists_nothing());

    let e = h.approve("no-such-rollout").expect_err("unknown");
    assert_eq!(e.code(), "not_found");
}

#[test]
fn approving_a_finished_rollout_is_refused() {
    let (mut h, id) = waiting_for_broad();
    h.act(&id, RolloutAction::Abort).expect("aborted");
    let before = state_json(h.state());
    let e = h.approve(&id).expect_err("finished");
    assert_eq!(e.code(), "rollout_finished");
    assert!(h.last.persists_nothing());
    assert_eq!(state_json(h.state()), before);
}

#[test]
fn a_ring_approved_ahead_starts_without_waiting() {
    let (mut h, id) = on_canary();
    h.act_on(&id, RolloutAction::Approve, Some("broad"))
        .expect("approved ahead");
    h.report_all("canary", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    assert_eq!(h.position(&id).map(|p| p.0), Some("broad".into()));
    assert_eq!(h.phase(&id), "publishing");
    assert_eq!(h.audited("wait_approval"), 0);
}
