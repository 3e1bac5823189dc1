//! ACCEPTANCE.md cases 1–8 and 19 over a real broker: a test acting as an attacker publishes
//! bad documents on the agent's topics. Each must be rejected with its stable reason in a
//! `rejected` event, change nothing on the device, and leave the agent running (a good
//! directive afterwards still installs).

mod common;
use common::*;
use jiff::{SignedDuration, Timestamp};
use ringcast_agent::{Agent, AgentHandle};
use ringcast_proto::testkit::{key, rotated_doc, Fixture};
use ringcast_proto::{Action, Envelope, EventKind, FakeClock, Phase, TRUST_TYPE};
use std::sync::Arc;
use std::time::Duration;

struct Rig {
    f: Fixture,
    http: HttpServer,
    dev: Device,
    ctl: Ctl,
    agent: Option<AgentHandle>,
}

async fn rig(f: Fixture, id: &str) -> Rig {
    let port = start_broker();
    let http = HttpServer::start();
    let dev = Device::new(&f, id, port);
    let ctl = Ctl::connect(port, &format!("ctl-{id}")).await;
    let agent = Some(dev.spawn());
    // The agent is up once its first state report arrives.
    ctl.wait_state("first report", Duration::from_secs(10), |_| true)
        .await;
    Rig {
        f,
        http,
        dev,
        ctl,
        agent,
    }
}

impl Rig {
    /// Nothing was downloaded or installed.
    fn assert_untouched(&self) {
        assert_eq!(
            self.http.hits.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "artifact fetched"
        );
        assert!(self.dev.current_target().is_none(), "current switched");
        assert!(
            !self.dev.cfg.data_dir.join("artifacts").exists(),
            "download started"
        );
        let s = self.agent.as_ref().unwrap().status();
        assert_eq!(s.phase, Phase::Idle);
        assert!(s.current.is_none());
    }

    /// A good directive still works: the agent kept running.
    async fn assert_still_serving(&self, seq: u64, floor: u64) {
        let art = app_bundle(&format!("1.{seq}.0"), true);
        let path = format!("/good-{seq}");
        self.http.route(&path, vec![Serve::Bytes(art.clone())]);
        let r = release(seq, floor, &self.http.url(&path), &art);
        self.ctl
            .ring_directive(
                &directive(&self.f, &format!("good-{seq}"), &r).sign(&[&self.f.controller]),
            )
            .await;
        self.ctl
            .wait_state("committed after attack", Duration::from_secs(30), |s| {
                s.phase == Phase::Committed && s.current.as_ref().is_some_and(|c| c.sequence == seq)
            })
            .await;
    }

    fn good_release(&self, seq: u64) -> ringcast_proto::Release {
        let art = app_bundle("9.9.9", true);
        release(seq, 1, &self.http.url("/never"), &art)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_01_tampered_or_wrongly_signed_directive_is_rejected() {
    let rig = rig(Fixture::new(), "dev-a01").await;
    let r = rig.good_release(2);
    // Flipped byte in the directive payload.
    let mut env = directive(&rig.f, "r", &r).sign(&[&rig.f.controller]);
    let i = env.payload.len() / 2;
    env.payload[i] ^= 0x01;
    rig.ctl.ring_directive(&env).await;
    rig.ctl.wait_rejected("bad_signature").await;
    // Flipped byte in the embedded release.
    let mut d = directive(&rig.f, "r", &r);
    if let Some(renv) = d.release.as_mut() {
        let i = renv.payload.len() / 2;
        renv.payload[i] ^= 0x20;
    }
    rig.ctl.ring_directive(&d.sign(&[&rig.f.controller])).await;
    rig.ctl
        .wait_event("release bad_signature", Duration::from_secs(10), |e| {
            matches!(&e.kind, EventKind::Rejected { reason, detail } if reason.code() == "bad_signature" && detail.starts_with("release"))
        })
        .await;
    // Signed by a key the controller role does not list (the release key; a stranger).
    let env = directive(&rig.f, "r", &r).sign(&[&rig.f.release]);
    rig.ctl.ring_directive(&env).await;
    rig.ctl.wait_rejected("unknown_key").await;
    let env = directive(&rig.f, "r", &r).sign(&[&key(99)]);
    rig.ctl.ring_directive(&env).await;
    rig.ctl
        .wait_until("second unknown_key", Duration::from_secs(10), |c| {
            c.rejected_count("unknown_key") >= 2
        })
        .await;
    rig.assert_untouched();
    rig.assert_still_serving(3, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_02_threshold_met_only_by_a_repeated_signature_is_rejected() {
    let rig = rig(Fixture::with_controller_threshold(2), "dev-a02").await;
    let r = rig.good_release(2);
    let mut env = directive(&rig.f, "r", &r).sign(&[&rig.f.controller]);
    env.signatures.push(env.signatures[0].clone());
    rig.ctl.ring_directive(&env).await;
    rig.ctl.wait_rejected("threshold_not_met").await;
    // The same key twice through the signing API.
    let env = directive(&rig.f, "r", &r).sign(&[&rig.f.controller, &rig.f.controller]);
    rig.ctl.ring_directive(&env).await;
    rig.ctl
        .wait_until("second threshold_not_met", Duration::from_secs(10), |c| {
            c.rejected_count("threshold_not_met") >= 2
        })
        .await;
    rig.assert_untouched();
    // Two distinct controller keys meet it.
    let art = app_bundle("1.3.0", true);
    rig.http.route("/t2", vec![Serve::Bytes(art.clone())]);
    let r = release(3, 1, &rig.http.url("/t2"), &art);
    let env = directive(&rig.f, "good", &r).sign(&[&rig.f.controller, &rig.f.controller2]);
    rig.ctl.ring_directive(&env).await;
    rig.ctl
        .wait_state("committed", Duration::from_secs(30), |s| {
            s.phase == Phase::Committed
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_03_trust_rotation_needs_both_thresholds_and_never_goes_back() {
    let mut rig = rig(Fixture::new(), "dev-a03").await;
    let new_root = key(42);
    let doc = rotated_doc(&rig.f.trust, &new_root, 2);
    let bytes = serde_json::to_vec(&doc).unwrap();
    let trust_topic = rig.ctl.topics.trust();
    // Old root keys only.
    let env = Envelope::sign(TRUST_TYPE, bytes.clone(), &[&rig.f.root]);
    rig.ctl.publish(trust_topic.clone(), env.to_vec()).await;
    rig.ctl
        .wait_event("old-only rejected", Duration::from_secs(10), |e| {
            matches!(&e.kind, EventKind::Rejected { detail, .. } if detail.contains("new root keys"))
        })
        .await;
    // New root keys only.
    let env = Envelope::sign(TRUST_TYPE, bytes.clone(), &[&new_root]);
    rig.ctl.publish(trust_topic.clone(), env.to_vec()).await;
    rig.ctl
        .wait_event("new-only rejected", Duration::from_secs(10), |e| {
            matches!(&e.kind, EventKind::Rejected { detail, .. } if detail.contains("old root keys"))
        })
        .await;
    // Both: accepted and persisted.
    let env = Envelope::sign(TRUST_TYPE, bytes, &[&rig.f.root, &new_root]);
    rig.ctl.publish(trust_topic.clone(), env.to_vec()).await;
    rig.ctl
        .wait_event("rotated", Duration::from_secs(10), |e| {
            matches!(e.kind, EventKind::TrustRotated { version: 2 })
        })
        .await;
    // Restart the agent: it must come back on version 2 and refuse version 1.
    rig.agent.take().unwrap().shutdown().await.unwrap();
    rig.ctl.publish(trust_topic, rig.f.trust_env.to_vec()).await;
    rig.agent = Some(rig.dev.spawn());
    rig.ctl.wait_rejected("trust_rollback").await;
    rig.assert_untouched();
    rig.assert_still_serving(3, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_04_replayed_directive_is_rejected_and_device_stays() {
    let rig = rig(Fixture::new(), "dev-a04").await;
    let r = rig.good_release(2);
    let mut old = directive(&rig.f, "hold-1", &r);
    old.action = Action::Hold;
    old.release = None;
    let captured = old.sign(&[&rig.f.controller]);
    // A newer hold directive is accepted first.
    let mut newer = old.clone();
    newer.sequence = next_seq();
    rig.ctl
        .ring_directive(&newer.sign(&[&rig.f.controller]))
        .await;
    rig.ctl
        .wait_event("held", Duration::from_secs(10), |e| e.kind.name() == "held")
        .await;
    // The attacker re-publishes the captured older one, retained.
    rig.ctl.ring_directive(&captured).await;
    rig.ctl.wait_rejected("replayed").await;
    rig.assert_untouched();
    rig.assert_still_serving(3, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_05_expired_directive_or_release_is_rejected() {
    let rig = rig(Fixture::new(), "dev-a05").await;
    let r = rig.good_release(2);
    let mut d = directive(&rig.f, "r", &r);
    d.issued_at = Timestamp::now() - SignedDuration::from_hours(3);
    d.expires_at = Timestamp::now() - SignedDuration::from_hours(2);
    rig.ctl.ring_directive(&d.sign(&[&rig.f.controller])).await;
    rig.ctl.wait_rejected("expired").await;
    let mut r2 = r.clone();
    r2.issued_at = Timestamp::now() - SignedDuration::from_hours(48);
    r2.expires_at = Some(Timestamp::now() - SignedDuration::from_hours(1));
    let mut d = directive(&rig.f, "r", &r2);
    d.release = Some(r2.sign(&[&rig.f.release]));
    rig.ctl.ring_directive(&d.sign(&[&rig.f.controller])).await;
    rig.ctl
        .wait_event("release expired", Duration::from_secs(10), |e| {
            matches!(&e.kind, EventKind::Rejected { reason, detail } if reason.code() == "expired" && detail.contains("release"))
        })
        .await;
    rig.assert_untouched();
    // A controller that keeps re-signing keeps the device fed.
    rig.assert_still_serving(3, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_06_release_below_rollback_floor_is_rejected() {
    let rig = rig(Fixture::new(), "dev-a06").await;
    // Install release 5 with floor 5.
    rig.assert_still_serving(5, 5).await;
    // A validly signed directive for validly signed release 3 (a stolen controller key).
    let art = app_bundle("1.3.0", true);
    rig.http.route("/old", vec![Serve::Bytes(art.clone())]);
    let r = release(3, 1, &rig.http.url("/old"), &art);
    rig.ctl
        .ring_directive(&directive(&rig.f, "downgrade", &r).sign(&[&rig.f.controller]))
        .await;
    rig.ctl.wait_rejected("rollback_floor").await;
    let s = rig.agent.as_ref().unwrap().status();
    assert_eq!(s.current.unwrap().sequence, 5);
    assert_eq!(
        read_version(&rig.dev.install_root()).as_deref(),
        Some("1.5.0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_07_other_class_fleet_or_ring_is_rejected() {
    let rig = rig(Fixture::new(), "dev-a07").await;
    let mut r = rig.good_release(2);
    r.compatible = vec!["camera-v1".into()];
    rig.ctl
        .ring_directive(&directive(&rig.f, "r", &r).sign(&[&rig.f.controller]))
        .await;
    rig.ctl.wait_rejected("incompatible").await;
    let r = rig.good_release(2);
    let mut d = directive(&rig.f, "r", &r);
    d.fleet = "other-fleet".into();
    rig.ctl.ring_directive(&d.sign(&[&rig.f.controller])).await;
    rig.ctl.wait_rejected("wrong_fleet").await;
    let mut d = directive(&rig.f, "r", &r);
    d.ring = "broad".into();
    rig.ctl.ring_directive(&d.sign(&[&rig.f.controller])).await;
    rig.ctl.wait_rejected("wrong_target").await;
    // A directive for another device on this device's topic.
    let mut d = directive(&rig.f, "r", &r);
    d.device = Some("dev-other".into());
    rig.ctl
        .device_directive("dev-a07", &d.sign(&[&rig.f.controller]))
        .await;
    rig.ctl
        .wait_until("second wrong_target", Duration::from_secs(10), |c| {
            c.rejected_count("wrong_target") >= 2
        })
        .await;
    rig.assert_untouched();
    rig.assert_still_serving(3, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_08_oversized_malformed_and_junk_are_rejected_without_crashing() {
    let rig = rig(Fixture::new(), "dev-a08").await;
    let big = vec![b'{'; 64 * 1024 + 1];
    rig.ctl
        .publish(rig.ctl.topics.ring_directive(RING), big)
        .await;
    rig.ctl.wait_rejected("too_large").await;
    let r = rig.good_release(2);
    let good = directive(&rig.f, "r", &r).sign(&[&rig.f.controller]);
    let mut v: serde_json::Value = serde_json::from_slice(&good.to_vec()).unwrap();
    v["surprise"] = 1.into();
    let junk: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        serde_json::to_vec(&v).unwrap(),
        br#"{"payloadType":"application/vnd.ringcast.directive+json","payload":"!!!","signatures":[]}"#.to_vec(),
        vec![0xff, 0xfe, 0x00, 0x01],
        Vec::new(),
    ];
    let n = junk.len();
    for j in junk {
        rig.ctl
            .publish(rig.ctl.topics.ring_directive(RING), j.clone())
            .await;
        rig.ctl
            .publish(rig.ctl.topics.device_directive("dev-a08"), j.clone())
            .await;
        rig.ctl.publish(rig.ctl.topics.trust(), j).await;
    }
    rig.ctl
        .wait_until("all malformed rejected", Duration::from_secs(10), |c| {
            c.rejected_count("malformed") >= 3 * (n - 1)
        })
        .await;
    rig.assert_untouched();
    rig.assert_still_serving(3, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_19_device_clock_hours_ahead_refuses_what_it_cannot_judge_fresh() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let dev = Device::new(&f, "dev-a19", port);
    let ctl = Ctl::connect(port, "ctl-a19").await;
    let clock = FakeClock::new(Timestamp::now() + SignedDuration::from_hours(5));
    let mut deps = dev.deps();
    deps.clock = Arc::new(clock.clone());
    let agent = Agent::new(dev.cfg.clone(), deps).unwrap().spawn();
    ctl.wait_state("first report", Duration::from_secs(10), |_| true)
        .await;
    let art = app_bundle("1.2.0", true);
    http.route("/c", vec![Serve::Bytes(art.clone())]);
    let r = release(2, 1, &http.url("/c"), &art);
    ctl.ring_directive(&directive(&f, "r", &r).sign(&[&f.controller]))
        .await;
    ctl.wait_rejected("expired").await;
    assert_eq!(agent.status().phase, Phase::Idle);
    assert!(dev.current_target().is_none());
    agent.shutdown().await.unwrap();
    // A device whose clock is a year behind is lifted by the verified issued_at and accepts.
    let dev2 = Device::new(&f, "dev-a19b", port);
    let mut deps = dev2.deps();
    deps.clock = Arc::new(FakeClock::new(
        Timestamp::now() - SignedDuration::from_hours(24 * 365),
    ));
    let agent2 = Agent::new(dev2.cfg.clone(), deps).unwrap().spawn();
    let mut d = directive(&f, "r2", &r);
    d.ring = RING.into();
    ctl.ring_directive(&d.sign(&[&f.controller])).await;
    ctl.wait_event("accepted", Duration::from_secs(10), |e| {
        e.kind.name() == "accepted" && e.device == "dev-a19b"
    })
    .await;
    agent2.shutdown().await.unwrap();
}
