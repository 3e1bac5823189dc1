//! Several products on one device (`[products]`), over a real broker and real downloads: an
//! `os` product taking only `command` installs (an installer script that records the image)
//! and an `app` product taking bundles. Each product has its own directive topics, phase,
//! slot, rollback floor, downloads and install root, and they progress independently; the
//! device sends one state report listing both.
//!
//! Time: the agent of the first test runs on a [`JumpClock`] (real speed, plus a jump past
//! os's probation). Every wait is for a report or an event, bounded, and fails loudly.

mod common;
use common::*;
use jiff::{SignedDuration, Timestamp};
use ringcast_agent::config::ProductConfig;
use ringcast_agent::{Agent, AgentHandle, SledStore, Store};
use ringcast_proto::release::{ArtifactFormat, InstallKind, Release};
use ringcast_proto::report::ProductState;
use ringcast_proto::testkit::{key, rotated_doc, Fixture};
use ringcast_proto::trust::RoleSpec;
use ringcast_proto::{
    Action, Directive, Dur, Envelope, EventKind, Phase, Reason, StateReport, TRUST_TYPE,
};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// A device running `os` (command installs only) and `app` (any kind).
fn multi_device(f: &Fixture, id: &str, port: u16) -> Device {
    let mut dev = Device::new(f, id, port);
    dev.cfg.products.insert(
        "os".into(),
        ProductConfig {
            kinds: Some(vec![InstallKind::Command]),
            ..ProductConfig::default()
        },
    );
    dev.cfg
        .products
        .insert("app".into(), ProductConfig::default());
    dev
}

/// A multi-product device `dev-{name}` on a broker of its own with an artifact server, its
/// agent running and both products reported, watched by the controller client `ctl-{name}`.
async fn started(f: &Fixture, name: &str) -> (HttpServer, Device, Ctl, AgentHandle) {
    let port = start_broker();
    let http = HttpServer::start();
    let dev = multi_device(f, &format!("dev-{name}"), port);
    let ctl = Ctl::connect(port, &format!("ctl-{name}")).await;
    let agent = dev.spawn();
    ctl.wait_state("both products reported", WAIT, |s| s.products.len() == 2)
        .await;
    (http, dev, ctl, agent)
}

/// An `os` image release: handed to an installer script that appends `install <image>` to
/// `log`, with a revert command; no checks, so its probation is only time.
fn os_release(
    seq: u64,
    floor: u64,
    url: &str,
    image: &[u8],
    log: &Path,
    probation: Dur,
) -> Release {
    let mut r = release(seq, floor, url, image);
    r.name = "os".into();
    r.artifact.format = ArtifactFormat::Raw;
    r.install.kind = InstallKind::Command;
    let sh = |s: String| vec!["/bin/sh".to_string(), "-c".to_string(), s];
    r.install.command = Some(sh(format!(
        "echo install $(cat {{artifact}}) >> {}",
        log.display()
    )));
    r.install.revert = Some(sh(format!("echo revert >> {}", log.display())));
    r.health.checks = vec![];
    r.health.probation = probation;
    r.health.interval = Dur::secs(1);
    r
}

/// A ring directive for `product` (its signed `product` field set).
fn product_directive(f: &Fixture, product: &str, rollout: &str, r: &Release) -> Directive {
    let mut d = directive(f, rollout, r);
    d.product = Some(product.into());
    d
}

/// Publish a signed directive on `topic_product`'s ring directive topic.
async fn publish(ctl: &Ctl, topic_product: &str, d: &Directive, f: &Fixture) {
    ctl.publish(
        ctl.topics.ring_product_directive(RING, topic_product),
        d.sign(&[&f.controller]).to_vec(),
    )
    .await;
}

fn entry<'a>(s: &'a StateReport, product: &str) -> Option<&'a ProductState> {
    s.products.get(product)
}

fn phase_of(s: &StateReport, product: &str) -> Option<Phase> {
    entry(s, product).map(|p| p.phase)
}

fn current_seq(s: &StateReport, product: &str) -> Option<u64> {
    entry(s, product)
        .and_then(|p| p.current.as_ref())
        .map(|c| c.sequence)
}

/// `app` release `seq` (version `1.{seq}.0`), served at `/app-{seq}`.
fn app_release(http: &HttpServer, seq: u64, floor: u64) -> Release {
    let art = app_bundle(&format!("1.{seq}.0"), true);
    let path = format!("/app-{seq}");
    http.route(&path, vec![Serve::Bytes(art.clone())]);
    release(seq, floor, &http.url(&path), &art)
}

fn spawn_on(dev: &Device, clock: &JumpClock) -> AgentHandle {
    Agent::new(
        dev.cfg.clone(),
        dev.deps_with_clock(Arc::new(clock.clone())),
    )
    .unwrap()
    .spawn()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_commits_while_os_is_in_probation_and_each_floor_is_its_own() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let dev = multi_device(&f, "dev-multi", port);
    let ctl = Ctl::connect(port, "ctl-multi").await;
    let clock = JumpClock::default();
    let agent = spawn_on(&dev, &clock);
    ctl.wait_state("both products reported", WAIT, |s| s.products.len() == 2)
        .await;

    // os 5 (floor 5) with a probation of 10 minutes of the agent's clock.
    let log = dev.dir.path().join("os-installer.log");
    let image = b"os-image-5".to_vec();
    http.route("/os-5", vec![Serve::Bytes(image.clone())]);
    let os5 = os_release(5, 5, &http.url("/os-5"), &image, &log, Dur::secs(600));
    publish(&ctl, "os", &product_directive(&f, "os", "os-5", &os5), &f).await;
    ctl.wait_state("os in probation", WAIT, |s| {
        phase_of(s, "os") == Some(Phase::Probation)
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "install os-image-5\n",
        "the os image went to its installer"
    );

    // app 1 is downloaded, installed and committed while os waits out its probation.
    let app1 = app_release(&http, 1, 1);
    publish(
        &ctl,
        "app",
        &product_directive(&f, "app", "app-1", &app1),
        &f,
    )
    .await;
    let s = ctl
        .wait_state("app committed", WAIT, |s| {
            phase_of(s, "app") == Some(Phase::Committed)
        })
        .await;
    assert_eq!(
        phase_of(&s, "os"),
        Some(Phase::Probation),
        "app committed while os was still in probation: {s:#?}"
    );
    assert_eq!(current_seq(&s, "app"), Some(1));
    assert_eq!(current_seq(&s, "os"), Some(5));
    assert_eq!(
        entry(&s, "app").unwrap().rollout_id.as_deref(),
        Some("app-1")
    );
    assert_eq!(
        read_version(&dev.cfg.product_install_root("app")).as_deref(),
        Some("1.1.0")
    );
    // The merged report describes no release at its top level.
    assert!(s.current.is_none() && s.target.is_none() && s.rollout_id.is_none());
    let committed = ctl
        .wait_event("app committed event", WAIT, |e| {
            e.kind.name() == "committed" && e.rollout_id.as_deref() == Some("app-1")
        })
        .await;
    assert_eq!(committed.release.as_ref().unwrap().name, "app");

    // Past its probation, os commits.
    clock.jump(SignedDuration::from_mins(11));
    let s = ctl
        .wait_state("os committed", WAIT, |s| {
            phase_of(s, "os") == Some(Phase::Committed)
        })
        .await;
    assert_eq!(current_seq(&s, "os"), Some(5));
    assert_eq!(phase_of(&s, "app"), Some(Phase::Committed));
    let os_artifacts = dev.cfg.product_artifacts_dir("os");
    assert_eq!(
        files_in(&os_artifacts),
        vec![sha256_hex(&image)],
        "os keeps the image it installed"
    );

    // Floors do not cross products: app 2 is below os's floor (5), and is taken.
    let app2 = app_release(&http, 2, 1);
    publish(
        &ctl,
        "app",
        &product_directive(&f, "app", "app-2", &app2),
        &f,
    )
    .await;
    let s = ctl
        .wait_state("app 2 committed", WAIT, |s| {
            phase_of(s, "app") == Some(Phase::Committed) && current_seq(s, "app") == Some(2)
        })
        .await;
    assert_eq!(
        entry(&s, "app")
            .unwrap()
            .previous
            .as_ref()
            .map(|p| p.sequence),
        Some(1)
    );
    // Pruning app's downloads after its commit left os's alone.
    assert_eq!(files_in(&os_artifacts), vec![sha256_hex(&image)]);
    assert!(
        !dev.cfg.data_dir.join("artifacts").exists(),
        "no single-product download area"
    );

    // os's own floor holds: os 3 is refused, app is unaffected.
    let image3 = b"os-image-3".to_vec();
    http.route("/os-3", vec![Serve::Bytes(image3.clone())]);
    let os3 = os_release(3, 1, &http.url("/os-3"), &image3, &log, Dur::secs(1));
    publish(&ctl, "os", &product_directive(&f, "os", "os-3", &os3), &f).await;
    let s = ctl
        .wait_state("os 3 refused", WAIT, |s| {
            entry(s, "os")
                .and_then(|p| p.refused.as_ref())
                .is_some_and(|r| r.rollout_id == "os-3" && r.reason == Reason::RollbackFloor)
        })
        .await;
    assert_eq!(phase_of(&s, "os"), Some(Phase::Committed));
    assert_eq!(current_seq(&s, "os"), Some(5));
    assert_eq!(phase_of(&s, "app"), Some(Phase::Committed));
    assert_eq!(current_seq(&s, "app"), Some(2));
    assert!(entry(&s, "app").unwrap().refused.is_none());
    ctl.wait_rejected("rollback_floor").await;
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "install os-image-5\n",
        "nothing more went to the os installer"
    );
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_of_another_product_or_kind_is_refused_and_changes_nothing() {
    let f = Fixture::new();
    let (http, dev, ctl, agent) = started(&f, "refuse").await;

    // A directive on the single-product ring topic: this agent does not read it.
    let app1 = app_release(&http, 1, 1);
    ctl.ring_directive(&directive(&f, "single-topic", &app1).sign(&[&f.controller]))
        .await;

    // Signed for os, carrying an app release: refused, reported in os's entry.
    publish(
        &ctl,
        "os",
        &product_directive(&f, "os", "wrong-name", &app1),
        &f,
    )
    .await;
    let s = ctl
        .wait_state("app release refused on os", WAIT, |s| {
            entry(s, "os")
                .and_then(|p| p.refused.as_ref())
                .is_some_and(|r| r.rollout_id == "wrong-name" && r.reason == Reason::WrongTarget)
        })
        .await;
    assert!(entry(&s, "app").unwrap().refused.is_none());

    // Signed for app, replayed onto os's topic: rejected.
    publish(
        &ctl,
        "os",
        &product_directive(&f, "app", "replayed", &app1),
        &f,
    )
    .await;
    ctl.wait_until("two wrong_target rejections", WAIT, |c| {
        c.rejected_count("wrong_target") >= 2
    })
    .await;

    // An os-named bundle: os takes command installs only.
    let mut bundle = app_release(&http, 2, 1);
    bundle.name = "os".into();
    publish(
        &ctl,
        "os",
        &product_directive(&f, "os", "wrong-kind", &bundle),
        &f,
    )
    .await;
    let s = ctl
        .wait_state("bundle refused on os", WAIT, |s| {
            entry(s, "os")
                .and_then(|p| p.refused.as_ref())
                .is_some_and(|r| r.rollout_id == "wrong-kind" && r.reason == Reason::Incompatible)
        })
        .await;
    let detail = &entry(&s, "os").unwrap().refused.as_ref().unwrap().detail;
    assert!(
        detail.contains("bundle") && detail.contains("command"),
        "{detail}"
    );
    ctl.wait_rejected("incompatible").await;

    // Nothing changed in either product.
    assert_eq!(http.hits.load(Ordering::SeqCst), 0, "nothing downloaded");
    for p in ["os", "app"] {
        let e = entry(&s, p).unwrap();
        assert_eq!(e.phase, Phase::Idle, "{p}");
        assert!(e.current.is_none() && e.target.is_none(), "{p}: {e:?}");
        assert!(!dev.cfg.product_artifacts_dir(p).exists(), "{p} downloaded");
        assert!(
            read_version(&dev.cfg.product_install_root(p)).is_none(),
            "{p} installed"
        );
    }
    assert!(entry(&s, "app").unwrap().refused.is_none());

    // app still takes its own directive; the single-topic one was never seen.
    publish(
        &ctl,
        "app",
        &product_directive(&f, "app", "app-1", &app1),
        &f,
    )
    .await;
    ctl.wait_state("app committed", WAIT, |s| {
        phase_of(s, "app") == Some(Phase::Committed)
    })
    .await;
    let seen_single = ctl
        .events
        .lock()
        .unwrap()
        .iter()
        .any(|e| e.rollout_id.as_deref() == Some("single-topic"));
    assert!(!seen_single, "the single-product topic is not read");
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_lists_every_product_and_a_restart_resumes_each_phase() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let mut dev = multi_device(&f, "dev-resume", port);
    // os's own window is closed: its release stays staged (the device's windows are open).
    dev.cfg.products.get_mut("os").unwrap().windows = vec![closed_window()];
    let ctl = Ctl::connect(port, "ctl-resume").await;
    let agent = dev.spawn();

    let s = ctl
        .wait_state("both products reported", WAIT, |s| s.products.len() == 2)
        .await;
    assert_eq!(
        s.products.keys().collect::<Vec<_>>(),
        vec!["app", "os"],
        "every configured product, idle ones too"
    );
    for p in s.products.values() {
        assert_eq!(p.phase, Phase::Idle);
        assert!(p.current.is_none() && p.previous.is_none() && p.target.is_none());
    }
    assert_eq!(entry(&s, "os").unwrap().windows, vec![closed_window()]);
    assert!(entry(&s, "app").unwrap().windows.is_empty());
    // The top level describes no release.
    assert!(s.current.is_none() && s.previous.is_none() && s.target.is_none());
    assert!(s.rollout_id.is_none() && s.last_error.is_none() && s.refused.is_none());
    assert_eq!((s.phase, s.attempt), (Phase::Idle, 1));
    assert_eq!(s.windows, dev.cfg.windows);

    let log = dev.dir.path().join("os-installer.log");
    let image = b"os-image-5".to_vec();
    http.route("/os-5", vec![Serve::Bytes(image.clone())]);
    let os5 = os_release(5, 5, &http.url("/os-5"), &image, &log, Dur::secs(1));
    publish(&ctl, "os", &product_directive(&f, "os", "os-5", &os5), &f).await;
    // app's directive is dated two minutes ahead: the device's trusted time moves with it.
    let app1 = app_release(&http, 1, 1);
    let mut d = product_directive(&f, "app", "app-1", &app1);
    let ahead = Timestamp::now() + SignedDuration::from_mins(2);
    d.issued_at = ahead;
    publish(&ctl, "app", &d, &f).await;
    let before = ctl
        .wait_state("os staged, app committed", WAIT, |s| {
            phase_of(s, "os") == Some(Phase::Staged) && phase_of(s, "app") == Some(Phase::Committed)
        })
        .await;
    agent.shutdown().await.unwrap();

    // Each product under its own key, the device's part beside them; no single-product state.
    {
        let store = SledStore::open(&dev.cfg.data_dir.join("db")).unwrap();
        let json = |k: &str| -> serde_json::Value {
            serde_json::from_slice(&store.get(k).unwrap().unwrap_or_else(|| panic!("no {k}")))
                .unwrap()
        };
        assert_eq!(json("product/os/state")["phase"], "staged");
        assert_eq!(json("product/app/state")["phase"], "committed");
        assert_eq!(json("product/app/state")["rollback_floor"], 1);
        assert_eq!(json("product/os/state")["rollback_floor"], 0);
        let trusted: Timestamp =
            serde_json::from_value(json("device/state")["trusted_now"].clone()).unwrap();
        assert!(trusted >= ahead, "device trusted time {trusted} < {ahead}");
        assert!(store.get("state").unwrap().is_none());
    }

    let agent = dev.spawn();
    let after = ctl
        .wait_state("resumed report", WAIT, |s| s.seq > before.seq)
        .await;
    assert_eq!(phase_of(&after, "os"), Some(Phase::Staged));
    assert_eq!(
        entry(&after, "os")
            .unwrap()
            .target
            .as_ref()
            .map(|t| t.sequence),
        Some(5)
    );
    assert_eq!(phase_of(&after, "app"), Some(Phase::Committed));
    assert_eq!(current_seq(&after, "app"), Some(1));
    assert!(
        after.updated_at >= ahead,
        "reports are dated by the device's trusted time"
    );
    let status = agent.status();
    assert_eq!(status.products, after.products);
    assert!(
        std::fs::read_to_string(&log).unwrap_or_default().is_empty(),
        "os never activated"
    );
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_rotation_is_applied_once_for_every_product() {
    let f = Fixture::new();
    let (http, _dev, ctl, agent) = started(&f, "rotate").await;

    // Version 2 replaces the controller key.
    let new_root = key(42);
    let new_ctl = key(43);
    let mut doc = rotated_doc(&f.trust, &new_root, 2);
    doc.keys.insert(new_ctl.key_id().clone(), new_ctl.public());
    doc.roles.controller = RoleSpec {
        keyids: vec![new_ctl.key_id().clone()],
        threshold: 1,
    };
    let env = Envelope::sign(
        TRUST_TYPE,
        serde_json::to_vec(&doc).unwrap(),
        &[&f.root, &new_root],
    );
    ctl.publish(ctl.topics.trust(), env.to_vec()).await;
    ctl.wait_event("rotated", WAIT, |e| {
        matches!(e.kind, EventKind::TrustRotated { version: 2 })
    })
    .await;

    // The old controller key no longer counts, for any product.
    let app1 = app_release(&http, 1, 1);
    let mut hold = product_directive(&f, "os", "old-key", &app1);
    hold.action = Action::Hold;
    hold.release = None;
    publish(&ctl, "os", &hold, &f).await;
    ctl.wait_until("old key rejected", WAIT, |c| {
        c.events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e.kind, EventKind::Rejected { .. }))
    })
    .await;
    // The new one signs for both.
    for p in ["os", "app"] {
        let mut d = product_directive(&f, p, &format!("new-key-{p}"), &app1);
        d.action = Action::Hold;
        d.release = None;
        ctl.publish(
            ctl.topics.ring_product_directive(RING, p),
            d.sign(&[&new_ctl]).to_vec(),
        )
        .await;
    }
    for p in ["os", "app"] {
        let rollout = format!("new-key-{p}");
        ctl.wait_event(&format!("{p} accepted"), WAIT, |e| {
            e.kind.name() == "accepted" && e.rollout_id.as_deref() == Some(rollout.as_str())
        })
        .await;
    }
    assert_eq!(
        ctl.event_count("trust_rotated"),
        1,
        "one rotation for the device"
    );
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_product_report_has_no_products() {
    let f = Fixture::new();
    let port = start_broker();
    let dev = Device::new(&f, "dev-single", port);
    let ctl = Ctl::connect(port, "ctl-single").await;
    let agent = dev.spawn();
    let s = ctl.wait_state("first report", WAIT, |_| true).await;
    assert!(!s.is_multi_product() && s.products.is_empty());
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dev.cfg.data_dir.join("status.json")).unwrap())
            .unwrap();
    assert!(status.get("products").is_none(), "{status}");
    assert!(agent.status().products.is_empty());
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_settles_every_product_and_status_shows_each() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let dev = Device::new(&f, "dev-once-multi", port);
    let config = dev.write_config();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[products.os]\nkinds = [\"command\"]\n[products.app]\n");
    std::fs::write(&config, text).unwrap();
    let ctl = Ctl::connect(port, "ctl-once-multi").await;

    let log = dev.dir.path().join("os-installer.log");
    let image = b"os-image-5".to_vec();
    http.route("/os-5", vec![Serve::Bytes(image.clone())]);
    let os5 = os_release(5, 5, &http.url("/os-5"), &image, &log, Dur::secs(1));
    publish(&ctl, "os", &product_directive(&f, "os", "os-5", &os5), &f).await;
    let app1 = app_release(&http, 1, 1);
    publish(
        &ctl,
        "app",
        &product_directive(&f, "app", "app-1", &app1),
        &f,
    )
    .await;

    let bin = env!("CARGO_BIN_EXE_ringcast-agent");
    let cfg_path = config.clone();
    let st = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(bin)
            .arg("--config")
            .arg(&cfg_path)
            .arg("--once")
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
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
    assert!(st.success(), "{st:?}");

    // --once returned only when both had finished.
    let out = std::process::Command::new(bin)
        .args(["status", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let r = StateReport::parse(&out.stdout).unwrap();
    assert_eq!(phase_of(&r, "os"), Some(Phase::Committed), "{r:#?}");
    assert_eq!(phase_of(&r, "app"), Some(Phase::Committed), "{r:#?}");
    let out = std::process::Command::new(bin)
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "product:    app",
        "product:    os",
        "app 1.1.0 (seq 1)",
        "os 1.5.0 (seq 5)",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    ctl.wait_state("both committed on the wire", WAIT, |s| {
        phase_of(s, "os") == Some(Phase::Committed) && phase_of(s, "app") == Some(Phase::Committed)
    })
    .await;
}
