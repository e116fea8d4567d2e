//! How a running folder node talks to the person at the terminal. On a terminal: one progress
//! bar (indicatif) with human sizes, and lines above it for what changed. Off a terminal (cron,
//! systemd, a pipe): lines for changes only, never a line per tick, so a log stays readable.

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::fmt::Display;
use std::io::Write;

/// Writes status lines to stderr and, on a terminal, keeps a progress bar under them.
pub struct Reporter {
    bar: Option<ProgressBar>,
}

impl Reporter {
    /// `terminal`: stderr is a terminal, so a redrawn bar is welcome.
    pub fn new(terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
                )
                // Invariant: the template above is a constant that parses.
                .expect("valid progress template")
                .progress_chars("=> "),
            );
            bar
        });
        Self { bar }
    }

    /// One line on stderr (above the bar, which is redrawn under it).
    pub fn line(&self, message: impl Display) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{message}")),
            None => {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{message}");
            }
        }
    }

    /// New progress figures: redraws the bar (off a terminal, nothing: changes are lines).
    pub fn progress(&self, stats: &feedsync::drive::Stats) {
        let Some(bar) = &self.bar else { return };
        bar.set_length(stats.bytes_total);
        bar.set_position(stats.bytes_done.min(stats.bytes_total));
        bar.set_message(format!(
            "files {}/{}  version {}/{}  peers {}",
            stats.files_done, stats.files_total, stats.version, stats.latest_version, stats.peers
        ));
    }

    /// Removes the bar (before the last lines and exit).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Bytes for people: `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    HumanBytes(n).to_string()
}
