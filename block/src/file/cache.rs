//! qemu's cache modes and what each means for a host file.

use crate::error::{Error, Result};

/// Host cache mode, named as qemu-img names them (`-t` / `-T`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Page cache on, flush on request.
    #[default]
    Writeback,
    /// `O_DIRECT`, flush on request.
    None,
    /// Page cache on, flushes ignored.
    Unsafe,
    /// Page cache on, every write durable (`O_DSYNC`).
    Writethrough,
    /// `O_DIRECT` and every write durable.
    DirectSync,
}

impl CacheMode {
    /// Parses qemu-img's names.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "writeback" => Ok(Self::Writeback),
            "none" | "off" => Ok(Self::None),
            "unsafe" => Ok(Self::Unsafe),
            "writethrough" => Ok(Self::Writethrough),
            "directsync" => Ok(Self::DirectSync),
            other => Err(Error::invalid(
                "parse cache mode",
                format!("Invalid cache option: {other}"),
            )
            .with_source(std::io::Error::other(
                "expected writeback, none, unsafe, writethrough or directsync",
            ))),
        }
    }

    /// qemu-img's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Writeback => "writeback",
            Self::None => "none",
            Self::Unsafe => "unsafe",
            Self::Writethrough => "writethrough",
            Self::DirectSync => "directsync",
        }
    }

    /// Bypasses the page cache.
    pub fn direct(self) -> bool {
        matches!(self, Self::None | Self::DirectSync)
    }

    /// Every write is durable when it completes.
    pub fn dsync(self) -> bool {
        matches!(self, Self::Writethrough | Self::DirectSync)
    }
}
