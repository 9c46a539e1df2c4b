//! deploy/admission-policy.yaml applied to an update as the API server's ValidatingAdmissionPolicy
//! admission applies it: the policy's resource rules and match conditions say whether it
//! applies, then its variables and validations are evaluated on `object`, `oldObject` and
//! `request`, and a validation that is false, or an expression that fails, denies the request
//! (`failurePolicy: Fail`) when the binding's actions include `Deny`.
//!
//! A mock of the API server's admission, since no API server can run here: the expressions are
//! evaluated by the `cel` crate (the CEL specification's language; the policy uses none of the
//! libraries Kubernetes adds), on the JSON of the objects and of the AdmissionRequest, whose
//! empty fields are left out as the API server's types leave them out. The fake API server
//! applies it to Node patches ([`crate::fake_apiserver::FakeApiServer::admit_node_patches`]).

use std::{collections::HashMap, path::PathBuf};

use anyhow::Context as _;
use serde::Deserialize as _;
use serde_json::{Value, json};

/// The username the API server gives the agent's ServiceAccount token (deploy/serviceaccount.yaml).
pub const LB_SERVICE_ACCOUNT: &str = "system:serviceaccount:kube-system:lb";
/// The claim of a pod-bound ServiceAccount token that names the pod's node.
pub const NODE_NAME_CLAIM: &str = "authentication.kubernetes.io/node-name";

/// Who sends a request, as the API server authenticated it.
#[derive(Clone, Debug)]
pub struct Requester {
    pub username: String,
    /// `userInfo.extra`.
    pub extra: HashMap<String, Vec<String>>,
}

impl Requester {
    /// The agent's token, as a pod on `node` holds it.
    pub fn lb_agent_on(node: &str) -> Self {
        Self {
            username: LB_SERVICE_ACCOUNT.to_owned(),
            extra: HashMap::from([(NODE_NAME_CLAIM.to_owned(), vec![node.to_owned()])]),
        }
    }

    /// The agent's token from a cluster that binds no node to it (before Kubernetes 1.30).
    pub fn lb_agent_without_node_claim() -> Self {
        Self {
            username: LB_SERVICE_ACCOUNT.to_owned(),
            extra: HashMap::new(),
        }
    }

    /// Someone else: the policy does not apply to them.
    pub fn other(username: &str) -> Self {
        Self {
            username: username.to_owned(),
            extra: HashMap::new(),
        }
    }

    fn user_info(&self) -> Value {
        let mut info = json!({ "username": self.username });
        if !self.extra.is_empty() {
            info["extra"] = json!(self.extra);
        }
        info
    }
}

/// What the policy makes of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The policy does not apply (another resource or operation, a match condition false).
    NotMatched,
    Admitted,
    /// Refused, with the message the API server answers and the Status reason.
    Denied {
        message: String,
        reason: String,
    },
}

/// One rule of `matchConstraints.resourceRules`.
#[derive(Debug)]
struct ResourceRule {
    api_groups: Vec<String>,
    api_versions: Vec<String>,
    operations: Vec<String>,
    resources: Vec<String>,
}

impl ResourceRule {
    fn matches(&self, group: &str, resource: &str, operation: &str) -> bool {
        let has = |list: &[String], wanted: &str| list.iter().any(|x| x == "*" || x == wanted);
        has(&self.api_groups, group)
            && has(&self.api_versions, "v1")
            && has(&self.operations, operation)
            && has(&self.resources, resource)
    }
}

struct Expression {
    name: String,
    source: String,
    program: cel::Program,
}

struct Validation {
    expression: Expression,
    message: String,
    reason: String,
}

/// A ValidatingAdmissionPolicy and whether its binding denies.
pub struct Policy {
    pub name: String,
    pub binding_name: String,
    rules: Vec<ResourceRule>,
    match_conditions: Vec<Expression>,
    variables: Vec<Expression>,
    validations: Vec<Validation>,
    /// The binding's `validationActions` include `Deny`.
    denies: bool,
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect()
}

fn expressions(list: &Value, what: &str) -> anyhow::Result<Vec<Expression>> {
    list.as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(index, entry)| {
            let source = entry["expression"]
                .as_str()
                .with_context(|| format!("{what} {index} has no expression"))?;
            let program = cel::Program::compile(source)
                .map_err(|error| anyhow::anyhow!("{what} {index}: {error}"))?;
            Ok(Expression {
                name: entry["name"].as_str().unwrap_or_default().to_owned(),
                source: source.to_owned(),
                program,
            })
        })
        .collect()
}

impl Policy {
    /// The policy and binding of deploy/admission-policy.yaml.
    pub fn of_deploy() -> anyhow::Result<Self> {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/admission-policy.yaml");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let documents = serde_yaml::Deserializer::from_str(&text)
            .map(|document| {
                Ok(serde_json::to_value(serde_yaml::Value::deserialize(
                    document,
                )?)?)
            })
            .collect::<anyhow::Result<Vec<Value>>>()?;
        Self::from_documents(&documents)
    }

    /// The ValidatingAdmissionPolicy among `documents` and its ValidatingAdmissionPolicyBinding.
    pub fn from_documents(documents: &[Value]) -> anyhow::Result<Self> {
        let of_kind = |kind: &str| {
            documents
                .iter()
                .find(|document| document["kind"] == kind)
                .with_context(|| format!("no {kind}"))
        };
        let policy = of_kind("ValidatingAdmissionPolicy")?;
        let binding = of_kind("ValidatingAdmissionPolicyBinding")?;
        let name = policy["metadata"]["name"]
            .as_str()
            .context("the policy has no name")?
            .to_owned();
        anyhow::ensure!(
            binding["spec"]["policyName"] == name.as_str(),
            "the binding names another policy"
        );
        let spec = &policy["spec"];
        anyhow::ensure!(
            spec["failurePolicy"] == "Fail",
            "only failurePolicy Fail is modelled"
        );
        let rules = spec["matchConstraints"]["resourceRules"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|rule| ResourceRule {
                api_groups: strings(&rule["apiGroups"]),
                api_versions: strings(&rule["apiVersions"]),
                operations: strings(&rule["operations"]),
                resources: strings(&rule["resources"]),
            })
            .collect();
        let validations = spec["validations"]
            .as_array()
            .into_iter()
            .flatten()
            .zip(expressions(&spec["validations"], "validation")?)
            .map(|(entry, expression)| Validation {
                message: entry["message"].as_str().map_or_else(
                    || format!("failed expression: {}", expression.source),
                    str::to_owned,
                ),
                reason: entry["reason"].as_str().unwrap_or("Invalid").to_owned(),
                expression,
            })
            .collect();
        Ok(Self {
            binding_name: binding["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            rules,
            match_conditions: expressions(&spec["matchConditions"], "match condition")?,
            variables: expressions(&spec["variables"], "variable")?,
            validations,
            denies: strings(&binding["spec"]["validationActions"])
                .iter()
                .any(|action| action == "Deny"),
            name,
        })
    }

    /// An UPDATE of the cluster-scoped `resource` (core group, version v1; `nodes/status` for a
    /// subresource) from `old` to `new` by `requester`.
    pub fn review_update(
        &self,
        resource: &str,
        requester: &Requester,
        old: &Value,
        new: &Value,
    ) -> Verdict {
        if !self
            .rules
            .iter()
            .any(|rule| rule.matches("", resource, "UPDATE"))
        {
            return Verdict::NotMatched;
        }
        let (resource, sub_resource) = resource.split_once('/').unwrap_or((resource, ""));
        let mut request = json!({
            "operation": "UPDATE",
            "resource": {"group": "", "version": "v1", "resource": resource},
            "name": new["metadata"]["name"],
            "userInfo": requester.user_info(),
        });
        if !sub_resource.is_empty() {
            request["subResource"] = json!(sub_resource);
        }
        let mut objects = Vec::new();
        for (name, value) in [("object", new), ("oldObject", old), ("request", &request)] {
            match cel::to_value(value) {
                Ok(value) => objects.push((name, value)),
                Err(error) => return self.denied(&format!("{name}: {error}"), "InternalError"),
            }
        }
        // The expressions see the objects and the variables evaluated so far.
        let scope = |variables: &HashMap<String, cel::Value>| {
            let mut context = cel::Context::default();
            for (name, value) in &objects {
                context.add_variable_from_value(*name, value.clone());
            }
            context.add_variable_from_value("variables", variables.clone());
            context
        };
        let mut variables: HashMap<String, cel::Value> = HashMap::new();
        for condition in &self.match_conditions {
            match condition.program.execute(&scope(&variables)) {
                Ok(cel::Value::Bool(true)) => {}
                Ok(cel::Value::Bool(false)) => return Verdict::NotMatched,
                outcome => {
                    return self.denied(
                        &format!("match condition {:?}: {outcome:?}", condition.name),
                        "InternalError",
                    );
                }
            }
        }
        for variable in &self.variables {
            match variable.program.execute(&scope(&variables)) {
                Ok(value) => {
                    variables.insert(variable.name.clone(), value);
                }
                Err(error) => {
                    return self.denied(
                        &format!("variable {:?}: {error}", variable.name),
                        "InternalError",
                    );
                }
            }
        }
        let context = scope(&variables);
        for validation in &self.validations {
            match validation.expression.program.execute(&context) {
                Ok(cel::Value::Bool(true)) => {}
                Ok(cel::Value::Bool(false)) => {
                    return self.denied(&validation.message, &validation.reason);
                }
                outcome => {
                    return self.denied(
                        &format!(
                            "expression '{}' resulted in error: {outcome:?}",
                            validation.expression.source
                        ),
                        "Invalid",
                    );
                }
            }
        }
        Verdict::Admitted
    }

    /// A refusal worded as the API server's, or admission when the binding only warns or audits.
    fn denied(&self, message: &str, reason: &str) -> Verdict {
        if !self.denies {
            return Verdict::Admitted;
        }
        Verdict::Denied {
            message: format!(
                "ValidatingAdmissionPolicy '{}' with binding '{}' denied request: {message}",
                self.name, self.binding_name
            ),
            reason: reason.to_owned(),
        }
    }
}
