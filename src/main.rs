//! The `ssegate` binary: parses flags, sets up logging and runs the server.

use std::io::IsTerminal;

use anyhow::Context;
use clap::Parser;
use ssegate::config::{Cli, Command, LogFormat, RunArgs};
use ssegate::leader::LeaseConfig;
use ssegate::routing::CompileOptions;
use ssegate::server::{ClusterConfig, ServerConfig, start_cluster, start_standalone};
use tracing_subscriber::EnvFilter;

/// mimalloc: RSS stays flat under connection churn where glibc's per-thread arenas fragment
/// (benches/SOAK.md). Only this binary uses it; the library and its tests keep the system
/// allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc 2.x's `mi_option_t` (include/mimalloc.h; the
/// sys crate names only some options).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Makes mimalloc reserve its arenas uncommitted by default; `MIMALLOC_ARENA_EAGER_COMMIT`
/// (or its legacy name) still wins when set.
///
/// mimalloc's own default (2: eager where the OS overcommits, i.e. on Linux) commits each
/// 1 GiB arena as it is reserved; with it, RSS still crept up in the 5,000-stream soak, and
/// with arenas committed on demand it stayed flat (benches/SOAK.md).
///
/// `mi_option_set_default` changes an option's default unless it was already set (from the
/// environment or by `mi_option_set`), so the environment keeps priority whether mimalloc's
/// own constructor has read it yet or not. The setting must be in place before the first
/// arena is reserved, at the first allocation, and Rust's runtime allocates before `main` (the
/// main thread's name): hence an ELF constructor, at the priority std uses for its own
/// argument capture, which runs before every default-priority constructor and before the Rust
/// runtime starts. `tests/allocator.rs` checks the running binary's arena mapping.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array.00099")]
static ALLOCATOR_DEFAULTS: extern "C" fn() = {
    extern "C" fn allocator_defaults() {
        // SAFETY: a valid option id; options are plain globals and no other thread exists.
        unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    }
    allocator_defaults
};

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
    let drain = args.drain();
    let cfg = ServerConfig {
        listen: args.listen,
        listen_tls: args.listen_tls.0,
        admin: args.admin,
        proxy: args.proxy(),
        default_cert: args.default_cert.clone().zip(args.default_key.clone()),
        compile: CompileOptions {
            class: args.class.clone(),
            default_cert_secret: args.default_cert_secret.clone(),
        },
        workers: args.workers(),
        ..ServerConfig::default()
    };
    let mut running = match args.config.clone() {
        Some(dir) => start_standalone(dir, cfg).await?,
        None => {
            args.validate().map_err(anyhow::Error::msg)?;
            let client = kube::Client::try_default().await.context(
                "no --config DIR given, and no Kubernetes API server configuration found \
                 (in-cluster service account or KUBECONFIG)",
            )?;
            let lease_namespace = args
                .lease_namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string());
            let cluster = ClusterConfig {
                namespace: args.namespace.clone(),
                lease: LeaseConfig {
                    name: args
                        .lease_name
                        .clone()
                        .unwrap_or_else(|| format!("{}-leader", args.class)),
                    namespace: lease_namespace,
                    identity: args.identity.clone().unwrap_or_else(default_identity),
                    duration: args.lease_duration.get(),
                    renew_deadline: args.lease_renew_deadline.get(),
                    retry_period: args.lease_retry_period.get(),
                },
            };
            start_cluster(client, cluster, cfg).await?
        }
    };
    tokio::select! {
        _ = running.wait() => anyhow::bail!("a server task stopped unexpectedly"),
        _ = shutdown_signal() => tracing::info!("shutdown signal: draining"),
    }
    // A second signal skips the rest of the drain.
    tokio::select! {
        _ = running.drain(drain) => {}
        _ = shutdown_signal() => tracing::warn!("second shutdown signal: exiting now"),
    }
    running.shutdown().await;
    Ok(())
}

/// `<hostname>-<pid>`: unique per process on a machine, stable for its lifetime.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "ssegate".into());
    format!("{host}-{}", std::process::id())
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
        Command::Run(args) => *args,
        Command::Crdgen => {
            print!("{}", ssegate::api::crd_yaml());
            return std::process::ExitCode::SUCCESS;
        }
    };
    init_logging(args.log_format);
    match ssegate::workers::raise_nofile_limit() {
        Ok((soft, hard)) => tracing::info!(soft, hard, "open-files limit (RLIMIT_NOFILE)"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
    // The proxy runs on its own worker threads (`--workers`); this runtime only carries the
    // control plane: configuration source, admin listener, status writer, leader election.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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
