//! The anti-forensic splitter of LUKS1: the master key is stored as `stripes` blocks whose
//! combination through the hash diffuser gives the key back, so erasing any one block of the
//! key material destroys the key.

use vdisk_block::{Error, Result};
use zeroize::Zeroizing;

use crate::algo::HashAlg;
use crate::kdf::digest;

/// Mixes `block` in place: each digest-sized piece `i` becomes `H(be32(i) || piece)`,
/// truncated to the piece's length.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let chunk = hash.digest_len();
    for (i, piece) in block.chunks_mut(chunk).enumerate() {
        let index = (i as u32).to_be_bytes();
        let mixed = digest(hash, &[&index, piece]);
        let len = piece.len();
        piece.copy_from_slice(&mixed[..len]);
    }
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Splits `key` into `stripes` blocks of its length, the first `stripes - 1` random.
pub fn split(key: &[u8], stripes: u32, hash: HashAlg) -> Result<Zeroizing<Vec<u8>>> {
    let block = key.len();
    let total = block
        .checked_mul(stripes as usize)
        .filter(|_| stripes > 0)
        .ok_or_else(|| Error::invalid("split key", "bad stripe count"))?;
    let mut out = Zeroizing::new(vec![0u8; total]);
    crate::random::fill(&mut out[..total - block])?;
    let mut acc = Zeroizing::new(vec![0u8; block]);
    for stripe in out[..total - block].chunks(block) {
        xor_into(&mut acc, stripe);
        diffuse(hash, &mut acc);
    }
    xor_into(&mut acc, key);
    out[total - block..].copy_from_slice(&acc);
    Ok(out)
}

/// Recovers a `key_len`-byte key from its split form `material` (`key_len * stripes` bytes).
pub fn merge(material: &[u8], key_len: usize, hash: HashAlg) -> Result<Zeroizing<Vec<u8>>> {
    if key_len == 0 || !material.len().is_multiple_of(key_len) || material.is_empty() {
        return Err(Error::corrupt(
            "merge key",
            format!(
                "key material of {} bytes is no whole number of {key_len}-byte stripes",
                material.len()
            ),
        ));
    }
    let mut acc = Zeroizing::new(vec![0u8; key_len]);
    let (stripes, last) = material.split_at(material.len() - key_len);
    for stripe in stripes.chunks(key_len) {
        xor_into(&mut acc, stripe);
        diffuse(hash, &mut acc);
    }
    xor_into(&mut acc, last);
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_gives_the_key() {
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            // 70 bytes: diffusion covers a partial last digest-sized piece too.
            let key: Vec<u8> = (0..70u8).collect();
            let parts = split(&key, 4000, hash).expect("split");
            assert_eq!(parts.len(), 70 * 4000);
            assert_eq!(&merge(&parts, 70, hash).expect("merge")[..], &key[..]);
            let mut broken = parts.clone();
            broken[5] ^= 1;
            assert_ne!(&merge(&broken, 70, hash).expect("merge")[..], &key[..]);
        }
    }

    #[test]
    fn merge_refuses_ragged_material() {
        assert!(merge(&[0u8; 10], 3, HashAlg::Sha256).is_err());
        assert!(merge(&[], 3, HashAlg::Sha256).is_err());
        assert!(merge(&[0u8; 10], 0, HashAlg::Sha256).is_err());
    }
}
