//! Failure gates (halt within a second, rollback), restart mid-bake, the audit log against
//! single-byte edits of the stored database, the artifact store and the API's auth.

mod common;

use common::*;
use ringcast_controller::config::OnFailure;
use ringcast_controller::engine::Submit;
use ringcast_proto::{Action, Clock, Phase};
use std::time::{Duration, Instant};

async fn complete_release(
    w: &World,
    h: &ringcast_controller::ControllerHandle,
    fleet: &Fleet,
    seq: u64,
    n: usize,
) -> String {
    let (_, ro) = w.submit_now(h, seq).await;
    fleet
        .report_all("canary", n, Some(&ro.id), Phase::Committed, seq)
        .await;
    fleet
        .report_all("broad", n, Some(&ro.id), Phase::Committed, seq)
        .await;
    advance_until_phase(w, h, &ro.id, "10m", "completed", 20).await;
    ro.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_of_ten_reverted_halts_within_a_second_and_rolls_back() {
    let w = World::new();
    let mut canary = ring("canary", &[100.0], "10m", 10, 0.2);
    canary.on_failure = OnFailure::Rollback;
    let h = w
        .start(w.config(vec![canary, ring("broad", &[100.0], "10m", 10, 0.2)]))
        .await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let good = complete_release(&w, &h, &fleet, 2, 10).await;
    assert_eq!(watch.release_seq("broad"), Some(2));

    let (_, bad) = w.submit_now(&h, 3).await;
    wait_for(10, "canary gets release 3", || {
        (watch.release_seq("canary") == Some(3)).then_some(())
    })
    .await;
    fleet
        .report_all("canary", 10, Some(&bad.id), Phase::Probation, 3)
        .await;
    fleet
        .report("canary-0", "canary", Some(&bad.id), Phase::Reverted, 3)
        .await;
    fleet
        .report("canary-1", "canary", Some(&bad.id), Phase::Reverted, 3)
        .await;
    wait_for(10, "two failures seen", || {
        let t = ringcast_controller::engine::tally(
            &h.shared().devices.read().unwrap(),
            &rollout(&h, &bad.id),
            "canary",
            ringcast_proto::Percent::FULL,
            w.clock.now(),
            jiff::SignedDuration::from_hours(1),
        );
        (t.failed == 2).then_some(())
    })
    .await;
    settle(&w, &h).await;
    assert_eq!(
        phase(&h, &bad.id),
        "publishing",
        "2 of 10 is not above 0.2, and nobody committed yet"
    );
    let t0 = Instant::now();
    fleet
        .report("canary-2", "canary", Some(&bad.id), Phase::Reverted, 3)
        .await;
    wait_for(5, "halt", || {
        (phase(&h, &bad.id) == "rolled_back").then_some(())
    })
    .await;
    let halted_in = t0.elapsed();
    assert!(
        halted_in < Duration::from_secs(1),
        "halted after {halted_in:?}"
    );
    // The canary directive points back at the good release; broad never got the bad one.
    wait_for(5, "canary rolled back", || {
        (watch.release_seq("canary") == Some(2)).then_some(())
    })
    .await;
    assert_eq!(watch.get("canary").unwrap().action, Action::Install);
    assert_eq!(watch.release_seq("broad"), Some(2));
    let rel = h
        .shared()
        .state
        .read()
        .unwrap()
        .releases
        .get("app-3")
        .cloned()
        .unwrap();
    assert!(rel.blocked.is_some(), "halted release must be blocked");
    // A blocked release is not offered again.
    let e = h
        .engine()
        .submit(
            Submit {
                envelope: w.release(3),
                start_at: None,
                activate_at: None,
                launch: None,
            },
            ops(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "release_blocked");
    let _ = good;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_without_rollback_publishes_hold_and_outer_rings_never_see_it() {
    let w = World::new();
    let h = w
        .start(w.config(vec![
            ring("canary", &[100.0], "10m", 2, 0.2),
            ring("broad", &[100.0], "10m", 2, 0.2),
        ]))
        .await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    wait_for(10, "canary directive", || watch.get("canary")).await;
    fleet
        .report("canary-0", "canary", Some(&ro.id), Phase::Committed, 2)
        .await;
    fleet
        .report("canary-1", "canary", Some(&ro.id), Phase::Failed, 2)
        .await;
    wait_for(5, "halted", || {
        (phase(&h, &ro.id) == "halted").then_some(())
    })
    .await;
    wait_for(5, "hold", || {
        watch.get("canary").filter(|d| d.action == Action::Hold)
    })
    .await;
    w.advance("1d");
    settle(&w, &h).await;
    assert!(watch.get("broad").is_none());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_mid_bake_resumes_same_step_and_loses_no_report() {
    let w = World::new();
    let cfg = w.config(vec![
        ring("canary", &[50.0, 100.0], "30m", 2, 0.2),
        ring("broad", &[100.0], "30m", 2, 0.2),
    ]);
    let h = w.start(cfg.clone()).await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    fleet.report_all("canary", 6, None, Phase::Idle, 1).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    wait_for(10, "canary 50%", || watch.get("canary")).await;
    fleet
        .report_all("canary", 6, Some(&ro.id), Phase::Committed, 2)
        .await;
    wait_for(10, "reports in", || {
        (count_phase(&h, &ro.id, Phase::Committed) == 6).then_some(())
    })
    .await;
    wait_baking(&h, &ro.id, "canary", 0).await;
    w.advance("20m");
    settle(&w, &h).await;
    let before = rollout(&h, &ro.id);
    let seq_before = watch.get("canary").unwrap().sequence;
    h.shutdown().await;

    // Restart on the same database and broker.
    let h = w.start(cfg).await;
    let after = rollout(&h, &ro.id);
    assert_eq!(
        after.state, before.state,
        "resumed at the same step and bake clock"
    );
    assert_eq!(
        count_phase(&h, &ro.id, Phase::Committed),
        6,
        "reports survive the restart"
    );
    // The standing directive is re-signed with a higher sequence, same step.
    wait_for(10, "republished", || {
        watch.get("canary").filter(|d| d.sequence > seq_before)
    })
    .await;
    assert_eq!(watch.get("canary").unwrap().percent.as_f64(), 50.0);
    // 10 more minutes completes the original 30-minute bake.
    w.advance("10m");
    wait_for(10, "canary 100%", || {
        watch.get("canary").filter(|d| d.percent.as_f64() == 100.0)
    })
    .await;
    let promotions = ringcast_controller::audit::verify(&h.shared().audit.export().unwrap())
        .unwrap()
        .iter()
        .filter(|e| e.action == "promote_step")
        .count();
    assert_eq!(promotions, 1, "no step promoted twice");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_the_entry_after_any_single_byte_change_in_the_db() {
    let w = World::new();
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 0, 0.2)]))
        .await;
    for seq in 2..5 {
        h.engine()
            .submit(
                Submit {
                    envelope: w.release(seq),
                    start_at: None,
                    activate_at: None,
                    launch: None,
                },
                ops(),
            )
            .await
            .unwrap();
    }
    settle(&w, &h).await;
    h.shutdown().await;
    let bin = env!("CARGO_BIN_EXE_ringcast");
    let run = || {
        std::process::Command::new(bin)
            .args(["audit", "verify", "--data-dir"])
            .arg(w.data_dir())
            .output()
            .unwrap()
    };
    let ok = run();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let path = w.data_dir().join("ringcast.sled");
    let entries: Vec<(sled::IVec, sled::IVec)> = {
        let db = ringcast_controller::store::open_sled(&path, Some(500)).unwrap();
        let t = db.open_tree("audit").unwrap();
        t.scan_prefix(b"e").map(|kv| kv.unwrap()).collect()
    };
    assert!(entries.len() >= 6, "{} entries", entries.len());
    // Flip bytes across every entry (a sample of positions keeps the test fast: each run of
    // the binary reopens sled); the library test flips every byte of every entry.
    for (i, (k, v)) in entries.iter().enumerate() {
        for pos in [0usize, 63, 64, 70, v.len() / 2, v.len() - 2] {
            {
                let db = ringcast_controller::store::open_sled(&path, Some(500)).unwrap();
                let t = db.open_tree("audit").unwrap();
                let mut bad = v.to_vec();
                bad[pos] ^= 0x20;
                t.insert(k, bad).unwrap();
                db.flush().unwrap();
            }
            let out = run();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "flip at entry {} byte {pos} undetected",
                i + 1
            );
            assert!(
                err.contains(&format!("entry {}", i + 1)),
                "wrong entry named: {err}"
            );
            let db = ringcast_controller::store::open_sled(&path, Some(500)).unwrap();
            db.open_tree("audit").unwrap().insert(k, v.clone()).unwrap();
            db.flush().unwrap();
        }
    }
    assert!(run().status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_are_served_by_digest_with_range_and_submit_checks_them() {
    let w = World::new();
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 0, 0.2)]))
        .await;
    let op = api(&h, OPERATOR);
    let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    // A viewer cannot upload.
    assert!(api(&h, VIEWER)
        .upload_artifact(body.clone())
        .await
        .unwrap_err()
        .to_string()
        .contains("403"));
    let up = op.upload_artifact(body.clone()).await.unwrap();
    assert_eq!(up.size, 10_000);
    let url = format!("{}{}", h.http_url(), up.url);
    let http = reqwest::Client::new();
    let full = http.get(&url).send().await.unwrap();
    assert_eq!(full.status(), 200);
    assert_eq!(full.bytes().await.unwrap().to_vec(), body);
    let part = http
        .get(&url)
        .header("Range", "bytes=9000-")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], "bytes 9000-9999/10000");
    assert_eq!(part.bytes().await.unwrap().to_vec(), body[9000..].to_vec());
    let bad = http
        .get(&url)
        .header("Range", "bytes=20000-")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 416);
    let missing = http
        .get(format!(
            "{}/artifacts/sha256/{}",
            h.http_url(),
            "a".repeat(64)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // A release pointing at the store needs its artifact there.
    let mut r = ringcast_proto::testkit::sample_release("app", 2, 1);
    r.artifact.url = format!("/artifacts/sha256/{}", "b".repeat(64));
    r.artifact.sha256 = "b".repeat(64);
    let env = r.sign(&[&w.fx.release]);
    let req = ringcast_controller::api::SubmitRequest {
        envelope: env,
        start_at: None,
        activate_at: None,
        launch: None,
    };
    let e = op.submit(&req).await.unwrap_err();
    assert!(e.to_string().contains("artifact_missing"), "{e}");
    r.artifact.url = up.url.clone();
    r.artifact.sha256 = up.sha256.clone();
    r.artifact.size = up.size;
    let req = ringcast_controller::api::SubmitRequest {
        envelope: r.sign(&[&w.fx.release]),
        start_at: None,
        activate_at: None,
        launch: None,
    };
    op.submit(&req).await.unwrap();

    // A release signed by a key the role does not list is refused with its reason code.
    let forged = ringcast_proto::testkit::sample_release("app", 9, 1).sign(&[&w.fx.controller]);
    let e = op
        .submit(&ringcast_controller::api::SubmitRequest {
            envelope: forged,
            start_at: None,
            activate_at: None,
            launch: None,
        })
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("unknown_key") || e.to_string().contains("threshold"),
        "{e}"
    );
    // /metrics answers in Prometheus text.
    let m = http
        .get(format!("{}/metrics", h.http_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("ringcast_reports_total") && m.contains("ringcast_rollout_phase"),
        "{m}"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insight_reports_lead_time_failure_rate_restore_and_device_prediction() {
    let w = World::new();
    let mut canary = ring("canary", &[100.0], "10m", 2, 0.2);
    canary.on_failure = OnFailure::Rollback;
    let h = w
        .start(w.config(vec![canary, ring("broad", &[50.0, 100.0], "1h", 2, 0.2)]))
        .await;
    let fleet = Fleet::connect(&w).await;
    fleet.report_all("canary", 2, None, Phase::Idle, 1).await;
    fleet.report_all("broad", 4, None, Phase::Idle, 1).await;
    wait_for(10, "devices", || {
        (h.shared().devices.read().unwrap().len() == 6).then_some(())
    })
    .await;
    let (_, g) = w.submit_now(&h, 2).await;
    let good = g.id;
    fleet
        .report_all("canary", 2, Some(&good), Phase::Committed, 2)
        .await;
    fleet
        .report_all("broad", 4, Some(&good), Phase::Committed, 2)
        .await;
    advance_until_phase(&w, &h, &good, "1h", "completed", 20).await;
    wait_for(10, "whole fleet recorded", || {
        rollout(&h, &good).insight.fleet_full_at
    })
    .await;

    // A bad release: canary fails, rollback, and the fleet is restored once no device runs it.
    let (_, bad) = w.submit_now(&h, 3).await;
    // While it bakes in canary, broad devices get a predicted time: after canary's bake.
    let v = api(&h, VIEWER).device("broad-0").await.unwrap();
    let p = v.prediction.expect("prediction for a broad device");
    assert_eq!(p.rollout_id, bad.id);
    let at = p.at.expect("predictable: all rings auto, no windows");
    assert!(at >= w.clock.now().checked_add(secs(600)).unwrap(), "{at}");
    // Its step's directive goes out after canary's bake; it commits after that.
    let out = p.published_at.expect("its step's publish time");
    assert!(
        out >= w.clock.now().checked_add(secs(600)).unwrap(),
        "{out}"
    );
    assert!(
        at > out,
        "commits after the directive, download and probation"
    );
    let s = api(&h, VIEWER).insight().await.unwrap();
    let f = s
        .forecasts
        .iter()
        .find(|f| f.rollout_id == bad.id)
        .expect("the live rollout's forecast is in the insight");
    assert_eq!(
        f.steps.iter().map(|s| s.ring.as_str()).collect::<Vec<_>>(),
        ["canary", "broad", "broad"]
    );
    fleet
        .report("canary-0", "canary", Some(&bad.id), Phase::Reverted, 3)
        .await;
    fleet
        .report("canary-1", "canary", Some(&bad.id), Phase::Reverted, 3)
        .await;
    wait_for(5, "rolled back", || {
        (phase(&h, &bad.id) == "rolled_back").then_some(())
    })
    .await;
    wait_for(5, "restored", || rollout(&h, &bad.id).insight.restored_at).await;

    let s = api(&h, VIEWER).insight().await.unwrap();
    assert_eq!(s.change_failure_rate, Some(0.5));
    let g = s.rollouts.iter().find(|m| m.rollout_id == good).unwrap();
    assert!(g.lead_time_full_secs.unwrap() >= g.lead_time_half_secs.unwrap());
    assert!(s
        .rollouts
        .iter()
        .any(|m| m.rollout_id == bad.id && m.time_to_restore_secs.is_some()));
    assert!(s.deployments_per_day_30d > 0.0);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_a_policy_that_lost_the_ring_stops_the_rollout_instead_of_guessing() {
    let w = World::new();
    let cfg = w.config(vec![
        ring("canary", &[100.0], "10m", 1, 0.2),
        ring("broad", &[50.0, 100.0], "10m", 1, 0.2),
    ]);
    let h = w.start(cfg.clone()).await;
    let fleet = Fleet::connect(&w).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    fleet
        .report("canary-0", "canary", Some(&ro.id), Phase::Committed, 2)
        .await;
    wait_baking(&h, &ro.id, "canary", 0).await;
    w.advance("10m");
    wait_for(10, "in broad", || {
        matches!(
            &rollout(&h, &ro.id).state,
            ringcast_controller::model::RolloutState::Active { ring, .. } if ring == "broad"
        )
        .then_some(())
    })
    .await;
    h.shutdown().await;
    let mut smaller = cfg;
    smaller.policy.rings.truncate(1);
    let h = w.start(smaller).await;
    wait_for(10, "halted on start", || {
        (phase(&h, &ro.id) == "halted").then_some(())
    })
    .await;
    let v = api(&h, VIEWER).rollout(&ro.id).await.unwrap();
    assert!(v.detail.unwrap_or_default().contains("policy changed"));
    h.shutdown().await;
}
