//! Building an opened disk from its files: the descriptor (separate, or embedded in a sparse
//! file), every extent it names, and the parent of a delta disk.
//!
//! Every file besides the one the caller named is opened only after
//! [`vdisk_block::FollowPolicy::allows`] accepts it: a descriptor naming `/etc/shadow` as a FLAT
//! extent is the CVE-2022-47951 class of attack on converters.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vdisk_block::{Error, ErrorKind, HostFile, OpenOptions, Result};

use crate::descriptor::{
    printable, Access, Descriptor, ExtentLine, ExtentType, MAX_DESCRIPTOR_BYTES,
};
use crate::esx;
use crate::extent::{Extent, ExtentData};
use crate::header::{SparseHeader, SECTOR};
use crate::image::{DescriptorStore, VmdkImage};
use crate::source::Source;
use crate::sparse::SparseExtent;
use crate::stream::StreamWriter;

const OP: &str = "open vmdk";

/// createTypes whose extents this driver reads.
const READABLE_TYPES: &[&str] = &[
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
    "vmfs",
    "vmfsThin",
    "vmfsPreallocated",
    "vmfsEagerZeroedThick",
    "vmfsSparse",
    "seSparse",
    "custom",
];

/// createTypes that name host devices rather than files.
const DEVICE_TYPES: &[&str] = &[
    "vmfsRaw",
    "vmfsRawDeviceMap",
    "vmfsPassthroughRawDeviceMap",
    "fullDevice",
    "partitionedDevice",
];

/// What the first bytes of a file say it is.
enum Kind {
    Sparse(SparseHeader),
    /// vmfsSparse, with the file's first bytes.
    Cowd(Vec<u8>),
    /// seSparse, with the file's first bytes.
    SeSparse(Vec<u8>),
    Text,
}

fn open_file(path: &Path, writable: bool, options: &OpenOptions) -> Result<Arc<HostFile>> {
    Ok(Arc::new(HostFile::open(
        path,
        writable,
        options.cache,
        options.engine,
    )?))
}

fn open_source(path: &Path, writable: bool, options: &OpenOptions) -> Result<Arc<Source>> {
    Ok(Arc::new(Source::whole(open_file(path, writable, options)?)))
}

fn classify(file: &Source) -> Result<Kind> {
    let len = file.len()?;
    let mut first = vec![0u8; len.min(512) as usize];
    file.read_at(&mut first, 0)?;
    if SparseHeader::has_magic(&first) {
        let header = SparseHeader::decode(&first).map_err(|e| e.with_path(file.path()))?;
        return Ok(Kind::Sparse(header));
    }
    if esx::is_cowd(&first) {
        return Ok(Kind::Cowd(first));
    }
    if esx::is_sesparse(&first) {
        return Ok(Kind::SeSparse(first));
    }
    Ok(Kind::Text)
}

/// Reads the descriptor a sparse header embeds, if it has one.
fn embedded_descriptor(file: &Source, header: &SparseHeader) -> Result<Option<Descriptor>> {
    if header.descriptor_offset == 0 || header.descriptor_size == 0 {
        return Ok(None);
    }
    let len = header
        .descriptor_size
        .checked_mul(SECTOR)
        .filter(|&l| l <= MAX_DESCRIPTOR_BYTES as u64);
    let start = header.descriptor_offset.checked_mul(SECTOR);
    let file_len = file.len()?;
    let (Some(len), Some(start)) = (len, start) else {
        return Err(Error::corrupt(
            OP,
            format!(
                "the embedded descriptor ({} sectors at sector {}) is larger than {MAX_DESCRIPTOR_BYTES} bytes",
                header.descriptor_size, header.descriptor_offset
            ),
        )
        .with_path(file.path()));
    };
    if start.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(
            Error::corrupt(OP, "the embedded descriptor lies past the end of the file")
                .with_path(file.path()),
        );
    }
    let mut text = vec![0u8; len as usize];
    file.read_at(&mut text, start)?;
    Descriptor::parse(&text)
        .map(Some)
        .map_err(|e| e.with_path(file.path()))
}

fn text_descriptor(file: &Source) -> Result<Descriptor> {
    let len = file.len()?;
    if len > MAX_DESCRIPTOR_BYTES as u64 {
        return Err(Error::corrupt(
            OP,
            format!(
                "invalid VMDK image descriptor (no sparse header, and at {len} bytes the file is too large for a descriptor, at most {MAX_DESCRIPTOR_BYTES})"
            ),
        )
        .with_path(file.path()));
    }
    let mut text = vec![0u8; len as usize];
    file.read_at(&mut text, 0)?;
    // qemu words every unparsable descriptor the same way; the reason follows in brackets
    // (which drop-in mode leaves out).
    Descriptor::parse(&text).map_err(|e| {
        Error::new(
            e.kind(),
            OP,
            format!("invalid VMDK image descriptor ({})", e.message()),
        )
        .with_path(file.path())
    })
}

/// The descriptor of the VMDK at `path`, embedded or separate, without opening any extent.
pub fn read_descriptor(path: &Path, options: &OpenOptions) -> Result<Descriptor> {
    let file = open_source(path, false, options)?;
    match classify(&file)? {
        Kind::Sparse(header) => Ok(embedded_descriptor(&file, &header)?
            .unwrap_or_else(|| Descriptor::new("monolithicSparse", 0))),
        Kind::Text => text_descriptor(&file),
        Kind::Cowd(_) | Kind::SeSparse(_) => Ok(Descriptor::new("vmfsSparse", 0)),
    }
}

fn check_create_type(descriptor: &Descriptor, path: &Path) -> Result<()> {
    let ct = descriptor.create_type.as_str();
    if READABLE_TYPES.contains(&ct) {
        return Ok(());
    }
    let why = if DEVICE_TYPES.contains(&ct) {
        format!("Unsupported image type '{ct}': raw device disks are not supported")
    } else {
        format!("Unsupported image type '{}'", printable(ct))
    };
    Err(Error::unsupported(OP, why).with_path(path))
}

/// Resolves a name from a descriptor against the descriptor's folder and applies the policy.
fn follow(image: &Path, name: &str, what: &str, options: &OpenOptions) -> Result<PathBuf> {
    let named = Path::new(name);
    let target = if named.is_absolute() {
        named.to_path_buf()
    } else {
        image.parent().unwrap_or_else(|| Path::new(".")).join(named)
    };
    if !target.exists() {
        return Err(Error::new(
            ErrorKind::NotFound,
            OP,
            format!(
                "the {what} '{}' named by the descriptor does not exist",
                printable(name)
            ),
        )
        .with_path(image));
    }
    options.policy.allows(image, &target)?;
    Ok(target)
}

/// Opens `file` as the sparse extent of kind `kind` a descriptor line names.
fn open_sparse(file: Arc<Source>, kind: ExtentType) -> Result<SparseExtent> {
    match (kind, classify(&file)?) {
        (ExtentType::Sparse, Kind::Sparse(header)) => SparseExtent::open(file, header),
        (ExtentType::VmfsSparse, Kind::Cowd(first)) => {
            let geometry = esx::cowd_geometry(&file, &first)?;
            SparseExtent::with_geometry(file, geometry)
        }
        (ExtentType::SeSparse, Kind::SeSparse(first)) => {
            let geometry = esx::sesparse_geometry(&file, &first)?;
            SparseExtent::with_geometry(file, geometry)
        }
        (kind, _) => Err(Error::corrupt(
            OP,
            format!(
                "the file of a {} extent does not start with that kind's header",
                kind.as_str()
            ),
        )
        .with_path(file.path())),
    }
}

fn open_extent(
    image: &Path,
    line: &ExtentLine,
    start: u64,
    len: u64,
    options: &OpenOptions,
) -> Result<Extent> {
    let mut extent = Extent {
        start,
        len,
        kind: line.kind,
        access: line.access,
        path: None,
        data: ExtentData::Zero,
    };
    if line.access == Access::NoAccess {
        extent.data = ExtentData::NoAccess;
        return Ok(extent);
    }
    let unsupported = |what: &str| {
        Err(Error::unsupported(
            OP,
            format!("{} extents are not supported{what}", line.kind.as_str()),
        )
        .with_path(image))
    };
    match line.kind {
        ExtentType::Zero => return Ok(extent),
        ExtentType::VmfsRdm | ExtentType::VmfsRaw => return unsupported(" (raw device mapping)"),
        ExtentType::Flat
        | ExtentType::Vmfs
        | ExtentType::Sparse
        | ExtentType::VmfsSparse
        | ExtentType::SeSparse => {}
    }
    // The parser guarantees these kinds name a file.
    let name = line.file.as_deref().unwrap_or_default();
    let path = follow(image, name, "extent", options)?;
    let writable = options.writable && line.access == Access::ReadWrite;
    let file = open_file(&path, writable, options)?;
    extent.data = match line.kind {
        ExtentType::Sparse | ExtentType::VmfsSparse | ExtentType::SeSparse => {
            let source = Arc::new(Source::whole(file));
            ExtentData::Sparse(Box::new(open_sparse(source, line.kind)?))
        }
        _ => {
            let offset = line
                .offset
                .unwrap_or(0)
                .checked_mul(SECTOR)
                .ok_or_else(|| {
                    Error::corrupt(OP, "the FLAT extent's offset overflows").with_path(image)
                })?;
            let file_len = file.len()?.into();
            ExtentData::Flat {
                file,
                offset,
                file_len,
            }
        }
    };
    extent.path = Some(path);
    Ok(extent)
}

/// Opens the VMDK at `path` (read-only) with every extent and, within the policy, its parent.
pub fn open(path: &Path, options: &OpenOptions) -> Result<VmdkImage> {
    let file = open_source(path, options.writable, options)?;
    let (descriptor, extents) = match classify(&file)? {
        Kind::Sparse(header) if header.capacity != 0 || header.descriptor_offset == 0 => {
            // A monolithic sparse file is its own single extent; the extent lines of its
            // embedded descriptor are not consulted (they name the file itself).
            // The header is checked first: its faults (truncation above all) explain a
            // damaged descriptor too.
            let sparse = SparseExtent::open(Arc::clone(&file), header.clone())?;
            let descriptor = embedded_descriptor(&file, &header)?
                .unwrap_or_else(|| Descriptor::new("monolithicSparse", 0));
            let len = sparse.capacity_bytes();
            let data = if options.writable && header.compressed() {
                // A stream opened for writing is appended to, never changed in place.
                let at_end = header.gd_offset == crate::header::GD_AT_END;
                ExtentData::Stream(Box::new(StreamWriter::new(sparse, at_end)?))
            } else {
                ExtentData::Sparse(Box::new(sparse))
            };
            let extent = Extent {
                start: 0,
                len,
                kind: ExtentType::Sparse,
                access: Access::ReadWrite,
                path: Some(path.to_path_buf()),
                data,
            };
            (descriptor, vec![extent])
        }
        Kind::Cowd(first) => {
            // A vmfsSparse file opened directly is its own single extent, as in qemu.
            let geometry = esx::cowd_geometry(&file, &first)?;
            let sparse = SparseExtent::with_geometry(Arc::clone(&file), geometry)?;
            let extent = Extent {
                start: 0,
                len: sparse.capacity_bytes(),
                kind: ExtentType::VmfsSparse,
                access: Access::ReadWrite,
                path: Some(path.to_path_buf()),
                data: ExtentData::Sparse(Box::new(sparse)),
            };
            (Descriptor::new("vmfsSparse", 0), vec![extent])
        }
        Kind::SeSparse(_) => {
            return Err(Error::invalid(
                OP,
                "a bare seSparse extent: open the descriptor that names it",
            )
            .with_path(path))
        }
        kind => {
            // A text descriptor, or a sparse file of capacity 0 whose embedded descriptor
            // lists the extents.
            let descriptor = match kind {
                Kind::Sparse(header) => embedded_descriptor(&file, &header)?
                    .ok_or_else(|| Error::corrupt(OP, "no descriptor").with_path(path))?,
                _ => text_descriptor(&file)?,
            };
            check_create_type(&descriptor, path)?;
            if descriptor.extents.is_empty() {
                return Err(Error::corrupt(OP, "the descriptor lists no extents").with_path(path));
            }
            let mut extents = Vec::with_capacity(descriptor.extents.len());
            let mut start = 0u64;
            for line in &descriptor.extents {
                let len = line
                    .sectors
                    .checked_mul(SECTOR)
                    .filter(|l| start.checked_add(*l).is_some());
                let Some(len) = len else {
                    return Err(Error::corrupt(OP, "the extents' sizes overflow").with_path(path));
                };
                extents.push(open_extent(path, line, start, len, options)?);
                start += len;
            }
            (descriptor, extents)
        }
    };
    let size = extents.last().map(|e| e.start + e.len).unwrap_or(0);
    let desc_store = if options.writable {
        check_writable(path, &extents)?;
        Some(descriptor_store(&file, path)?)
    } else {
        None
    };
    let (backing, parent_path) = open_parent(path, &descriptor, options)?;
    Ok(VmdkImage {
        path: path.to_path_buf(),
        descriptor,
        extents,
        size,
        backing,
        parent_path,
        desc_store,
        write_lock: parking_lot::Mutex::new(()),
        cid_bumped: std::sync::atomic::AtomicBool::new(false),
        appliance: None,
    })
}

/// Refuses a writable open of extents this driver only reads, before anything is changed.
fn check_writable(path: &Path, extents: &[Extent]) -> Result<()> {
    for extent in extents {
        if let ExtentData::Sparse(sparse) = &extent.data {
            let header = sparse.header();
            let why = if sparse.layout() != crate::sparse::Layout::Hosted {
                Some(format!(
                    "{} extents are read-only here",
                    extent.kind.as_str()
                ))
            } else if header.compressed() {
                Some("compressed extents inside a descriptor cannot be written".into())
            } else if header.version == 3 {
                Some("version 3 sparse extents (VMware changed-block tracking) are read-only, as in qemu".into())
            } else {
                None
            };
            if let Some(why) = why {
                return Err(
                    Error::unsupported(OP, format!("cannot open for writing: {why}"))
                        .with_path(extent.path.as_deref().unwrap_or(path)),
                );
            }
        }
    }
    Ok(())
}

/// Where a writable image keeps its descriptor: embedded in the named sparse file, or the
/// named text file itself.
fn descriptor_store(file: &Arc<Source>, path: &Path) -> Result<DescriptorStore> {
    match classify(file)? {
        Kind::Sparse(header) if header.descriptor_offset != 0 && header.descriptor_size != 0 => {
            Ok(DescriptorStore::Embedded {
                file: Arc::clone(file.host()),
                offset: header.descriptor_offset * SECTOR,
                capacity: header.descriptor_size * SECTOR,
            })
        }
        Kind::Text => Ok(DescriptorStore::Text(Arc::clone(file.host()))),
        _ => Err(Error::unsupported(
            OP,
            "cannot open for writing: the image has no descriptor to record its new CID in",
        )
        .with_path(path)),
    }
}

/// The name to follow for parent `hint`. ESXi records an absolute datastore path
/// (`/vmfs/volumes/...`) when the parent sits elsewhere; once the files are copied off the
/// host that path is gone, and the parent is the file of the same name beside the delta. The
/// CID check still decides whether it is the right one.
fn moved_parent(path: &Path, hint: &str) -> String {
    let named = Path::new(hint);
    if named.is_absolute() && !named.exists() {
        if let Some(name) = named.file_name().and_then(|n| n.to_str()) {
            let beside = path.parent().unwrap_or_else(|| Path::new(".")).join(name);
            if beside.exists() {
                return name.to_string();
            }
        }
    }
    hint.to_string()
}

type Parent = (Option<Arc<dyn vdisk_block::BlockDev>>, Option<PathBuf>);

/// Opens the parent of a delta disk through the caller's opener, after the policy and the
/// CID check (the parent must not have changed since the delta was taken).
fn open_parent(path: &Path, descriptor: &Descriptor, options: &OpenOptions) -> Result<Parent> {
    let Some(hint) = &descriptor.parent_file_name_hint else {
        return Ok((None, None));
    };
    if options.no_backing {
        return Ok((None, None));
    }
    let parent = follow(path, &moved_parent(path, hint), "parent", options)?;
    let parent_descriptor = read_descriptor(&parent, options)?;
    if parent_descriptor.cid != descriptor.parent_cid {
        return Err(Error::corrupt(
            OP,
            format!(
                "the parent '{}' has CID {:08x} but this delta expects parentCID {:08x}: the parent changed after the delta was taken",
                parent.display(),
                parent_descriptor.cid,
                descriptor.parent_cid
            ),
        )
        .with_path(path));
    }
    let Some(opener) = &options.opener else {
        return Err(Error::unsupported(
            OP,
            format!(
                "the disk is a delta on '{}', and no image opener was supplied to open it",
                parent.display()
            ),
        )
        .with_path(path));
    };
    let parent_options = OpenOptions {
        writable: false,
        ..options.clone()
    };
    let dev = opener.open_image(&parent, Some("vmdk"), &parent_options)?;
    Ok((Some(dev), Some(parent)))
}

/// Opens the monolithic sparse VMDK held in `source` (a member of an archive named `path`)
/// read-only; such a disk has no other files and no parent.
pub(crate) fn open_member(path: &Path, source: Arc<Source>) -> Result<VmdkImage> {
    let header =
        match classify(&source)? {
            Kind::Sparse(header) if header.capacity != 0 => header,
            _ => return Err(Error::unsupported(
                OP,
                "only monolithic sparse or streamOptimized VMDKs are read from inside an archive",
            )
            .with_path(path)),
        };
    let sparse = SparseExtent::open(Arc::clone(&source), header.clone())?;
    let descriptor = embedded_descriptor(&source, &header)?
        .unwrap_or_else(|| Descriptor::new("streamOptimized", 0));
    let extent = Extent {
        start: 0,
        len: sparse.capacity_bytes(),
        kind: ExtentType::Sparse,
        access: Access::ReadOnly,
        path: Some(path.to_path_buf()),
        data: ExtentData::Sparse(Box::new(sparse)),
    };
    Ok(VmdkImage {
        path: path.to_path_buf(),
        descriptor,
        size: extent.len,
        extents: vec![extent],
        backing: None,
        parent_path: None,
        desc_store: None,
        write_lock: parking_lot::Mutex::new(()),
        cid_bumped: std::sync::atomic::AtomicBool::new(false),
        appliance: None,
    })
}
