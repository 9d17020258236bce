//! The VHDX log (MS-VHDX 2.3): finding the active sequence and replaying it.
//!
//! The log is a circular buffer of 4 KiB sectors holding entries; each entry lists writes
//! (data sectors) and zeroings of the file that must all reach it before the BAT and
//! metadata can be trusted. Replay here never writes the file: it records the writes in an
//! [`Overlaid`] view, so a read-only open sees the replayed image and leaves the file as it
//! was. Writers flush the overlay into the file themselves.
//!
//! An entry is part of a sequence when it is valid on its own (signature, length, sequence
//! number, log GUID, checksum, descriptors and data sectors) and its sequence number is one
//! more than the entry before it. A sequence counts only when its newest entry's `tail`
//! points at the sequence's first entry (the oldest entry still needed); the active
//! sequence is the counting one with the highest sequence number.

use std::sync::Arc;

use crate::bytes::{le32, le64, put_le32, put_le64};
use crate::crc32c::crc32c_skipping;
use crate::guid::Guid;
use crate::overlay::Overlaid;
use crate::vhdx::header::Header;

const SECTOR: usize = 4096;
const MIB: u64 = 1024 * 1024;
/// Logs larger than this are refused rather than read into memory.
pub const MAX_LOG_LEN: u64 = 256 * MIB;
/// Replayed writes must end below this (1 PiB): anything further is a hostile entry.
const MAX_TARGET: u64 = 1 << 50;

/// One write an entry makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogWrite {
    /// A full 4 KiB sector at `offset`.
    Data {
        /// File offset (4 KiB aligned).
        offset: u64,
        /// The sector.
        data: Vec<u8>,
    },
    /// `len` bytes of zeroes at `offset`.
    Zero {
        /// File offset (4 KiB aligned).
        offset: u64,
        /// Length (multiple of 4 KiB).
        len: u64,
    },
}

/// A valid log entry.
#[derive(Debug, Clone)]
struct Entry {
    sequence: u64,
    tail: u32,
    length: u32,
    flushed_file_offset: u64,
    last_file_offset: u64,
    writes: Vec<LogWrite>,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Entries replayed.
    pub entries: usize,
    /// Sequence number of the newest replayed entry.
    pub head_sequence: u64,
}

/// Validates the log fields of the current header against the file.
pub fn check_header(header: &Header, file_len: u64) -> std::result::Result<(), String> {
    if header.log_version != 0 {
        return Err(format!("unsupported log version {}", header.log_version));
    }
    let (off, len) = (header.log_offset, header.log_length as u64);
    if off % MIB != 0 || len % MIB != 0 {
        return Err(format!(
            "log ({len} bytes at {off}) is not aligned to 1 MiB"
        ));
    }
    if len > 0 && (off < MIB || off.checked_add(len).is_none_or(|end| end > file_len)) {
        return Err(format!(
            "log ({len} bytes at {off}) lies outside the file ({file_len} bytes) or inside the header section"
        ));
    }
    Ok(())
}

/// Replays the active sequence of the log into `view`. `Ok(None)`: nothing to replay.
pub fn replay(
    view: &mut Overlaid,
    header: &Header,
) -> std::result::Result<Option<ReplaySummary>, String> {
    if header.log_guid.is_zero() || header.log_length == 0 {
        return Ok(None);
    }
    let file_len = view.len();
    check_header(header, file_len)?;
    if header.log_length as u64 > MAX_LOG_LEN {
        return Err(format!(
            "log of {} bytes is larger than the {MAX_LOG_LEN} bytes this driver replays",
            header.log_length
        ));
    }
    let mut log = vec![0u8; header.log_length as usize];
    view.read_at(&mut log, header.log_offset)
        .map_err(|e| format!("cannot read the log: {e}"))?;
    let Some(active) = find_active(&log, header.log_guid) else {
        return Ok(None);
    };
    let head = active.last().ok_or("empty active sequence")?;
    if head.flushed_file_offset > file_len {
        return Err(format!(
            "the log says the file was at least {} bytes long, but it has {file_len}: the image was truncated",
            head.flushed_file_offset
        ));
    }
    let log_range = (header.log_offset, header.log_length as u64);
    for entry in &active {
        for w in &entry.writes {
            let (offset, len) = match w {
                LogWrite::Data { offset, data } => (*offset, data.len() as u64),
                LogWrite::Zero { offset, len } => (*offset, *len),
            };
            if offset < crate::vhdx::header::HEADER_OFFSETS[1] + SECTOR as u64
                || offset.checked_add(len).is_none_or(|e| e > MAX_TARGET)
                || crate::vhdx::region::overlaps(offset, len, log_range.0, log_range.1)
            {
                return Err(format!(
                    "log entry {} writes {len} bytes at {offset}, over the headers or the log itself",
                    entry.sequence
                ));
            }
            match w {
                LogWrite::Data { offset, data } => view.write(*offset, Arc::from(data.as_slice())),
                LogWrite::Zero { offset, len } => view.zero(*offset, *len),
            }
        }
    }
    let last = head.last_file_offset;
    if last > view.len() {
        if last > MAX_TARGET {
            return Err(format!("log entry names an absurd file size {last}"));
        }
        view.extend_to(last.next_multiple_of(MIB));
    }
    Ok(Some(ReplaySummary {
        entries: active.len(),
        head_sequence: head.sequence,
    }))
}

/// The active sequence of `log`, oldest entry first.
fn find_active(log: &[u8], guid: Guid) -> Option<Vec<Entry>> {
    let sectors = log.len() / SECTOR;
    let parsed: Vec<Option<Entry>> = (0..sectors).map(|i| parse_entry(log, i, guid)).collect();
    let mut best: Option<(u64, usize)> = None;
    for start in 0..sectors {
        let Some(first) = &parsed[start] else {
            continue;
        };
        let (mut at, mut prev, mut used) = (start, first, first.length as usize);
        loop {
            let next = (at + prev.length as usize / SECTOR) % sectors;
            match &parsed[next] {
                Some(e)
                    if e.sequence == prev.sequence.wrapping_add(1)
                        && used + e.length as usize <= log.len() =>
                {
                    used += e.length as usize;
                    at = next;
                    prev = e;
                }
                _ => break,
            }
        }
        if prev.tail as usize == start * SECTOR && best.is_none_or(|(s, _)| prev.sequence > s) {
            best = Some((prev.sequence, start));
        }
    }
    let (head_seq, start) = best?;
    let mut out = Vec::new();
    let mut at = start;
    loop {
        let e = parsed[at].clone()?;
        let done = e.sequence == head_seq;
        at = (at + e.length as usize / SECTOR) % sectors;
        out.push(e);
        if done {
            return Some(out);
        }
    }
}

/// Copies `len` bytes of the circular log from sector `start`.
fn circular(log: &[u8], start: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut pos = start * SECTOR % log.len().max(1);
    while out.len() < len {
        let n = (len - out.len()).min(log.len() - pos);
        out.extend_from_slice(&log[pos..pos + n]);
        pos = (pos + n) % log.len();
    }
    out
}

/// Parses the entry at sector `index`, or `None` when it is not a valid entry.
fn parse_entry(log: &[u8], index: usize, guid: Guid) -> Option<Entry> {
    let head = log.get(index * SECTOR..index * SECTOR + 64)?;
    if &head[..4] != b"loge" {
        return None;
    }
    let length = le32(head, 8);
    let sequence = le64(head, 16);
    let count = le32(head, 24) as usize;
    if length == 0
        || !(length as usize).is_multiple_of(SECTOR)
        || length as usize > log.len()
        || sequence == 0
        || Guid::from_slice(&head[32..48]) != guid
        || count.checked_mul(32)? > length as usize
    {
        return None;
    }
    let desc_sectors = (64 + count * 32).div_ceil(SECTOR);
    // qemu's rule (count * 32 <= length) still lets the descriptors run past the entry by
    // the 64-byte header: the descriptor sectors themselves must fit.
    if desc_sectors * SECTOR > length as usize {
        return None;
    }
    let entry = circular(log, index, length as usize);
    if le32(&entry, 4) != crc32c_skipping(&entry, 4) {
        return None;
    }
    let mut writes = Vec::with_capacity(count);
    let mut data_sector = desc_sectors;
    for d in 0..count {
        let desc = &entry[64 + d * 32..96 + d * 32];
        let offset = le64(desc, 16);
        if le64(desc, 24) != sequence || !offset.is_multiple_of(SECTOR as u64) {
            return None;
        }
        match &desc[..4] {
            b"desc" => {
                let sector = entry.get(data_sector * SECTOR..(data_sector + 1) * SECTOR)?;
                data_sector += 1;
                if &sector[..4] != b"data"
                    || le32(sector, 4) != (sequence >> 32) as u32
                    || le32(sector, SECTOR - 4) != sequence as u32
                {
                    return None;
                }
                let mut data = vec![0u8; SECTOR];
                data[..8].copy_from_slice(&desc[8..16]);
                data[8..SECTOR - 4].copy_from_slice(&sector[8..SECTOR - 4]);
                data[SECTOR - 4..].copy_from_slice(&desc[4..8]);
                writes.push(LogWrite::Data { offset, data });
            }
            b"zero" => {
                let len = le64(desc, 8);
                if !len.is_multiple_of(SECTOR as u64) {
                    return None;
                }
                writes.push(LogWrite::Zero { offset, len });
            }
            _ => return None,
        }
    }
    Some(Entry {
        sequence,
        tail: le32(head, 12),
        length,
        flushed_file_offset: le64(head, 48),
        last_file_offset: le64(head, 56),
        writes,
    })
}

/// Encodes one log entry (used by the writer and by tests that build dirty logs).
pub fn encode_entry(
    guid: Guid,
    sequence: u64,
    tail: u32,
    flushed_file_offset: u64,
    last_file_offset: u64,
    writes: &[LogWrite],
) -> Vec<u8> {
    let desc_sectors = (64 + writes.len() * 32).div_ceil(SECTOR);
    let data_count = writes
        .iter()
        .filter(|w| matches!(w, LogWrite::Data { .. }))
        .count();
    let length = (desc_sectors + data_count) * SECTOR;
    let mut e = vec![0u8; length];
    e[..4].copy_from_slice(b"loge");
    put_le32(&mut e, 8, length as u32);
    put_le32(&mut e, 12, tail);
    put_le64(&mut e, 16, sequence);
    put_le32(&mut e, 24, writes.len() as u32);
    e[32..48].copy_from_slice(&guid.0);
    put_le64(&mut e, 48, flushed_file_offset);
    put_le64(&mut e, 56, last_file_offset);
    let mut data_at = desc_sectors * SECTOR;
    for (i, w) in writes.iter().enumerate() {
        let d = 64 + i * 32;
        match w {
            LogWrite::Data { offset, data } => {
                e[d..d + 4].copy_from_slice(b"desc");
                e[d + 4..d + 8].copy_from_slice(&data[SECTOR - 4..SECTOR]);
                e[d + 8..d + 16].copy_from_slice(&data[..8]);
                put_le64(&mut e, d + 16, *offset);
                let s = &mut e[data_at..data_at + SECTOR];
                s[..4].copy_from_slice(b"data");
                put_le32(s, 4, (sequence >> 32) as u32);
                s[8..SECTOR - 4].copy_from_slice(&data[8..SECTOR - 4]);
                put_le32(s, SECTOR - 4, sequence as u32);
                data_at += SECTOR;
            }
            LogWrite::Zero { offset, len } => {
                e[d..d + 4].copy_from_slice(b"zero");
                put_le64(&mut e, d + 8, *len);
                put_le64(&mut e, d + 16, *offset);
            }
        }
        put_le64(&mut e, d + 24, sequence);
    }
    let crc = crc32c_skipping(&e, 4);
    put_le32(&mut e, 4, crc);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Guid = Guid([5; 16]);

    fn data(fill: u8) -> Vec<u8> {
        let mut d = vec![fill; SECTOR];
        d[0] = 0xAA;
        d[SECTOR - 1] = 0xBB;
        d
    }

    fn place(log: &mut [u8], sector: usize, entry: &[u8]) {
        for (i, b) in entry.iter().enumerate() {
            let at = (sector * SECTOR + i) % log.len();
            log[at] = *b;
        }
    }

    #[test]
    fn entries_round_trip_through_encode_and_parse() {
        let writes = vec![
            LogWrite::Data {
                offset: 2 * MIB,
                data: data(7),
            },
            LogWrite::Zero {
                offset: 3 * MIB,
                len: 8192,
            },
        ];
        let mut log = vec![0u8; MIB as usize];
        place(&mut log, 0, &encode_entry(G, 1, 0, 0, 4 * MIB, &writes));
        let e = parse_entry(&log, 0, G).expect("valid");
        assert_eq!(e.writes, writes);
        assert!(
            parse_entry(&log, 0, Guid([6; 16])).is_none(),
            "foreign GUID"
        );
        log[100] ^= 1;
        assert!(parse_entry(&log, 0, G).is_none(), "bad checksum");
    }

    #[test]
    fn the_active_sequence_is_the_newest_complete_one() {
        let mut log = vec![0u8; 64 * SECTOR];
        let w = |f| {
            vec![LogWrite::Data {
                offset: 2 * MIB,
                data: data(f),
            }]
        };
        // An old sequence 1..2 at the start, a newer 10..12 later whose head's tail points at
        // its first entry, and a stale 13 elsewhere whose tail points at nothing valid.
        place(&mut log, 0, &encode_entry(G, 1, 0, 0, 0, &w(1)));
        place(&mut log, 2, &encode_entry(G, 2, 0, 0, 0, &w(2)));
        place(&mut log, 10, &encode_entry(G, 10, 10 * 4096, 0, 0, &w(10)));
        place(&mut log, 12, &encode_entry(G, 11, 10 * 4096, 0, 0, &w(11)));
        place(&mut log, 14, &encode_entry(G, 12, 12 * 4096, 0, 0, &w(12)));
        place(&mut log, 30, &encode_entry(G, 13, 20 * 4096, 0, 0, &w(13)));
        let active = find_active(&log, G).expect("found");
        assert_eq!(
            active.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![11, 12]
        );
    }

    #[test]
    fn entries_may_wrap_around_the_end_of_the_log() {
        let mut log = vec![0u8; 8 * SECTOR];
        let writes = vec![LogWrite::Data {
            offset: 2 * MIB,
            data: data(3),
        }];
        place(&mut log, 7, &encode_entry(G, 4, 7 * 4096, 0, 0, &writes));
        let active = find_active(&log, G).expect("found");
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].writes, writes);
    }

    #[test]
    fn hostile_entries_are_not_valid() {
        let mut log = vec![0u8; 8 * SECTOR];
        let mut e = encode_entry(G, 1, 0, 0, 0, &[]);
        put_le32(&mut e, 8, 64 * SECTOR as u32);
        let crc = crc32c_skipping(&e, 4);
        put_le32(&mut e, 4, crc);
        place(&mut log, 0, &e);
        assert!(parse_entry(&log, 0, G).is_none(), "longer than the log");
        let mut e = encode_entry(G, 1, 0, 0, 0, &[]);
        put_le32(&mut e, 24, 1000);
        let crc = crc32c_skipping(&e, 4);
        put_le32(&mut e, 4, crc);
        place(&mut log, 0, &e);
        assert!(
            parse_entry(&log, 0, G).is_none(),
            "descriptors past the entry"
        );
        // 128 descriptors are exactly 4096 bytes, but with the header they need two sectors.
        let mut e = encode_entry(G, 1, 0, 0, 0, &[]);
        put_le32(&mut e, 24, 128);
        let crc = crc32c_skipping(&e, 4);
        put_le32(&mut e, 4, crc);
        place(&mut log, 0, &e);
        assert!(
            parse_entry(&log, 0, G).is_none(),
            "descriptors overrun the header"
        );
        let e = encode_entry(G, 0, 0, 0, 0, &[]);
        place(&mut log, 0, &e);
        assert!(parse_entry(&log, 0, G).is_none(), "sequence 0");
        let mut e = encode_entry(
            G,
            1,
            0,
            0,
            0,
            &[LogWrite::Zero {
                offset: 2 * MIB + 512,
                len: 4096,
            }],
        );
        let crc = crc32c_skipping(&e, 4);
        put_le32(&mut e, 4, crc);
        place(&mut log, 0, &e);
        assert!(parse_entry(&log, 0, G).is_none(), "unaligned target");
    }
}

#[cfg(test)]
mod fuzz_tests {
    use super::*;
    use vdisk_block::testing::Rng;

    /// Damaged entries whose checksum is made right again reach every later validation
    /// step; none may panic.
    #[test]
    fn damaged_entries_with_fixed_checksums_never_panic() {
        let g = Guid([3; 16]);
        let mut rng = Rng::new(77);
        for _ in 0..3000 {
            let mut log = vec![0u8; 16 * SECTOR];
            let n = 1 + rng.below(3) as usize;
            let mut at = 0usize;
            for seq in 0..n {
                let writes: Vec<LogWrite> = (0..rng.below(4))
                    .map(|i| {
                        if rng.chance(50) {
                            LogWrite::Data {
                                offset: (2 + i) * MIB,
                                data: vec![i as u8; SECTOR],
                            }
                        } else {
                            LogWrite::Zero {
                                offset: (3 + i) * MIB,
                                len: 4096 * (1 + rng.below(4)),
                            }
                        }
                    })
                    .collect();
                let mut e = encode_entry(g, seq as u64 + 1, 0, 0, 0, &writes);
                for _ in 0..1 + rng.below(6) {
                    let i = rng.below(e.len() as u64) as usize;
                    e[i] = rng.next_u64() as u8;
                }
                if rng.chance(80) {
                    let crc = crc32c_skipping(&e, 4);
                    put_le32(&mut e, 4, crc);
                }
                for (i, b) in e.iter().enumerate() {
                    let p = (at + i) % log.len();
                    log[p] = *b;
                }
                at = (at + e.len()) % log.len();
            }
            let _ = find_active(&log, g);
        }
    }
}
