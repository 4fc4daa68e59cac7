//! A small serialisable position in the stream: enough to continue exactly where a training
//! run stopped. A training script stores it in its own checkpoint, beside the model weights.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::sampler::PlanSpec;

/// Where a run is: the plan settings, the epoch, and the next batch the trainer has not yet
/// consumed.
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
}

impl Cursor {
    /// Writes the cursor as JSON, atomically (a reader sees the old or the new one, never half).
    ///
    /// # Errors
    /// The I/O error, naming the file.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        let tmp = path.with_extension("tmp");
        let json = serde_json::to_vec_pretty(self).context("serialising the cursor")?;
        std::fs::write(&tmp, json).with_context(|| format!("cannot write cursor {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write cursor {}", path.display()))?;
        Ok(())
    }

    /// Reads a cursor written by [`Cursor::save`].
    ///
    /// # Errors
    /// A message naming the file when it is missing or not a cursor.
    pub fn load(path: &Path) -> anyhow::Result<Cursor> {
        use anyhow::Context;
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read cursor {} (--resume-from)", path.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a cursor written by --save-cursor", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::Shuffle;

    #[test]
    fn cursor_round_trips_through_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cursor.json");
        let cursor = Cursor {
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
            },
            epoch: 2,
            next_batch: 1,
        };
        cursor.save(&path).expect("save");
        assert_eq!(Cursor::load(&path).expect("load"), cursor);
        std::fs::write(&path, b"{}").expect("write");
        assert!(format!("{:#}", Cursor::load(&path).expect_err("not a cursor")).contains("--save-cursor"));
    }
}
