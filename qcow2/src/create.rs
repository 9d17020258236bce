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
        "encryption",
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    (
        "encrypt.format",
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    (
        "encrypt.key-secret",
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    ("encrypt.cipher-alg", "Name of encryption cipher algorithm"),
    ("encrypt.cipher-mode", "Name of encryption cipher mode"),
    ("encrypt.ivgen-alg", "Name of IV generator algorithm"),
    (
        "encrypt.ivgen-hash-alg",
        "Name of IV generator hash algorithm",
    ),
    ("encrypt.hash-alg", "Name of encryption hash algorithm"),
    (
        "encrypt.iter-time",
        "Time to spend in PBKDF in milliseconds",
    ),
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
    /// `encrypt.format=luks`: what the new LUKS header asks for.
    luks: Option<vdisk_luks::NewVolumeOptions>,
}

fn plan(options: &mut CreateOptions) -> Result<Plan> {
    // qemu-img itself checks the backing options before the driver sees any.
    let backing_file = options.take("backing_file").filter(|s| !s.is_empty());
    let backing_fmt = options.take("backing_fmt").filter(|s| !s.is_empty());
    if backing_file.is_some() && backing_fmt.is_none() {
        return Err(invalid("Backing file specified without backing format"));
    }
    if backing_file.is_none() && backing_fmt.is_some() {
        return Err(invalid("Backing format specified without backing file"));
    }
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
    let lazy_refcounts = options.take_bool("lazy_refcounts")?.unwrap_or(false);
    let extended_l2 = options.take_bool("extended_l2")?.unwrap_or(false);
    let compression = match options.take("compression_type").as_deref() {
        None | Some("zlib") => CompressionType::Deflate,
        Some("zstd") => CompressionType::Zstd,
        Some(other) => {
            return Err(invalid(format!(
                "Parameter 'compression-type' does not accept value '{other}'"
            )))
        }
    };
    let data_file = options.take("data_file").filter(|s| !s.is_empty());
    let data_file_raw = options.take_bool("data_file_raw")?.unwrap_or(false);
    let mut prealloc = options.take_preallocation()?;
    // The checks below run in qemu-img's order, so that options breaking several rules
    // get the same message.
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
    // With extended L2 the preallocated clusters keep their subclusters unallocated, so
    // they still read from the backing file; without it they would hide it.
    if prealloc != Preallocation::Off && backing_file.is_some() && !extended_l2 {
        return Err(invalid(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ));
    }
    if version == 2 && lazy_refcounts {
        return Err(v3_only("Lazy refcounts"));
    }
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
    if data_file_raw && backing_file.is_some() {
        return Err(invalid(
            "Backing file and data-file-raw cannot be used at the same time",
        ));
    }
    if data_file.is_some() && version == 2 {
        return Err(v3_only("External data files are"));
    }
    if data_file_raw && data_file.is_none() {
        return Err(invalid("data-file-raw requires data-file"));
    }
    if version == 2 && compression != CompressionType::Deflate {
        return Err(v3_only("Non-zlib compression type is"));
    }
    if data_file_raw && prealloc == Preallocation::Off {
        // As QEMU (since 5.1): a raw data file must also read the same through the qcow2
        // metadata, so the L2 tables must map every cluster one to one.
        prealloc = Preallocation::Metadata;
    }
    let luks = crate::crypto::take_create_options(options)?;
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
        luks,
    })
}

/// Creates a qcow2 image at `path`.
pub fn create(path: &Path, mut options: CreateOptions) -> Result<()> {
    let size = options.size;
    if !size.is_multiple_of(512) {
        // qemu's qcow2_co_create (qemu-img create rounds the size up before it asks).
        return Err(invalid("Image size must be a multiple of 512 bytes").with_path(path));
    }
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
    let volume = match &p.luks {
        Some(v) => Some(
            vdisk_luks::keys::new_volume(v.cipher, v.hash, v.iter_time_ms, &v.passphrase)
                .map_err(|e| e.with_path(path))?,
        ),
        None => None,
    };
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
            // QEMU leaves the feature name table out of images with clusters of 4 KiB
            // or less (it would crowd the header cluster).
            feature_names: if p.version >= 3 && cs > 4096 {
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
    let crypto_len = volume.as_ref().map(|v| v.header.payload_bytes());
    if let Some(layout) = Layout::plan(
        &header,
        l1_size,
        p.prealloc,
        p.data_file.is_some(),
        crypto_len,
    ) {
        return write_layout(path, header, &layout, &p, volume.as_ref());
    }
    if volume.is_some() {
        return Err(Error::unsupported(
            "create",
            "an encrypted image this large is not supported (its layout could not be planned)",
        )
        .with_path(path));
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

/// QEMU's `-EAGAIN`: the allocation placed new metadata and must be searched again.
struct Again;

/// A refcount update that either went through or must be retried.
type Step = std::result::Result<(), Again>;

/// A model of QEMU's cluster allocator on a freshly created image, so that a new image is
/// laid out cluster for cluster as `qemu-img create` lays it out: `qcow2_alloc_clusters`
/// (first free run from the free index, then the refcount update, retried whenever a new
/// refcount block had to be placed), `alloc_refcount_block` (a missing block goes to the
/// first free cluster, describing itself when it can; a full table grows through
/// `qcow2_refcount_area`) and `qcow2_refcount_area` itself.
struct Model {
    cs: u64,
    order: u32,
    per_block: u64,
    used: Vec<u64>,
    free_index: u64,
    /// Cluster of each refcount block (0: none), as long as the refcount table.
    table: Vec<u64>,
    table_at: u64,
    table_clusters: u64,
    /// Clusters ever written as refcount tables or blocks: QEMU's file keeps them.
    written: Vec<(u64, u64)>,
    /// Refused past this many clusters (the model keeps a bit per cluster).
    limit: u64,
    /// Retries left, so a logic error cannot loop forever.
    budget: u64,
}

impl Model {
    fn is_used(&self, c: u64) -> bool {
        self.used
            .get((c / 64) as usize)
            .is_some_and(|w| w & (1 << (c % 64)) != 0)
    }

    fn mark(&mut self, c: u64, on: bool) -> Option<()> {
        if c >= self.limit {
            return None;
        }
        let i = (c / 64) as usize;
        if self.used.len() <= i {
            self.used.resize(i + 1, 0);
        }
        if on {
            self.used[i] |= 1 << (c % 64);
        } else {
            self.used[i] &= !(1 << (c % 64));
            self.free_index = self.free_index.min(c);
        }
        Some(())
    }

    fn spend(&mut self) -> Option<()> {
        self.budget = self.budget.checked_sub(1)?;
        Some(())
    }

    /// `alloc_clusters_noref`.
    fn alloc_noref(&mut self, n: u64) -> Option<u64> {
        let mut run = 0;
        while run < n {
            let c = self.free_index;
            if c >= self.limit {
                return None;
            }
            self.free_index += 1;
            run = if self.is_used(c) { 0 } else { run + 1 };
        }
        Some(self.free_index - n)
    }

    /// `update_refcount` (+1) of `n` clusters from `start`.
    fn update(&mut self, start: u64, n: u64) -> Option<Step> {
        let mut block = None;
        for c in start..start + n {
            let t = c / self.per_block;
            if block != Some(t) {
                if let Err(Again) = self.alloc_block(c)? {
                    for done in start..c {
                        self.mark(done, false)?;
                    }
                    self.free_index = self.free_index.min(start);
                    return Some(Err(Again));
                }
                block = Some(t);
            }
            self.mark(c, true)?;
        }
        Some(Ok(()))
    }

    /// `alloc_refcount_block` for the block covering cluster `c`.
    fn alloc_block(&mut self, c: u64) -> Option<Step> {
        self.spend()?;
        let t = c / self.per_block;
        if self.table.get(t as usize).is_some_and(|&b| b != 0) {
            return Some(Ok(()));
        }
        let new = self.alloc_noref(1)?;
        if new / self.per_block == t {
            self.mark(new, true)?;
        } else if let Err(Again) = self.update(new, 1)? {
            return Some(Err(Again));
        }
        self.written.push((new, 1));
        if (t as usize) < self.table.len() {
            self.table[t as usize] = new;
            return Some(Err(Again));
        }
        let blocks_used = (c + 1).max(new + 1).div_ceil(self.per_block);
        self.refcount_area(blocks_used * self.per_block, 0, false, Some((t, new)))?;
        Some(Err(Again))
    }

    /// `qcow2_refcount_area`: new refcount blocks and a new table at `start`, covering
    /// themselves and `additional` clusters past them; the old table is freed. Returns the
    /// first cluster after them.
    fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_block: Option<(u64, u64)>,
    ) -> Option<u64> {
        let total = refcount_blocks(start + additional, self.cs, self.order, !exact);
        let area = start / self.per_block;
        let mut size = if exact {
            total
        } else {
            total + total.div_ceil(2)
        };
        size = size.next_multiple_of(self.cs / 8);
        let clusters = size * 8 / self.cs;
        let mut table = self.table.clone();
        table.resize(usize::try_from(size).ok()?.max(table.len()), 0);
        if let Some((t, at)) = new_block {
            *table.get_mut(usize::try_from(t).ok()?)? = at;
        }
        let mut at = start;
        for i in area..total {
            let slot = table.get_mut(usize::try_from(i).ok()?)?;
            if *slot == 0 {
                *slot = at;
                self.written.push((at, 1));
                at += 1;
            }
        }
        let table_at = at;
        let end = table_at + clusters;
        for c in start..end {
            self.mark(c, true)?;
        }
        self.written.push((table_at, clusters));
        let (old_at, old_clusters) = (self.table_at, self.table_clusters);
        self.table = table;
        self.table_at = table_at;
        self.table_clusters = clusters;
        for c in old_at..old_at + old_clusters {
            self.mark(c, false)?;
        }
        Some(end)
    }

    /// `qcow2_alloc_clusters`.
    fn alloc(&mut self, n: u64) -> Option<u64> {
        loop {
            self.spend()?;
            let start = self.alloc_noref(n)?;
            if let Ok(()) = self.update(start, n)? {
                return Some(start);
            }
        }
    }

    /// The last cluster with a nonzero refcount (`qcow2_get_last_cluster`).
    fn last_used(&self) -> u64 {
        for (i, w) in self.used.iter().enumerate().rev() {
            if *w != 0 {
                return i as u64 * 64 + 63 - u64::from(w.leading_zeros());
            }
        }
        0
    }
}

/// `qcow2_refcount_metadata_size`'s refcount block count for `clusters` clusters.
fn refcount_blocks(clusters: u64, cs: u64, order: u32, generous: bool) -> u64 {
    let per_table = cs / 8;
    let per_block = (cs * 8) >> order;
    let (mut clusters, mut generous) = (clusters, generous);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table);
        n = clusters + blocks + table;
        if n == last && generous {
            clusters += table.div_ceil(2);
            n = 0;
            generous = false;
        }
        if n == last {
            return blocks;
        }
    }
}

/// Where everything of a new image goes, in clusters.
struct Layout {
    model: Model,
    l1_at: u64,
    /// Per L2 table: its cluster and the first host cluster of the data it maps (for
    /// images without a data file), and how many clusters it maps.
    l2: Vec<(u64, Option<u64>, u64)>,
    /// `falloc`/`full` data area (first cluster, count) of an image without a data file.
    data_area: Option<(u64, u64)>,
    /// First cluster of the LUKS header region, allocated last as qemu's
    /// `qcow2_set_up_encryption` does.
    crypto_at: Option<u64>,
}

impl Layout {
    /// Runs QEMU's creation through the model: the empty image, the L1 table, then the
    /// preallocation as `qcow2_co_truncate` does it. `None` when the model declines
    /// (huge images); the caller then lays the image out itself.
    fn plan(
        header: &Header,
        l1_size: u64,
        prealloc: Preallocation,
        external: bool,
        crypto_len: Option<u64>,
    ) -> Option<Layout> {
        let cb = header.cluster_bits;
        let cs = 1u64 << cb;
        let mut table = vec![0u64; (cs / 8) as usize];
        table[0] = 2;
        let mut model = Model {
            cs,
            order: header.refcount_order,
            per_block: (cs * 8) >> header.refcount_order,
            used: vec![0b111],
            free_index: 3,
            table,
            table_at: 1,
            table_clusters: 1,
            written: vec![(1, 2)],
            limit: 1 << 26,
            budget: 1 << 20,
        };
        let l1_at = if l1_size > 0 {
            model.alloc((l1_size * 8).div_ceil(cs))?
        } else {
            0
        };
        let l2_entries = header.l2_entries();
        let data = header.size.div_ceil(cs);
        let tables = data.div_ceil(l2_entries);
        let mut l2 = Vec::new();
        let mut data_area = None;
        match prealloc {
            Preallocation::Off => {}
            Preallocation::Falloc | Preallocation::Full if !external => {
                let old_end = model.last_used() + 1;
                let start = model.refcount_area(old_end, data + tables + 1, true, None)?;
                for c in start..start + data {
                    model.mark(c, true)?;
                }
                model.free_index = model.free_index.min(start);
                for k in 0..tables {
                    let n = l2_entries.min(data - k * l2_entries);
                    l2.push((model.alloc(1)?, Some(start + k * l2_entries), n));
                }
                data_area = Some((start, data));
            }
            _ => {
                for k in 0..tables {
                    let n = l2_entries.min(data - k * l2_entries);
                    let at = model.alloc(1)?;
                    let run = if external {
                        None
                    } else {
                        Some(model.alloc(n)?)
                    };
                    l2.push((at, run, n));
                }
            }
        }
        let crypto_at = match crypto_len {
            Some(len) => Some(model.alloc(len.div_ceil(cs))?),
            None => None,
        };
        Some(Layout {
            model,
            l1_at,
            l2,
            data_area,
            crypto_at,
        })
    }
}

/// Writes the image `layout` describes, then grows the data file (if any) as QEMU's
/// preallocation does.
fn write_layout(
    path: &Path,
    mut header: Header,
    layout: &Layout,
    p: &Plan,
    volume: Option<&vdisk_luks::keys::NewVolume>,
) -> Result<()> {
    let m = &layout.model;
    let cb = header.cluster_bits;
    let cs = 1u64 << cb;
    if let (Some(at), Some(v)) = (layout.crypto_at, volume) {
        header.crypt_method = CryptMethod::Luks;
        header.extensions.crypto = Some(crate::header::CryptoExt {
            offset: at << cb,
            length: v.header.payload_bytes(),
        });
    }
    header.refcount_table_offset = m.table_at << cb;
    header.refcount_table_clusters =
        u32::try_from(m.table_clusters).map_err(|_| invalid("refcount table too large"))?;
    header.l1_table_offset = layout.l1_at << cb;
    let cluster0 = header.encode().map_err(|e| e.with_path(path))?;
    let file = HostFile::create(path, CacheMode::Writeback, EngineChoice::Sync)?;
    write_cluster0(&file, &cluster0, cs)?;
    // Old tables and blocks QEMU wrote stay in its file; their clusters are written here
    // too, so both files hold (and allocate) the same clusters.
    for &(at, n) in &m.written {
        file.write_at(&vec![0u8; (n * cs) as usize], at << cb)?;
    }
    for (t, &at) in m.table.iter().enumerate() {
        if at == 0 {
            continue;
        }
        let mut block = vec![0u8; cs as usize];
        let first = t as u64 * m.per_block;
        for i in 0..m.per_block {
            if m.is_used(first + i) {
                refcount::set(&mut block, i, m.order, 1);
            }
        }
        file.write_at(&block, at << cb)?;
    }
    let mut reftable = vec![0u8; (m.table_clusters * cs) as usize];
    for (t, &at) in m.table.iter().enumerate() {
        if at != 0 {
            reftable[t * 8..t * 8 + 8].copy_from_slice(&(at << cb).to_be_bytes());
        }
    }
    file.write_at(&reftable, m.table_at << cb)?;
    if let Some((start, n)) = layout.data_area {
        if n > 0 {
            let now = file.len()?;
            let end = (start + n) << cb;
            if p.prealloc == Preallocation::Falloc {
                file.allocate(start << cb, n << cb)?;
            } else {
                file.set_len(end.max(now))?;
                file.write_zero_bytes(start << cb, n << cb)?;
            }
        }
    }
    let l2_entries = header.l2_entries();
    let entry_bytes = cs / l2_entries;
    let mut l1 = vec![0u8; (u64::from(header.l1_size) * 8) as usize];
    for (k, &(at, run, n)) in layout.l2.iter().enumerate() {
        let mut table = vec![0u8; cs as usize];
        for j in 0..n {
            let host = match run {
                Some(first) => (first + j) << cb,
                // An external data file maps each cluster to its own guest offset.
                None => (k as u64 * l2_entries + j) << cb,
            };
            let entry = host | crate::entry::COPIED;
            let o = (j * entry_bytes) as usize;
            // With extended L2 the subcluster bitmap stays zero: QEMU's preallocation
            // leaves the new clusters reading through (zeroes, or the backing file).
            table[o..o + 8].copy_from_slice(&entry.to_be_bytes());
        }
        file.write_at(&table, at << cb)?;
        l1[k * 8..k * 8 + 8].copy_from_slice(&((at << cb) | crate::entry::COPIED).to_be_bytes());
    }
    if !l1.is_empty() {
        file.write_at(&l1, layout.l1_at << cb)?;
    }
    // QEMU's copy-on-write of a new last cluster's tail, and the final truncate to the
    // host offset of the end of the disk.
    let size = header.size;
    let data_file = match &p.data_file {
        Some(name) => {
            let target = crate::open::resolve(path, name, "external data file")?;
            Some(HostFile::create(
                &target,
                CacheMode::Writeback,
                EngineChoice::Sync,
            )?)
        }
        None => None,
    };
    if let (Some(at), Some(v)) = (layout.crypto_at, volume) {
        crate::crypto::write_new_region(&file, at << cb, cs, v)?;
    }
    match (&data_file, layout.l2.last()) {
        (None, Some(&(_, Some(run), n))) if layout.data_area.is_none() => {
            let within = size - ((size - 1) & !(cs - 1));
            let end_host = ((run + n - 1) << cb) + within;
            let tail = cow_tail(&header, size, within);
            if tail > 0 {
                file.write_at(&vec![0u8; tail as usize], end_host)?;
            }
            if file.len()? < end_host {
                file.set_len(end_host)?;
            }
        }
        (Some(data), _) => grow_data_file(data, &header, p.prealloc)?,
        _ => {}
    }
    file.flush()?;
    if let Some(data) = data_file {
        data.flush()?;
    }
    Ok(())
}

/// Bytes QEMU's copy-on-write zeroes after the end of the disk in its last cluster: up to
/// the next subcluster boundary with extended L2, the next cluster boundary without.
fn cow_tail(header: &Header, size: u64, within: u64) -> u64 {
    let cs = header.cluster_size();
    let grain = if header.extended_l2() { cs / 32 } else { cs };
    size.next_multiple_of(grain).min(size + (cs - within)) - size
}

/// The data file of a new image, grown as QEMU grows it: to the guest size without
/// preallocation; with it, the tail of a partial last cluster written by copy-on-write,
/// then (if still shorter) grown to the guest size in the preallocation mode. QEMU's file
/// driver writes the first block of a file it grows from empty, so `map` shows it.
fn grow_data_file(data: &HostFile, header: &Header, prealloc: Preallocation) -> Result<()> {
    let size = header.size;
    if size == 0 {
        return Ok(());
    }
    let cs = header.cluster_size();
    if prealloc != Preallocation::Off {
        let within = size - ((size - 1) & !(cs - 1));
        let tail = cow_tail(header, size, within);
        if tail > 0 {
            data.write_at(&vec![0u8; tail as usize], size)?;
        }
    }
    let old = data.len()?;
    if old >= size {
        return Ok(());
    }
    match prealloc {
        Preallocation::Off | Preallocation::Metadata => data.set_len(size)?,
        Preallocation::Falloc => data.allocate(old, size - old)?,
        Preallocation::Full => {
            data.set_len(size)?;
            data.write_zero_bytes(old, size - old)?;
        }
    }
    if old == 0 && prealloc != Preallocation::Full {
        let first = if size < 4096 { 512 } else { 4096 };
        data.write_at(&vec![0u8; first], 0)?;
    }
    Ok(())
}
