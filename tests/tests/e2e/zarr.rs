//! End-to-end: Zarr arrays and groups written by zarr-python (format 2 and 3, every codec users
//! use, sharded and not, chunked along any axis), served by real loaders.

use std::collections::BTreeMap;

use conveyor_proto::v1::{BatchRequest, batch_error::Kind, loader_client::LoaderClient};
use conveyor_tests::{InProcessLoader, run_python, start_loader, trainer, zarr_fixtures};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn cases(dir: &std::path::Path) -> serde_json::Map<String, serde_json::Value> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cases.json")).expect("cases.json")).expect("json");
    json.as_object().expect("object").clone()
}

/// Streams one epoch of `dataset` through the CLI; returns the stats JSON and numpy's check of
/// the dump against zarr-python's reading of the source.
fn stream(addr: &str, dataset: &str, source: &str, extra: &[&str]) -> (serde_json::Value, serde_json::Value) {
    let out = tempfile::tempdir().expect("tempdir");
    let dump = out.path().join("dump");
    let stats = out.path().join("stats.json");
    let (dump_arg, stats_arg) = (dump.to_str().expect("utf-8"), stats.to_str().expect("utf-8"));
    let mut args =
        vec!["stream", "--loader", addr, "--dataset", dataset, "--dump", dump_arg, "--stats-json", stats_arg];
    args.extend_from_slice(extra);
    let output = trainer(&args).expect("trainer-client runs");
    assert!(output.status.success(), "{dataset} {extra:?}: {}", String::from_utf8_lossy(&output.stderr));
    let check = run_python("check_dump.py", &[std::path::Path::new(source), &dump]).expect("dump matches zarr-python");
    let stats = serde_json::from_slice(&std::fs::read(&stats).expect("stats")).expect("json");
    (stats, serde_json::from_str(&check).expect("json"))
}

/// [`stream`] on a blocking thread, so a loader in this test's runtime keeps serving.
async fn stream_off_runtime(
    addr: &str,
    dataset: &str,
    source: &str,
    extra: &[&str],
) -> (serde_json::Value, serde_json::Value) {
    let (addr, dataset, source) = (addr.to_owned(), dataset.to_owned(), source.to_owned());
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        stream(&addr, &dataset, &source, &extra)
    })
    .await
    .expect("stream thread")
}

#[tokio::test]
async fn every_format_codec_and_chunking_round_trips_bit_exactly_under_every_shuffle() {
    let fixtures = zarr_fixtures();
    let cases: BTreeMap<String, serde_json::Value> =
        cases(fixtures.path()).into_iter().filter(|(_, c)| c.get("corrupt_rows").is_none()).collect();
    assert!(cases.len() >= 15, "{}", cases.len());
    let specs: Vec<String> =
        cases.iter().map(|(name, c)| format!("{name}={}", c["path"].as_str().expect("path"))).collect();
    let loader = start_loader(&specs, &[]).await.expect("loader");
    for (name, case) in &cases {
        let path = case["path"].as_str().expect("path");
        let fields = case["fields"].as_object().expect("fields").len();
        for shuffle in [["--shuffle", "none"], ["--shuffle", "full"], ["--shuffle", "block"]] {
            let (stats, check) = stream(
                &loader.addr,
                name,
                path,
                &[&shuffle[..], &["--batch-size", "9", "--shuffle-window", "3"]].concat(),
            );
            // 203 samples: every one exactly once, every field bit-exact.
            assert_eq!(
                (check["rows"].as_u64(), check["distinct"].as_u64()),
                (Some(203), Some(203)),
                "{name} {shuffle:?}: {check}"
            );
            assert_eq!(check["fields"].as_object().map(|f| f.len()), Some(fields), "{name}: {check}");
            assert!(stats["decoded_bytes"].as_u64().is_some(), "{stats}");
        }
    }
}

#[tokio::test]
async fn block_shuffle_decodes_each_chunk_about_once_where_full_shuffle_thrashes_a_small_cache() {
    let fixtures = zarr_fixtures();
    let path = fixtures.path().join("v3-zstd");
    // 203 rows in chunks of 16 rows x 120 bytes = 1920 bytes; the cache holds 5 chunks.
    let mut config = loader_server::Config::for_datasets([format!("eeg={}", path.display())]);
    config.chunk_cache_bytes = 5 * 1920;
    let loader = InProcessLoader::start(config).await;
    let common = ["--batch-size", "8", "--prefetch", "1", "--shuffle-window", "2"];
    let (block, check) = stream_off_runtime(
        &loader.addr,
        "eeg",
        path.to_str().expect("utf-8"),
        &[&common[..], &["--shuffle", "block"]].concat(),
    )
    .await;
    assert_eq!(check["distinct"].as_u64(), Some(203));
    let block_amplification = block["read_amplification"].as_f64().expect("number");
    let (full, _) = stream_off_runtime(
        &loader.addr,
        "eeg",
        path.to_str().expect("utf-8"),
        &[&common[..], &["--shuffle", "full"]].concat(),
    )
    .await;
    let full_amplification = full["read_amplification"].as_f64().expect("number");
    assert!((1.0..1.1).contains(&block_amplification), "block: {block_amplification}");
    assert!(full_amplification > 2.0, "full shuffle over a 5-chunk cache re-decodes: {full_amplification}");
    let cache = loader.state.cache().stats();
    assert!(cache.peak_bytes <= 5 * 1920, "the cache held {} bytes over its budget", cache.peak_bytes);
    assert!(cache.peak_bytes >= 4 * 1920, "the cache was used: {cache:?}");
    let metrics = conveyor_tests::scrape_metrics(&loader).await;
    assert!(metrics.contains("conveyor_loader_chunk_cache_budget_bytes 9600"), "{metrics}");
    assert!(metrics.contains("conveyor_loader_dataset_decoded_bytes_total{dataset=\"eeg\"}"), "{metrics}");
    loader.stop().await;
}

#[tokio::test]
async fn two_loaders_under_block_shuffle_decode_each_chunk_about_once_between_them() {
    let fixtures = zarr_fixtures();
    let path = fixtures.path().join("aligned-4096");
    // 4096 rows in 64 chunks of 64; a window of 2 chunks holds 2 batches of 64, and 4 batches
    // in flight reach both loaders. Sent to whichever loader is least busy, the two batches of
    // a window would often make both loaders decode the window's chunks.
    // Each cache holds 8 of the 2 KiB chunks, so every epoch decodes again; three epochs, so the
    // second loader is serving well before the end however late it connects.
    let mut config = loader_server::Config::for_datasets([format!("eeg={}", path.display())]);
    config.chunk_cache_bytes = 8 * 64 * 8 * 4;
    let first = InProcessLoader::start(config.clone()).await;
    let second = InProcessLoader::start(config).await;
    let both = format!("{},{}", first.addr, second.addr);
    let args =
        ["--batch-size", "64", "--prefetch", "4", "--shuffle", "block", "--shuffle-window", "2", "--epochs", "3"];
    let (stats, check) = stream_off_runtime(&both, "eeg", path.to_str().expect("utf-8"), &args).await;
    assert_eq!((check["rows"].as_u64(), check["distinct"].as_u64()), (Some(3 * 4096), Some(4096)), "{check}");
    let replicas = stats["replicas"].as_object().expect("replicas");
    assert!(
        replicas.values().all(|r| r["batches"].as_u64().is_some_and(|n| n >= 8)),
        "both loaders served batches: {stats}"
    );
    let amplification = stats["read_amplification"].as_f64().expect("number");
    // Slightly under 1 is possible: a chunk can still be cached when the next epoch needs it.
    assert!((0.9..1.1).contains(&amplification), "two loaders decoded chunks twice: {amplification}");
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_corrupt_or_missing_chunk_fails_only_the_batches_that_need_it() {
    let fixtures = zarr_fixtures();
    let cases = cases(fixtures.path());
    let specs = ["corrupt", "missing"].map(|name| format!("{name}={}", cases[name]["path"].as_str().expect("path")));
    let loader = InProcessLoader::start(loader_server::Config::for_datasets(specs)).await;
    let mut client = LoaderClient::connect(format!("http://{}", loader.addr)).await.expect("connect");
    for (dataset, bad_row, rows) in [("corrupt", 33, "32..48"), ("missing", 50, "48..64")] {
        let (requests_tx, requests_rx) = mpsc::channel(8);
        let mut responses = client.stream_batches(ReceiverStream::new(requests_rx)).await.expect("stream").into_inner();
        let requests = [vec![0, 1, 100], vec![5, bad_row, 7], vec![202, 150], vec![bad_row + 1]];
        for (id, indices) in requests.into_iter().enumerate() {
            requests_tx
                .send(BatchRequest { batch_id: id as u64, dataset: dataset.into(), indices, ..Default::default() })
                .await
                .expect("send");
        }
        let mut answers = BTreeMap::new();
        while answers.len() < 4 {
            let answer = responses.next().await.expect("an answer per request").expect("the stream stays up");
            answers.insert(answer.batch_id, answer);
        }
        for ok in [0, 2] {
            assert!(answers[&ok].error.is_none(), "{dataset} batch {ok}: {:?}", answers[&ok].error);
            assert_eq!(answers[&ok].tensors[0].data.len(), answers[&ok].indices.len() * 120);
        }
        for bad in [1, 3] {
            let error = answers[&bad].error.clone().expect("the batch needing the bad chunk fails");
            assert_eq!(error.kind(), Kind::ReadFailed);
            for needle in [format!("dataset '{dataset}'"), format!("field '{dataset}'"), format!("rows {rows}")] {
                assert!(error.message.contains(&needle), "{dataset}: '{needle}' missing from: {}", error.message);
            }
        }
    }
    let metrics = conveyor_tests::scrape_metrics(&loader).await;
    assert!(metrics.contains("conveyor_loader_request_errors_total{kind=\"read_failed\"} 4"), "{metrics}");
    loader.stop().await;
}

#[test]
fn bad_zarr_inputs_stop_the_loader_with_a_message_naming_the_array() {
    let fixtures = zarr_fixtures();
    assert!(conveyor_tests::assert_loader_rejects_each_bad_case(fixtures.path()) >= 2);
}

/// A valid zstd frame of `len` copies of one byte, declaring its size: RLE blocks of 128 KiB,
/// 4 bytes each, so 3 GiB take 98 KB.
fn zstd_rle_frame(len: u64) -> Vec<u8> {
    const BLOCK: u64 = 128 << 10;
    let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0xe0]; // magic; 8-byte content size, single segment
    frame.extend_from_slice(&len.to_le_bytes());
    let mut left = len;
    while left > 0 {
        let size = left.min(BLOCK);
        left -= size;
        let header = u32::from(left == 0) | (1 << 1) | ((size as u32) << 3); // last flag, RLE, size
        frame.extend_from_slice(&header.to_le_bytes()[..3]);
        frame.push(7);
    }
    frame
}

#[tokio::test]
async fn a_zstd_chunk_declaring_gigabytes_fails_its_batches_without_being_decoded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = dir.path().join("bomb");
    std::fs::create_dir_all(array.join("c/0")).expect("dirs");
    std::fs::create_dir_all(array.join("c/1")).expect("dirs");
    let metadata = serde_json::json!({
        "zarr_format": 3, "node_type": "array", "shape": [16, 4], "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [8, 4]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [{"name": "bytes"}, {"name": "zstd", "configuration": {"level": 0, "checksum": false}}],
    });
    std::fs::write(array.join("zarr.json"), metadata.to_string()).expect("metadata");
    let bomb = zstd_rle_frame(3 << 30);
    assert!(bomb.len() < 100_000, "{}", bomb.len());
    std::fs::write(array.join("c/0/0"), &bomb).expect("bomb chunk");
    std::fs::write(array.join("c/1/0"), zstd::bulk::compress(&[5u8; 32], 3).expect("zstd")).expect("good chunk");

    let loader = start_loader(&[format!("bomb={}", array.display())], &[]).await.expect("loader starts");
    let mut client = LoaderClient::connect(format!("http://{}", loader.addr)).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses =
        client.stream_batches(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("stream").into_inner();
    tx.send(BatchRequest { batch_id: 1, dataset: "bomb".into(), indices: vec![1], ..Default::default() })
        .await
        .expect("send");
    let failed = responses.message().await.expect("answer").expect("response");
    let error = failed.error.expect("the bomb chunk's batch fails");
    assert_eq!(error.kind(), Kind::ReadFailed);
    assert!(
        error.message.contains("c/0/0") && error.message.contains("declare 3221225472 decoded bytes"),
        "{}",
        error.message
    );
    tx.send(BatchRequest { batch_id: 2, dataset: "bomb".into(), indices: vec![9], ..Default::default() })
        .await
        .expect("send");
    let served = responses.message().await.expect("answer").expect("the loader lives on");
    assert!(served.error.is_none());
    assert_eq!(served.tensors[0].data.as_ref(), &[5u8; 4]);
    // Peak resident memory of the loader stayed far below the 3 GiB the chunk declares.
    let pid = loader.child.id().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    assert!(peak_kb < 300 << 10, "the loader peaked at {peak_kb} kB");
}

#[test]
fn refused_zarr_metadata_is_reported_with_its_real_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let array = |data_type: &str, fill: serde_json::Value, chunk_shape: [u64; 2]| {
        serde_json::json!({
            "zarr_format": 3, "node_type": "array", "shape": [16, 4], "data_type": data_type,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk_shape}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": fill, "codecs": [{"name": "bytes"}],
        })
        .to_string()
    };
    let write = |rel: &str, text: String| {
        let path = dir.path().join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dirs");
        std::fs::write(path, text).expect("write");
    };
    write("complex/zarr.json", array("complex64", serde_json::json!([0.0, 0.0]), [8, 4]));
    write("zero-chunk/zarr.json", array("uint8", serde_json::json!(0), [0, 3]));
    write(
        "object-v2/.zarray",
        r#"{"zarr_format": 2, "shape": [4], "chunks": [2], "dtype": "|O", "compressor": null, "fill_value": 0, "order": "C", "filters": null}"#.into(),
    );
    write("group/zarr.json", r#"{"zarr_format": 3, "node_type": "group"}"#.into());
    write("group/broken/zarr.json", array("uint8", serde_json::json!(0), [0, 3]));
    let cases = [
        ("complex", vec!["unsupported data type complex64"]),
        ("zero-chunk", vec!["invalid array metadata", "nonzero"]),
        ("object-v2", vec!["unsupported data type", "|O"]),
        ("group", vec!["group/broken", "invalid array metadata", "nonzero"]),
    ];
    for (case, needles) in cases {
        let output = std::process::Command::new(conveyor_tests::binary("loader-server"))
            .args(["--listen", "127.0.0.1:0", "--dataset", &format!("t={}", dir.path().join(case).display())])
            .output()
            .expect("loader-server runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{case}: started");
        for needle in needles {
            assert!(stderr.contains(needle), "{case}: stderr lacks '{needle}': {stderr}");
        }
        assert!(
            !stderr.contains("expected string \"group\"") && !stderr.contains("group metadata is missing"),
            "{case}: {stderr}"
        );
    }
}
