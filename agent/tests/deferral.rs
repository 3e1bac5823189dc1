//! Issue 10, devices may defer: a real agent with a `[defer]` hook (a shell script whose
//! answer the test sets through a file) over a real broker and real downloads. "Not now"
//! reports `deferred` and is asked again after `retry`; a go installs; a hook that keeps
//! saying not now is overridden at the deadline; a broken or hanging hook never blocks; a
//! restart keeps the first deadline; a hold ends a deferral like it ends staging.
//!
//! Time: each agent runs on a [`JumpClock`] (real speed, so probation passes, plus jumps the
//! test makes past a retry or a deadline). Every wait is for a report or an event, bounded.

mod common;
use common::*;
use jiff::{SignedDuration, Timestamp};
use ringcast_agent::config::DeferConfig;
use ringcast_agent::{Agent, AgentHandle};
use ringcast_proto::testkit::Fixture;
use ringcast_proto::{Action, Clock, Dur, Event, EventKind, Phase, StateReport};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn mins(m: i64) -> SignedDuration {
    SignedDuration::from_mins(m)
}

/// One device with a defer hook, its clock, and the files the hook reads and writes.
struct Rig {
    f: Fixture,
    http: HttpServer,
    ctl: Ctl,
    dev: Device,
    clock: JumpClock,
    /// While this file exists the hook says not now, with its contents as the reason.
    not_now: PathBuf,
    /// The hook appends one line per run: its `RINGCAST_*` environment.
    calls: PathBuf,
}

/// A hook script in `dir`: logs its environment to `calls`, then runs `answer`.
fn hook_script(dir: &Path, answer: &str) -> Vec<String> {
    let script = dir.join("may-update.sh");
    let calls = dir.join("calls");
    let text = format!(
        "#!/bin/sh\necho \"$RINGCAST_RELEASE $RINGCAST_VERSION $RINGCAST_ROLLOUT $RINGCAST_DEADLINE\" >> '{}'\n{answer}\n",
        calls.display()
    );
    std::fs::write(&script, text).unwrap();
    vec!["/bin/sh".into(), script.display().to_string()]
}

impl Rig {
    async fn new(id: &str, retry_mins: u64, deadline_mins: u64) -> Rig {
        let f = Fixture::new();
        let port = start_broker();
        let http = HttpServer::start();
        let mut dev = Device::new(&f, id, port);
        let not_now = dev.dir.path().join("not-now");
        let answer = format!(
            "if [ -e '{0}' ]; then cat '{0}'; exit 75; fi\nexit 0",
            not_now.display()
        );
        dev.cfg.defer = Some(DeferConfig {
            command: hook_script(dev.dir.path(), &answer),
            retry: Dur::secs(retry_mins * 60),
            deadline: Dur::secs(deadline_mins * 60),
            timeout: Dur::secs(10),
        });
        let ctl = Ctl::connect(port, &format!("ctl-{id}")).await;
        let calls = dev.dir.path().join("calls");
        Rig {
            f,
            http,
            ctl,
            dev,
            clock: JumpClock::default(),
            not_now,
            calls,
        }
    }

    fn spawn(&self) -> AgentHandle {
        let deps = self.dev.deps_with_clock(Arc::new(self.clock.clone()));
        Agent::new(self.dev.cfg.clone(), deps).unwrap().spawn()
    }

    fn say_not_now(&self, reason: &str) {
        std::fs::write(&self.not_now, format!("checking\n{reason}\n")).unwrap();
    }

    fn say_go(&self) {
        std::fs::remove_file(&self.not_now).unwrap();
    }

    /// Runs of the hook so far, each its `RINGCAST_*` environment.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Publish release 2 for `rollout` on the ring.
    async fn offer(&self, rollout: &str) {
        let art = app_bundle("1.2.0", true);
        self.http.route("/a/app-2", vec![Serve::Bytes(art.clone())]);
        let r = release(2, 1, &self.http.url("/a/app-2"), &art);
        self.ctl
            .ring_directive(&directive(&self.f, rollout, &r).sign(&[&self.f.controller]))
            .await;
    }

    async fn wait_deferred_event(&self, what: &str, n: usize) -> Event {
        self.ctl
            .wait_until(what, WAIT, |c| c.event_count("deferred") >= n)
            .await;
        self.events("deferred").swap_remove(n - 1)
    }

    fn events(&self, name: &str) -> Vec<Event> {
        self.ctl
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.kind.name() == name)
            .cloned()
            .collect()
    }

    fn event_count_deferred(&self) -> usize {
        self.ctl.event_count("deferred")
    }

    fn clock_now(&self) -> Timestamp {
        self.clock.now()
    }

    async fn wait_committed(&self) -> StateReport {
        self.ctl
            .wait_state("committed release 2", WAIT, |s| {
                s.phase == Phase::Committed && s.current.as_ref().is_some_and(|c| c.sequence == 2)
            })
            .await
    }
}

fn until_of(e: &Event) -> Timestamp {
    match &e.kind {
        EventKind::Deferred { until, .. } => *until,
        other => panic!("not a deferred event: {other:?}"),
    }
}

fn reason_of(e: &Event) -> &str {
    match &e.kind {
        EventKind::Deferred { reason, .. } => reason,
        other => panic!("not a deferred event: {other:?}"),
    }
}

/// The report is `deferred` on release 2 of `rollout`, its error slot saying why and until
/// when.
fn assert_deferred(s: &StateReport, rollout: &str, reason: &str, until: Timestamp) {
    assert_eq!(s.phase, Phase::Deferred);
    assert_eq!(s.target.as_ref().map(|t| t.sequence), Some(2));
    assert_eq!(s.rollout_id.as_deref(), Some(rollout));
    let e = s.last_error.as_ref().expect("a deferred report says why");
    assert_eq!(e.reason, "deferred");
    assert!(
        e.detail.starts_with(reason) && e.detail.contains(&until.to_string()),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_now_is_reported_deferred_asked_again_after_retry_and_a_go_installs() {
    let rig = Rig::new("dev-defer-go", 10, 24 * 60).await;
    rig.say_not_now("battery at 12%");
    let agent = rig.spawn();
    rig.offer("defer-go").await;

    let first = rig.wait_deferred_event("the first deferral", 1).await;
    let until = until_of(&first);
    assert_eq!(reason_of(&first), "battery at 12%");
    assert_eq!(first.rollout_id.as_deref(), Some("defer-go"));
    let s = rig
        .ctl
        .wait_state("deferred", WAIT, |s| s.phase == Phase::Deferred)
        .await;
    assert_deferred(&s, "defer-go", "battery at 12%", until);
    // The hook was told the release, version, rollout and the deadline it would get.
    assert_eq!(
        rig.calls(),
        vec![format!("app-2 1.2.0 defer-go {until}")],
        "asked once"
    );
    let deadline = until.duration_since(first.at);
    assert!(
        deadline <= SignedDuration::from_hours(24) && deadline > SignedDuration::from_hours(23),
        "deadline {deadline:?} from the first not now"
    );
    assert!(rig.dev.current_target().is_none(), "nothing activated");
    // Many ticks later (20 reads of its clock), but before `retry`, it has not asked again.
    rig.clock.wait_reads("ticks while deferred", 20).await;
    assert_eq!(rig.calls().len(), 1, "not asked again before the retry");

    // After `retry` (10 min on the agent's clock) it asks again; still not now: the same
    // deferral (same deadline, no new event), reported afresh.
    let asked_first = s.updated_at;
    rig.clock.jump(mins(10));
    let s = rig
        .ctl
        .wait_state("the second ask, reported", WAIT, |s| {
            s.phase == Phase::Deferred && s.updated_at >= asked_first + mins(10)
        })
        .await;
    assert_deferred(&s, "defer-go", "battery at 12%", until);
    assert_eq!(rig.calls().len(), 2, "asked again once, after the retry");
    assert_eq!(
        rig.event_count_deferred(),
        1,
        "the same deferral, no new event"
    );

    // Go at the next ask: installs and commits.
    rig.say_go();
    rig.clock.jump(mins(10));
    let s = rig.wait_committed().await;
    assert_eq!(s.last_error, None, "the deferral is over");
    assert_eq!(rig.calls().len(), 3);
    assert_eq!(
        read_version(&rig.dev.install_root()).as_deref(),
        Some("1.2.0")
    );
    let installed = rig.events("installed");
    assert!(
        installed[0].at >= asked_first + mins(20),
        "activated only at the third ask"
    );
    assert_eq!(rig.events("defer_hook_failed").len(), 0);
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_keeps_saying_not_now_is_overridden_at_the_deadline() {
    let rig = Rig::new("dev-defer-deadline", 10, 60).await;
    rig.say_not_now("user active");
    let agent = rig.spawn();
    rig.offer("defer-deadline").await;
    let first = rig.wait_deferred_event("deferral", 1).await;
    let until = until_of(&first);
    rig.ctl
        .wait_state("deferred", WAIT, |s| s.phase == Phase::Deferred)
        .await;
    rig.clock.wait_reads("ticks while deferred", 20).await;
    assert_eq!(rig.calls().len(), 1, "not asked again before the retry");
    assert!(
        rig.dev.current_target().is_none(),
        "not activated before the deadline"
    );

    // Past the deadline in one jump (past the retry too): the update proceeds, unasked.
    rig.clock.jump(mins(61));
    rig.wait_committed().await;
    assert_eq!(rig.calls().len(), 1, "never asked after the deadline");
    assert!(rig.not_now.exists(), "the hook still says not now");
    let installed = rig.events("installed");
    assert!(
        installed[0].at >= until,
        "activated at the deadline, not before"
    );
    assert_eq!(rig.event_count_deferred(), 1);
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_hanging_hook_lets_the_update_proceed_with_a_warning() {
    let f = Fixture::new();
    let port = start_broker();
    let http = HttpServer::start();
    let ctl = Ctl::connect(port, "ctl-defer-broken").await;
    let failing = {
        let mut d = Device::new(&f, "dev-defer-exit1", port);
        let mut hook = DeferConfig::new(hook_script(d.dir.path(), "echo oops >&2; exit 1"));
        hook.timeout = Dur::secs(10);
        d.cfg.defer = Some(hook);
        d
    };
    let hanging = {
        let mut d = Device::new(&f, "dev-defer-hang", port);
        let mut hook = DeferConfig::new(hook_script(d.dir.path(), "sleep 30; exit 75"));
        hook.timeout = Dur(Duration::from_millis(500));
        d.cfg.defer = Some(hook);
        d
    };
    let agents = [failing.spawn(), hanging.spawn()];
    let art = app_bundle("1.2.0", true);
    http.route("/a/app-2", vec![Serve::Bytes(art.clone())]);
    let r = release(2, 1, &http.url("/a/app-2"), &art);
    ctl.ring_directive(&directive(&f, "defer-broken", &r).sign(&[&f.controller]))
        .await;

    for (dev, want) in [
        (&failing, "exit 1: oops"),
        (&hanging, "timed out after 500ms"),
    ] {
        let id = dev.cfg.device_id.clone();
        ctl.wait_state(&format!("{id} committed"), WAIT, |s| {
            s.device == id
                && s.phase == Phase::Committed
                && s.current.as_ref().is_some_and(|c| c.sequence == 2)
        })
        .await;
        let e = ctl
            .wait_event(&format!("{id} defer_hook_failed"), WAIT, |e| {
                e.device == id && e.kind.name() == "defer_hook_failed"
            })
            .await;
        match &e.kind {
            EventKind::DeferHookFailed { detail } => {
                assert!(detail.starts_with(want), "{id}: {detail}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.release.as_ref().map(|r| r.sequence), Some(2));
    }
    assert_eq!(
        ctl.event_count("deferred"),
        0,
        "a broken hook defers nothing"
    );
    for a in agents {
        a.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_deferred_keeps_the_first_deadline() {
    let rig = Rig::new("dev-defer-restart", 10, 60).await;
    rig.say_not_now("on battery");
    let agent = rig.spawn();
    rig.offer("defer-restart").await;
    let first = rig.wait_deferred_event("deferral", 1).await;
    let until = until_of(&first);
    rig.ctl
        .wait_state("deferred", WAIT, |s| s.phase == Phase::Deferred)
        .await;
    agent.shutdown().await.unwrap();

    // The device is off for 50 minutes. A deadline counted from the restart would end 1h
    // later; the first one ends 10 minutes after it.
    rig.clock.jump(mins(50));
    let restarted_at = rig.clock_now();
    let agent = rig.spawn();
    let s = rig
        .ctl
        .wait_state("deferred after the restart, asked again", WAIT, |s| {
            s.phase == Phase::Deferred && s.updated_at >= restarted_at && rig.calls().len() == 2
        })
        .await;
    assert_deferred(&s, "defer-restart", "on battery", until);
    assert_eq!(rig.event_count_deferred(), 1, "the same deferral");

    rig.clock.jump(mins(15));
    rig.wait_committed().await;
    assert_eq!(rig.calls().len(), 2, "not asked after the first deadline");
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_ends_a_deferral_and_a_new_rollout_defers_afresh() {
    let rig = Rig::new("dev-defer-hold", 10, 60).await;
    rig.say_not_now("in a call");
    let agent = rig.spawn();
    rig.offer("defer-hold-1").await;
    let first = rig.wait_deferred_event("deferral", 1).await;
    rig.ctl
        .wait_state("deferred", WAIT, |s| s.phase == Phase::Deferred)
        .await;

    let art = app_bundle("1.2.0", true);
    let r = release(2, 1, &rig.http.url("/a/app-2"), &art);
    let mut hold = directive(&rig.f, "defer-hold-halt", &r);
    hold.action = Action::Hold;
    hold.release = None;
    rig.ctl
        .ring_directive(&hold.sign(&[&rig.f.controller]))
        .await;
    let s = rig
        .ctl
        .wait_state("idle after the hold", WAIT, |s| {
            s.phase == Phase::Idle && s.rollout_id.as_deref() == Some("defer-hold-halt")
        })
        .await;
    assert_eq!((s.target, s.last_error, s.current), (None, None, None));
    rig.ctl
        .wait_event("held", WAIT, |e| e.kind.name() == "held")
        .await;

    // 30 minutes later a new rollout offers the same release: its deferral starts afresh.
    rig.clock.jump(mins(30));
    rig.offer("defer-hold-2").await;
    let second = rig.wait_deferred_event("a new deferral", 2).await;
    assert_eq!(second.rollout_id.as_deref(), Some("defer-hold-2"));
    assert!(
        until_of(&second) >= until_of(&first) + mins(30),
        "{} vs {}",
        until_of(&second),
        until_of(&first)
    );
    agent.shutdown().await.unwrap();
}
