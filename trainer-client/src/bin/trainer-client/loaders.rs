//! Loader processes started on free ports, for the `demo` command and the end-to-end tests
//! (which include this file): a child `loader-server` whose `listening on ADDR` line is read,
//! killed when dropped. Its items are `pub` for the tests' crate, which re-exports them.
#![allow(unreachable_pub)]

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// A loader-server child process; killed when dropped.
#[derive(Debug)]
pub struct LoaderProcess {
    /// The process.
    pub child: Child,
    /// The address it printed.
    pub addr: String,
}

impl LoaderProcess {
    /// Starts `binary` with `args` (which should include `--listen 127.0.0.1:0`) and waits up to
    /// `timeout` for its `listening on ADDR` line.
    ///
    /// # Errors
    /// When it cannot start, exits, or prints no address in time; includes what it wrote.
    pub async fn start(binary: &Path, args: &[String], timeout: Duration) -> anyhow::Result<LoaderProcess> {
        let mut child = Command::new(binary)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Quiet by default so a parent's own output stays readable; LOADER_LOG overrides.
            .env("LOADER_LOG", std::env::var("LOADER_LOG").unwrap_or_else(|_| "warn".into()))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take().context("loader stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(timeout, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return Ok(addr.trim().to_owned());
                }
            }
            anyhow::Ok(String::new())
        })
        .await
        .with_context(|| format!("{} printed no address within {timeout:?}", binary.display()))??;
        if addr.is_empty() {
            let status = child.wait().await?;
            bail!("{} exited ({status}) before listening", binary.display());
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(LoaderProcess { child, addr })
    }

    /// Sends SIGTERM (drain) and waits for the process to exit.
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub async fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().context("loader already exited")?;
        let status = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(self.child.wait().await?)
    }
}

/// The `loader-server` binary next to the running executable (both are built into one target
/// directory by `cargo build`).
///
/// # Errors
/// When it is not there, saying how to build it.
pub fn sibling_loader_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let dir = exe.parent().context("executable has no directory")?;
    for candidate in [dir.join("loader-server"), dir.join("../loader-server")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("no loader-server binary next to {}; build both with `cargo build --release --workspace`", exe.display())
}
