//! Finding, vetting and opening the parent of a differencing VHDX.
//!
//! The parent is opened only through the caller's [`vdisk_block::format::ImageOpener`] and only where
//! the caller's [`vdisk_block::FollowPolicy`] allows. Before opening it, its current header
//! is read to check the parent linkage: a child made against another version of its parent
//! would read garbage. Chains are bounded and loops refused by carrying the chain so far in
//! a driver option that the registry passes back to us when it opens the parent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vdisk_block::{
    BlockDev, CacheMode, EngineChoice, Error, ErrorKind, HostFile, OpenOptions, Result,
};

use crate::guid::Guid;
use crate::vhdx::header::{choose_current, HEADER_OFFSETS, HEADER_SIZE};
use crate::vhdx::locator::ParentLocator;

/// The driver option carrying the canonical paths of the children above an image.
pub const CHAIN_OPTION: &str = "x-vhdx-chain";
/// The deepest chain followed.
pub const MAX_DEPTH: usize = 64;

/// Where the parent is, as far as the host file system says.
pub fn locate(image: &Path, locator: &ParentLocator) -> Result<PathBuf> {
    let candidates = locator.candidates(image);
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let stored = locator
        .paths()
        .iter()
        .map(|(k, v)| format!("{k} '{v}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let tried = candidates
        .iter()
        .map(|p| format!("'{}'", p.display()))
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::new(
        ErrorKind::NotFound,
        "open",
        format!("could not find the parent image ({stored}); looked for {tried}"),
    )
    .with_path(image))
}

/// The DataWriteGuid of the VHDX at `path` (what children store as their parent linkage).
pub fn data_write_guid(path: &Path) -> Result<Guid> {
    let file = HostFile::open(path, false, CacheMode::Writeback, EngineChoice::Sync)?;
    let mut raw = [vec![0u8; HEADER_SIZE], vec![0u8; HEADER_SIZE]];
    for (buf, off) in raw.iter_mut().zip(HEADER_OFFSETS) {
        file.read_at(buf, off)?;
    }
    choose_current([&raw[0], &raw[1]])
        .map(|(_, h)| h.data_write_guid)
        .map_err(|why| Error::corrupt("open parent", why).with_path(path))
}

/// Opens the parent of `image` as `options` allow; `Ok(None)` when the caller asked for no
/// backing files.
pub fn open(
    image: &Path,
    locator: &ParentLocator,
    options: &OpenOptions,
) -> Result<Option<Arc<dyn BlockDev>>> {
    if options.no_backing {
        return Ok(None);
    }
    let found = locate(image, locator)?;
    options.policy.allows(image, &found)?;
    let canonical = |p: &Path| {
        p.canonicalize()
            .map_err(|e| Error::io("open", e).with_path(p))
    };
    let me = canonical(image)?;
    let target = canonical(&found)?;
    let mut chain: Vec<String> = options
        .driver_options
        .get(CHAIN_OPTION)
        .map(|c| c.split('\n').map(str::to_string).collect())
        .unwrap_or_default();
    chain.push(me.display().to_string());
    if chain.iter().any(|c| Path::new(c) == target) {
        return Err(Error::corrupt(
            "open",
            format!(
                "parent '{}' is already part of the chain: the chain loops",
                found.display()
            ),
        )
        .with_path(image));
    }
    if chain.len() >= MAX_DEPTH {
        return Err(Error::unsupported(
            "open",
            format!("the differencing chain is deeper than {MAX_DEPTH} images"),
        )
        .with_path(image));
    }
    let actual = data_write_guid(&found)?;
    if Some(actual) != locator.linkage() && Some(actual) != locator.linkage2() {
        return Err(Error::corrupt(
            "open",
            format!(
                "parent '{}' has DataWriteGuid {{{actual}}}, but the image was made against {{{}}}: the parent changed since the child was created",
                found.display(),
                locator.linkage().unwrap_or_default()
            ),
        )
        .with_path(image));
    }
    let opener = options.opener.as_ref().ok_or_else(|| {
        Error::unsupported(
            "open",
            format!(
                "the image has a parent ('{}') but the caller gave no way to open it",
                found.display()
            ),
        )
        .with_path(image)
    })?;
    let mut parent_options = options.clone();
    parent_options.writable = false;
    parent_options
        .driver_options
        .insert(CHAIN_OPTION.into(), chain.join("\n"));
    opener
        .open_image(&found, Some("vhdx"), &parent_options)
        .map(Some)
}
