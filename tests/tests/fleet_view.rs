//! ACCEPTANCE 24: the controller's picture of the fleet is complete. A restarted controller
//! re-reads every retained report (20,000 of them) on the embedded broker and on the shipped
//! Mosquitto limits, and a live burst of 20,000 reports is ingested whole. With the queue the
//! shipped config used to have (1,000), paging of known devices and the broker's drop counter
//! still bring every report in. Synthetic devices (retained reports published by the test),
//! a real controller, real brokers.

use ringcast_agent::fleet::device_id;
use ringcast_io::mqtt::Protocol;
use ringcast_proto::{Phase, StateReport, Topics};
use ringcast_tests::mqtt::publish_all;
use ringcast_tests::sim_stage::{ring, BrokerKind, Stage, StageSpec, FLEET};
use ringcast_tests::synthetic::{self, at_seq};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const N: usize = 20_000;

fn report(device: &str, seq: u64, phase: Phase) -> Vec<u8> {
    synthetic::report(device, seq, phase).to_bytes()
}

/// Every synthetic device's state report at `seq`, plus (with `online`) its retained flag.
fn fleet_reports(seq: u64, online: bool) -> Vec<(String, Vec<u8>)> {
    synthetic::reports(N, seq, online)
}

fn port_of(url: &str) -> u16 {
    synthetic::port_of(url).expect("broker url has a port")
}

async fn publish(stage: &Stage, id: &str, msgs: Vec<(String, Vec<u8>)>) {
    publish_all(
        id,
        port_of(stage.broker_url()),
        msgs,
        true,
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("publishing the synthetic fleet failed: {e}"));
}

/// Publish `msgs` from `parallel` clients at once (a burst no single connection can make).
async fn burst(stage: &Stage, msgs: Vec<(String, Vec<u8>)>, parallel: usize) {
    synthetic::burst(
        port_of(stage.broker_url()),
        msgs,
        parallel,
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("burst publisher failed: {e}"));
}

async fn stage(kind: BrokerKind, protocol: Protocol, overrides: &[(&str, &str)]) -> Option<Stage> {
    ringcast_tests::test_logs();
    let mut spec = StageSpec::new(kind, vec![ring("broad", &[100.0], "1h", 1, 0.2)], &[0]);
    spec.protocol = protocol;
    spec.mosquitto_overrides = overrides
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Stage::start(spec).await
}

/// The first connect reads all N; a restart re-reads them (newer ones published while the
/// controller was down), and a live burst of N is ingested whole.
async fn complete_fleet_view(kind: BrokerKind) {
    let Some(mut stage) = stage(kind, Protocol::Auto, &[]).await else {
        return;
    };
    publish(&stage, "seed", fleet_reports(1, true)).await;
    stage
        .wait_until("every synthetic device known", 120, |s| at_seq(s, 1) == N)
        .await;

    stage.stop_controller().await;
    // While the controller is down, every device reports again: only the broker knows.
    publish(&stage, "while-down", fleet_reports(2, false)).await;
    let t0 = Instant::now();
    stage.start_controller().await;
    stage
        .wait_until(
            "every retained report re-read after the restart",
            120,
            |s| at_seq(s, 2) == N,
        )
        .await;
    eprintln!(
        "{kind:?}: {N} retained reports re-read in {:?}",
        t0.elapsed()
    );
    let c = &stage.controller().shared().counters;
    assert_eq!(
        c.reread_paged.load(Ordering::Relaxed),
        0,
        "nothing should need paging on these limits"
    );

    // A live burst from four connections at once.
    let t0 = Instant::now();
    burst(&stage, fleet_reports(3, false), 4).await;
    stage
        .wait_until("every report of the live burst ingested", 120, |s| {
            at_seq(s, 3) == N
        })
        .await;
    eprintln!("{kind:?}: live burst of {N} ingested in {:?}", t0.elapsed());
    if let Some(m) = stage.mosquitto() {
        assert!(
            !m.log()
                .contains("Outgoing messages are being dropped for client ringcast-controller"),
            "the shipped limits dropped messages for the controller"
        );
    }
    stage.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_gives_a_restarted_controller_every_report() {
    complete_fleet_view(BrokerKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_mosquitto_limits_give_a_restarted_controller_every_report() {
    complete_fleet_view(BrokerKind::MosquittoPlain).await;
}

/// A broker that hands a new subscription only part of the retained messages (rumqttd
/// forwards at most `max_outgoing_packet_count` and drops the rest; EMQX's per-client queue
/// does the same): a restarted controller pages the devices it knew by exact topic and still
/// reads every report. (2,000 devices: rumqttd matches every new exact-topic filter against
/// every topic it knows, so paging it is slow; the embedded broker itself never truncates
/// below four million.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_truncates_the_reread_is_read_page_by_page() {
    const SMALL: usize = 2_000;
    const LIMIT: u64 = 200;
    let mut spec = StageSpec::new(
        BrokerKind::Embedded,
        vec![ring("broad", &[100.0], "1h", 1, 0.2)],
        &[0],
    );
    spec.embedded_retained_limit = LIMIT;
    ringcast_tests::test_logs();
    let Some(mut stage) = Stage::start(spec).await else {
        return;
    };
    // The controller learns every device live, in batches it reads before the next: the
    // broker's small per-connection queue (LIMIT) would drop a live burst from a controller
    // slowed by a busy machine, and nothing here would bring those reports back.
    let seed = synthetic::reports(SMALL, 1, true);
    let mut devices = 0;
    for (k, batch) in seed.chunks(LIMIT as usize / 2).enumerate() {
        publish(&stage, &format!("seed-{k}"), batch.to_vec()).await;
        // Two messages per device: its report and its online flag.
        devices += batch.len() / 2;
        stage
            .wait_until("the batch known", 60, |s| at_seq(s, 1) >= devices)
            .await;
    }
    assert_eq!(at_seq(&stage, 1), SMALL, "every synthetic device known");
    stage.stop_controller().await;
    publish(&stage, "while-down", synthetic::reports(SMALL, 2, false)).await;
    let t0 = Instant::now();
    stage.start_controller().await;
    stage
        .wait_until("every report re-read despite the truncation", 120, |s| {
            at_seq(s, 2) == SMALL
        })
        .await;
    let c = stage.controller().shared().counters.clone();
    let paged = c.reread_paged.load(Ordering::Relaxed) as usize;
    eprintln!(
        "truncated at {LIMIT}: {SMALL} re-read in {:?}, {paged} by paging",
        t0.elapsed()
    );
    assert!(
        paged >= SMALL - LIMIT as usize,
        "the broker forwarded at most {LIMIT} retained reports; paging read only {paged}"
    );
    stage.shutdown().await;
}

/// A live burst the broker drops because the controller stalled (here: its device table held
/// until the whole burst is on the broker, as a slow disk would) with the per-client queue the shipped config used
/// to have (1,000, and a 3.1.1 session, whose in-flight window is the broker's 20): the
/// controller sees `$SYS/broker/publish/messages/dropped` grow and reads every report again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_the_broker_dropped_while_the_controller_stalled_is_read_again() {
    let Some(stage) = stage(
        BrokerKind::MosquittoPlain,
        Protocol::V311,
        &[("max_queued_messages", "1000"), ("sys_interval", "1")],
    )
    .await
    else {
        return;
    };
    // Taught slowly enough that nothing is dropped: one connection, one ack at a time.
    let topics = Topics::for_fleet(FLEET).expect("fleet name");
    let port = port_of(stage.broker_url());
    let mut seed = ringcast_tests::mqtt::TestClient::connect(
        ringcast_tests::mqtt::plain_options("seed", "127.0.0.1", port),
        Duration::from_secs(10),
    )
    .await
    .expect("seed client");
    for i in 0..N {
        let d = device_id("broad", i);
        seed.publish(
            &topics.state(&d),
            report(&d, 1, Phase::Committed),
            true,
            Duration::from_secs(10),
        )
        .await
        .expect("seed report");
    }
    seed.disconnect().await;
    stage
        .wait_until("every synthetic device known", 120, |s| at_seq(s, 1) == N)
        .await;
    let c = stage.controller().shared().counters.clone();
    let rereads_before = c.rereads.load(Ordering::Relaxed);

    // The controller stalls while the whole fleet reports at once.
    // Reports with 1.5 KB of error detail: 20,000 of them outgrow every socket buffer and the
    // controller's inbound channel while it stalls.
    let fat: Vec<(String, Vec<u8>)> = (0..N)
        .map(|i| {
            let d = device_id("broad", i);
            let mut r = StateReport::parse(&report(&d, 2, Phase::Reverted)).expect("report");
            r.last_error = Some(ringcast_proto::report::ErrorInfo {
                reason: "health_check_failed".into(),
                detail: "x".repeat(1500),
            });
            (topics.state(&d), r.to_bytes())
        })
        .collect();
    // The stall holds the device table from a plain thread and publishes the burst from
    // there: the controller's tasks (and this runtime's workers with them) block on the
    // table, so nothing that needs this runtime may run until the burst is on the broker.
    // Mosquitto acknowledges a publish once it has queued it for every subscriber: when the
    // burst returns it waits for (or was dropped by) the stalled controller.
    let devices = stage.controller().shared().devices.clone();
    let stall = tokio::task::spawn_blocking(move || {
        let guard = devices.write().unwrap_or_else(|p| p.into_inner());
        let sent = synthetic::burst_blocking(port, fat, 4, Duration::from_secs(120));
        drop(guard);
        sent
    });
    stall
        .await
        .expect("stall task")
        .unwrap_or_else(|e| panic!("burst publisher failed: {e}"));

    stage
        .wait_until("every report of the burst, dropped or not", 180, |s| {
            at_seq(s, 2) == N
        })
        .await;
    let log = stage.mosquitto().map(|m| m.log()).unwrap_or_default();
    assert!(
        log.contains("Outgoing messages are being dropped for client ringcast-controller"),
        "the stall should have made the broker drop messages for the controller"
    );
    assert!(
        c.broker_dropped.load(Ordering::Relaxed) > 0,
        "the controller reads the broker's drop counter"
    );
    assert!(
        c.rereads.load(Ordering::Relaxed) > rereads_before,
        "the broker dropped reports and the controller did not read them again"
    );
    stage.shutdown().await;
}
