//! The controller's MQTT connection: one session ([`ringcast_io::mqtt`]) that publishes
//! directives and the trust root and reads every device's state, events and online flag.
//!
//! - **MQTT 5** where the broker speaks it (`broker.protocol`, default `auto`): the controller
//!   announces a 256 KiB Maximum Packet Size, so a device that publishes a 10 MB "report" on a
//!   broker allowing it cannot make the controller deaf (the broker drops it for us); under
//!   3.1.1 such a message is read and refused by size (`too_large`) instead.
//! - **Persistent session** (clean start off): events (QoS 1, not retained) published while the
//!   controller is down wait for it on the broker.
//! - **Retained state and online flags are read at QoS 0** and re-read completely at every
//!   (re)connect and whenever the broker reports dropped messages ([`crate::reread`]).
//! - On every CONNACK the engine republishes what should stand, freshly signed.

use crate::config::BrokerTls;
use crate::engine::EngineHandle;
use crate::error::{Error, Result};
use crate::ingest::Inbound;
use crate::model::DeviceRecord;
use crate::reread::{Action, Reread};
use crate::shared::Counters;
use ringcast_io::mqtt::{self, Client, Event, EventLoop, Protocol, QoS};
use ringcast_proto::{Topic, Topics};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Mosquitto's count of messages it dropped (queue full), published every `sys_interval`.
pub const SYS_DROPPED: &str = "$SYS/broker/publish/messages/dropped";

/// Install rustls' ring provider once (rumqttc is built without a default provider).
pub fn install_crypto_provider() {
    // "Already installed" is fine: another part of the process got there first.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Client id.
    pub client_id: String,
    /// Protocol version.
    pub protocol: Protocol,
    /// Credentials.
    pub credentials: Option<(String, String)>,
    /// TLS (mutual when a client certificate is given); `None` = plain TCP.
    pub tls: Option<BrokerTls>,
    /// Watch the broker's drop counter ([`SYS_DROPPED`]) and re-read after drops.
    pub watch_drops: bool,
    /// Keep the session across disconnects (events published meanwhile wait on the broker).
    pub persistent: bool,
}

fn tls_error(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Config {
        file: path.display().to_string(),
        field: format!("broker.tls.{what}"),
        detail: e.to_string(),
    }
}

/// A rustls client configuration trusting `tls.ca_file` and presenting the client
/// certificate, if any.
fn tls_config(tls: &BrokerTls) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    let ca = &tls.ca_file;
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| tls_error("ca_file", ca, e))? {
        let cert = cert.map_err(|e| tls_error("ca_file", ca, e))?;
        roots.add(cert).map_err(|e| tls_error("ca_file", ca, e))?;
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| tls_error("client_cert", cert, e))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| tls_error("client_cert", cert, e))?;
            let pk =
                PrivateKeyDer::from_pem_file(key).map_err(|e| tls_error("client_key", key, e))?;
            builder
                .with_client_auth_cert(chain, pk)
                .map_err(|e| tls_error("client_cert", cert, e))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// Create the session handle and its event loop.
pub fn connect(s: &MqttSettings) -> Result<(Client, EventLoop)> {
    install_crypto_provider();
    let mut o = mqtt::Options::new(&s.client_id, &s.host, s.port);
    o.protocol = s.protocol;
    o.keep_alive = Duration::from_secs(15);
    o.persistent = s.persistent;
    // Events wait this long for a controller that is down; its retained state never expires.
    o.session_expiry = Duration::from_secs(7 * 24 * 3600);
    o.max_packet = 256 * 1024;
    // As many QoS 1 events in flight to us as MQTT 5 allows: the broker's queue is for
    // overflow, not for the normal flow.
    o.receive_maximum = u16::MAX;
    o.inflight = 200;
    o.channel_capacity = 10_000;
    o.connect_timeout = Duration::from_secs(5);
    o.credentials = s.credentials.clone();
    if let Some(tls) = &s.tls {
        o.tls = Some(Arc::new(tls_config(tls)?));
    }
    Ok(mqtt::session(&o))
}

/// What a SUBSCRIBE was for, to route its SUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// Everything, at connect: events, then the re-read wildcards.
    Connect,
    /// The broker's drop counter, asked for on its own once the rest is granted: a broker
    /// without `$SYS` may refuse it by closing the connection (rumqttd does).
    Drops,
    /// The re-read wildcards again (after drops).
    Wildcards,
    /// A re-read page.
    Page(u64),
}

/// Everything the connection task needs.
pub struct Wiring {
    /// Topic names.
    pub topics: Topics,
    /// To ingestion.
    pub tx: mpsc::Sender<Inbound>,
    /// The engine, told of every (re)connect.
    pub engine: EngineHandle,
    /// The device table (which devices a re-read must find).
    pub devices: Arc<RwLock<HashMap<String, DeviceRecord>>>,
    /// Metrics.
    pub counters: Arc<Counters>,
    /// Watch the broker's drop counter.
    pub watch_drops: bool,
}

/// The filters of a device's retained topics, for a re-read page.
fn page_filters(topics: &Topics, devices: &[String]) -> Vec<(String, QoS)> {
    devices
        .iter()
        .flat_map(|d| [topics.state(d), topics.online(d)])
        .map(|f| (f, QoS::AtMostOnce))
        .collect()
}

fn wildcard_filters(topics: &Topics) -> Vec<(String, QoS)> {
    let [state, _events, online] = topics.controller_filters();
    vec![(state, QoS::AtMostOnce), (online, QoS::AtMostOnce)]
}

/// The connection task's state between events.
struct Conn {
    w: Wiring,
    client: Client,
    fence: String,
    reread: Reread,
    /// One tag per SUBSCRIBE requested and not yet on the wire, in request order.
    queued: VecDeque<Tag>,
    /// SUBSCRIBEs on the wire, by packet id.
    sent: HashMap<u16, Tag>,
    /// Watch the drop counter (switched off after the broker twice closed the connection on
    /// that subscription).
    watch_drops: bool,
    /// The drop-counter SUBSCRIBE is out and unanswered.
    drops_pending: bool,
    /// Connections lost while the drop-counter SUBSCRIBE was unanswered.
    drops_strikes: u32,
}

impl Conn {
    fn subscribe(&mut self, tag: Tag, filters: &[(String, QoS)]) {
        match self.client.try_subscribe_many(filters) {
            Ok(()) => self.queued.push_back(tag),
            Err(e) => warn!(?tag, error = %e, "subscribe request failed"),
        }
    }

    /// Subscribe to the re-read wildcards so that the broker sends their retained messages
    /// again. Unsubscribed first: MQTT says re-subscribing an existing filter re-sends its
    /// retained messages, but some brokers (rumqttd) only do so for a new subscription. No
    /// report is lost in between: they are retained, and the subscription re-sends them.
    fn resubscribe_wildcards(&mut self, tag: Tag) {
        let filters = wildcard_filters(&self.w.topics);
        for (f, _) in &filters {
            if let Err(e) = self.client.try_unsubscribe(f.clone()) {
                warn!(error = %e, "unsubscribe request failed");
            }
        }
        self.subscribe(tag, &filters);
    }

    fn known(devices: &RwLock<HashMap<String, DeviceRecord>>) -> Vec<String> {
        devices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    fn perform(&mut self, actions: Vec<Action>) {
        for a in actions {
            if let Action::SubscribePage(n, d) = &a {
                debug!(page = n, devices = d.len(), "re-read page");
            }
            match a {
                Action::SubscribeWildcards => self.resubscribe_wildcards(Tag::Wildcards),
                Action::PublishFence(nonce) => {
                    if let Err(e) =
                        self.client
                            .try_publish(self.fence.clone(), QoS::AtMostOnce, false, nonce)
                    {
                        warn!(error = %e, "re-read fence not sent; the re-read ends on silence");
                    }
                }
                Action::SubscribePage(n, devices) => {
                    let f = page_filters(&self.w.topics, &devices);
                    self.subscribe(Tag::Page(n), &f);
                }
                Action::UnsubscribePage(devices) => {
                    for (f, _) in page_filters(&self.w.topics, &devices) {
                        if let Err(e) = self.client.try_unsubscribe(f) {
                            warn!(error = %e, "unsubscribe request failed");
                        }
                    }
                }
                Action::Finished(s) => {
                    // After every report of the re-read in the ingest channel.
                    if let Err(mpsc::error::TrySendError::Full(m)) =
                        self.w.tx.try_send(Inbound::FleetRead)
                    {
                        let tx = self.w.tx.clone();
                        tokio::spawn(async move { tx.send(m).await });
                    }
                    let c = &self.w.counters;
                    c.rereads.fetch_add(1, Ordering::Relaxed);
                    c.reread_paged
                        .fetch_add(s.by_paging as u64, Ordering::Relaxed);
                    c.reread_unretained
                        .store(s.unretained as u64, Ordering::Relaxed);
                    if s.fence_lost {
                        c.reread_fence_lost.fetch_add(1, Ordering::Relaxed);
                    }
                    let took_ms = s.took.as_millis();
                    if s.by_paging > 0 || s.fence_lost {
                        warn!(
                            reason = s.reason,
                            by_wildcard = s.by_wildcard,
                            by_paging = s.by_paging,
                            unretained = s.unretained,
                            fence_lost = s.fence_lost,
                            took_ms,
                            "re-read complete, but the broker dropped retained reports: raise its \
                             per-client queue (Mosquitto: max_queued_messages) above twice the fleet \
                             size (docs/operations.md, 'Re-reading the fleet')"
                        );
                    } else {
                        info!(
                            reason = s.reason,
                            devices = s.by_wildcard,
                            unretained = s.unretained,
                            took_ms,
                            "re-read of retained reports complete"
                        );
                    }
                }
            }
        }
    }

    /// Handle one message; `false` when ingestion is gone.
    async fn message(&mut self, m: mqtt::Message) -> bool {
        let now = Instant::now();
        if m.topic == self.fence {
            let devices = self.w.devices.clone();
            let acts = self
                .reread
                .fence_arrived(&m.payload, now, || Conn::known(&devices));
            self.perform(acts);
            return true;
        }
        if m.topic == SYS_DROPPED {
            match std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                Some(n) => {
                    self.w.counters.broker_dropped.store(n, Ordering::Relaxed);
                    let grew = self.reread.broker_dropped(n);
                    if grew > 0 {
                        warn!(
                            dropped = grew,
                            "the broker dropped messages (queue full); re-reading retained state"
                        );
                    }
                }
                None => debug!("unreadable broker drop counter"),
            }
            return true;
        }
        if let Ok(Topic::State(device)) = self.w.topics.parse(&m.topic) {
            let acts = self.reread.state_arrived(&device, now);
            self.perform(acts);
        }
        let msg = Inbound::Publish {
            topic: m.topic,
            payload: m.payload.to_vec(),
        };
        self.w.tx.send(msg).await.is_ok()
    }

    fn connected(&mut self, session_present: bool) {
        self.queued.clear();
        self.sent.clear();
        let [_, events, _] = self.w.topics.controller_filters();
        if session_present {
            // The broker kept our subscriptions; make it send the retained reports again.
            for (f, _) in wildcard_filters(&self.w.topics) {
                if let Err(e) = self.client.try_unsubscribe(f) {
                    warn!(error = %e, "unsubscribe request failed");
                }
            }
        }
        let mut filters = vec![(events, QoS::AtLeastOnce)];
        filters.extend(wildcard_filters(&self.w.topics));
        self.subscribe(Tag::Connect, &filters);
        self.reread.connected(Instant::now());
        self.w.engine.reconnected();
    }

    fn suback(&mut self, pkid: u16, granted: &[bool]) {
        let now = Instant::now();
        let acts = match self.sent.remove(&pkid) {
            Some(Tag::Connect) => {
                if granted.iter().any(|g| !g) {
                    warn!(
                        ?granted,
                        "the broker refused a device subscription: check the controller's ACL"
                    );
                }
                if self.watch_drops {
                    self.subscribe(Tag::Drops, &[(SYS_DROPPED.to_owned(), QoS::AtMostOnce)]);
                    self.drops_pending = true;
                }
                self.reread.wildcard_acked(now)
            }
            Some(Tag::Drops) => {
                self.drops_pending = false;
                self.drops_strikes = 0;
                if granted.first() != Some(&true) {
                    debug!("the broker does not share its drop counter ({SYS_DROPPED})");
                }
                Vec::new()
            }
            Some(Tag::Wildcards) => self.reread.wildcard_acked(now),
            Some(Tag::Page(n)) => self.reread.page_acked(n, now),
            None => Vec::new(),
        };
        self.perform(acts);
    }
}

/// Drive the event loop until shutdown: forward device messages to ingestion, re-read the
/// fleet at every (re)connect, and ask the engine to republish on every CONNACK.
pub async fn run(
    mut eventloop: EventLoop,
    client: Client,
    wiring: Wiring,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut c = Conn {
        watch_drops: wiring.watch_drops,
        drops_pending: false,
        drops_strikes: 0,
        fence: wiring.topics.reread_fence(),
        w: wiring,
        client,
        reread: Reread::new(Instant::now()),
        queued: VecDeque::new(),
        sent: HashMap::new(),
    };
    let mut connected_once = false;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ev = tokio::select! {
            _ = shutdown.changed() => break,
            _ = tick.tick() => {
                let devices = c.w.devices.clone();
                let acts = c.reread.tick(Instant::now(), || Conn::known(&devices));
                c.perform(acts);
                continue;
            }
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Message(m)) => {
                if !c.message(m).await {
                    break;
                }
            }
            Ok(Event::Connected { session_present }) => {
                info!(
                    reconnect = connected_once,
                    session_present,
                    protocol = %eventloop.protocol(),
                    "connected to broker"
                );
                connected_once = true;
                c.connected(session_present);
            }
            Ok(Event::SubscribeSent { pkid }) => {
                if let Some(tag) = c.queued.pop_front() {
                    c.sent.insert(pkid, tag);
                }
            }
            Ok(Event::SubAck { pkid, granted }) => c.suback(pkid, &granted),
            Ok(_) => {}
            Err(e) => {
                c.reread.disconnected();
                if std::mem::take(&mut c.drops_pending) {
                    c.drops_strikes += 1;
                    if c.drops_strikes >= 2 {
                        c.watch_drops = false;
                        warn!(
                            "the broker closes the connection on a subscription to {SYS_DROPPED}; \
                             no longer watching it (set broker.watch_drops = false to say so)"
                        );
                    }
                }
                // Nothing is replayed: the engine republishes everything on the next CONNACK,
                // and a replayed SUBSCRIBE would confuse the SUBACK routing above.
                eventloop.clear_pending();
                warn!(error = %e, "broker connection lost; retrying");
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
    let _ = c.client.try_disconnect();
}
