//! Standard output as qemu-img's C library buffers it, for drop-in mode.
//!
//! When stdout is not a terminal, glibc buffers it fully: output leaves in whole blocks of
//! the file's `st_blksize` and the rest at exit, while stderr is unbuffered. With both on one
//! pipe (`2>&1`, as test suites capture qemu-img) an error printed after some output comes
//! first. qemu-img flushes by hand only after its progress lines and after create's
//! "Formatting ..." line. In drop-in mode vdisk's stdout does the same, so the combined
//! stream is qemu-img's; otherwise every write goes out at once.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

/// Output held back, and the block size it leaves in; `None` when writes go straight out.
static HELD: Mutex<Option<Held>> = Mutex::new(None);

struct Held {
    bytes: Vec<u8>,
    block: usize,
}

/// glibc's buffer when `st_blksize` cannot be read.
const DEFAULT_BLOCK: usize = 4096;

/// Starts buffering as glibc would, if stdout is not a terminal (a terminal is line
/// buffered, which writing each line at once already matches).
pub fn buffer_like_qemu_img() {
    let out = std::io::stdout();
    if out.is_terminal() {
        return;
    }
    let block = std::fs::metadata("/proc/self/fd/1")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::blksize(&m) as usize)
        .filter(|&b| b > 0)
        .unwrap_or(DEFAULT_BLOCK);
    if let Ok(mut held) = HELD.lock() {
        *held = Some(Held {
            bytes: Vec::new(),
            block,
        });
    }
}

/// Whether output is being held back (callers need not buffer on top of it).
pub fn is_buffered() -> bool {
    HELD.lock().map(|h| h.is_some()).unwrap_or(false)
}

/// Writes `bytes` to stdout: at once, or held back and sent in whole blocks. A closed
/// stdout is not worth failing a command for.
pub fn write(bytes: &[u8]) {
    let Ok(mut held) = HELD.lock() else {
        return;
    };
    let mut out = std::io::stdout().lock();
    match held.as_mut() {
        None => {
            let _ = out.write_all(bytes);
            let _ = out.flush();
        }
        Some(h) => {
            h.bytes.extend_from_slice(bytes);
            let whole = h.bytes.len() / h.block * h.block;
            if whole > 0 {
                let _ = out.write_all(&h.bytes[..whole]);
                let _ = out.flush();
                h.bytes.drain(..whole);
            }
        }
    }
}

/// Sends everything held back (qemu-img's `fflush(stdout)`, and the C library's at exit).
pub fn flush() {
    let Ok(mut held) = HELD.lock() else {
        return;
    };
    let mut out = std::io::stdout().lock();
    if let Some(h) = held.as_mut() {
        let _ = out.write_all(&h.bytes);
        h.bytes.clear();
    }
    let _ = out.flush();
}

/// [`write`] and [`flush`] as an `io::Write`, for printers that stream.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Only qemu-img's own flush points send held output; a printer's flush does not.
        if !is_buffered() {
            flush();
        }
        Ok(())
    }
}
