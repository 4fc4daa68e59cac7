//! End-to-end: clients that stop reading, idle, never finish the handshake, or send requests
//! that cannot be decoded; none of them may starve other clients or leave a stream unanswered.

use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use conveyor_proto::v1::{BatchRequest, BatchResponse, loader_client::LoaderClient};
use conveyor_tests::InProcessLoader;
use tokio::io::AsyncReadExt;
use tokio_stream::wrappers::ReceiverStream;
use trainer_client::{Loaders, PlanSettings, RunSpec, Shuffle, StreamOptions, demo};

const SAMPLES: u64 = 4_000;

fn chess() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    demo::write_chess_dataset(dir.path(), SAMPLES, 1_000).expect("demo data");
    dir
}

fn config(data: &std::path::Path, extra: &[&str]) -> loader_server::Config {
    let mut args = vec!["loader-server".to_owned(), "--listen".into(), "127.0.0.1:0".into()];
    args.push("--dataset".into());
    args.push(format!("chess={}", data.display()));
    args.extend(extra.iter().map(|a| a.to_string()));
    <loader_server::Config as clap::Parser>::parse_from(args)
}

/// Opens a stream with a small HTTP/2 window (so the loader's side backs up at once) and sends
/// 32 requests for 500 kB batches; returns the request sender and the unread responses.
async fn flood(loader: &InProcessLoader) -> (tokio::sync::mpsc::Sender<BatchRequest>, tonic::Streaming<BatchResponse>) {
    let per_sample = loader.state.datasets().next().expect("dataset").bytes_per_sample() as u64;
    let batch = 500_000 / per_sample;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", loader.addr))
        .expect("uri")
        .initial_stream_window_size(65_535)
        .connect()
        .await
        .expect("connect");
    let mut client = LoaderClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    for batch_id in 0..32 {
        let indices = (0..batch).map(|i| (batch_id * batch + i) % SAMPLES).collect();
        tx.send(BatchRequest { batch_id, dataset: "chess".into(), indices, ..Default::default() })
            .await
            .expect("queue");
    }
    let responses = client.stream_batches(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    (tx, responses)
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_stream_after_the_write_timeout_and_others_are_served() {
    let data = chess();
    let loader = InProcessLoader::start(config(
        data.path(),
        &["--max-inflight-bytes", "2000000", "--max-batch-bytes", "500000", "--write-timeout", "2s"],
    ))
    .await;
    // The hog: asks for the largest batches, many of them, and never reads an answer.
    let (hog_tx, mut hog_stream) = flood(&loader).await;

    // Another client streams a whole epoch. Its requests would wait behind the hog's budget
    // forever; with a 4s request timeout and no retry target, any wait that long fails it.
    let options = StreamOptions {
        request_timeout: Duration::from_secs(4),
        unavailable_timeout: Duration::from_secs(6),
        ..StreamOptions::default()
    };
    let loaders = Loaders::connect(std::slice::from_ref(&loader.addr), options).await.expect("connect");
    let settings = PlanSettings { batch_size: 64, shuffle: Shuffle::Full, ..PlanSettings::default() };
    let plan = loaders.plan("chess", &settings).expect("plan");
    let mut run = loaders.run(RunSpec::new("chess", plan, 0..1)).expect("run");
    let mut delivered = 0;
    while let Some(batch) = run.next_batch().await.expect("the other client is served") {
        delivered += batch.indices.len() as u64;
    }
    assert_eq!(delivered, SAMPLES);
    assert_eq!(
        run.stats().replicas.values().map(|r| r.failures).sum::<u64>(),
        0,
        "a request of the other client timed out"
    );
    assert!(loader.state.stats.streams_timed_out.load(Relaxed) >= 1, "the hog's stream was not ended");

    // The hog, reading at last, finds what it had been sent and then the reason its stream ended.
    let status = loop {
        match hog_stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the hog's stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("--write-timeout"), "{status:?}");
    assert_eq!(loader.state.inflight_bytes(), 0, "the hog's budget was not released");
    drop(hog_tx);
    loader.stop().await;
}

#[tokio::test]
async fn an_oversize_request_message_is_answered_with_a_status_naming_the_limit() {
    let data = chess();
    let loader = InProcessLoader::start(config(data.path(), &["--max-batch-samples", "1000"])).await;
    let mut client = LoaderClient::connect(format!("http://{}", loader.addr)).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(BatchRequest { batch_id: 1, dataset: "chess".into(), indices: vec![1, 2, 3], ..Default::default() })
        .await
        .expect("send");
    // 100 000 indices of 3 varint bytes each: far over the 10 x 1000 + 64 KiB request limit.
    let huge = (0..100_000).map(|i| 20_000 + i).collect();
    tx.send(BatchRequest { batch_id: 2, dataset: "chess".into(), indices: huge, ..Default::default() })
        .await
        .expect("send");
    let mut responses = client.stream_batches(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    let first = responses.message().await.expect("first answer").expect("a response");
    assert_eq!((first.batch_id, first.indices), (1, vec![1, 2, 3]));
    let status = responses.message().await.expect_err("the oversize request ends the stream with a status");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("--max-batch-samples (1000)"), "{status:?}");
    assert_eq!(loader.state.stats.requests_malformed.load(Relaxed), 1);
    drop((tx, responses, client));
    loader.stop().await;
}

/// A message that is not a `BatchRequest`: field 2 (`dataset`, a string) as a fixed64.
#[derive(Clone, PartialEq, prost::Message)]
struct NotARequest {
    #[prost(fixed64, tag = "2")]
    dataset: u64,
}

#[tokio::test]
async fn a_malformed_request_message_is_answered_with_invalid_argument() {
    let data = chess();
    let loader = InProcessLoader::start(config(data.path(), &[])).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", loader.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/conveyor.v1.Loader/StreamBatches");
    let codec = tonic_prost::ProstCodec::<NotARequest, BatchResponse>::default();
    let requests = tokio_stream::iter([NotARequest { dataset: 7 }]);
    let mut responses = grpc.streaming(tonic::Request::new(requests), path, codec).await.expect("stream").into_inner();
    let status = responses.message().await.expect_err("the malformed request ends the stream with a status");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("conveyor.v1.BatchRequest"), "{status:?}");
    loader.stop().await;
}

#[tokio::test]
async fn a_connection_that_never_speaks_is_closed_after_the_handshake_timeout() {
    let data = chess();
    let loader = InProcessLoader::start(config(data.path(), &["--handshake-timeout", "500ms"])).await;
    let mut socket = tokio::net::TcpStream::connect(&loader.addr).await.expect("connect");
    let mut buf = [0u8; 64];
    // Bounded by a generous timeout: without the handshake timeout this read never returns.
    let read = tokio::time::timeout(Duration::from_secs(20), socket.read(&mut buf)).await;
    match read.expect("the loader kept a silent connection open") {
        Ok(0) | Err(_) => {}
        Ok(n) => {
            // The server's HTTP/2 preface (SETTINGS) may come first; then the close.
            assert!(n > 0);
            let rest = tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => continue,
                    }
                }
            })
            .await;
            assert!(rest.is_ok(), "the loader kept a silent connection open");
        }
    }
    assert_eq!(loader.state.stats.connections_timed_out.load(Relaxed), 1);
    loader.stop().await;
}

#[tokio::test]
async fn connections_past_max_connections_are_closed_at_once() {
    let data = chess();
    let loader = InProcessLoader::start(config(data.path(), &["--max-connections", "2"])).await;
    let _a = tokio::net::TcpStream::connect(&loader.addr).await.expect("connect");
    let _b = tokio::net::TcpStream::connect(&loader.addr).await.expect("connect");
    let mut third = tokio::net::TcpStream::connect(&loader.addr).await.expect("connect");
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(20), third.read(&mut buf)).await.expect("third left open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(loader.state.stats.connections_refused.load(Relaxed), 1);
    drop((_a, _b, third));
    loader.stop().await;
}

#[tokio::test]
async fn a_stream_with_no_request_for_the_idle_timeout_ends_with_a_status() {
    let data = chess();
    let loader = InProcessLoader::start(config(data.path(), &["--stream-idle-timeout", "500ms"])).await;
    let mut client = LoaderClient::connect(format!("http://{}", loader.addr)).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(BatchRequest { batch_id: 1, dataset: "chess".into(), indices: vec![5], ..Default::default() })
        .await
        .expect("send");
    let mut responses = client.stream_batches(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    assert_eq!(responses.message().await.expect("answer").expect("response").batch_id, 1);
    let status = responses.message().await.expect_err("the idle stream ends with a status");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("--stream-idle-timeout"), "{status:?}");
    drop(tx);
    loader.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_with_batches_queued_releases_its_budget_and_stream_at_once() {
    let data = chess();
    // The default --write-timeout (60 s): the release must not wait for it.
    let loader = InProcessLoader::start(config(
        data.path(),
        &["--max-inflight-bytes", "2000000", "--max-batch-bytes", "500000"],
    ))
    .await;
    let (tx, mut responses) = flood(&loader).await;
    responses.message().await.expect("first answer").expect("a response");
    assert!(loader.state.inflight_bytes() > 0, "the loader holds nothing; the test proves nothing");
    drop((responses, tx));
    // A bounded wait for the loader to notice, far below the 60 s write timeout.
    let released = tokio::time::timeout(Duration::from_secs(10), async {
        while loader.state.inflight_bytes() > 0 || loader.state.active_streams() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        released.is_ok(),
        "still {} bytes and {} streams held",
        loader.state.inflight_bytes(),
        loader.state.active_streams()
    );
    loader.stop().await;
}

#[test]
fn byte_size_flags_take_units_and_name_the_flag_when_they_cannot() {
    let data = std::path::Path::new("/nonexistent");
    let units = config(
        data,
        &[
            "--transform-worker-memory",
            "512MiB",
            "--disk-cache-bytes",
            "2GiB",
            "--http2-stream-window",
            "8m",
            "--max-inflight-bytes",
            "64k",
            "--chunk-cache-bytes",
            "1048576",
        ],
    );
    assert_eq!(units.transform_worker_memory, 512 << 20);
    assert_eq!(units.disk_cache_bytes, 2 << 30);
    assert_eq!(units.http2_stream_window, 8 << 20);
    assert_eq!(units.max_inflight_bytes, 64 << 10);
    assert_eq!(units.chunk_cache_bytes, 1 << 20);
    let refused = |flag: &str, value: &str| {
        let args = ["loader-server", "--dataset", "x=/nonexistent", flag, value];
        <loader_server::Config as clap::Parser>::try_parse_from(args).expect_err("refused").to_string()
    };
    let error = refused("--max-inflight-bytes", "lots");
    assert!(error.contains("--max-inflight-bytes") && error.contains("'lots' is not a byte size"), "{error}");
    let error = refused("--http2-stream-window", "8GiB");
    assert!(error.contains("--http2-stream-window") && error.contains("at most 4294967295 bytes"), "{error}");
}
