//! Inference services: one thread per model and device that owns the ONNX Runtime session and
//! runs requests from every worker in shared batches.
//!
//! Stages never hold a session themselves. They ask [`InferenceService::get`] for the service of
//! a model package and [`submit`](InferenceService::submit) rows to it; the service thread
//! gathers the requests of all timely workers into one batch (the dynamic batching of inference
//! servers such as Triton), runs the session once and hands every request its rows back. A GPU
//! thus sees full batches even when each worker only has a few records at hand, and a session,
//! whose `run` is not thread-safe, is only ever touched by its own thread.
//!
//! Decisions:
//! - One service per (ONNX file, device) in the process, found through a global registry. The
//!   registry holds weak references: a service lives while some handle to it does, and its
//!   thread ends once the last handle is dropped and the queued requests are answered. A later
//!   [`InferenceService::get`] starts a fresh one. A second `get` with a different batch size,
//!   delay or thread count gets the running service; its settings stay (logged at debug).
//! - Batching: the thread takes the first waiting request, then keeps taking requests until the
//!   rows reach `max_batch` or `max_delay` has passed since that first request was submitted.
//!   Requests are never split; one larger than `max_batch` runs alone. Requests whose per-example
//!   shapes differ (a dynamic non-batch axis) cannot share a batch and run in the next one. When a
//!   model's batch axis is fixed, requests are not combined at all.
//! - Inputs are checked against the manifest when submitted, so a bad request fails alone and
//!   never spoils a batch. An error from ONNX Runtime during a run goes to every request of that
//!   batch, with ONNX Runtime's message.
//! - Each batched input is built with one allocation; a batch of one request passes its tensor
//!   to ONNX Runtime without copying. Outputs are copied once, into each request's share.
//! - Devices: `cpu` uses the CPU execution provider only. `cuda` registers the CUDA execution
//!   provider so that a failure to register or to create the session is an error (never a quiet
//!   fall-back to CPU). `auto` tries CUDA and falls back to CPU with a warning that says why; the
//!   outcome is remembered per model, so the warning appears once. CUDA needs the crate feature
//!   `cuda` and an ONNX Runtime library with the CUDA provider (the onnxruntime-gpu wheel).
//! - The submission queue is bounded: when the service is behind, `submit` blocks, which is the
//!   backpressure the dataflow needs.
//! - `get` verifies that the manifest matches the session's inputs and outputs; it does not
//!   recompute the file's checksum, which [`ModelPackage::check`] (run by the planner) does.

use std::collections::HashMap;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError};
use ndarray::{ArrayD, ArrayViewD, Axis, Slice};
use ort::ep::ExecutionProviderDispatch;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{PrimitiveTensorElementType, TensorRef};
use serde::{Deserialize, Serialize};

use crate::model::{ModelError, ModelPackage, TensorSpec};
use crate::runtime::{self, RuntimeError};
use crate::value::{DType, Dim, Tensor};

/// Whether this build can use the CUDA execution provider (the crate feature `cuda`).
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// Where a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The CPU execution provider.
    Cpu,
    /// The CUDA execution provider; an error if it cannot be used.
    Cuda,
    /// CUDA when it can be used, otherwise CPU with a warning saying why.
    #[default]
    Auto,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Auto => "auto",
        })
    }
}

/// A device name that is not `cpu`, `cuda` or `auto`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown device `{0}`; expected one of: cpu, cuda, auto")]
pub struct ParseDeviceError(pub String);

impl FromStr for Device {
    type Err = ParseDeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            "auto" => Ok(Device::Auto),
            _ => Err(ParseDeviceError(s.to_string())),
        }
    }
}

/// How an inference service runs its model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// The execution provider to use.
    pub device: Device,
    /// Most rows in one batch (a single larger request still runs, alone).
    pub max_batch: usize,
    /// Longest time the first request of a batch waits for more.
    pub max_delay: Duration,
    /// Threads ONNX Runtime uses inside one operator; `None` leaves ONNX Runtime's default.
    pub threads: Option<usize>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            device: Device::Auto,
            max_batch: 64,
            max_delay: Duration::from_millis(2),
            threads: None,
        }
    }
}

/// Why an inference request or service failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum InferenceError {
    /// ONNX Runtime could not be started.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),

    /// The model package does not match its ONNX file.
    #[error(transparent)]
    Model(Arc<ModelError>),

    /// The service configuration cannot be used.
    #[error("inference service for {}: {reason}", model.display())]
    Config {
        /// The ONNX file.
        model: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// CUDA was asked for but this binary was built without it.
    #[error(
        "cannot run {} on cuda: this build has no CUDA support; rebuild with `--features cuda`, \
         or use device `cpu` or `auto`",
        model.display()
    )]
    CudaNotCompiled {
        /// The ONNX file.
        model: PathBuf,
    },

    /// CUDA was asked for but ONNX Runtime could not use it.
    #[error(
        "cannot run {} on cuda: {reason}; check the GPU driver and that ONNX Runtime comes from \
         the onnxruntime-gpu wheel, or use device `cpu` or `auto`",
        model.display()
    )]
    Cuda {
        /// The ONNX file.
        model: PathBuf,
        /// What ONNX Runtime reported.
        reason: String,
    },

    /// ONNX Runtime could not create a session for the model.
    #[error("ONNX Runtime cannot open {}: {reason}", model.display())]
    Session {
        /// The ONNX file.
        model: PathBuf,
        /// What ONNX Runtime reported.
        reason: String,
    },

    /// The request's tensors do not fit the model's inputs.
    #[error("bad inference request for {}: {reason}", model.display())]
    Request {
        /// The ONNX file.
        model: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// ONNX Runtime failed while running the batch this request was part of.
    #[error("inference with {} failed: {reason}", model.display())]
    Run {
        /// The ONNX file.
        model: PathBuf,
        /// What ONNX Runtime reported.
        reason: String,
    },

    /// The service thread ended before answering.
    #[error("the inference service for {} stopped before answering", model.display())]
    Stopped {
        /// The ONNX file.
        model: PathBuf,
    },

    /// The ticket's reply was already taken.
    #[error("the reply from {} was already taken from this ticket", model.display())]
    Taken {
        /// The ONNX file.
        model: PathBuf,
    },
}

impl From<ModelError> for InferenceError {
    fn from(e: ModelError) -> Self {
        InferenceError::Model(Arc::new(e))
    }
}

/// Named output tensors of a request, each with the request's rows on its first axis.
pub type Outputs = Vec<(String, Tensor)>;

/// What a service has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Requests answered, successfully or not.
    pub requests: u64,
    /// Rows run, over all batches.
    pub rows: u64,
    /// Session runs.
    pub batches: u64,
    /// Session runs that failed.
    pub failed_batches: u64,
    /// Rows in the largest batch.
    pub largest_batch: u64,
}

impl ServiceStats {
    /// Mean rows per batch (0 before the first batch).
    pub fn mean_batch(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.rows as f64 / self.batches as f64
        }
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    rows: AtomicU64,
    batches: AtomicU64,
    failed_batches: AtomicU64,
    largest_batch: AtomicU64,
}

type Reply = Result<Outputs, InferenceError>;

struct Request {
    /// One tensor per model input, in manifest order.
    inputs: Vec<Tensor>,
    rows: usize,
    submitted: Instant,
    reply: Sender<Reply>,
    on_done: Box<dyn FnOnce() + Send>,
}

struct Shared {
    model: PathBuf,
    device: Device,
    config: ServiceConfig,
    inputs: Vec<TensorSpec>,
    /// Whether requests are stacked along the first axis (see [`crate::model::Manifest::batch`]).
    batched: bool,
    queue: Sender<Request>,
    counters: Arc<Counters>,
}

/// A handle to the inference service of one model on one device; clones share the service.
#[derive(Clone)]
pub struct InferenceService {
    shared: Arc<Shared>,
}

impl fmt::Debug for InferenceService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InferenceService")
            .field("model", &self.shared.model)
            .field("device", &self.shared.device)
            .field("config", &self.shared.config)
            .finish()
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    model: PathBuf,
    device: Device,
}

#[derive(Default)]
struct Registry {
    services: HashMap<Key, Weak<Shared>>,
    /// What `auto` resolved to, per model, so CUDA is tried (and its failure logged) once.
    auto: HashMap<PathBuf, Device>,
}

impl Registry {
    fn live(&mut self, model: &Path, device: Device) -> Option<InferenceService> {
        let key = Key {
            model: model.to_path_buf(),
            device,
        };
        match self.services.get(&key).and_then(Weak::upgrade) {
            Some(shared) => Some(InferenceService { shared }),
            None => {
                self.services.remove(&key);
                None
            }
        }
    }
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

impl InferenceService {
    /// The service for `package` on `config.device`, started on first use.
    ///
    /// With [`Device::Auto`] this is the CUDA service when CUDA works and the CPU service
    /// otherwise. Starting a service opens the session (and checks it against the manifest)
    /// while holding the registry, so concurrent callers wait for one another instead of opening
    /// the model twice.
    pub fn get(package: &ModelPackage, config: &ServiceConfig) -> Result<Self, InferenceError> {
        let model = package.onnx_path();
        if config.max_batch == 0 {
            return Err(InferenceError::Config {
                model,
                reason: "max_batch must be at least 1".into(),
            });
        }
        if config.threads == Some(0) {
            return Err(InferenceError::Config {
                model,
                reason: "threads must be at least 1".into(),
            });
        }
        runtime::ensure_runtime()?;
        let key_path = model.canonicalize().unwrap_or_else(|_| model.clone());

        let mut registry = registry().lock().unwrap_or_else(PoisonError::into_inner);
        let resolved = match config.device {
            Device::Auto => registry.auto.get(&key_path).copied(),
            device => Some(device),
        };
        if let Some(device) = resolved {
            if let Some(service) = registry.live(&key_path, device) {
                service.note_config(config);
                return Ok(service);
            }
        }

        let (session, device) = match resolved {
            Some(device) => (open_session(package, device, config.threads)?, device),
            None => {
                if cfg!(feature = "cuda") {
                    if let Some(service) = registry.live(&key_path, Device::Cuda) {
                        registry.auto.insert(key_path, Device::Cuda);
                        service.note_config(config);
                        return Ok(service);
                    }
                }
                let (session, device) = open_auto(package, config.threads)?;
                registry.auto.insert(key_path.clone(), device);
                if let Some(service) = registry.live(&key_path, device) {
                    service.note_config(config);
                    return Ok(service);
                }
                (session, device)
            }
        };

        package.check_session(&session)?;
        let service = Self::start(package, session, device, config)?;
        registry.services.insert(
            Key {
                model: key_path,
                device,
            },
            Arc::downgrade(&service.shared),
        );
        Ok(service)
    }

    fn start(
        package: &ModelPackage,
        session: Session,
        device: Device,
        config: &ServiceConfig,
    ) -> Result<Self, InferenceError> {
        let model = package.onnx_path();
        let manifest = package.manifest();
        let (queue, receiver) = bounded((2 * config.max_batch).max(64));
        let counters = Arc::new(Counters::default());
        let worker = Worker {
            session,
            receiver,
            model: model.clone(),
            input_names: manifest.inputs.iter().map(|t| t.name.clone()).collect(),
            outputs: manifest
                .outputs
                .iter()
                .map(|t| (t.name.clone(), t.dtype))
                .collect(),
            // A fixed batch axis means the graph takes exactly that many rows per run.
            batchable: manifest.batch
                && manifest
                    .inputs
                    .iter()
                    .all(|t| matches!(t.batch_axis(), Some(Dim::Named(_)))),
            batched: manifest.batch,
            max_batch: config.max_batch,
            max_delay: config.max_delay,
            counters: counters.clone(),
        };
        thread::Builder::new()
            .name(format!("infer-{}", manifest.name))
            .spawn(move || worker.run())
            .map_err(|e| InferenceError::Session {
                model: model.clone(),
                reason: format!("cannot start the service thread: {e}"),
            })?;
        tracing::info!(
            model = %model.display(),
            %device,
            max_batch = config.max_batch,
            max_delay_ms = config.max_delay.as_secs_f64() * 1e3,
            "inference service started"
        );
        Ok(InferenceService {
            shared: Arc::new(Shared {
                model,
                device,
                config: ServiceConfig {
                    device,
                    ..config.clone()
                },
                inputs: manifest.inputs.clone(),
                batched: manifest.batch,
                queue,
                counters,
            }),
        })
    }

    fn note_config(&self, config: &ServiceConfig) {
        let own = &self.shared.config;
        if (own.max_batch, own.max_delay, own.threads)
            != (config.max_batch, config.max_delay, config.threads)
        {
            tracing::debug!(
                model = %self.shared.model.display(),
                running = ?own,
                asked = ?config,
                "inference service already running; keeping its settings"
            );
        }
    }

    /// The device the model runs on: [`Device::Cpu`] or [`Device::Cuda`], never `Auto`.
    pub fn device(&self) -> Device {
        self.shared.device
    }

    /// The ONNX file this service runs.
    pub fn model(&self) -> &Path {
        &self.shared.model
    }

    /// The settings in effect: those of the `get` that started the service, with the device
    /// actually used.
    pub fn config(&self) -> &ServiceConfig {
        &self.shared.config
    }

    /// Counts of requests, rows and batches so far.
    pub fn stats(&self) -> ServiceStats {
        let c = &self.shared.counters;
        ServiceStats {
            requests: c.requests.load(Ordering::Relaxed),
            rows: c.rows.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
            largest_batch: c.largest_batch.load(Ordering::Relaxed),
        }
    }

    /// Queues a request and returns at once with a ticket for the reply.
    ///
    /// `inputs` names every model input once; each tensor has the request's rows on its first
    /// axis, and all have the same number of rows. `on_done` is called once the reply is ready:
    /// by the service thread, or before `submit` returns when the request is refused outright.
    /// Blocks only while the service's queue is full.
    pub fn submit(
        &self,
        inputs: Vec<(String, Tensor)>,
        on_done: Box<dyn FnOnce() + Send>,
    ) -> Ticket {
        let model = self.shared.model.clone();
        let (inputs, rows) = match self.arrange(inputs) {
            Ok(arranged) => arranged,
            Err(e) => {
                on_done();
                return Ticket {
                    model,
                    state: TicketState::Ready(Err(e)),
                };
            }
        };
        let (reply, receiver) = bounded(1);
        let request = Request {
            inputs,
            rows,
            submitted: Instant::now(),
            reply,
            on_done,
        };
        match self.shared.queue.send(request) {
            Ok(()) => Ticket {
                model,
                state: TicketState::Pending(receiver),
            },
            Err(refused) => {
                (refused.0.on_done)();
                let error = InferenceError::Stopped {
                    model: model.clone(),
                };
                Ticket {
                    model,
                    state: TicketState::Ready(Err(error)),
                }
            }
        }
    }

    /// Runs a request and waits for its outputs (all model outputs, in manifest order).
    pub fn run(&self, inputs: Vec<(String, Tensor)>) -> Result<Outputs, InferenceError> {
        self.submit(inputs, Box::new(|| {})).wait()
    }

    /// Puts the request's tensors in manifest order and checks them against the manifest.
    fn arrange(
        &self,
        mut given: Vec<(String, Tensor)>,
    ) -> Result<(Vec<Tensor>, usize), InferenceError> {
        let bad = |reason: String| InferenceError::Request {
            model: self.shared.model.clone(),
            reason,
        };
        let specs = &self.shared.inputs;
        let expected = || {
            specs
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };

        for (i, (name, _)) in given.iter().enumerate() {
            if !specs.iter().any(|s| &s.name == name) {
                return Err(bad(format!(
                    "unknown input `{name}`; the model takes {}",
                    expected()
                )));
            }
            if given[..i].iter().any(|(n, _)| n == name) {
                return Err(bad(format!("input `{name}` is given twice")));
            }
        }

        let mut rows = None;
        let mut ordered = Vec::with_capacity(specs.len());
        for spec in specs {
            let Some(at) = given.iter().position(|(n, _)| *n == spec.name) else {
                return Err(bad(format!(
                    "input `{}` is missing; the model takes {}",
                    spec.name,
                    expected()
                )));
            };
            let tensor = given.swap_remove(at).1;
            let shape = tensor.shape();
            let fits = tensor.dtype() == spec.dtype
                && shape.len() == spec.shape.len()
                && spec.shape.iter().zip(shape).all(|(d, &n)| match d {
                    Dim::Fixed(m) => *m == n,
                    Dim::Named(_) => true,
                });
            if !fits {
                return Err(bad(format!(
                    "input `{}` is {}{:?}, expected {spec} (first axis: rows)",
                    spec.name,
                    tensor.dtype(),
                    shape
                )));
            }
            if !self.shared.batched {
                // One whole structure per request: no axis is shared between inputs.
                rows = Some(1);
                ordered.push(tensor);
                continue;
            }
            match rows {
                None => rows = Some(shape[0]),
                Some(n) if n != shape[0] => {
                    return Err(bad(format!(
                        "input `{}` has {} rows but `{}` has {n}; all inputs need the same rows",
                        spec.name, shape[0], specs[0].name
                    )));
                }
                Some(_) => {}
            }
            ordered.push(tensor);
        }
        Ok((ordered, rows.unwrap_or(0)))
    }
}

/// The promise of a reply to one submitted request.
#[derive(Debug)]
pub struct Ticket {
    model: PathBuf,
    state: TicketState,
}

#[derive(Debug)]
enum TicketState {
    Pending(Receiver<Reply>),
    Ready(Reply),
    Taken,
}

impl Ticket {
    /// The reply if it has arrived, without blocking; `None` while the request is in flight.
    ///
    /// Once a reply has been returned, later calls return [`InferenceError::Taken`].
    pub fn try_take(&mut self) -> Option<Result<Outputs, InferenceError>> {
        match std::mem::replace(&mut self.state, TicketState::Taken) {
            TicketState::Pending(receiver) => match receiver.try_recv() {
                Ok(reply) => Some(reply),
                Err(TryRecvError::Empty) => {
                    self.state = TicketState::Pending(receiver);
                    None
                }
                Err(TryRecvError::Disconnected) => Some(Err(InferenceError::Stopped {
                    model: self.model.clone(),
                })),
            },
            TicketState::Ready(reply) => Some(reply),
            TicketState::Taken => Some(Err(InferenceError::Taken {
                model: self.model.clone(),
            })),
        }
    }

    /// Blocks until the reply arrives.
    pub fn wait(self) -> Result<Outputs, InferenceError> {
        match self.state {
            TicketState::Pending(receiver) => receiver
                .recv()
                .unwrap_or_else(|_| Err(InferenceError::Stopped { model: self.model })),
            TicketState::Ready(reply) => reply,
            TicketState::Taken => Err(InferenceError::Taken { model: self.model }),
        }
    }
}

/// Opens a session on `device` (`Cpu` or `Cuda`).
fn open_session(
    package: &ModelPackage,
    device: Device,
    threads: Option<usize>,
) -> Result<Session, InferenceError> {
    let model = package.onnx_path();
    let fail = |reason: String| match device {
        Device::Cuda => InferenceError::Cuda {
            model: model.clone(),
            reason,
        },
        _ => InferenceError::Session {
            model: model.clone(),
            reason,
        },
    };
    let providers = execution_providers(device, &model)?;
    let environment = runtime::environment()?;

    let mut builder = Session::builder(environment)
        .map_err(|e| fail(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| fail(e.to_string()))?;
    if let Some(n) = threads {
        builder = builder
            .with_intra_threads(n)
            .map_err(|e| fail(e.to_string()))?;
    }
    // Registration errors come back here because the CUDA provider is marked `error_on_failure`;
    // without it `ort` would only log them and run on CPU.
    let mut builder = builder
        .with_execution_providers(providers)
        .map_err(|e| fail(e.to_string()))?;
    let session = builder
        .commit_from_file(&model)
        .map_err(|e| fail(e.to_string()))?;
    tracing::debug!(model = %model.display(), %device, "session opened");
    Ok(session)
}

#[cfg(feature = "cuda")]
fn execution_providers(
    device: Device,
    _model: &Path,
) -> Result<Vec<ExecutionProviderDispatch>, InferenceError> {
    Ok(match device {
        Device::Cuda => vec![ort::ep::CUDA::default().build().error_on_failure()],
        _ => vec![ort::ep::CPU::default().build()],
    })
}

#[cfg(not(feature = "cuda"))]
fn execution_providers(
    device: Device,
    model: &Path,
) -> Result<Vec<ExecutionProviderDispatch>, InferenceError> {
    match device {
        Device::Cuda => Err(InferenceError::CudaNotCompiled {
            model: model.to_path_buf(),
        }),
        _ => Ok(vec![ort::ep::CPU::default().build()]),
    }
}

/// Resolves [`Device::Auto`]: a CUDA session if possible, else a CPU one, saying why.
fn open_auto(
    package: &ModelPackage,
    threads: Option<usize>,
) -> Result<(Session, Device), InferenceError> {
    let model = package.onnx_path();
    if cfg!(feature = "cuda") {
        match open_session(package, Device::Cuda, threads) {
            Ok(session) => return Ok((session, Device::Cuda)),
            Err(e) => {
                let reason = match &e {
                    InferenceError::Cuda { reason, .. } => reason.clone(),
                    other => other.to_string(),
                };
                tracing::warn!(
                    model = %model.display(),
                    "CUDA cannot be used ({reason}); using CPU"
                );
            }
        }
    } else {
        tracing::warn!(
            model = %model.display(),
            "CUDA support not compiled in (build with --features cuda); using CPU"
        );
    }
    Ok((open_session(package, Device::Cpu, threads)?, Device::Cpu))
}

/// The service thread's state.
struct Worker {
    session: Session,
    receiver: Receiver<Request>,
    model: PathBuf,
    input_names: Vec<String>,
    outputs: Vec<(String, DType)>,
    batchable: bool,
    /// Outputs are split along their first axis; unbatched models answer one request whole.
    batched: bool,
    max_batch: usize,
    max_delay: Duration,
    counters: Arc<Counters>,
}

impl Worker {
    fn run(mut self) {
        let mut carried = None;
        loop {
            let first = match carried.take() {
                Some(request) => request,
                None => match self.receiver.recv() {
                    Ok(request) => request,
                    // Every handle is gone and the queue is empty.
                    Err(_) => break,
                },
            };
            let batch = self.gather(first, &mut carried);
            self.execute(batch);
        }
        tracing::debug!(model = %self.model.display(), "inference service stopped");
    }

    /// Collects requests to run with `first`; one that does not fit is left in `carried`.
    fn gather(&self, first: Request, carried: &mut Option<Request>) -> Vec<Request> {
        let deadline = first.submitted.checked_add(self.max_delay);
        let mut rows = first.rows;
        let mut batch = vec![first];
        while self.batchable && rows < self.max_batch {
            let next = match self.receiver.try_recv() {
                Ok(request) => request,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    let wait = match deadline {
                        Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                        None => Duration::MAX,
                    };
                    if wait.is_zero() {
                        break;
                    }
                    match self.receiver.recv_timeout(wait) {
                        Ok(request) => request,
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            if rows + next.rows > self.max_batch || !same_examples(&batch[0], &next) {
                *carried = Some(next);
                break;
            }
            rows += next.rows;
            batch.push(next);
        }
        batch
    }

    /// Runs one batch and answers each of its requests.
    fn execute(&mut self, batch: Vec<Request>) {
        let rows: usize = batch.iter().map(|r| r.rows).sum();
        let result = panic::catch_unwind(AssertUnwindSafe(|| self.infer(&batch, rows)))
            .unwrap_or_else(|payload| {
                Err(InferenceError::Run {
                    model: self.model.clone(),
                    reason: format!("the service thread panicked: {}", panic_message(&payload)),
                })
            });

        let c = &self.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.rows.fetch_add(rows as u64, Ordering::Relaxed);
        c.requests.fetch_add(batch.len() as u64, Ordering::Relaxed);
        c.largest_batch.fetch_max(rows as u64, Ordering::Relaxed);
        if let Err(e) = &result {
            c.failed_batches.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                model = %self.model.display(),
                requests = batch.len(),
                "batch failed: {e}"
            );
        }

        let replies: Vec<Reply> = match result {
            Ok(outputs) => outputs.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e); batch.len()],
        };
        for (request, reply) in batch.into_iter().zip(replies) {
            // The ticket may have been dropped; nobody is waiting then.
            let _ = request.reply.send(reply);
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(request.on_done)) {
                tracing::error!(
                    model = %self.model.display(),
                    "an inference completion callback panicked: {}",
                    panic_message(&payload)
                );
            }
        }
    }

    /// One session run over the concatenated requests, split back per request.
    fn infer(&mut self, batch: &[Request], rows: usize) -> Result<Vec<Outputs>, InferenceError> {
        let run_error = |reason: String| InferenceError::Run {
            model: self.model.clone(),
            reason,
        };

        let mut values: Vec<(&str, SessionInputValue<'_>)> =
            Vec::with_capacity(self.input_names.len());
        for (i, name) in self.input_names.iter().enumerate() {
            let value = batched_input(batch, i, rows).map_err(|e| {
                run_error(format!("cannot pass input `{name}` to ONNX Runtime: {e}"))
            })?;
            values.push((name.as_str(), value));
        }

        let outputs = self
            .session
            .run(values)
            .map_err(|e| run_error(e.to_string()))?;

        let mut replies: Vec<Outputs> = batch
            .iter()
            .map(|_| Vec::with_capacity(self.outputs.len()))
            .collect();
        for (name, dtype) in &self.outputs {
            let value = outputs
                .get(name.as_str())
                .ok_or_else(|| run_error(format!("the session returned no output `{name}`")))?;
            let extract_error = |e: ort::Error| run_error(format!("output `{name}`: {e}"));
            match dtype {
                DType::F32 if !self.batched => {
                    let view = value.try_extract_array::<f32>().map_err(extract_error)?;
                    replies[0].push((name.clone(), Tensor::f32(view.to_owned())));
                }
                DType::I64 if !self.batched => {
                    let view = value.try_extract_array::<i64>().map_err(extract_error)?;
                    replies[0].push((name.clone(), Tensor::i64(view.to_owned())));
                }
                DType::F32 => {
                    let view = value.try_extract_array::<f32>().map_err(extract_error)?;
                    split(view, batch, rows, name, Tensor::f32, &mut replies).map_err(run_error)?
                }
                DType::I64 => {
                    let view = value.try_extract_array::<i64>().map_err(extract_error)?;
                    split(view, batch, rows, name, Tensor::i64, &mut replies).map_err(run_error)?
                }
            }
        }
        Ok(replies)
    }
}

/// Input `index` of every request in `batch`, as one ONNX Runtime value with `rows` rows.
fn batched_input<'a>(
    batch: &'a [Request],
    index: usize,
    rows: usize,
) -> ort::Result<SessionInputValue<'a>> {
    match &batch[0].inputs[index] {
        Tensor::F32(_) => {
            let parts = batch.iter().filter_map(|r| r.inputs[index].as_f32());
            batched(parts, batch.len(), rows)
        }
        Tensor::I64(_) => {
            let parts = batch.iter().filter_map(|r| r.inputs[index].as_i64());
            batched(parts, batch.len(), rows)
        }
    }
}

fn batched<'a, T: PrimitiveTensorElementType + Clone + fmt::Debug + 'static>(
    mut parts: impl Iterator<Item = &'a ArrayD<T>>,
    count: usize,
    rows: usize,
) -> ort::Result<SessionInputValue<'a>> {
    if count == 1 {
        let only = parts.next().expect("a batch has a request");
        if only.is_standard_layout() {
            return Ok(TensorRef::from_array_view(only.view())?.into());
        }
        let shape = only.shape().to_vec();
        let data: Vec<T> = only.iter().cloned().collect();
        return Ok(ort::value::Tensor::from_array((shape, data))?.into());
    }

    let mut parts = parts.peekable();
    let first = *parts.peek().expect("a batch has requests");
    let mut shape = first.shape().to_vec();
    shape[0] = rows;
    let mut data = Vec::with_capacity(shape.iter().product());
    for part in parts {
        match part.as_slice() {
            Some(slice) => data.extend_from_slice(slice),
            None => data.extend(part.iter().cloned()),
        }
    }
    Ok(ort::value::Tensor::from_array((shape, data))?.into())
}

/// Gives each request its rows of one output.
fn split<T: Clone>(
    view: ArrayViewD<'_, T>,
    batch: &[Request],
    rows: usize,
    name: &str,
    wrap: fn(ArrayD<T>) -> Tensor,
    replies: &mut [Outputs],
) -> Result<(), String> {
    if view.ndim() == 0 || view.shape()[0] != rows {
        return Err(format!(
            "output `{name}` has shape {:?}; its first axis should hold the {rows} rows run",
            view.shape()
        ));
    }
    let mut start = 0;
    for (request, reply) in batch.iter().zip(replies.iter_mut()) {
        let end = start + request.rows;
        let part = view.slice_axis(Axis(0), Slice::from(start..end)).to_owned();
        reply.push((name.to_string(), wrap(part)));
        start = end;
    }
    Ok(())
}

/// Whether two requests' tensors agree on every axis but the first, so they can be stacked.
fn same_examples(a: &Request, b: &Request) -> bool {
    a.inputs
        .iter()
        .zip(&b.inputs)
        .all(|(x, y)| x.shape()[1..] == y.shape()[1..])
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{digits_dir, temp_dir};
    use crate::model::{sha256_file, MANIFEST_FILE};
    use ndarray::{s, Array2, Ix2};
    use std::sync::atomic::AtomicUsize;

    /// A graph with two dynamic-width float inputs added together (`sum = a + b`) and an integer
    /// one doubled (`k2 = k + k`), as written by the onnx helper (opset 17, IR 9).
    const ADD_ONNX: &str = "\
        0809120f6c6174656e74666c6f7720746573743ab0010a100a01610a0162120373756d2203416464\
        0a0f0a016b0a016b12026b32220341646412036164645a190a016112140a120801120e0a07120562\
        617463680a0312016e5a190a016212140a120801120e0a07120562617463680a0312016d5a180a01\
        6b12130a110807120d0a07120562617463680a020802621b0a0373756d12140a120801120e0a0712\
        0562617463680a0312016e62190a026b3212130a110807120d0a07120562617463680a0208024204\
        0a001011";

    fn add_package() -> ModelPackage {
        let dir = temp_dir("add");
        let bytes: Vec<u8> = (0..ADD_ONNX.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&ADD_ONNX[i..i + 2], 16).unwrap())
            .collect();
        std::fs::write(dir.join("add.onnx"), bytes).unwrap();
        let manifest = serde_json::json!({
            "name": "add", "description": "test graph", "file": "add.onnx",
            "sha256": sha256_file(&dir.join("add.onnx")).unwrap(),
            "origin": "inference.rs tests", "licence": "MIT",
            "inputs": [
                {"name": "a", "dtype": "f32", "shape": ["batch", "n"]},
                {"name": "b", "dtype": "f32", "shape": ["batch", "m"]},
                {"name": "k", "dtype": "i64", "shape": ["batch", 2]}
            ],
            "outputs": [
                {"name": "sum", "dtype": "f32", "shape": ["batch", "n"]},
                {"name": "k2", "dtype": "i64", "shape": ["batch", 2]}
            ]
        });
        std::fs::write(dir.join(MANIFEST_FILE), manifest.to_string()).unwrap();
        let package = ModelPackage::load(&dir).unwrap();
        package.check().unwrap();
        package
    }

    /// A copy of the digits package in a fresh folder, so the test gets a service of its own.
    fn private_digits() -> ModelPackage {
        let dir = temp_dir("digits");
        for file in ["model.onnx", MANIFEST_FILE] {
            std::fs::copy(digits_dir().join(file), dir.join(file)).unwrap();
        }
        ModelPackage::load(dir).unwrap()
    }

    fn cpu(max_batch: usize, max_delay_ms: u64) -> ServiceConfig {
        ServiceConfig {
            device: Device::Cpu,
            max_batch,
            max_delay: Duration::from_millis(max_delay_ms),
            threads: Some(1),
        }
    }

    fn read(path: PathBuf) -> Array2<f32> {
        ndarray_npy::read_npy(path).unwrap()
    }

    fn pixels() -> Array2<f32> {
        read(digits_dir().join("reference/inputs/pixels.npy"))
    }

    fn f32_output(outputs: &Outputs, name: &str) -> Array2<f32> {
        let (found, tensor) = outputs.iter().find(|(n, _)| n == name).unwrap();
        assert_eq!(found, name);
        tensor
            .as_f32()
            .unwrap()
            .clone()
            .into_dimensionality::<Ix2>()
            .unwrap()
    }

    fn assert_close(got: &Array2<f32>, want: &Array2<f32>, what: &str) {
        assert_eq!(got.shape(), want.shape(), "{what}");
        for ((idx, g), w) in got.indexed_iter().zip(want.iter()) {
            let tolerance = 1e-6 * w.abs().max(1.0);
            assert!((g - w).abs() <= tolerance, "{what}{idx:?}: {g} vs {w}");
        }
    }

    #[test]
    fn device_names_round_trip() {
        for d in [Device::Cpu, Device::Cuda, Device::Auto] {
            assert_eq!(d.to_string().parse::<Device>().unwrap(), d);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{d}\""));
            assert_eq!(serde_json::from_str::<Device>(&json).unwrap(), d);
        }
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda);
        let err = "gpu".parse::<Device>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown device `gpu`; expected one of: cpu, cuda, auto"
        );
        assert_eq!(ServiceConfig::default().max_batch, 64);
    }

    #[test]
    fn outputs_match_the_python_reference_and_a_direct_session() {
        let package = ModelPackage::load(digits_dir()).unwrap();
        let service = InferenceService::get(
            &package,
            &ServiceConfig {
                device: Device::Cpu,
                ..ServiceConfig::default()
            },
        )
        .unwrap();
        assert_eq!(service.device(), Device::Cpu);
        let x = pixels();
        let outputs = service
            .run(vec![("pixels".into(), Tensor::f32(x.clone().into_dyn()))])
            .unwrap();
        let names: Vec<&str> = outputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["logits", "probs"]);

        let reference = digits_dir().join("reference");
        assert_close(
            &f32_output(&outputs, "logits"),
            &read(reference.join("outputs/logits.npy")),
            "logits",
        );
        assert_close(
            &f32_output(&outputs, "probs"),
            &read(reference.join("outputs/probs.npy")),
            "probs",
        );

        let mut session = Session::builder(runtime::environment().unwrap())
            .unwrap()
            .commit_from_file(package.onnx_path())
            .unwrap();
        let direct = session
            .run(ort::inputs!["pixels" => TensorRef::from_array_view(&x).unwrap()])
            .unwrap();
        let direct_logits = direct["logits"].try_extract_array::<f32>().unwrap();
        let direct_logits = direct_logits
            .into_dimensionality::<Ix2>()
            .unwrap()
            .to_owned();
        assert_close(
            &f32_output(&outputs, "logits"),
            &direct_logits,
            "direct logits",
        );

        // The same model and device give the same service.
        let again = InferenceService::get(&package, &cpu(8, 1)).unwrap();
        assert!(Arc::ptr_eq(&again.shared, &service.shared));
        assert_eq!(again.config().max_batch, service.config().max_batch);
    }

    #[test]
    fn concurrent_single_rows_are_batched_and_come_back_right() {
        let package = private_digits();
        let service = InferenceService::get(&package, &cpu(32, 20)).unwrap();
        let x = pixels();
        let want = read(digits_dir().join("reference/outputs/probs.npy"));
        let woken = Arc::new(AtomicUsize::new(0));

        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (service, x, woken) = (service.clone(), x.clone(), woken.clone());
                thread::spawn(move || {
                    let rows: Vec<usize> = (t..x.nrows()).step_by(4).collect();
                    let tickets: Vec<Ticket> = rows
                        .iter()
                        .map(|&r| {
                            let row = x.slice(s![r..r + 1, ..]).to_owned().into_dyn();
                            let woken = woken.clone();
                            let on_done = Box::new(move || {
                                woken.fetch_add(1, Ordering::SeqCst);
                            });
                            service.submit(vec![("pixels".into(), Tensor::f32(row))], on_done)
                        })
                        .collect();
                    rows.into_iter()
                        .zip(tickets)
                        .map(|(r, t)| (r, t.wait().unwrap()))
                        .collect::<Vec<_>>()
                })
            })
            .collect();

        let mut answered = 0;
        for handle in threads {
            for (r, outputs) in handle.join().unwrap() {
                let probs = f32_output(&outputs, "probs");
                assert_close(&probs, &want.slice(s![r..r + 1, ..]).to_owned(), "probs");
                answered += 1;
            }
        }
        assert_eq!(answered, x.nrows());
        assert_eq!(woken.load(Ordering::SeqCst), x.nrows());

        let stats = service.stats();
        assert_eq!(stats.requests, x.nrows() as u64);
        assert_eq!(stats.rows, x.nrows() as u64);
        assert_eq!(stats.failed_batches, 0);
        assert!(stats.largest_batch <= 32, "{stats:?}");
        assert!(stats.mean_batch() > 1.0, "no batching happened: {stats:?}");
    }

    #[test]
    fn a_request_larger_than_max_batch_runs_whole_and_alone() {
        let package = private_digits();
        let service = InferenceService::get(&package, &cpu(16, 1)).unwrap();
        let x = pixels().slice(s![..24, ..]).to_owned();
        let mut ticket = service.submit(
            vec![("pixels".into(), Tensor::f32(x.into_dyn()))],
            Box::new(|| {}),
        );
        let outputs = loop {
            match ticket.try_take() {
                Some(reply) => break reply.unwrap(),
                None => thread::sleep(Duration::from_millis(1)),
            }
        };
        assert_eq!(f32_output(&outputs, "logits").nrows(), 24);
        assert!(matches!(
            ticket.try_take(),
            Some(Err(InferenceError::Taken { .. }))
        ));
        let stats = service.stats();
        assert_eq!((stats.batches, stats.largest_batch), (1, 24), "{stats:?}");
    }

    #[test]
    fn bad_requests_fail_alone_and_still_wake_the_caller() {
        let package = private_digits();
        let service = InferenceService::get(&package, &cpu(8, 1)).unwrap();
        let woken = Arc::new(AtomicUsize::new(0));
        let submit = |inputs: Vec<(String, Tensor)>| {
            let woken = woken.clone();
            let ticket = service.submit(
                inputs,
                Box::new(move || {
                    woken.fetch_add(1, Ordering::SeqCst);
                }),
            );
            ticket.wait().unwrap_err().to_string()
        };
        let f32s = |shape: &[usize]| Tensor::f32(ArrayD::zeros(shape));

        let text = submit(vec![("pixel".into(), f32s(&[1, 64]))]);
        assert!(
            text.contains("unknown input `pixel`; the model takes `pixels` f32[batch, 64]"),
            "{text}"
        );
        let text = submit(vec![("pixels".into(), f32s(&[2, 63]))]);
        assert!(
            text.contains("input `pixels` is f32[2, 63], expected `pixels` f32[batch, 64]"),
            "{text}"
        );
        let text = submit(vec![(
            "pixels".into(),
            Tensor::i64(ArrayD::zeros(vec![2, 64])),
        )]);
        assert!(text.contains("is i64[2, 64]"), "{text}");
        let text = submit(vec![]);
        assert!(text.contains("input `pixels` is missing"), "{text}");
        let text = submit(vec![
            ("pixels".into(), f32s(&[1, 64])),
            ("pixels".into(), f32s(&[1, 64])),
        ]);
        assert!(text.contains("given twice"), "{text}");
        assert_eq!(woken.load(Ordering::SeqCst), 5);
        assert_eq!(service.stats().batches, 0);
    }

    #[test]
    fn dynamic_axes_integers_and_run_errors() {
        let package = add_package();
        let service = InferenceService::get(&package, &cpu(64, 30)).unwrap();
        let request = |rows: usize, n: usize, m: usize, value: f32| {
            vec![
                (
                    "b".to_string(),
                    Tensor::f32(ArrayD::from_elem(vec![rows, m], value)),
                ),
                (
                    "a".to_string(),
                    Tensor::f32(ArrayD::from_elem(vec![rows, n], 1.0)),
                ),
                (
                    "k".to_string(),
                    Tensor::i64(ArrayD::from_elem(vec![rows, 2], 3)),
                ),
            ]
        };

        // Widths 3 and 5 cannot share a batch; a 3-by-4 request fails in ONNX Runtime, and so
        // does its twin in the same batch, while the others succeed.
        let tickets: Vec<Ticket> = [(2, 3, 3), (1, 5, 5), (1, 3, 3), (2, 3, 4), (1, 3, 4)]
            .iter()
            .map(|&(rows, n, m)| service.submit(request(rows, n, m, rows as f32), Box::new(|| {})))
            .collect();
        let replies: Vec<Reply> = tickets.into_iter().map(Ticket::wait).collect();

        for (i, (rows, n)) in [(2, 3), (1, 5), (1, 3)].into_iter().enumerate() {
            let outputs = replies[i].as_ref().unwrap();
            assert_eq!(outputs[0].0, "sum");
            let sum = outputs[0].1.as_f32().unwrap();
            assert_eq!(sum.shape(), &[rows, n]);
            assert!(sum.iter().all(|&v| v == 1.0 + rows as f32), "{sum}");
            assert_eq!(outputs[1].0, "k2");
            let k2 = outputs[1].1.as_i64().unwrap();
            assert_eq!(k2.shape(), &[rows, 2]);
            assert!(k2.iter().all(|&v| v == 6));
        }
        for reply in &replies[3..] {
            let err = reply.as_ref().unwrap_err();
            assert!(matches!(err, InferenceError::Run { .. }), "{err:?}");
            assert!(err.to_string().contains("broadcast"), "{err}");
        }
        let stats = service.stats();
        assert!(stats.failed_batches >= 1, "{stats:?}");
        assert_eq!(stats.requests, 5);
    }

    #[test]
    fn the_thread_ends_when_the_last_handle_goes() {
        let package = private_digits();
        let service = InferenceService::get(&package, &cpu(8, 1)).unwrap();
        let ticket = service.submit(
            vec![("pixels".into(), Tensor::f32(ArrayD::zeros(vec![1, 64])))],
            Box::new(|| {}),
        );
        // The thread owns the only other reference to the counters.
        let counters = Arc::downgrade(&service.shared.counters);
        drop(service);
        // The queued request is still answered.
        assert_eq!(ticket.wait().unwrap().len(), 2);
        let started = Instant::now();
        while counters.upgrade().is_some() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the service thread is still up"
            );
            thread::sleep(Duration::from_millis(1));
        }
        // A later `get` starts a fresh service.
        let fresh = InferenceService::get(&package, &cpu(8, 1)).unwrap();
        assert_eq!(fresh.stats().requests, 0);
    }

    #[test]
    fn cuda_is_refused_here() {
        let package = ModelPackage::load(digits_dir()).unwrap();
        let config = ServiceConfig {
            device: Device::Cuda,
            ..ServiceConfig::default()
        };
        match InferenceService::get(&package, &config) {
            #[cfg(not(feature = "cuda"))]
            Err(e @ InferenceError::CudaNotCompiled { .. }) => {
                assert!(
                    e.to_string().contains("rebuild with `--features cuda`"),
                    "{e}"
                );
            }
            // A CUDA build refuses unless the runtime library has the CUDA provider and a GPU.
            #[cfg(feature = "cuda")]
            Err(e @ InferenceError::Cuda { .. }) => assert!(!e.to_string().is_empty()),
            #[cfg(feature = "cuda")]
            Ok(service) => assert_eq!(service.device(), Device::Cuda),
            other => panic!("unexpected: {other:?}"),
        }
    }

    #[test]
    fn auto_falls_back_to_cpu() {
        let package = private_digits();
        let config = ServiceConfig {
            device: Device::Auto,
            ..cpu(8, 1)
        };
        let service = InferenceService::get(&package, &config).unwrap();
        if cfg!(not(feature = "cuda")) {
            assert_eq!(service.device(), Device::Cpu);
        }
        // `auto` is remembered and shares the service of the device it resolved to.
        let explicit = ServiceConfig {
            device: service.device(),
            ..config.clone()
        };
        let same = InferenceService::get(&package, &explicit).unwrap();
        assert!(Arc::ptr_eq(&same.shared, &service.shared));
        let out = service.run(vec![(
            "pixels".into(),
            Tensor::f32(ArrayD::zeros(vec![3, 64])),
        )]);
        assert_eq!(out.unwrap()[1].1.shape(), &[3, 10]);
    }

    #[test]
    fn bad_configs_are_refused() {
        let package = private_digits();
        let err = InferenceService::get(&package, &cpu(0, 1)).unwrap_err();
        assert!(
            err.to_string().contains("max_batch must be at least 1"),
            "{err}"
        );
    }
}
