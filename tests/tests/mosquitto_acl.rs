//! The shipped Mosquitto config and ACL (deploy/mosquitto/) enforce DESIGN.md's topic rules
//! over mutual TLS: a device reads trust, ring directives and ITS OWN device directive, and
//! writes only under its own `devices/{device}/`; the controller does everything; the
//! observer reads everything and writes nothing; a device cannot take over another's session;
//! a client without a certificate from the fleet CA is refused. ACCEPTANCE.md item 20.
//!
//! What Mosquitto 2.0 does on a denial (measured, and what these tests assert):
//! - denied PUBLISH (MQTT 3.1.1, QoS 1): the broker sends a normal PUBACK and drops the
//!   message, so the only observable effect is that nobody receives it;
//! - SUBSCRIBE to a topic the client may not read: SUBACK GRANTS it, and the broker filters
//!   each message at delivery against the read ACL, so again: nothing arrives;
//! - no client certificate: the TLS handshake fails ("peer did not return a certificate"),
//!   no CONNACK is ever sent.
//!
//! A negative ("nothing arrives") is only checked after a positive control message sent
//! later on the same path has arrived, so the short wait that follows is belt and braces.
//!
//! Without a `mosquitto` binary these tests print "skipped: mosquitto not found" and pass,
//! except under `CI`, where they fail.

use ringcast_proto::Topics;
use ringcast_tests::certs::{run_make_certs, CertSet, ClientCert};
use ringcast_tests::lab::MosquittoLab;
use ringcast_tests::mqtt::{tls_options, TestClient};
use rumqttc::MqttOptions;
use std::time::Duration;

/// Bound on every positive wait (connect, ack, delivery).
const WAIT: Duration = Duration::from_secs(10);
/// The one legitimate negative wait: after a positive control has arrived.
const SILENCE: Duration = Duration::from_millis(500);

const FLEET: &str = "plant-7";
const DEV_A: &str = "dev-a";
const DEV_B: &str = "dev-b";

/// The shipped broker with certificates for the controller, dev-a and dev-b, and the fleet's
/// topic names.
struct Lab {
    lab: MosquittoLab,
    topics: Topics,
}

impl Lab {
    fn start() -> Option<Lab> {
        Some(Lab {
            lab: MosquittoLab::start(&[DEV_A, DEV_B])?,
            topics: Topics::for_fleet(FLEET).unwrap(),
        })
    }

    async fn controller(&self) -> TestClient {
        self.lab.connect_controller("controller").await
    }

    async fn device(&self, id: &str) -> TestClient {
        self.lab.connect_device(id).await
    }

    /// Options for a client presenting `who`, or no certificate at all.
    fn options(&self, client_id: &str, who: Option<&ClientCert>) -> MqttOptions {
        let b = self.lab.broker();
        tls_options(
            client_id,
            b.host(),
            b.port(),
            self.lab.certs().ca_pem().unwrap(),
            who,
        )
        .unwrap()
    }
}

#[tokio::test]
async fn device_publishes_its_own_reports_and_reads_trust_ring_and_own_directive() {
    let Some(lab) = Lab::start() else { return };
    let t = &lab.topics;
    let mut ctl = lab.controller().await;
    ctl.subscribe_ok(&format!("{}/devices/+/#", t.prefix()), WAIT)
        .await
        .unwrap();

    // The controller publishes retained trust, ring and device directives before dev-a is
    // even connected: a device coming online must find them (retained, DESIGN.md topics).
    ctl.publish(&t.trust(), "trust-v1", true, WAIT)
        .await
        .unwrap();
    ctl.publish(&t.ring_directive("canary"), "ring-directive", true, WAIT)
        .await
        .unwrap();
    ctl.publish(&t.device_directive(DEV_A), "pin-for-a", true, WAIT)
        .await
        .unwrap();
    for topic in t.product_subscriptions("canary", DEV_A, "os") {
        ctl.publish(&topic, "os-directive", true, WAIT)
            .await
            .unwrap();
    }

    let mut a = lab.device(DEV_A).await;
    let product_topics = t.product_subscriptions("canary", DEV_A, "os");
    for topic in t
        .agent_subscriptions("canary", DEV_A)
        .iter()
        .chain(&product_topics)
    {
        a.subscribe_ok(topic, WAIT).await.unwrap();
        let got = a.expect_publish(topic, WAIT).await.unwrap();
        assert!(got.retain, "{topic} should arrive as a retained message");
    }

    for (topic, body) in [
        (t.state(DEV_A), "state-a"),
        (t.events(DEV_A), "event-a"),
        (t.online(DEV_A), "true"),
    ] {
        a.publish(&topic, body, true, WAIT).await.unwrap();
        let got = ctl.expect_publish(&topic, WAIT).await.unwrap();
        assert_eq!(&got.payload[..], body.as_bytes());
    }
}

#[tokio::test]
async fn another_device_cannot_publish_to_a_devices_topics() {
    let Some(lab) = Lab::start() else { return };
    let t = &lab.topics;
    let mut ctl = lab.controller().await;
    ctl.subscribe_ok(&format!("{}/#", t.prefix()), WAIT)
        .await
        .unwrap();
    let mut b = lab.device(DEV_B).await;

    // dev-b impersonates dev-a: a healthy state, a "committed" event, an online flag. The
    // broker acknowledges each (Mosquitto acks denied QoS 1 publishes) and delivers none.
    let forged = [t.state(DEV_A), t.events(DEV_A), t.online(DEV_A)];
    for topic in &forged {
        b.publish(topic, "forged-by-b", true, WAIT).await.unwrap();
    }
    // Positive control on the same connection, sent after the forgeries: once it arrives,
    // anything the broker had delivered from dev-b before it would have arrived too.
    b.publish(&t.state(DEV_B), "state-b", true, WAIT)
        .await
        .unwrap();
    let got = ctl.expect_publish(&t.state(DEV_B), WAIT).await.unwrap();
    assert_eq!(&got.payload[..], b"state-b");
    ctl.expect_nothing(|topic| forged.iter().any(|f| f == topic), SILENCE)
        .await
        .unwrap();

    // Nor did anything get retained: a fresh subscriber to dev-a's topics finds nothing,
    // while dev-b's own retained state is there (control).
    let mut late = lab.lab.connect_observer("observer-late").await;
    late.subscribe_ok(&format!("{}/devices/#", t.prefix()), WAIT)
        .await
        .unwrap();
    late.expect_publish(&t.state(DEV_B), WAIT).await.unwrap();
    late.expect_nothing(|topic| forged.iter().any(|f| f == topic), SILENCE)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_device_cannot_publish_directives_or_trust() {
    let Some(lab) = Lab::start() else { return };
    let t = &lab.topics;
    let mut a = lab.device(DEV_A).await;
    for topic in t.agent_subscriptions("canary", DEV_A) {
        a.subscribe_ok(&topic, WAIT).await.unwrap();
    }
    let mut b = lab.device(DEV_B).await;
    let forged = [
        t.trust(),
        t.ring_directive("canary"),
        t.device_directive(DEV_A),
        // Not even its own device directive: only the controller targets devices.
        t.device_directive(DEV_B),
        t.ring_product_directive("canary", "os"),
        t.device_product_directive(DEV_A, "os"),
        t.device_product_directive(DEV_B, "os"),
    ];
    for topic in &forged {
        b.publish(topic, "forged-by-b", true, WAIT).await.unwrap();
    }
    // Control: the controller's directive, sent after the forgeries, reaches dev-a.
    let mut ctl = lab.controller().await;
    ctl.publish(&t.device_directive(DEV_A), "real", false, WAIT)
        .await
        .unwrap();
    let got = a
        .expect_publish(&t.device_directive(DEV_A), WAIT)
        .await
        .unwrap();
    assert_eq!(
        &got.payload[..],
        b"real",
        "a forged directive was delivered first"
    );
    a.expect_nothing(|_| true, SILENCE).await.unwrap();
}

#[tokio::test]
async fn another_device_cannot_read_a_devices_directive() {
    let Some(lab) = Lab::start() else { return };
    let t = &lab.topics;
    let mut ctl = lab.controller().await;
    ctl.publish(&t.device_directive(DEV_A), "pin-for-a", true, WAIT)
        .await
        .unwrap();
    let a_os = t.device_product_directive(DEV_A, "os");
    ctl.publish(&a_os, "os-pin-for-a", true, WAIT)
        .await
        .unwrap();
    ctl.publish(&t.trust(), "trust-v1", true, WAIT)
        .await
        .unwrap();

    let mut b = lab.device(DEV_B).await;
    // Mosquitto 2.0 grants the SUBSCRIBE and filters at delivery; the observable effect is
    // that neither the retained nor a live directive of dev-a ever reaches dev-b, even
    // through a wildcard.
    b.subscribe(&t.device_directive(DEV_A), WAIT).await.unwrap();
    b.subscribe(&a_os, WAIT).await.unwrap();
    b.subscribe(&format!("{}/#", t.prefix()), WAIT)
        .await
        .unwrap();
    // Control: the retained trust root, which dev-b may read, arrives.
    b.expect_publish(&t.trust(), WAIT).await.unwrap();

    ctl.publish(&t.device_directive(DEV_A), "hotfix-for-a", false, WAIT)
        .await
        .unwrap();
    ctl.publish(&a_os, "os-hotfix-for-a", false, WAIT)
        .await
        .unwrap();
    ctl.publish(&t.device_directive(DEV_B), "for-b", false, WAIT)
        .await
        .unwrap();
    // Control: dev-b's own directive, sent after dev-a's, arrives.
    let got = b
        .expect_publish(&t.device_directive(DEV_B), WAIT)
        .await
        .unwrap();
    assert_eq!(&got.payload[..], b"for-b");
    let a_dir = t.device_directive(DEV_A);
    b.expect_nothing(|topic| topic == a_dir || topic == a_os, SILENCE)
        .await
        .unwrap();

    // And dev-a itself does read it (the denial is specific to dev-b).
    let mut a = lab.device(DEV_A).await;
    a.subscribe_ok(&a_dir, WAIT).await.unwrap();
    let got = a.expect_publish(&a_dir, WAIT).await.unwrap();
    assert_eq!(&got.payload[..], b"pin-for-a");
    a.subscribe_ok(&a_os, WAIT).await.unwrap();
    let got = a.expect_publish(&a_os, WAIT).await.unwrap();
    assert_eq!(&got.payload[..], b"os-pin-for-a");
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let Some(lab) = Lab::start() else { return };
    let opts = lab.options("anonymous", None);
    let err = TestClient::expect_refused(opts, WAIT).await.unwrap();
    // TLS 1.3 alert 116: the broker demanded a client certificate (require_certificate true).
    assert!(
        err.contains("CertificateRequired"),
        "refused for another reason: {err}\n{}",
        lab.lab.broker().log()
    );
}

#[tokio::test]
async fn client_with_a_certificate_from_another_ca_is_refused() {
    let Some(lab) = Lab::start() else { return };
    // A second, unrelated CA issues a certificate with a legitimate-looking CN.
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue = CertSet::generate(rogue_dir.path(), &[DEV_A]).unwrap();
    let opts = lab.options("rogue-dev-a", Some(&rogue.device(DEV_A)));
    TestClient::expect_refused(opts, WAIT).await.unwrap();
    // Its controller certificate is refused just the same.
    let opts = lab.options("rogue-controller", Some(&rogue.controller()));
    TestClient::expect_refused(opts, WAIT).await.unwrap();
}

#[tokio::test]
async fn controller_reads_and_writes_every_topic() {
    let Some(lab) = Lab::start() else { return };
    let t = &lab.topics;
    // One connection: the broker allows one per certificate, and MQTT 3.1.1 delivers a
    // client's own publishes back to it when it is subscribed.
    let mut ctl = lab.controller().await;
    ctl.subscribe_ok(&format!("{}/#", t.prefix()), WAIT)
        .await
        .unwrap();
    for topic in [
        t.trust(),
        t.ring_directive("canary"),
        t.device_directive(DEV_A),
        t.state(DEV_A),
        t.events(DEV_B),
        t.online(DEV_B),
    ] {
        ctl.publish(&topic, "x", false, WAIT).await.unwrap();
        ctl.expect_publish(&topic, WAIT).await.unwrap();
    }
}

/// The controller re-reads the fleet when the broker's drop counter grows, so the shipped ACL
/// lets it (and only it) read that one `$SYS` topic; Mosquitto publishes it retained.
#[tokio::test]
async fn only_the_controller_reads_the_brokers_drop_counter() {
    let Some(lab) = Lab::start() else { return };
    const DROPPED: &str = "$SYS/broker/publish/messages/dropped";
    let mut a = lab.device(DEV_A).await;
    a.subscribe_ok(DROPPED, WAIT).await.unwrap();
    let mut ctl = lab.controller().await;
    ctl.subscribe_ok(DROPPED, WAIT).await.unwrap();
    let p = ctl.expect_publish(DROPPED, WAIT).await.unwrap();
    assert!(
        std::str::from_utf8(&p.payload)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some(),
        "the drop counter is a number: {:?}",
        p.payload
    );
    // Control first: the device still receives what it may read.
    ctl.publish(&lab.topics.trust(), "control", false, WAIT)
        .await
        .unwrap();
    a.subscribe_ok(&lab.topics.trust(), WAIT).await.unwrap();
    ctl.publish(&lab.topics.trust(), "control", false, WAIT)
        .await
        .unwrap();
    a.expect_publish(&lab.topics.trust(), WAIT).await.unwrap();
    a.expect_nothing(|t| t == DROPPED, SILENCE).await.unwrap();
}

#[tokio::test]
async fn observer_reads_every_topic_and_publishes_nothing() {
    let Some(lab) = Lab::start() else { return };
    let t = &lab.topics;
    let mut obs = lab.lab.connect_observer("observer").await;
    obs.subscribe_ok(&format!("{}/#", t.prefix()), WAIT)
        .await
        .unwrap();
    let mut ctl = lab.controller().await;
    ctl.subscribe_ok(&format!("{}/#", t.prefix()), WAIT)
        .await
        .unwrap();
    let mut a = lab.device(DEV_A).await;
    ctl.publish(&t.device_directive(DEV_A), "pin", false, WAIT)
        .await
        .unwrap();
    a.publish(&t.state(DEV_A), "state-a", false, WAIT)
        .await
        .unwrap();
    obs.expect_publish(&t.device_directive(DEV_A), WAIT)
        .await
        .unwrap();
    obs.expect_publish(&t.state(DEV_A), WAIT).await.unwrap();

    // The observer tries to publish a directive, a trust root and a device report.
    let forged = [t.ring_directive("canary"), t.trust(), t.state(DEV_B)];
    for topic in &forged {
        obs.publish(topic, "from-observer", false, WAIT)
            .await
            .unwrap();
    }
    // Control: sent after the forgeries, it arrives; the forgeries do not.
    a.publish(&t.events(DEV_A), "event-a", false, WAIT)
        .await
        .unwrap();
    ctl.expect_publish(&t.events(DEV_A), WAIT).await.unwrap();
    ctl.expect_nothing(|topic| forged.iter().any(|f| f == topic), SILENCE)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_device_cannot_take_over_another_devices_session() {
    let Some(lab) = Lab::start() else { return };
    let t = &lab.topics;
    let mut ctl = lab.controller().await;
    ctl.subscribe_ok(&format!("{}/devices/+/state", t.prefix()), WAIT)
        .await
        .unwrap();
    let mut a = lab.device(DEV_A).await;

    // dev-b connects claiming dev-a's client id. With `use_username_as_clientid` the broker
    // names the session after dev-b's certificate, so dev-a's connection is not replaced.
    let opts = lab.options(DEV_A, Some(&lab.lab.certs().device(DEV_B)));
    let mut b = TestClient::connect(opts, WAIT).await.unwrap();
    b.publish(&t.state(DEV_B), "state-b", false, WAIT)
        .await
        .unwrap();
    ctl.expect_publish(&t.state(DEV_B), WAIT).await.unwrap();
    lab.lab
        .broker()
        .wait_for_log(&format!("as {DEV_B} ("), WAIT)
        .await
        .unwrap();

    // dev-a is still connected: its next report goes through on the same connection.
    a.publish(&t.state(DEV_A), "state-a", false, WAIT)
        .await
        .unwrap();
    ctl.expect_publish(&t.state(DEV_A), WAIT).await.unwrap();
    assert!(
        a.errors().is_empty(),
        "dev-a was disconnected: {:?}\n{}",
        a.errors(),
        lab.lab.broker().log()
    );
}

#[test]
fn make_certs_refuses_device_ids_that_are_unsafe_in_topics() {
    if which_openssl().is_none() {
        assert!(!ringcast_tests::is_ci(), "openssl missing under CI");
        eprintln!("skipped: openssl not found (apt-get install openssl)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for bad in [
        "a/b",
        "a+b",
        "#",
        "..",
        "",
        "ringcast-controller",
        "ringcast-observer",
        "dev a",
    ] {
        let err = run_make_certs(dir.path(), &[bad]).unwrap_err();
        assert_eq!(err.code(), "command_failed", "{bad:?}: {err}");
    }
    // Nothing was issued for a refused name (the check runs before any key is made).
    assert!(!dir.path().join("devices").join("a+b.crt").exists());
    assert!(!dir.path().join("ca.key").exists());
}

fn which_openssl() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("openssl"))
            .find(|p| p.is_file())
    })
}

#[tokio::test]
async fn retained_trust_directives_and_reports_survive_a_broker_restart() {
    // The controller's tallies come from retained state reports and devices coming online
    // need the retained trust root and directives (DESIGN.md "Controller"): the shipped
    // config's persistence must keep them across a restart.
    let Some(mut lab) = Lab::start() else { return };
    let t = lab.topics.clone();
    {
        let mut ctl = lab.controller().await;
        ctl.publish(&t.trust(), "trust-v1", true, WAIT)
            .await
            .unwrap();
        ctl.publish(&t.ring_directive("canary"), "ring-dir", true, WAIT)
            .await
            .unwrap();
        let mut a = lab.device(DEV_A).await;
        a.publish(&t.state(DEV_A), "state-a", true, WAIT)
            .await
            .unwrap();
        // Control: the retained state is on the broker before it stops.
        ctl.subscribe_ok(&t.state(DEV_A), WAIT).await.unwrap();
        ctl.expect_publish(&t.state(DEV_A), WAIT).await.unwrap();
    }
    let port = lab.lab.broker().port();
    lab.lab.broker_mut().restart().unwrap();
    assert_eq!(lab.lab.broker().port(), port, "restart must keep the port");

    let mut ctl = lab.lab.connect_controller("controller-after").await;
    ctl.subscribe_ok(&format!("{}/#", t.prefix()), WAIT)
        .await
        .unwrap();
    for (topic, body) in [
        (t.trust(), "trust-v1"),
        (t.ring_directive("canary"), "ring-dir"),
        (t.state(DEV_A), "state-a"),
    ] {
        let got = ctl.expect_publish(&topic, WAIT).await.unwrap();
        assert_eq!(&got.payload[..], body.as_bytes(), "{topic}");
        assert!(got.retain);
    }
}

#[tokio::test]
async fn a_devices_last_will_marks_it_offline_but_cannot_speak_for_another_device() {
    let Some(lab) = Lab::start() else { return };
    let t = &lab.topics;
    let mut ctl = lab.controller().await;
    ctl.subscribe_ok(&format!("{}/devices/+/online", t.prefix()), WAIT)
        .await
        .unwrap();

    // dev-b registers a will on dev-a's online topic: when dev-b vanishes, the broker must
    // not announce "dev-a is offline".
    let mut opts = lab.options("forged-will", Some(&lab.lab.certs().device(DEV_B)));
    opts.set_last_will(rumqttc::LastWill::new(
        t.online(DEV_A),
        "false",
        rumqttc::QoS::AtLeastOnce,
        true,
    ));
    // Mosquitto 2.0.11 accepts the CONNECT and checks the will against the ACL when it fires
    // (a stricter broker may refuse the CONNECT): either way nothing reaches dev-a's topic.
    if let Ok(b) = TestClient::connect(opts, WAIT).await {
        drop(b); // vanish without DISCONNECT: the broker fires (and must drop) the will now
        lab.lab
            .broker()
            // The broker names the client after its certificate (use_username_as_clientid).
            .wait_for_log("Client dev-b closed its connection", WAIT)
            .await
            .unwrap();
    }

    // dev-a's own will (the agent's LWT, DESIGN.md topics) does fire when it vanishes.
    let mut opts = lab.options(DEV_A, Some(&lab.lab.certs().device(DEV_A)));
    opts.set_last_will(rumqttc::LastWill::new(
        t.online(DEV_A),
        "false",
        rumqttc::QoS::AtLeastOnce,
        true,
    ));
    let mut a = TestClient::connect(opts, WAIT).await.unwrap();
    a.publish(&t.online(DEV_A), "true", true, WAIT)
        .await
        .unwrap();
    let got = ctl.expect_publish(&t.online(DEV_A), WAIT).await.unwrap();
    assert_eq!(
        &got.payload[..],
        b"true",
        "dev-b's forged will was delivered"
    );
    drop(a);
    let got = ctl.expect_publish(&t.online(DEV_A), WAIT).await.unwrap();
    assert_eq!(&got.payload[..], b"false");
    ctl.expect_nothing(|topic| topic == t.online(DEV_A), SILENCE)
        .await
        .unwrap();
}

#[tokio::test]
async fn devices_added_later_from_the_same_ca_can_connect() {
    let Some(lab) = Lab::start() else { return };
    // Re-running the script on the same directory keeps the CA and issues only the new one.
    lab.lab.certs().add_devices(&[DEV_A, "dev-c"]).unwrap();
    let t = &lab.topics;
    let mut ctl = lab.controller().await;
    ctl.subscribe_ok(&t.state("dev-c"), WAIT).await.unwrap();
    let mut c = lab.device("dev-c").await;
    c.publish(&t.state("dev-c"), "state-c", false, WAIT)
        .await
        .unwrap();
    ctl.expect_publish(&t.state("dev-c"), WAIT).await.unwrap();
    // dev-a's existing certificate still works (it was not re-issued).
    let _a = lab.device(DEV_A).await;
}
