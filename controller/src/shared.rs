//! State shared by the controller's tasks: configuration, clock, store, audit log, the
//! engine's state (written only by the engine actor), the device table (written only by
//! ingestion) and counters.

use crate::artifacts::ArtifactStore;
use crate::audit::AuditLog;
use crate::config::{Policy, TokenEntry};
use crate::engine::Snapshot;
use crate::model::DeviceRecord;
use crate::store::Store;
use jiff::Timestamp;
use ringcast_proto::{Clock, SecretKey, Topics, TrustRoot};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use tokio::sync::{watch, Notify};

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// State reports accepted.
    pub reports: AtomicU64,
    /// Events accepted (after dedupe).
    pub events: AtomicU64,
    /// Duplicate events dropped.
    pub duplicate_events: AtomicU64,
    /// Messages refused (malformed, oversized, foreign topic).
    pub rejected: AtomicU64,
    /// API requests refused for auth (401/403).
    pub auth_denied: AtomicU64,
    /// State reports ignored because the controller already held a newer one (`seq`).
    pub stale_reports: AtomicU64,
    /// Messages refused for their size (`too_large`).
    pub too_large: AtomicU64,
    /// Re-reads of retained state completed.
    pub rereads: AtomicU64,
    /// Devices recovered by re-read paging (the broker had dropped their retained report).
    pub reread_paged: AtomicU64,
    /// Re-reads whose fence never came back (the broker dropped messages).
    pub reread_fence_lost: AtomicU64,
    /// Known devices without a retained report on the broker at the last re-read (gauge).
    pub reread_unretained: AtomicU64,
    /// The broker's own count of dropped messages, where it publishes one (gauge).
    pub broker_dropped: AtomicU64,
}

/// Everything the tasks share.
#[derive(Debug)]
pub struct Shared {
    /// Rollout policy.
    pub policy: Policy,
    /// Topic names.
    pub topics: Topics,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Database.
    pub store: Store,
    /// Audit log.
    pub audit: AuditLog,
    /// Engine state (releases, rollouts, ring directives), as the engine last persisted it.
    pub state: Snapshot,
    /// Devices by id.
    pub devices: Arc<RwLock<HashMap<String, DeviceRecord>>>,
    /// Wakes the engine when a report arrives.
    pub wake: Arc<Notify>,
    /// Counters.
    pub counters: Arc<Counters>,
    /// Trust root used to verify releases.
    pub trust: TrustRoot,
    /// Its envelope bytes, published retained on `…/trust`.
    pub trust_envelope: Vec<u8>,
    /// Controller role key.
    pub key: SecretKey,
    /// MQTT client.
    pub mqtt: ringcast_io::mqtt::Client,
    /// Artifact store.
    pub artifacts: ArtifactStore,
    /// API tokens.
    pub tokens: Vec<TokenEntry>,
    /// Largest accepted artifact upload.
    pub max_artifact_bytes: u64,
    /// Webhook delivery progress (for `/metrics`).
    pub webhooks: Vec<Arc<crate::webhook::WebhookStatus>>,
    /// The clock reading of the last engine tick that was decided and carried out in full
    /// (persisted, published, checks started): see [`Shared::settled`].
    pub settled: watch::Sender<Timestamp>,
    /// Whether the device table holds the whole fleet: false from start until the first
    /// re-read of the broker's retained reports is applied. Until then a report missing from
    /// the table may only be late, so the engine takes no decision from an absence (a bake
    /// does not lose its gate, a gate is not declared unreachable).
    pub fleet_read: Arc<std::sync::atomic::AtomicBool>,
}

impl Shared {
    /// The forecast of every live rollout and device as of now ([`crate::engine::forecast`]),
    /// over a copy of the device table (ingestion never waits while the forecast reads event
    /// histories from the store). It walks the whole fleet: compute it once per request.
    pub fn forecast(&self) -> crate::engine::forecast::Forecast {
        let now = self.clock.now();
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        let devices = self
            .devices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let fleet = crate::engine::forecast::FleetView {
            devices: &devices,
            history: &self.store,
        };
        crate::engine::forecast::forecast(&self.policy, &st, &fleet, now)
    }

    /// Wait until the engine has decided and carried out a tick at or after `at`: the
    /// "settled" signal for tests and tools that change the clock or the fleet and must know
    /// the engine has looked, without sleeping.
    pub async fn settled(&self, at: Timestamp) {
        let mut rx = self.settled.subscribe();
        // The sender lives as long as `self`; an error would mean it was dropped.
        let _ = rx.wait_for(|t| *t >= at).await;
    }
}
