//! End-to-end: several loader processes; replicas are killed, drained, restarted and added
//! mid-epoch, and every epoch still arrives complete, once, in the single-replica order.

use std::{path::Path, time::Duration};

use conveyor_tests::{LoaderProcess, eventually, start_loader, start_loader_on, trainer};
use trainer_client::{ClientError, Loaders, PlanSpec, Shuffle, StreamOptions, demo};

const SAMPLES: u64 = 20_000;
const BATCH: u64 = 50;

fn chess_dataset() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    demo::write_chess_dataset(dir.path(), SAMPLES, 7_000).expect("demo data");
    dir
}

fn spec() -> PlanSpec {
    PlanSpec {
        num_samples: SAMPLES,
        batch_size: BATCH,
        drop_last: false,
        shuffle: Shuffle::Full,
        seed: 42,
        rank: 0,
        world_size: 1,
        block_len: 1,
        shuffle_window: 1,
        reshard: None,
    }
}

fn options(unavailable_timeout: Duration) -> StreamOptions {
    StreamOptions {
        prefetch: 8.try_into().expect("nonzero"),
        unavailable_timeout,
        backoff_max: Duration::from_millis(500),
        ..StreamOptions::default()
    }
}

async fn loader(dir: &Path) -> LoaderProcess {
    start_loader(&[format!("chess={}", dir.display())], &[]).await.expect("loader starts")
}

/// Indices of a whole epoch streamed from one replica.
async fn single_replica_order(addr: &str) -> Vec<u64> {
    let loaders = Loaders::connect(&[addr.to_owned()], options(Duration::from_secs(30))).await.expect("connect");
    let mut epoch = loaders.epoch("chess", spec(), 3).expect("epoch");
    let mut order = Vec::new();
    while let Some(batch) = epoch.next_batch().await.expect("batch") {
        order.extend(batch.indices);
    }
    order
}

fn kill_9(replica: &mut LoaderProcess) {
    replica.child.start_kill().expect("SIGKILL");
}

fn send_sigterm(replica: &LoaderProcess) {
    let pid = replica.child.id().expect("running").to_string();
    let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
    assert!(status.success());
}

/// How the test's client reaches its loaders.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    /// `unix:PATH` sockets with shared memory.
    UnixShm,
}

/// A loader on a free port and, for [`Transport::UnixShm`], a socket in `sockets`; with the
/// address the client should use.
async fn loader_over(dir: &Path, transport: Transport, sockets: &Path) -> (LoaderProcess, String) {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dataset = [format!("chess={}", dir.display())];
    match transport {
        Transport::Tcp => {
            let process = start_loader(&dataset, &[]).await.expect("loader starts");
            let addr = process.addr.clone();
            (process, addr)
        }
        Transport::UnixShm => {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let socket = sockets.join(format!("loader-{n}.sock"));
            let socket_arg = socket.display().to_string();
            let process = start_loader(&dataset, &["--listen-unix", &socket_arg]).await.expect("loader starts");
            (process, format!("unix:{socket_arg}"))
        }
    }
}

#[tokio::test]
async fn replicas_killed_drained_and_added_mid_epoch_lose_and_repeat_nothing() {
    kill_drain_add(Transport::Tcp).await;
}

#[tokio::test]
async fn over_unix_sockets_and_shared_memory_replicas_killed_drained_and_added_lose_and_repeat_nothing() {
    kill_drain_add(Transport::UnixShm).await;
    // Every connection is gone, so is every region this process registered (the only test in
    // this binary that makes any).
    eventually("regions of closed connections are unregistered", Duration::from_secs(10), || {
        trainer_client::shm::num_open_regions() == 0
    })
    .await;
}

async fn kill_drain_add(transport: Transport) {
    let data = chess_dataset();
    let sockets = tempfile::tempdir().expect("tempdir");
    let (mut a, a_addr) = loader_over(data.path(), transport, sockets.path()).await;
    let (b, b_addr) = loader_over(data.path(), transport, sockets.path()).await;
    let (mut c, c_addr) = loader_over(data.path(), transport, sockets.path()).await;
    let reference = single_replica_order(&a_addr).await;
    assert_eq!(reference.len() as u64, SAMPLES);

    let addrs = vec![a_addr.clone(), b_addr.clone(), c_addr.clone()];
    let loaders = Loaders::connect(&addrs, options(Duration::from_secs(30))).await.expect("connect");
    let mut d = None;
    let mut order = Vec::new();
    let loaders = {
        let mut epoch = loaders.epoch("chess", spec(), 3).expect("epoch");
        let mut b = Some(b);
        while let Some(batch) = epoch.next_batch().await.expect("the epoch survives replica failures") {
            demo::check_chess_batch(&batch).expect("content");
            if transport == Transport::UnixShm && batch.index == 1 {
                // The first batch can come from the first connection up; the others are still
                // being opened by their own tasks.
                eventually("each Unix connection was granted a region", Duration::from_secs(10), || {
                    trainer_client::shm::num_open_regions() >= 3
                })
                .await;
            }
            order.extend(batch.indices.iter().copied());
            match batch.index {
                40 => kill_9(&mut a),
                80 => send_sigterm(b.as_ref().expect("b")),
                _ => {}
            }
            if batch.index == 80 {
                let fresh = loader_over(data.path(), transport, sockets.path()).await;
                epoch.add_loader(&fresh.1).expect("valid address");
                d = Some(fresh);
            }
            if batch.index == 120 {
                kill_9(&mut c);
            }
        }
        let status = b.take().expect("b").child.wait().await.expect("b exits");
        assert!(status.success(), "a SIGTERM'd loader drains and exits cleanly, got {status}");
        epoch.into_loaders()
    };
    assert_eq!(order, reference, "same batches in the same order as with one replica");
    let stats = loaders.stats();
    let (_d, d_addr) = d.expect("fresh replica");
    assert!(stats.replicas[&a_addr].failures >= 1, "{stats:?}");
    assert!(stats.replicas[&d_addr].batches > 0, "the added replica served the end of the epoch: {stats:?}");
    let served: u64 = stats.replicas.values().map(|r| r.batches).sum();
    assert_eq!(served, SAMPLES.div_ceil(BATCH), "every batch delivered once: {stats:?}");
}

#[tokio::test]
async fn all_replicas_down_then_one_back_within_the_timeout_completes_the_epoch() {
    let data = chess_dataset();
    let mut a = loader(data.path()).await;
    let reference = single_replica_order(&a.addr).await;
    let loaders =
        Loaders::connect(std::slice::from_ref(&a.addr), options(Duration::from_secs(60))).await.expect("connect");
    let mut epoch = loaders.epoch("chess", spec(), 3).expect("epoch");
    let mut order = Vec::new();
    let mut revived = None;
    while let Some(batch) = epoch.next_batch().await.expect("completes once the replica is back") {
        order.extend(batch.indices.iter().copied());
        if batch.index == 20 {
            kill_9(&mut a);
            a.child.wait().await.expect("a exits");
            // Same address: the client keeps retrying it with backoff.
            revived = Some(
                start_loader_on(&a.addr, &[format!("chess={}", data.path().display())], &[]).await.expect("restart"),
            );
        }
    }
    assert!(revived.is_some());
    assert_eq!(order, reference);
}

#[tokio::test]
async fn all_replicas_down_past_the_timeout_fails_with_a_clear_error() {
    let data = chess_dataset();
    let mut a = loader(data.path()).await;
    let loaders =
        Loaders::connect(std::slice::from_ref(&a.addr), options(Duration::from_secs(1))).await.expect("connect");
    let mut epoch = loaders.epoch("chess", spec(), 0).expect("epoch");
    let started = std::time::Instant::now();
    let error = loop {
        match epoch.next_batch().await {
            Ok(Some(batch)) if batch.index == 5 => {
                kill_9(&mut a);
                a.child.wait().await.expect("a exits");
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the epoch cannot finish without a loader"),
            Err(error) => break error,
        }
    };
    assert!(matches!(error, ClientError::Unavailable { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("--unavailable-timeout") && message.contains(&a.addr), "{message}");
    assert!(started.elapsed() < Duration::from_secs(30), "gave up after {:?}", started.elapsed());
}

fn dumped_indices(dir: &Path) -> Vec<i64> {
    let bytes = std::fs::read(dir.join("__indices__.npy")).expect("__indices__.npy");
    let header = conveyor_proto::npy::parse_header(&bytes).expect("valid npy");
    bytes[header.data_offset..].chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect()
}

#[tokio::test]
async fn resuming_from_a_cursor_saved_mid_epoch_delivers_exactly_the_rest() {
    let data = chess_dataset();
    let a = loader(data.path()).await;
    let work = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| work.path().join(name).to_str().expect("utf-8").to_owned();
    let common =
        ["stream", "--loader", &a.addr, "--dataset", "chess", "--batch-size", "64", "--seed", "9", "--epoch", "2"];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = common.iter().copied().chain(extra.iter().copied()).collect();
        let output = trainer(&args).expect("trainer-client runs");
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    run(&["--dump", &path("full")]);
    run(&["--max-batches", "37", "--save-cursor", &path("cursor.json"), "--dump", &path("first")]);
    let cursor: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path("cursor.json")).expect("cursor")).expect("json");
    assert_eq!((cursor["epoch"].as_u64(), cursor["next_batch"].as_u64()), (Some(2), Some(37)), "{cursor}");
    // The cursor's settings win over the command line's.
    let resume = ["stream", "--loader", &a.addr, "--resume-from", &path("cursor.json"), "--dump", &path("rest")];
    let output = trainer(&resume).expect("runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let full = dumped_indices(&work.path().join("full"));
    let first = dumped_indices(&work.path().join("first"));
    let rest = dumped_indices(&work.path().join("rest"));
    assert_eq!(first.len(), 37 * 64);
    assert_eq!(full.len() as u64, SAMPLES);
    assert_eq!([first, rest].concat(), full);
}
