//! Command-line interface. Every flag also reads an `SSEGATE_*` environment variable.
//! Parsing is tested with explicit argument lists, never the process environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::api::Duration;

/// ssegate: a Kubernetes-native ingress controller for Server-Sent Events.
#[derive(Debug, Parser)]
#[command(name = "ssegate", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
// Parsed once per process: the size of the value does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and its configuration source.
    Run(Box<RunArgs>),
    /// Print the SseRoute CustomResourceDefinition (crds/sseroutes.ssegate.io.yaml) to stdout.
    Crdgen,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `ssegate run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Standalone mode: read SseRoute, Service, EndpointSlice and Secret manifests from this
    /// directory and re-read it when files change.
    #[arg(long, env = "SSEGATE_CONFIG", value_name = "DIR")]
    pub config: Option<PathBuf>,
    /// Address of the proxy listener (HTTP/1.1 and h2c).
    #[arg(long, env = "SSEGATE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Address of the TLS listener (HTTP/2 and HTTP/1.1 by ALPN; certificates from the
    /// Secrets routes name in spec.tls), or `off`.
    #[arg(long, env = "SSEGATE_LISTEN_TLS", default_value = "0.0.0.0:8443", value_parser = parse_optional_addr)]
    pub listen_tls: OptionalAddr,
    /// Port written into the `https://` Location of `tls.redirect` answers (omitted when 443):
    /// the port clients reach the TLS listener on from outside.
    #[arg(long, env = "SSEGATE_HTTPS_PORT", default_value_t = 443)]
    pub https_port: u16,
    /// A kubernetes.io/tls Secret `namespace/name` served to TLS clients whose SNI name no
    /// route covers (and to clients sending no SNI).
    #[arg(long, env = "SSEGATE_DEFAULT_CERT_SECRET", value_name = "NS/NAME", value_parser = parse_secret_ref, conflicts_with = "default_cert")]
    pub default_cert_secret: Option<String>,
    /// PEM certificate chain file served when no Secret covers a name (with --default-key);
    /// read at start-up and again whenever it or the key file changes.
    #[arg(
        long,
        env = "SSEGATE_DEFAULT_CERT",
        value_name = "FILE",
        requires = "default_key"
    )]
    pub default_cert: Option<PathBuf>,
    /// PEM private key file of --default-cert.
    #[arg(
        long,
        env = "SSEGATE_DEFAULT_KEY",
        value_name = "FILE",
        requires = "default_cert"
    )]
    pub default_key: Option<PathBuf>,
    /// Streams a client may open at once on one HTTP/2 connection (default: Go's net/http2
    /// value; each SSE stream also holds one upstream connection).
    #[arg(long, env = "SSEGATE_H2_MAX_CONCURRENT_STREAMS", default_value_t = crate::proxy::DEFAULT_H2_MAX_CONCURRENT_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    pub h2_max_concurrent_streams: u32,
    /// Ping HTTP/2 clients after this much connection silence and drop those that do not
    /// answer within the same time; `0s` disables.
    #[arg(long, env = "SSEGATE_H2_KEEPALIVE_INTERVAL", default_value = "20s")]
    pub h2_keepalive_interval: crate::api::Duration,
    /// Proxy worker threads, like nginx's worker_processes: each runs its own event loop with
    /// its own SO_REUSEPORT sockets on --listen and --listen-tls, and a stream stays on the
    /// worker that accepted it [default: the number of CPUs available to the process].
    #[arg(long, env = "SSEGATE_WORKERS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: Option<u32>,
    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(long, env = "SSEGATE_ADMIN", default_value = "0.0.0.0:10254")]
    pub admin: SocketAddr,
    /// Serve routes whose spec.className is this (routes without a class are always served).
    #[arg(long, env = "SSEGATE_CLASS", default_value = crate::routing::DEFAULT_CLASS)]
    pub class: String,
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "SSEGATE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Cluster mode: watch only this namespace (default: all namespaces).
    #[arg(long, env = "SSEGATE_NAMESPACE", value_name = "NS")]
    pub namespace: Option<String>,
    /// Cluster mode: name of the leader-election Lease [default: <class>-leader].
    #[arg(long, env = "SSEGATE_LEASE_NAME", value_name = "NAME")]
    pub lease_name: Option<String>,
    /// Cluster mode: namespace of the Lease [default: the namespace of the pod, or of the
    /// kubeconfig context].
    #[arg(long, env = "SSEGATE_LEASE_NAMESPACE", value_name = "NS")]
    pub lease_namespace: Option<String>,
    /// Cluster mode: a leader that stops renewing is replaced after this long.
    #[arg(long, env = "SSEGATE_LEASE_DURATION", default_value = "15s")]
    pub lease_duration: Duration,
    /// Cluster mode: a leader that cannot renew for this long stops writing statuses
    /// (less than --lease-duration).
    #[arg(long, env = "SSEGATE_LEASE_RENEW_DEADLINE", default_value = "10s")]
    pub lease_renew_deadline: Duration,
    /// Cluster mode: how often the Lease is renewed or checked (less than --lease-renew-deadline).
    #[arg(long, env = "SSEGATE_LEASE_RETRY_PERIOD", default_value = "2s")]
    pub lease_retry_period: Duration,
    /// Cluster mode: this replica's identity in the Lease, unique per replica
    /// [default: <hostname>-<pid>].
    #[arg(long, env = "SSEGATE_IDENTITY", value_name = "ID")]
    pub identity: Option<String>,

    /// Drain: after SIGTERM, how long new streams are still accepted (while endpoint removal
    /// propagates) before streams start closing. /readyz fails at once.
    #[arg(long, env = "SSEGATE_DRAIN_DELAY", default_value = "5s")]
    pub drain_delay: Duration,
    /// Drain: open streams are closed spread evenly (with jitter) over this window, each
    /// after a `retry:` hint.
    #[arg(long, env = "SSEGATE_DRAIN_WINDOW", default_value = "30s")]
    pub drain_window: Duration,
    /// Drain: exit at the latest this long after SIGTERM. Keep the pod's
    /// terminationGracePeriodSeconds a few seconds above it.
    #[arg(long, env = "SSEGATE_GRACE_PERIOD", default_value = "45s")]
    pub grace_period: Duration,

    /// Client connections open at once; more are answered 503 with Retry-After (0 = no limit).
    #[arg(long, env = "SSEGATE_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,
    /// Concurrent streams per client IP (IPv6: per /64); more are answered 429 with
    /// Retry-After (0 = no limit).
    #[arg(long, env = "SSEGATE_MAX_STREAMS_PER_CLIENT", default_value_t = 0)]
    pub max_streams_per_client: u32,
    /// New connections per second per client IP (token bucket; 0 = no limit); over it a
    /// connection is answered 429 with Retry-After.
    #[arg(long, env = "SSEGATE_CLIENT_CONNECT_RATE", default_value_t = 0.0)]
    pub client_connect_rate: f64,
    /// Connections a client IP may open in a burst before --client-connect-rate applies.
    #[arg(long, env = "SSEGATE_CLIENT_CONNECT_BURST", default_value_t = 20)]
    pub client_connect_burst: u32,
    /// Client IPs whose limit state is kept at most (bounded memory).
    #[arg(long, env = "SSEGATE_MAX_TRACKED_CLIENTS", default_value_t = 65_536)]
    pub max_tracked_clients: usize,
    /// End a client connection that accepts no data for this long (slow or stalled
    /// reader); 0s = never. A rule's `timeouts.clientWriteTimeout` overrides it.
    #[arg(long, env = "SSEGATE_CLIENT_WRITE_TIMEOUT", default_value = "60s")]
    pub client_write_timeout: Duration,
    /// How long a client may take to send its request headers (HTTP/1.1; 0s = no limit).
    #[arg(long, env = "SSEGATE_HEADER_READ_TIMEOUT", default_value = "10s")]
    pub header_read_timeout: Duration,
    /// Largest request head in bytes (request line and headers; at least 8192); larger is
    /// answered 431.
    #[arg(long, env = "SSEGATE_MAX_HEADER_BYTES", default_value_t = 32 * 1024,
          value_parser = clap::value_parser!(u32).range(8192..))]
    pub max_header_bytes: u32,
    /// Most request headers (HTTP/1.1); more is answered 431.
    #[arg(long, env = "SSEGATE_MAX_HEADERS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_headers: u32,
}

impl RunArgs {
    /// Checks the flags that depend on each other.
    pub fn validate(&self) -> Result<(), String> {
        let (d, r, p) = (
            self.lease_duration.get(),
            self.lease_renew_deadline.get(),
            self.lease_retry_period.get(),
        );
        if p.is_zero() || !(p < r && r < d) {
            return Err(format!(
                "need 0 < --lease-retry-period ({}) < --lease-renew-deadline ({}) < --lease-duration ({})",
                self.lease_retry_period, self.lease_renew_deadline, self.lease_duration
            ));
        }
        if d.as_secs() < 1 {
            return Err("--lease-duration must be at least 1s (Leases count whole seconds)".into());
        }
        Ok(())
    }

    /// `--workers`, or one per available CPU.
    pub fn workers(&self) -> usize {
        self.workers
            .map_or_else(crate::workers::default_workers, |n| n as usize)
    }

    /// The drain settings.
    pub fn drain(&self) -> crate::server::DrainConfig {
        crate::server::DrainConfig {
            delay: self.drain_delay.get(),
            window: self.drain_window.get(),
            grace_period: self.grace_period.get(),
        }
    }

    /// The proxy settings these flags give.
    pub fn proxy(&self) -> crate::proxy::ProxyConfig {
        crate::proxy::ProxyConfig {
            header_read_timeout: self.header_read_timeout.get(),
            max_header_bytes: self.max_header_bytes as usize,
            max_headers: self.max_headers as usize,
            max_connections: self.max_connections,
            client_write_timeout: self.client_write_timeout.non_zero(),
            client_limits: crate::proxy::limits::ClientLimits {
                max_streams: self.max_streams_per_client,
                connect_rate: self.client_connect_rate.max(0.0),
                connect_burst: self.client_connect_burst,
                max_clients: self.max_tracked_clients,
            },
            https_port: self.https_port,
            h2_max_concurrent_streams: self.h2_max_concurrent_streams,
            h2_keepalive_interval: self.h2_keepalive_interval.non_zero(),
            ..crate::proxy::ProxyConfig::default()
        }
    }
}

/// A listener address, or none (`off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

fn parse_optional_addr(s: &str) -> Result<OptionalAddr, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(OptionalAddr(None));
    }
    s.parse()
        .map(|a| OptionalAddr(Some(a)))
        .map_err(|e| format!("{e} (expected HOST:PORT or off)"))
}

fn parse_secret_ref(s: &str) -> Result<String, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(s.to_string())
        }
        _ => Err("expected NAMESPACE/NAME".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("ssegate").chain(args.iter().copied()))?;
        match cli.command {
            Command::Run(run) => Ok(*run),
            Command::Crdgen => panic!("not a run command"),
        }
    }

    #[test]
    fn defaults() {
        let a = parse(&["run", "--config", "dir"]).unwrap();
        assert_eq!(a.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(a.admin.to_string(), "0.0.0.0:10254");
        assert_eq!(a.class, "ssegate");
        assert_eq!(a.log_format, LogFormat::Text);
        assert_eq!(a.config.unwrap(), PathBuf::from("dir"));
        assert_eq!(a.listen_tls.0.unwrap().to_string(), "0.0.0.0:8443");
        assert_eq!(a.https_port, 443);
        assert_eq!(a.h2_max_concurrent_streams, 250);
        assert_eq!(a.h2_keepalive_interval, crate::api::Duration::from_secs(20));
        assert!(a.default_cert_secret.is_none() && a.default_cert.is_none());
        let d = super::RunArgs::drain(&parse(&["run"]).unwrap());
        assert_eq!(d, crate::server::DrainConfig::default());
        let p = parse(&["run"]).unwrap().proxy();
        let want = crate::proxy::ProxyConfig::default();
        assert_eq!(p.header_read_timeout, want.header_read_timeout);
        assert_eq!(p.max_header_bytes, want.max_header_bytes);
        assert_eq!(p.max_headers, want.max_headers);
        assert_eq!(p.client_write_timeout, want.client_write_timeout);
        assert_eq!(p.max_connections, 0);
        assert_eq!(p.client_limits.max_streams, 0);
        assert_eq!(p.client_limits.connect_rate, 0.0);
    }

    #[test]
    fn reliability_flags() {
        let a = parse(&[
            "run",
            "--drain-delay",
            "1s",
            "--drain-window",
            "2m",
            "--grace-period",
            "150s",
            "--max-connections",
            "1000",
            "--max-streams-per-client",
            "8",
            "--client-connect-rate",
            "2.5",
            "--client-connect-burst",
            "5",
            "--client-write-timeout",
            "0s",
            "--header-read-timeout",
            "3s",
            "--max-header-bytes",
            "16384",
            "--max-headers",
            "50",
        ])
        .unwrap();
        let d = a.drain();
        assert_eq!(d.delay, std::time::Duration::from_secs(1));
        assert_eq!(d.window, std::time::Duration::from_secs(120));
        assert_eq!(d.grace_period, std::time::Duration::from_secs(150));
        let p = a.proxy();
        assert_eq!(p.max_connections, 1000);
        assert_eq!(p.client_limits.max_streams, 8);
        assert_eq!(p.client_limits.connect_rate, 2.5);
        assert_eq!(p.client_limits.connect_burst, 5);
        assert_eq!(p.client_write_timeout, None);
        assert_eq!(p.header_read_timeout, std::time::Duration::from_secs(3));
        assert_eq!(p.max_header_bytes, 16384);
        assert_eq!(p.max_headers, 50);
        assert!(parse(&["run", "--max-header-bytes", "100"]).is_err());
        assert!(parse(&["run", "--drain-window", "soon"]).is_err());
    }

    #[test]
    fn tls_flags() {
        let a = parse(&[
            "run",
            "--listen-tls",
            "off",
            "--https-port",
            "8443",
            "--default-cert-secret",
            "infra/wildcard",
            "--h2-max-concurrent-streams",
            "100",
            "--h2-keepalive-interval",
            "0s",
        ])
        .unwrap();
        assert_eq!(a.listen_tls, OptionalAddr(None));
        assert_eq!(a.https_port, 8443);
        assert_eq!(a.default_cert_secret.as_deref(), Some("infra/wildcard"));
        assert_eq!(a.h2_max_concurrent_streams, 100);
        assert!(a.h2_keepalive_interval.non_zero().is_none());
        let p = a.proxy();
        assert_eq!(
            (
                p.https_port,
                p.h2_max_concurrent_streams,
                p.h2_keepalive_interval
            ),
            (8443, 100, None)
        );
        let a = parse(&["run", "--default-cert", "c.pem", "--default-key", "k.pem"]).unwrap();
        assert_eq!(a.default_key.unwrap(), PathBuf::from("k.pem"));
        for bad in [
            &["run", "--default-cert", "c.pem"][..],
            &["run", "--default-cert-secret", "noslash"],
            &[
                "run",
                "--default-cert-secret",
                "a/b",
                "--default-cert",
                "c",
                "--default-key",
                "k",
            ],
            &["run", "--h2-max-concurrent-streams", "0"],
            &["run", "--listen-tls", "nope"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags() {
        let a = parse(&[
            "run",
            "--config",
            "d",
            "--listen",
            "127.0.0.1:1",
            "--admin",
            "127.0.0.1:2",
            "--log-format",
            "json",
            "--class",
            "c",
        ])
        .unwrap();
        assert_eq!(a.listen.port(), 1);
        assert_eq!(a.workers(), crate::workers::default_workers());
        assert_eq!(parse(&["run", "--workers", "3"]).unwrap().workers(), 3);
        assert!(parse(&["run", "--workers", "0"]).is_err());
        assert_eq!(a.admin.port(), 2);
        assert_eq!(a.log_format, LogFormat::Json);
        assert_eq!(a.class, "c");
    }

    #[test]
    fn cluster_flags() {
        let a = parse(&["run"]).unwrap();
        assert_eq!(a.config, None);
        assert_eq!(a.namespace, None);
        assert_eq!(a.lease_duration, Duration::from_secs(15));
        assert_eq!(a.lease_renew_deadline, Duration::from_secs(10));
        assert_eq!(a.lease_retry_period, Duration::from_secs(2));
        assert!(a.validate().is_ok());
        let a = parse(&[
            "run",
            "--namespace",
            "apps",
            "--lease-name",
            "l",
            "--lease-namespace",
            "sys",
            "--lease-duration",
            "3s",
            "--lease-renew-deadline",
            "2s",
            "--lease-retry-period",
            "500ms",
            "--identity",
            "pod-1",
        ])
        .unwrap();
        assert_eq!(a.namespace.as_deref(), Some("apps"));
        assert_eq!(a.lease_name.as_deref(), Some("l"));
        assert_eq!(a.lease_namespace.as_deref(), Some("sys"));
        assert_eq!(a.lease_retry_period, Duration::from_millis(500));
        assert_eq!(a.identity.as_deref(), Some("pod-1"));
        assert!(a.validate().is_ok());
        let e = parse(&["run", "--lease-duration", "5s"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            e.contains("--lease-renew-deadline (10s) < --lease-duration (5s)"),
            "{e}"
        );
        assert!(parse(&["run", "--lease-duration", "5"]).is_err());
    }

    /// The install manifest (the chart rendered by scripts/chart.py) runs real flags and sets
    /// real environment variables.
    #[test]
    fn install_deployment_uses_real_flags() {
        use clap::CommandFactory;
        let deploy: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../manifests/install/deployment.yaml")).unwrap();
        let container = &deploy["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = container["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let run = parse(&args).unwrap();
        assert!(
            run.config.is_none(),
            "the Deployment must run in cluster mode"
        );
        assert!(run.validate().is_ok());
        assert_eq!(run.listen.port(), 8080);
        assert_eq!(run.admin.port(), 10254);
        let cli = Cli::command();
        let known: Vec<String> = cli
            .find_subcommand("run")
            .unwrap()
            .get_arguments()
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        let envs = container["env"].as_sequence().unwrap();
        assert!(!envs.is_empty());
        for e in envs {
            let name = e["name"].as_str().unwrap();
            assert!(
                name == "RUST_LOG" || known.iter().any(|k| k == name),
                "{name} is neither RUST_LOG nor a flag's variable"
            );
        }
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let e = parse(&["run", "--listen", "nope"]).unwrap_err().to_string();
        assert!(e.contains("--listen"), "{e}");
        assert!(parse(&["run", "--log-format", "xml"]).is_err());
    }
}
