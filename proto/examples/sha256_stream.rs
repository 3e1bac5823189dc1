//! Stream a file through [`ArtifactVerifier`] in 64 KiB reads, the way the agent verifies a
//! download, and print the throughput. Used in BENCHMARKS.md next to `openssl dgst -sha256` and
//! `sha256sum` on the same page-cached file:
//!
//! ```text
//! cargo run --release -p ringcast-proto --example sha256_stream -- FILE [SHA256]
//! ```
//!
//! With SHA256 given, the digest is checked as the agent checks it; without, the file is hashed
//! once to learn the digest and the timed pass then verifies against it.

use ringcast_proto::ArtifactVerifier;
use std::io::Read;
use std::process::ExitCode;
use std::time::Instant;

const CHUNK: usize = 64 * 1024;

fn stream(path: &str, sha: &str, size: u64) -> std::io::Result<Result<(), String>> {
    let mut f = std::fs::File::open(path)?;
    let mut v = match ArtifactVerifier::new(sha, size) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Err(e) = v.update(&buf[..n]) {
            return Ok(Err(e.to_string()));
        }
    }
    Ok(v.finish().map_err(|e| e.to_string()))
}

fn digest(path: &str) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: sha256_stream FILE [SHA256]");
        return ExitCode::from(2);
    };
    let run = || -> std::io::Result<Result<(u64, f64, String), String>> {
        let size = std::fs::metadata(path)?.len();
        let sha = match args.get(1) {
            Some(s) => s.clone(),
            None => digest(path)?,
        };
        let start = Instant::now();
        let verdict = stream(path, &sha, size)?;
        let secs = start.elapsed().as_secs_f64();
        Ok(verdict.map(|()| (size, secs, sha)))
    };
    match run() {
        Ok(Ok((size, secs, sha))) => {
            println!(
                "{sha}  {path}\n{size} bytes in {:.3} s = {:.1} MB/s ({:.2} GiB/s)",
                secs,
                size as f64 / secs / 1e6,
                size as f64 / secs / (1u64 << 30) as f64
            );
            ExitCode::SUCCESS
        }
        Ok(Err(rejected)) => {
            eprintln!("sha256_stream: rejected: {rejected}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("sha256_stream: {path}: {e}");
            ExitCode::FAILURE
        }
    }
}
