//! Converts a VMDK to a raw file with N threads, the way `qemu-img convert -O raw` does
//! (ranges that read as zeroes are left as holes), to compare read speed with qemu-img.
//!
//! `cargo run --release -p vdisk-vmdk --example vmdk_to_raw -- IN.vmdk OUT.raw [THREADS]`

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use vdisk_block::{Format, OpenOptions};
use vdisk_vmdk::VmdkFormat;

const CHUNK: u64 = 2 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: vmdk_to_raw IN.vmdk OUT.raw [THREADS]".into());
    }
    let threads: usize = args.get(3).map(|t| t.parse()).transpose()?.unwrap_or(4);
    let start = std::time::Instant::now();
    let dev = VmdkFormat.open(args[1].as_ref(), &OpenOptions::read_only())?;
    let out = std::fs::File::create(&args[2])?;
    out.set_len(dev.size())?;
    let next = AtomicU64::new(0);
    let copied = AtomicU64::new(0);
    std::thread::scope(|s| -> Result<(), String> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<(), String> {
                    let mut buf = vec![0u8; CHUNK as usize];
                    loop {
                        let at = next.fetch_add(CHUNK, Ordering::Relaxed);
                        if at >= dev.size() {
                            return Ok(());
                        }
                        let end = (at + CHUNK).min(dev.size());
                        let mut pos = at;
                        while pos < end {
                            let st = dev
                                .block_status(pos, end - pos)
                                .map_err(|e| e.to_string())?;
                            if st.data {
                                let piece = &mut buf[..st.len as usize];
                                dev.read_at(piece, pos).map_err(|e| e.to_string())?;
                                out.write_all_at(piece, pos).map_err(|e| e.to_string())?;
                                copied.fetch_add(st.len, Ordering::Relaxed);
                            }
                            pos += st.len;
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "a worker panicked".to_string())??;
        }
        Ok(())
    })?;
    let secs = start.elapsed().as_secs_f64();
    let data = copied.load(Ordering::Relaxed) as f64;
    println!(
        "{:.2} s, {} threads, {:.0} MiB of data ({:.0} MiB/s)",
        secs,
        threads,
        data / 1048576.0,
        data / 1048576.0 / secs
    );
    Ok(())
}
