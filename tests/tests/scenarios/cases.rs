//! The end-to-end cases of ACCEPTANCE.md, written once and run against both brokers
//! (`scenarios.rs`: embedded rumqttd; `scenarios_mosquitto.rs`: the shipped Mosquitto config
//! over mutual TLS). Every case runs the real controller, a real broker and real agents;
//! each returns early (skipped, with a message) only when Mosquitto is absent outside CI.

use ringcast::kit::AppHealth;
use ringcast_proto::Phase;
use ringcast_tests::sim_stage::{ring, BrokerKind, Stage, StageSpec, APP};
use std::time::{Duration, Instant};

/// Three rings of `n` devices each; every gate needs all of them and tolerates no failure.
fn three_rings(kind: BrokerKind, n: usize) -> StageSpec {
    let m = n as u32;
    StageSpec::new(
        kind,
        vec![
            ring("canary", &[100.0], "1m", m, 0.0),
            ring("early", &[100.0], "1m", m, 0.0),
            ring("broad", &[100.0], "1m", m, 0.0),
        ],
        &[n, n, n],
    )
}

fn version_of(stage: &Stage, device: &str) -> Option<String> {
    stage.fleet.device(device).and_then(|d| d.current_version())
}

/// ACCEPTANCE 21: a bad release reaches canary → the gate halts the rollout within one second
/// of the deciding report; no device outside canary receives it.
pub async fn acceptance_21_bad_release_halts_at_canary(kind: BrokerKind) {
    let Some(stage) = Stage::start(three_rings(kind, 2)).await else {
        return;
    };
    stage.complete(1, "1m").await;
    let bad = stage.submit(2, AppHealth::Broken, |_| {}).await;

    // Watch the controller's device table and the rollout together: the deciding report is
    // the first failure of release 2 the controller ingests.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut deciding: Option<Instant> = None;
    let halted_at = loop {
        let failure_seen = ["canary-000", "canary-001"].iter().any(|d| {
            stage.controller_view(d).is_some_and(|r| {
                r.phase.is_failure() && r.target.as_ref().map(|t| t.sequence) == Some(2)
            })
        });
        if failure_seen && deciding.is_none() {
            deciding = Some(Instant::now());
        }
        if stage.phase(&bad) == "halted" {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "no halt\n{}", stage.dump());
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let deciding = deciding.unwrap_or(halted_at);
    let delay = halted_at.saturating_duration_since(deciding);
    assert!(
        delay < Duration::from_secs(1),
        "halted {delay:?} after the deciding report"
    );

    // Canary devices revert locally, back on v1; the rest never hear of v2.
    stage
        .wait_until("both canary devices reverted to 1.1.0", 30, |s| {
            s.count(Phase::Reverted, 2) == 2
        })
        .await;
    for d in ["canary-000", "canary-001"] {
        assert_eq!(version_of(&stage, d).as_deref(), Some("1.1.0"), "{d}");
    }
    // Once the engine has looked at the jumped clock, nobody outside canary was offered
    // release 2 (the agents' statuses say what each one was ever asked to do).
    stage.advance("10m");
    stage.settle().await;
    for r in stage.statuses() {
        if r.ring != "canary" {
            assert_ne!(
                r.target.as_ref().map(|t| t.sequence),
                Some(2),
                "{} in {} received the bad release",
                r.device,
                r.ring
            );
            assert_eq!(r.current.as_ref().map(|c| c.sequence), Some(1));
        }
    }
    let ro = stage.rollout(&bad);
    assert_eq!(ro.rings_reached, vec!["canary".to_owned()]);
    let st = stage.controller().shared().state.read().unwrap().clone();
    for ring in ["early", "broad"] {
        assert_eq!(
            st.rings
                .get(ring)
                .and_then(|d| d.release_id.clone())
                .as_deref(),
            Some(format!("{APP}-1").as_str()),
            "{ring} directive changed"
        );
    }
    stage.shutdown().await;
}

/// Two rings of one device each, for the fault cases (a single device makes the moment of
/// the fault exact).
fn small(kind: BrokerKind, bake: &str) -> StageSpec {
    StageSpec::new(
        kind,
        vec![
            ring("canary", &[100.0], bake, 1, 0.0),
            ring("broad", &[100.0], bake, 1, 0.0),
        ],
        &[1, 1],
    )
}

/// ACCEPTANCE 13: a health check that hangs past its timeout → the device reverts locally,
/// with no broker reachable; the report arrives when the broker is back.
pub async fn acceptance_13_hanging_health_check_reverts_without_broker(kind: BrokerKind) {
    let Some(mut stage) = Stage::start(small(kind, "1m")).await else {
        return;
    };
    stage.complete(1, "1m").await;
    let id = stage
        .submit(2, AppHealth::Hangs, |r| {
            r.check_timeout = Duration::from_secs(1);
            r.interval = Duration::from_millis(800);
            r.probation = Duration::from_secs(5);
        })
        .await;
    stage
        .wait_until("canary-000 in probation of release 2", 30, |s| {
            s.count(Phase::Probation, 2) == 1
        })
        .await;
    stage.cut_network();
    let cut_at = Instant::now();
    stage
        .wait_until(
            "canary-000 reverted while the broker is unreachable",
            20,
            |s| s.count(Phase::Reverted, 2) == 1,
        )
        .await;
    assert_eq!(version_of(&stage, "canary-000").as_deref(), Some("1.1.0"));
    let local = stage.fleet.device("canary-000").unwrap().status();
    let err = local
        .last_error
        .expect("a reverted report carries its error");
    assert!(
        err.detail.contains("timed out") || err.detail.contains("timeout"),
        "evidence names the timeout: {err:?}"
    );
    assert!(
        !stage
            .controller_view("canary-000")
            .is_some_and(|r| r.phase == Phase::Reverted),
        "the controller cannot have heard of the revert with the network cut"
    );
    eprintln!("reverted {:?} after the cut", cut_at.elapsed());
    stage.restore_network();
    stage
        .wait_until("the controller receives the revert", 30, |s| {
            s.controller_view("canary-000")
                .is_some_and(|r| r.phase == Phase::Reverted)
        })
        .await;
    stage
        .wait_until("the rollout halts", 10, |s| s.phase(&id) == "halted")
        .await;
    stage.shutdown().await;
}

/// ACCEPTANCE 14: the new version breaks the network (it goes down as the release activates)
/// → the revert still happens, and the report, with its evidence, arrives once the network is
/// back.
pub async fn acceptance_14_release_that_breaks_network_still_reverts_and_reports_later(
    kind: BrokerKind,
) {
    let Some(mut stage) = Stage::start(small(kind, "1m")).await else {
        return;
    };
    stage.complete(1, "1m").await;
    let id = stage
        .submit(2, AppHealth::Broken, |r| {
            r.interval = Duration::from_millis(1500);
            r.probation = Duration::from_secs(5);
        })
        .await;
    stage
        .wait_until("canary-000 activates release 2", 30, |s| {
            s.count(Phase::Installing, 2) + s.count(Phase::Probation, 2) == 1
        })
        .await;
    stage.cut_network();
    stage
        .wait_until("canary-000 reverted offline", 20, |s| {
            s.count(Phase::Reverted, 2) == 1
        })
        .await;
    assert_eq!(version_of(&stage, "canary-000").as_deref(), Some("1.1.0"));
    // The revert ran while the network was cut (it took the probation rounds above): had
    // anything gone round the cut, the controller would hold the report by now.
    assert!(!stage
        .controller_view("canary-000")
        .is_some_and(|r| r.phase == Phase::Reverted));
    stage.restore_network();
    stage
        .wait_until("the revert report arrives", 30, |s| {
            s.controller_view("canary-000")
                .is_some_and(|r| r.phase == Phase::Reverted)
        })
        .await;
    // The report carries the evidence: which check failed and the tail of its output.
    let seen = stage.controller_view("canary-000").unwrap();
    let err = seen.last_error.expect("reverted report names its error");
    assert_eq!(err.reason, "health_check_failed", "{err:?}");
    assert!(err.detail.contains("self-test failed"), "{err:?}");
    stage
        .wait_until("the rollout halts", 10, |s| s.phase(&id) == "halted")
        .await;
    // broad never got release 2.
    assert_eq!(
        stage
            .fleet
            .device("broad-000")
            .unwrap()
            .status()
            .current
            .map(|c| c.sequence),
        Some(1)
    );
    stage.shutdown().await;
}

/// ACCEPTANCE 15: the broker restarts mid-rollout → agents and controller reconnect, read
/// retained state, and the rollout completes; no report is lost.
pub async fn acceptance_15_broker_restart_mid_rollout_completes(kind: BrokerKind) {
    let Some(mut stage) = Stage::start(three_rings(kind, 2)).await else {
        return;
    };
    let id = stage.submit(1, AppHealth::Healthy, |_| {}).await;
    stage
        .wait_until("canary committed, rollout baking", 30, |s| {
            s.count(Phase::Committed, 1) == 2 && s.phase(&id) == "baking"
        })
        .await;
    stage.restart_broker(Duration::from_millis(1500)).await;
    let end = stage.drive(&id, "1m", 90).await;
    assert_eq!(end, "completed", "{}", stage.dump());
    assert_eq!(stage.count(Phase::Committed, 1), 6);
    // The controller's tallies came from the reports: every device's committed report is
    // there (none lost across the restart).
    for r in stage.statuses() {
        let seen = stage
            .controller_view(&r.device)
            .expect("report reached the controller");
        assert_eq!(seen.phase, Phase::Committed, "{}", r.device);
        assert_eq!(seen.current.map(|c| c.sequence), Some(1), "{}", r.device);
    }
    // A second restart, with nothing in flight: a fresh retained read changes nothing.
    stage.restart_broker(Duration::from_millis(500)).await;
    stage
        .wait_until("controller back in touch", 30, |s| s.known_devices() == 6)
        .await;
    assert_eq!(stage.phase(&id), "completed");
    stage.shutdown().await;
}

/// ACCEPTANCE 16: the controller is stopped mid-bake → on restart the rollout resumes at the
/// same step; no ring is promoted twice; the audit log verifies.
pub async fn acceptance_16_controller_restart_mid_bake_resumes_same_step(kind: BrokerKind) {
    let Some(mut stage) = Stage::start(three_rings(kind, 1)).await else {
        return;
    };
    let id = stage.submit(1, AppHealth::Healthy, |_| {}).await;
    // Let canary pass and early start baking. A bake counts from its gate being met, so the
    // clock jumps only once the controller bakes canary.
    stage
        .wait_until("canary baking", 30, |s| {
            matches!(
                &s.rollout(&id).state,
                ringcast_controller::model::RolloutState::Active { ring, .. } if ring == "canary"
            ) && s.phase(&id) == "baking"
        })
        .await;
    stage.advance("2m");
    stage
        .wait_until("early committed and baking", 30, |s| {
            matches!(
                &s.rollout(&id).state,
                ringcast_controller::model::RolloutState::Active { ring, .. } if ring == "early"
            ) && s.phase(&id) == "baking"
                && s.count(Phase::Committed, 1) >= 2
        })
        .await;
    let before = stage.rollout(&id);
    stage.stop_controller().await;
    // Time passes while it is down, still inside the bake.
    stage.advance("30s");
    stage.start_controller().await;
    stage.settle().await;
    let after = stage.rollout(&id);
    assert_eq!(
        after.state, before.state,
        "resumed at the same ring, step and bake start"
    );
    let end = stage.drive(&id, "1m", 60).await;
    assert_eq!(end, "completed");
    let log = stage.controller().shared().audit.export().unwrap();
    let entries = ringcast_controller::audit::verify(&log).expect("audit log intact");
    for ring in ["canary", "early"] {
        let promotions = entries
            .iter()
            .filter(|e| {
                e.action == "promote"
                    && e.rollout_id.as_deref() == Some(id.as_str())
                    && e.ring.as_deref() == Some(ring)
            })
            .count();
        assert_eq!(promotions, 1, "{ring} promoted {promotions} times");
    }
    assert_eq!(stage.count(Phase::Committed, 1), 3);
    stage.shutdown().await;
}

/// ACCEPTANCE 20 (controller side, both brokers): a report published on one device's topic
/// that claims to be another device is attributed to the topic's device only. With Mosquitto
/// the broker's ACL also refuses a device publishing on another device's topic, so the
/// forgery never reaches the controller (the ACL itself is proven in `mosquitto_acl.rs`).
pub async fn acceptance_20_reports_attributed_only_to_topic_device(kind: BrokerKind) {
    let Some(stage) = Stage::start(small(kind, "1m")).await else {
        return;
    };
    stage.complete(1, "1m").await;
    let victim = "canary-000";
    let real = stage.controller_view(victim).expect("victim reported");
    let mut forged = real.clone();
    forged.phase = Phase::Reverted;
    forged.device = victim.into();
    let topics = ringcast_proto::Topics::for_fleet(ringcast_tests::sim_stage::FLEET).unwrap();
    let mut intruder = match stage.lab() {
        Some(lab) => {
            lab.certs().add_devices(&["intruder-1"]).unwrap();
            lab.connect_device("intruder-1").await
        }
        None => {
            let port = stage.config.broker.as_ref().unwrap().port;
            ringcast_tests::mqtt::TestClient::connect(
                ringcast_tests::mqtt::plain_options("intruder-1", "127.0.0.1", port),
                Duration::from_secs(10),
            )
            .await
            .unwrap()
        }
    };
    // 1. On its own topic, claiming to be the victim: attributed to the intruder's topic.
    let _ = intruder
        .publish(
            &topics.state("intruder-1"),
            forged.to_bytes(),
            true,
            Duration::from_secs(5),
        )
        .await;
    // 2. On the victim's topic: Mosquitto's ACL drops it; the embedded broker has no ACL, so
    //    there the controller attributes it to the victim (the topic is the only identity).
    let _ = intruder
        .publish(
            &topics.state(victim),
            forged.to_bytes(),
            true,
            Duration::from_secs(5),
        )
        .await;
    match kind {
        BrokerKind::Mosquitto => {
            // Positive control after the forgery, on the same connection: Mosquitto keeps one
            // client's publications in order, so once this arrives, the forgery would have.
            let mut marker = forged.clone();
            marker.seq += 1;
            marker.phase = Phase::Idle;
            let _ = intruder
                .publish(
                    &topics.state("intruder-1"),
                    marker.to_bytes(),
                    true,
                    Duration::from_secs(5),
                )
                .await;
            stage
                .wait_until("the intruder's marker after the forgery arrives", 10, |s| {
                    s.controller_view("intruder-1")
                        .is_some_and(|r| r.seq == marker.seq)
                })
                .await;
            assert_eq!(
                stage.controller_view(victim).map(|r| r.phase),
                Some(Phase::Committed),
                "a forged report on the victim's topic got through the ACL"
            );
            assert!(
                stage
                    .controller_view("intruder-1")
                    .is_some_and(|r| r.device == victim && r.phase == Phase::Idle),
                "the intruder's own-topic report is kept under the intruder"
            );
        }
        BrokerKind::Embedded | BrokerKind::MosquittoPlain => {
            // No ACL here: the topic is the only identity the controller has, so the report
            // on the intruder's topic is the intruder's, whatever its payload claims.
            stage
                .wait_until("intruder's own-topic report is attributed to it", 10, |s| {
                    s.controller_view("intruder-1")
                        .is_some_and(|r| r.device == victim && r.phase == Phase::Reverted)
                })
                .await;
        }
    }
    // However the payloads lie, the controller counts exactly the devices named by topics:
    // the fleet's two plus the intruder, never a second record for the victim.
    let ids: Vec<String> = {
        let d = stage.controller().shared().devices.read().unwrap();
        let mut v: Vec<String> = d.keys().cloned().collect();
        v.sort();
        v
    };
    assert_eq!(
        ids,
        ["broad-000", "canary-000", "intruder-1"],
        "device records"
    );
    stage.shutdown().await;
}

/// A child process killed with SIGKILL when dropped (also when a test panics).
struct Child(std::process::Child);

impl Child {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// ACCEPTANCE 11: an agent killed with SIGKILL mid-rollout resumes or reverts on restart;
/// `current` always points at a complete release; the state report is right. The device runs
/// in a `ringcast-sim` child process (sled store) so the kill is a real SIGKILL.
pub async fn acceptance_11_agent_sigkilled_mid_install_resumes_or_reverts(
    kind: BrokerKind,
    sim: &std::path::Path,
) {
    let mut spec = small(kind, "1m");
    // canary-000 runs in the child process; broad-000 in process.
    spec.devices[0].1 = 0;
    spec.external = vec!["canary-000".into()];
    spec.rings[0].gate.min_reports = 1;
    let Some(stage) = Stage::start(spec).await else {
        return;
    };
    let data = stage.dir().join("sim");
    let spawn = || {
        Child(
            stage
                .sim_command(sim, "canary", 1, &data)
                .spawn()
                .expect("ringcast-sim starts"),
        )
    };
    let mut child = spawn();
    stage
        .wait_until("the simulated device reports", 30, |s| {
            s.controller_view("canary-000").is_some()
        })
        .await;
    let current = |data: &std::path::Path| {
        std::fs::read_to_string(data.join("canary-000/install/current/VERSION"))
            .ok()
            .map(|s| s.trim().to_owned())
    };
    stage.complete(1, "1m").await;
    assert_eq!(current(&data).as_deref(), Some("1.1.0"));

    // Healthy release 2: kill in probation, restart: the install is repeated and commits.
    let id = stage
        .submit(2, AppHealth::Healthy, |r| {
            r.probation = Duration::from_secs(3);
        })
        .await;
    stage
        .wait_until("canary-000 in probation of 2 (controller view)", 30, |s| {
            s.controller_view("canary-000")
                .is_some_and(|r| r.phase == Phase::Probation)
        })
        .await;
    child.kill();
    let v = current(&data);
    assert!(
        matches!(v.as_deref(), Some("1.1.0") | Some("1.2.0")),
        "current must be a complete release after the kill, got {v:?}"
    );
    let mut child = spawn();
    let end = stage.drive(&id, "1m", 60).await;
    assert_eq!(end, "completed", "{}", stage.dump());
    assert_eq!(current(&data).as_deref(), Some("1.2.0"));
    let seen = stage.controller_view("canary-000").unwrap();
    assert_eq!(seen.phase, Phase::Committed);
    assert_eq!(seen.current.map(|c| c.sequence), Some(2));

    // Broken release 3: kill as soon as it is worked on (download, staging or install), then
    // again in probation; after the restarts it reverts to 2 on its own.
    let bad = stage
        .submit(3, AppHealth::Broken, |r| {
            r.interval = Duration::from_millis(1500);
            r.probation = Duration::from_secs(5);
        })
        .await;
    stage
        .wait_until("canary-000 picks up release 3", 30, |s| {
            s.controller_view("canary-000")
                .is_some_and(|r| r.target.as_ref().map(|t| t.sequence) == Some(3))
        })
        .await;
    child.kill();
    assert!(matches!(
        current(&data).as_deref(),
        Some("1.2.0") | Some("1.3.0")
    ));
    let child = spawn();
    stage
        .wait_until("rollout of 3 halts after the revert", 60, |s| {
            s.phase(&bad) == "halted"
        })
        .await;
    stage
        .wait_until("canary-000 reports reverted to 2", 30, |s| {
            s.controller_view("canary-000").is_some_and(|r| {
                r.phase == Phase::Reverted && r.current.as_ref().map(|c| c.sequence) == Some(2)
            })
        })
        .await;
    assert_eq!(current(&data).as_deref(), Some("1.2.0"));
    drop(child);
    stage.shutdown().await;
}

/// The rollout works end to end with every component on the wire: v1 then v2 through three
/// rings, every device committing each (over mutual TLS through the shipped Mosquitto config
/// in the Mosquitto variant).
pub async fn rollout_completes_end_to_end(kind: BrokerKind) {
    let Some(stage) = Stage::start(three_rings(kind, 2)).await else {
        return;
    };
    stage.complete(1, "1m").await;
    stage.complete(2, "1m").await;
    for d in stage.fleet.devices() {
        assert_eq!(d.current_version().as_deref(), Some("1.2.0"), "{}", d.id);
        let seen = stage.controller_view(&d.id).unwrap();
        assert_eq!(seen.phase, Phase::Committed);
        assert_eq!(seen.current.map(|c| c.sequence), Some(2));
    }
    stage.shutdown().await;
}
