//! The qcow2 header, its feature bits and its extensions: parsing and validation.
//!
//! Everything here works on the bytes of cluster 0, which a caller reads in two steps (the
//! fixed fields to learn the cluster size, then the cluster itself). Each check names the rule
//! of `docs/interop/qcow2.rst` (or the QEMU limit) it enforces, so a hostile header becomes an
//! [`Error`] with a message a user can act on, never a panic or a huge allocation.

use vdisk_block::{Error, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of the version 2 header (and of the fixed part of version 3).
pub const V2_HEADER_LEN: u32 = 72;
/// The smallest header a version 3 image may have.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// The header length QEMU writes for version 3 (the compression type byte plus padding).
pub const V3_HEADER_LEN: u32 = 112;
/// Smallest cluster size QEMU accepts (512 bytes).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU accepts (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Subclusters need clusters of at least 16 KiB (32 subclusters of 512 bytes).
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// QEMU's QCOW_MAX_L1_SIZE: the active L1 table may take at most 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's QCOW_MAX_REFTABLE_SIZE: the refcount table may take at most 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's QCOW_MAX_SNAPSHOTS.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Backing file names longer than this are refused (QEMU's limit).
pub const MAX_BACKING_NAME: u32 = 1023;
/// Host offsets use bits 9..=55 of table entries, so nothing may lie at or past 2^56.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;
/// QEMU keeps the backing format in a 16-byte buffer, NUL included.
pub const MAX_BACKING_FORMAT: usize = 15;
/// QEMU's limit on the number of persistent bitmaps.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the bitmap directory.
pub const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be stale (lazy refcounts were in use when the image was last written).
    pub const DIRTY: u64 = 1 << 0;
    /// Some metadata structure may be corrupt; only repair may write.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// The compression type field is not deflate.
    pub const COMPRESSION: u64 = 1 << 3;
    /// L2 entries are 128 bits with a subcluster bitmap.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this driver understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compat {
    /// Refcount updates may be postponed; the dirty bit covers the gap.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Auto-clear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent with the image.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a valid raw image by itself.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Every bit this driver understands.
    pub const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// Header extension types.
pub mod ext {
    /// End of the extension area.
    pub const END: u32 = 0;
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    /// Persistent bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// How guest data is encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CryptMethod {
    /// Not encrypted.
    None,
    /// Legacy AES-128-CBC with the guest sector as IV.
    Aes,
    /// LUKS, with its header in the clusters the crypto extension names.
    Luks,
}

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate (QEMU calls it "zlib", but there is no zlib wrapper).
    #[default]
    Deflate,
    /// Zstandard.
    Zstd,
}

impl CompressionType {
    /// QEMU's spelling (`zlib` or `zstd`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deflate => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

/// Which of the three feature bitmaps a feature-name entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// `incompatible_features`.
    Incompatible,
    /// `compatible_features`.
    Compatible,
    /// `autoclear_features`.
    Autoclear,
    /// A type this driver does not know (kept so a rewrite preserves it).
    Other(u8),
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Which bitmap the bit belongs to.
    pub kind: FeatureKind,
    /// Bit number.
    pub bit: u8,
    /// Human-readable name (up to 46 bytes, NUL padding removed).
    pub name: String,
}

/// The bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Host offset of the bitmap directory.
    pub directory_offset: u64,
}

/// The full disk encryption header pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoExt {
    /// Host offset of the LUKS header.
    pub offset: u64,
    /// Length of the LUKS header area.
    pub length: u64,
}

/// Header extensions, decoded where known and preserved where not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file format.
    pub backing_format: Option<String>,
    /// Feature name table.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension. Kept even when the autoclear bit says it is stale.
    pub bitmaps: Option<BitmapsExt>,
    /// Full disk encryption header pointer.
    pub crypto: Option<CryptoExt>,
    /// External data file name.
    pub data_file: Option<String>,
    /// Extensions this driver does not know, in file order, to be written back unchanged.
    pub unknown: Vec<(u32, Vec<u8>)>,
}

/// A parsed and validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name lies in cluster 0 (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest-visible size in bytes.
    pub size: u64,
    /// Encryption.
    pub crypt_method: CryptMethod,
    /// Entries of the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (see [`incompat`]).
    pub incompatible_features: u64,
    /// Compatible feature bits (see [`compat`]).
    pub compatible_features: u64,
    /// Auto-clear feature bits (see [`autoclear`]).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header structure (72 for version 2).
    pub header_length: u32,
    /// Compression of compressed clusters.
    pub compression_type: CompressionType,
    /// Header bytes past the fields this driver knows (offset 105 up to `header_length`),
    /// preserved for a rewrite as the spec asks.
    pub extra_fields: Vec<u8>,
    /// Header extensions.
    pub extensions: Extensions,
    /// The backing file name as stored.
    pub backing_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn bad(message: impl Into<String>) -> Error {
    Error::corrupt("open", message)
}

/// The fixed fields readable from the first bytes, enough to size the read of cluster 0.
pub fn peek_cluster_bits(start: &[u8]) -> Result<u32> {
    // qemu reads a short file as if padded with zeroes, so a file without the magic is
    // "not in qcow2 format" however short it is.
    if start.get(..4) != Some(&MAGIC.to_be_bytes()[..]) {
        return Err(bad("Image is not in qcow2 format (bad magic)"));
    }
    if start.len() < V2_HEADER_LEN as usize {
        return Err(bad(format!(
            "the file is too short for a qcow2 header ({} bytes, need {V2_HEADER_LEN})",
            start.len()
        )));
    }
    check_magic_version(start)?;
    let cluster_bits = be32(start, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(bad(format!(
            "Unsupported cluster size: 2^{cluster_bits} (cluster_bits must lie in {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
        )));
    }
    Ok(cluster_bits)
}

fn check_magic_version(b: &[u8]) -> Result<()> {
    if be32(b, 0) != MAGIC {
        return Err(bad("Image is not in qcow2 format (bad magic)"));
    }
    let version = be32(b, 4);
    if version != 2 && version != 3 {
        return Err(Error::unsupported(
            "open",
            format!("Unsupported qcow2 version {version} (only 2 and 3 exist)"),
        ));
    }
    Ok(())
}

/// True when `b` starts with the qcow2 magic and a known version.
pub fn probe(b: &[u8]) -> bool {
    b.len() >= 8 && check_magic_version(b).is_ok()
}

fn aligned(value: u64, cluster_bits: u32) -> bool {
    value & ((1u64 << cluster_bits) - 1) == 0
}

/// Checks that a table of `bytes` at `offset` is cluster aligned and lies in addressable
/// host space. `what` names the table in QEMU's words.
pub fn check_table(what: &str, offset: u64, bytes: u64, cluster_bits: u32) -> Result<()> {
    if !aligned(offset, cluster_bits) {
        return Err(bad(format!(
            "{what} offset invalid: {offset:#x} is not cluster aligned"
        )));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= MAX_HOST_OFFSET => Ok(()),
        _ => Err(bad(format!(
            "{what} offset invalid: {offset:#x} + {bytes} bytes lies past the addressable 2^56 bytes"
        ))),
    }
}

impl Header {
    /// Parses and validates the header from `cluster0`, the first bytes of the image (the
    /// whole first cluster, or the whole file if shorter).
    pub fn parse(cluster0: &[u8]) -> Result<Header> {
        let cluster_bits = peek_cluster_bits(cluster0)?;
        let cluster_size = 1u64 << cluster_bits;
        let b = cluster0;
        let version = be32(b, 4);
        let mut h = Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits,
            size: be64(b, 24),
            crypt_method: match be32(b, 32) {
                0 => CryptMethod::None,
                1 => CryptMethod::Aes,
                2 => CryptMethod::Luks,
                other => {
                    return Err(bad(format!(
                        "Unsupported encryption method: {other} (0 none, 1 AES, 2 LUKS)"
                    )))
                }
            },
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Deflate,
            extra_fields: Vec::new(),
            extensions: Extensions::default(),
            backing_file: None,
        };
        if version == 3 {
            if b.len() < V3_MIN_HEADER_LEN as usize {
                return Err(bad("the file is too short for a qcow2 version 3 header"));
            }
            h.incompatible_features = be64(b, 72);
            h.compatible_features = be64(b, 80);
            h.autoclear_features = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < V3_MIN_HEADER_LEN {
                return Err(bad(format!(
                    "qcow2 header too short ({} bytes, version 3 needs at least {V3_MIN_HEADER_LEN})",
                    h.header_length
                )));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(bad("qcow2 header exceeds cluster size"));
            }
            if h.header_length & 7 != 0 {
                return Err(bad(format!(
                    "qcow2 header length {} is not a multiple of 8",
                    h.header_length
                )));
            }
            if b.len() < h.header_length as usize {
                return Err(bad("the file ends inside the qcow2 header"));
            }
        }
        // Extensions must be parsed before the feature check so an unknown bit can be named.
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset.min(cluster_size)
        } else {
            cluster_size
        };
        h.extensions = parse_extensions(b, u64::from(h.header_length), ext_end, &h)?;
        h.validate_features()?;
        if h.header_length > V3_MIN_HEADER_LEN {
            let raw = b[104];
            h.compression_type = match raw {
                0 => CompressionType::Deflate,
                1 => CompressionType::Zstd,
                other => {
                    return Err(Error::unsupported(
                        "open",
                        format!("Unknown compression type {other}"),
                    ))
                }
            };
            h.extra_fields = b[105..h.header_length as usize].to_vec();
        }
        let bit_set = h.incompatible_features & incompat::COMPRESSION != 0;
        match (h.compression_type, bit_set) {
            (CompressionType::Deflate, true) => {
                return Err(bad(
                    "the compression type incompatible bit is set but the compression type is the default (zlib)",
                ))
            }
            (CompressionType::Zstd, false) => {
                return Err(bad(
                    "Compression type differs from default, but the compression type incompatible bit is not set",
                ))
            }
            _ => {}
        }
        h.validate_layout()?;
        h.backing_file = h.parse_backing_name(b)?;
        h.validate_references()?;
        Ok(h)
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// True with 128-bit L2 entries.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    /// True when guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    /// True when the external data file is a valid raw image by itself.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Entries of one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2() { 16 } else { 8 }
    }

    /// Bytes of guest data one L1 entry covers (log2).
    pub fn l1_entry_shift(&self) -> u32 {
        self.cluster_bits + self.l2_entries().trailing_zeros()
    }

    /// The number of L1 entries the virtual size needs.
    pub fn required_l1_size(&self) -> u64 {
        let shift = self.l1_entry_shift();
        // `size` was checked to fit in i64, so this cannot overflow.
        (self.size + (1u64 << shift) - 1) >> shift
    }

    /// The qcow2 `compat` level as qemu-img prints it.
    pub fn compat_str(&self) -> &'static str {
        if self.version == 2 {
            "0.10"
        } else {
            "1.1"
        }
    }

    /// Refuses unknown incompatible bits, naming them from the feature table when it can,
    /// and checks the combinations the spec forbids.
    fn validate_features(&self) -> Result<()> {
        let unknown = self.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            let mut names = Vec::new();
            for bit in 0..64u8 {
                if unknown & (1u64 << bit) == 0 {
                    continue;
                }
                let named = self
                    .extensions
                    .feature_names
                    .iter()
                    .find(|f| f.kind == FeatureKind::Incompatible && f.bit == bit);
                names.push(match named {
                    Some(f) => format!("{} (bit {bit})", f.name),
                    None => format!("Unknown incompatible feature: bit {bit}"),
                });
            }
            return Err(Error::unsupported(
                "open",
                format!("Unsupported qcow2 feature(s): {}", names.join(", ")),
            ));
        }
        if self.refcount_order > 6 {
            return Err(bad(format!(
                "Reference count entry width too large; may not exceed 64 bits (refcount_order {})",
                self.refcount_order
            )));
        }
        if self.extended_l2() && self.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(bad(format!(
                "Extended L2 entries are only supported with cluster sizes of at least 16 KiB (cluster_bits {})",
                self.cluster_bits
            )));
        }
        if self.data_file_raw() && !self.has_data_file() {
            return Err(bad(
                "the raw external data autoclear bit is set without the external data file bit",
            ));
        }
        // An external data file with LUKS is allowed (qemu makes them: the data file's
        // offsets are the host offsets of the IVs); legacy AES predates data files.
        if self.has_data_file() && self.crypt_method == CryptMethod::Aes {
            return Err(bad(
                "an external data file cannot be combined with legacy AES encryption",
            ));
        }
        Ok(())
    }

    /// Checks table positions and sizes against QEMU's caps, before anything is allocated.
    fn validate_layout(&self) -> Result<()> {
        let cb = self.cluster_bits;
        if self.size > i64::MAX as u64 {
            return Err(bad(format!("Image is too big ({} bytes)", self.size)));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad(format!(
                "Active L1 table too large ({} entries, at most {})",
                self.l1_size,
                MAX_L1_BYTES / 8
            )));
        }
        if u64::from(self.l1_size) < self.required_l1_size() {
            return Err(bad(format!(
                "L1 table is too small ({} entries for a virtual size that needs {})",
                self.l1_size,
                self.required_l1_size()
            )));
        }
        if self.l1_size > 0 {
            check_table("Active L1 table", self.l1_table_offset, l1_bytes, cb)?;
            if self.l1_table_offset == 0 {
                return Err(bad(
                    "Active L1 table offset invalid: it overlaps the header",
                ));
            }
        }
        if self.refcount_table_clusters == 0 {
            return Err(bad("Image does not contain a reference count table"));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) << cb;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(bad(format!(
                "Reference count table too large ({rt_bytes} bytes, at most {MAX_REFTABLE_BYTES})"
            )));
        }
        check_table(
            "Reference count table",
            self.refcount_table_offset,
            rt_bytes,
            cb,
        )?;
        if self.refcount_table_offset == 0 {
            return Err(bad(
                "Reference count table offset invalid: it overlaps the header",
            ));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(bad(format!(
                "Too many snapshots ({}, at most {MAX_SNAPSHOTS})",
                self.nb_snapshots
            )));
        }
        if self.nb_snapshots > 0 {
            // Entries are at least 40 bytes; the table's real length is checked when read.
            check_table(
                "Snapshot table",
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * 40,
                cb,
            )?;
        }
        if let Some(c) = self.extensions.crypto {
            check_table("Crypto header", c.offset, c.length, cb)?;
        }
        if let Some(bm) = self.extensions.bitmaps {
            check_table(
                "Bitmap directory",
                bm.directory_offset,
                bm.directory_size,
                cb,
            )?;
        }
        Ok(())
    }

    fn parse_backing_name(&self, b: &[u8]) -> Result<Option<String>> {
        if self.backing_file_offset == 0 {
            return Ok(None);
        }
        if self.backing_file_size > MAX_BACKING_NAME {
            return Err(bad(format!(
                "Backing file name too long ({} bytes, at most {MAX_BACKING_NAME})",
                self.backing_file_size
            )));
        }
        let end = self
            .backing_file_offset
            .checked_add(u64::from(self.backing_file_size))
            .filter(|&end| end <= self.cluster_size())
            .ok_or_else(|| bad("Invalid backing file offset: the name lies outside cluster 0"))?;
        if self.backing_file_offset < u64::from(self.header_length) {
            return Err(bad(
                "Invalid backing file offset: the name overlaps the header",
            ));
        }
        if end as usize > b.len() {
            return Err(bad("the file ends inside the backing file name"));
        }
        let raw = &b[self.backing_file_offset as usize..end as usize];
        let name = String::from_utf8(raw.to_vec())
            .map_err(|_| bad("the backing file name is not valid UTF-8"))?;
        if name.is_empty() {
            return Ok(None);
        }
        Ok(Some(name))
    }

    /// Cross-checks fields against extensions (the pairs the spec ties together).
    fn validate_references(&self) -> Result<()> {
        let luks = self.crypt_method == CryptMethod::Luks;
        match (luks, self.extensions.crypto.is_some()) {
            (true, false) => return Err(bad("Missing CRYPTO header for crypt method 2 (LUKS)")),
            (false, true) => {
                return Err(bad(
                    "CRYPTO header extension only expected with LUKS encryption method",
                ))
            }
            _ => {}
        }
        if self.autoclear_features & autoclear::BITMAPS != 0 && self.extensions.bitmaps.is_none() {
            return Err(bad(
                "the bitmaps autoclear bit is set but the image has no bitmaps extension",
            ));
        }
        if self.data_file_raw() && self.backing_file.is_some() {
            return Err(bad(
                "data-file-raw is set but the image has a backing file (they cannot be combined)",
            ));
        }
        if self.extensions.data_file.is_some() && !self.has_data_file() {
            return Err(bad(
                "the image names an external data file but the external data file bit is not set",
            ));
        }
        Ok(())
    }
}

fn ext_string(data: &[u8], what: &str) -> Result<String> {
    String::from_utf8(data.to_vec()).map_err(|_| bad(format!("the {what} is not valid UTF-8")))
}

/// Walks the extension area `[start, end)` of cluster 0.
fn parse_extensions(b: &[u8], start: u64, end: u64, h: &Header) -> Result<Extensions> {
    let mut exts = Extensions::default();
    let mut seen: Vec<u32> = Vec::new();
    let end = end.min(b.len() as u64);
    let mut off = start;
    while off + 8 <= end {
        let at = off as usize;
        let kind = be32(b, at);
        let len = u64::from(be32(b, at + 4));
        off += 8;
        if kind == ext::END {
            break;
        }
        if len > end - off {
            return Err(bad(format!(
                "Header extension too large (type {kind:#010x}, {len} bytes at offset {off:#x})"
            )));
        }
        if seen.contains(&kind) {
            return Err(bad(format!("Duplicate header extension {kind:#010x}")));
        }
        seen.push(kind);
        let data = &b[off as usize..(off + len) as usize];
        match kind {
            ext::BACKING_FORMAT => {
                if data.len() > MAX_BACKING_FORMAT {
                    return Err(bad(format!(
                        "the backing format extension is too long ({len} bytes)"
                    )));
                }
                exts.backing_format = Some(ext_string(data, "backing format")?);
            }
            ext::FEATURE_NAMES => {
                if len % 48 != 0 {
                    return Err(bad(format!(
                        "malformed feature name table: {len} bytes is not a multiple of 48"
                    )));
                }
                for entry in data.chunks_exact(48) {
                    let name_bytes = &entry[2..48];
                    let name_len = name_bytes.iter().position(|&c| c == 0).unwrap_or(46);
                    exts.feature_names.push(FeatureName {
                        kind: match entry[0] {
                            0 => FeatureKind::Incompatible,
                            1 => FeatureKind::Compatible,
                            2 => FeatureKind::Autoclear,
                            other => FeatureKind::Other(other),
                        },
                        bit: entry[1],
                        name: String::from_utf8_lossy(&name_bytes[..name_len]).into_owned(),
                    });
                }
            }
            ext::BITMAPS => {
                // Version 2 images cannot have bitmaps, and without the autoclear bit a
                // program that did not know bitmaps wrote the image: QEMU ignores the
                // extension in both cases, so it is only preserved.
                if h.version >= 3 && h.autoclear_features & autoclear::BITMAPS != 0 {
                    exts.bitmaps = Some(parse_bitmaps_ext(data)?);
                } else {
                    exts.unknown.push((kind, data.to_vec()));
                }
            }
            ext::CRYPTO => {
                if len != 16 {
                    return Err(bad(format!(
                        "Invalid encryption header extension length {len} (expected 16)"
                    )));
                }
                exts.crypto = Some(CryptoExt {
                    offset: be64(data, 0),
                    length: be64(data, 8),
                });
            }
            ext::DATA_FILE => {
                exts.data_file = Some(ext_string(data, "external data file name")?);
            }
            other => exts.unknown.push((other, data.to_vec())),
        }
        off += (len + 7) & !7;
    }
    Ok(exts)
}

fn parse_bitmaps_ext(data: &[u8]) -> Result<BitmapsExt> {
    if data.len() != 24 {
        return Err(bad(format!(
            "bitmaps_ext: Invalid extension length {} (expected 24)",
            data.len()
        )));
    }
    let ext = BitmapsExt {
        nb_bitmaps: be32(data, 0),
        directory_size: be64(data, 8),
        directory_offset: be64(data, 16),
    };
    if be32(data, 4) != 0 {
        return Err(bad("bitmaps_ext: Reserved field is not zero"));
    }
    if ext.nb_bitmaps == 0 {
        return Err(bad("found bitmaps extension with zero bitmaps"));
    }
    if ext.nb_bitmaps > MAX_BITMAPS {
        return Err(bad(format!(
            "bitmaps_ext: File has too many bitmaps ({}, at most {MAX_BITMAPS})",
            ext.nb_bitmaps
        )));
    }
    if ext.directory_size > MAX_BITMAP_DIRECTORY {
        return Err(bad(format!(
            "bitmaps_ext: Bitmap directory too large ({} bytes)",
            ext.directory_size
        )));
    }
    Ok(ext)
}

/// The feature name table QEMU writes: every feature this driver knows, by name.
pub fn default_feature_names() -> Vec<FeatureName> {
    let entry = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    vec![
        entry(FeatureKind::Incompatible, 0, "dirty bit"),
        entry(FeatureKind::Incompatible, 1, "corrupt bit"),
        entry(FeatureKind::Incompatible, 2, "external data file"),
        entry(FeatureKind::Incompatible, 3, "compression type"),
        entry(FeatureKind::Incompatible, 4, "extended L2 entries"),
        entry(FeatureKind::Compatible, 0, "lazy refcounts"),
        entry(FeatureKind::Autoclear, 0, "bitmaps"),
        entry(FeatureKind::Autoclear, 1, "raw external data"),
    ]
}

fn push_ext(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(8), 0);
}

impl Header {
    /// Encodes the header, its extensions and the backing file name as the bytes of the
    /// start of cluster 0. `backing_file_offset`/`backing_file_size` are computed; unknown
    /// extensions and header fields are written back unchanged.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(4096);
        let put32 = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_be_bytes());
        let put64 = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_be_bytes());
        put32(&mut out, MAGIC);
        put32(&mut out, self.version);
        put64(&mut out, 0); // backing file offset, patched below
        put32(&mut out, 0); // backing file size, patched below
        put32(&mut out, self.cluster_bits);
        put64(&mut out, self.size);
        put32(
            &mut out,
            match self.crypt_method {
                CryptMethod::None => 0,
                CryptMethod::Aes => 1,
                CryptMethod::Luks => 2,
            },
        );
        put32(&mut out, self.l1_size);
        put64(&mut out, self.l1_table_offset);
        put64(&mut out, self.refcount_table_offset);
        put32(&mut out, self.refcount_table_clusters);
        put32(&mut out, self.nb_snapshots);
        put64(&mut out, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut out, self.incompatible_features);
            put64(&mut out, self.compatible_features);
            put64(&mut out, self.autoclear_features);
            put32(&mut out, self.refcount_order);
            let header_length = self.header_length.max(V3_HEADER_LEN);
            put32(&mut out, header_length);
            out.push(match self.compression_type {
                CompressionType::Deflate => 0,
                CompressionType::Zstd => 1,
            });
            out.extend_from_slice(&self.extra_fields);
            out.resize(header_length as usize, 0);
        }
        let e = &self.extensions;
        // qemu's order: backing format, data file, encryption, feature names, bitmaps.
        if let Some(f) = &e.backing_format {
            push_ext(&mut out, ext::BACKING_FORMAT, f.as_bytes());
        }
        if let Some(d) = &e.data_file {
            push_ext(&mut out, ext::DATA_FILE, d.as_bytes());
        }
        if let Some(c) = e.crypto {
            let mut d = c.offset.to_be_bytes().to_vec();
            d.extend_from_slice(&c.length.to_be_bytes());
            push_ext(&mut out, ext::CRYPTO, &d);
        }
        if !e.feature_names.is_empty() {
            let mut d = Vec::with_capacity(e.feature_names.len() * 48);
            for f in &e.feature_names {
                let mut entry = [0u8; 48];
                entry[0] = match f.kind {
                    FeatureKind::Incompatible => 0,
                    FeatureKind::Compatible => 1,
                    FeatureKind::Autoclear => 2,
                    FeatureKind::Other(x) => x,
                };
                entry[1] = f.bit;
                let name = f.name.as_bytes();
                let n = name.len().min(46);
                entry[2..2 + n].copy_from_slice(&name[..n]);
                d.extend_from_slice(&entry);
            }
            push_ext(&mut out, ext::FEATURE_NAMES, &d);
        }
        if let Some(b) = e.bitmaps {
            let mut d = b.nb_bitmaps.to_be_bytes().to_vec();
            d.extend_from_slice(&[0; 4]);
            d.extend_from_slice(&b.directory_size.to_be_bytes());
            d.extend_from_slice(&b.directory_offset.to_be_bytes());
            push_ext(&mut out, ext::BITMAPS, &d);
        }
        for (kind, data) in &e.unknown {
            push_ext(&mut out, *kind, data);
        }
        out.extend_from_slice(&[0u8; 8]); // end of extensions
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(Error::invalid(
                    "create",
                    format!("Backing file name too long ({} bytes)", name.len()),
                ));
            }
            let at = out.len() as u64;
            out[8..16].copy_from_slice(&at.to_be_bytes());
            out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() as u64 > self.cluster_size() {
            return Err(Error::invalid(
                "create",
                "the header, its extensions and the backing file name do not fit in one cluster",
            ));
        }
        Ok(out)
    }
}
