//! The node-local health probes ([`crate::compile::health_check`] says what a Service asks
//! for): one task per probed endpoint, each probing on its own interval from the agent's own
//! network namespace, at most [`MAX_CONCURRENT_PROBES`] probes in flight over all of them. A
//! task counts its probes ([`Streak`]) and reports only the moments its endpoint fails
//! (`failure_threshold` failed probes in a row) or passes again (`success_threshold` passed
//! ones); the agent's loop takes those reports ([`Prober::next_change`]) as an input of the
//! compile, so probing never blocks a sync and a sync never waits for a probe.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::{Semaphore, mpsc},
    task::JoinHandle,
};

use crate::compile::health_check::{HealthCheck, Probe, ProbeTarget, ProbedEndpoint};

/// Probes in flight at once, over every endpoint: the rest wait their turn, so a node with many
/// probed endpoints (or many that time out) costs a bounded number of sockets.
pub const MAX_CONCURRENT_PROBES: usize = 32;

/// The most of an HTTP answer a probe reads: its status line must be in there.
const MAX_STATUS_LINE: usize = 1024;

/// Probes by `namespace`, `service` and `result` (`passed`, `failed`).
pub type ProbeCounts = Family<[(&'static str, String); 3], Counter>;

/// One endpoint's probes in a row, and whether they have failed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Streak {
    /// An endpoint starts in rotation: the EndpointSlice already says it is ready.
    failed: bool,
    /// Probes in a row with the same result, the last one's.
    in_a_row: u32,
    last_passed: bool,
}

impl Streak {
    /// Counts one probe; returns the endpoint's new state (true: failed) when this probe
    /// changed it.
    pub fn record(&mut self, passed: bool, check: &HealthCheck) -> Option<bool> {
        if passed == self.last_passed {
            self.in_a_row = self.in_a_row.saturating_add(1);
        } else {
            self.last_passed = passed;
            self.in_a_row = 1;
        }
        let threshold = if passed {
            check.success_threshold
        } else {
            check.failure_threshold
        };
        // `failed == passed`: the probe speaks against the current state.
        if self.failed == passed && self.in_a_row >= threshold {
            self.failed = !passed;
            return Some(self.failed);
        }
        None
    }

    pub fn failed(&self) -> bool {
        self.failed
    }
}

/// An endpoint that failed its health check or passed it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub endpoint: ProbedEndpoint,
    /// True: it failed and leaves rotation; false: it passed again and returns.
    pub failed: bool,
    /// What the last probe saw (`connection refused`, `no answer within 500ms`, `HTTP 503`,
    /// `passed`).
    pub detail: String,
    /// `failure_threshold` or `success_threshold`, whichever was reached.
    pub probes: u32,
    /// Which task sent it: a report of a task stopped since is dropped.
    generation: u64,
}

struct Running {
    check: HealthCheck,
    generation: u64,
    task: JoinHandle<()>,
}

/// Every probed endpoint's task, and which endpoints are failed.
pub struct Prober {
    running: HashMap<ProbedEndpoint, Running>,
    failed: BTreeSet<ProbedEndpoint>,
    reports: mpsc::UnboundedSender<Change>,
    changes: mpsc::UnboundedReceiver<Change>,
    permits: Arc<Semaphore>,
    next_generation: u64,
    counts: ProbeCounts,
}

impl Prober {
    /// No endpoint probed yet; each probe counted in `counts`.
    pub fn new(counts: ProbeCounts) -> Self {
        let (reports, changes) = mpsc::unbounded_channel();
        Self {
            running: HashMap::new(),
            failed: BTreeSet::new(),
            reports,
            changes,
            permits: Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES)),
            next_generation: 0,
            counts,
        }
    }

    /// Probes exactly `targets` from now on: starts the new ones (in rotation until their
    /// probes say otherwise), stops the ones gone, and starts afresh those whose check changed.
    /// An endpoint that stops being probed is forgotten, failed or not, and a probe in flight
    /// for it is dropped with its result. Returns whether that took an endpoint out of the
    /// failed set.
    pub fn set_targets<'a>(&mut self, targets: impl IntoIterator<Item = &'a ProbeTarget>) -> bool {
        let wanted: HashMap<&ProbedEndpoint, &HealthCheck> = targets
            .into_iter()
            .map(|target| (&target.endpoint, &target.check))
            .collect();
        let stopped: Vec<ProbedEndpoint> = self
            .running
            .iter()
            .filter(|(endpoint, running)| wanted.get(endpoint) != Some(&&running.check))
            .map(|(endpoint, _)| endpoint.clone())
            .collect();
        let mut forgot = false;
        for endpoint in stopped {
            if let Some(running) = self.running.remove(&endpoint) {
                running.task.abort();
            }
            forgot |= self.failed.remove(&endpoint);
        }
        for (endpoint, check) in wanted {
            if self.running.contains_key(endpoint) {
                continue;
            }
            self.next_generation += 1;
            let target = ProbeTarget {
                endpoint: endpoint.clone(),
                check: check.clone(),
            };
            let task = tokio::spawn(probe_forever(
                target,
                self.next_generation,
                self.permits.clone(),
                self.reports.clone(),
                self.counts.clone(),
            ));
            self.running.insert(
                endpoint.clone(),
                Running {
                    check: check.clone(),
                    generation: self.next_generation,
                    task,
                },
            );
        }
        forgot
    }

    /// The next endpoint that failed or passed again, already applied to [`Self::failed`].
    /// Cancel-safe (for `select!`): a change is taken from the queue and applied without
    /// waiting in between.
    pub async fn next_change(&mut self) -> Change {
        loop {
            let Some(change) = self.changes.recv().await else {
                // Unreachable while `self.reports` lives; never wake the caller for nothing.
                return std::future::pending().await;
            };
            if let Some(change) = self.accept(change) {
                return change;
            }
        }
    }

    /// The changes that arrived since, without waiting: the caller takes them with the one
    /// [`Self::next_change`] gave, so that endpoints failing together cost one sync.
    pub fn pending_changes(&mut self) -> Vec<Change> {
        let mut pending = Vec::new();
        while let Ok(change) = self.changes.try_recv() {
            pending.extend(self.accept(change));
        }
        pending
    }

    /// A change of a probe still running (not one of a stopped probe's), recorded.
    fn accept(&mut self, change: Change) -> Option<Change> {
        let current = self
            .running
            .get(&change.endpoint)
            .is_some_and(|running| running.generation == change.generation);
        if !current {
            return None;
        }
        if change.failed {
            self.failed.insert(change.endpoint.clone());
        } else {
            self.failed.remove(&change.endpoint);
        }
        Some(change)
    }

    /// The endpoints whose probes failed them and have not passed since.
    pub fn failed(&self) -> &BTreeSet<ProbedEndpoint> {
        &self.failed
    }

    /// Every probed Service (namespace, name) with how many of its endpoints are failed.
    pub fn failed_by_service(&self) -> std::collections::BTreeMap<(String, String), usize> {
        let mut counts = std::collections::BTreeMap::new();
        for endpoint in self.running.keys() {
            let failed = usize::from(self.failed.contains(endpoint));
            *counts
                .entry((endpoint.namespace.clone(), endpoint.name.clone()))
                .or_default() += failed;
        }
        counts
    }

    /// How many endpoints are probed.
    pub fn probed(&self) -> usize {
        self.running.len()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        for running in self.running.values() {
            running.task.abort();
        }
    }
}

/// Probes one endpoint every interval until aborted, and reports when it fails or passes again.
async fn probe_forever(
    target: ProbeTarget,
    generation: u64,
    permits: Arc<Semaphore>,
    reports: mpsc::UnboundedSender<Change>,
    counts: ProbeCounts,
) {
    let ProbeTarget { endpoint, check } = target;
    let addr = SocketAddr::new(endpoint.addr, endpoint.port);
    let mut ticks = tokio::time::interval(check.interval);
    // A probe that waited for a permit does not make the next ones come in a burst.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streak = Streak::default();
    let label = |result: &str| {
        [
            ("namespace", endpoint.namespace.clone()),
            ("service", endpoint.name.clone()),
            ("result", result.to_owned()),
        ]
    };
    loop {
        ticks.tick().await;
        let result = {
            // Never closed: the semaphore lives as long as the Prober that aborts this task.
            let Ok(_permit) = permits.acquire().await else {
                return;
            };
            probe(addr, &check.probe, check.timeout).await
        };
        let passed = result.is_ok();
        counts
            .get_or_create(&label(if passed { "passed" } else { "failed" }))
            .inc();
        if let Some(failed) = streak.record(passed, &check) {
            let change = Change {
                endpoint: endpoint.clone(),
                failed,
                detail: result.err().unwrap_or_else(|| "passed".to_owned()),
                probes: if failed {
                    check.failure_threshold
                } else {
                    check.success_threshold
                },
                generation,
            };
            // The receiver goes only with the Prober, which aborts this task first.
            if reports.send(change).is_err() {
                return;
            }
        }
    }
}

/// One probe of `addr`: a TCP connect, and for HTTP a GET of the path whose status is 200-399;
/// the whole of it within `timeout`. The error says what went wrong.
pub async fn probe(addr: SocketAddr, probe: &Probe, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|error| format!("connect: {error}"))?;
        match probe {
            Probe::Tcp => Ok(()),
            Probe::Http { path } => http_get(stream, addr, path).await,
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

async fn http_get(mut stream: TcpStream, addr: SocketAddr, path: &str) -> Result<(), String> {
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: lb-health-check\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| format!("sending the request: {error}"))?;
    let mut answer = Vec::with_capacity(128);
    let mut buffer = [0_u8; 256];
    while !answer.contains(&b'\n') && answer.len() < MAX_STATUS_LINE {
        let read = stream
            .read(&mut buffer)
            .await
            .map_err(|error| format!("reading the answer: {error}"))?;
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..read]);
    }
    let status_line = String::from_utf8_lossy(&answer);
    let status_line = status_line.lines().next().unwrap_or_default();
    match http_status(status_line) {
        Some(status) if (200..400).contains(&status) => Ok(()),
        Some(status) => Err(format!("HTTP {status}")),
        None => Err(format!("not an HTTP status line: {status_line:?}")),
    }
}

/// The status code of an HTTP/1 status line (`HTTP/1.1 200 OK`).
fn http_status(line: &str) -> Option<u16> {
    let mut words = line.split_ascii_whitespace();
    let version = words.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    words.next()?.parse().ok().filter(|code| *code >= 100)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use tokio::net::TcpListener;

    use super::*;

    fn check(failures: u32, successes: u32) -> HealthCheck {
        HealthCheck {
            probe: Probe::Tcp,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(100),
            failure_threshold: failures,
            success_threshold: successes,
        }
    }

    /// The state changes a run of probe results gives: `p` passed, `f` failed; each change
    /// as `F` (failed) or `P` (passed again) at its probe, `.` elsewhere.
    fn changes(results: &str, check: &HealthCheck) -> String {
        let mut streak = Streak::default();
        results
            .chars()
            .map(|result| match streak.record(result == 'p', check) {
                Some(true) => 'F',
                Some(false) => 'P',
                None => '.',
            })
            .collect()
    }

    #[test]
    fn thresholds_count_probes_in_a_row() {
        let rows = [
            // (failure threshold, success threshold, results, changes)
            (2, 1, "ppp", "..."),
            (2, 1, "fpfpfp", "......"),
            (2, 1, "ffp", ".FP"),
            (2, 1, "fffffp", ".F...P"),
            (1, 1, "fpfp", "FPFP"),
            (3, 2, "ffpfffpfpp", ".....F...P"),
            (2, 3, "ffppfppp", ".F.....P"),
        ];
        for (failures, successes, results, expected) in rows {
            assert_eq!(
                changes(results, &check(failures, successes)),
                expected,
                "failure threshold {failures}, success threshold {successes}: {results}"
            );
        }
    }

    #[test]
    fn http_status_lines() {
        assert_eq!(http_status("HTTP/1.1 200 OK"), Some(200));
        assert_eq!(http_status("HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(http_status("HTTP/1.1 302"), Some(302));
        assert_eq!(http_status("SSH-2.0-OpenSSH"), None);
        assert_eq!(http_status("HTTP/1.1 abc"), None);
        assert_eq!(http_status(""), None);
    }

    /// An HTTP server on loopback answering every request with `status`.
    async fn http_server(status: &'static str) -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0_u8; 512];
                let _ = stream.read(&mut request).await;
                let _ = stream
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        addr
    }

    /// A loopback port nothing listens on.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        listener.local_addr().unwrap()
    }

    #[tokio::test]
    async fn probes_pass_and_fail_as_the_endpoint_answers() {
        let timeout = Duration::from_secs(2);
        let http = |path: &str| Probe::Http {
            path: path.to_owned(),
        };
        let ok = http_server("200 OK").await;
        assert_eq!(probe(ok, &Probe::Tcp, timeout).await, Ok(()));
        assert_eq!(probe(ok, &http("/healthz"), timeout).await, Ok(()));
        let unavailable = http_server("503 Service Unavailable").await;
        assert_eq!(probe(unavailable, &Probe::Tcp, timeout).await, Ok(()));
        assert_eq!(
            probe(unavailable, &http("/"), timeout).await,
            Err("HTTP 503".to_owned())
        );
        let closed = closed_port().await;
        let refused = probe(closed, &Probe::Tcp, timeout).await.unwrap_err();
        assert!(refused.starts_with("connect: "), "{refused}");
        // A listener that never answers an HTTP request: the timeout ends the probe.
        let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let short = Duration::from_millis(200);
        assert_eq!(
            probe(silent.local_addr().unwrap(), &http("/"), short).await,
            Err("no answer within 200ms".to_owned())
        );
    }

    fn target(addr: SocketAddr, check: HealthCheck) -> ProbeTarget {
        ProbeTarget {
            endpoint: ProbedEndpoint {
                namespace: "default".into(),
                name: "web".into(),
                addr: addr.ip(),
                port: addr.port(),
            },
            check,
        }
    }

    #[tokio::test]
    async fn the_prober_reports_an_endpoint_that_fails_and_forgets_one_no_longer_probed() {
        let counts = ProbeCounts::default();
        let mut prober = Prober::new(counts.clone());
        let closed = target(closed_port().await, check(2, 1));
        let ok = target(http_server("200 OK").await, check(2, 1));
        assert!(!prober.set_targets([&closed, &ok]));
        assert_eq!(prober.probed(), 2);
        let change = tokio::time::timeout(Duration::from_secs(10), prober.next_change())
            .await
            .expect("a change within 10 s");
        assert_eq!(change.endpoint, closed.endpoint);
        assert!(change.failed && change.probes == 2, "{change:?}");
        assert!(change.detail.starts_with("connect: "), "{change:?}");
        assert_eq!(prober.failed(), &[closed.endpoint.clone()].into());
        let failed = [
            ("namespace", "default".to_owned()),
            ("service", "web".to_owned()),
            ("result", "failed".to_owned()),
        ];
        assert!(counts.get_or_create(&failed).get() >= 2);

        // The same targets again change nothing; without the failed one, it is forgotten.
        assert!(!prober.set_targets([&closed, &ok]));
        assert!(prober.set_targets([&ok]));
        assert!(prober.failed().is_empty());
        assert_eq!(prober.probed(), 1);
        // A changed check starts afresh: the endpoint is in rotation until it fails again.
        let mut stricter = closed.clone();
        stricter.check.failure_threshold = 1;
        assert!(!prober.set_targets([&ok, &closed]));
        let change = tokio::time::timeout(Duration::from_secs(10), prober.next_change())
            .await
            .expect("a change within 10 s");
        assert!(change.failed && change.probes == 2, "{change:?}");
        assert!(prober.set_targets([&ok, &stricter]));
        let change = tokio::time::timeout(Duration::from_secs(10), prober.next_change())
            .await
            .expect("a change within 10 s");
        assert!(change.failed && change.probes == 1, "{change:?}");
        assert_eq!(
            prober.failed().iter().map(|e| e.addr).collect::<Vec<_>>(),
            [IpAddr::from(Ipv4Addr::LOCALHOST)]
        );
    }
}
