//! A forecast compared with the run it predicted: the real controller, the embedded broker
//! and real agents, three rings (one with a 50 % step), a real probation and artifacts
//! behind a slow link. Release 1 rolls out first, so the fleet's own events measure the
//! download; the forecast taken when release 2 is submitted is then held against the time
//! each device actually commits it.
//!
//! Everything runs in real time: nothing jumps the controller's clock (its fake clock moves
//! at real speed from the system time it started at), and agents run on the system clock,
//! so device durations, the controller's timeline and the commits it records are on one
//! time line. Bakes are a second long for that reason.
//!
//! The bound: ring k (counted from 1) may miss by at most `k × PER_RING`. A device of ring k
//! commits after at least k commits in a row (its own, and at least one gate per ring
//! before it), each after a download and a probation, so a forecast that left out either
//! would be early by at least `k × download` or `k × probation`, and the test checks that
//! both exceed twice the bound: such a forecast could not pass.
//!
//! `cargo test -p ringcast-tests --test forecast -- --nocapture` prints the table kept in
//! BENCHMARKS.md.

use ringcast::kit::{app_bundle, AppHealth, AppRelease};
use ringcast_controller::engine::forecast::{Prediction, RolloutForecast};
use ringcast_controller::engine::Submit;
use ringcast_proto::jiff::{SignedDuration, Timestamp};
use ringcast_proto::{Clock, EventKind, Phase};
use ringcast_tests::sim_stage::{operator, ring, BrokerKind, Stage, StageSpec, APP, CLASS};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Probation of both releases.
const PROBATION: Duration = Duration::from_secs(2);
/// How long the slow link takes to deliver an artifact.
const LINK: Duration = Duration::from_millis(1500);
/// Pieces the link delivers an artifact in.
const PIECES: u32 = 6;
/// Allowed forecast error per ring (ring k: k × this), in seconds.
const PER_RING: f64 = 0.6;

/// An HTTP server that delivers each artifact in [`PIECES`] pieces spread over [`LINK`]: a
/// slow network link standing between the devices and their artifacts. (The pauses between
/// pieces *are* the link's slowness, not a wait for anything.)
struct SlowLink {
    port: u16,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

impl SlowLink {
    fn start() -> SlowLink {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind the artifact server");
        let port = listener.local_addr().expect("its port").port();
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let served = files.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let files = served.clone();
                std::thread::spawn(move || serve(conn, &files));
            }
        });
        SlowLink { port, files }
    }

    /// Serve `bytes` at `path`; the absolute URL.
    fn put(&self, path: &str, bytes: Vec<u8>) -> String {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_owned(), bytes);
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

fn serve(mut conn: TcpStream, files: &Mutex<HashMap<String, Vec<u8>>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1).unwrap_or("").to_owned();
    let body = files
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&path)
        .cloned();
    let Some(body) = body else {
        let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let _ = conn.set_nodelay(true);
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if conn.write_all(head.as_bytes()).is_err() {
        return;
    }
    let piece = body.len().div_ceil(PIECES as usize).max(1);
    for chunk in body.chunks(piece) {
        std::thread::sleep(LINK / PIECES);
        if conn.write_all(chunk).is_err() {
            return;
        }
    }
}

/// Sign and submit app release `sequence` (probation [`PROBATION`]) whose artifact the slow
/// link serves. Returns the rollout id and the submit time on the controller's clock.
async fn submit(stage: &Stage, link: &SlowLink, sequence: u64) -> (String, Timestamp) {
    let mut rel = AppRelease::new(APP, sequence, CLASS);
    rel.probation = PROBATION;
    let bundle = app_bundle(&rel.version.to_string(), AppHealth::Healthy).expect("a bundle");
    let url = link.put(&format!("/app-{sequence}.tar.gz"), bundle.clone());
    let issued = Timestamp::now() - SignedDuration::from_secs(60);
    let envelope = rel
        .manifest(&url, &bundle, issued)
        .sign(&[&stage.keys.release]);
    let (_, ro) = stage
        .controller()
        .engine()
        .submit(
            Submit {
                envelope,
                start_at: None,
                activate_at: None,
                launch: None,
            },
            operator(),
        )
        .await
        .expect("release accepted");
    (ro.id, stage.clock.now())
}

/// When the controller received `device`'s `committed` event for `rollout` (its clock).
fn committed_at(stage: &Stage, device: &str, rollout: &str) -> Option<Timestamp> {
    stage
        .controller()
        .shared()
        .store
        .device_events(device, usize::MAX)
        .ok()?
        .into_iter()
        .find(|e| {
            e.event.kind == EventKind::Committed && e.event.rollout_id.as_deref() == Some(rollout)
        })
        .map(|e| e.received_at)
}

/// Every device committed `sequence`, and the controller holds each one's commit event.
fn all_committed(stage: &Stage, sequence: u64, rollout: &str, devices: &[String]) -> bool {
    stage.count(Phase::Committed, sequence) == devices.len()
        && devices
            .iter()
            .all(|d| committed_at(stage, d, rollout).is_some())
}

fn secs(d: SignedDuration) -> f64 {
    d.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forecast_at_submit_matches_each_rings_commits_within_a_bound_that_omitting_probation_or_download_would_break(
) {
    let rings = vec![
        ring("canary", &[100.0], "1s", 1, 0.0),
        ring("early", &[50.0, 100.0], "1s", 1, 0.0),
        ring("broad", &[100.0], "1s", 2, 0.0),
    ];
    let names: Vec<String> = rings.iter().map(|r| r.name.clone()).collect();
    let spec = StageSpec::new(BrokerKind::Embedded, rings, &[1, 4, 3]);
    let Some(stage) = Stage::start(spec).await else {
        return;
    };
    let devices: Vec<String> = stage.statuses().into_iter().map(|r| r.device).collect();
    let ring_of: HashMap<String, String> = stage
        .statuses()
        .into_iter()
        .map(|r| (r.device, r.ring))
        .collect();
    let link = SlowLink::start();

    // Release 1: the fleet's own events measure the link.
    let (r1, _) = submit(&stage, &link, 1).await;
    stage
        .wait_until("release 1 completed and every commit recorded", 120, |s| {
            s.phase(&r1) == "completed" && all_committed(s, 1, &r1, &devices)
        })
        .await;

    // Release 2: the forecast at submit time.
    let (r2, t0) = submit(&stage, &link, 2).await;
    let forecast = stage.controller().shared().forecast();
    let rf: RolloutForecast = forecast
        .rollouts
        .iter()
        .find(|f| f.rollout_id == r2)
        .cloned()
        .expect("a forecast for the new rollout");
    let predicted: BTreeMap<String, Prediction> = devices
        .iter()
        .map(|d| {
            let p = forecast.device(d).cloned().expect("every device forecast");
            assert_eq!(p.rollout_id, r2, "{d}");
            assert!(p.at.is_some(), "{d} has a time: {p:?}");
            (d.clone(), p)
        })
        .collect();
    assert!(
        rf.download.samples as usize >= devices.len() / 2
            && rf.download.measured_on == [r1.clone()],
        "the download is measured on release 1's devices: {:?}",
        rf.download
    );

    stage
        .wait_until("release 2 committed everywhere", 120, |s| {
            s.phase(&r2) == "completed" && all_committed(s, 2, &r2, &devices)
        })
        .await;

    // Per ring: forecast error of each device's commit.
    let download = rf.download.secs;
    let probation = rf.probation_secs;
    println!(
        "forecast at submit of {r2}: download {}, install {}, probation {probation}s + lag {}",
        rf.download.describe(),
        rf.install.describe(),
        rf.commit_lag.describe()
    );
    println!("| ring (k) | devices | predicted commit (s after submit) | actual (s after submit) | error (s) min / max | bound ±(s) |");
    println!("|---|---|---|---|---|---|");
    let mut failures = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let k = (i + 1) as f64;
        let bound = k * PER_RING;
        assert!(
            k * download > 2.0 * bound && k * probation > 2.0 * bound,
            "the bound ±{bound:.1}s would let a forecast without download ({download}s) or \
             probation ({probation}s) pass in ring {name}"
        );
        let mut rows = Vec::new();
        for d in devices.iter().filter(|d| ring_of.get(*d) == Some(name)) {
            let p = &predicted[d];
            let at = p.at.expect("checked above");
            let actual = committed_at(&stage, d, &r2).expect("checked above");
            let err = secs(at.duration_since(actual));
            if err.abs() > bound {
                failures.push(format!(
                    "{d} (ring {name}): predicted {at}, committed {actual}: off by {err:+.2}s > ±{bound:.1}s ({})",
                    p.note
                ));
            }
            rows.push((
                secs(at.duration_since(t0)),
                secs(actual.duration_since(t0)),
                err,
            ));
        }
        assert!(!rows.is_empty(), "ring {name} has devices");
        let span = |f: fn(&(f64, f64, f64)) -> f64| {
            let lo = rows.iter().map(f).fold(f64::INFINITY, f64::min);
            let hi = rows.iter().map(f).fold(f64::NEG_INFINITY, f64::max);
            (lo, hi)
        };
        let (p_lo, p_hi) = span(|r| r.0);
        let (a_lo, a_hi) = span(|r| r.1);
        let (e_lo, e_hi) = span(|r| r.2);
        println!(
            "| {name} ({k}) | {} | {p_lo:.2} – {p_hi:.2} | {a_lo:.2} – {a_hi:.2} | {e_lo:+.2} / {e_hi:+.2} | {bound:.1} |",
            rows.len()
        );
    }
    assert!(
        failures.is_empty(),
        "forecast errors over the bound:\n{}\n{}",
        failures.join("\n"),
        stage.dump()
    );
    stage.shutdown().await;
}
