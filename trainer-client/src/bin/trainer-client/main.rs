//! `trainer-client`: `info`, `health`, `stream`, `train` and `demo` over the trainer-client
//! library.

mod args;
mod check;
mod dump;
mod loaders;
mod progress;
mod report;
mod stream;
#[cfg(feature = "torch")]
mod train;

use std::{
    io::IsTerminal,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// jemalloc reuses the pages of a dropped batch for the next one (each received batch is its own
/// multi-MiB buffer); glibc's malloc trimmed and refaulted them, costing the client about 60
/// minor faults per 3 MiB batch and a tenth of its throughput (measured: docs/benchmarks.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use clap::{Parser, Subcommand};
use trainer_client::{ConnectOptions, DType, demo, fetch_catalog, open_channel, parse_loader};

use crate::{
    args::{LoaderArgs, PlanArgs},
    stream::StreamArgs,
};

#[derive(Debug, Parser)]
#[command(name = "trainer-client", version, about = "Stream training batches from Conveyor loader servers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the datasets, fields, dtypes, shapes and sample counts of a loader.
    Info {
        /// Loader address: host:port, http://host:port, or https://host:port for TLS.
        #[arg(long, env = "TRAINER_LOADER")]
        loader: String,
        /// TLS and token.
        #[command(flatten)]
        security: args::SecurityArgs,
    },
    /// Exit 0 when the loader's gRPC health service reports SERVING (for container healthchecks).
    Health {
        /// Loader address: host:port, http://host:port, or https://host:port for TLS.
        #[arg(long, env = "TRAINER_LOADER")]
        loader: String,
        /// TLS and token.
        #[command(flatten)]
        security: args::SecurityArgs,
    },
    /// Write the built-in example dataset (chess-like positions) into a directory and exit.
    /// Data already there with the same number of samples is kept (loaders may be serving it).
    WriteDemoData {
        /// Directory to write (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Number of samples.
        #[arg(long, default_value_t = 500_000)]
        samples: u64,
    },
    /// Stream epochs of a dataset from one or more loaders.
    Stream(Box<StreamArgs>),
    /// Train a small model on a stream (needs a build with `--features torch`).
    Train(Box<TrainArgs>),
    /// Write a built-in example dataset, start two loaders on free ports and stream one shuffled
    /// epoch across them, checking every sample arrived exactly once with the right content.
    Demo {
        /// Samples in the example dataset ([N,12,8,8] int16 boards + move + result labels).
        #[arg(long, default_value_t = 500_000)]
        samples: u64,
        /// Where to write it (default: a fresh temporary directory, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Samples per batch.
        #[arg(long, default_value_t = 256)]
        batch_size: u64,
    },
}

#[cfg(feature = "torch")]
use train::TrainArgs;

/// Without the `torch` feature `train` takes any arguments and explains how to get it.
#[cfg(not(feature = "torch"))]
#[derive(Debug, clap::Args)]
struct TrainArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
}

fn main() -> ExitCode {
    let stderr_is_terminal = std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TRAINER_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(conveyor_proto::LogWriter::stderr)
        .with_ansi(stderr_is_terminal)
        .init();
    let command = Cli::parse().command;
    // Named threads, so `top -H` and `perf report --sort comm` tell them from a loader's.
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("trainer")
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(run_command(command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("trainer-client: error: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once (transport errors repeat their causes' text).
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let line = cause.to_string();
        if !text.contains(&line) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&line);
        }
    }
    text
}

async fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Info { loader, security } => info(&loader, &security.connect_options()?).await,
        Command::Health { loader, security } => health(&loader, &security.connect_options()?).await,
        Command::WriteDemoData { dir, samples } => write_demo_data(&dir, samples),
        Command::Stream(args) => stream::stream(*args).await.map(|_| ()),
        Command::Demo { samples, dir, batch_size } => run_demo(samples, dir, batch_size).await,
        #[cfg(feature = "torch")]
        Command::Train(args) => train::run(*args).await,
        #[cfg(not(feature = "torch"))]
        Command::Train(_) => bail!(
            "this trainer-client was built without libtorch; build it with \
             `bash scripts/setup-torch.sh cargo build --release -p trainer-client --features torch` (see the README)"
        ),
    }
}

async fn info(loader: &str, options: &ConnectOptions) -> anyhow::Result<()> {
    for dataset in fetch_catalog(loader, options).await? {
        println!("dataset {}: {} samples", dataset.name, dataset.num_samples);
        let derived = !dataset.derivation.is_empty();
        if derived {
            println!("  derived on the loader: {}", dataset.derivation);
        }
        for field in dataset.fields {
            let dtype = DType::try_from(field.dtype).unwrap_or(DType::Unspecified);
            let storage = match field.chunk_len {
                0 | 1 if derived => "transformed on the loader".to_owned(),
                0 | 1 => "unchunked (memory-mapped .npy)".to_owned(),
                n => format!("chunks of {n} samples (block shuffle keeps them together)"),
            };
            if field.ragged {
                let rows = if field.sample_shape.is_empty() {
                    "values".to_owned()
                } else {
                    format!("rows of shape {:?}", field.sample_shape)
                };
                println!("  {:<16} {:<8} ragged: each sample a variable number of {rows}", field.name, dtype.name());
            } else {
                println!(
                    "  {:<16} {:<8} sample shape {:?}  {} bytes/sample  {storage}",
                    field.name,
                    dtype.name(),
                    field.sample_shape,
                    field.bytes_per_sample,
                );
            }
            if !field.dimension_names.is_empty() {
                println!("  {:<16} dimensions ({})", "", field.dimension_names.join(", "));
            }
        }
        for coordinate in dataset.coordinates {
            // Loaders that predate `role` described coordinates only.
            let role = if coordinate.role.is_empty() { "coordinate" } else { coordinate.role.as_str() };
            let mut units = String::new();
            if !coordinate.units.is_empty() {
                units = format!("  units '{}'", coordinate.units);
            }
            if !coordinate.calendar.is_empty() {
                units.push_str(&format!(" calendar '{}'", coordinate.calendar));
            }
            println!(
                "  {role} {:<16} {:<8} shape {:?}  dimensions ({}){units}  (described, not served)",
                coordinate.name,
                coordinate.dtype,
                coordinate.shape,
                coordinate.dimension_names.join(", "),
            );
            if role == "variable" && !coordinate.reason.is_empty() {
                println!("  {:<16} not a field: {}", "", coordinate.reason);
            }
        }
    }
    Ok(())
}

async fn health(loader: &str, options: &ConnectOptions) -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let addr = parse_loader(loader)?;
    let options = ConnectOptions { connect_timeout: Duration::from_secs(2), ..options.clone() };
    let channel = tokio::time::timeout(Duration::from_secs(4), open_channel(loader, &options))
        .await
        .with_context(|| format!("{addr} did not answer within 4s"))?
        .with_context(|| format!("cannot connect to {addr}"))?;
    let request = HealthCheckRequest { service: "conveyor.v1.Loader".into() };
    let status = tokio::time::timeout(Duration::from_secs(2), HealthClient::new(channel).check(request))
        .await
        .with_context(|| format!("{addr} did not answer the health check within 2s"))??
        .into_inner()
        .status();
    if status != ServingStatus::Serving {
        bail!("loader {addr} is {}", status.as_str_name());
    }
    println!("{addr}: SERVING");
    Ok(())
}

fn write_demo_data(dir: &std::path::Path, samples: u64) -> anyhow::Result<()> {
    if demo::holds_chess_dataset(dir, samples) {
        println!("{} already holds {samples} samples; kept as they are", dir.display());
        return Ok(());
    }
    demo::write_chess_dataset(dir, samples, 100_000)?;
    println!("wrote {samples} samples to {}", dir.display());
    Ok(())
}

async fn run_demo(num_samples: u64, dir: Option<PathBuf>, batch_size: u64) -> anyhow::Result<()> {
    let temp;
    let dir = match dir {
        Some(dir) => dir,
        None => {
            temp = tempfile::Builder::new().prefix("conveyor-demo-").tempdir()?;
            temp.path().to_owned()
        }
    };
    let written = Instant::now();
    demo::write_chess_dataset(&dir, num_samples, 100_000)?;
    println!(
        "wrote {num_samples} chess positions ([N,12,8,8] int16 board + move + result) to {} in {:.1}s",
        dir.display(),
        written.elapsed().as_secs_f64()
    );
    let binary = loaders::sibling_loader_binary()?;
    let args = vec!["--listen".into(), "127.0.0.1:0".into(), "--dataset".into(), format!("chess={}", dir.display())];
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(loaders::LoaderProcess::start(&binary, &args, Duration::from_secs(60)).await?);
    }
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    println!("started 2 loader-server processes on {}", addrs.join(" and "));
    let mut args = StreamArgs::new(LoaderArgs::new(addrs), PlanArgs::dataset("chess", batch_size));
    args.check_demo = true;
    args.check_exactly_once = true;
    let report = stream::stream(args).await?;
    if report.replicas.values().filter(|r| r.batches > 0).count() < 2 {
        println!("  note: one replica served every batch (the other was slower to connect)");
    }
    for mut replica in replicas {
        replica.terminate().await?;
    }
    println!("demo ok: every sample arrived exactly once with the right content");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "torch"))]
    #[tokio::test]
    async fn train_without_libtorch_says_how_to_build_it() {
        let cli = Cli::try_parse_from(["trainer-client", "train", "--loader", "127.0.0.1:7070", "--epochs", "2"]);
        let command = cli.expect("train parses on every build").command;
        let error = run_command(command).await.expect_err("no libtorch in this build");
        assert!(error.to_string().contains("--features torch") && error.to_string().contains("README"), "{error}");
    }

    #[test]
    fn an_error_chain_says_each_cause_once() {
        let error =
            anyhow::anyhow!("tcp connect error").context("tcp connect error").context("cannot connect to loader a:1");
        assert_eq!(error_chain(&error), "cannot connect to loader a:1: tcp connect error");
    }
}
