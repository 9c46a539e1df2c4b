//! `lb run` refuses to start, with one line saying why and exit code 1, when it would start
//! broken: manifests it cannot read, settings it could only run badly with, nothing to attach
//! to, a /sys remounted the way
//! `ip netns exec` does (so the cgroup and the bpffs are not the host's), and a bpffs it would
//! have to mount in a private mount namespace, where the pins would die with it.
//!
//! The mount cases run the agent in a private mount namespace of its own (`unshare --mount
//! --propagation private`), where the script first does to /sys what `ip netns exec` does
//! (lazy unmount, fresh sysfs) or takes /sys/fs/bpf away: the machine's mounts stay as they are.

use std::process::{Command, Output};

use lab::{
    lab::{Cgroup, Lab, ScratchDir},
    peer::sibling_binary,
};

fn lb() -> String {
    sibling_binary("lb")
        .expect("lb binary")
        .to_str()
        .expect("UTF-8 path")
        .to_owned()
}

/// Runs `script` (with `$LB` the binary) in a private mount namespace.
fn in_private_mount_namespace(script: &str) -> Output {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("LB", lb())
        .output()
        .expect("unshare")
}

/// Asserts `output` is a refusal: exit code 1 and exactly one line on stderr containing each
/// of `parts`. Returns that line.
fn refused(output: &Output, parts: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    for part in parts {
        assert!(stderr.contains(part), "{part:?} not in {stderr}");
    }
    stderr
}

struct Setup {
    cgroup: Cgroup,
    scratch: ScratchDir,
    _lab: Lab,
}

impl Setup {
    fn new(name: &str) -> Self {
        let lab = Lab::new().expect("lab");
        Self {
            cgroup: Cgroup::new(&lab, name).expect("cgroup"),
            scratch: ScratchDir::new(&lab, name).expect("scratch"),
            _lab: lab,
        }
    }

    fn cgroup(&self) -> &str {
        self.cgroup.path().to_str().expect("UTF-8 path")
    }

    /// An empty manifests directory.
    fn manifests(&self) -> String {
        let path = self.scratch.path().join("manifests");
        std::fs::create_dir_all(&path).expect("mkdir");
        path.to_str().expect("UTF-8 path").to_owned()
    }
}

#[test]
fn manifests_that_cannot_be_read_are_refused() {
    let setup = Setup::new("unreadable");
    let missing = setup.scratch.path().join("no-such-file.yaml");
    let output = Command::new(lb())
        .args(["run", "--source", "file", "--manifests"])
        .arg(format!("{},{}", setup.manifests(), missing.display()))
        .args(["--cgroup-path", setup.cgroup()])
        .env_clear()
        .output()
        .expect("lb run");
    refused(
        &output,
        &[&format!("--manifests {}: not readable", missing.display())],
    );
}

/// Settings the agent could only run badly with: each refused with its reason before the agent
/// attaches or pins anything (the interface named does not exist and the pin directory is
/// never made, so a check that let one through would touch nothing of the machine's).
#[test]
fn settings_the_agent_cannot_run_well_with_are_refused_before_it_attaches() {
    let setup = Setup::new("badsettings");
    let pins = setup.scratch.path().join("pins");
    let run = |flags: &[&str]| {
        Command::new(lb())
            .args(["run", "--source", "file", "--manifests", &setup.manifests()])
            .args(["--interfaces", "lbt-nonexistent", "--pin-dir"])
            .arg(&pins)
            .args(flags)
            .env_clear()
            .output()
            .expect("lb run")
    };
    let cases: [(&[&str], &str); 5] = [
        (
            &["--snat-port-range", "32000-33000"],
            "--snat-port-range 32000-33000 overlaps --node-port-range 30000-32767",
        ),
        (
            &["--metrics-bind-address", "node1:10249"],
            "--metrics-bind-address: node1:10249 is not an address to bind",
        ),
        (
            &["--healthz-bind-address", "0.0.0.0:"],
            "--healthz-bind-address: 0.0.0.0: is not an address to bind",
        ),
        (&["--hostname-override", " "], "the node name is empty"),
        (
            &["--nodeport-addresses", "primary,10.0.0.0/8"],
            "--nodeport-addresses: primary cannot be given with other items",
        ),
    ];
    for (flags, reason) in cases {
        refused(&run(flags), &[reason]);
        assert!(!pins.exists(), "{flags:?}: the pin directory was made");
    }
    // Manifests without the file source would be ignored while the agent reads the API server.
    let output = Command::new(lb())
        .args(["run", "--manifests", &setup.manifests()])
        .args(["--interfaces", "lbt-nonexistent", "--pin-dir"])
        .arg(&pins)
        .env_clear()
        .output()
        .expect("lb run");
    refused(&output, &["--manifests is read with --source file only"]);
    assert!(!pins.exists(), "the pin directory was made");
    // A value no setting can take is clap's to refuse, with its usage (exit code 2).
    let zero = run(&["--healthz-timeout", "0"]);
    assert_eq!(zero.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&zero.stderr).contains("invalid value '0' for '--healthz-timeout"),
        "{}",
        String::from_utf8_lossy(&zero.stderr)
    );
}

/// A kubeconfig that cannot be read refuses the start before the datapath is loaded, not once
/// it is attached.
#[test]
fn an_unreadable_kubeconfig_is_refused_before_the_datapath_loads() {
    let setup = Setup::new("nokubeconfig");
    let pins = setup.scratch.path().join("pins");
    let kubeconfig = setup.scratch.path().join("no-kubeconfig");
    let output = Command::new(lb())
        .args(["run", "--cgroup-path", setup.cgroup(), "--pin-dir"])
        .arg(&pins)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .env_clear()
        .output()
        .expect("lb run");
    refused(
        &output,
        &[&format!("reading kubeconfig {}", kubeconfig.display())],
    );
    assert!(!pins.exists(), "the datapath was loaded");
}

#[test]
fn nothing_to_attach_is_refused() {
    let setup = Setup::new("noattach");
    let output = Command::new(lb())
        .args(["run", "--source", "file", "--manifests", &setup.manifests()])
        .env_clear()
        .output()
        .expect("lb run");
    refused(
        &output,
        &["nothing to attach", "--interfaces", "--cgroup-path"],
    );
}

#[test]
fn a_sys_remounted_as_ip_netns_exec_does_is_refused_with_the_nsenter_advice() {
    let setup = Setup::new("netnsexec");
    let remount_sys = "umount -l /sys && mount -t sysfs sysfs /sys";
    // The cgroup under /sys is gone with the remount.
    let output = in_private_mount_namespace(&format!(
        "{remount_sys} && exec \"$LB\" run --source file --manifests {} --cgroup-path {}",
        setup.manifests(),
        setup.cgroup()
    ));
    refused(
        &output,
        &[
            &format!(
                "--cgroup-path {} is not a cgroup v2 directory",
                setup.cgroup()
            ),
            "ip netns exec",
            "nsenter --net=",
        ],
    );

    // The cgroup bind-mounted outside /sys first (as the DaemonSet mounts it): the pins'
    // bpffs is what is missing then.
    let bound = setup.scratch.path().join("cgroup");
    std::fs::create_dir(&bound).expect("mkdir");
    let output = in_private_mount_namespace(&format!(
        "mount --bind {} {bound} && {remount_sys} && exec \"$LB\" run --source file \
         --manifests {} --cgroup-path {bound}",
        setup.cgroup(),
        setup.manifests(),
        bound = bound.display(),
    ));
    refused(
        &output,
        &[
            "no bpffs at /sys/fs/bpf for --pin-dir /sys/fs/bpf/lb",
            "ip netns exec",
            "nsenter --net=",
        ],
    );
}

#[test]
fn a_bpffs_that_would_be_private_to_the_agents_mount_namespace_is_refused() {
    let setup = Setup::new("privbpffs");
    let output = in_private_mount_namespace(&format!(
        "while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf || exit 99; done; \
         exec \"$LB\" run --source file --manifests {} --cgroup-path {}",
        setup.manifests(),
        setup.cgroup()
    ));
    refused(
        &output,
        &[
            "no bpffs at /sys/fs/bpf",
            "private mount namespace",
            "vanish with the agent",
        ],
    );
}

#[test]
fn a_configuration_file_that_is_no_kube_proxy_configuration_is_refused() {
    let setup = Setup::new("badconfig");
    let config = setup.scratch.path().join("config.conf");
    let cases: [(&str, &[&str]); 4] = [
        (
            "apiVersion: v1\nkind: ConfigMap\n",
            &[
                "config.conf",
                "not a KubeProxyConfiguration of kubeproxy.config.k8s.io/v1alpha1",
            ],
        ),
        (
            "kind: KubeProxyConfiguration\nmode: [ipvs\n",
            &["config.conf", "not valid YAML"],
        ),
        (
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nconntrack:\n  udpTimeout: hms\n",
            &[
                "config.conf",
                "conntrack.udpTimeout: \"hms\": expected a number",
            ],
        ),
        (
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nnodePortAddresses: [primary, 10.0.0.0/8]\n",
            &[
                "config.conf",
                "nodePortAddresses",
                "primary cannot be given with other items",
            ],
        ),
    ];
    for (text, reason) in cases {
        std::fs::write(&config, text).expect("write");
        let output = Command::new(lb())
            .args(["run", "--source", "file", "--manifests", &setup.manifests()])
            .arg("--config")
            .arg(&config)
            .args(["--cgroup-path", setup.cgroup()])
            .output()
            .expect("lb run");
        refused(&output, reason);
    }
}
