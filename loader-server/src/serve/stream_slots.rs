//! The `--max-streams` batch streams a loader serves at once, shared fairly between
//! connections: when every slot is taken, a stream from a connection that holds fewer streams
//! than another takes the slot of that other connection's stream that has been idle longest (no
//! request in progress), which is ended with UNAVAILABLE (its client opens a new one when it
//! needs batches). So one client that opens many idle streams cannot lock the others out for
//! `--stream-idle-timeout`; busy streams are never taken.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Instant,
};

use tokio::sync::Notify;

/// The streams holding slots.
#[derive(Debug)]
pub struct StreamSlots {
    max: usize,
    held: Mutex<HashMap<u64, Held>>,
}

/// One stream's slot as the table sees it.
#[derive(Debug)]
struct Held {
    /// The connection it arrived on.
    connection: usize,
    /// Shared with the stream: whether it has a request in progress.
    busy: Arc<AtomicBool>,
    /// When it last became idle (or was opened).
    idle_since: Arc<Mutex<Instant>>,
    /// Tells the stream to end: its slot went to another connection's stream.
    evict: Arc<Notify>,
}

/// A stream's slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<StreamSlots>,
    id: u64,
    busy: Arc<AtomicBool>,
    idle_since: Arc<Mutex<Instant>>,
    /// Notified when the slot was given to another connection's stream: the stream ends.
    pub evict: Arc<Notify>,
}

impl Slot {
    /// Marks the stream busy (a request in progress) or idle.
    pub fn set_busy(&self, busy: bool) {
        if self.busy.swap(busy, Relaxed) && !busy {
            *self.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl StreamSlots {
    /// `max` slots (`--max-streams`).
    pub fn new(max: usize) -> StreamSlots {
        StreamSlots { max, held: Mutex::default() }
    }

    /// Streams holding slots now.
    pub fn open(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A slot for stream `id` arriving on `connection`, taking the longest-idle stream of a
    /// connection holding more streams than this one will when every slot is held; `None` when
    /// none can be given (every stream of such connections is busy).
    pub fn admit(self: &Arc<Self>, id: u64, connection: usize) -> Option<Slot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.len() >= self.max {
            let mut per_connection: HashMap<usize, usize> = HashMap::new();
            for stream in held.values() {
                *per_connection.entry(stream.connection).or_default() += 1;
            }
            let mine = per_connection.get(&connection).copied().unwrap_or(0) + 1;
            let victim = held
                .iter()
                .filter(|(_, s)| per_connection[&s.connection] > mine && !s.busy.load(Relaxed))
                .min_by_key(|(_, s)| *s.idle_since.lock().unwrap_or_else(|p| p.into_inner()))
                .map(|(&victim, _)| victim)?;
            if let Some(evicted) = held.remove(&victim) {
                evicted.evict.notify_one();
            }
        }
        let slot = Slot {
            slots: self.clone(),
            id,
            busy: Arc::default(),
            idle_since: Arc::new(Mutex::new(Instant::now())),
            evict: Arc::default(),
        };
        held.insert(
            id,
            Held {
                connection,
                busy: slot.busy.clone(),
                idle_since: slot.idle_since.clone(),
                evict: slot.evict.clone(),
            },
        );
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newcomer_takes_the_longest_idle_stream_of_the_connection_holding_most_never_a_busy_one() {
        let slots = Arc::new(StreamSlots::new(4));
        let hog: Vec<Slot> = (0..4).map(|id| slots.admit(id, 1).expect("free slot")).collect();
        hog[0].set_busy(true);
        hog[2].set_busy(true);
        hog[2].set_busy(false); // idle again, more recently than 1 and 3
        assert!(slots.admit(9, 1).is_none(), "the connection holding every slot gets no fifth");
        let newcomer = slots.admit(10, 2).expect("a slot taken from the hog");
        assert_eq!(slots.open(), 4);
        let evicted: Vec<u64> =
            hog.iter().filter(|s| !slots.held.lock().unwrap().contains_key(&s.id)).map(|s| s.id).collect();
        assert_eq!(evicted.len(), 1);
        assert!(evicted[0] == 1 || evicted[0] == 3, "the longest idle, never the busy 0: {evicted:?}");
        // Two streams each: neither connection holds more than the other would.
        let _second = slots.admit(11, 2).expect("still more than mine");
        assert!(slots.admit(12, 2).is_none(), "2 against 2: no more eviction");
        drop(newcomer);
        assert_eq!(slots.open(), 3);
        assert!(slots.admit(13, 3).is_some(), "a freed slot is taken without eviction");
    }
}
