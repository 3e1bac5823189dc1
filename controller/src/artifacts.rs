//! The content-addressed artifact store: `{data_dir}/artifacts/sha256/{hex}`, written
//! crash-safe, served at `/artifacts/sha256/{hex}` with HTTP Range support.
//!
//! Uploads stream: bytes go to a temp file in the store's own directory while they are hashed
//! and counted, so memory per upload is one chunk whatever the artifact's size. Only a
//! complete upload that matches what the uploader declared is fsynced and renamed into place
//! (then the directory is fsynced); anything else removes its temp file and changes nothing.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Artifacts by SHA-256.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
}

/// Whether `s` is 64 lowercase hex characters.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Where the controller serves the artifact with this SHA-256, relative to its HTTP address:
/// `/artifacts/sha256/{hex}` (agents join it to their `artifact_base_url`).
pub fn url_path(sha256: &str) -> String {
    format!("/artifacts/sha256/{sha256}")
}

/// Prefix and suffix of upload temp files. They start with a dot so they can never be taken
/// for a 64-hex artifact name.
const TMP_PREFIX: &str = ".upload-";
const TMP_SUFFIX: &str = ".tmp";

impl ArtifactStore {
    /// Open (creating) under `data_dir`, removing temp files a crash left behind.
    ///
    /// The controller opens the store once, after it holds the sled lock on the same
    /// `data_dir`, so no other process can be uploading into these temp files.
    pub fn open(data_dir: &Path) -> Result<ArtifactStore> {
        let dir = data_dir.join("artifacts").join("sha256");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // Both our upload temps and `ringcast_io::fs::write_atomic`'s are `.{…}.tmp`.
            if name.starts_with('.') && name.ends_with(TMP_SUFFIX) {
                let p = entry.path();
                match std::fs::remove_file(&p) {
                    Ok(()) => tracing::info!(path = %p.display(), "removed stale upload temp file"),
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "cannot remove stale temp file")
                    }
                }
            }
        }
        Ok(ArtifactStore { dir })
    }

    /// The store's directory (`{data_dir}/artifacts/sha256`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of an artifact (the hex must be checked first).
    pub fn path(&self, hex: &str) -> Option<PathBuf> {
        is_sha256_hex(hex).then(|| self.dir.join(hex))
    }

    /// Whether an artifact with this digest and size is stored.
    pub fn has(&self, hex: &str, size: u64) -> bool {
        self.path(hex)
            .and_then(|p| std::fs::metadata(p).ok())
            .is_some_and(|m| m.len() == size)
    }

    /// Store bytes already in memory; returns their digest. Idempotent.
    pub fn put(&self, bytes: &[u8]) -> Result<String> {
        let hex = ringcast_proto::digest::sha256_hex(bytes);
        let path = self.dir.join(&hex);
        if !self.has(&hex, bytes.len() as u64) {
            ringcast_io::fs::write_atomic(&path, bytes)?;
        }
        Ok(hex)
    }

    /// Start a streamed upload into a temp file in the store's directory.
    ///
    /// `max` is the server's cap; `content_length`, when the request has one, lets an
    /// oversized or short upload be refused before a single byte is read.
    pub async fn begin_upload(
        &self,
        declared: Declared,
        max: u64,
        content_length: Option<u64>,
    ) -> Result<Upload, UploadError> {
        let (limit, limit_is_declared) = match declared.size {
            Some(s) if s <= max => (s, true),
            Some(s) => {
                return Err(UploadError::TooLarge {
                    limit: max,
                    detail: format!("declared size {s} is over server.max_artifact_bytes"),
                })
            }
            None => (max, false),
        };
        if let Some(n) = content_length {
            if n > limit {
                return Err(over_limit(limit, limit_is_declared));
            }
            if let Some(want) = declared.size.filter(|&want| n < want) {
                return Err(UploadError::SizeMismatch { got: n, want });
            }
        }
        let mut rnd = [0u8; 8];
        getrandom::getrandom(&mut rnd)
            .map_err(|e| Error::io(&self.dir, std::io::Error::other(e)))?;
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{}{TMP_SUFFIX}", hex::encode(rnd)));
        // `create_new`: a name clash is a bug or an attack, never something to overwrite.
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await
            .map_err(|e| Error::io(&tmp, e))?;
        Ok(Upload {
            store: self.clone(),
            guard: TempGuard(Some(tmp)),
            file,
            hasher: Sha256::new(),
            seen: 0,
            limit,
            limit_is_declared,
            declared,
        })
    }
}

/// What the uploader says the bytes are, normally copied from the signed release's
/// `artifact` (`ringcast release submit` sends both). Either may be absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    /// Lowercase hex SHA-256 the bytes must hash to.
    pub sha256: Option<String>,
    /// Exact size in bytes.
    pub size: Option<u64>,
}

/// Why a streamed upload was refused; nothing is left in the store when it is.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// More bytes than declared, or than `server.max_artifact_bytes`.
    #[error("artifact is larger than {limit} bytes: {detail}")]
    TooLarge {
        /// The limit that was passed.
        limit: u64,
        /// Which limit.
        detail: String,
    },
    /// The body ended before the declared size.
    #[error("artifact ended after {got} of its declared {want} bytes")]
    SizeMismatch {
        /// Bytes received (or announced by Content-Length).
        got: u64,
        /// Declared size.
        want: u64,
    },
    /// The bytes hash to something other than declared.
    #[error("artifact sha256 is {got}, declared {want}")]
    DigestMismatch {
        /// Digest of the bytes received.
        got: String,
        /// Declared digest.
        want: String,
    },
    /// The request body broke off (client gone, connection reset).
    #[error("upload interrupted: {0}")]
    Interrupted(String),
    /// No byte arrived for too long.
    #[error("upload stalled: nothing received for {secs} s after {seen} bytes")]
    Stalled {
        /// The stall timeout, in seconds.
        secs: f64,
        /// Bytes received before the stall.
        seen: u64,
    },
    /// The store could not write.
    #[error(transparent)]
    Store(#[from] Error),
}

impl UploadError {
    /// The stable `snake_case` code.
    pub fn code(&self) -> &'static str {
        match self {
            UploadError::TooLarge { .. } => "too_large",
            UploadError::SizeMismatch { .. } => "size_mismatch",
            UploadError::DigestMismatch { .. } => "digest_mismatch",
            UploadError::Interrupted(_) => "upload_interrupted",
            UploadError::Stalled { .. } => "upload_stalled",
            UploadError::Store(e) => e.code(),
        }
    }
}

fn over_limit(limit: u64, declared: bool) -> UploadError {
    UploadError::TooLarge {
        limit,
        detail: if declared {
            "more bytes than the declared size".into()
        } else {
            "more bytes than server.max_artifact_bytes".into()
        },
    }
}

/// Removes the temp file unless disarmed: a refused, failed or abandoned upload (the handler's
/// future dropped when the client goes away) leaves nothing behind.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove upload temp file");
                }
            }
        }
    }
}

/// A stored artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Lowercase hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether this upload wrote it (false: it was already there).
    pub created: bool,
}

/// An upload in progress: a temp file being written, hashed and counted.
pub struct Upload {
    store: ArtifactStore,
    guard: TempGuard,
    file: tokio::fs::File,
    hasher: Sha256,
    seen: u64,
    limit: u64,
    limit_is_declared: bool,
    declared: Declared,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("tmp", &self.guard.0)
            .field("seen", &self.seen)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl Upload {
    /// Append the next chunk. Refuses the first chunk that goes past the limit, before
    /// writing any of it.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), UploadError> {
        let total = self.seen.saturating_add(chunk.len() as u64);
        if total > self.limit {
            return Err(over_limit(self.limit, self.limit_is_declared));
        }
        self.hasher.update(chunk);
        self.seen = total;
        self.file
            .write_all(chunk)
            .await
            .map_err(|e| self.io_error(e))
    }

    /// Write every chunk of `body` until it ends. A body that sends nothing for `stall` is
    /// refused (`upload_stalled`) rather than holding its temp file open forever.
    pub async fn pump<S, B, E>(&mut self, body: &mut S, stall: Duration) -> Result<(), UploadError>
    where
        S: futures_util::Stream<Item = std::result::Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        use futures_util::StreamExt;
        loop {
            match tokio::time::timeout(stall, body.next()).await {
                Ok(Some(Ok(chunk))) => self.write(chunk.as_ref()).await?,
                Ok(Some(Err(e))) => return Err(UploadError::Interrupted(e.to_string())),
                Ok(None) => return Ok(()),
                Err(_) => {
                    return Err(UploadError::Stalled {
                        secs: stall.as_secs_f64(),
                        seen: self.seen,
                    })
                }
            }
        }
    }

    /// Bytes written so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    fn io_error(&self, e: std::io::Error) -> UploadError {
        UploadError::Store(Error::io(
            self.guard
                .0
                .clone()
                .unwrap_or_else(|| self.store.dir.clone()),
            e,
        ))
    }

    /// The body is complete: check it against the declaration, then make it durable under
    /// its digest (fsync file, rename, fsync directory). Idempotent when already stored.
    pub async fn finish(mut self) -> Result<Stored, UploadError> {
        // Land tokio's in-flight write before looking at sizes or syncing.
        self.file.flush().await.map_err(|e| self.io_error(e))?;
        if let Some(want) = self.declared.size.filter(|&w| w != self.seen) {
            return Err(UploadError::SizeMismatch {
                got: self.seen,
                want,
            });
        }
        let hex = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if let Some(want) = self.declared.sha256.as_ref().filter(|w| **w != hex) {
            return Err(UploadError::DigestMismatch {
                got: hex,
                want: want.clone(),
            });
        }
        let size = self.seen;
        if self.store.has(&hex, size) {
            // Same digest and size: the bytes are already there; the guard drops the copy.
            return Ok(Stored {
                sha256: hex,
                size,
                created: false,
            });
        }
        self.file.sync_all().await.map_err(|e| self.io_error(e))?;
        let target = self.store.dir.join(&hex);
        let tmp = self.guard.0.clone().unwrap_or_default();
        tokio::fs::rename(&tmp, &target)
            .await
            .map_err(|e| UploadError::Store(Error::io(&target, e)))?;
        // Renamed: the temp name no longer exists, nothing for the guard to remove.
        self.guard.0 = None;
        let dir = self.store.dir.clone();
        tokio::task::spawn_blocking(move || ringcast_io::fs::fsync_dir(&dir))
            .await
            .map_err(|e| UploadError::Store(Error::io(&self.store.dir, std::io::Error::other(e))))?
            .map_err(|e| UploadError::Store(Error::io(&self.store.dir, e)))?;
        Ok(Stored {
            sha256: hex,
            size,
            created: true,
        })
    }
}
/// A parsed `Range: bytes=…` header (single range only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeReq {
    /// No (usable) Range header: the whole body.
    Full,
    /// Inclusive byte range within the file.
    Part(u64, u64),
    /// Cannot be satisfied (416).
    Unsatisfiable,
}

/// Interpret a Range header against a file of `len` bytes.
pub fn parse_range(header: Option<&str>, len: u64) -> RangeReq {
    let Some(h) = header else {
        return RangeReq::Full;
    };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeReq::Full;
    };
    if spec.contains(',') {
        // Multipart ranges are not offered; the whole body is a valid answer.
        return RangeReq::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeReq::Unsatisfiable;
    };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return RangeReq::Unsatisfiable;
        };
        if n == 0 || len == 0 {
            return RangeReq::Unsatisfiable;
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let Ok(s) = a.parse::<u64>() else {
            return RangeReq::Unsatisfiable;
        };
        let e = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            match b.parse::<u64>() {
                Ok(e) => e.min(len.saturating_sub(1)),
                Err(_) => return RangeReq::Unsatisfiable,
            }
        };
        (s, e)
    };
    if start >= len || start > end {
        return RangeReq::Unsatisfiable;
    }
    RangeReq::Part(start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), RangeReq::Full);
        assert_eq!(parse_range(Some("bytes=0-4"), 10), RangeReq::Part(0, 4));
        assert_eq!(parse_range(Some("bytes=5-"), 10), RangeReq::Part(5, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), RangeReq::Part(7, 9));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), RangeReq::Part(8, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), RangeReq::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), RangeReq::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=x-"), 10), RangeReq::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), RangeReq::Full);
    }

    #[test]
    fn put_is_content_addressed() {
        let d = tempfile::tempdir().unwrap();
        let s = ArtifactStore::open(d.path()).unwrap();
        let h = s.put(b"hello").unwrap();
        assert!(s.has(&h, 5));
        assert!(!s.has(&h, 6));
        assert!(s.path("../etc").is_none());
    }

    fn names(s: &ArtifactStore) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(s.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn declared(bytes: &[u8]) -> Declared {
        Declared {
            sha256: Some(ringcast_proto::digest::sha256_hex(bytes)),
            size: Some(bytes.len() as u64),
        }
    }

    #[tokio::test]
    async fn streamed_upload_lands_under_its_digest_and_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let s = ArtifactStore::open(d.path()).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        for round in 0..2 {
            let mut up = s
                .begin_upload(declared(&data), 1 << 20, None)
                .await
                .unwrap();
            for c in data.chunks(7_000) {
                up.write(c).await.unwrap();
            }
            let st = up.finish().await.unwrap();
            assert_eq!(st.sha256, ringcast_proto::digest::sha256_hex(&data));
            assert_eq!(st.size, data.len() as u64);
            assert_eq!(st.created, round == 0);
            assert_eq!(std::fs::read(s.path(&st.sha256).unwrap()).unwrap(), data);
            assert_eq!(names(&s), vec![st.sha256.clone()]);
        }
    }

    #[tokio::test]
    async fn refusals_leave_nothing_behind() {
        let d = tempfile::tempdir().unwrap();
        let s = ArtifactStore::open(d.path()).unwrap();
        let data = vec![7u8; 10_000];

        // One byte past the declared size is refused before it is written.
        let mut up = s
            .begin_upload(declared(&data), 1 << 20, None)
            .await
            .unwrap();
        up.write(&data).await.unwrap();
        let e = up.write(b"x").await.unwrap_err();
        assert_eq!(e.code(), "too_large");
        assert_eq!(up.seen(), 10_000);
        drop(up);
        assert!(names(&s).is_empty());

        // Past the cap with nothing declared.
        let mut up = s
            .begin_upload(Declared::default(), 100, None)
            .await
            .unwrap();
        assert_eq!(up.write(&data).await.unwrap_err().code(), "too_large");
        drop(up);
        assert!(names(&s).is_empty());

        // Short, and wrong bytes.
        let mut up = s
            .begin_upload(declared(&data), 1 << 20, None)
            .await
            .unwrap();
        up.write(&data[..9_999]).await.unwrap();
        assert_eq!(up.finish().await.unwrap_err().code(), "size_mismatch");
        let mut up = s
            .begin_upload(declared(&data), 1 << 20, None)
            .await
            .unwrap();
        up.write(&[8u8; 10_000]).await.unwrap();
        assert_eq!(up.finish().await.unwrap_err().code(), "digest_mismatch");
        assert!(names(&s).is_empty());

        // Content-Length alone decides before a temp file exists.
        let e = s
            .begin_upload(declared(&data), 1 << 20, Some(10_001))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "too_large");
        let e = s
            .begin_upload(declared(&data), 1 << 20, Some(9_999))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "size_mismatch");
        let e = s
            .begin_upload(Declared::default(), 100, Some(101))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "too_large");
        let e = s
            .begin_upload(declared(&data), 100, None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), "too_large");
        assert!(names(&s).is_empty());
    }

    #[tokio::test]
    async fn a_body_that_goes_quiet_is_refused_as_stalled() {
        use futures_util::StreamExt;
        let d = tempfile::tempdir().unwrap();
        let s = ArtifactStore::open(d.path()).unwrap();
        let mut up = s
            .begin_upload(Declared::default(), 100, None)
            .await
            .unwrap();
        let mut body = futures_util::stream::iter([Ok::<_, std::io::Error>(vec![1u8; 10])])
            .chain(futures_util::stream::pending());
        let e = up
            .pump(&mut body, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "upload_stalled");
        assert_eq!(up.seen(), 10);
        drop(up);
        assert!(names(&s).is_empty());
    }

    #[tokio::test]
    async fn reopening_sweeps_temp_files_a_crash_left() {
        let d = tempfile::tempdir().unwrap();
        let s = ArtifactStore::open(d.path()).unwrap();
        let h = s.put(b"kept").unwrap();
        let mut up = s
            .begin_upload(Declared::default(), 100, None)
            .await
            .unwrap();
        up.write(b"half").await.unwrap();
        // A crash: the guard never runs.
        std::mem::forget(up);
        assert_eq!(names(&s).len(), 2);
        let s = ArtifactStore::open(d.path()).unwrap();
        assert_eq!(names(&s), vec![h]);
    }
}
