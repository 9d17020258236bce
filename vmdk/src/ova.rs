//! Appliances: an `.ova` (a tar archive whose first member is the OVF descriptor) read in
//! place, or an `.ovf` beside its disk files. Each disk the descriptor lists opens as its own
//! image; [`list_disks`] tells callers how many there are and what they are.
//!
//! Inside an archive a disk is a range of the `.ova` file: nothing is unpacked. Beside an
//! `.ovf`, disk files are other files and are followed only as the open policy allows.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vdisk_block::{Error, HostFile, OpenOptions, Result};

use crate::descriptor::printable;
use crate::image::VmdkImage;
use crate::ovf::{self, OvfDisk, MAX_OVF_BYTES};
use crate::source::Source;
use crate::tar::{self, Member};

const OP: &str = "open appliance";

/// Where an appliance's disks are.
enum Container {
    /// An `.ova` and its members.
    Archive(Arc<Source>, Vec<Member>),
    /// An `.ovf`: disk files sit in its folder.
    Folder,
}

/// An opened appliance descriptor.
struct Appliance {
    container: Container,
    disks: Vec<OvfDisk>,
}

/// True when `header` (a file's first bytes) is an `.ova` or an `.ovf`.
pub fn is_appliance(header: &[u8]) -> bool {
    let tar_with_ovf = tar::is_tar(header) && {
        let end = header[..100].iter().position(|&b| b == 0).unwrap_or(100);
        header[..end].ends_with(b".ovf")
    };
    tar_with_ovf || ovf::looks_like_ovf(header)
}

fn read_appliance(path: &Path, options: &OpenOptions) -> Result<Appliance> {
    let file = Arc::new(HostFile::open(path, false, options.cache, options.engine)?);
    let source = Arc::new(Source::whole(Arc::clone(&file)));
    let len = source.len()?;
    let mut first = vec![0u8; len.min(512) as usize];
    source.read_at(&mut first, 0)?;
    if tar::is_tar(&first) {
        let members = tar::members(&source)?;
        let mut ovfs = members.iter().filter(|m| m.name.ends_with(".ovf"));
        let ovf_member = ovfs.next().ok_or_else(|| {
            Error::corrupt(OP, "the archive holds no .ovf descriptor").with_path(path)
        })?;
        if ovfs.next().is_some() {
            return Err(
                Error::corrupt(OP, "the archive holds more than one .ovf descriptor")
                    .with_path(path),
            );
        }
        if ovf_member.size > MAX_OVF_BYTES as u64 {
            return Err(Error::corrupt(OP, "the .ovf descriptor is too large").with_path(path));
        }
        let mut xml = vec![0u8; ovf_member.size as usize];
        source.read_at(&mut xml, ovf_member.offset)?;
        let disks = ovf::disks(&xml).map_err(|e| e.with_path(path))?;
        return Ok(Appliance {
            container: Container::Archive(source, members),
            disks,
        });
    }
    if len > MAX_OVF_BYTES as u64 {
        return Err(Error::corrupt(OP, "the .ovf descriptor is too large").with_path(path));
    }
    let mut xml = vec![0u8; len as usize];
    source.read_at(&mut xml, 0)?;
    let disks = ovf::disks(&xml).map_err(|e| e.with_path(path))?;
    Ok(Appliance {
        container: Container::Folder,
        disks,
    })
}

/// The disks the appliance at `path` lists, in order.
pub fn list_disks(path: &Path, options: &OpenOptions) -> Result<Vec<OvfDisk>> {
    Ok(read_appliance(path, options)?.disks)
}

/// Opens disk number `index` (from 0) of the appliance at `path`, read-only.
pub fn open_disk(path: &Path, options: &OpenOptions, index: usize) -> Result<VmdkImage> {
    if options.writable {
        return Err(Error::unsupported(OP, "appliances are opened read-only").with_path(path));
    }
    let appliance = read_appliance(path, options)?;
    let count = appliance.disks.len();
    let disk = appliance.disks.get(index).ok_or_else(|| {
        Error::invalid(
            OP,
            format!("the appliance lists {count} disk(s); there is no disk {index}"),
        )
        .with_path(path)
    })?;
    let href = disk.href.as_deref().ok_or_else(|| {
        Error::unsupported(
            OP,
            format!(
                "disk '{}' has no file: the importer creates it empty",
                printable(&disk.id)
            ),
        )
        .with_path(path)
    })?;
    if let Some(c) = &disk.compression {
        return Err(Error::unsupported(
            OP,
            format!(
                "disk '{}' is stored {}-compressed, which is not supported",
                printable(&disk.id),
                printable(c)
            ),
        )
        .with_path(path));
    }
    match &appliance.container {
        Container::Archive(source, members) => {
            let member = members.iter().find(|m| m.name == href).ok_or_else(|| {
                Error::corrupt(
                    OP,
                    format!(
                        "the archive has no member '{}' for disk '{}'",
                        printable(href),
                        printable(&disk.id)
                    ),
                )
                .with_path(path)
            })?;
            let range = Arc::new(Source::range(
                Arc::clone(source.host()),
                member.offset,
                member.size,
            ));
            crate::open::open_member(path, range)
                .map(|image| with_appliance(image, index, &appliance.disks))
        }
        Container::Folder => {
            let base = path.parent().unwrap_or_else(|| Path::new("."));
            let target: PathBuf = base.join(href);
            if !target.exists() {
                return Err(Error::new(
                    vdisk_block::ErrorKind::NotFound,
                    OP,
                    format!("the disk file '{}' does not exist", printable(href)),
                )
                .with_path(path));
            }
            options.policy.allows(path, &target)?;
            crate::open::open(&target, options)
                .map(|image| with_appliance(image, index, &appliance.disks))
        }
    }
}

fn with_appliance(mut image: VmdkImage, index: usize, disks: &[OvfDisk]) -> VmdkImage {
    image.appliance = Some(crate::image::ApplianceDisk {
        index,
        disks: disks.to_vec(),
    });
    image
}
