//! `vdisk rebase`: put an image on another backing file (or on none).
//!
//! Safe mode (the default) keeps what the guest sees: for every range the image itself does
//! not allocate, the old chain and the new backing file are read, and where they differ the
//! old contents are written into the image (zeroes, as zero clusters, past the end of the old
//! chain); only then is the backing file name switched. Unsafe mode (`-u`) only rewrites the
//! name and format. The walk follows qemu-img 10's `img_rebase`: 2 MiB steps, writes
//! widened to whole (sub)clusters (whole clusters with `-c`), and the same progress output.
//!
//! Unlike qemu-img, refusals that qemu only meets when it finally switches the backing file
//! (no backing format given, a format that cannot store a backing file) are made before
//! anything is written, with the same words.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::Args;
use vdisk_block::{BlockDev, CacheMode, OpenOptions, ZeroMode};

use super::resize::warn_if_probed_raw;
use super::{open_with, parse_image_opts, OpenSpec};
use crate::context::{host_path, open_failure_of, without_hint, Failure};
use crate::Ctx;

/// The long `--help` text of `rebase`.
pub const LONG_ABOUT: &str = "Change the backing file of an image.\n\n\
     By default (safe mode) every range the image does not hold itself is compared between \
     the old backing chain and the new backing file, and what differs is copied into the \
     image first, so the guest sees the same disk afterwards. With -u (unsafe) only the \
     backing file name and format are rewritten: use it when the backing file was renamed \
     or moved. -b \"\" makes the image standalone. A relative backing name is relative to \
     the image's folder.\n\n\
     Example: vdisk rebase -b base.qcow2 -F qcow2 overlay.qcow2";

/// Arguments of `rebase`.
#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// Define a QEMU object, e.g. secret,id=sec0,data=PASSPHRASE (or file=PATH)
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// FILENAME is an option list: driver=FMT,file.filename=PATH,...
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Open the new backing file in shared mode, even while another process uses it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Quiet: print only errors
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Format of the image (default: probed)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Cache mode for the image (writeback, none, writethrough, directsync, unsafe)
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Cache mode for the new backing file
    #[arg(short = 'T', long = "backing-cache", value_name = "SRC_CACHE")]
    pub backing_cache: Option<String>,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Unsafe: only rewrite the backing file name and format, copy nothing
    #[arg(short = 'u', long = "backing-unsafe")]
    pub unsafe_mode: bool,
    /// Compress the clusters copied into the image (formats that can)
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// The new backing file ("" for none), relative to the image's folder
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILE")]
    pub backing: Option<String>,
    /// Format of the new backing file (required with a backing file)
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    pub backing_format: Option<String>,
    /// The image
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// qemu-img's step: the most it reads from each backing file at once.
const IO_BUF_SIZE: u64 = 2 << 20;

/// Runs `rebase`; returns the exit code.
pub fn run(ctx: &Ctx, args: RebaseArgs) -> i32 {
    // Held to the end: dropping it removes the secrets again.
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    let [name] = args.files.as_slice() else {
        return ctx.usage("rebase", "Expecting one image file name");
    };
    if !args.unsafe_mode && args.backing.is_none() {
        return ctx.usage(
            "rebase",
            "Must specify backing file (-b) or use unsafe mode (-u)",
        );
    }
    let progress = QemuProgress::new(args.progress && !args.quiet, 2.0);
    progress.print(0.0, 100.0);
    let code = match rebase(&args, name, &progress) {
        Ok(()) => 0,
        Err(f) => {
            ctx.fail(&f);
            1
        }
    };
    progress.end();
    code
}

fn cache_mode(text: Option<&str>, qemu: &str, what: &str) -> Result<CacheMode, Failure> {
    match text {
        None => Ok(CacheMode::Writeback),
        Some(t) => CacheMode::parse(t).map_err(|e| {
            Failure::new(
                format!("{qemu}: {t}"),
                format!("rebase: invalid {what} cache mode '{t}': {}", e.message()),
            )
        }),
    }
}

fn rebase(args: &RebaseArgs, name: &str, progress: &QemuProgress) -> Result<(), Failure> {
    let cache = cache_mode(args.cache.as_deref(), "Invalid cache option", "image")?;
    let backing_cache = cache_mode(
        args.backing_cache.as_deref(),
        "Invalid source cache option",
        "backing file",
    )?;
    let spec = OpenSpec {
        format: args.format.as_deref(),
        writable: true,
        image_opts: args.image_opts,
        // A renamed or moved backing file is what -u is for: do not try to open it.
        no_backing: args.unsafe_mode,
        ..OpenSpec::default()
    };
    let options = OpenOptions {
        cache,
        ..OpenOptions::read_write()
    };
    let dev = open_with(name, &spec, options)?;
    warn_if_probed_raw(&*dev, name, args.format.is_none() && !args.image_opts);
    let info = dev
        .info()
        .map_err(|e| Failure::same(e.message().to_string()))?;
    let driver = vdisk_blockjobs::format_by_name(&info.format)
        .map_err(|e| Failure::same(e.message().to_string()))?;
    if args.compress && !driver.supports_compression() {
        return Err(Failure::new(
            "Compression not supported for this file format",
            format!(
                "rebase '{name}': {} images cannot hold compressed clusters (drop -c)",
                info.format
            ),
        ));
    }
    if let Some(fmt) = args.backing_format.as_deref() {
        if vdisk_blockjobs::format_by_name(fmt).is_err() {
            return Err(Failure::new(
                format!("Invalid format name: '{fmt}'"),
                format!("rebase: unknown backing format '{fmt}'"),
            ));
        }
    }
    let path = match args.image_opts {
        true => PathBuf::from(parse_image_opts(name)?.filename),
        false => PathBuf::from(host_path(name)),
    };
    let new_name = args.backing.as_deref().unwrap_or("");
    let new_backing = match (args.unsafe_mode, new_name.is_empty()) {
        (false, false) => Some(open_new_backing(args, &path, new_name, backing_cache)?),
        _ => None,
    };
    // qemu meets these only when it switches the backing file, after the copy.
    let switch_failure = |why: &str| {
        // qemu still ends its progress at 100% after this refusal.
        progress.print(100.0, 0.0);
        Failure::new(
            format!(
                "Could not change the backing file to '{}': {why}",
                args.backing.as_deref().unwrap_or("(null)")
            ),
            format!("rebase '{name}': cannot change the backing file: {why}"),
        )
    };
    if !new_name.is_empty() && args.backing_format.is_none() {
        return Err(switch_failure("backing format must be specified"));
    }
    // Rewriting the name with itself changes nothing and tells whether the driver can.
    if let Err(e) = driver.set_backing(&path, None, None) {
        if e.kind() == vdisk_block::ErrorKind::Unsupported {
            return Err(switch_failure(without_hint(e.message())));
        }
    }
    if !args.unsafe_mode {
        let prefix = new_backing
            .as_ref()
            .and_then(|_| layers_above(&*dev, &resolve(&path, new_name)));
        copy_differences(
            &*dev,
            dev.backing(),
            new_backing.clone(),
            prefix.as_deref(),
            args.compress,
            progress,
        )
        .map_err(|f| Failure::new(f.clone(), format!("rebase '{name}': {f}")))?;
        dev.flush().map_err(|e| {
            Failure::same(format!("Error while writing to COW image: {}", e.message()))
        })?;
    }
    // The driver rewrites the header itself: every handle on the image is closed first.
    drop(new_backing);
    drop(dev);
    let format = args
        .backing_format
        .as_deref()
        .filter(|_| !new_name.is_empty());
    driver
        .set_backing(&path, Some(new_name), format)
        .map_err(|e| switch_failure(without_hint(e.message())))?;
    progress.print(100.0, 0.0);
    Ok(())
}

/// The file `new_name` names when the image at `image` names it: relative names are
/// relative to the image's folder.
fn resolve(image: &Path, new_name: &str) -> PathBuf {
    match image.parent() {
        Some(dir) if !Path::new(new_name).is_absolute() && !dir.as_os_str().is_empty() => {
            dir.join(new_name)
        }
        _ => PathBuf::from(new_name),
    }
}

/// When the new backing file is already in the image's chain, the layers between the image
/// and it (qemu-img then copies only what those layers hold).
fn layers_above(dev: &dyn BlockDev, new_backing: &Path) -> Option<Vec<Arc<dyn BlockDev>>> {
    let target = new_backing.canonicalize().ok()?;
    let mut layers = Vec::new();
    let mut layer = dev.backing();
    while let Some(l) = layer {
        let name = l.info().ok()?.filename;
        if name.canonicalize().ok().as_ref() == Some(&target) {
            return Some(layers);
        }
        layer = l.backing();
        layers.push(l);
    }
    None
}

/// qemu's `bdrv_is_allocated_above` over `layers` (top first): whether one of them holds the
/// range at `offset`, and how far that answer holds.
fn allocated_above(
    layers: &[Arc<dyn BlockDev>],
    offset: u64,
    len: u64,
) -> Result<(bool, u64), String> {
    let mut n = len;
    for layer in layers {
        let size = layer.size();
        if offset >= size {
            continue;
        }
        let (allocated, run) = allocation_run(&**layer, offset, n.min(size - offset))?;
        if allocated {
            return Ok((true, run));
        }
        if offset + run < size {
            n = n.min(run);
        }
    }
    Ok((false, n))
}

/// Opens the new backing file `new_name`, named relative to the image at `image`.
fn open_new_backing(
    args: &RebaseArgs,
    image: &Path,
    new_name: &str,
    cache: CacheMode,
) -> Result<Arc<dyn BlockDev>, Failure> {
    let resolved = resolve(image, new_name);
    let options = OpenOptions {
        cache,
        force_share: args.force_share,
        ..OpenOptions::read_only()
    };
    vdisk_blockjobs::open_image(&resolved, args.backing_format.as_deref(), &options).map_err(|e| {
        let shown = resolved.to_string_lossy();
        let inner = open_failure_of(&shown, &shown, &e);
        let prefix = format!("Could not open '{shown}': ");
        let qemu_inner = inner.qemu.strip_prefix(&prefix).unwrap_or(&inner.qemu);
        Failure::new(
            format!("Could not open new backing file '{new_name}': {qemu_inner}"),
            format!(
                "rebase: cannot open the new backing file '{new_name}': {}",
                e.message()
            ),
        )
    })
}

/// The unit writes are widened to: the image's subcluster (qemu's `subcluster_size`), or its
/// cluster when writing compressed.
fn write_align(dev: &dyn BlockDev, compress: bool) -> u64 {
    let info = dev.info().ok();
    let cluster = info
        .as_ref()
        .and_then(|i| i.cluster_size)
        .unwrap_or(1)
        .max(1);
    if compress {
        return dev.compressed_unit().unwrap_or(cluster);
    }
    let extended_l2 = dev
        .format_specific()
        .ok()
        .flatten()
        .and_then(|s| {
            s.data
                .iter()
                .find(|(k, _)| k == "extended-l2")
                .map(|(_, v)| *v == vdisk_block::dev::InfoValue::Bool(true))
        })
        .unwrap_or(false);
    if extended_l2 {
        cluster / 32
    } else {
        cluster
    }
}

/// Length of the run from `offset` (at most `len` bytes) in which `dev` itself allocates
/// (or does not allocate) every byte, and which of the two it is.
fn allocation_run(dev: &dyn BlockDev, offset: u64, len: u64) -> Result<(bool, u64), String> {
    let meta =
        |e: vdisk_block::Error| format!("error while reading image metadata: {}", e.message());
    let first = dev.block_status(offset, len).map_err(meta)?;
    let allocated = first.allocated;
    let mut run = first.len.min(len);
    while run < len {
        let next = dev.block_status(offset + run, len - run).map_err(meta)?;
        if next.allocated != allocated {
            break;
        }
        run += next.len.min(len - run);
    }
    Ok((allocated, run))
}

/// qemu's `compare_buffers`: whether the first `align`-sized piece differs, and how far the
/// run of pieces in that same state goes.
fn compare_buffers(a: &[u8], b: &[u8], align: u64) -> (bool, usize) {
    let align = align.max(1) as usize;
    let mut i = a.len().min(align);
    let differs = a[..i] != b[..i];
    while i < a.len() {
        let len = (a.len() - i).min(align);
        if (a[i..i + len] != b[i..i + len]) != differs {
            break;
        }
        i += len;
    }
    (differs, i)
}

/// Reads `buf.len()` bytes at `offset` of `dev` (zeroes past its end, or all zeroes without
/// a device); returns how many bytes came from the device.
fn read_padded(
    dev: Option<&Arc<dyn BlockDev>>,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<u64, String> {
    let size = dev.map(|d| d.size()).unwrap_or(0);
    let n = (buf.len() as u64).min(size.saturating_sub(offset));
    buf[n as usize..].fill(0);
    if let (Some(dev), true) = (dev, n > 0) {
        dev.read_at(&mut buf[..n as usize], offset)
            .map_err(|_| format!("error while reading from {what} backing file"))?;
    }
    Ok(n)
}

/// Writes into `dev` what it needs so that its guest view stays the same once it reads from
/// `new` instead of `old`.
fn copy_differences(
    dev: &dyn BlockDev,
    old: Option<Arc<dyn BlockDev>>,
    new: Option<Arc<dyn BlockDev>>,
    prefix: Option<&[Arc<dyn BlockDev>]>,
    compress: bool,
    progress: &QemuProgress,
) -> Result<(), String> {
    let size = dev.size();
    let standalone = old.is_none();
    let old_size = old.as_ref().map(|d| d.size()).unwrap_or(0);
    let unit = write_align(dev, compress);
    let plain_unit = write_align(dev, false);
    let step = if size == 0 {
        0.0
    } else {
        100.0 / (size / size.min(IO_BUF_SIZE)) as f32
    };
    let mut buf_old = vec![0u8; IO_BUF_SIZE as usize];
    let mut buf_new = vec![0u8; IO_BUF_SIZE as usize];
    let write_failed = |e: vdisk_block::Error| {
        format!(
            "Error while writing to COW image: {}",
            without_hint(e.message())
        )
    };
    let mut offset = 0u64;
    while offset < size {
        let (allocated, mut run) = allocation_run(dev, offset, IO_BUF_SIZE.min(size - offset))?;
        if allocated {
            offset += run;
            continue;
        }
        if let Some(layers) = prefix {
            // Unchanged since the new backing file: nothing to copy (and no progress, as
            // in qemu-img).
            let (changed, above) = allocated_above(layers, offset, run)?;
            if !changed && above > 0 {
                offset += above;
                continue;
            }
            if above > 0 {
                run = above;
            }
        }
        // Widen to whole write units, so no write needs copy-on-write of a partial unit.
        let widen = |align: u64| {
            let start = offset / align * align;
            let end = (offset + run).div_ceil(align).saturating_mul(align);
            (start, (end - start).min(size - start).min(IO_BUF_SIZE))
        };
        let (mut align, mut chunk_compress) = (unit, compress);
        let (mut start, mut n) = widen(align);
        if compress && allocation_run(dev, start, n)? != (false, n) {
            // A compressed cluster would cover subclusters the image holds (extended L2,
            // where qemu-img aborts): this stretch is written plainly, subcluster-wise.
            (align, chunk_compress) = (plain_unit, false);
            (start, n) = widen(align);
        }
        offset = start;
        let len = n as usize;
        let n_old = read_padded(old.as_ref(), &mut buf_old[..len], offset, "old")?;
        let mut old_eof = n_old == 0;
        read_padded(new.as_ref(), &mut buf_new[..len], offset, "new")?;
        let mut written = 0usize;
        while written < len {
            let (differs, pnum) =
                compare_buffers(&buf_old[written..len], &buf_new[written..len], align);
            let at = offset + written as u64;
            if differs {
                let data = &buf_old[written..written + pnum];
                if old_eof && standalone {
                    // Without a backing file a driver may leave unallocated what already
                    // reads as zeroes, which the new backing file would then show through:
                    // zeroes are written as data (qemu-img makes zero clusters here).
                    dev.write_at(data, at).map_err(write_failed)?;
                } else if old_eof {
                    dev.write_zeroes(at, pnum as u64, ZeroMode::KeepAllocated)
                        .map_err(write_failed)?;
                } else if chunk_compress {
                    write_compressed(dev, data, at, align).map_err(write_failed)?;
                } else {
                    dev.write_at(data, at).map_err(write_failed)?;
                }
            }
            written += pnum;
            if offset + written as u64 >= old_size {
                old_eof = true;
            }
        }
        offset += n;
        progress.print(step, 100.0);
    }
    Ok(())
}

/// Writes `data` at `offset` one compressed unit at a time (units that do not shrink are
/// stored plainly, as qemu does).
fn write_compressed(
    dev: &dyn BlockDev,
    data: &[u8],
    offset: u64,
    unit: u64,
) -> vdisk_block::Result<()> {
    for (i, chunk) in data.chunks(unit.max(1) as usize).enumerate() {
        let packed = dev.compress_unit(chunk)?;
        dev.write_compressed_unit(chunk, packed.as_deref(), offset + i as u64 * unit)?;
    }
    Ok(())
}

/// qemu-img's own progress output (`qemu_progress_*` in its simple mode), printed on stdout
/// so scripts that read qemu-img's progress read the same lines: `    (NN.NN/100%)` and a
/// carriage return whenever the percentage moved more than `min_skip` (and at 0 and 100), and
/// a newline at the end. On a terminal (stderr) an indicatif bar with the percentage, the
/// time so far and an ETA is drawn instead.
#[derive(Debug)]
pub(crate) struct QemuProgress {
    enabled: bool,
    min_skip: f32,
    /// The current percentage and the one printed last.
    state: Mutex<(f32, f32)>,
    /// The bar on a terminal, in hundredths of a percent.
    bar: Option<indicatif::ProgressBar>,
}

impl QemuProgress {
    /// A progress display, silent unless `enabled`.
    pub(crate) fn new(enabled: bool, min_skip: f32) -> Self {
        use std::io::IsTerminal;
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(10_000);
            let style = indicatif::ProgressStyle::with_template(
                "{wide_bar} {percent:>3}% {elapsed_precise} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        QemuProgress {
            enabled,
            min_skip,
            state: Mutex::new((0.0, 0.0)),
            bar,
        }
    }

    /// qemu's `qemu_progress_print(delta, max)`: with `max` 0 the percentage becomes
    /// `delta`, otherwise it grows by `delta` percent of `max`.
    pub(crate) fn print(&self, delta: f32, max: f32) {
        if !self.enabled {
            return;
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let (current, last) = &mut *state;
        *current = if max == 0.0 {
            delta
        } else {
            *current + delta / 100.0 * max
        };
        if *current > 100.0 {
            *current = 100.0;
        }
        if let Some(bar) = &self.bar {
            bar.set_position((f64::from(*current) * 100.0) as u64);
            return;
        }
        if *current > *last + self.min_skip
            || *current < *last - self.min_skip
            || *current == 0.0
            || *current == 100.0
        {
            *last = *current;
            super::print(&format!("    ({:3.2}/100%)\r", f64::from(*current)));
            // qemu flushes each progress line; its final newline waits for exit.
            crate::stdout::flush();
        }
    }

    /// Ends the display with a newline (or clears the bar).
    pub(crate) fn end(&self) {
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None if self.enabled => super::print("\n"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::compare_buffers;

    #[test]
    fn compare_buffers_runs_by_unit() {
        let a = [0u8; 8];
        let mut b = [0u8; 8];
        assert_eq!(compare_buffers(&a, &b, 2), (false, 8));
        b[5] = 1;
        assert_eq!(compare_buffers(&a, &b, 2), (false, 4));
        assert_eq!(compare_buffers(&a[4..], &b[4..], 2), (true, 2));
        assert_eq!(compare_buffers(&a[..3], &b[..3], 4), (false, 3));
    }
}
