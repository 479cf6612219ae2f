//! The `relief` stage: trains and evaluates RELIEF agents ([`super::relief`]) on a few-shot
//! task built from graph records, beside the linear probe, the full-feature prompt and
//! fine-tuning ([`super::relief_baselines`]), over several shot counts and seeds.
//!
//! - `task: node` reads one graph record (features, edges, node labels and the split masks,
//!   as `graph-load` writes them) and classifies each target node from its k-hop subgraph:
//!   training targets are `shots` per class from the training mask, test targets
//!   `test_size` nodes of the test mask (seeded).
//! - `task: graph` reads many records, one graph each with an int label (`graph-load` on a TU
//!   folder), and treats every batch it is given as one dataset: set the pipeline's
//!   `epoch_size` above the number of graphs and `expect_graphs` to that number, so that a
//!   split batch fails loudly instead of giving results on part of the data.
//!
//! Outputs, in the stage's folder: `metrics.json` (every method, shot count and seed, and
//! means and standard deviations), `table.md`, `training-<shots>shot.png` (per round of the
//! first seed: mean training loss of the graphs at the end of their episodes, blue; the same
//! graphs unprompted under the same head, orange; prompt coverage, green) with the numbers in
//! `training-<shots>shot.json`, and the agent of each run as `policy-<shots>shot-seed<k>.json`.
//! The record gets `<prefix>metrics` (the JSON, as text).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use latentflow_engine::inference::Device;
use latentflow_engine::model::ModelPackage;
use latentflow_engine::{
    Completion, Failure, FieldType, KindInfo, ParamKind, ParamSpec, Params, Plan, PlanIssue,
    Record, Schema, Stage, StageContext, StageFactory, Value,
};
use serde_json::{json, Value as Json};

use super::embed::{EmbedOptions, GnnEmbedder, ModelIo};
use super::relief::{
    self, graph_task, node_task, HeadSettings, PpoCoefficientsDef, ReliefSettings, ReliefTask,
    RoundLog, Scores,
};
use super::relief_baselines::{
    default_finetune_weights, fine_tune, full_prompt, prompt_basis, GradSettings,
};
use super::{Graph, GraphFields};
use crate::plot::{labelled_chart, Labels, Series, PALETTE};

/// Factory of the `relief` stage.
pub struct ReliefStage;

const METHODS: [&str; 4] = ["relief", "probe", "full_prompt", "fine_tune"];

#[derive(Clone, Debug)]
struct Config {
    model: PathBuf,
    node_task: bool,
    fields: GraphFields,
    shots: Vec<usize>,
    seeds: usize,
    hops: usize,
    max_subgraph_nodes: usize,
    test_size: usize,
    expect_graphs: usize,
    relief: ReliefSettings,
    grad_epochs: usize,
    prompt_lr: f64,
    finetune_lr: f64,
    finetune_weights: Vec<String>,
    baselines: Vec<String>,
    prefix: String,
    dir: Option<String>,
}

fn config(params: &Params) -> Result<Config, Vec<PlanIssue>> {
    let mut issues = Vec::new();
    let int = |name: &str, default: i64, min: i64, issues: &mut Vec<PlanIssue>| {
        super::int_param(params, name, default, min, issues)
    };
    let float = |name: &str, default: f64, lo: f64, hi: f64, issues: &mut Vec<PlanIssue>| {
        super::float_param(params, name, default, lo, hi, issues)
    };
    let node_task = params.str("task").unwrap_or("node") == "node";
    let shots: Vec<usize> = match params.get("shots") {
        None => vec![5],
        Some(_) => params.floats("shots").iter().map(|&s| s as usize).collect(),
    };
    if shots.is_empty() || shots.contains(&0) {
        issues.push(PlanIssue::param(
            "shots",
            "`shots` must list at least one positive number",
        ));
    }
    let d = ReliefSettings::default();
    let relief = ReliefSettings {
        rounds: int("rounds", d.rounds as i64, 0, &mut issues),
        graphs_per_round: int(
            "graphs_per_round",
            d.graphs_per_round as i64,
            1,
            &mut issues,
        ),
        hidden: int("policy_hidden", d.hidden as i64, 1, &mut issues),
        max_z: float("max_z", 0.05, 1e-9, 1e6, &mut issues),
        log_std: [
            float("log_std_start", d.log_std[0], -20.0, 5.0, &mut issues),
            float("log_std_end", d.log_std[1], -20.0, 5.0, &mut issues),
        ],
        lr: float("policy_lr", d.lr, 1e-12, 10.0, &mut issues),
        adam_eps: d.adam_eps,
        update_epochs: int("update_epochs", d.update_epochs as i64, 1, &mut issues),
        minibatch: int("minibatch", d.minibatch as i64, 1, &mut issues),
        target_kl: float("target_kl", d.target_kl, 0.0, 1e6, &mut issues),
        gamma: float("gamma", d.gamma, 0.0, 1.0, &mut issues),
        lambda: float("lambda", d.lambda, 0.0, 1.0, &mut issues),
        coef: PpoCoefficientsDef {
            clip: float("clip", d.coef.clip, 0.0, 10.0, &mut issues),
            value: float("value_coef", d.coef.value, 0.0, 1e3, &mut issues),
            entropy: float("entropy_coef", d.coef.entropy, 0.0, 1e3, &mut issues),
        },
        max_grad_norm: float("max_grad_norm", d.max_grad_norm, 1e-12, 1e6, &mut issues),
        reward_clip: float("reward_clip", d.reward_clip, 1e-12, 1e6, &mut issues),
        head_epochs: int("head_epochs", d.head_epochs as i64, 0, &mut issues),
        head: HeadSettings {
            epochs: int("probe_epochs", d.head.epochs as i64, 1, &mut issues),
            lr: float("head_lr", d.head.lr, 1e-12, 10.0, &mut issues),
            weight_decay: float(
                "head_weight_decay",
                d.head.weight_decay,
                0.0,
                1e3,
                &mut issues,
            ),
        },
        seed: params.int("seed").unwrap_or(0).max(0) as u64,
        sample_nodes: params.bool("sample_nodes").unwrap_or(d.sample_nodes),
        refit_head: params.bool("refit_head").unwrap_or(d.refit_head),
    };
    let baselines = match params.get("baselines") {
        None => vec!["probe".into(), "full_prompt".into(), "fine_tune".into()],
        Some(_) => params.strings("baselines"),
    };
    for b in &baselines {
        if !METHODS[1..].contains(&b.as_str()) {
            issues.push(PlanIssue::param(
                "baselines",
                format!("unknown baseline `{b}`: expected probe, full_prompt or fine_tune"),
            ));
        }
    }
    let c = Config {
        model: params.path("model").unwrap_or_default(),
        node_task,
        fields: GraphFields::from_params(params),
        shots,
        seeds: int("seeds", 1, 1, &mut issues),
        hops: int("hops", 2, 0, &mut issues),
        max_subgraph_nodes: int("max_subgraph_nodes", 30, 1, &mut issues),
        test_size: int("test_size", 0, 0, &mut issues),
        expect_graphs: int("expect_graphs", 0, 0, &mut issues),
        relief,
        grad_epochs: int("grad_epochs", 100, 0, &mut issues),
        prompt_lr: float("prompt_lr", 0.01, 1e-12, 10.0, &mut issues),
        finetune_lr: float("finetune_lr", 1e-3, 1e-12, 10.0, &mut issues),
        finetune_weights: params.strings("finetune_weights"),
        baselines,
        prefix: params.str("prefix").unwrap_or("").into(),
        dir: params.str("dir").map(String::from),
    };
    if issues.is_empty() {
        Ok(c)
    } else {
        Err(issues)
    }
}

impl StageFactory for ReliefStage {
    fn info(&self) -> KindInfo {
        use ParamKind::*;
        let opt = ParamSpec::optional;
        KindInfo {
            name: "relief",
            doc: "RELIEF: reinforcement-learned feature prompts on a frozen pre-trained GNN, for \
                  few-shot node classification on k-hop subgraphs (task: node, one graph record) \
                  or graph classification (task: graph, one record per graph); trains an H-PPO \
                  agent per shot count and seed, evaluates it with the linear-probe, \
                  full-prompt and fine-tuning baselines, and writes a metrics JSON, a table, \
                  training curves and the agents.",
            params: vec![
                ParamSpec::required("model", Path, "GNN package folder (the frozen encoder)"),
                opt(
                    "task",
                    Choice(&["node", "graph"]),
                    json!("node"),
                    "node: each target node's k-hop subgraph; graph: whole graphs",
                ),
                opt("features", Field, json!("x"), "node features f32[nodes, F]"),
                opt(
                    "edge_index",
                    Field,
                    json!("edge_index"),
                    "edges i64[2, edges]",
                ),
                opt(
                    "y",
                    Field,
                    json!("y"),
                    "labels: i64[nodes] (node) or int (graph)",
                ),
                opt(
                    "train_mask",
                    Field,
                    json!("train_mask"),
                    "node: training part",
                ),
                opt(
                    "val_mask",
                    Field,
                    json!("val_mask"),
                    "node: validation part",
                ),
                opt("test_mask", Field, json!("test_mask"), "node: test part"),
                opt(
                    "shots",
                    FloatList,
                    json!([5]),
                    "labelled graphs per class; one run per entry and seed",
                ),
                opt(
                    "seeds",
                    Int,
                    json!(1),
                    "runs per shot count (seeds seed, seed+1, ...)",
                ),
                opt("seed", Int, json!(0), "first seed"),
                opt(
                    "hops",
                    Int,
                    json!(2),
                    "node: radius of each target's subgraph",
                ),
                opt(
                    "max_subgraph_nodes",
                    Int,
                    json!(30),
                    "node: most nodes per subgraph (nearest first)",
                ),
                opt(
                    "test_size",
                    Int,
                    json!(0),
                    "test graphs drawn (seeded) from the test part or the rest (0: all)",
                ),
                opt(
                    "expect_graphs",
                    Int,
                    json!(0),
                    "graph: fail unless a batch holds exactly this many graphs (0: no check)",
                ),
                opt("rounds", Int, json!(20), "policy updates"),
                opt(
                    "graphs_per_round",
                    Int,
                    json!(16),
                    "training graphs rolled out per round",
                ),
                opt(
                    "policy_hidden",
                    Int,
                    json!(32),
                    "hidden units of the policy",
                ),
                opt(
                    "max_z",
                    Float,
                    json!(0.05),
                    "largest mean increment per prompt coordinate",
                ),
                opt(
                    "log_std_start",
                    Float,
                    json!(0.0),
                    "log σ of increments at the start",
                ),
                opt(
                    "log_std_end",
                    Float,
                    json!(-5.0),
                    "log σ at the end (linear in between)",
                ),
                opt(
                    "policy_lr",
                    Float,
                    json!(5e-4),
                    "Adam learning rate of the policy",
                ),
                opt("update_epochs", Int, json!(10), "H-PPO passes per update"),
                opt("minibatch", Int, json!(128), "H-PPO minibatch"),
                opt(
                    "target_kl",
                    Float,
                    json!(0.02),
                    "stop the passes above this KL",
                ),
                opt("gamma", Float, json!(0.99), "discount"),
                opt("lambda", Float, json!(0.95), "GAE λ"),
                opt("clip", Float, json!(0.2), "PPO ratio clip"),
                opt("value_coef", Float, json!(0.5), "value-loss coefficient"),
                opt(
                    "entropy_coef",
                    Float,
                    json!(0.01),
                    "entropy bonus at the start (annealed to 0)",
                ),
                opt("max_grad_norm", Float, json!(0.5), "gradient-norm clip"),
                opt(
                    "reward_clip",
                    Float,
                    json!(1.0),
                    "raw rewards clipped to ±this",
                ),
                opt(
                    "head_epochs",
                    Int,
                    json!(50),
                    "head epochs after each policy update",
                ),
                opt(
                    "probe_epochs",
                    Int,
                    json!(100),
                    "epochs of the linear probe and of the final head refit",
                ),
                opt(
                    "head_lr",
                    Float,
                    json!(0.01),
                    "Adam learning rate of the head",
                ),
                opt(
                    "head_weight_decay",
                    Float,
                    json!(0.01),
                    "L2 penalty of the head",
                ),
                opt(
                    "sample_nodes",
                    Bool,
                    json!(false),
                    "after training, draw nodes from the policy (seeded) instead of the most \
                     probable one",
                ),
                opt(
                    "refit_head",
                    Bool,
                    json!(false),
                    "after training, refit the head from scratch on the training graphs' final \
                     prompts (otherwise keep the head trained alongside the policy)",
                ),
                opt(
                    "baselines",
                    FieldList,
                    json!(["probe", "full_prompt", "fine_tune"]),
                    "baselines to run: probe | full_prompt | fine_tune",
                ),
                opt(
                    "grad_epochs",
                    Int,
                    json!(100),
                    "epochs of the full prompt and of fine-tuning",
                ),
                opt(
                    "prompt_lr",
                    Float,
                    json!(0.01),
                    "Adam learning rate of the full prompt",
                ),
                opt(
                    "finetune_lr",
                    Float,
                    json!(1e-3),
                    "Adam learning rate of the GNN weights",
                ),
                opt(
                    "finetune_weights",
                    FieldList,
                    json!(null),
                    "initializers to fine-tune (default: every GCN/GIN layer weight)",
                ),
                opt("prefix", String, json!(""), "put before the field written"),
                opt(
                    "dir",
                    String,
                    json!(null),
                    "output folder inside the run folder (default: the entry's name)",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let c = config(params)?;
        let mut plan = c.fields.read_edges(c.fields.read_x(Plan::default()));
        if c.node_task {
            plan = c.fields.read_node_labels(plan);
            plan = c.fields.read_masks(plan, input, |_| true);
        } else {
            plan = plan.read(&c.fields.y, FieldType::Int, &["y"]);
        }
        Ok(plan.write(&format!("{}metrics", c.prefix), FieldType::Text))
    }

    fn check(&self, params: &Params) -> Result<(), Vec<PlanIssue>> {
        let c = config(params)?;
        let package = ModelPackage::load(&c.model)
            .map_err(|e| vec![PlanIssue::param("model", e.to_string())])?;
        let io = ModelIo::of(&package).map_err(|e| vec![PlanIssue::param("model", e)])?;
        if !c.node_task && io.g.is_none() {
            return Err(vec![PlanIssue::param(
                "model",
                "task: graph needs a package with a graph embedding output (a `batch` input)",
            )]);
        }
        Ok(())
    }

    fn build(&self, params: &Params, cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        let c = config(params).map_err(|i| i[0].message.clone())?;
        let out = cx
            .out_dir
            .join(c.dir.clone().unwrap_or_else(|| cx.name.clone()));
        Ok(Box::new(Relief { config: c, out }))
    }
}

/// A running `relief` stage.
struct Relief {
    config: Config,
    out: PathBuf,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
}

fn scores_json(s: &Scores) -> Json {
    let f = |v: f64| if v.is_finite() { json!(v) } else { Json::Null };
    json!({
        "accuracy": f(s.accuracy), "macro_f1": f(s.macro_f1), "roc_auc": f(s.roc_auc),
        "coverage": f(s.coverage), "magnitude": f(s.magnitude),
    })
}

fn write_text(path: &Path, text: &str) -> Result<(), String> {
    latentflow_engine::exec::write_atomic(path, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Training curves of one run as PNG and JSON.
fn write_curves(dir: &Path, shots: usize, log: &[RoundLog]) -> Result<(), String> {
    let series = |f: &dyn Fn(&RoundLog) -> f64, colour| Series {
        points: log.iter().map(|l| (l.round as f64, f(l))).collect(),
        band: None,
        colour,
    };
    let chart = [
        series(&|l| l.final_loss, PALETTE[0]),
        series(&|l| l.start_loss, PALETTE[1]),
        series(&|l| l.coverage, PALETTE[2]),
    ];
    let labels = Labels {
        x: "training round (H-PPO update)".into(),
        y: "training loss of the head; prompt coverage".into(),
        names: vec![
            "loss, prompted".into(),
            "loss, unprompted".into(),
            "coverage".into(),
        ],
    };
    if let Some(img) = labelled_chart(&chart, &labels) {
        crate::image::save_png(&img, &dir.join(format!("training-{shots}shot.png")))?;
    }
    let text = serde_json::to_string_pretty(log).map_err(|e| e.to_string())? + "\n";
    write_text(&dir.join(format!("training-{shots}shot.json")), &text)
}

impl Relief {
    fn graphs(&self, batch: &[Record]) -> Result<Vec<Graph>, String> {
        batch
            .iter()
            .map(|r| {
                Graph::from_record(r, &self.config.fields).map_err(|e| format!("{}: {e}", r.key))
            })
            .collect()
    }

    fn run(&self, batch: &[Record], key: &str) -> Result<Json, String> {
        let c = &self.config;
        let dir = self.out.clone();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let graphs = self.graphs(batch)?;
        if !c.node_task && c.expect_graphs > 0 && graphs.len() != c.expect_graphs {
            return Err(format!(
                "the batch holds {} graphs, `expect_graphs` is {}: raise the pipeline's \
                 `epoch_size` above the number of graphs and run with one worker",
                graphs.len(),
                c.expect_graphs
            ));
        }
        let options = EmbedOptions {
            device: Device::Cpu,
            threads: Some(1),
            max_nodes: 2048,
        };
        let embedder = GnnEmbedder::open(&c.model, &options)?;
        let basis = if c.node_task {
            prompt_basis(&c.model)?.map(Arc::new)
        } else {
            None
        };
        let weights = if c.finetune_weights.is_empty() {
            default_finetune_weights(&c.model)?
        } else {
            c.finetune_weights.clone()
        };
        let grad = GradSettings {
            epochs: c.grad_epochs,
            lr: c.prompt_lr,
            head: c.relief.head,
        };

        let mut runs = Vec::new();
        let mut summary = serde_json::Map::new();
        let mut table = String::from(
            "| shots | method | accuracy | macro-F1 | ROC-AUC | coverage | magnitude |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for &shots in &c.shots {
            let mut per: Vec<Vec<Scores>> = vec![Vec::new(); METHODS.len()];
            for k in 0..c.seeds as u64 {
                let seed = c.relief.seed + k;
                let task: ReliefTask = if c.node_task {
                    node_task(
                        &graphs[0],
                        shots,
                        c.hops,
                        c.max_subgraph_nodes,
                        c.test_size,
                        seed,
                        basis.clone(),
                    )?
                } else {
                    graph_task(&graphs, shots, c.test_size, seed)?
                };
                let settings = ReliefSettings {
                    seed,
                    ..c.relief.clone()
                };
                tracing::info!(key, shots, seed, "training a RELIEF agent");
                let ck = relief::train(&embedder, &task, &settings, &mut |l| {
                    tracing::debug!(
                        round = l.round,
                        reward = l.reward,
                        loss = l.final_loss,
                        coverage = l.coverage,
                        "round"
                    );
                })?;
                ck.save(&dir.join(format!("policy-{shots}shot-seed{seed}.json")))?;
                if k == 0 {
                    write_curves(&dir, shots, &ck.log)?;
                }
                let mut got = vec![Some(relief::evaluate(&embedder, &task, &ck)?)];
                for m in &METHODS[1..] {
                    let s = if !c.baselines.iter().any(|b| b == m) {
                        None
                    } else if *m == "probe" {
                        Some(relief::linear_probe(&embedder, &task, &c.relief.head)?)
                    } else if *m == "full_prompt" {
                        Some(full_prompt(&c.model, &task, &grad)?.scores)
                    } else {
                        let g = GradSettings {
                            lr: c.finetune_lr,
                            ..grad
                        };
                        Some(fine_tune(&c.model, &task, &weights, &g)?.scores)
                    };
                    got.push(s);
                }
                for (i, s) in got.into_iter().enumerate() {
                    if let Some(s) = s {
                        tracing::info!(
                            shots,
                            seed,
                            method = METHODS[i],
                            accuracy = format!("{:.4}", s.accuracy),
                            macro_f1 = format!("{:.4}", s.macro_f1),
                            roc_auc = format!("{:.4}", s.roc_auc),
                            "scored"
                        );
                        runs.push(json!({
                            "shots": shots, "seed": seed, "method": METHODS[i],
                            "train_graphs": task.train.len(), "test_graphs": task.test.len(),
                            "scores": scores_json(&s),
                        }));
                        per[i].push(s);
                    }
                }
            }
            let mut by_method = serde_json::Map::new();
            for (i, scores) in per.iter().enumerate() {
                if scores.is_empty() {
                    continue;
                }
                let stat = |f: &dyn Fn(&Scores) -> f64| {
                    let (m, s) = mean_std(&scores.iter().map(f).collect::<Vec<_>>());
                    (m, s)
                };
                let acc = stat(&|s| s.accuracy);
                let f1 = stat(&|s| s.macro_f1);
                let auc = stat(&|s| s.roc_auc);
                let cov = stat(&|s| s.coverage);
                let mag = stat(&|s| s.magnitude);
                let cell = |(m, s): (f64, f64)| format!("{m:.3} ± {s:.3}");
                table += &format!(
                    "| {shots} | {} | {} | {} | {} | {} | {} |\n",
                    METHODS[i],
                    cell(acc),
                    cell(f1),
                    if c.node_task { "–".into() } else { cell(auc) },
                    cell(cov),
                    cell(mag)
                );
                let pair = |(m, s): (f64, f64)| json!({"mean": m, "std": s});
                by_method.insert(
                    METHODS[i].into(),
                    json!({
                        "accuracy": pair(acc), "macro_f1": pair(f1),
                        "roc_auc": if c.node_task { Json::Null } else { pair(auc) },
                        "coverage": pair(cov), "magnitude": pair(mag), "runs": scores.len(),
                    }),
                );
            }
            summary.insert(format!("{shots}"), Json::Object(by_method));
        }
        let doc = json!({
            "task": if c.node_task { "node" } else { "graph" },
            "model": c.model.display().to_string(),
            "graphs_in_batch": graphs.len(),
            "hops": c.hops, "max_subgraph_nodes": c.max_subgraph_nodes,
            "settings": serde_json::to_value(&c.relief).map_err(|e| e.to_string())?,
            "finetune_weights": weights,
            "summary": summary,
            "runs": runs,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())? + "\n";
        write_text(&dir.join("metrics.json"), &text)?;
        write_text(&dir.join("table.md"), &table)?;
        Ok(doc)
    }
}

impl Stage for Relief {
    fn process(&mut self, batch: Vec<Record>, _cx: &StageContext) -> Completion {
        let field = format!("{}metrics", self.config.prefix);
        if self.config.node_task {
            let out = batch
                .into_iter()
                .map(|mut r| {
                    let key = r.key.clone();
                    match self.run(std::slice::from_ref(&r), &key) {
                        Ok(doc) => {
                            r.set(&field, Value::Text(doc["summary"].to_string().into()));
                            Ok(r)
                        }
                        Err(e) => Err(Failure::of(&r, "relief", e)),
                    }
                })
                .collect();
            return Completion::Ready(out);
        }
        let key = batch.first().map(|r| r.key.clone()).unwrap_or_default();
        match self.run(&batch, &key) {
            Ok(doc) => {
                let text = doc["summary"].to_string();
                Completion::Ready(
                    batch
                        .into_iter()
                        .map(|mut r| {
                            r.set(&field, Value::Text(text.as_str().into()));
                            Ok(r)
                        })
                        .collect(),
                )
            }
            Err(e) => Completion::Ready(
                batch
                    .iter()
                    .map(|r| Err(Failure::of(r, "relief", e.clone())))
                    .collect(),
            ),
        }
    }
}
