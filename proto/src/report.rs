//! What agents publish: retained state reports and QoS 1 events.

use crate::error::{Reason, Rejection, Result};
use crate::limits::MAX_REPORT_BYTES;
use crate::window::Window;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Agent phases (DESIGN.md "Agent state machine").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Nothing in progress.
    Idle,
    /// Fetching the artifact.
    Downloading,
    /// Checking the downloaded artifact.
    Verifying,
    /// Downloaded and verified; waiting for activation time and window.
    Staged,
    /// Staged, and the device's defer hook answered "not now" (battery low, user active):
    /// asked again after the hook's `retry`, until the deferral's deadline, after which the
    /// update proceeds without asking. Not a failure, not yet activated.
    Deferred,
    /// Activating.
    Installing,
    /// Activated; health checks running.
    Probation,
    /// Healthy through probation: success.
    Committed,
    /// Going back to the previous release.
    Reverting,
    /// Back on the previous release after a failure.
    Reverted,
    /// The install could not be carried out (e.g. pre-activation hook failed); nothing changed.
    Failed,
}

impl Phase {
    /// The `snake_case` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Downloading => "downloading",
            Phase::Verifying => "verifying",
            Phase::Staged => "staged",
            Phase::Deferred => "deferred",
            Phase::Installing => "installing",
            Phase::Probation => "probation",
            Phase::Committed => "committed",
            Phase::Reverting => "reverting",
            Phase::Reverted => "reverted",
            Phase::Failed => "failed",
        }
    }

    /// Whether the controller counts this as a failure of the target release.
    pub fn is_failure(self) -> bool {
        matches!(self, Phase::Reverting | Phase::Reverted | Phase::Failed)
    }
}

/// A release as reports name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRef {
    /// Release name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Sequence.
    pub sequence: u64,
}

/// Last error, with its stable reason code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Stable code (a [`Reason`] code, or an agent-side code such as `health_check_failed`).
    pub reason: String,
    /// Human explanation.
    pub detail: String,
}

/// The retained state report on `…/devices/{device}/state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateReport {
    /// Device id.
    pub device: String,
    /// Per-device report sequence: every report the device publishes carries a higher one
    /// (`max(last + 1, unix time in ms)`, persisted on the device, so a restart or a wiped
    /// store still counts upwards). The controller never replaces a report with one of a lower
    /// `seq` (e.g. a retained copy a broker restored from an old save). 0 = an agent from before
    /// the field, ordered as before: any different report replaces it.
    #[serde(default)]
    pub seq: u64,
    /// Ring.
    pub ring: String,
    /// Device class.
    pub device_class: String,
    /// Agent version.
    pub agent_version: String,
    /// Running release.
    pub current: Option<ReleaseRef>,
    /// Release kept for revert.
    pub previous: Option<ReleaseRef>,
    /// Release being worked on (downloading … probation, or the one that was reverted).
    #[serde(default)]
    pub target: Option<ReleaseRef>,
    /// Phase.
    pub phase: Phase,
    /// Rollout the phase belongs to.
    pub rollout_id: Option<String>,
    /// Last error.
    pub last_error: Option<ErrorInfo>,
    /// The rollout whose directive this device refused, and why (`rollback_floor`,
    /// `incompatible`, …): a verified directive whose release the device cannot take. The
    /// controller counts the device as `refused` for that rollout, never as pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
    /// The attempt of the rollout's directive the phase belongs to (see
    /// [`crate::Directive::attempt`]): a `failed` report at attempt 1 of a ring allowed two
    /// retries is a device that will try again. Absent on the wire when 1.
    #[serde(
        default = "crate::directive::first_attempt",
        skip_serializing_if = "crate::directive::is_first_attempt"
    )]
    pub attempt: u32,
    /// The device's own delivery windows.
    #[serde(default)]
    pub windows: Vec<Window>,
    /// The device's time zone.
    pub timezone: String,
    /// When this report was produced (device's trusted time).
    pub updated_at: Timestamp,
    /// An agent running several products (docs/operations.md "Products") reports each here,
    /// keyed by product name (= release name), and leaves the fields above that describe one
    /// release empty (`current`/`previous`/`target`/`rollout_id`/`last_error`/`refused` absent,
    /// `phase` `idle`). Absent on the wire for a single-product agent, whose report is as
    /// before: its fields above describe every release it is sent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub products: BTreeMap<String, ProductState>,
}

/// One product's part of a [`StateReport`]: the same fields a single-product report carries
/// at its top level, for that product alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductState {
    /// Running release of this product.
    pub current: Option<ReleaseRef>,
    /// Release kept for revert.
    #[serde(default)]
    pub previous: Option<ReleaseRef>,
    /// Release being worked on.
    #[serde(default)]
    pub target: Option<ReleaseRef>,
    /// Phase.
    pub phase: Phase,
    /// Rollout the phase belongs to.
    #[serde(default)]
    pub rollout_id: Option<String>,
    /// Last error.
    #[serde(default)]
    pub last_error: Option<ErrorInfo>,
    /// A refused rollout of this product (see [`StateReport::refused`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refusal>,
    /// The attempt the phase belongs to (see [`StateReport::attempt`]).
    #[serde(
        default = "crate::directive::first_attempt",
        skip_serializing_if = "crate::directive::is_first_attempt"
    )]
    pub attempt: u32,
    /// This product's delivery windows (the device's own apply as well).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<Window>,
}

impl ProductState {
    /// A product with nothing installed and nothing under way (what an agent reports for a
    /// product it has not been sent anything of).
    pub fn idle() -> ProductState {
        ProductState {
            current: None,
            previous: None,
            target: None,
            phase: Phase::Idle,
            rollout_id: None,
            last_error: None,
            refused: None,
            attempt: 1,
            windows: Vec::new(),
        }
    }
}

/// Most products one agent may report (an OS image, an application, firmware, … ).
pub const MAX_PRODUCTS: usize = 16;

/// How a state report relates to the one kept before it ([`StateReport::order_against`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Later: replaces the kept one.
    Newer,
    /// The same report again.
    Same,
    /// Earlier than the kept one: ignored.
    Stale,
}

/// A rollout a device refused (see [`StateReport::refused`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The rollout of the refused directive.
    pub rollout_id: String,
    /// Why.
    pub reason: Reason,
    /// Detail.
    pub detail: String,
}

/// A QoS 1 event on `…/devices/{device}/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique id, so duplicates are recognised.
    pub id: String,
    /// Device id.
    pub device: String,
    /// When.
    pub at: Timestamp,
    /// Rollout it concerns, if any.
    #[serde(default)]
    pub rollout_id: Option<String>,
    /// Release it concerns, if any.
    #[serde(default)]
    pub release: Option<ReleaseRef>,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Event kinds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// A directive was accepted.
    Accepted,
    /// A directive, trust root or artifact was refused.
    Rejected {
        /// Stable reason.
        reason: Reason,
        /// Detail.
        detail: String,
    },
    /// Download progress.
    Downloading {
        /// Bytes so far.
        received: u64,
        /// Declared size.
        total: u64,
    },
    /// Download failed; will retry.
    DownloadFailed {
        /// Stable code.
        reason: String,
        /// Detail.
        detail: String,
        /// Milliseconds until the retry.
        retry_in_ms: u64,
    },
    /// Downloaded and verified.
    Downloaded,
    /// Waiting for activation.
    Staged,
    /// The defer hook answered "not now": the device waits until it says go, or until
    /// `until`. Sent when a deferral starts and when its reason changes, not at every ask.
    Deferred {
        /// The hook's reason (the last line it printed).
        reason: String,
        /// The deadline: from then on the update proceeds without asking.
        until: Timestamp,
    },
    /// The defer hook failed (an exit other than 0 or 75, a timeout, could not start): the
    /// update goes ahead, because a broken hook must never block updates.
    DeferHookFailed {
        /// How it failed, and the tail of its output.
        detail: String,
    },
    /// Activated.
    Installed,
    /// A health round passed.
    Healthy,
    /// Probation completed.
    Committed,
    /// Reverted, with evidence.
    Reverted {
        /// Stable code: `health_check_failed`, `too_many_restarts`, `post_activate_failed`, …
        reason: String,
        /// The check that failed.
        #[serde(default)]
        check: Option<String>,
        /// Tail of its output.
        #[serde(default)]
        output: Option<String>,
    },
    /// Install failed before activation; nothing changed.
    InstallFailed {
        /// Stable code.
        reason: String,
        /// Detail.
        detail: String,
    },
    /// A new trust root was accepted.
    TrustRotated {
        /// Its version.
        version: u64,
    },
    /// A hold directive was accepted.
    Held,
    /// Work that had not activated (a download, a verification, a staged release) was
    /// dropped for a directive that is not a hold; the device keeps what it runs.
    Cancelled {
        /// Stable code: `already_current`, `superseded`, `failed_before`, `not_in_ramp`.
        reason: String,
    },
}

impl EventKind {
    /// The `snake_case` name of the kind.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Accepted => "accepted",
            EventKind::Rejected { .. } => "rejected",
            EventKind::Downloading { .. } => "downloading",
            EventKind::DownloadFailed { .. } => "download_failed",
            EventKind::Downloaded => "downloaded",
            EventKind::Staged => "staged",
            EventKind::Deferred { .. } => "deferred",
            EventKind::DeferHookFailed { .. } => "defer_hook_failed",
            EventKind::Installed => "installed",
            EventKind::Healthy => "healthy",
            EventKind::Committed => "committed",
            EventKind::Reverted { .. } => "reverted",
            EventKind::InstallFailed { .. } => "install_failed",
            EventKind::TrustRotated { .. } => "trust_rotated",
            EventKind::Held => "held",
            EventKind::Cancelled { .. } => "cancelled",
        }
    }
}

fn parse_bounded<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T> {
    if bytes.len() > MAX_REPORT_BYTES {
        return Err(Rejection::new(
            Reason::TooLarge,
            format!("{what} is {} bytes, over {MAX_REPORT_BYTES}", bytes.len()),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| Rejection::malformed(format!("{what}: {e}")))
}

impl StateReport {
    /// How `self` relates to `older`, a report kept for the same device: [`Order::Newer`]
    /// replaces it, [`Order::Same`] is the same report seen again (a retained copy
    /// redelivered), [`Order::Stale`] is older and must be ignored.
    pub fn order_against(&self, older: &StateReport) -> Order {
        if self.seq == 0 && older.seq == 0 {
            // Neither carries a sequence (agents before it): a different report is news.
            return if self == older {
                Order::Same
            } else {
                Order::Newer
            };
        }
        match self.seq.cmp(&older.seq) {
            std::cmp::Ordering::Greater => Order::Newer,
            std::cmp::Ordering::Less => Order::Stale,
            std::cmp::Ordering::Equal => Order::Same,
        }
    }

    /// Parse with the report size limit.
    pub fn parse(bytes: &[u8]) -> Result<StateReport> {
        let r: StateReport = parse_bounded("state report", bytes)?;
        if r.products.len() > MAX_PRODUCTS {
            return Err(Rejection::new(
                Reason::TooLarge,
                format!(
                    "state report lists {} products, over {MAX_PRODUCTS}",
                    r.products.len()
                ),
            ));
        }
        for name in r.products.keys() {
            crate::limits::check_name("product", name)?;
        }
        Ok(r)
    }

    /// Whether this report comes from an agent that runs several products (it has a
    /// `products` map).
    pub fn is_multi_product(&self) -> bool {
        !self.products.is_empty()
    }

    /// The report as it concerns releases named `product`, shaped like a single-product
    /// report: the report itself from a single-product agent (which takes every release it is
    /// sent), the product's entry lifted to the top from a multi-product agent, or `None` when
    /// that agent does not run the product (it is not part of that product's rollouts).
    pub fn for_product(&self, product: &str) -> Option<Cow<'_, StateReport>> {
        if self.products.is_empty() {
            return Some(Cow::Borrowed(self));
        }
        let p = self.products.get(product)?;
        Some(Cow::Owned(StateReport {
            device: self.device.clone(),
            seq: self.seq,
            ring: self.ring.clone(),
            device_class: self.device_class.clone(),
            agent_version: self.agent_version.clone(),
            current: p.current.clone(),
            previous: p.previous.clone(),
            target: p.target.clone(),
            phase: p.phase,
            rollout_id: p.rollout_id.clone(),
            last_error: p.last_error.clone(),
            refused: p.refused.clone(),
            attempt: p.attempt,
            windows: self.windows.iter().chain(&p.windows).cloned().collect(),
            timezone: self.timezone.clone(),
            updated_at: self.updated_at,
            products: BTreeMap::new(),
        }))
    }

    /// Serialise.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Event {
    /// Parse with the report size limit.
    pub fn parse(bytes: &[u8]) -> Result<Event> {
        parse_bounded("event", bytes)
    }

    /// Serialise.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_round_trip_with_flattened_kind() {
        let e = Event {
            id: "dev-1-42".into(),
            device: "dev-1".into(),
            at: "2026-11-23T00:00:00Z".parse().unwrap(),
            rollout_id: Some("r1".into()),
            release: None,
            kind: EventKind::Reverted {
                reason: "health_check_failed".into(),
                check: Some("app".into()),
                output: Some("boom".into()),
            },
        };
        let bytes = e.to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["event"], "reverted");
        assert_eq!(v["check"], "app");
        assert_eq!(Event::parse(&bytes).unwrap(), e);
        let rej = Event {
            kind: EventKind::Rejected {
                reason: Reason::Replayed,
                detail: "x".into(),
            },
            ..e
        };
        let v: serde_json::Value = serde_json::from_slice(&rej.to_bytes()).unwrap();
        assert_eq!(v["reason"], "replayed");
    }

    #[test]
    fn oversized_report_is_refused() {
        let big = vec![b' '; MAX_REPORT_BYTES + 1];
        assert_eq!(
            StateReport::parse(&big).unwrap_err().reason,
            Reason::TooLarge
        );
        assert_eq!(Event::parse(b"{").unwrap_err().reason, Reason::Malformed);
    }

    fn report(seq: u64, phase: Phase) -> StateReport {
        StateReport {
            device: "d".into(),
            seq,
            ring: "canary".into(),
            device_class: "c".into(),
            agent_version: "t".into(),
            current: None,
            previous: None,
            target: None,
            phase,
            rollout_id: None,
            last_error: None,
            refused: None,
            windows: vec![],
            timezone: "UTC".into(),
            updated_at: "2026-11-23T00:00:00Z".parse().unwrap(),
            attempt: 1,
            products: BTreeMap::new(),
        }
    }

    #[test]
    fn a_product_entry_reads_like_a_single_product_report() {
        let single = report(4, Phase::Probation);
        assert!(matches!(single.for_product("os"), Some(Cow::Borrowed(_))));
        assert!(!single.is_multi_product());
        let v = serde_json::to_value(&single).unwrap();
        assert!(v.get("products").is_none(), "absent on the wire when empty");

        let mut multi = report(5, Phase::Idle);
        let os = ReleaseRef {
            name: "os".into(),
            version: "2.0.0".into(),
            sequence: 20,
        };
        multi.products.insert(
            "os".into(),
            ProductState {
                current: Some(os.clone()),
                previous: None,
                target: Some(os.clone()),
                phase: Phase::Committed,
                rollout_id: Some("os-20".into()),
                last_error: None,
                refused: None,
                attempt: 2,
                windows: vec![Window::parse("Sun 01:00-03:00").unwrap()],
            },
        );
        let bytes = multi.to_bytes();
        let back = StateReport::parse(&bytes).unwrap();
        assert_eq!(back, multi);
        let view = back.for_product("os").unwrap();
        assert_eq!(view.phase, Phase::Committed);
        assert_eq!(view.current.as_ref(), Some(&os));
        assert_eq!(view.rollout_id.as_deref(), Some("os-20"));
        assert_eq!(view.attempt, 2);
        assert_eq!(view.windows.len(), 1);
        assert!(view.products.is_empty());
        assert!(
            back.for_product("app").is_none(),
            "a product it does not run"
        );

        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["products"]["bad/name"] = v["products"]["os"].clone();
        assert_eq!(
            StateReport::parse(&serde_json::to_vec(&v).unwrap())
                .unwrap_err()
                .reason,
            Reason::Malformed
        );
    }

    #[test]
    fn reports_are_ordered_by_sequence_never_by_content() {
        let kept = report(10, Phase::Committed);
        assert_eq!(report(11, Phase::Idle).order_against(&kept), Order::Newer);
        assert_eq!(
            report(9, Phase::Probation).order_against(&kept),
            Order::Stale,
            "an older report is stale even though it differs"
        );
        assert_eq!(kept.clone().order_against(&kept), Order::Same);
        // A report from before the field never wins over one that carries it.
        assert_eq!(report(0, Phase::Idle).order_against(&kept), Order::Stale);
        assert_eq!(kept.order_against(&report(0, Phase::Idle)), Order::Newer);
        // Between reports without a sequence, any difference is news (the old behaviour).
        let a = report(0, Phase::Idle);
        assert_eq!(report(0, Phase::Staged).order_against(&a), Order::Newer);
        assert_eq!(a.clone().order_against(&a), Order::Same);
    }

    #[test]
    fn a_report_without_seq_parses_as_zero() {
        let mut v = serde_json::to_value(report(5, Phase::Idle)).unwrap();
        v.as_object_mut().unwrap().remove("seq");
        let r = StateReport::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(r.seq, 0);
    }

    #[test]
    fn deferred_is_a_phase_and_an_event_on_the_wire() {
        let mut r = report(3, Phase::Deferred);
        r.last_error = Some(ErrorInfo {
            reason: "deferred".into(),
            detail: "battery low".into(),
        });
        let v: serde_json::Value = serde_json::from_slice(&r.to_bytes()).unwrap();
        assert_eq!(v["phase"], "deferred");
        assert_eq!(StateReport::parse(&r.to_bytes()).unwrap(), r);
        assert!(!Phase::Deferred.is_failure(), "deferring is not failing");
        let until: Timestamp = "2026-11-24T00:00:00Z".parse().unwrap();
        let e = Event {
            id: "dev-1-7".into(),
            device: "dev-1".into(),
            at: "2026-11-23T00:00:00Z".parse().unwrap(),
            rollout_id: Some("r1".into()),
            release: None,
            kind: EventKind::Deferred {
                reason: "battery low".into(),
                until,
            },
        };
        let v: serde_json::Value = serde_json::from_slice(&e.to_bytes()).unwrap();
        assert_eq!(v["event"], "deferred");
        assert_eq!(v["reason"], "battery low");
        assert_eq!(v["until"], "2026-11-24T00:00:00Z");
        assert_eq!(Event::parse(&e.to_bytes()).unwrap(), e);
        assert_eq!(e.kind.name(), "deferred");
        let broken = EventKind::DeferHookFailed {
            detail: "exit 1".into(),
        };
        assert_eq!(broken.name(), "defer_hook_failed");
        let v = serde_json::to_value(&broken).unwrap();
        assert_eq!(v["event"], "defer_hook_failed");
    }

    #[test]
    fn failure_phases() {
        assert!(Phase::Reverted.is_failure());
        assert!(Phase::Failed.is_failure());
        assert!(!Phase::Committed.is_failure());
        assert!(!Phase::Probation.is_failure());
    }
}
