//! End-to-end: a derived dataset (a built-in pipeline) streamed by the Rust client from two
//! loader processes: the same run gives the same bytes per sample from either replica, and an
//! epoch with another seed gives other bytes.

use std::{collections::BTreeMap, path::Path, time::Duration};

use conveyor_proto::DType;
use conveyor_tests::{LoaderProcess, start_loader, trainer};
use trainer_client::{Loaders, PlanSpec, Shuffle, StreamOptions, demo};

const SAMPLES: u64 = 3_000;
const PIPELINE: &str = "aug=chess:board: random_crop(6, 5) | flip(axis=-1, p=0.5) | cast(float32, scale=0.5, offset=1)";

async fn loader(dir: &Path) -> LoaderProcess {
    start_loader(&[format!("chess={}", dir.display())], &["--pipeline", PIPELINE]).await.expect("loader starts")
}

/// Every sample's `board` bytes of one epoch streamed from `addr`.
async fn epoch_bytes(addr: &str, seed: u64) -> BTreeMap<u64, Vec<u8>> {
    let options = StreamOptions { unavailable_timeout: Duration::from_secs(30), ..StreamOptions::default() };
    let loaders = Loaders::connect(&[addr.to_owned()], options).await.expect("connect");
    let spec = PlanSpec {
        num_samples: SAMPLES,
        batch_size: 64,
        drop_last: false,
        shuffle: Shuffle::Full,
        seed,
        rank: 0,
        world_size: 1,
        block_len: 1,
        shuffle_window: 1,
        reshard: None,
    };
    let mut epoch = loaders.epoch("aug", spec, 2).expect("epoch");
    let mut samples = BTreeMap::new();
    while let Some(batch) = epoch.next_batch().await.expect("batch") {
        let board = batch.field("board").expect("board field");
        assert_eq!(board.dtype, DType::Float32);
        assert_eq!(board.shape[1..], [12, 6, 5]);
        let per_sample = board.data.len() / batch.indices.len();
        for (row, &index) in batch.indices.iter().enumerate() {
            let bytes = board.data[row * per_sample..(row + 1) * per_sample].to_vec();
            assert!(samples.insert(index, bytes).is_none(), "sample {index} twice");
        }
    }
    samples
}

#[tokio::test]
async fn a_pipeline_gives_the_same_bytes_from_every_replica_and_depends_on_the_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    demo::write_chess_dataset(dir.path(), SAMPLES, 1_000).expect("demo data");
    let (one, two) = (loader(dir.path()).await, loader(dir.path()).await);

    let info = trainer(&["info", "--loader", &one.addr]).expect("info");
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains("derived on the loader: chess | pipeline board: random_crop(6, 5)"), "{text}");

    let first = epoch_bytes(&one.addr, 5).await;
    let second = epoch_bytes(&two.addr, 5).await;
    assert_eq!(first.len() as u64, SAMPLES, "every sample once");
    assert!(first == second, "both replicas give the same bytes for every sample");
    let reseeded = epoch_bytes(&one.addr, 6).await;
    let differing = first.iter().filter(|(i, bytes)| reseeded[*i] != **bytes).count();
    assert!(differing > SAMPLES as usize / 2, "another seed augments most samples differently: {differing}");
}
