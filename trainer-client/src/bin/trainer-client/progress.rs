//! The progress bar of `stream`: samples and bytes per second, measured, not estimated.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

/// A bar over samples that also shows the byte rate of what it has counted.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    bytes: Arc<AtomicU64>,
}

impl Progress {
    /// A bar for `total_samples` samples, hidden when `visible` is false.
    pub fn new(total_samples: u64, visible: bool) -> Progress {
        let bytes = Arc::new(AtomicU64::new(0));
        let bar = if visible { ProgressBar::new(total_samples) } else { ProgressBar::hidden() };
        let byte_rate = bytes.clone();
        let style = ProgressStyle::with_template(
            "{spinner} epoch {msg} [{bar:30}] {human_pos}/{human_len} samples {samples_per_sec} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("samples_per_sec", |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0}/s", state.pos() as f64 / state.elapsed().as_secs_f64().max(1e-3));
        })
        .with_key("bytes_per_sec", move |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let rate = byte_rate.load(Relaxed) as f64 / state.elapsed().as_secs_f64().max(1e-3);
            let _ = write!(w, "({:.1} MB/s)", rate / 1e6);
        })
        .progress_chars("=> ");
        bar.set_style(style);
        Progress { bar, bytes }
    }

    /// Counts a batch.
    pub fn add(&self, samples: u64, bytes: u64, epoch: u64) {
        self.bytes.fetch_add(bytes, Relaxed);
        self.bar.set_message(epoch.to_string());
        self.bar.inc(samples);
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
