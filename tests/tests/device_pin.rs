//! A device pin end to end: the real controller publishes the per-device directive, a real
//! agent (sled store, real bundle, health check, artifact download) installs the pinned
//! release its ring does not run and commits it; after unpin it follows its ring again.

use ringcast::kit::AppHealth;
use ringcast_agent::fleet::device_id;
use ringcast_controller::engine::Actor;
use ringcast_proto::{Phase, StateReport};
use ringcast_tests::sim_stage::{ring, BrokerKind, Stage, StageSpec, APP};

fn approver() -> Actor {
    Actor {
        name: "alice".into(),
        role: "approver".into(),
    }
}

/// The device's own latest status.
fn own(stage: &Stage, device: &str) -> Option<StateReport> {
    stage.statuses().into_iter().find(|r| r.device == device)
}

/// Whether `device` itself reports release `sequence` committed.
fn committed(stage: &Stage, device: &str, sequence: u64) -> bool {
    own(stage, device).is_some_and(|r| {
        r.phase == Phase::Committed && r.current.as_ref().map(|c| c.sequence) == Some(sequence)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_device_commits_a_release_its_ring_does_not_run_and_follows_the_ring_after_unpin() {
    // Bakes of a day on the controller's clock: release 2 stays in canary unless the test
    // jumps the clock, so broad keeps running release 1.
    let spec = StageSpec::new(
        BrokerKind::Embedded,
        vec![
            ring("canary", &[100.0], "1d", 1, 0.0),
            ring("broad", &[100.0], "1d", 1, 0.0),
        ],
        &[1, 1],
    );
    let Some(stage) = Stage::start(spec).await else {
        return;
    };
    stage.complete(1, "1d").await;
    let r2 = stage.submit(2, AppHealth::Healthy, |_| {}).await;
    let canary = device_id("canary", 0);
    let broad = device_id("broad", 0);
    stage
        .wait_until("canary commits release 2", 60, |s| committed(s, &canary, 2))
        .await;
    // The controller bakes from the moment it sees the gate met (a day on its clock).
    stage
        .wait_until("canary bakes release 2", 30, |s| s.phase(&r2) == "baking")
        .await;
    assert!(committed(&stage, &broad, 1));

    let pin = stage
        .controller()
        .engine()
        .pin(broad.clone(), format!("{APP}-2"), approver())
        .await
        .expect("pin accepted");
    stage
        .wait_until("pinned broad device commits release 2", 60, |s| {
            committed(s, &broad, 2)
        })
        .await;
    let pin_id = pin.directive.rollout_id.clone();
    assert_eq!(
        own(&stage, &broad).and_then(|r| r.rollout_id),
        Some(pin_id.clone()),
        "the device works for the pin, not its ring"
    );
    stage
        .wait_until("the controller sees the pinned commit", 30, |s| {
            s.controller_view(&broad).is_some_and(|r| {
                r.phase == Phase::Committed && r.rollout_id.as_deref() == Some(pin_id.as_str())
            })
        })
        .await;
    assert_eq!(stage.phase(&r2), "baking", "the ring rollout did not move");

    stage
        .controller()
        .engine()
        .unpin(broad.clone(), approver())
        .await
        .expect("unpin accepted");
    stage
        .wait_until(
            "unpinned broad device follows its ring back to release 1",
            60,
            |s| committed(s, &broad, 1),
        )
        .await;
    assert!(committed(&stage, &canary, 2), "canary untouched by the pin");
    stage.shutdown().await;
}
