//! End-to-end: ragged fields (samples of different lengths), written by numpy as values plus
//! `FIELD.offsets.npy`. Every sample arrives exactly once and bit-exact over TCP and through
//! shared memory; a client that does not read offsets is refused naming the field; a batch's
//! byte limit counts its samples' real lengths; a replica killed mid-epoch loses and repeats
//! nothing.

use std::path::Path;

use conveyor_proto::v1::{BatchRequest, batch_error::Kind, loader_client::LoaderClient};
use conveyor_tests::{InProcessLoader, npy_fixtures, start_loader};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trainer_client::{ConnectOptions, Loaders, PlanSpec, Shuffle, StreamOptions};

const N: u64 = 53;

/// Each sample's bytes as numpy wrote them (little-endian): `(tokens, text, label)`.
fn expected(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let read = |name: &str| {
        let bytes = std::fs::read(dir.join(name)).expect("fixture");
        let header = conveyor_proto::npy::parse_header(&bytes).expect("numpy's header");
        (header.clone(), bytes[header.data_offset..].to_vec())
    };
    let offsets = |name: &str| -> Vec<usize> {
        let (_, data) = read(name);
        data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8")) as usize).collect()
    };
    let (tokens_header, mut tokens) = read("tokens.npy");
    assert!(tokens_header.big_endian, "the fixture tests byte swapping");
    for element in tokens.chunks_exact_mut(2) {
        element.reverse();
    }
    let (_, text) = read("text.npy");
    let (_, labels) = read("label.npy");
    let (token_offsets, text_offsets) = (offsets("tokens.offsets.npy"), offsets("text.offsets.npy"));
    (0..N as usize)
        .map(|i| {
            let token_rows = &tokens[token_offsets[i] * 6..token_offsets[i + 1] * 6];
            let text = &text[text_offsets[i]..text_offsets[i + 1]];
            (token_rows.to_vec(), text.to_vec(), labels[i * 8..i * 8 + 8].to_vec())
        })
        .collect()
}

fn spec() -> PlanSpec {
    PlanSpec {
        num_samples: N,
        batch_size: 8,
        drop_last: false,
        shuffle: Shuffle::Full,
        seed: 3,
        rank: 0,
        world_size: 1,
        block_len: 1,
        shuffle_window: 1,
        reshard: None,
    }
}

/// Streams one epoch from `loader` and checks every sample against numpy's.
async fn stream_and_check(loader: &str, options: StreamOptions, dir: &Path) {
    let expected = expected(dir);
    let loaders = Loaders::connect(&[loader.to_owned()], options).await.expect("connect");
    let info = loaders.dataset("r").expect("described").clone();
    let flags: Vec<(&str, bool)> = info.fields.iter().map(|f| (f.name.as_str(), f.ragged)).collect();
    assert_eq!(flags, [("label", false), ("text", true), ("tokens", true)]);
    assert_eq!(info.fields[2].sample_shape, [3], "a token sample is rows of 3");
    let mut epoch = loaders.epoch("r", spec(), 0).expect("epoch");
    let mut seen = vec![0u32; N as usize];
    while let Some(batch) = epoch.next_batch().await.expect("batch") {
        let tokens = batch.field("tokens").expect("tokens");
        let text = batch.field("text").expect("text");
        let label = batch.field("label").expect("label");
        assert_eq!(tokens.offsets.as_ref().map(Vec::len), Some(batch.indices.len() + 1));
        assert!(label.offsets.is_none(), "a fixed field has no offsets");
        for (position, &index) in batch.indices.iter().enumerate() {
            let (want_tokens, want_text, want_label) = &expected[index as usize];
            assert_eq!(tokens.sample(position), &want_tokens[..], "tokens of sample {index}");
            assert_eq!(text.sample(position), &want_text[..], "text of sample {index}");
            assert_eq!(label.sample(position), &want_label[..], "label of sample {index}");
            seen[index as usize] += 1;
        }
    }
    assert!(seen.iter().all(|&n| n == 1), "every sample exactly once: {seen:?}");
}

#[tokio::test]
async fn ragged_samples_arrive_bit_exact_and_exactly_once_over_tcp_and_shared_memory() {
    let fixtures = npy_fixtures();
    let dir = fixtures.path().join("ragged");
    let config = loader_server::Config::for_datasets([format!("r={}", dir.display())]);
    let loader = InProcessLoader::start(config).await;
    stream_and_check(&loader.addr, StreamOptions::default(), &dir).await;
    loader.stop().await;

    let socket = fixtures.path().join("ragged.sock");
    let mut config = loader_server::Config::for_datasets([format!("r={}", dir.display())]);
    config.shm_bytes = 8 << 20;
    let loader = InProcessLoader::start_with_unix(config, &socket).await;
    let options = StreamOptions {
        connect: ConnectOptions { shm_bytes: 8 << 20, ..ConnectOptions::default() },
        ..StreamOptions::default()
    };
    stream_and_check(&format!("unix:{}", socket.display()), options, &dir).await;
    let stats = &loader.state.stats;
    assert!(stats.shm_batches.load(std::sync::atomic::Ordering::Relaxed) > 0, "batches went through shared memory");
    loader.stop().await;
}

#[tokio::test]
async fn an_old_client_is_refused_naming_the_field_and_byte_limits_count_real_lengths() {
    let fixtures = npy_fixtures();
    let dir = fixtures.path().join("ragged");
    let mut config = loader_server::Config::for_datasets([format!("r={}", dir.display())]);
    config.max_batch_bytes = 400;
    let loader = InProcessLoader::start(config).await;
    let mut client = LoaderClient::connect(format!("http://{}", loader.addr)).await.expect("connect");
    let (requests_tx, requests_rx) = mpsc::channel(4);
    let mut responses = client.stream_batches(ReceiverStream::new(requests_rx)).await.expect("stream").into_inner();
    let request = |batch_id, indices: Vec<u64>, accepts_ragged| BatchRequest {
        batch_id,
        dataset: "r".into(),
        indices,
        accepts_ragged,
        ..Default::default()
    };

    requests_tx.send(request(1, vec![0, 1], false)).await.expect("send");
    requests_tx.send(request(2, (0..N).collect(), true)).await.expect("send");
    requests_tx.send(request(3, vec![3, 0], true)).await.expect("send");
    let mut answers = std::collections::BTreeMap::new();
    while answers.len() < 3 {
        let response = responses.next().await.expect("an answer per request").expect("stream stays up");
        answers.insert(response.batch_id, response);
    }
    let old = answers[&1].error.clone().expect("refused");
    assert_eq!(old.kind(), Kind::ClientTooOld, "{old:?}");
    assert!(old.message.contains("'text'") && old.message.contains("upgrade"), "{}", old.message);
    let big = answers[&2].error.clone().expect("over the byte limit");
    assert_eq!(big.kind(), Kind::BatchTooLarge, "{big:?}");
    assert!(big.message.contains("400"), "{}", big.message);
    let small = &answers[&3];
    assert!(small.error.is_none(), "{:?}", small.error);
    let tokens = small.tensors.iter().find(|t| t.field == "tokens").expect("tokens");
    let offsets: Vec<i64> =
        tokens.offsets.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect();
    assert_eq!(offsets[0..2], [0, 0], "sample 3 has no token rows");
    assert_eq!(tokens.shape[0] as i64, offsets[2]);
    assert_eq!(tokens.data.len() as i64, offsets[2] * 6);
    loader.stop().await;
}

#[tokio::test]
async fn two_replicas_serve_the_same_ragged_bytes_and_a_killed_one_loses_and_repeats_nothing() {
    let fixtures = npy_fixtures();
    let dir = fixtures.path().join("ragged");
    let expected = expected(&dir);
    let dataset = [format!("r={}", dir.display())];
    let mut a = start_loader(&dataset, &[]).await.expect("loader a");
    let b = start_loader(&dataset, &[]).await.expect("loader b");
    let loaders = Loaders::connect(&[a.addr.clone(), b.addr.clone()], StreamOptions::default()).await.expect("connect");
    let plan = PlanSpec { batch_size: 2, ..spec() };
    let mut epoch = loaders.epoch("r", plan, 1).expect("epoch");
    let mut seen = vec![0u32; N as usize];
    let mut after_kill = 0;
    while let Some(batch) = epoch.next_batch().await.expect("the epoch survives a killed replica") {
        let (tokens, text) = (batch.field("tokens").expect("tokens"), batch.field("text").expect("text"));
        for (position, &index) in batch.indices.iter().enumerate() {
            let (want_tokens, want_text, _) = &expected[index as usize];
            assert_eq!((tokens.sample(position), text.sample(position)), (&want_tokens[..], &want_text[..]));
            seen[index as usize] += 1;
        }
        if batch.index == 5 {
            a.child.start_kill().expect("SIGKILL");
        }
        after_kill += u32::from(batch.index > 5);
    }
    assert!(seen.iter().all(|&n| n == 1), "every sample exactly once: {seen:?}");
    assert_eq!(after_kill, 21, "the epoch's last 21 of 27 batches came after the kill");
    drop(b);
}
