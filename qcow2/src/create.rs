//! Creating qcow2 images with qemu-img's options.
//!
//! The new file is laid out as QEMU lays it out: the header in cluster 0, then the refcount
//! table, the refcount blocks that describe every metadata cluster (themselves included),
//! then the L1 table. Preallocation then goes through the ordinary write engine, so the
//! same ordering rules apply.

use std::path::Path;

use vdisk_block::{
    BlockDev, CacheMode, CreateOptions, EngineChoice, Error, HostFile, OpenOptions, Preallocation,
    Result,
};

use crate::header::{
    autoclear, compat, default_feature_names, incompat, CompressionType, CryptMethod, Extensions,
    Header, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS, V2_HEADER_LEN,
    V3_HEADER_LEN,
};
use crate::image::Qcow2Image;
use crate::refcount;

/// The `-o` options `create` understands, with qemu-img's help text.
pub const OPTIONS: &[(&str, &str)] = &[
    ("size", "Virtual disk size"),
    ("compat", "Compatibility level (v2 [0.10], v3 [1.1])"),
    ("backing_file", "File name of a base image"),
    ("backing_fmt", "Image format of the base image"),
    ("data_file", "File name of an external data file"),
    (
        "data_file_raw",
        "The external data file must stay valid as a raw image",
    ),
    ("cluster_size", "qcow2 cluster size"),
    (
        "preallocation",
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    (
        "lazy_refcounts",
        "Postpone refcount updates (accepted; this driver updates refcounts eagerly)",
    ),
    ("refcount_bits", "Width of a reference count entry in bits"),
    (
        "compression_type",
        "Compression method used for image cluster compression (zlib, zstd)",
    ),
    ("extended_l2", "Extended L2 tables"),
    (
        "extent_size_hint",
        "Extent size hint for the image file, 0 to disable (accepted, not used)",
    ),
    (
        "nocow",
        "Turn off copy-on-write (valid only on btrfs; accepted, not used)",
    ),
];

fn invalid(message: impl Into<String>) -> Error {
    Error::invalid("create", message)
}

/// What the options asked for, validated.
struct Plan {
    version: u32,
    cluster_bits: u32,
    refcount_order: u32,
    lazy_refcounts: bool,
    extended_l2: bool,
    compression: CompressionType,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    data_file: Option<String>,
    data_file_raw: bool,
    prealloc: Preallocation,
}

fn plan(options: &mut CreateOptions) -> Result<Plan> {
    let version = match options.take("compat").as_deref() {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(other) => {
            return Err(invalid(format!(
                "Parameter 'version' does not accept value '{other}'"
            )))
        }
    };
    let v3_only = |what: &str| {
        invalid(format!(
            "{what} only supported with compatibility level 1.1 and above (use version=v3 or greater)"
        ))
    };
    let cluster_size = options.take_size("cluster_size")?.unwrap_or(65536);
    let cluster_bits = cluster_size.trailing_zeros();
    if !cluster_size.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits)
    {
        return Err(invalid(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    let refcount_bits = match options.take("refcount_bits") {
        None => 16,
        Some(v) => v
            .parse::<u64>()
            .map_err(|_| invalid(format!("Invalid refcount_bits '{v}'")))?,
    };
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if version == 2 && refcount_bits != 16 {
        return Err(invalid(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
        ));
    }
    let lazy_refcounts = options.take_bool("lazy_refcounts")?.unwrap_or(false);
    if version == 2 && lazy_refcounts {
        return Err(v3_only("Lazy refcounts"));
    }
    let extended_l2 = options.take_bool("extended_l2")?.unwrap_or(false);
    if extended_l2 {
        if version == 2 {
            return Err(v3_only("Extended L2 entries are"));
        }
        if cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
    }
    let compression = match options.take("compression_type").as_deref() {
        None | Some("zlib") => CompressionType::Deflate,
        Some("zstd") => CompressionType::Zstd,
        Some(other) => {
            return Err(invalid(format!(
                "Parameter 'compression-type' does not accept value '{other}'"
            )))
        }
    };
    if version == 2 && compression != CompressionType::Deflate {
        return Err(v3_only("Non-zlib compression type is"));
    }
    let backing_file = options.take("backing_file").filter(|s| !s.is_empty());
    let backing_fmt = options.take("backing_fmt").filter(|s| !s.is_empty());
    if backing_file.is_some() && backing_fmt.is_none() {
        return Err(invalid("Backing file specified without backing format"));
    }
    if backing_file.is_none() && backing_fmt.is_some() {
        return Err(invalid("Backing format specified without backing file"));
    }
    let data_file = options.take("data_file").filter(|s| !s.is_empty());
    let data_file_raw = options.take_bool("data_file_raw")?.unwrap_or(false);
    if data_file.is_some() && version == 2 {
        return Err(v3_only("External data files are"));
    }
    if data_file_raw && data_file.is_none() {
        return Err(invalid("data-file-raw requires data-file"));
    }
    if data_file_raw && backing_file.is_some() {
        return Err(invalid(
            "Backing file and data-file-raw cannot be used at the same time",
        ));
    }
    let prealloc = options.take_preallocation()?;
    if prealloc != Preallocation::Off && backing_file.is_some() {
        return Err(invalid(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ));
    }
    if prealloc != Preallocation::Off && (data_file.is_some() || extended_l2) {
        return Err(Error::unsupported(
            "create",
            "preallocation together with an external data file or extended L2 entries is not implemented yet",
        ));
    }
    if options.options.keys().any(|k| k.starts_with("encrypt")) {
        return Err(Error::unsupported(
            "create",
            "creating encrypted qcow2 images is not implemented yet",
        ));
    }
    // Host file system tuning qemu-img accepts; nothing to do for them here.
    options.take("extent_size_hint");
    options.take("nocow");
    options.reject_leftovers("qcow2")?;
    Ok(Plan {
        version,
        cluster_bits,
        refcount_order: refcount_bits.trailing_zeros(),
        lazy_refcounts,
        extended_l2,
        compression,
        backing_file,
        backing_fmt,
        data_file,
        data_file_raw,
        prealloc,
    })
}

/// Creates a qcow2 image at `path`.
pub fn create(path: &Path, mut options: CreateOptions) -> Result<()> {
    let size = options.size;
    let p = plan(&mut options).map_err(|e| e.with_path(path))?;
    if size > i64::MAX as u64 {
        return Err(invalid(format!("Image size {size} is too large")).with_path(path));
    }
    let cb = p.cluster_bits;
    let cs = 1u64 << cb;
    let mut incompatible = 0;
    if p.extended_l2 {
        incompatible |= incompat::EXTENDED_L2;
    }
    if p.compression != CompressionType::Deflate {
        incompatible |= incompat::COMPRESSION;
    }
    if p.data_file.is_some() {
        incompatible |= incompat::DATA_FILE;
    }
    let mut header = Header {
        version: p.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: cb,
        size,
        crypt_method: CryptMethod::None,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: 0,
        refcount_table_clusters: 0,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: if p.lazy_refcounts {
            compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: if p.data_file_raw {
            autoclear::DATA_FILE_RAW
        } else {
            0
        },
        refcount_order: p.refcount_order,
        header_length: if p.version >= 3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        },
        compression_type: p.compression,
        extra_fields: Vec::new(),
        extensions: Extensions {
            backing_format: p.backing_fmt.clone(),
            feature_names: if p.version >= 3 {
                default_feature_names()
            } else {
                Vec::new()
            },
            data_file: p.data_file.clone(),
            ..Extensions::default()
        },
        backing_file: p.backing_file.clone(),
    };
    let l1_size = header.required_l1_size();
    if l1_size * 8 > crate::header::MAX_L1_BYTES {
        return Err(invalid("Image size is too large for this cluster size").with_path(path));
    }
    header.l1_size = l1_size as u32;
    // Metadata clusters: header, refcount table, refcount blocks, L1 table. The blocks
    // must cover all of them, themselves included.
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let per_block = (8u64 << cb) >> p.refcount_order;
    let (mut table_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let total = 1 + table_clusters + blocks + l1_clusters;
        let need_blocks = total.div_ceil(per_block);
        let need_table = (need_blocks * 8).div_ceil(cs);
        if (need_blocks, need_table) == (blocks, table_clusters) {
            break;
        }
        blocks = need_blocks;
        table_clusters = need_table;
    }
    let total = 1 + table_clusters + blocks + l1_clusters;
    header.refcount_table_offset = cs;
    header.refcount_table_clusters = table_clusters as u32;
    header.l1_table_offset = (1 + table_clusters + blocks) << cb;
    let cluster0 = header.encode().map_err(|e| e.with_path(path))?;
    // Reparsing proves the header is one we (and so QEMU) accept.
    Header::parse(&{
        let mut c = cluster0.clone();
        c.resize(cs as usize, 0);
        c
    })
    .map_err(|e| e.with_path(path))?;

    let file = HostFile::create(path, CacheMode::Writeback, EngineChoice::Sync)?;
    file.write_at(&cluster0, 0)?;
    let mut table = vec![0u8; (table_clusters * cs) as usize];
    for b in 0..blocks {
        let offset = (1 + table_clusters + b) << cb;
        table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&offset.to_be_bytes());
    }
    file.write_at(&table, cs)?;
    let mut block_bytes = vec![0u8; (blocks * cs) as usize];
    for cluster in 0..total {
        let b = (cluster / per_block) as usize;
        let block = &mut block_bytes[b * cs as usize..(b + 1) * cs as usize];
        refcount::set(block, cluster % per_block, p.refcount_order, 1);
    }
    file.write_at(&block_bytes, (1 + table_clusters) << cb)?;
    file.set_len(total << cb)?;
    file.flush()?;
    drop(file);

    if let Some(name) = &p.data_file {
        let target = crate::open::resolve(path, name, "external data file")?;
        let data = HostFile::create(&target, CacheMode::Writeback, EngineChoice::Sync)?;
        data.set_len(size)?;
        data.flush()?;
    }
    if p.prealloc != Preallocation::Off {
        let options = OpenOptions {
            writable: true,
            no_backing: true,
            ..OpenOptions::default()
        };
        let image = Qcow2Image::open(path, &options)?;
        image.preallocate(p.prealloc)?;
        image.flush()?;
    }
    Ok(())
}
