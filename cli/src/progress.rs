//! Progress output for long commands (`-p`).
//!
//! On a terminal: an indicatif bar on stderr with rate and ETA. Otherwise (a log, a pipe, a
//! script that parses qemu-img): qemu-img's own format on stdout, `    (NN.NN/100%)` followed
//! by a carriage return, printed each time at least one more percent is done, and a final
//! `(100.00/100%)` with a newline.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{ProgressBar, ProgressStyle};
use std::sync::Mutex;
use vdisk_blockjobs::convert::Progress;

/// Shows how far a command is; safe to call from several threads.
#[derive(Debug)]
pub struct ProgressReporter {
    total: u64,
    done: AtomicU64,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    Off,
    Bar(ProgressBar),
    /// The last percentage printed, in hundredths.
    Plain(Mutex<Option<u64>>),
}

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
            Mode::Plain(Mutex::new(None))
        };
        let reporter = ProgressReporter {
            total,
            done: AtomicU64::new(0),
            mode,
        };
        reporter.print_plain(0, false);
        reporter
    }

    /// Ends the display: the bar is cleared, plain output gets its final 100% line. After a
    /// failure (`completed` false) the bar stops where it was and no 100% is claimed.
    pub fn finish(&self, completed: bool) {
        match &self.mode {
            Mode::Off => {}
            Mode::Bar(bar) if completed => bar.finish_and_clear(),
            Mode::Bar(bar) => bar.abandon(),
            Mode::Plain(_) if completed => self.print_plain(10_000, true),
            Mode::Plain(_) => {
                // End the carriage-return line so the error message starts on its own line.
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out);
                let _ = out.flush();
            }
        }
    }

    /// Prints qemu-img's `    (NN.NN/100%)` when at least one more percent is done.
    fn print_plain(&self, hundredths: u64, last: bool) {
        let Mode::Plain(printed) = &self.mode else {
            return;
        };
        let Ok(mut printed) = printed.lock() else {
            return;
        };
        let due = match *printed {
            None => true,
            Some(prev) => last || hundredths >= prev + 100,
        };
        if !due {
            return;
        }
        *printed = Some(hundredths);
        let mut out = std::io::stdout().lock();
        let end = if last { "\r\n" } else { "\r" };
        // Progress is best effort: a closed stdout must not fail the copy.
        let _ = write!(
            out,
            "    ({}.{:02}/100%){end}",
            hundredths / 100,
            hundredths % 100
        );
        let _ = out.flush();
    }
}

impl Progress for ProgressReporter {
    fn advance(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        match &self.mode {
            Mode::Off => {}
            Mode::Bar(bar) => bar.set_position(done.min(self.total)),
            Mode::Plain(_) => {
                let hundredths = if self.total == 0 {
                    10_000
                } else {
                    (u128::from(done.min(self.total)) * 10_000 / u128::from(self.total)) as u64
                };
                self.print_plain(hundredths, false);
            }
        }
    }
}
