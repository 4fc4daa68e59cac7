//! What a caller asks for, turned into what the dispatcher streams: [`PlanSettings`] (batch size,
//! shuffle, seed, ranks...) become a [`PlanSpec`] once the loaders' catalog fills in the dataset's
//! size and chunk length, and a [`RunSpec`] adds the epochs, the resume point and a batch limit.

use std::ops::Range;

use conveyor_proto::v1::DatasetInfo;

use crate::{
    catalog::block_len,
    cursor::Cursor,
    error::ClientError,
    sampler::{EpochPlan, PlanSpec, Shuffle},
};

/// The settings a caller chooses; the dataset decides the rest (see [`PlanSettings::plan_for`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanSettings {
    /// Samples per batch.
    pub batch_size: u64,
    /// Sample order within an epoch.
    pub shuffle: Shuffle,
    /// Shuffle seed.
    pub seed: u64,
    /// Blocks of chunks shuffled together with [`Shuffle::Block`].
    pub shuffle_window: u64,
    /// This process's rank in data-parallel training.
    pub rank: u64,
    /// Number of data-parallel ranks.
    pub world_size: u64,
    /// Drop samples that do not fill a whole batch (and an even share across ranks).
    pub drop_last: bool,
}

impl Default for PlanSettings {
    fn default() -> PlanSettings {
        PlanSettings {
            batch_size: 256,
            shuffle: Shuffle::Full,
            seed: 0,
            shuffle_window: 8,
            rank: 0,
            world_size: 1,
            drop_last: false,
        }
    }
}

impl PlanSettings {
    /// The plan for `info`, checked against the loaders' per-batch limit and the client's
    /// message limit `max_message_bytes`.
    ///
    /// # Errors
    /// [`ClientError::Plan`] for a zero batch size or window or a rank outside the world,
    /// [`ClientError::BatchOverLoaderLimit`] and [`ClientError::BatchOverMessageLimit`] for
    /// batches too large to serve or receive.
    pub fn plan_for(&self, info: &DatasetInfo, max_message_bytes: usize) -> Result<PlanSpec, ClientError> {
        let spec = PlanSpec {
            num_samples: info.num_samples,
            batch_size: self.batch_size,
            drop_last: self.drop_last,
            shuffle: self.shuffle,
            seed: self.seed,
            rank: self.rank,
            world_size: self.world_size,
            block_len: block_len(info),
            shuffle_window: self.shuffle_window,
            reshard: None,
        };
        check_plan(&spec, info, max_message_bytes)?;
        Ok(spec)
    }
}

/// Checks a plan (new or from a cursor) against the dataset and the limits.
///
/// # Errors
/// As [`PlanSettings::plan_for`], plus [`ClientError::DatasetSizeChanged`].
pub(crate) fn check_plan(spec: &PlanSpec, info: &DatasetInfo, max_message_bytes: usize) -> Result<(), ClientError> {
    EpochPlan::new(spec.clone(), 0)?;
    if spec.num_samples != info.num_samples {
        return Err(ClientError::DatasetSizeChanged {
            dataset: info.name.clone(),
            planned: spec.num_samples,
            found: info.num_samples,
        });
    }
    if spec.batch_size > info.max_batch_samples {
        return Err(ClientError::BatchOverLoaderLimit { batch_size: spec.batch_size, limit: info.max_batch_samples });
    }
    let bytes_per_sample: u64 = info.fields.iter().map(|f| f.bytes_per_sample).sum();
    let batch_bytes = spec.batch_size.saturating_mul(bytes_per_sample);
    let message_bytes = (batch_bytes as usize)
        .saturating_add(conveyor_proto::message_overhead_bytes(spec.batch_size as usize, info.fields.len()));
    if message_bytes > max_message_bytes {
        return Err(ClientError::BatchOverMessageLimit {
            dataset: info.name.clone(),
            batch_size: spec.batch_size,
            batch_bytes,
            limit_bytes: max_message_bytes,
        });
    }
    Ok(())
}

/// A run: epochs `epochs` of `dataset` under `plan`, from batch `start_batch` of the first, and at
/// most `max_batches` batches in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    /// Dataset to stream.
    pub dataset: String,
    /// The plan every epoch follows.
    pub plan: PlanSpec,
    /// Epochs to stream (`first..end`).
    pub epochs: Range<u64>,
    /// First batch of the first epoch (non-zero when resuming).
    pub start_batch: u64,
    /// Stop after this many batches (a partial run).
    pub max_batches: Option<u64>,
    /// Take only every `count`-th batch from the `index`-th on (`(index, count)`), so that
    /// `count` workers — PyTorch DataLoader workers — share one sequence and a round-robin over
    /// them restores its order. `None`: every batch.
    pub worker: Option<(u64, u64)>,
}

impl RunSpec {
    /// Epochs `epochs` from their start.
    pub fn new(dataset: impl Into<String>, plan: PlanSpec, epochs: Range<u64>) -> RunSpec {
        RunSpec { dataset: dataset.into(), plan, epochs, start_batch: 0, max_batches: None, worker: None }
    }

    /// The rest of the run `cursor` was saved in. A cursor from before the end epoch was stored
    /// continues for `epochs_if_unknown` epochs from its own.
    pub fn resume(cursor: &Cursor, epochs_if_unknown: u64) -> RunSpec {
        let end = cursor.end_epoch.unwrap_or(cursor.epoch.saturating_add(epochs_if_unknown.max(1)));
        RunSpec {
            dataset: cursor.dataset.clone(),
            plan: cursor.plan.clone(),
            epochs: cursor.epoch..end.max(cursor.epoch),
            start_batch: cursor.next_batch,
            max_batches: None,
            worker: None,
        }
    }

    /// The same run, stopped after `max_batches` batches when given.
    pub fn with_max_batches(mut self, max_batches: Option<u64>) -> RunSpec {
        self.max_batches = max_batches;
        self
    }

    /// The same run, for worker `index` of `count` (see [`RunSpec::worker`]).
    pub fn for_worker(mut self, index: u64, count: u64) -> RunSpec {
        self.worker = (count > 1).then_some((index, count));
        self
    }

    /// The batch positions of the run.
    ///
    /// # Errors
    /// [`crate::sampler::PlanError`] for a plan that cannot be made, or a worker index that is
    /// not below the worker count.
    pub(crate) fn schedule(&self) -> Result<Schedule, crate::sampler::PlanError> {
        let per_epoch = EpochPlan::new(self.plan.clone(), self.epochs.start)?.num_batches();
        let (offset, step) = self.worker.unwrap_or((0, 1));
        if offset >= step {
            return Err(crate::sampler::PlanError::BadWorker { index: offset, count: step });
        }
        let first = self.epochs.start.saturating_mul(per_epoch) + self.start_batch.min(per_epoch);
        let end = self.epochs.end.max(self.epochs.start).saturating_mul(per_epoch);
        let len = end.saturating_sub(first + offset).div_ceil(step).min(self.max_batches.unwrap_or(u64::MAX));
        Ok(Schedule { per_epoch, start: first + offset, step, len })
    }

    /// The cursor of this run before its batch number `seq` (0-based within the run).
    pub(crate) fn cursor_at(&self, schedule: &Schedule, seq: u64) -> Cursor {
        let (epoch, next_batch) = schedule.position(seq);
        Cursor {
            dataset: self.dataset.clone(),
            plan: self.plan.clone(),
            epoch,
            next_batch,
            end_epoch: Some(self.epochs.end),
        }
    }
}

/// A run's batches numbered `0..len` in delivery order; number `seq` is absolute batch
/// `start + seq × step`, that is batch `abs % per_epoch` of epoch `abs / per_epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Schedule {
    /// Batches per epoch (the same for every epoch of a plan).
    pub per_epoch: u64,
    /// Absolute batch number of the run's first batch.
    pub start: u64,
    /// Distance between consecutive batches of the run (the worker count; 1 without workers).
    pub step: u64,
    /// Batches in the run.
    pub len: u64,
}

impl Schedule {
    /// `(epoch, batch)` of run batch `seq`; `seq == len` gives the position after the last one.
    pub(crate) fn position(&self, seq: u64) -> (u64, u64) {
        if self.per_epoch == 0 {
            return (self.start, 0);
        }
        let absolute = self.start + seq * self.step;
        (absolute / self.per_epoch, absolute % self.per_epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found while writing the `cursor` fuzz target: a cursor from before `end_epoch` was stored, at the
    /// last epoch, overflowed the end of its run.
    #[test]
    fn a_cursor_at_the_last_epoch_resumes_without_overflow() {
        let plan = crate::sampler::PlanSpec {
            num_samples: 10,
            batch_size: 3,
            drop_last: false,
            shuffle: crate::Shuffle::None,
            seed: 0,
            rank: 0,
            world_size: 1,
            block_len: 1,
            shuffle_window: 1,
            reshard: None,
        };
        let cursor = crate::Cursor { dataset: "d".into(), plan, epoch: u64::MAX, next_batch: 0, end_epoch: None };
        let spec = RunSpec::resume(&cursor, 3);
        assert_eq!(spec.epochs, u64::MAX..u64::MAX);
    }

    fn info(num_samples: u64) -> DatasetInfo {
        DatasetInfo {
            name: "d".into(),
            num_samples,
            fields: vec![conveyor_proto::v1::FieldInfo {
                name: "x".into(),
                dtype: conveyor_proto::DType::Float32 as i32,
                sample_shape: vec![4],
                bytes_per_sample: 16,
                chunk_len: 10,
                dimension_names: Vec::new(),
                ..Default::default()
            }],
            max_batch_samples: 100,
            derivation: String::new(),
            coordinates: Vec::new(),
        }
    }

    #[test]
    fn settings_become_a_plan_with_the_datasets_size_and_chunk_length() {
        let spec =
            PlanSettings { batch_size: 7, ..PlanSettings::default() }.plan_for(&info(95), 1 << 20).expect("plan");
        assert_eq!((spec.num_samples, spec.block_len, spec.batch_size), (95, 10, 7));
    }

    #[test]
    fn every_bad_setting_is_a_typed_error_naming_the_limit() {
        let plan = |settings: PlanSettings, limit: usize| settings.plan_for(&info(95), limit).expect_err("refused");
        let zero = plan(PlanSettings { batch_size: 0, ..PlanSettings::default() }, 1 << 20);
        assert!(matches!(zero, ClientError::Plan(crate::sampler::PlanError::ZeroBatchSize)), "{zero}");
        let rank = plan(PlanSettings { rank: 2, world_size: 2, ..PlanSettings::default() }, 1 << 20);
        assert!(rank.to_string().contains("--rank 2"), "{rank}");
        let window =
            plan(PlanSettings { shuffle: Shuffle::Block, shuffle_window: 0, ..PlanSettings::default() }, 1 << 20);
        assert!(matches!(window, ClientError::Plan(crate::sampler::PlanError::ZeroWindow)), "{window}");
        let over = plan(PlanSettings { batch_size: 101, ..PlanSettings::default() }, 1 << 20);
        assert!(matches!(over, ClientError::BatchOverLoaderLimit { limit: 100, .. }), "{over}");
        let message = plan(PlanSettings { batch_size: 100, ..PlanSettings::default() }, 4096);
        assert!(message.to_string().contains("--max-message-bytes"), "{message}");
        let mut spec =
            PlanSettings { batch_size: 10, ..PlanSettings::default() }.plan_for(&info(95), 1 << 20).expect("plan");
        spec.num_samples = 90;
        let changed = check_plan(&spec, &info(95), 1 << 20).expect_err("other size");
        assert!(matches!(changed, ClientError::DatasetSizeChanged { planned: 90, found: 95, .. }), "{changed}");
    }

    #[test]
    fn a_run_numbers_its_batches_across_epochs_from_the_resume_point() {
        let plan =
            PlanSettings { batch_size: 10, ..PlanSettings::default() }.plan_for(&info(95), 1 << 20).expect("plan");
        let run = RunSpec { start_batch: 7, ..RunSpec::new("d", plan, 2..5) };
        let schedule = run.schedule().expect("schedule");
        assert_eq!(schedule.len, 3 * 10 - 7);
        assert_eq!(schedule.position(0), (2, 7));
        assert_eq!(schedule.position(3), (3, 0));
        assert_eq!(schedule.position(schedule.len), (5, 0), "the end is the start of the end epoch");
        assert_eq!(run.clone().with_max_batches(Some(5)).schedule().expect("schedule").len, 5);
        let cursor = run.cursor_at(&schedule, 3);
        assert_eq!((cursor.epoch, cursor.next_batch, cursor.end_epoch), (3, 0, Some(5)));
        let resumed = RunSpec::resume(&cursor, 1);
        assert_eq!((resumed.epochs, resumed.start_batch), (3..5, 0));
        let old = Cursor { end_epoch: None, ..cursor };
        assert_eq!(RunSpec::resume(&old, 2).epochs, 3..5, "old cursors run for the given number of epochs");
        // Three workers share the 23 batches: 8, 8 and 7, interleaved.
        let positions = |index| {
            let schedule = run.clone().for_worker(index, 3).schedule().expect("schedule");
            (0..schedule.len).map(|seq| schedule.position(seq)).collect::<Vec<_>>()
        };
        let (w0, w1, w2) = (positions(0), positions(1), positions(2));
        assert_eq!((w0.len(), w1.len(), w2.len()), (8, 8, 7));
        assert_eq!((w0[0], w1[0], w2[0], w0[1]), ((2, 7), (2, 8), (2, 9), (3, 0)));
        assert!(run.clone().for_worker(3, 3).schedule().is_err());
    }
}
