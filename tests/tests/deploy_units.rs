//! The shipped systemd units (deploy/systemd/) parse, and keep their hardening: systemd's own
//! `systemd-analyze verify` accepts them (with and without the privileged drop-in) and
//! `systemd-analyze security` rates both services at most 2.0 ("OK").
//!
//! Skipped with a message where `systemd-analyze` is missing (it is a check of static files,
//! not of a component CI must provide).

use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 2] = ["ringcast-agent.service", "ringcast.service"];

fn systemd_analyze() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("systemd-analyze"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!("skipped: systemd-analyze not found (apt-get install systemd)");
    }
    found
}

/// Copy the shipped units into `dir`, pointing ExecStart at /bin/true: `verify` insists that
/// the binary exists, and the binaries are not installed on a build machine.
fn stage_units(dir: &Path) {
    let src = ringcast_tests::deploy_dir().join("systemd");
    for unit in UNITS {
        let text = std::fs::read_to_string(src.join(unit)).unwrap();
        assert!(
            text.contains("ExecStart=/usr/local/bin/"),
            "{unit}: ExecStart moved; update this test"
        );
        let text = text.replace("ExecStart=/usr/local/bin/", "ExecStart=/bin/true ");
        std::fs::write(dir.join(unit), text).unwrap();
    }
}

fn run(bin: &Path, dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Warnings that are not errors in the units: systemd < 254 does not know the backoff keys
/// (documented in the units; it then restarts every RestartSec).
fn unexpected_warnings(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains("Unknown key 'RestartSteps'"))
        .filter(|l| !l.contains("Unknown key 'RestartMaxDelaySec'"))
        .collect()
}

#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    let Some(bin) = systemd_analyze() else { return };
    let dir = tempfile::tempdir().unwrap();
    stage_units(dir.path());
    let (ok, text) = run(
        &bin,
        dir.path(),
        &["verify", "./ringcast-agent.service", "./ringcast.service"],
    );
    assert!(ok, "systemd-analyze verify failed:\n{text}");
    let rest = unexpected_warnings(&text);
    assert!(rest.is_empty(), "unexpected warnings:\n{}", rest.join("\n"));
}

#[test]
fn privileged_drop_in_passes_systemd_analyze_verify() {
    let Some(bin) = systemd_analyze() else { return };
    let dir = tempfile::tempdir().unwrap();
    stage_units(dir.path());
    let d = dir.path().join("ringcast-agent.service.d");
    std::fs::create_dir(&d).unwrap();
    std::fs::copy(
        ringcast_tests::deploy_dir()
            .join("systemd")
            .join("ringcast-agent-privileged.conf"),
        d.join("privileged.conf"),
    )
    .unwrap();
    let (ok, text) = run(&bin, dir.path(), &["verify", "./ringcast-agent.service"]);
    assert!(
        ok,
        "systemd-analyze verify failed with the drop-in:\n{text}"
    );
    let rest = unexpected_warnings(&text);
    assert!(rest.is_empty(), "unexpected warnings:\n{}", rest.join("\n"));
}

#[test]
fn shipped_units_are_rated_ok_by_systemd_analyze_security() {
    let Some(bin) = systemd_analyze() else { return };
    let dir = tempfile::tempdir().unwrap();
    stage_units(dir.path());
    for unit in UNITS {
        let path = format!("./{unit}");
        // Exposure is 0.0 (locked down) to 10.0 (unprotected); --threshold=20 fails above 2.0.
        let (ok, text) = run(
            &bin,
            dir.path(),
            &["security", "--offline=true", "--threshold=20", &path],
        );
        let summary = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or("(no summary)");
        assert!(ok, "{unit} is rated worse than 2.0: {summary}\n{text}");
        eprintln!("{summary}");
    }
}
