//! Each `Normaliser` on arbitrary strings: never panics; `email` and `generic` are idempotent
//! (a normalised value normalises to itself), and every output is non-empty and trimmed.
//! `phone` output is checked for its documented shape: `+`, then 8 to 15 digits, the first not 0.
#![no_main]

use cleanroom_node::data::normalise::{Normaliser, PHONE_MAX_DIGITS, PHONE_MIN_DIGITS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &str| {
    for n in [Normaliser::Email, Normaliser::Phone, Normaliser::Generic] {
        let Ok(once) = n.normalise(raw) else {
            continue;
        };
        assert!(!once.is_empty(), "{n}: empty output");
        assert_eq!(once.trim(), once, "{n}: output not trimmed");
        match n {
            Normaliser::Phone => {
                let digits = once.strip_prefix('+').expect("phone starts with +");
                assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{once:?}");
                assert!((PHONE_MIN_DIGITS..=PHONE_MAX_DIGITS).contains(&digits.len()));
                assert!(!digits.starts_with('0'));
                // Phone is idempotent too: a '+' number is kept as is.
                assert_eq!(n.normalise(&once).as_deref(), Ok(once.as_str()), "phone");
            }
            Normaliser::Email | Normaliser::Generic => {
                let twice = n.normalise(&once);
                assert_eq!(
                    twice.as_deref(),
                    Ok(once.as_str()),
                    "{n} is not idempotent: {raw:?} -> {once:?} -> {twice:?}"
                );
            }
        }
    }
});
