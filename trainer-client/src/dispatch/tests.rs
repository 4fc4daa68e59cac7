//! The dispatcher against an in-memory replica set ([`super::fake`]) on Tokio's paused clock:
//! every timeout and delay below is virtual, so each test takes milliseconds.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use tokio::time::Instant;

use super::{
    connection::Event,
    fake::{Behaviour, FakeReplicas, addr, catalog},
    *,
};
use crate::{Batch, Cursor, EpochPlan, ReplicaAddr, Shuffle};

fn options() -> StreamOptions {
    StreamOptions {
        prefetch: NonZeroUsize::new(4).expect("nonzero"),
        request_timeout: Duration::from_secs(1),
        unavailable_timeout: Duration::from_secs(5),
        resolve_interval: Duration::from_millis(100),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ..StreamOptions::default()
    }
}

fn answering(delay_ms: u64, num_samples: u64) -> Behaviour {
    Behaviour::answering(Duration::from_millis(delay_ms), catalog(num_samples, 1))
}

async fn connect(fake: &Arc<FakeReplicas>, names: &[&str]) -> Loaders {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    Loaders::connect_with(&names, options(), fake.clone()).await.expect("connects")
}

fn settings(batch_size: u64, shuffle: Shuffle) -> PlanSettings {
    PlanSettings { batch_size, shuffle, seed: 3, shuffle_window: 2, ..PlanSettings::default() }
}

/// Every batch of a run, failing the test on an error.
async fn drain(run: &mut Run) -> Vec<Batch> {
    let mut batches = Vec::new();
    while let Some(batch) = run.next().await {
        batches.push(batch.expect("batch"));
    }
    batches
}

/// The run's indices as the plan orders them.
fn planned(plan: &PlanSpec, epochs: std::ops::Range<u64>) -> Vec<Vec<u64>> {
    epochs
        .flat_map(|e| {
            let plan = EpochPlan::new(plan.clone(), e).expect("plan");
            (0..plan.num_batches()).map(move |b| plan.batch(b))
        })
        .collect()
}

/// Checks content (the fake echoes the indices as field `x`) and returns the indices per batch.
fn delivered(batches: &[Batch]) -> Vec<Vec<u64>> {
    batches
        .iter()
        .map(|b| {
            let x: Vec<u64> =
                b.fields[0].data.chunks(8).map(|c| i64::from_le_bytes(c.try_into().expect("8")) as u64).collect();
            assert_eq!(x, b.indices, "batch {} of epoch {} holds other samples than it names", b.index, b.epoch);
            b.indices.clone()
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn answers_that_overtake_each_other_are_delivered_in_plan_order() {
    let mut slow_evens = answering(1, 200);
    slow_evens.even_extra_delay = Duration::from_millis(50);
    let fake = FakeReplicas::new([(addr(1), slow_evens)]);
    let loaders = connect(&fake, &["127.0.0.1:1"]).await;
    let plan = loaders.plan("d", &settings(7, Shuffle::Full)).expect("plan");
    let mut run = loaders.epoch("d", plan.clone(), 0).expect("run");
    let batches = drain(&mut run).await;
    assert_eq!(delivered(&batches), planned(&plan, 0..1));
    assert_eq!(batches.iter().map(|b| b.index).collect::<Vec<_>>(), (0..29).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_replica_failing_mid_epoch_has_its_batches_resent_and_each_delivered_once() {
    let mut crashing = answering(2, 300);
    crashing.fail_after = Some(5);
    let fake = FakeReplicas::new([(addr(1), crashing), (addr(2), answering(3, 300))]);
    let loaders = connect(&fake, &["127.0.0.1:1", "127.0.0.1:2"]).await;
    let plan = loaders.plan("d", &settings(10, Shuffle::Full)).expect("plan");
    let mut run = loaders.epoch("d", plan.clone(), 0).expect("run");
    let batches = drain(&mut run).await;
    assert_eq!(delivered(&batches), planned(&plan, 0..1), "every batch once, in order");
    let stats = run.stats();
    assert!(stats.retried_batches > 0, "{stats:?}");
    assert!(stats.replicas["127.0.0.1:1"].failures >= 1, "{stats:?}");
    assert_eq!(stats.replicas.values().map(|r| r.batches).sum::<u64>(), 30, "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn batches_a_replica_fails_on_its_side_are_sent_to_another_and_carry_seed_and_epoch() {
    let mut failing = answering(2, 100);
    failing.workers_fail = true;
    let fake = FakeReplicas::new([(addr(1), failing), (addr(2), answering(3, 100))]);
    let loaders = connect(&fake, &["127.0.0.1:1", "127.0.0.1:2"]).await;
    let plan = loaders.plan("d", &settings(10, Shuffle::Full)).expect("plan");
    let mut run = loaders.run(RunSpec::new("d", plan.clone(), 0..2)).expect("run");
    let batches = drain(&mut run).await;
    assert_eq!(delivered(&batches), planned(&plan, 0..2), "every batch once, in order");
    assert!(fake.num_requests(addr(1)) > 0, "the failing replica got work");
    assert!(run.stats().retried_batches >= fake.num_requests(addr(1)) as u64, "{:?}", run.stats());
    let seeds: BTreeSet<(u64, u64)> = fake.seeds().into_iter().collect();
    assert_eq!(seeds, BTreeSet::from([(3, 0), (3, 1)]), "requests carry the run's seed and each epoch");
}

#[tokio::test(start_paused = true)]
async fn a_batch_every_replica_fails_on_its_side_ends_the_run_with_the_loaders_message() {
    let mut failing = answering(2, 100);
    failing.workers_fail = true;
    let fake = FakeReplicas::new([(addr(1), failing.clone()), (addr(2), failing)]);
    let loaders = connect(&fake, &["127.0.0.1:1", "127.0.0.1:2"]).await;
    let plan = loaders.plan("d", &settings(10, Shuffle::None)).expect("plan");
    let mut run = loaders.epoch("d", plan, 0).expect("run");
    let error = run.next().await.expect("an item").expect_err("refused");
    match &error {
        ClientError::BatchRefused { kind, message, .. } => {
            assert_eq!(*kind, crate::BatchErrorKind::WorkerFailed);
            assert!(message.contains("killed by SIGKILL"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Three answers for the first batch: sent, then retried twice, alternating replicas.
    let first: Vec<_> = fake.requests().into_iter().filter(|(_, i)| i[0] == 0).map(|(a, _)| a).collect();
    assert_eq!(first.len(), 3, "{first:?}");
    assert!(first.windows(2).all(|w| w[0] != w[1]), "each retry goes to the other replica: {first:?}");
}

#[tokio::test(start_paused = true)]
async fn batches_the_storage_fails_transiently_are_asked_for_again_until_it_recovers() {
    // The only replica's object store is down for its first 25 requests (each answered after
    // 300 ms, as the loader's own retries take): the run waits it out, every batch once.
    let mut outage = answering(300, 100);
    outage.storage_outage = 25;
    let fake = FakeReplicas::new([(addr(1), outage)]);
    let loaders = connect(&fake, &["127.0.0.1:1"]).await;
    let plan = loaders.plan("d", &settings(10, Shuffle::Full)).expect("plan");
    let mut run = loaders.epoch("d", plan.clone(), 0).expect("run");
    let batches = drain(&mut run).await;
    assert_eq!(delivered(&batches), planned(&plan, 0..1), "every batch once, in order");
    assert!(run.stats().retried_batches >= 25, "{:?}", run.stats());
}

#[tokio::test(start_paused = true)]
async fn a_storage_outage_longer_than_the_retry_timeout_ends_the_run_with_the_loaders_message() {
    let mut outage = answering(300, 100);
    outage.storage_outage = usize::MAX;
    let fake = FakeReplicas::new([(addr(1), outage)]);
    let options = StreamOptions { storage_retry_timeout: Duration::from_secs(5), ..options() };
    let loaders = Loaders::connect_with(&["127.0.0.1:1".into()], options, fake.clone()).await.expect("connect");
    let plan = loaders.plan("d", &settings(10, Shuffle::None)).expect("plan");
    let started = Instant::now();
    let mut run = loaders.epoch("d", plan, 0).expect("run");
    let error = run.next().await.expect("an item").expect_err("refused");
    match &error {
        ClientError::BatchRefused { kind, message, .. } => {
            assert_eq!(*kind, crate::BatchErrorKind::StorageUnavailable);
            assert!(message.contains("503"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(5) && waited < Duration::from_secs(7), "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn a_request_unanswered_past_the_timeout_goes_to_another_replica() {
    let mut silent = answering(1, 100);
    silent.silent = true;
    let fake = FakeReplicas::new([(addr(1), silent), (addr(2), answering(1, 100))]);
    let loaders = connect(&fake, &["127.0.0.1:1", "127.0.0.1:2"]).await;
    let plan = loaders.plan("d", &settings(10, Shuffle::None)).expect("plan");
    let started = Instant::now();
    let mut run = loaders.epoch("d", plan.clone(), 0).expect("run");
    let batches = drain(&mut run).await;
    assert_eq!(delivered(&batches), planned(&plan, 0..1));
    assert!(started.elapsed() >= Duration::from_secs(1), "the silent replica's requests waited for the timeout");
    let stats = run.stats();
    assert!(stats.replicas["127.0.0.1:1"].failures >= 1 && stats.retried_batches >= 1, "{stats:?}");
    assert_eq!(stats.replicas["127.0.0.1:1"].batches, 0, "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn late_answers_from_dropped_connections_and_repeated_answers_are_ignored() {
    let fake = FakeReplicas::new([(addr(1), answering(5, 100))]);
    let loaders = connect(&fake, &["127.0.0.1:1"]).await;
    let plan = loaders.plan("d", &settings(10, Shuffle::None)).expect("plan");
    let mut run = loaders.epoch("d", plan.clone(), 0).expect("run");
    let first = run.next().await.expect("a batch").expect("ok");
    // Request 0 was answered (batch 0); an answer of an older connection generation and a
    // second answer to request 0 must both be dropped without an outcome.
    let stale = |generation: u64, batch_id: u64| Event::Answer {
        addr: addr(1),
        generation,
        response: conveyor_proto::v1::BatchResponse { batch_id, indices: first.indices.clone(), ..Default::default() },
    };
    assert!(run.loaders.pool.inject(stale(7, 1)).is_empty(), "an answer from another connection generation");
    assert!(run.loaders.pool.inject(stale(0, 0)).is_empty(), "a repeated answer to a request already answered");
    let rest = drain(&mut run).await;
    assert_eq!(delivered(&[vec![first], rest].concat()), planned(&plan, 0..1));
}

#[tokio::test(start_paused = true)]
async fn no_replica_for_the_unavailable_timeout_fails_naming_each_replica_and_its_error() {
    let mut crashing = answering(1, 100);
    crashing.fail_after = Some(2);
    let fake = FakeReplicas::new([(addr(1), crashing)]);
    let loaders = connect(&fake, &["127.0.0.1:1"]).await;
    let plan = loaders.plan("d", &settings(10, Shuffle::None)).expect("plan");
    let mut run = loaders.epoch("d", plan, 0).expect("run");
    let mut down = answering(1, 100);
    down.down = true;
    fake.set(addr(1), down);
    let started = Instant::now();
    let mut delivered = 0;
    let error = loop {
        match run.next().await {
            Some(Ok(_)) => delivered += 1,
            Some(Err(error)) => break error,
            None => panic!("the run cannot end without a replica"),
        }
    };
    assert_eq!(delivered, 2);
    assert!(matches!(error, ClientError::Unavailable { .. }), "{error}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(5) && waited < Duration::from_secs(6), "{waited:?}");
    let message = error.to_string();
    assert!(message.contains("127.0.0.1:1") && message.contains("connection refused"), "{message}");
    assert!(run.next().await.is_none(), "a failed run ends");
}

#[tokio::test(start_paused = true)]
async fn connecting_to_nothing_reachable_gives_up_after_the_unavailable_timeout() {
    let mut down = answering(1, 100);
    down.down = true;
    let fake = FakeReplicas::new([(addr(1), down)]);
    let names = vec!["127.0.0.1:1".to_owned()];
    let error = Loaders::connect_with(&names, options(), fake.clone()).await.expect_err("nothing is up");
    assert!(matches!(error, ClientError::Unavailable { .. }), "{error}");
    assert!(matches!(Loaders::connect_with(&[], options(), fake.clone()).await, Err(ClientError::NoLoaders)));
    let bad = Loaders::connect_with(&["loader".to_owned()], options(), fake).await.expect_err("bad address");
    assert!(matches!(bad, ClientError::BadAddress { .. }), "{bad}");
}

#[tokio::test(start_paused = true)]
async fn replicas_joining_and_leaving_a_name_mid_epoch_share_the_work_and_lose_nothing() {
    let fake = FakeReplicas::new([(addr(1), answering(10, 1000)), (addr(2), answering(10, 1000))]);
    fake.set_name("svc:7070", vec![addr(1)]);
    let loaders = connect(&fake, &["svc:7070"]).await;
    let plan = loaders.plan("d", &settings(10, Shuffle::Full)).expect("plan");
    let mut run = loaders.epoch("d", plan.clone(), 0).expect("run");
    let mut batches = Vec::new();
    while let Some(batch) = run.next().await {
        let batch = batch.expect("batch");
        match batch.index {
            10 => fake.set_name("svc:7070", vec![addr(1), addr(2)]),
            60 => fake.set_name("svc:7070", vec![addr(2)]),
            _ => {}
        }
        batches.push(batch);
    }
    assert_eq!(delivered(&batches), planned(&plan, 0..1));
    let stats = run.stats();
    assert!(stats.replicas["127.0.0.1:2"].batches > 0, "the joined replica served: {stats:?}");
    assert!(stats.replicas["127.0.0.1:1"].batches > 0, "the departed replica's batches still count: {stats:?}");
    assert_eq!(stats.replicas.values().map(|r| r.batches).sum::<u64>(), 100, "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn a_replica_serving_other_datasets_is_refused() {
    let fake = FakeReplicas::new([(addr(1), answering(1, 100)), (addr(2), answering(1, 99))]);
    let mut loaders = connect(&fake, &["127.0.0.1:1"]).await;
    loaders.add_loader("127.0.0.1:2").expect("valid address");
    let plan = loaders.plan("d", &settings(10, Shuffle::None)).expect("plan");
    let mut run = loaders.epoch("d", plan.clone(), 0).expect("run");
    let batches = drain(&mut run).await;
    assert_eq!(delivered(&batches), planned(&plan, 0..1));
    assert_eq!(fake.num_requests(addr(2)), 0, "no request went to the disagreeing replica");
    assert!(run.stats().replicas["127.0.0.1:2"].failures >= 1);
}

#[tokio::test(start_paused = true)]
async fn affinity_keeps_each_block_of_chunks_on_one_replica() {
    let chunked = |delay| Behaviour::answering(Duration::from_millis(delay), catalog(2000, 20));
    // Uneven replicas, so the least loaded one changes often: without affinity 44 of the 100
    // blocks stayed on one replica here, with it 94.
    let mut jittery = chunked(3);
    jittery.even_extra_delay = Duration::from_millis(4);
    let fake = FakeReplicas::new([(addr(1), jittery), (addr(2), chunked(5))]);
    let loaders = connect(&fake, &["127.0.0.1:1", "127.0.0.1:2"]).await;
    // A window of 2 blocks holds 2 batches; 4 batches in flight reach both replicas.
    let plan = loaders.plan("d", &settings(20, Shuffle::Block)).expect("plan");
    assert_eq!(plan.block_len, 20);
    let mut run = loaders.epoch("d", plan.clone(), 0).expect("run");
    let batches = drain(&mut run).await;
    assert_eq!(delivered(&batches), planned(&plan, 0..1));
    let mut replicas_of_block: BTreeMap<u64, BTreeSet<ReplicaAddr>> = BTreeMap::new();
    for (replica, indices) in fake.requests() {
        for index in indices {
            replicas_of_block.entry(index / 20).or_default().insert(replica.clone());
        }
    }
    let on_one = replicas_of_block.values().filter(|r| r.len() == 1).count();
    assert!(
        on_one * 10 >= replicas_of_block.len() * 9,
        "{on_one} of {} blocks stayed on one replica",
        replicas_of_block.len()
    );
    let stats = run.stats();
    assert!(stats.replicas.values().all(|r| r.batches > 0), "both replicas worked: {stats:?}");
}

#[tokio::test(start_paused = true)]
async fn the_next_epoch_is_requested_while_the_caller_consumes_this_one() {
    let fake = FakeReplicas::new([(addr(1), answering(10, 30))]);
    let loaders = connect(&fake, &["127.0.0.1:1"]).await;
    let plan = loaders.plan("d", &settings(10, Shuffle::Full)).expect("plan");
    let mut run = loaders.run(RunSpec::new("d", plan.clone(), 0..3)).expect("run");
    let order = planned(&plan, 0..3);
    let mut batches = Vec::new();
    while let Some(batch) = run.next().await {
        let batch = batch.expect("batch");
        if batches.is_empty() {
            // Epoch 0 has 3 batches and the window is 4: the first of epoch 1 is on its way.
            let requested: Vec<Vec<u64>> = fake.requests().into_iter().map(|(_, indices)| indices).collect();
            assert!(requested.contains(&order[3]), "epoch 1 batch 0 not requested yet: {requested:?}");
        }
        // A training step slower than the replica.
        tokio::time::sleep(Duration::from_millis(30)).await;
        batches.push(batch);
    }
    assert_eq!(delivered(&batches), order);
    let boundaries = run.stats().epoch_boundaries;
    assert_eq!(boundaries.iter().map(|b| b.epoch).collect::<Vec<_>>(), vec![1, 2]);
    assert!(boundaries.iter().all(|b| b.wait_seconds == 0.0 && b.gap_seconds > 0.0), "{boundaries:?}");
}

#[tokio::test(start_paused = true)]
async fn the_hook_sees_the_cursor_after_each_consumed_batch_and_a_resumed_run_continues_there() {
    let fake = FakeReplicas::new([(addr(1), answering(1, 30))]);
    let loaders = connect(&fake, &["127.0.0.1:1"]).await;
    let plan = loaders.plan("d", &settings(10, Shuffle::Full)).expect("plan");
    let spec = RunSpec { start_batch: 1, ..RunSpec::new("d", plan.clone(), 1..3) }.with_max_batches(Some(4));
    let cursors: Arc<Mutex<Vec<Cursor>>> = Arc::default();
    let seen = cursors.clone();
    let mut run = loaders.run(spec).expect("run").on_consumed(move |c| seen.lock().expect("lock").push(c.clone()));
    let first = drain(&mut run).await;
    let positions: Vec<(u64, u64)> = first.iter().map(|b| (b.epoch, b.index)).collect();
    assert_eq!(positions, vec![(1, 1), (1, 2), (2, 0), (2, 1)]);
    let hooked: Vec<(u64, u64)> = cursors.lock().expect("lock").iter().map(|c| (c.epoch, c.next_batch)).collect();
    assert_eq!(hooked, vec![(1, 2), (2, 0), (2, 1), (2, 2)]);
    let last = run.cursor();
    assert_eq!((last.epoch, last.next_batch, last.end_epoch), (2, 2, Some(3)));
    let mut rest = run.into_loaders().run(RunSpec::resume(&last, 1)).expect("resume");
    let rest = drain(&mut rest).await;
    assert_eq!(delivered(&[first, rest].concat()), planned(&plan, 1..3)[1..].to_vec());
}

#[tokio::test(start_paused = true)]
async fn replicas_that_all_refuse_the_token_fail_the_connect_at_once_instead_of_after_the_unavailable_timeout() {
    let mut refusing = answering(1, 100);
    refusing.refuses_token = true;
    let fake = FakeReplicas::new([(addr(1), refusing.clone()), (addr(2), refusing)]);
    let names = vec!["127.0.0.1:1".to_owned(), "127.0.0.1:2".to_owned()];
    let started = Instant::now();
    let error = Loaders::connect_with(&names, options(), fake.clone()).await.expect_err("refused");
    assert!(matches!(error, ClientError::Refused { .. }), "{error}");
    assert!(started.elapsed() < Duration::from_secs(1), "waited {:?}", started.elapsed());
    let message = error.to_string();
    assert!(message.contains("127.0.0.1:1") && message.contains("127.0.0.1:2"), "{message}");
    assert!(message.contains("requires a token"), "{message}");
}

#[tokio::test(start_paused = true)]
async fn one_replica_refusing_the_token_does_not_stop_the_others() {
    let mut refusing = answering(1, 100);
    refusing.refuses_token = true;
    let fake = FakeReplicas::new([(addr(1), refusing), (addr(2), answering(1, 100))]);
    let loaders = connect(&fake, &["127.0.0.1:1", "127.0.0.1:2"]).await;
    let plan = loaders.plan("d", &settings(10, Shuffle::None)).expect("plan");
    let mut run = loaders.epoch("d", plan.clone(), 0).expect("run");
    let batches = drain(&mut run).await;
    assert_eq!(delivered(&batches), planned(&plan, 0..1));
}
