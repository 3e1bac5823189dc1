//! ACCEPTANCE.md cases 9, 17 and 18: bad artifact bytes, a full disk, a stalling or
//! dripping server. Real HTTP, real broker, real files.

mod common;
use common::*;
use ringcast_proto::testkit::Fixture;
use ringcast_proto::{EventKind, Phase};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn failures(ctl: &Ctl) -> Vec<(String, u64)> {
    ctl.events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::DownloadFailed {
                reason,
                retry_in_ms,
                ..
            } => Some((reason.clone(), *retry_in_ms)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_09_artifact_digest_mismatch_short_or_long_is_discarded_and_retried() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let dev = Device::new(&f, "dev-a09", port);
    let ctl = Ctl::connect(port, "ctl-a09").await;
    let agent = dev.spawn();
    let art = app_bundle("1.2.0", true);
    let mut wrong = art.clone();
    let mid = wrong.len() / 2;
    wrong[mid] ^= 0xff;
    let short = art[..art.len() - 10].to_vec();
    let mut long = art.clone();
    long.extend_from_slice(b"trailing garbage");
    http.route(
        "/a",
        vec![
            Serve::NoRange(wrong),
            Serve::NoRange(short),
            Serve::NoRange(long),
            Serve::Bytes(art.clone()),
        ],
    );
    let r = release(2, 1, &http.url("/a"), &art);
    ctl.ring_directive(&directive(&f, "r9", &r).sign(&[&f.controller]))
        .await;
    ctl.wait_state("committed", Duration::from_secs(60), |s| {
        s.phase == Phase::Committed
    })
    .await;
    let fails = failures(&ctl);
    let reasons: Vec<&str> = fails.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        reasons,
        ["digest_mismatch", "size_mismatch", "too_large"],
        "{fails:?}"
    );
    // Backoff grows between attempts.
    assert!(fails[2].1 > fails[0].1, "{fails:?}");
    // Never installed before the right bytes: one `installed`, after the failures.
    assert_eq!(ctl.event_count("installed"), 1);
    assert_eq!(http.hits.load(Ordering::SeqCst), 4);
    // Nothing left in the download area.
    let leftovers: Vec<_> = std::fs::read_dir(dev.cfg.data_dir.join("artifacts"))
        .unwrap()
        .flatten()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_18_stalled_download_aborts_and_resumes_with_range() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let mut dev = Device::new(&f, "dev-a18", port);
    dev.cfg.download.stall_timeout = ringcast_proto::Dur(Duration::from_millis(800));
    let ctl = Ctl::connect(port, "ctl-a18").await;
    let agent = dev.spawn();
    // Incompressible content so the artifact is big enough to split.
    let noise = noise(200_000);
    let art = bundle(&[
        ("VERSION", b"1.2.0\n", 0o644),
        ("health.sh", b"#!/bin/sh\nexit 0\n", 0o755),
        ("blob", &noise, 0o644),
    ]);
    let half = art.len() / 2;
    http.route(
        "/big",
        vec![
            Serve::StallAfter {
                bytes: art.clone(),
                after: half,
            },
            // A drip that keeps moving (faster than the stall timeout) is not aborted.
            Serve::Drip {
                bytes: art.clone(),
                chunk: 16 * 1024,
                every: Duration::from_millis(50),
            },
        ],
    );
    let r = release(2, 1, &http.url("/big"), &art);
    ctl.ring_directive(&directive(&f, "r18", &r).sign(&[&f.controller]))
        .await;
    ctl.wait_state("committed", Duration::from_secs(60), |s| {
        s.phase == Phase::Committed
    })
    .await;
    let fails = failures(&ctl);
    assert_eq!(fails.len(), 1, "{fails:?}");
    assert_eq!(fails[0].0, "stalled");
    let ranges = http.ranges.lock().unwrap().clone();
    assert_eq!(
        ranges,
        [format!("{half}-")],
        "resumed where the stall left off"
    );
    ctl.wait_event("progress", Duration::from_secs(5), |e| {
        matches!(e.kind, EventKind::Downloading { received, total } if received == total && total == art.len() as u64)
    })
    .await;
    agent.shutdown().await.unwrap();
}

/// A size-limited tmpfs mounted on `dir`; unmounted on drop. `None` when mounting is not
/// permitted here.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_17_disk_full_fails_cleanly_and_keeps_current() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let mut dev = Device::new(&f, "dev-a17", port);
    // No retry while the test looks at the disk; a newer directive starts at once anyway.
    dev.cfg.download.retry_initial = ringcast_proto::Dur(Duration::from_secs(30));
    dev.cfg.download.retry_max = ringcast_proto::Dur(Duration::from_secs(60));
    let releases = dev.install_root().join("releases");
    let Some(rel_fs) = Tmpfs::mount(&releases, "256k") else {
        eprintln!("SKIPPED acceptance_17: cannot mount a size-limited tmpfs here (needs root)");
        return;
    };
    let Some(dl_fs) = Tmpfs::mount(&dev.cfg.data_dir.join("artifacts"), "64k") else {
        eprintln!("SKIPPED acceptance_17: cannot mount a size-limited tmpfs here (needs root)");
        return;
    };
    let ctl = Ctl::connect(port, "ctl-a17").await;
    let agent = dev.spawn();
    // A small first release fits everywhere.
    let art1 = app_bundle("1.1.0", true);
    http.route("/one", vec![Serve::Bytes(art1.clone())]);
    let r1 = release(1, 1, &http.url("/one"), &art1);
    ctl.ring_directive(&directive(&f, "r17a", &r1).sign(&[&f.controller]))
        .await;
    ctl.wait_state("first committed", Duration::from_secs(30), |s| {
        s.phase == Phase::Committed
    })
    .await;

    // Download: an incompressible 100 KiB artifact does not fit in 64 KiB of artifact space.
    let noise = noise(100_000);
    let art2 = bundle(&[
        ("VERSION", b"1.2.0\n", 0o644),
        ("health.sh", b"#!/bin/sh\nexit 0\n", 0o755),
        ("blob", &noise, 0o644),
    ]);
    http.route("/two", vec![Serve::Bytes(art2.clone())]);
    let r2 = release(2, 1, &http.url("/two"), &art2);
    ctl.ring_directive(&directive(&f, "r17b", &r2).sign(&[&f.controller]))
        .await;
    ctl.wait_event(
        "disk_full on download",
        Duration::from_secs(20),
        |e| matches!(&e.kind, EventKind::DownloadFailed { reason, .. } if reason == "disk_full"),
    )
    .await;
    let s = ctl
        .wait_state("last_error disk_full", Duration::from_secs(10), |s| {
            s.last_error
                .as_ref()
                .is_some_and(|e| e.reason == "disk_full")
        })
        .await;
    assert_eq!(s.current.as_ref().unwrap().version, "1.1.0");
    assert_eq!(read_version(&dev.install_root()).as_deref(), Some("1.1.0"));
    let left: Vec<_> = std::fs::read_dir(dev.cfg.data_dir.join("artifacts"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "temporary download removed: {left:?}");
    // Space comes back: the retry downloads; unpacking 400 KB of zeros does not fit the
    // 256 KiB releases filesystem, so the install fails cleanly instead.
    drop(dl_fs);
    let zeros = vec![0u8; 400_000];
    let art3 = bundle(&[
        ("VERSION", b"1.3.0\n", 0o644),
        ("health.sh", b"#!/bin/sh\nexit 0\n", 0o755),
        ("zeros", &zeros, 0o644),
    ]);
    http.route("/three", vec![Serve::Bytes(art3.clone())]);
    let r3 = release(3, 1, &http.url("/three"), &art3);
    ctl.ring_directive(&directive(&f, "r17c", &r3).sign(&[&f.controller]))
        .await;
    let s = ctl
        .wait_state("install failed", Duration::from_secs(30), |s| {
            s.phase == Phase::Failed
        })
        .await;
    assert_eq!(s.last_error.as_ref().unwrap().reason, "disk_full");
    assert_eq!(s.current.as_ref().unwrap().version, "1.1.0");
    assert_eq!(read_version(&dev.install_root()).as_deref(), Some("1.1.0"));
    let names: Vec<String> = std::fs::read_dir(&releases)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["1.1.0"], "staging removed, nothing half-written");
    // The database is intact: the agent still works after a restart.
    agent.shutdown().await.unwrap();
    let agent = dev.spawn();
    assert_eq!(agent.status().current.unwrap().version, "1.1.0");
    agent.shutdown().await.unwrap();
    drop(rel_fs);
}
