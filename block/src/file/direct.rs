//! Requests `O_DIRECT` cannot take as they are, done through aligned bounce buffers.
//!
//! An unaligned read reads the aligned blocks around it and copies out the part asked for.
//! An unaligned write reads the partial blocks at its ends, patches them and writes whole
//! blocks back, holding its blocks in the file's [`RangeLock`] so no other write of those
//! blocks interleaves. Both go through the one direct descriptor: mixing a buffered
//! descriptor in would leave stale page-cache copies of blocks that direct writes changed.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::aligned::AlignedBuf;
use super::rangelock::RangeLock;

/// Largest bounce buffer; bigger requests go in pieces so memory stays bounded.
const BOUNCE: u64 = 1 << 20;

fn round_down(value: u64, align: u64) -> u64 {
    value / align * align
}

fn round_up(value: u64, align: u64) -> io::Result<u64> {
    value
        .checked_next_multiple_of(align)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
}

fn end_of(offset: u64, len: usize) -> io::Result<u64> {
    offset
        .checked_add(len as u64)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
}

/// Reads whole blocks at an aligned `offset` until `buf` is full or the file ends; returns
/// how many bytes came. The file may end inside a block, after which a further read would
/// be unaligned, so a count that is not a multiple of `align` is taken as the end.
fn read_blocks(file: &File, buf: &mut [u8], offset: u64, align: usize) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                if !done.is_multiple_of(align) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Fills `buf` from `offset` through bounce buffers; reading past the end of the file fails.
pub(super) fn read(file: &File, align: usize, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let a = align as u64;
    let end = end_of(offset, buf.len())?;
    let bounce_max = BOUNCE.max(a);
    let mut pos = offset;
    while pos < end {
        let start = round_down(pos, a);
        let stop = round_up(end, a)?.min(start + bounce_max);
        let mut bounce = AlignedBuf::zeroed((stop - start) as usize, align);
        let got = read_blocks(file, bounce.as_mut_slice(), start, align)?;
        let piece_end = end.min(stop);
        if start + (got as u64) < piece_end {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        }
        buf[(pos - offset) as usize..(piece_end - offset) as usize].copy_from_slice(
            &bounce.as_slice()[(pos - start) as usize..(piece_end - start) as usize],
        );
        pos = piece_end;
    }
    Ok(())
}

/// Writes `buf` at `offset` through bounce buffers, read-modify-write at the ends.
pub(super) fn write(
    file: &File,
    align: usize,
    locks: &RangeLock,
    buf: &[u8],
    offset: u64,
) -> io::Result<()> {
    if buf.is_empty() {
        // Nothing to write, and the length fix-up below must not grow the file for it.
        return Ok(());
    }
    let a = align as u64;
    let end = end_of(offset, buf.len())?;
    let env_start = round_down(offset, a);
    let env_end = round_up(end, a)?;
    let mut guard = locks.lock(&[(env_start, env_end)]);
    let mut old_len = file.metadata()?.len();
    if env_end > old_len {
        // Whole blocks reach past the end of the file, which grows it beyond what the caller
        // wrote; the length is put back below. Holding everything from here on keeps another
        // writer's data out of the part that the fix-up cuts.
        drop(guard);
        guard = locks.lock(&[(env_start, u64::MAX)]);
        old_len = file.metadata()?.len();
    }
    let bounce_max = BOUNCE.max(a);
    let mut pos = offset;
    while pos < end {
        let start = round_down(pos, a);
        let stop = env_end.min(start + bounce_max);
        let piece_end = end.min(stop);
        let mut bounce = AlignedBuf::zeroed((stop - start) as usize, align);
        let len = bounce.len();
        if pos > start {
            read_blocks(file, &mut bounce.as_mut_slice()[..align], start, align)?;
        }
        if piece_end < stop && !(pos > start && stop - start == a) {
            read_blocks(
                file,
                &mut bounce.as_mut_slice()[len - align..],
                stop - a,
                align,
            )?;
        }
        bounce.as_mut_slice()[(pos - start) as usize..(piece_end - start) as usize]
            .copy_from_slice(&buf[(pos - offset) as usize..(piece_end - offset) as usize]);
        file.write_all_at(bounce.as_slice(), start)?;
        pos = piece_end;
    }
    if env_end > old_len {
        let want = old_len.max(end);
        if file.metadata()?.len() != want {
            file.set_len(want)?;
        }
    }
    drop(guard);
    Ok(())
}
