//! The VHDX and VHD format drivers of vdisk.
//!
//! - [`VhdxFormat`] / [`VhdxImage`]: Hyper-V's VHDX (fixed, dynamic, differencing chains):
//!   open (the log replayed in memory, so read-only opens see the replayed image without
//!   writing the file), create, write with write-ahead logging of every BAT and metadata
//!   change, resize, check and repair.
//! - [`VpcFormat`] / [`VpcImage`]: the legacy VHD (qemu's `vpc`), fixed, dynamic and
//!   differencing, with qemu's rules for the disk size (CHS geometry or current size):
//!   open, create, write.
//!
//! Layout: [`vhdx`] and [`vpc`] hold one module per on-disk structure (parse and encode)
//! plus `image` (open and read), `write`, `create` and `format` (the [`vdisk_block::Format`]
//! driver); [`overlay`] is the replayed view of a file; [`fuzzing`] holds the entry points
//! of fuzz targets.
#![forbid(unsafe_code)]

mod bytes;
pub mod crc32c;
pub mod fuzzing;
pub mod guid;
pub mod overlay;
pub mod vhdx;
pub mod vpc;

pub use vhdx::format::VhdxFormat;
pub use vhdx::image::VhdxImage;
pub use vpc::format::VpcFormat;
pub use vpc::image::VpcImage;
