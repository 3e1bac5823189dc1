//! The HTTP side: JSON API under `/api/v1` (bearer tokens with roles `viewer` < `operator` <
//! `approver`), Prometheus text at `/metrics`, the artifact store at `/artifacts/sha256/{hex}`
//! (Range supported) and a small dashboard at `/`.
//!
//! Authorisation happens before anything else in a handler, so a refused request has no
//! partial effect; refused attempts at changing something are audited.
//!
//! | method | path | role | what |
//! |---|---|---|---|
//! | GET | `/api/v1/releases` | viewer | releases, with `blocked` reasons |
//! | POST | `/api/v1/releases` | operator | `{envelope, start_at?, activate_at?}`: verify against the trust root, create the rollout |
//! | POST | `/api/v1/releases/{id}/unblock` | approver | offer a halted release again |
//! | PUT | `/api/v1/artifacts?sha256=&size=` | operator | raw body, streamed into the content-addressed store; checked against the optional declared digest and size |
//! | GET | `/api/v1/rollouts`, `/api/v1/rollouts/{id}` | viewer | state, per-ring tallies |
//! | POST | `/api/v1/rollouts/{id}/approve` | approver | `{ring?}`: approve a `manual` ring |
//! | POST | `/api/v1/rollouts/{id}/pause\|resume\|abort\|retry` | operator | |
//! | POST | `/api/v1/rollouts/{id}/launch` | operator | `{at}`: move a launch to `at`, or hold it (`null`) |
//! | GET | `/api/v1/devices?ring=&phase=&rollout=`, `/api/v1/devices/{id}` | viewer | latest report, `prediction` (forecast commit time), pin; a device running several products also `products` (each one's phase, current, rollout, prediction, pin); one device also its recent `events`, newest first |
//! | POST | `/api/v1/devices/{id}/pin` | approver | `{release_id}`: pin the device to a release (per-device directive) |
//! | DELETE | `/api/v1/devices/{id}/pin?product=` | approver | end the pin (of `product`, needed when the device is pinned for several): the device follows its ring again |
//! | GET | `/api/v1/audit` | viewer | the raw hash-chained log (verify it client-side) |
//! | GET | `/api/v1/insight` | viewer | lead time, deployment frequency, change-failure rate, time to restore; each live rollout's `forecasts` (step timeline, measured download/install, probation) |
//! | GET | `/metrics` | — | Prometheus text |
//! | GET | `/artifacts/sha256/{hex}` | — | artifact bytes, `Range` supported |
//!
//! Errors are `{"error": "<stable code>", "detail": "…"}` with 401, 403, 404, 409, 422 or 500;
//! an upload can also get 413 (`too_large`), 422 (`size_mismatch`, `digest_mismatch`) or 408
//! (`upload_stalled`).

use crate::artifacts::{is_sha256_hex, parse_range, Declared, RangeReq, UploadError};
use crate::audit::Record;
use crate::config::{ApiRole, Promotion};
use crate::engine::{self, Actor, EngineHandle, RolloutAction, Submit};
use crate::error::Error;
use crate::model::{
    Approval, DevicePin, DeviceRecord, EventEntry, ReleaseRecord, Rollout, RolloutState, Stage,
    StepRecord, Tally,
};
use crate::shared::Shared;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use jiff::Timestamp;
use ringcast_proto::{Envelope, Percent, Phase};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Handler state.
#[derive(Clone)]
pub struct App {
    /// Shared tables.
    pub shared: Arc<Shared>,
    /// Engine handle.
    pub engine: EngineHandle,
}

/// An API error: status, stable code, detail.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: String,
    detail: String,
}

/// The JSON body of every error.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable code.
    pub error: String,
    /// Human detail.
    pub detail: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.into(),
            detail: detail.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let status = match &e {
            Error::NotFound { .. } => StatusCode::NOT_FOUND,
            Error::Conflict { .. } => StatusCode::CONFLICT,
            Error::Rejected(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Config { .. } => StatusCode::BAD_REQUEST,
            Error::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let detail = match &e {
            Error::Conflict { detail, .. } => detail.clone(),
            Error::Rejected(r) => r.detail.clone(),
            other => other.to_string(),
        };
        ApiError::new(status, e.code(), detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            detail: self.detail,
        };
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Build the router.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/artifacts/sha256/{hex}", get(artifact))
        .route(
            "/api/v1/releases",
            get(list_releases)
                .post(submit_release)
                // Refused while reading, before a byte is parsed (see `submit_release`).
                .layer(DefaultBodyLimit::max(SUBMIT_BODY_LIMIT)),
        )
        .route("/api/v1/releases/{id}/unblock", post(unblock_release))
        // The upload streams its body and enforces `max_artifact_bytes` itself.
        .route("/api/v1/artifacts", put(upload_artifact))
        .route("/api/v1/rollouts", get(list_rollouts))
        .route("/api/v1/rollouts/{id}", get(show_rollout))
        .route("/api/v1/rollouts/{id}/launch", post(launch_rollout))
        .route("/api/v1/rollouts/{id}/{action}", post(act_rollout))
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{id}", get(show_device))
        .route(
            "/api/v1/devices/{id}/pin",
            post(pin_device).delete(unpin_device),
        )
        .route("/api/v1/audit", get(audit_log))
        .route("/api/v1/insight", get(insight))
        .with_state(app)
}

/// Check the bearer token against `need`. Refusals of state-changing requests are audited
/// (who tried what), then answered 401 (no or unknown token) or 403 (role too low).
fn authorize(
    app: &App,
    headers: &HeaderMap,
    need: ApiRole,
    action: &str,
    target: Option<&str>,
) -> ApiResult<Actor> {
    authorize_on(app, headers, need, action, target, None)
}

/// [`authorize`], with `subject` (e.g. `device d-1`) leading the detail of a refusal so the
/// audit log says what was aimed at when no rollout was.
fn authorize_on(
    app: &App,
    headers: &HeaderMap,
    need: ApiRole,
    action: &str,
    target: Option<&str>,
    subject: Option<&str>,
) -> ApiResult<Actor> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let found = presented.and_then(|t| {
        let digest = ringcast_proto::digest::sha256_hex(t.as_bytes());
        app.shared.tokens.iter().find(|e| e.digest() == digest)
    });
    let deny = |actor: &str, role: Option<&str>, status: StatusCode, code: &str, detail: String| {
        let detail = match subject {
            Some(s) => format!("{s}: {detail}"),
            None => detail,
        };
        app.shared
            .counters
            .auth_denied
            .fetch_add(1, Ordering::Relaxed);
        if need > ApiRole::Viewer {
            let r = Record {
                actor: actor.into(),
                role: role.map(str::to_owned),
                action: action.into(),
                outcome: format!("denied: {code}"),
                rollout_id: target.map(str::to_owned),
                ring: None,
                detail: detail.clone(),
            };
            if let Err(e) = app.shared.audit.append(app.shared.clock.now(), r) {
                tracing::warn!(error = %e, "audit append failed");
            }
        }
        ApiError::new(status, code, detail)
    };
    match found {
        None => Err(deny(
            "anonymous",
            None,
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            if presented.is_some() {
                "unknown token".into()
            } else {
                "missing bearer token".into()
            },
        )),
        Some(t) if t.role < need => Err(deny(
            &t.name,
            Some(t.role.as_str()),
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{action} needs role {}, token {} has {}",
                need.as_str(),
                t.name,
                t.role.as_str()
            ),
        )),
        Some(t) => Ok(Actor {
            name: t.name.clone(),
            role: t.role.as_str().into(),
        }),
    }
}

/// A release as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseView {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Sequence.
    pub sequence: u64,
    /// Artifact digest.
    pub sha256: String,
    /// Artifact size.
    pub size: u64,
    /// Submitted at.
    pub submitted_at: Timestamp,
    /// Submitted by.
    pub submitted_by: String,
    /// Why it is blocked, if it is.
    pub blocked: Option<String>,
}

impl From<&ReleaseRecord> for ReleaseView {
    fn from(r: &ReleaseRecord) -> ReleaseView {
        ReleaseView {
            id: r.id.clone(),
            name: r.release.name.clone(),
            version: r.release.version.to_string(),
            sequence: r.release.sequence,
            sha256: r.release.artifact.sha256.clone(),
            size: r.release.artifact.size,
            submitted_at: r.submitted_at,
            submitted_by: r.submitted_by.clone(),
            blocked: r.blocked.clone(),
        }
    }
}

/// One ring of a rollout as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RingView {
    /// Ring name.
    pub name: String,
    /// `auto` / `manual`.
    pub promotion: Promotion,
    /// The ramp.
    pub steps: Vec<Percent>,
    /// `not_started`, `done`, `halted`, or the current stage (`baking`, …).
    pub status: String,
    /// Current step index (when active).
    pub step: Option<usize>,
    /// Percent currently published to the ring for this rollout.
    pub percent: Option<Percent>,
    /// Counts.
    pub tally: Tally,
    /// Approval, for manual rings.
    pub approval: Option<Approval>,
    /// Attempts, once the ring was reached: the directive's attempt and how many are allowed.
    #[serde(default)]
    pub attempt: Option<crate::model::RingAttempt>,
    /// Devices of the ring that downloaded and verified the release and wait to activate it.
    #[serde(default)]
    pub staged: u32,
    /// Before a launch: devices expected ready at the launch, i.e. staged now plus those
    /// downloading or verifying it now (a device that has not started counts as not ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at_launch: Option<u32>,
}

/// A rollout as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutView {
    /// Id.
    pub id: String,
    /// Release id.
    pub release_id: String,
    /// Release version.
    pub version: String,
    /// Phase name.
    pub phase: String,
    /// Why it halted, what it waits for, …
    pub detail: Option<String>,
    /// Paused.
    pub paused: bool,
    /// Current ring name (when active).
    pub ring: Option<String>,
    /// Created.
    pub created_at: Timestamp,
    /// Scheduled start.
    pub start_at: Option<Timestamp>,
    /// Store-scheduled activation.
    pub activate_at: Option<Timestamp>,
    /// Ended.
    pub ended_at: Option<Timestamp>,
    /// Per ring.
    pub rings: Vec<RingView>,
    /// Steps published.
    pub history: Vec<StepRecord>,
    /// The launch, for a rollout with `activate_at`.
    #[serde(default)]
    pub launch: Option<crate::model::Launch>,
    /// Full state.
    pub state: RolloutState,
}

fn rollout_view(app: &App, r: &Rollout) -> RolloutView {
    view_of(&app.shared, r)
}

/// Rollout `id` as `GET /api/v1/rollouts/{id}` shows it (for tools and tests in process).
pub fn rollout_view_of(controller: &crate::ControllerHandle, id: &str) -> Option<RolloutView> {
    let shared = controller.shared();
    let r = shared.state.read().ok()?.rollouts.get(id).cloned()?;
    Some(view_of(shared, &r))
}

fn view_of(shared: &Shared, r: &Rollout) -> RolloutView {
    let now = shared.clock.now();
    let st = shared.state.read().unwrap_or_else(|p| p.into_inner());
    let devices = shared.devices.read().unwrap_or_else(|p| p.into_inner());
    let version = st
        .releases
        .get(&r.release_id)
        .map(|x| x.release.version.to_string())
        .unwrap_or_default();
    let cur = match &r.state {
        RolloutState::Active { ring, step, stage } => shared
            .policy
            .ring_index(ring)
            .map(|i| (i, *step, stage.clone())),
        _ => None,
    };
    let rings = shared
        .policy
        .rings
        .iter()
        .enumerate()
        .map(|(i, rp)| {
            let standing = st.standing(r, &rp.name);
            let reached = r.rings_reached.contains(&rp.name);
            let (status, step) = match (&r.state, cur.as_ref()) {
                (_, Some((ci, cs, _))) if *ci == i => (r.state.phase().to_owned(), Some(*cs)),
                (_, Some((ci, _, _))) if *ci > i => ("done".to_owned(), None),
                (RolloutState::Completed, _) => ("done".to_owned(), None),
                (RolloutState::Halted { .. } | RolloutState::RolledBack { .. }, _) if reached => {
                    ("halted".to_owned(), None)
                }
                (RolloutState::Aborted, _) if reached => ("aborted".to_owned(), None),
                (RolloutState::Superseded { .. }, _) if reached => ("superseded".to_owned(), None),
                _ => ("not_started".to_owned(), None),
            };
            let percent =
                standing
                    .map(|d| d.percent)
                    .or(if reached { Some(Percent::FULL) } else { None });
            // An ended rollout shows its rings as they were when it ended.
            let tally = match r.final_tallies.get(&rp.name) {
                Some(t) => *t,
                None => engine::tally(
                    &devices,
                    r,
                    &rp.name,
                    percent.unwrap_or(Percent::ZERO),
                    now,
                    shared.policy.unresponsive_after.signed(),
                ),
            };
            let count = |phases: &[Phase]| -> u32 {
                let n = devices
                    .values()
                    .filter_map(|d| d.report_for(&r.release_name))
                    .filter(|x| {
                        x.ring == rp.name
                            && x.rollout_id.as_deref() == Some(r.id.as_str())
                            && phases.contains(&x.phase)
                    })
                    .count();
                u32::try_from(n).unwrap_or(u32::MAX)
            };
            let staged = count(&[Phase::Staged]);
            let before_launch = r.launch.as_ref().is_some_and(|l| l.held)
                || r.launch.is_some() && r.activate_at.is_some_and(|a| now < a);
            let ready_at_launch = (before_launch && standing.is_some())
                .then(|| count(&[Phase::Staged, Phase::Downloading, Phase::Verifying]));
            RingView {
                staged,
                ready_at_launch,
                name: rp.name.clone(),
                promotion: rp.promotion,
                steps: rp.steps.clone(),
                status,
                step,
                percent,
                tally,
                approval: r.approvals.get(&rp.name).cloned(),
                attempt: r.attempts.get(&rp.name).cloned(),
            }
        })
        .collect();
    let detail = match &r.state {
        RolloutState::Halted { reason } => Some(reason.clone()),
        RolloutState::RolledBack { reason, to } => Some(format!("{reason}; rolled back to {to}")),
        RolloutState::Superseded { by } => Some(format!("superseded by {by}")),
        RolloutState::Active {
            stage: Stage::ChecksFailed { detail, .. },
            ..
        } => Some(detail.clone()),
        RolloutState::Pending => r.start_at.map(|s| format!("starts at {s}")),
        _ => None,
    };
    RolloutView {
        id: r.id.clone(),
        release_id: r.release_id.clone(),
        version,
        phase: r.state.phase().into(),
        detail,
        paused: r.paused,
        ring: cur
            .and_then(|(i, _, _)| shared.policy.rings.get(i))
            .map(|r| r.name.clone()),
        created_at: r.created_at,
        start_at: r.start_at,
        activate_at: r.activate_at,
        ended_at: r.ended_at,
        rings,
        history: r.history.clone(),
        state: r.state.clone(),
        launch: r.launch.clone(),
    }
}

async fn list_releases(
    State(app): State<App>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<ReleaseView>>> {
    authorize(&app, &headers, ApiRole::Viewer, "list_releases", None)?;
    let st = app.shared.state.read().unwrap_or_else(|p| p.into_inner());
    Ok(Json(st.releases.values().map(ReleaseView::from).collect()))
}

/// Body of `POST /api/v1/releases`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The signed release envelope.
    pub envelope: Envelope,
    /// Scheduled start.
    #[serde(default)]
    pub start_at: Option<Timestamp>,
    /// Store-scheduled activation time: a launch (every ring pre-stages at the start).
    #[serde(default)]
    pub activate_at: Option<Timestamp>,
    /// With `activate_at`: `rings` (default: ring by ring after the launch) or `all`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<crate::model::LaunchMode>,
}

/// Answer of `POST /api/v1/releases`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitResponse {
    /// The release.
    pub release: ReleaseView,
    /// Its rollout.
    pub rollout: RolloutView,
    /// What the operator should know, e.g. a ring with fewer devices than its `min_reports`.
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// The largest `POST /api/v1/releases` body: an envelope at the agents' limit, JSON-escaped
/// inside the request, with room for the schedule fields. The envelope itself is then held to
/// the agents' own limit, measured on its bytes as sent.
pub const SUBMIT_BODY_LIMIT: usize = ringcast_proto::limits::MAX_ENVELOPE_BYTES * 2;

/// `SubmitRequest` as sent, with the envelope kept as its raw bytes so that its size is
/// measured exactly as an agent would measure it, before it is parsed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubmit<'a> {
    #[serde(borrow)]
    envelope: &'a serde_json::value::RawValue,
    #[serde(default)]
    start_at: Option<Timestamp>,
    #[serde(default)]
    activate_at: Option<Timestamp>,
    #[serde(default)]
    launch: Option<crate::model::LaunchMode>,
}

fn too_large(detail: String) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", detail)
}

async fn submit_release(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<SubmitResponse>> {
    let actor = authorize(&app, &headers, ApiRole::Operator, "release_submit", None)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(format!("submission over {SUBMIT_BODY_LIMIT} bytes"))
        } else {
            ApiError::new(e.status(), "malformed", format!("submission: {e}"))
        }
    })?;
    let malformed = |e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("submission: {e}"),
        )
    };
    let raw: RawSubmit<'_> = serde_json::from_slice(&body).map_err(|e| malformed(&e))?;
    // The rules an agent applies, in its order: the size of the envelope's bytes first.
    let envelope = Envelope::from_slice(raw.envelope.get().as_bytes()).map_err(|e| {
        if e.reason == ringcast_proto::Reason::TooLarge {
            too_large(e.detail.clone())
        } else {
            ApiError::from(Error::Rejected(e))
        }
    })?;
    let (rel, rollout, warnings) = app
        .engine
        .submit_with_warnings(
            Submit {
                envelope,
                start_at: raw.start_at,
                activate_at: raw.activate_at,
                launch: raw.launch,
            },
            actor,
        )
        .await?;
    Ok(Json(SubmitResponse {
        release: ReleaseView::from(&rel),
        rollout: rollout_view(&app, &rollout),
        warnings,
    }))
}

async fn unblock_release(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<ReleaseView>> {
    let actor = authorize(&app, &headers, ApiRole::Approver, "unblock", Some(&id))?;
    let r = app.engine.unblock(id, actor).await?;
    Ok(Json(ReleaseView::from(&r)))
}

/// Answer of `PUT /api/v1/artifacts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadResponse {
    /// Digest.
    pub sha256: String,
    /// Size.
    pub size: u64,
    /// Relative URL agents join to the controller's address.
    pub url: String,
}

/// Query of `PUT /api/v1/artifacts`: what the bytes must be, from the signed release.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// Declared SHA-256 (hex).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Declared size in bytes.
    #[serde(default)]
    pub size: Option<u64>,
}

/// After refusing an upload, how much of the rest of the body is still read and thrown away
/// (and for how long), after the answer is sent. Closing a socket with unread bytes makes the
/// kernel send a reset that can destroy the answer before the client reads it; a short,
/// bounded drain lets an ordinary client see the 413/422 and its reason.
const REFUSED_DRAIN_BYTES: u64 = 4 * 1024 * 1024;
const REFUSED_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// An upload that sends nothing for this long is refused (`upload_stalled`, 408).
const UPLOAD_STALL: std::time::Duration = std::time::Duration::from_secs(60);

async fn upload_artifact(
    State(app): State<App>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    body: axum::body::Body,
) -> Response {
    let mut stream = body.into_data_stream();
    let mut ended = false;
    match receive_upload(&app, &headers, &uri, &mut stream, &mut ended).await {
        Ok(up) => Json(up).into_response(),
        Err(e) => {
            let mut resp = e.into_response();
            if !ended {
                // Answer now; hyper keeps reading the body for as long as someone holds it,
                // so the drain runs alongside the answer, then the connection closes.
                tokio::spawn(drain_refused(stream));
                resp.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
            }
            resp
        }
    }
}

/// Read and discard what is left of a refused body, within `REFUSED_DRAIN_*`.
async fn drain_refused(mut stream: axum::body::BodyDataStream) {
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + REFUSED_DRAIN_TIME;
    let mut n = 0u64;
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, stream.next()).await {
        n += chunk.len() as u64;
        if n > REFUSED_DRAIN_BYTES {
            break;
        }
    }
}

async fn receive_upload(
    app: &App,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    stream: &mut axum::body::BodyDataStream,
    ended: &mut bool,
) -> ApiResult<UploadResponse> {
    let actor = authorize(app, headers, ApiRole::Operator, "artifact_upload", None)?;
    let q = Query::<UploadQuery>::try_from_uri(uri)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed", e.body_text()))?
        .0;
    let sha256 = q.sha256.map(|h| h.to_ascii_lowercase());
    if let Some(h) = sha256.as_deref().filter(|h| !is_sha256_hex(h)) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed",
            format!("sha256 {h:?} is not 64 hex characters"),
        ));
    }
    let declared = Declared {
        sha256,
        size: q.size,
    };
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut up = app
        .shared
        .artifacts
        .begin_upload(declared, app.shared.max_artifact_bytes, content_length)
        .await?;
    up.pump(stream, UPLOAD_STALL).await?;
    *ended = true;
    let stored = up.finish().await?;
    let _ = app.shared.audit.append(
        app.shared.clock.now(),
        Record {
            actor: actor.name,
            role: Some(actor.role),
            action: "artifact_upload".into(),
            outcome: "ok".into(),
            rollout_id: None,
            ring: None,
            detail: format!("sha256 {}, {} bytes", stored.sha256, stored.size),
        },
    );
    Ok(UploadResponse {
        url: crate::artifacts::url_path(&stored.sha256),
        sha256: stored.sha256,
        size: stored.size,
    })
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> ApiError {
        let status = match &e {
            UploadError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UploadError::SizeMismatch { .. } | UploadError::DigestMismatch { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            UploadError::Interrupted(_) => StatusCode::BAD_REQUEST,
            UploadError::Stalled { .. } => StatusCode::REQUEST_TIMEOUT,
            UploadError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if !matches!(e, UploadError::Interrupted(_)) {
            tracing::warn!(code = e.code(), error = %e, "artifact upload refused");
        }
        ApiError::new(status, e.code(), e.to_string())
    }
}

async fn list_rollouts(
    State(app): State<App>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<RolloutView>>> {
    authorize(&app, &headers, ApiRole::Viewer, "list_rollouts", None)?;
    let rollouts: Vec<Rollout> = {
        let st = app.shared.state.read().unwrap_or_else(|p| p.into_inner());
        st.rollouts.values().cloned().collect()
    };
    let mut v: Vec<RolloutView> = rollouts.iter().map(|r| rollout_view(&app, r)).collect();
    v.sort_by_key(|r| r.created_at);
    Ok(Json(v))
}

async fn show_rollout(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<RolloutView>> {
    authorize(&app, &headers, ApiRole::Viewer, "show_rollout", Some(&id))?;
    let r = app
        .shared
        .state
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .rollouts
        .get(&id)
        .cloned()
        .ok_or_else(|| Error::NotFound {
            what: "rollout",
            id: id.clone(),
        })?;
    Ok(Json(rollout_view(&app, &r)))
}

/// Optional body of rollout actions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActRequest {
    /// Ring to approve (default: the ring the rollout waits for).
    #[serde(default)]
    pub ring: Option<String>,
}

async fn act_rollout(
    State(app): State<App>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<RolloutView>> {
    let (act, need) = match action.as_str() {
        "approve" => (RolloutAction::Approve, ApiRole::Approver),
        "pause" => (RolloutAction::Pause, ApiRole::Operator),
        "resume" => (RolloutAction::Resume, ApiRole::Operator),
        "abort" => (RolloutAction::Abort, ApiRole::Operator),
        "retry" => (RolloutAction::Retry, ApiRole::Operator),
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no rollout action {other:?}"),
            ))
        }
    };
    let actor = authorize(&app, &headers, need, act.as_str(), Some(&id))?;
    let req: ActRequest = if body.is_empty() {
        ActRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed", e.to_string()))?
    };
    let r = app.engine.act(id, act, req.ring, actor).await?;
    Ok(Json(rollout_view(&app, &r)))
}

/// Body of `POST /api/v1/rollouts/{id}/launch`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchRequest {
    /// The new launch time; `null` holds the launch (nothing activates, staged bytes stay).
    pub at: Option<Timestamp>,
}

async fn launch_rollout(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<RolloutView>> {
    let actor = authorize(&app, &headers, ApiRole::Operator, "launch", Some(&id))?;
    let req: LaunchRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed", e.to_string()))?;
    let r = app.engine.launch(id, req.at, actor).await?;
    Ok(Json(rollout_view(&app, &r)))
}

/// Filters of `GET /api/v1/devices`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DeviceFilter {
    /// Ring.
    pub ring: Option<String>,
    /// Phase (`committed`, `reverted`, …, or `unresponsive`).
    pub phase: Option<String>,
    /// Rollout id.
    pub rollout: Option<String>,
}

/// A device as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceView {
    /// Id.
    pub id: String,
    /// Ring.
    pub ring: Option<String>,
    /// Device class.
    pub device_class: Option<String>,
    /// Phase.
    pub phase: Option<String>,
    /// Running version.
    pub current: Option<String>,
    /// Rollout of the phase.
    pub rollout_id: Option<String>,
    /// Last error code.
    pub last_error: Option<String>,
    /// Last seen (controller time).
    pub last_seen: Timestamp,
    /// Silent past the timeout.
    pub unresponsive: bool,
    /// Online flag.
    pub online: Option<bool>,
    /// When it is predicted to commit the newest live rollout it can take
    /// ([`engine::forecast`]).
    pub prediction: Option<engine::forecast::Prediction>,
    /// The pin standing on the device, if any (for a device running several products, see
    /// `products`).
    #[serde(default)]
    pub pin: Option<PinView>,
    /// A device running several products: each one's state, prediction and pin, by product
    /// name. Absent for a device without products, whose fields above say it all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub products: Vec<ProductView>,
    /// The device's recent events, newest first, as kept in its bounded history: a
    /// `reverted` one carries its `reason`, `check` and `output` tail. Only in
    /// `GET /api/v1/devices/{id}`; the list leaves it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<EventEntry>>,
    /// Full record.
    pub record: DeviceRecord,
}

/// One product of a device that runs several, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProductView {
    /// Product (release name).
    pub product: String,
    /// Its phase.
    pub phase: String,
    /// Its running version.
    pub current: Option<String>,
    /// Rollout of the phase.
    pub rollout_id: Option<String>,
    /// Last error code.
    pub last_error: Option<String>,
    /// When it is predicted to commit the product's newest live rollout, or what it waits
    /// for.
    pub prediction: Option<engine::forecast::Prediction>,
    /// The pin standing for this product, if any.
    #[serde(default)]
    pub pin: Option<PinView>,
}

impl ProductView {
    /// Whether this product's state matches a `GET /api/v1/devices` filter.
    fn matches(&self, rollout: Option<&String>, phase: Option<&String>) -> bool {
        rollout.is_none_or(|r| self.rollout_id.as_ref() == Some(r))
            && phase.is_none_or(|p| &self.phase == p)
    }
}

fn device_view(
    app: &App,
    d: &DeviceRecord,
    forecast: &engine::forecast::Forecast,
    now: Timestamp,
) -> DeviceView {
    let r = d.report.as_ref();
    let st = app.shared.state.read().unwrap_or_else(|p| p.into_inner());
    let products: Vec<ProductView> = r
        .map(|r| &r.products)
        .into_iter()
        .flatten()
        .map(|(name, p)| ProductView {
            product: name.clone(),
            phase: p.phase.as_str().to_owned(),
            current: p
                .current
                .as_ref()
                .map(|c| format!("{} {}", c.name, c.version)),
            rollout_id: p.rollout_id.clone(),
            last_error: p.last_error.as_ref().map(|e| e.reason.clone()),
            prediction: forecast.device_product(&d.id, name).cloned(),
            pin: st.pin_of(&d.id, name).and_then(PinView::standing),
        })
        .collect();
    // An agent without products follows its single-product pin, whatever the release.
    let pin = if products.is_empty() {
        st.pins.get(&d.id).and_then(PinView::standing)
    } else {
        None
    };
    DeviceView {
        id: d.id.clone(),
        ring: r.map(|r| r.ring.clone()),
        device_class: r.map(|r| r.device_class.clone()),
        phase: r.map(|r| r.phase.as_str().to_owned()),
        current: r
            .and_then(|r| r.current.as_ref())
            .map(|c| format!("{} {}", c.name, c.version)),
        rollout_id: r.and_then(|r| r.rollout_id.clone()),
        last_error: r
            .and_then(|r| r.last_error.as_ref())
            .map(|e| e.reason.clone()),
        last_seen: d.last_seen,
        unresponsive: now.duration_since(d.last_seen)
            > app.shared.policy.unresponsive_after.signed(),
        online: d.online,
        prediction: forecast.device(&d.id).cloned(),
        pin,
        products,
        events: None,
        record: d.clone(),
    }
}

async fn list_devices(
    State(app): State<App>,
    headers: HeaderMap,
    Query(f): Query<DeviceFilter>,
) -> ApiResult<Json<Vec<DeviceView>>> {
    authorize(&app, &headers, ApiRole::Viewer, "list_devices", None)?;
    let devices: Vec<DeviceRecord> = app
        .shared
        .devices
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    let now = app.shared.clock.now();
    let fc = app.shared.forecast();
    let mut out: Vec<DeviceView> = devices
        .iter()
        .map(|d| device_view(&app, d, &fc, now))
        .filter(|v| f.ring.as_ref().is_none_or(|r| v.ring.as_ref() == Some(r)))
        .filter(|v| {
            if f.phase.as_deref() == Some("unresponsive") {
                return v.unresponsive
                    && f.rollout.as_ref().is_none_or(|r| {
                        v.rollout_id.as_ref() == Some(r)
                            || v.products.iter().any(|p| p.matches(Some(r), None))
                    });
            }
            // A device running several products matches when one of them does.
            if !v.products.is_empty() {
                return v
                    .products
                    .iter()
                    .any(|p| p.matches(f.rollout.as_ref(), f.phase.as_ref()));
            }
            f.rollout
                .as_ref()
                .is_none_or(|r| v.rollout_id.as_ref() == Some(r))
                && f.phase.as_ref().is_none_or(|p| v.phase.as_ref() == Some(p))
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(out))
}

async fn show_device(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<DeviceView>> {
    authorize(&app, &headers, ApiRole::Viewer, "show_device", None)?;
    let d = app
        .shared
        .devices
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&id)
        .cloned()
        .ok_or_else(|| Error::NotFound {
            what: "device",
            id: id.clone(),
        })?;
    let now = app.shared.clock.now();
    let mut v = device_view(&app, &d, &app.shared.forecast(), now);
    // Whatever the history keeps (it is bounded when written).
    v.events = Some(app.shared.store.device_events(&id, usize::MAX)?);
    Ok(Json(v))
}

/// A device's pin as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinView {
    /// Device id.
    pub device: String,
    /// The product (release name) of the device topic it stands on; absent on the
    /// single-product topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    /// Release the device is pinned to (`None` once the pin ended).
    pub release_id: Option<String>,
    /// Rollout id of the per-device directive.
    pub rollout_id: String,
    /// The device's ring when pinned.
    pub ring: String,
    /// Who set (or ended) it.
    pub by: String,
    /// When.
    pub at: Timestamp,
    /// Sequence last signed on the device's directive topic.
    pub sequence: u64,
    /// When the current signature expires (re-signed before).
    pub expires_at: Timestamp,
    /// Why it ended, once it has.
    pub ended: Option<String>,
}

impl From<&DevicePin> for PinView {
    fn from(p: &DevicePin) -> PinView {
        PinView {
            device: p.directive.device.clone().unwrap_or_default(),
            product: p.directive.product.clone(),
            release_id: p.pinned_release().map(str::to_owned),
            rollout_id: p.directive.rollout_id.clone(),
            ring: p.directive.ring.clone(),
            by: p.by.clone(),
            at: p.at,
            sequence: p.directive.sequence,
            expires_at: p.directive.expires_at,
            ended: p.ended.clone(),
        }
    }
}

impl PinView {
    /// The view of a pin that still stands (an ended one is history, not state).
    fn standing(p: &DevicePin) -> Option<PinView> {
        p.pinned_release().is_some().then(|| PinView::from(p))
    }
}

/// Body of `POST /api/v1/devices/{id}/pin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    /// Release id (`{name}-{sequence}`).
    pub release_id: String,
}

async fn pin_device(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<PinView>> {
    // Pinning puts software on a device outside the rings' gates: as strong as an approval.
    let subject = format!("device {id}");
    let actor = authorize_on(
        &app,
        &headers,
        ApiRole::Approver,
        "pin",
        None,
        Some(&subject),
    )?;
    let req: PinRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed", e.to_string()))?;
    let p = app.engine.pin(id, req.release_id, actor).await?;
    Ok(Json(PinView::from(&p)))
}

/// Query of `DELETE /api/v1/devices/{id}/pin`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnpinQuery {
    /// The product whose pin ends (default: the device's only standing pin).
    #[serde(default)]
    pub product: Option<String>,
}

async fn unpin_device(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<UnpinQuery>,
) -> ApiResult<Json<PinView>> {
    let subject = format!("device {id}");
    let actor = authorize_on(
        &app,
        &headers,
        ApiRole::Approver,
        "unpin",
        None,
        Some(&subject),
    )?;
    let p = app.engine.unpin_product(id, q.product, actor).await?;
    Ok(Json(PinView::from(&p)))
}

async fn audit_log(
    State(app): State<App>,
    headers: HeaderMap,
) -> ApiResult<Json<crate::audit::RawLog>> {
    authorize(&app, &headers, ApiRole::Viewer, "audit_read", None)?;
    Ok(Json(app.shared.audit.export()?))
}

async fn insight(
    State(app): State<App>,
    headers: HeaderMap,
) -> ApiResult<Json<engine::insight::Summary>> {
    authorize(&app, &headers, ApiRole::Viewer, "insight", None)?;
    let now = app.shared.clock.now();
    let summary = {
        let st = app.shared.state.read().unwrap_or_else(|p| p.into_inner());
        engine::insight::summary(&st, now)
    };
    Ok(Json(engine::insight::Summary {
        forecasts: app.shared.forecast().rollouts,
        ..summary
    }))
}

/// Read buffer of an artifact download: memory per download is this, whatever the size.
const DOWNLOAD_CHUNK: usize = 64 * 1024;

/// `GET /artifacts/sha256/{hex}` (and HEAD, which axum routes here and answers without the
/// body): the file streamed from disk, whole or one `Range`.
async fn artifact(State(app): State<App>, headers: HeaderMap, Path(hex): Path<String>) -> Response {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Some(path) = app.shared.artifacts.path(&hex) else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "not a sha256").into_response();
    };
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let opened = async {
        let mut f = tokio::fs::File::open(&path).await?;
        // Length from the open handle: an artifact is renamed into place whole and never
        // rewritten, so it cannot change under the reader.
        let len = f.metadata().await?.len();
        let req = parse_range(range, len);
        if let RangeReq::Part(start, _) = req {
            f.seek(std::io::SeekFrom::Start(start)).await?;
        }
        Ok::<_, std::io::Error>((f, len, req))
    }
    .await;
    let (f, len, req) = match opened {
        Ok(v) => v,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such artifact")
                .into_response()
        }
        Err(e) => {
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string())
                .into_response()
        }
    };
    let (status, start, n) = match req {
        RangeReq::Unsatisfiable => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [
                    (header::CONTENT_RANGE, format!("bytes */{len}")),
                    (header::ACCEPT_RANGES, "bytes".to_owned()),
                ],
            )
                .into_response()
        }
        RangeReq::Full => (StatusCode::OK, 0, len),
        RangeReq::Part(s, e) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
    };
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        f.take(n),
        DOWNLOAD_CHUNK,
    ));
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    // A streamed body has no size of its own; say it, so clients see progress and a short
    // read is detectable (hyper also refuses to send more or fewer bytes than this).
    h.insert(header::CONTENT_LENGTH, header::HeaderValue::from(n));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) =
            header::HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + n - 1))
        {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    resp
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', " ")
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    let s = &app.shared;
    let c = &s.counters;
    let mut out = String::new();
    let settled = *s.settled.borrow();
    if settled > Timestamp::MIN {
        let _ = writeln!(out, "# HELP ringcast_engine_settled_seconds Controller-clock time (unix seconds) of the last engine tick decided and carried out in full.\n# TYPE ringcast_engine_settled_seconds gauge");
        let _ = writeln!(
            out,
            "ringcast_engine_settled_seconds {:.3}",
            settled.as_millisecond() as f64 / 1000.0
        );
    }
    let _ = writeln!(out, "# HELP ringcast_reports_total State reports ingested.\n# TYPE ringcast_reports_total counter");
    let _ = writeln!(
        out,
        "ringcast_reports_total {}",
        c.reports.load(Ordering::Relaxed)
    );
    let _ = writeln!(out, "# HELP ringcast_events_total Device events ingested (deduplicated).\n# TYPE ringcast_events_total counter");
    let _ = writeln!(
        out,
        "ringcast_events_total {}",
        c.events.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE ringcast_duplicate_events_total counter\nringcast_duplicate_events_total {}",
        c.duplicate_events.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE ringcast_rejected_messages_total counter\nringcast_rejected_messages_total {}",
        c.rejected.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE ringcast_api_auth_denied_total counter\nringcast_api_auth_denied_total {}",
        c.auth_denied.load(Ordering::Relaxed)
    );
    for (name, kind, help, v) in [
        (
            "ringcast_reports_stale_total",
            "counter",
            "State reports ignored because a newer one (higher seq) was already held.",
            &c.stale_reports,
        ),
        (
            "ringcast_messages_too_large_total",
            "counter",
            "Messages refused for their size (too_large).",
            &c.too_large,
        ),
        (
            "ringcast_rereads_total",
            "counter",
            "Complete re-reads of the fleet's retained reports (every connect, and after broker drops).",
            &c.rereads,
        ),
        (
            "ringcast_reread_paged_devices_total",
            "counter",
            "Devices a re-read recovered by exact-topic paging because the broker dropped their retained report.",
            &c.reread_paged,
        ),
        (
            "ringcast_reread_fence_lost_total",
            "counter",
            "Re-reads whose fence never came back (the broker dropped messages).",
            &c.reread_fence_lost,
        ),
        (
            "ringcast_reread_unretained_devices",
            "gauge",
            "Known devices with no retained report on the broker at the last re-read.",
            &c.reread_unretained,
        ),
        (
            "ringcast_broker_dropped_messages",
            "gauge",
            "The broker's own count of dropped messages ($SYS/broker/publish/messages/dropped), where it publishes one.",
            &c.broker_dropped,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let ndev = s.devices.read().unwrap_or_else(|p| p.into_inner()).len();
    let _ = writeln!(
        out,
        "# TYPE ringcast_devices gauge\nringcast_devices {ndev}"
    );
    let rollouts: Vec<Rollout> = s
        .state
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .rollouts
        .values()
        .cloned()
        .collect();
    let _ = writeln!(out, "# HELP ringcast_rollout_phase 1 for the rollout's current phase.\n# TYPE ringcast_rollout_phase gauge");
    let mut ring_lines = Vec::new();
    for r in &rollouts {
        let _ = writeln!(
            out,
            "ringcast_rollout_phase{{rollout=\"{}\",phase=\"{}\"}} 1",
            esc(&r.id),
            r.state.phase()
        );
        if r.state.is_live() {
            let v = rollout_view(&app, r);
            for ring in v.rings {
                let t = ring.tally;
                for (k, n) in [
                    ("committed", t.committed),
                    ("failed", t.failed),
                    ("pending", t.pending),
                    ("unresponsive", t.unresponsive),
                    ("refused", t.refused),
                    ("retrying", t.retrying),
                    ("deferred", t.deferred),
                    ("in_ramp", t.in_ramp),
                ] {
                    ring_lines.push(format!(
                        "ringcast_ring_devices{{rollout=\"{}\",ring=\"{}\",outcome=\"{k}\"}} {n}",
                        esc(&r.id),
                        esc(&ring.name)
                    ));
                }
            }
        }
    }
    let _ = writeln!(out, "# HELP ringcast_ring_devices Devices per live rollout, ring and outcome.\n# TYPE ringcast_ring_devices gauge");
    for l in ring_lines {
        let _ = writeln!(out, "{l}");
    }
    crate::webhook::render_metrics(&mut out, s.audit.head_seq(), &s.webhooks);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// `GET /`: the dashboard, with a Content-Security-Policy that lets only its own script and
/// style run (a fresh nonce per answer) and the page talk only to this origin: even markup
/// that reached the page could not run script or load anything.
async fn dashboard() -> Response {
    let mut nonce = [0u8; 16];
    if getrandom::getrandom(&mut nonce).is_err() {
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no randomness for the page's nonce",
        )
        .into_response();
    }
    let nonce = hex::encode(nonce);
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    );
    let mut resp = Html(DASHBOARD.replace("{nonce}", &nonce)).into_response();
    let h = resp.headers_mut();
    for (k, v) in [
        (header::CONTENT_SECURITY_POLICY, csp.as_str()),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        if let Ok(v) = header::HeaderValue::from_str(v) {
            h.insert(k, v);
        }
    }
    resp
}

/// The dashboard: rollouts with their rings, and a device lookup showing its recent events
/// and a revert's evidence. Every value from the API is inserted as text (`textContent` on
/// nodes it creates), never parsed as HTML: check output, errors, ids and details are
/// whatever devices and operators sent (ACCEPTANCE.md 30). A stopgap until the console.
const DASHBOARD: &str = r##"<!doctype html>
<html><head><meta charset="utf-8"><title>Ringcast</title>
<style nonce="{nonce}">body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}
td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}.bar{display:inline-block;width:12em;height:.8em;background:#eee}
.bar>span{display:block;height:100%;background:#3a7}.bad{color:#b22}pre{margin:.2em 0;white-space:pre-wrap;max-width:50em}</style></head>
<body><h1>Ringcast</h1>
<p><label>Token: <input id="t" type="password" size="40" autocomplete="off"></label> <button id="use">use</button></p>
<p><label>Device: <input id="dev" size="30"></label> <button id="look">look up</button></p>
<div id="device"></div>
<div id="out">Enter a viewer token.</div>
<script nonce="{nonce}">
'use strict';
// The token lives for this tab only; the old dashboard kept it in localStorage for ever.
let token = sessionStorage.getItem('rc') || '';
localStorage.removeItem('rc');
const $ = id => document.getElementById(id);
// The one way values reach the page: as the text of a new node.
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function row(cells, tag) {
  const tr = el('tr');
  for (const c of cells) {
    if (c instanceof Node) { const td = el(tag || 'td'); td.append(c); tr.append(td); }
    else tr.append(el(tag || 'td', c));
  }
  return tr;
}
function show(id, nodes) { $(id).replaceChildren(...nodes); }
async function api(path) {
  const r = await fetch(path, {headers: {Authorization: 'Bearer ' + token}});
  if (!r.ok) throw new Error('HTTP ' + r.status);
  return r.json();
}
function progress(p) {
  const wrap = el('span'), outer = el('span', null, 'bar'), inner = el('span');
  inner.style.width = p + '%';
  outer.append(inner);
  wrap.append(outer, ' ' + p + '%');
  return wrap;
}
async function load() {
  if (!token) return;
  let rs;
  try { rs = await api('/api/v1/rollouts'); } catch (e) { show('out', [el('p', e.message, 'bad')]); return; }
  const nodes = [];
  for (const x of rs.reverse()) {
    nodes.push(el('h3', x.id + ' — ' + x.phase + (x.paused ? ' (paused)' : '')));
    if (x.detail) nodes.push(el('p', x.detail, 'bad'));
    const t = el('table');
    t.append(row(['ring', 'status', 'progress', 'committed', 'failed', 'pending', 'deferred', 'unresponsive'], 'th'));
    for (const g of x.rings) {
      const n = Math.max(g.tally.in_ramp, g.tally.reported, 1);
      const p = Math.round(100 * g.tally.committed / n);
      t.append(row([g.name, g.status, progress(p), g.tally.committed, g.tally.failed, g.tally.pending, g.tally.deferred || 0, g.tally.unresponsive]));
    }
    nodes.push(t);
  }
  show('out', nodes.length ? nodes : [el('p', 'No rollouts.')]);
}
// A device's recent events, newest first, with a revert's reason, check and output.
async function lookup() {
  const id = $('dev').value.trim();
  if (!id || !token) return;
  let d;
  try { d = await api('/api/v1/devices/' + encodeURIComponent(id)); }
  catch (e) { show('device', [el('p', id + ': ' + e.message, 'bad')]); return; }
  const nodes = [el('h3', d.id + ' — ' + (d.phase || '-') + ' on ' + (d.current || '-') + (d.unresponsive ? ' (silent)' : ''))];
  for (const p of d.products || []) nodes.push(el('p', p.product + ': ' + p.phase + ' on ' + (p.current || '-') + (p.rollout_id ? ' (' + p.rollout_id + ')' : '')));
  const err = d.record && d.record.report && d.record.report.last_error;
  if (err) nodes.push(el('p', 'last error ' + err.reason + ': ' + err.detail, 'bad'));
  const t = el('table');
  t.append(row(['#', 'at', 'event', 'rollout', 'evidence'], 'th'));
  for (const e of d.events || []) {
    const ev = el('div');
    for (const k of ['reason', 'check', 'detail']) if (e[k] !== undefined && e[k] !== null) ev.append(el('div', k + ': ' + e[k]));
    if (e.output !== undefined && e.output !== null) ev.append(el('pre', e.output));
    t.append(row([e.seq, e.at, e.event, e.rollout_id || '', ev]));
  }
  nodes.push((d.events || []).length ? t : el('p', 'No events kept.'));
  show('device', nodes);
}
$('use').addEventListener('click', () => { token = $('t').value; sessionStorage.setItem('rc', token); load(); });
$('look').addEventListener('click', lookup);
$('dev').addEventListener('keydown', e => { if (e.key === 'Enter') lookup(); });
load(); setInterval(load, 2000);
</script></body></html>"##;
