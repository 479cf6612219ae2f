//! Running a planned pipeline on timely dataflow.
//!
//! Decisions:
//! - **Epochs.** A record's timestamp is its epoch, `seq / epoch_size`, where `seq` is its
//!   position in its source. Epochs do not depend on the number of workers, and sinks write an
//!   epoch sorted by `seq` once the frontier has passed it; so outputs are byte-identical for
//!   any number of workers or processes.
//! - **Pacing.** Worker `w` of `n` reads the records with `seq % n == w`. Before it sends epoch
//!   `e` it waits until the probe at the sinks has passed epoch `e - max_in_flight`, so at most
//!   `max_in_flight` epochs are in memory whatever the input's size.
//! - **Exchange.** Records leaving a source go to worker `seq % n`: a record stays on the
//!   worker that read it, and a source that produces all its records on one worker has them
//!   dealt out in turn. Every worker gets the same share of each epoch (a hash of the key left
//!   some workers idle while others finished their larger shares).
//! - **Stages** are unary operators that hand each received batch to the stage. A stage may
//!   answer later ([`Completion::Pending`]); the operator keeps the batch's capabilities and
//!   emits results in arrival order, woken by the stage through a `SyncActivator`.
//! - **Loops** are timely iterative scopes. A record enters with `round = 0`; at the head of
//!   the loop, records whose budget is spent leave and the rest run the loop's stages again.
//! - **Sinks** receive all records on worker 0 (one writer per file); only the process that
//!   hosts worker 0 writes outputs.
//! - **Completed epochs.** The first worker of each process (its *leader*) watches a probe on
//!   every stream and the sinks' progress; once an epoch is past both, it writes the epoch's
//!   failures to the errors file (sorted, so the file does not depend on timing) and, on
//!   process 0, the records the sinks received to the journal ([`crate::journal`]).
//! - **Resume.** With [`RunOptions::resume`], the processes first agree on how many epochs
//!   every one of them has journaled (a one-off broadcast dataflow); sources skip those
//!   epochs, the leaders feed the journaled records to the sinks and the journaled failures to
//!   the errors file in epoch order, and the run goes on from there. Sinks finish as usual, so
//!   the outputs are the bytes an uninterrupted run writes. Resume assumes what a stage makes
//!   of a record does not depend on the records before it (true of every built-in stage).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path as FsPath, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline as PipelinePact;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::{Broadcast, Input};
use timely::dataflow::operators::Concat;
use timely::dataflow::operators::{
    CapabilitySet, ConnectLoop, Enter, Exchange, Inspect, Leave, LoopVariable, OkErr, Probe,
};
use timely::dataflow::{InputHandleVec, ProbeHandle, Stream};
use timely::order::Product;
use timely::progress::Timestamp;
use timely::scheduling::SyncActivator;

use crate::journal::{EpochData, Journal, JournalError, Stored};
use crate::metrics::{Counters, RunMetrics, RunState};
use crate::plan::{Node, Pipeline, SinkNode, SourceNode, StageNode};
use crate::stage::{Completion, Failure, Outcome, PendingBatch, Sink, Source, StageContext, Waker};
use crate::value::{Record, Value};

type Records<'s, T> = Stream<'s, T, Vec<Record>>;

/// How to run a pipeline.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Worker threads in this process.
    pub workers: usize,
    /// Processes in the computation (timely cluster mode when above 1).
    pub processes: usize,
    /// This process's index, from 0.
    pub process: usize,
    /// `host:port` of every process, one per line, when `processes > 1`.
    pub hostfile: Option<PathBuf>,
    /// The run's output folder.
    pub out_dir: PathBuf,
    /// Go on from the journal in the output folder: epochs it holds are replayed to the sinks
    /// instead of computed. Refused if the pipeline or a model changed since; without a
    /// journal the run starts from the beginning.
    pub resume: bool,
    /// Keep a journal (`<out>/.journal/`) so the run can be resumed. On by default; without
    /// it any journal in the output folder is removed.
    pub journal: bool,
}

impl RunOptions {
    /// One process with `workers` threads writing into `out_dir`.
    pub fn local(workers: usize, out_dir: impl Into<PathBuf>) -> Self {
        RunOptions {
            workers,
            processes: 1,
            process: 0,
            hostfile: None,
            out_dir: out_dir.into(),
            resume: false,
            journal: true,
        }
    }

    /// The same options, resuming from the journal.
    pub fn resuming(mut self) -> Self {
        self.resume = true;
        self
    }
}

/// Errors that stop a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The cluster could not be set up.
    #[error("cannot start the workers: {0}")]
    Cluster(String),
    /// An entry could not be built.
    #[error("entry `{entry}` could not start: {reason}")]
    Build {
        /// The entry.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A sink could not finish its output files (a full disk, a lost folder).
    #[error(
        "sink `{entry}` could not write its output: {reason}. Outputs are moved into place only \
         when complete, so none is half-written; fix the cause and run again (with --resume, \
         journaled epochs are not computed again)"
    )]
    Sink {
        /// The sink.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A worker failed.
    #[error("a worker failed: {0}")]
    Worker(String),
    /// The output folder could not be used.
    #[error("cannot write to the output folder {path}: {error}")]
    Output {
        /// The folder.
        path: PathBuf,
        /// The cause (in the message, so not also a `source`, which would print it twice).
        error: std::io::Error,
    },
    /// The run cannot go on from its journal.
    #[error("cannot resume from the journal in {folder}: {reason}")]
    Resume {
        /// The journal folder.
        folder: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The metrics also written to `metrics.json`.
    pub metrics: RunMetrics,
    /// The run's output folder.
    pub out_dir: PathBuf,
    /// The errors file, if any record failed.
    pub errors_file: Option<PathBuf>,
}

fn timely_config(opts: &RunOptions) -> Result<timely::Config, RunError> {
    let workers = opts.workers.max(1);
    if opts.processes <= 1 {
        return Ok(timely::Config::process(workers));
    }
    let hostfile = opts.hostfile.as_ref().ok_or_else(|| {
        RunError::Cluster("more than one process needs a hostfile (`--hostfile`)".into())
    })?;
    let text = std::fs::read_to_string(hostfile).map_err(|e| {
        RunError::Cluster(format!(
            "cannot read the hostfile {}: {e}",
            hostfile.display()
        ))
    })?;
    let addresses: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if addresses.len() < opts.processes {
        return Err(RunError::Cluster(format!(
            "the hostfile {} lists {} addresses for {} processes",
            hostfile.display(),
            addresses.len(),
            opts.processes
        )));
    }
    if opts.process >= opts.processes {
        return Err(RunError::Cluster(format!(
            "process index {} is out of range for {} processes",
            opts.process, opts.processes
        )));
    }
    Ok(timely::Config {
        communication: timely::CommunicationConfig::Cluster {
            threads: workers,
            process: opts.process,
            addresses: addresses[..opts.processes].to_vec(),
            report: false,
            zerocopy: false,
        },
        worker: timely::WorkerConfig::default(),
    })
}

/// Runs a pipeline to completion.
pub fn run(pipeline: &Pipeline, opts: &RunOptions) -> Result<RunSummary, RunError> {
    let out_dir = opts.out_dir.clone();
    let mut entries: Vec<(String, String, String)> = Vec::new();
    for s in &pipeline.sources {
        entries.push((
            s.name.clone(),
            "source".into(),
            s.factory.info().name.into(),
        ));
    }
    for n in &pipeline.nodes {
        match n {
            Node::Stage(s) => {
                entries.push((s.name.clone(), "stage".into(), s.factory.info().name.into()))
            }
            Node::Loop { name, body, .. } => {
                entries.push((name.clone(), "loop".into(), "loop".into()));
                for s in body {
                    entries.push((s.name.clone(), "stage".into(), s.factory.info().name.into()));
                }
            }
        }
    }
    for s in &pipeline.sinks {
        entries.push((s.name.clone(), "sink".into(), s.factory.info().name.into()));
    }

    // The journal is checked before anything in the output folder is touched, so a refused
    // resume leaves the earlier run's files as they were.
    let (journal, stored) = open_journal(pipeline, opts)?;

    // Sources are opened once here to learn their sizes for the progress bar.
    let mut total = Some(0u64);
    for s in &pipeline.sources {
        let src = open_source(s)?;
        total = match (total, src.len()) {
            (Some(t), Some(n)) => Some(t + n),
            _ => None,
        };
    }
    let total = if opts.process == 0 { total } else { None };
    let state = Arc::new(
        RunState::new(&out_dir, &entries, total, opts.process).map_err(|error| {
            RunError::Output {
                path: out_dir.clone(),
                error,
            }
        })?,
    );

    if let Some(j) = &journal {
        state.journal(|m| {
            m.folder = Some(j.dir().to_path_buf());
            m.resumed = opts.resume && stored.is_some();
        });
    }

    let config = timely_config(opts)?;
    let shared = Arc::new(pipeline.clone());
    let st = state.clone();
    let od = out_dir.clone();
    let first_worker = opts.process * opts.workers.max(1);
    let stored = stored.unwrap_or(Stored {
        epochs: 0,
        complete: false,
    });
    tracing::info!(pipeline = %pipeline.spec.name, workers = opts.workers, out = %out_dir.display(), "run starts");
    let guards = timely::execute(config, move |worker| {
        run_worker(
            worker,
            &shared,
            &st,
            &od,
            first_worker,
            journal.clone(),
            stored,
        )
    })
    .map_err(RunError::Cluster)?;
    let mut first_error = None;
    for r in guards.join() {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(panic) => {
                first_error.get_or_insert(RunError::Worker(panic));
            }
        }
    }
    let metrics = state.finish(
        &pipeline.spec.name,
        opts.workers,
        opts.processes,
        opts.process,
    );
    if let Some(e) = first_error {
        return Err(e);
    }
    let name = if opts.process == 0 {
        "metrics.json".to_string()
    } else {
        format!("metrics.{}.json", opts.process)
    };
    let text = serde_json::to_string_pretty(&metrics).expect("metrics serialise");
    write_atomic(&out_dir.join(name), text.as_bytes()).map_err(|error| RunError::Output {
        path: out_dir.clone(),
        error,
    })?;
    let errors_file = state
        .errors_path()
        .exists()
        .then(|| state.errors_path().to_path_buf());
    tracing::info!(
        records = metrics.records_read,
        failed = metrics.records_failed,
        seconds = format!("{:.2}", metrics.wall_seconds),
        "run finished"
    );
    Ok(RunSummary {
        metrics,
        out_dir,
        errors_file,
    })
}

/// Opens the journal: a fresh one (clearing any old one), the old one to resume from, or none.
/// The second value is what the old journal holds, when resuming from one.
fn open_journal(
    pipeline: &Pipeline,
    opts: &RunOptions,
) -> Result<(Option<Arc<Journal>>, Option<Stored>), RunError> {
    let dir = crate::journal::journal_dir(&opts.out_dir, opts.process);
    let output = |error| RunError::Output {
        path: opts.out_dir.clone(),
        error,
    };
    if !opts.journal {
        if opts.resume {
            return Err(RunError::Resume {
                folder: dir,
                reason: "resuming needs the journal; do not turn it off".into(),
            });
        }
        crate::journal::remove(&dir).map_err(output)?;
        return Ok((None, None));
    }
    let header =
        crate::journal::Header::of(pipeline, opts.processes).map_err(|e| RunError::Build {
            entry: "journal".into(),
            reason: format!("cannot hash the pipeline's model packages: {e}"),
        })?;
    if opts.resume {
        match Journal::resume(&dir, &header) {
            Ok(Some((j, stored))) => {
                tracing::info!(
                    journal = %dir.display(),
                    epochs = stored.epochs,
                    complete = stored.complete,
                    "resuming"
                );
                return Ok((Some(Arc::new(j)), Some(stored)));
            }
            Ok(None) => tracing::info!(
                journal = %dir.display(),
                "no journal to resume from; the run starts from the beginning"
            ),
            Err(JournalError::Io(e)) => return Err(output(e)),
            Err(e) => {
                return Err(RunError::Resume {
                    folder: dir,
                    reason: e.to_string(),
                })
            }
        }
    }
    let j = Journal::create(&dir, &header).map_err(output)?;
    Ok((Some(Arc::new(j)), None))
}

/// Writes a file through a temporary name and a rename, so readers never see half a file.
pub fn write_atomic(path: &FsPath, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// The records the sinks wrote, per epoch and per entry they read from, until the epoch is
/// journaled (worker 0 only).
#[derive(Default)]
struct Collector {
    enabled: bool,
    epochs: BTreeMap<u64, BTreeMap<String, Vec<Record>>>,
}

impl Collector {
    fn add(&mut self, epoch: u64, input: &str, records: &[Record]) {
        if self.enabled {
            self.epochs
                .entry(epoch)
                .or_default()
                .entry(input.to_string())
                .or_insert_with(|| records.to_vec());
        }
    }
}

/// Sink state shared between its operator and the worker (which flushes it at the end).
struct SinkCell {
    name: String,
    /// The entry the sink reads from.
    input: String,
    writer: Option<Box<dyn Sink>>,
    stash: BTreeMap<u64, Vec<Record>>,
    counters: Arc<Counters>,
    state: Arc<RunState>,
    collector: Rc<RefCell<Collector>>,
    /// Every epoch below this has been written.
    done_below: u64,
    finished: bool,
}

impl SinkCell {
    fn flush_until(&mut self, done: impl Fn(u64) -> bool) {
        let ready: Vec<u64> = self.stash.keys().copied().filter(|t| done(*t)).collect();
        for t in ready {
            let mut recs = self.stash.remove(&t).unwrap_or_default();
            recs.sort_by(|a, b| a.seq.cmp(&b.seq).then_with(|| a.key.cmp(&b.key)));
            if self.writer.is_none() {
                continue;
            }
            self.state.note_epoch(t);
            self.collector.borrow_mut().add(t, &self.input, &recs);
            self.write_epoch(t, &recs);
        }
    }

    /// Writes one epoch's records; if the sink fails, they fail in that epoch.
    fn write_epoch(&mut self, epoch: u64, recs: &[Record]) {
        let Some(w) = self.writer.as_mut() else {
            return;
        };
        let start = Instant::now();
        match w.write(recs) {
            Ok(()) => Counters::add(&self.counters.records_out, recs.len() as u64),
            Err(reason) => {
                for r in recs {
                    let f = Failure::of(r, &self.name, reason.clone());
                    self.state.fail_at(epoch, &f, false);
                }
                Counters::add(&self.counters.records_failed, recs.len() as u64);
            }
        }
        self.counters.busy(start.elapsed());
    }

    /// Feeds a journaled epoch to the sink.
    fn replay(&mut self, epoch: u64, data: &EpochData) {
        if self.writer.is_none() {
            return;
        }
        if let Some(recs) = data.streams.get(&self.input) {
            Counters::add(&self.counters.records_in, recs.len() as u64);
            self.write_epoch(epoch, recs);
        }
    }

    fn finish(&mut self) -> Result<(), RunError> {
        self.flush_until(|_| true);
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        if let Some(w) = self.writer.as_mut() {
            let files = w.finish().map_err(|reason| RunError::Sink {
                entry: self.name.clone(),
                reason,
            })?;
            self.state.outputs(files);
        }
        Ok(())
    }
}

/// Writes completed epochs to the journal on a thread of its own, in order, so the workers
/// never wait for the disk unless it falls `queue` epochs behind (twice `max_in_flight`: the
/// journal holds at most about as many epochs in memory again as the dataflow). Each write
/// takes every epoch waiting as one segment with one `fsync`.
struct JournalWriter {
    tx: Option<crossbeam_channel::Sender<EpochData>>,
    thread: Option<std::thread::JoinHandle<bool>>,
}

impl JournalWriter {
    fn start(journal: Arc<Journal>, queue: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<EpochData>(queue);
        let thread = std::thread::Builder::new()
            .name("latentflow-journal".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() <= queue {
                        match rx.try_recv() {
                            Ok(d) => batch.push(d),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = journal.write_epochs(&batch) {
                        // The run goes on; a resume redoes the epochs from this one.
                        tracing::error!(
                            journal = %journal.dir().display(),
                            epoch = batch[0].epoch,
                            error = %e,
                            "cannot write the journal; it stops here"
                        );
                        return false;
                    }
                }
                true
            })
            .expect("a thread starts");
        JournalWriter {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Queues an epoch; false once the writer has stopped on an error.
    fn send(&self, data: EpochData) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(data).is_ok())
    }

    /// Waits for every queued epoch; true if all were written.
    fn close(&mut self) -> bool {
        self.tx = None;
        self.thread
            .take()
            .is_some_and(|t| t.join().unwrap_or(false))
    }
}

/// The first worker of a process: it completes epochs (errors file, journal) and replays the
/// journal when resuming.
struct Ledger {
    /// The next epoch to complete.
    next: u64,
    /// Epochs completed by this run.
    computed: u64,
    journal: Option<Arc<Journal>>,
    writer: Option<JournalWriter>,
    /// Epochs the journal writer may fall behind.
    queue: usize,
    collector: Rc<RefCell<Collector>>,
    sinks: Vec<Rc<RefCell<SinkCell>>>,
    state: Arc<RunState>,
}

impl Ledger {
    /// Feeds epochs `0..` from the journal to the sinks and the errors file: those below `skip`,
    /// or all it holds when `skip` is `u64::MAX` (the journaled run finished).
    fn replay(&mut self, stored: Stored, skip: u64) -> Result<(), RunError> {
        let Some(j) = self.journal.clone() else {
            return Ok(());
        };
        let upto = if skip == u64::MAX {
            stored.epochs
        } else {
            // Another process journaled fewer epochs: this one computes the rest again.
            j.truncate(skip).map_err(|error| RunError::Output {
                path: j.dir().to_path_buf(),
                error,
            })?;
            skip.min(stored.epochs)
        };
        j.replay(upto, |data| {
            let e = data.epoch;
            for cell in &self.sinks {
                cell.borrow_mut().replay(e, &data);
            }
            // Failures of the sinks themselves happen again while replaying.
            let again = self.state.take_failures(e);
            let mut failures: Vec<Failure> = data.failures;
            self.state.replayed_failures(failures.len() as u64);
            failures.extend(again.into_iter().map(|(f, _)| f));
            failures.sort_by(crate::metrics::failure_order);
            self.state.write_failures(&failures);
        })
        .map_err(|e| RunError::Resume {
            folder: j.dir().to_path_buf(),
            reason: e.to_string(),
        })?;
        self.state.journal(|m| m.epochs_replayed = upto);
        self.next = upto;
        self.writer = Some(JournalWriter::start(j, self.queue));
        Ok(())
    }

    /// Completes every epoch that the probe and the sinks have passed.
    fn advance(&mut self, probe: &ProbeHandle<u64>) {
        let Some(frontier) = probe.with_frontier(|f| f.iter().min().copied()) else {
            return;
        };
        let sinks = self
            .sinks
            .iter()
            .map(|c| c.borrow().done_below)
            .min()
            .unwrap_or(u64::MAX);
        while self.next < frontier.min(sinks) {
            self.complete(self.next);
            self.next += 1;
        }
    }

    fn complete(&mut self, epoch: u64) {
        let failures = self.state.take_failures(epoch);
        let streams = self
            .collector
            .borrow_mut()
            .epochs
            .remove(&epoch)
            .unwrap_or_default();
        if let Some(w) = &self.writer {
            let data = EpochData {
                epoch,
                streams,
                failures: failures
                    .iter()
                    .filter(|(_, keep)| *keep)
                    .map(|(f, _)| f.clone())
                    .collect(),
            };
            if !w.send(data) {
                self.stop_journal();
            }
        }
        let failures: Vec<Failure> = failures.into_iter().map(|(f, _)| f).collect();
        self.state.write_failures(&failures);
        self.computed += 1;
    }

    /// Completes the remaining epochs once the dataflow has finished and marks the journal
    /// complete.
    fn finish(&mut self) {
        if self.next != u64::MAX {
            let end = self
                .state
                .last_epoch()
                .map_or(self.next, |l| (l + 1).max(self.next));
            while self.next < end {
                self.complete(self.next);
                self.next += 1;
            }
        }
        let computed = self.computed;
        self.state.journal(|m| m.epochs_computed = computed);
        let written = self.writer.as_mut().is_some_and(JournalWriter::close);
        if !written {
            self.stop_journal();
        }
        if let (Some(j), true) = (&self.journal, written) {
            if let Err(e) = j.mark_complete(self.next) {
                tracing::error!(journal = %j.dir().display(), error = %e, "cannot mark the journal complete");
            }
        }
    }

    /// Journals nothing more (the writer failed, and said why).
    fn stop_journal(&mut self) {
        if let Some(mut w) = self.writer.take() {
            w.close();
        }
        self.journal = None;
        let mut c = self.collector.borrow_mut();
        c.enabled = false;
        c.epochs.clear();
        self.state.journal(|m| m.folder = None);
    }
}

/// The smallest of the values the workers offer (each process's leader offers one), known to
/// every worker once this returns.
fn agree_min(worker: &mut timely::worker::Worker, mine: Option<u64>) -> u64 {
    let seen = Rc::new(std::cell::Cell::new(u64::MAX));
    let probe = ProbeHandle::new();
    let s = seen.clone();
    let mut input = worker.dataflow::<u64, _, _>(|scope| {
        let (input, stream) = scope.new_input::<u64>();
        stream
            .broadcast()
            .inspect(move |x: &u64| s.set(s.get().min(*x)))
            .probe_with(&probe);
        input
    });
    if let Some(v) = mine {
        input.send(v);
    }
    drop(input);
    while !probe.done() {
        worker.step_or_park(Some(Duration::from_millis(1)));
    }
    seen.get()
}

fn run_worker(
    worker: &mut timely::worker::Worker,
    pipeline: &Pipeline,
    state: &Arc<RunState>,
    out_dir: &FsPath,
    first_worker: usize,
    journal: Option<Arc<Journal>>,
    stored: Stored,
) -> Result<(), RunError> {
    let index = worker.index();
    let peers = worker.peers();
    // Timely numbers workers process by process: this process's first is its leader.
    let leader = index == first_worker;
    let settings = &pipeline.spec.settings;
    let epoch_size = settings.epoch_size.max(1) as u64;
    let max_in_flight = settings.max_in_flight.max(1) as u64;

    // Build everything that can fail before the dataflow exists.
    let mut sources = Vec::new();
    for s in &pipeline.sources {
        let src = open_source(s)?;
        sources.push((s.name.clone(), src, state.counters(&s.name)));
    }
    let collector = Rc::new(RefCell::new(Collector {
        enabled: index == 0 && journal.is_some(),
        epochs: BTreeMap::new(),
    }));
    let mut sinks: Vec<Rc<RefCell<SinkCell>>> = Vec::new();
    for s in &pipeline.sinks {
        let writer = if index == 0 {
            Some(
                s.factory
                    .build(&s.params, out_dir)
                    .map_err(|reason| RunError::Build {
                        entry: s.name.clone(),
                        reason,
                    })?,
            )
        } else {
            None
        };
        sinks.push(Rc::new(RefCell::new(SinkCell {
            name: s.name.clone(),
            input: s.input.clone(),
            writer,
            stash: BTreeMap::new(),
            counters: state.counters(&s.name),
            state: state.clone(),
            collector: collector.clone(),
            done_below: 0,
            finished: false,
        })));
    }

    // Every process skips the epochs that all processes have journaled.
    let offer = journal.as_ref().map_or(0, |_| stored.skip());
    let skip = agree_min(worker, leader.then_some(offer));
    let mut ledger = leader.then(|| Ledger {
        next: 0,
        computed: 0,
        journal: journal.clone(),
        writer: None,
        queue: (2 * max_in_flight as usize).max(4),
        collector: collector.clone(),
        sinks: sinks.clone(),
        state: state.clone(),
    });
    let mut replay_error = None;
    if let Some(l) = ledger.as_mut() {
        if let Err(e) = l.replay(stored, skip) {
            // Stop reading and let the dataflow drain; the run then reports the error.
            state.abort();
            replay_error = Some(e);
        }
    }

    let probe = ProbeHandle::new();
    let mut inputs: Vec<InputHandleVec<u64, Record>> = Vec::new();
    let build_result: Result<(), RunError> = worker.dataflow::<u64, _, _>(|scope| {
        let mut streams: HashMap<String, Records<'_, u64>> = HashMap::new();
        for (name, _, _) in &sources {
            let (handle, stream) = scope.new_input::<Record>();
            inputs.push(handle);
            let stream = stream.exchange(|r: &Record| r.seq);
            streams.insert(name.clone(), stream);
        }
        for node in &pipeline.nodes {
            let input = streams[node.input()].clone();
            let out = match node {
                Node::Stage(s) => stage_operator(input, s, state, epoch_size)?,
                Node::Loop {
                    name,
                    max_rounds,
                    budget,
                    body,
                    ..
                } => loop_operator(
                    input,
                    name,
                    *max_rounds,
                    budget.clone(),
                    body,
                    state,
                    epoch_size,
                )?,
            };
            // Probed too, so an epoch completes only when every stage is done with it (even
            // one no sink reads), and its failures are all known.
            let out = out.probe_with(&probe);
            streams.insert(node.name().to_string(), out);
        }
        for (node, cell) in pipeline.sinks.iter().zip(&sinks) {
            let input = streams[&node.input].clone();
            sink_operator(input, node, cell.clone(), state).probe_with(&probe);
        }
        Ok(())
    });
    build_result?;

    // Feed the sources epoch by epoch, waiting for the frontier to keep memory bounded.
    let mut readers: Vec<_> = sources
        .iter()
        .map(|(name, src, counters)| (name, src.read(index, peers).peekable(), counters))
        .collect();
    // Epochs the journal holds are not read again.
    if skip > 0 {
        for (_, reader, _) in readers.iter_mut() {
            let mut n = 0u64;
            while reader
                .peek()
                .is_some_and(|o| outcome_seq(o) / epoch_size < skip)
            {
                reader.next();
                n += 1;
            }
            state.skipped(n);
        }
    }
    let mut epoch = 0u64;
    loop {
        if state.aborted() {
            break;
        }
        let next = readers
            .iter_mut()
            .filter_map(|(_, r, _)| r.peek().map(|o| outcome_seq(o) / epoch_size))
            .min();
        let Some(next) = next else { break };
        epoch = epoch.max(next);
        // Advance first: after a jump (a resume, a source that starts late) the probe cannot
        // pass the epochs skipped until the inputs leave them.
        for input in inputs.iter_mut() {
            if input.time() < &epoch {
                input.advance_to(epoch);
            }
        }
        while epoch >= max_in_flight && probe.less_than(&(epoch + 1 - max_in_flight)) {
            worker.step_or_park(Some(Duration::from_millis(1)));
            if let Some(l) = ledger.as_mut() {
                l.advance(&probe);
            }
        }
        for ((_, reader, counters), input) in readers.iter_mut().zip(inputs.iter_mut()) {
            let mut n = 0u64;
            while reader
                .peek()
                .is_some_and(|o| outcome_seq(o) / epoch_size <= epoch)
            {
                match reader.next() {
                    Some(Ok(record)) => {
                        input.send(record);
                        n += 1;
                    }
                    Some(Err(f)) => {
                        Counters::add(&counters.records_failed, 1);
                        state.fail_at(epoch, &f, true);
                    }
                    None => break,
                }
            }
            if n > 0 {
                state.note_epoch(epoch);
            }
            Counters::add(&counters.records_out, n);
            state.read(n);
        }
        epoch += 1;
        for input in inputs.iter_mut() {
            input.advance_to(epoch);
        }
        worker.step();
        if let Some(l) = ledger.as_mut() {
            l.advance(&probe);
        }
    }
    drop(readers);
    drop(inputs);
    while worker.step_or_park(Some(Duration::from_millis(1))) {
        if let Some(l) = ledger.as_mut() {
            l.advance(&probe);
        }
    }
    if let Some(e) = replay_error {
        return Err(e);
    }
    for cell in &sinks {
        cell.borrow_mut().flush_until(|_| true);
    }
    if let Some(l) = ledger.as_mut() {
        l.finish();
    }
    for cell in &sinks {
        cell.borrow_mut().finish()?;
    }
    Ok(())
}

/// The epoch (outer timestamp) of a time inside or outside loops.
trait Epoch {
    fn epoch(&self) -> u64;
}

impl Epoch for u64 {
    fn epoch(&self) -> u64 {
        *self
    }
}

impl Epoch for Product<u64, u32> {
    fn epoch(&self) -> u64 {
        self.outer
    }
}

fn open_source(s: &SourceNode) -> Result<Box<dyn Source>, RunError> {
    s.factory.open(&s.params).map_err(|reason| RunError::Build {
        entry: s.name.clone(),
        reason,
    })
}

fn outcome_seq(o: &Outcome) -> u64 {
    match o {
        Ok(r) => r.seq,
        Err(f) => f.seq,
    }
}

/// A batch waiting to be emitted, in arrival order.
enum Slot {
    Ready(Vec<Outcome>),
    Pending(Box<dyn PendingBatch>),
}

fn stage_operator<'s, T: Timestamp + Epoch>(
    stream: Records<'s, T>,
    node: &StageNode,
    state: &Arc<RunState>,
    epoch_size: u64,
) -> Result<Records<'s, T>, RunError> {
    let scope = stream.scope();
    let activator: Arc<OnceLock<SyncActivator>> = Arc::new(OnceLock::new());
    let act = activator.clone();
    let cx = StageContext {
        name: node.name.clone(),
        worker: scope.index(),
        peers: scope.peers(),
        waker: Waker::new(move || {
            if let Some(a) = act.get() {
                let _ = a.activate();
            }
        }),
        out_dir: state.out_dir().to_path_buf(),
    };
    let mut stage = node
        .factory
        .build(&node.params, &cx)
        .map_err(|reason| RunError::Build {
            entry: node.name.clone(),
            reason,
        })?;
    let counters = state.counters(&node.name);
    let state = state.clone();
    let worker = scope.worker();
    let out = stream.unary::<CapacityContainerBuilder<Vec<Record>>, _, _, _>(
        PipelinePact,
        &node.name,
        move |_cap, info| {
            let _ = activator.set(worker.sync_activator_for(info.address.to_vec()));
            let mut queue: VecDeque<(CapabilitySet<T>, Slot)> = VecDeque::new();
            let mut active_since: Option<Instant> = None;
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    let caps = cap.retain_stamp(0);
                    let batch: Vec<Record> = data.flat_map(|c| c.drain(..)).collect();
                    if batch.is_empty() {
                        return;
                    }
                    Counters::add(&counters.records_in, batch.len() as u64);
                    Counters::add(&counters.batches, 1);
                    let start = Instant::now();
                    let slot = match stage.process(batch, &cx) {
                        Completion::Ready(v) => Slot::Ready(v),
                        Completion::Pending(p) => Slot::Pending(p),
                    };
                    counters.busy(start.elapsed());
                    queue.push_back((caps, slot));
                    active_since.get_or_insert(start);
                });
                while let Some((_, slot)) = queue.front_mut() {
                    let outcomes = match slot {
                        Slot::Ready(v) => std::mem::take(v),
                        Slot::Pending(p) => match p.poll() {
                            Some(v) => v,
                            None => break,
                        },
                    };
                    let (caps, _) = queue.pop_front().expect("front exists");
                    let epoch = caps.iter().map(|c| c.time().epoch()).min();
                    let mut session = output.session(&caps);
                    for o in outcomes {
                        match o {
                            Ok(r) => {
                                Counters::add(&counters.records_out, 1);
                                session.give(r);
                            }
                            Err(f) => {
                                Counters::add(&counters.records_failed, 1);
                                let e = epoch.unwrap_or(f.seq / epoch_size);
                                state.fail_at(e, &f, true);
                            }
                        }
                    }
                }
                if queue.is_empty() {
                    if let Some(t) = active_since.take() {
                        Counters::add(&counters.active_ns, t.elapsed().as_nanos() as u64);
                    }
                }
            }
        },
    );
    Ok(out)
}

fn loop_operator<'s>(
    stream: Records<'s, u64>,
    name: &str,
    max_rounds: u32,
    budget: Option<String>,
    body: &[StageNode],
    state: &Arc<RunState>,
    epoch_size: u64,
) -> Result<Records<'s, u64>, RunError> {
    let outer = stream.scope();
    let counters = state.counters(name);
    outer.iterative::<u32, _, _>(|inner| {
        let (handle, cycle) = inner.loop_variable::<Vec<Record>>(1);
        let c_in = counters.clone();
        let entered = stream
            .enter(inner)
            .unary::<CapacityContainerBuilder<Vec<Record>>, _, _, _>(
                PipelinePact,
                "LoopEnter",
                move |_, _| {
                    move |input, output| {
                        input.for_each_stamp(|cap, data| {
                            let caps = cap.retain_stamp(0);
                            let mut s = output.session(&caps);
                            for c in data {
                                for mut r in c.drain(..) {
                                    Counters::add(&c_in.records_in, 1);
                                    r.round = 0;
                                    s.give(r);
                                }
                            }
                        });
                    }
                },
            );
        let c_out = counters.clone();
        let (done, again) = entered
            .concat(cycle)
            .ok_err::<Vec<Record>, _, Vec<Record>, _, _>(move |r: Record| {
                let limit = match budget.as_deref().and_then(|b| r.get(b)) {
                    Some(Value::Int(n)) => (*n).clamp(0, max_rounds as i64) as u32,
                    _ => max_rounds,
                };
                if r.round >= limit {
                    Counters::add(&c_out.records_out, 1);
                    Ok(r)
                } else {
                    Err(r)
                }
            });
        let mut current = again;
        for s in body {
            current = stage_operator(current, s, state, epoch_size)?;
        }
        current
            .unary::<CapacityContainerBuilder<Vec<Record>>, _, _, _>(
                PipelinePact,
                "LoopRound",
                |_, _| {
                    |input, output| {
                        input.for_each_stamp(|cap, data| {
                            let caps = cap.retain_stamp(0);
                            let mut s = output.session(&caps);
                            for c in data {
                                for mut r in c.drain(..) {
                                    r.round += 1;
                                    s.give(r);
                                }
                            }
                        });
                    }
                },
            )
            .connect_loop(handle);
        Ok(done.leave(outer))
    })
}

fn sink_operator<'s>(
    stream: Records<'s, u64>,
    node: &SinkNode,
    cell: Rc<RefCell<SinkCell>>,
    _state: &Arc<RunState>,
) -> Records<'s, u64> {
    let counters = cell.borrow().counters.clone();
    let routed = stream.exchange(|_: &Record| 0);
    routed
        .clone()
        .sink(PipelinePact, &node.name, move |(input, frontier)| {
            let mut c = cell.borrow_mut();
            input.for_each_stamp(|cap, data| {
                let Some(t) = cap.least().copied() else {
                    return;
                };
                let stash = c.stash.entry(t).or_default();
                for d in data {
                    Counters::add(&counters.records_in, d.len() as u64);
                    stash.append(d);
                }
            });
            c.flush_until(|t| !frontier.less_equal(&t));
            c.done_below = frontier
                .frontier()
                .iter()
                .min()
                .copied()
                .unwrap_or(u64::MAX);
        });
    routed
}
