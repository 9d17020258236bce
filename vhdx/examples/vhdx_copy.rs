//! Copies a raw image into a new dynamic VHDX, or a VHDX (any kind, chain included) out to
//! a raw file, through this crate only; prints the time taken. For side-by-side figures
//! against `qemu-img convert` while the CLI is not wired to the driver yet.
//!
//! `cargo run --release -p vdisk-vhdx --example vhdx_copy -- to-vhdx IN.raw OUT.vhdx`
//! `cargo run --release -p vdisk-vhdx --example vhdx_copy -- to-raw IN.vhdx OUT.raw`

use std::path::Path;
use std::time::Instant;

use vdisk_block::{BlockDev, CreateOptions, Format, OpenOptions, RawFormat};
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
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_at(&buf[..n], off)?;
            copied += n as u64;
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
        let dst = VhdxFormat.open(output, &OpenOptions::read_write())?;
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
        let dst = RawFormat.open(output, &OpenOptions::read_write())?;
        copy(src.as_ref(), dst.as_ref())?
    };
    println!(
        "{mode}: {copied} bytes of data in {:.3} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
