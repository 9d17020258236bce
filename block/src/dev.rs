//! The interface every opened image implements and every consumer calls.
//!
//! An image is `Send + Sync` and every method takes `&self`: convert workers, virtio queues and
//! a background job use one image at once. Implementations keep metadata behind fine-grained
//! locks and run data I/O without them.
//!
//! Data can move two ways:
//! - the simple path, [`BlockDev::read_at`] / [`BlockDev::write_at`], does everything inside
//!   the image;
//! - the split path, [`BlockDev::resolve_read`] (and, for writable formats, the format's own
//!   resolve/commit pair), returns host ranges so a caller with a deep queue (io_uring batches,
//!   the VMM) moves the payload itself while the metadata stays consistent.

use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::file::HostFile;

/// What a range of the device reads as, and where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    /// Guest offset where this extent starts.
    pub offset: u64,
    /// Length in bytes; never zero.
    pub len: u64,
    /// The range holds data in this layer (it may still happen to be zero bytes).
    pub data: bool,
    /// The range is known to read as zeroes.
    pub zero: bool,
    /// This layer decides the contents of the range; `false` means the read falls through to
    /// the backing device (or reads zeroes if there is none).
    pub allocated: bool,
    /// The data is stored compressed (no plain host offset exists).
    pub compressed: bool,
    /// Where the bytes live on the host, when there is a plain mapping.
    pub host: Option<HostLocation>,
}

/// A host file and an offset inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLocation {
    /// The file holding the bytes (the image itself, a data file or an extent).
    pub file: PathBuf,
    /// Byte offset in that file.
    pub offset: u64,
}

/// How write-zeroes may achieve its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroMode {
    /// Keep the range allocated (zero in place, or zero range without deallocation).
    #[default]
    KeepAllocated,
    /// The range may be deallocated if it then reads as zeroes.
    MayUnmap,
}

/// How much of the space of a created or grown image to reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Allocate nothing ahead of time.
    #[default]
    Off,
    /// Allocate metadata only (formats with metadata; raw treats it as `Off`).
    Metadata,
    /// Reserve space with `fallocate` without writing it.
    Falloc,
    /// Write zeroes to every byte.
    Full,
}

impl Preallocation {
    /// Parses qemu-img's spelling (`off`, `metadata`, `falloc`, `full`).
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "off" => Ok(Self::Off),
            "metadata" => Ok(Self::Metadata),
            "falloc" => Ok(Self::Falloc),
            "full" => Ok(Self::Full),
            other => Err(Error::invalid(
                "parse preallocation",
                format!(
                    "invalid preallocation mode '{other}': expected off, metadata, falloc or full"
                ),
            )),
        }
    }

    /// qemu-img's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Metadata => "metadata",
            Self::Falloc => "falloc",
            Self::Full => "full",
        }
    }
}

/// One piece of a guest range as the image resolved it for a read.
#[derive(Debug, Clone)]
pub enum ReadSegment {
    /// Read `len` bytes from `file` at `offset`.
    Host {
        /// The host file.
        file: Arc<HostFile>,
        /// Host offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `len` bytes of zeroes; nothing to read.
    Zero {
        /// Length in bytes.
        len: u64,
    },
    /// `len` bytes the image must produce itself (compressed, encrypted, from a backing chain):
    /// call [`BlockDev::read_at`] for them.
    Indirect {
        /// Length in bytes.
        len: u64,
    },
}

impl ReadSegment {
    /// The number of guest bytes this segment covers.
    pub fn len(&self) -> u64 {
        match self {
            Self::Host { len, .. } | Self::Zero { len } | Self::Indirect { len } => *len,
        }
    }

    /// True when the segment covers nothing (never produced by a well-behaved image).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Static facts about an opened image that front ends print.
#[derive(Debug, Clone, Default)]
pub struct ImageInfo {
    /// The format name as qemu-img spells it (`raw`, `qcow2`, `vmdk`, `vhdx`, `vpc`).
    pub format: String,
    /// The name the image was opened by.
    pub filename: PathBuf,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes the image's files occupy on the host, when known.
    pub actual_size: Option<u64>,
    /// Length of the image's own host file.
    pub file_length: Option<u64>,
    /// Allocation unit of the format, when it has one.
    pub cluster_size: Option<u64>,
    /// The dirty flag as qemu-img reports it.
    pub dirty: bool,
    /// The image is encrypted.
    pub encrypted: bool,
    /// The backing file name as stored in the image.
    pub backing_filename: Option<String>,
    /// The backing file name resolved against the image's folder.
    pub full_backing_filename: Option<PathBuf>,
    /// The backing format as stored in the image.
    pub backing_format: Option<String>,
    /// Host files of the image besides its own (VMDK extents in other files), each with
    /// the child name qemu gives it (`extents.0`, ...), in qemu's order.
    pub children: Vec<(String, PathBuf)>,
}

/// One value of an image's format-specific facts, shaped like the JSON qemu prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoValue {
    /// `true` / `false`.
    Bool(bool),
    /// A signed number.
    Int(i64),
    /// An unsigned number (qemu prints some, like VMDK CIDs, as large unsigned values).
    UInt(u64),
    /// A string.
    Text(String),
    /// A list.
    List(Vec<InfoValue>),
    /// An object; keys are kept in the order qemu-img prints them.
    Map(Vec<(String, InfoValue)>),
}

/// The format-specific part of `info` (qemu's `ImageInfoSpecific`): `{"type": kind, "data":
/// {...}}`. Drivers list the keys in the order qemu-img prints them, since the front end
/// prints them in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatSpecific {
    /// The `type` (usually the format name: `qcow2`, `vmdk`, `luks`).
    pub kind: String,
    /// The `data` object.
    pub data: Vec<(String, InfoValue)>,
}

/// One internal snapshot as `info` lists it (qemu's `SnapshotInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The unique id string.
    pub id: String,
    /// The name (tag).
    pub name: String,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
    /// Creation time: seconds since the epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds within the second.
    pub date_nsec: u32,
    /// Guest clock when it was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count when it was taken, if the image recorded one.
    pub icount: Option<u64>,
}

/// One persistent dirty bitmap as the image stores it (qemu's `BlockDirtyInfo`, reduced to
/// what an offline tool sees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmapInfo {
    /// Unique name.
    pub name: String,
    /// Bytes of guest data one bit covers.
    pub granularity: u64,
    /// Recording guest writes (qcow2's `auto` flag).
    pub enabled: bool,
    /// Found `in_use` when the image was opened (not saved cleanly): only removal is
    /// allowed.
    pub inconsistent: bool,
}

fn no_bitmaps<T>(op: &'static str) -> Result<T> {
    Err(Error::unsupported(op, "Operation not supported"))
}

/// An opened disk image or device, shared by many threads.
///
/// Offsets and lengths are bytes of the guest-visible contents. Requests must lie inside
/// `0..size()`; implementations return [`crate::ErrorKind::OutOfRange`] otherwise.
pub trait BlockDev: Send + Sync {
    /// Guest-visible size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the contents at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes `len` bytes at `offset` read as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<()>;

    /// Tells the image that `len` bytes at `offset` are no longer needed. Afterwards the range
    /// reads as zeroes or as the backing device, as the format defines.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes every completed write durable, metadata included.
    fn flush(&self) -> Result<()>;

    /// Describes the extent that starts at `offset`, looking at most `len` bytes ahead.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus>;

    /// Changes the guest-visible size.
    fn resize(&self, new_size: u64, prealloc: Preallocation) -> Result<()>;

    /// Facts about the image for `info`.
    fn info(&self) -> Result<ImageInfo>;

    /// Format-specific facts for `info`, when the format has any (qcow2's compat level and
    /// features, VMDK's create type and extents, ...). Added after `info` so drivers that
    /// have none need not say so.
    fn format_specific(&self) -> Result<Option<FormatSpecific>> {
        Ok(None)
    }

    /// The unit compressed writes cover (qcow2's cluster size), when the image takes
    /// compressed writes (`convert -c`); `None` for images that store data plainly.
    fn compressed_unit(&self) -> Option<u64> {
        None
    }

    /// True when the image stores every write compressed, `-c` or not (a VMDK
    /// streamOptimized target): a copy then takes the compressed path, so whole units are
    /// compressed by many threads before their turn to be written.
    fn compresses_every_write(&self) -> bool {
        false
    }

    /// Compresses one unit of guest data (see [`BlockDev::compressed_unit`]) for a later
    /// [`BlockDev::write_compressed_unit`]. Only CPU work, no I/O and no lock, so many
    /// threads can compress while the writes themselves still go in order. `None`: the data
    /// does not compress and is stored plainly.
    fn compress_unit(&self, buf: &[u8]) -> Result<Option<Vec<u8>>> {
        let _ = buf;
        Err(crate::Error::unsupported(
            "write compressed",
            "Operation not supported",
        ))
    }

    /// Writes the whole unit at `offset` (shorter only at the end of the disk): `packed`
    /// as [`BlockDev::compress_unit`] made it from `buf`, or `buf` plainly when `None`.
    /// An empty `buf` ends a compressed copy, as qemu-img's zero-length compressed write
    /// does (qcow2 then pads its file to a whole sector).
    fn write_compressed_unit(&self, buf: &[u8], packed: Option<&[u8]>, offset: u64) -> Result<()> {
        let _ = (buf, packed, offset);
        Err(crate::Error::unsupported(
            "write compressed",
            "Operation not supported",
        ))
    }

    /// The image's internal snapshots, oldest first (none for formats without them).
    fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(Vec::new())
    }

    /// Takes an internal snapshot of the current contents named `name` (`qemu-img snapshot
    /// -c`). As in qemu, names need not be unique; the new snapshot gets the next free id.
    /// Formats without internal snapshots refuse with qemu's words.
    fn snapshot_create(&self, name: &str) -> Result<()> {
        let _ = name;
        Err(Error::unsupported(
            "create snapshot",
            "Operation not supported",
        ))
    }

    /// Reverts the contents to the snapshot whose id, or else whose name, is `id_or_name`
    /// (`qemu-img snapshot -a`); the snapshot stays.
    fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        let _ = id_or_name;
        Err(Error::unsupported(
            "apply snapshot",
            "Block driver does not support snapshots",
        ))
    }

    /// Deletes the snapshot whose id is `id` and whose name is `name` (both must match, as
    /// in qemu's `bdrv_snapshot_delete`).
    fn snapshot_delete(&self, id: &str, name: &str) -> Result<()> {
        let _ = (id, name);
        Err(Error::unsupported(
            "delete snapshot",
            "Block driver does not support snapshots",
        ))
    }

    /// Makes a read-only device show the snapshot chosen by `id` and `name` instead of the
    /// current contents (qemu's `bdrv_snapshot_load_tmp`, used by `convert -l`): when both
    /// are given both must match. The guest-visible size stays the current one.
    fn load_snapshot(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        let _ = (id, name);
        let format = self.info().map(|i| i.format).unwrap_or_default();
        Err(Error::unsupported(
            "load snapshot",
            format!(
                "Block format '{format}' used by device '' does not support temporarily loading internal snapshots"
            ),
        ))
    }

    /// The device reads fallthrough ranges from, if any.
    fn backing(&self) -> Option<Arc<dyn BlockDev>> {
        None
    }

    /// True when a freshly created image of this kind reads as zeroes everywhere, so a copy
    /// into it may skip zero ranges entirely.
    fn has_zero_init(&self) -> bool {
        false
    }

    /// The smallest unit that reads and writes should be aligned to for efficiency.
    fn request_alignment(&self) -> u64 {
        1
    }

    /// Resolves a guest range for reading without moving the data. The default sends every
    /// byte through [`BlockDev::read_at`].
    fn resolve_read(&self, offset: u64, len: u64) -> Result<Vec<ReadSegment>> {
        check_range("resolve read", self.size(), offset, len)?;
        Ok(vec![ReadSegment::Indirect { len }])
    }

    /// True when the image was opened read-only.
    fn is_read_only(&self) -> bool;

    /// The image's persistent dirty bitmaps (none for formats without them).
    fn dirty_bitmaps(&self) -> Result<Vec<DirtyBitmapInfo>> {
        Ok(Vec::new())
    }

    /// Adds an empty persistent bitmap (`granularity` `None`: the format's default),
    /// recording writes unless `disabled`.
    fn dirty_bitmap_add(&self, name: &str, granularity: Option<u64>, disabled: bool) -> Result<()> {
        let _ = (name, granularity, disabled);
        no_bitmaps("add bitmap")
    }

    /// Deletes a bitmap (inconsistent ones too).
    fn dirty_bitmap_remove(&self, name: &str) -> Result<()> {
        let _ = name;
        no_bitmaps("remove bitmap")
    }

    /// Clears every bit of a bitmap.
    fn dirty_bitmap_clear(&self, name: &str) -> Result<()> {
        let _ = name;
        no_bitmaps("clear bitmap")
    }

    /// Makes a bitmap record guest writes (`enabled`) or stop recording.
    fn dirty_bitmap_enable(&self, name: &str, enabled: bool) -> Result<()> {
        let _ = (name, enabled);
        no_bitmaps("enable bitmap")
    }

    /// ORs bitmap `src_name` of `src` (which may be this device) into bitmap `dst`.
    fn dirty_bitmap_merge(&self, dst: &str, src: &dyn BlockDev, src_name: &str) -> Result<()> {
        let _ = (dst, src, src_name);
        no_bitmaps("merge bitmap")
    }

    /// The dirty ranges of a bitmap as `(offset, len)` in guest bytes, sorted, merged and
    /// whole granules (the last one cut at the end of the disk).
    fn dirty_bitmap_ranges(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let _ = name;
        no_bitmaps("query bitmap")
    }

    /// Marks `[offset, offset + len)` dirty (`dirty`) or clean in a bitmap, widened to whole
    /// granules when setting and narrowed to whole granules when clearing.
    fn dirty_bitmap_set_range(&self, name: &str, offset: u64, len: u64, dirty: bool) -> Result<()> {
        let _ = (name, offset, len, dirty);
        no_bitmaps("set bitmap range")
    }

    /// Writes the bitmaps back to the image now (they are otherwise stored when the device
    /// is dropped), so a caller sees the errors.
    fn store_dirty_bitmaps(&self) -> Result<()> {
        Ok(())
    }
}

/// Rejects a request that does not lie inside a device of `size` bytes.
pub fn check_range(op: &'static str, size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::new(
            crate::ErrorKind::OutOfRange,
            op,
            format!("range {offset}+{len} lies outside the device of {size} bytes"),
        )
        .at_offset(offset)),
    }
}
