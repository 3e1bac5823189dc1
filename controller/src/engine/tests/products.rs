//! Several products on the same rings: a rollout of release name N publishes on N's product
//! topic (signed with `product` N) and on the single-product topic, which the newest rollout
//! to publish on a ring holds; rollouts of different names advance side by side; a device
//! running several products is counted in each rollout through its report for that
//! rollout's product alone, and not at all in the rollouts of a product it does not run.

use super::*;
use crate::model::directive_key;
use ringcast_proto::{accept_directive, Action, AgentView, DeviceIdentity, Percent, Source, Topic};

/// The second product of these tests (the first is [`APP`]).
const OS: &str = "os";

/// A release of [`OS`] with `sequence` (rollback floor 1), for [`CLASS`].
fn os(sequence: u64) -> Release {
    testkit::sample_release(OS, sequence, 1)
}

/// A canary ring of four devices running both products, then an `os` rollout and, while it
/// runs, an `app` rollout, both published: `(harness, devices, os rollout, app rollout)`.
fn overlapping(rings: Vec<RingPolicy>) -> (Harness, Vec<String>, String, String) {
    let mut h = Harness::new(policy(rings));
    let devs = h.product_devices("canary", 4, &[OS, APP]);
    let os_id = h.submit_release(&os(5)).expect("os submitted");
    h.eval();
    h.tick(mins(1));
    let app_id = h.submit(2);
    h.eval();
    (h, devs, os_id, app_id)
}

fn agent_accepts(h: &Harness, product: Option<&str>, bytes: &[u8]) -> Result<(), Reason> {
    let me = DeviceIdentity {
        id: "canary-0",
        fleet: testkit::FLEET,
        ring: "canary",
        class: CLASS,
        product,
    };
    let view = AgentView {
        trust: &h.fx.trust,
        last_sequence: None,
        rollback_floor: 0,
        trusted_now: h.now,
        skew: mins(5),
    };
    accept_directive(&me, &view, Source::Ring, bytes)
        .map(|_| ())
        .map_err(|e| e.reason)
}

fn strictly_increasing(ds: &[Directive]) -> bool {
    ds.windows(2).all(|w| w[0].sequence < w[1].sequence)
}

#[test]
fn overlapping_rollouts_of_two_products_publish_on_their_own_topics_and_the_single_product_one() {
    let (h, _, os_id, app_id) = overlapping(vec![ring("canary")]);
    // Neither replaced the other: both run.
    assert_eq!(h.phase(&os_id), "publishing");
    assert_eq!(h.phase(&app_id), "publishing");

    for (product, id, name) in [(OS, &os_id, OS), (APP, &app_id, APP)] {
        let ds = h.product_directives("canary", product);
        assert_eq!(ds.len(), 1, "{product}: one step published");
        let d = &ds[0];
        assert_eq!(d.product.as_deref(), Some(product));
        assert_eq!(&d.rollout_id, id);
        assert_eq!(d.action, Action::Install);
        assert_eq!(d.percent, Percent::FULL);
        assert_eq!(Harness::embedded(d).name, name);
    }
    // The single-product topic: every rollout published there, the newest stands, unmarked.
    let legacy = h.directives("canary");
    assert_eq!(
        legacy
            .iter()
            .map(|d| d.rollout_id.as_str())
            .collect::<Vec<_>>(),
        [os_id.as_str(), app_id.as_str()]
    );
    assert!(legacy.iter().all(|d| d.product.is_none()));
    assert!(strictly_increasing(&legacy), "replay protection per topic");
    let st = h.state();
    assert_eq!(st.rings["canary"].rollout_id, app_id);
    assert_eq!(
        st.rings[&directive_key("canary", Some(OS))].rollout_id,
        os_id
    );
    assert_eq!(
        st.rings[&directive_key("canary", Some(APP))].rollout_id,
        app_id
    );

    // What an agent makes of them: the os agent takes the os topic's directive, refuses the
    // app one (replayed onto its topic), and an agent without products takes the unmarked one.
    let topics = h.topic_names().clone();
    let os_bytes = h
        .payloads_on(&topics.ring_product_directive("canary", OS))
        .pop()
        .unwrap();
    let app_bytes = h
        .payloads_on(&topics.ring_product_directive("canary", APP))
        .pop()
        .unwrap();
    let single = h
        .payloads_on(&topics.ring_directive("canary"))
        .pop()
        .unwrap();
    assert_eq!(agent_accepts(&h, Some(OS), &os_bytes), Ok(()));
    assert_eq!(
        agent_accepts(&h, Some(OS), &app_bytes),
        Err(Reason::WrongTarget)
    );
    assert_eq!(agent_accepts(&h, None, &single), Ok(()));
    assert_eq!(agent_accepts(&h, None, &os_bytes), Err(Reason::WrongTarget));
}

#[test]
fn re_signing_covers_every_product_record_and_the_single_product_one() {
    let (mut h, _, _, _) = overlapping(vec![ring("canary")]);
    let before: Vec<(String, u64)> = h
        .state()
        .rings
        .iter()
        .map(|(k, d)| (k.clone(), d.sequence))
        .collect();
    assert_eq!(before.len(), 3, "os, app and the single-product record");
    // The TTL is an hour: past half of it every record is signed again.
    h.tick(mins(31));
    for (key, seq) in before {
        let d = &h.state().rings[&key];
        assert!(d.sequence > seq, "{key} re-signed");
        assert!(h.last.changes.rings.contains(&key), "{key} persisted");
    }
    for product in [OS, APP] {
        assert_eq!(
            h.product_directives("canary", product).len(),
            2,
            "{product}"
        );
    }
    assert_eq!(h.directives("canary").len(), 3);
}

#[test]
fn an_os_failure_halts_os_alone_and_app_completes_beside_it() {
    let (mut h, devs, os_id, app_id) = overlapping(vec![ring("canary")]);
    for d in &devs {
        h.report_product(d, &app_id, Phase::Committed);
    }
    // Two of four fail os (0.5 > 0.2): os halts. The same devices committed app.
    h.report_product(&devs[0], &os_id, Phase::Reverted);
    h.report_product(&devs[1], &os_id, Phase::Failed);
    h.report_product(&devs[2], &os_id, Phase::Committed);
    h.eval();

    assert_eq!(h.phase(&os_id), "halted");
    assert!(
        h.stop_reason(&os_id)
            .starts_with("gate crossed in ring canary: 2 of 4 failed"),
        "{}",
        h.stop_reason(&os_id)
    );
    assert!(h.state().releases["os-5"].blocked.is_some());
    let t = h.tally_of(&app_id, "canary", Percent::FULL);
    assert_eq!(
        (t.devices, t.in_ramp, t.committed, t.failed, t.refused),
        (4, 4, 4, 0, 0),
        "os failures never show in app's tally"
    );
    assert_eq!(h.phase(&app_id), "baking");
    // The halt holds os's topic; the single-product topic is app's, which did not fail.
    let held = h.product_directives("canary", OS).pop().unwrap();
    assert_eq!(
        (held.action, held.rollout_id.as_str()),
        (Action::Hold, os_id.as_str())
    );
    assert!(h
        .directives("canary")
        .iter()
        .all(|d| d.action == Action::Install));
    assert_eq!(
        h.product_directives("canary", APP).pop().unwrap().action,
        Action::Install
    );

    h.tick(hours(1));
    assert_eq!(h.phase(&app_id), "completed");
    assert_eq!(h.phase(&os_id), "halted");
    assert_eq!(h.state().last_good[APP], "app-2");
    assert!(!h.state().last_good.contains_key(OS));
}

#[test]
fn os_refusals_make_os_unreachable_and_never_count_in_app() {
    let (mut h, devs, os_id, app_id) = overlapping(vec![ring("canary")]);
    for d in &devs {
        h.refuse_product(d, &os_id, Reason::RollbackFloor);
        h.report_product(d, &app_id, Phase::Committed);
    }
    h.eval();
    assert_eq!(h.phase(&os_id), "halted");
    let reason = h.stop_reason(&os_id);
    assert!(
        reason.starts_with(
            "gate unreachable in ring canary: of 4 devices in the ramp, 4 refused the directive"
        ),
        "{reason}"
    );
    assert!(reason.contains("rollback_floor"), "{reason}");
    let t = h.tally_of(&app_id, "canary", Percent::FULL);
    assert_eq!((t.committed, t.refused, t.pending), (4, 0, 0));
    assert_eq!(h.phase(&app_id), "baking");
}

#[test]
fn a_device_that_does_not_run_a_product_is_outside_its_rollouts() {
    let mut canary = ring("canary");
    canary.gate.min_reports = 4;
    let mut h = Harness::new(policy(vec![canary]));
    h.product_devices("canary", 2, &[OS, APP]);
    h.product_device("canary-app-0", "canary", &[APP]);
    h.product_device("canary-app-1", "canary", &[APP]);
    // An agent without products takes releases of every name, as before products.
    h.put("canary-single", "canary", Phase::Idle, None, None, None);

    let (os_rollout, warnings) = h
        .submit_envelope(os(5).sign(&[&h.fx.release]), None)
        .expect("os submitted");
    assert!(
        warnings.iter().any(|w| w
            .starts_with("ring canary has 3 known device(s), fewer than its gate's min_reports 4")),
        "os's ring counts the devices that run os: {warnings:?}"
    );
    let (app_rollout, warnings) = h
        .submit_envelope(release(2).sign(&[&h.fx.release]), None)
        .expect("app submitted");
    assert!(warnings.is_empty(), "app runs on all five: {warnings:?}");
    h.eval();
    let os_t = h.tally_of(&os_rollout.id, "canary", Percent::FULL);
    let app_t = h.tally_of(&app_rollout.id, "canary", Percent::FULL);
    assert_eq!((os_t.devices, os_t.in_ramp), (3, 3));
    assert_eq!((app_t.devices, app_t.in_ramp), (5, 5));
}

#[test]
fn a_product_nobody_runs_is_submitted_with_a_warning_naming_it() {
    let mut h = Harness::new(policy(vec![ring("canary")]));
    h.product_devices("canary", 2, &[OS, APP]);
    let (_, warnings) = h
        .submit_envelope(
            testkit::sample_release("fw", 1, 1).sign(&[&h.fx.release]),
            None,
        )
        .expect("fw submitted");
    assert!(
        warnings
            .iter()
            .any(|w| w == "no device runs product fw yet: compatibility not checked"),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("ring canary has 0 known device(s)")),
        "{warnings:?}"
    );
}

#[test]
fn an_abort_holds_its_product_topic_and_the_single_product_topic_only_while_it_stands_there() {
    let (mut h, _, os_id, app_id) = overlapping(vec![ring("canary")]);
    h.act(&os_id, RolloutAction::Abort).expect("os aborted");
    let held = h.product_directives("canary", OS).pop().unwrap();
    assert_eq!(held.action, Action::Hold);
    // app took the single-product topic after os: os's abort leaves it alone.
    let single = h.directive("canary");
    assert_eq!(
        (single.action, single.rollout_id.as_str()),
        (Action::Install, app_id.as_str())
    );
    assert_eq!(h.audited("hold"), 1);
    assert_eq!(h.phase(&app_id), "publishing");

    h.act(&app_id, RolloutAction::Abort).expect("app aborted");
    let single = h.directive("canary");
    assert_eq!(
        (single.action, single.rollout_id.as_str()),
        (Action::Hold, app_id.as_str())
    );
    assert_eq!(
        h.product_directives("canary", APP).pop().unwrap().action,
        Action::Hold
    );
    assert_eq!(h.product_directives("canary", OS).len(), 2, "os untouched");
}

#[test]
fn a_rollback_sends_back_its_product_topic_and_not_the_other_products_single_product_topic() {
    let mut canary = ring("canary");
    canary.on_failure = OnFailure::Rollback;
    let mut h = Harness::new(policy(vec![canary]));
    let devs = h.product_devices("canary", 2, &[OS, APP]);
    let os1 = h.submit_release(&os(1)).unwrap();
    h.eval();
    for d in &devs {
        h.report_product(d, &os1, Phase::Committed);
    }
    h.eval();
    h.tick(hours(1));
    assert_eq!(h.phase(&os1), "completed");

    let os2 = h.submit_release(&os(2)).unwrap();
    h.eval();
    let app = h.submit(2);
    h.eval();
    for d in &devs {
        h.report_product(d, &os2, Phase::Reverted);
    }
    h.eval();
    match h.rollout_state(&os2) {
        RolloutState::RolledBack { to, .. } => assert_eq!(to, "os-1"),
        other => panic!("not rolled back: {other:?}"),
    }
    let d = h.product_directives("canary", OS).pop().unwrap();
    assert_eq!(d.rollout_id, format!("{os2}-rollback"));
    assert_eq!(Harness::embedded(&d).sequence, 1, "back to os-1");
    assert_eq!(d.product.as_deref(), Some(OS));
    // The single-product topic is app's: not sent back to an os release.
    assert_eq!(h.directive("canary").rollout_id, app);
    assert_eq!(h.phase(&app), "publishing");
}

#[test]
fn two_rollouts_of_the_same_product_still_supersede() {
    let (mut h, _, os_id, app_id) = overlapping(vec![ring("canary")]);
    let newer = h.submit_release(&os(6)).unwrap();
    assert_eq!(
        h.rollout_state(&os_id),
        &RolloutState::Superseded { by: newer.clone() }
    );
    assert_eq!(
        h.phase(&app_id),
        "publishing",
        "another product is not touched"
    );
    h.eval();
    assert_eq!(
        h.product_directives("canary", OS).pop().unwrap().rollout_id,
        newer
    );
}

fn pin(h: &mut Harness, device: &str, release: &str) -> Result<crate::model::DevicePin> {
    match h.handle(Input::Pin {
        device: device.into(),
        release: release.into(),
        actor: Harness::operator(),
    })? {
        Reply::Pin(p) => Ok(p),
        other => panic!("pin answered {other:?}"),
    }
}

fn unpin(h: &mut Harness, device: &str, product: Option<&str>) -> Result<crate::model::DevicePin> {
    match h.handle(Input::Unpin {
        device: device.into(),
        product: product.map(str::to_owned),
        actor: Harness::operator(),
    })? {
        Reply::Pin(p) => Ok(p),
        other => panic!("unpin answered {other:?}"),
    }
}

/// `device`'s directive topic for `product` (`None`: its single-product topic).
fn device_topic(h: &Harness, device: &str, product: Option<&str>) -> String {
    h.topic_names().directive("canary", Some(device), product)
}

#[test]
fn pins_stand_per_product_and_a_new_rollout_retires_only_its_own_products_pins() {
    let (mut h, devs, _, app_id) = overlapping(vec![ring("canary")]);
    let p = pin(&mut h, &devs[0], "os-5").expect("pinned");
    assert_eq!(p.directive.product.as_deref(), Some(OS));
    let os_topic = device_topic(&h, &devs[0], Some(OS));
    let single_topic = device_topic(&h, &devs[0], None);
    assert!(matches!(
        h.topic_names().parse(&os_topic),
        Ok(Topic::DeviceProductDirective { .. })
    ));
    let on_os = h.directives_on(&os_topic);
    let on_single = h.directives_on(&single_topic);
    assert_eq!(on_os.len(), 1);
    assert_eq!(on_single.len(), 1);
    assert_eq!(on_os[0].product.as_deref(), Some(OS));
    assert_eq!(on_os[0].device.as_deref(), Some(devs[0].as_str()));
    assert!(on_single[0].product.is_none());
    assert_eq!(on_os[0].rollout_id, on_single[0].rollout_id, "one pin");
    assert!(h.state().pin_of(&devs[0], OS).is_some());
    assert!(h.state().pin_of(&devs[0], APP).is_none());

    // A new app rollout on the ring: the single-product pin ends (an agent without products
    // drops its pin for any new ring rollout), the os pin stands.
    let app3 = h.submit(3);
    h.eval();
    assert_eq!(h.phase(&app_id), "superseded");
    assert_eq!(h.directive("canary").rollout_id, app3);
    assert!(h
        .state()
        .pins
        .contains_key(&directive_key(&devs[0], Some(OS))));
    assert!(!h.state().pins.contains_key(&devs[0]));
    assert_eq!(h.payloads_on(&single_topic).last(), Some(&Vec::new()));
    assert!(h.payloads_on(&os_topic).iter().all(|p| !p.is_empty()));
    assert_eq!(
        h.audit_details("unpin").len(),
        1,
        "one pin ended, said once"
    );

    // A new os rollout ends the os pin.
    let os6 = h.submit_release(&os(6)).unwrap();
    h.eval();
    assert_eq!(h.directive("canary").rollout_id, os6);
    assert!(h.state().pins.is_empty());
    assert_eq!(h.payloads_on(&os_topic).last(), Some(&Vec::new()));
}

#[test]
fn unpin_names_the_product_when_a_device_is_pinned_for_several() {
    let (mut h, devs, _, _) = overlapping(vec![ring("canary")]);
    pin(&mut h, &devs[1], "os-5").unwrap();
    pin(&mut h, &devs[1], "app-2").unwrap();
    let e = unpin(&mut h, &devs[1], None).expect_err("which one?");
    assert_eq!(e.code(), "pin_ambiguous");
    let ended = unpin(&mut h, &devs[1], Some(APP)).expect("app unpinned");
    assert_eq!(ended.directive.product.as_deref(), Some(APP));
    assert_eq!(ended.directive.action, Action::Hold);
    // The single-product record was app's pin (the newer one): it ended with it.
    assert!(h.state().pins[devs[1].as_str()].pinned_release().is_none());
    // One pin left: no need to name it.
    let ended = unpin(&mut h, &devs[1], None).expect("os unpinned");
    assert_eq!(ended.directive.product.as_deref(), Some(OS));
    assert_eq!(
        unpin(&mut h, &devs[1], None)
            .expect_err("nothing left")
            .code(),
        "not_pinned"
    );
    // A device that runs only app cannot be pinned to an os release.
    h.product_device("canary-app", "canary", &[APP]);
    assert_eq!(
        pin(&mut h, "canary-app", "os-5").expect_err("no os").code(),
        "incompatible"
    );
}

#[test]
fn state_persisted_before_products_loads_as_single_product_records_and_gains_product_ones() {
    let mut h = Harness::new(policy(vec![ring("canary")]));
    let devs = h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    pin(&mut h, &devs[0], "app-2").unwrap();
    // What an older version persisted: the same records with no product, and nothing on the
    // product topics.
    let mut old = roundtrip(h.state());
    old.rings.retain(|k, _| !k.contains('/'));
    old.pins.retain(|k, _| !k.contains('/'));
    let strip = |v: serde_json::Value| {
        let mut v = v;
        v.as_object_mut().unwrap().remove("product");
        v
    };
    for d in old.rings.values_mut() {
        let v = strip(serde_json::to_value(&*d).unwrap());
        *d = serde_json::from_value(v).unwrap();
    }
    let legacy_seq = old.rings["canary"].sequence;
    let published = h.product_directives("canary", APP).len();
    h.restart_from(policy(vec![ring("canary")]), old);

    let st = h.state();
    assert_eq!(st.rings["canary"].rollout_id, id);
    assert!(st.rings["canary"].product.is_none());
    assert!(st.rings["canary"].sequence > legacy_seq);
    let adopted = &st.rings[&directive_key("canary", Some(APP))];
    assert_eq!(
        (adopted.rollout_id.as_str(), adopted.action, adopted.percent),
        (id.as_str(), Action::Install, Percent::FULL)
    );
    assert!(st.pins.contains_key(&directive_key(&devs[0], Some(APP))));
    assert_eq!(h.product_directives("canary", APP).len(), published + 1);
    assert_eq!(h.audited("product_directives"), 1);
    // Once adopted, a restart has nothing more to adopt.
    h.restart();
    assert_eq!(h.audited("product_directives"), 1);
    // And the rollout carries on as before.
    h.report_all("canary", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    assert_eq!(h.phase(&id), "completed");
}

#[test]
fn forecasts_walk_each_products_fleet_and_predict_per_product() {
    use crate::engine::forecast::{forecast, FleetView, NoHistory, Wait};
    let mut canary = ring("canary");
    canary.gate.min_reports = 3;
    let mut h = Harness::new(policy(vec![canary]));
    h.product_devices("canary", 2, &[OS, APP]);
    h.product_device("canary-app", "canary", &[APP]);
    let os_id = h.submit_release(&os(5)).unwrap();
    h.tick(mins(1));
    let app_id = h.submit(2);
    h.eval();
    let view = FleetView {
        devices: &h.devices,
        history: &NoHistory,
    };
    let f = forecast(h.core.policy(), h.state(), &view, h.now);
    let by_id = |id: &str| {
        f.rollouts
            .iter()
            .find(|r| r.rollout_id == id)
            .unwrap_or_else(|| panic!("no forecast of {id}"))
    };
    // Two devices run os: its gate of three cannot be met; app's three can.
    assert_eq!(
        by_id(&os_id).waits,
        Some(Wait::GateUnreachable {
            ring: "canary".into(),
            step: 0,
            needed: 3,
            can_commit: 2
        })
    );
    assert!(by_id(&app_id).completes_at.is_some());
    let os_p = f.device_product("canary-0", OS).expect("an os prediction");
    let app_p = f
        .device_product("canary-0", APP)
        .expect("an app prediction");
    assert_eq!(os_p.rollout_id, os_id);
    assert_eq!(app_p.rollout_id, app_id);
    assert!(app_p.at.is_some());
    assert_eq!(
        f.device("canary-0").map(|p| p.rollout_id.as_str()),
        Some(app_id.as_str())
    );
    assert!(
        f.device_product("canary-app", OS).is_none(),
        "it does not run os"
    );
    assert_eq!(
        f.device("canary-app").map(|p| p.rollout_id.as_str()),
        Some(app_id.as_str())
    );
}
