//! The decoded-chunk cache shared by every stream of a loader: a byte budget
//! (`--chunk-cache-bytes`), least-recently-used eviction, a bound on concurrent decoders
//! (`--decode-threads`), and single flight: concurrent requests for one chunk wait for one
//! decode instead of starting their own.
//!
//! Callers are blocking threads (batch assembly runs off the async runtime), so this uses a
//! std mutex and condition variables; no lock is held while decoding.

use std::{
    collections::HashMap,
    sync::{Arc, Condvar, Mutex},
};

/// Identifies a decoded block: (field id, block number along axis 0).
pub type BlockKey = (u64, u64);

#[derive(Debug)]
enum Entry {
    /// Some thread is decoding it; others wait.
    Loading,
    /// Decoded bytes and the tick of their last use.
    Ready { data: Arc<Vec<u8>>, last_used: u64 },
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<BlockKey, Entry>,
    /// Bytes of all `Ready` entries; never above the budget.
    bytes: u64,
    tick: u64,
    decoders: usize,
}

/// Counters of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from the cache (or by another thread's decode).
    pub hits: u64,
    /// Lookups that decoded.
    pub misses: u64,
    /// Bytes held now.
    pub bytes: u64,
    /// Most bytes ever held.
    pub peak_bytes: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct ChunkCache {
    budget_bytes: u64,
    max_decoders: usize,
    state: Mutex<State>,
    stats: Mutex<CacheStats>,
    /// Signalled when a decode finishes (an entry leaves `Loading`) or a decoder slot frees.
    changed: Condvar,
}

/// Keys reserved with [`ChunkCache::reserve`] and not yet decoded. Dropping it (also when a
/// batch fails before decoding them all) removes their `Loading` entries and wakes waiters,
/// who then decode them themselves.
#[derive(Debug)]
pub struct Reservation<'a> {
    cache: &'a ChunkCache,
    keys: Vec<BlockKey>,
}

impl Reservation<'_> {
    /// The keys reserved and not yet decoded.
    pub fn keys(&self) -> &[BlockKey] {
        &self.keys
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut state = self.cache.lock();
        for key in &self.keys {
            if matches!(state.entries.get(key), Some(Entry::Loading)) {
                state.entries.remove(key);
            }
        }
        drop(state);
        self.cache.changed.notify_all();
    }
}

/// Removes a `Loading` entry if its decoder unwinds, so waiters do not hang.
struct LoadingGuard<'a> {
    cache: &'a ChunkCache,
    key: BlockKey,
    armed: bool,
}

impl Drop for LoadingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut state = self.cache.lock();
            state.entries.remove(&self.key);
            state.decoders -= 1;
            drop(state);
            self.cache.changed.notify_all();
        }
    }
}

impl ChunkCache {
    /// A cache holding at most `budget_bytes` of decoded data, with at most `max_decoders`
    /// decodes running at once.
    pub fn new(budget_bytes: u64, max_decoders: usize) -> ChunkCache {
        ChunkCache {
            budget_bytes,
            max_decoders: max_decoders.max(1),
            state: Mutex::new(State::default()),
            stats: Mutex::new(CacheStats::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map inconsistent (every update is a
        // single insert/remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `key` is held or being decoded now (a later lookup may still miss).
    pub fn contains(&self, key: BlockKey) -> bool {
        self.lock().entries.contains_key(&key)
    }

    /// Counters now.
    pub fn stats(&self) -> CacheStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, hit: bool, bytes: u64) {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if hit {
            stats.hits += 1;
        } else {
            stats.misses += 1;
        }
        stats.bytes = bytes;
        stats.peak_bytes = stats.peak_bytes.max(bytes);
    }

    /// The decoded block `key`, from the cache or by running `decode` (at most once at a time
    /// per key). Returns the data and the bytes this call decoded (0 on a hit).
    ///
    /// # Errors
    /// `decode`'s error; the block is not cached and the next request tries again.
    pub fn get_or_decode<E>(
        &self,
        key: BlockKey,
        decode: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<(Arc<Vec<u8>>, u64), E> {
        self.get_or_decode_reserved(key, None, decode)
    }

    /// For a scan that copies rows out one block at a time: the block `current` holds when it
    /// is `key`'s, else `key`'s block from the cache (decoded when absent), which then replaces
    /// it. Returns the block (a count on it) and the bytes this call decoded.
    ///
    /// # Errors
    /// As [`ChunkCache::get_or_decode`].
    pub fn hold<E>(
        &self,
        current: &mut Option<(BlockKey, Arc<Vec<u8>>)>,
        key: BlockKey,
        decode: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<(Arc<Vec<u8>>, u64), E> {
        if let Some((held, data)) = current.as_ref()
            && *held == key
        {
            return Ok((data.clone(), 0));
        }
        let (data, bytes) = self.get_or_decode(key, decode)?;
        *current = Some((key, data.clone()));
        Ok((data, bytes))
    }

    /// Marks those of `keys` that are neither held nor being decoded as the caller's to
    /// decode: other lookups of them wait as for a decode in progress, so that the caller can
    /// read their chunks ahead (together) without another thread reading them too. The caller
    /// then asks for each with [`get_or_decode_reserved`](Self::get_or_decode_reserved), in
    /// ascending key order (a thread waits for another's block only after it has decoded its
    /// own smaller ones, so two reservations never wait on each other).
    pub fn reserve(&self, keys: impl IntoIterator<Item = BlockKey>) -> Reservation<'_> {
        let mut state = self.lock();
        let mut mine = Vec::new();
        for key in keys {
            if let std::collections::hash_map::Entry::Vacant(vacant) = state.entries.entry(key) {
                vacant.insert(Entry::Loading);
                mine.push(key);
            }
        }
        Reservation { cache: self, keys: mine }
    }

    /// [`get_or_decode`](Self::get_or_decode) for a caller holding `reservation`: a key it
    /// reserved is decoded here (waiting only for a decoder slot).
    ///
    /// # Errors
    /// As [`get_or_decode`](Self::get_or_decode).
    pub fn get_or_decode_reserved<E>(
        &self,
        key: BlockKey,
        reservation: Option<&mut Reservation<'_>>,
        decode: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<(Arc<Vec<u8>>, u64), E> {
        let mut owned = false;
        if let Some(reservation) = reservation
            && let Some(at) = reservation.keys.iter().position(|k| *k == key)
        {
            // Ours from here on: the decode below (or its guard) clears the entry.
            reservation.keys.swap_remove(at);
            owned = true;
        }
        let mut state = self.lock();
        loop {
            state.tick += 1;
            let tick = state.tick;
            let decoders_busy = state.decoders >= self.max_decoders;
            match state.entries.get_mut(&key) {
                Some(Entry::Loading) if owned && !decoders_busy => {
                    state.decoders += 1;
                    break;
                }
                Some(Entry::Ready { data, last_used }) => {
                    *last_used = tick;
                    let data = data.clone();
                    let bytes = state.bytes;
                    drop(state);
                    self.count(true, bytes);
                    return Ok((data, 0));
                }
                Some(Entry::Loading) => {
                    state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                None if decoders_busy => {
                    state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                None => {
                    state.entries.insert(key, Entry::Loading);
                    state.decoders += 1;
                    break;
                }
            }
        }
        drop(state);
        let mut guard = LoadingGuard { cache: self, key, armed: true };
        let decoded = decode();
        guard.armed = false;
        let mut state = self.lock();
        state.entries.remove(&key);
        state.decoders -= 1;
        let result = decoded.map(|data| {
            let data = Arc::new(data);
            let len = data.len() as u64;
            if len <= self.budget_bytes {
                while state.bytes + len > self.budget_bytes {
                    let oldest = state
                        .entries
                        .iter()
                        .filter_map(|(k, e)| match e {
                            Entry::Ready { last_used, .. } => Some((*last_used, *k)),
                            Entry::Loading => None,
                        })
                        .min();
                    let Some((_, victim)) = oldest else { break };
                    if let Some(Entry::Ready { data, .. }) = state.entries.remove(&victim) {
                        state.bytes -= data.len() as u64;
                    }
                }
                let tick = state.tick;
                state.entries.insert(key, Entry::Ready { data: data.clone(), last_used: tick });
                state.bytes += len;
            }
            (data, len)
        });
        let bytes = state.bytes;
        drop(state);
        self.changed.notify_all();
        self.count(false, bytes);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn reserved_blocks_are_decoded_by_their_holder_and_released_when_it_gives_up() {
        let cache = ChunkCache::new(1000, 1);
        cache.get_or_decode((0, 1), || Ok::<_, ()>(vec![1])).expect("ok");
        let mut reservation = cache.reserve([(0, 0), (0, 1), (0, 2), (0, 3)]);
        assert_eq!(reservation.keys(), [(0, 0), (0, 2), (0, 3)], "a held block is not reserved");
        // Another thread wanting a reserved block waits for the holder's decode.
        let decoded_elsewhere = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| {
                cache
                    .get_or_decode((0, 0), || {
                        decoded_elsewhere.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, ()>(vec![9])
                    })
                    .expect("ok")
            });
            let (data, bytes) =
                cache.get_or_decode_reserved((0, 0), Some(&mut reservation), || Ok::<_, ()>(vec![7])).expect("ok");
            assert_eq!((data[0], bytes), (7, 1));
            assert_eq!(waiter.join().expect("waiter").0[0], 7, "the waiter got the holder's decode");
        });
        assert_eq!(decoded_elsewhere.load(Ordering::SeqCst), 0);
        assert_eq!(reservation.keys(), [(0, 3), (0, 2)]);
        // Given up (the batch failed): the rest are free again for anyone to decode.
        drop(reservation);
        let (data, bytes) = cache.get_or_decode((0, 2), || Ok::<_, ()>(vec![2])).expect("ok");
        assert_eq!((data[0], bytes), (2, 1));
        assert!(!cache.contains((0, 3)));
    }

    #[test]
    fn stays_within_budget_and_evicts_least_recently_used() {
        let cache = ChunkCache::new(250, 2);
        let block = |n: u8| move || Ok::<_, ()>(vec![n; 100]);
        cache.get_or_decode((0, 0), block(0)).expect("ok");
        cache.get_or_decode((0, 1), block(1)).expect("ok");
        // Touch block 0 so block 1 is the least recently used.
        assert_eq!(cache.get_or_decode((0, 0), block(9)).expect("ok").1, 0);
        cache.get_or_decode((0, 2), block(2)).expect("ok");
        let stats = cache.stats();
        assert!(stats.peak_bytes <= 250, "{stats:?}");
        assert_eq!(stats.bytes, 200);
        assert_eq!(cache.get_or_decode((0, 0), block(9)).expect("ok").0[0], 0, "block 0 kept");
        assert_eq!(cache.get_or_decode((0, 1), block(7)).expect("ok").0[0], 7, "block 1 evicted and decoded again");
    }

    #[test]
    fn blocks_over_the_budget_are_served_uncached() {
        let cache = ChunkCache::new(10, 1);
        let (data, decoded) = cache.get_or_decode((1, 0), || Ok::<_, ()>(vec![1; 50])).expect("ok");
        assert_eq!((data.len(), decoded), (50, 50));
        assert_eq!(cache.stats().bytes, 0);
    }

    #[test]
    fn errors_are_not_cached() {
        let cache = ChunkCache::new(1000, 1);
        assert_eq!(cache.get_or_decode((0, 0), || Err::<Vec<u8>, _>("corrupt")), Err("corrupt"));
        assert_eq!(cache.get_or_decode((0, 0), || Ok::<_, &str>(vec![3])).expect("retried").0[0], 3);
    }

    #[test]
    fn concurrent_requests_for_one_block_decode_it_once() {
        let cache = Arc::new(ChunkCache::new(1 << 20, 4));
        let decodes = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, decodes, barrier) = (cache.clone(), decodes.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    cache
                        .get_or_decode((5, 5), || {
                            decodes.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, ()>(vec![5; 1000])
                        })
                        .expect("ok")
                        .0[999]
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("thread"), 5);
        }
        assert_eq!(decodes.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats().misses, 1);
        assert_eq!(cache.stats().hits, 7);
    }
}
