//! Forecasts (DESIGN.md "Delivery insight": per device, the predicted time of its update):
//! when each device is predicted to **commit** the live rollout that concerns it, and the
//! rollout's step timeline. A pure function of (policy, engine state, fleet view, now): the
//! fleet view is the device table and, behind the small [`History`] port, the devices' kept
//! events. No clock, no locks; the API builds the inputs and serves the result.
//!
//! The model walks the steps the way the engine takes them (see [`crate::engine`]):
//!
//! 1. A step is published when it is entered and its ring's delivery window is open; the first
//!    step of a `manual` ring also needs an approval, which is never guessed: the forecast
//!    stops there and says that it waits for one.
//! 2. A device of the step's ramp (its own position, [`in_ramp`]) starts when the step is
//!    published, is staged after the **download** time, activates when the ring's windows,
//!    its own windows and the rollout's `not_before` all allow, is installed after the
//!    **install** time, and commits after the release's **probation** plus the **commit
//!    lag** (the agent commits at its first health round after the probation's end). A device
//!    already working on the rollout is forecast from its phase and when it entered it.
//! 3. The gate is met when as many devices of the ramp as it needs have committed (the
//!    `needed`-th earliest commit); the **bake** starts then, and the next step (or, after
//!    the ring's acceptance checks, counted as instant, the next ring) is entered when it ends.
//!    A gate its ramp cannot meet, or would meet only after `step_timeout`, ends the forecast.
//!
//! Download, install and commit lag are measured ([`measure`]) from the kept events of the
//! devices that finished the rollout, or the last rollout of the same release name, as the
//! median of each device's own durations on its own clock; with no data, the defaults below.

use crate::config::{Policy, Promotion, RingPolicy};
use crate::engine::EngineState;
use crate::model::{DeviceRecord, EventEntry, Rollout, RolloutState, Stage};
use jiff::{SignedDuration, Timestamp};
use ringcast_proto::{in_ramp, EventKind, Percent, Phase, Release, Schedule, StateReport};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

/// Download time assumed while nothing has been measured (no device finished a rollout of
/// the release's name yet): a few megabytes over a slow link.
pub const DEFAULT_DOWNLOAD: SignedDuration = SignedDuration::from_secs(300);
/// Install time (activation to `installed`) assumed while nothing has been measured.
pub const DEFAULT_INSTALL: SignedDuration = SignedDuration::from_secs(30);
/// Most devices whose histories one forecast reads to measure durations.
pub const MAX_SAMPLES: usize = 64;
/// Devices of the rollout itself that must have been measured before its own figures are used
/// alone; with fewer, they are pooled with the last rollout's.
pub const MIN_OWN_SAMPLES: usize = 3;
/// Measured durations longer than this are discarded (a device offline for weeks is not a
/// download time).
const MAX_SAMPLE: SignedDuration = SignedDuration::from_secs(30 * 86_400);
/// Window openings tried when looking for a moment all of a device's schedules are open.
const MAX_WINDOW_HOPS: usize = 64;

/// The devices' kept event histories, as forecasting reads them.
pub trait History {
    /// The kept events of `device`, in any order.
    fn kept(&self, device: &str) -> Vec<EventEntry>;
}

/// No history: every duration is the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHistory;

impl History for NoHistory {
    fn kept(&self, _: &str) -> Vec<EventEntry> {
        Vec::new()
    }
}

impl History for HashMap<String, Vec<EventEntry>> {
    fn kept(&self, device: &str) -> Vec<EventEntry> {
        self.get(device).cloned().unwrap_or_default()
    }
}

impl History for crate::store::Store {
    fn kept(&self, device: &str) -> Vec<EventEntry> {
        match self.device_events(device, usize::MAX) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(device, error = %e, "reading device events for a forecast failed");
                Vec::new()
            }
        }
    }
}

/// What forecasting knows of the fleet.
pub struct FleetView<'a> {
    /// The device table.
    pub devices: &'a HashMap<String, DeviceRecord>,
    /// Their kept events.
    pub history: &'a dyn History,
}

/// A duration the forecast uses, and where it comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Seconds.
    pub secs: f64,
    /// Devices it is the median of; 0 = the default (nothing measured yet).
    pub samples: u32,
    /// Rollouts it was measured on.
    #[serde(default)]
    pub measured_on: Vec<String>,
}

impl Estimate {
    fn new(d: SignedDuration, samples: usize, on: Vec<String>) -> Estimate {
        Estimate {
            secs: d.as_secs_f64(),
            samples: u32::try_from(samples).unwrap_or(u32::MAX),
            measured_on: on,
        }
    }

    /// `1.5s (median of 8 devices)` or `300s (default)`.
    pub fn describe(&self) -> String {
        if self.samples == 0 {
            format!("{}s (default, nothing measured yet)", round(self.secs))
        } else {
            format!("{}s (median of {} devices)", round(self.secs), self.samples)
        }
    }
}

fn round(secs: f64) -> f64 {
    (secs * 10.0).round() / 10.0
}

/// Every value a [`Prediction`]'s `waits_for` takes: the [`Wait`] codes, and for one device
/// `window` (its windows never meet the ring's) and `pin` (a standing pin decides).
/// docs/operations.md lists them.
pub const WAITS_FOR: [&str; 9] = [
    "approval",
    "launch_held",
    "paused",
    "queued",
    "gate_unreachable",
    "step_timeout",
    "window",
    "unknown_ring",
    "pin",
];

/// Why a forecast stops before a device's step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Wait {
    /// A `manual` ring waits for an approver; no time is guessed for that.
    Approval {
        /// The ring.
        ring: String,
    },
    /// A launch an operator held: nothing activates until a new launch time is set.
    LaunchHeld,
    /// Paused by an operator.
    Paused,
    /// Queued behind a running rollout of the same release name.
    Queued,
    /// The step's ramp has fewer devices that can commit than its gate needs.
    GateUnreachable {
        /// Ring.
        ring: String,
        /// Step index.
        step: usize,
        /// Commits the gate needs.
        needed: u32,
        /// Devices of the ramp that can commit.
        can_commit: u32,
    },
    /// The gate would be met only after the ring's `step_timeout`, which ends the step.
    StepTimeout {
        /// Ring.
        ring: String,
        /// Step index.
        step: usize,
        /// The timeout, as the policy writes it.
        timeout: String,
    },
    /// The ring's delivery windows never open.
    NoWindow {
        /// Ring.
        ring: String,
    },
    /// The rollout is on a ring the policy does not have.
    UnknownRing {
        /// Ring.
        ring: String,
    },
}

impl Wait {
    /// Stable code (`approval`, `paused`, …), what `waits_for` shows.
    pub fn code(&self) -> &'static str {
        match self {
            Wait::Approval { .. } => "approval",
            Wait::LaunchHeld => "launch_held",
            Wait::Paused => "paused",
            Wait::Queued => "queued",
            Wait::GateUnreachable { .. } => "gate_unreachable",
            Wait::StepTimeout { .. } => "step_timeout",
            Wait::NoWindow { .. } => "window",
            Wait::UnknownRing { .. } => "unknown_ring",
        }
    }

    /// One line for people.
    pub fn note(&self) -> String {
        match self {
            Wait::Approval { ring } => format!("waits for an approval of ring {ring}"),
            Wait::LaunchHeld => {
                "the launch is held: nothing activates until a new launch time is set".into()
            }
            Wait::Paused => "the rollout is paused".into(),
            Wait::Queued => "queued behind a running rollout of the same release name".into(),
            Wait::GateUnreachable {
                ring,
                step,
                needed,
                can_commit,
            } => format!(
                "step {step} of ring {ring} needs {needed} commit(s) but only {can_commit} device(s) \
                 of its ramp can commit; step_timeout will end it"
            ),
            Wait::StepTimeout {
                ring,
                step,
                timeout,
            } => format!(
                "step {step} of ring {ring} would not meet its gate within its step_timeout \
                 ({timeout})"
            ),
            Wait::NoWindow { ring } => format!("ring {ring}'s delivery windows never open"),
            Wait::UnknownRing { ring } => format!("the rollout's ring {ring} is not in the policy"),
        }
    }
}

/// One step of a rollout's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepForecast {
    /// Ring.
    pub ring: String,
    /// Step index in the ring.
    pub step: usize,
    /// Its ramp.
    pub percent: Percent,
    /// When its directive was (`published`) or will be published.
    pub published_at: Timestamp,
    /// Whether it is out already.
    pub published: bool,
    /// When its gate is (predicted to be) first met: its bake starts then.
    pub gate_met_at: Option<Timestamp>,
    /// When its bake ends and the rollout moves on.
    pub passes_at: Option<Timestamp>,
}

/// A live rollout's forecast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutForecast {
    /// Rollout id.
    pub rollout_id: String,
    /// Release id.
    pub release_id: String,
    /// Directive to staged (download and verification).
    pub download: Estimate,
    /// Activation allowed to installed.
    pub install: Estimate,
    /// The release's probation (from its manifest).
    pub probation_secs: f64,
    /// Probation's end to the commit (the agent's next health round).
    pub commit_lag: Estimate,
    /// The steps from the first ring on, as far as they can be forecast.
    pub steps: Vec<StepForecast>,
    /// When the last ring's last step passes.
    pub completes_at: Option<Timestamp>,
    /// Why the timeline stops early.
    pub waits: Option<Wait>,
}

/// When a device is predicted to update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Rollout it would come with.
    pub rollout_id: String,
    /// Predicted commit (the device counts as updated then), if it can be predicted.
    pub at: Option<Timestamp>,
    /// Ring step at which the device enters the ramp.
    pub step: Option<usize>,
    /// Why, or why not.
    pub note: String,
    /// The device's ring.
    #[serde(default)]
    pub ring: Option<String>,
    /// When its step's directive was or will be published.
    #[serde(default)]
    pub published_at: Option<Timestamp>,
    /// Predicted activation (after download, inside the ring's and its own windows).
    #[serde(default)]
    pub activates_at: Option<Timestamp>,
    /// What the forecast waits for instead of a time ([`Wait::code`], `window` when its own
    /// windows never meet the ring's, `pin` while a pin stands).
    #[serde(default)]
    pub waits_for: Option<String>,
}

/// Forecasts for the live rollouts and for every device they concern.
#[derive(Debug, Clone, Default)]
pub struct Forecast {
    /// One per live rollout, oldest first.
    pub rollouts: Vec<RolloutForecast>,
    devices: HashMap<String, Prediction>,
    /// Devices running several products: per product, its newest live rollout's prediction.
    products: HashMap<String, BTreeMap<String, Prediction>>,
}

impl Forecast {
    /// The prediction for `device` (for the newest live rollout whose release it can take).
    pub fn device(&self, device: &str) -> Option<&Prediction> {
        self.devices.get(device)
    }

    /// For a device running several products, the prediction for `product` (its newest
    /// live rollout of that name).
    pub fn device_product(&self, device: &str, product: &str) -> Option<&Prediction> {
        self.products.get(device)?.get(product)
    }
}

/// Durations the walk adds up.
#[derive(Debug, Clone, Copy)]
struct Timings {
    download: SignedDuration,
    install: SignedDuration,
    /// Probation plus commit lag.
    probation: SignedDuration,
}

/// Measured durations of one rollout, with their provenance.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// Directive to staged.
    pub download: Estimate,
    /// Activation allowed to installed.
    pub install: Estimate,
    /// Probation's end to the commit.
    pub commit_lag: Estimate,
}

/// Forecast every live rollout and every device it concerns.
pub fn forecast(
    policy: &Policy,
    st: &EngineState,
    fleet: &FleetView<'_>,
    now: Timestamp,
) -> Forecast {
    let mut live: Vec<(&Rollout, &Release)> = st
        .rollouts
        .values()
        .filter(|r| r.state.is_live())
        .filter_map(|r| st.releases.get(&r.release_id).map(|rel| (r, &rel.release)))
        .collect();
    live.sort_by_key(|(r, _)| (r.created_at, r.id.clone()));
    // The fleet as each product's rollouts see it, built once per product.
    let mut tables: HashMap<&str, ByRing<'_>> = HashMap::new();
    for (r, _) in &live {
        tables
            .entry(r.release_name.as_str())
            .or_insert_with(|| by_ring(fleet.devices, &r.release_name));
    }
    let mut out = Forecast::default();
    let mut per_rollout: Vec<HashMap<String, Prediction>> = Vec::new();
    for (r, rel) in &live {
        let m = measure(policy, st, r, rel, fleet);
        let Some(table) = tables.get(r.release_name.as_str()) else {
            continue;
        };
        let (rf, devices) = Walk::new(policy, st, r, rel, &m, table, now).run();
        out.rollouts.push(rf);
        per_rollout.push(devices);
    }
    // Each device gets the newest live rollout of a release it can take; a device running
    // several products also gets one per product.
    for d in fleet.devices.values() {
        let Some(report) = &d.report else { continue };
        let mut top: Option<(usize, Prediction)> = None;
        let mut per_product: BTreeMap<String, Prediction> = BTreeMap::new();
        for (i, (r, rel)) in live.iter().enumerate().rev() {
            if report.is_multi_product() && per_product.contains_key(&r.release_name) {
                continue;
            }
            let Some(rep) = d.report_for(&r.release_name) else {
                continue;
            };
            if !rel.is_compatible(&rep.device_class) {
                continue;
            }
            let p = predict(st, d, &rep, r, rel, per_rollout.get(i));
            if top.is_none() {
                top = Some((i, p.clone()));
            }
            if !report.is_multi_product() {
                break;
            }
            per_product.insert(r.release_name.clone(), p);
        }
        if let Some((_, p)) = top {
            out.devices.insert(d.id.clone(), p);
        }
        if !per_product.is_empty() {
            out.products.insert(d.id.clone(), per_product);
        }
    }
    out
}

/// One device as the rollouts of one product see it: its id, when it was last heard, and its
/// report for that product (borrowed from an agent without products).
struct Dev<'a> {
    id: &'a str,
    last_seen: Timestamp,
    report: Option<Cow<'a, StateReport>>,
    /// Whether the agent runs several products (a pin decides per product then).
    multi: bool,
}

/// The devices that run one product, by ring, sorted by id.
type ByRing<'a> = HashMap<&'a str, Vec<Dev<'a>>>;

fn by_ring<'a>(devices: &'a HashMap<String, DeviceRecord>, product: &str) -> ByRing<'a> {
    let mut m: ByRing<'a> = HashMap::new();
    for d in devices.values() {
        let (Some(full), Some(rep)) = (&d.report, d.report_for(product)) else {
            continue;
        };
        m.entry(full.ring.as_str()).or_default().push(Dev {
            id: &d.id,
            last_seen: d.last_seen,
            report: Some(rep),
            multi: full.is_multi_product(),
        });
    }
    for v in m.values_mut() {
        v.sort_by(|a, b| a.id.cmp(b.id));
    }
    m
}

/// The pin that decides for `device` what it runs of `product`: an agent without products
/// prefers any pin of its own over its ring's directive; one running several, its pin for
/// that product.
fn deciding_pin<'s>(
    st: &'s EngineState,
    device: &str,
    product: &str,
    multi: bool,
) -> Option<&'s crate::model::DevicePin> {
    if multi {
        st.pin_of(device, product)
    } else {
        st.pins
            .get(device)
            .filter(|p| p.pinned_release().is_some())
            .or_else(|| st.pin_of(device, product))
    }
}

/// Device `d`'s prediction for rollout `r` of `rel`, with `rep` its report for the product
/// and `walked` the rollout's walk.
fn predict(
    st: &EngineState,
    d: &DeviceRecord,
    rep: &StateReport,
    r: &Rollout,
    rel: &Release,
    walked: Option<&HashMap<String, Prediction>>,
) -> Prediction {
    let multi = d.report.as_ref().is_some_and(|x| x.is_multi_product());
    if let Some(pinned) =
        deciding_pin(st, &d.id, &r.release_name, multi).and_then(|p| p.pinned_release())
    {
        Prediction {
            rollout_id: r.id.clone(),
            at: None,
            step: None,
            note: format!("pinned to {pinned}: follows its ring again after an unpin"),
            ring: Some(rep.ring.clone()),
            published_at: None,
            activates_at: None,
            waits_for: Some("pin".into()),
        }
    } else if runs(rep, rel) && rep.rollout_id.as_deref() != Some(r.id.as_str()) {
        bare(r, &rep.ring, "already runs this release")
    } else {
        match walked.and_then(|m| m.get(&d.id)) {
            Some(p) => p.clone(),
            None => bare(r, &rep.ring, "the device's ring is not in the policy"),
        }
    }
}

fn bare(r: &Rollout, ring: &str, note: &str) -> Prediction {
    Prediction {
        rollout_id: r.id.clone(),
        at: None,
        step: None,
        note: note.into(),
        ring: Some(ring.into()),
        published_at: None,
        activates_at: None,
        waits_for: None,
    }
}

/// Whether the report's running release is `rel` (or newer).
fn runs(rep: &ringcast_proto::StateReport, rel: &Release) -> bool {
    rep.current
        .as_ref()
        .is_some_and(|c| c.name == rel.name && c.sequence >= rel.sequence)
}

fn add(t: Timestamp, d: SignedDuration) -> Timestamp {
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

/// The first instant at or after `from` at which every schedule is open (activation needs
/// the ring's windows and the device's own: DESIGN.md "both must allow activation"), if one
/// comes within [`MAX_WINDOW_HOPS`] openings.
pub fn all_open(schedules: &[&Schedule], from: Timestamp) -> Option<Timestamp> {
    let mut t = from;
    for _ in 0..MAX_WINDOW_HOPS {
        let mut moved = false;
        for s in schedules {
            let open = s.next_open(t)?;
            if open > t {
                t = open;
                moved = true;
            }
        }
        if !moved {
            return Some(t);
        }
    }
    None
}

fn device_schedule(rep: &ringcast_proto::StateReport) -> Schedule {
    // A zone this controller does not know: the device judges its windows itself; the
    // forecast then cannot place them and ignores them.
    Schedule::new(rep.windows.clone(), &rep.timezone).unwrap_or_else(|_| Schedule::always())
}

fn median(mut v: Vec<SignedDuration>) -> Option<SignedDuration> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    let n = v.len();
    if n % 2 == 1 {
        return v.get(n / 2).copied();
    }
    let (a, b) = (*v.get(n / 2 - 1)?, *v.get(n / 2)?);
    // Both are within [0, MAX_SAMPLE]: no overflow.
    Some(a + (b - a) / 2)
}

/// One device's durations on one rollout, each on the device's own clock (event `at`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Sample {
    download: Option<SignedDuration>,
    install: Option<SignedDuration>,
    lag: Option<SignedDuration>,
}

fn sane(d: SignedDuration) -> Option<SignedDuration> {
    (!d.is_negative() && d <= MAX_SAMPLE).then_some(d)
}

/// What the kept `events` (oldest first) of one device say about rollout `r`: the download
/// from the directive it started on (the last `accepted` before its first download event) to
/// `staged`; the install from when activation was allowed (ring and device windows,
/// `not_before`) to `installed`; and how long after `probation` it committed.
fn sample(
    events: &[&EventEntry],
    r: &Rollout,
    schedules: &[&Schedule],
    probation: Option<SignedDuration>,
) -> Sample {
    let ours: Vec<&EventEntry> = events
        .iter()
        .copied()
        .filter(|e| e.event.rollout_id.as_deref() == Some(r.id.as_str()))
        .collect();
    let mut s = Sample::default();
    let Some(first) = ours.iter().position(|e| {
        matches!(
            e.event.kind,
            EventKind::Downloading { .. }
                | EventKind::DownloadFailed { .. }
                | EventKind::Downloaded
                | EventKind::Staged
        )
    }) else {
        return s;
    };
    let start = ours[..first]
        .iter()
        .rev()
        .find(|e| e.event.kind == EventKind::Accepted);
    let Some(staged) = ours[first..]
        .iter()
        .position(|e| e.event.kind == EventKind::Staged)
        .map(|i| first + i)
    else {
        return s;
    };
    let staged_at = ours[staged].event.at;
    if let Some(start) = start {
        s.download = sane(staged_at.duration_since(start.event.at));
    }
    let Some(installed) = ours[staged..]
        .iter()
        .position(|e| e.event.kind == EventKind::Installed)
        .map(|i| staged + i)
    else {
        return s;
    };
    let installed_at = ours[installed].event.at;
    let from = r.activate_at.map_or(staged_at, |nb| nb.max(staged_at));
    let allowed = all_open(schedules, from).unwrap_or(staged_at);
    s.install = sane(installed_at.duration_since(allowed))
        .or_else(|| sane(installed_at.duration_since(staged_at)));
    if let (Some(p), Some(c)) = (
        probation,
        ours[installed..]
            .iter()
            .find(|e| e.event.kind == EventKind::Committed),
    ) {
        let late = c.event.at.duration_since(installed_at) - p;
        s.lag = sane(late.max(SignedDuration::ZERO));
    }
    s
}

/// Measure download, install and commit lag for rollout `r` of `rel` from the kept events of
/// at most [`MAX_SAMPLES`] devices (those that committed `r` first, then others that know the
/// release name, by id): `r`'s own figures once [`MIN_OWN_SAMPLES`] devices have them, else
/// pooled with the last rollout of the same name; the defaults when nothing is measured.
pub fn measure(
    policy: &Policy,
    st: &EngineState,
    r: &Rollout,
    rel: &Release,
    fleet: &FleetView<'_>,
) -> Measured {
    let last = st
        .rollouts
        .values()
        .filter(|o| o.id != r.id && o.release_name == r.release_name)
        .filter(|o| (o.created_at, &o.id) < (r.created_at, &r.id))
        .max_by_key(|o| (o.created_at, o.id.clone()));
    let mut candidates: Vec<(u8, &DeviceRecord)> = fleet
        .devices
        .values()
        .filter_map(|d| {
            let rep = d.report_for(&rel.name)?;
            let mine = rep.rollout_id.as_deref() == Some(r.id.as_str());
            let knows = mine
                || last.is_some_and(|l| rep.rollout_id.as_deref() == Some(l.id.as_str()))
                || [&rep.current, &rep.target]
                    .into_iter()
                    .flatten()
                    .any(|x| x.name == rel.name);
            let rank = if mine && rep.phase == Phase::Committed {
                0
            } else {
                1
            };
            knows.then_some((rank, d))
        })
        .collect();
    candidates.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));
    candidates.truncate(MAX_SAMPLES);
    let probation_of = |o: &Rollout| {
        st.releases
            .get(&o.release_id)
            .map(|x| x.release.health.probation.signed())
    };
    let mut own: Vec<Sample> = Vec::new();
    let mut prev: Vec<Sample> = Vec::new();
    for (_, d) in candidates {
        let Some(rep) = d.report_for(&rel.name) else {
            continue;
        };
        let mut events = fleet.history.kept(&d.id);
        if events.is_empty() {
            continue;
        }
        events.sort_by_key(|e| e.seq);
        let refs: Vec<&EventEntry> = events.iter().collect();
        let ring = policy
            .ring(&rep.ring)
            .map(RingPolicy::schedule)
            .unwrap_or_else(Schedule::always);
        let dev = device_schedule(&rep);
        let schedules = [&ring, &dev];
        own.push(sample(&refs, r, &schedules, probation_of(r)));
        if let Some(l) = last {
            prev.push(sample(&refs, l, &schedules, probation_of(l)));
        }
    }
    let pick = |get: fn(&Sample) -> Option<SignedDuration>, default: SignedDuration| {
        let mine: Vec<SignedDuration> = own.iter().filter_map(get).collect();
        let (values, on) = if mine.len() >= MIN_OWN_SAMPLES || last.is_none() {
            (mine, vec![r.id.clone()])
        } else {
            let theirs: Vec<SignedDuration> = prev.iter().filter_map(get).collect();
            let mut on = Vec::new();
            if !mine.is_empty() {
                on.push(r.id.clone());
            }
            if let (false, Some(l)) = (theirs.is_empty(), last) {
                on.push(l.id.clone());
            }
            (mine.into_iter().chain(theirs).collect(), on)
        };
        let n = values.len();
        match median(values) {
            Some(m) => Estimate::new(m, n, on),
            None => Estimate::new(default, 0, Vec::new()),
        }
    };
    Measured {
        download: pick(|s| s.download, DEFAULT_DOWNLOAD),
        install: pick(|s| s.install, DEFAULT_INSTALL),
        commit_lag: pick(|s| s.lag, grid_lag(rel)),
    }
}

/// Commit lag assumed while nothing is measured: health rounds run every `interval` from the
/// install, and the agent commits at the first one at or after the probation's end.
fn grid_lag(rel: &Release) -> SignedDuration {
    let p = rel.health.probation.get().as_millis();
    let i = rel.health.interval.get().as_millis();
    if i == 0 {
        return SignedDuration::ZERO;
    }
    let rounds = p.div_ceil(i);
    let late = (rounds * i).saturating_sub(p);
    SignedDuration::from_millis(i64::try_from(late).unwrap_or(0))
}

/// Where one device is with the rollout, from its report.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Progress {
    /// Nothing for this rollout yet (or cancelled work).
    NotStarted,
    /// Downloading since (controller time of the report).
    Downloading(Timestamp),
    /// Verifying or staged: activation is next.
    Staged,
    /// Installing since.
    Installing(Timestamp),
    /// On probation since.
    Probation(Timestamp),
    /// Committed (controller time of the report).
    Committed(Timestamp),
    /// Reverted or failed at this attempt (it commits only if the ring retries).
    Failed(u32),
    /// Refused the directive.
    Refused,
}

fn progress(d: &Dev<'_>, r: &Rollout) -> Progress {
    let Some(rep) = &d.report else {
        return Progress::NotStarted;
    };
    if rep.refused.as_ref().is_some_and(|x| x.rollout_id == r.id) {
        return Progress::Refused;
    }
    if rep.rollout_id.as_deref() != Some(r.id.as_str()) {
        return Progress::NotStarted;
    }
    let is = |x: &Option<ringcast_proto::ReleaseRef>| {
        x.as_ref()
            .is_some_and(|x| x.name == r.release_name && x.sequence == r.release_sequence)
    };
    let since = d.last_seen;
    match rep.phase {
        Phase::Committed if is(&rep.current) => Progress::Committed(since),
        p if p.is_failure() && (rep.target.is_none() || is(&rep.target)) => {
            Progress::Failed(rep.attempt)
        }
        Phase::Downloading => Progress::Downloading(since),
        // Deferred: staged, its own hook holds it (up to its deadline, which the forecast does
        // not model: it is forecast as staged and ready).
        Phase::Verifying | Phase::Staged | Phase::Deferred => Progress::Staged,
        Phase::Installing => Progress::Installing(since),
        Phase::Probation => Progress::Probation(since),
        // Idle (cancelled or not yet in the ramp), and phases this controller does not know
        // yet: the device starts over.
        _ => Progress::NotStarted,
    }
}

/// One device's forecast inside the walk.
#[derive(Debug, Clone)]
struct Plan {
    step: usize,
    published: Timestamp,
    activates: Option<Timestamp>,
    commits: Option<Timestamp>,
    note: String,
    waits_for: Option<String>,
}

/// The walk over a rollout's steps.
struct Walk<'a> {
    policy: &'a Policy,
    r: &'a Rollout,
    rel: &'a Release,
    m: &'a Measured,
    t: Timings,
    by_ring: &'a ByRing<'a>,
    st: &'a EngineState,
    now: Timestamp,
    steps: Vec<StepForecast>,
    plans: HashMap<String, Plan>,
}

fn secs_dur(secs: f64) -> SignedDuration {
    SignedDuration::try_from_secs_f64(secs).unwrap_or(SignedDuration::ZERO)
}

impl<'a> Walk<'a> {
    fn new(
        policy: &'a Policy,
        st: &'a EngineState,
        r: &'a Rollout,
        rel: &'a Release,
        m: &'a Measured,
        by_ring: &'a ByRing<'a>,
        now: Timestamp,
    ) -> Walk<'a> {
        let probation = rel.health.probation.signed() + secs_dur(m.commit_lag.secs);
        Walk {
            policy,
            r,
            rel,
            m,
            t: Timings {
                download: secs_dur(m.download.secs),
                install: secs_dur(m.install.secs),
                probation,
            },
            by_ring,
            st,
            now,
            steps: Vec::new(),
            plans: HashMap::new(),
        }
    }

    /// When the rollout published `step` of `ring`, if it did.
    fn published(&self, ring: &str, step: usize) -> Option<Timestamp> {
        self.r
            .history
            .iter()
            .rev()
            .find(|h| h.ring == ring && h.step == step)
            .map(|h| h.published_at)
    }

    /// The ring's devices that can take the release, each with the first step whose ramp
    /// includes it (`None`: in no ramp of the ring).
    fn entries(&self, rp: &RingPolicy) -> Vec<(&'a Dev<'a>, Option<usize>)> {
        self.by_ring
            .get(rp.name.as_str())
            .map(|v| {
                v.iter()
                    .filter(|d| {
                        d.report
                            .as_ref()
                            .is_some_and(|rep| self.rel.is_compatible(&rep.device_class))
                    })
                    .map(|d| {
                        let entry = rp.steps.iter().position(|p| in_ramp(&self.r.id, d.id, *p));
                        (d, entry)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forecast device `d` whose step was (or will be) published at `published`.
    fn plan(&self, d: &Dev<'_>, rp: &RingPolicy, step: usize, published: Timestamp) -> Plan {
        let now = self.now;
        let mut plan = Plan {
            step,
            published,
            activates: None,
            commits: None,
            note: String::new(),
            waits_for: None,
        };
        let Some(rep) = &d.report else {
            return plan;
        };
        let ring = rp.schedule();
        let own = device_schedule(rep);
        // Never before the device's own step is out: a device may hold the bytes earlier
        // (staged for a launch, or for a pin), but activates only on its step's directive.
        let activation = |staged: Timestamp| {
            let staged = staged.max(published);
            let from = self.r.activate_at.map_or(staged, |nb| nb.max(staged));
            all_open(&[&ring, &own], from)
        };
        let t = self.t;
        let mut retried = None;
        let staged = match progress(d, self.r) {
            Progress::Committed(at) => {
                plan.commits = Some(at);
                plan.note = "committed".into();
                return plan;
            }
            Progress::Failed(at) => match self.retry_at(&rp.name, at) {
                Some(retry) => {
                    retried = Some(at);
                    add(retry, t.download)
                }
                None => {
                    plan.note = "failed this release (reverted or install failed)".into();
                    return plan;
                }
            },
            Progress::Refused => {
                plan.note = "refused the directive".into();
                return plan;
            }
            Progress::Probation(since) => {
                plan.commits = Some(add(since, t.probation).max(now));
                plan.note = "on probation; commits at its end".into();
                return plan;
            }
            Progress::Installing(since) => {
                plan.activates = Some(since);
                plan.commits = Some(add(add(since, t.install).max(now), t.probation));
                plan.note = "installing; commits after the probation".into();
                return plan;
            }
            Progress::Staged => now,
            Progress::Downloading(since) => add(since, t.download).max(now),
            Progress::NotStarted => add(published.max(now), t.download),
        };
        let staged = staged.max(published);
        match activation(staged) {
            Some(at) => {
                plan.activates = Some(at);
                plan.commits = Some(add(add(at, t.install), t.probation));
                let why = if at > staged && !own.is_open(staged) {
                    "waits for its own delivery window, then commits after the probation"
                } else if at > staged {
                    "waits for the ring's delivery window, then commits after the probation"
                } else {
                    "commits after download, install and probation"
                };
                plan.note = match retried {
                    Some(n) => format!("failed at attempt {n}, the ring retries it: {why}"),
                    None => format!("enters the ramp at step {step}; {why}"),
                };
            }
            None => {
                plan.note = "its delivery windows and the ring's are never open together".into();
                plan.waits_for = Some("window".into());
            }
        }
        plan
    }

    fn run(mut self) -> (RolloutForecast, HashMap<String, Prediction>) {
        let wait = self.walk();
        let completes_at = if wait.is_none() {
            self.steps.last().and_then(|s| s.passes_at)
        } else {
            None
        };
        let rf = RolloutForecast {
            rollout_id: self.r.id.clone(),
            release_id: self.r.release_id.clone(),
            download: self.m.download.clone(),
            install: self.m.install.clone(),
            probation_secs: self.rel.health.probation.signed().as_secs_f64(),
            commit_lag: self.m.commit_lag.clone(),
            steps: std::mem::take(&mut self.steps),
            completes_at,
            waits: wait.clone(),
        };
        let mut out = HashMap::new();
        for rp in &self.policy.rings {
            for (d, entry) in self.entries(rp) {
                let p = match (self.plans.get(d.id), entry) {
                    (Some(plan), _) => Prediction {
                        rollout_id: self.r.id.clone(),
                        at: plan.commits,
                        step: Some(plan.step),
                        note: plan.note.clone(),
                        ring: Some(rp.name.clone()),
                        published_at: Some(plan.published),
                        activates_at: plan.activates,
                        waits_for: plan.waits_for.clone(),
                    },
                    (None, None) => bare(self.r, &rp.name, "not in any ramp of its ring"),
                    (None, Some(step)) => match &wait {
                        Some(w) => Prediction {
                            step: Some(step),
                            waits_for: Some(w.code().into()),
                            ..bare(self.r, &rp.name, &w.note())
                        },
                        None => bare(self.r, &rp.name, "not forecast"),
                    },
                };
                out.insert(d.id.to_owned(), p);
            }
        }
        (rf, out)
    }

    /// Walk the steps; the reason it stopped early, if it did.
    /// When a device of `ring` that failed at `attempt` is asked again: at once when the
    /// ring's directive already carries a later attempt, else when the ring's backoff
    /// (`retry_backoff`, doubled per attempt after the first) ends; `None` when no attempt is
    /// left.
    fn retry_at(&self, ring: &str, attempt: u32) -> Option<Timestamp> {
        let a = self.r.attempts.get(ring)?;
        if !a.will_retry(attempt) {
            return None;
        }
        if attempt < a.attempt {
            return Some(self.now);
        }
        let rp = self.policy.ring(ring)?;
        let wait = (0..a.attempt.saturating_sub(1).min(20))
            .fold(rp.retry_backoff.signed(), |w, _| w.saturating_mul(2));
        Some(add(a.at, wait).max(self.now))
    }

    fn walk(&mut self) -> Option<Wait> {
        if self.r.launch.as_ref().is_some_and(|l| l.held) {
            return Some(Wait::LaunchHeld);
        }
        let (cursor, stage) = match &self.r.state {
            RolloutState::Queued => return Some(Wait::Queued),
            RolloutState::Pending => ((0, 0), None),
            RolloutState::Active { ring, step, stage } => match self.policy.ring_index(ring) {
                Some(i) => ((i, *step), Some(stage.clone())),
                None => return Some(Wait::UnknownRing { ring: ring.clone() }),
            },
            _ => return None,
        };
        let policy = self.policy;
        // When the next step may start.
        let mut enter = match stage {
            None => self.r.start_at.map_or(self.now, |s| s.max(self.now)),
            Some(_) => self.now,
        };
        for (i, rp) in policy.rings.iter().enumerate() {
            let entries = self.entries(rp);
            for (s, percent) in rp.steps.iter().enumerate() {
                let pos = (i, s);
                // Passed steps: published at their recorded time; their devices are forecast
                // from their reports, no gate to wait for.
                if pos < cursor {
                    let at = self.published(&rp.name, s).unwrap_or(self.now);
                    self.enter_devices(rp, s, at, &entries);
                    self.steps.push(StepForecast {
                        ring: rp.name.clone(),
                        step: s,
                        percent: *percent,
                        published_at: at,
                        published: true,
                        gate_met_at: None,
                        passes_at: None,
                    });
                    continue;
                }
                let here = pos == cursor;
                let here_stage = if here { stage.clone() } else { None };
                let out_already = matches!(
                    here_stage,
                    Some(
                        Stage::Publishing { .. }
                            | Stage::Baking { .. }
                            | Stage::Checking { .. }
                            | Stage::ChecksFailed { .. }
                    )
                );
                let (published, known_gate, known_pass) = match here_stage {
                    Some(Stage::Publishing { since }) => (Some(since), None, None),
                    Some(Stage::Baking { since, published }) => {
                        (Some(published.unwrap_or(since)), Some(since), None)
                    }
                    Some(Stage::Checking { .. }) => {
                        let at = self.published(&rp.name, s).unwrap_or(self.now);
                        (Some(at), None, Some(self.now))
                    }
                    Some(Stage::ChecksFailed { at, .. }) => {
                        let p = self.published(&rp.name, s).unwrap_or(self.now);
                        (
                            Some(p),
                            None,
                            Some(add(at, rp.check_retry.signed()).max(self.now)),
                        )
                    }
                    Some(Stage::WaitingWindow) | Some(Stage::WaitingApproval) | None => {
                        (None, None, None)
                    }
                };
                let published = match published {
                    Some(p) => p,
                    None => {
                        if self.r.paused {
                            return Some(Wait::Paused);
                        }
                        let approved = self.r.approvals.contains_key(&rp.name);
                        if s == 0 && rp.promotion == Promotion::Manual && !approved {
                            return Some(Wait::Approval {
                                ring: rp.name.clone(),
                            });
                        }
                        match rp.schedule().next_open(enter) {
                            Some(t) => t,
                            None => {
                                return Some(Wait::NoWindow {
                                    ring: rp.name.clone(),
                                })
                            }
                        }
                    }
                };
                self.enter_devices(rp, s, published, &entries);
                let mut step = StepForecast {
                    ring: rp.name.clone(),
                    step: s,
                    percent: *percent,
                    published_at: published,
                    published: here && out_already,
                    gate_met_at: None,
                    passes_at: None,
                };
                if self.r.paused {
                    self.steps.push(step);
                    return Some(Wait::Paused);
                }
                let pass = match known_pass {
                    Some(p) => p,
                    None => {
                        let gate = match known_gate {
                            Some(g) => g,
                            None => match self.gate(rp, s, published) {
                                Ok(g) => g,
                                Err(w) => {
                                    self.steps.push(step);
                                    return Some(w);
                                }
                            },
                        };
                        step.gate_met_at = Some(gate);
                        add(gate, rp.bake.signed()).max(self.now)
                    }
                };
                step.passes_at = Some(pass);
                self.steps.push(step);
                enter = pass;
            }
        }
        None
    }

    /// Forecast the devices whose first step in the ramp is `step`.
    fn enter_devices(
        &mut self,
        rp: &RingPolicy,
        step: usize,
        published: Timestamp,
        entries: &[(&Dev<'_>, Option<usize>)],
    ) {
        for (d, entry) in entries {
            if *entry == Some(step) {
                let plan = self.plan(d, rp, step, published);
                self.plans.insert(d.id.to_owned(), plan);
            }
        }
    }

    /// When the gate of the step at `percent` is first met (or why it is not): the
    /// `needed`-th earliest commit of the ramp's devices (gate.rs `needed`: the ramp's size
    /// caps what an intermediate step needs, never what the ring's last step needs).
    fn gate(&self, rp: &RingPolicy, step: usize, published: Timestamp) -> Result<Timestamp, Wait> {
        let Some(percent) = rp.steps.get(step).copied() else {
            return Ok(published);
        };
        let last_step = step + 1 == rp.steps.len();
        let ring_devices: &[Dev<'_>] = self
            .by_ring
            .get(rp.name.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let in_ramp_all: Vec<&Dev<'_>> = ring_devices
            .iter()
            .filter(|d| in_ramp(&self.r.id, d.id, percent))
            .collect();
        let count = u32::try_from(in_ramp_all.len()).unwrap_or(u32::MAX);
        let needed = if last_step {
            rp.gate.min_reports
        } else {
            rp.gate.min_reports.min(count)
        };
        let pinned =
            |d: &Dev<'_>| deciding_pin(self.st, d.id, &self.r.release_name, d.multi).is_some();
        let mut commits: Vec<Timestamp> = in_ramp_all
            .iter()
            .filter(|d| !pinned(d))
            .filter_map(|d| self.plans.get(d.id).and_then(|p| p.commits))
            .collect();
        commits.sort();
        let gate = if needed == 0 {
            published
        } else {
            let Some(at) = usize::try_from(needed - 1)
                .ok()
                .and_then(|k| commits.get(k))
            else {
                return Err(Wait::GateUnreachable {
                    ring: rp.name.clone(),
                    step,
                    needed,
                    can_commit: u32::try_from(commits.len()).unwrap_or(u32::MAX),
                });
            };
            (*at).max(published)
        }
        .max(self.now);
        let limit = rp.step_timeout().signed();
        if !limit.is_zero() && gate.duration_since(published) > limit {
            return Err(Wait::StepTimeout {
                ring: rp.name.clone(),
                step,
                timeout: rp.step_timeout().to_string(),
            });
        }
        Ok(gate)
    }
}
