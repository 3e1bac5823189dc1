//! ACCEPTANCE.md cases 10, 13 and 14, plus the `file` and `command` install kinds and hooks.

mod common;
use common::*;
use ringcast_proto::release::{CheckKind, HealthCheck, InstallKind};
use ringcast_proto::testkit::Fixture;
use ringcast_proto::{Dur, EventKind, Phase};
use std::time::Duration;

/// A tar.gz whose single entry has a raw name (the tar crate refuses to write `..` itself).
fn evil_bundle(name: &[u8], kind: tar::EntryType, link: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let gz = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        let mut ok = tar::Header::new_gnu();
        ok.set_size(6);
        ok.set_mode(0o644);
        ok.set_entry_type(tar::EntryType::Regular);
        ok.set_cksum();
        t.append_data(&mut ok, "VERSION", &b"1.2.0\n"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_mode(0o644);
        h.set_entry_type(kind);
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
            h.set_size(0);
            h.set_cksum();
            t.append(&h, &[][..]).unwrap();
        } else {
            h.set_size(4);
            h.set_cksum();
            t.append(&h, &b"evil"[..]).unwrap();
        }
        t.into_inner().unwrap().finish().unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_10_archive_entries_escaping_the_release_dir_are_rejected() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let dev = Device::new(&f, "dev-a10", port);
    let ctl = Ctl::connect(port, "ctl-a10").await;
    let agent = dev.spawn();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dotdot",
            evil_bundle(b"../../evil-dotdot", tar::EntryType::Regular, None),
        ),
        (
            "absolute",
            evil_bundle(
                b"/tmp/ringcast-evil-absolute",
                tar::EntryType::Regular,
                None,
            ),
        ),
        (
            "symlink",
            evil_bundle(b"escape", tar::EntryType::Symlink, Some("../../..")),
        ),
        (
            "hardlink",
            evil_bundle(b"hard", tar::EntryType::Link, Some("/etc/passwd")),
        ),
    ];
    for (i, (name, art)) in cases.into_iter().enumerate() {
        let path = format!("/evil-{name}");
        http.route(&path, vec![Serve::Bytes(art.clone())]);
        let r = release(2 + i as u64, 1, &http.url(&path), &art);
        let rollout = format!("evil-{name}");
        ctl.ring_directive(&directive(&f, &rollout, &r).sign(&[&f.controller]))
            .await;
        let s = ctl
            .wait_state(&format!("{name} failed"), Duration::from_secs(20), |s| {
                s.phase == Phase::Failed && s.rollout_id.as_deref() == Some(rollout.as_str())
            })
            .await;
        assert_eq!(
            s.last_error.as_ref().unwrap().reason,
            "unsafe_archive",
            "{name}"
        );
        assert!(s.current.is_none());
    }
    assert!(dev.current_target().is_none(), "current never switched");
    assert!(!dev.install_root().join("evil-dotdot").exists());
    assert!(!dev.dir.path().join("evil-dotdot").exists());
    assert!(!std::path::Path::new("/tmp/ringcast-evil-absolute").exists());
    let left: Vec<_> = std::fs::read_dir(dev.install_root().join("releases"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "nothing half-unpacked left: {left:?}");
    assert_eq!(ctl.event_count("install_failed"), 4);
    agent.shutdown().await.unwrap();
}

/// Install a good 1.1.0 and wait for it to commit.
async fn install_good(f: &Fixture, http: &HttpServer, ctl: &Ctl) {
    let art = app_bundle("1.1.0", true);
    http.route("/good", vec![Serve::Bytes(art.clone())]);
    let r = release(1, 1, &http.url("/good"), &art);
    ctl.ring_directive(&directive(f, "good", &r).sign(&[&f.controller]))
        .await;
    ctl.wait_state("good committed", Duration::from_secs(30), |s| {
        s.phase == Phase::Committed
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_13_hanging_health_check_reverts_locally_with_no_broker() {
    let f = Fixture::new();
    let broker = start_broker();
    let proxy = Proxy::start(broker);
    let http = HttpServer::start();
    let dev = Device::new(&f, "dev-a13", proxy.port);
    let ctl = Ctl::connect(broker, "ctl-a13").await;
    let agent = dev.spawn();
    install_good(&f, &http, &ctl).await;

    let art = app_bundle("1.2.0", true);
    http.route("/hang", vec![Serve::Bytes(art.clone())]);
    let mut r = release(2, 1, &http.url("/hang"), &art);
    r.health.checks = vec![HealthCheck {
        name: "hangs".into(),
        kind: CheckKind::Command,
        command: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo started; sleep 30".into(),
        ]),
        url: None,
        timeout: Dur(Duration::from_millis(700)),
    }];
    r.health.interval = Dur(Duration::from_millis(500));
    r.health.probation = Dur(Duration::from_secs(30));
    r.health.failures_to_revert = 2;
    let mut watch = agent.watch();
    ctl.ring_directive(&directive(&f, "hang", &r).sign(&[&f.controller]))
        .await;
    // The broker goes away as soon as the new version is active.
    tokio::time::timeout(
        Duration::from_secs(20),
        watch.wait_for(|s| s.phase == Phase::Probation),
    )
    .await
    .expect("probation")
    .unwrap();
    proxy.cut();
    let s = tokio::time::timeout(
        Duration::from_secs(20),
        watch.wait_for(|s| s.phase == Phase::Reverted),
    )
    .await
    .expect("reverted without a broker")
    .unwrap()
    .clone();
    assert_eq!(s.current.as_ref().unwrap().version, "1.1.0");
    assert_eq!(s.last_error.as_ref().unwrap().reason, "health_check_failed");
    assert_eq!(read_version(&dev.install_root()).as_deref(), Some("1.1.0"));
    assert!(!dev.install_root().join("releases/1.2.0").exists());
    // Back online: the evidence arrives.
    proxy.restore();
    let e = ctl
        .wait_event("reverted event", Duration::from_secs(20), |e| {
            e.kind.name() == "reverted"
        })
        .await;
    match e.kind {
        EventKind::Reverted {
            reason,
            check,
            output,
        } => {
            assert_eq!(reason, "health_check_failed");
            assert_eq!(check.as_deref(), Some("hangs"));
            assert!(output.unwrap().contains("timed out"));
        }
        other => panic!("{other:?}"),
    }
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_14_version_that_breaks_the_network_is_reverted_and_reported_later() {
    let f = Fixture::new();
    let broker = start_broker();
    let proxy = Proxy::start(broker);
    let http = HttpServer::start();
    let dev = Device::new(&f, "dev-a14", proxy.port);
    let ctl = Ctl::connect(broker, "ctl-a14").await;
    let agent = dev.spawn();
    install_good(&f, &http, &ctl).await;

    let art = app_bundle("1.2.0", false);
    http.route("/bad", vec![Serve::Bytes(art.clone())]);
    let mut r = release(2, 1, &http.url("/bad"), &art);
    r.health.interval = Dur(Duration::from_millis(400));
    r.health.failures_to_revert = 3;
    r.health.probation = Dur(Duration::from_secs(30));
    let mut watch = agent.watch();
    ctl.ring_directive(&directive(&f, "breaks-net", &r).sign(&[&f.controller]))
        .await;
    tokio::time::timeout(
        Duration::from_secs(20),
        watch.wait_for(|s| s.phase == Phase::Probation),
    )
    .await
    .expect("probation")
    .unwrap();
    // "The new version breaks the network."
    proxy.cut();
    tokio::time::timeout(
        Duration::from_secs(20),
        watch.wait_for(|s| s.phase == Phase::Reverted),
    )
    .await
    .expect("reverted offline")
    .unwrap();
    assert_eq!(read_version(&dev.install_root()).as_deref(), Some("1.1.0"));
    proxy.restore();
    let s = ctl
        .wait_state("reverted report", Duration::from_secs(20), |s| {
            s.phase == Phase::Reverted
        })
        .await;
    assert_eq!(s.target.as_ref().unwrap().version, "1.2.0");
    assert_eq!(s.rollout_id.as_deref(), Some("breaks-net"));
    assert_eq!(s.current.as_ref().unwrap().version, "1.1.0");
    let e = ctl
        .wait_event("reverted event", Duration::from_secs(20), |e| {
            e.kind.name() == "reverted"
        })
        .await;
    if let EventKind::Reverted { output, .. } = e.kind {
        assert!(
            output.unwrap().contains("unhealthy"),
            "evidence carries the check output"
        );
    }
    // The same release is not retried within the same rollout when the directive is
    // re-signed.
    ctl.ring_directive(&directive(&f, "breaks-net", &r).sign(&[&f.controller]))
        .await;
    ctl.wait_until("re-signed accepted", Duration::from_secs(10), |c| {
        c.event_count("accepted") >= 3
    })
    .await;
    assert_eq!(agent.status().phase, Phase::Reverted);
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_install_replaces_atomically_and_reverts_to_the_previous_file() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let dev = Device::new(&f, "dev-file", port);
    let ctl = Ctl::connect(port, "ctl-file").await;
    let agent = dev.spawn();
    let target = dev.dir.path().join("etc/app.conf");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, b"original\n").unwrap();
    let mk = |seq: u64, body: &[u8], healthy: bool| {
        let path = format!("/file-{seq}");
        http.route(&path, vec![Serve::Bytes(body.to_vec())]);
        let mut r = release(seq, 1, &http.url(&path), body);
        r.artifact.format = ringcast_proto::release::ArtifactFormat::Raw;
        r.install.kind = InstallKind::File;
        r.install.path = Some(target.to_string_lossy().into_owned());
        let script = if healthy {
            "grep -q v {release_dir}/app.conf"
        } else {
            "exit 1"
        };
        r.health.checks = vec![HealthCheck {
            name: "conf".into(),
            kind: CheckKind::Command,
            command: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
            url: None,
            timeout: Dur::secs(5),
        }];
        r
    };
    let r1 = mk(1, b"v1\n", true);
    ctl.ring_directive(&directive(&f, "f1", &r1).sign(&[&f.controller]))
        .await;
    ctl.wait_state("v1", Duration::from_secs(30), |s| {
        s.phase == Phase::Committed
    })
    .await;
    assert_eq!(std::fs::read(&target).unwrap(), b"v1\n");
    let r2 = mk(2, b"v2 broken\n", false);
    ctl.ring_directive(&directive(&f, "f2", &r2).sign(&[&f.controller]))
        .await;
    ctl.wait_state("reverted", Duration::from_secs(30), |s| {
        s.phase == Phase::Reverted
    })
    .await;
    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"v1\n",
        "previous file restored"
    );
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_install_runs_the_installer_and_its_revert_with_hooks() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let dev = Device::new(&f, "dev-cmd", port);
    let ctl = Ctl::connect(port, "ctl-cmd").await;
    let agent = dev.spawn();
    let log = dev.dir.path().join("installer.log");
    let body = b"firmware image".to_vec();
    http.route("/img", vec![Serve::Bytes(body.clone())]);
    let mut r = release(2, 1, &http.url("/img"), &body);
    r.artifact.format = ringcast_proto::release::ArtifactFormat::Raw;
    r.install.kind = InstallKind::Command;
    let sh = |s: String| vec!["/bin/sh".to_string(), "-c".to_string(), s];
    r.install.command = Some(sh(format!(
        "echo install $(cat {{artifact}}) >> {}",
        log.display()
    )));
    r.install.revert = Some(sh(format!("echo revert >> {}", log.display())));
    r.install.pre_activate = Some(sh(format!(
        "echo pre $RINGCAST_ARTIFACT >> {}",
        log.display()
    )));
    r.install.post_activate = Some(sh(format!("echo post; exit 1 >> {}", log.display())));
    r.health.checks = vec![];
    r.health.failures_to_revert = 1;
    ctl.ring_directive(&directive(&f, "cmd", &r).sign(&[&f.controller]))
        .await;
    // post_activate fails: counts as a failed health round; one is enough to revert.
    let s = ctl
        .wait_state("reverted", Duration::from_secs(30), |s| {
            s.phase == Phase::Reverted
        })
        .await;
    assert_eq!(
        s.last_error.as_ref().unwrap().reason,
        "post_activate_failed"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("pre ") && lines[0].ends_with(&sha256_hex(&body)),
        "{text}"
    );
    assert_eq!(lines[1..], ["install firmware image", "revert"], "{text}");
    agent.shutdown().await.unwrap();
}
