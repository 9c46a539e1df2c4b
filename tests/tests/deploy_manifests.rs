//! deploy/ against the agent it deploys, without a cluster: every file of
//! deploy/kustomization.yaml parses into its k8s-openapi type with no field left over, the
//! objects refer to each other, the probes, the scrape port and the host mounts match the agent's
//! settings, the ClusterRole grants exactly the API calls the agent makes, recorded by a fake API
//! server the real agent runs against (root), and `lb run --help`, the ConfigMap and
//! docs/deploy.md list the same settings, each value accepted by the agent; and the memory limit
//! leaves room for the maps, measured by loading the datapath (root).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    Resource,
    api::{
        admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, PodSpec, Probe, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use lab::{
    admission::{Policy, Requester, Verdict},
    fake_apiserver::{FakeApiServer, Resource as Collection},
    kube_agent::{KubeAgent, WAIT},
    lab::{Lab, PinDir, ScratchDir},
    peer::sibling_binary,
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

/// The optional Prometheus Operator file: in deploy/, deliberately not in the kustomization.
const POD_MONITOR: &str = "podmonitor.yaml";

/// One (API group, resource, verb) the ClusterRole grants or a request of the agent needs.
type Grant = (String, String, String);

/// The RBAC rule a request to the API server needs, as the API server's authorizer derives it
/// from the request: the API group and resource from the path (`/api/v1/...` is the core
/// group, `/apis/{group}/{version}/...` any other; a namespace in the path does not matter to a
/// ClusterRole; `{resource}/{name}/{subresource}` is the resource `{resource}/{subresource}`),
/// the verb from the method and whether the path names one object: a GET is `watch` with
/// `watch=true`, else `get` of one object or `list` of a collection; POST `create`, PUT
/// `update`, PATCH `patch`, DELETE `delete` (of a collection, `deletecollection`). `request`
/// is as the fake API server records it: `METHOD /path?query`. Panics on a request no
/// resource rule grants (the ClusterRole has none of the other kind, nonResourceURLs).
fn required_grant(request: &str) -> Grant {
    let (method, target) = request
        .split_once(' ')
        .unwrap_or_else(|| panic!("{request:?} is not `METHOD /path`"));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let watch = form_urlencoded::parse(query.as_bytes())
        .any(|(name, value)| name == "watch" && (value == "true" || value == "1"));
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("{request}: not a request for a resource"),
    };
    let rest = match rest {
        ["namespaces", _namespace, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let (resource, one_object) = match rest {
        [resource] => ((*resource).to_owned(), false),
        [resource, _name] => ((*resource).to_owned(), true),
        [resource, _name, subresource] => (format!("{resource}/{subresource}"), true),
        _ => panic!("{request}: not a request for a resource"),
    };
    let verb = match (method, one_object, watch) {
        ("GET", _, true) => "watch",
        ("GET", true, false) => "get",
        ("GET", false, false) => "list",
        ("POST", _, _) => "create",
        ("PUT", true, _) => "update",
        ("PATCH", true, _) => "patch",
        ("DELETE", true, _) => "delete",
        ("DELETE", false, _) => "deletecollection",
        _ => panic!("{request}: no RBAC verb for this request"),
    };
    (group.to_owned(), resource, verb.to_owned())
}

#[test]
fn requests_map_to_the_rules_the_api_server_checks() {
    for (request, (group, resource, verb)) in [
        (
            "GET /api/v1/services?labelSelector=x&resourceVersion=0",
            ("", "services", "list"),
        ),
        (
            "GET /api/v1/nodes?fieldSelector=metadata.name%3Dnode1&watch=true&resourceVersion=7",
            ("", "nodes", "watch"),
        ),
        (
            "GET /apis/discovery.k8s.io/v1/namespaces/shop/endpointslices?watch=1",
            ("discovery.k8s.io", "endpointslices", "watch"),
        ),
        (
            "GET /api/v1/namespaces/shop/services/cart",
            ("", "services", "get"),
        ),
        ("GET /api/v1/namespaces/shop", ("", "namespaces", "get")),
        ("GET /api/v1/namespaces", ("", "namespaces", "list")),
        (
            "POST /apis/events.k8s.io/v1/namespaces/default/events",
            ("events.k8s.io", "events", "create"),
        ),
        (
            "PATCH /apis/events.k8s.io/v1/namespaces/default/events/cart.17f3",
            ("events.k8s.io", "events", "patch"),
        ),
        (
            "PUT /api/v1/nodes/node1/status",
            ("", "nodes/status", "update"),
        ),
        (
            "DELETE /api/v1/namespaces/shop/pods/p",
            ("", "pods", "delete"),
        ),
        (
            "DELETE /api/v1/namespaces/shop/pods",
            ("", "pods", "deletecollection"),
        ),
    ] {
        assert_eq!(
            required_grant(request),
            (group.to_owned(), resource.to_owned(), verb.to_owned()),
            "{request}"
        );
    }
    for request in ["GET /healthz", "GET /apis", "HEAD /api/v1/services"] {
        assert!(
            std::panic::catch_unwind(|| required_grant(request)).is_err(),
            "{request} maps to no rule"
        );
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_owned()
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The documents of a YAML file as JSON values (empty documents left out).
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        })
        .filter(|document| !document.is_null())
        .collect()
}

/// The files deploy/kustomization.yaml lists, after checking that it does nothing but list them
/// (a transformer would make the applied objects differ from the files this test reads).
fn kustomization_resources() -> Vec<PathBuf> {
    let path = deploy_dir().join("kustomization.yaml");
    let [kustomization] = yaml_documents(&path)
        .try_into()
        .expect("kustomization.yaml is one document");
    let fields: BTreeSet<&str> = kustomization
        .as_object()
        .expect("kustomization is a mapping")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from(["apiVersion", "kind", "resources"]),
        "kustomization.yaml should only list resources"
    );
    assert_eq!(kustomization["kind"], "Kustomization");
    assert_eq!(
        kustomization["apiVersion"],
        "kustomize.config.k8s.io/v1beta1"
    );
    let resources: Vec<PathBuf> = kustomization["resources"]
        .as_array()
        .expect("resources is a list")
        .iter()
        .map(|resource| deploy_dir().join(resource.as_str().expect("resource is a file name")))
        .collect();
    assert!(!resources.is_empty(), "the kustomization lists nothing");
    resources
}

/// Deserializes `document` into `T`, then requires every field of the document to survive the
/// way back: k8s-openapi (like serde) ignores unknown fields, and a misspelt or misplaced field
/// would be silently dropped by the API server the same way.
fn strict<T: DeserializeOwned + Serialize>(document: &Value, origin: &str) -> T {
    let typed: T = serde_json::from_value(document.clone())
        .unwrap_or_else(|error| panic!("{origin}: {error}"));
    let kept = serde_json::to_value(&typed).expect("k8s-openapi objects serialize");
    let mut lost = Vec::new();
    fields_lost(document, &kept, String::new(), &mut lost);
    assert!(
        lost.is_empty(),
        "{origin}: not fields of {}: {lost:?}",
        std::any::type_name::<T>()
    );
    typed
}

fn fields_lost(original: &Value, kept: &Value, path: String, lost: &mut Vec<String>) {
    match (original, kept) {
        (Value::Object(original), Value::Object(kept)) => {
            for (name, value) in original {
                let field = format!("{path}.{name}");
                match kept.get(name) {
                    Some(kept) => fields_lost(value, kept, field, lost),
                    None => lost.push(field),
                }
            }
        }
        (Value::Array(original), Value::Array(kept)) if original.len() == kept.len() => {
            for (index, (value, kept)) in original.iter().zip(kept).enumerate() {
                fields_lost(value, kept, format!("{path}[{index}]"), lost);
            }
        }
        (original, kept) if original != kept => {
            lost.push(format!("{path}: {original} read as {kept}"));
        }
        _ => {}
    }
}

/// Everything the kustomization applies, typed.
struct Manifests {
    service_account: ServiceAccount,
    cluster_role: ClusterRole,
    binding: ClusterRoleBinding,
    admission_policy: ValidatingAdmissionPolicy,
    admission_binding: ValidatingAdmissionPolicyBinding,
    config_map: ConfigMap,
    /// The ConfigMap's file, for the settings that are commented out.
    config_map_file: PathBuf,
    daemon_set: DaemonSet,
}

fn is<K: Resource>(document: &Value) -> bool {
    document["apiVersion"] == K::API_VERSION && document["kind"] == K::KIND
}

fn manifests() -> Manifests {
    let mut service_accounts = Vec::new();
    let mut cluster_roles = Vec::new();
    let mut bindings = Vec::new();
    let mut admission_policies = Vec::new();
    let mut admission_bindings = Vec::new();
    let mut config_maps = Vec::new();
    let mut daemon_sets = Vec::new();
    for file in kustomization_resources() {
        for (index, document) in yaml_documents(&file).iter().enumerate() {
            let origin = format!("{} document {index}", file.display());
            if is::<ServiceAccount>(document) {
                service_accounts.push(strict::<ServiceAccount>(document, &origin));
            } else if is::<ClusterRole>(document) {
                cluster_roles.push(strict::<ClusterRole>(document, &origin));
            } else if is::<ClusterRoleBinding>(document) {
                bindings.push(strict::<ClusterRoleBinding>(document, &origin));
            } else if is::<ValidatingAdmissionPolicy>(document) {
                admission_policies.push(strict::<ValidatingAdmissionPolicy>(document, &origin));
            } else if is::<ValidatingAdmissionPolicyBinding>(document) {
                admission_bindings.push(strict::<ValidatingAdmissionPolicyBinding>(
                    document, &origin,
                ));
            } else if is::<ConfigMap>(document) {
                config_maps.push((strict::<ConfigMap>(document, &origin), file.clone()));
            } else if is::<DaemonSet>(document) {
                daemon_sets.push(strict::<DaemonSet>(document, &origin));
            } else {
                panic!(
                    "{origin}: unexpected {} {}",
                    document["apiVersion"], document["kind"]
                );
            }
        }
    }
    let (config_map, config_map_file) = only(config_maps, "ConfigMap");
    Manifests {
        service_account: only(service_accounts, "ServiceAccount"),
        cluster_role: only(cluster_roles, "ClusterRole"),
        binding: only(bindings, "ClusterRoleBinding"),
        admission_policy: only(admission_policies, "ValidatingAdmissionPolicy"),
        admission_binding: only(admission_bindings, "ValidatingAdmissionPolicyBinding"),
        config_map,
        config_map_file,
        daemon_set: only(daemon_sets, "DaemonSet"),
    }
}

fn only<T>(objects: Vec<T>, kind: &str) -> T {
    let count = objects.len();
    let [object] = objects
        .try_into()
        .unwrap_or_else(|_| panic!("the kustomization should hold one {kind}, not {count}"));
    object
}

impl Manifests {
    fn pod(&self) -> &PodSpec {
        self.daemon_set
            .spec
            .as_ref()
            .and_then(|spec| spec.template.spec.as_ref())
            .expect("the DaemonSet has a pod template")
    }

    /// The agent's container: the only one.
    fn agent(&self) -> &Container {
        let [agent] = self.pod().containers.as_slice() else {
            panic!("the pod should run the agent alone");
        };
        agent
    }

    /// The one init container, `lb init-node`: it mounts bpffs on the host when the host has
    /// none, creates the pin directory and sets the sysctls.
    fn bpffs_init_container(&self) -> &Container {
        let [init] = self.pod().init_containers.as_deref().unwrap_or_default() else {
            panic!("the pod should have one init container, init-node");
        };
        init
    }

    fn settings(&self) -> &BTreeMap<String, String> {
        self.config_map
            .data
            .as_ref()
            .expect("the ConfigMap has data")
    }

    fn setting(&self, name: &str) -> &str {
        self.settings()
            .get(name)
            .unwrap_or_else(|| panic!("the ConfigMap sets {name}"))
    }

    /// The port of /metrics: the DaemonSet sets LB_METRICS_BIND_ADDRESS to the node's address
    /// (downward API status.hostIP, which is the pod's with hostNetwork), the one setting that
    /// is not the same on every node; the ConfigMap leaves it unset.
    fn metrics_port(&self) -> u16 {
        let env = self.agent().env.as_deref().unwrap_or_default();
        let position = |name: &str| env.iter().position(|var| var.name == name);
        let node_ip = position("NODE_IP").expect("NODE_IP in the agent's environment");
        let field = env[node_ip]
            .value_from
            .as_ref()
            .and_then(|from| from.field_ref.as_ref())
            .expect("NODE_IP from the downward API");
        assert_eq!(field.field_path, "status.hostIP");
        let bind = position("LB_METRICS_BIND_ADDRESS").expect("LB_METRICS_BIND_ADDRESS set");
        // Kubernetes expands $(NAME) only for variables defined earlier in the list.
        assert!(node_ip < bind, "NODE_IP must come before its use");
        let value = env[bind].value.as_deref().expect("a value");
        let port = value
            .strip_prefix("$(NODE_IP):")
            .unwrap_or_else(|| panic!("{value:?} should be $(NODE_IP):PORT"));
        assert!(
            !self.settings().contains_key("LB_METRICS_BIND_ADDRESS"),
            "the ConfigMap would be overridden by the DaemonSet's value"
        );
        port.parse().expect("a port")
    }

    fn bind_port(&self, name: &str) -> u16 {
        let address: SocketAddr = self
            .setting(name)
            .parse()
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        // The kubelet probes and Prometheus scrapes the pod's IP, which is the node's.
        assert!(
            address.ip().is_unspecified(),
            "{name} should listen on every address of the node, not {address}"
        );
        address.port()
    }

    fn container_port(&self, port: &IntOrString) -> u16 {
        let number = match port {
            IntOrString::Int(number) => *number,
            IntOrString::String(name) => {
                self.agent()
                    .ports
                    .iter()
                    .flatten()
                    .find(|port| port.name.as_deref() == Some(name))
                    .unwrap_or_else(|| panic!("no container port named {name}"))
                    .container_port
            }
        };
        u16::try_from(number).expect("a port number")
    }

    /// The settings that are commented out in the ConfigMap's file (unset on purpose), with
    /// their example values: lines `# LB_NAME: "value"`.
    fn commented_settings(&self) -> BTreeMap<String, String> {
        read(&self.config_map_file)
            .lines()
            .filter_map(|line| {
                let (name, value) = line.trim().strip_prefix("# ")?.split_once(": ")?;
                let is_setting = name.starts_with("LB_")
                    && name
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                let value = value.strip_prefix('"')?.strip_suffix('"')?;
                is_setting.then(|| (name.to_owned(), value.to_owned()))
            })
            .collect()
    }
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type_with_no_field_left_over() {
    let manifests = manifests();
    assert!(!manifests.settings().is_empty());
    // The optional file is checked by its own test, and everything else in deploy/ is applied.
    let listed: BTreeSet<PathBuf> = kustomization_resources().into_iter().collect();
    assert!(!listed.contains(&deploy_dir().join(POD_MONITOR)));
    for entry in std::fs::read_dir(deploy_dir()).expect("deploy/") {
        let path = entry.expect("entry").path();
        let is_yaml = path.extension().is_some_and(|ext| ext == "yaml");
        let name = path.file_name().expect("a file name");
        if is_yaml && name != "kustomization.yaml" && name != POD_MONITOR {
            assert!(listed.contains(&path), "{} is not applied", path.display());
        }
    }
}

#[test]
fn the_strict_parse_reports_a_misplaced_field() {
    let document = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "lb", "namespaces": "kube-system"}
    });
    let result = std::panic::catch_unwind(|| strict::<ServiceAccount>(&document, "test"));
    let message = *result
        .expect_err("a misspelt field is an error")
        .downcast::<String>()
        .expect("a message");
    assert!(message.contains(".metadata.namespaces"), "{message}");
}

#[test]
fn the_objects_refer_to_each_other() {
    let manifests = manifests();
    let account = &manifests.service_account.metadata;
    let daemon_set = &manifests.daemon_set;
    assert_eq!(account.namespace, daemon_set.metadata.namespace);
    assert_eq!(manifests.pod().service_account_name, account.name);

    let binding = &manifests.binding;
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&binding.role_ref.name),
        manifests.cluster_role.metadata.name.as_ref()
    );
    let [subject] = binding.subjects.as_deref().unwrap_or_default() else {
        panic!("the binding should name the agent's ServiceAccount alone");
    };
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(&subject.name), account.name.as_ref());
    assert_eq!(subject.namespace, account.namespace);

    // The admission policy applies to the agent's ServiceAccount, and its binding denies.
    let policy = &manifests.admission_policy;
    let admission_binding = manifests.admission_binding.spec.as_ref().expect("spec");
    assert_eq!(admission_binding.policy_name, policy.metadata.name);
    assert_eq!(
        admission_binding.validation_actions.as_deref(),
        Some(&["Deny".to_owned()][..])
    );
    assert!(admission_binding.match_resources.is_none() && admission_binding.param_ref.is_none());
    let username = format!(
        "system:serviceaccount:{}:{}",
        account.namespace.as_deref().expect("namespace"),
        account.name.as_deref().expect("name")
    );
    assert_eq!(username, lab::admission::LB_SERVICE_ACCOUNT);
    let spec = policy.spec.as_ref().expect("spec");
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
    let [condition] = spec.match_conditions.as_deref().unwrap_or_default() else {
        panic!("the policy should have one match condition, on the agent's username");
    };
    assert_eq!(
        condition.expression,
        format!("request.userInfo.username == '{username}'")
    );

    let agent = manifests.agent();
    let [source] = agent.env_from.as_deref().unwrap_or_default() else {
        panic!("the agent's environment should come from the ConfigMap alone");
    };
    let config_map = source.config_map_ref.as_ref().expect("a ConfigMap source");
    assert_eq!(
        Some(&config_map.name),
        manifests.config_map.metadata.name.as_ref()
    );
    assert_eq!(
        manifests.config_map.metadata.namespace,
        daemon_set.metadata.namespace
    );
    assert_ne!(config_map.optional, Some(true));
    assert_eq!(source.prefix, None, "a prefix would rename every setting");

    let spec = daemon_set.spec.as_ref().expect("spec");
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref());
    for (key, value) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            labels.and_then(|labels| labels.get(key)),
            Some(value),
            "the selector should match the pod template"
        );
    }
}

/// A Node as the API server holds it, with the annotations, labels, taint and owner fields
/// the policy must keep.
fn node(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name, "uid": format!("uid-{name}"), "resourceVersion": "41",
            "labels": {"kubernetes.io/hostname": name, "node-role.kubernetes.io/worker": ""},
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true"
            },
            "managedFields": [{"manager": "kubelet", "operation": "Update"}]
        },
        "spec": {
            "podCIDR": "10.244.1.0/24",
            "taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]
        },
        "status": {"nodeInfo": {"bootID": "b0"}}
    })
}

/// `node` after the JSON merge patch `patch`, with the field the API server itself changes on
/// every write.
fn patched(node: &Value, patch: Value) -> Value {
    let mut after = node.clone();
    lab::fake_apiserver::merge_patch(&mut after, &patch);
    after["metadata"]["resourceVersion"] = json!("42");
    after["metadata"]["managedFields"] = json!([{"manager": "lb", "operation": "Update"}]);
    after
}

/// The patch the agent sends: its mark set to `boot_id`, or removed (None).
fn mark_patch(boot_id: Option<&str>) -> Value {
    json!({"metadata": {"annotations": {lb_userspace::source::DIRECT_RETURN_MARK: boot_id}}})
}

/// deploy/admission-policy.yaml, evaluated as the API server would (`lab::admission`, a mock
/// of its admission; the CEL is the real expressions'): the agent's token may set and remove
/// its own Node's DSR mark, and change nothing else of any Node.
#[test]
fn the_admission_policy_lets_the_agent_change_its_own_nodes_mark_and_nothing_else() {
    let policy = Policy::of_deploy().expect("deploy/admission-policy.yaml");
    let node1 = node("node1");
    let marked = patched(&node1, mark_patch(Some("b0")));
    let bare = {
        let mut bare = node1.clone();
        bare["metadata"]
            .as_object_mut()
            .expect("metadata")
            .remove("annotations");
        bare["metadata"]
            .as_object_mut()
            .expect("metadata")
            .remove("labels");
        bare
    };
    let agent = Requester::lb_agent_on("node1");
    let admitted = [
        ("the mark set", &node1, marked.clone()),
        (
            "the mark of a new boot",
            &marked,
            patched(&marked, mark_patch(Some("b1"))),
        ),
        (
            "the mark removed",
            &marked,
            patched(&marked, mark_patch(None)),
        ),
        (
            "the mark removed when absent",
            &node1,
            patched(&node1, mark_patch(None)),
        ),
        (
            "the mark on a Node without annotations or labels",
            &bare,
            patched(&bare, mark_patch(Some("b0"))),
        ),
    ];
    for (what, before, after) in admitted {
        assert_eq!(
            policy.review_update("nodes", &agent, before, &after),
            Verdict::Admitted,
            "{what}"
        );
    }

    let only_its_node = "lb may update only the Node its pod runs on";
    let only_the_mark = "lb may change only its Node's lb.io/dsr-boot-id annotation";
    let no_claim = "carries no authentication.kubernetes.io/node-name claim";
    let node2 = node("node2");
    let with_mark = |patch: Value| {
        let mut patch = patch;
        lab::fake_apiserver::merge_patch(&mut patch, &mark_patch(Some("b0")));
        patched(&node1, patch)
    };
    let denied = [
        (
            "another Node's mark",
            &agent,
            &node2,
            patched(&node2, mark_patch(Some("b0"))),
            only_its_node,
        ),
        (
            "a label",
            &agent,
            &node1,
            with_mark(json!({"metadata": {"labels": {"x": "y"}}})),
            only_the_mark,
        ),
        (
            "a label removed",
            &agent,
            &node1,
            patched(
                &node1,
                json!({"metadata": {"labels": {"node-role.kubernetes.io/worker": null}}}),
            ),
            only_the_mark,
        ),
        (
            "the labels removed",
            &agent,
            &node1,
            patched(&node1, json!({"metadata": {"labels": null}})),
            only_the_mark,
        ),
        (
            "another annotation",
            &agent,
            &node1,
            with_mark(json!({"metadata": {"annotations": {"node.alpha.kubernetes.io/ttl": "5"}}})),
            only_the_mark,
        ),
        (
            "another annotation added",
            &agent,
            &node1,
            with_mark(json!({"metadata": {"annotations": {"x": "y"}}})),
            only_the_mark,
        ),
        (
            "another annotation removed",
            &agent,
            &node1,
            with_mark(json!({"metadata": {"annotations": {"node.alpha.kubernetes.io/ttl": null}}})),
            only_the_mark,
        ),
        (
            "the taints removed",
            &agent,
            &node1,
            with_mark(json!({"spec": {"taints": null}})),
            only_the_mark,
        ),
        (
            "the Node cordoned",
            &agent,
            &node1,
            patched(&node1, json!({"spec": {"unschedulable": true}})),
            only_the_mark,
        ),
        (
            "a finalizer",
            &agent,
            &node1,
            patched(&node1, json!({"metadata": {"finalizers": ["x/y"]}})),
            only_the_mark,
        ),
        (
            "an owner",
            &agent,
            &node1,
            patched(
                &node1,
                json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u"}]}}),
            ),
            only_the_mark,
        ),
        (
            "a token without the node claim",
            &Requester::lb_agent_without_node_claim(),
            &node1,
            marked.clone(),
            no_claim,
        ),
    ];
    for (what, requester, before, after, expected) in denied {
        match policy.review_update("nodes", requester, before, &after) {
            Verdict::Denied { message, reason } => {
                assert!(
                    message.contains(expected)
                        && message.starts_with(
                            "ValidatingAdmissionPolicy 'lb-own-node-dsr-mark' with binding"
                        ),
                    "{what}: {message}"
                );
                assert_eq!(reason, "Forbidden", "{what}");
            }
            verdict => panic!("{what}: {verdict:?}"),
        }
    }

    // The policy is the agent's alone: the kubelet and a ServiceAccount of the same name
    // elsewhere are not its business (RBAC decides theirs), nor is the status subresource,
    // which the agent is not granted.
    let relabelled = patched(&node1, json!({"metadata": {"labels": {"x": "y"}}}));
    for (what, requester, resource) in [
        (
            "the kubelet",
            Requester::other("system:node:node1"),
            "nodes",
        ),
        (
            "lb elsewhere",
            Requester::other("system:serviceaccount:default:lb"),
            "nodes",
        ),
        ("the status", agent.clone(), "nodes/status"),
    ] {
        assert_eq!(
            policy.review_update(resource, &requester, &node1, &relabelled),
            Verdict::NotMatched,
            "{what}"
        );
    }
}

/// A Service `name` in `default` with one TCP port, on `cluster_ip` and `external_ips`.
fn service(name: &str, cluster_ip: &str, external_ips: &[&str]) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": cluster_ip,
            "externalIPs": external_ips,
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]
        }
    })
}

/// Waits for an Event on the fake API server that `wanted` accepts, and returns it; panics
/// after [`WAIT`] with the Events, the requests and the agent's log.
async fn event(
    server: &FakeApiServer,
    agent: &KubeAgent,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(event) = server.events().into_iter().find(|event| wanted(event)) {
            return event;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no such Event: {:#?}\n{:#?}\n{}",
            server.events(),
            server.requests(),
            agent.text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The API calls the agent makes, as the rules they need: the requests the real agent (`lb run
/// --source kube`, what the DaemonSet runs, with its kube source and its event recorder) sends
/// to the fake API server through every kind of call it makes in a cluster:
/// - at its start it lists, then watches, Services and EndpointSlices in all namespaces and its
///   own Node (by a field selector on its name, which RBAC cannot narrow: the rule is for all
///   Nodes);
/// - a Service claiming another's ClusterIP as an externalIP gets a Warning Event, created;
/// - the other Service deleted, then back, the same Service gets the same Event again, which
///   the event recorder counts on the Event it created (`series.count` 2) with a patch. The
///   recorder patches only a repeat about the same object at the same resourceVersion (an
///   object changed to fix it and break it again gets a new Event): hence a problem that comes
///   and goes with another object.
///
/// Events about the Node (a node requirement missing) are the same calls, in `default`. An agent
/// with lb's XDP on its NICs also patches its Node (its DSR mark, [`marking_agent_calls`]).
async fn agent_api_calls() -> BTreeSet<Grant> {
    let lab = Lab::new().expect("lab");
    let pins = PinDir::new(&lab, "rbac").expect("pins");
    let scratch = ScratchDir::new(&lab, "rbac").expect("scratch");
    let server = FakeApiServer::start().await.expect("fake API server");
    server.apply(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}
    }));
    let owner = service("owner", "10.96.0.10", &[]);
    server.apply(&owner);
    server.apply(service("claimer", "10.96.0.11", &["10.96.0.10"]));
    server.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "claimer-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "claimer"}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.1.10"], "nodeName": "node1", "conditions": {"ready": true}}]
    }));

    let agent = KubeAgent::start(&lab, &pins, &scratch, &server, &[]).expect("lb run");
    agent.wait_for("synced", 1).await;
    assert!(
        server.wait_for_watches(WAIT).await,
        "not every watch is open: {:#?}\n{}",
        server.requests(),
        agent.text()
    );
    let conflict = |event: &Value| {
        event["reason"] == "FrontendConflict" && event["regarding"]["name"] == "claimer"
    };
    let created = event(&server, &agent, conflict).await;
    // The owner gone, the claimer serves the address: the agent's next sync finds nothing
    // invalid, so the problem is over...
    server.delete(Collection::Services, "default", "owner");
    agent.wait_for("invalid_objects=0", 1).await;
    // ...and when the owner is back, the agent reports the unchanged claimer again: the same
    // Event, counted.
    server.apply(&owner);
    let counted = event(&server, &agent, |event| {
        conflict(event) && event["series"]["count"] == 2
    })
    .await;
    assert_eq!(
        counted["metadata"]["name"],
        created["metadata"]["name"],
        "{:#?}",
        server.requests()
    );

    let mut grants: BTreeSet<Grant> = server
        .requests()
        .iter()
        .map(|request| required_grant(request))
        .collect();
    grants.extend(marking_agent_calls().await);
    grants
}

/// The calls of an agent with lb's XDP on its node's NIC (in the lab, as the DaemonSet's agent
/// on the node's NICs): it also marks its Node as taking DSR options, with a patch.
async fn marking_agent_calls() -> BTreeSet<Grant> {
    let (_setup, server) = tokio::task::block_in_place(|| lab::kube_agent::lab_agent(|_| {}))
        .expect("the agent in the lab");
    assert!(
        lab::kube_agent::wait_for_dsr_mark(&server, WAIT)
            .await
            .is_some(),
        "{:#?}",
        server.requests()
    );
    server
        .requests()
        .iter()
        .map(|request| required_grant(request))
        .collect()
}

/// The ClusterRole against the calls the agent makes (root: the agent loads its datapath):
/// nothing it needs is missing, and nothing it does not use is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_role_grants_exactly_the_api_calls_the_agent_makes() {
    let manifests = manifests();
    let mut granted = BTreeSet::new();
    for rule in manifests.cluster_role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    assert!(manifests.cluster_role.aggregation_rule.is_none());
    let made = agent_api_calls().await;
    let unused: Vec<&Grant> = granted.difference(&made).collect();
    let missing: Vec<&Grant> = made.difference(&granted).collect();
    assert!(
        unused.is_empty() && missing.is_empty(),
        "granted but never used by the agent: {unused:?}; used by the agent but not granted: \
         {missing:?}"
    );
}

#[test]
fn probes_scrape_port_and_host_mounts_match_the_agent_settings() {
    let manifests = manifests();
    let agent = manifests.agent();

    let healthz = manifests.bind_port("LB_HEALTHZ_BIND_ADDRESS");
    let probe_target = |probe: Option<&Probe>, what: &str| {
        let get = probe
            .and_then(|probe| probe.http_get.as_ref())
            .unwrap_or_else(|| panic!("the agent should have an HTTP {what} probe"));
        (get.path.clone(), manifests.container_port(&get.port))
    };
    assert_eq!(
        probe_target(agent.liveness_probe.as_ref(), "liveness"),
        (Some("/livez".into()), healthz)
    );
    assert_eq!(
        probe_target(agent.readiness_probe.as_ref(), "readiness"),
        (Some("/healthz".into()), healthz)
    );

    let metrics = manifests.metrics_port();
    assert_eq!(
        manifests.container_port(&IntOrString::String("metrics".into())),
        metrics
    );
    let annotations = manifests
        .daemon_set
        .spec
        .as_ref()
        .and_then(|spec| spec.template.metadata.as_ref())
        .and_then(|metadata| metadata.annotations.clone())
        .unwrap_or_default();
    let annotation = |key: &str| annotations.get(key).map(String::as_str);
    assert_eq!(annotation("prometheus.io/scrape"), Some("true"));
    assert_eq!(
        annotation("prometheus.io/port"),
        Some(metrics.to_string().as_str())
    );
    assert_eq!(annotation("prometheus.io/path"), Some("/metrics"));

    // Each host directory is mounted where the agent's settings look for it.
    let host_paths: BTreeMap<&str, &str> = manifests
        .pod()
        .volumes
        .iter()
        .flatten()
        .filter_map(|volume| {
            let host_path = volume.host_path.as_ref()?;
            Some((volume.name.as_str(), host_path.path.as_str()))
        })
        .collect();
    let mounts = agent.volume_mounts.as_deref().unwrap_or_default();
    let mount_of = |host_path: &str| {
        let (name, _) = host_paths
            .iter()
            .find(|(_, path)| **path == host_path)
            .unwrap_or_else(|| panic!("no hostPath volume of {host_path}"));
        mounts
            .iter()
            .find(|mount| mount.name == *name)
            .unwrap_or_else(|| panic!("volume {name} is not mounted"))
    };

    // The agent looks for bpffs at bpffs::DEFAULT_MOUNT, so the host's must be at that same
    // path in the pod. The init container mounts it on the host when missing; the agent must
    // not mount one of its own (it would stay in the container with every pin).
    let bpffs_mount = lb_userspace::datapath::bpffs::DEFAULT_MOUNT;
    let bpffs = mount_of(bpffs_mount);
    assert_eq!(bpffs.mount_path, bpffs_mount);
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(manifests.setting("LB_MOUNT_BPFFS"), "false");
    let init = manifests.bpffs_init_container();
    let init_mount = init
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| mount.name == bpffs.name)
        .expect("the init container mounts the bpffs volume");
    assert_eq!(init_mount.mount_path, bpffs_mount);
    assert_eq!(
        init_mount.mount_propagation.as_deref(),
        Some("Bidirectional")
    );
    let pin_dir = Path::new(manifests.setting("LB_PIN_DIR"));
    // Strictly below: `lb run --cleanup` removes the pin directory with everything in it.
    assert!(
        pin_dir.starts_with(bpffs_mount) && pin_dir != Path::new(bpffs_mount),
        "LB_PIN_DIR {} should be a directory of the host's bpffs",
        pin_dir.display()
    );

    let cgroup = mount_of("/sys/fs/cgroup");
    assert_eq!(manifests.setting("LB_CGROUP_PATH"), cgroup.mount_path);

    assert_eq!(
        host_paths.len(),
        2,
        "a host directory the agent does not use: {host_paths:?}"
    );
    assert_eq!(mounts.len(), 2, "a mount the agent does not use");
}

#[test]
fn the_agent_writes_no_sysctl_the_init_container_sets_them() {
    let manifests = manifests();
    // Nothing of the host's /proc reaches the agent: its own /proc/sys, which the runtime mounts
    // read-only in an unprivileged container, is all it reads (the node's, with hostNetwork).
    for volume in manifests.pod().volumes.iter().flatten() {
        if let Some(host_path) = &volume.host_path {
            assert!(
                !Path::new(&host_path.path).starts_with("/proc"),
                "volume {} mounts the host's {}",
                volume.name,
                host_path.path
            );
        }
    }
    for mount in manifests.agent().volume_mounts.iter().flatten() {
        assert!(
            !Path::new(&mount.mount_path).starts_with("/proc") || mount.read_only == Some(true),
            "{} is writable",
            mount.mount_path
        );
    }
    // The privileged init container sets them, on the interfaces the agent attaches to: it gets
    // the agent's settings from the same ConfigMap.
    let init = manifests.bpffs_init_container();
    assert_eq!(
        init.command.as_deref(),
        Some(&["/usr/local/bin/lb".to_owned(), "init-node".to_owned()][..])
    );
    let [source] = init.env_from.as_deref().unwrap_or_default() else {
        panic!("the init container's environment should be the ConfigMap");
    };
    assert_eq!(
        source.config_map_ref.as_ref().map(|map| &map.name),
        manifests.config_map.metadata.name.as_ref()
    );
    assert_eq!(init.args, None);
    let help = lb_help(&["init-node", "--help"]);
    for variable in [
        "LB_INTERFACES",
        "LB_PIN_DIR",
        "LB_NODE_PORT_RANGE",
        "LB_SNAT_PORT_RANGE",
        "LB_RESERVE_PORTS",
    ] {
        assert!(help.contains(&format!("[env: {variable}")), "{help}");
        manifests.setting(variable);
    }
}

#[test]
fn the_pod_runs_under_the_runtimes_default_seccomp_profile() {
    let manifests = manifests();
    let profile = manifests
        .pod()
        .security_context
        .as_ref()
        .and_then(|security| security.seccomp_profile.as_ref())
        .expect("a pod-level seccompProfile");
    assert_eq!(profile.type_, "RuntimeDefault");
    assert_eq!(profile.localhost_profile, None);
    // No container opts out (privileged ones run unfiltered anyway, whatever they say).
    let init = manifests.bpffs_init_container();
    for container in [manifests.agent(), init] {
        let own = container
            .security_context
            .as_ref()
            .and_then(|security| security.seccomp_profile.as_ref());
        assert_eq!(own, None, "{} sets its own seccompProfile", container.name);
    }
    // docs/deploy.md describes the profile that is set, and no other.
    let docs = read(&repo().join("docs").join("deploy.md"));
    assert!(docs.contains("`seccompProfile: RuntimeDefault`"));
    for claim in ["type: Localhost", "localhostProfile", "Localhost profile"] {
        assert!(
            !docs.contains(claim),
            "docs/deploy.md claims a Localhost profile: {claim}"
        );
    }
    assert!(
        !std::fs::read_dir(deploy_dir())
            .expect("deploy/")
            .any(|entry| entry
                .expect("entry")
                .path()
                .extension()
                .is_some_and(|ext| ext == "json")),
        "a seccomp profile file in deploy/ that nothing uses"
    );
}

#[test]
fn metrics_listen_on_loopback_unless_told_otherwise_like_kube_proxy() {
    // kube-proxy's --metrics-bind-address defaults to 127.0.0.1:10249: /metrics and the
    // unauthenticated PUT /debug/log-level stay on the node unless an address is given.
    let help = lb_help(&["run", "--help"]);
    let option = help
        .split("--metrics-bind-address")
        .nth(1)
        .and_then(|rest| rest.split("\n      --").next())
        .expect("--metrics-bind-address in lb run --help");
    assert!(option.contains("[default: 127.0.0.1:10249]"), "{option}");
}

#[test]
fn the_pod_runs_in_the_nodes_network_with_the_privileges_the_agent_needs() {
    let manifests = manifests();
    let pod = manifests.pod();
    assert_eq!(pod.host_network, Some(true));
    // Cluster DNS is a Service this agent serves; the agent must not depend on it.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations.iter().flatten().any(|toleration| {
            toleration.operator.as_deref() == Some("Exists")
                && toleration.key.is_none()
                && toleration.effect.is_none()
        }),
        "the agent should run on every node, whatever its taints"
    );
    let strategy = manifests
        .daemon_set
        .spec
        .as_ref()
        .and_then(|spec| spec.update_strategy.as_ref())
        .expect("an update strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|update| update.max_unavailable.as_ref()),
        Some(&IntOrString::Int(1))
    );

    let agent = manifests.agent();
    let security = agent.security_context.as_ref().expect("a security context");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    // Three capabilities, nothing else (docs/deploy.md, "Privileges"); the privileged part,
    // mounting bpffs on the host, is the init container's.
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON"].into());
    let init = manifests.bpffs_init_container();
    assert_eq!(
        init.security_context
            .as_ref()
            .and_then(|security| security.privileged),
        Some(true),
        "mounting bpffs so that the host sees it and writing sysctls take a privileged container"
    );
    let resources = agent.resources.as_ref().expect("resources");
    for bounds in [&resources.requests, &resources.limits] {
        let bounds = bounds.as_ref().expect("requests and limits");
        assert!(bounds.contains_key("cpu") && bounds.contains_key("memory"));
    }

    // No args: the ConfigMap is the one place for settings (a flag would override it silently).
    assert_eq!(agent.args, None);
    let command = agent.command.as_deref().expect("a command");
    assert_eq!(command.last().map(String::as_str), Some("run"));
    assert_eq!(
        Some(command),
        containerfile_entrypoint().as_deref(),
        "the DaemonSet should run what the image runs"
    );
    let env = agent.env.as_deref().unwrap_or_default();
    // The metrics address alone differs from node to node (Manifests::metrics_port).
    assert!(
        env.iter()
            .all(|var| !var.name.starts_with("LB_") || var.name == "LB_METRICS_BIND_ADDRESS"),
        "LB_* settings belong in the ConfigMap"
    );
    let node_name = env
        .iter()
        .find(|var| var.name == "NODE_NAME")
        .and_then(|var| var.value_from.as_ref())
        .and_then(|from| from.field_ref.as_ref())
        .expect("NODE_NAME from the downward API");
    assert_eq!(node_name.field_path, "spec.nodeName");
}

/// The Containerfile's exec-form ENTRYPOINT.
fn containerfile_entrypoint() -> Option<Vec<String>> {
    read(&repo().join("Containerfile"))
        .lines()
        .find_map(|line| line.strip_prefix("ENTRYPOINT "))
        .map(|json| serde_json::from_str(json).expect("ENTRYPOINT in exec form"))
}

#[test]
fn the_pod_monitor_scrapes_the_metrics_port() {
    let manifests = manifests();
    let [monitor] = yaml_documents(&deploy_dir().join(POD_MONITOR))
        .try_into()
        .expect("one PodMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["kind"], "PodMonitor");
    assert_eq!(
        monitor["metadata"]["namespace"].as_str(),
        manifests.daemon_set.metadata.namespace.as_deref()
    );
    let labels = manifests
        .daemon_set
        .spec
        .as_ref()
        .and_then(|spec| spec.template.metadata.as_ref())
        .and_then(|metadata| metadata.labels.clone())
        .unwrap_or_default();
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("a label selector");
    assert!(!selector.is_empty());
    for (key, value) in selector {
        assert_eq!(labels.get(key).map(String::as_str), value.as_str());
    }
    let [endpoint] = monitor["spec"]["podMetricsEndpoints"]
        .as_array()
        .expect("endpoints")
        .as_slice()
    else {
        panic!("one metrics endpoint");
    };
    let port = endpoint["port"].as_str().expect("a named port");
    assert_eq!(
        manifests.container_port(&IntOrString::String(port.into())),
        manifests.metrics_port()
    );
    assert_eq!(endpoint["path"], "/metrics");
}

/// `lb <args>`'s output, for `--help`.
fn lb_help(args: &[&str]) -> String {
    let output = Command::new(sibling_binary("lb").expect("lb binary"))
        .args(args)
        // With an LB_* variable set, clap would show its value; the names are what is compared.
        .env_clear()
        .output()
        .expect("lb --help");
    assert!(output.status.success());
    String::from_utf8(output.stdout).expect("UTF-8 help")
}

/// `lb run`'s options from its `--help`: long flag -> its environment variable, if any.
fn run_options() -> BTreeMap<String, Option<String>> {
    let help = lb_help(&["run", "--help"]);
    let mut options = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        // `      --flag <VALUE>` or `  -h, --help`; not a `- value:` of a list of possible values.
        let is_option = trimmed.starts_with("--") || trimmed.get(2..5) == Some(", -");
        if is_option {
            let flag = trimmed
                .split([' ', ','])
                .find(|word| word.starts_with("--"))
                .expect("a long flag");
            current = Some(flag.to_owned());
            options.insert(flag.to_owned(), None);
        } else if let (Some(flag), Some((_, rest))) = (&current, line.split_once("[env: ")) {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            options.insert(flag.clone(), Some(name));
        }
    }
    options
}

/// `--node-port-range` -> `LB_NODE_PORT_RANGE`.
fn env_name(flag: &str) -> String {
    format!(
        "LB_{}",
        flag.trim_start_matches("--")
            .replace('-', "_")
            .to_uppercase()
    )
}

/// The settings of `lb run`: environment variable -> flag.
fn agent_settings() -> BTreeMap<String, String> {
    let mut settings = BTreeMap::new();
    for (flag, env) in run_options() {
        match flag.as_str() {
            "--help" => {}
            // Deliberately no variable: a ConfigMap key must not turn the agent into a cleaner.
            "--cleanup" => assert_eq!(env, None),
            _ => {
                assert_eq!(env, Some(env_name(&flag)), "{flag}'s variable");
                settings.insert(env_name(&flag), flag);
            }
        }
    }
    settings
}

/// docs/deploy.md's settings table: environment variable -> flag.
fn documented_settings() -> BTreeMap<String, String> {
    let docs = read(&repo().join("docs").join("deploy.md"));
    docs.lines()
        .filter(|line| line.starts_with('|'))
        .filter_map(|row| {
            let code = |prefix: &str| {
                row.split('`')
                    .find(|span| span.starts_with(prefix))
                    .map(str::to_owned)
            };
            Some((code("LB_")?, code("--")?))
        })
        .collect()
}

#[test]
fn help_configmap_and_docs_list_the_same_settings() {
    let manifests = manifests();
    let settings = agent_settings();
    assert!(settings.contains_key("LB_MASTER") && settings.len() > 10);
    let names = |map: &BTreeMap<String, String>| map.keys().cloned().collect::<BTreeSet<_>>();

    // The agent ignores variables it does not know, so a misspelt key would do nothing.
    let set = names(manifests.settings());
    let unset = names(&manifests.commented_settings());
    assert!(
        set.is_disjoint(&unset),
        "set and commented out: {set:?} {unset:?}"
    );
    let in_config_map: BTreeSet<String> = set.union(&unset).cloned().collect();
    assert_eq!(
        in_config_map,
        names(&settings),
        "ConfigMap vs lb run --help"
    );

    assert_eq!(
        documented_settings(),
        settings,
        "docs/deploy.md's table vs lb run --help"
    );

    // In a cluster the agent reads the API server, whose `kubernetes` Service it serves itself.
    assert_eq!(manifests.setting("LB_SOURCE"), "kube");
    let master = manifests.setting("LB_MASTER");
    assert!(master.starts_with("https://") && !master.contains("kubernetes.default"));
    for iface in manifests.setting("LB_INTERFACES").split(',') {
        assert!(
            !iface.is_empty() && iface.len() < 16 && !iface.contains('/'),
            "{iface:?} is not an interface name"
        );
    }
}

#[test]
fn the_agent_accepts_every_configmap_value() {
    let manifests = manifests();
    // The DaemonSet's own LB_* value, as the kubelet expands it on a node.
    let metrics = format!("192.0.2.10:{}", manifests.metrics_port());
    lab::private_bpffs::with_private_bpffs(|bpffs| {
        // `lb run --cleanup` parses every flag and variable, sets up logging with LB_LOG_LEVEL,
        // then only removes the agent's pins: here of a pin directory on a private bpffs (the
        // flag wins over LB_PIN_DIR), whose removal shows that the run got that far.
        let pin_dir = bpffs.join("lb");
        std::fs::create_dir_all(pin_dir.join(lb_userspace::datapath::pins::LINKS_DIR))
            .expect("pin directory");
        let output = Command::new(sibling_binary("lb").expect("lb binary"))
            .args(["run", "--cleanup", "--pin-dir"])
            .arg(&pin_dir)
            .env_clear()
            .envs(manifests.settings())
            // The values that are commented out must work too once uncommented.
            .envs(manifests.commented_settings())
            .env("LB_METRICS_BIND_ADDRESS", &metrics)
            .env("NODE_NAME", "node-1")
            .output()
            .expect("lb run --cleanup");
        assert!(
            output.status.success(),
            "the agent refuses the ConfigMap: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!pin_dir.exists(), "the agent stopped before its cleanup");
    });
}

/// The base image of each stage of the Containerfile (`FROM image [AS name]`), but the stages'
/// own names and `scratch`.
fn containerfile_base_images(containerfile: &str) -> Vec<String> {
    let mut stages = BTreeSet::from(["scratch".to_owned()]);
    let mut images = Vec::new();
    for line in containerfile.lines() {
        let mut words = line.split_whitespace();
        if !words
            .next()
            .is_some_and(|word| word.eq_ignore_ascii_case("FROM"))
        {
            continue;
        }
        let mut words = words.filter(|word| !word.starts_with("--"));
        let image = words.next().expect("FROM names an image").to_owned();
        if words
            .next()
            .is_some_and(|word| word.eq_ignore_ascii_case("AS"))
        {
            stages.insert(words.next().expect("a stage name").to_owned());
        }
        if !stages.contains(&image) {
            images.push(image);
        }
    }
    images
}

/// Why `image` is not pinned to an explicit version, if it is not: a digest pins it; a tag
/// pins it when it starts with a version of at least two numbers (`1.99.1-bookworm`,
/// `12.12-slim`). `latest`, no tag, and floating tags such as `1-bookworm` or `bookworm` move.
fn unpinned(image: &str) -> Option<&'static str> {
    if image.contains("@sha256:") {
        return None;
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    let starts_with_version = |tag: &str| {
        let mut numbers = tag.split(['.', '-']);
        let mut number = || {
            numbers
                .next()
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        };
        number() && number()
    };
    match last.split_once(':') {
        None => Some("untagged (latest)"),
        Some((_, "latest")) => Some("latest"),
        Some((_, tag)) if !starts_with_version(tag) => Some("a floating tag"),
        Some(_) => None,
    }
}

#[test]
fn the_containerfile_pins_every_base_image_to_a_version() {
    for (image, expected) in [
        ("docker.io/library/rust:1.99.1-bookworm", None),
        ("gcr.io/distroless/cc-debian12@sha256:0123", None),
        ("localhost:5000/base:2.1", None),
        ("gcr.io/distroless/cc-debian12", Some("untagged (latest)")),
        ("localhost:5000/base", Some("untagged (latest)")),
        ("debian:latest", Some("latest")),
        ("rust:bookworm", Some("a floating tag")),
        ("docker.io/library/rust:1-bookworm", Some("a floating tag")),
        ("debian:12-slim", Some("a floating tag")),
        ("debian:12.12-slim", None),
    ] {
        assert_eq!(unpinned(image), expected, "{image}");
    }
    let example =
        "FROM rust:1.2 AS build\nFROM --platform=$BUILDPLATFORM build AS again\nFROM scratch\n";
    assert_eq!(containerfile_base_images(example), ["rust:1.2"]);

    let containerfile = read(&repo().join("Containerfile"));
    let images = containerfile_base_images(&containerfile);
    assert!(!images.is_empty());
    for image in &images {
        assert_eq!(unpinned(image), None, "{image}");
    }
    // The build stage's Rust is the one rust-toolchain.toml pins.
    let toolchain = read(&repo().join("rust-toolchain.toml"));
    let channel = toolchain
        .lines()
        .find_map(|line| line.strip_prefix("channel = "))
        .expect("a channel")
        .trim_matches('"');
    assert!(
        images
            .iter()
            .any(|image| image.starts_with(&format!("docker.io/library/rust:{channel}-"))),
        "no build stage on Rust {channel}: {images:?}"
    );
}

/// The memory the datapath's maps take at the default sizes, as the kernel charges it: the
/// `memlock` of each map's fdinfo (what `bpf_map_memory_usage` reports, kernel/bpf/syscall.c),
/// split into the maps whose size does not depend on the CPU count and, per CPU, the per-CPU
/// maps. Measured by loading the real datapath on a private bpffs in this process.
fn map_memory() -> (u64, u64) {
    /// BPF_MAP_TYPE_PERCPU_HASH, _PERCPU_ARRAY, _LRU_PERCPU_HASH (include/uapi/linux/bpf.h).
    const PER_CPU_TYPES: [u32; 3] = [5, 6, 10];
    lab::private_bpffs::with_private_bpffs(|bpffs| {
        let pins = bpffs.join("lb");
        let datapath = lb_userspace::datapath::Datapath::load(&pins).expect("load the datapath");
        let mut seen = BTreeSet::new();
        let (mut fixed, mut per_cpu) = (0u64, 0u64);
        for fd in std::fs::read_dir("/proc/self/fd").expect("fds").flatten() {
            let is_map = std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_str() == Some("anon_inode:bpf-map"));
            let info = std::fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ));
            let (true, Ok(info)) = (is_map, info) else {
                continue;
            };
            let field = |name: &str| -> u64 {
                info.lines()
                    .find_map(|line| line.strip_prefix(name))
                    .and_then(|value| value.trim().parse().ok())
                    .unwrap_or_else(|| panic!("{name} in {info}"))
            };
            if !seen.insert(field("map_id:")) {
                continue;
            }
            let memlock = field("memlock:");
            if PER_CPU_TYPES.contains(&(field("map_type:") as u32)) {
                per_cpu += memlock;
            } else {
                fixed += memlock;
            }
        }
        drop(datapath);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        (fixed, per_cpu / cpus)
    })
}

/// A Kubernetes memory quantity (`1Gi`, `384Mi`) in bytes.
fn bytes(quantity: &str) -> u64 {
    let (number, unit) = quantity.split_at(
        quantity
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(quantity.len()),
    );
    let number: u64 = number.parse().expect("a number");
    number
        * match unit {
            "Gi" => 1 << 30,
            "Mi" => 1 << 20,
            "Ki" => 1 << 10,
            "" => 1,
            other => panic!("unit {other}"),
        }
}

#[test]
fn the_memory_limit_leaves_room_for_the_maps_at_their_default_sizes() {
    const MIB: u64 = 1 << 20;
    let (fixed, per_cpu) = map_memory();
    eprintln!(
        "map memory at the default sizes: {:.1} MiB, plus {:.2} MiB per CPU",
        fixed as f64 / MIB as f64,
        per_cpu as f64 / MIB as f64
    );
    let manifests = manifests();
    let resources = manifests.agent().resources.as_ref().expect("resources");
    let limit = bytes(&resources.limits.as_ref().expect("limits")["memory"].0);
    // On 256 CPUs, with the agent's own copy of 10,000 Services and their EndpointSlices
    // (about 70 MiB, docs/agent.md) and as much again for the rest of the process.
    let needed = fixed + 256 * per_cpu + 140 * MIB;
    assert!(
        limit >= needed,
        "the limit {} MiB leaves no room for {} MiB",
        limit / MIB,
        needed / MIB
    );
    // docs/deploy.md and the DaemonSet's comment on its limit give the figure (to the MiB).
    let figure = format!("{} MiB", (fixed + MIB / 2) / MIB);
    for file in ["docs/deploy.md", "deploy/daemonset.yaml"] {
        let text = read(&repo().join(file));
        assert!(text.contains(&figure), "{file} does not say {figure}");
    }
}
