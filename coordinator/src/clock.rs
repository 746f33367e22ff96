//! The coordinator's clock, behind a trait so that the scheduler can be driven by a test clock.
//!
//! Times are Unix milliseconds (`i64`), as everywhere in the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// Milliseconds since the Unix epoch: the coordinator's one read of the wall clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A source of the current time, in Unix milliseconds.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time, milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// A clock that moves only when told to; clones share the same time, so a test can keep one
/// handle and give another (as `Arc<dyn Clock>`) to the scheduler on another task or thread.
#[derive(Debug, Clone, Default)]
pub struct TestClock {
    now: Arc<AtomicI64>,
}

impl TestClock {
    /// A clock reading `now_ms`.
    pub fn new(now_ms: i64) -> TestClock {
        TestClock {
            now: Arc::new(AtomicI64::new(now_ms)),
        }
    }

    /// Sets the time (it may go backwards: tests decide).
    pub fn set(&self, now_ms: i64) {
        self.now.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `delta_ms` and returns the new time.
    pub fn advance(&self, delta_ms: i64) -> i64 {
        self.now.fetch_add(delta_ms, Ordering::SeqCst) + delta_ms
    }
}

impl Clock for TestClock {
    fn now_ms(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_clock_is_shared_between_clones_and_threads() {
        let clock = TestClock::new(1_000);
        let shared: Arc<dyn Clock> = Arc::new(clock.clone());
        assert_eq!(shared.now_ms(), 1_000);
        assert_eq!(clock.advance(500), 1_500);
        let seen = std::thread::spawn(move || shared.now_ms()).join().unwrap();
        assert_eq!(seen, 1_500);
        clock.set(10);
        assert_eq!(clock.now_ms(), 10);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now_ms() > 1_577_836_800_000);
    }
}
