//! The internal snapshot table (read side): enough to account for snapshots in `check` and
//! to list them.
//!
//! Entries are variable-length; every length is bounded by QEMU's limits before it is used
//! (at most 65536 entries, a table of at most 64 MiB, extra data of at most 1024 bytes).

use vdisk_block::{Error, HostFile, Result};

use crate::header::{check_table, Header, MAX_L1_BYTES};

/// QEMU's QCOW_MAX_SNAPSHOTS_SIZE.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA.
pub const MAX_EXTRA_DATA: u32 = 1024;

/// Bound on the L1 tables of all snapshots together, so a hostile table of 65536
/// snapshots with maximal L1 tables cannot make `check` or a writable open read terabytes.
pub const MAX_TOTAL_L1_BYTES: u64 = 512 << 20;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries of that L1 table.
    pub l1_size: u32,
    /// The unique id string.
    pub id: String,
    /// The name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock when taken, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Virtual disk size when taken, if recorded.
    pub disk_size: Option<u64>,
    /// The entry as stored, padding included, so a rewrite of the table keeps fields this
    /// driver does not interpret.
    pub raw: Vec<u8>,
}

impl Snapshot {
    /// The instruction count recorded with the snapshot (extra data bytes 16..24), when the
    /// entry is long enough to hold one: qemu lists it only then.
    pub fn icount(&self) -> Option<u64> {
        let extra = usize::try_from(be32(self.raw.get(..40)?, 36)).ok()?;
        if extra < 24 {
            return None;
        }
        let bytes: [u8; 8] = self.raw.get(56..64)?.try_into().ok()?;
        Some(u64::from_be_bytes(bytes)).filter(|&n| n != u64::MAX)
    }
}

fn corrupt(message: String) -> Error {
    Error::corrupt("read snapshot table", message)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// The length of the snapshot table of `header` in bytes, from the entries' fixed parts
/// alone (read through a small window). Fails as qemu does on a table longer than
/// [`MAX_TABLE_BYTES`] or an entry with too much extra data; an entry past the end of the
/// file is left to the caller, which reports it as incomplete.
fn table_len(file: &HostFile, header: &Header, file_len: u64) -> Result<u64> {
    const WINDOW: u64 = 64 << 10;
    let mut window: Vec<u8> = Vec::new();
    let mut window_at = 0u64;
    let mut pos = 0u64;
    for i in 0..header.nb_snapshots {
        let at = header.snapshots_offset.saturating_add(pos);
        if at.saturating_add(40) > file_len {
            break;
        }
        let inside = at >= window_at && at + 40 <= window_at + window.len() as u64;
        if !inside {
            window = vec![0u8; WINDOW.min(file_len - at) as usize];
            file.read_at(&mut window, at)?;
            window_at = at;
        }
        let e = &window[(at - window_at) as usize..];
        let extra = be32(e, 36);
        if extra > MAX_EXTRA_DATA {
            return Err(corrupt(format!(
                "Too much extra metadata in snapshot table entry {i} ({extra} bytes)"
            )));
        }
        pos += (40 + u64::from(extra) + u64::from(be16(e, 12)) + u64::from(be16(e, 14)) + 7) & !7;
        if pos > MAX_TABLE_BYTES {
            return Err(corrupt(format!(
                "Snapshot table is too big: its first {} entries take more than {MAX_TABLE_BYTES} bytes",
                i + 1
            )));
        }
    }
    Ok(pos.max(40))
}

/// Reads the snapshot table of `header`; returns the snapshots and the table's size in bytes.
pub fn read_table(file: &HostFile, header: &Header) -> Result<(Vec<Snapshot>, u64)> {
    let (out, bytes) = read_entries(file, header)?;
    for (i, sn) in out.iter().enumerate() {
        check_l1(i, sn, header)?;
    }
    let total: u64 = out.iter().map(|sn| u64::from(sn.l1_size) * 8).sum();
    if total > MAX_TOTAL_L1_BYTES {
        return Err(corrupt(format!(
            "the snapshots' L1 tables take {total} bytes together (at most {MAX_TOTAL_L1_BYTES})"
        )));
    }
    Ok((out, bytes))
}

/// Checks that the L1 table of snapshot `i` is one this driver may read: cluster aligned,
/// addressable and within QEMU's size limit.
pub fn check_l1(i: usize, sn: &Snapshot, header: &Header) -> Result<()> {
    if u64::from(sn.l1_size) * 8 > MAX_L1_BYTES {
        return Err(corrupt(format!(
            "Snapshot L1 table too large (entry {i}: {} entries)",
            sn.l1_size
        )));
    }
    check_table(
        "Snapshot L1 table",
        sn.l1_table_offset,
        u64::from(sn.l1_size) * 8,
        header.cluster_bits,
    )
}

/// [`read_table`] without the checks of the snapshots' L1 tables, for `check`, which
/// reports a bad entry and goes on with the others (as qemu-img check does).
pub fn read_entries(file: &HostFile, header: &Header) -> Result<(Vec<Snapshot>, u64)> {
    if header.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    let file_len = file.len()?;
    // Only the table itself is read: its length is found first, so a hostile table is
    // refused before 64 MiB of it are read and copied into entries.
    let avail = file_len
        .saturating_sub(header.snapshots_offset)
        .min(table_len(file, header, file_len)?);
    let mut buf = vec![0u8; avail as usize];
    file.read_at(&mut buf, header.snapshots_offset)?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    for i in 0..header.nb_snapshots {
        let need = |pos: usize, n: usize| -> Result<()> {
            if pos.checked_add(n).is_none_or(|end| end > buf.len()) {
                Err(corrupt(format!(
                    "snapshot table entry {i} is incomplete (the table ends at {} bytes)",
                    buf.len()
                )))
            } else {
                Ok(())
            }
        };
        need(pos, 40)?;
        let e = &buf[pos..];
        let l1_table_offset = be64(e, 0);
        let l1_size = be32(e, 8);
        let id_len = usize::from(be16(e, 12));
        let name_len = usize::from(be16(e, 14));
        let extra = be32(e, 36);
        if extra > MAX_EXTRA_DATA {
            return Err(corrupt(format!(
                "Too much extra metadata in snapshot table entry {i} ({extra} bytes)"
            )));
        }
        let extra = extra as usize;
        need(pos, 40 + extra + id_len + name_len)?;
        let x = &e[40..40 + extra];
        let vm_state_size = if extra >= 8 {
            be64(x, 0)
        } else {
            u64::from(be32(e, 32))
        };
        let disk_size = (extra >= 16).then(|| be64(x, 8));
        let id_at = 40 + extra;
        let id = String::from_utf8_lossy(&e[id_at..id_at + id_len]).into_owned();
        let name =
            String::from_utf8_lossy(&e[id_at + id_len..id_at + id_len + name_len]).into_owned();
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec: be32(e, 16),
            date_nsec: be32(e, 20),
            vm_clock_nsec: be64(e, 24),
            vm_state_size,
            disk_size,
            raw: {
                let end = (pos + ((40 + extra + id_len + name_len + 7) & !7)).min(buf.len());
                let mut raw = buf[pos..end].to_vec();
                raw.resize((40 + extra + id_len + name_len + 7) & !7, 0);
                raw
            },
        });
        pos += (40 + extra + id_len + name_len + 7) & !7;
    }
    Ok((out, pos as u64))
}

/// Encodes a new snapshot table entry the way QEMU writes one (24 bytes of extra data:
/// the 64-bit VM state size, the disk size and the instruction count, -1 for none).
pub fn encode_entry(
    l1_table_offset: u64,
    l1_size: u32,
    id: &str,
    name: &str,
    date: (u32, u32),
    disk_size: u64,
    icount: u64,
) -> Vec<u8> {
    let mut e = Vec::with_capacity(64 + id.len() + name.len());
    e.extend_from_slice(&l1_table_offset.to_be_bytes());
    e.extend_from_slice(&l1_size.to_be_bytes());
    e.extend_from_slice(&(id.len() as u16).to_be_bytes());
    e.extend_from_slice(&(name.len() as u16).to_be_bytes());
    e.extend_from_slice(&date.0.to_be_bytes());
    e.extend_from_slice(&date.1.to_be_bytes());
    e.extend_from_slice(&0u64.to_be_bytes()); // guest clock
    e.extend_from_slice(&0u32.to_be_bytes()); // VM state size (32-bit)
    e.extend_from_slice(&24u32.to_be_bytes()); // extra data size
    e.extend_from_slice(&0u64.to_be_bytes()); // VM state size (64-bit)
    e.extend_from_slice(&disk_size.to_be_bytes());
    e.extend_from_slice(&icount.to_be_bytes());
    e.extend_from_slice(id.as_bytes());
    e.extend_from_slice(name.as_bytes());
    e.resize(e.len().next_multiple_of(8), 0);
    e
}
