//! `lb_clock_sample`: run by the agent through BPF_PROG_TEST_RUN at every load, never attached.
//! It reads jiffies and the coarse clock in one run, for the calibration of the programs' clock
//! (`lb_common::JiffiesClock`).

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::ClockSample;
use lb_ebpf::packet::bytes_at_mut;

use crate::helpers::clock_sample;

/// Writes a [`ClockSample`] (native byte order) over the first bytes of the test packet.
#[xdp]
pub fn lb_clock_sample(ctx: XdpContext) -> u32 {
    let sample = clock_sample();
    if let Some(out) = bytes_at_mut::<{ size_of::<ClockSample>() }>(&ctx, 0) {
        out[..8].copy_from_slice(&sample.jiffies.to_ne_bytes());
        out[8..].copy_from_slice(&sample.coarse_ns.to_ne_bytes());
    }
    xdp_action::XDP_PASS
}
