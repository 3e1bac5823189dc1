//! Streaming artifact verification: SHA-256 and exact size, checked while bytes arrive.
//! More bytes than declared fail at once (cf. awslabs/tough `fetch.rs`), never a truncation.

use crate::error::{Reason, Rejection, Result};
use sha2::{Digest, Sha256};

/// Hashes bytes as they stream in and refuses the first byte past the declared size.
#[derive(Clone)]
pub struct ArtifactVerifier {
    expected: [u8; 32],
    size: u64,
    seen: u64,
    hasher: Sha256,
}

impl ArtifactVerifier {
    /// Expect `size` bytes hashing to `sha256_hex`.
    pub fn new(sha256_hex: &str, size: u64) -> Result<ArtifactVerifier> {
        let mut expected = [0u8; 32];
        hex::decode_to_slice(sha256_hex, &mut expected)
            .map_err(|_| Rejection::malformed("sha256 is not 64 hex characters"))?;
        Ok(ArtifactVerifier {
            expected,
            size,
            seen: 0,
            hasher: Sha256::new(),
        })
    }

    /// Feed the next chunk. Fails with `too_large` as soon as the total passes `size`.
    pub fn update(&mut self, chunk: &[u8]) -> Result<()> {
        let total = self.seen.saturating_add(chunk.len() as u64);
        if total > self.size {
            return Err(Rejection::new(
                Reason::TooLarge,
                format!("artifact is longer than its declared {} bytes", self.size),
            ));
        }
        self.hasher.update(chunk);
        self.seen = total;
        Ok(())
    }

    /// Bytes seen so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Declared size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Finish: the size must be exact and the digest must match.
    pub fn finish(self) -> Result<()> {
        if self.seen != self.size {
            return Err(Rejection::new(
                Reason::SizeMismatch,
                format!("artifact ended after {} of {} bytes", self.seen, self.size),
            ));
        }
        let got = self.hasher.finalize();
        if got.as_slice() != self.expected {
            return Err(Rejection::new(
                Reason::DigestMismatch,
                format!(
                    "artifact sha256 is {}, expected {}",
                    hex::encode(got),
                    hex::encode(self.expected)
                ),
            ));
        }
        Ok(())
    }
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_bytes_pass_in_any_chunking() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let sha = sha256_hex(&data);
        for chunk in [1, 7, 4096, 10_000] {
            let mut v = ArtifactVerifier::new(&sha, data.len() as u64).unwrap();
            for c in data.chunks(chunk) {
                v.update(c).unwrap();
            }
            v.finish().unwrap();
        }
    }

    #[test]
    fn longer_fails_as_soon_as_it_passes_size() {
        let data = b"hello world";
        let mut v = ArtifactVerifier::new(&sha256_hex(data), 5).unwrap();
        v.update(b"hello").unwrap();
        assert_eq!(v.update(b" ").unwrap_err().reason, Reason::TooLarge);
    }

    #[test]
    fn shorter_is_size_mismatch() {
        let data = b"hello";
        let mut v = ArtifactVerifier::new(&sha256_hex(data), 6).unwrap();
        v.update(data).unwrap();
        assert_eq!(v.finish().unwrap_err().reason, Reason::SizeMismatch);
    }

    #[test]
    fn wrong_bytes_are_digest_mismatch() {
        let mut v = ArtifactVerifier::new(&sha256_hex(b"hello"), 5).unwrap();
        v.update(b"hellp").unwrap();
        assert_eq!(v.finish().unwrap_err().reason, Reason::DigestMismatch);
    }

    #[test]
    fn bad_hex_is_malformed() {
        assert!(ArtifactVerifier::new("xyz", 1).is_err());
    }
}
