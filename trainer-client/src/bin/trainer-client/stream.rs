//! `trainer-client stream`: one run through the library's run driver, with the tool's extras:
//! progress, `--dump`, `--check-exactly-once`, cursor saving, `--tensors` and the report.

use std::{path::PathBuf, sync::Arc, time::Instant};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use trainer_client::{Cursor, CursorWriter, Loaders, demo};

use crate::{
    args::{LoaderArgs, PlanArgs},
    check::ExactlyOnce,
    dump::Dump,
    progress::Progress,
    report::RunReport,
};

/// `stream` flags.
#[derive(Debug, Args)]
pub(crate) struct StreamArgs {
    #[command(flatten)]
    pub loader: LoaderArgs,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Write DIR/__indices__.npy, DIR/__epochs__.npy and DIR/FIELD.npy with every received sample in
    /// delivery order (DIR must be new or empty; the files stay readable if the client is killed).
    #[arg(long, env = "TRAINER_DUMP")]
    pub dump: Option<PathBuf>,
    /// Write throughput, memory, epoch boundaries and per-replica counts as JSON.
    #[arg(long, env = "TRAINER_STATS_JSON")]
    pub stats_json: Option<PathBuf>,
    /// Keep the stream position in this file, updated after every consumed batch (written on
    /// its own thread). With --resume-from, defaults to the cursor resumed from.
    #[arg(long, env = "TRAINER_SAVE_CURSOR")]
    pub save_cursor: Option<PathBuf>,
    /// Continue exactly where a cursor saved by --save-cursor points, until the end of its run.
    /// Plan flags given with it must agree with the cursor.
    #[arg(long, env = "TRAINER_RESUME_FROM")]
    pub resume_from: Option<PathBuf>,
    /// Stop after this many batches in all (a partial run; with --save-cursor, resume later).
    #[arg(long, env = "TRAINER_MAX_BATCHES")]
    pub max_batches: Option<u64>,
    /// Turn every batch into libtorch tensors on --device, as a training loop would (benchmarks;
    /// needs a build with --features torch).
    #[arg(long)]
    pub tensors: bool,
    /// Where --tensors puts them: cpu, cuda or cuda:N (auto: CUDA when available).
    #[arg(long, env = "TRAINER_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Check every sample's content against the built-in demo generator.
    #[arg(long, hide = true)]
    pub check_demo: bool,
    /// Fail unless each epoch delivered exactly the samples its plan holds: every sample once
    /// (this rank's share with --world-size, the covered part of a resumed or stopped epoch).
    #[arg(long, env = "TRAINER_CHECK_EXACTLY_ONCE")]
    pub check_exactly_once: bool,
}

impl StreamArgs {
    /// One epoch of `plan` from `loader`, nothing else.
    pub(crate) fn new(loader: LoaderArgs, plan: PlanArgs) -> StreamArgs {
        StreamArgs {
            loader,
            plan,
            dump: None,
            stats_json: None,
            save_cursor: None,
            resume_from: None,
            max_batches: None,
            tensors: false,
            device: "cpu".into(),
            check_demo: false,
            check_exactly_once: false,
        }
    }
}

/// Streams what `args` asks for; returns the report.
pub(crate) async fn stream(args: StreamArgs) -> anyhow::Result<RunReport> {
    #[cfg(feature = "torch")]
    let converter = match args.tensors {
        true => Some(trainer_client::tensor::TensorConverter::new(
            trainer_client::tensor::parse_device(&args.device).map_err(anyhow::Error::msg)?,
        )),
        false => None,
    };
    #[cfg(not(feature = "torch"))]
    if args.tensors {
        anyhow::bail!(
            "--tensors needs a trainer-client built with libtorch: \
             `bash scripts/setup-torch.sh cargo build --release -p trainer-client --features torch` (see the README)"
        );
    }
    let loaders = Loaders::connect(&args.loader.loaders, args.loader.options()?).await?;
    let resume = args.resume_from.as_deref().map(|path| Cursor::load(path).map(|c| (c, path))).transpose()?;
    let spec =
        args.plan.run_spec(&loaders, 1, resume.as_ref().map(|(c, p)| (c, *p)))?.with_max_batches(args.max_batches);
    let info = loaders.dataset(&spec.dataset)?.clone();
    let mut run = loaders.run(spec.clone())?;
    if let (Some((cursor, path)), 0) = (&resume, run.num_batches()) {
        println!("the run in {} is complete (epoch {}); nothing to stream", path.display(), cursor.epoch);
    }
    // A resumed run keeps its cursor file current unless --save-cursor names another.
    let cursor_writer = args.save_cursor.clone().or(args.resume_from.clone()).map(|p| Arc::new(CursorWriter::new(p)));
    if let Some(writer) = cursor_writer.clone() {
        run = run.on_consumed(move |cursor| writer.offer(cursor.clone()));
    }
    // Rows the run can deliver at most: the dump's headers are sized for them.
    let max_rows = run.num_batches() * spec.plan.batch_size;
    let mut dump = args.dump.as_deref().map(|dir| Dump::create(dir, &info, max_rows)).transpose()?;
    let mut check = args.check_exactly_once.then(|| ExactlyOnce::new(spec.plan.clone()));
    let progress = Progress::new(max_rows, std::io::IsTerminal::is_terminal(&std::io::stderr()));

    let started = Instant::now();
    let (mut samples, mut batches, mut bytes) = (0u64, 0u64, 0u64);
    while let Some(batch) = run.next().await {
        let batch = batch?;
        if args.check_demo {
            demo::check_chess_batch(&batch)?;
        }
        if let Some(line) = check.as_mut().map(|c| c.add(&batch)).transpose()?.flatten() {
            progress.finish();
            println!("{line}");
        }
        if let Some(dump) = dump.as_mut() {
            dump.append(&batch)?;
        }
        samples += batch.indices.len() as u64;
        batches += 1;
        bytes += batch.num_bytes();
        progress.add(batch.indices.len() as u64, batch.num_bytes(), batch.epoch);
        #[cfg(feature = "torch")]
        if let Some(converter) = &converter {
            // SAFETY: the batch moves into the conversion and no clone of it exists.
            #[allow(unsafe_code)]
            std::hint::black_box(unsafe { converter.convert_shared(batch) }?);
        }
    }
    progress.finish();
    if let Some(line) = check.as_mut().map(ExactlyOnce::finish).transpose()?.flatten() {
        println!("{line}");
    }
    // Tensors copied to a GPU count as delivered once the copies have finished.
    #[cfg(feature = "torch")]
    if let Some(tch::Device::Cuda(ordinal)) = converter.map(|c| c.device()) {
        tch::Cuda::synchronize(ordinal as i64);
    }
    let seconds = started.elapsed().as_secs_f64();
    let stats = run.stats();
    drop(run.into_loaders());
    if let Some(writer) = cursor_writer {
        let writer = Arc::try_unwrap(writer).map_err(|_| anyhow::anyhow!("the cursor writer is still shared"))?;
        writer.finish()?;
    }
    let report = RunReport::new(samples, batches, bytes, seconds, stats);
    // Read amplification is a ratio of decoded bytes: memory-mapped reads decode nothing.
    let amplification = if report.decoded_bytes == 0 {
        "nothing decoded (memory-mapped reads)".to_owned()
    } else {
        format!("read amplification {:.3}", report.read_amplification)
    };
    println!(
        "streamed {} samples ({:.1} MB) in {:.2}s: {:.0} samples/s, {:.1} MB/s, peak RSS {:.1} MiB, {} batches retried, \
         {amplification}",
        report.samples,
        report.bytes as f64 / 1e6,
        report.seconds,
        report.samples_per_s,
        report.bytes_per_s / 1e6,
        report.peak_rss_bytes as f64 / (1 << 20) as f64,
        report.retried_batches,
    );
    for (addr, replica) in &report.replicas {
        println!(
            "  replica {addr}: {} batches ({:.1} MB), {} failures",
            replica.batches,
            replica.bytes as f64 / 1e6,
            replica.failures
        );
    }
    if let Some(path) = &args.stats_json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report)
}
