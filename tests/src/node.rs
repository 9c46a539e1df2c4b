//! The datapath as a lab node runs it: XDP and tc egress on the node's fabric NIC, socket hooks
//! on a private cgroup (clients that should go through them are started inside it), and maps
//! pinned in a private bpffs directory. Everything is detached and removed on drop.

use aya::programs::XdpMode;
use lb_userspace::datapath::Datapath;

use crate::{
    lab::{Cgroup, Host, Lab, PinDir},
    topology::FABRIC_IFACE,
};

pub struct NodeDatapath {
    // Field order is drop order: close the datapath, unpin its links (which detaches them), then
    // remove the cgroup.
    pub datapath: Datapath,
    pins: PinDir,
    pub cgroup: Cgroup,
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
            datapath.attach_xdp(FABRIC_IFACE, XdpMode::Driver)?;
            datapath.attach_tc_egress(FABRIC_IFACE)?;
        }
        datapath.attach_cgroup(cgroup.path())?;
        Ok(Self {
            datapath,
            pins,
            cgroup,
        })
    }

    /// The private pin directory (maps, programs, links).
    pub fn pin_dir(&self) -> &std::path::Path {
        self.pins.path()
    }
}
