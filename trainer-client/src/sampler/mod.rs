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
//!
//! # Resuming at another world size
//! After every rank has taken `s` batches of `B`, the positions taken are exactly the epoch's
//! first `s × B × W` (rank `r` took `r, r + W, ...`). A run resumed with `W'` ranks
//! ([`PlanSpec::resharded`]) splits the rest of that epoch, positions `s × B × W ..`, the same way
//! among its ranks (padding by wrapping within the rest, or cutting with `drop_last`): the union of
//! what all ranks get before and after is the whole epoch, and every new rank gets the same number
//! of batches. The following epochs are split among the `W'` ranks from their start.

use conveyor_proto::splitmix64;
use serde::{Deserialize, Serialize};

/// Feistel rounds; 6 rounds of a strong mixer leave no visible structure in the output.
pub(crate) const ROUNDS: usize = 6;

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

/// A keyed bijection of `[0, len)`; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct Permutation {
    len: u64,
    half_bits: u32,
    round_keys: [u64; ROUNDS],
}

impl Permutation {
    /// The permutation of `[0, len)` for `(seed, epoch)`.
    pub(crate) fn new(len: u64, seed: u64, epoch: u64) -> Permutation {
        let bits = (64 - len.saturating_sub(1).leading_zeros()).max(2);
        let half_bits = bits.div_ceil(2);
        let mut state = splitmix64(seed ^ splitmix64(epoch ^ 0x5eed_0fe9_0c00));
        let round_keys = std::array::from_fn(|_| {
            state = splitmix64(state);
            state
        });
        Permutation { len, half_bits, round_keys }
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (x >> self.half_bits, x & mask);
        for key in self.round_keys {
            let f = splitmix64(right ^ key) & mask;
            (left, right) = (right, left ^ f);
        }
        (left << self.half_bits) | right
    }

    fn feistel_inverse(&self, y: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (y >> self.half_bits, y & mask);
        for key in self.round_keys.iter().rev() {
            let f = splitmix64(left ^ key) & mask;
            (left, right) = (right ^ f, left);
        }
        (left << self.half_bits) | right
    }

    /// The position holding sample `sample` (`< len`): the inverse of [`Permutation::apply`].
    pub(crate) fn invert(&self, sample: u64) -> u64 {
        debug_assert!(sample < self.len);
        let mut x = self.feistel_inverse(sample);
        while x >= self.len {
            x = self.feistel_inverse(x);
        }
        x
    }

    /// The sample at position `position` (`< len`).
    pub(crate) fn apply(&self, position: u64) -> u64 {
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
    /// For a run resumed at another world size: the positions of one epoch that ranks of the
    /// earlier world size took; this plan splits the rest of that epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reshard: Option<Reshard>,
}

/// Positions of an epoch taken before the world size changed (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reshard {
    /// The epoch they belong to.
    pub epoch: u64,
    /// Its first positions taken, in order (`consumed` of them).
    pub consumed: u64,
}

fn one() -> u64 {
    1
}

impl PlanSpec {
    /// Positions of `epoch` taken before this plan's ranks started on it.
    fn consumed_before(&self, epoch: u64) -> u64 {
        self.reshard.filter(|r| r.epoch == epoch).map_or(0, |r| r.consumed.min(self.num_samples))
    }

    /// The plan for rank `rank` of `world_size` ranks resuming where every rank of this plan had
    /// taken `next_batch` batches of `epoch`: the rest of that epoch split among the new ranks
    /// (see the module docs), batch 0 of it first. With the same world size it is this plan at
    /// another rank (and the caller resumes at `next_batch` as usual).
    ///
    /// # Errors
    /// [`PlanError`] for a rank outside the new world.
    pub fn resharded(&self, epoch: u64, next_batch: u64, rank: u64, world_size: u64) -> Result<PlanSpec, PlanError> {
        if world_size == 0 || rank >= world_size {
            return Err(PlanError::BadRank { rank, world_size });
        }
        if world_size == self.world_size {
            return Ok(PlanSpec { rank, ..self.clone() });
        }
        let before = EpochPlan::new(self.clone(), epoch)?;
        let taken_per_rank = next_batch.saturating_mul(self.batch_size).min(before.samples_per_rank);
        let consumed = self.consumed_before(epoch).saturating_add(taken_per_rank.saturating_mul(self.world_size));
        Ok(PlanSpec {
            rank,
            world_size,
            reshard: Some(Reshard { epoch, consumed: consumed.min(self.num_samples) }),
            ..self.clone()
        })
    }
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
        let inner = Permutation::new(size, self.seed ^ splitmix64(window.wrapping_add(0xb10c)), self.epoch);
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
    /// A data-loading worker outside the worker count.
    #[error("worker {index} is not below the number of workers {count}")]
    BadWorker {
        /// The worker index.
        index: u64,
        /// The number of workers.
        count: u64,
    },
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
        // A resharded epoch splits what the earlier ranks left.
        let n = spec.num_samples - spec.consumed_before(epoch);
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
        let all = spec.num_samples;
        let order = match spec.shuffle {
            _ if all == 0 => Order::Identity,
            Shuffle::None => Order::Identity,
            Shuffle::Full => Order::Full(Permutation::new(all, spec.seed, epoch)),
            Shuffle::Block => Order::Block(BlockOrder::new(all, spec.block_len, spec.shuffle_window, spec.seed, epoch)),
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
        let consumed = self.spec.consumed_before(self.epoch);
        let position = consumed + (k * self.spec.world_size + self.spec.rank) % (self.spec.num_samples - consumed);
        match &self.order {
            Order::Identity => position,
            Order::Full(permutation) => permutation.apply(position),
            Order::Block(blocks) => blocks.apply(position),
        }
    }
}

#[cfg(test)]
mod tests;
