//! Per-device directives (pin / hotfix / unpin): what the controller publishes on
//! `…/devices/{device}/directive`, who may do it, what is refused, and that a pin stands
//! (re-signed, across a restart) until it is ended.

mod common;

use common::*;
use ringcast_controller::client::ClientError;
use ringcast_controller::config::{Promotion, RingPolicy};
use ringcast_controller::ControllerHandle;
use ringcast_proto::testkit;
use ringcast_proto::{
    accept_directive, Accepted, Action, AgentView, Clock, DeviceIdentity, Phase, Rejection, Source,
    Topic,
};
use rumqttc::QoS;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The raw retained bytes last seen on each device's directive topic.
#[derive(Clone, Default)]
struct DeviceWatcher {
    latest: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

impl DeviceWatcher {
    async fn start(w: &World) -> DeviceWatcher {
        let (c, mut el) = mqtt(w.broker_port, &format!("pin-watch-{}", rand_id()));
        let filter = format!("{}/devices/+/directive", w.topics.prefix());
        c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let me = DeviceWatcher::default();
        let out = me.clone();
        let topics = w.topics.clone();
        tokio::spawn(async move {
            let _keep = c;
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if let Ok(Topic::DeviceDirective(d)) = topics.parse(&p.topic) {
                            out.latest.lock().unwrap().insert(d, p.payload.to_vec());
                        }
                    }
                    Ok(_) => {}
                    // Reconnect pace only; nothing waits on this.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        me
    }

    fn bytes(&self, device: &str) -> Option<Vec<u8>> {
        self.latest.lock().unwrap().get(device).cloned()
    }

    /// Wait for a directive on `device`'s topic that an agent with `last_sequence` accepts
    /// and that satisfies `want`.
    async fn wait_accepted(
        &self,
        w: &World,
        device: &str,
        ring: &str,
        last_sequence: Option<u64>,
        what: &str,
        want: impl Fn(&Accepted) -> bool,
    ) -> Accepted {
        wait_for(10, what, || {
            let b = self.bytes(device)?;
            accept_as(w, device, ring, last_sequence, &b)
                .ok()
                .filter(&want)
        })
        .await
    }
}

/// Accept `bytes` as the agent of `device` in `ring` (class `sensor-v2`) would.
fn accept_as(
    w: &World,
    device: &str,
    ring: &str,
    last_sequence: Option<u64>,
    bytes: &[u8],
) -> Result<Accepted, Rejection> {
    let me = DeviceIdentity {
        id: device,
        fleet: testkit::FLEET,
        ring,
        class: "sensor-v2",
        product: None,
    };
    let view = AgentView {
        trust: &w.fx.trust,
        last_sequence,
        rollback_floor: 0,
        trusted_now: w.clock.now(),
        skew: jiff::SignedDuration::from_mins(5),
    };
    accept_directive(&me, &view, Source::Device, bytes)
}

/// A manual canary ring: a submitted release waits for approval, so nothing but the pins
/// reaches the devices.
fn manual_canary() -> RingPolicy {
    let mut canary = ring("canary", &[100.0], "10m", 1, 0.0);
    canary.promotion = Promotion::Manual;
    canary
}

fn audit(h: &ControllerHandle) -> Vec<ringcast_controller::audit::AuditEntry> {
    ringcast_controller::audit::verify(&h.shared().audit.export().unwrap()).unwrap()
}

fn api_code(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, code, .. }) => (status, code),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Report `devices` of `ring` and wait until the controller knows them.
async fn known(h: &ControllerHandle, fleet: &Fleet, ring: &str, devices: &[&str]) {
    for d in devices {
        fleet.report(d, ring, None, Phase::Idle, 1).await;
    }
    wait_for(10, "devices known", || {
        let known = h.shared().devices.read().unwrap();
        devices
            .iter()
            .all(|d| known.get(*d).is_some_and(|r| r.report.is_some()))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_publishes_a_retained_signed_device_directive_and_unpin_a_hold() {
    let w = World::new();
    let h = w.start(w.config(vec![manual_canary()])).await;
    let fleet = Fleet::connect(&w).await;
    known(&h, &fleet, "canary", &["canary-0", "canary-1"]).await;
    w.submit_now(&h, 2).await;

    let p = api(&h, APPROVER).pin("canary-0", "app-2").await.unwrap();
    assert_eq!(p.release_id.as_deref(), Some("app-2"));
    assert!(
        p.rollout_id.starts_with("pin-canary-0-"),
        "{}",
        p.rollout_id
    );

    // Subscribed after the pin: the directive is retained.
    let watch = DeviceWatcher::start(&w).await;
    let acc = watch
        .wait_accepted(&w, "canary-0", "canary", None, "pin directive", |a| {
            a.directive.action == Action::Install
        })
        .await;
    let d = &acc.directive;
    assert_eq!(d.device.as_deref(), Some("canary-0"));
    assert_eq!(d.ring, "canary");
    assert_eq!(d.rollout_id, p.rollout_id);
    assert_eq!(d.percent, ringcast_proto::Percent::FULL);
    assert_eq!(d.activation, ringcast_proto::Activation::default());
    assert_eq!(acc.release.as_ref().map(|r| r.sequence), Some(2));
    assert!(
        d.expires_at <= w.clock.now() + jiff::SignedDuration::from_hours(1),
        "short-lived like ring directives"
    );
    // Another device (the broker's ACL aside) refuses it: it names canary-0.
    let other = accept_as(
        &w,
        "canary-1",
        "canary",
        None,
        &watch.bytes("canary-0").unwrap(),
    );
    assert_eq!(
        other.err().map(|r| r.reason.code()),
        Some("wrong_target"),
        "a pin names its device"
    );
    assert!(watch.bytes("canary-1").is_none(), "only canary-0 pinned");

    let shown = api(&h, VIEWER).device("canary-0").await.unwrap();
    assert_eq!(
        shown.pin.as_ref().and_then(|p| p.release_id.as_deref()),
        Some("app-2")
    );
    assert!(api(&h, VIEWER)
        .device("canary-1")
        .await
        .unwrap()
        .pin
        .is_none());

    let u = api(&h, APPROVER).unpin("canary-0").await.unwrap();
    assert_eq!(u.release_id, None);
    let hold = watch
        .wait_accepted(
            &w,
            "canary-0",
            "canary",
            Some(d.sequence),
            "hold directive",
            |a| a.directive.action == Action::Hold,
        )
        .await;
    assert!(hold.directive.sequence > d.sequence);
    assert!(hold.release.is_none());
    assert!(api(&h, VIEWER)
        .device("canary-0")
        .await
        .unwrap()
        .pin
        .is_none());
    // Unpinning twice says so.
    assert_eq!(
        api_code(api(&h, APPROVER).unpin("canary-0").await),
        (409, "not_pinned".to_owned())
    );

    let log = audit(&h);
    let pin = log.iter().find(|e| e.action == "pin").expect("pin audited");
    assert_eq!(
        (
            pin.actor.as_str(),
            pin.role.as_deref(),
            pin.outcome.as_str()
        ),
        ("alice", Some("approver"), "ok")
    );
    assert!(pin.detail.contains("canary-0"), "{}", pin.detail);
    let unpins: Vec<_> = log.iter().filter(|e| e.action == "unpin").collect();
    assert_eq!(unpins.len(), 2, "{unpins:?}");
    assert_eq!(unpins[0].outcome, "ok");
    assert!(unpins[0].detail.contains("canary-0"));
    assert_eq!(unpins[1].outcome, "refused: not_pinned");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_cannot_pin_the_refusal_is_audited_and_nothing_is_published() {
    let w = World::new();
    let h = w.start(w.config(vec![manual_canary()])).await;
    let fleet = Fleet::connect(&w).await;
    known(&h, &fleet, "canary", &["canary-0", "canary-1"]).await;
    w.submit_now(&h, 2).await;
    let watch = DeviceWatcher::start(&w).await;

    assert_eq!(
        api_code(api(&h, OPERATOR).pin("canary-0", "app-2").await),
        (403, "forbidden".to_owned())
    );
    assert_eq!(
        api_code(api(&h, OPERATOR).unpin("canary-0").await),
        (403, "forbidden".to_owned())
    );
    assert!(h.shared().state.read().unwrap().pins.is_empty());
    // Publishes go out in order: once a later, allowed pin has arrived, a directive for the
    // refused one would have too.
    api(&h, APPROVER).pin("canary-1", "app-2").await.unwrap();
    watch
        .wait_accepted(&w, "canary-1", "canary", None, "allowed pin", |_| true)
        .await;
    assert!(watch.bytes("canary-0").is_none(), "refused pin published");

    let log = audit(&h);
    let denied: Vec<_> = log
        .iter()
        .filter(|e| e.outcome == "denied: forbidden")
        .collect();
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert_eq!(denied[0].action, "pin");
    assert_eq!(denied[1].action, "unpin");
    for e in denied {
        assert_eq!(
            (e.actor.as_str(), e.role.as_deref()),
            ("otto", Some("operator"))
        );
        assert!(e.detail.contains("device canary-0"), "{}", e.detail);
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_release_unknown_device_and_unknown_release_are_refused() {
    let w = World::new();
    // One failure in canary halts (min 1 report, rate 0): release 2 ends up blocked.
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 1, 0.0)]))
        .await;
    let fleet = Fleet::connect(&w).await;
    known(&h, &fleet, "canary", &["canary-0", "canary-1"]).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    wait_step(&h, &ro.id, "canary", 0).await;
    fleet
        .report("canary-0", "canary", Some(&ro.id), Phase::Reverted, 2)
        .await;
    wait_for(10, "halt", || (phase(&h, &ro.id) == "halted").then_some(())).await;

    let c = api(&h, APPROVER);
    assert_eq!(
        api_code(c.pin("canary-1", "app-2").await),
        (409, "release_blocked".to_owned())
    );
    assert_eq!(
        api_code(c.pin("ghost", "app-2").await),
        (404, "not_found".to_owned())
    );
    assert_eq!(
        api_code(c.pin("canary-1", "app-9").await),
        (404, "not_found".to_owned())
    );
    assert_eq!(
        api_code(c.unpin("ghost").await),
        (404, "not_found".to_owned())
    );
    // A device of another class would refuse the release (the agent's `incompatible`).
    let camera = testkit::idle_report("camera-0", "canary", "camera-v1");
    fleet
        .client
        .publish(
            w.topics.state("camera-0"),
            QoS::AtLeastOnce,
            true,
            camera.to_bytes(),
        )
        .await
        .unwrap();
    wait_for(10, "camera known", || {
        h.shared()
            .devices
            .read()
            .unwrap()
            .get("camera-0")
            .and_then(|d| d.report.clone())
    })
    .await;
    w.submit_now(&h, 3).await;
    assert_eq!(
        api_code(c.pin("camera-0", "app-3").await),
        (409, "incompatible".to_owned())
    );
    assert!(h.shared().state.read().unwrap().pins.is_empty());
    let refused: Vec<String> = audit(&h)
        .iter()
        .filter(|e| e.action == "pin" || e.action == "unpin")
        .map(|e| e.outcome.clone())
        .collect();
    assert_eq!(
        refused,
        [
            "refused: release_blocked",
            "refused: not_found",
            "refused: not_found",
            "refused: not_found",
            "refused: incompatible"
        ]
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_is_resigned_past_half_its_ttl_and_stands_again_after_a_restart() {
    let w = World::new();
    let cfg = w.config(vec![manual_canary()]);
    let h = w.start(cfg.clone()).await;
    let fleet = Fleet::connect(&w).await;
    known(&h, &fleet, "canary", &["canary-0"]).await;
    w.submit_now(&h, 2).await;
    let watch = DeviceWatcher::start(&w).await;
    let p = api(&h, APPROVER).pin("canary-0", "app-2").await.unwrap();
    let first = watch
        .wait_accepted(&w, "canary-0", "canary", None, "pin", |_| true)
        .await
        .directive;

    // TTL is one hour: past half of it the engine re-signs.
    w.advance("31m");
    let second = watch
        .wait_accepted(
            &w,
            "canary-0",
            "canary",
            Some(first.sequence),
            "re-signed pin",
            |a| a.directive.action == Action::Install,
        )
        .await
        .directive;
    assert!(second.sequence > first.sequence);
    assert!(second.expires_at > first.expires_at);
    assert_eq!(second.rollout_id, p.rollout_id, "the same pin");
    h.shutdown().await;

    let h = w.start(cfg).await;
    let third = watch
        .wait_accepted(
            &w,
            "canary-0",
            "canary",
            Some(second.sequence),
            "pin republished after restart",
            |a| a.directive.action == Action::Install,
        )
        .await;
    assert_eq!(third.directive.rollout_id, p.rollout_id);
    assert_eq!(third.release.map(|r| r.sequence), Some(2));
    assert_eq!(
        api(&h, VIEWER)
            .device("canary-0")
            .await
            .unwrap()
            .pin
            .and_then(|p| p.release_id),
        Some("app-2".to_owned())
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_rollout_on_the_ring_ends_the_pin_so_re_signing_never_pins_again() {
    let w = World::new();
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 1, 0.2)]))
        .await;
    let fleet = Fleet::connect(&w).await;
    known(&h, &fleet, "canary", &["canary-0", "canary-1"]).await;
    // Release 2 completes: its rollout's directive stands on the ring.
    let (_, r2) = w.submit_now(&h, 2).await;
    wait_step(&h, &r2.id, "canary", 0).await;
    fleet
        .report_all("canary", 2, Some(&r2.id), Phase::Committed, 2)
        .await;
    advance_until_phase(&w, &h, &r2.id, "10m", "completed", 20).await;
    // Release 3's rollout is scheduled two days out; canary-0 gets it now as a hotfix.
    h.engine()
        .submit(
            ringcast_controller::engine::Submit {
                envelope: w.release(3),
                start_at: Some(w.clock.now() + jiff::SignedDuration::from_hours(48)),
                activate_at: None,
                launch: None,
            },
            ops(),
        )
        .await
        .unwrap();
    let watch = DeviceWatcher::start(&w).await;
    api(&h, APPROVER).pin("canary-0", "app-3").await.unwrap();
    let pin = watch
        .wait_accepted(&w, "canary-0", "canary", None, "pin", |_| true)
        .await
        .directive;
    // Re-signing the ring's standing directive (same rollout) leaves the pin alone.
    w.advance("31m");
    let resigned = watch
        .wait_accepted(
            &w,
            "canary-0",
            "canary",
            Some(pin.sequence),
            "pin re-signed",
            |_| true,
        )
        .await
        .directive;
    assert_eq!(resigned.action, Action::Install);
    assert_eq!(resigned.rollout_id, pin.rollout_id);
    // canary-1 was pinned and unpinned: the hold that unpin left stands too.
    api(&h, APPROVER).pin("canary-1", "app-3").await.unwrap();
    api(&h, APPROVER).unpin("canary-1").await.unwrap();
    watch
        .wait_accepted(&w, "canary-1", "canary", None, "unpin hold", |a| {
            a.directive.action == Action::Hold
        })
        .await;
    // ... a new rollout on the ring (release 3's, scheduled two days out) ends the pin on
    // the device (agent rule), so the controller retires both device directives: deleted
    // from its state and cleared from the broker (an empty retained message), never
    // re-signed again.
    w.advance("48h");
    for device in ["canary-0", "canary-1"] {
        wait_for(10, &format!("{device}'s directive cleared"), || {
            watch.bytes(device).filter(|b| b.is_empty())
        })
        .await;
    }
    assert!(h.shared().state.read().unwrap().pins.is_empty());
    assert!(
        h.shared().store.pins().unwrap().is_empty(),
        "deleted, not just hidden"
    );
    let log = audit(&h);
    assert!(log.iter().any(|e| e.action == "unpin"
        && e.actor == "controller"
        && e.detail.contains("canary-0")
        && e.detail.contains("app-3")));
    assert!(log
        .iter()
        .any(|e| e.action == "pin_retired" && e.detail.contains("canary-1")));
    // Nothing stands to be re-signed, and a restart brings nothing back.
    h.shutdown().await;
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 1, 0.2)]))
        .await;
    assert!(h.shared().state.read().unwrap().pins.is_empty());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_pins_shows_and_unpins_with_json() {
    let w = World::new();
    let h = w.start(w.config(vec![manual_canary()])).await;
    let fleet = Fleet::connect(&w).await;
    known(&h, &fleet, "canary", &["canary-0"]).await;
    w.submit_now(&h, 2).await;

    let o = ringcast_as(&h, OPERATOR, &["devices", "pin", "canary-0", "app-2"]).await;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("forbidden"),
        "{o:?}"
    );

    let o = ringcast_as(&h, APPROVER, &["devices", "pin", "canary-0", "app-2"]).await;
    assert!(o.status.success(), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("pin       app-2"));

    let o = ringcast_as(&h, VIEWER, &["--json", "devices", "show", "canary-0"]).await;
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["pin"]["release_id"], "app-2");
    assert_eq!(v["pin"]["ring"], "canary");
    let o = ringcast_as(&h, VIEWER, &["devices", "show", "canary-0"]).await;
    assert!(String::from_utf8_lossy(&o.stdout).contains("pin       app-2"));

    let o = ringcast_as(&h, APPROVER, &["--json", "devices", "unpin", "canary-0"]).await;
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["release_id"], serde_json::Value::Null);
    assert_eq!(v["ended"], "unpinned");
    let o = ringcast_as(&h, VIEWER, &["--json", "devices", "show", "canary-0"]).await;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["pin"], serde_json::Value::Null);
    h.shutdown().await;
}
