//! The generic `onnx` stage: record fields in, model outputs out.
//!
//! Each model input is fed from a record field (by default the field of the same name); the
//! records of a batch are stacked along the model's batch axis, sent to the process-wide
//! inference service for the model and device, and the outputs are split back into fields.
//! The stage does not wait for the model: it returns a pending batch and is woken when the
//! service replies, so one worker can have several batches in flight and the service can merge
//! requests from all workers into full batches.
//!
//! A record whose fields do not fit the model (missing, wrong element type or shape) fails on
//! its own with the reason; the rest of its batch goes on.

use std::sync::Arc;
use std::time::Duration;

use latentflow_engine::inference::{Device, InferenceService, ServiceConfig, Ticket};
use latentflow_engine::model::ModelPackage;
use latentflow_engine::plan::nearest;
use latentflow_engine::value::stack;
use latentflow_engine::{
    Completion, Failure, KindInfo, Outcome, ParamKind, ParamSpec, Params, PendingBatch, Plan,
    PlanIssue, Record, Schema, Stage, StageContext, StageFactory, Tensor, Value,
};
use ndarray::Axis;
use serde_json::{json, Value as Json};

/// Factory of the `onnx` stage.
pub struct OnnxStage;

/// Input and output wiring resolved against the manifest.
struct Wiring {
    package: ModelPackage,
    /// (model input, record field)
    inputs: Vec<(String, String)>,
    /// (model output, record field)
    outputs: Vec<(String, String)>,
}

fn wiring(params: &Params) -> Result<Wiring, Vec<PlanIssue>> {
    let dir = params.path("model").unwrap_or_default();
    let package = ModelPackage::load(&dir).map_err(|e| {
        vec![PlanIssue::param("model", e.to_string())
            .hint("`model` names a package folder holding manifest.json and the .onnx file")]
    })?;
    let m = package.manifest();
    let mut issues = Vec::new();
    let in_names: Vec<&str> = m.inputs.iter().map(|t| t.name.as_str()).collect();
    let out_names: Vec<&str> = m.outputs.iter().map(|t| t.name.as_str()).collect();
    let given_in = params.name_map("inputs");
    let given_out = params.name_map("outputs");
    for (k, _) in &given_in {
        if !in_names.contains(&k.as_str()) {
            let mut i =
                PlanIssue::param("inputs", format!("model `{}` has no input `{k}`", m.name))
                    .at_key(k)
                    .on_key();
            i.hint = Some(match nearest(k, in_names.iter().copied()) {
                Some(n) => format!("did you mean `{n}`? inputs: {}", in_names.join(", ")),
                None => format!("the model's inputs are: {}", in_names.join(", ")),
            });
            issues.push(i);
        }
    }
    for (k, _) in &given_out {
        if !out_names.contains(&k.as_str()) {
            let mut i =
                PlanIssue::param("outputs", format!("model `{}` has no output `{k}`", m.name))
                    .at_key(k)
                    .on_key();
            i.hint = Some(match nearest(k, out_names.iter().copied()) {
                Some(n) => format!("did you mean `{n}`? outputs: {}", out_names.join(", ")),
                None => format!("the model's outputs are: {}", out_names.join(", ")),
            });
            issues.push(i);
        }
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    let inputs = m
        .inputs
        .iter()
        .map(|t| {
            let field = given_in
                .iter()
                .find(|(k, _)| *k == t.name)
                .map(|(_, v)| v.clone());
            (t.name.clone(), field.unwrap_or_else(|| t.name.clone()))
        })
        .collect();
    let outputs = if given_out.is_empty() {
        m.outputs
            .iter()
            .map(|t| (t.name.clone(), t.name.clone()))
            .collect()
    } else {
        given_out
    };
    Ok(Wiring {
        package,
        inputs,
        outputs,
    })
}

/// The parameters of a stage that runs a model through the inference service.
pub(crate) fn service_params() -> Vec<ParamSpec> {
    vec![
        ParamSpec::optional(
            "device",
            ParamKind::Choice(&["cpu", "cuda", "auto"]),
            json!("auto"),
            "cpu, cuda (fail if unusable) or auto (CUDA when usable, else CPU with a warning)",
        ),
        ParamSpec::optional(
            "max_batch",
            ParamKind::Int,
            json!(64),
            "most records per model call",
        ),
        ParamSpec::optional(
            "max_delay_ms",
            ParamKind::Float,
            json!(2.0),
            "longest wait for a batch to fill, in milliseconds",
        ),
        ParamSpec::optional(
            "threads",
            ParamKind::Int,
            Json::Null,
            "ONNX Runtime intra-op threads (default: ONNX Runtime's choice)",
        ),
    ]
}

/// The `device` parameter of a stage that opens its own sessions (default `auto`).
pub(crate) fn device_of(params: &Params) -> Result<Device, String> {
    params
        .str("device")
        .unwrap_or("auto")
        .parse()
        .map_err(|e: latentflow_engine::inference::ParseDeviceError| e.0)
}

pub(crate) fn service_config(params: &Params) -> ServiceConfig {
    ServiceConfig {
        device: params
            .str("device")
            .and_then(|d| d.parse::<Device>().ok())
            .unwrap_or(Device::Auto),
        max_batch: params.int("max_batch").unwrap_or(64).max(1) as usize,
        max_delay: Duration::from_micros(
            (params.float("max_delay_ms").unwrap_or(2.0) * 1000.0).max(0.0) as u64,
        ),
        threads: params.int("threads").filter(|t| *t > 0).map(|t| t as usize),
    }
}

impl StageFactory for OnnxStage {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "onnx",
            doc: "Runs an ONNX model package on record fields. Records are batched along the \
                  model's first axis by a process-wide inference service shared by all workers.",
            params: vec![
                ParamSpec::required(
                    "model",
                    ParamKind::Path,
                    "model package folder (manifest.json + .onnx)",
                ),
                ParamSpec::optional(
                    "inputs",
                    ParamKind::NameMap,
                    json!({}),
                    "model input → record field (default: the field of the same name)",
                ),
                ParamSpec::optional(
                    "outputs",
                    ParamKind::NameMap,
                    json!({}),
                    "model output → record field (default: every output, same name)",
                ),
            ]
            .into_iter()
            .chain(service_params())
            .collect(),
        }
    }

    fn plan(&self, params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let mut bounds = Vec::new();
        if params.int("max_batch").is_some_and(|b| b < 1) {
            bounds.push(PlanIssue::param(
                "max_batch",
                "`max_batch` must be at least 1",
            ));
        }
        if params.int("threads").is_some_and(|t| t < 1) {
            bounds.push(PlanIssue::param(
                "threads",
                "`threads` must be at least 1 (or left out)",
            ));
        }
        if params.float("max_delay_ms").is_some_and(|d| d < 0.0) {
            bounds.push(PlanIssue::param(
                "max_delay_ms",
                "`max_delay_ms` must not be negative",
            ));
        }
        if !bounds.is_empty() {
            return Err(bounds);
        }
        let w = wiring(params)?;
        let m = w.package.manifest();
        let mut plan = Plan::default();
        for (name, field) in &w.inputs {
            let spec = m
                .inputs
                .iter()
                .find(|t| &t.name == name)
                .expect("wired input exists");
            plan = plan.read(field, m.field_type(spec), &["inputs", name]);
        }
        for (name, field) in &w.outputs {
            let spec = m
                .outputs
                .iter()
                .find(|t| &t.name == name)
                .expect("wired output exists");
            plan = plan.write(field, m.field_type(spec));
        }
        Ok(plan)
    }

    fn check(&self, params: &Params) -> Result<(), Vec<PlanIssue>> {
        if params.str("device") == Some("cuda") && !latentflow_engine::inference::cuda_compiled() {
            return Err(vec![PlanIssue::param("device", "`device: cuda`, but this build has no CUDA support")
                .hint("rebuild with `--features cuda` (see scripts/gpu-check.sh), or use `auto` to fall back to the CPU")]);
        }
        let w = wiring(params)?;
        w.package.check().map_err(|e| {
            vec![PlanIssue::param("model", e.to_string())
                .hint("run `latentflow models check <dir>` for details; the manifest must describe the .onnx file exactly")]
        })
    }

    fn build(&self, params: &Params, cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        let w = wiring(params).map_err(|i| {
            i.into_iter()
                .map(|i| i.message)
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let config = service_config(params);
        let service = InferenceService::get(&w.package, &config).map_err(|e| e.to_string())?;
        tracing::debug!(stage = %cx.name, device = %service.device(), "onnx stage ready");
        let m = w.package.manifest();
        let input_types = w
            .inputs
            .iter()
            .map(|(n, _)| m.field_type(m.inputs.iter().find(|t| &t.name == n).expect("input")))
            .collect();
        Ok(Box::new(OnnxRunner {
            wiring: Arc::new(w),
            input_types,
            service,
            max_batch: config.max_batch,
        }))
    }
}

struct OnnxRunner {
    wiring: Arc<Wiring>,
    input_types: Vec<latentflow_engine::FieldType>,
    service: InferenceService,
    max_batch: usize,
}

struct InFlight {
    stage: String,
    wiring: Arc<Wiring>,
    /// Records whose inputs were bad, already failed.
    failed: Vec<Outcome>,
    chunks: Vec<(Vec<Record>, Ticket)>,
    done: Vec<Option<Vec<Outcome>>>,
}

impl PendingBatch for InFlight {
    fn poll(&mut self) -> Option<Vec<Outcome>> {
        for (i, (records, ticket)) in self.chunks.iter_mut().enumerate() {
            if self.done[i].is_some() {
                continue;
            }
            match ticket.try_take() {
                None => {}
                Some(reply) => {
                    let records = std::mem::take(records);
                    self.done[i] = Some(split_outputs(&self.stage, &self.wiring, records, reply));
                }
            }
        }
        if self.done.iter().all(|d| d.is_some()) {
            let mut out: Vec<Outcome> = std::mem::take(&mut self.failed);
            for d in self.done.iter_mut() {
                out.extend(d.take().unwrap_or_default());
            }
            Some(out)
        } else {
            None
        }
    }
}

fn split_outputs(
    stage: &str,
    wiring: &Wiring,
    records: Vec<Record>,
    reply: Result<Vec<(String, Tensor)>, latentflow_engine::inference::InferenceError>,
) -> Vec<Outcome> {
    let outputs = match reply {
        Ok(o) => o,
        Err(e) => {
            let reason = format!("model `{}` failed: {e}", wiring.package.manifest().name);
            return records
                .iter()
                .map(|r| Err(Failure::of(r, stage, reason.clone())))
                .collect();
        }
    };
    let mut records = records;
    let batched = wiring.package.manifest().batch;
    for (name, field) in &wiring.outputs {
        let Some((_, t)) = outputs.iter().find(|(n, _)| n == name) else {
            continue;
        };
        if !batched {
            if let Some(r) = records.first_mut() {
                r.set(field, Value::Tensor(t.clone()));
            }
            continue;
        }
        match t {
            Tensor::F32(a) => {
                for (r, row) in records.iter_mut().zip(a.axis_iter(Axis(0))) {
                    r.set(field, Value::Tensor(Tensor::f32(row.to_owned())));
                }
            }
            Tensor::I64(a) => {
                for (r, row) in records.iter_mut().zip(a.axis_iter(Axis(0))) {
                    r.set(field, Value::Tensor(Tensor::i64(row.to_owned())));
                }
            }
        }
    }
    records.into_iter().map(Ok).collect()
}

impl Stage for OnnxRunner {
    fn process(&mut self, batch: Vec<Record>, cx: &StageContext) -> Completion {
        let mut failed = Vec::new();
        let mut good = Vec::with_capacity(batch.len());
        for r in batch {
            let bad =
                self.wiring
                    .inputs
                    .iter()
                    .zip(&self.input_types)
                    .find_map(|((name, field), ty)| match r.get(field) {
                        None => Some(format!("field `{field}` (model input `{name}`) is missing")),
                        Some(v) if !v.conforms(ty) => Some(format!(
                            "field `{field}` is {}, but model input `{name}` takes {ty} per record",
                            v.describe()
                        )),
                        Some(_) => None,
                    });
            match bad {
                Some(reason) => failed.push(Err(Failure::of(&r, &cx.name, reason))),
                None => good.push(r),
            }
        }
        let mut chunks = Vec::new();
        while !good.is_empty() {
            let chunk_size = if self.wiring.package.manifest().batch {
                self.max_batch
            } else {
                1
            };
            let rest = good.split_off(good.len().min(chunk_size));
            let chunk = std::mem::replace(&mut good, rest);
            let mut inputs = Vec::with_capacity(self.wiring.inputs.len());
            for (name, field) in &self.wiring.inputs {
                let tensors: Vec<&Tensor> = chunk
                    .iter()
                    .map(|r| r.get(field).and_then(Value::as_tensor).expect("checked"))
                    .collect();
                if !self.wiring.package.manifest().batch {
                    // One record is one whole call.
                    inputs.push((name.clone(), tensors[0].clone()));
                    continue;
                }
                let stacked = match tensors[0] {
                    Tensor::F32(_) => {
                        let arrays: Vec<_> =
                            tensors.iter().map(|t| t.as_f32().expect("f32")).collect();
                        Tensor::f32(stack(&arrays).expect("shapes checked"))
                    }
                    Tensor::I64(_) => {
                        let arrays: Vec<_> =
                            tensors.iter().map(|t| t.as_i64().expect("i64")).collect();
                        Tensor::i64(stack(&arrays).expect("shapes checked"))
                    }
                };
                inputs.push((name.clone(), stacked));
            }
            let waker = cx.waker.clone();
            let ticket = self.service.submit(inputs, Box::new(move || waker.wake()));
            chunks.push((chunk, ticket));
        }
        if chunks.is_empty() {
            return Completion::Ready(failed);
        }
        let n = chunks.len();
        Completion::Pending(Box::new(InFlight {
            stage: cx.name.clone(),
            wiring: self.wiring.clone(),
            failed,
            chunks,
            done: vec![None; n],
        }))
    }
}
