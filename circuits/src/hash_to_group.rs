//! `H(x)`: RFC 9380 `hash_to_ristretto255` with SHA-512 `expand_message_xmd`.

use std::sync::OnceLock;

use curve25519_dalek::RistrettoPoint;
use sha2::{Digest, Sha512};

use crate::PsiError;

/// The domain-separation tag of cleanroom's hash to group, naming the protocol version.
pub const HASH_TO_GROUP_DST: &[u8] = b"cleanroom/1:ecdh-psi:ristretto255_XMD:SHA-512_R255MAP_RO_";

/// Most bytes SHA-512 `expand_message_xmd` can produce (255 blocks of 64).
pub const MAX_EXPAND_LEN: usize = 255 * B_IN_BYTES;

/// SHA-512 output size.
const B_IN_BYTES: usize = 64;
/// SHA-512 block size.
const R_IN_BYTES: usize = 128;

/// A SHA-512 state that has already absorbed `Z_pad` (one block of zeros), cloned per call.
fn zpad_state() -> &'static Sha512 {
    static STATE: OnceLock<Sha512> = OnceLock::new();
    STATE.get_or_init(|| {
        let mut h = Sha512::new();
        h.update([0u8; R_IN_BYTES]);
        h
    })
}

/// RFC 9380 §5.3.1 `expand_message_xmd` with SHA-512, the message given in parts (hashed as their
/// concatenation, so callers need not allocate one).
fn expand_into(msg: &[&[u8]], dst: &[u8], out: &mut [u8]) -> Result<(), PsiError> {
    let dst_len = u8::try_from(dst.len()).map_err(|_| PsiError::DstTooLong { len: dst.len() })?;
    let len = out.len();
    if len > MAX_EXPAND_LEN {
        return Err(PsiError::ExpandLenTooLarge { len });
    }
    // Fits: len <= 16320.
    let len_be = (len as u16).to_be_bytes();

    let mut h = zpad_state().clone();
    for part in msg {
        h.update(part);
    }
    h.update(len_be);
    h.update([0u8]);
    h.update(dst);
    h.update([dst_len]);
    let b0: [u8; B_IN_BYTES] = h.finalize().into();

    let mut prev = [0u8; B_IN_BYTES];
    for (i, block) in out.chunks_mut(B_IN_BYTES).enumerate() {
        let mut h = Sha512::new();
        if i == 0 {
            h.update(b0);
        } else {
            let mut x = b0;
            for (a, b) in x.iter_mut().zip(prev.iter()) {
                *a ^= b;
            }
            h.update(x);
        }
        // Fits: at most 255 blocks.
        h.update([(i + 1) as u8]);
        h.update(dst);
        h.update([dst_len]);
        prev = h.finalize().into();
        block.copy_from_slice(&prev[..block.len()]);
    }
    Ok(())
}

/// RFC 9380 §5.3.1 `expand_message_xmd` with SHA-512: `len` uniform bytes from `msg` under the
/// domain-separation tag `dst`. Rejects a tag over 255 bytes and `len` over 16320 (255 blocks).
pub fn expand_message_xmd_sha512(msg: &[u8], dst: &[u8], len: usize) -> Result<Vec<u8>, PsiError> {
    if len > MAX_EXPAND_LEN {
        // Checked before allocating: `len` may come from anywhere.
        return Err(PsiError::ExpandLenTooLarge { len });
    }
    let mut out = vec![0u8; len];
    expand_into(&[msg], dst, &mut out)?;
    Ok(out)
}

/// `H(key_name, item)`: RFC 9380 `hash_to_ristretto255` (64 bytes of SHA-512 `expand_message_xmd`
/// under [`HASH_TO_GROUP_DST`], then `RistrettoPoint::from_uniform_bytes`).
///
/// The message is `u16_be(len(key_name)) || key_name || item`: the length prefix makes the split
/// between name and item unambiguous, so an email and a phone number never hash alike. Key names
/// are at most 65535 bytes ([`PsiSession`](crate::PsiSession) rejects longer ones before any
/// hashing); a longer name is hashed with a saturated length, which only such names can collide
/// with.
pub fn hash_to_group(key_name: &str, item: &[u8]) -> RistrettoPoint {
    let name = key_name.as_bytes();
    let name_len = u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes();
    let mut uniform = [0u8; B_IN_BYTES];
    // Cannot fail: the tag is a constant under 256 bytes and 64 <= MAX_EXPAND_LEN.
    let _ = expand_into(&[&name_len, name, item], HASH_TO_GROUP_DST, &mut uniform);
    RistrettoPoint::from_uniform_bytes(&uniform)
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::ristretto::CompressedRistretto;

    fn hex(s: &str) -> Vec<u8> {
        assert_eq!(s.len() % 2, 0, "odd hex {s}");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// `-` is empty; `{c*n}` is `c` repeated `n` times.
    fn expand_field(f: &str) -> Vec<u8> {
        if f == "-" {
            return Vec::new();
        }
        let mut out = String::new();
        let mut rest = f;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..].find('}').unwrap() + open;
            let (c, n) = rest[open + 1..close].split_once('*').unwrap();
            out.push_str(&c.repeat(n.parse().unwrap()));
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        out.into_bytes()
    }

    fn cases(file: &str) -> Vec<Vec<&str>> {
        file.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.split(' ').collect())
            .collect()
    }

    #[test]
    fn expand_message_xmd_vectors() {
        let file = include_str!("../testvectors/expand_message_xmd_sha512.txt");
        let (mut ok, mut err, mut len) = (0, 0, 0);
        for case in cases(file) {
            let dst = expand_field(case[1]);
            let n: usize = case[2].parse().unwrap();
            let msg = expand_field(case[3]);
            let got = expand_message_xmd_sha512(&msg, &dst, n);
            match case[0] {
                "ok" => {
                    assert_eq!(got.unwrap(), hex(case[4]), "{case:?}");
                    ok += 1;
                }
                "len" => {
                    assert_eq!(got.unwrap().len(), case[4].parse::<usize>().unwrap());
                    len += 1;
                }
                "err" => {
                    let e = got.unwrap_err();
                    match case[4] {
                        "dst_too_long" => assert_eq!(e, PsiError::DstTooLong { len: dst.len() }),
                        "len_too_large" => assert_eq!(e, PsiError::ExpandLenTooLarge { len: n }),
                        other => panic!("unknown error kind {other}"),
                    }
                    err += 1;
                }
                other => panic!("unknown case kind {other}"),
            }
        }
        assert_eq!((ok, err, len), (10, 4, 2));
    }

    #[test]
    fn from_uniform_bytes_vectors() {
        let file = include_str!("../testvectors/ristretto255_from_uniform_bytes.txt");
        let cases = cases(file);
        assert_eq!(cases.len(), 7);
        for case in cases {
            let uniform: [u8; 64] = hex(case[0]).try_into().unwrap();
            let point = RistrettoPoint::from_uniform_bytes(&uniform);
            assert_eq!(point.compress().to_bytes().to_vec(), hex(case[1]));
        }
    }

    #[test]
    fn hash_to_group_is_xmd_then_map() {
        let mut msg = vec![0u8, 5];
        msg.extend_from_slice(b"email");
        msg.extend_from_slice(b"alice@example.com");
        let uniform = expand_message_xmd_sha512(&msg, HASH_TO_GROUP_DST, 64).unwrap();
        let expected = RistrettoPoint::from_uniform_bytes(&uniform.try_into().unwrap());
        assert_eq!(hash_to_group("email", b"alice@example.com"), expected);
    }

    #[test]
    fn deterministic_and_domain_separated() {
        let a = hash_to_group("email", b"alice@example.com");
        assert_eq!(a, hash_to_group("email", b"alice@example.com"));
        assert_ne!(a, hash_to_group("phone", b"alice@example.com"));
        assert_ne!(a, hash_to_group("email", b"bob@example.com"));
        // The length prefix keeps the name/item split unambiguous.
        assert_ne!(hash_to_group("ab", b"c"), hash_to_group("a", b"bc"));
        assert_ne!(hash_to_group("", b""), hash_to_group("", b"\0"));
        let enc = a.compress();
        assert_eq!(CompressedRistretto(enc.to_bytes()).decompress(), Some(a));
    }
}
