//! One MQTT session type for the agent and the controller, over rumqttc's MQTT 5 and
//! MQTT 3.1.1 clients, chosen by configuration ([`Protocol`]).
//!
//! Why MQTT 5 by default: a 3.1.1 client cannot tell a broker how large a packet it accepts,
//! so a broker whose `max_packet_size` is larger than the client's (or that has none) delivers
//! an oversized retained message, the client's reader fails on it, reconnects, subscribes, gets
//! the same retained message again, and never processes anything else: one message makes it
//! deaf. An MQTT 5 client announces its Maximum Packet Size in CONNECT, and the broker drops
//! larger packets for it instead of sending them (MQTT 5.0 §3.1.2.11.4).
//!
//! Under MQTT 3.1.1 the same protection comes from reading generously: the client accepts
//! packets up to [`MAX_INCOMING_V311`] so that an oversized message is read, handed up, and
//! refused by size (`too_large`) by the caller's parser, and the session carries on. Packets
//! larger still can only come from a broker configured to allow them; the shipped Mosquitto
//! configuration allows 132 KiB.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Largest packet a 3.1.1 session reads (so an oversized message is refused by the caller,
/// not fatal to the connection). MQTT 5 sessions announce their own, smaller, limit instead.
pub const MAX_INCOMING_V311: u32 = 16 * 1024 * 1024;

/// The MQTT protocol version a session speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Protocol {
    /// MQTT 5.0 where the broker speaks it, else 3.1.1 (default): the first CONNECT is MQTT 5;
    /// a broker that closes the door on it without a CONNACK is tried with 3.1.1, and the
    /// version that got a CONNACK is kept for the life of the session.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// MQTT 5.0 only.
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1 only, for brokers without MQTT 5 (e.g. NATS).
    #[serde(rename = "3.1.1")]
    V311,
}

impl Protocol {
    /// The name used in configuration files: `auto`, `5` or `3.1.1`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Auto => "auto",
            Protocol::V5 => "5",
            Protocol::V311 => "3.1.1",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Protocol, String> {
        match s {
            "auto" => Ok(Protocol::Auto),
            "5" | "5.0" => Ok(Protocol::V5),
            "3.1.1" | "4" => Ok(Protocol::V311),
            other => Err(format!(
                "MQTT protocol {other:?} is not \"auto\", \"5\" or \"3.1.1\""
            )),
        }
    }
}

/// Delivery guarantee of a publish or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QoS {
    /// At most once (QoS 0).
    AtMostOnce,
    /// At least once (QoS 1).
    AtLeastOnce,
}

impl QoS {
    fn v4(self) -> rumqttc::QoS {
        match self {
            QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
            QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        }
    }

    fn v5(self) -> rumqttc::v5::mqttbytes::QoS {
        match self {
            QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        }
    }
}

/// The Last Will: published (QoS 1) by the broker when the session ends without a DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained.
    pub retain: bool,
}

/// Everything needed to open a session.
#[derive(Debug, Clone)]
pub struct Options {
    /// Client id.
    pub client_id: String,
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Protocol version.
    pub protocol: Protocol,
    /// TLS (mutual when the configuration carries a client certificate); `None` = plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Username and password.
    pub credentials: Option<(String, String)>,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Keep the session (subscriptions, queued QoS 1 messages) across disconnects.
    pub persistent: bool,
    /// MQTT 5: how long the broker keeps a persistent session after a disconnect (3.1.1
    /// brokers decide this themselves, e.g. Mosquitto's `persistent_client_expiration`).
    pub session_expiry: Duration,
    /// Last Will.
    pub will: Option<Will>,
    /// Largest packet this client sends, and under MQTT 5 the Maximum Packet Size it
    /// announces (the broker drops larger packets for it).
    pub max_packet: u32,
    /// MQTT 5 Receive Maximum: QoS 1 messages the broker may have in flight to this client.
    pub receive_maximum: u16,
    /// QoS 1 publishes of this client in flight at once.
    pub inflight: u16,
    /// Requests that may wait between a [`Client`] and its [`EventLoop`].
    pub channel_capacity: usize,
    /// TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
}

impl Options {
    /// Options with Ringcast's defaults: MQTT 5, plain TCP, clean session, 256 KiB packets.
    pub fn new(client_id: impl Into<String>, host: impl Into<String>, port: u16) -> Options {
        Options {
            client_id: client_id.into(),
            host: host.into(),
            port,
            protocol: Protocol::V5,
            tls: None,
            credentials: None,
            keep_alive: Duration::from_secs(30),
            persistent: false,
            session_expiry: Duration::from_secs(30 * 24 * 3600),
            will: None,
            max_packet: 256 * 1024,
            receive_maximum: 64,
            inflight: 16,
            channel_capacity: 64,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A request could not be handed to the event loop (it stopped, or its queue is full).
#[derive(Debug, Clone, thiserror::Error)]
#[error("MQTT request not queued: {0}")]
pub struct RequestError(String);

impl RequestError {
    fn of(e: impl std::fmt::Display) -> RequestError {
        RequestError(e.to_string())
    }
}

/// The cloneable handle that queues publishes, subscriptions and a disconnect. Under
/// [`Protocol::Auto`] its event loop may switch it to the other protocol version before the
/// first CONNACK; requests queued before that switch are dropped with the old connection, so
/// callers request nothing until they see [`Event::Connected`] (or re-request then).
#[derive(Debug, Clone)]
pub struct Client(Arc<RwLock<ClientKind>>);

#[derive(Debug, Clone)]
enum ClientKind {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

impl Client {
    fn kind(&self) -> ClientKind {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Queue a publish, waiting while the request queue is full.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), RequestError> {
        let payload: Vec<u8> = payload.into();
        match self.kind() {
            ClientKind::V5(c) => c
                .publish(topic, qos.v5(), retain, payload)
                .await
                .map_err(RequestError::of),
            ClientKind::V311(c) => c
                .publish(topic, qos.v4(), retain, payload)
                .await
                .map_err(RequestError::of),
        }
    }

    /// Queue a publish without waiting (fails when the request queue is full).
    pub fn try_publish(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        retain: bool,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), RequestError> {
        let payload: Vec<u8> = payload.into();
        match self.kind() {
            ClientKind::V5(c) => c
                .try_publish(topic, qos.v5(), retain, payload)
                .map_err(RequestError::of),
            ClientKind::V311(c) => c
                .try_publish(topic, qos.v4(), retain, payload)
                .map_err(RequestError::of),
        }
    }

    /// Queue one SUBSCRIBE carrying every filter (they share one SUBACK).
    pub fn try_subscribe_many(&self, filters: &[(String, QoS)]) -> Result<(), RequestError> {
        match self.kind() {
            ClientKind::V5(c) => c
                .try_subscribe_many(v5_filters(filters))
                .map_err(RequestError::of),
            ClientKind::V311(c) => c
                .try_subscribe_many(v4_filters(filters))
                .map_err(RequestError::of),
        }
    }

    /// Queue an UNSUBSCRIBE for one filter without waiting.
    pub fn try_unsubscribe(&self, filter: impl Into<String>) -> Result<(), RequestError> {
        match self.kind() {
            ClientKind::V5(c) => c.try_unsubscribe(filter).map_err(RequestError::of),
            ClientKind::V311(c) => c.try_unsubscribe(filter).map_err(RequestError::of),
        }
    }

    /// Queue a DISCONNECT without waiting.
    pub fn try_disconnect(&self) -> Result<(), RequestError> {
        match self.kind() {
            ClientKind::V5(c) => c.try_disconnect().map_err(RequestError::of),
            ClientKind::V311(c) => c.try_disconnect().map_err(RequestError::of),
        }
    }
}

fn v5_filters(filters: &[(String, QoS)]) -> Vec<rumqttc::v5::mqttbytes::v5::Filter> {
    filters
        .iter()
        .map(|(f, q)| rumqttc::v5::mqttbytes::v5::Filter::new(f.clone(), q.v5()))
        .collect()
}

fn v4_filters(filters: &[(String, QoS)]) -> Vec<rumqttc::SubscribeFilter> {
    filters
        .iter()
        .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), q.v4()))
        .collect()
}

/// A message received on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic (MQTT topics are UTF-8; a packet whose topic is not is reported as
    /// [`Event::Other`]).
    pub topic: String,
    /// Payload, untrusted.
    pub payload: Bytes,
    /// Delivered as a retained message (on subscribe).
    pub retain: bool,
}

/// What the event loop reports, the same for both protocol versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The broker accepted the connection.
    Connected {
        /// The broker still held this client's session.
        session_present: bool,
    },
    /// The broker answered a SUBSCRIBE: one entry per filter, `true` where it was granted.
    SubAck {
        /// Packet id of the SUBSCRIBE.
        pkid: u16,
        /// Granted per filter, in order.
        granted: Vec<bool>,
    },
    /// The broker answered an UNSUBSCRIBE.
    UnsubAck {
        /// Packet id of the UNSUBSCRIBE.
        pkid: u16,
    },
    /// A message on a subscription.
    Message(Message),
    /// The broker acknowledged one of our QoS 1 publishes.
    PubAck {
        /// Packet id of the publish.
        pkid: u16,
    },
    /// One of our publishes went to the wire (packet id 0 for QoS 0), in request order.
    PublishSent {
        /// Packet id.
        pkid: u16,
    },
    /// One of our SUBSCRIBEs went to the wire, in request order.
    SubscribeSent {
        /// Packet id.
        pkid: u16,
    },
    /// Our DISCONNECT went to the wire.
    DisconnectSent,
    /// Anything else (pings, acks of incoming QoS 1 messages, …).
    Other,
}

/// The connection failed or ended; the next [`EventLoop::poll`] reconnects.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectionError {
    /// The broker answered CONNECT with a refusal (bad credentials, not authorised, …).
    #[error("the broker refused the connection: {0}")]
    Refused(String),
    /// The broker could not be reached (refused, unreachable, timed out, TLS failed).
    #[error("{0}")]
    Unreachable(String),
    /// The connection was up, or the TCP/TLS part of it, and then failed or was closed.
    #[error("{0}")]
    Lost(String),
}

/// Drives the session: connects, reconnects on the next poll after an error, and turns what
/// arrives into [`Event`]s.
pub struct EventLoop {
    kind: LoopKind,
    options: Options,
    client: Client,
    /// The version in use now (never `Auto`).
    protocol: Protocol,
    /// The version that got a CONNACK, once one did: kept from then on.
    settled: Option<Protocol>,
}

enum LoopKind {
    V5(Box<rumqttc::v5::EventLoop>),
    V311(Box<rumqttc::EventLoop>),
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("protocol", &self.protocol)
            .field("settled", &self.settled)
            .finish()
    }
}

/// Build the session: the handle and the event loop that must be polled for anything to
/// happen. Nothing connects until the first [`EventLoop::poll`].
pub fn session(o: &Options) -> (Client, EventLoop) {
    let first = match o.protocol {
        Protocol::Auto | Protocol::V5 => Protocol::V5,
        Protocol::V311 => Protocol::V311,
    };
    let (kind, lp) = build(o, first);
    let client = Client(Arc::new(RwLock::new(kind)));
    (
        client.clone(),
        EventLoop {
            kind: lp,
            options: o.clone(),
            client,
            protocol: first,
            settled: (o.protocol != Protocol::Auto).then_some(first),
        },
    )
}

fn build(o: &Options, protocol: Protocol) -> (ClientKind, LoopKind) {
    let secs = |d: Duration| d.as_secs().max(1);
    match protocol {
        Protocol::V311 => {
            use rumqttc::{LastWill, MqttOptions};
            let mut m = MqttOptions::new(o.client_id.clone(), o.host.clone(), o.port);
            let incoming = o.max_packet.max(MAX_INCOMING_V311) as usize;
            m.set_keep_alive(o.keep_alive.max(Duration::from_secs(5)))
                .set_clean_session(!o.persistent)
                .set_max_packet_size(incoming, o.max_packet as usize)
                .set_inflight(o.inflight.max(1))
                .set_request_channel_capacity(o.channel_capacity.max(1));
            if let Some(w) = &o.will {
                m.set_last_will(LastWill::new(
                    w.topic.clone(),
                    w.payload.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    w.retain,
                ));
            }
            if let Some((u, p)) = &o.credentials {
                m.set_credentials(u.clone(), p.clone());
            }
            if let Some(tls) = &o.tls {
                m.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
                    tls.clone(),
                )));
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(m, o.channel_capacity.max(1));
            let mut net = eventloop.network_options();
            // Without it QoS 1 crawls (Nagle + delayed ACK): ~4.7k/s instead of ~70k/s.
            net.set_tcp_nodelay(true);
            net.set_connection_timeout(secs(o.connect_timeout));
            eventloop.set_network_options(net);
            (
                ClientKind::V311(client),
                LoopKind::V311(Box::new(eventloop)),
            )
        }
        Protocol::V5 | Protocol::Auto => {
            use rumqttc::v5::{mqttbytes::v5::LastWill, MqttOptions};
            let mut m = MqttOptions::new(o.client_id.clone(), o.host.clone(), o.port);
            m.set_keep_alive(o.keep_alive.max(Duration::from_secs(5)))
                .set_clean_start(!o.persistent)
                .set_max_packet_size(Some(o.max_packet))
                .set_receive_maximum(Some(o.receive_maximum.max(1)))
                .set_outgoing_inflight_upper_limit(o.inflight.max(1))
                .set_request_channel_capacity(o.channel_capacity.max(1))
                .set_connection_timeout(secs(o.connect_timeout));
            if o.persistent {
                let expiry = u32::try_from(o.session_expiry.as_secs()).unwrap_or(u32::MAX);
                m.set_session_expiry_interval(Some(expiry));
            }
            if let Some(w) = &o.will {
                m.set_last_will(LastWill::new(
                    w.topic.clone(),
                    w.payload.clone(),
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    w.retain,
                    None,
                ));
            }
            if let Some((u, p)) = &o.credentials {
                m.set_credentials(u.clone(), p.clone());
            }
            if let Some(tls) = &o.tls {
                m.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
                    tls.clone(),
                )));
            }
            let mut net = m.network_options();
            net.set_tcp_nodelay(true);
            m.set_network_options(net);
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(m, o.channel_capacity.max(1));
            (ClientKind::V5(client), LoopKind::V5(Box::new(eventloop)))
        }
    }
}

impl EventLoop {
    /// The protocol version in use now (under `Auto`, the one being tried until a CONNACK).
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The next event. After an error, the next call reconnects (callers pause first).
    pub async fn poll(&mut self) -> Result<Event, ConnectionError> {
        let ev = match &mut self.kind {
            LoopKind::V5(l) => l.poll().await.map(v5_event).map_err(v5_error),
            LoopKind::V311(l) => l.poll().await.map(v4_event).map_err(v4_error),
        };
        match ev {
            Ok(e) => {
                if matches!(e, Event::Connected { .. }) {
                    self.settled = Some(self.protocol);
                }
                Ok(e)
            }
            Err(ConnectionError::Lost(detail)) if self.settled.is_none() => {
                // Reached the broker, but it closed the door on this version's CONNECT: try
                // the other one next time.
                let other = match self.protocol {
                    Protocol::V5 => Protocol::V311,
                    _ => Protocol::V5,
                };
                let (kind, lp) = build(&self.options, other);
                *self.client.0.write().unwrap_or_else(|p| p.into_inner()) = kind;
                self.kind = lp;
                let tried = self.protocol;
                self.protocol = other;
                Err(ConnectionError::Lost(format!(
                    "{detail} (MQTT {tried} refused? trying MQTT {other} next)"
                )))
            }
            Err(ConnectionError::Lost(detail))
                if self.protocol == Protocol::V5 && self.options.protocol == Protocol::V5 =>
            {
                // The likeliest reason a broker closes the door on an MQTT 5 CONNECT.
                Err(ConnectionError::Lost(format!(
                    "{detail} (if this broker speaks only MQTT 3.1.1, set protocol = \"3.1.1\" or \"auto\")"
                )))
            }
            Err(e) => Err(e),
        }
    }

    /// Forget the requests rumqttc would replay after a reconnect (unacknowledged publishes
    /// and subscriptions): for callers that keep their own ordered outbox.
    pub fn clear_pending(&mut self) {
        match &mut self.kind {
            LoopKind::V5(l) => l.pending.clear(),
            LoopKind::V311(l) => l.pending.clear(),
        }
    }
}

fn v4_event(e: rumqttc::Event) -> Event {
    use rumqttc::{Outgoing, Packet, SubscribeReasonCode};
    match e {
        rumqttc::Event::Incoming(p) => match p {
            Packet::ConnAck(a) => Event::Connected {
                session_present: a.session_present,
            },
            Packet::SubAck(a) => Event::SubAck {
                pkid: a.pkid,
                granted: a
                    .return_codes
                    .iter()
                    .map(|c| matches!(c, SubscribeReasonCode::Success(_)))
                    .collect(),
            },
            Packet::UnsubAck(a) => Event::UnsubAck { pkid: a.pkid },
            Packet::Publish(p) => Event::Message(Message {
                topic: p.topic,
                payload: p.payload,
                retain: p.retain,
            }),
            Packet::PubAck(a) => Event::PubAck { pkid: a.pkid },
            _ => Event::Other,
        },
        rumqttc::Event::Outgoing(o) => match o {
            Outgoing::Publish(pkid) => Event::PublishSent { pkid },
            Outgoing::Subscribe(pkid) => Event::SubscribeSent { pkid },
            Outgoing::Disconnect => Event::DisconnectSent,
            _ => Event::Other,
        },
    }
}

fn v5_event(e: rumqttc::v5::Event) -> Event {
    use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
    use rumqttc::Outgoing;
    match e {
        rumqttc::v5::Event::Incoming(p) => match p {
            Packet::ConnAck(a) => Event::Connected {
                session_present: a.session_present,
            },
            Packet::SubAck(a) => Event::SubAck {
                pkid: a.pkid,
                granted: a
                    .return_codes
                    .iter()
                    .map(|c| matches!(c, SubscribeReasonCode::Success(_)))
                    .collect(),
            },
            Packet::UnsubAck(a) => Event::UnsubAck { pkid: a.pkid },
            Packet::Publish(p) => match String::from_utf8(p.topic.to_vec()) {
                Ok(topic) => Event::Message(Message {
                    topic,
                    payload: p.payload,
                    retain: p.retain,
                }),
                Err(_) => Event::Other,
            },
            Packet::PubAck(a) => Event::PubAck { pkid: a.pkid },
            _ => Event::Other,
        },
        rumqttc::v5::Event::Outgoing(o) => match o {
            Outgoing::Publish(pkid) => Event::PublishSent { pkid },
            Outgoing::Subscribe(pkid) => Event::SubscribeSent { pkid },
            Outgoing::Disconnect => Event::DisconnectSent,
            _ => Event::Other,
        },
    }
}

fn io_kind(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused
            | TimedOut
            | NotFound
            | AddrNotAvailable
            | HostUnreachable
            | NetworkUnreachable
    )
}

fn v4_error(e: rumqttc::ConnectionError) -> ConnectionError {
    use rumqttc::ConnectionError as E;
    match e {
        E::ConnectionRefused(code) => ConnectionError::Refused(format!("{code:?}")),
        E::Io(io) if io_kind(&io) => ConnectionError::Unreachable(io.to_string()),
        e @ (E::Tls(_) | E::NetworkTimeout | E::FlushTimeout) => {
            ConnectionError::Unreachable(e.to_string())
        }
        other => ConnectionError::Lost(other.to_string()),
    }
}

fn v5_error(e: rumqttc::v5::ConnectionError) -> ConnectionError {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    use rumqttc::v5::ConnectionError as E;
    match e {
        // A 3.1.1-only broker that answers at all says so with this code.
        E::ConnectionRefused(
            code @ (C::UnsupportedProtocolVersion | C::RefusedProtocolVersion),
        ) => ConnectionError::Lost(format!("the broker refused MQTT 5: {code:?}")),
        E::ConnectionRefused(code) => ConnectionError::Refused(format!("{code:?}")),
        E::Io(io) if io_kind(&io) => ConnectionError::Unreachable(io.to_string()),
        e @ (E::Timeout(_) | E::Tls(_)) => ConnectionError::Unreachable(e.to_string()),
        other => ConnectionError::Lost(other.to_string()),
    }
}
