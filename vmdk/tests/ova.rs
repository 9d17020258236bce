//! Appliances: disks inside an `.ova` read in place, and an `.ovf` beside its files, read as
//! qemu-img reads the same VMDKs on their own.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::{read_all, Scratch};
use vdisk_block::{BlockDev, Format, OpenOptions};
use vdisk_vmdk::ova::list_disks;
use vdisk_vmdk::VmdkFormat;

fn run(program: &str, args: &[&str], dir: &Path) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} is required: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ovf(disks: &[(&str, u64)]) -> String {
    let mut refs = String::new();
    let mut section = String::new();
    for (i, (name, size)) in disks.iter().enumerate() {
        refs.push_str(&format!(
            "    <File ovf:href=\"{name}\" ovf:id=\"file{i}\"/>\n"
        ));
        section.push_str(&format!(
            "    <Disk ovf:capacity=\"{size}\" ovf:diskId=\"vmdisk{i}\" ovf:fileRef=\"file{i}\" \
ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>\n"
        ));
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Envelope xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\" \
xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1\">\n  <References>\n{refs}  </References>\n  \
<DiskSection>\n    <Info>Virtual disk information</Info>\n{section}  </DiskSection>\n</Envelope>\n"
    )
}

/// Two stream disks made by qemu-img from patterned raw data; returns their contents.
fn make_disks(dir: &Path, names: &[&str]) -> Vec<Vec<u8>> {
    let mut contents = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let raw = dir.join(format!("src{i}.raw"));
        std::fs::File::create(&raw)
            .and_then(|f| f.set_len(4 << 20))
            .expect("raw");
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P {} {}k 300k", 0x31 + i, 64 * i + 5),
                raw.to_str().expect("utf8"),
            ],
            dir,
        );
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                raw.to_str().expect("utf8"),
                name,
            ],
            dir,
        );
        contents.push(std::fs::read(&raw).expect("raw contents"));
        std::fs::remove_file(&raw).expect("remove");
    }
    contents
}

fn open(path: &Path, disk: Option<usize>) -> vdisk_block::Result<Arc<dyn BlockDev>> {
    let mut options = OpenOptions::read_only();
    if let Some(d) = disk {
        options.driver_options.insert("disk".into(), d.to_string());
    }
    VmdkFormat.open(path, &options)
}

#[test]
fn ova_disks_read_in_place() {
    let dir = Scratch::new("ova");
    let long = format!("{}-disk2.vmdk", "a-very-long-appliance-name".repeat(5));
    let names = ["app-disk1.vmdk", long.as_str()];
    let contents = make_disks(&dir.0, &names);
    std::fs::write(
        dir.path("app.ovf"),
        ovf(&[(names[0], 4 << 20), (names[1], 4 << 20)]),
    )
    .expect("ovf");
    // GNU tar writes the long name as an 'L' record; pax as a `path` record.
    run(
        "tar",
        &["-cf", "app.ova", "app.ovf", names[0], names[1]],
        &dir.0,
    );
    run(
        "tar",
        &[
            "--format=pax",
            "-cf",
            "pax.ova",
            "app.ovf",
            names[0],
            names[1],
        ],
        &dir.0,
    );
    let dev = open(&dir.path("pax.ova"), Some(1)).expect("open a disk of a pax archive");
    assert!(
        read_all(dev.as_ref()) == contents[1],
        "disk 1 of the pax archive"
    );

    let ova = dir.path("app.ova");
    let head = std::fs::read(&ova).expect("ova");
    assert_eq!(VmdkFormat.probe(&head[..4096], &ova), 100);
    let disks = list_disks(&ova, &OpenOptions::read_only()).expect("list");
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[1].href.as_deref(), Some(long.as_str()));
    for (i, want) in contents.iter().enumerate() {
        let dev = open(&ova, Some(i)).expect("open disk");
        assert_eq!(dev.size(), 4 << 20);
        assert!(read_all(dev.as_ref()) == *want, "disk {i} of the ova");
        assert!(dev.is_read_only());
    }
    // Disk 0 by default; no disk 2.
    assert!(read_all(open(&ova, None).expect("default").as_ref()) == contents[0]);
    let err = open(&ova, Some(2)).map(|_| ()).expect_err("no third disk");
    assert!(err.message().contains("2 disk"), "{err}");

    // The same disks through the .ovf beside them.
    let dev = open(&dir.path("app.ovf"), Some(1)).expect("ovf disk");
    assert!(read_all(dev.as_ref()) == contents[1]);

    // A truncated archive is refused.
    let cut = dir.path("cut.ova");
    std::fs::write(&cut, &head[..head.len() / 2]).expect("cut");
    let err = open(&cut, Some(1)).map(|_| ()).expect_err("truncated");
    assert!(
        err.message().contains("truncated") || err.message().contains("past the end"),
        "{err}"
    );
}

#[test]
fn ovf_disk_files_outside_the_folder_need_permission() {
    let dir = Scratch::new("ovf-policy");
    let other = Scratch::new("ovf-elsewhere");
    make_disks(&other.0, &["d.vmdk"]);
    let target = other.path("d.vmdk");
    std::fs::write(
        dir.path("x.ovf"),
        ovf(&[(target.to_str().expect("utf8"), 4 << 20)]),
    )
    .expect("ovf");
    let err = open(&dir.path("x.ovf"), None)
        .map(|_| ())
        .expect_err("outside");
    assert_eq!(err.kind(), vdisk_block::ErrorKind::PolicyDenied, "{err}");
}
