//! ACCEPTANCE.md case 27 on one device: every way a directive can stop work that has not
//! activated (a rollback to the running release, a ring hold, another release, a device hold
//! ending a pin, a release that failed here in the rollout, a ramp that leaves the device
//! out), in each phase it can stop it in (downloading from a stalled server; staged behind a
//! `not_before` or the device's own closed window; killed while verifying), plus the sweep of
//! half-unpacked releases. Real broker, signed directives, HTTP server, files, sled.
//!
//! After a cancel that starts no new job the device must say, at once: `idle`, `current` and
//! `previous` unchanged, no `target`, the `rollout_id` of the directive that caused it; the
//! download must be aborted and its `.part` and staged artifact gone.

mod common;
use common::*;
use jiff::{SignedDuration, Timestamp};
use ringcast_agent::{Agent, AgentHandle, Deps, Error, FsInstaller, SledStore, Store};
use ringcast_proto::release::{CheckKind, HealthCheck, Release};
use ringcast_proto::testkit::Fixture;
use ringcast_proto::{Action, Directive, Dur, EventKind, Percent, Phase, ReleaseRef, StateReport};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bound on every wait for the agent (generous: two cores shared with other builds).
const WAIT: Duration = Duration::from_secs(20);

/// Where the work to cancel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Downloading from a server that sent half the body and stalls.
    Downloading,
    /// Verified and staged; the directive's `not_before` is an hour away.
    StagedNotBefore,
    /// Verified and staged; the device's own delivery window is closed.
    StagedWindowClosed,
}

/// What stops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// The ring goes back to the release the device runs (rollback after a halt).
    Rollback,
    /// The ring is held (halt or abort).
    Hold,
    /// A device hold ends the pin the work was for; the ring runs the current release.
    DeviceHold,
    /// The ring asks again for a release that failed here in that rollout.
    FailedBefore,
    /// A new ring rollout whose ramp (0 %) leaves this device out.
    NotInRamp,
}

/// The release each rig starts from, committed.
const BASE: u64 = 1;
/// The release whose work gets cancelled.
const NEXT: u64 = 2;

struct Rig {
    f: Fixture,
    http: HttpServer,
    dev: Device,
    ctl: Ctl,
    agent: Option<AgentHandle>,
    base: Release,
}

async fn rig(id: &str) -> Rig {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let mut dev = Device::new(&f, id, port);
    // A stall is never what ends a download here: only a cancel may close the connection.
    dev.cfg.download.stall_timeout = Dur(Duration::from_secs(60));
    let ctl = Ctl::connect(port, &format!("ctl-{id}")).await;
    let art = app_bundle("1.1.0", true);
    http.route("/base", vec![Serve::Bytes(art.clone())]);
    let base = release(BASE, 1, &http.url("/base"), &art);
    let agent = Some(dev.spawn());
    Rig {
        f,
        http,
        dev,
        ctl,
        agent,
        base,
    }
}

fn seq_of(r: &Option<ReleaseRef>) -> Option<u64> {
    r.as_ref().map(|x| x.sequence)
}

impl Rig {
    fn agent(&self) -> &AgentHandle {
        self.agent.as_ref().expect("agent running")
    }

    fn ring(&self, rollout: &str, r: &Release) -> Directive {
        directive(&self.f, rollout, r)
    }

    async fn send_ring(&self, d: &Directive) {
        self.ctl
            .ring_directive(&d.sign(&[&self.f.controller]))
            .await;
    }

    async fn send_device(&self, d: &Directive) {
        self.ctl
            .device_directive(&self.dev.cfg.device_id, &d.sign(&[&self.f.controller]))
            .await;
    }

    fn hold(&self, rollout: &str) -> Directive {
        let mut d = self.ring(rollout, &self.base);
        d.action = Action::Hold;
        d.release = None;
        d
    }

    /// Commit the base release through the ring (rollout `base`).
    async fn baseline(&self) {
        self.send_ring(&self.ring("base", &self.base)).await;
        self.wait_state("base committed", |s| {
            s.phase == Phase::Committed && seq_of(&s.current) == Some(BASE)
        })
        .await;
    }

    async fn wait_state(&self, what: &str, pred: impl Fn(&StateReport) -> bool) -> StateReport {
        self.ctl.wait_state(what, WAIT, pred).await
    }

    async fn wait_phase(&self, phase: Phase, rollout: &str, seq: u64) -> StateReport {
        self.wait_state(&format!("{} of {seq} in {rollout}", phase.as_str()), |s| {
            s.phase == phase
                && s.rollout_id.as_deref() == Some(rollout)
                && seq_of(&s.target) == Some(seq)
        })
        .await
    }

    /// Release `seq` served at `/r{seq}` as `serve` says.
    fn release_served(&self, seq: u64, healthy: bool, stall: bool) -> Release {
        let art = app_bundle(&format!("1.{seq}.0"), healthy);
        let path = format!("/r{seq}");
        let serve = if stall {
            Serve::StallAfter {
                after: art.len() / 2,
                bytes: art.clone(),
            }
        } else {
            Serve::Bytes(art.clone())
        };
        self.http.route(&path, vec![serve]);
        release(seq, 1, &self.http.url(&path), &art)
    }

    fn part(&self, r: &Release) -> std::path::PathBuf {
        let sha = &r.artifact.sha256;
        self.dev
            .cfg
            .data_dir
            .join("artifacts")
            .join(format!("{sha}.part"))
    }

    fn staged(&self, r: &Release) -> std::path::PathBuf {
        self.dev
            .cfg
            .data_dir
            .join("artifacts")
            .join(&r.artifact.sha256)
    }

    /// Restart the agent with the device's own window closed.
    async fn close_device_window(&mut self) {
        if let Some(a) = self.agent.take() {
            a.shutdown().await.unwrap();
        }
        self.dev.cfg.windows = vec![closed_window()];
        self.agent = Some(self.dev.spawn());
    }

    /// Deliver release `seq` for `rollout` (from the ring, or from a pin when `pin`) and wait
    /// until the work is `at`. Returns the release.
    async fn bring(&mut self, at: At, rollout: &str, seq: u64, pin: bool) -> Release {
        if at == At::StagedWindowClosed {
            self.close_device_window().await;
        }
        let r = self.release_served(seq, true, at == At::Downloading);
        let mut d = self.ring(rollout, &r);
        if at == At::StagedNotBefore {
            d.activation.not_before = Some(Timestamp::now() + SignedDuration::from_hours(1));
        }
        if pin {
            d.device = Some(self.dev.cfg.device_id.clone());
            self.send_device(&d).await;
        } else {
            self.send_ring(&d).await;
        }
        match at {
            At::Downloading => {
                self.wait_phase(Phase::Downloading, rollout, seq).await;
                // The first half of the body is on disk; the connection hangs open.
                self.ctl
                    .wait_event("download progress", WAIT, |e| {
                        matches!(e.kind, EventKind::Downloading { received, .. } if received > 0)
                            && e.rollout_id.as_deref() == Some(rollout)
                    })
                    .await;
                wait_file(&self.part(&r)).await;
                assert_eq!(self.http.open.load(Ordering::SeqCst), 1, "download running");
            }
            At::StagedNotBefore | At::StagedWindowClosed => {
                self.wait_phase(Phase::Staged, rollout, seq).await;
                assert!(self.staged(&r).is_file(), "staged artifact on disk");
            }
        }
        r
    }

    /// The device reports the cancel truthfully, at once, and its files are gone.
    async fn assert_cancelled(
        &self,
        before: &StateReport,
        rollout: &str,
        event: &str,
        reason: Option<&str>,
        dropped: &Release,
    ) {
        let s = self
            .wait_state(&format!("idle for {rollout}"), |s| {
                s.phase == Phase::Idle && s.rollout_id.as_deref() == Some(rollout)
            })
            .await;
        assert_eq!(s.target, None, "no target after a cancel: {s:#?}");
        assert_eq!(s.current, before.current, "current unchanged");
        assert_eq!(s.previous, before.previous, "previous unchanged");
        assert_eq!(s.last_error, None);
        // What the process itself says, too.
        let own = self.agent().status();
        assert_eq!(own.phase, Phase::Idle);
        assert_eq!(own.target, None);
        assert_eq!(own.rollout_id.as_deref(), Some(rollout));
        let e = self
            .ctl
            .wait_event(&format!("{event} for {rollout}"), WAIT, |e| {
                e.kind.name() == event && e.rollout_id.as_deref() == Some(rollout)
            })
            .await;
        if let Some(want) = reason {
            match &e.kind {
                EventKind::Cancelled { reason } => assert_eq!(reason, want),
                other => panic!("expected cancelled, got {other:?}"),
            }
            assert_eq!(
                seq_of(&e.release),
                Some(dropped.sequence),
                "names the dropped release"
            );
        }
        // The running download was aborted: its connection closed long before any stall
        // timeout (60 s) could have closed it.
        self.http
            .wait_no_open_connections("the download to be aborted", Duration::from_secs(10))
            .await;
        assert!(!self.part(dropped).exists(), "partial download removed");
        assert!(!self.staged(dropped).exists(), "staged artifact removed");
        assert_eq!(artifact_files(&self.dev), Vec::<String>::new());
        assert_eq!(
            read_version(&self.dev.install_root()).as_deref(),
            before.current.as_ref().map(|c| c.version.as_str()),
            "the running release is untouched"
        );
        // Nothing published after the cancel says otherwise.
        let last = self.ctl.states.lock().unwrap().last().cloned().unwrap();
        assert_eq!((last.phase, last.target), (Phase::Idle, None));
    }

    async fn stop(mut self) {
        if let Some(a) = self.agent.take() {
            a.shutdown().await.unwrap();
        }
    }
}

/// Wait for a file the agent writes to exist with some bytes (written by a tokio file task:
/// there is nothing to await from outside).
async fn wait_file(path: &std::path::Path) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no {path:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One cause at one point: baseline, the work, the cause, the truthful report.
async fn cancel_case(id: &str, at: At, cause: Cause) {
    let mut rig = rig(id).await;
    rig.baseline().await;
    if cause == Cause::FailedBefore {
        // Release 3 fails its health check here in rollout `bad` and is reverted.
        let bad = rig.release_served(3, false, false);
        rig.send_ring(&rig.ring("bad", &bad)).await;
        rig.wait_phase(Phase::Reverted, "bad", 3).await;
    }
    let pin = cause == Cause::DeviceHold;
    let work_rollout = if pin { "pin-dev-1" } else { "next" };
    let dropped = rig.bring(at, work_rollout, NEXT, pin).await;
    let before = rig.agent().status();
    let (rollout, event, reason) = match cause {
        Cause::Rollback => {
            rig.send_ring(&rig.ring("next-rollback", &rig.base)).await;
            ("next-rollback", "cancelled", Some("already_current"))
        }
        Cause::Hold => {
            rig.send_ring(&rig.hold("next")).await;
            ("next", "held", None)
        }
        Cause::DeviceHold => {
            let mut d = rig.hold("pin-dev-1");
            d.device = Some(rig.dev.cfg.device_id.clone());
            rig.send_device(&d).await;
            // Back to its ring, whose standing directive is the release it runs.
            ("pin-dev-1", "cancelled", Some("already_current"))
        }
        Cause::FailedBefore => {
            let again = rig.release_served(3, false, false);
            rig.send_ring(&rig.ring("bad", &again)).await;
            ("bad", "cancelled", Some("failed_before"))
        }
        Cause::NotInRamp => {
            let later = rig.release_served(4, true, false);
            let mut d = rig.ring("later", &later);
            d.percent = Percent::ZERO;
            rig.send_ring(&d).await;
            ("later", "cancelled", Some("not_in_ramp"))
        }
    };
    rig.assert_cancelled(&before, rollout, event, reason, &dropped)
        .await;
    if cause == Cause::FailedBefore {
        assert_eq!(
            rig.ctl.event_count("installed"),
            2,
            "the failed release is not retried"
        );
    }
    rig.stop().await;
}

// ----- rollback to the running release -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_while_downloading_aborts_and_reports_idle_on_the_running_release() {
    cancel_case("dev-c-rb-dl", At::Downloading, Cause::Rollback).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_while_staged_for_not_before_reports_idle_on_the_running_release() {
    cancel_case("dev-c-rb-nb", At::StagedNotBefore, Cause::Rollback).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_while_staged_behind_a_closed_device_window_reports_idle_on_the_running_release() {
    cancel_case("dev-c-rb-win", At::StagedWindowClosed, Cause::Rollback).await;
}

// ----- ring hold (halt, abort) -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hold_while_downloading_aborts_and_reports_idle_with_no_target() {
    cancel_case("dev-c-hold-dl", At::Downloading, Cause::Hold).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hold_while_staged_removes_the_artifact_and_reports_idle_with_no_target() {
    cancel_case("dev-c-hold-st", At::StagedNotBefore, Cause::Hold).await;
}

// ----- device hold (unpin) -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpin_while_the_pinned_release_downloads_returns_the_device_to_its_ring_idle() {
    cancel_case("dev-c-pin-dl", At::Downloading, Cause::DeviceHold).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpin_while_the_pinned_release_is_staged_returns_the_device_to_its_ring_idle() {
    cancel_case("dev-c-pin-st", At::StagedNotBefore, Cause::DeviceHold).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpin_with_no_ring_directive_cancels_the_pinned_download_as_a_hold() {
    let mut rig = rig("dev-c-pin-alone").await;
    let dropped = rig.bring(At::Downloading, "pin-dev-1", NEXT, true).await;
    let before = rig.agent().status();
    let mut d = rig.hold("pin-dev-1");
    d.device = Some(rig.dev.cfg.device_id.clone());
    rig.send_device(&d).await;
    rig.assert_cancelled(&before, "pin-dev-1", "held", None, &dropped)
        .await;
    assert_eq!(rig.agent().status().current, None);
    rig.stop().await;
}

// ----- a release that failed here in the rollout ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_that_failed_here_asked_for_again_cancels_the_download_for_another() {
    cancel_case("dev-c-fail-dl", At::Downloading, Cause::FailedBefore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_that_failed_here_asked_for_again_cancels_the_staged_other_release() {
    cancel_case("dev-c-fail-st", At::StagedNotBefore, Cause::FailedBefore).await;
}

// ----- a new rollout whose ramp leaves the device out ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_rollout_without_this_device_in_its_ramp_cancels_the_download() {
    cancel_case("dev-c-ramp-dl", At::Downloading, Cause::NotInRamp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_rollout_without_this_device_in_its_ramp_cancels_the_staged_release() {
    cancel_case("dev-c-ramp-st", At::StagedNotBefore, Cause::NotInRamp).await;
}

// ----- supersede: another release starts ------------------------------------------------------

/// Release 3 replaces release 2's work; no report ever names release 2 as the target under
/// the new rollout (or release 3 under the old one), and none names release 2 once release 3
/// took over.
async fn supersede_case(id: &str, at: At) {
    let mut rig = rig(id).await;
    rig.baseline().await;
    let dropped = rig.bring(at, "next", NEXT, false).await;
    let mark = rig.ctl.states.lock().unwrap().len();
    let newer = rig.release_served(3, true, false);
    let mut d = rig.ring("newer", &newer);
    d.activation.not_before = Some(Timestamp::now() + SignedDuration::from_hours(1));
    rig.send_ring(&d).await;
    rig.wait_phase(Phase::Staged, "newer", 3).await;
    let e = rig
        .ctl
        .wait_event(
            "cancelled superseded",
            WAIT,
            |e| matches!(&e.kind, EventKind::Cancelled { reason } if reason == "superseded"),
        )
        .await;
    assert_eq!(e.rollout_id.as_deref(), Some("newer"));
    assert_eq!(seq_of(&e.release), Some(NEXT));
    let states = rig.ctl.states.lock().unwrap()[mark..].to_vec();
    let first_new = states
        .iter()
        .position(|s| s.rollout_id.as_deref() == Some("newer"))
        .expect("a report for the new rollout");
    for s in &states {
        let (rollout, target) = (s.rollout_id.as_deref(), seq_of(&s.target));
        assert!(
            !(rollout == Some("newer") && target != Some(3)),
            "new rollout with another target: {s:#?}"
        );
        assert!(
            !(rollout == Some("next") && target == Some(3)),
            "old rollout with the new target: {s:#?}"
        );
    }
    for s in &states[first_new..] {
        assert_eq!(
            seq_of(&s.target),
            Some(3),
            "old target after the switch: {s:#?}"
        );
        assert_eq!(seq_of(&s.current), Some(BASE));
    }
    rig.http
        .wait_no_open_connections("the old download to be aborted", Duration::from_secs(10))
        .await;
    assert!(!rig.part(&dropped).exists(), "old partial download removed");
    assert!(
        !rig.staged(&dropped).exists(),
        "old staged artifact removed"
    );
    assert_eq!(
        artifact_files(&rig.dev),
        vec![newer.artifact.sha256.clone()]
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_release_while_downloading_starts_it_and_never_reports_the_old_target() {
    supersede_case("dev-c-sup-dl", At::Downloading).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_release_while_staged_starts_it_and_never_reports_the_old_target() {
    supersede_case("dev-c-sup-st", At::StagedNotBefore).await;
}

// ----- an install with no release ---------------------------------------------------------------

/// Refused before any work (`malformed`): the work under way goes on untouched.
async fn install_without_release_case(id: &str, at: At) {
    let mut rig = rig(id).await;
    rig.baseline().await;
    let work = rig.bring(at, "next", NEXT, false).await;
    let mut d = rig.ring("next", &rig.base);
    d.release = None;
    rig.send_ring(&d).await;
    rig.ctl.wait_rejected("malformed").await;
    let want = match at {
        At::Downloading => Phase::Downloading,
        _ => Phase::Staged,
    };
    let s = rig.agent().status();
    assert_eq!(s.phase, want);
    assert_eq!(s.rollout_id.as_deref(), Some("next"));
    assert_eq!(seq_of(&s.target), Some(NEXT));
    match at {
        At::Downloading => {
            assert!(rig.part(&work).exists());
            assert_eq!(
                rig.http.open.load(Ordering::SeqCst),
                1,
                "download still running"
            );
        }
        _ => assert!(rig.staged(&work).is_file()),
    }
    assert_eq!(
        rig.ctl.event_count("cancelled") + rig.ctl.event_count("held"),
        0
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_with_no_release_is_refused_and_the_download_goes_on() {
    install_without_release_case("dev-c-norel-dl", At::Downloading).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_with_no_release_is_refused_and_the_staged_release_stays() {
    install_without_release_case("dev-c-norel-st", At::StagedNotBefore).await;
}

// ----- killed while verifying -----------------------------------------------------------------

/// A real sled store that loses power (every write fails, as if the process died) right
/// after the agent persisted `verifying` — the moment a SIGKILL cannot be timed to from
/// outside: verification runs inside the agent's loop and takes microseconds.
#[derive(Debug)]
struct PowerCutAtVerifying {
    inner: SledStore,
    armed: AtomicBool,
    cut: AtomicBool,
    notify: tokio::sync::Notify,
}

impl PowerCutAtVerifying {
    fn dead(&self) -> ringcast_agent::Result<()> {
        if self.cut.load(Ordering::SeqCst) {
            return Err(Error::Store("power cut (test)".into()));
        }
        Ok(())
    }
}

impl Store for PowerCutAtVerifying {
    fn get(&self, key: &str) -> ringcast_agent::Result<Option<Vec<u8>>> {
        self.inner.get(key)
    }
    fn put(&self, key: &str, value: &[u8]) -> ringcast_agent::Result<()> {
        self.dead()?;
        self.inner.put(key, value)?;
        let verifying = serde_json::from_slice::<serde_json::Value>(value)
            .is_ok_and(|v| v["phase"] == "verifying");
        if key == "state" && verifying && self.armed.load(Ordering::SeqCst) {
            self.cut.store(true, Ordering::SeqCst);
            self.notify.notify_waiters();
        }
        Ok(())
    }
    fn outbox_push(&self, msg: &[u8]) -> ringcast_agent::Result<u64> {
        self.dead()?;
        self.inner.outbox_push(msg)
    }
    fn outbox_peek(&self, max: usize) -> ringcast_agent::Result<Vec<(u64, Vec<u8>)>> {
        self.dead()?;
        self.inner.outbox_peek(max)
    }
    fn outbox_remove(&self, seq: u64) -> ringcast_agent::Result<()> {
        self.dead()?;
        self.inner.outbox_remove(seq)
    }
    fn outbox_len(&self) -> ringcast_agent::Result<usize> {
        self.inner.outbox_len()
    }
}

fn persisted_phase(dev: &Device) -> String {
    let store = SledStore::open(&dev.cfg.data_dir.join("db")).unwrap();
    let bytes = store.get("state").unwrap().expect("state persisted");
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["phase"].as_str().unwrap_or_default().to_owned()
}

/// The agent dies in `verifying`; while it is down the ring changes (`cause`); it restarts,
/// resumes (verifying → downloading) and must then cancel and report truthfully.
async fn killed_in_verifying_case(id: &str, cause: Cause) {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let mut dev = Device::new(&f, id, port);
    dev.cfg.download.stall_timeout = Dur(Duration::from_secs(60));
    let ctl = Ctl::connect(port, &format!("ctl-{id}")).await;
    std::fs::create_dir_all(&dev.cfg.data_dir).unwrap();
    let store = Arc::new(PowerCutAtVerifying {
        inner: SledStore::open(&dev.cfg.data_dir.join("db")).unwrap(),
        armed: AtomicBool::new(false),
        cut: AtomicBool::new(false),
        notify: tokio::sync::Notify::new(),
    });
    let deps = Deps {
        store: store.clone(),
        clock: Arc::new(ringcast_proto::SystemClock),
        installer: Arc::new(FsInstaller::new(
            dev.install_root(),
            Duration::from_secs(20),
            2048,
        )),
    };
    let agent = Agent::new(dev.cfg.clone(), deps).unwrap().spawn();
    let base_art = app_bundle("1.1.0", true);
    http.route("/base", vec![Serve::Bytes(base_art.clone())]);
    let base = release(BASE, 1, &http.url("/base"), &base_art);
    ctl.ring_directive(&directive(&f, "base", &base).sign(&[&f.controller]))
        .await;
    ctl.wait_state("base committed", WAIT, |s| s.phase == Phase::Committed)
        .await;
    let before = agent.status();

    // Release 2 downloads in full; the power goes right after `verifying` is persisted.
    store.armed.store(true, Ordering::SeqCst);
    let art = app_bundle("1.2.0", true);
    http.route("/r2", vec![Serve::Bytes(art.clone())]);
    let r2 = release(NEXT, 1, &http.url("/r2"), &art);
    let cut = store.notify.notified();
    ctl.ring_directive(&directive(&f, "next", &r2).sign(&[&f.controller]))
        .await;
    tokio::time::timeout(WAIT, cut)
        .await
        .expect("the agent reaches verifying");
    let died = tokio::time::timeout(WAIT, agent.shutdown())
        .await
        .expect("the agent stops");
    assert!(
        died.as_ref()
            .is_err_and(|e| e.to_string().contains("power cut")),
        "the agent died of the power cut: {died:?}"
    );
    drop(store);
    assert_eq!(persisted_phase(&dev), "verifying");

    // While it is down the ring changes; a re-download would hang half-way.
    http.route(
        "/r2",
        vec![Serve::StallAfter {
            after: art.len() / 2,
            bytes: art.clone(),
        }],
    );
    let (rollout, event) = match cause {
        Cause::Rollback => {
            let d = directive(&f, "next-rollback", &base);
            ctl.ring_directive(&d.sign(&[&f.controller])).await;
            ("next-rollback", "cancelled")
        }
        Cause::Hold => {
            let mut d = directive(&f, "next", &base);
            d.action = Action::Hold;
            d.release = None;
            ctl.ring_directive(&d.sign(&[&f.controller])).await;
            ("next", "held")
        }
        other => unreachable!("{other:?}"),
    };
    let agent = dev.spawn();
    let s = ctl
        .wait_state("idle after the restart", WAIT, |s| {
            s.phase == Phase::Idle && s.rollout_id.as_deref() == Some(rollout)
        })
        .await;
    assert_eq!(s.target, None);
    assert_eq!(s.current, before.current);
    assert_eq!(s.previous, before.previous);
    ctl.wait_event(event, WAIT, |e| {
        e.kind.name() == event && e.rollout_id.as_deref() == Some(rollout)
    })
    .await;
    http.wait_no_open_connections("no download left running", Duration::from_secs(10))
        .await;
    let sha = &r2.artifact.sha256;
    let artifacts = dev.cfg.data_dir.join("artifacts");
    assert!(!artifacts.join(sha).exists(), "verified artifact removed");
    assert!(
        !artifacts.join(format!("{sha}.part")).exists(),
        "partial removed"
    );
    assert_eq!(artifact_files(&dev), Vec::<String>::new());
    assert_eq!(read_version(&dev.install_root()).as_deref(), Some("1.1.0"));
    let own = agent.status();
    assert_eq!((own.phase, own.target), (Phase::Idle, None));
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_verifying_then_rolled_back_resumes_and_reports_idle_on_the_running_release() {
    killed_in_verifying_case("dev-c-kv-rb", Cause::Rollback).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_verifying_then_held_resumes_and_reports_idle_with_no_target() {
    killed_in_verifying_case("dev-c-kv-hold", Cause::Hold).await;
}

// ----- leftovers of interrupted unpacks ------------------------------------------------------

fn plant_staging(dev: &Device, version: &str) -> std::path::PathBuf {
    let dir = dev
        .install_root()
        .join("releases")
        .join(format!(".staging-{version}"));
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    std::fs::write(dir.join("lib/half.so"), b"cut short").unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_unpacks_are_removed_at_start_up_before_the_first_report() {
    let f = Fixture::new();
    let port = start_broker();
    let dev = Device::new(&f, "dev-c-sweep-start", port);
    let ctl = Ctl::connect(port, "ctl-dev-c-sweep-start").await;
    // Two unpacks cut short by crashes, of versions never installed since.
    let left = [plant_staging(&dev, "1.8.0"), plant_staging(&dev, "1.9.0")];
    let kept = dev.install_root().join("releases").join("1.7.0");
    std::fs::create_dir_all(&kept).unwrap();
    let agent = dev.spawn();
    // The first report is published at the end of resume: the sweep ran before it.
    ctl.wait_state("first report", WAIT, |_| true).await;
    for d in &left {
        assert!(!d.exists(), "{d:?} removed");
    }
    assert!(kept.is_dir(), "a release directory is not a leftover");
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_unpacks_are_removed_at_revert() {
    let rig = rig("dev-c-sweep-revert").await;
    rig.baseline().await;
    // Release 2 fails its check once the test says so, so the leftover is in place first.
    let marker = rig.dev.dir.path().join("break-now");
    let mut r = rig.release_served(NEXT, true, false);
    r.health.checks = vec![HealthCheck {
        name: "app".into(),
        kind: CheckKind::Command,
        command: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("test ! -e '{}'", marker.display()),
        ]),
        url: None,
        timeout: Dur::secs(5),
    }];
    r.health.probation = Dur::secs(60);
    rig.send_ring(&rig.ring("next", &r)).await;
    rig.wait_phase(Phase::Probation, "next", NEXT).await;
    // An unpack of another version cut short (its crash came before this boot's sweep).
    let left = plant_staging(&rig.dev, "1.5.0");
    std::fs::write(&marker, b"").unwrap();
    rig.wait_phase(Phase::Reverted, "next", NEXT).await;
    assert!(!left.exists(), "{left:?} removed at revert");
    assert_eq!(
        read_version(&rig.dev.install_root()).as_deref(),
        Some("1.1.0")
    );
    rig.stop().await;
}
