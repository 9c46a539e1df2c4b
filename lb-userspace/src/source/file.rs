//! YAML files as a source: Services, EndpointSlices and Nodes as Kubernetes manifests
//! (multi-document files, `kind: List`, or a directory of `.yaml`/`.yml`/`.json` files),
//! reloaded when a file changes and on SIGHUP.
//!
//! A file that does not parse is reported with its path and line, and the objects it held
//! before stay in force: a typo never removes a Service. A file that parses but has a bad
//! document (a type error, no kind) loses only that document, reported with its own line: the
//! other documents load, and the bad one's object keeps its last good version, if it had one.
//! Documents of other kinds (Deployments in the same manifest) are ignored.
//!
//! Manifests are untrusted input: a file over the size limit is refused unread, and the parser
//! bounds nesting and what aliases may expand to, so a small "billion laughs" file is refused in
//! milliseconds instead of taking seconds and hundreds of MB.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use tokio::sync::watch;

use super::Snapshot;

/// How often files are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// One object of a manifest.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Node(Box<Node>),
}

/// Why a file, or one document of it, was not (re)loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    pub path: PathBuf,
    /// 1-based line of the problem, when known.
    pub line: Option<usize>,
    pub message: String,
    /// What is served instead.
    pub kept: Kept,
}

/// What stays in force when a file or a document does not load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// The whole file was refused; its objects of the last good version stay.
    LastGoodFile,
    /// The whole file was refused and it had no good version: nothing of it is served.
    NothingOfFile,
    /// One document was skipped (the rest of the file loaded); its object's last good version
    /// stays.
    LastGoodObject,
    /// One document was skipped (the rest of the file loaded); it had no good version.
    NothingOfDocument,
}

impl Kept {
    /// For the log line.
    pub fn describe(self) -> &'static str {
        match self {
            Self::LastGoodFile => "manifest not loaded; its last good objects stay in force",
            Self::NothingOfFile => {
                "manifest not loaded; it never loaded before, so nothing of it is served"
            }
            Self::LastGoodObject => {
                "document skipped, the rest of the manifest loaded; its object's last good version stays in force"
            }
            Self::NothingOfDocument => {
                "document skipped, the rest of the manifest loaded; nothing of it is served"
            }
        }
    }
}

/// A parsed manifest: the objects of its good documents, and the documents it skipped.
#[derive(Debug, Default)]
pub struct Manifest {
    pub objects: Vec<Object>,
    pub skipped: Vec<SkippedDocument>,
}

/// A document that was not loaded: where, why, and which object it meant when that is known.
#[derive(Clone, Debug)]
pub struct SkippedDocument {
    /// 1-based line where the document (or the list item's list) starts.
    pub line: usize,
    pub message: String,
    /// Kind, namespace and name, when the document has them.
    pub identity: Option<Identity>,
}

/// Kind, namespace (empty for Nodes) and name of an object.
pub type Identity = (String, String, String);

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// The largest manifest file read, unless `--manifest-max-bytes` says otherwise: a few thousand
/// Services. A larger file is refused before it is parsed.
pub const DEFAULT_MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// Nesting of sequences and mappings a manifest may use (Kubernetes objects need about 10), and
/// how deep aliases may refer to aliases.
const MAX_NESTING: usize = 64;

/// Parser events that aliases may replay across one file. Manifests rarely use aliases at all; an
/// alias bomb (each level a list of aliases to the level before) asks for billions, and is
/// refused once it has cost this many, in a few milliseconds and a few MB.
const MAX_ALIAS_REPLAY_EVENTS: usize = 20_000;

/// How a manifest is parsed (serde-saphyr): alias expansion, nesting and the number of aliases
/// are bounded here; the size of the text, and with it everything else, by the file size limit.
fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_NESTING;
    // Bounded by the file size: a file of a few thousand Services has more nodes and documents
    // than the library's defaults for configuration files.
    budget.max_documents = usize::MAX;
    budget.max_nodes = usize::MAX;
    budget.max_events = usize::MAX;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = MAX_ALIAS_REPLAY_EVENTS;
    options.alias_limits.max_replay_stack_depth = MAX_NESTING;
    // One-line errors for the log, not source excerpts.
    options.with_snippet = false;
    options
}

/// Parses every document of a YAML (or JSON) text. Err: (1-based line, message).
pub fn parse_documents(text: &str) -> Result<Vec<Object>, (Option<usize>, String)> {
    let manifest = parse_manifest(text)?;
    match manifest.skipped.into_iter().next() {
        Some(skipped) => Err((Some(skipped.line), skipped.message)),
        None => Ok(manifest.objects),
    }
}

/// Parses a manifest document by document: a YAML syntax error (or a limit) refuses the whole
/// text; a document that does not make an object is skipped on its own.
pub fn parse_manifest(text: &str) -> Result<Manifest, (Option<usize>, String)> {
    let documents: Vec<serde_saphyr::Spanned<serde_json::Value>> =
        serde_saphyr::from_multiple_with_options(text, yaml_options()).map_err(|err| {
            let line = err.location().map(|location| line_number(location.line()));
            (line, err.to_string())
        })?;
    let mut manifest = Manifest::default();
    for document in documents {
        collect(
            document.value,
            line_number(document.referenced.line()),
            &mut manifest,
        );
    }
    Ok(manifest)
}

/// The identity an object's document claims, read without typing it.
fn identity(kind: &str, value: &serde_json::Value) -> Option<Identity> {
    let metadata = value.get("metadata")?;
    let name = metadata.get("name")?.as_str()?;
    let namespace = if kind == "Node" {
        ""
    } else {
        metadata
            .get("namespace")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("default")
    };
    Some((kind.to_owned(), namespace.to_owned(), name.to_owned()))
}

/// The identity of an object as [`identity`] gives it for its document.
fn identity_of(object: &Object) -> Option<Identity> {
    let (kind, metadata) = match object {
        Object::Service(service) => ("Service", &service.metadata),
        Object::EndpointSlice(slice) => ("EndpointSlice", &slice.metadata),
        Object::Node(node) => ("Node", &node.metadata),
    };
    let namespace = if kind == "Node" {
        String::new()
    } else {
        metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into())
    };
    Some((kind.to_owned(), namespace, metadata.name.clone()?))
}

fn line_number(line: u64) -> usize {
    usize::try_from(line).unwrap_or(usize::MAX)
}

/// Gives an object without a resourceVersion (hand-written manifests have none) one derived from
/// its content, as the API server would give a new version on every change: the compiler then
/// skips unchanged Services and the change counters count real changes only.
fn stamp_resource_version(value: &mut serde_json::Value) {
    use std::hash::{Hash as _, Hasher as _};
    let has_version = value
        .get("metadata")
        .and_then(serde_json::Value::as_object)
        .is_none_or(|metadata| metadata.contains_key("resourceVersion"));
    if has_version {
        return;
    }
    let mut hasher = std::hash::DefaultHasher::new();
    value.to_string().hash(&mut hasher);
    let version = format!("file-{:016x}", hasher.finish());
    if let Some(metadata) = value
        .get_mut("metadata")
        .and_then(serde_json::Value::as_object_mut)
    {
        metadata.insert("resourceVersion".into(), version.into());
    }
}

fn collect(value: serde_json::Value, line: usize, manifest: &mut Manifest) {
    if value.is_null() {
        return;
    }
    let kind = value
        .get("kind")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let typed = |mut value: serde_json::Value| {
        stamp_resource_version(&mut value);
        let name = value
            .get("metadata")
            .and_then(|metadata| metadata.get("name"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("<unnamed>")
            .to_owned();
        (identity(&kind, &value), value, name)
    };
    let result = match kind.as_str() {
        "Service" | "EndpointSlice" | "Node" => {
            let (identity, value, name) = typed(value);
            let object = match kind.as_str() {
                "Service" => typed_object(value).and_then(checked_service),
                "EndpointSlice" => typed_object(value).map(|s| Object::EndpointSlice(Arc::new(s))),
                _ => typed_object(value).map(|n| Object::Node(Box::new(n))),
            };
            object.map_err(|err| (format!("{kind} {name:?}: {err}"), identity))
        }
        list if list == "List" || list.ends_with("List") => {
            if let serde_json::Value::Object(mut list) = value
                && let Some(serde_json::Value::Array(items)) = list.remove("items")
            {
                for item in items {
                    collect(item, line, manifest);
                }
            }
            return;
        }
        "" => Err(("document without a kind".to_owned(), None)),
        other => match meant_kind(other) {
            // Reported like any document that could not be read, not dropped unseen.
            Some(meant) => Err((format!("kind {other:?} is none lb reads: {meant}?"), None)),
            // A kind lb has no use for (a Deployment beside the Services): not lb's.
            None => return,
        },
    };
    match result {
        Ok(object) => manifest.objects.push(object),
        Err((message, identity)) => manifest.skipped.push(SkippedDocument {
            line,
            message,
            identity,
        }),
    }
}

/// The object a document's value makes; a value of the wrong type is named by its field's path
/// (`spec.ports[0].port: invalid type: string "http", expected i32`).
fn typed_object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        match path.as_str() {
            "." => error.into_inner().to_string(),
            _ => format!("{path}: {}", error.into_inner()),
        }
    })
}

/// A Service of a manifest, refused when a field holds a value the API server would refuse
/// ([`crate::compile::unsupported_value`]).
fn checked_service(service: Service) -> Result<Object, String> {
    match service
        .spec
        .as_ref()
        .and_then(crate::compile::unsupported_value)
    {
        Some(problem) => Err(problem),
        None => Ok(Object::Service(Arc::new(service))),
    }
}

/// The kind lb reads that `kind` looks like a misspelling of: one of them in other letter case,
/// or within two edits of the longer ones (not of `Node`, which is two edits from `Pod`).
fn meant_kind(kind: &str) -> Option<&'static str> {
    ["Service", "EndpointSlice", "Node"]
        .into_iter()
        .find(|&meant| {
            kind.eq_ignore_ascii_case(meant) || (meant.len() > 4 && edit_distance(kind, meant) <= 2)
        })
}

/// Levenshtein distance (insertions, deletions and substitutions), for short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, a_char) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, &b_char) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(a_char != b_char);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// A manifest's good objects, plus, for each skipped document that names an object the file's
/// last version held, that object as it was; and the skipped documents with what stays of each.
fn keep_last_good(
    manifest: Manifest,
    before: &[Object],
) -> (Vec<Object>, Vec<(SkippedDocument, Kept)>) {
    let mut objects = manifest.objects;
    let loaded: std::collections::BTreeSet<Identity> =
        objects.iter().filter_map(identity_of).collect();
    let mut skipped = Vec::new();
    for document in manifest.skipped {
        let last_good = document
            .identity
            .as_ref()
            .filter(|identity| !loaded.contains(*identity))
            .and_then(|identity| {
                before
                    .iter()
                    .find(|object| identity_of(object).as_ref() == Some(identity))
            });
        let kept = match last_good {
            Some(object) => {
                objects.push(object.clone());
                Kept::LastGoodObject
            }
            None => Kept::NothingOfDocument,
        };
        skipped.push((document, kept));
    }
    (objects, skipped)
}

/// The files a path stands for: itself, or the manifests directly inside a directory.
fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, FileError> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let entries = std::fs::read_dir(path).map_err(|err| FileError {
        path: path.to_owned(),
        line: None,
        message: err.to_string(),
        kept: Kept::NothingOfFile,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|file| {
            file.extension()
                .and_then(|ext| ext.to_str())
                .is_some_and(|ext| matches!(ext, "yaml" | "yml" | "json"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// What a file looked like when it was last read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let metadata = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: metadata.modified().ok(),
        len: metadata.len(),
    })
}

/// Reads a manifest, refusing one larger than `max_bytes` without reading it (or, if it grows
/// while being read, without reading more than `max_bytes + 1`).
fn read_manifest(path: &Path, max_bytes: u64) -> Result<String, String> {
    use std::io::Read as _;
    let too_large = |size: u64| {
        format!(
            "{size} bytes, more than the {max_bytes} a manifest may have (--manifest-max-bytes); not parsed"
        )
    };
    let file = std::fs::File::open(path).map_err(|err| err.to_string())?;
    let size = file.metadata().map_err(|err| err.to_string())?.len();
    if size > max_bytes {
        return Err(too_large(size));
    }
    let mut text = String::new();
    file.take(max_bytes.saturating_add(1))
        .read_to_string(&mut text)
        .map_err(|err| err.to_string())?;
    let read = u64::try_from(text.len()).unwrap_or(u64::MAX);
    if read > max_bytes {
        return Err(too_large(read));
    }
    Ok(text)
}

/// The file source: the configured paths and the last good objects of every file.
pub struct FileSource {
    paths: Vec<PathBuf>,
    node_name: String,
    max_bytes: u64,
    files: BTreeMap<PathBuf, (Option<Stamp>, Vec<Object>)>,
}

impl FileSource {
    /// `node_name` picks this agent's Node among the Node objects of the files.
    pub fn new(paths: Vec<PathBuf>, node_name: impl Into<String>) -> Self {
        Self {
            paths,
            node_name: node_name.into(),
            max_bytes: DEFAULT_MAX_MANIFEST_BYTES,
            files: BTreeMap::new(),
        }
    }

    /// Refuses files larger than `max_bytes` (default [`DEFAULT_MAX_MANIFEST_BYTES`]).
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Re-reads files whose size or modification time changed (all of them with `force`), and
    /// returns whether anything changed plus the errors of files that did not load (those keep
    /// their last good objects). A file that disappeared takes its objects with it.
    pub fn reload(&mut self, force: bool) -> (bool, Vec<FileError>) {
        let mut errors = Vec::new();
        let mut present = Vec::new();
        for path in &self.paths {
            match manifest_files(path) {
                Ok(files) => present.extend(files),
                Err(error) => errors.push(error),
            }
        }
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|path, _| present.contains(path));
        changed |= self.files.len() != before;
        for path in present {
            let current = stamp(&path);
            if !force
                && self
                    .files
                    .get(&path)
                    .is_some_and(|(seen, _)| *seen == current)
            {
                continue;
            }
            let result = read_manifest(&path, self.max_bytes)
                .map_err(|message| (None, message))
                .and_then(|text| parse_manifest(&text));
            match result {
                Ok(manifest) => {
                    let before = self.files.get(&path).map(|(_, objects)| objects.as_slice());
                    let (objects, skipped) = keep_last_good(manifest, before.unwrap_or_default());
                    errors.extend(skipped.into_iter().map(|(skipped, kept)| FileError {
                        path: path.clone(),
                        line: Some(skipped.line),
                        message: skipped.message,
                        kept,
                    }));
                    self.files.insert(path, (current, objects));
                    changed = true;
                }
                Err((line, message)) => {
                    // Remember the stamp so the same broken content is reported once, not every poll.
                    let kept = if let Some((seen, _)) = self.files.get_mut(&path) {
                        *seen = current;
                        Kept::LastGoodFile
                    } else {
                        self.files.insert(path.clone(), (current, Vec::new()));
                        Kept::NothingOfFile
                    };
                    errors.push(FileError {
                        path,
                        line,
                        message,
                        kept,
                    });
                }
            }
        }
        (changed, errors)
    }

    /// Everything the files hold now.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (_, objects) in self.files.values() {
            for object in objects {
                match object {
                    Object::Service(service) => snapshot.services.push(service.clone()),
                    Object::EndpointSlice(slice) => snapshot.endpoint_slices.push(slice.clone()),
                    Object::Node(node) => {
                        snapshot.node_addresses.extend(super::addresses_of(node));
                        snapshot
                            .direct_return_nodes
                            .extend(super::direct_return_nodes(std::iter::once(&**node)));
                        if node.metadata.name.as_deref() == Some(self.node_name.as_str()) {
                            snapshot.node = Some((**node).clone());
                        }
                    }
                }
            }
        }
        snapshot
    }

    /// Publishes a snapshot now and after every change (polled) or SIGHUP, until `updates` has no
    /// receiver left. Errors go to `report` (the agent logs and counts them).
    pub async fn run(
        mut self,
        updates: watch::Sender<Snapshot>,
        report: impl Fn(&FileError),
    ) -> anyhow::Result<()> {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let mut force = true;
        loop {
            let (changed, errors) = self.reload(force);
            errors.iter().for_each(&report);
            if changed || force {
                updates.send_replace(self.snapshot());
            }
            force = tokio::select! {
                _ = hangup.recv() => true,
                _ = tokio::time::sleep(POLL_INTERVAL) => false,
                _ = updates.closed() => return Ok(()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_kind_is_reported_and_other_kinds_are_left_alone() {
        let text = "kind: service\nmetadata: {name: a}\n---\nkind: EndpointSlce\n---\n\
                    kind: Servce\n---\nkind: node\n---\nkind: Pod\n---\nkind: Endpoints\n---\n\
                    kind: Deployment\n---\nkind: ConfigMap\n";
        let manifest = parse_manifest(text).expect("parses");
        let messages: Vec<&str> = manifest
            .skipped
            .iter()
            .map(|document| document.message.as_str())
            .collect();
        assert_eq!(
            messages,
            [
                "kind \"service\" is none lb reads: Service?",
                "kind \"EndpointSlce\" is none lb reads: EndpointSlice?",
                "kind \"Servce\" is none lb reads: Service?",
                "kind \"node\" is none lb reads: Node?",
            ]
        );
        assert!(manifest.objects.is_empty());
    }

    #[test]
    fn a_service_value_the_api_server_refuses_skips_its_document() {
        let text = "kind: Service\nmetadata: {name: bad}\nspec:\n  type: Nodeport\n---\n\
                    kind: Service\nmetadata: {name: etp}\nspec:\n  externalTrafficPolicy: local\n---\n\
                    kind: Service\nmetadata: {name: good}\nspec:\n  type: NodePort\n  sessionAffinity: \"\"\n";
        let manifest = parse_manifest(text).expect("parses");
        let skipped: Vec<(usize, &str)> = manifest
            .skipped
            .iter()
            .map(|document| (document.line, document.message.as_str()))
            .collect();
        assert_eq!(
            skipped,
            [
                (
                    1,
                    "Service \"bad\": spec.type: \"Nodeport\" is not one of ClusterIP, NodePort, \
                     LoadBalancer, ExternalName"
                ),
                (
                    6,
                    "Service \"etp\": spec.externalTrafficPolicy: \"local\" is not one of Cluster, \
                     Local"
                ),
            ]
        );
        assert_eq!(manifest.objects.len(), 1, "the good Service loads");
    }
}
