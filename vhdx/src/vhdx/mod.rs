//! VHDX (MS-VHDX 1.0): Hyper-V's image format.
//!
//! Layout: a 1 MiB header section (file identifier, two headers, two region tables), then
//! 1 MiB-aligned objects the region table and metadata point at: the log, the BAT, the
//! metadata region, payload blocks and sector-bitmap blocks.

pub mod bat;
pub mod check;
#[cfg(test)]
mod crash_tests;
pub mod create;
pub mod format;
pub mod header;
pub mod image;
pub mod locator;
pub mod log;
pub mod metadata;
pub mod parent;
pub mod region;
pub mod write;
