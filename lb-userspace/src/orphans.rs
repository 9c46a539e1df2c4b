//! EndpointSlices whose Service is missing are reported only when that lasts.
//!
//! Services and EndpointSlices arrive on separate watches, so a new slice can reach the agent
//! before its Service, and a deleted Service's slices stay until the garbage collector removes
//! them (a second later, under load more). compile reports every slice without its Service
//! (`ServiceNotFound`) on every sync; [`OrphanSlices`] holds each report back until the Service
//! has been missing for the grace period (`--missing-service-grace`), and drops the reports of
//! a Service the agent saw deleted altogether: its slices are the garbage collector's to remove,
//! not a mistake of their author's.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Service;

use crate::{
    compile::{SERVICE_NAME_LABEL, model::Problem},
    source::Snapshot,
};

/// compile's reason for a slice whose Service does not exist.
pub const SERVICE_NOT_FOUND: &str = "ServiceNotFound";

/// How long a slice's Service may be missing before the slice is reported, unless set.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// (namespace, name).
type Key = (String, String);

/// See the module documentation.
pub struct OrphanSlices {
    grace: Duration,
    /// Slices without their Service, by (namespace, slice name): since when.
    since: HashMap<Key, Instant>,
    /// Services the agent saw deleted whose slices are still there: (namespace, Service name).
    deleted: BTreeSet<Key>,
    /// The Services of the previous call's snapshot.
    previous: Vec<Arc<Service>>,
    /// The previous call's time: reports due by then were released.
    last: Option<Instant>,
}

impl OrphanSlices {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            since: HashMap::new(),
            deleted: BTreeSet::new(),
            previous: Vec::new(),
            last: None,
        }
    }

    /// `problems` (compile's, for `snapshot`) without the `ServiceNotFound` reports that are
    /// held back: slices whose Service has been missing for less than the grace period, and
    /// slices of a Service deleted since an earlier snapshot.
    pub fn filter(
        &mut self,
        problems: &[Problem],
        snapshot: &Snapshot,
        now: Instant,
    ) -> Vec<Problem> {
        let previous = std::mem::replace(&mut self.previous, snapshot.services.clone());
        self.last = Some(now);
        let orphans: Vec<&Problem> = problems.iter().filter(|p| is_orphan(p)).collect();
        if orphans.is_empty() {
            self.since.clear();
            self.deleted.clear();
            return problems.to_vec();
        }
        let existed: HashSet<(&str, &str)> = previous.iter().map(|s| names(&s.metadata)).collect();
        let mut since = HashMap::with_capacity(orphans.len());
        let mut deleted = BTreeSet::new();
        let mut held: HashSet<(&str, &str)> = HashSet::new();
        for problem in orphans {
            let slice = (problem.namespace.as_str(), problem.name.as_str());
            let Some(service) = slice_service(snapshot, slice) else {
                continue;
            };
            let service_key = (problem.namespace.clone(), service.to_owned());
            if self.deleted.contains(&service_key)
                || existed.contains(&(problem.namespace.as_str(), service))
            {
                deleted.insert(service_key);
                held.insert(slice);
                continue;
            }
            let key = (problem.namespace.clone(), problem.name.clone());
            let first = self.since.get(&key).copied().unwrap_or(now);
            if now.saturating_duration_since(first) < self.grace {
                held.insert(slice);
            }
            since.insert(key, first);
        }
        self.since = since;
        self.deleted = deleted;
        problems
            .iter()
            .filter(|p| !(is_orphan(p) && held.contains(&(p.namespace.as_str(), p.name.as_str()))))
            .cloned()
            .collect()
    }

    /// When the next held report comes due (the agent checks again then, without a change).
    pub fn next_due(&self) -> Option<Instant> {
        let last = self.last?;
        self.since
            .values()
            .map(|since| *since + self.grace)
            .filter(|due| *due > last)
            .min()
    }
}

fn is_orphan(problem: &Problem) -> bool {
    problem.kind == "EndpointSlice" && problem.reason == SERVICE_NOT_FOUND
}

fn names(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (&str, &str) {
    (
        metadata.namespace.as_deref().unwrap_or("default"),
        metadata.name.as_deref().unwrap_or_default(),
    )
}

/// The Service a slice of the snapshot names.
fn slice_service<'a>(snapshot: &'a Snapshot, (namespace, name): (&str, &str)) -> Option<&'a str> {
    snapshot
        .endpoint_slices
        .iter()
        .find(|slice| names(&slice.metadata) == (namespace, name))?
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::discovery::v1::EndpointSlice, apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;
    use crate::compile::{compile, model::NodeContext};

    const GRACE: Duration = Duration::from_secs(5);

    fn service(name: &str) -> Arc<Service> {
        Arc::new(Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..ObjectMeta::default()
            },
            ..Service::default()
        })
    }

    fn slice(name: &str, service: &str) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                labels: Some(BTreeMap::from([(
                    SERVICE_NAME_LABEL.to_owned(),
                    service.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            ..EndpointSlice::default()
        })
    }

    fn snapshot(services: &[&str], slices: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            services: services.iter().map(|name| service(name)).collect(),
            endpoint_slices: slices.iter().map(|(name, svc)| slice(name, svc)).collect(),
            node: None,
            ..Default::default()
        }
    }

    /// The reported slice names, through compile's real problems.
    fn reported(orphans: &mut OrphanSlices, snapshot: &Snapshot, now: Instant) -> Vec<String> {
        let (_, problems) = compile(snapshot, &NodeContext::new("node-a"));
        orphans
            .filter(&problems, snapshot, now)
            .into_iter()
            .filter(is_orphan)
            .map(|p| p.name)
            .collect()
    }

    #[test]
    fn a_slice_before_its_service_is_not_reported() {
        let mut orphans = OrphanSlices::new(GRACE);
        let start = Instant::now();
        let early = snapshot(&[], &[("web-1", "web")]);
        assert!(reported(&mut orphans, &early, start).is_empty());
        assert_eq!(orphans.next_due(), Some(start + GRACE));
        let complete = snapshot(&["web"], &[("web-1", "web")]);
        assert!(reported(&mut orphans, &complete, start + Duration::from_secs(1)).is_empty());
        assert_eq!(orphans.next_due(), None);
    }

    #[test]
    fn a_slice_whose_service_never_comes_is_reported_after_the_grace_period() {
        let mut orphans = OrphanSlices::new(GRACE);
        let start = Instant::now();
        let lone = snapshot(&["api"], &[("web-1", "web")]);
        assert!(reported(&mut orphans, &lone, start).is_empty());
        assert!(reported(&mut orphans, &lone, start + GRACE / 2).is_empty());
        assert_eq!(reported(&mut orphans, &lone, start + GRACE), ["web-1"]);
        assert_eq!(orphans.next_due(), None);
    }

    #[test]
    fn the_slices_of_a_deleted_service_are_never_reported() {
        let mut orphans = OrphanSlices::new(GRACE);
        let start = Instant::now();
        let before = snapshot(&["web"], &[("web-1", "web"), ("web-2", "web")]);
        assert!(reported(&mut orphans, &before, start).is_empty());
        let deleted = snapshot(&[], &[("web-1", "web"), ("web-2", "web")]);
        for later in [0, 1, 60] {
            assert!(
                reported(&mut orphans, &deleted, start + Duration::from_secs(later)).is_empty()
            );
        }
        assert_eq!(orphans.next_due(), None);
        // Collected at last; a new slice of that name later is a new case.
        let collected = snapshot(&[], &[]);
        assert!(reported(&mut orphans, &collected, start + GRACE * 20).is_empty());
        let stray = snapshot(&[], &[("web-3", "web")]);
        let then = start + GRACE * 21;
        assert!(reported(&mut orphans, &stray, then).is_empty());
        assert_eq!(reported(&mut orphans, &stray, then + GRACE), ["web-3"]);
    }

    #[test]
    fn other_problems_pass_through() {
        let mut orphans = OrphanSlices::new(GRACE);
        let problem = Problem {
            severity: crate::compile::model::Severity::Invalid,
            kind: "Service",
            namespace: "default".into(),
            name: "web".into(),
            reason: "InvalidClusterIP",
            message: String::new(),
        };
        let kept = orphans.filter(
            std::slice::from_ref(&problem),
            &Snapshot::default(),
            Instant::now(),
        );
        assert_eq!(kept, [problem]);
    }
}
