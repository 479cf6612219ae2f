//! Run accounting: per-entry counters, the errors file, the progress bar and the metrics JSON.
//!
//! Counters are atomics shared by all workers of a process, so recording is cheap on the hot
//! path. Failed records go to `errors.jsonl` in the run folder, one JSON object per line with
//! the record's key, its source position, the entry that failed it and why; the run goes on.
//! Failures are held per epoch and written when their epoch completes, epoch by epoch and
//! sorted within an epoch (by position, key, entry, reason), so the file is the same for any
//! number of workers and after a resume (the journal replays the failures of the epochs it
//! holds). The progress bar is drawn only when stderr is a terminal.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::stage::Failure;

/// Counters of one entry.
#[derive(Default, Debug)]
pub struct Counters {
    /// Records received.
    pub records_in: AtomicU64,
    /// Records passed on (or written, for sinks).
    pub records_out: AtomicU64,
    /// Records failed.
    pub records_failed: AtomicU64,
    /// Batches processed.
    pub batches: AtomicU64,
    /// Time spent inside the entry's code, summed over workers, in nanoseconds.
    pub busy_ns: AtomicU64,
    /// Time during which the entry had work in flight (including work handed to another
    /// thread, such as an inference service), summed over workers, in nanoseconds.
    pub active_ns: AtomicU64,
}

impl Counters {
    /// Adds to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds elapsed time to `busy_ns`.
    pub fn busy(&self, d: Duration) {
        self.busy_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Per-entry figures in the metrics JSON.
#[derive(Serialize, Debug, Clone)]
pub struct EntryMetrics {
    /// `source`, `stage` or `sink`.
    pub role: String,
    /// The entry's kind.
    pub kind: String,
    /// Records received.
    pub records_in: u64,
    /// Records passed on or written.
    pub records_out: u64,
    /// Records failed.
    pub records_failed: u64,
    /// Batches processed.
    pub batches: u64,
    /// Seconds spent in the entry's code on worker threads, summed over workers.
    pub busy_seconds: f64,
    /// Seconds during which the entry had work in flight (for model stages this includes the
    /// time the model ran), summed over workers.
    pub active_seconds: f64,
    /// Records out per active second, per worker.
    pub throughput_per_active_second: f64,
    /// Records out per second of the whole run.
    pub throughput_per_wall_second: f64,
}

/// The metrics JSON written at the end of a run.
#[derive(Serialize, Debug, Clone)]
pub struct RunMetrics {
    /// Pipeline name.
    pub pipeline: String,
    /// Worker threads in this process.
    pub workers: usize,
    /// Processes in the computation.
    pub processes: usize,
    /// This process's index.
    pub process: usize,
    /// Seconds from start to end.
    pub wall_seconds: f64,
    /// Records read by all sources.
    pub records_read: u64,
    /// Records that failed anywhere.
    pub records_failed: u64,
    /// Peak resident memory of this process, in MiB (Linux; 0 elsewhere).
    pub peak_rss_mib: f64,
    /// Figures per entry, by name.
    pub entries: BTreeMap<String, EntryMetrics>,
    /// Files written by sinks.
    pub outputs: Vec<PathBuf>,
    /// What the journal did: epochs replayed from it and epochs computed.
    pub journal: JournalMetrics,
}

/// Journal figures of a run.
#[derive(Serialize, Debug, Clone, Default)]
pub struct JournalMetrics {
    /// The journal folder (absent when the run kept no journal).
    pub folder: Option<PathBuf>,
    /// Whether the run resumed from a journal.
    pub resumed: bool,
    /// Epochs whose records were fed to the sinks from the journal, with no stage work.
    pub epochs_replayed: u64,
    /// Epochs the run computed.
    pub epochs_computed: u64,
    /// Failed records replayed from the journal into the errors file.
    pub failures_replayed: u64,
}

/// A failure waiting for its epoch to complete; `journal` is false for failures that recur
/// when the epoch is replayed (sink write errors).
type Pending = BTreeMap<u64, Vec<(Failure, bool)>>;

/// Shared state of one run in one process.
pub struct RunState {
    entries: BTreeMap<String, (String, String, Arc<Counters>)>,
    errors: Mutex<Option<BufWriter<File>>>,
    errors_path: PathBuf,
    pending: Mutex<Pending>,
    max_epoch: AtomicU64,
    journal: Mutex<JournalMetrics>,
    abort: AtomicBool,
    failed: AtomicU64,
    read: AtomicU64,
    outputs: Mutex<Vec<PathBuf>>,
    progress: ProgressBar,
    start: Instant,
    out_dir: PathBuf,
}

impl RunState {
    /// State for a run writing into `out_dir`; `entries` are (name, role, kind).
    pub fn new(
        out_dir: &Path,
        entries: &[(String, String, String)],
        total: Option<u64>,
        process: usize,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(out_dir)?;
        let name = if process == 0 {
            "errors.jsonl".to_string()
        } else {
            format!("errors.{process}.jsonl")
        };
        let errors_path = out_dir.join(name);
        // Created lazily: a clean run leaves no errors file behind.
        if errors_path.exists() {
            std::fs::remove_file(&errors_path)?;
        }
        let progress = if std::io::stderr().is_terminal() {
            let bar = match total {
                Some(n) => ProgressBar::new(n),
                None => ProgressBar::new_spinner(),
            };
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} read ({per_sec}, eta {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(4));
            bar
        } else {
            ProgressBar::hidden()
        };
        Ok(RunState {
            entries: entries
                .iter()
                .map(|(n, r, k)| {
                    (
                        n.clone(),
                        (r.clone(), k.clone(), Arc::new(Counters::default())),
                    )
                })
                .collect(),
            errors: Mutex::new(None),
            errors_path,
            pending: Mutex::new(BTreeMap::new()),
            max_epoch: AtomicU64::new(u64::MAX),
            journal: Mutex::new(JournalMetrics::default()),
            abort: AtomicBool::new(false),
            failed: AtomicU64::new(0),
            read: AtomicU64::new(0),
            outputs: Mutex::new(Vec::new()),
            progress,
            start: Instant::now(),
            out_dir: out_dir.to_path_buf(),
        })
    }

    /// The run's output folder.
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// The counters of an entry.
    pub fn counters(&self, name: &str) -> Arc<Counters> {
        self.entries
            .get(name)
            .map(|e| e.2.clone())
            .unwrap_or_default()
    }

    /// Notes records read by a source.
    pub fn read(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
        self.progress.inc(n);
    }

    /// Notes records skipped because the journal holds their epochs (progress only).
    pub fn skipped(&self, n: u64) {
        self.progress.inc(n);
    }

    /// Records a failed record and writes it to the errors file at once, outside the epoch
    /// order (for failures that belong to no epoch).
    pub fn fail(&self, f: &Failure) {
        self.count_failure(f);
        self.write_failures(std::slice::from_ref(f));
    }

    /// Records a failed record of `epoch`; it is written to the errors file when the epoch
    /// completes ([`RunState::take_failures`]). `journal` says whether the journal keeps it
    /// (failures that recur when an epoch is replayed, like a sink's, are not kept).
    pub fn fail_at(&self, epoch: u64, f: &Failure, journal: bool) {
        self.count_failure(f);
        self.note_epoch(epoch);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(epoch)
            .or_default()
            .push((f.clone(), journal));
    }

    fn count_failure(&self, f: &Failure) {
        let n = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(key = %f.key, stage = %f.stage, reason = %f.reason, "record failed");
        self.progress.set_message(format!("{n} failed"));
    }

    /// Takes the failures of a completed epoch, sorted by position, key, entry and reason.
    pub fn take_failures(&self, epoch: u64) -> Vec<(Failure, bool)> {
        let mut v = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&epoch)
            .unwrap_or_default();
        v.sort_by(|(a, _), (b, _)| failure_order(a, b));
        v
    }

    /// Appends failures to the errors file (created on the first one).
    pub fn write_failures(&self, failures: &[Failure]) {
        if failures.is_empty() {
            return;
        }
        let mut guard = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            match File::create(&self.errors_path) {
                Ok(file) => *guard = Some(BufWriter::new(file)),
                Err(e) => {
                    tracing::error!(path = %self.errors_path.display(), error = %e, "cannot create the errors file");
                    return;
                }
            }
        }
        if let Some(w) = guard.as_mut() {
            for f in failures {
                let line = serde_json::json!({"key": &*f.key, "seq": f.seq, "stage": f.stage, "reason": f.reason});
                let _ = writeln!(w, "{line}");
            }
        }
    }

    /// Counts failures replayed from the journal (already written with
    /// [`RunState::write_failures`]).
    pub fn replayed_failures(&self, n: u64) {
        self.failed.fetch_add(n, Ordering::Relaxed);
        self.journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failures_replayed += n;
    }

    /// Notes that `epoch` had input or output in this process.
    pub fn note_epoch(&self, epoch: u64) {
        let _ = self
            .max_epoch
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                (m == u64::MAX || epoch > m).then_some(epoch)
            });
    }

    /// The last epoch that had input, output or failures in this process, if any.
    pub fn last_epoch(&self) -> Option<u64> {
        let m = self.max_epoch.load(Ordering::Relaxed);
        let p = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .next_back()
            .copied();
        (m != u64::MAX).then_some(m).max(p)
    }

    /// Asks this process's sources to stop reading (the run cannot succeed).
    pub fn abort(&self) {
        self.abort.store(true, Ordering::Relaxed);
    }

    /// Whether [`RunState::abort`] was called.
    pub fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }

    /// Updates the journal figures.
    pub fn journal(&self, f: impl FnOnce(&mut JournalMetrics)) {
        f(&mut self.journal.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Notes files written by a sink.
    pub fn outputs(&self, files: Vec<PathBuf>) {
        self.outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(files);
    }

    /// Records failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The errors file (it exists only if a record failed).
    pub fn errors_path(&self) -> &Path {
        &self.errors_path
    }

    /// Flushes the errors file, closes the progress bar, and gathers the metrics.
    pub fn finish(
        &self,
        pipeline: &str,
        workers: usize,
        processes: usize,
        process: usize,
    ) -> RunMetrics {
        // Failures of epochs that never completed (a run that stopped on an error).
        let left: Vec<u64> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        for e in left {
            let fs: Vec<Failure> = self.take_failures(e).into_iter().map(|f| f.0).collect();
            self.write_failures(&fs);
        }
        if let Some(w) = self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let _ = w.flush();
        }
        self.progress.finish_and_clear();
        let wall = self.start.elapsed().as_secs_f64();
        let entries = self
            .entries
            .iter()
            .map(|(name, (role, kind, c))| {
                let out = c.records_out.load(Ordering::Relaxed);
                let busy = c.busy_ns.load(Ordering::Relaxed) as f64 / 1e9;
                let active = (c.active_ns.load(Ordering::Relaxed) as f64 / 1e9).max(busy);
                let m = EntryMetrics {
                    role: role.clone(),
                    kind: kind.clone(),
                    records_in: c.records_in.load(Ordering::Relaxed),
                    records_out: out,
                    records_failed: c.records_failed.load(Ordering::Relaxed),
                    batches: c.batches.load(Ordering::Relaxed),
                    busy_seconds: busy,
                    active_seconds: active,
                    throughput_per_active_second: if active > 0.0 {
                        out as f64 / active
                    } else {
                        0.0
                    },
                    throughput_per_wall_second: if wall > 0.0 { out as f64 / wall } else { 0.0 },
                };
                (name.clone(), m)
            })
            .collect();
        let mut outputs = self
            .outputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        outputs.sort();
        RunMetrics {
            pipeline: pipeline.to_string(),
            workers,
            processes,
            process,
            wall_seconds: wall,
            records_read: self.read.load(Ordering::Relaxed),
            records_failed: self.failed(),
            peak_rss_mib: peak_rss_mib(),
            entries,
            outputs,
            journal: self
                .journal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// The order of failures within an epoch in the errors file: position, key, entry, reason.
pub fn failure_order(a: &Failure, b: &Failure) -> std::cmp::Ordering {
    (a.seq, &a.key, &a.stage, &a.reason).cmp(&(b.seq, &b.key, &b.stage, &b.reason))
}

/// Peak resident set size of this process in MiB, from `/proc/self/status` (0 if unknown).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
