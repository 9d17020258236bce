//! Test helpers every format crate reuses: a random-operation model checker, a small seeded
//! PRNG and self-cleaning temporary folders.
//!
//! [`ModelTest`] drives a device with random reads, writes (random sizes, unaligned offsets,
//! now and then large), write-zeroes in both modes, discards, flushes and block-status
//! queries from several threads at once, and compares every read with a [`MemImage`] model.
//!
//! How the run stays deterministic although threads race:
//! 1. **Own regions.** The device is cut into one region per thread; a thread changes and
//!    checks only its own region, so the expected contents never depend on scheduling. The
//!    threads still share the image's metadata (tables, allocation, locks), which is where
//!    format bugs under concurrency live.
//! 2. **Shared reads.** Once every thread is done changing, all threads read the whole disk
//!    at once, in differently sized pieces, and compare it with the model.
//! 3. **Final checks.** A full comparison and block-status invariants over the whole disk.
//!    With [`ModelTest::resize_steps`] the device is then resized and steps 1-3 run again at
//!    each new size. Last, optionally, the device is dropped, opened again through the
//!    factory, and compared again.
//!
//! Some reads go the split way a deep-queue caller takes: [`BlockDev::resolve_read`], then
//! the host ranges read straight from their files, zero ranges filled, indirect ranges read
//! through the image; the segments must cover the request exactly.
//!
//! Discard is advisory for most formats, so after a discard the thread reads the range back,
//! requires every byte to be either what it was or zero, and takes what it read into the
//! model ([`ModelTest::discard_zeroes`] demands zeroes instead).
//!
//! ```
//! use std::sync::Arc;
//! use vdisk_block::{testing::ModelTest, BlockDev, MemImage};
//!
//! let image: Arc<dyn BlockDev> = Arc::new(MemImage::new(8 << 20));
//! let report = ModelTest::new(8 << 20)
//!     .threads(2)
//!     .ops(200)
//!     .seed(7)
//!     .run(|| Ok(Arc::clone(&image)))
//!     .expect("the device behaves like the model");
//! assert!(report.writes > 0);
//! ```
#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::dev::{BlockDev, Preallocation, ReadSegment, ZeroMode};
use crate::mem::MemImage;

/// A small, fast, seeded PRNG (SplitMix64): the same seed gives the same run everywhere.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`0` when `bound` is 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            // The modulo bias is irrelevant for test inputs.
            self.next_u64() % bound
        }
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// A uniquely named folder under the system's temporary folder, removed with its contents
/// when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/vdisk-<label>-<pid>-<n>`.
    pub fn new(label: &str) -> std::io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("vdisk-{label}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the folder.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Best effort: a leftover folder in /tmp is not worth failing a test over.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What a [`ModelTest`] run did, for tests that want to be sure it exercised something.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelReport {
    /// Reads compared with the model (the shared-read phase included).
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Write-zeroes requests, both modes.
    pub zeroes: u64,
    /// Discards.
    pub discards: u64,
    /// Flushes.
    pub flushes: u64,
    /// Block-status extents checked.
    pub extents: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Bytes read and compared.
    pub bytes_read: u64,
    /// Times the device was opened through the factory.
    pub opens: u64,
}

impl ModelReport {
    fn add(&mut self, other: &ModelReport) {
        self.reads += other.reads;
        self.writes += other.writes;
        self.zeroes += other.zeroes;
        self.discards += other.discards;
        self.flushes += other.flushes;
        self.extents += other.extents;
        self.bytes_written += other.bytes_written;
        self.bytes_read += other.bytes_read;
        self.opens += other.opens;
    }
}

/// Why a [`ModelTest`] run failed: where and what, with the seed that reproduces it.
#[derive(Debug, Clone)]
pub struct ModelFailure {
    /// The seed of the run.
    pub seed: u64,
    /// The phase (`"ops"`, `"shared reads"`, `"final"`, `"reopen"`, ...).
    pub phase: &'static str,
    /// The thread, for per-thread phases.
    pub thread: Option<usize>,
    /// The operation's index within its thread, for the op phase.
    pub op_index: Option<usize>,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for ModelFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "model test (seed {}) failed in {}",
            self.seed, self.phase
        )?;
        if let Some(t) = self.thread {
            write!(f, ", thread {t}")?;
        }
        if let Some(i) = self.op_index {
            write!(f, ", op {i}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ModelFailure {}

/// A random-operation model test of a device; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ModelTest {
    size: u64,
    threads: usize,
    ops: usize,
    seed: u64,
    max_io: u64,
    large_io: u64,
    reopen: bool,
    discard_zeroes: bool,
    initial_zero: bool,
    shared_read_limit: u64,
    resizes: Vec<u64>,
}

/// One random operation.
#[derive(Debug, Clone, Copy)]
enum Op {
    Read,
    ResolvedRead,
    Write,
    Zeroes(ZeroMode),
    Discard,
    Flush,
    Status,
}

/// Biggest piece compared at once in whole-disk passes.
const PASS_CHUNK: u64 = 1 << 20;

/// Bound on extents walked for one block-status query; a device that returns more is
/// looping, not describing.
const MAX_EXTENTS: u64 = 1 << 20;

impl ModelTest {
    /// A test of a device of `size` bytes, with defaults: 4 threads, 500 ops per thread,
    /// seed 1, ordinary requests up to 64 KiB, large ones up to 4 MiB, no reopen.
    pub fn new(size: u64) -> Self {
        ModelTest {
            size,
            threads: 4,
            ops: 500,
            seed: 1,
            max_io: 64 << 10,
            large_io: 4 << 20,
            reopen: false,
            discard_zeroes: false,
            initial_zero: true,
            shared_read_limit: u64::MAX,
            resizes: Vec::new(),
        }
    }

    /// Number of threads working at once (at least 1).
    #[must_use]
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Random operations per thread.
    #[must_use]
    pub fn ops(mut self, ops: usize) -> Self {
        self.ops = ops;
        self
    }

    /// The seed; a failure names it so the run can be repeated.
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Largest ordinary request in bytes (at least 1).
    #[must_use]
    pub fn max_io(mut self, bytes: u64) -> Self {
        self.max_io = bytes.max(1);
        self
    }

    /// Largest of the occasional large requests in bytes (about 2% of requests).
    #[must_use]
    pub fn large_io(mut self, bytes: u64) -> Self {
        self.large_io = bytes.max(1);
        self
    }

    /// After the run, drop the device, open it again through the factory and compare again.
    #[must_use]
    pub fn reopen(mut self, reopen: bool) -> Self {
        self.reopen = reopen;
        self
    }

    /// Require discarded ranges to read as zeroes (by default each byte may also keep its
    /// old value, since discard is advisory).
    #[must_use]
    pub fn discard_zeroes(mut self, zeroes: bool) -> Self {
        self.discard_zeroes = zeroes;
        self
    }

    /// Require the freshly opened device to read as zeroes (the default). With `false` the
    /// model starts from whatever the device holds.
    #[must_use]
    pub fn initial_zero(mut self, zero: bool) -> Self {
        self.initial_zero = zero;
        self
    }

    /// Bytes each thread reads in the shared-read phase (by default the whole disk; lower it
    /// for big virtual sizes).
    #[must_use]
    pub fn shared_read_limit(mut self, bytes: u64) -> Self {
        self.shared_read_limit = bytes;
        self
    }

    /// After the first round, resize the device to each of `sizes` in turn (growing or
    /// shrinking, preallocation off) and run another round of operations and checks at each
    /// size: what was inside the new size must survive, and grown space must read as zeroes.
    #[must_use]
    pub fn resize_steps(mut self, sizes: &[u64]) -> Self {
        self.resizes = sizes.to_vec();
        self
    }

    /// Runs the test on the device `open` returns (called once, and again for the reopen).
    pub fn run<F>(&self, mut open: F) -> Result<ModelReport, ModelFailure>
    where
        F: FnMut() -> crate::Result<Arc<dyn BlockDev>>,
    {
        let fail = |phase, message: String| ModelFailure {
            seed: self.seed,
            phase,
            thread: None,
            op_index: None,
            message,
        };
        let threads = self.threads as u64;
        if let Some(&bad) = std::iter::once(&self.size)
            .chain(&self.resizes)
            .find(|&&size| size < threads)
        {
            return Err(fail(
                "setup",
                format!("{bad} bytes cannot be cut into {threads} regions"),
            ));
        }
        let check_size = |dev: &dyn BlockDev, phase, want: u64| {
            if dev.size() == want {
                Ok(())
            } else {
                Err(fail(
                    phase,
                    format!("device is {} bytes, expected {want}", dev.size()),
                ))
            }
        };
        let mut report = ModelReport::default();
        let dev = open().map_err(|e| fail("open", e.to_string()))?;
        report.opens += 1;
        check_size(&*dev, "open", self.size)?;
        let model = Arc::new(MemImage::new(self.size));
        if self.initial_zero {
            compare_all(&*dev, &model, &mut report).map_err(|m| fail("initial contents", m))?;
        } else {
            adopt_all(&*dev, &model).map_err(|m| fail("initial contents", m))?;
        }

        let mut size = self.size;
        for round in 0..=self.resizes.len() {
            if round > 0 {
                size = self.resizes[round - 1];
                dev.resize(size, Preallocation::Off)
                    .map_err(|e| fail("resize", format!("to {size}: {e}")))?;
                model
                    .resize(size, Preallocation::Off)
                    .map_err(|e| fail("resize", format!("model to {size}: {e}")))?;
                check_size(&*dev, "resize", size)?;
                compare_all(&*dev, &model, &mut report).map_err(|m| fail("after resize", m))?;
            }
            let seed = self.seed.wrapping_add(round as u64);
            self.op_phase(size, seed, &dev, &model, &mut report)?;
            self.shared_read_phase(size, seed, &dev, &model, &mut report)?;
            compare_all(&*dev, &model, &mut report).map_err(|m| fail("final comparison", m))?;
            check_status(&*dev, &model, 0, size, &mut report)
                .map_err(|m| fail("final block status", m))?;
        }
        dev.flush()
            .map_err(|e| fail("final flush", e.to_string()))?;
        report.flushes += 1;

        if self.reopen {
            drop(dev);
            let dev = open().map_err(|e| fail("reopen", e.to_string()))?;
            report.opens += 1;
            check_size(&*dev, "reopen", size)?;
            compare_all(&*dev, &model, &mut report).map_err(|m| fail("reopen", m))?;
            check_status(&*dev, &model, 0, size, &mut report)
                .map_err(|m| fail("reopen block status", m))?;
        }
        Ok(report)
    }

    fn region(&self, size: u64, thread: usize) -> (u64, u64) {
        let n = self.threads as u64;
        let t = thread as u64;
        // u128 keeps size * t from overflowing for huge virtual sizes.
        let cut = |i: u64| (size as u128 * i as u128 / n as u128) as u64;
        (cut(t), cut(t + 1))
    }

    fn op_phase(
        &self,
        size: u64,
        seed: u64,
        dev: &Arc<dyn BlockDev>,
        model: &Arc<MemImage>,
        report: &mut ModelReport,
    ) -> Result<(), ModelFailure> {
        let stop = AtomicBool::new(false);
        let failure: Mutex<Option<ModelFailure>> = Mutex::new(None);
        let totals: Mutex<ModelReport> = Mutex::new(ModelReport::default());
        std::thread::scope(|scope| {
            for thread in 0..self.threads {
                let (stop, failure, totals) = (&stop, &failure, &totals);
                scope.spawn(move || {
                    let mut worker = Worker {
                        test: self,
                        dev: &**dev,
                        model,
                        rng: Rng::new(mix(seed, thread as u64)),
                        region: self.region(size, thread),
                        report: ModelReport::default(),
                    };
                    for index in 0..self.ops {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Err(message) = worker.step() {
                            stop.store(true, Ordering::Relaxed);
                            let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                            slot.get_or_insert(ModelFailure {
                                seed: self.seed,
                                phase: "ops",
                                thread: Some(thread),
                                op_index: Some(index),
                                message,
                            });
                            break;
                        }
                    }
                    totals
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .add(&worker.report);
                });
            }
        });
        report.add(&totals.into_inner().unwrap_or_else(|p| p.into_inner()));
        match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    fn shared_read_phase(
        &self,
        size: u64,
        seed: u64,
        dev: &Arc<dyn BlockDev>,
        model: &Arc<MemImage>,
        report: &mut ModelReport,
    ) -> Result<(), ModelFailure> {
        let failure: Mutex<Option<ModelFailure>> = Mutex::new(None);
        let totals: Mutex<ModelReport> = Mutex::new(ModelReport::default());
        std::thread::scope(|scope| {
            for thread in 0..self.threads {
                let (failure, totals) = (&failure, &totals);
                scope.spawn(move || {
                    let mut rng = Rng::new(mix(seed ^ 0x5eed, thread as u64));
                    let mut local = ModelReport::default();
                    // Each thread starts somewhere else and wraps around, so the threads read
                    // different parts at any moment and together cover the disk many times.
                    let start = rng.below(size);
                    let total = size.min(self.shared_read_limit);
                    let mut done = 0u64;
                    while done < total {
                        let at = (start + done) % size;
                        let len = (1 + rng.below(self.max_io.max(PASS_CHUNK)))
                            .min(size - at)
                            .min(total - done);
                        if let Err(message) = compare_range(&**dev, model, at, len, &mut local) {
                            failure
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(ModelFailure {
                                    seed: self.seed,
                                    phase: "shared reads",
                                    thread: Some(thread),
                                    op_index: None,
                                    message,
                                });
                            break;
                        }
                        done += len;
                    }
                    totals.lock().unwrap_or_else(|p| p.into_inner()).add(&local);
                });
            }
        });
        report.add(&totals.into_inner().unwrap_or_else(|p| p.into_inner()));
        match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }
}

/// Derives a thread's seed so that threads of one run, and runs of nearby seeds, differ.
fn mix(seed: u64, thread: u64) -> u64 {
    Rng::new(seed ^ thread.wrapping_mul(0xd6e8_feb8_6659_fd93)).next_u64()
}

/// One thread of the op phase.
struct Worker<'a> {
    test: &'a ModelTest,
    dev: &'a dyn BlockDev,
    model: &'a MemImage,
    rng: Rng,
    region: (u64, u64),
    report: ModelReport,
}

impl Worker<'_> {
    fn pick_op(&mut self) -> Op {
        match self.rng.below(100) {
            0..=25 => Op::Read,
            26..=31 => Op::ResolvedRead,
            32..=66 => Op::Write,
            67..=74 => Op::Zeroes(ZeroMode::KeepAllocated),
            75..=82 => Op::Zeroes(ZeroMode::MayUnmap),
            83..=88 => Op::Discard,
            89..=91 => Op::Flush,
            _ => Op::Status,
        }
    }

    /// A random range inside the thread's region: unaligned, 512- or 4096-aligned, and now
    /// and then large.
    fn pick_range(&mut self) -> (u64, u64) {
        let (lo, hi) = self.region;
        let span = hi - lo;
        let large = self.rng.chance(2);
        let limit = if large {
            self.test.large_io
        } else {
            self.test.max_io
        }
        .min(span);
        let align = match self.rng.below(4) {
            0 | 1 => 1,
            2 => 512,
            _ => 4096,
        };
        let mut len = 1 + self.rng.below(limit);
        let mut offset = lo + self.rng.below(span - len + 1);
        if align > 1 && span >= 2 * align {
            // Round inward to the alignment where the region allows it.
            let start = offset.next_multiple_of(align);
            let aligned_len = (len / align).max(1) * align;
            if start + aligned_len <= hi {
                offset = start;
                len = aligned_len;
            }
        }
        (offset, len)
    }

    fn step(&mut self) -> Result<(), String> {
        let op = self.pick_op();
        match op {
            Op::Flush => {
                self.dev.flush().map_err(|e| format!("flush: {e}"))?;
                self.report.flushes += 1;
                return Ok(());
            }
            Op::Status => {
                let (offset, len) = self.pick_range();
                return check_status(self.dev, self.model, offset, len, &mut self.report);
            }
            _ => {}
        }
        let (offset, len) = self.pick_range();
        let what = |name: &str| format!("{name} {offset}+{len}");
        match op {
            Op::Read => compare_range(self.dev, self.model, offset, len, &mut self.report),
            Op::ResolvedRead => {
                compare_resolved(self.dev, self.model, offset, len, &mut self.report)
            }
            Op::Write => {
                let mut data = vec![0u8; len as usize];
                self.rng.fill(&mut data);
                self.dev
                    .write_at(&data, offset)
                    .map_err(|e| format!("{}: {e}", what("write")))?;
                self.model
                    .write_at(&data, offset)
                    .map_err(|e| format!("model {}: {e}", what("write")))?;
                self.report.writes += 1;
                self.report.bytes_written += len;
                // Read a piece back now and then, so a wrong write is caught next to its cause.
                if self.rng.chance(25) {
                    compare_range(self.dev, self.model, offset, len, &mut self.report)?;
                }
                Ok(())
            }
            Op::Zeroes(mode) => {
                self.dev
                    .write_zeroes(offset, len, mode)
                    .map_err(|e| format!("{} ({mode:?}): {e}", what("write zeroes")))?;
                self.model
                    .write_zeroes(offset, len, mode)
                    .map_err(|e| format!("model {}: {e}", what("write zeroes")))?;
                self.report.zeroes += 1;
                compare_range(self.dev, self.model, offset, len, &mut self.report)
            }
            Op::Discard => {
                self.dev
                    .discard(offset, len)
                    .map_err(|e| format!("{}: {e}", what("discard")))?;
                self.report.discards += 1;
                self.settle_discard(offset, len)
            }
            Op::Flush | Op::Status => Ok(()),
        }
    }

    /// After a discard each byte reads as before or as zero; the model takes what the
    /// device now says (or must say zero, when the test demands it).
    fn settle_discard(&mut self, offset: u64, len: u64) -> Result<(), String> {
        let mut got = vec![0u8; len as usize];
        let mut old = vec![0u8; len as usize];
        self.dev
            .read_at(&mut got, offset)
            .map_err(|e| format!("read after discard {offset}+{len}: {e}"))?;
        self.model
            .read_at(&mut old, offset)
            .map_err(|e| format!("model read {offset}+{len}: {e}"))?;
        self.report.reads += 1;
        self.report.bytes_read += len;
        let bad = got
            .iter()
            .zip(&old)
            .position(|(&g, &o)| g != 0 && (g != o || self.test.discard_zeroes));
        if let Some(i) = bad {
            return Err(format!(
                "after discard {offset}+{len}, byte {} reads {:#04x}; expected 0{}",
                offset + i as u64,
                got[i],
                if self.test.discard_zeroes {
                    String::new()
                } else {
                    format!(" or its old value {:#04x}", old[i])
                }
            ));
        }
        self.model
            .write_at(&got, offset)
            .map_err(|e| format!("model write {offset}+{len}: {e}"))
    }
}

/// Reads `offset..offset+len` from both and requires equal bytes.
fn compare_range(
    dev: &dyn BlockDev,
    model: &MemImage,
    offset: u64,
    len: u64,
    report: &mut ModelReport,
) -> Result<(), String> {
    let mut got = vec![0u8; len as usize];
    let mut want = vec![0u8; len as usize];
    dev.read_at(&mut got, offset)
        .map_err(|e| format!("read {offset}+{len}: {e}"))?;
    model
        .read_at(&mut want, offset)
        .map_err(|e| format!("model read {offset}+{len}: {e}"))?;
    report.reads += 1;
    report.bytes_read += len;
    match got.iter().zip(&want).position(|(g, w)| g != w) {
        None => Ok(()),
        Some(i) => {
            let run = got[i..]
                .iter()
                .zip(&want[i..])
                .take_while(|(g, w)| g != w)
                .count();
            Err(format!(
                "read {offset}+{len}: byte {} reads {:#04x}, model has {:#04x} ({run} differing bytes from there)",
                offset + i as u64,
                got[i],
                want[i]
            ))
        }
    }
}

/// Requires two devices to have the same size and the same contents, read in 1 MiB pieces;
/// the error names the first differing byte.
pub fn compare_devices(a: &dyn BlockDev, b: &dyn BlockDev) -> Result<(), String> {
    if a.size() != b.size() {
        return Err(format!("sizes differ: {} and {}", a.size(), b.size()));
    }
    let size = a.size();
    let mut at = 0;
    let mut left = vec![0u8; PASS_CHUNK.min(size) as usize];
    let mut right = left.clone();
    while at < size {
        let len = PASS_CHUNK.min(size - at) as usize;
        a.read_at(&mut left[..len], at)
            .map_err(|e| format!("read {at}+{len} of the first device: {e}"))?;
        b.read_at(&mut right[..len], at)
            .map_err(|e| format!("read {at}+{len} of the second device: {e}"))?;
        if let Some(i) = left[..len]
            .iter()
            .zip(&right[..len])
            .position(|(x, y)| x != y)
        {
            return Err(format!(
                "contents differ at byte {}: {:#04x} and {:#04x}",
                at + i as u64,
                left[i],
                right[i]
            ));
        }
        at += len as u64;
    }
    Ok(())
}

/// Walks [`BlockDev::block_status`] over `offset..offset+len` and checks what every device
/// must satisfy: each extent starts where the previous ended, is non-empty, stays inside the
/// query, and an extent marked zero reads as zeroes. Returns the number of extents.
pub fn check_block_status(dev: &dyn BlockDev, offset: u64, len: u64) -> Result<u64, String> {
    let mut report = ModelReport::default();
    // An empty model: the zero check then only asks the device itself.
    let model = MemImage::new(dev.size());
    check_status(dev, &model, offset, len, &mut report)?;
    Ok(report.extents)
}

/// Reads `offset..offset+len` the split way ([`BlockDev::resolve_read`], then each segment
/// by itself) and requires the model's bytes.
fn compare_resolved(
    dev: &dyn BlockDev,
    model: &MemImage,
    offset: u64,
    len: u64,
    report: &mut ModelReport,
) -> Result<(), String> {
    let segments = dev
        .resolve_read(offset, len)
        .map_err(|e| format!("resolve read {offset}+{len}: {e}"))?;
    let covered = segments
        .iter()
        .try_fold(0u64, |sum, seg| sum.checked_add(seg.len()));
    if covered != Some(len) || segments.iter().any(|seg| seg.is_empty()) {
        return Err(format!(
            "resolve read {offset}+{len}: segments cover {covered:?} bytes or include empty ones: {segments:?}"
        ));
    }
    let mut got = vec![0u8; len as usize];
    let mut pos = 0usize;
    for seg in &segments {
        let n = seg.len() as usize;
        let guest = offset + pos as u64;
        let piece = &mut got[pos..pos + n];
        match seg {
            ReadSegment::Host { file, offset, .. } => file
                .read_at(piece, *offset)
                .map_err(|e| format!("read host segment for guest {guest}+{n}: {e}"))?,
            ReadSegment::Zero { .. } => piece.fill(0),
            ReadSegment::Indirect { .. } => dev
                .read_at(piece, guest)
                .map_err(|e| format!("read indirect segment {guest}+{n}: {e}"))?,
        }
        pos += n;
    }
    let mut want = vec![0u8; len as usize];
    model
        .read_at(&mut want, offset)
        .map_err(|e| format!("model read {offset}+{len}: {e}"))?;
    report.reads += 1;
    report.bytes_read += len;
    match got.iter().zip(&want).position(|(g, w)| g != w) {
        None => Ok(()),
        Some(i) => Err(format!(
            "resolved read {offset}+{len}: byte {} reads {:#04x}, model has {:#04x}",
            offset + i as u64,
            got[i],
            want[i]
        )),
    }
}

fn compare_all(
    dev: &dyn BlockDev,
    model: &MemImage,
    report: &mut ModelReport,
) -> Result<(), String> {
    let size = model.size();
    let mut at = 0;
    while at < size {
        let len = PASS_CHUNK.min(size - at);
        compare_range(dev, model, at, len, report)?;
        at += len;
    }
    Ok(())
}

fn adopt_all(dev: &dyn BlockDev, model: &MemImage) -> Result<(), String> {
    let size = model.size();
    let mut at = 0;
    while at < size {
        let len = PASS_CHUNK.min(size - at);
        let mut buf = vec![0u8; len as usize];
        dev.read_at(&mut buf, at)
            .map_err(|e| format!("read {at}+{len}: {e}"))?;
        model
            .write_at(&buf, at)
            .map_err(|e| format!("model write {at}+{len}: {e}"))?;
        at += len;
    }
    Ok(())
}

/// Walks block status over `offset..offset+len`: extents must start where the previous one
/// ended, be non-empty, stay inside the range, and every extent marked zero must read as
/// zeroes from the device (and the model must agree).
fn check_status(
    dev: &dyn BlockDev,
    model: &MemImage,
    offset: u64,
    len: u64,
    report: &mut ModelReport,
) -> Result<(), String> {
    let end = offset + len;
    let mut at = offset;
    let mut walked = 0u64;
    while at < end {
        let st = dev
            .block_status(at, end - at)
            .map_err(|e| format!("block status {at}+{}: {e}", end - at))?;
        walked += 1;
        report.extents += 1;
        if st.offset != at {
            return Err(format!(
                "block status {at}+{}: extent starts at {}, not at the query offset",
                end - at,
                st.offset
            ));
        }
        if st.len == 0 || st.len > end - at {
            return Err(format!(
                "block status {at}+{}: extent length {} is empty or runs past the query",
                end - at,
                st.len
            ));
        }
        if st.zero {
            let mut pos = at;
            let stop = at + st.len;
            while pos < stop {
                let n = PASS_CHUNK.min(stop - pos);
                let mut buf = vec![0u8; n as usize];
                dev.read_at(&mut buf, pos)
                    .map_err(|e| format!("read {pos}+{n} of a zero extent: {e}"))?;
                report.reads += 1;
                report.bytes_read += n;
                if let Some(i) = buf.iter().position(|&b| b != 0) {
                    return Err(format!(
                        "block status calls {at}+{} zero, but byte {} reads {:#04x}",
                        st.len,
                        pos + i as u64,
                        buf[i]
                    ));
                }
                model
                    .read_at(&mut buf, pos)
                    .map_err(|e| format!("model read {pos}+{n}: {e}"))?;
                if let Some(i) = buf.iter().position(|&b| b != 0) {
                    return Err(format!(
                        "block status calls {at}+{} zero, but the model has {:#04x} at {}",
                        st.len,
                        buf[i],
                        pos + i as u64
                    ));
                }
                pos += n;
            }
        }
        if walked > MAX_EXTENTS {
            return Err(format!(
                "block status over {offset}+{len} gave more than {MAX_EXTENTS} extents"
            ));
        }
        at += st.len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::{BlockStatus, ImageInfo, Preallocation};
    use crate::Result;

    #[test]
    fn rng_is_deterministic_and_fills_odd_lengths() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        assert_eq!(a.next_u64(), b.next_u64());
        let mut x = [0u8; 13];
        let mut y = [0u8; 13];
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert!(x.iter().any(|&v| v != 0));
        assert!((0..1000).all(|_| a.below(7) < 7));
    }

    #[test]
    fn mem_image_passes_with_reopen() {
        let image: Arc<dyn BlockDev> = Arc::new(MemImage::new(4 << 20));
        let report = ModelTest::new(4 << 20)
            .threads(3)
            .ops(300)
            .seed(3)
            .discard_zeroes(true)
            .reopen(true)
            .run(|| Ok(Arc::clone(&image)))
            .expect("MemImage matches itself");
        assert_eq!(report.opens, 2);
        assert!(report.writes > 100 && report.zeroes > 10 && report.discards > 5);
        let resized: Arc<dyn BlockDev> = Arc::new(MemImage::new(1 << 20));
        ModelTest::new(1 << 20)
            .threads(2)
            .ops(100)
            .resize_steps(&[3 << 20, (1 << 20) + 7, 2 << 20])
            .reopen(true)
            .run(|| Ok(Arc::clone(&resized)))
            .expect("MemImage resizes like the model");
        assert_eq!(resized.size(), 2 << 20);
        assert!(report.extents > 0);
    }

    /// A device that corrupts one byte of every write that covers offset 1000.
    struct Flaky(MemImage);

    impl BlockDev for Flaky {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            let mut copy = buf.to_vec();
            if offset <= 1000 && 1000 < offset + buf.len() as u64 {
                copy[(1000 - offset) as usize] ^= 1;
            }
            self.0.write_at(&copy, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
            self.0.write_zeroes(offset, len, mode)
        }
        fn discard(&self, offset: u64, len: u64) -> Result<()> {
            self.0.discard(offset, len)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
            self.0.block_status(offset, len)
        }
        fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
            self.0.resize(new_size, prealloc)
        }
        fn info(&self) -> Result<ImageInfo> {
            self.0.info()
        }
        fn is_read_only(&self) -> bool {
            false
        }
    }

    #[test]
    fn a_corrupting_device_is_caught() {
        let image: Arc<dyn BlockDev> = Arc::new(Flaky(MemImage::new(64 << 10)));
        let failure = ModelTest::new(64 << 10)
            .threads(1)
            .ops(2000)
            .max_io(4096)
            .seed(9)
            .run(|| Ok(Arc::clone(&image)))
            .expect_err("the corrupted byte is noticed");
        assert!(failure.message.contains("1000"), "{failure}");
    }

    /// A device whose block status claims everything is zero.
    struct Liar(MemImage);

    impl BlockDev for Liar {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.0.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
            self.0.write_zeroes(offset, len, mode)
        }
        fn discard(&self, offset: u64, len: u64) -> Result<()> {
            self.0.discard(offset, len)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
            let mut st = self.0.block_status(offset, len)?;
            st.zero = true;
            st.data = false;
            Ok(st)
        }
        fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
            self.0.resize(new_size, prealloc)
        }
        fn info(&self) -> Result<ImageInfo> {
            self.0.info()
        }
        fn is_read_only(&self) -> bool {
            false
        }
    }

    #[test]
    fn block_status_that_lies_about_zeroes_is_caught() {
        let image: Arc<dyn BlockDev> = Arc::new(Liar(MemImage::new(1 << 20)));
        let failure = ModelTest::new(1 << 20)
            .threads(2)
            .ops(200)
            .run(|| Ok(Arc::clone(&image)))
            .expect_err("a zero extent holding data is noticed");
        assert!(failure.message.contains("zero"), "{failure}");
    }

    /// A device whose split read path says everything is zero.
    struct ZeroResolver(MemImage);

    impl BlockDev for ZeroResolver {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
            self.0.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
            self.0.write_zeroes(offset, len, mode)
        }
        fn discard(&self, offset: u64, len: u64) -> Result<()> {
            self.0.discard(offset, len)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
            self.0.block_status(offset, len)
        }
        fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()> {
            self.0.resize(new_size, prealloc)
        }
        fn info(&self) -> Result<ImageInfo> {
            self.0.info()
        }
        fn resolve_read(&self, _offset: u64, len: u64) -> Result<Vec<ReadSegment>> {
            Ok(vec![ReadSegment::Zero { len }])
        }
        fn is_read_only(&self) -> bool {
            false
        }
    }

    #[test]
    fn a_wrong_split_read_path_is_caught() {
        let image: Arc<dyn BlockDev> = Arc::new(ZeroResolver(MemImage::new(1 << 20)));
        let failure = ModelTest::new(1 << 20)
            .threads(2)
            .ops(300)
            .run(|| Ok(Arc::clone(&image)))
            .expect_err("zeroes instead of data are noticed");
        assert!(failure.message.contains("resolved read"), "{failure}");
    }

    #[test]
    fn device_helpers_find_differences() {
        let a = MemImage::from_bytes(&[1u8; 5000]);
        let b = MemImage::from_bytes(&[1u8; 5000]);
        compare_devices(&a, &b).expect("equal");
        b.write_at(&[2], 4321).expect("write");
        let err = compare_devices(&a, &b).expect_err("differ");
        assert!(err.contains("4321"), "{err}");
        assert!(compare_devices(&a, &MemImage::new(10)).is_err());
        assert!(check_block_status(&a, 0, 5000).expect("valid") >= 1);
        let liar = Liar(MemImage::from_bytes(&[3u8; 5000]));
        assert!(check_block_status(&liar, 0, 5000).is_err());
    }

    #[test]
    fn temp_dirs_are_unique_and_removed() {
        let a = TempDir::new("t").expect("tempdir");
        let b = TempDir::new("t").expect("tempdir");
        assert_ne!(a.path(), b.path());
        std::fs::write(a.join("f"), b"x").expect("write");
        let kept = a.path().to_path_buf();
        drop(a);
        assert!(!kept.exists());
    }
}
