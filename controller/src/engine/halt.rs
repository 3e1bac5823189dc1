//! Why a rollout stops, in words an operator can act on: the most common failing check (or
//! reason) among the devices that failed, with an example device and the tail of its output.
//! Pure: the engine gathers the evidence from the device table and the event history.

use crate::model::Tally;
use ringcast_proto::report::ErrorInfo;
use ringcast_proto::{Event, EventKind};
use std::collections::BTreeMap;

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
    if let Some(s) = most_common(evidence) {
        reason.push_str("; ");
        reason.push_str(&s);
    }
    reason
}

/// `most common failure: check "…" on N devices, e.g. DEVICE: "OUTPUT TAIL"`, or `None`
/// without evidence.
fn most_common(evidence: &[FailureEvidence]) -> Option<String> {
    let mut by_cause: BTreeMap<&FailureCause, Vec<&FailureEvidence>> = BTreeMap::new();
    for e in evidence {
        by_cause.entry(&e.cause).or_default().push(e);
    }
    // The most devices wins, ties to the first cause in order; a device that said nothing
    // is never "the most common failure" while another said something.
    let (cause, devices) = by_cause
        .iter()
        .filter(|(c, _)| **c != &FailureCause::Unknown)
        .fold(
            None::<(&FailureCause, &Vec<&FailureEvidence>)>,
            |best, (c, ds)| match best {
                Some((_, b)) if b.len() >= ds.len() => best,
                _ => Some((c, ds)),
            },
        )
        .or_else(|| by_cause.iter().next().map(|(c, ds)| (*c, ds)))?;
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
    let mut out = format!("most common failure: {what} on {n}{of} device{plural}");
    if let Some(d) = example {
        out.push_str(&format!(", e.g. {}", d.device));
        if let Some(o) = &d.output {
            out.push_str(&format!(": {:?}", one_line_tail(o, HALT_OUTPUT_CHARS)));
        }
    }
    Some(out)
}

/// The reason a step that can no longer reach its gate gives: how many devices of the ramp
/// refused the directive or failed, and the most common cause with an example.
pub fn unreachable_reason(
    ring: &str,
    t: &Tally,
    need: u32,
    refusals: &[FailureEvidence],
    failures: &[FailureEvidence],
) -> String {
    let mut reason = format!(
        "gate unreachable in ring {ring}: of {} devices in the ramp, {} refused the directive \
         and {} failed; {need} must commit",
        t.in_ramp, t.refused, t.failed
    );
    let evidence = if refusals.is_empty() {
        failures
    } else {
        refusals
    };
    if let Some(s) = most_common(evidence) {
        reason.push_str("; ");
        reason.push_str(&s);
    }
    reason
}

/// The reason a step that waited longer than `step_timeout` for its gate gives.
pub fn timeout_reason(ring: &str, t: &Tally, need: u32, waited: &str) -> String {
    format!(
        "step timed out in ring {ring}: gate not met after {waited} ({} of {need} needed \
         committed; {} pending, {} deferred, {} unresponsive, {} refused, {} failed, {} of {} \
         devices in the ramp not reporting for this rollout)",
        t.committed,
        t.pending,
        t.deferred,
        t.unresponsive,
        t.refused,
        t.failed,
        t.in_ramp.saturating_sub(t.reported + t.refused),
        t.in_ramp
    )
}

impl FailureEvidence {
    /// A refusal: the device's reason code and detail.
    pub fn refusal(device: &str, reason: &str, detail: &str) -> FailureEvidence {
        FailureEvidence {
            device: device.to_owned(),
            cause: FailureCause::Reason(reason.to_owned()),
            output: (!detail.trim().is_empty()).then(|| detail.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringcast_proto::testkit;

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
    fn an_unreachable_gate_names_the_refusal_and_an_example() {
        let mut tl = t(2, 0, 0, 0);
        tl.refused = 2;
        let refusals = [
            FailureEvidence::refusal("dev-2", "rollback_floor", "sequence 1 is below the floor 5"),
            FailureEvidence::refusal("dev-1", "rollback_floor", "sequence 1 is below the floor 5"),
        ];
        assert_eq!(
            unreachable_reason("canary", &tl, 2, &refusals, &[]),
            "gate unreachable in ring canary: of 2 devices in the ramp, 2 refused the directive \
             and 0 failed; 2 must commit; most common failure: reason \"rollback_floor\" on 2 \
             devices, e.g. dev-1: \"sequence 1 is below the floor 5\""
        );
    }
}
