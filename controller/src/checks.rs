//! Acceptance checks a ring runs before it is promoted: a command (exit 0 within its
//! timeout) or an HTTP POST (2xx within its timeout). Both learn the ring, rollout, release,
//! attempt and the ring's device list.

use crate::config::{Check, CheckKind};

/// What a run of checks is about; every check gets it (commands in their environment,
/// HTTP checks as the JSON body of a POST).
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Ring.
    pub ring: &'a str,
    /// Rollout id.
    pub rollout: &'a str,
    /// Release id.
    pub release: &'a str,
    /// Which attempt (1, 2, …).
    pub attempt: u32,
    /// The ring's devices (by id).
    pub devices: &'a [String],
}

/// Run checks in order; the first failure is the outcome.
pub async fn run_all(checks: &[Check], cx: &Context<'_>) -> Result<(), String> {
    for c in checks {
        run_one(c, cx)
            .await
            .map_err(|why| format!("check {}: {why}", c.name))?;
    }
    Ok(())
}

async fn run_one(c: &Check, cx: &Context<'_>) -> Result<(), String> {
    let timeout = c.timeout.get();
    match c.kind {
        CheckKind::Command => {
            let Some((prog, args)) = c.command.split_first() else {
                return Err("empty command".into());
            };
            // The device list goes through a file: a big ring's would not fit the environment.
            let mut list = tempfile::NamedTempFile::new()
                .map_err(|e| format!("cannot write the device list: {e}"))?;
            {
                use std::io::Write;
                for d in cx.devices {
                    writeln!(list, "{d}")
                        .map_err(|e| format!("cannot write the device list: {e}"))?;
                }
                list.flush()
                    .map_err(|e| format!("cannot write the device list: {e}"))?;
            }
            let child = tokio::process::Command::new(prog)
                .args(args)
                .env("RINGCAST_RING", cx.ring)
                .env("RINGCAST_ROLLOUT", cx.rollout)
                .env("RINGCAST_RELEASE", cx.release)
                .env("RINGCAST_ATTEMPT", cx.attempt.to_string())
                .env("RINGCAST_DEVICE_COUNT", cx.devices.len().to_string())
                .env("RINGCAST_DEVICES_FILE", list.path())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot start {prog}: {e}"))?;
            match tokio::time::timeout(timeout, child.wait_with_output()).await {
                Err(_) => Err(format!("timed out after {}", c.timeout)),
                Ok(Err(e)) => Err(format!("wait: {e}")),
                Ok(Ok(out)) if out.status.success() => Ok(()),
                Ok(Ok(out)) => {
                    let mut tail = String::from_utf8_lossy(&out.stderr).into_owned();
                    tail.push_str(&String::from_utf8_lossy(&out.stdout));
                    let tail: String = tail
                        .chars()
                        .rev()
                        .take(300)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    Err(format!("exited with {}: {}", out.status, tail.trim()))
                }
            }
        }
        CheckKind::Http => {
            let url = c.url.as_deref().unwrap_or_default();
            let client = reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .map_err(|e| e.to_string())?;
            let body = serde_json::json!({
                "ring": cx.ring,
                "rollout": cx.rollout,
                "release": cx.release,
                "attempt": cx.attempt,
                "devices": cx.devices,
            });
            let resp = client
                .post(url)
                .header("x-ringcast-ring", cx.ring)
                .header("x-ringcast-rollout", cx.rollout)
                .json(&body)
                .send()
                .await
                .map_err(|e| format!("POST {url}: {e}"))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("POST {url}: HTTP {}", resp.status()))
            }
        }
    }
}
