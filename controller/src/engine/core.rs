//! The decision core: `(state, input, now) → (state, effects)`, with no I/O — no locks, no
//! sled, no MQTT, no clock. Every rollout transition is an arm of [`Core::advance`]'s `match`
//! on the rollout's state; an input the state does not allow is an error the caller reports.
//!
//! The core signs directives (pure cryptography), so what it returns is ready to publish; the
//! actor ([`super::actor`]) persists [`Changes`] and the audit records in one atomic write and
//! only then replies, publishes and runs checks.

use super::effects::{Changes, Decided, Effect, Input, Reply};
use super::fleet::Fleet;
use super::gate::{gate_crossed, gate_met, gate_unreachable, needed};
use super::halt::{halt_reason, timeout_reason, unreachable_reason};
use super::{Actor, EngineState, RolloutAction, Submit};
use crate::audit::Record;
use crate::config::{OnFailure, OnNewRelease, Policy, Promotion, RingPolicy};
use crate::error::{Error, Result};
use crate::model::{
    directive_key, Approval, DevicePin, Launch, LaunchMode, ReleaseRecord, RingAttempt,
    RingDirective, Rollout, RolloutState, Stage, StepRecord, Tally, HELD, LEGACY_RING_PREFIX,
};
use jiff::{SignedDuration, Timestamp};
use ringcast_proto::{
    directive, Action, Activation, Directive, Percent, Reason, Rejection, SecretKey, Topics,
    TrustRoot,
};
use std::collections::BTreeMap;
use tracing::{info, warn};

/// What the core needs besides its state: the policy, the topic names, the controller key,
/// and the trust root releases are verified against.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The policy.
    pub policy: Policy,
    /// Topic names.
    pub topics: Topics,
    /// The controller role key (signs directives).
    pub key: SecretKey,
    /// The trust root (verifies submitted releases).
    pub trust: TrustRoot,
    /// Its envelope, published retained on `…/trust`.
    pub trust_envelope: Vec<u8>,
}

/// Effects and changes gathered while deciding one input.
#[derive(Debug, Default)]
struct Out {
    effects: Vec<Effect>,
    changes: Changes,
}

impl Out {
    fn audit(&mut self, r: Record) {
        self.effects.push(Effect::Audit(r));
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>) {
        self.effects.push(Effect::Publish { topic, payload });
    }
}

/// Most transitions one rollout makes in one evaluation (a step can chain a few).
const MAX_CHAIN: usize = 16;

/// The decision core.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    state: EngineState,
}

impl Core {
    /// A core over `state` (loaded from the store, or empty).
    pub fn new(cfg: CoreConfig, state: EngineState) -> Core {
        Core { cfg, state }
    }

    /// The state as decided so far.
    pub fn state(&self) -> &EngineState {
        &self.state
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.cfg.policy
    }

    /// Decide on one input at `now`. A refused command changes nothing (its state is left
    /// as it was) but may still be audited.
    pub fn handle(&mut self, input: Input, now: Timestamp, fleet: &Fleet<'_>) -> Decided {
        let mut out = Out::default();
        let reply = match input {
            Input::Start => {
                self.start(now, fleet, &mut out);
                Ok(Reply::Done)
            }
            Input::Tick => {
                self.tick(now, fleet, &mut out);
                Ok(Reply::Done)
            }
            Input::Reconnected => {
                self.republish_all(now, &mut out);
                Ok(Reply::Done)
            }
            Input::Submit {
                submit,
                actor,
                artifact_stored,
            } => self
                .submit(submit, &actor, artifact_stored, now, fleet, &mut out)
                .map(|(release, rollout, warnings)| Reply::Submitted {
                    release,
                    rollout,
                    warnings,
                }),
            Input::Act {
                rollout,
                action,
                ring,
                actor,
            } => self
                .act(&rollout, action, ring, &actor, now, fleet, &mut out)
                .map(Reply::Rollout),
            Input::Launch { rollout, at, actor } => self
                .relaunch(&rollout, at, &actor, now, &mut out)
                .map(Reply::Rollout),
            Input::Unblock { release, actor } => {
                self.unblock(&release, &actor, &mut out).map(Reply::Release)
            }
            Input::Pin {
                device,
                release,
                actor,
            } => self
                .pin(&device, &release, &actor, now, fleet, &mut out)
                .map(Reply::Pin),
            Input::Unpin {
                device,
                product,
                actor,
            } => self
                .unpin(&device, product.as_deref(), &actor, now, fleet, &mut out)
                .map(Reply::Pin),
            Input::ChecksDone {
                rollout,
                ring,
                attempt,
                outcome,
            } => self
                .checks_done(&rollout, &ring, attempt, outcome, now, &mut out)
                .map(|()| Reply::Done),
        };
        self.freeze_ended(now, fleet, &mut out);
        Decided {
            effects: out.effects,
            changes: out.changes,
            reply,
        }
    }

    // ----- start-up, re-signing -------------------------------------------------------------

    /// Rollouts are reconciled with the policy by ring name: a rollout whose ring was removed
    /// (or whose step no longer exists) stops with the reason; nothing moves to another ring.
    fn start(&mut self, now: Timestamp, fleet: &Fleet<'_>, out: &mut Out) {
        let policy = self.cfg.policy.clone();
        let live: Vec<(String, String, usize)> = self
            .state
            .rollouts
            .values()
            .filter_map(|r| match &r.state {
                RolloutState::Active { ring, step, .. } => {
                    Some((r.id.clone(), ring.clone(), *step))
                }
                _ => None,
            })
            .collect();
        for (id, ring, step) in live {
            // Persisted by a version that named rings by position: resolve it once.
            let name = match ring.strip_prefix(LEGACY_RING_PREFIX) {
                Some(i) => i
                    .parse::<usize>()
                    .ok()
                    .and_then(|i| policy.rings.get(i))
                    .map(|r| r.name.clone()),
                None => Some(ring.clone()),
            };
            let stop = match name.as_deref().and_then(|n| policy.ring(n)) {
                None => Some(format!(
                    "policy changed: ring {} is no longer in the policy",
                    name.as_deref().unwrap_or(&ring)
                )),
                Some(rp) if step >= rp.steps.len() => Some(format!(
                    "policy changed: ring {} has {} step(s) now; the rollout was at step {}",
                    rp.name,
                    rp.steps.len(),
                    step + 1
                )),
                Some(_) => None,
            };
            match (stop, name) {
                (Some(reason), _) => {
                    warn!(rollout_id = %id, %reason, "rollout stopped at start-up");
                    if let Some(r) = self.state.rollouts.get(&id).cloned() {
                        self.stop_rings(&r, "policy changed", now, out);
                    }
                    self.set_state(
                        &id,
                        RolloutState::Halted {
                            reason: reason.clone(),
                        },
                        out,
                    );
                    self.end(&id, now, out);
                    out.audit(Record::auto("halt", &id, None, reason));
                }
                (None, Some(name)) if name != ring => {
                    if let Some(r) = self.state.rollouts.get_mut(&id) {
                        if let RolloutState::Active { ring, .. } = &mut r.state {
                            *ring = name;
                        }
                        out.changes.rollouts.insert(id.clone());
                    }
                }
                _ => {}
            }
        }
        // Acceptance checks that were running died with the process that ran them, and their
        // result is what the rollout waits for: run the awaited attempt again.
        let checking: Vec<(String, String, String, String, u32)> = self
            .state
            .rollouts
            .values()
            .filter_map(|r| match &r.state {
                RolloutState::Active {
                    ring,
                    stage: Stage::Checking { attempt, .. },
                    ..
                } => Some((
                    r.id.clone(),
                    ring.clone(),
                    r.release_id.clone(),
                    r.release_name.clone(),
                    *attempt,
                )),
                _ => None,
            })
            .collect();
        for (rollout, ring, release, product, attempt) in checking {
            let Some(checks) = policy.ring(&ring).map(|rp| rp.checks.clone()) else {
                continue;
            };
            info!(rollout_id = %rollout, %ring, attempt, "acceptance checks run again");
            out.effects.push(Effect::RunChecks {
                devices: fleet.ring_devices(&ring, Some(&product)),
                rollout,
                ring,
                release,
                attempt,
                checks,
            });
        }
        for (ring, min, known) in self.undersized_rings(fleet, None) {
            warn!(
                ring,
                known, min, "ring has fewer known devices than its gate's min_reports"
            );
        }
        self.adopt_single_product_records(out);
        self.republish_all(now, out);
    }

    /// Standing directives persisted before products exist only on the single-product
    /// topics. Each gets its product's record beside it (the same rollout, action, release,
    /// ramp and activation, under its own sequence), so agents running several products hear
    /// what stands without waiting for the next step; from then on both are kept as every
    /// rollout keeps them. The product is the release's name, or the rollout's for a `hold`;
    /// a record naming neither (an ended pin's hold) stays single-product only.
    fn adopt_single_product_records(&mut self, out: &mut Out) {
        let product_of = |d: &RingDirective| {
            d.release_id
                .as_ref()
                .and_then(|id| self.state.releases.get(id))
                .map(|r| r.release.name.clone())
                .or_else(|| {
                    self.state
                        .rollouts
                        .get(&d.rollout_id)
                        .map(|r| r.release_name.clone())
                })
        };
        let rings: Vec<RingDirective> = self
            .state
            .rings
            .values()
            .filter(|d| d.product.is_none())
            .filter_map(|d| {
                let product = product_of(d)?;
                let key = directive_key(&d.ring, Some(&product));
                (!self.state.rings.contains_key(&key)).then(|| RingDirective {
                    product: Some(product),
                    sequence: 0,
                    ..d.clone()
                })
            })
            .collect();
        let pins: Vec<DevicePin> = self
            .state
            .pins
            .values()
            .filter(|p| p.directive.product.is_none())
            .filter_map(|p| {
                let product = product_of(&p.directive)?;
                let device = p.directive.device.as_deref()?;
                let key = directive_key(device, Some(&product));
                (!self.state.pins.contains_key(&key)).then(|| DevicePin {
                    directive: RingDirective {
                        product: Some(product),
                        sequence: 0,
                        ..p.directive.clone()
                    },
                    ..p.clone()
                })
            })
            .collect();
        if rings.is_empty() && pins.is_empty() {
            return;
        }
        let detail = format!(
            "{} ring and {} device directive(s) from before products now stand on their              product's topic too",
            rings.len(),
            pins.len()
        );
        for d in rings {
            let key = d.key();
            self.state.rings.insert(key.clone(), d);
            out.changes.rings.insert(key);
        }
        for p in pins {
            let key = p.directive.key();
            self.state.pins.insert(key.clone(), p);
            out.changes.pins.insert(key);
        }
        info!("{detail}");
        out.audit(Record {
            actor: "controller".into(),
            role: None,
            action: "product_directives".into(),
            outcome: "ok".into(),
            rollout_id: None,
            ring: None,
            detail,
        });
    }

    /// Rings whose gate needs more commits than the ring has known devices (that run
    /// `product`; `None`: any): `(ring, min_reports, known)`.
    fn undersized_rings(
        &self,
        fleet: &Fleet<'_>,
        product: Option<&str>,
    ) -> Vec<(String, u32, u32)> {
        let sizes = fleet.ring_sizes(product);
        self.cfg
            .policy
            .rings
            .iter()
            .filter_map(|r| {
                let known = sizes.get(&r.name).copied().unwrap_or(0);
                (known < r.gate.min_reports).then(|| (r.name.clone(), r.gate.min_reports, known))
            })
            .collect()
    }

    /// Re-sign every standing directive and publish the trust root (start, reconnect).
    fn republish_all(&mut self, now: Timestamp, out: &mut Out) {
        out.publish(self.cfg.topics.trust(), self.cfg.trust_envelope.clone());
        self.resign(now, None, out);
    }

    /// Re-sign the standing directives: all of them, or with `due_after` those signed longer
    /// ago than that (or, after the clock stepped back, in the future): freeze protection.
    fn resign(&mut self, now: Timestamp, due_after: Option<SignedDuration>, out: &mut Out) {
        let due = |issued: Timestamp| match due_after {
            None => true,
            Some(after) => {
                now >= issued.checked_add(after).unwrap_or(Timestamp::MAX) || now < issued
            }
        };
        // Every record: each product's and the single-product one of every ring and device.
        let rings: Vec<String> = self
            .state
            .rings
            .iter()
            .filter(|(_, d)| due(d.issued_at))
            .map(|(k, _)| k.clone())
            .collect();
        for key in rings {
            self.resign_ring(&key, now, out);
        }
        let pins: Vec<String> = self
            .state
            .pins
            .iter()
            .filter(|(_, p)| due(p.directive.issued_at))
            .map(|(k, _)| k.clone())
            .collect();
        for key in pins {
            if let Some(mut pin) = self.state.pins.get(&key).cloned() {
                self.sign(&mut pin.directive, now, out);
                self.state.pins.insert(key.clone(), pin);
                out.changes.pins.insert(key);
            }
        }
    }

    /// Re-sign the ring directive stored under `key` as it stands.
    fn resign_ring(&mut self, key: &str, now: Timestamp, out: &mut Out) {
        if let Some(mut spec) = self.state.rings.get(key).cloned() {
            self.sign(&mut spec, now, out);
            self.state.rings.insert(key.to_owned(), spec);
            out.changes.rings.insert(key.to_owned());
        }
    }

    /// Sign `spec` at `now` (next sequence, fresh expiry) and queue its publication.
    fn sign(&self, spec: &mut RingDirective, now: Timestamp, out: &mut Out) {
        let ttl = self.cfg.policy.directive_ttl.signed();
        spec.sequence = directive::next_sequence(spec.sequence, now);
        spec.issued_at = now;
        spec.expires_at = now.checked_add(ttl).unwrap_or(Timestamp::MAX);
        let release = spec
            .release_id
            .as_ref()
            .and_then(|id| self.state.releases.get(id))
            .map(|r| r.envelope.clone());
        let action = if release.is_none() {
            Action::Hold
        } else {
            spec.action
        };
        let d = Directive {
            fleet: self.cfg.policy.fleet.clone(),
            ring: spec.ring.clone(),
            device: spec.device.clone(),
            product: spec.product.clone(),
            rollout_id: spec.rollout_id.clone(),
            sequence: spec.sequence,
            issued_at: spec.issued_at,
            expires_at: spec.expires_at,
            action,
            release: (action == Action::Install).then_some(release).flatten(),
            percent: spec.percent,
            // A launch pre-stages whole rings: every device of the ring downloads and
            // verifies ahead, and activates only when its ramp step takes it in, so no device
            // downloads after the launch time, whatever the ring's steps.
            stage_percent: (spec.device.is_none()
                && action == Action::Install
                && spec.percent < Percent::FULL
                && self
                    .state
                    .rollouts
                    .get(&spec.rollout_id)
                    .is_some_and(|r| r.launch.is_some() && r.state.is_live()))
            .then_some(Percent::FULL),
            activation: spec.activation.clone(),
            attempt: match &spec.device {
                Some(_) => 1,
                None => self
                    .state
                    .rollouts
                    .get(&spec.rollout_id)
                    .and_then(|r| r.attempts.get(&spec.ring))
                    .map_or(1, |a| a.attempt),
            },
        };
        let topic =
            self.cfg
                .topics
                .directive(&spec.ring, spec.device.as_deref(), spec.product.as_deref());
        out.publish(topic, d.sign(&[&self.cfg.key]).to_vec());
    }

    /// A rollout of `product` puts `action` on `ring`: on the product's topic, and on the
    /// single-product topic, which goes to the newest rollout to publish on the ring whatever
    /// its product (agents without products take every release they are sent, as before
    /// products). Each topic keeps its own record and sequence.
    #[allow(clippy::too_many_arguments)]
    fn publish_ring(
        &mut self,
        ring: &str,
        product: &str,
        rollout_id: &str,
        action: Action,
        release_id: Option<String>,
        percent: Percent,
        activation: Activation,
        now: Timestamp,
        out: &mut Out,
    ) {
        self.set_ring(
            ring,
            &[Some(product.to_owned()), None],
            rollout_id,
            action,
            release_id,
            percent,
            activation,
            now,
            out,
        );
    }

    /// The products (`None`: the single-product topic) whose standing directive on `ring`
    /// rollout `r` holds.
    ///
    /// The rule for what a rollout may change once it stops (halt, rollback, abort, a policy
    /// change): its own product's record, which only rollouts of its product ever take; and
    /// the single-product record only while this rollout is still the one standing there.
    /// Once another rollout published on the ring (another product's, running at the same
    /// time), the single-product topic is that rollout's: holding it, or sending it back to
    /// this product's last good release, would stop or undo a rollout that did not fail.
    /// This is what a stopping rollout did before products, when the ring had one record.
    fn held_by(&self, r: &Rollout, ring: &str) -> Vec<Option<String>> {
        self.held_by_id(&r.id, &r.release_name, ring)
    }

    /// [`Core::held_by`] for rollout `id` of `product`.
    fn held_by_id(&self, id: &str, product: &str, ring: &str) -> Vec<Option<String>> {
        [Some(product.to_owned()), None]
            .into_iter()
            .filter(|p| {
                self.state
                    .rings
                    .get(&directive_key(ring, p.as_deref()))
                    .is_some_and(|d| d.rollout_id == id)
            })
            .collect()
    }

    /// Set and sign `ring`'s standing directive for each of `products` (`None`: the
    /// single-product topic); a rollout new on one of them retires the device directives of
    /// the ring's devices for the same product (or the single-product ones).
    #[allow(clippy::too_many_arguments)]
    fn set_ring(
        &mut self,
        ring: &str,
        products: &[Option<String>],
        rollout_id: &str,
        action: Action,
        release_id: Option<String>,
        percent: Percent,
        activation: Activation,
        now: Timestamp,
        out: &mut Out,
    ) {
        let mut moved = Vec::new();
        for product in products {
            let key = directive_key(ring, product.as_deref());
            let prev = self.state.rings.get(&key);
            if prev.is_none_or(|r| r.rollout_id != rollout_id) {
                moved.push(product.clone());
            }
            let mut spec = RingDirective {
                ring: ring.into(),
                device: None,
                product: product.clone(),
                rollout_id: rollout_id.into(),
                action,
                release_id: release_id.clone(),
                percent,
                activation: activation.clone(),
                // This topic's own last sequence: never another topic's.
                sequence: prev.map_or(0, |r| r.sequence),
                issued_at: now,
                expires_at: now,
            };
            self.sign(&mut spec, now, out);
            self.state.rings.insert(key.clone(), spec);
            out.changes.rings.insert(key);
        }
        if !moved.is_empty() {
            self.retire_pins_of_ring(ring, &moved, rollout_id, out);
        }
    }

    // ----- evaluation -----------------------------------------------------------------------

    fn tick(&mut self, now: Timestamp, fleet: &Fleet<'_>, out: &mut Out) {
        let mut live: Vec<(Timestamp, String)> = self
            .state
            .rollouts
            .values()
            .filter(|r| r.state.is_live())
            .map(|r| (r.created_at, r.id.clone()))
            .collect();
        live.sort();
        for (_, id) in live {
            for _ in 0..MAX_CHAIN {
                if !self.advance(&id, now, fleet, out) {
                    break;
                }
            }
        }
        let half = SignedDuration::from_millis(
            i64::try_from(self.cfg.policy.directive_ttl.signed().as_millis() / 2)
                .unwrap_or(i64::MAX),
        );
        self.resign(now, Some(half), out);
        self.track_insight(now, fleet, out);
    }

    fn set_state(&mut self, id: &str, state: RolloutState, out: &mut Out) {
        if let Some(r) = self.state.rollouts.get_mut(id) {
            r.state = state;
            out.changes.rollouts.insert(id.to_owned());
        }
    }

    /// Keep the tallies of every rollout this decision ended as they were at its end, so an
    /// ended rollout's view does not change as its devices move on to the next release.
    fn freeze_ended(&mut self, now: Timestamp, fleet: &Fleet<'_>, out: &mut Out) {
        let ended: Vec<String> = out
            .changes
            .rollouts
            .iter()
            .filter(|id| {
                self.state
                    .rollouts
                    .get(*id)
                    .is_some_and(|r| !r.state.is_live() && r.final_tallies.is_empty())
            })
            .cloned()
            .collect();
        for id in ended {
            let Some(r) = self.state.rollouts.get(&id).cloned() else {
                continue;
            };
            let tallies: BTreeMap<String, Tally> = r
                .rings_reached
                .iter()
                .map(|ring| {
                    let t = fleet.tally(&r, ring, self.percent_on(&r, ring), now);
                    (ring.clone(), t)
                })
                .collect();
            if let Some(r) = self.state.rollouts.get_mut(&id) {
                r.final_tallies = tallies;
            }
        }
    }

    fn end(&mut self, id: &str, now: Timestamp, out: &mut Out) {
        if let Some(r) = self.state.rollouts.get_mut(id) {
            r.ended_at = Some(now);
            out.changes.rollouts.insert(id.to_owned());
        }
    }

    /// The percent standing on `ring` for rollout `r`: its directive's, or 100 % for a ring
    /// it passed (and whose directive another rollout has taken over since).
    fn percent_on(&self, r: &Rollout, ring: &str) -> Percent {
        self.state
            .standing(r, ring)
            .map(|d| d.percent)
            .unwrap_or(Percent::FULL)
    }

    /// One transition of rollout `id` at `now`; `true` when it moved (evaluate again).
    fn advance(&mut self, id: &str, now: Timestamp, fleet: &Fleet<'_>, out: &mut Out) -> bool {
        let Some(r) = self.state.rollouts.get(id).cloned() else {
            return false;
        };
        let span = tracing::info_span!("rollout", rollout_id = %id, ring = tracing::field::Empty);
        let _g = span.enter();

        // Gates first, on every ring the release reached, paused or not: a bad release is
        // stopped even while an operator holds the rollout.
        if let RolloutState::Active { .. } = r.state {
            if let Some((ring, t)) = self.crossed_gate(&r, now, fleet) {
                let rp = self.ring_policy(&ring);
                let evidence = fleet.failure_evidence(&r, &ring);
                let max = rp.map_or(0.0, |p| p.gate.max_failure_rate);
                let reason = halt_reason(&ring, &t, max, &evidence);
                self.halt(&r, &ring, reason, true, now, out);
                return false;
            }
        }
        if r.paused {
            return false;
        }
        if let RolloutState::Active { .. } = r.state {
            if self.retry_due(&r, now, fleet, out) {
                return true;
            }
        }
        match r.state.clone() {
            RolloutState::Queued => {
                // First come, first served: wait while an older rollout of this name is live.
                let blocked = self.state.rollouts.values().any(|o| {
                    o.id != r.id
                        && o.release_name == r.release_name
                        && o.state.is_live()
                        && (o.state != RolloutState::Queued || o.created_at < r.created_at)
                });
                if blocked {
                    return false;
                }
                out.audit(Record::auto(
                    "dequeue",
                    id,
                    None,
                    "previous rollout of this release finished",
                ));
                self.set_state(id, RolloutState::Pending, out);
                true
            }
            RolloutState::Pending => {
                if r.start_at.is_some_and(|s| now < s) {
                    return false;
                }
                let Some(first) = self.cfg.policy.rings.first().map(|r| r.name.clone()) else {
                    return false;
                };
                out.audit(Record::auto("start", id, None, "rollout started"));
                self.set_state(
                    id,
                    RolloutState::Active {
                        ring: first.clone(),
                        step: 0,
                        stage: Stage::WaitingWindow,
                    },
                    out,
                );
                if r.launch.is_some() {
                    self.prestage(id, &first, now, out);
                }
                true
            }
            RolloutState::Active { ring, step, stage } => {
                span.record("ring", ring.as_str());
                let Some(rp) = self.ring_policy(&ring).cloned() else {
                    // Only a policy changed since start-up could do this; start-up stops such
                    // rollouts, so say so loudly rather than guess.
                    warn!(%ring, "rollout is on a ring the policy does not have; not advancing");
                    return false;
                };
                self.advance_active(&r, &rp, step, stage, now, fleet, out)
            }
            RolloutState::Completed
            | RolloutState::Halted { .. }
            | RolloutState::RolledBack { .. }
            | RolloutState::Aborted
            | RolloutState::Superseded { .. } => false,
        }
    }

    /// Rollout `id`, or `not_found`.
    fn rollout(&self, id: &str) -> Result<Rollout> {
        self.state.rollouts.get(id).cloned().ok_or(Error::NotFound {
            what: "rollout",
            id: id.into(),
        })
    }

    fn ring_policy(&self, ring: &str) -> Option<&RingPolicy> {
        self.cfg.policy.ring(ring)
    }

    #[allow(clippy::too_many_arguments)]
    fn advance_active(
        &mut self,
        r: &Rollout,
        rp: &RingPolicy,
        step: usize,
        stage: Stage,
        now: Timestamp,
        fleet: &Fleet<'_>,
        out: &mut Out,
    ) -> bool {
        let id = r.id.as_str();
        let ring = rp.name.clone();
        let last_step = step + 1 == rp.steps.len();
        let active = |stage| RolloutState::Active {
            ring: ring.clone(),
            step,
            stage,
        };
        match stage {
            Stage::WaitingWindow | Stage::WaitingApproval => {
                let open = rp.schedule().is_open(now);
                let needs_approval = step == 0
                    && rp.promotion == Promotion::Manual
                    && !r.approvals.contains_key(&rp.name);
                if !open {
                    if stage == Stage::WaitingWindow {
                        return false;
                    }
                    self.set_state(id, active(Stage::WaitingWindow), out);
                    return true;
                }
                if needs_approval {
                    if stage == Stage::WaitingApproval {
                        return false;
                    }
                    out.audit(Record::auto(
                        "wait_approval",
                        id,
                        Some(&rp.name),
                        "ring is manual: waiting for an approver",
                    ));
                    self.set_state(id, active(Stage::WaitingApproval), out);
                    return true;
                }
                self.publish_step(r, rp, step, now, out);
                self.set_state(id, active(Stage::Publishing { since: now }), out);
                true
            }
            Stage::Publishing { since } => {
                let t = fleet.tally(r, &ring, rp.steps[step], now);
                if self.unreachable(r, rp, step, &t, now, fleet, out) {
                    return false;
                }
                if gate_met(&t, rp, last_step) {
                    info!(committed = t.committed, "gate met; baking");
                    self.set_state(
                        id,
                        active(Stage::Baking {
                            since: now,
                            published: Some(since),
                        }),
                        out,
                    );
                    return true;
                }
                let limit = rp.step_timeout().signed();
                // A launch's step cannot finish before the launch: its time counts from then.
                let held = r.launch.as_ref().is_some_and(|l| l.held);
                let since = r.activate_at.map_or(since, |a| since.max(a));
                if !held && !limit.is_zero() && now.duration_since(since) >= limit {
                    let need = needed(&t, rp, last_step);
                    let reason = timeout_reason(&ring, &t, need, &rp.step_timeout().to_string());
                    self.halt(r, &ring, reason, true, now, out);
                    return false;
                }
                false
            }
            Stage::Baking { since, published } => {
                let t = fleet.tally(r, &ring, rp.steps[step], now);
                if self.unreachable(r, rp, step, &t, now, fleet, out) {
                    return false;
                }
                if !gate_met(&t, rp, last_step) {
                    if !fleet.is_complete() {
                        // Reports may still be on their way (a restart re-reads them): a
                        // device's absence is no evidence yet; the bake clock keeps its start.
                        return false;
                    }
                    // The gate must hold through the bake: back to waiting for it.
                    out.audit(Record::auto(
                        "gate_lost",
                        id,
                        Some(&ring),
                        format!(
                            "step {} gate no longer met ({} committed, {} failed); bake restarts \
                             when it is",
                            rp.steps[step], t.committed, t.failed
                        ),
                    ));
                    self.set_state(
                        id,
                        active(Stage::Publishing {
                            since: published.unwrap_or(since),
                        }),
                        out,
                    );
                    return true;
                }
                if now.duration_since(since) < rp.bake.signed() {
                    return false;
                }
                self.mark_passed(id, &ring, step, now, out);
                if !last_step {
                    out.audit(Record::auto(
                        "promote_step",
                        id,
                        Some(&ring),
                        format!(
                            "step {} passed ({} committed, {} failed); next {}",
                            rp.steps[step],
                            t.committed,
                            t.failed,
                            rp.steps[step + 1]
                        ),
                    ));
                    self.set_state(
                        id,
                        RolloutState::Active {
                            ring: ring.clone(),
                            step: step + 1,
                            stage: Stage::WaitingWindow,
                        },
                        out,
                    );
                    return true;
                }
                if !rp.checks.is_empty() {
                    self.start_checks(r, rp, 1, now, fleet, out);
                    return true;
                }
                self.promote_ring(r, &ring, now, out);
                true
            }
            Stage::Checking { .. } => false,
            Stage::ChecksFailed { at, attempt, .. } => {
                if now.duration_since(at) < rp.check_retry.signed() {
                    return false;
                }
                self.start_checks(r, rp, attempt + 1, now, fleet, out);
                true
            }
        }
    }

    /// Halt when refusals or failures leave too few devices of the ramp to commit.
    #[allow(clippy::too_many_arguments)]
    fn unreachable(
        &mut self,
        r: &Rollout,
        rp: &RingPolicy,
        step: usize,
        t: &Tally,
        now: Timestamp,
        fleet: &Fleet<'_>,
        out: &mut Out,
    ) -> bool {
        let last_step = step + 1 == rp.steps.len();
        // Unreachable means "too few devices left to commit": not decidable on a partial table.
        if !fleet.is_complete() || !gate_unreachable(t, rp, last_step) {
            return false;
        }
        let refusals = fleet.refusals(r, &rp.name, rp.steps[step]);
        let failures = fleet.failure_evidence(r, &rp.name);
        let reason =
            unreachable_reason(&rp.name, t, needed(t, rp, last_step), &refusals, &failures);
        self.halt(r, &rp.name, reason, true, now, out);
        true
    }

    /// The first reached ring whose gate is crossed, with its tally.
    fn crossed_gate(
        &self,
        r: &Rollout,
        now: Timestamp,
        fleet: &Fleet<'_>,
    ) -> Option<(String, Tally)> {
        r.rings_reached.iter().find_map(|ring| {
            let rp = self.ring_policy(ring)?;
            let t = fleet.tally(r, ring, self.percent_on(r, ring), now);
            gate_crossed(&t, rp).then(|| (ring.clone(), t))
        })
    }

    /// Ask devices whose install failed to try again, on every ring the rollout reached that
    /// allows another attempt and whose backoff (`retry_backoff`, doubled for each attempt
    /// after the first) has passed. `true` when a ring moved to its next attempt.
    fn retry_due(&mut self, r: &Rollout, now: Timestamp, fleet: &Fleet<'_>, out: &mut Out) -> bool {
        let mut moved = false;
        for ring in &r.rings_reached {
            let (Some(a), Some(rp)) = (r.attempts.get(ring), self.ring_policy(ring)) else {
                continue;
            };
            if a.attempt >= a.max {
                continue;
            }
            let wait = (0..a.attempt.saturating_sub(1).min(20))
                .fold(rp.retry_backoff.signed(), |w, _| w.saturating_mul(2));
            if now < a.at.checked_add(wait).unwrap_or(Timestamp::MAX) {
                continue;
            }
            let failed = fleet.failed_at(r, ring, self.percent_on(r, ring), a.attempt);
            if failed == 0 {
                continue;
            }
            let detail = format!(
                "attempt {} of {}: {failed} device(s) of the ramp failed at attempt {}",
                a.attempt + 1,
                a.max,
                a.attempt
            );
            self.next_attempt(&r.id, ring, a.max, now, out);
            out.audit(Record::auto("retry", &r.id, Some(ring), detail));
            moved = true;
        }
        moved
    }

    /// Move `ring` of rollout `id` to its next attempt (allowing at least `max`) and re-sign
    /// the ring's directive, if it is still this rollout's, with it.
    fn next_attempt(&mut self, id: &str, ring: &str, max: u32, now: Timestamp, out: &mut Out) {
        let Some(rr) = self.state.rollouts.get_mut(id) else {
            return;
        };
        let a = rr.attempts.entry(ring.to_owned()).or_insert(RingAttempt {
            attempt: 1,
            max: 1,
            at: now,
        });
        a.attempt += 1;
        a.max = a.max.max(max).max(a.attempt);
        a.at = now;
        info!(ring, attempt = a.attempt, "retrying failed devices");
        out.changes.rollouts.insert(id.to_owned());
        let product = rr.release_name.clone();
        for p in self.held_by_id(id, &product, ring) {
            self.resign_ring(&directive_key(ring, p.as_deref()), now, out);
        }
    }

    fn mark_passed(&mut self, id: &str, ring: &str, step: usize, now: Timestamp, out: &mut Out) {
        if let Some(r) = self.state.rollouts.get_mut(id) {
            if let Some(h) = r
                .history
                .iter_mut()
                .rev()
                .find(|h| h.ring == ring && h.step == step)
            {
                h.passed_at = Some(now);
                out.changes.rollouts.insert(id.to_owned());
            }
        }
    }

    fn publish_step(
        &mut self,
        r: &Rollout,
        rp: &RingPolicy,
        step: usize,
        now: Timestamp,
        out: &mut Out,
    ) {
        let percent = rp.steps[step];
        // The ring's attempts: kept across its steps, allowed as many as the policy says now.
        if let Some(rr) = self.state.rollouts.get_mut(&r.id) {
            let a = rr.attempts.entry(rp.name.clone()).or_insert(RingAttempt {
                attempt: 1,
                max: 1,
                at: now,
            });
            a.max = a.max.max(1 + rp.retries);
        }
        let activation = Activation {
            not_before: if r.launch.as_ref().is_some_and(|l| l.held) {
                Some(HELD)
            } else {
                r.activate_at
            },
            windows: rp.windows.clone(),
            timezone: (!rp.windows.is_empty()).then(|| rp.timezone.clone()),
        };
        self.publish_ring(
            &rp.name,
            &r.release_name,
            &r.id,
            Action::Install,
            Some(r.release_id.clone()),
            percent,
            activation,
            now,
            out,
        );
        if let Some(rr) = self.state.rollouts.get_mut(&r.id) {
            if !rr.rings_reached.contains(&rp.name) {
                rr.rings_reached.push(rp.name.clone());
            }
            rr.history.push(StepRecord {
                ring: rp.name.clone(),
                step,
                percent,
                published_at: now,
                passed_at: None,
            });
            out.changes.rollouts.insert(r.id.clone());
        }
        let window = if rp.windows.is_empty() {
            ""
        } else {
            " (delivery window open)"
        };
        out.audit(Record::auto(
            "publish",
            &r.id,
            Some(&rp.name),
            format!("install {} at {percent}{window}", r.release_id),
        ));
        info!(ring = %rp.name, %percent, "step published");
    }

    fn start_checks(
        &mut self,
        r: &Rollout,
        rp: &RingPolicy,
        attempt: u32,
        now: Timestamp,
        fleet: &Fleet<'_>,
        out: &mut Out,
    ) {
        let devices = fleet.ring_devices(&rp.name, Some(&r.release_name));
        out.audit(Record::auto(
            "checks_started",
            &r.id,
            Some(&rp.name),
            format!(
                "{} acceptance check(s), attempt {attempt} of {}, on {} device(s)",
                rp.checks.len(),
                rp.check_attempts,
                devices.len()
            ),
        ));
        out.effects.push(Effect::RunChecks {
            rollout: r.id.clone(),
            ring: rp.name.clone(),
            release: r.release_id.clone(),
            attempt,
            checks: rp.checks.clone(),
            devices,
        });
        self.set_state(
            &r.id,
            RolloutState::Active {
                ring: rp.name.clone(),
                step: rp.steps.len() - 1,
                stage: Stage::Checking {
                    since: now,
                    attempt,
                },
            },
            out,
        );
    }

    fn checks_done(
        &mut self,
        id: &str,
        ring: &str,
        attempt: u32,
        outcome: std::result::Result<(), String>,
        now: Timestamp,
        out: &mut Out,
    ) -> Result<()> {
        let r = self.rollout(id)?;
        let waiting = matches!(
            &r.state,
            RolloutState::Active {
                ring: rr,
                stage: Stage::Checking { attempt: a, .. },
                ..
            } if rr == ring && *a == attempt
        );
        if !waiting {
            // A result for checks the rollout no longer waits for (aborted, halted meanwhile).
            return Err(Error::conflict(
                "disallowed",
                format!(
                    "acceptance checks of ring {ring} (attempt {attempt}) finished while rollout \
                     {id} is {}",
                    r.state.phase()
                ),
            ));
        }
        let Some(rp) = self.ring_policy(ring).cloned() else {
            return Err(Error::NotFound {
                what: "ring",
                id: ring.into(),
            });
        };
        match outcome {
            Ok(()) => {
                out.audit(Record::auto(
                    "checks_passed",
                    id,
                    Some(ring),
                    format!("acceptance checks passed (attempt {attempt})"),
                ));
                self.promote_ring(&r, ring, now, out);
            }
            Err(detail) => {
                out.audit(Record::auto(
                    "checks_failed",
                    id,
                    Some(ring),
                    format!(
                        "attempt {attempt} of {}: {detail}",
                        rp.check_attempts.max(1)
                    ),
                ));
                if attempt >= rp.check_attempts.max(1) {
                    let reason = format!(
                        "acceptance checks of ring {ring} failed {attempt} time(s): {detail}"
                    );
                    self.halt(&r, ring, reason, true, now, out);
                } else {
                    self.set_state(
                        id,
                        RolloutState::Active {
                            ring: ring.into(),
                            step: rp.steps.len() - 1,
                            stage: Stage::ChecksFailed {
                                at: now,
                                detail,
                                attempt,
                            },
                        },
                        out,
                    );
                }
            }
        }
        Ok(())
    }

    /// Move rollout `r` past `ring`: to the next ring, or completed.
    fn promote_ring(&mut self, r: &Rollout, ring: &str, now: Timestamp, out: &mut Out) {
        match self.cfg.policy.next_ring(ring).map(|n| n.name.clone()) {
            Some(next) => {
                out.audit(Record::auto(
                    "promote",
                    &r.id,
                    Some(ring),
                    format!("ring {ring} passed; next ring {next}"),
                ));
                self.set_state(
                    &r.id,
                    RolloutState::Active {
                        ring: next,
                        step: 0,
                        stage: Stage::WaitingWindow,
                    },
                    out,
                );
            }
            None => {
                self.set_state(&r.id, RolloutState::Completed, out);
                self.end(&r.id, now, out);
                self.state
                    .last_good
                    .insert(r.release_name.clone(), r.release_id.clone());
                out.changes.last_good = true;
                out.audit(Record::auto(
                    "complete",
                    &r.id,
                    Some(ring),
                    format!("release {} reached every ring", r.release_id),
                ));
                info!(rollout_id = %r.id, "rollout completed");
            }
        }
    }

    /// Stop rollout `r` for `reason` in `ring`, as the ring's `on_failure` says: send every
    /// ring it reached back to the last completed release (`rollback`), or hold them. With
    /// `block`, the release is never offered again unless an operator unblocks it.
    fn halt(
        &mut self,
        r: &Rollout,
        ring: &str,
        reason: String,
        block: bool,
        now: Timestamp,
        out: &mut Out,
    ) {
        warn!(rollout_id = %r.id, %ring, %reason, "halting rollout");
        let on_failure = self
            .ring_policy(ring)
            .map_or(OnFailure::Halt, |p| p.on_failure);
        let rollback_to = self
            .state
            .last_good
            .get(&r.release_name)
            .filter(|g| **g != r.release_id)
            .cloned();
        let state = match (on_failure, rollback_to) {
            (OnFailure::Rollback, Some(to)) => {
                let rb_id = format!("{}-rollback", r.id);
                for reached in &r.rings_reached {
                    let held = self.held_by(r, reached);
                    if !held.is_empty() {
                        self.set_ring(
                            reached,
                            &held,
                            &rb_id,
                            Action::Install,
                            Some(to.clone()),
                            Percent::FULL,
                            Activation::default(),
                            now,
                            out,
                        );
                        out.audit(Record::auto(
                            "rollback",
                            &r.id,
                            Some(reached),
                            format!("ring sent back to {to}"),
                        ));
                    }
                }
                RolloutState::RolledBack {
                    reason: reason.clone(),
                    to,
                }
            }
            (on_failure, _) => {
                if on_failure == OnFailure::Rollback {
                    warn!(rollout_id = %r.id, "no completed release to roll back to; holding instead");
                }
                self.stop_rings(r, "halted", now, out);
                RolloutState::Halted {
                    reason: reason.clone(),
                }
            }
        };
        if block {
            if let Some(rel) = self.state.releases.get_mut(&r.release_id) {
                rel.blocked = Some(reason.clone());
                out.changes.releases.insert(r.release_id.clone());
            }
        }
        self.set_state(&r.id, state, out);
        self.end(&r.id, now, out);
        out.audit(Record::auto("halt", &r.id, Some(ring), reason));
    }

    /// Hold the rings a stopped rollout still stands on.
    fn stop_rings(&mut self, r: &Rollout, why: &str, now: Timestamp, out: &mut Out) {
        let prestaged = r.launch.iter().flat_map(|l| l.prestaged.iter());
        let mut rings: Vec<String> = r.rings_reached.iter().chain(prestaged).cloned().collect();
        rings.dedup();
        for ring in rings {
            let held = self.held_by(r, &ring);
            if !held.is_empty() {
                self.set_ring(
                    &ring,
                    &held,
                    &r.id,
                    Action::Hold,
                    None,
                    Percent::FULL,
                    Activation::default(),
                    now,
                    out,
                );
                out.audit(Record::auto(
                    "hold",
                    &r.id,
                    Some(&ring),
                    format!("hold published: {why}"),
                ));
            }
        }
    }

    /// Record fleet-coverage and restore times (only recent rollouts still missing one).
    fn track_insight(&mut self, now: Timestamp, fleet: &Fleet<'_>, out: &mut Out) {
        let week = SignedDuration::from_hours(24 * 7);
        let ids: Vec<String> = self
            .state
            .rollouts
            .values()
            .filter(|r| r.ended_at.is_none_or(|e| now.duration_since(e) < week))
            .filter(|r| match r.state {
                RolloutState::Halted { .. } | RolloutState::RolledBack { .. } => {
                    r.insight.restored_at.is_none()
                }
                _ => r.insight.fleet_full_at.is_none(),
            })
            .map(|r| r.id.clone())
            .collect();
        for id in ids {
            let Some(r) = self.state.rollouts.get(&id) else {
                continue;
            };
            let Some(rel) = self.state.releases.get(&r.release_id) else {
                continue;
            };
            let cov = fleet.coverage(r, &rel.release);
            let Some(rr) = self.state.rollouts.get_mut(&id) else {
                continue;
            };
            let before = rr.insight.clone();
            match rr.state {
                RolloutState::Halted { .. } | RolloutState::RolledBack { .. } => {
                    if cov.on_release == 0 && cov.in_flight == 0 {
                        rr.insight.restored_at = Some(now);
                    }
                }
                _ => {
                    if cov.fleet > 0
                        && cov.on_release * 2 >= cov.fleet
                        && rr.insight.fleet_half_at.is_none()
                    {
                        rr.insight.fleet_half_at = Some(now);
                    }
                    if cov.fleet > 0 && cov.on_release >= cov.fleet {
                        rr.insight.fleet_full_at = Some(now);
                    }
                }
            }
            if rr.insight != before {
                out.changes.rollouts.insert(id);
            }
        }
    }

    // ----- operator commands ----------------------------------------------------------------

    /// Every rule an agent applies, before anything changes: the envelope's size before it
    /// is parsed, both signatures, expiry, a sequence strictly above every earlier one of the
    /// name (whatever the release id), and at least one known device class it is for.
    fn submit(
        &mut self,
        s: Submit,
        actor: &Actor,
        artifact_stored: bool,
        now: Timestamp,
        fleet: &Fleet<'_>,
        out: &mut Out,
    ) -> Result<(ReleaseRecord, Rollout, Vec<String>)> {
        let size = s.envelope.to_vec().len();
        if size > ringcast_proto::limits::MAX_ENVELOPE_BYTES {
            return Err(Error::Rejected(Rejection::new(
                Reason::TooLarge,
                format!(
                    "release envelope is {size} bytes, over {}",
                    ringcast_proto::limits::MAX_ENVELOPE_BYTES
                ),
            )));
        }
        let skew = self.cfg.policy.allowed_skew.signed();
        let release = ringcast_proto::verify_release(&self.cfg.trust, &s.envelope, now, skew)?;
        let id = format!("{}-{}", release.name, release.sequence);
        let newest = self
            .state
            .releases
            .values()
            .filter(|r| r.release.name == release.name)
            .map(|r| r.release.sequence)
            .max();
        if let Some(existing) = self.state.releases.get(&id) {
            if existing.envelope != s.envelope {
                return Err(Error::conflict(
                    "sequence_reused",
                    format!("release {id} was already submitted with different content"),
                ));
            }
            if existing.blocked.is_some() {
                return Err(Error::conflict(
                    "release_blocked",
                    format!("release {id} was halted; unblock it first"),
                ));
            }
            if self
                .state
                .rollouts
                .values()
                .any(|r| r.release_id == id && r.state.is_live())
            {
                return Err(Error::conflict(
                    "already_rolling_out",
                    format!("release {id} already has a live rollout"),
                ));
            }
        }
        // (A release of the same name and sequence has this id, and was handled above.)
        if let Some(newer) = newest.filter(|&max| max > release.sequence) {
            return Err(Error::conflict(
                "sequence_not_increasing",
                format!(
                    "release {} has sequence {}, not above {newer} already submitted",
                    release.name, release.sequence
                ),
            ));
        }
        // An artifact the controller serves must be in the store before devices are sent there.
        if let Some(hex) = release.artifact.url.strip_prefix("/artifacts/sha256/") {
            if hex != release.artifact.sha256 || !artifact_stored {
                return Err(Error::conflict(
                    "artifact_missing",
                    format!(
                        "artifact {} ({} bytes) is not in the store; upload it first",
                        release.artifact.sha256, release.artifact.size
                    ),
                ));
            }
        }
        // The devices that run the product: a device running other products only does not
        // take it.
        let classes = fleet.classes(Some(&release.name));
        if !classes.is_empty() && !classes.iter().any(|c| release.is_compatible(c)) {
            return Err(Error::conflict(
                "incompatible",
                format!(
                    "release {id} is for {}; no device of the fleet is ({} known)",
                    release.compatible.join(","),
                    classes.into_iter().collect::<Vec<_>>().join(",")
                ),
            ));
        }
        let mut warnings: Vec<String> = self
            .undersized_rings(fleet, Some(&release.name))
            .into_iter()
            .map(|(ring, min, known)| {
                format!(
                    "ring {ring} has {known} known device(s), fewer than its gate's \
                     min_reports {min}: its last step cannot pass until more report"
                )
            })
            .collect();
        if classes.is_empty() && fleet.classes(None).is_empty() {
            warnings.push("no device has reported yet: compatibility not checked".into());
        } else if classes.is_empty() {
            warnings.push(format!(
                "no device runs product {} yet: compatibility not checked",
                release.name
            ));
        }

        let rec = ReleaseRecord {
            id: id.clone(),
            release: release.clone(),
            envelope: s.envelope,
            submitted_at: now,
            submitted_by: actor.name.clone(),
            blocked: None,
        };
        let mut rollout_id = id.clone();
        let mut n = 2;
        while self.state.rollouts.contains_key(&rollout_id) {
            rollout_id = format!("{id}-{n}");
            n += 1;
        }
        let live_same_name: Vec<String> = self
            .state
            .rollouts
            .values()
            .filter(|r| r.release_name == release.name && r.state.is_live())
            .map(|r| r.id.clone())
            .collect();
        let rule = self.cfg.policy.new_release_rule();
        let state = if live_same_name.is_empty() || rule == OnNewRelease::Supersede {
            RolloutState::Pending
        } else {
            RolloutState::Queued
        };
        let rollout = Rollout {
            id: rollout_id.clone(),
            release_id: id.clone(),
            release_name: release.name.clone(),
            release_sequence: release.sequence,
            created_at: now,
            start_at: s.start_at,
            activate_at: s.activate_at,
            state,
            paused: false,
            approvals: BTreeMap::new(),
            rings_reached: Vec::new(),
            history: Vec::new(),
            ended_at: None,
            final_tallies: BTreeMap::new(),
            insight: Default::default(),
            attempts: BTreeMap::new(),
            launch: s.activate_at.map(|_| Launch {
                mode: s.launch.unwrap_or_default(),
                held: false,
                prestaged: Vec::new(),
            }),
        };
        self.state.releases.insert(id.clone(), rec.clone());
        out.changes.releases.insert(id.clone());
        self.state
            .rollouts
            .insert(rollout_id.clone(), rollout.clone());
        out.changes.rollouts.insert(rollout_id.clone());
        let warned = if warnings.is_empty() {
            String::new()
        } else {
            format!("; warnings: {}", warnings.join("; "))
        };
        out.audit(actor.record(
            "release_submit",
            Some(&rollout_id),
            None,
            format!(
                "release {id} (version {}, for {}); rollout {}{warned}",
                release.version,
                release.compatible.join(","),
                rollout.state.phase()
            ),
        ));
        if rule == OnNewRelease::Supersede {
            for old in live_same_name {
                self.set_state(
                    &old,
                    RolloutState::Superseded {
                        by: rollout_id.clone(),
                    },
                    out,
                );
                self.end(&old, now, out);
                out.audit(Record::auto(
                    "supersede",
                    &old,
                    None,
                    format!("superseded by {rollout_id}"),
                ));
            }
        }
        for w in &warnings {
            warn!(rollout_id = %rollout_id, "{w}");
        }
        info!(rollout_id = %rollout_id, release = %id, "release submitted");
        Ok((rec, rollout, warnings))
    }

    #[allow(clippy::too_many_arguments)]
    fn act(
        &mut self,
        id: &str,
        action: RolloutAction,
        ring: Option<String>,
        actor: &Actor,
        now: Timestamp,
        fleet: &Fleet<'_>,
        out: &mut Out,
    ) -> Result<Rollout> {
        let r = self.rollout(id)?;
        if !r.state.is_live() {
            return Err(Error::conflict(
                "rollout_finished",
                format!("rollout {id} is {}", r.state.phase()),
            ));
        }
        if action == RolloutAction::Retry {
            return self.retry_now(&r, ring, actor, now, fleet, out);
        }
        let mut ring_name = None;
        let mut next = r.clone();
        match action {
            RolloutAction::Approve => {
                let name = match (ring, &r.state) {
                    (Some(n), _) => n,
                    (
                        None,
                        RolloutState::Active {
                            ring,
                            stage: Stage::WaitingApproval,
                            ..
                        },
                    ) => ring.clone(),
                    (None, _) => {
                        return Err(Error::conflict(
                            "not_waiting_approval",
                            format!(
                                "rollout {id} is {}; name a ring to approve ahead",
                                r.state.phase()
                            ),
                        ))
                    }
                };
                let rp = self.ring_policy(&name).ok_or_else(|| Error::NotFound {
                    what: "ring",
                    id: name.clone(),
                })?;
                if rp.promotion != Promotion::Manual {
                    return Err(Error::conflict(
                        "not_manual",
                        format!("ring {name} promotes automatically"),
                    ));
                }
                if r.approvals.contains_key(&name) {
                    return Err(Error::conflict(
                        "already_approved",
                        format!("ring {name} is already approved"),
                    ));
                }
                next.approvals.insert(
                    name.clone(),
                    Approval {
                        by: actor.name.clone(),
                        at: now,
                    },
                );
                ring_name = Some(name);
            }
            RolloutAction::Pause => {
                if r.paused {
                    return Err(Error::conflict(
                        "already_paused",
                        format!("rollout {id} is paused"),
                    ));
                }
                next.paused = true;
            }
            RolloutAction::Resume => {
                if !r.paused {
                    return Err(Error::conflict(
                        "not_paused",
                        format!("rollout {id} is not paused"),
                    ));
                }
                next.paused = false;
                // A pause stops the step's timeout: it starts over now. (A bake keeps its
                // start: the gate held, or was re-checked, all along.)
                if let RolloutState::Active { stage, .. } = &mut next.state {
                    match stage {
                        Stage::Publishing { since } => *since = now,
                        Stage::Baking { published, .. } => *published = Some(now),
                        _ => {}
                    }
                }
            }
            RolloutAction::Abort => {
                next.state = RolloutState::Aborted;
                next.ended_at = Some(now);
            }
            RolloutAction::Retry => unreachable!("handled above"),
        }
        // Validated: from here on it changes.
        out.audit(actor.record(
            action.as_str(),
            Some(id),
            ring_name.as_deref(),
            String::new(),
        ));
        self.state.rollouts.insert(id.into(), next.clone());
        out.changes.rollouts.insert(id.into());
        if action == RolloutAction::Abort {
            self.stop_rings(&next, "aborted", now, out);
        }
        Ok(next)
    }

    /// An operator's `retry`: every reached ring (or the named one) with devices that failed
    /// at its current attempt moves to the next attempt now, past its `retries` and backoff.
    fn retry_now(
        &mut self,
        r: &Rollout,
        ring: Option<String>,
        actor: &Actor,
        now: Timestamp,
        fleet: &Fleet<'_>,
        out: &mut Out,
    ) -> Result<Rollout> {
        if let Some(name) = &ring {
            if !r.rings_reached.contains(name) {
                return Err(Error::conflict(
                    "not_reached",
                    format!("rollout {} has not reached ring {name}", r.id),
                ));
            }
        }
        let rings: Vec<(String, u32, u32)> = r
            .rings_reached
            .iter()
            .filter(|g| ring.as_ref().is_none_or(|n| n == *g))
            .filter_map(|g| {
                let attempt = r.attempts.get(g).map_or(1, |a| a.attempt);
                let failed = fleet.failed_at(r, g, self.percent_on(r, g), attempt);
                (failed > 0).then(|| (g.clone(), attempt, failed))
            })
            .collect();
        if rings.is_empty() {
            return Err(Error::conflict(
                "nothing_to_retry",
                format!(
                    "no device of rollout {} failed at its current attempt",
                    r.id
                ),
            ));
        }
        for (g, attempt, failed) in &rings {
            out.audit(actor.record(
                "retry",
                Some(&r.id),
                Some(g),
                format!(
                    "attempt {}: {failed} failed device(s) asked again",
                    attempt + 1
                ),
            ));
            self.next_attempt(&r.id, g, attempt + 1, now, out);
        }
        self.rollout(&r.id)
    }

    /// A launch starts: every ring after `first` gets the release now, at its first step, to
    /// download and verify; it activates at the launch (`all`) or when its turn comes
    /// (`rings`: until then its directive says [`HELD`]).
    fn prestage(&mut self, id: &str, first: &str, now: Timestamp, out: &mut Out) {
        let Some(r) = self.state.rollouts.get(id).cloned() else {
            return;
        };
        let Some(launch) = r.launch.clone() else {
            return;
        };
        let rings: Vec<RingPolicy> = self
            .cfg
            .policy
            .rings
            .iter()
            .filter(|rp| rp.name != first)
            .cloned()
            .collect();
        let mut prestaged = Vec::new();
        for rp in &rings {
            let all = launch.mode == LaunchMode::All;
            let activation = Activation {
                not_before: if all && !launch.held {
                    r.activate_at
                } else {
                    Some(HELD)
                },
                windows: rp.windows.clone(),
                timezone: (!rp.windows.is_empty()).then(|| rp.timezone.clone()),
            };
            self.publish_ring(
                &rp.name,
                &r.release_name,
                id,
                Action::Install,
                Some(r.release_id.clone()),
                rp.steps[0],
                activation,
                now,
                out,
            );
            prestaged.push(rp.name.clone());
            out.audit(Record::auto(
                "prestage",
                id,
                Some(&rp.name),
                format!(
                    "install {} at {} to download and verify; activates {}",
                    r.release_id,
                    rp.steps[0],
                    if all {
                        "at the launch"
                    } else {
                        "when the ring's turn comes"
                    }
                ),
            ));
        }
        if let Some(rr) = self.state.rollouts.get_mut(id) {
            if let Some(l) = rr.launch.as_mut() {
                l.prestaged = prestaged.clone();
            }
            if launch.mode == LaunchMode::All {
                // Every ring activates at the launch: its gate watches it from then on.
                for g in prestaged {
                    if !rr.rings_reached.contains(&g) {
                        rr.rings_reached.push(g);
                    }
                }
            }
            out.changes.rollouts.insert(id.to_owned());
        }
    }

    /// An operator moves a launch to `at` or holds it (`None`). Every standing directive of
    /// the rollout is re-signed with the new activation time; devices keep what they staged.
    fn relaunch(
        &mut self,
        id: &str,
        at: Option<Timestamp>,
        actor: &Actor,
        now: Timestamp,
        out: &mut Out,
    ) -> Result<Rollout> {
        let r = self.rollout(id)?;
        if !r.state.is_live() {
            return Err(Error::conflict(
                "rollout_finished",
                format!("rollout {id} is {}", r.state.phase()),
            ));
        }
        let Some(launch) = r.launch.clone() else {
            return Err(Error::conflict(
                "not_a_launch",
                format!("rollout {id} has no launch time (submit it with activate_at)"),
            ));
        };
        if !launch.held && r.activate_at.is_some_and(|a| a <= now) {
            return Err(Error::conflict(
                "already_launched",
                format!("rollout {id} launched at {}", r.activate_at.unwrap_or(now)),
            ));
        }
        if let Some(t) = at {
            if t <= now {
                return Err(Error::conflict(
                    "launch_in_past",
                    format!("launch time {t} is not in the future (now {now})"),
                ));
            }
        }
        let detail = match at {
            Some(t) => format!("launch moved to {t}"),
            None => {
                "launch held: nothing activates until a new launch time; staged downloads are kept"
                    .to_owned()
            }
        };
        out.audit(actor.record("launch", Some(id), None, detail));
        let mut next = r.clone();
        if let Some(t) = at {
            next.activate_at = Some(t);
        }
        if let Some(l) = next.launch.as_mut() {
            l.held = at.is_none();
        }
        self.state.rollouts.insert(id.to_owned(), next.clone());
        out.changes.rollouts.insert(id.to_owned());
        // Rings that activate at the launch get the new time; rings held for their turn stay.
        // Its product's records and the single-product ones it still holds.
        let keys: Vec<String> = self
            .state
            .rings
            .iter()
            .filter(|(_, d)| {
                d.rollout_id == id && d.device.is_none() && d.action == Action::Install
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            let Some(mut spec) = self.state.rings.get(&key).cloned() else {
                continue;
            };
            let waits_for_turn = !next.rings_reached.contains(&spec.ring);
            spec.activation.not_before = match at {
                Some(t) if !waits_for_turn => Some(t),
                _ => Some(HELD),
            };
            self.sign(&mut spec, now, out);
            self.state.rings.insert(key.clone(), spec);
            out.changes.rings.insert(key);
        }
        Ok(next)
    }

    fn unblock(&mut self, id: &str, actor: &Actor, out: &mut Out) -> Result<ReleaseRecord> {
        let r = self.state.releases.get_mut(id).ok_or(Error::NotFound {
            what: "release",
            id: id.into(),
        })?;
        if r.blocked.take().is_none() {
            return Err(Error::conflict(
                "not_blocked",
                format!("release {id} is not blocked"),
            ));
        }
        let rec = r.clone();
        out.changes.releases.insert(id.into());
        out.audit(actor.record("unblock", None, None, format!("release {id}")));
        Ok(rec)
    }

    /// Pin `device` to `release_id`: a signed, retained per-device `install` that the agent
    /// prefers over its ring's directive until unpinned or its ring gets a new rollout. It is
    /// published on the device's topic for the release's product and on its single-product
    /// topic (as ring directives are), each a record with its own sequence; the reply is the
    /// product's.
    fn pin(
        &mut self,
        device: &str,
        release_id: &str,
        actor: &Actor,
        now: Timestamp,
        fleet: &Fleet<'_>,
        out: &mut Out,
    ) -> Result<DevicePin> {
        let detail = format!("device {device}: pin to {release_id}");
        let checked = self.check_pin(device, release_id, fleet);
        let (ring, product) = match checked {
            Ok(v) => v,
            Err(e) => {
                out.audit(actor.refused("pin", None, detail, &e));
                return Err(e);
            }
        };
        // Numbered over all of the device's records, so a pin's rollout id is never reused,
        // whatever product an earlier pin was for.
        let issued = self
            .state
            .pins
            .values()
            .filter(|p| p.directive.device.as_deref() == Some(device))
            .map(|p| p.issued)
            .max()
            .unwrap_or(0)
            + 1;
        let rollout_id = format!("pin-{device}-{issued}");
        let record = |p: Option<&str>| DevicePin {
            directive: RingDirective {
                ring: ring.clone(),
                device: Some(device.into()),
                product: p.map(str::to_owned),
                rollout_id: rollout_id.clone(),
                action: Action::Install,
                release_id: Some(release_id.into()),
                percent: Percent::FULL,
                activation: Activation::default(),
                // This topic's own last sequence.
                sequence: self
                    .state
                    .pins
                    .get(&directive_key(device, p))
                    .map_or(0, |x| x.directive.sequence),
                issued_at: now,
                expires_at: now,
            },
            by: actor.name.clone(),
            at: now,
            // What stands on the ring for the same topic kind: only a new rollout there ends
            // this record.
            ring_rollout: self
                .state
                .rings
                .get(&directive_key(&ring, p))
                .map(|d| d.rollout_id.clone()),
            issued,
            ended: None,
        };
        let (mine, single) = (record(Some(&product)), record(None));
        let pin = self.set_pin(mine, now, out);
        self.set_pin(single, now, out);
        out.audit(actor.record("pin", Some(&rollout_id), Some(&ring), detail));
        info!(%device, release = %release_id, %rollout_id, "device pinned");
        Ok(pin)
    }

    fn check_pin(
        &self,
        device: &str,
        release_id: &str,
        fleet: &Fleet<'_>,
    ) -> Result<(String, String)> {
        let facts = fleet.device(device).ok_or_else(|| Error::NotFound {
            what: "device",
            id: device.into(),
        })?;
        let rel = self
            .state
            .releases
            .get(release_id)
            .ok_or_else(|| Error::NotFound {
                what: "release",
                id: release_id.into(),
            })?;
        if let Some(why) = &rel.blocked {
            return Err(Error::conflict(
                "release_blocked",
                format!("release {release_id} was halted ({why}); unblock it first"),
            ));
        }
        // The agent would refuse it (`incompatible`): say so now, not after publishing.
        if !rel.release.is_compatible(&facts.class) {
            return Err(Error::conflict(
                "incompatible",
                format!(
                    "release {release_id} is for {}, device {device} is a {}",
                    rel.release.compatible.join(","),
                    facts.class
                ),
            ));
        }
        // A device running several products hears only the topics of those it runs.
        let product = rel.release.name.clone();
        if !facts.runs(&product) {
            return Err(Error::conflict(
                "incompatible",
                format!("device {device} does not run product {product}"),
            ));
        }
        Ok((facts.ring, product))
    }

    /// End `device`'s pin for `product` with a per-device `hold` (and the single-product
    /// record of the same pin with it). Without a product: the device's one standing pin.
    fn unpin(
        &mut self,
        device: &str,
        product: Option<&str>,
        actor: &Actor,
        now: Timestamp,
        fleet: &Fleet<'_>,
        out: &mut Out,
    ) -> Result<DevicePin> {
        let detail = match product {
            Some(p) => format!("device {device}: unpin {p}"),
            None => format!("device {device}: unpin"),
        };
        let found = self.pin_to_end(device, product, fleet);
        let pin = match found {
            Ok(p) => p,
            Err(e) => {
                out.audit(actor.refused("unpin", None, detail, &e));
                return Err(e);
            }
        };
        let released = pin.pinned_release().unwrap_or_default().to_owned();
        let (rollout_id, ring) = (pin.directive.rollout_id.clone(), pin.directive.ring.clone());
        let single = self
            .state
            .pins
            .get(device)
            .filter(|l| pin.directive.product.is_some() && l.directive.rollout_id == rollout_id)
            .filter(|l| l.pinned_release().is_some())
            .cloned();
        let ended = self.end_pin(pin, &actor.name, "unpinned".into(), now, out);
        if let Some(l) = single {
            self.end_pin(l, &actor.name, "unpinned".into(), now, out);
        }
        out.audit(actor.record(
            "unpin",
            Some(&rollout_id),
            Some(&ring),
            format!("{detail} (was pinned to {released})"),
        ));
        info!(%device, %rollout_id, "device unpinned");
        Ok(ended)
    }

    /// The standing pin an unpin of `device` (for `product`, or its only one) ends.
    fn pin_to_end(
        &self,
        device: &str,
        product: Option<&str>,
        fleet: &Fleet<'_>,
    ) -> Result<DevicePin> {
        let standing: Vec<&DevicePin> = self
            .state
            .pins
            .values()
            .filter(|p| p.directive.device.as_deref() == Some(device))
            .filter(|p| p.pinned_release().is_some())
            .collect();
        let of = |p: Option<&str>| {
            standing
                .iter()
                .find(|x| x.directive.product.as_deref() == p)
                .map(|x| (*x).clone())
        };
        let products: Vec<&str> = standing
            .iter()
            .filter_map(|p| p.directive.product.as_deref())
            .collect();
        let found = match (product, products.as_slice()) {
            (Some(p), _) => of(Some(p)),
            (None, [one]) => of(Some(one)),
            // Persisted before products: only the single-product record.
            (None, []) => of(None),
            (None, many) => {
                return Err(Error::conflict(
                    "pin_ambiguous",
                    format!(
                        "device {device} is pinned for products {}: name the one to unpin",
                        many.join(", ")
                    ),
                ))
            }
        };
        found.ok_or_else(|| {
            let known = fleet.device(device).is_some()
                || self
                    .state
                    .pins
                    .values()
                    .any(|p| p.directive.device.as_deref() == Some(device));
            if known {
                let what = product.map(|p| format!(" for {p}")).unwrap_or_default();
                Error::conflict("not_pinned", format!("device {device} is not pinned{what}"))
            } else {
                Error::NotFound {
                    what: "device",
                    id: device.into(),
                }
            }
        })
    }

    /// Replace a pin's directive with a `hold` (same rollout id: it ends that pin).
    fn end_pin(
        &mut self,
        mut pin: DevicePin,
        by: &str,
        why: String,
        now: Timestamp,
        out: &mut Out,
    ) -> DevicePin {
        pin.directive.action = Action::Hold;
        pin.directive.release_id = None;
        pin.by = by.into();
        pin.at = now;
        pin.ended = Some(why);
        self.set_pin(pin, now, out)
    }

    /// Sign a device's directive and keep it standing (persisted before it is published).
    fn set_pin(&mut self, mut pin: DevicePin, now: Timestamp, out: &mut Out) -> DevicePin {
        self.sign(&mut pin.directive, now, out);
        let key = pin.directive.key();
        self.state.pins.insert(key.clone(), pin.clone());
        out.changes.pins.insert(key);
        pin
    }

    /// A ring directive for a new rollout ends the pins of that ring's devices on the devices
    /// themselves (agent rule, per product: a product's ring directive ends that product's
    /// pin, the single-product ring directive the single-product pin), so every device
    /// directive of the ring for `products` (a standing pin, or the hold an unpin left) has
    /// nothing more to say: it is deleted (persisted first) and its retained message cleared,
    /// so neither a re-signing nor a restart brings it back. Pins of other products stay.
    fn retire_pins_of_ring(
        &mut self,
        ring: &str,
        products: &[Option<String>],
        rollout_id: &str,
        out: &mut Out,
    ) {
        let ending: Vec<(String, DevicePin)> = self
            .state
            .pins
            .iter()
            .filter(|(_, p)| p.directive.ring == ring && products.contains(&p.directive.product))
            .filter(|(_, p)| p.ring_rollout.as_deref() != Some(rollout_id))
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        // One audit entry per pin, though it may end on two topics (its product's and the
        // single-product one).
        let mut told: Vec<String> = Vec::new();
        for (key, pin) in ending {
            let device = pin.directive.device.clone().unwrap_or_default();
            let pin_id = pin.directive.rollout_id.clone();
            self.state.pins.remove(&key);
            out.changes.pins.insert(key);
            let topic =
                self.cfg
                    .topics
                    .directive(ring, Some(&device), pin.directive.product.as_deref());
            out.publish(topic, Vec::new());
            if told.contains(&pin_id) {
                continue;
            }
            told.push(pin_id.clone());
            let why = format!("ring {ring} got rollout {rollout_id}");
            let (action, detail) = match pin.pinned_release() {
                Some(release) => (
                    "unpin",
                    format!("device {device}: pin to {release} ended: {why}"),
                ),
                None => (
                    "pin_retired",
                    format!("device {device}: hold retired: {why}"),
                ),
            };
            out.audit(Record::auto(action, &pin_id, Some(ring), detail));
            info!(%device, %pin_id, %ring, "new ring rollout retires the device directive");
        }
    }
}
