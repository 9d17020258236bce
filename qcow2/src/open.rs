//! Opening the other files a qcow2 image names: its backing file and its external data file.
//!
//! Both are references written into the image, so they are followed only through the
//! caller's [`FollowPolicy`](vdisk_block::FollowPolicy): relative names are resolved against
//! the image's own folder (never the process's working directory), protocol and `json:`
//! names are refused, the backing format comes from the image (never from probing a file a
//! guest may have written), and a chain that comes back to an image already being opened is
//! refused instead of recursing forever.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vdisk_block::format::{backing_failure, split_backing_failure};
use vdisk_block::{
    BlockDev, CacheMode, EngineChoice, Error, ErrorKind, HostFile, OpenOptions, Result,
};

/// The deepest backing chain this driver opens; deeper chains are almost certainly hostile
/// and would otherwise exhaust the stack.
pub const MAX_CHAIN_DEPTH: usize = 256;

thread_local! {
    /// Canonical paths of the qcow2 images this thread is opening, outermost first. Backing
    /// files are opened synchronously through the opener, so a loop shows up here.
    static OPENING: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
}

/// Marks an image as being opened for as long as it lives.
#[derive(Debug)]
pub struct ChainGuard(());

impl ChainGuard {
    /// Registers `path`, failing when it is already being opened further up the chain.
    pub fn enter(path: &Path) -> Result<ChainGuard> {
        let canonical = path
            .canonicalize()
            .map_err(|e| Error::io("open", e).with_path(path))?;
        OPENING.with(|stack| {
            let mut stack = stack.borrow_mut();
            if stack.contains(&canonical) {
                return Err(Error::invalid(
                    "open",
                    format!(
                        "the backing chain loops: '{}' is its own (indirect) backing file",
                        canonical.display()
                    ),
                )
                .with_path(path));
            }
            if stack.len() >= MAX_CHAIN_DEPTH {
                return Err(Error::unsupported(
                    "open",
                    format!("the backing chain is deeper than {MAX_CHAIN_DEPTH} images"),
                )
                .with_path(path));
            }
            stack.push(canonical);
            Ok(ChainGuard(()))
        })
    }
}

impl Drop for ChainGuard {
    fn drop(&mut self) {
        OPENING.with(|stack| {
            stack.borrow_mut().pop();
        });
    }
}

/// True when `name` is a protocol or `json:` name rather than a file name (QEMU's rule: a
/// colon before any slash).
fn has_protocol(name: &str) -> bool {
    match name.find(':') {
        Some(colon) => !name[..colon].contains('/'),
        None => false,
    }
}

/// Resolves a file name stored in the image at `image` against the image's folder.
pub fn resolve(image: &Path, name: &str, what: &str) -> Result<PathBuf> {
    if has_protocol(name) {
        return Err(Error::unsupported(
            "open",
            format!("the {what} '{name}' is a protocol or json: name, which vdisk does not follow"),
        )
        .with_path(image));
    }
    let named = Path::new(name);
    if named.is_absolute() {
        return Ok(named.to_path_buf());
    }
    let base = image.parent().unwrap_or_else(|| Path::new(""));
    Ok(base.join(named))
}

/// Refuses a file an image names that is not a regular file or a block device: opening a
/// FIFO blocks until some other process writes to it (qemu hangs there), and a socket or
/// character device is never an image. Targets that do not exist are left to the open.
fn refuse_special(image: &Path, target: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::metadata(target) else {
        return Ok(());
    };
    let kind = meta.file_type();
    if kind.is_file() || kind.is_block_device() || kind.is_dir() {
        return Ok(());
    }
    Err(Error::unsupported(
        "open",
        format!(
            "the {what} '{}' is a FIFO, socket or character device, which vdisk does not open",
            target.display()
        ),
    )
    .with_path(image))
}

/// Opens the backing file `name` of the image at `image`, as `format` when recorded.
pub fn open_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
    options: &OpenOptions,
) -> Result<Arc<dyn BlockDev>> {
    let target = resolve(image, name, "backing file")?;
    options.policy.allows(image, &target)?;
    refuse_special(image, &target, "backing file")?;
    let opener = options.opener.as_ref().ok_or_else(|| {
        Error::unsupported(
            "open",
            format!(
                "the image has the backing file '{name}' but no way to open backing files was given"
            ),
        )
        .with_path(image)
    })?;
    // Backing files are only ever read; driver options belong to the top image, except
    // those given as `backing.NAME` (qemu's spelling, e.g. the key of an encrypted
    // backing file: `backing.encrypt.key-secret`).
    let backing_options = OpenOptions {
        writable: false,
        driver_options: options
            .driver_options
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("backing.")?.to_string(), v.clone())))
            .collect(),
        ..options.clone()
    };
    opener
        .open_image(&target, format, &backing_options)
        .map_err(|e| {
            // Only the innermost failure names its file, with how many images lie between
            // it and this one: a deep chain (up to MAX_CHAIN_DEPTH) would otherwise repeat
            // the prefix once per image, as qemu does (the CLI rebuilds qemu's wording).
            let message = match split_backing_failure(e.message()) {
                Some((name, depth, why)) => backing_failure(name, depth + 1, why),
                None => backing_failure(&target.display().to_string(), 1, e.message()),
            };
            Error::new(e.kind(), "open", message)
                .with_path(image)
                .with_source(e)
        })
}

/// A deferred data file once its open was tried: the file, or the error's kind and message.
pub type Opened = std::result::Result<Arc<HostFile>, (ErrorKind, String)>;

/// The external data file of an image: opened, or refused by the policy (reads then fail
/// with the reason, while `info` still works without touching the file).
#[derive(Debug, Clone)]
pub enum DataFile {
    /// Guest data lives in the image file itself.
    Internal,
    /// Guest data lives in this file.
    External(Arc<HostFile>),
    /// Guest data lives in this file, opened only when guest data is first read: a
    /// read-only open without backing files (what `info` does) does not open the files an
    /// untrusted image names, as qemu-img info does not since CVE-2024-4467.
    Deferred {
        /// The resolved path, which the policy allows.
        path: PathBuf,
        /// Cache mode for the open.
        cache: CacheMode,
        /// I/O engine for the open.
        engine: EngineChoice,
        /// The file once opened, or why it could not be (kind and message).
        opened: Arc<std::sync::OnceLock<Opened>>,
    },
    /// The image has a data file that was not opened; the error explains why.
    NotOpened {
        /// The resolved path.
        path: PathBuf,
        /// Why it was not opened.
        reason: String,
        /// The class of the refusal.
        kind: ErrorKind,
    },
}

/// Opens the external data file `name` of the image at `image`.
///
/// A name vdisk will not follow (a protocol or `json:` name, a path the policy forbids, a
/// FIFO or device) leaves the data file unopened rather than failing the open, so `info`
/// still shows what the image names; reads then fail with the reason.
pub fn open_data_file(image: &Path, name: &str, options: &OpenOptions) -> Result<DataFile> {
    let refused = |path: PathBuf, e: Error| DataFile::NotOpened {
        path,
        reason: e.message().to_string(),
        kind: e.kind(),
    };
    let target = match resolve(image, name, "external data file") {
        Ok(t) => t,
        Err(e) => return Ok(refused(PathBuf::from(name), e)),
    };
    if let Err(e) = options
        .policy
        .allows(image, &target)
        .and_then(|()| refuse_special(image, &target, "external data file"))
    {
        return Ok(refused(target, e));
    }
    if !options.writable && options.no_backing {
        return Ok(DataFile::Deferred {
            path: target,
            cache: options.cache,
            engine: options.engine,
            opened: Arc::default(),
        });
    }
    let file = HostFile::open(&target, options.writable, options.cache, options.engine)?;
    Ok(DataFile::External(Arc::new(file)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_against_the_image_folder() {
        let img = Path::new("/srv/images/top.qcow2");
        assert_eq!(
            resolve(img, "base.qcow2", "backing file").ok(),
            Some(PathBuf::from("/srv/images/base.qcow2"))
        );
        assert_eq!(
            resolve(img, "/abs/base.qcow2", "backing file").ok(),
            Some(PathBuf::from("/abs/base.qcow2"))
        );
        assert_eq!(
            resolve(Path::new("top.qcow2"), "b.raw", "backing file").ok(),
            Some(PathBuf::from("b.raw"))
        );
        for hostile in ["json:{\"file\":{}}", "nbd://host/x", "file:/etc/passwd"] {
            let err = resolve(img, hostile, "backing file").expect_err("protocol names");
            assert_eq!(err.kind(), ErrorKind::Unsupported);
        }
        assert!(resolve(img, "./a:b", "backing file").is_ok());
    }
}
