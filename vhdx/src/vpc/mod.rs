//! VHD (Virtual PC / Hyper-V generation 1 disks; qemu calls the format `vpc`).
//!
//! A fixed image is the raw disk followed by a 512-byte footer. A dynamic or differencing
//! image starts with a copy of the footer, then a dynamic header, a BAT of big-endian
//! sector numbers, and blocks each preceded by a sector bitmap; the footer ends the file.

pub mod create;
pub mod dynamic;
pub mod footer;
pub mod format;
pub mod image;
pub mod write;
