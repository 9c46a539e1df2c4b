//! The file source against hostile manifests: an alias bomb ("billion laughs"), deep nesting and
//! an oversize file are refused with an error naming the file, cheaply, and the objects the file
//! held before stay in force. Plain YAML, anchors used as intended, and JSON still load.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_userspace::source::file::{DEFAULT_MAX_MANIFEST_BYTES, FileSource, parse_documents};

/// A directory of its own under the system temp dir, removed on drop (also when a test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "lb-manifests-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }

    fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.0.join(file);
        std::fs::write(&path, text).expect("write manifest");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80}\n";

/// A Service whose annotations hold an alias bomb of about 15 KB: `levels` lists of 100
/// aliases, each to the list before, over a list of 100 strings; fully expanded it would be
/// 100^levels strings.
fn alias_bomb(levels: usize) -> String {
    let mut yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: laughs\n  namespace: default\n  annotations:\n".to_owned();
    yaml.push_str(&format!("    l0: &l0 [{}]\n", vec!["lol"; 100].join(", ")));
    for level in 1..levels {
        let alias = format!("*l{}", level - 1);
        yaml.push_str(&format!(
            "    l{level}: &l{level} [{}]\n",
            vec![alias.as_str(); 100].join(", ")
        ));
    }
    yaml
}

/// This process's peak resident set (VmHWM), in kB.
fn peak_rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

fn loaded(source: &FileSource) -> Vec<String> {
    source
        .snapshot()
        .services
        .iter()
        .filter_map(|service| service.metadata.name.clone())
        .collect()
}

/// Loads `file` with good content, replaces it with `hostile`, reloads: the error, the Services
/// loaded after it (the good one should stay), and how long the refusing reload took.
fn replace_with(
    dir: &TempDir,
    file: &str,
    hostile: &str,
    max_bytes: u64,
) -> (String, Vec<String>, Duration) {
    let path = dir.write(file, WEB);
    let mut source = FileSource::new(vec![path.clone()], "node1").with_max_bytes(max_bytes);
    let (_, errors) = source.reload(true);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(loaded(&source), ["web"]);
    dir.write(file, hostile);
    let started = Instant::now();
    let (_, errors) = source.reload(true);
    let took = started.elapsed();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let error = &errors[0];
    assert_eq!(error.path, path);
    (error.to_string(), loaded(&source), took)
}

/// Run alone in a child process by the next test, which reads the peak RSS growth it prints;
/// run with the others it checks the error and prints its numbers.
#[test]
fn an_alias_bomb_is_refused_with_an_error_naming_the_file() {
    let dir = TempDir::new("bomb");
    let bomb = alias_bomb(25);
    let size = bomb.len();
    assert!((14_000..16_000).contains(&size), "{size} bytes");
    let before_kb = peak_rss_kb();
    let (error, services, took) =
        replace_with(&dir, "laughs.yaml", &bomb, DEFAULT_MAX_MANIFEST_BYTES);
    let growth_kb = peak_rss_kb().saturating_sub(before_kb);
    println!(
        "alias bomb of {size} bytes refused in {:.1} ms, peak RSS growth {growth_kb} kB",
        took.as_secs_f64() * 1000.0
    );
    println!("peak-rss-growth-kb={growth_kb}");
    println!("{error}");
    assert!(error.contains("laughs.yaml"), "{error}");
    assert!(error.contains("alias"), "the error says why: {error}");
    assert_eq!(services, ["web"], "the last good objects stay in force");
}

#[test]
fn an_alias_bomb_costs_less_than_20_mb() {
    let test_binary = std::env::current_exe().expect("test binary");
    let output = std::process::Command::new(test_binary)
        .args([
            "--exact",
            "an_alias_bomb_is_refused_with_an_error_naming_the_file",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .expect("run the bomb test alone");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let growth_kb: u64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("peak-rss-growth-kb="))
        .and_then(|kb| kb.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in: {stdout}"));
    assert!(
        growth_kb < 20 * 1024,
        "the bomb grew the peak RSS by {growth_kb} kB"
    );
}

#[test]
fn an_oversize_file_is_refused_unread_with_an_error_naming_the_file() {
    let dir = TempDir::new("oversize");
    // Valid YAML, just too much of it: size, not content, refuses it.
    let padding = format!("# {}\n", "x".repeat(2000));
    let big = format!("{WEB}{padding}").replace("name: web", "name: big");
    let (error, services, _) = replace_with(&dir, "big.yaml", &big, 1024);
    assert!(error.contains("big.yaml"), "{error}");
    assert!(
        error.contains(&format!("{} bytes", big.len())) && error.contains("--manifest-max-bytes"),
        "{error}"
    );
    assert_eq!(services, ["web"], "the last good objects stay in force");

    // At the limit exactly it loads.
    let path = dir.write("exact.yaml", WEB);
    let mut source = FileSource::new(vec![path], "node1").with_max_bytes(WEB.len() as u64);
    let (_, errors) = source.reload(true);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(loaded(&source), ["web"]);
}

#[test]
fn nesting_deeper_than_kubernetes_objects_need_is_refused() {
    let depth = 200;
    let deep = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: deep\n  labels: {}{}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let (_, message) = parse_documents(&deep).expect_err("too deep");
    assert!(message.contains("depth"), "{message}");
}

#[test]
fn anchors_used_as_intended_json_and_lists_still_load() {
    // Anchors hold within one document (YAML), so both Services are items of one List.
    let anchored = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a, labels: &labels {app: web, tier: front}}\n  spec:\n    clusterIP: 10.96.0.11\n    ports: &ports\n    - {name: http, port: 80}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: b, labels: *labels}\n  spec: {clusterIP: 10.96.0.12, ports: *ports}\n";
    let objects = parse_documents(anchored).expect("anchors");
    assert_eq!(objects.len(), 2);
    let json = r#"{"apiVersion": "v1", "kind": "List", "items": [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "j"}, "spec": {"clusterIP": "10.96.0.13", "ports": [{"port": 80}]}}]}"#;
    assert_eq!(parse_documents(json).expect("JSON").len(), 1);
}
