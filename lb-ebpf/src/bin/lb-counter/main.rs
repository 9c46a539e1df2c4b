//! The XDP packet counter, an object of its own: it shares no map with the datapath, and loading
//! it must never create (or pin) the datapath's maps.
#![no_std]
#![no_main]

mod counter;

lb_ebpf::object_essentials!();
