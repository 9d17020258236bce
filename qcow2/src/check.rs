//! `check`: recount every reference to every host cluster and compare with the refcounts on
//! disk, counting leaks and corruptions the way `qemu-img check` does, and optionally set
//! the refcounts to the counted references (repair).
//!
//! References are counted from the header cluster, the active L1 table and everything
//! under it, every snapshot's L1 table and everything under it, the snapshot table, the
//! refcount table and its blocks, the encryption header and the persistent bitmaps. A
//! cluster whose on-disk refcount is lower than its references is a corruption (a write
//! could free it while in use); higher is a leak. The COPIED flags of the active tables are
//! checked against the refcounts too, as QEMU does.

use std::path::Path;

use vdisk_block::{CheckReport, Error, HostFile, OpenOptions, RepairMode, Result};

use crate::alloc::Refcounts;
use crate::entry::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::header::{Header, MAX_L1_BYTES};
use crate::refcount::{RefcountReader, REFTABLE_RESERVED};
use crate::snapshot;

/// The largest number of host clusters `check` will track (4 bytes each): 2 TiB of file at
/// 64 KiB clusters. A larger (or hostile, sparse) file is reported as a check error rather
/// than allocating without bound.
pub const MAX_TRACKED_CLUSTERS: u64 = 1 << 25;

/// How far past the end of the file (beyond doubling it) `check -r all` grows the file
/// to hold a refcount block there.
const GROW_SLACK: u64 = 1 << 30;

/// Bound on one bitmap table (QEMU allows 2^27 entries; 64 MiB covers far more than any
/// image of the allowed sizes needs).
const MAX_BITMAP_TABLE_BYTES: u64 = 64 << 20;

const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

struct Counter<'a> {
    file: &'a HostFile,
    /// The image file's length (when the check began, or after a repair grew it).
    file_len: u64,
    /// True when `file` is writable and a refcount block past the end of the file may be
    /// repaired by growing the file (qemu's `check_refblocks` with `BDRV_FIX_ERRORS`).
    grow: bool,
    header: &'a Header,
    refs: Vec<u32>,
    report: CheckReport,
    /// OFLAG_COPIED errors, reported after the refcount comparison as qemu-img does.
    copied_errors: Vec<String>,
    rc: RefcountReader<'a>,
    /// Set where only a new refcount structure can repair the image (qemu's `rebuild`):
    /// a used cluster with a refcount of 0, or a refcount block that is malformed or
    /// shared.
    rebuild: bool,
}

/// What counting the references of an image found.
struct Counted {
    /// The report; its messages end with the OFLAG_COPIED findings.
    report: CheckReport,
    /// How many of the report's last messages are OFLAG_COPIED findings (qemu checks the
    /// COPIED flags only once the refcounts are settled, so a repair that stops or
    /// rebuilds first does not print them).
    copied: usize,
    /// The reference count of every host cluster.
    refs: Vec<u32>,
    /// See [`Counter::rebuild`].
    rebuild: bool,
}

fn read_u64s(file: &HostFile, offset: u64, count: u64) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; (count * 8) as usize];
    file.read_at(&mut raw, offset)?;
    Ok(raw
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect())
}

impl Counter<'_> {
    fn cs(&self) -> u64 {
        self.header.cluster_size()
    }

    fn error(&mut self, message: String) {
        self.report.corruptions += 1;
        self.report.messages.push(message);
    }

    /// Adds one reference to every cluster overlapping `[offset, offset + len)`.
    fn inc(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        // qemu's rule (qcow2_inc_refcounts_imrt): the last cluster may be only partly
        // written, so a reference may reach less than one cluster past the end of the file;
        // one reaching further is a corruption and is not counted. Counting it would grow
        // `refs`, and the comparison that walks it, to whatever cluster a hostile entry
        // names: up to 2^25 clusters, seconds of work for a 200 KiB file.
        if offset.saturating_add(len).saturating_sub(self.file_len) >= self.cs() {
            self.error(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {len:#x}"
            ));
            return;
        }
        let cb = self.header.cluster_bits;
        let first = offset >> cb;
        let last = offset.saturating_add(len - 1) >> cb;
        for cluster in first..=last {
            if cluster >= MAX_TRACKED_CLUSTERS {
                self.error(format!(
                    "ERROR reference to cluster {cluster} lies far outside the image"
                ));
                return;
            }
            let idx = cluster as usize;
            if idx >= self.refs.len() {
                self.refs.resize(idx + 1, 0);
            }
            self.refs[idx] = self.refs[idx].saturating_add(1);
        }
    }

    fn disk_refcount(&mut self, cluster: u64) -> Option<u64> {
        match self.rc.refcount(cluster) {
            Ok(r) => Some(r),
            Err(e) => {
                self.report.check_errors += 1;
                self.report.messages.push(format!(
                    "ERROR: Can't get refcount for cluster {cluster}: {}",
                    e.message()
                ));
                None
            }
        }
    }

    fn check_copied(&mut self, what: &str, detail: String, entry: u64, cluster: u64) {
        let refcount = if what == "data" && self.header.has_data_file() {
            Some(1)
        } else {
            self.disk_refcount(cluster)
        };
        if let Some(refcount) = refcount {
            if (refcount == 1) != (entry & COPIED != 0) {
                // qemu-img check reports these in a pass after the refcount comparison,
                // so they are printed after its messages (see `count`).
                self.report.corruptions += 1;
                self.copied_errors.push(format!(
                    "ERROR OFLAG_COPIED {what} cluster: {detail} refcount={refcount}"
                ));
            }
        }
    }

    fn table_in_file(&mut self, what: &str, offset: u64, bytes: u64) -> bool {
        let len = self.file.len().unwrap_or(0);
        if offset.checked_add(bytes).is_none_or(|end| end > len) {
            self.report.check_errors += 1;
            self.report.messages.push(format!(
                "ERROR: {what} at {offset:#x} ({bytes} bytes) lies past the end of the file"
            ));
            return false;
        }
        true
    }

    /// Counts an L1 table and everything it references.
    fn l1(&mut self, l1_offset: u64, l1_size: u32, active: bool) -> Result<()> {
        let bytes = u64::from(l1_size) * 8;
        self.inc(l1_offset, bytes);
        if bytes == 0 || bytes > MAX_L1_BYTES || !self.table_in_file("L1 table", l1_offset, bytes) {
            return Ok(());
        }
        let l1 = read_u64s(self.file, l1_offset, u64::from(l1_size))?;
        let cs = self.cs();
        for (i, &entry) in l1.iter().enumerate() {
            if entry & L1_RESERVED != 0 {
                self.error(format!(
                    "ERROR found L1 entry with reserved bits set: {entry:#x}"
                ));
            }
            let l2 = entry & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if l2 & (cs - 1) != 0 {
                self.error(format!(
                    "ERROR l2_offset={l2:#x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                continue;
            }
            self.inc(l2, cs);
            if active {
                self.check_copied(
                    "L2",
                    format!("l1_index={i} l1_entry={entry:x}"),
                    entry,
                    l2 >> self.header.cluster_bits,
                );
            }
            // An L2 table past the end of the file reads as zeroes, as qemu's file reads
            // do: the reference above already reported it as a corruption.
            self.l2(l2, active)?;
        }
        Ok(())
    }

    fn l2(&mut self, l2_offset: u64, active: bool) -> Result<()> {
        let h = self.header;
        let cs = self.cs();
        let ext = h.extended_l2();
        let width = if ext { 2 } else { 1 };
        let mut raw = vec![0u8; cs as usize];
        let inside = self.file.len()?.saturating_sub(l2_offset).min(cs) as usize;
        self.file.read_at(&mut raw[..inside], l2_offset)?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let mut next_contiguous = 0u64;
        for i in 0..h.l2_entries() as usize {
            let entry = table[i * width];
            let bitmap = if ext { table[i * width + 1] } else { 0 };
            if entry & COMPRESSED != 0 {
                if entry & COPIED != 0 {
                    self.error(format!(
                        "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                        entry & !(COPIED | COMPRESSED)
                    ));
                }
                if h.has_data_file() {
                    self.error(format!(
                        "ERROR compressed cluster {i} with data file, entry={entry:#x}"
                    ));
                    continue;
                }
                let x = 70 - h.cluster_bits;
                let coffset = entry & ((1u64 << x) - 1);
                let sectors = ((entry & !(COPIED | COMPRESSED)) >> x) + 1;
                self.inc(coffset, sectors * 512 - (coffset & 511));
                if active {
                    self.report.allocated_clusters =
                        Some(self.report.allocated_clusters.unwrap_or(0) + 1);
                    self.report.compressed_clusters =
                        Some(self.report.compressed_clusters.unwrap_or(0) + 1);
                    // Compressed clusters are fragmented by nature, as QEMU counts them.
                    self.report.fragmented_clusters =
                        Some(self.report.fragmented_clusters.unwrap_or(0) + 1);
                }
                continue;
            }
            if entry & L2_RESERVED != 0 {
                self.error(format!(
                    "ERROR found L2 entry with reserved bits set: {entry:#x}"
                ));
            }
            let offset = entry & OFFSET_MASK;
            let has_host = offset != 0 || (h.has_data_file() && entry & COPIED != 0);
            let zero_flag = !ext && entry & ZERO != 0;
            if !has_host {
                if ext && bitmap & 0xffff_ffff != 0 {
                    self.error(format!(
                        "ERROR: l2 entry {entry:#x}: Unallocated cluster has non-zero subcluster allocation map"
                    ));
                }
                let _ = zero_flag;
                continue;
            }
            if ext && (bitmap >> 32) & bitmap != 0 {
                self.error(format!(
                    "ERROR offset={offset:#x}: Allocated cluster has corrupted subcluster allocation bitmap"
                ));
            }
            if offset & (cs - 1) != 0 {
                // Counted on as qemu does: the cluster-sized range it names is still
                // referenced, which keeps the leak and corruption counts equal to qemu's.
                self.error(format!(
                    "ERROR offset={offset:#x}: Data cluster is not properly aligned; L2 entry corrupted."
                ));
            }
            if active {
                self.report.allocated_clusters =
                    Some(self.report.allocated_clusters.unwrap_or(0) + 1);
                if next_contiguous != 0 && offset != next_contiguous {
                    self.report.fragmented_clusters =
                        Some(self.report.fragmented_clusters.unwrap_or(0) + 1);
                }
                next_contiguous = offset + cs;
            }
            if !h.has_data_file() {
                self.inc(offset, cs);
            }
            if active {
                self.check_copied(
                    "data",
                    format!("l2_entry={entry:x}"),
                    entry,
                    offset >> h.cluster_bits,
                );
            }
        }
        Ok(())
    }

    fn bitmaps(&mut self) -> Result<()> {
        let Some(bm) = self.header.extensions.bitmaps else {
            return Ok(());
        };
        self.inc(bm.directory_offset, bm.directory_size);
        if !self.table_in_file("bitmap directory", bm.directory_offset, bm.directory_size) {
            return Ok(());
        }
        let mut dir = vec![0u8; bm.directory_size as usize];
        self.file.read_at(&mut dir, bm.directory_offset)?;
        let mut pos = 0usize;
        for _ in 0..bm.nb_bitmaps {
            if pos + 24 > dir.len() {
                self.error("ERROR bitmap directory is shorter than its bitmaps".to_string());
                break;
            }
            let e = &dir[pos..];
            let be32 = |at: usize| u32::from_be_bytes([e[at], e[at + 1], e[at + 2], e[at + 3]]);
            let table_offset = (u64::from(be32(0)) << 32) | u64::from(be32(4));
            let table_size = u64::from(be32(8));
            let name_size = usize::from(u16::from_be_bytes([e[18], e[19]]));
            let extra = be32(20) as usize;
            self.inc(table_offset, table_size * 8);
            if table_size * 8 > MAX_BITMAP_TABLE_BYTES {
                self.error(format!(
                    "ERROR bitmap table of {table_size} entries is too large"
                ));
            } else if table_offset & (self.cs() - 1) == 0
                && self.table_in_file("bitmap table", table_offset, table_size * 8)
            {
                for entry in read_u64s(self.file, table_offset, table_size)? {
                    let data = entry & OFFSET_MASK;
                    if data != 0 {
                        self.inc(data, self.cs());
                    }
                }
            }
            pos += (24 + extra.min(1 << 16) + name_size + 7) & !7;
        }
        Ok(())
    }

    fn refblocks(&mut self) {
        let cs = self.cs();
        let table: Vec<u64> = self.rc.table().to_vec();
        for (i, &entry) in table.iter().enumerate() {
            let offset = entry & !REFTABLE_RESERVED;
            if entry & REFTABLE_RESERVED != 0 {
                self.error(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.rebuild = true;
                continue;
            }
            if offset == 0 {
                continue;
            }
            if offset & (cs - 1) != 0 {
                self.error(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.rebuild = true;
                continue;
            }
            let cluster = offset >> self.header.cluster_bits;
            // "Outside" is judged against the clusters tracked so far, as qemu's
            // `nb_clusters`: the file's clusters, plus one where a reference reaches into a
            // partly written last cluster, plus what earlier repairs here grew.
            if cluster >= self.refs.len() as u64 {
                if !self.grow {
                    self.error(format!("ERROR refcount block {i} is outside image"));
                    continue;
                }
                self.report
                    .messages
                    .push(format!("Repairing refcount block {i} is outside image"));
                match self.grow_for_block(offset) {
                    Ok(()) => {
                        self.report.corruptions_fixed += 1;
                        // The new cluster reads as zeroes: its only reference is this one.
                        self.inc(offset, cs);
                    }
                    Err(why) => {
                        self.report.corruptions += 1;
                        self.report
                            .messages
                            .push(format!("ERROR could not resize image: {why}"));
                        self.rebuild = true;
                    }
                }
                continue;
            }
            self.inc(offset, cs);
            // Counted last, so anything else that references the block (a data cluster
            // or an L2 table on top of it) shows here, as in qemu's check_refblocks.
            let counted = self.refs.get(cluster as usize).copied().unwrap_or(0);
            if counted != 1 {
                self.error(format!("ERROR refcount block {i} refcount={counted}"));
                self.rebuild = true;
            }
        }
    }

    /// Grows the file to hold the refcount block at `offset` (qemu truncates to `offset +
    /// cluster_size`) and tracks its new clusters; on failure, the reason in qemu's words.
    fn grow_for_block(&mut self, offset: u64) -> std::result::Result<(), String> {
        let cs = self.cs();
        const EINVAL: &str = "Invalid argument";
        if offset > i64::MAX as u64 - cs {
            return Err(EINVAL.to_string());
        }
        let new_len = offset + cs;
        // vdisk's own bound, where qemu grows the file as far as the file system lets it
        // and tracks every cluster in memory: a block far past the end (twice the file's
        // length and 1 GiB more) is hostile, not a cut-off tail, and tracking up to it
        // would take memory without bound. It is refused before the file is touched, as a
        // failed resize: the refcount structure is rebuilt without it instead.
        let bound = self
            .file_len
            .saturating_mul(2)
            .max(self.file_len.saturating_add(GROW_SLACK));
        if new_len > bound || new_len.div_ceil(cs) > MAX_TRACKED_CLUSTERS {
            return Err("File too large".to_string());
        }
        self.file
            .set_len(new_len)
            .map_err(|e| e.message().to_string())?;
        let len = self.file.len().map_err(|e| e.message().to_string())?;
        self.file_len = len;
        let clusters = len.div_ceil(cs);
        if clusters > MAX_TRACKED_CLUSTERS {
            return Err("File too large".to_string());
        }
        if self.refs.len() < clusters as usize {
            self.refs.resize(clusters as usize, 0);
        }
        if offset >> self.header.cluster_bits >= self.refs.len() as u64 {
            return Err(EINVAL.to_string());
        }
        Ok(())
    }

    /// Compares references with on-disk refcounts; returns the highest used cluster.
    fn compare(&mut self) -> Option<u64> {
        let mut highest = None;
        for cluster in 0..self.refs.len() as u64 {
            let reference = u64::from(self.refs[cluster as usize]);
            let Some(refcount) = self.disk_refcount(cluster) else {
                continue;
            };
            if refcount > 0 || reference > 0 {
                highest = Some(cluster);
            }
            if refcount == reference {
                continue;
            }
            if refcount == 0 {
                // Setting the refcount in place could put it in a refcount block that
                // does not exist, allocated over a cluster in use: qemu rebuilds instead.
                self.rebuild = true;
            }
            if refcount < reference {
                self.error(format!(
                    "ERROR cluster {cluster} refcount={refcount} reference={reference}"
                ));
            } else {
                self.report.leaks += 1;
                self.report.messages.push(format!(
                    "Leaked cluster {cluster} refcount={refcount} reference={reference}"
                ));
            }
        }
        highest
    }
}

/// Checks the image at `path` and, with `repair`, fixes its refcounts.
///
/// Repair sets every on-disk refcount to the number of references counted (`Leaks`: only
/// where the refcount is too high), clears the dirty bit, and checks again; the report then
/// gives what was fixed and what remains. Where setting refcounts in place is not safe (a
/// used cluster with a refcount of 0, a malformed or shared refcount block), `All` builds a
/// new refcount structure from the counted references, as qemu-img does, and `Leaks`
/// stops with qemu's "need to rebuild" error in [`CheckReport::failed`].
pub fn check(path: &Path, options: &OpenOptions, repair: RepairMode) -> Result<CheckReport> {
    crate::crypto::require_key(path, options)?;
    // qemu-img check -r all repairs a refcount block past the end of the file while it
    // counts (by growing the file), so that count runs on the writable file.
    let writable = if repair == RepairMode::All {
        Some(HostFile::open(path, true, options.cache, options.engine)?)
    } else {
        None
    };
    let counted = match &writable {
        Some(file) => count(path, file, true)?,
        None => {
            let file = HostFile::open(path, false, options.cache, options.engine)?;
            count(path, &file, false)?
        }
    };
    if repair == RepairMode::None {
        return Ok(counted.report);
    }
    if counted.report.corruptions_fixed > 0 {
        if let Some(file) = &writable {
            file.flush()?;
        }
    }
    let file = match writable {
        Some(file) => file,
        None => HostFile::open(path, true, options.cache, options.engine)?,
    };
    let header = crate::image::read_header(&file, file.len()?).map_err(|e| e.with_path(path))?;
    if header.incompatible_features & crate::header::incompat::CORRUPT != 0
        && repair != RepairMode::All
    {
        return Err(Error::corrupt(
            "check",
            "the image is marked corrupt; only a full repair (-r all) may write to it",
        )
        .with_path(path));
    }
    if counted.rebuild {
        return rebuild_and_check(path, options, &file, &header, counted, repair);
    }
    let Counted {
        report: before,
        copied,
        refs,
        ..
    } = counted;
    // qemu checks the COPIED flags once the refcounts are repaired (below), so the first
    // pass's findings about them are not printed.
    let mut messages = before.messages;
    messages.truncate(messages.len() - copied);
    let (mut leaks_fixed, mut corruptions_fixed) = (0u64, 0u64);
    let mut freed = Vec::new();
    let mut rc = Refcounts::load(&file, &header).map_err(|e| e.with_path(path))?;
    // References may point past the end of the file; refcount blocks this repair creates
    // must not land on those clusters either.
    rc.claim_below(refs.len() as u64);
    // qemu-img check compares the refcounts a second time while repairing and reports every
    // mismatch again: "Repairing" where it fixes one, its first words where it does not.
    let mut repairs = Vec::new();
    for (cluster, &reference) in refs.iter().enumerate() {
        let cluster = cluster as u64;
        let reference = u64::from(reference);
        let on_disk = rc.get(&file, cluster).map_err(|e| e.with_path(path))?;
        let fix = match repair {
            RepairMode::Leaks => on_disk > reference,
            _ => on_disk != reference,
        };
        // Refcount blocks created by this repair describe themselves; never zero them.
        let own = reference == 0 && rc.is_own_metadata(cluster);
        if on_disk != reference && !own {
            let word = if fix {
                "Repairing"
            } else if on_disk < reference {
                "ERROR"
            } else {
                "Leaked"
            };
            repairs.push(format!(
                "{word} cluster {cluster} refcount={on_disk} reference={reference}"
            ));
        }
        if fix && !own {
            rc.set(&file, cluster, reference)
                .map_err(|e| e.with_path(path))?;
            if on_disk > reference {
                leaks_fixed += 1;
                if reference == 0 {
                    freed.push(cluster);
                }
            } else {
                corruptions_fixed += 1;
            }
        }
    }
    rc.write_dirty(&file)?;
    file.flush()?;
    let cs = header.cluster_size();
    for cluster in freed {
        // Only once its refcount of 0 is on disk; best effort, as qemu's discard of a
        // cluster freed by the repair (the bytes may stay).
        let _ = file.punch_hole(cluster * cs, cs);
    }
    messages.append(&mut repairs);
    // The COPIED flags against the repaired refcounts, as qemu's check_oflag_copied: `All`
    // repairs them; `Leaks` only where nothing else is left wrong (the refcounts are then
    // known to be right).
    let settled = count(path, &file, false)?;
    let found = &settled.report.messages[settled.report.messages.len() - settled.copied..];
    let others = settled.report.corruptions - settled.copied as u64
        + settled.report.leaks
        + settled.report.check_errors;
    let fix_copied = !found.is_empty() && (repair == RepairMode::All || others == 0);
    messages.extend(found.iter().map(|m| {
        if fix_copied {
            m.replacen("ERROR", "Repairing", 1)
        } else {
            m.clone()
        }
    }));
    if fix_copied {
        corruptions_fixed += settled.copied as u64;
    }
    finish_repair(path, options, &file, &header, repair, fix_copied)?;
    drop(file);
    let file = HostFile::open(path, false, options.cache, options.engine)?;
    // What this second count finds was printed above (qemu does not count again).
    let mut after = count(path, &file, false)?.report;
    after.leaks_fixed = leaks_fixed;
    after.corruptions_fixed = before.corruptions_fixed + corruptions_fixed;
    after.messages = messages;
    Ok(after)
}

/// Clears the dirty bit (and with `All` the corrupt bit) and, with `All` or `copied`, sets
/// the COPIED flags from the now correct refcounts.
fn finish_repair(
    path: &Path,
    options: &OpenOptions,
    file: &HostFile,
    header: &Header,
    repair: RepairMode,
    copied: bool,
) -> Result<()> {
    let clear = crate::header::incompat::DIRTY
        | if repair == RepairMode::All {
            crate::header::incompat::CORRUPT
        } else {
            0
        };
    if header.version >= 3 && header.incompatible_features & clear != 0 {
        let features = header.incompatible_features & !clear;
        file.write_at(&features.to_be_bytes(), 72)?;
        file.flush()?;
    }
    if repair == RepairMode::All || copied {
        let rw = OpenOptions {
            writable: true,
            no_backing: true,
            policy: vdisk_block::FollowPolicy::Nothing,
            ..options.clone()
        };
        crate::image::Qcow2Image::open_for_repair(path, &rw)?.repair_copied()?;
    }
    Ok(())
}

/// The repair of an image whose refcounts cannot be set in place, as qemu-img's: `Leaks`
/// stops with "need to rebuild"; `All` writes a new refcount structure from the counted
/// references, frees the old one as leaked and repairs the COPIED flags.
fn rebuild_and_check(
    path: &Path,
    options: &OpenOptions,
    file: &HostFile,
    header: &Header,
    counted: Counted,
    repair: RepairMode,
) -> Result<CheckReport> {
    let Counted {
        report: before,
        copied,
        refs,
        ..
    } = counted;
    let mut messages = before.messages;
    messages.truncate(messages.len() - copied);
    // qemu's counts before the OFLAG_COPIED pass, which it never reaches here.
    let corruptions = before.corruptions - copied as u64;
    if repair != RepairMode::All {
        messages.push("ERROR need to rebuild refcount structures".to_string());
        return Ok(CheckReport {
            corruptions,
            leaks: before.leaks,
            check_errors: before.check_errors + 1,
            failed: Some("Input/output error".to_string()),
            messages,
            ..CheckReport::default()
        });
    }
    messages.push("Rebuilding refcount structure".to_string());
    rebuild(file, header, refs).map_err(|e| e.with_path(path))?;
    file.flush()?;
    let header = crate::image::read_header(file, file.len()?).map_err(|e| e.with_path(path))?;
    // The old refcount table and blocks are counted in the new structure but no longer
    // referenced: leaks, fixed (and discarded) at once as qemu does.
    let recount = count(path, file, false)?;
    let mut rc = Refcounts::load(file, &header).map_err(|e| e.with_path(path))?;
    let mut freed = Vec::new();
    for (cluster, &reference) in recount.refs.iter().enumerate() {
        let (cluster, reference) = (cluster as u64, u64::from(reference));
        let on_disk = rc.get(file, cluster).map_err(|e| e.with_path(path))?;
        if on_disk > reference {
            messages.push(format!(
                "Repairing cluster {cluster} refcount={on_disk} reference={reference}"
            ));
            rc.set(file, cluster, reference)
                .map_err(|e| e.with_path(path))?;
            if reference == 0 {
                freed.push(cluster);
            }
        } else if on_disk < reference {
            messages.push(format!(
                "ERROR cluster {cluster} refcount={on_disk} reference={reference}"
            ));
        }
    }
    if recount.rebuild {
        messages.push("ERROR rebuilt refcount structure is still broken".to_string());
    }
    rc.write_dirty(file)?;
    file.flush()?;
    let cs = header.cluster_size();
    for cluster in freed {
        // Best effort, as qemu's discard of a freed cluster: the bytes may stay.
        let _ = file.punch_hole(cluster * cs, cs);
    }
    // The COPIED flags qemu then repairs, in its words.
    let settled = count(path, file, false)?;
    let fixed_copied = settled.copied as u64;
    let report_messages = &settled.report.messages;
    messages.extend(
        report_messages[report_messages.len() - settled.copied..]
            .iter()
            .map(|m| m.replacen("ERROR", "Repairing", 1)),
    );
    finish_repair(path, options, file, &header, repair, true)?;
    let reader = HostFile::open(path, false, options.cache, options.engine)?;
    let mut after = count(path, &reader, false)?.report;
    // As qemu counts: what the counting pass still finds stays, the rest was fixed.
    let still = recount.report.corruptions - recount.copied as u64;
    // A refcount block past the end that was repaired by growing the file counts too.
    after.corruptions_fixed =
        corruptions.saturating_sub(still) + fixed_copied + before.corruptions_fixed;
    after.leaks_fixed = before.leaks;
    messages.append(&mut after.messages);
    after.messages = messages;
    Ok(after)
}

/// Writes a new refcount structure for the reference counts `refs` (one per host cluster)
/// and points the header at it, as qemu's `rebuild_refcount_structure`: refcount blocks
/// and then the table go to the first clusters no reference uses (so nothing in use is
/// overwritten), and the old structure is left for the caller to free.
fn rebuild(file: &HostFile, header: &Header, mut refs: Vec<u32>) -> Result<()> {
    let cs = header.cluster_size();
    let order = header.refcount_order;
    let max = crate::refcount::max_refcount(order);
    let per_block = (8 * cs) >> order;
    let mut table: Vec<u64> = Vec::new();
    let grew = write_refblocks(
        file, cs, order, max, per_block, &mut refs, &mut table, 0, None,
    )?;
    if !grew {
        return Err(Error::corrupt(
            "rebuild refcounts",
            "no cluster of the image is in use, not even its header",
        ));
    }
    let (offset, clusters) = loop {
        let clusters = (table.len() as u64 * 8).div_ceil(cs);
        let mut first_free = 0;
        let at = alloc_counted(&mut refs, clusters, &mut first_free)?;
        // The clusters the table takes now have a refcount: the blocks describing them
        // are written again (and the table may grow, needing a new place).
        let grew = write_refblocks(
            file,
            cs,
            order,
            max,
            per_block,
            &mut refs,
            &mut table,
            at,
            Some(at + clusters),
        )?;
        if !grew {
            break (at * cs, clusters);
        }
    };
    let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
    file.write_at(&raw, offset)?;
    file.flush()?;
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&offset.to_be_bytes());
    fields[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
    file.write_at(&fields, HEADER_REFTABLE)?;
    file.flush()?;
    Ok(())
}

/// Where the refcount table offset and its length in clusters are in the header.
const HEADER_REFTABLE: u64 = 48;

/// Takes the first `count` contiguous clusters with no references at or after
/// `first_free` (growing past the end), gives them one reference each, and returns the
/// first. `first_free` moves to the first free cluster seen.
fn alloc_counted(refs: &mut Vec<u32>, count: u64, first_free: &mut u64) -> Result<u64> {
    let mut cluster = *first_free;
    let mut run = 0u64;
    let mut first_gap = true;
    while cluster < refs.len() as u64 && run < count {
        if refs[cluster as usize] == 0 {
            run += 1;
            if first_gap {
                *first_free = cluster;
                first_gap = false;
            }
        } else {
            run = 0;
        }
        cluster += 1;
    }
    if run < count {
        let end = cluster + count - run;
        if end > MAX_TRACKED_CLUSTERS {
            return Err(Error::unsupported(
                "rebuild refcounts",
                format!(
                    "the new refcount structure would reach past cluster {MAX_TRACKED_CLUSTERS}"
                ),
            ));
        }
        refs.resize(end as usize, 0);
    }
    let start = cluster - run;
    for c in start..start + count {
        refs[c as usize] = 1;
    }
    Ok(start)
}

/// Writes the refcount block of every cluster in use in `[first, end)` (`None`: to the end
/// of `refs`), allocating the blocks that `table` has no place for yet; true when `table`
/// had to grow.
#[allow(clippy::too_many_arguments)]
fn write_refblocks(
    file: &HostFile,
    cs: u64,
    order: u32,
    max: u64,
    per_block: u64,
    refs: &mut Vec<u32>,
    table: &mut Vec<u64>,
    first: u64,
    end: Option<u64>,
) -> Result<bool> {
    let mut end = end.unwrap_or(refs.len() as u64);
    let mut first_free = 0u64;
    let mut grew = false;
    let mut cluster = first;
    while cluster < end {
        if refs.get(cluster as usize).copied().unwrap_or(0) == 0 {
            cluster += 1;
            continue;
        }
        let index = cluster / per_block;
        let start = index * per_block;
        let offset = match table.get(index as usize) {
            Some(&at) if at != 0 => at,
            _ => {
                // Never inside a block already written: its refcounts would be stale.
                first_free = first_free.max(start);
                let at = alloc_counted(refs, 1, &mut first_free)?;
                end = end.max(at + 1);
                if table.len() as u64 <= index {
                    let entries = ((index + 1) * 8).div_ceil(cs) * cs / 8;
                    table.resize(entries as usize, 0);
                    grew = true;
                }
                table[index as usize] = at * cs;
                at * cs
            }
        };
        let mut block = vec![0u8; cs as usize];
        for i in 0..per_block {
            if let Some(&r) = refs.get((start + i) as usize) {
                crate::refcount::set(&mut block, i, order, u64::from(r).min(max));
            }
        }
        file.write_at(&block, offset)?;
        cluster = start + per_block;
    }
    Ok(grew)
}

/// Counts references in the image open as `file`. With `grow` (`file` open for writing,
/// `check -r all`), a refcount block past the end of the file is repaired as qemu does:
/// the file grows to hold it.
fn count(path: &Path, file: &HostFile, grow: bool) -> Result<Counted> {
    let file_len = file.len()?;
    let header = crate::image::read_header(file, file_len).map_err(|e| e.with_path(path))?;
    let cs = header.cluster_size();
    let file_clusters = file_len.div_ceil(cs);
    if file_clusters > MAX_TRACKED_CLUSTERS {
        return Err(Error::unsupported(
            "check",
            format!(
                "the image file has {file_clusters} clusters; check tracks at most {MAX_TRACKED_CLUSTERS}"
            ),
        )
        .with_path(path));
    }
    // A bitmap directory that does not parse makes qemu refuse to open the image, and so
    // to check it; a report of no errors would be wrong.
    crate::bitmap::read_directory(file, &header).map_err(|e| e.with_path(path))?;
    let rc = RefcountReader::new(file, &header).map_err(|e| e.with_path(path))?;
    let mut c = Counter {
        file,
        file_len,
        grow,
        header: &header,
        refs: vec![0; file_clusters as usize],
        report: CheckReport::default(),
        copied_errors: Vec::new(),
        rc,
        rebuild: false,
    };
    c.inc(0, cs);
    c.l1(header.l1_table_offset, header.l1_size, true)?;
    match snapshot::read_entries(file, &header) {
        Ok((snapshots, table_bytes)) => {
            let total: u64 = snapshots.iter().map(|sn| u64::from(sn.l1_size) * 8).sum();
            for (i, sn) in snapshots.iter().enumerate() {
                // Version 3 requires the extra data to hold the VM state and disk sizes
                // (qemu's check reports a shorter entry the same way).
                let extra = sn
                    .raw
                    .get(36..40)
                    .map_or(0, |x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]));
                if header.version >= 3 && extra < 16 {
                    c.error(format!("ERROR snapshot table entry {i} is incomplete"));
                }
                // A snapshot whose L1 table cannot be read is reported and skipped, as
                // qemu-img check does, so its clusters count as leaks like in qemu.
                if let Err(e) = snapshot::check_l1(i, sn, &header) {
                    c.error(format!(
                        "ERROR snapshot {} ({}): {}; snapshot table entry corrupted",
                        sn.id,
                        sn.name,
                        e.message()
                    ));
                    continue;
                }
                if total > snapshot::MAX_TOTAL_L1_BYTES {
                    c.report.check_errors += 1;
                    c.report.messages.push(format!(
                        "ERROR snapshot {} ({}): not checked, the snapshots' L1 tables take {total} bytes together",
                        sn.id, sn.name
                    ));
                    continue;
                }
                c.l1(sn.l1_table_offset, sn.l1_size, false)?;
            }
            c.inc(header.snapshots_offset, table_bytes);
        }
        Err(e) => c.error(format!("ERROR {}", e.message())),
    }
    c.inc(
        header.refcount_table_offset,
        u64::from(header.refcount_table_clusters) * cs,
    );
    if let Some(crypto) = header.extensions.crypto {
        c.inc(crypto.offset, crypto.length);
    }
    c.bitmaps()?;
    c.refblocks();
    let highest = c.compare();
    let mut copied = std::mem::take(&mut c.copied_errors);
    let copied_count = copied.len();
    c.report.messages.append(&mut copied);
    let refs = std::mem::take(&mut c.refs);
    let rebuild = c.rebuild;
    let mut report = c.report;
    report.image_end_offset = Some(highest.map_or(0, |h| (h + 1) * cs));
    // QEMU counts whole 512-byte sectors of the virtual size.
    report.total_clusters = Some((header.size / 512 * 512).div_ceil(cs));
    for field in [
        &mut report.allocated_clusters,
        &mut report.fragmented_clusters,
        &mut report.compressed_clusters,
    ] {
        field.get_or_insert(0);
    }
    Ok(Counted {
        report,
        copied: copied_count,
        refs,
        rebuild,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdisk_block::{BlockDev, CacheMode, CreateOptions, EngineChoice, Format};

    fn be64(bytes: &[u8], at: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&bytes[at..at + 8]);
        u64::from_be_bytes(a)
    }

    #[test]
    fn references_past_the_end_of_the_file_are_corruptions_not_counted() {
        // Found by the qcow2 fuzz target: an L2 entry naming cluster 2^24 of a 3 KiB file
        // made check grow its reference array to 2^24 entries and compare every one of them.
        let dir = std::env::temp_dir().join(format!("vdisk-qcow2-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        let path = dir.join("far.qcow2");
        let options = CreateOptions {
            size: 2 << 20,
            options: CreateOptions::parse_options("cluster_size=512").expect("options"),
        };
        crate::Qcow2Format.create(&path, options).expect("create");
        {
            let img = crate::Qcow2Image::open(&path, &OpenOptions::read_write()).expect("open");
            img.write_at(&[1; 512], 0).expect("write");
            img.flush().expect("flush");
        }
        let mut bytes = std::fs::read(&path).expect("read");
        let l1 = be64(&bytes, 40) as usize;
        let l2 = (be64(&bytes, l1) & OFFSET_MASK) as usize;
        bytes[l2..l2 + 8].copy_from_slice(&(COPIED | (1u64 << 24) << 9).to_be_bytes());
        std::fs::write(&path, &bytes).expect("write");

        let file = HostFile::open(&path, false, CacheMode::Writeback, EngineChoice::Sync)
            .expect("open file");
        let Counted { report, refs, .. } = count(&path, &file, false).expect("count");
        assert!(report.corruptions >= 1, "{report:?}");
        assert!(
            report
                .messages
                .iter()
                .any(|m| m.contains("exceeding the end of the file by one cluster or more")),
            "{:?}",
            report.messages
        );
        // Only what the file can hold is tracked.
        assert!(refs.len() as u64 <= (bytes.len() as u64).div_ceil(512) + 1);
        drop(file);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
