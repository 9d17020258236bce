//! qemu's own view of a persistent dirty bitmap: qemu-nbd exports the image with the
//! bitmap and `qemu-img map` reads its `qemu:dirty-bitmap:` context.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{qemu_img, Scratch};

/// Stops the qemu-nbd it started, on every path out of a test.
struct Nbd {
    pid_file: PathBuf,
}

impl Drop for Nbd {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.pid_file) {
            let pid = pid.trim();
            let _ = Command::new("kill").arg(pid).status();
            // Wait until it is gone, so its image lock is free for the next command.
            for _ in 0..1000 {
                if gone(pid) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
}

/// True when process `pid` has exited (a zombie left for a reaper counts: it holds no
/// locks any more).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// The dirty ranges qemu sees in bitmap `name` of `image`: exported read-only by qemu-nbd
/// with the bitmap, whose dirty extents qemu's NBD client reports as `"data": false`.
pub fn qemu_dirty_ranges(image: &Path, name: &str, scratch: &Scratch) -> Vec<(u64, u64)> {
    let sock = scratch.path(&format!("nbd-{name}.sock"));
    let pid_file = scratch.path(&format!("nbd-{name}.pid"));
    let _ = std::fs::remove_file(&pid_file);
    let status = Command::new("qemu-nbd")
        .args([
            "--persistent",
            "--fork",
            "-f",
            "qcow2",
            "-r",
            "-x",
            "",
            "-B",
            name,
        ])
        .arg(format!("--pid-file={}", pid_file.display()))
        .arg(format!("--socket={}", sock.display()))
        .arg(image)
        .status()
        .expect("run qemu-nbd");
    let _guard = Nbd {
        pid_file: pid_file.clone(),
    };
    assert!(status.success(), "qemu-nbd failed");
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        sock.display()
    );
    let out = qemu_img(&["map", "--output=json", "--image-opts", &opts]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("map json");
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("map array") {
        if e["data"].as_bool() == Some(false) {
            let (start, len) = (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
            );
            match ranges.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 += len,
                _ => ranges.push((start, len)),
            }
        }
    }
    ranges
}
