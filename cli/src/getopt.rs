//! qemu-img's long options as its getopt sees them, so that drop-in mode abbreviates them
//! the way qemu-img does (`--out=json` is `--output=json`; `--tar` is ambiguous) even where
//! vdisk has more long options than qemu-img: an abbreviation means what it means to qemu-img.

use std::ffi::OsString;

use clap::CommandFactory;

/// Each sub-command's long options in qemu-img 10's table order (getopt lists an ambiguous
/// abbreviation's candidates in that order), and whether each takes a value. Read from
/// qemu-img 10.0 itself through getopt's messages by `scripts/qemu-long-options`, whose
/// output this is.
const QEMU_LONG_OPTIONS: &[(&str, &[(&str, bool)])] = &[
    (
        "amend",
        &[
            ("cache", true),
            ("format", true),
            ("force", false),
            ("help", false),
            ("image-opts", false),
            ("object", true),
            ("options", true),
            ("progress", false),
            ("quiet", false),
        ],
    ),
    (
        "bench",
        &[
            ("aio", true),
            ("buffer-size", true),
            ("cache", true),
            ("count", true),
            ("depth", true),
            ("format", true),
            ("flush-interval", true),
            ("force-share", false),
            ("help", false),
            ("image-opts", false),
            ("native", false),
            ("no-drain", false),
            ("offset", true),
            ("pattern", true),
            ("step-size", true),
            ("write", false),
        ],
    ),
    (
        "bitmap",
        &[
            ("add", false),
            ("clear", false),
            ("disable", false),
            ("enable", false),
            ("granularity", true),
            ("help", false),
            ("image-opts", false),
            ("merge", true),
            ("object", true),
            ("remove", false),
            ("source-file", true),
            ("source-format", true),
        ],
    ),
    (
        "check",
        &[
            ("cache", true),
            ("format", true),
            ("force-share", false),
            ("help", false),
            ("image-opts", false),
            ("output", true),
            ("object", true),
            ("quiet", false),
            ("repair", true),
        ],
    ),
    (
        "commit",
        &[
            ("base", true),
            ("cache", true),
            ("drop", false),
            ("format", true),
            ("help", false),
            ("image-opts", false),
            ("object", true),
            ("progress", false),
            ("quiet", false),
            ("rate", true),
        ],
    ),
    (
        "compare",
        &[
            ("a-format", true),
            ("b-format", true),
            ("cache", true),
            ("force-share", false),
            ("help", false),
            ("image-opts", false),
            ("left-format", true),
            ("object", true),
            ("progress", false),
            ("quiet", false),
            ("right-format", true),
            ("strict", false),
        ],
    ),
    (
        "convert",
        &[
            ("backing", true),
            ("backing-format", true),
            ("bitmaps", false),
            ("copy-range-offloading", false),
            ("force-share", false),
            ("help", false),
            ("image-opts", false),
            ("object", true),
            ("output-format", true),
            ("options", true),
            ("output-cache", true),
            ("oob-writes", false),
            ("parallel", true),
            ("quiet", false),
            ("rate", true),
            ("source-image-opts", false),
            ("source-format", true),
            ("source-cache", true),
            ("snapshot", true),
            ("sparse-size", true),
            ("salvage", false),
            ("skip-broken-bitmaps", false),
            ("target-image-opts", false),
            ("target-is-zero", false),
        ],
    ),
    (
        "create",
        &[
            ("backing", true),
            ("backing-format", true),
            ("backing-unsafe", false),
            ("format", true),
            ("help", false),
            ("object", true),
            ("options", true),
            ("quiet", false),
        ],
    ),
    (
        "dd",
        &[
            ("format", true),
            ("force-share", false),
            ("help", false),
            ("image-opts", false),
            ("object", true),
            ("output-format", true),
        ],
    ),
    (
        "info",
        &[
            ("backing-chain", false),
            ("format", true),
            ("force-share", false),
            ("help", false),
            ("image-opts", false),
            ("output", true),
            ("object", true),
        ],
    ),
    (
        "map",
        &[
            ("format", true),
            ("force-share", false),
            ("help", false),
            ("image-opts", false),
            ("max-length", true),
            ("output", true),
            ("object", true),
            ("start-offset", true),
        ],
    ),
    (
        "measure",
        &[
            ("format", true),
            ("force-share", false),
            ("help", false),
            ("image-opts", false),
            ("options", true),
            ("object", true),
            ("output", true),
            ("snapshot", true),
            ("size", true),
            ("target-format", true),
        ],
    ),
    (
        "rebase",
        &[
            ("backing", true),
            ("backing-format", true),
            ("backing-cache", true),
            ("backing-unsafe", false),
            ("cache", true),
            ("compress", false),
            ("force-share", false),
            ("format", true),
            ("help", false),
            ("image-opts", false),
            ("object", true),
            ("progress", false),
            ("quiet", false),
        ],
    ),
    (
        "resize",
        &[
            ("format", true),
            ("help", false),
            ("image-opts", false),
            ("object", true),
            ("preallocation", true),
            ("quiet", false),
            ("shrink", false),
        ],
    ),
    (
        "snapshot",
        &[
            ("apply", false),
            ("create", false),
            ("delete", false),
            ("format", true),
            ("force-share", false),
            ("help", false),
            ("image-opts", false),
            ("list", false),
            ("object", true),
            ("quiet", false),
        ],
    ),
];

/// A command line getopt refuses: the message, without the `<prog> <cmd>: ` prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetoptError(pub String);

/// Rewrites the arguments of sub-command `cmd` (`args` excludes the program name and the
/// sub-command) so that each abbreviated long option qemu-img knows is spelled out, and
/// refuses what qemu-img's getopt refuses: an ambiguous abbreviation, a value given to an
/// option that takes none. Long options qemu-img does not know are left for clap.
pub fn expand_long_options(cmd: &str, args: &[OsString]) -> Result<Vec<OsString>, GetoptError> {
    let Some((_, table)) = QEMU_LONG_OPTIONS.iter().find(|(name, _)| *name == cmd) else {
        return Ok(args.to_vec());
    };
    let short_takes_value = short_options_with_values(cmd);
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let Some(text) = arg.to_str() else {
            out.push(arg.clone());
            continue;
        };
        if text == "--" {
            out.push(arg.clone());
            out.extend(iter.cloned());
            break;
        }
        if let Some(long) = text.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (long, None),
            };
            let Some((full, takes_value)) = resolve(table, name)? else {
                out.push(arg.clone());
                continue;
            };
            if value.is_some() && !takes_value {
                return Err(GetoptError(format!(
                    "option '--{full}' doesn't allow an argument"
                )));
            }
            out.push(match value {
                Some(value) => format!("--{full}={value}").into(),
                None => format!("--{full}").into(),
            });
            if takes_value && value.is_none() {
                // The next word is the value, whatever it looks like. getopt names the
                // option as it matched it, an alias included, when there is none.
                match iter.next() {
                    Some(next) => out.push(next.clone()),
                    None => {
                        return Err(GetoptError(format!(
                            "option '--{full}' requires an argument"
                        )))
                    }
                }
            }
            continue;
        }
        out.push(arg.clone());
        if let Some(cluster) = text.strip_prefix('-').filter(|c| !c.is_empty()) {
            // In "-qf" the f takes the next word; in "-fqcow2" the value is attached.
            for (i, c) in cluster.char_indices() {
                if short_takes_value.contains(&c) {
                    if i + c.len_utf8() == cluster.len() {
                        if let Some(next) = iter.next() {
                            out.push(next.clone());
                        }
                    }
                    break;
                }
            }
        }
    }
    Ok(out)
}

/// The full name and value-taking of the qemu-img long option `typed` abbreviates, `None`
/// if qemu-img has no such option.
fn resolve(
    table: &[(&'static str, bool)],
    typed: &str,
) -> Result<Option<(&'static str, bool)>, GetoptError> {
    if let Some(&exact) = table.iter().find(|(name, _)| *name == typed) {
        return Ok(Some(exact));
    }
    let candidates: Vec<(&'static str, bool)> = table
        .iter()
        .copied()
        .filter(|(name, _)| name.starts_with(typed))
        .collect();
    match candidates.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        many => {
            let list: Vec<String> = many.iter().map(|(name, _)| format!("'--{name}'")).collect();
            Err(GetoptError(format!(
                "option '--{typed}' is ambiguous; possibilities: {}",
                list.join(" ")
            )))
        }
    }
}

/// The short options of sub-command `cmd` that take a value, from vdisk's own definition.
fn short_options_with_values(cmd: &str) -> Vec<char> {
    let command = crate::Cli::command();
    let Some(sub) = command.find_subcommand(cmd) else {
        return Vec::new();
    };
    sub.get_arguments()
        .filter(|arg| takes_value(arg))
        .filter_map(|arg| arg.get_short())
        .collect()
}

/// Whether `arg` reads a value from the command line (a flag that counts or appends `true`
/// reads none).
fn takes_value(arg: &clap::Arg) -> bool {
    arg.get_action().takes_values() && arg.get_num_args().is_none_or(|n| n.max_values() > 0)
}

/// The long option `arg` (`--name` or `--name=value`) typed for sub-command `cmd`, and the
/// vdisk long options it abbreviates, when there are several (clap refuses those as
/// unknown); `None` for anything else.
pub fn ambiguous_long_option(cmd: &str, arg: &str) -> Option<(String, Vec<String>)> {
    let typed = arg.strip_prefix("--")?;
    let typed = typed.split_once('=').map_or(typed, |(name, _)| name);
    let candidates = vdisk_long_options_starting(cmd, typed);
    (candidates.len() > 1).then(|| (typed.to_string(), candidates))
}

/// The long options of sub-command `cmd` (aliases included, in the order vdisk declares them)
/// that begin with `prefix`: what an ambiguous abbreviation could have meant.
fn vdisk_long_options_starting(cmd: &str, prefix: &str) -> Vec<String> {
    let command = crate::Cli::command();
    let Some(sub) = command.find_subcommand(cmd) else {
        return Vec::new();
    };
    sub.get_arguments()
        .flat_map(|arg| {
            arg.get_long()
                .into_iter()
                .chain(arg.get_all_aliases().unwrap_or_default())
        })
        .filter(|long| long.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(cmd: &str, args: &[&str]) -> Result<Vec<String>, GetoptError> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        expand_long_options(cmd, &args).map(|v| {
            v.into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        })
    }

    #[test]
    fn abbreviations_are_spelled_out_as_qemu_img_reads_them() {
        assert_eq!(
            expand("info", &["--out=json", "--back", "x"]).expect("expands"),
            ["--output=json", "--backing-chain", "x"]
        );
        // qemu-img has only --copy-range-offloading under "--c"; vdisk's --compress does
        // not make it ambiguous.
        assert_eq!(
            expand("convert", &["--c", "a", "b"]).expect("expands"),
            ["--copy-range-offloading", "a", "b"]
        );
        // A value is never read as an option.
        assert_eq!(
            expand("convert", &["-o", "--c", "--sp", "--c", "-fq", "--c"]).expect("expands"),
            [
                "-o",
                "--c",
                "--sparse-size",
                "--c",
                "-fq",
                "--copy-range-offloading"
            ]
        );
        assert_eq!(
            expand("convert", &["-f", "--c", "--", "--c"]).expect("expands"),
            ["-f", "--c", "--", "--c"]
        );
        // Options only vdisk has are left for clap.
        assert_eq!(
            expand("convert", &["--target-format=qcow2"]).expect("expands"),
            ["--target-format=qcow2"]
        );
    }

    #[test]
    fn ambiguity_and_unwanted_values_are_getopt_errors() {
        assert_eq!(
            expand("convert", &["--tar"]),
            Err(GetoptError(
                "option '--tar' is ambiguous; possibilities: '--target-image-opts' '--target-is-zero'"
                    .into()
            ))
        );
        assert_eq!(
            expand("info", &["--image=x"]),
            Err(GetoptError(
                "option '--image-opts' doesn't allow an argument".into()
            ))
        );
    }

    #[test]
    fn every_qemu_long_option_is_one_vdisk_accepts() {
        // qemu-img 10.0's snapshot declares these without a value (so `--apply=x` is refused
        // and `--apply x` has no snapshot name); vdisk reads the name as -a does.
        const QEMU_TAKES_NO_NAME: [(&str, &str); 3] = [
            ("snapshot", "apply"),
            ("snapshot", "create"),
            ("snapshot", "delete"),
        ];
        let command = crate::Cli::command();
        let mut wrong = Vec::new();
        for (cmd, table) in QEMU_LONG_OPTIONS {
            let sub = command
                .find_subcommand(cmd)
                .unwrap_or_else(|| panic!("no sub-command {cmd}"));
            for (name, takes_value) in *table {
                if *name == "help" {
                    continue;
                }
                let arg = sub.get_arguments().find(|a| {
                    a.get_long() == Some(name)
                        || a.get_all_aliases().unwrap_or_default().contains(name)
                });
                let expected = *takes_value || QEMU_TAKES_NO_NAME.contains(&(*cmd, *name));
                match arg {
                    None => wrong.push(format!("{cmd} has no --{name}")),
                    Some(arg) if super::takes_value(arg) != expected => wrong.push(format!(
                        "{cmd} --{name}: takes a value is {expected} in qemu"
                    )),
                    Some(_) => {}
                }
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }
}
