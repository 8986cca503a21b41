//! The `ssegate` binary: parses flags, sets up logging and runs the server.

use std::io::IsTerminal;

use clap::Parser;
use ssegate::config::{Cli, Command, LogFormat, RunArgs};
use ssegate::routing::CompileOptions;
use ssegate::server::{ServerConfig, start_standalone};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let Some(dir) = args.config else {
        anyhow::bail!(
            "no --config DIR given: this build serves standalone configuration only \
             (watching a Kubernetes API server is not available yet)"
        );
    };
    let cfg = ServerConfig {
        listen: args.listen,
        admin: args.admin,
        compile: CompileOptions { class: args.class },
        ..ServerConfig::default()
    };
    let mut running = start_standalone(dir, cfg).await?;
    tokio::select! {
        _ = running.wait() => anyhow::bail!("a server task stopped unexpectedly"),
        _ = shutdown_signal() => tracing::info!("shutting down"),
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Run(args) => args,
        Command::Crdgen => {
            print!("{}", ssegate::api::crd_yaml());
            return std::process::ExitCode::SUCCESS;
        }
    };
    init_logging(args.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ssegate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
