//! What every command needs besides its arguments: how to speak and how to fail.
//!
//! Every failure is reported on one line (two for command-line mistakes, which add qemu-img's
//! "Try ... --help" line). Under the name `qemu-img` (drop-in mode) the wording is qemu-img's
//! own, so scripts that match its messages keep working; under the name `vdisk` a message
//! says what failed, why, and what to do about it.

use std::ffi::OsStr;
use std::path::Path;

use vdisk_block::{Error, ErrorKind};

/// Per-invocation settings shared by all commands.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The name to prefix messages with (`vdisk` or `qemu-img`).
    pub prog: String,
    /// Invoked as `qemu-img`: print exactly what qemu-img prints.
    pub dropin: bool,
    /// The program name exactly as invoked (qemu-img repeats it in "Try ... --help").
    pub argv0: String,
}

/// A failure worded both ways; [`Ctx::fail`] picks one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// qemu-img's exact wording (without the `qemu-img: ` prefix).
    pub qemu: String,
    /// vdisk's wording: `<what failed>: <why>`, with a hint where one helps.
    pub vdisk: String,
}

impl Failure {
    /// A failure with separate wordings.
    pub fn new(qemu: impl Into<String>, vdisk: impl Into<String>) -> Self {
        Failure {
            qemu: qemu.into(),
            vdisk: vdisk.into(),
        }
    }

    /// A failure worded the same both ways.
    pub fn same(text: impl Into<String>) -> Self {
        let text = text.into();
        Failure {
            qemu: text.clone(),
            vdisk: text,
        }
    }
}

impl From<String> for Failure {
    /// A failure worded the same both ways.
    fn from(text: String) -> Self {
        Failure::same(text)
    }
}

impl From<&str> for Failure {
    /// A failure worded the same both ways.
    fn from(text: &str) -> Self {
        Failure::same(text)
    }
}

impl Ctx {
    /// Decides the mode from the program name the binary was started under.
    pub fn from_argv0(argv0: Option<&OsStr>) -> Self {
        let invoked = argv0
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_else(|| "vdisk".into());
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
            argv0: invoked,
        }
    }

    /// Prints `prog: message` on stderr.
    pub fn error(&self, message: impl std::fmt::Display) {
        eprintln!("{}: {message}", self.prog);
    }

    /// Prints `failure` in this mode's wording on stderr.
    pub fn fail(&self, failure: &Failure) {
        if self.dropin {
            self.error(&failure.qemu);
        } else {
            self.error(&failure.vdisk);
        }
    }

    /// Prints a command-line mistake of sub-command `cmd` and returns exit code 1: qemu-img's
    /// two lines in drop-in mode, one line with a pointer to the help otherwise.
    pub fn usage(&self, cmd: &str, message: &str) -> i32 {
        if self.dropin {
            self.error(message);
            eprintln!("Try '{} {cmd} --help' for more info", self.argv0);
        } else {
            self.error(format!("{cmd}: {message} (see 'vdisk {cmd} --help')"));
        }
        1
    }

    /// Reports a command-line parsing error (or help/version output) and returns its exit
    /// code: 0 for help and version, 1 for a bad command line as qemu-img does. `last_arg` is
    /// the command line's last word: when an option's value is missing it is the option as
    /// typed, which decides between getopt's short and long wording.
    pub fn clap_error(&self, err: clap::Error, cmd: Option<&str>, last_arg: Option<&str>) -> i32 {
        use clap::error::{ContextKind, ContextValue, ErrorKind as K};
        match err.kind() {
            K::DisplayHelp | K::DisplayVersion => {
                let _ = err.print();
                return 0;
            }
            K::DisplayHelpOnMissingArgumentOrSubcommand if !self.dropin => {
                let _ = err.print();
                return 1;
            }
            _ => {}
        }
        if !self.dropin {
            return self.clap_error_oneline(&err, cmd);
        }
        let context = |kind| match err.get(kind) {
            Some(ContextValue::String(s)) => Some(s.clone()),
            Some(ContextValue::Strings(v)) => v.first().cloned(),
            _ => None,
        };
        let Some(cmd) = cmd else {
            self.error("Not enough arguments");
            eprintln!("Try '{} --help' for more info", self.argv0);
            return 1;
        };
        match err.kind() {
            K::InvalidSubcommand => {
                self.error(format!("Command not found: {cmd}"));
                eprintln!("Try '{} --help' for more info", self.argv0);
            }
            K::DisplayHelpOnMissingArgumentOrSubcommand | K::MissingSubcommand => {
                self.error("Not enough arguments");
                eprintln!("Try '{} --help' for more info", self.argv0);
            }
            K::UnknownArgument => {
                let arg = context(ContextKind::InvalidArg).unwrap_or_default();
                let ambiguous = crate::getopt::ambiguous_long_option(cmd, &arg);
                let what = match (arg.starts_with("--"), ambiguous) {
                    (_, Some((typed, candidates))) => {
                        let list: Vec<String> =
                            candidates.iter().map(|c| format!("'--{c}'")).collect();
                        format!(
                            "option '--{typed}' is ambiguous; possibilities: {}",
                            list.join(" ")
                        )
                    }
                    (true, None) => format!("unrecognized option '{arg}'"),
                    (false, None) => {
                        let c = arg.trim_start_matches('-').chars().next().unwrap_or('?');
                        format!("invalid option -- '{c}'")
                    }
                };
                eprintln!("{} {cmd}: {what}", self.argv0);
                eprintln!("Try '{} {cmd} --help' for more info", self.argv0);
            }
            K::InvalidValue | K::NoEquals | K::TooFewValues => {
                let arg = context(ContextKind::InvalidArg).unwrap_or_default();
                let name = arg.split_whitespace().next().unwrap_or("").to_string();
                // getopt names a short option by its letter ("-c" or a cluster like "-qc"
                // ending in it), a long one by its name.
                let short = last_arg
                    .filter(|a| a.len() >= 2 && a.starts_with('-') && !a.starts_with("--"))
                    .and_then(|a| a.chars().last());
                let missing = err.kind() != K::InvalidValue
                    || context(ContextKind::InvalidValue).is_none_or(|v| v.is_empty());
                match short {
                    Some(c) if missing => {
                        eprintln!("{} {cmd}: option requires an argument -- '{c}'", self.argv0)
                    }
                    _ => eprintln!("{} {cmd}: option '{name}' requires an argument", self.argv0),
                }
                eprintln!("Try '{} {cmd} --help' for more info", self.argv0);
            }
            _ => {
                let text = err.to_string();
                let first = text
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("error: ");
                self.error(first);
                eprintln!("Try '{} {cmd} --help' for more info", self.argv0);
            }
        }
        1
    }
}

impl Ctx {
    /// vdisk's wording of a command-line mistake: clap's first line, with a pointer to the
    /// help instead of clap's usage block.
    fn clap_error_oneline(&self, err: &clap::Error, cmd: Option<&str>) -> i32 {
        use clap::error::{ContextKind, ContextValue, ErrorKind as K};
        let text = err.to_string();
        let first = text
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("error: ")
            .to_string();
        let known_cmd = !matches!(err.kind(), K::InvalidSubcommand) && cmd.is_some();
        let what = match (err.kind(), err.get(ContextKind::InvalidArg)) {
            (K::UnknownArgument, Some(ContextValue::String(arg))) => {
                match cmd.and_then(|cmd| crate::getopt::ambiguous_long_option(cmd, arg)) {
                    Some((typed, candidates)) => format!(
                        "option '--{typed}' is ambiguous: it could be --{}",
                        candidates.join(", --")
                    ),
                    None => format!("unknown option '{arg}'"),
                }
            }
            _ => first,
        };
        match cmd {
            Some(cmd) if known_cmd => {
                self.error(format!("{cmd}: {what} (see 'vdisk {cmd} --help')"));
            }
            _ => self.error(format!("{what} (see 'vdisk --help')")),
        }
        1
    }
}

/// How qemu words a failed read of guest data: a damaged image is an I/O error to it
/// (EIO); an error of the host keeps its own text.
pub fn qemu_read_error(err: &Error) -> String {
    let cause = std::error::Error::source(err)
        .and_then(|s| s.downcast_ref::<Error>())
        .unwrap_or(err);
    match cause.kind() {
        ErrorKind::Io => without_hint(cause.message()).to_string(),
        _ => "Input/output error".to_string(),
    }
}

/// The OS's words for an error, without Rust's " (os error N)" suffix.
fn why(err: &Error) -> String {
    without_hint(err.message()).to_string()
}

/// qemu-img's messages have no hints; ours may end in a parenthesised hint, which drop-in
/// mode removes so the wording matches qemu-img's.
pub fn without_hint(text: &str) -> &str {
    // A few of qemu's own messages end in a parenthesis; those stay whole.
    const QEMU_OWN: [&str; 2] = ["(use version=v3 or greater)", "(use compat=1.1 or greater)"];
    if QEMU_OWN.iter().any(|own| text.ends_with(own)) {
        return text;
    }
    if !text.ends_with(')') {
        return text;
    }
    // The hint is the parenthesis that closes at the end, nested ones included.
    let mut depth = 0usize;
    for (i, c) in text.char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' => {
                depth -= 1;
                // qemu ends some messages with a figure in parentheses ("... containing
                // file (1048576)"); a hint is words.
                let inside = &text[i + 1..text.len() - 1];
                if depth == 0 && inside.bytes().all(|b| b.is_ascii_digit()) {
                    return text;
                }
                if depth == 0 {
                    return match text[..i].strip_suffix(' ') {
                        Some(head) => head,
                        None => text,
                    };
                }
            }
            _ => {}
        }
    }
    text
}

/// The explanation a source error adds (the registry puts hints there), if any.
fn source_hint(err: &Error) -> Option<String> {
    std::error::Error::source(err).map(|s| s.to_string())
}

/// The host file an image name refers to: qemu accepts an explicit `file:` protocol prefix.
pub fn host_path(name: &str) -> &str {
    name.strip_prefix("file:").unwrap_or(name)
}

/// How opening the image `name` (as the user spelled it) failed.
pub fn open_failure(name: &str, err: &Error) -> Failure {
    open_failure_of(name, host_path(name), err)
}

/// [`open_failure`] for an image the user named `name` whose host file is `path` (they
/// differ with `--image-opts`).
pub fn open_failure_of(name: &str, path: &str, err: &Error) -> Failure {
    let is_dir = Path::new(path).is_dir() && err.kind() != ErrorKind::Unsupported;
    if is_dir {
        return Failure::new(
            format!(
                "Could not open '{name}': 'file' driver requires '{path}' to be a regular file"
            ),
            format!("cannot open '{name}': it is a directory (name a disk image file)"),
        );
    }
    let os_level = matches!(
        err.kind(),
        ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::Io
    ) && err.op() == "open";
    // Drivers say "Could not open backing file 'B': why" (with "(N levels deep)" after the
    // name when B is further down the chain); qemu nests the backing file's own open
    // failure once per level: "Could not open backing file: Could not open 'B': why".
    let backing = vdisk_block::format::split_backing_failure(err.message());
    let qemu = if let Some((target, depth, why)) = backing {
        let inner = if os_level {
            format!("Could not open '{target}': {}", without_hint(why))
        } else {
            without_hint(why).to_string()
        };
        let levels = "Could not open backing file: ".repeat(depth);
        format!("Could not open '{name}': {levels}{inner}")
    } else if os_level {
        format!(
            "Could not open '{name}': Could not open '{path}': {}",
            why(err)
        )
    } else {
        format!("Could not open '{name}': {}", without_hint(err.message()))
    };
    let hint = match err.kind() {
        ErrorKind::NotFound => " (check the file name)".to_string(),
        ErrorKind::PermissionDenied => " (check the file's permissions)".to_string(),
        ErrorKind::Unsupported => source_hint(err)
            .map(|h| format!(" ({h})"))
            .unwrap_or_default(),
        _ => String::new(),
    };
    Failure::new(
        qemu,
        format!("cannot open '{name}': {}{hint}", err.message()),
    )
}

/// How creating the image `name` failed, after the "Formatting" line.
pub fn create_failure(name: &str, format: &str, err: &Error) -> Failure {
    let os = std::error::Error::source(err)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(|e| e.raw_os_error());
    if os == Some(libc_efbig()) {
        return Failure::new(
            format!("{name}: The image size is too large for file format '{format}'"),
            format!(
                "create '{name}': the image size is too large for this file system (choose a smaller size)"
            ),
        );
    }
    let qemu = match err.op() {
        "create" if std::error::Error::source(err).is_some() && err.path().is_some() => {
            format!(
                "{name}: Could not create '{}': {}",
                host_path(name),
                why(err)
            )
        }
        "truncate" => format!("{name}: Could not resize file: {}", why(err)),
        _ => format!("{name}: {}", without_hint(err.message())),
    };
    let hint = match err.kind() {
        _ if Path::new(host_path(name)).is_dir() => " (name a file, not a folder)",
        ErrorKind::NotFound => " (does the folder exist?)",
        ErrorKind::PermissionDenied => " (check the permissions of the file and its folder)",
        _ if err.op() == "truncate" => " (choose a smaller size)",
        _ => "",
    };
    let what = if err.op() == "truncate" {
        "cannot set the file's length: "
    } else {
        ""
    };
    Failure::new(
        qemu,
        format!("create '{name}': {what}{}{hint}", err.message()),
    )
}

/// EFBIG without depending on libc for one constant: Linux's value on every architecture.
fn libc_efbig() -> i32 {
    27
}

/// Parses a size argument (`--size`, `--start-offset`, SIZE) as qemu-img does; `what` names
/// it in messages (`image size`, `start offset`, `max length`).
pub fn parse_size_arg(what: &str, text: &str) -> Result<u64, Failure> {
    let out_of_range = || {
        Failure::new(
            format!("Invalid {what} specified. Must be between 0 and 9223372036854775807."),
            format!("invalid {what} '{text}': it must lie between 0 and 8 EiB - 1"),
        )
    };
    let invalid = || {
        Failure::new(
            format!("Invalid {what} specified: '{text}'."),
            format!(
                "invalid {what} '{text}': use a number of bytes, optionally followed by k, M, G, T, P or E"
            ),
        )
    };
    let trimmed = text.trim_start();
    if let Some(hex) = trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
    {
        // qemu accepts hexadecimal byte counts (without fraction).
        let digits = hex.trim_end_matches(|c: char| "bkKmMgGtTpPeE".contains(c));
        let suffix = &hex[digits.len()..];
        let value = u64::from_str_radix(digits, 16).map_err(|_| invalid())?;
        let shifted = vdisk_block::size::parse_size(&format!("1{suffix}"))
            .map_err(|_| invalid())
            .and_then(|unit| value.checked_mul(unit).ok_or_else(out_of_range))?;
        return if shifted > i64::MAX as u64 {
            Err(out_of_range())
        } else {
            Ok(shifted)
        };
    }
    match vdisk_block::size::parse_size(trimmed) {
        Ok(v) => Ok(v),
        Err(_) => {
            let body = trimmed.strip_prefix('-').unwrap_or(trimmed);
            let digits_end = body
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(body.len());
            let (number, suffix) = body.split_at(digits_end);
            let well_formed = !number.is_empty()
                && number.matches('.').count() <= 1
                && !number.starts_with('.')
                && (suffix.len() == 1 && "bBkKmMgGtTpPeE".contains(suffix)
                    || (suffix.is_empty() && !number.contains('.')));
            if well_formed {
                Err(out_of_range())
            } else {
                Err(invalid())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_arguments_fail_like_qemu() {
        let q = |t: &str| parse_size_arg("image size", t).map_err(|f| f.qemu);
        assert_eq!(q("1M"), Ok(1 << 20));
        assert_eq!(q("0x100"), Ok(256));
        let range = "Invalid image size specified. Must be between 0 and 9223372036854775807.";
        assert_eq!(q("99999999999999999999").err().as_deref(), Some(range));
        assert_eq!(q("16E").err().as_deref(), Some(range));
        assert_eq!(q("8E").err().as_deref(), Some(range));
        assert_eq!(q("-1").err().as_deref(), Some(range));
        assert_eq!(
            q("12x").err().as_deref(),
            Some("Invalid image size specified: '12x'.")
        );
        assert_eq!(
            q("0.5").err().as_deref(),
            Some("Invalid image size specified: '0.5'.")
        );
    }

    #[test]
    fn hints_are_removed_in_dropin_wording() {
        assert_eq!(
            without_hint("Unsupported mode (use off)"),
            "Unsupported mode"
        );
        assert_eq!(without_hint("plain"), "plain");
    }
}
