//! `check` for VHDX: what is wrong, and with repair, what was fixed.
//!
//! A log that still has to be replayed (a crash happened since the last clean close) makes
//! a read-only check fail, as qemu's open does. Found: BAT entries that point past the end
//! of the file, into the header section or the log/BAT/metadata regions, over another
//! block, or carry a reserved state.
//! Repaired: the log is replayed into the file by any writable open (`-r leaks` or
//! `-r all`, as qemu does); with `-r all` bad BAT entries are reset to NOT_PRESENT through
//! the log (their data was unreachable or would have overwritten metadata).

use std::path::Path;

use vdisk_block::{BlockDev, CheckReport, Error, ErrorKind, OpenOptions, RepairMode, Result};

use crate::vhdx::image::VhdxImage;

/// Checks (and with `repair`, repairs) the VHDX at `path`.
pub fn check(path: &Path, options: &OpenOptions, repair: RepairMode) -> Result<CheckReport> {
    let opts = OpenOptions {
        writable: repair != RepairMode::None,
        no_backing: true,
        ..options.clone()
    };
    let img = VhdxImage::open_for_check(path, &opts)?;
    let mut report = CheckReport::default();
    if let Some(replay) = img.replayed() {
        if opts.writable {
            // The writable open replayed it into the file. qemu counts that as one fixed
            // corruption and prints no line of its own for it.
            report.corruptions_fixed += 1;
        } else {
            // As qemu: a check that may not write cannot vouch for an image whose metadata
            // is only right once the log is replayed, so it refuses (exit 1) and says how
            // to replay. (Reads replay in memory; only check refuses.)
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "open",
                format!(
                    "VHDX image file '{}' opened read-only, but contains a log that needs to be replayed (its {} entries are replayed by check -r all)",
                    path.display(),
                    replay.entries
                ),
            ));
        }
    }
    let problems: Vec<(u64, String)> = img.bat_problems().to_vec();
    for (_, why) in &problems {
        if repair == RepairMode::All {
            report.corruptions_fixed += 1;
            report
                .messages
                .push(format!("Repaired: {why} (entry reset)"));
        } else {
            report.corruptions += 1;
            report.messages.push(format!("ERROR: {why}"));
        }
    }
    if repair == RepairMode::All && !problems.is_empty() {
        let indexes: Vec<u64> = problems.iter().map(|p| p.0).collect();
        img.reset_entries(&indexes)?;
    }
    // qemu-img reports no cluster statistics for VHDX (its JSON has only the counts of
    // errors); leaving them unset keeps our output the same shape.
    if opts.writable {
        img.flush()?;
    }
    Ok(report)
}
