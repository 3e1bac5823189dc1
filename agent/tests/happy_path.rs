//! The vertical slice over a real broker and real HTTP: directive → download → install bundle
//! → probation → committed, with the retained state report showing the new version.

mod common;
use common::*;
use ringcast_proto::testkit::Fixture;
use ringcast_proto::Phase;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directive_is_downloaded_installed_and_committed() {
    let port = start_broker();
    let http = HttpServer::start();
    let f = Fixture::new();
    let dev = Device::new(&f, "dev-happy", port);
    let ctl = Ctl::connect(port, "ctl-happy").await;
    let agent = dev.spawn();

    let art = app_bundle("1.1.0", true);
    http.route("/a/app-1", vec![Serve::Bytes(art.clone())]);
    let r = release(1, 1, &http.url("/a/app-1"), &art);
    ctl.ring_directive(&directive(&f, "roll-1", &r).sign(&[&f.controller]))
        .await;

    let s = ctl
        .wait_state("committed", Duration::from_secs(30), |s| {
            s.phase == Phase::Committed
        })
        .await;
    assert_eq!(s.current.as_ref().unwrap().version, "1.1.0");
    assert_eq!(s.rollout_id.as_deref(), Some("roll-1"));
    assert_eq!(s.target.as_ref().unwrap().sequence, 1);
    assert_eq!(read_version(&dev.install_root()).as_deref(), Some("1.1.0"));
    for e in ["accepted", "downloaded", "staged", "installed", "committed"] {
        ctl.wait_event(e, Duration::from_secs(5), |ev| ev.kind.name() == e)
            .await;
    }
    assert_eq!(agent.status().phase, Phase::Committed);

    // Second release: the first is kept as previous.
    let art2 = app_bundle("1.2.0", true);
    http.route("/a/app-2", vec![Serve::Bytes(art2.clone())]);
    let r2 = release(2, 1, &http.url("/a/app-2"), &art2);
    ctl.ring_directive(&directive(&f, "roll-2", &r2).sign(&[&f.controller]))
        .await;
    let s = ctl
        .wait_state("committed 1.2.0", Duration::from_secs(30), |s| {
            s.phase == Phase::Committed && s.current.as_ref().is_some_and(|c| c.version == "1.2.0")
        })
        .await;
    assert_eq!(s.previous.as_ref().unwrap().version, "1.1.0");
    assert!(dev.install_root().join("releases/1.1.0").is_dir());
    agent.shutdown().await.unwrap();
}
