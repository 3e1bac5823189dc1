//! Behaviour tests of the decision core: [`Core`] driven directly, with a fake clock (plain
//! [`Timestamp`]s the harness advances), an in-memory device table and event history, and
//! real ed25519 keys (the proto test kit's fixture) so every published directive is checked
//! against the trust root. No I/O: each test runs in milliseconds.
//!
//! [`Harness`] keeps the tests short: it owns the core, the clock and the fleet, records
//! every effect the core returns, and turns the common moves into one call (`submit`,
//! `tick`, `report`, `approve`, `checks_done`, `restart`).

mod approvals;
mod bakes;
mod checks;
mod forecast;
mod gates;
mod halts;
mod launch;
mod new_release;
mod operator;
mod products;
mod restarts;
mod retries;
mod submit;
mod windows;

use super::core::{Core, CoreConfig};
use super::effects::{Changes, Decided, Effect, Input, Reply};
use super::fleet::{EventLookup, Fleet};
use super::{Actor, EngineState, RolloutAction, Submit};
use crate::config::{Gate, OnFailure, Policy, Promotion, RingPolicy};
use crate::error::Result;
use crate::model::{DeviceRecord, Rollout, RolloutState, Stage, Tally};
use jiff::{SignedDuration, Timestamp};
use ringcast_proto::report::ProductState;
use ringcast_proto::testkit::{self, Fixture};
use ringcast_proto::{
    in_ramp, Directive, Dur, Envelope, Event, Percent, Phase, Reason, Refusal, Release, ReleaseRef,
    Role, StateReport, Topics, DIRECTIVE_TYPE,
};
use std::collections::{BTreeMap, HashMap};

/// Name of every release the tests submit.
pub(super) const APP: &str = "app";
/// The device class of the fleet (the test kit's releases are for it).
pub(super) const CLASS: &str = "sensor-v2";

pub(super) fn mins(n: i64) -> SignedDuration {
    SignedDuration::from_mins(n)
}

pub(super) fn hours(n: i64) -> SignedDuration {
    SignedDuration::from_hours(n)
}

pub(super) fn ts(s: &str) -> Timestamp {
    s.parse().expect("a test timestamp")
}

pub(super) fn pct(v: f64) -> Percent {
    Percent::from_f64(v).expect("a test percent")
}

/// A ring with one 100 % step, a 1 h bake, gate `min_reports` 2 at 20 %, automatic,
/// always open, `halt` on failure, no checks, a 5 min check retry, 3 attempts, a 24 h step
/// timeout.
pub(super) fn ring(name: &str) -> RingPolicy {
    RingPolicy {
        name: name.into(),
        steps: vec![Percent::FULL],
        bake: Dur::secs(3600),
        gate: Gate {
            min_reports: 2,
            max_failure_rate: 0.2,
        },
        promotion: Promotion::Auto,
        windows: vec![],
        timezone: "UTC".into(),
        on_failure: OnFailure::Halt,
        checks: vec![],
        check_retry: Dur::secs(300),
        check_attempts: 3,
        step_timeout_setting: None,
        retries: 0,
        retry_backoff: Dur::secs(600),
    }
}

/// A policy for the test kit's fleet with `rings` in order.
pub(super) fn policy(rings: Vec<RingPolicy>) -> Policy {
    Policy {
        fleet: testkit::FLEET.into(),
        topic_prefix: None,
        tick: Dur(std::time::Duration::from_millis(200)),
        directive_ttl: Dur::secs(3600),
        unresponsive_after: Dur::secs(15 * 60),
        allowed_skew: Dur::secs(300),
        on_new_release: None,
        rings,
    }
}

/// A release of [`APP`] with `sequence` (rollback floor 1), for [`CLASS`].
pub(super) fn release(sequence: u64) -> Release {
    testkit::sample_release(APP, sequence, 1)
}

/// The release as state reports name it.
fn release_ref(name: &str, sequence: u64) -> ReleaseRef {
    ReleaseRef {
        name: name.into(),
        version: format!("1.{sequence}.0"),
        sequence,
    }
}

/// The devices' event history, in memory.
#[derive(Debug, Default)]
pub(super) struct MemEvents(BTreeMap<String, Vec<Event>>);

impl EventLookup for MemEvents {
    fn newest(&self, device: &str, matches: &dyn Fn(&Event) -> bool) -> Option<Event> {
        self.0
            .get(device)?
            .iter()
            .rev()
            .find(|e| matches(e))
            .cloned()
    }
}

/// One `handle` call's outcome, kept for assertions on what it changed.
#[derive(Debug, Default)]
pub(super) struct Last {
    pub(super) effects: Vec<Effect>,
    pub(super) changes: Changes,
}

impl Last {
    /// Whether the actor would write nothing: no changed record, no audit entry.
    pub(super) fn persists_nothing(&self) -> bool {
        self.changes.is_empty() && !self.effects.iter().any(|e| matches!(e, Effect::Audit(_)))
    }
}

/// The core, a fake clock, an in-memory fleet, and every effect decided so far.
pub(super) struct Harness {
    pub(super) fx: Fixture,
    cfg: CoreConfig,
    core: Core,
    /// The fake clock.
    pub(super) now: Timestamp,
    devices: HashMap<String, DeviceRecord>,
    pub(super) events: MemEvents,
    /// Every effect, in order, since the harness was built.
    pub(super) effects: Vec<Effect>,
    /// The last input's effects and changes.
    pub(super) last: Last,
    /// The rollout `report` reports for: the last one submitted.
    pub(super) rollout: String,
    report_seq: u64,
    /// Whether the device table holds the whole fleet (false: a restart still re-reading).
    pub(super) fleet_complete: bool,
}

impl Harness {
    /// A core over an empty state with `policy`, at the test kit's "now".
    pub(super) fn new(policy: Policy) -> Harness {
        Harness::at(policy, testkit::now())
    }

    /// A core over an empty state with `policy`, at `now`.
    pub(super) fn at(policy: Policy, now: Timestamp) -> Harness {
        policy.validate("test policy").expect("a valid test policy");
        let fx = Fixture::new();
        let cfg = CoreConfig {
            topics: policy.topics().expect("topics"),
            policy,
            key: fx.controller.clone(),
            trust: fx.trust.clone(),
            trust_envelope: fx.trust_env.to_vec(),
        };
        Harness {
            core: Core::new(cfg.clone(), EngineState::default()),
            cfg,
            fx,
            now,
            devices: HashMap::new(),
            events: MemEvents::default(),
            effects: Vec::new(),
            last: Last::default(),
            rollout: String::new(),
            report_seq: 0,
            fleet_complete: true,
        }
    }

    fn unresponsive_after(&self) -> SignedDuration {
        self.cfg.policy.unresponsive_after.signed()
    }

    /// Decide `input` at the harness's clock; keep its effects.
    pub(super) fn handle(&mut self, input: Input) -> Result<Reply> {
        let fleet = Fleet::new(&self.devices, &self.events, self.unresponsive_after())
            .complete(self.fleet_complete);
        let Decided {
            effects,
            changes,
            reply,
        } = self.core.handle(input, self.now, &fleet);
        self.effects.extend(effects.iter().cloned());
        self.last = Last { effects, changes };
        reply
    }

    // ----- the fleet --------------------------------------------------------------------------

    /// Add `n` idle devices `{ring}-{i}` to `ring`; their ids.
    pub(super) fn devices(&mut self, ring: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let id = format!("{ring}-{i}");
                self.put(&id, ring, Phase::Idle, None, None, None);
                id
            })
            .collect()
    }

    /// The ids of `ring`'s devices, sorted.
    pub(super) fn ring_devices(&self, ring: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .devices
            .values()
            .filter(|d| d.report.as_ref().is_some_and(|r| r.ring == ring))
            .map(|d| d.id.clone())
            .collect();
        v.sort();
        v
    }

    fn put(
        &mut self,
        device: &str,
        ring: &str,
        phase: Phase,
        rollout: Option<(&str, u64)>,
        refused: Option<Refusal>,
        current: Option<ReleaseRef>,
    ) {
        self.report_seq += 1;
        let report = StateReport {
            device: device.into(),
            seq: self.report_seq,
            ring: ring.into(),
            device_class: CLASS.into(),
            agent_version: "test".into(),
            current,
            previous: None,
            target: rollout.map(|(_, seq)| release_ref(APP, seq)),
            phase,
            rollout_id: rollout.map(|(id, _)| id.to_owned()),
            last_error: None,
            refused,
            windows: vec![],
            timezone: "UTC".into(),
            updated_at: self.now,
            attempt: 1,
            products: Default::default(),
        };
        self.devices.insert(
            device.into(),
            DeviceRecord {
                id: device.into(),
                report: Some(report),
                last_seen: self.now,
                online: Some(true),
                last_event: None,
            },
        );
    }

    fn device_ring(&self, device: &str) -> String {
        self.devices
            .get(device)
            .and_then(|d| d.report.as_ref())
            .map(|r| r.ring.clone())
            .unwrap_or_else(|| panic!("unknown device {device}"))
    }

    /// Forget `device` (its report has not been re-read yet after a restart); returns its
    /// record for [`Harness::remember`].
    pub(super) fn forget(&mut self, device: &str) -> DeviceRecord {
        self.devices
            .remove(device)
            .unwrap_or_else(|| panic!("unknown device {device}"))
    }

    /// Put back a record [`Harness::forget`] took (the re-read brought it back).
    pub(super) fn remember(&mut self, record: DeviceRecord) {
        self.devices.insert(record.id.clone(), record);
    }

    /// `device` reports `phase` for the last submitted rollout.
    pub(super) fn report(&mut self, device: &str, phase: Phase) {
        let rollout = self.rollout.clone();
        self.report_for(device, &rollout, phase);
    }

    /// `device` reports `phase` for `rollout` (committed: it now runs the rollout's release).
    pub(super) fn report_for(&mut self, device: &str, rollout: &str, phase: Phase) {
        let (name, seq) = {
            let r = self.rollout(rollout);
            (r.release_name.clone(), r.release_sequence)
        };
        let ring = self.device_ring(device);
        let current = (phase == Phase::Committed).then(|| release_ref(&name, seq));
        self.put(device, &ring, phase, Some((rollout, seq)), None, current);
        if let Some(r) = self.devices.get_mut(device).and_then(|d| d.report.as_mut()) {
            r.target = Some(release_ref(&name, seq));
        }
    }

    // ----- devices running several products ---------------------------------------------------

    /// Add `n` devices `{ring}-{i}` to `ring` that run each of `products`; their ids.
    pub(super) fn product_devices(
        &mut self,
        ring: &str,
        n: usize,
        products: &[&str],
    ) -> Vec<String> {
        (0..n)
            .map(|i| {
                let id = format!("{ring}-{i}");
                self.product_device(&id, ring, products);
                id
            })
            .collect()
    }

    /// Add idle device `id` to `ring`, an agent running each of `products` (its report's
    /// top-level release fields stay empty).
    pub(super) fn product_device(&mut self, id: &str, ring: &str, products: &[&str]) {
        self.put(id, ring, Phase::Idle, None, None, None);
        let entries = products
            .iter()
            .map(|p| ((*p).to_owned(), ProductState::idle()))
            .collect();
        if let Some(r) = self.devices.get_mut(id).and_then(|d| d.report.as_mut()) {
            r.products = entries;
        }
    }

    /// Change what `device` (running several products) reports for `product`, as a new report.
    fn put_product(&mut self, device: &str, product: &str, f: impl FnOnce(&mut ProductState)) {
        self.report_seq += 1;
        let (seq, now) = (self.report_seq, self.now);
        let d = self
            .devices
            .get_mut(device)
            .unwrap_or_else(|| panic!("unknown device {device}"));
        let r = d.report.as_mut().expect("a reported device");
        let entry = r
            .products
            .get_mut(product)
            .unwrap_or_else(|| panic!("{device} does not run {product}"));
        f(entry);
        r.seq = seq;
        r.updated_at = now;
        d.last_seen = now;
    }

    /// `device` reports `phase` of `rollout` for the rollout's product (committed: that
    /// product now runs the release); its other products keep what they reported.
    pub(super) fn report_product(&mut self, device: &str, rollout: &str, phase: Phase) {
        let (name, seq) = {
            let r = self.rollout(rollout);
            (r.release_name.clone(), r.release_sequence)
        };
        let rel = release_ref(&name, seq);
        self.put_product(device, &name, |p| {
            p.phase = phase;
            p.rollout_id = Some(rollout.to_owned());
            p.target = Some(rel.clone());
            p.refused = None;
            if phase == Phase::Committed {
                p.current = Some(rel);
            }
        });
    }

    /// `device` refused `rollout`'s directive for the rollout's product.
    pub(super) fn refuse_product(&mut self, device: &str, rollout: &str, reason: Reason) {
        let name = self.rollout(rollout).release_name.clone();
        let refusal = Refusal {
            rollout_id: rollout.to_owned(),
            reason,
            detail: format!("{name} refused"),
        };
        self.put_product(device, &name, |p| {
            p.phase = Phase::Idle;
            p.rollout_id = None;
            p.refused = Some(refusal);
        });
    }

    /// `rollout`'s tally on `ring` at `percent`, as the core sees it.
    pub(super) fn tally_of(&self, rollout: &str, ring: &str, percent: Percent) -> Tally {
        let fleet = Fleet::new(&self.devices, &self.events, self.unresponsive_after());
        fleet.tally(self.rollout(rollout), ring, percent, self.now)
    }

    /// `device` reports `phase` for the last submitted rollout at directive attempt `attempt`.
    pub(super) fn report_attempt(&mut self, device: &str, phase: Phase, attempt: u32) {
        self.report(device, phase);
        if let Some(r) = self.devices.get_mut(device).and_then(|d| d.report.as_mut()) {
            r.attempt = attempt;
        }
    }

    /// Every device of `ring` reports `phase` for the last submitted rollout.
    pub(super) fn report_all(&mut self, ring: &str, phase: Phase) {
        for d in self.ring_devices(ring) {
            self.report(&d, phase);
        }
    }

    /// `device` refused the last submitted rollout's directive for `reason`.
    pub(super) fn refuse(&mut self, device: &str, reason: Reason, detail: &str) {
        let ring = self.device_ring(device);
        let refusal = Refusal {
            rollout_id: self.rollout.clone(),
            reason,
            detail: detail.into(),
        };
        self.put(device, &ring, Phase::Idle, None, Some(refusal), None);
    }

    /// The devices of `ring` in the ramp `percent` of the last submitted rollout.
    pub(super) fn in_ramp(&self, ring: &str, percent: Percent) -> Vec<String> {
        self.ring_devices(ring)
            .into_iter()
            .filter(|d| in_ramp(&self.rollout, d, percent))
            .collect()
    }

    /// The last submitted rollout's tally on `ring` at `percent`, as the core sees it.
    pub(super) fn tally(&self, ring: &str, percent: Percent) -> Tally {
        let fleet = Fleet::new(&self.devices, &self.events, self.unresponsive_after());
        fleet.tally(self.rollout(&self.rollout), ring, percent, self.now)
    }

    // ----- inputs -----------------------------------------------------------------------------

    fn operator() -> Actor {
        Actor {
            name: "alice".into(),
            role: "approver".into(),
        }
    }

    /// Submit `envelope` (artifact in the store); on success it becomes the rollout
    /// `report` reports for.
    pub(super) fn submit_envelope(
        &mut self,
        envelope: Envelope,
        start_at: Option<Timestamp>,
    ) -> Result<(Rollout, Vec<String>)> {
        let reply = self.handle(Input::Submit {
            submit: Submit {
                envelope,
                start_at,
                activate_at: None,
                launch: None,
            },
            actor: Harness::operator(),
            artifact_stored: true,
        })?;
        match reply {
            Reply::Submitted {
                rollout, warnings, ..
            } => {
                self.rollout = rollout.id.clone();
                Ok((rollout, warnings))
            }
            other => panic!("submit answered {other:?}"),
        }
    }

    /// Submit [`release`]`(sequence)` as a launch at `at` in `mode`; the rollout's id.
    pub(super) fn submit_launch(
        &mut self,
        sequence: u64,
        at: Timestamp,
        mode: crate::model::LaunchMode,
    ) -> String {
        let envelope = release(sequence).sign(&[&self.fx.release]);
        let reply = self.handle(Input::Submit {
            submit: Submit {
                envelope,
                start_at: None,
                activate_at: Some(at),
                launch: Some(mode),
            },
            actor: Harness::operator(),
            artifact_stored: true,
        });
        match reply {
            Ok(Reply::Submitted { rollout, .. }) => {
                self.rollout = rollout.id.clone();
                rollout.id
            }
            other => panic!("launch submit answered {other:?}"),
        }
    }

    /// Move (`Some`) or hold (`None`) the launch of `rollout`.
    pub(super) fn relaunch(&mut self, rollout: &str, at: Option<Timestamp>) -> Result<Rollout> {
        match self.handle(Input::Launch {
            rollout: rollout.into(),
            at,
            actor: Harness::operator(),
        })? {
            Reply::Rollout(r) => Ok(r),
            other => panic!("launch answered {other:?}"),
        }
    }

    /// Sign and submit `release`; the rollout's id.
    pub(super) fn submit_release(&mut self, release: &Release) -> Result<String> {
        let env = release.sign(&[&self.fx.release]);
        self.submit_envelope(env, None).map(|(r, _)| r.id)
    }

    /// Submit [`release`]`(sequence)`; the rollout's id (panics if refused).
    pub(super) fn submit(&mut self, sequence: u64) -> String {
        self.submit_release(&release(sequence))
            .unwrap_or_else(|e| panic!("submit {APP}-{sequence}: {e}"))
    }

    /// Advance the clock by `by`, then evaluate (a zero duration just evaluates).
    pub(super) fn tick(&mut self, by: SignedDuration) {
        self.now = self.now.checked_add(by).expect("clock in range");
        let reply = self.handle(Input::Tick);
        assert!(reply.is_ok(), "a tick is never refused: {reply:?}");
    }

    /// Evaluate without moving the clock.
    pub(super) fn eval(&mut self) {
        self.tick(SignedDuration::ZERO);
    }

    /// Set the clock to `at` (not backwards), then evaluate.
    pub(super) fn tick_to(&mut self, at: Timestamp) {
        assert!(at >= self.now, "the test clock only moves forward");
        let by = at.duration_since(self.now);
        self.tick(by);
    }

    /// An operator action on `rollout`.
    pub(super) fn act(&mut self, rollout: &str, action: RolloutAction) -> Result<Rollout> {
        self.act_on(rollout, action, None)
    }

    /// An operator action on `rollout`, naming `ring`.
    pub(super) fn act_on(
        &mut self,
        rollout: &str,
        action: RolloutAction,
        ring: Option<&str>,
    ) -> Result<Rollout> {
        let reply = self.handle(Input::Act {
            rollout: rollout.into(),
            action,
            ring: ring.map(str::to_owned),
            actor: Harness::operator(),
        })?;
        match reply {
            Reply::Rollout(r) => Ok(r),
            other => panic!("act answered {other:?}"),
        }
    }

    /// Approve the ring `rollout` waits for.
    pub(super) fn approve(&mut self, rollout: &str) -> Result<Rollout> {
        self.act(rollout, RolloutAction::Approve)
    }

    /// A run of `ring`'s acceptance checks for `rollout` finished.
    pub(super) fn checks_done(
        &mut self,
        rollout: &str,
        ring: &str,
        attempt: u32,
        outcome: std::result::Result<(), &str>,
    ) -> Result<Reply> {
        self.handle(Input::ChecksDone {
            rollout: rollout.into(),
            ring: ring.into(),
            attempt,
            outcome: outcome.map_err(str::to_owned),
        })
    }

    /// The engine starts (again): reconcile with the policy, republish.
    pub(super) fn start(&mut self) {
        let reply = self.handle(Input::Start);
        assert!(reply.is_ok(), "start is never refused: {reply:?}");
    }

    /// Restart: the state goes through serde as the store keeps it (each record on its own),
    /// a new core is built from what was read back, and it starts.
    pub(super) fn restart(&mut self) {
        let policy = self.cfg.policy.clone();
        self.restart_with(policy);
    }

    /// Restart with an edited `policy`.
    pub(super) fn restart_with(&mut self, policy: Policy) {
        let state = roundtrip(self.core.state());
        self.restart_from(policy, state);
    }

    /// Restart with `policy` over `state` (e.g. one an older version persisted).
    pub(super) fn restart_from(&mut self, policy: Policy, state: EngineState) {
        policy.validate("test policy").expect("a valid test policy");
        self.cfg.policy = policy;
        self.core = Core::new(self.cfg.clone(), state);
        self.start();
    }

    // ----- what the core decided ---------------------------------------------------------------

    /// The state as decided so far.
    pub(super) fn state(&self) -> &EngineState {
        self.core.state()
    }

    /// Rollout `id`.
    pub(super) fn rollout(&self, id: &str) -> &Rollout {
        self.state()
            .rollouts
            .get(id)
            .unwrap_or_else(|| panic!("no rollout {id}"))
    }

    /// Rollout `id`'s state.
    pub(super) fn rollout_state(&self, id: &str) -> &RolloutState {
        &self.rollout(id).state
    }

    /// Rollout `id`'s phase name (`publishing`, `baking`, `halted`, …).
    pub(super) fn phase(&self, id: &str) -> &'static str {
        self.rollout_state(id).phase()
    }

    /// Rollout `id`'s ring, step and stage, when active.
    pub(super) fn position(&self, id: &str) -> Option<(String, usize, Stage)> {
        match self.rollout_state(id) {
            RolloutState::Active { ring, step, stage } => {
                Some((ring.clone(), *step, stage.clone()))
            }
            _ => None,
        }
    }

    /// The reason rollout `id` halted or rolled back with.
    pub(super) fn stop_reason(&self, id: &str) -> String {
        match self.rollout_state(id) {
            RolloutState::Halted { reason } | RolloutState::RolledBack { reason, .. } => {
                reason.clone()
            }
            other => panic!("rollout {id} did not stop: {other:?}"),
        }
    }

    /// The audit actions decided so far, in order.
    pub(super) fn audit_kinds(&self) -> Vec<String> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Audit(r) => Some(r.action.clone()),
                _ => None,
            })
            .collect()
    }

    /// The audit details of `action` entries, in order.
    pub(super) fn audit_details(&self, action: &str) -> Vec<String> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Audit(r) if r.action == action => Some(r.detail.clone()),
                _ => None,
            })
            .collect()
    }

    /// How many `action` audit entries were decided.
    pub(super) fn audited(&self, action: &str) -> usize {
        self.audit_details(action).len()
    }

    /// The acceptance-check runs asked for so far: `(rollout, ring, attempt)`.
    pub(super) fn check_runs(&self) -> Vec<(String, String, u32)> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::RunChecks {
                    rollout,
                    ring,
                    attempt,
                    ..
                } => Some((rollout.clone(), ring.clone(), *attempt)),
                _ => None,
            })
            .collect()
    }

    fn topics(&self) -> &Topics {
        &self.cfg.topics
    }

    /// The topic the trust root is published on.
    pub(super) fn trust_topic(&self) -> String {
        self.topics().trust()
    }

    /// Every directive published on `ring`'s topic so far, verified against the trust root.
    pub(super) fn directives(&self, ring: &str) -> Vec<Directive> {
        self.directives_on(&self.topics().ring_directive(ring))
    }

    /// Every directive published on `ring`'s topic for `product` so far, verified.
    pub(super) fn product_directives(&self, ring: &str, product: &str) -> Vec<Directive> {
        self.directives_on(&self.topics().ring_product_directive(ring, product))
    }

    /// The raw payloads published on `topic` so far (an empty one clears it).
    pub(super) fn payloads_on(&self, topic: &str) -> Vec<Vec<u8>> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Publish { topic: t, payload } if t == topic => Some(payload.clone()),
                _ => None,
            })
            .collect()
    }

    /// The topics names, for tests that look at device topics.
    pub(super) fn topic_names(&self) -> &Topics {
        self.topics()
    }

    /// Every directive published on `topic` so far, verified against the trust root.
    pub(super) fn directives_on(&self, topic: &str) -> Vec<Directive> {
        let topic = topic.to_owned();
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Publish { topic: t, payload } if *t == topic => Some(payload),
                _ => None,
            })
            .map(|p| self.verify(p))
            .collect()
    }

    /// The newest directive published on `ring`'s topic.
    pub(super) fn directive(&self, ring: &str) -> Directive {
        self.directives(ring)
            .pop()
            .unwrap_or_else(|| panic!("nothing published on ring {ring}"))
    }

    fn verify(&self, payload: &[u8]) -> Directive {
        let env = Envelope::from_slice(payload).expect("a published envelope");
        let trust = &self.fx.trust;
        let bytes = env
            .verify(DIRECTIVE_TYPE, trust, trust.role(Role::Controller))
            .expect("signed by the controller role");
        Directive::parse(bytes).expect("a valid directive")
    }

    /// The release embedded in `d`.
    pub(super) fn embedded(d: &Directive) -> Release {
        let env = d.release.as_ref().expect("an install carries its release");
        Release::parse(&env.payload).expect("a release")
    }
}

/// The engine state through serde, as the store writes and reads it (record by record).
pub(super) fn roundtrip(st: &EngineState) -> EngineState {
    fn rt<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
        let bytes = serde_json::to_vec(v).expect("serialise");
        serde_json::from_slice(&bytes).expect("deserialise")
    }
    EngineState {
        releases: st
            .releases
            .iter()
            .map(|(k, v)| (k.clone(), rt(v)))
            .collect(),
        rollouts: st
            .rollouts
            .iter()
            .map(|(k, v)| (k.clone(), rt(v)))
            .collect(),
        rings: st.rings.iter().map(|(k, v)| (k.clone(), rt(v))).collect(),
        pins: st.pins.iter().map(|(k, v)| (k.clone(), rt(v))).collect(),
        last_good: rt(&st.last_good),
    }
}

/// The state as JSON, for "same result" comparisons of rollouts, releases and last_good.
pub(super) fn state_json(st: &EngineState) -> serde_json::Value {
    serde_json::json!({
        "releases": st.releases,
        "rollouts": st.rollouts,
        "last_good": st.last_good,
        // What stands on each ring, without its signing details (a restart re-signs).
        "rings": st.rings.values().map(|d| serde_json::json!({
            "ring": d.ring,
            "product": d.product,
            "rollout_id": d.rollout_id,
            "action": d.action,
            "release_id": d.release_id,
            "percent": d.percent,
        })).collect::<Vec<_>>(),
    })
}
