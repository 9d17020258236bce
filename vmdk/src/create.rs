//! Creating VMDK images with qemu-img's options and layouts: monolithicSparse (default),
//! monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat (streamOptimized lives in
//! [`crate::stream`]).
//!
//! A sparse extent is laid out as qemu lays it out, so `qemu-img check` and VMware both
//! accept it: header, embedded descriptor (sectors 1..21), redundant grain directory and its
//! grain tables, grain directory and its grain tables, all tables preallocated, the first
//! grain at a grain boundary.

use std::path::{Path, PathBuf};

use vdisk_block::{CacheMode, CreateOptions, EngineChoice, Error, HostFile, OpenOptions, Result};

use crate::descriptor::{Access, Descriptor, ExtentLine, ExtentType};
use crate::header::{
    SparseHeader, FLAG_NEWLINE_TEST, FLAG_REDUNDANT_GD, FLAG_ZEROED_GRAIN, SECTOR,
};
use crate::image::new_cid;

const OP: &str = "create";

/// Grain size of created sparse extents, in sectors (64 KiB).
pub const GRAIN_SECTORS: u64 = 128;
/// Grain table entries per table of created sparse extents.
pub const GTES_PER_GT: u32 = 512;
/// Sectors reserved for an embedded descriptor.
pub const DESCRIPTOR_SECTORS: u64 = 20;
/// Sectors of one extent of a twoGbMaxExtent disk.
pub const SPLIT_EXTENT_SECTORS: u64 = 4 * 1024 * 1024;
/// Largest sparse extent: grain offsets are 32-bit sector numbers.
const MAX_SPARSE_SECTORS: u64 = (1 << 32) - (1 << 20);

/// The layouts `create` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse file with an embedded descriptor.
    MonolithicSparse,
    /// A descriptor and one flat file.
    MonolithicFlat,
    /// A descriptor and sparse extents of at most 2 GiB.
    TwoGbMaxExtentSparse,
    /// A descriptor and flat extents of at most 2 GiB.
    TwoGbMaxExtentFlat,
    /// One compressed, append-only file with markers.
    StreamOptimized,
}

impl Subformat {
    /// Parses qemu-img's `subformat` value.
    pub fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "monolithicSparse" => Subformat::MonolithicSparse,
            "monolithicFlat" => Subformat::MonolithicFlat,
            "twoGbMaxExtentSparse" => Subformat::TwoGbMaxExtentSparse,
            "twoGbMaxExtentFlat" => Subformat::TwoGbMaxExtentFlat,
            "streamOptimized" => Subformat::StreamOptimized,
            other => {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "invalid parameter value: {} (subformat is one of monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat, streamOptimized)",
                        crate::descriptor::printable(other)
                    ),
                ))
            }
        })
    }

    /// The createType the descriptor records.
    pub fn as_str(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }
}

/// Everything `create` decided from its options.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// The layout.
    pub subformat: Subformat,
    /// Guest sectors.
    pub sectors: u64,
    /// `ddb.adapterType`.
    pub adapter_type: String,
    /// `ddb.virtualHWVersion`.
    pub hw_version: String,
    /// `ddb.toolsVersion`.
    pub tools_version: String,
    /// Sparse extents use zeroed-grain entries.
    pub zeroed_grain: bool,
    /// The parent: the name to record and its CID.
    pub parent: Option<(String, u32)>,
}

impl CreateSpec {
    /// Takes every option `create` understands out of `options` and rejects the rest.
    pub fn from_options(path: &Path, mut options: CreateOptions) -> Result<Self> {
        let subformat = match options.take("subformat") {
            Some(s) => Subformat::parse(&s)?,
            None => Subformat::MonolithicSparse,
        };
        let adapter_type = options.take("adapter_type").unwrap_or_else(|| "ide".into());
        if !["ide", "lsilogic", "buslogic", "legacyESX"].contains(&adapter_type.as_str()) {
            return Err(Error::invalid(
                OP,
                format!(
                    "Unknown adapter type: '{}'",
                    crate::descriptor::printable(&adapter_type)
                ),
            ));
        }
        let compat6 = options.take_bool("compat6")?.unwrap_or(false);
        let hw = options.take("hwversion").filter(|v| v != "undefined");
        if compat6 && hw.is_some() {
            return Err(Error::invalid(
                OP,
                "compat6 cannot be enabled with hwversion set",
            ));
        }
        let hw_version = hw.unwrap_or_else(|| if compat6 { "6" } else { "4" }.into());
        let tools_version = options
            .take("toolsversion")
            .unwrap_or_else(|| "2147483647".into());
        for (key, value) in [("hwversion", &hw_version), ("toolsversion", &tools_version)] {
            if value.is_empty() || value.contains(['"', '\n', '\r']) {
                return Err(Error::invalid(OP, format!("Invalid {key} '{value}'")));
            }
        }
        let zeroed_grain = options.take_bool("zeroed_grain")?.unwrap_or(false);
        let backing_file = options.take("backing_file");
        if let Some(fmt) = options.take("backing_fmt") {
            if fmt != "vmdk" {
                return Err(Error::invalid(
                    OP,
                    "backing_file must be a vmdk image (backing_fmt must be 'vmdk')",
                ));
            }
        }
        let mut size = options.size;
        options.take("size");
        options.reject_leftovers("vmdk")?;
        let parent = match backing_file {
            None => None,
            Some(name) => {
                let (cid, parent_size) = parent_facts(path, &name)?;
                if size == 0 {
                    size = parent_size;
                }
                Some((name, cid))
            }
        };
        if size == 0 {
            return Err(Error::invalid(OP, "Image size must be greater than 0"));
        }
        let sectors = size.div_ceil(SECTOR);
        if matches!(
            subformat,
            Subformat::MonolithicSparse | Subformat::StreamOptimized
        ) && sectors > MAX_SPARSE_SECTORS
        {
            return Err(Error::invalid(
                OP,
                "a monolithic sparse VMDK holds at most 2 TiB (use twoGbMaxExtentSparse)",
            ));
        }
        if parent.is_some() && subformat == Subformat::StreamOptimized {
            return Err(Error::invalid(
                OP,
                "a streamOptimized image cannot have a backing file",
            ));
        }
        Ok(CreateSpec {
            subformat,
            sectors,
            adapter_type,
            hw_version,
            tools_version,
            zeroed_grain,
            parent,
        })
    }

    /// The descriptor of the new disk with `extents`.
    pub fn descriptor(&self, extents: Vec<ExtentLine>) -> Descriptor {
        let mut d = Descriptor::new(self.subformat.as_str(), new_cid());
        if let Some((name, cid)) = &self.parent {
            d.parent_cid = *cid;
            d.parent_file_name_hint = Some(name.clone());
        }
        d.extents = extents;
        let heads: u64 = if self.adapter_type == "ide" { 16 } else { 255 };
        let cylinders = (self.sectors / (heads * 63)).min(16383);
        d.set_ddb("ddb.virtualHWVersion", &self.hw_version);
        d.set_ddb("ddb.geometry.cylinders", &cylinders.to_string());
        d.set_ddb("ddb.geometry.heads", &heads.to_string());
        d.set_ddb("ddb.geometry.sectors", "63");
        d.set_ddb("ddb.adapterType", &self.adapter_type);
        d.set_ddb("ddb.toolsVersion", &self.tools_version);
        d
    }
}

/// The CID and size of the parent named `name` (relative to the new image's folder). The
/// user named it, so no follow policy applies; it must be a VMDK.
fn parent_facts(path: &Path, name: &str) -> Result<(u32, u64)> {
    let parent = resolve(path, name);
    let options = OpenOptions {
        no_backing: true,
        policy: vdisk_block::FollowPolicy::Anything,
        ..OpenOptions::read_only()
    };
    let image = crate::open::open(&parent, &options).map_err(|e| {
        Error::invalid(
            OP,
            format!(
                "Could not open backing file '{}': {}",
                parent.display(),
                e.message()
            ),
        )
        .with_source(e)
    })?;
    Ok((image.descriptor().cid, vdisk_block::BlockDev::size(&image)))
}

fn resolve(path: &Path, name: &str) -> PathBuf {
    let named = Path::new(name);
    if named.is_absolute() {
        named.to_path_buf()
    } else {
        path.parent().unwrap_or_else(|| Path::new(".")).join(named)
    }
}

/// The name of extent number `n` (from 1) of the disk at `path`: `disk-s001.vmdk`,
/// `disk-f001.vmdk`, or `disk-flat.vmdk` for a monolithicFlat disk.
fn extent_name(path: &Path, suffix: &str) -> Result<String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::invalid(OP, "the image name is not valid UTF-8"))?;
    let stem = name.strip_suffix(".vmdk").unwrap_or(name);
    Ok(format!("{stem}-{suffix}.vmdk"))
}

/// Creates the image `spec` describes at `path`.
pub fn create(path: &Path, spec: &CreateSpec) -> Result<()> {
    match spec.subformat {
        Subformat::MonolithicSparse => {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error::invalid(OP, "the image name is not valid UTF-8"))?;
            let descriptor = spec.descriptor(vec![ExtentLine {
                access: Access::ReadWrite,
                sectors: spec.sectors,
                kind: ExtentType::Sparse,
                file: Some(name.to_string()),
                offset: None,
            }]);
            create_sparse_extent(path, spec.sectors, spec.zeroed_grain, Some(&descriptor))
        }
        Subformat::MonolithicFlat => {
            let name = extent_name(path, "flat")?;
            create_flat_extent(&resolve(path, &name), spec.sectors)?;
            let descriptor = spec.descriptor(vec![flat_line(&name, spec.sectors)]);
            write_descriptor_file(path, &descriptor)
        }
        Subformat::TwoGbMaxExtentSparse | Subformat::TwoGbMaxExtentFlat => {
            let sparse = spec.subformat == Subformat::TwoGbMaxExtentSparse;
            let mut lines = Vec::new();
            let mut left = spec.sectors;
            let mut n = 1;
            while left > 0 {
                let sectors = left.min(SPLIT_EXTENT_SECTORS);
                let name = extent_name(path, &format!("{}{n:03}", if sparse { 's' } else { 'f' }))?;
                let file = resolve(path, &name);
                if sparse {
                    create_sparse_extent(&file, sectors, spec.zeroed_grain, None)?;
                    lines.push(ExtentLine {
                        access: Access::ReadWrite,
                        sectors,
                        kind: ExtentType::Sparse,
                        file: Some(name),
                        offset: None,
                    });
                } else {
                    create_flat_extent(&file, sectors)?;
                    lines.push(flat_line(&name, sectors));
                }
                left -= sectors;
                n += 1;
            }
            write_descriptor_file(path, &spec.descriptor(lines))
        }
        Subformat::StreamOptimized => crate::stream::create(path, spec),
    }
}

fn flat_line(name: &str, sectors: u64) -> ExtentLine {
    ExtentLine {
        access: Access::ReadWrite,
        sectors,
        kind: ExtentType::Flat,
        file: Some(name.to_string()),
        offset: Some(0),
    }
}

fn new_file(path: &Path) -> Result<HostFile> {
    HostFile::create(path, CacheMode::Writeback, EngineChoice::Sync)
}

fn write_descriptor_file(path: &Path, descriptor: &Descriptor) -> Result<()> {
    let file = new_file(path)?;
    file.write_at(descriptor.to_text().as_bytes(), 0)?;
    file.flush()
}

fn create_flat_extent(path: &Path, sectors: u64) -> Result<()> {
    let file = new_file(path)?;
    let len = sectors * SECTOR;
    file.set_len(len)?;
    // qemu creates flat extents as raw images, whose first block it writes (for O_DIRECT
    // alignment probing): the same allocation keeps `map` and disk sizes equal.
    file.write_at(&vec![0u8; len.min(4096) as usize], 0)?;
    file.flush()
}

/// The header of a new sparse extent of `sectors`, laid out as qemu lays it out.
pub fn sparse_header(sectors: u64, zeroed_grain: bool) -> SparseHeader {
    let gt_count = sectors.div_ceil(u64::from(GTES_PER_GT) * GRAIN_SECTORS);
    let gt_sectors = u64::from(GTES_PER_GT) * 4 / SECTOR;
    let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
    let rgd_offset = 1 + DESCRIPTOR_SECTORS;
    let gd_offset = rgd_offset + gd_sectors + gt_count * gt_sectors;
    let end = gd_offset + gd_sectors + gt_count * gt_sectors;
    SparseHeader {
        version: if zeroed_grain { 2 } else { 1 },
        flags: FLAG_NEWLINE_TEST
            | FLAG_REDUNDANT_GD
            | if zeroed_grain { FLAG_ZEROED_GRAIN } else { 0 },
        capacity: sectors,
        grain_sectors: GRAIN_SECTORS,
        descriptor_offset: 1,
        descriptor_size: DESCRIPTOR_SECTORS,
        gtes_per_gt: GTES_PER_GT,
        rgd_offset,
        gd_offset,
        overhead: end.div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS,
        unclean_shutdown: false,
        compress_algorithm: 0,
    }
}

/// Writes a new, empty sparse extent, embedding `descriptor` when given.
fn create_sparse_extent(
    path: &Path,
    sectors: u64,
    zeroed_grain: bool,
    descriptor: Option<&Descriptor>,
) -> Result<()> {
    let header = sparse_header(sectors, zeroed_grain);
    let gt_count = header.gd_entries();
    let gt_sectors = u64::from(GTES_PER_GT) * 4 / SECTOR;
    let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
    let file = new_file(path)?;
    file.set_len(header.overhead * SECTOR)?;
    file.write_at(&header.encode(), 0)?;
    if let Some(descriptor) = descriptor {
        let text = descriptor.to_text();
        if text.len() as u64 > DESCRIPTOR_SECTORS * SECTOR {
            return Err(Error::invalid(
                OP,
                "the descriptor is too long to embed (shorten the backing file name)",
            ));
        }
        file.write_at(text.as_bytes(), SECTOR)?;
    }
    for dir in [header.rgd_offset, header.gd_offset] {
        let mut entries = Vec::with_capacity(gt_count as usize * 4);
        for i in 0..gt_count {
            let table = u32::try_from(dir + gd_sectors + i * gt_sectors).map_err(|_| {
                Error::invalid(OP, "the grain tables do not fit 32-bit sector numbers")
            })?;
            entries.extend_from_slice(&table.to_le_bytes());
        }
        file.write_at(&entries, dir * SECTOR)?;
    }
    file.flush()
}
