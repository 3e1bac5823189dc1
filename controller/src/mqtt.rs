//! The controller's MQTT connection: one client that publishes directives and the trust root
//! and subscribes to every device's state, events and online flag. The event loop runs in its
//! own task, reconnects by itself, resubscribes on every CONNACK (clean sessions) and tells
//! the engine to republish, so a broker restart loses nothing.

use crate::config::BrokerTls;
use crate::engine::EngineHandle;
use crate::error::{Error, Result};
use crate::ingest::Inbound;
use rumqttc::{
    AsyncClient, EventLoop, MqttOptions, NetworkOptions, Packet, QoS, TlsConfiguration, Transport,
};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

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
    /// Credentials.
    pub credentials: Option<(String, String)>,
    /// TLS (mutual when a client certificate is given); `None` = plain TCP.
    pub tls: Option<BrokerTls>,
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

/// Create the client and its event loop.
pub fn connect(s: &MqttSettings) -> Result<(AsyncClient, EventLoop)> {
    install_crypto_provider();
    let mut o = MqttOptions::new(&s.client_id, &s.host, s.port);
    o.set_keep_alive(Duration::from_secs(15));
    o.set_clean_session(true);
    o.set_max_packet_size(256 * 1024, 256 * 1024);
    o.set_inflight(200);
    if let Some((u, p)) = &s.credentials {
        o.set_credentials(u, p);
    }
    if let Some(tls) = &s.tls {
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(
            tls_config(tls)?,
        ))));
    }
    let (client, mut eventloop) = AsyncClient::new(o, 10_000);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    eventloop.set_network_options(net);
    Ok((client, eventloop))
}

/// Drive the event loop until shutdown: forward publishes to ingestion, resubscribe and ask
/// the engine to republish on every (re)connect.
pub async fn run(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filters: Vec<String>,
    tx: mpsc::Sender<Inbound>,
    engine: EngineHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connected_once = false;
    loop {
        let ev = tokio::select! {
            _ = shutdown.changed() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                let msg = Inbound::Publish {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                };
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                info!(reconnect = connected_once, "connected to broker");
                for f in &filters {
                    // try_: we are the task that drains the request channel.
                    if let Err(e) = client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                        warn!(filter = %f, error = %e, "subscribe failed");
                    }
                }
                if connected_once {
                    engine.reconnected();
                }
                connected_once = true;
            }
            Ok(other) => debug!(?other, "mqtt"),
            Err(e) => {
                warn!(error = %e, "broker connection lost; retrying");
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
    let _ = client.try_disconnect();
}
