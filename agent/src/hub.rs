//! What the products of a multi-product agent share (`[products]` in `agent.toml`), and the
//! router that feeds them.
//!
//! Each product is a [`Worker`] of its own (its own persisted state, phase, release slot,
//! rollback floor, downloads and install root), running as its own task, so one product in
//! probation, waiting for a window, deferred or in a long installer command never holds up
//! another. They share one MQTT session, and through the [`Hub`]:
//! - one trust root: a rotation on the trust topic is verified and persisted once, here, and
//!   every product verifies with the new root from its next directive on;
//! - one trusted time per device (`max(local clock, newest issued_at any product verified)`,
//!   persisted under `device/state`), so no product judges expiry by an older time than
//!   another already saw (DESIGN.md "Time without trusting the device clock");
//! - one event numbering (`{device}-{boot}-{n}`, `boot` counted per device);
//! - one state report: each product's entry ([`ProductState`]) is merged into the report's
//!   `products`, numbered by one `seq` that only grows across all products, persisted
//!   before the report is queued, written to `status.json` and sent to the status watch.
//!
//! The router ([`run_products`]) takes the session's messages: the trust topic to the hub,
//! each product's directive topics to that product's [`Mailbox`].

use crate::agent::{apply_trust, device_report, Inbox, Mode, Outbox, Worker};
use crate::config::AgentConfig;
use crate::error::{Error, Result};
use crate::state::{DeviceState, Persisted};
use crate::store::Store;
use crate::transport::{Inbound, TAG_EVENT, TAG_STATE};
use crate::Deps;
use jiff::Timestamp;
use ringcast_io::fs as fsutil;
use ringcast_proto::report::ProductState;
use ringcast_proto::{Clock, Event, EventKind, StateReport, Topic, TrustRoot};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tracing::Instrument;

/// Store key of the device-wide part of a multi-product agent's state ([`DeviceState`]).
pub(crate) const KEY_DEVICE: &str = "device/state";

/// What the products of one agent share.
pub(crate) struct Hub {
    cfg: AgentConfig,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    outbox: Arc<Outbox>,
    trust: RwLock<TrustRoot>,
    inner: Mutex<Inner>,
    status_tx: watch::Sender<StateReport>,
    event_n: AtomicU64,
}

/// The hub's mutable part.
struct Inner {
    dev: DeviceState,
    products: BTreeMap<String, ProductState>,
}

impl Hub {
    /// Load the device's state (or start it, counting reports on from what a single-product
    /// agent on this data dir numbered, should it have run before) with a new boot.
    pub(crate) fn open(
        cfg: &AgentConfig,
        deps: &Deps,
        trust: TrustRoot,
        outbox: Arc<Outbox>,
    ) -> Result<Hub> {
        let mut dev = match deps.store.get(KEY_DEVICE)? {
            Some(bytes) => serde_json::from_slice::<DeviceState>(&bytes).map_err(|e| {
                Error::Store(format!("persisted state {KEY_DEVICE} unreadable: {e}"))
            })?,
            None => {
                let mut d = DeviceState::new(deps.clock.now());
                let single = deps.store.get("state")?;
                if let Some(old) = single.and_then(|b| serde_json::from_slice::<Persisted>(&b).ok())
                {
                    d.report_seq = old.report_seq;
                    d.trusted_now = d.trusted_now.max(old.trusted_now);
                }
                d
            }
        };
        dev.boot += 1;
        let report = device_report(cfg, dev.report_seq, dev.trusted_now, BTreeMap::new());
        let (status_tx, _) = watch::channel(report);
        let hub = Hub {
            cfg: cfg.clone(),
            store: deps.store.clone(),
            clock: deps.clock.clone(),
            outbox,
            trust: RwLock::new(trust),
            inner: Mutex::new(Inner {
                dev,
                products: BTreeMap::new(),
            }),
            status_tx,
            event_n: AtomicU64::new(0),
        };
        hub.save(&hub.lock().dev)?;
        Ok(hub)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, dev: &DeviceState) -> Result<()> {
        let bytes = serde_json::to_vec(dev)
            .map_err(|e| Error::Store(format!("serialise device state: {e}")))?;
        self.store.put(KEY_DEVICE, &bytes)
    }

    /// The device's trusted time: `max(local clock, newest issued_at any product verified)`.
    pub(crate) fn trusted_now(&self) -> Timestamp {
        self.clock.now().max(self.lock().dev.trusted_now)
    }

    /// A product verified `t`: the device's trusted time moves forward to it (persisted).
    pub(crate) fn raise_trusted_now(&self, t: Timestamp) -> Result<()> {
        let mut g = self.lock();
        if t <= g.dev.trusted_now {
            return Ok(());
        }
        let mut dev = g.dev.clone();
        dev.trusted_now = t;
        self.save(&dev)?;
        g.dev = dev;
        Ok(())
    }

    /// Run `f` with the device's trust root.
    pub(crate) fn with_trust<R>(&self, f: impl FnOnce(&TrustRoot) -> R) -> R {
        let g = self.trust.read().unwrap_or_else(|p| p.into_inner());
        f(&g)
    }

    /// The next event id, unique across products and restarts.
    pub(crate) fn next_event_id(&self) -> String {
        let n = self.event_n.fetch_add(1, Ordering::SeqCst) + 1;
        format!("{}-{}-{n}", self.cfg.device_id, self.lock().dev.boot)
    }

    /// A receiver of the merged state reports.
    pub(crate) fn watch(&self) -> watch::Receiver<StateReport> {
        self.status_tx.subscribe()
    }

    /// The merged report as it stands (its last sequence).
    pub(crate) fn report(&self) -> StateReport {
        let now = self.trusted_now();
        let g = self.lock();
        device_report(&self.cfg, g.dev.report_seq, now, g.products.clone())
    }

    /// Set a product's entry without publishing (at start-up, before the session runs).
    pub(crate) fn set_entry(&self, product: &str, entry: ProductState) {
        self.lock().products.insert(product.to_owned(), entry);
    }

    /// Show the merged report on the status watch (at start-up).
    pub(crate) fn refresh_status(&self) {
        self.status_tx.send_replace(self.report());
    }

    /// A product's entry changed (its own state already persisted): number, persist and
    /// queue the merged report.
    pub(crate) fn publish(&self, product: &str, entry: ProductState) -> Result<()> {
        self.publish_with(Some((product, entry)))
    }

    /// Publish the merged report again (a new session: whatever the broker kept retained
    /// may be older than what the device knows).
    pub(crate) fn republish(&self) -> Result<()> {
        self.publish_with(None)
    }

    fn publish_with(&self, entry: Option<(&str, ProductState)>) -> Result<()> {
        let now = self.trusted_now();
        // One lock from numbering to queueing: reports are queued in the order of their
        // sequence, whichever products' tasks publish them.
        let mut g = self.lock();
        if let Some((name, e)) = entry {
            g.products.insert(name.to_owned(), e);
        }
        // Above every earlier one, and at least the trusted time in milliseconds (as a
        // single-product agent numbers them: a wiped store still counts upwards).
        let floor = u64::try_from(now.as_millisecond()).unwrap_or(0);
        let mut dev = g.dev.clone();
        dev.report_seq = dev.report_seq.saturating_add(1).max(floor);
        self.save(&dev)?;
        g.dev = dev;
        let report = device_report(&self.cfg, g.dev.report_seq, now, g.products.clone());
        let bytes = report.to_bytes();
        if let Err(e) = fsutil::write_atomic(&self.cfg.data_dir.join("status.json"), &bytes) {
            tracing::warn!(error = %e, "cannot write status.json");
        }
        self.status_tx.send_replace(report);
        self.outbox.queue(TAG_STATE, &bytes);
        Ok(())
    }

    /// A trust root on the trust topic: verified and persisted once for every product.
    pub(crate) fn on_trust(&self, payload: &[u8]) -> Result<()> {
        let now = self.trusted_now();
        let kind = {
            let mut t = self.trust.write().unwrap_or_else(|p| p.into_inner());
            apply_trust(
                &mut t,
                &*self.store,
                payload,
                now,
                self.cfg.clock_skew.signed(),
            )?
        };
        if let Some(kind) = kind {
            self.event(kind);
        }
        Ok(())
    }

    /// An event of the device rather than of one product (a trust rotation).
    fn event(&self, kind: EventKind) {
        let e = Event {
            id: self.next_event_id(),
            device: self.cfg.device_id.clone(),
            at: self.trusted_now(),
            rollout_id: None,
            release: None,
            kind,
        };
        tracing::info!(event = e.kind.name(), id = %e.id, "event");
        self.outbox.queue(TAG_EVENT, &e.to_bytes());
    }
}

/// A product's inbound queue, kept by the router and drained by the product's worker.
///
/// Never blocks the router: a product busy in a long installer command must not hold up the
/// session or the other products. It stays small without dropping anything that matters: a
/// directive topic carries standing state (its newest message supersedes the ones before,
/// as the retained copy does), so a message queued for a topic replaces the one still
/// waiting for the same topic; the order of the rest is kept.
#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    q: Mutex<MailboxQueue>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct MailboxQueue {
    items: VecDeque<Inbound>,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, MailboxQueue> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `m`, replacing what waits for the same topic (or a `Subscribed` not yet seen).
    pub(crate) fn push(&self, m: Inbound) {
        let mut g = self.lock();
        g.items.retain(|old| match (old, &m) {
            (Inbound::Message { topic: a, .. }, Inbound::Message { topic: b, .. }) => a != b,
            (Inbound::Subscribed, Inbound::Subscribed) => false,
            _ => true,
        });
        g.items.push_back(m);
        drop(g);
        self.notify.notify_one();
    }

    /// The next message. Cancel-safe: a message is taken only in the poll that returns it.
    /// It never ends: the router stops its workers through their shutdown signal, so a
    /// worker never mistakes a stop for a lost session.
    pub(crate) async fn recv(&self) -> Inbound {
        loop {
            if let Some(m) = self.lock().items.pop_front() {
                return m;
            }
            // One consumer: `notify_one` keeps a permit when nobody waits, so a push between
            // the check above and this await is not missed.
            self.notify.notified().await;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().items.len()
    }
}

/// Run every product's worker, routing the session's messages to them, until shutdown (or,
/// in [`Mode::Once`], until every product has settled). An error of one product stops the
/// others (each finishes the step it is in) and is returned.
pub(crate) async fn run_products(
    cfg: &AgentConfig,
    hub: Arc<Hub>,
    workers: Vec<(String, Worker)>,
    mode: Mode,
    mut inbound: mpsc::Receiver<Inbound>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let topics = cfg.topics().map_err(|e| Error::Mqtt(e.detail))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut boxes: BTreeMap<String, Arc<Mailbox>> = BTreeMap::new();
    let mut tasks = JoinSet::new();
    for (name, w) in workers {
        let mb = Arc::new(Mailbox::default());
        boxes.insert(name.clone(), mb.clone());
        let span = tracing::info_span!("product", product = %name);
        let stop = stop_rx.clone();
        tasks.spawn(
            async move { w.run_loop(mode, Inbox::Mailbox(mb), stop).await }.instrument(span),
        );
    }
    let route = |topic: &str| -> Option<&Arc<Mailbox>> {
        match topics.parse(topic) {
            Ok(Topic::RingProductDirective { ring, product }) if ring == cfg.ring => {
                boxes.get(&product)
            }
            Ok(Topic::DeviceProductDirective { device, product }) if device == cfg.device_id => {
                boxes.get(&product)
            }
            _ => None,
        }
    };
    let result = loop {
        tokio::select! {
            _ = shutdown.changed() => {
                if *shutdown.borrow() { break Ok(()); }
            }
            msg = inbound.recv() => match msg {
                Some(Inbound::Message { topic, payload }) => {
                    if matches!(topics.parse(&topic), Ok(Topic::Trust)) {
                        if payload.is_empty() {
                            continue;
                        }
                        if let Err(e) = hub.on_trust(&payload) {
                            break Err(e);
                        }
                    } else if let Some(mb) = route(&topic) {
                        mb.push(Inbound::Message { topic, payload });
                    } else {
                        tracing::debug!(%topic, "message on a topic this agent does not act on");
                    }
                }
                Some(Inbound::Subscribed) => {
                    for mb in boxes.values() {
                        mb.push(Inbound::Subscribed);
                    }
                }
                Some(Inbound::Connected) => {
                    if let Err(e) = hub.republish() {
                        break Err(e);
                    }
                }
                None => break Err(Error::Mqtt("MQTT session task ended".into())),
            },
            done = tasks.join_next() => match done {
                None => break Ok(()),
                Some(Ok(Ok(()))) => {
                    // In `Once` mode a product that settled is done; the others go on.
                    if tasks.is_empty() {
                        break Ok(());
                    }
                }
                Some(Ok(Err(e))) => break Err(e),
                Some(Err(e)) => break Err(Error::Store(format!("product task failed: {e}"))),
            },
        }
    };
    let _ = stop_tx.send(true);
    let mut result = result;
    while let Some(done) = tasks.join_next().await {
        let err = match done {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(e) => Error::Store(format!("product task failed: {e}")),
        };
        tracing::warn!(error = %err, "product stopped with an error");
        if result.is_ok() {
            result = Err(err);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, body: &str) -> Inbound {
        Inbound::Message {
            topic: topic.into(),
            payload: body.as_bytes().to_vec(),
        }
    }

    fn body(m: Inbound) -> String {
        match m {
            Inbound::Message { topic, payload } => {
                format!("{topic}={}", String::from_utf8_lossy(&payload))
            }
            Inbound::Subscribed => "subscribed".into(),
            Inbound::Connected => "connected".into(),
        }
    }

    #[tokio::test]
    async fn a_mailbox_keeps_the_newest_message_per_topic_in_arrival_order() {
        let mb = Mailbox::default();
        mb.push(msg("ring", "r1"));
        mb.push(msg("device", "d1"));
        mb.push(Inbound::Subscribed);
        mb.push(msg("ring", "r2"));
        mb.push(Inbound::Subscribed);
        assert_eq!(mb.len(), 3, "one per topic, one subscribed");
        assert_eq!(body(mb.recv().await), "device=d1");
        assert_eq!(body(mb.recv().await), "ring=r2");
        assert_eq!(body(mb.recv().await), "subscribed");
        mb.push(msg("ring", "r3"));
        assert_eq!(body(mb.recv().await), "ring=r3");
        assert_eq!(mb.len(), 0);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_push() {
        let mb = Arc::new(Mailbox::default());
        let rx = tokio::spawn({
            let mb = mb.clone();
            async move { body(mb.recv().await) }
        });
        tokio::task::yield_now().await;
        mb.push(msg("ring", "late"));
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx)
            .await
            .expect("the receiver woke within 5s")
            .unwrap();
        assert_eq!(got, "ring=late");
    }
}
