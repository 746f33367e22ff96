//! Identifier normalisers: turn the many surface forms of one identifier into one byte string.
//!
//! Two partners find a shared customer only if both turn that customer's identifier into the
//! same bytes, so these rules are part of the protocol between nodes: changing one changes
//! which records match. The golden vectors in `node/testdata/normalise_vectors.csv` pin them.
//!
//! Errors never carry the raw value (it is a raw identifier); they say which normaliser refused
//! and why.

use unicode_normalization::UnicodeNormalization;

/// The country calling code given to a phone number written without one.
///
/// A fixed default for now; it becomes a per-dataset parameter (a default region) when the real
/// phone-number library arrives.
pub const DEFAULT_COUNTRY_CODE: &str = "1";

/// Fewest digits an E.164 number has after the `+` (as this normaliser accepts it).
pub const PHONE_MIN_DIGITS: usize = 8;
/// Most digits an E.164 number has after the `+`.
pub const PHONE_MAX_DIGITS: usize = 15;

/// How an identifier column's values are normalised before matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Normaliser {
    /// Email addresses: trim, Unicode lowercase (then NFC); exactly one `@` with a non-empty
    /// local part and domain and no whitespace inside.
    Email,
    /// Phone numbers, to E.164 (`+` and 8 to 15 digits). A basic normaliser: see
    /// [`Normaliser::normalise`] for its rules; a real phone-number library (per-region
    /// numbering plans, trunk prefixes, extensions) replaces it in a later issue.
    Phone,
    /// Any other identifier: trim and Unicode NFC; empty values are refused.
    Generic,
}

/// Why a value did not normalise. Never carries the value itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NormaliseError {
    /// The email is empty after trimming.
    #[error("email is empty")]
    EmailEmpty,
    /// The email has no `@`.
    #[error("email without '@'")]
    EmailNoAt,
    /// The email has more than one `@`.
    #[error("email with more than one '@'")]
    EmailManyAt,
    /// Nothing before the `@`.
    #[error("email with an empty local part")]
    EmailEmptyLocal,
    /// Nothing after the `@`.
    #[error("email with an empty domain")]
    EmailEmptyDomain,
    /// Whitespace between the first and last non-whitespace characters.
    #[error("email with whitespace inside")]
    EmailWhitespace,
    /// The phone is empty after removing separators.
    #[error("phone is empty")]
    PhoneEmpty,
    /// A character other than digits, a leading `+`, spaces, dashes, dots or parentheses.
    #[error(
        "phone with a character other than digits, a leading '+', spaces, dashes, dots or parentheses"
    )]
    PhoneBadChar,
    /// A `+` anywhere but before the first digit, or more than one.
    #[error("phone with '+' not at the start")]
    PhonePlusPosition,
    /// The country code would start with 0.
    #[error("phone whose country code starts with 0")]
    PhoneCountryCode,
    /// Too few or too many digits for E.164.
    #[error(
        "phone with {digits} digits after the country prefix (E.164 allows {PHONE_MIN_DIGITS} to {PHONE_MAX_DIGITS})"
    )]
    PhoneLength {
        /// Digits after the `+` (a count, not the digits).
        digits: usize,
    },
    /// The value is empty after trimming.
    #[error("generic identifier is empty")]
    GenericEmpty,
}

impl Normaliser {
    /// The name used in config files (`email`, `phone`, `generic`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Normaliser::Email => "email",
            Normaliser::Phone => "phone",
            Normaliser::Generic => "generic",
        }
    }

    /// Normalises one raw value.
    ///
    /// - **Email**: trim, Unicode lowercase, then NFC (so precomposed and decomposed accents
    ///   agree); must contain exactly one `@` with non-empty local part and domain, and no
    ///   whitespace inside.
    /// - **Phone** (basic E.164, to be replaced by a real phone-number library): trim; drop
    ///   spaces, tabs, dashes, dots and parentheses; a leading `+` is kept and a leading `00`
    ///   becomes `+`; a number with neither gets [`DEFAULT_COUNTRY_CODE`] (`+1`), and — since
    ///   that default is the North American plan — an 11-digit national number starting with
    ///   `1` is taken to carry it already (`1-555-…`). The result must be `+` and 8 to 15
    ///   digits, the first not 0.
    /// - **Generic**: trim, Unicode NFC; empty is an error.
    pub fn normalise(&self, raw: &str) -> Result<String, NormaliseError> {
        match self {
            Normaliser::Email => normalise_email(raw),
            Normaliser::Phone => normalise_phone(raw),
            Normaliser::Generic => normalise_generic(raw),
        }
    }
}

impl std::fmt::Display for Normaliser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A normaliser name that is not `email`, `phone` or `generic`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown normaliser '{0}' (known: email, phone, generic)")]
pub struct UnknownNormaliser(pub String);

impl std::str::FromStr for Normaliser {
    type Err = UnknownNormaliser;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "email" => Ok(Normaliser::Email),
            "phone" => Ok(Normaliser::Phone),
            "generic" => Ok(Normaliser::Generic),
            other => Err(UnknownNormaliser(other.to_owned())),
        }
    }
}

fn normalise_email(raw: &str) -> Result<String, NormaliseError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(NormaliseError::EmailEmpty);
    }
    if trimmed.chars().any(char::is_whitespace) {
        return Err(NormaliseError::EmailWhitespace);
    }
    let Some((local, domain)) = trimmed.split_once('@') else {
        return Err(NormaliseError::EmailNoAt);
    };
    if domain.contains('@') {
        return Err(NormaliseError::EmailManyAt);
    }
    if local.is_empty() {
        return Err(NormaliseError::EmailEmptyLocal);
    }
    if domain.is_empty() {
        return Err(NormaliseError::EmailEmptyDomain);
    }
    // Lowercasing can decompose (e.g. 'İ' becomes 'i' + U+0307), so compose afterwards.
    Ok(trimmed.to_lowercase().nfc().collect())
}

fn normalise_phone(raw: &str) -> Result<String, NormaliseError> {
    let mut digits = String::with_capacity(raw.len());
    let mut plus = false;
    for c in raw.trim().chars() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if !plus && digits.is_empty() => plus = true,
            '+' => return Err(NormaliseError::PhonePlusPosition),
            ' ' | '\t' | '-' | '.' | '(' | ')' => {}
            _ => return Err(NormaliseError::PhoneBadChar),
        }
    }
    if digits.is_empty() {
        return Err(NormaliseError::PhoneEmpty);
    }
    let international: &str = if plus {
        &digits
    } else if let Some(rest) = digits.strip_prefix("00") {
        rest
    } else if DEFAULT_COUNTRY_CODE == "1" && digits.len() == 11 && digits.starts_with('1') {
        // North American numbers are often written with the leading 1 (the trunk prefix,
        // which equals the country code there).
        &digits
    } else {
        digits.insert_str(0, DEFAULT_COUNTRY_CODE);
        &digits
    };
    if international.starts_with('0') {
        return Err(NormaliseError::PhoneCountryCode);
    }
    let n = international.len();
    if !(PHONE_MIN_DIGITS..=PHONE_MAX_DIGITS).contains(&n) {
        return Err(NormaliseError::PhoneLength { digits: n });
    }
    let mut out = String::with_capacity(n + 1);
    out.push('+');
    out.push_str(international);
    Ok(out)
}

fn normalise_generic(raw: &str) -> Result<String, NormaliseError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(NormaliseError::GenericEmpty);
    }
    Ok(trimmed.nfc().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One golden vector: normaliser, input, expected output (or `ERROR`).
    #[derive(serde::Deserialize)]
    struct Vector {
        normaliser: Normaliser,
        input: String,
        expected: String,
    }

    const VECTORS: &str = include_str!("../testdata/normalise_vectors.csv");

    #[test]
    fn golden_vectors() {
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::None)
            .from_reader(VECTORS.as_bytes());
        let mut n = 0;
        for (i, v) in reader.deserialize::<Vector>().enumerate() {
            let v = v.unwrap();
            let got = v.normaliser.normalise(&v.input);
            let line = i + 2;
            if v.expected == "ERROR" {
                assert!(got.is_err(), "line {line}: expected an error, got {got:?}");
            } else {
                assert_eq!(got.as_deref(), Ok(v.expected.as_str()), "line {line}");
            }
            n += 1;
        }
        assert!(n >= 30, "only {n} vectors");
    }

    #[test]
    fn nfd_and_nfc_agree() {
        let nfd = "Cafe\u{301}";
        let nfc = "Caf\u{e9}";
        assert_ne!(nfd, nfc);
        assert_eq!(
            Normaliser::Generic.normalise(nfd),
            Normaliser::Generic.normalise(nfc)
        );
        let a = Normaliser::Email
            .normalise("Jose\u{301}@example.com")
            .unwrap();
        let b = Normaliser::Email
            .normalise("JOS\u{c9}@EXAMPLE.COM")
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn errors_never_contain_the_value() {
        let secret = "secret-person";
        for (n, raw) in [
            (Normaliser::Email, "secret-person"),
            (Normaliser::Email, "secret-person@a@b"),
            (Normaliser::Email, "secret-person @x"),
            (Normaliser::Phone, "secret-person"),
            (Normaliser::Phone, "+1 555 12"),
        ] {
            let e = n.normalise(raw).unwrap_err();
            assert!(!e.to_string().contains(secret), "{e}");
            assert!(!format!("{e:?}").contains(secret), "{e:?}");
            assert!(!e.to_string().contains("555"), "{e}");
        }
        assert_eq!(
            Normaliser::Email
                .normalise("nobody")
                .unwrap_err()
                .to_string(),
            "email without '@'"
        );
    }

    #[test]
    fn serde_and_fromstr_names() {
        #[derive(serde::Deserialize)]
        struct T {
            n: Normaliser,
        }
        let t: T = toml::from_str("n = \"phone\"").unwrap();
        assert_eq!(t.n, Normaliser::Phone);
        assert!(toml::from_str::<T>("n = \"Phone\"").is_err());
        for n in [Normaliser::Email, Normaliser::Phone, Normaliser::Generic] {
            assert_eq!(n.as_str().parse::<Normaliser>(), Ok(n));
        }
        assert!("sms".parse::<Normaliser>().is_err());
    }
}
