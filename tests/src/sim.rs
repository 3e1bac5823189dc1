//! The fleet simulator's options and measurements (the `ringcast-sim` binary is a thin
//! wrapper): N real agents in one process over real MQTT connections, each with a temp-dir
//! installer and a sled or in-memory store, a chosen share of them failing their health
//! checks. The agents themselves come from [`ringcast_agent::fleet`], which
//! `ringcast demo` uses too.

use crate::error::{HarnessError, Result};
use ringcast_agent::fleet::{Customize, FleetSpec, StoreKind};
use ringcast_proto::{Phase, StateReport, SystemClock};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Parse a ring split: `canary=2,early=3,broad=5` (device counts) or
/// `canary=10%,early=30%,broad=60%` (shares of `total`; the last ring takes the rest).
pub fn parse_rings(spec: &str, total: usize) -> Result<Vec<(String, usize)>> {
    let bad = |d: String| HarnessError::BadArgument(format!("--rings {spec:?}: {d}"));
    let mut parts = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, n) = item
            .split_once('=')
            .ok_or_else(|| bad(format!("{item:?} is not ring=count or ring=percent%")))?;
        ringcast_proto::limits::check_name("ring", name).map_err(|e| bad(e.detail))?;
        parts.push((name.to_owned(), n.trim().to_owned()));
    }
    if parts.is_empty() {
        return Err(bad("no rings".into()));
    }
    if parts.iter().all(|(_, n)| n.ends_with('%')) {
        let shares: Vec<(&str, f64)> = parts
            .iter()
            .map(|(r, n)| {
                n.trim_end_matches('%')
                    .parse::<f64>()
                    .map(|p| (r.as_str(), p / 100.0))
                    .map_err(|e| bad(format!("{n}: {e}")))
            })
            .collect::<Result<_>>()?;
        return ringcast_agent::fleet::split(total, &shares).map_err(|e| bad(e.to_string()));
    }
    parts
        .into_iter()
        .map(|(r, n)| {
            n.parse::<usize>()
                .map(|c| (r, c))
                .map_err(|e| bad(format!("{n}: {e} (mix of counts and percents?)")))
        })
        .collect()
}

/// What the simulator needs to build its fleet.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Broker URL (`mqtt://…` or `mqtts://…`).
    pub broker: String,
    /// Fleet name.
    pub fleet: String,
    /// Device class.
    pub device_class: String,
    /// Trust root file.
    pub trust_root: PathBuf,
    /// Controller's HTTP base for relative artifact URLs.
    pub artifact_base_url: Option<String>,
    /// Where devices keep their data (`{dir}/{device}`).
    pub dir: PathBuf,
    /// Rings and device counts.
    pub rings: Vec<(String, usize)>,
    /// Share of devices whose health checks fail.
    pub fail_rate: f64,
    /// Store.
    pub store: StoreKind,
    /// CA file for `mqtts://`.
    pub ca_file: Option<PathBuf>,
    /// Directory with `{device}.crt` / `{device}.key` for mutual TLS.
    pub cert_dir: Option<PathBuf>,
}

impl SimOptions {
    /// The fleet spec (system clock; TLS files per device when a cert dir is given).
    pub fn spec(&self) -> FleetSpec {
        let ca = self.ca_file.clone();
        let certs = self.cert_dir.clone();
        let customize: Option<Customize> = if ca.is_some() || certs.is_some() {
            Some(Arc::new(move |c: &mut ringcast_agent::AgentConfig| {
                c.broker.ca_file = ca.clone();
                if let Some(dir) = &certs {
                    c.broker.client_cert = Some(dir.join(format!("{}.crt", c.device_id)));
                    c.broker.client_key = Some(dir.join(format!("{}.key", c.device_id)));
                }
            }))
        } else {
            None
        };
        FleetSpec {
            fleet: self.fleet.clone(),
            device_class: self.device_class.clone(),
            broker_url: self.broker.clone(),
            trust_root: self.trust_root.clone(),
            artifact_base_url: self.artifact_base_url.clone(),
            dir: self.dir.clone(),
            rings: self.rings.clone(),
            fail_rate: self.fail_rate,
            store: self.store,
            clock: Arc::new(SystemClock),
            customize,
        }
    }
}

/// Counts of devices per `(ring, phase, current version)` — the simulator's status line.
pub fn census(reports: &[StateReport]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in reports {
        let cur = r
            .current
            .as_ref()
            .map(|c| c.version.as_str())
            .unwrap_or("-");
        *out.entry(format!("{} {} {}", r.ring, r.phase.as_str(), cur))
            .or_insert(0) += 1;
    }
    out
}

/// How many reports are in `phase`.
pub fn count_phase(reports: &[StateReport], phase: Phase) -> usize {
    reports.iter().filter(|r| r.phase == phase).count()
}

/// This process's resident memory in bytes (`VmRSS` from `/proc/self/status`).
pub fn rss_bytes() -> Option<u64> {
    proc_status_kb(Path::new("/proc/self/status"), "VmRSS:").map(|kb| kb * 1024)
}

/// A `kB` field of a `/proc/*/status` file.
pub fn proc_status_kb(path: &Path, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_split_takes_counts_or_percents() {
        assert_eq!(
            parse_rings("canary=2, early=3,broad=5", 0).unwrap(),
            vec![
                ("canary".to_owned(), 2),
                ("early".to_owned(), 3),
                ("broad".to_owned(), 5)
            ]
        );
        let p = parse_rings("canary=10%,broad=90%", 20).unwrap();
        assert_eq!(p, vec![("canary".to_owned(), 2), ("broad".to_owned(), 18)]);
        assert!(parse_rings("canary", 10).is_err());
        assert!(parse_rings("canary=2,broad=50%", 10).is_err());
        assert!(parse_rings("can/ary=2", 10).is_err());
    }

    #[test]
    fn rss_is_read_from_proc() {
        assert!(rss_bytes().is_some_and(|b| b > 1024 * 1024));
    }
}
