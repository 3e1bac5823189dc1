//! The records the controller keeps: releases, rollouts (with their state machine's state),
//! ring directives and devices. All serialisable: they live in sled.

use jiff::Timestamp;
use ringcast_proto::{Activation, Envelope, Event, Percent, Release, StateReport};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// A submitted, verified release.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseRecord {
    /// `{name}-{sequence}`.
    pub id: String,
    /// The verified manifest.
    pub release: Release,
    /// The envelope as submitted (embedded whole in directives).
    pub envelope: Envelope,
    /// When it arrived.
    pub submitted_at: Timestamp,
    /// Token name that submitted it.
    pub submitted_by: String,
    /// Halted releases are never offered again unless unblocked.
    #[serde(default)]
    pub blocked: Option<String>,
}

/// Where a rollout is in its life cycle (DESIGN.md "Rollout life cycle").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RolloutState {
    /// Waiting behind a running rollout of the same name (a ring is `manual`).
    Queued,
    /// Waiting for its scheduled start.
    Pending,
    /// Walking the rings.
    Active {
        /// The ring, by name: an edited policy can remove it (the rollout then stops), never
        /// move the rollout to another ring. (Rollouts persisted by older versions named it by
        /// position; those load as `#{index}` and are resolved once against the policy.)
        #[serde(deserialize_with = "ring_name_or_index")]
        ring: String,
        /// Index of the step in the ring.
        step: usize,
        /// What it waits for.
        stage: Stage,
    },
    /// Every ring done.
    Completed,
    /// A gate was crossed; `hold` published.
    Halted {
        /// Why.
        reason: String,
    },
    /// A gate was crossed; rings sent back to the last completed release.
    RolledBack {
        /// Why.
        reason: String,
        /// Release id rolled back to.
        to: String,
    },
    /// Stopped by an operator.
    Aborted,
    /// Replaced by a newer release of the same name.
    Superseded {
        /// The rollout that replaced it.
        by: String,
    },
}

/// A legacy ring index (`#{n}`) or a ring name.
fn ring_name_or_index<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Ring {
        Name(String),
        Index(usize),
    }
    Ok(match Ring::deserialize(d)? {
        Ring::Name(n) => n,
        Ring::Index(i) => format!("{LEGACY_RING_PREFIX}{i}"),
    })
}

/// How a rollout persisted with a ring *index* (before rings were named) names its ring until
/// the engine resolves it against the policy at start-up. `#` is in no valid ring name.
pub const LEGACY_RING_PREFIX: &str = "#";

/// The stage within one ring step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// Outside the ring's delivery windows.
    WaitingWindow,
    /// A `manual` ring not yet approved.
    WaitingApproval,
    /// The step's directive is out (since `since`); devices install, and the step waits for
    /// its gate (enough devices of the ramp committed, failures under the limit).
    Publishing {
        /// When the step's directive was published.
        since: Timestamp,
    },
    /// The gate is met (since `since`) and must hold for the ring's `bake`.
    Baking {
        /// When the gate was (last) met: the bake counts from here.
        since: Timestamp,
        /// When the step's directive was published (for `step_timeout`).
        #[serde(default)]
        published: Option<Timestamp>,
    },
    /// Acceptance checks running.
    Checking {
        /// When they started.
        since: Timestamp,
        /// Which attempt this is (1, 2, …, up to the ring's `check_attempts`).
        #[serde(default = "first_attempt")]
        attempt: u32,
    },
    /// Acceptance checks failed; tried again after the ring's `check_retry`.
    ChecksFailed {
        /// When they failed.
        at: Timestamp,
        /// Which check, and why.
        detail: String,
        /// The attempt that failed.
        #[serde(default = "first_attempt")]
        attempt: u32,
    },
}

fn first_attempt() -> u32 {
    1
}

impl RolloutState {
    /// Whether the rollout is still running (including queued and pending).
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            RolloutState::Queued | RolloutState::Pending | RolloutState::Active { .. }
        )
    }

    /// A short `snake_case` phase name for tables and metrics.
    pub fn phase(&self) -> &'static str {
        match self {
            RolloutState::Queued => "queued",
            RolloutState::Pending => "pending",
            RolloutState::Active { stage, .. } => match stage {
                Stage::WaitingWindow => "waiting_window",
                Stage::WaitingApproval => "waiting_approval",
                Stage::Publishing { .. } => "publishing",
                Stage::Baking { .. } => "baking",
                Stage::Checking { .. } => "checking",
                Stage::ChecksFailed { .. } => "checks_failed",
            },
            RolloutState::Completed => "completed",
            RolloutState::Halted { .. } => "halted",
            RolloutState::RolledBack { .. } => "rolled_back",
            RolloutState::Aborted => "aborted",
            RolloutState::Superseded { .. } => "superseded",
        }
    }
}

/// An approval of a `manual` ring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// Token name.
    pub by: String,
    /// When.
    pub at: Timestamp,
}

/// One step published (for lead-time insight and restart checks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Ring name.
    pub ring: String,
    /// Step index.
    pub step: usize,
    /// Percent.
    pub percent: Percent,
    /// When its directive was first published.
    pub published_at: Timestamp,
    /// When the step passed its gate.
    #[serde(default)]
    pub passed_at: Option<Timestamp>,
}

/// A rollout of one release through the rings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollout {
    /// Id (also the ramp seed).
    pub id: String,
    /// Release id.
    pub release_id: String,
    /// Release name (supersede/queue are per name).
    pub release_name: String,
    /// Release sequence.
    pub release_sequence: u64,
    /// When it was created.
    pub created_at: Timestamp,
    /// Scheduled start.
    #[serde(default)]
    pub start_at: Option<Timestamp>,
    /// Store-scheduled activation (`activation.not_before`).
    #[serde(default)]
    pub activate_at: Option<Timestamp>,
    /// State machine state.
    pub state: RolloutState,
    /// Paused by an operator (gates still halt).
    #[serde(default)]
    pub paused: bool,
    /// Approvals per ring name.
    #[serde(default)]
    pub approvals: BTreeMap<String, Approval>,
    /// Rings whose directive carries this rollout's release.
    #[serde(default)]
    pub rings_reached: Vec<String>,
    /// Steps published so far.
    #[serde(default)]
    pub history: Vec<StepRecord>,
    /// When it ended (completed, halted, …).
    #[serde(default)]
    pub ended_at: Option<Timestamp>,
    /// Per ring reached, the tally as it was when the rollout ended: what its view shows from
    /// then on (its devices move on to later releases). Empty while live, and for rollouts
    /// that ended before the field.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub final_tallies: BTreeMap<String, Tally>,
    /// Delivery insight: when half, then all, of the compatible fleet ran the release.
    #[serde(default)]
    pub insight: RolloutInsight,
    /// Retry state per ring it reached (rings without an entry are at attempt 1 of 1).
    #[serde(default)]
    pub attempts: BTreeMap<String, RingAttempt>,
    /// Set for a launch (a rollout with `activate_at`): every ring pre-stages at the start.
    #[serde(default)]
    pub launch: Option<Launch>,
}

/// How a launch's rings activate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaunchMode {
    /// The first ring at the launch time, each further ring when the one before it passes
    /// its gate (as any rollout); every ring has downloaded and verified it beforehand.
    #[default]
    Rings,
    /// Every ring at the launch time; the gates still halt it ring by ring.
    All,
}

/// A launch: pre-staged rings, activated at `activate_at` (moved or held by an operator).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// How the rings activate.
    #[serde(default)]
    pub mode: LaunchMode,
    /// Cancelled by an operator: nothing activates until a new launch time is set; what
    /// devices staged stays staged.
    #[serde(default)]
    pub held: bool,
    /// Rings pre-staged ahead of their turn (their directive holds activation until then).
    #[serde(default)]
    pub prestaged: Vec<String>,
}

/// The `not_before` of a directive that may be staged but not activated yet: later than any
/// launch (devices keep the download, verified, and wait for a re-signed directive).
pub const HELD: Timestamp = Timestamp::MAX;

/// Where a ring is in its attempts for a rollout: the directive's `attempt`, how many the
/// ring allows (1 + `retries`, raised by an operator's `retry`), and when the attempt began.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingAttempt {
    /// The attempt the ring's directive carries.
    pub attempt: u32,
    /// Attempts allowed before a failure counts as one.
    pub max: u32,
    /// When `attempt` was published.
    pub at: Timestamp,
}

impl RingAttempt {
    /// Whether a device that failed at `attempt` will get (or already has) another one.
    pub fn will_retry(&self, failed_at: u32) -> bool {
        failed_at < self.max.max(self.attempt)
    }
}

/// Timestamps the engine records for delivery insight (DESIGN.md "Delivery insight").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutInsight {
    /// Half of the compatible fleet committed.
    #[serde(default)]
    pub fleet_half_at: Option<Timestamp>,
    /// All of the compatible fleet committed.
    #[serde(default)]
    pub fleet_full_at: Option<Timestamp>,
    /// After a halt: no device runs the bad release or works on it any more.
    #[serde(default)]
    pub restored_at: Option<Timestamp>,
}

/// The key of a standing directive in the engine's tables and in the store: the ring (or, for
/// a device's directive, the device) alone for the single-product topic, as every record
/// persisted before products was keyed, and `{ring}/{product}` (`{device}/{product}`) for a
/// product's topic. Names never hold a `/`, so the two kinds of key cannot meet, and a record
/// from before products loads as the single-product one.
pub fn directive_key(scope: &str, product: Option<&str>) -> String {
    match product {
        None => scope.to_owned(),
        Some(p) => format!("{scope}/{p}"),
    }
}

/// The directive currently standing on a ring topic (re-signed before expiry).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RingDirective {
    /// Ring.
    pub ring: String,
    /// Set on a per-device directive (a pin): published on `…/devices/{device}/directive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Set on a product's directive (a release name): published on
    /// `…/rings/{ring}/products/{product}/directive` (or the device's product topic) and
    /// signed with it. `None`: the single-product topic, which agents without products read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// Rollout id in the directive (ramp seed).
    pub rollout_id: String,
    /// `install` or `hold`.
    pub action: ringcast_proto::Action,
    /// Release id for `install`.
    pub release_id: Option<String>,
    /// Ramp.
    pub percent: Percent,
    /// Activation constraints.
    pub activation: Activation,
    /// Last sequence signed on this topic.
    pub sequence: u64,
    /// When last signed.
    pub issued_at: Timestamp,
    /// When the last signature expires.
    pub expires_at: Timestamp,
}

impl RingDirective {
    /// Its key in the engine's tables and the store ([`directive_key`]).
    pub fn key(&self) -> String {
        directive_key(
            self.device.as_deref().unwrap_or(&self.ring),
            self.product.as_deref(),
        )
    }
}

/// The directive the controller keeps standing on one device's topic: a pin, or the `hold`
/// that ended one (kept and re-signed too, so a device offline at unpin time still hears it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicePin {
    /// What is signed (its `device` is set; `ring` is the device's ring when pinned).
    pub directive: RingDirective,
    /// Token name that set the pin or ended it (`controller` when a ring rollout ended it).
    pub by: String,
    /// When it was set or ended.
    pub at: Timestamp,
    /// The ring's standing rollout when pinned: a ring directive for any other rollout ends
    /// the pin on the device, so the controller ends it too (and stops re-signing it).
    #[serde(default)]
    pub ring_rollout: Option<String>,
    /// Pins issued to this device so far (numbers their rollout ids).
    pub issued: u64,
    /// Why the last pin ended, while it stands as a hold.
    #[serde(default)]
    pub ended: Option<String>,
}

impl DevicePin {
    /// The release the device is pinned to, if the pin stands.
    pub fn pinned_release(&self) -> Option<&str> {
        match self.directive.action {
            ringcast_proto::Action::Install => self.directive.release_id.as_deref(),
            ringcast_proto::Action::Hold => None,
        }
    }
}

/// What the controller knows about a device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Device id (from the topic the broker authorised).
    pub id: String,
    /// Latest state report.
    pub report: Option<StateReport>,
    /// Controller time the latest *changed* report arrived.
    pub last_seen: Timestamp,
    /// Online flag (`…/online`).
    #[serde(default)]
    pub online: Option<bool>,
    /// Latest event (the newest of its history, which the store keeps apart: see
    /// [`EventEntry`]).
    #[serde(default)]
    pub last_event: Option<Event>,
}

/// One device event as the controller keeps it in the device's bounded history: what the
/// device sent, numbered in the order it arrived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEntry {
    /// Arrival number on this device: one more per new event, kept across restarts.
    pub seq: u64,
    /// Controller time the event arrived.
    pub received_at: Timestamp,
    /// The event as the device sent it (`id`, `at`, `event` and the kind's fields, such as a
    /// revert's `reason`, `check` and `output`).
    #[serde(flatten)]
    pub event: Event,
}

impl DeviceRecord {
    /// Its latest report as it concerns releases named `product`
    /// ([`StateReport::for_product`]): the report itself from an agent without products
    /// (borrowed: nothing is copied), that product's entry from one running several, `None`
    /// when it has not reported or does not run the product (then it is not part of that
    /// product's rollouts at all).
    pub fn report_for(&self, product: &str) -> Option<Cow<'_, StateReport>> {
        self.report.as_ref()?.for_product(product)
    }

    /// A device first heard of at `now`, with nothing known about it yet.
    pub fn new(id: String, now: Timestamp) -> DeviceRecord {
        DeviceRecord {
            id,
            report: None,
            last_seen: now,
            online: None,
            last_event: None,
        }
    }
}

/// Counts for one ring of one rollout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Devices known in the ring.
    pub devices: u32,
    /// Known devices inside the current step's ramp: the only ones counted below.
    pub in_ramp: u32,
    /// Devices of the ramp that reported for this rollout.
    pub reported: u32,
    /// `committed`.
    pub committed: u32,
    /// `reverting` / `reverted` / `failed` of this release.
    pub failed: u32,
    /// Devices of the ramp that refused the rollout's directive (e.g. `rollback_floor`,
    /// `incompatible`): never pending, never a success.
    #[serde(default)]
    pub refused: u32,
    /// Devices of the ramp whose install failed at an attempt the ring will retry: neither
    /// a failure nor a success yet.
    #[serde(default)]
    pub retrying: u32,
    /// Reported, not finished, still talking.
    pub pending: u32,
    /// Reported, not finished, silent past the timeout.
    pub unresponsive: u32,
    /// Devices of the ramp whose defer hook said "not now" (battery low, user active) for
    /// the rollout's release: not committed, not failed, not pending. The step waits for
    /// them (until their deadline passes and they install) or its `step_timeout` ends it.
    #[serde(default)]
    pub deferred: u32,
}

impl Tally {
    /// Failure rate over the evidence the gate considers.
    pub fn failure_rate(&self) -> f64 {
        let denom = self.reported.max(self.in_ramp);
        if denom == 0 {
            0.0
        } else {
            f64::from(self.failed) / f64::from(denom)
        }
    }
}
