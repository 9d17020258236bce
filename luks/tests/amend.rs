//! Key-slot management (`amend`) of the luks driver against the system qemu-img (the
//! oracle): slots vdisk adds open in qemu, slots qemu adds open in vdisk, erased slots are
//! refused by both, the header is left as qemu leaves it, and the region API works on a
//! header that does not start the file (as inside qcow2).
//!
//! Images are made with `iter-time=10` (vdisk) or `iter-time=0` (amends) so PBKDF2 stays
//! fast; qemu-img spends seconds benchmarking per create, so few images come from it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use vdisk_block::testing::TempDir;
use vdisk_block::{CreateOptions, Format, HostFile, OpenOptions};
use vdisk_luks::amend::{amend_slots, AmendOptions};
use vdisk_luks::header::{Header, HEADER_LEN};
use vdisk_luks::keys::{self, FileRegion, INVALID_PASSWORD};
use vdisk_luks::{LuksFormat, LuksImage};
use zeroize::Zeroizing;

/// Passphrases by id, for vdisk (ids private to this test binary) and for qemu.
const KEYS: &[(&str, &str)] = &[
    ("amend-a", "first pass"),
    ("amend-b", "second pass"),
    ("amend-c", "third pass"),
];

fn define_secrets() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (id, pw) in KEYS {
            vdisk_luks::secret::define(id, Zeroizing::new(pw.as_bytes().to_vec()))
                .expect("define secret");
        }
    });
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (the oracle must be installed): {e}"))
}

/// `--object` arguments defining every test secret for qemu, under the same ids.
fn objects() -> Vec<String> {
    KEYS.iter()
        .flat_map(|(id, pw)| ["--object".to_string(), format!("secret,id={id},data={pw}")])
        .collect()
}

fn image_opts(path: &Path, key: &str) -> String {
    format!(
        "driver=luks,file.filename={},key-secret={key}",
        path.display()
    )
}

/// qemu-img reading the whole image with passphrase `key`: `Ok` or qemu's error line.
fn qemu_reads(path: &Path, key: &str) -> Result<(), String> {
    let mut args: Vec<String> = vec!["convert".into()];
    args.extend(objects());
    args.extend([
        "--image-opts".into(),
        image_opts(path, key),
        "-O".into(),
        "raw".into(),
        path.with_extension("out").to_string_lossy().into_owned(),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-img", &refs);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim_end().to_string())
    }
}

fn qemu_amend(path: &Path, key: &str, opts: &str, force: bool) {
    let mut args: Vec<String> = vec!["amend".into()];
    if force {
        args.push("--force".into());
    }
    args.extend(objects());
    args.extend([
        "--image-opts".into(),
        image_opts(path, key),
        "-o".into(),
        opts.into(),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-img", &refs);
    assert!(
        out.status.success(),
        "qemu-img {refs:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 1 MiB luks image made by vdisk with `amend-a` in slot 0.
fn vdisk_image(dir: &TempDir, name: &str) -> std::path::PathBuf {
    define_secrets();
    let path = dir.join(name);
    let mut options = CreateOptions {
        size: 1 << 20,
        ..CreateOptions::default()
    };
    options
        .options
        .insert("key-secret".into(), "amend-a".into());
    options.options.insert("iter-time".into(), "10".into());
    LuksFormat.create(&path, options).expect("create");
    path
}

fn amend(path: &Path, key: &str, opts: &str, force: bool) -> vdisk_block::Result<()> {
    define_secrets();
    let driver_options = BTreeMap::from([("key-secret".to_string(), key.to_string())]);
    let options = CreateOptions {
        size: 0,
        options: CreateOptions::parse_options(opts).expect("options"),
    };
    LuksFormat.amend_with(path, &driver_options, force, options)
}

/// vdisk opening the image for data with passphrase `key`: `Ok` or the error's message.
fn vdisk_opens(path: &Path, key: &str) -> Result<(), String> {
    define_secrets();
    let mut options = OpenOptions::default();
    options
        .driver_options
        .insert("key-secret".into(), key.into());
    LuksImage::open(path, &options)
        .map(|_| ())
        .map_err(|e| e.message().to_string())
}

fn header_of(path: &Path) -> Header {
    let bytes = std::fs::read(path).expect("read");
    Header::parse(&bytes[..HEADER_LEN]).expect("parse")
}

fn active(path: &Path) -> Vec<bool> {
    header_of(path).slots.iter().map(|s| s.active).collect()
}

#[test]
fn a_slot_vdisk_adds_opens_in_qemu_and_in_vdisk() {
    let dir = TempDir::new("luks-amend-add").expect("tmp");
    let path = vdisk_image(&dir, "add.luks");
    amend(
        &path,
        "amend-a",
        "state=active,new-secret=amend-b,iter-time=0",
        false,
    )
    .expect("add to the first free slot");
    amend(
        &path,
        "amend-b",
        "state=active,new-secret=amend-c,keyslot=5,iter-time=0",
        false,
    )
    .expect("add to slot 5");
    assert_eq!(
        active(&path),
        [true, true, false, false, false, true, false, false]
    );
    let header = header_of(&path);
    // iter-time 0 gives qemu's floor of 1000 iterations.
    assert_eq!(header.slots[1].iterations, 1000);
    for (id, _) in KEYS {
        assert_eq!(qemu_reads(&path, id), Ok(()), "qemu with {id}");
        assert_eq!(vdisk_opens(&path, id), Ok(()), "vdisk with {id}");
    }
}

#[test]
fn a_slot_qemu_adds_opens_in_vdisk_and_vdisk_erases_it() {
    let dir = TempDir::new("luks-amend-qemu").expect("tmp");
    let path = vdisk_image(&dir, "q.luks");
    qemu_amend(
        &path,
        "amend-a",
        "state=active,new-secret=amend-b,keyslot=3,iter-time=10",
        false,
    );
    assert_eq!(vdisk_opens(&path, "amend-a"), Ok(()));
    assert_eq!(vdisk_opens(&path, "amend-b"), Ok(()));
    let before = std::fs::read(&path).expect("read");
    amend(&path, "amend-b", "state=inactive,old-secret=amend-a", false).expect("erase slot 0");
    let after = std::fs::read(&path).expect("read");
    // Both tools refuse the erased passphrase with qemu's words.
    let refused = qemu_reads(&path, "amend-a").expect_err("qemu must refuse");
    assert!(refused.ends_with(INVALID_PASSWORD), "{refused}");
    assert_eq!(vdisk_opens(&path, "amend-a"), Err(INVALID_PASSWORD.into()));
    assert_eq!(qemu_reads(&path, "amend-b"), Ok(()));
    // The slot's entry is cleared as qemu clears it, its material (and nothing else but
    // that entry) rewritten.
    let header = header_of(&path);
    let old = Header::parse(&before[..HEADER_LEN]).expect("parse");
    assert!(!header.slots[0].active);
    assert_eq!(header.slots[0].iterations, 0);
    assert_eq!(header.slots[0].salt, [0u8; 32]);
    assert_eq!(header.slots[0].key_offset, old.slots[0].key_offset);
    assert_eq!(header.slots[0].stripes, 4000);
    let start = header.key_material_offset(0) as usize;
    let end = start + header.split_key_len();
    let changed: Vec<usize> = (0..before.len())
        .filter(|&i| before[i] != after[i])
        .collect();
    assert!(changed
        .iter()
        .all(|&i| (208..256).contains(&i) || (start..end).contains(&i)));
    assert!(changed.iter().filter(|&&i| i >= start).count() > header.split_key_len() / 2);
}

#[test]
fn qemu_erases_a_slot_vdisk_added_and_vdisk_refuses_it() {
    let dir = TempDir::new("luks-amend-qerase").expect("tmp");
    let path = vdisk_image(&dir, "e.luks");
    amend(
        &path,
        "amend-a",
        "state=active,new-secret=amend-b,iter-time=0",
        false,
    )
    .expect("add");
    qemu_amend(&path, "amend-a", "state=inactive,keyslot=1", false);
    assert_eq!(vdisk_opens(&path, "amend-b"), Err(INVALID_PASSWORD.into()));
    assert_eq!(vdisk_opens(&path, "amend-a"), Ok(()));
}

#[test]
fn refusals_are_qemus_and_change_nothing() {
    let dir = TempDir::new("luks-amend-refuse").expect("tmp");
    let path = vdisk_image(&dir, "r.luks");
    amend(
        &path,
        "amend-a",
        "state=active,new-secret=amend-b,iter-time=0",
        false,
    )
    .expect("add");
    let before = std::fs::read(&path).expect("read");
    for (opts, message) in [
        ("new-secret=amend-c", "Parameter 'state' is missing"),
        ("state=on", "Parameter 'state' does not accept value 'on'"),
        ("state=active", "'new-secret' is required to activate a keyslot"),
        (
            "state=active,new-secret=amend-c,old-secret=amend-a",
            "'old-secret' must not be given when activating keyslots",
        ),
        (
            "state=active,new-secret=amend-c,keyslot=8",
            "Invalid keyslot 8 specified, must be between 0 and 7",
        ),
        (
            "state=active,new-secret=amend-c,keyslot=-1",
            "Invalid keyslot 4294967295 specified, must be between 0 and 7",
        ),
        (
            "state=active,new-secret=amend-c,keyslot=1",
            "Refusing to overwrite active keyslot 1 - please erase it first",
        ),
        ("state=active,new-secret=nope", "No secret with id 'nope'"),
        (
            "state=inactive,new-secret=amend-c",
            "'new-secret' must not be given when erasing keyslots",
        ),
        ("state=inactive,old-secret=nope", "No secret with id 'nope'"),
        (
            "state=inactive",
            "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given",
        ),
        (
            "state=inactive,keyslot=4",
            "Given keyslot 4 is already erased (inactive) ",
        ),
        (
            "state=inactive,keyslot=1,old-secret=amend-a",
            "Given keyslot 1 doesn't contain the given old password for erase operation",
        ),
        (
            "state=inactive,old-secret=amend-c",
            "No keyslots match given (old) password for erase operation",
        ),
        (
            "state=inactive,keyslot=x",
            "Parameter 'keyslot' expects integer",
        ),
    ] {
        let err = amend(&path, "amend-a", opts, false).expect_err(opts);
        assert_eq!(err.message(), message, "{opts}");
        assert_eq!(std::fs::read(&path).expect("read"), before, "{opts}");
    }
    // The last slot: refused, unless forced.
    amend(&path, "amend-a", "state=inactive,keyslot=1", false).expect("erase slot 1");
    let err = amend(&path, "amend-a", "state=inactive,keyslot=0", false).expect_err("last");
    assert_eq!(
        err.message(),
        "Attempt to erase the only active keyslot 0 which will erase all the data in the image irreversibly - refusing operation"
    );
    let err = amend(&path, "amend-a", "state=inactive,old-secret=amend-a", false)
        .expect_err("all matching");
    assert!(err.message().starts_with("All the active keyslots match"));
    amend(&path, "amend-a", "state=inactive,old-secret=amend-a", true).expect("forced");
    assert_eq!(active(&path), [false; 8]);
    assert_eq!(
        qemu_reads(&path, "amend-a").expect_err("no key left"),
        format!(
            "qemu-img: Could not open '{}': {INVALID_PASSWORD}",
            image_opts(&path, "amend-a")
        )
    );
}

#[test]
fn force_overwrites_an_active_slot_and_a_full_header_is_refused() {
    let dir = TempDir::new("luks-amend-full").expect("tmp");
    let path = vdisk_image(&dir, "f.luks");
    for _ in 1..8 {
        amend(
            &path,
            "amend-a",
            "state=active,new-secret=amend-b,iter-time=0",
            false,
        )
        .expect("fill");
    }
    assert_eq!(active(&path), [true; 8]);
    let err = amend(&path, "amend-a", "state=active,new-secret=amend-c", false).expect_err("full");
    assert_eq!(
        err.message(),
        "Can't add a keyslot - all keyslots are in use"
    );
    amend(
        &path,
        "amend-a",
        "state=active,new-secret=amend-c,keyslot=0,iter-time=0",
        true,
    )
    .expect("forced overwrite");
    // Slot 0 now holds amend-c only; the erase by password takes every matching slot.
    assert_eq!(qemu_reads(&path, "amend-c"), Ok(()));
    assert!(qemu_reads(&path, "amend-a").is_err());
    amend(&path, "amend-c", "state=inactive,old-secret=amend-b", false).expect("erase b");
    assert_eq!(
        active(&path),
        [true, false, false, false, false, false, false, false]
    );
    assert_eq!(qemu_reads(&path, "amend-c"), Ok(()));
}

#[test]
fn the_region_api_works_on_a_header_inside_a_larger_file() {
    define_secrets();
    let dir = TempDir::new("luks-amend-region").expect("tmp");
    let plain = vdisk_image(&dir, "plain.luks");
    // The header region of the plain image, 64 KiB into a file with other bytes around it,
    // as qcow2 embeds it.
    let region_bytes = {
        let bytes = std::fs::read(&plain).expect("read");
        let header = Header::parse(&bytes[..HEADER_LEN]).expect("parse");
        bytes[..header.payload_bytes() as usize].to_vec()
    };
    let base = 65536u64;
    let mut file_bytes = vec![0x5au8; base as usize];
    file_bytes.extend_from_slice(&region_bytes);
    file_bytes.extend(vec![0xa5u8; 65536]);
    let path = dir.join("embedded.bin");
    std::fs::write(&path, &file_bytes).expect("write");

    let file = HostFile::open(
        &path,
        true,
        vdisk_block::CacheMode::Writeback,
        vdisk_block::EngineChoice::Sync,
    )
    .expect("open");
    let mut header = Header::parse(&region_bytes[..HEADER_LEN]).expect("parse");
    let mut region = FileRegion::new(&file, base);
    let master = keys::unlock(&header, b"first pass", &mut |off, buf| {
        file.read_at(buf, base + off)
    })
    .expect("unlock");
    let mut options = CreateOptions::default();
    options
        .options
        .insert("encrypt.state".into(), "active".into());
    options
        .options
        .insert("encrypt.new-secret".into(), "amend-b".into());
    options
        .options
        .insert("encrypt.iter-time".into(), "0".into());
    let request = AmendOptions::take(&mut options, "encrypt.").expect("options");
    assert!(options.options.is_empty());
    amend_slots(&mut region, &mut header, &master, &request, false).expect("add");
    keys::erase_slot(&mut region, &mut header, 0).expect("erase slot 0");
    drop(file);

    let after = std::fs::read(&path).expect("read");
    assert_eq!(after.len(), file_bytes.len());
    assert!(after[..base as usize].iter().all(|&b| b == 0x5a));
    assert!(after[after.len() - 65536..].iter().all(|&b| b == 0xa5));
    let embedded = &after[base as usize..base as usize + region_bytes.len()];
    let reread = Header::parse(&embedded[..HEADER_LEN]).expect("parse");
    assert_eq!(reread, header);
    let mut read = |off: u64, buf: &mut [u8]| -> vdisk_block::Result<()> {
        buf.copy_from_slice(&embedded[off as usize..off as usize + buf.len()]);
        Ok(())
    };
    let again = keys::unlock(&reread, b"second pass", &mut read).expect("new passphrase");
    assert_eq!(&again[..], &master[..]);
    assert_eq!(
        keys::unlock(&reread, b"first pass", &mut read)
            .expect_err("erased")
            .message(),
        INVALID_PASSWORD
    );
}
