//! The `Store` port: the agent's durable state and its outgoing report queue.
//!
//! [`SledStore`] is the real one (one sled database per device; every write is flushed
//! before the call returns, so "persist, then act" holds across power cuts). [`MemoryStore`]
//! sits beside it so a simulator can run thousands of agents in one process.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// Durable key-value state plus an ordered outbox.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Read a value.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Write a value; durable when this returns.
    fn put(&self, key: &str, value: &[u8]) -> Result<()>;
    /// Append a message to the outbox; durable when this returns. Returns its sequence.
    fn outbox_push(&self, msg: &[u8]) -> Result<u64>;
    /// The oldest queued messages, in order.
    fn outbox_peek(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>>;
    /// Remove a sent message.
    fn outbox_remove(&self, seq: u64) -> Result<()>;
    /// Number of queued messages.
    fn outbox_len(&self) -> Result<usize>;
}

/// sled-backed store.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    state: sled::Tree,
    outbox: sled::Tree,
}

/// The outbox's sequence counter lives in the outbox tree itself, under the empty key, which
/// sorts before every 8-byte message key. Finding the highest queued key instead would need
/// sled's backward iterator, whose unbounded form links a 1 MiB constant into the binary.
const OUTBOX_NEXT: &[u8] = b"";
/// The lowest message key.
const FIRST_MSG: [u8; 8] = [0; 8];

fn store_err(e: sled::Error) -> Error {
    Error::Store(e.to_string())
}

impl SledStore {
    /// Open (or create) the database in `dir`. A lock another process keeps holding is
    /// reported naming the likely cause: another agent using the same data dir.
    pub fn open(dir: &Path) -> Result<SledStore> {
        // A small cache: the agent's state is a few kilobytes.
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(256 * 1024)
            .flush_every_ms(None);
        let db = ringcast_io::sled::open(&config).map_err(|e| {
            if ringcast_io::sled::is_lock_held(&e) {
                Error::Store(format!(
                    "open {}: the database is locked by another process \
                     (is another ringcast-agent using this data_dir?): {e}",
                    dir.display()
                ))
            } else {
                Error::Store(format!("open {}: {e}", dir.display()))
            }
        })?;
        let state = db.open_tree("state").map_err(store_err)?;
        let outbox = db.open_tree("outbox").map_err(store_err)?;
        Ok(SledStore { db, state, outbox })
    }

    /// Where numbering starts when the outbox holds no counter yet: a new device, or one
    /// upgraded from the layout that kept it in the state tree. Above the old counter and
    /// above every queued message (a forward scan; the outbox is bounded).
    fn first_free_seq(&self) -> Result<u64> {
        let mut next = self
            .state
            .get("outbox_next")
            .map_err(store_err)?
            .map(|v| key_seq(&v))
            .unwrap_or(0);
        for item in self.outbox.range(FIRST_MSG..) {
            let (k, _) = item.map_err(store_err)?;
            next = next.max(key_seq(&k).saturating_add(1));
        }
        Ok(next)
    }

    fn flush(&self) -> Result<()> {
        self.db.flush().map_err(store_err)?;
        Ok(())
    }
}

impl Store for SledStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.state.get(key).map_err(store_err)?.map(|v| v.to_vec()))
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.state.insert(key, value).map_err(store_err)?;
        self.flush()
    }

    fn outbox_push(&self, msg: &[u8]) -> Result<u64> {
        let next = match self.outbox.get(OUTBOX_NEXT).map_err(store_err)? {
            Some(v) => key_seq(&v),
            None => self.first_free_seq()?,
        };
        // The message and the advanced counter land in one atomic batch: after a crash either
        // both are there or neither, so a sequence is never handed out twice.
        let mut batch = sled::Batch::default();
        batch.insert(&next.to_be_bytes(), msg);
        batch.insert(OUTBOX_NEXT, &next.saturating_add(1).to_be_bytes());
        self.outbox.apply_batch(batch).map_err(store_err)?;
        self.flush()?;
        Ok(next)
    }

    fn outbox_peek(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for item in self.outbox.range(FIRST_MSG..).take(max) {
            let (k, v) = item.map_err(store_err)?;
            out.push((key_seq(&k), v.to_vec()));
        }
        Ok(out)
    }

    fn outbox_remove(&self, seq: u64) -> Result<()> {
        self.outbox.remove(seq.to_be_bytes()).map_err(store_err)?;
        // Not flushed: losing a removal in a crash only re-sends a message, which carries its
        // id; an extra flush per message would double the disk writes.
        Ok(())
    }

    fn outbox_len(&self) -> Result<usize> {
        Ok(self.outbox.range(FIRST_MSG..).count())
    }
}

fn key_seq(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if k.len() == 8 {
        b.copy_from_slice(k);
    }
    u64::from_be_bytes(b)
}

/// In-memory store for tests and simulators.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemInner>,
}

#[derive(Debug, Default)]
struct MemInner {
    kv: BTreeMap<String, Vec<u8>>,
    outbox: BTreeMap<u64, Vec<u8>>,
    next: u64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().kv.get(key).cloned())
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.lock().kv.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn outbox_push(&self, msg: &[u8]) -> Result<u64> {
        let mut g = self.lock();
        let seq = g.next;
        g.next += 1;
        g.outbox.insert(seq, msg.to_vec());
        Ok(seq)
    }

    fn outbox_peek(&self, max: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        Ok(self
            .lock()
            .outbox
            .iter()
            .take(max)
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }

    fn outbox_remove(&self, seq: u64) -> Result<()> {
        self.lock().outbox.remove(&seq);
        Ok(())
    }

    fn outbox_len(&self) -> Result<usize> {
        Ok(self.lock().outbox.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(s: &dyn Store) {
        assert_eq!(s.get("k").unwrap(), None);
        s.put("k", b"v").unwrap();
        assert_eq!(s.get("k").unwrap().as_deref(), Some(&b"v"[..]));
        let a = s.outbox_push(b"a").unwrap();
        let b = s.outbox_push(b"b").unwrap();
        assert!(b > a);
        assert_eq!(s.outbox_len().unwrap(), 2);
        let peek = s.outbox_peek(10).unwrap();
        assert_eq!(peek[0].1, b"a");
        s.outbox_remove(a).unwrap();
        s.outbox_remove(b).unwrap();
        let c = s.outbox_push(b"c").unwrap();
        assert!(c > b, "sequences never repeat after the queue drains");
    }

    #[test]
    fn memory_store_behaves() {
        exercise(&MemoryStore::new());
    }

    #[test]
    fn sled_store_behaves_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(d.path()).unwrap();
            exercise(&s);
            s.outbox_push(b"kept").unwrap();
        }
        let s = SledStore::open(d.path()).unwrap();
        assert_eq!(s.get("k").unwrap().as_deref(), Some(&b"v"[..]));
        let peek = s.outbox_peek(10).unwrap();
        assert_eq!(peek.len(), 2);
        assert_eq!(peek[1].1, b"kept");
    }

    #[test]
    fn outbox_from_the_older_layout_continues_above_every_sequence_it_used() {
        let d = tempfile::tempdir().unwrap();
        {
            // The layout before the counter moved into the outbox tree: counter in `state`,
            // possibly behind the queue if a crash lost its update.
            let db = sled::Config::new().path(d.path()).open().unwrap();
            let state = db.open_tree("state").unwrap();
            let outbox = db.open_tree("outbox").unwrap();
            state.insert("outbox_next", &5u64.to_be_bytes()).unwrap();
            outbox.insert(3u64.to_be_bytes(), &b"three"[..]).unwrap();
            outbox.insert(7u64.to_be_bytes(), &b"seven"[..]).unwrap();
            db.flush().unwrap();
        }
        let s = SledStore::open(d.path()).unwrap();
        assert_eq!(s.outbox_len().unwrap(), 2, "the counter is not a message");
        assert_eq!(s.outbox_push(b"next").unwrap(), 8);
        assert_eq!(s.outbox_push(b"after").unwrap(), 9);
        let seqs: Vec<u64> = s.outbox_peek(10).unwrap().iter().map(|m| m.0).collect();
        assert_eq!(seqs, vec![3, 7, 8, 9]);
        for q in seqs {
            s.outbox_remove(q).unwrap();
        }
        assert_eq!(s.outbox_len().unwrap(), 0);
        assert_eq!(
            s.outbox_push(b"fresh").unwrap(),
            10,
            "never reused after draining"
        );
    }

    #[test]
    fn reopen_right_after_drop_waits_for_the_lock_and_a_live_holder_is_named() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..20u8 {
            let s = SledStore::open(d.path()).unwrap();
            s.put("round", &[i]).unwrap();
        }
        let s = SledStore::open(d.path()).unwrap();
        assert_eq!(s.get("round").unwrap().as_deref(), Some(&[19u8][..]));
        let err = SledStore::open(d.path()).unwrap_err().to_string();
        assert!(err.contains("another ringcast-agent"), "{err}");
    }
}
