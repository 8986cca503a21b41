//! Standalone mode: Kubernetes manifests in a directory.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file under the directory (recursively; entries whose
//! name starts with `.` are skipped, which also skips the `..data` machinery of a mounted
//! ConfigMap) is read as one or more YAML documents. `SseRoute`, `Service`, `EndpointSlice`,
//! `Secret` and `v1/List` objects are used; other kinds are ignored, so the same files can be
//! `kubectl apply`-ed to a cluster unchanged.
//!
//! A load is all or nothing: if any file cannot be read or parsed, the whole load fails with
//! one [`LoadError`] per bad document, and the caller keeps serving the last good table.
//! Problems that concern a single route's meaning (a missing Service, a bad path) are not
//! load errors; they are reported on that route by the compile step.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value;
use tokio::sync::mpsc;

use super::Snapshot;

/// Why one file (or one document in it) could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, including the document number and field path where known.
    pub reason: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// A successful load of a directory.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// The objects found.
    pub snapshot: Snapshot,
    /// Which file each object came from, keyed `Kind namespace/name`, for log messages.
    pub origins: HashMap<String, PathBuf>,
}

impl Loaded {
    /// The file an SseRoute `namespace/name` was read from.
    pub fn route_origin(&self, key: &str) -> Option<&Path> {
        self.origins
            .get(&format!("SseRoute {key}"))
            .map(PathBuf::as_path)
    }
}

/// Reads every manifest under `dir`.
pub fn load_dir(dir: &Path) -> Result<Loaded, Vec<LoadError>> {
    let files = list_files(dir).map_err(|e| {
        vec![LoadError {
            path: dir.to_path_buf(),
            reason: format!("cannot read directory: {e}"),
        }]
    })?;
    let mut loaded = Loaded::default();
    let mut errors = Vec::new();
    for path in files {
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_file(&path, &text, &mut loaded, &mut errors),
            Err(e) => errors.push(LoadError {
                path,
                reason: format!("cannot read file: {e}"),
            }),
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(errors)
    }
}

/// A cheap fingerprint of the directory's manifest files (names and contents), used to skip
/// reloads when nothing changed.
pub fn fingerprint(dir: &Path) -> u64 {
    let mut h = DefaultHasher::new();
    match list_files(dir) {
        Ok(files) => {
            for f in files {
                f.hash(&mut h);
                std::fs::read(&f).ok().hash(&mut h);
            }
        }
        Err(e) => e.kind().hash(&mut h),
    }
    h.finish()
}

fn list_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            // `metadata` follows symlinks, as ConfigMap mounts need.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Parses one file's documents into `loaded`, recording every problem in `errors`.
pub fn parse_file(path: &Path, text: &str, loaded: &mut Loaded, errors: &mut Vec<LoadError>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |reason: String| LoadError {
            path: path.to_path_buf(),
            reason: format!("document {}: {reason}", i + 1),
        };
        match Value::deserialize(doc) {
            Ok(Value::Null) => {}
            Ok(value) => {
                if let Err(reason) = add_object(value, path, loaded) {
                    errors.push(err(reason));
                }
            }
            Err(e) => {
                errors.push(err(format!("invalid YAML: {e}")));
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        }
    }
}

fn add_object(value: Value, path: &Path, loaded: &mut Loaded) -> Result<(), String> {
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if api_version.is_empty() || kind.is_empty() {
        return Err("missing apiVersion or kind".into());
    }
    let api_version = api_version.to_string();
    let kind = kind.to_string();
    let snap = &mut loaded.snapshot;
    let key = match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = match value.get("items") {
                Some(Value::Sequence(items)) => items.clone(),
                None | Some(Value::Null) => Vec::new(),
                Some(_) => return Err("List.items must be a sequence".into()),
            };
            for (n, item) in items.into_iter().enumerate() {
                add_object(item, path, loaded).map_err(|e| format!("items[{n}]: {e}"))?;
            }
            return Ok(());
        }
        (crate::api::API_VERSION, "SseRoute") => push(&mut snap.routes, value, &kind)?,
        ("v1", "Service") => push(&mut snap.services, value, &kind)?,
        ("discovery.k8s.io/v1", "EndpointSlice") => push(&mut snap.endpoint_slices, value, &kind)?,
        ("v1", "Secret") => push(&mut snap.secrets, value, &kind)?,
        (v, k) if v.starts_with(crate::api::GROUP) => {
            return Err(format!(
                "unknown kind {k} in {v} (expected SseRoute in ssegate.io/v1alpha1)"
            ));
        }
        (v, k) => {
            tracing::debug!(path = %path.display(), api_version = v, kind = k, "ignoring object");
            return Ok(());
        }
    };
    if let Some(first) = loaded.origins.insert(key.clone(), path.to_path_buf()) {
        return Err(format!(
            "{key} is defined twice (also in {})",
            first.display()
        ));
    }
    Ok(())
}

/// Deserialises `value` as `T` (with the field path in errors), defaults its namespace to
/// `default`, and appends it; returns its `Kind namespace/name` key.
fn push<T>(into: &mut Vec<T>, value: Value, kind: &str) -> Result<String, String>
where
    T: DeserializeOwned + kube::Resource,
{
    let mut obj: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let at = e.path().to_string();
        if at == "." {
            format!("invalid {kind}: {}", e.inner())
        } else {
            format!("invalid {kind}: {at}: {}", e.inner())
        }
    })?;
    let meta = obj.meta_mut();
    let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
        return Err(format!("{kind} without metadata.name"));
    };
    let ns = meta
        .namespace
        .get_or_insert_with(|| "default".to_string())
        .clone();
    into.push(obj);
    Ok(format!("{kind} {ns}/{name}"))
}

/// Watches `dir` and calls `on_load` with every changed load result. `loaded` is the
/// fingerprint of a load the caller already did (it is not repeated). Changes are noticed through filesystem notifications and, as a fallback for
/// filesystems without them, a poll every `poll`; bursts are coalesced for `debounce`.
/// Unchanged contents never trigger a reload. Runs until the task is dropped.
pub async fn watch(
    dir: PathBuf,
    loaded: Option<u64>,
    poll: Duration,
    debounce: Duration,
    mut on_load: impl FnMut(Result<Loaded, Vec<LoadError>>),
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let _watcher = start_notify(&dir, tx);
    let mut last = loaded;
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(()) = rx.recv() => {
                tokio::time::sleep(debounce).await;
                while rx.try_recv().is_ok() {}
            }
        }
        let d = dir.clone();
        let Ok((fp, result)) = tokio::task::spawn_blocking(move || {
            let fp = fingerprint(&d);
            (fp, load_dir(&d))
        })
        .await
        else {
            continue;
        };
        if last == Some(fp) {
            continue;
        }
        last = Some(fp);
        on_load(result);
    }
}

fn start_notify(dir: &Path, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher =
        match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.map(|e| !e.kind.is_access()).unwrap_or(true) {
                let _ = tx.send(());
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "file notifications unavailable; polling only");
                return None;
            }
        };
    if let Err(e) = watcher.watch(dir, notify::RecursiveMode::Recursive) {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot watch directory; polling only");
        return None;
    }
    Some(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Loaded, Vec<LoadError>> {
        let mut loaded = Loaded::default();
        let mut errors = Vec::new();
        parse_file(Path::new("routes.yaml"), text, &mut loaded, &mut errors);
        if errors.is_empty() {
            Ok(loaded)
        } else {
            Err(errors)
        }
    }

    const ROUTE: &str = "apiVersion: ssegate.io/v1alpha1\nkind: SseRoute\nmetadata: {name: feed, namespace: apps}\nspec:\n  rules:\n  - match: {path: /feed}\n    backend: {service: svc, port: 80}\n";

    #[test]
    fn multi_document_files_with_all_kinds() {
        let text = format!(
            "{ROUTE}---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc}}\nspec: {{ports: [{{port: 80}}]}}\n---\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-1, labels: {{kubernetes.io/service-name: svc}}}}\naddressType: IPv4\nendpoints: [{{addresses: [127.0.0.1]}}]\nports: [{{port: 9090}}]\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: ignored}}\n"
        );
        let l = parse(&text).unwrap();
        assert_eq!(l.snapshot.routes.len(), 1);
        assert_eq!(l.snapshot.services.len(), 1);
        assert_eq!(l.snapshot.endpoint_slices.len(), 1);
        assert_eq!(
            l.snapshot.services[0].metadata.namespace.as_deref(),
            Some("default")
        );
        assert_eq!(l.route_origin("apps/feed"), Some(Path::new("routes.yaml")));
    }

    #[test]
    fn list_items_are_loaded() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: b}\n".to_string();
        assert_eq!(parse(&text).unwrap().snapshot.services.len(), 2);
    }

    #[test]
    fn schema_errors_name_the_document_and_field() {
        let bad = ROUTE.replace("port: 80", "port: [80]");
        let errs = parse(&format!("{ROUTE}---\n{}", bad.replace("feed}", "feed2}"))).unwrap_err();
        assert_eq!(errs.len(), 1);
        let msg = errs[0].to_string();
        assert!(
            msg.starts_with(
                "routes.yaml: document 2: invalid SseRoute: spec.rules[0].backend.port"
            ),
            "{msg}"
        );
    }

    #[test]
    fn yaml_syntax_errors_are_reported() {
        let errs = parse("apiVersion: v1\nkind: Service\nmetadata: {name: [\n").unwrap_err();
        assert!(errs[0].reason.contains("invalid YAML"), "{}", errs[0]);
    }

    #[test]
    fn missing_kind_name_and_duplicates_are_errors() {
        assert!(
            parse("foo: bar\n").unwrap_err()[0]
                .reason
                .contains("missing apiVersion or kind")
        );
        assert!(
            parse("apiVersion: v1\nkind: Service\nmetadata: {}\n").unwrap_err()[0]
                .reason
                .contains("without metadata.name")
        );
        let errs = parse(&format!("{ROUTE}---\n{ROUTE}")).unwrap_err();
        assert!(errs[0].reason.contains("defined twice"), "{}", errs[0]);
        assert!(
            parse("apiVersion: ssegate.io/v1alpha1\nkind: SSERoute\nmetadata: {name: x}\n")
                .unwrap_err()[0]
                .reason
                .contains("unknown kind SSERoute")
        );
    }

    #[test]
    fn load_dir_reads_nested_files_and_skips_hidden_and_other_extensions() {
        let dir = std::env::temp_dir().join(format!("ssegate-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::create_dir_all(dir.join("..data")).unwrap();
        std::fs::write(dir.join("sub/route.yml"), ROUTE).unwrap();
        std::fs::write(dir.join("..data/route.yaml"), ROUTE).unwrap();
        std::fs::write(dir.join("notes.txt"), "not yaml: [").unwrap();
        let fp1 = fingerprint(&dir);
        let l = load_dir(&dir).unwrap();
        assert_eq!(l.snapshot.routes.len(), 1);
        std::fs::write(dir.join("bad.yaml"), "kind: [").unwrap();
        assert_ne!(fingerprint(&dir), fp1);
        let errs = load_dir(&dir).unwrap_err();
        assert_eq!(errs[0].path, dir.join("bad.yaml"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            load_dir(&dir).unwrap_err()[0]
                .reason
                .contains("cannot read directory")
        );
    }
}
