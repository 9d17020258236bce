//! The interface of a format driver: probe, open, create, check and amend.
//!
//! A driver never opens a file the caller did not allow: every extra file (backing file, data
//! file, extent, parent) is requested through [`OpenOptions::policy`], and the backing format
//! comes from the image or the caller, never from probing a file a guest could have written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::dev::{BlockDev, Preallocation};
use crate::error::{Error, Result};
use crate::file::CacheMode;
use crate::file::EngineChoice;

/// Which files besides the one named a driver may open.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FollowPolicy {
    /// Open no other file: backing chains, data files and extents are refused.
    Nothing,
    /// Open other files only inside the image's own folder (and below it).
    #[default]
    SameFolder,
    /// Open other files inside the image's folder or one of these folders.
    Folders(Vec<PathBuf>),
    /// Open any file the image names.
    Anything,
}

impl FollowPolicy {
    /// Decides whether `target`, named by the image at `image`, may be opened.
    pub fn allows(&self, image: &Path, target: &Path) -> Result<()> {
        // A bare file name has an empty parent, which would canonicalize to nothing.
        let base = image
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."));
        // A target that does not exist is judged by the folder it would be in, so a missing
        // backing file inside the allowed folders fails as missing, not as forbidden.
        let resolved = target.canonicalize().ok().or_else(|| {
            let name = target.file_name()?;
            let parent = target
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| Path::new("."));
            Some(parent.canonicalize().ok()?.join(name))
        });
        let inside = |folder: &Path| -> bool {
            let (Ok(folder), Some(target)) = (folder.canonicalize(), resolved.as_ref()) else {
                return false;
            };
            target.starts_with(folder)
        };
        let allowed = match self {
            FollowPolicy::Nothing => false,
            FollowPolicy::SameFolder => inside(base),
            FollowPolicy::Folders(extra) => inside(base) || extra.iter().any(|f| inside(f)),
            FollowPolicy::Anything => true,
        };
        if allowed {
            Ok(())
        } else {
            Err(Error::new(
                crate::ErrorKind::PolicyDenied,
                "open",
                format!(
                    "'{}' names '{}', which the open policy does not allow (allow it explicitly to follow it)",
                    image.display(),
                    target.display()
                ),
            )
            .with_path(target))
        }
    }
}

/// Opens the other images an image names (backing files, parents), supplied by the layer
/// that knows every format (`vdisk_blockjobs`), so a format crate never depends on another.
pub trait ImageOpener: Send + Sync {
    /// Opens `path` as `format` (never probed when the image recorded a format).
    fn open_image(
        &self,
        path: &Path,
        format: Option<&str>,
        options: &OpenOptions,
    ) -> Result<Arc<dyn BlockDev>>;
}

/// How to open an image.
#[derive(Clone)]
pub struct OpenOptions {
    /// Open for writing.
    pub writable: bool,
    /// Host cache mode for the image's files.
    pub cache: CacheMode,
    /// Which I/O engine to use for the image's files.
    pub engine: EngineChoice,
    /// Which other files may be opened.
    pub policy: FollowPolicy,
    /// Open no backing file at all (reads of unallocated ranges return zeroes).
    pub no_backing: bool,
    /// Share the image with another writer (qemu-img's `-U`): skip locking.
    pub force_share: bool,
    /// The caller reads only metadata, never guest data (qemu's `BDRV_O_NO_IO`, used by
    /// `info`): a driver may then skip what only data needs, such as unlocking an encrypted
    /// image, and fail the first data access instead.
    pub metadata_only: bool,
    /// Driver-specific options (`--image-opts` style `key=value`).
    pub driver_options: BTreeMap<String, String>,
    /// How to open backing files and parents; `None` means the image cannot open any (a
    /// driver then fails clearly when it needs one, unless `no_backing` is set).
    pub opener: Option<Arc<dyn ImageOpener>>,
}

impl std::fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenOptions")
            .field("writable", &self.writable)
            .field("cache", &self.cache)
            .field("engine", &self.engine)
            .field("policy", &self.policy)
            .field("no_backing", &self.no_backing)
            .field("force_share", &self.force_share)
            .field("metadata_only", &self.metadata_only)
            .field("driver_options", &self.driver_options)
            .field("opener", &self.opener.is_some())
            .finish()
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            cache: CacheMode::Writeback,
            engine: EngineChoice::Auto,
            policy: FollowPolicy::SameFolder,
            no_backing: false,
            force_share: false,
            metadata_only: false,
            driver_options: BTreeMap::new(),
            opener: None,
        }
    }
}

impl OpenOptions {
    /// Read-only defaults.
    pub fn read_only() -> Self {
        Self::default()
    }

    /// Read-write defaults.
    pub fn read_write() -> Self {
        OpenOptions {
            writable: true,
            ..Self::default()
        }
    }
}

/// Options of `create`, as `-o key=value,...` gives them, plus the size.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Guest-visible size in bytes.
    pub size: u64,
    /// Remaining `-o` options, by name. A driver removes what it understands and rejects the
    /// rest, so no option is silently ignored.
    pub options: BTreeMap<String, String>,
}

impl CreateOptions {
    /// Parses an `-o` string (`a=1,b=2`, `,,` escapes a comma) into options.
    pub fn parse_options(text: &str) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for item in split_option_list(text) {
            if item.is_empty() {
                continue;
            }
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (item.clone(), "on".to_string()),
            };
            out.insert(key, value);
        }
        Ok(out)
    }

    /// Takes option `key` out, if present.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.options.remove(key)
    }

    /// Takes a boolean option (`on`/`off`, `true`/`false`, `yes`/`no`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>> {
        self.take(key).map(|v| parse_bool(key, &v)).transpose()
    }

    /// Takes a size option (`64k`, `1M`, a plain number of bytes).
    pub fn take_size(&mut self, key: &str) -> Result<Option<u64>> {
        self.take(key)
            .map(|v| crate::size::parse_size(&v))
            .transpose()
    }

    /// Takes the `preallocation` option.
    pub fn take_preallocation(&mut self) -> Result<Preallocation> {
        Ok(match self.take("preallocation") {
            Some(v) => Preallocation::parse(&v)?,
            None => Preallocation::Off,
        })
    }

    /// Fails naming the first option nobody took.
    pub fn reject_leftovers(&self, format: &str) -> Result<()> {
        match self.options.keys().next() {
            None => Ok(()),
            Some(key) => Err(
                Error::invalid("create", format!("Invalid parameter '{key}'")).with_source(
                    std::io::Error::other(format!(
                        "format '{format}' has no option '{key}' (see '-o help')"
                    )),
                ),
            ),
        }
    }
}

/// Splits `a=1,b=x,,y` into `["a=1", "b=x,y"]`.
pub fn split_option_list(text: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    items.push(current);
    items
}

/// Parses qemu's boolean spellings.
pub fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(Error::invalid(
            "parse option",
            format!("Parameter '{key}' expects 'on' or 'off'"),
        )),
    }
}

/// What `check` found (and, with repair, fixed), counted as qemu-img counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies that can lose data.
    pub corruptions: u64,
    /// Allocated space nothing uses.
    pub leaks: u64,
    /// Errors that kept the check itself from finishing a part.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Offset of the end of the last used host cluster.
    pub image_end_offset: Option<u64>,
    /// Clusters of the whole virtual disk.
    pub total_clusters: Option<u64>,
    /// Clusters allocated.
    pub allocated_clusters: Option<u64>,
    /// Clusters not contiguous with their predecessor.
    pub fragmented_clusters: Option<u64>,
    /// Clusters stored compressed.
    pub compressed_clusters: Option<u64>,
    /// One line per finding, as qemu-img prints them on stderr.
    pub messages: Vec<String>,
    /// Set when the check stopped with this error after printing `messages`, reporting no
    /// counts (qemu-img's "Check failed: ..."), as a repair that cannot proceed does.
    pub failed: Option<String>,
}

/// What `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RepairMode {
    /// Report only.
    #[default]
    None,
    /// Repair leaks only (`-r leaks`).
    Leaks,
    /// Repair everything repairable (`-r all`).
    All,
}

/// How much host space an image needs, as `qemu-img measure` reports it
/// (qemu's `BlockMeasureInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes the image needs for its metadata and the data it will hold.
    pub required: u64,
    /// Bytes the image needs once every guest cluster is allocated.
    pub fully_allocated: u64,
    /// Bytes the source's persistent dirty bitmaps would need in the new image; `None` when
    /// the source or the target cannot hold persistent bitmaps (qemu then omits the field).
    pub bitmaps: Option<u64>,
}

/// A format driver.
pub trait Format: Send + Sync {
    /// The name qemu-img uses (`raw`, `qcow2`, `vmdk`, `vhdx`, `vpc`).
    fn name(&self) -> &'static str;

    /// How confident the driver is that `header` (the first bytes of `path`) is its format:
    /// 0 = not at all, 100 = magic matched.
    fn probe(&self, header: &[u8], path: &Path) -> u32;

    /// Opens `path`. Backing files and other files are opened only as `options.policy` allows.
    fn open(&self, path: &Path, options: &OpenOptions) -> Result<Arc<dyn BlockDev>>;

    /// Creates a new image at `path`. Unknown options are an error.
    fn create(&self, path: &Path, options: CreateOptions) -> Result<()>;

    /// The `-o` options `create` accepts, with one line of help each.
    fn create_options_help(&self) -> Vec<(&'static str, &'static str)>;

    /// The options qemu-img's `Formatting '...'` line shows for this format, in qemu's order,
    /// each with the value shown when the user did not give it (`None`: shown only when
    /// given). By default: `size`, then the `-o` options in the order of
    /// [`Format::create_options_help`], none shown unless given.
    fn create_options_shown(&self) -> Vec<(&'static str, Option<&'static str>)> {
        let mut shown = vec![("size", None)];
        shown.extend(
            self.create_options_help()
                .into_iter()
                .filter(|(name, _)| *name != "size")
                .map(|(name, _)| (name, None)),
        );
        shown
    }

    /// Measures a new image of this format (`qemu-img measure`): an empty one of
    /// `options.size` bytes, or, with `source`, a converted copy of that device (whose
    /// allocation decides what is required). `options` are the `-o` options, already checked
    /// to be known and well-typed by the caller; the driver validates their values.
    fn measure(
        &self,
        options: CreateOptions,
        source: Option<&dyn BlockDev>,
    ) -> Result<Measurement> {
        let _ = (options, source);
        Err(Error::unsupported(
            "measure",
            format!(
                "Block driver '{}' does not support size measurement",
                self.name()
            ),
        ))
    }

    /// The driver options (`--image-opts` keys besides `driver` and `file.filename`) that
    /// [`Format::open`] takes from [`OpenOptions::driver_options`]; others are refused
    /// before opening, as qemu refuses them.
    fn open_option_names(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether images of this format accept `convert -c` (qemu-img refuses the others
    /// before creating anything). A format may take the option and still store some images
    /// plainly, as qemu's vmdk driver does outside streamOptimized.
    fn supports_compression(&self) -> bool {
        false
    }

    /// Checks (and with `repair`, repairs) the image's metadata.
    fn check(&self, path: &Path, options: &OpenOptions, repair: RepairMode) -> Result<CheckReport> {
        let _ = (path, options, repair);
        Err(Error::unsupported(
            "check",
            "This image format does not support checks",
        ))
    }

    /// Rewrites the backing file name and format stored in the image at `path`, as
    /// `rebase` does once the data is in place: `Some("")` removes the backing file, `None`
    /// keeps the current value. Formats that cannot store a backing file name refuse.
    fn set_backing(&self, path: &Path, name: Option<&str>, format: Option<&str>) -> Result<()> {
        let _ = (path, name, format);
        Err(Error::unsupported("set backing", "Operation not supported"))
    }

    /// Changes format options of an existing image in place.
    fn amend(&self, path: &Path, options: CreateOptions) -> Result<()> {
        let _ = (path, options);
        Err(Error::unsupported(
            "amend",
            format!(
                "Format driver '{}' does not support option amendment",
                self.name()
            ),
        ))
    }

    /// [`Format::amend`] with what the command line gives besides `-o`: the driver options
    /// the image is opened with (`--image-opts` keys, such as luks's `key-secret`: changing
    /// key slots needs the master key) and qemu-img's `--force` (luks: erase the last
    /// active key slot, overwrite an active one). By default a driver needs neither and
    /// this is [`Format::amend`].
    fn amend_with(
        &self,
        path: &Path,
        driver_options: &BTreeMap<String, String>,
        force: bool,
        options: CreateOptions,
    ) -> Result<()> {
        let _ = (driver_options, force);
        self.amend(path, options)
    }
}

/// How a driver's failure to open a backing file starts, as qemu-img words it: the whole
/// message is `Could not open backing file 'B': why`, or `Could not open backing file 'B'
/// (N levels deep): why` when `B` is the backing file of a backing file (N images below
/// the one opened), so that a front end can word it as qemu nests it.
pub const BACKING_FAILED: &str = "Could not open backing file ";

/// The [`BACKING_FAILED`] message for backing file `name` at `depth` (1: the image's own
/// backing file) that failed to open for `why`; [`split_backing_failure`] reads it back.
pub fn backing_failure(name: &str, depth: usize, why: &str) -> String {
    match depth {
        0 | 1 => format!("{BACKING_FAILED}'{name}': {why}"),
        _ => format!("{BACKING_FAILED}'{name}' ({depth} levels deep): {why}"),
    }
}

/// The backing file's name, the depth (1 for the image's own backing file) and the reason
/// of a [`BACKING_FAILED`] message; `None` for any other message.
pub fn split_backing_failure(message: &str) -> Option<(&str, usize, &str)> {
    let inner = message.strip_prefix(BACKING_FAILED)?.strip_prefix('\'')?;
    if let Some((name, rest)) = inner.split_once("' (") {
        if let Some((count, why)) = rest.split_once(" levels deep): ") {
            if let Ok(depth) = count.parse() {
                return Some((name, depth, why));
            }
        }
    }
    let (name, why) = inner.split_once("': ")?;
    Some((name, 1, why))
}

#[cfg(test)]
mod backing_failure_tests {
    use super::split_backing_failure;

    #[test]
    fn backing_failures_split_into_name_depth_and_reason() {
        for depth in [1, 2, 7] {
            let message = super::backing_failure("d/b.qcow2", depth, "gone");
            assert_eq!(
                split_backing_failure(&message),
                Some(("d/b.qcow2", depth, "gone"))
            );
        }
        assert_eq!(
            split_backing_failure("Could not open backing file 'b.qcow2': No such file"),
            Some(("b.qcow2", 1, "No such file"))
        );
        assert_eq!(
            split_backing_failure("Could not open backing file 'd/b' (3 levels deep): bad"),
            Some(("d/b", 3, "bad"))
        );
        assert_eq!(split_backing_failure("Could not open 'x': y"), None);
    }
}
