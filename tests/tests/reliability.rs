//! The reliability suite's rows at seconds each (`lab::soak` with `Scale::suite`; `cargo xtask
//! soak` runs the full durations): every fault under load in the lab against the real agent,
//! asserting each row's target but its time to converge, which is recorded and judged by
//! `cargo xtask soak` (a row that never converges still fails, at its wait's deadline). The Kubernetes rows read the tests' fake API server
//! (`lab::fake_apiserver`, a mock: no real API server can run here).

use std::sync::{Mutex, MutexGuard};

use lab::soak::{self, Row, Scale};

/// The rows run one at a time: each holds a steady load that must lose no request, and records
/// the agent's time to converge, which rows competing for the machine's two cores would starve.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    // A row that failed (panicked) leaves nothing shared behind: go on.
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[track_caller]
fn assert_met(row: &Row) {
    assert!(
        row.target_met,
        "{}: target not met:\n{}\n{row:#?}",
        row.fault,
        row.failures()
    );
}

#[test]
fn api_server_outage_keeps_traffic_and_the_changes_arrive_on_its_return() {
    let _serial = one_at_a_time();
    assert_met(&soak::api_outage(&Scale::suite()).expect("scenario"));
}

#[test]
fn agent_crash_loop_fails_no_request_and_leaks_nothing() {
    let _serial = one_at_a_time();
    assert_met(&soak::crash_loop(&Scale::suite()).expect("scenario"));
}

#[test]
fn endpoint_churn_fails_no_request_to_endpoints_that_stay() {
    let _serial = one_at_a_time();
    assert_met(&soak::endpoint_churn(&Scale::suite()).expect("scenario"));
}

#[test]
fn rolling_update_with_external_traffic_policy_cluster_fails_no_request() {
    let _serial = one_at_a_time();
    assert_met(&soak::rolling_update(&Scale::suite(), "Cluster").expect("scenario"));
}

#[test]
fn rolling_update_with_external_traffic_policy_local_fails_no_request() {
    let _serial = one_at_a_time();
    assert_met(&soak::rolling_update(&Scale::suite(), "Local").expect("scenario"));
}

#[test]
fn snat_pressure_counts_the_refused_flows_and_misdelivers_none() {
    let _serial = one_at_a_time();
    assert_met(&soak::snat_pressure(&Scale::suite()).expect("scenario"));
}

#[test]
fn map_full_keeps_the_services_that_fit_and_reports_the_others() {
    let _serial = one_at_a_time();
    assert_met(&soak::map_full(&Scale::suite()).expect("scenario"));
}

#[test]
fn conntrack_pressure_keeps_established_flows_and_counts_every_syn() {
    let _serial = one_at_a_time();
    assert_met(&soak::conntrack_pressure(&Scale::suite()).expect("scenario"));
}

#[test]
fn an_agent_upgrade_onto_the_same_layout_keeps_established_flows() {
    let _serial = one_at_a_time();
    assert_met(&soak::upgrade_restart(&Scale::suite()).expect("scenario"));
}

#[test]
fn an_agent_upgrade_from_an_earlier_map_layout_migrates_and_keeps_established_flows() {
    let _serial = one_at_a_time();
    // The earlier release's agent is built on the first run (target/previous/), inside the
    // lock: no row measures while it builds.
    assert_met(
        &soak::upgrade_changed_layout(&Scale::suite(), lab::previous::DEFAULT_REV)
            .expect("scenario"),
    );
}
