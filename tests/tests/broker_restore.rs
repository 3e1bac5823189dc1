//! ACCEPTANCE 25: a broker killed (SIGKILL) and restored from an older persistence file. The
//! shipped Mosquitto config (mutual TLS, ACL) saves retained messages every
//! `autosave_interval`; a crash brings back retained state reports from before the last
//! phase changes. The controller never takes them for news (each report carries a `seq`
//! that only grows), the agents publish their state again on reconnect so the broker's
//! retained copy is right again, and the rollout completes.

use ringcast::kit::AppHealth;
use ringcast_proto::{Clock, Percent, Phase, StateReport, Topics};
use ringcast_tests::sim_stage::{ring, BrokerKind, Stage, StageSpec, FLEET};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Committed devices of `rollout` in `ring` as the controller counts them.
fn committed(stage: &Stage, rollout: &str, ring: &str) -> u32 {
    let r = stage.rollout(rollout);
    let devices = stage
        .controller()
        .shared()
        .devices
        .read()
        .expect("device table");
    ringcast_controller::engine::tally(
        &devices,
        &r,
        ring,
        Percent::FULL,
        stage.clock.now(),
        ringcast_proto::jiff::SignedDuration::from_hours(24),
    )
    .committed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restored_from_an_older_save_never_sends_a_device_back_in_time() {
    let rings = vec![
        ring("canary", &[100.0], "1m", 2, 0.0),
        ring("broad", &[100.0], "1h", 2, 0.0),
    ];
    let Some(mut stage) = Stage::start(StageSpec::new(BrokerKind::Mosquitto, rings, &[2, 2])).await
    else {
        return;
    };
    stage.complete(1, "1h").await;
    // The broker's persistence file now holds every device committed on release 1.
    stage.save_broker();

    let r2 = stage.submit(2, AppHealth::Healthy, |_| {}).await;
    stage
        .wait_until("release 2 committed everywhere, broad baking", 60, |s| {
            let broad_reached = s.rollout(&r2).rings_reached.iter().any(|r| r == "broad");
            if !broad_reached {
                // Past canary's bake; broad's (1h) holds the rollout for the rest.
                s.advance("1m");
            }
            broad_reached
                && s.count(Phase::Committed, 2) == 4
                && committed(s, &r2, "broad") == 2
                && s.phase(&r2) == "baking"
        })
        .await;
    let before: HashMap<String, StateReport> = stage
        .fleet
        .devices()
        .iter()
        .map(|d| d.id.clone())
        .filter_map(|id| Some((id.clone(), stage.controller_view(&id)?)))
        .collect();
    assert_eq!(before.len(), 4);

    // Watch the controller's view for any step back, from now until the rollout completes.
    let regressed = Arc::new(AtomicBool::new(false));
    let watcher = {
        let devices = stage.controller().shared().devices.clone();
        let before = before.clone();
        let regressed = regressed.clone();
        tokio::spawn(async move {
            loop {
                {
                    let d = devices.read().expect("device table");
                    for (id, was) in &before {
                        let now = d.get(id).and_then(|r| r.report.as_ref());
                        let back = now.is_none_or(|r| {
                            r.seq < was.seq
                                || r.phase != Phase::Committed
                                || r.current.as_ref().map(|c| c.sequence) != Some(2)
                        });
                        if back {
                            regressed.store(true, Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    // The agents are away while the broker crashes and comes back with the old save, so the
    // controller meets the old retained reports first.
    let ids: Vec<String> = before.keys().cloned().collect();
    for id in &ids {
        stage.fleet.stop(id).await.expect("agent stops");
    }
    let counters = stage.controller().shared().counters.clone();
    let rereads = counters.rereads.load(Ordering::Relaxed);
    stage.crash_broker();
    stage
        .wait_until("the controller re-read the restored broker", 30, |_| {
            counters.rereads.load(Ordering::Relaxed) > rereads
        })
        .await;
    assert!(
        counters.stale_reports.load(Ordering::Relaxed) >= 4,
        "the restored broker re-delivered the release-1 reports; the controller must have \
         recognised them as older\n{}",
        stage.dump()
    );
    assert_eq!(
        committed(&stage, &r2, "broad"),
        2,
        "broad lost its commits\n{}",
        stage.dump()
    );
    assert_eq!(stage.phase(&r2), "baking");

    // Back online, every agent publishes its state again: the broker's retained copy is the
    // current one once more (not the one from the save).
    for id in &ids {
        stage.fleet.restart(id).expect("agent restarts");
    }
    let lab = stage.lab().expect("Mosquitto lab");
    let mut observer = lab.connect_observer("restore-observer").await;
    let topics = Topics::for_fleet(FLEET).expect("fleet name");
    for id in &ids {
        let want = before[id].seq;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            observer
                .subscribe_ok(&topics.state(id), Duration::from_secs(5))
                .await
                .expect("observer subscribes");
            let p = observer
                .expect_publish(&topics.state(id), Duration::from_secs(5))
                .await
                .expect("a retained report");
            let r = StateReport::parse(&p.payload).expect("report parses");
            if r.seq > want && r.current.as_ref().map(|c| c.sequence) == Some(2) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id}: the broker still retains seq {} (phase {}, release {:?}), not the \
                 agent's current state",
                r.seq,
                r.phase.as_str(),
                r.current.map(|c| c.sequence)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let end = stage.drive(&r2, "1h", 60).await;
    assert_eq!(end, "completed", "{}", stage.dump());
    watcher.abort();
    assert!(
        !regressed.load(Ordering::Relaxed),
        "the controller showed a device back on an older report\n{}",
        stage.dump()
    );
    stage.shutdown().await;
}

/// The agent publishes its state again on every reconnect, not only at start: whatever a
/// broker retained for it meanwhile (here a stale report put there by hand, as a restored
/// save would) is replaced by the device's current state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_publishes_its_state_again_on_every_reconnect() {
    ringcast_tests::test_logs();
    let rings = vec![ring("canary", &[100.0], "1m", 1, 0.0)];
    let Some(mut stage) = Stage::start(StageSpec::new(BrokerKind::Embedded, rings, &[1])).await
    else {
        return;
    };
    stage.complete(1, "1m").await;
    let id = "canary-000";
    let current = stage.controller_view(id).expect("reported");
    let topics = Topics::for_fleet(FLEET).expect("fleet name");
    let port = ringcast_tests::synthetic::port_of(stage.broker_url()).expect("port");
    let mut client = ringcast_tests::mqtt::TestClient::connect(
        ringcast_tests::mqtt::plain_options("rewriter", "127.0.0.1", port),
        Duration::from_secs(10),
    )
    .await
    .expect("test client");
    let stale_seen = stage
        .controller()
        .shared()
        .counters
        .stale_reports
        .load(Ordering::Relaxed);
    let mut stale = current.clone();
    stale.seq = 1;
    stale.phase = Phase::Downloading;
    client
        .publish(
            &topics.state(id),
            stale.to_bytes(),
            true,
            Duration::from_secs(5),
        )
        .await
        .expect("stale report retained");
    stage
        .wait_until(
            "the controller saw the stale report and ignored it",
            10,
            |s| {
                s.controller()
                    .shared()
                    .counters
                    .stale_reports
                    .load(Ordering::Relaxed)
                    > stale_seen
            },
        )
        .await;
    assert_eq!(
        stage.controller_view(id).map(|r| r.seq),
        Some(current.seq),
        "a stale report replaced a newer one"
    );

    // The connection drops and comes back: the agent says where it is again.
    stage.cut_network();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stage.restore_network();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut observer = ringcast_tests::mqtt::TestClient::connect(
            ringcast_tests::mqtt::plain_options("observer", "127.0.0.1", port),
            Duration::from_secs(10),
        )
        .await
        .expect("observer");
        observer
            .subscribe_ok(&topics.state(id), Duration::from_secs(5))
            .await
            .expect("subscribe");
        let p = observer
            .expect_publish(&topics.state(id), Duration::from_secs(5))
            .await
            .expect("retained report");
        let r = StateReport::parse(&p.payload).expect("parses");
        observer.disconnect().await;
        if r.seq > current.seq && r.phase == Phase::Committed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after reconnecting, the broker still retains seq {} ({}) for {id}",
            r.seq,
            r.phase.as_str()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stage.shutdown().await;
}
