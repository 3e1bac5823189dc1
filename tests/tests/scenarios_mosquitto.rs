//! End-to-end scenarios against the SHIPPED Mosquitto config over mutual TLS (controller and
//! every agent with its own certificate, per-device ACL): the real controller, real agents
//! (sled stores, real bundles and health checks), real HTTP artifact downloads. Each
//! test starts its own Mosquitto on a free port (`ringcast_tests::lab`); without a
//! `mosquitto` binary the tests print why they skip, and under `CI` they fail instead.

#[path = "scenarios/cases.rs"]
mod cases;

use ringcast_tests::sim_stage::BrokerKind::Mosquitto;
use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_11_agent_sigkilled_mid_install_resumes_or_reverts() {
    cases::acceptance_11_agent_sigkilled_mid_install_resumes_or_reverts(
        Mosquitto,
        Path::new(env!("CARGO_BIN_EXE_ringcast-sim")),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_13_hanging_health_check_reverts_without_broker() {
    cases::acceptance_13_hanging_health_check_reverts_without_broker(Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_14_release_that_breaks_network_still_reverts_and_reports_later() {
    cases::acceptance_14_release_that_breaks_network_still_reverts_and_reports_later(Mosquitto)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_15_broker_restart_mid_rollout_completes() {
    cases::acceptance_15_broker_restart_mid_rollout_completes(Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_16_controller_restart_mid_bake_resumes_same_step() {
    cases::acceptance_16_controller_restart_mid_bake_resumes_same_step(Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_20_reports_attributed_only_to_topic_device() {
    cases::acceptance_20_reports_attributed_only_to_topic_device(Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_21_bad_release_halts_at_canary() {
    cases::acceptance_21_bad_release_halts_at_canary(Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_completes_end_to_end_over_mutual_tls_with_shipped_mosquitto_config() {
    cases::rollout_completes_end_to_end(Mosquitto).await;
}
