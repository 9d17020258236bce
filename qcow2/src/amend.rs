//! `amend`: changing the options of an existing image in place, as `qemu-img amend -o`
//! does (QEMU 10): `compat` (upgrade, and downgrade to 0.10 with zero clusters expanded),
//! `refcount_bits` (the refcount structures rebuilt at the new width), `lazy_refcounts`,
//! `data_file` (renaming an external data file), `data_file_raw` (may only be cleared),
//! and `size` (a resize). The backing file is not an amend option in QEMU 10 (only its
//! current value is accepted); [`set_backing`] is the header rewrite `rebase -u` needs.
//!
//! Every request is validated before anything is written, with QEMU's messages, so a
//! refused amend leaves the image as it was (QEMU may have applied earlier options by
//! then). Header-only changes are one header write; changes that need metadata rewritten
//! go through `amend/rewrite.rs`, which writes every new structure before the header points at it.
//! Two exceptions to "nothing written": a dirty image is repaired first, as QEMU repairs
//! it when it opens it, even when the amend is then refused for what the clusters hold (a
//! refcount too wide for the new width, zstd-compressed clusters in a downgrade).
//! Encrypted images need their key (`encrypt.key-secret` among the driver options), as
//! QEMU opens them; LUKS key slots then change through `encrypt.state`, `encrypt.new-secret`,
//! `encrypt.old-secret`, `encrypt.keyslot` and `encrypt.iter-time` (vdisk-luks's
//! `amend_slots` on the header region), before any other change, in QEMU's order.

mod refblocks;
mod rewrite;
mod state;
mod zero;

use std::collections::BTreeMap;
use std::path::Path;

use vdisk_block::{
    BlockDev, CacheMode, CreateOptions, EngineChoice, Error, FollowPolicy, HostFile, OpenOptions,
    Preallocation, RepairMode, Result,
};

use crate::header::{
    autoclear, compat, default_feature_names, incompat, CompressionType, CryptMethod, Header,
    V2_HEADER_LEN, V3_HEADER_LEN,
};

/// The options `qemu-img amend` takes for qcow2.
const AMEND_OPTIONS: &[&str] = &[
    "backing_file",
    "backing_fmt",
    "compat",
    "data_file",
    "data_file_raw",
    "encrypt.iter-time",
    "encrypt.keyslot",
    "encrypt.new-secret",
    "encrypt.old-secret",
    "encrypt.state",
    "lazy_refcounts",
    "refcount_bits",
    "size",
];

/// qcow2 options that only `create` takes.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "compression_type",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.format",
    "encrypt.hash-alg",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.key-secret",
    "encryption",
    "extended_l2",
    "preallocation",
];

fn invalid(message: impl Into<String>) -> Error {
    Error::invalid("amend", message)
}

fn unsupported(message: impl Into<String>) -> Error {
    Error::unsupported("amend", message)
}

/// What an amend asks for, parsed and checked the way QEMU parses `-o`.
#[derive(Debug, Default)]
struct Request {
    version: Option<u32>,
    refcount_bits: Option<u64>,
    lazy_refcounts: Option<bool>,
    data_file: Option<String>,
    data_file_raw: Option<bool>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    /// The `encrypt.*` options, typed only once the image is unlocked (as QEMU does).
    encrypt: Option<CreateOptions>,
    size: Option<u64>,
}

fn parse(options: &mut CreateOptions) -> Result<Request> {
    // QEMU names the first option (in the order given; here in name order) that amend does
    // not take, with a hint when every option is at least a create option.
    if let Some(bad) = options
        .options
        .keys()
        .find(|k| !AMEND_OPTIONS.contains(&k.as_str()))
    {
        let all_known = options
            .options
            .keys()
            .all(|k| AMEND_OPTIONS.contains(&k.as_str()) || CREATE_ONLY.contains(&k.as_str()));
        let hint = if all_known {
            "\nThis option is only supported for image creation"
        } else {
            ""
        };
        return Err(invalid(format!("Invalid parameter '{bad}'{hint}")));
    }
    let mut r = Request::default();
    if let Some(v) = options.take("refcount_bits") {
        r.refcount_bits = Some(
            v.parse::<u64>()
                .map_err(|_| invalid("Parameter 'refcount_bits' expects a number"))?,
        );
    }
    r.lazy_refcounts = options.take_bool("lazy_refcounts")?;
    r.data_file_raw = options.take_bool("data_file_raw")?;
    if let Some(v) = options.take("size") {
        r.size = Some(
            vdisk_block::size::qemu_strtosz(&v)
                .map_err(|e| invalid(vdisk_block::size::size_refusal("size", &v, e)))?,
        );
    }
    if let Some(level) = options.take("compat") {
        r.version = Some(match level.as_str() {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            _ => return Err(invalid(format!("Unknown compatibility level {level}"))),
        });
    }
    r.backing_file = options.take("backing_file");
    r.backing_fmt = options.take("backing_fmt");
    r.data_file = options.take("data_file");
    let keys: Vec<String> = options.options.keys().cloned().collect();
    for k in keys {
        if k.starts_with("encrypt.") {
            if let Some(v) = options.take(&k) {
                r.encrypt
                    .get_or_insert_with(|| CreateOptions {
                        size: 0,
                        options: Default::default(),
                    })
                    .options
                    .insert(k, v);
            }
        }
    }
    options.reject_leftovers("qcow2")?;
    Ok(r)
}

/// Applies `options` to the image at `path` (an unencrypted one: no key is given).
pub fn amend(path: &Path, options: CreateOptions) -> Result<()> {
    amend_with(path, &BTreeMap::new(), false, options)
}

/// Applies `options` to the image at `path`, opened with `driver_options` (an encrypted
/// image's `encrypt.key-secret`); `force` is qemu-img's `--force` for key slots.
pub fn amend_with(
    path: &Path,
    driver_options: &BTreeMap<String, String>,
    force: bool,
    mut options: CreateOptions,
) -> Result<()> {
    let mut req = parse(&mut options).map_err(|e| e.with_path(path))?;
    let file = open_rw(path)?;
    let old = read_header(&file, path)?;
    if old.incompatible_features & incompat::CORRUPT != 0 {
        return Err(Error::corrupt(
            "amend",
            format!(
                "Could not open '{}': qcow2: Image is corrupt; cannot be opened read/write",
                path.display()
            ),
        )
        .with_path(path));
    }
    let key = match old.crypt_method {
        CryptMethod::None => None,
        _ => Some(unlock(path, &file, &old, driver_options)?),
    };
    let target = plan(&old, &req).map_err(|e| e.with_path(path))?;
    if old.incompatible_features & incompat::DIRTY != 0 {
        // As QEMU does when it opens a dirty image read-write: repair the refcounts.
        drop(file);
        let opts = OpenOptions {
            writable: true,
            no_backing: true,
            policy: FollowPolicy::Nothing,
            driver_options: driver_options.clone(),
            ..OpenOptions::default()
        };
        crate::check::check(path, &opts, RepairMode::All)?;
        let file = open_rw(path)?;
        let old = read_header(&file, path)?;
        let target = plan(&old, &req).map_err(|e| e.with_path(path))?;
        return apply(path, &file, &old, target, &mut req, key.as_ref(), force);
    }
    apply(path, &file, &old, target, &mut req, key.as_ref(), force)
}

/// The master key of an encrypted image and what its data is encrypted with.
struct Unlocked {
    /// The LUKS header and its region (LUKS images only).
    luks: Option<(vdisk_luks::Header, crate::header::CryptoExt)>,
    master_key: zeroize::Zeroizing<Vec<u8>>,
    cipher: vdisk_luks::SectorCipher,
}

/// Unlocks an encrypted image with the key `driver_options` name, in QEMU's words when it
/// cannot (the image is then left as it was).
fn unlock(
    path: &Path,
    file: &HostFile,
    header: &Header,
    driver_options: &BTreeMap<String, String>,
) -> Result<Unlocked> {
    let could_not_open = |e: Error| {
        Error::new(
            e.kind(),
            "amend",
            format!("Could not open '{}': {}", path.display(), e.message()),
        )
        .with_path(path)
    };
    let Some(id) = driver_options.get(crate::crypto::KEY_SECRET) else {
        return Err(could_not_open(invalid(crate::crypto::KEY_REQUIRED)));
    };
    let passphrase = vdisk_luks::secret::lookup(id).map_err(could_not_open)?;
    if header.crypt_method == CryptMethod::Aes {
        let mut key = zeroize::Zeroizing::new(vec![0u8; 16]);
        let n = passphrase.len().min(16);
        key[..n].copy_from_slice(&passphrase[..n]);
        let cipher = vdisk_luks::SectorCipher::new(&crate::crypto::legacy_aes_spec(), &key)?;
        return Ok(Unlocked {
            luks: None,
            master_key: key,
            cipher,
        });
    }
    let ext = header.extensions.crypto.ok_or_else(|| {
        could_not_open(Error::corrupt(
            "amend",
            "Missing CRYPTO header for crypt method 2 (LUKS)",
        ))
    })?;
    let luks =
        crate::crypto::read_luks_header(file, file.len()?, header, ext).map_err(could_not_open)?;
    let master_key =
        crate::crypto::unlock_region(file, &luks, ext, &passphrase).map_err(could_not_open)?;
    let cipher = vdisk_luks::SectorCipher::new(&luks.cipher, &master_key)?;
    Ok(Unlocked {
        luks: Some((luks, ext)),
        master_key,
        cipher,
    })
}

fn apply(
    path: &Path,
    file: &HostFile,
    old: &Header,
    target: Header,
    req: &mut Request,
    key: Option<&Unlocked>,
    force: bool,
) -> Result<()> {
    // QEMU changes the key slots before anything else.
    if let Some(mut opts) = req.encrypt.take() {
        let Some((header, ext)) = key.and_then(|k| k.luks.clone()) else {
            return Err(unsupported("Only LUKS encryption options can be amended").with_path(path));
        };
        let mut header = header;
        let request = vdisk_luks::amend::AmendOptions::take(&mut opts, "encrypt.")
            .map_err(|e| e.with_path(path))?;
        opts.reject_leftovers("qcow2")?;
        let master_key = key.map(|k| &k.master_key[..]).unwrap_or_default();
        vdisk_luks::amend::amend_slots(
            &mut vdisk_luks::keys::FileRegion::new(file, ext.offset),
            &mut header,
            master_key,
            &request,
            force,
        )
        .map_err(|e| e.with_path(path))?;
    }
    let downgrade = target.version < old.version;
    if downgrade || target.refcount_order != old.refcount_order {
        let state = state::State::load(file, old).map_err(|e| e.with_path(path))?;
        let zero_fill = match key {
            None => rewrite::ZeroFill::Plain,
            Some(Unlocked {
                luks: Some(_),
                cipher,
                ..
            }) => rewrite::ZeroFill::Luks(cipher),
            Some(_) => rewrite::ZeroFill::Refuse,
        };
        rewrite::run(
            file,
            &state,
            rewrite::Rewrite {
                target,
                downgrade,
                zero_fill,
            },
        )
        .map_err(|e| e.with_path(path))?;
    } else if target != *old {
        encode_header(&target, old)
            .map_err(|e| e.with_path(path))?
            .write(file)?;
    }
    // As in QEMU, size=0 asks for nothing.
    if let Some(size) = req.size.filter(|&s| s != 0) {
        resize(path, size)?;
    }
    Ok(())
}

fn open_rw(path: &Path) -> Result<HostFile> {
    HostFile::open(path, true, CacheMode::Writeback, EngineChoice::Sync)
}

fn read_header(file: &HostFile, path: &Path) -> Result<Header> {
    crate::image::read_header(file, file.len()?).map_err(|e| e.with_path(path))
}

/// The header `req` leads to from `old`, or QEMU's refusal.
fn plan(old: &Header, req: &Request) -> Result<Header> {
    let mut h = old.clone();
    if req.encrypt.is_some() && old.crypt_method == CryptMethod::None {
        return Err(invalid(
            "Can't amend encryption options - encryption not present",
        ));
    }
    if req.encrypt.is_some() && old.crypt_method != CryptMethod::Luks {
        return Err(unsupported("Only LUKS encryption options can be amended"));
    }
    let bits = req.refcount_bits.unwrap_or(u64::from(old.refcount_bits()));
    if bits == 0 || bits > 64 || !bits.is_power_of_two() {
        return Err(invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if req.data_file.is_some() && !old.has_data_file() {
        return Err(invalid(
            "data-file can only be set for images that use an external data file",
        ));
    }
    if req.data_file_raw == Some(true) && !old.data_file_raw() {
        return Err(invalid("data-file-raw cannot be set on existing images"));
    }
    let version = req.version.unwrap_or(old.version);
    if version > old.version {
        h.version = 3;
        h.header_length = V3_HEADER_LEN;
        h.refcount_order = 4;
        h.extensions.feature_names = default_feature_names();
    }
    let order = bits.trailing_zeros();
    if order != h.refcount_order {
        if version < 3 && bits != 16 {
            return Err(invalid(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            ));
        }
        h.refcount_order = order;
    }
    if req.data_file_raw == Some(false) {
        h.autoclear_features &= !autoclear::DATA_FILE_RAW;
    }
    if let Some(name) = &req.data_file {
        h.extensions.data_file = (!name.is_empty()).then(|| name.clone());
    }
    if (req.backing_file.is_some() || req.backing_fmt.is_some())
        && (req.backing_file != old.backing_file
            || req.backing_fmt != old.extensions.backing_format)
    {
        return Err(invalid(
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
        ));
    }
    if let Some(lazy) = req.lazy_refcounts {
        if lazy != (old.compatible_features & compat::LAZY_REFCOUNTS != 0) {
            if lazy && version < 3 {
                return Err(invalid(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            if lazy {
                h.compatible_features |= compat::LAZY_REFCOUNTS;
            } else {
                h.compatible_features &= !compat::LAZY_REFCOUNTS;
            }
        }
    }
    if let Some(size) = req.size {
        if size % 512 != 0 {
            return Err(invalid("The new size must be a multiple of 512"));
        }
    }
    if version < old.version {
        if h.refcount_order != 4 {
            return Err(unsupported("compat=0.10 requires refcount_bits=16"));
        }
        if old.has_data_file() {
            return Err(unsupported("Cannot downgrade an image with a data file"));
        }
        let left = old.incompatible_features
            & !(incompat::DIRTY | incompat::COMPRESSION | incompat::DATA_FILE);
        if left != 0 {
            return Err(unsupported(format!(
                "Cannot downgrade an image with incompatible features {left:#x} set"
            )));
        }
        // (A zstd image with compressed clusters is refused once the clusters are known.)
        h.version = 2;
        h.header_length = V2_HEADER_LEN;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.compression_type = CompressionType::Deflate;
        h.extra_fields.clear();
        h.extensions.feature_names.clear();
        h.extensions.bitmaps = None;
    }
    Ok(h)
}

/// A new header, encoded and checked, ready to replace the old one.
pub(crate) struct HeaderWrite {
    bytes: Vec<u8>,
    /// Length of the old header's bytes (extensions and backing name included).
    old_len: usize,
}

impl HeaderWrite {
    /// Writes the header, then zeroes what is left of a longer old one.
    ///
    /// The switch is the first write alone: parsers stop at the end of the extensions and
    /// find the backing name by its offset, so old bytes past the new header are inert.
    /// Zeroing them in a second write, after a flush, keeps a torn write from mixing the
    /// old header's start with a zeroed tail; when the new header fits in one 512-byte
    /// sector (a v2 header without a long backing name, or any header whose later
    /// sectors do not change) the switch cannot be torn.
    pub(crate) fn write(&self, file: &HostFile) -> Result<()> {
        file.write_at(&self.bytes, 0)?;
        file.flush()?;
        if self.old_len > self.bytes.len() {
            file.write_at(
                &vec![0u8; self.old_len - self.bytes.len()],
                self.bytes.len() as u64,
            )?;
            file.flush()?;
        }
        Ok(())
    }
}

/// Encodes `h` as the bytes of the start of cluster 0, checked by parsing them back.
///
/// As QEMU does, the feature name table (optional) is left out when it does not fit in the
/// cluster with the rest, as with 512-byte clusters and a backing file name.
pub(crate) fn encode_header(h: &Header, old: &Header) -> Result<HeaderWrite> {
    let bytes = match h.encode() {
        Err(_) if !h.extensions.feature_names.is_empty() => {
            let mut bare = h.clone();
            bare.extensions.feature_names.clear();
            bare.encode()?
        }
        other => other?,
    };
    let mut check = bytes.clone();
    check.resize(h.cluster_size() as usize, 0);
    Header::parse(&check)?;
    let old_len = old.encode().map(|b| b.len()).unwrap_or(0);
    Ok(HeaderWrite { bytes, old_len })
}

fn resize(path: &Path, size: u64) -> Result<()> {
    let opts = OpenOptions {
        writable: true,
        no_backing: true,
        policy: FollowPolicy::Nothing,
        ..OpenOptions::default()
    };
    let img = crate::image::Qcow2Image::open(path, &opts)?;
    img.resize(size, Preallocation::Off)?;
    img.flush()
}

/// Rewrites the backing file name and format of the image at `path` in its header (what
/// `rebase -u` does; `qemu-img amend` refuses to change them). `Some("")` removes the
/// backing file; `None` keeps the current value.
pub fn set_backing(path: &Path, name: Option<&str>, format: Option<&str>) -> Result<()> {
    let file = open_rw(path)?;
    let old = read_header(&file, path)?;
    let mut h = old.clone();
    if let Some(name) = name {
        if h.data_file_raw() && !name.is_empty() {
            return Err(
                invalid("Backing file and data-file-raw cannot be used at the same time")
                    .with_path(path),
            );
        }
        h.backing_file = (!name.is_empty()).then(|| name.to_string());
        if h.backing_file.is_none() {
            h.extensions.backing_format = None;
        }
    }
    if let Some(fmt) = format {
        if h.backing_file.is_none() && !fmt.is_empty() {
            return Err(invalid("Backing format specified without backing file").with_path(path));
        }
        h.extensions.backing_format = (!fmt.is_empty()).then(|| fmt.to_string());
    }
    if h == old {
        return Ok(());
    }
    encode_header(&h, &old)
        .map_err(|e| e.with_path(path))?
        .write(&file)
}
