//! `trainer-client train` (cargo feature `torch`): a real training loop on the library's run
//! driver — a small MLP predicting the demo dataset's game result from the board, with
//! checkpoints that hold the model weights and the stream cursor together, so a restart resumes
//! both.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use serde::Serialize;
use tch::{
    Device, Kind,
    nn::{self, Module, OptimizerConfig},
};
use trainer_client::{
    Cursor, Loaders,
    tensor::{TensorConverter, parse_device},
};

use crate::{
    args::{LoaderArgs, PlanArgs},
    report::rss_bytes,
};

/// `train` flags.
#[derive(Debug, Args)]
pub(crate) struct TrainArgs {
    #[command(flatten)]
    loader: LoaderArgs,
    #[command(flatten)]
    plan: PlanArgs,
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
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// auto (CUDA when available), cpu, cuda or cuda:N.
    #[arg(long, env = "TRAINER_DEVICE", default_value = "auto", value_parser = parse_device)]
    device: Device,
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

/// One epoch's measurements.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct EpochReport {
    /// Epoch number.
    pub epoch: u64,
    /// Samples trained on in this process.
    pub samples: u64,
    /// Mean training loss over those samples.
    pub mean_loss: f64,
    /// Samples per second.
    pub samples_per_s: f64,
    /// Share of the epoch's time spent waiting for data.
    pub wait_share: f64,
    /// Process RSS at the end of the epoch.
    pub rss_bytes: u64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TrainReport {
    /// Device trained on.
    pub device: String,
    /// Where it resumed from, if it did.
    pub resumed_from: Option<(u64, u64)>,
    /// Per epoch.
    pub epochs: Vec<EpochReport>,
    /// Whether it stopped early (`max_batches`).
    pub stopped_early: bool,
}

fn save_checkpoint(dir: &Path, vs: &nn::VarStore, cursor: &Cursor) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create --checkpoint {}", dir.display()))?;
    let tmp = dir.join("model.ot.tmp");
    vs.save(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("model.ot")).context("cannot move the model checkpoint in place")?;
    // The cursor is written last: a crash in between leaves the new weights with the old cursor,
    // which only repeats a few batches, never skips one.
    Ok(cursor.save(&dir.join("cursor.json"))?)
}

/// Trains on the stream; the demo's chess dataset and 2 epochs unless the flags say otherwise.
///
/// # Errors
/// Streaming, tensor and checkpoint errors, with context.
pub(crate) async fn run(mut args: TrainArgs) -> anyhow::Result<()> {
    println!("training on {:?} (CUDA available: {})", args.device, tch::Cuda::is_available());
    args.plan.dataset.get_or_insert_with(|| "chess".into());
    let loaders = Loaders::connect(&args.loader.loaders, args.loader.options()?).await?;
    let cursor_path = args.checkpoint.as_ref().map(|dir| dir.join("cursor.json"));
    let model_path = args.checkpoint.as_ref().map(|dir| dir.join("model.ot"));
    let resume = match (&cursor_path, &model_path) {
        (Some(cursor), Some(model)) if cursor.is_file() && model.is_file() => Some(Cursor::load(cursor)?),
        _ => None,
    };
    let spec = args
        .plan
        .run_spec(&loaders, 2, resume.as_ref().zip(cursor_path.as_deref()))?
        .with_max_batches(args.max_batches);
    let info = loaders.dataset(&spec.dataset)?.clone();
    let field = |name: &str| {
        info.fields.iter().find(|f| f.name == name).with_context(|| {
            format!(
                "dataset '{}' has no field '{name}'; its fields: {}",
                info.name,
                info.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
            )
        })
    };
    let input_dim: i64 = field(&args.input_field)?.sample_shape.iter().product::<u64>().max(1) as i64;
    field(&args.label_field)?;

    tch::manual_seed(spec.plan.seed as i64);
    let mut vs = nn::VarStore::new(args.device);
    let root = vs.root();
    let model = nn::seq()
        .add(nn::linear(&root / "l1", input_dim, 256, Default::default()))
        .add_fn(|x| x.relu())
        .add(nn::linear(&root / "l2", 256, args.num_classes, Default::default()));
    let mut optimizer = nn::Adam::default().build(&vs, args.lr)?;
    let resumed_from = resume.as_ref().map(|c| (c.epoch, c.next_batch));
    if let (Some((epoch, batch)), Some(path)) = (resumed_from, &model_path) {
        vs.load(path).with_context(|| format!("cannot load {}", path.display()))?;
        eprintln!("resuming from epoch {epoch} batch {batch}");
    }
    let mut indices_log = match &args.indices_log {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?,
        ),
        None => None,
    };

    let converter = TensorConverter::new(args.device);
    let mut report =
        TrainReport { device: format!("{:?}", args.device), resumed_from, epochs: Vec::new(), stopped_early: false };
    let mut run = loaders.run(spec)?;
    let mut epoch_stats: Option<EpochStats> = None;
    while let Some(batch) = run.next().await {
        let batch = batch?;
        if epoch_stats.as_ref().is_none_or(|e| e.epoch != batch.epoch) {
            if let Some(done) = epoch_stats.take() {
                report.epochs.push(done.finish(run.stats().wait_seconds));
            }
            epoch_stats = Some(EpochStats::start(batch.epoch, run.stats().wait_seconds));
        }
        let (batch_index, indices) = (batch.index, batch.indices.clone());
        // SAFETY: the batch moves into the conversion and no clone of it exists.
        #[allow(unsafe_code)]
        let tensors = unsafe { converter.convert_shared(batch) }?;
        let inputs = tensors.get(&args.input_field).context("input field")?.to_kind(Kind::Float).flatten(1, -1);
        let labels = tensors.get(&args.label_field).context("label field")?.to_kind(Kind::Int64) + args.label_offset;
        let loss = model.forward(&inputs).cross_entropy_for_logits(&labels);
        optimizer.backward_step(&loss);
        let n = indices.len() as u64;
        if let Some(stats) = epoch_stats.as_mut() {
            stats.loss_sum += loss.double_value(&[]) * n as f64;
            stats.samples += n;
        }
        if let Some(log) = indices_log.as_mut() {
            use std::io::Write;
            let bytes: Vec<u8> = indices.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
            log.write_all(&bytes).context("writing --indices-log")?;
        }
        let epoch_end = batch_index + 1 == run.batches_per_epoch();
        let last = run.num_delivered() == run.num_batches();
        if let Some(dir) = &args.checkpoint
            && (last || epoch_end || (batch_index + 1) % args.checkpoint_every.max(1) == 0)
        {
            save_checkpoint(dir, &vs, &run.cursor())?;
        }
    }
    if let Some(done) = epoch_stats.take() {
        report.epochs.push(done.finish(run.stats().wait_seconds));
    }
    report.stopped_early = !run.cursor().is_finished();
    if let Some(path) = &args.stats_json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Running totals of the epoch being trained.
#[derive(Debug)]
struct EpochStats {
    epoch: u64,
    started: Instant,
    wait_before: f64,
    samples: u64,
    loss_sum: f64,
}

impl EpochStats {
    fn start(epoch: u64, wait_before: f64) -> EpochStats {
        EpochStats { epoch, started: Instant::now(), wait_before, samples: 0, loss_sum: 0.0 }
    }

    fn finish(self, wait_now: f64) -> EpochReport {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let report = EpochReport {
            epoch: self.epoch,
            samples: self.samples,
            mean_loss: if self.samples == 0 { 0.0 } else { self.loss_sum / self.samples as f64 },
            samples_per_s: self.samples as f64 / seconds,
            wait_share: ((wait_now - self.wait_before) / seconds).min(1.0),
            rss_bytes: rss_bytes(),
        };
        println!(
            "epoch {}: {} samples, mean loss {:.4}, {:.0} samples/s, {:.0}% of the time waiting for data, RSS {:.1} MiB",
            report.epoch,
            report.samples,
            report.mean_loss,
            report.samples_per_s,
            report.wait_share * 100.0,
            report.rss_bytes as f64 / (1 << 20) as f64
        );
        report
    }
}
