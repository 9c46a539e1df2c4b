//! The monitor control cell (`lb_monctl_v1`, [`MonitorControl`]): `lb monitor` claims it when it
//! starts, beats in it every [`HEARTBEAT_EVERY`] and clears it when it exits; the agent clears a
//! cell whose heartbeat is older than [`ABANDONED_AFTER`] (a monitor killed, or stopped), so that
//! the programs stop reporting to nobody. A heartbeat on CLOCK_MONOTONIC instead of a process
//! id: the monitor may run in another pid namespace than the agent (on the host, or through
//! `kubectl exec`), the clock is the node's.

use std::{path::Path, time::Duration};

use aya::maps::{Array, MapData};
use lb_common::{map_names, monitor::MonitorControl};

use super::{
    bpf_obj::Access,
    error::{DatapathError, Result, map_error},
    maps::open_map,
};

/// How often a running monitor writes its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A heartbeat older than this is an abandoned monitor's.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(10);

/// The cell, opened read-write from the pin directory.
pub struct MonitorControlCell(Array<MapData, MonitorControl>);

/// Who a monitor is: a random token (pids repeat across pid namespaces) and its pid, for
/// messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub token: u64,
    pub pid: u32,
}

impl Owner {
    /// This process, with a token of its own.
    pub fn this_process() -> Result<Self> {
        let mut token = 0u64;
        while token == 0 {
            let mut bytes = [0u8; 8];
            // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
            let read = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
            if read != bytes.len() as isize {
                return Err(DatapathError::Invalid(format!(
                    "getrandom: {}",
                    std::io::Error::last_os_error()
                )));
            }
            token = u64::from_ne_bytes(bytes);
        }
        Ok(Self {
            token,
            pid: std::process::id(),
        })
    }
}

/// What claiming the cell found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// It is this monitor's now, since this CLOCK_MONOTONIC time: events from before are an
    /// earlier monitor's.
    Claimed { since_ns: u64 },
    /// Another monitor holds it (its pid, in its own pid namespace) and beats.
    Held { pid: u32 },
}

impl MonitorControlCell {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        open_map(pin_dir, map_names::MONITOR_CONTROL, Access::ReadWrite).map(Self)
    }

    pub fn read(&self) -> Result<MonitorControl> {
        self.0
            .get(&0, 0)
            .map_err(|source| map_error(map_names::MONITOR_CONTROL, "read", source))
    }

    fn write(&mut self, control: &MonitorControl) -> Result<()> {
        self.0
            .set(0, control, 0)
            .map_err(|source| map_error(map_names::MONITOR_CONTROL, "write", source))
    }

    /// Turns the programs' reports of `kinds` on for `owner`, unless another live monitor
    /// holds the cell (monitors share one ring buffer: a second would take events from the
    /// first).
    pub fn claim(&mut self, kinds: u32, sample_one_in: u32, owner: Owner) -> Result<Claim> {
        let current = self.read()?;
        let now = now_ns()?;
        if current.owner_token != 0
            && current.owner_token != owner.token
            && !abandoned(&current, now)
        {
            return Ok(Claim::Held {
                pid: current.owner_pid,
            });
        }
        self.write(&MonitorControl {
            kinds,
            sample_one_in,
            owner_pid: owner.pid,
            _pad: 0,
            heartbeat_ns: now,
            owner_token: owner.token,
        })?;
        Ok(Claim::Claimed { since_ns: now })
    }

    /// `owner` is alive: its heartbeat, or its whole cell again when the agent cleared it
    /// meanwhile (the monitor was stopped for longer than [`ABANDONED_AFTER`]). False when
    /// another monitor holds the cell now.
    pub fn beat(&mut self, kinds: u32, sample_one_in: u32, owner: Owner) -> Result<bool> {
        let current = self.read()?;
        if current.owner_token != 0 && current.owner_token != owner.token {
            return Ok(false);
        }
        self.claim(kinds, sample_one_in, owner)
            .map(|claim| matches!(claim, Claim::Claimed { .. }))
    }

    /// Turns every report off, if the cell is still `owner`'s.
    pub fn release(&mut self, owner: Owner) -> Result<()> {
        if self.read()?.owner_token == owner.token {
            self.write(&MonitorControl::default())?;
        }
        Ok(())
    }

    /// Clears the cell of a monitor that stopped beating; returns its pid. (A monitor claiming
    /// the cell between this read and write loses its claim until its next beat, a second
    /// later, which claims it again.)
    pub fn release_abandoned(&mut self) -> Result<Option<u32>> {
        let current = self.read()?;
        if current == MonitorControl::default() {
            return Ok(None);
        }
        if !abandoned(&current, now_ns()?) {
            return Ok(None);
        }
        self.write(&MonitorControl::default())?;
        Ok(Some(current.owner_pid))
    }
}

fn abandoned(control: &MonitorControl, now: u64) -> bool {
    now.saturating_sub(control.heartbeat_ns) > ABANDONED_AFTER.as_nanos() as u64
}

/// CLOCK_MONOTONIC in nanoseconds, the node's clock whatever the pid namespace.
pub fn now_ns() -> Result<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, which lives for the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        return Err(DatapathError::Invalid(format!(
            "clock_gettime(CLOCK_MONOTONIC): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_monitor_is_abandoned_once_its_heartbeat_is_older_than_the_limit() {
        let beat_at = 5_000_000_000;
        let control = MonitorControl {
            kinds: 1,
            owner_pid: 42,
            heartbeat_ns: beat_at,
            ..MonitorControl::default()
        };
        let limit = ABANDONED_AFTER.as_nanos() as u64;
        assert!(!abandoned(&control, beat_at));
        assert!(!abandoned(&control, beat_at + limit));
        assert!(abandoned(&control, beat_at + limit + 1));
        // A heartbeat from the future (another clock) never counts as abandoned.
        assert!(!abandoned(&control, beat_at - 1));
    }
}
