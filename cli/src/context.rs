//! What every command needs besides its arguments: how to speak and how to fail.

use std::ffi::OsStr;
use std::path::Path;

/// Per-invocation settings shared by all commands.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The name to prefix messages with (`vdisk` or `qemu-img`).
    pub prog: String,
    /// Invoked as `qemu-img`: print exactly what qemu-img prints.
    pub dropin: bool,
}

impl Ctx {
    /// Decides the mode from the program name the binary was started under.
    pub fn from_argv0(argv0: Option<&OsStr>) -> Self {
        let name = argv0
            .and_then(|a| Path::new(a).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dropin = name == "qemu-img";
        Ctx {
            prog: if dropin {
                "qemu-img".into()
            } else {
                "vdisk".into()
            },
            dropin,
        }
    }

    /// Prints `prog: message` on stderr.
    pub fn error(&self, message: impl std::fmt::Display) {
        eprintln!("{}: {message}", self.prog);
    }

    /// Reports a command-line parsing error (or help/version output) and returns its exit
    /// code: 0 for help and version, 1 for a bad command line as qemu-img does.
    pub fn clap_error(&self, err: clap::Error) -> i32 {
        use clap::error::ErrorKind;
        match err.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = err.print();
                0
            }
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                let _ = err.print();
                1
            }
            _ => {
                let _ = err.print();
                1
            }
        }
    }
}
