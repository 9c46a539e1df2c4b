//! Durations as Kubernetes components write them (`500ms`, `30s`, `1h30m`, `1.5s`): Go's
//! `time.ParseDuration` syntax, for flags, the kube-proxy configuration file and annotations
//! alike.

use std::time::Duration;

/// Go's largest duration, an int64 of nanoseconds (about 292 years): what kube-proxy can be
/// given, and so what lb takes.
const MAX_NANOS: u128 = i64::MAX as u128;

/// A duration longer than zero, in Go's syntax (see [`parse_go_duration`]). Zero is refused:
/// the datapath would read it as "default".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_go_duration(text)?;
    if duration.is_zero() {
        return Err(format!("{text:?}: must be longer than zero"));
    }
    Ok(duration)
}

/// A duration as Go's `time.ParseDuration` reads it: one or more decimal numbers, each with an
/// optional fraction and a unit (`ns`, `us` or `µs`, `ms`, `s`, `m`, `h`), e.g. `300ms`,
/// `1.5h`, `2h45m`; `0` alone is zero. Negative durations other than zero are refused, as are
/// those past Go's range; a fraction is cut to whole nanoseconds as Go cuts it.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("expected a duration such as 30s, 5m, 1.5h or 1h30m".into());
    }
    let (negative, unsigned) = match trimmed.as_bytes()[0] {
        b'-' => (true, &trimmed[1..]),
        b'+' => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    if unsigned == "0" {
        return Ok(Duration::ZERO);
    }
    if unsigned.is_empty() {
        return Err(format!("{text:?}: expected a number after the sign"));
    }
    let mut nanos: u128 = 0;
    let mut rest = unsigned;
    while !rest.is_empty() {
        let (term, after) = term(rest).map_err(|problem| format!("{text:?}: {problem}"))?;
        nanos += term;
        if nanos > MAX_NANOS {
            return Err(format!("{text:?}: {TOO_LONG}"));
        }
        rest = after;
    }
    if negative && nanos != 0 {
        return Err(format!("{text:?}: must not be negative"));
    }
    let nanos = u64::try_from(nanos).map_err(|_| format!("{text:?}: {TOO_LONG}"))?;
    Ok(Duration::from_nanos(nanos))
}

const TOO_LONG: &str = "too long (at most 2562047h47m16.854775807s)";

/// One number and its unit from the front of `text`: its nanoseconds (at most just past
/// [`MAX_NANOS`]) and what follows.
fn term(text: &str) -> Result<(u128, &str), String> {
    let (whole, rest) = text.split_at(digits_len(text));
    let (fraction, rest) = match rest.strip_prefix('.') {
        Some(after_point) => after_point.split_at(digits_len(after_point)),
        None => ("", rest),
    };
    if whole.is_empty() && fraction.is_empty() {
        return Err("expected a number before each unit".into());
    }
    let unit_len = rest
        .find(|c: char| c.is_ascii_digit() || c == '.')
        .unwrap_or(rest.len());
    let (unit, rest) = rest.split_at(unit_len);
    let unit_nanos: u128 = match unit {
        "ns" => 1,
        "us" | "µs" | "μs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        "" => return Err("missing unit (ns, us, ms, s, m or h)".into()),
        other => return Err(format!("unknown unit {other:?} (ns, us, ms, s, m or h)")),
    };
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| TOO_LONG.to_owned())?
    };
    if whole > MAX_NANOS / unit_nanos {
        return Err(TOO_LONG.into());
    }
    Ok((
        whole * unit_nanos + fraction_nanos(fraction, unit_nanos),
        rest,
    ))
}

/// The nanoseconds of a fraction's digits of `unit_nanos`, computed as Go computes them: the
/// digits as an integer while it fits 63 bits (later digits are dropped), scaled in floating
/// point and cut to a whole number. At most `unit_nanos`.
fn fraction_nanos(digits: &str, unit_nanos: u128) -> u128 {
    let mut value: u64 = 0;
    let mut scale = 1.0_f64;
    for digit in digits.bytes() {
        let Some(next) = value
            .checked_mul(10)
            .and_then(|tens| tens.checked_add(u64::from(digit - b'0')))
            .filter(|next| *next <= 1 << 63)
        else {
            break;
        };
        value = next;
        scale *= 10.0;
    }
    (value as f64 * (unit_nanos as f64 / scale)) as u128
}

fn digits_len(text: &str) -> usize {
    text.find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_go_reads_them() {
        for (text, expected) in [
            ("500ms", Duration::from_millis(500)),
            ("60s", Duration::from_secs(60)),
            ("1h30m", Duration::from_secs(5400)),
            ("6h", Duration::from_secs(6 * 3600)),
            // What Go's Duration.String writes, as a kube-proxy ConfigMap holds it.
            ("24h0m0s", Duration::from_secs(24 * 3600)),
            ("1.5s", Duration::from_millis(1500)),
            (".5s", Duration::from_millis(500)),
            ("1.s", Duration::from_secs(1)),
            ("1.5h", Duration::from_secs(5400)),
            (
                "2h45m30.25s",
                Duration::from_millis((2 * 3600 + 45 * 60 + 30) * 1000 + 250),
            ),
            ("500us", Duration::from_micros(500)),
            ("500µs", Duration::from_micros(500)),
            ("250ns", Duration::from_nanos(250)),
            ("+30s", Duration::from_secs(30)),
            (" 30s ", Duration::from_secs(30)),
            ("1.0000000009s", Duration::from_secs(1)),
            // Go scales a fraction in floating point and cuts it once.
            ("0.000000000009h", Duration::from_nanos(32)),
            ("0.55555555555m", Duration::from_nanos(33_333_333_333)),
            (
                "2562047h47m16.854775807s",
                Duration::from_nanos(i64::MAX as u64),
            ),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text:?}");
        }
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("0h0m0s"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("-0"), Ok(Duration::ZERO));
        assert_eq!(parse_go_duration("-0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn what_go_refuses_is_refused_with_the_reason() {
        for (text, reason) in [
            ("", "expected a duration"),
            ("10", "missing unit"),
            ("1h30", "missing unit"),
            ("s", "expected a number"),
            ("hms", "expected a number"),
            (".s", "expected a number"),
            ("5d", "unknown unit \"d\""),
            ("1.5.s", "missing unit"),
            ("-1s", "must not be negative"),
            ("+", "expected a number after the sign"),
            (" - ", "expected a number after the sign"),
            // Past u128 with the fraction's share: refused, not wrapped to a short duration.
            ("340282366920938463463374607431768211.999us", "too long"),
            ("94522879700260684295381835.9h", "too long"),
            ("0s", "must be longer than zero"),
            ("0", "must be longer than zero"),
            ("2562048h", "too long"),
            ("99999999999999999999999999999999999999999h", "too long"),
            ("2562047h47m16.854775808s", "too long"),
        ] {
            let error = parse_duration(text).expect_err(text);
            assert!(error.contains(reason), "{text:?}: {error}");
        }
    }
}
