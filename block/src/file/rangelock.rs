//! Byte-range locks that keep read-modify-write cycles of `O_DIRECT` files atomic.
//!
//! With `O_DIRECT` an unaligned write reads the blocks around it, patches them and writes
//! them back. Two such writes to different bytes of one block, or such a write racing an
//! aligned write or a hole punch covering the block, would otherwise write back stale bytes
//! and lose the other request's data. Every write-like request of a direct file therefore
//! holds its block-aligned range while it runs. Reads need no lock: a write-back only ever
//! stores bytes that are current or new.

use parking_lot::{Condvar, Mutex};

/// A set of held, half-open byte ranges.
#[derive(Debug, Default)]
pub(super) struct RangeLock {
    state: Mutex<State>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct State {
    next_owner: u64,
    /// `(owner, start, end)` of every held range.
    held: Vec<(u64, u64, u64)>,
}

/// Holds ranges until dropped.
#[derive(Debug)]
pub(super) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    owner: u64,
}

impl RangeLock {
    /// Waits until none of `ranges` overlaps a range someone else holds, then takes them all
    /// at once. Taking every range of a batch in one step (never one after another) is what
    /// keeps two batches from deadlocking on each other; ranges of one batch may overlap.
    pub(super) fn lock(&self, ranges: &[(u64, u64)]) -> RangeGuard<'_> {
        let mut state = self.state.lock();
        while state
            .held
            .iter()
            .any(|&(_, hs, he)| ranges.iter().any(|&(s, e)| s < e && s < he && hs < e))
        {
            self.released.wait(&mut state);
        }
        let owner = state.next_owner;
        state.next_owner += 1;
        for &(s, e) in ranges {
            if s < e {
                state.held.push((owner, s, e));
            }
        }
        RangeGuard { lock: self, owner }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.lock.state.lock();
        state.held.retain(|&(owner, _, _)| owner != self.owner);
        drop(state);
        self.lock.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_wait_disjoint_ones_do_not() {
        let lock = Arc::new(RangeLock::default());
        let held = lock.lock(&[(0, 4096)]);
        // Disjoint and empty ranges are granted while the first is held.
        drop(lock.lock(&[(4096, 8192), (100, 100)]));
        let entered = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (lock, entered) = (Arc::clone(&lock), Arc::clone(&entered));
            std::thread::spawn(move || {
                let _g = lock.lock(&[(8192, 9000), (4000, 4100)]);
                entered.store(true, Ordering::SeqCst);
            })
        };
        // The waiter cannot get in until the holder lets go; it must not have entered yet
        // whatever the scheduling, because the holder still holds (0, 4096).
        assert!(!entered.load(Ordering::SeqCst));
        drop(held);
        waiter.join().expect("waiter");
        assert!(entered.load(Ordering::SeqCst));
    }

    #[test]
    fn one_batch_may_hold_overlapping_ranges() {
        let lock = RangeLock::default();
        let _g = lock.lock(&[(0, 10), (5, 15)]);
    }
}
