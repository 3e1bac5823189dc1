//! ACCEPTANCE 15: a real Mosquitto (with persistence) restarted mid-rollout. The controller
//! reconnects, resubscribes, republishes its directives freshly signed, keeps ingesting, and
//! the rollout completes; a duplicated event is recognised by its id.
//! Skipped (with a message) where no `mosquitto` binary exists, unless `CI` is set.

mod common;

use common::*;
use ringcast_controller::engine::{Actor, Submit};
use ringcast_proto::{Event, EventKind, Phase};
use rumqttc::QoS;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

struct Mosq {
    child: Option<Child>,
    conf: std::path::PathBuf,
    port: u16,
}

impl Mosq {
    fn start(dir: &std::path::Path) -> Option<Mosq> {
        let bin = [
            "/usr/sbin/mosquitto",
            "/usr/bin/mosquitto",
            "/usr/local/sbin/mosquitto",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
        let Some(_) = bin else {
            assert!(
                std::env::var_os("CI").is_none(),
                "mosquitto is required in CI"
            );
            eprintln!("skipped: mosquitto not found (apt-get install mosquitto)");
            return None;
        };
        let port = ringcast_controller::broker::free_port().unwrap();
        let data = dir.join("mosq");
        std::fs::create_dir_all(&data).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nuser root\nlog_dest stderr\n",
                data.display()
            ),
        )
        .unwrap();
        let mut m = Mosq {
            child: None,
            conf,
            port,
        };
        m.spawn();
        Some(m)
    }

    fn spawn(&mut self) {
        let bin = [
            "/usr/sbin/mosquitto",
            "/usr/bin/mosquitto",
            "/usr/local/sbin/mosquitto",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "mosquitto did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (mosquitto saves its persistence file) and wait.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Mosq {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_rollout_loses_nothing_and_rollout_completes() {
    let mut w = World::new();
    let Some(mut mosq) = Mosq::start(w.dir.path()) else {
        return;
    };
    w.broker_port = mosq.port;
    let h = w
        .start(w.config(vec![
            ring("canary", &[100.0], "10m", 2, 0.2),
            ring("broad", &[100.0], "10m", 1, 0.2),
        ]))
        .await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let ops = Actor {
        name: "otto".into(),
        role: "operator".into(),
    };
    let (_, ro) = h
        .engine()
        .submit(
            Submit {
                envelope: w.release(2),
                start_at: None,
                activate_at: None,
                launch: None,
            },
            ops,
        )
        .await
        .unwrap();
    let before = wait_for(10, "canary directive", || watch.get("canary")).await;
    fleet
        .report_all("canary", 2, Some(&ro.id), Phase::Probation, 2)
        .await;
    let event = Event {
        id: "canary-0-1".into(),
        device: "canary-0".into(),
        at: ringcast_proto::testkit::now(),
        rollout_id: Some(ro.id.clone()),
        release: None,
        kind: EventKind::Installed,
    };
    fleet
        .client
        .publish(
            w.topics.events("canary-0"),
            QoS::AtLeastOnce,
            false,
            event.to_bytes(),
        )
        .await
        .unwrap();
    wait_for(10, "reports and event", || {
        (count_phase(&h, &ro.id, Phase::Probation) == 2
            && h.shared().counters.events.load(Ordering::Relaxed) == 1)
            .then_some(())
    })
    .await;

    mosq.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    mosq.spawn();

    // Fresh subscriber after the restart: the controller republished, re-signed, on reconnect.
    let watch = Watcher::start(&w).await;
    wait_for(15, "re-signed canary directive after reconnect", || {
        watch.get("canary").filter(|d| d.sequence > before.sequence)
    })
    .await;
    fleet
        .report_all("canary", 2, Some(&ro.id), Phase::Committed, 2)
        .await;
    wait_for(15, "reports after the restart", || {
        (count_phase(&h, &ro.id, Phase::Committed) == 2).then_some(())
    })
    .await;
    // The device agent's event is re-sent (QoS 1 redelivery looks like this): recognised.
    // Sent once the controller has read reports after the restart, so its subscriptions are
    // back (events are not retained: one sent before would be lost, not a duplicate).
    fleet
        .client
        .publish(
            w.topics.events("canary-0"),
            QoS::AtLeastOnce,
            false,
            event.to_bytes(),
        )
        .await
        .unwrap();
    wait_for(10, "duplicate recognised", || {
        (h.shared().counters.duplicate_events.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    assert_eq!(h.shared().counters.events.load(Ordering::Relaxed), 1);
    wait_baking(&h, &ro.id, "canary", 0).await;
    w.advance("10m");
    wait_for(10, "broad directive", || watch.get("broad")).await;
    h.shutdown().await;
}
