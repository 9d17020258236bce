//! `check` for VHDX: what is wrong, and with repair, what was fixed.
//!
//! Found: a log that still has to be replayed (a crash happened since the last clean
//! close), and BAT entries that point past the end of the file, into the header section or
//! the log/BAT/metadata regions, over another block, or carry a reserved state.
//! Repaired: the log is replayed into the file by any writable open (`-r leaks` or
//! `-r all`, as qemu does); with `-r all` bad BAT entries are reset to NOT_PRESENT through
//! the log (their data was unreachable or would have overwritten metadata).

use std::path::Path;

use vdisk_block::{BlockDev, CheckReport, OpenOptions, RepairMode, Result};

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
            report.corruptions_fixed += 1;
            report.messages.push(format!(
                "Repaired: the log held {} unreplayed entries; they were replayed into the file",
                replay.entries
            ));
        } else {
            report.corruptions += 1;
            report.messages.push(format!(
                "ERROR: the log holds {} entries that were never replayed (run check -r all to replay them)",
                replay.entries
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
