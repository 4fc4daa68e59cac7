//! Chunk affinity: on chunked datasets (Zarr), a batch goes to the replica its chunks were
//! recently sent to, so each chunk is decoded in one replica's cache rather than in all of them.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
};

/// Which replica each recently requested block (a chunk of a chunked dataset) was sent to, for
/// at most [`BlockAffinity::CAPACITY`] blocks; the oldest entry is forgotten first.
#[derive(Debug, Default)]
pub(crate) struct BlockAffinity {
    owner: HashMap<u64, SocketAddr>,
    order: VecDeque<u64>,
}

impl BlockAffinity {
    /// Enough for the windows of many batches in flight; 4096 entries are about 150 KiB.
    pub const CAPACITY: usize = 4096;

    /// The replica most of `blocks` were sent to, if any was.
    pub fn preferred(&self, blocks: &[u64]) -> Option<SocketAddr> {
        let mut votes: Vec<(SocketAddr, usize)> = Vec::new();
        for addr in blocks.iter().filter_map(|b| self.owner.get(b)) {
            match votes.iter_mut().find(|(a, _)| a == addr) {
                Some((_, n)) => *n += 1,
                None => votes.push((*addr, 1)),
            }
        }
        votes.into_iter().max_by_key(|&(_, n)| n).map(|(addr, _)| addr)
    }

    /// Remembers that `blocks` went to `addr`.
    pub fn record(&mut self, blocks: &[u64], addr: SocketAddr) {
        for &block in blocks {
            if self.owner.insert(block, addr).is_none() {
                self.order.push_back(block);
            }
        }
        while self.order.len() > Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.owner.remove(&old);
            }
        }
    }

    /// Forgets everything (a new run, whose blocks mean other chunks).
    pub fn clear(&mut self) {
        self.owner.clear();
        self.order.clear();
    }
}

/// The distinct blocks of `block_len` samples that `indices` touch (none when `block_len` is 1:
/// unchunked data has nothing to share).
pub(crate) fn blocks_of(indices: &[u64], block_len: u64) -> Vec<u64> {
    if block_len <= 1 {
        return Vec::new();
    }
    let mut blocks: Vec<u64> = indices.iter().map(|i| i / block_len).collect();
    blocks.sort_unstable();
    blocks.dedup();
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn blocks_are_the_distinct_chunks_a_batch_touches() {
        assert_eq!(blocks_of(&[70, 3, 64, 130, 5], 64), vec![0, 1, 2]);
        assert!(blocks_of(&[70, 3], 1).is_empty(), "unchunked data has no blocks to share");
    }

    #[test]
    fn a_batch_goes_where_most_of_its_blocks_went_and_old_blocks_are_forgotten() {
        let mut affinity = BlockAffinity::default();
        assert_eq!(affinity.preferred(&[1, 2]), None);
        affinity.record(&[1, 2], addr(1));
        affinity.record(&[3], addr(2));
        assert_eq!(affinity.preferred(&[1, 2, 3]), Some(addr(1)));
        assert_eq!(affinity.preferred(&[3, 9]), Some(addr(2)));
        let many: Vec<u64> = (100..100 + BlockAffinity::CAPACITY as u64).collect();
        affinity.record(&many, addr(3));
        assert_eq!(affinity.owner.len(), BlockAffinity::CAPACITY);
        assert_eq!(affinity.preferred(&[1, 2, 3]), None, "the oldest blocks were forgotten first");
    }
}
