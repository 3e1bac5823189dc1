//! The engine's actor: one task that owns the [`Core`], feeds it inputs (commands, ticks,
//! check results, reconnects) and performs what it decided, in this order:
//!
//! 1. persist the changed records and the decision's audit entries in one atomic sled
//!    transaction, and flush it (a decision is durable or it did not happen: on failure the
//!    core is reloaded from the database and the caller gets the error);
//! 2. hand readers a new snapshot of the state;
//! 3. reply to the operator;
//! 4. publish (directives are only ever published after the state they follow from is on
//!    disk) and start acceptance checks.

use super::core::{Core, CoreConfig};
use super::effects::{Changes, Effect, Input, Reply};
use super::fleet::Fleet;
use super::{load_state, Request};
use crate::audit::Record;
use crate::checks;
use crate::error::Result;
use crate::shared::Shared;
use crate::store::Write;
use jiff::Timestamp;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, warn};

/// Reports wake the engine at once, but a burst of them (a whole fleet reporting) is
/// evaluated at most this often: well inside the one-second halt promise.
const WAKE_GAP: std::time::Duration = std::time::Duration::from_millis(50);

/// The actor.
pub struct Engine {
    shared: Arc<Shared>,
    cfg: CoreConfig,
    core: Core,
    rx: mpsc::Receiver<Request>,
    tx: mpsc::Sender<Request>,
}

impl Engine {
    pub(crate) fn new(
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Request>,
        tx: mpsc::Sender<Request>,
    ) -> Result<Engine> {
        let cfg = CoreConfig {
            policy: shared.policy.clone(),
            topics: shared.topics.clone(),
            key: shared.key.clone(),
            trust: shared.trust.clone(),
            trust_envelope: shared.trust_envelope.clone(),
        };
        let state = load_state(&shared.store)?;
        Ok(Engine {
            core: Core::new(cfg.clone(), state),
            cfg,
            shared,
            rx,
            tx,
        })
    }

    /// Run until `shutdown` flips.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        self.step(Input::Start, None).await;
        let mut interval = tokio::time::interval(self.shared.policy.tick.get());
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_eval = tokio::time::Instant::now();
        loop {
            let (input, reply) = tokio::select! {
                _ = shutdown.changed() => break,
                req = self.rx.recv() => match req {
                    Some(r) => (r.input, r.reply),
                    None => break,
                },
                _ = self.shared.wake.notified() => {
                    tokio::time::sleep_until(last_eval + WAKE_GAP).await;
                    (Input::Tick, None)
                }
                _ = interval.tick() => (Input::Tick, None),
            };
            let tick = matches!(input, Input::Tick);
            self.step(input, reply).await;
            if !tick {
                // What a command changed takes effect now, not at the next tick.
                self.step(Input::Tick, None).await;
            }
            last_eval = tokio::time::Instant::now();
        }
        if let Err(e) = self.shared.store.flush().await {
            warn!(error = %e, "flushing the database at shutdown failed");
        }
    }

    /// Decide one input and carry it out (see the module docs for the order).
    async fn step(&mut self, input: Input, reply: Option<oneshot::Sender<Result<Reply>>>) {
        let tick = matches!(input, Input::Tick);
        let input = self.with_facts(input);
        let now = self.shared.clock.now();
        let decided = {
            let devices = self
                .shared
                .devices
                .read()
                .unwrap_or_else(|p| p.into_inner());
            let fleet = Fleet::new(
                &devices,
                &self.shared.store,
                self.shared.policy.unresponsive_after.signed(),
            )
            .complete(
                self.shared
                    .fleet_read
                    .load(std::sync::atomic::Ordering::SeqCst),
            );
            self.core.handle(input, now, &fleet)
        };
        let records: Vec<Record> = decided
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Audit(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        if !decided.changes.is_empty() || !records.is_empty() {
            if let Err(e) = self.persist(now, &decided.changes, &records).await {
                error!(error = %e, "persisting a decision failed; it is undone");
                self.reload();
                if let Some(tx) = reply {
                    let _ = tx.send(Err(e));
                }
                return;
            }
            if !decided.changes.is_empty() {
                self.shared.state.replace(self.core.state().clone());
            }
        }
        match (reply, decided.reply) {
            (Some(tx), r) => {
                let _ = tx.send(r);
            }
            (None, Err(e)) => warn!(error = %e, code = e.code(), "engine input refused"),
            (None, Ok(_)) => {}
        }
        for e in decided.effects {
            match e {
                Effect::Audit(_) => {}
                Effect::Publish { topic, payload } => self.publish(topic, payload).await,
                Effect::RunChecks {
                    rollout,
                    ring,
                    release,
                    attempt,
                    checks,
                    devices,
                } => {
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let outcome = checks::run_all(
                            &checks,
                            &checks::Context {
                                ring: &ring,
                                rollout: &rollout,
                                release: &release,
                                attempt,
                                devices: &devices,
                            },
                        )
                        .await;
                        let _ = tx
                            .send(Request {
                                input: Input::ChecksDone {
                                    rollout,
                                    ring,
                                    attempt,
                                    outcome,
                                },
                                reply: None,
                            })
                            .await;
                    });
                }
            }
        }
        if tick {
            self.shared.settled.send_replace(now);
        }
    }

    /// Facts the core may not look up itself: whether a submitted release's artifact is in
    /// the store (a file lookup).
    fn with_facts(&self, input: Input) -> Input {
        match input {
            Input::Submit { submit, actor, .. } => {
                let artifact_stored = ringcast_proto::Release::parse(&submit.envelope.payload)
                    .map(|r| {
                        self.shared
                            .artifacts
                            .has(&r.artifact.sha256, r.artifact.size)
                    })
                    .unwrap_or(false);
                Input::Submit {
                    submit,
                    actor,
                    artifact_stored,
                }
            }
            other => other,
        }
    }

    /// Write what changed and the audit records in one transaction, then flush.
    async fn persist(&self, now: Timestamp, changes: &Changes, records: &[Record]) -> Result<()> {
        let st = self.core.state();
        let mut writes = Vec::new();
        for id in &changes.releases {
            if let Some(r) = st.releases.get(id) {
                writes.push(Write::release(r)?);
            }
        }
        for id in &changes.rollouts {
            if let Some(r) = st.rollouts.get(id) {
                writes.push(Write::rollout(r)?);
            }
        }
        for ring in &changes.rings {
            if let Some(r) = st.rings.get(ring) {
                writes.push(Write::ring(r)?);
            }
        }
        for device in &changes.pins {
            writes.push(match st.pins.get(device) {
                Some(p) => Write::pin(p)?,
                None => Write::pin_deleted(device),
            });
        }
        if changes.last_good {
            writes.push(Write::meta("last_good", &st.last_good)?);
        }
        self.shared
            .store
            .commit(&self.shared.audit, now, records, &writes)?;
        self.shared.store.flush().await
    }

    /// After a failed write: what the database holds is the truth.
    fn reload(&mut self) {
        match load_state(&self.shared.store) {
            Ok(state) => self.core = Core::new(self.cfg.clone(), state),
            Err(e) => error!(error = %e, "reloading the engine state failed"),
        }
    }

    async fn publish(&self, topic: String, payload: Vec<u8>) {
        if let Err(e) = self
            .shared
            .mqtt
            .publish(
                topic.clone(),
                ringcast_io::mqtt::QoS::AtLeastOnce,
                true,
                payload,
            )
            .await
        {
            warn!(%topic, error = %e, "publish failed");
        }
    }
}
