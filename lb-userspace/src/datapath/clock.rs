//! The programs' clock ([`JiffiesClock`]): calibrated at every load from samples of the kernel's
//! jiffies and coarse clock taken by `lb_clock_sample` through BPF_PROG_TEST_RUN, then written to
//! the object's `lb_clock_v1` before any program is attached.

use std::{
    os::fd::AsFd,
    time::{Duration, Instant},
};

use lb_common::{ClockSample, JiffiesClock};

use super::testrun::test_run;

/// How long a calibration may take: [`JiffiesClock::MIN_TICKS`] ticks are 120 ms at HZ 100.
const CALIBRATION_LIMIT: Duration = Duration::from_secs(2);
/// Between samples: a fifth of HZ 100's tick, so the wait past the last tick needed is short.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(2);

/// Calibrates the clock with the loaded `lb_clock_sample` program. Err: why not (the
/// programs then read the coarse-clock helper, as before a calibration).
pub(super) fn calibrate(sample_program: impl AsFd) -> Result<JiffiesClock, String> {
    let sample = || -> Result<ClockSample, String> {
        let output = test_run(sample_program.as_fd(), &[0u8; 64])
            .map_err(|error| format!("running the clock sample program: {error}"))?;
        parse(&output.packet).ok_or_else(|| "the clock sample program wrote no sample".into())
    };
    let started = Instant::now();
    let mut first = sample()?;
    while started.elapsed() < CALIBRATION_LIMIT {
        std::thread::sleep(SAMPLE_INTERVAL);
        let last = sample()?;
        if last.jiffies.saturating_sub(first.jiffies) < JiffiesClock::MIN_TICKS {
            continue;
        }
        if let Some(clock) = JiffiesClock::calibrate(first, last) {
            return Ok(clock);
        }
        // A pair that matches no HZ (a sample straddling a tick, or a clock step): again.
        first = last;
    }
    Err(format!(
        "no kernel HZ matches the jiffies and coarse clock samples of {CALIBRATION_LIMIT:?}"
    ))
}

fn parse(packet: &[u8]) -> Option<ClockSample> {
    let word = |at: usize| Some(u64::from_ne_bytes(packet.get(at..at + 8)?.try_into().ok()?));
    Some(ClockSample {
        jiffies: word(0)?,
        coarse_ns: word(8)?,
    })
}
