//! Log lines for events a peer can cause at will (refused calls and connections): at most one
//! line per [`LogThrottle::INTERVAL`] for each kind, saying how many were not logged since, so a
//! flood of refusals cannot flood the log (the counters in the metrics still count every one).

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

/// The throttle of one kind of log line.
#[derive(Debug, Default)]
pub struct LogThrottle {
    /// When the next line may be written (`None`: now).
    next_at: Mutex<Option<Instant>>,
    /// Events not logged since the last line.
    suppressed: AtomicU64,
}

impl LogThrottle {
    /// Lines of one kind are at most this frequent.
    pub const INTERVAL: Duration = Duration::from_secs(1);

    /// `Some(n)` when this event may be logged, `n` being the events of its kind not logged
    /// since the last line; `None` (and counted) otherwise.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut next_at = self.next_at.lock().unwrap_or_else(|p| p.into_inner());
        if next_at.is_some_and(|at| now < at) {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        *next_at = Some(now + Self::INTERVAL);
        Some(self.suppressed.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_says_how_many_it_left_out() {
        let throttle = LogThrottle::default();
        let start = Instant::now();
        assert_eq!(throttle.admit_at(start), Some(0));
        for i in 1..=1000 {
            assert_eq!(throttle.admit_at(start + Duration::from_micros(i)), None);
        }
        assert_eq!(throttle.admit_at(start + LogThrottle::INTERVAL), Some(1000));
        assert_eq!(throttle.admit_at(start + LogThrottle::INTERVAL), None);
    }
}
