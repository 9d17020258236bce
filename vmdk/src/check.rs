//! `check`: every grain table entry of every sparse extent must point inside its file, as
//! qemu checks it (qemu counts a grain past the end of the file as a corruption). Compressed
//! grains are located, not inflated; flat and zero extents have nothing to check.

use std::path::Path;

use vdisk_block::{CheckReport, OpenOptions, Result};

use crate::extent::ExtentData;
use crate::header::SECTOR;
use crate::sparse::SparseExtent;

/// Findings reported one by one at most; past this only the counts grow.
const MAX_MESSAGES: usize = 1000;

/// Checks the image at `path` (its parent is not opened: it is checked on its own).
pub fn check(path: &Path, options: &OpenOptions) -> Result<CheckReport> {
    let options = OpenOptions {
        writable: false,
        no_backing: true,
        ..options.clone()
    };
    let image = crate::open::open(path, &options)?;
    let mut report = CheckReport::default();
    for extent in image.extents() {
        if let ExtentData::Sparse(sparse) = &extent.data {
            check_sparse(sparse, extent.start / SECTOR, &mut report);
        }
    }
    Ok(report)
}

fn note(report: &mut CheckReport, message: String) {
    report.corruptions += 1;
    if report.messages.len() < MAX_MESSAGES {
        report.messages.push(message);
    }
}

fn check_sparse(sparse: &SparseExtent, first_sector: u64, report: &mut CheckReport) {
    let header = sparse.header();
    let per_gt = u64::from(header.gtes_per_gt);
    let grains = header.capacity.div_ceil(header.grain_sectors);
    for gd_index in 0..header.gd_entries() {
        let sector = first_sector + gd_index * per_gt * header.grain_sectors;
        let table = match sparse.grain_table(gd_index as usize) {
            Ok(Some(table)) => table,
            Ok(None) => continue,
            Err(e) => {
                note(
                    report,
                    format!(
                        "ERROR: grain table for sector {sector} is unreadable: {}",
                        e.message()
                    ),
                );
                continue;
            }
        };
        for slot in 0..table.len() as u64 {
            let grain = gd_index * per_gt + slot;
            if grain >= grains {
                break;
            }
            if let Err(e) = sparse.grain(grain) {
                let sector = first_sector + grain * header.grain_sectors;
                let why = if e.message().contains("past the end") {
                    "points after EOF".to_string()
                } else {
                    e.message().to_string()
                };
                note(
                    report,
                    format!("ERROR: cluster offset for sector {sector} {why}"),
                );
            }
        }
    }
}
