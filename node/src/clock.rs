//! Wall-clock time as the node records it: Unix milliseconds, and the UTC calendar text the audit
//! log, the ledger and the CLI print (through `jiff`). Only the async shell reads the clock; the
//! job protocols are given the time.

/// Milliseconds since the Unix epoch now (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC. A time outside the calendar's years
/// −9999..=9999 (only a damaged log holds one) is printed as its milliseconds.
pub fn format_ms(at_ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(at_ms) {
        Ok(t) => t.strftime("%Y-%m-%d %H:%M:%S").to_string(),
        Err(_) => format!("{at_ms} ms after 1970-01-01"),
    }
}

/// Parses `YYYY-MM-DD` as Unix milliseconds at 00:00 UTC.
pub fn parse_date_ms(s: &str) -> Result<i64, String> {
    let bad = || format!("'{s}' is not a date; expected YYYY-MM-DD");
    let date = jiff::civil::Date::strptime("%Y-%m-%d", s.trim()).map_err(|_| bad())?;
    let midnight = date.to_zoned(jiff::tz::TimeZone::UTC).map_err(|_| bad())?;
    Ok(midnight.timestamp().as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_dates() {
        assert_eq!(parse_date_ms("1970-01-01").unwrap(), 0);
        assert_eq!(parse_date_ms("2024-02-29").unwrap(), 1_709_164_800_000);
        assert!(parse_date_ms("2023-02-29").is_err());
        assert!(parse_date_ms("2024-13-01").is_err());
        assert_eq!(
            format_ms(1_709_164_800_000 + 3_723_000),
            "2024-02-29 01:02:03"
        );
        assert_eq!(format_ms(-1000), "1969-12-31 23:59:59");
    }
}
