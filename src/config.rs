//! Command-line interface. Every flag also reads an `SSEGATE_*` environment variable.
//! Parsing is tested with explicit argument lists, never the process environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// ssegate: a Kubernetes-native ingress controller for Server-Sent Events.
#[derive(Debug, Parser)]
#[command(name = "ssegate", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and its configuration source.
    Run(RunArgs),
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
    /// Address of the admin listener (/metrics, /healthz, /readyz).
    #[arg(long, env = "SSEGATE_ADMIN", default_value = "0.0.0.0:10254")]
    pub admin: SocketAddr,
    /// Serve routes whose spec.className is this (routes without a class are always served).
    #[arg(long, env = "SSEGATE_CLASS", default_value = crate::routing::DEFAULT_CLASS)]
    pub class: String,
    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "SSEGATE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("ssegate").chain(args.iter().copied()))?;
        match cli.command {
            Command::Run(run) => Ok(run),
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
        assert_eq!(a.admin.port(), 2);
        assert_eq!(a.log_format, LogFormat::Json);
        assert_eq!(a.class, "c");
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let e = parse(&["run", "--listen", "nope"]).unwrap_err().to_string();
        assert!(e.contains("--listen"), "{e}");
        assert!(parse(&["run", "--log-format", "xml"]).is_err());
    }
}
