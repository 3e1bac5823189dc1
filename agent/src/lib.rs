//! `ringcast-agent`: the device side of Ringcast. It verifies every directive with
//! [`ringcast_proto::accept_directive`], downloads and verifies the artifact, installs it
//! atomically, watches its health through probation, reverts locally when it is unhealthy,
//! and reports over MQTT (DESIGN.md "Agent state machine").
//!
//! # Parts
//! - [`config`]: [`AgentConfig`], loaded from `agent.toml` (`deny_unknown_fields`; errors name
//!   the file and the field). Documented example: `deploy/agent.toml`.
//! - [`store`]: the [`Store`] port — [`SledStore`] (real) and [`MemoryStore`] (simulators).
//! - [`install`]: the [`Installer`] port — [`FsInstaller`] works in any directory (bundle,
//!   file and command installs, tar entries checked, atomic `current` switch).
//! - [`download`]: HTTP(S) with Range resume, stall timeout, streaming SHA-256/size check,
//!   over [`http`], a small GET-only HTTP/1.1 client (chosen by size, see BENCHMARKS.md).
//! - [`health`], [`cmd`]: probation checks, hooks and installer commands with timeouts.
//! - [`defer`]: the optional defer hook, asked before activation whether now is a good time.
//! - [`transport`]: the MQTT session and the persisted, ordered report outbox.
//! - [`log`]: the binary's small text/JSON `tracing` subscriber.
//! - [`state`]: what is persisted and the phase transition table.
//! - [`agent`]: [`Agent`], the task that ties it together: one worker per release slot.
//! - `hub` (private): what the products of a multi-product agent share (trust root, trusted
//!   time, event ids, the merged report) and the router feeding each product's worker.
//! - `fleet` (feature `fleet`, not in the device binary): many real agents in one process,
//!   the devices of `ringcast demo`, the `ringcast-sim` simulator and the end-to-end
//!   scenarios.
//!
//! # Using it as a library (simulators, `ringcast demo`)
//! Many agents can run in one tokio process, each with its own MQTT connection, data dir and
//! store (the `fleet` feature builds whole fleets this way):
//! ```no_run
//! # async fn demo(cfg: ringcast_agent::AgentConfig) -> ringcast_agent::Result<()> {
//! use ringcast_agent::{Agent, Deps, FsInstaller, MemoryStore};
//! use std::sync::Arc;
//! let deps = Deps {
//!     store: Arc::new(MemoryStore::new()),
//!     clock: Arc::new(ringcast_proto::SystemClock),
//!     installer: Arc::new(FsInstaller::new(cfg.install_root(), std::time::Duration::from_secs(60), 2048)),
//! };
//! let handle = Agent::new(cfg, deps)?.spawn();
//! let report = handle.status(); // phase, current, target, rollout_id, last_error
//! handle.shutdown().await?;
//! # Ok(()) }
//! ```
//! [`Agent::open`] uses the real dependencies ([`Deps::real`]); [`Agent::run`] takes a
//! `watch::Receiver<bool>` shutdown signal; [`Agent::run_once`] processes what is retained,
//! finishes what can finish now, and returns.
//!
//! # Behaviour worth knowing
//! - **Directive precedence.** A per-device `install` directive pins the device: ring
//!   directives are still verified and remembered but not acted on. The pin ends when a
//!   device `hold` directive arrives (the device follows its ring again) or when a ring
//!   directive for a *different rollout* than the one current at pin time is accepted.
//!   Ramp percent applies to ring directives only; a device directive names its device.
//! - **Cancel.** Work that has not activated (downloading, verifying, staged, deferred) is
//!   dropped as soon as the followed directive no longer asks for it: a `hold` (ring or
//!   device), an install of the release the device already runs (a rollback), of another
//!   release (which starts instead), of one that failed here in that rollout, or a ring ramp
//!   the device is not in. The download is aborted, its `.part` and the staged artifact removed, and the
//!   report says `idle`, `current` unchanged, no `target`, the `rollout_id` of the directive
//!   that caused it; the event is `held` or `cancelled { reason }` (`state::CancelReason`).
//!   An install already activated finishes its probation (commit or revert) first. The
//!   decision is one pure function, `state::plan`.
//! - **Leftovers.** `releases/.staging-*` directories of interrupted unpacks are removed at
//!   start-up and at revert ([`Installer::sweep`]); partial or staged downloads no job or
//!   installed release uses are removed at start-up and after every cancel.
//! - **Activation** needs the directive's `not_before` passed, one of its windows open, and
//!   one of the device's own `windows` (config) open; empty lists mean "any time".
//! - **Deferral.** With a `[defer]` hook, a staged release is activated only when the hook
//!   says go (exit 0), fails (any other exit, a timeout: a `defer_hook_failed` event), or the
//!   deadline of its deferral passed. Exit 75 defers it: phase `deferred`, `last_error`
//!   reason `deferred` with the hook's reason and the deadline, a `deferred` event; asked
//!   again every `retry`. The deferral is persisted (a restart keeps its deadline) and ends
//!   like staging when the directive stops asking for the release.
//! - **Phases reported**: `committed` = installed and healthy through probation; `reverted`
//!   / `failed` = failure of `target` (`failed`: nothing changed, e.g. `pre_activate`
//!   failed); `staged` = verified and waiting for activation; `deferred` = staged, and the
//!   defer hook said not now. `rollout_id` and `target` stay on the final report.
//! - A release that reverted or failed here is not retried within the same rollout (so a
//!   re-signed directive cannot loop installs); a new rollout may offer it again.
//! - The rollback floor rises at commit.
//! - **Products.** Without `[products]` the agent has one slot for every release name, on the
//!   ring and device directive topics. With `[products.<name>]` tables each product (name =
//!   release name) has its own slot, phase, rollback floor, failed list, deferral, directive
//!   topics (`…/rings/{ring}/products/{name}/directive`, `…/devices/{device}/products/{name}/
//!   directive`), downloads (`{data_dir}/products/{name}/artifacts`), install root and state
//!   (store key `product/{name}/state`), and runs as its own task, so one product's probation,
//!   window or deferral never holds up another. A release named otherwise is refused
//!   `wrong_target`, one of a kind the product does not take `incompatible`. The state report
//!   lists every product under `products` and leaves its release fields empty; one trusted
//!   time, one report sequence and one event numbering are kept per device (`device/state`).
//! - Restarts during `installing` or `probation` count toward `restarts_to_revert`; below
//!   it, an install is simply run again (every install step is repeatable).

pub mod agent;
pub mod cmd;
pub mod config;
pub mod defer;
pub mod download;
pub mod error;
#[cfg(feature = "fleet")]
pub mod fleet;
pub mod health;
pub mod http;
mod hub;
pub mod install;
pub mod log;
pub mod state;
pub mod store;
pub mod transport;

pub use agent::{Agent, AgentHandle, Deps};
pub use config::AgentConfig;
pub use error::{Error, Result};
pub use install::{FsInstaller, Installer};
pub use store::{MemoryStore, SledStore, Store};
