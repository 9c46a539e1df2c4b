//! nftables rules in a lab host, for what a test must make the network lose.

use std::time::{Duration, Instant};

use crate::lab::Host;

/// A rule in a lab host that drops, and counts, the TCP SYNs it receives for one port: the
/// first SYN of a connection lost on its way to the endpoint, so that the client sends it
/// again. Its table lives in the host's namespace, which the test made and removes.
pub struct SynDrop<'a> {
    host: &'a Host,
}

impl<'a> SynDrop<'a> {
    const TABLE: &'static str = "lbtest_syndrop";

    pub fn new(host: &'a Host, port: u16) -> Self {
        let port = port.to_string();
        for command in [
            vec!["add", "table", "inet", Self::TABLE],
            vec![
                "add",
                "chain",
                "inet",
                Self::TABLE,
                "input",
                "{",
                "type",
                "filter",
                "hook",
                "input",
                "priority",
                "0",
                ";",
                "}",
            ],
            vec![
                "add",
                "rule",
                "inet",
                Self::TABLE,
                "input",
                "tcp",
                "dport",
                &port,
                "tcp",
                "flags",
                "&",
                "(syn",
                "|",
                "ack)",
                "==",
                "syn",
                "counter",
                "drop",
            ],
        ] {
            host.run("nft", &command).expect("nft");
        }
        Self { host }
    }

    /// The SYNs dropped so far.
    pub fn dropped(&self) -> u64 {
        let listing = self
            .host
            .run("nft", &["list", "table", "inet", Self::TABLE])
            .expect("nft list");
        let (_, after) = listing
            .split_once("counter packets ")
            .unwrap_or_else(|| panic!("no counter in {listing}"));
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().expect("packets")
    }

    /// Waits until the rule has dropped a SYN; panics after `timeout`.
    pub fn wait_for_one(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.dropped() == 0 {
            assert!(
                Instant::now() < deadline,
                "no SYN reached {} within {timeout:?}",
                self.host.name()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes the rule and returns how many SYNs it dropped.
    pub fn remove(&self) -> u64 {
        let dropped = self.dropped();
        self.host
            .run("nft", &["delete", "table", "inet", Self::TABLE])
            .expect("nft delete");
        dropped
    }
}
