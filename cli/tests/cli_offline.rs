//! The offline half of the `ringcast` command line, run as the real binary in temp dirs:
//! key generation, trust roots and their rotation, release signing and verification, and the
//! attacks `release verify` must refuse with distinct reason codes (ACCEPTANCE 1, 2, 3, 5).

use ringcast_proto::envelope::{DIRECTIVE_TYPE, RELEASE_TYPE};
use ringcast_proto::{Envelope, SecretKey};
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ringcast"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    /// Run and expect success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ringcast {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run and expect exactly one `ringcast: error: …` line and exit code 1; returns it.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "ringcast {args:?}: {err}");
        assert!(err.starts_with("ringcast: error: "), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        err
    }

    fn keygen(&self, role: &str, name: &str) -> String {
        self.ok(&["key", "gen", "--role", role, "--out", name])
            .trim()
            .to_owned()
    }

    fn secret(&self, name: &str) -> SecretKey {
        SecretKey::from_pkcs8_pem(&std::fs::read_to_string(self.path(name)).unwrap()).unwrap()
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn envelope(&self, name: &str) -> Envelope {
        Envelope::from_slice(&std::fs::read(self.path(name)).unwrap()).unwrap()
    }

    fn write_envelope(&self, name: &str, env: &Envelope) {
        self.write(name, &env.to_vec());
    }

    /// Keys for every role plus a trust root `trust.json` (thresholds of one).
    fn with_trust() -> Sandbox {
        let s = Sandbox::new();
        for (role, name) in [
            ("root", "root"),
            ("release", "release"),
            ("release", "release2"),
            ("controller", "controller"),
        ] {
            s.keygen(role, name);
        }
        s.ok(&[
            "trust",
            "init",
            "--root",
            "root.pub",
            "--release",
            "release.pub",
            "release2.pub",
            "--controller",
            "controller.pub",
            "--sign",
            "root.key",
            "--out",
            "trust.json",
        ]);
        s
    }

    fn spec(&self, name: &str, extra: &str) -> PathBuf {
        let text = format!(
            r#"name = "app"
version = "1.4.0"
sequence = 14
rollback_floor = 12
compatible = ["sensor-v2"]
{extra}
[artifact]
format = "tar.gz"

[install]
kind = "bundle"

[health]
probation = "5m"
interval = "10s"
failures_to_revert = 3
"#
        );
        self.write(name, text.as_bytes())
    }

    fn artifact(&self) -> (PathBuf, Vec<u8>) {
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        (self.write("app.tar.gz", &bytes), bytes)
    }

    fn sign_release(&self, spec: &str, out: &str) {
        self.ok(&[
            "release",
            "sign",
            "--key",
            "release.key",
            "--spec",
            spec,
            "--artifact",
            "app.tar.gz",
            "--out",
            out,
        ]);
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn key_trust_sign_verify_flow() {
    let s = Sandbox::with_trust();
    // key gen prints the key id; the private key is 0600 and really is that key.
    let id = s.keygen("release", "ci");
    assert_eq!(s.secret("ci.key").key_id().as_str(), id);
    assert_eq!(mode(&s.path("ci.key")), 0o600);
    let json: serde_json::Value =
        serde_json::from_str(&s.ok(&["key", "gen", "--role", "root", "--out", "j", "--json"]))
            .unwrap();
    assert_eq!(json["role"], "root");
    assert_eq!(json["key_id"], s.secret("j.key").key_id().as_str());

    let (_, bytes) = s.artifact();
    let sha = hex::encode(Sha256::digest(&bytes));
    s.spec("release.toml", "");
    s.sign_release("release.toml", "release.json");

    let out = s.ok(&["release", "verify", "--trust", "trust.json", "release.json"]);
    assert!(out.contains("valid"), "{out}");
    assert!(out.contains(&sha), "{out}");
    let v: serde_json::Value = serde_json::from_str(&s.ok(&[
        "release",
        "verify",
        "--json",
        "--trust",
        "trust.json",
        "release.json",
    ]))
    .unwrap();
    assert_eq!(v["name"], "app");
    assert_eq!(v["version"], "1.4.0");
    assert_eq!(v["sequence"], 14);
    assert_eq!(v["sha256"], sha.as_str());
    assert_eq!(v["size"], bytes.len() as u64);
    assert_eq!(v["url"], format!("/artifacts/sha256/{sha}"));
    assert_eq!(
        v["signed_by"],
        serde_json::json!([s.secret("release.key").key_id().as_str()])
    );

    // --url overrides the default relative URL.
    s.ok(&[
        "release",
        "sign",
        "--key",
        "release.key",
        "--spec",
        "release.toml",
        "--artifact",
        "app.tar.gz",
        "--url",
        "https://dl.example.com/app.tar.gz",
        "--out",
        "release-url.json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&s.ok(&[
        "release",
        "verify",
        "--json",
        "--trust",
        "trust.json",
        "release-url.json",
    ]))
    .unwrap();
    assert_eq!(v["url"], "https://dl.example.com/app.tar.gz");
}

#[test]
fn key_gen_never_overwrites_a_key_unless_forced() {
    let s = Sandbox::new();
    let first = s.keygen("root", "k");
    let err = s.fails(&["key", "gen", "--role", "root", "--out", "k"]);
    assert!(err.contains("key_exists"), "{err}");
    assert_eq!(s.secret("k.key").key_id().as_str(), first);
    let second = s
        .ok(&["key", "gen", "--role", "root", "--out", "k", "--force"])
        .trim()
        .to_owned();
    assert_ne!(first, second);
    assert_eq!(s.secret("k.key").key_id().as_str(), second);
    assert_eq!(mode(&s.path("k.key")), 0o600);
    let err = s.fails(&["key", "gen", "--role", "admin", "--out", "x"]);
    assert!(err.contains("malformed"), "{err}");
}

#[test]
fn trust_init_refuses_too_few_root_signatures() {
    let s = Sandbox::new();
    for n in ["r1", "r2", "rel", "ctl"] {
        s.keygen("root", n);
    }
    let err = s.fails(&[
        "trust",
        "init",
        "--root",
        "r1.pub",
        "r2.pub",
        "--threshold",
        "root=2",
        "--release",
        "rel.pub",
        "--controller",
        "ctl.pub",
        "--sign",
        "r1.key",
        "--out",
        "trust.json",
    ]);
    assert!(err.contains("threshold_not_met"), "{err}");
    assert!(!s.path("trust.json").exists());
    let err = s.fails(&[
        "trust",
        "init",
        "--root",
        "r1.pub",
        "--release",
        "rel.pub",
        "--controller",
        "ctl.pub",
        "--sign",
        "rel.key",
        "--out",
        "trust.json",
    ]);
    assert!(err.contains("unknown_key"), "{err}");
}

#[test]
fn trust_rotate_needs_old_and_new_root_thresholds() {
    let s = Sandbox::with_trust();
    s.keygen("root", "root-b");
    s.keygen("root", "root-c");
    let rotate = |sign: &[&str], out: &str| {
        let mut args = vec![
            "trust",
            "rotate",
            "--from",
            "trust.json",
            "--root",
            "root-b.pub",
            "root-c.pub",
            "--threshold",
            "root=2",
            "--sign",
        ];
        args.extend_from_slice(sign);
        args.extend_from_slice(&["--out", out]);
        s.run(&args)
    };
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // Old keys only: the new root's threshold is missing.
    let o = rotate(&["root.key"], "next.json");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("NEW root threshold"), "{}", stderr(&o));
    // New keys only: the old root never vouched for it.
    let o = rotate(&["root-b.key", "root-c.key"], "next.json");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("OLD root threshold"), "{}", stderr(&o));
    // Old plus one of two new keys: the new threshold of 2 is still missing.
    let o = rotate(&["root.key", "root-b.key"], "next.json");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("NEW root threshold"), "{}", stderr(&o));
    assert!(stderr(&o).contains("threshold_not_met"), "{}", stderr(&o));
    assert!(!s.path("next.json").exists());

    // Both thresholds: accepted, version 2, and it verifies releases with the kept release role.
    let o = rotate(&["root.key", "root-b.key", "root-c.key"], "next.json");
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&s.ok(&[
        "trust",
        "rotate",
        "--json",
        "--from",
        "next.json",
        "--sign",
        "root-b.key",
        "root-c.key",
        "--out",
        "third.json",
    ]))
    .unwrap();
    assert_eq!(v["version"], 3);
    s.artifact();
    s.spec("release.toml", "");
    s.sign_release("release.toml", "release.json");
    s.ok(&["release", "verify", "--trust", "next.json", "release.json"]);
    s.ok(&["release", "verify", "--trust", "third.json", "release.json"]);

    // Going back is refused before anything is written.
    let err = s.fails(&[
        "trust",
        "rotate",
        "--from",
        "next.json",
        "--version",
        "1",
        "--sign",
        "root-b.key",
        "root-c.key",
        "--out",
        "back.json",
    ]);
    assert!(err.contains("trust_rollback"), "{err}");
}

#[test]
fn release_verify_rejects_each_attack_with_its_own_reason() {
    let s = Sandbox::with_trust();
    s.artifact();
    s.spec("release.toml", "");
    s.sign_release("release.toml", "release.json");
    let good = s.envelope("release.json");
    let release_key = s.secret("release.key");
    let verify = |file: &str| s.fails(&["release", "verify", "--trust", "trust.json", file]);

    // A flipped payload byte.
    let mut flipped = good.clone();
    let i = flipped.payload.len() / 2;
    flipped.payload[i] ^= 0x01;
    s.write_envelope("flipped.json", &flipped);
    let bad_signature = verify("flipped.json");
    assert!(bad_signature.contains("bad_signature"), "{bad_signature}");

    // Signed by a key the release role does not list (the controller's).
    let by_controller = Envelope::sign(
        RELEASE_TYPE,
        good.payload.clone(),
        &[&s.secret("controller.key")],
    );
    s.write_envelope("controller-signed.json", &by_controller);
    let unknown_key = verify("controller-signed.json");
    assert!(unknown_key.contains("unknown_key"), "{unknown_key}");

    // The right key, but a signature over another payload type.
    let as_directive = Envelope::sign(DIRECTIVE_TYPE, good.payload.clone(), &[&release_key]);
    s.write_envelope("other-type.json", &as_directive);
    let wrong_type = verify("other-type.json");
    assert!(wrong_type.contains("wrong_payload_type"), "{wrong_type}");

    // Threshold 2 "reached" by listing one signature twice.
    s.ok(&[
        "trust",
        "init",
        "--root",
        "root.pub",
        "--release",
        "release.pub",
        "release2.pub",
        "--threshold",
        "release=2",
        "--controller",
        "controller.pub",
        "--sign",
        "root.key",
        "--out",
        "trust-2of2.json",
    ]);
    let mut doubled = good.clone();
    doubled.signatures.push(doubled.signatures[0].clone());
    s.write_envelope("doubled.json", &doubled);
    let threshold = s.fails(&[
        "release",
        "verify",
        "--trust",
        "trust-2of2.json",
        "doubled.json",
    ]);
    assert!(threshold.contains("threshold_not_met"), "{threshold}");
    // Two distinct release keys do meet it.
    let both = Envelope::sign(
        RELEASE_TYPE,
        good.payload.clone(),
        &[&release_key, &s.secret("release2.key")],
    );
    s.write_envelope("both.json", &both);
    s.ok(&[
        "release",
        "verify",
        "--trust",
        "trust-2of2.json",
        "both.json",
    ]);

    // An expired release; valid when judged at a time before its expiry.
    s.spec(
        "old.toml",
        "issued_at = 2020-01-01T00:00:00Z\nexpires_at = \"2020-02-01T00:00:00Z\"\n",
    );
    s.sign_release("old.toml", "old.json");
    let expired = verify("old.json");
    assert!(expired.contains("expired"), "{expired}");
    s.ok(&[
        "release",
        "verify",
        "--trust",
        "trust.json",
        "--at",
        "2020-01-15T00:00:00Z",
        "old.json",
    ]);

    let all = [
        &bad_signature,
        &unknown_key,
        &wrong_type,
        &threshold,
        &expired,
    ];
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(a, b);
        }
    }

    // Not an envelope at all; and a file far over the envelope limit.
    s.write("junk.json", b"{\"hello\": 1}");
    assert!(verify("junk.json").contains("malformed"));
    s.write("huge.json", &vec![b' '; 1 << 20]);
    assert!(verify("huge.json").contains("too_large"));
}

#[test]
fn key_readable_by_others_is_refused_naming_path_and_mode() {
    let s = Sandbox::with_trust();
    s.artifact();
    s.spec("release.toml", "");
    std::fs::set_permissions(
        s.path("release.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let err = s.fails(&[
        "release",
        "sign",
        "--key",
        "release.key",
        "--spec",
        "release.toml",
        "--artifact",
        "app.tar.gz",
        "--out",
        "release.json",
    ]);
    assert!(err.contains("insecure_permissions"), "{err}");
    assert!(err.contains("0644"), "{err}");
    assert!(err.contains("release.key"), "{err}");
    assert!(!s.path("release.json").exists());
}

#[test]
fn garbage_key_file_is_refused_clearly() {
    let s = Sandbox::with_trust();
    s.artifact();
    s.spec("release.toml", "");
    let p = s.write("garbage.key", b"definitely not a key\n");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = s.fails(&[
        "release",
        "sign",
        "--key",
        "garbage.key",
        "--spec",
        "release.toml",
        "--artifact",
        "app.tar.gz",
        "--out",
        "release.json",
    ]);
    assert!(err.contains("bad_key_format"), "{err}");
    assert!(err.contains("garbage.key"), "{err}");
    // A public key passed where a private key belongs says so.
    std::fs::copy(s.path("release.pub"), s.path("pub-as.key")).unwrap();
    std::fs::set_permissions(s.path("pub-as.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = s.fails(&[
        "release",
        "sign",
        "--key",
        "pub-as.key",
        "--spec",
        "release.toml",
        "--artifact",
        "app.tar.gz",
        "--out",
        "release.json",
    ]);
    assert!(err.contains("public key"), "{err}");
}

#[test]
fn invalid_spec_is_refused_before_signing() {
    let s = Sandbox::with_trust();
    s.artifact();
    s.spec("bad.toml", "sha256 = \"00\"\n");
    let err = s.fails(&[
        "release",
        "sign",
        "--key",
        "release.key",
        "--spec",
        "bad.toml",
        "--artifact",
        "app.tar.gz",
        "--out",
        "release.json",
    ]);
    assert!(err.contains("malformed"), "{err}");
    assert!(err.contains("bad.toml"), "{err}");
    // Valid TOML, invalid manifest: a floor above the release's own sequence.
    let text = std::fs::read_to_string(s.spec("floor.toml", ""))
        .unwrap()
        .replace("rollback_floor = 12", "rollback_floor = 15");
    s.write("floor.toml", text.as_bytes());
    let err = s.fails(&[
        "release",
        "sign",
        "--key",
        "release.key",
        "--spec",
        "floor.toml",
        "--artifact",
        "app.tar.gz",
        "--out",
        "release.json",
    ]);
    assert!(err.contains("rollback_floor"), "{err}");
    assert!(!s.path("release.json").exists());
}

#[test]
fn help_documents_every_flag() {
    let s = Sandbox::new();
    for (cmd, flags) in [
        (&["key", "gen"][..], &["--role", "--out", "--force"][..]),
        (
            &["trust", "init"],
            &[
                "--root",
                "--release",
                "--controller",
                "--threshold",
                "--expires",
                "--version",
                "--sign",
                "--out",
            ],
        ),
        (
            &["trust", "rotate"],
            &[
                "--from",
                "--root",
                "--release",
                "--controller",
                "--threshold",
                "--expires",
                "--version",
                "--sign",
                "--out",
            ],
        ),
        (
            &["release", "sign"],
            &["--key", "--spec", "--artifact", "--url", "--out"],
        ),
        (&["release", "verify"], &["--trust", "--at", "--skew"]),
    ] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let help = s.ok(&args);
        for f in flags {
            assert!(help.contains(f), "{cmd:?} --help lacks {f}:\n{help}");
        }
    }
}
