//! Drop-in mode on whole scripts: each `tests/scenarios/*.sh` (plain bash calling
//! `qemu-img` and `qemu-io` from PATH, printing every command, its stdout, its stderr and
//! its exit code) runs twice in the same scratch folder, once with the system qemu-img and
//! once with a folder first in PATH where `qemu-img` is a link to the vdisk binary under
//! test (qemu-io stays the real one). The two whole outputs must be identical; the only
//! normalisation is the scratch folder's path (the same folder is used for both runs, so
//! even that is a no-op unless a tool prints an absolute path).
//!
//! Scripts left out while a command they use does not work yet are named in [`NOT_YET`].

use std::fs;
use std::path::Path;
use std::process::Command;

use vdisk_tests::{dropin_link, Scratch};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk-under-test");

/// Scenario scripts not in the test list yet, and why (none at the moment: every script's
/// commands work).
pub const NOT_YET: &[(&str, &str)] = &[];

/// Runs `tests/scenarios/<name>` in `dir` (emptied first), with `bin` first in PATH if
/// given; returns everything it printed.
fn run_script(name: &str, dir: &Path, bin: Option<&Path>) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(name);
    assert!(script.is_file(), "missing scenario {}", script.display());
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).expect("create scenario folder");
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(bin) = bin {
        let mut paths = vec![bin.to_path_buf()];
        paths.extend(std::env::split_paths(&path));
        path = std::env::join_paths(paths).expect("join PATH");
    }
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .env("PATH", path)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", script.display()));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text.push_str(&format!("script exit: {:?}\n", out.status.code()));
    // The scratch folder is the only host-specific part of the output.
    text.replace(&dir.to_string_lossy().into_owned(), "<scratch>")
}

/// Runs scenario `name` with both tools and requires the same whole output.
fn scenario(name: &str) {
    let scratch = Scratch::new(&format!("scenario-{}", name.trim_end_matches(".sh")));
    let bin = scratch.sub("bin");
    dropin_link(&bin, Path::new(VDISK));
    let dir = scratch.path("run");
    let qemu = run_script(name, &dir, None);
    // The script must really exercise qemu-img: its guest I/O works, most steps succeed.
    assert!(
        !qemu.contains(": FAILED ("),
        "{name} fails with qemu-img:\n{qemu}"
    );
    let successes = qemu.matches("\n  exit 0\n").count();
    assert!(
        successes >= 5,
        "{name}: only {successes} steps succeed:\n{qemu}"
    );
    // The second run must really find vdisk under the name qemu-img.
    let found = Command::new("bash")
        .args(["-c", "readlink -f \"$(command -v qemu-img)\""])
        .env("PATH", {
            let mut paths = vec![bin.clone()];
            paths.extend(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            ));
            std::env::join_paths(paths).expect("join PATH")
        })
        .output()
        .expect("run bash");
    let want = fs::canonicalize(VDISK).expect("vdisk binary");
    assert_eq!(
        String::from_utf8_lossy(&found.stdout).trim(),
        want.to_string_lossy(),
        "qemu-img in the drop-in PATH is not vdisk"
    );
    let vdisk = run_script(name, &dir, Some(&bin));
    if vdisk != qemu {
        let (q, v): (Vec<&str>, Vec<&str>) = (qemu.lines().collect(), vdisk.lines().collect());
        let at = q
            .iter()
            .zip(&v)
            .position(|(a, b)| a != b)
            .unwrap_or(q.len().min(v.len()));
        let from = at.saturating_sub(8);
        panic!(
            "{name}: output differs from line {}\n--- qemu-img:\n{}\n--- drop-in vdisk:\n{}",
            at + 1,
            q[from..q.len().min(at + 8)].join("\n"),
            v[from..v.len().min(at + 8)].join("\n"),
        );
    }
}

#[test]
fn openstack_glance_nova() {
    scenario("openstack_glance_nova.sh");
}

#[test]
fn v2v_import() {
    scenario("v2v_import.sh");
}

#[test]
fn snapshot_cycle() {
    scenario("snapshot_cycle.sh");
}

#[test]
fn amend_resize() {
    scenario("amend_resize.sh");
}

#[test]
fn rebase_chain() {
    scenario("rebase_chain.sh");
}

#[test]
fn commit_chain() {
    scenario("commit_chain.sh");
}

/// Every script in tests/scenarios is either tested above or named in [`NOT_YET`].
#[test]
fn every_scenario_is_listed() {
    let tested = [
        "openstack_glance_nova.sh",
        "v2v_import.sh",
        "snapshot_cycle.sh",
        "amend_resize.sh",
        "rebase_chain.sh",
        "commit_chain.sh",
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    for e in fs::read_dir(&dir).expect("list scenarios").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".sh") {
            assert!(
                tested.contains(&name.as_str()) || NOT_YET.iter().any(|(n, _)| *n == name),
                "{name} is neither tested nor listed in NOT_YET"
            );
        }
    }
}
