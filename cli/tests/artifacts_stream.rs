//! The artifact store streams: uploads go to disk chunk by chunk and are checked against what
//! the uploader declared, downloads (whole, Range, HEAD) are served from the file. A real
//! controller on 127.0.0.1:0, real files in tempdirs, real HTTP.

mod common;

use common::*;
use futures_util::StreamExt;
use ringcast_controller::client::{Client, ClientError};
use ringcast_controller::ControllerHandle;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

/// Every wait on the server is bounded by this.
const WAIT: Duration = Duration::from_secs(60);

/// Write `size` pseudo-random bytes (xorshift, so nothing compresses or repeats) to `path`,
/// one MiB at a time so the test itself stays small; returns their sha256.
fn write_artifact(path: &Path, size: u64, seed: u64) -> String {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut h = Sha256::new();
    let mut left = size;
    let mut buf = vec![0u8; MIB as usize];
    while left > 0 {
        let n = left.min(MIB) as usize;
        for b in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        h.update(&buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
    hex::encode(h.finalize())
}

fn store_dir(w: &World) -> PathBuf {
    w.dir.path().join("data").join("artifacts").join("sha256")
}

/// Every name in the store's directory, temp files included.
fn store_names(w: &World) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store_dir(w))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

async fn start(w: &World, max: u64) -> ControllerHandle {
    let mut c = w.config(vec![ring("canary", &[100.0], "10m", 0, 0.2)]);
    c.server.max_artifact_bytes = max;
    w.start(c).await
}

/// GET the whole artifact, hashing it as it streams; returns (status, sha256, length).
async fn download_sha(url: &str) -> (u16, String, u64) {
    let resp = tokio::time::timeout(WAIT, reqwest::get(url))
        .await
        .expect("download answers in time")
        .unwrap();
    let status = resp.status().as_u16();
    let mut s = resp.bytes_stream();
    let mut h = Sha256::new();
    let mut n = 0u64;
    while let Some(c) = tokio::time::timeout(WAIT, s.next())
        .await
        .expect("download streams in time")
    {
        let c = c.unwrap();
        n += c.len() as u64;
        h.update(&c);
    }
    (status, hex::encode(h.finalize()), n)
}

fn file_bytes(path: &Path, start: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(start)).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).unwrap();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_artifact_round_trips_byte_identical_with_ranges_and_head() {
    let w = World::new();
    let h = start(&w, 256 * MIB).await;
    let size = 64 * MIB;
    let file = w.dir.path().join("image.bin");
    let sha = write_artifact(&file, size, 0x5eed);

    let up = tokio::time::timeout(
        WAIT,
        api(&h, OPERATOR).upload_artifact_file(&file, Some((&sha, size))),
    )
    .await
    .expect("upload answers in time")
    .unwrap();
    assert_eq!((up.sha256.as_str(), up.size), (sha.as_str(), size));
    assert_eq!(
        store_names(&w),
        vec![sha.clone()],
        "only the artifact, no temp"
    );

    let url = format!("{}{}", h.http_url(), up.url);
    assert_eq!(download_sha(&url).await, (200, sha.clone(), size));

    let http = reqwest::Client::new();
    let get_range = |r: &'static str| {
        let rb = http.get(&url).header("Range", r);
        async move {
            tokio::time::timeout(WAIT, rb.send())
                .await
                .expect("range answers in time")
                .unwrap()
        }
    };

    // A slice out of the middle.
    let (a, b) = (30_000_000u64, 30_999_999u64);
    let part = get_range("bytes=30000000-30999999").await;
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes {a}-{b}/{size}").as_str()
    );
    assert_eq!(part.headers()["content-length"], "1000000");
    assert_eq!(part.headers()["accept-ranges"], "bytes");
    assert_eq!(
        part.bytes().await.unwrap().to_vec(),
        file_bytes(&file, a, 1_000_000)
    );

    // Suffix and open-ended ranges.
    let tail = get_range("bytes=-10").await;
    assert_eq!(tail.status(), 206);
    assert_eq!(
        tail.headers()["content-range"],
        format!("bytes {}-{}/{size}", size - 10, size - 1).as_str()
    );
    assert_eq!(
        tail.bytes().await.unwrap().to_vec(),
        file_bytes(&file, size - 10, 10)
    );
    let from = get_range("bytes=67108800-").await;
    assert_eq!(from.status(), 206);
    assert_eq!(
        from.bytes().await.unwrap().to_vec(),
        file_bytes(&file, 67_108_800, 64)
    );

    // Unsatisfiable: empty suffix, starting at or past the end.
    for r in ["bytes=-0", "bytes=67108864-", "bytes=99999999999-"] {
        let resp = get_range(r).await;
        assert_eq!(resp.status(), 416, "{r}");
        assert_eq!(
            resp.headers()["content-range"],
            format!("bytes */{size}").as_str(),
            "{r}"
        );
    }

    // HEAD: the headers of a GET, no body.
    let head = tokio::time::timeout(WAIT, http.head(&url).send())
        .await
        .expect("HEAD answers in time")
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], size.to_string().as_str());
    assert_eq!(head.headers()["accept-ranges"], "bytes");
    assert!(head.bytes().await.unwrap().is_empty());

    // Uploading the same artifact again is a no-op that still answers with it.
    let again = tokio::time::timeout(WAIT, api(&h, OPERATOR).upload_artifact_file(&file, None))
        .await
        .expect("re-upload answers in time")
        .unwrap();
    assert_eq!(again.sha256, sha);
    assert_eq!(store_names(&w), vec![sha]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_longer_than_declared_is_refused_while_still_streaming() {
    let w = World::new();
    let h = start(&w, 256 * MIB).await;
    let declared = MIB;
    // The body comes from a channel the test keeps open, so the answer can only arrive if the
    // controller refused mid-stream, not after reading to the end.
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| (Ok::<_, std::io::Error>(c), rx))
    });
    let url = format!(
        "{}/api/v1/artifacts?sha256={}&size={declared}",
        h.http_url(),
        "ab".repeat(32)
    );
    let send = tokio::spawn(
        reqwest::Client::new()
            .put(url)
            .bearer_auth(OPERATOR)
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    );
    let chunk = vec![0x42u8; 64 * 1024];
    // One chunk more than declared.
    for _ in 0..=(declared / chunk.len() as u64) {
        tokio::time::timeout(WAIT, tx.send(chunk.clone()))
            .await
            .expect("the controller keeps reading until the limit")
            .unwrap();
    }
    let resp = tokio::time::timeout(WAIT, send)
        .await
        .expect("refused while the body is still open")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "too_large", "{body}");
    assert!(store_names(&w).is_empty(), "{:?}", store_names(&w));
    drop(tx);

    // Over the cap with nothing declared, announced by Content-Length: refused before the
    // body is read at all.
    let w2 = World::new();
    let h2 = start(&w2, MIB).await;
    let e = api(&h2, OPERATOR)
        .upload_artifact(vec![0u8; (MIB + 1) as usize])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Api { status: 413, code, .. } if code == "too_large"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_digest_or_short_upload_is_refused_and_leaves_nothing() {
    let w = World::new();
    let h = start(&w, 256 * MIB).await;
    let size = 3 * MIB + 17;
    let file = w.dir.path().join("image.bin");
    let sha = write_artifact(&file, size, 7);
    let op = api(&h, OPERATOR);

    let other = "0".repeat(64);
    let e = op
        .upload_artifact_file(&file, Some((&other, size)))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Api { status: 422, code, .. } if code == "digest_mismatch"),
        "{e}"
    );
    assert!(
        e.to_string().contains(&sha),
        "the detail names the real digest: {e}"
    );
    assert!(store_names(&w).is_empty(), "{:?}", store_names(&w));

    // The client refuses a file whose size is not the declared one before sending it.
    let e = op
        .upload_artifact_file(&file, Some((&sha, size + 1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::File { .. }) && e.to_string().contains("size_mismatch"),
        "{e}"
    );
    // The controller refuses the same on its own, from Content-Length, before reading.
    let bytes = std::fs::read(&file).unwrap();
    let put = |declared: u64| {
        reqwest::Client::new()
            .put(format!(
                "{}/api/v1/artifacts?sha256={sha}&size={declared}",
                h.http_url()
            ))
            .bearer_auth(OPERATOR)
            .body(bytes.clone())
            .send()
    };
    for (declared, status, code) in [
        (size + 1, 422, "size_mismatch"),
        (size - 1, 413, "too_large"),
    ] {
        let resp = tokio::time::timeout(WAIT, put(declared))
            .await
            .expect("refusal in time")
            .unwrap();
        assert_eq!(resp.status(), status, "declared {declared}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"], code, "{body}");
    }
    assert!(store_names(&w).is_empty(), "{:?}", store_names(&w));

    // A viewer may not upload, and nothing is written for it either.
    let e = api(&h, VIEWER)
        .upload_artifact_file(&file, Some((&sha, size)))
        .await
        .unwrap_err();
    assert!(matches!(&e, ClientError::Api { status: 403, .. }), "{e}");
    assert!(store_names(&w).is_empty());

    // And the right declaration goes through.
    let up = op
        .upload_artifact_file(&file, Some((&sha, size)))
        .await
        .unwrap();
    assert_eq!(up.sha256, sha);
    assert_eq!(store_names(&w), vec![sha]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_submit_streams_the_artifact_and_refuses_one_that_is_not_the_release() {
    let w = World::new();
    let h = start(&w, 256 * MIB).await;
    let file = w.dir.path().join("image.bin");
    let sha = write_artifact(&file, 2 * MIB, 11);
    let mut r = ringcast_proto::testkit::sample_release("app", 2, 1);
    ringcast::kit::point_at(&mut r, &sha, 2 * MIB);
    let rel = w.dir.path().join("release.json");
    std::fs::write(&rel, r.sign(&[&w.fx.release]).to_vec_pretty()).unwrap();
    let other = w.dir.path().join("other.bin");
    write_artifact(&other, 2 * MIB, 12);

    let run = |artifact: PathBuf| {
        let (server, rel) = (h.http_url(), rel.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
                .args(["release", "submit"])
                .arg(&rel)
                .arg("--artifact")
                .arg(&artifact)
                .env("RINGCAST_SERVER", server)
                .env("RINGCAST_TOKEN", OPERATOR)
                .output()
                .unwrap()
        })
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    let o = tokio::time::timeout(WAIT, run(other))
        .await
        .expect("the command line finishes")
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("digest_mismatch"), "{}", text(&o));
    assert!(store_names(&w).is_empty(), "{:?}", store_names(&w));
    let releases = api(&h, VIEWER).releases().await.unwrap();
    assert!(
        releases.is_empty(),
        "nothing submitted after a refused upload"
    );

    let o = tokio::time::timeout(WAIT, run(file.clone()))
        .await
        .expect("the command line finishes")
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("rollout app-2"), "{}", text(&o));
    assert_eq!(store_names(&w), vec![sha.clone()]);
    let url = format!("{}/artifacts/sha256/{sha}", h.http_url());
    assert_eq!(download_sha(&url).await, (200, sha, 2 * MIB));
}

/// Peak resident memory of this process so far (VmHWM), in bytes.
#[cfg(target_os = "linux")]
fn vm_hwm() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmHWM in kB");
    kb * 1024
}

/// Uploading and downloading a 256 MiB artifact must not raise the process's peak RSS by
/// anything like the artifact's size. nextest runs each test in its own process, so the peak
/// is this test's; under `cargo test` the other tests here also stream, so they add a few
/// MiB at most. A whole-artifact buffer anywhere would add at least 256 MiB.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_round_trip_runs_in_constant_memory() {
    let w = World::new();
    let h = start(&w, 512 * MIB).await;
    let size = 256 * MIB;
    let file = w.dir.path().join("image.bin");
    let sha = write_artifact(&file, size, 0xbeef);
    let client: Client = api(&h, OPERATOR);
    let before = vm_hwm();

    let up = tokio::time::timeout(WAIT, client.upload_artifact_file(&file, Some((&sha, size))))
        .await
        .expect("upload answers in time")
        .unwrap();
    assert_eq!(up.size, size);
    let url = format!("{}{}", h.http_url(), up.url);
    assert_eq!(download_sha(&url).await, (200, sha, size));

    let grew = vm_hwm().saturating_sub(before);
    eprintln!(
        "VmHWM before {} MiB, after {} MiB: grew {} MiB for a 256 MiB upload + download",
        before / MIB,
        (before + grew) / MIB,
        grew / MIB
    );
    assert!(
        grew < 64 * MIB,
        "peak RSS grew {} MiB moving a 256 MiB artifact",
        grew / MIB
    );
}
