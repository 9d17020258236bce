//! Twin images, one changed by qemu-img/qemu-io and one by our driver, must end up alike:
//! the same `qemu-img map` (and, where it decides what qemu shows, the same L2 entries), a
//! clean `qemu-img check`, and the same contents by `qemu-img compare`. Each case here is a
//! difference found against qemu 10: clusters freed by a shrink and reused by metadata
//! preallocation, sizes that are not whole sectors, write-zeroes on unallocated clusters,
//! zeroes and discards in images with an external data file, and the L2 tables qemu
//! allocates (or copies from a snapshot) for a zero or discard request that changes no
//! entry, which decide where every later cluster goes.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use vdisk_block::{BlockDev, CreateOptions, Format, OpenOptions, Preallocation, ZeroMode};
use vdisk_qcow2::{Qcow2Format, Qcow2Image};

const M: u64 = 1 << 20;
const K: u64 = 1 << 10;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn open_rw(path: &Path) -> Qcow2Image {
    let opts = OpenOptions {
        writable: true,
        ..options()
    };
    Qcow2Image::open(path, &opts).unwrap_or_else(|e| panic!("open rw {}: {e}", path.display()))
}

/// `qemu-img map --output=json`, parsed.
fn map(image: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["map", "--output=json", s(image)])).expect("map json")
}

/// `qemu-img check` must find no corruption, leak or error.
fn check_clean(image: &Path) {
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
        "qemu-img check {}: {v}",
        image.display()
    );
    assert!(out.status.success(), "qemu-img check exit status: {v}");
}

/// `qemu-img compare` of the twins must say they are identical.
fn compare_same(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "qcow2", s(a), s(b)])
        .output()
        .expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The non-empty entries of the image's first L2 table, as (index, entry, bitmap).
fn l2_entries(image: &Path) -> Vec<(usize, u64, u64)> {
    let f = std::fs::read(image).expect("read image");
    let cluster_bits = u32::from_be_bytes(f[20..24].try_into().expect("4 bytes"));
    let l1 = be64(&f, 40);
    let version = u32::from_be_bytes(f[4..8].try_into().expect("4 bytes"));
    let extended = version >= 3 && be64(&f, 72) & 16 != 0;
    let l2 = (be64(&f, l1 as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    if l2 == 0 {
        return Vec::new();
    }
    let width = if extended { 16 } else { 8 };
    let n = (1usize << cluster_bits) / width;
    (0..n)
        .map(|i| {
            let at = l2 + i * width;
            let bitmap = if extended { be64(&f, at + 8) } else { 0 };
            (i, be64(&f, at), bitmap)
        })
        .filter(|&(_, e, b)| e != 0 || b != 0)
        .collect()
}

/// `map` without host offsets, for cases where only the allocation order differs.
fn map_shape(image: &Path) -> Vec<serde_json::Value> {
    let mut m = map(image);
    let extents = m.as_array_mut().expect("map array");
    for e in extents.iter_mut() {
        let has = e.get("offset").is_some();
        let o = e.as_object_mut().expect("extent");
        o.remove("offset");
        o.insert("has_offset".into(), has.into());
    }
    extents.clone()
}

/// [`l2_entries`] with each host offset reduced to whether there is one.
fn l2_shape(image: &Path) -> Vec<(usize, u64, bool, u64)> {
    const OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
    l2_entries(image)
        .into_iter()
        .map(|(i, e, b)| (i, e & !OFFSET, e & OFFSET != 0, b))
        .collect()
}

/// Runs one qemu-io command (`write -z [-u] OFF LEN`, `discard OFF LEN`, `write -P ..`)
/// on qemu's twin and the same request through our driver on ours.
fn apply(cmd: &str, qemu: &Path, ours: &Qcow2Image) {
    qemu_io(qemu, &[cmd]);
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let size = |w: &str| vdisk_block::size::parse_size(w).expect("size");
    match words.as_slice() {
        ["write", "-z", "-u", off, len] => ours
            .write_zeroes(size(off), size(len), ZeroMode::MayUnmap)
            .expect("write_zeroes"),
        ["write", "-z", off, len] => ours
            .write_zeroes(size(off), size(len), ZeroMode::KeepAllocated)
            .expect("write_zeroes"),
        ["discard", off, len] => ours.discard(size(off), size(len)).expect("discard"),
        _ => panic!("unknown command {cmd}"),
    }
    ours.flush().expect("flush");
}

/// Twins made by `qemu-img create -o OPTIONS` (`{data}` stands for the data file's name),
/// prepared by qemu-io with `prep`, then given `cmd` by qemu-io and by us respectively;
/// afterwards both must look alike to qemu.
fn twin_case(options: &str, size: u64, prep: &[&str], cmd: &str) {
    let scratch = Scratch::new("fid");
    let q = scratch.path("q.qcow2");
    let v = scratch.path("v.qcow2");
    let qd = scratch.path("q.data");
    let vd = scratch.path("v.data");
    for (img, data) in [(&q, &qd), (&v, &vd)] {
        let o = options.replace("{data}", s(data));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &o,
            s(img),
            &size.to_string(),
        ]);
        if !prep.is_empty() {
            qemu_io(img, prep);
        }
    }
    {
        let dev = open_rw(&v);
        apply(cmd, &q, &dev);
    }
    let what = format!("-o {options}, {prep:?} then {cmd:?}");
    assert_eq!(map(&v), map(&q), "{what}: qemu-img map, ours vs qemu");
    assert_eq!(
        l2_entries(&v),
        l2_entries(&q),
        "{what}: L2 entries, ours vs qemu"
    );
    check_clean(&q);
    check_clean(&v);
    compare_same(&q, &v);
    assert_map_matches(&v);
    if options.contains("data_file_raw=on") {
        // A raw data file is the guest disk itself.
        let (a, b) = (
            std::fs::read(&qd).expect("q data"),
            std::fs::read(&vd).expect("v data"),
        );
        assert_same(&b, &a, &format!("{what}: raw data file"));
        assert_same(
            &b,
            &qemu_contents(&v, &scratch),
            &format!("{what}: raw data file vs guest"),
        );
    }
}

/// The commands every twin case runs, on a fresh image and over data.
const ZERO_CMDS: [&str; 10] = [
    "write -z 0 64k",
    "write -z -u 0 64k",
    "write -z 0 4k",
    "write -z -u 0 4k",
    "write -z 0 32k",
    "write -z 70k 10k",
    "write -z 3k 2k",
    "write -z 0 1M",
    "write -z -u 60k 200k",
    "write -z 1000k 24k",
];
const DISCARD_CMDS: [&str; 4] = [
    "discard 0 64k",
    "discard 0 4k",
    "discard 64k 64k",
    "discard 32k 128k",
];
const PREP: [&str; 2] = ["write -P 0xaa 0 128k", "write -P 0x55 192k 8k"];

fn all_cases(options: &str) {
    for cmd in ZERO_CMDS.iter().chain(&DISCARD_CMDS) {
        twin_case(options, M, &[], cmd);
        twin_case(options, M, &PREP, cmd);
    }
}

#[test]
fn write_zeroes_and_discard_match_qemu_v3() {
    all_cases("compat=1.1");
}

#[test]
fn write_zeroes_and_discard_match_qemu_v3_extended_l2() {
    all_cases("compat=1.1,extended_l2=on");
}

#[test]
fn write_zeroes_and_discard_match_qemu_v2() {
    // Version 2 has no zero flag; qemu deallocates where nothing shows through. Only what
    // qemu shows (map, check, contents) is compared here; the empty L2 table qemu adds is
    // compared in `zeroes_and_discard_take_the_l2_table_as_qemu_does`.
    for cmd in ZERO_CMDS.iter().chain(&DISCARD_CMDS) {
        for prep in [&[][..], &PREP[..]] {
            let scratch = Scratch::new("fid2");
            let q = scratch.path("q.qcow2");
            let v = scratch.path("v.qcow2");
            for img in [&q, &v] {
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "compat=0.10",
                    s(img),
                    "1M",
                ]);
                if !prep.is_empty() {
                    qemu_io(img, prep);
                }
            }
            {
                let dev = open_rw(&v);
                apply(cmd, &q, &dev);
            }
            assert_eq!(map(&v), map(&q), "v2 {prep:?} then {cmd}");
            check_clean(&v);
            compare_same(&q, &v);
        }
    }
}

#[test]
fn data_file_zeroes_and_discard_match_qemu() {
    for opts in [
        "data_file={data}",
        "data_file={data},data_file_raw=on",
        "data_file={data},extended_l2=on",
        "data_file={data},data_file_raw=on,extended_l2=on",
    ] {
        all_cases(opts);
    }
}

/// Over a backing file, zeroes and discards must hide it as qemu's do (version 2, which
/// has no zero flag, writes zeroes or lets a discarded cluster show the backing file).
#[test]
fn zeroes_and_discard_over_backing_match_qemu() {
    let scratch = Scratch::new("fid-back");
    let base = scratch.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_io(&base, &["write -P 0x77 0 1M"]);
    for options in ["compat=1.1", "compat=1.1,extended_l2=on", "compat=0.10"] {
        for cmd in ZERO_CMDS.iter().chain(&DISCARD_CMDS) {
            for prep in [&[][..], &PREP[..]] {
                let q = scratch.path("q.qcow2");
                let v = scratch.path("v.qcow2");
                for img in [&q, &v] {
                    let _ = std::fs::remove_file(img);
                    let o = format!("{options},backing_file=base.qcow2,backing_fmt=qcow2");
                    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, s(img), "1M"]);
                    if !prep.is_empty() {
                        qemu_io(img, prep);
                    }
                }
                {
                    let dev = open_rw(&v);
                    apply(cmd, &q, &dev);
                }
                let what = format!("-o {options} over a backing file, {prep:?} then {cmd:?}");
                // qemu reuses a cluster freed earlier in the same request at once, we at
                // the next write-back: host offsets may differ, nothing else.
                assert_eq!(map_shape(&v), map_shape(&q), "{what}: qemu-img map");
                if !options.contains("0.10") {
                    assert_eq!(l2_shape(&v), l2_shape(&q), "{what}: L2 entries");
                }
                check_clean(&v);
                compare_same(&q, &v);
            }
        }
    }
}

/// Over clusters shared with an internal snapshot, zeroes keep (or drop) the shared
/// reference as qemu's do.
#[test]
fn zeroes_over_snapshot_clusters_match_qemu() {
    for options in ["compat=1.1", "compat=1.1,extended_l2=on", "compat=0.10"] {
        for cmd in [
            "write -z 0 64k",
            "write -z -u 0 64k",
            "write -z 0 4k",
            "discard 0 64k",
            "write -z -u 32k 96k",
        ] {
            let scratch = Scratch::new("fid-snap");
            let q = scratch.path("q.qcow2");
            let v = scratch.path("v.qcow2");
            for img in [&q, &v] {
                qemu_img(&["create", "-q", "-f", "qcow2", "-o", options, s(img), "1M"]);
                qemu_io(img, &PREP);
                qemu_img(&["snapshot", "-c", "s1", s(img)]);
            }
            {
                let dev = open_rw(&v);
                apply(cmd, &q, &dev);
            }
            let what = format!("-o {options}, snapshot, then {cmd:?}");
            assert_eq!(map(&v), map(&q), "{what}: qemu-img map");
            if !options.contains("0.10") {
                assert_eq!(l2_entries(&v), l2_entries(&q), "{what}: L2 entries");
            }
            check_clean(&v);
            compare_same(&q, &v);
        }
    }
}

/// qemu punches the clusters a shrink frees; metadata preallocation that later reuses them
/// must not show their old data.
#[test]
fn shrink_then_metadata_preallocation_reads_zeroes() {
    // (size, shrink, preallocation) as qemu-img resize takes them: the sequence that
    // showed old data at 8M..9M, and a regrow straight over the shrunk range.
    let long: &[(u64, bool, &str)] = &[
        (4 * M + 3 * M / 2, false, "off"),
        (2048 * K, true, "off"),
        (6 * M, false, "off"),
        (M, true, "off"),
        (8 * M, false, "off"),
        (9 * M, false, "metadata"),
    ];
    let short: &[(u64, bool, &str)] = &[(M, true, "off"), (4 * M, false, "metadata")];
    for options in ["compat=1.1", "extended_l2=on", "data_file={data}"] {
        // With an external data file the freed clusters are discarded in the data file.
        shrink_then_regrow(options, long, 8 * M);
        shrink_then_regrow(options, short, M);
    }
}

/// Runs `steps` on qemu's twin with qemu-img resize and on ours; from `zero_from` on the
/// disk must read as zeroes.
fn shrink_then_regrow(options: &str, steps: &[(u64, bool, &str)], zero_from: u64) {
    let scratch = Scratch::new("fid-shrink");
    let q = scratch.path("q.qcow2");
    let v = scratch.path("v.qcow2");
    for (img, data) in [(&q, "q.data"), (&v, "v.data")] {
        let o = options.replace("{data}", s(&scratch.path(data)));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, s(img), "4M"]);
        qemu_io(img, &["write -P 0xa5 0 4M"]);
    }
    {
        let dev = open_rw(&v);
        for &(size, shrink, prealloc) in steps {
            let mut args = vec!["resize", "-q", "-f", "qcow2"];
            let p = format!("--preallocation={prealloc}");
            if shrink {
                args.push("--shrink");
            } else {
                args.push(&p);
            }
            let n = size.to_string();
            args.extend([s(&q), n.as_str()]);
            qemu_img(&args);
            let mode = match prealloc {
                "metadata" => Preallocation::Metadata,
                _ => Preallocation::Off,
            };
            dev.resize(size, mode).expect("resize");
        }
        dev.flush().expect("flush");
    }
    let ours = read_all(&open(&v));
    assert!(
        ours[zero_from as usize..].iter().all(|&b| b == 0),
        "-o {options}, {steps:?}: old data past {zero_from} after shrink and preallocation"
    );
    let strip = |m: serde_json::Value| -> Vec<serde_json::Value> {
        m.as_array()
            .expect("map array")
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.as_object_mut().expect("extent").remove("offset");
                e
            })
            .collect()
    };
    assert_eq!(
        strip(map(&v)),
        strip(map(&q)),
        "-o {options}: map without host offsets"
    );
    check_clean(&q);
    check_clean(&v);
    compare_same(&q, &v);
    assert_map_matches(&v);
    let len = |p: &Path| std::fs::metadata(p).expect("stat").len();
    assert_eq!(
        len(&v),
        len(&q),
        "-o {options}, {steps:?}: image file length"
    );
}

/// Metadata preallocation into free clusters that still hold data (left by another tool,
/// or freed without a discard passed down) must not expose it.
#[test]
fn preallocation_never_reuses_stale_clusters_as_is() {
    for mode in [Preallocation::Metadata, Preallocation::Falloc] {
        stale_clusters_stay_hidden(mode);
    }
}

fn stale_clusters_stay_hidden(mode: Preallocation) {
    let scratch = Scratch::new("fid-stale");
    let v = scratch.path("v.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&v), "2M"]);
    qemu_io(&v, &["write -P 0x5a 0 2M"]);
    // qemu's shrink punches and truncates what it frees; put stale bytes back into
    // clusters its refcounts call free, as a tool that frees without punching leaves them.
    qemu_img(&["resize", "-q", "--shrink", "-f", "qcow2", s(&v), "64k"]);
    let len = std::fs::metadata(&v).expect("stat").len();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&v)
            .expect("open");
        // Stale data past qemu's truncation point, in clusters qemu calls free.
        f.write_all_at(&vec![0x5au8; (M) as usize], len)
            .expect("stale bytes");
    }
    check_clean(&v);
    {
        let dev = open_rw(&v);
        dev.resize(2 * M, mode).expect("resize");
        dev.flush().expect("flush");
    }
    check_clean(&v);
    let got = qemu_contents(&v, &scratch);
    assert!(
        got[(64 * K) as usize..].iter().all(|&b| b == 0),
        "{mode:?} preallocation exposed stale bytes of free clusters"
    );
}

/// qemu's qcow2 driver takes whole 512-byte sectors only, for create and resize.
#[test]
fn sizes_must_be_whole_sectors() {
    let scratch = Scratch::new("fid-512");
    let v = scratch.path("v.qcow2");
    let made = Qcow2Format.create(
        &v,
        CreateOptions {
            size: 1000,
            options: CreateOptions::parse_options("").expect("options"),
        },
    );
    let e = made.expect_err("create with a size of 1000 bytes");
    // qemu's qcow2_co_create (qemu-img create rounds the size up before it gets there).
    assert!(
        e.to_string()
            .contains("Image size must be a multiple of 512 bytes"),
        "{e}"
    );
    qemu_img(&["create", "-q", "-f", "qcow2", s(&v), "1M"]);
    let out = Command::new("qemu-img")
        .args(["resize", "-f", "qcow2", s(&v), "2097153"])
        .output()
        .expect("qemu-img resize");
    assert!(!out.status.success());
    let qemu_says = String::from_utf8_lossy(&out.stderr);
    let qemu_says = qemu_says.trim().trim_start_matches("qemu-img: ");
    assert_eq!(qemu_says, "The new size must be a multiple of 512");
    let dev = open_rw(&v);
    for size in [1_000_001, 2 * M + 1, 511] {
        let e = dev.resize(size, Preallocation::Off).expect_err("odd size");
        assert!(e.to_string().contains(qemu_says), "{size}: {e}");
    }
    assert_eq!(dev.size(), M);
}

/// The active L1 table: for each entry, whether it points to an L2 table, and where.
fn l1_table(image: &Path) -> Vec<u64> {
    let f = std::fs::read(image).expect("read image");
    let l1 = be64(&f, 40) as usize;
    let n = u32::from_be_bytes(f[36..40].try_into().expect("4 bytes")) as usize;
    (0..n).map(|i| be64(&f, l1 + 8 * i)).collect()
}

/// qemu takes the L2 table for writing before it looks at the entries a whole-cluster
/// write-zeroes or discard changes: an L2 table that is missing is allocated (empty where
/// no entry changes: version 2, a discard without backing file), one shared with a
/// snapshot is copied. Ours must do the same, or every later allocation lands elsewhere:
/// after each request and after one more write by qemu-io on both twins, the L1 tables,
/// the file lengths and `qemu-img map` with host offsets are qemu's.
#[test]
fn zeroes_and_discard_take_the_l2_table_as_qemu_does() {
    let scratch = Scratch::new("fid-l2");
    let base = scratch.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(&base, &["write -P 0x77 0 4M"]);
    // 4 KiB clusters: one L2 table covers 2 MiB, so the requests cross tables.
    let cmds = [
        "write -z 0 64k",
        "write -z -u 0 64k",
        "write -z 0 2k",
        "write -z 0 3M",
        "write -z -u 1M 2M",
        "discard 0 4k",
        "discard 0 3M",
        "discard 2M 1M",
    ];
    for compat in ["1.1", "0.10", "1.1,extended_l2=on"] {
        for backing in [false, true] {
            for snapshot in [false, true] {
                for cmd in cmds {
                    let q = scratch.path("q.qcow2");
                    let v = scratch.path("v.qcow2");
                    for img in [&q, &v] {
                        let _ = std::fs::remove_file(img);
                        // Extended L2 needs 16 KiB clusters for 512-byte subclusters.
                        let cluster = if compat.contains("extended_l2") {
                            "16k"
                        } else {
                            "4k"
                        };
                        let mut o = format!("compat={compat},cluster_size={cluster}");
                        if backing {
                            o.push_str(",backing_file=base.qcow2,backing_fmt=qcow2");
                        }
                        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, s(img), "4M"]);
                        if snapshot {
                            // L2 tables shared with a snapshot, over data and holes.
                            qemu_io(img, &["write -P 0x11 0 8k", "write -P 0x22 2M 8k"]);
                            qemu_img(&["snapshot", "-c", "s1", s(img)]);
                        }
                    }
                    {
                        let dev = open_rw(&v);
                        apply(cmd, &q, &dev);
                    }
                    let what =
                        format!("compat={compat} backing={backing} snapshot={snapshot}, {cmd:?}");
                    assert_eq!(l1_table(&v), l1_table(&q), "{what}: L1 table");
                    let len = |p: &Path| std::fs::metadata(p).expect("stat").len();
                    assert_eq!(len(&v), len(&q), "{what}: file length");
                    assert_eq!(map(&v), map(&q), "{what}: qemu-img map");
                    check_clean(&v);
                    compare_same(&q, &v);
                    for img in [&q, &v] {
                        qemu_io(img, &["write -P 0x5a 3M 12k"]);
                    }
                    assert_eq!(map(&v), map(&q), "{what}, then a write: qemu-img map");
                    check_clean(&v);
                    compare_same(&q, &v);
                }
            }
        }
    }
}

/// A write spanning several clusters that need allocation gets one contiguous run of host
/// clusters, as qemu's: where the file has holes of freed clusters too small for the run,
/// the run goes past them, and only a hole large enough takes it. Twins prepared by
/// qemu-io alike, then written by qemu-io and by us: `qemu-img map` with host offsets and
/// the file lengths are qemu's.
#[test]
fn multi_cluster_writes_allocate_one_contiguous_run() {
    let scratch = Scratch::new("fid-run");
    // Holes of 1 and 2 clusters and one of 4 among data clusters.
    let prep = [
        "write -P 0x11 0 1M",
        "discard 64k 64k",
        "discard 192k 128k",
        "discard 512k 256k",
    ];
    let cmds: &[&[&str]] = &[
        &["write -P 0x5a 2M 192k"],
        &["write -P 0x5a 2M 256k"],
        &["write -P 0x5a 2M 320k"],
        &["write -P 0x5a 2016k 200k"],
        &["write -P 0x5a 2M 64k", "write -P 0x5b 3M 128k"],
        &["write -P 0x5a 2047k 2k"],
        &["write -P 0x5a 1984k 4M"],
    ];
    for options in ["compat=1.1", "compat=0.10", "compat=1.1,cluster_size=4k"] {
        for cmd in cmds {
            let q = scratch.path("q.qcow2");
            let v = scratch.path("v.qcow2");
            for img in [&q, &v] {
                let _ = std::fs::remove_file(img);
                qemu_img(&["create", "-q", "-f", "qcow2", "-o", options, s(img), "8M"]);
                qemu_io(img, &prep);
            }
            qemu_io(&q, cmd);
            {
                let dev = open_rw(&v);
                for c in cmd.iter() {
                    let w: Vec<&str> = c.split_whitespace().collect();
                    let size = |x: &str| vdisk_block::size::parse_size(x).expect("size");
                    let byte = u8::from_str_radix(w[2].trim_start_matches("0x"), 16).expect("hex");
                    let data = vec![byte; size(w[4]) as usize];
                    dev.write_at(&data, size(w[3])).expect("write");
                }
                dev.flush().expect("flush");
            }
            let what = format!("-o {options}, {cmd:?}");
            assert_eq!(map(&v), map(&q), "{what}: qemu-img map");
            let len = |p: &Path| std::fs::metadata(p).expect("stat").len();
            assert_eq!(len(&v), len(&q), "{what}: file length");
            check_clean(&v);
            compare_same(&q, &v);
        }
    }
}
