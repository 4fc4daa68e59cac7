//! Chunk affinity: on chunked datasets (Zarr), a batch goes to the replica its chunks were
//! recently sent to, so each chunk is decoded in one replica's cache rather than in all of them.

use crate::addr::ReplicaAddr;
use std::collections::{HashMap, VecDeque};

/// Which replica each recently requested block (a chunk of a chunked dataset) was sent to, for
/// at most [`BlockAffinity::CAPACITY`] blocks; the oldest entry is forgotten first.
#[derive(Debug, Default)]
pub(crate) struct BlockAffinity {
    owner: HashMap<u64, ReplicaAddr>,
    order: VecDeque<u64>,
}

impl BlockAffinity {
    /// Enough for the windows of many batches in flight; 4096 entries are about 150 KiB.
    pub(super) const CAPACITY: usize = 4096;

    /// The replica most of `blocks` were sent to, if any was.
    pub(super) fn preferred(&self, blocks: &[u64]) -> Option<Preferred> {
        let mut votes: Vec<(ReplicaAddr, usize)> = Vec::new();
        for addr in blocks.iter().filter_map(|b| self.owner.get(b)) {
            match votes.iter_mut().find(|(a, _)| a == addr) {
                Some((_, n)) => *n += 1,
                None => votes.push((addr.clone(), 1)),
            }
        }
        votes.into_iter().max_by_key(|&(_, n)| n).map(|(addr, n)| Preferred { addr, owns_all: n == blocks.len() })
    }

    /// Remembers that `blocks` went to `addr`.
    pub(super) fn record(&mut self, blocks: &[u64], addr: ReplicaAddr) {
        for &block in blocks {
            if self.owner.insert(block, addr.clone()).is_none() {
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
    pub(super) fn clear(&mut self) {
        self.owner.clear();
        self.order.clear();
    }
}

/// The replica a batch's blocks went to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Preferred {
    /// The replica most of the blocks went to.
    pub addr: ReplicaAddr,
    /// Every block of the batch went there: the batch continues a window that replica has begun
    /// decoding.
    pub owns_all: bool,
}

/// Where a request goes, given the replicas with credit and their requests in flight: the one
/// its blocks went to (`preferred`) while it has credit, if the batch continues a window that
/// replica owns entirely; otherwise while that one has at most a little more work than the least
/// loaded — half an even share of the prefetch window over the `num_up` replicas, at least one
/// batch; else the least loaded. `None` when no replica has credit. Windows that nobody owns yet
/// go to the least loaded, which is what keeps the load even.
pub(crate) fn choose_replica(
    loads: &[(ReplicaAddr, usize)],
    preferred: Option<Preferred>,
    window: usize,
    num_up: usize,
) -> Option<ReplicaAddr> {
    let (least, least_in_flight) = loads.iter().min_by_key(|(_, n)| *n).cloned()?;
    let slack = (window / (2 * num_up.max(1))).max(1);
    preferred
        .filter(|p| loads.iter().any(|(a, n)| *a == p.addr && (p.owns_all || *n <= least_in_flight + slack)))
        .map(|p| p.addr)
        .or(Some(least))
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

    fn addr(port: u16) -> ReplicaAddr {
        ReplicaAddr::Tcp(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn a_preferred_replica_gets_the_request_unless_it_is_too_far_ahead() {
        let loads = [(addr(1), 3), (addr(2), 1)];
        let part = |port| Some(Preferred { addr: addr(port), owns_all: false });
        // Window 8 over 2 replicas: slack 2.
        assert_eq!(choose_replica(&loads, part(1), 8, 2), Some(addr(1)));
        assert_eq!(choose_replica(&[(addr(1), 4), (addr(2), 1)], part(1), 8, 2), Some(addr(2)));
        let all = Some(Preferred { addr: addr(1), owns_all: true });
        assert_eq!(
            choose_replica(&[(addr(1), 7), (addr(2), 0)], all, 8, 2),
            Some(addr(1)),
            "a window's owner keeps it"
        );
        assert_eq!(choose_replica(&loads, None, 8, 2), Some(addr(2)), "no preference: the least loaded");
        assert_eq!(choose_replica(&loads, part(9), 8, 2), Some(addr(2)), "a preferred replica without credit");
        assert_eq!(choose_replica(&[], part(1), 8, 2), None);
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
        assert_eq!(affinity.preferred(&[1, 2, 3]), Some(Preferred { addr: addr(1), owns_all: false }));
        assert_eq!(affinity.preferred(&[3, 9]), Some(Preferred { addr: addr(2), owns_all: false }));
        assert_eq!(affinity.preferred(&[1, 2]), Some(Preferred { addr: addr(1), owns_all: true }));
        let many: Vec<u64> = (100..100 + BlockAffinity::CAPACITY as u64).collect();
        affinity.record(&many, addr(3));
        assert_eq!(affinity.owner.len(), BlockAffinity::CAPACITY);
        assert_eq!(affinity.preferred(&[1, 2, 3]), None, "the oldest blocks were forgotten first");
    }
}
