//! The in-flight byte budget (`--max-inflight-bytes`), shared fairly between streams.
//!
//! A plain semaphore lets whichever stream asks first take the whole budget: one client that
//! stops reading then holds every byte while the others wait. Here a stream that already holds
//! bytes may take more only up to its share, the budget divided by the streams holding or
//! waiting for bytes; a stream holding nothing may always take one batch when the bytes are free,
//! so every stream makes progress.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::Notify;

/// The byte budget of all streams.
#[derive(Debug)]
pub struct FairBudget {
    total: u64,
    state: Mutex<BudgetState>,
    /// Woken whenever bytes are released or a stream stops waiting.
    released: Notify,
}

#[derive(Debug, Default)]
struct BudgetState {
    used: u64,
    /// Per stream: bytes held and requests waiting.
    streams: HashMap<u64, StreamShare>,
}

#[derive(Debug, Default, Clone, Copy)]
struct StreamShare {
    held: u64,
    waiting: usize,
}

impl FairBudget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> FairBudget {
        FairBudget { total, state: Mutex::new(BudgetState::default()), released: Notify::new() }
    }

    /// Bytes held now, over all streams.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// Bytes `stream` holds now.
    pub fn held_by(&self, stream: u64) -> u64 {
        self.lock().streams.get(&stream).map_or(0, |s| s.held)
    }

    fn lock(&self) -> MutexGuard<'_, BudgetState> {
        // The state is a few integers updated in place; a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until `stream` may hold `bytes` more, and takes them. `bytes` must not exceed the
    /// budget (the configuration checks `--max-batch-bytes` against it).
    pub async fn acquire(self: &Arc<Self>, stream: u64, bytes: u64) -> BudgetPermit {
        let mut waiting: Option<WaitingGuard<'_>> = None;
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if state.try_take(self.total, stream, bytes) {
                    drop(state);
                    if let Some(mut guard) = waiting.take() {
                        guard.stop_waiting();
                    }
                    return BudgetPermit { budget: self.clone(), stream, bytes };
                }
                if waiting.is_none() {
                    state.streams.entry(stream).or_default().waiting += 1;
                    waiting = Some(WaitingGuard { budget: self, stream, active: true });
                }
            }
            notified.await;
        }
    }

    fn release(&self, stream: u64, bytes: u64) {
        let mut state = self.lock();
        state.used -= bytes;
        if let Some(share) = state.streams.get_mut(&stream) {
            share.held -= bytes;
            if share.held == 0 && share.waiting == 0 {
                state.streams.remove(&stream);
            }
        }
        drop(state);
        self.released.notify_waiters();
    }
}

impl BudgetState {
    fn try_take(&mut self, total: u64, stream: u64, bytes: u64) -> bool {
        if self.used + bytes > total {
            return false;
        }
        let contenders = (self.streams.len() + usize::from(!self.streams.contains_key(&stream))).max(1) as u64;
        let share = total / contenders;
        let entry = self.streams.entry(stream).or_default();
        if entry.held > 0 && entry.held + bytes > share {
            return false;
        }
        entry.held += bytes;
        self.used += bytes;
        true
    }
}

/// Counts a stream as waiting while an `acquire` is pending, including one that is cancelled.
struct WaitingGuard<'a> {
    budget: &'a FairBudget,
    stream: u64,
    active: bool,
}

impl WaitingGuard<'_> {
    fn stop_waiting(&mut self) {
        if !std::mem::take(&mut self.active) {
            return;
        }
        let mut state = self.budget.lock();
        if let Some(share) = state.streams.get_mut(&self.stream) {
            share.waiting -= 1;
            if share.held == 0 && share.waiting == 0 {
                state.streams.remove(&self.stream);
            }
        }
        drop(state);
        // One fewer contender: the others' shares grew.
        self.budget.released.notify_waiters();
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.stop_waiting();
    }
}

/// Bytes of the budget held by one batch until it is sent (or dropped).
#[derive(Debug)]
pub struct BudgetPermit {
    budget: Arc<FairBudget>,
    stream: u64,
    bytes: u64,
}

impl Drop for BudgetPermit {
    fn drop(&mut self) {
        self.budget.release(self.stream, self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stream_holding_bytes_cannot_take_more_than_its_share_while_another_waits() {
        let budget = Arc::new(FairBudget::new(100));
        let mut hog = Vec::new();
        for _ in 0..4 {
            hog.push(budget.acquire(1, 20).await);
        }
        assert_eq!(budget.held_by(1), 80, "alone, a stream may use the whole budget");
        // Stream 2 needs 40 bytes: only 20 are free, so it waits...
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.acquire(2, 40).await }
        });
        tokio::task::yield_now().await;
        // ... and from now on stream 1 (holding 80 > 100 / 2) gets nothing more, although 20
        // bytes are free.
        let more = tokio::time::timeout(Duration::from_secs(1), budget.acquire(1, 20)).await;
        assert!(more.is_err(), "the hog got more than its share while another stream waited");
        hog.truncate(2);
        let granted =
            tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("waiter granted").expect("join");
        assert_eq!((budget.held_by(1), budget.held_by(2), budget.used()), (40, 40, 80));
        drop(granted);
        drop(hog);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_holding_nothing_always_gets_one_batch_when_bytes_are_free() {
        let budget = Arc::new(FairBudget::new(100));
        let _a = budget.acquire(1, 30).await;
        let _b = budget.acquire(2, 30).await;
        let _c = budget.acquire(3, 30).await;
        // Four contenders: the share is 25, below a 10-byte batch plus anything held, but
        // stream 4 holds nothing.
        let d = tokio::time::timeout(Duration::from_secs(1), budget.acquire(4, 10)).await;
        assert!(d.is_ok());
        assert_eq!(budget.used(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_leaves_no_contender_behind() {
        let budget = Arc::new(FairBudget::new(100));
        let held = budget.acquire(1, 60).await;
        let cancelled = tokio::time::timeout(Duration::from_secs(1), budget.acquire(2, 60)).await;
        assert!(cancelled.is_err());
        // Stream 2 left: stream 1 is alone again and may grow to the whole budget.
        let more = tokio::time::timeout(Duration::from_secs(1), budget.acquire(1, 40)).await;
        assert!(more.is_ok(), "a cancelled waiter still counted as a contender");
        drop(held);
    }
}
