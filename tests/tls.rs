//! TLS and HTTP/2 over real loopback sockets, with certificates generated at test time:
//! SNI, default certificate, reload, last-good on a bad Secret, h2 (ALPN) and h2c clients,
//! HTTPS redirect, upstream TLS/mTLS/h2/h2c, and real `curl` clients.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Version};
use http_body_util::Full;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use ssegate::server::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

// ---------------------------------------------------------------- certificates

/// A private CA that issues leaf certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and key.
#[derive(Clone)]
struct Leaf {
    crt: String,
    key: String,
}

impl Leaf {
    fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.crt.as_bytes()).unwrap()
    }
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ssegate test CA");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }
    fn pem(&self) -> String {
        self.issuer.pem()
    }
    fn leaf(&self, names: &[&str]) -> Leaf {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            crt: cert.pem(),
            key: key.serialize_pem(),
        }
    }
    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem().as_bytes()).unwrap())
            .unwrap();
        roots
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("    {l}\n")).collect()
}

/// A `kubernetes.io/tls` Secret manifest with PEM in `stringData`.
fn secret_yaml(name: &str, leaf: &Leaf) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: apps}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&leaf.crt),
        indent(&leaf.key)
    )
}

/// A route with hostnames and `spec.tls`, one rule `/events` → `svc`, plus backend YAML
/// lines (indented 8 spaces) in `backend_extra`.
fn tls_route(name: &str, hosts: &[&str], tls: Option<(&str, bool)>, backend_extra: &str) -> String {
    let hosts = hosts
        .iter()
        .map(|h| format!("\"{h}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let tls = tls.map_or(String::new(), |(secret, redirect)| {
        format!("  tls: {{secretName: {secret}, redirect: {redirect}}}\n")
    });
    format!(
        "apiVersion: ssegate.io/v1alpha1\nkind: SseRoute\nmetadata: {{name: {name}, namespace: apps}}\nspec:\n  hostnames: [{hosts}]\n{tls}  rules:\n    - match: {{path: /events}}\n      backend:\n        service: svc\n        port: 80\n{backend_extra}"
    )
}

// ---------------------------------------------------------------- clients

/// A TLS client config trusting `roots`, offering `alpn`.
fn client_config(roots: rustls::RootCertStore, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// Accepts any server certificate: for asserting *which* certificate was served.
#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The certificate ssegate serves for `sni` (no verification), or None if the handshake
/// fails.
async fn served_cert(addr: SocketAddr, sni: &str) -> Option<CertificateDer<'static>> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .ok()?;
    tls.get_ref().1.peer_certificates().map(|c| c[0].clone())
}

async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

/// An HTTP/2 client connection over `io` (driven by a spawned task).
async fn h2_client<IO>(io: IO, window: Option<u32>) -> http2::SendRequest<Full<Bytes>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new());
    if let Some(w) = window {
        b.initial_stream_window_size(w).adaptive_window(false);
    }
    let (sender, conn) = b.handshake(TokioIo::new(io)).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

async fn h2_get(sender: &mut http2::SendRequest<Full<Bytes>>, uri: &str) -> ClientResponse {
    sender.ready().await.unwrap();
    let req = Request::get(uri).body(Full::new(Bytes::new())).unwrap();
    let resp = tokio::time::timeout(PATIENCE, sender.send_request(req))
        .await
        .expect("no response in time")
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    ClientResponse::new(resp)
}

/// Response headers HTTP/2 forbids (RFC 9113 §8.2.2).
fn assert_no_connection_headers(resp: &ClientResponse) {
    for h in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        assert!(resp.headers.get(h).is_none(), "h2 response carries {h}");
    }
}

// ---------------------------------------------------------------- setup

struct Setup {
    ca: Ca,
    backend: Backend,
    cfg: ConfigDir,
    ss: Running,
}

impl Setup {
    fn tls_addr(&self) -> SocketAddr {
        self.ss.tls_addr.unwrap()
    }
}

/// Routes `a` (a.example, Secret a-cert) and `b` (*.b.example, Secret b-cert) to one SSE
/// backend; ssegate with a TLS listener.
async fn setup(tweak: impl FnOnce(&mut ssegate::server::ServerConfig, &Ca, &ConfigDir)) -> Setup {
    let ca = Ca::new();
    let backend = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    cfg.write(
        "a-cert.yaml",
        &secret_yaml("a-cert", &ca.leaf(&["a.example"])),
    );
    cfg.write(
        "b-cert.yaml",
        &secret_yaml("b-cert", &ca.leaf(&["*.b.example"])),
    );
    cfg.write(
        "a.yaml",
        &tls_route("a", &["a.example"], Some(("a-cert", false)), ""),
    );
    cfg.write(
        "b.yaml",
        &tls_route("b", &["*.b.example"], Some(("b-cert", false)), ""),
    );
    let ss = start_ssegate_tweaked(&cfg, |c| {
        c.listen_tls = Some("127.0.0.1:0".parse().unwrap());
        tweak(c, &ca, &cfg);
    })
    .await;
    Setup {
        ca,
        backend,
        cfg,
        ss,
    }
}

fn secret_leaf(cfg: &ConfigDir, file: &str) -> CertificateDer<'static> {
    let text = std::fs::read_to_string(cfg.path().join(file)).unwrap();
    let start = text.find("-----BEGIN CERTIFICATE").unwrap();
    let pem: String = text[start..]
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("tls.key"))
        .collect::<Vec<_>>()
        .join("\n");
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn sni_picks_the_certificate_of_each_hostname_wildcard_and_default() {
    let default = Ca::new().leaf(&["default.invalid"]);
    let d2 = default.clone();
    let s = setup(move |c, _, cfg| {
        std::fs::write(cfg.path().join("default.crt"), &d2.crt).unwrap();
        std::fs::write(cfg.path().join("default.key"), &d2.key).unwrap();
        c.default_cert = Some((
            cfg.path().join("default.crt"),
            cfg.path().join("default.key"),
        ));
    })
    .await;
    let a = secret_leaf(&s.cfg, "a-cert.yaml");
    let b = secret_leaf(&s.cfg, "b-cert.yaml");
    assert_ne!(a, b);
    assert_eq!(served_cert(s.tls_addr(), "a.example").await.unwrap(), a);
    assert_eq!(served_cert(s.tls_addr(), "A.Example").await.unwrap(), a);
    assert_eq!(served_cert(s.tls_addr(), "x.b.example").await.unwrap(), b);
    assert_eq!(served_cert(s.tls_addr(), "y.x.b.example").await.unwrap(), b);
    assert_eq!(
        served_cert(s.tls_addr(), "unknown.example").await.unwrap(),
        default.der()
    );
    // A verifying client gets through to the backend, with X-Forwarded-Proto https.
    let mut backend = s.backend;
    let io = tls_connect(
        s.ss.tls_addr.unwrap(),
        "a.example",
        client_config(s.ca.roots(), &[b"http/1.1"]),
    )
    .await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("/events")
                .header("host", "a.example")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut resp = ClientResponse::new(resp);
    let stream = backend.next_stream().await;
    assert_eq!(stream.header("x-forwarded-proto"), Some("https"));
    stream.send("data: tls\n\n").await;
    assert_eq!(resp.chunk().await.unwrap(), "data: tls\n\n");
}

#[tokio::test]
async fn default_certificate_files_reload_and_a_bad_edit_keeps_the_last_good() {
    // Outside the config directory: noticed by the periodic re-check.
    let files = tempfile::tempdir().unwrap();
    let (crt, key) = (files.path().join("d.crt"), files.path().join("d.key"));
    let first = Ca::new().leaf(&["default.invalid"]);
    std::fs::write(&crt, &first.crt).unwrap();
    std::fs::write(&key, &first.key).unwrap();
    let pair = (crt.clone(), key.clone());
    let s = setup(move |c, _, _| c.default_cert = Some(pair)).await;
    let addr = s.tls_addr();
    assert_eq!(
        served_cert(addr, "unknown.example").await.unwrap(),
        first.der()
    );

    let second = Ca::new().leaf(&["default.invalid"]);
    std::fs::write(&crt, &second.crt).unwrap();
    std::fs::write(&key, &second.key).unwrap();
    let want = second.der();
    eventually("the edited default certificate is served", || {
        let want = want.clone();
        async move { served_cert(addr, "unknown.example").await == Some(want) }
    })
    .await;
    // Routes' certificates are unaffected.
    assert_eq!(
        served_cert(addr, "a.example").await.unwrap(),
        secret_leaf(&s.cfg, "a-cert.yaml")
    );

    // A key that does not belong to the certificate: reloaded, refused, last good kept.
    let reloads = r#"ssegate_config_reloads_total{result="success"}"#;
    let before = sample(&metrics(&s.ss).await, reloads).unwrap();
    std::fs::write(&key, &first.key).unwrap();
    eventually("the bad edit is loaded", || async {
        sample(&metrics(&s.ss).await, reloads).unwrap() > before
    })
    .await;
    assert_eq!(
        served_cert(addr, "unknown.example").await.unwrap(),
        second.der()
    );
}

#[tokio::test]
async fn unknown_name_without_default_fails_the_handshake() {
    let s = setup(|_, _, _| {}).await;
    assert!(served_cert(s.tls_addr(), "unknown.example").await.is_none());
    assert!(served_cert(s.tls_addr(), "a.example").await.is_some());
}

#[tokio::test]
async fn default_certificate_from_a_secret() {
    let s = setup(|c, ca, cfg| {
        cfg.write(
            "fallback.yaml",
            &secret_yaml("fallback", &ca.leaf(&["fallback"])),
        );
        c.compile.default_cert_secret = Some("apps/fallback".into());
    })
    .await;
    let fallback = secret_leaf(&s.cfg, "fallback.yaml");
    assert_eq!(
        served_cert(s.tls_addr(), "nobody.example").await.unwrap(),
        fallback
    );
}

#[tokio::test]
async fn secret_change_reloads_the_certificate_without_dropping_open_streams() {
    let mut s = setup(|_, _, _| {}).await;
    let old = secret_leaf(&s.cfg, "a-cert.yaml");
    let io = tls_connect(
        s.tls_addr(),
        "a.example",
        client_config(s.ca.roots(), &[b"h2"]),
    )
    .await;
    let mut sender = h2_client(io, None).await;
    let mut resp = h2_get(&mut sender, "https://a.example/events").await;
    let stream = s.backend.next_stream().await;
    stream.send("data: before\n\n").await;
    assert_eq!(resp.chunk().await.unwrap(), "data: before\n\n");

    s.cfg.write(
        "a-cert.yaml",
        &secret_yaml("a-cert", &s.ca.leaf(&["a.example"])),
    );
    let new = secret_leaf(&s.cfg, "a-cert.yaml");
    assert_ne!(old, new);
    let addr = s.tls_addr();
    eventually("new certificate served", || {
        let new = new.clone();
        async move { served_cert(addr, "a.example").await == Some(new) }
    })
    .await;

    stream.send("data: after\n\n").await;
    assert_eq!(resp.chunk().await.unwrap(), "data: after\n\n");
    // The old connection also still takes new streams.
    let _second = h2_get(&mut sender, "https://a.example/events").await;
    s.backend.next_stream().await;
}

#[tokio::test]
async fn invalid_secret_update_keeps_serving_the_previous_certificate() {
    let mut s = setup(|_, _, _| {}).await;
    let good = secret_leaf(&s.cfg, "a-cert.yaml");
    // A certificate with someone else's key, and in the same file (so the same reload) a
    // probe route that shows when the reload happened.
    let mut bad = s.ca.leaf(&["a.example"]);
    bad.key = s.ca.leaf(&["other"]).key;
    s.cfg.write(
        "a-cert.yaml",
        &format!(
            "{}---\n{}",
            secret_yaml("a-cert", &bad),
            route_yaml("probe", "/probe", "svc", "")
        ),
    );
    let addr = s.ss.proxy_addr;
    eventually("reload with the bad Secret applied", || async move {
        get(addr, "h", "/probe").await.status == 200
    })
    .await;
    assert_eq!(served_cert(s.tls_addr(), "a.example").await.unwrap(), good);
    // The route's plain-HTTP traffic is unaffected.
    let _resp = get(s.ss.proxy_addr, "a.example", "/events").await;
    while s.backend.next_stream().await.parts.uri.path() != "/events" {}
}

#[tokio::test]
async fn h2_over_tls_carries_100_concurrent_streams_on_one_connection() {
    let mut s = setup(|_, _, _| {}).await;
    let io = tls_connect(
        s.tls_addr(),
        "a.example",
        client_config(s.ca.roots(), &[b"h2", b"http/1.1"]),
    )
    .await;
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut sender = h2_client(io, None).await;
    let mut responses = Vec::new();
    let mut streams = Vec::new();
    for i in 0..100 {
        let mut resp = h2_get(&mut sender, &format!("https://a.example/events?n={i}")).await;
        let st = s.backend.next_stream().await;
        st.send(format!("data: hello {i}\n\n")).await;
        assert_eq!(resp.chunk().await.unwrap(), format!("data: hello {i}\n\n"));
        responses.push(resp);
        streams.push(st);
    }
    // All 100 are open at once; each gets its own next event, in reverse order.
    for (st, resp) in streams.iter().zip(&responses).rev() {
        assert!(st.is_open());
        assert_no_connection_headers(resp);
        assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    }
    for i in (0..100).rev() {
        let n = streams[i].parts.uri.query().unwrap().to_string();
        streams[i].send(format!("id: {i}\ndata: {n}\n\n")).await;
        assert_eq!(
            responses[i].chunk().await.unwrap(),
            format!("id: {i}\ndata: n={i}\n\n")
        );
    }
    let m = metrics(&s.ss).await;
    assert_eq!(
        sample(&m, r#"ssegate_connections_active{route="apps/a"}"#),
        Some(100.0)
    );
}

#[tokio::test]
async fn h2c_prior_knowledge_on_the_plain_listener() {
    let mut s = setup(|_, _, _| {}).await;
    let tcp = TcpStream::connect(s.ss.proxy_addr).await.unwrap();
    let mut sender = h2_client(tcp, None).await;
    let mut resps = Vec::new();
    for _ in 0..10 {
        resps.push(h2_get(&mut sender, "http://a.example/events").await);
    }
    for resp in &mut resps {
        let st = s.backend.next_stream().await;
        assert_eq!(st.header("x-forwarded-proto"), Some("http"));
        assert_eq!(st.header("host"), Some("a.example"), "Host from :authority");
        st.send("data: h2c\n\n").await;
        assert_no_connection_headers(resp);
    }
    for resp in &mut resps {
        assert_eq!(resp.chunk().await.unwrap(), "data: h2c\n\n");
    }
}

#[tokio::test]
async fn a_stalled_h2_stream_does_not_hold_up_its_neighbours() {
    let mut s = setup(|_, _, _| {}).await;
    let tcp = TcpStream::connect(s.ss.proxy_addr).await.unwrap();
    // A small per-stream window: a stream nobody reads stalls after 16 KiB.
    let mut sender = h2_client(tcp, Some(16 * 1024)).await;
    let stalled = h2_get(&mut sender, "http://a.example/events").await;
    let big = s.backend.next_stream().await;
    let mut live = h2_get(&mut sender, "http://a.example/events").await;
    let small = s.backend.next_stream().await;
    // Push far more than the window into the unread stream, without waiting on it.
    let event = Bytes::from(format!("data: {}\n\n", "x".repeat(8 * 1024)));
    let pusher = tokio::spawn(async move {
        for _ in 0..4000 {
            big.send(event.clone()).await;
        }
        big
    });
    for i in 0..20 {
        small.send(format!("data: {i}\n\n")).await;
        assert_eq!(live.chunk().await.unwrap(), format!("data: {i}\n\n"));
    }
    assert!(
        !pusher.is_finished(),
        "flow control should stall the unread stream"
    );
    // Reading the stalled stream drains everything, intact.
    let mut stalled = stalled;
    let mut got = 0usize;
    while got < 4000 * (8 * 1024 + 8) {
        got += stalled.chunk().await.unwrap().len();
    }
    assert_eq!(got, 4000 * (8 * 1024 + 8));
    pusher.await.unwrap();
}

#[tokio::test]
async fn idle_h2_connections_get_pings() {
    let s = setup(|c, _, _| c.proxy.h2_keepalive_interval = Some(Duration::from_millis(200))).await;
    let mut tcp = TcpStream::connect(s.ss.proxy_addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    // Read frames (9-byte header + payload) until a PING without the ACK flag arrives.
    let ping = tokio::time::timeout(PATIENCE, async {
        loop {
            let mut head = [0u8; 9];
            tcp.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            tcp.read_exact(&mut payload).await?;
            if head[3] == 0x6 && head[4] & 0x1 == 0 {
                return Ok::<_, std::io::Error>(payload);
            }
        }
    })
    .await
    .expect("no PING within PATIENCE")
    .unwrap();
    assert_eq!(ping.len(), 8);
}

#[tokio::test]
async fn redirect_sends_plain_http_to_https_with_host_path_and_query() {
    let ca = Ca::new();
    let mut backend = Backend::start(Reply::Sse).await;
    let cfg = ConfigDir::new();
    cfg.write("svc.yaml", &service_yaml("svc", &[backend.addr], &[]));
    cfg.write(
        "a-cert.yaml",
        &secret_yaml("a-cert", &ca.leaf(&["a.example"])),
    );
    cfg.write(
        "a.yaml",
        &tls_route("a", &["a.example"], Some(("a-cert", true)), ""),
    );
    let ss = start_ssegate_tweaked(&cfg, |c| {
        c.listen_tls = Some("127.0.0.1:0".parse().unwrap());
        c.proxy.https_port = 8443;
    })
    .await;
    let resp = get(ss.proxy_addr, "a.example:8080", "/events/x?since=5&y=%20").await;
    assert_eq!(resp.status, 308);
    assert_eq!(
        resp.header("location"),
        Some("https://a.example:8443/events/x?since=5&y=%20")
    );
    // Over TLS the same route is proxied.
    let io = tls_connect(
        ss.tls_addr.unwrap(),
        "a.example",
        client_config(ca.roots(), &[b"h2"]),
    )
    .await;
    let mut sender = h2_client(io, None).await;
    let mut resp = h2_get(&mut sender, "https://a.example/events").await;
    backend.next_stream().await.send("data: secure\n\n").await;
    assert_eq!(resp.chunk().await.unwrap(), "data: secure\n\n");
}

// ---------------------------------------------------------------- upstream

/// Backend options serving TLS (ALPN h2, http/1.1) with a certificate for `backend.internal`
/// from `ca`; with `client_ca` client certificates from that CA are required.
fn backend_tls(ca: &Ca, client_ca: Option<&Ca>) -> BackendOpts {
    let leaf = ca.leaf(&["backend.internal"]);
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(cca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(cca.roots()),
                provider(),
            )
            .build()
            .unwrap(),
        ),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(
            vec![leaf.der()],
            PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    BackendOpts {
        tls: Some(Arc::new(cfg)),
    }
}

/// Backend YAML lines: TLS verified with the `backend-ca` Secret, for `server_name`.
fn upstream_tls_yaml(server_name: &str) -> String {
    format!("        tls: {{enabled: true, caSecretName: backend-ca, serverName: {server_name}}}\n")
}

/// Backend YAML lines: h2 over TLS with the client certificate of the `me` Secret.
const MUTUAL_H2: &str = "        protocol: h2\n        tls: {enabled: true, caSecretName: backend-ca, serverName: backend.internal, clientCertSecretName: me}\n";

/// One upstream set-up shared by the stream-route and poll-route tests: the CA ssegate
/// trusts (`backend-ca`), how the backend serves (certificate, client-certificate
/// requirement), the backend YAML lines that reach it and the extra manifests they need.
struct Upstream {
    ca: Ca,
    backend: BackendOpts,
    yaml: String,
    files: Vec<(&'static str, String)>,
}

impl Upstream {
    /// TLS, the backend's certificate issued by the CA ssegate trusts.
    fn verified() -> Self {
        let ca = Ca::new();
        Upstream {
            backend: backend_tls(&ca, None),
            ca,
            yaml: upstream_tls_yaml("backend.internal"),
            files: vec![],
        }
    }

    /// TLS, the backend's certificate issued by a CA ssegate does not trust.
    fn wrong_ca() -> Self {
        Upstream {
            backend: backend_tls(&Ca::new(), None),
            ..Self::verified()
        }
    }

    /// h2 over mutual TLS: the backend requires a client certificate, ssegate sends the `me`
    /// Secret's.
    fn mutual_h2() -> Self {
        let ca = Ca::new();
        let client_ca = Ca::new();
        let me = client_ca.leaf(&["ssegate.client"]);
        Upstream {
            backend: backend_tls(&ca, Some(&client_ca)),
            ca,
            yaml: MUTUAL_H2.to_string(),
            files: vec![("me.yaml", secret_yaml("me", &me))],
        }
    }

    /// Cleartext HTTP/2 with prior knowledge.
    fn h2c() -> Self {
        Upstream {
            ca: Ca::new(),
            backend: BackendOpts::default(),
            yaml: "        protocol: h2c\n".to_string(),
            files: vec![],
        }
    }

    /// ssegate routing `/events` to `backend` with this set-up, plus `rule_extra` rule lines.
    async fn ssegate(&self, backend: SocketAddr, rule_extra: &str) -> (Running, ConfigDir) {
        let yaml = format!("{}{rule_extra}", self.yaml);
        upstream_setup(&self.ca, backend, &yaml, &self.files).await
    }
}

/// ssegate with one route `/events` (any host) whose backend YAML gets `backend_extra`;
/// `ca.crt` (the CA's PEM) is loaded from a file through the standalone annotation.
async fn upstream_setup(
    ca: &Ca,
    backend: SocketAddr,
    backend_extra: &str,
    extra_files: &[(&str, String)],
) -> (Running, ConfigDir) {
    let cfg = ConfigDir::new();
    std::fs::write(cfg.path().join("ca.pem"), ca.pem()).unwrap();
    cfg.write(
        "ca.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: backend-ca\n  namespace: apps\n  annotations: {ssegate.io/ca-file: ca.pem}\n",
    );
    cfg.write("svc.yaml", &service_yaml("svc", &[backend], &[]));
    cfg.write("route.yaml", &tls_route("up", &[], None, backend_extra));
    for (name, text) in extra_files {
        cfg.write(name, text);
    }
    (start_ssegate(&cfg).await, cfg)
}

#[tokio::test]
async fn upstream_tls_verified_with_a_private_ca() {
    let up = Upstream::verified();
    let mut backend = Backend::start_with(Reply::Sse, up.backend.clone()).await;
    let (ss, _cfg) = up.ssegate(backend.addr, "").await;
    let mut resp = get(ss.proxy_addr, "h", "/events").await;
    let st = backend.next_stream().await;
    assert_eq!(st.parts.version, Version::HTTP_11);
    st.send("data: over tls\n\n").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.chunk().await.unwrap(), "data: over tls\n\n");
}

#[tokio::test]
async fn upstream_tls_with_the_wrong_ca_or_name_is_a_502() {
    let up = Upstream::wrong_ca();
    let backend = Backend::start_with(Reply::Sse, up.backend.clone()).await;
    let (ss, _cfg) = up.ssegate(backend.addr, "").await;
    let resp = get(ss.proxy_addr, "h", "/events").await;
    assert_eq!(resp.status, 502);
    assert!(resp.text().await.contains("upstream_tls"));

    let up = Upstream::verified();
    let backend = Backend::start_with(Reply::Sse, up.backend.clone()).await;
    let wrong_name = upstream_tls_yaml("wrong.internal");
    let (ss, _cfg) = upstream_setup(&up.ca, backend.addr, &wrong_name, &[]).await;
    assert_eq!(get(ss.proxy_addr, "h", "/events").await.status, 502);
}

#[tokio::test]
async fn upstream_h2_over_mutual_tls() {
    let up = Upstream::mutual_h2();
    let mut backend = Backend::start_with(Reply::Sse, up.backend.clone()).await;
    let (ss, _cfg) = up.ssegate(backend.addr, "").await;
    let mut resp = get(ss.proxy_addr, "h", "/events?x=1").await;
    let st = backend.next_stream().await;
    assert_eq!(st.parts.version, Version::HTTP_2);
    assert_eq!(st.parts.uri.path_and_query().unwrap(), "/events?x=1");
    assert_eq!(st.parts.uri.host(), Some("h"));
    st.send("data: h2 mtls\n\n").await;
    assert_eq!(resp.chunk().await.unwrap(), "data: h2 mtls\n\n");
    // Client gone → the upstream stream is closed too.
    drop(resp);
    tokio::time::timeout(PATIENCE, st.closed)
        .await
        .expect("upstream h2 stream not closed after the client left")
        .ok();

    // Without the client certificate the backend refuses the handshake.
    let no_client_cert = format!(
        "        protocol: h2\n{}",
        upstream_tls_yaml("backend.internal")
    );
    let (ss, _cfg) = upstream_setup(&up.ca, backend.addr, &no_client_cert, &[]).await;
    assert_eq!(get(ss.proxy_addr, "h", "/events").await.status, 502);
}

#[tokio::test]
async fn upstream_h2c() {
    let up = Upstream::h2c();
    let mut backend = Backend::start_with(Reply::Sse, up.backend.clone()).await;
    let (ss, _cfg) = up.ssegate(backend.addr, "").await;
    let mut resp = get(ss.proxy_addr, "h", "/events").await;
    let st = backend.next_stream().await;
    assert_eq!(st.parts.version, Version::HTTP_2);
    st.send("data: h2c upstream\n\n").await;
    assert_eq!(resp.chunk().await.unwrap(), "data: h2c upstream\n\n");
}

// ---------------------------------------------------------------- poll routes upstream

/// Rule lines that make the route of [`upstream_setup`] a poll route calling at once.
const POLL: &str = "      mode: Poll\n      poll: {minWait: 0s}\n      keepalive: {interval: 0s}\n";

/// Runs a poll stream through `ss` against `backend`: two calls (the second on the same
/// connection as the first), each answered with one event; checks the calls' HTTP version
/// and the events the client gets.
async fn poll_two_calls(ss: &Running, backend: &mut JsonBackend, version: Version) {
    let addr = ss.proxy_addr;
    let client = tokio::spawn(async move { get(addr, "h", "/events?x=1").await });
    let c1 = backend.next_call().await;
    assert_eq!(c1.parts.version, version);
    assert_eq!(c1.path_and_query(), "/events?x=1");
    if version == Version::HTTP_2 {
        assert_eq!(c1.parts.uri.host(), Some("h"));
    } else {
        assert_eq!(c1.header("host"), Some("h"));
    }
    let peer = c1.peer;
    c1.json(r#"{"list":[{"n":1}],"continue":true,"wait":"0s","next":1}"#);
    let c2 = backend.next_call().await;
    assert_eq!(c2.parts.version, version);
    assert_eq!(c2.query("previous").as_deref(), Some("1"));
    assert_eq!(
        c2.peer, peer,
        "the second call reuses the first call's connection"
    );
    c2.json(r#"{"list":[{"n":2}],"continue":false}"#);
    let resp = client.await.unwrap();
    assert_eq!(resp.status, 200);
    let text = resp.text().await;
    assert_eq!(
        events(&text),
        vec![
            vec!["id: 1".to_string(), "data: {\"n\":1}".to_string()],
            vec!["data: {\"n\":2}".to_string()],
            vec!["event: end".to_string(), "data: {}".to_string()],
        ],
        "{text}"
    );
}

#[tokio::test]
async fn poll_route_over_tls_verified_with_a_private_ca() {
    let up = Upstream::verified();
    let mut backend = JsonBackend::start_with(up.backend.clone()).await;
    let (ss, _cfg) = up.ssegate(backend.addr, POLL).await;
    poll_two_calls(&ss, &mut backend, Version::HTTP_11).await;
}

#[tokio::test]
async fn poll_route_with_the_wrong_ca_is_a_502_upstream_tls() {
    let up = Upstream::wrong_ca();
    let mut backend = JsonBackend::start_with(up.backend.clone()).await;
    let (ss, _cfg) = up.ssegate(backend.addr, POLL).await;
    let resp = get(ss.proxy_addr, "h", "/events").await;
    assert_eq!(resp.status, 502);
    assert!(resp.text().await.contains("upstream_tls"));
    assert!(
        backend
            .call_within(Duration::from_millis(200))
            .await
            .is_none(),
        "no call reaches a backend that failed verification"
    );
    let m = metrics(&ss).await;
    let outcome = r#"ssegate_poll_requests_total{outcome="upstream_tls",route="apps/up"}"#;
    assert_eq!(sample(&m, outcome), Some(1.0), "{m}");
    let reason = r#"ssegate_upstream_errors_total{reason="upstream_tls",route="apps/up"}"#;
    assert_eq!(sample(&m, reason), Some(1.0), "{m}");
}

#[tokio::test]
async fn poll_route_over_h2_with_mutual_tls() {
    let up = Upstream::mutual_h2();
    let mut backend = JsonBackend::start_with(up.backend.clone()).await;
    let (ss, _cfg) = up.ssegate(backend.addr, POLL).await;
    poll_two_calls(&ss, &mut backend, Version::HTTP_2).await;
}

#[tokio::test]
async fn poll_route_over_h2c() {
    let up = Upstream::h2c();
    let mut backend = JsonBackend::start_with(up.backend.clone()).await;
    let (ss, _cfg) = up.ssegate(backend.addr, POLL).await;
    poll_two_calls(&ss, &mut backend, Version::HTTP_2).await;
}

// ---------------------------------------------------------------- real clients

/// Runs curl with `args`; the backend sends one event and ends each stream it gets.
async fn curl(backend: &mut Backend, args: &[&str]) -> (String, String) {
    let child = tokio::process::Command::new("curl")
        .args(["-sS", "-N", "--max-time", "10", "-w", "\n%{http_version}"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("curl is installed");
    let st = backend.next_stream().await;
    st.send("id: 1\ndata: from curl\n\n").await;
    drop(st);
    let out = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, version) = stdout.rsplit_once('\n').unwrap();
    (body.to_string(), version.to_string())
}

#[tokio::test]
async fn curl_http2_over_tls_and_prior_knowledge() {
    let mut s = setup(|_, _, _| {}).await;
    let ca_file = s.cfg.path().join("test-ca.pem");
    std::fs::write(&ca_file, s.ca.pem()).unwrap();
    let port = s.tls_addr().port();
    let resolve = format!("a.example:{port}:127.0.0.1");
    let url = format!("https://a.example:{port}/events");
    let (body, version) = curl(
        &mut s.backend,
        &[
            "--http2",
            "--cacert",
            ca_file.to_str().unwrap(),
            "--resolve",
            &resolve,
            &url,
        ],
    )
    .await;
    assert_eq!(version, "2");
    assert_eq!(body, "id: 1\ndata: from curl\n\n");

    let url = format!("http://{}/events", s.ss.proxy_addr);
    let (body, version) = curl(
        &mut s.backend,
        &["--http2-prior-knowledge", "-H", "Host: a.example", &url],
    )
    .await;
    assert_eq!(version, "2");
    assert_eq!(body, "id: 1\ndata: from curl\n\n");
}
