//! The block layer of vdisk: what every format implements and every consumer calls.
//!
//! - [`BlockDev`]: an opened image (`Send + Sync`, `&self` everywhere), with positional I/O,
//!   write-zeroes, discard, flush, block status, resize and info;
//! - [`Format`]: a driver that probes, opens, creates, checks and amends images, opening other
//!   files only as the caller's [`FollowPolicy`] allows;
//! - [`HostFile`]: host files with qemu's cache modes and the sync / io_uring engines;
//! - [`RawFormat`]: the raw format;
//! - [`MemImage`], [`testing`]: the in-memory model and the random-operation model checker
//!   that format crates reuse in their tests.

pub mod dev;
pub mod error;
pub mod file;
pub mod format;
pub mod handle;
pub mod mem;
pub mod raw;
pub mod size;
pub mod testing;

pub use dev::{
    check_range, BlockDev, BlockStatus, DirtyBitmapInfo, HostLocation, ImageInfo, Preallocation,
    ReadSegment, SnapshotInfo, ZeroMode,
};
pub use error::{Error, ErrorKind, Result};
pub use file::{AlignedBuf, CacheMode, EngineChoice, EngineKind, HostFile, IoOp};
pub use format::{CheckReport, CreateOptions, FollowPolicy, Format, OpenOptions, RepairMode};
pub use handle::SwappableDev;
pub use mem::MemImage;
pub use raw::{RawFormat, RawImage};
