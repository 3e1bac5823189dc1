//! ACCEPTANCE 26: one oversized message (10 MB) on every topic a client subscribes to — the
//! agent's trust topic, its ring's and its own directive, and a device state topic the
//! controller reads — on a broker whose packet limit is larger than the shipped one (20 MiB
//! here). Neither side goes deaf: the agent still installs a release published afterwards,
//! also after a restart with the 10 MB messages still retained, and the controller still
//! ingests its reports. Under MQTT 5 the broker never sends the oversized packets (both
//! clients announce a 256 KiB Maximum Packet Size); under MQTT 3.1.1 the clients read them
//! and refuse them as `too_large`.

use ringcast_io::mqtt::Protocol;
use ringcast_proto::{EventKind, Reason, Topics};
use ringcast_tests::mqtt::publish_all;
use ringcast_tests::sim_stage::{ring, BrokerKind, Stage, StageSpec, FLEET};
use std::sync::atomic::Ordering;
use std::time::Duration;

const DEVICE: &str = "canary-000";

/// `too_large` rejections the agent reported (from the controller's event history).
fn too_large_rejections(stage: &Stage) -> usize {
    stage
        .controller()
        .shared()
        .store
        .device_events(DEVICE, 100)
        .expect("event history")
        .iter()
        .filter(|e| {
            matches!(
                &e.event.kind,
                EventKind::Rejected {
                    reason: Reason::TooLarge,
                    ..
                }
            )
        })
        .count()
}

/// Times `client` connected, from the broker's log (a deaf client reconnects over and over).
fn connects(stage: &Stage, client: &str) -> usize {
    let log = stage.mosquitto().map(|m| m.log()).unwrap_or_default();
    let needle = format!(" as {client} ");
    log.lines()
        .filter(|l| l.contains("New client connected") && l.contains(&needle))
        .count()
}

async fn oversized_messages_make_nobody_deaf(protocol: Protocol) {
    let mut spec = StageSpec::new(
        BrokerKind::MosquittoPlain,
        vec![ring("canary", &[100.0], "1m", 1, 0.0)],
        &[1],
    );
    spec.protocol = protocol;
    spec.mosquitto_overrides = vec![("max_packet_size".into(), "20971520".into())];
    let Some(mut stage) = Stage::start(spec).await else {
        return;
    };
    let topics = Topics::for_fleet(FLEET).expect("fleet name");
    let big = vec![b'{'; 10 * 1024 * 1024];
    let targets = [
        topics.trust(),
        topics.ring_directive("canary"),
        topics.device_directive(DEVICE),
        topics.state("ghost-1"),
    ];
    publish_all(
        "big-publisher",
        ringcast_tests::synthetic::port_of(stage.broker_url()).expect("port"),
        targets.iter().map(|t| (t.clone(), big.clone())).collect(),
        true,
        Duration::from_secs(60),
    )
    .await
    .expect("the broker takes 10 MB messages");

    // With the 10 MB messages still retained, the agent starts again and subscribes.
    stage.fleet.stop(DEVICE).await.expect("agent stops");
    stage.fleet.restart(DEVICE).expect("agent restarts");

    // A release published now is installed, and the controller ingests the reports.
    stage.complete(1, "1m").await;
    let c = stage.controller().shared().counters.clone();
    match protocol {
        Protocol::V311 => {
            stage
                .wait_until("the agent's too_large rejections reported", 30, |s| {
                    too_large_rejections(s) >= 3
                })
                .await;
            assert!(
                c.too_large.load(Ordering::Relaxed) >= 1,
                "the controller read the 10 MB state report and must refuse it as too_large"
            );
        }
        _ => {
            assert_eq!(
                too_large_rejections(&stage),
                0,
                "under MQTT 5 the broker must not send the agent a packet over its maximum"
            );
            assert_eq!(
                c.too_large.load(Ordering::Relaxed),
                0,
                "under MQTT 5 the broker must not send the controller a packet over its maximum"
            );
        }
    }
    // A deaf client reconnects several times a second; these connected once each (the agent
    // twice: its restart).
    assert!(
        connects(&stage, DEVICE) <= 3,
        "the agent kept reconnecting\n{}",
        stage.dump()
    );
    assert!(
        connects(&stage, "ringcast-controller") <= 2,
        "the controller kept reconnecting\n{}",
        stage.dump()
    );
    stage.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_retained_messages_make_no_mqtt5_client_deaf() {
    oversized_messages_make_nobody_deaf(Protocol::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_retained_messages_make_no_mqtt311_client_deaf() {
    oversized_messages_make_nobody_deaf(Protocol::V311).await;
}
