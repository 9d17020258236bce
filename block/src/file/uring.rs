//! The io_uring data engine: a pool of rings, each used by one thread at a time.
//!
//! A batch is pushed into one ring with at most [`RING_DEPTH`] requests in flight; as
//! completions arrive the rest of the batch is pushed, so deep batches never overflow the
//! submission queue. Short transfers are resubmitted for their remainder.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};
use parking_lot::Mutex;

use super::IoOp;

/// Requests in flight per ring.
pub const RING_DEPTH: u32 = 64;

/// Rings kept for reuse; more are created while many threads submit at once.
const POOL_KEEP: usize = 8;

/// Largest single transfer the kernel takes in one SQE (`u32` length).
const MAX_TRANSFER: usize = 1 << 30;

/// A pool of rings for one file.
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
}

impl RingPool {
    /// Creates the pool, proving the kernel accepts io_uring by building and using one ring.
    pub fn new(file: &File) -> io::Result<Self> {
        let mut ring = IoUring::new(RING_DEPTH)?;
        // A NOP round trip: some sandboxes allow io_uring_setup but block io_uring_enter.
        let nop = opcode::Nop::new().build().user_data(0);
        // SAFETY: a NOP references no memory.
        unsafe { ring.submission().push(&nop) }
            .map_err(|_| io::Error::other("submission queue full"))?;
        ring.submit_and_wait(1)?;
        ring.completion().for_each(drop);
        let _ = file.as_raw_fd();
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

    /// Runs every request to completion. On failure returns the error and the offset of the
    /// request that failed; the other requests have completed or been drained by then.
    pub fn run(&self, file: &File, ops: Vec<&mut IoOp<'_>>) -> Result<(), (io::Error, u64)> {
        let mut ring = self.take().map_err(|e| (e, 0))?;
        let result = Self::run_on(&mut ring, file, ops);
        // A ring whose requests were all reaped can be reused; after an error we drained it too.
        self.give_back(ring);
        result
    }

    fn run_on(
        ring: &mut IoUring,
        file: &File,
        ops: Vec<&mut IoOp<'_>>,
    ) -> Result<(), (io::Error, u64)> {
        let fd = types::Fd(file.as_raw_fd());
        let mut pending: Vec<Pending> = ops
            .into_iter()
            .map(|op| match op {
                IoOp::Read { buf, offset } => Pending {
                    ptr: buf.as_mut_ptr(),
                    len: buf.len(),
                    offset: *offset,
                    done: 0,
                    write: false,
                },
                IoOp::Write { buf, offset } => Pending {
                    ptr: buf.as_ptr().cast_mut(),
                    len: buf.len(),
                    offset: *offset,
                    done: 0,
                    write: true,
                },
            })
            .collect();
        // Indices of requests that still need (part of) their transfer submitted.
        let mut queue: std::collections::VecDeque<usize> =
            (0..pending.len()).filter(|&i| pending[i].len > 0).collect();
        let mut in_flight = 0u32;
        let mut first_error: Option<(io::Error, u64)> = None;

        while !queue.is_empty() || in_flight > 0 {
            while in_flight < RING_DEPTH && first_error.is_none() {
                let Some(index) = queue.pop_front() else {
                    break;
                };
                let p = &pending[index];
                let remaining = (p.len - p.done).min(MAX_TRANSFER);
                // SAFETY: `p.ptr + p.done` stays inside the caller's buffer, which outlives
                // this call; we wait for every submitted request before returning, so the
                // kernel never touches the buffer after the borrow ends.
                let at = unsafe { p.ptr.add(p.done) };
                let entry = if p.write {
                    opcode::Write::new(fd, at.cast_const(), remaining as u32)
                        .offset(p.offset + p.done as u64)
                        .build()
                } else {
                    opcode::Read::new(fd, at, remaining as u32)
                        .offset(p.offset + p.done as u64)
                        .build()
                }
                .user_data(index as u64);
                // SAFETY: the entry points at memory that stays valid until its completion is
                // reaped below (see above).
                if unsafe { ring.submission().push(&entry) }.is_err() {
                    queue.push_front(index);
                    break;
                }
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // The kernel may still own buffers: drain before giving up.
                    Self::drain(ring, in_flight);
                    return Err((e, 0));
                }
            }
            let completions: Vec<(u64, i32)> = ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (user, res) in completions {
                in_flight -= 1;
                let index = user as usize;
                let p = &mut pending[index];
                if res < 0 {
                    let err = io::Error::from_raw_os_error(-res);
                    if err.kind() == io::ErrorKind::Interrupted || res == -libc::EAGAIN {
                        queue.push_back(index);
                    } else if first_error.is_none() {
                        first_error = Some((err, p.offset + p.done as u64));
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
                        first_error = Some((err, p.offset + p.done as u64));
                    }
                } else {
                    p.done += res as usize;
                    if p.done < p.len {
                        queue.push_back(index);
                    }
                }
            }
            if first_error.is_some() {
                queue.clear();
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits for `in_flight` completions so no request outlives its buffer.
    fn drain(ring: &mut IoUring, mut in_flight: u32) {
        while in_flight > 0 {
            if ring.submit_and_wait(1).is_err() {
                // Nothing more can be learnt; the ring is dropped with the pool entry.
                std::thread::yield_now();
            }
            in_flight -= ring.completion().count() as u32;
        }
    }
}

// SAFETY: the raw pointers inside `Pending` never leave `run_on`; a ring is used by one thread
// at a time (taken out of the mutex-protected pool).
unsafe impl Send for RingPool {}
// SAFETY: shared access only goes through the mutex.
unsafe impl Sync for RingPool {}
