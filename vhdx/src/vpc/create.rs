//! Creating VHD images: fixed and dynamic, with qemu's size rules.
//!
//! Without `force_size`, qemu rounds the size up to the next whole CHS geometry (the VHD
//! specification's algorithm) and marks the image with creator `qemu`, whose readers take
//! the geometry. With `force_size` the size is kept exactly (a partial sector rounded up),
//! the creator is `qem2`, the geometry is the maximal one, and readers take the footer's
//! current size. One deliberate difference from qemu-img: a
//! **fixed** image whose requested size is a whole number of MiB keeps that exact size
//! unless `force_size=off` is given, because Azure accepts only fixed VHDs of whole MiB,
//! which CHS rounding almost never produces.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use vdisk_block::{CacheMode, EngineChoice, Error, HostFile, Result};

use crate::vhdx::create::random_guid;
use crate::vpc::dynamic::HEADER_SIZE;
use crate::vpc::footer::{
    checksum, Footer, FOOTER_SIZE, MAX_GEOMETRY_SECTORS, MAX_SECTORS, TYPE_DIFFERENCING,
    TYPE_DYNAMIC, TYPE_FIXED,
};

/// Block size of dynamic images qemu writes (the VHD default).
pub const BLOCK_SIZE: u32 = 2 << 20;
/// Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC, the VHD epoch.
const VHD_EPOCH: u64 = 946_684_800;

/// CHS geometry for `sectors` by the algorithm of the VHD specification.
pub fn geometry(sectors: u64) -> Geometry {
    let sectors = sectors.min(MAX_GEOMETRY_SECTORS);
    let (spt, heads, cth): (u64, u64, u64);
    if sectors >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = sectors / spt;
    } else {
        let mut s = 17;
        let mut c = sectors / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = sectors / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = sectors / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// The parent of a differencing image being created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcParent {
    /// The parent as the user named it (relative names are relative to the child's folder).
    pub name: String,
    /// The parent's footer: the child takes its size, geometry, creator and identity.
    pub footer: Footer,
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcParams {
    /// Requested size in bytes.
    pub size: u64,
    /// Fixed (raw data + footer) rather than dynamic.
    pub fixed: bool,
    /// Keep the size exactly (`None`: qemu's rule, except the Azure rule for fixed images).
    pub force_size: Option<bool>,
    /// Make a differencing image of this parent.
    pub parent: Option<VpcParent>,
}

/// Cylinders, heads and sectors per track.
pub type Geometry = (u16, u8, u8);

/// The size, geometry and creator a new image gets.
pub fn plan(p: &VpcParams) -> Result<(u64, Geometry, [u8; 4])> {
    // A partial sector is kept (rounded up), as qemu-img does, never cut off.
    let requested = p.size.div_ceil(512);
    let force = p
        .force_size
        .unwrap_or(p.fixed && p.size > 0 && p.size.is_multiple_of(1 << 20));
    if force {
        if requested > MAX_SECTORS {
            return Err(Error::invalid(
                "create",
                "Disk size is too large, max size is 2040 GiB",
            ));
        }
        // The maximal geometry, as qemu writes it: it tells every reader, whatever its
        // creator table, to take the current size (a geometry of the size would round it
        // down for readers that use CHS). This is the footer Azure's own instructions
        // produce (`qemu-img convert -o subformat=fixed,force_size`).
        let max = geometry(MAX_GEOMETRY_SECTORS);
        return Ok((requested * 512, max, *b"qem2"));
    }
    // Round up until the geometry covers the request, as qemu does, so a conversion never
    // truncates.
    let mut sectors = requested.min(MAX_GEOMETRY_SECTORS);
    let mut geo = geometry(sectors);
    let chs = |g: Geometry| g.0 as u64 * g.1 as u64 * g.2 as u64;
    while chs(geo) < sectors {
        sectors += 1;
        geo = geometry(sectors);
    }
    let total = if chs(geo) == MAX_GEOMETRY_SECTORS {
        if requested > MAX_SECTORS {
            return Err(Error::invalid(
                "create",
                "Disk size is too large, max size is 2040 GiB",
            ));
        }
        requested
    } else {
        chs(geo)
    };
    Ok((total * 512, geo, *b"qemu"))
}

/// Encodes a footer.
pub fn encode_footer(
    size: u64,
    geo: Geometry,
    creator: [u8; 4],
    disk_type: u32,
    data_offset: u64,
    unique_id: [u8; 16],
) -> Vec<u8> {
    let mut f = vec![0u8; FOOTER_SIZE];
    f[..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&data_offset.to_be_bytes());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH);
    f[24..28].copy_from_slice(&(now.saturating_sub(VHD_EPOCH) as u32).to_be_bytes());
    f[28..32].copy_from_slice(&creator);
    f[32..36].copy_from_slice(&0x0005_0003u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    f[56..58].copy_from_slice(&geo.0.to_be_bytes());
    f[58] = geo.1;
    f[59] = geo.2;
    f[60..64].copy_from_slice(&disk_type.to_be_bytes());
    f[68..84].copy_from_slice(&unique_id);
    let sum = checksum(&f, 64);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    f
}

/// Creates the image at `path`.
pub fn create(path: &Path, p: &VpcParams) -> Result<()> {
    let (size, geo, creator) = match &p.parent {
        // The child reads with its parent's size rule, so it takes the parent's fields.
        Some(parent) => {
            let f = &parent.footer;
            (
                f.current_size,
                (f.cylinders, f.heads, f.sectors_per_track),
                f.creator_app,
            )
        }
        None => plan(p)?,
    };
    let id = random_guid()?.0;
    let file = HostFile::create(path, CacheMode::Writeback, EngineChoice::Sync)?;
    if p.fixed {
        file.set_len(size)?;
        // qemu's file layer writes the first block of every new image (for O_DIRECT
        // alignment probing); the same allocation keeps `map` and disk sizes equal.
        file.write_at(&vec![0u8; size.min(4096) as usize], 0)?;
        file.write_at(
            &encode_footer(size, geo, creator, TYPE_FIXED, u64::MAX, id),
            size,
        )?;
        return file.flush();
    }
    let disk_type = if p.parent.is_some() {
        TYPE_DIFFERENCING
    } else {
        TYPE_DYNAMIC
    };
    let footer = encode_footer(size, geo, creator, disk_type, FOOTER_SIZE as u64, id);
    let entries = size.div_ceil(BLOCK_SIZE as u64);
    let table_offset = (FOOTER_SIZE + HEADER_SIZE) as u64;
    let mut header = vec![0u8; HEADER_SIZE];
    header[..8].copy_from_slice(b"cxsparse");
    header[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    header[16..24].copy_from_slice(&table_offset.to_be_bytes());
    header[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    header[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
    header[32..36].copy_from_slice(&BLOCK_SIZE.to_be_bytes());
    let bat = vec![0xffu8; (entries as usize * 4).next_multiple_of(512)];
    let mut end = table_offset + bat.len() as u64;
    let mut locator = Vec::new();
    if let Some(parent) = &p.parent {
        header[40..56].copy_from_slice(&parent.footer.unique_id.0);
        header[56..60].copy_from_slice(&parent.footer.timestamp.to_be_bytes());
        let name = Path::new(&parent.name)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (i, unit) in name.encode_utf16().take(256).enumerate() {
            header[64 + i * 2..66 + i * 2].copy_from_slice(&unit.to_be_bytes());
        }
        // One locator, Windows style: W2ku for a parent named by an absolute path (stored
        // as a relative one it would only resolve by accident), else W2ru, the parent's path
        // relative to the child.
        let windows = parent.name.replace('/', "\\");
        let (code, text) = if Path::new(&parent.name).is_absolute() {
            (b"W2ku", windows)
        } else if windows.starts_with(".\\") || windows.starts_with("..\\") {
            (b"W2ru", windows)
        } else {
            (b"W2ru", format!(".\\{windows}"))
        };
        locator = text
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect::<Vec<u8>>();
        let space = locator.len().next_multiple_of(512) as u64;
        header[576..580].copy_from_slice(code);
        header[580..584].copy_from_slice(&((space / 512) as u32).to_be_bytes());
        header[584..588].copy_from_slice(&(locator.len() as u32).to_be_bytes());
        header[592..600].copy_from_slice(&end.to_be_bytes());
        locator.resize(space as usize, 0);
        end += space;
    }
    let sum = checksum(&header, 36);
    header[36..40].copy_from_slice(&sum.to_be_bytes());
    file.write_at(&footer, 0)?;
    file.write_at(&header, FOOTER_SIZE as u64)?;
    file.write_at(&bat, table_offset)?;
    file.write_at(&locator, table_offset + bat.len() as u64)?;
    file.write_at(&footer, end)?;
    file.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_follows_the_specification() {
        // 10 MiB: 20480 sectors -> 17 sectors per track, 4 heads, 301 cylinders.
        assert_eq!(geometry(20480), (301, 4, 17));
        assert_eq!(geometry(u64::MAX), (65535, 16, 255));
        let (size, geo, creator) = plan(&VpcParams {
            size: 10 << 20,
            fixed: false,
            force_size: None,
            parent: None,
        })
        .expect("plan");
        assert_eq!(creator, *b"qemu");
        assert!(size >= 10 << 20);
        assert_eq!(size, geo.0 as u64 * geo.1 as u64 * geo.2 as u64 * 512);
    }

    #[test]
    fn fixed_whole_mib_images_keep_their_size_for_azure() {
        let p = VpcParams {
            size: 30 << 20,
            fixed: true,
            force_size: None,
            parent: None,
        };
        let (size, geo, creator) = plan(&p).expect("plan");
        assert_eq!((size, geo, creator), (30 << 20, (65535, 16, 255), *b"qem2"));
        let chs = VpcParams {
            force_size: Some(false),
            ..p.clone()
        };
        assert_ne!(plan(&chs).expect("plan").0, 30 << 20);
    }
}
