//! The MQTT session ([`ringcast_io::mqtt`]: MQTT 5 where the broker speaks it, announcing a
//! 256 KiB Maximum Packet Size so one oversized retained message cannot make the agent deaf;
//! 3.1.1 otherwise): persistent session, QoS 1, Last Will `false` on `…/online`, reconnect with
//! capped exponential backoff and jitter, subscriptions exactly as DESIGN.md lists (trust, own
//! ring directive, own device directive; with `[products]`, each product's ring and device
//! directive instead of those two, see [`subscriptions`]). On every (re)connect the agent is told, and
//! publishes its current state again: a broker restored from an old save must not keep an old
//! report of this device retained.
//!
//! Outgoing reports never go to the wire directly: the agent appends them to the persisted
//! outbox ([`crate::store::Store`]) and pokes this task, which publishes them in order and
//! removes each one only when the broker acknowledged it (PUBACK). After a lost connection
//! everything unacknowledged is sent again from the outbox (rumqttc's own replay is cleared
//! so the order stays the outbox's); duplicates on the wire carry the same event id.

use crate::config::AgentConfig;
use crate::error::{Error, Result};
use crate::store::Store;
use ringcast_io::mqtt::{self, Client, Event, QoS, Will};
use ringcast_proto::Topics;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};

/// Outbox record tag: a retained state report.
pub const TAG_STATE: u8 = b'S';
/// Outbox record tag: an event.
pub const TAG_EVENT: u8 = b'E';

/// What the transport hands to the agent.
#[derive(Debug)]
pub enum Inbound {
    /// A message on a subscribed topic.
    Message {
        /// Topic.
        topic: String,
        /// Payload (untrusted).
        payload: Vec<u8>,
    },
    /// The broker acknowledged our subscriptions (retained messages follow right away).
    Subscribed,
    /// A session was (re)established: the agent publishes its current state again.
    Connected,
}

/// Parse `mqtt(s)://host:port` into (tls, host, port).
pub fn parse_broker_url(url: &str) -> std::result::Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!("{url:?} must start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse::<u16>()
                .map_err(|_| format!("{url:?} has a bad port"))?,
        ),
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("{url:?} has no host"));
    }
    Ok((tls, host.to_owned(), port))
}

/// Install rustls's ring provider once per process (rumqttc is built without a provider).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn tls_config(c: &AgentConfig) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &c.broker.ca_file {
        for cert in CertificateDer::pem_file_iter(ca)
            .map_err(|e| Error::Mqtt(format!("broker.ca_file {}: {e}", ca.display())))?
        {
            let cert =
                cert.map_err(|e| Error::Mqtt(format!("broker.ca_file {}: {e}", ca.display())))?;
            roots
                .add(cert)
                .map_err(|e| Error::Mqtt(format!("broker.ca_file {}: {e}", ca.display())))?;
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match (&c.broker.client_cert, &c.broker.client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_chain(cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| Error::Mqtt(format!("broker.client_key {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Mqtt(format!("client certificate: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn read_chain(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Mqtt(format!("broker.client_cert {}: {e}", path.display())))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Mqtt(format!("broker.client_cert {}: {e}", path.display())))
}

/// The session options for this device: persistent session, Last Will, 256 KiB packets.
pub fn session_options(c: &AgentConfig) -> Result<mqtt::Options> {
    let (tls, host, port) = parse_broker_url(&c.broker.url).map_err(Error::Mqtt)?;
    let topics = c.topics().map_err(|e| Error::Mqtt(e.detail))?;
    let mut o = mqtt::Options::new(c.device_id.clone(), host, port);
    o.protocol = c.broker.protocol;
    o.keep_alive = c.broker.keep_alive.get().max(Duration::from_secs(5));
    o.persistent = true;
    o.will = Some(Will {
        topic: topics.online(&c.device_id),
        payload: b"false".to_vec(),
        retain: true,
    });
    // A directive embeds a whole release envelope (≤ 64 KiB); anything much larger is an
    // attack or a mistake, and under MQTT 5 the broker drops it for us.
    o.max_packet = 256 * 1024;
    o.receive_maximum = 16;
    o.inflight = 16;
    o.channel_capacity = 64;
    o.connect_timeout = Duration::from_secs(10);
    if let Some(u) = &c.broker.username {
        o.credentials = Some((u.clone(), c.broker.password.clone().unwrap_or_default()));
    }
    if tls {
        o.tls = Some(tls_config(c)?);
    }
    Ok(o)
}

/// The topics this device subscribes to: the trust topic and its ring's and its own
/// directive topics, or, with `[products]`, the trust topic and each product's two.
pub fn subscriptions(c: &AgentConfig, topics: &Topics) -> Vec<String> {
    if !c.is_multi_product() {
        return topics.agent_subscriptions(&c.ring, &c.device_id).to_vec();
    }
    std::iter::once(topics.trust())
        .chain(
            c.products
                .keys()
                .flat_map(|p| topics.product_subscriptions(&c.ring, &c.device_id, p)),
        )
        .collect()
}

/// The session task. Runs until `shutdown` turns true, then says `online = false`.
pub async fn run(
    c: AgentConfig,
    store: Arc<dyn Store>,
    inbound: mpsc::Sender<Inbound>,
    poke: Arc<Notify>,
    connected: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let topics = c.topics().map_err(|e| Error::Mqtt(e.detail))?;
    let (client, mut eventloop) = mqtt::session(&session_options(&c)?);
    let subs: Vec<(String, QoS)> = subscriptions(&c, &topics)
        .into_iter()
        .map(|t| (t, QoS::AtLeastOnce))
        .collect();
    let state_topic = topics.state(&c.device_id);
    let events_topic = topics.events(&c.device_id);
    let online_topic = topics.online(&c.device_id);
    let mut s = Session::default();
    let mut failures: u32 = 0;
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            ev = eventloop.poll() => match ev {
                Ok(Event::Connected { .. }) => {
                    failures = 0;
                    s = Session { up: true, ..Session::default() };
                    let _ = connected.send(true);
                    tracing::info!(device = %c.device_id, broker = %c.broker.url, protocol = %eventloop.protocol(), "connected");
                    let _ = client.try_subscribe_many(&subs);
                    s.tags.push_back(None);
                    let _ = client.try_publish(online_topic.clone(), QoS::AtLeastOnce, true, "true");
                    // The agent queues a fresh state report; it goes out after what is queued.
                    let _ = inbound.send(Inbound::Connected).await;
                    s.send_more(&client, &*store, &state_topic, &events_topic);
                }
                Ok(Event::SubAck { granted, .. }) => {
                    if granted.iter().any(|g| !g) {
                        tracing::warn!(device = %c.device_id, ?granted, "the broker refused a subscription (check its ACL)");
                    }
                    let _ = inbound.send(Inbound::Subscribed).await;
                }
                Ok(Event::Message(m)) => {
                    let _ = inbound
                        .send(Inbound::Message { topic: m.topic, payload: m.payload.to_vec() })
                        .await;
                }
                Ok(Event::PublishSent { pkid }) => {
                    if let Some(Some(seq)) = s.tags.pop_front() {
                        s.by_pkid.insert(pkid, seq);
                    }
                }
                Ok(Event::PubAck { pkid }) => {
                    if let Some(seq) = s.by_pkid.remove(&pkid) {
                        s.inflight.remove(&seq);
                        if let Err(e) = store.outbox_remove(seq) {
                            tracing::warn!(error = %e, "outbox remove failed");
                        }
                    }
                    s.send_more(&client, &*store, &state_topic, &events_topic);
                }
                Ok(_) => {}
                Err(e) => {
                    if s.up {
                        tracing::warn!(device = %c.device_id, error = %e, "broker connection lost");
                    } else {
                        tracing::debug!(device = %c.device_id, error = %e, "connect failed");
                    }
                    s = Session::default();
                    let _ = connected.send(false);
                    // Our outbox re-sends what was not acknowledged, in order; rumqttc's own
                    // replay would interleave with it.
                    eventloop.clear_pending();
                    failures = failures.saturating_add(1);
                    let delay = backoff(c.broker.reconnect_min.get(), c.broker.reconnect_max.get(), failures);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            },
            _ = poke.notified(), if s.up => {
                s.send_more(&client, &*store, &state_topic, &events_topic);
            }
        }
    }
    // Graceful goodbye: flush what we can for a moment, say offline, disconnect.
    if s.up {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let _ = client.try_publish(online_topic.clone(), QoS::AtLeastOnce, true, "false");
        s.tags.push_back(None);
        let _ = client.try_disconnect();
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::DisconnectSent)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {}
            }
        }
    }
    let _ = connected.send(false);
    Ok(())
}

/// Per-connection publishing state.
#[derive(Default)]
struct Session {
    up: bool,
    /// Outbox sequences published on this connection and not yet acknowledged.
    inflight: HashSet<u64>,
    /// Highest outbox sequence published on this connection.
    sent_upto: Option<u64>,
    /// One tag per publish request, in request order: the outbox sequence, or `None`.
    tags: VecDeque<Option<u64>>,
    by_pkid: HashMap<u16, u64>,
}

const WINDOW: usize = 8;

impl Session {
    fn send_more(&mut self, client: &Client, store: &dyn Store, state: &str, events: &str) {
        if !self.up || self.inflight.len() >= WINDOW {
            return;
        }
        let Ok(items) = store.outbox_peek(WINDOW * 2 + self.inflight.len()) else {
            return;
        };
        for (seq, msg) in items {
            if self.inflight.len() >= WINDOW {
                break;
            }
            if self.sent_upto.is_some_and(|u| seq <= u) {
                continue;
            }
            let (topic, retain) = match msg.first() {
                Some(&TAG_STATE) => (state, true),
                Some(&TAG_EVENT) => (events, false),
                _ => {
                    let _ = store.outbox_remove(seq);
                    continue;
                }
            };
            if client
                .try_publish(topic, QoS::AtLeastOnce, retain, msg[1..].to_vec())
                .is_err()
            {
                break;
            }
            self.tags.push_back(Some(seq));
            self.inflight.insert(seq);
            self.sent_upto = Some(seq);
        }
    }
}

/// Capped exponential backoff with ±25% jitter.
pub fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let exp = min.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let base = exp.min(max);
    let j = jitter_fraction();
    base.mul_f64(0.75 + 0.5 * j)
}

/// A number in [0, 1) that differs between calls and processes (no RNG crate needed for
/// spreading reconnects).
pub fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse() {
        assert_eq!(
            parse_broker_url("mqtt://127.0.0.1:1883").unwrap(),
            (false, "127.0.0.1".into(), 1883)
        );
        assert_eq!(
            parse_broker_url("mqtts://broker.example").unwrap(),
            (true, "broker.example".into(), 8883)
        );
        assert!(parse_broker_url("http://x").is_err());
        assert!(parse_broker_url("mqtt://:1").is_err());
        assert!(parse_broker_url("mqtt://h:99999").is_err());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        assert!(backoff(min, max, 1) <= Duration::from_millis(125));
        assert!(backoff(min, max, 4) >= Duration::from_millis(600));
        assert!(backoff(min, max, 30) <= Duration::from_millis(6250));
    }
}
