//! `vdisk snapshot`: list, create, apply or delete the internal snapshots of an image.
//!
//! Options, output and messages follow `qemu-img snapshot` of qemu 10: one operation per
//! call (listing when none is given), the list printed as `info` prints it, nothing printed
//! when the image has no snapshots, and exit code 1 for every failure. The format work is
//! the driver's ([`vdisk_block::BlockDev::snapshot_create`] and its siblings); formats
//! without internal snapshots refuse as qemu's do.

use std::sync::Arc;

use clap::{ArgAction, Args};
use vdisk_block::{BlockDev, Error, ErrorKind};

use super::info::snapshot_line;
use super::{open, print, OpenSpec};
use crate::context::{without_hint, Failure};
use crate::Ctx;

/// The long `--help` text of `snapshot`.
pub const LONG_ABOUT: &str = "List, create, apply or delete internal snapshots (qcow2).\n\n\
    One operation per call; without one the snapshots are listed. Applying reverts the \
    image to the snapshot, which stays; snapshots are found by id first, then by name \
    (deleting finds them by name, as qemu-img does).\n\n\
    Example: vdisk snapshot -c before-upgrade disk.qcow2";

/// Arguments of `snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// List the snapshots of FILENAME (the default)
    #[arg(short = 'l', long = "list", action = ArgAction::Count)]
    pub list: u8,
    /// Revert the image to snapshot SNAPSHOT (by id, else by name)
    #[arg(
        short = 'a',
        long = "apply",
        value_name = "SNAPSHOT",
        allow_hyphen_values = true
    )]
    pub apply: Vec<String>,
    /// Create a snapshot named SNAPSHOT of the current contents
    #[arg(
        short = 'c',
        long = "create",
        value_name = "SNAPSHOT",
        allow_hyphen_values = true
    )]
    pub create: Vec<String>,
    /// Delete the snapshot named SNAPSHOT
    #[arg(
        short = 'd',
        long = "delete",
        value_name = "SNAPSHOT",
        allow_hyphen_values = true
    )]
    pub delete: Vec<String>,
    /// Format of the image (default: probed)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Name the image by options instead of a file name: driver=FMT,file.filename=PATH
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Open the image in shared mode, even while another process uses it (listing only)
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Quiet operation
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Define a QEMU object, e.g. secret,id=sec0,data=PASSPHRASE (or file=PATH)
    #[arg(long = "object", value_name = "OBJDEF")]
    pub object: Vec<String>,
    /// The image file
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// The operation asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    List,
    Create(String),
    Apply(String),
    Delete(String),
}

/// qemu-img's `sn.name` holds 255 bytes; longer names are cut there.
const MAX_NAME_BYTES: usize = 255;

/// qemu-img's warning when an image opened for writing was probed as raw.
const RAW_PROBE_WARNING: &str = "WARNING: Image format was not specified for '{}' and probing guessed raw.
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
         Specify the 'raw' format explicitly to remove the restrictions.";

/// Runs `snapshot`; returns the exit code.
pub fn run(ctx: &Ctx, args: SnapshotArgs) -> i32 {
    // Held to the end: dropping it removes the secrets again.
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    let ops = usize::from(args.list) + args.apply.len() + args.create.len() + args.delete.len();
    if ops > 1 {
        return ctx.usage("snapshot", "Cannot mix '-l', '-a', '-c', '-d'");
    }
    let op = if let Some(name) = args.create.first() {
        Op::Create(name.clone())
    } else if let Some(name) = args.apply.first() {
        Op::Apply(name.clone())
    } else if let Some(name) = args.delete.first() {
        Op::Delete(name.clone())
    } else {
        Op::List
    };
    let [name] = args.files.as_slice() else {
        return ctx.usage("snapshot", "Expecting one image file name");
    };
    match snapshot(ctx, &args, name, &op) {
        Ok(()) => 0,
        Err(f) => {
            ctx.fail(&f);
            1
        }
    }
}

fn snapshot(ctx: &Ctx, args: &SnapshotArgs, name: &str, op: &Op) -> Result<(), Failure> {
    let writable = *op != Op::List;
    if writable && args.force_share {
        return Err(Failure::new(
            format!("Could not open '{name}': force-share=on can only be used with read-only images"),
            format!(
                "cannot open '{name}': -U (force-share) is for listing only; changing snapshots needs the image to itself"
            ),
        ));
    }
    let spec = OpenSpec {
        format: args.format.as_deref(),
        writable,
        force_share: args.force_share,
        image_opts: args.image_opts,
        ..OpenSpec::default()
    };
    let dev = open(name, &spec)?;
    let format = dev.info().map(|i| i.format).unwrap_or_default();
    // qemu warns once per writable open of a probed raw image; applying opens it twice
    // (the snapshot fallback reopens the format layer).
    let probed_raw = ctx.dropin && writable && args.format.is_none() && format == "raw";
    let warn = |times: usize| {
        if probed_raw {
            for _ in 0..times {
                eprintln!("{}", RAW_PROBE_WARNING.replace("{}", name));
            }
        }
    };
    match op {
        Op::List => list(&dev, name),
        Op::Create(snap) => {
            warn(1);
            dev.snapshot_create(truncate_name(snap))
                .map_err(|e| create_failure(name, snap, &format, &e))
        }
        Op::Apply(snap) => {
            warn(2);
            dev.snapshot_apply(snap)
                .map_err(|e| apply_failure(name, snap, &format, &e))
        }
        Op::Delete(snap) => {
            warn(1);
            delete(&dev, name, snap, &format)
        }
    }
}

fn list(dev: &Arc<dyn BlockDev>, name: &str) -> Result<(), Failure> {
    let snapshots = dev.snapshots().map_err(|e| {
        Failure::new(
            without_hint(e.message()).to_string(),
            format!("cannot list the snapshots of '{name}': {}", e.message()),
        )
    })?;
    if snapshots.is_empty() {
        return Ok(());
    }
    let mut text = String::from("Snapshot list:\n");
    text.push_str(&snapshot_line(None));
    text.push('\n');
    for s in &snapshots {
        text.push_str(&snapshot_line(Some(s)));
        text.push('\n');
    }
    print(&text);
    Ok(())
}

/// Deletes as qemu-img does: the first snapshot with that name (ids are not tried).
fn delete(dev: &Arc<dyn BlockDev>, name: &str, snap: &str, format: &str) -> Result<(), Failure> {
    let not_found = || {
        Failure::new(
            format!("Could not delete snapshot '{snap}': snapshot not found"),
            format!(
                "delete snapshot '{snap}' of '{name}': no snapshot has that name (list them with 'vdisk snapshot -l {name}')"
            ),
        )
    };
    // A format without snapshots lists none, so qemu-img reports the name as not found.
    let found = dev
        .snapshots()
        .map_err(|_| not_found())?
        .into_iter()
        .find(|s| s.name == snap)
        .ok_or_else(not_found)?;
    dev.snapshot_delete(&found.id, &found.name).map_err(|e| {
        Failure::new(
            format!(
                "Could not delete snapshot '{snap}': {}",
                without_hint(e.message())
            ),
            format!(
                "delete snapshot '{snap}' of '{name}' ({format}): {}",
                e.message()
            ),
        )
    })
}

/// The longest prefix of `name` qemu-img keeps, cut at a character boundary (qemu cuts
/// bytes, which can split a character; vdisk keeps names valid UTF-8).
fn truncate_name(name: &str) -> &str {
    if name.len() <= MAX_NAME_BYTES {
        return name;
    }
    let mut end = MAX_NAME_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// qemu-img prints `strerror` of the driver's error code.
fn errno_text(e: &Error) -> String {
    match e.kind() {
        ErrorKind::Unsupported => "Operation not supported".into(),
        ErrorKind::InvalidInput | ErrorKind::Corrupt => "Invalid argument".into(),
        ErrorKind::NotFound => "No such file or directory".into(),
        ErrorKind::PermissionDenied | ErrorKind::ReadOnly => "Permission denied".into(),
        _ => without_hint(e.message()).to_string(),
    }
}

fn create_failure(name: &str, snap: &str, format: &str, e: &Error) -> Failure {
    let hint = if format != "qcow2" {
        " (internal snapshots need a qcow2 image: convert it with 'vdisk convert -O qcow2')"
    } else {
        ""
    };
    let why = if format == "qcow2" {
        e.message().to_string()
    } else {
        format!("format '{format}' has no internal snapshots")
    };
    Failure::new(
        format!("Could not create snapshot '{snap}': {}", errno_text(e)),
        format!("create snapshot '{snap}' of '{name}': {why}{hint}"),
    )
}

fn apply_failure(name: &str, snap: &str, format: &str, e: &Error) -> Failure {
    let default_refusal = "Block driver does not support snapshots";
    // qemu checks these before it loads anything, and says them as they are.
    let verbatim = [default_refusal, "Device has active dirty bitmaps"];
    let qemu = if verbatim.contains(&e.message()) {
        e.message().to_string()
    } else {
        format!("Failed to load snapshot: {}", errno_text(e))
    };
    let vdisk = match e.kind() {
        ErrorKind::NotFound => format!(
            "apply snapshot '{snap}' to '{name}': no snapshot has that id or name (list them with 'vdisk snapshot -l {name}')"
        ),
        _ if e.message() == default_refusal => {
            format!("apply snapshot '{snap}' to '{name}': format '{format}' has no internal snapshots")
        }
        _ if e.message() == verbatim[1] => format!(
            "apply snapshot '{snap}' to '{name}': the image has persistent dirty bitmaps, which would not record what the revert changes (remove them with 'vdisk bitmap --remove' first)"
        ),
        _ => format!("apply snapshot '{snap}' to '{name}': {}", e.message()),
    };
    Failure::new(format!("Could not apply snapshot '{snap}': {qemu}"), vdisk)
}

/// Which internal snapshot of a source `convert -l` (or `-s`) copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSnapshot {
    /// `-l NAME` / `-s ID_OR_NAME`: the snapshot with that id, else the first with that name.
    IdOrName(String),
    /// `-l snapshot.id=ID,snapshot.name=NAME`: the given fields must all match.
    Exact {
        /// `snapshot.id`.
        id: Option<String>,
        /// `snapshot.name`.
        name: Option<String>,
    },
}

/// The prefix that makes `-l` a list of options rather than a name (qemu's
/// `SNAPSHOT_OPT_BASE`).
const OPT_BASE: &str = "snapshot.";

/// Reads `convert`'s `-l` values (and vdisk's `-s`) as qemu-img does: options lists are
/// checked at once, the last of each kind counts, and an options list beats a name.
pub fn parse_source_snapshot(
    ctx: &Ctx,
    params: &[String],
    id_or_name: &[String],
) -> Result<Option<SourceSnapshot>, Failure> {
    let mut exact = None;
    let mut plain = id_or_name.last().cloned();
    for text in params {
        if text.starts_with(OPT_BASE) {
            exact = Some(parse_snapshot_opts(ctx, text)?);
        } else {
            plain = Some(text.clone());
        }
    }
    Ok(exact.or(plain.map(SourceSnapshot::IdOrName)))
}

fn parse_snapshot_opts(ctx: &Ctx, text: &str) -> Result<SourceSnapshot, Failure> {
    let mut id = None;
    let mut name = None;
    let mut items = vdisk_block::format::split_option_list(text);
    // A trailing comma ends the list without adding an empty option.
    if items.last().is_some_and(|i| i.is_empty()) {
        items.pop();
    }
    for item in items {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                let (key, value) = match item.strip_prefix("no") {
                    Some(rest) => (rest.to_string(), "off"),
                    None => (item.clone(), "on"),
                };
                if ctx.dropin {
                    ctx.error(format!(
                        "warning: short-form boolean option '{item}' deprecated\nPlease use {key}={value} instead"
                    ));
                }
                (key, value.to_string())
            }
        };
        match key.as_str() {
            "snapshot.id" => id = Some(value),
            "snapshot.name" => name = Some(value),
            _ => {
                return Err(Failure::new(
                    format!(
                        "Invalid parameter '{key}'\n{}: Failed in parsing snapshot param '{text}'",
                        ctx.prog
                    ),
                    format!(
                        "convert: -l '{text}': unknown key '{key}' (use snapshot.id=ID and/or snapshot.name=NAME, or give a name alone)"
                    ),
                ))
            }
        }
    }
    Ok(SourceSnapshot::Exact { id, name })
}

/// Makes the first source show the chosen snapshot, as qemu-img does before it creates the
/// target; a name alone is refused with several sources.
pub fn load_source_snapshot(
    sources: &[Arc<dyn BlockDev>],
    which: &SourceSnapshot,
) -> Result<(), Failure> {
    let Some(first) = sources.first() else {
        return Ok(());
    };
    let loaded = match which {
        SourceSnapshot::IdOrName(text) => {
            if sources.len() > 1 {
                return Err(Failure::new(
                    "No support for concatenating multiple snapshot",
                    "convert: a snapshot named by -l NAME can only be copied from a single source (use -l snapshot.id=ID for the first of several)",
                ));
            }
            // qemu's bdrv_snapshot_load_tmp_by_id_or_name: by id, then by name.
            match first.load_snapshot(Some(text), None) {
                Err(e) if e.kind() == ErrorKind::NotFound => first.load_snapshot(None, Some(text)),
                other => other,
            }
        }
        SourceSnapshot::Exact { id, name } => first.load_snapshot(id.as_deref(), name.as_deref()),
    };
    loaded.map_err(|e| {
        let vdisk = match e.kind() {
            ErrorKind::NotFound => format!(
                "convert: the source has no such snapshot ({}; list them with 'vdisk snapshot -l')",
                describe(which)
            ),
            _ => format!(
                "convert: cannot read snapshot {}: {}",
                describe(which),
                e.message()
            ),
        };
        Failure::new(
            format!("Failed to load snapshot: {}", without_hint(e.message())),
            vdisk,
        )
    })
}

fn describe(which: &SourceSnapshot) -> String {
    match which {
        SourceSnapshot::IdOrName(t) => format!("id or name '{t}'"),
        SourceSnapshot::Exact { id, name } => {
            let mut parts = Vec::new();
            if let Some(i) = id {
                parts.push(format!("id '{i}'"));
            }
            if let Some(n) = name {
                parts.push(format!("name '{n}'"));
            }
            if parts.is_empty() {
                "no id or name given".into()
            } else {
                parts.join(" and ")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_cut_like_qemu_img() {
        let long = "n".repeat(300);
        assert_eq!(truncate_name(&long).len(), 255);
        assert_eq!(truncate_name("short"), "short");
        let wide = "é".repeat(200);
        let cut = truncate_name(&wide);
        assert_eq!(cut.len(), 254);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
