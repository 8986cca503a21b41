//! The systems under test: ssegate (standalone mode, generated config dir), the direct
//! upstream (the ceiling), and nginx, haproxy and caddy when installed, each configured for
//! SSE: no response buffering, every chunk flushed at once, long timeouts, no access log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// One system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// ssegate, the system under test.
    Ssegate,
    /// No proxy at all: the client talks to the upstream (the ceiling).
    Direct,
    /// nginx (apt).
    Nginx,
    /// haproxy (apt).
    Haproxy,
    /// caddy (apt).
    Caddy,
}

impl Kind {
    /// Every kind, in table order.
    pub const ALL: [Kind; 5] = [
        Kind::Ssegate,
        Kind::Direct,
        Kind::Nginx,
        Kind::Haproxy,
        Kind::Caddy,
    ];

    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ssegate => "ssegate",
            Kind::Direct => "direct",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::Caddy => "caddy",
        }
    }

    /// Parses a display name.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Version string, when this kind can run here.
    pub fn version(self, ssegate_bin: &Path) -> Option<String> {
        let (bin, arg): (&Path, &str) = match self {
            Kind::Direct => return Some("-".into()),
            Kind::Ssegate => (ssegate_bin, "--version"),
            Kind::Nginx => (Path::new("nginx"), "-v"),
            Kind::Haproxy => (Path::new("haproxy"), "-v"),
            Kind::Caddy => (Path::new("caddy"), "version"),
        };
        let out = Command::new(bin).arg(arg).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(text.lines().next().unwrap_or("").trim().to_string())
    }
}

/// What every target needs to know.
#[derive(Clone, Debug)]
pub struct Env {
    /// Scratch directory for configs and logs.
    pub work: PathBuf,
    /// Upstream listeners (same port, different loopback addresses).
    pub upstreams: Vec<SocketAddr>,
    /// The ssegate binary.
    pub ssegate_bin: PathBuf,
    /// Most client connections any scenario opens (sizes connection limits).
    pub max_streams: usize,
    /// The open-files limit every process here runs under (`ulimit -Hn`).
    pub fd_limit: u64,
}

/// A started target.
pub struct Running {
    /// Which system.
    pub kind: Kind,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// ssegate's admin listener.
    pub admin: Option<SocketAddr>,
    /// ssegate's config directory.
    pub config_dir: Option<PathBuf>,
    child: Option<Child>,
}

impl Running {
    /// The process to measure; None for the direct upstream.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops the process (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
    }
}

fn stop_child(child: &mut Child) {
    // SAFETY: kill only sends a signal to the child we started.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The ssegate manifests: a selector-less Service and EndpointSlice for the upstreams and
/// one SseRoute sending everything there. `generation` adds a second rule whose path
/// changes with it (the reload scenario's configuration change).
pub fn ssegate_manifests(
    upstreams: &[SocketAddr],
    generation: Option<u32>,
) -> [(String, String); 2] {
    let port = upstreams.first().map_or(80, |a| a.port());
    let mut eps = String::new();
    for a in upstreams {
        eps.push_str(&format!(
            "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n",
            a.ip()
        ));
    }
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: upstream, namespace: bench}}\nspec:\n  ports: [{{port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: upstream-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: upstream}}\naddressType: IPv4\nports: [{{port: {port}}}]\nendpoints:\n{eps}"
    );
    let mut route = "apiVersion: ssegate.io/v1alpha1\nkind: SseRoute\nmetadata: {name: bench, namespace: bench}\nspec:\n  rules:\n    - match: {path: /, pathType: Prefix}\n      backend: {service: upstream, port: 80}\n".to_string();
    if let Some(g) = generation {
        route.push_str(&format!(
            "    - match: {{path: /generation-{g}, pathType: Prefix}}\n      backend: {{service: upstream, port: 80}}\n"
        ));
    }
    [
        ("upstream.yaml".to_string(), service),
        ("route.yaml".to_string(), route),
    ]
}

/// Writes the ssegate manifests into `dir` atomically (write + rename), as a ConfigMap
/// update or an editor would.
pub fn write_ssegate_config(
    dir: &Path,
    upstreams: &[SocketAddr],
    generation: Option<u32>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, text) in ssegate_manifests(upstreams, generation) {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, dir.join(&name))?;
    }
    Ok(())
}

/// nginx for SSE: `proxy_buffering off` (each upstream read is written to the client at
/// once), HTTP/1.1 upstream, day-long read/send timeouts, no access log. Its fd and
/// connection limits fit `max_conns` streams and never exceed `fd_limit` (an unprivileged
/// container cannot raise the hard limit).
pub fn nginx_conf(
    work: &Path,
    listen: SocketAddr,
    upstreams: &[SocketAddr],
    max_conns: usize,
    fd_limit: u64,
) -> String {
    let w = work.display();
    let servers: String = upstreams
        .iter()
        .map(|a| format!("    server {a};\n"))
        .collect();
    format!(
        "worker_processes auto;\nworker_rlimit_nofile {nofile};\nuser root;\ndaemon off;\npid {w}/nginx.pid;\nerror_log {w}/nginx-error.log warn;\n\
events {{\n  worker_connections {nofile};\n  multi_accept on;\n}}\n\
http {{\n  access_log off;\n  client_body_temp_path {w}/client_body;\n  proxy_temp_path {w}/proxy;\n  fastcgi_temp_path {w}/fastcgi;\n  uwsgi_temp_path {w}/uwsgi;\n  scgi_temp_path {w}/scgi;\n\
  upstream sse {{\n{servers}  }}\n\
  server {{\n    listen {listen};\n    location / {{\n      proxy_pass http://sse;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n      proxy_cache off;\n      proxy_read_timeout 24h;\n      proxy_send_timeout 24h;\n    }}\n  }}\n}}\n",
        nofile = (2 * max_conns as u64 + 1024).min(fd_limit),
    )
}

/// haproxy for SSE: HTTP mode (it streams responses as they come), `http-no-delay` so each
/// chunk is sent at once, day-long client/server/tunnel timeouts, no log. `maxconn` fits
/// `max_conns` streams within `fd_limit` (haproxy refuses to start when it cannot get
/// two fds per connection).
pub fn haproxy_cfg(
    listen: SocketAddr,
    upstreams: &[SocketAddr],
    max_conns: usize,
    fd_limit: u64,
) -> String {
    let servers: String = upstreams
        .iter()
        .enumerate()
        .map(|(i, a)| format!("  server s{i} {a}\n"))
        .collect();
    format!(
        "global\n  maxconn {mc}\n\
defaults\n  mode http\n  timeout connect 5s\n  timeout http-request 30s\n  timeout client 24h\n  timeout server 24h\n  timeout tunnel 24h\n  option http-no-delay\n\
frontend fe\n  bind {listen}\n  maxconn {mc}\n  default_backend be\n\
backend be\n  balance roundrobin\n{servers}",
        mc = (max_conns as u64 + 1024).min(fd_limit.saturating_sub(100) / 2),
    )
}

/// caddy for SSE: `flush_interval -1` (flush after every write; caddy also does this by
/// itself for `text/event-stream`), any Host, no admin endpoint, no automatic HTTPS.
pub fn caddyfile(listen: SocketAddr, upstreams: &[SocketAddr]) -> String {
    let ups: Vec<String> = upstreams.iter().map(|a| a.to_string()).collect();
    format!(
        "{{\n  admin off\n  auto_https off\n}}\n\
http://:{port} {{\n  bind {ip}\n  reverse_proxy {} {{\n    lb_policy round_robin\n    flush_interval -1\n  }}\n}}\n",
        ups.join(" "),
        port = listen.port(),
        ip = listen.ip()
    )
}

/// Starts `kind` and waits until it serves.
pub async fn start(kind: Kind, env: &Env) -> anyhow::Result<Running> {
    if kind == Kind::Direct {
        return Ok(Running {
            kind,
            addr: env.upstreams[0],
            admin: None,
            config_dir: None,
            child: None,
        });
    }
    let port = free_port()?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let dir = env.work.join(kind.name());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = std::fs::File::create(dir.join("output.log"))?;
    let mut admin = None;
    let mut config_dir = None;
    let mut cmd = match kind {
        Kind::Ssegate => {
            let cfg = dir.join("config");
            write_ssegate_config(&cfg, &env.upstreams, None)?;
            let admin_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
            let mut c = Command::new(&env.ssegate_bin);
            c.args(["run", "--config"])
                .arg(&cfg)
                .args([
                    "--listen",
                    &addr.to_string(),
                    "--admin",
                    &admin_addr.to_string(),
                    // Plain HTTP only: the default TLS listener (0.0.0.0:8443) would make a
                    // run fail whenever anything else on the machine holds that port.
                    "--listen-tls",
                    "off",
                ])
                .env("RUST_LOG", "warn");
            admin = Some(admin_addr);
            config_dir = Some(cfg);
            c
        }
        Kind::Nginx => {
            let conf = dir.join("nginx.conf");
            std::fs::write(
                &conf,
                nginx_conf(&dir, addr, &env.upstreams, env.max_streams, env.fd_limit),
            )?;
            let mut c = Command::new("nginx");
            c.arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(dir.join("nginx-error.log"));
            c
        }
        Kind::Haproxy => {
            let conf = dir.join("haproxy.cfg");
            std::fs::write(
                &conf,
                haproxy_cfg(addr, &env.upstreams, env.max_streams, env.fd_limit),
            )?;
            let mut c = Command::new("haproxy");
            c.arg("-db").arg("-f").arg(&conf);
            c
        }
        Kind::Caddy => {
            let conf = dir.join("Caddyfile");
            std::fs::write(&conf, caddyfile(addr, &env.upstreams))?;
            let mut c = Command::new("caddy");
            c.args(["run", "--adapter", "caddyfile", "--config"])
                .arg(&conf)
                .env("XDG_DATA_HOME", &dir)
                .env("XDG_CONFIG_HOME", &dir)
                .env("HOME", &dir);
            c
        }
        Kind::Direct => unreachable!(),
    };
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", kind.name()))?;
    let mut running = Running {
        kind,
        addr,
        admin,
        config_dir,
        child: Some(child),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(Ok(Some(st))) = running.child.as_mut().map(|c| c.try_wait()) {
            let out = std::fs::read_to_string(dir.join("output.log")).unwrap_or_default();
            running.child = None;
            bail!("{} exited at start ({st}): {out}", kind.name());
        }
        if crate::client::probe(addr, "/sse?count=1", Duration::from_secs(2))
            .await
            .is_ok()
        {
            return Ok(running);
        }
        if Instant::now() > deadline {
            let out = std::fs::read_to_string(dir.join("output.log")).unwrap_or_default();
            bail!("{} did not serve within 15 s: {out}", kind.name());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ups() -> Vec<SocketAddr> {
        vec![
            "127.0.0.1:9000".parse().unwrap(),
            "127.0.1.2:9000".parse().unwrap(),
        ]
    }

    #[test]
    fn proxies_are_configured_for_sse() {
        let listen = "127.0.0.1:8000".parse().unwrap();
        let n = nginx_conf(Path::new("/w"), listen, &ups(), 10_000, 1 << 20);
        for needle in [
            "proxy_buffering off;",
            "proxy_read_timeout 24h;",
            "proxy_http_version 1.1;",
            "worker_connections 21024;",
            "server 127.0.1.2:9000;",
            "access_log off;",
        ] {
            assert!(n.contains(needle), "nginx lacks {needle}:\n{n}");
        }
        let h = haproxy_cfg(listen, &ups(), 10_000, 1 << 20);
        for needle in [
            "option http-no-delay",
            "timeout server 24h",
            "maxconn 11024",
            "server s1 127.0.1.2:9000",
        ] {
            assert!(h.contains(needle), "haproxy lacks {needle}:\n{h}");
        }
        // Under a low fd limit the limits shrink to fit it.
        assert!(
            nginx_conf(Path::new("/w"), listen, &ups(), 9_900, 20_000)
                .contains("worker_connections 20000;")
        );
        assert!(haproxy_cfg(listen, &ups(), 9_900, 20_000).contains("maxconn 9950\n"));
        let c = caddyfile(listen, &ups());
        assert!(c.contains("flush_interval -1"), "{c}");
        assert!(
            c.contains("reverse_proxy 127.0.0.1:9000 127.0.1.2:9000"),
            "{c}"
        );
    }

    #[test]
    fn ssegate_manifests_list_every_upstream_and_change_per_generation() {
        let [(_, svc), (_, route)] = ssegate_manifests(&ups(), None);
        assert!(
            svc.contains("addresses: [\"127.0.1.2\"]") && svc.contains("port: 9000"),
            "{svc}"
        );
        assert!(!route.contains("generation-"));
        let [_, (_, r1)] = ssegate_manifests(&ups(), Some(1));
        let [_, (_, r2)] = ssegate_manifests(&ups(), Some(2));
        assert!(r1.contains("/generation-1") && r1 != r2);
    }
}
