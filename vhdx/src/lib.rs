//! The VHDX and VHD format drivers of vdisk.
//!
//! - [`VhdxFormat`] / [`VhdxImage`]: Hyper-V's VHDX (fixed, dynamic, differencing), with the
//!   log replayed in memory on open so read-only opens see the replayed image without
//!   writing the file.
//! - [`VpcFormat`] / [`VpcImage`]: the legacy VHD (qemu's `vpc`), fixed, dynamic and
//!   differencing, with qemu's rules for the disk size (CHS geometry or current size).
//!
//! Both are read-only for now (issue 6 tracks create, writes with the log, resize, check).
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
