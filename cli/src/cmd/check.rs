//! `vdisk check`: is an image's metadata consistent? Optionally repair it.
//!
//! Exit codes are qemu-img's: 0 consistent, 1 the check could not finish, 2 corrupted,
//! 3 leaked clusters only, 63 the format has no metadata to check (raw).

use std::path::Path;

use clap::Args;
use serde_json::{json, Map, Value};
use vdisk_block::{CheckReport, ErrorKind, OpenOptions, RepairMode};

use super::{open, print, OpenSpec};
use crate::context::{without_hint, Failure};
use crate::output::{qemu_json, OutputFormat};
use crate::Ctx;

/// The long `--help` text of `check`.
pub const LONG_ABOUT: &str =
    "Check an image's metadata for consistency and, with -r, repair it.\n\n\
                  Exit status: 0 consistent, 1 the check could not finish, 2 corruptions \
                  found, 3 only leaked clusters found, 63 the format cannot be checked (raw).\n\n\
                  Example: vdisk check -r leaks disk.qcow2";

/// Arguments of `check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Format of the image (default: probed)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Output format: human or json
    #[arg(long, value_name = "human|json", default_value = "human")]
    pub output: String,
    /// Repair: `leaks` (only leaked clusters) or `all` (opens the image read-write)
    #[arg(short = 'r', long = "repair", value_name = "leaks|all")]
    pub repair: Option<String>,
    /// Cache mode for the image (writeback, none, writethrough, directsync, unsafe)
    #[arg(short = 'T', long = "cache", value_name = "CACHE_MODE")]
    pub cache: Option<String>,
    /// Open the image in shared mode, even while another process uses it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Quiet: print only errors
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// The image file
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
    /// Define a secret: `secret,id=ID,data=TEXT` or `secret,id=ID,file=PATH`
    /// (`format=base64` decodes it); options name it by id (`key-secret=ID`)
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub object: Vec<String>,
    /// Treat FILENAME as options: driver=FMT,file.filename=PATH[,key=value...]
    #[arg(long = "image-opts")]
    pub image_opts: bool,
}

/// qemu-img's warning when an image opened for writing was probed as raw.
const RAW_PROBE_WARNING: &str = "WARNING: Image format was not specified for '{}' and probing guessed raw.
         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
         Specify the 'raw' format explicitly to remove the restrictions.";

/// Runs `check`; returns the exit code.
pub fn run(ctx: &Ctx, args: CheckArgs) -> i32 {
    let _secrets = match crate::object::define_all(&args.object) {
        Ok(s) => s,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    let output = match OutputFormat::parse(&args.output) {
        Ok(o) => o,
        Err(msg) => return ctx.usage("check", &msg),
    };
    let repair = match args.repair.as_deref() {
        None => RepairMode::None,
        Some("leaks") => RepairMode::Leaks,
        Some("all") => RepairMode::All,
        Some(other) => {
            return ctx.usage(
                "check",
                &format!("--repair (-r) expects 'leaks' or 'all' not '{other}'"),
            )
        }
    };
    let [name] = args.files.as_slice() else {
        return ctx.usage("check", "Expecting one image file name");
    };
    let spec = OpenSpec {
        format: args.format.as_deref(),
        writable: repair != RepairMode::None,
        force_share: args.force_share,
        cache: args.cache.as_deref(),
        no_backing: false,
        image_opts: args.image_opts,
    };
    // Opening first gives the same errors as every other command for a bad file. A VHDX
    // with a pending log is first opened read-only (replayed in memory): a writable open
    // would replay it into the file, and the repair report would not count it as qemu's does.
    let read_only = OpenSpec {
        writable: false,
        ..spec
    };
    let dev = match open(name, &read_only) {
        Ok(d) => d,
        Err(f) => {
            ctx.fail(&f);
            return 1;
        }
    };
    let format = match dev.info() {
        Ok(i) => i.format,
        Err(e) => {
            ctx.fail(&Failure::same(e.message().to_string()));
            return 1;
        }
    };
    drop(dev);
    if spec.writable && format != "vhdx" {
        // A repair needs the image writable: refused here in the words of every command.
        match open(name, &spec) {
            Ok(dev) => drop(dev),
            Err(f) => {
                ctx.fail(&f);
                return 1;
            }
        }
    }
    if args.format.is_none() && format == "raw" && repair != RepairMode::None {
        eprintln!("{}", RAW_PROBE_WARNING.replace("{}", name));
    }
    let driver = match vdisk_blockjobs::format_by_name(&format) {
        Ok(d) => d,
        Err(e) => {
            ctx.fail(&Failure::same(e.message().to_string()));
            return 1;
        }
    };
    let mut options = if spec.writable {
        OpenOptions::read_write()
    } else {
        OpenOptions::read_only()
    };
    options.force_share = args.force_share;
    let path = if args.image_opts {
        match super::parse_image_opts(name) {
            Ok(o) => {
                options.driver_options.extend(o.options);
                o.filename
            }
            Err(f) => {
                ctx.fail(&f);
                return 1;
            }
        }
    } else {
        name.clone()
    };
    let run_check = |mode: RepairMode| driver.check(Path::new(&path), &options, mode);
    let unsupported = |e: &vdisk_block::Error| {
        Failure::new(
            without_hint(e.message()).to_string(),
            format!(
                "check '{name}': format '{format}' has no metadata to check (convert or compare it instead)"
            ),
        )
    };
    let failed = |e: &vdisk_block::Error| {
        Failure::new(
            format!("Check failed: {}", e.message()),
            format!("check '{name}': {e}"),
        )
    };
    let mut report = match run_check(repair) {
        Ok(r) => r,
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            ctx.fail(&unsupported(&e));
            return 63;
        }
        // A VHDX whose log needs replaying cannot be checked without writing: qemu fails
        // its open and tells how to replay.
        Err(e) if e.kind() == ErrorKind::ReadOnly && e.op() == "open" => {
            ctx.fail(&Failure::new(
                format!(
                    "Could not open '{name}': {}\nTo replay the log, run:\nqemu-img check -r all '{path}'",
                    without_hint(e.message())
                ),
                format!("check '{name}': {} (run 'vdisk check -r all {path}')", without_hint(e.message())),
            ));
            return 1;
        }
        Err(e) => {
            ctx.fail(&failed(&e));
            return 1;
        }
    };
    for line in &report.messages {
        eprintln!("{line}");
    }
    if let Some(why) = &report.failed {
        ctx.fail(&Failure::new(
            format!("Check failed: {why}"),
            format!("check '{name}': {why}"),
        ));
        return 1;
    }
    let say = |text: &str| {
        if !args.quiet {
            print(text);
        }
    };
    if report.leaks_fixed > 0 || report.corruptions_fixed > 0 {
        // Like qemu-img: say what was repaired, then check the repaired image again and
        // report that second check, carrying over the repair counts.
        if output == OutputFormat::Human {
            say(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                report.leaks_fixed, report.corruptions_fixed
            ));
        }
        let (leaks_fixed, corruptions_fixed) = (report.leaks_fixed, report.corruptions_fixed);
        report = match run_check(RepairMode::None) {
            Ok(r) => r,
            Err(e) => {
                ctx.fail(&failed(&e));
                return 1;
            }
        };
        for line in &report.messages {
            eprintln!("{line}");
        }
        report.leaks_fixed = leaks_fixed;
        report.corruptions_fixed = corruptions_fixed;
    }
    match output {
        OutputFormat::Json => say(&format!(
            "{}\n",
            qemu_json(&report_json(name, &format, &report))
        )),
        OutputFormat::Human => say(&report_human(&report)),
    }
    if report.check_errors > 0 {
        ctx.fail(&Failure::new(
            "Check failed",
            format!(
                "check '{name}': {} errors kept the check from finishing",
                report.check_errors
            ),
        ));
        1
    } else if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    }
}

/// qemu's `ImageCheck`, keys in the order qemu-img prints them; zero counts of findings
/// are left out.
fn report_json(name: &str, format: &str, r: &CheckReport) -> Value {
    let mut m = Map::new();
    let mut put = |key: &str, v: Option<u64>| {
        if let Some(v) = v {
            m.insert(key.into(), json!(v));
        }
    };
    // qemu leaves out every count that is zero (it sets `has_x = x != 0`).
    let nonzero = |v: Option<u64>| v.filter(|&v| v > 0);
    put("image-end-offset", nonzero(r.image_end_offset));
    put("compressed-clusters", nonzero(r.compressed_clusters));
    put("total-clusters", nonzero(r.total_clusters));
    put("corruptions", nonzero(Some(r.corruptions)));
    put("corruptions-fixed", nonzero(Some(r.corruptions_fixed)));
    put("check-errors", Some(r.check_errors));
    put("leaks", nonzero(Some(r.leaks)));
    put("leaks-fixed", nonzero(Some(r.leaks_fixed)));
    put("allocated-clusters", nonzero(r.allocated_clusters));
    m.insert("filename".into(), json!(name));
    m.insert("format".into(), json!(format));
    if let Some(v) = nonzero(r.fragmented_clusters) {
        m.insert("fragmented-clusters".into(), json!(v));
    }
    Value::Object(m)
}

/// qemu-img's human summary of a check.
fn report_human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if let (Some(total), Some(alloc)) = (r.total_clusters, r.allocated_clusters) {
        if total > 0 && alloc > 0 {
            let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
            s.push_str(&format!(
                "{alloc}/{total} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                pct(alloc, total),
                pct(r.fragmented_clusters.unwrap_or(0), alloc),
                pct(r.compressed_clusters.unwrap_or(0), alloc)
            ));
        }
    }
    if let Some(end) = r.image_end_offset.filter(|&v| v > 0) {
        s.push_str(&format!("Image end offset: {end}\n"));
    }
    s
}
