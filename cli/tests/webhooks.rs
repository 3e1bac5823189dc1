//! HMAC-signed webhooks against a real receiver (axum on 127.0.0.1:0) that checks every
//! signature itself: order and ids, the events filter, retries of the same delivery, and a
//! cursor that survives a controller restart while the receiver is down.

mod common;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::*;
use hmac::{Hmac, Mac};
use ringcast_controller::audit::AuditEntry;
use ringcast_controller::config::{ControllerConfig, WebhookConfig};
use ringcast_controller::engine::RolloutAction;
use ringcast_controller::{Controller, ControllerHandle};
use ringcast_proto::{testkit, Dur};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

const SECRET: &[u8] = b"0123456789abcdef-test-secret";
const WAIT: Duration = Duration::from_secs(20);

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Got {
    delivery: String,
    event: String,
    body: serde_json::Value,
    answered: u16,
    /// Why the request was refused as malformed (bad signature, missing header …).
    bad: Option<String>,
}

#[derive(Default)]
struct Log {
    attempts: Vec<Got>,
    fail_first: usize,
}

/// The receiver's shared state; `accepted` counts 2xx answers so tests await it.
#[derive(Clone)]
struct Receiver {
    log: Arc<Mutex<Log>>,
    accepted: Arc<watch::Sender<usize>>,
}

impl Receiver {
    fn new(fail_first: usize) -> Receiver {
        Receiver {
            log: Arc::new(Mutex::new(Log {
                attempts: Vec::new(),
                fail_first,
            })),
            accepted: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Every attempt; panics if any was malformed, so every test checks every signature.
    fn attempts(&self) -> Vec<Got> {
        let all = self.log.lock().unwrap().attempts.clone();
        for g in &all {
            assert_eq!(g.bad, None, "malformed request {g:?}");
        }
        all
    }

    fn delivered(&self) -> Vec<Got> {
        self.attempts()
            .into_iter()
            .filter(|g| g.answered == 200)
            .collect()
    }

    /// Wait (bounded) until at least `n` deliveries were accepted.
    async fn wait_delivered(&self, n: usize, what: &str) -> Vec<Got> {
        let mut rx = self.accepted.subscribe();
        let ok = matches!(
            tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n)).await,
            Ok(Ok(_))
        );
        match ok {
            true => self.delivered(),
            false => panic!(
                "timed out after {WAIT:?} waiting for {n} deliveries ({what}); got {:?}",
                self.delivered()
                    .iter()
                    .map(|g| g.delivery.clone())
                    .collect::<Vec<_>>()
            ),
        }
    }
}

fn header(h: &HeaderMap, name: &str) -> Result<String, String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| format!("header {name} missing"))
}

/// Verify like a receiver would, with the hmac crate directly (not the controller's `sign`).
fn check_signature(h: &HeaderMap, body: &[u8]) -> Result<(), String> {
    let ts = header(h, "x-ringcast-timestamp")?;
    ts.parse::<i64>()
        .map_err(|_| format!("timestamp {ts:?} is not unix seconds"))?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    let sig = header(h, "x-ringcast-signature")?;
    let raw = sig
        .strip_prefix("sha256=")
        .and_then(|x| hex::decode(x).ok())
        .ok_or_else(|| format!("signature {sig:?} is not sha256=<hex>"))?;
    mac.verify_slice(&raw).map_err(|_| {
        format!(
            "bad signature {sig} for body {}",
            String::from_utf8_lossy(body)
        )
    })?;
    let ct = header(h, "content-type")?;
    if ct != "application/json" {
        return Err(format!("content-type {ct:?}"));
    }
    Ok(())
}

/// Records every attempt; answers 500 to the first `fail_first`, 400 to a malformed one
/// (the test then fails naming why), 200 otherwise.
async fn hook(State(r): State<Receiver>, h: HeaderMap, body: Bytes) -> StatusCode {
    let mut bad = check_signature(&h, &body).err();
    let json = serde_json::from_slice(&body).unwrap_or_else(|e| {
        bad.get_or_insert(format!("body is not JSON: {e}"));
        serde_json::Value::Null
    });
    let mut field = |name| {
        header(&h, name).unwrap_or_else(|e| {
            bad.get_or_insert(e);
            String::new()
        })
    };
    let (delivery, event) = (field("x-ringcast-delivery"), field("x-ringcast-event"));
    let status = {
        let mut log = r.log.lock().unwrap();
        let status = if bad.is_some() {
            StatusCode::BAD_REQUEST
        } else if log.attempts.len() < log.fail_first {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        };
        log.attempts.push(Got {
            delivery,
            event,
            body: json,
            answered: status.as_u16(),
            bad,
        });
        status
    };
    if status == StatusCode::OK {
        r.accepted.send_modify(|n| *n += 1);
    }
    status
}

/// A running receiver; `stop` shuts it down gracefully and frees the port.
struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(addr: SocketAddr, r: &Receiver) -> Server {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(r.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Server { addr, stop, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("receiver stops in time")
            .unwrap();
    }
}

fn webhook(w: &World, name: &str, url: &str, events: Option<&[&str]>) -> WebhookConfig {
    let secret_file = w.dir.path().join(format!("{name}.secret"));
    // The trailing newline an editor leaves is not part of the secret.
    let mut text = SECRET.to_vec();
    text.push(b'\n');
    write_secret(&secret_file, &text);
    WebhookConfig {
        name: name.into(),
        url: url.into(),
        secret_file,
        events: events.map(|e| e.iter().map(|s| s.to_string()).collect()),
        timeout: Dur::secs(5),
        // Fast retries keep the tests short; the backoff curve itself is unit-tested.
        retry_min: Dur(Duration::from_millis(20)),
        retry_max: Dur(Duration::from_millis(200)),
    }
}

/// The audit entries so far. Read by range rather than `export` + `verify`: the engine may
/// append between export's scan of the entries and its read of the head, which `verify`
/// would report as a truncated log.
fn audit(h: &ControllerHandle) -> Vec<AuditEntry> {
    let entries = h.shared().audit.entries_after(0, usize::MAX).unwrap();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1, "audit entries are numbered 1, 2, 3 …");
    }
    entries
}

fn config_with(w: &World, hooks: Vec<WebhookConfig>) -> ControllerConfig {
    let mut c = w.config(vec![ring("canary", &[100.0], "10m", 10, 0.2)]);
    c.webhooks = hooks;
    c
}

/// Every delivery carries the audit entry it names, with a matching delivery id and event.
fn assert_matches(g: &Got, e: &AuditEntry) {
    let id = format!("{}-{}", testkit::FLEET, e.seq);
    assert_eq!(g.delivery, id);
    assert_eq!(g.body["id"], id.as_str());
    assert_eq!(g.body["fleet"], testkit::FLEET);
    assert_eq!(g.body["seq"], e.seq);
    assert_eq!(g.event, e.action);
    assert_eq!(g.body["action"], e.action.as_str());
    assert_eq!(g.body["outcome"], e.outcome.as_str());
    assert_eq!(g.body["actor"], e.actor.as_str());
    assert_eq!(g.body["rollout_id"], serde_json::json!(e.rollout_id));
    assert_eq!(g.body["ring"], serde_json::json!(e.ring));
    assert_eq!(g.body["detail"], e.detail.as_str());
    assert_eq!(g.body["at"], serde_json::json!(e.at));
}

fn seqs(got: &[Got]) -> Vec<u64> {
    got.iter()
        .map(|g| g.body["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_events_arrive_signed_in_audit_order_and_the_filter_applies() {
    let w = World::new();
    let all = Receiver::new(0);
    let ops_only = Receiver::new(0);
    let s_all = Server::start("127.0.0.1:0".parse().unwrap(), &all).await;
    let s_ops = Server::start("127.0.0.1:0".parse().unwrap(), &ops_only).await;
    // A receiver that is never up: its retries must not hold back the other webhooks.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h = w
        .start(config_with(
            &w,
            vec![
                webhook(&w, "all", &s_all.url(), None),
                webhook(&w, "ops", &s_ops.url(), Some(&["pause", "resume"])),
                webhook(&w, "dead", &format!("http://{dead}/hook"), None),
            ],
        ))
        .await;
    let (_, ro) = w.submit_now(&h, 2).await;
    for a in [RolloutAction::Pause, RolloutAction::Resume] {
        h.engine().act(ro.id.clone(), a, None, ops()).await.unwrap();
    }
    let entries = audit(&h);
    assert!(
        entries.iter().any(|e| e.action == "release_submit"),
        "{entries:?}"
    );
    let got = all.wait_delivered(entries.len(), "every audit entry").await;
    for (g, e) in got.iter().zip(&entries) {
        assert_matches(g, e);
    }
    assert_eq!(
        seqs(&got)[..entries.len()],
        (1..=entries.len() as u64).collect::<Vec<_>>()
    );

    // Delivery is in order, so once `resume` is in, every earlier entry was dealt with:
    // the filtered webhook saw exactly the two operator actions.
    let got = ops_only.wait_delivered(2, "pause and resume").await;
    let events: Vec<&str> = got.iter().map(|g| g.event.as_str()).collect();
    assert_eq!(events, ["pause", "resume"]);
    for g in &got {
        let e = &entries[g.body["seq"].as_u64().unwrap() as usize - 1];
        assert_matches(g, e);
        assert_eq!(e.actor, "otto");
    }

    let metrics = reqwest::get(format!("{}/metrics", h.http_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "ringcast_webhook_failures_total{webhook=\"all\"} 0",
        "ringcast_webhook_failures_total{webhook=\"ops\"} 0",
        "ringcast_webhook_pending{webhook=\"ops\"}",
        "ringcast_webhook_pending{webhook=\"dead\"}",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    assert_eq!(
        h.shared().webhooks[2].cursor(),
        0,
        "nothing reached the dead receiver"
    );
    wait_for(10, "a failed attempt against the dead receiver", || {
        (h.shared().webhooks[2].failures() > 0).then_some(())
    })
    .await;
    tokio::time::timeout(WAIT, h.shutdown())
        .await
        .expect("controller with webhooks shuts down in time");
    s_all.stop().await;
    s_ops.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_gets_the_same_delivery_again_and_nothing_is_skipped() {
    let w = World::new();
    let r = Receiver::new(3);
    let s = Server::start("127.0.0.1:0".parse().unwrap(), &r).await;
    let h = w
        .start(config_with(&w, vec![webhook(&w, "flaky", &s.url(), None)]))
        .await;
    w.submit_now(&h, 2).await;
    let entries = audit(&h);
    let got = r
        .wait_delivered(entries.len(), "every entry after 3 refusals")
        .await;

    let attempts = r.attempts();
    let first = format!("{}-1", testkit::FLEET);
    for a in &attempts[..4] {
        assert_eq!(a.delivery, first, "entry 1 is retried until accepted");
    }
    assert_eq!(
        attempts[..4].iter().map(|a| a.answered).collect::<Vec<_>>(),
        [500, 500, 500, 200]
    );
    assert_eq!(
        seqs(&got)[..entries.len()],
        (1..=entries.len() as u64).collect::<Vec<_>>(),
        "in order, none skipped"
    );
    for (g, e) in got.iter().zip(&entries) {
        assert_matches(g, e);
    }
    assert_eq!(h.shared().webhooks[0].failures(), 3);
    tokio::time::timeout(WAIT, h.shutdown())
        .await
        .expect("controller shuts down in time");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_made_while_the_receiver_is_down_are_delivered_after_a_restart() {
    let w = World::new();
    let r = Receiver::new(0);
    let s = Server::start("127.0.0.1:0".parse().unwrap(), &r).await;
    let (addr, url) = (s.addr, s.url());
    let config = config_with(&w, vec![webhook(&w, "tracker", &url, None)]);

    let h = w.start(config.clone()).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    let before = audit(&h).len();
    r.wait_delivered(before, "entries while the receiver is up")
        .await;
    s.stop().await;
    let last_up = *seqs(&r.delivered()).last().unwrap();

    // The receiver is down: this entry cannot be delivered before the restart.
    h.engine()
        .act(ro.id.clone(), RolloutAction::Pause, None, ops())
        .await
        .unwrap();
    wait_for(10, "a failed attempt against the stopped receiver", || {
        (h.shared().webhooks[0].failures() > 0).then_some(())
    })
    .await;
    let head = audit(&h).len() as u64;
    assert!(head > last_up);
    tokio::time::timeout(WAIT, h.shutdown())
        .await
        .expect("controller shuts down while a delivery is being retried");

    let r2 = Receiver::new(0);
    let s2 = Server::start(addr, &r2).await;
    let h = w.start(config).await;
    let got = r2
        .wait_delivered((head - last_up) as usize, "entries from before the restart")
        .await;
    let after = seqs(&got);
    assert_eq!(
        after[0],
        last_up + 1,
        "resumes right after the last delivered entry"
    );
    assert_eq!(
        after[..(head - last_up) as usize],
        (last_up + 1..=head).collect::<Vec<_>>()
    );
    assert!(got.iter().any(|g| g.event == "pause"), "{got:?}");
    let entries = audit(&h);
    for g in &got {
        assert_matches(g, &entries[g.body["seq"].as_u64().unwrap() as usize - 1]);
    }
    tokio::time::timeout(WAIT, h.shutdown())
        .await
        .expect("controller shuts down in time");
    s2.stop().await;
}

const TOML: &str = r#"
fleet = "plant-7"
[server]
data_dir = "data"
trust = "trust.json"
controller_key = "controller.key"
[[rings]]
name = "canary"
bake = "30m"
gate = { min_reports = 5, max_failure_rate = 0.2 }
[[webhooks]]
name = "tracker"
url = "https://hooks.example.com/ringcast"
secret_file = "webhook-tracker.secret"
events = ["promote", "halt", "rollback"]
timeout = "10s"
[[webhooks]]
name = "board"
url = "http://board.internal:8080/hook"
secret_file = "/etc/ringcast/board.secret"
"#;

fn parse_err(src: &str) -> String {
    ControllerConfig::parse(src, "r.toml", Path::new("/etc/rc"))
        .unwrap_err()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_name_their_field() {
    let c = ControllerConfig::parse(TOML, "r.toml", Path::new("/etc/rc")).unwrap();
    assert_eq!(c.webhooks.len(), 2);
    assert_eq!(
        c.webhooks[0].secret_file,
        Path::new("/etc/rc/webhook-tracker.secret")
    );
    assert_eq!(c.webhooks[0].timeout.get(), Duration::from_secs(10));
    assert_eq!(c.webhooks[1].events, None);

    for (from, to, field) in [
        ("name = \"board\"", "name = \"tracker\"", "webhooks[1].name"),
        ("name = \"board\"", "name = \"Board!\"", "webhooks[1].name"),
        (
            "\"https://hooks.example.com/ringcast\"",
            "\"hooks.example.com/ringcast\"",
            "webhooks[0].url",
        ),
        (
            "\"https://hooks.example.com/ringcast\"",
            "\"ftp://hooks.example.com/\"",
            "webhooks[0].url",
        ),
        (
            "events = [\"promote\", \"halt\", \"rollback\"]",
            "events = []",
            "webhooks[0].events",
        ),
        (
            "timeout = \"10s\"",
            "timeout = \"0s\"",
            "webhooks[0].timeout",
        ),
    ] {
        let e = parse_err(&TOML.replace(from, to));
        assert!(e.contains(field), "{field}: {e}");
    }
    let e = parse_err(&TOML.replace("timeout = \"10s\"", "timeuot = \"10s\""));
    assert!(e.contains("timeuot"), "{e}");

    // Secrets are read at startup: a short or missing one stops it, naming the field.
    let w = World::new();
    let mut hook = webhook(&w, "tracker", "http://127.0.0.1:9/hook", None);
    std::fs::write(&hook.secret_file, "fifteen-bytes!!\n").unwrap();
    for missing in [false, true] {
        if missing {
            hook.secret_file = w.dir.path().join("nope.secret");
        }
        let err = Controller::start(
            config_with(&w, vec![hook.clone()]),
            Arc::new(w.clock.clone()),
        )
        .await
        .err()
        .expect("startup refuses the secret");
        assert_eq!(err.code(), "bad_config");
        let text = err.to_string();
        assert!(text.contains("webhooks[0].secret_file"), "{text}");
        assert!(
            text.contains(if missing { "cannot read" } else { "15 bytes" }),
            "{text}"
        );
    }
    // Sixteen bytes plus the newline are enough, if only the owner can read them.
    write_secret(&w.dir.path().join("ok.secret"), b"sixteen-bytes!!!\n");
    hook.secret_file = w.dir.path().join("ok.secret");
    assert_eq!(
        hook.load_secret("webhooks[0]").unwrap(),
        b"sixteen-bytes!!!"
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook.secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = hook.load_secret("webhooks[0]").unwrap_err().to_string();
    assert!(
        e.contains("webhooks[0].secret_file") && e.contains("0644"),
        "{e}"
    );
}

/// Write a secret file the way operators are told to: mode 0600.
fn write_secret(path: &std::path::Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}
