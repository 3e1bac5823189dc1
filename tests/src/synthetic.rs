//! Synthetic fleets: devices that exist only as the retained reports a test publishes for them,
//! so a controller can face 100,000 devices without 100,000 agents (`ringcast-load`, the
//! fleet-view scenarios).

use crate::mqtt::publish_all;
use crate::sim_stage::{Stage, CLASS, FLEET};
use crate::{HarnessError, Result};
use ringcast_agent::fleet::device_id;
use ringcast_proto::{Phase, ReleaseRef, StateReport, Topics};
use std::time::Duration;

/// The ring synthetic devices are in; ids are [`device_id`]`("broad", i)`.
pub const RING: &str = "broad";

/// Device `device`'s state report at sequence `seq`: in `phase`, running release `seq`.
pub fn report(device: &str, seq: u64, phase: Phase) -> StateReport {
    StateReport {
        device: device.into(),
        seq,
        ring: RING.into(),
        device_class: CLASS.into(),
        agent_version: "synthetic".into(),
        current: Some(ReleaseRef {
            name: "app".into(),
            version: format!("1.{seq}.0"),
            sequence: seq,
        }),
        previous: None,
        target: None,
        phase,
        rollout_id: Some(format!("app-{seq}")),
        last_error: None,
        refused: None,
        windows: vec![],
        timezone: "UTC".into(),
        updated_at: ringcast_proto::jiff::Timestamp::now(),
        attempt: 1,
        products: Default::default(),
    }
}

/// The first `n` devices' committed state reports at `seq` (topic, payload), plus (with
/// `online`) each one's retained online flag.
pub fn reports(n: usize, seq: u64, online: bool) -> Vec<(String, Vec<u8>)> {
    let topics = Topics::for_fleet(FLEET).expect("the scenario fleet name is valid");
    let mut out = Vec::with_capacity(n * 2);
    for i in 0..n {
        let d = device_id(RING, i);
        out.push((
            topics.state(&d),
            report(&d, seq, Phase::Committed).to_bytes(),
        ));
        if online {
            out.push((topics.online(&d), b"true".to_vec()));
        }
    }
    out
}

/// The port of a `mqtt://host:port` URL.
pub fn port_of(url: &str) -> Result<u16> {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| HarnessError::Mqtt(format!("no port in {url}")))
}

/// Publish `msgs` retained from `parallel` connections at once (a burst no single connection
/// can make), each publisher on a thread and runtime of its own, so the burst goes out even
/// while the caller's runtime is busy; returns when the broker acknowledged every message.
pub async fn burst(
    port: u16,
    msgs: Vec<(String, Vec<u8>)>,
    parallel: usize,
    timeout: Duration,
) -> Result<()> {
    tokio::task::spawn_blocking(move || burst_blocking(port, msgs, parallel, timeout))
        .await
        .map_err(|e| HarnessError::Mqtt(format!("publisher task: {e}")))?
}

/// [`burst`] from a plain thread: for a test that blocks the controller's runtime on purpose
/// (a stalled controller) and publishes while it is blocked.
pub fn burst_blocking(
    port: u16,
    msgs: Vec<(String, Vec<u8>)>,
    parallel: usize,
    timeout: Duration,
) -> Result<()> {
    let per = msgs.len().div_ceil(parallel.max(1)).max(1);
    let mut threads = Vec::new();
    for (k, chunk) in msgs.chunks(per).enumerate() {
        let chunk = chunk.to_vec();
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| HarnessError::io("a runtime for a burst publisher", e))?;
            rt.block_on(publish_all(
                &format!("burst-{k}"),
                port,
                chunk,
                true,
                timeout,
            ))
        }));
    }
    for t in threads {
        t.join()
            .map_err(|_| HarnessError::Mqtt("a burst publisher panicked".into()))??;
    }
    Ok(())
}

/// How many devices the stage's controller holds at report sequence `seq`.
pub fn at_seq(stage: &Stage, seq: u64) -> usize {
    stage
        .controller()
        .shared()
        .devices
        .read()
        .map(|d| {
            d.values()
                .filter(|r| r.report.as_ref().is_some_and(|r| r.seq == seq))
                .count()
        })
        .unwrap_or(0)
}
