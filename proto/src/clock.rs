//! The `Clock` port. `proto` never reads the time itself; components that need "now" take a
//! `Clock`, so tests drive windows, bakes, expiry and activation times with [`FakeClock`].
//!
//! Components wait on logical time by ticking (a short real-time interval) and asking the
//! clock, never by sleeping for a logical duration, so advancing a fake clock takes effect at
//! the next tick.

use jiff::{SignedDuration, Timestamp};
use std::sync::{Arc, Mutex};

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock tests set and advance by hand. Clones share the same time.
#[derive(Debug, Clone)]
pub struct FakeClock(Arc<Mutex<Timestamp>>);

impl FakeClock {
    /// A fake clock showing `at`.
    pub fn new(at: Timestamp) -> FakeClock {
        FakeClock(Arc::new(Mutex::new(at)))
    }

    /// Set the time.
    pub fn set(&self, at: Timestamp) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *g = at;
    }

    /// Move the time forward (or back, with a negative duration).
    pub fn advance(&self, by: SignedDuration) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *g = g.checked_add(by).unwrap_or(*g);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_clock_clones_share_time() {
        let c = FakeClock::new(Timestamp::UNIX_EPOCH);
        let d = c.clone();
        c.advance(SignedDuration::from_secs(90));
        assert_eq!(d.now().as_second(), 90);
        d.set(Timestamp::from_second(5).unwrap());
        assert_eq!(c.now().as_second(), 5);
    }
}
