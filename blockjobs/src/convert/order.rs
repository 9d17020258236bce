//! In-order writes: a chunk may be read early, but its write waits for its turn.
//!
//! This is qemu-img's default (without `-W`): targets that allocate as they go (qcow2,
//! VHDX, VMDK) then lay data out in guest order, and a copy cut short leaves a clean prefix.
//! A failure anywhere releases every waiter so no worker blocks forever.

use parking_lot::{Condvar, Mutex};

/// Whose turn it is to write, shared by the workers.
#[derive(Debug)]
pub struct WriteOrder {
    enabled: bool,
    state: Mutex<State>,
    turn: Condvar,
}

#[derive(Debug)]
struct State {
    next: u64,
    aborted: bool,
}

impl WriteOrder {
    /// Ordering is enforced only when `enabled` (it is off for out-of-order writes).
    pub fn new(enabled: bool) -> Self {
        WriteOrder {
            enabled,
            state: Mutex::new(State {
                next: 0,
                aborted: false,
            }),
            turn: Condvar::new(),
        }
    }

    /// Blocks until chunk `seq` may write. Returns `false` when the copy was aborted.
    pub fn wait_turn(&self, seq: u64) -> bool {
        let mut state = self.state.lock();
        if !self.enabled {
            return !state.aborted;
        }
        while state.next != seq && !state.aborted {
            self.turn.wait(&mut state);
        }
        !state.aborted
    }

    /// Marks chunk `seq` written, passing the turn on.
    pub fn done(&self, seq: u64) {
        if !self.enabled {
            return;
        }
        let mut state = self.state.lock();
        if state.next == seq {
            state.next = seq + 1;
        }
        drop(state);
        self.turn.notify_all();
    }

    /// Stops the copy: every waiter returns `false` from now on.
    pub fn abort(&self) {
        self.state.lock().aborted = true;
        self.turn.notify_all();
    }

    /// True once [`WriteOrder::abort`] was called.
    pub fn aborted(&self) -> bool {
        self.state.lock().aborted
    }
}
