//! The one error type of the block layer.
//!
//! Every failure carries a small matchable [`ErrorKind`], the operation that failed, the path
//! and/or guest offset where it is known, a human explanation and the underlying source. The
//! CLI turns it into `vdisk: <what failed>: <why>` and into qemu-img's exit codes by kind.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What class of failure happened; callers match on this, never on message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A file the caller named does not exist.
    NotFound,
    /// The OS refused access (permissions, read-only file system).
    PermissionDenied,
    /// The caller's request was malformed: bad option, bad size, unaligned where it must not be.
    InvalidInput,
    /// The image contents are malformed or inconsistent.
    Corrupt,
    /// A valid request or image feature this build does not implement.
    Unsupported,
    /// An offset or length outside the device.
    OutOfRange,
    /// A write was attempted on something opened read-only.
    ReadOnly,
    /// Opening a file was refused by the caller's open policy.
    PolicyDenied,
    /// Any other I/O failure reported by the OS.
    Io,
}

/// An error from the block layer or a format driver.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    op: &'static str,
    path: Option<PathBuf>,
    offset: Option<u64>,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The result type of the block layer.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` raised by operation `op`, explained by `message`.
    pub fn new(kind: ErrorKind, op: &'static str, message: impl Into<String>) -> Self {
        Error {
            kind,
            op,
            path: None,
            offset: None,
            message: message.into(),
            source: None,
        }
    }

    /// Wraps an OS error, classifying it by its `io::ErrorKind`.
    pub fn io(op: &'static str, err: io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            _ if err.raw_os_error() == Some(libc::EROFS) => ErrorKind::PermissionDenied,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            op,
            path: None,
            offset: None,
            message: os_message(&err),
            source: Some(Box::new(err)),
        }
    }

    /// Shorthand for a [`ErrorKind::Corrupt`] error.
    pub fn corrupt(op: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, op, message)
    }

    /// Shorthand for an [`ErrorKind::InvalidInput`] error.
    pub fn invalid(op: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, op, message)
    }

    /// Shorthand for an [`ErrorKind::Unsupported`] error.
    pub fn unsupported(op: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, op, message)
    }

    /// Attaches the path of the file involved.
    #[must_use]
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        self.path = Some(path.as_ref().to_path_buf());
        self
    }

    /// Attaches the offset involved (guest or host, as the message says).
    #[must_use]
    pub fn at_offset(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    /// Attaches an underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The class of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The operation that failed (`"open"`, `"read"`, `"create"`, ...).
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// The file involved, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The offset involved, if known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The explanation without operation, path or offset.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The OS's wording without Rust's " (os error N)" suffix, as qemu-img prints it.
fn os_message(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.op)?;
        if let Some(path) = &self.path {
            write!(f, " '{}'", path.display())?;
        }
        if let Some(offset) = self.offset {
            write!(f, " at offset {offset}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_keep_kind_and_drop_os_suffix() {
        let err = Error::io("open", io::Error::from_raw_os_error(libc::ENOENT)).with_path("/x");
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(err.to_string(), "open '/x': No such file or directory");
    }
}
