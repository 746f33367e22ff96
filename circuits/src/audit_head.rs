//! Signed audit heads: a node signs each head of its audit log it reports (`SEQ:HEX`, the
//! sequence number and hash of the log's last entry) with an Ed25519 key of its own, so that
//!
//! - a party that keeps the heads (the coordinator) can later show that the log was rewritten:
//!   the rewritten log no longer has that hash at that sequence number;
//! - nobody else can make a head the node did not sign, so the keeper cannot frame the node.
//!
//! The signed message is `"cleanroom/1 audit head\0" ‖ node name ‖ 0x00 ‖ SEQ:HEX`: the node's
//! name is bound in, so a head of one node cannot be passed off as another's. Sans-IO: the key's
//! storage is the node's business ([`AuditSigningKey::to_text`], [`AuditSigningKey::from_text`]).

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::rngs::SysRng;
use rand_core::UnwrapErr;
use zeroize::Zeroizing;

const DOMAIN: &[u8] = b"cleanroom/1 audit head\0";
/// First line of a key file written by [`AuditSigningKey::to_text`].
const KEY_HEADER: &str = "cleanroom audit signing key v1 (Ed25519 seed, hex)";

/// Length of a public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of a signature.
pub const SIGNATURE_LEN: usize = 64;

fn message(node: &str, head: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + node.len() + 1 + head.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(node.as_bytes());
    m.push(0);
    m.extend_from_slice(head.as_bytes());
    m
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a signed head does not verify, or a key does not read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeadSignatureError {
    /// The public key is not 32 bytes, or not a point of the curve.
    #[error("the audit public key is not an Ed25519 key ({len} bytes)")]
    BadKey {
        /// Its length.
        len: usize,
    },
    /// The signature is not 64 bytes.
    #[error("the signature is {len} bytes, not 64")]
    BadSignatureLength {
        /// Its length.
        len: usize,
    },
    /// The signature is not the key's over this node's head.
    #[error("the signature on head {head} does not verify for node {node}")]
    Invalid {
        /// The node named.
        node: String,
        /// The head.
        head: String,
    },
    /// A key file that is not one [`AuditSigningKey::to_text`] wrote.
    #[error("not an audit signing key file (expected its header line and 64 hex digits)")]
    BadKeyText,
}

/// A node's audit signing key. Move-only (no `Clone`, no serde), zeroized on drop (by
/// ed25519-dalek), `Debug` prints only the public key.
pub struct AuditSigningKey(SigningKey);

impl fmt::Debug for AuditSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSigningKey")
            .field("public_key", &hex(&self.public_key()))
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl AuditSigningKey {
    /// A fresh key from the operating system's CSPRNG.
    ///
    /// # Panics
    ///
    /// Only if the operating system cannot provide randomness at all.
    pub fn generate() -> AuditSigningKey {
        AuditSigningKey(SigningKey::generate(&mut UnwrapErr(SysRng)))
    }

    /// The key as the text of its file (the seed in hex under a header line). The caller
    /// writes it with mode 0600; the returned string is zeroized on drop.
    pub fn to_text(&self) -> Zeroizing<String> {
        let seed = Zeroizing::new(self.0.to_bytes());
        Zeroizing::new(format!("{KEY_HEADER}\n{}\n", hex(seed.as_ref())))
    }

    /// Reads a key file's text written by [`AuditSigningKey::to_text`].
    pub fn from_text(text: &str) -> Result<AuditSigningKey, HeadSignatureError> {
        let mut lines = text.lines();
        if lines.next() != Some(KEY_HEADER) {
            return Err(HeadSignatureError::BadKeyText);
        }
        let digits = lines.next().ok_or(HeadSignatureError::BadKeyText)?.trim();
        if digits.len() != 64 || lines.any(|l| !l.trim().is_empty()) {
            return Err(HeadSignatureError::BadKeyText);
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16)
                .map_err(|_| HeadSignatureError::BadKeyText)?;
        }
        Ok(AuditSigningKey(SigningKey::from_bytes(&seed)))
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.0.verifying_key().to_bytes()
    }

    /// Signs `head` (`SEQ:HEX`) as `node`'s.
    pub fn sign(&self, node: &str, head: &str) -> [u8; SIGNATURE_LEN] {
        self.0.sign(&message(node, head)).to_bytes()
    }
}

/// Checks that `signature` is `public_key`'s over `node`'s `head` (strict Ed25519: no
/// malleable or small-order encodings). Whether the key is the node's is the caller's question.
pub fn verify(
    node: &str,
    head: &str,
    public_key: &[u8],
    signature: &[u8],
) -> Result<(), HeadSignatureError> {
    let key: [u8; PUBLIC_KEY_LEN] =
        public_key
            .try_into()
            .map_err(|_| HeadSignatureError::BadKey {
                len: public_key.len(),
            })?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| HeadSignatureError::BadKey {
        len: public_key.len(),
    })?;
    let sig: [u8; SIGNATURE_LEN] =
        signature
            .try_into()
            .map_err(|_| HeadSignatureError::BadSignatureLength {
                len: signature.len(),
            })?;
    key.verify_strict(&message(node, head), &Signature::from_bytes(&sig))
        .map_err(|_| HeadSignatureError::Invalid {
            node: node.to_owned(),
            head: head.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "7:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_signature_verifies_for_its_node_and_head_only() {
        let key = AuditSigningKey::generate();
        let sig = key.sign("acme", HEAD);
        let pk = key.public_key();
        verify("acme", HEAD, &pk, &sig).unwrap();
        // Another node, another head, another key, a flipped bit: each refused.
        assert!(matches!(
            verify("globex", HEAD, &pk, &sig),
            Err(HeadSignatureError::Invalid { .. })
        ));
        let other_head = HEAD.replace("7:", "8:");
        assert!(verify("acme", &other_head, &pk, &sig).is_err());
        let other = AuditSigningKey::generate();
        assert!(verify("acme", HEAD, &other.public_key(), &sig).is_err());
        for i in 0..SIGNATURE_LEN {
            let mut bad = sig;
            bad[i] ^= 1;
            assert!(verify("acme", HEAD, &pk, &bad).is_err(), "byte {i}");
        }
        assert_eq!(
            verify("acme", HEAD, &pk[..31], &sig),
            Err(HeadSignatureError::BadKey { len: 31 })
        );
        assert_eq!(
            verify("acme", HEAD, &pk, &sig[..63]),
            Err(HeadSignatureError::BadSignatureLength { len: 63 })
        );
    }

    #[test]
    fn the_key_file_round_trips_and_debug_hides_the_seed() {
        let key = AuditSigningKey::generate();
        let text = key.to_text();
        let back = AuditSigningKey::from_text(&text).unwrap();
        assert_eq!(back.public_key(), key.public_key());
        let seed_hex = text.lines().nth(1).unwrap().to_owned();
        let dbg = format!("{key:?}");
        assert!(
            dbg.contains("redacted") && !dbg.contains(&seed_hex),
            "{dbg}"
        );
        for bad in [
            "",
            "nope\n",
            &text.replace(KEY_HEADER, "x"),
            &text[..text.len() - 3],
        ] {
            assert!(AuditSigningKey::from_text(bad).is_err(), "{bad:?}");
        }
    }
}
