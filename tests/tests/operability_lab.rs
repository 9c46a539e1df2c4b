//! The agent's operability surface in the lab, against real traffic: /metrics parsed whole with
//! an OpenMetrics parser and its per-service counters equal to what the clients sent; the
//! inspection CLI agreeing with it; /healthz and /livez; a healthCheckNodePort flipping
//! 200 -> 503 as the node's endpoints go away; the log level changed at run time; a service id
//! handed out again counting from zero; expired conntrack entries neither counted nor listed.
//!
//! Every request goes from inside node1's namespace to the agent there, over that namespace's
//! loopback.

use std::net::{Ipv4Addr, SocketAddr};

use lab::{
    agent::{AgentLab, endpoint_slice, node_port_service},
    http,
    lab::Host,
    peer::ClientRun,
    topology::{CLIENT_ADDR, node_addr, pod_addr},
};
use openmetrics_parser::{MetricNumber, OpenMetricsValue, openmetrics::parse_openmetrics};

const METRICS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);
const HEALTHZ: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 10256);
/// The UDP payload lab-peer sends ("hello") in its Ethernet frame: 14 + 20 + 8 + 5 bytes.
const UDP_HELLO_FRAME: u64 = 47;

/// An externalTrafficPolicy Local LoadBalancer Service with healthCheckNodePort 32100.
const SHOP_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: shop, namespace: store}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.80\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n  ports:\n  - {name: http, port: 80, targetPort: 8080, nodePort: 30090}\n";

/// The shop Service's slice: one endpoint, pod 0 of `node`.
fn shop_slice(node: u8) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: shop-1\n  namespace: store\n  labels: {{kubernetes.io/service-name: shop}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080, protocol: TCP}}\nendpoints:\n- addresses: [\"{}\"]\n  nodeName: node{node}\n  conditions: {{ready: true}}\n",
        pod_addr(node, 0)
    )
}

fn udp_service() -> String {
    "apiVersion: v1\nkind: Service\nmetadata: {name: dns, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.53\n  ports:\n  - {name: dns, port: 53, protocol: UDP, targetPort: 8080, nodePort: 30053}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: dns-1\n  namespace: default\n  labels: {kubernetes.io/service-name: dns}\naddressType: IPv4\nports:\n- {name: dns, port: 8080, protocol: UDP}\nendpoints:\n- addresses: [\"10.244.1.10\"]\n  nodeName: node1\n  conditions: {ready: true}\n".into()
}

/// Scrapes /metrics and parses the whole page; fails on any OpenMetrics error.
fn scrape(
    node: &Host,
) -> openmetrics_parser::MetricsExposition<openmetrics_parser::OpenMetricsType, OpenMetricsValue> {
    let response = http::get(node, METRICS, "/metrics").expect("GET /metrics");
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(
        response
            .header("content-type")
            .is_some_and(|value| value.starts_with("application/openmetrics-text")),
        "{:?}",
        response.headers
    );
    parse_openmetrics(&response.body)
        .unwrap_or_else(|error| panic!("not OpenMetrics: {error:?}\n{}", response.body))
}

/// The value of the sample of `family` with these labels (counters, gauges; a histogram's count).
fn value(
    page: &openmetrics_parser::MetricsExposition<
        openmetrics_parser::OpenMetricsType,
        OpenMetricsValue,
    >,
    family: &str,
    labels: &[(&str, &str)],
) -> f64 {
    let family = page
        .families
        .get(family)
        .unwrap_or_else(|| panic!("no family {family}"));
    let sample = family
        .iter_samples()
        .find(|sample| {
            sample.get_labelset().is_ok_and(|set| {
                labels
                    .iter()
                    .all(|(name, value)| set.get_label_value(name) == Some(*value))
            })
        })
        .unwrap_or_else(|| panic!("no sample of {} with {labels:?}", family.family_name));
    match &sample.value {
        OpenMetricsValue::Counter(counter) => number(&counter.value),
        OpenMetricsValue::Gauge(gauge) | OpenMetricsValue::Unknown(gauge) => number(gauge),
        OpenMetricsValue::Histogram(histogram) => histogram.count.unwrap_or(0) as f64,
        other => panic!("unexpected value {other:?}"),
    }
}

fn workspace_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// The metric names a dashboard's queries use (`lb_*`, `kubeproxy_*`), as written.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let is_name = |byte: u8| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_';
    let mut start = 0;
    while start < bytes.len() {
        let rest = &text[start..];
        let at_boundary = start == 0 || !is_name(bytes[start - 1]);
        if at_boundary && (rest.starts_with("lb_") || rest.starts_with("kubeproxy_")) {
            let len = rest.bytes().take_while(|byte| is_name(*byte)).count();
            names.insert(rest[..len].to_owned());
            start += len;
        } else {
            start += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    names
}

fn number(number: &MetricNumber) -> f64 {
    number.as_f64()
}

fn service_labels<'a>(name: &'a str, port: &'a str, protocol: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("namespace", "default"),
        ("service", name),
        ("port", port),
        ("protocol", protocol),
    ]
}

fn lb_json(pin_dir: &std::path::Path, args: &[&str]) -> serde_json::Value {
    lab::agent::lb_json(pin_dir, args).unwrap_or_else(|error| panic!("{error:#}"))
}

#[test]
fn metrics_count_what_the_clients_sent_and_the_cli_agrees() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    setup
        .apply(
            "web.yaml",
            &(node_port_service("web", "10.96.0.10", 30080, "")
                + "---\n"
                + &endpoint_slice("web", &[(pod_addr(1, 0), "node1")])),
        )
        .expect("web");
    setup.apply("dns.yaml", &udp_service()).expect("dns");
    let node = setup.cluster.node(1).host.clone();
    let before = scrape(&node);
    assert_eq!(value(&before, "lb_datapath_up", &[]), 1.0);
    // By default /metrics (and PUT /debug/log-level) answer the node alone, like kube-proxy's.
    let from_outside = SocketAddr::new(std::net::IpAddr::V4(node_addr(1)), METRICS.port());
    let outside = http::get(&setup.cluster.client, from_outside, "/metrics");
    assert!(
        outside.is_err(),
        "/metrics answered another host: {outside:?}"
    );

    // From outside, through XDP: 40 datagrams from 40 sockets, 20 TCP connections.
    let udp_target = format!("{}:30053", node_addr(1));
    let udp = ClientRun::udp(&udp_target, 40)
        .run(&setup.cluster.client, None)
        .expect("udp client");
    udp.assert_all_ok("UDP NodePort");
    let tcp_target = format!("{}:30080", node_addr(1));
    let tcp = ClientRun::tcp(&tcp_target, 20)
        .run(&setup.cluster.client, None)
        .expect("tcp client");
    tcp.assert_all_ok("TCP NodePort");
    // From a pod, through the socket hook: 10 connections to the ClusterIP.
    let pod = ClientRun::tcp("10.96.0.10:80", 10)
        .run(setup.client_pod(), Some(&setup.cgroup))
        .expect("pod client");
    pod.assert_all_ok("ClusterIP from a pod");

    // As the kubelet's probe would (the healthz counters appear with their first answer).
    assert_eq!(
        http::get(&node, HEALTHZ, "/healthz")
            .expect("healthz")
            .status,
        200
    );
    let page = scrape(&node);
    let dns = service_labels("dns", "dns", "UDP");
    let drops: f64 = [
        "drop_no_backend",
        "drop_backend_missing",
        "drop_ct_full",
        "drop_malformed",
    ]
    .iter()
    .map(|event| value(&page, "lb_datapath_events", &[("event", event)]))
    .sum();
    assert_eq!(drops, 0.0, "no packet of these clients may be dropped");
    assert_eq!(value(&page, "lb_service_packets", &dns), 40.0);
    assert_eq!(
        value(&page, "lb_service_bytes", &dns),
        (40 * UDP_HELLO_FRAME) as f64
    );
    // New flows: checked against the distinct client tuples conntrack holds, below.
    let web = service_labels("web", "http", "TCP");
    // 20 connections through XDP and 10 through the socket hook; TCP packets per connection
    // vary (delayed ACKs), so only a lower bound: SYN, ACK, request, FIN, last ACK at least.
    assert_eq!(value(&page, "lb_service_new_flows", &web), 30.0);
    assert!(value(&page, "lb_service_packets", &web) >= 20.0 * 4.0);

    // kube-proxy's metrics: two syncs with changes, their objects counted.
    assert!(value(&page, "kubeproxy_sync_proxy_rules_duration_seconds", &[]) >= 3.0);
    assert!(
        value(
            &page,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            &[]
        ) > 1.7e9
    );
    assert_eq!(
        value(&page, "kubeproxy_sync_proxy_rules_service_changes", &[]),
        2.0
    );
    assert_eq!(
        value(&page, "kubeproxy_sync_proxy_rules_endpoint_changes", &[]),
        2.0
    );
    assert_eq!(value(&page, "lb_invalid_objects", &[]), 0.0);
    assert_eq!(
        value(&page, "lb_map_entries", &[("map", "lb4_fe_v1")]),
        4.0,
        "two ClusterIPs and two NodePorts on one node address"
    );
    assert_eq!(
        value(&page, "lb_map_capacity", &[("map", "lb4_ct_v1")]),
        f64::from(lb_common::limits::MAX_CONNTRACK)
    );
    // Every new XDP flow to these local endpoints is one conntrack entry, all still there: 20
    // TCP connections and at least 36 distinct UDP client tuples (see below).
    assert!(value(&page, "lb_map_entries", &[("map", "lb4_ct_v1")]) >= 56.0);
    // The flow caches' looks: each TCP connection's ACK after the handshake looks into XDP's
    // (a gate closes after 33 misses more than hits, later than 20 looks); the pod's answers
    // into tc's, at least one in all (a server may send its answer with its FIN, which does not
    // look).
    let looks = |hook| {
        let cache = [("hook", hook), ("ip_family", "IPv4"), ("protocol", "TCP")];
        value(&page, "lb_flow_cache_hits", &cache) + value(&page, "lb_flow_cache_misses", &cache)
    };
    let xdp_looks = looks("xdp");
    assert!(xdp_looks >= 20.0, "{xdp_looks} XDP looks");
    assert!(looks("tc") >= 1.0, "{} tc looks", looks("tc"));
    assert_eq!(
        value(
            &page,
            "lb_flow_cache_closings",
            &[("hook", "xdp"), ("ip_family", "IPv6"), ("protocol", "TCP")]
        ),
        0.0,
        "no IPv6 flow, no closing"
    );
    // The 40 UDP datagrams above are flows of one datagram each, but for a port two sockets
    // happened to share: their looks miss, counted apart from TCP's. On either CPU a gate
    // closes only past 32 misses, so at least 33 of the 40 look, and only a shared port's
    // later datagrams can hit.
    let udp = [("hook", "xdp"), ("ip_family", "IPv4"), ("protocol", "UDP")];
    let udp_misses = value(&page, "lb_flow_cache_misses", &udp);
    assert!(udp_misses >= 30.0, "{udp_misses} UDP misses");

    // Every family on the page is documented, and the dashboard asks only for families that exist.
    let docs = std::fs::read_to_string(workspace_file("docs/metrics.md")).expect("docs");
    for family in page.families.keys() {
        assert!(
            docs.contains(&format!("`{family}")),
            "{family} is not in docs/metrics.md"
        );
    }
    let dashboard = std::fs::read_to_string(workspace_file("deploy/grafana/lb-dashboard.json"))
        .expect("dashboard");
    let queried = metric_names(&dashboard);
    assert!(queried.len() >= 10, "{queried:?}");
    for name in queried {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        assert!(
            page.families.contains_key(&name) || page.families.contains_key(family),
            "the dashboard queries {name}, which /metrics lacks"
        );
    }

    // The CLI reads the same maps.
    let services = lb_json(setup.pin_dir(), &["services"]);
    let dns_row = services
        .as_array()
        .expect("a list")
        .iter()
        .find(|service| service["name"] == "default/dns:dns/UDP")
        .unwrap_or_else(|| panic!("no dns in {services:#}"));
    assert_eq!(dns_row["packets"], 40);
    assert_eq!(dns_row["backends"], serde_json::json!(["10.244.1.10:8080"]));
    let backends = lb_json(setup.pin_dir(), &["backends"]);
    assert!(
        backends
            .as_array()
            .expect("a list")
            .iter()
            .any(|backend| backend["address"] == "10.244.1.10:8080"
                && backend["protocol"] == "udp"
                && backend["local"] == true),
        "{backends:#}"
    );
    let flows = lb_json(
        setup.pin_dir(),
        &["conntrack", "--protocol", "udp", "--port", "30053"],
    );
    let client = CLIENT_ADDR.to_string();
    let originals: Vec<&serde_json::Value> = flows
        .as_array()
        .expect("a list")
        .iter()
        .filter(|flow| flow["direction"] != "reply")
        .collect();
    // One flow (its client's side: a FLOW or ORIGINAL entry) per distinct client address:port. The kernel picks each of the 40 sockets' port
    // at random, so two of them now and then share one (a few percent of runs): that is one
    // flow, as in any conntrack.
    assert!((36..=40).contains(&originals.len()), "{flows:#}");
    assert_eq!(
        value(&page, "lb_service_new_flows", &dns),
        originals.len() as f64,
        "one new flow per distinct client tuple"
    );
    assert!(originals.iter().all(|flow| {
        flow["source"]
            .as_str()
            .is_some_and(|source| source.starts_with(&client))
            && flow["nat"] == "10.244.1.10:8080"
    }));
    let stats = lb_json(setup.pin_dir(), &["stats"]);
    assert_eq!(stats["events"]["drop_no_backend"], 0);
    assert_eq!(stats["snat_address"], node_addr(1).to_string());
    // The flow caches' counts, read after the page: at least the page's looks.
    let caches = stats["flow_caches"].as_array().expect("flow caches");
    assert_eq!(caches.len(), 8, "{caches:?}");
    let xdp4 = caches
        .iter()
        .find(|cache| {
            cache["hook"] == "xdp" && cache["ip_family"] == "IPv4" && cache["protocol"] == "TCP"
        })
        .expect("XDP's IPv4 flow cache, TCP");
    let count = |field: &str| xdp4[field].as_f64().expect("a count");
    assert!(count("hits") + count("misses") >= xdp_looks, "{xdp4}");

    // XDP reads all four frontends from the frontend index; after web's endpoints change, its
    // two are read from the frontends map until the agent refills the index (100 ms after the
    // sync), and new connections reach the new endpoint set throughout.
    let index = |page: &_| value(page, "lb_xdp_frontends", &[("source", "index")]);
    let map_only = |page: &_| value(page, "lb_xdp_frontends", &[("source", "map")]);
    assert_eq!((index(&page), map_only(&page)), (4.0, 0.0));
    setup
        .apply(
            "web.yaml",
            &(node_port_service("web", "10.96.0.10", 30080, "")
                + "---\n"
                + &endpoint_slice(
                    "web",
                    &[(pod_addr(1, 0), "node1"), (pod_addr(1, 1), "node1")],
                )),
        )
        .expect("web with two endpoints");
    ClientRun::tcp(&tcp_target, 20)
        .run(&setup.cluster.client, None)
        .expect("tcp client")
        .assert_all_ok("TCP NodePort after the change");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let page = scrape(&node);
        if (index(&page), map_only(&page)) == (4.0, 0.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the index was not refilled: {} in it, {} read from the map",
            index(&page),
            map_only(&page)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn healthz_livez_health_check_node_port_and_log_level() {
    let mut setup = AgentLab::new().expect("lab");
    // On the node's address, as the DaemonSet sets it up so that Prometheus can scrape it (the
    // default is loopback); the agent serves loopback's port 10249 too.
    setup
        .start_agent(&["--metrics-bind-address", &format!("{}:10249", node_addr(1))])
        .expect("agent");
    let node_host = setup.cluster.node(1).host.clone();

    for path in ["/healthz", "/livez"] {
        let response = http::get(&node_host, HEALTHZ, path).expect(path);
        assert_eq!(response.status, 200, "{path}: {}", response.body);
        let body: serde_json::Value = serde_json::from_str(&response.body).expect("JSON");
        assert!(
            body["lastUpdated"].as_str().is_some_and(|t| !t.is_empty()),
            "{body}"
        );
        assert!(body["currentTime"].is_string(), "{body}");
    }
    assert_eq!(
        http::get(&node_host, HEALTHZ, "/other")
            .expect("404")
            .status,
        404
    );

    // An ETP Local LoadBalancer with its healthCheckNodePort, its endpoint on node1.
    let service = SHOP_SERVICE;
    let slice = shop_slice;
    setup
        .apply("shop.yaml", &format!("{service}---\n{}", slice(1)))
        .expect("shop");
    let check = SocketAddr::new(std::net::IpAddr::V4(node_addr(1)), 32100);
    let local = http::get(&node_host, check, "/").expect("health check");
    assert_eq!(local.status, 200, "{}", local.body);
    let body: serde_json::Value = serde_json::from_str(&local.body).expect("JSON");
    assert_eq!(body["service"]["namespace"], "store");
    assert_eq!(body["service"]["name"], "shop");
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(local.header("x-load-balancing-endpoint-weight"), Some("1"));

    // The endpoint moves to node2: node1 has none left.
    setup
        .apply("shop.yaml", &format!("{service}---\n{}", slice(2)))
        .expect("shop moved");
    let remote = http::get(&node_host, check, "/").expect("health check");
    assert_eq!(remote.status, 503, "{}", remote.body);
    let body: serde_json::Value = serde_json::from_str(&remote.body).expect("JSON");
    assert_eq!(body["localEndpoints"], 0);
    let page = scrape(&node_host);
    assert_eq!(
        value(
            &page,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            &[("traffic_policy", "external")]
        ),
        1.0
    );
    assert!(value(&page, "kubeproxy_proxy_healthz", &[("code", "200")]) >= 1.0);

    // The Service goes: so does its server.
    setup.delete("shop.yaml").expect("shop deleted");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while http::get(&node_host, check, "/").is_ok() {
        // The server task is aborted in the sync; its listener closes when the task is dropped.
        assert!(std::time::Instant::now() < deadline, "port still served");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // The autoscaler is about to remove node1: /healthz drains it, /livez keeps the agent.
    let node = |taints: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node1}}\nspec: {{taints: [{taints}]}}\nstatus:\n  addresses: [{{type: InternalIP, address: {}}}]\n",
            node_addr(1)
        )
    };
    setup
        .apply(
            "node1.yaml",
            &node(
                "{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}",
            ),
        )
        .expect("tainted node");
    let draining = http::get(&node_host, HEALTHZ, "/healthz").expect("healthz");
    assert_eq!(draining.status, 503, "{}", draining.body);
    assert!(
        draining.body.contains("\"nodeEligible\":false"),
        "{}",
        draining.body
    );
    assert_eq!(
        http::get(&node_host, HEALTHZ, "/livez")
            .expect("livez")
            .status,
        200
    );
    setup
        .apply("node1.yaml", &node(""))
        .expect("untainted node");
    assert_eq!(
        http::get(&node_host, HEALTHZ, "/healthz")
            .expect("healthz")
            .status,
        200
    );

    // The log level, changed at run time; a bad filter changes nothing.
    let set = http::request(&node_host, "PUT", METRICS, "/debug/log-level", "debug").expect("PUT");
    assert_eq!(set.status, 200, "{}", set.body);
    let bad =
        http::request(&node_host, "PUT", METRICS, "/debug/log-level", "info,[=").expect("PUT");
    assert_eq!(bad.status, 400, "{}", bad.body);
    // To the node's address, from the node itself as from another host: refused, as from
    // anywhere but loopback (packets from outside may claim the node's address; the endpoint
    // has no authentication). /metrics is served there.
    let metrics_at_node_address = SocketAddr::new(std::net::IpAddr::V4(node_addr(1)), 10249);
    for (host, from) in [
        (&node_host, "the node"),
        (&setup.cluster.client, "the client"),
    ] {
        let put = http::request(
            host,
            "PUT",
            metrics_at_node_address,
            "/debug/log-level",
            "trace",
        )
        .expect(from);
        assert_eq!(put.status, 403, "from {from}: {}", put.body);
    }
    let scrape = http::get(&node_host, metrics_at_node_address, "/metrics").expect("scrape");
    assert_eq!(scrape.status, 200);
    assert!(scrape.body.contains("lb_datapath_up"), "{}", scrape.body);
    let now = http::get(&node_host, METRICS, "/debug/log-level").expect("GET");
    assert_eq!(now.body.trim(), "debug");
    // At debug, the agent logs what it used to leave out.
    setup
        .apply("shop.yaml", &format!("{service}---\n{}", slice(1)))
        .expect("shop again");
    let log = std::fs::read_to_string(setup.log()).expect("log");
    assert!(log.contains("log level changed"), "{log}");
    assert!(
        log.contains("DEBUG"),
        "no debug line after the change:\n{log}"
    );
}

#[test]
fn with_nodeport_addresses_health_check_node_ports_listen_on_those_addresses_only() {
    // A CIDR, and kube-proxy's `primary` (the node's first address of each family). The node
    // has a second address (its Node's, as the file source has none: `--node-address`), which
    // neither setting serves.
    for setting in ["203.0.113.0/24", "primary"] {
        let mut setup = AgentLab::new().expect("lab");
        setup
            .start_agent(&[
                "--nodeport-addresses",
                setting,
                "--node-address",
                "198.18.0.99",
            ])
            .expect("agent");
        setup
            .apply(
                "shop.yaml",
                &format!("{SHOP_SERVICE}---\n{}", shop_slice(1)),
            )
            .expect("shop");
        let node = setup.cluster.node(1).host.clone();
        let on_node_address = SocketAddr::new(std::net::IpAddr::V4(node_addr(1)), 32100);
        let response = http::get(&node, on_node_address, "/").expect("health check");
        assert_eq!(response.status, 200, "{setting}: {}", response.body);
        let on_loopback = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 32100);
        assert!(
            http::get(&node, on_loopback, "/").is_err(),
            "{setting}: served outside --nodeport-addresses"
        );
        let frontends =
            service_row(setup.pin_dir(), "store/shop:http/TCP[external]")["frontends"].clone();
        let frontends: Vec<&str> = frontends
            .as_array()
            .expect("frontends")
            .iter()
            .filter_map(serde_json::Value::as_str)
            .collect();
        assert!(
            frontends.iter().any(|f| f.contains("203.0.113.1:30090"))
                && !frontends.iter().any(|f| f.contains("198.18.0.99")),
            "{setting}: {frontends:?}"
        );
    }
}

/// The `lb services` row of a service, by name.
fn service_row(pin_dir: &std::path::Path, name: &str) -> serde_json::Value {
    let services = lb_json(pin_dir, &["services"]);
    services
        .as_array()
        .expect("a list")
        .iter()
        .find(|service| service["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} in {services:#}"))
}

#[test]
fn a_service_id_handed_out_again_counts_from_zero() {
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    setup.apply("dns.yaml", &udp_service()).expect("dns");
    let target = format!("{}:30053", node_addr(1));
    ClientRun::udp(&target, 20)
        .run(&setup.cluster.client, None)
        .expect("client")
        .assert_all_ok("dns");
    let dns = service_row(setup.pin_dir(), "default/dns:dns/UDP");
    assert_eq!(dns["packets"], 20);

    // dns goes; a restarted agent hands its id, free again, to the next new Service.
    setup.delete("dns.yaml").expect("delete");
    setup.kill_agent().expect("kill");
    setup.start_agent(&[]).expect("agent again");
    let resolver = udp_service()
        .replace("name: dns, namespace", "name: resolver, namespace")
        .replace("name: dns-1", "name: resolver-1")
        .replace("service-name: dns}", "service-name: resolver}");
    setup.apply("resolver.yaml", &resolver).expect("resolver");
    let row = service_row(setup.pin_dir(), "default/resolver:dns/UDP");
    assert_eq!(
        row["id"], dns["id"],
        "the id is reused (else this test proves nothing)"
    );
    for counter in ["packets", "bytes", "new_flows"] {
        assert_eq!(row[counter], 0, "{counter} inherited from dns: {row:#}");
    }
    let node = setup.cluster.node(1).host.clone();
    let labels = service_labels("resolver", "dns", "UDP");
    for family in [
        "lb_service_packets",
        "lb_service_bytes",
        "lb_service_new_flows",
    ] {
        assert_eq!(value(&scrape(&node), family, &labels), 0.0, "{family}");
    }

    // And it counts its own traffic from there.
    ClientRun::udp(&target, 10)
        .run(&setup.cluster.client, None)
        .expect("client")
        .assert_all_ok("resolver");
    assert_eq!(value(&scrape(&node), "lb_service_packets", &labels), 10.0);
    assert_eq!(
        service_row(setup.pin_dir(), "default/resolver:dns/UDP")["packets"],
        10
    );
}

/// Writes conntrack entries straight into the agent's pinned map: flows of addresses no client
/// has (198.51.100.0/24), idle for as long as each row says.
fn plant_conntrack_entries(pin_dir: &std::path::Path, rows: &[(u8, u8, u8, u64)]) {
    use lb_common::{Ct4Key, Ct4Value, ct_direction};
    let mut conntrack: aya::maps::HashMap<_, Ct4Key, Ct4Value> =
        lab::table::pinned_conntrack(pin_dir, lb_common::map_names::CONNTRACK4);
    let now = lb_userspace::observe::inspect::monotonic_ns();
    for &(host, protocol, state, idle_s) in rows {
        let idle_ns = idle_s * 1_000_000_000;
        assert!(
            now > idle_ns,
            "the machine has been up for less than {idle_s} s"
        );
        let key = Ct4Key {
            saddr: u32::from(Ipv4Addr::new(198, 51, 100, host)),
            daddr: u32::from(node_addr(1)),
            sport: 40_000,
            dport: 30053,
            proto: protocol,
            direction: ct_direction::ORIGINAL,
            _pad: [0; 2],
        };
        let value = Ct4Value {
            last_seen_ns: now - idle_ns,
            state,
            nat_addr: u32::from(pod_addr(1, 0)),
            nat_port: 8080,
            ..Default::default()
        };
        conntrack.insert(&key, &value, 0).expect("insert");
    }
}

#[test]
fn expired_conntrack_entries_are_neither_counted_nor_listed_by_default() {
    use lb_common::{ct_timeouts, proto, tcp_state};
    let mut setup = AgentLab::new().expect("lab");
    setup.start_agent(&[]).expect("agent");
    setup.apply("dns.yaml", &udp_service()).expect("dns");
    ClientRun::udp(&format!("{}:30053", node_addr(1)), 10)
        .run(&setup.cluster.client, None)
        .expect("client")
        .assert_all_ok("dns");
    let seconds = |ns: u64| ns / 1_000_000_000;
    // (host, protocol, state, idle seconds): each timeout by its protocol and state.
    let expired = [
        (1, proto::UDP, 0, seconds(ct_timeouts::UDP) + 30),
        (
            2,
            proto::TCP,
            tcp_state::SYN_SENT,
            seconds(ct_timeouts::TCP_SYN) + 30,
        ),
        (
            3,
            proto::TCP,
            tcp_state::CLOSING,
            seconds(ct_timeouts::TCP_CLOSING) + 30,
        ),
    ];
    let live = [(
        4,
        proto::TCP,
        tcp_state::ESTABLISHED,
        2 * seconds(ct_timeouts::UDP),
    )];
    plant_conntrack_entries(setup.pin_dir(), &expired);
    plant_conntrack_entries(setup.pin_dir(), &live);

    let planted = |flows: &serde_json::Value| -> Vec<(String, bool)> {
        flows
            .as_array()
            .expect("a list")
            .iter()
            .filter(|flow| {
                flow["source"]
                    .as_str()
                    .is_some_and(|source| source.starts_with("198.51.100."))
            })
            .map(|flow| {
                (
                    flow["source"].as_str().unwrap_or_default().to_owned(),
                    flow["expired"].as_bool().expect("expired is a bool"),
                )
            })
            .collect()
    };
    let listed = lb_json(setup.pin_dir(), &["conntrack"]);
    assert_eq!(
        planted(&listed),
        [("198.51.100.4:40000".to_owned(), false)],
        "only the live one by default"
    );
    let mut everything = planted(&lb_json(setup.pin_dir(), &["conntrack", "--all"]));
    everything.sort();
    assert_eq!(
        everything,
        [
            ("198.51.100.1:40000".to_owned(), true),
            ("198.51.100.2:40000".to_owned(), true),
            ("198.51.100.3:40000".to_owned(), true),
            ("198.51.100.4:40000".to_owned(), false),
        ],
        "--all lists the expired ones, marked"
    );

    // The fill counts what `lb conntrack` lists: the clients' flows (live for a minute) and
    // the live planted one.
    let live_count = listed.as_array().expect("a list").len();
    assert!(live_count > 10, "{listed:#}");
    let node = setup.cluster.node(1).host.clone();
    assert_eq!(
        value(&scrape(&node), "lb_map_entries", &[("map", "lb4_ct_v1")]),
        live_count as f64
    );
    let stats = lb_json(setup.pin_dir(), &["stats"]);
    let conntrack_fill = stats["maps"]
        .as_array()
        .expect("a list")
        .iter()
        .find(|map| map["map"] == "lb4_ct_v1")
        .cloned()
        .unwrap_or_default();
    assert_eq!(conntrack_fill["entries"], live_count, "{stats:#}");
}
