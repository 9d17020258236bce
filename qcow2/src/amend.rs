//! `amend`: changing header-level options of an existing image in place.
//!
//! Supported: the backing file name and format (what `rebase -u` needs), lazy refcounts,
//! and upgrading `compat=0.10` to `1.1`. Options that would need the image's clusters
//! rewritten (cluster size, refcount width, extended L2, compression type, data file,
//! downgrading to 0.10) are refused unless they already have the asked value. The header
//! is rewritten whole, keeping unknown extensions and fields, and re-parsed before it is
//! written so nothing invalid reaches the disk.

use std::path::Path;

use vdisk_block::{CacheMode, CreateOptions, EngineChoice, Error, HostFile, Result};

use crate::header::{compat, default_feature_names, incompat, Header, V3_HEADER_LEN};

fn unsupported(what: &str) -> Error {
    Error::unsupported("amend", format!("Changing {what} is not supported"))
}

/// Applies `options` to the header of the image at `path`.
pub fn amend(path: &Path, mut options: CreateOptions) -> Result<()> {
    let file = HostFile::open(path, true, CacheMode::Writeback, EngineChoice::Sync)?;
    let old = crate::image::read_header(&file, file.len()?).map_err(|e| e.with_path(path))?;
    if old.incompatible_features & (incompat::DIRTY | incompat::CORRUPT) != 0 {
        return Err(Error::corrupt(
            "amend",
            "the image is dirty or corrupt; check and repair it first",
        )
        .with_path(path));
    }
    let mut h = old.clone();
    let compat_level = options.take("compat");
    match compat_level.as_deref() {
        None | Some("1.1") | Some("v3") | Some("0.10") | Some("v2") => {}
        Some(other) => {
            return Err(Error::invalid(
                "amend",
                format!("Invalid compatibility level: '{other}'"),
            ))
        }
    }
    let upgrade = matches!(compat_level.as_deref(), Some("1.1") | Some("v3"));
    let downgrade = matches!(compat_level.as_deref(), Some("0.10") | Some("v2"));
    if upgrade && h.version == 2 {
        h.version = 3;
        h.header_length = V3_HEADER_LEN;
        h.refcount_order = 4;
        h.extensions.feature_names = default_feature_names();
    }
    if downgrade && h.version != 2 {
        return Err(unsupported("the compatibility level to 0.10 (downgrade)"));
    }
    if let Some(lazy) = options.take_bool("lazy_refcounts")? {
        if lazy && h.version < 3 {
            return Err(Error::invalid(
                "amend",
                "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if lazy {
            h.compatible_features |= compat::LAZY_REFCOUNTS;
        } else {
            h.compatible_features &= !compat::LAZY_REFCOUNTS;
        }
    }
    let backing_file = options.take("backing_file");
    let backing_fmt = options.take("backing_fmt");
    if let Some(name) = backing_file {
        if h.data_file_raw() && !name.is_empty() {
            return Err(Error::invalid(
                "amend",
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        h.backing_file = (!name.is_empty()).then_some(name);
        if h.backing_file.is_none() {
            h.extensions.backing_format = None;
        }
    }
    if let Some(fmt) = backing_fmt {
        if h.backing_file.is_none() {
            return Err(Error::invalid(
                "amend",
                "Backing format specified without backing file",
            ));
        }
        h.extensions.backing_format = (!fmt.is_empty()).then_some(fmt);
    }
    // Options that cannot change without rewriting clusters: accept only their value now.
    if let Some(size) = options.take_size("cluster_size")? {
        if size != h.cluster_size() {
            return Err(unsupported("the cluster size"));
        }
    }
    if let Some(bits) = options.take("refcount_bits") {
        if bits.parse::<u32>().ok() != Some(h.refcount_bits()) {
            return Err(unsupported("the refcount width"));
        }
    }
    if let Some(on) = options.take_bool("extended_l2")? {
        if on != h.extended_l2() {
            return Err(unsupported("extended_l2"));
        }
    }
    if let Some(kind) = options.take("compression_type") {
        if kind != h.compression_type.as_str() {
            return Err(unsupported("the compression type"));
        }
    }
    if let Some(name) = options.take("data_file") {
        if h.extensions.data_file.as_deref() != Some(name.as_str()) {
            return Err(unsupported("the external data file"));
        }
    }
    if let Some(raw) = options.take_bool("data_file_raw")? {
        if raw != h.data_file_raw() {
            return Err(unsupported("data_file_raw"));
        }
    }
    options.reject_leftovers("qcow2")?;
    if h == old {
        return Ok(());
    }
    let mut bytes = h.encode().map_err(|e| e.with_path(path))?;
    let old_len = old.encode().map(|b| b.len()).unwrap_or(0);
    let mut check = bytes.clone();
    check.resize(h.cluster_size() as usize, 0);
    Header::parse(&check).map_err(|e| e.with_path(path))?;
    // Clear what is left of a longer old header area.
    if old_len > bytes.len() {
        bytes.resize(old_len, 0);
    }
    file.write_at(&bytes, 0)?;
    file.flush()
}
