//! Copies a raw image into a new dynamic VHDX, or a VHDX (any kind, chain included) out to
//! a raw file, through this crate only; prints the time taken. For side-by-side figures
//! against `qemu-img convert` while the CLI is not wired to the driver yet.
//!
//! `cargo run --release -p vdisk-vhdx --example vhdx_copy -- to-vhdx IN.raw OUT.vhdx`
//! `cargo run --release -p vdisk-vhdx --example vhdx_copy -- to-raw IN.vhdx OUT.raw`
//!
//! Like `qemu-img convert`, runs of zeroes of 4 KiB or more inside data are not written.
//! `CACHE=unsafe` opens the target as qemu-img's default target cache mode does (flushes
//! ignored); the default, writeback, makes the result durable.

use std::path::Path;
use std::time::Instant;

use vdisk_block::{BlockDev, CacheMode, CreateOptions, Format, OpenOptions, RawFormat};
use vdisk_vhdx::VhdxFormat;

const CHUNK: usize = 4 << 20;

fn copy(src: &dyn BlockDev, dst: &dyn BlockDev) -> vdisk_block::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0;
    let mut off = 0;
    while off < src.size() {
        let st = src.block_status(off, (src.size() - off).min(CHUNK as u64))?;
        if st.zero && !st.data {
            off += st.len;
            continue;
        }
        let n = st.len as usize;
        src.read_at(&mut buf[..n], off)?;
        // Write the data runs, skipping whole 4 KiB pieces of zeroes.
        let mut at = 0;
        while at < n {
            let zero = |i: usize| buf[i..(i + 4096).min(n)].iter().all(|&b| b == 0);
            let start = at;
            let kind = zero(at);
            while at < n && zero(at) == kind {
                at = (at + 4096).min(n);
            }
            if !kind {
                dst.write_at(&buf[start..at], off + start as u64)?;
                copied += (at - start) as u64;
            }
        }
        off += n as u64;
    }
    dst.flush()?;
    Ok(copied)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, input, output] = args.as_slice() else {
        return Err("usage: vhdx_copy to-vhdx|to-raw IN OUT".into());
    };
    let (input, output) = (Path::new(input), Path::new(output));
    let target = OpenOptions {
        cache: CacheMode::parse(&std::env::var("CACHE").unwrap_or_else(|_| "writeback".into()))?,
        ..OpenOptions::read_write()
    };
    let start = Instant::now();
    let copied = if mode == "to-vhdx" {
        let src = RawFormat.open(input, &OpenOptions::read_only())?;
        VhdxFormat.create(
            output,
            CreateOptions {
                size: src.size(),
                ..CreateOptions::default()
            },
        )?;
        let dst = VhdxFormat.open(output, &target)?;
        copy(src.as_ref(), dst.as_ref())?
    } else {
        let src = VhdxFormat.open(input, &OpenOptions::read_only())?;
        RawFormat.create(
            output,
            CreateOptions {
                size: src.size(),
                ..CreateOptions::default()
            },
        )?;
        let dst = RawFormat.open(output, &target)?;
        copy(src.as_ref(), dst.as_ref())?
    };
    println!(
        "{mode}: {copied} bytes of data in {:.3} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
