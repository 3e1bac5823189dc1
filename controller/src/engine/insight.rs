//! Delivery insight (DESIGN.md "Controller"): lead time (release signed → half and all of
//! the fleet committed), deployment frequency, change-failure rate, time to restore, and per
//! device the predicted time of its update from ring, step, bake and delivery windows.

use crate::config::{Policy, Promotion};
use crate::engine::EngineState;
use crate::model::{DeviceRecord, Rollout, RolloutState, Stage};
use jiff::{SignedDuration, Timestamp};
use ringcast_proto::{in_ramp, Phase, Release, Schedule};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// How much of the compatible fleet runs a release.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Devices whose class the release lists.
    pub fleet: u32,
    /// Of those, running the release (committed).
    pub on_release: u32,
    /// Working on the release (downloading … probation, reverting) for this rollout.
    pub in_flight: u32,
}

/// Coverage of `release` across the known fleet.
pub fn coverage(
    devices: &HashMap<String, DeviceRecord>,
    r: &Rollout,
    release: &Release,
) -> Coverage {
    let mut c = Coverage::default();
    for d in devices.values() {
        let Some(rep) = &d.report else { continue };
        if !release.is_compatible(&rep.device_class) {
            continue;
        }
        c.fleet += 1;
        let runs = rep
            .current
            .as_ref()
            .is_some_and(|x| x.name == release.name && x.sequence == release.sequence);
        if runs && !rep.phase.is_failure() && rep.phase != Phase::Probation {
            c.on_release += 1;
        }
        let ours = rep.rollout_id.as_deref() == Some(r.id.as_str());
        if ours
            && matches!(
                rep.phase,
                Phase::Downloading
                    | Phase::Verifying
                    | Phase::Staged
                    | Phase::Deferred
                    | Phase::Installing
                    | Phase::Probation
                    | Phase::Reverting
            )
        {
            c.in_flight += 1;
        }
    }
    c
}

/// Per-rollout insight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutMetrics {
    /// Rollout id.
    pub rollout_id: String,
    /// Release id.
    pub release_id: String,
    /// Phase.
    pub phase: String,
    /// Release signed (`issued_at`).
    pub signed_at: Timestamp,
    /// Seconds from signing to half of the fleet committed.
    pub lead_time_half_secs: Option<i64>,
    /// Seconds from signing to the whole fleet committed.
    pub lead_time_full_secs: Option<i64>,
    /// Seconds from halt to the fleet back on a good release.
    pub time_to_restore_secs: Option<i64>,
}

/// Fleet-wide delivery insight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Completed rollouts per day over the last 30 days.
    pub deployments_per_day_30d: f64,
    /// Halted or rolled-back rollouts / finished rollouts (completed, halted, rolled back).
    pub change_failure_rate: Option<f64>,
    /// Mean seconds from halt to restore, over restored rollouts.
    pub mean_time_to_restore_secs: Option<i64>,
    /// Per rollout.
    pub rollouts: Vec<RolloutMetrics>,
}

/// Compute the summary from the engine state.
pub fn summary(st: &EngineState, now: Timestamp) -> Summary {
    let month = SignedDuration::from_hours(24 * 30);
    let mut rollouts: Vec<&Rollout> = st.rollouts.values().collect();
    rollouts.sort_by_key(|r| r.created_at);
    let completed_30d = rollouts
        .iter()
        .filter(|r| {
            r.state == RolloutState::Completed
                && r.ended_at.is_some_and(|e| now.duration_since(e) < month)
        })
        .count();
    let failed = rollouts
        .iter()
        .filter(|r| {
            matches!(
                r.state,
                RolloutState::Halted { .. } | RolloutState::RolledBack { .. }
            )
        })
        .count();
    let finished = failed
        + rollouts
            .iter()
            .filter(|r| r.state == RolloutState::Completed)
            .count();
    let secs = |a: Timestamp, b: Option<Timestamp>| b.map(|b| b.duration_since(a).as_secs());
    let metrics: Vec<RolloutMetrics> = rollouts
        .iter()
        .filter_map(|r| {
            let rel = st.releases.get(&r.release_id)?;
            let signed = rel.release.issued_at;
            let restore = match (r.ended_at, r.insight.restored_at) {
                (Some(h), Some(x))
                    if matches!(
                        r.state,
                        RolloutState::Halted { .. } | RolloutState::RolledBack { .. }
                    ) =>
                {
                    Some(x.duration_since(h).as_secs())
                }
                _ => None,
            };
            Some(RolloutMetrics {
                rollout_id: r.id.clone(),
                release_id: r.release_id.clone(),
                phase: r.state.phase().into(),
                signed_at: signed,
                lead_time_half_secs: secs(signed, r.insight.fleet_half_at),
                lead_time_full_secs: secs(signed, r.insight.fleet_full_at),
                time_to_restore_secs: restore,
            })
        })
        .collect();
    let restores: Vec<i64> = metrics
        .iter()
        .filter_map(|m| m.time_to_restore_secs)
        .collect();
    Summary {
        deployments_per_day_30d: completed_30d as f64 / 30.0,
        change_failure_rate: (finished > 0).then(|| failed as f64 / finished as f64),
        mean_time_to_restore_secs: (!restores.is_empty())
            .then(|| restores.iter().sum::<i64>() / restores.len() as i64),
        rollouts: metrics,
    }
}

/// When a device is predicted to update.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prediction {
    /// Rollout it would come with.
    pub rollout_id: String,
    /// Predicted activation time, if it can be predicted.
    pub at: Option<Timestamp>,
    /// Ring step at which the device enters the ramp.
    pub step: Option<usize>,
    /// Why, or why not.
    pub note: String,
}

/// Predict when `device` gets the live rollout of a release compatible with it: walk the
/// remaining steps from the rollout's position, each published at the next window opening
/// and baking its full time, until the step whose ramp includes the device; then the device's
/// own delivery windows and the activation time.
pub fn predict(
    policy: &Policy,
    st: &EngineState,
    device: &DeviceRecord,
    now: Timestamp,
) -> Option<Prediction> {
    let rep = device.report.as_ref()?;
    let (r, rel) = st
        .rollouts
        .values()
        .filter(|r| r.state.is_live())
        .filter_map(|r| st.releases.get(&r.release_id).map(|rel| (r, &rel.release)))
        .filter(|(_, rel)| rel.is_compatible(&rep.device_class))
        .max_by_key(|(r, _)| r.created_at)?;
    let mk = |at: Option<Timestamp>, step: Option<usize>, note: &str| Prediction {
        rollout_id: r.id.clone(),
        at,
        step,
        note: note.into(),
    };
    if rep
        .current
        .as_ref()
        .is_some_and(|c| c.name == rel.name && c.sequence >= rel.sequence)
    {
        return Some(mk(None, None, "already runs this release"));
    }
    if rep.phase == Phase::Deferred && rep.rollout_id.as_deref() == Some(r.id.as_str()) {
        // The device's own hook decides, up to the deadline its report's error slot gives.
        return Some(mk(
            None,
            None,
            "deferred by the device: it installs when its hook says go, at the latest at the \
             deadline in its last error",
        ));
    }
    let Some(target_ring) = policy.ring_index(&rep.ring) else {
        return Some(mk(None, None, "the device's ring is not in the policy"));
    };
    let (mut ring, mut step, mut t, mut baking_since) = match &r.state {
        RolloutState::Queued => return Some(mk(None, None, "queued behind a running rollout")),
        RolloutState::Pending => (0, 0, r.start_at.unwrap_or(now).max(now), None),
        RolloutState::Active { ring, step, stage } => {
            let since = match stage {
                Stage::Publishing { since } => Some(*since),
                Stage::Baking { since, .. } => Some(*since),
                Stage::Checking { .. } | Stage::ChecksFailed { .. } => Some(now),
                _ => None,
            };
            let Some(i) = policy.ring_index(ring) else {
                return Some(mk(None, None, "the rollout's ring is not in the policy"));
            };
            (i, *step, now, since)
        }
        _ => return None,
    };
    if ring > target_ring {
        return Some(mk(None, None, "the rollout has passed this ring; the device is outside its ramp or has not reported yet"));
    }
    // Bounded walk over the remaining steps of the remaining rings.
    while ring < policy.rings.len() {
        let rp = &policy.rings[ring];
        let published = match baking_since.take() {
            Some(s) => s,
            None => {
                if step == 0
                    && rp.promotion == Promotion::Manual
                    && !r.approvals.contains_key(&rp.name)
                {
                    return Some(mk(
                        None,
                        Some(step),
                        &format!("after an approver approves ring {}", rp.name),
                    ));
                }
                rp.schedule().next_open(t).unwrap_or(t)
            }
        };
        if ring == target_ring && in_ramp(&r.id, &device.id, rp.steps[step]) {
            let own = Schedule::new(rep.windows.clone(), &rep.timezone)
                .unwrap_or_else(|_| Schedule::always());
            let mut at = own.next_open(published).unwrap_or(published);
            if let Some(nb) = r.activate_at {
                at = at.max(own.next_open(nb).unwrap_or(nb));
            }
            return Some(mk(Some(at), Some(step), "enters the ramp at this step"));
        }
        t = published
            .checked_add(rp.bake.signed())
            .unwrap_or(Timestamp::MAX);
        step += 1;
        if step == rp.steps.len() {
            ring += 1;
            step = 0;
        }
        if ring > target_ring {
            break;
        }
    }
    Some(mk(None, None, "not in any ramp of its ring"))
}
