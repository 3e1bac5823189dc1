//! Issue 10, a launch end to end: real agents on a real broker. Release 2 is submitted as a
//! launch; every ring of three downloads and verifies it at once and waits, staged. The
//! launch is moved once; at the (moved) time canary activates, and early and broad follow
//! ring by ring from what they staged: no device downloads after the launch time.

use ringcast::kit::AppHealth;
use ringcast_controller::model::LaunchMode;
use ringcast_proto::jiff::{SignedDuration, Timestamp};
use ringcast_proto::Phase;
use ringcast_tests::sim_stage::{ring, BrokerKind, Stage, StageSpec};
use std::collections::BTreeSet;
use std::time::Duration;

const RINGS: [&str; 3] = ["canary", "early", "broad"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_prestages_three_rings_is_moved_once_then_activates_from_staged_bytes() {
    ringcast_tests::test_logs();
    // broad ramps in two steps, the first holding one of its two devices: that device
    // activates first, the other only at broad's second step, long after the launch, and
    // still it stages before the launch like everyone else (the directive's stage_percent).
    let first_step = [50.0, 30.0, 70.0, 20.0, 80.0, 10.0, 90.0]
        .into_iter()
        .find(|p| {
            let pct = ringcast_proto::Percent::from_f64(*p).expect("percent");
            ["broad-000", "broad-001"]
                .iter()
                .filter(|d| ringcast_proto::in_ramp("app-2", d, pct))
                .count()
                == 1
        })
        .expect("a first step that holds one broad device");
    let spec = StageSpec::new(
        BrokerKind::Embedded,
        RINGS
            .iter()
            .map(|r| match *r {
                "broad" => ring(r, &[first_step, 100.0], "1m", 2, 0.0),
                _ => ring(r, &[100.0], "1m", 2, 0.0),
            })
            .collect(),
        &[2, 2, 2],
    );
    let Some(stage) = Stage::start(spec).await else {
        return;
    };
    // The controller's clock runs at real speed here (no jumps before the launch), so the
    // agents, on the system clock, see the same launch time.
    let first = Timestamp::now() + SignedDuration::from_secs(60);
    let id = stage
        .submit_scheduled(
            2,
            AppHealth::Healthy,
            |_| {},
            Some(first),
            Some(LaunchMode::Rings),
        )
        .await;
    let staged = |s: &Stage| {
        s.statuses()
            .iter()
            .filter(|r| {
                r.phase == Phase::Staged
                    && r.rollout_id.as_deref() == Some(id.as_str())
                    && r.target.as_ref().is_some_and(|t| t.sequence == 2)
            })
            .count()
    };
    stage
        .wait_until("all six devices of three rings staged", 60, |s| {
            staged(s) == 6
        })
        .await;
    stage
        .wait_until("the controller sees them staged", 30, |s| {
            ringcast_controller::api::rollout_view_of(s.controller(), &id)
                .is_some_and(|v| v.rings.iter().all(|r| r.staged == 2))
        })
        .await;
    let view = ringcast_controller::api::rollout_view_of(stage.controller(), &id).expect("rollout");
    for r in &view.rings {
        assert_eq!(r.staged, 2, "ring {} staged", r.name);
        assert_eq!(
            r.ready_at_launch,
            Some(2),
            "ring {} ready at launch",
            r.name
        );
    }

    // Moved: sooner, a few seconds from now.
    let launch = Timestamp::now() + SignedDuration::from_secs(4);
    stage
        .controller()
        .engine()
        .launch(
            id.clone(),
            Some(launch),
            ringcast_tests::sim_stage::operator(),
        )
        .await
        .expect("launch moved");
    stage
        .wait_until(
            "the moved directive reached every device, still staged",
            30,
            |s| {
                s.statuses().iter().all(|r| {
                    r.phase == Phase::Staged
                        && s.controller_view(&r.device)
                            .is_some_and(|c| c.phase == Phase::Staged)
                })
            },
        )
        .await;
    assert_eq!(staged(&stage), 6, "moving the launch dropped staged work");

    // From the launch on, watch every agent: nobody downloads or verifies again.
    let mut seen_after: BTreeSet<(String, &'static str)> = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let now = Timestamp::now();
        for r in stage.statuses() {
            if now >= launch {
                seen_after.insert((r.device.clone(), r.phase.as_str()));
            } else {
                assert_ne!(
                    r.phase,
                    Phase::Committed,
                    "{} activated before the launch",
                    r.device
                );
            }
        }
        let ro = stage.rollout(&id);
        if !ro.state.is_live() {
            break;
        }
        // Bakes pass on the controller's clock (jumped only after the launch).
        if now >= launch && ro.state.phase() == "baking" {
            stage.advance("1m");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "launch not through in 90 s\n{}",
            stage.dump()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(stage.phase(&id), "completed", "{}", stage.dump());
    let downloads: Vec<_> = seen_after
        .iter()
        .filter(|(_, p)| matches!(*p, "downloading" | "verifying"))
        .collect();
    assert!(
        downloads.is_empty(),
        "downloading after the launch: {downloads:?}"
    );
    assert_eq!(stage.count(Phase::Committed, 2), 6);
    stage.shutdown().await;
}
