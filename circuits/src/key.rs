//! The per-job secret scalar.

use curve25519_dalek::Scalar;
use rand::rngs::SysRng;
use rand_core::UnwrapErr;
use zeroize::{Zeroize, Zeroizing};

/// A party's secret exponent `k` for one PSI job.
///
/// Move-only (no `Clone`, no `Copy`, no serde), zeroized on drop, and its `Debug` is redacted:
/// dalek's `Scalar` prints its bytes, so it never leaves this wrapper. A fresh key is drawn for
/// every job; reusing one across jobs would let a peer link items between jobs.
pub struct JobKey(Scalar);

impl JobKey {
    /// Draws a uniformly random non-zero scalar from the operating system's CSPRNG.
    ///
    /// # Panics
    ///
    /// Only if the operating system cannot provide randomness at all (the process could do
    /// nothing safe without it).
    pub fn generate() -> JobKey {
        let mut rng = UnwrapErr(SysRng);
        loop {
            let k = Scalar::random(&mut rng);
            // Zero has probability 2^-252; loop rather than hand out a key that blinds nothing.
            if k != Scalar::ZERO {
                return JobKey(k);
            }
        }
    }

    /// `k / 2 mod ℓ`: the scalar that, followed by `double_and_compress_batch`, yields `k·P`.
    pub(crate) fn half(&self) -> Zeroizing<Scalar> {
        Zeroizing::new(self.0.div_by_2())
    }

    /// The key's 32 bytes, for sealing it to a partner's own executors (which blind the
    /// node's identifiers on a Ballista cluster). The caller seals them at once; the buffer is
    /// zeroized when dropped.
    pub fn to_secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The key sealed bytes name: `None` unless they are a canonical, non-zero scalar.
    pub fn from_secret_bytes(bytes: &[u8; 32]) -> Option<JobKey> {
        let k = Option::<Scalar>::from(Scalar::from_canonical_bytes(*bytes))?;
        (k != Scalar::ZERO).then_some(JobKey(k))
    }

    /// The full scalar, for tests that check the halved-scalar trick against plain `k·P`.
    #[cfg(test)]
    pub(crate) fn scalar(&self) -> &Scalar {
        &self.0
    }
}

impl Drop for JobKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for JobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted_and_keys_differ() {
        let a = JobKey::generate();
        let b = JobKey::generate();
        assert_eq!(format!("{a:?}"), "JobKey(<redacted>)");
        assert_ne!(a.0, b.0);
        assert_ne!(a.0, Scalar::ZERO);
        assert_eq!(*a.half() + *a.half(), a.0);
    }

    #[test]
    fn secret_bytes_round_trip_and_refuse_zero_and_non_canonical() {
        let a = JobKey::generate();
        let back = JobKey::from_secret_bytes(&a.to_secret_bytes()).expect("canonical");
        assert_eq!(back.0, a.0);
        assert!(JobKey::from_secret_bytes(&[0; 32]).is_none());
        assert!(JobKey::from_secret_bytes(&[0xff; 32]).is_none());
    }
}
