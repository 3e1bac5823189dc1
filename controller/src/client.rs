//! The HTTP client the command line uses (`ringcast release submit`, `rollout …`,
//! `devices …`, `audit verify`).

use crate::api::{
    DeviceView, ErrorBody, PinRequest, PinView, ReleaseView, RolloutView, SubmitRequest,
    SubmitResponse, UploadResponse,
};
use crate::audit::RawLog;
use serde::de::DeserializeOwned;

/// Client errors, with the server's stable code when it sent one.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Transport failure.
    #[error("cannot reach {url}: {detail}")]
    Unreachable {
        /// URL.
        url: String,
        /// Cause.
        detail: String,
    },
    /// A local file could not be read.
    #[error("{}: {detail}", path.display())]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        detail: String,
    },
    /// The server refused.
    #[error("{code}: {detail} (HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable code.
        code: String,
        /// Detail.
        detail: String,
    },
}

/// Read size of a streamed upload.
const UPLOAD_CHUNK: usize = 64 * 1024;

/// A controller API client.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:8480`).
    pub fn new(base: &str, token: Option<String>) -> Client {
        Client {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: reqwest::Client::new(),
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    async fn send<T: DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = rb.send().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            detail: e.to_string(),
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            detail: e.to_string(),
        })?;
        if !status.is_success() {
            let (code, detail) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => (b.error, b.detail),
                Err(_) => (
                    "http_error".into(),
                    String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                ),
            };
            return Err(ClientError::Api {
                status: status.as_u16(),
                code,
                detail,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Api {
            status: status.as_u16(),
            code: "bad_response".into(),
            detail: e.to_string(),
        })
    }

    /// Upload an artifact held in memory (small ones: tests, the demo).
    pub async fn upload_artifact(&self, bytes: Vec<u8>) -> Result<UploadResponse, ClientError> {
        self.send(
            self.req(reqwest::Method::PUT, "/api/v1/artifacts")
                .body(bytes),
        )
        .await
    }

    /// Upload an artifact file, streamed from disk in constant memory. With `declared`
    /// (sha256 hex, size), normally the signed release's `artifact`, the controller refuses
    /// bytes that do not match (`too_large`, `size_mismatch`, `digest_mismatch`) and stores
    /// nothing.
    pub async fn upload_artifact_file(
        &self,
        path: &std::path::Path,
        declared: Option<(&str, u64)>,
    ) -> Result<UploadResponse, ClientError> {
        let local = |e: std::io::Error| ClientError::File {
            path: path.to_path_buf(),
            detail: e.to_string(),
        };
        let file = tokio::fs::File::open(path).await.map_err(local)?;
        let len = file.metadata().await.map_err(local)?.len();
        // A wrong-sized file would be refused after its first bytes, and the controller stops
        // reading a refused body after a few MiB, which can turn its answer into a reset: say
        // it here instead, before sending anything.
        if let Some((_, size)) = declared.filter(|&(_, size)| size != len) {
            return Err(ClientError::File {
                path: path.to_path_buf(),
                detail: format!(
                    "size_mismatch: the file has {len} bytes, the release declares {size}"
                ),
            });
        }
        let mut rb = self.req(reqwest::Method::PUT, "/api/v1/artifacts");
        if let Some((sha256, size)) = declared {
            rb = rb.query(&[("sha256", sha256.to_owned()), ("size", size.to_string())]);
        }
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
            file,
            UPLOAD_CHUNK,
        ));
        // The length lets the controller refuse a wrong-sized file before reading it.
        self.send(rb.header(reqwest::header::CONTENT_LENGTH, len).body(body))
            .await
    }

    /// Submit a release.
    pub async fn submit(&self, req: &SubmitRequest) -> Result<SubmitResponse, ClientError> {
        self.send(
            self.req(reqwest::Method::POST, "/api/v1/releases")
                .json(req),
        )
        .await
    }

    /// List releases.
    pub async fn releases(&self) -> Result<Vec<ReleaseView>, ClientError> {
        self.send(self.req(reqwest::Method::GET, "/api/v1/releases"))
            .await
    }

    /// List rollouts.
    pub async fn rollouts(&self) -> Result<Vec<RolloutView>, ClientError> {
        self.send(self.req(reqwest::Method::GET, "/api/v1/rollouts"))
            .await
    }

    /// Show one rollout.
    pub async fn rollout(&self, id: &str) -> Result<RolloutView, ClientError> {
        self.send(self.req(reqwest::Method::GET, &format!("/api/v1/rollouts/{id}")))
            .await
    }

    /// approve / pause / resume / abort.
    pub async fn act(
        &self,
        id: &str,
        action: &str,
        ring: Option<&str>,
    ) -> Result<RolloutView, ClientError> {
        let body = serde_json::json!({ "ring": ring });
        self.send(
            self.req(
                reqwest::Method::POST,
                &format!("/api/v1/rollouts/{id}/{action}"),
            )
            .json(&body),
        )
        .await
    }

    /// Move a launch to `at`, or hold it (`None`).
    pub async fn launch(
        &self,
        id: &str,
        at: Option<jiff::Timestamp>,
    ) -> Result<RolloutView, ClientError> {
        let body = crate::api::LaunchRequest { at };
        self.send(
            self.req(
                reqwest::Method::POST,
                &format!("/api/v1/rollouts/{id}/launch"),
            )
            .json(&body),
        )
        .await
    }

    /// List devices with filters.
    pub async fn devices(
        &self,
        ring: Option<&str>,
        phase: Option<&str>,
        rollout: Option<&str>,
    ) -> Result<Vec<DeviceView>, ClientError> {
        let mut q = Vec::new();
        for (k, v) in [("ring", ring), ("phase", phase), ("rollout", rollout)] {
            if let Some(v) = v {
                q.push((k, v));
            }
        }
        self.send(self.req(reqwest::Method::GET, "/api/v1/devices").query(&q))
            .await
    }

    /// Show one device.
    pub async fn device(&self, id: &str) -> Result<DeviceView, ClientError> {
        self.send(self.req(reqwest::Method::GET, &format!("/api/v1/devices/{id}")))
            .await
    }

    /// Pin a device to a release.
    pub async fn pin(&self, device: &str, release_id: &str) -> Result<PinView, ClientError> {
        let body = PinRequest {
            release_id: release_id.into(),
        };
        self.send(
            self.req(
                reqwest::Method::POST,
                &format!("/api/v1/devices/{device}/pin"),
            )
            .json(&body),
        )
        .await
    }

    /// End a device's pin.
    pub async fn unpin(&self, device: &str) -> Result<PinView, ClientError> {
        self.unpin_product(device, None).await
    }

    /// End a device's pin for `product` (`None`: its only standing pin).
    pub async fn unpin_product(
        &self,
        device: &str,
        product: Option<&str>,
    ) -> Result<PinView, ClientError> {
        let mut req = self.req(
            reqwest::Method::DELETE,
            &format!("/api/v1/devices/{device}/pin"),
        );
        if let Some(p) = product {
            req = req.query(&[("product", p)]);
        }
        self.send(req).await
    }

    /// Delivery insight.
    pub async fn insight(&self) -> Result<crate::engine::insight::Summary, ClientError> {
        self.send(self.req(reqwest::Method::GET, "/api/v1/insight"))
            .await
    }

    /// The raw audit log.
    pub async fn audit(&self) -> Result<RawLog, ClientError> {
        self.send(self.req(reqwest::Method::GET, "/api/v1/audit"))
            .await
    }
}
