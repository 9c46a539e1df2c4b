//! Node-local health checks, opt-in per Service by annotation: what a Service asks for
//! ([`HealthCheck`], read by [`parse`]), which of its endpoints this node probes
//! ([`ProbeTarget`]: its local endpoints of TCP ports), and the selection rule that takes the
//! ones the probes hold as failed out of a selection table ([`without_failed`]), never all of
//! them (fail open). The probing itself is the agent's ([`crate::probe`]); compile only reads
//! its verdicts ([`super::model::NodeContext::health_failed`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use super::model::Backend;
use crate::duration::parse_duration;

/// The annotation that turns health checks on: `tcp` (a connect) or `http:<path>` (a GET of
/// the path, answered 200-399).
pub const HEALTH_CHECK_ANNOTATION: &str = "lb.io/health-check";
/// Time between the starts of two probes of one endpoint (default [`DEFAULT_INTERVAL`]).
pub const HEALTH_CHECK_INTERVAL_ANNOTATION: &str = "lb.io/health-check-interval";
/// How long one probe may take before it counts as failed (default [`DEFAULT_TIMEOUT`]).
pub const HEALTH_CHECK_TIMEOUT_ANNOTATION: &str = "lb.io/health-check-timeout";
/// Failed probes in a row that take an endpoint out (default [`DEFAULT_FAILURE_THRESHOLD`]).
pub const HEALTH_CHECK_FAILURE_THRESHOLD_ANNOTATION: &str = "lb.io/health-check-failure-threshold";
/// Passed probes in a row that bring it back (default [`DEFAULT_SUCCESS_THRESHOLD`]).
pub const HEALTH_CHECK_SUCCESS_THRESHOLD_ANNOTATION: &str = "lb.io/health-check-success-threshold";

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 2;
pub const DEFAULT_SUCCESS_THRESHOLD: u32 = 1;
/// The shortest interval: a probe of every local endpoint ten times a second is plenty.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The longest interval and timeout.
pub const MAX_INTERVAL: Duration = Duration::from_secs(300);
/// The longest a probe may wait for its answer: the node's probes share one limit of probes in
/// flight, and probes hanging for minutes on silent endpoints would hold it from every other
/// Service's.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest failure or success threshold.
pub const MAX_THRESHOLD: u32 = 10;
/// The longest HTTP path (it goes into the request line as written).
pub const MAX_PATH_BYTES: usize = 1024;

/// How a Service's endpoints are probed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Probe {
    /// A TCP connect that completes.
    Tcp,
    /// An HTTP/1.0 GET of the path whose status is 200-399 (as a Kubernetes httpGet probe).
    Http { path: String },
}

/// A Service's health check, from its annotations.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Duration,
    /// At most the interval: one probe of an endpoint ends before the next starts.
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub success_threshold: u32,
}

/// One endpoint of a Service as this node's probes know it: the Service, and the endpoint's
/// address and (target) port. Keyed by Service because two Services may check one endpoint
/// differently.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbedEndpoint {
    pub namespace: String,
    pub name: String,
    pub addr: IpAddr,
    pub port: u16,
}

impl std::fmt::Display for ProbedEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} {}",
            self.namespace,
            self.name,
            std::net::SocketAddr::new(self.addr, self.port)
        )
    }
}

/// An endpoint to probe, and how.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeTarget {
    pub endpoint: ProbedEndpoint,
    pub check: HealthCheck,
}

/// The health check a Service's annotations ask for: None without
/// [`HEALTH_CHECK_ANNOTATION`]; an error, saying which annotation is wrong and why, for a value
/// this cannot use or for settings without the annotation that turns checks on.
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Option<HealthCheck>, String> {
    let settings = [
        HEALTH_CHECK_INTERVAL_ANNOTATION,
        HEALTH_CHECK_TIMEOUT_ANNOTATION,
        HEALTH_CHECK_FAILURE_THRESHOLD_ANNOTATION,
        HEALTH_CHECK_SUCCESS_THRESHOLD_ANNOTATION,
    ];
    let Some(kind) = annotations.get(HEALTH_CHECK_ANNOTATION) else {
        return match settings
            .iter()
            .find(|name| annotations.contains_key(**name))
        {
            Some(name) => Err(format!(
                "{name} is set without {HEALTH_CHECK_ANNOTATION} (tcp or http:/path)"
            )),
            None => Ok(None),
        };
    };
    let probe = parse_probe(kind.trim())?;
    let duration = |name: &str, default: Duration| -> Result<Duration, String> {
        let Some(text) = annotations.get(name) else {
            return Ok(default);
        };
        parse_duration(text)
            .map_err(|error| format!("{name}: {error}"))
            .and_then(|value| {
                if value > MAX_INTERVAL {
                    Err(format!("{name}: {text:?} is longer than {MAX_INTERVAL:?}"))
                } else {
                    Ok(value)
                }
            })
    };
    let threshold = |name: &str, default: u32| -> Result<u32, String> {
        let Some(text) = annotations.get(name) else {
            return Ok(default);
        };
        text.trim()
            .parse()
            .ok()
            .filter(|value| (1..=MAX_THRESHOLD).contains(value))
            .ok_or_else(|| format!("{name}: {text:?} is not a number from 1 to {MAX_THRESHOLD}"))
    };
    let interval = duration(HEALTH_CHECK_INTERVAL_ANNOTATION, DEFAULT_INTERVAL)?;
    if interval < MIN_INTERVAL {
        return Err(format!(
            "{HEALTH_CHECK_INTERVAL_ANNOTATION}: {interval:?} is shorter than {MIN_INTERVAL:?}"
        ));
    }
    let timeout = duration(
        HEALTH_CHECK_TIMEOUT_ANNOTATION,
        DEFAULT_TIMEOUT.min(interval),
    )?;
    if timeout > MAX_TIMEOUT {
        return Err(format!(
            "{HEALTH_CHECK_TIMEOUT_ANNOTATION}: {timeout:?} is longer than {MAX_TIMEOUT:?}"
        ));
    }
    if timeout > interval {
        return Err(format!(
            "{HEALTH_CHECK_TIMEOUT_ANNOTATION}: {timeout:?} is longer than the interval \
             ({interval:?}); a probe must end before the next one starts"
        ));
    }
    Ok(Some(HealthCheck {
        probe,
        interval,
        timeout,
        failure_threshold: threshold(
            HEALTH_CHECK_FAILURE_THRESHOLD_ANNOTATION,
            DEFAULT_FAILURE_THRESHOLD,
        )?,
        success_threshold: threshold(
            HEALTH_CHECK_SUCCESS_THRESHOLD_ANNOTATION,
            DEFAULT_SUCCESS_THRESHOLD,
        )?,
    }))
}

fn parse_probe(text: &str) -> Result<Probe, String> {
    if text == "tcp" {
        return Ok(Probe::Tcp);
    }
    let Some(path) = text.strip_prefix("http:") else {
        return Err(format!(
            "{HEALTH_CHECK_ANNOTATION}: {text:?} is neither tcp nor http:/path"
        ));
    };
    if !path.starts_with('/') {
        return Err(format!(
            "{HEALTH_CHECK_ANNOTATION}: the path of {text:?} must start with /"
        ));
    }
    // It goes into the request line as written: no spaces, no control characters.
    if path.len() > MAX_PATH_BYTES || !path.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(format!(
            "{HEALTH_CHECK_ANNOTATION}: the path of {text:?} must be at most {MAX_PATH_BYTES} \
             printable ASCII characters without spaces"
        ));
    }
    Ok(Probe::Http {
        path: path.to_owned(),
    })
}

/// One selection table's backends without those the probes hold as failed (`failed`: address
/// and port), unless that would leave no candidate: a table never loses its last candidates to
/// health checks (fail open), since probes that fail for every endpoint more likely say
/// something about the probing node than about the endpoints.
///
/// A candidate is a healthy backend of weight above 0 (`weight`; a weight of 0 drains). When
/// the table is a subset that topology hints chose (`wider`: all the port's endpoints), and no
/// candidate of it is left, the healthy endpoints of the wider set serve instead, as they do when
/// no hinted endpoint exists: hints are a preference. Returns the backends and whether it failed
/// open (some were failed and all were kept).
pub(super) fn without_failed(
    backends: BTreeSet<Backend>,
    wider: Option<&BTreeSet<Backend>>,
    failed: &BTreeSet<(IpAddr, u16)>,
    weight: impl Fn(&Backend) -> u32,
) -> (BTreeSet<Backend>, bool) {
    let is_failed = |backend: &Backend| failed.contains(&(backend.addr, backend.port));
    if !backends.iter().any(is_failed) {
        return (backends, false);
    }
    let healthy = |set: &BTreeSet<Backend>| -> BTreeSet<Backend> {
        set.iter()
            .filter(|backend| !is_failed(backend))
            .copied()
            .collect()
    };
    let serves = |set: &BTreeSet<Backend>| set.iter().any(|backend| weight(backend) > 0);
    let kept = healthy(&backends);
    if serves(&kept) {
        return (kept, false);
    }
    if let Some(wider) = wider {
        let kept = healthy(wider);
        if serves(&kept) {
            return (kept, false);
        }
    }
    (backends, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (annotation, value) pairs of a Service.
    type Pairs<'a> = &'a [(&'a str, &'a str)];

    fn annotations(pairs: Pairs<'_>) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn check(
        probe: Probe,
        interval_ms: u64,
        timeout_ms: u64,
        failures: u32,
        successes: u32,
    ) -> HealthCheck {
        HealthCheck {
            probe,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
            failure_threshold: failures,
            success_threshold: successes,
        }
    }

    fn http(path: &str) -> Probe {
        Probe::Http {
            path: path.to_owned(),
        }
    }

    #[test]
    fn good_annotations_give_the_check_with_defaults_for_what_is_left_out() {
        let rows: &[(Pairs<'_>, Option<HealthCheck>)] = &[
            (&[], None),
            (&[("lb.io/load-balancing", "maglev")], None),
            (
                &[("lb.io/health-check", "tcp")],
                Some(check(Probe::Tcp, 1000, 500, 2, 1)),
            ),
            (
                &[("lb.io/health-check", " tcp ")],
                Some(check(Probe::Tcp, 1000, 500, 2, 1)),
            ),
            (
                &[("lb.io/health-check", "http:/")],
                Some(check(http("/"), 1000, 500, 2, 1)),
            ),
            (
                &[("lb.io/health-check", "http:/healthz?full=1")],
                Some(check(http("/healthz?full=1"), 1000, 500, 2, 1)),
            ),
            (
                &[
                    ("lb.io/health-check", "http:/ready"),
                    ("lb.io/health-check-interval", "5s"),
                    ("lb.io/health-check-timeout", "2s"),
                    ("lb.io/health-check-failure-threshold", "3"),
                    ("lb.io/health-check-success-threshold", "2"),
                ],
                Some(check(http("/ready"), 5000, 2000, 3, 2)),
            ),
            // A short interval bounds the default timeout.
            (
                &[
                    ("lb.io/health-check", "tcp"),
                    ("lb.io/health-check-interval", "200ms"),
                ],
                Some(check(Probe::Tcp, 200, 200, 2, 1)),
            ),
            (
                &[
                    ("lb.io/health-check", "tcp"),
                    ("lb.io/health-check-interval", "100ms"),
                    ("lb.io/health-check-timeout", "100ms"),
                    ("lb.io/health-check-failure-threshold", "1"),
                    ("lb.io/health-check-success-threshold", "10"),
                ],
                Some(check(Probe::Tcp, 100, 100, 1, 10)),
            ),
        ];
        for (pairs, expected) in rows {
            assert_eq!(
                &parse(&annotations(pairs)),
                &Ok(expected.clone()),
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn bad_annotations_are_refused_with_the_annotation_named() {
        let rows: &[(Pairs<'_>, &str)] = &[
            (
                &[("lb.io/health-check", "")],
                "lb.io/health-check: \"\" is neither",
            ),
            (
                &[("lb.io/health-check", "TCP")],
                "is neither tcp nor http:/path",
            ),
            (
                &[("lb.io/health-check", "udp")],
                "is neither tcp nor http:/path",
            ),
            (
                &[("lb.io/health-check", "http")],
                "is neither tcp nor http:/path",
            ),
            (
                &[("lb.io/health-check", "http:healthz")],
                "must start with /",
            ),
            (&[("lb.io/health-check", "http:/a b")], "printable ASCII"),
            (
                &[("lb.io/health-check", "http:/a\r\nX: y")],
                "printable ASCII",
            ),
            (
                &[("lb.io/health-check-interval", "1s")],
                "lb.io/health-check-interval is set without lb.io/health-check",
            ),
            (
                &[
                    ("lb.io/health-check", "tcp"),
                    ("lb.io/health-check-interval", "1"),
                ],
                "lb.io/health-check-interval: \"1\": missing unit",
            ),
            (
                &[
                    ("lb.io/health-check", "tcp"),
                    ("lb.io/health-check-interval", "50ms"),
                ],
                "is shorter than 100ms",
            ),
            (
                &[
                    ("lb.io/health-check", "tcp"),
                    ("lb.io/health-check-interval", "10m"),
                ],
                "is longer than 300s",
            ),
            (
                &[
                    ("lb.io/health-check", "tcp"),
                    ("lb.io/health-check-timeout", "0s"),
                ],
                "must be longer than zero",
            ),
            (
                &[
                    ("lb.io/health-check", "tcp"),
                    ("lb.io/health-check-timeout", "2s"),
                ],
                "is longer than the interval",
            ),
            (
                &[
                    ("lb.io/health-check", "tcp"),
                    ("lb.io/health-check-interval", "5m"),
                    ("lb.io/health-check-timeout", "31s"),
                ],
                "is longer than 30s",
            ),
            (
                &[
                    ("lb.io/health-check", "tcp"),
                    ("lb.io/health-check-failure-threshold", "0"),
                ],
                "lb.io/health-check-failure-threshold: \"0\" is not a number from 1 to 10",
            ),
            (
                &[
                    ("lb.io/health-check", "tcp"),
                    ("lb.io/health-check-success-threshold", "11"),
                ],
                "lb.io/health-check-success-threshold: \"11\" is not a number from 1 to 10",
            ),
            (
                &[
                    ("lb.io/health-check", "tcp"),
                    ("lb.io/health-check-failure-threshold", "-1"),
                ],
                "is not a number",
            ),
        ];
        for (pairs, expected) in rows {
            match parse(&annotations(pairs)) {
                Err(message) => assert!(
                    message.contains(expected),
                    "{pairs:?}: {message:?} does not say {expected:?}"
                ),
                Ok(check) => panic!("{pairs:?} accepted as {check:?}"),
            }
        }
    }

    fn backend(last: u8) -> Backend {
        Backend {
            addr: IpAddr::from([10, 244, 1, last]),
            port: 8080,
            proto: lb_common::proto::TCP,
            flags: 0,
        }
    }

    #[test]
    fn failed_backends_leave_a_table_unless_none_would_be_left() {
        let all: BTreeSet<Backend> = [backend(10), backend(11), backend(12)].into();
        let failed = |lasts: &[u8]| -> BTreeSet<(IpAddr, u16)> {
            lasts
                .iter()
                .map(|last| (IpAddr::from([10, 244, 1, *last]), 8080))
                .collect()
        };
        let equal = |_: &Backend| 1;
        assert_eq!(
            without_failed(all.clone(), None, &failed(&[]), equal),
            (all.clone(), false)
        );
        assert_eq!(
            without_failed(all.clone(), None, &failed(&[10, 12]), equal),
            ([backend(11)].into(), false)
        );
        // Another port of the same address is another endpoint.
        let other_port: BTreeSet<(IpAddr, u16)> = [(IpAddr::from([10, 244, 1, 10]), 9090)].into();
        assert_eq!(
            without_failed(all.clone(), None, &other_port, equal),
            (all.clone(), false)
        );
        // Every one failed: all stay (fail open), and the caller hears of it.
        assert_eq!(
            without_failed(all.clone(), None, &failed(&[10, 11, 12]), equal),
            (all.clone(), true)
        );
        // An empty table did not fail open: it had nothing to keep.
        assert_eq!(
            without_failed(BTreeSet::new(), None, &failed(&[10]), equal),
            (BTreeSet::new(), false)
        );
    }

    #[test]
    fn a_hinted_subset_whose_endpoints_all_failed_falls_back_to_the_healthy_others() {
        let hinted: BTreeSet<Backend> = [backend(10)].into();
        let all: BTreeSet<Backend> = [backend(10), backend(11), backend(12)].into();
        let failed: BTreeSet<(IpAddr, u16)> = [(IpAddr::from([10, 244, 1, 10]), 8080)].into();
        assert_eq!(
            without_failed(hinted.clone(), Some(&all), &failed, |_| 1),
            ([backend(11), backend(12)].into(), false)
        );
        // Every endpoint failed: the hinted subset stays (fail open).
        let every: BTreeSet<(IpAddr, u16)> = all.iter().map(|b| (b.addr, b.port)).collect();
        assert_eq!(
            without_failed(hinted.clone(), Some(&all), &every, |_| 1),
            (hinted, true)
        );
    }

    #[test]
    fn healthy_backends_of_weight_0_are_no_candidates_to_keep_a_table_serving() {
        // A (weight 1) failed, B weighs 0 (drained): taking A out would leave no cell.
        let table: BTreeSet<Backend> = [backend(10), backend(11)].into();
        let failed: BTreeSet<(IpAddr, u16)> = [(IpAddr::from([10, 244, 1, 10]), 8080)].into();
        let weight = |b: &Backend| u32::from(b.addr != IpAddr::from([10, 244, 1, 11]));
        assert_eq!(
            without_failed(table.clone(), None, &failed, weight),
            (table, true)
        );
    }
}
