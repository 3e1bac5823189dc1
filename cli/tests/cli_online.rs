//! The online half of the command line against a real `ringcast serve` (embedded broker,
//! real HTTP): submit, rollout list/show/approve/pause/resume, devices, audit verify, with
//! human tables, `--json`, and one clear error line with its code on failure.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ringcast(args: &[&str], server: &str, token: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(args)
        .env("RINGCAST_SERVER", server)
        .env("RINGCAST_TOKEN", token)
        .output()
        .unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn serve_submit_show_approve_and_verify_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fx = ringcast_proto::testkit::Fixture::new();
    std::fs::write(d.join("trust.json"), fx.trust_env.to_vec()).unwrap();
    ringcast_controller::keyfile::write_secret_key(
        &d.join("controller.key"),
        &fx.controller,
        ringcast_controller::keyfile::Overwrite::Refuse,
    )
    .unwrap();
    let sha = |t: &str| ringcast_proto::digest::sha256_hex(t.as_bytes());
    std::fs::write(
        d.join("tokens.toml"),
        format!(
            "[[token]]\nname = \"otto\"\nrole = \"operator\"\nsha256 = \"{}\"\n[[token]]\nname = \"alice\"\nrole = \"approver\"\nsha256 = \"{}\"\n",
            sha(common::OPERATOR),
            sha(common::APPROVER)
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("ringcast.toml"),
        r#"
fleet = "lab"
tick = "100ms"
[server]
listen = "127.0.0.1:0"
data_dir = "data"
trust = "trust.json"
controller_key = "controller.key"
tokens_file = "tokens.toml"
[[rings]]
name = "canary"
steps = [50, 100]
bake = "1h"
gate = { min_reports = 1, max_failure_rate = 0.2 }
[[rings]]
name = "broad"
bake = "1h"
promotion = "manual"
gate = { min_reports = 1, max_failure_rate = 0.2 }
"#,
    )
    .unwrap();
    // A bad policy fails with one line naming the field.
    std::fs::write(d.join("bad.toml"), "fleet = \"lab\"\nrings = []\n[server]\ndata_dir = \"x\"\ntrust = \"t\"\ncontroller_key = \"k\"\n").unwrap();
    let bad = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["serve", "--config"])
        .arg(d.join("bad.toml"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(text(&bad).contains("rings"), "{}", text(&bad));

    let mut child = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["serve", "--config"])
        .arg(d.join("ringcast.toml"))
        .env("RINGCAST_LOG", "warn")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let serve = Serve(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("ringcast: serving on ") {
                let url = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let _ = tx.send(url);
            }
        }
    });
    let server = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("serve prints its address");

    // Release + artifact, as `ringcast release sign` would produce them.
    let artifact = b"firmware bytes".repeat(100);
    std::fs::write(d.join("app.tar.gz"), &artifact).unwrap();
    let r = ringcast_proto::testkit::sample_release("app", 2, 1);
    std::fs::write(
        d.join("release.json"),
        ringcast::kit::sign_release(r, &artifact, &[&fx.release]).to_vec_pretty(),
    )
    .unwrap();

    let rel = d.join("release.json").display().to_string();
    let art = d.join("app.tar.gz").display().to_string();
    let o = ringcast(
        &["release", "submit", &rel, "--artifact", &art],
        &server,
        common::OPERATOR,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("rollout app-2"), "{}", text(&o));
    let o = ringcast(&["release", "submit", &rel], &server, common::OPERATOR);
    assert!(!o.status.success());
    assert!(text(&o).contains("already_rolling_out"), "{}", text(&o));

    let o = ringcast(&["rollout", "list"], &server, common::OPERATOR);
    assert!(
        o.status.success() && text(&o).contains("ROLLOUT") && text(&o).contains("app-2"),
        "{}",
        text(&o)
    );
    // The canary step is published at once; show draws the ring as a bar.
    let show = (0..100)
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            ringcast(&["rollout", "show", "app-2"], &server, common::OPERATOR)
        })
        .find(|o| text(o).contains("baking"))
        .expect("rollout reaches baking");
    let s = text(&show);
    assert!(
        s.contains("canary") && s.contains("[--------------------]") && s.contains("50%"),
        "{s}"
    );
    let o = ringcast(
        &["--json", "rollout", "show", "app-2"],
        &server,
        common::OPERATOR,
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["rings"][0]["name"], "canary");
    assert_eq!(v["phase"], "baking");

    let o = ringcast(
        &["rollout", "approve", "app-2", "--ring", "broad"],
        &server,
        common::OPERATOR,
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    assert!(err.contains("forbidden") && err.contains("403"), "{err}");
    let o = ringcast(
        &["rollout", "approve", "app-2", "--ring", "broad"],
        &server,
        common::APPROVER,
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = ringcast(&["rollout", "pause", "app-2"], &server, common::OPERATOR);
    assert!(
        o.status.success() && text(&o).contains("paused"),
        "{}",
        text(&o)
    );
    let o = ringcast(&["rollout", "resume", "app-2"], &server, common::OPERATOR);
    assert!(o.status.success(), "{}", text(&o));
    let o = ringcast(&["devices", "list"], &server, common::OPERATOR);
    assert!(
        o.status.success() && text(&o).contains("DEVICE"),
        "{}",
        text(&o)
    );
    let o = ringcast(
        &["--json", "devices", "list", "--ring", "canary"],
        &server,
        common::OPERATOR,
    );
    assert!(serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .unwrap()
        .is_array());
    let o = ringcast(&["audit", "verify"], &server, common::OPERATOR);
    assert!(
        o.status.success() && text(&o).contains("intact"),
        "{}",
        text(&o)
    );

    // Stopped: the database itself verifies, and a wrong token is a clear 401.
    let o = ringcast(&["rollout", "list"], &server, "wrong-token-0000000000");
    assert!(
        !o.status.success() && text(&o).contains("unauthenticated"),
        "{}",
        text(&o)
    );
    drop(serve);
    let o = Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["audit", "verify", "--data-dir"])
        .arg(d.join("data"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}
