//! Interoperability vectors in `tests/vectors/` (see its README.md).
//!
//! Every file is rebuilt here from the deterministic testkit (fixed seeds; ed25519 signatures
//! are deterministic) and compared byte for byte, so the stored vectors can never drift from
//! the code. `RINGCAST_REGEN_VECTORS=1 cargo test -p ringcast-proto --test vectors` rewrites
//! them instead. Each stored envelope is also verified through the public API, and each
//! negative vector must be refused with the reason its manifest names.

use base64::Engine;
use jiff::SignedDuration;
use ringcast_proto::directive::Directive;
use ringcast_proto::envelope::{pae, DIRECTIVE_TYPE, RELEASE_TYPE, TRUST_TYPE};
use ringcast_proto::keys::{public_from_pem, public_to_pem};
use ringcast_proto::testkit::{self, key, now, sample_release, Fixture, FLEET, RAMP_VECTORS};
use ringcast_proto::{
    accept_directive, bucket, verify_release, AgentView, DeviceIdentity, Envelope, Percent,
    Release, SecretKey, Source, TrustRoot,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The artifact the release vector describes.
const ARTIFACT: &[u8] = b"ringcast test vector artifact\n";

/// The device every directive vector is judged by.
const DEVICE: DeviceIdentity<'static> = DeviceIdentity {
    id: "dev-1",
    fleet: FLEET,
    ring: "canary",
    class: "sensor-v2",
    product: None,
};
const LAST_SEQUENCE: u64 = 100;
const ROLLBACK_FLOOR: u64 = 2;
const SKEW_SECS: i64 = 300;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn pretty(v: &serde_json::Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).unwrap();
    out.push(b'\n');
    out
}

fn env_file(env: &Envelope) -> Vec<u8> {
    let mut out = env.to_vec_pretty();
    out.push(b'\n');
    out
}

/// The release of the vectors: sample release 3 (floor 1) describing [`ARTIFACT`].
fn release() -> Release {
    let mut r = sample_release("app", 3, 1);
    r.artifact.url = format!(
        "/artifacts/sha256/{}",
        ringcast_proto::digest::sha256_hex(ARTIFACT)
    );
    r.artifact.sha256 = ringcast_proto::digest::sha256_hex(ARTIFACT);
    r.artifact.size = ARTIFACT.len() as u64;
    r
}

fn directive(f: &Fixture, release: &Release) -> Directive {
    let mut d = f.directive("canary", 101, release.sequence);
    d.release = Some(release.sign(&[&f.release]));
    d
}

/// Negative vectors: (file, trust file, expected reason code, what it is).
fn negatives(f: &Fixture) -> Vec<(String, &'static str, &'static str, &'static str, Vec<u8>)> {
    let f2 = Fixture::with_controller_threshold(2);
    let good = directive(f, &release());
    let mut out = Vec::new();
    let mut push = |name: &str,
                    trust: &'static str,
                    reason: &'static str,
                    what: &'static str,
                    env: Envelope| {
        out.push((
            format!("negative/{name}.json"),
            trust,
            reason,
            what,
            env_file(&env),
        ));
    };

    let mut flipped = good.sign(&[&f.controller]);
    let i = flipped.payload.len() / 2;
    flipped.payload[i] ^= 0x01;
    push(
        "flipped-byte",
        "trust.json",
        "bad_signature",
        "the valid directive with one payload bit flipped",
        flipped,
    );
    push(
        "signed-by-release-key",
        "trust.json",
        "unknown_key",
        "the directive signed by the release key, which the controller role does not list",
        good.sign(&[&f.release]),
    );
    push(
        "wrong-payload-type",
        "trust.json",
        "wrong_payload_type",
        "the directive bytes signed by the controller key under the release payload type",
        Envelope::sign(RELEASE_TYPE, good.to_bytes(), &[&f.controller]),
    );
    let mut doubled = good.sign(&[&f2.controller]);
    doubled.signatures.push(doubled.signatures[0].clone());
    push(
        "duplicate-signature",
        "trust-controller-2of2.json",
        "threshold_not_met",
        "one controller signature listed twice against a controller threshold of 2",
        doubled,
    );
    let mut expired = good.clone();
    expired.issued_at = now() - SignedDuration::from_hours(2);
    expired.expires_at = now() - SignedDuration::from_hours(1);
    push(
        "expired",
        "trust.json",
        "expired",
        "a directive that expired an hour before the device's trusted time",
        expired.sign(&[&f.controller]),
    );
    let mut replayed = good.clone();
    replayed.sequence = LAST_SEQUENCE;
    push(
        "replayed",
        "trust.json",
        "replayed",
        "a directive whose sequence equals the last one the device accepted",
        replayed.sign(&[&f.controller]),
    );
    let below = directive(f, &sample_release("app", 1, 1));
    push(
        "below-rollback-floor",
        "trust.json",
        "rollback_floor",
        "a valid release with sequence 1, below the device's rollback floor 2",
        below.sign(&[&f.controller]),
    );
    let mut other_class = release();
    other_class.compatible = vec!["camera-v1".into()];
    push(
        "incompatible",
        "trust.json",
        "incompatible",
        "a release for device class camera-v1",
        directive(f, &other_class).sign(&[&f.controller]),
    );
    let mut other_fleet = good.clone();
    other_fleet.fleet = "other".into();
    push(
        "wrong-fleet",
        "trust.json",
        "wrong_fleet",
        "a directive for fleet `other`",
        other_fleet.sign(&[&f.controller]),
    );
    let mut other_ring = good.clone();
    other_ring.ring = "broad".into();
    push(
        "wrong-ring",
        "trust.json",
        "wrong_target",
        "a directive for ring `broad`",
        other_ring.sign(&[&f.controller]),
    );
    let mut by_controller = good.clone();
    by_controller.release = Some(release().sign(&[&f.controller]));
    push(
        "release-signed-by-controller",
        "trust.json",
        "unknown_key",
        "a valid directive embedding a release signed by the controller key (injection)",
        by_controller.sign(&[&f.controller]),
    );
    out
}

/// Every vector file, by path relative to `tests/vectors/`.
fn build() -> BTreeMap<String, Vec<u8>> {
    let f = Fixture::new();
    let f2 = Fixture::with_controller_threshold(2);
    let mut files = BTreeMap::new();

    let named = [
        ("root", 1u8, &f.root),
        ("release", 2, &f.release),
        ("release2", 3, &f.release2),
        ("controller", 4, &f.controller),
        ("controller2", 5, &f.controller2),
    ];
    let mut index = Vec::new();
    for (name, seed, k) in named {
        files.insert(format!("keys/{name}.key"), k.to_pkcs8_pem().into_bytes());
        files.insert(
            format!("keys/{name}.pub"),
            public_to_pem(&k.verifying_key()).into_bytes(),
        );
        index.push(json!({
            "name": name,
            "seed_hex": hex::encode([seed; 32]),
            "public": k.public().public,
            "key_id": k.key_id().as_str(),
        }));
    }
    files.insert("keys/keys.json".into(), pretty(&json!(index)));

    files.insert("trust.json".into(), env_file(&f.trust_env));
    files.insert("trust-controller-2of2.json".into(), env_file(&f2.trust_env));
    files.insert("artifact.bin".into(), ARTIFACT.to_vec());
    let r = release();
    files.insert("release.json".into(), env_file(&r.sign(&[&f.release])));
    files.insert(
        "directive.json".into(),
        env_file(&directive(&f, &r).sign(&[&f.controller])),
    );

    let ramp: Vec<_> = RAMP_VECTORS
        .iter()
        .map(|(rollout, device, b)| {
            json!({
                "rollout_id": rollout,
                "device_id": device,
                "bucket": b,
                "in_ramp_at_percent": {
                    "1": *b < 100, "10": *b < 1000, "50": *b < 5000, "99.99": *b < 9999,
                },
            })
        })
        .collect();
    files.insert("ramp.json".into(), pretty(&json!(ramp)));

    let paes: Vec<_> = [
        ("http://example.com/HelloWorld", &b"hello world"[..]),
        ("", b""),
        (RELEASE_TYPE, b"{}"),
        (DIRECTIVE_TYPE, "déjà vu \u{1F680}".as_bytes()),
        (TRUST_TYPE, &[0u8, 1, 2, 255][..]),
    ]
    .iter()
    .map(|(t, p)| {
        let encoded = pae(t, p);
        json!({
            "payload_type": t,
            "payload_base64": B64.encode(p),
            "pae_base64": B64.encode(&encoded),
            "pae_text": String::from_utf8_lossy(&encoded),
        })
    })
    .collect();
    files.insert("pae.json".into(), pretty(&json!(paes)));

    let mut manifest = Vec::new();
    for (name, trust, reason, what, bytes) in negatives(&f) {
        manifest.push(json!({"file": name, "trust": trust, "reason": reason, "what": what}));
        files.insert(name, bytes);
    }
    files.insert("negative/manifest.json".into(), pretty(&json!(manifest)));

    files.insert(
        "device.json".into(),
        pretty(&json!({
            "device_id": DEVICE.id,
            "fleet": DEVICE.fleet,
            "ring": DEVICE.ring,
            "device_class": DEVICE.class,
            "last_sequence": LAST_SEQUENCE,
            "rollback_floor": ROLLBACK_FLOOR,
            "trusted_now": testkit::now(),
            "skew_seconds": SKEW_SECS,
        })),
    );
    files
}

#[test]
fn stored_vectors_match_the_testkit_byte_for_byte() {
    let files = build();
    let root = dir();
    if std::env::var_os("RINGCAST_REGEN_VECTORS").is_some_and(|v| v == "1") {
        for (name, bytes) in &files {
            let p = root.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, bytes).unwrap();
        }
        eprintln!("rewrote {} vector files in {}", files.len(), root.display());
        return;
    }
    let mut wrong = Vec::new();
    for (name, bytes) in &files {
        match std::fs::read(root.join(name)) {
            Ok(stored) if &stored == bytes => {}
            Ok(_) => wrong.push(format!("{name} differs")),
            Err(e) => wrong.push(format!("{name}: {e}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "vectors out of date (regenerate with RINGCAST_REGEN_VECTORS=1 if the change is intended): {wrong:#?}"
    );
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn read_str(name: &str) -> String {
    String::from_utf8(read(name)).unwrap()
}

fn trust(name: &str) -> TrustRoot {
    TrustRoot::from_bytes_self_signed(&read(name)).unwrap()
}

fn view(trust: &TrustRoot) -> AgentView<'_> {
    AgentView {
        trust,
        last_sequence: Some(LAST_SEQUENCE),
        rollback_floor: ROLLBACK_FLOOR,
        trusted_now: now(),
        skew: SignedDuration::from_secs(SKEW_SECS),
    }
}

#[test]
fn stored_keys_decode_to_their_key_ids() {
    let index: serde_json::Value = serde_json::from_slice(&read("keys/keys.json")).unwrap();
    for k in index.as_array().unwrap() {
        let name = k["name"].as_str().unwrap();
        let secret = SecretKey::from_pkcs8_pem(&read_str(&format!("keys/{name}.key"))).unwrap();
        let public = public_from_pem(&read_str(&format!("keys/{name}.pub"))).unwrap();
        assert_eq!(secret.verifying_key(), public);
        assert_eq!(secret.key_id().as_str(), k["key_id"]);
        assert_eq!(hex::encode(public.as_bytes()), k["public"]);
        let mut seed = [0u8; 32];
        hex::decode_to_slice(k["seed_hex"].as_str().unwrap(), &mut seed).unwrap();
        assert_eq!(SecretKey::from_seed(seed).key_id(), secret.key_id());
    }
    assert_eq!(index.as_array().unwrap().len(), 5);
    assert_eq!(
        SecretKey::from_pkcs8_pem(&read_str("keys/root.key"))
            .unwrap()
            .key_id(),
        key(1).key_id()
    );
}

#[test]
fn stored_documents_verify() {
    let t = trust("trust.json");
    assert_eq!(t, Fixture::new().trust);
    let env = Envelope::from_slice(&read("release.json")).unwrap();
    let r = verify_release(&t, &env, now(), SignedDuration::ZERO).unwrap();
    let artifact = read("artifact.bin");
    let mut v = ringcast_proto::ArtifactVerifier::new(&r.artifact.sha256, r.artifact.size).unwrap();
    v.update(&artifact).unwrap();
    v.finish().unwrap();

    let ok = accept_directive(&DEVICE, &view(&t), Source::Ring, &read("directive.json")).unwrap();
    assert_eq!(ok.release.unwrap(), r);
    assert_eq!(ok.directive.sequence, 101);
    assert!(
        trust("trust-controller-2of2.json")
            .roles
            .controller
            .threshold
            == 2
    );
}

#[test]
fn stored_negative_vectors_are_refused_with_their_reasons() {
    let manifest: serde_json::Value =
        serde_json::from_slice(&read("negative/manifest.json")).unwrap();
    let cases = manifest.as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let file = c["file"].as_str().unwrap();
        let t = trust(c["trust"].as_str().unwrap());
        let err = accept_directive(&DEVICE, &view(&t), Source::Ring, &read(file)).unwrap_err();
        assert_eq!(err.reason.code(), c["reason"], "{file}: {err}");
    }
}

#[test]
fn stored_pae_and_ramp_vectors_hold() {
    let paes: serde_json::Value = serde_json::from_slice(&read("pae.json")).unwrap();
    for p in paes.as_array().unwrap() {
        let payload = B64.decode(p["payload_base64"].as_str().unwrap()).unwrap();
        let want = B64.decode(p["pae_base64"].as_str().unwrap()).unwrap();
        assert_eq!(pae(p["payload_type"].as_str().unwrap(), &payload), want);
    }
    let ramp: serde_json::Value = serde_json::from_slice(&read("ramp.json")).unwrap();
    for v in ramp.as_array().unwrap() {
        let (r, d) = (
            v["rollout_id"].as_str().unwrap(),
            v["device_id"].as_str().unwrap(),
        );
        assert_eq!(u64::from(bucket(r, d)), v["bucket"].as_u64().unwrap());
        for (pct, want) in v["in_ramp_at_percent"].as_object().unwrap() {
            let p = Percent::from_f64(pct.parse().unwrap()).unwrap();
            assert_eq!(
                ringcast_proto::in_ramp(r, d, p),
                want.as_bool().unwrap(),
                "{r}/{d} at {pct}%"
            );
        }
    }
}

/// The key files must be readable by OpenSSL (DESIGN.md "Command line"). Skipped, loudly, on a
/// machine without the `openssl` binary.
#[test]
fn stored_keys_are_read_by_openssl() {
    for name in ["root", "release", "release2", "controller", "controller2"] {
        let out = match std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(dir().join(format!("keys/{name}.key")))
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                eprintln!("SKIPPED: openssl not runnable: {e}");
                return;
            }
        };
        assert!(
            out.status.success(),
            "openssl cannot read keys/{name}.key: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            read_str(&format!("keys/{name}.pub"))
        );
    }
}
