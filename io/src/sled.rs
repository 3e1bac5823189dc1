//! Opening a sled database the same way on both sides: a lock that a closing `Db` still
//! holds is waited for, a lock another process keeps is reported as sled reports it.
//!
//! sled's flusher and I/O threads keep the file lock for a moment after the last handle goes
//! (an in-process restart, a tool opening the database the moment a daemon stopped), so an
//! immediate reopen can fail with "could not acquire lock" although nobody else uses the
//! database. [`open`] retries for up to [`LOCK_WAIT`] before giving up.

use std::time::{Duration, Instant};

/// How long [`open`] waits for a held database lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Pause between two attempts while the lock is held.
const RETRY_EVERY: Duration = Duration::from_millis(20);

/// Whether sled refused to open because the database's lock is held. sled 0.34 reports a
/// held lock as `Io(Other)` with this text and no better handle.
pub fn is_lock_held(e: &::sled::Error) -> bool {
    matches!(e, ::sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Open a sled database, waiting up to [`LOCK_WAIT`] for a lock that a `Db` being dropped
/// still holds. A lock held longer is returned as sled reports it; see [`is_lock_held`].
pub fn open(config: &::sled::Config) -> Result<::sled::Db, ::sled::Error> {
    open_waiting(config, LOCK_WAIT)
}

/// [`open`] with an explicit longest wait for the lock.
pub fn open_waiting(config: &::sled::Config, wait: Duration) -> Result<::sled::Db, ::sled::Error> {
    let started = Instant::now();
    loop {
        match config.open() {
            Err(e) if is_lock_held(&e) && started.elapsed() < wait => {
                std::thread::sleep(RETRY_EVERY);
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> ::sled::Config {
        ::sled::Config::new().path(dir).flush_every_ms(None)
    }

    #[test]
    fn reopen_right_after_drop_waits_for_the_lock() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..20u8 {
            let db = open(&config(d.path())).unwrap();
            db.insert("round", &[i]).unwrap();
            db.flush().unwrap();
        }
        let db = open(&config(d.path())).unwrap();
        assert_eq!(db.get("round").unwrap().as_deref(), Some(&[19u8][..]));
    }

    #[test]
    fn a_live_holder_is_reported_as_a_held_lock_after_the_wait() {
        let d = tempfile::tempdir().unwrap();
        let _held = open(&config(d.path())).unwrap();
        let started = Instant::now();
        let wait = Duration::from_millis(200);
        let err = open_waiting(&config(d.path()), wait).unwrap_err();
        assert!(is_lock_held(&err), "{err}");
        assert!(
            started.elapsed() >= wait,
            "gave up before the wait was over"
        );
    }
}
