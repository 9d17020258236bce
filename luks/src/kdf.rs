//! PBKDF2 and plain digests over the header's hash, and the timing that turns qemu's
//! `iter-time` into iteration counts.

use std::time::{Duration, Instant};

use sha2::Digest;
use vdisk_block::{Error, Result};
use zeroize::Zeroizing;

use crate::algo::HashAlg;

/// Calls `$body` with `$h` bound to the digest type of `$alg`.
macro_rules! with_hash {
    ($alg:expr, $h:ident => $body:expr) => {
        match $alg {
            HashAlg::Sha1 => {
                type $h = sha1::Sha1;
                $body
            }
            HashAlg::Sha224 => {
                type $h = sha2::Sha224;
                $body
            }
            HashAlg::Sha256 => {
                type $h = sha2::Sha256;
                $body
            }
            HashAlg::Sha384 => {
                type $h = sha2::Sha384;
                $body
            }
            HashAlg::Sha512 => {
                type $h = sha2::Sha512;
                $body
            }
        }
    };
}

/// The most PBKDF2 iterations a fuzzing build runs: qemu's floor, so seeds made with
/// `iter-time=0` still unlock, while a mutated count cannot slow every execution down.
#[cfg(fuzzing)]
pub const FUZZING_MAX_ITERATIONS: u32 = MIN_ITERATIONS;

/// Fills `out` with PBKDF2-HMAC-`hash` of `password` and `salt` over `iterations` rounds
/// (capped at [`FUZZING_MAX_ITERATIONS`] in fuzzing builds).
pub fn pbkdf2(hash: HashAlg, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
    #[cfg(fuzzing)]
    let iterations = iterations.min(FUZZING_MAX_ITERATIONS);
    with_hash!(hash, H => pbkdf2::pbkdf2_hmac::<H>(password, salt, iterations, out))
}

/// The digest of the concatenation of `parts`.
pub fn digest(hash: HashAlg, parts: &[&[u8]]) -> Zeroizing<Vec<u8>> {
    with_hash!(hash, H => {
        let mut h = H::new();
        for part in parts {
            h.update(part);
        }
        Zeroizing::new(h.finalize().to_vec())
    })
}

/// Iterations qemu never goes below for the master-key digest and for a key slot.
pub const MIN_ITERATIONS: u32 = 1000;

/// How long to measure PBKDF2 speed. qemu measures for at least half a second; a shorter
/// run gives a count just as usable and keeps `create` quick with small `iter-time`s.
const MEASURE_FOR: Duration = Duration::from_millis(40);

/// PBKDF2 iterations (of `hash`, deriving `out_len` bytes) that take about `iter_time_ms`
/// milliseconds on this machine, never fewer than [`MIN_ITERATIONS`], as qemu's
/// `qcrypto_pbkdf2_count_iters` scaled by the iteration time.
pub fn iterations_for(hash: HashAlg, out_len: usize, iter_time_ms: u64) -> Result<u64> {
    // No timing in fuzzing builds: it would cost every execution that adds a key slot.
    #[cfg(fuzzing)]
    {
        let _ = (hash, out_len, iter_time_ms);
        Ok(u64::from(MIN_ITERATIONS))
    }
    #[cfg(not(fuzzing))]
    measured_iterations(hash, out_len, iter_time_ms)
}

#[cfg_attr(fuzzing, allow(dead_code))]
fn measured_iterations(hash: HashAlg, out_len: usize, iter_time_ms: u64) -> Result<u64> {
    let salt = [0u8; 32];
    let password = [0u8; 32];
    let mut out = Zeroizing::new(vec![0u8; out_len]);
    let mut rounds: u32 = 256;
    let mut spent = Duration::ZERO;
    let mut done: u64 = 0;
    while spent < MEASURE_FOR {
        let start = Instant::now();
        pbkdf2(hash, &password, &salt, rounds, &mut out);
        spent += start.elapsed();
        done += u64::from(rounds);
        rounds = rounds.saturating_mul(2);
    }
    let per_second = (done as u128 * 1_000_000_000) / spent.as_nanos().max(1);
    let scaled = per_second.saturating_mul(u128::from(iter_time_ms)) / 1000;
    u64::try_from(scaled).map_err(|_| {
        Error::invalid(
            "create luks",
            format!("PBKDF iterations {scaled} too large to scale"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn pbkdf2_matches_rfc_6070() {
        let mut out = [0u8; 20];
        pbkdf2(HashAlg::Sha1, b"password", b"salt", 2, &mut out);
        assert_eq!(hex(&out), "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957");
    }

    #[test]
    fn digest_of_parts_is_digest_of_concatenation() {
        assert_eq!(
            hex(&digest(HashAlg::Sha256, &[b"ab", b"c"])),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn iteration_count_scales_with_time() {
        let n = iterations_for(HashAlg::Sha256, 32, 10).expect("count");
        assert!(n > 0);
    }
}
