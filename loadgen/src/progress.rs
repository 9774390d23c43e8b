//! The progress bar on stderr: drawn only on a terminal and never with --json, so stdout stays
//! clean for the report either way.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `len` steps, or a hidden one. The caller's message says what the steps are.
    pub fn new(len: u64, visible: bool) -> Progress {
        let target = if visible && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr_with_hz(10)
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        // `wide_msg` is cut to the terminal's width, so the bar never wraps.
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {elapsed_precise} [{bar:24}] {wide_msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar }
    }

    pub fn set(&self, pos: u64, message: String) {
        self.bar.set_position(pos);
        self.bar.set_message(message);
    }

    /// Starts over with a new length (the next phase of a run).
    pub fn restart(&self, len: u64) {
        self.bar.set_length(len);
        self.bar.set_position(0);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
