//! `vdisk convert`: copy one or more images, concatenated, into a new or existing image.
//!
//! Options and messages follow qemu-img 10; the copy itself is
//! `vdisk_blockjobs::convert`. One deliberate difference: the target's cache mode defaults
//! to `writeback` with a single flush at the end (qemu-img defaults to `unsafe`, which never
//! flushes), so a finished convert is on disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use vdisk_block::{
    BlockDev, CacheMode, CreateOptions, EngineChoice, Error, ErrorKind, OpenOptions,
};
use vdisk_blockjobs::convert::{self, ConvertOptions};
use vdisk_blockjobs::{format_by_name, open_image};

use crate::context::{create_failure, open_failure, Failure};
use crate::progress::ProgressReporter;
use crate::Ctx;

/// Arguments of `convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Format of the source image(s); probed when absent.
    #[arg(short = 'f', long = "source-format", value_name = "FMT")]
    pub source_format: Option<String>,
    /// Format of the target image (default raw; with --target-image-opts the options name
    /// the driver).
    #[arg(
        short = 'O',
        long = "target-format",
        visible_alias = "output-format",
        value_name = "OUTPUT_FMT"
    )]
    pub target_format: Option<String>,
    /// Make the new target an overlay of this backing file (qcow2 and VMDK targets): only
    /// what the source's top layer holds is copied, the rest is left to the backing file
    #[arg(short = 'B', long = "backing", value_name = "BACKING_FILE")]
    pub backing_file: Option<String>,
    /// Format of the -B backing file (required with -B when the target is created)
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    pub backing_format: Option<String>,
    /// Creation options of the target (`-o help` lists them); may repeat.
    #[arg(
        short = 'o',
        long = "target-options",
        visible_alias = "options",
        value_name = "OPTIONS"
    )]
    pub options: Vec<String>,
    /// Zero runs of at least this many bytes become holes (multiple of 512, up to 16M);
    /// 0 writes everything, leaving the target fully allocated.
    #[arg(short = 'S', long = "sparse-size", value_name = "SPARSE_SIZE")]
    pub sparse_size: Option<String>,
    /// The target exists already: do not create it (it must be at least as large as the
    /// source).
    #[arg(short = 'n', long = "no-create")]
    pub no_create: bool,
    /// Trust that the existing target reads as zeroes, so zero ranges are not written
    /// (requires -n).
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// Parallel requests (default 8, at most 16).
    #[arg(short = 'm', long = "parallel", value_name = "NUM")]
    pub parallel: Option<String>,
    /// Allow out-of-order writes to the target.
    #[arg(short = 'W', long = "oob-writes")]
    pub out_of_order: bool,
    /// Cache mode of the target: writeback (default here: one fsync at the end), none
    /// (O_DIRECT), unsafe (no flush at all; qemu-img's default), writethrough, directsync.
    #[arg(
        short = 't',
        long = "target-cache",
        visible_alias = "output-cache",
        value_name = "CACHE"
    )]
    pub target_cache: Option<String>,
    /// Cache mode of the source(s) (default writeback).
    #[arg(short = 'T', long = "source-cache", value_name = "SRC_CACHE")]
    pub source_cache: Option<String>,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet: no progress, even with -p.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Name the image by options instead of a file name: driver=FMT,file.filename=PATH and
    /// driver options (e.g. disk=N to pick a disk of an OVA appliance)
    #[arg(long = "image-opts", visible_alias = "source-image-opts")]
    pub image_opts: bool,
    /// Name the existing target (requires -n) by options, as --image-opts names a source:
    /// driver=FMT,file.filename=PATH
    #[arg(long = "target-image-opts")]
    pub target_image_opts: bool,
    /// Open the source(s) without taking locks (shared with a running VM).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Compress the target's clusters (qcow2 with zlib or zstd as the image's
    /// compression_type says; VMDK takes the option, and streamOptimized always compresses)
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Keep going when the source cannot be read: unreadable 512-byte sectors are written
    /// as zeroes, each with a warning (for rescuing what is left of a failing disk)
    #[arg(long = "salvage")]
    pub salvage: bool,
    /// Limit the data copied to this many bytes per second (suffixes k, M, G, ... allowed)
    #[arg(
        short = 'r',
        long = "rate",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    pub rate: Option<String>,
    /// Offload the copy to the host (copy_file_range); not with -c or -S. vdisk copies
    /// through its own engine either way, which already skips holes and zeroes
    #[arg(short = 'C', long = "copy-range-offloading")]
    pub copy_range: bool,
    /// Copy an internal snapshot of the source instead of its current contents: a name or
    /// id (ids are tried first), or snapshot.id=ID[,snapshot.name=NAME] (both must match)
    #[arg(
        short = 'l',
        long = "source-snapshot",
        visible_alias = "snapshot",
        value_name = "SNAPSHOT_PARAMS"
    )]
    pub snapshot: Vec<String>,
    /// Copy the internal snapshot with this id or name (the old qemu-img spelling of
    /// -l ID_OR_NAME; qemu-img 10 no longer takes it, so drop-in mode refuses it as qemu-img does)
    #[arg(short = 's', value_name = "SNAPSHOT")]
    pub snapshot_id_or_name: Vec<String>,
    /// Copy the persistent bitmaps of the source too (qcow2 to qcow2)
    #[arg(long = "bitmaps")]
    pub bitmaps: bool,
    /// With --bitmaps: leave out inconsistent bitmaps instead of failing
    #[arg(long = "skip-broken-bitmaps")]
    pub skip_broken_bitmaps: bool,
    /// Source image(s), then the target.
    #[arg(value_name = "FILENAME")]
    pub files: Vec<PathBuf>,
    /// Define a secret: `secret,id=ID,data=TEXT` or `secret,id=ID,file=PATH`
    /// (`format=base64` decodes it); options name it by id (`key-secret=ID`)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
}

/// Runs `convert`; returns the exit code (qemu-img uses 1 for every failure).
pub fn run(ctx: &Ctx, args: ConvertArgs) -> i32 {
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    if ctx.dropin && !args.snapshot_id_or_name.is_empty() {
        eprintln!("{} convert: invalid option -- 's'", ctx.argv0);
        eprintln!("Try '{} convert --help' for more info", ctx.argv0);
        return 1;
    }
    match convert_cmd(ctx, &args) {
        Ok(()) => 0,
        Err(failure) => {
            ctx.fail(&failure);
            1
        }
    }
}

/// Settings checked and parsed from the command line.
struct Settings {
    sources: Vec<PathBuf>,
    target: PathBuf,
    copy: ConvertOptions,
    target_cache: CacheMode,
    source_cache: CacheMode,
    create_options: String,
    /// The internal snapshot of the (first) source to copy, if any.
    snapshot: Option<super::snapshot::SourceSnapshot>,
}

/// qemu-img's bound on `-m`.
const QEMU_MAX_COROUTINES: usize = 16;

fn parse(ctx: &Ctx, args: &ConvertArgs) -> Result<Settings, Failure> {
    if args.skip_broken_bitmaps && !args.bitmaps {
        return Err(Failure::new(
            "Use of --skip-broken-bitmaps requires --bitmaps",
            "convert: --skip-broken-bitmaps only changes what --bitmaps copies; add --bitmaps",
        ));
    }
    let snapshot =
        super::snapshot::parse_source_snapshot(ctx, &args.snapshot, &args.snapshot_id_or_name)?;
    let min_sparse = match &args.sparse_size {
        None => convert::DEFAULT_MIN_SPARSE,
        Some(text) => {
            let value = vdisk_block::size::parse_size(text).map_err(|_| {
                Failure::same(format!(
                    "Invalid buffer size for sparse output specified: '{text}'."
                ))
            })?;
            ConvertOptions::check_min_sparse(value).map_err(|e| Failure::same(e.message()))?;
            value
        }
    };
    let parallel = match &args.parallel {
        None => convert::DEFAULT_PARALLEL,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=QEMU_MAX_COROUTINES).contains(&n) => n,
            _ => {
                return Err(Failure::same(format!(
                    "Invalid number of coroutines specified. Must be between 1 and {QEMU_MAX_COROUTINES}."
                )))
            }
        },
    };
    let rate = match args.rate.as_deref() {
        None => None,
        Some(text) => Some(crate::context::parse_size_arg("rate limit", text)?),
    };
    // qemu-img's checks of the options against each other, in its order.
    if args.copy_range && args.compress {
        return Err(Failure::new(
            "Cannot enable copy offloading when -c is used",
            "convert: -C (copy offloading) and -c (compression) exclude each other",
        ));
    }
    if args.copy_range && args.sparse_size.is_some() {
        return Err(Failure::new(
            "Cannot enable copy offloading when -S is used",
            "convert: -C (copy offloading) and -S exclude each other",
        ));
    }
    if args.copy_range && args.salvage {
        return Err(Failure::new(
            "Cannot use copy offloading in salvaging mode",
            "convert: -C (copy offloading) and --salvage exclude each other",
        ));
    }
    if args.target_image_opts && !args.no_create {
        return Err(Failure::new(
            "--target-image-opts requires use of -n flag",
            "convert: --target-image-opts names an existing target: add -n",
        ));
    }
    let create_options = args.options.join(",");
    if args.no_create && !create_options.is_empty() {
        return Err(Failure::same(
            "-o has no effect when skipping image creation",
        ));
    }
    if args.target_is_zero && !args.no_create {
        return Err(Failure::same("--target-is-zero requires use of -n flag"));
    }
    if args.files.len() < 2 {
        return Err(Failure::new(
            "Must specify image file name",
            "convert: name the source image(s) and then the target",
        ));
    }
    let (target, sources) = match args.files.split_last() {
        Some((t, s)) => (t.clone(), s.to_vec()),
        None => return Err(Failure::same("Must specify image file name")),
    };
    let cache = |text: &Option<String>| -> Result<CacheMode, Failure> {
        match text {
            None => Ok(CacheMode::Writeback),
            Some(t) => CacheMode::parse(t).map_err(|e| Failure::same(e.message())),
        }
    };
    Ok(Settings {
        sources,
        target,
        copy: ConvertOptions {
            min_sparse,
            parallel,
            out_of_order: args.out_of_order,
            target_is_zero: args.target_is_zero,
            salvage: args.salvage,
            rate,
            ..ConvertOptions::default()
        },
        target_cache: cache(&args.target_cache)?,
        source_cache: cache(&args.source_cache)?,
        create_options,
        snapshot,
    })
}

fn convert_cmd(ctx: &Ctx, args: &ConvertArgs) -> Result<(), Failure> {
    let mut settings = parse(ctx, args)?;
    // With --target-image-opts the target is an options string; what it names (the file
    // and its driver) stands in for the target file and -O from here on.
    let target_spec = if args.target_image_opts {
        Some(super::parse_image_opts(&settings.target.to_string_lossy())?)
    } else {
        None
    };
    let driver = match (&target_spec, &args.target_format) {
        (Some(_), Some(_)) => Err(Failure::same(
            "--image-opts and --format are mutually exclusive",
        )),
        (Some(spec), None) => super::image_opts_driver(&settings.target.to_string_lossy(), spec),
        (None, format) => {
            let format = format.as_deref().unwrap_or("raw");
            format_by_name(format)
                .map_err(|_| Failure::same(format!("Unknown file format '{format}'")))
        }
    };
    if settings
        .create_options
        .split(',')
        .any(|item| item == "help" || item == "?")
    {
        super::print(&super::option_help::create_help(ctx, driver?, true));
        return Ok(());
    }
    // qemu-img starts its progress here, once the command line is read: every later
    // failure ends the progress line first. The engine counts the total.
    let progress = ProgressReporter::new(args.progress, args.quiet, 0);
    let driver = driver?;

    let source_opts = OpenOptions {
        cache: settings.source_cache,
        engine: EngineChoice::Sync,
        force_share: args.force_share,
        ..OpenOptions::read_only()
    };
    let mut sources: Vec<Arc<dyn BlockDev>> = Vec::with_capacity(settings.sources.len());
    let source_spec = super::OpenSpec {
        format: args.source_format.as_deref(),
        force_share: args.force_share,
        image_opts: args.image_opts,
        ..super::OpenSpec::default()
    };
    for path in &settings.sources {
        let dev = super::open_with(&path.to_string_lossy(), &source_spec, source_opts.clone())?;
        sources.push(dev);
    }
    if let Some(snapshot) = &settings.snapshot {
        super::snapshot::load_source_snapshot(&sources, snapshot)?;
    }
    // qemu-img reads -o once the sources are open, before it looks at anything else.
    let mut refused_at_creation = None;
    let mut typed_options = Vec::new();
    if !args.no_create {
        let checked = check_create_options(driver, &settings.target, &settings.create_options)?;
        settings.create_options = checked.list;
        refused_at_creation = checked.at_creation;
        typed_options = checked.typed;
    }
    if args.compress {
        if !driver.supports_compression() {
            return Err(Failure::same(
                "Compression not supported for this file format",
            ));
        }
        // qemu-img refuses before it creates anything: encrypted clusters cannot be
        // compressed.
        if let Ok(o) = CreateOptions::parse_options(&settings.create_options) {
            let alias = o
                .get("encryption")
                .is_some_and(|v| vdisk_block::format::parse_bool("encryption", v).unwrap_or(false));
            if alias || o.contains_key("encrypt.format") {
                return Err(Failure::same(
                    "Compression and encryption not supported at the same time",
                ));
            }
            // The file protocol's preallocation too, which the driver's list lacks.
            let preallocation = typed_options
                .iter()
                .rev()
                .find(|(k, _)| k == "preallocation");
            if preallocation.is_some_and(|(_, v)| v != "off") {
                return Err(Failure::same(
                    "Compression and preallocation not supported at the same time",
                ));
            }
        }
        settings.copy.compress = true;
    }
    if args.bitmaps {
        super::bitmap::convert_check_source(&sources, args.skip_broken_bitmaps)?;
    }
    // With --image-opts a source is named by its options; the file is what may collide.
    if args.image_opts {
        for path in settings.sources.iter_mut() {
            *path = super::parse_image_opts(&path.to_string_lossy())?
                .filename
                .into();
        }
    }
    let total = convert::total_size(&sources).map_err(|e| Failure::same(e.message()))?;
    let backing = match target_backing(ctx, args, driver.name(), &mut settings)? {
        Backing::Refused => {
            // qemu-img takes this for success: its progress ends at 100%.
            progress.finish(true);
            return Ok(());
        }
        Backing::To(name) => name,
    };
    settings.copy.target_has_backing = backing.is_some();

    let target_path = match &target_spec {
        Some(spec) => PathBuf::from(&spec.filename),
        None => settings.target.clone(),
    };
    // Without this, creating the target would truncate a source before it is read.
    if let Some(source) = settings
        .sources
        .iter()
        .find(|source| same_file(source, &target_path))
    {
        return Err(self_overwrite_failure(
            source,
            &target_path,
            driver.name(),
            args.no_create,
        ));
    }
    if let Some(refusal) = refused_at_creation {
        return Err(refusal);
    }
    if !args.no_create {
        let mut options = CreateOptions {
            size: total,
            options: CreateOptions::parse_options(&settings.create_options)
                .map_err(|e| Failure::same(e.message()))?,
        };
        // qemu-img takes the size from the sources; a size in -o is not an error there.
        options.options.remove("size");
        driver
            .create(&target_path, options)
            .map_err(|e| convert_create_failure(&target_path, driver.name(), &e))?;
    }
    let mut target_opts = OpenOptions {
        cache: settings.target_cache,
        engine: EngineChoice::Sync,
        ..OpenOptions::read_write()
    };
    // As qemu-img, the target is opened with the -o options its driver takes on open too
    // (luks' key-secret).
    if let Ok(given) = CreateOptions::parse_options(&settings.create_options) {
        target_opts.driver_options.extend(
            given
                .into_iter()
                .filter(|(k, _)| driver.open_option_names().contains(&k.as_str())),
        );
    }
    let target = if args.target_image_opts {
        let spec = super::OpenSpec {
            image_opts: true,
            ..super::OpenSpec::default()
        };
        super::open_with(&settings.target.to_string_lossy(), &spec, target_opts)?
    } else {
        open_image(&target_path, Some(driver.name()), &target_opts)
            .map_err(|e| open_failure(&target_path.to_string_lossy(), &e))?
    };
    if args.bitmaps {
        super::bitmap::convert_check_target(target.as_ref(), driver.name())?;
    }
    convert::check_target_size(&sources, target.as_ref())
        .map_err(|e| Failure::same(e.message()))?;
    // A new image reads as zeroes if its format says so; with -S 0 qemu-img still writes
    // every zero range so the target ends up fully allocated, and so do we.
    // Behind a backing file the new image reads as the backing file, not as zeroes.
    if !args.no_create
        && settings.copy.min_sparse != 0
        && backing.is_none()
        && target.has_zero_init()
    {
        settings.copy.target_is_zero = true;
    }
    // qemu-img knows the backing file's size only for a target it created.
    if backing.is_some() && !args.no_create {
        settings.copy.target_backing_size = target
            .backing()
            .map(|b| b.size().checked_next_multiple_of(512).unwrap_or(b.size()));
    }

    let watched = Salvaging {
        ctx,
        progress: &progress,
        quiet: args.quiet,
    };
    let result = convert::convert(&sources, target.as_ref(), &settings.copy, &watched);
    progress.finish(result.is_ok());
    result.map_err(|e| copy_failure(&e))?;
    if args.bitmaps {
        super::bitmap::convert_copy(
            ctx,
            sources[0].as_ref(),
            target.as_ref(),
            args.skip_broken_bitmaps,
        )?;
    }
    Ok(())
}

/// What `-B` / `-o backing_file` leave the copy with.
enum Backing {
    /// The target's backing file, if any.
    To(Option<String>),
    /// qemu-img prints an error but copies nothing and exits 0 (--target-is-zero with a
    /// backing file); drop-in mode does the same.
    Refused,
}

/// The formats qemu-img creates with a backing file (`backing_file` among their creation
/// options); vdisk's VHDX and VPC drivers take one too, but qemu-img refuses them.
const BACKING_FORMATS: &[&str] = &["qcow2", "vmdk"];

/// qemu 10's block driver names (its `BlockdevDriver` enumeration), which a qcow2
/// image's backing format must be one of.
const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "io_uring",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "nvme-io_uring",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Checks `-B`/`-F` (and `-o backing_file`) in qemu-img's order and adds them to the
/// creation options; returns the target's backing file name.
fn target_backing(
    ctx: &Ctx,
    args: &ConvertArgs,
    format: &str,
    settings: &mut Settings,
) -> Result<Backing, Failure> {
    let mut backing = args.backing_file.clone();
    let mut has_format = false;
    if !args.no_create {
        let mut options = CreateOptions::parse_options(&settings.create_options)
            .map_err(|e| Failure::same(e.message()))?;
        let takes_backing = BACKING_FORMATS.contains(&format);
        let refuse = |what: &str, flag: &str| {
            Failure::new(
                format!("{what} not supported for file format '{format}'"),
                format!(
                    "convert: {flag}: {format} images have no backing file (qcow2 and vmdk do)"
                ),
            )
        };
        if let Some(file) = &args.backing_file {
            if !takes_backing {
                return Err(refuse("Backing file", "-B"));
            }
            options.insert("backing_file".into(), file.clone());
        }
        if let Some(fmt) = &args.backing_format {
            if !takes_backing {
                return Err(refuse("Backing file format", "-F"));
            }
            // qcow2's creation checks the name against every driver qemu has.
            if format == "qcow2" && !QEMU_DRIVERS.contains(&fmt.as_str()) {
                return Err(Failure::new(
                    format!(
                        "{}: error while converting qcow2: Parameter 'backing-fmt' does not \
                         accept value '{fmt}'",
                        settings.target.display()
                    ),
                    format!("convert: -F: unknown format '{fmt}'"),
                ));
            }
            options.insert("backing_fmt".into(), fmt.clone());
        }
        if args.backing_file.is_some() || args.backing_format.is_some() {
            settings.create_options = options
                .iter()
                .map(|(k, v)| format!("{k}={}", v.replace(',', ",,")))
                .collect::<Vec<_>>()
                .join(",");
        }
        // -B wins over -o backing_file (it is set after -o is read, as in qemu-img).
        if takes_backing {
            backing = options.get("backing_file").cloned();
        }
        has_format = options.contains_key("backing_fmt");
    }
    if backing.is_some() && args.target_is_zero {
        let text = "Cannot use --target-is-zero when the destination image has a backing file";
        if ctx.dropin {
            // qemu-img 10 prints this but returns success without copying anything.
            ctx.error(text);
            return Ok(Backing::Refused);
        }
        return Err(Failure::new(
            text,
            "convert: --target-is-zero: a target with a backing file reads as that file, \
             not as zeroes",
        ));
    }
    if backing.is_some() && settings.sources.len() > 1 {
        return Err(Failure::same(
            "Having a backing file for the target makes no sense when concatenating multiple \
             input images",
        ));
    }
    if backing.is_some() && !args.no_create && !has_format {
        return Err(Failure::new(
            "Use of backing file requires explicit backing format",
            "convert: a backing file needs its format too: add -F FMT (or -o backing_fmt=FMT)",
        ));
    }
    Ok(Backing::To(backing))
}

/// qemu-img words a failed creation inside convert as `NAME: error while converting FMT: ...`.
fn convert_create_failure(path: &Path, format: &str, err: &Error) -> Failure {
    let name = path.to_string_lossy();
    let mut failure = create_failure(&name, format, err);
    if err.kind() == ErrorKind::InvalidInput && err.message().starts_with("Invalid parameter") {
        // An unknown -o option: qemu-img rejects it before creating, and says only that.
        failure.qemu = err.message().to_string();
    } else if let Some(rest) = failure.qemu.strip_prefix(&format!("{name}: ")) {
        // qemu-img create checks this itself; under convert the qcow2 driver words it.
        let rest = match rest {
            "Backing format specified without backing file" => {
                "Backing format cannot be used without backing file"
            }
            other => other,
        };
        failure.qemu = format!("{name}: error while converting {format}: {rest}");
    }
    failure
}

/// True when both names lead to one existing file (hard links and symlinks included).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// qemu-img refuses this through its image lock (the source holds it); we say why.
fn self_overwrite_failure(source: &Path, target: &Path, format: &str, no_create: bool) -> Failure {
    let t = target.to_string_lossy();
    let lock = format!("Failed to get \"write\" lock\nIs another process using the image [{t}]?");
    let qemu = if no_create {
        format!("Could not open '{t}': {lock}")
    } else {
        format!("{t}: error while converting {format}: {lock}")
    };
    Failure::new(
        qemu,
        format!(
            "convert: the target '{t}' is the source '{}': converting an image onto itself \
             would destroy it (write to another file)",
            source.display()
        ),
    )
}

/// The progress of a copy, plus the warnings of `--salvage` as qemu-img prints them.
struct Salvaging<'a> {
    ctx: &'a Ctx,
    progress: &'a ProgressReporter,
    quiet: bool,
}

impl convert::Progress for Salvaging<'_> {
    fn advance(&self, bytes: u64) {
        self.progress.advance(bytes)
    }

    fn wants_total(&self) -> bool {
        self.progress.wants_total()
    }

    fn set_total(&self, total: u64) {
        self.progress.set_total(total)
    }

    fn salvaged(&self, offset: u64, err: &Error) {
        if self.quiet {
            return;
        }
        if self.ctx.dropin {
            self.ctx.error(format_args!(
                "warning: error while reading offset {offset}: {}",
                crate::context::qemu_read_error(err)
            ));
        } else {
            self.ctx.error(format_args!(
                "warning: convert: the source's 512 bytes at {offset} cannot be read \
                 and are written as zeroes: {err}"
            ));
        }
    }
}

fn copy_failure(err: &Error) -> Failure {
    let at = err.offset().unwrap_or(0);
    let text = match err.op() {
        "read" => format!(
            "error while reading at byte {at}: {}",
            crate::context::qemu_read_error(err)
        ),
        "write" | "write zeroes" | "write compressed" => format!(
            "error while writing at byte {at}: {}",
            crate::context::without_hint(err.message())
        ),
        "flush" => format!("error while flushing the target: {}", err.message()),
        _ => err.to_string(),
    };
    Failure::new(text, format!("convert: {err}"))
}

/// The `-o` items of a new target, checked as qemu-img's option parser checks them.
struct CheckedOptions {
    /// The items the driver takes, with its values (sizes and numbers in decimal, booleans
    /// as on/off).
    list: String,
    /// Every item as typed, the file protocol's included, in order.
    typed: Vec<(String, String)>,
    /// The refusal qemu's driver makes when it creates the target, if any.
    at_creation: Option<Failure>,
}

/// Checks the `-o` items as qemu-img's option parser does: known to the target's driver,
/// a valid value of the option's type.
fn check_create_options(
    driver: &dyn vdisk_block::Format,
    target: &Path,
    list: &str,
) -> Result<CheckedOptions, Failure> {
    use super::option_help::{check_value, key_value, kind, protocol_extras};
    let mut known: Vec<&str> = driver
        .create_options_help()
        .iter()
        .map(|(n, _)| *n)
        .collect();
    let extras = protocol_extras(driver);
    known.extend(&extras);
    let mut out = Vec::new();
    let mut typed: Vec<(String, String)> = Vec::new();
    let mut protocol_refusal = None;
    for item in vdisk_block::format::split_option_list(list)
        .iter()
        .filter(|i| !i.is_empty())
    {
        let (key, value) = key_value(item);
        if !known.contains(&key.as_str()) {
            return Err(Failure::new(
                format!("Invalid parameter '{key}'"),
                format!(
                    "convert: format '{}' has no option '{key}' (see -o help)",
                    driver.name()
                ),
            ));
        }
        let checked = check_value(&key, kind(driver.name(), &key), &value)
            .map_err(|f| Failure::new(f.qemu, format!("convert: {}", f.vdisk)))?;
        typed.push((key.clone(), value.clone()));
        if extras.contains(&key.as_str()) {
            // The file protocol's option, which has no effect on this format's file; qemu
            // checks its value when it creates the file.
            let fail = |why: &str| {
                let t = target.display();
                Failure::new(
                    format!("{t}: error while converting {}: {why}", driver.name()),
                    format!("convert: option {key}: {why}"),
                )
            };
            let refusal = match (key.as_str(), checked.value.as_str()) {
                ("preallocation", "off" | "falloc" | "full") => None,
                ("preallocation", "metadata") => {
                    Some(fail("Unsupported preallocation mode: metadata"))
                }
                ("preallocation", other) => {
                    Some(fail(&format!("invalid parameter value: {other}")))
                }
                ("extent_size_hint", v) if v.parse::<u64>().unwrap_or(0) > u64::from(u32::MAX) => {
                    Some(fail("Extent size hint is too large"))
                }
                _ => None,
            };
            protocol_refusal = protocol_refusal.or(refusal);
            continue;
        }
        out.push(format!("{key}={}", checked.value.replace(',', ",,")));
    }
    let pairs: Vec<(&str, &str)> = typed
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // qemu's driver meets a value outside an option's list only when it creates the file.
    let at_creation = super::option_enums::refusal(driver.name(), &pairs).map(|why| {
        let t = target.display();
        Failure::new(
            format!("{t}: error while converting {}: {why}", driver.name()),
            format!("convert: {why}"),
        )
    });
    Ok(CheckedOptions {
        list: out.join(","),
        typed,
        at_creation: protocol_refusal.or(at_creation),
    })
}
