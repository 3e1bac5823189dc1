//! ACCEPTANCE 16 with a real SIGKILL: `ringcast serve` killed mid-bake resumes at the same
//! step after restart, promotes each ring exactly once, and its audit log stays intact. The
//! broker runs in the test process (retained reports outlive the controller, as they would on
//! any production broker); the controller runs on the real clock with a short bake.

mod common;

use common::*;
use ringcast_proto::Phase;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(w: &World) -> (Serve, String) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["serve", "--config"])
        .arg(w.dir.path().join("ringcast.toml"))
        .env("RINGCAST_LOG", "warn")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("ringcast: serving on ") {
                let _ = tx.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("serve prints its address");
    (Serve(child), url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_controller_resumes_mid_bake_and_promotes_once() {
    let w = World::new();
    let sha = ringcast_proto::digest::sha256_hex(OPERATOR.as_bytes());
    std::fs::write(
        w.dir.path().join("ringcast.toml"),
        format!(
            r#"
fleet = "lab"
tick = "50ms"
[server]
listen = "127.0.0.1:0"
data_dir = "data"
trust = "trust.json"
controller_key = "controller.key"
[[token]]
name = "otto"
role = "operator"
sha256 = "{sha}"
[broker]
host = "127.0.0.1"
port = {port}
watch_drops = false
persistent_session = false
[[rings]]
name = "canary"
bake = "6s"
gate = {{ min_reports = 3, max_failure_rate = 0.2 }}
[[rings]]
name = "broad"
bake = "1h"
gate = {{ min_reports = 1, max_failure_rate = 0.2 }}
"#,
            port = w.broker_port
        ),
    )
    .unwrap();
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let (s, url) = serve(&w);
    let client = ringcast_controller::client::Client::new(&url, Some(OPERATOR.into()));
    // The fixture release was issued at testkit::now(); the real clock is what it is, so
    // sign one issued now.
    let mut r = ringcast_proto::testkit::sample_release("app", 2, 1);
    r.issued_at = jiff::Timestamp::now();
    let env = r.sign(&[&w.fx.release]);
    let resp = client
        .submit(&ringcast_controller::api::SubmitRequest {
            envelope: env,
            start_at: None,
            activate_at: None,
        })
        .await
        .unwrap();
    let id = resp.rollout.id;
    wait_for(10, "canary directive", || watch.get("canary")).await;
    fleet
        .report_all("canary", 3, Some(&id), Phase::Committed, 2)
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client.rollout(&id).await.unwrap().rings[0].tally.committed < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "reports not ingested in 10s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = client.rollout(&id).await.unwrap();
    assert_eq!(before.phase, "baking");

    // SIGKILL mid-bake: no shutdown, no flush.
    let mut s = s;
    s.0.kill().unwrap();
    s.0.wait().unwrap();
    assert!(watch.get("broad").is_none());

    let (_s2, url) = serve(&w);
    let client = ringcast_controller::client::Client::new(&url, Some(OPERATOR.into()));
    let after = client.rollout(&id).await.unwrap();
    assert_eq!(
        after.state, before.state,
        "same ring, step and bake clock after the kill"
    );
    // Reports written since the last sled flush died with the process; the retained reports
    // on the broker bring every one of them back (DESIGN.md: the durability story).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client.rollout(&id).await.unwrap().rings[0].tally.committed < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "reports lost across the kill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for(20, "broad directive after the bake", || watch.get("broad")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = client.audit().await.unwrap();
    let entries = ringcast_controller::audit::verify(&log).expect("audit intact after SIGKILL");
    let promotes = entries
        .iter()
        .filter(|e| e.action == "promote" && e.ring.as_deref() == Some("canary"))
        .count();
    assert_eq!(promotes, 1, "canary promoted exactly once");
    let publishes = entries
        .iter()
        .filter(|e| e.action == "publish" && e.ring.as_deref() == Some("broad"))
        .count();
    assert_eq!(publishes, 1);
}
