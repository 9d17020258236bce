//! Offline commit: copy what the top of a backing chain (and every image between it and the
//! base) holds into the base, as `qemu-img commit` does through QEMU's active commit job.
//!
//! The copy follows the mirror job that QEMU runs for it, so the base ends up laid out as
//! QEMU would lay it out:
//! 1. every range allocated above the base is marked dirty, rounded out to the job's
//!    granularity (the base's cluster size, kept between 4 KiB and 64 KiB; 64 KiB when the
//!    base has no clusters);
//! 2. the dirty runs are processed in guest order, one request at a time: a range that holds
//!    data somewhere in the chain is read through the top and written to the base (at most
//!    1 MiB a request); a range that reads as zeroes and covers whole granules and whole base
//!    clusters becomes a write-zeroes that may unmap, and one that nothing in the chain
//!    holds becomes a discard;
//! 3. a base shorter than the top grows first; the base is flushed at the end.
//!
//! The base must be the very device the top reads through (see [`WritableBase`]), so reads
//! of ranges the job has already written never go through a second, stale view of it.
//! Emptying the top afterwards is [`empty`]'s job.

pub mod empty;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use vdisk_block::format::ImageOpener;
use vdisk_block::{AlignedBuf, BlockDev, Error, OpenOptions, Preallocation, Result, ZeroMode};

use crate::convert::Progress;
use crate::map::chain_status;

/// The largest request of the copy, as QEMU's mirror job (`MAX_IO_BYTES`).
pub const MAX_IO_BYTES: u64 = 1 << 20;

/// The smallest and largest granularity QEMU picks for the job's dirty bitmap.
const MIN_GRANULARITY: u64 = 4096;
const MAX_GRANULARITY: u64 = 65536;

/// How to run the copy.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// Bytes per second of copied data (`-r`); 0 or `None`: as fast as possible.
    pub rate: Option<u64>,
}

/// What the copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Bytes marked dirty (the job's total).
    pub dirty: u64,
    /// Bytes read from the chain and written to the base.
    pub copied: u64,
    /// Bytes made zero in the base.
    pub zeroed: u64,
    /// Bytes discarded in the base.
    pub discarded: u64,
}

/// Which image of the chain a commit goes into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRef {
    /// Layers between the top and the base, plus one (1: the top's own backing file).
    pub depth: usize,
    /// The base's file as the chain opened it.
    pub path: PathBuf,
    /// The base's format.
    pub format: String,
}

/// Why no base was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseLookupError {
    /// The top has no backing file.
    NoBackingFile,
    /// No image of the chain is the named one.
    NotInChain,
    /// A layer could not describe itself.
    Info(String),
}

/// Finds the base of a commit of `top`: its backing file when `name` is `None`, else the
/// image of its backing chain that `name` names. As QEMU does, `name` is resolved against
/// the folder of each image in turn and compared, both canonicalised, with that image's
/// backing file (so the top itself is never a base).
pub fn find_base(
    top: &Arc<dyn BlockDev>,
    name: Option<&str>,
) -> std::result::Result<BaseRef, BaseLookupError> {
    let info_err = |e: Error| BaseLookupError::Info(e.to_string());
    let mut layer = Arc::clone(top);
    let mut depth = 0;
    loop {
        let Some(backing) = layer.backing() else {
            return Err(if depth == 0 {
                BaseLookupError::NoBackingFile
            } else {
                BaseLookupError::NotInChain
            });
        };
        depth += 1;
        let info = layer.info().map_err(info_err)?;
        let binfo = backing.info().map_err(info_err)?;
        let found = match name {
            None => true,
            Some(name) => {
                let folder = info
                    .filename
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                let candidate = if Path::new(name).is_absolute() {
                    PathBuf::from(name)
                } else {
                    folder.join(name)
                };
                let full = info
                    .full_backing_filename
                    .clone()
                    .unwrap_or_else(|| binfo.filename.clone());
                match (candidate.canonicalize(), full.canonicalize()) {
                    (Ok(a), Ok(b)) => a == b,
                    _ => false,
                }
            }
        };
        if found {
            return Ok(BaseRef {
                depth,
                path: binfo.filename,
                format: binfo.format,
            });
        }
        layer = backing;
    }
}

/// An [`ImageOpener`] that opens one file of a chain, the commit's base, for writing (once;
/// every later request gets the same device) and every other file as the registry does.
/// Reopening the top through it gives a chain whose base is the writable device itself.
pub struct WritableBase {
    path: PathBuf,
    format: String,
    opened: Mutex<Option<Arc<dyn BlockDev>>>,
}

impl std::fmt::Debug for WritableBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WritableBase")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("opened", &self.opened.lock().is_some())
            .finish()
    }
}

impl WritableBase {
    /// An opener that makes `base` writable.
    pub fn new(base: &BaseRef) -> Self {
        WritableBase {
            path: base
                .path
                .canonicalize()
                .unwrap_or_else(|_| base.path.clone()),
            format: base.format.clone(),
            opened: Mutex::new(None),
        }
    }

    /// The base, once a chain opened through this opener reached it.
    pub fn base(&self) -> Option<Arc<dyn BlockDev>> {
        self.opened.lock().clone()
    }
}

impl ImageOpener for WritableBase {
    fn open_image(
        &self,
        path: &Path,
        format: Option<&str>,
        options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDev>> {
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if canonical != self.path {
            return crate::registry::open_image(path, format, options);
        }
        let mut opened = self.opened.lock();
        if let Some(dev) = opened.as_ref() {
            return Ok(Arc::clone(dev));
        }
        let writable = OpenOptions {
            writable: true,
            ..options.clone()
        };
        let dev =
            crate::registry::open_image(path, Some(format.unwrap_or(&self.format)), &writable)?;
        *opened = Some(Arc::clone(&dev));
        Ok(dev)
    }
}

/// The dirty map of a commit and how the job walks it.
#[derive(Debug, Clone)]
pub struct CommitPlan {
    /// Dirty runs `(start, end)`, sorted, disjoint, not touching.
    runs: Vec<(u64, u64)>,
    granularity: u64,
    /// The unit a write-zeroes must cover on the base to become one (its (sub)cluster).
    zero_unit: u64,
    depth: usize,
    size: u64,
}

impl CommitPlan {
    /// Bytes the job copies or zeroes: its progress total.
    pub fn total(&self) -> u64 {
        self.runs.iter().map(|(s, e)| e - s).sum()
    }

    /// The dirty runs, for tests and diagnostics.
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// The granularity of the dirty map.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }
}

/// The layer `depth` levels below `top`.
fn layer_at(top: &Arc<dyn BlockDev>, depth: usize) -> Result<Arc<dyn BlockDev>> {
    let mut layer = Arc::clone(top);
    for _ in 0..depth {
        layer = layer.backing().ok_or_else(|| {
            Error::invalid("commit", "the backing chain is shorter than expected")
        })?;
    }
    Ok(layer)
}

/// QEMU's default bitmap granularity for a target with `cluster_size`.
pub fn granularity_for(cluster_size: Option<u64>) -> u64 {
    match cluster_size {
        Some(cs) if cs > 0 => cs.clamp(MIN_GRANULARITY, MAX_GRANULARITY),
        _ => MAX_GRANULARITY,
    }
}

/// The unit a zero write must cover on `base` (QEMU's `bdrv_round_to_subclusters`).
fn zero_unit(base: &dyn BlockDev) -> Result<u64> {
    let info = base.info()?;
    let Some(cs) = info.cluster_size.filter(|&c| c > 0) else {
        return Ok(1);
    };
    let extended = base
        .format_specific()?
        .map(|spec| {
            spec.data
                .iter()
                .any(|(k, v)| k == "extended-l2" && *v == vdisk_block::dev::InfoValue::Bool(true))
        })
        .unwrap_or(false);
    Ok(if extended { (cs / 32).max(1) } else { cs })
}

/// Whether `offset` is allocated in `top` or in a layer between it and the base (which is
/// `base_depth` levels down), and for how many bytes from `offset` that answer holds.
fn allocated_above(
    top: &Arc<dyn BlockDev>,
    base_depth: usize,
    offset: u64,
    len: u64,
) -> Result<(bool, u64)> {
    let mut layer = Arc::clone(top);
    let mut len = len;
    for depth in 0..base_depth {
        if offset >= layer.size() {
            // QEMU: zeroes synthesised past the end of a short intermediate layer count as
            // allocated in it.
            return Ok((true, len));
        }
        let asked = len.min(layer.size() - offset);
        let st = layer.block_status(offset, asked)?;
        if st.len == 0 || st.len > asked || st.offset != offset {
            return Err(Error::corrupt(
                "block status",
                format!(
                    "the driver described {}+{} when asked for {offset}+{asked}",
                    st.offset, st.len
                ),
            )
            .at_offset(offset));
        }
        len = st.len;
        if st.allocated {
            return Ok((true, len));
        }
        if depth + 1 == base_depth {
            break;
        }
        layer = match layer.backing() {
            Some(next) => next,
            None => break,
        };
    }
    Ok((false, len))
}

/// Builds the dirty map of committing `top` into the image `base_depth` levels below it.
pub fn plan(top: &Arc<dyn BlockDev>, base_depth: usize) -> Result<CommitPlan> {
    let base = layer_at(top, base_depth)?;
    let granularity = granularity_for(base.info()?.cluster_size);
    let size = top.size();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0;
    // The same step as QEMU's walk (INT_MAX rounded down to the granularity).
    let step = (i32::MAX as u64) / granularity * granularity;
    while offset < size {
        let (allocated, n) = allocated_above(top, base_depth, offset, (size - offset).min(step))?;
        if allocated {
            let start = offset / granularity * granularity;
            let end = (offset + n)
                .checked_next_multiple_of(granularity)
                .unwrap_or(u64::MAX)
                .min(size);
            match runs.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ => runs.push((start, end)),
            }
        }
        offset += n;
    }
    Ok(CommitPlan {
        runs,
        granularity,
        zero_unit: zero_unit(base.as_ref())?,
        depth: base_depth,
        size,
    })
}

/// Copies what `plan` marked from `top`'s chain into its base, then flushes the base.
/// The base grows first when it is shorter than the top.
pub fn commit(
    top: &Arc<dyn BlockDev>,
    plan: &CommitPlan,
    options: &CommitOptions,
    progress: &dyn Progress,
) -> Result<CommitStats> {
    let base = layer_at(top, plan.depth)?;
    if base.size() < plan.size {
        base.resize(plan.size, Preallocation::Off)?;
    }
    let mut stats = CommitStats {
        dirty: plan.total(),
        ..CommitStats::default()
    };
    let rate = crate::rate::RateLimit::new(options.rate);
    let g = plan.granularity;
    let mut buf = AlignedBuf::zeroed(MAX_IO_BYTES as usize, 4096);
    for &(start, end) in &plan.runs {
        let mut offset = start;
        while offset < end {
            let left = end - offset;
            let entry = chain_status(top, offset, left)?;
            let mut n = entry.length.min(left);
            let mut method = Method::Copy;
            if entry.data {
                n = n.min(MAX_IO_BYTES);
            }
            n -= n % g;
            if n < g {
                n = g.min(left);
            } else if !entry.data
                && offset.is_multiple_of(plan.zero_unit)
                && n.is_multiple_of(plan.zero_unit)
            {
                method = if entry.zero {
                    Method::Zero
                } else {
                    Method::Discard
                };
            }
            match method {
                Method::Copy => {
                    // A copy covers at most one buffer; what is left of the run comes next.
                    let n = n.min(MAX_IO_BYTES);
                    if let Some(rate) = &rate {
                        rate.admit(n);
                    }
                    let data = &mut buf.as_mut_slice()[..n as usize];
                    top.read_at(data, offset)?;
                    base.write_at(data, offset)?;
                    stats.copied += n;
                    offset += n;
                    progress.advance(n);
                }
                Method::Zero => {
                    base.write_zeroes(offset, n, ZeroMode::MayUnmap)?;
                    stats.zeroed += n;
                    offset += n;
                    progress.advance(n);
                }
                Method::Discard => {
                    base.discard(offset, n)?;
                    stats.discarded += n;
                    offset += n;
                    progress.advance(n);
                }
            }
        }
    }
    base.flush()?;
    Ok(stats)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Copy,
    Zero,
    Discard,
}

#[cfg(test)]
mod tests;
