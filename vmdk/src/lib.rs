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
//! Creating and writing: [`create`] (monolithic and split, sparse and flat) and [`stream`]
//! (streamOptimized in VMware's layout, append-only).
//!
//! Not yet here (issue 5): `check`, resize, OVA/OVF input, the vdisk CLI wiring.
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
