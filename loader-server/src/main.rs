//! `loader-server`: parses flags, sets up logging, opens datasets, binds, and runs the library's
//! [`loader_server::run`] until SIGTERM or Ctrl-C, then drains.

use std::{io::IsTerminal, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use loader_server::Config;

/// jemalloc returns freed batch and chunk buffers to the OS, where glibc's malloc keeps large
/// freed blocks in per-thread arenas: with multi-MiB batches that held the loader's anonymous
/// memory hundreds of MiB above its configured bounds.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOADER_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(conveyor_proto::LogWriter::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = Config::parse();
    // Named threads, so `top -H` and `perf report --sort comm` tell the loader's workers apart
    // from a trainer's on the same host.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("loader").build();
    match runtime.context("cannot start the async runtime").and_then(|runtime| runtime.block_on(run(config))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("loader-server: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let listen_unix = config.listen_unix.as_deref().map(socket_path);
    let metrics_listen = config.metrics_listen;
    let state = loader_server::open(config)?;
    let metrics = match metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
            tracing::info!(local = %listener.local_addr()?, "metrics at /metrics");
            Some(listener)
        }
        None => None,
    };
    let grpc =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen} (--listen)"))?;
    let local = grpc.local_addr()?;
    let unix = listen_unix.as_deref().map(bind_unix).transpose()?;
    tracing::info!(%local, "listening");
    // Machine-readable lines for scripts and tests that start the loader on port 0; both sockets
    // accept connections once the first is printed.
    println!("listening on {local}");
    if let Some(path) = &listen_unix {
        tracing::info!(path = %path.display(), shm_bytes = state.config().shm_bytes, "listening on a Unix socket");
        println!("listening on unix:{}", path.display());
    }
    // SIGTERM or Ctrl-C drains the loader.
    loader_server::run(loader_server::Listeners { grpc, unix, metrics }, state, shutdown_signal()).await?;
    if let Some(path) = &listen_unix {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("loader stopped");
    Ok(())
}

/// The socket `--listen-unix` names: the path itself, or for a directory (a volume that several
/// replicas share) `loader-HOSTNAME.sock` inside it, so each replica has its own and a restarted
/// one replaces its stale file.
fn socket_path(path: &std::path::Path) -> std::path::PathBuf {
    if !path.is_dir() && !path.as_os_str().to_string_lossy().ends_with('/') {
        return path.to_owned();
    }
    let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
    let host: String = host.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    path.join(format!("loader-{host}.sock"))
}

/// Binds `--listen-unix`, replacing a socket file that no loader listens on any more (one left by
/// a killed loader) but refusing one a running loader still serves.
fn bind_unix(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!("{} exists and is not a socket (--listen-unix); give another path", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("a loader already listens on {} (--listen-unix); give another path", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot replace the stale socket {}", path.display()))?;
    }
    tokio::net::UnixListener::bind(path).with_context(|| format!("cannot listen on {} (--listen-unix)", path.display()))
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the loader");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
