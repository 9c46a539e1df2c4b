//! The datapath as a lab node runs it: XDP and tc egress on the node's fabric NIC, socket hooks
//! on a private cgroup (clients that should go through them are started inside it), and maps
//! pinned in a private bpffs directory. Everything is detached and removed on drop.

use std::ffi::CString;

use aya::programs::XdpMode;
use lb_userspace::datapath::Datapath;

use crate::{
    lab::{Cgroup, Host, Lab, PinDir},
    topology::FABRIC_IFACE,
};

pub struct NodeDatapath {
    // Field order is drop order: detach the programs, then remove the cgroup and the pins.
    pub datapath: Datapath,
    pub cgroup: Cgroup,
    _pins: PinDir,
}

impl NodeDatapath {
    /// Loads the datapath for `node` and attaches it to the node's fabric NIC (native XDP) and to
    /// a new cgroup named after the node.
    pub fn attach(lab: &Lab, node: &Host) -> anyhow::Result<Self> {
        let pins = PinDir::new(lab, node.name())?;
        let cgroup = Cgroup::new(lab, node.name())?;
        let mut datapath = Datapath::load(pins.path())?;
        {
            let _inside = node.enter()?;
            let iface = CString::new(FABRIC_IFACE)?;
            datapath.attach_xdp(iface.as_c_str(), XdpMode::Driver)?;
            datapath.attach_tc_egress(iface.as_c_str())?;
        }
        datapath.attach_cgroup(cgroup.path())?;
        Ok(Self {
            datapath,
            cgroup,
            _pins: pins,
        })
    }
}
