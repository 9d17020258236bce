//! `vdisk checksum`: a digest of an image's guest-visible contents, whatever its format.
//!
//! qemu-img has no such command. The digests are defined in [`digest`]; exit codes follow
//! `compare`: 0 success (or `--verify` matched), 1 `--verify` mismatched or a bad command
//! line, 2 the image could not be opened, 3 its allocation status could not be read, 4 its
//! data could not be read.

mod digest;

use clap::Args;
use serde_json::{json, Value};

use digest::DigestError;
pub use digest::{Algorithm, BLOCK};

use super::{open, print, OpenSpec};
use crate::context::Failure;
use crate::output::{qemu_json, OutputFormat};
use crate::progress::ProgressReporter;
use crate::Ctx;

/// The long `--help` text of `checksum`.
pub const LONG_ABOUT: &str =
    "Print a digest of an image's guest-visible contents: the bytes `qemu-img convert -O raw` \
     would write (the virtual size rounded up to a whole 512-byte sector), read through the \
     whole backing chain, without writing any file. Ranges the allocation map says read as \
     zeroes are not read from the disk.\n\n\
     Algorithms:\n  \
     sha256 (default): SHA-256 of those bytes; equals `sha256sum` of the raw conversion. It \
     must still hash every zero byte (one core, about 1-2 GB/s).\n  \
     blk-sha256: cut the bytes into n = ceil(LEN / 65536) blocks of 65536 bytes (the last one \
     shorter when LEN is not a multiple), LEN being the number of bytes; h_i = SHA-256(block \
     i), 32 raw bytes; the digest is SHA-256(h_0 || h_1 || ... || h_n-1 || LEN as a \
     little-endian 64-bit integer), || being concatenation (an empty image hashes only the \
     8 bytes of LEN). Blocks are hashed on every core, and blocks the allocation map says \
     are zero take a precomputed digest without being read or hashed; since h_i depends only \
     on the bytes, the digest does not depend on how the image is allocated. In Python: \
     for each 64 KiB block b: outer.update(sha256(b).digest()); then \
     outer.update(struct.pack('<Q', LEN)).\n\n\
     Output: `ALGORITHM:HEX  FILENAME` (e.g. `sha256:9f86...  disk.qcow2`); with \
     --output=json an object with \"algorithm\", \"digest\" (hex), \"filename\" and \
     \"virtual-size\" (the number of bytes digested).\n\n\
     --verify DIGEST compares instead of printing the digest: DIGEST is 64 hex digits, \
     optionally prefixed with `sha256:` or `blk-sha256:` (the prefix selects the algorithm \
     unless --algorithm is given, and must then agree with it). It prints `FILENAME: OK` or \
     `FILENAME: FAILED` (JSON output gains \"verified\").\n\n\
     Exit status (as compare's): 0 success or digest matched, 1 digest mismatch or a bad \
     command line, 2 cannot open the image, 3 cannot read allocation status, 4 cannot read \
     data.\n\n\
     Example: vdisk checksum --algorithm blk-sha256 disk.qcow2";

/// Arguments of `checksum`.
#[derive(Debug, Args)]
pub struct ChecksumArgs {
    /// Format of the image (default: probed)
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Digest algorithm: sha256 (default) or blk-sha256 (block-parallel; see --help)
    #[arg(long = "algorithm", value_name = "sha256|blk-sha256")]
    pub algorithm: Option<String>,
    /// Compare with DIGEST (hex, optionally ALGORITHM:hex) instead of printing it
    #[arg(long = "verify", value_name = "DIGEST")]
    pub verify: Option<String>,
    /// Output format: human or json
    #[arg(long, value_name = "human|json", default_value = "human")]
    pub output: String,
    /// Name the image by options instead of a file name: driver=FMT,file.filename=PATH and
    /// driver options (e.g. disk=N to pick a disk of an OVA appliance)
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// Open the image in shared mode, even while another process uses it
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Show progress
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// Quiet: print nothing but errors (the exit status tells the result)
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// The image file
    #[arg(value_name = "FILENAME")]
    pub files: Vec<String>,
}

/// Exit status: the image could not be opened.
const EXIT_OPEN: i32 = 2;
/// Exit status: the allocation status could not be read.
const EXIT_STATUS: i32 = 3;
/// Exit status: the data could not be read.
const EXIT_READ: i32 = 4;
/// Exit status: `--verify` found another digest.
const EXIT_MISMATCH: i32 = 1;

/// Splits a `--verify` value into its algorithm prefix (if any) and its lower-case hex.
fn parse_expected(text: &str) -> Result<(Option<Algorithm>, String), String> {
    let (algorithm, hex) = match text.split_once(':') {
        Some((name, hex)) => match Algorithm::parse(&name.to_ascii_lowercase()) {
            Some(a) => (Some(a), hex),
            None => {
                return Err(format!(
                    "--verify: unknown algorithm '{name}' (expected sha256 or blk-sha256)"
                ))
            }
        },
        None => (None, text),
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "--verify expects 64 hex digits, optionally after 'sha256:' or 'blk-sha256:', \
             not '{text}'"
        ));
    }
    Ok((algorithm, hex.to_ascii_lowercase()))
}

/// Which algorithm to run: `--algorithm`, else the `--verify` prefix, else sha256.
fn choose_algorithm(given: Option<&str>, prefix: Option<Algorithm>) -> Result<Algorithm, String> {
    let Some(name) = given else {
        return Ok(prefix.unwrap_or(Algorithm::Sha256));
    };
    let algorithm = Algorithm::parse(name)
        .ok_or_else(|| format!("--algorithm expects 'sha256' or 'blk-sha256', not '{name}'"))?;
    match prefix {
        Some(p) if p != algorithm => Err(format!(
            "--verify names {} but --algorithm is {}",
            p.name(),
            algorithm.name()
        )),
        _ => Ok(algorithm),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `checksum`; returns the exit code.
pub fn run(ctx: &Ctx, args: ChecksumArgs) -> i32 {
    let output = match OutputFormat::parse(&args.output) {
        Ok(o) => o,
        Err(msg) => return ctx.usage("checksum", &msg),
    };
    let expected = match args.verify.as_deref().map(parse_expected).transpose() {
        Ok(e) => e,
        Err(msg) => return ctx.usage("checksum", &msg),
    };
    let prefix = expected.as_ref().and_then(|(a, _)| *a);
    let algorithm = match choose_algorithm(args.algorithm.as_deref(), prefix) {
        Ok(a) => a,
        Err(msg) => return ctx.usage("checksum", &msg),
    };
    let [name] = args.files.as_slice() else {
        return ctx.usage("checksum", "Expecting one image file name");
    };
    let spec = OpenSpec {
        format: args.format.as_deref(),
        force_share: args.force_share,
        image_opts: args.image_opts,
        ..OpenSpec::default()
    };
    let dev = match open(name, &spec) {
        Ok(d) => d,
        Err(f) => {
            ctx.fail(&f);
            return EXIT_OPEN;
        }
    };
    let len = digest::digest_len(dev.as_ref());
    let progress = ProgressReporter::new(args.progress, args.quiet, len);
    let result = digest::compute(&dev, algorithm, &progress);
    progress.finish(result.is_ok());
    let digest = match result {
        Ok(d) => hex(&d),
        Err(DigestError::Status(e)) => {
            ctx.fail(&Failure::new(
                format!("Sector allocation test failed for {name}"),
                format!("checksum '{name}': cannot read the allocation status: {e}"),
            ));
            return EXIT_STATUS;
        }
        Err(DigestError::Read(offset, e)) => {
            ctx.fail(&Failure::new(
                format!(
                    "Error while reading offset {offset} of {name}: {}",
                    e.message()
                ),
                format!("checksum '{name}': cannot read at offset {offset}: {e}"),
            ));
            return EXIT_READ;
        }
    };
    let verified = expected.as_ref().map(|(_, want)| *want == digest);
    if !args.quiet {
        let text = match (output, verified) {
            (OutputFormat::Json, _) => {
                let mut value = json!({
                    "algorithm": algorithm.name(),
                    "digest": digest,
                    "filename": name,
                    "virtual-size": len,
                });
                if let (Some(v), Value::Object(map)) = (verified, &mut value) {
                    map.insert("verified".into(), Value::Bool(v));
                }
                format!("{}\n", qemu_json(&value))
            }
            (OutputFormat::Human, None) => format!("{}:{digest}  {name}\n", algorithm.name()),
            (OutputFormat::Human, Some(true)) => format!("{name}: OK\n"),
            (OutputFormat::Human, Some(false)) => format!("{name}: FAILED\n"),
        };
        print(&text);
    }
    match (verified, &expected) {
        (Some(false), Some((_, want))) => {
            if !args.quiet {
                let a = algorithm.name();
                ctx.error(format!(
                    "checksum '{name}': digest mismatch: the image has {a}:{digest}, \
                     expected {a}:{want}"
                ));
            }
            EXIT_MISMATCH
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";

    #[test]
    fn verify_values_with_and_without_prefix() {
        let lower = HEX.to_ascii_lowercase();
        assert_eq!(parse_expected(HEX), Ok((None, lower.clone())));
        assert_eq!(
            parse_expected(&format!("blk-sha256:{HEX}")),
            Ok((Some(Algorithm::BlkSha256), lower.clone()))
        );
        assert_eq!(
            parse_expected(&format!("SHA256:{lower}")),
            Ok((Some(Algorithm::Sha256), lower))
        );
        assert!(parse_expected("md5:00").is_err());
        assert!(parse_expected(&HEX[1..]).is_err());
        assert!(parse_expected(&format!("{}g", &HEX[1..])).is_err());
    }

    #[test]
    fn algorithm_from_flag_or_prefix() {
        assert_eq!(choose_algorithm(None, None), Ok(Algorithm::Sha256));
        assert_eq!(
            choose_algorithm(None, Some(Algorithm::BlkSha256)),
            Ok(Algorithm::BlkSha256)
        );
        assert_eq!(
            choose_algorithm(Some("blk-sha256"), None),
            Ok(Algorithm::BlkSha256)
        );
        assert!(choose_algorithm(Some("sha256"), Some(Algorithm::BlkSha256)).is_err());
        assert!(choose_algorithm(Some("crc32"), None).is_err());
    }
}
