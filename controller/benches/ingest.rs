//! Report ingestion throughput: parse, attribute by topic, update the device table and write
//! sled batches (no fsync per report), as the controller does for every retained state
//! report. `cargo bench -p ringcast-controller --bench ingest`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringcast_controller::ingest::{Ingestor, BATCH};
use ringcast_controller::shared::Counters;
use ringcast_controller::store::Store;
use ringcast_proto::testkit;
use ringcast_proto::{FakeClock, Phase, ReleaseRef, StateReport, Topics};
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
                windows: vec![],
                timezone: "Europe/Berlin".into(),
                updated_at: testkit::now(),
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

criterion_group!(benches, ingest);
criterion_main!(benches);
