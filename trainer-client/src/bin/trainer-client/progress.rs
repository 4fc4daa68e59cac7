//! The progress bar of `stream`: samples and bytes per second, measured, not estimated.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use std::time::Duration;

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

/// `22918 samples/s`: whole samples, counted over the whole run.
fn samples_rate(samples: u64, elapsed: Duration) -> String {
    format!("{:.0} samples/s", samples as f64 / elapsed.as_secs_f64().max(1e-3))
}

/// `(35.2 MB/s)`: the bytes actually received, not samples scaled as bytes.
fn bytes_rate(bytes: u64, elapsed: Duration) -> String {
    format!("({:.1} MB/s)", bytes as f64 / elapsed.as_secs_f64().max(1e-3) / 1e6)
}

/// A bar over samples that also shows the byte rate of what it has counted.
#[derive(Debug)]
pub(crate) struct Progress {
    bar: ProgressBar,
    bytes: Arc<AtomicU64>,
}

impl Progress {
    /// A bar for `total_samples` samples, hidden when `visible` is false.
    pub(crate) fn new(total_samples: u64, visible: bool) -> Progress {
        let bytes = Arc::new(AtomicU64::new(0));
        let bar = if visible { ProgressBar::new(total_samples) } else { ProgressBar::hidden() };
        let byte_rate = bytes.clone();
        let style = ProgressStyle::with_template(
            "{spinner} epoch {msg} [{bar:30}] {human_pos}/{human_len} samples, {samples_per_sec} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("samples_per_sec", |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&samples_rate(state.pos(), state.elapsed()));
        })
        .with_key("bytes_per_sec", move |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&bytes_rate(byte_rate.load(Relaxed), state.elapsed()));
        })
        .progress_chars("=> ");
        bar.set_style(style);
        Progress { bar, bytes }
    }

    /// Counts a batch.
    pub(crate) fn add(&self, samples: u64, bytes: u64, epoch: u64) {
        self.bytes.fetch_add(bytes, Relaxed);
        self.bar.set_message(epoch.to_string());
        self.bar.inc(samples);
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_whole_samples_and_real_bytes() {
        let second = Duration::from_secs(2);
        assert_eq!(samples_rate(45_836, second), "22918 samples/s");
        // 22 918 samples/s of 1 536-byte boards: 35.2 MB/s, not 22.38 KiB/s.
        assert_eq!(bytes_rate(45_836 * 1536, second), "(35.2 MB/s)");
    }
}
