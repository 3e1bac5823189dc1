//! The MQTT session and directive handling: a broker outage mid-rollout loses no report,
//! per-device directives pin a device, `hold` cancels what has not activated, the ramp
//! decides who starts.

mod common;
use common::*;
use jiff::{SignedDuration, Timestamp};
use ringcast_proto::testkit::Fixture;
use ringcast_proto::{Action, Percent, Phase};
use std::collections::BTreeMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_mid_download_completes_and_loses_no_event() {
    let f = Fixture::new();
    let broker = start_broker();
    let proxy = Proxy::start(broker);
    let http = HttpServer::start();
    let dev = Device::new(&f, "dev-outage", proxy.port);
    let ctl = Ctl::connect(broker, "ctl-outage").await;
    let agent = dev.spawn();
    let art = bundle(&[
        ("VERSION", b"1.2.0\n", 0o644),
        ("health.sh", b"#!/bin/sh\nexit 0\n", 0o755),
        ("blob", &noise(200_000), 0o644),
    ]);
    http.route(
        "/drip",
        vec![Serve::Drip {
            bytes: art.clone(),
            chunk: 16 * 1024,
            every: Duration::from_millis(60),
        }],
    );
    let r = release(2, 1, &http.url("/drip"), &art);
    let mut watch = agent.watch();
    ctl.ring_directive(&directive(&f, "outage", &r).sign(&[&f.controller]))
        .await;
    tokio::time::timeout(
        Duration::from_secs(20),
        watch.wait_for(|s| s.phase == Phase::Downloading),
    )
    .await
    .expect("downloading")
    .unwrap();
    // The broker goes away mid-download; the rollout finishes offline.
    proxy.cut();
    tokio::time::timeout(
        Duration::from_secs(30),
        watch.wait_for(|s| s.phase == Phase::Committed),
    )
    .await
    .expect("committed while offline")
    .unwrap();
    proxy.restore();
    ctl.wait_state("committed report", Duration::from_secs(20), |s| {
        s.phase == Phase::Committed
    })
    .await;
    ctl.wait_event("committed event", Duration::from_secs(20), |e| {
        e.kind.name() == "committed"
    })
    .await;
    // Every event id of this run arrived, in order; duplicates (QoS 1) share an id.
    let events = ctl.events.lock().unwrap().clone();
    let mut first_seen: BTreeMap<u64, usize> = BTreeMap::new();
    let mut boot = None;
    for (i, e) in events.iter().enumerate() {
        let mut parts = e.id.rsplitn(3, '-');
        let n: u64 = parts.next().unwrap().parse().unwrap();
        let b: u64 = parts.next().unwrap().parse().unwrap();
        assert_eq!(*boot.get_or_insert(b), b);
        first_seen.entry(n).or_insert(i);
    }
    let ns: Vec<u64> = first_seen.keys().copied().collect();
    let expect: Vec<u64> = (1..=*ns.last().unwrap()).collect();
    assert_eq!(ns, expect, "no event lost");
    let order: Vec<usize> = first_seen.values().copied().collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "events arrive in order"
    );
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
    for k in ["accepted", "downloaded", "staged", "installed", "committed"] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    agent.shutdown().await.unwrap();
}

async fn commit(ctl: &Ctl, version: &str) {
    ctl.wait_state(
        &format!("committed {version}"),
        Duration::from_secs(30),
        |s| s.phase == Phase::Committed && s.current.as_ref().is_some_and(|c| c.version == version),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_directive_pins_until_device_hold_or_a_new_ring_rollout() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let dev = Device::new(&f, "dev-pin", port);
    let ctl = Ctl::connect(port, "ctl-pin").await;
    let agent = dev.spawn();
    let rel = |seq: u64| {
        let art = app_bundle(&format!("1.{seq}.0"), true);
        let path = format!("/v{seq}");
        http.route(&path, vec![Serve::Bytes(art.clone())]);
        release(seq, 1, &http.url(&path), &art)
    };
    let (r1, r2, r3, r4) = (rel(1), rel(2), rel(3), rel(4));
    let dev_directive = |rollout: &str, r: &ringcast_proto::Release| {
        let mut d = directive(&f, rollout, r);
        d.device = Some("dev-pin".into());
        d.sign(&[&f.controller])
    };
    ctl.ring_directive(&directive(&f, "ring-1", &r1).sign(&[&f.controller]))
        .await;
    commit(&ctl, "1.1.0").await;
    ctl.device_directive("dev-pin", &dev_directive("pin-1", &r2))
        .await;
    commit(&ctl, "1.2.0").await;
    // The ring's directive re-signed for the same rollout does not move a pinned device.
    ctl.ring_directive(&directive(&f, "ring-1", &r1).sign(&[&f.controller]))
        .await;
    ctl.wait_until("re-signed accepted", Duration::from_secs(10), |c| {
        c.event_count("accepted") >= 3
    })
    .await;
    assert_eq!(agent.status().current.unwrap().version, "1.2.0");
    // A new ring rollout releases the pin.
    ctl.ring_directive(&directive(&f, "ring-2", &r3).sign(&[&f.controller]))
        .await;
    commit(&ctl, "1.3.0").await;
    // Pin again, then a device hold: the device follows its ring (ring-2, 1.3.0) again.
    ctl.device_directive("dev-pin", &dev_directive("pin-2", &r4))
        .await;
    commit(&ctl, "1.4.0").await;
    let mut hold = directive(&f, "pin-2", &r4);
    hold.device = Some("dev-pin".into());
    hold.action = Action::Hold;
    hold.release = None;
    ctl.device_directive("dev-pin", &hold.sign(&[&f.controller]))
        .await;
    commit(&ctl, "1.3.0").await;
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_cancels_a_staged_release_and_ramp_decides_who_starts() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let dev = Device::new(&f, "dev-hold", port);
    let ctl = Ctl::connect(port, "ctl-hold").await;
    let agent = dev.spawn();
    let art = app_bundle("1.2.0", true);
    http.route("/h", vec![Serve::Bytes(art.clone())]);
    let r = release(2, 1, &http.url("/h"), &art);
    // 0%: accepted, nothing starts.
    let mut d = directive(&f, "ramp", &r);
    d.percent = Percent::ZERO;
    ctl.ring_directive(&d.sign(&[&f.controller])).await;
    ctl.wait_event("accepted", Duration::from_secs(10), |e| {
        e.kind.name() == "accepted"
    })
    .await;
    assert_eq!(agent.status().phase, Phase::Idle);
    // 100% with activation in an hour: pre-staged, then held.
    let mut d = directive(&f, "ramp", &r);
    d.activation.not_before = Some(Timestamp::now() + SignedDuration::from_hours(1));
    ctl.ring_directive(&d.sign(&[&f.controller])).await;
    ctl.wait_state("staged", Duration::from_secs(20), |s| {
        s.phase == Phase::Staged
    })
    .await;
    let mut hold = directive(&f, "ramp", &r);
    hold.action = Action::Hold;
    hold.release = None;
    ctl.ring_directive(&hold.sign(&[&f.controller])).await;
    ctl.wait_event("held", Duration::from_secs(10), |e| e.kind.name() == "held")
        .await;
    ctl.wait_state("idle", Duration::from_secs(10), |s| s.phase == Phase::Idle)
        .await;
    assert!(dev.current_target().is_none());
    let left: Vec<_> = std::fs::read_dir(dev.cfg.data_dir.join("artifacts"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "staged artifact removed: {left:?}");
    agent.shutdown().await.unwrap();
}
