//! Issue 10 on the operator's side, on the real embedded broker with real sled and HTTP: a
//! device reporting `deferred` is counted apart, neither failed nor pending, and shown so in
//! the API's tally, `ringcast rollout show` (its own column), `/metrics`, and `ringcast
//! devices show` (the reason in its error slot, the `deferred` event with its deadline).

mod common;

use common::*;
use ringcast_proto::report::ErrorInfo;
use ringcast_proto::{Event, EventKind, Phase};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_device_is_shown_apart_in_the_tally_rollout_show_metrics_and_devices_show() {
    let w = World::new();
    // Any failure would halt: a deferral must not count as one.
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 2, 0.0)]))
        .await;
    let fleet = Fleet::connect(&w).await;
    fleet.report_all("canary", 2, None, Phase::Idle, 1).await;
    wait_for(10, "both devices known", || {
        (h.shared().devices.read().unwrap().len() == 2).then_some(())
    })
    .await;
    let (_, ro) = w.submit_now(&h, 2).await;
    fleet
        .report("canary-0", "canary", Some(&ro.id), Phase::Committed, 2)
        .await;
    let until = ts("2026-11-24T08:00:00Z");
    let detail = format!("battery at 12%; deferred until {until}, asking again at {until}");
    fleet
        .report_with_error(
            "canary-1",
            "canary",
            Some(&ro.id),
            Phase::Deferred,
            2,
            Some(ErrorInfo {
                reason: "deferred".into(),
                detail: detail.clone(),
            }),
        )
        .await;
    let deferred = Event {
        id: "canary-1-1-1".into(),
        device: "canary-1".into(),
        at: ringcast_proto::testkit::now(),
        rollout_id: Some(ro.id.clone()),
        release: None,
        kind: EventKind::Deferred {
            reason: "battery at 12%".into(),
            until,
        },
    };
    fleet.event("canary-1", &deferred).await;
    wait_for(10, "the deferred report and its event", || {
        (count_phase(&h, &ro.id, Phase::Deferred) == 1
            && h.shared()
                .counters
                .events
                .load(std::sync::atomic::Ordering::Relaxed)
                == 1)
            .then_some(())
    })
    .await;
    settle(&w, &h).await;

    // The API's tally: apart from commits, failures and pending devices; the step waits.
    let v = api(&h, VIEWER).rollout(&ro.id).await.expect("GET rollout");
    assert_eq!(v.phase, "publishing");
    let t = v.rings[0].tally;
    assert_eq!(
        (t.committed, t.deferred, t.failed, t.pending, t.unresponsive),
        (1, 1, 0, 0, 0),
        "{t:?}"
    );

    // `ringcast rollout show`: a DEFERRED column, 1 in canary's row.
    let text = cli(&h, &["rollout", "show", &ro.id]).await;
    let header = text
        .lines()
        .find(|l| l.starts_with("RING"))
        .unwrap_or_else(|| panic!("no table in:\n{text}"));
    let row = text
        .lines()
        .find(|l| l.starts_with("canary"))
        .unwrap_or_else(|| panic!("no canary row in:\n{text}"));
    let cols: Vec<&str> = header.split_whitespace().collect();
    let at = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .unwrap_or_else(|| panic!("no {name} column in {header:?}"))
    };
    // The committed cell is a bar and a count: count cells from the right.
    let cells: Vec<&str> = row.split_whitespace().collect();
    let from_right = |name: &str| cells[cells.len() - (cols.len() - at(name))];
    assert_eq!(
        (
            from_right("FAILED"),
            from_right("PENDING"),
            from_right("DEFERRED")
        ),
        ("0", "0", "1"),
        "{text}"
    );

    // /metrics.
    let m = reqwest::get(format!("{}/metrics", h.http_url()))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    let line = format!(
        "ringcast_ring_devices{{rollout=\"{}\",ring=\"canary\",outcome=\"deferred\"}} 1",
        ro.id
    );
    assert!(m.contains(&line), "{line} missing from\n{m}");

    // `ringcast devices show`: why and until when.
    let text = cli(&h, &["devices", "show", "canary-1"]).await;
    assert!(text.contains("phase     deferred"), "{text}");
    assert!(
        text.contains(&format!("error     deferred: {detail}")),
        "{text}"
    );
    // The forecast takes a deferring device as staged (its deadline is not modelled).
    assert!(text.contains("update    commits "), "{text}");
    let ev = text
        .lines()
        .position(|l| l.contains("#0 ") && l.contains(" deferred "))
        .unwrap_or_else(|| panic!("no deferred event in:\n{text}"));
    let fields: Vec<&str> = text.lines().skip(ev + 1).take(2).collect();
    assert_eq!(
        fields,
        [
            "      reason  battery at 12%".to_owned(),
            format!("      until   {until}")
        ],
        "{text}"
    );
    h.shutdown().await;
}
