//! Fixed keys, trust roots, releases and directives for tests and interoperability vectors.
//! Deterministic: the same seeds give the same keys and signatures everywhere.

use crate::directive::{Action, Activation, Directive};
use crate::duration::Dur;
use crate::envelope::{Envelope, TRUST_TYPE};
use crate::keys::SecretKey;
use crate::ramp::Percent;
use crate::release::{Artifact, ArtifactFormat, Health, Install, InstallKind, Release};
use crate::trust::{RoleSpec, Roles, TrustDoc, TrustRoot};
use jiff::{SignedDuration, Timestamp};
use std::collections::BTreeMap;

/// Fleet name used by fixtures.
pub const FLEET: &str = "lab";

/// Fixed ramp vectors `(rollout_id, device_id, bucket)`.
pub const RAMP_VECTORS: &[(&str, &str, u16)] = &[
    ("r1", "dev-1", 6487),
    ("r1", "dev-2", 8669),
    ("rollout-2026-11", "sensor-0001", 130),
    ("rollout-2026-11", "sensor-0002", 5278),
    ("canary-v2", "device-α", 1147),
    ("", "", 3192),
];

/// A key from a one-byte seed.
pub fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed([seed; 32])
}

/// An idle single-product report of `device` in `ring`, of device class `class`, with
/// nothing installed, dated [`now`]: the base a test changes with struct update syntax.
pub fn idle_report(device: &str, ring: &str, class: &str) -> crate::StateReport {
    crate::StateReport {
        device: device.into(),
        seq: 0,
        ring: ring.into(),
        device_class: class.into(),
        agent_version: "test".into(),
        current: None,
        previous: None,
        target: None,
        phase: crate::Phase::Idle,
        rollout_id: None,
        last_error: None,
        refused: None,
        attempt: 1,
        windows: Vec::new(),
        timezone: "UTC".into(),
        updated_at: now(),
        products: BTreeMap::new(),
    }
}

/// The fixtures' "now": 2026-11-23T00:00:00Z.
pub fn now() -> Timestamp {
    Timestamp::from_second(1_795_392_000).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// A release with the given name, sequence and rollback floor, for class `sensor-v2`.
pub fn sample_release(name: &str, sequence: u64, floor: u64) -> Release {
    Release {
        name: name.to_owned(),
        version: semver::Version::new(1, sequence, 0),
        sequence,
        rollback_floor: floor,
        issued_at: now()
            .checked_sub(SignedDuration::from_hours(1))
            .unwrap_or(now()),
        expires_at: None,
        compatible: vec!["sensor-v2".into()],
        artifact: Artifact {
            url: format!("http://127.0.0.1:1/artifacts/{name}-{sequence}.tar.gz"),
            sha256: "0".repeat(64),
            size: 1024,
            format: ArtifactFormat::TarGz,
        },
        install: Install {
            kind: InstallKind::Bundle,
            path: None,
            command: None,
            revert: None,
            pre_activate: None,
            post_activate: None,
        },
        health: Health {
            checks: vec![],
            probation: Dur::secs(60),
            interval: Dur::secs(10),
            failures_to_revert: 2,
            restarts_to_revert: 2,
        },
    }
}

/// Keys and a trust root: root = seed 1, release = seeds 2 and 3, controller = seeds 4 and 5.
pub struct Fixture {
    /// Root key.
    pub root: SecretKey,
    /// First release key.
    pub release: SecretKey,
    /// Second release key (listed; used for threshold 2).
    pub release2: SecretKey,
    /// First controller key.
    pub controller: SecretKey,
    /// Second controller key.
    pub controller2: SecretKey,
    /// The trust root.
    pub trust: TrustRoot,
    /// Its self-signed envelope.
    pub trust_env: Envelope,
}

impl Fixture {
    /// Thresholds of one everywhere.
    pub fn new() -> Fixture {
        Fixture::build(1, 1)
    }

    /// Release role threshold `t`.
    pub fn with_release_threshold(t: u32) -> Fixture {
        Fixture::build(t, 1)
    }

    /// Controller role threshold `t`.
    pub fn with_controller_threshold(t: u32) -> Fixture {
        Fixture::build(1, t)
    }

    fn build(release_t: u32, controller_t: u32) -> Fixture {
        let (root, release, release2, controller, controller2) =
            (key(1), key(2), key(3), key(4), key(5));
        let mut keys = BTreeMap::new();
        for k in [&root, &release, &release2, &controller, &controller2] {
            keys.insert(k.key_id().clone(), k.public());
        }
        let doc = TrustDoc {
            version: 1,
            expires_at: "2099-01-01T00:00:00Z".parse().unwrap_or(Timestamp::MAX),
            keys,
            roles: Roles {
                root: RoleSpec {
                    keyids: vec![root.key_id().clone()],
                    threshold: 1,
                },
                release: RoleSpec {
                    keyids: vec![release.key_id().clone(), release2.key_id().clone()],
                    threshold: release_t,
                },
                controller: RoleSpec {
                    keyids: vec![controller.key_id().clone(), controller2.key_id().clone()],
                    threshold: controller_t,
                },
            },
        };
        let trust_env = Envelope::sign(
            TRUST_TYPE,
            serde_json::to_vec(&doc).unwrap_or_default(),
            &[&root],
        );
        let trust = match TrustRoot::from_doc(doc) {
            Ok(t) => t,
            Err(e) => panic!("fixture trust root invalid: {e}"),
        };
        Fixture {
            root,
            release,
            release2,
            controller,
            controller2,
            trust,
            trust_env,
        }
    }

    /// An install directive for `ring` with `sequence`, carrying a signed sample release with
    /// release sequence `release_seq` (floor 1).
    pub fn directive(&self, ring: &str, sequence: u64, release_seq: u64) -> Directive {
        let release = sample_release("app", release_seq, 1).sign(&[&self.release]);
        Directive {
            fleet: FLEET.into(),
            ring: ring.into(),
            device: None,
            product: None,
            rollout_id: "rollout-1".into(),
            sequence,
            issued_at: now(),
            expires_at: now()
                .checked_add(SignedDuration::from_hours(1))
                .unwrap_or(Timestamp::MAX),
            action: Action::Install,
            release: Some(release),
            percent: Percent::FULL,
            stage_percent: None,
            activation: Activation::default(),
            attempt: 1,
        }
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture::new()
    }
}

/// The document of a rotation of `from` to version `version` whose root role is `new_root`.
pub fn rotated_doc(from: &TrustRoot, new_root: &SecretKey, version: u64) -> TrustDoc {
    let mut doc = from.doc.clone();
    doc.version = version;
    doc.keys
        .insert(new_root.key_id().clone(), new_root.public());
    doc.roles.root = RoleSpec {
        keyids: vec![new_root.key_id().clone()],
        threshold: 1,
    };
    doc
}
