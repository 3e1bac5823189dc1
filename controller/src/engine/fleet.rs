//! What the decision core may know about the devices: a read-only view of the device table
//! (kept by ingestion) and, through a small port, the devices' event history. The actor builds
//! one for each decision; the core's tests build one over a map they fill themselves.

use super::gate;
use super::halt::FailureEvidence;
use super::insight;
use crate::model::{DeviceRecord, Rollout, Tally};
use jiff::{SignedDuration, Timestamp};
use ringcast_proto::{in_ramp, Event, EventKind, Percent, Release};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The devices' event history, as the halt reason needs it.
pub trait EventLookup {
    /// The newest kept event of `device` that `matches`.
    fn newest(&self, device: &str, matches: &dyn Fn(&Event) -> bool) -> Option<Event>;
}

/// No event history (tests that need none).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEvents;

impl EventLookup for NoEvents {
    fn newest(&self, _: &str, _: &dyn Fn(&Event) -> bool) -> Option<Event> {
        None
    }
}

impl EventLookup for crate::store::Store {
    fn newest(&self, device: &str, matches: &dyn Fn(&Event) -> bool) -> Option<Event> {
        match self.newest_device_event(device, matches) {
            Ok(e) => e.map(|x| x.event),
            Err(e) => {
                tracing::warn!(device, error = %e, "reading device events failed");
                None
            }
        }
    }
}

/// Most devices whose evidence a reason string gathers (a halt in a big ring must not wait).
pub const MAX_EVIDENCE: usize = 256;

/// A device's ring and class, from its last report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFacts {
    /// Ring.
    pub ring: String,
    /// Device class.
    pub class: String,
    /// The products it runs, when it reports several; empty for an agent without products,
    /// which takes releases of every name.
    pub products: BTreeSet<String>,
}

impl DeviceFacts {
    /// Whether releases named `product` are for it.
    pub fn runs(&self, product: &str) -> bool {
        self.products.is_empty() || self.products.contains(product)
    }
}

/// The fleet as one decision sees it.
pub struct Fleet<'a> {
    devices: &'a HashMap<String, DeviceRecord>,
    events: &'a dyn EventLookup,
    unresponsive_after: SignedDuration,
    complete: bool,
}

impl<'a> Fleet<'a> {
    /// A view of `devices` with `events` for evidence.
    pub fn new(
        devices: &'a HashMap<String, DeviceRecord>,
        events: &'a dyn EventLookup,
        unresponsive_after: SignedDuration,
    ) -> Fleet<'a> {
        Fleet {
            devices,
            events,
            unresponsive_after,
            complete: true,
        }
    }

    /// Mark whether the table holds the whole fleet (see [`Fleet::is_complete`]).
    pub fn complete(mut self, complete: bool) -> Fleet<'a> {
        self.complete = complete;
        self
    }

    /// Whether the table holds the whole fleet. After a restart it may not yet (the broker's
    /// retained reports are still being re-read): then no decision may rest on a device's
    /// absence.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Devices of the ramp that failed at `attempt` or later (see [`gate::failed_at`]).
    pub fn failed_at(&self, rollout: &Rollout, ring: &str, percent: Percent, attempt: u32) -> u32 {
        gate::failed_at(self.devices, rollout, ring, percent, attempt)
    }

    /// The ring's tally for `rollout` at the ramp `percent`.
    pub fn tally(&self, rollout: &Rollout, ring: &str, percent: Percent, now: Timestamp) -> Tally {
        gate::tally(
            self.devices,
            rollout,
            ring,
            percent,
            now,
            self.unresponsive_after,
        )
    }

    /// Reports of the devices that run `product` (every reported device for `None`). A
    /// device's ring and class are the same in every product's view, so they are read from the
    /// report itself: nothing is copied.
    fn running<'b>(&'b self, product: Option<&'b str>) -> impl Iterator<Item = &'b DeviceRecord> {
        self.devices.values().filter(move |d| {
            d.report.as_ref().is_some_and(|r| {
                product.is_none_or(|p| !r.is_multi_product() || r.products.contains_key(p))
            })
        })
    }

    /// Every known device of `ring` that runs `product` (`None`: every one), by id.
    pub fn ring_devices(&self, ring: &str, product: Option<&str>) -> Vec<String> {
        let mut v: Vec<String> = self
            .running(product)
            .filter(|d| d.report.as_ref().is_some_and(|r| r.ring == ring))
            .map(|d| d.id.clone())
            .collect();
        v.sort();
        v
    }

    /// Known devices per ring that run `product` (`None`: every known device).
    pub fn ring_sizes(&self, product: Option<&str>) -> BTreeMap<String, u32> {
        let mut m = BTreeMap::new();
        for r in self.running(product).filter_map(|d| d.report.as_ref()) {
            *m.entry(r.ring.clone()).or_insert(0) += 1;
        }
        m
    }

    /// Device classes the fleet's devices that run `product` report (`None`: every device).
    pub fn classes(&self, product: Option<&str>) -> BTreeSet<String> {
        self.running(product)
            .filter_map(|d| d.report.as_ref().map(|r| r.device_class.clone()))
            .collect()
    }

    /// A device's ring, class and products, if it ever reported.
    pub fn device(&self, id: &str) -> Option<DeviceFacts> {
        let r = self.devices.get(id)?.report.as_ref()?;
        Some(DeviceFacts {
            ring: r.ring.clone(),
            class: r.device_class.clone(),
            products: r.products.keys().cloned().collect(),
        })
    }

    /// What the devices of `ring` that failed `rollout` say about why (at most
    /// [`MAX_EVIDENCE`], by id): each one's newest `reverted` or `install_failed` event for
    /// the rollout, falling back to its report's `last_error` (for the rollout's product).
    pub fn failure_evidence(&self, rollout: &Rollout, ring: &str) -> Vec<FailureEvidence> {
        let mut failing: Vec<(&DeviceRecord, Option<ringcast_proto::report::ErrorInfo>)> = self
            .devices
            .values()
            .filter_map(|d| {
                let rep = d.report_for(&rollout.release_name)?;
                let ours = rep.target.as_ref().is_none_or(|x| {
                    x.name == rollout.release_name && x.sequence == rollout.release_sequence
                });
                (rep.ring == ring
                    && rep.rollout_id.as_deref() == Some(rollout.id.as_str())
                    && rep.phase.is_failure()
                    && ours)
                    .then(|| (d, rep.last_error.clone()))
            })
            .collect();
        failing.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        failing.truncate(MAX_EVIDENCE);
        let concerns = |e: &Event| {
            matches!(
                e.kind,
                EventKind::Reverted { .. } | EventKind::InstallFailed { .. }
            ) && (e.rollout_id.as_deref() == Some(rollout.id.as_str())
                || e.release.as_ref().is_some_and(|x| {
                    x.name == rollout.release_name && x.sequence == rollout.release_sequence
                }))
        };
        failing
            .into_iter()
            .map(|(d, last_error)| {
                let event = self.events.newest(&d.id, &concerns);
                FailureEvidence::from_device(&d.id, event.as_ref(), last_error.as_ref())
            })
            .collect()
    }

    /// The devices of `ring` in the ramp `percent` that refused `rollout`'s directive, with
    /// their reason (at most [`MAX_EVIDENCE`], by id).
    pub fn refusals(
        &self,
        rollout: &Rollout,
        ring: &str,
        percent: Percent,
    ) -> Vec<FailureEvidence> {
        let mut v: Vec<FailureEvidence> = self
            .devices
            .values()
            .filter(|d| in_ramp(&rollout.id, &d.id, percent))
            .filter_map(|d| {
                let rep = d.report_for(&rollout.release_name)?;
                let refusal = rep.refused.as_ref()?;
                (rep.ring == ring && refusal.rollout_id == rollout.id).then(|| {
                    FailureEvidence::refusal(&d.id, refusal.reason.code(), &refusal.detail)
                })
            })
            .collect();
        v.sort_by(|a, b| a.device.cmp(&b.device));
        v.truncate(MAX_EVIDENCE);
        v
    }

    /// How much of the compatible fleet runs `release` (delivery insight).
    pub fn coverage(&self, rollout: &Rollout, release: &Release) -> insight::Coverage {
        insight::coverage(self.devices, rollout, release)
    }
}
