//! Expanding v3 zero clusters for a downgrade to compat=0.10, whose readers do not know
//! the zero flag.
//!
//! As QEMU does: a zero cluster without a host cluster becomes unallocated when there is
//! no backing file (it reads as zeroes either way) and a newly allocated zero-filled
//! cluster otherwise; a preallocated zero cluster keeps its host cluster, which is
//! zero-filled. Unlike QEMU, no L2 table is changed in place: every table that changes is
//! copied to a new cluster and every L1 table that pointed to it (active or snapshot) is
//! redirected, so a table shared with a snapshot keeps reading the same for everyone, and
//! nothing the old header reaches changes before the new header is written. A
//! preallocated cluster is zero-filled in place only when zero entries are its only
//! references (all of them then read zeroes before and after); otherwise the zero entries
//! let go of it and are expanded as if they had no host cluster.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use vdisk_block::{HostFile, Result};

use super::state::{corrupt, l2_of, read_u64s, Refs, State};
use crate::entry::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};

/// Hands out clusters past everything the image uses.
pub(crate) struct Bump {
    pub cluster_bits: u32,
    /// The next free cluster index.
    pub next: u64,
}

impl Bump {
    /// Byte offset of `n` new contiguous clusters.
    pub fn take(&mut self, n: u64) -> u64 {
        let at = self.next << self.cluster_bits;
        self.next += n;
        at
    }
}

/// What a downgrade changes in the L2 tables.
#[derive(Default)]
pub(crate) struct Expansion {
    /// New L2 tables by their new host offset.
    pub overlay: HashMap<u64, Vec<u64>>,
    /// Old L2 table offset → the offset of its expanded copy.
    pub redirect: HashMap<u64, u64>,
    /// Preallocated zero clusters to zero-fill in place.
    pub fill: Vec<u64>,
    /// New zero-filled clusters (past the old end of the file).
    pub new_data: Vec<u64>,
    /// Whether any L1 table reaches a compressed cluster.
    pub has_compressed: bool,
}

/// Plans the expansion of every zero cluster reachable from any L1 table of `state`.
pub(crate) fn plan(
    file: &HostFile,
    state: &State,
    old_refs: &Refs,
    backing: bool,
    alloc: &mut Bump,
) -> Result<Expansion> {
    let h = &state.header;
    let cs = h.cluster_size();
    // Each L2 table with the number of L1 entries (paths) that reach it.
    let mut tables: BTreeMap<u64, u32> = BTreeMap::new();
    for l1 in state.l1s() {
        for &entry in &l1.entries {
            if let Some(l2) = l2_of(entry, cs)? {
                *tables.entry(l2).or_default() += 1;
            }
        }
    }
    let mut out = Expansion::default();
    // References to preallocated zero clusters that come from zero entries.
    let mut zero_refs: HashMap<u64, u64> = HashMap::new();
    let mut with_zeroes = BTreeSet::new();
    for (&l2, &paths) in &tables {
        let table = read_u64s(file, l2, cs / 8, "an L2 table")?;
        for &e in &table {
            if e & COMPRESSED != 0 {
                out.has_compressed = true;
            } else if e & ZERO != 0 {
                with_zeroes.insert(l2);
                let host = e & OFFSET_MASK;
                if host != 0 {
                    if host & (cs - 1) != 0 {
                        return Err(corrupt(format!(
                            "L2 entry {e:#x} is not cluster aligned; run 'qemu-img check -r all' first"
                        )));
                    }
                    *zero_refs.entry(host).or_default() += u64::from(paths);
                }
            }
        }
    }
    let fillable = |host: u64| zero_refs.get(&host) == Some(&old_refs.get(host / cs));
    let mut filled = BTreeSet::new();
    for &l2 in &with_zeroes {
        let paths = tables.get(&l2).copied().unwrap_or(0);
        let mut table = read_u64s(file, l2, cs / 8, "an L2 table")?;
        for e in table.iter_mut() {
            if *e & (COMPRESSED | ZERO) != ZERO {
                continue;
            }
            let host = *e & OFFSET_MASK;
            *e = if host != 0 && fillable(host) {
                filled.insert(host);
                host | (*e & COPIED)
            } else if !backing {
                0
            } else {
                let fresh = alloc.take(1);
                out.new_data.push(fresh);
                // Every path through this table references the new cluster.
                fresh | if paths == 1 { COPIED } else { 0 }
            };
        }
        let copy = alloc.take(1);
        out.overlay.insert(copy, table);
        out.redirect.insert(l2, copy);
    }
    out.fill = filled.into_iter().collect();
    Ok(out)
}
