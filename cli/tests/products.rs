//! Two products on one ring over the real broker and HTTP: an os and an app rollout run at
//! once, each on its own product topic; a device reporting both shows each product in the
//! API (`products`) and in `ringcast devices list|show`; a device without products looks as
//! it always did.

mod common;

use common::*;
use ringcast_controller::api::DeviceView;
use ringcast_proto::report::ProductState;
use ringcast_proto::{testkit, Directive, Envelope, Phase, ReleaseRef, StateReport, Topic};
use rumqttc::QoS;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The newest verified directive on each `(ring, product)` topic.
#[derive(Clone, Default)]
struct ProductWatcher {
    latest: Arc<Mutex<HashMap<(String, String), Directive>>>,
}

impl ProductWatcher {
    async fn start(w: &World) -> ProductWatcher {
        let (c, mut el) = mqtt(w.broker_port, &format!("product-watch-{}", rand_id()));
        let filter = format!("{}/rings/+/products/+/directive", w.topics.prefix());
        c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let me = ProductWatcher::default();
        let out = me.clone();
        let (trust, topics) = (w.fx.trust.clone(), w.topics.clone());
        tokio::spawn(async move {
            let _keep = c;
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let Ok(Topic::RingProductDirective { ring, product }) =
                            topics.parse(&p.topic)
                        else {
                            continue;
                        };
                        let env = Envelope::from_slice(&p.payload).expect("an envelope");
                        let bytes = env
                            .verify(
                                ringcast_proto::DIRECTIVE_TYPE,
                                &trust,
                                &trust.roles.controller,
                            )
                            .expect("signed by the controller key");
                        let d = Directive::parse(bytes).expect("a directive");
                        out.latest.lock().unwrap().insert((ring, product), d);
                    }
                    Ok(_) => {}
                    // Reconnect pace only; nothing waits on this.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        me
    }

    fn get(&self, ring: &str, product: &str) -> Option<Directive> {
        self.latest
            .lock()
            .unwrap()
            .get(&(ring.to_owned(), product.to_owned()))
            .cloned()
    }
}

fn rel(name: &str, sequence: u64) -> ReleaseRef {
    ReleaseRef {
        name: name.into(),
        version: format!("1.{sequence}.0"),
        sequence,
    }
}

fn product(current: ReleaseRef, target: ReleaseRef, phase: Phase, rollout: &str) -> ProductState {
    ProductState {
        current: Some(current),
        target: Some(target),
        phase,
        rollout_id: Some(rollout.into()),
        ..ProductState::idle()
    }
}

/// Publish the retained report of a device running `products`.
async fn report_products(
    w: &World,
    fleet: &Fleet,
    device: &str,
    products: BTreeMap<String, ProductState>,
) {
    let r = StateReport {
        seq: 1,
        products,
        ..testkit::idle_report(device, "canary", "sensor-v2")
    };
    fleet
        .client
        .publish(w.topics.state(device), QoS::AtLeastOnce, true, r.to_bytes())
        .await
        .unwrap();
}

async fn device(h: &ringcast_controller::ControllerHandle, id: &str) -> DeviceView {
    api(h, VIEWER)
        .device(id)
        .await
        .unwrap_or_else(|e| panic!("GET device {id}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_running_two_products_shows_each_in_the_api_and_the_cli() {
    let w = World::new();
    let h = w
        .start(w.config(vec![
            ring("canary", &[100.0], "10m", 1, 0.0),
            ring("broad", &[100.0], "10m", 1, 0.0),
        ]))
        .await;
    let fleet = Fleet::connect(&w).await;
    let watch = ProductWatcher::start(&w).await;
    // Known before the submissions, so both releases find a device class they are for.
    fleet.report("broad-0", "broad", None, Phase::Idle, 1).await;
    wait_for(10, "broad-0 known", || {
        h.shared()
            .devices
            .read()
            .unwrap()
            .get("broad-0")
            .map(|_| ())
    })
    .await;
    let os_env = testkit::sample_release("os", 5, 1).sign(&[&w.fx.release]);
    let (_, os) = h
        .engine()
        .submit(
            ringcast_controller::engine::Submit {
                envelope: os_env,
                start_at: None,
                activate_at: None,
                launch: None,
            },
            ops(),
        )
        .await
        .expect("os submitted");
    let (_, app) = w.submit_now(&h, 2).await;
    // Both rollouts are out on canary, each on its own product's topic.
    for (p, id) in [("os", &os.id), ("app", &app.id)] {
        let d = wait_for(10, &format!("{p} directive"), || watch.get("canary", p)).await;
        assert_eq!(d.product.as_deref(), Some(p));
        assert_eq!(&d.rollout_id, id);
    }

    let products = BTreeMap::from([
        (
            "os".to_owned(),
            product(rel("os", 5), rel("os", 5), Phase::Committed, &os.id),
        ),
        (
            "app".to_owned(),
            product(rel("app", 1), rel("app", 2), Phase::Probation, &app.id),
        ),
    ]);
    report_products(&w, &fleet, "canary-0", products).await;
    fleet
        .report("canary-1", "canary", Some(&app.id), Phase::Probation, 2)
        .await;
    wait_for(10, "canary devices known", || {
        let d = h.shared().devices.read().unwrap();
        (d.contains_key("canary-0") && d.contains_key("canary-1")).then_some(())
    })
    .await;

    let multi = device(&h, "canary-0").await;
    let shown: Vec<(&str, &str, Option<&str>, Option<&str>)> = multi
        .products
        .iter()
        .map(|p| {
            (
                p.product.as_str(),
                p.phase.as_str(),
                p.current.as_deref(),
                p.rollout_id.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("app", "probation", Some("app 1.1.0"), Some(app.id.as_str())),
            ("os", "committed", Some("os 1.5.0"), Some(os.id.as_str())),
        ]
    );
    let app_view = &multi.products[0];
    assert_eq!(
        app_view.prediction.as_ref().map(|p| p.rollout_id.as_str()),
        Some(app.id.as_str()),
        "the app forecast is the app rollout's"
    );
    let single = device(&h, "canary-1").await;
    assert!(single.products.is_empty());
    assert_eq!(single.phase.as_deref(), Some("probation"));
    let json: serde_json::Value =
        serde_json::from_str(&cli(&h, &["--json", "devices", "show", "canary-1"]).await).unwrap();
    assert!(
        json.get("products").is_none(),
        "absent for a device without products"
    );
    // The rollout filter finds a device by any of its products.
    let by_os = api(&h, VIEWER)
        .devices(None, None, Some(&os.id))
        .await
        .unwrap();
    assert_eq!(
        by_os.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["canary-0"]
    );

    let list = cli(&h, &["devices", "list", "--ring", "canary"]).await;
    let header = list.lines().next().unwrap_or_default();
    assert!(header.ends_with("PRODUCTS"), "{list}");
    let row = list
        .lines()
        .find(|l| l.starts_with("canary-0"))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(
        row.ends_with("app:probation 1.1.0; os:committed 1.5.0"),
        "{row}"
    );
    let row = list
        .lines()
        .find(|l| l.starts_with("canary-1"))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(
        row.contains("probation") && row.contains("app 1.1.0"),
        "{row}"
    );
    // Only devices without products listed: the table is as it always was.
    let list = cli(&h, &["devices", "list", "--ring", "broad"]).await;
    assert!(!list.contains("PRODUCTS"), "{list}");

    let show = cli(&h, &["devices", "show", "canary-0"]).await;
    for want in [
        format!(
            "product   app: probation, current app 1.1.0, rollout {}",
            app.id
        ),
        format!(
            "product   os: committed, current os 1.5.0, rollout {}",
            os.id
        ),
    ] {
        assert!(show.lines().any(|l| l == want), "{want:?} in\n{show}");
    }
    assert!(
        show.lines().any(|l| l.starts_with("update    app: ")),
        "a forecast per product:\n{show}"
    );
    assert!(!show.lines().any(|l| l.starts_with("phase ")), "{show}");
    let show = cli(&h, &["devices", "show", "canary-1"]).await;
    assert!(show.lines().any(|l| l == "phase     probation"), "{show}");
    assert!(!show.contains("product   "), "{show}");

    // Pinned for both products, the device is unpinned one product at a time, as
    // docs/operations.md §3.1 writes it: `ringcast devices unpin DEVICE --product os`.
    for release in [os.release_id.as_str(), app.release_id.as_str()] {
        let o = ringcast_as(&h, APPROVER, &["devices", "pin", "canary-0", release]).await;
        assert!(o.status.success(), "pin {release}: {o:?}");
    }
    let o = ringcast_as(&h, APPROVER, &["devices", "unpin", "canary-0"]).await;
    assert!(!o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("pin_ambiguous"),
        "{o:?}"
    );
    let o = ringcast_as(
        &h,
        APPROVER,
        &["--json", "devices", "unpin", "canary-0", "--product", "os"],
    )
    .await;
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["product"], "os", "{v}");
    assert_eq!(v["ended"], "unpinned", "{v}");
    // The app pin stands; now it is the only one, and a plain unpin ends it.
    let o = ringcast_as(&h, APPROVER, &["devices", "unpin", "canary-0"]).await;
    assert!(o.status.success(), "{o:?}");
    h.shutdown().await;
}
