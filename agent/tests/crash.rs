//! ACCEPTANCE.md cases 11 and 12: the real `ringcast-agent` binary is SIGKILLed in every
//! phase (mid-download, after staging, mid-install, during probation) and restarted. Phases
//! are reached by real mechanisms (a dripping server, a `not_before` in the future, a slow
//! `pre_activate` hook, a long probation) and observed through the retained state report,
//! with bounded waits.

mod common;
use common::*;
use jiff::{SignedDuration, Timestamp};
use ringcast_proto::release::Release;
use ringcast_proto::testkit::Fixture;
use ringcast_proto::{Dur, Phase};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Bin {
    child: Child,
}

impl Bin {
    fn start(config: &Path) -> Bin {
        let log = config.with_extension(format!("log.{}", Timestamp::now().as_millisecond()));
        let child = Command::new(env!("CARGO_BIN_EXE_ringcast-agent"))
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Bin { child }
    }

    /// SIGKILL: no chance to clean up, like a power cut for the process.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `current` resolves to a complete release (or does not exist).
fn assert_current_complete(dev: &Device) {
    if let Some(t) = dev.current_target() {
        let dir = dev.install_root().join(t);
        assert!(
            dir.join("VERSION").is_file(),
            "current points at an incomplete release {dir:?}"
        );
        assert!(dir.join("health.sh").is_file());
    }
}

async fn wait_file(path: &Path, what: &str, min_len: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if std::fs::metadata(path)
            .map(|m| m.len() >= min_len)
            .unwrap_or(false)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        // Polling a file the agent writes: there is no event to await across processes.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Rig {
    f: Fixture,
    http: HttpServer,
    dev: Device,
    ctl: Ctl,
    config: std::path::PathBuf,
}

async fn rig(id: &str) -> Rig {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let dev = Device::new(&f, id, port);
    let config = dev.write_config();
    let ctl = Ctl::connect(port, &format!("ctl-{id}")).await;
    Rig {
        f,
        http,
        dev,
        ctl,
        config,
    }
}

impl Rig {
    async fn publish(&self, rollout: &str, r: &Release, not_before: Option<Timestamp>) {
        let mut d = directive(&self.f, rollout, r);
        d.activation.not_before = not_before;
        self.ctl
            .ring_directive(&d.sign(&[&self.f.controller]))
            .await;
    }

    async fn wait_phase(
        &self,
        what: &str,
        phase: Phase,
        rollout: &str,
    ) -> ringcast_proto::StateReport {
        self.ctl
            .wait_state(what, Duration::from_secs(40), |s| {
                s.phase == phase && s.rollout_id.as_deref() == Some(rollout)
            })
            .await
    }

    /// Install and commit 1.1.0 so there is a previous release to protect.
    async fn baseline(&self) {
        let art = app_bundle("1.1.0", true);
        self.http.route("/base", vec![Serve::Bytes(art.clone())]);
        let r = release(1, 1, &self.http.url("/base"), &art);
        self.publish("base", &r, None).await;
        self.wait_phase("baseline committed", Phase::Committed, "base")
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_11_sigkill_mid_download_resumes_with_range() {
    let rig = rig("dev-k1").await;
    let bin = Bin::start(&rig.config);
    rig.baseline().await;
    let art = bundle(&[
        ("VERSION", b"1.2.0\n", 0o644),
        ("health.sh", b"#!/bin/sh\nexit 0\n", 0o755),
        ("blob", &noise(300_000), 0o644),
    ]);
    rig.http.route(
        "/slow",
        vec![
            Serve::Drip {
                bytes: art.clone(),
                chunk: 8 * 1024,
                every: Duration::from_millis(100),
            },
            Serve::Bytes(art.clone()),
        ],
    );
    let r = release(2, 1, &rig.http.url("/slow"), &art);
    rig.publish("k1", &r, None).await;
    let part = rig
        .dev
        .cfg
        .data_dir
        .join("artifacts")
        .join(format!("{}.part", sha256_hex(&art)));
    wait_file(&part, "a partial download", 32 * 1024).await;
    bin.kill();
    assert_current_complete(&rig.dev);
    let _bin = Bin::start(&rig.config);
    let s = rig
        .wait_phase("committed after restart", Phase::Committed, "k1")
        .await;
    assert_eq!(s.current.unwrap().version, "1.2.0");
    let ranges = rig.http.ranges.lock().unwrap().clone();
    assert_eq!(ranges.len(), 1, "resumed once with a Range: {ranges:?}");
    assert_current_complete(&rig.dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_11_sigkill_after_staging_activates_after_restart() {
    let rig = rig("dev-k2").await;
    let bin = Bin::start(&rig.config);
    rig.baseline().await;
    let art = app_bundle("1.2.0", true);
    rig.http.route("/staged", vec![Serve::Bytes(art.clone())]);
    let r = release(2, 1, &rig.http.url("/staged"), &art);
    let not_before = Timestamp::now() + SignedDuration::from_secs(4);
    rig.publish("k2", &r, Some(not_before)).await;
    let s = rig.wait_phase("staged", Phase::Staged, "k2").await;
    assert_eq!(s.target.unwrap().version, "1.2.0");
    bin.kill();
    assert_eq!(
        read_version(&rig.dev.install_root()).as_deref(),
        Some("1.1.0")
    );
    let _bin = Bin::start(&rig.config);
    let s = rig.wait_phase("committed", Phase::Committed, "k2").await;
    assert_eq!(s.current.unwrap().version, "1.2.0");
    assert!(
        Timestamp::now() >= not_before,
        "not activated before not_before"
    );
    // Downloaded once: the staged artifact survived the kill.
    assert_eq!(rig.http.hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_current_complete(&rig.dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_11_sigkill_mid_install_runs_the_install_again() {
    let rig = rig("dev-k3").await;
    let bin = Bin::start(&rig.config);
    rig.baseline().await;
    let art = app_bundle("1.2.0", true);
    rig.http.route("/inst", vec![Serve::Bytes(art.clone())]);
    let mut r = release(2, 1, &rig.http.url("/inst"), &art);
    let marker = rig.dev.dir.path().join("pre-activate-ran");
    // First run: mark and hang (the agent is killed meanwhile); second run: pass.
    r.install.pre_activate = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "test -f {m} && exit 0; touch {m}; exec sleep 20",
            m = marker.display()
        ),
    ]);
    rig.publish("k3", &r, None).await;
    rig.wait_phase("installing", Phase::Installing, "k3").await;
    wait_file(&marker, "pre_activate hook", 0).await;
    bin.kill();
    assert_eq!(
        read_version(&rig.dev.install_root()).as_deref(),
        Some("1.1.0")
    );
    let _bin = Bin::start(&rig.config);
    let s = rig.wait_phase("committed", Phase::Committed, "k3").await;
    assert_eq!(s.current.unwrap().version, "1.2.0");
    assert_eq!(s.previous.unwrap().version, "1.1.0");
    assert_current_complete(&rig.dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_11_sigkill_during_probation_counts_restarts_then_reverts() {
    let rig = rig("dev-k4").await;
    let bin = Bin::start(&rig.config);
    rig.baseline().await;
    // Below the restart limit: probation resumes and commits.
    let art = app_bundle("1.2.0", true);
    rig.http.route("/p1", vec![Serve::Bytes(art.clone())]);
    let mut r = release(2, 1, &rig.http.url("/p1"), &art);
    r.health.probation = Dur(Duration::from_secs(3));
    r.health.restarts_to_revert = 2;
    rig.publish("k4a", &r, None).await;
    rig.wait_phase("probation", Phase::Probation, "k4a").await;
    bin.kill();
    assert_current_complete(&rig.dev);
    let bin = Bin::start(&rig.config);
    let s = rig.wait_phase("committed", Phase::Committed, "k4a").await;
    assert_eq!(s.current.unwrap().version, "1.2.0");

    // At the limit: a restart during probation reverts without any check failing.
    let art = app_bundle("1.3.0", true);
    rig.http.route("/p2", vec![Serve::Bytes(art.clone())]);
    let mut r = release(3, 1, &rig.http.url("/p2"), &art);
    r.health.probation = Dur(Duration::from_secs(30));
    r.health.restarts_to_revert = 1;
    rig.publish("k4b", &r, None).await;
    rig.wait_phase("probation", Phase::Probation, "k4b").await;
    bin.kill();
    let _bin = Bin::start(&rig.config);
    let s = rig.wait_phase("reverted", Phase::Reverted, "k4b").await;
    assert_eq!(s.last_error.unwrap().reason, "too_many_restarts");
    assert_eq!(s.current.unwrap().version, "1.2.0");
    assert_eq!(s.target.unwrap().version, "1.3.0");
    assert_eq!(
        read_version(&rig.dev.install_root()).as_deref(),
        Some("1.2.0")
    );
    assert_current_complete(&rig.dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_12_power_cut_leftovers_never_replace_current() {
    let rig = rig("dev-k5").await;
    let bin = Bin::start(&rig.config);
    rig.baseline().await;
    bin.kill();
    // What a power cut between writing and renaming leaves: a half-unpacked staging dir,
    // a temp symlink next to `current`, a half-written temp state file.
    let root = rig.dev.install_root();
    std::fs::create_dir_all(root.join("releases/.staging-1.2.0")).unwrap();
    std::fs::write(root.join("releases/.staging-1.2.0/VERSION"), b"1.2").unwrap();
    std::os::unix::fs::symlink("releases/.staging-1.2.0", root.join(".current.tmp-999")).unwrap();
    std::fs::write(
        rig.dev.cfg.data_dir.join(".status.json.tmp-999"),
        b"{\"half",
    )
    .unwrap();
    let bin = Bin::start(&rig.config);
    let s = rig
        .ctl
        .wait_state("report after restart", Duration::from_secs(20), |s| {
            s.phase == Phase::Committed
        })
        .await;
    assert_eq!(s.current.unwrap().version, "1.1.0");
    assert_eq!(read_version(&root).as_deref(), Some("1.1.0"));
    // The next install goes through cleanly over the leftovers.
    let art = app_bundle("1.2.0", true);
    rig.http.route("/after", vec![Serve::Bytes(art.clone())]);
    let r = release(2, 1, &rig.http.url("/after"), &art);
    rig.publish("k5", &r, None).await;
    rig.wait_phase("committed", Phase::Committed, "k5").await;
    assert_eq!(read_version(&root).as_deref(), Some("1.2.0"));
    assert!(!root.join("releases/.staging-1.2.0").exists());
    assert_current_complete(&rig.dev);
    drop(bin);
}
