//! Issue 9, end to end: a release every device of the ring refuses no longer shows `0/2`
//! for ever. Real agents refuse it (built for another device class: `incompatible`), report
//! the refusal, and the controller halts the step the refusals make unreachable, naming
//! their reason and a device.

use ringcast::kit::AppHealth;
use ringcast_agent::fleet::device_id;
use ringcast_controller::model::RolloutState;
use ringcast_proto::{Phase, Topics};
use ringcast_tests::sim_stage::{ring, BrokerKind, Stage, StageSpec, FLEET};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_the_whole_ring_refuses_halts_with_the_refusal_reason() {
    ringcast_tests::test_logs();
    let spec = StageSpec::new(
        BrokerKind::Embedded,
        vec![
            ring("canary", &[100.0], "1h", 2, 0.0),
            ring("broad", &[100.0], "1h", 1, 0.0),
        ],
        &[2, 0],
    );
    let Some(stage) = Stage::start(spec).await else {
        return;
    };
    stage
        .wait_until("both canary agents known", 30, |s| s.known_devices() == 2)
        .await;
    // A device of another class, so the controller accepts a release built for it.
    let other = "broad-other-0";
    let mut r = ringcast_tests::synthetic::report(other, 1, Phase::Idle);
    r.ring = "broad".into();
    r.device_class = "other-box".into();
    r.rollout_id = None;
    let topics = Topics::for_fleet(FLEET).expect("fleet");
    let port = ringcast_tests::synthetic::port_of(stage.broker_url()).expect("port");
    ringcast_tests::mqtt::publish_all(
        "other-class",
        port,
        vec![(topics.state(other), r.to_bytes())],
        true,
        Duration::from_secs(10),
    )
    .await
    .expect("publish the other class's report");
    stage
        .wait_until("the other class known", 30, |s| s.known_devices() == 3)
        .await;

    let id = stage
        .submit(2, AppHealth::Healthy, |r| {
            r.device_class = "other-box".into()
        })
        .await;
    stage
        .wait_until("the step halts on its refusals", 30, |s| {
            s.phase(&id) == "halted"
        })
        .await;
    let RolloutState::Halted { reason } = stage.rollout(&id).state else {
        unreachable!("waited for halted")
    };
    assert!(
        reason.contains("incompatible") && reason.contains("canary"),
        "the reason names the refusal and the ring: {reason}"
    );
    assert!(
        reason.contains(&device_id("canary", 0)) || reason.contains(&device_id("canary", 1)),
        "the reason names a device: {reason}"
    );
    // The halt came from refusals, not failures: the reason counts them. (Once the hold is
    // out, each agent accepts it and its report drops the refusal, so the reports are not
    // checked here: the agent tests cover the refusal in the report.)
    assert!(reason.contains("refused"), "{reason}");
    assert!(!reason.contains("failed (rate"), "{reason}");
    stage.shutdown().await;
}
