//! Report ingestion: every device's retained state, its events and its online flag.
//!
//! A report is attributed to the device named by the TOPIC the broker authorised, never to
//! the payload's `device` field (ACCEPTANCE.md 20). The device table is updated at once and
//! the engine woken (so a gate halts within a second of the deciding report); sled writes are
//! batched and not fsynced per report: retained reports are re-read after a restart, which is
//! the durability story (DESIGN.md "Controller").
//!
//! Events are the exception: they are not retained, so nothing re-delivers them. Each new one
//! goes straight into the device's bounded history in sled (deduplicated by id), which is
//! where a revert's evidence outlives the events after it; the device record only keeps the
//! newest as `last_event`.

use crate::model::DeviceRecord;
use crate::shared::Counters;
use crate::store::{Appended, EventHistory, Store};
use ringcast_proto::{Clock, Event, Order, StateReport, Topic, Topics};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

/// A message from the broker.
#[derive(Debug)]
pub enum Inbound {
    /// A publish on a subscribed topic.
    Publish {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// A re-read of the retained reports finished: every report the broker kept was sent
    /// before this marker, so once it is applied the device table is the whole fleet.
    FleetRead,
}

/// Applies inbound messages to the device table and batches them into sled.
pub struct Ingestor {
    topics: Topics,
    clock: Arc<dyn Clock>,
    store: Store,
    devices: Arc<RwLock<HashMap<String, DeviceRecord>>>,
    counters: Arc<Counters>,
    wake: Arc<Notify>,
    /// Devices changed since the last flush; serialised once per flush, not per message.
    pending: std::collections::HashSet<String>,
    /// Each device's bounded event history (this is its only writer).
    history: EventHistory,
    /// Set once a re-read's reports are all applied (see [`Inbound::FleetRead`]).
    fleet_read: Arc<std::sync::atomic::AtomicBool>,
}

/// Flush the batch when it holds this many devices (or on the flush tick).
pub const BATCH: usize = 2048;

impl Ingestor {
    /// A new ingestor over shared tables.
    pub fn new(
        topics: Topics,
        clock: Arc<dyn Clock>,
        store: Store,
        devices: Arc<RwLock<HashMap<String, DeviceRecord>>>,
        counters: Arc<Counters>,
        wake: Arc<Notify>,
    ) -> Ingestor {
        Ingestor {
            history: store.event_history(crate::store::EVENT_HISTORY),
            topics,
            clock,
            store,
            devices,
            counters,
            wake,
            pending: std::collections::HashSet::new(),
            fleet_read: Arc::default(),
        }
    }

    /// Raise `flag` when a re-read's reports are all applied (the engine's
    /// [`crate::shared::Shared::fleet_read`]).
    pub fn with_fleet_read(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Ingestor {
        self.fleet_read = flag;
        self
    }

    /// Keep the newest `limit` events per device (default [`crate::store::EVENT_HISTORY`]).
    pub fn with_event_history(mut self, limit: usize) -> Ingestor {
        self.history = self.store.event_history(limit);
        self
    }

    /// Devices changed but not yet written.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Handle one message. Never panics on any input.
    pub fn handle(&mut self, topic: &str, payload: &[u8]) {
        let parsed = match self.topics.parse(topic) {
            Ok(t) => t,
            Err(e) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                debug!(
                    topic,
                    reason = e.reason.code(),
                    "ignoring message on unexpected topic"
                );
                return;
            }
        };
        if payload.is_empty() {
            // A cleared retained message: nothing to learn.
            return;
        }
        match parsed {
            Topic::State(device) => self.state(device, payload),
            Topic::Events(device) => self.event(device, payload),
            Topic::Online(device) => self.online(device, payload),
            _ => {}
        }
    }

    fn reject(&self, device: &str, what: &str, e: &ringcast_proto::Rejection) {
        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        if e.reason == ringcast_proto::Reason::TooLarge {
            self.counters.too_large.fetch_add(1, Ordering::Relaxed);
        }
        warn!(device, reason = e.reason.code(), detail = %e.detail, "refused {what}");
    }

    fn state(&mut self, device: String, payload: &[u8]) {
        let report = match StateReport::parse(payload) {
            Ok(r) => r,
            Err(e) => return self.reject(&device, "state report", &e),
        };
        if report.device != device {
            // The topic is what the broker authorised; the payload's claim is not evidence.
            debug!(device = %device, claimed = %report.device, "state report names another device; attributing to the topic's");
        }
        let now = self.clock.now();
        let changed = {
            let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
            let rec = devices
                .entry(device.clone())
                .or_insert_with(|| DeviceRecord::new(device.clone(), now));
            // Only a newer report (higher `seq`) replaces the kept one: a broker restored from
            // an old save re-delivers old retained reports, and they must not send the device
            // back in time. A report re-delivered unchanged (restart, reconnect) is not a sign
            // of life either: keep the time it first arrived so silence is still measured, and
            // do not rewrite what sled already holds.
            let order = match &rec.report {
                Some(kept) => report.order_against(kept),
                None => Order::Newer,
            };
            match order {
                Order::Newer => {
                    rec.last_seen = now;
                    rec.report = Some(report);
                    true
                }
                Order::Same => false,
                Order::Stale => {
                    self.counters.stale_reports.fetch_add(1, Ordering::Relaxed);
                    debug!(device = %device, "ignoring a state report older than the one kept");
                    false
                }
            }
        };
        self.counters.reports.fetch_add(1, Ordering::Relaxed);
        if changed {
            self.pending.insert(device);
        }
        self.wake.notify_one();
    }

    fn event(&mut self, device: String, payload: &[u8]) {
        let event = match Event::parse(payload) {
            Ok(e) => e,
            Err(e) => return self.reject(&device, "event", &e),
        };
        let now = self.clock.now();
        match self.history.append(&device, &event, now) {
            Ok(Appended::New) => {}
            Ok(Appended::Duplicate) => {
                self.counters
                    .duplicate_events
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                warn!(device = %device, error = %e, "storing event failed");
                return;
            }
        }
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        info!(device = %device, rollout_id = event.rollout_id.as_deref().unwrap_or(""), event = event.kind.name(), "device event");
        {
            let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
            let rec = devices
                .entry(device.clone())
                .or_insert_with(|| DeviceRecord::new(device.clone(), now));
            rec.last_event = Some(event);
        }
        self.pending.insert(device);
    }

    fn online(&mut self, device: String, payload: &[u8]) {
        let flag = match payload {
            b"true" => true,
            b"false" => false,
            _ => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let now = self.clock.now();
        {
            let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
            let rec = devices
                .entry(device.clone())
                .or_insert_with(|| DeviceRecord::new(device.clone(), now));
            rec.online = Some(flag);
        }
        self.pending.insert(device);
    }

    /// Write the batch to sled (one atomic batch, no fsync).
    pub fn flush(&mut self) -> crate::error::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        {
            let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
            for id in self.pending.drain() {
                if let Some(rec) = devices.get(&id) {
                    batch.insert(id.as_bytes(), Store::device_bytes(rec)?);
                }
            }
        }
        self.store.devices.apply_batch(batch)?;
        Ok(())
    }

    /// Run until the channel closes or `shutdown` flips; flushes every `every` and on exit.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Inbound>,
        mut shutdown: watch::Receiver<bool>,
        every: std::time::Duration,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                m = rx.recv() => match m {
                    Some(Inbound::Publish { topic, payload }) => {
                        self.handle(&topic, &payload);
                        if self.pending.len() >= BATCH {
                            if let Err(e) = self.flush() { warn!(error = %e, "device batch write failed"); }
                        }
                    }
                    Some(Inbound::FleetRead) => {
                        if !self.fleet_read.swap(true, std::sync::atomic::Ordering::SeqCst) {
                            info!(devices = self.devices.read().map(|d| d.len()).unwrap_or(0), "fleet view complete");
                        }
                        self.wake.notify_one();
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if let Err(e) = self.flush() { warn!(error = %e, "device batch write failed"); }
                }
            }
        }
        if let Err(e) = self.flush() {
            warn!(error = %e, "device batch write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringcast_proto::testkit;
    use ringcast_proto::{EventKind, FakeClock, Phase};

    fn setup() -> (tempfile::TempDir, Ingestor, FakeClock) {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let clock = FakeClock::new(testkit::now());
        let ing = Ingestor::new(
            Topics::for_fleet("lab").unwrap(),
            Arc::new(clock.clone()),
            store,
            Arc::new(RwLock::new(HashMap::new())),
            Arc::new(Counters::default()),
            Arc::new(Notify::new()),
        );
        (d, ing, clock)
    }

    fn report(device: &str, phase: Phase) -> StateReport {
        StateReport {
            device: device.into(),
            seq: 0,
            ring: "canary".into(),
            device_class: "sensor-v2".into(),
            agent_version: "t".into(),
            current: None,
            previous: None,
            target: None,
            phase,
            rollout_id: Some("r1".into()),
            last_error: None,
            refused: None,
            windows: vec![],
            timezone: "UTC".into(),
            updated_at: testkit::now(),
            attempt: 1,
            products: Default::default(),
        }
    }

    #[test]
    fn report_is_attributed_to_the_topic_device_not_the_payload_claim() {
        let (_d, mut ing, _) = setup();
        let forged = report("victim", Phase::Reverted);
        ing.handle("ringcast/lab/devices/attacker/state", &forged.to_bytes());
        let devices = ing.devices.read().unwrap();
        assert!(devices.contains_key("attacker"));
        assert!(
            !devices.contains_key("victim"),
            "a payload claim must not create a device"
        );
    }

    #[test]
    fn garbage_on_any_topic_never_panics_and_is_counted() {
        let (_d, mut ing, _) = setup();
        let big = vec![b'{'; ringcast_proto::limits::MAX_REPORT_BYTES + 10];
        let inputs: [(&str, &[u8]); 6] = [
            ("ringcast/lab/devices/d1/state", b"not json"),
            ("ringcast/lab/devices/d1/state", &big),
            ("ringcast/lab/devices/d1/events", b"{\"id\":1}"),
            ("ringcast/lab/devices/d1/online", b"maybe"),
            ("ringcast/other/devices/d1/state", b"{}"),
            ("ringcast/lab/devices/../state", b"{}"),
        ];
        for (t, p) in inputs {
            ing.handle(t, p);
        }
        assert_eq!(ing.counters.rejected.load(Ordering::Relaxed), 6);
        assert!(ing.devices.read().unwrap().is_empty());
        ing.flush().unwrap();
    }

    #[test]
    fn duplicate_events_are_recognised_by_id() {
        let (_d, mut ing, _) = setup();
        let e = Event {
            id: "d1-7".into(),
            device: "d1".into(),
            at: testkit::now(),
            rollout_id: Some("r1".into()),
            release: None,
            kind: EventKind::Committed,
        };
        for _ in 0..3 {
            ing.handle("ringcast/lab/devices/d1/events", &e.to_bytes());
        }
        assert_eq!(ing.counters.events.load(Ordering::Relaxed), 1);
        assert_eq!(ing.counters.duplicate_events.load(Ordering::Relaxed), 2);
    }

    fn event(device: &str, n: u32, kind: EventKind) -> Event {
        Event {
            id: format!("{device}-0-{n}"),
            device: device.into(),
            at: testkit::now(),
            rollout_id: Some("r1".into()),
            release: None,
            kind,
        }
    }

    #[test]
    fn a_revert_stays_in_the_history_after_later_events_and_the_history_is_bounded() {
        let (_d, ing, _) = setup();
        let mut ing = ing.with_event_history(4);
        let topic = "ringcast/lab/devices/d1/events";
        ing.handle(topic, &event("d1", 0, EventKind::Installed).to_bytes());
        let revert = event(
            "d1",
            1,
            EventKind::Reverted {
                reason: "health_check_failed".into(),
                check: Some("self-test".into()),
                output: Some("exit 1\nboom".into()),
            },
        );
        ing.handle(topic, &revert.to_bytes());
        for n in 2..4 {
            ing.handle(topic, &event("d1", n, EventKind::Held).to_bytes());
        }
        let kept = ing.store.device_events("d1", 100).unwrap();
        assert_eq!(kept.len(), 4);
        assert_eq!(
            kept[2].event, revert,
            "newest first: two events after the revert"
        );
        // `last_event` is still the newest, as before.
        assert_eq!(
            ing.devices.read().unwrap()["d1"]
                .last_event
                .as_ref()
                .unwrap()
                .id,
            "d1-0-3"
        );
        // Many more events: still four kept, and the revert has aged out.
        for n in 4..40 {
            ing.handle(topic, &event("d1", n, EventKind::Healthy).to_bytes());
        }
        let kept = ing.store.device_events("d1", 100).unwrap();
        assert_eq!(
            kept.iter().map(|e| e.event.id.as_str()).collect::<Vec<_>>(),
            ["d1-0-39", "d1-0-38", "d1-0-37", "d1-0-36"]
        );
        assert_eq!(ing.counters.events.load(Ordering::Relaxed), 40);
    }

    #[test]
    fn an_event_names_the_topic_device_not_the_payload_claim() {
        let (_d, mut ing, _) = setup();
        let forged = event("victim", 0, EventKind::Committed);
        ing.handle("ringcast/lab/devices/attacker/events", &forged.to_bytes());
        assert_eq!(ing.store.device_events("attacker", 9).unwrap().len(), 1);
        assert!(ing.store.device_events("victim", 9).unwrap().is_empty());
    }

    #[test]
    fn unchanged_retained_report_is_not_a_sign_of_life() {
        let (_d, mut ing, clock) = setup();
        let r = report("d1", Phase::Probation).to_bytes();
        ing.handle("ringcast/lab/devices/d1/state", &r);
        let first = ing.devices.read().unwrap()["d1"].last_seen;
        clock.advance(jiff::SignedDuration::from_hours(2));
        ing.handle("ringcast/lab/devices/d1/state", &r);
        assert_eq!(ing.devices.read().unwrap()["d1"].last_seen, first);
        ing.handle(
            "ringcast/lab/devices/d1/state",
            &report("d1", Phase::Committed).to_bytes(),
        );
        assert!(ing.devices.read().unwrap()["d1"].last_seen > first);
    }

    #[test]
    fn an_older_report_never_replaces_a_newer_one() {
        let (_d, mut ing, _) = setup();
        let topic = "ringcast/lab/devices/d1/state";
        let mut committed = report("d1", Phase::Committed);
        committed.seq = 20;
        ing.handle(topic, &committed.to_bytes());
        // What a broker restored from an old save re-delivers: an earlier phase, lower seq.
        let mut old = report("d1", Phase::Probation);
        old.seq = 19;
        ing.handle(topic, &old.to_bytes());
        let kept = ing.devices.read().unwrap()["d1"].report.clone().unwrap();
        assert_eq!(kept.phase, Phase::Committed);
        assert_eq!(ing.counters.stale_reports.load(Ordering::Relaxed), 1);
        let mut next = report("d1", Phase::Downloading);
        next.seq = 21;
        ing.handle(topic, &next.to_bytes());
        let kept = ing.devices.read().unwrap()["d1"].report.clone().unwrap();
        assert_eq!(kept.phase, Phase::Downloading);
    }

    #[test]
    fn an_oversized_report_is_counted_as_too_large() {
        let (_d, mut ing, _) = setup();
        let big = vec![b' '; ringcast_proto::limits::MAX_REPORT_BYTES + 1];
        ing.handle("ringcast/lab/devices/d1/state", &big);
        assert_eq!(ing.counters.too_large.load(Ordering::Relaxed), 1);
        assert!(ing.devices.read().unwrap().is_empty());
    }

    #[test]
    fn batched_writes_reach_sled() {
        let (_d, mut ing, _) = setup();
        for i in 0..10 {
            let dev = format!("d{i}");
            ing.handle(
                &format!("ringcast/lab/devices/{dev}/state"),
                &report(&dev, Phase::Idle).to_bytes(),
            );
        }
        assert_eq!(ing.pending_len(), 10);
        ing.flush().unwrap();
        assert_eq!(ing.store.devices().unwrap().len(), 10);
    }
}
