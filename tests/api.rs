//! Programmatic composition: pipelines built in Rust, with user-defined stages, behave like
//! pipeline files.

use std::path::PathBuf;

use latentflow_engine::build::PipelineBuilder;
use latentflow_engine::{
    Completion, FieldType, KindInfo, ParamKind, ParamSpec, Params, Plan, PlanIssue, PlanOptions,
    RunOptions, Schema, Shape, Stage, StageContext, StageFactory, Tensor, Value,
};
use serde_json::json;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Squares every element of a float tensor (a user's own stage).
struct Square;

struct SquareRunner(String);

impl StageFactory for Square {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "square",
            doc: "x², elementwise.",
            params: vec![ParamSpec::required(
                "field",
                ParamKind::Field,
                "tensor to square",
            )],
        }
    }

    fn plan(&self, p: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let f = p.str_req("field");
        let ty = input
            .get(f)
            .cloned()
            .unwrap_or(FieldType::f32(Shape::any()));
        Ok(Plan::default()
            .read(f, FieldType::f32(Shape::any()), &["field"])
            .write(f, ty))
    }

    fn build(&self, p: &Params, _cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        Ok(Box::new(SquareRunner(p.str_req("field").into())))
    }
}

impl Stage for SquareRunner {
    fn process(&mut self, batch: Vec<latentflow_engine::Record>, _cx: &StageContext) -> Completion {
        Completion::Ready(
            batch
                .into_iter()
                .map(|mut r| {
                    let t = r.tensor(&self.0).unwrap().as_f32().unwrap().mapv(|x| x * x);
                    r.set(&self.0, Value::Tensor(Tensor::f32(t)));
                    Ok(r)
                })
                .collect(),
        )
    }
}

fn builder() -> PipelineBuilder {
    PipelineBuilder::new("squares")
        .base_dir(root())
        .settings(|s| s.epoch_size = 16)
        .source(
            "noise",
            "synthetic",
            json!({"count": 100, "shape": [2, 3], "seed": 9}),
        )
        .stage("keep", "scale", json!({"field": "x", "output": "x0"}))
        .stage("sq", "square", json!({"field": "x"}))
        .sink("out", "jsonl", json!({"path": "out.jsonl"}))
}

#[test]
fn a_user_stage_runs_in_a_pipeline_built_in_code() {
    let mut registry = latentflow_stages::builtin();
    registry.add_stage(Square);
    let pipeline = builder().plan(&registry, PlanOptions::default()).unwrap();
    let out = std::env::temp_dir().join(format!("lf-api-{}", std::process::id()));
    let summary = latentflow_engine::run(&pipeline, &RunOptions::local(2, &out)).unwrap();
    assert_eq!(summary.metrics.records_read, 100);
    let text = std::fs::read_to_string(out.join("out.jsonl")).unwrap();
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["seq"], i as u64, "records come out in source order");
        let x0: Vec<f64> = v["x0"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect();
        let x: Vec<f64> = v["x"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect();
        for (a, b) in x0.iter().zip(&x) {
            assert!((a * a - b).abs() < 1e-6);
        }
        n += 1;
    }
    assert_eq!(n, 100);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn pipelines_built_in_code_are_validated_like_files() {
    // Without registering the user's stage, planning names the unknown kind.
    let err = builder()
        .plan(&latentflow_stages::builtin(), PlanOptions::default())
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("unknown stage kind `square`"), "{text}");
    assert!(text.contains("entry: sq"), "{text}");

    // And the YAML it would write plans to the same pipeline.
    let mut registry = latentflow_stages::builtin();
    registry.add_stage(Square);
    let yaml = builder().to_yaml();
    let p = latentflow_engine::plan_text(
        &yaml,
        "built.yaml".as_ref(),
        &root(),
        &registry,
        PlanOptions::default(),
    )
    .unwrap();
    assert_eq!(p.entry_names(), ["noise", "keep", "sq", "out"]);
}
