//! Delivery insight (DESIGN.md "Controller"): lead time (release signed → half and all of
//! the fleet committed), deployment frequency, change-failure rate and time to restore. The
//! per-device predicted time of its update, and each live rollout's timeline, are
//! [`super::forecast`]'s; the API adds the rollouts' forecasts to the [`Summary`].

use crate::engine::forecast::RolloutForecast;
use crate::engine::EngineState;
use crate::model::{DeviceRecord, Rollout, RolloutState};
use jiff::{SignedDuration, Timestamp};
use ringcast_proto::{Phase, Release};
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
    // The fleet of a release is the devices that run its product.
    for d in devices.values() {
        let Some(rep) = d.report_for(&release.name) else {
            continue;
        };
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
    /// Per live rollout, its forecast timeline and the durations it rests on (filled by the
    /// API, which has the fleet view; empty from [`summary`]).
    #[serde(default)]
    pub forecasts: Vec<RolloutForecast>,
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
        forecasts: Vec::new(),
    }
}
