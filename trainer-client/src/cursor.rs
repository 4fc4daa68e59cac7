//! A small serialisable position in a run: enough to continue exactly where training stopped.
//! A training script stores it in its own checkpoint, beside the model weights; the CLI writes
//! it with a [`CursorWriter`], off the streaming path.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{error::CursorError, sampler::PlanSpec};

/// Where a run is: the plan settings, the epoch, the next batch the trainer has not consumed
/// yet, and where the run ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Dataset streamed.
    pub dataset: String,
    /// Seed, batch size, rank, world size, shuffle, drop-last and dataset size.
    pub plan: PlanSpec,
    /// Current epoch.
    pub epoch: u64,
    /// First batch of `epoch` not yet consumed.
    pub next_batch: u64,
    /// The epoch the run stops before (`--epoch` + `--epochs`); `None` in cursors written
    /// before it was stored, which resume for `--epochs` from their epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_epoch: Option<u64>,
}

impl Cursor {
    /// The last epoch a run streams: epochs and epoch counts add up without overflowing, and
    /// every epoch fits the protocol's and Python's signed 64-bit integers.
    pub const MAX_EPOCH: u64 = (1 << 62) - 1;

    /// Whether the run this cursor belongs to has nothing left to stream.
    pub fn is_finished(&self) -> bool {
        self.end_epoch.is_some_and(|end| self.epoch >= end)
    }

    /// Writes the cursor as JSON, atomically (a reader sees the old or the new one, never half).
    ///
    /// # Errors
    /// [`CursorError::Io`] naming the file.
    pub fn save(&self, path: &Path) -> Result<(), CursorError> {
        let io = |source| CursorError::Io { action: "write", path: path.to_owned(), source };
        let json = serde_json::to_vec_pretty(self).map_err(|e| io(std::io::Error::other(e)))?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, json).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads a cursor written by [`Cursor::save`].
    ///
    /// # Errors
    /// [`CursorError`] naming the file when it is missing or not a cursor.
    pub fn load(path: &Path) -> Result<Cursor, CursorError> {
        let bytes =
            std::fs::read(path).map_err(|source| CursorError::Io { action: "read", path: path.to_owned(), source })?;
        let cursor: Cursor =
            serde_json::from_slice(&bytes).map_err(|source| CursorError::Parse { path: path.to_owned(), source })?;
        if let Some(epoch) = [Some(cursor.epoch), cursor.end_epoch].into_iter().flatten().find(|&e| e > Self::MAX_EPOCH)
        {
            return Err(CursorError::EpochOutOfRange { path: path.to_owned(), epoch });
        }
        Ok(cursor)
    }
}

/// Saves the latest offered cursor to a file on its own thread, at most once per interval, so
/// that offering one after every batch costs the streaming path a small clone and no system
/// call: newer cursors replace older ones until the next write. [`CursorWriter::finish`] writes
/// the last one and reports any error. A process killed outright leaves a cursor at most one
/// interval old: a run resumed from it repeats the batches of that interval and never skips one.
#[derive(Debug)]
pub struct CursorWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<WriterState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct WriterState {
    /// The newest cursor not yet written.
    pending: Option<Cursor>,
    /// Set by `finish`: write what is pending and stop.
    closing: bool,
    /// The first write error, reported by `finish`.
    error: Option<CursorError>,
    /// Cursors written so far.
    num_written: u64,
    /// Set while the writer waits for a cursor (only then does `offer` wake it).
    idle: bool,
}

impl CursorWriter {
    /// Writes at most this often.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);

    /// Starts the writer thread for `path`, writing at most every [`Self::DEFAULT_INTERVAL`].
    pub fn new(path: PathBuf) -> CursorWriter {
        CursorWriter::with_interval(path, Self::DEFAULT_INTERVAL)
    }

    /// Starts the writer thread for `path`, writing at most every `interval`.
    pub fn with_interval(path: PathBuf, interval: Duration) -> CursorWriter {
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cursor-writer".into())
            .spawn(move || write_latest(&thread_shared, &path, interval))
            .ok();
        CursorWriter { shared, thread }
    }

    /// Hands over the newest cursor; returns at once.
    pub fn offer(&self, cursor: Cursor) {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.pending = Some(cursor);
        if state.idle {
            self.shared.wake.notify_one();
        }
    }

    /// Writes the last offered cursor, stops the thread and returns how many cursors were written.
    ///
    /// # Errors
    /// The first write that failed.
    pub fn finish(mut self) -> Result<u64, CursorError> {
        self.close();
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.error.take() {
            Some(error) => Err(error),
            None => Ok(state.num_written),
        }
    }

    fn close(&mut self) {
        {
            let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            state.closing = true;
            self.shared.wake.notify_one();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for CursorWriter {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_latest(shared: &Shared, path: &Path, interval: Duration) {
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    let mut next_write = Instant::now();
    loop {
        // Between writes, wait out the interval (closing cuts it short).
        while !state.closing && Instant::now() < next_write {
            let left = next_write.saturating_duration_since(Instant::now());
            state = shared.wake.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        if let Some(cursor) = state.pending.take() {
            drop(state);
            let result = cursor.save(path);
            next_write = Instant::now() + interval;
            state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok(()) => state.num_written += 1,
                Err(error) => {
                    state.error.get_or_insert(error);
                }
            }
            continue;
        }
        if state.closing {
            return;
        }
        state.idle = true;
        state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        state.idle = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::Shuffle;

    fn cursor(next_batch: u64) -> Cursor {
        Cursor {
            dataset: "chess".into(),
            plan: PlanSpec {
                num_samples: 10,
                batch_size: 3,
                drop_last: false,
                shuffle: Shuffle::Full,
                seed: 1,
                rank: 0,
                world_size: 1,
                block_len: 1,
                shuffle_window: 1,
                reshard: None,
            },
            epoch: 2,
            next_batch,
            end_epoch: Some(3),
        }
    }

    #[test]
    fn cursor_round_trips_through_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cursor.json");
        cursor(1).save(&path).expect("save");
        assert_eq!(Cursor::load(&path).expect("load"), cursor(1));
        std::fs::write(&path, b"{}").expect("write");
        let error = Cursor::load(&path).expect_err("not a cursor");
        assert!(matches!(error, CursorError::Parse { .. }) && error.to_string().contains("--save-cursor"), "{error}");
        let missing = Cursor::load(&dir.path().join("nope.json")).expect_err("missing");
        assert!(missing.to_string().contains("nope.json"), "{missing}");
    }

    #[test]
    fn a_cursor_naming_an_epoch_no_run_reaches_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cursor.json");
        for (epoch, end_epoch) in [(u64::MAX, Some(u64::MAX)), (1 << 62, None), (0, Some(u64::MAX))] {
            Cursor { epoch, end_epoch, ..cursor(0) }.save(&path).expect("save");
            let error = Cursor::load(&path).expect_err("out of range");
            assert!(matches!(error, CursorError::EpochOutOfRange { .. }), "{error}");
            assert!(
                error.to_string().contains("cursor.json") && error.to_string().contains("--resume-from"),
                "{error}"
            );
        }
        let last = Cursor { epoch: Cursor::MAX_EPOCH, end_epoch: Some(Cursor::MAX_EPOCH), ..cursor(0) };
        last.save(&path).expect("save");
        assert_eq!(Cursor::load(&path).expect("the last epoch loads"), last);
    }

    #[test]
    fn cursors_written_before_the_end_epoch_was_stored_still_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.json");
        let mut json = serde_json::to_value(cursor(1)).expect("json");
        json.as_object_mut().expect("object").remove("end_epoch");
        std::fs::write(&path, json.to_string()).expect("write");
        let old = Cursor::load(&path).expect("an old cursor loads");
        assert_eq!(old.end_epoch, None);
        assert!(!old.is_finished());
    }

    #[test]
    fn the_writer_ends_with_the_newest_cursor_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cursor.json");
        let writer = CursorWriter::new(path.clone());
        for batch in 0..1000 {
            writer.offer(cursor(batch));
        }
        let written = writer.finish().expect("writes");
        // One write at once, then the newest after the interval (closing cuts it short).
        assert!((1..=2).contains(&written), "{written}");
        assert_eq!(Cursor::load(&path).expect("load").next_batch, 999);
    }

    #[test]
    fn the_writer_reports_a_failed_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writer = CursorWriter::new(dir.path().join("missing-dir").join("cursor.json"));
        writer.offer(cursor(1));
        let error = writer.finish().expect_err("cannot write into a missing directory");
        assert!(error.to_string().contains("missing-dir"), "{error}");
    }
}
