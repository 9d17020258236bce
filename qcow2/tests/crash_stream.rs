//! Crash consistency of the qcow2 write path, judged on the recorded write stream.
//!
//! Each scenario runs a workload through vdisk on an image qemu-img made, with every change
//! to the image file recorded ([`vdisk_block::file::record`]): each write with its bytes,
//! each flush, each length change. Then the stream is cut, offline, in three ways, each a
//! state a power cut can leave:
//! - **prefix**: the first `k` changes landed, nothing after (at every flush, at the start
//!   and end, and at random points between);
//! - **torn**: a prefix plus some of the 512-byte sectors of the next write;
//! - **scrambled**: everything up to the last flush plus any subset of the sectors written
//!   since (a disk cache may write back in any order between flushes; the driver's ordering
//!   rules put a flush between every two writes that depend on each other).
//!
//! Every cut image must then satisfy:
//! - (a) `qemu-img check` finds no corruption and no check error (leaks are allowed: a
//!   crash may leak a cluster, never free one in use or give one cluster two owners);
//! - (b) vdisk's `check` (report only) agrees: no corruption, no error, and the same leaks;
//! - (c) vdisk opens it read-only, its size is one the disk had since the last completed
//!   flush, every byte acknowledged before that flush reads back, and every other byte
//!   reads as a value it had since then (old or new, never anything else);
//! - (d) for a sample: vdisk's `check -r all` leaves an image `qemu-img check` finds fully
//!   clean (no leaks either), that still reads the same; and qemu-img reads the cut image
//!   as vdisk does.
//!
//! Layouts: v3 with 64 KiB clusters (compressed writes, a grow), v2 with 4 KiB clusters,
//! 512-byte clusters with 1-bit refcounts (new refcount blocks) and with 64-bit refcounts
//! (the refcount table moves), extended L2, an image over a backing file, and one with an
//! internal snapshot made by qemu-img (writes copy shared clusters and L2 tables). Every
//! workload mixes unaligned writes, write-zeroes in both modes, discards and flushes.

mod common;

use std::fs::File;
use std::path::Path;

use common::*;
use vdisk_block::file::record::{FileOp, Recording};
use vdisk_block::testing::Rng;
use vdisk_block::{
    BlockDev, CheckReport, EngineChoice, Format, OpenOptions, Preallocation, RepairMode, ZeroMode,
};
use vdisk_qcow2::{Qcow2Format, Qcow2Image};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

/// One guest operation of a workload.
#[derive(Debug, Clone)]
enum Step {
    Write {
        at: u64,
        data: Vec<u8>,
    },
    Zero {
        at: u64,
        len: u64,
        mode: ZeroMode,
    },
    Discard {
        at: u64,
        len: u64,
    },
    /// One whole cluster, compressed.
    Compressed {
        at: u64,
        data: Vec<u8>,
    },
    Resize {
        to: u64,
    },
    Flush,
}

/// What a finished step changed in the guest view: `data` now at `at`, and the size.
#[derive(Debug, Clone)]
struct Delta {
    at: u64,
    data: Vec<u8>,
    size: u64,
    flush: bool,
}

/// A layout and the workload run on it.
struct Scenario {
    name: &'static str,
    /// `qemu-img create -o` options.
    create: &'static str,
    size: u64,
    /// qemu-io commands that fill the image before the workload.
    fill: &'static [&'static str],
    /// Made by `qemu-img snapshot -c` after the fill.
    snapshot: bool,
    /// A qcow2 backing file of the same size, filled with a pattern.
    backing: bool,
    steps: Vec<Step>,
    /// How many random prefix cuts (each also torn) to take between two flushes.
    per_interval: usize,
    /// What the workload must do to the refcount structures.
    growth: Growth,
}

/// Refcount structure growth a workload is built to cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Growth {
    None,
    /// New refcount blocks.
    Blocks,
    /// A new, larger refcount table elsewhere, and a larger L1 table elsewhere.
    Table,
}

fn pattern(rng: &mut Rng, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    rng.fill(&mut v);
    v
}

/// A random workload: unaligned writes up to `max` bytes, zeroes, discards, compressed
/// clusters when `cluster` allows them, a flush every few steps, ending with a flush.
fn random_steps(
    seed: u64,
    size: u64,
    cluster: u64,
    max: u64,
    n: usize,
    compressed: bool,
) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let mut steps = Vec::new();
    for _ in 0..n {
        let at = rng.below(size - 1);
        let len = (1 + rng.below(max)).min(size - at);
        steps.push(match rng.below(10) {
            0..=3 => Step::Write {
                at,
                data: pattern(&mut rng, len),
            },
            4 => Step::Zero {
                at,
                len,
                mode: ZeroMode::MayUnmap,
            },
            5 => Step::Zero {
                at,
                len,
                mode: ZeroMode::KeepAllocated,
            },
            6 => Step::Discard {
                at: at / cluster * cluster,
                len: (len / cluster).max(1) * cluster,
            },
            7 if compressed => {
                let at = at / cluster * cluster;
                // Compressible: runs of one byte.
                let mut data = vec![0u8; cluster.min(size - at) as usize];
                for (i, b) in data.iter_mut().enumerate() {
                    *b = (i / 100) as u8 ^ rng.below(2) as u8;
                }
                Step::Compressed { at, data }
            }
            _ => Step::Flush,
        });
    }
    steps.push(Step::Flush);
    for s in &mut steps {
        if let Step::Discard { at, len } = s {
            *len = (*len).min(size - *at);
        }
    }
    steps
}

fn scenarios() -> Vec<Scenario> {
    let mut v = Vec::new();
    // v3, 64 KiB clusters: compressed clusters, a grow, writes past the old end.
    let mut steps = random_steps(1, 4 * MIB, 64 * KIB, 200 * KIB, 24, true);
    steps.insert(12, Step::Resize { to: 6 * MIB });
    let mut rng = Rng::new(11);
    steps.insert(
        13,
        Step::Write {
            at: 5 * MIB - 1000,
            data: pattern(&mut rng, 70_000),
        },
    );
    steps.extend(random_steps(2, 6 * MIB, 64 * KIB, 200 * KIB, 10, true));
    v.push(Scenario {
        name: "v3-64k",
        create: "cluster_size=64k",
        size: 4 * MIB,
        fill: &["write -P 0x11 0 1m"],
        snapshot: false,
        backing: false,
        steps,
        per_interval: 3,
        growth: Growth::None,
    });
    v.push(Scenario {
        name: "v2-4k",
        create: "compat=0.10,cluster_size=4k",
        size: 2 * MIB,
        fill: &["write -P 0x22 0 512k"],
        snapshot: false,
        backing: false,
        steps: random_steps(3, 2 * MIB, 4 * KIB, 40 * KIB, 30, true),
        per_interval: 3,
        growth: Growth::None,
    });
    // 512-byte clusters, 1-bit refcounts: one refcount block covers 2 MiB of file, so the
    // large writes need a new one.
    let mut rng = Rng::new(5);
    let mut steps = vec![
        Step::Write {
            at: 0,
            data: pattern(&mut rng, 1200 * KIB),
        },
        Step::Flush,
        Step::Write {
            at: 1300 * KIB + 7,
            data: pattern(&mut rng, 1000 * KIB),
        },
    ];
    steps.extend(random_steps(6, 3 * MIB, 512, 8 * KIB, 16, false));
    v.push(Scenario {
        name: "refcount1-512",
        create: "cluster_size=512,refcount_bits=1",
        size: 3 * MIB,
        fill: &[],
        snapshot: false,
        backing: false,
        steps,
        per_interval: 1,
        growth: Growth::Blocks,
    });
    // 512-byte clusters, 64-bit refcounts: a block covers 32 KiB of file and the first
    // refcount table 2 MiB, so the table must grow (and move).
    let mut rng = Rng::new(7);
    let mut steps = vec![
        Step::Write {
            at: 100,
            data: pattern(&mut rng, 900 * KIB),
        },
        Step::Flush,
        Step::Write {
            at: 1000 * KIB,
            data: pattern(&mut rng, 1300 * KIB),
        },
    ];
    steps.extend(random_steps(8, 3 * MIB, 512, 8 * KIB, 10, false));
    // 96 L1 entries (two clusters) become 288: the L1 table moves.
    steps.push(Step::Resize { to: 9 * MIB });
    steps.push(Step::Write {
        at: 8 * MIB + 3,
        data: pattern(&mut rng, 20 * KIB),
    });
    steps.extend(random_steps(18, 9 * MIB, 512, 8 * KIB, 8, false));
    v.push(Scenario {
        name: "refcount64-512",
        create: "cluster_size=512,refcount_bits=64",
        size: 3 * MIB,
        fill: &[],
        snapshot: false,
        backing: false,
        steps,
        per_interval: 1,
        growth: Growth::Table,
    });
    v.push(Scenario {
        name: "extended-l2",
        create: "extended_l2=on,cluster_size=32k",
        size: 2 * MIB,
        fill: &["write -P 0x33 64k 256k"],
        snapshot: false,
        backing: false,
        steps: random_steps(9, 2 * MIB, 32 * KIB, 50 * KIB, 30, false),
        per_interval: 3,
        growth: Growth::None,
    });
    v.push(Scenario {
        name: "backing",
        create: "cluster_size=16k,backing_file=base.qcow2,backing_fmt=qcow2",
        size: 2 * MIB,
        fill: &["write -P 0x44 1m 64k"],
        snapshot: false,
        backing: true,
        steps: random_steps(10, 2 * MIB, 16 * KIB, 40 * KIB, 30, false),
        per_interval: 3,
        growth: Growth::None,
    });
    v.push(Scenario {
        name: "snapshot",
        create: "cluster_size=8k",
        size: 2 * MIB,
        fill: &["write -P 0x55 0 2m"],
        snapshot: true,
        backing: false,
        steps: random_steps(12, 2 * MIB, 8 * KIB, 30 * KIB, 30, true),
        per_interval: 3,
        growth: Growth::None,
    });
    v
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// qemu-img check's (corruptions, leaks, check-errors).
fn qemu_check(image: &Path) -> Result<(u64, u64, u64), String> {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", path_str(image)])
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "qemu-img check printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let f = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    Ok((f("corruptions"), f("leaks"), f("check-errors")))
}

/// The internal snapshot `before` as qemu-img reads it.
fn snapshot_contents(image: &Path, s: &Scratch) -> Vec<u8> {
    let raw = s.path("snapshot.raw");
    qemu_img(&[
        "convert",
        "-l",
        "snapshot.name=before",
        "-O",
        "raw",
        path_str(image),
        path_str(&raw),
    ]);
    let bytes = std::fs::read(&raw).expect("read snapshot contents");
    let _ = std::fs::remove_file(&raw);
    bytes
}

fn vdisk_check(image: &Path, repair: RepairMode) -> Result<CheckReport, String> {
    let opts = OpenOptions {
        writable: repair != RepairMode::None,
        ..options()
    };
    Qcow2Format
        .check(image, &opts, repair)
        .map_err(|e| format!("vdisk check: {e}"))
}

fn vdisk_contents(image: &Path) -> Result<Vec<u8>, String> {
    let dev = Qcow2Image::open(image, &options()).map_err(|e| format!("read-only open: {e}"))?;
    let mut out = vec![0u8; dev.size() as usize];
    let mut pos = 0usize;
    // Uneven pieces, so reads start and end inside clusters.
    let mut step = 77_777usize;
    while pos < out.len() {
        let n = step.min(out.len() - pos);
        dev.read_at(&mut out[pos..pos + n], pos as u64)
            .map_err(|e| format!("read {n} bytes at {pos}: {e}"))?;
        pos += n;
        step = step * 7 % 300_007 + 512;
    }
    Ok(out)
}

/// Runs `step` on the device and returns its effect on the guest view.
fn perform(dev: &Qcow2Image, step: &Step) -> Delta {
    let size = dev.size();
    let (at, data) = match step {
        Step::Write { at, data } => {
            dev.write_at(data, *at).expect("write");
            (*at, data.clone())
        }
        Step::Zero { at, len, mode } => {
            dev.write_zeroes(*at, *len, *mode).expect("write zeroes");
            (*at, vec![0; *len as usize])
        }
        Step::Discard { at, len } => {
            dev.discard(*at, *len).expect("discard");
            // What a discard leaves (zeroes, or the backing file's bytes) is the driver's
            // choice within qemu's rules; the workload takes what reads back.
            let mut now = vec![0u8; *len as usize];
            dev.read_at(&mut now, *at).expect("read back");
            (*at, now)
        }
        Step::Compressed { at, data } => {
            dev.write_compressed(data, *at).expect("compressed write");
            (*at, data.clone())
        }
        Step::Resize { to } => {
            dev.resize(*to, Preallocation::Off).expect("resize");
            return Delta {
                at: size,
                data: vec![0; (*to - size) as usize],
                size: *to,
                flush: false,
            };
        }
        Step::Flush => {
            dev.flush().expect("flush");
            return Delta {
                at: 0,
                data: Vec::new(),
                size,
                flush: true,
            };
        }
    };
    Delta {
        at,
        data,
        size,
        flush: false,
    }
}

/// The recorded run of one scenario.
struct Run {
    ops: Vec<FileOp>,
    /// `start[s]..end[s]`: the changes step `s` made.
    start: Vec<usize>,
    end: Vec<usize>,
    deltas: Vec<Delta>,
    /// Guest contents before the workload, as long as the largest size reached.
    initial: Vec<u8>,
    initial_size: u64,
}

fn record(scn: &Scenario, s: &Scratch, image: &Path) -> Run {
    let initial = qemu_contents(image, s);
    let initial_size = initial.len() as u64;
    let rec = Recording::start(image).expect("start recording");
    let dev = Qcow2Image::open(
        image,
        &OpenOptions {
            writable: true,
            engine: EngineChoice::Sync,
            ..options()
        },
    )
    .expect("open writable");
    let (mut start, mut end, mut deltas) = (Vec::new(), Vec::new(), Vec::new());
    let mut model = initial.clone();
    for step in &scn.steps {
        start.push(rec.len());
        let d = perform(&dev, step);
        end.push(rec.len());
        model.resize(model.len().max(d.size as usize), 0);
        model[d.at as usize..d.at as usize + d.data.len()].copy_from_slice(&d.data);
        model.truncate(d.size as usize);
        deltas.push(d);
    }
    drop(dev);
    let ops = rec.ops();
    drop(rec);
    // The uncut run: clean for both tools and exactly the model.
    assert_eq!(
        qemu_check(image),
        Ok((0, 0, 0)),
        "{}: uncut image",
        scn.name
    );
    assert_same(
        &qemu_contents(image, s),
        &model,
        &format!("{}: uncut contents (qemu-img)", scn.name),
    );
    let max = deltas
        .iter()
        .map(|d| d.size)
        .max()
        .unwrap_or(0)
        .max(initial_size);
    let mut initial = initial;
    initial.resize(max as usize, 0);
    Run {
        ops,
        start,
        end,
        deltas,
        initial,
        initial_size,
    }
}

/// One cut: `prefix` changes applied whole, then `extra` (pieces of later writes);
/// changes from index `reach` on cannot have landed at all.
struct Cut {
    prefix: usize,
    extra: Vec<FileOp>,
    reach: usize,
    what: String,
    /// Also repair it and compare with qemu-img's reading.
    deep: bool,
}

fn pieces_subset(rng: &mut Rng, ops: &[FileOp], whole_too: bool) -> Vec<FileOp> {
    let mut out = Vec::new();
    for op in ops {
        if matches!(op, FileOp::Write { .. }) {
            let pieces = op.sectors(SECTOR);
            let mut chosen: Vec<FileOp> =
                pieces.iter().filter(|_| rng.chance(50)).cloned().collect();
            if !whole_too && chosen.len() == pieces.len() && pieces.len() > 1 {
                chosen.pop();
            }
            out.extend(chosen);
        } else {
            out.push(op.clone());
        }
    }
    out
}

fn cuts(run: &Run, per_interval: usize, seed: u64) -> Vec<Cut> {
    let n = run.ops.len();
    let mut rng = Rng::new(seed);
    let flushes: Vec<usize> = (0..n).filter(|&i| run.ops[i] == FileOp::Flush).collect();
    let mut cuts = Vec::new();
    let push = |cuts: &mut Vec<Cut>, prefix, extra, reach, what: String| {
        cuts.push(Cut {
            prefix,
            extra,
            reach,
            what,
            deep: false,
        })
    };
    push(&mut cuts, 0, Vec::new(), 0, "nothing landed".into());
    for &f in &flushes {
        push(
            &mut cuts,
            f + 1,
            Vec::new(),
            f + 1,
            format!("just after flush {f}"),
        );
    }
    push(&mut cuts, n, Vec::new(), n, "everything landed".into());
    // Random points inside each interval between flushes (and before the first).
    let mut bounds = vec![0];
    bounds.extend(flushes.iter().map(|f| f + 1));
    bounds.push(n);
    for w in bounds.windows(2) {
        let (lo, hi) = (w[0], w[1]);
        if hi <= lo + 1 {
            continue;
        }
        for _ in 0..per_interval {
            let k = lo + 1 + rng.below((hi - lo - 1) as u64) as usize;
            push(&mut cuts, k, Vec::new(), k, format!("prefix {k}"));
            // The same point with write `k` torn: some of its sectors landed.
            if let Some(op) = run.ops.get(k) {
                if op.sectors(SECTOR).len() > 1 {
                    let torn = pieces_subset(&mut rng, std::slice::from_ref(op), false);
                    push(
                        &mut cuts,
                        k,
                        torn,
                        k + 1,
                        format!("prefix {k}, write {k} torn"),
                    );
                }
            }
        }
        // Any subset of the sectors written since the flush, up to a random point.
        let k = lo + 1 + rng.below((hi - lo) as u64) as usize;
        let extra = pieces_subset(&mut rng, &run.ops[lo..k], true);
        push(
            &mut cuts,
            lo,
            extra,
            k,
            format!("flushed prefix {lo}, then sectors of changes {lo}..{k} in any order"),
        );
    }
    // Sorted by prefix, so one working copy can advance through them.
    cuts.sort_by_key(|c| (c.prefix, c.reach));
    let deep_every = (cuts.len() / 12).max(1);
    for (i, c) in cuts.iter_mut().enumerate() {
        c.deep = i % deep_every == 0 || c.prefix == n;
    }
    cuts
}

/// What the guest view may be for a cut: the state after the last completed flush, plus
/// every value a byte took in the steps since, up to the last one that may have written.
struct Window<'a> {
    durable: &'a [u8],
    durable_size: u64,
    since: &'a [Delta],
}

impl Window<'_> {
    fn judge(&self, got: &[u8]) -> Result<(), String> {
        let sizes: Vec<u64> = std::iter::once(self.durable_size)
            .chain(self.since.iter().map(|d| d.size))
            .collect();
        if !sizes.contains(&(got.len() as u64)) {
            return Err(format!("size {} is none of {sizes:?}", got.len()));
        }
        let limit = (self.durable_size as usize).min(got.len());
        const CHUNK: usize = 4096;
        let mut at = 0;
        while at < got.len() {
            let end = (at + CHUNK).min(got.len());
            if end <= limit && got[at..end] == self.durable[at..end] {
                at = end;
                continue;
            }
            for (b, &g) in got.iter().enumerate().take(end).skip(at) {
                let durable = b < limit && self.durable[b] == g;
                if durable {
                    continue;
                }
                let later = self.since.iter().any(|d| {
                    (b as u64) >= d.at
                        && ((b as u64) - d.at) < d.data.len() as u64
                        && d.data[b - d.at as usize] == g
                });
                if !later {
                    return Err(format!(
                        "byte {b} reads {g:#04x}; after the last flush it was {:#04x}, and \
                         no step since wrote {g:#04x} there",
                        self.durable.get(b).copied().unwrap_or(0)
                    ));
                }
            }
            at = end;
        }
        Ok(())
    }
}

/// Judges one materialised cut image (see the module docs).
fn judge(
    image: &Path,
    window: &Window<'_>,
    deep: bool,
    snapshot: Option<&[u8]>,
    s: &Scratch,
) -> Result<(), String> {
    let q = qemu_check(image)?;
    if q.0 != 0 || q.2 != 0 {
        return Err(format!(
            "qemu-img check: {} corruptions, {} errors",
            q.0, q.2
        ));
    }
    let ours = vdisk_check(image, RepairMode::None)?;
    if ours.corruptions != 0 || ours.check_errors != 0 {
        return Err(format!(
            "vdisk check: {} corruptions, {} errors: {:?}",
            ours.corruptions, ours.check_errors, ours.messages
        ));
    }
    if ours.leaks != q.1 {
        return Err(format!(
            "vdisk check finds {} leaks, qemu-img {}: {:?}",
            ours.leaks, q.1, ours.messages
        ));
    }
    let got = vdisk_contents(image)?;
    window.judge(&got)?;
    if !deep {
        return Ok(());
    }
    let theirs = qemu_contents(image, s);
    if theirs != got {
        return Err("qemu-img reads the cut image differently from vdisk".into());
    }
    // The internal snapshot's clusters are shared, never written: it must read as taken.
    if let Some(taken) = snapshot {
        if snapshot_contents(image, s) != taken {
            return Err("the internal snapshot's contents changed".into());
        }
    }
    let repaired = s.path("repaired.qcow2");
    std::fs::copy(image, &repaired).map_err(|e| format!("copy: {e}"))?;
    let fixed = vdisk_check(&repaired, RepairMode::All)?;
    let after = qemu_check(&repaired)?;
    if after != (0, 0, 0) {
        return Err(format!(
            "after vdisk check -r all ({} leaks fixed), qemu-img check finds {after:?}",
            fixed.leaks_fixed
        ));
    }
    if vdisk_contents(&repaired)? != got {
        return Err("check -r all changed the guest contents".into());
    }
    Ok(())
}

/// Makes the scenario's image in `s` and records its workload: the file before the workload
/// and the run.
fn prepare(scn: &Scenario, s: &Scratch) -> (Vec<u8>, Run) {
    let image = s.path("image.qcow2");
    if scn.backing {
        let base = s.path("base.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            path_str(&base),
            &scn.size.to_string(),
        ]);
        qemu_io(&base, &["write -P 0x66 0 2m", "write -P 0x67 300k 100k"]);
    }
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        scn.create,
        path_str(&image),
    ];
    let size = scn.size.to_string();
    args.push(&size);
    qemu_img(&args);
    if !scn.fill.is_empty() {
        qemu_io(&image, scn.fill);
    }
    if scn.snapshot {
        qemu_img(&["snapshot", "-c", "before", path_str(&image)]);
    }
    let pristine = std::fs::read(&image).expect("read pristine image");
    let run = record(scn, s, &image);
    let before = refcount_table(&pristine);
    let after = refcount_table(&std::fs::read(&image).expect("read image"));
    match scn.growth {
        Growth::None => {}
        Growth::Blocks => assert!(
            after.1 > before.1,
            "{}: the workload should add refcount blocks ({before:?} -> {after:?})",
            scn.name
        ),
        Growth::Table => {
            assert!(
                after.0 != before.0,
                "{}: the workload should move the refcount table ({before:?} -> {after:?})",
                scn.name
            );
            let l1 = |f: &[u8]| u64::from_be_bytes(f[40..48].try_into().expect("8 bytes"));
            let now = std::fs::read(&image).expect("read image");
            assert_ne!(
                l1(&pristine),
                l1(&now),
                "{}: the L1 table should move",
                scn.name
            );
        }
    }
    (pristine, run)
}

/// The refcount table's offset and how many refcount blocks it lists, from a file's bytes.
fn refcount_table(file: &[u8]) -> (u64, usize) {
    let be64 = |at: usize| u64::from_be_bytes(file[at..at + 8].try_into().expect("8 bytes"));
    let offset = be64(48);
    let clusters = u32::from_be_bytes(file[56..60].try_into().expect("4 bytes")) as usize;
    let cluster = 1usize << u32::from_be_bytes(file[20..24].try_into().expect("4 bytes"));
    let entries = (0..clusters * cluster / 8)
        .filter(|i| be64(offset as usize + i * 8) != 0)
        .count();
    (offset, entries)
}

fn every_cut(scn: &Scenario) {
    let s = Scratch::new(scn.name);
    let (pristine, run) = prepare(scn, &s);

    // Every guest flush made everything before it durable: its last change is a flush.
    for (i, d) in run.deltas.iter().enumerate() {
        if d.flush {
            assert!(
                run.end[i] > 0 && run.ops[run.end[i] - 1] == FileOp::Flush,
                "{}: guest flush {i} returned without a file flush after the last write",
                scn.name
            );
        }
    }
    if std::env::var_os("CRASH_TRACE").is_some() {
        for (i, op) in run.ops.iter().enumerate() {
            let step = (0..run.start.len()).find(|&s| run.start[s] <= i && i < run.end[s]);
            match op {
                FileOp::Write { offset, data } => {
                    eprintln!("{i:4} step {step:?}: write {offset:#x} +{:#x}", data.len())
                }
                other => eprintln!("{i:4} step {step:?}: {other:?}"),
            }
        }
    }
    let cuts = cuts(&run, scn.per_interval, scn.name.len() as u64 * 1_000_003);
    eprintln!(
        "{}: {} file changes ({} flushes) from {} steps; {} cuts",
        scn.name,
        run.ops.len(),
        run.ops.iter().filter(|o| **o == FileOp::Flush).count(),
        run.deltas.len(),
        cuts.len()
    );

    // The working copy holds the first `applied` changes; the durable model the guest view
    // after the first `durable_steps` steps.
    let working = s.path("working.qcow2");
    std::fs::write(&working, &pristine).expect("write working copy");
    let work = File::options()
        .write(true)
        .open(&working)
        .expect("open working copy");
    let mut applied = 0;
    let mut durable = run.initial.clone();
    let mut durable_size = run.initial_size;
    let mut durable_steps = 0;
    let cut_image = s.path("cut.qcow2");
    let mut failures = Vec::new();
    let taken = scn
        .snapshot
        .then(|| run.initial[..run.initial_size as usize].to_vec());
    let snapshot = taken.as_deref();
    for cut in &cuts {
        while applied < cut.prefix {
            run.ops[applied].apply(&work).expect("apply change");
            applied += 1;
        }
        // Steps up to the last guest flush whose changes all landed are durable.
        let last_flush = (0..run.deltas.len())
            .rev()
            .find(|&i| run.deltas[i].flush && run.end[i] <= cut.prefix)
            .map_or(0, |i| i + 1);
        while durable_steps < last_flush {
            let d = &run.deltas[durable_steps];
            durable[d.at as usize..d.at as usize + d.data.len()].copy_from_slice(&d.data);
            durable_size = d.size;
            durable_steps += 1;
        }
        // Steps that may have changed something: those that started before `reach`.
        let last = (0..run.deltas.len())
            .rev()
            .find(|&i| run.start[i] < cut.reach)
            .map_or(0, |i| i + 1);
        let window = Window {
            durable: &durable,
            durable_size,
            since: &run.deltas[durable_steps..last.max(durable_steps)],
        };
        std::fs::copy(&working, &cut_image).expect("copy cut image");
        {
            let f = File::options()
                .write(true)
                .open(&cut_image)
                .expect("open cut image");
            for op in &cut.extra {
                op.apply(&f).expect("apply piece");
            }
        }
        if let Err(why) = judge(&cut_image, &window, cut.deep, snapshot, &s) {
            let keep = s.0.with_file_name(format!("failed-cut-{}.qcow2", scn.name));
            let _ = std::fs::copy(&cut_image, &keep);
            failures.push(format!(
                "{}: cut at {} (steps {}..{} since the last flush): {why} (kept as {})",
                scn.name,
                cut.what,
                durable_steps,
                last,
                keep.display()
            ));
            if failures.len() >= 3 {
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_cut_of_the_write_stream_leaves_a_consistent_image() {
    let only = std::env::var("CRASH_SCENARIO").ok();
    for scn in scenarios() {
        if only.as_deref().is_some_and(|o| o != scn.name) {
            continue;
        }
        let t = std::time::Instant::now();
        every_cut(&scn);
        eprintln!("{}: {:.1} s", scn.name, t.elapsed().as_secs_f64());
    }
}

/// Writes `pristine` to `path` and applies `ops` to it.
fn materialise<'a>(pristine: &[u8], ops: impl IntoIterator<Item = &'a FileOp>, path: &Path) {
    std::fs::write(path, pristine).expect("write image");
    let f = File::options().write(true).open(path).expect("open image");
    for op in ops {
        op.apply(&f).expect("apply change");
    }
}

/// The judge has teeth: cuts no power cut can make from this driver's stream, because they
/// break an ordering rule, are refused. An L2 table that lands before the refcount block
/// counting its new clusters is a corruption; a flushed write whose data never landed
/// (only its L2 entry did) does not read back.
#[test]
fn cuts_that_break_the_ordering_rules_are_caught() {
    let mut rng = Rng::new(99);
    let scn = Scenario {
        name: "teeth",
        create: "cluster_size=64k",
        size: MIB,
        // So the L2 table exists and the write needs only data and refcounts first.
        fill: &["write -P 1 960k 64k"],
        snapshot: false,
        backing: false,
        steps: vec![
            Step::Write {
                at: 0,
                data: pattern(&mut rng, 200 * KIB),
            },
            Step::Flush,
        ],
        per_interval: 0,
        growth: Growth::None,
    };
    let s = Scratch::new(scn.name);
    let (pristine, run) = prepare(&scn, &s);
    let ops = &run.ops;
    // The driver's stream: data, refcount block, flush, L2 table, flush.
    let first_flush = ops
        .iter()
        .position(|o| *o == FileOp::Flush)
        .expect("a flush");
    let refblock = first_flush - 1;
    let l2 = (first_flush..ops.len())
        .find(|&i| matches!(ops[i], FileOp::Write { .. }))
        .expect("a write after the flush");
    assert!(
        matches!(ops[refblock], FileOp::Write { .. }) && refblock > 0,
        "{ops:?}"
    );
    let image = s.path("bad.qcow2");

    materialise(&pristine, ops[..refblock].iter().chain([&ops[l2]]), &image);
    let window = Window {
        durable: &run.initial,
        durable_size: run.initial_size,
        since: &run.deltas[..1],
    };
    let err = judge(&image, &window, false, None, &s).expect_err("L2 before refcounts");
    assert!(err.contains("corruptions"), "{err}");

    let mut model = run.initial.clone();
    model[..200 * KIB as usize].copy_from_slice(&run.deltas[0].data);
    // The data writes land as zeroes (what the disk held there), everything else whole.
    let lost: Vec<FileOp> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| match op {
            FileOp::Write { offset, data } if i < refblock => FileOp::Write {
                offset: *offset,
                data: vec![0; data.len()],
            },
            other => other.clone(),
        })
        .collect();
    materialise(&pristine, &lost, &image);
    let window = Window {
        durable: &model,
        durable_size: run.initial_size,
        since: &[],
    };
    let err = judge(&image, &window, false, None, &s).expect_err("data lost");
    assert!(err.starts_with("byte "), "{err}");
    // And the uncut stream is accepted by the same judge.
    materialise(&pristine, ops, &image);
    judge(&image, &window, true, None, &s).expect("the uncut stream");
}
