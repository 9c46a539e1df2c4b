//! The lab: hosts made of network namespaces, wired with veth pairs and bridges, running real
//! servers and clients. Tests and the demo build their topologies with it.
//!
//! Rules it keeps so tests can run in parallel and never harm the machine:
//! - every namespace is named `<prefix>-<host>`, where the prefix `lbt<pid>x<n>` is unique to one
//!   [`Lab`]; interfaces are created directly inside those namespaces (`ip -n`), so none ever
//!   appears in the machine's own namespace;
//! - dropping the [`Lab`] (also while a test panics) kills every process inside its namespaces and
//!   deletes them; a namespace outlives `ip netns del` while a process is inside, hence the kill;
//! - a lab whose process died without unwinding (SIGKILL) is swept by the next [`Lab::new`]: the pid
//!   in the prefix tells whether its owner is still alive. Names of any other shape are never touched.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Read as _},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};

/// Namespaces this code creates start with this, followed by the owner's pid, `x` and a counter.
pub const NAME_PREFIX: &str = "lbt";

const NETNS_DIR: &str = "/run/netns";

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// One lab: a unique name prefix and the namespaces created under it.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
}

impl Lab {
    /// A new, empty lab. Needs root. Mounts bpffs when missing and sweeps labs of dead processes.
    pub fn new() -> anyhow::Result<Self> {
        ensure_root()?;
        lb_userspace::datapath::bpffs::ensure_mounted(Path::new(
            lb_userspace::datapath::bpffs::DEFAULT_MOUNT,
        ))?;
        sweep_dead_labs();
        let prefix = format!(
            "{NAME_PREFIX}{}x{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        Ok(Self {
            prefix,
            namespaces: Vec::new(),
        })
    }

    /// The prefix every name of this lab starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Names of the namespaces this lab created and still owns.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// A new host: a network namespace with loopback up, IPv6 off (no neighbour discovery noise
    /// in packet counts) and a TCP client setup that survives connect/request/close loops.
    pub fn host(&mut self, name: &str) -> anyhow::Result<Host> {
        let netns = format!("{}-{name}", self.prefix);
        ensure!(
            !self.namespaces.contains(&netns),
            "host {name} exists already in this lab"
        );
        ip(&["netns", "add", &netns])?;
        self.namespaces.push(netns.clone());
        let host = Host {
            name: name.to_owned(),
            netns,
        };
        host.ip(&["link", "set", "lo", "up"])?;
        host.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        host.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        // Without these, connect/request/close loops leave their ports in TIME_WAIT and later runs
        // get about 10x slower (docs/lab.md).
        host.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        host.sysctl("net.ipv4.ip_local_port_range", "10000 65000")?;
        Ok(host)
    }

    /// A veth pair with one end in each host, both up, created directly in the namespaces.
    pub fn veth(&self, a: &Host, a_if: &str, b: &Host, b_if: &str) -> anyhow::Result<()> {
        a.ip(&[
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.netns,
        ])?;
        a.ip(&["link", "set", a_if, "up"])?;
        b.ip(&["link", "set", b_if, "up"])?;
        // Like a wire: a veth passes a sender's CHECKSUM_PARTIAL on to the receiver, which then
        // never checks it, and an XDP program that rewrites such a packet and sends it on with
        // XDP_TX loses the "partial" mark, so the next hop drops it as corrupt. Real NICs finish
        // the checksum before the wire, so frames arrive with full checksums: same here.
        a.run("ethtool", &["-K", a_if, "tx", "off"])?;
        b.run("ethtool", &["-K", b_if, "tx", "off"])?;
        Ok(())
    }

    fn remove_namespace(netns: &str) -> anyhow::Result<()> {
        kill_processes_in(netns);
        ip(&["netns", "del", netns]).map(drop)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for netns in self.namespaces.drain(..).rev() {
            if let Err(err) = Self::remove_namespace(&netns) {
                eprintln!("lab: removing namespace {netns}: {err:#}");
            }
        }
    }
}

/// A host of the lab: a handle to one network namespace. Cheap to clone; the [`Lab`] owns the
/// namespace itself.
#[derive(Clone, Debug)]
pub struct Host {
    name: String,
    netns: String,
}

impl Host {
    /// The short name given to [`Lab::host`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's full name (`<prefix>-<name>`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// `ip -n <netns> <args>`; returns stdout.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", &self.netns];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Adds an address (CIDR notation) to an interface.
    pub fn addr(&self, iface: &str, cidr: &str) -> anyhow::Result<()> {
        self.ip(&["addr", "add", cidr, "dev", iface]).map(drop)
    }

    /// Turns IPv6 on in this namespace, for the interfaces there and those to come ([`Lab::host`]
    /// turns it off), without duplicate address detection: the link-local addresses of new
    /// interfaces would be tentative for a second, and the lab's addresses are unique by
    /// construction.
    pub fn enable_ipv6(&self) -> anyhow::Result<()> {
        for scope in ["default", "all"] {
            self.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
            self.sysctl(&format!("net.ipv6.conf.{scope}.disable_ipv6"), "0")?;
        }
        Ok(())
    }

    /// Adds an IPv6 address without duplicate address detection: usable at once, not tentative
    /// for the second or so DAD takes (the lab's addresses are unique by construction).
    pub fn addr6(&self, iface: &str, cidr: &str) -> anyhow::Result<()> {
        self.ip(&["addr", "add", cidr, "dev", iface, "nodad"])
            .map(drop)
    }

    /// Adds a route, e.g. `route(&["10.244.2.0/24", "via", "203.0.113.2"])`.
    pub fn route(&self, spec: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["route", "add"];
        args.extend_from_slice(spec);
        self.ip(&args).map(drop)
    }

    /// A bridge, up, to which [`Host::enslave`] adds ports.
    pub fn bridge(&self, name: &str) -> anyhow::Result<()> {
        self.ip(&["link", "add", name, "type", "bridge"])?;
        self.ip(&["link", "set", name, "up"]).map(drop)
    }

    /// Makes `iface` a port of `bridge`.
    pub fn enslave(&self, iface: &str, bridge: &str) -> anyhow::Result<()> {
        self.ip(&["link", "set", iface, "master", bridge]).map(drop)
    }

    /// Sets a sysctl inside this namespace (net.* sysctls are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let _inside = self.enter()?;
        std::fs::write(&path, value).with_context(|| format!("{} = {value} in {}", key, self.netns))
    }

    /// The interface index of `iface` in this namespace.
    pub fn ifindex(&self, iface: &str) -> anyhow::Result<u32> {
        let _inside = self.enter()?;
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: name is a NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(index != 0, "no interface {iface} in {}", self.netns);
        Ok(index)
    }

    /// One of an interface's driver counters as `ethtool -S` shows it (e.g. a veth's
    /// `rx_queue_0_xdp_packets`).
    pub fn nic_stat(&self, iface: &str, name: &str) -> anyhow::Result<u64> {
        let stats = self.run("ethtool", &["-S", iface])?;
        stats
            .lines()
            .filter_map(|line| line.trim().split_once(':'))
            .find(|(key, _)| *key == name)
            .and_then(|(_, value)| value.trim().parse().ok())
            .ok_or_else(|| anyhow!("no {name} for {iface}: {stats}"))
    }

    /// The MAC address of an interface.
    pub fn mac(&self, iface: &str) -> anyhow::Result<[u8; 6]> {
        let json = self.ip(&["-j", "link", "show", "dev", iface])?;
        let value: serde_json::Value = serde_json::from_str(&json)?;
        let text = value[0]["address"]
            .as_str()
            .ok_or_else(|| anyhow!("no MAC for {iface}: {json}"))?;
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(text.split(':')) {
            *byte = u8::from_str_radix(part, 16)?;
        }
        Ok(mac)
    }

    /// Received and transmitted packet counts of an interface, as the kernel counts them.
    pub fn link_stats(&self, iface: &str) -> anyhow::Result<LinkStats> {
        let json = self.ip(&["-s", "-j", "link", "show", "dev", iface])?;
        let value: serde_json::Value = serde_json::from_str(&json)?;
        let stats = &value[0]["stats64"];
        let field = |dir: &str, name: &str| {
            stats[dir][name]
                .as_u64()
                .ok_or_else(|| anyhow!("no stats64.{dir}.{name} for {iface}: {json}"))
        };
        Ok(LinkStats {
            rx_packets: field("rx", "packets")?,
            rx_bytes: field("rx", "bytes")?,
            tx_packets: field("tx", "packets")?,
        })
    }

    /// Moves the calling thread into this namespace until the guard drops. Use it for calls that
    /// resolve names or create sockets in "the current namespace" (e.g. attaching XDP by name).
    /// Only the calling thread moves; others are unaffected.
    pub fn enter(&self) -> anyhow::Result<NetnsGuard> {
        let original = File::open("/proc/thread-self/ns/net").context("opening own netns")?;
        let target = self.open_netns()?;
        setns(&target).with_context(|| format!("entering {}", self.netns))?;
        Ok(NetnsGuard {
            original: original.into(),
        })
    }

    /// Runs a program inside this namespace to completion and returns its stdout; fails with its
    /// stderr when it exits non-zero.
    pub fn run(&self, program: impl AsRef<Path>, args: &[&str]) -> anyhow::Result<String> {
        let output = self.output(program.as_ref(), args)?;
        if !output.status.success() {
            bail!(
                "{} {args:?} in {} failed: {}\n{}",
                program.as_ref().display(),
                self.netns,
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Runs a program inside this namespace to completion and returns its exit status, stdout
    /// and stderr, whatever the status.
    pub fn output(
        &self,
        program: impl AsRef<Path>,
        args: &[&str],
    ) -> anyhow::Result<std::process::Output> {
        let mut command = Command::new(program.as_ref());
        command.args(args);
        self.prepare(&mut command, None)?
            .output()
            .with_context(|| format!("running {command:?} in {}", self.netns))
    }

    /// Starts a long-running program in this namespace (optionally inside a cgroup, joined before
    /// the program's first instruction) and waits until it prints its first line (servers print
    /// when they are ready). The process is killed when the returned guard drops.
    pub fn spawn(
        &self,
        program: impl AsRef<Path>,
        args: &[&str],
        cgroup: Option<&Cgroup>,
    ) -> anyhow::Result<Proc> {
        let mut command = Command::new(program.as_ref());
        command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = self
            .prepare(&mut command, cgroup)?
            .spawn()
            .with_context(|| format!("starting {command:?} in {}", self.netns))?;
        let mut proc = Proc {
            child,
            stdout: None,
            description: format!("{command:?} in {}", self.netns),
        };
        proc.first_line()?;
        Ok(proc)
    }

    /// Starts a long-running program in this namespace (and `cgroup`, if any) with stdout and
    /// stderr appended to `log`, without waiting for anything. Killed when the guard drops.
    pub fn spawn_logged(
        &self,
        program: impl AsRef<Path>,
        args: &[&str],
        cgroup: Option<&Cgroup>,
        log: &Path,
    ) -> anyhow::Result<Proc> {
        let out = OpenOptions::new().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        let mut command = Command::new(program.as_ref());
        command.args(args).stdout(out).stderr(err);
        let child = self
            .prepare(&mut command, cgroup)?
            .spawn()
            .with_context(|| format!("starting {command:?} in {}", self.netns))?;
        Ok(Proc {
            child,
            stdout: None,
            description: format!("{command:?} in {}", self.netns),
        })
    }

    /// Like [`Host::run`], but inside `cgroup` (where socket hooks under test are attached).
    pub fn run_in_cgroup(
        &self,
        cgroup: &Cgroup,
        program: impl AsRef<Path>,
        args: &[&str],
    ) -> anyhow::Result<String> {
        let mut command = Command::new(program.as_ref());
        command.args(args);
        let output = self.prepare(&mut command, Some(cgroup))?.output()?;
        if !output.status.success() {
            bail!(
                "{command:?} in {} failed: {}\n{}",
                self.netns,
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Arranges for `command` to join the cgroup and then this namespace in the child, between
    /// fork and exec, so not a single packet of it leaves from the machine's own namespace.
    fn prepare<'c>(
        &self,
        command: &'c mut Command,
        cgroup: Option<&Cgroup>,
    ) -> anyhow::Result<&'c mut Command> {
        let netns: OwnedFd = self.open_netns()?.into();
        let procs: Option<OwnedFd> = cgroup
            .map(|cgroup| {
                let path = cgroup.path.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))
            })
            .transpose()?
            .map(Into::into);
        // SAFETY: the closure only makes async-signal-safe system calls (write, setns) on file
        // descriptors it owns; it allocates nothing and takes no locks.
        unsafe {
            command.pre_exec(move || {
                if let Some(procs) = &procs {
                    // "0" means the writing process itself (Documentation/admin-guide/cgroup-v2.rst).
                    if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        Ok(command)
    }

    fn open_netns(&self) -> anyhow::Result<File> {
        let path = Path::new(NETNS_DIR).join(&self.netns);
        File::open(&path).with_context(|| format!("opening {}", path.display()))
    }
}

/// Packet counters of one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
}

/// The 1-, 5- and 15-minute load averages, for a bench's report of how busy the machine was.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Returns the calling thread to the namespace it came from when dropped.
pub struct NetnsGuard {
    original: OwnedFd,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // Failing to return would leave a test thread in a lab namespace: nothing sane follows.
        if let Err(err) = setns(&self.original) {
            panic!("returning to the original network namespace: {err}");
        }
    }
}

fn setns(fd: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
    // SAFETY: fd is an open namespace file; setns only changes this thread's network namespace.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A process started by [`Host::spawn`]; killed and reaped on drop.
pub struct Proc {
    child: Child,
    stdout: Option<BufReader<ChildStdout>>,
    description: String,
}

impl Proc {
    /// The process id (e.g. to move it or check where it runs).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn first_line(&mut self) -> anyhow::Result<String> {
        let stdout = self.child.stdout.take().context("stdout is piped")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.is_empty() {
            let mut stderr = String::new();
            if let Some(mut err) = self.child.stderr.take() {
                err.read_to_string(&mut stderr)?;
            }
            bail!("{} exited before it was ready: {stderr}", self.description);
        }
        self.stdout = Some(reader);
        Ok(line)
    }

    /// Stops the process (SIGTERM), waits up to `grace` for it to exit and returns the rest of its
    /// stdout; kills it if it does not exit in time.
    pub fn stop(mut self, grace: Duration) -> anyhow::Result<String> {
        // SAFETY: kill on the pid of our own, not yet reaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                self.child.kill()?;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut rest = String::new();
        if let Some(stdout) = self.stdout.as_mut() {
            stdout.read_to_string(&mut rest)?;
        }
        Ok(rest)
    }
}

impl Proc {
    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Already exited (e.g. after stop) is fine: kill on a reaped child is a no-op error.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private cgroup v2 for one test, where socket hooks under test attach instead of the root.
/// Processes started with [`Host::spawn`] / [`Host::run_in_cgroup`] join it before they exec.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 mount>/<lab prefix>-<name>`.
    pub fn new(lab: &Lab, name: &str) -> anyhow::Result<Self> {
        let path = cgroup2_mount()?.join(format!("{}-{name}", lab.prefix()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// The cgroup's directory, the path programs attach to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A cgroup inside this one (programs attached here apply to it too); drop it first.
    pub fn child(&self, name: &str) -> anyhow::Result<Self> {
        let path = self.path.join(name);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        kill_pids(&read_pids(&self.path.join("cgroup.procs")));
        // rmdir fails while a killed process is still exiting; give it a moment.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("lab: could not remove cgroup {}", self.path.display());
    }
}

/// A scratch directory for one test's files (manifests, logs): `<tmp>/<prefix>-<name>`, removed
/// on drop.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new(lab: &Lab, name: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{}-{name}", lab.prefix()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Waits until `log` holds at least `count` lines containing `needle`; returns those lines.
pub fn wait_for_log(
    log: &Path,
    needle: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_owned)
            .collect();
        if lines.len() >= count {
            return Ok(lines);
        }
        if Instant::now() > deadline {
            bail!(
                "{} has {} of {count} lines with {needle:?} after {timeout:?}:\n{text}",
                log.display(),
                lines.len()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A private bpffs directory for one test's pinned maps and programs: `/sys/fs/bpf/<prefix>-<name>`,
/// removed with everything in it on drop. Tests never use the agent's own pin directory.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(lab: &Lab, name: &str) -> anyhow::Result<Self> {
        let path = Path::new(lb_userspace::datapath::bpffs::DEFAULT_MOUNT)
            .join(format!("{}-{name}", lab.prefix()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Gone already is fine: `lb run --cleanup` under test removes it.
        if let Err(err) = std::fs::remove_dir_all(&self.path)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("lab: removing {}: {err}", self.path.display());
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid
/// systems like ours).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _device = fields.next()?;
            let mount_point = fields.next()?;
            (fields.next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .next()
        .ok_or_else(|| anyhow!("no cgroup2 filesystem mounted"))
}

fn read_pids(procs_file: &Path) -> Vec<i32> {
    std::fs::read_to_string(procs_file)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

fn kill_pids(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: plain kill(2); a pid that exited meanwhile gives ESRCH, which is fine.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Kills every process inside `netns` and waits (briefly) until none is left, so the namespace
/// really goes away when its name is deleted.
fn kill_processes_in(netns: &str) {
    for _ in 0..100 {
        let own_pid = std::process::id() as i32;
        let pids: Vec<i32> = ip(&["netns", "pids", netns])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .filter(|&pid| pid != own_pid)
            .collect();
        if pids.is_empty() {
            return;
        }
        kill_pids(&pids);
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("lab: processes still inside {netns} after SIGKILL");
}

/// Deletes namespaces, scratch directories, pin directories and cgroups left by labs whose
/// process is gone (killed without unwinding).
fn sweep_dead_labs() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if let Some(pid) = lab_owner(&name)
            && !process_alive(pid)
        {
            let _ = Lab::remove_namespace(&name);
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.filter_map(Result::ok) {
            if let Some(name) = entry.file_name().to_str()
                && let Some(pid) = lab_owner(name)
                && !process_alive(pid)
            {
                drop(ScratchDir { path: entry.path() });
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(lb_userspace::datapath::bpffs::DEFAULT_MOUNT) {
        for entry in entries.filter_map(Result::ok) {
            if let Some(name) = entry.file_name().to_str()
                && let Some(pid) = lab_owner(name)
                && !process_alive(pid)
            {
                drop(PinDir { path: entry.path() });
            }
        }
    }
    if let Ok(mount) = cgroup2_mount()
        && let Ok(entries) = std::fs::read_dir(&mount)
    {
        for entry in entries.filter_map(Result::ok) {
            if let Some(name) = entry.file_name().to_str()
                && let Some(pid) = lab_owner(name)
                && !process_alive(pid)
            {
                drop(Cgroup { path: entry.path() });
            }
        }
    }
}

/// The owner pid encoded in a name of the form `lbt<pid>x<n>-...`, or None for any other name.
pub fn lab_owner(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let (counter, _host) = rest.split_once('-')?;
    if pid.is_empty() || counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() != libc::ESRCH }
}

/// Names of the namespaces currently present (from `ip netns list`).
pub fn list_namespaces() -> anyhow::Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2); `cargo xtask setup` installs it")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

fn ensure_root() -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the lab needs root (network namespaces, eBPF); CI runs as root");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_read_only_from_our_own_names() {
        assert_eq!(lab_owner("lbt1234x0-node1"), Some(1234));
        assert_eq!(lab_owner("lbt1234x17-client"), Some(1234));
        assert_eq!(lab_owner("lbt-node1"), None);
        assert_eq!(lab_owner("lbtx0-node1"), None);
        assert_eq!(lab_owner("lbt12x-node1"), None);
        assert_eq!(lab_owner("lbt12x3"), None);
        assert_eq!(lab_owner("lb-prod"), None);
        assert_eq!(lab_owner("cni-1234x0-a"), None);
    }
}
