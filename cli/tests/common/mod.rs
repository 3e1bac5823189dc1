//! Shared helpers for the controller's tests: a real embedded broker, real sled in tempdirs,
//! real HTTP, fixture keys, and devices played by plain rumqttc clients.
#![allow(dead_code)]

use jiff::{SignedDuration, Timestamp};
use ringcast_controller::config::{
    ApiRole, BrokerConfig, ControllerConfig, Gate, OnFailure, Policy, Promotion, RingPolicy,
    ServerConfig, TokenEntry,
};
use ringcast_controller::{Controller, ControllerHandle};
use ringcast_proto::testkit::{self, Fixture};
use ringcast_proto::Clock as _;
use ringcast_proto::{
    Directive, Dur, Envelope, FakeClock, Percent, Phase, ReleaseRef, StateReport, Topics,
};
use rumqttc::{AsyncClient, MqttOptions, NetworkOptions, QoS};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const VIEWER: &str = "viewer-token-0123456789";
pub const OPERATOR: &str = "operator-token-0123456789";
pub const APPROVER: &str = "approver-token-0123456789";

/// The operator the engine tests act as.
pub fn ops() -> ringcast_controller::engine::Actor {
    ringcast_controller::engine::Actor {
        name: "otto".into(),
        role: "operator".into(),
    }
}

/// One test's world: keys, files, a broker, a fake clock.
pub struct World {
    pub dir: tempfile::TempDir,
    pub fx: Fixture,
    pub clock: FakeClock,
    pub broker_port: u16,
    pub topics: Topics,
}

pub fn ring(name: &str, steps: &[f64], bake: &str, min_reports: u32, max_rate: f64) -> RingPolicy {
    RingPolicy {
        name: name.into(),
        steps: steps
            .iter()
            .map(|s| Percent::from_f64(*s).unwrap())
            .collect(),
        bake: bake.parse().unwrap(),
        gate: Gate {
            min_reports,
            max_failure_rate: max_rate,
        },
        promotion: Promotion::Auto,
        windows: vec![],
        timezone: "UTC".into(),
        on_failure: OnFailure::Halt,
        checks: vec![],
        check_retry: Dur::secs(60),
        check_attempts: 3,
        step_timeout_setting: None,
        retries: 0,
        retry_backoff: Dur::secs(600),
    }
}

impl World {
    pub fn new() -> World {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "info,rumqttd=warn,ringcast_controller::mqtt=debug",
            ))
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let fx = Fixture::new();
        std::fs::write(dir.path().join("trust.json"), fx.trust_env.to_vec()).unwrap();
        ringcast_controller::keyfile::write_secret_key(
            &dir.path().join("controller.key"),
            &fx.controller,
            ringcast_controller::keyfile::Overwrite::Refuse,
        )
        .unwrap();
        let broker_port = ringcast_controller::broker::start_embedded().unwrap();
        World {
            dir,
            fx,
            clock: FakeClock::new(testkit::now()),
            broker_port,
            topics: Topics::for_fleet(testkit::FLEET).unwrap(),
        }
    }

    pub fn config(&self, rings: Vec<RingPolicy>) -> ControllerConfig {
        let tok = |name: &str, role, t: &str| TokenEntry {
            name: name.into(),
            role,
            token: Some(t.into()),
            sha256: None,
        };
        ControllerConfig {
            policy: Policy {
                fleet: testkit::FLEET.into(),
                topic_prefix: None,
                tick: Dur(Duration::from_millis(50)),
                directive_ttl: Dur::secs(3600),
                unresponsive_after: Dur::secs(7 * 86400),
                allowed_skew: Dur::secs(300),
                on_new_release: None,
                rings,
            },
            server: ServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                data_dir: self.dir.path().join("data"),
                trust: self.dir.path().join("trust.json"),
                controller_key: self.dir.path().join("controller.key"),
                tokens_file: None,
                public_url: None,
                max_artifact_bytes: 16 * 1024 * 1024,
                device_events: ringcast_controller::store::EVENT_HISTORY,
            },
            broker: Some(BrokerConfig {
                host: "127.0.0.1".into(),
                port: self.broker_port,
                client_id: "ringcast-controller".into(),
                // The test broker is rumqttd's 3.1.1 listener.
                protocol: ringcast_io::mqtt::Protocol::V311,
                // rumqttd: no $SYS drop counter.
                watch_drops: false,
                persistent_session: false,
                username: None,
                password: None,
                tls: None,
            }),
            tokens: vec![
                tok("vera", ApiRole::Viewer, VIEWER),
                tok("otto", ApiRole::Operator, OPERATOR),
                tok("alice", ApiRole::Approver, APPROVER),
            ],
            webhooks: Vec::new(),
        }
    }

    pub async fn start(&self, config: ControllerConfig) -> ControllerHandle {
        Controller::start(config, Arc::new(self.clock.clone()))
            .await
            .unwrap()
    }

    /// A signed release `app` with `sequence` (floor 1).
    pub fn release(&self, sequence: u64) -> Envelope {
        testkit::sample_release("app", sequence, 1).sign(&[&self.fx.release])
    }

    /// Submit release `sequence` at once (no start time, no activation time) as operator
    /// `otto`: the common opening of most engine tests.
    pub async fn submit_now(
        &self,
        h: &ControllerHandle,
        sequence: u64,
    ) -> (
        ringcast_controller::model::ReleaseRecord,
        ringcast_controller::model::Rollout,
    ) {
        let submit = ringcast_controller::engine::Submit {
            envelope: self.release(sequence),
            start_at: None,
            activate_at: None,
            launch: None,
        };
        match h.engine().submit(submit, ops()).await {
            Ok(v) => v,
            Err(e) => panic!("submitting release {sequence} failed: {e}"),
        }
    }

    pub fn advance(&self, d: &str) {
        let d: Dur = d.parse().unwrap();
        self.clock.advance(d.signed());
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

/// Poll `f` every 20 ms until it returns Some, or panic after `secs` seconds naming `what`.
pub async fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain MQTT test client on the embedded broker (large packets, TCP_NODELAY).
pub fn mqtt(port: u16, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    ringcast_controller::mqtt::install_crypto_provider();
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(256 * 1024, 256 * 1024);
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = AsyncClient::new(o, 1000);
    let mut n = NetworkOptions::new();
    n.set_tcp_nodelay(true);
    el.set_network_options(n);
    (c, el)
}

/// Watches ring directives (latest verified directive per ring).
#[derive(Clone, Default)]
pub struct Watcher {
    pub latest: Arc<Mutex<HashMap<String, Directive>>>,
    pub count: Arc<Mutex<HashMap<String, usize>>>,
}

impl Watcher {
    pub async fn start(w: &World) -> Watcher {
        let (c, mut el) = mqtt(w.broker_port, &format!("watch-{}", rand_id()));
        let filter = format!("{}/rings/+/directive", w.topics.prefix());
        c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let me = Watcher::default();
        let out = me.clone();
        let trust = w.fx.trust.clone();
        let topics = w.topics.clone();
        tokio::spawn(async move {
            let _keep = c;
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let Ok(ringcast_proto::Topic::RingDirective(ring)) = topics.parse(&p.topic)
                        else {
                            continue;
                        };
                        let env = Envelope::from_slice(&p.payload).expect("directive envelope");
                        let bytes = env
                            .verify(
                                ringcast_proto::DIRECTIVE_TYPE,
                                &trust,
                                &trust.roles.controller,
                            )
                            .expect("directive signed by the controller key");
                        let d = Directive::parse(bytes).expect("directive parses");
                        assert_eq!(d.ring, ring);
                        out.latest.lock().unwrap().insert(ring.clone(), d);
                        *out.count.lock().unwrap().entry(ring).or_default() += 1;
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        me
    }

    pub fn get(&self, ring: &str) -> Option<Directive> {
        self.latest.lock().unwrap().get(ring).cloned()
    }

    /// The release sequence the ring's directive installs (None for hold / no directive).
    pub fn release_seq(&self, ring: &str) -> Option<u64> {
        let d = self.get(ring)?;
        let env = d.release?;
        let r = ringcast_proto::Release::parse(&env.payload).ok()?;
        Some(r.sequence)
    }
}

pub fn rand_id() -> String {
    let mut b = [0u8; 6];
    getrandom::getrandom(&mut b).unwrap();
    hex::encode(b)
}

/// Devices played by one MQTT client publishing retained state reports.
pub struct Fleet {
    pub client: AsyncClient,
    pub topics: Topics,
}

impl Fleet {
    pub async fn connect(w: &World) -> Fleet {
        let (client, mut el) = mqtt(w.broker_port, &format!("fleet-{}", rand_id()));
        tokio::spawn(async move {
            loop {
                if el.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        Fleet {
            client,
            topics: w.topics.clone(),
        }
    }

    /// Publish a retained state report for `device` in `ring`.
    pub async fn report(
        &self,
        device: &str,
        ring: &str,
        rollout: Option<&str>,
        phase: Phase,
        release_seq: u64,
    ) {
        self.report_with_error(device, ring, rollout, phase, release_seq, None)
            .await
    }

    /// [`Fleet::report`] with the report's `last_error` set.
    pub async fn report_with_error(
        &self,
        device: &str,
        ring: &str,
        rollout: Option<&str>,
        phase: Phase,
        release_seq: u64,
        last_error: Option<ringcast_proto::report::ErrorInfo>,
    ) {
        let rel = ReleaseRef {
            name: "app".into(),
            version: format!("1.{release_seq}.0"),
            sequence: release_seq,
        };
        let committed = phase == Phase::Committed;
        let r = StateReport {
            device: device.into(),
            seq: 0,
            ring: ring.into(),
            device_class: "sensor-v2".into(),
            agent_version: "test".into(),
            current: Some(if committed {
                rel.clone()
            } else {
                ReleaseRef {
                    name: "app".into(),
                    version: "1.1.0".into(),
                    sequence: 1,
                }
            }),
            previous: None,
            target: Some(rel),
            phase,
            rollout_id: rollout.map(str::to_owned),
            last_error,
            refused: None,
            windows: vec![],
            timezone: "UTC".into(),
            updated_at: testkit::now(),
            attempt: 1,
            products: Default::default(),
        };
        self.client
            .publish(
                self.topics.state(device),
                QoS::AtLeastOnce,
                true,
                r.to_bytes(),
            )
            .await
            .unwrap();
    }

    /// Publish an event on `device`'s event topic (QoS 1, not retained, as agents do).
    pub async fn event(&self, device: &str, e: &ringcast_proto::Event) {
        self.client
            .publish(
                self.topics.events(device),
                QoS::AtLeastOnce,
                false,
                e.to_bytes(),
            )
            .await
            .unwrap();
    }

    /// Report every device of `ring` (`{ring}-{i}`, i in 0..n) in `phase`.
    pub async fn report_all(
        &self,
        ring: &str,
        n: usize,
        rollout: Option<&str>,
        phase: Phase,
        seq: u64,
    ) {
        for i in 0..n {
            self.report(&format!("{ring}-{i}"), ring, rollout, phase, seq)
                .await;
        }
    }
}

/// The rollout as the engine sees it.
pub fn rollout(h: &ControllerHandle, id: &str) -> ringcast_controller::model::Rollout {
    h.shared()
        .state
        .read()
        .unwrap()
        .rollouts
        .get(id)
        .cloned()
        .expect("rollout exists")
}

/// Wait until the engine has published `ring`'s step `step` of rollout `id`. (To jump the
/// clock past a bake, wait for [`wait_baking`] instead: a bake counts from the gate.)
pub async fn wait_step(h: &ControllerHandle, id: &str, ring: &str, step: usize) {
    wait_for(10, &format!("{ring} step {step} published"), || {
        rollout(h, id)
            .history
            .iter()
            .any(|s| s.ring == ring && s.step == step)
            .then_some(())
    })
    .await;
}

/// Wait (at most 10 s, then fail) until the engine has decided and carried out a tick at the
/// fake clock's current time: the "settled" signal after a clock jump or a report, for
/// assertions that something did NOT happen.
pub async fn settle(w: &World, h: &ControllerHandle) {
    let at = w.clock.now();
    if tokio::time::timeout(Duration::from_secs(10), h.shared().settled(at))
        .await
        .is_err()
    {
        panic!("the engine did not carry out a tick at {at} within 10s");
    }
}

/// Wait until `ring`'s step `step` of rollout `id` bakes: its gate is met and the bake clock
/// runs (or the step is already behind it). Advance the fake clock past a bake only after
/// this: a bake counts from the moment its gate is first met, so a jump taken before the
/// engine has seen the commits is a jump the bake never sees.
pub async fn wait_baking(h: &ControllerHandle, id: &str, ring: &str, step: usize) {
    use ringcast_controller::model::{RolloutState, Stage};
    wait_for(10, &format!("{ring} step {step} baking"), || {
        let r = rollout(h, id);
        let here = matches!(
            &r.state,
            RolloutState::Active { ring: g, step: s, stage: Stage::Baking { .. } | Stage::Checking { .. } }
                if g == ring && *s == step
        );
        let passed = r
            .history
            .iter()
            .any(|s| s.ring == ring && s.step == step && s.passed_at.is_some());
        (here || passed || !r.state.is_live()).then_some(())
    })
    .await;
}

/// Advance the fake clock by `step` until rollout `id` reaches `want` (a phase name),
/// failing after `secs` seconds of real time. For tests that need a rollout finished, not
/// the exact moment of each promotion.
pub async fn advance_until_phase(
    w: &World,
    h: &ControllerHandle,
    id: &str,
    step: &str,
    want: &str,
    secs: u64,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while phase(h, id) != want {
        if tokio::time::Instant::now() > deadline {
            panic!(
                "timed out after {secs}s advancing the clock until {id} is {want}; it is {}",
                phase(h, id)
            );
        }
        w.advance(step);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The phase name of a rollout.
pub fn phase(h: &ControllerHandle, id: &str) -> String {
    rollout(h, id).state.phase().to_owned()
}

/// Number of devices the controller knows that report `rollout` in `phase`.
pub fn count_phase(h: &ControllerHandle, rollout: &str, phase: Phase) -> usize {
    h.shared()
        .devices
        .read()
        .unwrap()
        .values()
        .filter(|d| {
            d.report
                .as_ref()
                .is_some_and(|r| r.rollout_id.as_deref() == Some(rollout) && r.phase == phase)
        })
        .count()
}

pub fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

pub fn secs(n: i64) -> SignedDuration {
    SignedDuration::from_secs(n)
}

/// HTTP client with a token.
pub fn api(h: &ControllerHandle, token: &str) -> ringcast_controller::client::Client {
    ringcast_controller::client::Client::new(&h.http_url(), Some(token.into()))
}

/// Run the `ringcast` binary against `h` with `token` (off the runtime: it blocks until it
/// exits, within 30 s).
pub async fn ringcast_as(h: &ControllerHandle, token: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"));
    cmd.args(args)
        .env("RINGCAST_SERVER", h.http_url())
        .env("RINGCAST_TOKEN", token);
    let run = tokio::task::spawn_blocking(move || cmd.output().expect("run ringcast"));
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("ringcast finished within 30 s")
        .expect("cli task")
}

/// [`ringcast_as`] the viewer: its stdout, or a panic with its stderr.
pub async fn cli(h: &ControllerHandle, args: &[&str]) -> String {
    let out = ringcast_as(h, VIEWER, args).await;
    assert!(
        out.status.success(),
        "ringcast failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
