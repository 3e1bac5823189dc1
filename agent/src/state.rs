//! What the agent persists, and its state machine (DESIGN.md "Agent state machine").
//!
//! The phase is [`ringcast_proto::Phase`]; [`transition`] is the one place that says which
//! step may move it where, as an explicit `match (step, phase)` with a catch-all error. The
//! agent persists the new state, then performs the effects.

use jiff::Timestamp;
use ringcast_proto::directive::Activation;
use ringcast_proto::release::{InstallKind, Release};
use ringcast_proto::report::ErrorInfo;
use ringcast_proto::{Directive, EventKind, Phase, ReleaseRef};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Steps that move the phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A directive (in the ramp, not yet installed) starts or replaces work.
    Start,
    /// The body arrived in full; checking size and digest.
    BodyComplete,
    /// A download attempt failed; it will be retried.
    DownloadFailed,
    /// Size and digest match; the artifact is staged.
    Verified,
    /// The defer hook answered "not now".
    Defer,
    /// `not_before` passed, a window is open, and the defer hook (if any) did not object.
    Activate,
    /// Activated; probation begins.
    Activated,
    /// The install failed before anything changed (e.g. `pre_activate` failed).
    InstallFailed,
    /// Health failed, too many restarts, or activation broke half-way: go back.
    Revert,
    /// The revert is done.
    RevertDone,
    /// Healthy through probation.
    ProbationPassed,
    /// A hold or a superseding directive stops work that has not activated yet.
    Cancel,
    /// Deferred, but activation is no longer allowed (a window closed, `not_before` moved) or
    /// the deferral no longer applies (another rollout took the job): back to waiting.
    Restage,
}

/// A step that is not allowed in a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("step {step:?} is not allowed in phase {phase:?}")]
pub struct Disallowed {
    /// The step.
    pub step: Step,
    /// The phase.
    pub phase: Phase,
}

/// The transition table.
pub fn transition(step: Step, phase: Phase) -> Result<Phase, Disallowed> {
    use Phase::*;
    let next = match (step, phase) {
        (
            Step::Start,
            Idle | Committed | Reverted | Failed | Downloading | Verifying | Staged | Deferred,
        ) => Downloading,
        (Step::BodyComplete, Downloading) => Verifying,
        (Step::DownloadFailed, Downloading | Verifying) => Downloading,
        (Step::Verified, Verifying) => Staged,
        (Step::Defer, Staged | Deferred) => Deferred,
        (Step::Restage, Deferred) => Staged,
        (Step::Activate, Staged | Deferred) => Installing,
        (Step::Activated, Installing) => Probation,
        (Step::InstallFailed, Installing) => Failed,
        (Step::Revert, Installing | Probation | Reverting) => Reverting,
        (Step::RevertDone, Reverting) => Reverted,
        (Step::ProbationPassed, Probation) => Committed,
        (Step::Cancel, Downloading | Verifying | Staged | Deferred) => Idle,
        (step, phase) => return Err(Disallowed { step, phase }),
    };
    Ok(next)
}

/// Whether the phase has work under way (the agent must keep going to finish it).
pub fn is_busy(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Downloading
            | Phase::Verifying
            | Phase::Installing
            | Phase::Probation
            | Phase::Reverting
    )
}

/// Whether activation has begun, so a new directive must wait for this job to end.
pub fn is_activated(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Installing | Phase::Probation | Phase::Reverting
    )
}

/// Why work that had not activated was dropped. Reported as `held` (a hold) or as
/// `cancelled` with [`CancelReason::code`] (docs/operations.md lists the codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// A ring or device `hold`, or no directive left to follow (a device hold with no ring
    /// directive).
    Held,
    /// The directive installs the release the device already runs (a ring rolled back).
    AlreadyCurrent,
    /// The directive names another release; a job for it starts instead.
    Superseded,
    /// The directive names a release that failed here in its rollout.
    FailedBefore,
    /// The directive is for a ramp this device is not in (yet).
    NotInRamp,
}

impl CancelReason {
    /// Every reason, for tests and docs.
    pub const ALL: [CancelReason; 5] = [
        CancelReason::Held,
        CancelReason::AlreadyCurrent,
        CancelReason::Superseded,
        CancelReason::FailedBefore,
        CancelReason::NotInRamp,
    ];

    /// Stable `snake_case` code.
    pub fn code(self) -> &'static str {
        match self {
            CancelReason::Held => "held",
            CancelReason::AlreadyCurrent => "already_current",
            CancelReason::Superseded => "superseded",
            CancelReason::FailedBefore => "failed_before",
            CancelReason::NotInRamp => "not_in_ramp",
        }
    }

    /// The event that reports it: holds keep their `held` event.
    pub fn event(self) -> EventKind {
        match self {
            CancelReason::Held => EventKind::Held,
            other => EventKind::Cancelled {
                reason: other.code().to_owned(),
            },
        }
    }
}

/// What the directive the device follows asks for, as [`plan`] needs it.
#[derive(Debug, Clone, Copy)]
pub enum Ask<'a> {
    /// No directive to follow (none kept, or a device hold ended a pin and the ring has said
    /// nothing yet).
    Nothing,
    /// A `hold`.
    Hold,
    /// An `install` of `release`; `in_ramp` is false for a ring directive whose ramp leaves
    /// this device out.
    Install {
        /// The release.
        release: &'a Release,
        /// Whether this device is in the ramp (always true for a device directive).
        in_ramp: bool,
    },
}

/// What the agent does about a directive (decided by [`plan`], performed by the agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Nothing changes.
    Nothing,
    /// A hold with nothing to cancel: report it.
    NoteHold,
    /// The job's release is asked for again: it takes the directive's rollout and activation.
    Update,
    /// Activated work finishes first (commit or revert); the directive is looked at again then.
    Wait,
    /// Drop the job that has not activated; the device goes idle on what it runs.
    Cancel(CancelReason),
    /// Start a job for the directive's release (a job that has not activated is dropped first,
    /// reported as [`CancelReason::Superseded`]).
    Start,
}

fn same_release(a: &Release, b: &Release) -> bool {
    a.name == b.name && a.sequence == b.sequence
}

/// Decide what the followed directive asks of the device, given its work under way: pure, so
/// every cancel path is a row of this function and tested without a broker.
///
/// `failed_before`: the directive's release failed here in the directive's rollout.
pub fn plan(
    ask: Ask<'_>,
    job: Option<&Job>,
    phase: Phase,
    current: Option<&ReleaseRef>,
    failed_before: bool,
) -> Plan {
    // Work in these phases can still be dropped (`Step::Cancel`); later, it must finish.
    let cancellable = transition(Step::Cancel, phase).is_ok();
    let cancel_or = |reason, otherwise| {
        if cancellable {
            Plan::Cancel(reason)
        } else {
            otherwise
        }
    };
    let (release, in_ramp) = match ask {
        Ask::Nothing => return cancel_or(CancelReason::Held, Plan::Nothing),
        Ask::Hold => return cancel_or(CancelReason::Held, Plan::NoteHold),
        Ask::Install { release, in_ramp } => (release, in_ramp),
    };
    if !in_ramp {
        // Work the ring no longer asks of this device: another release, or a pin that ended.
        // The same release from the ring keeps going (a ramp never shrinks under a device).
        return match job {
            Some(j) if j.origin == Origin::Device || !same_release(&j.release, release) => {
                cancel_or(CancelReason::NotInRamp, Plan::Nothing)
            }
            _ => Plan::Nothing,
        };
    }
    if let Some(j) = job {
        if same_release(&j.release, release) {
            return Plan::Update;
        }
        if is_activated(phase) {
            return Plan::Wait;
        }
    }
    if current.is_some_and(|c| c.name == release.name && c.sequence == release.sequence) {
        return cancel_or(CancelReason::AlreadyCurrent, Plan::Nothing);
    }
    if failed_before {
        return cancel_or(CancelReason::FailedBefore, Plan::Nothing);
    }
    Plan::Start
}

/// An installed release and where it lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Installed {
    /// Which release.
    pub release: ReleaseRef,
    /// How it was installed.
    pub kind: InstallKind,
    /// Bundle: its release directory. File: the backup of this version kept for revert (for
    /// the current release, the target path). Command: the artifact handed to the installer.
    pub location: PathBuf,
    /// Bundle/file: the directory a health check sees as `{release_dir}`.
    pub release_dir: PathBuf,
}

/// Where a directive came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The ring's directive topic.
    Ring,
    /// This device's directive topic.
    Device,
}

/// An accepted directive, kept so it can be re-evaluated after a job ends or a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kept {
    /// The verified directive.
    pub directive: Directive,
    /// The verified release.
    pub release: Option<Release>,
}

/// Evidence of a revert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevertCause {
    /// Stable code: `health_check_failed`, `too_many_restarts`, `post_activate_failed`, …
    pub reason: String,
    /// Which check failed.
    pub check: Option<String>,
    /// Tail of its output.
    pub output: Option<String>,
}

/// Work on one release, from download to commit or revert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Rollout it belongs to.
    pub rollout_id: String,
    /// Which directive topic asked for it.
    pub origin: Origin,
    /// The verified release.
    pub release: Release,
    /// When it may be activated.
    pub activation: Activation,
    /// Failed download attempts so far.
    pub attempts: u32,
    /// No new download attempt before this instant.
    pub retry_at: Option<Timestamp>,
    /// The verified artifact once staged.
    pub artifact: Option<PathBuf>,
    /// `current` before activation (restored on revert).
    pub before_current: Option<Installed>,
    /// `previous` before activation (restored on revert).
    pub before_previous: Option<Installed>,
    /// When probation began.
    pub probation_started: Option<Timestamp>,
    /// Next health round.
    pub next_round_at: Option<Timestamp>,
    /// Failed health rounds.
    pub failures: u32,
    /// Passed health rounds.
    pub rounds_ok: u32,
    /// Agent restarts while installing or in probation.
    pub restarts: u32,
    /// Why it is being reverted.
    pub revert_cause: Option<RevertCause>,
    /// Staged ahead of the device's ramp step (the directive's `stage_percent` takes the
    /// device in, its `percent` not yet): download and verify, never activate.
    #[serde(default)]
    pub stage_only: bool,
}

impl Job {
    /// A new job for an accepted release.
    pub fn new(
        rollout_id: String,
        origin: Origin,
        release: Release,
        activation: Activation,
    ) -> Job {
        Job {
            rollout_id,
            origin,
            release,
            activation,
            attempts: 0,
            retry_at: None,
            artifact: None,
            before_current: None,
            before_previous: None,
            probation_started: None,
            next_round_at: None,
            failures: 0,
            rounds_ok: 0,
            restarts: 0,
            revert_cause: None,
            stage_only: false,
        }
    }

    /// The release as reports name it.
    pub fn target(&self) -> ReleaseRef {
        release_ref(&self.release)
    }
}

/// A release's report name.
pub fn release_ref(r: &Release) -> ReleaseRef {
    ReleaseRef {
        name: r.name.clone(),
        version: r.version.to_string(),
        sequence: r.sequence,
    }
}

/// A release that failed here in a rollout, and at which attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failed {
    /// Rollout.
    pub rollout_id: String,
    /// Release name.
    pub name: String,
    /// Release sequence.
    pub sequence: u64,
    /// The directive attempt it failed at.
    pub attempt: u32,
}

impl<'de> Deserialize<'de> for Failed {
    /// Today's form, or the `[rollout_id, name, sequence]` of agents from before retries
    /// (attempt 1).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Failed, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Full {
                rollout_id: String,
                name: String,
                sequence: u64,
                attempt: u32,
            },
            Old(String, String, u64),
        }
        Ok(match Form::deserialize(d)? {
            Form::Full {
                rollout_id,
                name,
                sequence,
                attempt,
            } => Failed {
                rollout_id,
                name,
                sequence,
                attempt,
            },
            Form::Old(rollout_id, name, sequence) => Failed {
                rollout_id,
                name,
                sequence,
                attempt: 1,
            },
        })
    }
}

/// Everything the agent persists (besides the trust root, kept under its own key as the
/// envelope bytes it was verified from).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Persisted {
    /// Last directive sequence accepted on the ring topic.
    pub last_seq_ring: Option<u64>,
    /// Last directive sequence accepted on the device topic.
    pub last_seq_device: Option<u64>,
    /// Highest `rollback_floor` among committed releases.
    pub rollback_floor: u64,
    /// `max(local clock, newest verified issued_at)`.
    pub trusted_now: Timestamp,
    /// Running release.
    pub current: Option<Installed>,
    /// Release kept for revert.
    pub previous: Option<Installed>,
    /// Phase.
    pub phase: Phase,
    /// Rollout the phase belongs to.
    pub rollout_id: Option<String>,
    /// Release being worked on, or the last one worked on.
    pub target: Option<ReleaseRef>,
    /// Last error.
    pub last_error: Option<ErrorInfo>,
    /// Work under way.
    pub job: Option<Job>,
    /// Newest accepted ring directive.
    pub ring: Option<Kept>,
    /// Newest accepted device directive, while it pins the device.
    pub device: Option<Kept>,
    /// The ring rollout that was current when the device pin was set; a ring directive for a
    /// different rollout releases the pin.
    pub pin_ring_rollout: Option<String>,
    /// Releases that failed here, per rollout, with the attempt they failed at. Not tried
    /// again in the same rollout unless a directive asks with a higher attempt (a retry), so
    /// a re-signed directive cannot loop installs.
    pub failed: Vec<Failed>,
    /// The attempt of the directive the phase belongs to (see `Directive::attempt`).
    #[serde(default = "ringcast_proto::directive::first_attempt")]
    pub attempt: u32,
    /// Incremented at every start; makes event ids unique across restarts.
    pub boot: u64,
    /// Digests of the last accepted directive bytes per topic.
    #[serde(default)]
    pub digests: Digests,
    /// Sequence of the last state report queued (see `StateReport::seq`).
    #[serde(default)]
    pub report_seq: u64,
    /// The rollout whose directive this device refused last (until a directive is accepted).
    #[serde(default)]
    pub refused: Option<ringcast_proto::Refusal>,
    /// The defer hook's "not now" for the job's release, while it stands: persisted, so the
    /// deadline counts from the first "not now", not from a restart.
    #[serde(default)]
    pub deferral: Option<Deferral>,
}

/// What a multi-product agent persists for the device as a whole, beside each product's own
/// [`Persisted`] (under `product/{name}/state`) and the trust root. A single-product agent
/// keeps these in its one [`Persisted`] instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// `max(local clock, newest issued_at any product verified)`: one trusted time per device,
    /// so no product judges expiry by an older time than another already saw.
    pub trusted_now: Timestamp,
    /// Sequence of the last state report queued, across every product.
    pub report_seq: u64,
    /// Incremented at every start; makes event ids unique across restarts.
    pub boot: u64,
}

impl DeviceState {
    /// A fresh device.
    pub fn new(now: Timestamp) -> DeviceState {
        DeviceState {
            trusted_now: now,
            report_seq: 0,
            boot: 0,
        }
    }
}

/// The reason code a deferred device reports in its state report's `last_error`.
pub const DEFERRED: &str = "deferred";

/// A deferral under way: the defer hook said "not now" for `release` in `rollout_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deferral {
    /// The rollout the job belonged to at the first "not now".
    pub rollout_id: String,
    /// The deferred release.
    pub release: ReleaseRef,
    /// The first "not now": the deadline counts from here.
    pub since: Timestamp,
    /// `since` + the hook's `deadline`: from then on the update proceeds without asking.
    pub until: Timestamp,
    /// The hook's latest reason.
    pub reason: String,
    /// When the hook is asked again.
    pub retry_at: Timestamp,
}

impl Deferral {
    /// Whether this deferral is the one of `job` (same rollout, same release): a deferral
    /// counts per rollout and release.
    pub fn is_for(&self, job: &Job) -> bool {
        self.rollout_id == job.rollout_id
            && self.release.name == job.release.name
            && self.release.sequence == job.release.sequence
    }

    /// What the state report's `last_error` says while the device defers: reason code
    /// `deferred`, the hook's reason and the deadline.
    pub fn error_info(&self) -> ErrorInfo {
        ErrorInfo {
            reason: DEFERRED.to_owned(),
            detail: format!(
                "{}; deferred until {}, asking again at {}",
                self.reason, self.until, self.retry_at
            ),
        }
    }
}

/// SHA-256 of the last accepted directive envelope per topic: the retained copy seen again on
/// reconnect is recognised and ignored instead of being reported as a replay.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Digests {
    /// Ring topic.
    pub ring_digest: Option<String>,
    /// Device topic.
    pub device_digest: Option<String>,
}

impl Persisted {
    /// A fresh device.
    pub fn new(now: Timestamp) -> Persisted {
        Persisted {
            last_seq_ring: None,
            last_seq_device: None,
            rollback_floor: 0,
            trusted_now: now,
            current: None,
            previous: None,
            phase: Phase::Idle,
            rollout_id: None,
            target: None,
            last_error: None,
            job: None,
            ring: None,
            device: None,
            pin_ring_rollout: None,
            failed: Vec::new(),
            attempt: 1,
            boot: 0,
            digests: Digests::default(),
            report_seq: 0,
            refused: None,
            deferral: None,
        }
    }

    /// Whether `release` failed here in `rollout_id` at `attempt` or later (so a directive
    /// at that attempt must not start it again).
    pub fn has_failed(&self, rollout_id: &str, release: &Release, attempt: u32) -> bool {
        self.failed.iter().any(|f| {
            f.rollout_id == rollout_id
                && f.name == release.name
                && f.sequence == release.sequence
                && f.attempt >= attempt
        })
    }

    /// Remember a failure at the current attempt (bounded list; one entry per release and
    /// rollout, the latest attempt).
    pub fn remember_failure(&mut self, rollout_id: &str, release: &ReleaseRef) {
        self.failed.retain(|f| {
            !(f.rollout_id == rollout_id
                && f.name == release.name
                && f.sequence == release.sequence)
        });
        if self.failed.len() >= 32 {
            self.failed.remove(0);
        }
        self.failed.push(Failed {
            rollout_id: rollout_id.to_owned(),
            name: release.name.clone(),
            sequence: release.sequence,
            attempt: self.attempt,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::*;

    #[test]
    fn failures_recorded_before_retries_read_as_attempt_one() {
        let old: Vec<super::Failed> = serde_json::from_str(
            r#"[["r-1","app",3],{"rollout_id":"r-2","name":"app","sequence":4,"attempt":2}]"#,
        )
        .unwrap();
        assert_eq!(old[0].attempt, 1);
        assert_eq!((old[0].rollout_id.as_str(), old[0].sequence), ("r-1", 3));
        assert_eq!(old[1].attempt, 2);
        let back: Vec<super::Failed> =
            serde_json::from_slice(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(back, old);
    }

    #[test]
    fn a_failure_blocks_its_attempt_and_earlier_ones_only() {
        let mut st = Persisted::new(Timestamp::UNIX_EPOCH);
        let rel = ringcast_proto::testkit::sample_release("app", 2, 1);
        st.attempt = 2;
        st.remember_failure("r", &release_ref(&rel));
        assert!(st.has_failed("r", &rel, 1));
        assert!(st.has_failed("r", &rel, 2));
        assert!(!st.has_failed("r", &rel, 3), "attempt 3 is a retry");
        assert!(!st.has_failed("other", &rel, 1));
        // A later failure of the same release replaces the entry.
        st.attempt = 3;
        st.remember_failure("r", &release_ref(&rel));
        assert_eq!(st.failed.len(), 1);
        assert!(st.has_failed("r", &rel, 3));
    }

    #[test]
    fn happy_path_walks_the_design_order() {
        let mut p = Idle;
        for (s, want) in [
            (Step::Start, Downloading),
            (Step::BodyComplete, Verifying),
            (Step::Verified, Staged),
            (Step::Activate, Installing),
            (Step::Activated, Probation),
            (Step::ProbationPassed, Committed),
        ] {
            p = transition(s, p).unwrap();
            assert_eq!(p, want);
        }
    }

    #[test]
    fn revert_only_after_activation_began() {
        assert_eq!(transition(Step::Revert, Probation).unwrap(), Reverting);
        assert_eq!(transition(Step::Revert, Installing).unwrap(), Reverting);
        assert_eq!(transition(Step::RevertDone, Reverting).unwrap(), Reverted);
        for p in [Idle, Downloading, Staged, Committed] {
            assert!(transition(Step::Revert, p).is_err(), "{p:?}");
        }
    }

    /// Every phase. The `match` in `phase_list_is_complete` stops compiling when a phase is
    /// added, so this list (and the tests over it) cannot silently fall behind.
    const PHASES: [Phase; 11] = [
        Idle,
        Downloading,
        Verifying,
        Staged,
        Deferred,
        Installing,
        Probation,
        Committed,
        Reverting,
        Reverted,
        Failed,
    ];

    #[test]
    fn phase_list_is_complete() {
        for p in PHASES {
            match p {
                Idle | Downloading | Verifying | Staged | Deferred | Installing | Probation
                | Committed | Reverting | Reverted | Failed => {}
            }
        }
        let mut names: Vec<&str> = PHASES.iter().map(|p| p.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PHASES.len());
    }

    #[test]
    fn cancel_goes_to_idle_exactly_in_the_phases_before_activation() {
        for p in PHASES {
            let before_activation = matches!(p, Downloading | Verifying | Staged | Deferred);
            match transition(Step::Cancel, p) {
                Ok(next) => {
                    assert!(before_activation, "{p:?} must not be cancellable");
                    assert_eq!(next, Idle, "{p:?}");
                }
                Err(d) => {
                    assert!(!before_activation, "{p:?} must be cancellable");
                    assert_eq!(
                        d,
                        Disallowed {
                            step: Step::Cancel,
                            phase: p
                        }
                    );
                }
            }
        }
    }

    fn rel(seq: u64) -> Release {
        ringcast_proto::testkit::sample_release("app", seq, 1)
    }

    fn job(seq: u64, origin: Origin) -> Job {
        Job::new("r-job".into(), origin, rel(seq), Activation::default())
    }

    /// The phases a job is in (with no job, the device is in one of the others).
    fn with_job(p: Phase) -> bool {
        !matches!(p, Idle | Committed | Reverted | Failed)
    }

    #[test]
    fn hold_cancels_unactivated_work_and_is_only_noted_otherwise() {
        let j = job(2, Origin::Ring);
        for p in PHASES {
            let job = with_job(p).then_some(&j);
            let want = if matches!(p, Downloading | Verifying | Staged | Deferred) {
                Plan::Cancel(CancelReason::Held)
            } else {
                Plan::NoteHold
            };
            assert_eq!(plan(Ask::Hold, job, p, None, false), want, "{p:?}");
            // No directive left to follow (a device hold ended a pin, the ring said nothing).
            let want = match want {
                Plan::NoteHold => Plan::Nothing,
                other => other,
            };
            assert_eq!(plan(Ask::Nothing, job, p, None, false), want, "{p:?}");
        }
    }

    #[test]
    fn install_of_the_running_release_cancels_unactivated_work_for_another() {
        let current = release_ref(&rel(1));
        let back = rel(1);
        let j = job(2, Origin::Ring);
        for p in PHASES {
            let job = with_job(p).then_some(&j);
            let want = match p {
                Downloading | Verifying | Staged | Deferred => {
                    Plan::Cancel(CancelReason::AlreadyCurrent)
                }
                Installing | Probation | Reverting => Plan::Wait,
                _ => Plan::Nothing,
            };
            let ask = Ask::Install {
                release: &back,
                in_ramp: true,
            };
            assert_eq!(plan(ask, job, p, Some(&current), false), want, "{p:?}");
        }
    }

    #[test]
    fn install_of_a_release_that_failed_here_cancels_unactivated_work_for_another() {
        let current = release_ref(&rel(1));
        let failed = rel(3);
        let j = job(2, Origin::Ring);
        for p in PHASES {
            let job = with_job(p).then_some(&j);
            let want = match p {
                Downloading | Verifying | Staged | Deferred => {
                    Plan::Cancel(CancelReason::FailedBefore)
                }
                Installing | Probation | Reverting => Plan::Wait,
                _ => Plan::Nothing,
            };
            let ask = Ask::Install {
                release: &failed,
                in_ramp: true,
            };
            assert_eq!(plan(ask, job, p, Some(&current), true), want, "{p:?}");
        }
    }

    #[test]
    fn install_of_another_release_supersedes_unactivated_work_and_waits_for_activated() {
        let current = release_ref(&rel(1));
        let next = rel(3);
        let j = job(2, Origin::Ring);
        for p in PHASES {
            let job = with_job(p).then_some(&j);
            let want = match p {
                Installing | Probation | Reverting => Plan::Wait,
                _ => Plan::Start,
            };
            let ask = Ask::Install {
                release: &next,
                in_ramp: true,
            };
            assert_eq!(plan(ask, job, p, Some(&current), false), want, "{p:?}");
        }
    }

    #[test]
    fn install_of_the_job_release_updates_the_job_in_every_phase() {
        let same = rel(2);
        for origin in [Origin::Ring, Origin::Device] {
            let j = job(2, origin);
            for p in PHASES.into_iter().filter(|p| with_job(*p)) {
                let ask = Ask::Install {
                    release: &same,
                    in_ramp: true,
                };
                assert_eq!(plan(ask, Some(&j), p, None, false), Plan::Update, "{p:?}");
            }
        }
    }

    #[test]
    fn ring_ramp_without_this_device_cancels_work_it_no_longer_asks_for() {
        let other = rel(3);
        let same = rel(2);
        let out = |r| Ask::Install {
            release: r,
            in_ramp: false,
        };
        for p in PHASES {
            let cancellable = matches!(p, Downloading | Verifying | Staged | Deferred);
            let ring_job = job(2, Origin::Ring);
            let pin_job = job(2, Origin::Device);
            let (ring_job, pin_job) = if with_job(p) {
                (Some(&ring_job), Some(&pin_job))
            } else {
                (None, None)
            };
            let cancel = if cancellable {
                Plan::Cancel(CancelReason::NotInRamp)
            } else {
                Plan::Nothing
            };
            // Another release: the ring moved on without this device.
            assert_eq!(plan(out(&other), ring_job, p, None, false), cancel, "{p:?}");
            // A pin ended and the ring's ramp leaves the device out.
            assert_eq!(plan(out(&same), pin_job, p, None, false), cancel, "{p:?}");
            // The ring's own job for the same release keeps going.
            assert_eq!(plan(out(&same), ring_job, p, None, false), Plan::Nothing);
        }
    }

    #[test]
    fn cancel_reason_codes_are_unique_snake_case_and_in_the_operations_guide() {
        let doc = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/operations.md"
        ));
        let mut codes: Vec<&str> = CancelReason::ALL.iter().map(|r| r.code()).collect();
        for c in &codes {
            assert!(
                c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'),
                "{c}"
            );
            assert!(
                doc.contains(&format!("`{c}`")),
                "docs/operations.md lacks `{c}`"
            );
        }
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), CancelReason::ALL.len());
        for r in CancelReason::ALL {
            let e = r.event();
            match r {
                CancelReason::Held => assert_eq!(e, EventKind::Held),
                _ => assert_eq!(
                    e,
                    EventKind::Cancelled {
                        reason: r.code().into()
                    }
                ),
            }
        }
    }

    #[test]
    fn deferral_sits_between_staged_and_installing() {
        assert_eq!(transition(Step::Defer, Staged).unwrap(), Deferred);
        assert_eq!(transition(Step::Defer, Deferred).unwrap(), Deferred);
        assert_eq!(transition(Step::Activate, Deferred).unwrap(), Installing);
        assert_eq!(transition(Step::Restage, Deferred).unwrap(), Staged);
        // Superseded or cancelled like staged work: nothing was activated.
        assert_eq!(transition(Step::Start, Deferred).unwrap(), Downloading);
        assert_eq!(transition(Step::Cancel, Deferred).unwrap(), Idle);
        for p in PHASES
            .into_iter()
            .filter(|p| !matches!(p, Staged | Deferred))
        {
            assert!(transition(Step::Defer, p).is_err(), "{p:?}");
        }
        for p in PHASES.into_iter().filter(|p| *p != Deferred) {
            assert!(transition(Step::Restage, p).is_err(), "{p:?}");
        }
        assert!(!is_busy(Deferred) && !is_activated(Deferred));
    }

    #[test]
    fn phase_names_and_deferral_codes_are_in_the_operations_guide() {
        let doc = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/operations.md"
        ));
        let hook_failed = EventKind::DeferHookFailed {
            detail: String::new(),
        };
        let names = PHASES
            .iter()
            .map(|p| p.as_str())
            .chain([DEFERRED, hook_failed.name()]);
        for n in names {
            assert!(
                doc.contains(&format!("`{n}`")),
                "docs/operations.md lacks `{n}`"
            );
        }
    }

    #[test]
    fn activated_work_cannot_be_cancelled_or_restarted() {
        for p in [Installing, Probation, Reverting] {
            assert!(transition(Step::Cancel, p).is_err());
            assert!(transition(Step::Start, p).is_err());
        }
        assert!(transition(Step::Activate, Downloading).is_err());
        assert!(transition(Step::ProbationPassed, Installing).is_err());
    }
}
