//! Identifier normalisers: turn the many surface forms of one identifier into one byte string.
//!
//! Two partners find a shared customer only if both turn that customer's identifier into the
//! same bytes, so these rules are part of the protocol between nodes: changing one changes
//! which records match. The golden vectors in `node/testdata/normalise_vectors.csv` pin them.
//!
//! Errors never carry the raw value (it is a raw identifier); they say which normaliser refused
//! and why.

use unicode_normalization::UnicodeNormalization;

/// The region a phone number written without a country code is taken to be in, unless the
/// identifier sets `default_region`.
pub const DEFAULT_REGION: &str = "US";

/// Fewest digits an E.164 number has after the `+` (as this normaliser accepts it).
pub const PHONE_MIN_DIGITS: usize = 8;
/// Most digits an E.164 number has after the `+`.
pub const PHONE_MAX_DIGITS: usize = 15;

/// A phone region (ISO 3166-1 alpha-2) the phone library has metadata for.
pub type Region = rlibphonenumber::Region;

/// How an identifier column's values are normalised before matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Normaliser {
    /// Email addresses: the address of `Name <address>` or `mailto:address`; trim, Unicode
    /// lowercase (then NFC), a Unicode domain in its ASCII form, no trailing dot; exactly one
    /// `@` with a non-empty local part and domain and no whitespace inside. Option: the Gmail
    /// rule.
    Email,
    /// Phone numbers, to E.164 with the `rlibphonenumber` crate (a port of libphonenumber and
    /// its metadata), a number without a country code being read in the default region.
    Phone,
    /// Any other identifier: trim and Unicode NFC; empty values are refused. Option: case fold.
    Generic,
}

/// Per-identifier options of a normaliser (config keys of `[[dataset.identifier]]`). Each
/// applies to one normaliser only; the config refuses it on another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NormaliseOptions {
    /// Email: for `gmail.com` and `googlemail.com`, drop dots and a `+tag` from the local part
    /// and write the domain `gmail.com` (Gmail delivers all those forms to one mailbox).
    pub gmail_rule: bool,
    /// Generic: Unicode lowercase (then NFC) after trimming, so `ABC` and `abc` match.
    pub case_fold: bool,
    /// Phone: the region of numbers written without a country code.
    pub default_region: Region,
}

impl Default for NormaliseOptions {
    fn default() -> Self {
        NormaliseOptions {
            gmail_rule: false,
            case_fold: false,
            default_region: Region::US,
        }
    }
}

/// Parses a region code (`"US"`, `"GB"`: ISO 3166-1 alpha-2, upper case) the phone library knows.
pub fn parse_region(code: &str) -> Option<Region> {
    if code.len() != 2 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let region = Region::from_code(code).ok()?;
    // "ZZ" (unknown) and codes without numbering metadata have no country calling code.
    rlibphonenumber::PHONE_NUMBER_UTIL
        .get_country_code_for_region(region)
        .map(|_| region)
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
    /// The phone is empty after trimming.
    #[error("phone is empty")]
    PhoneEmpty,
    /// The country calling code is unknown (or the `+` is followed by a 0).
    #[error("phone with an invalid country code")]
    PhoneCountryCode,
    /// The phone library finds no phone number in the value.
    #[error("phone the phone-number library cannot parse")]
    PhoneUnparsable,
    /// Too few digits for a number of its country (after the international prefix or the
    /// country code).
    #[error("phone too short for a number of its country")]
    PhoneTooShort,
    /// Too many digits for a number of its country.
    #[error("phone too long for a number of its country")]
    PhoneTooLong,
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

    /// Normalises one raw value with the default options (no Gmail rule, no case fold, phone
    /// region [`DEFAULT_REGION`]); see [`Normaliser::normalise_with`].
    pub fn normalise(&self, raw: &str) -> Result<String, NormaliseError> {
        self.normalise_with(raw, &NormaliseOptions::default())
    }

    /// Normalises one raw value.
    ///
    /// - **Email**: trim; `Name <address>` gives its address and a `mailto:` is dropped;
    ///   Unicode lowercase, then NFC (so precomposed and decomposed accents agree); a domain
    ///   in Unicode becomes its ASCII form (`bücher.de` is `xn--bcher-kva.de`) and trailing
    ///   dots go; must contain exactly one `@` with non-empty local part and domain, and no
    ///   whitespace inside. With `gmail_rule`, a `gmail.com`/`googlemail.com` address loses the
    ///   dots and the `+tag` of its local part and gets the domain `gmail.com`.
    /// - **Phone**: libphonenumber's parser (the `rlibphonenumber` port) reads the value in
    ///   `default_region` and it is written as E.164, which must have 8 to 15 digits. So a
    ///   national number gets the region's country code and loses its trunk prefix (`020 7946
    ///   0018` in GB); an international one loses the trunk prefix *of its own country*, also
    ///   when written in parentheses (`+44 (0)20 7946 0018`), whatever the default region;
    ///   Italy's leading 0 is kept; the default region's international prefix is understood
    ///   (`011` in the US, `0011` in Australia), and so is `00`, the ITU's, in every region;
    ///   an extension (`x7`, `ext. 7`, `;ext=7`) is accepted and dropped, as E.164 has none;
    ///   letters of a vanity number are read as their keypad digits. Whitespace of any kind
    ///   separates. Numbers are not required to be assigned ("valid") in the metadata.
    /// - **Generic**: trim, Unicode NFC; with `case_fold`, Unicode lowercase then NFC; empty is
    ///   an error.
    pub fn normalise_with(
        &self,
        raw: &str,
        options: &NormaliseOptions,
    ) -> Result<String, NormaliseError> {
        match self {
            Normaliser::Email => normalise_email(raw, options.gmail_rule),
            Normaliser::Phone => normalise_phone(raw, options.default_region),
            Normaliser::Generic => normalise_generic(raw, options.case_fold),
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

/// Domains the Gmail rule applies to.
const GMAIL_DOMAINS: [&str; 2] = ["gmail.com", "googlemail.com"];

fn normalise_email(raw: &str, gmail_rule: bool) -> Result<String, NormaliseError> {
    let trimmed = without_mailto(address_of(raw.trim()));
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
    // Lowercasing can decompose (e.g. 'İ' becomes 'i' + U+0307), so compose afterwards.
    let local: String = local.to_lowercase().nfc().collect();
    let domain: String = domain.to_lowercase().nfc().collect();
    // A domain in Unicode and its ASCII (punycode) form are one domain; the ASCII form is
    // kept. One the IDNA rules refuse, or map to other than a host name's characters (a
    // full-width `＠` becomes `@`), stays as it is written.
    let domain = match domain.is_ascii() {
        true => domain,
        false => idna::domain_to_ascii(&domain)
            .ok()
            .filter(|ascii| {
                ascii
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            })
            .unwrap_or(domain),
    };
    // `example.com.` (the root's dot written out) is `example.com`.
    let domain = domain.trim_end_matches('.');
    if domain.is_empty() {
        return Err(NormaliseError::EmailEmptyDomain);
    }
    if !gmail_rule || !GMAIL_DOMAINS.contains(&domain) {
        return Ok(format!("{local}@{domain}"));
    }
    let base = local.split_once('+').map_or(local.as_str(), |(b, _)| b);
    let base: String = base.chars().filter(|&c| c != '.').collect();
    if base.is_empty() {
        return Err(NormaliseError::EmailEmptyLocal);
    }
    Ok(format!("{base}@gmail.com"))
}

/// The address of a name and address (`Alice Smith <alice@example.com>`), as mail headers and
/// address-book exports write them: what the last `<…>` at the end holds. Anything else is
/// returned as it is.
fn address_of(text: &str) -> &str {
    let Some(inner) = text.strip_suffix('>') else {
        return text;
    };
    match inner.rfind('<') {
        Some(at) if !inner[at + 1..].contains(['<', '>']) => inner[at + 1..].trim(),
        _ => text,
    }
}

/// An address without the `mailto:` of a link (any case, however many times).
fn without_mailto(mut text: &str) -> &str {
    const MAILTO: &str = "mailto:";
    while let Some(head) = text.get(..MAILTO.len())
        && head.eq_ignore_ascii_case(MAILTO)
    {
        text = &text[MAILTO.len()..];
    }
    text
}

fn normalise_phone(raw: &str, region: Region) -> Result<String, NormaliseError> {
    let util = &*rlibphonenumber::PHONE_NUMBER_UTIL;
    // libphonenumber takes spaces, not tabs or other whitespace, as separators.
    let spaced;
    let mut text = raw.trim();
    if text.contains(|c: char| c.is_whitespace() && c != ' ') {
        spaced = text.split_whitespace().collect::<Vec<_>>().join(" ");
        text = &spaced;
    }
    if text.is_empty() {
        return Err(NormaliseError::PhoneEmpty);
    }
    let mut number = util.parse(text, Some(region)).map_err(phone_error)?;
    // `00` is the ITU's international prefix and most regions'; where the default region's is
    // another (`011` in the US), the library reads `0044 20 …` as a national number. Read it as
    // international instead: no national number starts with 00.
    if let Some(rest) = text.strip_prefix("00")
        && util
            .parse_and_keep_raw_input(text, Some(region))
            .is_ok_and(|n| {
                n.country_code_source
                    == Some(rlibphonenumber::CountryCodeSource::FromDefaultCountry as i32)
            })
    {
        number = util
            .parse(format!("+{rest}"), Some(region))
            .map_err(phone_error)?;
    }
    // E.164 carries no extension: libphonenumber's E164 format leaves it out.
    let e164 = util
        .format(&number, rlibphonenumber::PhoneNumberFormat::E164)
        .into_owned();
    let n = e164.strip_prefix('+').map_or(e164.len(), str::len);
    if !e164.starts_with('+') || !(PHONE_MIN_DIGITS..=PHONE_MAX_DIGITS).contains(&n) {
        return Err(NormaliseError::PhoneLength { digits: n });
    }
    Ok(e164)
}

/// The library's parse error as ours (its errors carry no digits, ours none either).
fn phone_error(e: rlibphonenumber::ParseError) -> NormaliseError {
    use rlibphonenumber::ParseError as P;
    match e {
        P::InvalidCountryCode => NormaliseError::PhoneCountryCode,
        P::TooShortAfterIdd | P::TooShortNsn => NormaliseError::PhoneTooShort,
        P::TooLongNsn => NormaliseError::PhoneTooLong,
        _ => NormaliseError::PhoneUnparsable,
    }
}

fn normalise_generic(raw: &str, case_fold: bool) -> Result<String, NormaliseError> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(NormaliseError::GenericEmpty);
    }
    if case_fold {
        Ok(trimmed
            .nfc()
            .collect::<String>()
            .to_lowercase()
            .nfc()
            .collect())
    } else {
        Ok(trimmed.nfc().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One golden vector: normaliser, input, expected output (or `ERROR`).
    #[derive(serde::Deserialize)]
    struct Vector {
        normaliser: Normaliser,
        /// `-`, `gmail_rule`, `case_fold` or `region=XX`.
        options: String,
        input: String,
        expected: String,
    }

    fn options(text: &str) -> NormaliseOptions {
        let mut o = NormaliseOptions::default();
        match text {
            "-" => {}
            "gmail_rule" => o.gmail_rule = true,
            "case_fold" => o.case_fold = true,
            other => {
                let region = other.strip_prefix("region=").unwrap();
                o.default_region = parse_region(region).unwrap();
            }
        }
        o
    }

    const VECTORS: &str = include_str!("../../testdata/normalise_vectors.csv");

    #[test]
    fn golden_vectors() {
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::None)
            .from_reader(VECTORS.as_bytes());
        let mut n = 0;
        for (i, v) in reader.deserialize::<Vector>().enumerate() {
            let v = v.unwrap();
            let got = v.normaliser.normalise_with(&v.input, &options(&v.options));
            let line = i + 2;
            if v.expected == "ERROR" {
                assert!(got.is_err(), "line {line}: expected an error, got {got:?}");
            } else {
                assert_eq!(got.as_deref(), Ok(v.expected.as_str()), "line {line}");
                // A normalised value is a fixed point: normalising it again changes nothing.
                let again = v
                    .normaliser
                    .normalise_with(&v.expected, &options(&v.options));
                assert_eq!(
                    again.as_deref(),
                    Ok(v.expected.as_str()),
                    "line {line} again"
                );
            }
            n += 1;
        }
        assert!(n >= 50, "only {n} vectors");
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

    #[test]
    fn gmail_rule_only_for_gmail_and_only_when_set() {
        let on = NormaliseOptions {
            gmail_rule: true,
            ..NormaliseOptions::default()
        };
        let e = Normaliser::Email;
        assert_eq!(
            e.normalise_with(" J.Doe+News@GoogleMail.com", &on).unwrap(),
            "jdoe@gmail.com"
        );
        assert_eq!(
            e.normalise_with("jdoe@gmail.com", &on).unwrap(),
            e.normalise_with("j.d.o.e+x+y@gmail.com", &on).unwrap()
        );
        assert_eq!(
            e.normalise_with("j.doe+x@example.com", &on).unwrap(),
            "j.doe+x@example.com"
        );
        assert_eq!(
            e.normalise("j.doe+x@gmail.com").unwrap(),
            "j.doe+x@gmail.com"
        );
        assert!(e.normalise_with("+tag@gmail.com", &on).is_err());
        assert!(e.normalise_with("...@gmail.com", &on).is_err());
    }

    #[test]
    fn case_fold_only_when_set() {
        let on = NormaliseOptions {
            case_fold: true,
            ..NormaliseOptions::default()
        };
        let g = Normaliser::Generic;
        assert_eq!(g.normalise_with(" ACME-12 ", &on).unwrap(), "acme-12");
        assert_eq!(g.normalise(" ACME-12 ").unwrap(), "ACME-12");
        assert_eq!(g.normalise_with("E\u{301}COLE", &on).unwrap(), "\u{e9}cole");
    }

    /// One row of `testdata/phone_vectors.csv`.
    #[derive(serde::Deserialize)]
    struct PhoneVector {
        region: String,
        input: String,
        expected: String,
        source: String,
    }

    /// Real-world phone formats against E.164 values from authorities independent of this
    /// code (libphonenumber's own tests, national numbering plans; the file cites each).
    #[test]
    fn phone_formats_match_the_numbering_plans() {
        let mut reader = csv::ReaderBuilder::new()
            .comment(Some(b'#'))
            .trim(csv::Trim::None)
            .from_reader(include_str!("../../testdata/phone_vectors.csv").as_bytes());
        let mut failures = Vec::new();
        let mut n = 0;
        for v in reader.deserialize::<PhoneVector>() {
            let v = v.unwrap();
            assert!(!v.source.trim().is_empty(), "{}: no source", v.input);
            let options = NormaliseOptions {
                default_region: parse_region(&v.region).unwrap(),
                ..NormaliseOptions::default()
            };
            let got = Normaliser::Phone.normalise_with(&v.input, &options);
            if got.as_deref() != Ok(v.expected.as_str()) {
                failures.push(format!(
                    "{} {:?}: got {got:?}, {} says {}",
                    v.region, v.input, v.source, v.expected
                ));
            }
            n += 1;
        }
        assert!(n >= 60, "only {n} phone vectors");
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn trunk_prefix_in_parentheses_is_the_same_number() {
        let p = Normaliser::Phone;
        for region in ["US", "GB", "DE"] {
            let o = NormaliseOptions {
                default_region: parse_region(region).unwrap(),
                ..NormaliseOptions::default()
            };
            assert_eq!(
                p.normalise_with("+44 (0)20 7946 0018", &o),
                p.normalise_with("+44 20 7946 0018", &o),
                "region {region}"
            );
        }
    }

    #[test]
    fn phone_regions_and_refusals() {
        let p = Normaliser::Phone;
        // Vanity letters are keypad digits (libphonenumber's testConvertAlphaCharactersInNumber).
        assert_eq!(p.normalise("1-800-FLOWERS").unwrap(), "+18003569377");
        assert!(p.normalise("+1 555 12").is_err());
        assert!(p.normalise("415 555 0123 415 555 0199").is_err());
        assert!(p.normalise("no number here").is_err());
        assert!(parse_region("gb").is_none());
        assert!(parse_region("XX").is_none());
        assert!(parse_region("ZZ").is_none());
        assert!(parse_region("USA").is_none());
        assert!(parse_region("GB").is_some());
    }
}
