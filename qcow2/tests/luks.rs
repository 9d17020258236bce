//! Encrypted qcow2 (`encrypt.format=luks`, and legacy AES read only) against the system
//! qemu-img / qemu-io: images made by qemu read identically here, images made and written
//! here read identically in qemu and check clean there, the layout of a new image is
//! qemu's, and the sector IVs are the host offsets. PBKDF2 runs with `iter-time=10`.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use vdisk_block::{BlockDev, CreateOptions, Format, OpenOptions, RepairMode, ZeroMode};
use vdisk_qcow2::{Header, Qcow2Format, Qcow2Image};
use zeroize::Zeroizing;

const PASS: &str = "hunter2";
const OBJECT: &str = "secret,id=sec0,data=hunter2";

fn define_secrets() {
    for (id, pw) in [("sec0", PASS), ("bad", "hunter3")] {
        // Another test of this process may have defined it already.
        let _ = vdisk_luks::secret::define(id, Zeroizing::new(pw.as_bytes().to_vec()));
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn opts_of(img: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        s(img)
    )
}

/// Runs a program; returns (success, stdout, stderr).
fn run(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn qemu_create(img: &Path, opts: &str, size: &str) {
    let o = format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{opts}");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        OBJECT,
        "-o",
        &o,
        s(img),
        size,
    ]);
}

fn qemu_io_luks(img: &Path, commands: &[&str]) {
    let opts = opts_of(img);
    let mut args = vec!["--object", OBJECT, "--image-opts"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(&opts);
    let (ok, out, err) = run("qemu-io", &args);
    assert!(
        ok && !out.contains("error") && !out.contains("failed"),
        "qemu-io {commands:?}: {out}{err}"
    );
}

/// What qemu-img reads from the encrypted `img`.
fn qemu_contents_luks(img: &Path, scratch: &Scratch) -> Vec<u8> {
    let raw = scratch.path("oracle.raw");
    qemu_img(&[
        "convert",
        "--object",
        OBJECT,
        "--image-opts",
        &opts_of(img),
        "-O",
        "raw",
        s(&raw),
    ]);
    let bytes = std::fs::read(&raw).expect("read converted image");
    let _ = std::fs::remove_file(&raw);
    bytes
}

fn qemu_check_clean(img: &Path) {
    let (ok, out, err) = run(
        "qemu-img",
        &["check", "--object", OBJECT, "--image-opts", &opts_of(img)],
    );
    assert!(ok, "qemu-img check: {out}{err}");
    assert!(
        out.contains("No errors were found"),
        "qemu-img check: {out}"
    );
    assert!(!out.contains("leaked"), "qemu-img check: {out}");
}

fn keyed(mut base: OpenOptions, secret: &str) -> OpenOptions {
    define_secrets();
    base.driver_options
        .insert("encrypt.key-secret".into(), secret.into());
    base
}

fn open_keyed(img: &Path) -> Qcow2Image {
    Qcow2Image::open(img, &keyed(options(), "sec0"))
        .unwrap_or_else(|e| panic!("open {}: {e}", img.display()))
}

fn open_rw(img: &Path) -> Qcow2Image {
    let o = OpenOptions {
        writable: true,
        ..options()
    };
    Qcow2Image::open(img, &keyed(o, "sec0"))
        .unwrap_or_else(|e| panic!("open rw {}: {e}", img.display()))
}

fn vdisk_create(img: &Path, size: u64, opts: &[(&str, &str)]) {
    define_secrets();
    let mut o = CreateOptions {
        size,
        ..CreateOptions::default()
    };
    o.options.insert("encrypt.format".into(), "luks".into());
    o.options.insert("encrypt.key-secret".into(), "sec0".into());
    o.options.insert("encrypt.iter-time".into(), "10".into());
    for (k, v) in opts {
        o.options.insert((*k).into(), (*v).into());
    }
    Qcow2Format
        .create(img, o)
        .unwrap_or_else(|e| panic!("create {}: {e}", img.display()));
}

/// qemu-io commands leaving data, partial sectors, zero and discarded clusters.
const WORKLOAD: &[&str] = &[
    "write -P 0x11 0 128k",
    "write -P 0x22 100k 3k",
    "write -P 0x33 1m 1000",
    "write -P 0x34 1000001 77",
    "write -z 64k 64k",
    "write -P 0x44 2m 600k",
    "discard 2m 64k",
    "write -P 0x55 3m 512",
];

fn qemu_made_reads_identical(name: &str, opts: &str) {
    let sc = Scratch::new(name);
    let img = sc.path("img.qcow2");
    qemu_create(&img, opts, "4M");
    qemu_io_luks(&img, WORKLOAD);
    let dev = open_keyed(&img);
    assert_same(&read_all(&dev), &qemu_contents_luks(&img, &sc), name);
    // And vdisk's check of a qemu-made image is clean.
    let report = Qcow2Format
        .check(&img, &keyed(options(), "sec0"), RepairMode::None)
        .expect("check");
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "{:?}",
        report.messages
    );
}

#[test]
fn luks_qemu_made_aes_256_xts_reads_identical() {
    qemu_made_reads_identical("luks-xts", "");
}

#[test]
fn luks_qemu_made_aes_128_cbc_essiv_reads_identical() {
    qemu_made_reads_identical(
        "luks-essiv",
        ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
    );
}

#[test]
fn luks_qemu_made_small_clusters_and_v2_read_identical() {
    qemu_made_reads_identical("luks-c4k-v2", ",cluster_size=4096,compat=0.10");
}

#[test]
fn luks_qemu_made_overlay_of_a_backing_file_reads_identical() {
    let sc = Scratch::new("luks-backing");
    let base = sc.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(&base, &["write -P 0x77 0 4M"]);
    let top = sc.path("top.qcow2");
    qemu_create(&top, ",backing_file=base.qcow2,backing_fmt=qcow2", "4M");
    qemu_io_luks(&top, WORKLOAD);
    let dev = open_keyed(&top);
    assert_same(&read_all(&dev), &qemu_contents_luks(&top, &sc), "overlay");
}

/// Writes through vdisk over every write path: whole clusters, partial sectors in place,
/// copy-on-write from a backing file, zeroes, discard; returns what the guest should read.
fn vdisk_workload(dev: &Qcow2Image, base: Option<&[u8]>) -> Vec<u8> {
    let size = dev.size() as usize;
    let mut model = base.map_or_else(|| vec![0u8; size], <[u8]>::to_vec);
    let mut put = |at: usize, data: &[u8]| {
        dev.write_at(data, at as u64).expect("write");
        model[at..at + data.len()].copy_from_slice(data);
    };
    put(0, &vec![0x11; 256 << 10]);
    put(70_000, &vec![0x22; 3000]);
    put(70_001, &[0x23; 5]);
    put((1 << 20) + 7, &vec![0x33; 1000]);
    put(3 << 20, &vec![0x44; 512]);
    put((2 << 20) + 65_530, &[0x45; 12]);
    dev.write_zeroes(64 << 10, 64 << 10, ZeroMode::MayUnmap)
        .expect("zero");
    model[64 << 10..128 << 10].fill(0);
    dev.write_zeroes(200_000, 1000, ZeroMode::KeepAllocated)
        .expect("zero piece");
    model[200_000..201_000].fill(0);
    dev.discard(128 << 10, 64 << 10).expect("discard");
    // A discarded cluster of a version 3 image reads as zeroes, over a backing file too.
    model[128 << 10..192 << 10].fill(0);
    dev.flush().expect("flush");
    model
}

#[test]
fn luks_vdisk_made_and_written_reads_identical_in_qemu_and_checks_clean() {
    let sc = Scratch::new("luks-vdisk");
    let img = sc.path("img.qcow2");
    vdisk_create(&img, 4 << 20, &[]);
    let model = {
        let dev = open_rw(&img);
        let model = vdisk_workload(&dev, None);
        assert_same(&read_all(&dev), &model, "vdisk reads its own writes");
        model
    };
    assert_same(
        &qemu_contents_luks(&img, &sc),
        &model,
        "qemu reads vdisk's writes",
    );
    qemu_check_clean(&img);
    // qemu writes on top, vdisk reads them.
    qemu_io_luks(&img, &["write -P 0x99 1500 3000"]);
    let mut model = model;
    model[1500..4500].fill(0x99);
    assert_same(
        &read_all(&open_keyed(&img)),
        &model,
        "vdisk reads qemu's writes",
    );
}

#[test]
fn luks_vdisk_written_overlay_copies_on_write_from_the_backing_file() {
    let sc = Scratch::new("luks-vdisk-cow");
    let base = sc.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(&base, &["write -P 0x5a 0 4M"]);
    let top = sc.path("top.qcow2");
    vdisk_create(
        &top,
        4 << 20,
        &[("backing_file", "base.qcow2"), ("backing_fmt", "qcow2")],
    );
    let base_bytes = vec![0x5au8; 4 << 20];
    let model = vdisk_workload(&open_rw(&top), Some(&base_bytes));
    assert_same(
        &qemu_contents_luks(&top, &sc),
        &model,
        "qemu reads the overlay",
    );
    qemu_check_clean(&top);
}

#[test]
fn luks_vdisk_made_essiv_and_small_clusters_read_in_qemu() {
    let sc = Scratch::new("luks-vdisk-essiv");
    let img = sc.path("img.qcow2");
    vdisk_create(
        &img,
        1 << 20,
        &[
            ("encrypt.cipher-alg", "aes-128"),
            ("encrypt.cipher-mode", "cbc"),
            ("encrypt.ivgen-alg", "essiv"),
            ("encrypt.hash-alg", "sha1"),
            ("cluster_size", "512"),
        ],
    );
    let dev = open_rw(&img);
    let mut model = vec![0u8; 1 << 20];
    for (i, at) in [0usize, 1000, 4095, 100_000, 700_001]
        .into_iter()
        .enumerate()
    {
        let data = vec![0x40 + i as u8; 3333];
        dev.write_at(&data, at as u64).expect("write");
        model[at..at + data.len()].copy_from_slice(&data);
    }
    dev.flush().expect("flush");
    drop(dev);
    assert_same(
        &qemu_contents_luks(&img, &sc),
        &model,
        "essiv, 512-byte clusters",
    );
    qemu_check_clean(&img);
}

/// The header fields that do not depend on random salts or the host.
fn layout_of(img: &Path) -> (Header, u64, vdisk_luks::Header) {
    let bytes = std::fs::read(img).expect("read image");
    let h = Header::parse(&bytes[..bytes.len().min(65536)]).expect("qcow2 header");
    let c = h.extensions.crypto.expect("crypto extension");
    let luks = vdisk_luks::Header::parse(&bytes[c.offset as usize..c.offset as usize + 592])
        .expect("luks header");
    (h, bytes.len() as u64, luks)
}

#[test]
fn luks_a_new_image_is_laid_out_as_qemu_lays_it_out() {
    let sc = Scratch::new("luks-layout");
    for (tag, q, v) in [
        ("default", "", vec![]),
        ("c512", ",cluster_size=512", vec![("cluster_size", "512")]),
        (
            "meta",
            ",preallocation=metadata,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
            vec![
                ("preallocation", "metadata"),
                ("encrypt.cipher-alg", "aes-128"),
                ("encrypt.cipher-mode", "cbc"),
                ("encrypt.ivgen-alg", "essiv"),
            ],
        ),
        ("v2", ",compat=0.10", vec![("compat", "0.10")]),
    ] {
        let qi = sc.path(&format!("q-{tag}.qcow2"));
        let vi = sc.path(&format!("v-{tag}.qcow2"));
        qemu_create(&qi, q, "3M");
        vdisk_create(&vi, 3 << 20, &v);
        let (qh, qlen, ql) = layout_of(&qi);
        let (vh, vlen, vl) = layout_of(&vi);
        assert_eq!(vlen, qlen, "{tag}: file length");
        assert_eq!(vh.encode().expect("encode"), qh.encode().expect("encode"), "{tag}: qcow2 header");
        assert_eq!(
            (vl.cipher, vl.hash, vl.payload_offset, vl.key_bytes),
            (ql.cipher, ql.hash, ql.payload_offset, ql.key_bytes),
            "{tag}: LUKS parameters"
        );
        for (a, b) in vl.slots.iter().zip(&ql.slots) {
            assert_eq!(
                (a.active, a.key_offset, a.stripes),
                (b.active, b.key_offset, b.stripes),
                "{tag}: key slot"
            );
        }
        qemu_check_clean(&vi);
        // The region outside the header and slot 0 is zero in both.
        for (img, l) in [(&qi, &ql), (&vi, &vl)] {
            let bytes = std::fs::read(img).expect("read");
            let c = layout_of(img).0.extensions.crypto.expect("crypto");
            let from = (c.offset + l.key_material_offset(1)) as usize;
            let to = (c.offset + c.length) as usize;
            assert!(bytes[from..to].iter().all(|&b| b == 0), "{tag}: unused key material");
        }
    }
}

#[test]
fn luks_data_sectors_are_encrypted_with_their_host_offset_as_iv() {
    define_secrets();
    let sc = Scratch::new("luks-iv");
    let img = sc.path("img.qcow2");
    qemu_create(&img, "", "1M");
    qemu_io_luks(&img, &["write -P 0xa5 65536 4096"]);
    let dev = open_keyed(&img);
    let (kind, _) = dev.lookup(65536, 4096).expect("lookup");
    let vdisk_qcow2::entry::Kind::Normal { host } = kind else {
        panic!("expected a data cluster, got {kind:?}");
    };
    assert_ne!(
        host, 65536,
        "host and guest offsets must differ for this test"
    );
    let bytes = std::fs::read(&img).expect("read");
    let (h, _, luks) = layout_of(&img);
    let c = h.extensions.crypto.expect("crypto");
    let region = &bytes[c.offset as usize..(c.offset + c.length) as usize];
    let key = vdisk_luks::keys::unlock(&luks, PASS.as_bytes(), &mut |off, buf| {
        buf.copy_from_slice(&region[off as usize..off as usize + buf.len()]);
        Ok(())
    })
    .expect("unlock");
    let cipher = vdisk_luks::SectorCipher::new(&luks.cipher, &key).expect("cipher");
    let mut sector = bytes[host as usize..host as usize + 512].to_vec();
    cipher.decrypt(host / 512, &mut sector).expect("decrypt");
    assert!(sector.iter().all(|&b| b == 0xa5), "host-offset IV decrypts");
    let mut wrong = bytes[host as usize..host as usize + 512].to_vec();
    cipher.decrypt(65536 / 512, &mut wrong).expect("decrypt");
    assert!(wrong.iter().any(|&b| b != 0xa5), "guest-offset IV does not");
}

#[test]
fn luks_plaintext_never_reaches_the_file() {
    let sc = Scratch::new("luks-plain");
    let img = sc.path("img.qcow2");
    vdisk_create(&img, 1 << 20, &[]);
    let pattern = b"VDISK-PLAINTEXT-CANARY-0123456789";
    let mut data = Vec::new();
    while data.len() < 200_000 {
        data.extend_from_slice(pattern);
    }
    {
        let dev = open_rw(&img);
        dev.write_at(&data, 1234).expect("write");
        dev.write_at(pattern, 700_000).expect("write");
        dev.flush().expect("flush");
        let mut back = vec![0u8; data.len()];
        dev.read_at(&mut back, 1234).expect("read");
        assert_eq!(back, data);
    }
    let bytes = std::fs::read(&img).expect("read");
    assert!(
        !bytes.windows(16).any(|w| w == &pattern[..16]),
        "the plaintext pattern is on disk"
    );
    assert!(
        !bytes.windows(7).any(|w| w == PASS.as_bytes()),
        "the passphrase is on disk"
    );
}

#[test]
fn luks_wrong_or_missing_passphrase_fails_the_open_and_info_needs_none() {
    define_secrets();
    let sc = Scratch::new("luks-keys");
    let img = sc.path("img.qcow2");
    vdisk_create(&img, 1 << 20, &[]);
    open_rw(&img).write_at(&[7u8; 512], 0).expect("write");
    let err = Qcow2Image::open(&img, &keyed(options(), "bad")).expect_err("wrong passphrase");
    assert_eq!(err.message(), "Invalid password, cannot unlock any keyslot");
    let err = Qcow2Image::open(&img, &options()).expect_err("no passphrase");
    assert_eq!(
        err.message(),
        "Parameter 'encrypt.key-secret' is required for cipher"
    );
    let err = Qcow2Image::open(&img, &keyed(options(), "nosuch")).expect_err("no secret");
    assert_eq!(err.message(), "No secret with id 'nosuch'");
    let err = Qcow2Format
        .check(&img, &options(), RepairMode::None)
        .expect_err("check needs the key too");
    assert_eq!(
        err.message(),
        "Parameter 'encrypt.key-secret' is required for cipher"
    );
    // info: a metadata-only open without a key, the encrypt object filled in.
    let meta = OpenOptions {
        metadata_only: true,
        ..options()
    };
    let dev = Qcow2Image::open(&img, &meta).expect("metadata-only open");
    assert!(dev.info().expect("info").encrypted);
    let specific = dev.format_specific().expect("fs").expect("some");
    let keys: Vec<&str> = specific.data.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "compat",
            "compression-type",
            "lazy-refcounts",
            "refcount-bits",
            "encrypt",
            "corrupt",
            "extended-l2"
        ]
    );
    let mut buf = [0u8; 512];
    let err = dev.read_at(&mut buf, 0).expect_err("data needs the key");
    assert!(err.message().contains("encrypt.key-secret"), "{err}");
    // Unallocated clusters read as zeroes without decryption.
    dev.read_at(&mut buf, 65536).expect("unallocated");
    assert_eq!(buf, [0u8; 512]);
    // A qemu-made image refuses vdisk's wrong passphrase the same way.
    let q = sc.path("q.qcow2");
    qemu_create(&q, "", "1M");
    let err = Qcow2Image::open(&q, &keyed(options(), "bad")).expect_err("wrong passphrase");
    assert_eq!(err.message(), "Invalid password, cannot unlock any keyslot");
}

#[test]
fn luks_compressed_writes_are_refused() {
    let sc = Scratch::new("luks-compress");
    let img = sc.path("img.qcow2");
    vdisk_create(&img, 1 << 20, &[]);
    let dev = open_rw(&img);
    let err = dev
        .write_compressed(&[0u8; 65536], 0)
        .expect_err("compressed");
    assert_eq!(
        err.message(),
        "Compression and encryption not supported at the same time"
    );
}

#[test]
fn luks_legacy_aes_images_read_and_are_never_written_or_made() {
    define_secrets();
    let sc = Scratch::new("luks-aes");
    let img = sc.path("aes.qcow2");
    // qemu-img 10 still makes them (vdisk does not).
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        OBJECT,
        "-o",
        "encryption=on,encrypt.key-secret=sec0",
        s(&img),
        "2M",
    ]);
    qemu_io_luks(
        &img,
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 70000 1000",
            "write -P 0xef 1m 4096",
        ],
    );
    let dev = open_keyed(&img);
    assert_same(
        &read_all(&dev),
        &qemu_contents_luks(&img, &sc),
        "legacy AES",
    );
    let specific = dev.format_specific().expect("fs").expect("some");
    let encrypt = specific
        .data
        .iter()
        .find(|(k, _)| k == "encrypt")
        .map(|(_, v)| v.clone());
    assert_eq!(
        encrypt,
        Some(vdisk_block::dev::InfoValue::Map(vec![(
            "format".into(),
            vdisk_block::dev::InfoValue::Text("aes".into())
        )]))
    );
    let rw = OpenOptions {
        writable: true,
        ..options()
    };
    let err = Qcow2Image::open(&img, &keyed(rw, "sec0")).expect_err("AES writes");
    assert!(err.message().contains("read only"), "{err}");
    let mut o = CreateOptions {
        size: 1 << 20,
        ..CreateOptions::default()
    };
    o.options.insert("encryption".into(), "on".into());
    o.options.insert("encrypt.key-secret".into(), "sec0".into());
    let err = Qcow2Format
        .create(&sc.path("new-aes.qcow2"), o)
        .expect_err("AES create");
    assert!(err.message().contains("encrypt.format=luks"), "{err}");
}

/// Rewrites the crypto extension of `img` to `(offset, length)`.
fn set_crypto_ext(img: &Path, offset: u64, length: u64) {
    let mut bytes = std::fs::read(img).expect("read");
    let at = bytes
        .windows(8)
        .position(|w| w == [0x05, 0x37, 0xbe, 0x77, 0, 0, 0, 16])
        .expect("crypto extension");
    bytes[at + 8..at + 16].copy_from_slice(&offset.to_be_bytes());
    bytes[at + 16..at + 24].copy_from_slice(&length.to_be_bytes());
    std::fs::write(img, bytes).expect("write");
}

#[test]
fn luks_hostile_crypto_extensions_are_refused_cleanly() {
    define_secrets();
    let sc = Scratch::new("luks-hostile");
    let img = sc.path("img.qcow2");
    vdisk_create(&img, 1 << 20, &[]);
    let (h, len, _) = layout_of(&img);
    let c = h.extensions.crypto.expect("crypto");
    let cs = h.cluster_size();
    for (what, offset, length) in [
        ("past the end", len - cs, c.length),
        ("far past the end", 1 << 50, c.length),
        ("overflowing", !(cs - 1), c.length),
        ("too small", c.offset, 100),
        ("key material outside", c.offset, 4096),
        ("over the header", 0, c.length),
        ("over the L1 table", h.l1_table_offset, c.length),
        ("over the refcount table", h.refcount_table_offset, c.length),
    ] {
        let bad = sc.path("bad.qcow2");
        std::fs::copy(&img, &bad).expect("copy");
        set_crypto_ext(&bad, offset, length);
        let meta = OpenOptions {
            metadata_only: true,
            ..keyed(options(), "sec0")
        };
        for o in [meta, keyed(options(), "sec0")] {
            let r = Qcow2Image::open(&bad, &o);
            assert!(r.is_err(), "{what}: opened");
        }
    }
    // The original still opens.
    let _ = Arc::new(open_keyed(&img));
}

#[test]
fn luks_with_an_external_data_file_reads_and_writes_as_qemu() {
    let sc = Scratch::new("luks-datafile");
    let img = sc.path("img.qcow2");
    let data_file = sc.path("img.data");
    qemu_create(&img, &format!(",data_file={}", s(&data_file)), "4M");
    qemu_io_luks(&img, WORKLOAD);
    let o = OpenOptions {
        policy: vdisk_block::FollowPolicy::Anything,
        ..options()
    };
    let dev = Qcow2Image::open(&img, &keyed(o.clone(), "sec0")).expect("open");
    let mut model = read_all(&dev);
    assert_same(
        &model,
        &qemu_contents_luks(&img, &sc),
        "qemu-made, data file",
    );
    drop(dev);
    let rw = OpenOptions {
        writable: true,
        ..o
    };
    let dev = Qcow2Image::open(&img, &keyed(rw, "sec0")).expect("open rw");
    for (at, len, v) in [(5usize, 700usize, 0xe1u8), (3 << 20, 70_000, 0xe2)] {
        dev.write_at(&vec![v; len], at as u64).expect("write");
        model[at..at + len].fill(v);
    }
    dev.flush().expect("flush");
    drop(dev);
    assert_same(
        &qemu_contents_luks(&img, &sc),
        &model,
        "vdisk writes, data file",
    );
    qemu_check_clean(&img);
    let data = std::fs::read(&data_file).expect("data file");
    assert!(
        !data.windows(64).any(|w| w.iter().all(|&b| b == 0xe2)),
        "plaintext in the data file"
    );
}

#[test]
fn luks_overlay_of_an_encrypted_backing_file_takes_its_key_as_backing_option() {
    define_secrets();
    let sc = Scratch::new("luks-enc-backing");
    let base = sc.path("base.qcow2");
    qemu_create(&base, "", "2M");
    qemu_io_luks(&base, &["write -P 0x6b 0 2M"]);
    let top = sc.path("top.qcow2");
    vdisk_create(
        &top,
        2 << 20,
        &[("backing_file", "base.qcow2"), ("backing_fmt", "qcow2")],
    );
    // Without the backing file's key the chain does not open.
    let rw = OpenOptions {
        writable: true,
        ..options()
    };
    let err = Qcow2Image::open(&top, &keyed(rw.clone(), "sec0")).expect_err("no backing key");
    assert!(err.message().contains("encrypt.key-secret"), "{err}");
    let mut o = keyed(rw, "sec0");
    o.driver_options
        .insert("backing.encrypt.key-secret".into(), "sec0".into());
    let dev = Qcow2Image::open(&top, &o).expect("open with both keys");
    // Partial-cluster writes copy the backing file's decrypted data, re-encrypted here.
    let mut model = vec![0x6bu8; 2 << 20];
    for (at, len) in [(100usize, 10usize), (65_536 + 511, 2), (1_500_000, 70_000)] {
        dev.write_at(&vec![0x17; len], at as u64).expect("write");
        model[at..at + len].fill(0x17);
    }
    dev.flush().expect("flush");
    drop(dev);
    let raw = sc.path("out.raw");
    qemu_img(&[
        "convert",
        "--object",
        OBJECT,
        "--image-opts",
        &format!("{},backing.encrypt.key-secret=sec0", opts_of(&top)),
        "-O",
        "raw",
        s(&raw),
    ]);
    assert_same(
        &std::fs::read(&raw).expect("read"),
        &model,
        "qemu reads the chain",
    );
}
