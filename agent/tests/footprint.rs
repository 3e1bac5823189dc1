//! Footprint measurement (BENCHMARKS.md "Agent footprint"), ignored by default:
//!
//! ```text
//! cargo build --profile agent -p ringcast-agent
//! RINGCAST_AGENT_BIN=$CARGO_TARGET_DIR/agent/ringcast-agent \
//!   cargo test -p ringcast-agent --test footprint -- --ignored --nocapture
//! ```
//! Starts an embedded broker in this process, runs the agent binary against it, waits until
//! its state report arrives (connected and subscribed), lets it idle, then prints the binary
//! size and the process's RSS and PSS.

mod common;
use common::*;
use ringcast_proto::testkit::Fixture;
use std::time::Duration;

fn proc_kb(pid: u32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand with --ignored --nocapture"]
async fn footprint_idle_connected() {
    let bin = std::env::var("RINGCAST_AGENT_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_ringcast-agent").to_string());
    let idle: u64 = std::env::var("IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let f = Fixture::new();
    let port = start_broker();
    let dev = Device::new(&f, "dev-footprint", port);
    let config = dev.write_config();
    // Quiet logs, as on a device.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("info,ringcast_agent=debug", "info");
    std::fs::write(&config, text).unwrap();
    let ctl = Ctl::connect(port, "ctl-footprint").await;
    let mut child = std::process::Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    ctl.wait_state("agent connected", Duration::from_secs(20), |_| true)
        .await;
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let pid = child.id();
    let rss = proc_kb(pid, "status", "VmRSS:");
    let hwm = proc_kb(pid, "status", "VmHWM:");
    let pss = proc_kb(pid, "smaps_rollup", "Pss:");
    let threads = proc_kb(pid, "status", "Threads:");
    let size = std::fs::metadata(&bin).unwrap().len();
    println!(
        "ringcast-agent {bin}: binary {size} B, idle RSS {rss} kB (peak {hwm} kB), PSS {pss} kB, {threads} threads (connected, after {idle}s)"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
