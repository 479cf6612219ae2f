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
//! - **Exchange.** Records leaving a source are exchanged by a hash of their key, so every
//!   worker gets a share of the work whatever the source's layout.
//! - **Stages** are unary operators that hand each received batch to the stage. A stage may
//!   answer later ([`Completion::Pending`]); the operator keeps the batch's capabilities and
//!   emits results in arrival order, woken by the stage through a `SyncActivator`.
//! - **Loops** are timely iterative scopes. A record enters with `round = 0`; at the head of
//!   the loop, records whose budget is spent leave and the rest run the loop's stages again.
//! - **Sinks** receive all records on worker 0 (one writer per file); only the process that
//!   hosts worker 0 writes outputs.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::{Path as FsPath, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline as PipelinePact;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::Concat;
use timely::dataflow::operators::{
    CapabilitySet, ConnectLoop, Enter, Exchange, Leave, LoopVariable, OkErr, Probe,
};
use timely::dataflow::{InputHandleVec, ProbeHandle, Stream};
use timely::progress::Timestamp;
use timely::scheduling::SyncActivator;

use crate::metrics::{Counters, RunMetrics, RunState};
use crate::plan::{Node, Pipeline, SinkNode, SourceNode, StageNode};
use crate::stage::{Completion, Outcome, PendingBatch, Sink, Source, StageContext, Waker};
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
        }
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
    /// A worker failed.
    #[error("a worker failed: {0}")]
    Worker(String),
    /// The output folder could not be used.
    #[error("cannot write to the output folder {path}: {source}")]
    Output {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
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

fn key_hash(key: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
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
        RunState::new(&out_dir, &entries, total, opts.process).map_err(|source| {
            RunError::Output {
                path: out_dir.clone(),
                source,
            }
        })?,
    );

    let config = timely_config(opts)?;
    let shared = Arc::new(pipeline.clone());
    let st = state.clone();
    let od = out_dir.clone();
    tracing::info!(pipeline = %pipeline.spec.name, workers = opts.workers, out = %out_dir.display(), "run starts");
    let guards = timely::execute(config, move |worker| run_worker(worker, &shared, &st, &od))
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
    write_atomic(&out_dir.join(name), text.as_bytes()).map_err(|source| RunError::Output {
        path: out_dir.clone(),
        source,
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

/// Writes a file through a temporary name and a rename, so readers never see half a file.
pub fn write_atomic(path: &FsPath, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Sink state shared between its operator and the worker (which flushes it at the end).
struct SinkCell {
    name: String,
    writer: Option<Box<dyn Sink>>,
    stash: BTreeMap<u64, Vec<Record>>,
    counters: Arc<Counters>,
    state: Arc<RunState>,
    finished: bool,
}

impl SinkCell {
    fn flush_until(&mut self, done: impl Fn(u64) -> bool) {
        let ready: Vec<u64> = self.stash.keys().copied().filter(|t| done(*t)).collect();
        for t in ready {
            let mut recs = self.stash.remove(&t).unwrap_or_default();
            recs.sort_by(|a, b| a.seq.cmp(&b.seq).then_with(|| a.key.cmp(&b.key)));
            let Some(w) = self.writer.as_mut() else {
                continue;
            };
            let start = Instant::now();
            match w.write(&recs) {
                Ok(()) => Counters::add(&self.counters.records_out, recs.len() as u64),
                Err(reason) => {
                    for r in &recs {
                        self.state
                            .fail(&crate::stage::Failure::of(r, &self.name, reason.clone()));
                    }
                    Counters::add(&self.counters.records_failed, recs.len() as u64);
                }
            }
            self.counters.busy(start.elapsed());
        }
    }

    fn finish(&mut self) -> Result<(), RunError> {
        self.flush_until(|_| true);
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        if let Some(w) = self.writer.as_mut() {
            let files = w.finish().map_err(|reason| RunError::Build {
                entry: self.name.clone(),
                reason,
            })?;
            self.state.outputs(files);
        }
        Ok(())
    }
}

fn run_worker(
    worker: &mut timely::worker::Worker,
    pipeline: &Pipeline,
    state: &Arc<RunState>,
    out_dir: &FsPath,
) -> Result<(), RunError> {
    let index = worker.index();
    let peers = worker.peers();
    let settings = &pipeline.spec.settings;
    let epoch_size = settings.epoch_size.max(1) as u64;
    let max_in_flight = settings.max_in_flight.max(1) as u64;

    // Build everything that can fail before the dataflow exists.
    let mut sources = Vec::new();
    for s in &pipeline.sources {
        let src = open_source(s)?;
        sources.push((s.name.clone(), src, state.counters(&s.name)));
    }
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
            writer,
            stash: BTreeMap::new(),
            counters: state.counters(&s.name),
            state: state.clone(),
            finished: false,
        })));
    }

    let probe = ProbeHandle::new();
    let mut inputs: Vec<InputHandleVec<u64, Record>> = Vec::new();
    let build_result: Result<(), RunError> = worker.dataflow::<u64, _, _>(|scope| {
        let mut streams: HashMap<String, Records<'_, u64>> = HashMap::new();
        for (name, _, _) in &sources {
            let (handle, stream) = scope.new_input::<Record>();
            inputs.push(handle);
            let stream = stream.exchange(|r: &Record| key_hash(&r.key));
            streams.insert(name.clone(), stream);
        }
        for node in &pipeline.nodes {
            let input = streams[node.input()].clone();
            let out = match node {
                Node::Stage(s) => stage_operator(input, s, state)?,
                Node::Loop {
                    name,
                    max_rounds,
                    budget,
                    body,
                    ..
                } => loop_operator(input, name, *max_rounds, budget.clone(), body, state)?,
            };
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
    let mut epoch = 0u64;
    loop {
        let next = readers
            .iter_mut()
            .filter_map(|(_, r, _)| r.peek().map(|o| outcome_seq(o) / epoch_size))
            .min();
        let Some(next) = next else { break };
        epoch = epoch.max(next);
        while epoch >= max_in_flight && probe.less_than(&(epoch + 1 - max_in_flight)) {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        for ((_, reader, counters), input) in readers.iter_mut().zip(inputs.iter_mut()) {
            if input.time() < &epoch {
                input.advance_to(epoch);
            }
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
                        state.fail(&f);
                    }
                    None => break,
                }
            }
            Counters::add(&counters.records_out, n);
            state.read(n);
        }
        epoch += 1;
        for input in inputs.iter_mut() {
            input.advance_to(epoch);
        }
        worker.step();
    }
    drop(readers);
    drop(inputs);
    while worker.step_or_park(Some(Duration::from_millis(1))) {}
    for cell in &sinks {
        cell.borrow_mut().finish()?;
    }
    Ok(())
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

fn stage_operator<'s, T: Timestamp>(
    stream: Records<'s, T>,
    node: &StageNode,
    state: &Arc<RunState>,
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
                    let mut session = output.session(&caps);
                    for o in outcomes {
                        match o {
                            Ok(r) => {
                                Counters::add(&counters.records_out, 1);
                                session.give(r);
                            }
                            Err(f) => {
                                Counters::add(&counters.records_failed, 1);
                                state.fail(&f);
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
            current = stage_operator(current, s, state)?;
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
        });
    routed
}
