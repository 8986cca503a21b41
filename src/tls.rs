//! TLS: certificates from Secrets, compiled into a store that the handshake reads.
//!
//! Split like the rest of ssegate:
//! - **pure**: [`parse_key_pair`] / [`parse_ca`] turn PEM into rustls values (the private key
//!   is checked against the certificate), [`CertStoreBuilder`] builds the SNI map (exact
//!   names, then the longest wildcard suffix, then a route without hostnames, then the
//!   default certificate) that [`crate::routing::compile`] publishes inside the
//!   [`crate::routing::RouteTable`].
//! - **state at the edge**: [`TlsState`] remembers, per Secret, the last certificate that
//!   parsed. A Secret that changes to something invalid is reported on the route and its
//!   previous good certificate keeps being served; unchanged Secrets are not re-parsed.
//! - **handshake**: [`SniResolver`] is rustls' certificate resolver; it loads the current
//!   table once per handshake (one atomic load) and looks the SNI name up.
//!
//! The crypto provider is `ring` (pure Rust plus assembly, no cmake or Go needed to build);
//! protocol versions are TLS 1.3 and 1.2 only, with rustls' default (safe) cipher suites.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

use k8s_openapi::api::core::v1::Secret;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};

use crate::api::BackendProtocol;

/// `type` of Secrets that hold a certificate and its key.
pub const SECRET_TYPE_TLS: &str = "kubernetes.io/tls";
/// Secret key of the PEM certificate chain.
pub const TLS_CRT: &str = "tls.crt";
/// Secret key of the PEM private key.
pub const TLS_KEY: &str = "tls.key";
/// Secret key of PEM CA certificates (upstream verification).
pub const CA_CRT: &str = "ca.crt";

/// ALPN protocols offered by the TLS listener, most preferred first.
pub const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The crypto provider used everywhere (`ring`).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Why PEM data could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// A key the Secret must have is absent.
    #[error("has no {0} key")]
    MissingKey(&'static str),
    /// The Secret has a `type` other than `kubernetes.io/tls` (or `Opaque`).
    #[error("has type {0}, expected kubernetes.io/tls")]
    WrongType(String),
    /// No PEM `CERTIFICATE` block could be read.
    #[error("{0}: no PEM certificate found")]
    NoCertificate(&'static str),
    /// A PEM block is malformed.
    #[error("{key}: invalid PEM: {reason}")]
    Pem {
        /// The Secret key (or file) it came from.
        key: &'static str,
        /// What the PEM reader said.
        reason: String,
    },
    /// No private key, or one the provider cannot use.
    #[error("tls.key: {0}")]
    BadKey(String),
    /// The private key does not belong to the certificate.
    #[error("tls.key does not match the certificate in tls.crt")]
    KeyMismatch,
    /// A certificate is not valid X.509 for a trust anchor.
    #[error("{0}: invalid CA certificate: {1}")]
    BadCa(&'static str, String),
}

/// Parses a PEM certificate chain and private key into a [`CertifiedKey`], checking that the
/// key belongs to the first certificate.
pub fn parse_key_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, CertError> {
    let chain = parse_certs(cert_pem, TLS_CRT)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            CertError::BadKey("no PEM private key found".into())
        }
        e => CertError::BadKey(format!("invalid PEM: {e}")),
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::BadKey(e.to_string()))?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) => Ok(ck),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(CertError::KeyMismatch)
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(e) => Err(CertError::Pem {
            key: TLS_CRT,
            reason: e.to_string(),
        }),
    }
}

/// Parses PEM CA certificates into a root store.
pub fn parse_ca(pem: &[u8]) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(pem, CA_CRT)? {
        roots
            .add(cert)
            .map_err(|e| CertError::BadCa(CA_CRT, e.to_string()))?;
    }
    Ok(roots)
}

fn parse_certs(pem: &[u8], key: &'static str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            key,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate(key));
    }
    Ok(certs)
}

/// The DNS names in a certificate's subjectAltName (`*.` wildcards included), lower-cased;
/// empty when it has none or does not parse.
pub fn dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(c) => c
            .valid_dns_names()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether the certificate name `san` covers the route hostname `host`, as TLS clients check
/// it: a name covers itself; a wildcard `*.example.com` covers exactly one more label
/// (`a.example.com`, not `a.b.example.com` nor `example.com`). A wildcard hostname
/// `*.example.com` (which routes every name under `example.com`) is covered only by the same
/// wildcard. Case-insensitive; a trailing dot is ignored.
pub fn san_covers(san: &str, host: &str) -> bool {
    let san = san.trim_end_matches('.');
    let host = host.trim_end_matches('.');
    if san.eq_ignore_ascii_case(host) {
        return true;
    }
    if host.starts_with("*.") {
        return false;
    }
    match (san.strip_prefix("*."), host.split_once('.')) {
        (Some(suffix), Some((label, rest))) => {
            !label.is_empty() && !suffix.is_empty() && rest.eq_ignore_ascii_case(suffix)
        }
        _ => false,
    }
}

/// The route hostnames that none of the certificate names `sans` covers.
pub fn uncovered_hostnames<'a>(sans: &[String], hostnames: &'a [String]) -> Vec<&'a str> {
    hostnames
        .iter()
        .filter(|h| !sans.iter().any(|s| san_covers(s, h)))
        .map(String::as_str)
        .collect()
}

/// A value of a Secret: `data` (already base64-decoded), else `stringData`.
fn secret_value<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.as_bytes())
        })
}

/// Reads a `kubernetes.io/tls` Secret's `tls.crt` / `tls.key`.
pub fn key_pair_from_secret(secret: &Secret) -> Result<CertifiedKey, CertError> {
    match secret.type_.as_deref() {
        None | Some(SECRET_TYPE_TLS) | Some("Opaque") => {}
        Some(other) => return Err(CertError::WrongType(other.to_string())),
    }
    let crt = secret_value(secret, TLS_CRT).ok_or(CertError::MissingKey(TLS_CRT))?;
    let key = secret_value(secret, TLS_KEY).ok_or(CertError::MissingKey(TLS_KEY))?;
    parse_key_pair(crt, key)
}

/// Reads a Secret's `ca.crt`.
pub fn ca_from_secret(secret: &Secret) -> Result<RootCertStore, CertError> {
    parse_ca(secret_value(secret, CA_CRT).ok_or(CertError::MissingKey(CA_CRT))?)
}

/// What a Secret is used for; parsed values are cached per (Secret, purpose).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// `tls.crt` + `tls.key`: a serving or client certificate.
    KeyPair,
    /// `ca.crt`: trust anchors.
    Ca,
}

/// A parsed Secret.
#[derive(Clone, Debug)]
enum Parsed {
    KeyPair(Arc<CertifiedKey>),
    Ca(Arc<RootCertStore>),
}

/// What a Secret reference resolved to.
#[derive(Clone, Debug)]
pub struct SecretLookup<T> {
    /// The value to use: the current one, or the last good one when the current is invalid.
    pub value: Option<T>,
    /// What is wrong with the reference, if anything.
    pub problem: Option<SecretProblem>,
}

/// A problem with a Secret reference, for the route's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretProblem {
    /// No such Secret (`ResolvedRefs=False`, reason `SecretNotFound`).
    NotFound(String),
    /// The Secret's content is unusable (`Accepted=False`, reason `InvalidCertificate`).
    Invalid(String),
}

impl SecretProblem {
    /// The status message.
    pub fn message(&self) -> &str {
        match self {
            SecretProblem::NotFound(m) | SecretProblem::Invalid(m) => m,
        }
    }
}

#[derive(Debug, Default)]
struct CacheEntry {
    /// Hash of the content the good value was parsed from, and the value.
    good: Option<(u64, Parsed)>,
    /// Hash of content that failed to parse, and why (not re-parsed until it changes).
    bad: Option<(u64, CertError)>,
}

/// Secrets by `(namespace, name)`.
pub type SecretIndex<'a> = HashMap<(&'a str, &'a str), &'a Secret>;

/// Parsed Secrets that outlive one compile: the last good value per Secret and purpose.
#[derive(Debug, Default)]
pub struct TlsState {
    cache: Mutex<HashMap<(String, String, Purpose), CacheEntry>>,
}

impl TlsState {
    /// A serving/client certificate from Secret `ns/name`.
    pub fn key_pair(
        &self,
        secrets: &SecretIndex<'_>,
        ns: &str,
        name: &str,
    ) -> SecretLookup<Arc<CertifiedKey>> {
        let l = self.lookup(secrets, ns, name, Purpose::KeyPair);
        SecretLookup {
            value: l.value.and_then(|p| match p {
                Parsed::KeyPair(k) => Some(k),
                Parsed::Ca(_) => None,
            }),
            problem: l.problem,
        }
    }

    /// CA certificates from Secret `ns/name`.
    pub fn ca(
        &self,
        secrets: &SecretIndex<'_>,
        ns: &str,
        name: &str,
    ) -> SecretLookup<Arc<RootCertStore>> {
        let l = self.lookup(secrets, ns, name, Purpose::Ca);
        SecretLookup {
            value: l.value.and_then(|p| match p {
                Parsed::Ca(c) => Some(c),
                Parsed::KeyPair(_) => None,
            }),
            problem: l.problem,
        }
    }

    fn lookup(
        &self,
        secrets: &SecretIndex<'_>,
        ns: &str,
        name: &str,
        purpose: Purpose,
    ) -> SecretLookup<Parsed> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let entry = cache
            .entry((ns.to_string(), name.to_string(), purpose))
            .or_default();
        let Some(secret) = secrets.get(&(ns, name)) else {
            // A deleted Secret stops being served; only a bad edit keeps the old one.
            entry.good = None;
            entry.bad = None;
            return SecretLookup {
                value: None,
                problem: Some(SecretProblem::NotFound(format!(
                    "Secret {ns}/{name} not found"
                ))),
            };
        };
        let hash = content_hash(secret);
        let current_ok = entry.good.as_ref().is_some_and(|(h, _)| *h == hash);
        let current_bad = entry.bad.as_ref().is_some_and(|(h, _)| *h == hash);
        if !current_ok && !current_bad {
            let parsed = match purpose {
                Purpose::KeyPair => {
                    key_pair_from_secret(secret).map(|k| Parsed::KeyPair(Arc::new(k)))
                }
                Purpose::Ca => ca_from_secret(secret).map(|c| Parsed::Ca(Arc::new(c))),
            };
            match parsed {
                Ok(p) => {
                    entry.good = Some((hash, p));
                    entry.bad = None;
                }
                Err(e) => entry.bad = Some((hash, e)),
            }
        }
        let value = entry.good.as_ref().map(|(_, p)| p.clone());
        let problem = match &entry.bad {
            Some((h, e)) if *h == hash => Some(SecretProblem::Invalid(format!(
                "Secret {ns}/{name} {e}{}",
                if value.is_some() {
                    "; still serving its previous certificate"
                } else {
                    ""
                }
            ))),
            _ => None,
        };
        SecretLookup { value, problem }
    }

    /// Forgets Secrets no route referenced in the last compile.
    pub fn retain(&self, used: &HashSet<(String, String, Purpose)>) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|k, _| used.contains(k));
    }
}

/// Hash of the parts of a Secret that parsing reads.
fn content_hash(secret: &Secret) -> u64 {
    let mut h = DefaultHasher::new();
    secret.type_.hash(&mut h);
    if let Some(d) = &secret.data {
        for (k, v) in d {
            k.hash(&mut h);
            v.0.hash(&mut h);
        }
    }
    if let Some(d) = &secret.string_data {
        d.hash(&mut h);
    }
    h.finish()
}

/// Server certificates by SNI name, published inside the routing table.
#[derive(Debug, Default)]
pub struct CertStore {
    exact: HashMap<Box<str>, Arc<CertifiedKey>>,
    /// `(".example.com", cert)` for `*.example.com`, longest suffix first.
    wildcard: Vec<(Box<str>, Arc<CertifiedKey>)>,
    /// From a TLS route without hostnames: any name no other route covers.
    any: Option<Arc<CertifiedKey>>,
    /// `--default-cert-secret`: names nothing else covers, and clients without SNI.
    default: Option<Arc<CertifiedKey>>,
    /// Why the default certificate Secret is unusable, if it is (for the log).
    pub default_problem: Option<String>,
}

impl CertStore {
    /// The certificate for a ClientHello's SNI name (`None`: the client sent none).
    /// Exact names beat the longest wildcard suffix, which beats a route without hostnames,
    /// which beats the default.
    pub fn resolve(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        if let Some(name) = sni {
            let lower;
            let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                lower = name.to_ascii_lowercase();
                lower.as_str()
            } else {
                name
            };
            let name = name.trim_end_matches('.');
            if let Some(c) = self.exact.get(name) {
                return Some(c);
            }
            for (suffix, c) in &self.wildcard {
                if name.len() > suffix.len() && name.ends_with(&**suffix) {
                    return Some(c);
                }
            }
        }
        self.any.as_ref().or(self.default.as_ref())
    }

    /// True when no certificate at all is configured.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty()
            && self.wildcard.is_empty()
            && self.any.is_none()
            && self.default.is_none()
    }

    /// Number of names (exact and wildcard) with a certificate.
    pub fn names(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }
}

/// Accumulates certificates per hostname; the first insert of a name wins (routes are
/// inserted oldest first, as for path conflicts).
#[derive(Debug, Default)]
pub struct CertStoreBuilder {
    names: BTreeMap<String, Arc<CertifiedKey>>,
    any: Option<Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    default_problem: Option<String>,
}

impl CertStoreBuilder {
    /// Serves `cert` for `hostnames` (`*.x` = any name under `x`); an empty list means any
    /// name not otherwise covered. Names already taken are left alone; they are returned.
    pub fn insert(&mut self, hostnames: &[String], cert: &Arc<CertifiedKey>) -> Vec<String> {
        let mut taken = Vec::new();
        if hostnames.is_empty() {
            if self.any.is_none() {
                self.any = Some(cert.clone());
            } else if !self.any.as_ref().is_some_and(|a| Arc::ptr_eq(a, cert)) {
                taken.push("(any host)".to_string());
            }
        }
        for h in hostnames {
            match self.names.get(h) {
                None => {
                    self.names.insert(h.clone(), cert.clone());
                }
                Some(c) if Arc::ptr_eq(c, cert) => {}
                Some(_) => taken.push(h.clone()),
            }
        }
        taken
    }

    /// Sets the default certificate (or why there is none).
    pub fn default_cert(&mut self, cert: Option<Arc<CertifiedKey>>, problem: Option<String>) {
        self.default = cert;
        self.default_problem = problem;
    }

    /// The finished store.
    pub fn finish(self) -> CertStore {
        let mut store = CertStore {
            any: self.any,
            default: self.default,
            default_problem: self.default_problem,
            ..CertStore::default()
        };
        for (name, cert) in self.names {
            match name.strip_prefix('*') {
                Some(suffix) => store.wildcard.push((suffix.into(), cert)),
                None => {
                    store.exact.insert(name.into(), cert);
                }
            }
        }
        store
            .wildcard
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        store
    }
}

/// rustls' certificate resolver for the TLS listener: one atomic load of the current store
/// per handshake, then a map lookup. `fallback` is the `--default-cert`/`--default-key`
/// pair, used when the store has nothing for the name.
#[derive(Debug)]
pub struct SniResolver<F> {
    current: F,
    fallback: Option<Arc<CertifiedKey>>,
}

impl<F> SniResolver<F> {
    /// A resolver reading the store through `current`.
    pub fn new(current: F, fallback: Option<Arc<CertifiedKey>>) -> Self {
        SniResolver { current, fallback }
    }
}

/// Something that yields the currently published [`CertStore`] (the routing table cell).
pub trait CurrentCerts: std::fmt::Debug + Send + Sync {
    /// Looks the name up in the current store.
    fn resolve(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>>;
}

impl<F: CurrentCerts> ResolvesServerCert for SniResolver<F> {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let found = self.current.resolve(hello.server_name());
        if found.is_none() && self.fallback.is_none() {
            tracing::debug!(sni = ?hello.server_name(), "no certificate for TLS handshake");
        }
        found.or_else(|| self.fallback.clone())
    }
}

/// The TLS listener's rustls configuration: TLS 1.3/1.2, no client auth, ALPN `h2` and
/// `http/1.1`, certificates from `resolver`.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// The public web trust anchors bundled with ssegate (Mozilla's list, via `webpki-roots`).
pub fn web_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            Arc::new(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
        })
        .clone()
}

/// Everything needed to open TLS to one backend.
#[derive(Debug)]
pub struct UpstreamTls {
    /// Verifies the backend against the CA (or web roots), offers ALPN for the protocol,
    /// presents the client certificate if any.
    pub config: Arc<ClientConfig>,
    /// The name verified in the backend's certificate and sent as SNI.
    pub server_name: ServerName<'static>,
}

impl UpstreamTls {
    /// Builds the client side for a backend.
    pub fn new(
        roots: Arc<RootCertStore>,
        client_cert: Option<Arc<CertifiedKey>>,
        protocol: BackendProtocol,
        server_name: ServerName<'static>,
    ) -> Self {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .expect("ring supports TLS 1.2 and 1.3")
            .with_root_certificates(roots);
        let mut config = match client_cert {
            Some(c) => builder.with_client_cert_resolver(Arc::new(ClientCert(c))),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = match protocol {
            BackendProtocol::H2 => vec![b"h2".to_vec()],
            BackendProtocol::Http1 | BackendProtocol::H2c => vec![b"http/1.1".to_vec()],
        };
        UpstreamTls {
            config: Arc::new(config),
            server_name,
        }
    }
}

/// Always presents one client certificate.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn san_matching_follows_tls_client_rules() {
        // Exact names, case-insensitive, trailing dot ignored.
        assert!(san_covers("a.example", "a.example"));
        assert!(san_covers("A.Example", "a.example."));
        assert!(!san_covers("a.example", "b.example"));
        // A wildcard covers exactly one more label.
        assert!(san_covers("*.b.example", "x.b.example"));
        assert!(!san_covers("*.b.example", "y.x.b.example"));
        assert!(!san_covers("*.b.example", "b.example"));
        assert!(!san_covers("*.example", "a.b.example"));
        assert!(!san_covers("*.", "a"));
        // A wildcard hostname needs the same wildcard in the certificate.
        assert!(san_covers("*.b.example", "*.b.example"));
        assert!(!san_covers("x.b.example", "*.b.example"));
        assert!(!san_covers("*.example", "*.b.example"));
    }

    #[test]
    fn uncovered_hostnames_are_read_from_the_certificate() {
        let (pem, _) = self_signed(&["a.example", "*.w.example"]);
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let sans = dns_names(&der);
        assert_eq!(sans, vec!["a.example", "*.w.example"]);
        let hosts: Vec<String> = ["a.example", "x.w.example", "*.w.example", "b.example"]
            .map(String::from)
            .into();
        assert_eq!(uncovered_hostnames(&sans, &hosts), vec!["b.example"]);
        assert!(dns_names(&CertificateDer::from(vec![1, 2, 3])).is_empty());
    }

    /// A self-signed certificate for `names` as `(cert_pem, key_pem)`.
    pub(crate) fn self_signed(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let c = rcgen::generate_simple_self_signed(names).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    /// A `kubernetes.io/tls` Secret.
    pub(crate) fn tls_secret(ns: &str, name: &str, crt: &str, key: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            type_: Some(SECRET_TYPE_TLS.into()),
            data: Some(
                [
                    (TLS_CRT.to_string(), ByteString(crt.as_bytes().to_vec())),
                    (TLS_KEY.to_string(), ByteString(key.as_bytes().to_vec())),
                ]
                .into(),
            ),
            ..Default::default()
        }
    }

    fn index(secrets: &[Secret]) -> SecretIndex<'_> {
        secrets
            .iter()
            .map(|s| {
                (
                    (
                        s.metadata.namespace.as_deref().unwrap(),
                        s.metadata.name.as_deref().unwrap(),
                    ),
                    s,
                )
            })
            .collect()
    }

    #[test]
    fn key_pair_parses_and_mismatch_is_detected() {
        let (crt, key) = self_signed(&["a.example"]);
        let (_, other_key) = self_signed(&["b.example"]);
        assert!(parse_key_pair(crt.as_bytes(), key.as_bytes()).is_ok());
        assert_eq!(
            parse_key_pair(crt.as_bytes(), other_key.as_bytes()).unwrap_err(),
            CertError::KeyMismatch
        );
        assert_eq!(
            parse_key_pair(b"garbage", key.as_bytes()).unwrap_err(),
            CertError::NoCertificate(TLS_CRT)
        );
        assert!(matches!(
            parse_key_pair(crt.as_bytes(), b"").unwrap_err(),
            CertError::BadKey(_)
        ));
        let truncated = &crt[..crt.len() / 2];
        assert!(parse_key_pair(truncated.as_bytes(), key.as_bytes()).is_err());
    }

    #[test]
    fn secret_shape_is_checked() {
        let (crt, key) = self_signed(&["a.example"]);
        let mut s = tls_secret("ns", "s", &crt, &key);
        assert!(key_pair_from_secret(&s).is_ok());
        s.type_ = Some("kubernetes.io/basic-auth".into());
        assert!(matches!(
            key_pair_from_secret(&s).unwrap_err(),
            CertError::WrongType(_)
        ));
        s.type_ = None;
        s.data.as_mut().unwrap().remove(TLS_KEY);
        assert_eq!(
            key_pair_from_secret(&s).unwrap_err(),
            CertError::MissingKey(TLS_KEY)
        );
        s.string_data = Some([(TLS_KEY.to_string(), key)].into());
        assert!(key_pair_from_secret(&s).is_ok(), "stringData is read too");
    }

    #[test]
    fn ca_parses() {
        let (crt, _) = self_signed(&["ca.example"]);
        assert_eq!(parse_ca(crt.as_bytes()).unwrap().len(), 1);
        assert!(parse_ca(b"").is_err());
    }

    #[test]
    fn invalid_update_keeps_last_good_until_fixed_or_deleted() {
        let state = TlsState::default();
        let (crt, key) = self_signed(&["a.example"]);
        let good = vec![tls_secret("ns", "s", &crt, &key)];
        let first = state.key_pair(&index(&good), "ns", "s");
        assert!(first.problem.is_none());
        let first = first.value.unwrap();
        // Unchanged content: the same parsed value, not a re-parse.
        let again = state.key_pair(&index(&good), "ns", "s").value.unwrap();
        assert!(Arc::ptr_eq(&first, &again));

        let (_, wrong_key) = self_signed(&["x"]);
        let bad = vec![tls_secret("ns", "s", &crt, &wrong_key)];
        let l = state.key_pair(&index(&bad), "ns", "s");
        assert!(Arc::ptr_eq(&l.value.unwrap(), &first), "last good kept");
        let Some(SecretProblem::Invalid(msg)) = l.problem else {
            panic!("expected Invalid");
        };
        assert!(msg.contains("does not match"), "{msg}");
        assert!(msg.contains("previous certificate"), "{msg}");

        let (crt2, key2) = self_signed(&["a.example"]);
        let fixed = vec![tls_secret("ns", "s", &crt2, &key2)];
        let l = state.key_pair(&index(&fixed), "ns", "s");
        assert!(l.problem.is_none());
        assert!(!Arc::ptr_eq(&l.value.unwrap(), &first));

        let l = state.key_pair(&index(&[]), "ns", "s");
        assert!(l.value.is_none());
        assert!(matches!(l.problem, Some(SecretProblem::NotFound(_))));
        // After deletion nothing good is remembered: a bad re-creation serves nothing.
        let l = state.key_pair(&index(&bad), "ns", "s");
        assert!(l.value.is_none());
        assert!(matches!(l.problem, Some(SecretProblem::Invalid(_))));
    }

    #[test]
    fn invalid_first_version_serves_nothing() {
        let state = TlsState::default();
        let (crt, _) = self_signed(&["a"]);
        let s = vec![tls_secret("ns", "s", &crt, "nope")];
        let l = state.key_pair(&index(&s), "ns", "s");
        assert!(l.value.is_none());
        assert!(!l.problem.unwrap().message().contains("previous"));
    }

    #[test]
    fn retain_forgets_unused_secrets() {
        let state = TlsState::default();
        let (crt, key) = self_signed(&["a"]);
        let s = vec![tls_secret("ns", "s", &crt, &key)];
        state.key_pair(&index(&s), "ns", "s");
        state.retain(&HashSet::new());
        assert!(state.cache.lock().unwrap().is_empty());
    }

    fn cert(name: &str) -> Arc<CertifiedKey> {
        let (crt, key) = self_signed(&[name]);
        Arc::new(parse_key_pair(crt.as_bytes(), key.as_bytes()).unwrap())
    }

    #[test]
    fn sni_exact_beats_longest_wildcard_beats_any_beats_default() {
        let (a, wild, deep, any, dflt) = (
            cert("a.example.com"),
            cert("*.example.com"),
            cert("*.b.example.com"),
            cert("any"),
            cert("default"),
        );
        let mut b = CertStoreBuilder::default();
        assert!(b.insert(&["a.example.com".into()], &a).is_empty());
        b.insert(&["*.example.com".into()], &wild);
        b.insert(&["*.b.example.com".into()], &deep);
        let same = |x: Option<&Arc<CertifiedKey>>, y: &Arc<CertifiedKey>| {
            x.is_some_and(|x| Arc::ptr_eq(x, y))
        };
        let store = {
            let mut b2 = CertStoreBuilder::default();
            b2.insert(&["a.example.com".into()], &a);
            b2.insert(&["*.example.com".into()], &wild);
            b2.insert(&["*.b.example.com".into()], &deep);
            b2.default_cert(Some(dflt.clone()), None);
            b2.finish()
        };
        assert!(same(store.resolve(Some("a.example.com")), &a));
        assert!(same(store.resolve(Some("A.Example.COM.")), &a));
        assert!(same(store.resolve(Some("x.example.com")), &wild));
        assert!(same(store.resolve(Some("x.b.example.com")), &deep));
        assert!(same(store.resolve(Some("example.com")), &dflt));
        assert!(same(store.resolve(None), &dflt));
        b.insert(&[], &any);
        b.default_cert(Some(dflt.clone()), None);
        let store = b.finish();
        assert!(same(store.resolve(Some("other.org")), &any));
        assert_eq!(store.names(), 3);
        assert!(
            CertStoreBuilder::default()
                .finish()
                .resolve(Some("a"))
                .is_none()
        );
    }

    #[test]
    fn first_route_keeps_a_name() {
        let (a, b) = (cert("a"), cert("b"));
        let mut builder = CertStoreBuilder::default();
        builder.insert(&["h".into()], &a);
        assert_eq!(builder.insert(&["h".into(), "i".into()], &b), vec!["h"]);
        let store = builder.finish();
        assert!(Arc::ptr_eq(store.resolve(Some("h")).unwrap(), &a));
        assert!(Arc::ptr_eq(store.resolve(Some("i")).unwrap(), &b));
    }
}
