//! Health checks during probation: `command` (exit 0 within its timeout) and `http` (2xx
//! within its timeout).

use crate::cmd::{self, Subst};
use ringcast_proto::release::{CheckKind, HealthCheck};
use std::path::Path;

/// A failed check, with evidence for the `reverted` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Check name.
    pub check: String,
    /// Status and tail of its output.
    pub output: String,
}

/// Run every check once; return the first failure, if any.
pub async fn round(
    checks: &[HealthCheck],
    release_dir: &Path,
    artifact: Option<&Path>,
    http: &crate::http::Client,
    max_tail: usize,
) -> Option<Failure> {
    for c in checks {
        let timeout = c.timeout.get();
        let failed = match c.kind {
            CheckKind::Command => {
                let argv = c.command.clone().unwrap_or_default();
                let s = Subst {
                    release_dir: Some(release_dir),
                    artifact,
                };
                let o = cmd::run(&argv, &s, timeout, max_tail).await;
                (!o.ok).then(|| format!("{}\n{}", o.status, o.tail))
            }
            CheckKind::Http => {
                let url = c.url.clone().unwrap_or_default();
                match http.get(&url, None, timeout).await {
                    Ok(r) if (200..300).contains(&r.status) => None,
                    Ok(r) => Some(format!("GET {url} answered {}", r.status)),
                    Err(e) => Some(format!("GET {url}: {e}")),
                }
            }
        };
        if let Some(output) = failed {
            let start = output.len().saturating_sub(max_tail);
            let start = (start..output.len())
                .find(|i| output.is_char_boundary(*i))
                .unwrap_or(output.len());
            return Some(Failure {
                check: c.name.clone(),
                output: output[start..].to_owned(),
            });
        }
    }
    None
}
