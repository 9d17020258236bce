//! Differencing VHDX and VHD images whose parent is named by an absolute host path: the
//! path is stored as an absolute locator (not disguised as a relative one); the parent is
//! followed only where the open policy allows it: refused with `PolicyDenied` by the
//! default `SameFolder` policy (and by `Nothing`) when it lies outside the child's folder,
//! followed under `Anything` or a `Folders` list naming its folder, and followed by the
//! default policy when the absolute path points inside the child's own folder.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{must_fail, read_all, Scratch};
use vdisk_block::format::ImageOpener;
use vdisk_block::{BlockDev, CreateOptions, ErrorKind, FollowPolicy, Format, OpenOptions, Result};
use vdisk_vhdx::{VhdxFormat, VhdxImage, VpcFormat, VpcImage};

const MIB: u64 = 1 << 20;

/// Opens parents by their recorded format, as the registry would.
struct Opener;

impl ImageOpener for Opener {
    fn open_image(&self, p: &Path, f: Option<&str>, o: &OpenOptions) -> Result<Arc<dyn BlockDev>> {
        match f {
            Some("vpc") => VpcFormat.open(p, o),
            _ => VhdxFormat.open(p, o),
        }
    }
}

fn opts(policy: FollowPolicy) -> OpenOptions {
    OpenOptions {
        policy,
        opener: Some(Arc::new(Opener)),
        ..OpenOptions::default()
    }
}

fn create(format: &dyn Format, path: &Path, size: u64, o: &str) {
    format
        .create(
            path,
            CreateOptions {
                size,
                options: CreateOptions::parse_options(o).expect("options"),
            },
        )
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

/// Two sibling folders: `parents/` holding a parent with a pattern written, and an empty
/// `children/`.
fn folders(tag: &str, format: &dyn Format, name: &str, o: &str) -> (Scratch, PathBuf, PathBuf) {
    let dir = Scratch::new(tag);
    let parents = dir.path("parents");
    let children = dir.path("children");
    std::fs::create_dir_all(&parents).expect("mkdir");
    std::fs::create_dir_all(&children).expect("mkdir");
    let parent = parents.join(name);
    create(format, &parent, 4 * MIB, o);
    let img = format
        .open(&parent, &OpenOptions::read_write())
        .expect("open parent");
    let data: Vec<u8> = (0..3 * MIB).map(|i| (i % 249) as u8 | 1).collect();
    img.write_at(&data, 1000).expect("write parent");
    img.flush().expect("flush");
    (dir, parent, children)
}

/// The policy rules, the same for both formats.
fn policies_apply(format: &dyn Format, parent: &Path, child: &Path) {
    let expected = read_all(
        format
            .open(parent, &OpenOptions::read_only())
            .expect("open parent")
            .as_ref(),
    );
    for policy in [FollowPolicy::SameFolder, FollowPolicy::Nothing] {
        let err = must_fail(
            format.open(child, &opts(policy.clone())),
            &format!("{policy:?} followed a parent outside the child's folder"),
        );
        assert_eq!(err.kind(), ErrorKind::PolicyDenied, "{policy:?}: {err}");
        assert!(
            err.to_string().contains(&parent.display().to_string()),
            "{policy:?}: the refusal does not name the parent: {err}"
        );
    }
    let parents = parent.parent().expect("folder").to_path_buf();
    for policy in [FollowPolicy::Anything, FollowPolicy::Folders(vec![parents])] {
        let img = format
            .open(child, &opts(policy.clone()))
            .unwrap_or_else(|e| panic!("{policy:?}: {e}"));
        assert!(
            read_all(img.as_ref()) == expected,
            "{policy:?}: the child does not read its parent's contents"
        );
    }
}

#[test]
fn a_vhdx_parent_named_by_an_absolute_path_is_followed_only_where_the_policy_allows() {
    let (_dir, parent, children) = folders("abs-vhdx", &VhdxFormat, "base.vhdx", "block_size=1M");
    let child = children.join("child.vhdx");
    let name = parent.to_str().expect("utf-8 path");
    create(&VhdxFormat, &child, 0, &format!("backing_file={name}"));
    let img = VhdxImage::open(
        &child,
        &OpenOptions {
            no_backing: true,
            ..OpenOptions::read_only()
        },
    )
    .expect("open without parent");
    let locator = img.params().parent_locator.as_ref().expect("a locator");
    assert_eq!(
        locator.paths(),
        vec![("absolute_win32_path", name.replace('/', "\\").as_str())],
        "the absolute parent path is stored as the absolute locator entry"
    );
    assert_eq!(locator.candidates(&child).first(), Some(&parent));
    drop(img);
    policies_apply(&VhdxFormat, &parent, &child);

    // An absolute path into the child's own folder is inside what SameFolder allows.
    let near = parent.with_file_name("near.vhdx");
    create(&VhdxFormat, &near, 0, &format!("backing_file={name}"));
    VhdxFormat
        .open(&near, &opts(FollowPolicy::SameFolder))
        .expect("a parent in the child's folder, named absolutely, is followed");
}

#[test]
fn a_vhd_parent_named_by_an_absolute_path_is_followed_only_where_the_policy_allows() {
    let (_dir, parent, children) = folders("abs-vhd", &VpcFormat, "base.vhd", "force_size=on");
    let child = children.join("child.vhd");
    let name = parent.to_str().expect("utf-8 path");
    create(
        &VpcFormat,
        &child,
        0,
        &format!("backing_file={name},backing_fmt=vpc"),
    );
    let img = VpcImage::open(
        &child,
        &OpenOptions {
            no_backing: true,
            ..OpenOptions::read_only()
        },
    )
    .expect("open without parent");
    assert_eq!(
        img.parent_locators().expect("locators"),
        vec![
            ("W2ku".to_string(), name.replace('/', "\\")),
            ("name".to_string(), "base.vhd".to_string()),
        ],
        "the absolute parent path is stored in a W2ku (absolute) locator"
    );
    drop(img);
    policies_apply(&VpcFormat, &parent, &child);

    let near = parent.with_file_name("near.vhd");
    create(
        &VpcFormat,
        &near,
        0,
        &format!("backing_file={name},backing_fmt=vpc"),
    );
    VpcFormat
        .open(&near, &opts(FollowPolicy::SameFolder))
        .expect("a parent in the child's folder, named absolutely, is followed");
}
