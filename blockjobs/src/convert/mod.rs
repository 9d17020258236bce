//! The convert engine: copy one or more sources, concatenated, into a target.
//!
//! Format-independent: sources and target are `BlockDev`s. The copy is allocation-aware,
//! like qemu-img's:
//! 1. the sources' allocation map is walked once, streamed just ahead of the copy
//!    ([`plan`]); ranges known to read as zeroes are never read;
//! 2. zero ranges are skipped when the target already reads as zeroes (a new image with
//!    zero-init, or `--target-is-zero`), and otherwise become `write_zeroes`;
//! 3. data is read in chunks and scanned for zero runs of at least `min_sparse` bytes
//!    ([`zero`]), which are treated like zero ranges; the rest is written;
//! 4. `parallel` workers copy at once, each with one buffer, so memory stays at
//!    `parallel × chunk_size`; writes happen in target order unless `out_of_order`
//!    ([`order`]);
//! 5. with `-S 0` nothing is left to zero detection or holes: zero ranges are written as
//!    data, as qemu-img does; with a target backing file (`-B`) what the source's top layer
//!    does not hold is not written at all ([`plan::ChunkKind::Backing`]);
//! 6. the target is flushed once at the end (a no-op when it was opened with cache mode
//!    `unsafe`).
//!
//! A compressed copy (`-c`) plans whole target clusters over the concatenated sources
//! ([`concat`]), compresses each cluster of a chunk on the worker that read it, before the
//! chunk waits for its turn to write, so every core compresses while the writes keep
//! target order; clusters of zeroes are not written.

pub mod concat;
pub mod order;
pub mod plan;
pub mod zero;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use vdisk_block::{AlignedBuf, BlockDev, Error, Result, ZeroMode};

use order::WriteOrder;
use plan::{Chunk, ChunkKind, Planner};

/// Default size of one data chunk, as qemu-img's `IO_BUF_SIZE`.
pub const DEFAULT_CHUNK: usize = 2 << 20;

/// Largest chunk of a compressed copy (unless one compression unit is larger).
const COMPRESSED_CHUNK: usize = 256 << 10;

/// Default shortest zero run that becomes a hole (`-S 4k`).
pub const DEFAULT_MIN_SPARSE: u64 = 4096;

/// Largest `-S` qemu-img accepts.
pub const MAX_MIN_SPARSE: u64 = 16 << 20;

/// Default number of parallel requests (`-m 8`).
pub const DEFAULT_PARALLEL: usize = 8;

/// Most parallel requests we accept (qemu-img stops at 16).
pub const MAX_PARALLEL: usize = 64;

/// How to copy.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Shortest run of zero bytes in read data that becomes a hole (`-S`); 0 turns zero
    /// detection off and keeps the target fully allocated.
    pub min_sparse: u64,
    /// Workers copying at once (`-m`).
    pub parallel: usize,
    /// Let writes complete in any order (`-W`).
    pub out_of_order: bool,
    /// The target already reads as zeroes everywhere, so zero ranges need no write.
    pub target_is_zero: bool,
    /// Bytes per data chunk, rounded up to a power of two; also the largest zero run that
    /// zero detection needs to see to make a hole.
    pub chunk_size: usize,
    /// Write compressed clusters (`-c`) when the target takes them.
    pub compress: bool,
    /// The target has a backing file (`-B`, or an existing target's own with `-n`): only
    /// what the top layer of the source holds is copied, the rest is left to that file.
    pub target_has_backing: bool,
    /// With [`Self::target_has_backing`], the backing file's size when known (qemu-img
    /// knows it for a new target only): zero ranges at or past it are left unallocated.
    pub target_backing_size: Option<u64>,
    /// Read errors of the sources do not stop the copy (`--salvage`): a failed read is
    /// retried sector by sector, and each sector that still fails is written as zeroes
    /// and reported through [`Progress::salvaged`].
    pub salvage: bool,
    /// Bytes per second the data copies may go at (`-r`); `None` or 0: no limit.
    pub rate: Option<u64>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            min_sparse: DEFAULT_MIN_SPARSE,
            parallel: DEFAULT_PARALLEL,
            out_of_order: false,
            target_is_zero: false,
            chunk_size: DEFAULT_CHUNK,
            compress: false,
            target_has_backing: false,
            target_backing_size: None,
            salvage: false,
            rate: None,
        }
    }
}

impl ConvertOptions {
    /// Checks `-S` as qemu-img does: a multiple of 512 up to 16 MiB.
    pub fn check_min_sparse(value: u64) -> Result<()> {
        if !value.is_multiple_of(512) || value > MAX_MIN_SPARSE {
            return Err(Error::invalid(
                "convert",
                format!(
                    "Invalid buffer size for sparse output specified. Valid sizes are multiples \
                     of 512 up to {MAX_MIN_SPARSE}. Select 0 to disable sparse detection (fully \
                     allocates output)."
                ),
            ));
        }
        Ok(())
    }
}

/// Receives progress as the copy advances; called from several workers at once.
pub trait Progress: Sync {
    /// `bytes` more of the guest range are done.
    fn advance(&self, bytes: u64);

    /// True when the job should count first what [`Progress::advance`] will add up to and
    /// pass it to [`Progress::set_total`] (a walk over the allocation map, as qemu-img
    /// makes for its progress).
    fn wants_total(&self) -> bool {
        false
    }

    /// What the calls to [`Progress::advance`] will add up to.
    fn set_total(&self, total: u64) {
        let _ = total;
    }

    /// With [`ConvertOptions::salvage`]: the 512-byte sector at guest `offset` (of the
    /// sources, concatenated) could not be read and is written as zeroes.
    fn salvaged(&self, offset: u64, err: &Error) {
        let _ = (offset, err);
    }
}

/// Progress that nobody watches.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn advance(&self, _bytes: u64) {}
}

/// What a copy did, for diagnostics and the benchmark.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConvertStats {
    /// Guest bytes covered (the sum of the sources' sizes).
    pub total: u64,
    /// Bytes read from the sources.
    pub read: u64,
    /// Bytes written to the target as data.
    pub written: u64,
    /// Bytes turned into `write_zeroes` on the target.
    pub zeroed: u64,
    /// Zero bytes that needed no write at all.
    pub skipped: u64,
}

#[derive(Default)]
struct Counters {
    read: AtomicU64,
    written: AtomicU64,
    zeroed: AtomicU64,
    skipped: AtomicU64,
}

/// The size of the sources concatenated, each padded to whole sectors as qemu-img does
/// (see [`plan`]); the size a new target needs.
pub fn total_size(sources: &[Arc<dyn BlockDev>]) -> Result<u64> {
    sources
        .iter()
        .try_fold(0u64, |acc, s| {
            acc.checked_add(plan::padded_size(s.as_ref()))
        })
        .ok_or_else(|| Error::invalid("convert", "the sources' sizes add up past 2^64 bytes"))
}

/// Checks that `target` can take the sources and returns [`total_size`].
///
/// The target counts as padded to whole sectors too, as qemu-img sees it; it must hold every
/// byte of the sources, while the zero padding after the last one may fall past its end.
pub fn check_target_size(sources: &[Arc<dyn BlockDev>], target: &dyn BlockDev) -> Result<u64> {
    let total = total_size(sources)?;
    let last_padding = sources
        .last()
        .map_or(0, |s| plan::padded_size(s.as_ref()) - s.size());
    if plan::padded_size(target) < total || target.size() < total - last_padding {
        return Err(Error::invalid(
            "convert",
            "output file is smaller than input file",
        ));
    }
    Ok(total)
}

/// Copies `sources`, concatenated, to the start of `target`, then flushes the target once.
///
/// The target must pass [`check_target_size`].
pub fn convert(
    sources: &[Arc<dyn BlockDev>],
    target: &dyn BlockDev,
    options: &ConvertOptions,
    progress: &dyn Progress,
) -> Result<ConvertStats> {
    let total = check_target_size(sources, target)?;
    if options.min_sparse != 0 {
        ConvertOptions::check_min_sparse(options.min_sparse)?;
    }
    // A chunk is the largest unit zero detection sees, as qemu-img's buffer is; -S above the
    // chunk size does not grow it (that would allocate far more than qemu-img does).
    let target_alignment = target.request_alignment().max(1) as usize;
    let chunk_size = options.chunk_size.max(target_alignment).next_power_of_two();
    let granularity = granularity(options.min_sparse, target_alignment as u64);
    let workers = options.parallel.clamp(1, MAX_PARALLEL);
    // A target that compresses every write (VMDK streamOptimized) takes the compressed path
    // without -c too: otherwise it would compress each chunk during its turn, on one core.
    let unit = (options.compress || target.compresses_every_write())
        .then(|| target.compressed_unit())
        .flatten()
        .filter(|u| u.is_power_of_two());
    // Compressing every unit is CPU work: a worker per core (and one to cover the waits for
    // a turn to write) keeps the cores busy, and each further worker only holds memory
    // (its buffers and deflate state); qemu-img compresses on at most four threads.
    let workers = match unit {
        Some(_) => workers.min(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                + 1,
        ),
        None => workers,
    };
    let concatenated: Vec<Arc<dyn BlockDev>> = match unit {
        Some(_) => vec![Arc::new(concat::Concat::new(sources)?)],
        None => Vec::new(),
    };
    // A compressed copy is CPU-bound: a chunk only has to be long enough to amortise the
    // planner, and each worker holds its chunk twice (read and compressed), so chunks of a
    // few clusters keep peak memory near qemu-img's (which compresses cluster by cluster).
    let chunk_size = match unit {
        // A stream target's grains are small: one per chunk keeps the workers' buffers at
        // a grain each, and a grain is already milliseconds of deflate.
        Some(u) if target.compresses_every_write() => u as usize,
        Some(u) => chunk_size.min(COMPRESSED_CHUNK).max(u as usize),
        None => chunk_size,
    };
    let plan_sources = match unit {
        Some(_) => &concatenated[..],
        None => sources,
    };
    let new_planner = || {
        let planner = match unit {
            Some(u) => Planner::aligned(plan_sources, chunk_size as u64, u),
            None => Planner::new(plan_sources, chunk_size as u64),
        };
        match options.target_has_backing {
            true => planner.with_target_backing(options.target_backing_size),
            false => planner,
        }
    };
    if progress.wants_total() {
        // As qemu-img: progress counts the ranges that are copied as data, so a first walk
        // over the map adds them up.
        let mut counting = new_planner();
        let mut counted = 0u64;
        while let Some(chunk) = counting.next_chunk()? {
            if counts_for_progress(chunk.kind, options) {
                counted += chunk.len;
            }
        }
        progress.set_total(counted);
    }
    let planner = new_planner();
    let job = Job {
        sources: plan_sources,
        target,
        options,
        progress,
        granularity,
        chunk_size,
        unit,
        planner: Mutex::new(planner),
        order: WriteOrder::new(!options.out_of_order, workers),
        error: Mutex::new(None),
        counters: Counters::default(),
        rate: crate::rate::RateLimit::new(options.rate),
        source_clusters: plan_sources
            .iter()
            .map(|s| s.info().ok().and_then(|i| i.cluster_size))
            .collect(),
    };
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                // A panicking worker (a bug, or a panicking dependency) must not leave the
                // others waiting forever for its turn to write: release them, so the scope
                // ends and re-raises the panic instead of hanging.
                let _release = AbortOnUnwind(&job.order);
                job.work();
            });
        }
    });
    if let Some(err) = job.error.into_inner() {
        return Err(err);
    }
    if unit.is_some() {
        target.write_compressed_unit(&[], None, 0)?;
    }
    target.flush()?;
    let c = &job.counters;
    Ok(ConvertStats {
        total,
        read: c.read.load(Ordering::Relaxed),
        written: c.written.load(Ordering::Relaxed),
        zeroed: c.zeroed.load(Ordering::Relaxed),
        skipped: c.skipped.load(Ordering::Relaxed),
    })
}

/// The alignment zero detection keeps holes to, as qemu-img computes it: the largest power of
/// two not above `-S`, but never below what the target needs to avoid read-modify-write.
fn granularity(min_sparse: u64, target_alignment: u64) -> usize {
    let sparse = if min_sparse == 0 {
        512
    } else {
        1u64 << (63 - min_sparse.leading_zeros())
    };
    sparse.max(target_alignment).max(512) as usize
}

/// Whether a chunk counts for progress: what qemu-img copies as data (zero ranges too with
/// `-S 0`); ranges left to zero-init or a backing file do not.
fn counts_for_progress(kind: ChunkKind, options: &ConvertOptions) -> bool {
    match kind {
        ChunkKind::Data => true,
        ChunkKind::Zero => options.min_sparse == 0,
        ChunkKind::Backing => false,
    }
}

/// The unit `--salvage` retries a failed read in, as qemu-img does.
const SALVAGE_SECTOR: usize = 512;

/// A failed source read as the convert reports it: op `read` at guest `offset` (of the
/// sources concatenated), with the driver's error kept as its cause.
fn read_failure(err: Error, offset: u64) -> Error {
    Error::new(err.kind(), "read", err.to_string())
        .at_offset(offset)
        .with_source(err)
}

/// Where in `data` (read from `src_offset`) the first source cluster lies that cannot be
/// read, reading cluster by cluster; `None` when every piece reads on its own.
fn first_failing_cluster(source: &dyn BlockDev, data: &mut [u8], src_offset: u64) -> Option<u64> {
    let cluster = source
        .info()
        .ok()
        .and_then(|info| info.cluster_size)
        .filter(|&c| c >= SALVAGE_SECTOR as u64)?;
    let end = src_offset + data.len() as u64;
    let mut at = src_offset;
    while at < end {
        let next = (at / cluster + 1).saturating_mul(cluster).min(end);
        let piece = data.get_mut((at - src_offset) as usize..(next - src_offset) as usize)?;
        if source.read_at(piece, at).is_err() {
            return Some(at - src_offset);
        }
        at = next;
    }
    None
}

/// Aborts the in-order writes if dropped while its thread unwinds.
struct AbortOnUnwind<'a>(&'a WriteOrder);

impl Drop for AbortOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort();
        }
    }
}

/// State shared by the workers of one copy.
struct Job<'a> {
    sources: &'a [Arc<dyn BlockDev>],
    target: &'a dyn BlockDev,
    options: &'a ConvertOptions,
    progress: &'a dyn Progress,
    granularity: usize,
    chunk_size: usize,
    /// The target's compression unit, for a compressed copy.
    unit: Option<u64>,
    planner: Mutex<Planner<'a>>,
    order: WriteOrder,
    error: Mutex<Option<Error>>,
    counters: Counters,
    rate: Option<crate::rate::RateLimit>,
    /// Each source's cluster size, which cuts the progress of its compressed data.
    source_clusters: Vec<Option<u64>>,
}

impl Job<'_> {
    /// One worker: take chunks until none are left or the copy failed.
    fn work(&self) {
        // Aligned for O_DIRECT targets and sources; the one allocation of this worker.
        let mut buf = AlignedBuf::zeroed(self.chunk_size, 4096);
        loop {
            if self.order.aborted() {
                return;
            }
            let next = self.planner.lock().next_chunk();
            let chunk = match next {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return,
                Err(e) => return self.fail(e),
            };
            if let Err(e) = self.copy(&chunk, buf.as_mut_slice()) {
                return self.fail(e);
            }
        }
    }

    fn fail(&self, err: Error) {
        let mut slot = self.error.lock();
        if slot.is_none() {
            *slot = Some(err);
        }
        drop(slot);
        self.order.abort();
    }

    fn copy(&self, chunk: &Chunk, buf: &mut [u8]) -> Result<()> {
        let len = chunk.len as usize;
        let source = self.sources.get(chunk.source).ok_or_else(|| {
            Error::invalid("convert", "planner produced a chunk of an unknown source")
        })?;
        match chunk.kind {
            ChunkKind::Backing => {
                if !self.order.wait_turn(chunk.seq) {
                    return Ok(());
                }
                self.counters
                    .skipped
                    .fetch_add(chunk.len, Ordering::Relaxed);
            }
            // qemu-img -S 0 writes zero ranges as data too (even onto a target known to
            // read as zeroes, and compressed with -c): every cluster ends up allocated.
            ChunkKind::Zero if self.options.min_sparse == 0 => {
                let piece = (self.chunk_size as u64).min(chunk.len) as usize;
                let zeroes = buf.get_mut(..piece).ok_or_else(|| {
                    Error::invalid("convert", "chunk larger than the worker's buffer")
                })?;
                zeroes.fill(0);
                // Every whole piece compresses the same: do it once, before the turn.
                let packed = match self.unit {
                    Some(unit) => Some(self.compress_units(zeroes, unit)?),
                    None => None,
                };
                if !self.order.wait_turn(chunk.seq) {
                    return Ok(());
                }
                let mut at = chunk.dst_offset;
                let end = chunk.dst_offset + chunk.len;
                while at < end {
                    let step = (piece as u64).min(end - at);
                    // Sector padding past the end of an unaligned target has nowhere to go.
                    let n = step.min(self.target.size().saturating_sub(at)) as usize;
                    match (self.unit, &packed) {
                        _ if n == 0 => {}
                        (Some(unit), Some(p)) if n == piece => {
                            self.write_units(zeroes, unit, at, p)?
                        }
                        (Some(unit), _) => {
                            let p = self.compress_units(&zeroes[..n], unit)?;
                            self.write_units(&zeroes[..n], unit, at, &p)?
                        }
                        (None, _) => self.write_data(&zeroes[..n], at)?,
                    }
                    // Progress goes piece by piece, as qemu-img cuts these ranges.
                    self.advance_span(chunk, at, step);
                    at += step;
                }
                self.order.done(chunk.seq);
                return Ok(());
            }
            ChunkKind::Zero => {
                if !self.order.wait_turn(chunk.seq) {
                    return Ok(());
                }
                self.zero(chunk.dst_offset, chunk.len)?;
            }
            ChunkKind::Data => {
                let data = buf.get_mut(..len).ok_or_else(|| {
                    Error::invalid("convert", "chunk larger than the worker's buffer")
                })?;
                if let Some(rate) = &self.rate {
                    rate.admit(chunk.len);
                }
                self.read_source(source.as_ref(), data, chunk)?;
                self.counters.read.fetch_add(chunk.len, Ordering::Relaxed);
                if let Some(unit) = self.unit {
                    let packed = self.compress_units(data, unit)?;
                    if !self.order.wait_turn(chunk.seq) {
                        return Ok(());
                    }
                    self.write_units(data, unit, chunk.dst_offset, &packed)?;
                } else {
                    if !self.order.wait_turn(chunk.seq) {
                        return Ok(());
                    }
                    self.write_data(data, chunk.dst_offset)?;
                }
            }
        }
        // Before the next chunk may write, so the running total grows in target order and
        // the percentages shown do not depend on thread timing.
        if counts_for_progress(chunk.kind, self.options) {
            self.advance_progress(chunk);
        }
        self.order.done(chunk.seq);
        Ok(())
    }

    /// Adds `chunk` to the progress in the pieces qemu-img copies it in, so the same
    /// percentages come out: a compressed copy a target cluster at a time (qemu writes each
    /// alone), compressed source data a source cluster at a time (each its own
    /// block-status extent in qemu).
    fn advance_progress(&self, chunk: &Chunk) {
        self.advance_span(chunk, chunk.dst_offset, chunk.len);
    }

    /// [`Job::advance_progress`] for the `len` bytes of `chunk` at target offset `dst`.
    fn advance_span(&self, chunk: &Chunk, dst: u64, len: u64) {
        let (cluster, start) = match (self.unit, chunk.compressed) {
            (Some(unit), _) => (Some(unit), dst),
            (None, true) => (
                self.source_clusters.get(chunk.source).copied().flatten(),
                chunk.src_offset + (dst - chunk.dst_offset),
            ),
            (None, false) => (None, 0),
        };
        let Some(cluster) = cluster.filter(|&c| c > 0) else {
            self.progress.advance(len);
            return;
        };
        let end = start + len;
        let mut at = start;
        while at < end {
            let next = (at / cluster + 1).saturating_mul(cluster).min(end);
            self.progress.advance(next - at);
            at = next;
        }
    }

    /// Reads a data chunk. A failure names the guest offset of the sources concatenated
    /// (the target offset) of the first source cluster that cannot be read, which is
    /// where qemu-img's per-cluster requests of a compressed image fail; with `--salvage`
    /// the chunk is read again sector by sector and unreadable sectors become zeroes.
    fn read_source(&self, source: &dyn BlockDev, data: &mut [u8], chunk: &Chunk) -> Result<()> {
        let Err(err) = source.read_at(data, chunk.src_offset) else {
            return Ok(());
        };
        if !self.options.salvage {
            let at = first_failing_cluster(source, data, chunk.src_offset).unwrap_or(0);
            return Err(read_failure(err, chunk.dst_offset + at));
        }
        for (i, sector) in data.chunks_mut(SALVAGE_SECTOR).enumerate() {
            let at = (i * SALVAGE_SECTOR) as u64;
            if let Err(err) = source.read_at(sector, chunk.src_offset + at) {
                sector.fill(0);
                self.progress.salvaged(chunk.dst_offset + at, &err);
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset`, turning long zero runs into holes (unless `-S 0`).
    fn write_data(&self, data: &[u8], offset: u64) -> Result<()> {
        if self.options.min_sparse == 0 {
            self.target.write_at(data, offset)?;
            self.counters
                .written
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        zero::for_each_run(
            data,
            offset,
            self.granularity,
            self.options.min_sparse as usize,
            |run| {
                let at = offset + run.start as u64;
                if run.data {
                    self.target
                        .write_at(&data[run.start..run.start + run.len], at)?;
                    self.counters
                        .written
                        .fetch_add(run.len as u64, Ordering::Relaxed);
                    Ok(())
                } else {
                    self.zero(at, run.len as u64)
                }
            },
        )
    }

    /// Compresses each unit of `data`: `None` for a unit of zeroes that needs no data
    /// write (unless `-S 0` keeps everything allocated), else what the target will store.
    #[allow(clippy::type_complexity)]
    fn compress_units(&self, data: &[u8], unit: u64) -> Result<Vec<Option<Option<Vec<u8>>>>> {
        data.chunks(unit as usize)
            .map(|piece| {
                if self.options.min_sparse != 0 && zero::is_zero(piece) {
                    Ok(None)
                } else {
                    self.target.compress_unit(piece).map(Some)
                }
            })
            .collect()
    }

    /// Writes the units [`Self::compress_units`] prepared, in order.
    fn write_units(
        &self,
        data: &[u8],
        unit: u64,
        offset: u64,
        packed: &[Option<Option<Vec<u8>>>],
    ) -> Result<()> {
        for (i, (piece, prepared)) in data.chunks(unit as usize).zip(packed).enumerate() {
            let at = offset + i as u64 * unit;
            // The sector padding of the last source has nowhere to go past the target.
            let len = (piece.len() as u64).min(self.target.size().saturating_sub(at)) as usize;
            if len == 0 {
                continue;
            }
            match prepared {
                None => self.zero(at, len as u64)?,
                Some(p) => {
                    self.target
                        .write_compressed_unit(&piece[..len], p.as_deref(), at)?;
                    self.counters
                        .written
                        .fetch_add(len as u64, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Makes a target range read as zeroes, doing nothing when it already does.
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        // Sector padding past the end of an unaligned target has nowhere to go.
        let len = len.min(self.target.size().saturating_sub(offset));
        if len == 0 {
            return Ok(());
        }
        if self.options.target_is_zero {
            self.counters.skipped.fetch_add(len, Ordering::Relaxed);
            return Ok(());
        }
        // Only reached with zero detection on (-S 0 writes zeroes as data), so holes may
        // be punched.
        self.target.write_zeroes(offset, len, ZeroMode::MayUnmap)?;
        self.counters.zeroed.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
