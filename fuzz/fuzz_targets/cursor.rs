//! A cursor file's bytes, as `--resume` reads them: parsed, turned into a run and its first
//! epoch's plan. Hostile values get errors, never a panic, overflow or huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trainer_client::{Cursor, EpochPlan, RunSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(cursor) = serde_json::from_slice::<Cursor>(data) else { return };
    let spec = RunSpec::resume(&cursor, 3);
    let Ok(plan) = EpochPlan::new(spec.plan.clone(), spec.epochs.start) else { return };
    if spec.start_batch < plan.num_batches() && spec.plan.batch_size <= 1 << 16 {
        let batch = plan.batch(spec.start_batch);
        assert!(batch.iter().all(|&i| i < plan.spec().num_samples));
    }
});
