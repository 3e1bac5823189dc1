//! The demo: an embedded broker, the controller (in process) with a three-ring policy
//! (canary auto, early auto, broad manual), and a fleet of real agents. It rolls out v1, then
//! v2 as a store-scheduled launch (every ring downloads and verifies it first, nothing
//! activates before the launch time, then the rings follow one by one from what they staged;
//! the demo approves `broad` itself through the API with an `approver` token), then a broken v3
//! whose health check fails: v3 reverts locally on the canary devices and the gate halts the
//! rollout before it reaches `early`. [`run`] returns a [`Summary`] whose `problems` list
//! everything that did not behave as described; the command exits 0 only when it is empty.

use super::{DemoError, Result};
use crate::kit::{AppHealth, AppRelease, KeyFiles, Keys};
use jiff::SignedDuration;
use ringcast_agent::fleet::{self, Fleet, FleetSpec, StoreKind};
use ringcast_controller::api::{RolloutView, SubmitRequest};
use ringcast_controller::client::Client;
use ringcast_controller::config::{
    ApiRole, ControllerConfig, Gate, OnFailure, Policy, Promotion, RingPolicy, ServerConfig,
    TokenEntry,
};
use ringcast_controller::{Controller, ControllerHandle};
use ringcast_proto::{Clock, Dur, Percent, Phase, StateReport, SystemClock};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Fleet name of the demo.
pub const FLEET: &str = "demo";
/// Device class of the demo's devices.
pub const CLASS: &str = "demo-box";
/// Release name.
pub const APP: &str = "app";
/// The rings, their share of the fleet and promotion.
const RINGS: [(&str, f64, Promotion); 3] = [
    ("canary", 0.1, Promotion::Auto),
    ("early", 0.3, Promotion::Auto),
    ("broad", 0.6, Promotion::Manual),
];
/// Real interval of the demo's own loop (render, observe, decide).
const TICK: Duration = Duration::from_millis(150);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Devices in the fleet (at least 3).
    pub devices: usize,
    /// Bake time of every ring step.
    pub bake: Duration,
    /// Pause before the demo approves `broad`.
    pub approval_pause: Duration,
    /// Longest one rollout may take before the demo gives up.
    pub rollout_timeout: Duration,
    /// v2 is a launch this long after its submission (every ring pre-stages first).
    pub launch_in: Duration,
    /// Redraw progress in place (a terminal) instead of printing lines.
    pub tty: bool,
    /// Write progress to stderr (stdout is kept for `--json`).
    pub progress_to_stderr: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            devices: 50,
            bake: Duration::from_millis(1500),
            approval_pause: Duration::from_millis(1000),
            rollout_timeout: Duration::from_secs(90),
            launch_in: Duration::from_secs(8),
            tty: false,
            progress_to_stderr: false,
        }
    }
}

/// One release's line of the summary.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseSummary {
    /// Version.
    pub version: String,
    /// Rings its directive reached.
    pub rings_reached: Vec<String>,
    /// Devices that committed it.
    pub committed: usize,
    /// Devices that reverted it.
    pub reverted: usize,
    /// Rollout outcome (`completed`, `halted`, …).
    pub outcome: String,
    /// Seconds from submit to the outcome.
    pub seconds: f64,
    /// For a launch: whether every device of every ring had it staged before it activated.
    pub prestaged: Option<bool>,
}

/// What the demo saw, and what was wrong with it.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Devices in the fleet.
    pub devices: usize,
    /// Per release.
    pub releases: Vec<ReleaseSummary>,
    /// Everything that did not behave as described (empty = success).
    pub problems: Vec<String>,
}

impl Summary {
    /// The summary table, one line per release, then the verdict.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "\n{:<8} {:<10} {:<22} {:>10} {:>9} {:>8}\n",
            "release", "outcome", "rings reached", "committed", "reverted", "time"
        ));
        for r in &self.releases {
            s.push_str(&format!(
                "{:<8} {:<10} {:<22} {:>10} {:>9} {:>7.1}s\n",
                r.version,
                r.outcome,
                r.rings_reached.join(", "),
                format!("{}/{}", r.committed, self.devices),
                r.reverted,
                r.seconds
            ));
        }
        if self.problems.is_empty() {
            s.push_str("\nOK: v1 and v2 reached every device; v3 reverted locally on the canary devices that got it and the rollout halted before `early`.\n");
        } else {
            s.push_str("\nFAILED:\n");
            for p in &self.problems {
                s.push_str(&format!("  - {p}\n"));
            }
        }
        s
    }
}

/// Per device, what it was ever seen doing with each release sequence.
#[derive(Debug, Default)]
struct History {
    /// device -> sequences it was ever asked to work on (target).
    targeted: BTreeMap<String, BTreeSet<u64>>,
    /// device -> sequences it committed.
    committed: BTreeMap<String, BTreeSet<u64>>,
    /// device -> sequences it reverted (or failed).
    reverted: BTreeMap<String, BTreeSet<u64>>,
}

impl History {
    /// Record a report; returns true when it is the first sight of a revert.
    fn observe(&mut self, r: &StateReport) -> bool {
        if let Some(t) = &r.target {
            self.targeted
                .entry(r.device.clone())
                .or_default()
                .insert(t.sequence);
        }
        match r.phase {
            Phase::Committed => {
                if let Some(c) = &r.current {
                    self.committed
                        .entry(r.device.clone())
                        .or_default()
                        .insert(c.sequence);
                }
                false
            }
            p if p.is_failure() => match &r.target {
                Some(t) => self
                    .reverted
                    .entry(r.device.clone())
                    .or_default()
                    .insert(t.sequence),
                None => false,
            },
            _ => false,
        }
    }

    fn count(map: &BTreeMap<String, BTreeSet<u64>>, seq: u64) -> usize {
        map.values().filter(|s| s.contains(&seq)).count()
    }
}

/// The console: progress bars redrawn in place on a terminal, plain lines otherwise.
struct Screen {
    tty: bool,
    to_stderr: bool,
    drawn: usize,
    last_plain: BTreeMap<String, String>,
    started: Instant,
}

impl Screen {
    fn new(tty: bool, to_stderr: bool) -> Screen {
        Screen {
            tty,
            to_stderr,
            drawn: 0,
            last_plain: BTreeMap::new(),
            started: Instant::now(),
        }
    }

    fn out(&self, s: &str) {
        if self.to_stderr {
            let mut o = std::io::stderr().lock();
            let _ = o.write_all(s.as_bytes());
            let _ = o.flush();
        } else {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(s.as_bytes());
            let _ = o.flush();
        }
    }

    /// Clear the bars (on a terminal) so a message can go above them.
    fn clear(&mut self) {
        if self.tty && self.drawn > 0 {
            self.out(&format!("\x1b[{}A\x1b[J", self.drawn));
            self.drawn = 0;
        }
    }

    /// A message line, printed above the bars.
    fn say(&mut self, line: &str) {
        self.clear();
        let t = self.started.elapsed().as_secs_f64();
        self.out(&format!("[{t:6.1}s] {line}\n"));
    }

    /// The per-ring bars.
    fn bars(&mut self, lines: &[(String, String)]) {
        if self.tty {
            self.clear();
            let mut s = String::new();
            for (_, l) in lines {
                // A wrapped line would break the cursor arithmetic: keep lines short.
                s.extend(l.chars().take(100));
                s.push('\n');
            }
            self.out(&s);
            self.drawn = lines.len();
        } else {
            for (key, l) in lines {
                if self.last_plain.get(key) != Some(l) {
                    self.last_plain.insert(key.clone(), l.clone());
                    let t = self.started.elapsed().as_secs_f64();
                    self.out(&format!("[{t:6.1}s] {}\n", l.trim_end()));
                }
            }
        }
    }

    /// Leave the bars where they are (the next rollout starts below).
    fn keep(&mut self) {
        self.drawn = 0;
        self.last_plain.clear();
    }
}

fn bar(done: usize, busy: usize, failed: usize, total: usize, width: usize) -> String {
    if total == 0 {
        return " ".repeat(width);
    }
    let cells = |n: usize| (n * width + total / 2) / total;
    let (d, f) = (cells(done), cells(failed));
    let b = cells(busy).min(width.saturating_sub(d + f));
    let rest = width.saturating_sub(d + f + b);
    format!(
        "{}{}{}{}",
        "█".repeat(d),
        "x".repeat(f),
        "▒".repeat(b),
        "░".repeat(rest)
    )
}

/// Everything running: temp dir, controller, fleet.
struct World {
    _dir: tempfile::TempDir,
    keys: Keys,
    controller: Option<ControllerHandle>,
    fleet: Option<Fleet>,
    operator: Client,
    approver: Client,
    approver_name: String,
    ring_sizes: Vec<(String, usize)>,
}

fn token() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| DemoError::Setup(format!("randomness: {e}")))?;
    Ok(hex::encode(b))
}

/// The demo's policy for a fleet split as `sizes`: every ring's gate needs all its devices to
/// commit (so v1 and v2 reach everyone) and tolerates no failure (so one revert halts).
pub fn policy(sizes: &[(String, usize)], bake: Duration) -> Policy {
    let rings = RINGS
        .iter()
        .zip(sizes)
        .map(|((name, _, promotion), (_, n))| RingPolicy {
            name: (*name).to_owned(),
            steps: if *name == "early" {
                vec![
                    Percent::from_basis_points(5000).unwrap_or(Percent::FULL),
                    Percent::FULL,
                ]
            } else {
                vec![Percent::FULL]
            },
            bake: Dur(bake),
            gate: Gate {
                min_reports: u32::try_from(*n).unwrap_or(u32::MAX),
                max_failure_rate: 0.0,
            },
            promotion: *promotion,
            windows: Vec::new(),
            timezone: "UTC".into(),
            on_failure: OnFailure::Halt,
            checks: Vec::new(),
            check_retry: Dur::secs(60),
            check_attempts: 3,
            step_timeout_setting: None,
            retries: 0,
            retry_backoff: Dur::secs(600),
        })
        .collect();
    Policy {
        fleet: FLEET.into(),
        topic_prefix: None,
        tick: Dur(Duration::from_millis(100)),
        directive_ttl: Dur::secs(600),
        unresponsive_after: Dur::secs(120),
        allowed_skew: Dur::secs(300),
        on_new_release: None,
        rings,
    }
}

async fn setup(opts: &Options, screen: &mut Screen) -> Result<World> {
    let dir = tempfile::Builder::new()
        .prefix("ringcast-demo-")
        .tempdir()
        .map_err(|e| DemoError::Setup(format!("temp dir: {e}")))?;
    let now = SystemClock.now();
    let keys = Keys::generate(now, SignedDuration::from_hours(24))?;
    let files: KeyFiles = keys.write(&dir.path().join("keys"))?;
    screen.say(&format!(
        "keys generated in {}: root {}…, release {}…, controller {}…; trust root v1",
        dir.path().join("keys").display(),
        &keys.root.key_id().as_str()[..12],
        &keys.release.key_id().as_str()[..12],
        &keys.controller.key_id().as_str()[..12],
    ));
    let shares: Vec<(&str, f64)> = RINGS.iter().map(|(n, s, _)| (*n, *s)).collect();
    let sizes = fleet::split(opts.devices, &shares)?;
    let (op_token, ap_token) = (token()?, token()?);
    let config = ControllerConfig {
        policy: policy(&sizes, opts.bake),
        server: ServerConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            data_dir: dir.path().join("controller"),
            trust: files.trust.clone(),
            controller_key: files.controller_key.clone(),
            tokens_file: None,
            public_url: None,
            max_artifact_bytes: 16 * 1024 * 1024,
            device_events: ringcast_controller::store::EVENT_HISTORY,
        },
        broker: None,
        tokens: vec![
            TokenEntry {
                name: "otto".into(),
                role: ApiRole::Operator,
                token: Some(op_token.clone()),
                sha256: None,
            },
            TokenEntry {
                name: "alice".into(),
                role: ApiRole::Approver,
                token: Some(ap_token.clone()),
                sha256: None,
            },
        ],
        webhooks: Vec::new(),
    };
    let controller = Controller::start(config, Arc::new(SystemClock)).await?;
    screen.say(&format!(
        "embedded MQTT broker on {}, controller API on {}",
        controller.broker_addr(),
        controller.http_url()
    ));
    let ring_text: Vec<String> = RINGS
        .iter()
        .zip(&sizes)
        .map(|((name, _, p), (_, n))| {
            let mode = match p {
                Promotion::Auto => "auto",
                Promotion::Manual => "manual approval",
            };
            format!("{name} {n} ({mode})")
        })
        .collect();
    screen.say(&format!(
        "policy: {}; bake {:?} per step",
        ring_text.join(" → "),
        opts.bake
    ));
    let spec = FleetSpec {
        fleet: FLEET.into(),
        device_class: CLASS.into(),
        broker_url: format!("mqtt://{}", controller.broker_addr()),
        trust_root: files.trust.clone(),
        artifact_base_url: Some(controller.http_url()),
        dir: dir.path().join("devices"),
        rings: sizes.clone(),
        fail_rate: 0.0,
        store: StoreKind::Sled,
        clock: Arc::new(SystemClock),
        // The embedded broker speaks MQTT 3.1.1; no MQTT 5 attempt first.
        customize: Some(std::sync::Arc::new(
            |c: &mut ringcast_agent::AgentConfig| {
                c.broker.protocol = ringcast_io::mqtt::Protocol::V311;
            },
        )),
    };
    let fleet = Fleet::start(spec).await?;
    let operator = Client::new(&controller.http_url(), Some(op_token));
    let approver = Client::new(&controller.http_url(), Some(ap_token));
    Ok(World {
        _dir: dir,
        keys,
        controller: Some(controller),
        fleet: Some(fleet),
        operator,
        approver,
        approver_name: "alice".into(),
        ring_sizes: sizes,
    })
}

impl World {
    fn fleet(&self) -> Result<&Fleet> {
        self.fleet
            .as_ref()
            .ok_or_else(|| DemoError::Setup("fleet stopped".into()))
    }

    fn controller(&self) -> Result<&ControllerHandle> {
        self.controller
            .as_ref()
            .ok_or_else(|| DemoError::Setup("controller stopped".into()))
    }

    async fn shutdown(&mut self) {
        if let Some(f) = self.fleet.take() {
            f.shutdown(Duration::from_secs(10)).await;
        }
        if let Some(c) = self.controller.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), c.shutdown()).await;
        }
    }
}

/// Wait one tick, or fail at once on Ctrl-C.
async fn tick(stop: &mut watch::Receiver<bool>) -> Result<()> {
    if *stop.borrow() {
        return Err(DemoError::Interrupted);
    }
    tokio::select! {
        _ = tokio::time::sleep(TICK) => Ok(()),
        _ = stop.changed() => Err(DemoError::Interrupted),
    }
}

/// Wait until the controller has heard from every device.
async fn wait_for_fleet(
    w: &World,
    screen: &mut Screen,
    stop: &mut watch::Receiver<bool>,
) -> Result<()> {
    let n = w.fleet()?.devices().len();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let known = w
            .controller()?
            .shared()
            .devices
            .read()
            .map(|d| d.values().filter(|r| r.report.is_some()).count())
            .unwrap_or(0);
        let lines = vec![(
            "fleet".to_owned(),
            format!(
                "  fleet   [{}] {known}/{n} agents connected and reporting",
                bar(known, 0, 0, n, 30)
            ),
        )];
        screen.bars(&lines);
        if known >= n {
            screen.keep();
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DemoError::Timeout(format!(
                "only {known} of {n} agents reported within 60s"
            )));
        }
        tick(stop).await?;
    }
}

/// One release to roll out.
struct Step {
    sequence: u64,
    health: AppHealth,
    /// A launch this long after the submission: every ring pre-stages, then activates.
    launch_in: Option<Duration>,
}

async fn roll(
    w: &World,
    opts: &Options,
    step: &Step,
    hist: &mut History,
    screen: &mut Screen,
    stop: &mut watch::Receiver<bool>,
) -> Result<ReleaseSummary> {
    let rel = AppRelease::new(APP, step.sequence, CLASS);
    let version = rel.version.to_string();
    let issued = SystemClock.now() - SignedDuration::from_secs(60);
    let app = rel.build(step.health, issued, &w.keys.release)?;
    let bytes = app.bundle;
    let up = w.operator.upload_artifact(bytes.clone()).await?;
    if up.sha256 != app.sha256 || up.url != ringcast_controller::artifacts::url_path(&app.sha256) {
        return Err(DemoError::Setup(format!(
            "the controller stored release {version}'s bundle as {} at {}, not as signed ({})",
            up.sha256, up.url, app.sha256
        )));
    }
    let envelope = app.envelope;
    let what = match step.health {
        AppHealth::Healthy => "healthy",
        AppHealth::Broken => "BROKEN: its health check fails",
        AppHealth::Hangs => "BROKEN: its health check hangs",
    };
    let started = Instant::now();
    let activate_at = step
        .launch_in
        .and_then(|d| SignedDuration::try_from(d).ok())
        .map(|d| SystemClock.now() + d);
    let resp = w
        .operator
        .submit(&SubmitRequest {
            envelope,
            start_at: None,
            activate_at,
            launch: activate_at.map(|_| ringcast_controller::model::LaunchMode::Rings),
        })
        .await?;
    let id = resp.rollout.id.clone();
    screen.say(&format!(
        "release {APP} {version} signed ({what}; artifact {} bytes, sha256 {}…), submitted: rollout {id}",
        bytes.len(),
        &up.sha256[..12]
    ));
    if let Some(at) = activate_at {
        screen.say(&format!(
            "{version}: a launch at {} — every ring downloads and verifies it now, nothing activates before",
            at.strftime("%H:%M:%S")
        ));
    }
    let mut staged_said = false;
    let deadline = started + opts.rollout_timeout;
    let mut approval_seen: Option<Instant> = None;
    let mut approved = false;
    let mut view: RolloutView;
    loop {
        view = w.operator.rollout(&id).await?;
        for r in w.fleet()?.statuses() {
            if hist.observe(&r) && r.target.as_ref().map(|t| t.sequence) == Some(step.sequence) {
                let why = r
                    .last_error
                    .as_ref()
                    .map(|e| {
                        let first = e.detail.lines().last().unwrap_or("").trim();
                        format!("{}: {}", e.reason, first)
                    })
                    .unwrap_or_default();
                screen.say(&format!(
                    "{} reverted {version} locally and runs {} again ({why})",
                    r.device,
                    r.current
                        .as_ref()
                        .map(|c| c.version.as_str())
                        .unwrap_or("nothing"),
                ));
            }
        }
        screen.bars(&ring_lines(w, &view, step.sequence)?);
        if let (Some(at), false) = (activate_at, staged_said) {
            let staged: u32 = view.rings.iter().map(|r| r.staged).sum();
            // Each ring pre-stages its first step's ramp (the rest download at their step).
            let ramp: u32 = view.rings.iter().map(|r| r.tally.in_ramp).sum();
            if ramp > 0 && staged == ramp && view.rings.iter().all(|r| r.percent.is_some()) {
                staged_said = true;
                screen.say(&format!(
                    "{version}: staged on all {ramp} devices of every ring's first step; waiting for the launch at {}",
                    at.strftime("%H:%M:%S")
                ));
            }
        }
        if view.phase == "waiting_approval" && !approved {
            let since = *approval_seen.get_or_insert_with(|| {
                screen.say(&format!(
                    "{version}: ring `{}` is manual (continuous delivery); waiting for an approver …",
                    view.ring.as_deref().unwrap_or("?")
                ));
                Instant::now()
            });
            if since.elapsed() >= opts.approval_pause {
                let ring = view.ring.clone();
                w.approver.act(&id, "approve", ring.as_deref()).await?;
                approved = true;
                screen.say(&format!(
                    "{version}: `{}` approved by {} (role approver) through POST /api/v1/rollouts/{id}/approve",
                    ring.as_deref().unwrap_or("?"),
                    w.approver_name
                ));
            }
        }
        if !view.state.is_live() {
            break;
        }
        if Instant::now() > deadline {
            return Err(DemoError::Timeout(format!(
                "rollout of {version} still {} after {:?}",
                view.phase, opts.rollout_timeout
            )));
        }
        tick(stop).await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    match view.phase.as_str() {
        "completed" => screen.say(&format!("{version}: rollout completed in {seconds:.1}s")),
        other => screen.say(&format!(
            "{version}: rollout {other}{} after {seconds:.1}s; ring directives now: {}",
            view.detail
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default(),
            ring_directives(w)?
        )),
    }
    // Devices that activated the release before the halt finish their probation (and
    // revert); wait until none is still working on it.
    let settle = Instant::now() + Duration::from_secs(30);
    loop {
        let busy = w
            .fleet()?
            .statuses()
            .iter()
            .filter(|r| {
                r.target.as_ref().map(|t| t.sequence) == Some(step.sequence)
                    && matches!(
                        r.phase,
                        Phase::Downloading
                            | Phase::Verifying
                            | Phase::Installing
                            | Phase::Probation
                            | Phase::Reverting
                    )
            })
            .count();
        for r in w.fleet()?.statuses() {
            if hist.observe(&r) && r.target.as_ref().map(|t| t.sequence) == Some(step.sequence) {
                screen.say(&format!("{} reverted {version} locally", r.device));
            }
        }
        let view = w.operator.rollout(&id).await?;
        screen.bars(&ring_lines(w, &view, step.sequence)?);
        if busy == 0 {
            break;
        }
        if Instant::now() > settle {
            return Err(DemoError::Timeout(format!(
                "{busy} devices still busy with {version} 30s after the rollout ended"
            )));
        }
        tick(stop).await?;
    }
    screen.keep();
    let reached = w
        .controller()?
        .shared()
        .state
        .read()
        .ok()
        .and_then(|s| s.rollouts.get(&id).map(|r| r.rings_reached.clone()))
        .unwrap_or_default();
    Ok(ReleaseSummary {
        version,
        rings_reached: reached,
        committed: History::count(&hist.committed, step.sequence),
        reverted: History::count(&hist.reverted, step.sequence),
        outcome: view.phase.clone(),
        seconds,
        prestaged: activate_at.map(|_| staged_said),
    })
}

/// `ring: release@percent` for every standing ring directive.
fn ring_directives(w: &World) -> Result<String> {
    let c = w.controller()?;
    let st = c
        .shared()
        .state
        .read()
        .map_err(|_| DemoError::Setup("controller state lock poisoned".into()))?;
    let mut parts = Vec::new();
    for (ring, _) in &w.ring_sizes {
        let text = match st.rings.get(ring) {
            Some(d) => match d.action {
                ringcast_proto::Action::Hold => "hold".to_owned(),
                ringcast_proto::Action::Install => d
                    .release_id
                    .as_deref()
                    .and_then(|r| st.releases.get(r))
                    .map(|r| format!("install {}", r.release.version))
                    .unwrap_or_else(|| "install ?".into()),
            },
            None => "none".into(),
        };
        parts.push(format!("{ring}: {text}"));
    }
    Ok(parts.join(", "))
}

fn ring_lines(w: &World, view: &RolloutView, seq: u64) -> Result<Vec<(String, String)>> {
    let statuses = w.fleet()?.statuses();
    let mut out = Vec::new();
    for (ring, size) in &w.ring_sizes {
        let mine: Vec<&StateReport> = statuses.iter().filter(|r| &r.ring == ring).collect();
        let on = |r: &&&StateReport| r.target.as_ref().map(|t| t.sequence) == Some(seq);
        let committed = mine
            .iter()
            .filter(|r| {
                r.phase == Phase::Committed && r.current.as_ref().map(|c| c.sequence) == Some(seq)
            })
            .count();
        let failed = mine
            .iter()
            .filter(|r| on(r) && r.phase.is_failure())
            .count();
        let busy = mine
            .iter()
            .filter(|r| on(r) && !r.phase.is_failure() && r.phase != Phase::Committed)
            .count();
        let status = view
            .rings
            .iter()
            .find(|v| &v.name == ring)
            .map(|v| {
                let pct = v
                    .percent
                    .map(|p| format!(" {}%", p.as_f64()))
                    .unwrap_or_default();
                match v.status.as_str() {
                    "not_started" => "not started".to_owned(),
                    "waiting_approval" => "waiting for approval".to_owned(),
                    "waiting_window" => "starting".to_owned(),
                    s => format!("{s}{pct}"),
                }
            })
            .unwrap_or_default();
        let mut extra = String::new();
        if busy > 0 {
            extra.push_str(&format!(", {busy} busy"));
        }
        if failed > 0 {
            extra.push_str(&format!(", {failed} reverted"));
        }
        out.push((
            ring.clone(),
            format!(
                "  {:<6} [{}] {:>3}/{:<3} committed{extra} · {status}",
                ring,
                bar(committed, busy, failed, *size, 20),
                committed,
                size
            ),
        ));
    }
    // Keyed by ring: the plain output prints a ring's line whenever its text changes.
    Ok(out
        .into_iter()
        .map(|(k, l)| (k, format!("{:<6}{l}", view.version)))
        .collect())
}

/// Check the fleet after v1 or v2: every device on `version`, `current` pointing at it.
fn check_everyone_on(w: &World, seq: u64, version: &str, problems: &mut Vec<String>) -> Result<()> {
    for d in w.fleet()?.devices() {
        let s = d.status();
        let cur = s.current.as_ref().map(|c| c.sequence);
        if cur != Some(seq) || d.current_version().as_deref() != Some(version) {
            problems.push(format!(
                "{} is not on {version}: reports {:?} in phase {}, current link {:?}",
                d.id,
                s.current.as_ref().map(|c| &c.version),
                s.phase.as_str(),
                d.current_version()
            ));
        }
    }
    Ok(())
}

/// Run the demo until it ends or `stop` flips (Ctrl-C). Everything is cleaned up before it
/// returns, either way.
pub async fn run(opts: Options, mut stop: watch::Receiver<bool>) -> Result<Summary> {
    if opts.devices < RINGS.len() {
        return Err(DemoError::Setup(format!(
            "--devices must be at least {} (one per ring)",
            RINGS.len()
        )));
    }
    let mut screen = Screen::new(opts.tty, opts.progress_to_stderr);
    screen.say(&format!(
        "ringcast demo: {} devices, rings canary → early → broad",
        opts.devices
    ));
    let mut world = tokio::select! {
        w = setup(&opts, &mut screen) => w?,
        _ = stop.changed() => return Err(DemoError::Interrupted),
    };
    let result = script(&mut world, &opts, &mut screen, &mut stop).await;
    screen.clear();
    world.shutdown().await;
    result
}

async fn script(
    w: &mut World,
    opts: &Options,
    screen: &mut Screen,
    stop: &mut watch::Receiver<bool>,
) -> Result<Summary> {
    wait_for_fleet(w, screen, stop).await?;
    let mut hist = History::default();
    let mut summary = Summary {
        devices: opts.devices,
        ..Summary::default()
    };
    let steps = [
        Step {
            sequence: 1,
            health: AppHealth::Healthy,
            launch_in: None,
        },
        Step {
            sequence: 2,
            health: AppHealth::Healthy,
            launch_in: Some(opts.launch_in),
        },
        Step {
            sequence: 3,
            health: AppHealth::Broken,
            launch_in: None,
        },
    ];
    for step in &steps {
        let r = roll(w, opts, step, &mut hist, screen, stop).await?;
        let version = r.version.clone();
        match step.sequence {
            1 | 2 => {
                if r.outcome != "completed" {
                    summary.problems.push(format!(
                        "{version}: rollout {} instead of completed",
                        r.outcome
                    ));
                }
                check_everyone_on(w, step.sequence, &version, &mut summary.problems)?;
                if r.prestaged == Some(false) {
                    summary.problems.push(format!(
                        "{version}: a launch, but not staged on every device before it activated"
                    ));
                }
            }
            _ => check_broken(w, &r, &hist, &mut summary.problems)?,
        }
        summary.releases.push(r);
    }
    Ok(summary)
}

/// v3: halted; published to canary only; committed nowhere; reverted on every canary device
/// that got it; every device back on v2.
fn check_broken(
    w: &World,
    r: &ReleaseSummary,
    hist: &History,
    problems: &mut Vec<String>,
) -> Result<()> {
    let v = &r.version;
    if r.outcome != "halted" {
        problems.push(format!("{v}: rollout {} instead of halted", r.outcome));
    }
    if r.rings_reached != ["canary"] {
        problems.push(format!(
            "{v}: directive reached {:?}, expected canary only",
            r.rings_reached
        ));
    }
    if r.committed != 0 {
        problems.push(format!("{v}: committed on {} devices", r.committed));
    }
    let mut got = 0;
    for d in w.fleet()?.devices() {
        let targeted = hist.targeted.get(&d.id).is_some_and(|s| s.contains(&3));
        if targeted && d.ring != "canary" {
            problems.push(format!("{v}: {} in ring {} received it", d.id, d.ring));
        }
        if targeted {
            got += 1;
            let reverted = hist.reverted.get(&d.id).is_some_and(|s| s.contains(&3));
            if !reverted {
                problems.push(format!("{v}: {} got it but never reverted", d.id));
            }
        }
    }
    if got == 0 {
        problems.push(format!("{v}: no canary device received it"));
    }
    check_everyone_on(w, 2, "1.2.0", problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_fills_proportionally() {
        assert_eq!(bar(5, 0, 0, 10, 10), "█████░░░░░");
        assert_eq!(bar(2, 3, 1, 10, 10), "██x▒▒▒░░░░");
        assert_eq!(bar(0, 0, 0, 0, 4), "    ");
    }

    #[test]
    fn demo_policy_validates() {
        let sizes = fleet::split(50, &[("canary", 0.1), ("early", 0.3), ("broad", 0.6)]).unwrap();
        let p = policy(&sizes, Duration::from_secs(2));
        p.validate("demo").unwrap();
        assert_eq!(p.rings[2].promotion, Promotion::Manual);
        assert_eq!(p.rings[0].gate.min_reports, 5);
    }
}
