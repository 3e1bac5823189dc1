//! The rollout engine: one actor task that owns every rollout's state machine, decides
//! against `clock.now()` on a short real-time tick (and at once when a report arrives), signs
//! and publishes ring directives (and the per-device directives of pins, with the same signer
//! and re-signing), and records every decision in the audit log.
//!
//! Transitions are `match (state, facts)` in [`Engine::advance`]; each new state is persisted
//! (and flushed) before its directive is published, so a controller killed at any point
//! resumes from what sled holds and republishes what should stand.

use crate::audit::Record;
use crate::checks;
use crate::config::{OnFailure, Promotion, RingPolicy};
use crate::error::{Error, Result};
use crate::model::{
    Approval, DevicePin, DeviceRecord, ReleaseRecord, RingDirective, Rollout, RolloutState, Stage,
    StepRecord, Tally,
};
use crate::shared::Shared;
use jiff::{SignedDuration, Timestamp};
use ringcast_proto::report::ErrorInfo;
use ringcast_proto::{
    directive, in_ramp, Action, Activation, Directive, Envelope, Event, EventKind, Percent, Phase,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, info_span, warn};

pub mod insight;

/// Who asks (from the API token).
#[derive(Debug, Clone)]
pub struct Actor {
    /// Token name.
    pub name: String,
    /// Role name.
    pub role: String,
}

impl Actor {
    /// The audit record of a refused request (`outcome` = `refused: <code>`).
    fn refused(&self, action: &str, ring: Option<&str>, detail: String, e: &Error) -> Record {
        Record {
            outcome: format!("refused: {}", e.code()),
            ..self.record(action, None, ring, format!("{detail}: {e}"))
        }
    }

    fn record(
        &self,
        action: &str,
        rollout: Option<&str>,
        ring: Option<&str>,
        detail: String,
    ) -> Record {
        Record {
            actor: self.name.clone(),
            role: Some(self.role.clone()),
            action: action.into(),
            outcome: "ok".into(),
            rollout_id: rollout.map(str::to_owned),
            ring: ring.map(str::to_owned),
            detail,
        }
    }
}

/// A release submission.
#[derive(Debug, Clone)]
pub struct Submit {
    /// The signed release.
    pub envelope: Envelope,
    /// Start the rollout at this time (default: now).
    pub start_at: Option<Timestamp>,
    /// Store-scheduled activation.
    pub activate_at: Option<Timestamp>,
}

/// Operator actions on a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    /// Approve the ring it waits for (or the named ring).
    Approve,
    /// Stop making progress.
    Pause,
    /// Continue.
    Resume,
    /// Stop for good; rings it reached get `hold`.
    Abort,
}

impl RolloutAction {
    /// Name for the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutAction::Approve => "approve",
            RolloutAction::Pause => "pause",
            RolloutAction::Resume => "resume",
            RolloutAction::Abort => "abort",
        }
    }
}

/// Requests to the engine actor.
#[derive(Debug)]
pub enum Command {
    /// Submit a release and create its rollout.
    Submit {
        /// What.
        submit: Submit,
        /// Who.
        actor: Actor,
        /// Reply.
        reply: oneshot::Sender<Result<(ReleaseRecord, Rollout)>>,
    },
    /// Approve, pause, resume, abort.
    Act {
        /// Rollout id.
        rollout: String,
        /// Action.
        action: RolloutAction,
        /// Ring (approve only).
        ring: Option<String>,
        /// Who.
        actor: Actor,
        /// Reply.
        reply: oneshot::Sender<Result<Rollout>>,
    },
    /// Unblock a halted release.
    Unblock {
        /// Release id.
        release: String,
        /// Who.
        actor: Actor,
        /// Reply.
        reply: oneshot::Sender<Result<ReleaseRecord>>,
    },
    /// Pin a device to a release (a per-device `install` directive).
    Pin {
        /// Device id.
        device: String,
        /// Release id.
        release: String,
        /// Who.
        actor: Actor,
        /// Reply.
        reply: oneshot::Sender<Result<DevicePin>>,
    },
    /// End a device's pin (a per-device `hold`: the device follows its ring again).
    Unpin {
        /// Device id.
        device: String,
        /// Who.
        actor: Actor,
        /// Reply.
        reply: oneshot::Sender<Result<DevicePin>>,
    },
    /// Acceptance checks finished.
    ChecksDone {
        /// Rollout id.
        rollout: String,
        /// Ring name.
        ring: String,
        /// Outcome.
        outcome: std::result::Result<(), String>,
    },
    /// The MQTT connection was (re)established: republish what should stand.
    Reconnected,
}

/// The cloneable handle the API uses.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
}

impl EngineHandle {
    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Submit a release.
    pub async fn submit(&self, submit: Submit, actor: Actor) -> Result<(ReleaseRecord, Rollout)> {
        self.call(|reply| Command::Submit {
            submit,
            actor,
            reply,
        })
        .await
    }

    /// Act on a rollout.
    pub async fn act(
        &self,
        rollout: String,
        action: RolloutAction,
        ring: Option<String>,
        actor: Actor,
    ) -> Result<Rollout> {
        self.call(|reply| Command::Act {
            rollout,
            action,
            ring,
            actor,
            reply,
        })
        .await
    }

    /// Unblock a release.
    pub async fn unblock(&self, release: String, actor: Actor) -> Result<ReleaseRecord> {
        self.call(|reply| Command::Unblock {
            release,
            actor,
            reply,
        })
        .await
    }

    /// Pin `device` to release `release`.
    pub async fn pin(&self, device: String, release: String, actor: Actor) -> Result<DevicePin> {
        self.call(|reply| Command::Pin {
            device,
            release,
            actor,
            reply,
        })
        .await
    }

    /// End `device`'s pin.
    pub async fn unpin(&self, device: String, actor: Actor) -> Result<DevicePin> {
        self.call(|reply| Command::Unpin {
            device,
            actor,
            reply,
        })
        .await
    }

    /// Tell the engine the broker connection is fresh.
    pub fn reconnected(&self) {
        let _ = self.tx.try_send(Command::Reconnected);
    }
}

/// What the engine owns; readers (API, metrics) see it through `Shared::state`.
#[derive(Debug, Default, Clone)]
pub struct EngineState {
    /// Releases by id.
    pub releases: BTreeMap<String, ReleaseRecord>,
    /// Rollouts by id.
    pub rollouts: BTreeMap<String, Rollout>,
    /// Standing ring directives by ring name.
    pub rings: BTreeMap<String, RingDirective>,
    /// Standing per-device directives (pins, and the holds that ended them) by device id.
    pub pins: BTreeMap<String, DevicePin>,
    /// Last completed release id per release name (rollback target).
    pub last_good: BTreeMap<String, String>,
}

/// A message to publish after the state that caused it is persisted.
#[derive(Debug)]
struct Publish {
    topic: String,
    payload: Vec<u8>,
}

/// The actor.
pub struct Engine {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Command>,
    tx: mpsc::Sender<Command>,
    outbox: Vec<Publish>,
    dirty: bool,
}

/// Create the engine and its handle (the task is started with [`Engine::run`]).
pub fn engine(shared: Arc<Shared>) -> (Engine, EngineHandle) {
    let (tx, rx) = mpsc::channel(256);
    (
        Engine {
            shared,
            rx,
            tx: tx.clone(),
            outbox: Vec::new(),
            dirty: false,
        },
        EngineHandle { tx },
    )
}

/// Compute one ring's tally for a rollout.
pub fn tally(
    devices: &HashMap<String, DeviceRecord>,
    rollout: &Rollout,
    ring: &str,
    percent: Percent,
    now: Timestamp,
    unresponsive_after: SignedDuration,
) -> Tally {
    let mut t = Tally::default();
    for d in devices.values() {
        let Some(r) = &d.report else { continue };
        if r.ring != ring {
            continue;
        }
        t.devices += 1;
        if in_ramp(&rollout.id, &d.id, percent) {
            t.in_ramp += 1;
        }
        if r.rollout_id.as_deref() != Some(rollout.id.as_str()) {
            continue;
        }
        t.reported += 1;
        let ours = |rr: &Option<ringcast_proto::ReleaseRef>| {
            rr.as_ref().is_none_or(|x| {
                x.name == rollout.release_name && x.sequence == rollout.release_sequence
            })
        };
        if r.phase == Phase::Committed && ours(&r.current) {
            t.committed += 1;
        } else if r.phase.is_failure() && ours(&r.target) {
            t.failed += 1;
        } else if now.duration_since(d.last_seen) > unresponsive_after {
            t.unresponsive += 1;
        } else {
            t.pending += 1;
        }
    }
    t
}

/// Whether the failures seen already exceed what the gate tolerates (DESIGN.md: "Failure rate
/// over `max_failure_rate` with at least `min_reports` reports halts the rollout at once").
/// The denominator is the larger of devices that reported and devices known to be in the
/// ramp, so a halt never waits for devices that cannot change the verdict.
pub fn gate_crossed(t: &Tally, ring: &RingPolicy) -> bool {
    let denom = t.reported.max(t.in_ramp);
    t.failed > 0
        && denom >= ring.gate.min_reports.max(1)
        && t.failure_rate() > ring.gate.max_failure_rate
}

/// Whether a baked step has enough success to promote. Intermediate steps need
/// `min(min_reports, devices in the ramp)` commits; the ring's last step needs `min_reports`.
pub fn gate_passes(t: &Tally, ring: &RingPolicy, last_step: bool) -> bool {
    let need = if last_step {
        ring.gate.min_reports
    } else {
        ring.gate.min_reports.min(t.in_ramp)
    };
    t.committed >= need && t.failure_rate() <= ring.gate.max_failure_rate
}

/// What one failing device says about its failure: the evidence a halt's reason cites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureEvidence {
    /// Device id.
    pub device: String,
    /// What failed.
    pub cause: FailureCause,
    /// The tail of the failing check's output, or the error's detail.
    pub output: Option<String>,
}

/// What failed on a device, as its events or report name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureCause {
    /// A health check, named by the device's `reverted` event.
    Check(String),
    /// A reason code (a revert without a check, an install failure, the report's `last_error`).
    Reason(String),
    /// The device reported a failure phase and nothing about why.
    Unknown,
}

impl FailureEvidence {
    /// Evidence for `device` from its newest `reverted` (or `install_failed`) event for the
    /// rollout, falling back to its state report's `last_error`.
    pub fn from_device(
        device: &str,
        event: Option<&Event>,
        last_error: Option<&ErrorInfo>,
    ) -> FailureEvidence {
        let nonempty = |s: &str| (!s.trim().is_empty()).then(|| s.to_owned());
        let from_report = || last_error.and_then(|e| nonempty(&e.detail));
        let (cause, output) = match event.map(|e| &e.kind) {
            Some(EventKind::Reverted {
                reason,
                check,
                output,
            }) => (
                match check {
                    Some(c) => FailureCause::Check(c.clone()),
                    None => FailureCause::Reason(reason.clone()),
                },
                output.as_deref().and_then(nonempty).or_else(from_report),
            ),
            Some(EventKind::InstallFailed { reason, detail }) => (
                FailureCause::Reason(reason.clone()),
                nonempty(detail).or_else(from_report),
            ),
            _ => match last_error {
                Some(e) => (FailureCause::Reason(e.reason.clone()), from_report()),
                None => (FailureCause::Unknown, None),
            },
        };
        FailureEvidence {
            device: device.to_owned(),
            cause,
            output,
        }
    }
}

/// Longest output tail a halt reason quotes, in characters.
pub const HALT_OUTPUT_CHARS: usize = 120;
/// Longest check name or reason code a halt reason quotes, in characters.
const HALT_NAME_CHARS: usize = 64;

/// `s` on one line for a reason string: lines trimmed and joined with `": "`, control
/// characters (terminal escapes included) made spaces, and only the last `max` characters
/// kept, after an ellipsis: the end of an output is where the error is.
fn one_line_tail(s: &str, max: usize) -> String {
    let joined = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ");
    let clean: Vec<char> = joined
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() <= max {
        return clean.into_iter().collect();
    }
    let keep = max.saturating_sub(1);
    std::iter::once('…')
        .chain(clean[clean.len() - keep..].iter().copied())
        .collect()
}

/// The reason a crossed gate gives (audit log, the rollout's state, the release's `blocked`):
/// the tally, then the most common cause among the failing devices' `evidence`, with one
/// device as an example and its output tail. Pure: the engine gathers the evidence.
pub fn halt_reason(ring: &str, t: &Tally, max_rate: f64, evidence: &[FailureEvidence]) -> String {
    let mut reason = format!(
        "gate crossed in ring {ring}: {} of {} failed (rate {:.2} > {:.2})",
        t.failed,
        t.reported.max(t.in_ramp),
        t.failure_rate(),
        max_rate
    );
    let mut by_cause: BTreeMap<&FailureCause, Vec<&FailureEvidence>> = BTreeMap::new();
    for e in evidence {
        by_cause.entry(&e.cause).or_default().push(e);
    }
    // The most devices wins, ties to the first cause in order; a device that said nothing
    // is never "the most common failure" while another said something.
    let top = by_cause
        .iter()
        .filter(|(c, _)| **c != &FailureCause::Unknown)
        .fold(
            None::<(&FailureCause, &Vec<&FailureEvidence>)>,
            |best, (c, ds)| match best {
                Some((_, b)) if b.len() >= ds.len() => best,
                _ => Some((c, ds)),
            },
        )
        .or_else(|| by_cause.iter().next().map(|(c, ds)| (*c, ds)));
    let Some((cause, devices)) = top else {
        return reason;
    };
    let what = match cause {
        FailureCause::Check(c) => format!("check {:?}", one_line_tail(c, HALT_NAME_CHARS)),
        FailureCause::Reason(r) => format!("reason {:?}", one_line_tail(r, HALT_NAME_CHARS)),
        FailureCause::Unknown => "no reported cause".to_owned(),
    };
    let n = devices.len();
    let of = if n < evidence.len() {
        format!(" of {}", evidence.len())
    } else {
        String::new()
    };
    let plural = if n == 1 && of.is_empty() { "" } else { "s" };
    let mut sorted = devices.clone();
    sorted.sort_by(|a, b| a.device.cmp(&b.device));
    let example = sorted
        .iter()
        .find(|d| d.output.is_some())
        .or(sorted.first())
        .copied();
    reason.push_str(&format!(
        "; most common failure: {what} on {n}{of} device{plural}"
    ));
    if let Some(d) = example {
        reason.push_str(&format!(", e.g. {}", d.device));
        if let Some(o) = &d.output {
            reason.push_str(&format!(": {:?}", one_line_tail(o, HALT_OUTPUT_CHARS)));
        }
    }
    reason
}

enum Next {
    Stay,
    Go(RolloutState),
}

impl Engine {
    fn now(&self) -> Timestamp {
        self.shared.clock.now()
    }

    fn state(&self) -> std::sync::RwLockWriteGuard<'_, EngineState> {
        self.shared.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn audit(&self, r: Record) {
        if let Err(e) = self.shared.audit.append(self.now(), r) {
            warn!(error = %e, "audit append failed");
        }
    }

    /// Run until `shutdown` flips.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let tick = self.shared.policy.tick.get();
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.reconcile_policy();
        // Whatever stood before a restart stands again, freshly signed.
        self.republish_all();
        self.flush_and_publish().await;
        // Reports wake the engine at once, but a burst of them (a whole fleet reporting)
        // is evaluated at most every WAKE_GAP: well inside the one-second halt promise, and
        // the tallies walk the device table only ~20 times a second.
        const WAKE_GAP: std::time::Duration = std::time::Duration::from_millis(50);
        let mut last_eval = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                _ = self.shared.wake.notified() => {
                    tokio::time::sleep_until(last_eval + WAKE_GAP).await;
                }
                _ = interval.tick() => {}
            }
            last_eval = tokio::time::Instant::now();
            self.evaluate();
            self.flush_and_publish().await;
        }
        let _ = self.shared.store.flush().await;
    }

    /// A restart with an edited policy may leave a rollout on a ring or step that no longer
    /// exists: stop it (nothing is promoted on a guess) and say why.
    fn reconcile_policy(&mut self) {
        let now = self.now();
        let policy = self.shared.policy.clone();
        let mut stopped = Vec::new();
        {
            let mut st = self.state();
            for r in st.rollouts.values_mut() {
                if let RolloutState::Active { ring, step, .. } = r.state {
                    let fits = policy
                        .rings
                        .get(ring)
                        .is_some_and(|rp| step < rp.steps.len());
                    if !fits {
                        let reason =
                            format!("policy changed: ring {ring} step {step} no longer exists");
                        r.state = RolloutState::Halted {
                            reason: reason.clone(),
                        };
                        r.ended_at = Some(now);
                        stopped.push((r.id.clone(), reason));
                    }
                }
            }
        }
        for (id, reason) in stopped {
            warn!(rollout_id = %id, %reason, "rollout stopped at start-up");
            self.dirty = true;
            self.audit(Record::auto("halt", &id, None, reason));
        }
    }

    /// Persist dirty state (flushed: decisions must survive a crash), then publish.
    async fn flush_and_publish(&mut self) {
        if self.dirty {
            if let Err(e) = self.persist_all() {
                warn!(error = %e, "persisting engine state failed; not publishing");
                return;
            }
            if let Err(e) = self.shared.store.flush().await {
                warn!(error = %e, "flushing engine state failed; not publishing");
                return;
            }
            self.dirty = false;
        }
        for p in self.outbox.drain(..) {
            if let Err(e) = self
                .shared
                .mqtt
                .publish(
                    p.topic.clone(),
                    ringcast_io::mqtt::QoS::AtLeastOnce,
                    true,
                    p.payload,
                )
                .await
            {
                warn!(topic = %p.topic, error = %e, "publish failed");
            }
        }
    }

    fn persist_all(&self) -> Result<()> {
        let st = self.shared.state.read().unwrap_or_else(|p| p.into_inner());
        for r in st.releases.values() {
            self.shared.store.put_release(r)?;
        }
        for r in st.rollouts.values() {
            self.shared.store.put_rollout(r)?;
        }
        for r in st.rings.values() {
            self.shared.store.put_ring(r)?;
        }
        for p in st.pins.values() {
            self.shared.store.put_pin(p)?;
        }
        self.shared.store.set_meta("last_good", &st.last_good)?;
        Ok(())
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit {
                submit,
                actor,
                reply,
            } => {
                let r = self.submit(submit, &actor);
                let _ = reply.send(r);
            }
            Command::Act {
                rollout,
                action,
                ring,
                actor,
                reply,
            } => {
                let r = self.act(&rollout, action, ring, &actor);
                let _ = reply.send(r);
            }
            Command::Unblock {
                release,
                actor,
                reply,
            } => {
                let r = self.unblock(&release, &actor);
                let _ = reply.send(r);
            }
            Command::Pin {
                device,
                release,
                actor,
                reply,
            } => {
                let r = self.pin(&device, &release, &actor);
                let _ = reply.send(r);
            }
            Command::Unpin {
                device,
                actor,
                reply,
            } => {
                let r = self.unpin(&device, &actor);
                let _ = reply.send(r);
            }
            Command::ChecksDone {
                rollout,
                ring,
                outcome,
            } => self.checks_done(&rollout, &ring, outcome),
            Command::Reconnected => self.republish_all(),
        }
    }

    fn submit(&mut self, s: Submit, actor: &Actor) -> Result<(ReleaseRecord, Rollout)> {
        let now = self.now();
        let skew = self.shared.policy.allowed_skew.signed();
        let release = ringcast_proto::verify_release(&self.shared.trust, &s.envelope, now, skew)?;
        let compat_note = release.compatible.join(",");
        let id = format!("{}-{}", release.name, release.sequence);
        let mut st = self.state();
        if let Some(existing) = st.releases.get(&id) {
            if existing.envelope != s.envelope {
                return Err(Error::conflict(
                    "sequence_reused",
                    format!("release {id} was already submitted with different content"),
                ));
            }
            if existing.blocked.is_some() {
                return Err(Error::conflict(
                    "release_blocked",
                    format!("release {id} was halted; unblock it first"),
                ));
            }
            if st
                .rollouts
                .values()
                .any(|r| r.release_id == id && r.state.is_live())
            {
                return Err(Error::conflict(
                    "already_rolling_out",
                    format!("release {id} already has a live rollout"),
                ));
            }
        } else if let Some(newer) = st
            .releases
            .values()
            .filter(|r| r.release.name == release.name)
            .map(|r| r.release.sequence)
            .max()
            .filter(|&max| max >= release.sequence)
        {
            return Err(Error::conflict(
                "sequence_not_increasing",
                format!(
                    "release {} has sequence {}, not above {newer} already submitted",
                    release.name, release.sequence
                ),
            ));
        }
        // An artifact the controller serves must be in the store before devices are sent there.
        if let Some(hex) = release.artifact.url.strip_prefix("/artifacts/sha256/") {
            if hex != release.artifact.sha256
                || !self.shared.artifacts.has(hex, release.artifact.size)
            {
                return Err(Error::conflict(
                    "artifact_missing",
                    format!(
                        "artifact {} ({} bytes) is not in the store; upload it first",
                        release.artifact.sha256, release.artifact.size
                    ),
                ));
            }
        }
        let rec = ReleaseRecord {
            id: id.clone(),
            release: release.clone(),
            envelope: s.envelope,
            submitted_at: now,
            submitted_by: actor.name.clone(),
            blocked: None,
        };
        let mut rollout_id = id.clone();
        let mut n = 2;
        while st.rollouts.contains_key(&rollout_id) {
            rollout_id = format!("{id}-{n}");
            n += 1;
        }
        let live_same_name: Vec<String> = st
            .rollouts
            .values()
            .filter(|r| r.release_name == release.name && r.state.is_live())
            .map(|r| r.id.clone())
            .collect();
        let all_auto = self.shared.policy.all_auto();
        let state = if live_same_name.is_empty() || all_auto {
            RolloutState::Pending
        } else {
            RolloutState::Queued
        };
        let rollout = Rollout {
            id: rollout_id.clone(),
            release_id: id.clone(),
            release_name: release.name.clone(),
            release_sequence: release.sequence,
            created_at: now,
            start_at: s.start_at,
            activate_at: s.activate_at,
            state,
            paused: false,
            approvals: BTreeMap::new(),
            rings_reached: Vec::new(),
            history: Vec::new(),
            ended_at: None,
            insight: Default::default(),
        };
        let mut superseded = Vec::new();
        if all_auto {
            for old in &live_same_name {
                if let Some(o) = st.rollouts.get_mut(old) {
                    o.state = RolloutState::Superseded {
                        by: rollout_id.clone(),
                    };
                    o.ended_at = Some(now);
                    superseded.push(old.clone());
                }
            }
        }
        st.releases.insert(id.clone(), rec.clone());
        st.rollouts.insert(rollout_id.clone(), rollout.clone());
        drop(st);
        self.dirty = true;
        self.audit(actor.record(
            "release_submit",
            Some(&rollout_id),
            None,
            format!(
                "release {id} (version {}, for {compat_note}); rollout {}",
                release.version,
                rollout.state.phase()
            ),
        ));
        for old in superseded {
            self.audit(Record::auto(
                "supersede",
                &old,
                None,
                format!("superseded by {rollout_id}"),
            ));
        }
        info!(rollout_id = %rollout_id, release = %id, "release submitted");
        Ok((rec, rollout))
    }

    fn act(
        &mut self,
        id: &str,
        action: RolloutAction,
        ring: Option<String>,
        actor: &Actor,
    ) -> Result<Rollout> {
        let now = self.now();
        let policy = self.shared.policy.clone();
        let mut st = self.state();
        let r = st.rollouts.get_mut(id).ok_or_else(|| Error::NotFound {
            what: "rollout",
            id: id.into(),
        })?;
        if !r.state.is_live() {
            return Err(Error::conflict(
                "rollout_finished",
                format!("rollout {id} is {}", r.state.phase()),
            ));
        }
        let mut ring_name = None;
        match action {
            RolloutAction::Approve => {
                let name = match ring {
                    Some(n) => n,
                    None => match &r.state {
                        RolloutState::Active {
                            ring,
                            stage: Stage::WaitingApproval,
                            ..
                        } => policy.rings[*ring].name.clone(),
                        _ => {
                            return Err(Error::conflict(
                                "not_waiting_approval",
                                format!(
                                    "rollout {id} is {}; name a ring to approve ahead",
                                    r.state.phase()
                                ),
                            ))
                        }
                    },
                };
                let idx = policy.ring_index(&name).ok_or_else(|| Error::NotFound {
                    what: "ring",
                    id: name.clone(),
                })?;
                if policy.rings[idx].promotion != Promotion::Manual {
                    return Err(Error::conflict(
                        "not_manual",
                        format!("ring {name} promotes automatically"),
                    ));
                }
                if r.approvals.contains_key(&name) {
                    return Err(Error::conflict(
                        "already_approved",
                        format!("ring {name} is already approved"),
                    ));
                }
                r.approvals.insert(
                    name.clone(),
                    Approval {
                        by: actor.name.clone(),
                        at: now,
                    },
                );
                ring_name = Some(name);
            }
            RolloutAction::Pause => {
                if r.paused {
                    return Err(Error::conflict(
                        "already_paused",
                        format!("rollout {id} is paused"),
                    ));
                }
                r.paused = true;
            }
            RolloutAction::Resume => {
                if !r.paused {
                    return Err(Error::conflict(
                        "not_paused",
                        format!("rollout {id} is not paused"),
                    ));
                }
                r.paused = false;
            }
            RolloutAction::Abort => {
                r.state = RolloutState::Aborted;
                r.ended_at = Some(now);
            }
        }
        let out = r.clone();
        drop(st);
        if action == RolloutAction::Abort {
            self.stop_rings(&out, "aborted");
        }
        self.dirty = true;
        self.audit(actor.record(
            action.as_str(),
            Some(id),
            ring_name.as_deref(),
            String::new(),
        ));
        Ok(out)
    }

    fn unblock(&mut self, id: &str, actor: &Actor) -> Result<ReleaseRecord> {
        let mut st = self.state();
        let r = st.releases.get_mut(id).ok_or_else(|| Error::NotFound {
            what: "release",
            id: id.into(),
        })?;
        if r.blocked.take().is_none() {
            return Err(Error::conflict(
                "not_blocked",
                format!("release {id} is not blocked"),
            ));
        }
        let out = r.clone();
        drop(st);
        self.dirty = true;
        self.audit(actor.record("unblock", None, None, format!("release {id}")));
        Ok(out)
    }

    /// Sign a ring directive (or, with `device` set, a per-device one) at `now` and queue it.
    fn sign_ring(
        &mut self,
        spec: &mut RingDirective,
        releases: &BTreeMap<String, ReleaseRecord>,
        now: Timestamp,
    ) {
        let ttl = self.shared.policy.directive_ttl.signed();
        spec.sequence = directive::next_sequence(spec.sequence, now);
        spec.issued_at = now;
        spec.expires_at = now.checked_add(ttl).unwrap_or(Timestamp::MAX);
        let release = spec
            .release_id
            .as_ref()
            .and_then(|id| releases.get(id))
            .map(|r| r.envelope.clone());
        let action = if release.is_none() {
            Action::Hold
        } else {
            spec.action
        };
        let d = Directive {
            fleet: self.shared.policy.fleet.clone(),
            ring: spec.ring.clone(),
            device: spec.device.clone(),
            rollout_id: spec.rollout_id.clone(),
            sequence: spec.sequence,
            issued_at: spec.issued_at,
            expires_at: spec.expires_at,
            action,
            release: if action == Action::Install {
                release
            } else {
                None
            },
            percent: spec.percent,
            activation: spec.activation.clone(),
        };
        let env = d.sign(&[&self.shared.key]);
        let topic = match &spec.device {
            Some(device) => self.shared.topics.device_directive(device),
            None => self.shared.topics.ring_directive(&spec.ring),
        };
        self.outbox.push(Publish {
            topic,
            payload: env.to_vec(),
        });
        self.dirty = true;
    }

    /// Set and sign a ring's directive.
    fn set_ring(
        &mut self,
        ring: &str,
        rollout_id: &str,
        action: Action,
        release_id: Option<String>,
        percent: Percent,
        activation: Activation,
    ) {
        let now = self.now();
        let st = self.state();
        let prev_seq = st.rings.get(ring).map(|r| r.sequence).unwrap_or(0);
        let prev_rollout = st.rings.get(ring).map(|r| r.rollout_id.clone());
        let mut spec = RingDirective {
            ring: ring.into(),
            device: None,
            rollout_id: rollout_id.into(),
            action,
            release_id,
            percent,
            activation,
            sequence: prev_seq,
            issued_at: now,
            expires_at: now,
        };
        let releases = st.releases.clone();
        drop(st);
        self.sign_ring(&mut spec, &releases, now);
        self.state().rings.insert(ring.into(), spec);
        if prev_rollout.as_deref() != Some(rollout_id) {
            self.end_pins_for_ring_rollout(ring, rollout_id);
        }
    }

    /// Re-sign every standing directive and the trust root (start-up, broker reconnect).
    fn republish_all(&mut self) {
        let now = self.now();
        self.outbox.push(Publish {
            topic: self.shared.topics.trust(),
            payload: self.shared.trust_envelope.clone(),
        });
        self.resign(now, None);
    }

    /// Re-sign directives past half their lifetime (freeze protection).
    fn resign_due(&mut self, now: Timestamp) {
        let half = SignedDuration::from_millis(
            self.shared.policy.directive_ttl.signed().as_millis() as i64 / 2,
        );
        self.resign(now, Some(half));
    }

    /// Re-sign the standing ring and device directives: all of them, or with `due_after` only
    /// those signed longer ago than that (or, after a clock step back, in the future).
    fn resign(&mut self, now: Timestamp, due_after: Option<SignedDuration>) {
        let (mut rings, mut pins, releases) = {
            let st = self.state();
            (st.rings.clone(), st.pins.clone(), st.releases.clone())
        };
        let mut any = false;
        let specs = rings
            .values_mut()
            .chain(pins.values_mut().map(|p| &mut p.directive));
        for spec in specs {
            let due = match due_after {
                None => true,
                Some(after) => {
                    let at = spec.issued_at.checked_add(after).unwrap_or(Timestamp::MAX);
                    now >= at || now < spec.issued_at
                }
            };
            if due {
                self.sign_ring(spec, &releases, now);
                any = true;
            }
        }
        if any {
            let mut st = self.state();
            st.rings = rings;
            st.pins = pins;
        }
    }

    /// Pin `device` to release `release_id`: a signed, retained per-device `install` that the
    /// agent prefers over its ring's directive until unpinned or its ring gets a new rollout.
    fn pin(&mut self, device: &str, release_id: &str, actor: &Actor) -> Result<DevicePin> {
        let detail = format!("device {device}: pin to {release_id}");
        let ring = self.device_ring(device);
        let checked = ring.and_then(|(ring, class)| {
            let st = self.state();
            let rel = st.releases.get(release_id).ok_or_else(|| Error::NotFound {
                what: "release",
                id: release_id.into(),
            })?;
            if let Some(why) = &rel.blocked {
                return Err(Error::conflict(
                    "release_blocked",
                    format!("release {release_id} was halted ({why}); unblock it first"),
                ));
            }
            // The agent would refuse it (`incompatible`): say so now, not after publishing.
            if !rel.release.is_compatible(&class) {
                return Err(Error::conflict(
                    "incompatible",
                    format!(
                        "release {release_id} is for {}, device {device} is a {class}",
                        rel.release.compatible.join(",")
                    ),
                ));
            }
            let ring_rollout = st.rings.get(&ring).map(|d| d.rollout_id.clone());
            Ok((ring, ring_rollout))
        });
        let (ring, ring_rollout) = match checked {
            Ok(v) => v,
            Err(e) => {
                self.audit(actor.refused("pin", None, detail, &e));
                return Err(e);
            }
        };
        let prev = self.state().pins.get(device).cloned();
        let issued = prev.as_ref().map_or(0, |p| p.issued) + 1;
        let rollout_id = format!("pin-{device}-{issued}");
        let pin = DevicePin {
            directive: RingDirective {
                ring: ring.clone(),
                device: Some(device.into()),
                rollout_id: rollout_id.clone(),
                action: Action::Install,
                release_id: Some(release_id.into()),
                percent: Percent::FULL,
                activation: Activation::default(),
                sequence: prev.map_or(0, |p| p.directive.sequence),
                issued_at: self.now(),
                expires_at: self.now(),
            },
            by: actor.name.clone(),
            at: self.now(),
            ring_rollout,
            issued,
            ended: None,
        };
        let pin = self.set_pin(pin);
        self.audit(actor.record("pin", Some(&rollout_id), Some(&ring), detail));
        info!(%device, release = %release_id, %rollout_id, "device pinned");
        Ok(pin)
    }

    /// End `device`'s pin with a per-device `hold`.
    fn unpin(&mut self, device: &str, actor: &Actor) -> Result<DevicePin> {
        let detail = format!("device {device}: unpin");
        let standing = self.state().pins.get(device).cloned();
        let pin = match standing {
            Some(p) if p.pinned_release().is_some() => p,
            other => {
                let e = if other.is_none() && self.device_ring(device).is_err() {
                    Error::NotFound {
                        what: "device",
                        id: device.into(),
                    }
                } else {
                    Error::conflict("not_pinned", format!("device {device} is not pinned"))
                };
                self.audit(actor.refused("unpin", None, detail, &e));
                return Err(e);
            }
        };
        let released = pin.pinned_release().unwrap_or_default().to_owned();
        let (rollout_id, ring) = (pin.directive.rollout_id.clone(), pin.directive.ring.clone());
        let out = self.end_pin(pin, &actor.name, "unpinned".into());
        self.audit(actor.record(
            "unpin",
            Some(&rollout_id),
            Some(&ring),
            format!("{detail} (was pinned to {released})"),
        ));
        info!(%device, %rollout_id, "device unpinned");
        Ok(out)
    }

    /// A device's ring and class, from its last report (`not_found` without one).
    fn device_ring(&self, device: &str) -> Result<(String, String)> {
        let devices = self
            .shared
            .devices
            .read()
            .unwrap_or_else(|p| p.into_inner());
        devices
            .get(device)
            .and_then(|d| d.report.as_ref())
            .map(|r| (r.ring.clone(), r.device_class.clone()))
            .ok_or_else(|| Error::NotFound {
                what: "device",
                id: device.into(),
            })
    }

    /// Replace a pin's directive with a `hold` (same rollout id: it ends that pin).
    fn end_pin(&mut self, mut pin: DevicePin, by: &str, why: String) -> DevicePin {
        pin.directive.action = Action::Hold;
        pin.directive.release_id = None;
        pin.by = by.into();
        pin.at = self.now();
        pin.ended = Some(why);
        self.set_pin(pin)
    }

    /// Sign a device's directive, keep it standing (persisted before it is published) and
    /// return it as signed.
    fn set_pin(&mut self, mut pin: DevicePin) -> DevicePin {
        let now = self.now();
        let releases = self.state().releases.clone();
        self.sign_ring(&mut pin.directive, &releases, now);
        let device = pin.directive.device.clone().unwrap_or_default();
        self.state().pins.insert(device, pin.clone());
        pin
    }

    /// A ring directive for a new rollout ends the pins of that ring's devices on the devices
    /// themselves (agent rule), so every device directive of that ring, a standing pin or
    /// the hold an unpin left, has nothing more to say: retire it. It is deleted from the
    /// database first, then its retained message is cleared (an empty retained publish), so
    /// neither a re-signing nor a restart brings it back.
    fn end_pins_for_ring_rollout(&mut self, ring: &str, rollout_id: &str) {
        let ending: Vec<DevicePin> = self
            .state()
            .pins
            .values()
            .filter(|p| p.directive.ring == ring)
            .filter(|p| p.ring_rollout.as_deref() != Some(rollout_id))
            .cloned()
            .collect();
        for pin in ending {
            let device = pin.directive.device.clone().unwrap_or_default();
            let pin_id = pin.directive.rollout_id.clone();
            if let Err(e) = self.shared.store.delete_pin(&device) {
                warn!(%device, error = %e, "retiring the device directive failed; it stands");
                continue;
            }
            self.state().pins.remove(&device);
            self.dirty = true;
            self.outbox.push(Publish {
                topic: self.shared.topics.device_directive(&device),
                payload: Vec::new(),
            });
            let why = format!("ring {ring} got rollout {rollout_id}");
            let (action, detail) = match pin.pinned_release() {
                Some(release) => (
                    "unpin",
                    format!("device {device}: pin to {release} ended: {why}"),
                ),
                None => (
                    "pin_retired",
                    format!("device {device}: hold retired: {why}"),
                ),
            };
            self.audit(Record::auto(action, &pin_id, Some(ring), detail));
            info!(%device, %pin_id, %ring, "new ring rollout retires the device directive");
        }
    }

    /// Hold (or leave) the rings a stopped rollout reached.
    fn stop_rings(&mut self, r: &Rollout, why: &str) {
        for ring in r.rings_reached.clone() {
            let standing = self.state().rings.get(&ring).map(|d| d.rollout_id.clone());
            if standing.as_deref() == Some(r.id.as_str()) {
                self.set_ring(
                    &ring,
                    &r.id,
                    Action::Hold,
                    None,
                    Percent::FULL,
                    Activation::default(),
                );
                self.audit(Record::auto(
                    "hold",
                    &r.id,
                    Some(&ring),
                    format!("hold published: {why}"),
                ));
            }
        }
    }

    fn checks_done(&mut self, id: &str, ring: &str, outcome: std::result::Result<(), String>) {
        let now = self.now();
        let policy = self.shared.policy.clone();
        let mut st = self.state();
        let Some(r) = st.rollouts.get_mut(id) else {
            return;
        };
        let RolloutState::Active {
            ring: idx,
            step,
            stage: Stage::Checking { .. },
        } = r.state.clone()
        else {
            return;
        };
        if policy.rings[idx].name != ring {
            return;
        }
        let record = match outcome {
            Ok(()) => {
                r.state = RolloutState::Active {
                    ring: idx,
                    step,
                    stage: Stage::Checking { since: now },
                };
                // Passing checks complete the ring: reuse the promotion path.
                drop(st);
                self.promote_ring(id, idx);
                Record::auto("checks_passed", id, Some(ring), "acceptance checks passed")
            }
            Err(detail) => {
                r.state = RolloutState::Active {
                    ring: idx,
                    step,
                    stage: Stage::ChecksFailed {
                        at: now,
                        detail: detail.clone(),
                    },
                };
                drop(st);
                Record::auto(
                    "checks_failed",
                    id,
                    Some(ring),
                    format!("ring held: {detail}"),
                )
            }
        };
        self.dirty = true;
        self.audit(record);
    }

    /// Move a rollout past ring `idx` (next ring, or completed).
    fn promote_ring(&mut self, id: &str, idx: usize) {
        let now = self.now();
        let policy = self.shared.policy.clone();
        let mut st = self.state();
        let Some(r) = st.rollouts.get_mut(id) else {
            return;
        };
        let ring = policy.rings[idx].name.clone();
        if idx + 1 < policy.rings.len() {
            r.state = RolloutState::Active {
                ring: idx + 1,
                step: 0,
                stage: Stage::WaitingWindow,
            };
            let next = policy.rings[idx + 1].name.clone();
            drop(st);
            self.audit(Record::auto(
                "promote",
                id,
                Some(&ring),
                format!("ring {ring} passed; next ring {next}"),
            ));
        } else {
            r.state = RolloutState::Completed;
            r.ended_at = Some(now);
            let (name, rel) = (r.release_name.clone(), r.release_id.clone());
            st.last_good.insert(name, rel.clone());
            drop(st);
            self.audit(Record::auto(
                "complete",
                id,
                Some(&ring),
                format!("release {rel} reached every ring"),
            ));
            info!(rollout_id = %id, "rollout completed");
        }
        self.dirty = true;
    }

    /// Evaluate every live rollout against the clock and the reports; re-sign what is due.
    fn evaluate(&mut self) {
        let now = self.now();
        let ids: Vec<String> = {
            let st = self.state();
            let mut v: Vec<&Rollout> = st.rollouts.values().filter(|r| r.state.is_live()).collect();
            v.sort_by_key(|r| r.created_at);
            v.into_iter().map(|r| r.id.clone()).collect()
        };
        for id in ids {
            // Bounded: each pass makes at most one transition; a step can chain a few.
            for _ in 0..16 {
                match self.advance(&id, now) {
                    Next::Stay => break,
                    Next::Go(s) => {
                        if let Some(r) = self.state().rollouts.get_mut(&id) {
                            r.state = s;
                        }
                        self.dirty = true;
                    }
                }
            }
        }
        self.resign_due(now);
        self.track_insight(now);
    }

    /// Record fleet-coverage and restore times (cheap: only recent rollouts still missing one).
    fn track_insight(&mut self, now: Timestamp) {
        let week = SignedDuration::from_hours(24 * 7);
        let candidates: Vec<(Rollout, ringcast_proto::Release)> = {
            let st = self.shared.state.read().unwrap_or_else(|p| p.into_inner());
            st.rollouts
                .values()
                .filter(|r| r.ended_at.is_none_or(|e| now.duration_since(e) < week))
                .filter(|r| match r.state {
                    RolloutState::Halted { .. } | RolloutState::RolledBack { .. } => {
                        r.insight.restored_at.is_none()
                    }
                    _ => r.insight.fleet_full_at.is_none(),
                })
                .filter_map(|r| {
                    st.releases
                        .get(&r.release_id)
                        .map(|rel| (r.clone(), rel.release.clone()))
                })
                .collect()
        };
        for (r, rel) in candidates {
            let cov = {
                let devices = self
                    .shared
                    .devices
                    .read()
                    .unwrap_or_else(|p| p.into_inner());
                insight::coverage(&devices, &r, &rel)
            };
            let mut st = self.state();
            let Some(rr) = st.rollouts.get_mut(&r.id) else {
                continue;
            };
            let before = rr.insight.clone();
            match rr.state {
                RolloutState::Halted { .. } | RolloutState::RolledBack { .. } => {
                    if cov.on_release == 0 && cov.in_flight == 0 {
                        rr.insight.restored_at = Some(now);
                    }
                }
                _ => {
                    if cov.fleet > 0
                        && cov.on_release * 2 >= cov.fleet
                        && rr.insight.fleet_half_at.is_none()
                    {
                        rr.insight.fleet_half_at = Some(now);
                    }
                    if cov.fleet > 0 && cov.on_release >= cov.fleet {
                        rr.insight.fleet_full_at = Some(now);
                    }
                }
            }
            let changed = rr.insight != before;
            drop(st);
            if changed {
                self.dirty = true;
            }
        }
    }

    /// Decide one transition for rollout `id` at `now`.
    fn advance(&mut self, id: &str, now: Timestamp) -> Next {
        let policy = self.shared.policy.clone();
        let Some(r) = self.state().rollouts.get(id).cloned() else {
            return Next::Stay;
        };
        let span = info_span!("rollout", rollout_id = %id, ring = tracing::field::Empty);
        let _g = span.enter();

        // Gates first, on every ring this release reached, paused or not: a bad release is
        // stopped even while an operator holds the rollout.
        if let RolloutState::Active { .. } = r.state {
            if let Some((ring_idx, t)) = self.crossed_gate(&r, now) {
                self.halt(&r, ring_idx, &t);
                return Next::Stay;
            }
        }
        if r.paused {
            return Next::Stay;
        }
        match r.state.clone() {
            RolloutState::Queued => {
                let st = self.state();
                // First come, first served: wait while an older rollout of this name is live.
                let blocked = st.rollouts.values().any(|o| {
                    o.id != r.id
                        && o.release_name == r.release_name
                        && o.state.is_live()
                        && (o.state != RolloutState::Queued || o.created_at < r.created_at)
                });
                drop(st);
                if blocked {
                    return Next::Stay;
                }
                self.audit(Record::auto(
                    "dequeue",
                    id,
                    None,
                    "previous rollout of this release finished",
                ));
                Next::Go(RolloutState::Pending)
            }
            RolloutState::Pending => {
                if r.start_at.is_some_and(|s| now < s) {
                    return Next::Stay;
                }
                self.audit(Record::auto("start", id, None, "rollout started"));
                Next::Go(RolloutState::Active {
                    ring: 0,
                    step: 0,
                    stage: Stage::WaitingWindow,
                })
            }
            RolloutState::Active { ring, step, stage } => {
                let rp = &policy.rings[ring];
                span.record("ring", rp.name.as_str());
                match stage {
                    Stage::WaitingWindow | Stage::WaitingApproval => {
                        let open = rp.schedule().is_open(now);
                        let needs_approval = step == 0
                            && rp.promotion == Promotion::Manual
                            && !r.approvals.contains_key(&rp.name);
                        if !open {
                            return if stage == Stage::WaitingWindow {
                                Next::Stay
                            } else {
                                Next::Go(RolloutState::Active {
                                    ring,
                                    step,
                                    stage: Stage::WaitingWindow,
                                })
                            };
                        }
                        if needs_approval {
                            if stage == Stage::WaitingApproval {
                                return Next::Stay;
                            }
                            self.audit(Record::auto(
                                "wait_approval",
                                id,
                                Some(&rp.name),
                                "ring is manual: waiting for an approver",
                            ));
                            return Next::Go(RolloutState::Active {
                                ring,
                                step,
                                stage: Stage::WaitingApproval,
                            });
                        }
                        self.publish_step(&r, ring, step, now);
                        Next::Go(RolloutState::Active {
                            ring,
                            step,
                            stage: Stage::Baking { since: now },
                        })
                    }
                    Stage::Baking { since } => {
                        if now.duration_since(since) < rp.bake.signed() {
                            return Next::Stay;
                        }
                        let percent = rp.steps[step];
                        let t = self.tally_of(&r, &rp.name, percent, now);
                        let last_step = step + 1 == rp.steps.len();
                        if !gate_passes(&t, rp, last_step) {
                            return Next::Stay;
                        }
                        self.mark_passed(id, &rp.name, step, now);
                        if !last_step {
                            self.audit(Record::auto(
                                "promote_step",
                                id,
                                Some(&rp.name),
                                format!(
                                    "step {percent} passed ({} committed, {} failed); next {}",
                                    t.committed,
                                    t.failed,
                                    rp.steps[step + 1]
                                ),
                            ));
                            return Next::Go(RolloutState::Active {
                                ring,
                                step: step + 1,
                                stage: Stage::WaitingWindow,
                            });
                        }
                        if !rp.checks.is_empty() {
                            self.start_checks(&r, ring);
                            return Next::Go(RolloutState::Active {
                                ring,
                                step,
                                stage: Stage::Checking { since: now },
                            });
                        }
                        self.promote_ring(id, ring);
                        Next::Stay
                    }
                    Stage::Checking { .. } => Next::Stay,
                    Stage::ChecksFailed { at, .. } => {
                        if now.duration_since(at) < rp.check_retry.signed() {
                            return Next::Stay;
                        }
                        self.start_checks(&r, ring);
                        Next::Go(RolloutState::Active {
                            ring,
                            step,
                            stage: Stage::Checking { since: now },
                        })
                    }
                }
            }
            _ => Next::Stay,
        }
    }

    fn tally_of(&self, r: &Rollout, ring: &str, percent: Percent, now: Timestamp) -> Tally {
        let devices = self
            .shared
            .devices
            .read()
            .unwrap_or_else(|p| p.into_inner());
        tally(
            &devices,
            r,
            ring,
            percent,
            now,
            self.shared.policy.unresponsive_after.signed(),
        )
    }

    /// The first reached ring whose gate is crossed.
    fn crossed_gate(&self, r: &Rollout, now: Timestamp) -> Option<(usize, Tally)> {
        let policy = &self.shared.policy;
        let rings = self
            .shared
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .rings
            .clone();
        for name in &r.rings_reached {
            let idx = policy.ring_index(name)?;
            let percent = rings
                .get(name)
                .filter(|d| d.rollout_id == r.id)
                .map(|d| d.percent)
                .unwrap_or(Percent::FULL);
            let t = self.tally_of(r, name, percent, now);
            if gate_crossed(&t, &policy.rings[idx]) {
                return Some((idx, t));
            }
        }
        None
    }

    fn mark_passed(&mut self, id: &str, ring: &str, step: usize, now: Timestamp) {
        if let Some(r) = self.state().rollouts.get_mut(id) {
            if let Some(h) = r
                .history
                .iter_mut()
                .rev()
                .find(|h| h.ring == ring && h.step == step)
            {
                h.passed_at = Some(now);
            }
        }
    }

    fn publish_step(&mut self, r: &Rollout, ring: usize, step: usize, now: Timestamp) {
        let rp = self.shared.policy.rings[ring].clone();
        let percent = rp.steps[step];
        let activation = Activation {
            not_before: r.activate_at,
            windows: rp.windows.clone(),
            timezone: (!rp.windows.is_empty()).then(|| rp.timezone.clone()),
        };
        self.set_ring(
            &rp.name,
            &r.id,
            Action::Install,
            Some(r.release_id.clone()),
            percent,
            activation,
        );
        if let Some(rr) = self.state().rollouts.get_mut(&r.id) {
            if !rr.rings_reached.contains(&rp.name) {
                rr.rings_reached.push(rp.name.clone());
            }
            rr.history.push(StepRecord {
                ring: rp.name.clone(),
                step,
                percent,
                published_at: now,
                passed_at: None,
            });
        }
        let window = if rp.windows.is_empty() {
            String::new()
        } else {
            " (delivery window open)".into()
        };
        self.audit(Record::auto(
            "publish",
            &r.id,
            Some(&rp.name),
            format!("install {} at {percent}{window}", r.release_id),
        ));
        info!(rollout_id = %r.id, ring = %rp.name, %percent, "step published");
    }

    fn start_checks(&mut self, r: &Rollout, ring: usize) {
        let rp = self.shared.policy.rings[ring].clone();
        self.audit(Record::auto(
            "checks_started",
            &r.id,
            Some(&rp.name),
            format!("{} acceptance checks", rp.checks.len()),
        ));
        let tx = self.tx.clone();
        let (rollout, release) = (r.id.clone(), r.release_id.clone());
        tokio::spawn(async move {
            let outcome = checks::run_all(&rp.checks, &rp.name, &rollout, &release).await;
            let _ = tx
                .send(Command::ChecksDone {
                    rollout,
                    ring: rp.name,
                    outcome,
                })
                .await;
        });
    }

    /// A gate was crossed in ring `idx`: block the release, stop or roll back every ring it
    /// reached, and record why.
    fn halt(&mut self, r: &Rollout, idx: usize, t: &Tally) {
        let now = self.now();
        let rp = self.shared.policy.rings[idx].clone();
        // The devices `tally` counts as failed in this ring, each with what it said about
        // why. A bounded sample (by id) keeps a halt in a large ring from waiting on sled.
        const MAX_EVIDENCE: usize = 256;
        let mut failing: Vec<(String, Option<ErrorInfo>)> = {
            let devices = self
                .shared
                .devices
                .read()
                .unwrap_or_else(|p| p.into_inner());
            devices
                .values()
                .filter_map(|d| {
                    let rep = d.report.as_ref()?;
                    let ours = rep.target.as_ref().is_none_or(|x| {
                        x.name == r.release_name && x.sequence == r.release_sequence
                    });
                    (rep.ring == rp.name
                        && rep.rollout_id.as_deref() == Some(r.id.as_str())
                        && rep.phase.is_failure()
                        && ours)
                        .then(|| (d.id.clone(), rep.last_error.clone()))
                })
                .collect()
        };
        failing.sort_by(|a, b| a.0.cmp(&b.0));
        failing.truncate(MAX_EVIDENCE);
        let concerns = |e: &Event| {
            matches!(
                e.kind,
                EventKind::Reverted { .. } | EventKind::InstallFailed { .. }
            ) && (e.rollout_id.as_deref() == Some(r.id.as_str())
                || e.release
                    .as_ref()
                    .is_some_and(|x| x.name == r.release_name && x.sequence == r.release_sequence))
        };
        let evidence: Vec<FailureEvidence> = failing
            .iter()
            .map(|(device, last_error)| {
                let event = self
                    .shared
                    .store
                    .newest_device_event(device, concerns)
                    .unwrap_or_else(|e| {
                        warn!(device = %device, error = %e, "reading device events failed");
                        None
                    });
                FailureEvidence::from_device(
                    device,
                    event.as_ref().map(|x| &x.event),
                    last_error.as_ref(),
                )
            })
            .collect();
        let reason = halt_reason(&rp.name, t, rp.gate.max_failure_rate, &evidence);
        warn!(rollout_id = %r.id, ring = %rp.name, %reason, "halting rollout");
        let rollback_to = {
            let st = self.state();
            st.last_good
                .get(&r.release_name)
                .filter(|g| **g != r.release_id)
                .cloned()
        };
        let state = match (rp.on_failure, rollback_to) {
            (OnFailure::Rollback, Some(to)) => {
                let rb_id = format!("{}-rollback", r.id);
                for ring in &r.rings_reached {
                    let standing = self.state().rings.get(ring).map(|d| d.rollout_id.clone());
                    if standing.as_deref() == Some(r.id.as_str()) {
                        self.set_ring(
                            ring,
                            &rb_id,
                            Action::Install,
                            Some(to.clone()),
                            Percent::FULL,
                            Activation::default(),
                        );
                        self.audit(Record::auto(
                            "rollback",
                            &r.id,
                            Some(ring),
                            format!("ring sent back to {to}"),
                        ));
                    }
                }
                RolloutState::RolledBack {
                    reason: reason.clone(),
                    to,
                }
            }
            (on_failure, _) => {
                if on_failure == OnFailure::Rollback {
                    warn!(rollout_id = %r.id, "no completed release to roll back to; holding instead");
                }
                self.stop_rings(r, "gate crossed");
                RolloutState::Halted {
                    reason: reason.clone(),
                }
            }
        };
        {
            let mut st = self.state();
            if let Some(rel) = st.releases.get_mut(&r.release_id) {
                rel.blocked = Some(reason.clone());
            }
            if let Some(rr) = st.rollouts.get_mut(&r.id) {
                rr.state = state;
                rr.ended_at = Some(now);
            }
        }
        self.dirty = true;
        self.audit(Record::auto("halt", &r.id, Some(&rp.name), reason));
    }
}

/// Load the engine state from the store.
pub fn load_state(store: &crate::store::Store) -> Result<EngineState> {
    Ok(EngineState {
        releases: store
            .releases()?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect(),
        rollouts: store
            .rollouts()?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect(),
        rings: store
            .rings()?
            .into_iter()
            .map(|r| (r.ring.clone(), r))
            .collect(),
        pins: store
            .pins()?
            .into_iter()
            .filter_map(|p| Some((p.directive.device.clone()?, p)))
            .collect(),
        last_good: store.meta("last_good")?.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Gate, RingPolicy};
    use ringcast_proto::testkit;
    use ringcast_proto::{Dur, StateReport};

    fn ring(min: u32, rate: f64) -> RingPolicy {
        RingPolicy {
            name: "canary".into(),
            steps: vec![Percent::FULL],
            bake: Dur::secs(60),
            gate: Gate {
                min_reports: min,
                max_failure_rate: rate,
            },
            promotion: Promotion::Auto,
            windows: vec![],
            timezone: "UTC".into(),
            on_failure: OnFailure::Halt,
            checks: vec![],
            check_retry: Dur::secs(60),
        }
    }

    fn t(in_ramp: u32, reported: u32, committed: u32, failed: u32) -> Tally {
        Tally {
            devices: in_ramp,
            in_ramp,
            reported,
            committed,
            failed,
            pending: reported - committed - failed,
            unresponsive: 0,
        }
    }

    #[test]
    fn gate_crosses_only_above_the_rate_with_enough_evidence() {
        let r = ring(10, 0.2);
        assert!(!gate_crossed(&t(10, 10, 0, 2), &r), "2/10 is not above 0.2");
        assert!(gate_crossed(&t(10, 10, 0, 3), &r), "3/10 is");
        // Devices in the ramp that have not reported yet still bound the rate from below.
        assert!(gate_crossed(&t(10, 3, 0, 3), &r));
        assert!(
            !gate_crossed(&t(4, 4, 0, 4), &r),
            "fewer than min_reports devices"
        );
        assert!(!gate_crossed(&t(10, 10, 10, 0), &r));
    }

    #[test]
    fn gate_passes_needs_commits_not_installs() {
        let r = ring(3, 0.2);
        assert!(!gate_passes(&t(5, 5, 2, 0), &r, true));
        assert!(gate_passes(&t(5, 5, 3, 0), &r, true));
        // An intermediate step with one device in its ramp needs that one commit.
        assert!(gate_passes(&t(1, 1, 1, 0), &r, false));
        assert!(!gate_passes(&t(1, 1, 0, 0), &r, false));
        // The last step never passes on fewer than min_reports.
        assert!(!gate_passes(&t(1, 1, 1, 0), &r, true));
    }

    fn revert(device: &str, check: Option<&str>, output: Option<&str>) -> Event {
        Event {
            id: format!("{device}-0-9"),
            device: device.into(),
            at: testkit::now(),
            rollout_id: Some("r1".into()),
            release: None,
            kind: EventKind::Reverted {
                reason: "health_check_failed".into(),
                check: check.map(str::to_owned),
                output: output.map(str::to_owned),
            },
        }
    }

    fn evidence(device: &str, check: &str, output: &str) -> FailureEvidence {
        FailureEvidence::from_device(
            device,
            Some(&revert(device, Some(check), Some(output))),
            None,
        )
    }

    #[test]
    fn halt_reason_names_the_most_common_check_an_example_device_and_its_output() {
        let ev = [
            evidence("dev-7", "self-test", "exit 1\nboom\n"),
            evidence("dev-3", "self-test", "exit 1\nboom\n"),
        ];
        assert_eq!(
            halt_reason("canary", &t(2, 2, 0, 2), 0.2, &ev),
            "gate crossed in ring canary: 2 of 2 failed (rate 1.00 > 0.20); most common \
             failure: check \"self-test\" on 2 devices, e.g. dev-3: \"exit 1: boom\""
        );
    }

    #[test]
    fn halt_reason_counts_causes_and_prefers_any_cause_to_none() {
        let mut ev = vec![
            evidence("a", "http", "GET http://127.0.0.1/health answered 500"),
            evidence("b", "self-test", "exit 2"),
            evidence("c", "self-test", "exit 2"),
        ];
        // Five devices that said nothing about why outnumber both, but are not a cause.
        for d in ["u1", "u2", "u3", "u4", "u5"] {
            ev.push(FailureEvidence::from_device(d, None, None));
        }
        let r = halt_reason("canary", &t(10, 10, 2, 8), 0.2, &ev);
        assert!(
            r.ends_with(
                "; most common failure: check \"self-test\" on 2 of 8 devices, e.g. b: \"exit 2\""
            ),
            "{r}"
        );
        // A tie goes to the first cause in order, so the reason is the same on every run.
        let tie = [evidence("z", "b-check", "x"), evidence("y", "a-check", "y")];
        let r = halt_reason("canary", &t(2, 2, 0, 2), 0.2, &tie);
        assert!(
            r.contains("check \"a-check\" on 1 of 2 devices, e.g. y"),
            "{r}"
        );
        // Nothing but silence: said as such.
        let quiet = [FailureEvidence::from_device("q", None, None)];
        let r = halt_reason("canary", &t(1, 1, 0, 1), 0.0, &quiet);
        assert!(
            r.ends_with("most common failure: no reported cause on 1 device, e.g. q"),
            "{r}"
        );
        // No evidence at all: the tally alone, as before.
        assert_eq!(
            halt_reason("canary", &t(1, 1, 0, 1), 0.0, &[]),
            "gate crossed in ring canary: 1 of 1 failed (rate 1.00 > 0.00)"
        );
    }

    #[test]
    fn halt_reason_falls_back_to_the_reports_last_error() {
        let err = ErrorInfo {
            reason: "pre_activate_failed".into(),
            detail: "hook exited 3".into(),
        };
        let e = FailureEvidence::from_device("d1", None, Some(&err));
        assert_eq!(e.cause, FailureCause::Reason("pre_activate_failed".into()));
        assert_eq!(e.output.as_deref(), Some("hook exited 3"));
        let r = halt_reason("canary", &t(1, 1, 0, 1), 0.0, &[e]);
        assert!(
            r.ends_with("reason \"pre_activate_failed\" on 1 device, e.g. d1: \"hook exited 3\""),
            "{r}"
        );
        // A revert without a check names its reason, and borrows the report's detail when
        // the event carries no output.
        let e = FailureEvidence::from_device("d2", Some(&revert("d2", None, None)), Some(&err));
        assert_eq!(e.cause, FailureCause::Reason("health_check_failed".into()));
        assert_eq!(e.output.as_deref(), Some("hook exited 3"));
    }

    #[test]
    fn halt_reason_quotes_a_bounded_single_line_tail_of_the_output() {
        let noisy = format!(
            "exit 1\n{}\n\u{1b}[31mFATAL\u{1b}[0m \"quoted\" <img src=x onerror=alert(1)>\n\n",
            "progress line\n".repeat(200)
        );
        let r = halt_reason(
            "canary",
            &t(1, 1, 0, 1),
            0.0,
            &[evidence("d", "self-test", &noisy)],
        );
        let quoted = r.split(", e.g. d: ").nth(1).expect("output quoted");
        let tail: String = serde_json::from_str(quoted).expect("a quoted string");
        assert_eq!(tail.chars().count(), HALT_OUTPUT_CHARS);
        assert!(tail.starts_with('…'), "{tail}");
        assert!(
            tail.ends_with("FATAL [0m \"quoted\" <img src=x onerror=alert(1)>"),
            "the end is kept, escapes neutralised: {tail}"
        );
        assert!(!r.contains('\n') && !r.contains('\u{1b}'), "{r}");
    }

    #[test]
    fn silent_device_counts_unresponsive_never_success() {
        let now = testkit::now();
        let rollout = Rollout {
            id: "r1".into(),
            release_id: "app-2".into(),
            release_name: "app".into(),
            release_sequence: 2,
            created_at: now,
            start_at: None,
            activate_at: None,
            state: RolloutState::Pending,
            paused: false,
            approvals: BTreeMap::new(),
            rings_reached: vec![],
            history: vec![],
            ended_at: None,
            insight: Default::default(),
        };
        let rep = |phase| StateReport {
            device: "x".into(),
            seq: 0,
            ring: "canary".into(),
            device_class: "c".into(),
            agent_version: "t".into(),
            current: None,
            previous: None,
            target: None,
            phase,
            rollout_id: Some("r1".into()),
            last_error: None,
            windows: vec![],
            timezone: "UTC".into(),
            updated_at: now,
        };
        let old = now.checked_sub(SignedDuration::from_hours(3)).unwrap();
        let mut devices = HashMap::new();
        for (id, phase, seen) in [
            ("a", Phase::Probation, old),
            ("b", Phase::Probation, now),
            ("c", Phase::Committed, old),
            ("d", Phase::Reverted, now),
        ] {
            devices.insert(
                id.to_string(),
                DeviceRecord {
                    id: id.into(),
                    report: Some(rep(phase)),
                    last_seen: seen,
                    online: None,
                    last_event: None,
                },
            );
        }
        let tl = tally(
            &devices,
            &rollout,
            "canary",
            Percent::FULL,
            now,
            SignedDuration::from_hours(1),
        );
        assert_eq!(
            (
                tl.committed,
                tl.failed,
                tl.pending,
                tl.unresponsive,
                tl.reported
            ),
            (1, 1, 1, 1, 4)
        );
    }
}
