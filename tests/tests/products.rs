//! Issue 10, products end to end: devices that run an `os` image (installed by a command, as
//! `rauc install` would) and an `app` bundle, updated by two overlapping rollouts on the same
//! rings through a real controller, a real broker and real agents. The app rollout installs,
//! commits and completes while the OS is still on probation on the same device; each product
//! keeps its own rollback floor (an app release far below the OS's floor is taken); and a
//! rollout of one product never counts the other's devices' state. An ended rollout's
//! tallies stay as they were when it ended.

use ringcast::kit::{AppHealth, AppRelease};
use ringcast_agent::config::ProductConfig;
use ringcast_proto::jiff::{SignedDuration, Timestamp};
use ringcast_proto::release::{ArtifactFormat, InstallKind};
use ringcast_proto::{Dur, Phase, ReleaseRef, StateReport};
use ringcast_tests::sim_stage::{ring, BrokerKind, Stage, StageSpec, CLASS};
use std::collections::BTreeMap;
use std::time::Duration;

/// The OS release's probation: long enough that the app's whole update fits inside it.
const OS_PROBATION: Duration = Duration::from_secs(15);

fn products() -> BTreeMap<String, ProductConfig> {
    BTreeMap::from([
        (
            "os".to_owned(),
            ProductConfig {
                kinds: Some(vec![InstallKind::Command]),
                ..ProductConfig::default()
            },
        ),
        (
            "app".to_owned(),
            ProductConfig {
                kinds: Some(vec![InstallKind::Bundle]),
                ..ProductConfig::default()
            },
        ),
    ])
}

/// An `os` image release at `sequence` with rollback floor `floor`: a raw image handed to an
/// installer command that appends `install <image>` to `installed.log` beside the product's
/// downloads, with a revert command; no health checks, so its probation is only time.
fn os_release(sequence: u64, floor: u64) -> (ringcast_proto::Release, Vec<u8>) {
    let image = format!("os-image-{sequence}").into_bytes();
    let mut app = AppRelease::new("os", sequence, CLASS);
    app.rollback_floor = floor;
    app.version = semver::Version::new(2, sequence, 0);
    let issued = Timestamp::now() - SignedDuration::from_secs(60);
    let mut r = app.manifest("/unset", &image, issued);
    r.artifact.format = ArtifactFormat::Raw;
    r.install.kind = InstallKind::Command;
    let sh = |s: &str| vec!["/bin/sh".to_owned(), "-c".to_owned(), s.to_owned()];
    r.install.command = Some(sh(
        "echo install $(cat {artifact}) >> {release_dir}/../installed.log",
    ));
    r.install.revert = Some(sh("echo revert >> {release_dir}/../installed.log"));
    r.health.checks = vec![];
    r.health.probation = Dur(OS_PROBATION);
    r.health.interval = Dur::secs(1);
    (r, image)
}

fn entry<'a>(r: &'a StateReport, product: &str) -> Option<&'a ringcast_proto::ProductState> {
    r.products.get(product)
}

fn runs(r: &StateReport, product: &str, sequence: u64) -> bool {
    entry(r, product).is_some_and(|p| {
        p.phase == Phase::Committed && p.current.as_ref().map(|c| c.sequence) == Some(sequence)
    })
}

fn current(r: &StateReport, product: &str) -> Option<ReleaseRef> {
    entry(r, product).and_then(|p| p.current.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn os_and_app_rollouts_overlap_on_the_same_rings_each_with_its_own_floor() {
    overlap(BrokerKind::Embedded).await;
}

/// The same on Mosquitto with mutual TLS and the shipped ACL, which must grant the product
/// topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn os_and_app_overlap_on_mosquitto_under_the_shipped_acl() {
    overlap(BrokerKind::Mosquitto).await;
}

async fn overlap(kind: BrokerKind) {
    ringcast_tests::test_logs();
    let mut spec = StageSpec::new(
        kind,
        vec![
            ring("canary", &[100.0], "1m", 1, 0.0),
            ring("broad", &[100.0], "1m", 1, 0.0),
        ],
        &[1, 1],
    );
    spec.products = products();
    let Some(stage) = Stage::start(spec).await else {
        return;
    };
    let devices: Vec<String> = stage.fleet.devices().iter().map(|d| d.id.clone()).collect();
    let canary = devices[0].clone();
    stage
        .wait_until("every device reports both products", 30, |s| {
            devices.iter().all(|d| {
                s.controller_view(d).is_some_and(|r| {
                    r.products.contains_key("os") && r.products.contains_key("app")
                })
            })
        })
        .await;

    // 1. The OS rollout: floor 10. Its canary device sits on probation for OS_PROBATION.
    let (os, image) = os_release(10, 10);
    let os_id = stage.submit_release(os, &image).await;
    stage
        .wait_until("the canary device's os is on probation", 30, |s| {
            s.controller_view(&canary).is_some_and(|r| {
                entry(&r, "os").is_some_and(|p| {
                    p.phase == Phase::Probation && p.rollout_id.as_deref() == Some(&os_id)
                })
            })
        })
        .await;

    // 2. The app rollout on the same rings, meanwhile: it is not held up by the OS's
    //    probation, on the same device, nor counted against the OS's rollout.
    let app_id = stage.submit(2, AppHealth::Healthy, |_| {}).await;
    stage
        .wait_until(
            "the canary device commits app 2 while its os is still on probation",
            30,
            |s| {
                s.controller_view(&canary).is_some_and(|r| {
                    runs(&r, "app", 2)
                        && entry(&r, "os").is_some_and(|p| p.phase == Phase::Probation)
                })
            },
        )
        .await;
    let r = stage.rollout(&app_id);
    assert!(r.state.is_live(), "app: {:?}", r.state);
    let os_now = stage.rollout(&os_id);
    assert!(
        os_now.state.is_live(),
        "the os rollout halted or ended over the app's reports: {:?}",
        os_now.state
    );
    let end = stage.drive(&app_id, "1m", 60).await;
    assert_eq!(end, "completed", "app\n{}", stage.dump());

    // 3. The OS completes on its own schedule.
    let end = stage.drive(&os_id, "1m", 90).await;
    assert_eq!(end, "completed", "os\n{}", stage.dump());
    for d in stage.fleet.devices() {
        let r = stage.controller_view(&d.id).expect("reported");
        assert!(runs(&r, "os", 10), "{}: {:?}", d.id, r.products);
        assert!(runs(&r, "app", 2), "{}: {:?}", d.id, r.products);
        assert!(r.current.is_none(), "the top level names no release: {r:?}");
        let log = d.cfg.data_dir.join("products/os/installed.log");
        let log =
            std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        assert_eq!(
            log, "install os-image-10\n",
            "{}: the installer ran once",
            d.id
        );
        assert_eq!(
            d.product_version("app").as_deref(),
            Some("1.2.0"),
            "{}: the app bundle is the app product's current",
            d.id
        );
    }
    // Each rollout's tally counted its own product: the app's rollout never saw the OS's
    // devices on probation as pending, and the reverse.
    let tallies_hold = |stage: &Stage, when: &str| {
        for id in [&app_id, &os_id] {
            let view = ringcast_controller::api::rollout_view_of(stage.controller(), id)
                .expect("rollout view");
            for rv in &view.rings {
                let t = &rv.tally;
                assert_eq!(
                    (t.committed, t.failed, t.refused),
                    (1, 0, 0),
                    "{when}: {id} ring {}: {t:?}",
                    rv.name
                );
            }
        }
    };
    tallies_hold(&stage, "at the end");

    // 4. Floors are per product: app 3 (floor 1) is far below the OS's floor 10, and is taken.
    let app3 = stage.submit(3, AppHealth::Healthy, |_| {}).await;
    let end = stage.drive(&app3, "1m", 60).await;
    assert_eq!(end, "completed", "app 3\n{}", stage.dump());
    for d in &devices {
        let r = stage.controller_view(d).expect("reported");
        assert_eq!(current(&r, "app").map(|c| c.sequence), Some(3), "{d}");
        assert_eq!(
            current(&r, "os").map(|c| c.sequence),
            Some(10),
            "{d}: os untouched"
        );
    }
    // The ended app 2 rollout shows its rings as they were when it completed, though its
    // devices have moved on to app 3.
    tallies_hold(&stage, "after app 3");
    stage.shutdown().await;
}
