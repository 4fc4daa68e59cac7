//! `trainer-client`: `info`, `stream` and `demo` over the trainer-client library.

use std::{
    collections::HashSet,
    num::NonZeroUsize,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use trainer_client::{
    ConnectOptions, Cursor, EpochPlan, Loaders, PlanSpec, Shuffle, StreamOptions,
    client::{connect, list_datasets, parse_loader},
    demo::{self, LoaderProcess},
    dump::Dump,
    report::RunReport,
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
        /// Loader address, host:port or http://host:port.
        #[arg(long, env = "TRAINER_LOADER")]
        loader: String,
    },
    /// Exit 0 when the loader's gRPC health service reports SERVING (for container healthchecks).
    Health {
        /// Loader address, host:port or http://host:port.
        #[arg(long, env = "TRAINER_LOADER")]
        loader: String,
    },
    /// Write the built-in example dataset (chess-like positions) into a directory and exit.
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
    /// Train a small model on a stream (built with the `torch` feature).
    #[cfg(feature = "torch")]
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

/// `train` flags (cargo feature `torch`).
#[cfg(feature = "torch")]
#[derive(Debug, Args)]
struct TrainArgs {
    #[command(flatten)]
    loader: LoaderArgs,
    /// Dataset to train on (the demo's chess positions by default).
    #[arg(long, env = "TRAINER_DATASET", default_value = "chess")]
    dataset: String,
    /// Field holding the model input.
    #[arg(long, default_value = "board")]
    input_field: String,
    /// Field holding the class label.
    #[arg(long, default_value = "result")]
    label_field: String,
    /// Added to labels to make them 0-based.
    #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
    label_offset: i64,
    /// Number of classes.
    #[arg(long, default_value_t = 3)]
    num_classes: i64,
    /// Samples per batch.
    #[arg(long, env = "TRAINER_BATCH_SIZE", default_value_t = 256)]
    batch_size: u64,
    /// Sample order within an epoch.
    #[arg(long, value_enum, default_value_t = Shuffle::Full)]
    shuffle: Shuffle,
    /// Shuffle seed (also seeds the model's initialisation).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Epochs to train.
    #[arg(long, default_value_t = 2)]
    epochs: u64,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, env = "TRAINER_DEVICE", default_value = "auto", value_parser = trainer_client::tensor::parse_device)]
    device: tch::Device,
    /// This process's rank in data-parallel training.
    #[arg(long, env = "TRAINER_RANK", default_value_t = 0)]
    rank: u64,
    /// Number of data-parallel ranks.
    #[arg(long, env = "TRAINER_WORLD_SIZE", default_value_t = 1)]
    world_size: u64,
    /// Directory for model weights + stream cursor; a restart resumes from it.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Checkpoint every this many batches (and at each epoch end).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: u64,
    /// Stop after this many batches (with a checkpoint), as a run that is interrupted.
    #[arg(long)]
    max_batches: Option<u64>,
    /// Append every trained sample index (int64 little-endian) to this file.
    #[arg(long)]
    indices_log: Option<PathBuf>,
    /// Write per-epoch loss, throughput, wait share and memory as JSON.
    #[arg(long)]
    stats_json: Option<PathBuf>,
}

/// Connection and flow-control flags shared by the streaming commands.
#[derive(Debug, Clone, Args)]
struct LoaderArgs {
    /// Loader address (host:port or http://host:port). Repeat for several replicas; a name that
    /// resolves to several addresses is one replica per address.
    #[arg(long = "loader", env = "TRAINER_LOADER", value_delimiter = ',', required = true)]
    loaders: Vec<String>,
    /// Batches requested ahead of the training loop, over all replicas. Client memory is about
    /// (prefetch + 2) x batch bytes.
    #[arg(long, env = "TRAINER_PREFETCH", default_value = "8")]
    prefetch: NonZeroUsize,
    /// Largest message accepted from a loader; bounds one batch's size.
    #[arg(long, env = "TRAINER_MAX_MESSAGE_BYTES", default_value_t = conveyor_proto::DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// A replica that leaves a request unanswered this long (seconds) is dropped and retried.
    #[arg(long, env = "TRAINER_REQUEST_TIMEOUT", default_value_t = 30.0)]
    request_timeout: f64,
    /// Fail when no replica is reachable for this long (seconds).
    #[arg(long, env = "TRAINER_UNAVAILABLE_TIMEOUT", default_value_t = 60.0)]
    unavailable_timeout: f64,
    /// Re-resolve loader names this often (seconds).
    #[arg(long, env = "TRAINER_RESOLVE_INTERVAL", default_value_t = 3.0)]
    resolve_interval: f64,
}

impl LoaderArgs {
    fn options(&self) -> anyhow::Result<StreamOptions> {
        let seconds = |value: f64, flag: &str| {
            Duration::try_from_secs_f64(value).with_context(|| format!("--{flag} {value} is not a number of seconds"))
        };
        Ok(StreamOptions {
            connect: ConnectOptions { max_message_bytes: self.max_message_bytes, ..ConnectOptions::default() },
            prefetch: self.prefetch,
            request_timeout: seconds(self.request_timeout, "request-timeout")?,
            unavailable_timeout: seconds(self.unavailable_timeout, "unavailable-timeout")?,
            resolve_interval: seconds(self.resolve_interval, "resolve-interval")?,
            ..StreamOptions::default()
        })
    }
}

#[derive(Debug, Args)]
struct StreamArgs {
    #[command(flatten)]
    loader: LoaderArgs,
    /// Dataset to stream.
    #[arg(long, env = "TRAINER_DATASET")]
    dataset: Option<String>,
    /// Samples per batch.
    #[arg(long, env = "TRAINER_BATCH_SIZE", default_value_t = 256)]
    batch_size: u64,
    /// Sample order within an epoch.
    #[arg(long, value_enum, default_value_t = Shuffle::Full)]
    shuffle: Shuffle,
    /// Blocks of chunks shuffled together with `--shuffle block`: larger mixes more, and needs
    /// that many decoded chunks in the loader's cache.
    #[arg(long, default_value_t = 8)]
    shuffle_window: u64,
    /// Shuffle seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// First epoch.
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// Number of epochs.
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    /// This process's rank in data-parallel training.
    #[arg(long, env = "TRAINER_RANK", default_value_t = 0)]
    rank: u64,
    /// Number of data-parallel ranks.
    #[arg(long, env = "TRAINER_WORLD_SIZE", default_value_t = 1)]
    world_size: u64,
    /// Drop samples that do not fill a whole batch (and an even share across ranks).
    #[arg(long)]
    drop_last: bool,
    /// Write DIR/indices.npy and DIR/FIELD.npy with every received sample in delivery order.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Write throughput, memory and per-replica counts as JSON.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Write the stream position here after every consumed batch.
    #[arg(long)]
    save_cursor: Option<PathBuf>,
    /// Continue exactly where a cursor saved by --save-cursor points (its settings win).
    #[arg(long)]
    resume_from: Option<PathBuf>,
    /// Stop after this many batches in all (a partial run; with --save-cursor, resume later).
    #[arg(long)]
    max_batches: Option<u64>,
    /// Turn every batch into libtorch tensors on --device, as a training loop would (benchmarks).
    #[cfg(feature = "torch")]
    #[arg(long)]
    tensors: bool,
    /// Where --tensors puts them: cpu, cuda or cuda:N (auto: CUDA when available).
    #[cfg(feature = "torch")]
    #[arg(long, env = "TRAINER_DEVICE", default_value = "cpu", value_parser = trainer_client::tensor::parse_device)]
    device: tch::Device,
    /// Check every sample's content against the built-in demo generator.
    #[arg(long, hide = true)]
    check_demo: bool,
    /// Fail unless every sample of every epoch arrived exactly once (single-rank runs).
    #[arg(long)]
    check_exactly_once: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TRAINER_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
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
            eprintln!("trainer-client: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Info { loader } => info(&loader).await,
        Command::Health { loader } => health(&loader).await,
        Command::WriteDemoData { dir, samples } => demo::write_chess_dataset(&dir, samples, 100_000)
            .map(|()| println!("wrote {samples} samples to {}", dir.display())),
        Command::Stream(args) => stream(*args).await.map(|_| ()),
        Command::Demo { samples, dir, batch_size } => run_demo(samples, dir, batch_size).await,
        #[cfg(feature = "torch")]
        Command::Train(args) => train(*args).await,
    }
}

async fn info(loader: &str) -> anyhow::Result<()> {
    let addr = parse_loader(loader)?;
    let mut client = connect(&addr, &ConnectOptions::default()).await?;
    for dataset in list_datasets(&mut client, &addr).await? {
        println!("dataset {}: {} samples", dataset.name, dataset.num_samples);
        for field in dataset.fields {
            let dtype = conveyor_proto::DType::try_from(field.dtype).unwrap_or(conveyor_proto::DType::Unspecified);
            println!(
                "  {:<16} {:<8} sample shape {:?}  {} bytes/sample  chunk {}",
                field.name,
                dtype.name(),
                field.sample_shape,
                field.bytes_per_sample,
                field.chunk_len
            );
        }
    }
    Ok(())
}

async fn health(loader: &str) -> anyhow::Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let addr = parse_loader(loader)?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let request = HealthCheckRequest { service: "conveyor.v1.Loader".into() };
    let status = HealthClient::new(channel).check(request).await?.into_inner().status();
    if status != ServingStatus::Serving {
        bail!("loader {addr} is {}", status.as_str_name());
    }
    println!("{addr}: SERVING");
    Ok(())
}

/// Streams what `args` asks for; returns the report.
async fn stream(args: StreamArgs) -> anyhow::Result<RunReport> {
    let mut loaders = Loaders::connect(&args.loader.loaders, args.loader.options()?).await?;
    let resume = args.resume_from.as_deref().map(Cursor::load).transpose()?;
    let (dataset, spec, first_epoch, start_batch) = match &resume {
        Some(cursor) => (cursor.dataset.clone(), cursor.plan.clone(), cursor.epoch, cursor.next_batch),
        None => {
            let dataset = args.dataset.clone().context("--dataset is required (or --resume-from a cursor)")?;
            let info = loaders.dataset(&dataset)?;
            let spec = PlanSpec {
                num_samples: info.num_samples,
                batch_size: args.batch_size,
                drop_last: args.drop_last,
                shuffle: args.shuffle,
                seed: args.seed,
                rank: args.rank,
                world_size: args.world_size,
                block_len: trainer_client::client::block_len(&info),
                shuffle_window: args.shuffle_window,
            };
            (dataset, spec, args.epoch, 0)
        }
    };
    let info = loaders.dataset(&dataset)?;
    if info.num_samples != spec.num_samples {
        bail!("the cursor is for {} samples but dataset '{dataset}' now has {}", spec.num_samples, info.num_samples);
    }
    let last_epoch = match &resume {
        Some(_) => first_epoch + args.epochs.max(1) - 1,
        None => args.epoch + args.epochs.max(1) - 1,
    };
    let plans: Vec<EpochPlan> =
        (first_epoch..=last_epoch).map(|e| EpochPlan::new(spec.clone(), e)).collect::<Result<_, _>>()?;
    // Rows the run will deliver, known up front so --dump can write its headers first.
    let mut batches_left = args.max_batches.unwrap_or(u64::MAX);
    let mut total_samples = 0;
    for (i, plan) in plans.iter().enumerate() {
        let first = if i == 0 { start_batch.min(plan.num_batches()) } else { 0 };
        let take = (plan.num_batches() - first).min(batches_left);
        batches_left -= take;
        let end_row = ((first + take) * spec.batch_size).min(plan.num_samples());
        total_samples += end_row.saturating_sub(first * spec.batch_size);
    }
    let mut dump = args.dump.as_deref().map(|dir| Dump::create(dir, &info, total_samples)).transpose()?;

    let progress = ProgressBar::new(total_samples);
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} epoch {msg} [{bar:30}] {pos}/{len} samples {per_sec} ({binary_bytes_per_sec}) eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    #[cfg(feature = "torch")]
    let converter = args.tensors.then(|| trainer_client::tensor::TensorConverter::new(args.device));
    let started = Instant::now();
    let (mut samples, mut batches, mut bytes) = (0u64, 0u64, 0u64);
    for (i, plan) in plans.into_iter().enumerate() {
        let epoch_number = plan.epoch();
        let num_samples = spec.num_samples;
        progress.set_message(epoch_number.to_string());
        let mut seen = if args.check_exactly_once { Some(vec![false; num_samples as usize]) } else { None };
        let start = if i == 0 { start_batch } else { 0 };
        let mut epoch = loaders.epoch(&dataset, plan, start)?;
        while let Some(batch) = epoch.next().await? {
            if args.max_batches.is_some_and(|max| batches >= max) {
                break;
            }
            if args.check_demo {
                demo::check_chess_batch(&batch)?;
            }
            #[cfg(feature = "torch")]
            if let Some(converter) = &converter {
                std::hint::black_box(converter.convert(&batch)?);
            }
            if let Some(seen) = seen.as_mut() {
                for &index in &batch.indices {
                    if std::mem::replace(&mut seen[index as usize], true) {
                        bail!("sample {index} arrived twice in epoch {epoch_number}");
                    }
                }
            }
            if let Some(dump) = dump.as_mut() {
                dump.append(&batch)?;
            }
            samples += batch.indices.len() as u64;
            batches += 1;
            bytes += batch.num_bytes();
            progress.set_position(samples);
            if let Some(path) = &args.save_cursor {
                let cursor = Cursor {
                    dataset: dataset.clone(),
                    plan: spec.clone(),
                    epoch: epoch_number,
                    next_batch: batch.index + 1,
                };
                cursor.save(path)?;
            }
        }
        if args.max_batches.is_some_and(|max| batches >= max) {
            break;
        }
        if let Some(seen) = seen {
            if start == 0 {
                let missing = seen.iter().filter(|s| !**s).count();
                if missing > 0 && !spec.drop_last && spec.world_size == 1 {
                    bail!("{missing} samples never arrived in epoch {epoch_number}");
                }
            }
            println!("epoch {epoch_number}: every sample exactly once");
        }
        if let Some(path) = &args.save_cursor {
            let cursor =
                Cursor { dataset: dataset.clone(), plan: spec.clone(), epoch: epoch_number + 1, next_batch: 0 };
            cursor.save(path)?;
        }
    }
    progress.finish_and_clear();
    if let Some(dump) = dump {
        dump.finish()?;
    }
    // Tensors copied to a GPU count as delivered once the copies have finished.
    #[cfg(feature = "torch")]
    if let (true, tch::Device::Cuda(ordinal)) = (args.tensors, args.device) {
        tch::Cuda::synchronize(ordinal as i64);
    }
    let report = RunReport::new(samples, batches, bytes, started.elapsed().as_secs_f64(), loaders.stats());
    println!(
        "streamed {} samples ({:.1} MB) in {:.2}s: {:.0} samples/s, {:.1} MB/s, peak RSS {:.1} MiB, {} batches retried, \
         read amplification {:.3}",
        report.samples,
        report.bytes as f64 / 1e6,
        report.seconds,
        report.samples_per_s,
        report.bytes_per_s / 1e6,
        report.peak_rss_bytes as f64 / (1 << 20) as f64,
        report.retried_batches,
        report.read_amplification
    );
    if let Some(path) = &args.stats_json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report)
}

#[cfg(feature = "torch")]
async fn train(args: TrainArgs) -> anyhow::Result<()> {
    let mut loaders = Loaders::connect(&args.loader.loaders, args.loader.options()?).await?;
    let info = loaders.dataset(&args.dataset)?;
    let plan = PlanSpec {
        num_samples: info.num_samples,
        batch_size: args.batch_size,
        drop_last: false,
        shuffle: args.shuffle,
        seed: args.seed,
        rank: args.rank,
        world_size: args.world_size,
        block_len: trainer_client::client::block_len(&info),
        shuffle_window: 8,
    };
    let options = trainer_client::train::TrainOptions {
        dataset: args.dataset,
        input_field: args.input_field,
        label_field: args.label_field,
        label_offset: args.label_offset,
        num_classes: args.num_classes,
        plan,
        epochs: args.epochs,
        lr: args.lr,
        device: args.device,
        checkpoint: args.checkpoint,
        checkpoint_every: args.checkpoint_every,
        max_batches: args.max_batches,
        indices_log: args.indices_log,
    };
    println!("training on {:?} (CUDA available: {})", options.device, tch::Cuda::is_available());
    let report = trainer_client::train::train(&mut loaders, options).await?;
    if let Some(path) = &args.stats_json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
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
    let binary = demo::sibling_loader_binary()?;
    let args = vec!["--listen".into(), "127.0.0.1:0".into(), "--dataset".into(), format!("chess={}", dir.display())];
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(LoaderProcess::start(&binary, &args, Duration::from_secs(60)).await?);
    }
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    println!("started 2 loader-server processes on {}", addrs.join(" and "));
    let report = stream(StreamArgs {
        loader: LoaderArgs {
            loaders: addrs,
            prefetch: NonZeroUsize::new(8).expect("nonzero"),
            max_message_bytes: conveyor_proto::DEFAULT_MAX_MESSAGE_BYTES,
            request_timeout: 30.0,
            unavailable_timeout: 30.0,
            resolve_interval: 3.0,
        },
        dataset: Some("chess".into()),
        batch_size,
        shuffle: Shuffle::Full,
        shuffle_window: 8,
        seed: 0,
        epoch: 0,
        epochs: 1,
        rank: 0,
        world_size: 1,
        drop_last: false,
        dump: None,
        stats_json: None,
        save_cursor: None,
        resume_from: None,
        max_batches: None,
        #[cfg(feature = "torch")]
        tensors: false,
        #[cfg(feature = "torch")]
        device: tch::Device::Cpu,
        check_demo: true,
        check_exactly_once: true,
    })
    .await?;
    for (addr, replica) in &report.replicas {
        println!("  replica {addr}: {} batches", replica.batches);
    }
    let served: HashSet<&String> = report.replicas.iter().filter(|(_, r)| r.batches > 0).map(|(a, _)| a).collect();
    if served.len() < 2 {
        println!("  note: one replica served every batch (the other was slower to connect)");
    }
    for mut replica in replicas {
        replica.terminate().await?;
    }
    println!("demo ok: every sample arrived exactly once with the right content");
    Ok(())
}
