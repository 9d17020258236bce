//! The io_uring data engine: a pool of rings, each used by one thread at a time.
//!
//! A batch is pushed into one ring with at most [`RING_DEPTH`] requests in flight; as
//! completions arrive the rest of the batch is pushed, so deep batches never overflow the
//! submission queue. Short transfers are resubmitted for their remainder and requests larger
//! than [`MAX_TRANSFER`] go in pieces, since one entry carries a `u32` length.
//!
//! The one rule everything here serves: the kernel writes into (or reads from) the caller's
//! buffers, so no call returns while a request it submitted is still owned by the kernel. On
//! every error path the ring is drained first (after asking the kernel to cancel what it
//! can); a ring that cannot be drained is not survivable (returning would let the kernel
//! write into freed memory), so the process aborts.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};
use parking_lot::Mutex;

use super::IoOp;

/// Requests in flight per ring.
pub const RING_DEPTH: u32 = 64;

/// Rings kept for reuse; more are created while many threads submit at once.
const POOL_KEEP: usize = 8;

/// Largest transfer put into one entry. Linux moves at most `0x7fff_f000` bytes per call
/// anyway; 1 GiB keeps every piece a multiple of any `O_DIRECT` alignment.
pub const MAX_TRANSFER: usize = 1 << 30;

/// How often one request may come back with `EAGAIN` before that counts as its failure
/// (a regular file should never do it; the bound keeps a misbehaving one from spinning).
const MAX_AGAIN: u32 = 64;

/// How many failed waits in a row the drain tolerates before declaring the ring lost.
const DRAIN_ATTEMPTS: u32 = 1000;

/// Why a batch failed.
#[derive(Debug)]
pub enum RunError {
    /// No ring could be had (the kernel refused a new one); nothing was submitted, so the
    /// caller may run the batch another way.
    NoRing,
    /// A request failed; every request has completed or been drained.
    Failed {
        /// What the kernel said.
        error: io::Error,
        /// Host offset of the failed (part of the) request.
        offset: u64,
        /// The failed request was a write.
        write: bool,
    },
}

/// A pool of rings. Rings are not tied to a file (each entry names its descriptor), so one
/// pool serves the whole process: opening a thousand extent files costs no ring each.
pub struct RingPool {
    idle: Mutex<Vec<IoUring>>,
}

impl std::fmt::Debug for RingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingPool").finish_non_exhaustive()
    }
}

/// State of one request of a batch while it is in flight.
struct Pending {
    ptr: *mut u8,
    len: usize,
    offset: u64,
    done: usize,
    write: bool,
    again: u32,
}

impl RingPool {
    /// The process-wide pool, created (and the kernel probed) on first success. A refusal is
    /// not remembered: it may have been passing (out of memory or descriptors), and asking
    /// again costs one failing system call per open.
    pub fn shared() -> io::Result<&'static RingPool> {
        static POOL: OnceLock<RingPool> = OnceLock::new();
        if let Some(pool) = POOL.get() {
            return Ok(pool);
        }
        let fresh = RingPool::new()?;
        // Another thread may have won the race; its pool is kept and this one dropped.
        Ok(POOL.get_or_init(|| fresh))
    }

    /// Creates a pool, proving the kernel accepts io_uring by building and using one ring.
    pub fn new() -> io::Result<Self> {
        let mut ring = IoUring::new(RING_DEPTH)?;
        // A NOP round trip: some sandboxes allow io_uring_setup but block io_uring_enter.
        let nop = opcode::Nop::new().build().user_data(0);
        // SAFETY: a NOP entry references no memory, so nothing can dangle whatever happens
        // to it afterwards.
        unsafe { ring.submission().push(&nop) }
            .map_err(|_| io::Error::other("the new ring's submission queue is full"))?;
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        ring.completion().for_each(drop);
        Ok(RingPool {
            idle: Mutex::new(vec![ring]),
        })
    }

    fn take(&self) -> io::Result<IoUring> {
        if let Some(ring) = self.idle.lock().pop() {
            return Ok(ring);
        }
        IoUring::new(RING_DEPTH)
    }

    fn give_back(&self, ring: IoUring) {
        let mut idle = self.idle.lock();
        if idle.len() < POOL_KEEP {
            idle.push(ring);
        }
    }

    /// Runs every request to completion on `file`. When it returns, by success or error, the
    /// kernel holds none of the buffers and the ring is idle again.
    pub fn run(&self, file: &File, ops: &mut [&mut IoOp<'_>]) -> Result<(), RunError> {
        let mut ring = self.take().map_err(|_| RunError::NoRing)?;
        let result = run_on(&mut ring, file, ops);
        // Every path of `run_on` reaps all it submitted, so the ring is empty and reusable.
        self.give_back(ring);
        result
    }
}

fn run_on(ring: &mut IoUring, file: &File, ops: &mut [&mut IoOp<'_>]) -> Result<(), RunError> {
    let fd = types::Fd(file.as_raw_fd());
    let mut pending: Vec<Pending> = ops
        .iter_mut()
        .map(|op| match &mut **op {
            IoOp::Read { buf, offset } => Pending {
                ptr: buf.as_mut_ptr(),
                len: buf.len(),
                offset: *offset,
                done: 0,
                write: false,
                again: 0,
            },
            IoOp::Write { buf, offset } => Pending {
                ptr: buf.as_ptr().cast_mut(),
                len: buf.len(),
                offset: *offset,
                done: 0,
                write: true,
                again: 0,
            },
        })
        .collect();
    for p in &pending {
        // The kernel reads offsets as signed, and -1 would even mean "the file position".
        let end = p.offset.checked_add(p.len as u64);
        if end.is_none_or(|end| end > i64::MAX as u64) {
            return Err(RunError::Failed {
                error: io::Error::from_raw_os_error(libc::EINVAL),
                offset: p.offset,
                write: p.write,
            });
        }
    }
    // Requests that still need (part of) their transfer submitted.
    let mut queue: VecDeque<usize> = (0..pending.len()).filter(|&i| pending[i].len > 0).collect();
    let mut in_flight = 0u32;
    let mut first_error: Option<(io::Error, u64, bool)> = None;

    while (first_error.is_none() && !queue.is_empty()) || in_flight > 0 {
        while in_flight < RING_DEPTH && first_error.is_none() {
            let Some(index) = queue.pop_front() else {
                break;
            };
            let p = &pending[index];
            let piece = (p.len - p.done).min(MAX_TRANSFER);
            // `p.done < p.len`: the pointer stays inside the caller's buffer.
            let at = p.ptr.wrapping_add(p.done);
            let host = p.offset + p.done as u64;
            // `piece <= MAX_TRANSFER` fits in a u32.
            let entry = if p.write {
                opcode::Write::new(fd, at.cast_const(), piece as u32)
                    .offset(host)
                    .build()
            } else {
                opcode::Read::new(fd, at, piece as u32).offset(host).build()
            }
            .user_data(index as u64);
            // SAFETY: the entry points at `piece` bytes of a live buffer borrowed (mutably for
            // reads) for the whole call, and `fd` stays open because `file` is borrowed too.
            // No path out of this function returns before the entry's completion is reaped
            // (the drain below, or the abort when draining is impossible), so the kernel never
            // touches the buffer after the borrow ends.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                queue.push_front(index);
                break;
            }
            in_flight += 1;
        }
        if in_flight == 0 {
            if let Some(index) = queue.front() {
                // Unreachable with an idle ring; never report success for unsent requests.
                let p = &pending[*index];
                first_error = Some((
                    io::Error::other("the ring refused a request while idle"),
                    p.offset + p.done as u64,
                    p.write,
                ));
            }
            break;
        }
        if let Err(error) = wait_one(ring) {
            let cancels = cancel_all(ring);
            drain(ring, in_flight + cancels);
            let (offset, write) = match (&first_error, queue.front()) {
                (Some((_, off, w)), _) => (*off, *w),
                (None, Some(&i)) => (pending[i].offset + pending[i].done as u64, pending[i].write),
                // Everything left is in flight: name the first unfinished request.
                (None, None) => pending
                    .iter()
                    .find(|p| p.done < p.len)
                    .map_or((0, false), |p| (p.offset + p.done as u64, p.write)),
            };
            return Err(RunError::Failed {
                error,
                offset,
                write,
            });
        }
        for (user, res) in reap(ring) {
            in_flight = in_flight.saturating_sub(1);
            let Some(p) = usize::try_from(user).ok().and_then(|i| pending.get_mut(i)) else {
                continue;
            };
            let host = p.offset + p.done as u64;
            if res < 0 {
                let retry = (res == -libc::EINTR || res == -libc::EAGAIN) && p.again < MAX_AGAIN;
                if retry {
                    p.again += 1;
                    queue.push_back(user as usize);
                } else if first_error.is_none() {
                    first_error = Some((io::Error::from_raw_os_error(-res), host, p.write));
                }
            } else if res == 0 {
                if first_error.is_none() {
                    let err = if p.write {
                        io::Error::new(io::ErrorKind::WriteZero, "the file accepted no bytes")
                    } else {
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "read past the end of the file",
                        )
                    };
                    first_error = Some((err, host, p.write));
                }
            } else {
                // The kernel never reports more than it was asked for; clamp all the same so
                // a bad count cannot move `done` past the buffer.
                p.done = (p.done + res as usize).min(p.len);
                if p.done < p.len {
                    queue.push_back(user as usize);
                }
            }
        }
    }
    match first_error {
        Some((error, offset, write)) => Err(RunError::Failed {
            error,
            offset,
            write,
        }),
        None => Ok(()),
    }
}

/// Submits what is queued and waits for at least one completion. `EINTR` is retried;
/// `EAGAIN`/`EBUSY` (the kernel is short of resources or the completion queue is full) are
/// retried a bounded number of times after a pause.
fn wait_one(ring: &mut IoUring) -> io::Result<()> {
    #[cfg(test)]
    if fault::FAIL_NEXT_WAIT.with(|f| f.replace(false)) {
        // As after a real failure mid-flight: the entries reach the kernel, the wait fails.
        ring.submit()?;
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    let mut busy = 0u32;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY))
                    && busy < MAX_AGAIN =>
            {
                // Completions may be ready already; the caller reaps them.
                if !ring.completion().is_empty() {
                    return Ok(());
                }
                busy += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `user_data` of the cancel entry, which no request of a batch can have (indices are small).
const CANCEL_TAG: u64 = u64::MAX;

/// Asks the kernel to cancel everything in flight on this ring (one entry matching any
/// request, Linux 5.19+), so the drain does not wait on requests that may never finish on
/// their own, such as a read of an empty pipe. Returns how many entries it queued (their
/// completions are drained with the rest). Cancelled requests complete with `ECANCELED`;
/// those already running complete normally. Older kernels reject the entry, which costs
/// nothing but the wait.
fn cancel_all(ring: &mut IoUring) -> u32 {
    let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any())
        .build()
        .user_data(CANCEL_TAG);
    // SAFETY: a cancel entry references no memory of ours; it names requests by the ring
    // they are in, and its own completion is reaped by the drain like any other.
    match unsafe { ring.submission().push(&entry) } {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

/// Takes every completion that is ready as `(user_data, result)`.
fn reap(ring: &mut IoUring) -> Vec<(u64, i32)> {
    ring.completion()
        .map(|c| (c.user_data(), c.result()))
        .collect()
}

/// Waits for `in_flight` completions so that no request outlives its buffer.
///
/// Bounded: every failed wait counts, and [`DRAIN_ATTEMPTS`] failures in a row without a
/// single completion mean the kernel cannot be asked any more. Returning then would free
/// buffers the kernel may still write to, so the process aborts instead.
fn drain(ring: &mut IoUring, mut in_flight: u32) {
    let mut failures = 0u32;
    while in_flight > 0 {
        let reaped = reap(ring).len() as u32;
        in_flight = in_flight.saturating_sub(reaped);
        if in_flight == 0 {
            return;
        }
        if reaped > 0 {
            failures = 0;
        }
        #[cfg(test)]
        let injected = fault::FAIL_DRAIN_WAITS.with(|n| {
            let left = n.get();
            n.set(left.saturating_sub(1));
            (left > 0).then(|| io::Error::from_raw_os_error(libc::EIO))
        });
        #[cfg(not(test))]
        let injected: Option<io::Error> = None;
        let waited = match injected {
            Some(e) => Err(e),
            None => ring.submit_and_wait(1),
        };
        match waited {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                failures += 1;
                if failures >= DRAIN_ATTEMPTS {
                    eprintln!(
                        "vdisk: io_uring: {in_flight} requests cannot be reaped ({e}); aborting \
                         rather than freeing memory the kernel may still use"
                    );
                    std::process::abort();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

#[cfg(test)]
impl RingPool {
    /// True when every idle ring has nothing queued and nothing waiting to be reaped.
    pub(super) fn all_idle_rings_empty(&self) -> bool {
        self.idle
            .lock()
            .iter_mut()
            .all(|ring| ring.submission().is_empty() && ring.completion().is_empty())
    }
}

/// Failure injection for the tests of the error paths, per thread.
#[cfg(test)]
pub(super) mod fault {
    use std::cell::Cell;

    thread_local! {
        /// Make the next wait of a batch fail after submitting, as a dying ring would.
        pub static FAIL_NEXT_WAIT: Cell<bool> = const { Cell::new(false) };
        /// Make this many waits of the drain fail.
        pub static FAIL_DRAIN_WAITS: Cell<u32> = const { Cell::new(0) };
    }
}
