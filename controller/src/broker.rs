//! The embedded MQTT broker (rumqttd): what `ringcast serve` runs when no broker is
//! configured, and what the demo and the tests use.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::net::SocketAddr;

/// A free TCP port on 127.0.0.1, reserved for this process (see `ringcast_io::ports`: no
/// other process's `bind(0)` or outgoing connection can take it before the broker binds it).
pub fn free_port() -> Result<u16> {
    ringcast_io::ports::reserve().map_err(|e| Error::Broker(e.to_string()))
}

/// Start an embedded rumqttd on 127.0.0.1 on a free port; returns the port once the broker
/// accepts connections. rumqttd has no shutdown: the broker lives as long as the process.
pub fn start_embedded() -> Result<u16> {
    let port = free_port()?;
    start_embedded_on(port)?;
    Ok(port)
}

/// Retained messages the embedded broker forwards per new QoS 0 subscription (it drops the
/// rest): room for the state and online flag of a million devices.
pub const RETAINED_PER_SUBSCRIPTION: u64 = 4_000_000;

/// Start an embedded rumqttd on `127.0.0.1:port` and wait until it accepts connections.
pub fn start_embedded_on(port: u16) -> Result<()> {
    start_embedded_with(port, RETAINED_PER_SUBSCRIPTION)
}

/// [`start_embedded_on`] with another cap on the retained messages a new subscription gets:
/// tests use a small one to stand for brokers that truncate a re-read.
pub fn start_embedded_with(port: u16, retained_per_subscription: u64) -> Result<()> {
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        // A directive embeds a whole release envelope (≤ 64 KiB) plus its own fields.
        max_payload_size: 256 * 1024,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: format!("ringcast-v4-{port}"),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 20_010,
            // QoS 0 reads (the controller's state and online wildcards) forward at most this many
            // retained messages per subscription and drop the rest.
            max_outgoing_packet_count: retained_per_subscription,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name(format!("rumqttd-{port}"))
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, port, "embedded broker stopped");
            }
        })
        .map_err(|e| Error::Broker(format!("spawn: {e}")))?;
    // Wait (bounded) until the listener is up, so callers can connect at once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if std::net::TcpStream::connect(listen).is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::Broker(format!(
                "embedded broker did not listen on {listen} within 10s"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
