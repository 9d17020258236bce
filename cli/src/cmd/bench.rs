//! `vdisk bench`: a micro-benchmark of one image, as `qemu-img bench` of qemu 10.
//!
//! COUNT requests of BUFFER_SIZE bytes go to the image, DEPTH at a time (one thread per
//! request in flight, at most [`MAX_THREADS`]), at the offsets qemu-img uses: from OFFSET,
//! each STEP further, wrapping modulo the image size (a request that then reaches past the
//! end fails, as with qemu-img). Reads by default;
//! writes of the pattern byte with `-w`, with a flush every `--flush-interval` requests
//! (after the requests in flight finished, unless `--no-drain`). The first line of output
//! is qemu-img's; the second gives the real time.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use clap::Args;
use vdisk_block::{BlockDev, CacheMode, EngineChoice, Error, OpenOptions};

use super::dd::bounded_size;
use super::{open_with, print, OpenSpec};
use crate::context::Failure;
use crate::Ctx;

/// The long `--help` text of `bench`.
pub const LONG_ABOUT: &str = "Run a simple benchmark on an image: COUNT requests of \
    BUFFER_SIZE bytes each, DEPTH in parallel, reads unless -w.\n\n\
    Requests start at OFFSET and move STEP_SIZE (default: BUFFER_SIZE) further each time, \
    wrapping around at the end of the image. Writes write the --pattern byte; \
    --flush-interval N flushes after every N requests.\n\n\
    Example: vdisk bench -c 100000 -d 32 -s 64k -t none disk.qcow2";

/// qemu-img's warning when an image opened for writing was probed as raw.
const RAW_PROBE_WARNING: &str = "WARNING: Image format was not specified for '{}' and probing guessed raw.
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
         Specify the 'raw' format explicitly to remove the restrictions.";

/// Most worker threads; a deeper queue is served by this many.
pub const MAX_THREADS: usize = 64;

/// Arguments of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Number of requests (default 75000)
    #[arg(
        short = 'c',
        long = "count",
        value_name = "COUNT",
        allow_hyphen_values = true
    )]
    pub count: Option<String>,
    /// Requests in flight at once (default 64)
    #[arg(
        short = 'd',
        long = "depth",
        value_name = "DEPTH",
        allow_hyphen_values = true
    )]
    pub depth: Option<String>,
    /// Format of the image (default: probed)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Flush after this many requests (write tests only)
    #[arg(long = "flush-interval", value_name = "N", allow_hyphen_values = true)]
    pub flush_interval: Option<String>,
    /// Do not wait for the requests in flight before a flush
    #[arg(long = "no-drain")]
    pub no_drain: bool,
    /// Use native AIO (requires -t none or directsync)
    #[arg(short = 'n', long = "native")]
    pub native: bool,
    /// I/O backend: threads, native or io_uring
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    pub aio: Option<String>,
    /// Offset of the first request (suffixes allowed)
    #[arg(
        short = 'o',
        long = "offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    pub offset: Option<String>,
    /// The byte written by write tests (default 0)
    #[arg(long = "pattern", value_name = "PATTERN", allow_hyphen_values = true)]
    pub pattern: Option<String>,
    /// Quiet operation
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Bytes per request (default 4096; suffixes allowed)
    #[arg(
        short = 's',
        long = "buffer-size",
        value_name = "BUFFER_SIZE",
        allow_hyphen_values = true
    )]
    pub buffer_size: Option<String>,
    /// Distance between the offsets of consecutive requests (default: the buffer size)
    #[arg(
        short = 'S',
        long = "step-size",
        value_name = "STEP_SIZE",
        allow_hyphen_values = true
    )]
    pub step: Option<String>,
    /// Cache mode: writeback (default), none, writethrough, directsync, unsafe
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub cache: Option<String>,
    /// Write instead of read
    #[arg(short = 'w', long = "write")]
    pub write: bool,
    /// Name the image by options instead of a file name: driver=FMT,file.filename=PATH
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Open the image in shared mode (read tests only)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Define a QEMU object, e.g. secret,id=sec0,data=PASSPHRASE (or file=PATH), to
    /// benchmark a LUKS image (not taken under the name qemu-img, whose bench has none)
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// The image file
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// The benchmark as parsed.
#[derive(Debug, Clone)]
struct Settings {
    count: u64,
    depth: u64,
    offset: u64,
    bufsize: u64,
    step: u64,
    pattern: u8,
    flush_interval: u64,
    drain: bool,
    write: bool,
}

/// Runs `bench`; returns the exit code.
pub fn run(ctx: &Ctx, args: BenchArgs) -> i32 {
    // qemu-img 10's bench has no --object (its LUKS images cannot be benchmarked): a
    // drop-in refuses it in getopt's words.
    if ctx.dropin && !args.object.is_empty() {
        let given = std::env::args()
            .find(|a| a == "--object" || a.starts_with("--object="))
            .unwrap_or_else(|| "--object".to_string());
        eprintln!("{} bench: unrecognized option '{given}'", ctx.argv0);
        eprintln!("Try '{} bench --help' for more info", ctx.argv0);
        return 1;
    }
    // Held to the end: dropping it removes the secrets again.
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    let settings = match parse(&args) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    let [name] = args.files.as_slice() else {
        return ctx.usage("bench", "Expecting one image file name");
    };
    match bench(ctx, &args, name, &settings) {
        Ok(()) => 0,
        Err(f) => {
            ctx.fail(&f);
            1
        }
    }
}

/// Parses an integer option as qemu's `cvtnum`-style integer parsing does: decimal, `0x`
/// hexadecimal or `0` octal, an optional sign, no suffix; qemu's messages for `name`.
fn bounded_int(name: &str, text: &str, min: u64, max: u64) -> Result<u64, Failure> {
    let invalid = || {
        Failure::new(
            format!("Invalid {name} specified: '{text}'."),
            format!("invalid {name} '{text}': use a whole number"),
        )
    };
    let range = || {
        Failure::new(
            format!("Invalid {name} specified. Must be between {min} and {max}."),
            format!("invalid {name} '{text}': it must lie between {min} and {max}"),
        )
    };
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (radix, digits) =
        if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
            (16, hex)
        } else if body.len() > 1 && body.starts_with('0') {
            (8, &body[1..])
        } else {
            (10, body)
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(invalid());
    }
    let value = u64::from_str_radix(digits, radix).map_err(|_| range())?;
    if negative && value != 0 || !(min..=max).contains(&value) {
        return Err(range());
    }
    Ok(value)
}

fn parse(args: &BenchArgs) -> Result<Settings, Failure> {
    let int_max = i32::MAX as u64;
    let int = |v: &Option<String>, name: &str, min: u64, max: u64, default: u64| {
        v.as_deref()
            .map_or(Ok(default), |t| bounded_int(name, t, min, max))
    };
    let size = |v: &Option<String>, name: &str, min: u64, max: u64, default: u64| {
        v.as_deref()
            .map_or(Ok(default), |t| bounded_size(name, t, min, max))
    };
    let count = int(&args.count, "request count", 1, int_max, 75000)?;
    let depth = int(&args.depth, "queue depth", 1, int_max, 64)?;
    if let Some(aio) = args.aio.as_deref() {
        if !matches!(aio, "threads" | "native" | "io_uring") {
            return Err(Failure::new(
                format!("Invalid aio option: {aio}"),
                format!("invalid -i '{aio}': use threads, native or io_uring"),
            ));
        }
    }
    let offset = size(&args.offset, "offset", 0, i64::MAX as u64, 0)?;
    let bufsize = size(&args.buffer_size, "buffer size", 1, int_max, 4096)?;
    let step = size(&args.step, "step size", 0, int_max, 0)?;
    if let Some(cache) = args.cache.as_deref() {
        CacheMode::parse(cache).map_err(|e| {
            Failure::new(
                "Invalid cache mode",
                format!("invalid cache mode '{cache}': {}", e.message()),
            )
        })?;
    }
    let pattern = int(&args.pattern, "pattern byte", 0, 255, 0)? as u8;
    let flush_interval = int(&args.flush_interval, "flush interval", 0, int_max, 0)?;
    if !args.write && flush_interval != 0 {
        return Err(Failure::same(
            "--flush-interval is only available in write tests",
        ));
    }
    if flush_interval != 0 && flush_interval < depth {
        return Err(Failure::same("Flush interval can't be smaller than depth"));
    }
    Ok(Settings {
        count,
        depth,
        offset,
        bufsize,
        step: if step == 0 { bufsize } else { step },
        pattern,
        flush_interval,
        drain: !args.no_drain,
        write: args.write,
    })
}

fn bench(ctx: &Ctx, args: &BenchArgs, name: &str, s: &Settings) -> Result<(), Failure> {
    let cache = args
        .cache
        .as_deref()
        .map(CacheMode::parse)
        .transpose()
        .map_err(|e| Failure::same(e.message()))?
        .unwrap_or(CacheMode::Writeback);
    let native = args.native || args.aio.as_deref() == Some("native");
    let direct = matches!(cache, CacheMode::None | CacheMode::DirectSync);
    if native && !direct {
        return Err(Failure::new(
            format!("Could not open '{name}': aio=native was specified, but it requires cache.direct=on, which was not specified."),
            format!("cannot open '{name}': native AIO needs O_DIRECT (add -t none)"),
        ));
    }
    if s.write && args.force_share {
        return Err(Failure::new(
            format!(
                "Could not open '{name}': force-share=on can only be used with read-only images"
            ),
            format!("cannot open '{name}': -U (force-share) is for read tests only"),
        ));
    }
    let engine = match args.aio.as_deref() {
        // io_uring where the kernel allows it (qemu-img too falls back for native).
        Some("threads") => EngineChoice::Sync,
        _ => EngineChoice::Auto,
    };
    let options = OpenOptions {
        cache,
        engine,
        ..if s.write {
            OpenOptions::read_write()
        } else {
            OpenOptions::read_only()
        }
    };
    let spec = OpenSpec {
        format: args.format.as_deref(),
        writable: s.write,
        force_share: args.force_share,
        image_opts: args.image_opts,
        ..OpenSpec::default()
    };
    let dev = open_with(name, &spec, options)?;
    let probed_raw = s.write
        && args.format.is_none()
        && !args.image_opts
        && dev.info().map(|i| i.format == "raw").unwrap_or(false);
    if ctx.dropin && probed_raw {
        eprintln!("{}", RAW_PROBE_WARNING.replace("{}", name));
    }
    print(&format!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})\n",
        s.count,
        if s.write { "write" } else { "read" },
        s.bufsize,
        s.depth,
        s.offset,
        s.step
    ));
    if s.flush_interval != 0 {
        print(&format!(
            "Sending flush every {} requests\n",
            s.flush_interval
        ));
    }
    let started = Instant::now();
    run_requests(&dev, s).map_err(|e| {
        let why = crate::context::qemu_read_error(&e);
        Failure::new(
            format!("Failed request: {why}"),
            format!("bench '{name}': a request failed: {e}"),
        )
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    print(&format!("Run completed in {elapsed:.3} seconds.\n"));
    Ok(())
}

/// The queue shared by the workers.
struct Queue {
    next_offset: u64,
    issued: u64,
    completed: u64,
    /// A draining flush is due: issue nothing until the requests in flight are done and
    /// the flush ran.
    flush_pending: bool,
    failed: Option<Error>,
}

/// The queue, also after a worker panicked while holding it (its counts stay usable).
fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(|e| e.into_inner())
}

impl Queue {
    fn in_flight(&self) -> u64 {
        self.issued - self.completed
    }
}

fn run_requests(dev: &Arc<dyn BlockDev>, s: &Settings) -> Result<(), Error> {
    let size = dev.size();
    let queue = Mutex::new(Queue {
        next_offset: s.offset,
        issued: 0,
        completed: 0,
        flush_pending: false,
        failed: None,
    });
    let wake = Condvar::new();
    let threads = s.depth.min(s.count).min(MAX_THREADS as u64) as usize;
    // A request past the end fails before anything is allocated for it.
    vdisk_block::dev::check_range("bench", size, s.offset, s.bufsize)?;
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| worker(dev.as_ref(), s, size, &queue, &wake));
        }
    });
    let queue = queue.into_inner().unwrap_or_else(|e| e.into_inner());
    match queue.failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn worker(dev: &dyn BlockDev, s: &Settings, size: u64, queue: &Mutex<Queue>, wake: &Condvar) {
    let mut buf = vec![s.pattern; s.bufsize as usize];
    loop {
        let offset = {
            let mut q = lock(queue);
            while q.flush_pending && q.failed.is_none() {
                q = wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.issued >= s.count || q.failed.is_some() {
                return;
            }
            q.issued += 1;
            let offset = q.next_offset;
            // qemu-img's walk: step on, wrapping at the end of the image (a request that
            // then runs past the end fails, as it does there).
            q.next_offset = offset.saturating_add(s.step).checked_rem(size).unwrap_or(0);
            offset
        };
        let result = if s.write {
            dev.write_at(&buf, offset)
        } else {
            dev.read_at(&mut buf, offset)
        };
        let mut q = lock(queue);
        if let Err(e) = result {
            q.failed.get_or_insert(e);
            wake.notify_all();
            return;
        }
        q.completed += 1;
        if s.flush_interval != 0 && q.completed.is_multiple_of(s.flush_interval) {
            if s.drain {
                q.flush_pending = true;
            } else if let Err(e) = dev.flush() {
                q.failed.get_or_insert(e);
                wake.notify_all();
                return;
            }
        }
        // The last request of a drained queue runs the flush and lets the others go on.
        if q.flush_pending && q.in_flight() == 0 {
            if let Err(e) = dev.flush() {
                q.failed.get_or_insert(e);
            }
            q.flush_pending = false;
            wake.notify_all();
        }
    }
}
