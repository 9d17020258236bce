//! Creating VHDX images: dynamic, fixed and differencing.
//!
//! Layout (every object 1 MiB aligned, as MS-VHDX requires):
//! `[0, 1 MiB)` header section, then the log, the metadata region (1 MiB), the BAT (rounded
//! up to 1 MiB), and for fixed images the payload blocks, in that order. Both headers are
//! written valid (sequence numbers 0 and 1) so either survives a torn later update. A fresh
//! image has an empty log: nothing here needs logging, since nothing references the image
//! until `create` returns.
//!
//! qemu's rules are kept: the size is rounded up to 512 bytes and capped at 64 TiB; the
//! block size defaults by disk size (8, 16, 32 or 64 MiB) and is clamped to 1..=256 MiB but
//! must be a power of two; the log size rounds up to whole MiB; sectors are 512/512; a fixed
//! image with `block_state_zero=on` keeps its (preallocated) blocks in the ZERO state.

use std::io::Read;
use std::path::{Path, PathBuf};

use vdisk_block::{CacheMode, EngineChoice, Error, HostFile, Result};

use crate::guid::Guid;
use crate::vhdx::bat;
use crate::vhdx::header::{Header, FILE_SIGNATURE, HEADER_OFFSETS, HEADER_SECTION};
use crate::vhdx::locator;
use crate::vhdx::metadata::{self, DiskParams, MAX_VIRTUAL_SIZE};
use crate::vhdx::region::{self, RegionEntry, REGION_TABLE_OFFSETS};

const MIB: u64 = 1024 * 1024;

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateParams {
    /// Guest-visible size (rounded up to 512 bytes).
    pub size: u64,
    /// Payload block size; `None` picks qemu's default for the size.
    pub block_size: Option<u64>,
    /// Log size in bytes (rounded up to 1 MiB).
    pub log_size: u64,
    /// Allocate every block up front (`subformat=fixed`).
    pub fixed: bool,
    /// Keep the blocks of a fixed image in the ZERO state (`block_state_zero`).
    pub block_state_zero: bool,
    /// Make a differencing image of this parent.
    pub parent: Option<ParentSpec>,
}

impl Default for CreateParams {
    fn default() -> Self {
        CreateParams {
            size: 0,
            block_size: None,
            log_size: MIB,
            fixed: false,
            block_state_zero: true,
            parent: None,
        }
    }
}

/// The parent of a differencing image being created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentSpec {
    /// The parent as the user named it (relative names are relative to the child's folder).
    pub name: String,
    /// The parent's DataWriteGuid, stored as the parent linkage.
    pub linkage: Guid,
}

/// A random GUID (version 4) from the kernel's generator.
pub fn random_guid() -> Result<Guid> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("create", e).with_path("/dev/urandom"))?;
    bytes[7] = (bytes[7] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Ok(Guid(bytes))
}

/// qemu's default block size for a disk of `size` bytes.
pub fn default_block_size(size: u64) -> u64 {
    const GIB: u64 = 1 << 30;
    if size > 32 << 40 {
        64 * MIB
    } else if size > 100 * GIB {
        32 * MIB
    } else if size > GIB {
        16 * MIB
    } else {
        8 * MIB
    }
}

/// Where each object of a new image goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    log: u64,
    metadata: u64,
    bat: u64,
    bat_len: u64,
    payload: u64,
}

/// Validates `p` and computes the disk parameters of the new image.
fn plan(p: &CreateParams) -> Result<(DiskParams, u64, Layout)> {
    if p.size > MAX_VIRTUAL_SIZE {
        return Err(Error::invalid(
            "create",
            "Image size too large; max of 64TB",
        ));
    }
    let size = p.size.next_multiple_of(512);
    let block = p
        .block_size
        .unwrap_or_else(|| default_block_size(size))
        .clamp(MIB, 256 * MIB);
    if !block.is_power_of_two() {
        return Err(Error::invalid(
            "create",
            "Block size must be a power of two",
        ));
    }
    let log_size = p.log_size.next_multiple_of(MIB);
    if log_size == 0 || log_size > u32::MAX as u64 + 1 - MIB {
        return Err(Error::invalid(
            "create",
            "Log size must be a multiple of 1 MB",
        ));
    }
    let params = DiskParams {
        block_size: block as u32,
        leave_block_allocated: p.fixed && p.parent.is_none(),
        has_parent: p.parent.is_some(),
        virtual_size: size,
        logical_sector_size: 512,
        physical_sector_size: 512,
        page83: random_guid()?,
        parent_locator: None,
    };
    // qemu computes the entry count of an empty disk with a 32-bit `blocks - 1` that wraps,
    // and refuses the image unless the BAT region can hold that many entries: size it so.
    let entries = if params.payload_blocks() == 0 {
        (u32::MAX as u64) / params.chunk_ratio()
    } else {
        params.bat_entries()
    };
    let bat_len = (entries * 8).next_multiple_of(MIB).max(MIB);
    let log = HEADER_SECTION;
    let metadata = log + log_size;
    let bat = metadata + MIB;
    let payload = bat + bat_len;
    if bat_len > u32::MAX as u64 {
        return Err(Error::invalid(
            "create",
            "the BAT would exceed 4 GiB: use a larger block size",
        ));
    }
    Ok((
        params,
        log_size,
        Layout {
            log,
            metadata,
            bat,
            bat_len,
            payload,
        },
    ))
}

/// The file identifier block (signature and creator).
fn file_identifier() -> Vec<u8> {
    let mut id = vec![0u8; 64 * 1024];
    id[..8].copy_from_slice(FILE_SIGNATURE);
    let creator = format!("vdisk v{}", env!("CARGO_PKG_VERSION"));
    for (i, unit) in creator.encode_utf16().take(255).enumerate() {
        id[8 + i * 2..10 + i * 2].copy_from_slice(&unit.to_le_bytes());
    }
    id
}

/// The locator item of a differencing image whose parent is named `name`.
fn locator_item(parent: &ParentSpec) -> Vec<u8> {
    let linkage = format!("{{{}}}", parent.linkage);
    let mut entries = vec![("parent_linkage", linkage.as_str())];
    let windows = parent.name.replace('/', "\\");
    let relative;
    if Path::new(&parent.name).is_absolute() {
        relative = None;
        entries.push(("absolute_win32_path", windows.as_str()));
    } else {
        relative = Some(
            if windows.starts_with(".\\") || windows.starts_with("..\\") {
                windows.clone()
            } else {
                format!(".\\{windows}")
            },
        );
    }
    if let Some(r) = &relative {
        entries.push(("relative_path", r.as_str()));
    }
    locator::encode(&entries)
}

/// Creates the image at `path`.
pub fn create(path: &Path, p: &CreateParams) -> Result<()> {
    let (params, log_size, layout) = plan(p)?;
    let file = HostFile::create(path, CacheMode::Writeback, EngineChoice::Sync)?;
    file.write_at(&file_identifier(), 0)?;
    let (file_write, data_write) = (random_guid()?, random_guid()?);
    for (seq, off) in HEADER_OFFSETS.iter().enumerate() {
        let header = Header {
            sequence: seq as u64,
            file_write_guid: file_write,
            data_write_guid: data_write,
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: log_size as u32,
            log_offset: layout.log,
        };
        file.write_at(&header.encode(), *off)?;
    }
    let regions = [
        RegionEntry {
            guid: region::BAT_GUID,
            offset: layout.bat,
            length: layout.bat_len as u32,
            required: true,
        },
        RegionEntry {
            guid: region::METADATA_GUID,
            offset: layout.metadata,
            length: MIB as u32,
            required: true,
        },
    ];
    let table = region::encode(&regions);
    for off in REGION_TABLE_OFFSETS {
        file.write_at(&table, off)?;
    }
    let locator = p.parent.as_ref().map(locator_item);
    file.write_at(
        &metadata::encode_region(&params, locator.as_deref()),
        layout.metadata,
    )?;
    let mut end = layout.payload;
    if p.fixed && p.parent.is_none() {
        let blocks = params.payload_blocks();
        let ratio = params.chunk_ratio();
        let bs = params.block_size as u64;
        let mut bat_bytes = vec![0u8; (params.bat_entries() * 8) as usize];
        for b in 0..blocks {
            let entry = if p.block_state_zero {
                bat::make_entry(bat::PayloadState::Zero.bits(), 0)
            } else {
                bat::make_entry(
                    bat::PayloadState::FullyPresent.bits(),
                    layout.payload + b * bs,
                )
            };
            let i = bat::payload_index(b, ratio) as usize * 8;
            bat_bytes[i..i + 8].copy_from_slice(&entry.to_le_bytes());
        }
        file.write_at(&bat_bytes, layout.bat)?;
        end = layout.payload + blocks * bs;
    }
    file.set_len(end)?;
    file.flush()
}

/// Resolves the parent named `name` for a child at `child`: relative names are relative to
/// the child's folder.
pub fn parent_path(child: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        child.parent().unwrap_or_else(|| Path::new(".")).join(p)
    }
}
