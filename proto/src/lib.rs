//! `ringcast-proto`: the rules both sides of Ringcast share. Pure: no sockets, no files, no
//! clocks (time is a parameter), no tokio.
//!
//! - [`envelope`]: DSSE envelopes, PAE, signing, threshold verification.
//! - [`keys`]: ed25519 keys, key ids, PEM and JSON forms.
//! - [`trust`]: trust roots, roles, thresholds, expiry, rotation.
//! - [`release`] and [`directive`]: the signed documents, parsed strictly.
//! - [`accept`]: [`accept_directive`], the one decision an agent makes on every directive.
//! - [`digest`]: streaming SHA-256 and size verification for artifacts.
//! - [`report`]: state reports and events agents publish.
//! - [`topic`], [`ramp`], [`duration`], [`window`]: topic names, percent ramps, durations,
//!   delivery windows in IANA time zones.
//! - [`clock`]: the `Clock` port with system and fake implementations.
//! - [`error`]: [`Rejection`] with its stable [`Reason`] code.
//!
//! Everything an attacker can send passes through this crate first.

pub mod accept;
pub mod clock;
pub mod digest;
pub mod directive;
pub mod duration;
pub mod envelope;
pub mod error;
pub mod keys;
pub mod limits;
pub mod ramp;
pub mod release;
pub mod report;
pub mod testkit;
pub mod topic;
pub mod trust;
pub mod window;

pub use accept::{
    accept_directive, check_release, verify_directive, verify_release, Accepted, AgentView,
    DeviceIdentity, Source, Verified,
};
pub use clock::{Clock, FakeClock, SystemClock};
pub use digest::ArtifactVerifier;
pub use directive::{Action, Activation, Directive};
pub use duration::Dur;
pub use envelope::{Envelope, DIRECTIVE_TYPE, RELEASE_TYPE, TRUST_TYPE};
pub use error::{Reason, Rejection};
pub use keys::{KeyId, PublicKey, SecretKey};
pub use ramp::{bucket, in_ramp, Percent};
pub use release::Release;
pub use report::{Event, EventKind, Order, Phase, ProductState, Refusal, ReleaseRef, StateReport};
pub use topic::{Topic, Topics};
pub use trust::{Role, Rotation, TrustRoot};
pub use window::{Schedule, Window};

/// Re-exported so dependents use the same time types.
pub use jiff;
