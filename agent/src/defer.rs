//! The defer hook (`[defer]` in `agent.toml`): a command asked, right before a staged release
//! is activated, whether the device may update now. It may say "not now" (battery low, user
//! active) until a deadline counted from its first "not now" for that rollout and release;
//! after the deadline the update proceeds without asking, and a hook that fails or hangs
//! lets it proceed at once, so a broken hook never blocks updates for ever.
//!
//! The decisions ([`due`], [`answer`], [`not_now`]) are pure and take the time as a parameter;
//! [`ask`] runs the hook. The agent persists the resulting [`Deferral`] with its state.

use crate::cmd::{self, Outcome, Subst};
use crate::config::DeferConfig;
use crate::state::{Deferral, Job};
use jiff::Timestamp;
use std::path::Path;

/// The exit code that means "not now" (`EX_TEMPFAIL` of `sysexits.h`).
pub const EX_TEMPFAIL: i32 = 75;

/// Longest reason kept from the hook's output (the state report and events stay small).
pub const MAX_REASON_CHARS: usize = 200;

/// What the hook's run means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Exit 0: go ahead.
    Go,
    /// Exit 75: not now, with the reason it printed.
    NotNow(String),
    /// Anything else (another exit, a signal, a timeout, could not start): go ahead, and say
    /// so in a `defer_hook_failed` event.
    Broken(String),
}

/// What to do about the hook when a staged release may otherwise be activated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Ask the hook; `deadline` is the deferral's deadline should it say "not now"
    /// (`RINGCAST_DEADLINE`).
    Ask {
        /// The deadline.
        deadline: Timestamp,
    },
    /// Deferred, and the next ask is not due yet.
    Wait,
    /// Deferred past the deadline: activate without asking.
    DeadlinePassed,
}

/// Whether to ask the hook at `now` for `job`, given the deferral standing (one for another
/// rollout or release does not count: it belongs to work that was replaced).
pub fn due(deferral: Option<&Deferral>, job: &Job, now: Timestamp, cfg: &DeferConfig) -> Due {
    match deferral.filter(|d| d.is_for(job)) {
        None => Due::Ask {
            deadline: now
                .checked_add(cfg.deadline.signed())
                .unwrap_or(Timestamp::MAX),
        },
        Some(d) if now >= d.until => Due::DeadlinePassed,
        Some(d) if now < d.retry_at => Due::Wait,
        Some(d) => Due::Ask { deadline: d.until },
    }
}

/// Read the hook's outcome.
pub fn answer(o: &Outcome) -> Answer {
    match o.code {
        Some(0) => Answer::Go,
        Some(EX_TEMPFAIL) => Answer::NotNow(reason_line(&o.tail)),
        _ => {
            let tail = o.tail.trim();
            Answer::Broken(if tail.is_empty() {
                o.status.clone()
            } else {
                format!("{}: {tail}", o.status)
            })
        }
    }
}

/// The reason in the hook's output: its last non-empty line (stderr counts after stdout),
/// control characters blanked, at most [`MAX_REASON_CHARS`] characters.
pub fn reason_line(output: &str) -> String {
    let line = output
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("no reason given");
    line.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON_CHARS)
        .collect()
}

/// The deferral after a "not now" at `now`: a new one for `job`, or `prev` (if it is `job`'s)
/// with its deadline kept. The next ask is `retry` away, and never after the deadline.
pub fn not_now(
    prev: Option<&Deferral>,
    job: &Job,
    now: Timestamp,
    reason: String,
    cfg: &DeferConfig,
) -> Deferral {
    let (since, until) = match prev.filter(|d| d.is_for(job)) {
        Some(d) => (d.since, d.until),
        None => (
            now,
            now.checked_add(cfg.deadline.signed())
                .unwrap_or(Timestamp::MAX),
        ),
    };
    let retry_at = now
        .checked_add(cfg.retry.signed())
        .unwrap_or(Timestamp::MAX)
        .min(until);
    Deferral {
        rollout_id: job.rollout_id.clone(),
        release: job.target(),
        since,
        until,
        reason,
        retry_at,
    }
}

/// Run the hook for `job` with its environment: `RINGCAST_RELEASE` (the release id,
/// `{name}-{sequence}`), `RINGCAST_VERSION`, `RINGCAST_ROLLOUT`, `RINGCAST_DEADLINE` (RFC 3339)
/// and, with the staged artifact, `RINGCAST_ARTIFACT`.
pub async fn ask(
    cfg: &DeferConfig,
    job: &Job,
    deadline: Timestamp,
    artifact: Option<&Path>,
    max_tail: usize,
) -> Outcome {
    let env = [
        (
            "RINGCAST_RELEASE",
            format!("{}-{}", job.release.name, job.release.sequence),
        ),
        ("RINGCAST_VERSION", job.release.version.to_string()),
        ("RINGCAST_ROLLOUT", job.rollout_id.clone()),
        ("RINGCAST_DEADLINE", deadline.to_string()),
    ];
    let s = Subst {
        release_dir: None,
        artifact,
    };
    cmd::run_with_env(&cfg.command, &s, &env, cfg.timeout.get(), max_tail).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Origin;
    use jiff::SignedDuration;
    use ringcast_proto::directive::Activation;
    use ringcast_proto::Dur;
    use std::time::Duration;

    fn cfg() -> DeferConfig {
        DeferConfig {
            command: vec!["/bin/true".into()],
            retry: Dur::secs(300),
            deadline: Dur::secs(3600),
            timeout: Dur::secs(5),
        }
    }

    fn job(rollout: &str, seq: u64) -> Job {
        let r = ringcast_proto::testkit::sample_release("app", seq, 1);
        Job::new(rollout.into(), Origin::Ring, r, Activation::default())
    }

    fn t0() -> Timestamp {
        "2026-05-01T10:00:00Z".parse().unwrap()
    }

    fn mins(m: i64) -> SignedDuration {
        SignedDuration::from_mins(m)
    }

    fn outcome(code: Option<i32>, status: &str, tail: &str) -> Outcome {
        Outcome {
            ok: code == Some(0),
            status: status.into(),
            code,
            tail: tail.into(),
        }
    }

    #[test]
    fn exit_codes_mean_go_not_now_or_broken() {
        assert_eq!(answer(&outcome(Some(0), "exit 0", "fine")), Answer::Go);
        assert_eq!(
            answer(&outcome(
                Some(75),
                "exit 75",
                "checking\nbattery at 12%\n\n"
            )),
            Answer::NotNow("battery at 12%".into())
        );
        assert_eq!(
            answer(&outcome(Some(75), "exit 75", "")),
            Answer::NotNow("no reason given".into())
        );
        assert_eq!(
            answer(&outcome(Some(1), "exit 1", "boom\n")),
            Answer::Broken("exit 1: boom".into())
        );
        assert_eq!(
            answer(&outcome(None, "timed out after 5s", "")),
            Answer::Broken("timed out after 5s".into())
        );
        // A signal, or a program that could not start, never blocks either.
        assert!(matches!(
            answer(&outcome(None, "killed by a signal", "")),
            Answer::Broken(_)
        ));
    }

    #[test]
    fn reason_is_one_bounded_printable_line() {
        let long = "x".repeat(500);
        assert_eq!(reason_line(&long).chars().count(), MAX_REASON_CHARS);
        assert_eq!(reason_line("a\u{1b}[31mred\n"), "a [31mred");
    }

    #[test]
    fn deadline_counts_from_the_first_not_now_and_retries_stop_at_it() {
        let c = cfg();
        let j = job("r1", 2);
        // No deferral: ask, with the deadline a "not now" would get.
        assert_eq!(
            due(None, &j, t0(), &c),
            Due::Ask {
                deadline: t0() + mins(60)
            }
        );
        let first = not_now(None, &j, t0(), "battery low".into(), &c);
        assert_eq!(
            (first.since, first.until, first.retry_at),
            (t0(), t0() + mins(60), t0() + mins(5))
        );
        assert_eq!(due(Some(&first), &j, t0() + mins(4), &c), Due::Wait);
        assert_eq!(
            due(Some(&first), &j, t0() + mins(5), &c),
            Due::Ask {
                deadline: t0() + mins(60)
            }
        );
        // A later "not now" keeps the deadline, whatever the reason says now.
        let later = not_now(Some(&first), &j, t0() + mins(58), "user active".into(), &c);
        assert_eq!(
            (later.since, later.until, later.reason.as_str()),
            (t0(), t0() + mins(60), "user active")
        );
        assert_eq!(
            later.retry_at,
            t0() + mins(60),
            "never asked after the deadline"
        );
        assert_eq!(
            due(Some(&later), &j, t0() + mins(60), &c),
            Due::DeadlinePassed
        );
    }

    #[test]
    fn a_deferral_of_another_rollout_or_release_does_not_count() {
        let c = cfg();
        let old = not_now(None, &job("r1", 2), t0(), "busy".into(), &c);
        for other in [job("r2", 2), job("r1", 3)] {
            let at = t0() + mins(90);
            assert_eq!(
                due(Some(&old), &other, at, &c),
                Due::Ask {
                    deadline: at + mins(60)
                },
                "past the old deadline, but a new deferral starts"
            );
            let fresh = not_now(Some(&old), &other, at, "busy".into(), &c);
            assert_eq!((fresh.since, fresh.until), (at, at + mins(60)));
            assert_eq!(fresh.rollout_id, other.rollout_id);
        }
    }

    #[tokio::test]
    async fn the_hook_gets_the_release_rollout_and_deadline() {
        let mut c = cfg();
        c.command = vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo $RINGCAST_RELEASE $RINGCAST_VERSION $RINGCAST_ROLLOUT $RINGCAST_DEADLINE; exit 75"
                .into(),
        ];
        c.timeout = Dur(Duration::from_secs(5));
        let j = job("r1", 2);
        let o = ask(&c, &j, t0() + mins(60), None, 1000).await;
        assert_eq!(
            answer(&o),
            Answer::NotNow(format!(
                "app-2 {} r1 2026-05-01T11:00:00Z",
                j.release.version
            ))
        );
    }
}
