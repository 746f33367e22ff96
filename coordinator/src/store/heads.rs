//! Signed audit heads the nodes reported (`audit_heads`): kept only once their signature
//! verifies, so each row is something the node signed.

use cleanroom_circuits::audit_head;
use cleanroom_proto::v1::{AuditHeadRecord, SignedAuditHead};
use rusqlite::params;

use super::error::StoreError;
use super::schema::JobStore;

/// Most heads one answer carries (each under 300 bytes encoded, so well inside a frame).
pub const MAX_HEADS: i64 = 2000;

/// What [`JobStore::record_audit_head`] did with a head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadVerdict {
    /// Stored (or already stored).
    Kept,
    /// Not stored: the head is malformed or its signature does not verify, for this reason.
    Refused(String),
}

/// Parses `SEQ:HEX` (64 lowercase hex digits): the sequence number and the hash.
fn parse_head(head: &str) -> Option<(i64, Vec<u8>)> {
    let (seq, hash) = head.split_once(':')?;
    let ok = hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !ok || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bytes = (0..64)
        .step_by(2)
        .map(|i| u8::from_str_radix(&hash[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((seq.parse().ok()?, bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl JobStore {
    /// Keeps `node`'s signed head, reported with job `job_id`, if it is well formed and its
    /// signature verifies for `node`; a head seen before is kept once.
    pub fn record_audit_head(
        &self,
        node: &str,
        job_id: &str,
        signed: &SignedAuditHead,
        now_ms: i64,
    ) -> Result<HeadVerdict, StoreError> {
        let Some((seq, hash)) = parse_head(&signed.head) else {
            return Ok(HeadVerdict::Refused(format!(
                "'{}' is not an audit head (SEQ:HEX)",
                signed.head.chars().take(100).collect::<String>()
            )));
        };
        if let Err(e) =
            audit_head::verify(node, &signed.head, &signed.public_key, &signed.signature)
        {
            return Ok(HeadVerdict::Refused(e.to_string()));
        }
        let conn = self.lock();
        conn.execute(
            "INSERT OR IGNORE INTO audit_heads \
             (node, job_id, seq, hash, public_key, signature, received_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                node,
                job_id,
                seq,
                hash,
                signed.public_key,
                signed.signature,
                now_ms
            ],
        )?;
        Ok(HeadVerdict::Kept)
    }

    /// The latest [`MAX_HEADS`] heads kept for `node` (one answer frame), in order of sequence
    /// number, then of arrival. The latest head alone vouches for every entry before it (each
    /// entry's hash covers the previous one); earlier heads tell when each part was reported.
    pub fn audit_heads(&self, node: &str) -> Result<Vec<AuditHeadRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT job_id, seq, hash, public_key, signature, received_ms FROM audit_heads \
             WHERE node = ?1 ORDER BY seq DESC, id DESC LIMIT ?2",
        )?;
        let mut rows = stmt
            .query_map(params![node, MAX_HEADS], |row| {
                Ok(AuditHeadRecord {
                    node: node.to_owned(),
                    job_id: row.get(0)?,
                    signed: Some(SignedAuditHead {
                        head: format!(
                            "{}:{}",
                            row.get::<_, i64>(1)?,
                            hex(&row.get::<_, Vec<u8>>(2)?)
                        ),
                        public_key: row.get(3)?,
                        signature: row.get(4)?,
                    }),
                    received_ms: row.get(5)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.reverse();
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use cleanroom_circuits::audit_head::AuditSigningKey;

    use super::*;
    use crate::store::tests::open_temp;

    fn signed(key: &AuditSigningKey, node: &str, seq: u64) -> SignedAuditHead {
        let head = format!("{seq}:{}", "ab".repeat(32));
        SignedAuditHead {
            signature: key.sign(node, &head).to_vec(),
            public_key: key.public_key().to_vec(),
            head,
        }
    }

    #[test]
    fn only_heads_whose_signature_verifies_are_kept_once_each() {
        let (_dir, store) = open_temp();
        let key = AuditSigningKey::generate();
        let h2 = signed(&key, "acme", 2);
        let h1 = signed(&key, "acme", 1);
        assert_eq!(
            store.record_audit_head("acme", "job-b", &h2, 20).unwrap(),
            HeadVerdict::Kept
        );
        assert_eq!(
            store.record_audit_head("acme", "job-a", &h1, 10).unwrap(),
            HeadVerdict::Kept
        );
        // The same head again (an offer reply and a report may carry it): one row.
        store.record_audit_head("acme", "job-c", &h2, 30).unwrap();
        // Signed by acme, presented as globex's; a flipped signature; not a head.
        let refused = [
            ("globex", h1.clone()),
            ("acme", {
                let mut h = signed(&key, "acme", 3);
                h.signature[0] ^= 1;
                h
            }),
            ("acme", {
                let mut h = signed(&key, "acme", 4);
                h.head = "4:xyz".into();
                h
            }),
        ];
        for (node, head) in refused {
            assert!(matches!(
                store.record_audit_head(node, "job-x", &head, 40).unwrap(),
                HeadVerdict::Refused(_)
            ));
        }
        let kept = store.audit_heads("acme").unwrap();
        let heads: Vec<(&str, &str)> = kept
            .iter()
            .map(|r| (r.job_id.as_str(), r.signed.as_ref().unwrap().head.as_str()))
            .collect();
        assert_eq!(
            heads,
            vec![("job-a", h1.head.as_str()), ("job-b", h2.head.as_str())]
        );
        assert!(store.audit_heads("globex").unwrap().is_empty());
    }
}
