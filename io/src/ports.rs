//! Local TCP ports for servers that must be told their port before they bind it (the embedded
//! broker, a test's own Mosquitto), without the usual race.
//!
//! "Bind port 0, read the port, close, hand the number on" races twice: the kernel may hand the
//! same port to any process's next `bind(0)` or outgoing `connect()` before the server binds
//! it. [`reserve`] avoids both. It picks ports below Linux's ephemeral range (32768–60999), so
//! no outgoing connection and no `bind(0)` is ever given one, and it holds an exclusive lock on
//! a file named after the port for as long as the process lives, so two Ringcast processes
//! (parallel tests) never pick the same one. A port some unrelated program already listens on
//! fails the bind check and is skipped.

use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::sync::Mutex;

/// The range [`reserve`] picks from: registered ports under the ephemeral range.
pub const RANGE: std::ops::Range<u16> = 20_000..32_000;

/// Locks held for the life of the process: one per reserved port.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// Why no port could be reserved.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The lock directory could not be created.
    #[error("port locks in {dir}: {source}")]
    LockDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Every candidate was taken.
    #[error("no free port in {start}..{end} after {tries} tries", start = RANGE.start, end = RANGE.end)]
    Exhausted {
        /// How many ports were tried.
        tries: u32,
    },
}

/// A free port on 127.0.0.1 that no other Ringcast process holds, reserved until this
/// process exits. Bind it soon: only Ringcast processes honour the reservation.
pub fn reserve() -> Result<u16, PortError> {
    let dir = std::env::temp_dir().join("ringcast-ports");
    std::fs::create_dir_all(&dir).map_err(|source| PortError::LockDir {
        dir: dir.clone(),
        source,
    })?;
    let span = u32::from(RANGE.end - RANGE.start);
    let mut x = seed();
    const TRIES: u32 = 512;
    for _ in 0..TRIES {
        // xorshift: a different walk per process and per call.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = RANGE.start + (x % u64::from(span)) as u16;
        let Ok(file) = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
        else {
            continue;
        };
        if file.try_lock().is_err() {
            continue; // another Ringcast process holds it
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
            continue; // someone else listens there
        }
        if let Ok(mut held) = HELD.lock() {
            held.push(file);
            return Ok(port);
        }
    }
    Err(PortError::Exhausted { tries: TRIES })
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish() | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..20).map(|_| reserve().unwrap()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            ports.len(),
            "a port was handed out twice: {ports:?}"
        );
        for p in ports {
            assert!(RANGE.contains(&p) && p < 32_768, "{p}");
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap();
        }
    }

    #[test]
    fn a_port_locked_by_another_holder_is_skipped() {
        let p = reserve().unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(
                std::env::temp_dir()
                    .join("ringcast-ports")
                    .join(p.to_string()),
            )
            .unwrap();
        // This process holds the lock through HELD; a second handle cannot take it.
        assert!(f.try_lock().is_err(), "port {p} was not locked");
    }
}
