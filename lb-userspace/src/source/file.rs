//! YAML files as a source: Services, EndpointSlices and Nodes as Kubernetes manifests
//! (multi-document files, `kind: List`, or a directory of `.yaml`/`.yml`/`.json` files),
//! reloaded when a file changes and on SIGHUP.
//!
//! A file that does not parse is reported with its path and line, and the objects it held
//! before stay in force: a typo never removes a Service. Documents of other kinds (Deployments in
//! the same manifest) are ignored.

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

/// Why a file was not (re)loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    pub path: PathBuf,
    /// 1-based line of the problem, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// Parses every document of a YAML (or JSON) text. Err: (1-based line, message).
pub fn parse_documents(text: &str) -> Result<Vec<Object>, (Option<usize>, String)> {
    let mut objects = Vec::new();
    for (start_line, document) in split_documents(text) {
        if document.trim().is_empty() {
            continue;
        }
        let value: serde_yaml::Value = serde_yaml::from_str(&document).map_err(|err| {
            let line = err
                .location()
                .map(|location| start_line + location.line() - 1);
            (line, err.to_string())
        })?;
        collect(value, start_line, &mut objects)?;
    }
    Ok(objects)
}

/// Gives an object without a resourceVersion (hand-written manifests have none) one derived from
/// its content, as the API server would give a new version on every change: the compiler then
/// skips unchanged Services and the change counters count real changes only.
fn stamp_resource_version(value: &mut serde_yaml::Value) {
    use std::hash::{Hash as _, Hasher as _};
    let has_version = value
        .get("metadata")
        .and_then(serde_yaml::Value::as_mapping)
        .is_none_or(|metadata| metadata.contains_key("resourceVersion"));
    if has_version {
        return;
    }
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    let version = format!("file-{:016x}", hasher.finish());
    if let Some(metadata) = value
        .get_mut("metadata")
        .and_then(serde_yaml::Value::as_mapping_mut)
    {
        metadata.insert("resourceVersion".into(), version.into());
    }
}

/// Splits on `---` lines; each document with the 1-based line it starts on.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut documents = vec![(1, String::new())];
    for (index, line) in text.lines().enumerate() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            documents.push((index + 2, String::new()));
        } else if let Some((_, document)) = documents.last_mut() {
            document.push_str(line);
            document.push('\n');
        }
    }
    documents
}

fn collect(
    value: serde_yaml::Value,
    line: usize,
    objects: &mut Vec<Object>,
) -> Result<(), (Option<usize>, String)> {
    if value.is_null() {
        return Ok(());
    }
    let kind = value
        .get("kind")
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let typed = |mut value: serde_yaml::Value| -> Result<_, (Option<usize>, String)> {
        stamp_resource_version(&mut value);
        let name = value
            .get("metadata")
            .and_then(|metadata| metadata.get("name"))
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or("<unnamed>")
            .to_owned();
        Ok((value, name))
    };
    let convert_error = |kind: &str, name: &str, err: serde_yaml::Error| {
        (Some(line), format!("{kind} {name:?}: {err}"))
    };
    match kind.as_str() {
        "Service" => {
            let (value, name) = typed(value)?;
            let service = serde_yaml::from_value(value)
                .map_err(|err| convert_error("Service", &name, err))?;
            objects.push(Object::Service(Arc::new(service)));
        }
        "EndpointSlice" => {
            let (value, name) = typed(value)?;
            let slice = serde_yaml::from_value(value)
                .map_err(|err| convert_error("EndpointSlice", &name, err))?;
            objects.push(Object::EndpointSlice(Arc::new(slice)));
        }
        "Node" => {
            let (value, name) = typed(value)?;
            let node =
                serde_yaml::from_value(value).map_err(|err| convert_error("Node", &name, err))?;
            objects.push(Object::Node(Box::new(node)));
        }
        kind if kind == "List" || kind.ends_with("List") => {
            if let Some(serde_yaml::Value::Sequence(items)) = value.get("items").cloned() {
                for item in items {
                    collect(item, line, objects)?;
                }
            }
        }
        "" => return Err((Some(line), "document without a kind".into())),
        _ => {}
    }
    Ok(())
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

/// The file source: the configured paths and the last good objects of every file.
pub struct FileSource {
    paths: Vec<PathBuf>,
    node_name: String,
    files: BTreeMap<PathBuf, (Option<Stamp>, Vec<Object>)>,
}

impl FileSource {
    /// `node_name` picks this agent's Node among the Node objects of the files.
    pub fn new(paths: Vec<PathBuf>, node_name: impl Into<String>) -> Self {
        Self {
            paths,
            node_name: node_name.into(),
            files: BTreeMap::new(),
        }
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
            let result = std::fs::read_to_string(&path)
                .map_err(|err| (None, err.to_string()))
                .and_then(|text| parse_documents(&text));
            match result {
                Ok(objects) => {
                    self.files.insert(path, (current, objects));
                    changed = true;
                }
                Err((line, message)) => {
                    // Remember the stamp so the same broken content is reported once, not every poll.
                    if let Some((seen, _)) = self.files.get_mut(&path) {
                        *seen = current;
                    } else {
                        self.files.insert(path.clone(), (current, Vec::new()));
                    }
                    errors.push(FileError {
                        path,
                        line,
                        message,
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
