//! Issue 10, retries end to end: a real agent whose install of a release fails (its health
//! check fails, it reverts) is asked again by the ring's `retries` at directive attempt 2,
//! and commits; the zero-tolerance gate never counted the first failure.

use ringcast::kit::AppHealth;
use ringcast_agent::fleet::{device_id, FAIL_MARKER};
use ringcast_proto::Phase;
use ringcast_tests::sim_stage::{ring, BrokerKind, Stage, StageSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_install_is_retried_and_commits_on_its_second_attempt() {
    ringcast_tests::test_logs();
    let mut canary = ring("canary", &[100.0], "1m", 2, 0.0);
    canary.retries = 1;
    canary.retry_backoff = "5m".parse().expect("duration");
    let spec = StageSpec::new(
        BrokerKind::Embedded,
        vec![canary, ring("broad", &[100.0], "1m", 1, 0.0)],
        &[2, 1],
    );
    let Some(stage) = Stage::start(spec).await else {
        return;
    };
    stage.complete(1, "1m").await;
    // The first canary device's health check fails until the test says otherwise.
    let flaky = device_id("canary", 0);
    let marker = stage
        .fleet
        .devices()
        .iter()
        .find(|d| d.id == flaky)
        .map(|d| d.cfg.install_root().join(FAIL_MARKER))
        .expect("the flaky device");
    std::fs::write(&marker, b"fails once\n").expect("marker");

    let id = stage.submit(2, AppHealth::Healthy, |_| {}).await;
    stage
        .wait_until("the flaky device reverted at attempt 1", 60, |s| {
            s.controller_view(&flaky).is_some_and(|r| {
                r.phase == Phase::Reverted && r.attempt == 1 && r.rollout_id.as_deref() == Some(&id)
            })
        })
        .await;
    stage.settle().await;
    let r = stage.rollout(&id);
    assert!(
        r.state.is_live(),
        "a failure with a retry left halted: {:?}",
        r.state
    );
    assert_eq!(
        r.attempts["canary"].attempt, 1,
        "no retry before the backoff"
    );

    // The fault is gone; the backoff passes: attempt 2.
    std::fs::remove_file(&marker).expect("marker removed");
    stage.advance("5m");
    stage
        .wait_until("the flaky device committed at attempt 2", 60, |s| {
            s.controller_view(&flaky).is_some_and(|r| {
                r.phase == Phase::Committed
                    && r.attempt == 2
                    && r.current.as_ref().is_some_and(|c| c.sequence == 2)
            })
        })
        .await;
    let end = stage.drive(&id, "1m", 60).await;
    assert_eq!(end, "completed", "{}", stage.dump());
    let audit = stage.controller().shared().audit.export().expect("audit");
    let entries = ringcast_controller::audit::verify(&audit).expect("audit intact");
    let retries: Vec<_> = entries.iter().filter(|e| e.action == "retry").collect();
    assert_eq!(retries.len(), 1, "one retry, by the ring's policy");
    assert_eq!(retries[0].ring.as_deref(), Some("canary"));
    stage.shutdown().await;
}
