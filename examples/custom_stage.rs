//! Building a pipeline in Rust and plugging in a stage of your own.
//!
//! The pipeline classifies the embedded digits with the `digits-mlp` package, then a
//! user-defined `entropy` stage scores how unsure the model is about each digit, and the
//! results go to a JSON-lines file. Run it from the repository root:
//!
//! ```text
//! cargo run --example custom_stage
//! ```

use latentflow_engine::build::PipelineBuilder;
use latentflow_engine::{
    Completion, Failure, FieldType, KindInfo, ParamKind, ParamSpec, Params, Plan, PlanIssue,
    PlanOptions, Record, RunOptions, Schema, Shape, Stage, StageContext, StageFactory, Value,
};
use serde_json::json;

/// Shannon entropy (in nats) of a probability vector field.
struct EntropyStage;

impl StageFactory for EntropyStage {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "entropy",
            doc: "Entropy of a probability vector, as a scalar field.",
            params: vec![
                ParamSpec::required("field", ParamKind::Field, "probability vector to read"),
                ParamSpec::optional(
                    "output",
                    ParamKind::String,
                    json!("entropy"),
                    "field to write",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        // Reads a float vector of any length; the planner checks the upstream field against it.
        let vector = FieldType::f32(Shape(Some(vec![latentflow_engine::Dim::Named(
            "classes".into(),
        )])));
        Ok(Plan::default()
            .read(params.str_req("field"), vector, &["field"])
            .write(params.str_req("output"), FieldType::Scalar))
    }

    fn build(&self, params: &Params, _cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        Ok(Box::new(Entropy {
            field: params.str_req("field").into(),
            output: params.str_req("output").into(),
        }))
    }
}

struct Entropy {
    field: String,
    output: String,
}

impl Stage for Entropy {
    fn process(&mut self, batch: Vec<Record>, cx: &StageContext) -> Completion {
        let outcomes = batch
            .into_iter()
            .map(|mut r| {
                let p = r
                    .tensor(&self.field)
                    .map_err(|e| Failure::of(&r, &cx.name, e))?;
                let p = p
                    .as_f32()
                    .ok_or_else(|| Failure::of(&r, &cx.name, "not f32"))?;
                let h: f64 = p
                    .iter()
                    .filter(|&&x| x > 0.0)
                    .map(|&x| -(x as f64) * (x as f64).ln())
                    .sum();
                r.set(&self.output, Value::Scalar(h));
                Ok(r)
            })
            .collect();
        Completion::Ready(outcomes)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut registry = latentflow_stages::builtin();
    registry.add_stage(EntropyStage);

    let builder = PipelineBuilder::new("digits-entropy")
        .source(
            "digits",
            "npy",
            json!({"arrays": {"pixels": "data/digits/test-pixels.npy", "label": "data/digits/test-labels.npy"}}),
        )
        .stage("mlp", "onnx", json!({"model": "models/digits-mlp", "outputs": {"probs": "probs"}}))
        .stage("unsure", "entropy", json!({"field": "probs"}))
        .stage("decide", "argmax", json!({"field": "probs"}))
        .sink("scores", "jsonl", json!({"path": "entropy.jsonl", "fields": ["label", "predicted", "entropy"]}));
    // Checked exactly like a pipeline file: kinds, parameters, fields and types, the model.
    let pipeline = builder.plan(&registry, PlanOptions::default())?;

    let summary = latentflow_engine::run(&pipeline, &RunOptions::local(2, "runs/digits-entropy"))?;
    println!(
        "{} records in {:.2}s",
        summary.metrics.records_read, summary.metrics.wall_seconds
    );

    // The most uncertain digits, from the file the sink wrote.
    let text = std::fs::read_to_string(summary.out_dir.join("entropy.jsonl"))?;
    let mut rows: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    rows.sort_by(|a, b| {
        b["entropy"]
            .as_f64()
            .partial_cmp(&a["entropy"].as_f64())
            .unwrap()
    });
    println!("most uncertain digits (key, label, predicted, entropy):");
    for r in rows.iter().take(5) {
        println!(
            "  {} {} {} {:.3}",
            r["key"],
            r["label"],
            r["predicted"],
            r["entropy"].as_f64().unwrap_or(0.0)
        );
    }
    println!("\nthe same pipeline as a file:\n{}", builder.to_yaml());
    Ok(())
}
