//! The `train` command end to end (cargo feature `torch`): a real loader process, the demo
//! dataset, libtorch on the CPU. The CUDA tests are `#[ignore]`d, since CI has no GPU; on a
//! machine with one: `cargo test -p trainer-client --features torch -- --ignored`.
#![cfg(feature = "torch")]

use std::{path::Path, process::Command, time::Duration};

use tch::{Device, Kind, Tensor};
use trainer_client::{
    EpochPlan, Loaders, PlanSpec, Shuffle, StreamOptions, demo,
    tensor::{TensorConverter, host_tensor},
};

/// The binary's loader processes (one file, shared rather than copied).
#[path = "../src/bin/trainer-client/loaders.rs"]
#[allow(dead_code)]
mod loaders;
use loaders::LoaderProcess;

const SAMPLES: u64 = 20_000;

fn trainer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_trainer-client"))
}

async fn loader(dir: &Path) -> LoaderProcess {
    let binary = Path::new(env!("CARGO_BIN_EXE_trainer-client")).with_file_name("loader-server");
    assert!(binary.is_file(), "build the workspace first (cargo build --workspace): {} is missing", binary.display());
    let args = ["--listen", "127.0.0.1:0", "--dataset", &format!("chess={}", dir.display())].map(String::from);
    LoaderProcess::start(&binary, &args, Duration::from_secs(60)).await.expect("loader starts")
}

fn run(args: &[&str]) -> serde_json::Value {
    run_on("cpu", args)
}

fn run_on(device: &str, args: &[&str]) -> serde_json::Value {
    let stats = tempfile::NamedTempFile::new().expect("temp file");
    let output = trainer()
        .args(args)
        .args(["--device", device, "--stats-json", stats.path().to_str().expect("utf-8")])
        .output()
        .expect("trainer-client runs");
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&std::fs::read(stats.path()).expect("stats")).expect("json")
}

#[tokio::test]
async fn training_lowers_the_loss_and_keeps_memory_flat_across_epochs() {
    let data = tempfile::tempdir().expect("tempdir");
    demo::write_chess_dataset(data.path(), SAMPLES, 8_000).expect("demo data");
    let loader = loader(data.path()).await;
    let report = run(&["train", "--loader", &loader.addr, "--epochs", "3", "--batch-size", "128", "--lr", "0.002"]);
    let epochs = report["epochs"].as_array().expect("epochs");
    assert_eq!(epochs.len(), 3);
    let loss = |e: usize| epochs[e]["mean_loss"].as_f64().expect("loss");
    let rss = |e: usize| epochs[e]["rss_bytes"].as_u64().expect("rss") as f64;
    assert!(epochs.iter().all(|e| e["samples"] == SAMPLES), "{report}");
    // The result label is the sign of the material balance: learnable, so the loss must fall
    // well below chance (ln 3 = 1.10).
    assert!(loss(1) < loss(0) && loss(2) < 0.5, "losses {} {} {}", loss(0), loss(1), loss(2));
    // Epoch 0 warms up libtorch's allocator and the stream's buffers; after that the same
    // shapes reuse the same memory. 16 MiB is about 5 batches of boards plus allocator slack: a
    // leak of one batch per step (156 steps, 25 MiB) would exceed it.
    assert!(rss(2) <= rss(1) + 16.0 * 1048576.0, "RSS grew from {} to {} MiB", rss(1) / 1048576.0, rss(2) / 1048576.0);
}

/// The plan `train` and `stream` make for the demo data with the default full shuffle.
fn full_shuffle(batch_size: u64, seed: u64) -> PlanSpec {
    PlanSpec {
        num_samples: SAMPLES,
        batch_size,
        drop_last: false,
        shuffle: Shuffle::Full,
        seed,
        rank: 0,
        world_size: 1,
        block_len: 1,
        shuffle_window: 8,
        reshard: None,
    }
}

fn logged_indices(path: &Path) -> Vec<u64> {
    std::fs::read(path)
        .expect("indices log")
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8")) as u64)
        .collect()
}

#[tokio::test]
async fn a_run_stopped_mid_epoch_resumes_model_and_stream_with_exactly_the_remaining_samples() {
    let data = tempfile::tempdir().expect("tempdir");
    demo::write_chess_dataset(data.path(), SAMPLES, 8_000).expect("demo data");
    let loader = loader(data.path()).await;
    let work = tempfile::tempdir().expect("tempdir");
    let checkpoint = work.path().join("ckpt");
    let (first_log, second_log) = (work.path().join("first.bin"), work.path().join("second.bin"));
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let common = [
        "train",
        "--loader",
        &loader.addr,
        "--epochs",
        "1",
        "--batch-size",
        "100",
        "--seed",
        "3",
        "--checkpoint-every",
        "10",
    ];
    let with = |extra: &[String]| -> Vec<String> {
        common.iter().map(|s| s.to_string()).chain(extra.iter().cloned()).collect()
    };
    let first = with(&[
        "--checkpoint".into(),
        path(&checkpoint),
        "--max-batches".into(),
        "37".into(),
        "--indices-log".into(),
        path(&first_log),
    ]);
    let report = run(&first.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(report["stopped_early"], true);
    assert!(checkpoint.join("model.ot").is_file() && checkpoint.join("cursor.json").is_file());
    let second = with(&["--checkpoint".into(), path(&checkpoint), "--indices-log".into(), path(&second_log)]);
    let report = run(&second.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(report["resumed_from"], serde_json::json!([0, 37]), "{report}");
    let spec = full_shuffle(100, 3);
    let plan = EpochPlan::new(spec, 0).expect("plan");
    let epoch: Vec<u64> = (0..plan.num_batches()).flat_map(|b| plan.batch(b)).collect();
    let (first, rest) = (logged_indices(&first_log), logged_indices(&second_log));
    assert_eq!(first.len(), 3700);
    assert_eq!([first, rest].concat(), epoch, "the two runs together are the epoch, once, in order");
}

#[tokio::test]
#[ignore = "needs a CUDA device"]
async fn cuda_tensors_hold_exactly_the_received_bytes_while_copies_queue_behind_compute() {
    assert!(tch::Cuda::is_available(), "this test needs a CUDA device");
    let device = Device::Cuda(0);
    let data = tempfile::tempdir().expect("tempdir");
    demo::write_chess_dataset(data.path(), SAMPLES, 8_000).expect("demo data");
    let loader = loader(data.path()).await;
    let loaders =
        Loaders::connect(std::slice::from_ref(&loader.addr), StreamOptions::default()).await.expect("connects");
    let spec = full_shuffle(256, 1);
    let mut epoch = loaders.epoch("chess", spec, 0).expect("epoch");
    let converter = TensorConverter::new(device);
    let busy = Tensor::randn([4096, 4096], (Kind::Float, device));
    let mut kept = Vec::new();
    while let Some(batch) = epoch.next_batch().await.expect("batch") {
        // Queue device work ahead of each copy, so the copies lag far behind the host: a
        // page-locked block handed out again before its copy ran would send another batch's bytes.
        let _ = busy.matmul(&busy);
        let tensors = converter.convert(&batch).expect("converts");
        kept.push((batch, tensors));
    }
    assert_eq!(kept.iter().map(|(b, _)| b.indices.len() as u64).sum::<u64>(), SAMPLES);
    for (batch, tensors) in &kept {
        for field in &batch.fields {
            let on_device = tensors.get(&field.name).expect("field converted");
            assert_eq!(on_device.device(), device);
            let want = host_tensor(field).expect("host tensor");
            assert!(
                on_device.to_device(Device::Cpu).equal(&want),
                "field '{}' of batch {} differs on the device",
                field.name,
                batch.index
            );
        }
    }
}

#[tokio::test]
#[ignore = "needs a CUDA device"]
async fn training_on_cuda_lowers_the_loss() {
    assert!(tch::Cuda::is_available(), "this test needs a CUDA device");
    let data = tempfile::tempdir().expect("tempdir");
    demo::write_chess_dataset(data.path(), SAMPLES, 8_000).expect("demo data");
    let loader = loader(data.path()).await;
    let report =
        run_on("cuda", &["train", "--loader", &loader.addr, "--epochs", "3", "--batch-size", "128", "--lr", "0.002"]);
    assert_eq!(report["device"], "Cuda(0)", "{report}");
    let epochs = report["epochs"].as_array().expect("epochs");
    let loss = |e: usize| epochs[e]["mean_loss"].as_f64().expect("loss");
    assert!(epochs.iter().all(|e| e["samples"] == SAMPLES), "{report}");
    assert!(loss(1) < loss(0) && loss(2) < 0.5, "losses {} {} {}", loss(0), loss(1), loss(2));
}
