//! Artifact download over HTTP(S): resumes with `Range`, streams through the SHA-256 and size
//! verifier, never takes a byte past the declared size, aborts on a stall.
//!
//! The body goes to `{data_dir}/artifacts/{sha256}.part`; after verification the runner
//! renames it to `{data_dir}/artifacts/{sha256}` (same directory: an atomic rename). A stall or a network error keeps the partial
//! file for the next attempt; a digest or size mismatch (or a full disk) removes it.

use crate::error::{Error, Result};
use ringcast_io::fs as fsutil;
use ringcast_proto::{ArtifactVerifier, Reason};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// What to fetch and where.
#[derive(Debug, Clone)]
pub struct Fetch {
    /// Absolute URL.
    pub url: String,
    /// Expected SHA-256 (lowercase hex).
    pub sha256: String,
    /// Exact size.
    pub size: u64,
    /// The partial file.
    pub part: PathBuf,
    /// No byte for this long aborts the attempt.
    pub stall: Duration,
}

/// A body received in full, ready for the final check.
pub struct Complete {
    /// The digest these bytes must have (identifies the job they belong to).
    pub sha256: String,
    /// The verifier holding the hash of every byte.
    pub verifier: ArtifactVerifier,
    /// The partial file holding them.
    pub part: PathBuf,
}

impl std::fmt::Debug for Complete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Complete")
            .field("part", &self.part)
            .finish()
    }
}

/// Resolve a manifest URL: absolute `http(s)://` as is; relative joined to `base`.
pub fn resolve_url(url: &str, base: Option<&str>) -> Result<String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(url.to_owned());
    }
    if url.contains("://") {
        return Err(Error::Download {
            code: "bad_url",
            detail: format!("artifact url {url:?} is neither http(s) nor relative"),
        });
    }
    let base = base.ok_or_else(|| Error::NoArtifactBase(url.to_owned()))?;
    Ok(format!(
        "{}/{}",
        base.trim_end_matches('/'),
        url.trim_start_matches('/')
    ))
}

fn dl(code: &'static str, detail: impl Into<String>) -> Error {
    Error::Download {
        code,
        detail: detail.into(),
    }
}

fn reject(r: ringcast_proto::Rejection) -> Error {
    dl(r.reason.code(), r.detail)
}

/// Build the HTTP client (rustls with ring; system CAs plus an optional extra CA).
pub fn client(connect_timeout: Duration, ca_file: Option<&Path>) -> Result<crate::http::Client> {
    crate::http::Client::new(connect_timeout, ca_file)
}

/// One download attempt. `progress` receives the bytes held so far. On a full disk the
/// partial file is removed (ACCEPTANCE.md case 17: temporary files removed).
pub async fn fetch(
    client: &crate::http::Client,
    f: &Fetch,
    progress: &tokio::sync::watch::Sender<u64>,
) -> Result<Complete> {
    let res = fetch_inner(client, f, progress).await;
    if let Err(e) = &res {
        if e.code() == "disk_full" {
            fsutil::remove_file_if_exists(&f.part)?;
        }
    }
    res
}

async fn fetch_inner(
    client: &crate::http::Client,
    f: &Fetch,
    progress: &tokio::sync::watch::Sender<u64>,
) -> Result<Complete> {
    let mut verifier = ArtifactVerifier::new(&f.sha256, f.size).map_err(reject)?;
    if let Some(dir) = f.part.parent() {
        fsutil::ensure_dir(dir)?;
    }
    // Re-hash what an earlier attempt left, so the verifier covers every byte.
    let mut have = match tokio::fs::metadata(&f.part).await {
        Ok(m) => m.len(),
        Err(_) => 0,
    };
    if have > f.size {
        fsutil::remove_file_if_exists(&f.part)?;
        have = 0;
    }
    if have > 0 {
        hash_file(&f.part, &mut verifier).await?;
    }
    if have == f.size {
        return Ok(Complete {
            sha256: f.sha256.clone(),
            verifier,
            part: f.part.clone(),
        });
    }
    let range = (have > 0).then_some(have);
    let mut resp = client.get(&f.url, range, f.stall).await?;
    let status = resp.status;
    let append = if status == 206 && have > 0 {
        let start = resp
            .header("content-range")
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if start != Some(have) {
            fsutil::remove_file_if_exists(&f.part)?;
            return Err(dl(
                "bad_range",
                format!("server resumed at {start:?}, expected {have}"),
            ));
        }
        true
    } else if (200..300).contains(&status) {
        // The server ignored the range: start over.
        verifier = ArtifactVerifier::new(&f.sha256, f.size).map_err(reject)?;
        false
    } else {
        return Err(dl("http_status", format!("{} answered {status}", f.url)));
    };
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&f.part)
        .await
        .map_err(|e| write_err(&f.part, e))?;
    let mut held = if append { have } else { 0 };
    progress.send_replace(held);
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                let _ = file.flush().await;
                return Err(e);
            }
        };
        if let Err(r) = verifier.update(&chunk) {
            // Longer than declared: never a truncation; the bytes are worthless.
            drop(file);
            fsutil::remove_file_if_exists(&f.part)?;
            return Err(reject(r));
        }
        if let Err(e) = file.write_all(&chunk).await {
            drop(file);
            return Err(write_err(&f.part, e));
        }
        held += chunk.len() as u64;
        progress.send_replace(held);
    }
    file.flush().await.map_err(|e| write_err(&f.part, e))?;
    file.sync_all().await.map_err(|e| write_err(&f.part, e))?;
    Ok(Complete {
        sha256: f.sha256.clone(),
        verifier,
        part: f.part.clone(),
    })
}

/// Feed a file to the verifier in bounded chunks (artifacts can be large; memory is not).
async fn hash_file(path: &Path, v: &mut ArtifactVerifier) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::io("open", path, e))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| Error::io("read", path, e))?;
        if n == 0 {
            return Ok(());
        }
        v.update(&buf[..n]).map_err(reject)?;
    }
}

fn write_err(path: &Path, e: std::io::Error) -> Error {
    Error::io("write", path, e)
}

/// The final check: exact size and digest. On success the part file becomes `dest`
/// (fsync'd rename); on failure it is removed.
pub fn finish(c: Complete, dest: &Path) -> Result<()> {
    if let Err(r) = c.verifier.finish() {
        fsutil::remove_file_if_exists(&c.part)?;
        return Err(reject(r));
    }
    if let Some(dir) = dest.parent() {
        fsutil::ensure_dir(dir)?;
    }
    std::fs::rename(&c.part, dest).map_err(|e| Error::io("rename", dest, e))?;
    Ok(fsutil::sync_parent(dest)?)
}

/// Whether an already staged file at `path` still matches (after a crash between the rename
/// and persisting `staged`).
pub fn verify_file(path: &Path, sha256: &str, size: u64) -> bool {
    use std::io::Read;
    let Ok(mut v) = ArtifactVerifier::new(sha256, size) else {
        return false;
    };
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return v.finish().is_ok(),
            Ok(n) => {
                if v.update(&buf[..n]).is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
}

/// Whether a download error means the bytes were bad (as opposed to the network).
pub fn is_bad_bytes(e: &Error) -> bool {
    matches!(e, Error::Download { code, .. }
        if *code == Reason::DigestMismatch.code()
            || *code == Reason::SizeMismatch.code()
            || *code == Reason::TooLarge.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_urls_join_the_base() {
        assert_eq!(
            resolve_url("/artifacts/sha256/ab", Some("http://h:8080/")).unwrap(),
            "http://h:8080/artifacts/sha256/ab"
        );
        assert_eq!(
            resolve_url("https://cdn/x", Some("http://h")).unwrap(),
            "https://cdn/x"
        );
        assert_eq!(
            resolve_url("/artifacts/x", None).unwrap_err().code(),
            "no_artifact_base"
        );
        assert!(resolve_url("ftp://x/y", Some("http://h")).is_err());
    }
}
