//! ISO-8601 durations (`PT1H`, `P1D`, `PT10M30S`, `P1W`) as used in workflow files.
//!
//! Only fixed-length units: weeks, days, hours, minutes, seconds. Months and years have no
//! fixed length, so an offset of `P1M` is refused with a clear error rather than guessed.

use std::time::Duration;

/// Parses an ISO-8601 duration of weeks, days, hours, minutes and (fractional) seconds.
pub fn parse(s: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("invalid ISO-8601 duration {s:?}: {why} (e.g. PT1H, P1D, PT10M)");
    let rest = s
        .strip_prefix('P')
        .or_else(|| s.strip_prefix('p'))
        .ok_or_else(|| bad("must start with P"))?;
    if rest.is_empty() || rest == "T" {
        return Err(bad("no value"));
    }
    let mut secs = 0f64;
    let mut in_time = false;
    let mut num = String::new();
    for c in rest.chars() {
        match c.to_ascii_uppercase() {
            'T' if !in_time && num.is_empty() => in_time = true,
            d if d.is_ascii_digit() || d == '.' => num.push(d),
            unit => {
                let n: f64 = num
                    .parse()
                    .map_err(|_| bad("a number must precede each unit"))?;
                num.clear();
                secs += n * match (in_time, unit) {
                    (false, 'W') => 7.0 * 86_400.0,
                    (false, 'D') => 86_400.0,
                    (true, 'H') => 3_600.0,
                    (true, 'M') => 60.0,
                    (true, 'S') => 1.0,
                    (false, 'M' | 'Y') => return Err(bad("months and years have no fixed length")),
                    _ => return Err(bad(&format!("unexpected {unit:?}"))),
                };
            }
        }
    }
    if !num.is_empty() {
        return Err(bad("a number without a unit"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Formats a duration the way [`parse`] reads it (`PT1H30M`, `P1DT2H`, `PT0S`).
pub fn format(d: Duration) -> String {
    let mut s = d.as_secs();
    let days = s / 86_400;
    s %= 86_400;
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    let mut out = String::from("P");
    if days > 0 {
        out.push_str(&format!("{days}D"));
    }
    if h > 0 || m > 0 || sec > 0 || days == 0 {
        out.push('T');
        if h > 0 {
            out.push_str(&format!("{h}H"));
        }
        if m > 0 {
            out.push_str(&format!("{m}M"));
        }
        if sec > 0 || (h == 0 && m == 0) {
            out.push_str(&format!("{sec}S"));
        }
    }
    out
}

/// `#[serde(with = "iso")]` for a `Duration` written as an ISO-8601 string.
pub mod iso {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    /// Writes `PT1H`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    /// Reads `PT1H`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::parsed_str(d, "an ISO-8601 duration such as PT1H", super::parse)
    }
}

/// Deserialises a string and parses it with `parse`, failing *inside* the deserializer's
/// visitor. Why not `String::deserialize(d)?.parse()`: an error raised after the string was
/// read carries no position, while one raised in the visitor gets the YAML deserializer's
/// line, column and field path (`offset: invalid … at line 4 column 9`).
pub fn parsed_str<'de, D, T>(
    d: D,
    expecting: &'static str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct V<F>(&'static str, F);
    impl<'de, T, F: FnOnce(&str) -> Result<T, String>> serde::de::Visitor<'de> for V<F> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
            (self.1)(s).map_err(E::custom)
        }
    }
    d.deserialize_str(V(expecting, parse))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        for (s, secs) in [
            ("PT1H", 3600),
            ("P1D", 86_400),
            ("PT10M", 600),
            ("P1DT2H", 93_600),
            ("PT1H30M15S", 5415),
            ("P2W", 1_209_600),
            ("PT0S", 0),
            ("PT24H", 86_400),
        ] {
            assert_eq!(parse(s).unwrap(), Duration::from_secs(secs), "{s}");
            assert_eq!(
                parse(&format(Duration::from_secs(secs))).unwrap().as_secs(),
                secs
            );
        }
        assert_eq!(parse("PT0.5S").unwrap(), Duration::from_millis(500));
        assert_eq!(format(Duration::from_secs(5400)), "PT1H30M");
    }

    #[test]
    fn refuses_bad_durations() {
        for s in ["", "1H", "P", "PT", "PT1", "P1M", "PTXH", "P1H"] {
            let e = parse(s).unwrap_err();
            assert!(e.contains("ISO-8601"), "{s}: {e}");
        }
    }
}
