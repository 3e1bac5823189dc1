//! Retries: a ring's `retries` ask devices whose install failed to try again, at a higher
//! directive `attempt`, after a backoff that doubles; a failure counts against the gate only
//! at the last attempt. An operator's `retry` asks again at once.

use super::*;

fn retrying_ring(retries: u32, max_failure_rate: f64) -> RingPolicy {
    let mut r = ring("canary");
    r.retries = retries;
    r.retry_backoff = Dur::secs(600);
    r.gate.max_failure_rate = max_failure_rate;
    r
}

#[test]
fn a_failure_with_retries_left_is_retrying_not_failed_and_is_asked_again_after_the_backoff() {
    let mut h = Harness::new(policy(vec![retrying_ring(2, 0.0), ring("broad")]));
    let devs = h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    assert_eq!(h.directive("canary").attempt, 1);
    h.report(&devs[0], Phase::Committed);
    h.report_attempt(&devs[1], Phase::Failed, 1);
    h.eval();
    // A zero-tolerance gate does not halt: the device will try again.
    assert_eq!(h.phase(&id), "publishing");
    let t = h.tally("canary", Percent::FULL);
    assert_eq!((t.failed, t.retrying), (0, 1));

    // Not before the backoff.
    h.tick(mins(9));
    assert_eq!(h.directive("canary").attempt, 1);
    assert_eq!(h.audited("retry"), 0);
    h.tick(mins(1));
    let d = h.directive("canary");
    assert_eq!(d.attempt, 2, "re-signed at the next attempt");
    assert_eq!(d.rollout_id, id, "same rollout");
    assert_eq!(h.audited("retry"), 1);
    assert!(
        h.audit_details("retry")[0].contains("attempt 2 of 3"),
        "{:?}",
        h.audit_details("retry")
    );
    // It fails again: the second backoff (from the attempt's publication) is twice the first.
    h.report_attempt(&devs[1], Phase::Reverted, 2);
    h.tick(mins(19));
    assert_eq!(h.directive("canary").attempt, 2);
    h.tick(mins(1));
    assert_eq!(h.directive("canary").attempt, 3);
    // Nothing more to do at attempt 3 until a device fails at it.
    h.tick(hours(1));
    assert_eq!(h.directive("canary").attempt, 3);

    // At the last attempt a failure is a failure: the zero-tolerance gate halts.
    h.report_attempt(&devs[1], Phase::Failed, 3);
    h.eval();
    assert_eq!(h.phase(&id), "halted");
    let t = h.tally("canary", Percent::FULL);
    assert_eq!((t.failed, t.retrying), (1, 0));
}

#[test]
fn a_retried_device_that_commits_lets_the_step_pass() {
    let mut h = Harness::new(policy(vec![retrying_ring(1, 0.0), ring("broad")]));
    let devs = h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    h.report(&devs[0], Phase::Committed);
    h.report_attempt(&devs[1], Phase::Failed, 1);
    h.tick(mins(10));
    assert_eq!(h.directive("canary").attempt, 2);
    h.report_attempt(&devs[1], Phase::Committed, 2);
    h.eval();
    assert_eq!(h.phase(&id), "baking");
    h.tick(hours(1));
    assert_eq!(h.position(&id).map(|p| p.0), Some("broad".into()));
    assert_eq!(
        h.directive("broad").attempt,
        1,
        "a new ring starts at attempt 1"
    );
}

#[test]
fn without_retries_a_failure_counts_at_once() {
    let mut h = Harness::new(policy(vec![ring("canary")]));
    let devs = h.devices("canary", 10);
    let id = h.submit(2);
    h.eval();
    for d in &devs[..3] {
        h.report(d, Phase::Failed);
    }
    h.eval();
    assert_eq!(h.phase(&id), "halted");
    assert_eq!(h.audited("retry"), 0);
}

#[test]
fn an_operator_retry_asks_again_at_once_past_the_policy() {
    // No retries in the policy; a tolerant gate keeps the rollout live with one failure.
    let mut h = Harness::new(policy(vec![retrying_ring(0, 0.5)]));
    let devs = h.devices("canary", 3);
    let id = h.submit(2);
    h.eval();
    let e = h
        .act(&id, RolloutAction::Retry)
        .expect_err("nothing failed yet");
    assert_eq!(e.code(), "nothing_to_retry");
    assert!(h.last.persists_nothing());

    h.report(&devs[0], Phase::Committed);
    h.report_attempt(&devs[1], Phase::Failed, 1);
    h.eval();
    assert_eq!(h.tally("canary", Percent::FULL).failed, 1);
    let r = h.act(&id, RolloutAction::Retry).expect("retried");
    assert_eq!(r.attempts["canary"].attempt, 2);
    assert_eq!(h.directive("canary").attempt, 2);
    assert_eq!(
        h.tally("canary", Percent::FULL).retrying,
        1,
        "asked again: no longer a failure"
    );
    assert_eq!(h.audit_kinds().iter().filter(|k| *k == "retry").count(), 1);
    // It commits on the second attempt.
    h.report_attempt(&devs[1], Phase::Committed, 2);
    h.report(&devs[2], Phase::Committed);
    h.eval();
    assert_eq!(h.phase(&id), "baking");
}

#[test]
fn attempts_survive_a_restart() {
    let mut h = Harness::new(policy(vec![retrying_ring(2, 0.0)]));
    let devs = h.devices("canary", 2);
    h.submit(2);
    h.eval();
    h.report_attempt(&devs[1], Phase::Failed, 1);
    h.tick(mins(10));
    assert_eq!(h.directive("canary").attempt, 2);
    h.restart();
    // The re-signed directive keeps the attempt; no extra retry from the restart.
    assert_eq!(h.directive("canary").attempt, 2);
    h.tick(mins(5));
    assert_eq!(h.directive("canary").attempt, 2);
    assert_eq!(h.audited("retry"), 1);
}
