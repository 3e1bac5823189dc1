//! The rollout engine over a real broker, real sled and a fake clock: continuous deployment,
//! continuous delivery, delivery windows across DST, store-scheduled activation, acceptance
//! checks, pause/resume/abort and supersede/queue.

mod common;

use common::*;
use ringcast_controller::config::{Check, CheckKind, Promotion};
use ringcast_controller::engine::{RolloutAction, Submit};
use ringcast_proto::{Action, Clock, Dur, Phase, Window};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_walks_canary_early_broad_with_no_human_action() {
    let w = World::new();
    let rings = vec![
        ring("canary", &[50.0, 100.0], "30m", 2, 0.2),
        ring("early", &[100.0], "1h", 2, 0.2),
        ring("broad", &[100.0], "1h", 2, 0.2),
    ];
    let h = w.start(w.config(rings)).await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    // Devices exist (on the old release) before the rollout starts.
    for r in ["canary", "early", "broad"] {
        fleet.report_all(r, 4, None, Phase::Idle, 1).await;
    }
    wait_for(10, "12 devices known", || {
        (h.shared().devices.read().unwrap().len() == 12).then_some(())
    })
    .await;

    let (_, ro) = w.submit_now(&h, 2).await;
    let id = ro.id.clone();
    let d = wait_for(10, "canary directive", || watch.get("canary")).await;
    assert_eq!(d.action, Action::Install);
    assert_eq!(d.percent.as_f64(), 50.0);
    assert_eq!(d.rollout_id, id);
    assert!(watch.get("early").is_none(), "early must wait for canary");

    // Every canary device commits; the step still waits out its bake.
    fleet
        .report_all("canary", 4, Some(&id), Phase::Committed, 2)
        .await;
    wait_for(10, "canary reports", || {
        (count_phase(&h, &id, Phase::Committed) == 4).then_some(())
    })
    .await;
    wait_baking(&h, &id, "canary", 0).await;
    assert_eq!(
        watch.get("canary").unwrap().percent.as_f64(),
        50.0,
        "promoted before the bake ended"
    );
    w.advance("30m");
    wait_for(10, "canary 100%", || {
        watch.get("canary").filter(|d| d.percent.as_f64() == 100.0)
    })
    .await;
    wait_baking(&h, &id, "canary", 1).await;
    w.advance("30m");
    wait_for(10, "early directive", || watch.get("early")).await;
    assert!(watch.get("broad").is_none());

    fleet
        .report_all("early", 4, Some(&id), Phase::Committed, 2)
        .await;
    wait_baking(&h, &id, "early", 0).await;
    w.advance("1h");
    wait_for(10, "broad directive", || watch.get("broad")).await;
    fleet
        .report_all("broad", 4, Some(&id), Phase::Committed, 2)
        .await;
    wait_baking(&h, &id, "broad", 0).await;
    w.advance("1h");
    wait_for(10, "completed", || {
        (phase(&h, &id) == "completed").then_some(())
    })
    .await;
    let audit = h.shared().audit.export().unwrap();
    let entries = ringcast_controller::audit::verify(&audit).unwrap();
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    assert!(
        actions.contains(&"promote") && actions.contains(&"complete"),
        "{actions:?}"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_never_promotes_on_too_little_evidence() {
    let w = World::new();
    let h = w
        .start(w.config(vec![
            ring("canary", &[100.0], "10m", 3, 0.2),
            ring("broad", &[100.0], "10m", 1, 0.2),
        ]))
        .await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    wait_for(10, "canary directive", || watch.get("canary")).await;
    fleet
        .report_all("canary", 2, Some(&ro.id), Phase::Committed, 2)
        .await;
    // Installed is still pending: it does not count as success.
    fleet
        .report("canary-2", "canary", Some(&ro.id), Phase::Probation, 2)
        .await;
    wait_for(10, "3 reports", || {
        (h.shared().devices.read().unwrap().len() == 3).then_some(())
    })
    .await;
    w.advance("1h");
    settle(&w, &h).await;
    assert!(
        watch.get("broad").is_none(),
        "promoted with 2 of 3 required commits"
    );
    assert_eq!(phase(&h, &ro.id), "publishing", "no bake without the gate");
    fleet
        .report("canary-2", "canary", Some(&ro.id), Phase::Committed, 2)
        .await;
    // The bake starts now, when the gate is first met, not when the step was published.
    wait_baking(&h, &ro.id, "canary", 0).await;
    assert!(watch.get("broad").is_none(), "promoted without a bake");
    w.advance("10m");
    wait_for(10, "broad directive", || watch.get("broad")).await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_ring_waits_for_an_approver_and_operator_gets_403() {
    let w = World::new();
    let mut broad = ring("broad", &[100.0], "10m", 1, 0.2);
    broad.promotion = Promotion::Manual;
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 1, 0.2), broad]))
        .await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let op = api(&h, OPERATOR);
    let resp = op
        .submit(&ringcast_controller::api::SubmitRequest {
            envelope: w.release(2),
            start_at: None,
            activate_at: None,
            launch: None,
        })
        .await
        .unwrap();
    let id = resp.rollout.id.clone();
    wait_for(10, "canary directive", || watch.get("canary")).await;
    fleet
        .report("canary-0", "canary", Some(&id), Phase::Committed, 2)
        .await;
    wait_baking(&h, &id, "canary", 0).await;
    w.advance("10m");
    wait_for(10, "waiting approval", || {
        (phase(&h, &id) == "waiting_approval").then_some(())
    })
    .await;
    w.advance("1d");
    settle(&w, &h).await;
    assert!(
        watch.get("broad").is_none(),
        "manual ring published without approval"
    );

    // An operator cannot approve: 403, nothing changes, the attempt is audited.
    let err = op.act(&id, "approve", None).await.unwrap_err();
    assert!(
        err.to_string().contains("403") && err.to_string().contains("forbidden"),
        "{err}"
    );
    let no_token = ringcast_controller::client::Client::new(&h.http_url(), None);
    let err = no_token.act(&id, "approve", None).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    assert_eq!(phase(&h, &id), "waiting_approval");
    assert!(rollout(&h, &id).approvals.is_empty());

    let ok = api(&h, APPROVER).act(&id, "approve", None).await.unwrap();
    assert!(ok
        .rings
        .iter()
        .any(|r| r.name == "broad" && r.approval.as_ref().is_some_and(|a| a.by == "alice")));
    wait_for(10, "broad directive", || watch.get("broad")).await;

    let entries =
        ringcast_controller::audit::verify(&api(&h, VIEWER).audit().await.unwrap()).unwrap();
    let denied = entries
        .iter()
        .find(|e| e.action == "approve" && e.outcome.starts_with("denied"))
        .expect("denied attempt audited");
    assert_eq!(denied.actor, "otto");
    assert!(entries.iter().any(|e| e.action == "approve"
        && e.outcome == "ok"
        && e.actor == "alice"
        && e.ring.as_deref() == Some("broad")));
    assert!(entries
        .iter()
        .any(|e| e.action == "approve" && e.actor == "anonymous"));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_window_follows_berlin_time_across_dst() {
    let w = World::new();
    let mut canary = ring("canary", &[100.0], "10m", 0, 0.2);
    canary.windows = vec![Window::parse("Sat 02:00-04:00").unwrap()];
    canary.timezone = "Europe/Berlin".into();
    // Saturday 2027-03-27 04:30 CET (03:30 UTC): the window just closed. Berlin switches to
    // CEST on Sunday 2027-03-28, so next Saturday's window opens at 00:00 UTC, not 01:00.
    w.clock.set(ts("2027-03-27T03:30:00Z"));
    let h = w.start(w.config(vec![canary])).await;
    let watch = Watcher::start(&w).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    wait_for(10, "waiting window", || {
        (phase(&h, &ro.id) == "waiting_window").then_some(())
    })
    .await;
    for t in [
        "2027-03-27T03:30:00Z",
        "2027-03-28T01:30:00Z",
        "2027-04-02T23:59:00Z",
    ] {
        w.clock.set(ts(t));
        settle(&w, &h).await;
        assert_eq!(phase(&h, &ro.id), "waiting_window", "at {t}");
        assert!(
            watch.get("canary").is_none(),
            "published outside the window at {t}"
        );
    }
    // 02:30 CEST = 00:30 UTC (under CET it would still be 01:30 and closed).
    w.clock.set(ts("2027-04-03T00:30:00Z"));
    let d = wait_for(10, "canary directive inside the window", || {
        watch.get("canary")
    })
    .await;
    assert_eq!(d.activation.timezone.as_deref(), Some("Europe/Berlin"));
    assert_eq!(d.activation.windows.len(), 1);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_scheduled_release_stages_first_and_activates_together() {
    let w = World::new();
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 3, 0.2)]))
        .await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let at = w.clock.now().checked_add(secs(6 * 3600)).unwrap();
    let (_, ro) = h
        .engine()
        .submit(
            Submit {
                envelope: w.release(2),
                start_at: None,
                activate_at: Some(at),
                launch: None,
            },
            ops(),
        )
        .await
        .unwrap();
    let d = wait_for(10, "directive", || watch.get("canary")).await;
    assert_eq!(d.activation.not_before, Some(at));
    // Devices (played here) obey the directive's activation against the same fake clock.
    let step = |phase_if_open: Phase| {
        let now = w.clock.now();
        if d.activation.allows(now, "UTC").unwrap() {
            phase_if_open
        } else {
            Phase::Staged
        }
    };
    let p = step(Phase::Committed);
    assert_eq!(p, Phase::Staged);
    fleet.report_all("canary", 3, Some(&ro.id), p, 2).await;
    wait_for(10, "staged", || {
        (count_phase(&h, &ro.id, Phase::Staged) == 3).then_some(())
    })
    .await;
    w.advance("1h");
    settle(&w, &h).await;
    assert_eq!(count_phase(&h, &ro.id, Phase::Committed), 0);
    assert_eq!(
        phase(&h, &ro.id),
        "publishing",
        "staged devices are not success: no bake yet"
    );
    w.clock.set(at);
    let p = step(Phase::Committed);
    assert_eq!(p, Phase::Committed);
    fleet.report_all("canary", 3, Some(&ro.id), p, 2).await;
    wait_baking(&h, &ro.id, "canary", 0).await;
    w.advance("10m");
    wait_for(10, "completed", || {
        (phase(&h, &ro.id) == "completed").then_some(())
    })
    .await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_acceptance_check_holds_the_ring_and_passing_one_promotes() {
    let w = World::new();
    let flag = w.dir.path().join("suite-passes");
    let mut canary = ring("canary", &[100.0], "10m", 1, 0.2);
    canary.checks = vec![Check {
        name: "suite".into(),
        kind: CheckKind::Command,
        command: vec!["test".into(), "-e".into(), flag.display().to_string()],
        url: None,
        timeout: Dur::secs(10),
    }];
    canary.check_retry = Dur::secs(60);
    let h = w
        .start(w.config(vec![canary, ring("broad", &[100.0], "10m", 1, 0.2)]))
        .await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    wait_for(10, "canary directive", || watch.get("canary")).await;
    fleet
        .report("canary-0", "canary", Some(&ro.id), Phase::Committed, 2)
        .await;
    wait_baking(&h, &ro.id, "canary", 0).await;
    w.advance("10m");
    wait_for(10, "checks failed", || {
        (phase(&h, &ro.id) == "checks_failed").then_some(())
    })
    .await;
    settle(&w, &h).await;
    assert!(
        watch.get("broad").is_none(),
        "promoted past a failing check"
    );
    std::fs::write(&flag, b"ok").unwrap();
    w.advance("1m");
    wait_for(10, "broad directive after the check passes", || {
        watch.get("broad")
    })
    .await;
    let entries = ringcast_controller::audit::verify(&h.shared().audit.export().unwrap()).unwrap();
    assert!(entries.iter().any(|e| e.action == "checks_failed"));
    let at = |action: &str| {
        entries
            .iter()
            .position(|e| e.action == action && e.ring.as_deref() == Some("canary"))
            .unwrap_or_else(|| panic!("no {action} for canary in the audit log"))
    };
    assert!(
        at("checks_passed") < at("promote"),
        "promote audited before checks_passed"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_keeps_failing_halts_after_its_attempts_with_the_ring_list() {
    let w = World::new();
    let seen = w.dir.path().join("devices-seen");
    let mut canary = ring("canary", &[100.0], "10m", 2, 0.2);
    // Fails every time, after writing what it was given: the ring's device list.
    canary.checks = vec![Check {
        name: "suite".into(),
        kind: CheckKind::Command,
        command: vec![
            "sh".into(),
            "-c".into(),
            format!(
                "cp \"$RINGCAST_DEVICES_FILE\" {}; echo attempt $RINGCAST_ATTEMPT; exit 1",
                seen.display()
            ),
        ],
        url: None,
        timeout: Dur::secs(10),
    }];
    canary.check_attempts = 2;
    canary.check_retry = Dur::secs(60);
    let h = w
        .start(w.config(vec![canary, ring("broad", &[100.0], "10m", 1, 0.2)]))
        .await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    wait_for(10, "canary directive", || watch.get("canary")).await;
    fleet
        .report_all("canary", 2, Some(&ro.id), Phase::Committed, 2)
        .await;
    wait_baking(&h, &ro.id, "canary", 0).await;
    w.advance("10m");
    wait_for(10, "first attempt failed", || {
        (phase(&h, &ro.id) == "checks_failed").then_some(())
    })
    .await;
    let list = std::fs::read_to_string(&seen).unwrap();
    let mut devices: Vec<&str> = list.lines().collect();
    devices.sort_unstable();
    assert_eq!(
        devices,
        ["canary-0", "canary-1"],
        "the check got the ring's devices"
    );
    w.advance("1m");
    wait_for(10, "halted after the last attempt", || {
        (phase(&h, &ro.id) == "halted").then_some(())
    })
    .await;
    let r = rollout(&h, &ro.id);
    let reason = match &r.state {
        ringcast_controller::model::RolloutState::Halted { reason } => reason.clone(),
        other => panic!("{other:?}"),
    };
    assert!(reason.contains("suite") && reason.contains("2"), "{reason}");
    assert!(watch.get("broad").is_none());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_progress_resume_continues_abort_holds() {
    let w = World::new();
    let h = w
        .start(w.config(vec![
            ring("canary", &[100.0], "10m", 1, 0.2),
            ring("broad", &[100.0], "10m", 1, 0.2),
        ]))
        .await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    wait_for(10, "canary directive", || watch.get("canary")).await;
    fleet
        .report("canary-0", "canary", Some(&ro.id), Phase::Committed, 2)
        .await;
    wait_baking(&h, &ro.id, "canary", 0).await;
    h.engine()
        .act(ro.id.clone(), RolloutAction::Pause, None, ops())
        .await
        .unwrap();
    w.advance("1h");
    settle(&w, &h).await;
    assert!(watch.get("broad").is_none(), "paused rollout promoted");
    h.engine()
        .act(ro.id.clone(), RolloutAction::Resume, None, ops())
        .await
        .unwrap();
    wait_for(10, "broad after resume", || watch.get("broad")).await;
    h.engine()
        .act(ro.id.clone(), RolloutAction::Abort, None, ops())
        .await
        .unwrap();
    wait_for(10, "hold on canary", || {
        watch.get("canary").filter(|d| d.action == Action::Hold)
    })
    .await;
    wait_for(10, "hold on broad", || {
        watch.get("broad").filter(|d| d.action == Action::Hold)
    })
    .await;
    assert_eq!(phase(&h, &ro.id), "aborted");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_release_supersedes_when_auto_and_queues_when_manual() {
    // All rings auto: the new release supersedes.
    let w = World::new();
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 1, 0.2)]))
        .await;
    let (_, a) = w.submit_now(&h, 2).await;
    let (_, b) = w.submit_now(&h, 3).await;
    assert_eq!(phase(&h, &a.id), "superseded");
    assert_ne!(phase(&h, &b.id), "queued");
    // A lower sequence is refused.
    let e = h
        .engine()
        .submit(
            Submit {
                envelope: w.release(1),
                start_at: None,
                activate_at: None,
                launch: None,
            },
            ops(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "sequence_not_increasing");
    h.shutdown().await;

    // A manual ring: the new release queues behind the running one.
    let w = World::new();
    let mut broad = ring("broad", &[100.0], "10m", 1, 0.2);
    broad.promotion = Promotion::Manual;
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 1, 0.2), broad]))
        .await;
    let fleet = Fleet::connect(&w).await;
    let (_, a) = w.submit_now(&h, 2).await;
    let (_, b) = w.submit_now(&h, 3).await;
    assert_eq!(phase(&h, &b.id), "queued");
    h.engine()
        .act(a.id.clone(), RolloutAction::Abort, None, ops())
        .await
        .unwrap();
    wait_for(10, "queued rollout starts", || {
        (phase(&h, &b.id) != "queued").then_some(())
    })
    .await;
    drop(fleet);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directives_are_resigned_before_they_expire_and_trust_is_retained() {
    let w = World::new();
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10d", 1, 0.2)]))
        .await;
    let watch = Watcher::start(&w).await;
    h.engine()
        .submit(
            Submit {
                envelope: w.release(2),
                start_at: None,
                activate_at: None,
                launch: None,
            },
            ops(),
        )
        .await
        .unwrap();
    let first = wait_for(10, "canary directive", || watch.get("canary")).await;
    assert!(first.expires_at > w.clock.now());
    // Past half the lifetime the controller re-signs: higher sequence, later expiry.
    w.advance("31m");
    let next = wait_for(10, "re-signed directive", || {
        watch.get("canary").filter(|d| d.sequence > first.sequence)
    })
    .await;
    assert!(next.expires_at > first.expires_at);
    assert!(next.issued_at > first.issued_at);
    assert_eq!(next.rollout_id, first.rollout_id);
    // A week later (the controller kept running) devices are still fed a fresh directive.
    for _ in 0..7 * 48 {
        w.advance("30m");
    }
    let fresh = wait_for(10, "fresh directive a week later", || {
        watch.get("canary").filter(|d| d.expires_at > w.clock.now())
    })
    .await;
    assert!(fresh.sequence > next.sequence);

    // The trust root is published retained: a late subscriber gets it.
    let (c, mut el) = {
        let mut o = rumqttc::MqttOptions::new("late", "127.0.0.1", w.broker_port);
        o.set_max_packet_size(256 * 1024, 256 * 1024);
        rumqttc::AsyncClient::new(o, 10)
    };
    c.subscribe(w.topics.trust(), rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = el.poll().await {
                return p.payload.to_vec();
            }
        }
    })
    .await
    .expect("retained trust root");
    assert_eq!(got, w.fx.trust_env.to_vec());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rollout_publishes_nothing_before_its_start() {
    let w = World::new();
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 1, 0.2)]))
        .await;
    let watch = Watcher::start(&w).await;
    let start = w.clock.now().checked_add(secs(2 * 3600)).unwrap();
    let (_, ro) = h
        .engine()
        .submit(
            Submit {
                envelope: w.release(2),
                start_at: Some(start),
                activate_at: None,
                launch: None,
            },
            ops(),
        )
        .await
        .unwrap();
    w.advance("1h59m");
    settle(&w, &h).await;
    assert_eq!(phase(&h, &ro.id), "pending");
    assert!(
        watch.get("canary").is_none(),
        "published before the scheduled start"
    );
    w.advance("1m");
    wait_for(10, "directive at the scheduled start", || {
        watch.get("canary")
    })
    .await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_check_is_posted_the_ring_its_devices_and_the_attempt() {
    use std::sync::{Arc, Mutex};
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = got.clone();
    // Refuses the first attempt, accepts the second.
    let app = axum::Router::new().route(
        "/accept",
        axum::routing::post(move |axum::Json(v): axum::Json<serde_json::Value>| {
            let seen = seen.clone();
            async move {
                let mut s = seen.lock().unwrap();
                s.push(v);
                if s.len() == 1 {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let w = World::new();
    let mut canary = ring("canary", &[100.0], "10m", 2, 0.2);
    canary.checks = vec![Check {
        name: "acceptance".into(),
        kind: CheckKind::Http,
        command: vec![],
        url: Some(format!("http://{addr}/accept")),
        timeout: Dur::secs(10),
    }];
    canary.check_retry = Dur::secs(60);
    let h = w
        .start(w.config(vec![canary, ring("broad", &[100.0], "10m", 1, 0.2)]))
        .await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    wait_for(10, "canary directive", || watch.get("canary")).await;
    fleet
        .report_all("canary", 2, Some(&ro.id), Phase::Committed, 2)
        .await;
    wait_baking(&h, &ro.id, "canary", 0).await;
    w.advance("10m");
    wait_for(10, "first attempt refused (503)", || {
        (phase(&h, &ro.id) == "checks_failed").then_some(())
    })
    .await;
    w.advance("1m");
    wait_for(10, "broad after the second attempt", || watch.get("broad")).await;
    let bodies = got.lock().unwrap().clone();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    for (i, b) in bodies.iter().enumerate() {
        assert_eq!(b["ring"], "canary");
        assert_eq!(b["rollout"], ro.id.as_str());
        assert_eq!(b["release"], "app-2");
        assert_eq!(b["attempt"], i + 1);
        let mut devices: Vec<&str> = b["devices"]
            .as_array()
            .expect("devices is a list")
            .iter()
            .filter_map(|d| d.as_str())
            .collect();
        devices.sort_unstable();
        assert_eq!(devices, ["canary-0", "canary-1"]);
    }
    h.shutdown().await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_applies_every_rule_an_agent_applies_before_anything_changes() {
    let w = World::new();
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 1, 0.2)]))
        .await;
    let url = format!("{}/api/v1/releases", h.http_url());
    let http = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        http.post(&url)
            .bearer_auth(OPERATOR)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let answer = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap();
        (status, v["error"].as_str().unwrap_or_default().to_owned())
    };
    // An envelope over the agents' 64 KiB (88 kB on the wire) inside a body under the
    // request limit: refused on its size, before its signatures are even looked at.
    let mut big = w.release(2);
    big.payload = vec![b' '; 66_000];
    let body = serde_json::to_vec(&serde_json::json!({ "envelope": big })).unwrap();
    assert!(body.len() > 88_000 && body.len() < ringcast_controller::api::SUBMIT_BODY_LIMIT);
    assert_eq!(
        answer(post(body).await.unwrap()).await,
        (413, "too_large".into())
    );
    // A body over the request limit is refused while it is read.
    assert_eq!(
        answer(post(vec![b' '; 300_000]).await.unwrap()).await,
        (413, "too_large".into())
    );
    assert!(h.shared().state.read().unwrap().releases.is_empty());

    // Sequence 1 after 5 is refused even though release app-1 exists already.
    let op = api(&h, OPERATOR);
    for seq in [1, 5] {
        op.submit(&ringcast_controller::api::SubmitRequest {
            envelope: w.release(seq),
            start_at: None,
            activate_at: None,
            launch: None,
        })
        .await
        .unwrap();
    }
    let e = op
        .submit(&ringcast_controller::api::SubmitRequest {
            envelope: w.release(1),
            start_at: None,
            activate_at: None,
            launch: None,
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("sequence_not_increasing"), "{e}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_warns_of_a_ring_smaller_than_its_gate() {
    let w = World::new();
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 5, 0.2)]))
        .await;
    let fleet = Fleet::connect(&w).await;
    fleet.report_all("canary", 2, None, Phase::Idle, 1).await;
    wait_for(10, "2 devices known", || {
        (h.shared().devices.read().unwrap().len() == 2).then_some(())
    })
    .await;
    let resp = api(&h, OPERATOR)
        .submit(&ringcast_controller::api::SubmitRequest {
            envelope: w.release(2),
            start_at: None,
            activate_at: None,
            launch: None,
        })
        .await
        .unwrap();
    assert_eq!(resp.warnings.len(), 1, "{:?}", resp.warnings);
    let warning = &resp.warnings[0];
    assert!(
        warning.contains("canary") && warning.contains('2') && warning.contains('5'),
        "{warning}"
    );
    h.shutdown().await;
}
