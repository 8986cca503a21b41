//! Standalone mode: Kubernetes manifests in a directory.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file under the directory (recursively; entries whose
//! name starts with `.` are skipped, which also skips the `..data` machinery of a mounted
//! ConfigMap) is read as one or more YAML documents. `SseRoute`, `Service`, `EndpointSlice`,
//! `Secret` and `v1/List` objects are used; other kinds are ignored, so the same files can be
//! `kubectl apply`-ed to a cluster unchanged.
//!
//! Secrets: `data` (base64) and `stringData` are both read (`stringData` wins, as on an API
//! server). In standalone mode a Secret may instead point at PEM files with annotations,
//! resolved relative to the manifest's directory and re-read on every load:
//! [`CERT_FILE_ANNOTATION`] → `tls.crt`, [`KEY_FILE_ANNOTATION`] → `tls.key`,
//! [`CA_FILE_ANNOTATION`] → `ca.crt`. A missing file is a load error; bad PEM content is
//! reported on the routes that use the Secret.
//!
//! Re-checks are cheap: a load records each file's identity (device, inode, size, mtime,
//! ctime) and the watcher reads and parses again only when one of them, or the set of files,
//! changed (see [`Fingerprint`]).
//!
//! A load is all or nothing: if any file cannot be read or parsed, the whole load fails with
//! one [`LoadError`] per bad document, and the caller keeps serving the last good table.
//! Problems that concern a single route's meaning (a missing Service, a bad path) are not
//! load errors; they are reported on that route by the compile step.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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

/// Standalone-mode Secret annotation: PEM certificate chain file, loaded as `tls.crt`.
pub const CERT_FILE_ANNOTATION: &str = "ssegate.io/tls-cert-file";
/// Standalone-mode Secret annotation: PEM private key file, loaded as `tls.key`.
pub const KEY_FILE_ANNOTATION: &str = "ssegate.io/tls-key-file";
/// Standalone-mode Secret annotation: PEM CA certificates file, loaded as `ca.crt`.
pub const CA_FILE_ANNOTATION: &str = "ssegate.io/ca-file";

/// Namespace and name of the Secret that stands for `--default-cert`/`--default-key` in
/// standalone mode: the files are read on every load into this Secret, which the compile step
/// uses as the default certificate, so an edited pair is reloaded (and a bad edit keeps the
/// last good one) like any Secret. Not a valid Kubernetes name, so no manifest collides.
pub const DEFAULT_CERT_SECRET: (&str, &str) = ("ssegate", "--default-cert");

/// `--default-cert` and `--default-key`: PEM certificate chain and key files.
pub type DefaultCertFiles = (PathBuf, PathBuf);

/// A successful load of a directory.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// The objects found.
    pub snapshot: Snapshot,
    /// Which file each object came from, keyed `Kind namespace/name`, for log messages.
    pub origins: HashMap<String, PathBuf>,
    /// Hash of the PEM files Secrets referenced by annotation, as read by this load.
    pub referenced_files_hash: u64,
    /// The files read besides the manifests (annotated PEM files, `--default-cert`), each
    /// stamped just before it was read (`None`: it could not be read).
    referenced: Vec<(PathBuf, Option<Stamp>)>,
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
    let (loaded, errors) = load_dir_parts(dir);
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(errors)
    }
}

/// [`load_dir`], keeping what was read (and stamped) even when the load failed.
fn load_dir_parts(dir: &Path) -> (Loaded, Vec<LoadError>) {
    let mut loaded = Loaded::default();
    let files = match list_files(dir) {
        Ok(files) => files,
        Err(e) => {
            let error = LoadError {
                path: dir.to_path_buf(),
                reason: format!("cannot read directory: {e}"),
            };
            return (loaded, vec![error]);
        }
    };
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
    (loaded, errors)
}

/// What a load saw. Two fingerprints are equal when their loads read the same contents (the
/// manifests' names and contents, and the files they reference); besides that, it keeps a
/// [`Stamp`] of every file read, so that [`Fingerprint::unchanged`] can tell, without
/// reading or parsing anything, whether a new load could read something else.
#[derive(Clone, Debug)]
pub struct Fingerprint {
    hash: u64,
    /// The manifests found (`Err`: the directory could not be listed).
    manifests: Result<Vec<(PathBuf, Stamp)>, std::io::ErrorKind>,
    /// The other files the load read.
    referenced: Vec<(PathBuf, Option<Stamp>)>,
}

impl PartialEq for Fingerprint {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
    }
}

impl Fingerprint {
    /// True when the manifests under `dir` are the same files and every file the load read
    /// is still as stamped; the stamps are then refreshed (a file stops being racy once its
    /// mtime is old enough). False as soon as anything differs, or when the directory could
    /// not be listed: the caller loads again.
    pub fn unchanged(&mut self, dir: &Path) -> bool {
        let now = SystemTime::now();
        let Ok(old) = &self.manifests else {
            return false;
        };
        let Ok(files) = list_files(dir) else {
            return false;
        };
        if files.len() != old.len() || files.iter().zip(old).any(|(f, (p, _))| f != p) {
            return false;
        }
        let mut manifests = Vec::with_capacity(old.len());
        for (path, stamp) in old {
            match stamp.recheck(path, now) {
                Some(fresh) => manifests.push((path.clone(), fresh)),
                None => return false,
            }
        }
        let Some(referenced) = recheck_files(&self.referenced, now) else {
            return false;
        };
        self.manifests = Ok(manifests);
        self.referenced = referenced;
        true
    }
}

/// Fresh stamps of `files` if every one is still as stamped (one that could not be read
/// still cannot), `None` as soon as one changed.
fn recheck_files(
    files: &[(PathBuf, Option<Stamp>)],
    now: SystemTime,
) -> Option<Vec<(PathBuf, Option<Stamp>)>> {
    let mut fresh = Vec::with_capacity(files.len());
    for (path, stamp) in files {
        let stamp = match stamp {
            Some(stamp) => Some(stamp.recheck(path, now)?),
            None if Stamp::take(path, now).is_some() => return None,
            None => None,
        };
        fresh.push((path.clone(), stamp));
    }
    Some(fresh)
}

/// How recently modified a file must be for its metadata alone not to prove it unchanged: a
/// rewrite within the filesystem's timestamp granularity (up to 2 s on some) keeps the same
/// mtime, so the contents of such a "racy" file are hashed and compared too.
const RACY: Duration = Duration::from_secs(2);

/// A file's identity and metadata when a load read it, and, while it is racy (see [`RACY`]),
/// a hash of its contents.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    meta: FileMeta,
    hash: Option<u64>,
}

/// What `stat` says of a file (following symlinks, so a ConfigMap's `..data` swap shows as
/// other inodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileMeta {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileMeta {
    fn of(path: &Path) -> Option<(FileMeta, SystemTime)> {
        let m = std::fs::metadata(path).ok()?;
        let meta = FileMeta {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        };
        Some((meta, m.modified().ok()?))
    }
}

fn content_hash(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

impl Stamp {
    /// Stamps `path` as of `now`; `None` if it cannot be read.
    fn take(path: &Path, now: SystemTime) -> Option<Stamp> {
        let (meta, modified) = FileMeta::of(path)?;
        Stamp::with(meta, modified, now, || content_hash(path))
    }

    fn with(
        meta: FileMeta,
        modified: SystemTime,
        now: SystemTime,
        hash: impl FnOnce() -> Option<u64>,
    ) -> Option<Stamp> {
        // A future mtime (clock skew) is racy too.
        let racy = now.duration_since(modified).map_or(true, |age| age < RACY);
        let hash = if racy { Some(hash()?) } else { None };
        Some(Stamp { meta, hash })
    }

    /// A fresh stamp of `path` if it is still as this stamp says, `None` if it changed.
    fn recheck(&self, path: &Path, now: SystemTime) -> Option<Stamp> {
        let (meta, modified) = FileMeta::of(path)?;
        self.recheck_with(meta, modified, now, || content_hash(path))
    }

    fn recheck_with(
        &self,
        meta: FileMeta,
        modified: SystemTime,
        now: SystemTime,
        hash: impl Fn() -> Option<u64>,
    ) -> Option<Stamp> {
        if meta != self.meta {
            return None;
        }
        // Racy when stamped: the same metadata does not prove the same contents.
        if let Some(old) = self.hash
            && hash()? != old
        {
            return None;
        }
        Stamp::with(meta, modified, now, hash)
    }
}

/// Stamps the manifests under `dir`.
fn stamp_dir(dir: &Path, now: SystemTime) -> Result<Vec<(PathBuf, Stamp)>, std::io::ErrorKind> {
    let files = list_files(dir).map_err(|e| e.kind())?;
    // A file that vanished since the listing gets no stamp: the next check sees the set differ.
    Ok(files
        .into_iter()
        .filter_map(|f| Stamp::take(&f, now).map(|s| (f, s)))
        .collect())
}

/// Loads `dir` and fingerprints it: the manifests' names and contents plus the contents of
/// the PEM files Secrets reference (as this load read them), so a certificate file edited
/// outside the directory is noticed too. With `default_cert`, those two files are read as
/// the Secret [`DEFAULT_CERT_SECRET`] and fingerprinted too; a file that cannot be read is a
/// load error.
pub fn load_dir_fingerprinted(
    dir: &Path,
    default_cert: Option<&DefaultCertFiles>,
) -> (Fingerprint, Result<Loaded, Vec<LoadError>>) {
    // Manifests are stamped and fingerprinted before loading: a change racing with the load
    // is then seen as a change on the next check.
    let manifests = stamp_dir(dir, SystemTime::now());
    let fp = fingerprint(dir);
    let (mut loaded, mut errors) = load_dir_parts(dir);
    if errors.is_empty()
        && let Some(files) = default_cert
        && let Err(e) = add_default_cert(&mut loaded, files)
    {
        errors.push(e);
    }
    let referenced = std::mem::take(&mut loaded.referenced);
    let result = if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(errors)
    };
    let extra = result.as_ref().map_or(0, |l| l.referenced_files_hash);
    let mut h = DefaultHasher::new();
    (fp, extra).hash(&mut h);
    let fingerprint = Fingerprint {
        hash: h.finish(),
        manifests,
        referenced,
    };
    (fingerprint, result)
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
        ("v1", "Secret") => {
            let key = push(&mut snap.secrets, value, &kind)?;
            let secret = snap.secrets.last_mut().expect("just pushed");
            let mut h = DefaultHasher::new();
            loaded.referenced_files_hash.hash(&mut h);
            resolve_secret(secret, path, &mut h, &mut loaded.referenced)?;
            loaded.referenced_files_hash = h.finish();
            key
        }
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

/// Reads the `--default-cert`/`--default-key` files into the Secret [`DEFAULT_CERT_SECRET`].
fn add_default_cert(loaded: &mut Loaded, (cert, key): &DefaultCertFiles) -> Result<(), LoadError> {
    use k8s_openapi::ByteString;
    let mut hasher = DefaultHasher::new();
    loaded.referenced_files_hash.hash(&mut hasher);
    let mut data = std::collections::BTreeMap::new();
    for (flag, path, k) in [
        ("--default-cert", cert, crate::tls::TLS_CRT),
        ("--default-key", key, crate::tls::TLS_KEY),
    ] {
        let stamp = Stamp::take(path, SystemTime::now());
        loaded.referenced.push((path.clone(), stamp));
        let bytes = std::fs::read(path).map_err(|e| LoadError {
            path: path.clone(),
            reason: format!("{flag}: cannot read file: {e}"),
        })?;
        bytes.hash(&mut hasher);
        data.insert(k.to_string(), ByteString(bytes));
    }
    loaded.referenced_files_hash = hasher.finish();
    let (namespace, name) = DEFAULT_CERT_SECRET;
    loaded
        .snapshot
        .secrets
        .push(k8s_openapi::api::core::v1::Secret {
            metadata: kube::api::ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            type_: Some(crate::tls::SECRET_TYPE_TLS.into()),
            data: Some(data),
            ..Default::default()
        });
    Ok(())
}

/// The `--default-cert`/`--default-key` files on their own, as cluster mode serves them: the
/// same Secret [`DEFAULT_CERT_SECRET`] that standalone mode adds to every load, read again
/// only when either file changed (the same [`Stamp`]s as [`DirWatch`]).
pub struct DefaultCertWatch {
    files: DefaultCertFiles,
    /// The files as last read (`None`: never read).
    stamps: Option<Vec<(PathBuf, Option<Stamp>)>>,
    /// What the last read gave: the contents' hash, `None` after a failed read.
    last: Option<u64>,
}

impl DefaultCertWatch {
    /// Watches `files`; the first [`DefaultCertWatch::check`] reads them.
    pub fn new(files: DefaultCertFiles) -> Self {
        DefaultCertWatch {
            files,
            stamps: None,
            last: None,
        }
    }

    /// Reads the files again if either changed since the last read; returns the Secret
    /// (or why a file cannot be read) when that differs from the last read's (`None`:
    /// nothing new). Blocking.
    pub fn check(&mut self) -> Option<Result<k8s_openapi::api::core::v1::Secret, LoadError>> {
        if let Some(stamps) = &self.stamps
            && let Some(fresh) = recheck_files(stamps, SystemTime::now())
        {
            self.stamps = Some(fresh);
            return None;
        }
        let last = self.last;
        let result = self.read();
        (result.is_err() || self.last != last).then_some(result)
    }

    /// Reads the files (see [`DefaultCertWatch::check`] for reading only on a change).
    pub fn read(&mut self) -> Result<k8s_openapi::api::core::v1::Secret, LoadError> {
        let mut loaded = Loaded::default();
        let result = add_default_cert(&mut loaded, &self.files);
        self.stamps = Some(std::mem::take(&mut loaded.referenced));
        self.last = result.as_ref().ok().map(|()| loaded.referenced_files_hash);
        result.map(|()| loaded.snapshot.secrets.remove(0))
    }
}

/// Cluster mode's `--default-cert` reload: checks the files every `poll` (reading them only
/// when one changed, see [`DefaultCertWatch`]) and sends each new Secret on `tx`. A file
/// that cannot be read is logged and counted as a failed reload
/// (`ssegate_config_reloads_total{result="failure"}`, as standalone mode counts the same
/// error), once per failure, and the last good Secret stays. Runs until dropped.
pub async fn watch_default_cert(
    mut files: DefaultCertWatch,
    poll: Duration,
    tx: tokio::sync::watch::Sender<Vec<k8s_openapi::api::core::v1::Secret>>,
    metrics: crate::metrics::Metrics,
) {
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let checked = tokio::task::spawn_blocking(move || {
            let result = files.check();
            (files, result)
        })
        .await;
        let Ok((back, result)) = checked else {
            tracing::error!("the --default-cert check failed; no longer reloading it");
            return;
        };
        files = back;
        match result {
            Some(Ok(secret)) => {
                tracing::info!("--default-cert files changed; reloading");
                tx.send_replace(vec![secret]);
            }
            Some(Err(e)) => {
                metrics.config_reload(false);
                tracing::error!(path = %e.path.display(), reason = %e.reason, "cannot read the default certificate; keeping the last good one");
            }
            None => {}
        }
    }
}

/// Folds `stringData` into `data` and reads annotated PEM files into `data`.
fn resolve_secret(
    secret: &mut k8s_openapi::api::core::v1::Secret,
    manifest: &Path,
    hasher: &mut DefaultHasher,
    read: &mut Vec<(PathBuf, Option<Stamp>)>,
) -> Result<(), String> {
    use k8s_openapi::ByteString;
    let data = secret.data.get_or_insert_with(Default::default);
    for (k, v) in secret.string_data.take().unwrap_or_default() {
        data.insert(k, ByteString(v.into_bytes()));
    }
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    for (annotation, key) in [
        (CERT_FILE_ANNOTATION, crate::tls::TLS_CRT),
        (KEY_FILE_ANNOTATION, crate::tls::TLS_KEY),
        (CA_FILE_ANNOTATION, crate::tls::CA_CRT),
    ] {
        let Some(file) = annotations.get(annotation) else {
            continue;
        };
        let file = manifest
            .parent()
            .unwrap_or(Path::new("."))
            .join(file.trim());
        read.push((file.clone(), Stamp::take(&file, SystemTime::now())));
        let bytes = std::fs::read(&file).map_err(|e| {
            format!(
                "annotation {annotation}: cannot read {}: {e}",
                file.display()
            )
        })?;
        file.hash(hasher);
        bytes.hash(hasher);
        data.insert(key.to_string(), ByteString(bytes));
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
        let mut why = e.inner().to_string();
        if kind == "Secret" {
            // Error messages quote offending values; a Secret's may be key material.
            why = redact_quoted(&why);
        }
        if at == "." {
            format!("invalid {kind}: {why}")
        } else {
            format!("invalid {kind}: {at}: {why}")
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

/// Replaces every `"…"` and `` `…` `` span of an error message (where serde quotes the
/// offending value) with `<redacted>`.
fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(start) = rest.find(['"', '`']) {
        let quote = rest[start..].chars().next().unwrap_or('"');
        let Some(len) = rest[start + 1..].rfind(quote) else {
            break;
        };
        out.push_str(&rest[..start]);
        out.push_str("<redacted>");
        rest = &rest[start + 1 + len + 1..];
    }
    out.push_str(rest);
    out
}

/// The directory as the watcher last loaded it. [`DirWatch::check`] reads and parses again
/// only when a file changed (see [`Fingerprint::unchanged`]), and reports a load only when
/// what it read differs from the last load.
pub struct DirWatch {
    dir: PathBuf,
    default_cert: Option<DefaultCertFiles>,
    last: Option<Fingerprint>,
    loads: u64,
}

impl DirWatch {
    /// Watches `dir` (with the `default_cert` files read as in [`load_dir_fingerprinted`]);
    /// `last` is the fingerprint of a load the caller already did.
    pub fn new(
        dir: PathBuf,
        default_cert: Option<DefaultCertFiles>,
        last: Option<Fingerprint>,
    ) -> Self {
        DirWatch {
            dir,
            default_cert,
            last,
            loads: 0,
        }
    }

    /// Loads the directory again if any file changed since the last load; returns the
    /// result when it differs from the last load's (`None`: nothing new). Blocking.
    pub fn check(&mut self) -> Option<Result<Loaded, Vec<LoadError>>> {
        if let Some(last) = &mut self.last
            && last.unchanged(&self.dir)
        {
            return None;
        }
        self.loads += 1;
        let (fp, result) = load_dir_fingerprinted(&self.dir, self.default_cert.as_ref());
        let same = self.last.as_ref() == Some(&fp);
        // Keep the new stamps even when the contents are the same (a file was touched).
        self.last = Some(fp);
        (!same).then_some(result)
    }
}

/// Watches `dir` and calls `on_load` with every changed load result. `loaded` is the
/// fingerprint of a load the caller already did (it is not repeated). Changes are noticed
/// through filesystem notifications and, as a fallback for filesystems without them, a poll
/// every `poll`; bursts are coalesced for `debounce`. A check reads and parses nothing unless
/// a file changed (see [`DirWatch`]), and unchanged contents never trigger a reload.
/// `default_cert` files are read on every load (see [`load_dir_fingerprinted`]); outside
/// `dir`, their changes are noticed by the poll. Runs until the task is dropped.
pub async fn watch(
    dir: PathBuf,
    default_cert: Option<DefaultCertFiles>,
    loaded: Option<Fingerprint>,
    poll: Duration,
    debounce: Duration,
    mut on_load: impl FnMut(Result<Loaded, Vec<LoadError>>),
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let _watcher = start_notify(&dir, tx);
    let mut state = Some(DirWatch::new(dir.clone(), default_cert.clone(), loaded));
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
        let mut w = state
            .take()
            .unwrap_or_else(|| DirWatch::new(dir.clone(), default_cert.clone(), None));
        let Ok((w, result)) = tokio::task::spawn_blocking(move || {
            let result = w.check();
            (w, result)
        })
        .await
        else {
            continue;
        };
        state = Some(w);
        if let Some(result) = result {
            on_load(result);
        }
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
    fn secret_values_never_appear_in_errors() {
        for data in [
            "data: \"-----BEGIN PRIVATE KEY----- KEY-MATERIAL-1\"",
            "data: {tls.key: [\"KEY-MATERIAL-1\"]}",
            "stringData: {tls.key: 12345678901}",
            "type: [\"KEY-MATERIAL-1\"]",
        ] {
            let text = format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: tls}}\n{data}\n");
            let errors = parse(&text).err().unwrap_or_default();
            assert!(!errors.is_empty(), "{data}");
            for e in errors {
                assert!(!e.reason.contains("KEY-MATERIAL"), "{}", e.reason);
                assert!(!e.reason.contains("12345678901"), "{}", e.reason);
                assert!(e.reason.contains("invalid Secret"), "{}", e.reason);
            }
        }
        assert_eq!(
            redact_quoted("invalid type: string \"a\\\"b\", expected a map"),
            "invalid type: string <redacted>, expected a map"
        );
        assert_eq!(redact_quoted("integer `1`, x"), "integer <redacted>, x");
        assert_eq!(redact_quoted("no quotes"), "no quotes");
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
    fn default_cert_files_are_loaded_as_a_secret_and_fingerprinted() {
        let dir = tempfile::tempdir().unwrap();
        let files = tempfile::tempdir().unwrap();
        let pair = (files.path().join("d.crt"), files.path().join("d.key"));
        std::fs::write(&pair.0, "CERT-1").unwrap();
        std::fs::write(&pair.1, "KEY-1").unwrap();
        let (fp1, l) = load_dir_fingerprinted(dir.path(), Some(&pair));
        let secrets = l.unwrap().snapshot.secrets;
        assert_eq!(secrets.len(), 1);
        let s = &secrets[0];
        let (ns, name) = DEFAULT_CERT_SECRET;
        assert_eq!(
            (s.metadata.namespace.as_deref(), s.metadata.name.as_deref()),
            (Some(ns), Some(name))
        );
        assert_eq!(s.data.as_ref().unwrap()["tls.key"].0, b"KEY-1");
        std::fs::write(&pair.0, "CERT-2").unwrap();
        let (fp2, _) = load_dir_fingerprinted(dir.path(), Some(&pair));
        assert_ne!(fp1, fp2, "an edited file is a change");
        std::fs::remove_file(&pair.1).unwrap();
        let errs = load_dir_fingerprinted(dir.path(), Some(&pair))
            .1
            .unwrap_err();
        assert!(
            errs[0].reason.starts_with("--default-key: cannot read"),
            "{}",
            errs[0].reason
        );
        assert_eq!(errs[0].path, pair.1);
    }

    #[test]
    fn secrets_merge_string_data_and_read_annotated_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("certs")).unwrap();
        std::fs::write(dir.path().join("certs/a.crt"), "CERT-1").unwrap();
        std::fs::write(dir.path().join("certs/a.key"), "KEY-1").unwrap();
        let manifest = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: a\n  annotations:\n    ssegate.io/tls-cert-file: certs/a.crt\n    ssegate.io/tls-key-file: certs/a.key\ntype: kubernetes.io/tls\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: b}\ndata: {ca.crt: Q0E=}\nstringData: {tls.crt: inline}\n";
        std::fs::write(dir.path().join("secrets.yaml"), manifest).unwrap();
        let (fp1, l) = load_dir_fingerprinted(dir.path(), None);
        let l = l.unwrap();
        let value = |i: usize, k: &str| {
            String::from_utf8(l.snapshot.secrets[i].data.as_ref().unwrap()[k].0.clone()).unwrap()
        };
        assert_eq!(value(0, "tls.crt"), "CERT-1");
        assert_eq!(value(0, "tls.key"), "KEY-1");
        assert_eq!(value(1, "ca.crt"), "CA");
        assert_eq!(value(1, "tls.crt"), "inline");
        // Editing only the PEM file changes the fingerprint.
        std::fs::write(dir.path().join("certs/a.crt"), "CERT-2").unwrap();
        let (fp2, _) = load_dir_fingerprinted(dir.path(), None);
        assert_ne!(fp1, fp2);
        assert_eq!(load_dir_fingerprinted(dir.path(), None).0, fp2);
        std::fs::remove_file(dir.path().join("certs/a.key")).unwrap();
        let errs = load_dir(dir.path()).unwrap_err();
        assert!(
            errs[0].reason.contains("ssegate.io/tls-key-file"),
            "{}",
            errs[0]
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

    /// Sets `path`'s mtime `secs` seconds into the past (so it is not racy).
    fn age(path: &Path, secs: u64) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(secs))
            .unwrap();
    }

    /// Rewrites `path` in place (same inode) and gives it back its old mtime, as an editor
    /// saving twice within one timestamp tick would leave it.
    fn rewrite_in_place(path: &Path, text: &str) {
        let before = std::fs::metadata(path).unwrap().modified().unwrap();
        std::fs::write(path, text).unwrap();
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(before).unwrap();
    }

    fn routes(result: Option<Result<Loaded, Vec<LoadError>>>) -> Vec<String> {
        let loaded = result.expect("a new load").expect("a good load");
        let mut paths: Vec<String> = loaded
            .snapshot
            .routes
            .iter()
            .flat_map(|r| r.spec.rules.iter().map(|rule| rule.path_match.path.clone()))
            .collect();
        paths.sort();
        paths
    }

    #[test]
    fn an_unchanged_directory_is_not_read_again_and_every_change_is() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let route = d.join("route.yaml");
        std::fs::write(&route, ROUTE).unwrap();
        std::fs::create_dir(d.join("certs")).unwrap();
        std::fs::write(d.join("certs/a.crt"), "CERT-1").unwrap();
        std::fs::write(d.join("certs/a.key"), "KEY-1").unwrap();
        std::fs::write(
            d.join("secret.yaml"),
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: a\n  annotations:\n    ssegate.io/tls-cert-file: certs/a.crt\n    ssegate.io/tls-key-file: certs/a.key\n",
        )
        .unwrap();
        let pair = (d.join("certs/default.crt"), d.join("certs/default.key"));
        std::fs::write(&pair.0, "DEFAULT-CERT-1").unwrap();
        std::fs::write(&pair.1, "DEFAULT-KEY-1").unwrap();
        for f in ["route.yaml", "secret.yaml", "certs/a.crt", "certs/a.key"] {
            age(&d.join(f), 60);
        }
        age(&pair.0, 60);
        age(&pair.1, 60);

        let mut w = DirWatch::new(d.to_path_buf(), Some(pair.clone()), None);
        assert_eq!(routes(w.check()), ["/feed"]);
        assert_eq!(w.loads, 1);
        for _ in 0..3 {
            assert!(w.check().is_none());
        }
        assert_eq!(
            w.loads, 1,
            "an unchanged directory is not read or parsed again"
        );

        // Touched, same contents: read again, but no new load is reported.
        age(&route, 30);
        assert!(w.check().is_none());
        assert_eq!(w.loads, 2);
        assert!(w.check().is_none());
        assert_eq!(w.loads, 2);

        // Rewritten in place with the same size and the same mtime.
        rewrite_in_place(&route, &ROUTE.replace("/feed", "/fee2"));
        assert_eq!(routes(w.check()), ["/fee2"]);

        // A referenced PEM file and the --default-cert file, edited in place.
        rewrite_in_place(&d.join("certs/a.crt"), "CERT-2");
        assert!(
            w.check().is_some(),
            "an annotated PEM file edit is a change"
        );
        rewrite_in_place(&pair.0, "DEFAULT-CERT-2");
        assert!(w.check().is_some(), "a --default-cert edit is a change");
        assert!(w.check().is_none());

        // Files added and removed.
        let other = ROUTE
            .replace("name: feed", "name: other")
            .replace("/feed", "/other");
        std::fs::write(d.join("other.yaml"), &other).unwrap();
        assert_eq!(routes(w.check()), ["/fee2", "/other"]);
        std::fs::remove_file(d.join("other.yaml")).unwrap();
        assert_eq!(routes(w.check()), ["/fee2"]);

        // A referenced file that goes missing fails the load; its return is noticed.
        std::fs::rename(d.join("certs/a.key"), d.join("a.key.bak")).unwrap();
        assert!(w.check().unwrap().is_err());
        let loads = w.loads;
        assert!(w.check().is_none());
        assert_eq!(w.loads, loads, "still missing: nothing to read again");
        std::fs::rename(d.join("a.key.bak"), d.join("certs/a.key")).unwrap();
        assert!(w.check().unwrap().is_ok());
    }

    #[test]
    fn a_configmap_style_symlink_swap_is_a_change() {
        // Like a mounted ConfigMap: route.yaml -> ..data/route.yaml, ..data -> ..v1, and an
        // update writes ..v2 and swaps ..data. Same size, same mtime: only the inode differs.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (v, path) in [("..v1", "/feed"), ("..v2", "/fee2")] {
            std::fs::create_dir(d.join(v)).unwrap();
            std::fs::write(d.join(v).join("route.yaml"), ROUTE.replace("/feed", path)).unwrap();
            age(&d.join(v).join("route.yaml"), 60);
        }
        std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/route.yaml", d.join("route.yaml")).unwrap();
        let mut w = DirWatch::new(d.to_path_buf(), None, None);
        assert_eq!(routes(w.check()), ["/feed"]);
        assert!(w.check().is_none());
        std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        assert_eq!(routes(w.check()), ["/fee2"]);
    }

    #[test]
    fn a_same_size_rewrite_within_a_timestamp_tick_is_noticed_by_the_content_hash() {
        // On a filesystem with coarse timestamps, an in-place rewrite of the same size within
        // one tick leaves every piece of metadata as it was: only the contents tell.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("route.yaml");
        std::fs::write(&path, "data: 1\n").unwrap();
        let (meta, modified) = FileMeta::of(&path).unwrap();
        let now = SystemTime::now();
        let stamp = Stamp::take(&path, now).unwrap();
        assert!(stamp.hash.is_some(), "a file modified just now is racy");
        let same_meta =
            |stamp: &Stamp| stamp.recheck_with(meta, modified, now, || content_hash(&path));
        assert!(same_meta(&stamp).is_some(), "same metadata, same contents");
        std::fs::write(&path, "data: 2\n").unwrap();
        assert!(
            same_meta(&stamp).is_none(),
            "same metadata but other contents is a change"
        );

        // Stamped long after its mtime, a file is not racy: its metadata is proof enough, and
        // a recheck reads nothing.
        let later = modified + Duration::from_secs(10);
        let settled = Stamp::with(meta, modified, later, || panic!("read")).unwrap();
        assert_eq!(settled.hash, None);
        let fresh = settled.recheck_with(meta, modified, later, || panic!("read"));
        assert_eq!(fresh, Some(settled.clone()));
        // Once a racy stamp is rechecked after the window, the fresh stamp is settled.
        std::fs::write(&path, "data: 1\n").unwrap();
        let refreshed = stamp
            .recheck_with(meta, modified, later, || content_hash(&path))
            .unwrap();
        assert_eq!(refreshed.hash, None);
    }

    #[test]
    fn default_cert_watch_reads_the_pair_again_only_when_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let pair = (dir.path().join("d.crt"), dir.path().join("d.key"));
        std::fs::write(&pair.0, "CERT-1").unwrap();
        std::fs::write(&pair.1, "KEY-1").unwrap();
        let crt = |s: &k8s_openapi::api::core::v1::Secret| {
            String::from_utf8(s.data.as_ref().unwrap()["tls.crt"].0.clone()).unwrap()
        };
        let mut w = DefaultCertWatch::new(pair.clone());
        let first = w.read().unwrap();
        let (ns, name) = DEFAULT_CERT_SECRET;
        assert_eq!(
            (
                first.metadata.namespace.as_deref(),
                first.metadata.name.as_deref()
            ),
            (Some(ns), Some(name))
        );
        assert_eq!(crt(&first), "CERT-1");
        assert!(w.check().is_none());

        rewrite_in_place(&pair.0, "CERT-2");
        assert_eq!(crt(&w.check().unwrap().unwrap()), "CERT-2");
        assert!(w.check().is_none());
        age(&pair.0, 30);
        assert!(w.check().is_none(), "touched, same contents: nothing new");

        // A file that cannot be read is reported once; its return is noticed.
        std::fs::rename(&pair.1, dir.path().join("d.key.bak")).unwrap();
        let e = w.check().unwrap().unwrap_err();
        assert!(e.reason.starts_with("--default-key: cannot read"), "{e}");
        assert!(w.check().is_none());
        std::fs::rename(dir.path().join("d.key.bak"), &pair.1).unwrap();
        assert_eq!(crt(&w.check().unwrap().unwrap()), "CERT-2");
    }

    #[tokio::test]
    async fn an_unreadable_default_cert_counts_one_failed_reload_and_keeps_the_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let pair = (dir.path().join("d.crt"), dir.path().join("d.key"));
        std::fs::write(&pair.0, "CERT-1").unwrap();
        std::fs::write(&pair.1, "KEY-1").unwrap();
        let metrics = crate::metrics::Metrics::new();
        let failures = || {
            let text = metrics.render();
            text.lines()
                .find_map(|l| l.strip_prefix(r#"ssegate_config_reloads_total{result="failure"} "#))
                .map_or(0.0, |v| v.parse::<f64>().unwrap())
        };
        let mut w = DefaultCertWatch::new(pair.clone());
        let first = w.read().unwrap();
        let (tx, rx) = tokio::sync::watch::channel(vec![first]);
        let task = tokio::spawn(watch_default_cert(
            w,
            Duration::from_millis(20),
            tx,
            metrics.clone(),
        ));
        std::fs::rename(&pair.1, dir.path().join("d.key.bak")).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while failures() < 1.0 {
            assert!(std::time::Instant::now() < deadline, "no failure counted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Reported once, not on every poll; the last good Secret stays.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(failures(), 1.0);
        let kept = rx.borrow()[0].data.as_ref().unwrap()["tls.crt"].0.clone();
        assert_eq!(kept, b"CERT-1");
        task.abort();
    }

    /// Property tests: arbitrary YAML and JSON never panic the loader or the compiler, and
    /// a good route in another file is still served whatever else parses.
    mod proptests {
        use super::*;
        use crate::metrics::Metrics;
        use crate::routing::{CompileOptions, StateStore, compile};
        use proptest::collection::vec;
        use proptest::prelude::*;
        use serde_json::Value as Json;

        const TOKENS: &[&str] = &[
            "apiVersion: ",
            "ssegate.io/v1alpha1",
            "v1",
            "discovery.k8s.io/v1",
            "kind: ",
            "SseRoute",
            "Service",
            "EndpointSlice",
            "Secret",
            "List",
            "items:",
            "metadata:",
            "name: ",
            "namespace: ",
            "spec:",
            "rules:",
            "- ",
            "match:",
            "path: ",
            "/x",
            "backend:",
            "service: ",
            "port: ",
            "80",
            "-1",
            "99999999999999999999",
            "{",
            "}",
            "[",
            "]",
            ", ",
            ": ",
            "\n",
            "  ",
            "---\n",
            "&a ",
            "*a",
            "!!binary ",
            "'",
            "\"",
            "null",
            "~",
            "1.5",
            "true",
            "keepalive:",
            "interval: ",
            "15s",
            "timeouts:",
            "maxConnections: ",
            "hostnames: ",
            "<<: ",
            "#",
            "\t",
            "\u{FEFF}",
            "é",
            "\0",
            "? ",
            "|\n",
            ">-\n",
        ];
        const KEYS: &[&str] = &[
            "apiVersion",
            "kind",
            "metadata",
            "name",
            "namespace",
            "spec",
            "rules",
            "match",
            "path",
            "type",
            "backend",
            "service",
            "port",
            "hostnames",
            "keepalive",
            "interval",
            "timeouts",
            "idle",
            "maxConnections",
            "mode",
            "items",
            "labels",
            "kubernetes.io/service-name",
            "endpoints",
            "addresses",
            "conditions",
            "ready",
            "ports",
            "addressType",
            "data",
            "stringData",
            "rewritePath",
            "className",
            "x",
        ];
        const STRINGS: &[&str] = &[
            "ssegate.io/v1alpha1",
            "v1",
            "discovery.k8s.io/v1",
            "SseRoute",
            "Service",
            "EndpointSlice",
            "Secret",
            "List",
            "/",
            "/a",
            "a",
            "Exact",
            "Prefix",
            "poll",
            "stream",
            "15s",
            "0s",
            "-1s",
            "1e400s",
            "",
            "a..b",
            "10.0.0.1",
            "::1",
            "IPv4",
            "IPv6",
            "*.example.com",
            "svc",
            "é\u{0}",
            "http",
        ];

        fn json() -> impl Strategy<Value = Json> {
            let leaf = prop_oneof![
                Just(Json::Null),
                any::<bool>().prop_map(Json::from),
                any::<i64>().prop_map(Json::from),
                any::<u16>().prop_map(Json::from),
                any::<f64>().prop_map(Json::from),
                prop::sample::select(STRINGS).prop_map(Json::from),
            ];
            leaf.prop_recursive(5, 96, 8, |inner| {
                prop_oneof![
                    vec(inner.clone(), 0..5).prop_map(Json::Array),
                    vec((prop::sample::select(KEYS), inner), 0..8).prop_map(|kv| {
                        Json::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                    }),
                ]
            })
        }

        /// An object of a kind the loader knows, with an arbitrary body.
        fn object() -> impl Strategy<Value = Json> {
            (
                prop::sample::select(
                    &[
                        ("ssegate.io/v1alpha1", "SseRoute"),
                        ("v1", "Service"),
                        ("discovery.k8s.io/v1", "EndpointSlice"),
                        ("v1", "Secret"),
                        ("v1", "List"),
                        ("ssegate.io/v1alpha1", "Other"),
                    ][..],
                ),
                json(),
            )
                .prop_map(|((api, kind), body)| {
                    let mut obj = match body {
                        Json::Object(m) => m,
                        other => [("spec".to_string(), other)].into_iter().collect(),
                    };
                    obj.insert("apiVersion".into(), api.into());
                    obj.insert("kind".into(), kind.into());
                    Json::Object(obj)
                })
        }

        /// Mostly one of `valid`, sometimes anything.
        fn field(valid: &[Json]) -> BoxedStrategy<Json> {
            prop_oneof![4 => prop::sample::select(valid.to_vec()), 1 => json()].boxed()
        }

        fn s(v: &[&str]) -> Vec<Json> {
            v.iter().map(|x| Json::from(*x)).collect()
        }

        /// Nearly valid objects: templates with some fields replaced by anything.
        fn nearly_valid() -> impl Strategy<Value = Json> {
            let names = s(&["a", "b", "feed", "svc", "svc-1", "", "UPPER", "x.y"]);
            let meta = (field(&names), field(&s(&["apps", "default", "safe"])))
                .prop_map(|(n, ns)| serde_json::json!({"name": n, "namespace": ns}));
            let rule = (
                field(&s(&["/", "/a", "/a/b", "a", "", "/é"])),
                field(&s(&["Exact", "Prefix", "Regex"])),
                field(&s(&["svc", "goodsvc", "missing", ""])),
                field(&[
                    Json::from(80),
                    Json::from(0),
                    Json::from(70000),
                    Json::from("http"),
                ]),
                field(&s(&["15s", "0s", "1h", "-3s", "soon"])),
                field(&[Json::from(0), Json::from(1), Json::from(-1)]),
            )
                .prop_map(|(path, ty, svc, port, ka, maxc)| {
                    serde_json::json!({
                        "match": {"path": path, "type": ty},
                        "backend": {"service": svc, "port": port},
                        "keepalive": {"interval": ka},
                        "maxConnections": maxc,
                    })
                });
            let route = (
                meta.clone(),
                field(&[
                    serde_json::json!(["a.example", "*.b.example"]),
                    serde_json::json!([]),
                    serde_json::json!(["good.example"]),
                ]),
                vec(rule, 0..3),
            )
                .prop_map(|(m, hosts, rules)| {
                    serde_json::json!({"apiVersion": "ssegate.io/v1alpha1", "kind": "SseRoute",
                        "metadata": m, "spec": {"hostnames": hosts, "rules": rules}})
                });
            let svc = (
                meta.clone(),
                field(&[Json::from(80), Json::from(-1), Json::from("x")]),
            )
                .prop_map(|(m, port)| {
                    serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": m,
                        "spec": {"ports": [{"port": port}]}})
                });
            let slice = (
                meta,
                field(&s(&["svc", "goodsvc", "a"])),
                field(&s(&["10.0.0.1", "::1", "999.1.1.1", "x"])),
                field(&[Json::from(true), Json::from(false), Json::Null]),
                field(&[Json::from(9000), Json::from(0), Json::from(-5)]),
            )
                .prop_map(|(m, svc, addr, ready, port)| {
                    let mut m = m;
                    m["labels"] = serde_json::json!({"kubernetes.io/service-name": svc});
                    serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": m, "addressType": "IPv4",
                        "endpoints": [{"addresses": [addr], "conditions": {"ready": ready}}],
                        "ports": [{"port": port}]})
                });
            prop_oneof![route, svc, slice]
        }

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                vec(nearly_valid(), 1..5).prop_map(|objs| {
                    objs.iter()
                        .map(|o| serde_yaml::to_string(o).unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join("---\n")
                }),
                vec(prop::sample::select(TOKENS), 0..120).prop_map(|t| t.concat()),
                vec(any::<char>(), 0..200).prop_map(|c| c.into_iter().collect()),
                vec(object(), 1..4).prop_map(|objs| {
                    objs.iter()
                        .map(|o| serde_yaml::to_string(o).unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join("---\n")
                }),
                object().prop_map(|o| o.to_string()),
            ]
        }

        const GOOD: &str = "apiVersion: ssegate.io/v1alpha1\nkind: SseRoute\nmetadata: {name: good, namespace: safe}\nspec:\n  hostnames: [good.example]\n  rules:\n  - match: {path: /good}\n    backend: {service: goodsvc, port: 80}\n";

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 512,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn arbitrary_manifests_never_panic_or_take_a_good_route_down(text in text()) {
                let mut loaded = Loaded::default();
                let mut errors = Vec::new();
                parse_file(Path::new("good.yaml"), GOOD, &mut loaded, &mut errors);
                prop_assert!(errors.is_empty());
                parse_file(Path::new("fuzz.yaml"), &text, &mut loaded, &mut errors);
                for e in &errors {
                    prop_assert!(!e.reason.is_empty());
                }
                let (table, reports) = compile(
                    &loaded.snapshot,
                    &CompileOptions::default(),
                    &StateStore::new(Metrics::new()),
                );
                prop_assert!(reports.iter().any(|r| r.key() == "safe/good"));
                prop_assert!(
                    table.route("good.example", "/good").is_some(),
                    "good route lost next to {:?}",
                    text
                );
            }
        }
    }
}
