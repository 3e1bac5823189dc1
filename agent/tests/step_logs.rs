//! STYLE.md rule 11 over a real agent, broker and HTTP server: every line the agent logs inside
//! a rollout step (download, verify, stage, activate, probation, commit, revert) carries that
//! step's `rollout_id`, `ring` and `release`, so grepping for a rollout id finds all of it.
//!
//! Its own test binary: the logger is installed as the process-wide subscriber, which is what
//! reaches the agent's spawned tasks on every worker thread.

mod common;
use common::*;
use ringcast_agent::log::{Buffer, Filter, Logger};
use ringcast_proto::testkit::Fixture;
use ringcast_proto::Phase;
use std::time::Duration;

const STEPS: [&str; 7] = [
    "download",
    "verify",
    "stage",
    "activate",
    "probation",
    "commit",
    "revert",
];

/// The span names of a text line (`agent:download:` → `["agent", "download"]`), empty when it
/// was logged outside any span.
fn span_path(line: &str) -> Vec<&str> {
    match line.split_whitespace().nth(2) {
        // The third word is the span path, unless it is already the target (`a::b:`).
        Some(w) if w.ends_with(':') && !w.contains("::") => {
            w.trim_end_matches(':').split(':').collect()
        }
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_of_a_rollout_step_names_its_rollout_ring_and_release() {
    let out = Buffer::default();
    Logger::new(Filter::parse("info,ringcast_agent=debug"), false)
        .with_writer(out.clone())
        .install();

    let port = start_broker();
    let http = HttpServer::start();
    let f = Fixture::new();
    let dev = Device::new(&f, "dev-logs", port);
    let ctl = Ctl::connect(port, "ctl-logs").await;
    let agent = dev.spawn();

    // A release that commits …
    let good = app_bundle("1.1.0", true);
    http.route("/a/good", vec![Serve::Bytes(good.clone())]);
    let r = release(1, 1, &http.url("/a/good"), &good);
    ctl.ring_directive(&directive(&f, "roll-good", &r).sign(&[&f.controller]))
        .await;
    ctl.wait_state("committed", Duration::from_secs(30), |s| {
        s.phase == Phase::Committed
    })
    .await;

    // … and one whose health check fails, so it reverts.
    let bad = app_bundle("1.2.0", false);
    http.route("/a/bad", vec![Serve::Bytes(bad.clone())]);
    let r2 = release(2, 1, &http.url("/a/bad"), &bad);
    ctl.ring_directive(&directive(&f, "roll-bad", &r2).sign(&[&f.controller]))
        .await;
    ctl.wait_state("reverted", Duration::from_secs(30), |s| {
        s.phase == Phase::Reverted
    })
    .await;
    agent.shutdown().await.unwrap();

    let text = out.contents();
    let lines: Vec<&str> = text.lines().collect();
    let in_step = |l: &&str| span_path(l).iter().any(|s| STEPS.contains(s));
    // Every line inside a step names the rollout, the ring and the release.
    let stepped: Vec<&str> = lines.iter().copied().filter(in_step).collect();
    assert!(!stepped.is_empty(), "no step lines at all:\n{text}");
    for l in &stepped {
        for field in [
            "device=dev-logs",
            "ring=canary",
            "rollout_id=",
            "release=app@",
        ] {
            assert_eq!(l.matches(field).count(), 1, "{field} not once in {l}");
        }
    }
    // Each step of each rollout logged at least one line, under the right rollout and release.
    let expect = [
        ("roll-good", "app@1.1.0", &STEPS[..6]),
        (
            "roll-bad",
            "app@1.2.0",
            &["download", "activate", "revert"][..],
        ),
    ];
    for (rollout, rel, steps) in expect {
        for step in steps {
            let found = stepped.iter().any(|l| {
                span_path(l).contains(step)
                    && l.contains(&format!("rollout_id={rollout}"))
                    && l.contains(&format!("release={rel}"))
            });
            assert!(found, "no {step} line for {rollout} ({rel}):\n{text}");
        }
    }
    // A step's fields never leak onto the other rollout's lines.
    for l in &stepped {
        let good = l.contains("rollout_id=roll-good");
        assert_eq!(good, l.contains("release=app@1.1.0"), "{l}");
    }
}
