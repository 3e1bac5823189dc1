//! What the agent persists, and its state machine (DESIGN.md "Agent state machine").
//!
//! The phase is [`ringcast_proto::Phase`]; [`transition`] is the one place that says which
//! step may move it where, as an explicit `match (step, phase)` with a catch-all error. The
//! agent persists the new state, then performs the effects.

use jiff::Timestamp;
use ringcast_proto::directive::Activation;
use ringcast_proto::release::{InstallKind, Release};
use ringcast_proto::report::ErrorInfo;
use ringcast_proto::{Directive, Phase, ReleaseRef};
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
    /// `not_before` passed and a window is open.
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
        (Step::Start, Idle | Committed | Reverted | Failed | Downloading | Verifying | Staged) => {
            Downloading
        }
        (Step::BodyComplete, Downloading) => Verifying,
        (Step::DownloadFailed, Downloading | Verifying) => Downloading,
        (Step::Verified, Verifying) => Staged,
        (Step::Activate, Staged) => Installing,
        (Step::Activated, Installing) => Probation,
        (Step::InstallFailed, Installing) => Failed,
        (Step::Revert, Installing | Probation | Reverting) => Reverting,
        (Step::RevertDone, Reverting) => Reverted,
        (Step::ProbationPassed, Probation) => Committed,
        (Step::Cancel, Downloading | Verifying | Staged) => Idle,
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
    /// Releases that failed here, per rollout: `(rollout_id, release name, sequence)`.
    /// Not retried within the same rollout, so a re-signed directive cannot loop installs.
    pub failed: Vec<(String, String, u64)>,
    /// Incremented at every start; makes event ids unique across restarts.
    pub boot: u64,
    /// Digests of the last accepted directive bytes per topic.
    #[serde(default)]
    pub digests: Digests,
    /// Sequence of the last state report queued (see `StateReport::seq`).
    #[serde(default)]
    pub report_seq: u64,
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
            boot: 0,
            digests: Digests::default(),
            report_seq: 0,
        }
    }

    /// Whether `release` failed here in `rollout_id`.
    pub fn has_failed(&self, rollout_id: &str, release: &Release) -> bool {
        self.failed
            .iter()
            .any(|(r, n, s)| r == rollout_id && *n == release.name && *s == release.sequence)
    }

    /// Remember a failure (bounded list).
    pub fn remember_failure(&mut self, rollout_id: &str, release: &ReleaseRef) {
        if self.failed.len() >= 32 {
            self.failed.remove(0);
        }
        self.failed.push((
            rollout_id.to_owned(),
            release.name.clone(),
            release.sequence,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::*;

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
