//! HMAC-signed webhooks (DESIGN.md "Controller": webhooks post every rollout event).
//!
//! The source of events is the hash-chained audit log: every operator action and automatic
//! decision is persisted there before anything else happens, so a dispatcher that tails it
//! cannot lose an event across a crash. Each webhook has its own task and its own delivery
//! cursor (the last audit seq it has dealt with) in the store's `webhooks` tree. Entries go
//! out in order, at least once: the cursor moves only after a 2xx, and a failed entry is
//! retried with capped, jittered exponential backoff, never skipped. A webhook that is new to
//! the database starts at the current end of the log (it does not replay history).
//!
//! Request: `POST url` with the JSON body of [`body`] and the headers `X-Ringcast-Event`,
//! `X-Ringcast-Delivery` (stable across retries), `X-Ringcast-Timestamp` (unix seconds) and
//! `X-Ringcast-Signature` = [`sign`]`(secret, timestamp, body)`.

use crate::audit::AuditEntry;
use crate::config::WebhookConfig;
use crate::error::{Error, Result};
use crate::shared::Shared;
use crate::store::Store;
use hmac::{Hmac, Mac};
use serde::Serialize;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// How many audit entries a dispatcher reads from the store at a time.
const BATCH: usize = 64;

/// `sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`: the `X-Ringcast-Signature` value.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC is defined for keys of any length (long keys are hashed first), so this cannot fail.
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret) else {
        unreachable!("HMAC accepts keys of any length")
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The delivery id of audit entry `seq`: `{fleet}-{seq}`, the same on every retry.
pub fn delivery_id(fleet: &str, seq: u64) -> String {
    format!("{fleet}-{seq}")
}

#[derive(Serialize)]
struct Body<'a> {
    id: String,
    fleet: &'a str,
    seq: u64,
    at: jiff::Timestamp,
    action: &'a str,
    outcome: &'a str,
    actor: &'a str,
    rollout_id: Option<&'a str>,
    ring: Option<&'a str>,
    detail: &'a str,
}

/// The JSON body posted for one audit entry.
pub fn body(fleet: &str, e: &AuditEntry) -> Result<Vec<u8>> {
    serde_json::to_vec(&Body {
        id: delivery_id(fleet, e.seq),
        fleet,
        seq: e.seq,
        at: e.at,
        action: &e.action,
        outcome: &e.outcome,
        actor: &e.actor,
        rollout_id: e.rollout_id.as_deref(),
        ring: e.ring.as_deref(),
        detail: &e.detail,
    })
    .map_err(|err| Error::corrupt(format!("webhook body for audit entry {}", e.seq), err))
}

/// The delay after `prev`: doubled, at most `max`.
pub fn next_delay(prev: Duration, max: Duration) -> Duration {
    prev.saturating_mul(2).min(max)
}

/// `d` scaled into `[d/2, d]` by `r` (0..=u32::MAX), so that many controllers (or webhooks)
/// failing together do not retry in lockstep.
pub fn jitter(d: Duration, r: u32) -> Duration {
    let frac = 0.5 + 0.5 * (f64::from(r) / f64::from(u32::MAX));
    d.mul_f64(frac)
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // Without randomness the delay is merely not jittered, which is harmless.
    match getrandom::getrandom(&mut b) {
        Ok(()) => u32::from_le_bytes(b),
        Err(_) => u32::MAX,
    }
}

/// A webhook's progress, shared with `/metrics`.
#[derive(Debug)]
pub struct WebhookStatus {
    /// The webhook's name.
    pub name: String,
    cursor: AtomicU64,
    failures: AtomicU64,
}

impl WebhookStatus {
    /// The last audit seq delivered (or skipped by the events filter).
    pub fn cursor(&self) -> u64 {
        self.cursor.load(Ordering::Relaxed)
    }

    /// Failed delivery attempts since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

/// Append the webhook gauges and counters to a Prometheus text page; `head` is the last
/// audit seq.
pub fn render_metrics(out: &mut String, head: u64, hooks: &[Arc<WebhookStatus>]) {
    if hooks.is_empty() {
        return;
    }
    // Names are restricted to [a-z0-9_-] by the config, so labels need no escaping.
    let _ = writeln!(out, "# HELP ringcast_webhook_pending Audit entries the webhook has not dealt with yet.\n# TYPE ringcast_webhook_pending gauge");
    for h in hooks {
        let _ = writeln!(
            out,
            "ringcast_webhook_pending{{webhook=\"{}\"}} {}",
            h.name,
            head.saturating_sub(h.cursor())
        );
    }
    let _ = writeln!(out, "# HELP ringcast_webhook_failures_total Failed delivery attempts.\n# TYPE ringcast_webhook_failures_total counter");
    for h in hooks {
        let _ = writeln!(
            out,
            "ringcast_webhook_failures_total{{webhook=\"{}\"}} {}",
            h.name,
            h.failures()
        );
    }
}

/// One configured webhook, ready to run.
#[derive(Debug)]
pub struct Webhook {
    config: WebhookConfig,
    secret: Vec<u8>,
    client: reqwest::Client,
    status: Arc<WebhookStatus>,
}

/// Read every webhook's secret (errors name `webhooks[i].secret_file`) and build the client.
pub fn load(configs: &[WebhookConfig]) -> Result<Vec<Webhook>> {
    if configs.is_empty() {
        return Ok(Vec::new());
    }
    // Redirects are not followed: a redirected POST turns into a GET and would count as
    // delivered without reaching the receiver.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("ringcast-webhook/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::Http(format!("webhook client: {e}")))?;
    configs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Ok(Webhook {
                secret: c.load_secret(&format!("webhooks[{i}]"))?,
                config: c.clone(),
                client: client.clone(),
                status: Arc::new(WebhookStatus {
                    name: c.name.clone(),
                    cursor: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                }),
            })
        })
        .collect()
}

/// Load each webhook's cursor; a webhook new to this database starts at `head` (the cursor
/// is persisted and flushed before the engine runs, so nothing after `head` can be missed).
pub async fn init_cursors(hooks: &[Webhook], store: &Store, head: u64) -> Result<()> {
    let mut created = false;
    for h in hooks {
        let cursor = match store.webhook_cursor(&h.config.name)? {
            Some(c) if c <= head => c,
            Some(c) => {
                // The log is shorter than what was delivered: a different database. Start
                // at its end rather than waiting for seqs that were already sent.
                warn!(webhook = %h.config.name, cursor = c, head, "webhook cursor beyond the audit log; restarting at its end");
                store.set_webhook_cursor(&h.config.name, head)?;
                created = true;
                head
            }
            None => {
                store.set_webhook_cursor(&h.config.name, head)?;
                created = true;
                head
            }
        };
        h.status.cursor.store(cursor, Ordering::Relaxed);
    }
    if created {
        store.flush().await?;
    }
    Ok(())
}

/// Wait until the shutdown flag is set (or its sender is gone).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

impl Webhook {
    /// Its progress (for `/metrics`).
    pub fn status(&self) -> Arc<WebhookStatus> {
        self.status.clone()
    }

    fn wants(&self, e: &AuditEntry) -> bool {
        self.config
            .events
            .as_ref()
            .is_none_or(|ev| ev.contains(&e.action))
    }

    fn advance(&self, shared: &Shared, seq: u64) {
        self.status.cursor.store(seq, Ordering::Relaxed);
        // A cursor that fails to persist only means the entry is delivered again after a
        // restart, which at-least-once delivery allows.
        if let Err(e) = shared.store.set_webhook_cursor(&self.config.name, seq) {
            warn!(webhook = %self.config.name, seq, error = %e, "webhook cursor not saved");
        }
    }

    /// Deliver audit entries until `shutdown` flips.
    pub async fn run(self, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
        let name = self.config.name.clone();
        let mut appended = shared.audit.subscribe();
        let mut read_delay = self.config.retry_min.get();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let head = *appended.borrow_and_update();
            let cursor = self.status.cursor();
            let batch = if cursor < head {
                match shared.audit.entries_after(cursor, BATCH) {
                    Ok(b) => b,
                    Err(e) => {
                        // Never skip an entry: keep trying the same read, slowly.
                        warn!(webhook = %name, after = cursor, error = %e, "webhook cannot read the audit log");
                        tokio::select! {
                            _ = tokio::time::sleep(jitter(read_delay, random_u32())) => {}
                            _ = stopping(&mut shutdown) => return,
                        }
                        read_delay = next_delay(read_delay, self.config.retry_max.get());
                        continue;
                    }
                }
            } else {
                Vec::new()
            };
            read_delay = self.config.retry_min.get();
            if batch.is_empty() {
                tokio::select! {
                    r = appended.changed() => if r.is_err() { return },
                    _ = stopping(&mut shutdown) => return,
                }
                continue;
            }
            for entry in batch {
                if self.wants(&entry) && !self.deliver(&shared, &entry, &mut shutdown).await {
                    return;
                }
                self.advance(&shared, entry.seq);
            }
        }
    }

    /// POST one entry until a 2xx; false if shutdown came first.
    async fn deliver(
        &self,
        shared: &Shared,
        entry: &AuditEntry,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let name = &self.config.name;
        let fleet = &shared.policy.fleet;
        let id = delivery_id(fleet, entry.seq);
        let body = match body(fleet, entry) {
            Ok(b) => b,
            Err(e) => {
                // Serialising plain strings cannot fail; if it ever does, the entry must not
                // be skipped silently, so wait here for shutdown, loudly.
                tracing::error!(webhook = %name, delivery = %id, error = %e, "webhook body cannot be built; delivery stopped");
                stopping(shutdown).await;
                return false;
            }
        };
        let mut delay = self.config.retry_min.get();
        let mut attempt: u64 = 0;
        loop {
            attempt += 1;
            // Signed afresh on every attempt so receivers can refuse stale timestamps.
            let ts = shared.clock.now().as_second();
            let req = self
                .client
                .post(&self.config.url)
                .timeout(self.config.timeout.get())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("X-Ringcast-Event", &entry.action)
                .header("X-Ringcast-Delivery", &id)
                .header("X-Ringcast-Timestamp", ts.to_string())
                .header("X-Ringcast-Signature", sign(&self.secret, ts, &body))
                .body(body.clone())
                .send();
            let res = tokio::select! {
                r = req => r,
                _ = stopping(shutdown) => return false,
            };
            let why = match res {
                Ok(resp) if resp.status().is_success() => {
                    if attempt > 1 {
                        info!(webhook = %name, delivery = %id, attempt, "webhook delivered after retries");
                    }
                    return true;
                }
                Ok(resp) => {
                    let s = resp.status();
                    if s.is_client_error()
                        && s != reqwest::StatusCode::REQUEST_TIMEOUT
                        && s != reqwest::StatusCode::TOO_MANY_REQUESTS
                    {
                        // Retried all the same: dropping it would lose an event for good.
                        format!("receiver refused with {s} (retried anyway; fix the receiver)")
                    } else {
                        format!("receiver answered {s}")
                    }
                }
                Err(e) => format!("{e}"),
            };
            self.status.failures.fetch_add(1, Ordering::Relaxed);
            let wait = jitter(delay, random_u32());
            warn!(webhook = %name, delivery = %id, attempt, retry_in_ms = wait.as_millis() as u64, error = %why, "webhook delivery failed");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stopping(shutdown) => return false,
            }
            delay = next_delay(delay, self.config.retry_max.get());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_an_independent_hmac() {
        // python3 -c 'import hmac,hashlib;print(hmac.new(b"0123456789abcdef-secret",
        //   b"1700000000."+b"{\"id\":\"plant-7-1\"}",hashlib.sha256).hexdigest())'
        assert_eq!(
            sign(
                b"0123456789abcdef-secret",
                1_700_000_000,
                br#"{"id":"plant-7-1"}"#
            ),
            "sha256=c288ccac236ca89a967aca6342d5a9c3f48f55614b8f5ad43181f501b67922f7"
        );
        // The timestamp is covered: the same body at another time signs differently.
        assert_ne!(
            sign(
                b"0123456789abcdef-secret",
                1_700_000_001,
                br#"{"id":"plant-7-1"}"#
            ),
            sign(
                b"0123456789abcdef-secret",
                1_700_000_000,
                br#"{"id":"plant-7-1"}"#
            )
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_jitter_stays_in_the_upper_half() {
        let max = Duration::from_secs(300);
        let mut d = Duration::from_secs(1);
        let mut seen = vec![d];
        while d < max {
            d = next_delay(d, max);
            seen.push(d);
        }
        assert_eq!(seen[..4], [1, 2, 4, 8].map(Duration::from_secs));
        assert_eq!(*seen.last().unwrap(), max);
        assert_eq!(next_delay(max, max), max);
        assert_eq!(
            jitter(Duration::from_secs(10), u32::MAX),
            Duration::from_secs(10)
        );
        assert_eq!(jitter(Duration::from_secs(10), 0), Duration::from_secs(5));
        let mid = jitter(Duration::from_secs(10), u32::MAX / 2);
        assert!(
            mid > Duration::from_secs(7) && mid < Duration::from_secs(8),
            "{mid:?}"
        );
    }

    #[test]
    fn body_carries_the_entry_and_a_stable_id() {
        let e = AuditEntry {
            seq: 7,
            at: ringcast_proto::testkit::now(),
            actor: "otto".into(),
            role: Some("operator".into()),
            action: "pause".into(),
            outcome: "ok".into(),
            rollout_id: Some("r-1".into()),
            ring: None,
            detail: "why".into(),
            prev: crate::audit::GENESIS.into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&body("plant-7", &e).unwrap()).unwrap();
        assert_eq!(v["id"], "plant-7-7");
        assert_eq!(v["fleet"], "plant-7");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["action"], "pause");
        assert_eq!(v["actor"], "otto");
        assert_eq!(v["rollout_id"], "r-1");
        assert!(v["ring"].is_null());
        assert_eq!(v["detail"], "why");
        assert_eq!(v["at"], serde_json::json!(e.at));
    }

    #[test]
    fn metrics_show_pending_and_failures_per_webhook() {
        let s = Arc::new(WebhookStatus {
            name: "tracker".into(),
            cursor: AtomicU64::new(3),
            failures: AtomicU64::new(2),
        });
        let mut out = String::new();
        render_metrics(&mut out, 10, &[s]);
        assert!(
            out.contains("ringcast_webhook_pending{webhook=\"tracker\"} 7\n"),
            "{out}"
        );
        assert!(
            out.contains("ringcast_webhook_failures_total{webhook=\"tracker\"} 2\n"),
            "{out}"
        );
        let mut none = String::new();
        render_metrics(&mut none, 10, &[]);
        assert!(none.is_empty());
    }
}
