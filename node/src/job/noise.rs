//! The differentially private `overlap` release: the count that leaves the two parties carries
//! the noise each party's policy demands.
//!
//! Both nodes learn the exact count from the PSI protocol, so the noise protects the count from
//! the coordinator, the analyst and the reports. Each node whose allow entry sets `epsilon`
//! draws its **own** full discrete Laplace noise with scale `1/ε` (a count has sensitivity 1),
//! charged to its ledger; the released value is `count + noise_a + noise_b`. Adding the peer's
//! independent noise is post-processing, so each node's ε holds whatever the peer adds, and a
//! peer that adds none cannot weaken it. To keep the noises independent, each node commits to
//! its noise in its hello (before anything is computed) and opens the commitment after the
//! count: a peer cannot choose its noise to cancel ours. The k-threshold (`min_result`) is
//! applied to the noised value.

use cleanroom_circuits::{Mechanism, Scale};
use cleanroom_proto::v1::NoiseTerm;
use sha2::{Digest, Sha256};

/// The L1 sensitivity of a count: one person changes it by at most one.
pub const COUNT_SENSITIVITY: u64 = 1;

/// The mechanism's name in results and audit records.
pub const MECHANISM: &str = "discrete_laplace";

/// Length of a commitment nonce.
pub const NONCE_LEN: usize = 32;

/// This node's noise for one job: drawn once, in the ledger transaction that charges for it, and
/// never stored (a job whose release was charged before is refused, never answered again).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnNoise {
    /// The noise value.
    pub noise: i64,
    /// The commitment nonce, hex.
    pub nonce: String,
    /// The ε charged.
    pub epsilon: f64,
    /// The exact scale (`1/ε` as a rational).
    pub scale: String,
}

/// The discrete Laplace mechanism for a count at `epsilon`.
pub fn mechanism(epsilon: f64) -> Result<Mechanism, String> {
    let scale = Scale::from_epsilon(COUNT_SENSITIVITY, epsilon).map_err(|e| e.to_string())?;
    Ok(Mechanism::DiscreteLaplace { scale })
}

/// Draws this node's noise and commitment nonce from the OS CSPRNG. Called only inside the
/// ledger transaction that charges for it.
pub fn draw(epsilon: f64) -> Result<OwnNoise, String> {
    use rand::TryRng;
    let mechanism = mechanism(epsilon)?;
    let noise = mechanism.sample().map_err(|e| e.to_string())?;
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::SysRng
        .try_fill_bytes(&mut nonce)
        .map_err(|e| format!("random source failed: {e}"))?;
    Ok(OwnNoise {
        noise,
        nonce: crate::audit::to_hex(&nonce),
        epsilon,
        scale: mechanism.scale().to_string(),
    })
}

impl OwnNoise {
    /// The nonce's bytes (a stored nonce that is not 32 hex bytes is refused).
    pub fn nonce_bytes(&self) -> Result<[u8; NONCE_LEN], String> {
        let bytes = from_hex(&self.nonce).ok_or("the stored noise nonce is not hex")?;
        bytes
            .try_into()
            .map_err(|_| "the stored noise nonce has the wrong length".to_owned())
    }

    /// The term that describes this noise in results and in the hello.
    pub fn term(&self, node: &str) -> NoiseTerm {
        NoiseTerm {
            node: node.to_owned(),
            mechanism: MECHANISM.to_owned(),
            epsilon: self.epsilon,
            sensitivity: COUNT_SENSITIVITY,
            scale: self.scale.clone(),
        }
    }
}

/// The commitment to a noise value: SHA-256 over a domain tag, the job id, the sender and the
/// noise, and a 32-byte random nonce (so the small noise value cannot be guessed from it).
pub fn commitment(job_id: &str, sender: &str, noise: i64, nonce: &[u8; NONCE_LEN]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"cleanroom/1 noise commitment\0");
    h.update(job_id.as_bytes());
    h.update([0u8]);
    h.update(sender.as_bytes());
    h.update([0u8]);
    h.update(noise.to_be_bytes());
    h.update(nonce);
    h.finalize().into()
}

/// Checks a peer's hello: a noise term and a 32-byte commitment come together, and the term
/// describes the one mechanism this release uses with a scale that matches its ε.
pub fn check_peer_announcement(
    peer: &str,
    term: Option<&NoiseTerm>,
    commitment: &[u8],
) -> Result<Option<NoiseTerm>, String> {
    match (term, commitment.is_empty()) {
        (None, true) => Ok(None),
        (None, false) => Err("it committed to noise without describing it".into()),
        (Some(_), true) => Err("it described noise without committing to it".into()),
        (Some(t), false) => {
            if commitment.len() != 32 {
                return Err(format!(
                    "its noise commitment is {} bytes, not 32",
                    commitment.len()
                ));
            }
            if t.node != peer {
                return Err(format!(
                    "its noise term names node '{}'",
                    t.node.escape_default()
                ));
            }
            if t.mechanism != MECHANISM || t.sensitivity != COUNT_SENSITIVITY {
                return Err(format!(
                    "it announced noise '{}' with sensitivity {}; a count uses {MECHANISM} with \
                     sensitivity {COUNT_SENSITIVITY}",
                    t.mechanism.escape_default(),
                    t.sensitivity
                ));
            }
            let expected = mechanism(t.epsilon).map_err(|e| format!("its noise: {e}"))?;
            if expected.scale().to_string() != t.scale {
                return Err(format!(
                    "its noise scale '{}' does not match its epsilon {}",
                    t.scale.escape_default(),
                    t.epsilon
                ));
            }
            Ok(Some(t.clone()))
        }
    }
}

/// Checks the peer's opening against its commitment.
pub fn check_reveal(
    job_id: &str,
    peer: &str,
    committed: &[u8],
    noise: i64,
    nonce: &[u8],
) -> Result<(), String> {
    let nonce: &[u8; NONCE_LEN] = nonce
        .try_into()
        .map_err(|_| format!("its noise nonce is {} bytes, not {NONCE_LEN}", nonce.len()))?;
    if commitment(job_id, peer, noise, nonce).as_slice() != committed {
        return Err("its revealed noise does not match its commitment".into());
    }
    Ok(())
}

/// The count with both parties' noise (absent noise is 0), saturating (never wraps).
pub fn noised_count(count: u64, own: i64, peer: i64) -> i64 {
    i64::try_from(count)
        .unwrap_or(i64::MAX)
        .saturating_add(own)
        .saturating_add(peer)
}

/// The k-threshold on the noised value: `Some(value)` to release, `None` to suppress. A value
/// below `min_result` (≥ 1), zero and negative values included, is suppressed.
pub fn threshold(noised: i64, min_result: u64) -> Option<u64> {
    u64::try_from(noised).ok().filter(|v| *v >= min_result)
}

/// How an audit record describes the noise: mechanism, sensitivity, and each party's ε and
/// exact scale.
pub fn describe(terms: &[NoiseTerm]) -> String {
    let parts: Vec<String> = terms
        .iter()
        .map(|t| format!("{}: ε {} scale {}", t.node, t.epsilon, t.scale))
        .collect();
    format!(
        "{MECHANISM} noise, sensitivity {COUNT_SENSITIVITY} ({})",
        parts.join("; ")
    )
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draw_calibrates_to_epsilon_and_commits() {
        let own = draw(0.5).unwrap();
        assert_eq!(own.scale, "2");
        assert_eq!(own.epsilon, 0.5);
        let nonce = own.nonce_bytes().unwrap();
        let term = own.term("acme");
        assert_eq!(term.mechanism, "discrete_laplace");
        assert_eq!(term.sensitivity, 1);
        let c = commitment("job-1", "acme", own.noise, &nonce);
        assert_eq!(
            check_peer_announcement("acme", Some(&term), &c).unwrap(),
            Some(term.clone())
        );
        assert!(check_reveal("job-1", "acme", &c, own.noise, &nonce).is_ok());
        // Another value, another nonce, another job or sender: refused.
        let wrong = check_reveal("job-1", "acme", &c, own.noise + 1, &nonce).unwrap_err();
        assert_eq!(wrong, "its revealed noise does not match its commitment");
        assert!(check_reveal("job-1", "acme", &c, own.noise, &[0u8; 32]).is_err());
        assert!(check_reveal("job-2", "acme", &c, own.noise, &nonce).is_err());
        assert!(check_reveal("job-1", "globex", &c, own.noise, &nonce).is_err());
        assert!(check_reveal("job-1", "acme", &c, own.noise, &nonce[..31]).is_err());
    }

    #[test]
    fn draws_vary_and_stay_near_zero() {
        // Scale 1: P(|X| > 30) = 2e^{-31}/(1+e^{-1}) ≈ 5e-14 per draw.
        let draws: Vec<i64> = (0..200).map(|_| draw(1.0).unwrap().noise).collect();
        assert!(draws.iter().all(|x| x.abs() <= 30), "{draws:?}");
        assert!(draws.iter().any(|&x| x != draws[0]), "noise must vary");
        let mean = draws.iter().sum::<i64>() as f64 / draws.len() as f64;
        // Variance 2q/(1-q)^2 ≈ 1.84 for scale 1: the mean of 200 has sd ≈ 0.1.
        assert!(mean.abs() < 0.6, "mean {mean}");
    }

    #[test]
    fn peer_announcements_are_checked() {
        let own = draw(0.25).unwrap();
        let term = own.term("globex");
        let c = [7u8; 32];
        assert_eq!(check_peer_announcement("globex", None, &[]).unwrap(), None);
        assert!(check_peer_announcement("globex", None, &c).is_err());
        assert!(check_peer_announcement("globex", Some(&term), &[]).is_err());
        assert!(
            check_peer_announcement("globex", Some(&term), &c[..16])
                .unwrap_err()
                .contains("16 bytes")
        );
        assert!(
            check_peer_announcement("acme", Some(&term), &c)
                .unwrap_err()
                .contains("names node 'globex'")
        );
        let mut gaussian = term.clone();
        gaussian.mechanism = "discrete_gaussian".into();
        assert!(check_peer_announcement("globex", Some(&gaussian), &c).is_err());
        let mut weak = term.clone();
        weak.scale = "1".into();
        assert!(
            check_peer_announcement("globex", Some(&weak), &c)
                .unwrap_err()
                .contains("does not match its epsilon")
        );
        let mut nan = term.clone();
        nan.epsilon = f64::NAN;
        assert!(check_peer_announcement("globex", Some(&nan), &c).is_err());
    }

    #[test]
    fn release_adds_both_noises_then_thresholds() {
        assert_eq!(noised_count(100, 3, -5), 98);
        assert_eq!(noised_count(u64::MAX, 5, 5), i64::MAX);
        assert_eq!(noised_count(0, i64::MIN, -1), i64::MIN);
        assert_eq!(threshold(98, 10), Some(98));
        assert_eq!(threshold(10, 10), Some(10));
        assert_eq!(threshold(9, 10), None);
        assert_eq!(threshold(0, 1), None);
        assert_eq!(threshold(-3, 1), None);
    }

    #[test]
    fn description_names_mechanism_sensitivity_and_scales() {
        let terms = [
            draw(0.5).unwrap().term("acme"),
            draw(1.0).unwrap().term("globex"),
        ];
        assert_eq!(
            describe(&terms),
            "discrete_laplace noise, sensitivity 1 (acme: ε 0.5 scale 2; globex: ε 1 scale 1)"
        );
    }
}
