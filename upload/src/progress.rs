//! Progress: a bar with instances, bytes and rate on a terminal, a plain
//! line every few seconds otherwise.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::scan::Candidate;

#[derive(Debug, Clone)]
pub(crate) struct Progress {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bar: Option<ProgressBar>,
    total_files: u64,
    total_bytes: u64,
    files: AtomicU64,
    bytes: AtomicU64,
    started: Instant,
    last_line: std::sync::Mutex<Instant>,
}

impl Progress {
    pub(crate) fn new(total_files: u64, total_bytes: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_bytes);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {msg} {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            inner: Arc::new(Inner {
                bar,
                total_files,
                total_bytes,
                files: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                started: Instant::now(),
                last_line: std::sync::Mutex::new(Instant::now()),
            }),
        }
    }

    /// One file finished (whatever the outcome).
    pub(crate) fn done(&self, file: &Candidate) {
        let i = &self.inner;
        let files = i.files.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = i.bytes.fetch_add(file.size, Ordering::Relaxed) + file.size;
        match &i.bar {
            Some(bar) => {
                bar.set_position(bytes);
                bar.set_message(format!("{files}/{} instances", i.total_files));
            }
            None => {
                let mut last = i.last_line.lock().expect("progress lock");
                if last.elapsed() >= Duration::from_secs(2) || files == i.total_files {
                    *last = Instant::now();
                    let secs = i.started.elapsed().as_secs_f64().max(1e-3);
                    eprintln!(
                        "sent {files}/{} instances, {:.1}/{:.1} MB, {:.1} MB/s",
                        i.total_files,
                        bytes as f64 / 1e6,
                        i.total_bytes as f64 / 1e6,
                        bytes as f64 / 1e6 / secs
                    );
                }
            }
        }
    }

    /// A message that must not be lost under the bar.
    pub(crate) fn note(&self, msg: &str) {
        match &self.inner.bar {
            Some(bar) => bar.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.inner.bar {
            bar.finish_and_clear();
        }
    }
}
