//! Creating qcow2 images with qemu-img's options.
//!
//! The new file is laid out as QEMU lays it out: the header in cluster 0, then the refcount
//! table, the refcount blocks that describe every metadata cluster (themselves included),
//! then the L1 table. Preallocation then goes through the ordinary write engine, so the
//! same ordering rules apply.

use std::path::Path;

use vdisk_block::{
    BlockDev, CacheMode, CreateOptions, EngineChoice, Error, FollowPolicy, HostFile, OpenOptions,
    Preallocation, Result,
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
    let mut prealloc = options.take_preallocation()?;
    // With extended L2 the preallocated clusters keep their subclusters unallocated, so
    // they still read from the backing file; without it they would hide it.
    if prealloc != Preallocation::Off && backing_file.is_some() && !extended_l2 {
        return Err(invalid(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ));
    }
    if data_file_raw && prealloc == Preallocation::Off {
        // As QEMU (since 5.1): a raw data file must also read the same through the qcow2
        // metadata, so the L2 tables must map every cluster one to one.
        prealloc = Preallocation::Metadata;
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
    // QEMU's own layout: header, one reftable cluster, one refblock, then the L1 table,
    // all counted by that first refblock.
    let simple = table_clusters == 1 && blocks == 1;
    if simple
        && p.data_file.is_none()
        && matches!(p.prealloc, Preallocation::Falloc | Preallocation::Full)
    {
        return create_fully_allocated(path, header, l1_size, p.prealloc);
    }
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
    write_cluster0(&file, &cluster0, cs)?;
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
    if simple {
        // QEMU writes only the entries of the L1 table, so the file ends with them.
        file.set_len((3 << cb) + l1_size * 8)?;
        file.write_at(&vec![0u8; (l1_size * 8) as usize], 3 << cb)?;
    } else {
        file.set_len(total << cb)?;
    }
    file.flush()?;
    drop(file);

    if let Some(name) = &p.data_file {
        let target = crate::open::resolve(path, name, "external data file")?;
        let data = HostFile::create(&target, CacheMode::Writeback, EngineChoice::Sync)?;
        // Preallocation grows the data file itself; otherwise it gets the guest size, with
        // its first block written as QEMU's file driver does when it grows an empty file.
        if p.prealloc == Preallocation::Off && size > 0 {
            data.set_len(size)?;
            let first = if size < 4096 { 512 } else { 4096 };
            data.write_at(&vec![0u8; first], 0)?;
        }
        data.flush()?;
    }
    if simple
        && p.data_file.is_none()
        && p.prealloc == Preallocation::Metadata
        && preallocate_fresh_metadata(path, &header, l1_size)?
    {
        return Ok(());
    }
    if p.prealloc != Preallocation::Off {
        let options = OpenOptions {
            writable: true,
            no_backing: true,
            // The data file is the one this call was asked to create.
            policy: FollowPolicy::Anything,
            ..OpenOptions::default()
        };
        let image = Qcow2Image::open(path, &options)?;
        image.preallocate(p.prealloc)?;
        image.flush()?;
    }
    Ok(())
}

/// Writes the header as a whole cluster, as QEMU does. The allocated size of the file is
/// not cosmetic: QEMU judges an image metadata-preallocated (and then looks through its
/// data clusters to host holes in `map`) by comparing it with the refcounted clusters.
fn write_cluster0(file: &HostFile, cluster0: &[u8], cs: u64) -> Result<()> {
    let mut padded = cluster0.to_vec();
    padded.resize(padded.len().max(cs as usize), 0);
    file.write_at(&padded, 0)
}

/// Writes a `falloc`/`full` preallocated image (without a data file) in the layout QEMU's
/// truncate gives it: QEMU first builds the small image (header, reftable, refblock, L1),
/// then `qcow2_refcount_area` places any new refblocks and a new refcount table right after
/// the L1 table, freeing the old table cluster; the data clusters follow contiguously, and
/// the L2 tables take the first free clusters: the old table's, then those past the data.
fn create_fully_allocated(
    path: &Path,
    mut header: Header,
    l1_size: u64,
    prealloc: Preallocation,
) -> Result<()> {
    let cb = header.cluster_bits;
    let cs = 1u64 << cb;
    let per_block = (8u64 << cb) >> header.refcount_order;
    let l2_entries = header.l2_entries();
    let entry_bytes = cs / l2_entries;
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let start = 3 + l1_clusters;
    let data = header.size.div_ceil(cs);
    let l2_tables = data.div_ceil(l2_entries);
    let too_large = || invalid("Image size is too large for this cluster size").with_path(path);
    if start >= per_block {
        return Err(too_large());
    }
    // `qcow2_refcount_metadata_size` for the old clusters and the new data and tables.
    let clusters = start + data + l2_tables + 1;
    let per_table = cs / 8;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    let new_blocks = blocks - 1;
    let table_at = start + new_blocks;
    let data_at = table_at + table;
    let end = data_at + data + l2_tables.saturating_sub(1);
    // Cluster 1 (the first reftable) is reused by the first L2 table, or stays free.
    let l2_at = |k: u64| if k == 0 { 1 } else { data_at + data + k - 1 };
    if end.checked_mul(cs).is_none_or(|b| b > i64::MAX as u64) {
        return Err(too_large());
    }

    header.refcount_table_offset = table_at << cb;
    header.refcount_table_clusters = u32::try_from(table).map_err(|_| too_large())?;
    header.l1_table_offset = 3 << cb;
    let cluster0 = header.encode().map_err(|e| e.with_path(path))?;
    let file = HostFile::create(path, CacheMode::Writeback, EngineChoice::Sync)?;
    write_cluster0(&file, &cluster0, cs)?;
    // Every cluster up to the end is in use, except the old reftable when no L2 table
    // took it.
    for b in 0..blocks {
        let mut block = vec![0u8; cs as usize];
        let first = b * per_block;
        for c in first..end.min(first + per_block) {
            if c != 1 || l2_tables > 0 {
                refcount::set(&mut block, c - first, header.refcount_order, 1);
            }
        }
        let at = if b == 0 { 2 } else { start + b - 1 };
        file.write_at(&block, at << cb)?;
    }
    // The first reftable, as QEMU wrote it before moving the table; its cluster keeps
    // these bytes when no L2 table reuses it.
    let mut first_table = vec![0u8; cs as usize];
    first_table[..8].copy_from_slice(&(2u64 << cb).to_be_bytes());
    file.write_at(&first_table, cs)?;
    let mut reftable = vec![0u8; (table * cs) as usize];
    for b in 0..blocks {
        let at = if b == 0 { 2 } else { start + b - 1 };
        reftable[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&(at << cb).to_be_bytes());
    }
    file.write_at(&reftable, table_at << cb)?;
    match prealloc {
        _ if data == 0 => {}
        Preallocation::Falloc => file.allocate(data_at << cb, data << cb)?,
        _ => {
            file.set_len((data_at + data) << cb)?;
            file.write_zero_bytes(data_at << cb, data << cb)?;
        }
    }
    let mut l1 = vec![0u8; (l1_size * 8) as usize];
    for k in 0..l2_tables {
        let mut l2 = vec![0u8; cs as usize];
        let first = k * l2_entries;
        for j in 0..l2_entries.min(data - first) {
            let entry = ((data_at + first + j) << cb) | crate::entry::COPIED;
            let at = (j * entry_bytes) as usize;
            // With extended L2 the subcluster bitmap stays zero: QEMU's preallocation
            // leaves the new clusters reading through.
            l2[at..at + 8].copy_from_slice(&entry.to_be_bytes());
        }
        file.write_at(&l2, l2_at(k) << cb)?;
        let l1_entry = (l2_at(k) << cb) | crate::entry::COPIED;
        l1[(k * 8) as usize..(k * 8 + 8) as usize].copy_from_slice(&l1_entry.to_be_bytes());
    }
    file.write_at(&l1, 3 << cb)?;
    if file.len()? < end << cb {
        file.set_len(end << cb)?;
    }
    file.flush()
}

/// QEMU's cluster allocation in a freshly created image, where every cluster below `end`
/// is in use: `qcow2_alloc_clusters` takes the next clusters, and a refcount block the
/// range lacks goes to the first free cluster after the range (describing itself when it
/// can, else counted by another new block), after which QEMU retries the same range.
struct FreshAlloc {
    per_block: u64,
    table_entries: u64,
    blocks: Vec<Option<u64>>,
    end: u64,
}

impl FreshAlloc {
    /// `None` when the refcount table would have to grow: that path is not emulated.
    fn new_block(&mut self, t: u64) -> Option<()> {
        if t >= self.table_entries {
            return None;
        }
        let at = self.end;
        self.end += 1;
        let i = usize::try_from(t).ok()?;
        if self.blocks.len() <= i {
            self.blocks.resize(i + 1, None);
        }
        self.blocks[i] = Some(at);
        if at / self.per_block != t {
            self.cover(at)?;
        }
        Some(())
    }

    fn cover(&mut self, cluster: u64) -> Option<()> {
        let t = cluster / self.per_block;
        let known = usize::try_from(t)
            .ok()
            .and_then(|i| self.blocks.get(i).copied().flatten())
            .is_some();
        if known {
            Some(())
        } else {
            self.new_block(t)
        }
    }

    fn alloc(&mut self, n: u64) -> Option<u64> {
        let start = self.end;
        self.end = start.checked_add(n)?;
        for t in start / self.per_block..=(start + n - 1) / self.per_block {
            self.cover(t * self.per_block)?;
        }
        Some(start)
    }
}

/// Preallocates the metadata of a fresh image (no data file) in QEMU's layout: for each
/// L2 table in turn, the table, then the data clusters it maps, contiguously; the last
/// partial (sub)cluster's tail is written with zeroes, as QEMU's copy-on-write does.
/// Returns `false`, having written nothing, when the layout would need the refcount table
/// to grow, which is left to the general allocator.
fn preallocate_fresh_metadata(path: &Path, header: &Header, l1_size: u64) -> Result<bool> {
    let cb = header.cluster_bits;
    let cs = 1u64 << cb;
    let l2_entries = header.l2_entries();
    let entry_bytes = cs / l2_entries;
    let data = header.size.div_ceil(cs);
    let mut alloc = FreshAlloc {
        per_block: (8u64 << cb) >> header.refcount_order,
        table_entries: cs / 8,
        blocks: vec![Some(2)],
        end: 3 + (l1_size * 8).div_ceil(cs),
    };
    let mut tables = Vec::new();
    let mut first = 0;
    while first < data {
        let n = l2_entries.min(data - first);
        let (Some(l2), Some(run)) = (alloc.alloc(1), alloc.alloc(n)) else {
            return Ok(false);
        };
        tables.push((l2, run, n));
        first += n;
    }
    if alloc
        .end
        .checked_mul(cs)
        .is_none_or(|b| b > i64::MAX as u64)
    {
        return Ok(false);
    }
    let file = HostFile::open(path, true, CacheMode::Writeback, EngineChoice::Sync)?;
    let per = alloc.per_block;
    for (t, at) in alloc.blocks.iter().enumerate() {
        let Some(at) = at else { continue };
        let mut block = vec![0u8; cs as usize];
        let lo = t as u64 * per;
        for c in lo..alloc.end.min(lo + per) {
            refcount::set(&mut block, c - lo, header.refcount_order, 1);
        }
        file.write_at(&block, at << cb)?;
    }
    let mut reftable = vec![0u8; cs as usize];
    for (t, at) in alloc.blocks.iter().enumerate() {
        if let Some(at) = at {
            reftable[t * 8..t * 8 + 8].copy_from_slice(&(at << cb).to_be_bytes());
        }
    }
    let mut l1 = vec![0u8; (l1_size * 8) as usize];
    for (k, &(l2_at, run, n)) in tables.iter().enumerate() {
        let mut l2 = vec![0u8; cs as usize];
        for j in 0..n {
            let entry = ((run + j) << cb) | crate::entry::COPIED;
            let at = (j * entry_bytes) as usize;
            // With extended L2 the subcluster bitmap stays zero, as QEMU leaves it.
            l2[at..at + 8].copy_from_slice(&entry.to_be_bytes());
        }
        file.write_at(&l2, l2_at << cb)?;
        l1[k * 8..k * 8 + 8].copy_from_slice(&((l2_at << cb) | crate::entry::COPIED).to_be_bytes());
    }
    if let Some(&(_, run, n)) = tables.last() {
        let within = header.size - ((data - 1) << cb);
        let end_host = ((run + n - 1) << cb) + within;
        let grain = if header.extended_l2() { cs / 32 } else { cs };
        let tail = header
            .size
            .next_multiple_of(grain)
            .min(header.size + (cs - within))
            - header.size;
        if tail > 0 {
            file.write_at(&vec![0u8; tail as usize], end_host)?;
        }
        if file.len()? < end_host {
            file.set_len(end_host)?;
        }
    }
    file.write_at(&l1, 3 << cb)?;
    // The refcount table goes last: until then the image still reads as empty.
    file.write_at(&reftable, cs)?;
    file.flush()?;
    Ok(true)
}
