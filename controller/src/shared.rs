//! State shared by the controller's tasks: configuration, clock, store, audit log, the
//! engine's state (written only by the engine actor), the device table (written only by
//! ingestion) and counters.

use crate::artifacts::ArtifactStore;
use crate::audit::AuditLog;
use crate::config::{Policy, TokenEntry};
use crate::engine::EngineState;
use crate::model::DeviceRecord;
use crate::store::Store;
use ringcast_proto::{Clock, SecretKey, Topics, TrustRoot};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use tokio::sync::Notify;

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
    /// Engine state (releases, rollouts, ring directives).
    pub state: RwLock<EngineState>,
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
    pub mqtt: rumqttc::AsyncClient,
    /// Artifact store.
    pub artifacts: ArtifactStore,
    /// API tokens.
    pub tokens: Vec<TokenEntry>,
    /// Largest accepted artifact upload.
    pub max_artifact_bytes: u64,
    /// Webhook delivery progress (for `/metrics`).
    pub webhooks: Vec<Arc<crate::webhook::WebhookStatus>>,
}
