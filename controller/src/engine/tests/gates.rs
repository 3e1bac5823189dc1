//! Gates: enough committed devices of the step's ramp, failures under the limit; refusals
//! count as refused; deferrals count as deferred; a ring too small for its gate is warned
//! about.

use super::*;
use std::io::Write;
use std::sync::{Arc, Mutex};

#[test]
fn promotes_only_once_min_reports_devices_have_committed() {
    let mut canary = ring("canary");
    canary.gate.min_reports = 3;
    let mut h = Harness::new(policy(vec![canary, ring("broad")]));
    let devs = h.devices("canary", 4);
    h.devices("broad", 2);
    let id = h.submit(2);
    h.eval();
    assert_eq!(h.phase(&id), "publishing");

    h.report(&devs[0], Phase::Committed);
    h.report(&devs[1], Phase::Committed);
    // Installed and in probation is still pending, never a success.
    h.report(&devs[2], Phase::Probation);
    h.tick(hours(3));
    assert_eq!(h.phase(&id), "publishing", "two of the three needed");
    assert_eq!(h.audited("promote"), 0);

    h.report(&devs[2], Phase::Committed);
    h.eval();
    assert_eq!(h.phase(&id), "baking");
    h.tick(hours(1));
    assert_eq!(
        h.position(&id),
        Some(("broad".into(), 0, Stage::Publishing { since: h.now })),
        "canary passed: broad published"
    );
    assert_eq!(h.audited("promote"), 1);
}

/// 10 devices, gate `min_reports` 5 at 20 %.
fn ten_devices_at_twenty_percent() -> (Harness, Vec<String>, String) {
    let mut canary = ring("canary");
    canary.gate.min_reports = 5;
    let mut h = Harness::new(policy(vec![canary]));
    let devs = h.devices("canary", 10);
    let id = h.submit(2);
    h.eval();
    (h, devs, id)
}

#[test]
fn a_failure_rate_at_the_limit_still_promotes() {
    let (mut h, devs, id) = ten_devices_at_twenty_percent();
    for (i, d) in devs.iter().enumerate() {
        let phase = if i < 2 {
            Phase::Reverted
        } else {
            Phase::Committed
        };
        h.report(d, phase);
    }
    h.eval();
    assert_eq!(h.phase(&id), "baking", "2 of 10 is not above 0.2");
    h.tick(hours(1));
    assert_eq!(h.phase(&id), "completed");
}

#[test]
fn a_failure_rate_over_the_limit_never_promotes() {
    let (mut h, devs, id) = ten_devices_at_twenty_percent();
    for (i, d) in devs.iter().enumerate() {
        let phase = if i < 3 {
            Phase::Reverted
        } else {
            Phase::Committed
        };
        h.report(d, phase);
    }
    h.tick(hours(2));
    assert_eq!(h.phase(&id), "halted");
    assert_eq!(h.audited("promote") + h.audited("complete"), 0);
    assert!(
        h.stop_reason(&id)
            .starts_with("gate crossed in ring canary: 3 of 10 failed (rate 0.30 > 0.20)"),
        "{}",
        h.stop_reason(&id)
    );
}

#[test]
fn devices_outside_the_steps_ramp_are_not_counted() {
    let mut canary = ring("canary");
    canary.steps = vec![pct(10.0), Percent::FULL];
    let mut h = Harness::new(policy(vec![canary]));
    h.devices("canary", 40);
    let id = h.submit(2);
    h.eval();
    let ten = pct(10.0);
    let inside = h.in_ramp("canary", ten);
    assert!(
        (2..10).contains(&inside.len()),
        "the fixture needs a few devices in the 10 % ramp, got {}",
        inside.len()
    );
    let outside: Vec<String> = h
        .ring_devices("canary")
        .into_iter()
        .filter(|d| !inside.contains(d))
        .collect();

    // Whatever devices outside the ramp say, the step neither passes nor fails on it.
    for d in &outside[..outside.len() / 2] {
        h.report(d, Phase::Committed);
    }
    for d in &outside[outside.len() / 2..] {
        h.report(d, Phase::Reverted);
    }
    h.tick(hours(2));
    let t = h.tally("canary", ten);
    assert_eq!(
        (t.in_ramp, t.committed, t.failed),
        (inside.len() as u32, 0, 0)
    );
    assert_eq!(
        h.position(&id).map(|p| (p.1, h.phase(&id))),
        Some((0, "publishing"))
    );

    for d in &inside {
        h.report(d, Phase::Committed);
    }
    h.eval();
    assert_eq!(h.phase(&id), "baking");
    h.tick(hours(1));
    assert!(h
        .directives("canary")
        .iter()
        .any(|d| d.action == ringcast_proto::Action::Install && d.percent == Percent::FULL));
    // At 100 % the devices that reverted are in the ramp: now they count, and halt.
    assert_eq!(h.phase(&id), "halted", "{:?}", h.rollout_state(&id));
}

#[test]
fn refused_devices_count_as_refused_never_pending() {
    let mut h = Harness::new(policy(vec![ring("canary")]));
    let devs = h.devices("canary", 3);
    let id = h.submit(2);
    h.eval();
    h.refuse(
        &devs[0],
        Reason::RollbackFloor,
        "sequence 2 is below the floor 4",
    );
    h.report(&devs[1], Phase::Probation);
    h.eval();
    let t = h.tally("canary", Percent::FULL);
    assert_eq!((t.refused, t.pending, t.committed), (1, 1, 0));
    assert_eq!(h.phase(&id), "publishing", "two devices can still commit");

    h.report(&devs[1], Phase::Committed);
    h.report(&devs[2], Phase::Committed);
    h.eval();
    assert_eq!(h.phase(&id), "baking");
    h.tick(hours(1));
    assert_eq!(h.phase(&id), "completed");
}

#[test]
fn deferred_devices_count_apart_never_as_failures_and_the_step_waits_for_them() {
    // A gate that halts on the first failure: a deferral must not look like one.
    let mut canary = ring("canary");
    canary.gate.min_reports = 3;
    canary.gate.max_failure_rate = 0.0;
    let mut h = Harness::new(policy(vec![canary]));
    let devs = h.devices("canary", 3);
    let id = h.submit(2);
    h.eval();
    h.report(&devs[0], Phase::Committed);
    h.report(&devs[1], Phase::Deferred);
    h.report(&devs[2], Phase::Deferred);
    h.eval();
    let t = h.tally("canary", Percent::FULL);
    assert_eq!(
        (t.committed, t.deferred, t.failed, t.pending, t.unresponsive),
        (1, 2, 0, 0, 0)
    );
    assert_eq!(
        t.reported, 3,
        "a deferred device did report for the rollout"
    );
    assert_eq!(
        h.phase(&id),
        "publishing",
        "not halted (no failure), not baking (two have not committed)"
    );

    // A deferring device reports at every ask of its hook; one that falls silent past
    // `unresponsive_after` (15 min here) is unresponsive, whatever it said last.
    h.tick(mins(10));
    h.report(&devs[1], Phase::Deferred);
    h.tick(mins(10));
    let t = h.tally("canary", Percent::FULL);
    assert_eq!((t.deferred, t.unresponsive), (1, 1));
    assert_eq!(h.phase(&id), "publishing");

    // Their deadline passes: they install and commit, and the step passes.
    h.report(&devs[1], Phase::Committed);
    h.report(&devs[2], Phase::Committed);
    h.eval();
    assert_eq!(h.phase(&id), "baking");
    h.tick(hours(1));
    assert_eq!(h.phase(&id), "completed");
    assert_eq!(h.audited("halt"), 0);
}

#[test]
fn devices_deferring_past_the_step_timeout_end_the_step_with_the_tally() {
    let mut canary = ring("canary");
    canary.step_timeout_setting = Some(Dur::secs(3600));
    let mut h = Harness::new(policy(vec![canary]));
    let devs = h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    // Both keep deferring (and reporting, every 10 min) through the whole step timeout.
    for _ in 0..6 {
        h.report(&devs[0], Phase::Deferred);
        h.report(&devs[1], Phase::Deferred);
        h.tick(mins(10));
    }
    assert_eq!(h.phase(&id), "halted");
    let reason = h.stop_reason(&id);
    assert!(
        reason.starts_with(
            "step timed out in ring canary: gate not met after 1h (0 of 2 needed committed; 0 \
             pending, 2 deferred, 0 unresponsive, 0 refused, 0 failed,"
        ),
        "{reason}"
    );
}

#[test]
fn refusals_that_make_the_gate_unreachable_halt_with_their_reason() {
    let mut canary = ring("canary");
    canary.gate.min_reports = 3;
    let mut h = Harness::new(policy(vec![canary]));
    let devs = h.devices("canary", 4);
    let id = h.submit(2);
    h.eval();
    h.report(&devs[2], Phase::Committed);
    h.refuse(
        &devs[0],
        Reason::RollbackFloor,
        "sequence 2 is below the floor 4",
    );
    h.eval();
    assert_eq!(h.phase(&id), "publishing", "three can still commit");

    h.refuse(
        &devs[1],
        Reason::RollbackFloor,
        "sequence 2 is below the floor 4",
    );
    h.eval();
    assert_eq!(h.phase(&id), "halted");
    let reason = h.stop_reason(&id);
    assert!(
        reason.starts_with(
            "gate unreachable in ring canary: of 4 devices in the ramp, 2 refused the directive \
             and 0 failed; 3 must commit"
        ),
        "{reason}"
    );
    assert!(
        reason.contains(&format!(
            "reason \"rollback_floor\" on 2 devices, e.g. {}: \"sequence 2 is below the floor 4\"",
            devs[0]
        )),
        "{reason}"
    );
    // Halted like any halt: the release is blocked and the ring holds.
    assert_eq!(
        h.state().releases["app-2"].blocked.as_deref(),
        Some(reason.as_str())
    );
    assert_eq!(h.directive("canary").action, ringcast_proto::Action::Hold);
}

#[test]
fn a_ring_smaller_than_min_reports_is_warned_about_on_submit() {
    let mut broad = ring("broad");
    broad.gate.min_reports = 5;
    let mut h = Harness::new(policy(vec![ring("canary"), broad]));
    h.devices("canary", 2);
    h.devices("broad", 3);
    let (_, warnings) = h
        .submit_envelope(release(2).sign(&[&h.fx.release]), None)
        .expect("submitted");
    assert_eq!(
        warnings,
        vec![
            "ring broad has 3 known device(s), fewer than its gate's min_reports 5: its last \
             step cannot pass until more report"
                .to_owned()
        ]
    );
    // The warning is in the audit record of the submission too.
    assert!(
        h.audit_details("release_submit")[0].contains("warnings: ring broad has 3 known"),
        "{:?}",
        h.audit_details("release_submit")
    );
}

/// A log sink for one test's thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

#[test]
fn a_ring_smaller_than_min_reports_is_warned_about_on_start() {
    let mut canary = ring("canary");
    canary.gate.min_reports = 3;
    let mut h = Harness::new(policy(vec![canary, ring("broad")]));
    h.devices("canary", 2);
    h.devices("broad", 2);
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || h.start());
    let text = logs.text();
    let warned: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("fewer known devices than its gate's min_reports"))
        .collect();
    assert_eq!(warned.len(), 1, "{text}");
    assert!(
        warned[0].contains("WARN")
            && warned[0].contains("canary")
            && warned[0].contains("known=2")
            && warned[0].contains("min=3"),
        "{text}"
    );
}
