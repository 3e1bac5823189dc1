//! Running hooks, installer commands and command health checks: argv with `{release_dir}` and
//! `{artifact}` substituted, `RINGCAST_RELEASE_DIR` / `RINGCAST_ARTIFACT` in the environment,
//! a hard timeout that kills the whole process group, and the tail of the output kept as
//! evidence. [`run_with_env`] adds variables of the caller's own (the defer hook's).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Paths substituted into argv and exported to the environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Subst<'a> {
    /// `{release_dir}`
    pub release_dir: Option<&'a Path>,
    /// `{artifact}`
    pub artifact: Option<&'a Path>,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Exit 0 within the timeout.
    pub ok: bool,
    /// Human summary: `exit 3`, `timed out after 5s`, `cannot start: …`.
    pub status: String,
    /// The exit code, when the command exited by itself within the timeout.
    pub code: Option<i32>,
    /// Tail of stdout and stderr.
    pub tail: String,
}

/// Substitute placeholders in one argument.
pub fn substitute(arg: &str, s: &Subst<'_>) -> String {
    let mut out = arg.to_owned();
    if let Some(d) = s.release_dir {
        out = out.replace("{release_dir}", &d.to_string_lossy());
    }
    if let Some(a) = s.artifact {
        out = out.replace("{artifact}", &a.to_string_lossy());
    }
    out
}

fn tail_of(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Run `argv` with a timeout.
pub async fn run(argv: &[String], s: &Subst<'_>, timeout: Duration, max_tail: usize) -> Outcome {
    run_with_env(argv, s, &[], timeout, max_tail).await
}

/// [`run`], with `env` added to the command's environment.
pub async fn run_with_env(
    argv: &[String],
    s: &Subst<'_>,
    env: &[(&str, String)],
    timeout: Duration,
    max_tail: usize,
) -> Outcome {
    let Some((prog, args)) = argv.split_first() else {
        return Outcome {
            ok: false,
            status: "empty command".into(),
            code: None,
            tail: String::new(),
        };
    };
    let mut cmd = tokio::process::Command::new(substitute(prog, s));
    cmd.args(args.iter().map(|a| substitute(a, s)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Own process group, so a timeout kills the children a script started too.
        .process_group(0);
    if let Some(d) = s.release_dir {
        cmd.env("RINGCAST_RELEASE_DIR", d);
    }
    if let Some(a) = s.artifact {
        cmd.env("RINGCAST_ARTIFACT", a);
    }
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                ok: false,
                status: format!("cannot start {prog:?}: {e}"),
                code: None,
                tail: String::new(),
            }
        }
    };
    let pid = child.id();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let work = async {
        let read_out = async {
            if let Some(o) = stdout.as_mut() {
                let _ = o.read_to_end(&mut out).await;
            }
        };
        let read_err = async {
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_end(&mut err).await;
            }
        };
        let ((), ()) = tokio::join!(read_out, read_err);
        child.wait().await
    };
    let res = tokio::time::timeout(timeout, work).await;
    let ok_status = match res {
        Ok(Ok(st)) => Ok(st),
        Ok(Err(e)) => Err(format!("wait failed: {e}")),
        Err(_) => {
            kill_group(pid);
            Err(format!("timed out after {timeout:?}"))
        }
    };
    let mut both = out;
    both.extend_from_slice(&err);
    let tail = tail_of(&both, max_tail);
    match ok_status {
        Ok(st) if st.success() => Outcome {
            ok: true,
            status: "exit 0".into(),
            code: Some(0),
            tail,
        },
        Ok(st) => Outcome {
            ok: false,
            status: match st.code() {
                Some(c) => format!("exit {c}"),
                None => "killed by a signal".into(),
            },
            code: st.code(),
            tail,
        },
        Err(status) => Outcome {
            ok: false,
            status,
            code: None,
            tail,
        },
    }
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a negative pid signals the process group we created for the
        // child; it touches no memory.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn substitutes_and_exports_paths() {
        let s = Subst {
            release_dir: Some(Path::new("/r/1")),
            artifact: Some(Path::new("/a/x")),
        };
        let o = run(
            &sh("echo {release_dir} $RINGCAST_RELEASE_DIR {artifact}"),
            &s,
            Duration::from_secs(5),
            100,
        )
        .await;
        assert!(o.ok, "{o:?}");
        assert_eq!(o.tail.trim(), "/r/1 /r/1 /a/x");
    }

    #[tokio::test]
    async fn exports_the_callers_variables() {
        let o = run_with_env(
            &sh("echo $RINGCAST_ROLLOUT; exit 75"),
            &Subst::default(),
            &[("RINGCAST_ROLLOUT", "r-7".to_owned())],
            Duration::from_secs(5),
            100,
        )
        .await;
        assert_eq!((o.ok, o.code), (false, Some(75)), "{o:?}");
        assert_eq!(o.tail.trim(), "r-7");
    }

    #[tokio::test]
    async fn failure_and_timeout_are_reported_with_output() {
        let o = run(
            &sh("echo boom >&2; exit 3"),
            &Subst::default(),
            Duration::from_secs(5),
            100,
        )
        .await;
        assert!(!o.ok);
        assert_eq!(o.status, "exit 3");
        assert_eq!(o.code, Some(3));
        assert!(o.tail.contains("boom"));
        let t0 = std::time::Instant::now();
        let o = run(
            &sh("sleep 30 & sleep 30"),
            &Subst::default(),
            Duration::from_millis(300),
            100,
        )
        .await;
        assert!(!o.ok && o.status.starts_with("timed out"), "{o:?}");
        assert_eq!(o.code, None, "a timeout has no exit code");
        assert!(t0.elapsed() < Duration::from_secs(10));
        let o = run(
            &["/nonexistent/x".to_string()],
            &Subst::default(),
            Duration::from_secs(1),
            10,
        )
        .await;
        assert!(!o.ok && o.status.starts_with("cannot start"));
    }
}
