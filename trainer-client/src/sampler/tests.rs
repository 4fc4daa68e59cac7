//! Properties of the permutation, block shuffle and rank split.
use super::*;
use proptest::prelude::*;

fn spec(num_samples: u64, batch_size: u64, shuffle: Shuffle, rank: u64, world_size: u64, drop_last: bool) -> PlanSpec {
    PlanSpec {
        num_samples,
        batch_size,
        drop_last,
        shuffle,
        seed: 7,
        rank,
        world_size,
        block_len: 1,
        shuffle_window: 1,
        reshard: None,
    }
}

fn all_indices(plan: &EpochPlan) -> Vec<u64> {
    (0..plan.num_batches()).flat_map(|b| plan.batch(b)).collect()
}

proptest! {
    #[test]
    fn permutation_is_a_bijection(len in 1u64..3000, seed: u64, epoch in 0u64..1000) {
        let p = Permutation::new(len, seed, epoch);
        let mut seen = vec![false; len as usize];
        for i in 0..len {
            let x = p.apply(i);
            prop_assert!(x < len);
            prop_assert!(!seen[x as usize], "{} hit twice", x);
            seen[x as usize] = true;
        }
    }

    #[test]
    fn permutation_is_deterministic(len in 1u64..1_000_000_000_000, seed: u64, epoch: u64, position_seed: u64) {
        let position = position_seed % len;
        prop_assert_eq!(Permutation::new(len, seed, epoch).apply(position), Permutation::new(len, seed, epoch).apply(position));
    }

    #[test]
    fn ranks_are_disjoint_cover_the_epoch_and_are_equal(n in 1u64..500, batch in 1u64..40, world in 1u64..6, drop_last: bool) {
        let plans: Vec<EpochPlan> = (0..world)
            .map(|r| EpochPlan::new(spec(n, batch, Shuffle::Full, r, world, drop_last), 3).expect("valid"))
            .collect();
        let counts: Vec<u64> = plans.iter().map(EpochPlan::num_batches).collect();
        prop_assert!(counts.iter().all(|&c| c == counts[0]), "unequal batch counts {:?}", counts);
        let mut all: Vec<u64> = plans.iter().flat_map(all_indices).collect();
        let total = all.len() as u64;
        all.sort_unstable();
        let distinct = { let mut d = all.clone(); d.dedup(); d.len() as u64 };
        if drop_last {
            // Whole batches only, nothing repeated.
            prop_assert_eq!(distinct, total);
            prop_assert_eq!(total, world * ((n / world) / batch) * batch);
        } else {
            // Everything once, plus at most world-1 wrapped repeats.
            prop_assert_eq!(distinct, n);
            prop_assert_eq!(total, n.div_ceil(world) * world);
        }
    }
}

proptest! {
    #[test]
    fn invert_undoes_apply(len in 1u64..100_000, seed: u64, position_seed: u64) {
        let p = Permutation::new(len, seed, 1);
        let position = position_seed % len;
        prop_assert_eq!(p.invert(p.apply(position)), position);
    }

    #[test]
    fn block_shuffle_visits_every_sample_once_window_by_window(
        n in 1u64..3000, block_len in 1u64..70, window in 1u64..9, seed: u64, epoch in 0u64..5,
    ) {
        let order = BlockOrder::new(n, block_len, window, seed, epoch);
        let mut seen = vec![false; n as usize];
        let span = window * block_len;
        for position in 0..n {
            let sample = order.apply(position);
            prop_assert!(sample < n);
            prop_assert!(!seen[sample as usize], "{} twice", sample);
            seen[sample as usize] = true;
        }
        // Chunk locality: all samples of one block are served within one window, i.e.
        // within `window * block_len` consecutive positions.
        let mut first_last = vec![(u64::MAX, 0u64); n.div_ceil(block_len) as usize];
        for position in 0..n {
            let entry = &mut first_last[(order.apply(position) / block_len) as usize];
            *entry = (entry.0.min(position), entry.1.max(position));
        }
        for (block, (first, last)) in first_last.into_iter().enumerate() {
            prop_assert!(last - first < span, "block {} spread over positions {}..={}", block, first, last);
        }
    }
}

#[test]
fn block_shuffle_mixes_blocks_within_batches() {
    let spec = PlanSpec {
        shuffle: Shuffle::Block,
        block_len: 64,
        shuffle_window: 8,
        ..spec(64 * 100, 64, Shuffle::Block, 0, 1, false)
    };
    let plan = EpochPlan::new(spec.clone(), 0).expect("valid");
    let first = plan.batch(0);
    let blocks: std::collections::BTreeSet<u64> = first.iter().map(|i| i / 64).collect();
    assert!(blocks.len() >= 5, "a batch of 64 draws from several of the window's 8 blocks: {blocks:?}");
    let again = EpochPlan::new(spec.clone(), 0).expect("valid").batch(0);
    let next = EpochPlan::new(spec, 1).expect("valid").batch(0);
    assert_eq!(first, again);
    assert_ne!(first, next);
}

#[test]
fn full_shuffle_differs_between_epochs_and_seeds_and_is_not_identity() {
    let base = spec(10_000, 100, Shuffle::Full, 0, 1, false);
    let a = all_indices(&EpochPlan::new(base.clone(), 0).expect("valid"));
    let b = all_indices(&EpochPlan::new(base.clone(), 1).expect("valid"));
    let c = all_indices(&EpochPlan::new(PlanSpec { seed: 8, ..base }, 0).expect("valid"));
    let identity: Vec<u64> = (0..10_000).collect();
    assert_ne!(a, identity);
    assert_ne!(a, b);
    assert_ne!(a, c);
    // A shuffle that moved few samples would be useless for training.
    let fixed_points = a.iter().enumerate().filter(|(i, x)| *i as u64 == **x).count();
    assert!(fixed_points < 50, "{fixed_points} fixed points");
}

#[test]
fn no_shuffle_is_dataset_order_with_a_short_last_batch() {
    let plan = EpochPlan::new(spec(10, 4, Shuffle::None, 0, 1, false), 0).expect("valid");
    assert_eq!(plan.num_batches(), 3);
    assert_eq!(plan.batch(2), vec![8, 9]);
    let dropped = EpochPlan::new(spec(10, 4, Shuffle::None, 0, 1, true), 0).expect("valid");
    assert_eq!(dropped.num_batches(), 2);
    assert_eq!(dropped.num_samples(), 8);
}

#[test]
fn bad_settings_are_named() {
    assert_eq!(EpochPlan::new(spec(10, 0, Shuffle::None, 0, 1, false), 0).err(), Some(PlanError::ZeroBatchSize));
    assert_eq!(
        EpochPlan::new(spec(10, 1, Shuffle::None, 2, 2, false), 0).err(),
        Some(PlanError::BadRank { rank: 2, world_size: 2 })
    );
}

#[test]
fn huge_epochs_need_no_index_memory() {
    let n = 1_000_000_000_003;
    let plan = EpochPlan::new(spec(n, 256, Shuffle::Full, 0, 1, false), 5).expect("valid");
    assert_eq!(plan.num_batches(), n.div_ceil(256));
    let last = plan.batch(plan.num_batches() - 1);
    assert_eq!(last.len(), 3);
    assert!(last.iter().all(|&i| i < n));
}

/// Every rank's first `taken` batches of `epoch` under `spec` (all of them when `None`).
fn taken(spec: &PlanSpec, epoch: u64, taken: Option<u64>) -> Vec<u64> {
    let mut out = Vec::new();
    for rank in 0..spec.world_size {
        let plan = EpochPlan::new(PlanSpec { rank, ..spec.clone() }, epoch).expect("valid");
        for batch in 0..taken.unwrap_or(plan.num_batches()).min(plan.num_batches()) {
            out.extend(plan.batch(batch));
        }
    }
    out
}

#[test]
fn a_resume_at_another_world_size_delivers_the_rest_of_the_epoch_once() {
    for shuffle in [Shuffle::None, Shuffle::Full, Shuffle::Block] {
        for (n, stop, new_world) in [(103, 3, 3), (103, 2, 6), (64, 1, 1), (40, 5, 2), (97, 0, 5)] {
            for drop_last in [false, true] {
                let old = PlanSpec { block_len: 8, shuffle_window: 2, ..spec(n, 4, shuffle, 0, 4, drop_last) };
                let mut seen = taken(&old, 1, Some(stop));
                let resumed = old.resharded(1, stop, 0, new_world).expect("valid");
                let counts: Vec<u64> = (0..new_world)
                    .map(|rank| EpochPlan::new(PlanSpec { rank, ..resumed.clone() }, 1).expect("valid").num_batches())
                    .collect();
                assert!(counts.windows(2).all(|w| w[0] == w[1]), "every new rank gets as many batches: {counts:?}");
                seen.extend(taken(&resumed, 1, None));
                let distinct: std::collections::BTreeSet<u64> = seen.iter().copied().collect();
                let case = format!("{shuffle:?} n={n} stop={stop} W'={new_world} drop_last={drop_last}");
                assert!(distinct.iter().all(|&i| i < n), "{case}");
                if drop_last {
                    assert_eq!(distinct.len(), seen.len(), "{case}: no sample twice");
                    assert!(
                        n as usize - distinct.len() < 4 * 4 + 4 * new_world as usize,
                        "{case}: only a short tail cut"
                    );
                } else {
                    assert_eq!(distinct.len(), n as usize, "{case}: every sample");
                    assert!(seen.len() - distinct.len() < 4 + new_world as usize, "{case}: repeats are padding only");
                }
                // The next epoch is split among the new ranks from its start.
                let next: Vec<u64> = taken(&resumed, 2, None);
                let next_distinct: std::collections::BTreeSet<u64> = next.iter().copied().collect();
                assert_eq!(next, taken(&PlanSpec { world_size: new_world, ..old.clone() }, 2, None), "{case}");
                assert!(drop_last || next_distinct.len() == n as usize, "{case}");
            }
        }
    }
}

#[test]
fn resharding_twice_in_one_epoch_keeps_counting_what_was_taken() {
    let first = spec(200, 3, Shuffle::Full, 0, 4, false);
    let mut seen = taken(&first, 0, Some(4));
    let second = first.resharded(0, 4, 0, 3).expect("valid");
    seen.extend(taken(&second, 0, Some(5)));
    let third = second.resharded(0, 5, 0, 5).expect("valid");
    assert_eq!(third.reshard.map(|r| r.consumed), Some(4 * 3 * 4 + 5 * 3 * 3));
    seen.extend(taken(&third, 0, None));
    let distinct: std::collections::BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(distinct.len(), 200);
    assert!(seen.len() - distinct.len() < 5, "padding only");
    assert!(first.resharded(0, 1, 4, 4).is_err(), "rank 4 of 4");
    assert_eq!(first.resharded(0, 1, 2, 4).expect("same world").reshard, None);
}
