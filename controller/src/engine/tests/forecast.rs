//! Forecasts on states the decision core itself reached, at fixed timestamps: a device counts
//! as updated when it commits (download, install, probation after its step's directive), a
//! step's bake starts at its gate, ramps put each device at its own step, approvals are
//! waited for without a time, and ring and device windows (across a DST change, and closed
//! ones) move activation. Where it can, a test then drives the core along and checks that
//! it publishes when the forecast said.

use super::*;
use crate::engine::forecast::{
    forecast, FleetView, Forecast, History, NoHistory, Prediction, Wait, DEFAULT_DOWNLOAD,
    DEFAULT_INSTALL, WAITS_FOR,
};
use crate::model::{EventEntry, LaunchMode};
use ringcast_proto::{EventKind, Window};

fn secs(n: i64) -> SignedDuration {
    SignedDuration::from_secs(n)
}

/// The test kit's release: probation 60 s, health rounds every 10 s (so no commit lag).
const PROBATION: SignedDuration = SignedDuration::from_secs(60);

/// What a device takes from its step's directive to its commit with nothing measured.
fn default_lead() -> SignedDuration {
    DEFAULT_DOWNLOAD + DEFAULT_INSTALL + PROBATION
}

fn ring_with(name: &str, steps: &[f64], min_reports: u32) -> RingPolicy {
    let mut r = ring(name);
    r.steps = steps.iter().map(|s| pct(*s)).collect();
    r.gate.min_reports = min_reports;
    r
}

impl Harness {
    fn forecast_with(&self, history: &dyn History) -> Forecast {
        let fleet = FleetView {
            devices: &self.devices,
            history,
        };
        forecast(&self.cfg.policy, self.state(), &fleet, self.now)
    }

    fn forecast(&self) -> Forecast {
        self.forecast_with(&NoHistory)
    }

    fn predict(&self, device: &str) -> Prediction {
        self.forecast()
            .device(device)
            .cloned()
            .unwrap_or_else(|| panic!("no prediction for {device}"))
    }

    /// Give `device` its own delivery windows in `tz`.
    fn set_windows(&mut self, device: &str, windows: &[&str], tz: &str) {
        let rep = self
            .devices
            .get_mut(device)
            .and_then(|d| d.report.as_mut())
            .unwrap_or_else(|| panic!("unknown device {device}"));
        rep.windows = windows.iter().map(|w| Window::parse(w).unwrap()).collect();
        rep.timezone = tz.into();
    }
}

#[test]
fn a_device_is_forecast_to_commit_after_download_install_and_probation() {
    let mut h = Harness::new(policy(vec![ring_with("canary", &[100.0], 1)]));
    h.devices("canary", 1);
    let id = h.submit(2);
    h.eval();
    let t0 = h.now;
    let p = h.predict("canary-0");
    assert_eq!(p.rollout_id, id);
    assert_eq!(p.published_at, Some(t0));
    assert_eq!(p.activates_at, Some(t0 + DEFAULT_DOWNLOAD));
    assert_eq!(
        p.at,
        Some(t0 + default_lead()),
        "not at the publish, nor at activation: at the commit after the probation"
    );
    let f = h.forecast();
    let rf = &f.rollouts[0];
    assert_eq!(rf.download.samples, 0, "nothing measured: the default");
    assert_eq!(rf.probation_secs, 60.0);
    assert_eq!(
        rf.commit_lag.secs, 0.0,
        "60 s is a whole number of 10 s rounds"
    );
    assert_eq!(rf.steps[0].gate_met_at, Some(t0 + default_lead()));
    assert_eq!(rf.completes_at, Some(t0 + default_lead() + hours(1)));
}

#[test]
fn a_rings_bake_starts_at_its_gate_and_the_next_ring_is_published_when_it_ends() {
    let mut h = Harness::new(policy(vec![
        ring_with("canary", &[100.0], 1),
        ring_with("broad", &[100.0], 2),
    ]));
    h.devices("canary", 1);
    h.devices("broad", 2);
    let id = h.submit(2);
    h.eval();
    let t0 = h.now;
    let f = h.forecast();
    let gate = t0 + default_lead();
    let broad_out = gate + hours(1);
    let broad = f.device("broad-1").expect("forecast");
    assert_eq!(broad.published_at, Some(broad_out));
    assert_eq!(broad.at, Some(broad_out + default_lead()));
    assert_eq!(
        f.rollouts[0].completes_at,
        Some(broad_out + default_lead() + hours(1))
    );

    // The core, driven as forecast: canary commits, bakes from then, broad is published at
    // the forecast instant and not a moment before.
    h.tick_to(gate);
    h.report("canary-0", Phase::Committed);
    h.eval();
    assert_eq!(
        h.position(&id),
        Some((
            "canary".into(),
            0,
            Stage::Baking {
                since: gate,
                published: Some(t0)
            }
        ))
    );
    h.tick_to(broad_out - secs(1));
    assert!(h.directives("broad").is_empty());
    h.tick_to(broad_out);
    assert_eq!(
        h.position(&id),
        Some(("broad".into(), 0, Stage::Publishing { since: broad_out }))
    );
    // Forecast again while baking is done: the same instants.
    assert_eq!(
        h.predict("broad-0").at,
        Some(broad_out + default_lead()),
        "a forecast from a later state agrees with the first"
    );
}

#[test]
fn each_device_enters_at_its_own_ramp_step() {
    let mut h = Harness::new(policy(vec![ring_with("canary", &[30.0, 100.0], 1)]));
    let ids = h.devices("canary", 10);
    let id = h.submit(2);
    h.eval();
    let t0 = h.now;
    let first = h.in_ramp("canary", pct(30.0));
    assert!(
        !first.is_empty() && first.len() < ids.len(),
        "this rollout id puts some, not all, devices in the 30 % ramp: {first:?}"
    );
    let f = h.forecast();
    let second_out = t0 + default_lead() + hours(1);
    for d in &ids {
        let p = f.device(d).expect("forecast");
        if first.contains(d) {
            assert_eq!((p.step, p.at), (Some(0), Some(t0 + default_lead())), "{d}");
        } else {
            assert_eq!(
                (p.step, p.published_at, p.at),
                (Some(1), Some(second_out), Some(second_out + default_lead())),
                "{d}"
            );
        }
    }
    assert!(in_ramp(&id, &first[0], pct(30.0)));
}

#[test]
fn the_gate_waits_for_the_needed_commit_not_the_first() {
    // min_reports 2: the gate is the second commit. One device's own window opens a day
    // later; the other two commit at the usual time, so the gate does not wait for it.
    let mut h = Harness::at(
        policy(vec![
            ring_with("canary", &[100.0], 2),
            ring_with("broad", &[100.0], 1),
        ]),
        ts("2026-11-24T00:00:00Z"), // a Tuesday
    );
    h.devices("canary", 3);
    h.devices("broad", 1);
    h.set_windows("canary-2", &["Wed 00:00-01:00"], "UTC");
    h.submit(2);
    h.eval();
    let t0 = h.now;
    let f = h.forecast();
    assert_eq!(
        f.device("canary-2").and_then(|p| p.activates_at),
        Some(ts("2026-11-25T00:00:00Z"))
    );
    assert_eq!(
        f.rollouts[0].steps[0].gate_met_at,
        Some(t0 + default_lead())
    );
    assert_eq!(
        f.device("broad-0").and_then(|p| p.published_at),
        Some(t0 + default_lead() + hours(1))
    );
}

#[test]
fn a_manual_ring_waits_for_an_approval_instead_of_a_time() {
    let mut broad = ring_with("broad", &[100.0], 1);
    broad.promotion = Promotion::Manual;
    let mut h = Harness::new(policy(vec![ring_with("canary", &[100.0], 1), broad]));
    h.devices("canary", 1);
    h.devices("broad", 1);
    let id = h.submit(2);
    h.eval();
    let f = h.forecast();
    assert!(f.device("canary-0").and_then(|p| p.at).is_some());
    let p = f.device("broad-0").expect("forecast");
    assert_eq!(p.at, None, "no time is invented for a person's approval");
    assert_eq!(p.waits_for.as_deref(), Some("approval"));
    assert!(
        p.note.contains("waits for an approval of ring broad"),
        "{}",
        p.note
    );
    assert_eq!(f.rollouts[0].completes_at, None);

    // Approved ahead: the forecast has a time again.
    h.act_on(&id, RolloutAction::Approve, Some("broad"))
        .expect("approval ahead");
    assert!(h.predict("broad-0").at.is_some());
}

#[test]
fn a_ring_window_across_the_end_of_summer_time_opens_on_the_wall_clock() {
    // "Sat 02:00-04:00" in Berlin. Saturday 2026-10-24 05:00 CEST (03:00Z) is past it; Berlin
    // falls back on Sunday 2026-10-25, so the next one opens at 02:00 CET = 01:00Z, not 00:00Z.
    let mut r = ring_with("canary", &[100.0], 1);
    r.windows = vec![Window::parse("Sat 02:00-04:00").unwrap()];
    r.timezone = "Europe/Berlin".into();
    let mut h = Harness::at(policy(vec![r]), ts("2026-10-24T03:00:00Z"));
    h.devices("canary", 1);
    let id = h.submit(2);
    h.eval();
    assert_eq!(h.phase(&id), "waiting_window");
    let open = ts("2026-10-31T01:00:00Z");
    let p = h.predict("canary-0");
    assert_eq!(p.published_at, Some(open));
    assert_eq!(p.activates_at, Some(open + DEFAULT_DOWNLOAD));
    assert_eq!(p.at, Some(open + default_lead()));
    // The core publishes exactly then.
    h.tick_to(open - secs(1));
    assert_eq!(h.phase(&id), "waiting_window");
    h.tick_to(open);
    assert_eq!(h.phase(&id), "publishing");
}

#[test]
fn a_download_that_outlasts_the_ring_window_activates_in_the_next_one() {
    // The window closes 2 minutes after it opens; the 5-minute default download ends after
    // it, so activation waits for the next Saturday's window (DST already over: 01:00Z).
    let mut r = ring_with("canary", &[100.0], 1);
    r.windows = vec![Window::parse("Sat 02:00-02:02").unwrap()];
    r.timezone = "Europe/Berlin".into();
    let mut h = Harness::at(policy(vec![r]), ts("2026-10-24T00:00:00Z"));
    h.devices("canary", 1);
    h.submit(2);
    h.eval();
    let p = h.predict("canary-0");
    assert_eq!(
        p.published_at,
        Some(ts("2026-10-24T00:00:00Z")),
        "02:00 CEST"
    );
    assert_eq!(
        p.activates_at,
        Some(ts("2026-10-31T01:00:00Z")),
        "02:00 CET"
    );
    assert!(p.note.contains("ring's delivery window"), "{}", p.note);
}

#[test]
fn a_closed_device_window_delays_its_activation_and_a_gate_past_step_timeout_ends_the_forecast() {
    // Saturday 03:00Z; the device only activates Mon-Fri 02:00-04:00 UTC; the ring is always
    // open. Its commit is on Monday; canary's step_timeout (24 h) ends the step before that.
    let mut h = Harness::at(
        policy(vec![
            ring_with("canary", &[100.0], 1),
            ring_with("broad", &[100.0], 1),
        ]),
        ts("2026-11-28T03:00:00Z"),
    );
    h.devices("canary", 1);
    h.devices("broad", 1);
    h.set_windows("canary-0", &["Mon-Fri 02:00-04:00"], "UTC");
    h.submit(2);
    h.eval();
    let f = h.forecast();
    let p = f.device("canary-0").expect("forecast");
    assert_eq!(p.published_at, Some(ts("2026-11-28T03:00:00Z")));
    assert_eq!(p.activates_at, Some(ts("2026-11-30T02:00:00Z")));
    assert_eq!(
        p.at,
        Some(ts("2026-11-30T02:00:00Z") + DEFAULT_INSTALL + PROBATION)
    );
    assert!(p.note.contains("its own delivery window"), "{}", p.note);
    let b = f.device("broad-0").expect("forecast");
    assert_eq!(b.at, None);
    assert_eq!(b.waits_for.as_deref(), Some("step_timeout"));
}

#[test]
fn windows_that_never_meet_give_no_time() {
    let mut r = ring_with("canary", &[100.0], 1);
    r.windows = vec![Window::parse("Mon 02:00-03:00").unwrap()];
    let mut h = Harness::at(policy(vec![r]), ts("2026-11-30T02:00:00Z")); // a Monday
    h.devices("canary", 1);
    h.set_windows("canary-0", &["Tue 02:00-03:00"], "UTC");
    h.submit(2);
    h.eval();
    let p = h.predict("canary-0");
    assert_eq!(p.at, None);
    assert_eq!(p.waits_for.as_deref(), Some("window"));
}

#[test]
fn devices_under_way_are_forecast_from_their_phase() {
    let mut h = Harness::new(policy(vec![ring_with("canary", &[100.0], 3)]));
    h.devices("canary", 3);
    h.submit(2);
    h.eval();
    let t0 = h.now;
    h.tick(secs(100));
    h.report("canary-0", Phase::Probation);
    h.report("canary-1", Phase::Staged);
    h.tick(secs(20));
    h.report("canary-2", Phase::Committed);
    let f = h.forecast();
    let at = |d: &str| f.device(d).and_then(|p| p.at);
    assert_eq!(at("canary-0"), Some(t0 + secs(100) + PROBATION));
    assert_eq!(
        at("canary-1"),
        Some(t0 + secs(120) + DEFAULT_INSTALL + PROBATION),
        "staged: activates now"
    );
    assert_eq!(at("canary-2"), Some(t0 + secs(120)), "committed then");
    assert_eq!(
        f.rollouts[0].steps[0].gate_met_at,
        Some(t0 + secs(120) + DEFAULT_INSTALL + PROBATION),
        "the third commit meets the gate"
    );
}

#[test]
fn a_device_staged_ahead_of_its_step_activates_when_its_step_is_published() {
    // broad-0 holds the bytes already (staged early, as for a launch); it still activates
    // only once broad's step is out, and its download is not counted again.
    let mut h = Harness::new(policy(vec![
        ring_with("canary", &[100.0], 1),
        ring_with("broad", &[100.0], 1),
    ]));
    h.devices("canary", 1);
    h.devices("broad", 1);
    h.submit(2);
    h.eval();
    let t0 = h.now;
    h.report("broad-0", Phase::Staged);
    let broad_out = t0 + default_lead() + hours(1);
    let p = h.predict("broad-0");
    assert_eq!(p.published_at, Some(broad_out));
    assert_eq!(p.activates_at, Some(broad_out));
    assert_eq!(p.at, Some(broad_out + DEFAULT_INSTALL + PROBATION));
}

#[test]
fn a_ramp_too_small_for_its_gate_stops_the_forecast_there() {
    let mut h = Harness::new(policy(vec![
        ring_with("canary", &[100.0], 3),
        ring_with("broad", &[100.0], 1),
    ]));
    h.devices("canary", 2);
    h.devices("broad", 1);
    h.submit(2);
    h.eval();
    let f = h.forecast();
    assert!(f.device("canary-0").and_then(|p| p.at).is_some());
    let b = f.device("broad-0").expect("forecast");
    assert_eq!(b.waits_for.as_deref(), Some("gate_unreachable"));
    assert!(
        b.note.contains("needs 3 commit(s) but only 2"),
        "{}",
        b.note
    );
}

#[test]
fn a_paused_rollout_forecasts_no_later_step() {
    let mut h = Harness::new(policy(vec![
        ring_with("canary", &[100.0], 1),
        ring_with("broad", &[100.0], 1),
    ]));
    h.devices("canary", 1);
    h.devices("broad", 1);
    let id = h.submit(2);
    h.eval();
    h.act(&id, RolloutAction::Pause).expect("paused");
    let f = h.forecast();
    assert!(
        f.device("canary-0").and_then(|p| p.at).is_some(),
        "its directive is out: it still commits"
    );
    assert_eq!(
        f.device("broad-0").and_then(|p| p.waits_for.clone()),
        Some("paused".into())
    );
}

/// A device's kept events for one rollout: accepted at `start`, staged `download` later,
/// installed 1 s after that, committed `probation + lag` after the install.
fn history_of(
    device: &str,
    rollout: &str,
    start: Timestamp,
    download: i64,
    lag: i64,
) -> Vec<EventEntry> {
    let staged = start + secs(download);
    let installed = staged + secs(1);
    let kinds = [
        (start, EventKind::Accepted),
        (
            start + secs(1),
            EventKind::Downloading {
                received: 1,
                total: 2,
            },
        ),
        (staged, EventKind::Staged),
        (installed, EventKind::Installed),
        (installed + PROBATION + secs(lag), EventKind::Committed),
    ];
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, (at, kind))| EventEntry {
            seq: i as u64,
            // The controller's clock is an hour off the device's: durations are taken on one.
            received_at: at + hours(1),
            event: Event {
                id: format!("{device}-{rollout}-{i}"),
                device: device.into(),
                at,
                rollout_id: Some(rollout.into()),
                release: None,
                kind,
            },
        })
        .collect()
}

#[test]
fn download_install_and_commit_lag_are_the_medians_of_the_last_rollout_then_its_own() {
    let mut h = Harness::new(policy(vec![ring_with("canary", &[100.0], 1)]));
    let ids = h.devices("canary", 3);
    let r1 = h.submit(1);
    h.eval();
    h.report_all("canary", Phase::Committed);
    h.eval();
    h.tick(hours(1));
    assert_eq!(h.phase(&r1), "completed");
    let t1 = testkit::now();
    let mut history: HashMap<String, Vec<EventEntry>> = HashMap::new();
    for (d, (dl, lag)) in ids.iter().zip([(10, 2), (20, 4), (100, 9)]) {
        history.insert(d.clone(), history_of(d, &r1, t1, dl, lag));
    }

    let r2 = h.submit(2);
    h.eval();
    let t2 = h.now;
    let f = h.forecast_with(&history);
    let rf = &f.rollouts[0];
    assert_eq!((rf.download.secs, rf.download.samples), (20.0, 3));
    assert_eq!(rf.download.measured_on, vec![r1.clone()]);
    assert_eq!((rf.install.secs, rf.commit_lag.secs), (1.0, 4.0));
    assert_eq!(
        f.device("canary-0").and_then(|p| p.at),
        Some(t2 + secs(20 + 1) + PROBATION + secs(4)),
        "download, install, probation and its lag, all measured"
    );

    // Once three devices measured the rollout itself, its own figures replace the last's.
    for d in &ids {
        let mut v = history.remove(d).unwrap_or_default();
        let more = history_of(d, &r2, t2, 50, 0);
        v.extend(more.into_iter().map(|mut e| {
            e.seq += 10;
            e
        }));
        history.insert(d.clone(), v);
    }
    let rf = h.forecast_with(&history).rollouts[0].clone();
    assert_eq!(
        (rf.download.secs, rf.download.measured_on),
        (50.0, vec![r2])
    );
}

#[test]
fn a_download_restarted_by_a_later_step_counts_from_the_directive_it_started_on() {
    // An early step's directive (accepted, not in its ramp), then the step that includes it
    // 10 minutes later: the download is the 30 s after the second.
    let t = testkit::now();
    let mut ev = history_of("d", "r", t + secs(600), 30, 0);
    ev.insert(
        0,
        EventEntry {
            seq: 0,
            received_at: t,
            event: Event {
                id: "early".into(),
                device: "d".into(),
                at: t,
                rollout_id: Some("r".into()),
                release: None,
                kind: EventKind::Accepted,
            },
        },
    );
    for (i, e) in ev.iter_mut().enumerate() {
        e.seq = i as u64;
    }
    let mut h = Harness::new(policy(vec![ring_with("canary", &[100.0], 1)]));
    h.devices("canary", 1);
    let r1 = h.submit(1);
    let history: HashMap<String, Vec<EventEntry>> = [(
        "canary-0".to_owned(),
        ev.into_iter()
            .map(|mut e| {
                e.event.rollout_id = Some(r1.clone());
                e
            })
            .collect(),
    )]
    .into_iter()
    .collect();
    h.report("canary-0", Phase::Committed);
    let rf = h.forecast_with(&history).rollouts[0].clone();
    assert_eq!(rf.download.secs, 30.0);
}

#[test]
fn waits_for_codes_are_unique_snake_case_and_in_the_operations_guide() {
    let doc = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ));
    let ring = || "r".to_owned();
    for w in [
        Wait::Approval { ring: ring() },
        Wait::Paused,
        Wait::Queued,
        Wait::GateUnreachable {
            ring: ring(),
            step: 0,
            needed: 2,
            can_commit: 1,
        },
        Wait::StepTimeout {
            ring: ring(),
            step: 0,
            timeout: "1d".into(),
        },
        Wait::NoWindow { ring: ring() },
        Wait::UnknownRing { ring: ring() },
    ] {
        assert!(WAITS_FOR.contains(&w.code()), "{w:?}");
    }
    let mut codes = WAITS_FOR.to_vec();
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
    assert_eq!(codes.len(), WAITS_FOR.len(), "codes are unique");
}

#[test]
fn a_failed_device_its_ring_retries_is_forecast_from_the_retry_and_one_out_of_attempts_is_not() {
    let mut r = ring_with("canary", &[100.0], 1);
    r.retries = 1;
    r.retry_backoff = Dur::secs(600);
    r.gate.max_failure_rate = 1.0; // a final failure does not halt here
    let mut h = Harness::new(policy(vec![r]));
    h.devices("canary", 2);
    h.submit(2);
    h.eval();
    let t0 = h.now;
    h.tick(secs(100));
    h.report_attempt("canary-0", Phase::Reverted, 1);
    let p = h.predict("canary-0");
    let retry = t0 + secs(600);
    assert_eq!(
        p.at,
        Some(retry + default_lead()),
        "asked again when the backoff ends, then download, install, probation: {}",
        p.note
    );
    assert!(p.note.contains("failed at attempt 1"), "{}", p.note);
    // At the last attempt a failure is final: no time.
    h.report_attempt("canary-1", Phase::Failed, 2);
    let p = h.predict("canary-1");
    assert_eq!(p.at, None);
    assert!(p.note.contains("failed this release"), "{}", p.note);
    // Once the retry is out, a device that failed at the earlier attempt goes again at once.
    h.tick(secs(500));
    let now = h.now;
    let p = h.predict("canary-0");
    assert_eq!(h.directive("canary").attempt, 2, "the retry is out");
    assert_eq!(p.at, Some(now + default_lead()), "{}", p.note);
}

#[test]
fn a_held_launch_forecasts_no_time_and_says_why() {
    let mut h = Harness::new(policy(vec![
        ring_with("canary", &[100.0], 1),
        ring_with("broad", &[100.0], 1),
    ]));
    h.devices("canary", 1);
    h.devices("broad", 1);
    let launch = h.now.checked_add(hours(2)).unwrap();
    let id = h.submit_launch(2, launch, LaunchMode::Rings);
    h.eval();
    let p = h.predict("canary-0");
    assert_eq!(
        p.at,
        Some(launch + DEFAULT_INSTALL + PROBATION),
        "staged ahead, activates at the launch: {}",
        p.note
    );
    h.relaunch(&id, None).expect("held");
    for d in ["canary-0", "broad-0"] {
        let p = h.predict(d);
        assert_eq!(p.at, None, "{d}: {}", p.note);
        assert_eq!(p.waits_for.as_deref(), Some("launch_held"), "{d}");
    }
    let f = h.forecast();
    assert_eq!(f.rollouts[0].completes_at, None);
    assert_eq!(
        f.rollouts[0].waits.as_ref().map(|w| w.code()),
        Some("launch_held")
    );
}
