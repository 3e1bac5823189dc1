//! Property tests: every document round-trips through its wire form, and no parser panics on
//! anything an attacker can send (random bytes, or valid documents with bytes mutated).
//! Case counts are modest so the suite stays fast on two cores.

use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use ringcast_proto::directive::{Action, Activation, Directive};
use ringcast_proto::envelope::{Signature, DIRECTIVE_TYPE};
use ringcast_proto::release::{ArtifactFormat, CheckKind, HealthCheck, InstallKind, Release};
use ringcast_proto::report::ErrorInfo;
use ringcast_proto::testkit::{self, sample_release, Fixture};
use ringcast_proto::{
    accept_directive, AgentView, DeviceIdentity, Dur, Envelope, Event, EventKind, Percent, Phase,
    Reason, ReleaseRef, Source, StateReport, Topic, Topics, TrustRoot, Window,
};
use std::sync::OnceLock;
use std::time::Duration;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Shrinking signed documents is slow and the first failure is informative enough.
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(Fixture::new)
}

// ---------------------------------------------------------------------------------------------
// Strategies

/// Names accepted by `limits::check_name` (never "." or "..": they start with an alnum).
fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9][a-zA-Z0-9._-]{0,23}"
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    // 2001 … 2286, with nanoseconds: RFC 3339 must carry them exactly.
    (1_000_000_000i64..10_000_000_000, 0i32..1_000_000_000)
        .prop_map(|(s, ns)| Timestamp::new(s, ns).unwrap())
}

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// Window text built from parts: a non-empty day set, a start, and an end that differs.
fn window_text() -> impl Strategy<Value = String> {
    (1u8..128, 0i8..24, 0i8..60, 0i8..25, 0i8..60)
        .prop_filter("start equals end", |(_, sh, sm, eh, em)| {
            let em = if *eh == 24 { 0 } else { *em };
            (*sh, *sm) != (*eh, em)
        })
        .prop_map(|(mask, sh, sm, eh, em)| {
            let em = if eh == 24 { 0 } else { em };
            let days = if mask == 0x7f {
                "Daily".to_owned()
            } else {
                DAY_NAMES
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, n)| *n)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            format!("{days} {sh:02}:{sm:02}-{eh:02}:{em:02}")
        })
}

fn window() -> impl Strategy<Value = Window> {
    window_text().prop_map(|s| Window::parse(&s).unwrap())
}

fn percent() -> impl Strategy<Value = Percent> {
    (0u16..=10_000).prop_map(|bp| Percent::from_basis_points(bp).unwrap())
}

fn hex64() -> impl Strategy<Value = String> {
    "[0-9a-f]{64}"
}

fn argv() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec("[ -~]{1,20}", 1..4)
}

fn release() -> impl Strategy<Value = Release> {
    (
        (name(), 0u64..100, 0u64..100, 0u64..100, 1u64..1_000_000),
        (0u64..u64::MAX / 2, 0u64..1000),
        prop::collection::vec(name(), 1..4),
        (hex64(), any::<u64>(), "/[a-z0-9/._-]{0,40}"),
        0u8..3,
        (argv(), proptest::option::of(argv())),
        (1u64..100_000, 1u64..3600, 1u32..10, 0u32..10),
        proptest::option::of(1u64..1_000_000),
    )
        .prop_map(
            |(
                (nm, major, minor, patch, issued_off),
                (seq, floor_gap),
                compatible,
                (sha, size, path),
                kind,
                (cmd, revert),
                (probation, interval, failures, restarts),
                expires_in,
            )| {
                let mut r = sample_release(&nm, 1, 1);
                r.version = semver::Version::new(major, minor, patch);
                r.sequence = seq;
                r.rollback_floor = seq.saturating_sub(floor_gap);
                r.issued_at = Timestamp::from_second(1_700_000_000 + issued_off as i64).unwrap();
                r.expires_at =
                    expires_in.map(|s| r.issued_at + SignedDuration::from_secs(s as i64));
                r.compatible = compatible;
                r.artifact.sha256 = sha;
                r.artifact.size = size;
                r.artifact.url = format!("https://dl.example.com{path}");
                match kind {
                    0 => {
                        r.install.kind = InstallKind::Bundle;
                        r.artifact.format = ArtifactFormat::TarGz;
                    }
                    1 => {
                        r.install.kind = InstallKind::File;
                        r.install.path = Some(format!("/opt{path}"));
                        r.artifact.format = ArtifactFormat::Raw;
                    }
                    _ => {
                        r.install.kind = InstallKind::Command;
                        r.install.command = Some(cmd.clone());
                        r.install.revert = revert;
                        r.artifact.format = ArtifactFormat::Raw;
                    }
                }
                r.health.probation = Dur::secs(probation);
                r.health.interval = Dur::secs(interval);
                r.health.failures_to_revert = failures;
                r.health.restarts_to_revert = restarts;
                r.health.checks = vec![
                    HealthCheck {
                        name: "cmd".into(),
                        kind: CheckKind::Command,
                        command: Some(cmd),
                        url: None,
                        timeout: Dur::secs(5),
                    },
                    HealthCheck {
                        name: "web".into(),
                        kind: CheckKind::Http,
                        command: None,
                        url: Some("http://127.0.0.1:8080/healthz".into()),
                        timeout: Dur(Duration::from_millis(1500)),
                    },
                ];
                r
            },
        )
}

fn directive() -> impl Strategy<Value = Directive> {
    (
        (name(), name(), proptest::option::of(name()), name()),
        (any::<u64>(), 0i64..100_000, 1i64..100_000),
        any::<bool>(),
        percent(),
        (
            proptest::option::of(timestamp()),
            prop::collection::vec(window(), 0..4),
            proptest::option::of(prop::sample::select(vec![
                "UTC",
                "Europe/Berlin",
                "America/New_York",
                "Asia/Kolkata",
            ])),
        ),
    )
        .prop_map(
            |((fleet, ring, device, rollout), (seq, issued, ttl), install, percent, act)| {
                let f = fixture();
                let issued_at = testkit::now() + SignedDuration::from_secs(issued);
                Directive {
                    fleet,
                    ring,
                    device,
                    product: None,
                    rollout_id: rollout,
                    sequence: seq,
                    issued_at,
                    expires_at: issued_at + SignedDuration::from_secs(ttl),
                    action: if install {
                        Action::Install
                    } else {
                        Action::Hold
                    },
                    release: install.then(|| sample_release("app", 3, 1).sign(&[&f.release])),
                    percent,
                    stage_percent: None,
                    activation: Activation {
                        not_before: act.0,
                        windows: act.1,
                        timezone: act.2.map(str::to_owned),
                    },
                    attempt: 1,
                }
            },
        )
}

fn release_ref() -> impl Strategy<Value = ReleaseRef> {
    (name(), "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}", any::<u64>()).prop_map(
        |(name, version, sequence)| ReleaseRef {
            name,
            version,
            sequence,
        },
    )
}

fn phase() -> impl Strategy<Value = Phase> {
    prop::sample::select(vec![
        Phase::Idle,
        Phase::Downloading,
        Phase::Verifying,
        Phase::Staged,
        Phase::Deferred,
        Phase::Installing,
        Phase::Probation,
        Phase::Committed,
        Phase::Reverting,
        Phase::Reverted,
        Phase::Failed,
    ])
}

fn state_report() -> impl Strategy<Value = StateReport> {
    (
        (name(), name(), name(), "[ -~]{0,16}"),
        (
            proptest::option::of(release_ref()),
            proptest::option::of(release_ref()),
            proptest::option::of(release_ref()),
        ),
        phase(),
        proptest::option::of(name()),
        proptest::option::of((name(), "\\PC{0,40}")),
        prop::collection::vec(window(), 0..3),
        timestamp(),
    )
        .prop_map(
            |(
                (device, ring, class, agent),
                (current, previous, target),
                phase,
                rollout,
                err,
                windows,
                at,
            )| {
                StateReport {
                    device,
                    seq: 0,
                    ring,
                    device_class: class,
                    agent_version: agent,
                    current,
                    previous,
                    target,
                    phase,
                    rollout_id: rollout,
                    last_error: err.map(|(reason, detail)| ErrorInfo { reason, detail }),
                    refused: None,
                    windows,
                    timezone: "Europe/Berlin".into(),
                    updated_at: at,
                    attempt: 1,
                    products: Default::default(),
                }
            },
        )
}

fn event_kind() -> impl Strategy<Value = EventKind> {
    let text = || "\\PC{0,30}";
    prop_oneof![
        Just(EventKind::Accepted),
        (prop::sample::select(Reason::ALL.to_vec()), text())
            .prop_map(|(reason, detail)| EventKind::Rejected { reason, detail }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(received, total)| EventKind::Downloading { received, total }),
        (name(), text(), any::<u64>()).prop_map(|(reason, detail, retry_in_ms)| {
            EventKind::DownloadFailed {
                reason,
                detail,
                retry_in_ms,
            }
        }),
        Just(EventKind::Downloaded),
        Just(EventKind::Staged),
        (text(), timestamp()).prop_map(|(reason, until)| EventKind::Deferred { reason, until }),
        text().prop_map(|detail| EventKind::DeferHookFailed { detail }),
        Just(EventKind::Installed),
        Just(EventKind::Healthy),
        Just(EventKind::Committed),
        (
            name(),
            proptest::option::of(name()),
            proptest::option::of(text())
        )
            .prop_map(|(reason, check, output)| EventKind::Reverted {
                reason,
                check,
                output
            }),
        (name(), text()).prop_map(|(reason, detail)| EventKind::InstallFailed { reason, detail }),
        any::<u64>().prop_map(|version| EventKind::TrustRotated { version }),
        Just(EventKind::Held),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (
        name(),
        name(),
        timestamp(),
        proptest::option::of(name()),
        proptest::option::of(release_ref()),
        event_kind(),
    )
        .prop_map(|(id, device, at, rollout_id, release, kind)| Event {
            id,
            device,
            at,
            rollout_id,
            release,
            kind,
        })
}

/// Mutations of a valid encoding: flip a byte, overwrite one, truncate, or splice in junk.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
    ]
}

fn mutate(mut bytes: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        if bytes.is_empty() {
            break;
        }
        let n = bytes.len();
        match m {
            Mutation::Flip(i, b) => bytes[i % n] ^= b,
            Mutation::Set(i, b) => bytes[i % n] = *b,
            Mutation::Truncate(i) => bytes.truncate(i % n),
            Mutation::Insert(i, v) => {
                let at = i % n;
                bytes.splice(at..at, v.iter().copied());
            }
        }
    }
    bytes
}

fn device() -> DeviceIdentity<'static> {
    DeviceIdentity {
        id: "dev-1",
        fleet: testkit::FLEET,
        ring: "canary",
        class: "sensor-v2",
        product: None,
    }
}

fn view(f: &Fixture) -> AgentView<'_> {
    AgentView {
        trust: &f.trust,
        last_sequence: Some(100),
        rollback_floor: 2,
        trusted_now: testkit::now(),
        skew: SignedDuration::from_secs(300),
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn envelope_round_trips(
        payload_type in "\\PC{0,60}",
        payload in prop::collection::vec(any::<u8>(), 0..2048),
        sigs in prop::collection::vec(("\\PC{0,70}", prop::collection::vec(any::<u8>(), 0..80)), 0..5),
    ) {
        let env = Envelope {
            payload_type,
            payload,
            signatures: sigs.into_iter().map(|(keyid, sig)| Signature { keyid, sig }).collect(),
        };
        prop_assert_eq!(Envelope::from_slice(&env.to_vec()).unwrap(), env.clone());
        prop_assert_eq!(Envelope::from_slice(&env.to_vec_pretty()).unwrap(), env);
    }

    #[test]
    fn signed_envelope_verifies_and_any_payload_change_breaks_it(
        payload in prop::collection::vec(any::<u8>(), 1..512),
        i in any::<usize>(),
        bit in 0u8..8,
    ) {
        let f = fixture();
        let env = Envelope::sign(DIRECTIVE_TYPE, payload.clone(), &[&f.controller]);
        let back = Envelope::from_slice(&env.to_vec()).unwrap();
        prop_assert_eq!(
            back.verify(DIRECTIVE_TYPE, &f.trust, &f.trust.roles.controller).unwrap(),
            &payload[..]
        );
        let mut bad = back.clone();
        let n = bad.payload.len();
        bad.payload[i % n] ^= 1 << bit;
        prop_assert_eq!(
            bad.verify(DIRECTIVE_TYPE, &f.trust, &f.trust.roles.controller).unwrap_err().reason,
            Reason::BadSignature
        );
    }

    #[test]
    fn release_round_trips_and_verifies(r in release()) {
        prop_assert!(r.validate().is_ok(), "{:?}", r.validate());
        prop_assert_eq!(Release::parse(&r.to_bytes()).unwrap(), r.clone());
        let f = fixture();
        let env = Envelope::from_slice(&r.sign(&[&f.release]).to_vec()).unwrap();
        let back = ringcast_proto::verify_release(&f.trust, &env, r.issued_at, SignedDuration::ZERO).unwrap();
        prop_assert_eq!(back, r);
    }

    #[test]
    fn directive_round_trips(d in directive()) {
        prop_assert_eq!(Directive::parse(&d.to_bytes()).unwrap(), d.clone());
        let f = fixture();
        let env = Envelope::from_slice(&d.sign(&[&f.controller]).to_vec()).unwrap();
        let payload = env.verify(DIRECTIVE_TYPE, &f.trust, &f.trust.roles.controller).unwrap();
        prop_assert_eq!(Directive::parse(payload).unwrap(), d);
    }

    #[test]
    fn state_report_round_trips(r in state_report()) {
        prop_assert_eq!(StateReport::parse(&r.to_bytes()).unwrap(), r);
    }

    #[test]
    fn event_round_trips(e in event()) {
        let bytes = e.to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        prop_assert_eq!(v["event"].as_str(), Some(e.kind.name()));
        prop_assert_eq!(Event::parse(&bytes).unwrap(), e);
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn dur_display_round_trips(ms in 0u64..=10 * 366 * 86_400_000) {
        let d = Dur(Duration::from_millis(ms));
        prop_assert_eq!(d.to_string().parse::<Dur>().unwrap(), d);
        let json = serde_json::to_string(&d).unwrap();
        prop_assert_eq!(serde_json::from_str::<Dur>(&json).unwrap(), d);
    }

    #[test]
    fn dur_sums_parse_to_their_total(h in 0u64..1000, m in 0u64..1000, s in 0u64..1000, ms in 0u64..1000) {
        let text = format!("{h}h{m}m{s}s{ms}ms");
        let want = Duration::from_millis(((h * 60 + m) * 60 + s) * 1000 + ms);
        prop_assert_eq!(text.parse::<Dur>().unwrap().get(), want);
    }

    #[test]
    fn window_round_trips(text in window_text()) {
        let w = Window::parse(&text).unwrap();
        prop_assert_eq!(Window::parse(&w.to_string()).unwrap(), w);
        let json = serde_json::to_string(&w).unwrap();
        prop_assert_eq!(serde_json::from_str::<Window>(&json).unwrap(), w);
    }

    #[test]
    fn percent_round_trips(p in percent()) {
        let json = serde_json::to_string(&p).unwrap();
        prop_assert_eq!(serde_json::from_str::<Percent>(&json).unwrap(), p);
        prop_assert_eq!(Percent::from_f64(p.as_f64()).unwrap(), p);
    }

    #[test]
    fn percent_ramp_is_monotonic(rollout in "\\PC{0,20}", dev in name(), a in percent(), b in percent()) {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        if ringcast_proto::in_ramp(&rollout, &dev, lo) {
            prop_assert!(ringcast_proto::in_ramp(&rollout, &dev, hi));
        }
        prop_assert!(ringcast_proto::bucket(&rollout, &dev) < 10_000);
    }

    #[test]
    fn topics_build_and_parse(fleet in name(), ring in name(), dev in name()) {
        let t = Topics::for_fleet(&fleet).unwrap();
        prop_assert_eq!(t.parse(&t.trust()).unwrap(), Topic::Trust);
        prop_assert_eq!(t.parse(&t.ring_directive(&ring)).unwrap(), Topic::RingDirective(ring.clone()));
        prop_assert_eq!(t.parse(&t.device_directive(&dev)).unwrap(), Topic::DeviceDirective(dev.clone()));
        prop_assert_eq!(t.parse(&t.state(&dev)).unwrap(), Topic::State(dev.clone()));
        prop_assert_eq!(t.parse(&t.events(&dev)).unwrap(), Topic::Events(dev.clone()));
        prop_assert_eq!(t.parse(&t.online(&dev)).unwrap(), Topic::Online(dev.clone()));
        // Another fleet's topics are never mistaken for ours.
        let other = Topics::for_fleet(&format!("{fleet}x")).unwrap();
        prop_assert!(t.parse(&other.state(&dev)).is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// Arbitrary input never panics

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_bytes_never_panic_any_parser(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let f = fixture();
        let _ = Envelope::from_slice(&bytes);
        let _ = TrustRoot::from_bytes_self_signed(&bytes);
        let _ = Release::parse(&bytes);
        let _ = Directive::parse(&bytes);
        let _ = StateReport::parse(&bytes);
        let _ = Event::parse(&bytes);
        let err = accept_directive(&device(), &view(f), Source::Ring, &bytes);
        prop_assert!(err.is_err());
        let text = String::from_utf8_lossy(&bytes);
        let _ = Window::parse(&text);
        let _ = text.parse::<Dur>();
        let topics = Topics::for_fleet("lab").unwrap();
        let _ = topics.parse(&text);
        let _ = Topics::with_prefix(&text);
    }

    #[test]
    fn arbitrary_text_never_panics_text_parsers(text in "\\PC{0,80}") {
        let _ = Window::parse(&text);
        let _ = text.parse::<Dur>();
        let topics = Topics::for_fleet("lab").unwrap();
        let _ = topics.parse(&text);
        let _ = topics.parse(&format!("ringcast/lab/{text}"));
        let _ = Topics::with_prefix(&text);
        let _ = Percent::from_f64(text.len() as f64 / 3.0);
    }

    #[test]
    fn near_miss_text_never_panics(
        w in "[A-Za-z*,-]{0,12} [0-9:]{0,6}-[0-9:]{0,6}",
        d in "[0-9]{0,22}[a-z]{0,3}[0-9]{0,5}[a-z]{0,3}",
        t in "ringcast/lab/(devices|rings|trust|x)?/[^/]{0,10}/?[a-z]{0,10}/?[a-z]{0,3}",
    ) {
        let _ = Window::parse(&w);
        let _ = d.parse::<Dur>();
        let _ = Topics::for_fleet("lab").unwrap().parse(&t);
    }

    #[test]
    fn json_shaped_junk_never_panics(v in arbitrary_json()) {
        let bytes = serde_json::to_vec(&v).unwrap();
        let _ = Envelope::from_slice(&bytes);
        let _ = TrustRoot::parse_payload(&bytes);
        let _ = Release::parse(&bytes);
        let _ = Directive::parse(&bytes);
        let _ = StateReport::parse(&bytes);
        let _ = Event::parse(&bytes);
        prop_assert!(accept_directive(&device(), &view(fixture()), Source::Ring, &bytes).is_err());
    }
}

fn arbitrary_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        // Keys drawn from the real field names so the parsers get past the first field.
        let key = prop::sample::select(vec![
            "payloadType",
            "payload",
            "signatures",
            "keyid",
            "sig",
            "version",
            "expires_at",
            "keys",
            "roles",
            "root",
            "release",
            "controller",
            "threshold",
            "keyids",
            "name",
            "sequence",
            "fleet",
            "ring",
            "action",
            "percent",
            "activation",
            "event",
            "device",
            "phase",
            "artifact",
            "install",
            "health",
            "windows",
            "x",
        ]);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key.prop_map(str::to_owned), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config(192))]

    /// A mutated copy of a valid signed directive is refused, or (if the mutation did not
    /// change what was signed, e.g. it only touched insignificant bytes) accepted as the
    /// very same directive. It never panics and never yields something else.
    #[test]
    fn mutated_directive_envelopes_are_refused_or_unchanged(
        seq in 101u64..1_000_000,
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        let f = fixture();
        let d = f.directive("canary", seq, 3);
        let good = d.sign(&[&f.controller]).to_vec();
        let bytes = mutate(good, &ms);
        match accept_directive(&device(), &view(f), Source::Ring, &bytes) {
            Ok(accepted) => prop_assert_eq!(accepted.directive, d),
            Err(e) => prop_assert!(!e.detail.is_empty()),
        }
        // The device topic path takes the same bytes without panicking either.
        let _ = accept_directive(&device(), &view(f), Source::Device, &bytes);
    }

    #[test]
    fn mutated_trust_roots_are_refused_or_unchanged(ms in prop::collection::vec(mutation(), 1..4)) {
        let f = fixture();
        let bytes = mutate(f.trust_env.to_vec(), &ms);
        if let Ok(t) = TrustRoot::from_bytes_self_signed(&bytes) {
            prop_assert_eq!(&t, &f.trust);
        }
        if let Ok(env) = Envelope::from_slice(&bytes) {
            let _ = f.trust.rotate(&env, testkit::now(), SignedDuration::ZERO);
        }
    }

    #[test]
    fn mutated_documents_never_panic_their_parsers(ms in prop::collection::vec(mutation(), 1..4)) {
        let f = fixture();
        let _ = Release::parse(&mutate(sample_release("app", 3, 1).to_bytes(), &ms));
        let _ = Directive::parse(&mutate(f.directive("canary", 5, 3).to_bytes(), &ms));
        let report = StateReport {
            device: "dev-1".into(),
            seq: 0,
            ring: "canary".into(),
            device_class: "sensor-v2".into(),
            agent_version: "0.1.0".into(),
            current: None,
            previous: None,
            target: None,
            phase: Phase::Idle,
            rollout_id: None,
            last_error: None,
            refused: None,
            windows: vec![Window::parse("Mon-Fri 02:00-04:00").unwrap()],
            timezone: "UTC".into(),
            updated_at: testkit::now(),
            attempt: 1,
            products: Default::default(),
        };
        let _ = StateReport::parse(&mutate(report.to_bytes(), &ms));
    }
}
