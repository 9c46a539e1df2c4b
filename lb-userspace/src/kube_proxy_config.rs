//! `lb run --config`: a kube-proxy configuration file (KubeProxyConfiguration,
//! kubeproxy.config.k8s.io/v1alpha1), so that a cluster's kube-proxy ConfigMap can serve lb too.
//! The fields lb has a setting for become that setting's value (a flag or `LB_` variable given
//! as well wins); every other field present is named as ignored, with the reason when lb does the
//! thing another way.

use anyhow::{Context as _, bail};
use serde_json::Value;

/// The largest configuration file read: kube-proxy's are a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 256 * 1024;

/// What a configuration file sets that lb has a setting for, in lb's words (as its flags take
/// them), and the fields it ignores.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KubeProxyConfig {
    /// `hostnameOverride`.
    pub hostname_override: Option<String>,
    /// `healthzBindAddress` (an address without a port gets kube-proxy's 10256).
    pub healthz_bind_address: Option<String>,
    /// `metricsBindAddress` (an address without a port gets kube-proxy's 10249).
    pub metrics_bind_address: Option<String>,
    /// `nodePortAddresses`, comma-separated.
    pub nodeport_addresses: Option<String>,
    /// `clientConnection.kubeconfig`.
    pub kubeconfig: Option<String>,
    /// `conntrack.tcpEstablishedTimeout`.
    pub conntrack_tcp_timeout_established: Option<String>,
    /// `conntrack.tcpCloseWaitTimeout`, lb's half-closed timeout.
    pub conntrack_tcp_timeout_half_closed: Option<String>,
    /// `conntrack.udpTimeout`.
    pub conntrack_udp_timeout: Option<String>,
    /// Fields set (to other than their zero value) that lb does not use, each with why
    /// (`field: reason`).
    pub ignored: Vec<String>,
}

const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
const KIND: &str = "KubeProxyConfiguration";

/// Fields lb does not take, and why, where there is more to say than "not supported".
const IGNORED_BECAUSE: &[(&str, &str)] = &[
    ("mode", "lb has one datapath (eBPF)"),
    ("iptables", "lb has one datapath (eBPF)"),
    ("ipvs", "lb has one datapath (eBPF)"),
    ("nftables", "lb has one datapath (eBPF)"),
    ("winkernel", "lb has one datapath (eBPF)"),
    (
        "clusterCIDR",
        "lb SNATs exactly the flows to endpoints on other nodes and tells the node's own \
         clients apart by its socket hooks",
    ),
    (
        "detectLocalMode",
        "lb tells the node's own clients apart by its socket hooks",
    ),
    (
        "detectLocal",
        "lb tells the node's own clients apart by its socket hooks",
    ),
    (
        "conntrack.maxPerCore",
        "lb's IPv4 conntrack map is sized by --conntrack-map-size instead",
    ),
    (
        "conntrack.min",
        "lb's IPv4 conntrack map is sized by --conntrack-map-size instead",
    ),
    ("oomScoreAdj", "set it in the DaemonSet"),
    ("featureGates", "lb has no feature gates"),
];

/// Parses a configuration file's text. Refused: not YAML, not a KubeProxyConfiguration, a
/// mapped field of the wrong type.
pub fn parse(text: &str) -> anyhow::Result<KubeProxyConfig> {
    let mut options = serde_saphyr::Options::default();
    // One line for the refusal, not a source excerpt.
    options.with_snippet = false;
    let document: Value = serde_saphyr::from_str_with_options(text, options)
        .map_err(|error| anyhow::anyhow!("not valid YAML: {error}"))?;
    let Value::Object(fields) = &document else {
        bail!("the configuration file is not a YAML mapping");
    };
    let api_version = fields.get("apiVersion").and_then(Value::as_str);
    let kind = fields.get("kind").and_then(Value::as_str);
    if api_version != Some(API_VERSION) || kind != Some(KIND) {
        bail!("not a {KIND} of {API_VERSION} (apiVersion {api_version:?}, kind {kind:?})");
    }
    let mut config = KubeProxyConfig::default();
    for (name, value) in fields {
        match name.as_str() {
            "apiVersion" | "kind" => {}
            "hostnameOverride" => config.hostname_override = non_empty(string(name, value)?),
            "healthzBindAddress" => {
                config.healthz_bind_address =
                    non_empty(string(name, value)?).map(|address| with_port(address, 10256));
            }
            "metricsBindAddress" => {
                config.metrics_bind_address =
                    non_empty(string(name, value)?).map(|address| with_port(address, 10249));
            }
            "nodePortAddresses" => config.nodeport_addresses = string_list(name, value)?,
            "clientConnection" => {
                for (field, value) in object(name, value)? {
                    let path = format!("{name}.{field}");
                    match field.as_str() {
                        "kubeconfig" => config.kubeconfig = non_empty(string(&path, value)?),
                        _ => config.ignore(&path, value),
                    }
                }
            }
            "conntrack" => {
                for (field, value) in object(name, value)? {
                    let path = format!("{name}.{field}");
                    let duration = || -> anyhow::Result<Option<String>> {
                        let Some(text) = non_empty(string(&path, value)?) else {
                            return Ok(None);
                        };
                        match crate::duration::parse_go_duration(&text) {
                            Ok(duration) if duration.is_zero() => Ok(None),
                            Ok(_) => Ok(Some(text)),
                            Err(error) => bail!("{path}: {error}"),
                        }
                    };
                    match field.as_str() {
                        "tcpEstablishedTimeout" => {
                            config.conntrack_tcp_timeout_established = duration()?;
                        }
                        "tcpCloseWaitTimeout" => {
                            config.conntrack_tcp_timeout_half_closed = duration()?;
                        }
                        "udpTimeout" => config.conntrack_udp_timeout = duration()?,
                        _ => config.ignore(&path, value),
                    }
                }
            }
            _ => config.ignore(name, value),
        }
    }
    // kube-proxy's nftables mode serves NodePorts on the node's primary addresses alone when
    // nodePortAddresses is empty (its `primary` default): lb serves no more of the node than
    // the kube-proxy it replaces did.
    if fields.get("mode").and_then(Value::as_str) == Some("nftables")
        && config.nodeport_addresses.is_none()
    {
        config.nodeport_addresses = Some("primary".to_owned());
    }
    Ok(config)
}

impl KubeProxyConfig {
    fn ignore(&mut self, path: &str, value: &Value) {
        let written_as_default = WRITTEN_AS_DEFAULTS
            .iter()
            .any(|(field, default)| *field == path && value.as_str() == Some(default));
        if is_set(value) && !written_as_default {
            self.ignored.push(ignored(path));
        }
    }
}

/// Reads and parses the file at `path`, at most [`MAX_CONFIG_BYTES`].
pub fn read(path: &std::path::Path) -> anyhow::Result<KubeProxyConfig> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)
        .with_context(|| format!("reading the configuration file {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading the configuration file {}", path.display()))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        bail!(
            "the configuration file {} is over {MAX_CONFIG_BYTES} bytes",
            path.display()
        );
    }
    parse(&text).with_context(|| format!("the configuration file {}", path.display()))
}

fn ignored(path: &str) -> String {
    match IGNORED_BECAUSE.iter().find(|(field, _)| *field == path) {
        Some((_, why)) => format!("{path}: {why}"),
        None => format!("{path}: not supported"),
    }
}

fn string<'v>(path: &str, value: &'v Value) -> anyhow::Result<&'v str> {
    match value {
        Value::String(text) => Ok(text),
        Value::Null => Ok(""),
        other => bail!("{path}: expected a string, found {other}"),
    }
}

fn object<'v>(path: &str, value: &'v Value) -> anyhow::Result<&'v serde_json::Map<String, Value>> {
    match value {
        Value::Object(fields) => Ok(fields),
        other => bail!("{path}: expected a mapping, found {other}"),
    }
}

/// A list of strings as lb's comma-separated flags take it; None for an empty or null list.
fn string_list(path: &str, value: &Value) -> anyhow::Result<Option<String>> {
    let items = match value {
        Value::Null => return Ok(None),
        Value::Array(items) => items,
        other => bail!("{path}: expected a list, found {other}"),
    };
    let items = items
        .iter()
        .map(|item| string(path, item).map(str::to_owned))
        .collect::<anyhow::Result<Vec<String>>>()?;
    Ok((!items.is_empty()).then(|| items.join(",")))
}

fn non_empty(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// Go durations of zero ("0s", "0", "0h0m0s"), which kube-proxy reads as "leave the default".
/// Text that is no duration is not zero: it goes on to be refused where it is read.
fn is_zero(text: &str) -> bool {
    crate::duration::parse_go_duration(text).is_ok_and(|duration| duration.is_zero())
}

/// Fields of kube-proxy's that kubeadm writes with their default value, which lb need not warn
/// about.
const WRITTEN_AS_DEFAULTS: &[(&str, &str)] = &[("bindAddress", "0.0.0.0")];

/// Whether a field lb ignores is set to anything but an empty or zero value (null, "", 0, false,
/// an empty list, a zero duration, or a mapping of those), as kubeadm writes every field it
/// leaves to kube-proxy's defaults: only a set field is worth a warning.
fn is_set(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(set) => *set,
        Value::Number(number) => number.as_f64() != Some(0.0),
        Value::String(text) => !text.trim().is_empty() && !is_zero(text),
        Value::Array(items) => !items.is_empty(),
        Value::Object(fields) => fields.values().any(is_set),
    }
}

/// `address` with `port` when it has none (`0.0.0.0` -> `0.0.0.0:10256`), as kube-proxy reads
/// its bind addresses.
fn with_port(address: String, port: u16) -> String {
    if address.parse::<std::net::SocketAddr>().is_ok() {
        return address;
    }
    match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Ok(std::net::IpAddr::V4(ip)) => format!("{ip}:{port}"),
        Err(_) => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kube-proxy ConfigMap's config.conf as kubeadm writes it (fields trimmed).
    const KUBEADM: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
clientConnection:
  acceptContentTypes: \"\"
  burst: 0
  contentType: \"\"
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
  udpTimeout: 0s
detectLocalMode: \"\"
healthzBindAddress: \"\"
hostnameOverride: \"\"
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: \"\"
  strictARP: false
metricsBindAddress: 0.0.0.0
mode: iptables
nftables:
  masqueradeAll: false
  masqueradeBit: null
  syncPeriod: 30s
nodePortAddresses: [10.0.0.0/8, 192.168.0.0/16]
oomScoreAdj: null
";

    #[test]
    fn a_kubeadm_configuration_maps_what_lb_has_and_names_the_rest() {
        let config = parse(KUBEADM).expect("parses");
        assert_eq!(
            config.kubeconfig.as_deref(),
            Some("/var/lib/kube-proxy/kubeconfig.conf")
        );
        assert_eq!(
            config.metrics_bind_address.as_deref(),
            Some("0.0.0.0:10249")
        );
        assert_eq!(config.healthz_bind_address, None, "empty: lb's default");
        assert_eq!(config.hostname_override, None);
        assert_eq!(
            config.nodeport_addresses.as_deref(),
            Some("10.0.0.0/8,192.168.0.0/16")
        );
        assert_eq!(
            config.conntrack_tcp_timeout_established.as_deref(),
            Some("24h0m0s")
        );
        assert_eq!(
            config.conntrack_tcp_timeout_half_closed.as_deref(),
            Some("1h0m0s")
        );
        assert_eq!(config.conntrack_udp_timeout, None, "0s: lb's default");
        let ignored: Vec<&str> = config
            .ignored
            .iter()
            .map(|line| line.split(':').next().unwrap_or_default())
            .collect();
        assert_eq!(
            ignored,
            // Fields at their zero value (null, "", 0, false, 0s, sections of those) are left
            // to kube-proxy's defaults, and lb has nothing to warn about.
            // bindAddress 0.0.0.0 is kube-proxy's default.
            ["clusterCIDR", "mode", "nftables"]
        );
        assert!(
            config
                .ignored
                .contains(&"mode: lb has one datapath (eBPF)".to_owned()),
            "{:?}",
            config.ignored
        );
    }

    #[test]
    fn other_documents_and_wrong_types_are_refused_with_the_reason() {
        for (text, reason) in [
            ("- a\n- list\n", "not a YAML mapping"),
            (
                "apiVersion: v1\nkind: ConfigMap\n",
                "not a KubeProxyConfiguration",
            ),
            (
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nnodePortAddresses: 10.0.0.0/8\n",
                "nodePortAddresses: expected a list",
            ),
            (
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nconntrack: 5\n",
                "conntrack: expected a mapping",
            ),
            (
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nconntrack:\n  udpTimeout: hms\n",
                "conntrack.udpTimeout: \"hms\": expected a number",
            ),
            (
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nconntrack:\n  tcpCloseWaitTimeout: 60\n",
                "conntrack.tcpCloseWaitTimeout: expected a string",
            ),
        ] {
            let error = format!("{:#}", parse(text).expect_err(text));
            assert!(error.contains(reason), "{text}: {error}");
        }
    }

    #[test]
    fn nftables_mode_serves_node_ports_on_the_primary_addresses_unless_told_otherwise() {
        let config = |fields: &str| {
            parse(&format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{fields}"
            ))
            .expect("parses")
            .nodeport_addresses
        };
        assert_eq!(config("mode: nftables\n").as_deref(), Some("primary"));
        assert_eq!(
            config("mode: nftables\nnodePortAddresses: []\n").as_deref(),
            Some("primary")
        );
        assert_eq!(
            config("mode: nftables\nnodePortAddresses: [10.0.0.0/8]\n").as_deref(),
            Some("10.0.0.0/8")
        );
        assert_eq!(config("mode: iptables\n"), None, "all addresses");
        assert_eq!(config("bindAddress: 0.0.0.0\n"), None);
    }

    #[test]
    fn bind_addresses_without_a_port_get_kube_proxys() {
        assert_eq!(with_port("0.0.0.0".into(), 10256), "0.0.0.0:10256");
        assert_eq!(with_port("127.0.0.1:9000".into(), 10256), "127.0.0.1:9000");
        assert_eq!(with_port("::".into(), 10249), "[::]:10249");
    }
}
