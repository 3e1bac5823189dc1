//! Tallies and gates (DESIGN.md "Controller"): pure functions of the device table.
//!
//! Only devices in the step's ramp count. `committed` (installed, then healthy through the
//! whole probation) is the only success; `installed` is still pending; a device silent past
//! `unresponsive_after` is `unresponsive`; a device that refused the rollout's directive is
//! `refused`, never pending; a device whose defer hook said "not now" is `deferred`: not a
//! failure, not a success, and not pending either.
//!
//! A rollout's population is the devices that run its product (its release name): each is
//! counted through its report for that product ([`DeviceRecord::report_for`]), so a device
//! running several products is counted in each product's rollouts by that product's state
//! alone, and not at all in the rollouts of a product it does not run.

use crate::config::RingPolicy;
use crate::model::{DeviceRecord, Rollout, Tally};
use jiff::{SignedDuration, Timestamp};
use ringcast_proto::{in_ramp, Percent, Phase, ReleaseRef};
use std::collections::HashMap;

/// Whether a report's release is the rollout's (a report without one cannot say otherwise).
fn ours(rollout: &Rollout, r: &Option<ReleaseRef>) -> bool {
    r.as_ref()
        .is_none_or(|x| x.name == rollout.release_name && x.sequence == rollout.release_sequence)
}

/// One ring's tally for a rollout at the step whose ramp is `percent`.
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
        let Some(r) = d.report_for(&rollout.release_name) else {
            continue;
        };
        if r.ring != ring {
            continue;
        }
        t.devices += 1;
        if !in_ramp(&rollout.id, &d.id, percent) {
            continue;
        }
        t.in_ramp += 1;
        if r.refused
            .as_ref()
            .is_some_and(|x| x.rollout_id == rollout.id)
        {
            t.refused += 1;
            continue;
        }
        if r.rollout_id.as_deref() != Some(rollout.id.as_str()) {
            continue;
        }
        t.reported += 1;
        if r.phase == Phase::Committed && ours(rollout, &r.current) {
            t.committed += 1;
        } else if r.phase.is_failure() && ours(rollout, &r.target) {
            match rollout.attempts.get(ring) {
                Some(a) if a.will_retry(r.attempt) => t.retrying += 1,
                _ => t.failed += 1,
            }
        } else if now.duration_since(d.last_seen) > unresponsive_after {
            // A deferring device reports at every ask of its hook: silence is silence.
            t.unresponsive += 1;
        } else if r.phase == Phase::Deferred && ours(rollout, &r.target) {
            t.deferred += 1;
        } else {
            t.pending += 1;
        }
    }
    t
}

/// Devices of `ring`'s ramp whose install of the rollout's release failed at `attempt` or
/// later: the ones a retry (a directive at a higher attempt) would send back to work.
pub fn failed_at(
    devices: &HashMap<String, DeviceRecord>,
    rollout: &Rollout,
    ring: &str,
    percent: Percent,
    attempt: u32,
) -> u32 {
    let n = devices
        .values()
        .filter_map(|d| d.report_for(&rollout.release_name).map(|r| (d, r)))
        .filter(|(d, r)| {
            r.ring == ring
                && in_ramp(&rollout.id, &d.id, percent)
                && r.rollout_id.as_deref() == Some(rollout.id.as_str())
                && r.phase.is_failure()
                && ours(rollout, &r.target)
                && r.attempt >= attempt
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Whether the failures seen already exceed what the gate tolerates: a failure rate over
/// `max_failure_rate` with at least `min_reports` devices counted halts the rollout at once.
/// The denominator is the larger of devices that reported and devices in the ramp, so a halt
/// never waits for devices that cannot change the verdict.
pub fn gate_crossed(t: &Tally, ring: &RingPolicy) -> bool {
    let denom = t.reported.max(t.in_ramp);
    t.failed > 0
        && denom >= ring.gate.min_reports.max(1)
        && t.failure_rate() > ring.gate.max_failure_rate
}

/// Commits a step needs: `min(min_reports, devices in the ramp)` for an intermediate step,
/// `min_reports` for the ring's last step.
pub fn needed(t: &Tally, ring: &RingPolicy, last_step: bool) -> u32 {
    if last_step {
        ring.gate.min_reports
    } else {
        ring.gate.min_reports.min(t.in_ramp)
    }
}

/// Whether the step's gate is met: enough commits, failures at or under the limit. A step's
/// bake starts when this first holds, and it must keep holding through the bake.
pub fn gate_met(t: &Tally, ring: &RingPolicy, last_step: bool) -> bool {
    t.committed >= needed(t, ring, last_step) && t.failure_rate() <= ring.gate.max_failure_rate
}

/// Whether refusals and failures already make the gate impossible: the ramp held enough
/// devices, but too few of them can still commit. (A ramp that simply has too few devices
/// yet is not unreachable: devices may still join; `step_timeout` ends that wait.)
pub fn gate_unreachable(t: &Tally, ring: &RingPolicy, last_step: bool) -> bool {
    let need = needed(t, ring, last_step);
    let can_commit = t.in_ramp.saturating_sub(t.refused + t.failed);
    (t.refused > 0 || t.failed > 0) && t.in_ramp >= need && can_commit < need
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Gate, OnFailure, Promotion};
    use crate::model::RolloutState;
    use ringcast_proto::{testkit, Dur, Refusal, StateReport};
    use std::collections::BTreeMap;

    pub(crate) fn ring(min: u32, rate: f64) -> RingPolicy {
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
            check_attempts: 3,
            step_timeout_setting: Some(Dur::secs(3600)),
            retries: 0,
            retry_backoff: Dur::secs(600),
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
            ..Tally::default()
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
    fn gate_needs_commits_not_installs() {
        let r = ring(3, 0.2);
        assert!(!gate_met(&t(5, 5, 2, 0), &r, true));
        assert!(gate_met(&t(5, 5, 3, 0), &r, true));
        // An intermediate step with one device in its ramp needs that one commit.
        assert!(gate_met(&t(1, 1, 1, 0), &r, false));
        assert!(!gate_met(&t(1, 1, 0, 0), &r, false));
        // The last step never passes on fewer than min_reports.
        assert!(!gate_met(&t(1, 1, 1, 0), &r, true));
    }

    #[test]
    fn deferred_devices_neither_fail_nor_pass_a_gate() {
        let r = ring(3, 0.0);
        let mut tl = t(4, 4, 2, 0);
        tl.pending = 0;
        tl.deferred = 2;
        assert!(!gate_crossed(&tl, &r), "deferring is not failing");
        assert_eq!(tl.failure_rate(), 0.0);
        assert!(!gate_met(&tl, &r, true), "nor is it a commit");
        assert!(!gate_unreachable(&tl, &r, true), "they may still commit");
    }

    #[test]
    fn refusals_make_a_gate_unreachable_only_when_the_ramp_was_big_enough() {
        let r = ring(2, 0.5);
        let mut all_refused = t(2, 0, 0, 0);
        all_refused.refused = 2;
        assert!(gate_unreachable(&all_refused, &r, true));
        let mut one = t(3, 2, 1, 0);
        one.refused = 1;
        assert!(!gate_unreachable(&one, &r, true), "two can still commit");
        // Too few devices is a wait (devices may join), not a verdict.
        assert!(!gate_unreachable(&t(1, 1, 0, 0), &r, true));
        // Failures under the rate limit that leave too few to commit.
        assert!(gate_unreachable(&t(2, 2, 0, 1), &ring(2, 0.9), true));
    }

    fn rollout() -> Rollout {
        Rollout {
            id: "r1".into(),
            release_id: "app-2".into(),
            release_name: "app".into(),
            release_sequence: 2,
            created_at: testkit::now(),
            start_at: None,
            activate_at: None,
            state: RolloutState::Pending,
            paused: false,
            approvals: BTreeMap::new(),
            rings_reached: vec![],
            history: vec![],
            ended_at: None,
            final_tallies: Default::default(),
            insight: Default::default(),
            attempts: BTreeMap::new(),
            launch: None,
        }
    }

    fn report(phase: Phase, rollout: &str) -> StateReport {
        StateReport {
            device: "x".into(),
            seq: 1,
            ring: "canary".into(),
            device_class: "c".into(),
            agent_version: "t".into(),
            current: None,
            previous: None,
            target: None,
            phase,
            rollout_id: Some(rollout.into()),
            last_error: None,
            refused: None,
            windows: vec![],
            timezone: "UTC".into(),
            updated_at: testkit::now(),
            attempt: 1,
            products: Default::default(),
        }
    }

    fn device(id: &str, r: StateReport, seen: Timestamp) -> (String, DeviceRecord) {
        (
            id.into(),
            DeviceRecord {
                id: id.into(),
                report: Some(r),
                last_seen: seen,
                online: None,
                last_event: None,
            },
        )
    }

    #[test]
    fn silent_device_counts_unresponsive_never_success() {
        let now = testkit::now();
        let old = now.checked_sub(SignedDuration::from_hours(3)).unwrap();
        let devices: HashMap<_, _> = [
            device("a", report(Phase::Probation, "r1"), old),
            device("b", report(Phase::Probation, "r1"), now),
            device("c", report(Phase::Committed, "r1"), old),
            device("d", report(Phase::Reverted, "r1"), now),
        ]
        .into_iter()
        .collect();
        let tl = tally(
            &devices,
            &rollout(),
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

    #[test]
    fn only_devices_in_the_ramp_count_and_refusals_are_not_pending() {
        let now = testkit::now();
        let r = rollout();
        let mut devices = HashMap::new();
        for i in 0..200 {
            let id = format!("dev-{i}");
            devices.insert(
                id.clone(),
                device(&id, report(Phase::Committed, "r1"), now).1,
            );
        }
        let ten = Percent::from_f64(10.0).unwrap();
        let in_ten = devices.keys().filter(|d| in_ramp("r1", d, ten)).count() as u32;
        let tl = tally(
            &devices,
            &r,
            "canary",
            ten,
            now,
            SignedDuration::from_hours(1),
        );
        assert_eq!(tl.devices, 200);
        assert_eq!(tl.in_ramp, in_ten);
        assert_eq!(
            tl.committed, in_ten,
            "committed devices outside the ramp are not counted"
        );
        // A device of the ramp that refused the directive: refused, never pending.
        let refuser = devices
            .keys()
            .find(|d| in_ramp("r1", d, ten))
            .cloned()
            .unwrap();
        let rec = devices.get_mut(&refuser).unwrap();
        let rep = rec.report.as_mut().unwrap();
        rep.phase = Phase::Idle;
        rep.rollout_id = Some("r0".into());
        rep.refused = Some(Refusal {
            rollout_id: "r1".into(),
            reason: ringcast_proto::Reason::RollbackFloor,
            detail: "below the floor".into(),
        });
        let tl = tally(
            &devices,
            &r,
            "canary",
            ten,
            now,
            SignedDuration::from_hours(1),
        );
        assert_eq!(tl.refused, 1);
        assert_eq!(tl.committed, in_ten - 1);
        assert_eq!(tl.pending, 0);
    }
}
