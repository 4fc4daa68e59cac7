//! End-to-end: the same-host path. Loaders listening on a Unix socket write batches into a
//! shared-memory region the client maps; a full region falls back to the socket; shared memory
//! can be turned off; a TCP address of a loader on this host is moved to its socket (and only
//! to that loader's own socket); and a killed trainer leaves no shared memory in the loader.

use std::{path::Path, sync::atomic::Ordering::Relaxed, time::Duration};

use conveyor_tests::{InProcessLoader, eventually, start_loader};
use trainer_client::{ConnectOptions, Loaders, PlanSpec, Shuffle, StreamOptions, demo};

const SAMPLES: u64 = 6_000;
const BATCH: u64 = 256;

fn spec() -> PlanSpec {
    PlanSpec {
        num_samples: SAMPLES,
        batch_size: BATCH,
        drop_last: false,
        shuffle: Shuffle::Full,
        seed: 7,
        rank: 0,
        world_size: 1,
        block_len: 1,
        shuffle_window: 1,
        reshard: None,
    }
}

fn options(shm_bytes: u64) -> StreamOptions {
    StreamOptions { connect: ConnectOptions { shm_bytes, ..ConnectOptions::default() }, ..StreamOptions::default() }
}

/// A loader serving the chess dataset in `data`, with 64 MiB regions for its socket's clients.
fn shm_config(data: &Path) -> loader_server::Config {
    let mut config = loader_server::Config::for_datasets([format!("chess={}", data.display())]);
    config.shm_bytes = 64 << 20;
    config
}

/// Streams one epoch, keeping every batch until the end when `hold` (so the region fills),
/// checking content and exactly-once.
async fn epoch(addr: &str, shm_bytes: u64, hold: bool) -> usize {
    let loaders = Loaders::connect(&[addr.to_owned()], options(shm_bytes)).await.expect("connect");
    let mut epoch = loaders.epoch("chess", spec(), 0).expect("epoch");
    let (mut seen, mut held) = (vec![false; SAMPLES as usize], Vec::new());
    while let Some(batch) = epoch.next_batch().await.expect("batch") {
        demo::check_chess_batch(&batch).expect("content");
        for &i in &batch.indices {
            assert!(!std::mem::replace(&mut seen[i as usize], true), "sample {i} twice");
        }
        if hold {
            held.push(batch);
        }
    }
    assert!(seen.iter().all(|&s| s), "every sample arrived");
    held.len()
}

/// Lines of this process's memory map that map a loader region.
fn mapped_regions() -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    maps.lines().filter(|l| l.contains("memfd:conveyor-batches")).count()
}

/// How long the tests wait for connections and regions to go.
const GONE_WITHIN: Duration = Duration::from_secs(20);

#[tokio::test]
async fn batches_travel_through_shared_memory_fall_back_when_full_and_leave_nothing_mapped() {
    let data = tempfile::tempdir().expect("tempdir");
    demo::write_chess_dataset(data.path(), SAMPLES, 3).expect("demo data");
    let sockets = tempfile::tempdir().expect("tempdir");
    let socket = sockets.path().join("loader.sock");
    let loader = InProcessLoader::start_with_unix(shm_config(data.path()), &socket).await;
    let addr = format!("unix:{}", socket.display());
    let stats = &loader.state.stats;
    let num_batches = SAMPLES.div_ceil(BATCH);

    // Batches dropped as they are used: the prefetch window fits in the region, and released
    // extents are reused.
    epoch(&addr, 64 << 20, false).await;
    assert_eq!(stats.shm_batches.load(Relaxed), num_batches);
    assert_eq!(stats.shm_full.load(Relaxed), 0);
    assert_eq!(stats.shm_regions.load(Relaxed), 1);

    // The smallest region (the client's bound wins) and every batch held: the region fills, the
    // rest come over the socket, all correct.
    epoch(&addr, conveyor_proto::shm::MIN_REGION_BYTES, true).await;
    let (shared, full) = (stats.shm_batches.load(Relaxed) - num_batches, stats.shm_full.load(Relaxed));
    assert!(shared > 0 && full > 0, "some batches shared ({shared}), the rest inline ({full})");
    assert_eq!(shared + full, num_batches);

    // Shared memory off on the client: plain gRPC over the same socket.
    let before = stats.shm_batches.load(Relaxed);
    epoch(&addr, 0, false).await;
    assert_eq!(stats.shm_batches.load(Relaxed), before, "no region asked for, none used");
    assert_eq!(stats.shm_regions.load(Relaxed), 2);

    // Its TCP address: the loader names its socket in the catalog, the client finds it on this
    // host, checks it is the same loader and streams through shared memory; with shared memory
    // off on the client it stays on TCP.
    epoch(&loader.addr, 64 << 20, false).await;
    assert_eq!(stats.shm_batches.load(Relaxed), before + num_batches, "the same host detected from TCP");
    epoch(&loader.addr, 0, false).await;
    assert_eq!(stats.shm_batches.load(Relaxed), before + num_batches, "shared memory off: TCP");

    // With every batch and connection gone, no region stays registered or mapped, on either side
    // (the loader runs in this process too).
    eventually("regions are unregistered", GONE_WITHIN, || trainer_client::shm::num_open_regions() == 0).await;
    eventually("regions are unmapped", GONE_WITHIN, || mapped_regions() == 0).await;
    loader.stop().await;
}

/// Descriptors of `pid` that are loader regions.
fn region_fds(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return 0 };
    fds.flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.to_string_lossy().contains("memfd:conveyor"))
        })
        .count()
}

#[tokio::test]
async fn a_trainer_killed_with_sigkill_leaves_no_shared_memory_in_the_loader() {
    let data = tempfile::tempdir().expect("tempdir");
    demo::write_chess_dataset(data.path(), SAMPLES, 3).expect("demo data");
    let sockets = tempfile::tempdir().expect("tempdir");
    let socket = sockets.path().join("loader.sock");
    let socket_arg = socket.display().to_string();
    let loader = start_loader(&[format!("chess={}", data.path().display())], &["--listen-unix", &socket_arg])
        .await
        .expect("loader starts");
    let loader_pid = loader.child.id().expect("running");
    let addr = format!("unix:{socket_arg}");
    let mut trainer = tokio::process::Command::new(conveyor_tests::binary("trainer-client"))
        .args(["stream", "--loader", &addr, "--dataset", "chess", "--batch-size", "256", "--epochs", "100000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("trainer starts");
    eventually("the loader holds the trainer's region", GONE_WITHIN, || region_fds(loader_pid) == 1).await;
    trainer.start_kill().expect("SIGKILL");
    trainer.wait().await.expect("reaped");
    eventually("the loader closed the region", GONE_WITHIN, || region_fds(loader_pid) == 0).await;
    let shmem_path = Path::new("/proc").join(loader_pid.to_string()).join("maps");
    let maps = std::fs::read_to_string(shmem_path).expect("loader maps");
    assert!(!maps.contains("memfd:conveyor"), "the loader unmapped it too");
}

#[tokio::test]
async fn a_socket_directory_is_one_replica_per_socket_and_loaders_name_their_own() {
    let data = tempfile::tempdir().expect("tempdir");
    demo::write_chess_dataset(data.path(), SAMPLES, 3).expect("demo data");
    let sockets = tempfile::tempdir().expect("tempdir");
    let dataset = [format!("chess={}", data.path().display())];
    let named = sockets.path().join("a.sock").display().to_string();
    let _a = start_loader(&dataset, &["--listen-unix", &named]).await.expect("loader a");
    // A directory: the loader names its socket after the host.
    let dir = format!("{}/", sockets.path().display());
    let _b = start_loader(&dataset, &["--listen-unix", &dir]).await.expect("loader b");
    let sockets_now: Vec<String> = std::fs::read_dir(sockets.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(sockets_now.len(), 2, "{sockets_now:?}");
    assert!(sockets_now.iter().any(|n| n.starts_with("loader-") && n.ends_with(".sock")), "{sockets_now:?}");

    let mut loaders = Loaders::connect(&[format!("unix:{dir}")], options(64 << 20)).await.expect("connect");
    // The client starts as soon as one replica is up; the other joins when it has connected,
    // which a busy machine may delay past a short epoch. Every epoch is whole either way.
    let mut stats = loaders.stats();
    for epoch_no in 0..20 {
        let mut epoch = loaders.epoch("chess", spec(), epoch_no).expect("epoch");
        let mut seen = 0;
        while let Some(batch) = epoch.next_batch().await.expect("batch") {
            demo::check_chess_batch(&batch).expect("content");
            seen += batch.indices.len();
        }
        assert_eq!(seen as u64, SAMPLES, "epoch {epoch_no}");
        loaders = epoch.into_loaders();
        stats = loaders.stats();
        if stats.replicas.len() == 2 && stats.replicas.values().all(|r| r.batches > 0) {
            break;
        }
    }
    assert_eq!(stats.replicas.len(), 2, "one replica per socket: {stats:?}");
    assert!(stats.replicas.values().all(|r| r.batches > 0), "both served: {stats:?}");

    // A second loader on a socket in use is refused with a message naming the flag.
    let refused = std::process::Command::new(conveyor_tests::binary("loader-server"))
        .args(["--listen", "127.0.0.1:0", "--dataset", &dataset[0], "--listen-unix", &named])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("a loader already listens on") && stderr.contains("--listen-unix"), "{stderr}");
}

#[tokio::test]
async fn a_tcp_client_moves_only_to_the_named_loaders_own_socket() {
    let data = tempfile::tempdir().expect("tempdir");
    demo::write_chess_dataset(data.path(), SAMPLES, 3).expect("demo data");
    let sockets = tempfile::tempdir().expect("tempdir");
    let named = sockets.path().join("a.sock");
    let a = InProcessLoader::start_with_unix(shm_config(data.path()), &named).await;
    // Loader a keeps listening on its socket under another name; the path it names in its
    // catalog now holds nothing.
    std::fs::rename(&named, sockets.path().join("moved.sock")).expect("rename");
    epoch(&a.addr, 64 << 20, false).await;
    assert_eq!(a.state.stats.shm_batches.load(Relaxed), 0, "no socket at the named path: TCP");
    assert_eq!(a.state.stats.batches_served.load(Relaxed), SAMPLES.div_ceil(BATCH));

    // Another loader's socket at that path answers with another instance id: still TCP, and the
    // other loader serves nothing.
    let b = InProcessLoader::start_with_unix(shm_config(data.path()), &named).await;
    epoch(&a.addr, 64 << 20, false).await;
    assert_eq!(a.state.stats.shm_batches.load(Relaxed), 0, "another loader's socket is not taken");
    assert_eq!(a.state.stats.batches_served.load(Relaxed), 2 * SAMPLES.div_ceil(BATCH));
    assert_eq!(b.state.stats.batches_served.load(Relaxed), 0);
    a.stop().await;
    b.stop().await;
}
