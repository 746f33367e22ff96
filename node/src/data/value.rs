//! A summed column's field as an integer, one rule for every pass (in the node and on the
//! executors).

/// Largest magnitude a double holds exactly; beyond it a double is not read as an integer.
const EXACT_IN_DOUBLE: f64 = 9_007_199_254_740_992.0; // 2^53

/// The integer a value field holds: decimal digits with an optional sign (`-1200`), or a number
/// whose fraction is zero (`120.0`, `120.00`, `1.2e3`), as a Parquet or JSON double or decimal
/// column reads. `None` for anything else: empty, a fraction (`12.99`), text, beyond `i64`, or
/// a double too large to be exact (2^53 and up).
pub fn parse_value(field: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(field).ok()?.trim();
    if let Ok(v) = text.parse::<i64>() {
        return Some(v);
    }
    // A decimal's text: its digits are exact, however many.
    if let Some((whole, fraction)) = text.split_once('.')
        && !fraction.is_empty()
        && fraction.bytes().all(|b| b == b'0')
        && let Ok(v) = whole.parse::<i64>()
    {
        return Some(v);
    }
    if !text
        .bytes()
        .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
    {
        return None; // `inf`, `NaN` and words
    }
    let v: f64 = text.parse().ok()?;
    (v.fract() == 0.0 && v.abs() < EXACT_IN_DOUBLE).then_some(v as i64)
}

#[cfg(test)]
mod tests {
    use super::parse_value;

    #[test]
    fn whole_numbers_read_in_any_notation_and_nothing_else_does() {
        let cases: [(&str, Option<i64>); 16] = [
            ("1200", Some(1200)),
            (" -1200 ", Some(-1200)),
            ("+7", Some(7)),
            ("120.0", Some(120)),
            ("-120.00", Some(-120)),
            ("1.2e3", Some(1200)),
            ("9223372036854775807", Some(i64::MAX)),
            ("12.99", None),
            ("0.5", None),
            ("", None),
            ("12a", None),
            ("inf", None),
            ("NaN", None),
            ("1e300", None),
            ("9223372036854775808", None),
            ("9007199254740993.5", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_value(text.as_bytes()), want, "{text:?}");
        }
    }
}
