//! Throughput of the engine against a bare ONNX Runtime loop, and of dynamic batching.
//!
//! Run with `cargo bench --bench throughput` (add `-- --quick` for a short run, and
//! `-- --threads N` to change ONNX Runtime's intra-op threads). See `benches/README.md` for
//! what each figure means and the figures measured on the project's machines.
//!
//! Decisions:
//! - A plain binary that prints a table (no criterion): the figures are records per second of
//!   whole runs, compared with each other, not nanoseconds of one function.
//! - Every variant runs the same model package, on the CPU, with the same intra-op thread
//!   count, so the ratios compare the engine's overhead and nothing else.
//! - Repetitions are interleaved (bare, engine, single-record, pre-batched; again...) so that a
//!   burst of load on a shared machine hits every variant alike. The table gives the best and
//!   the median repetition; ratios are taken of the best, the least disturbed figure.
//! - The engine's sink is a `count` sink registered here, so no file writing is measured.
//! - This binary holds a handle to the model's inference service for the whole run, so the
//!   service (and its session) outlives each pipeline run and its statistics accumulate;
//!   each run's batch sizes are the difference of the statistics before and after it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use latentflow_engine::build::PipelineBuilder;
use latentflow_engine::inference::{Device, InferenceService, ServiceConfig, ServiceStats};
use latentflow_engine::model::ModelPackage;
use latentflow_engine::runtime;
use latentflow_engine::{
    KindInfo, Params, Pipeline, Plan, PlanIssue, PlanOptions, Record, Registry, RunOptions, Schema,
    Sink, SinkFactory, Tensor,
};
use ndarray::{s, Array4};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;
use serde_json::{json, Value as Json};

/// Rows per model call in every variant.
const BATCH: usize = 64;
/// How long the inference service waits for a batch to fill.
const MAX_DELAY_MS: u64 = 2;
/// Epochs in flight when every epoch is one record: enough for several full batches.
const SINGLE_IN_FLIGHT: usize = 256;

fn usage() -> &'static str {
    "usage: cargo bench --bench throughput [-- [--quick] [--threads N] [--reps N]]\n  \
     --quick      1024 records, 3 repetitions (well under a minute)\n  \
     --threads N  ONNX Runtime intra-op threads in every variant (default 1)\n  \
     --reps N     measured repetitions of each variant (default 7, or 3 with --quick)"
}

/// Command-line settings.
struct Options {
    quick: bool,
    threads: usize,
    reps: usize,
    records: usize,
}

impl Options {
    fn parse() -> Result<Options> {
        let mut quick = false;
        let mut threads = 1;
        let mut reps = None;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut number = |name: &str| -> Result<usize> {
                let value = args
                    .next()
                    .ok_or_else(|| anyhow!("{name} needs a number"))?;
                match value.parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => bail!("{name} takes a whole number above 0, not `{value}`"),
                }
            };
            match arg.as_str() {
                // Cargo passes `--bench` to every benchmark binary.
                "--bench" => {}
                "--quick" => quick = true,
                "--threads" => threads = number("--threads")?,
                "--reps" => reps = Some(number("--reps")?),
                "-h" | "--help" => {
                    println!("{}", usage());
                    std::process::exit(0);
                }
                other => bail!("unknown argument `{other}`\n{}", usage()),
            }
        }
        Ok(Options {
            quick,
            threads,
            reps: reps.unwrap_or(if quick { 3 } else { 7 }),
            records: if quick { 1024 } else { 4096 },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmark's files

/// The repository root (where `.venv`, `.ort` and `target/` are).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where `benches/make_model.py` puts the model package and its inputs.
fn model_dir() -> PathBuf {
    root().join("target/bench-models/conv")
}

/// Makes the model package and inputs with `benches/make_model.py` when any file is missing.
fn ensure_model() -> Result<()> {
    let dir = model_dir();
    let files = ["model.onnx", "manifest.json", "inputs.npy"];
    if files.iter().all(|f| dir.join(f).is_file()) {
        return Ok(());
    }
    let python = root().join(".venv/bin/python");
    if !python.is_file() {
        bail!(
            "{} is missing and {} does not exist; run `bash scripts/setup.sh` in {} first \
             (it creates .venv with numpy, onnx and onnxruntime)",
            dir.display(),
            python.display(),
            root().display()
        );
    }
    let script = root().join("benches/make_model.py");
    eprintln!(
        "making the benchmark model: {} {}",
        python.display(),
        script.display()
    );
    let status = Command::new(&python)
        .arg(&script)
        .status()
        .with_context(|| format!("cannot start {}", python.display()))?;
    if !status.success() {
        bail!(
            "{} failed ({status}); see its output above",
            script.display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The `count` sink

/// A sink that only counts records, so that writing files does not distort the figures.
struct CountSink {
    seen: Arc<AtomicU64>,
}

struct Counter {
    seen: Arc<AtomicU64>,
}

impl SinkFactory for CountSink {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "count",
            doc: "Counts the records it receives and writes nothing (benchmarks).",
            params: Vec::new(),
        }
    }

    fn plan(&self, _params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        Ok(Plan::default())
    }

    fn build(&self, _params: &Params, _out_dir: &Path) -> Result<Box<dyn Sink>, String> {
        Ok(Box::new(Counter {
            seen: self.seen.clone(),
        }))
    }
}

impl Sink for Counter {
    fn write(&mut self, records: &[Record]) -> Result<(), String> {
        self.seen.fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn finish(&mut self) -> Result<Vec<PathBuf>, String> {
        Ok(Vec::new())
    }
}

// ---------------------------------------------------------------------------------------------
// The variants

/// The service settings every engine variant uses (the `onnx` stage's parameters below).
fn service_config(threads: usize) -> ServiceConfig {
    ServiceConfig {
        device: Device::Cpu,
        max_batch: BATCH,
        max_delay: Duration::from_millis(MAX_DELAY_MS),
        threads: Some(threads),
    }
}

/// (a) One session, inputs stacked into batches beforehand, every batch run in turn.
struct Bare {
    session: Session,
    batches: Vec<Array4<f32>>,
}

impl Bare {
    /// A session with the settings the inference service uses: all graph optimisations, the
    /// CPU provider, `threads` intra-op threads.
    fn new(model: &Path, inputs: &Array4<f32>, threads: usize) -> Result<Bare> {
        let environment = runtime::environment()?;
        let ort_error = |e: ort::Error<_>| anyhow!("cannot open {}: {e}", model.display());
        let session = Session::builder(environment)
            .map_err(|e| anyhow!("cannot open {}: {e}", model.display()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(ort_error)?
            .with_intra_threads(threads)
            .map_err(ort_error)?
            .with_execution_providers([ort::ep::CPU::default().build()])
            .map_err(ort_error)?
            .commit_from_file(model)
            .map_err(|e| anyhow!("cannot open {}: {e}", model.display()))?;
        let batches = (0..inputs.len_of(ndarray::Axis(0)))
            .step_by(BATCH)
            .map(|start| {
                let end = (start + BATCH).min(inputs.len_of(ndarray::Axis(0)));
                inputs.slice(s![start..end, .., .., ..]).to_owned()
            })
            .collect();
        Ok(Bare { session, batches })
    }

    /// Runs every batch once; returns the elapsed time.
    fn pass(&mut self) -> Result<Duration> {
        let start = Instant::now();
        let mut checksum = 0.0f32;
        for batch in &self.batches {
            let input = TensorRef::from_array_view(batch.view())?;
            let outputs = self.session.run(ort::inputs!["x" => input])?;
            let logits = outputs["logits"].try_extract_array::<f32>()?;
            checksum += logits[[0, 0]];
        }
        std::hint::black_box(checksum);
        Ok(start.elapsed())
    }
}

/// The inference service fed the pre-stacked batches straight from this thread, all queued at
/// once: what the service adds to a bare session (queueing, copying outputs back per request).
fn service_pass(service: &InferenceService, batches: &[Array4<f32>]) -> Result<EngineRun> {
    let requests: Vec<Vec<(String, Tensor)>> = batches
        .iter()
        .map(|b| vec![("x".to_string(), Tensor::f32(b.clone().into_dyn()))])
        .collect();
    let before = service.stats();
    let start = Instant::now();
    let tickets: Vec<_> = requests
        .into_iter()
        .map(|inputs| service.submit(inputs, Box::new(|| {})))
        .collect();
    for ticket in tickets {
        ticket.wait()?;
    }
    let elapsed = start.elapsed();
    Ok(EngineRun {
        elapsed,
        stats: difference(&before, &service.stats()),
    })
}

/// An engine pipeline: npy source → onnx stage → count sink.
struct Engine {
    name: &'static str,
    pipeline: Pipeline,
    workers: usize,
    seen: Arc<AtomicU64>,
    records: usize,
}

/// What one engine run measured.
struct EngineRun {
    elapsed: Duration,
    stats: ServiceStats,
}

/// How an engine pipeline is laid out.
struct Layout {
    workers: usize,
    epoch_size: usize,
    max_in_flight: usize,
    /// Whether the `onnx` stage is there (without it: source straight to sink).
    model: bool,
}

impl Engine {
    fn new(
        name: &'static str,
        registry: &Registry,
        seen: &Arc<AtomicU64>,
        records: usize,
        threads: usize,
        layout: Layout,
    ) -> Result<Engine> {
        let dir = model_dir();
        let mut builder = PipelineBuilder::new(name)
            .settings(|s| {
                s.epoch_size = layout.epoch_size;
                s.max_in_flight = layout.max_in_flight;
            })
            .source(
                "inputs",
                "npy",
                json!({"arrays": {"x": dir.join("inputs.npy")}, "limit": records}),
            );
        if layout.model {
            builder = builder.stage(
                "model",
                "onnx",
                json!({
                    "model": dir,
                    "device": "cpu",
                    "max_batch": BATCH,
                    "max_delay_ms": MAX_DELAY_MS as f64,
                    "threads": threads,
                }),
            );
        }
        let pipeline = builder
            .sink("count", "count", json!({}))
            .plan(registry, PlanOptions::default())
            .map_err(|d| anyhow!("cannot plan the `{name}` pipeline:\n{d}"))?;
        Ok(Engine {
            name,
            pipeline,
            workers: layout.workers,
            seen: seen.clone(),
            records,
        })
    }

    /// Runs the pipeline once and checks that every record reached the sink.
    fn run(&self, service: &InferenceService) -> Result<EngineRun> {
        let out = root().join("target/bench-runs").join(self.name);
        let before_seen = self.seen.load(Ordering::Relaxed);
        let before = service.stats();
        let start = Instant::now();
        let summary = latentflow_engine::run(&self.pipeline, &RunOptions::local(self.workers, out))
            .with_context(|| format!("the `{}` pipeline failed", self.name))?;
        let elapsed = start.elapsed();
        let after = service.stats();
        let seen = self.seen.load(Ordering::Relaxed) - before_seen;
        if seen != self.records as u64 || summary.metrics.records_failed != 0 {
            bail!(
                "the `{}` pipeline counted {seen} of {} records ({} failed)",
                self.name,
                self.records,
                summary.metrics.records_failed
            );
        }
        Ok(EngineRun {
            elapsed,
            stats: difference(&before, &after),
        })
    }
}

fn difference(before: &ServiceStats, after: &ServiceStats) -> ServiceStats {
    ServiceStats {
        requests: after.requests - before.requests,
        rows: after.rows - before.rows,
        batches: after.batches - before.batches,
        failed_batches: after.failed_batches - before.failed_batches,
        // Not a difference: the largest batch seen so far.
        largest_batch: after.largest_batch,
    }
}

// ---------------------------------------------------------------------------------------------
// Figures

/// Records per second of each repetition of one variant, and the service's counts summed over
/// them.
struct Figures {
    label: &'static str,
    rates: Vec<f64>,
    stats: Option<ServiceStats>,
}

impl Figures {
    fn new(label: &'static str) -> Figures {
        Figures {
            label,
            rates: Vec::new(),
            stats: None,
        }
    }

    fn add(&mut self, records: usize, elapsed: Duration, stats: Option<ServiceStats>) {
        self.rates.push(records as f64 / elapsed.as_secs_f64());
        if let Some(s) = stats {
            let sum = self.stats.get_or_insert_with(ServiceStats::default);
            sum.requests += s.requests;
            sum.rows += s.rows;
            sum.batches += s.batches;
            sum.failed_batches += s.failed_batches;
        }
    }

    fn best(&self) -> f64 {
        self.rates.iter().copied().fold(0.0, f64::max)
    }

    fn median(&self) -> f64 {
        let mut sorted = self.rates.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        match n {
            0 => 0.0,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        }
    }

    fn mean_batch(&self) -> Option<f64> {
        self.stats.map(|s| s.mean_batch())
    }

    fn json(&self) -> Json {
        json!({
            "label": self.label,
            "records_per_s": {"best": self.best(), "median": self.median(), "all": self.rates},
            "mean_batch": self.mean_batch(),
            "requests": self.stats.map(|s| s.requests),
            "batches": self.stats.map(|s| s.batches),
        })
    }
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> Result<()> {
    let opts = Options::parse()?;
    ensure_model()?;
    runtime::ensure_runtime().context("run `bash scripts/setup.sh` in the repository root")?;
    let dir = model_dir();
    let package = ModelPackage::load(&dir)?;
    package.check()?;

    let inputs: Array4<f32> = ndarray_npy::read_npy(dir.join("inputs.npy"))
        .with_context(|| format!("cannot read {}", dir.join("inputs.npy").display()))?;
    let inputs = inputs.slice(s![..opts.records, .., .., ..]).to_owned();
    let n = opts.records;
    let t = opts.threads;

    let seen = Arc::new(AtomicU64::new(0));
    let mut registry = latentflow_stages::builtin();
    registry.add_sink(CountSink { seen: seen.clone() });

    // Held for the whole run: the pipelines' stages share this service and its session.
    let service = InferenceService::get(&package, &service_config(t))?;
    let mut bare = Bare::new(&package.onnx_path(), &inputs, t)?;
    let layout = |workers, epoch_size, max_in_flight, model| Layout {
        workers,
        epoch_size,
        max_in_flight,
        model,
    };
    let engine = Engine::new("engine", &registry, &seen, n, t, layout(1, BATCH, 8, true))?;
    let single = Engine::new(
        "single",
        &registry,
        &seen,
        n,
        t,
        layout(2, 1, SINGLE_IN_FLIGHT, true),
    )?;
    let batched = Engine::new("batched", &registry, &seen, n, t, layout(2, BATCH, 8, true))?;
    let no_model = Engine::new(
        "no-model",
        &registry,
        &seen,
        n,
        t,
        layout(1, BATCH, 8, false),
    )?;
    let no_model_single = Engine::new(
        "no-model-single",
        &registry,
        &seen,
        n,
        t,
        layout(2, 1, SINGLE_IN_FLIGHT, false),
    )?;

    println!(
        "latentflow throughput: model {} ({} records of f32[3, 32, 32]), device cpu, \
         {t} intra-op thread(s), batch {BATCH}, {} repetitions{}",
        package.manifest().name,
        n,
        opts.reps,
        if opts.quick { " (--quick)" } else { "" }
    );

    // Warm-up: the allocator, the page cache, ONNX Runtime's kernels, timely's threads.
    bare.pass()?;
    for e in [&engine, &single, &batched, &no_model, &no_model_single] {
        e.run(&service)?;
    }
    service_pass(&service, &bare.batches)?;

    let mut a = Figures::new("a. bare ort loop, batches of 64");
    let mut b = Figures::new("b. engine, 1 worker, epoch 64");
    let mut c1 = Figures::new("c. engine, 2 workers, epoch 1 (single-record requests)");
    let mut c2 = Figures::new("c. engine, 2 workers, epoch 64 (pre-batched)");
    let mut parts_service = Figures::new("service alone, fed the batches of a");
    let mut parts_engine = Figures::new("engine without the model, 1 worker, epoch 64");
    let mut parts_single = Figures::new("engine without the model, 2 workers, epoch 1");
    for rep in 0..opts.reps {
        a.add(n, bare.pass()?, None);
        let r = engine.run(&service)?;
        b.add(n, r.elapsed, Some(r.stats));
        let r = single.run(&service)?;
        c1.add(n, r.elapsed, Some(r.stats));
        let r = batched.run(&service)?;
        c2.add(n, r.elapsed, Some(r.stats));
        let r = service_pass(&service, &bare.batches)?;
        parts_service.add(n, r.elapsed, Some(r.stats));
        let r = no_model.run(&service)?;
        parts_engine.add(n, r.elapsed, None);
        let r = no_model_single.run(&service)?;
        parts_single.add(n, r.elapsed, None);
        eprintln!(
            "  repetition {}/{}: {:>7.0} {:>7.0} {:>7.0} {:>7.0} records/s",
            rep + 1,
            opts.reps,
            a.rates[rep],
            b.rates[rep],
            c1.rates[rep],
            c2.rates[rep]
        );
    }

    let ratio_engine = b.best() / a.best();
    let ratio_dynamic = c1.best() / c2.best();
    println!();
    println!(
        "{:<56} {:>10} {:>10} {:>10}",
        "variant", "best r/s", "median r/s", "mean batch"
    );
    let row = |f: &Figures| {
        let batch = f
            .mean_batch()
            .map_or_else(|| "-".to_string(), |m| format!("{m:.1}"));
        println!(
            "{:<56} {:>10.0} {:>10.0} {:>10}",
            f.label,
            f.best(),
            f.median(),
            batch
        );
    };
    for f in [&a, &b, &c1, &c2] {
        row(f);
    }
    println!("parts, for finding what limits b and c:");
    for f in [&parts_service, &parts_engine, &parts_single] {
        row(f);
    }
    println!();
    let verdict = |ratio: f64, goal: f64| if ratio >= goal { "met" } else { "MISSED" };
    println!(
        "engine / bare          b/a = {ratio_engine:.3} (median {:.3}; goal >= 0.95: {})",
        b.median() / a.median(),
        verdict(ratio_engine, 0.95)
    );
    println!(
        "single / pre-batched  c1/c2 = {ratio_dynamic:.3} (median {:.3}; goal >= 0.80: {})",
        c1.median() / c2.median(),
        verdict(ratio_dynamic, 0.8)
    );

    let report = json!({
        "benchmark": "throughput",
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "model": package.manifest().name,
        "records": n,
        "repetitions": opts.reps,
        "quick": opts.quick,
        "intra_op_threads": t,
        "max_batch": BATCH,
        "max_delay_ms": MAX_DELAY_MS,
        "variants": {
            "bare": a.json(),
            "engine": b.json(),
            "single_record": c1.json(),
            "pre_batched": c2.json(),
        },
        "parts": {
            "service_alone": parts_service.json(),
            "engine_without_model": parts_engine.json(),
            "engine_without_model_single_record": parts_single.json(),
        },
        "ratios": {
            "engine_over_bare": {"best": ratio_engine, "median": b.median() / a.median(), "goal": 0.95},
            "single_over_pre_batched": {"best": ratio_dynamic, "median": c1.median() / c2.median(), "goal": 0.8},
        },
    });
    let path = root().join("target/bench-throughput.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("figures written to {}", path.display());
    Ok(())
}
