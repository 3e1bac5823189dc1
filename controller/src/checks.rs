//! Acceptance checks a ring runs before it is promoted: a command (exit 0 within its
//! timeout) or an HTTP GET (2xx within its timeout).

use crate::config::{Check, CheckKind};

/// Run checks in order; the first failure is the outcome.
pub async fn run_all(
    checks: &[Check],
    ring: &str,
    rollout: &str,
    release: &str,
) -> Result<(), String> {
    for c in checks {
        run_one(c, ring, rollout, release)
            .await
            .map_err(|why| format!("check {}: {why}", c.name))?;
    }
    Ok(())
}

async fn run_one(c: &Check, ring: &str, rollout: &str, release: &str) -> Result<(), String> {
    let timeout = c.timeout.get();
    match c.kind {
        CheckKind::Command => {
            let Some((prog, args)) = c.command.split_first() else {
                return Err("empty command".into());
            };
            let child = tokio::process::Command::new(prog)
                .args(args)
                .env("RINGCAST_RING", ring)
                .env("RINGCAST_ROLLOUT", rollout)
                .env("RINGCAST_RELEASE", release)
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
            let resp = client
                .get(url)
                .header("x-ringcast-ring", ring)
                .header("x-ringcast-rollout", rollout)
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("GET {url}: HTTP {}", resp.status()))
            }
        }
    }
}
