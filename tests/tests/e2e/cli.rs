//! End-to-end: the command line as a newcomer uses it — resuming runs, dumps that survive a
//! killed client, exactly-once checks that say what they checked, errors and logs that read well.

use std::{path::Path, process::Stdio, time::Duration};

use conveyor_tests::{binary, run_python, start_loader, trainer};
use trainer_client::demo;

const SAMPLES: u64 = 20_000;

fn chess_dataset() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    demo::write_chess_dataset(dir.path(), SAMPLES, 7_000).expect("demo data");
    dir
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `trainer-client` and asserts it succeeded; returns stdout.
fn ok(args: &[&str]) -> String {
    let output = trainer(args).expect("trainer-client runs");
    assert!(output.status.success(), "{args:?} failed: {}", text(&output.stderr));
    text(&output.stdout)
}

/// `__indices__.npy` and `__epochs__.npy` of a dump, row for row.
fn dumped(dir: &Path) -> Vec<(i64, i64)> {
    let read = |name: &str| -> Vec<i64> {
        let bytes = std::fs::read(dir.join(name)).expect("dump file");
        let header = conveyor_proto::npy::parse_header(&bytes).expect("valid npy");
        bytes[header.data_offset..].chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect()
    };
    let (epochs, indices) = (read("__epochs__.npy"), read("__indices__.npy"));
    assert_eq!(epochs.len(), indices.len(), "one epoch per row");
    epochs.into_iter().zip(indices).collect()
}

#[tokio::test]
async fn a_resumed_run_finishes_its_epochs_keeps_its_cursor_current_and_refuses_conflicting_flags() {
    let data = chess_dataset();
    let loader = start_loader(&[format!("chess={}", data.path().display())], &[]).await.expect("loader");
    let work = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| work.path().join(name).to_str().expect("utf-8").to_owned();
    let common = ["stream", "--loader", &loader.addr, "--dataset", "chess", "--batch-size", "1000", "--seed", "4"];
    let with = |extra: &[&str]| -> Vec<String> { common.iter().chain(extra).map(|s| s.to_string()).collect() };
    let run = |args: Vec<String>| ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    run(with(&["--epochs", "3", "--dump", &path("full")]));
    run(with(&[
        "--epochs",
        "3",
        "--max-batches",
        "25",
        "--save-cursor",
        &path("cursor.json"),
        "--dump",
        &path("first"),
    ]));
    let cursor: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path("cursor.json")).expect("cursor")).expect("json");
    assert_eq!(
        (cursor["epoch"].as_u64(), cursor["next_batch"].as_u64(), cursor["end_epoch"].as_u64()),
        (Some(1), Some(5), Some(3))
    );

    // Conflicting plan flags are refused, naming both values; the cursor is untouched.
    let conflict =
        trainer(&["stream", "--loader", &loader.addr, "--resume-from", &path("cursor.json"), "--batch-size", "500"])
            .expect("runs");
    let stderr = text(&conflict.stderr);
    assert!(
        !conflict.status.success()
            && stderr.contains("--batch-size 500 conflicts")
            && stderr.contains("--batch-size 1000"),
        "{stderr}"
    );

    // No --epochs and no --save-cursor: the run goes on to its end and the cursor follows it.
    let stdout = ok(&[
        "stream",
        "--loader",
        &loader.addr,
        "--resume-from",
        &path("cursor.json"),
        "--dump",
        &path("rest"),
        "--check-exactly-once",
    ]);
    assert!(
        stdout.contains("epoch 1: batches 5..20 of 20 arrived, each of their 15000 samples exactly once"),
        "{stdout}"
    );
    assert!(stdout.contains("epoch 2: every sample exactly once"), "{stdout}");
    assert!(stdout.contains(&format!("  replica {}: 35 batches", loader.addr)), "per-replica counts: {stdout}");
    let cursor: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path("cursor.json")).expect("cursor")).expect("json");
    assert_eq!((cursor["epoch"].as_u64(), cursor["next_batch"].as_u64()), (Some(3), Some(0)), "{cursor}");
    let (full, first, rest) =
        (dumped(&work.path().join("full")), dumped(&work.path().join("first")), dumped(&work.path().join("rest")));
    assert_eq!(full.len() as u64, 3 * SAMPLES);
    assert_eq!(first.len(), 25_000);
    assert_eq!([first, rest].concat(), full, "the two runs together are the three epochs, in order");

    let again = ok(&["stream", "--loader", &loader.addr, "--resume-from", &path("cursor.json")]);
    assert!(again.contains("is complete (epoch 3); nothing to stream"), "{again}");
}

#[tokio::test]
async fn a_killed_client_leaves_dump_files_numpy_reads_and_a_used_dump_directory_is_refused() {
    let data = chess_dataset();
    let loader = start_loader(&[format!("chess={}", data.path().display())], &[]).await.expect("loader");
    let work = tempfile::tempdir().expect("tempdir");
    let dump = work.path().join("dump");
    let mut child = std::process::Command::new(binary("trainer-client"))
        .args(["stream", "--loader", &loader.addr, "--dataset", "chess", "--batch-size", "100", "--prefetch", "1"])
        .args(["--epochs", "1000", "--dump", dump.to_str().expect("utf-8")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starts");
    // Kill it once a few batches are on disk (bounded wait; the header tells the rows).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while dumped_rows(&dump) < 500 {
        assert!(std::time::Instant::now() < deadline, "the dump never grew");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("exits");
    let killed = Path::new("--killed");
    let report: serde_json::Value = serde_json::from_str(
        &run_python("check_dump.py", &[data.path(), &dump, killed]).expect("numpy reads every file"),
    )
    .expect("json");
    assert!(report["rows"].as_u64().is_some_and(|rows| rows >= 500 && rows % 100 == 0), "{report}");
    assert_eq!(report["fields"].as_object().map(|f| f.len()), Some(3), "{report}");
    let uncommitted = report["uncommitted_rows"].as_object().expect("per file");
    assert!(uncommitted.values().all(|rows| rows.as_u64().is_some_and(|r| r == 0 || r == 100)), "{report}");

    let refused =
        trainer(&["stream", "--loader", &loader.addr, "--dataset", "chess", "--dump", dump.to_str().expect("utf-8")])
            .expect("runs");
    let stderr = text(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("already holds files"), "{stderr}");
}

/// Rows the header of `dir/__indices__.npy` states (0 while it does not exist).
fn dumped_rows(dir: &Path) -> u64 {
    let Ok(bytes) = std::fs::read(dir.join("__indices__.npy")) else { return 0 };
    conveyor_proto::npy::parse_header(&bytes).map_or(0, |h| h.shape.first().copied().unwrap_or(0))
}

#[tokio::test]
async fn exactly_once_with_ranks_checks_the_ranks_share_and_says_so() {
    let data = chess_dataset();
    let loader = start_loader(&[format!("chess={}", data.path().display())], &[]).await.expect("loader");
    let stdout = ok(&[
        "stream",
        "--loader",
        &loader.addr,
        "--dataset",
        "chess",
        "--world-size",
        "2",
        "--rank",
        "1",
        "--check-exactly-once",
    ]);
    assert!(
        stdout.contains("epoch 0: every sample of rank 1's share exactly once (10000 of 20000 samples"),
        "{stdout}"
    );
    assert!(!stdout.contains("every sample exactly once"), "{stdout}");
}

#[tokio::test]
async fn info_errors_and_logs_read_well_and_datagen_keeps_existing_data() {
    let data = chess_dataset();
    let loader = start_loader(&[format!("chess={}", data.path().display())], &[]).await.expect("loader");
    let info = ok(&["info", "--loader", &loader.addr]);
    assert!(info.contains("unchunked (memory-mapped .npy)") && !info.contains("chunk 1"), "{info}");

    let unreachable = trainer(&["info", "--loader", "127.0.0.1:1"]).expect("runs");
    let stderr = text(&unreachable.stderr);
    assert!(!unreachable.status.success() && stderr.contains("cannot connect to loader 127.0.0.1:1"), "{stderr}");
    assert!(stderr.matches("tcp connect error").count() <= 1, "a cause said twice: {stderr}");

    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("chess");
    let write = ["write-demo-data", "--dir", target.to_str().expect("utf-8"), "--samples", "3000"];
    assert!(ok(&write).contains("wrote 3000 samples"));
    let before = std::fs::metadata(target.join("move.npy")).and_then(|m| m.modified()).expect("written");
    assert!(ok(&write).contains("already holds 3000 samples; kept"));
    assert_eq!(std::fs::metadata(target.join("move.npy")).and_then(|m| m.modified()).expect("kept"), before);
    let other = ["write-demo-data", "--dir", target.to_str().expect("utf-8"), "--samples", "2000"];
    assert!(ok(&other).contains("wrote 2000 samples"), "another size is written anew");

    // A loader whose stderr is a file logs without colour codes, and logs each stream.
    let mut child = tokio::process::Command::new(binary("loader-server"))
        .args(["--listen", "127.0.0.1:0", "--dataset", &format!("chess={}", data.path().display())])
        .env("LOADER_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line).await.expect("listening line");
    let addr = line.trim().strip_prefix("listening on ").expect("address").to_owned();
    let streamed = ok(&["stream", "--loader", &addr, "--dataset", "chess", "--max-batches", "3"]);
    assert!(streamed.contains("streamed 768 samples"), "{streamed}");
    let pid = child.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let output = child.wait_with_output().await.expect("exits");
    let log = text(&output.stderr);
    assert!(log.contains("listening") && !log.contains('\u{1b}'), "{log}");
    assert!(log.contains("stream ended") && log.contains("batches=3"), "{log}");
}

/// Reads the loader's log lines until one contains `needle` (or the process closes stderr).
fn loader_log_until(args: &[&str], needle: &str) -> (bool, String) {
    use std::io::BufRead;
    // `timeout` bounds the wait: the loader is killed after 30 s, which closes its stderr.
    let mut child = std::process::Command::new("timeout")
        .arg("30")
        .arg(conveyor_tests::binary("loader-server"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("loader-server runs");
    let stderr = child.stderr.take().expect("stderr");
    let mut seen = String::new();
    let mut found = false;
    for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(needle) {
            found = true;
            break;
        }
    }
    stop_under_timeout(&mut child);
    (found, seen)
}

/// Stops a loader started under `timeout`: SIGTERM to `timeout`, which passes it on to the
/// loader and exits with it (SIGKILL would end `timeout` alone and leave the loader running).
fn stop_under_timeout(child: &mut std::process::Child) {
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}

#[test]
fn a_loader_open_beyond_loopback_without_tls_or_tokens_says_so_loudly() {
    let dir = tempfile::tempdir().expect("tempdir");
    trainer_client::demo::write_chess_dataset(dir.path(), 100, 100).expect("demo data");
    let dataset = format!("c={}", dir.path().display());
    let (found, log) = loader_log_until(&["--listen", "0.0.0.0:0", "--dataset", &dataset], "THIS LOADER IS OPEN");
    assert!(found, "no warning: {log}");
    assert!(log.contains("--tls-cert") && log.contains("--auth-token-file"), "{log}");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "t0ken\n").expect("tokens");
    let tokens = tokens.display().to_string();
    let (found, log) = loader_log_until(
        &["--listen", "0.0.0.0:0", "--dataset", &dataset, "--auth-token-file", &tokens],
        "travel in clear text",
    );
    assert!(found, "no clear-text warning with tokens but no TLS: {log}");
    assert!(!log.contains("t0ken"), "the token was logged: {log}");
}

#[test]
fn sighup_reloads_the_token_file() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    trainer_client::demo::write_chess_dataset(dir.path(), 100, 100).expect("demo data");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "old-token\n").expect("tokens");
    let mut loader = std::process::Command::new("timeout")
        .arg("60")
        .arg(conveyor_tests::binary("loader-server"))
        .args(["--listen", "127.0.0.1:0", "--dataset", &format!("c={}", dir.path().display())])
        .arg("--auth-token-file")
        .arg(&tokens)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("loader-server runs");
    let mut stdout = std::io::BufReader::new(loader.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("listening line");
    let addr = line.trim().strip_prefix("listening on ").expect("listening on ADDR").to_owned();
    let info = |token: &str| {
        std::process::Command::new(conveyor_tests::binary("trainer-client"))
            .args(["info", "--loader", &addr])
            .env("CONVEYOR_AUTH_TOKEN", token)
            .output()
            .expect("trainer-client runs")
    };
    assert!(info("old-token").status.success());
    assert!(!info("new-token").status.success());

    std::fs::write(&tokens, "new-token\n").expect("tokens");
    // `timeout` runs the loader as its child: signal the loader itself.
    let pgrep = std::process::Command::new("pgrep").args(["-P", &loader.id().to_string()]).output().expect("pgrep");
    let pid = String::from_utf8_lossy(&pgrep.stdout).trim().to_owned();
    let status = std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill");
    assert!(status.success(), "kill -HUP {pid}");
    // Wait for the loader to say it reloaded (bounded by `timeout` above).
    let stderr = std::io::BufReader::new(loader.stderr.take().expect("stderr"));
    let reloaded = stderr.lines().map_while(Result::ok).any(|l| l.contains("SIGHUP: reloaded the tokens"));
    assert!(reloaded, "no reload line");
    // Standard error is closed from here on, as when a log collector goes away: the loader must
    // drop the log lines of the calls below, not fail the calls (it did: every logged call got
    // an h2 error).
    assert!(info("new-token").status.success(), "the new token is refused after SIGHUP");
    let refused = info("old-token");
    assert!(!refused.status.success(), "the old token still works");
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("does not accept the token"), "{message}");
    stop_under_timeout(&mut loader);
}
