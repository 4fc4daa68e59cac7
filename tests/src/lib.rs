//! Support for the end-to-end tests: where the built binaries and Python are, fixtures written
//! by numpy, and loader processes on free ports.

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::sync::oneshot;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
/// The trainer binary's loader processes (one file, shared rather than copied).
#[path = "../../trainer-client/src/bin/trainer-client/loaders.rs"]
#[allow(dead_code)]
mod loaders;
pub use loaders::LoaderProcess;

/// The directory holding the workspace's built binaries (`target/debug` or `target/release`),
/// found from the running test executable (`target/<profile>/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_owned()
}

/// A workspace binary; panics with the build command when it is missing.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.is_file(), "{} is not built; run `cargo build --workspace` before `cargo test`", path.display());
    path
}

/// The Python interpreter with numpy: `$CONVEYOR_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("CONVEYOR_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `tests/fixtures/NAME`.
pub fn fixture_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// Runs a fixture script with Python and returns its stdout; fails with its stderr.
///
/// # Errors
/// When Python or numpy is missing, or the script fails.
pub fn run_python(script: &str, args: &[&Path]) -> anyhow::Result<String> {
    let output = std::process::Command::new(python())
        .arg(fixture_script(script))
        .args(args)
        .output()
        .with_context(|| format!("cannot run {} (set CONVEYOR_PYTHON to a Python with numpy)", python()))?;
    if !output.status.success() {
        bail!("{script} failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Fixtures written by numpy (see `fixtures/make_npy.py`) in a fresh temporary directory.
pub fn npy_fixtures() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    run_python("make_npy.py", &[dir.path()]).expect("numpy fixtures (is numpy installed? see README)");
    dir
}

/// Fixtures written by zarr-python (see `fixtures/make_zarr.py`) in a fresh temporary directory.
pub fn zarr_fixtures() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    run_python("make_zarr.py", &[dir.path()]).expect("zarr fixtures (is zarr-python installed? see README)");
    dir
}

/// For every `bad-*` case in `fixtures/manifest.json` (`{dir: [expected substrings]}`), starts
/// a loader on it and asserts it exits non-zero before listening, with every expected substring
/// on stderr. Returns the number of cases.
pub fn assert_loader_rejects_each_bad_case(fixtures: &Path) -> usize {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("manifest.json")).expect("manifest")).expect("json");
    let cases = manifest.as_object().expect("object");
    for (dir, expected) in cases {
        let output = std::process::Command::new(binary("loader-server"))
            .args(["--listen", "127.0.0.1:0", "--dataset", &format!("bad={}", fixtures.join(dir).display())])
            .output()
            .expect("loader-server runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{dir}: the loader started: {stderr}");
        assert!(output.stdout.is_empty(), "{dir}: the loader listened before failing");
        for needle in expected.as_array().expect("list") {
            let needle = needle.as_str().expect("string");
            assert!(stderr.contains(needle), "{dir}: stderr lacks '{needle}': {stderr}");
        }
    }
    cases.len()
}

/// Starts a loader-server process on a free loopback port serving `datasets` (`NAME=DIR`).
///
/// # Errors
/// When it does not come up within a minute.
pub async fn start_loader(datasets: &[String], extra_args: &[&str]) -> anyhow::Result<LoaderProcess> {
    start_loader_on("127.0.0.1:0", datasets, extra_args).await
}

/// Like [`start_loader`] on a given address (to bring a replica back where it was).
///
/// # Errors
/// When it does not come up within a minute.
pub async fn start_loader_on(listen: &str, datasets: &[String], extra_args: &[&str]) -> anyhow::Result<LoaderProcess> {
    let mut args = vec!["--listen".to_owned(), listen.to_owned()];
    for spec in datasets {
        args.push("--dataset".into());
        args.push(spec.clone());
    }
    args.extend(extra_args.iter().map(|a| a.to_string()));
    LoaderProcess::start(&binary("loader-server"), &args, Duration::from_secs(60)).await
}

/// Waits until `done`, checking every 20 ms, and fails the test naming `what` after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `trainer-client` with `args` to completion.
///
/// # Errors
/// When it cannot be started.
pub fn trainer(args: &[&str]) -> anyhow::Result<Output> {
    Ok(std::process::Command::new(binary("trainer-client")).args(args).output()?)
}

/// A loader running inside the test process on a free port.
pub struct InProcessLoader {
    /// Its address.
    pub addr: String,
    /// Its shared state (cache, counters).
    pub state: std::sync::Arc<loader_server::LoaderState>,
    stop_tx: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), loader_server::ServeError>>,
}

impl InProcessLoader {
    /// Opens `config`'s datasets and serves them on a free port.
    pub async fn start(config: loader_server::Config) -> InProcessLoader {
        let state = loader_server::open(config).expect("datasets open");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(loader_server::serve(listener, state.clone(), async {
            let _ = stop_rx.await;
        }));
        InProcessLoader { addr, state, stop_tx: Some(stop_tx), server }
    }

    /// Like [`InProcessLoader::start`], also listening on the Unix socket `socket`.
    pub async fn start_with_unix(config: loader_server::Config, socket: &Path) -> InProcessLoader {
        let state = loader_server::open(config).expect("datasets open");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let unix = tokio::net::UnixListener::bind(socket).expect("bind the Unix socket");
        let addr = listener.local_addr().expect("addr").to_string();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(loader_server::serve_with_unix(listener, Some(unix), state.clone(), async {
            let _ = stop_rx.await;
        }));
        InProcessLoader { addr, state, stop_tx: Some(stop_tx), server }
    }

    /// The health service's answer for `conveyor.v1.Loader`.
    pub async fn health(&self) -> ServingStatus {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        let mut health = HealthClient::new(channel);
        let request = HealthCheckRequest { service: "conveyor.v1.Loader".into() };
        let status = health.check(request).await.expect("health check").into_inner().status;
        ServingStatus::try_from(status).expect("known status")
    }

    /// Stops (drains) the server and waits for it.
    pub async fn stop(mut self) {
        let _ = self.stop_tx.take().map(|tx| tx.send(()));
        self.server.await.expect("server task").expect("server exits cleanly");
    }
}

/// `GET /metrics` over a real socket from the metrics endpoint on a free port.
pub async fn scrape_metrics(loader: &InProcessLoader) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(loader_server::metrics::serve_metrics(listener, loader.state.clone(), async {
        let _ = stop_rx.await;
    }));
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    socket.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
    let mut response = String::new();
    socket.read_to_string(&mut response).await.expect("read");
    let _ = stop_tx.send(());
    server.await.expect("the metrics endpoint stops on shutdown");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    response
}
