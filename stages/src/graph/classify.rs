//! The `classify` stage: trains a node classifier on each graph record and scores it.
//!
//! `method: gcn` trains the two-layer GCN of [`super::gcn`] on the record's features and
//! edges; `method: logreg` trains logistic regression ([`super::logreg`]) on one field of node
//! vectors (raw features, or frozen embeddings a GNN wrote) and ignores the edges. Both train on
//! the nodes of `train_mask` and are scored on `val_mask` and `test_mask`.
//!
//! Written fields (each name after `prefix`): `predictions` i64[nodes], `probs`
//! f32[nodes, classes], `loss` f32[epochs] (of the first run), and the scalars `accuracy`,
//! `micro_f1`, `macro_f1` (test nodes) and `val_accuracy`, `val_micro_f1`, `val_macro_f1`.
//! With `runs` above 1 the classifier is trained that many times with seeds `seed`,
//! `seed + 1`, ...; the scalars are then means over the runs, `accuracy_std`, `micro_f1_std`
//! and `macro_f1_std` give the (population) standard deviations, and the tensors come from the
//! first run.

use latentflow_engine::{
    Completion, DType, Dim, Failure, FieldType, KindInfo, ParamKind, ParamSpec, Params, Plan,
    PlanIssue, Record, Schema, Shape, Stage, StageContext, StageFactory, Tensor, Value,
};
use ndarray::{Array1, ArrayD};
use serde_json::json;

use super::gcn::{self, GcnSettings};
use super::logreg::{self, LogregSettings};
use super::{Graph, GraphFields, NodeResult};

/// Factory of the `classify` stage.
pub struct ClassifyStage;

#[derive(Clone, Debug, PartialEq)]
enum Method {
    Gcn(GcnSettings),
    Logreg(LogregSettings),
}

#[derive(Clone, Debug)]
struct Classify {
    method: Method,
    fields: GraphFields,
    runs: usize,
    prefix: String,
    embeddings: Option<String>,
}

const TEST_METRICS: [&str; 3] = ["accuracy", "micro_f1", "macro_f1"];

fn settings(params: &Params) -> Result<Classify, Vec<PlanIssue>> {
    let mut issues = Vec::new();
    let int = |name: &str, default: i64, min: i64, issues: &mut Vec<PlanIssue>| {
        let v = params.int(name).unwrap_or(default);
        if v < min {
            issues.push(PlanIssue::param(
                name,
                format!("`{name}` must be at least {min}"),
            ));
        }
        v.max(min) as usize
    };
    let hidden = int("hidden", 16, 1, &mut issues);
    let epochs = int("epochs", 200, 1, &mut issues);
    let runs = int("runs", 1, 1, &mut issues);
    let dropout = params.float("dropout").unwrap_or(0.5) as f32;
    if !(0.0..1.0).contains(&dropout) {
        issues.push(PlanIssue::param("dropout", "`dropout` must be in [0, 1)"));
    }
    let lr = params.float("lr").unwrap_or(0.01) as f32;
    if lr <= 0.0 || !lr.is_finite() {
        issues.push(PlanIssue::param("lr", "`lr` must be positive"));
    }
    let weight_decay = params.float("weight_decay").unwrap_or(5e-4) as f32;
    if weight_decay < 0.0 {
        issues.push(PlanIssue::param(
            "weight_decay",
            "`weight_decay` must not be negative",
        ));
    }
    let seed = params.int("seed").unwrap_or(0) as u64;
    let method = match params.str("method").unwrap_or("gcn") {
        "logreg" => Method::Logreg(LogregSettings {
            lr,
            weight_decay,
            epochs,
        }),
        _ => Method::Gcn(GcnSettings {
            hidden,
            dropout,
            lr,
            weight_decay,
            epochs,
            seed,
        }),
    };
    let embeddings = params.str("embeddings").map(String::from);
    if embeddings.is_some() && matches!(method, Method::Logreg(_)) {
        issues.push(
            PlanIssue::param("embeddings", "only the GCN has embeddings to write")
                .hint("remove `embeddings`, or use method: gcn"),
        );
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(Classify {
        method,
        fields: GraphFields::from_params(params),
        runs,
        prefix: params.str("prefix").unwrap_or("").to_string(),
        embeddings,
    })
}

impl StageFactory for ClassifyStage {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "classify",
            doc: "Trains a node classifier on each graph record (a 2-layer GCN, or logistic \
                  regression on a field of node vectors such as frozen embeddings) on the \
                  train mask; writes predictions, probs, the loss curve, and accuracy, micro-F1 \
                  and macro-F1 on the test mask (and val_* on the validation mask).",
            params: vec![
                ParamSpec::optional(
                    "method",
                    ParamKind::Choice(&["gcn", "logreg"]),
                    json!("gcn"),
                    "the classifier",
                ),
                ParamSpec::optional(
                    "features",
                    ParamKind::Field,
                    json!("x"),
                    "node vectors f32[nodes, F]: features, or embeddings for logreg",
                ),
                ParamSpec::optional(
                    "edge_index",
                    ParamKind::Field,
                    json!("edge_index"),
                    "edges i64[2, edges] (gcn)",
                ),
                ParamSpec::optional("y", ParamKind::Field, json!("y"), "node labels i64[nodes]"),
                ParamSpec::optional(
                    "train_mask",
                    ParamKind::Field,
                    json!("train_mask"),
                    "0/1 mask of the training nodes",
                ),
                ParamSpec::optional(
                    "val_mask",
                    ParamKind::Field,
                    json!("val_mask"),
                    "0/1 mask of the validation nodes",
                ),
                ParamSpec::optional(
                    "test_mask",
                    ParamKind::Field,
                    json!("test_mask"),
                    "0/1 mask of the test nodes",
                ),
                ParamSpec::optional("hidden", ParamKind::Int, json!(16), "GCN hidden units"),
                ParamSpec::optional(
                    "dropout",
                    ParamKind::Float,
                    json!(0.5),
                    "GCN dropout on the input features and the hidden layer",
                ),
                ParamSpec::optional("lr", ParamKind::Float, json!(0.01), "Adam learning rate"),
                ParamSpec::optional(
                    "weight_decay",
                    ParamKind::Float,
                    json!(5e-4),
                    "L2 penalty on the first layer's weights",
                ),
                ParamSpec::optional("epochs", ParamKind::Int, json!(200), "training epochs"),
                ParamSpec::optional(
                    "seed",
                    ParamKind::Int,
                    json!(0),
                    "seed of initial weights and dropout",
                ),
                ParamSpec::optional(
                    "runs",
                    ParamKind::Int,
                    json!(1),
                    "train this many times (seeds seed, seed+1, ...) and report means and \
                     standard deviations",
                ),
                ParamSpec::optional(
                    "prefix",
                    ParamKind::String,
                    json!(""),
                    "put before the name of every written field",
                ),
                ParamSpec::optional(
                    "embeddings",
                    ParamKind::String,
                    json!(null),
                    "also write the GCN's hidden layer f32[nodes, hidden] to this field",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let c = settings(params)?;
        let named = |s: &str| Dim::Named(s.into());
        let i64_nodes = FieldType::Tensor {
            dtype: DType::I64,
            shape: Shape(Some(vec![named("nodes")])),
        };
        let mut plan = c.fields.read_x(Plan::default());
        if let Method::Gcn(_) = c.method {
            plan = c.fields.read_edges(plan);
        }
        plan = c.fields.read_node_labels(plan);
        // Masks may be 0/1 integers or floats.
        plan = c.fields.read_masks(plan, input, |_| true);

        let p = |s: &str| format!("{}{s}", c.prefix);
        let epochs = match &c.method {
            Method::Gcn(s) => s.epochs,
            Method::Logreg(s) => s.epochs,
        };
        plan = plan
            .write(&p("predictions"), i64_nodes)
            .write(
                &p("probs"),
                FieldType::f32(Shape(Some(vec![named("nodes"), named("classes")]))),
            )
            .write(&p("loss"), FieldType::f32(Shape::fixed(&[epochs])));
        for m in TEST_METRICS {
            plan = plan
                .write(&p(m), FieldType::Scalar)
                .write(&p(&format!("val_{m}")), FieldType::Scalar);
            if c.runs > 1 {
                plan = plan.write(&p(&format!("{m}_std")), FieldType::Scalar);
            }
        }
        if let (Some(e), Method::Gcn(s)) = (&c.embeddings, &c.method) {
            plan = plan.write(
                e,
                FieldType::f32(Shape(Some(vec![named("nodes"), Dim::Fixed(s.hidden)]))),
            );
        }
        Ok(plan)
    }

    fn build(&self, params: &Params, _cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        settings(params)
            .map(|c| Box::new(c) as Box<dyn Stage>)
            .map_err(|i| i[0].message.clone())
    }
}

/// Mean and population standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

impl Classify {
    fn run(&self, mut r: Record) -> Result<Record, String> {
        let g = Graph::from_record(&r, &self.fields)?;
        let mut results: Vec<NodeResult> = Vec::with_capacity(self.runs);
        match &self.method {
            Method::Gcn(s) => {
                let input = gcn::GcnInput::new(&g);
                for k in 0..self.runs {
                    let s = GcnSettings {
                        seed: s.seed.wrapping_add(k as u64),
                        ..s.clone()
                    };
                    results.push(gcn::train_with(&g, &input, &s)?);
                }
            }
            Method::Logreg(s) => {
                // Deterministic: one run stands for all.
                results.push(logreg::train(&g, s)?);
            }
        }
        tracing::debug!(key = %r.key, test_accuracy = results[0].test.accuracy, "classified");

        let p = |s: &str| format!("{}{s}", self.prefix);
        let first = &results[0];
        let predictions = Array1::from_vec(first.predictions.clone()).into_dyn();
        r.set(&p("predictions"), Value::Tensor(Tensor::i64(predictions)));
        r.set(
            &p("probs"),
            Value::Tensor(Tensor::f32(first.probs.clone().into_dyn())),
        );
        let loss =
            ArrayD::from_shape_vec(vec![first.losses.len()], first.losses.clone()).expect("shape");
        r.set(&p("loss"), Value::Tensor(Tensor::f32(loss)));
        if let (Some(e), Some(h)) = (&self.embeddings, &first.embeddings) {
            r.set(e, Value::Tensor(Tensor::f32(h.clone().into_dyn())));
        }
        for (k, m) in TEST_METRICS.iter().enumerate() {
            let pick = |s: &super::metrics::Scores| [s.accuracy, s.micro_f1, s.macro_f1][k];
            let test: Vec<f64> = results.iter().map(|x| pick(&x.test)).collect();
            let val: Vec<f64> = results.iter().map(|x| pick(&x.val)).collect();
            let (mean, std) = mean_std(&test);
            r.set(&p(m), Value::Scalar(mean));
            r.set(&p(&format!("val_{m}")), Value::Scalar(mean_std(&val).0));
            if self.runs > 1 {
                // Logistic regression is deterministic: its spread over runs is 0.
                r.set(&p(&format!("{m}_std")), Value::Scalar(std));
            }
        }
        Ok(r)
    }
}

impl Stage for Classify {
    fn process(&mut self, batch: Vec<Record>, cx: &StageContext) -> Completion {
        Completion::Ready(
            batch
                .into_iter()
                .map(|r| {
                    let (key, seq) = (r.key.clone(), r.seq);
                    self.run(r).map_err(|reason| Failure {
                        key,
                        seq,
                        stage: cx.name.clone(),
                        reason,
                    })
                })
                .collect(),
        )
    }
}
