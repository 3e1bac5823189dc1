//! Issue 10, end to end: the real controller, the embedded broker and real agents (sled
//! stores, real bundles, health checks, artifact downloads). One canary device has a defer
//! hook that always answers "not now". The controller shows it `deferred` (its report, the
//! ring's tally, `/metrics`), apart from failures and commits, and the step waits for it
//! instead of halting or passing; once the device's deadline passes it installs without
//! asking, commits, and the rollout completes.

use ringcast::kit::AppHealth;
use ringcast_agent::config::DeferConfig;
use ringcast_agent::fleet::{self, StoreKind};
use ringcast_controller::model::Tally;
use ringcast_proto::jiff::{SignedDuration, Timestamp};
use ringcast_proto::{Clock, Dur, Percent, Phase};
use ringcast_tests::sim_stage::{ring, BrokerKind, Stage, StageSpec};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};

/// The device the scenario runs itself, with the defer hook.
const DEFERRING: &str = "canary-100";

/// The system clock plus an offset the test moves forward: the agent's probation runs at
/// real speed, and a jump takes it past its deferral's deadline at once.
#[derive(Debug, Clone, Default)]
struct JumpClock(Arc<Mutex<SignedDuration>>);

impl JumpClock {
    fn jump(&self, by: SignedDuration) {
        *self.0.lock().expect("clock") += by;
    }
}

impl Clock for JumpClock {
    fn now(&self) -> Timestamp {
        Timestamp::now() + *self.0.lock().expect("clock")
    }
}

/// The controller's tally of `rollout` in canary, as its gate sees it.
fn tally(stage: &Stage, rollout: &str) -> Tally {
    let r = stage.rollout(rollout);
    let devices = stage
        .controller()
        .shared()
        .devices
        .read()
        .expect("device table");
    ringcast_controller::engine::tally(
        &devices,
        &r,
        "canary",
        Percent::FULL,
        stage.clock.now(),
        stage.config.policy.unresponsive_after.signed(),
    )
}

/// `GET path` on the controller's HTTP listener (a plain HTTP/1.1 request; `/metrics` needs
/// no token).
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect to the controller");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .expect("send request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read answer");
        out
    })
    .await
    .expect("http task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferring_device_is_shown_deferred_then_commits_after_its_deadline() {
    // Two devices must commit, none may fail: a deferral counted as a failure would halt,
    // one counted as a commit would pass the gate early.
    let canary = ring("canary", &[100.0], "1m", 2, 0.0);
    let mut spec = StageSpec::new(BrokerKind::Embedded, vec![canary], &[1]);
    spec.external = vec![DEFERRING.into()];
    let Some(stage) = Stage::start(spec).await else {
        return;
    };
    let mut cfg = stage.external_device_config(DEFERRING, "canary");
    let hook = stage.dir().join("defer-hook.sh");
    std::fs::write(&hook, "#!/bin/sh\necho 'presentation running'\nexit 75\n").expect("hook");
    cfg.defer = Some(DeferConfig {
        command: vec!["/bin/sh".into(), hook.display().to_string()],
        retry: Dur::secs(600),
        deadline: Dur::secs(3600),
        timeout: Dur::secs(10),
    });
    let clock = JumpClock::default();
    let agent = fleet::start_agent(&cfg, StoreKind::Sled, Arc::new(clock.clone()))
        .unwrap_or_else(|e| panic!("agent {DEFERRING}: {e}"));
    stage
        .wait_until("the controller knows the deferring device", 30, |s| {
            s.controller_view(DEFERRING).is_some()
        })
        .await;

    let id = stage.submit(1, AppHealth::Healthy, |_| {}).await;
    stage
        .wait_until("the controller shows the device deferred", 60, |s| {
            s.controller_view(DEFERRING).is_some_and(|r| {
                r.phase == Phase::Deferred && r.rollout_id.as_deref() == Some(id.as_str())
            })
        })
        .await;
    let seen = stage.controller_view(DEFERRING).expect("report");
    assert_eq!(seen.target.as_ref().map(|t| t.sequence), Some(1));
    let why = seen.last_error.expect("a deferred report says why");
    assert_eq!(why.reason, "deferred");
    assert!(
        why.detail
            .starts_with("presentation running; deferred until "),
        "{}",
        why.detail
    );
    stage
        .wait_until("the other canary device commits", 60, |s| {
            tally(s, &id).committed == 1
        })
        .await;
    let t = tally(&stage, &id);
    assert_eq!(
        (t.committed, t.deferred, t.failed, t.pending, t.unresponsive),
        (1, 1, 0, 0, 0),
        "{t:?}"
    );
    // The engine has looked at this tally: the step neither halted nor passed.
    stage.settle().await;
    assert_eq!(stage.phase(&id), "publishing");
    let metrics = http_get(stage.controller().http_addr(), "/metrics").await;
    let line =
        format!("ringcast_ring_devices{{rollout=\"{id}\",ring=\"canary\",outcome=\"deferred\"}} 1");
    assert!(metrics.contains(&line), "{line} missing from\n{metrics}");
    assert!(metrics.contains(&format!(
        "ringcast_ring_devices{{rollout=\"{id}\",ring=\"canary\",outcome=\"failed\"}} 0"
    )));

    // The device's deadline passes (an hour on its clock): it installs without asking.
    clock.jump(SignedDuration::from_mins(61));
    stage
        .wait_until("the deferred device commits release 1", 60, |s| {
            s.controller_view(DEFERRING).is_some_and(|r| {
                r.phase == Phase::Committed && r.current.as_ref().map(|c| c.sequence) == Some(1)
            })
        })
        .await;
    let end = stage.drive(&id, "1m", 60).await;
    assert_eq!(end, "completed", "{}", stage.dump());
    let version = std::fs::read_to_string(cfg.install_root().join("current/VERSION"))
        .expect("current release");
    assert_eq!(version.trim(), "1.1.0");

    agent.shutdown().await.expect("agent stops");
    stage.shutdown().await;
}
