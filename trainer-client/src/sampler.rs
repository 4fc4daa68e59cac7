//! Which samples go in which batch: a deterministic epoch plan from (seed, epoch, rank,
//! world size), computed per position so no index list is ever materialised.
//!
//! # The permutation
//! `full` shuffle maps position `p` of the epoch to sample `π(p)`, where `π` is a keyed
//! pseudo-random bijection of `[0, N)`:
//!
//! 1. Take the smallest even bit width `2h >= log2(N)` (at least 2), so the domain `[0, 4^h)` is
//!    less than 4N.
//! 2. A balanced Feistel network on `2h` bits: split `x` into halves `(L, R)` of `h` bits and
//!    apply [`ROUNDS`] rounds of `(L, R) -> (R, L xor F_k(R))`, where `F_k` is a 64-bit mixer
//!    (the SplitMix64 finaliser) of the right half and a per-round key. Whatever `F` is, each
//!    round is invertible, so the network is a bijection of `[0, 4^h)`.
//! 3. Cycle walking: if the result is `>= N`, apply the network again to the result until it
//!    falls in `[0, N)`. Because the network is a bijection of the larger domain, following
//!    its cycle from a point in `[0, N)` restricts it to a bijection of `[0, N)`; as the domain is
//!    under 4N, the expected number of walks is under 4.
//!
//! The round keys come from SplitMix64 of `(seed, epoch)`, so the same seed and epoch give the
//! same order on every machine, and every epoch a different one. Cost: O(1) memory and a few
//! dozen multiplications per sample, so a billion-sample epoch needs no index array and any
//! batch can be computed directly (which is what resuming and retrying rely on).
//!
//! # Block shuffle (chunked storage)
//! `block` shuffle serves chunked, compressed data (Zarr), where reading one sample means
//! decoding its whole chunk. The epoch visits chunk-aligned blocks of `block_len` samples in a
//! random order (a keyed permutation of the blocks, as above), taken `window` blocks at a time;
//! the samples of each window are shuffled by a permutation keyed by (seed, epoch, window).
//! Each chunk is then needed during one window only, so the loader's cache decodes it about
//! once per epoch (read amplification ≈ 1), while every batch still mixes samples of `window`
//! chunks. The trade-off against `full`: two samples of one chunk always land in the same
//! window, i.e. within `window × block_len` positions of each other, so correlations inside a
//! chunk (neighbouring EEG windows of one recording) reach a batch more often. A larger window
//! mixes more at the cost of `window` decoded chunks in the loader's cache.
//!
//! Position → sample is computed directly, without lists: the window of a position follows
//! from the window sizes (all `window × block_len` except the window holding the short last
//! block, found with the inverse block permutation, and the final window).
//!
//! # Splitting between ranks
//! Like PyTorch's `DistributedSampler`: the permuted epoch is padded by wrapping around to a
//! multiple of the world size (or cut down to one when `drop_last`), and rank `r` takes
//! positions `r, r + W, r + 2W, ...`. Every rank gets the same number of samples and so the same
//! number of batches, which keeps collective operations in step.

use serde::{Deserialize, Serialize};

/// Feistel rounds; 6 rounds of a strong mixer leave no visible structure in the output.
pub const ROUNDS: usize = 6;

/// How the samples of an epoch are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shuffle {
    /// Dataset order.
    None,
    /// A uniform-looking permutation of the whole epoch.
    Full,
    /// Chunk-aligned blocks in random order, shuffled within windows of blocks (for chunked
    /// storage such as Zarr: each chunk is decoded about once per epoch).
    Block,
}

impl Shuffle {
    /// The name used by flags, cursors and the Python package.
    pub fn as_str(self) -> &'static str {
        match self {
            Shuffle::None => "none",
            Shuffle::Full => "full",
            Shuffle::Block => "block",
        }
    }
}

impl std::fmt::Display for Shuffle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Shuffle {
    type Err = String;

    fn from_str(text: &str) -> Result<Shuffle, String> {
        match text {
            "none" => Ok(Shuffle::None),
            "full" => Ok(Shuffle::Full),
            "block" => Ok(Shuffle::Block),
            _ => Err(format!("'{text}' is not a shuffle; use none, full or block")),
        }
    }
}

/// SplitMix64 step: a fast, well-mixed 64-bit hash (also the demo data's generator).
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A keyed bijection of `[0, len)`; see the module docs.
#[derive(Debug, Clone)]
pub struct Permutation {
    len: u64,
    half_bits: u32,
    round_keys: [u64; ROUNDS],
}

impl Permutation {
    /// The permutation of `[0, len)` for `(seed, epoch)`.
    pub fn new(len: u64, seed: u64, epoch: u64) -> Permutation {
        let bits = (64 - len.saturating_sub(1).leading_zeros()).max(2);
        let half_bits = bits.div_ceil(2);
        let mut state = mix64(seed ^ mix64(epoch ^ 0x5eed_0fe9_0c00));
        let round_keys = std::array::from_fn(|_| {
            state = mix64(state);
            state
        });
        Permutation { len, half_bits, round_keys }
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (x >> self.half_bits, x & mask);
        for key in self.round_keys {
            let f = mix64(right ^ key) & mask;
            (left, right) = (right, left ^ f);
        }
        (left << self.half_bits) | right
    }

    fn feistel_inverse(&self, y: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (y >> self.half_bits, y & mask);
        for key in self.round_keys.iter().rev() {
            let f = mix64(left ^ key) & mask;
            (left, right) = (right ^ f, left);
        }
        (left << self.half_bits) | right
    }

    /// The position holding sample `sample` (`< len`): the inverse of [`Permutation::apply`].
    pub fn invert(&self, sample: u64) -> u64 {
        debug_assert!(sample < self.len);
        let mut x = self.feistel_inverse(sample);
        while x >= self.len {
            x = self.feistel_inverse(x);
        }
        x
    }

    /// The sample at position `position` (`< len`).
    pub fn apply(&self, position: u64) -> u64 {
        debug_assert!(position < self.len);
        let mut x = self.feistel(position);
        while x >= self.len {
            x = self.feistel(x);
        }
        x
    }
}

/// Settings that decide an epoch's batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSpec {
    /// Samples in the dataset.
    pub num_samples: u64,
    /// Samples per batch.
    pub batch_size: u64,
    /// Drop samples that do not fill a whole batch (and, across ranks, an even share).
    pub drop_last: bool,
    /// Sample order.
    pub shuffle: Shuffle,
    /// Shuffle seed.
    pub seed: u64,
    /// This process's rank in data-parallel training.
    pub rank: u64,
    /// Number of data-parallel ranks.
    pub world_size: u64,
    /// Samples per storage block (the dataset's chunk length), for `block` shuffle.
    #[serde(default = "one")]
    pub block_len: u64,
    /// Blocks shuffled together, for `block` shuffle.
    #[serde(default = "one")]
    pub shuffle_window: u64,
}

fn one() -> u64 {
    1
}

/// The `block` order of one epoch; see the module docs.
#[derive(Debug, Clone)]
struct BlockOrder {
    num_samples: u64,
    block_len: u64,
    window: u64,
    num_blocks: u64,
    /// Length of the last block (`1..=block_len`).
    last_len: u64,
    /// Window holding the last block.
    last_window: u64,
    blocks: Permutation,
    seed: u64,
    epoch: u64,
}

impl BlockOrder {
    fn new(num_samples: u64, block_len: u64, window: u64, seed: u64, epoch: u64) -> BlockOrder {
        let num_blocks = num_samples.div_ceil(block_len);
        let blocks = Permutation::new(num_blocks, seed, epoch);
        let last_len = num_samples - (num_blocks - 1) * block_len;
        let last_window = blocks.invert(num_blocks - 1) / window;
        BlockOrder { num_samples, block_len, window, num_blocks, last_len, last_window, blocks, seed, epoch }
    }

    fn apply(&self, position: u64) -> u64 {
        debug_assert!(position < self.num_samples);
        let full = self.window * self.block_len;
        // Windows after the one with the short last block start `deficit` positions earlier.
        let deficit = self.block_len - self.last_len;
        let window = if position + deficit >= (self.last_window + 1) * full {
            (position + deficit) / full
        } else {
            position / full
        };
        let start = window * full - if window > self.last_window { deficit } else { 0 };
        let first_block = window * self.window;
        let num_blocks = self.window.min(self.num_blocks - first_block);
        let size = num_blocks * self.block_len - if window == self.last_window { deficit } else { 0 };
        let inner = Permutation::new(size, self.seed ^ mix64(window.wrapping_add(0xb10c)), self.epoch);
        let mut offset = inner.apply(position - start);
        for k in 0..num_blocks {
            let block = self.blocks.apply(first_block + k);
            let len = if block == self.num_blocks - 1 { self.last_len } else { self.block_len };
            if offset < len {
                return block * self.block_len + offset;
            }
            offset -= len;
        }
        unreachable!("window sizes add up to the samples of their blocks")
    }
}

/// How positions map to samples in one epoch.
#[derive(Debug, Clone)]
enum Order {
    Identity,
    Full(Permutation),
    Block(BlockOrder),
}

/// Why a plan cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// `--batch-size 0`.
    #[error("--batch-size must be at least 1")]
    ZeroBatchSize,
    /// `--shuffle-window 0` or a zero block length.
    #[error("--shuffle-window and the dataset's chunk length must be at least 1")]
    ZeroWindow,
    /// A rank outside the world.
    #[error("--rank {rank} is not below --world-size {world_size}; ranks count from 0")]
    BadRank {
        /// The rank.
        rank: u64,
        /// The world size.
        world_size: u64,
    },
}

/// The batches of one epoch for one rank.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    spec: PlanSpec,
    epoch: u64,
    order: Order,
    samples_per_rank: u64,
    num_batches: u64,
}

impl EpochPlan {
    /// Plans epoch `epoch` under `spec`.
    ///
    /// # Errors
    /// [`PlanError`] for a zero batch size or a rank outside the world.
    pub fn new(spec: PlanSpec, epoch: u64) -> Result<EpochPlan, PlanError> {
        if spec.batch_size == 0 {
            return Err(PlanError::ZeroBatchSize);
        }
        if spec.world_size == 0 || spec.rank >= spec.world_size {
            return Err(PlanError::BadRank { rank: spec.rank, world_size: spec.world_size });
        }
        let n = spec.num_samples;
        let samples_per_rank = if spec.drop_last { n / spec.world_size } else { n.div_ceil(spec.world_size) };
        let samples_per_rank = if n == 0 { 0 } else { samples_per_rank };
        let num_batches = if spec.drop_last {
            samples_per_rank / spec.batch_size
        } else {
            samples_per_rank.div_ceil(spec.batch_size)
        };
        if spec.shuffle == Shuffle::Block && (spec.shuffle_window == 0 || spec.block_len == 0) {
            return Err(PlanError::ZeroWindow);
        }
        let order = match spec.shuffle {
            _ if n == 0 => Order::Identity,
            Shuffle::None => Order::Identity,
            Shuffle::Full => Order::Full(Permutation::new(n, spec.seed, epoch)),
            Shuffle::Block => Order::Block(BlockOrder::new(n, spec.block_len, spec.shuffle_window, spec.seed, epoch)),
        };
        Ok(EpochPlan { spec, epoch, order, samples_per_rank, num_batches })
    }

    /// The settings.
    pub fn spec(&self) -> &PlanSpec {
        &self.spec
    }

    /// The epoch number.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Batches this rank receives in the epoch.
    pub fn num_batches(&self) -> u64 {
        self.num_batches
    }

    /// Samples this rank receives in the epoch.
    pub fn num_samples(&self) -> u64 {
        (self.num_batches * self.spec.batch_size).min(self.samples_per_rank)
    }

    /// The global sample indices of batch `batch` (`< num_batches`), in delivery order.
    pub fn batch(&self, batch: u64) -> Vec<u64> {
        let start = batch * self.spec.batch_size;
        let end = (start + self.spec.batch_size).min(self.samples_per_rank);
        (start..end).map(|k| self.sample_at(k)).collect()
    }

    /// The sample this rank sees at its local position `k`.
    fn sample_at(&self, k: u64) -> u64 {
        let position = (k * self.spec.world_size + self.spec.rank) % self.spec.num_samples;
        match &self.order {
            Order::Identity => position,
            Order::Full(permutation) => permutation.apply(position),
            Order::Block(blocks) => blocks.apply(position),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(
        num_samples: u64,
        batch_size: u64,
        shuffle: Shuffle,
        rank: u64,
        world_size: u64,
        drop_last: bool,
    ) -> PlanSpec {
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
}
