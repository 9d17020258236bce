//! The `-r RATE` limiter of commit and convert: bytes per second over the whole job.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets requests go at `rate` bytes per second on average, from any number of threads.
#[derive(Debug)]
pub struct RateLimit {
    rate: u64,
    started: Instant,
    admitted: AtomicU64,
}

impl RateLimit {
    /// A limiter for `rate` bytes per second; `None` (no limit) for 0 or `None`, as QEMU
    /// treats a rate of 0.
    pub fn new(rate: Option<u64>) -> Option<Self> {
        rate.filter(|&r| r > 0).map(|rate| RateLimit {
            rate,
            started: Instant::now(),
            admitted: AtomicU64::new(0),
        })
    }

    /// Waits until the bytes admitted before this request were due, then admits `bytes`.
    /// As QEMU's limiter, a request goes once the ones before it fit the rate; its own
    /// size is paid for by the next one.
    pub fn admit(&self, bytes: u64) {
        let before = self.admitted.fetch_add(bytes, Ordering::Relaxed);
        let due = Duration::from_secs_f64(before as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_limit_for_zero_or_none() {
        assert!(RateLimit::new(None).is_none());
        assert!(RateLimit::new(Some(0)).is_none());
    }

    #[test]
    fn requests_are_spaced_by_the_rate() {
        let limit = RateLimit::new(Some(1 << 20)).expect("limit");
        let start = Instant::now();
        for _ in 0..5 {
            limit.admit(64 << 10);
        }
        // Four requests' worth (256 KiB) must have been due before the fifth went.
        assert!(
            start.elapsed() >= Duration::from_millis(240),
            "{:?}",
            start.elapsed()
        );
    }
}
