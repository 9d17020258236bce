//! The qcow2 format driver of vdisk.
//!
//! Layers, bottom up:
//! - [`header`]: the header, feature bits and extensions, validated against the spec and
//!   QEMU's limits before anything is allocated;
//! - [`entry`]: L1/L2 entries (standard, zero, compressed, extended L2 subclusters);
//! - [`refcount`]: refcount tables and blocks of every width;
//! - [`alloc`]: cluster allocation and refcount updates for writable images;
//! - [`image`]: [`Qcow2Image`], the opened image as a `BlockDev` (read path);
//! - [`crypto`]: LUKS and legacy AES encryption of guest data;
//! - [`empty`]: [`make_empty`], emptying an image as a commit does to the top of a chain;
//! - [`check`]: a metadata check that counts leaks and corruptions like `qemu-img check`;
//! - [`measure`]: the host space a new image needs, computed as `qemu-img measure` does;
//! - [`format`]: [`Qcow2Format`], the driver the registry lists;
//! - [`fuzzing`]: entry points for the cargo-fuzz targets.
//!
//! Status: reads (block status, backing chains, external data files, zlib/zstd compressed
//! clusters, extended L2), writes (allocation, copy-on-write, zero clusters, discard,
//! compressed clusters, refcount table growth, overlap checks), resize, internal snapshots
//! (create, delete, apply, list), `create` and `amend` with qemu-img's options (amend also
//! downgrades to compat=0.10 and changes the refcount width), `check`
//! with refcount repair, persistent bitmaps, and LUKS encryption (`encrypt.format=luks`;
//! legacy AES images are read only).
#![forbid(unsafe_code)]

pub mod alloc;
pub mod amend;
pub mod bitmap;
pub mod cache;
pub mod check;
pub mod compress;
pub mod create;
pub mod crypto;
pub mod empty;
pub mod entry;
pub mod format;
/// Entry points for the cargo-fuzz targets in `fuzz/` (outside the workspace build).
pub mod fuzzing;
pub mod header;
pub mod image;
pub mod measure;
pub mod open;
pub mod overlap;
pub mod prealloc;
pub mod refcount;
pub mod snapshot;
mod snapshot_write;
mod write;

pub use empty::make_empty;
pub use format::Qcow2Format;
pub use header::Header;
pub use image::Qcow2Image;
