//! The controller's sled database: releases, rollouts, ring directives, devices, events,
//! approvals (inside rollouts), the audit log and a few meta values.

use crate::audit::AuditLog;
use crate::error::{Error, Result};
use crate::model::{DevicePin, DeviceRecord, ReleaseRecord, RingDirective, Rollout};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

/// Open a sled database at `path`, waiting a moment for a lock a closing `Db` still holds
/// (the agent's [`ringcast_agent::store::open_sled`], shared so both sides behave alike).
pub fn open_sled(
    path: &Path,
    flush_every_ms: Option<u64>,
) -> std::result::Result<sled::Db, sled::Error> {
    ringcast_agent::store::open_sled(
        &sled::Config::new()
            .path(path)
            .flush_every_ms(flush_every_ms),
    )
}

/// Typed access to the trees.
#[derive(Debug, Clone)]
pub struct Store {
    /// The database.
    pub db: sled::Db,
    releases: sled::Tree,
    rollouts: sled::Tree,
    rings: sled::Tree,
    pins: sled::Tree,
    /// Device records, written in batches by ingestion.
    pub devices: sled::Tree,
    /// Events by id (dedupe and evidence).
    pub events: sled::Tree,
    meta: sled::Tree,
    webhooks: sled::Tree,
}

fn enc<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::corrupt(what, e))
}

fn dec<T: DeserializeOwned>(what: &str, key: &[u8], v: &[u8]) -> Result<T> {
    serde_json::from_slice(v)
        .map_err(|e| Error::corrupt(format!("{what} {}", String::from_utf8_lossy(key)), e))
}

impl Store {
    /// Open (or create) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // Reports are re-read from retained messages after a crash (DESIGN.md), so the
        // periodic flush is enough for them; rollout changes are flushed explicitly.
        let db = open_sled(&dir.join("ringcast.sled"), Some(500))?;
        Store::from_db(db)
    }

    /// Wrap an open database.
    pub fn from_db(db: sled::Db) -> Result<Store> {
        Ok(Store {
            releases: db.open_tree("releases")?,
            rollouts: db.open_tree("rollouts")?,
            rings: db.open_tree("rings")?,
            pins: db.open_tree("pins")?,
            devices: db.open_tree("devices")?,
            events: db.open_tree("events")?,
            meta: db.open_tree("meta")?,
            webhooks: db.open_tree("webhooks")?,
            db,
        })
    }

    /// The audit log on this database.
    pub fn audit(&self) -> Result<AuditLog> {
        AuditLog::open(self.db.open_tree("audit")?)
    }

    /// Make everything written so far durable.
    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }

    fn all<T: DeserializeOwned>(tree: &sled::Tree, what: &str) -> Result<Vec<T>> {
        tree.iter()
            .map(|kv| {
                let (k, v) = kv?;
                dec(what, &k, &v)
            })
            .collect()
    }

    /// Save a release.
    pub fn put_release(&self, r: &ReleaseRecord) -> Result<()> {
        self.releases.insert(r.id.as_bytes(), enc("release", r)?)?;
        Ok(())
    }

    /// All releases.
    pub fn releases(&self) -> Result<Vec<ReleaseRecord>> {
        Store::all(&self.releases, "release")
    }

    /// Save a rollout.
    pub fn put_rollout(&self, r: &Rollout) -> Result<()> {
        self.rollouts.insert(r.id.as_bytes(), enc("rollout", r)?)?;
        Ok(())
    }

    /// All rollouts.
    pub fn rollouts(&self) -> Result<Vec<Rollout>> {
        Store::all(&self.rollouts, "rollout")
    }

    /// Save a ring directive.
    pub fn put_ring(&self, r: &RingDirective) -> Result<()> {
        self.rings
            .insert(r.ring.as_bytes(), enc("ring directive", r)?)?;
        Ok(())
    }

    /// All ring directives.
    pub fn rings(&self) -> Result<Vec<RingDirective>> {
        Store::all(&self.rings, "ring directive")
    }

    /// Save a device's standing directive (pin or the hold that ended it).
    pub fn put_pin(&self, p: &DevicePin) -> Result<()> {
        let key = p.directive.device.as_deref().unwrap_or_default();
        self.pins.insert(key.as_bytes(), enc("device pin", p)?)?;
        Ok(())
    }

    /// Forget a device's standing directive (retired: its ring has moved on).
    pub fn delete_pin(&self, device: &str) -> Result<()> {
        self.pins.remove(device.as_bytes())?;
        Ok(())
    }

    /// All device pins (standing and ended).
    pub fn pins(&self) -> Result<Vec<DevicePin>> {
        Store::all(&self.pins, "device pin")
    }

    /// All device records.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        Store::all(&self.devices, "device")
    }

    /// Encode a device record for a batch.
    pub fn device_bytes(d: &DeviceRecord) -> Result<Vec<u8>> {
        enc("device", d)
    }

    /// Read a meta value.
    pub fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.meta
            .get(key)?
            .map(|v| dec("meta", key.as_bytes(), &v))
            .transpose()
    }

    /// Write a meta value.
    pub fn set_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<()> {
        self.meta.insert(key, enc("meta", v)?)?;
        Ok(())
    }

    /// The last audit seq delivered to webhook `name` (None: never started).
    pub fn webhook_cursor(&self, name: &str) -> Result<Option<u64>> {
        self.webhooks
            .get(name)?
            .map(|v| dec("webhook cursor", name.as_bytes(), &v))
            .transpose()
    }

    /// Record that webhook `name` has delivered everything up to audit seq `seq`.
    pub fn set_webhook_cursor(&self, name: &str, seq: u64) -> Result<()> {
        self.webhooks.insert(name, enc("webhook cursor", &seq)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_right_after_drop_waits_for_the_flusher_to_let_go() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..10u8 {
            let s = Store::open(d.path()).unwrap();
            s.meta.insert("round", &[i]).unwrap();
            s.db.flush().unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.meta.get("round").unwrap().as_deref(), Some(&[9u8][..]));
    }
}
