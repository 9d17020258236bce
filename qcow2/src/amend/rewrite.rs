//! Amend operations that rewrite metadata: a downgrade to compat=0.10 (zero clusters
//! expanded, bitmaps dropped) and a change of the refcount width.
//!
//! Crash safety, in the order of DESIGN.md: every new structure (expanded L2 tables, L1
//! tables that point to them, the snapshot table, the refcount blocks and table) goes to
//! clusters past everything in use and is flushed before one header write switches to it.
//! Until that write the old image is untouched (zero-filling a preallocated zero cluster
//! in place changes no content: every reference to it reads zeroes before and after);
//! after it, the old structures are unreferenced clusters with a refcount of zero.
//!
//! The new refcounts are the references counted in the new state plus the leaks of the
//! old one (refcount above references), kept as QEMU keeps them.

use std::collections::HashMap;

use vdisk_block::{Error, HostFile, Result};

use super::refblocks;
use super::state::{count, count_refcount_structures, encode_u64s, l2_of, L2Source, Refs, State};
use super::zero::{self, Bump, Expansion};
use crate::entry::{COMPRESSED, COPIED, OFFSET_MASK};
use crate::header::{CompressionType, Header};
use crate::refcount::RefcountReader;

/// What the rewrite does besides writing `target`'s options.
pub(crate) struct Rewrite<'a> {
    /// The header to end with (offsets of the tables are filled in here).
    pub target: Header,
    /// Expand zero clusters and drop bitmaps (a downgrade to version 2).
    pub downgrade: bool,
    /// What an expanded zero cluster holds on disk.
    pub zero_fill: ZeroFill<'a>,
}

/// The bytes of a zero cluster made real by a downgrade.
#[derive(Clone, Copy)]
pub(crate) enum ZeroFill<'a> {
    /// Plain zeroes (unencrypted images).
    Plain,
    /// Zeroes encrypted as a LUKS qcow2 stores them (IVs from host sectors): plain zeroes
    /// would decrypt to garbage.
    Luks(&'a vdisk_luks::SectorCipher),
    /// Legacy AES, whose IVs come from guest sectors that the expansion does not track.
    Refuse,
}

/// Rewrites the image in `file` from `old` to `job.target`.
pub(crate) fn run(file: &HostFile, old: &State, job: Rewrite) -> Result<()> {
    let h = &old.header;
    let cs = h.cluster_size();
    let cb = h.cluster_bits;
    let none = HashMap::new();
    let mut old_refs = count(
        old,
        &L2Source {
            file,
            cluster_size: cs,
            overlay: &none,
        },
    )?;
    let mut reader = RefcountReader::new(file, h)?;
    let old_table = reader.table().to_vec();
    count_refcount_structures(&mut old_refs, h, &old_table)?;
    let span = file.len()?.div_ceil(cs).max(old_refs.counts.len() as u64);
    if span > crate::check::MAX_TRACKED_CLUSTERS {
        return Err(Error::unsupported(
            "amend",
            format!(
                "the image file has {span} clusters; amend tracks at most {}",
                crate::check::MAX_TRACKED_CLUSTERS
            ),
        ));
    }
    let mut leaks: HashMap<u64, u64> = HashMap::new();
    for c in 0..span {
        let on_disk = reader.refcount(c)?;
        let refs = old_refs.get(c);
        if on_disk < refs {
            return Err(Error::corrupt(
                "amend",
                format!(
                    "cluster {c} has a refcount of {on_disk} but {refs} references; run 'qemu-img check -r all' first"
                ),
            ));
        }
        if on_disk > refs {
            leaks.insert(c, on_disk - refs);
        }
    }
    let mut alloc = Bump {
        cluster_bits: cb,
        next: span,
    };
    let backing = h.backing_file.is_some();
    let mut exp = if job.downgrade {
        zero::plan(file, old, &old_refs, backing, &mut alloc)?
    } else {
        Expansion::default()
    };
    let expands = !exp.fill.is_empty() || !exp.new_data.is_empty();
    if expands && matches!(job.zero_fill, ZeroFill::Refuse) {
        return Err(Error::unsupported(
            "amend",
            "Cannot downgrade a legacy AES-encrypted image that has zero clusters",
        ));
    }
    if job.downgrade && exp.has_compressed && h.compression_type == CompressionType::Zstd {
        return Err(Error::unsupported(
            "amend",
            "Cannot downgrade an image with zstd compression type and existing compressed clusters",
        ));
    }

    let mut new = old.clone();
    let mut target = job.target;
    if job.downgrade {
        new.bitmap_dir = None;
        new.bitmap_tables.clear();
    }
    for l1 in std::iter::once(&mut new.active).chain(new.snapshot_l1s.iter_mut()) {
        for e in l1.entries.iter_mut() {
            if let Some(to) = l2_of(*e, cs)?.and_then(|l2| exp.redirect.get(&l2)) {
                *e = (*e & !OFFSET_MASK) | to;
            }
        }
    }
    // References of the L2 tables and data, which the placement of L1 tables cannot change.
    let data_refs = count(
        &new,
        &L2Source {
            file,
            cluster_size: cs,
            overlay: &exp.overlay,
        },
    )?;
    fix_copied(
        file,
        &mut new,
        &mut exp.overlay,
        &data_refs,
        &leaks,
        &mut alloc,
    )?;

    if new.active.entries != old.active.entries {
        new.active.offset = alloc.take(table_clusters(new.active.entries.len(), cs));
        target.l1_table_offset = new.active.offset;
    }
    let mut moved = false;
    for (i, l1) in new.snapshot_l1s.iter_mut().enumerate() {
        if l1.entries != old.snapshot_l1s[i].entries {
            l1.offset = alloc.take(table_clusters(l1.entries.len(), cs));
            let sn = &mut new.snapshots[i];
            sn.l1_table_offset = l1.offset;
            if sn.raw.len() < 8 {
                return Err(Error::corrupt(
                    "amend",
                    "a snapshot table entry is too short",
                ));
            }
            sn.raw[..8].copy_from_slice(&l1.offset.to_be_bytes());
            moved = true;
        }
    }
    let snapshot_table: Vec<u8> = new.snapshots.iter().flat_map(|s| s.raw.clone()).collect();
    if moved {
        target.snapshots_offset = alloc.take((snapshot_table.len() as u64).div_ceil(cs));
    }
    new.header = target.clone();

    let refs = count(
        &new,
        &L2Source {
            file,
            cluster_size: cs,
            overlay: &exp.overlay,
        },
    )?;
    let mut refcounts: Vec<u64> = (0..refs.counts.len().max(span as usize) as u64)
        .map(|c| refs.get(c) + leaks.get(&c).copied().unwrap_or(0))
        .collect();
    let layout = refblocks::plan(&mut refcounts, alloc.next, cb, target.refcount_order)?;
    target.refcount_table_offset = layout.table_offset();
    target.refcount_table_clusters = u32::try_from(layout.table_clusters)
        .map_err(|_| Error::unsupported("amend", "the new refcount table is too large"))?;
    let header_bytes = super::encode_header(&target, h)?;

    // Everything new, then one flush, then the header.
    let end = layout.end_cluster() << cb;
    if file.len()? < end {
        file.set_len(end)?;
    }
    match job.zero_fill {
        ZeroFill::Luks(cipher) => {
            let mut sealed = zeroize::Zeroizing::new(vec![0u8; cs as usize]);
            for &at in exp.fill.iter().chain(&exp.new_data) {
                sealed.fill(0);
                cipher.encrypt(at / 512, &mut sealed)?;
                file.write_at(&sealed, at)?;
            }
        }
        ZeroFill::Plain | ZeroFill::Refuse => {
            for &at in &exp.fill {
                file.write_zero_bytes(at, cs)?;
            }
        }
    }
    for (&at, table) in &exp.overlay {
        file.write_at(&encode_u64s(table), at)?;
    }
    if new.active.offset != old.active.offset {
        file.write_at(&encode_u64s(&new.active.entries), new.active.offset)?;
    }
    for (i, l1) in new.snapshot_l1s.iter().enumerate() {
        if l1.offset != old.snapshot_l1s[i].offset {
            file.write_at(&encode_u64s(&l1.entries), l1.offset)?;
        }
    }
    if moved {
        file.write_at(&snapshot_table, target.snapshots_offset)?;
    }
    refblocks::write(file, &layout, &refcounts)?;
    file.flush()?;
    header_bytes.write(file)
}

fn table_clusters(entries: usize, cs: u64) -> u64 {
    (entries as u64 * 8).div_ceil(cs).max(1)
}

/// Sets the COPIED flags of the active L1 table and of the L2 tables it reaches to what
/// the new refcounts say (a zero entry that let go of a shared cluster can leave another
/// reference as the only one). An L2 table that needs a change and is not new yet is
/// copied, never changed in place.
fn fix_copied(
    file: &HostFile,
    new: &mut State,
    overlay: &mut HashMap<u64, Vec<u64>>,
    refs: &Refs,
    leaks: &HashMap<u64, u64>,
    alloc: &mut Bump,
) -> Result<()> {
    let h = new.header.clone();
    if h.has_data_file() {
        // Data clusters have no refcounts here; their flags stay as they are.
        return Ok(());
    }
    let cs = h.cluster_size();
    let rc = |c: u64| refs.get(c) + leaks.get(&c).copied().unwrap_or(0);
    let width = if h.extended_l2() { 2 } else { 1 };
    for e in new.active.entries.iter_mut() {
        let Some(l2) = l2_of(*e, cs)? else { continue };
        let mut table = L2Source {
            file,
            cluster_size: cs,
            overlay,
        }
        .get(l2)?;
        let mut changed = false;
        for entry in table.iter_mut().step_by(width) {
            let host = *entry & OFFSET_MASK;
            if *entry & COMPRESSED != 0 || host == 0 {
                continue;
            }
            let want = rc(host / cs) == 1;
            if want != (*entry & COPIED != 0) {
                *entry ^= COPIED;
                changed = true;
            }
        }
        let mut l2_rc = rc(l2 / cs);
        if changed {
            if overlay.contains_key(&l2) {
                overlay.insert(l2, table);
            } else {
                let copy = alloc.take(1);
                overlay.insert(copy, table);
                *e = (*e & !OFFSET_MASK) | copy;
                l2_rc = 1;
            }
        }
        *e = if l2_rc == 1 {
            *e | COPIED
        } else {
            *e & !COPIED
        };
    }
    Ok(())
}
