//! Whether an image looks metadata-preallocated, decided as QEMU decides it.
//!
//! QEMU's block status looks through a data cluster to the host file (reporting a hole
//! there as zeroes) only for images it judges metadata-preallocated: those whose refcounts
//! claim clearly more clusters than the host file really stores. Elsewhere a data cluster
//! is data, even where a copy-on-write left a host hole in it. `qemu-img map` and the
//! allocation decisions of `convert` follow that judgement, so vdisk makes the same one.

use vdisk_block::{HostFile, Result};

use crate::header::Header;
use crate::refcount::RefcountReader;

/// True when more clusters are refcounted than the file holds, by QEMU's margin (a ninth
/// more, and at least two). The scan stops at that threshold, so it reads no more refcount
/// blocks than the allocated part of the file needs.
pub fn looks_preallocated(file: &HostFile, header: &Header) -> Result<bool> {
    let cluster = header.cluster_size();
    let real_clusters = file.allocated_bytes()? / cluster;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = file.len()?.div_ceil(cluster);
    let mut reader = RefcountReader::new(file, header)?;
    let mut counted = 0u64;
    let mut i = 0u64;
    while i < end_cluster && counted < threshold {
        counted += u64::from(reader.refcount(i)? != 0);
        i += 1;
    }
    Ok(counted >= threshold)
}
