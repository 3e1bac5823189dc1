//! The controller's sled database: releases, rollouts, ring directives, devices, each
//! device's bounded event history, approvals (inside rollouts), the audit log and a few meta
//! values.
//!
//! Event history lives in its own tree, `device_events`: per device a ring of `limit` slots,
//! keyed by device and slot, the slot of an event being its arrival number modulo `limit`.
//! Recording an event is one insert of one small entry (never a growing per-device blob, no
//! delete): it overwrites the oldest, so the history is bounded by construction. The ids it
//! deduplicates by are exactly the ids in the ring, held in memory as hashes (rebuilt from the
//! ring the first time a device sends after start-up), so deduplication is bounded with it.

use crate::audit::AuditLog;
use crate::error::{Error, Result};
use crate::model::{DevicePin, DeviceRecord, EventEntry, ReleaseRecord, RingDirective, Rollout};
use jiff::Timestamp;
use ringcast_proto::Event;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use tracing::{info, warn};

/// Events kept per device unless the ingestor is told otherwise: enough to hold a few
/// rollouts' worth (a probation sends a handful), so a revert's evidence outlives the events
/// that follow it.
pub const EVENT_HISTORY: usize = 50;

/// Open a sled database at `path`, waiting a moment for a lock a closing `Db` still holds
/// ([`ringcast_io::sled::open`], shared with the agent so both sides behave alike).
pub fn open_sled(
    path: &Path,
    flush_every_ms: Option<u64>,
) -> std::result::Result<sled::Db, sled::Error> {
    ringcast_io::sled::open(
        &sled::Config::new()
            .path(path)
            .flush_every_ms(flush_every_ms),
    )
}

/// A tree of the engine's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateTree {
    /// Releases by id.
    Releases = 0,
    /// Rollouts by id.
    Rollouts = 1,
    /// Standing ring directives by key ([`crate::model::directive_key`]: ring, or ring and
    /// product).
    Rings = 2,
    /// Standing device directives by key (device, or device and product).
    Pins = 3,
    /// Meta values.
    Meta = 4,
}

/// One write of the engine's state (`value: None` deletes the key), for [`Store::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// Which tree.
    pub tree: StateTree,
    /// Key.
    pub key: Vec<u8>,
    /// New value, or `None` to delete.
    pub value: Option<Vec<u8>>,
}

impl Write {
    fn put<T: Serialize>(tree: StateTree, what: &str, key: &str, v: &T) -> Result<Write> {
        Ok(Write {
            tree,
            key: key.as_bytes().to_vec(),
            value: Some(enc(what, v)?),
        })
    }

    /// Store a release.
    pub fn release(r: &ReleaseRecord) -> Result<Write> {
        Write::put(StateTree::Releases, "release", &r.id, r)
    }

    /// Store a rollout.
    pub fn rollout(r: &Rollout) -> Result<Write> {
        Write::put(StateTree::Rollouts, "rollout", &r.id, r)
    }

    /// Store a ring's standing directive (under its [`RingDirective::key`]).
    pub fn ring(r: &RingDirective) -> Result<Write> {
        Write::put(StateTree::Rings, "ring directive", &r.key(), r)
    }

    /// Store a device's standing directive (under its directive's key).
    pub fn pin(p: &DevicePin) -> Result<Write> {
        Write::put(StateTree::Pins, "device pin", &p.directive.key(), p)
    }

    /// Forget the device directive stored under `key`.
    pub fn pin_deleted(key: &str) -> Write {
        Write {
            tree: StateTree::Pins,
            key: key.as_bytes().to_vec(),
            value: None,
        }
    }

    /// Store a meta value.
    pub fn meta<T: Serialize>(key: &str, v: &T) -> Result<Write> {
        Write::put(StateTree::Meta, "meta", key, v)
    }
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
    /// Each device's bounded event history and the ids it deduplicates by (see
    /// [`EventHistory`]).
    device_events: sled::Tree,
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

    /// Wrap an open database (moving a pre-history `events` tree into the bounded history).
    pub fn from_db(db: sled::Db) -> Result<Store> {
        let store = Store {
            releases: db.open_tree("releases")?,
            rollouts: db.open_tree("rollouts")?,
            rings: db.open_tree("rings")?,
            pins: db.open_tree("pins")?,
            devices: db.open_tree("devices")?,
            device_events: db.open_tree("device_events")?,
            meta: db.open_tree("meta")?,
            webhooks: db.open_tree("webhooks")?,
            db,
        };
        store.migrate_legacy_events()?;
        Ok(store)
    }

    /// A writer of the event history keeping the newest `limit` events per device (at least
    /// one). Ingestion holds the only one: the history assumes a single writer.
    pub fn event_history(&self, limit: usize) -> EventHistory {
        EventHistory {
            tree: self.device_events.clone(),
            limit: u32::try_from(limit.max(1)).unwrap_or(u32::MAX),
            rings: HashMap::new(),
        }
    }

    /// The kept events of `device`, oldest first; entries that do not decode are skipped (and
    /// logged), so one bad entry never hides a device's evidence.
    fn kept_events(&self, device: &str) -> Result<Vec<EventEntry>> {
        let mut out = Vec::new();
        for kv in self
            .device_events
            .scan_prefix(device_prefix(HISTORY, device))
        {
            let (k, v) = kv?;
            match dec::<EventEntry>("device event", &k, &v) {
                Ok(e) => out.push(e),
                Err(e) => warn!(device, error = %e, "skipping undecodable device event"),
            }
        }
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }

    /// The newest `limit` kept events of `device`, newest first.
    pub fn device_events(&self, device: &str, limit: usize) -> Result<Vec<EventEntry>> {
        let mut v = self.kept_events(device)?;
        v.reverse();
        v.truncate(limit);
        Ok(v)
    }

    /// The newest kept event of `device` that `matches`.
    pub fn newest_device_event(
        &self,
        device: &str,
        mut matches: impl FnMut(&Event) -> bool,
    ) -> Result<Option<EventEntry>> {
        Ok(self
            .kept_events(device)?
            .into_iter()
            .rev()
            .find(|e| matches(&e.event)))
    }

    /// Before event history, every event stayed for ever in tree `events` (key
    /// `{device}/{id}`, value the payload). Move each device's newest [`EVENT_HISTORY`] (by
    /// the device's `at`, the only order it kept) into the history, then drop the old tree.
    /// Re-running after a crash half-way is harmless: the history skips ids it already has.
    fn migrate_legacy_events(&self) -> Result<()> {
        if !self.db.tree_names().iter().any(|n| n.as_ref() == b"events") {
            return Ok(());
        }
        let legacy = self.db.open_tree("events")?;
        let mut history = self.event_history(EVENT_HISTORY);
        let (mut moved, mut dropped) = (0usize, 0usize);
        let mut device: Option<String> = None;
        let mut pending: Vec<Event> = Vec::new();
        let mut finish = |device: &Option<String>, pending: &mut Vec<Event>| -> Result<usize> {
            let Some(d) = device else { return Ok(0) };
            pending.sort_by(|a, b| (a.at, &a.id).cmp(&(b.at, &b.id)));
            let keep = pending.len().saturating_sub(EVENT_HISTORY);
            let mut n = 0;
            for e in pending.drain(..).skip(keep) {
                let at = e.at;
                if history.append(d, &e, at)? == Appended::New {
                    n += 1;
                }
            }
            Ok(n)
        };
        // Keys sort by device (ids never hold '/'), so one device's events are contiguous.
        for kv in legacy.iter() {
            let (k, v) = kv?;
            let parsed = k
                .iter()
                .position(|b| *b == b'/')
                .and_then(|i| std::str::from_utf8(&k[..i]).ok())
                .zip(Event::parse(&v).ok());
            let Some((d, e)) = parsed else {
                dropped += 1;
                continue;
            };
            if device.as_deref() != Some(d) {
                moved += finish(&device, &mut pending)?;
                device = Some(d.to_owned());
            }
            pending.push(e);
        }
        moved += finish(&device, &mut pending)?;
        self.db.drop_tree("events")?;
        info!(
            moved,
            unreadable = dropped,
            "moved stored events into the bounded per-device history"
        );
        Ok(())
    }

    /// The audit log on this database.
    pub fn audit(&self) -> Result<AuditLog> {
        AuditLog::open(self.db.open_tree("audit")?)
    }

    /// Append `records` to the audit log and apply `writes`, in one atomic sled transaction
    /// (the engine persists a decision this way before it replies or publishes anything).
    /// Durable once [`Store::flush`] returns. Returns the audit head's seq.
    pub fn commit(
        &self,
        audit: &AuditLog,
        at: Timestamp,
        records: &[crate::audit::Record],
        writes: &[Write],
    ) -> Result<u64> {
        let trees = [
            &self.releases,
            &self.rollouts,
            &self.rings,
            &self.pins,
            &self.meta,
        ];
        audit.commit(at, records, &trees, |views| {
            for w in writes {
                let t = &views[w.tree as usize];
                match &w.value {
                    Some(v) => {
                        t.insert(w.key.as_slice(), v.as_slice())?;
                    }
                    None => {
                        t.remove(w.key.as_slice())?;
                    }
                }
            }
            Ok(())
        })
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
            .insert(r.key().as_bytes(), enc("ring directive", r)?)?;
        Ok(())
    }

    /// All ring directives.
    pub fn rings(&self) -> Result<Vec<RingDirective>> {
        Store::all(&self.rings, "ring directive")
    }

    /// Save a device's standing directive (pin or the hold that ended it).
    pub fn put_pin(&self, p: &DevicePin) -> Result<()> {
        self.pins
            .insert(p.directive.key().as_bytes(), enc("device pin", p)?)?;
        Ok(())
    }

    /// Forget the device directive stored under `key` (retired: its ring has moved on).
    pub fn delete_pin(&self, key: &str) -> Result<()> {
        self.pins.remove(key.as_bytes())?;
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

/// Tag of history keys in `device_events` (the first byte, leaving room for other kinds).
const HISTORY: u8 = b'h';

/// `tag`, the device id's length (u16, big-endian), the id: a prefix no other device's keys
/// share, whatever bytes the ids hold.
fn device_prefix(tag: u8, device: &str) -> Vec<u8> {
    let len = u16::try_from(device.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(3 + device.len() + 4);
    k.push(tag);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(device.as_bytes());
    k
}

/// History key: the device prefix, then the slot (u32, big-endian).
fn history_key(device: &str, slot: u32) -> Vec<u8> {
    let mut k = device_prefix(HISTORY, device);
    k.extend_from_slice(&slot.to_be_bytes());
    k
}

fn slot_of(key: &[u8]) -> Option<u32> {
    let b = key.get(key.len().checked_sub(4)?..)?;
    Some(u32::from_be_bytes(<[u8; 4]>::try_from(b).ok()?))
}

/// Never 0, which marks an empty slot. A device that forges two ids with one hash only loses
/// its own second event; nothing crosses devices.
fn id_hash(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed keys: the same on every run, which nothing here needs beyond one process.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish() | 1
}

/// What [`EventHistory::append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Recorded, in place of the device's oldest event once its ring is full.
    New,
    /// The device's history already holds an event with this id: nothing written.
    Duplicate,
}

/// One device's ring, as the writer keeps it in memory.
#[derive(Debug)]
struct Ring {
    /// Arrival number of the next event.
    next: u64,
    /// Per slot, the hash of the id stored there (0: empty).
    ids: Vec<u64>,
}

/// Appends device events to their bounded history. The only writer (ingestion owns it), so
/// the in-memory rings are the truth about what the tree holds.
#[derive(Debug)]
pub struct EventHistory {
    tree: sled::Tree,
    limit: u32,
    rings: HashMap<String, Ring>,
}

/// The fields of a stored entry that rebuilding a ring needs.
#[derive(serde::Deserialize)]
struct Head {
    seq: u64,
    id: String,
}

impl EventHistory {
    /// Record `event` from `device` (the device the topic names), arrived at `received_at`,
    /// unless the device's history holds its id already. One insert: the entry overwrites the
    /// device's oldest once `limit` are kept, and its id is forgotten with it.
    pub fn append(
        &mut self,
        device: &str,
        event: &Event,
        received_at: Timestamp,
    ) -> Result<Appended> {
        let hash = id_hash(&event.id);
        if !self.rings.contains_key(device) {
            let ring = self.load(device)?;
            self.rings.insert(device.to_owned(), ring);
        }
        let Some(ring) = self.rings.get_mut(device) else {
            return Err(Error::corrupt("device event ring", device));
        };
        if ring.ids.contains(&hash) {
            return Ok(Appended::Duplicate);
        }
        let seq = ring.next;
        let slot = slot_for(seq, self.limit);
        let entry = EventEntry {
            seq,
            received_at,
            event: event.clone(),
        };
        self.tree
            .insert(history_key(device, slot), enc("device event", &entry)?)?;
        if let Some(h) = ring.ids.get_mut(slot as usize) {
            *h = hash;
        }
        ring.next = seq + 1;
        Ok(Appended::New)
    }

    /// Rebuild a device's ring from the tree. Entries not in the slot this limit gives them
    /// (the limit changed since they were written) are moved, the newest `limit` kept, in one
    /// atomic batch; undecodable ones are dropped.
    fn load(&self, device: &str) -> Result<Ring> {
        let limit = self.limit as usize;
        let mut good = Vec::new();
        let mut stray = Vec::new();
        for kv in self.tree.scan_prefix(device_prefix(HISTORY, device)) {
            let (k, v) = kv?;
            match serde_json::from_slice::<Head>(&v) {
                Ok(h) => good.push((k, h, v)),
                Err(e) => {
                    warn!(device, error = %e, "dropping an undecodable device event");
                    stray.push(k);
                }
            }
        }
        good.sort_by_key(|(_, h, _)| std::cmp::Reverse(h.seq));
        let misplaced = good.len() > limit
            || good
                .iter()
                .any(|(k, h, _)| slot_of(k) != Some(slot_for(h.seq, self.limit)));
        if misplaced || !stray.is_empty() {
            // Removes first, then the kept entries in their slots: in a batch the last write
            // to a key wins, and the whole batch lands or none of it.
            let mut batch = sled::Batch::default();
            for k in stray.iter().chain(good.iter().map(|(k, _, _)| k)) {
                batch.remove(k);
            }
            for (_, h, v) in good.iter().take(limit) {
                batch.insert(history_key(device, slot_for(h.seq, self.limit)), v.clone());
            }
            self.tree.apply_batch(batch)?;
        }
        let mut ring = Ring {
            next: good.first().map_or(0, |(_, h, _)| h.seq + 1),
            ids: vec![0; limit],
        };
        for (_, h, _) in good.iter().take(limit) {
            if let Some(slot) = ring.ids.get_mut(slot_for(h.seq, self.limit) as usize) {
                *slot = id_hash(&h.id);
            }
        }
        Ok(ring)
    }
}

fn slot_for(seq: u64, limit: u32) -> u32 {
    // The remainder is below `limit`, a u32.
    u32::try_from(seq % u64::from(limit)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records as a version before products wrote them: keyed by ring and by device, with no
    /// `product` field.
    #[test]
    fn directives_persisted_before_products_load_as_the_single_product_records() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            s.rings
                .insert(
                    "canary",
                    br#"{"ring":"canary","rollout_id":"app-2","action":"install",
                        "release_id":"app-2","percent":50,"activation":{},
                        "sequence":1800000000000,"issued_at":"2027-01-15T10:00:00Z",
                        "expires_at":"2027-01-15T11:00:00Z"}"#
                        .as_slice(),
                )
                .unwrap();
            s.pins
                .insert(
                    "canary-0",
                    br#"{"directive":{"ring":"canary","device":"canary-0",
                        "rollout_id":"pin-canary-0-1","action":"install","release_id":"app-2",
                        "percent":100,"activation":{},"sequence":1800000000001,
                        "issued_at":"2027-01-15T10:00:00Z","expires_at":"2027-01-15T11:00:00Z"},
                        "by":"alice","at":"2027-01-15T10:00:00Z","ring_rollout":"app-2",
                        "issued":1}"#
                        .as_slice(),
                )
                .unwrap();
            s.db.flush().unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        let st = crate::engine::load_state(&s).unwrap();
        let ring = &st.rings["canary"];
        assert_eq!(
            (ring.product.as_deref(), ring.rollout_id.as_str()),
            (None, "app-2")
        );
        assert_eq!(ring.key(), "canary");
        let pin = &st.pins["canary-0"];
        assert_eq!(pin.directive.product, None);
        assert_eq!(pin.pinned_release(), Some("app-2"));
        // Written back, a product's record sits beside it under its own key.
        let mut app = ring.clone();
        app.product = Some("app".into());
        s.put_ring(&app).unwrap();
        let st = crate::engine::load_state(&s).unwrap();
        assert_eq!(
            st.rings.keys().collect::<Vec<_>>(),
            ["canary", "canary/app"]
        );
        assert!(st.rings["canary"].product.is_none());
    }

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

    fn ev(device: &str, id: &str, at_secs: i64) -> Event {
        Event {
            id: id.into(),
            device: device.into(),
            at: Timestamp::from_second(1_800_000_000 + at_secs).unwrap(),
            rollout_id: Some("r1".into()),
            release: None,
            kind: ringcast_proto::EventKind::Healthy,
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn ids(es: &[EventEntry]) -> Vec<String> {
        es.iter().map(|e| e.event.id.clone()).collect()
    }

    #[test]
    fn history_keeps_the_newest_n_and_forgets_their_ids_with_them() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let mut h = s.event_history(3);
        for i in 0..5 {
            let e = ev("d1", &format!("e{i}"), i);
            assert_eq!(h.append("d1", &e, now()).unwrap(), Appended::New);
        }
        let kept = s.device_events("d1", 100).unwrap();
        assert_eq!(ids(&kept), ["e4", "e3", "e2"], "newest first, three kept");
        assert_eq!(
            kept.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 3, 2],
            "numbered by arrival"
        );
        // Three entries: nothing else is stored, nothing else grows.
        assert_eq!(s.device_events.len(), 3);
        // A kept id is a duplicate; a pruned one is forgotten together with its entry.
        assert_eq!(
            h.append("d1", &ev("d1", "e4", 9), now()).unwrap(),
            Appended::Duplicate
        );
        assert_eq!(
            h.append("d1", &ev("d1", "e0", 9), now()).unwrap(),
            Appended::New
        );
        assert_eq!(
            ids(&s.device_events("d1", 100).unwrap()),
            ["e0", "e4", "e3"]
        );
        assert_eq!(s.device_events.len(), 3);
        assert_eq!(ids(&s.device_events("d1", 1).unwrap()), ["e0"]);
    }

    #[test]
    fn devices_with_prefix_sharing_ids_keep_separate_histories() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let mut h = s.event_history(2);
        for i in 0..3 {
            h.append("d1", &ev("d1", &format!("a{i}"), i), now())
                .unwrap();
            h.append("d10", &ev("d10", &format!("b{i}"), i), now())
                .unwrap();
        }
        // The same id from another device is not a duplicate.
        assert_eq!(
            h.append("d10", &ev("d10", "a2", 5), now()).unwrap(),
            Appended::New
        );
        assert_eq!(ids(&s.device_events("d1", 9).unwrap()), ["a2", "a1"]);
        assert_eq!(ids(&s.device_events("d10", 9).unwrap()), ["a2", "b2"]);
        assert!(s.device_events("d", 9).unwrap().is_empty());
    }

    #[test]
    fn history_survives_a_reopen_and_keeps_numbering_and_pruning() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            let mut h = s.event_history(3);
            for i in 0..3 {
                h.append("d1", &ev("d1", &format!("e{i}"), i), now())
                    .unwrap();
            }
            s.db.flush().unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        let mut h = s.event_history(3);
        assert_eq!(
            h.append("d1", &ev("d1", "e2", 0), now()).unwrap(),
            Appended::Duplicate,
            "ids seen before the restart are still recognised"
        );
        h.append("d1", &ev("d1", "e3", 3), now()).unwrap();
        let kept = s.device_events("d1", 9).unwrap();
        assert_eq!(ids(&kept), ["e3", "e2", "e1"]);
        assert_eq!(kept[0].seq, 3, "numbering continues after the restart");
        assert_eq!(s.device_events.len(), 3);
    }

    #[test]
    fn a_changed_limit_keeps_the_newest_and_moves_them_into_place() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let mut h = s.event_history(5);
        for i in 0..7 {
            h.append("d1", &ev("d1", &format!("e{i}"), i), now())
                .unwrap();
        }
        // A smaller limit: the newest three stay, in their new slots.
        let mut h = s.event_history(3);
        h.append("d1", &ev("d1", "e7", 7), now()).unwrap();
        assert_eq!(ids(&s.device_events("d1", 9).unwrap()), ["e7", "e6", "e5"]);
        assert_eq!(s.device_events.len(), 3);
        assert_eq!(
            h.append("d1", &ev("d1", "e4", 0), now()).unwrap(),
            Appended::New,
            "an id that did not survive the cut is forgotten"
        );
        // A larger one again: nothing is lost, numbering goes on.
        let mut h = s.event_history(10);
        h.append("d1", &ev("d1", "e9", 9), now()).unwrap();
        let kept = s.device_events("d1", 20).unwrap();
        assert_eq!(ids(&kept), ["e9", "e4", "e7", "e6"]);
        assert_eq!(kept[0].seq, 9);
        assert_eq!(
            h.append("d1", &ev("d1", "e6", 0), now()).unwrap(),
            Appended::Duplicate
        );
    }

    #[test]
    fn an_undecodable_entry_is_skipped_not_fatal() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let mut h = s.event_history(4);
        for i in 0..2 {
            h.append("d1", &ev("d1", &format!("e{i}"), i), now())
                .unwrap();
        }
        s.device_events
            .insert(history_key("d1", 3), &b"{not json"[..])
            .unwrap();
        assert_eq!(ids(&s.device_events("d1", 9).unwrap()), ["e1", "e0"]);
        // A fresh writer (a restart) drops it and carries on.
        let mut h = s.event_history(4);
        h.append("d1", &ev("d1", "e2", 2), now()).unwrap();
        assert_eq!(ids(&s.device_events("d1", 9).unwrap()), ["e2", "e1", "e0"]);
        assert_eq!(s.device_events.len(), 3);
    }

    #[test]
    fn an_entry_shows_the_event_fields_at_top_level() {
        let e = EventEntry {
            seq: 7,
            received_at: now(),
            event: Event {
                kind: ringcast_proto::EventKind::Reverted {
                    reason: "health_check_failed".into(),
                    check: Some("self-test".into()),
                    output: Some("exit 1\nboom".into()),
                },
                ..ev("d1", "d1-0-9", 0)
            },
        };
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["event"], "reverted");
        assert_eq!(v["check"], "self-test");
        assert_eq!(v["output"], "exit 1\nboom");
        assert_eq!(serde_json::from_value::<EventEntry>(v).unwrap(), e);
    }

    #[test]
    fn events_stored_before_history_move_into_it_and_the_old_tree_goes() {
        let d = tempfile::tempdir().unwrap();
        {
            let db = open_sled(&d.path().join("ringcast.sled"), None).unwrap();
            let old = db.open_tree("events").unwrap();
            // 60 events arriving out of order: the newest 50 by `at` are kept.
            for i in (0..60).rev() {
                let e = ev("d1", &format!("d1-{i:02}"), i);
                old.insert(format!("d1/{}", e.id), e.to_bytes()).unwrap();
            }
            let e = ev("d2", "d2-0", 0);
            old.insert("d2/d2-0", e.to_bytes()).unwrap();
            old.insert("d3/x", &b"not json"[..]).unwrap();
            db.flush().unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        assert!(!s.db.tree_names().iter().any(|n| n.as_ref() == b"events"));
        let d1 = s.device_events("d1", 100).unwrap();
        assert_eq!(d1.len(), EVENT_HISTORY);
        assert_eq!(d1[0].event.id, "d1-59");
        assert_eq!(d1[EVENT_HISTORY - 1].event.id, "d1-10");
        assert_eq!(ids(&s.device_events("d2", 100).unwrap()), ["d2-0"]);
        let mut h = s.event_history(EVENT_HISTORY);
        assert_eq!(
            h.append("d1", &ev("d1", "d1-59", 0), now()).unwrap(),
            Appended::Duplicate
        );
        drop((h, s));
        // Once moved, a reopen has nothing left to move.
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.device_events("d1", 100).unwrap().len(), EVENT_HISTORY);
    }
}
