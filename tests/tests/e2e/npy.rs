//! End-to-end: `.npy` fixtures written by numpy, served by real loaders, streamed by the client.

use std::{collections::BTreeSet, path::Path};

use conveyor_proto::v1::{BatchRequest, batch_error::Kind, loader_client::LoaderClient};
use conveyor_tests::{InProcessLoader, npy_fixtures, run_python, scrape_metrics, start_loader, trainer};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic_health::pb::health_check_response::ServingStatus;
use trainer_client::{Loaders, PlanSpec, Shuffle, StreamOptions};

fn spec_of(name: &str, dir: &Path) -> String {
    format!("{name}={}", dir.display())
}

/// Streams one epoch through the CLI with `--dump`, then has numpy compare every row bit for bit.
fn stream_and_check(addr: &str, dataset: &str, source: &Path, extra: &[&str]) -> serde_json::Value {
    let out = tempfile::tempdir().expect("tempdir");
    let dump = out.path().join("dump");
    let dump_arg = dump.to_str().expect("utf-8 path");
    let mut args = vec!["stream", "--loader", addr, "--dataset", dataset, "--dump", dump_arg];
    args.extend_from_slice(extra);
    let output = trainer(&args).expect("trainer-client runs");
    assert!(output.status.success(), "stream failed: {}", String::from_utf8_lossy(&output.stderr));
    let report = run_python("check_dump.py", &[source, &dump]).expect("dump matches the source bit for bit");
    serde_json::from_str(&report).expect("check_dump prints JSON")
}

#[tokio::test]
async fn every_dtype_and_shard_layout_round_trips_bit_exactly() {
    let fixtures = npy_fixtures();
    let dtypes = fixtures.path().join("dtypes");
    let shards = fixtures.path().join("shards");
    let loader = start_loader(&[spec_of("dtypes", &dtypes), spec_of("shards", &shards)], &[]).await.expect("loader");
    for shuffle in ["none", "full"] {
        let report = stream_and_check(&loader.addr, "dtypes", &dtypes, &["--batch-size", "7", "--shuffle", shuffle]);
        assert_eq!(report["rows"], 53, "{shuffle}: {report}");
        assert_eq!(report["distinct"], 53, "{shuffle}: {report}");
        // 12 little-endian + 9 big-endian (multi-byte types) + scalar + v2 + v3 files.
        assert_eq!(report["fields"].as_object().map(|f| f.len()), Some(24), "{report}");
        let report = stream_and_check(&loader.addr, "shards", &shards, &["--batch-size", "6", "--shuffle", shuffle]);
        assert_eq!((report["rows"].as_u64(), report["distinct"].as_u64()), (Some(40), Some(40)), "{report}");
    }
}

#[tokio::test]
async fn data_parallel_ranks_split_the_epoch_evenly_and_disjointly() {
    let fixtures = npy_fixtures();
    let dtypes = fixtures.path().join("dtypes");
    let loader = start_loader(&[spec_of("dtypes", &dtypes)], &[]).await.expect("loader");
    let mut seen = Vec::new();
    for rank in ["0", "1", "2"] {
        let extra = ["--batch-size", "4", "--rank", rank, "--world-size", "3", "--drop-last", "--seed", "5"];
        let report = stream_and_check(&loader.addr, "dtypes", &dtypes, &extra);
        // 53 samples over 3 ranks with drop-last: 17 each, 4 whole batches of 4 = 16 rows.
        assert_eq!(report["rows"], 16, "rank {rank}: {report}");
        seen.push(report["distinct"].as_u64());
    }
    assert_eq!(seen, vec![Some(16); 3]);
}

/// One epoch's indices; the connections come back for the next call.
async fn epoch_indices(loaders: &mut Option<Loaders>, dataset: &str, spec: &PlanSpec, epoch: u64) -> Vec<u64> {
    let pool = loaders.take().expect("connected");
    let mut stream = pool.epoch(dataset, spec.clone(), epoch).expect("epoch");
    let mut indices = Vec::new();
    while let Some(batch) = stream.next_batch().await.expect("batch") {
        indices.extend(batch.indices);
    }
    *loaders = Some(stream.into_loaders());
    indices
}

#[tokio::test]
async fn shuffled_epochs_are_deterministic_permutations() {
    let fixtures = npy_fixtures();
    let loader = start_loader(&[spec_of("d", &fixtures.path().join("dtypes"))], &[]).await.expect("loader");
    let mut loaders =
        Some(Loaders::connect(std::slice::from_ref(&loader.addr), StreamOptions::default()).await.expect("connect"));
    let spec = PlanSpec {
        num_samples: 53,
        batch_size: 5,
        drop_last: false,
        shuffle: Shuffle::Full,
        seed: 11,
        rank: 0,
        world_size: 1,
        block_len: 1,
        shuffle_window: 1,
        reshard: None,
    };
    let first = epoch_indices(&mut loaders, "d", &spec, 0).await;
    let again = epoch_indices(&mut loaders, "d", &spec, 0).await;
    let next_epoch = epoch_indices(&mut loaders, "d", &spec, 1).await;
    let other_seed = epoch_indices(&mut loaders, "d", &PlanSpec { seed: 12, ..spec.clone() }, 0).await;
    let mut sorted = first.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..53).collect::<Vec<u64>>(), "an epoch is a permutation");
    assert_ne!(first, (0..53).collect::<Vec<u64>>(), "full shuffle changes the order");
    assert_eq!(first, again, "same seed and epoch, same order");
    assert_ne!(first, next_epoch, "another epoch, another order");
    assert_ne!(first, other_seed, "another seed, another order");
    let unshuffled = epoch_indices(&mut loaders, "d", &PlanSpec { shuffle: Shuffle::None, ..spec }, 0).await;
    assert_eq!(unshuffled, (0..53).collect::<Vec<u64>>());
}

#[test]
fn rejected_inputs_stop_the_loader_with_a_message_naming_the_file() {
    let fixtures = npy_fixtures();
    assert!(conveyor_tests::assert_loader_rejects_each_bad_case(fixtures.path()) >= 9);
}

fn request(batch_id: u64, dataset: &str, indices: Vec<u64>) -> BatchRequest {
    BatchRequest { batch_id, dataset: dataset.into(), indices, ..Default::default() }
}

#[tokio::test]
async fn bad_requests_get_named_errors_and_the_stream_and_server_carry_on() {
    let fixtures = npy_fixtures();
    let mut config = loader_server::Config::for_datasets([spec_of("shards", &fixtures.path().join("shards"))]);
    config.max_batch_samples = 16;
    let loader = InProcessLoader::start(config).await;
    let mut client = LoaderClient::connect(format!("http://{}", loader.addr)).await.expect("connect");
    let (requests_tx, requests_rx) = mpsc::channel(8);
    let mut responses = client.stream_batches(ReceiverStream::new(requests_rx)).await.expect("stream").into_inner();
    let plan = [
        request(1, "shards", vec![0, 39, 7]),
        request(2, "shards", vec![3, 40]),
        request(3, "nope", vec![1]),
        request(4, "shards", (0..17).collect()),
        request(5, "shards", vec![]),
        request(6, "shards", vec![8, 9]),
    ];
    for r in plan {
        requests_tx.send(r).await.expect("send");
    }
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < 6 {
        let response = responses.next().await.expect("an answer per request").expect("stream stays up");
        answers.insert(response.batch_id, response);
    }
    let ok = |id: u64| {
        let r = &answers[&id];
        assert!(r.error.is_none(), "batch {id}: {:?}", r.error);
        r.tensors.iter().map(|t| (t.field.clone(), t.shape.clone(), t.data.len())).collect::<Vec<_>>()
    };
    assert_eq!(ok(1), vec![("x".into(), vec![3, 5], 60), ("y".into(), vec![3], 24)]);
    let y: Vec<i64> =
        answers[&1].tensors[1].data.chunks(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect();
    assert_eq!(y, vec![0, 39, 7]);
    let error = |id: u64| answers[&id].error.clone().expect("an error");
    let e = error(2);
    assert_eq!(
        (e.kind(), e.message.contains("40") && e.message.contains("'shards'")),
        (Kind::IndexOutOfRange, true),
        "{e:?}"
    );
    let e = error(3);
    assert_eq!((e.kind(), e.message.contains("'nope'") && e.message.contains("shards")), (Kind::UnknownDataset, true));
    let e = error(4);
    assert_eq!((e.kind(), e.message.contains("16 samples")), (Kind::BatchTooLarge, true), "{e:?}");
    assert_eq!(error(5).kind(), Kind::EmptyBatch);
    assert_eq!(ok(6).len(), 2);
    // The same stream still serves after the errors.
    requests_tx.send(request(7, "shards", vec![5])).await.expect("send");
    let response = responses.next().await.expect("answer").expect("ok");
    assert_eq!((response.batch_id, response.error.is_none()), (7, true));
    assert_eq!(loader.health().await, ServingStatus::Serving);
    let metrics = scrape_metrics(&loader).await;
    for line in [
        "conveyor_loader_batches_served_total 3",
        "conveyor_loader_request_errors_total{kind=\"index_out_of_range\"} 1",
        "conveyor_loader_request_errors_total{kind=\"unknown_dataset\"} 1",
        "conveyor_loader_request_errors_total{kind=\"batch_too_large\"} 1",
        "conveyor_loader_request_errors_total{kind=\"empty_batch\"} 1",
        "conveyor_loader_bytes_served_total 168", // 6 samples x (5 x f32 + i64)
        "conveyor_loader_active_streams 1",
    ] {
        assert!(metrics.contains(line), "metrics lack '{line}':\n{metrics}");
    }
    drop(requests_tx);
    assert!(responses.next().await.is_none(), "the stream ends when the client closes its side");
    loader.stop().await;
}

#[tokio::test]
async fn streams_over_the_limit_are_refused_with_resource_exhausted() {
    let fixtures = npy_fixtures();
    let mut config = loader_server::Config::for_datasets([spec_of("shards", &fixtures.path().join("shards"))]);
    config.max_streams = 2.try_into().expect("nonzero");
    let loader = InProcessLoader::start(config).await;
    let mut client = LoaderClient::connect(format!("http://{}", loader.addr)).await.expect("connect");
    let mut open = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = mpsc::channel(1);
        let responses = client.stream_batches(ReceiverStream::new(rx)).await.expect("within the limit").into_inner();
        open.push((tx, responses));
    }
    for _ in 0..3 {
        let (_tx, rx) = mpsc::channel::<BatchRequest>(1);
        let refused = client.stream_batches(ReceiverStream::new(rx)).await.expect_err("over the limit");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--max-streams"), "{}", refused.message());
    }
    assert_eq!(loader.health().await, ServingStatus::Serving);
    let (tx, responses) = &mut open[0];
    tx.send(request(1, "shards", vec![1, 2])).await.expect("send");
    let answer = responses.next().await.expect("answer").expect("ok");
    assert!(answer.error.is_none());
    // Closing a stream frees its place.
    open.pop();
    let mut indices = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (tx, rx) = mpsc::channel(1);
        match client.stream_batches(ReceiverStream::new(rx)).await {
            Ok(response) => {
                tx.send(request(2, "shards", vec![3])).await.expect("send");
                let mut responses = response.into_inner();
                indices.extend(responses.next().await.expect("answer").expect("ok").indices);
                break;
            }
            // The server notices the closed stream asynchronously; retry until it has.
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                assert!(tokio::time::Instant::now() < deadline, "the freed stream place never came back");
                tokio::task::yield_now().await;
            }
            Err(status) => panic!("unexpected {status}"),
        }
    }
    assert_eq!(indices, BTreeSet::from([3]));
    drop(open);
    loader.stop().await;
}

#[tokio::test]
async fn idle_streams_of_one_connection_cannot_lock_another_connection_out() {
    let fixtures = npy_fixtures();
    let mut config = loader_server::Config::for_datasets([spec_of("shards", &fixtures.path().join("shards"))]);
    config.max_streams = 4.try_into().expect("nonzero");
    let loader = InProcessLoader::start(config).await;
    // One client takes every slot with streams that asked for one batch each and then idle.
    let mut hog = LoaderClient::connect(format!("http://{}", loader.addr)).await.expect("connect");
    let mut idle = Vec::new();
    for batch_id in 0..4 {
        let (tx, rx) = mpsc::channel(1);
        let mut responses = hog.stream_batches(ReceiverStream::new(rx)).await.expect("within the limit").into_inner();
        tx.send(request(batch_id, "shards", vec![1])).await.expect("send");
        assert!(responses.next().await.expect("answer").expect("ok").error.is_none());
        idle.push((tx, responses));
    }
    let (_tx, rx) = mpsc::channel::<BatchRequest>(1);
    let refused = hog.stream_batches(ReceiverStream::new(rx)).await.expect_err("its own fifth");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    // Another connection is served at once, in the slot of one of the hog's idle streams.
    let mut other = LoaderClient::connect(format!("http://{}", loader.addr)).await.expect("connect");
    let (tx, rx) = mpsc::channel(1);
    let mut responses = other.stream_batches(ReceiverStream::new(rx)).await.expect("a fair share").into_inner();
    tx.send(request(9, "shards", vec![3])).await.expect("send");
    assert_eq!(responses.next().await.expect("answer").expect("ok").indices, vec![3]);
    // The hog's evicted stream ended with UNAVAILABLE, saying why.
    let mut ended = Vec::new();
    for (_, responses) in &mut idle {
        if let Ok(Some(Err(status))) =
            tokio::time::timeout(std::time::Duration::from_millis(200), responses.next()).await
        {
            ended.push(status);
        }
    }
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].code(), tonic::Code::Unavailable);
    assert!(ended[0].message().contains("shared fairly between connections"), "{}", ended[0].message());
    loader.stop().await;
}

#[tokio::test]
async fn a_file_truncated_or_edited_while_served_fails_its_batches_and_the_loader_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    trainer_client::demo::write_chess_dataset(dir.path(), 3_000, 1_000).expect("demo data");
    let loader = InProcessLoader::start(loader_server::Config::for_datasets([spec_of("chess", dir.path())])).await;
    let mut client = LoaderClient::connect(format!("http://{}", loader.addr)).await.expect("connect");
    let (requests_tx, requests_rx) = mpsc::channel(8);
    let mut responses = client.stream_batches(ReceiverStream::new(requests_rx)).await.expect("stream").into_inner();
    let mut ask = async |batch_id: u64, index: u64| {
        requests_tx.send(request(batch_id, "chess", vec![index])).await.expect("send");
        responses.next().await.expect("an answer").expect("the stream stays up")
    };
    assert!(ask(1, 1_500).await.error.is_none());

    // Cut shard 1 of `board` to 1000 bytes: its pages past that would raise SIGBUS.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("board-00001.npy"))
        .expect("open")
        .set_len(1_000)
        .expect("truncate");
    let failed = ask(2, 1_500).await;
    let error = failed.error.expect("a batch over the truncated shard fails");
    assert_eq!(error.kind(), Kind::ReadFailed);
    assert!(error.message.contains("board-00001.npy") && error.message.contains("shrank"), "{}", error.message);

    // Edit shard 2 in place, size unchanged.
    let shard2 = dir.path().join("board-00002.npy");
    let file = std::fs::OpenOptions::new().write(true).open(&shard2).expect("open");
    std::os::unix::fs::FileExt::write_at(&file, &[1], 4_000).expect("edit");
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(2)).expect("mtime");
    let edited = ask(3, 2_500).await.error.expect("a batch over the edited shard fails");
    assert!(
        edited.message.contains("board-00002.npy") && edited.message.contains("modified in place"),
        "{}",
        edited.message
    );

    // Rows in the untouched shard are still served, on the same stream.
    let fine = ask(4, 5).await;
    assert!(fine.error.is_none() && fine.indices == vec![5]);
    drop(requests_tx);
    loader.stop().await;
}

#[test]
fn a_file_that_cannot_be_mapped_is_refused_not_read_into_memory() {
    // 2 GB (sparse) under a 500 MB address-space limit (room for the debug binary to start):
    // the map fails; the old fallback read the whole file into memory.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.npy");
    let mut bytes = conveyor_proto::npy_header(conveyor_proto::DType::Float32, &[500_000, 1_000]);
    let header_len = bytes.len() as u64;
    std::io::Write::write_all(&mut std::fs::File::create(&path).expect("create"), &bytes).expect("header");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(header_len + 2_000_000_000)
        .expect("size");
    bytes.clear();
    let script = format!(
        "ulimit -v 500000 && exec {} --listen 127.0.0.1:0 --dataset x={}",
        conveyor_tests::binary("loader-server").display(),
        dir.path().display()
    );
    let output = std::process::Command::new("bash").args(["-c", &script]).output().expect("bash");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("x.npy") && stderr.contains("cannot memory-map it"), "{stderr}");
    assert!(stderr.contains("never by reading them whole into memory"), "{stderr}");
}
