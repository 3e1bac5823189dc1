//! End-to-end scenarios against the EMBEDDED broker (rumqttd): the real controller, real
//! agents (sled stores, real bundles and health checks), real HTTP artifact downloads. The
//! same cases run over Mosquitto with mutual TLS in `scenarios_mosquitto.rs`.

#[path = "scenarios/cases.rs"]
mod cases;

use ringcast_tests::sim_stage::BrokerKind::Embedded;
use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_11_agent_sigkilled_mid_install_resumes_or_reverts() {
    cases::acceptance_11_agent_sigkilled_mid_install_resumes_or_reverts(
        Embedded,
        Path::new(env!("CARGO_BIN_EXE_ringcast-sim")),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_13_hanging_health_check_reverts_without_broker() {
    cases::acceptance_13_hanging_health_check_reverts_without_broker(Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_14_release_that_breaks_network_still_reverts_and_reports_later() {
    cases::acceptance_14_release_that_breaks_network_still_reverts_and_reports_later(Embedded)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_15_broker_restart_mid_rollout_completes() {
    cases::acceptance_15_broker_restart_mid_rollout_completes(Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_16_controller_restart_mid_bake_resumes_same_step() {
    cases::acceptance_16_controller_restart_mid_bake_resumes_same_step(Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_20_reports_attributed_only_to_topic_device() {
    cases::acceptance_20_reports_attributed_only_to_topic_device(Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_21_bad_release_halts_at_canary() {
    cases::acceptance_21_bad_release_halts_at_canary(Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_completes_end_to_end() {
    cases::rollout_completes_end_to_end(Embedded).await;
}

/// `ringcast demo`'s script, small: v1 and v2 reach every device, v3 reverts on canary and
/// halts there, and the demo's own checks find nothing wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_to_a_green_summary() {
    use ringcast::demo::show::{run, Options};
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let opts = Options {
        devices: 6,
        bake: std::time::Duration::from_millis(500),
        approval_pause: std::time::Duration::from_millis(200),
        ..Options::default()
    };
    let summary = run(opts, stop).await.expect("demo runs");
    assert!(summary.problems.is_empty(), "{}", summary.table());
    let outcomes: Vec<&str> = summary
        .releases
        .iter()
        .map(|r| r.outcome.as_str())
        .collect();
    assert_eq!(outcomes, ["completed", "completed", "halted"]);
    assert_eq!(summary.releases[2].rings_reached, ["canary"]);
    assert_eq!(summary.releases[2].committed, 0);
    assert!(summary.releases[2].reverted >= 1);
}
