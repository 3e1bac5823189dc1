//! Delivery windows, judged on the wall clock of the ring's time zone: across the two DST
//! changes of Europe/Berlin a window opens at the instant people reading the policy expect.

use super::*;
use ringcast_proto::Window;

fn berlin(windows: &[&str]) -> Policy {
    let mut r = ring("canary");
    r.windows = windows
        .iter()
        .map(|w| Window::parse(w).expect("a window"))
        .collect();
    r.timezone = "Europe/Berlin".into();
    policy(vec![r])
}

/// A rollout submitted and evaluated at `at`, with two devices on the ring.
fn waiting(policy: Policy, at: &str) -> (Harness, String) {
    let mut h = Harness::at(policy, ts(at));
    h.devices("canary", 2);
    let id = h.submit(2);
    h.eval();
    (h, id)
}

#[test]
fn a_daily_window_opens_an_hour_earlier_in_utc_once_summer_time_starts() {
    // Berlin springs forward on Sunday 2027-03-28 (02:00 CET -> 03:00 CEST). "Daily
    // 03:30-05:00" is 02:30Z on Saturday and 01:30Z on Sunday.
    let (mut h, id) = waiting(berlin(&["Daily 03:30-05:00"]), "2027-03-27T01:00:00Z");
    assert_eq!(h.phase(&id), "waiting_window");
    h.tick_to(ts("2027-03-27T02:29:00Z"));
    assert_eq!(h.phase(&id), "waiting_window");
    assert!(h.directives("canary").is_empty(), "nothing published");
    h.tick_to(ts("2027-03-27T02:30:00Z"));
    assert_eq!(h.phase(&id), "publishing", "Saturday 03:30 CET");

    let (mut h, id) = waiting(berlin(&["Daily 03:30-05:00"]), "2027-03-27T12:00:00Z");
    h.tick_to(ts("2027-03-28T01:29:00Z"));
    assert_eq!(h.phase(&id), "waiting_window");
    h.tick_to(ts("2027-03-28T01:30:00Z"));
    assert_eq!(h.phase(&id), "publishing", "Sunday 03:30 CEST");
    // The directive carries the windows and their zone, for the devices to judge too.
    let d = h.directive("canary");
    assert_eq!(d.activation.timezone.as_deref(), Some("Europe/Berlin"));
    assert_eq!(
        d.activation.windows,
        vec![Window::parse("Daily 03:30-05:00").unwrap()]
    );
    assert!(
        h.audit_details("publish")[0].ends_with("(delivery window open)"),
        "{:?}",
        h.audit_details("publish")
    );
}

#[test]
fn a_window_starting_in_the_spring_forward_gap_opens_when_the_gap_ends() {
    // 02:00 does not exist on 2027-03-28 in Berlin: the window opens at 03:00 CEST (01:00Z)
    // and still closes at 04:00 CEST (02:00Z).
    let (mut h, id) = waiting(berlin(&["Sun 02:00-04:00"]), "2027-03-27T12:00:00Z");
    h.tick_to(ts("2027-03-28T00:59:00Z"));
    assert_eq!(h.phase(&id), "waiting_window");
    h.tick_to(ts("2027-03-28T01:00:00Z"));
    assert_eq!(h.phase(&id), "publishing");

    let (mut h, id) = waiting(berlin(&["Sun 02:00-04:00"]), "2027-03-28T02:00:00Z");
    assert_eq!(h.phase(&id), "waiting_window", "closed at 04:00 CEST");
    h.tick_to(ts("2027-04-04T00:00:00Z"));
    assert_eq!(h.phase(&id), "publishing", "next Sunday 02:00 CEST");
}

#[test]
fn a_window_on_the_day_summer_time_ends_opens_at_the_first_two_oclock() {
    // Berlin falls back on Sunday 2027-10-31 (03:00 CEST -> 02:00 CET): 02:00 happens twice.
    // "Sun 02:00-04:00" opens at the first (CEST, 00:00Z) and closes at 04:00 CET (03:00Z).
    let (mut h, id) = waiting(berlin(&["Sun 02:00-04:00"]), "2027-10-30T12:00:00Z");
    h.tick_to(ts("2027-10-30T23:59:00Z"));
    assert_eq!(h.phase(&id), "waiting_window");
    h.tick_to(ts("2027-10-31T00:00:00Z"));
    assert_eq!(h.phase(&id), "publishing");

    let (h, id) = waiting(berlin(&["Sun 02:00-04:00"]), "2027-10-31T02:59:00Z");
    assert_eq!(h.phase(&id), "publishing", "03:59 CET is inside");
    let (mut h, id) = waiting(berlin(&["Sun 02:00-04:00"]), "2027-10-31T03:00:00Z");
    assert_eq!(h.phase(&id), "waiting_window", "04:00 CET is not");
    h.tick_to(ts("2027-11-07T00:59:00Z"));
    assert_eq!(h.phase(&id), "waiting_window");
    h.tick_to(ts("2027-11-07T01:00:00Z"));
    assert_eq!(h.phase(&id), "publishing", "next Sunday 02:00 CET");
}

#[test]
fn every_step_waits_for_the_window() {
    let mut p = berlin(&["Daily 02:00-04:00"]);
    p.rings[0].steps = vec![pct(50.0), Percent::FULL];
    p.rings[0].gate.min_reports = 1;
    p.rings[0].bake = Dur::secs(3 * 3600);
    // 2027-06-01 is CEST: the window is 00:00Z-02:00Z.
    let mut h = Harness::at(p, ts("2027-06-01T00:30:00Z"));
    h.devices("canary", 8);
    let id = h.submit(2);
    h.eval();
    assert_eq!(h.phase(&id), "publishing");
    for d in h.in_ramp("canary", pct(50.0)) {
        h.report(&d, Phase::Committed);
    }
    h.eval();
    h.tick(hours(3));
    // The first step passed at 03:30Z, after the window closed: the next step waits for it.
    assert_eq!(
        h.position(&id),
        Some(("canary".into(), 1, Stage::WaitingWindow))
    );
    h.tick_to(ts("2027-06-01T23:59:00Z"));
    assert_eq!(h.phase(&id), "waiting_window");
    h.tick_to(ts("2027-06-02T00:00:00Z"));
    assert_eq!(h.position(&id).map(|p| p.1), Some(1));
    let step = &h.rollout(&id).history[1];
    assert_eq!(
        (step.percent, step.published_at),
        (Percent::FULL, ts("2027-06-02T00:00:00Z"))
    );
    assert_eq!(h.directive("canary").percent, Percent::FULL);
}
