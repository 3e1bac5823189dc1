//! The rollout engine, as a pure decision core and a thin actor around it.
//!
//! - [`core`]: **decides**. `Core::handle(input, now, fleet) -> Decided`: no locks, no sled, no
//!   MQTT, no clock. Every rollout transition is an explicit arm; an input the state does not
//!   allow is an error. Tested in milliseconds with a fake clock and an in-memory fleet.
//! - [`effects`]: what it decides on ([`effects::Input`]: operator commands, timer ticks,
//!   check results, a reconnect) and what it asks for ([`effects::Effect`]: audit, publish,
//!   run checks) beside the records it changed ([`effects::Changes`]).
//! - [`actor`]: **does**. Owns the core; for each input it persists the changed records and
//!   the audit entries in ONE atomic sled transaction, flushes, and only then replies,
//!   publishes and runs checks (persist before acknowledging). It hands the API read
//!   snapshots of the state ([`Snapshot`]).
//! - [`fleet`], [`gate`], [`halt`], [`insight`]: what the core knows of the devices, the
//!   gates, why a rollout stops, delivery insight.
//! - [`forecast`]: when each device is predicted to commit a live rollout, and the rollout's
//!   step timeline; pure, read by the API (never by the core).
//!
//! Semantics (DESIGN.md "Controller"): rings are named, never positions; a step's bake starts
//! when its gate is first met and the gate must hold through it; only devices in the step's
//! ramp count; devices that refuse a directive count as `refused` and a step they make
//! unreachable halts; a step that cannot reach its gate within `step_timeout` ends; acceptance
//! checks get `check_attempts` runs; `on_new_release` chooses supersede or queue.
//!
//! Products: a rollout is of one product, its release name. Rollouts of different names run
//! on the same rings at once, each publishing on its product's topics and on the
//! single-product ones (which the newest rollout on a ring holds); supersede and queue stay
//! per name. A rollout counts a device only through its report for the rollout's product
//! ([`crate::model::DeviceRecord::report_for`]): a device running several products is in
//! each product's rollouts by that product's state, and in no rollout of a product it does
//! not run.

pub mod actor;
pub mod core;
pub mod effects;
pub mod fleet;
pub mod forecast;
pub mod gate;
pub mod halt;
pub mod insight;
#[cfg(test)]
mod tests;

pub use actor::Engine;
pub use gate::{gate_crossed, gate_met, tally};
pub use halt::{halt_reason, FailureCause, FailureEvidence, HALT_OUTPUT_CHARS};

use crate::audit::Record;
use crate::error::{Error, Result};
use crate::model::{directive_key, DevicePin, ReleaseRecord, RingDirective, Rollout};
use crate::shared::Shared;
use effects::{Input, Reply};
use jiff::Timestamp;
use ringcast_proto::Envelope;
use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use tokio::sync::{mpsc, oneshot};

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
    pub(crate) fn refused(
        &self,
        action: &str,
        ring: Option<&str>,
        detail: String,
        e: &Error,
    ) -> Record {
        Record {
            outcome: format!("refused: {}", e.code()),
            ..self.record(action, None, ring, format!("{detail}: {e}"))
        }
    }

    pub(crate) fn record(
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
    /// Store-scheduled activation: a launch (every ring pre-stages at the start).
    pub activate_at: Option<Timestamp>,
    /// With `activate_at`: how the rings activate (default ring by ring).
    pub launch: Option<crate::model::LaunchMode>,
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
    /// Ask the devices whose install failed to try again now (the next attempt).
    Retry,
}

impl RolloutAction {
    /// Name for the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutAction::Approve => "approve",
            RolloutAction::Pause => "pause",
            RolloutAction::Resume => "resume",
            RolloutAction::Abort => "abort",
            RolloutAction::Retry => "retry",
        }
    }
}

/// What the engine owns; readers (API, metrics) get snapshots of it ([`Snapshot`]).
#[derive(Debug, Default, Clone)]
pub struct EngineState {
    /// Releases by id.
    pub releases: BTreeMap<String, ReleaseRecord>,
    /// Rollouts by id.
    pub rollouts: BTreeMap<String, Rollout>,
    /// Standing ring directives by [`crate::model::directive_key`]: per ring, one for each
    /// product (release name) a rollout took there, on that product's topic (key
    /// `{ring}/{product}`), and the single-product one (key `{ring}`), which the newest
    /// rollout to publish on the ring holds, whatever its product (see [`core`]).
    pub rings: BTreeMap<String, RingDirective>,
    /// Standing per-device directives (pins, and the holds that ended them), keyed the same
    /// way by device: `{device}/{product}` and the single-product `{device}`.
    pub pins: BTreeMap<String, DevicePin>,
    /// Last completed release id per release name (rollback target).
    pub last_good: BTreeMap<String, String>,
}

impl EngineState {
    /// The ring directive rollout `r` stands in on `ring`: its product's, or (a record
    /// persisted before products) the single-product one, while `r` holds it.
    pub fn standing(&self, r: &Rollout, ring: &str) -> Option<&RingDirective> {
        [Some(r.release_name.as_str()), None]
            .into_iter()
            .find_map(|p| {
                self.rings
                    .get(&directive_key(ring, p))
                    .filter(|d| d.rollout_id == r.id)
            })
    }

    /// The pin standing on `device` for releases named `product`: its product record, or
    /// (persisted before products) a single-product pin to a release of that name.
    pub fn pin_of(&self, device: &str, product: &str) -> Option<&DevicePin> {
        let named = |p: &&DevicePin| {
            p.pinned_release()
                .and_then(|id| self.releases.get(id))
                .is_some_and(|r| r.release.name == product)
        };
        self.pins
            .get(&directive_key(device, Some(product)))
            .filter(|p| p.pinned_release().is_some())
            .or_else(|| self.pins.get(device).filter(named))
    }
}

/// The engine's state as last persisted, for readers: the actor replaces it after every
/// decision that changed something; a reader holds an `Arc` of one consistent version.
#[derive(Debug, Default)]
pub struct Snapshot(RwLock<Arc<EngineState>>);

impl Snapshot {
    /// A snapshot of `state`.
    pub fn new(state: EngineState) -> Snapshot {
        Snapshot(RwLock::new(Arc::new(state)))
    }

    /// The current version (the `Result` keeps the shape of a lock's `read`; it is never an
    /// error in practice: a writer only swaps an `Arc`).
    pub fn read(&self) -> std::result::Result<Arc<EngineState>, PoisonError<Arc<EngineState>>> {
        Ok(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Publish a new version.
    pub(crate) fn replace(&self, state: EngineState) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(state);
    }
}

/// A request to the actor: an input, and where the reply goes (commands only).
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) input: Input,
    pub(crate) reply: Option<oneshot::Sender<Result<Reply>>>,
}

/// The cloneable handle the API uses.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Request>,
}

fn unexpected(r: Reply) -> Error {
    Error::conflict("internal", format!("engine answered {r:?}"))
}

impl EngineHandle {
    async fn call(&self, input: Input) -> Result<Reply> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request {
                input,
                reply: Some(tx),
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Submit a release.
    pub async fn submit(&self, submit: Submit, actor: Actor) -> Result<(ReleaseRecord, Rollout)> {
        let (rec, rollout, _) = self.submit_with_warnings(submit, actor).await?;
        Ok((rec, rollout))
    }

    /// Submit a release; also the warnings for the operator (e.g. a ring too small for its
    /// gate).
    pub async fn submit_with_warnings(
        &self,
        submit: Submit,
        actor: Actor,
    ) -> Result<(ReleaseRecord, Rollout, Vec<String>)> {
        match self
            .call(Input::Submit {
                submit,
                actor,
                artifact_stored: false,
            })
            .await?
        {
            Reply::Submitted {
                release,
                rollout,
                warnings,
            } => Ok((release, rollout, warnings)),
            other => Err(unexpected(other)),
        }
    }

    /// Move a launch to `at`, or hold it (`None`): what devices staged stays staged.
    pub async fn launch(
        &self,
        rollout: String,
        at: Option<Timestamp>,
        actor: Actor,
    ) -> Result<Rollout> {
        match self.call(Input::Launch { rollout, at, actor }).await? {
            Reply::Rollout(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Act on a rollout.
    pub async fn act(
        &self,
        rollout: String,
        action: RolloutAction,
        ring: Option<String>,
        actor: Actor,
    ) -> Result<Rollout> {
        match self
            .call(Input::Act {
                rollout,
                action,
                ring,
                actor,
            })
            .await?
        {
            Reply::Rollout(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Unblock a release.
    pub async fn unblock(&self, release: String, actor: Actor) -> Result<ReleaseRecord> {
        match self.call(Input::Unblock { release, actor }).await? {
            Reply::Release(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Pin `device` to release `release`.
    pub async fn pin(&self, device: String, release: String, actor: Actor) -> Result<DevicePin> {
        match self
            .call(Input::Pin {
                device,
                release,
                actor,
            })
            .await?
        {
            Reply::Pin(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// End `device`'s pin (its only standing one).
    pub async fn unpin(&self, device: String, actor: Actor) -> Result<DevicePin> {
        self.unpin_product(device, None, actor).await
    }

    /// End `device`'s pin for `product` (`None`: its only standing one).
    pub async fn unpin_product(
        &self,
        device: String,
        product: Option<String>,
        actor: Actor,
    ) -> Result<DevicePin> {
        match self
            .call(Input::Unpin {
                device,
                product,
                actor,
            })
            .await?
        {
            Reply::Pin(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// Tell the engine the broker connection is fresh.
    pub fn reconnected(&self) {
        let _ = self.tx.try_send(Request {
            input: Input::Reconnected,
            reply: None,
        });
    }
}

/// Create the engine and its handle (the task is started with [`Engine::run`]).
pub fn engine(shared: Arc<Shared>) -> Result<(Engine, EngineHandle)> {
    let (tx, rx) = mpsc::channel(256);
    let engine = Engine::new(shared, rx, tx.clone())?;
    Ok((engine, EngineHandle { tx }))
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
        // Records persisted before products have none: they load as the single-product ones.
        rings: store.rings()?.into_iter().map(|r| (r.key(), r)).collect(),
        pins: store
            .pins()?
            .into_iter()
            .filter(|p| p.directive.device.is_some())
            .map(|p| (p.directive.key(), p))
            .collect(),
        last_good: store.meta("last_good")?.unwrap_or_default(),
    })
}
