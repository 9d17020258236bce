//! Crash tests of the VHDX write path: the stream of file writes and flushes is cut after
//! every one of its operations in turn (a simulated power cut: what was written before the
//! cut is in the file, nothing after it; and again with the interrupted write torn, half of
//! its sectors written), then the image is opened read-only (replaying its log in memory)
//! and, when qemu-img is present, repaired and read by qemu-img too.
//!
//! Required after every cut: the image opens; every write acknowledged before the last
//! successful flush reads back; every other range reads as either its old or its new
//! contents; qemu-img reads exactly what we read.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;

use vdisk_block::{BlockDev, CreateOptions, Format, OpenOptions, ZeroMode};

use crate::vhdx::format::VhdxFormat;
use crate::vhdx::image::VhdxImage;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;

/// One step of the workload: each touches its own range (disjoint from every other step),
/// so each can be judged on its own.
#[derive(Clone, Copy)]
enum Step {
    Write { at: u64, len: u64, fill: u8 },
    Zero { at: u64, len: u64 },
    Flush,
}

fn workload() -> Vec<Step> {
    vec![
        Step::Write {
            at: 100,
            len: 5000,
            fill: 1,
        },
        Step::Write {
            at: MIB + 7,
            len: MIB - 100,
            fill: 2,
        },
        Step::Flush,
        Step::Write {
            at: 4 * MIB,
            len: 4096,
            fill: 3,
        },
        Step::Zero {
            at: 2 * MIB,
            len: MIB,
        },
        Step::Flush,
        Step::Write {
            at: 6 * MIB - 512,
            len: 1024,
            fill: 4,
        },
        Step::Write {
            at: 200_000,
            len: 300,
            fill: 5,
        },
        Step::Flush,
        Step::Write {
            at: 7 * MIB,
            len: 10,
            fill: 6,
        },
    ]
}

/// The device contents before the workload (written by an earlier, complete session).
fn base_contents() -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    for (i, b) in v
        .iter_mut()
        .enumerate()
        .skip(2 * MIB as usize)
        .take(MIB as usize)
    {
        *b = (i % 251) as u8;
    }
    v
}

fn range(step: &Step) -> Option<(usize, usize, Option<u8>)> {
    match *step {
        Step::Write { at, len, fill } => Some((at as usize, len as usize, Some(fill))),
        Step::Zero { at, len } => Some((at as usize, len as usize, Some(0))),
        Step::Flush => None,
    }
}

fn rw() -> OpenOptions {
    OpenOptions::read_write()
}

/// Runs the workload with `budget` file operations allowed (`-1`: all). Returns how many
/// steps completed, how many of them were covered by a successful flush, and the number of
/// file operations used.
fn run(path: &Path, budget: i64, torn: bool) -> (usize, usize, i64) {
    let img = VhdxImage::open(path, &rw()).expect("open writable");
    img.fault.1.store(torn, Ordering::SeqCst);
    const LARGE: i64 = 1 << 40;
    img.fault
        .0
        .store(if budget < 0 { LARGE } else { budget }, Ordering::SeqCst);
    let (mut done, mut flushed) = (0, 0);
    for step in workload() {
        let ok = match step {
            Step::Write { at, len, fill } => img.write_at(&vec![fill; len as usize], at).is_ok(),
            Step::Zero { at, len } => img.write_zeroes(at, len, ZeroMode::MayUnmap).is_ok(),
            Step::Flush => img.flush().is_ok(),
        };
        if !ok {
            break;
        }
        done += 1;
        if matches!(step, Step::Flush) {
            flushed = done;
        }
    }
    let used = if budget < 0 {
        LARGE - img.fault.0.load(Ordering::SeqCst)
    } else {
        budget
    };
    // A cut image is dropped without its closing flush (the power is gone).
    if budget >= 0 {
        img.fault.0.store(0, Ordering::SeqCst);
    }
    drop(img);
    (done, flushed, used)
}

fn prepare(path: &Path) {
    VhdxFormat
        .create(
            path,
            CreateOptions {
                size: SIZE,
                options: CreateOptions::parse_options("block_size=1M").expect("options"),
            },
        )
        .expect("create");
    let img = VhdxFormat.open(path, &rw()).expect("open");
    img.write_at(
        &base_contents()[2 * MIB as usize..3 * MIB as usize],
        2 * MIB,
    )
    .expect("base write");
    img.flush().expect("flush");
}

fn have_qemu() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}

#[test]
fn every_cut_of_the_write_stream_leaves_a_consistent_image() {
    let dir = vdisk_block::testing::TempDir::new("vhdx-crash").expect("temp dir");
    let pristine = dir.join("pristine.vhdx");
    prepare(&pristine);
    let probe = dir.join("probe.vhdx");
    std::fs::copy(&pristine, &probe).expect("copy");
    let (all, _, total) = run(&probe, -1, false);
    assert_eq!(all, workload().len());
    assert!(total > 20, "the workload made only {total} file operations");
    eprintln!("the workload makes {total} file writes and flushes; cutting after each");
    let qemu = have_qemu();
    let steps = workload();
    // Every cut twice: the interrupted write lost whole, and torn in half.
    for (cut, torn) in (0..=total).flat_map(|c| [(c, false), (c, true)]) {
        let image = dir.join("cut.vhdx");
        std::fs::copy(&pristine, &image).expect("copy");
        let (done, flushed, _) = run(&image, cut, torn);
        let img = VhdxImage::open(&image, &OpenOptions::read_only())
            .unwrap_or_else(|e| panic!("cut {cut} (torn {torn}): the image does not open: {e}"));
        let mut got = vec![0u8; SIZE as usize];
        img.read_at(&mut got, 0).expect("read");
        let mut old = base_contents();
        for (i, step) in steps.iter().enumerate() {
            let Some((at, len, fill)) = range(step) else {
                continue;
            };
            let new = fill.expect("fill");
            let region = &got[at..at + len];
            if i < flushed {
                assert!(
                    region.iter().all(|&b| b == new),
                    "cut {cut} (torn {torn}): step {i} was flushed but is not fully there"
                );
            } else {
                let before = &old[at..at + len];
                assert!(
                    region.iter().zip(before).all(|(&g, &o)| g == new || g == o),
                    "cut {cut} (torn {torn}): step {i} ({} done) left bytes that are neither old nor new",
                    done
                );
            }
            old[at..at + len].fill(new);
        }
        if qemu {
            let copy = dir.join("qemu.vhdx");
            std::fs::copy(&image, &copy).expect("copy");
            let _ = Command::new("qemu-img")
                .args(["check", "-q", "-r", "all", "-f", "vhdx"])
                .arg(&copy)
                .output();
            let raw = dir.join("qemu.raw");
            let out = Command::new("qemu-img")
                .args(["convert", "-f", "vhdx", "-O", "raw"])
                .arg(&copy)
                .arg(&raw)
                .output()
                .expect("qemu-img");
            assert!(
                out.status.success(),
                "cut {cut} (torn {torn}): qemu-img cannot read the image: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                std::fs::read(&raw).expect("raw") == got,
                "cut {cut} (torn {torn}): qemu-img reads other contents than we do"
            );
        }
    }
}
