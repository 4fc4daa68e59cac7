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
pub struct ExactlyOnce {
    spec: PlanSpec,
    tally: Option<Tally>,
}

impl ExactlyOnce {
    /// A checker for runs of `spec`.
    pub fn new(spec: PlanSpec) -> ExactlyOnce {
        ExactlyOnce { spec, tally: None }
    }

    /// Counts a batch; returns the verdict line of the epoch it ended, if it ended one.
    ///
    /// # Errors
    /// The epoch that ended was not exactly once, or batches arrived out of order.
    pub fn add(&mut self, batch: &Batch) -> anyhow::Result<Option<String>> {
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
    pub fn finish(&mut self) -> anyhow::Result<Option<String>> {
        let Some(mut tally) = self.tally.take() else { return Ok(None) };
        for batch in tally.first_batch..tally.next_batch {
            for index in tally.plan.batch(batch) {
                tally.balance[index as usize] = tally.balance[index as usize].wrapping_sub(1);
            }
        }
        if let Some(index) = tally.balance.iter().position(|&b| b != 0) {
            let what = if tally.balance[index] < 128 { "arrived more often than planned" } else { "never arrived" };
            bail!("sample {index} {what} in epoch {}", tally.epoch);
        }
        let spec = &self.spec;
        let (epoch, n) = (tally.epoch, tally.num_samples);
        let whole = tally.first_batch == 0 && tally.next_batch == tally.plan.num_batches();
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
