//! ACCEPTANCE.md case 27 end to end: the real controller, the embedded broker and real agents
//! (sled stores, real bundles, health checks, artifact downloads). A canary ring with
//! `on_failure = "rollback"` gets a bad release: one device fails its health check, the other
//! has its own delivery window closed and waits `staged`. The gate halts the rollout and
//! sends the ring back to the release the staged device already runs; within seconds the
//! controller's device table must show that device `idle` on its release with no target —
//! not `staged` on the bad release for ever (issue 8, item 4).

use ringcast::kit::AppHealth;
use ringcast_agent::fleet::{self, StoreKind};
use ringcast_agent::{AgentConfig, AgentHandle};
use ringcast_controller::config::OnFailure;
use ringcast_proto::jiff::{civil::Weekday, tz::TimeZone, Timestamp};
use ringcast_proto::{Phase, StateReport, SystemClock, Window};
use ringcast_tests::sim_stage::{ring, BrokerKind, Stage, StageSpec};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The device the scenario runs itself, so it can restart it with its window closed.
const STAGED: &str = "canary-100";
/// The fleet's own canary device, which fails the bad release's health check.
const FAILING: &str = "canary-000";

fn start_agent(cfg: &AgentConfig) -> AgentHandle {
    fleet::start_agent(cfg, StoreKind::Sled, Arc::new(SystemClock))
        .unwrap_or_else(|e| panic!("agent {}: {e}", cfg.device_id))
}

/// A window that is certainly closed now and for two days: one minute, three days ahead
/// (UTC, the device's zone).
fn closed_window() -> Window {
    let day = Timestamp::now()
        .to_zoned(TimeZone::UTC)
        .weekday()
        .wrapping_add(3);
    let name = match day {
        Weekday::Monday => "Mon",
        Weekday::Tuesday => "Tue",
        Weekday::Wednesday => "Wed",
        Weekday::Thursday => "Thu",
        Weekday::Friday => "Fri",
        Weekday::Saturday => "Sat",
        Weekday::Sunday => "Sun",
    };
    Window::parse(&format!("{name} 03:00-03:01")).expect("window")
}

fn seq(r: &Option<ringcast_proto::ReleaseRef>) -> Option<u64> {
    r.as_ref().map(|x| x.sequence)
}

fn show(r: &Option<StateReport>) -> String {
    match r {
        Some(r) => format!(
            "{} current={:?} target={:?} rollout={:?}",
            r.phase.as_str(),
            seq(&r.current),
            seq(&r.target),
            r.rollout_id
        ),
        None => "no report".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_rolled_back_while_a_device_waits_staged_shows_it_idle_on_its_release() {
    // Both canary devices count: the first failure of two crosses a gate of 0 %.
    let mut canary = ring("canary", &[100.0], "1m", 2, 0.0);
    canary.on_failure = OnFailure::Rollback;
    let mut spec = StageSpec::new(BrokerKind::Embedded, vec![canary], &[1]);
    spec.external = vec![STAGED.into()];
    let Some(stage) = Stage::start(spec).await else {
        return;
    };
    let mut cfg = stage.external_device_config(STAGED, "canary");
    let agent = start_agent(&cfg);
    stage
        .wait_until("the controller knows the staged device", 30, |s| {
            s.controller_view(STAGED).is_some()
        })
        .await;

    // Release 1 everywhere: the release the ring will be rolled back to.
    stage.complete(1, "1m").await;
    let own = agent.status();
    assert_eq!(
        (own.phase, seq(&own.current)),
        (Phase::Committed, Some(1)),
        "{own:#?}"
    );

    // The device's own delivery window closes (a config change: restart with it).
    agent.shutdown().await.expect("agent stops");
    cfg.windows = vec![closed_window()];
    let agent = start_agent(&cfg);
    let mut watch = agent.watch();

    // The bad release: the failing device needs a health round (1.5 s) to fail it, long
    // after the other has downloaded and staged it.
    let bad = stage
        .submit(2, AppHealth::Broken, |r| {
            r.interval = Duration::from_millis(1500);
        })
        .await;
    tokio::time::timeout(
        Duration::from_secs(30),
        watch.wait_for(|s| s.phase == Phase::Staged && seq(&s.target) == Some(2)),
    )
    .await
    .unwrap_or_else(|_| panic!("{STAGED} never staged release 2\n{}", stage.dump()))
    .expect("agent running");

    stage
        .wait_until("the gate rolls the ring back", 30, |s| {
            s.phase(&bad) == "rolled_back"
        })
        .await;
    let rolled_back = Instant::now();
    let rollback_id = format!("{bad}-rollback");
    stage
        .wait_until(
            &format!("the controller shows {STAGED} idle on release 1, no target"),
            5,
            |s| {
                s.controller_view(STAGED).is_some_and(|r| {
                    r.phase == Phase::Idle
                        && seq(&r.current) == Some(1)
                        && r.target.is_none()
                        && r.rollout_id.as_deref() == Some(rollback_id.as_str())
                })
            },
        )
        .await;
    eprintln!(
        "{STAGED} shown idle {:?} after the rollback",
        rolled_back.elapsed()
    );

    // The device agrees, runs release 1, and kept nothing of release 2.
    let own = agent.status();
    assert_eq!(own.phase, Phase::Idle);
    assert_eq!(seq(&own.current), Some(1));
    assert_eq!(own.target, None);
    let version = std::fs::read_to_string(cfg.install_root().join("current/VERSION"))
        .expect("current release");
    assert_eq!(version.trim(), "1.1.0");
    let left: Vec<_> = std::fs::read_dir(cfg.data_dir.join("artifacts"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "release 2's artifact removed: {left:?}");
    // The failing device reverted on its own and is on release 1 too.
    let failing = stage.controller_view(FAILING);
    assert!(
        failing.as_ref().is_some_and(|r| r.phase == Phase::Reverted
            && seq(&r.current) == Some(1)
            && seq(&r.target) == Some(2)),
        "{FAILING}: {}",
        show(&failing)
    );

    agent.shutdown().await.expect("agent stops");
    stage.shutdown().await;
}
