//! MQTT clients for tests: rumqttc options for mutual TLS (or plain TCP for the embedded
//! broker) and [`TestClient`], which connects, subscribes and publishes with every wait
//! bounded, and buffers what it receives so nothing is lost while it waits for an ack.

use crate::certs::ClientCert;
use crate::error::{HarnessError, Result};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Largest packet test clients send or accept: a 64 KiB envelope plus topic and headers
/// (rumqttc's default of 10 KiB would drop real directives).
pub const MAX_PACKET: usize = 128 * 1024;

/// Install rustls' ring provider as the process default (rumqttc is built with
/// `use-rustls-no-provider`). Safe to call repeatedly.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Options for a plain-TCP client (the embedded broker).
pub fn plain_options(client_id: &str, host: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    o
}

/// Options for a TLS client trusting `ca_pem`, presenting `identity` if given (mutual TLS).
/// `host` must match the server certificate (`127.0.0.1` and `localhost` do for certificates
/// from `make-certs.sh`).
pub fn tls_options(
    client_id: &str,
    host: &str,
    port: u16,
    ca_pem: Vec<u8>,
    identity: Option<&ClientCert>,
) -> Result<MqttOptions> {
    install_crypto_provider();
    let client_auth = identity.map(ClientCert::pem_pair).transpose()?;
    let mut o = plain_options(client_id, host, port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: ca_pem,
        alpn: None,
        client_auth,
    }));
    Ok(o)
}

/// What the event-loop task forwards.
#[derive(Debug)]
enum Feed {
    Event(Event),
    Error(String),
}

/// A connected MQTT client that records what it receives. Dropping it stops its event loop.
#[derive(Debug)]
pub struct TestClient {
    client: AsyncClient,
    feed: mpsc::UnboundedReceiver<Feed>,
    task: JoinHandle<()>,
    /// Publishes received but not yet taken by the test.
    inbox: VecDeque<Publish>,
    /// Connection errors seen after the connect (the loop keeps reconnecting).
    errors: Vec<String>,
}

/// Create the client and its event loop with TCP_NODELAY on: without it every QoS 1 round
/// trip waits on Nagle plus delayed ACK (~40 ms). rumqttc keeps this on the event loop's
/// network options, not on `MqttOptions`.
pub fn client_with_nodelay(opts: MqttOptions, cap: usize) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(opts, cap);
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// Drive the event loop. After an error the loop reconnects (rumqttc does so on the next
/// poll) after a short real pause, so a broker restart is survived, unless `stop_on_error`.
fn spawn_loop(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<Feed>,
    stop_on_error: bool,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(ev) => {
                    if tx.send(Feed::Event(ev)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    if tx.send(Feed::Error(e.to_string())).is_err() || stop_on_error {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

impl TestClient {
    /// Connect and wait for a successful CONNACK within `timeout`; reconnects on later errors.
    pub async fn connect(opts: MqttOptions, timeout: Duration) -> Result<TestClient> {
        let id = opts.client_id();
        let (client, eventloop) = client_with_nodelay(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = spawn_loop(eventloop, tx, false);
        let mut c = TestClient {
            client,
            feed: rx,
            task,
            inbox: VecDeque::new(),
            errors: Vec::new(),
        };
        let deadline = Instant::now() + timeout;
        loop {
            match c.next_feed(deadline).await {
                Some(Feed::Event(Event::Incoming(Packet::ConnAck(ack)))) => {
                    if ack.code == rumqttc::ConnectReturnCode::Success {
                        return Ok(c);
                    }
                    return Err(HarnessError::Mqtt(format!("{id}: CONNACK {:?}", ack.code)));
                }
                Some(Feed::Error(e)) => {
                    return Err(HarnessError::Mqtt(format!("{id}: connect failed: {e}")))
                }
                Some(Feed::Event(_)) => {}
                None => {
                    return Err(HarnessError::Timeout(format!(
                        "{id}: no CONNACK within {timeout:?}"
                    )))
                }
            }
        }
    }

    /// Expect the broker to refuse this client: returns the connection error, or fails if a
    /// successful CONNACK arrives or nothing happens within `timeout`.
    pub async fn expect_refused(opts: MqttOptions, timeout: Duration) -> Result<String> {
        let id = opts.client_id();
        let (client, eventloop) = client_with_nodelay(opts, 8);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = spawn_loop(eventloop, tx, true);
        let deadline = Instant::now() + timeout;
        let outcome = loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Feed::Error(e))) => break Ok(e),
                Ok(Some(Feed::Event(Event::Incoming(Packet::ConnAck(ack)))))
                    if ack.code == rumqttc::ConnectReturnCode::Success =>
                {
                    break Err(HarnessError::Mqtt(format!(
                        "{id}: the broker accepted a client it should refuse"
                    )))
                }
                Ok(Some(Feed::Event(Event::Incoming(Packet::ConnAck(ack))))) => {
                    break Ok(format!("CONNACK {:?}", ack.code))
                }
                Ok(Some(Feed::Event(_))) => {}
                Ok(None) => break Err(HarnessError::Mqtt(format!("{id}: event loop ended"))),
                Err(_) => {
                    break Err(HarnessError::Timeout(format!(
                        "{id}: neither refused nor accepted within {timeout:?}"
                    )))
                }
            }
        };
        task.abort();
        drop(client);
        outcome
    }

    /// The next item from the event loop before `deadline`, buffering publishes and errors.
    async fn next_feed(&mut self, deadline: Instant) -> Option<Feed> {
        match tokio::time::timeout_at(deadline, self.feed.recv()).await {
            Ok(Some(Feed::Event(Event::Incoming(Packet::Publish(p))))) => {
                self.inbox.push_back(p.clone());
                Some(Feed::Event(Event::Incoming(Packet::Publish(p))))
            }
            Ok(Some(Feed::Error(e))) => {
                self.errors.push(e.clone());
                Some(Feed::Error(e))
            }
            Ok(Some(f)) => Some(f),
            Ok(None) | Err(_) => None,
        }
    }

    /// Subscribe at QoS 1 and return the broker's SUBACK return codes.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        timeout: Duration,
    ) -> Result<Vec<SubscribeReasonCode>> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .map_err(|e| HarnessError::Mqtt(format!("subscribe {filter}: {e}")))?;
        let deadline = Instant::now() + timeout;
        let mut pkid = None;
        loop {
            match self.next_feed(deadline).await {
                Some(Feed::Event(Event::Outgoing(Outgoing::Subscribe(id)))) if pkid.is_none() => {
                    pkid = Some(id)
                }
                Some(Feed::Event(Event::Incoming(Packet::SubAck(ack))))
                    if Some(ack.pkid) == pkid =>
                {
                    return Ok(ack.return_codes)
                }
                Some(_) => {}
                None => {
                    return Err(HarnessError::Timeout(format!(
                        "no SUBACK for {filter} within {timeout:?}"
                    )))
                }
            }
        }
    }

    /// Subscribe and require the broker to grant it.
    pub async fn subscribe_ok(&mut self, filter: &str, timeout: Duration) -> Result<()> {
        let codes = self.subscribe(filter, timeout).await?;
        if codes
            .iter()
            .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
        {
            Ok(())
        } else {
            Err(HarnessError::Mqtt(format!(
                "subscribe {filter} refused: {codes:?}"
            )))
        }
    }

    /// Publish at QoS 1 and wait for the PUBACK. A PUBACK does NOT mean the broker delivered
    /// it: Mosquitto acknowledges a publish its ACL denies (MQTT 3.1.1) and drops it.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        retain: bool,
        timeout: Duration,
    ) -> Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.into())
            .await
            .map_err(|e| HarnessError::Mqtt(format!("publish {topic}: {e}")))?;
        let deadline = Instant::now() + timeout;
        let mut pkid = None;
        loop {
            match self.next_feed(deadline).await {
                Some(Feed::Event(Event::Outgoing(Outgoing::Publish(id)))) if pkid.is_none() => {
                    pkid = Some(id)
                }
                Some(Feed::Event(Event::Incoming(Packet::PubAck(ack))))
                    if Some(ack.pkid) == pkid =>
                {
                    return Ok(())
                }
                Some(_) => {}
                None => {
                    return Err(HarnessError::Timeout(format!(
                        "no PUBACK for {topic} within {timeout:?}"
                    )))
                }
            }
        }
    }

    /// Wait for a publish on exactly `topic` (earlier ones on other topics stay in the inbox).
    pub async fn expect_publish(&mut self, topic: &str, timeout: Duration) -> Result<Publish> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.inbox.iter().position(|p| p.topic == topic) {
                if let Some(p) = self.inbox.remove(i) {
                    return Ok(p);
                }
            }
            if self.next_feed(deadline).await.is_none() {
                let seen: Vec<&str> = self.inbox.iter().map(|p| p.topic.as_str()).collect();
                return Err(HarnessError::Timeout(format!(
                    "nothing on {topic} within {timeout:?}; inbox: {seen:?}"
                )));
            }
        }
    }

    /// Prove a NEGATIVE: nothing arrives on a topic that `forbidden` accepts within `within`.
    /// Only meaningful after a positive control proved the path works; keep `within` short.
    pub async fn expect_nothing(
        &mut self,
        forbidden: impl Fn(&str) -> bool,
        within: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(p) = self.inbox.iter().find(|p| forbidden(&p.topic)) {
                return Err(HarnessError::Mqtt(format!(
                    "unexpected delivery on {} ({} bytes)",
                    p.topic,
                    p.payload.len()
                )));
            }
            if self.next_feed(deadline).await.is_none() {
                return Ok(());
            }
        }
    }

    /// Publishes received and not yet taken.
    pub fn inbox(&self) -> &VecDeque<Publish> {
        &self.inbox
    }

    /// Connection errors seen since connecting.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// The underlying rumqttc handle, for anything not covered here.
    pub fn handle(&self) -> &AsyncClient {
        &self.client
    }

    /// Disconnect cleanly (no last will) and stop the event loop.
    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        // Give the DISCONNECT a bounded chance to leave before the loop is stopped.
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Some(f) = self.next_feed(deadline).await {
            if matches!(
                f,
                Feed::Event(Event::Outgoing(Outgoing::Disconnect)) | Feed::Error(_)
            ) {
                break;
            }
        }
        self.task.abort();
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publish every message (QoS 1, `retain` as given) from one plain-TCP client with up to
/// 200 in flight, and wait until the broker acknowledged them all, within `timeout`. For
/// synthetic fleets: thousands of retained reports in a second or two.
pub async fn publish_all(
    client_id: &str,
    port: u16,
    messages: Vec<(String, Vec<u8>)>,
    retain: bool,
    timeout: Duration,
) -> Result<()> {
    let mut o = plain_options(client_id, "127.0.0.1", port);
    o.set_inflight(200);
    o.set_max_packet_size(32 * 1024 * 1024, 32 * 1024 * 1024);
    let total = messages.len();
    let (client, mut eventloop) = client_with_nodelay(o, 1024);
    let feeder = tokio::spawn(async move {
        for (topic, payload) in messages {
            if client
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .await
                .is_err()
            {
                return client;
            }
        }
        client
    });
    let deadline = Instant::now() + timeout;
    let mut acked = 0;
    while acked < total {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(HarnessError::Mqtt(format!(
                    "{client_id}: connection failed after {acked} of {total} acks: {e}"
                )))
            }
            Err(_) => {
                return Err(HarnessError::Timeout(format!(
                    "{client_id}: {acked} of {total} publishes acknowledged within {timeout:?}"
                )))
            }
        }
    }
    if let Ok(client) = feeder.await {
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    }
    Ok(())
}
