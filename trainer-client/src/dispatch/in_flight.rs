//! The requests in flight: the replica each went to, the run and position it answers, and when
//! it was sent. Batch ids are fresh per send, so an answer to a request that was re-sent, or
//! that arrives on a dropped connection, finds no entry and is ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::addr::ReplicaAddr;

/// A request in flight.
#[derive(Debug)]
pub(super) struct InFlight {
    /// The replica it went to.
    pub addr: ReplicaAddr,
    /// The run it belongs to.
    pub run: u64,
    /// Its number within that run.
    pub seq: u64,
    /// When it was sent, for the request timeout.
    pub sent_at: Instant,
}

/// Every request in flight, by batch id (bounded by the prefetch window of each replica).
#[derive(Debug, Default)]
pub(super) struct Requests {
    by_batch: BTreeMap<u64, InFlight>,
    next_batch_id: u64,
}

impl Requests {
    /// Requests in flight.
    pub(super) fn len(&self) -> usize {
        self.by_batch.len()
    }

    /// The batch id the next send will carry.
    pub(super) fn next_batch_id(&self) -> u64 {
        self.next_batch_id
    }

    /// Records that the request with [`Requests::next_batch_id`] was sent.
    pub(super) fn sent(&mut self, flight: InFlight) {
        self.by_batch.insert(self.next_batch_id, flight);
        self.next_batch_id += 1;
    }

    /// The request an answer carrying `batch_id` answers, no longer in flight.
    pub(super) fn answered(&mut self, batch_id: u64) -> Option<InFlight> {
        self.by_batch.remove(&batch_id)
    }

    /// Every request sent to `addr`, no longer in flight, oldest first.
    pub(super) fn lost_with(&mut self, addr: &ReplicaAddr) -> Vec<InFlight> {
        let ids: Vec<u64> = self.by_batch.iter().filter(|(_, f)| f.addr == *addr).map(|(id, _)| *id).collect();
        ids.into_iter().filter_map(|id| self.by_batch.remove(&id)).collect()
    }

    /// When the oldest request passes `timeout`.
    pub(super) fn next_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.by_batch.values().map(|f| f.sent_at + timeout).min()
    }

    /// The replicas holding a request older than `timeout` at `now`.
    pub(super) fn late(&self, now: Instant, timeout: Duration) -> BTreeSet<ReplicaAddr> {
        self.by_batch.values().filter(|f| now >= f.sent_at + timeout).map(|f| f.addr.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_found_by_their_fresh_id_and_lost_with_their_replica_in_order() {
        let a = ReplicaAddr::unix("unix:/run/a.sock").expect("addr");
        let b = ReplicaAddr::unix("unix:/run/b.sock").expect("addr");
        let start = Instant::now();
        let mut requests = Requests::default();
        for (seq, addr) in [(0, &a), (1, &b), (2, &a)] {
            let sent_at = start + Duration::from_secs(seq);
            requests.sent(InFlight { addr: addr.clone(), run: 7, seq, sent_at });
        }
        assert_eq!((requests.len(), requests.next_batch_id()), (3, 3));
        assert_eq!(requests.next_deadline(Duration::from_secs(10)), Some(start + Duration::from_secs(10)));
        let late = requests.late(start + Duration::from_secs(11), Duration::from_secs(10));
        assert_eq!(late.into_iter().collect::<Vec<_>>(), vec![a.clone(), b.clone()]);
        assert_eq!(requests.answered(1).map(|f| f.seq), Some(1));
        assert!(requests.answered(1).is_none(), "an answer counts once");
        let lost: Vec<u64> = requests.lost_with(&a).into_iter().map(|f| f.seq).collect();
        assert_eq!(lost, vec![0, 2]);
        assert_eq!((requests.len(), requests.next_batch_id()), (0, 3), "ids are never reused");
    }
}
