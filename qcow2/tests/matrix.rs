//! The generated qcow2 interop matrix.
//!
//! Axes: compat (0.10, 1.1) × cluster size (512 B, 4 KiB, 64 KiB, 2 MiB) × refcount_bits
//! (1, 16, 64) × extended_l2 × lazy_refcounts × preallocation (off, metadata, falloc, full)
//! × backing file (no, yes) × external data file (none, data_file, data_file +
//! data_file_raw). Which combinations qemu-img refuses is a rule list in [`Combo::refusals`];
//! `refusals_match_qemu` checks that list against qemu-img and our `create` on every
//! combination of the first four axes, on every combination of the other axes with compat
//! and extended_l2 (512-byte and 64 KiB clusters, 16-bit refcounts) and on the covering
//! design below; where both accept, the files they write must be byte for byte the same.
//!
//! Which combinations run, both ways:
//! - the **base product**: every combination of compat × cluster size × refcount_bits ×
//!   extended_l2 that qemu-img accepts (22 of 48), the other axes at their defaults;
//! - a **covering design** over all eight axes, generated greedily: together with the base
//!   product it contains every pair of values of any two axes that qemu-img accepts in one
//!   image (so every lazy_refcounts value, preallocation mode, backing yes/no and data file
//!   kind meets every cluster size, compat level, refcount width, and each other).
//!   `covering_design_covers_every_valid_pair` proves that by enumeration.
//!
//! Each combination is checked in both directions:
//! - **qemu → vdisk**: `qemu-img create`, then `qemu-io` writes a deterministic list
//!   (cluster-crossing and subcluster-sized writes, `write -z` with and without `-u`,
//!   discards, writes over the backing file and across L2 tables); our driver must read
//!   every byte as the model computed here, and so must `qemu-img convert -O raw`; our
//!   block status must agree with `qemu-img map` (the top layer's, over a backing file);
//!   then the vdisk → qemu workload (another seed) runs on that image, over qemu's layout;
//! - **vdisk → qemu**: our `create` with the same options, then a seeded random workload
//!   through `BlockDev` (writes, zeroes in both modes, discards, partial clusters, flushes,
//!   a reopen halfway) against an in-memory model; `qemu-img check` must find no
//!   corruption and no leak, `qemu-img compare` against the model as a raw file must find
//!   them identical, our block status must agree with `qemu-img map`, and whole clusters
//!   the workload zeroed must not show data in `qemu-img map` (v3 images without an
//!   external data file, where qemu itself would use zero flags).
//!
//! With a raw data file (`data_file_raw=on`) the data file itself must equal the model.
//! qemu ignores discards on v2 images with a backing file (no zero flag to hide the
//! backing data with); the qemu-side model does the same.
//!
//! Failures name the combination (its option string) and the workload seed.

mod common;

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;

use common::*;
use vdisk_block::testing::Rng;
use vdisk_block::{BlockDev, CreateOptions, ErrorKind, Format, OpenOptions, ZeroMode};
use vdisk_qcow2::{Qcow2Format, Qcow2Image};

const CLUSTERS: [u64; 4] = [512, 4096, 65536, 2 << 20];
const REFCOUNT_BITS: [u32; 3] = [1, 16, 64];
const PREALLOC: [&str; 4] = ["off", "metadata", "falloc", "full"];
const DATA: [DataFile; 3] = [DataFile::None, DataFile::Plain, DataFile::Raw];
/// Values per axis, in the order of [`Combo::axes`].
const AXIS_SIZES: [usize; 8] = [2, 4, 3, 2, 2, 4, 2, 3];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum DataFile {
    None,
    Plain,
    Raw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Combo {
    v3: bool,
    cluster: u64,
    refcount_bits: u32,
    extended_l2: bool,
    lazy: bool,
    prealloc: &'static str,
    backing: bool,
    data: DataFile,
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

impl Combo {
    fn from_axes(a: [usize; 8]) -> Combo {
        Combo {
            v3: a[0] == 1,
            cluster: CLUSTERS[a[1]],
            refcount_bits: REFCOUNT_BITS[a[2]],
            extended_l2: a[3] == 1,
            lazy: a[4] == 1,
            prealloc: PREALLOC[a[5]],
            backing: a[6] == 1,
            data: DATA[a[7]],
        }
    }

    fn axes(&self) -> [usize; 8] {
        let pos = |i: Option<usize>| i.expect("value on its axis");
        [
            self.v3 as usize,
            pos(CLUSTERS.iter().position(|&c| c == self.cluster)),
            pos(REFCOUNT_BITS.iter().position(|&r| r == self.refcount_bits)),
            self.extended_l2 as usize,
            self.lazy as usize,
            pos(PREALLOC.iter().position(|&p| p == self.prealloc)),
            self.backing as usize,
            pos(DATA.iter().position(|&d| d == self.data)),
        ]
    }

    /// The combination with the last four axes at qemu-img's defaults.
    fn base(v3: bool, cluster: u64, refcount_bits: u32, extended_l2: bool) -> Combo {
        Combo {
            v3,
            cluster,
            refcount_bits,
            extended_l2,
            lazy: false,
            prealloc: "off",
            backing: false,
            data: DataFile::None,
        }
    }

    /// The `-o` string, every axis spelled out; `data_path` names the data file.
    fn options(&self, data_path: &Path) -> String {
        let mut o = format!(
            "compat={},cluster_size={},refcount_bits={},extended_l2={},lazy_refcounts={},preallocation={}",
            if self.v3 { "1.1" } else { "0.10" },
            self.cluster,
            self.refcount_bits,
            on_off(self.extended_l2),
            on_off(self.lazy),
            self.prealloc
        );
        if self.backing {
            o.push_str(",backing_file=base.qcow2,backing_fmt=qcow2");
        }
        if self.data != DataFile::None {
            o.push_str(&format!(
                ",data_file={},data_file_raw={}",
                data_path.display(),
                on_off(self.data == DataFile::Raw)
            ));
        }
        o
    }

    /// The name failures use.
    fn label(&self) -> String {
        self.options(Path::new("DATA"))
    }

    /// qemu-img's messages for every rule this combination breaks (none: accepted).
    fn refusals(&self) -> Vec<&'static str> {
        let mut r = Vec::new();
        if !self.v3 && self.refcount_bits != 16 {
            r.push("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)");
        }
        if !self.v3 && self.lazy {
            r.push("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if !self.v3 && self.extended_l2 {
            r.push("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if self.extended_l2 && self.cluster < 16384 {
            r.push(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            );
        }
        if !self.v3 && self.data != DataFile::None {
            r.push("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if self.data == DataFile::Raw && self.backing {
            r.push("Backing file and data-file-raw cannot be used at the same time");
        }
        if self.prealloc != "off" && self.backing && !self.extended_l2 {
            r.push("Backing file and preallocation can only be used at the same time if extended_l2 is on");
        }
        r
    }

    fn valid(&self) -> bool {
        self.refusals().is_empty()
    }

    /// Virtual size: 8 MiB, or 16 clusters when that is more.
    fn size(&self) -> u64 {
        (8u64 << 20).max(16 * self.cluster)
    }

    /// The bytes a subcluster-sized request covers (a quarter cluster without extended L2).
    fn sub(&self) -> u64 {
        if self.extended_l2 {
            self.cluster / 32
        } else {
            self.cluster / 4
        }
    }

    /// Guest bytes one L2 table maps.
    fn l2_span(&self) -> u64 {
        let entry = if self.extended_l2 { 16 } else { 8 };
        self.cluster / entry * self.cluster
    }

    /// A seed derived from the combination (FNV-1a), so each one runs its own workload.
    fn seed(&self) -> u64 {
        self.label().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

fn full_product() -> impl Iterator<Item = Combo> {
    (0..AXIS_SIZES.iter().product::<usize>()).map(|mut n| {
        let mut a = [0usize; 8];
        for (i, size) in AXIS_SIZES.iter().enumerate().rev() {
            a[i] = n % size;
            n /= size;
        }
        Combo::from_axes(a)
    })
}

/// Compat × cluster size × refcount_bits × extended_l2, the other axes at their defaults.
fn base_product() -> Vec<Combo> {
    let mut out = Vec::new();
    for v3 in [false, true] {
        for cluster in CLUSTERS {
            for rb in REFCOUNT_BITS {
                for ext in [false, true] {
                    out.push(Combo::base(v3, cluster, rb, ext));
                }
            }
        }
    }
    out
}

type Pair = (usize, usize, usize, usize);

fn pairs(c: &Combo) -> impl Iterator<Item = Pair> {
    let a = c.axes();
    (0..8).flat_map(move |i| (i + 1..8).map(move |j| (i, a[i], j, a[j])))
}

/// Greedy pairwise covering: starting from the pairs the valid base product covers, take
/// the valid combination that covers most new pairs until every pair some valid
/// combination has is covered.
fn covering() -> Vec<Combo> {
    let valid: Vec<Combo> = full_product().filter(Combo::valid).collect();
    let needed: BTreeSet<Pair> = valid.iter().flat_map(pairs).collect();
    let mut covered: BTreeSet<Pair> = base_product()
        .iter()
        .filter(|c| c.valid())
        .flat_map(pairs)
        .collect();
    let mut chosen = Vec::new();
    while covered.len() < needed.len() {
        let (_, best) = valid
            .iter()
            .enumerate()
            .max_by_key(|(at, c)| {
                // Ties go to the earliest (max_by_key keeps the last).
                let gain = pairs(c).filter(|p| !covered.contains(p)).count();
                (gain, std::cmp::Reverse(*at))
            })
            .expect("valid combinations");
        let before = covered.len();
        covered.extend(pairs(best));
        assert!(
            covered.len() > before,
            "the greedy covering made no progress"
        );
        chosen.push(*best);
    }
    chosen
}

/// Runs `f` for every combination, then fails listing every combination that failed.
fn for_each(combos: &[Combo], what: &str, f: fn(&Combo)) {
    let mut failures = Vec::new();
    for c in combos {
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(c))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!(
                "{what} [{}] (seed {:#x}): {msg}",
                c.label(),
                c.seed()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} combinations failed:\n{}",
        failures.len(),
        combos.len(),
        failures.join("\n")
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The backing file every combination with one uses: a 64 KiB-cluster qcow2 image 3/4 of
/// the top's size, written by qemu-io. Returns its contents as seen through a top image
/// of `size` bytes (zeroes past its end).
fn make_base(scratch: &Scratch, size: u64) -> Vec<u8> {
    let base = scratch.path("base.qcow2");
    let base_size = size / 4 * 3;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        s(&base),
        &base_size.to_string(),
    ]);
    let ops = [
        Op::Write(0xb1, 0, size / 2),
        Op::Write(0xb2, size / 2 + 4096, 8192),
        Op::Write(0xb3, base_size - 5000, 5000),
    ];
    let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    qemu_io(&base, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    let mut model = vec![0u8; size as usize];
    for op in &ops {
        op.apply(&mut model, 65536, true);
    }
    model
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write(u8, u64, u64),
    Zero(u64, u64, bool),
    Discard(u64, u64),
}

impl Op {
    fn qemu_io(&self) -> String {
        match *self {
            Op::Write(p, off, len) => format!("write -P {p:#x} {off} {len}"),
            Op::Zero(off, len, false) => format!("write -z {off} {len}"),
            Op::Zero(off, len, true) => format!("write -z -u {off} {len}"),
            Op::Discard(off, len) => format!("discard {off} {len}"),
        }
    }

    /// What qemu leaves: a discard zeroes the whole clusters inside the range (partial
    /// ones are ignored), unless `discards` is false: qemu ignores discards on v2 images
    /// with a backing file, which have no zero flag to hide the backing data with.
    fn apply(&self, model: &mut [u8], cluster: u64, discards: bool) {
        let r = |off: u64, len: u64| off as usize..(off + len) as usize;
        match *self {
            Op::Write(p, off, len) => model[r(off, len)].fill(p),
            Op::Zero(off, len, _) => model[r(off, len)].fill(0),
            Op::Discard(off, len) => {
                let start = off.next_multiple_of(cluster);
                let end = (off + len) / cluster * cluster;
                if discards && start < end {
                    model[r(start, end - start)].fill(0);
                }
            }
        }
    }
}

/// The qemu-io list for a combination: writes crossing cluster (and, where the image is
/// big enough, L2 table) boundaries, subcluster-sized writes and zeroes, zeroes with and
/// without unmap, partial discards, writes over the backing file and its end, a large
/// write that needs new refcount blocks, and the last bytes of the disk.
fn qemu_ops(c: &Combo) -> Vec<Op> {
    let cs = c.cluster;
    let sc = c.sub();
    let size = c.size();
    let mut ops = vec![
        Op::Write(0x11, cs / 2 - cs / 8, 2 * cs + cs / 4),
        Op::Write(0x22, 3 * cs + sc, sc),
        Op::Write(0x23, 3 * cs + 3 * sc + sc / 4, sc / 2),
        Op::Zero(cs + cs / 4, cs / 2, false),
        Op::Write(0x44, 4 * cs, 3 * cs),
        Op::Zero(4 * cs, cs, true),
        Op::Discard(5 * cs - cs / 4, cs + cs / 2),
        Op::Zero(6 * cs + sc, sc, true),
        Op::Zero(7 * cs + cs / 2, cs, false),
    ];
    let l2 = c.l2_span();
    if l2 + cs < size / 2 {
        ops.push(Op::Write(0x55, l2 - cs / 2 - 7, cs + 14));
    }
    let big = (size / 2).max(9 * cs) + 3;
    ops.push(Op::Write(0x66, big, size / 4));
    ops.push(Op::Discard(big + 2 * cs + cs / 3, 3 * cs));
    if c.backing {
        // Across the end of the backing file (3/4 of the disk).
        ops.push(Op::Write(0xc1, size / 4 * 3 - cs / 2, cs));
    }
    ops.push(Op::Write(0x77, size - 1000, 1000));
    ops.push(Op::Write(0x99, cs / 2, cs));
    ops
}

fn qemu_create(c: &Combo, scratch: &Scratch, img: &Path, size: u64) {
    let opts = c.options(&scratch.path("img.data"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        s(img),
        &size.to_string(),
    ]);
}

fn vdisk_create(c: &Combo, scratch: &Scratch, img: &Path, size: u64) -> vdisk_block::Result<()> {
    let opts = c.options(&scratch.path("img.data"));
    Qcow2Format.create(
        img,
        CreateOptions {
            size,
            options: CreateOptions::parse_options(&opts).expect("option syntax"),
        },
    )
}

fn qemu_to_vdisk(c: &Combo) {
    let scratch = Scratch::new("mx-q");
    let size = c.size();
    let base = c.backing.then(|| make_base(&scratch, size));
    let mut model = base.clone().unwrap_or_else(|| vec![0u8; size as usize]);
    let img = scratch.path("img.qcow2");
    qemu_create(c, &scratch, &img, size);
    let ops = qemu_ops(c);
    let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    qemu_io(&img, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    for op in &ops {
        op.apply(&mut model, c.cluster, c.v3 || !c.backing);
    }
    assert_same(&read_all(&open(&img)), &model, "vdisk read vs model");
    assert_same(
        &qemu_contents(&img, &scratch),
        &model,
        "qemu-img convert vs model",
    );
    if c.data == DataFile::Raw {
        assert_raw_data_file(&scratch, &model);
    }
    if c.backing {
        assert_top_layer_map_matches(&img);
    } else {
        assert_map_matches(&img);
    }
    // Then our driver writes over qemu's layout: its allocations, zero clusters and
    // preallocated clusters.
    workload_then_check(c, &scratch, &img, model, base.as_deref(), !c.seed());
}

/// Over a backing file `qemu-img map` reports the layer each range comes from (depth 0
/// and not present: allocated nowhere, past the backing file's end): our block status
/// must call exactly the top layer's ranges allocated, with qemu's data and zero flags
/// there. Elsewhere our zero flag may stay false, as it describes this layer only.
fn assert_top_layer_map_matches(image: &Path) {
    let dev = open(image);
    let json = qemu_img(&["map", "--output=json", s(image)]);
    let extents: serde_json::Value = serde_json::from_str(&json).expect("map json");
    for ext in extents.as_array().expect("map array") {
        let start = ext["start"].as_u64().expect("start");
        let end = start + ext["length"].as_u64().expect("length");
        let top = ext["depth"].as_u64() == Some(0) && ext["present"].as_bool() == Some(true);
        let mut pos = start;
        while pos < end {
            let st = dev.block_status(pos, end - pos).expect("block status");
            let what = format!("at {pos}: ours {st:?}, qemu {ext}");
            assert_eq!(st.allocated, top, "allocated {what}");
            if top {
                assert_eq!(Some(st.data), ext["data"].as_bool(), "data {what}");
                assert_eq!(Some(st.zero), ext["zero"].as_bool(), "zero {what}");
            }
            pos += st.len.max(1);
        }
    }
}

/// A raw data file must itself be the guest disk.
fn assert_raw_data_file(scratch: &Scratch, model: &[u8]) {
    let mut bytes = std::fs::read(scratch.path("img.data")).expect("read data file");
    bytes.resize(model.len(), 0);
    assert_same(&bytes, model, "raw data file vs model");
}

fn open_rw(path: &Path) -> Qcow2Image {
    let opts = OpenOptions {
        writable: true,
        ..options()
    };
    Qcow2Image::open(path, &opts).unwrap_or_else(|e| panic!("open rw {}: {e}", path.display()))
}

/// A request range: byte-granular, whole clusters, whole subclusters, or straddling a
/// cluster boundary.
fn pick_range(rng: &mut Rng, c: &Combo, size: u64) -> (u64, u64) {
    let cs = c.cluster;
    let sc = c.sub();
    let max = (3 * cs).min(384 << 10);
    let (off, len) = match rng.below(4) {
        0 => (rng.below(size), 1 + rng.below(max)),
        1 => (rng.below(size / cs) * cs, cs * (1 + rng.below(3))),
        2 => (rng.below(size / sc) * sc, sc * (1 + rng.below(4))),
        _ => {
            let edge = (1 + rng.below(size / cs - 1)) * cs;
            let back = 1 + rng.below(sc);
            (edge - back, back + 1 + rng.below(sc))
        }
    };
    let off = off.min(size - 1);
    (off, len.min(size - off))
}

const WORKLOAD_OPS: usize = 120;

fn vdisk_to_qemu(c: &Combo) {
    let scratch = Scratch::new("mx-v");
    let size = c.size();
    let base = c.backing.then(|| make_base(&scratch, size));
    let model = base.clone().unwrap_or_else(|| vec![0u8; size as usize]);
    let img = scratch.path("img.qcow2");
    vdisk_create(c, &scratch, &img, size).unwrap_or_else(|e| panic!("vdisk create: {e}"));
    workload_then_check(c, &scratch, &img, model, base.as_deref(), c.seed());
}

/// Runs the seeded workload through our driver on `img`, whose contents are `model`
/// (`base`: the backing file's, as the top sees them), then has qemu check and compare it.
fn workload_then_check(
    c: &Combo,
    scratch: &Scratch,
    img: &Path,
    mut model: Vec<u8>,
    base: Option<&[u8]>,
    seed: u64,
) {
    let size = c.size();
    let cs = c.cluster;
    // Clusters the workload last zeroed or discarded whole, and which read back as zeroes.
    let mut zeroed = vec![false; (size / cs) as usize];
    let mut rng = Rng::new(seed);
    {
        let mut dev = open_rw(img);
        for step in 0..WORKLOAD_OPS {
            if step == WORKLOAD_OPS / 2 {
                // Halfway, close and reopen: what the first half wrote must persist.
                drop(dev);
                dev = open_rw(img);
            }
            let (off, len) = pick_range(&mut rng, c, size);
            let range = off as usize..(off + len) as usize;
            let whole = off.div_ceil(cs)..(off + len) / cs;
            let touched = off / cs..(off + len).div_ceil(cs);
            let at = format!("workload seed {seed:#x}, step {step}: {off}+{len}");
            match rng.below(100) {
                0..=44 => {
                    let mut buf = vec![0u8; len as usize];
                    if rng.chance(50) {
                        rng.fill(&mut buf);
                    } else {
                        buf.fill(rng.below(255) as u8 + 1);
                    }
                    dev.write_at(&buf, off)
                        .unwrap_or_else(|e| panic!("{at}: write: {e}"));
                    model[range].copy_from_slice(&buf);
                    touched.for_each(|i| zeroed[i as usize] = false);
                }
                45..=71 => {
                    let mode = if rng.chance(50) {
                        ZeroMode::MayUnmap
                    } else {
                        ZeroMode::KeepAllocated
                    };
                    dev.write_zeroes(off, len, mode)
                        .unwrap_or_else(|e| panic!("{at}: write_zeroes {mode:?}: {e}"));
                    model[range].fill(0);
                    touched.for_each(|i| zeroed[i as usize] = false);
                    whole.for_each(|i| zeroed[i as usize] = true);
                }
                72..=85 => {
                    dev.discard(off, len)
                        .unwrap_or_else(|e| panic!("{at}: discard: {e}"));
                    // Discard is advisory: each byte keeps its value, reads as zero or
                    // falls through to the backing file; the model takes what it reads.
                    let mut back = vec![0u8; len as usize];
                    dev.read_at(&mut back, off)
                        .unwrap_or_else(|e| panic!("{at}: read after discard: {e}"));
                    for (i, &b) in back.iter().enumerate() {
                        let g = off as usize + i;
                        let below = base.map_or(0, |f| f[g]);
                        assert!(
                            b == model[g] || b == 0 || b == below,
                            "{at}: discarded byte {g} reads {b:#x}, was {:#x}",
                            model[g]
                        );
                    }
                    model[range].copy_from_slice(&back);
                    touched.for_each(|i| zeroed[i as usize] = false);
                    for i in whole {
                        let r = (i * cs) as usize..((i + 1) * cs) as usize;
                        zeroed[i as usize] = model[r].iter().all(|&b| b == 0);
                    }
                }
                86..=93 => dev.flush().unwrap_or_else(|e| panic!("{at}: flush: {e}")),
                _ => {
                    let mut got = vec![0u8; len as usize];
                    dev.read_at(&mut got, off)
                        .unwrap_or_else(|e| panic!("{at}: read: {e}"));
                    assert_same(&got, &model[range], &format!("{at}: read back"));
                }
            }
        }
        dev.flush().unwrap_or_else(|e| panic!("final flush: {e}"));
    }
    qemu_check_clean(img);
    let raw = scratch.path("model.raw");
    std::fs::write(&raw, &model).expect("write model");
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw", s(img), s(&raw)])
        .output()
        .expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "qemu-img compare with the model: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(&read_all(&open(img)), &model, "vdisk reread vs model");
    if c.data == DataFile::Raw {
        assert_raw_data_file(scratch, &model);
    }
    if c.backing {
        assert_top_layer_map_matches(img);
    } else {
        assert_map_matches(img);
    }
    // With an external data file too, zeroes and discards set zero flags as qemu's do.
    if c.v3 {
        assert_zeroed_clusters_hold_no_data(img, cs, &zeroed);
    }
}

/// `qemu-img check` must report a clean image.
fn qemu_check_clean(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", s(image)])
        .output()
        .expect("run qemu-img check");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check json: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    let field = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    assert_eq!(
        (field("corruptions"), field("leaks"), field("check-errors")),
        (0, 0, 0),
        "qemu-img check: {v}"
    );
    assert!(out.status.success(), "qemu-img check exit status: {v}");
}

/// qemu zeroes and discards whole clusters of v3 images with the zero flag (or by
/// deallocating them), so `map` shows no data there.
fn assert_zeroed_clusters_hold_no_data(image: &Path, cs: u64, zeroed: &[bool]) {
    let json = qemu_img(&["map", "--output=json", s(image)]);
    let extents: serde_json::Value = serde_json::from_str(&json).expect("map json");
    for ext in extents.as_array().expect("map array") {
        let start = ext["start"].as_u64().expect("start");
        let len = ext["length"].as_u64().expect("length");
        if ext["data"].as_bool() != Some(true) {
            continue;
        }
        for i in start / cs..(start + len).div_ceil(cs) {
            assert!(
                !zeroed[i as usize],
                "cluster {i} was zeroed whole, qemu-img map shows data: {ext}"
            );
        }
    }
}

#[test]
fn covering_design_covers_every_valid_pair() {
    let valid: Vec<Combo> = full_product().filter(Combo::valid).collect();
    let needed: BTreeSet<Pair> = valid.iter().flat_map(pairs).collect();
    let design = covering();
    let got: BTreeSet<Pair> = base_product()
        .iter()
        .chain(&design)
        .filter(|c| c.valid())
        .flat_map(pairs)
        .collect();
    assert_eq!(got, needed, "pairs left uncovered");
    assert!(design.iter().all(Combo::valid));
    // Every remaining axis value meets every cluster size.
    for cluster in CLUSTERS {
        let all = base_product();
        let at: Vec<&Combo> = all
            .iter()
            .chain(&design)
            .filter(|c| c.valid() && c.cluster == cluster)
            .collect();
        assert!(at.iter().any(|c| c.lazy), "{cluster}: lazy_refcounts");
        assert!(at.iter().any(|c| c.backing), "{cluster}: backing");
        for p in PREALLOC {
            assert!(at.iter().any(|c| c.prealloc == p), "{cluster}: {p}");
        }
        for d in DATA {
            assert!(at.iter().any(|c| c.data == d), "{cluster}: {d:?}");
        }
    }
    assert_eq!(base_product().iter().filter(|c| c.valid()).count(), 22);
    for c in &design {
        println!("{}", c.label());
    }
}

/// The files `create` made (the image, then the data file if any), read and removed.
fn take_files(scratch: &Scratch, stem: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for name in [format!("{stem}.qcow2"), format!("{stem}.data")] {
        let p = scratch.path(&name);
        if let Ok(bytes) = std::fs::read(&p) {
            out.push(bytes);
        }
        let _ = std::fs::remove_file(&p);
    }
    out
}

/// What `qemu-img create` makes of a 1 MiB image: its files, or its refusal message
/// without the `qemu-img: <file>: ` prefix.
fn qemu_create_small(c: &Combo, scratch: &Scratch) -> Result<Vec<Vec<u8>>, String> {
    let img = scratch.path("q.qcow2");
    let opts = c.options(&scratch.path("q.data"));
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", &opts, s(&img), "1M"])
        .output()
        .expect("run qemu-img create");
    let files = take_files(scratch, "q");
    if out.status.success() {
        return Ok(files);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("qemu-img: {}: ", img.display());
    Err(err.trim().trim_start_matches(&prefix).to_string())
}

/// The same through our `create`.
fn vdisk_create_small(c: &Combo, scratch: &Scratch) -> vdisk_block::Result<Vec<Vec<u8>>> {
    let options =
        CreateOptions::parse_options(&c.options(&scratch.path("v.data"))).expect("option syntax");
    let made = Qcow2Format.create(
        &scratch.path("v.qcow2"),
        CreateOptions {
            size: 1 << 20,
            options,
        },
    );
    let files = take_files(scratch, "v");
    made.map(|()| files)
}

/// Every combination of the first four axes, every combination of the others with compat
/// and extended_l2 (512-byte and 64 KiB clusters, 16-bit refcounts) and the covering
/// design: qemu-img and our `create` accept exactly the ones the rule list accepts, refuse
/// the others with the same message, and write the same bytes.
#[test]
fn refusals_match_qemu() {
    let scratch = Scratch::new("mx-refuse");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        s(&scratch.path("base.qcow2")),
        "1M",
    ]);
    let mut combos: BTreeSet<Combo> = base_product().into_iter().collect();
    combos.extend(
        full_product().filter(|c| [512, 65536].contains(&c.cluster) && c.refcount_bits == 16),
    );
    combos.extend(covering());
    let mut refused = 0;
    for c in &combos {
        let what = c.label();
        let rules = c.refusals();
        match (
            qemu_create_small(c, &scratch),
            vdisk_create_small(c, &scratch),
        ) {
            (Ok(theirs), Ok(ours)) => {
                assert!(rules.is_empty(), "{what}: qemu-img accepts {rules:?}");
                assert_eq!(theirs.len(), ours.len(), "{what}: number of files");
                // The data file's name differs in one letter.
                let (qname, vname) = (b"q.data", b"v.data");
                for (i, (q, v)) in theirs.iter().zip(&ours).enumerate() {
                    let mut q = q.clone();
                    if let Some(at) = q.windows(qname.len()).position(|w| w == qname) {
                        q[at..at + vname.len()].copy_from_slice(vname);
                    }
                    assert_same(v, &q, &format!("{what}: file {i}"));
                }
            }
            (Err(q), Err(e)) => {
                refused += 1;
                assert!(rules.contains(&q.as_str()), "{what}: qemu says {q:?}");
                assert_eq!(e.kind(), ErrorKind::InvalidInput, "{what}: {e}");
                assert!(
                    e.to_string().contains(q.as_str()),
                    "{what}: qemu {q:?}, ours {e}"
                );
            }
            (q, v) => panic!("{what}: qemu-img {:?}, vdisk {:?}", q.err(), v.err()),
        }
    }
    assert!(refused > 100, "{refused} refusals");
}

#[test]
fn qemu_images_read_back_base_product() {
    let combos: Vec<Combo> = base_product().into_iter().filter(Combo::valid).collect();
    for_each(&combos, "qemu->vdisk", qemu_to_vdisk);
}

#[test]
fn qemu_images_read_back_covering() {
    for_each(&covering(), "qemu->vdisk", qemu_to_vdisk);
}

#[test]
fn vdisk_images_pass_qemu_check_base_product() {
    let combos: Vec<Combo> = base_product().into_iter().filter(Combo::valid).collect();
    for_each(&combos, "vdisk->qemu", vdisk_to_qemu);
}

#[test]
fn vdisk_images_pass_qemu_check_covering() {
    for_each(&covering(), "vdisk->qemu", vdisk_to_qemu);
}
