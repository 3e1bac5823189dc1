//! Report ingestion throughput: parse, attribute by topic, update the device table and write
//! sled batches (no fsync per report), as the controller does for every retained state
//! report; and the same for device events (deduplicated by id and kept as evidence).
//! `cargo bench -p ringcast-controller --bench ingest`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ringcast_controller::ingest::{Ingestor, BATCH};
use ringcast_controller::shared::Counters;
use ringcast_controller::store::Store;
use ringcast_proto::testkit;
use ringcast_proto::{Event, EventKind, FakeClock, Phase, ReleaseRef, StateReport, Topics};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

const REPORTS: usize = 20_000;

fn reports(topics: &Topics, round: u64) -> Vec<(String, Vec<u8>)> {
    (0..REPORTS)
        .map(|i| {
            let device = format!("sensor-{i:06}");
            let rel = ReleaseRef {
                name: "app".into(),
                version: "1.2.0".into(),
                sequence: 2 + round,
            };
            let r = StateReport {
                device: device.clone(),
                seq: 0,
                ring: ["canary", "early", "broad"][i % 3].into(),
                device_class: "sensor-v2".into(),
                agent_version: "0.1.0".into(),
                current: Some(rel.clone()),
                previous: None,
                target: Some(rel),
                phase: [Phase::Downloading, Phase::Probation, Phase::Committed][i % 3],
                rollout_id: Some(format!("app-{}", 2 + round)),
                last_error: None,
                refused: None,
                windows: vec![],
                timezone: "Europe/Berlin".into(),
                updated_at: testkit::now(),
                attempt: 1,
                products: Default::default(),
            };
            (topics.state(&device), r.to_bytes())
        })
        .collect()
}

fn ingest(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let topics = Topics::for_fleet("bench").expect("topics");
    let mut ing = Ingestor::new(
        topics.clone(),
        Arc::new(FakeClock::new(testkit::now())),
        store,
        Arc::new(RwLock::new(HashMap::new())),
        Arc::new(Counters::default()),
        Arc::new(tokio::sync::Notify::new()),
    );
    // Two rounds with different content so every report is a real change to persist.
    let rounds = [reports(&topics, 0), reports(&topics, 1)];
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(REPORTS as u64));
    g.sample_size(10);
    let mut n = 0usize;
    g.bench_function("state_reports_sled_batched", |b| {
        b.iter(|| {
            for (topic, payload) in &rounds[n % 2] {
                ing.handle(topic, payload);
                if ing.pending_len() >= BATCH {
                    ing.flush().expect("flush");
                }
            }
            ing.flush().expect("flush");
            n += 1;
        })
    });
    g.finish();
}

/// Devices sending events in one round, and events each sends.
const EVENT_DEVICES: usize = 2_000;
const EVENTS_PER_DEVICE: usize = 10;

/// One round of events: every device sends a probation's worth (accepted … committed, or a
/// revert with its evidence), interleaved across devices as they arrive from a fleet. Ids are
/// unique per round, so nothing is a duplicate.
fn events(topics: &Topics, round: u64) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::with_capacity(EVENT_DEVICES * EVENTS_PER_DEVICE);
    for k in 0..EVENTS_PER_DEVICE {
        for i in 0..EVENT_DEVICES {
            let device = format!("sensor-{i:06}");
            let kind = match k {
                0 => EventKind::Accepted,
                1 => EventKind::Downloaded,
                2 => EventKind::Installed,
                9 if i % 10 == 0 => EventKind::Reverted {
                    reason: "health_check_failed".into(),
                    check: Some("self-test".into()),
                    output: Some(format!(
                        "exit 1\n{}",
                        "self-test: sensor timeout ".repeat(8)
                    )),
                },
                9 => EventKind::Committed,
                _ => EventKind::Healthy,
            };
            let e = Event {
                id: format!("{device}-{round}-{k}"),
                device: device.clone(),
                at: testkit::now(),
                rollout_id: Some(format!("app-{}", 2 + round)),
                release: Some(ReleaseRef {
                    name: "app".into(),
                    version: "1.2.0".into(),
                    sequence: 2 + round,
                }),
                kind,
            };
            out.push((topics.events(&device), e.to_bytes()));
        }
    }
    out
}

fn ingest_events(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let topics = Topics::for_fleet("bench").expect("topics");
    let mut ing = Ingestor::new(
        topics.clone(),
        Arc::new(FakeClock::new(testkit::now())),
        store,
        Arc::new(RwLock::new(HashMap::new())),
        Arc::new(Counters::default()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let feed = |ing: &mut Ingestor, round: &[(String, Vec<u8>)]| {
        for (topic, payload) in round {
            ing.handle(topic, payload);
            if ing.pending_len() >= BATCH {
                ing.flush().expect("flush");
            }
        }
        ing.flush().expect("flush");
    };
    // Measure the steady state of a long-running controller: every device already has more
    // events behind it than a bounded history keeps.
    let mut round = 0u64;
    while round < 6 {
        feed(&mut ing, &events(&topics, round));
        round += 1;
    }
    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(
        (EVENT_DEVICES * EVENTS_PER_DEVICE) as u64,
    ));
    g.sample_size(10);
    g.bench_function("events_deduplicated_with_history", |b| {
        b.iter_batched(
            || {
                round += 1;
                events(&topics, round)
            },
            |r| feed(&mut ing, &r),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, ingest, ingest_events);
criterion_main!(benches);
