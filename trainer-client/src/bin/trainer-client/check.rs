//! `--check-exactly-once`: per epoch, the samples that arrived must be exactly the samples the
//! plan puts in the batches that arrived: the whole epoch, this rank's share of it, or the part a
//! resumed or stopped run covered, and the line printed says which.

use anyhow::bail;
use trainer_client::{Batch, EpochPlan, PlanSpec};

/// Tallies of the epoch in progress.
#[derive(Debug)]
struct Tally {
    epoch: u64,
    plan: EpochPlan,
    first_batch: u64,
    next_batch: u64,
    /// Arrivals minus plan entries per sample, modulo 256 (one byte per sample).
    balance: Vec<u8>,
    num_samples: u64,
}

/// Checks each epoch as it ends.
#[derive(Debug)]
pub(crate) struct ExactlyOnce {
    spec: PlanSpec,
    tally: Option<Tally>,
}

impl ExactlyOnce {
    /// A checker for runs of `spec`.
    pub(crate) fn new(spec: PlanSpec) -> ExactlyOnce {
        ExactlyOnce { spec, tally: None }
    }

    /// Counts a batch; returns the verdict line of the epoch it ended, if it ended one.
    ///
    /// # Errors
    /// The epoch that ended was not exactly once, or batches arrived out of order.
    pub(crate) fn add(&mut self, batch: &Batch) -> anyhow::Result<Option<String>> {
        let mut line = None;
        if self.tally.as_ref().is_some_and(|t| t.epoch != batch.epoch) {
            line = self.finish()?;
        }
        let tally = match &mut self.tally {
            Some(tally) => tally,
            None => self.tally.insert(Tally {
                epoch: batch.epoch,
                plan: EpochPlan::new(self.spec.clone(), batch.epoch)?,
                first_batch: batch.index,
                next_batch: batch.index,
                balance: vec![0; self.spec.num_samples as usize],
                num_samples: 0,
            }),
        };
        if batch.index != tally.next_batch {
            bail!("batch {} of epoch {} arrived where batch {} was due", batch.index, batch.epoch, tally.next_batch);
        }
        tally.next_batch += 1;
        for &index in &batch.indices {
            tally.balance[index as usize] = tally.balance[index as usize].wrapping_add(1);
        }
        tally.num_samples += batch.indices.len() as u64;
        Ok(line)
    }

    /// Checks the epoch in progress; returns its verdict line.
    ///
    /// # Errors
    /// A sample that arrived more or fewer times than the plan has it.
    pub(crate) fn finish(&mut self) -> anyhow::Result<Option<String>> {
        let Some(mut tally) = self.tally.take() else { return Ok(None) };
        let whole = tally.first_batch == 0 && tally.next_batch == tally.plan.num_batches();
        // A whole single-rank epoch holds every sample once: no need to walk the plan again.
        let expected_once = whole && self.spec.world_size == 1 && !self.spec.drop_last;
        if !expected_once {
            for batch in tally.first_batch..tally.next_batch {
                for index in tally.plan.batch(batch) {
                    tally.balance[index as usize] = tally.balance[index as usize].wrapping_sub(1);
                }
            }
        }
        let expected = u8::from(expected_once);
        if let Some(index) = tally.balance.iter().position(|&b| b != expected) {
            let what = if tally.balance[index].wrapping_sub(expected) < 128 {
                "arrived more often than planned"
            } else {
                "never arrived"
            };
            bail!("sample {index} {what} in epoch {}", tally.epoch);
        }
        let spec = &self.spec;
        let (epoch, n) = (tally.epoch, tally.num_samples);
        Ok(Some(match (whole, spec.world_size) {
            (true, 1) if !spec.drop_last => format!("epoch {epoch}: every sample exactly once"),
            (true, 1) => format!(
                "epoch {epoch}: every sample exactly once, but for the {} that --drop-last leaves out",
                spec.num_samples - n
            ),
            (true, world) => format!(
                "epoch {epoch}: every sample of rank {}'s share exactly once ({n} of {} samples; the other {} ranks \
                 stream the rest)",
                spec.rank,
                spec.num_samples,
                world - 1
            ),
            (false, _) => format!(
                "epoch {epoch}: batches {}..{} of {} arrived, each of their {n} samples exactly once (a partial \
                 epoch: resumed or stopped early)",
                tally.first_batch,
                tally.next_batch,
                tally.plan.num_batches()
            ),
        }))
    }
}

#[cfg(test)]
mod tests {
    use trainer_client::{EpochPlan, FieldBatch, PlanSpec, Shuffle};

    use super::*;

    fn spec(world_size: u64, rank: u64) -> PlanSpec {
        PlanSpec {
            num_samples: 50,
            batch_size: 8,
            drop_last: false,
            shuffle: Shuffle::Full,
            seed: 1,
            rank,
            world_size,
            block_len: 1,
            shuffle_window: 1,
            reshard: None,
        }
    }

    fn batches(spec: &PlanSpec, epoch: u64, range: std::ops::Range<u64>) -> Vec<Batch> {
        let plan = EpochPlan::new(spec.clone(), epoch).expect("plan");
        range
            .map(|index| Batch {
                epoch,
                index,
                indices: plan.batch(index),
                fields: Vec::<FieldBatch>::new(),
                decoded_bytes: 0,
            })
            .collect()
    }

    fn verdicts(spec: PlanSpec, batches: &[Batch]) -> anyhow::Result<Vec<String>> {
        let mut check = ExactlyOnce::new(spec);
        let mut lines = Vec::new();
        for batch in batches {
            lines.extend(check.add(batch)?);
        }
        lines.extend(check.finish()?);
        Ok(lines)
    }

    #[test]
    fn whole_epochs_shares_and_partial_epochs_are_each_named() {
        let whole = [batches(&spec(1, 0), 0, 0..7), batches(&spec(1, 0), 1, 0..7)].concat();
        assert_eq!(
            verdicts(spec(1, 0), &whole).expect("exactly once"),
            vec!["epoch 0: every sample exactly once", "epoch 1: every sample exactly once"]
        );
        let share = verdicts(spec(2, 1), &batches(&spec(2, 1), 0, 0..4)).expect("exactly once");
        assert_eq!(share.len(), 1);
        assert!(share[0].contains("rank 1's share exactly once (25 of 50 samples"), "{share:?}");
        let partial = verdicts(spec(1, 0), &batches(&spec(1, 0), 3, 2..7)).expect("exactly once");
        assert!(partial[0].starts_with("epoch 3: batches 2..7 of 7 arrived, each of their 34 samples"), "{partial:?}");
    }

    #[test]
    fn a_repeated_a_missing_or_an_out_of_order_batch_fails() {
        let mut repeated = batches(&spec(1, 0), 0, 0..7);
        let again = repeated[2].indices[0];
        repeated[3].indices.push(again);
        let error = verdicts(spec(1, 0), &repeated).expect_err("twice");
        assert!(error.to_string().contains("more often than planned"), "{error}");
        let mut missing = batches(&spec(1, 0), 0, 0..7);
        missing[6].indices.pop();
        assert!(verdicts(spec(1, 0), &missing).expect_err("missing").to_string().contains("never arrived"));
        let mut swapped = batches(&spec(1, 0), 0, 0..7);
        swapped.swap(1, 2);
        assert!(verdicts(spec(1, 0), &swapped).expect_err("order").to_string().contains("where batch 1 was due"));
    }
}
