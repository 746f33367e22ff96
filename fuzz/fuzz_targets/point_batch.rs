//! `reblind_points` on an arbitrary batch returns `Ok` (one output per 32-byte input) or a
//! `PsiError`, never panics.
#![no_main]

use std::sync::LazyLock;

use cleanroom_circuits::{JobKey, POINT_LEN, PsiError, reblind_points};
use libfuzzer_sys::fuzz_target;

/// One key per process: generating a key per input would only measure the OS RNG.
static KEY: LazyLock<JobKey> = LazyLock::new(JobKey::generate);

fuzz_target!(|data: &[u8]| {
    // Each point costs tens of microseconds; the error paths need no more than this.
    let data = &data[..data.len().min(64 * POINT_LEN + POINT_LEN - 1)];
    match reblind_points(&KEY, data) {
        Ok(out) => {
            assert_eq!(data.len() % POINT_LEN, 0);
            assert_eq!(out.len(), data.len() / POINT_LEN);
        }
        Err(PsiError::BatchNotMultipleOfPointLen { len }) => {
            assert_eq!(len, data.len());
            assert_ne!(len % POINT_LEN, 0);
        }
        Err(e @ (PsiError::InvalidPoint { index } | PsiError::IdentityPoint { index })) => {
            let index = index as usize;
            assert!(index < data.len() / POINT_LEN, "error index out of range");
            // Documented: the error names the LOWEST offending index.
            let before = &data[..index * POINT_LEN];
            assert!(reblind_points(&KEY, before).is_ok(), "a point before {index} is bad too");
            let alone = reblind_points(&KEY, &data[index * POINT_LEN..(index + 1) * POINT_LEN]);
            let expected = match e {
                PsiError::InvalidPoint { .. } => PsiError::InvalidPoint { index: 0 },
                _ => PsiError::IdentityPoint { index: 0 },
            };
            assert_eq!(alone.err(), Some(expected));
        }
        Err(other) => panic!("unexpected error kind from reblind_points: {other:?}"),
    }
});
