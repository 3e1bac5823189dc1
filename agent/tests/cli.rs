//! The `ringcast-agent` command line: `--once`, `status`, and bad configuration.

mod common;
use common::*;
use ringcast_proto::testkit::Fixture;
use std::process::Command;
use std::time::Duration;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringcast-agent"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_processes_the_retained_directive_then_exits_and_status_shows_it() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let dev = Device::new(&f, "dev-once", port);
    let config = dev.write_config();
    let ctl = Ctl::connect(port, "ctl-once").await;
    let art = app_bundle("1.2.0", true);
    http.route("/o", vec![Serve::Bytes(art.clone())]);
    let r = release(2, 1, &http.url("/o"), &art);
    ctl.ring_directive(&directive(&f, "once", &r).sign(&[&f.controller]))
        .await;
    let out = tokio::task::spawn_blocking(move || {
        let mut child = bin()
            .arg("--config")
            .arg(&config)
            .arg("--once")
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return (st, config);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("--once did not exit within 60s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    assert!(out.0.success(), "{:?}", out.0);
    ctl.wait_state("committed", Duration::from_secs(10), |s| {
        s.phase == ringcast_proto::Phase::Committed
    })
    .await;
    let st = bin()
        .arg("status")
        .arg("--config")
        .arg(&out.1)
        .output()
        .unwrap();
    assert!(st.status.success());
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(
        text.contains("committed") && text.contains("1.2.0") && text.contains("once"),
        "{text}"
    );
    let st = bin()
        .args(["status", "--json", "--config"])
        .arg(&out.1)
        .output()
        .unwrap();
    let report = ringcast_proto::StateReport::parse(&st.stdout).unwrap();
    assert_eq!(report.current.unwrap().version, "1.2.0");
}

#[test]
fn bad_config_exits_non_zero_naming_file_and_field() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("agent.toml");
    std::fs::write(
        &p,
        "device_id = \"d\"\ndevice_class = \"c\"\nfleet = \"f\"\nring = \"r\"\ndata_dir = \"x\"\ntrust_root = \"t\"\nbrokr = 1\n[broker]\nurl = \"mqtt://h:1\"\n",
    )
    .unwrap();
    let out = bin().arg("--config").arg(&p).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agent.toml") && err.contains("brokr") && err.contains("bad_config"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    std::fs::write(
        &p,
        "device_id = \"d\"\ndevice_class = \"c\"\nfleet = \"f\"\nring = \"r\"\ndata_dir = \"x\"\ntrust_root = \"t\"\n[broker]\nurl = \"http://h:1\"\n",
    )
    .unwrap();
    let out = bin().arg("--config").arg(&p).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("broker.url"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully() {
    let f = Fixture::new();
    let port = start_broker();
    let dev = Device::new(&f, "dev-term", port);
    let config = dev.write_config();
    let ctl = Ctl::connect(port, "ctl-term").await;
    let mut child = bin().arg("--config").arg(&config).spawn().unwrap();
    ctl.wait_state("agent up", Duration::from_secs(20), |_| true)
        .await;
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let st = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(st.success(), "{st:?}");
}
