//! What the decision core asks for, and what it is asked: the inputs it takes and the effects
//! and state changes it returns. The actor persists the changes and the audit records in one
//! atomic write, and only then replies, publishes and runs checks.

use super::{Actor, RolloutAction, Submit};
use crate::audit::Record;
use crate::config::Check;
use crate::error::Result;
use crate::model::{DevicePin, ReleaseRecord, Rollout};
use jiff::Timestamp;
use std::collections::BTreeSet;

/// What the core decides on.
#[derive(Debug)]
pub enum Input {
    /// The engine starts: reconcile the policy with what was persisted (rings by name),
    /// republish what should stand, warn about rings too small for their gate.
    Start,
    /// Time passed or reports arrived: evaluate every live rollout, re-sign what is due.
    Tick,
    /// The broker connection is fresh: republish what should stand.
    Reconnected,
    /// An operator submits a release.
    Submit {
        /// What.
        submit: Submit,
        /// Who.
        actor: Actor,
        /// Whether the artifact the release points at is in the controller's store (a fact
        /// the actor looks up: the core touches no files).
        artifact_stored: bool,
    },
    /// Approve, pause, resume, abort.
    Act {
        /// Rollout id.
        rollout: String,
        /// What.
        action: RolloutAction,
        /// Ring (approve only).
        ring: Option<String>,
        /// Who.
        actor: Actor,
    },
    /// Move or hold a launch.
    Launch {
        /// Rollout id.
        rollout: String,
        /// The new launch time; `None` holds the launch.
        at: Option<Timestamp>,
        /// Who.
        actor: Actor,
    },
    /// Unblock a halted release.
    Unblock {
        /// Release id.
        release: String,
        /// Who.
        actor: Actor,
    },
    /// Pin a device to a release.
    Pin {
        /// Device.
        device: String,
        /// Release id.
        release: String,
        /// Who.
        actor: Actor,
    },
    /// End a device's pin.
    Unpin {
        /// Device.
        device: String,
        /// The product whose pin ends (`None`: the device's only standing pin).
        product: Option<String>,
        /// Who.
        actor: Actor,
    },
    /// A run of acceptance checks finished.
    ChecksDone {
        /// Rollout.
        rollout: String,
        /// Ring.
        ring: String,
        /// Which attempt.
        attempt: u32,
        /// Outcome: the first failing check and why.
        outcome: std::result::Result<(), String>,
    },
}

/// Something to do once the state it follows from is persisted.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Append to the audit log (in the same atomic write as the state).
    Audit(Record),
    /// Publish retained at QoS 1 (an empty payload clears the retained message).
    Publish {
        /// Topic.
        topic: String,
        /// Payload.
        payload: Vec<u8>,
    },
    /// Run a ring's acceptance checks; the result comes back as [`Input::ChecksDone`].
    RunChecks {
        /// Rollout.
        rollout: String,
        /// Ring.
        ring: String,
        /// Release id.
        release: String,
        /// Which attempt.
        attempt: u32,
        /// The ring's checks.
        checks: Vec<Check>,
        /// The ring's devices (checks receive the list).
        devices: Vec<String>,
    },
}

/// Records changed by a decision (persisted by the actor, nothing else).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Releases by id.
    pub releases: BTreeSet<String>,
    /// Rollouts by id.
    pub rollouts: BTreeSet<String>,
    /// Ring directives by key ([`crate::model::directive_key`]).
    pub rings: BTreeSet<String>,
    /// Device directives by key (written, or deleted when no longer standing).
    pub pins: BTreeSet<String>,
    /// The last completed release per name.
    pub last_good: bool,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.releases.is_empty()
            && self.rollouts.is_empty()
            && self.rings.is_empty()
            && self.pins.is_empty()
            && !self.last_good
    }
}

/// The answer to an operator command.
// One value per command, moved once and never stored: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Reply {
    /// Submitted: the release, its rollout, and warnings for the operator.
    Submitted {
        /// Release.
        release: ReleaseRecord,
        /// Rollout.
        rollout: Rollout,
        /// E.g. a ring with fewer devices than its gate needs.
        warnings: Vec<String>,
    },
    /// A rollout after an action.
    Rollout(Rollout),
    /// A release after unblocking.
    Release(ReleaseRecord),
    /// A device's standing directive after pin or unpin.
    Pin(DevicePin),
    /// Inputs that are not commands.
    Done,
}

/// What one input decided.
#[derive(Debug)]
pub struct Decided {
    /// In order: audit records are appended in this order.
    pub effects: Vec<Effect>,
    /// What to persist.
    pub changes: Changes,
    /// The reply (for commands; `Ok(Reply::Done)` otherwise).
    pub reply: Result<Reply>,
}
