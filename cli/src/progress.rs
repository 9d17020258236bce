//! Progress output for long commands (`-p`).
//!
//! On a terminal: an indicatif bar on stderr with rate and ETA. Otherwise (a log, a pipe, a
//! script that parses qemu-img): qemu-img's own format on stdout, `    (NN.NN/100%)` followed
//! by a carriage return, printed each time at least one more percent is done, and a final
//! `(100.00/100%)` with a newline.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;
use vdisk_blockjobs::convert::Progress;

/// Shows how far a command is; safe to call from several threads.
#[derive(Debug)]
pub struct ProgressReporter {
    total: AtomicU64,
    done: AtomicU64,
    mode: Mode,
    finished: AtomicBool,
}

#[derive(Debug)]
enum Mode {
    Off,
    Bar(ProgressBar),
    /// The percentage printed last, as qemu keeps it (a C float).
    Plain(Mutex<f32>),
}

/// qemu-img prints again once the percentage moved by more than this.
const MIN_SKIP: f32 = 1.0;

impl ProgressReporter {
    /// A reporter for `total` bytes; prints nothing unless `enabled` and not `quiet`.
    pub fn new(enabled: bool, quiet: bool, total: u64) -> Self {
        let mode = if !enabled || quiet {
            Mode::Off
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{wide_bar} {percent:>3}% {binary_bytes}/{binary_total_bytes} \
                 {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            Mode::Bar(bar)
        } else {
            Mode::Plain(Mutex::new(0.0))
        };
        let reporter = ProgressReporter {
            total: AtomicU64::new(total),
            done: AtomicU64::new(0),
            mode,
            finished: AtomicBool::new(false),
        };
        reporter.print_plain(0.0);
        reporter
    }

    /// Ends the display: the bar is cleared, plain output gets its final 100% line. After a
    /// failure (`completed` false) the bar stops where it was and no 100% is claimed.
    /// Only the first call counts; a reporter dropped unfinished finishes as failed.
    pub fn finish(&self, completed: bool) {
        if self.finished.swap(true, Ordering::Relaxed) {
            return;
        }
        match &self.mode {
            Mode::Off => {}
            Mode::Bar(bar) if completed => bar.finish_and_clear(),
            Mode::Bar(bar) => bar.abandon(),
            Mode::Plain(_) => {
                if completed {
                    self.print_plain(100.0);
                }
                // qemu ends the carriage-return line either way (unflushed: in drop-in
                // mode off a terminal the newline leaves at exit, after any error).
                crate::stdout::write(b"\n");
            }
        }
    }

    /// qemu's `qemu_progress_print`: `    (NN.NN/100%)` and a carriage return when the
    /// percentage moved by more than one point since the last line, and always at 0 and
    /// 100, computed in C float as qemu does so the same figures come out.
    fn print_plain(&self, current: f32) {
        let Mode::Plain(last) = &self.mode else {
            return;
        };
        let Ok(mut last) = last.lock() else {
            return;
        };
        let due = current - *last > MIN_SKIP
            || current < *last - MIN_SKIP
            || current == 100.0
            || current == 0.0;
        if !due {
            return;
        }
        *last = current;
        // Progress is best effort: a closed stdout must not fail the copy. qemu flushes
        // each line.
        crate::stdout::write(format!("    ({:.2}/100%)\r", f64::from(current)).as_bytes());
        crate::stdout::flush();
    }
}

impl Drop for ProgressReporter {
    /// A command that fails after the progress started ends its line, as qemu-img does.
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl Progress for ProgressReporter {
    fn advance(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let total = self.total.load(Ordering::Relaxed);
        match &self.mode {
            Mode::Off => {}
            Mode::Bar(bar) => bar.set_position(done.min(total)),
            Mode::Plain(_) => {
                let current = if total == 0 {
                    100.0
                } else {
                    // qemu: 100.0 * done / total in double, handed on as a float.
                    (100.0 * done.min(total) as f64 / total as f64) as f32
                };
                self.print_plain(current);
            }
        }
    }

    fn wants_total(&self) -> bool {
        !matches!(self.mode, Mode::Off)
    }

    fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        if let Mode::Bar(bar) = &self.mode {
            bar.set_length(total);
        }
    }
}
