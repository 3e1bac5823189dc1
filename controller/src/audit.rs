//! The hash-chained audit log (DESIGN.md "Controller": every operator action and every
//! automatic decision). Stored in sled: key `e` + seq (big-endian) → `hash_hex(64) || body`,
//! where `hash = sha256(body)` and `body.prev` is the previous entry's hash; key `h` holds the
//! head (`seq`, `hash`) so a truncated tail is detected too. Any edited, removed or reordered
//! entry breaks a check, and [`verify`] names the first entry that fails.

use crate::error::{Error, Result};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// Hash that precedes the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HEAD_KEY: &[u8] = b"h";

/// One audit entry (the hashed body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// 1, 2, 3 …
    pub seq: u64,
    /// Controller time.
    pub at: Timestamp,
    /// Who: a token name, or `controller` for automatic decisions, or `anonymous`.
    pub actor: String,
    /// The actor's role, if a token was presented.
    #[serde(default)]
    pub role: Option<String>,
    /// What: `approve`, `promote`, `halt`, `release_submit`, …
    pub action: String,
    /// `ok` or `denied` (with the reason code).
    pub outcome: String,
    /// Rollout concerned.
    #[serde(default)]
    pub rollout_id: Option<String>,
    /// Ring concerned.
    #[serde(default)]
    pub ring: Option<String>,
    /// Free detail.
    pub detail: String,
    /// Hash of the previous entry.
    pub prev: String,
}

/// What to append; `seq`, `at` and `prev` are filled in.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Actor.
    pub actor: String,
    /// Role.
    pub role: Option<String>,
    /// Action.
    pub action: String,
    /// Outcome.
    pub outcome: String,
    /// Rollout.
    pub rollout_id: Option<String>,
    /// Ring.
    pub ring: Option<String>,
    /// Detail.
    pub detail: String,
}

impl Record {
    /// An automatic decision by the controller.
    pub fn auto(
        action: &str,
        rollout: &str,
        ring: Option<&str>,
        detail: impl Into<String>,
    ) -> Record {
        Record {
            actor: "controller".into(),
            role: None,
            action: action.into(),
            outcome: "ok".into(),
            rollout_id: Some(rollout.into()),
            ring: ring.map(str::to_owned),
            detail: detail.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

/// The append side, shared by the engine and the API.
#[derive(Debug)]
pub struct AuditLog {
    tree: sled::Tree,
    head: Mutex<(u64, String)>,
    // The seq of the last appended entry, so readers that tail the log (webhooks) wake on
    // every append without polling.
    appended: tokio::sync::watch::Sender<u64>,
}

/// The seq an entry key names (`e` + big-endian seq); 0 for a key of another shape.
fn key_seq(k: &[u8]) -> u64 {
    match k {
        [b'e', rest @ ..] => <[u8; 8]>::try_from(rest).map_or(0, u64::from_be_bytes),
        _ => 0,
    }
}

fn entry_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'e';
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

impl AuditLog {
    /// Open on a sled tree, reading the head.
    pub fn open(tree: sled::Tree) -> Result<AuditLog> {
        let head = match tree.get(HEAD_KEY)? {
            Some(v) => {
                let h: Head =
                    serde_json::from_slice(&v).map_err(|e| Error::corrupt("audit head", e))?;
                (h.seq, h.hash)
            }
            None => (0, GENESIS.to_owned()),
        };
        Ok(AuditLog {
            tree,
            appended: tokio::sync::watch::Sender::new(head.0),
            head: Mutex::new(head),
        })
    }

    /// The seq of the last entry (0 for an empty log).
    pub fn head_seq(&self) -> u64 {
        *self.appended.borrow()
    }

    /// A receiver that sees the seq of the last entry change on every append.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Up to `limit` stored entries with seq above `after`, in order.
    pub fn entries_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let start = entry_key(after.saturating_add(1));
        let end = entry_key(u64::MAX);
        let mut out = Vec::new();
        for kv in self.tree.range(start..=end).take(limit) {
            let (k, v) = kv?;
            let seq = key_seq(&k);
            let body = v.get(64..).unwrap_or_default();
            let e: AuditEntry = serde_json::from_slice(body)
                .map_err(|e| Error::corrupt(format!("audit entry {seq}"), e))?;
            out.push(e);
        }
        Ok(out)
    }

    /// Append one entry atomically with the new head; returns its seq.
    pub fn append(&self, at: Timestamp, r: Record) -> Result<u64> {
        self.commit(at, std::slice::from_ref(&r), &[], |_| Ok(()))
    }

    /// Append `records`, in order, and apply `write` to `trees` (of the same database), all
    /// in ONE sled transaction: either every entry, the new head and every write are stored,
    /// or none is. Returns the new head's seq. The caller flushes to make it durable.
    pub fn commit<F>(
        &self,
        at: Timestamp,
        records: &[Record],
        trees: &[&sled::Tree],
        write: F,
    ) -> Result<u64>
    where
        F: Fn(
            &[sled::transaction::TransactionalTree],
        ) -> sled::transaction::ConflictableTransactionResult<(), Error>,
    {
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        let (mut seq, mut prev) = (head.0, head.1.clone());
        let mut entries = Vec::with_capacity(records.len());
        for r in records {
            seq += 1;
            let entry = AuditEntry {
                seq,
                at,
                actor: r.actor.clone(),
                role: r.role.clone(),
                action: r.action.clone(),
                outcome: r.outcome.clone(),
                rollout_id: r.rollout_id.clone(),
                ring: r.ring.clone(),
                detail: r.detail.clone(),
                prev: prev.clone(),
            };
            let body = serde_json::to_vec(&entry).map_err(|e| Error::corrupt("audit entry", e))?;
            let hash = ringcast_proto::digest::sha256_hex(&body);
            let mut value = hash.clone().into_bytes();
            value.extend_from_slice(&body);
            entries.push((entry, value));
            prev = hash;
        }
        let head_bytes = serde_json::to_vec(&Head {
            seq,
            hash: prev.clone(),
        })
        .map_err(|e| Error::corrupt("audit head", e))?;
        let mut all: Vec<&sled::Tree> = Vec::with_capacity(trees.len() + 1);
        all.push(&self.tree);
        all.extend_from_slice(trees);
        use sled::transaction::Transactional;
        all.as_slice()
            .transaction(|views| {
                if !entries.is_empty() {
                    for (e, value) in &entries {
                        views[0].insert(&entry_key(e.seq)[..], value.as_slice())?;
                    }
                    views[0].insert(HEAD_KEY, head_bytes.as_slice())?;
                }
                write(&views[1..])
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Abort(e) => e,
                sled::transaction::TransactionError::Storage(e) => Error::Db(e),
            })?;
        for (e, _) in &entries {
            tracing::info!(seq = e.seq, action = %e.action, actor = %e.actor, outcome = %e.outcome, rollout_id = e.rollout_id.as_deref().unwrap_or(""), "audit");
        }
        *head = (seq, prev);
        // Sent while the head lock is held, so subscribers see seqs in order.
        if !entries.is_empty() {
            self.appended.send_replace(seq);
        }
        Ok(seq)
    }

    /// The raw stored log (for the API and `audit verify`). Appends wait while it is read:
    /// entries and head are read separately, and an append in between would look like a
    /// log whose head lags its entries, i.e. a broken one.
    pub fn export(&self) -> Result<RawLog> {
        let _head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        export(&self.tree)
    }
}

/// The stored log as bytes, in key order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RawLog {
    /// `(key, value)` of every entry, values as stored (UTF-8 text).
    pub entries: Vec<RawEntry>,
    /// The head record as stored.
    pub head: Option<String>,
}

/// One stored entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawEntry {
    /// Sequence from the key.
    pub key_seq: u64,
    /// Stored value (hash hex + body JSON).
    pub value: String,
}

/// Read the raw log from a tree.
pub fn export(tree: &sled::Tree) -> Result<RawLog> {
    let mut out = RawLog::default();
    for kv in tree.scan_prefix(b"e") {
        let (k, v) = kv?;
        let seq = key_seq(&k);
        out.entries.push(RawEntry {
            key_seq: seq,
            value: String::from_utf8_lossy(&v).into_owned(),
        });
    }
    out.head = tree
        .get(HEAD_KEY)?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    Ok(out)
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("audit_broken: entry {seq}: {why}")]
pub struct Break {
    /// First bad entry (for a bad head: the head's claimed seq, or the last + 1).
    pub seq: u64,
    /// What is wrong.
    pub why: String,
}

/// Verify a raw log; returns the parsed entries or the first break.
pub fn verify(log: &RawLog) -> std::result::Result<Vec<AuditEntry>, Break> {
    let mut prev = GENESIS.to_owned();
    let mut out: Vec<AuditEntry> = Vec::with_capacity(log.entries.len());
    for (i, raw) in log.entries.iter().enumerate() {
        let expect = i as u64 + 1;
        let brk = |why: String| Break { seq: expect, why };
        if raw.key_seq != expect {
            return Err(brk(format!(
                "stored under seq {} (entry missing or moved)",
                raw.key_seq
            )));
        }
        let v = raw.value.as_bytes();
        if v.len() < 64
            || !v[..64]
                .iter()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(brk("hash field damaged".into()));
        }
        let (hash, body) = v.split_at(64);
        let actual = ringcast_proto::digest::sha256_hex(body);
        if actual.as_bytes() != hash {
            return Err(brk("content does not match its hash (entry edited)".into()));
        }
        let e: AuditEntry =
            serde_json::from_slice(body).map_err(|e| brk(format!("unreadable: {e}")))?;
        if e.seq != expect {
            return Err(brk(format!("claims seq {} (entries reordered)", e.seq)));
        }
        if e.prev != prev {
            return Err(brk(
                "does not chain to the previous entry (entry removed or reordered)".into(),
            ));
        }
        prev = actual;
        out.push(e);
    }
    let n = out.len() as u64;
    match &log.head {
        None if n == 0 => Ok(out),
        None => Err(Break {
            seq: n + 1,
            why: "head record missing".into(),
        }),
        Some(h) => {
            let h: Head = serde_json::from_str(h).map_err(|e| Break {
                seq: n + 1,
                why: format!("head record unreadable: {e}"),
            })?;
            if h.seq != n || h.hash != prev {
                return Err(Break {
                    seq: h.seq.min(n + 1).max(1),
                    why: format!("head names entry {} but the log ends at {n} (entries removed at the end, or head edited)", h.seq),
                });
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_while_appending_always_verifies() {
        let (_d, _db, a) = log_with(50);
        let a = std::sync::Arc::new(a);
        let writer = {
            let a = a.clone();
            std::thread::spawn(move || {
                for i in 0..500 {
                    a.append(
                        ringcast_proto::testkit::now(),
                        Record::auto("promote", "r1", Some("canary"), format!("more {i}")),
                    )
                    .unwrap();
                }
            })
        };
        let mut exports = 0;
        while !writer.is_finished() || exports == 0 {
            let log = a.export().unwrap();
            if let Err(b) = verify(&log) {
                panic!("a consistent log failed to verify mid-append: {b}");
            }
            exports += 1;
        }
        writer.join().unwrap();
        assert_eq!(verify(&a.export().unwrap()).unwrap().len(), 550);
    }

    fn log_with(n: usize) -> (tempfile::TempDir, sled::Db, AuditLog) {
        let d = tempfile::tempdir().unwrap();
        let db = sled::open(d.path().join("db")).unwrap();
        let a = AuditLog::open(db.open_tree("audit").unwrap()).unwrap();
        for i in 0..n {
            a.append(
                ringcast_proto::testkit::now(),
                Record::auto("promote", "r1", Some("canary"), format!("step {i}")),
            )
            .unwrap();
        }
        (d, db, a)
    }

    #[test]
    fn intact_log_verifies_and_survives_reopen() {
        let (_d, db, a) = log_with(5);
        assert_eq!(verify(&a.export().unwrap()).unwrap().len(), 5);
        let a2 = AuditLog::open(db.open_tree("audit").unwrap()).unwrap();
        a2.append(
            ringcast_proto::testkit::now(),
            Record::auto("halt", "r1", None, "x"),
        )
        .unwrap();
        assert_eq!(verify(&a2.export().unwrap()).unwrap().len(), 6);
    }

    #[test]
    fn entries_after_reads_in_order_and_subscribers_see_appends() {
        let (_d, _db, a) = log_with(5);
        let mut rx = a.subscribe();
        assert_eq!(a.head_seq(), 5);
        let seqs: Vec<u64> = a
            .entries_after(2, 2)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [3, 4]);
        assert!(a.entries_after(5, 10).unwrap().is_empty());
        assert!(!rx.has_changed().unwrap());
        a.append(
            ringcast_proto::testkit::now(),
            Record::auto("halt", "r1", None, "x"),
        )
        .unwrap();
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 6);
        assert_eq!(a.entries_after(5, 10).unwrap()[0].action, "halt");
    }

    #[test]
    fn every_single_byte_flip_is_detected_and_named() {
        let (_d, _db, a) = log_with(4);
        let good = a.export().unwrap();
        for (i, e) in good.entries.iter().enumerate() {
            for pos in 0..e.value.len() {
                let mut bad = good.clone();
                let mut bytes = e.value.clone().into_bytes();
                bytes[pos] ^= 0x01;
                bad.entries[i].value = String::from_utf8_lossy(&bytes).into_owned();
                let err = verify(&bad).expect_err("flip undetected");
                assert_eq!(
                    err.seq,
                    i as u64 + 1,
                    "flip at byte {pos} of entry {}",
                    i + 1
                );
            }
        }
    }

    #[test]
    fn removed_reordered_and_truncated_entries_are_detected() {
        let (_d, _db, a) = log_with(4);
        let good = a.export().unwrap();
        let mut removed = good.clone();
        removed.entries.remove(1);
        assert_eq!(verify(&removed).unwrap_err().seq, 2);
        let mut swapped = good.clone();
        let v1 = swapped.entries[1].value.clone();
        swapped.entries[1].value = swapped.entries[2].value.clone();
        swapped.entries[2].value = v1;
        assert_eq!(verify(&swapped).unwrap_err().seq, 2);
        let mut truncated = good.clone();
        truncated.entries.pop();
        assert!(verify(&truncated).is_err());
    }
}
