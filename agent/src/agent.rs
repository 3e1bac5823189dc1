//! The agent itself. A `Worker` is one task that owns one release slot's persisted state,
//! takes that slot's messages, drives its downloads, installs, probation and reverts, and
//! queues reports. A single-product agent is one worker fed straight from the MQTT session; a
//! multi-product agent (`[products]`) runs one worker per product, fed by the router in
//! `crate::hub`, which also owns what they share: the trust root, the device's trusted
//! time, event ids and the one merged state report.
//!
//! Every change follows the same order: decide (pure, [`crate::state::transition`]), persist
//! (store, flushed), then act (files, commands, reports). A restart resumes from what was
//! persisted (see `Worker::resume`).

use crate::cmd::{self, Subst};
use crate::config::{AgentConfig, DeferConfig};
use crate::defer::{self, Answer, Due};
use crate::download::{self, Complete, Fetch};
use crate::error::{Error, Result};
use crate::health;
use crate::hub::{Hub, Mailbox};
use crate::install::{FsInstaller, Installer};
use crate::state::{
    is_busy, plan, release_ref, transition, Ask, CancelReason, Job, Kept, Origin, Persisted, Plan,
    RevertCause, Step,
};
use crate::store::{SledStore, Store};
use crate::transport::{self, Inbound, TAG_EVENT, TAG_STATE};
use jiff::{SignedDuration, Timestamp};
use ringcast_io::fs as fsutil;
use ringcast_proto::digest::sha256_hex as digest_hex;
use ringcast_proto::release::InstallKind;
use ringcast_proto::report::{ErrorInfo, ProductState};
use ringcast_proto::{
    check_release, in_ramp, verify_directive, Accepted, Action, AgentView, Clock, DeviceIdentity,
    Envelope, Event, EventKind, Phase, Reason, Rejection, ReleaseRef, Rotation, Schedule, Source,
    StateReport, SystemClock, Topic, Topics, TrustRoot, Window,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tracing::Instrument;

/// The span of one rollout step of `$job` (STYLE.md rule 11): every line logged inside it
/// carries `device`, `ring`, `rollout_id` and `release`, so an operator grepping for a rollout
/// id finds its download, verify, stage, activate, probation, commit and revert. The fields
/// are all repeated here because a step may run in a task of its own (the download), outside
/// the `agent` span.
macro_rules! step_span {
    ($name:literal, $cfg:expr, $job:expr) => {{
        let job: &Job = $job;
        tracing::info_span!(
            $name,
            device = %$cfg.device_id,
            ring = %$cfg.ring,
            rollout_id = %job.rollout_id,
            release = %format_args!("{}@{}", job.release.name, job.release.version),
        )
    }};
}

/// [`step_span!`] for the agent's current job, or no span when there is none.
macro_rules! job_span {
    ($name:literal, $agent:expr) => {
        match $agent.st.job.as_ref() {
            Some(j) => step_span!($name, $agent.cfg, j),
            None => tracing::Span::none(),
        }
    };
}

/// What a probation round leads to.
#[derive(Debug)]
enum RoundOutcome {
    /// Keep watching.
    Continue,
    /// Healthy through the whole probation.
    Commit,
    /// Too many failed rounds.
    Revert(RevertCause),
}

/// How often the agent looks at the clock (activation, retries, probation rounds). Logical
/// waits compare against [`Clock::now`] at each tick, so a test's `FakeClock` takes effect at
/// the next tick.
const TICK: Duration = Duration::from_millis(100);

/// The outside world the agent talks to, injectable for tests and simulators.
#[derive(Debug, Clone)]
pub struct Deps {
    /// Durable state and outbox.
    pub store: Arc<dyn Store>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Activation and revert (of a single-product agent; each product of a multi-product
    /// agent has its own, see [`Agent::with_product_installers`]).
    pub installer: Arc<dyn Installer>,
}

impl Deps {
    /// The real ones: sled in `{data_dir}/db`, the system clock, the filesystem installer at
    /// the configured install root.
    pub fn real(cfg: &AgentConfig) -> Result<Deps> {
        fsutil::ensure_dir(&cfg.data_dir)?;
        Ok(Deps {
            store: Arc::new(SledStore::open(&cfg.data_dir.join("db"))?),
            clock: Arc::new(SystemClock),
            installer: Arc::new(FsInstaller::new(
                cfg.install_root(),
                cfg.install.command_timeout.get(),
                cfg.health.output_tail,
            )),
        })
    }
}

/// A running agent, as seen from the process that spawned it.
#[derive(Debug)]
pub struct AgentHandle {
    shutdown: watch::Sender<bool>,
    status: watch::Receiver<StateReport>,
    join: JoinHandle<Result<()>>,
}

impl AgentHandle {
    /// The latest state report (what the agent last published).
    pub fn status(&self) -> StateReport {
        self.status.borrow().clone()
    }

    /// A receiver that changes with every state report.
    pub fn watch(&self) -> watch::Receiver<StateReport> {
        self.status.clone()
    }

    /// Stop the agent (as on SIGTERM) and wait for it.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        match self.join.await {
            Ok(r) => r,
            Err(e) => Err(Error::Store(format!("agent task failed: {e}"))),
        }
    }
}

/// How `run` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Until shutdown.
    Daemon,
    /// Until retained messages are processed and nothing is under way.
    Once,
}

/// The device agent: one `Worker` owning the device's one release slot (no `[products]`),
/// or one worker per configured product, all over one MQTT session, one trust root, one
/// outbox and one merged state report (`Hub`).
pub struct Agent {
    cfg: AgentConfig,
    deps: Deps,
    poke: Arc<Notify>,
    body: Body,
}

/// What runs inside an [`Agent`].
enum Body {
    /// A single-product agent: exactly the agent from before products.
    Single(Box<Worker>),
    /// A multi-product agent: its workers, by product name, and what they share.
    Multi {
        hub: Arc<Hub>,
        workers: Vec<(String, Worker)>,
    },
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Agent");
        d.field("device", &self.cfg.device_id);
        match &self.body {
            Body::Single(w) => d.field("phase", &w.st.phase),
            Body::Multi { workers, .. } => d.field(
                "phases",
                &workers
                    .iter()
                    .map(|(n, w)| (n.as_str(), w.st.phase))
                    .collect::<Vec<_>>(),
            ),
        };
        d.finish()
    }
}

/// Store key of a single-product agent's state.
const KEY_STATE: &str = "state";
/// Store key of the trust root (shared by every product).
const KEY_TRUST: &str = "trust";

/// Store key of product `name`'s state.
pub fn product_state_key(name: &str) -> String {
    format!("product/{name}/state")
}

impl Agent {
    /// Build an agent: load the persisted state (or start fresh) and the trust root (the
    /// persisted one, else the configured initial root file). With `[products]`, each product
    /// gets a [`FsInstaller`] at its install root; `deps.installer` serves the single-product
    /// agent only.
    pub fn new(cfg: AgentConfig, deps: Deps) -> Result<Agent> {
        Agent::with_product_installers(cfg, deps, BTreeMap::new())
    }

    /// [`Agent::new`], with the installer of some products given (tests, simulators); the
    /// others get a [`FsInstaller`] at their install root.
    pub fn with_product_installers(
        cfg: AgentConfig,
        deps: Deps,
        mut installers: BTreeMap<String, Arc<dyn Installer>>,
    ) -> Result<Agent> {
        transport::install_crypto_provider();
        let topics = cfg.topics().map_err(|e| Error::Config {
            path: PathBuf::from("agent config"),
            detail: format!("field topic_prefix: {}", e.detail),
        })?;
        fsutil::ensure_dir(&cfg.data_dir)?;
        let trust = load_trust(&cfg, &*deps.store)?;
        let poke = Arc::new(Notify::new());
        let outbox = Arc::new(Outbox::new(
            deps.store.clone(),
            poke.clone(),
            cfg.reports.queue_max,
        ));
        let http = download::client(
            cfg.download.connect_timeout.get(),
            cfg.download.ca_file.as_deref(),
        )?;
        let shared = Shared {
            cfg: cfg.clone(),
            topics,
            outbox,
            http,
        };
        let body = if !cfg.is_multi_product() {
            let (status_tx, _) = watch::channel(placeholder_report(&cfg));
            let w = Worker::open(
                &shared,
                deps.clone(),
                Slot::sole(&cfg),
                Scope::Sole {
                    trust: Box::new(trust),
                    status_tx,
                    event_n: 0,
                },
            )?;
            Body::Single(Box::new(w))
        } else {
            let hub = Arc::new(Hub::open(&cfg, &deps, trust, shared.outbox.clone())?);
            let mut workers = Vec::new();
            for name in cfg.products.keys() {
                let installer = installers.remove(name).unwrap_or_else(|| {
                    Arc::new(FsInstaller::new(
                        cfg.product_install_root(name),
                        cfg.install.command_timeout.get(),
                        cfg.health.output_tail,
                    ))
                });
                let pdeps = Deps {
                    installer,
                    ..deps.clone()
                };
                let slot = Slot::product(&cfg, name);
                let w = Worker::open(&shared, pdeps, slot, Scope::Product { hub: hub.clone() })?;
                hub.set_entry(name, w.product_state());
                workers.push((name.clone(), w));
            }
            hub.refresh_status();
            Body::Multi { hub, workers }
        };
        Ok(Agent {
            cfg,
            deps,
            poke,
            body,
        })
    }

    /// Open an agent with the real dependencies ([`Deps::real`]).
    pub fn open(cfg: AgentConfig) -> Result<Agent> {
        let deps = Deps::real(&cfg)?;
        Agent::new(cfg, deps)
    }

    /// A receiver of the agent's state reports (in-process status).
    pub fn watch(&self) -> watch::Receiver<StateReport> {
        match &self.body {
            Body::Single(w) => w.watch(),
            Body::Multi { hub, .. } => hub.watch(),
        }
    }

    /// The current state report.
    pub fn report(&self) -> StateReport {
        match &self.body {
            Body::Single(w) => w.report(),
            Body::Multi { hub, .. } => hub.report(),
        }
    }

    /// Run on the current tokio runtime until `shutdown` is set to `true`.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<()> {
        let span =
            tracing::info_span!("agent", device = %self.cfg.device_id, ring = %self.cfg.ring);
        self.run_mode(Mode::Daemon, shutdown).instrument(span).await
    }

    /// Process what is retained on the subscribed topics, finish any work that can finish now
    /// (download, install, probation; of every product), flush the reports, and return.
    pub async fn run_once(self) -> Result<()> {
        let span =
            tracing::info_span!("agent", device = %self.cfg.device_id, ring = %self.cfg.ring);
        let (_tx, rx) = watch::channel(false);
        self.run_mode(Mode::Once, rx).instrument(span).await
    }

    /// Spawn onto the current runtime; the handle stops it and reads its status.
    pub fn spawn(self) -> AgentHandle {
        let (tx, rx) = watch::channel(false);
        let status = self.watch();
        let join = tokio::spawn(self.run(rx));
        AgentHandle {
            shutdown: tx,
            status,
            join,
        }
    }

    async fn run_mode(self, mode: Mode, shutdown: watch::Receiver<bool>) -> Result<()> {
        let Agent {
            cfg,
            deps,
            poke,
            body,
        } = self;
        let (in_tx, in_rx) = mpsc::channel::<Inbound>(64);
        let (conn_tx, conn_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = watch::channel(false);
        let transport = tokio::spawn(transport::run(
            cfg.clone(),
            deps.store.clone(),
            in_tx,
            poke.clone(),
            conn_tx,
            stop_rx,
        ));
        let result = match body {
            Body::Single(w) => w.run_loop(mode, Inbox::Channel(in_rx), shutdown).await,
            Body::Multi { hub, workers } => {
                crate::hub::run_products(&cfg, hub, workers, mode, in_rx, shutdown).await
            }
        };
        if mode == Mode::Once && *conn_rx.borrow() {
            // Give the session a moment to deliver what is queued.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while deps.store.outbox_len().unwrap_or(0) > 0 && tokio::time::Instant::now() < deadline
            {
                poke.notify_one();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = stop_tx.send(true);
        match tokio::time::timeout(Duration::from_secs(5), transport).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "mqtt session ended with an error"),
            Ok(_) => {}
            Err(_) => tracing::warn!("mqtt session did not stop within 5s"),
        }
        result
    }
}

/// The trust root: the persisted one, else the configured initial root file (then persisted).
fn load_trust(cfg: &AgentConfig, store: &dyn Store) -> Result<TrustRoot> {
    Ok(match store.get(KEY_TRUST)? {
        Some(bytes) => TrustRoot::from_bytes_self_signed(&bytes).map_err(Error::Trust)?,
        None => {
            let bytes = std::fs::read(&cfg.trust_root)
                .map_err(|e| Error::io("read trust root", &cfg.trust_root, e))?;
            let t = TrustRoot::from_bytes_self_signed(&bytes).map_err(Error::Trust)?;
            store.put(KEY_TRUST, &bytes)?;
            t
        }
    })
}

/// Apply a trust root envelope from the trust topic to `trust` (persisted before it is used:
/// a restart must never fall back to the older root); the event to report, if any.
pub(crate) fn apply_trust(
    trust: &mut TrustRoot,
    store: &dyn Store,
    payload: &[u8],
    now: Timestamp,
    skew: SignedDuration,
) -> Result<Option<EventKind>> {
    let res = Envelope::from_slice(payload).and_then(|env| trust.rotate(&env, now, skew));
    match res {
        Ok(Rotation::Unchanged) => Ok(None),
        Ok(Rotation::Accepted(next)) => {
            store.put(KEY_TRUST, payload)?;
            let version = next.version();
            *trust = *next;
            tracing::info!(version, "trust root rotated");
            Ok(Some(EventKind::TrustRotated { version }))
        }
        Err(rej) => {
            tracing::warn!(reason = rej.reason.code(), detail = %rej.detail, "trust root rejected");
            Ok(Some(EventKind::Rejected {
                reason: rej.reason,
                detail: format!("trust: {}", rej.detail),
            }))
        }
    }
}

/// The durable, bounded, ordered queue of reports every worker of an agent writes to and the
/// MQTT session drains.
#[derive(Debug)]
pub(crate) struct Outbox {
    store: Arc<dyn Store>,
    poke: Arc<Notify>,
    max: usize,
    /// Making room and pushing happen together, so two products queueing at once never evict
    /// more than needed.
    lock: Mutex<()>,
}

impl Outbox {
    pub(crate) fn new(store: Arc<dyn Store>, poke: Arc<Notify>, max: usize) -> Outbox {
        Outbox {
            store,
            poke,
            max,
            lock: Mutex::new(()),
        }
    }

    /// Queue one message and wake the session.
    pub(crate) fn queue(&self, tag: u8, body: &[u8]) {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let max = self.max;
        if let Ok(n) = self.store.outbox_len() {
            if n >= max {
                // Bounded: make room by dropping what carries the least, superseded state
                // reports and download progress first (see `eviction_order`).
                if let Ok(all) = self.store.outbox_peek(n) {
                    for seq in eviction_order(&all).into_iter().take(n + 1 - max) {
                        let _ = self.store.outbox_remove(seq);
                    }
                }
                tracing::warn!(
                    queue_max = max,
                    "report queue full; dropped the least useful"
                );
            }
        }
        let mut msg = Vec::with_capacity(body.len() + 1);
        msg.push(tag);
        msg.extend_from_slice(body);
        if let Err(e) = self.store.outbox_push(&msg) {
            tracing::error!(error = %e, "cannot queue report");
        }
        self.poke.notify_one();
    }
}

/// What every worker of one agent shares, at construction.
struct Shared {
    cfg: AgentConfig,
    topics: Topics,
    outbox: Arc<Outbox>,
    http: crate::http::Client,
}

/// Where one worker's release slot lives and what applies to it: the single-product agent's
/// (today's keys, paths, topics, windows and hook) or one product's.
#[derive(Debug, Clone)]
struct Slot {
    /// The product; `None` for a single-product agent.
    product: Option<String>,
    /// Store key of its [`Persisted`].
    key: String,
    /// Its downloads (partial and staged artifacts).
    artifacts: PathBuf,
    /// Its install root.
    install_root: PathBuf,
    /// Its own delivery windows besides the device's (empty: none of its own).
    windows: Vec<Window>,
    /// The defer hook that applies to it.
    defer: Option<DeferConfig>,
    /// The install kinds it takes (`None`: any).
    kinds: Option<Vec<InstallKind>>,
}

impl Slot {
    fn sole(cfg: &AgentConfig) -> Slot {
        Slot {
            product: None,
            key: KEY_STATE.to_owned(),
            artifacts: cfg.data_dir.join("artifacts"),
            install_root: cfg.install_root(),
            windows: Vec::new(),
            defer: cfg.defer.clone(),
            kinds: None,
        }
    }

    fn product(cfg: &AgentConfig, name: &str) -> Slot {
        let p = cfg.products.get(name).cloned().unwrap_or_default();
        Slot {
            product: Some(name.to_owned()),
            key: product_state_key(name),
            artifacts: cfg.product_artifacts_dir(name),
            install_root: cfg.product_install_root(name),
            windows: p.windows,
            defer: p.defer.or_else(|| cfg.defer.clone()),
            kinds: p.kinds,
        }
    }
}

/// How a worker reports and whose trust root it verifies with.
enum Scope {
    /// The single-product agent: its own trust root, report sequence, event ids and status.
    Sole {
        trust: Box<TrustRoot>,
        status_tx: watch::Sender<StateReport>,
        event_n: u64,
    },
    /// One product of several: trust root, trusted time, event ids, report sequence and the
    /// merged report live in the hub.
    Product { hub: Arc<Hub> },
}

/// Where a worker's inbound messages come from.
pub(crate) enum Inbox {
    /// Straight from the MQTT session (single-product agent).
    Channel(mpsc::Receiver<Inbound>),
    /// From the router of a multi-product agent.
    Mailbox(Arc<Mailbox>),
}

impl Inbox {
    async fn recv(&mut self) -> Option<Inbound> {
        match self {
            Inbox::Channel(rx) => rx.recv().await,
            Inbox::Mailbox(m) => Some(m.recv().await),
        }
    }
}

/// The result of verifying a directive ([`Worker::verify_directive`]).
enum Verdict {
    /// Not for this device, or not authentic: an event, nothing else.
    Rejected(ringcast_proto::Rejection),
    /// Signed for this device, but its release cannot be taken here: a reported refusal.
    Refused(Box<ringcast_proto::Verified>, ringcast_proto::Rejection),
    /// Taken.
    Accepted(Box<Accepted>),
}

/// One release slot's actor: the persisted state of one product (or of the single-product
/// agent), taking that slot's directives, driving its downloads, installs, probation and
/// reverts.
pub(crate) struct Worker {
    cfg: AgentConfig,
    deps: Deps,
    topics: Topics,
    slot: Slot,
    scope: Scope,
    st: Persisted,
    outbox: Arc<Outbox>,
    http: crate::http::Client,
    /// Set by handlers: start a download attempt now.
    want_download: bool,
    /// Set by handlers: abort the running download.
    cancel_download: bool,
    /// Set when a job ended (commit or revert): look at the kept directives again. Done from
    /// the main loop, outside the ended job's spans, so a new job's lines do not carry the
    /// old rollout's fields.
    reevaluate: bool,
    progress: Option<watch::Receiver<u64>>,
    progress_mark: u64,
}

impl Worker {
    /// Load the slot's persisted state (or start fresh) and persist it with a new boot.
    fn open(shared: &Shared, deps: Deps, slot: Slot, scope: Scope) -> Result<Worker> {
        let mut st = match deps.store.get(&slot.key)? {
            Some(bytes) => serde_json::from_slice::<Persisted>(&bytes).map_err(|e| {
                Error::Store(format!("persisted state {} unreadable: {e}", slot.key))
            })?,
            None => Persisted::new(deps.clock.now()),
        };
        st.boot += 1;
        let w = Worker {
            cfg: shared.cfg.clone(),
            deps,
            topics: shared.topics.clone(),
            slot,
            scope,
            st,
            outbox: shared.outbox.clone(),
            http: shared.http.clone(),
            want_download: false,
            cancel_download: false,
            reevaluate: false,
            progress: None,
            progress_mark: 0,
        };
        if let Scope::Sole { status_tx, .. } = &w.scope {
            status_tx.send_replace(w.report());
        }
        w.save()?;
        Ok(w)
    }

    /// A receiver of a single-product agent's state reports.
    fn watch(&self) -> watch::Receiver<StateReport> {
        match &self.scope {
            Scope::Sole { status_tx, .. } => status_tx.subscribe(),
            Scope::Product { hub } => hub.watch(),
        }
    }

    /// The single-product report of this slot.
    fn report(&self) -> StateReport {
        build_report(&self.cfg, &self.st, self.deps.clock.now())
    }

    /// This slot's entry in a multi-product report.
    pub(crate) fn product_state(&self) -> ProductState {
        product_state(&self.st, &self.slot.windows)
    }

    /// The worker's loop: take messages from `inbox`, drive the clock-driven work, until
    /// shutdown (or, in [`Mode::Once`], until this slot has settled).
    pub(crate) async fn run_loop(
        mut self,
        mode: Mode,
        mut inbox: Inbox,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        self.resume().await?;
        let mut download: Option<JoinHandle<Result<Complete>>> = None;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = tokio::time::Instant::now();
        let mut subscribed = false;
        let mut last_inbound = tokio::time::Instant::now();
        let result = loop {
            if self.reevaluate {
                self.reevaluate = false;
                self.evaluate(None).await?;
            }
            if self.cancel_download {
                self.cancel_download = false;
                if let Some(h) = download.take() {
                    h.abort();
                    // Wait for the task to be gone: until then it may still create or write
                    // the `.part` the cancel removed.
                    if tokio::time::timeout(Duration::from_secs(5), h)
                        .await
                        .is_err()
                    {
                        tracing::warn!("cancelled download did not stop within 5s");
                    }
                }
                self.progress = None;
                self.prune_artifacts();
            }
            if self.want_download && download.is_none() {
                self.want_download = false;
                match self.start_download() {
                    Ok(h) => download = Some(h),
                    Err(e) => job_span!("download", self).in_scope(|| self.download_failed(e))?,
                }
            }
            tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { break Ok(()); }
                }
                msg = inbox.recv() => match msg {
                    Some(Inbound::Message { topic, payload }) => {
                        last_inbound = tokio::time::Instant::now();
                        self.on_message(&topic, &payload).await?;
                    }
                    Some(Inbound::Subscribed) => {
                        subscribed = true;
                        last_inbound = tokio::time::Instant::now();
                    }
                    Some(Inbound::Connected) => {
                        // Whatever the broker kept retained for this device may be older than
                        // what the device knows (a broker restored from an old save).
                        self.publish_state()?;
                    }
                    None => break Err(Error::Mqtt("MQTT session task ended".into())),
                },
                res = async { match download.as_mut() { Some(h) => h.await, None => std::future::pending().await } } => {
                    download = None;
                    self.progress = None;
                    let span = job_span!("download", self);
                    match res {
                        Ok(Ok(c)) => self.on_body_complete(c).await?,
                        Ok(Err(e)) => span.in_scope(|| self.download_failed(e))?,
                        Err(e) if e.is_cancelled() => {}
                        Err(e) => span.in_scope(|| self.download_failed(Error::Download { code: "download_panicked", detail: e.to_string() }))?,
                    }
                }
                _ = tick.tick() => {
                    self.drive().await?;
                    if mode == Mode::Once {
                        let quiet = last_inbound.elapsed() > Duration::from_millis(500);
                        if subscribed && quiet && download.is_none() && !self.want_download && !self.reevaluate && self.settled() {
                            break Ok(());
                        }
                        if !subscribed && started.elapsed() > Duration::from_secs(30) {
                            break Err(Error::Mqtt("could not subscribe to the broker within 30s".into()));
                        }
                    }
                }
            }
        };
        if let Some(h) = download.take() {
            h.abort();
        }
        result
    }

    // ----- persistence and reporting -------------------------------------------------------

    fn save(&self) -> Result<()> {
        let bytes = serde_json::to_vec(&self.st)
            .map_err(|e| Error::Store(format!("serialise state: {e}")))?;
        self.deps.store.put(&self.slot.key, &bytes)
    }

    fn now(&self) -> Timestamp {
        self.deps.clock.now()
    }

    /// `max(local clock, newest verified issued_at)`: what expiry and activation are judged by.
    /// A product also takes the device's, the newest any of its products verified.
    fn trusted_now(&self) -> Timestamp {
        let own = self.now().max(self.st.trusted_now);
        match &self.scope {
            Scope::Sole { .. } => own,
            Scope::Product { hub } => own.max(hub.trusted_now()),
        }
    }

    /// A verified time moves this slot's trusted time (and the device's) forward.
    fn raise_trusted_now(&mut self, t: Timestamp) -> Result<()> {
        self.st.trusted_now = self.st.trusted_now.max(t);
        match &self.scope {
            Scope::Sole { .. } => Ok(()),
            Scope::Product { hub } => hub.raise_trusted_now(t),
        }
    }

    /// Run `f` with the trust root directives are verified against.
    fn with_trust<R>(&self, f: impl FnOnce(&TrustRoot) -> R) -> R {
        match &self.scope {
            Scope::Sole { trust, .. } => f(trust),
            Scope::Product { hub } => hub.with_trust(f),
        }
    }

    fn event(&mut self, rollout_id: Option<String>, release: Option<ReleaseRef>, kind: EventKind) {
        let id = match &mut self.scope {
            Scope::Sole { event_n, .. } => {
                *event_n += 1;
                format!("{}-{}-{}", self.cfg.device_id, self.st.boot, event_n)
            }
            Scope::Product { hub } => hub.next_event_id(),
        };
        let e = Event {
            id,
            device: self.cfg.device_id.clone(),
            at: self.trusted_now(),
            rollout_id,
            release,
            kind,
        };
        tracing::info!(event = e.kind.name(), id = %e.id, rollout_id = e.rollout_id.as_deref(), "event");
        self.outbox.queue(TAG_EVENT, &e.to_bytes());
    }

    fn job_event(&mut self, kind: EventKind) {
        let (r, t) = match &self.st.job {
            Some(j) => (Some(j.rollout_id.clone()), Some(j.target())),
            None => (self.st.rollout_id.clone(), self.st.target.clone()),
        };
        self.event(r, t, kind);
    }

    /// Give the next state report its sequence: above every earlier one, and at least the
    /// trusted time in milliseconds, so a device whose store was wiped still counts upwards
    /// (DESIGN.md "State report": the controller never takes an older `seq` for news).
    /// Persisted with the next [`Worker::save`]. Single-product agents only: the hub numbers
    /// a multi-product agent's reports.
    fn next_report_seq(&mut self) {
        let floor = u64::try_from(self.trusted_now().as_millisecond()).unwrap_or(0);
        self.st.report_seq = self.st.report_seq.saturating_add(1).max(floor);
    }

    /// Persist the state (with a new report sequence), then queue its report. A product's
    /// entry goes to the hub, which persists the device's sequence and queues the merged
    /// report.
    fn publish_state(&mut self) -> Result<()> {
        if let Scope::Product { hub } = &self.scope {
            self.save()?;
            return hub.publish(
                self.slot.product.as_deref().unwrap_or_default(),
                self.product_state(),
            );
        }
        self.next_report_seq();
        self.save()?;
        let report = build_report(&self.cfg, &self.st, self.trusted_now());
        let bytes = report.to_bytes();
        if let Err(e) = fsutil::write_atomic(&self.cfg.data_dir.join("status.json"), &bytes) {
            tracing::warn!(error = %e, "cannot write status.json");
        }
        if let Scope::Sole { status_tx, .. } = &self.scope {
            status_tx.send_replace(report);
        }
        self.outbox.queue(TAG_STATE, &bytes);
        Ok(())
    }

    /// Apply a step to the phase, persist, and publish the state report.
    fn step(&mut self, step: Step) -> Result<()> {
        let next = transition(step, self.st.phase).map_err(|d| Error::Store(d.to_string()))?;
        tracing::info!(
            from = self.st.phase.as_str(),
            to = next.as_str(),
            ?step,
            "phase"
        );
        self.st.phase = next;
        self.publish_state()
    }

    // ----- start-up -------------------------------------------------------------------------

    /// Resume from the persisted phase after a start (DESIGN.md: a crash at any point resumes
    /// from the persisted phase).
    async fn resume(&mut self) -> Result<()> {
        tracing::info!(
            phase = self.st.phase.as_str(),
            boot = self.st.boot,
            "starting"
        );
        // Before anything can install: what an interrupted install left (a half-unpacked
        // `releases/.staging-*`) is never used again, and nothing else would remove it.
        self.sweep_install_leftovers();
        match self.st.phase {
            Phase::Downloading | Phase::Verifying => {
                if self.st.phase == Phase::Verifying {
                    self.st.phase = transition(Step::DownloadFailed, Phase::Verifying)
                        .map_err(|d| Error::Store(d.to_string()))?;
                }
                if let Some(j) = self.st.job.as_mut() {
                    j.retry_at = None;
                }
                self.save()?;
            }
            Phase::Staged | Phase::Deferred => {
                // A deferral stays as persisted: its deadline counts from the first "not now".
                let ok = self.st.job.as_ref().is_some_and(|j| {
                    j.artifact.as_deref().is_some_and(|a| {
                        download::verify_file(
                            a,
                            &j.release.artifact.sha256,
                            j.release.artifact.size,
                        )
                    })
                });
                if !ok {
                    let _s = job_span!("stage", self).entered();
                    tracing::warn!("staged artifact missing or changed; downloading again");
                    self.step(Step::Start)?;
                    if let Some(j) = self.st.job.as_mut() {
                        j.artifact = None;
                        j.retry_at = None;
                    }
                    self.save()?;
                }
            }
            Phase::Installing | Phase::Probation => {
                // A restart while activating or on probation counts as a failed attempt.
                let limit = self
                    .st
                    .job
                    .as_ref()
                    .map(|j| j.release.health.restarts_to_revert)
                    .unwrap_or(1);
                let restarts = match self.st.job.as_mut() {
                    Some(j) => {
                        j.restarts += 1;
                        j.next_round_at = None;
                        j.restarts
                    }
                    None => limit,
                };
                self.save()?;
                if restarts >= limit {
                    self.revert(RevertCause {
                        reason: "too_many_restarts".into(),
                        check: None,
                        output: Some(format!(
                            "agent restarted {restarts} time(s) during {}",
                            self.st.phase.as_str()
                        )),
                    })
                    .await?;
                } else if self.st.phase == Phase::Installing {
                    self.activate().await?;
                }
            }
            Phase::Reverting => {
                let cause = self
                    .st
                    .job
                    .as_ref()
                    .and_then(|j| j.revert_cause.clone())
                    .unwrap_or(RevertCause {
                        reason: "interrupted_revert".into(),
                        check: None,
                        output: None,
                    });
                self.revert(cause).await?;
            }
            Phase::Idle | Phase::Committed | Phase::Reverted | Phase::Failed => {}
        }
        if transition(Step::Cancel, self.st.phase).is_ok() {
            // Work that has not activated is looked at against the kept directives again: a
            // directive may have been kept (it is persisted before it is acted on) by an
            // agent that died before it cancelled or replaced this work.
            self.reevaluate = true;
        }
        // Downloads of work dropped just before a crash.
        self.prune_artifacts();
        self.publish_state()
    }

    /// Ask the installer to remove what interrupted installs left; a failure is logged, not
    /// fatal (the leftovers take space, nothing uses them).
    fn sweep_install_leftovers(&self) {
        if let Err(e) = self.deps.installer.sweep() {
            tracing::warn!(error = %e, "removing leftovers of interrupted installs failed");
        }
    }

    // ----- inbound --------------------------------------------------------------------------

    async fn on_message(&mut self, topic: &str, payload: &[u8]) -> Result<()> {
        if payload.is_empty() {
            // An empty retained message is how MQTT deletes one: the controller clears a
            // device directive it has retired. Nothing to verify, nothing to report.
            tracing::debug!(%topic, "retained message cleared");
            return Ok(());
        }
        let mine = |p: &str| self.slot.product.as_deref() == Some(p);
        let source = match self.topics.parse(topic) {
            Ok(Topic::Trust) if self.slot.product.is_none() => return self.on_trust(payload),
            Ok(Topic::RingDirective(r)) if r == self.cfg.ring && self.slot.product.is_none() => {
                Some(Source::Ring)
            }
            Ok(Topic::DeviceDirective(d))
                if d == self.cfg.device_id && self.slot.product.is_none() =>
            {
                Some(Source::Device)
            }
            Ok(Topic::RingProductDirective { ring, product })
                if ring == self.cfg.ring && mine(&product) =>
            {
                Some(Source::Ring)
            }
            Ok(Topic::DeviceProductDirective { device, product })
                if device == self.cfg.device_id && mine(&product) =>
            {
                Some(Source::Device)
            }
            _ => None,
        };
        match source {
            Some(source) => self.on_directive(source, payload).await,
            None => {
                tracing::debug!(%topic, "message on a topic this agent does not act on");
                Ok(())
            }
        }
    }

    /// A trust root on the trust topic (single-product agent; the hub takes it for several).
    fn on_trust(&mut self, payload: &[u8]) -> Result<()> {
        let now = self.trusted_now();
        let skew = self.cfg.clock_skew.signed();
        let Scope::Sole { trust, .. } = &mut self.scope else {
            return Ok(());
        };
        if let Some(kind) = apply_trust(trust, &*self.deps.store, payload, now, skew)? {
            self.event(None, None, kind);
        }
        Ok(())
    }

    /// Verify a directive for this slot: signatures, target (the product too), sequence,
    /// expiry, then its release (the rollback floor, compatibility, the product's kinds).
    fn verify_directive(&self, source: Source, payload: &[u8]) -> Verdict {
        let me = DeviceIdentity {
            id: &self.cfg.device_id,
            fleet: &self.cfg.fleet,
            ring: &self.cfg.ring,
            class: &self.cfg.device_class,
            product: self.slot.product.as_deref(),
        };
        let trusted_now = self.trusted_now();
        self.with_trust(|trust| {
            let view = AgentView {
                trust,
                last_sequence: match source {
                    Source::Ring => self.st.last_seq_ring,
                    Source::Device => self.st.last_seq_device,
                },
                rollback_floor: self.st.rollback_floor,
                trusted_now,
                skew: self.cfg.clock_skew.signed(),
            };
            let verified = match verify_directive(&me, &view, source, payload) {
                Ok(v) => v,
                Err(rej) => return Verdict::Rejected(rej),
            };
            let release = match check_release(&me, &view, &verified) {
                Ok(release) => release,
                Err(rej) => return Verdict::Refused(Box::new(verified), rej),
            };
            if let (Some(r), Some(kinds)) = (&release, &self.slot.kinds) {
                if !kinds.contains(&r.install.kind) {
                    let rej = Rejection::new(
                        Reason::Incompatible,
                        format!(
                            "release {} {} installs as {}; product {} takes {}",
                            r.name,
                            r.version,
                            kind_name(r.install.kind),
                            self.slot.product.as_deref().unwrap_or_default(),
                            kinds
                                .iter()
                                .map(|k| kind_name(*k))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                    return Verdict::Refused(Box::new(verified), rej);
                }
            }
            Verdict::Accepted(Box::new(Accepted {
                directive: verified.directive,
                release,
                trusted_now: verified.trusted_now,
            }))
        })
    }

    async fn on_directive(&mut self, source: Source, payload: &[u8]) -> Result<()> {
        let digest = digest_hex(payload);
        let last_digest = match source {
            Source::Ring => &self.st.digests.ring_digest,
            Source::Device => &self.st.digests.device_digest,
        };
        if last_digest.as_deref() == Some(digest.as_str()) {
            // The retained copy of what we already accepted, seen again on reconnect.
            tracing::debug!(?source, "directive already accepted");
            return Ok(());
        }
        let acc = match self.verify_directive(source, payload) {
            Verdict::Accepted(acc) => *acc,
            Verdict::Refused(verified, rej) => return self.refuse(source, *verified, rej),
            Verdict::Rejected(rej) => {
                tracing::warn!(?source, reason = rej.reason.code(), detail = %rej.detail, "directive rejected");
                self.event(
                    None,
                    None,
                    EventKind::Rejected {
                        reason: rej.reason,
                        detail: rej.detail,
                    },
                );
                return Ok(());
            }
        };
        let d = acc.directive;
        let span = tracing::info_span!("directive", rollout_id = %d.rollout_id, ?source);
        // Entered only for the synchronous part; the await below is instrumented instead.
        let entered = span.enter();
        self.raise_trusted_now(acc.trusted_now)?;
        // A directive the device takes ends the refusal it reported before.
        let refusal_ended = self.st.refused.take().is_some();
        let kept = Kept {
            directive: d.clone(),
            release: acc.release.clone(),
        };
        match source {
            Source::Ring => {
                self.st.last_seq_ring = Some(d.sequence);
                self.st.digests.ring_digest = Some(digest);
                // A ring directive for a new rollout ends a device pin.
                if self.st.device.is_some()
                    && self.st.pin_ring_rollout.as_deref() != Some(d.rollout_id.as_str())
                    && self.st.ring.as_ref().map(|k| &k.directive.rollout_id) != Some(&d.rollout_id)
                {
                    tracing::info!("new ring rollout releases the device pin");
                    self.st.device = None;
                    self.st.pin_ring_rollout = None;
                }
                self.st.ring = Some(kept);
            }
            Source::Device => {
                self.st.last_seq_device = Some(d.sequence);
                self.st.digests.device_digest = Some(digest);
                if d.action == Action::Hold {
                    // A device hold releases the pin: the device follows its ring again.
                    self.st.device = None;
                    self.st.pin_ring_rollout = None;
                } else {
                    self.st.pin_ring_rollout = self
                        .st
                        .ring
                        .as_ref()
                        .map(|k| k.directive.rollout_id.clone());
                    self.st.device = Some(kept);
                }
            }
        }
        if refusal_ended {
            self.publish_state()?;
        } else {
            self.save()?;
        }
        let rel = acc.release.as_ref().map(release_ref);
        self.event(Some(d.rollout_id.clone()), rel, EventKind::Accepted);
        drop(entered);
        self.evaluate(Some(&d.rollout_id))
            .instrument(span.clone())
            .await
    }

    /// A directive the controller signed for this device whose release the device cannot
    /// take (`rollback_floor`, `incompatible`, an expired or badly signed release): like any
    /// rejection it changes nothing the device does (not even the sequence or trusted time),
    /// but the refusal becomes part of its reported state, so the controller counts the
    /// device as `refused` for that rollout instead of waiting for it.
    fn refuse(
        &mut self,
        source: Source,
        v: ringcast_proto::Verified,
        rej: ringcast_proto::Rejection,
    ) -> Result<()> {
        let d = v.directive;
        tracing::warn!(?source, rollout_id = %d.rollout_id, reason = rej.reason.code(), detail = %rej.detail, "directive refused");
        self.event(
            Some(d.rollout_id.clone()),
            None,
            EventKind::Rejected {
                reason: rej.reason,
                detail: rej.detail.clone(),
            },
        );
        let refusal = ringcast_proto::Refusal {
            rollout_id: d.rollout_id,
            reason: rej.reason,
            detail: rej.detail,
        };
        if self.st.refused.as_ref() == Some(&refusal) {
            return self.save();
        }
        self.st.refused = Some(refusal);
        self.publish_state()
    }

    /// Decide what the kept directives ask of this device now ([`plan`]) and do it. `cause`
    /// is the rollout of the directive just accepted: a cancel reports it (it is the reason
    /// the device stopped), even when the directive followed afterwards is another one (a
    /// device hold hands the device back to its ring).
    async fn evaluate(&mut self, cause: Option<&str>) -> Result<()> {
        let followed = match (&self.st.device, &self.st.ring) {
            (Some(d), _) => Some((d.clone(), Origin::Device)),
            (None, Some(r)) => Some((r.clone(), Origin::Ring)),
            (None, None) => None,
        };
        let ask = match &followed {
            None => Ask::Nothing,
            Some((k, origin)) => match (k.directive.action, &k.release) {
                // An `install` without a release is refused before it is kept; should one be
                // kept all the same, it asks for nothing, like a hold.
                (Action::Hold, _) | (Action::Install, None) => Ask::Hold,
                (Action::Install, Some(release)) => Ask::Install {
                    release,
                    // In the ramp, or in the ramp that may stage ahead of its step.
                    in_ramp: *origin == Origin::Device
                        || in_ramp(
                            &k.directive.rollout_id,
                            &self.cfg.device_id,
                            k.directive.stage_percent.unwrap_or(k.directive.percent),
                        ),
                },
            },
        };
        // Staged ahead of its step: the directive's ramp does not take the device in yet.
        let stage_only = followed.as_ref().is_some_and(|(k, origin)| {
            *origin == Origin::Ring
                && !in_ramp(
                    &k.directive.rollout_id,
                    &self.cfg.device_id,
                    k.directive.percent,
                )
        });
        let failed_before = match (&followed, ask) {
            (Some((k, _)), Ask::Install { release, .. }) => {
                self.st
                    .has_failed(&k.directive.rollout_id, release, k.directive.attempt)
            }
            _ => false,
        };
        let current = self.st.current.as_ref().map(|c| &c.release);
        let decided = plan(
            ask,
            self.st.job.as_ref(),
            self.st.phase,
            current,
            failed_before,
        );
        let rollout = cause
            .map(str::to_owned)
            .or_else(|| {
                followed
                    .as_ref()
                    .map(|(k, _)| k.directive.rollout_id.clone())
            })
            .or_else(|| self.st.rollout_id.clone());
        match decided {
            Plan::Nothing | Plan::Wait => {
                if let Ask::Install { in_ramp: false, .. } = ask {
                    tracing::debug!("not in the ramp yet");
                }
                Ok(())
            }
            Plan::NoteHold => {
                self.event(rollout, None, EventKind::Held);
                Ok(())
            }
            Plan::Cancel(reason) => self.cancel(rollout, reason),
            Plan::Update => {
                let Some((k, origin)) = followed else {
                    return Ok(());
                };
                // Same release: a re-signed or re-scheduled directive updates the job.
                if let Some(job) = self.st.job.as_mut() {
                    job.activation = k.directive.activation.clone();
                    job.rollout_id = k.directive.rollout_id.clone();
                    job.origin = origin;
                    job.stage_only = stage_only;
                }
                // Work under way belongs to the newest attempt: should it fail, it failed
                // at that one.
                self.st.attempt = k.directive.attempt;
                self.st.rollout_id = Some(k.directive.rollout_id);
                // A deferral counts per rollout and release: one for the rollout the job no
                // longer belongs to ends, and the hook is asked afresh.
                let stale = match (&self.st.deferral, &self.st.job) {
                    (Some(d), Some(j)) => !d.is_for(j),
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if stale {
                    self.st.deferral = None;
                    if self.st.phase == Phase::Deferred {
                        return self.step(Step::Restage);
                    }
                }
                self.save()
            }
            Plan::Start => {
                let Some((k, origin)) = followed else {
                    return Ok(());
                };
                let Some(release) = k.release else {
                    return Ok(());
                };
                let d = k.directive;
                let mut job = Job::new(d.rollout_id.clone(), origin, release, d.activation.clone());
                job.stage_only = stage_only;
                // The job it replaces is dropped in the same step, so no report ever names
                // the old target under the new rollout, or the reverse.
                let old = self.st.job.take();
                // Starting is the first line of the download step, under the new job's fields.
                step_span!("download", self.cfg, &job).in_scope(|| {
                    tracing::info!(attempt = d.attempt, "starting");
                    self.st.rollout_id = Some(job.rollout_id.clone());
                    self.st.attempt = d.attempt;
                    self.st.target = Some(job.target());
                    self.st.last_error = None;
                    self.st.job = Some(job);
                    self.st.deferral = None;
                    self.progress_mark = 0;
                    self.step(Step::Start)
                })?;
                if let Some(old) = old {
                    step_span!("cancel", self.cfg, &old).in_scope(|| {
                        tracing::info!(reason = CancelReason::Superseded.code(), "cancelled");
                    });
                    self.cancel_download = true;
                    self.remove_job_files(&old);
                    self.event(
                        Some(d.rollout_id),
                        Some(old.target()),
                        CancelReason::Superseded.event(),
                    );
                }
                self.want_download = true;
                Ok(())
            }
        }
    }

    /// Drop work that has not activated, for the directive of `rollout_id`: persisted and
    /// reported first (`idle`, no target, that rollout; `current` and `previous` untouched),
    /// then the download aborted (by the main loop) and the job's files removed.
    fn cancel(&mut self, rollout_id: Option<String>, reason: CancelReason) -> Result<()> {
        let job = self.st.job.take();
        let span = match &job {
            Some(j) => step_span!("cancel", self.cfg, j),
            None => tracing::Span::none(),
        };
        let _s = span.enter();
        tracing::info!(
            reason = reason.code(),
            "cancelling work that has not activated"
        );
        self.st.rollout_id = rollout_id.clone();
        self.st.target = None;
        // Whatever went wrong belonged to the dropped work, and so did a deferral.
        self.st.last_error = None;
        self.st.deferral = None;
        self.step(Step::Cancel)?;
        self.cancel_download = true;
        if let Some(j) = &job {
            self.remove_job_files(j);
        }
        let release = match reason {
            // `held` stays as it always was: the hold's rollout, no release.
            CancelReason::Held => None,
            _ => job.as_ref().map(Job::target),
        };
        self.event(rollout_id, release, reason.event());
        Ok(())
    }

    /// Remove a dropped or finished job's partial download and artifact, unless an installed
    /// release or the job now under way uses them.
    fn remove_job_files(&self, j: &Job) {
        let sha = &j.release.artifact.sha256;
        if self
            .st
            .job
            .as_ref()
            .is_some_and(|now| &now.release.artifact.sha256 == sha)
        {
            // The same bytes under another release: the new job keeps them.
            return;
        }
        let _ = fsutil::remove_file_if_exists(&self.part_path(sha));
        let art = self.artifact_path(sha);
        let in_use = [&self.st.current, &self.st.previous]
            .into_iter()
            .flatten()
            .any(|i| i.location == art);
        if !in_use {
            let _ = fsutil::remove_file_if_exists(&art);
        }
    }

    fn part_path(&self, sha: &str) -> PathBuf {
        // Same directory as the final file, so the rename after verification is atomic.
        self.slot.artifacts.join(format!("{sha}.part"))
    }

    fn artifact_path(&self, sha: &str) -> PathBuf {
        self.slot.artifacts.join(sha)
    }

    // ----- download -------------------------------------------------------------------------

    fn start_download(&mut self) -> Result<JoinHandle<Result<Complete>>> {
        let Some(job) = self.st.job.as_ref() else {
            return Err(Error::Download {
                code: "no_job",
                detail: "nothing to download".into(),
            });
        };
        let span = step_span!("download", self.cfg, job);
        let _s = span.enter();
        let a = &job.release.artifact;
        let url = download::resolve_url(&a.url, self.cfg.artifact_base_url.as_deref())?;
        let f = Fetch {
            url,
            sha256: a.sha256.clone(),
            size: a.size,
            part: self.part_path(&a.sha256),
            stall: self.cfg.download.stall_timeout.get(),
        };
        tracing::info!(url = %f.url, size = f.size, attempt = job.attempts + 1, "downloading");
        let (tx, rx) = watch::channel(0u64);
        self.progress = Some(rx);
        let client = self.http.clone();
        let task = async move { download::fetch(&client, &f, &tx).await };
        Ok(tokio::spawn(task.instrument(span.clone())))
    }

    fn download_failed(&mut self, e: Error) -> Result<()> {
        if self.st.phase != Phase::Downloading && self.st.phase != Phase::Verifying {
            return Ok(());
        }
        let (initial, max) = (
            self.cfg.download.retry_initial.get(),
            self.cfg.download.retry_max.get(),
        );
        let now = self.now();
        let Some(job) = self.st.job.as_mut() else {
            return Ok(());
        };
        job.attempts += 1;
        let delay = transport::backoff(initial, max, job.attempts);
        job.retry_at = now
            .checked_add(SignedDuration::try_from(delay).unwrap_or_default())
            .ok();
        let code = e.code();
        tracing::warn!(code, error = %e, retry_in = ?delay, "download failed");
        self.st.last_error = Some(ErrorInfo {
            reason: code.to_owned(),
            detail: e.to_string(),
        });
        self.job_event(EventKind::DownloadFailed {
            reason: code.to_owned(),
            detail: e.to_string(),
            retry_in_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        });
        self.step(Step::DownloadFailed)
    }

    async fn on_body_complete(&mut self, c: Complete) -> Result<()> {
        if self.st.phase != Phase::Downloading {
            return Ok(());
        }
        let Some(job) = self.st.job.clone() else {
            return Ok(());
        };
        if c.sha256 != job.release.artifact.sha256 {
            // Bytes for a job that was replaced meanwhile: never stage them for this one.
            return Ok(());
        }
        let span = step_span!("verify", self.cfg, &job);
        if !self.verify(c, &job).instrument(span).await? {
            return Ok(());
        }
        step_span!("stage", self.cfg, &job).in_scope(|| {
            self.step(Step::Verified)?;
            self.job_event(EventKind::Staged);
            Ok::<_, Error>(())
        })?;
        self.drive().await
    }

    /// Check the complete body's size and digest and move it to its final name. `false` when
    /// it failed (already handled as a failed download attempt).
    async fn verify(&mut self, c: Complete, job: &Job) -> Result<bool> {
        self.step(Step::BodyComplete)?;
        let dest = self.artifact_path(&job.release.artifact.sha256);
        let d2 = dest.clone();
        // The blocking thread is outside this future's span; carry it over.
        let span = tracing::Span::current();
        let res = tokio::task::spawn_blocking(move || span.in_scope(|| download::finish(c, &d2)))
            .await
            .unwrap_or_else(|e| {
                Err(Error::Download {
                    code: "verify_panicked",
                    detail: e.to_string(),
                })
            });
        if let Err(e) = res {
            self.download_failed(e)?;
            return Ok(false);
        }
        if let Some(j) = self.st.job.as_mut() {
            j.artifact = Some(dest);
            j.attempts = 0;
        }
        let total = job.release.artifact.size;
        if self.progress_mark < total {
            self.progress_mark = total;
            self.job_event(EventKind::Downloading {
                received: total,
                total,
            });
        }
        self.st.last_error = None;
        self.job_event(EventKind::Downloaded);
        Ok(true)
    }

    // ----- the clock-driven part ------------------------------------------------------------

    async fn drive(&mut self) -> Result<()> {
        match self.st.phase {
            Phase::Downloading => {
                job_span!("download", self).in_scope(|| self.report_progress());
                let due = self
                    .st
                    .job
                    .as_ref()
                    .is_some_and(|j| j.retry_at.is_none_or(|t| self.now() >= t));
                if due && self.progress.is_none() {
                    self.want_download = true;
                }
                Ok(())
            }
            Phase::Staged | Phase::Deferred => {
                if !self.activation_allowed() {
                    if self.st.phase == Phase::Deferred {
                        return job_span!("defer", self).in_scope(|| self.restage());
                    }
                    return Ok(());
                }
                let span = job_span!("defer", self);
                if self.may_activate().instrument(span).await? {
                    self.activate().await
                } else {
                    Ok(())
                }
            }
            Phase::Probation => self.probation().await,
            _ => Ok(()),
        }
    }

    fn report_progress(&mut self) {
        let Some(rx) = &self.progress else { return };
        let got = *rx.borrow();
        let total = self
            .st
            .job
            .as_ref()
            .map(|j| j.release.artifact.size)
            .unwrap_or(0);
        let step = (total / 4).max(1);
        if got >= self.progress_mark + step || (got == total && got > self.progress_mark) {
            self.progress_mark = got;
            self.job_event(EventKind::Downloading {
                received: got,
                total,
            });
        }
    }

    fn activation_allowed(&self) -> bool {
        let Some(job) = &self.st.job else {
            return false;
        };
        let now = self.trusted_now();
        let directive_ok = job
            .activation
            .allows(now, &self.cfg.timezone)
            .unwrap_or(false);
        let open = |windows: &[Window]| {
            Schedule::new(windows.to_vec(), &self.cfg.timezone)
                .map(|s| s.is_open(now))
                .unwrap_or(false)
        };
        // A product's own windows apply in addition to the device's; a job staged ahead of
        // its ramp step waits for a directive that takes the device in.
        !job.stage_only && directive_ok && open(&self.cfg.windows) && open(&self.slot.windows)
    }

    fn settled(&self) -> bool {
        match self.st.phase {
            Phase::Idle | Phase::Committed | Phase::Reverted | Phase::Failed => true,
            Phase::Staged | Phase::Deferred => !self.activation_allowed() || self.defer_waits(),
            _ => !is_busy(self.st.phase),
        }
    }

    // ----- deferral -------------------------------------------------------------------------

    /// Whether the defer hook lets the staged release be activated now (docs/operations.md
    /// "Deferring updates"): no hook, a go, a broken hook or a passed deadline let it; a "not
    /// now" defers it until the next ask.
    async fn may_activate(&mut self) -> Result<bool> {
        let Some(hook) = self.slot.defer.clone() else {
            return Ok(true);
        };
        let Some(job) = self.st.job.clone() else {
            return Ok(false);
        };
        let asked_at = self.trusted_now();
        let deadline = match defer::due(self.st.deferral.as_ref(), &job, asked_at, &hook) {
            Due::Wait => return Ok(false),
            Due::DeadlinePassed => {
                let until = self.st.deferral.as_ref().map(|d| d.until);
                tracing::info!(until = ?until, "deferral deadline passed; activating without asking");
                return Ok(true);
            }
            Due::Ask { deadline } => deadline,
        };
        let tail = self.cfg.health.output_tail;
        let outcome = defer::ask(&hook, &job, deadline, job.artifact.as_deref(), tail).await;
        match defer::answer(&outcome) {
            Answer::Go => {
                tracing::info!("defer hook: go ahead");
                Ok(true)
            }
            Answer::Broken(detail) => {
                // A broken hook must never block updates: go ahead, and say so.
                tracing::warn!(%detail, "defer hook failed; activating anyway");
                self.job_event(EventKind::DeferHookFailed { detail });
                Ok(true)
            }
            Answer::NotNow(reason) => {
                self.defer(&job, reason, &hook, asked_at)?;
                Ok(false)
            }
        }
    }

    /// Record the "not now" of the hook asked at `asked_at`: a new deferral (phase
    /// `deferred`, a `deferred` event; its deadline the one the hook was told), or the next
    /// ask of the one standing, its deadline kept (a fresh report, and an event only when the
    /// reason changed).
    fn defer(
        &mut self,
        job: &Job,
        reason: String,
        hook: &DeferConfig,
        asked_at: Timestamp,
    ) -> Result<()> {
        let prev = self.st.deferral.take().filter(|d| d.is_for(job));
        let d = defer::not_now(prev.as_ref(), job, asked_at, reason, hook);
        let news =
            self.st.phase != Phase::Deferred || prev.as_ref().is_none_or(|p| p.reason != d.reason);
        tracing::info!(reason = %d.reason, until = %d.until, retry_at = %d.retry_at, "deferred by the defer hook");
        let event = EventKind::Deferred {
            reason: d.reason.clone(),
            until: d.until,
        };
        self.st.deferral = Some(d);
        if news {
            self.job_event(event);
        }
        if self.st.phase == Phase::Deferred {
            // Every ask is reported: the controller sees the device alive while it defers.
            self.publish_state()
        } else {
            self.step(Step::Defer)
        }
    }

    /// Deferred, but activation is no longer allowed (a window closed): wait for it
    /// `staged` again, the deferral's deadline kept, and ask as soon as activation may be.
    fn restage(&mut self) -> Result<()> {
        let now = self.trusted_now();
        if let Some(d) = self.st.deferral.as_mut() {
            d.retry_at = d.retry_at.min(now);
        }
        tracing::info!("activation no longer allowed while deferred; waiting staged");
        self.step(Step::Restage)
    }

    /// Whether a defer hook stands in the way of activation until its next ask.
    fn defer_waits(&self) -> bool {
        match (&self.slot.defer, &self.st.job) {
            (Some(hook), Some(job)) => {
                defer::due(self.st.deferral.as_ref(), job, self.trusted_now(), hook) == Due::Wait
            }
            _ => false,
        }
    }

    // ----- activation -----------------------------------------------------------------------

    /// Staged → Installing → Probation (or Failed when nothing changed). Also re-entered after
    /// a restart in Installing; every step is repeatable.
    async fn activate(&mut self) -> Result<()> {
        let span = job_span!("activate", self);
        if let Some(cause) = self.activate_steps().instrument(span).await? {
            // In its own span, not inside `activate`: a revert is a step of its own.
            self.revert(cause).await?;
        }
        Ok(())
    }

    /// The work of [`Agent::activate`]; a cause when `post_activate` failed often enough to
    /// revert.
    async fn activate_steps(&mut self) -> Result<Option<RevertCause>> {
        if matches!(self.st.phase, Phase::Staged | Phase::Deferred) {
            let (cur, prev) = (self.st.current.clone(), self.st.previous.clone());
            if let Some(j) = self.st.job.as_mut() {
                j.before_current = cur;
                j.before_previous = prev;
            }
            // The deferral, if any, is over: the release is being activated.
            self.st.deferral = None;
            self.step(Step::Activate)?;
        }
        let Some(job) = self.st.job.clone() else {
            return Ok(None);
        };
        let artifact = job
            .artifact
            .clone()
            .unwrap_or_else(|| self.artifact_path(&job.release.artifact.sha256));
        let tail = self.cfg.health.output_tail;
        let timeout = self.cfg.install.command_timeout.get();
        let planned_dir = self
            .slot
            .install_root
            .join("releases")
            .join(job.release.version.to_string());
        if let Some(pre) = &job.release.install.pre_activate {
            let s = Subst {
                release_dir: Some(&planned_dir),
                artifact: Some(&artifact),
            };
            let o = cmd::run(pre, &s, timeout, tail).await;
            if !o.ok {
                self.install_failed("pre_activate_failed", format!("{}: {}", o.status, o.tail))?;
                return Ok(None);
            }
        }
        let installed = match self.deps.installer.install(&job.release, &artifact).await {
            Ok(i) => i,
            Err(e) => {
                self.install_failed(e.code(), e.to_string())?;
                return Ok(None);
            }
        };
        let now = self.now();
        let release_dir = installed.release_dir.clone();
        self.st.previous = job.before_current.clone();
        self.st.current = Some(installed);
        let interval = job.release.health.interval.signed();
        if let Some(j) = self.st.job.as_mut() {
            j.probation_started = Some(now);
            j.next_round_at = now.checked_add(interval).ok();
        }
        self.job_event(EventKind::Installed);
        self.step(Step::Activated)?;
        if let Some(post) = &job.release.install.post_activate {
            let s = Subst {
                release_dir: Some(&release_dir),
                artifact: Some(&artifact),
            };
            let o = cmd::run(post, &s, timeout, tail).await;
            if !o.ok {
                return self.round_failed(
                    health::Failure {
                        check: "post_activate".into(),
                        output: format!("{}\n{}", o.status, o.tail),
                    },
                    "post_activate_failed",
                );
            }
        }
        Ok(None)
    }

    fn install_failed(&mut self, code: &str, detail: String) -> Result<()> {
        tracing::warn!(code, %detail, "install failed; nothing changed");
        let Some(job) = self.st.job.take() else {
            return Ok(());
        };
        self.remove_job_files(&job);
        let target = job.target();
        self.st.remember_failure(&job.rollout_id, &target);
        self.st.last_error = Some(ErrorInfo {
            reason: code.to_owned(),
            detail: detail.clone(),
        });
        self.event(
            Some(job.rollout_id.clone()),
            Some(target),
            EventKind::InstallFailed {
                reason: code.to_owned(),
                detail,
            },
        );
        self.step(Step::InstallFailed)
    }

    // ----- probation ------------------------------------------------------------------------

    /// One probation round when due; then commit or revert, each in its own span.
    async fn probation(&mut self) -> Result<()> {
        let span = job_span!("probation", self);
        match self.probation_round().instrument(span).await? {
            RoundOutcome::Continue => Ok(()),
            RoundOutcome::Commit => self.commit(),
            RoundOutcome::Revert(cause) => self.revert(cause).await,
        }
    }

    async fn probation_round(&mut self) -> Result<RoundOutcome> {
        let Some(job) = self.st.job.clone() else {
            return Ok(RoundOutcome::Continue);
        };
        let now = self.now();
        let h = &job.release.health;
        let started = job.probation_started.unwrap_or(now);
        let over = now >= started.checked_add(h.probation.signed()).unwrap_or(started);
        let round_due = job.next_round_at.is_none_or(|t| now >= t);
        if !round_due && !over {
            return Ok(RoundOutcome::Continue);
        }
        let release_dir = self
            .st
            .current
            .as_ref()
            .map(|c| c.release_dir.clone())
            .unwrap_or_default();
        let artifact = job.artifact.clone();
        let failure = health::round(
            &h.checks,
            &release_dir,
            artifact.as_deref(),
            &self.http,
            self.cfg.health.output_tail,
        )
        .await;
        let after = self.now();
        if let Some(f) = failure {
            return Ok(match self.round_failed(f, "health_check_failed")? {
                Some(cause) => RoundOutcome::Revert(cause),
                None => RoundOutcome::Continue,
            });
        }
        let mut rounds_ok = 0;
        if let Some(j) = self.st.job.as_mut() {
            j.rounds_ok += 1;
            rounds_ok = j.rounds_ok;
            j.next_round_at = after.checked_add(h.interval.signed()).ok();
        }
        tracing::info!(rounds_ok, "health round passed");
        if over {
            return Ok(RoundOutcome::Commit);
        }
        self.save()?;
        self.job_event(EventKind::Healthy);
        Ok(RoundOutcome::Continue)
    }

    /// Count a failed round; the revert cause once there were enough of them.
    fn round_failed(&mut self, f: health::Failure, reason: &str) -> Result<Option<RevertCause>> {
        let now = self.now();
        let Some(j) = self.st.job.as_mut() else {
            return Ok(None);
        };
        j.failures += 1;
        j.next_round_at = now.checked_add(j.release.health.interval.signed()).ok();
        let (failures, limit) = (j.failures, j.release.health.failures_to_revert);
        tracing::warn!(check = %f.check, failures, limit, "health round failed");
        self.st.last_error = Some(ErrorInfo {
            reason: reason.to_owned(),
            detail: format!("{}: {}", f.check, f.output),
        });
        if failures >= limit {
            self.save()?;
            return Ok(Some(RevertCause {
                reason: reason.to_owned(),
                check: Some(f.check),
                output: Some(f.output),
            }));
        }
        self.publish_state()?;
        Ok(None)
    }

    fn commit(&mut self) -> Result<()> {
        let Some(job) = self.st.job.take() else {
            return Ok(());
        };
        let _s = step_span!("commit", self.cfg, &job).entered();
        tracing::info!("probation passed; committing");
        // Raise the floor only now: until commit the device may still go back (DESIGN.md
        // "highest rollback_floor it has installed").
        self.st.rollback_floor = self.st.rollback_floor.max(job.release.rollback_floor);
        self.st.last_error = None;
        self.st.rollout_id = Some(job.rollout_id.clone());
        self.st.target = Some(job.target());
        self.event(
            Some(job.rollout_id.clone()),
            Some(job.target()),
            EventKind::Committed,
        );
        self.step(Step::ProbationPassed)?;
        let keep: Vec<_> = [&self.st.current, &self.st.previous]
            .into_iter()
            .flatten()
            .collect();
        if let Err(e) = self.deps.installer.prune(&keep) {
            tracing::warn!(error = %e, "pruning old releases failed");
        }
        self.prune_artifacts();
        self.reevaluate = true;
        Ok(())
    }

    /// Remove downloaded artifacts and partial downloads that neither an installed release
    /// nor the job under way refers to (left by a cancel, or by a crash before one finished).
    fn prune_artifacts(&self) {
        let Ok(rd) = std::fs::read_dir(&self.slot.artifacts) else {
            return;
        };
        let keep: Vec<PathBuf> = [&self.st.current, &self.st.previous]
            .into_iter()
            .flatten()
            .map(|i| i.location.clone())
            .chain(self.st.job.iter().flat_map(|j| {
                let sha = &j.release.artifact.sha256;
                [self.part_path(sha), self.artifact_path(sha)]
                    .into_iter()
                    .chain(j.artifact.clone())
            }))
            .collect();
        for e in rd.flatten() {
            if !keep.contains(&e.path()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    // ----- revert ---------------------------------------------------------------------------

    /// Go back to the release that ran before, locally: no controller, no network.
    async fn revert(&mut self, cause: RevertCause) -> Result<()> {
        let span = job_span!("revert", self);
        if self.revert_steps(cause).instrument(span).await? {
            // The kept directives are looked at again from the main loop.
            self.reevaluate = true;
        }
        Ok(())
    }

    /// The work of [`Agent::revert`]; `true` when a job was reverted.
    async fn revert_steps(&mut self, cause: RevertCause) -> Result<bool> {
        if let Some(j) = self.st.job.as_mut() {
            j.revert_cause = Some(cause.clone());
        }
        if self.st.phase != Phase::Reverting {
            self.st.last_error = Some(ErrorInfo {
                reason: cause.reason.clone(),
                detail: cause.output.clone().unwrap_or_default(),
            });
            self.step(Step::Revert)?;
        }
        let Some(job) = self.st.job.clone() else {
            return Ok(false);
        };
        tracing::warn!(reason = %cause.reason, check = ?cause.check, "reverting");
        let mut detail = cause.output.clone().unwrap_or_default();
        if let Err(e) = self
            .deps
            .installer
            .revert(&job.release, job.before_current.as_ref())
            .await
        {
            // Nothing better to do than say so: the previous state is restored as far as the
            // installer could.
            tracing::error!(error = %e, "revert step failed");
            detail = format!("{detail}\nrevert: {e}");
        }
        // An install interrupted before this revert may have left a half-unpacked release.
        self.sweep_install_leftovers();
        self.st.current = job.before_current.clone();
        self.st.previous = job.before_previous.clone();
        self.st.job = None;
        self.remove_job_files(&job);
        let target = job.target();
        self.st.remember_failure(&job.rollout_id, &target);
        self.st.rollout_id = Some(job.rollout_id.clone());
        self.st.target = Some(target.clone());
        self.st.last_error = Some(ErrorInfo {
            reason: cause.reason.clone(),
            detail,
        });
        self.event(
            Some(job.rollout_id.clone()),
            Some(target),
            EventKind::Reverted {
                reason: cause.reason,
                check: cause.check,
                output: cause.output,
            },
        );
        self.step(Step::RevertDone)?;
        Ok(true)
    }
}

/// The state report for `st`.
fn build_report(cfg: &AgentConfig, st: &Persisted, now: Timestamp) -> StateReport {
    // The release fields are a product entry's, at the top (while deferred, the error slot
    // says why and until when: reason code `deferred`).
    let p = product_state(st, &[]);
    StateReport {
        device: cfg.device_id.clone(),
        seq: st.report_seq,
        ring: cfg.ring.clone(),
        device_class: cfg.device_class.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        current: p.current,
        previous: p.previous,
        target: p.target,
        phase: p.phase,
        rollout_id: p.rollout_id,
        last_error: p.last_error,
        refused: p.refused,
        windows: cfg.windows.clone(),
        timezone: cfg.timezone.clone(),
        updated_at: now,
        attempt: p.attempt,
        products: Default::default(),
    }
}

/// One product's entry in a multi-product report: what [`build_report`] says at its top level,
/// for this product alone, with the product's own windows.
pub(crate) fn product_state(st: &Persisted, windows: &[Window]) -> ProductState {
    ProductState {
        current: st.current.as_ref().map(|i| i.release.clone()),
        previous: st.previous.as_ref().map(|i| i.release.clone()),
        target: st
            .job
            .as_ref()
            .map(|j| j.target())
            .or_else(|| st.target.clone()),
        phase: st.phase,
        rollout_id: st
            .job
            .as_ref()
            .map(|j| j.rollout_id.clone())
            .or_else(|| st.rollout_id.clone()),
        last_error: match (st.phase, &st.deferral) {
            (Phase::Deferred, Some(d)) => Some(d.error_info()),
            _ => st.last_error.clone(),
        },
        refused: st.refused.clone(),
        attempt: st.attempt,
        windows: windows.to_vec(),
    }
}

/// The report a multi-product agent's products are merged into: the device's fields, and
/// none of those that describe one release (they are per product, in `products`).
pub(crate) fn device_report(
    cfg: &AgentConfig,
    seq: u64,
    now: Timestamp,
    products: BTreeMap<String, ProductState>,
) -> StateReport {
    StateReport {
        device: cfg.device_id.clone(),
        seq,
        ring: cfg.ring.clone(),
        device_class: cfg.device_class.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        current: None,
        previous: None,
        target: None,
        phase: Phase::Idle,
        rollout_id: None,
        last_error: None,
        refused: None,
        windows: cfg.windows.clone(),
        timezone: cfg.timezone.clone(),
        updated_at: now,
        attempt: 1,
        products,
    }
}

/// A report to start a status channel with, replaced before anyone reads it.
fn placeholder_report(cfg: &AgentConfig) -> StateReport {
    device_report(cfg, 0, Timestamp::UNIX_EPOCH, BTreeMap::new())
}

/// An install kind as configs and releases spell it.
fn kind_name(k: InstallKind) -> &'static str {
    match k {
        InstallKind::Bundle => "bundle",
        InstallKind::File => "file",
        InstallKind::Command => "command",
    }
}

/// Which queued messages to drop first when the report queue is full, most expendable first:
/// state reports superseded by a newer one still queued (the retained topic keeps only the
/// last anyway), then `downloading` progress events, then everything else oldest first — so
/// lifecycle events such as `reverted` and its evidence are the last to go.
fn eviction_order(queued: &[(u64, Vec<u8>)]) -> Vec<u64> {
    let newest_state = queued
        .iter()
        .filter(|(_, m)| m.first() == Some(&TAG_STATE))
        .map(|(seq, _)| *seq)
        .max();
    let rank = |(seq, m): &(u64, Vec<u8>)| -> u8 {
        match m.first() {
            Some(&TAG_STATE) if Some(*seq) != newest_state => 0,
            Some(&TAG_EVENT) => match Event::parse(&m[1..]) {
                Ok(Event {
                    kind: EventKind::Downloading { .. },
                    ..
                }) => 1,
                _ => 2,
            },
            _ => 2,
        }
    };
    let mut order: Vec<(u8, u64)> = queued.iter().map(|q| (rank(q), q.0)).collect();
    order.sort_unstable();
    order.into_iter().map(|(_, seq)| seq).collect()
}

#[cfg(test)]
mod eviction_tests {
    use super::*;
    use ringcast_proto::{Event, EventKind};

    #[test]
    fn full_queue_drops_superseded_state_and_progress_before_lifecycle_events() {
        let ev = |id: &str, kind: EventKind| {
            let e = Event {
                id: id.into(),
                device: "d".into(),
                at: ringcast_proto::testkit::now(),
                rollout_id: None,
                release: None,
                kind,
            };
            let mut m = vec![TAG_EVENT];
            m.extend(e.to_bytes());
            m
        };
        let state = |b: u8| vec![TAG_STATE, b'{', b];
        let q = vec![
            (1, ev("a", EventKind::Accepted)),
            (2, state(1)),
            (
                3,
                ev(
                    "b",
                    EventKind::Downloading {
                        received: 1,
                        total: 2,
                    },
                ),
            ),
            (
                4,
                ev(
                    "c",
                    EventKind::Reverted {
                        reason: "health_check_failed".into(),
                        check: None,
                        output: None,
                    },
                ),
            ),
            (5, state(2)),
        ];
        // Superseded state first, then progress, then the rest oldest first.
        assert_eq!(eviction_order(&q), vec![2, 3, 1, 4, 5]);
    }
}
