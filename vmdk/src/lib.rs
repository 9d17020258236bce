//! The vmdk format driver of vdisk.
//!
//! Reads VMware disks: the text descriptor ([`descriptor`]), hosted sparse extents with their
//! grain directory and tables, zeroed and compressed grains, the streamOptimized layout with
//! markers and a footer ([`sparse`]), ESXi vmfsSparse (COWD) and seSparse deltas ([`esx`]),
//! FLAT/VMFS and ZERO extents ([`extent`]), and delta disks on a parent opened through the
//! caller's [`vdisk_block::format::ImageOpener`].
//!
//! Lifecycle of an open ([`open`]): classify the named file (sparse header or text
//! descriptor) → parse the descriptor → open each extent, following file names only as
//! the caller's [`vdisk_block::FollowPolicy`] allows → check and open the parent → an
//! [`VmdkImage`] that serves reads from many threads (grain tables cached behind a lock,
//! data read without one).
//!
//! Creating and writing: [`create`] (monolithic and split, sparse and flat, qemu-img's
//! options and byte layout) and [`stream`] (streamOptimized in VMware's layout, append-only).
//! Appliances: [`ova`] reads the disks of an `.ova` in place and those beside an `.ovf`.
//! [`check`] finds grain pointers outside their files; [`details`] gives what `qemu-img
//! info` prints under `format-specific`; [`fuzzing`] holds entry points for fuzz targets.
//!
//! Not here yet (issue 5): resize (qemu-img cannot resize VMDK either), writing vmfsSparse /
//! seSparse deltas, gzip-compressed OVF file references.
#![forbid(unsafe_code)]

pub mod check;
pub mod create;
pub mod descriptor;
pub mod details;
pub mod esx;
pub mod extent;
pub mod format;
pub mod fuzzing;
pub mod header;
pub mod image;
pub mod open;
pub mod ova;
pub mod ovf;
pub mod source;
pub mod sparse;
mod sparse_write;
pub mod stream;
pub mod tar;

pub use descriptor::{Access, Descriptor, ExtentLine, ExtentType};
pub use format::VmdkFormat;
pub use image::VmdkImage;
