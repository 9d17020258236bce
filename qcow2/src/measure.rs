//! `qemu-img measure` for qcow2 targets: the host bytes a new image needs, computed as QEMU's
//! `qcow2_measure` does, so both tools print the same numbers.
//!
//! The fully allocated size is the header, the L2 tables that map every guest cluster, the
//! L1 table that points to them, and the refcount table and blocks that count all of that
//! (themselves included), plus the data clusters. The required size keeps the metadata of
//! the fully allocated image but only the data clusters the source actually holds: every
//! cluster in which the source's chain reports data (not zeroes) counts whole. With a
//! backing file, or with `falloc`/`full` preallocation, every data cluster counts.

use std::sync::Arc;

use vdisk_block::dev::InfoValue;
use vdisk_block::format::{parse_bool, Measurement};
use vdisk_block::{BlockDev, CreateOptions, Error, Preallocation, Result};

use crate::header::{
    MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS,
};

/// qemu rounds every device length up to whole 512-byte sectors.
const SECTOR: u64 = 512;

fn invalid(message: impl Into<String>) -> Error {
    Error::invalid("measure", message)
}

/// The target options `measure` looks at, validated in the order QEMU validates them so
/// that the first complaint is the same one.
struct Target {
    cluster_bits: u32,
    version: u32,
    refcount_order: u32,
    extended_l2: bool,
    prealloc: Preallocation,
    has_backing_file: bool,
    size: u64,
    /// Host bytes of the LUKS header region (`encrypt.format=luks`), whole clusters.
    luks_region: u64,
}

fn target(mut options: CreateOptions) -> Result<Target> {
    if let Some(bad) = options
        .options
        .keys()
        .find(|k| !crate::create::OPTIONS.iter().any(|(name, _)| name == k))
    {
        return Err(invalid(format!("Invalid parameter '{bad}'")));
    }
    let extended_l2 = match options.take("extended_l2") {
        Some(v) => parse_bool("extended_l2", &v)?,
        None => false,
    };
    let cluster_size = options.take_size("cluster_size")?.unwrap_or(65536);
    let cluster_bits = cluster_size.trailing_zeros();
    if !cluster_size.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits)
    {
        return Err(invalid(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if extended_l2 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
        return Err(invalid(format!(
            "Extended L2 entries are only supported with cluster sizes of at least {} bytes",
            1u64 << MIN_EXTENDED_L2_CLUSTER_BITS
        )));
    }
    // Unlike `create`, qemu's measure knows only the two historic spellings.
    let version = match options.take("compat").as_deref() {
        None | Some("1.1") => 3,
        Some("0.10") => 2,
        Some(other) => return Err(invalid(format!("Invalid compatibility level: '{other}'"))),
    };
    let refcount_bits = match options.take("refcount_bits") {
        None => 16,
        Some(v) => v.parse::<u64>().map_err(|_| {
            invalid(format!(
                "Parameter 'refcount_bits' expects a number, not '{v}'"
            ))
        })?,
    };
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if version < 3 && refcount_bits != 16 {
        return Err(invalid(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ));
    }
    // qemu sizes the LUKS header with the real options (so the secret must exist).
    let luks_region = match crate::crypto::take_new_encryption(&mut options)
        .map_err(|e| Error::invalid("measure", e.message().to_string()))?
    {
        crate::crypto::NewEncryption::Luks(v) => {
            let (_, payload) = vdisk_luks::header::new_layout(v.cipher.key_bytes() as u32);
            (u64::from(payload) * 512).next_multiple_of(1u64 << cluster_bits)
        }
        _ => 0,
    };
    let prealloc = match options.take("preallocation") {
        None => Preallocation::Off,
        Some(v) => match v.as_str() {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => return Err(invalid(format!("invalid parameter value: {v}"))),
        },
    };
    // qemu only asks whether the option was given; even an empty name counts.
    let has_backing_file = options.take("backing_file").is_some();
    let cs = 1u64 << cluster_bits;
    let size = options
        .size
        .checked_next_multiple_of(cs)
        .ok_or_else(|| invalid("The image size is too large"))?;
    let l2_entry = if extended_l2 { 16 } else { 8 };
    let l2_tables = (size / cs).div_ceil(cs / l2_entry);
    if l2_tables * 8 > MAX_L1_BYTES {
        return Err(invalid(
            "The image size is too large (try using a larger cluster size)",
        ));
    }
    Ok(Target {
        cluster_bits,
        version,
        refcount_order: refcount_bits.trailing_zeros(),
        extended_l2,
        prealloc,
        has_backing_file,
        size,
        luks_region,
    })
}

/// Measures a qcow2 image made with `options`, empty or holding `source`'s contents.
pub fn measure(options: CreateOptions, source: Option<&dyn BlockDev>) -> Result<Measurement> {
    let t = target(options)?;
    let cs = 1u64 << t.cluster_bits;
    let too_large = || invalid("The image size is too large");
    let (virtual_size, mut required) = match source {
        None => (t.size, 0),
        Some(dev) => {
            let len = sectors(dev.size());
            let virtual_size = len.checked_next_multiple_of(cs).ok_or_else(too_large)?;
            let required = if t.has_backing_file {
                // The new image's backing file may share nothing with the source, so every
                // cluster may have to be written.
                virtual_size
            } else {
                allocated_clusters_bytes(dev, len, cs)?
            };
            (virtual_size, required)
        }
    };
    if matches!(t.prealloc, Preallocation::Falloc | Preallocation::Full) {
        required = virtual_size;
    }
    let fully_allocated = prealloc_size(
        virtual_size,
        t.cluster_bits,
        t.refcount_order,
        t.extended_l2,
    )
    .ok_or_else(too_large)?;
    // The metadata of the fully allocated image stays counted: qemu overestimates the
    // required size the same way.
    let required = fully_allocated - virtual_size + required + t.luks_region;
    let fully_allocated = fully_allocated + t.luks_region;
    let bitmaps = match source {
        Some(dev) if t.version >= 3 => {
            source_bitmaps(dev)?.map(|list| bitmaps_size(&list, dev.size(), cs))
        }
        _ => None,
    };
    Ok(Measurement {
        required,
        fully_allocated,
        bitmaps,
    })
}

fn sectors(n: u64) -> u64 {
    n.checked_next_multiple_of(SECTOR).unwrap_or(n)
}

/// QEMU's `qcow2_calc_prealloc_size`: every byte of an image of `size` guest bytes with
/// every cluster allocated. `None` when the answer does not fit in 64 bits.
pub fn prealloc_size(
    size: u64,
    cluster_bits: u32,
    refcount_order: u32,
    extended_l2: bool,
) -> Option<u64> {
    let cs = 1u128 << cluster_bits;
    let l2_entry: u128 = if extended_l2 { 16 } else { 8 };
    let aligned = u128::from(size).next_multiple_of(cs);
    // Header: one cluster.
    let mut meta = cs;
    let l2_entries = (aligned / cs).next_multiple_of(cs / l2_entry);
    meta += l2_entries * l2_entry;
    let l1_entries = (l2_entries * l2_entry / cs).next_multiple_of(cs / 8);
    meta += l1_entries * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_order);
    u64::try_from(meta + aligned).ok()
}

/// QEMU's `qcow2_refcount_metadata_size` (without the generous increase): the bytes of
/// refcount table and blocks needed to count `clusters` clusters plus themselves, found as
/// the fixed point of the count.
fn refcount_metadata_size(clusters: u128, cs: u128, refcount_order: u32) -> u128 {
    let per_table_cluster = cs / 8;
    let per_block = cs * 8 / (1u128 << refcount_order);
    let (mut table, mut blocks) = (0u128, 0u128);
    let mut n = 0u128;
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

/// The bytes of whole target clusters in which `dev` (with its backing chain) holds data,
/// counted cluster by cluster over its first `len` bytes as QEMU walks the block status.
fn allocated_clusters_bytes(dev: &dyn BlockDev, len: u64, cs: u64) -> Result<u64> {
    let mut required = 0u64;
    let mut offset = 0u64;
    while offset < len {
        let (run, data) = chain_status(dev, offset, len - offset)?;
        let mut pnum = run;
        if data {
            // A data run claims its clusters whole; the walk resumes at the next cluster.
            let end = (offset + pnum)
                .checked_next_multiple_of(cs)
                .unwrap_or(u64::MAX);
            pnum = end - offset;
            required = required.saturating_add(offset % cs + pnum);
        }
        offset = offset.saturating_add(pnum);
    }
    Ok(required)
}

/// The length of the run at `offset` (at most `len`) and whether it holds data in some
/// layer of the chain (`false`: it reads as zeroes, known or by falling off the chain).
fn chain_status(top: &dyn BlockDev, offset: u64, len: u64) -> Result<(u64, bool)> {
    let mut below: Option<Arc<dyn BlockDev>> = None;
    let mut len = len;
    loop {
        let layer: &dyn BlockDev = below.as_deref().unwrap_or(top);
        let size = layer.size();
        if offset >= size {
            // Only the partial last sector of the top device gets here: it reads as zeroes.
            return Ok((len, false));
        }
        let asked = len.min(size - offset);
        if layer.info()?.format == "vhdx" {
            // QEMU's VHDX driver has no block status, so its block layer reports every
            // byte of a VHDX image as data and `qemu-img measure` counts it all.
            return Ok((asked, true));
        }
        let st = layer.block_status(offset, asked)?;
        // Every step must advance inside what was asked, or the walk could loop or overrun.
        if st.len == 0 || st.len > asked || st.offset != offset {
            return Err(Error::corrupt(
                "measure",
                format!(
                    "the driver described {}+{} when asked for {offset}+{asked}",
                    st.offset, st.len
                ),
            )
            .at_offset(offset));
        }
        if st.zero {
            return Ok((st.len, false));
        }
        if st.data {
            return Ok((st.len, true));
        }
        len = st.len;
        match layer.backing() {
            Some(next) if offset < next.size() => below = Some(next),
            _ => return Ok((st.len, false)),
        }
    }
}

/// The persistent dirty bitmaps of `dev` as (name, granularity), or `None` when `dev`
/// cannot hold persistent bitmaps at all (only qcow2 version 3 images can).
fn source_bitmaps(dev: &dyn BlockDev) -> Result<Option<Vec<(String, u64)>>> {
    if dev.info()?.format != "qcow2" {
        return Ok(None);
    }
    let Some(specific) = dev.format_specific()? else {
        return Ok(None);
    };
    let field = |key: &str| specific.data.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    if !matches!(field("compat"), Some(InfoValue::Text(c)) if c == "1.1") {
        return Ok(None);
    }
    let mut out = Vec::new();
    if let Some(InfoValue::List(list)) = field("bitmaps") {
        for item in list {
            let InfoValue::Map(entries) = item else {
                continue;
            };
            let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
            if let (Some(InfoValue::Text(name)), Some(InfoValue::UInt(granularity))) =
                (get("name"), get("granularity"))
            {
                out.push((name.clone(), *granularity));
            }
        }
    }
    Ok(Some(out))
}

/// QEMU's `qcow2_get_persistent_dirty_bitmap_size`: room for each bitmap as if every bit
/// were set (data clusters and their table), plus the directory, in clusters of `cs`.
fn bitmaps_size(bitmaps: &[(String, u64)], disk_size: u64, cs: u64) -> u64 {
    let mut size = 0u64;
    let mut dir = 0u64;
    for (name, granularity) in bitmaps {
        let bits = disk_size.div_ceil((*granularity).max(1));
        let clusters = bits.div_ceil(8).div_ceil(cs);
        size = size.saturating_add(clusters.saturating_mul(cs));
        size = size.saturating_add(
            clusters
                .saturating_mul(8)
                .checked_next_multiple_of(cs)
                .unwrap_or(u64::MAX),
        );
        // A directory entry: 24 fixed bytes and the name, padded to 8.
        dir += (24 + name.len() as u64).next_multiple_of(8);
    }
    size.saturating_add(dir.next_multiple_of(cs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_images_match_qemu_numbers() {
        // Numbers printed by qemu-img 10 `measure -O qcow2 --size ...`.
        let m = |size: u64, opts: &str| {
            measure(
                CreateOptions {
                    size,
                    options: CreateOptions::parse_options(opts).expect("options"),
                },
                None,
            )
            .expect("measure")
        };
        let ten_g = m(10 << 30, "");
        assert_eq!(
            (ten_g.required, ten_g.fully_allocated),
            (1900544, 10739318784)
        );
        let one_g = m(1 << 30, "");
        assert_eq!(
            (one_g.required, one_g.fully_allocated),
            (393216, 1074135040)
        );
        let ext = m(1 << 30, "extended_l2=on");
        assert_eq!((ext.required, ext.fully_allocated), (524288, 1074266112));
        let falloc = m(1 << 30, "preallocation=falloc");
        assert_eq!(falloc.required, 1074135040);
        let zero = m(0, "cluster_size=2M,extended_l2=on");
        assert_eq!((zero.required, zero.fully_allocated), (6291456, 6291456));
        assert_eq!(ten_g.bitmaps, None);
    }

    #[test]
    fn bad_values_are_refused_with_qemu_words() {
        for (opts, size, needle) in [
            (
                "cluster_size=3000",
                1 << 30,
                "power of two between 512 and 2048k",
            ),
            (
                "refcount_bits=3",
                1 << 30,
                "Refcount width must be a power of two",
            ),
            ("compat=v3", 1 << 30, "Invalid compatibility level: 'v3'"),
            (
                "compat=0.10,refcount_bits=8",
                1 << 30,
                "use compat=1.1 or greater",
            ),
            (
                "preallocation=bogus",
                1 << 30,
                "invalid parameter value: bogus",
            ),
            (
                "extended_l2=on,cluster_size=4k",
                1 << 30,
                "at least 16384 bytes",
            ),
            ("cluster_size=512", 2 << 40, "The image size is too large"),
            ("bogus=1", 1, "Invalid parameter 'bogus'"),
        ] {
            let err = measure(
                CreateOptions {
                    size,
                    options: CreateOptions::parse_options(opts).expect("options"),
                },
                None,
            )
            .expect_err(opts);
            assert!(err.to_string().contains(needle), "{opts}: {err}");
        }
    }

    #[test]
    fn bitmap_room_counts_data_table_and_directory() {
        // One 64 MiB bitmap of 64 KiB granularity needs one data cluster, one table
        // cluster and one directory cluster (qemu prints 196608 for it).
        assert_eq!(
            bitmaps_size(&[("b0".into(), 65536)], 64 << 20, 65536),
            196608
        );
        assert_eq!(bitmaps_size(&[], 64 << 20, 65536), 0);
    }
}
