//! Durations as Kubernetes components write them (`500ms`, `30s`, `1h30m`), for flags, the
//! kube-proxy configuration file and annotations alike.

use std::time::Duration;

/// A duration as Kubernetes components write them: numbers with units `ms`, `s`, `m` or `h`,
/// e.g. `500ms`, `30s`, `1h30m`. Zero is refused (the datapath would read it as "default").
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("expected a duration such as 30s, 5m or 1h30m".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: expected a number before each unit"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m or h)")),
        };
        total += unit * u32::try_from(number).map_err(|_| format!("{text:?}: too large"))?;
        rest = &rest[unit_len..];
    }
    if total.is_zero() {
        return Err(format!("{text:?}: must be longer than zero"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubernetes_flags() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("6h"), Ok(Duration::from_secs(6 * 3600)));
        for bad in ["", "10", "s", "5d", "0s", "1.5s", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }
}
