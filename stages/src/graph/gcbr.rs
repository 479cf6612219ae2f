//! The `gcbr` stage: class-balanced reinforced active learning on a graph record, in one of two
//! modes.
//!
//! - `mode: train` trains a GCBR or GCBR++ policy on the graph ([`super::agent::Trainer`]):
//!   `episodes` rounds of `parallel` episodes of `budget` labels. It writes policy files into
//!   the stage's folder of the run (`<run>/<dir>/`, `dir` defaulting to the entry's name):
//!   `policy-NNNNNN.json` every `checkpoint_every` rounds and `policy.json` at the end, each
//!   holding everything needed to label with the policy or to continue its training
//!   (`resume: <file>`); `training.json` (one line of figures per round, and the validations);
//!   and `training.png`: the episodes' validation macro-F1 (blue) and imbalance ratio (orange)
//!   per round, moving mean over 10 rounds, as the policy samples its actions, and, with
//!   validation, the validation runs' macro-F1 (green) and imbalance ratio (pink).
//!
//!   With `validate_every: K`, every K rounds the policy labels the graph `validate_runs` times
//!   with the labelling settings, taking its most probable node as when labelling, scored on
//!   the graph's validation part (a seeded random one without masks); the policy with the best
//!   `alpha · macro-F1 + (1 − alpha) · imbalance ratio` so far is written to
//!   `policy-best.json`. The policy swings between rounds, and this chooses a checkpoint
//!   without looking at test nodes.
//!
//!   Record fields, each after `prefix`: `episode_macro_f1`, `episode_imbalance`,
//!   `episode_reward` (`f32[episodes]`), `policy` (the final policy file's path) and, when
//!   validating, `best_policy`.
//! - `mode: label` labels the graph `runs` times with each agent of `agents` until the budget
//!   is spent: the names of `policies` (agent name → policy file) and the baselines `random`,
//!   `entropy` (most uncertain prediction) and `pagerank` (most central node). Run `k` of every
//!   agent uses seed `seed + k`, so agents are compared on the same classifier initialisations.
//!   Files: `metrics.json` (per agent: mean and standard deviation over runs of test micro-F1,
//!   macro-F1, accuracy, imbalance ratio and label-count deviation; mean labels per class; and
//!   every run's picks and counts), `curves.png` (test macro-F1 of the classifier as it is
//!   after each pick, against labels used, the last point after the final epochs; mean over
//!   runs with ± one standard deviation shaded, one colour per agent in the order of `agents`,
//!   the palette of [`crate::plot::PALETTE`]) and `curves.json` (the same numbers).
//!
//!   Record fields per agent `a`, after `prefix`: `a_curve` (`f32[budget]`); the means
//!   `a_micro_f1`, `a_macro_f1`, `a_imbalance`, `a_label_std` and the deviations
//!   `a_micro_f1_std`, `a_macro_f1_std`, `a_imbalance_std`; `a_counts` (`f32[classes]`, mean
//!   labels per class).
//!
//!   The labels come from the oracle: `oracle: truth` (the default) answers with the graph's `y`,
//!   wrong with probability `oracle_noise`; `oracle: file` asks a person through the files of a
//!   [`FileOracle`] in `oracle_dir` (default `<dir>/oracle`; a relative folder is taken inside the
//!   run's output folder, and `{key}` is replaced by the record's key). The person writes
//!   `node,label` lines into `answers.csv` there (labels are class ids; `#` comments); each node
//!   without an answer is written once to `queries.jsonl` (its query's number, the node, the time,
//!   its degree and the classifier's predicted class and confidence), a log line names the node and
//!   the file, and the run waits, reading `answers.csv` again every `oracle_poll_ms` (1000) when it
//!   changed, for up to `oracle_timeout_s` (3600; 0 does not wait). Then the record fails with an
//!   error naming the node and the file, and running the pipeline again into the same output folder
//!   resumes: the seeded runs pick the same nodes, get the answers given so far from the file
//!   without asking, and stop at the next node without an answer. Answers belong to nodes, so every
//!   run and every agent shares them; with several runs or agents and timeout 0, each run writes
//!   its next query before the record fails, and the person answers them as a batch. `metrics.json`
//!   then also names `oracle_dir`.
//!
//! Training and labelling use separate classifier settings, as published: `hidden`,
//! `final_epochs` and `cap` default to 128, 35 and 5 in `train` mode and to 64, 100 and 20 in
//! `label` mode. Standard deviations are population deviations over runs.
//!
//! Decisions:
//! - One stage runs whole episodes, oracle and classifier included, rather than a dataflow
//!   loop of agent, oracle and classifier stages: an episode is a tight sequence of hundreds
//!   of small steps whose state (classifier weights, optimiser) would otherwise travel between
//!   operators at every step. Episodes run in parallel on `threads` threads of the worker that
//!   holds the graph record (all cores by default); results do not depend on the count.
//! - `dir` may contain `{key}`, replaced by the record's key, for pipelines with several
//!   graphs; otherwise a second graph's files replace the first's. The same holds for
//!   `oracle_dir`, where a second graph would read the first one's answers.
//! - The file oracle only replaces the answers: the candidates are still the nodes labelled
//!   in `y`, and runs are still scored against `y`.
// TODO: labelling a graph without ground truth (candidates from a mask, no test scores) needs
// a label mode that does not score; with the file oracle alone, `y` must still be given.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use latentflow_engine::{
    Completion, Dim, Failure, FieldType, KindInfo, ParamKind, ParamSpec, Params, Plan, PlanIssue,
    Record, Schema, Shape, Stage, StageContext, StageFactory, Tensor, Value,
};
use ndarray::{Array1, ArrayD};
use serde_json::{json, Map, Value as Json};

use super::agent::{
    label, Agent, Checkpoint, EpisodeSplit, LabelOracle, LabelRun, LabelSettings, Problem,
    TrainSettings, Trainer, Validation, Variant, BASELINES,
};
use super::oracle::FileOracle;
use super::retrain::ClassifierSettings;
use super::{Graph, GraphFields, Rng};
use crate::image::save_png;
use crate::plot::{labelled_chart, Labels, Series, PALETTE};

/// Factory of the `gcbr` stage.
pub struct GcbrStage;

#[derive(Clone, Debug)]
enum AgentSpec {
    Baseline(String),
    Policy(PathBuf),
}

#[derive(Clone, Debug)]
enum Job {
    Train {
        settings: TrainSettings,
        checkpoint_every: usize,
        resume: Option<PathBuf>,
        validation: Option<ValidationJob>,
    },
    Label {
        agents: Vec<(String, AgentSpec)>,
        settings: LabelSettings,
        runs: usize,
        seed: u64,
        random_split: Option<(usize, usize)>,
        sample: bool,
        /// A person answers through files, instead of the ground truth.
        file_oracle: Option<FileOracleJob>,
    },
}

/// How the file oracle waits; its folder is [`Gcbr::oracle_dir`].
#[derive(Clone, Debug)]
struct FileOracleJob {
    timeout: Duration,
    poll: Duration,
}

/// Validation of the policy while it trains.
#[derive(Clone, Debug)]
struct ValidationJob {
    every: usize,
    runs: usize,
    settings: LabelSettings,
}

#[derive(Clone, Debug)]
struct Config {
    job: Job,
    fields: GraphFields,
    dir: Option<String>,
    threads: usize,
    prefix: String,
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn config(params: &Params) -> Result<Config, Vec<PlanIssue>> {
    let mut issues = Vec::new();
    let train = params.str("mode").unwrap_or("label") == "train";
    let int = |name: &str, default: i64, min: i64, issues: &mut Vec<PlanIssue>| {
        super::int_param(params, name, default, min, issues)
    };
    let float = |name: &str, default: f64, lo: f64, hi: f64, issues: &mut Vec<PlanIssue>| {
        super::float_param(params, name, default, lo, hi, issues)
    };
    let base = if train {
        ClassifierSettings::training()
    } else {
        ClassifierSettings::labelling()
    };
    let classifier = ClassifierSettings {
        hidden: int("hidden", base.hidden as i64, 1, &mut issues),
        dropout: float("dropout", base.dropout as f64, 0.0, 0.99, &mut issues) as f32,
        lr: float("lr", base.lr as f64, 1e-9, 10.0, &mut issues) as f32,
        weight_decay: float(
            "weight_decay",
            base.weight_decay as f64,
            0.0,
            1.0,
            &mut issues,
        ) as f32,
        epochs_per_pick: int(
            "epochs_per_pick",
            base.epochs_per_pick as i64,
            1,
            &mut issues,
        ),
        final_epochs: int("final_epochs", base.final_epochs as i64, 0, &mut issues),
    };
    let budget = int("budget", if train { 35 } else { 140 }, 1, &mut issues);
    let cap = int("cap", if train { 5 } else { 20 }, 0, &mut issues);
    let seed = params.int("seed").unwrap_or(0) as u64;
    let oracle_noise = float("oracle_noise", 0.0, 0.0, 1.0, &mut issues);
    let oracle_cost = float("oracle_cost", 1.0, 0.0, f64::MAX, &mut issues);
    let file_oracle = params.str("oracle") == Some("file");
    if file_oracle {
        if train {
            issues.push(
                PlanIssue::param("oracle", "the file oracle is for mode: label").hint(
                    "a person cannot answer the thousands of queries of training; train with \
                     oracle: truth (the default)",
                ),
            );
        }
        if oracle_noise > 0.0 {
            issues.push(
                PlanIssue::param("oracle_noise", "`oracle_noise` is for oracle: truth")
                    .hint("a person's answers are used as given; remove oracle_noise"),
            );
        }
        if params
            .str("oracle_dir")
            .is_some_and(|d| d.trim().is_empty())
        {
            issues.push(
                PlanIssue::param("oracle_dir", "`oracle_dir` is empty")
                    .hint("name a folder, or remove it for <dir>/oracle"),
            );
        }
    } else {
        for name in ["oracle_dir", "oracle_timeout_s", "oracle_poll_ms"] {
            if params.get(name).is_some() {
                issues.push(
                    PlanIssue::param(name, format!("`{name}` is for oracle: file")).hint(
                        "set oracle: file to have a person answer through files, or remove it",
                    ),
                );
            }
        }
    }
    // A year at most: Duration cannot hold every float.
    let oracle_timeout = float("oracle_timeout_s", 3600.0, 0.0, 3.2e7, &mut issues);
    let oracle_poll = int("oracle_poll_ms", 1000, 1, &mut issues);
    let val_size = int("val_size", 500, 1, &mut issues);
    let test_size = int("test_size", 1000, 1, &mut issues);

    let job = if train {
        let variant =
            Variant::parse(params.str("variant").unwrap_or("gcbr")).unwrap_or(Variant::Gcbr);
        let milestones = params.get("lr_milestones").map_or_else(
            || vec![1000, 2000, 3000],
            |_| {
                params
                    .floats("lr_milestones")
                    .iter()
                    .map(|&v| v.max(0.0) as usize)
                    .collect()
            },
        );
        let settings = TrainSettings {
            variant,
            episodes: int("episodes", 4000, 1, &mut issues),
            parallel: int("parallel", 5, 1, &mut issues),
            budget,
            update_every: int("update_every", 7, 1, &mut issues),
            gamma: float("gamma", 0.9, 0.0, 1.0, &mut issues),
            lr: float("policy_lr", 1e-3, 1e-12, 1.0, &mut issues),
            lr_decay: float("lr_decay", 0.3, 0.0, 1.0, &mut issues),
            lr_milestones: milestones,
            alpha: float("alpha", 0.5, 0.0, 1.0, &mut issues),
            punishment: float("punishment", 0.05, 0.0, f64::MAX, &mut issues),
            cap,
            policy_hidden: int("policy_hidden", 8, 1, &mut issues),
            classifier,
            val_size,
            test_size,
            norm_rate: 0.05,
            oracle_noise,
            seed,
        };
        if params.get("agents").is_some() || params.get("policies").is_some() {
            issues.push(
                PlanIssue::param("agents", "`agents` and `policies` are for mode: label")
                    .hint("remove them, or set mode: label"),
            );
        }
        let every = int("validate_every", 0, 0, &mut issues);
        let validation = (every > 0).then(|| ValidationJob {
            every,
            runs: int("validate_runs", 3, 1, &mut issues),
            settings: LabelSettings {
                budget: int("validate_budget", 140, 1, &mut issues),
                ..LabelSettings::default()
            },
        });
        Job::Train {
            settings,
            checkpoint_every: int("checkpoint_every", 100, 1, &mut issues),
            resume: params.path("resume"),
            validation,
        }
    } else {
        let policies = params.name_map("policies");
        let mut agents = Vec::new();
        let names = params.strings("agents");
        if names.is_empty() {
            issues.push(
                PlanIssue::param("agents", "list at least one agent")
                    .hint("e.g. agents: [gcbr, random, entropy, pagerank]"),
            );
        }
        for (i, a) in names.iter().enumerate() {
            if !is_name(a) {
                issues.push(
                    PlanIssue::param("agents", format!("`{a}` is not a usable agent name"))
                        .at_key(&i.to_string())
                        .hint(
                            "letters, digits, `_` and `-`: it starts the names of the fields \
                             written",
                        ),
                );
            } else if let Some((_, p)) = policies.iter().find(|(k, _)| k == a) {
                agents.push((a.clone(), AgentSpec::Policy(params.resolve(p))));
            } else if BASELINES.contains(&a.as_str()) {
                agents.push((a.clone(), AgentSpec::Baseline(a.clone())));
            } else {
                let known: Vec<&str> = policies
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .chain(BASELINES)
                    .collect();
                issues.push(
                    PlanIssue::param("agents", format!("no agent `{a}`"))
                        .at_key(&i.to_string())
                        .hint(format!(
                            "an agent is a name of `policies` or a baseline; known: {}",
                            known.join(", ")
                        )),
                );
            }
        }
        if let Some(i) = (1..agents.len()).find(|&i| agents[..i].iter().any(|a| a.0 == agents[i].0))
        {
            issues.push(PlanIssue::param(
                "agents",
                format!("`{}` is listed twice", agents[i].0),
            ));
        }
        let random_split = match params.str("split").unwrap_or("standard") {
            "random" => Some((val_size, test_size)),
            _ => None,
        };
        Job::Label {
            agents,
            settings: LabelSettings {
                budget,
                classifier,
                cap,
                oracle_noise,
                oracle_cost,
                oracle: LabelOracle::Truth,
            },
            runs: int("runs", 10, 1, &mut issues),
            seed,
            random_split,
            sample: params.bool("sample").unwrap_or(false),
            file_oracle: file_oracle.then(|| FileOracleJob {
                timeout: Duration::try_from_secs_f64(oracle_timeout).unwrap_or_default(),
                poll: Duration::from_millis(oracle_poll as u64),
            }),
        }
    };
    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(Config {
        job,
        fields: GraphFields::from_params(params),
        dir: params.str("dir").map(String::from),
        prefix: params.str("prefix").unwrap_or("").to_string(),
        threads: params.int("threads").unwrap_or(0).max(0) as usize,
    })
}

impl StageFactory for GcbrStage {
    fn info(&self) -> KindInfo {
        use ParamKind::*;
        let opt = ParamSpec::optional;
        KindInfo {
            name: "gcbr",
            doc: "Class-balanced reinforced active learning (GCBR, GCBR++) on a graph record: \
                  mode: train trains a policy over many episodes (policy files with \
                  checkpoints, resumable); mode: label labels the graph with trained policies \
                  and the random, entropy and pagerank baselines, and writes learning curves, \
                  per-class label counts and a metrics JSON.",
            params: vec![
                opt(
                    "mode",
                    Choice(&["train", "label"]),
                    json!("label"),
                    "train a policy, or label with agents",
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
                    "node labels i64[nodes] (the oracle's ground truth)",
                ),
                opt(
                    "train_mask",
                    Field,
                    json!("train_mask"),
                    "read with the split; its nodes are candidates like any other",
                ),
                opt(
                    "val_mask",
                    Field,
                    json!("val_mask"),
                    "validation nodes (label mode, split: standard)",
                ),
                opt(
                    "test_mask",
                    Field,
                    json!("test_mask"),
                    "test nodes (label mode, split: standard)",
                ),
                opt(
                    "dir",
                    String,
                    json!(null),
                    "output folder inside the run folder (default: the entry's name); `{key}` is \
                     replaced by the record key",
                ),
                opt(
                    "prefix",
                    String,
                    json!(""),
                    "put before the name of every field written",
                ),
                opt(
                    "threads",
                    Int,
                    json!(0),
                    "threads for parallel episodes and runs (0: all cores)",
                ),
                opt(
                    "seed",
                    Int,
                    json!(0),
                    "seed of episodes, classifiers, oracle noise and random picks",
                ),
                opt(
                    "budget",
                    Int,
                    json!(null),
                    "labels per episode [train 35, label 140]",
                ),
                opt(
                    "hidden",
                    Int,
                    json!(null),
                    "classifier GCN hidden units [train 128, label 64]",
                ),
                opt("dropout", Float, json!(0.5), "classifier dropout"),
                opt("lr", Float, json!(0.01), "classifier Adam learning rate"),
                opt(
                    "weight_decay",
                    Float,
                    json!(5e-4),
                    "classifier L2 penalty on the first layer",
                ),
                opt(
                    "epochs_per_pick",
                    Int,
                    json!(1),
                    "classifier epochs after each pick, continuing from its weights",
                ),
                opt(
                    "final_epochs",
                    Int,
                    json!(null),
                    "classifier epochs after the last pick [train 35, label 100]",
                ),
                opt(
                    "cap",
                    Int,
                    json!(null),
                    "labels per class above which GCBR++ counts a class as over the cap [train 5, \
                     label 20]",
                ),
                opt(
                    "oracle",
                    Choice(&["truth", "file"]),
                    json!("truth"),
                    "label: who answers: the graph's `y`, or a person through answers.csv and \
                     queries.jsonl in `oracle_dir` (answers are shared by every run and agent)",
                ),
                opt(
                    "oracle_dir",
                    String,
                    json!(null),
                    "label, oracle: file: folder of answers.csv (`node,label` lines, the label \
                     a class id, `#` comments) and queries.jsonl, inside the run folder if \
                     relative; `{key}` is replaced by the record key [<dir>/oracle]",
                ),
                opt(
                    "oracle_timeout_s",
                    Float,
                    json!(null),
                    "label, oracle: file: seconds to wait for each answer before the record \
                     fails; running again resumes where it stopped (0: do not wait) [3600]",
                ),
                opt(
                    "oracle_poll_ms",
                    Int,
                    json!(null),
                    "label, oracle: file: milliseconds between checks of answers.csv while \
                     waiting [1000]",
                ),
                opt(
                    "oracle_noise",
                    Float,
                    json!(0.0),
                    "probability that the oracle answers a wrong label (oracle: truth)",
                ),
                opt(
                    "oracle_cost",
                    Float,
                    json!(1.0),
                    "cost of one oracle query (reported)",
                ),
                opt(
                    "val_size",
                    Int,
                    json!(500),
                    "validation nodes drawn per episode (train; label with split: random)",
                ),
                opt(
                    "test_size",
                    Int,
                    json!(1000),
                    "test nodes drawn per episode (train; label with split: random)",
                ),
                opt(
                    "variant",
                    Choice(&["gcbr", "gcbr++"]),
                    json!("gcbr"),
                    "train: GCBR, or GCBR++ (cap feature and punishment)",
                ),
                opt(
                    "episodes",
                    Int,
                    json!(4000),
                    "train: rounds of `parallel` episodes",
                ),
                opt(
                    "parallel",
                    Int,
                    json!(5),
                    "train: episodes per round, side by side",
                ),
                opt(
                    "update_every",
                    Int,
                    json!(7),
                    "train: steps between A2C updates",
                ),
                opt(
                    "gamma",
                    Float,
                    json!(0.9),
                    "train: discount of the TD target",
                ),
                opt(
                    "policy_lr",
                    Float,
                    json!(1e-3),
                    "train: Adam learning rate of actor and critic",
                ),
                opt(
                    "lr_decay",
                    Float,
                    json!(0.3),
                    "train: learning-rate factor at each milestone",
                ),
                opt(
                    "lr_milestones",
                    FloatList,
                    json!([1000, 2000, 3000]),
                    "train: rounds after which the learning rate decays",
                ),
                opt(
                    "alpha",
                    Float,
                    json!(0.5),
                    "train: weight of the macro-F1 gain against class diversity in the reward",
                ),
                opt(
                    "punishment",
                    Float,
                    json!(0.05),
                    "train, GCBR++: reward subtracted when the picked class exceeds the cap",
                ),
                opt(
                    "policy_hidden",
                    Int,
                    json!(8),
                    "train: hidden units of actor and critic layers",
                ),
                opt(
                    "checkpoint_every",
                    Int,
                    json!(100),
                    "train: write a policy file every this many rounds",
                ),
                opt(
                    "resume",
                    Path,
                    json!(null),
                    "train: continue from this policy file",
                ),
                opt(
                    "validate_every",
                    Int,
                    json!(0),
                    "train: every this many rounds, label the graph with the policy (labelling \
                     settings: hidden 64, 100 final epochs, cap 20) and keep the best as \
                     policy-best.json (0: never)",
                ),
                opt(
                    "validate_runs",
                    Int,
                    json!(3),
                    "train: labelling runs per validation",
                ),
                opt(
                    "validate_budget",
                    Int,
                    json!(140),
                    "train: labels per validation run",
                ),
                opt(
                    "agents",
                    FieldList,
                    json!(null),
                    "label: agent names, each a key of `policies` or random | entropy | pagerank",
                ),
                opt(
                    "policies",
                    NameMap,
                    json!(null),
                    "label: agent name -> policy file",
                ),
                opt(
                    "runs",
                    Int,
                    json!(10),
                    "label: runs per agent (seeds seed, seed+1, ...)",
                ),
                opt(
                    "split",
                    Choice(&["standard", "random"]),
                    json!("standard"),
                    "label: the record's val/test masks, or a seeded random split",
                ),
                opt(
                    "sample",
                    Bool,
                    json!(false),
                    "label: sample the policy's action instead of taking the most probable node",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let c = config(params)?;
        let fields = &c.fields;
        let mut plan = fields.read_node_labels(fields.read_edges(fields.read_x(Plan::default())));
        let needs_masks = matches!(
            &c.job,
            Job::Label {
                random_split: None,
                ..
            }
        );
        plan = fields.read_masks(plan, input, |m| needs_masks || input.contains_key(m));
        match &c.job {
            Job::Train { settings, .. } => {
                let per_round = FieldType::f32(Shape::fixed(&[settings.episodes]));
                let p = |f: &str| format!("{}{f}", c.prefix);
                plan = plan
                    .write(&p("episode_macro_f1"), per_round.clone())
                    .write(&p("episode_imbalance"), per_round.clone())
                    .write(&p("episode_reward"), per_round)
                    .write(&p("policy"), FieldType::Text);
                if matches!(
                    &c.job,
                    Job::Train {
                        validation: Some(_),
                        ..
                    }
                ) {
                    plan = plan.write(&p("best_policy"), FieldType::Text);
                }
            }
            Job::Label {
                agents, settings, ..
            } => {
                for (a, _) in agents {
                    let a = format!("{}{a}", c.prefix);
                    plan = plan.write(
                        &format!("{a}_curve"),
                        FieldType::f32(Shape::fixed(&[settings.budget])),
                    );
                    for m in [
                        "micro_f1",
                        "macro_f1",
                        "imbalance",
                        "label_std",
                        "micro_f1_std",
                        "macro_f1_std",
                        "imbalance_std",
                    ] {
                        plan = plan.write(&format!("{a}_{m}"), FieldType::Scalar);
                    }
                    plan = plan.write(
                        &format!("{a}_counts"),
                        FieldType::f32(Shape(Some(vec![Dim::Named("classes".into())]))),
                    );
                }
            }
        }
        Ok(plan)
    }

    fn check(&self, params: &Params) -> Result<(), Vec<PlanIssue>> {
        let c = config(params)?;
        match &c.job {
            Job::Label { agents, .. } => {
                for (name, spec) in agents {
                    if let AgentSpec::Policy(p) = spec {
                        Checkpoint::load(p)
                            .map_err(|e| vec![PlanIssue::param("policies", e).at_key(name)])?;
                    }
                }
            }
            Job::Train {
                resume: Some(p),
                settings,
                ..
            } => {
                let ck = Checkpoint::load(p).map_err(|e| vec![PlanIssue::param("resume", e)])?;
                Trainer::resume(ck, settings.clone())
                    .map_err(|e| vec![PlanIssue::param("resume", e)])?;
            }
            Job::Train { .. } => {}
        }
        Ok(())
    }

    fn build(&self, params: &Params, cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        let c = config(params).map_err(|i| i[0].message.clone())?;
        let policies = match &c.job {
            Job::Label { agents, .. } => agents
                .iter()
                .map(|(_, spec)| match spec {
                    AgentSpec::Policy(p) => Checkpoint::load(p).map(|ck| Some((p.clone(), ck))),
                    AgentSpec::Baseline(_) => Ok(None),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Job::Train { .. } => Vec::new(),
        };
        let out = cx
            .out_dir
            .join(c.dir.clone().unwrap_or_else(|| cx.name.clone()));
        let oracle_dir = params
            .str("oracle_dir")
            .map_or_else(|| out.join("oracle"), |d| cx.out_dir.join(d));
        Ok(Box::new(Gcbr {
            config: c,
            policies,
            out,
            oracle_dir,
        }))
    }
}

/// A running `gcbr` stage.
struct Gcbr {
    config: Config,
    /// The loaded policy of each agent (`None` for baselines), in agent order.
    policies: Vec<Option<(PathBuf, Checkpoint)>>,
    out: PathBuf,
    /// The file oracle's folder (`{key}` not yet replaced).
    oracle_dir: PathBuf,
}

fn threads(n: usize) -> usize {
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Mean and population standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn f32_vec(v: impl IntoIterator<Item = f64>) -> Value {
    Value::Tensor(Tensor::f32(
        Array1::from_iter(v.into_iter().map(|x| x as f32)).into_dyn(),
    ))
}

fn write_json(path: &Path, doc: &Json) -> Result<(), String> {
    let text = serde_json::to_string_pretty(doc).map_err(|e| e.to_string())? + "\n";
    latentflow_engine::exec::write_atomic(path, text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

impl Gcbr {
    fn out_dir(&self, key: &str) -> Result<PathBuf, String> {
        let dir = PathBuf::from(self.out.to_string_lossy().replace("{key}", key));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// The labelling settings of a record: with the file oracle, opened on its folder.
    fn label_settings(
        &self,
        key: &str,
        problem: &Problem,
        settings: &LabelSettings,
        file_oracle: Option<&FileOracleJob>,
    ) -> Result<LabelSettings, String> {
        let Some(job) = file_oracle else {
            return Ok(settings.clone());
        };
        let dir = PathBuf::from(self.oracle_dir.to_string_lossy().replace("{key}", key));
        let oracle = FileOracle::open(&dir, problem.classes)?
            .with_timeout(job.timeout)
            .with_poll(job.poll)
            .with_cost(settings.oracle_cost);
        tracing::info!(
            key,
            answers = %oracle.answers_file().display(),
            queries = %oracle.queries_file().display(),
            "labelling with answers from a person"
        );
        Ok(LabelSettings {
            oracle: LabelOracle::File(oracle),
            ..settings.clone()
        })
    }

    fn run(&self, mut r: Record) -> Result<Record, String> {
        let g = Graph::from_record(&r, &self.config.fields)?;
        let problem = Problem::new(&g)?;
        let dir = self.out_dir(&r.key)?;
        match &self.config.job {
            Job::Train {
                settings,
                checkpoint_every,
                resume,
                validation,
            } => self.train(
                &mut r,
                &problem,
                &dir,
                settings,
                *checkpoint_every,
                resume,
                validation.as_ref(),
            )?,
            Job::Label {
                agents,
                settings,
                runs,
                seed,
                random_split,
                sample,
                file_oracle,
            } => {
                let split = match random_split {
                    Some((val, test)) => {
                        EpisodeSplit::random(&problem, *val, *test, &mut Rng::new(*seed))?
                    }
                    None => EpisodeSplit::standard(&problem)?,
                };
                let settings =
                    self.label_settings(&r.key, &problem, settings, file_oracle.as_ref())?;
                self.label(
                    &mut r, &problem, &split, &dir, agents, &settings, *runs, *seed, *sample,
                )?
            }
        }
        Ok(r)
    }

    #[allow(clippy::too_many_arguments)]
    fn train(
        &self,
        r: &mut Record,
        problem: &Problem,
        dir: &Path,
        settings: &TrainSettings,
        checkpoint_every: usize,
        resume: &Option<PathBuf>,
        validation: Option<&ValidationJob>,
    ) -> Result<(), String> {
        // Validation labels the graph's standard validation part when it has one.
        let val_split = match validation {
            None => None,
            Some(_) => Some(match EpisodeSplit::standard(problem) {
                Ok(s) => s,
                Err(_) => EpisodeSplit::random(
                    problem,
                    settings.val_size,
                    settings.test_size,
                    &mut Rng::new(settings.seed),
                )?,
            }),
        };
        let best_path = dir.join("policy-best.json");
        let mut trainer = match resume {
            Some(p) => Trainer::resume(Checkpoint::load(p)?, settings.clone())?,
            None => Trainer::new(settings.clone()),
        };
        let threads = threads(self.config.threads);
        tracing::info!(
            key = %r.key,
            variant = settings.variant.name(),
            from = trainer.episodes_done(),
            to = settings.episodes,
            threads,
            "training a GCBR policy"
        );
        while trainer.episodes_done() < settings.episodes {
            let s = trainer.round(problem, threads)?;
            let done = trainer.episodes_done();
            if done % 10 == 0 || done == settings.episodes {
                tracing::info!(
                    episode = done,
                    val_macro_f1 = format!("{:.4}", s.val_macro_f1),
                    imbalance = format!("{:.3}", s.imbalance),
                    reward = format!("{:.4}", s.reward),
                    seconds = format!("{:.2}", s.seconds),
                    "round trained"
                );
            }
            if let (Some(v), Some(split)) = (validation, &val_split) {
                if done % v.every == 0 {
                    let got = trainer.validate(problem, split, &v.settings, v.runs, threads)?;
                    let best = trainer.best_validation().is_some_and(|b| b.episode == done);
                    tracing::info!(
                        episode = done,
                        val_macro_f1 = format!("{:.4}", got.val_macro_f1),
                        imbalance = format!("{:.3}", got.imbalance),
                        score = format!("{:.4}", got.score),
                        best,
                        "policy validated"
                    );
                    if best {
                        trainer.checkpoint.save(&best_path)?;
                    }
                }
            }
            if done % checkpoint_every == 0 && done < settings.episodes {
                trainer
                    .checkpoint
                    .save(&dir.join(format!("policy-{done:06}.json")))?;
            }
        }
        let policy = dir.join("policy.json");
        trainer.checkpoint.save(&policy)?;

        let h = &trainer.checkpoint.history;
        let lines: Vec<Json> = h.iter().map(|s| json!(s)).collect();
        write_json(
            &dir.join("training.json"),
            &json!({
                "variant": settings.variant.name(),
                "settings": settings,
                "rounds": lines,
                "validations": trainer.checkpoint.validations,
                "best": trainer.best_validation(),
            }),
        )?;
        let smooth = |f: &dyn Fn(usize) -> f64| -> Vec<(f64, f64)> {
            (0..h.len())
                .map(|i| {
                    let lo = i.saturating_sub(9);
                    let m = (lo..=i).map(f).sum::<f64>() / (i - lo + 1) as f64;
                    (i as f64 + 1.0, m)
                })
                .collect()
        };
        let mut series = vec![
            Series {
                points: smooth(&|i| h[i].val_macro_f1),
                band: None,
                colour: PALETTE[0],
            },
            Series {
                points: smooth(&|i| h[i].imbalance),
                band: None,
                colour: PALETTE[1],
            },
        ];
        let v = &trainer.checkpoint.validations;
        if v.len() > 1 {
            for (f, colour) in [
                (
                    &(|x: &Validation| x.val_macro_f1) as &dyn Fn(&Validation) -> f64,
                    PALETTE[2],
                ),
                (&|x: &Validation| x.imbalance, PALETTE[3]),
            ] {
                series.push(Series {
                    points: v.iter().map(|x| (x.episode as f64, f(x))).collect(),
                    band: None,
                    colour,
                });
            }
        }
        let mut names = vec![
            "episodes: val macro-F1".to_string(),
            "episodes: imbalance".into(),
        ];
        if v.len() > 1 {
            names.push("validation: macro-F1".into());
            names.push("validation: imbalance".into());
        }
        let labels = Labels {
            x: "training round".into(),
            y: "moving mean over 10 rounds".into(),
            names,
        };
        if let Some(img) = labelled_chart(&series, &labels) {
            save_png(&img, &dir.join("training.png"))?;
        }
        let last = h.len().saturating_sub(settings.episodes);
        let tail = &h[last..];
        let p = |f: &str| format!("{}{f}", self.config.prefix);
        let per_round = |f: &dyn Fn(&super::agent::RoundStats) -> f64| f32_vec(tail.iter().map(f));
        r.set(&p("episode_macro_f1"), per_round(&|s| s.val_macro_f1));
        r.set(&p("episode_imbalance"), per_round(&|s| s.imbalance));
        r.set(&p("episode_reward"), per_round(&|s| s.reward));
        let path = policy.to_string_lossy();
        r.set(&p("policy"), Value::Text(path.as_ref().into()));
        if validation.is_some() {
            let best = best_path.to_string_lossy();
            r.set(&p("best_policy"), Value::Text(best.as_ref().into()));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn label(
        &self,
        r: &mut Record,
        problem: &Problem,
        split: &EpisodeSplit,
        dir: &Path,
        agents: &[(String, AgentSpec)],
        settings: &LabelSettings,
        runs: usize,
        seed: u64,
        sample: bool,
    ) -> Result<(), String> {
        let made: Vec<Agent> = agents
            .iter()
            .zip(&self.policies)
            .map(|((_, spec), pol)| match (spec, pol) {
                (_, Some((_, ck))) => Agent::Policy {
                    actor: &ck.actor,
                    sample,
                },
                (AgentSpec::Baseline(b), None) => Agent::baseline(b).expect("a known baseline"),
                (AgentSpec::Policy(p), None) => unreachable!("policy {} was loaded", p.display()),
            })
            .collect();
        let jobs: Vec<(usize, usize)> = (0..agents.len())
            .flat_map(|a| (0..runs).map(move |k| (a, k)))
            .collect();
        let start = Instant::now();
        let mut results: Vec<Option<Result<LabelRun, String>>> = vec![None; jobs.len()];
        let n_threads = threads(self.config.threads).clamp(1, jobs.len().max(1));
        let next = std::sync::atomic::AtomicUsize::new(0);
        let slots: Vec<std::sync::Mutex<Option<Result<LabelRun, String>>>> = (0..jobs.len())
            .map(|_| std::sync::Mutex::new(None))
            .collect();
        std::thread::scope(|sc| {
            for _ in 0..n_threads {
                sc.spawn(|| loop {
                    let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(a, k)) = jobs.get(j) else { break };
                    let run = label(problem, split, &made[a], settings, seed + k as u64);
                    *slots[j].lock().unwrap_or_else(|e| e.into_inner()) = Some(run);
                });
            }
        });
        for (slot, out) in slots.into_iter().zip(&mut results) {
            *out = slot.into_inner().unwrap_or_else(|e| e.into_inner());
        }
        tracing::info!(
            key = %r.key,
            runs = jobs.len(),
            seconds = format!("{:.1}", start.elapsed().as_secs_f64()),
            "labelled"
        );

        let mut agents_doc = Map::new();
        let mut curves_doc = Map::new();
        let mut series = Vec::new();
        let mut names = Vec::new();
        for (ai, (name, spec)) in agents.iter().enumerate() {
            let runs_of: Vec<&LabelRun> = jobs
                .iter()
                .zip(&results)
                .filter(|((a, _), _)| *a == ai)
                .map(|(_, res)| match res {
                    Some(Ok(run)) => Ok(run),
                    Some(Err(e)) => Err(format!("agent `{name}`: {e}")),
                    None => Err(format!("agent `{name}`: a run did not finish")),
                })
                .collect::<Result<_, _>>()?;
            let stat = |f: &dyn Fn(&LabelRun) -> f64| {
                mean_std(&runs_of.iter().map(|x| f(x)).collect::<Vec<_>>())
            };
            let (micro, micro_sd) = stat(&|x| x.micro_f1);
            let (macro_, macro_sd) = stat(&|x| x.macro_f1);
            let (imb, imb_sd) = stat(&|x| x.imbalance);
            let (lstd, lstd_sd) = stat(&|x| x.label_std);
            let (acc, acc_sd) = stat(&|x| x.accuracy);
            let (secs, _) = stat(&|x| x.seconds);
            let (cost, _) = stat(&|x| x.cost);
            let counts: Vec<f64> = (0..problem.classes)
                .map(|c| {
                    mean_std(
                        &runs_of
                            .iter()
                            .map(|x| x.counts[c] as f64)
                            .collect::<Vec<_>>(),
                    )
                    .0
                })
                .collect();
            let steps = runs_of.iter().map(|x| x.curve.len()).min().unwrap_or(0);
            let curve: Vec<(f64, f64)> = (0..steps)
                .map(|t| mean_std(&runs_of.iter().map(|x| x.curve[t]).collect::<Vec<_>>()))
                .collect();
            let colour = PALETTE[ai % PALETTE.len()];
            names.push(name.clone());
            series.push(Series {
                points: curve
                    .iter()
                    .enumerate()
                    .map(|(t, c)| (t as f64 + 1.0, c.0))
                    .collect(),
                band: Some(curve.iter().map(|c| c.1).collect()),
                colour,
            });
            curves_doc.insert(
                name.clone(),
                json!({
                    "labels": (1..=steps).collect::<Vec<_>>(),
                    "mean": curve.iter().map(|c| c.0).collect::<Vec<_>>(),
                    "std": curve.iter().map(|c| c.1).collect::<Vec<_>>(),
                    "colour": colour,
                }),
            );
            let (kind, variant) = match (spec, &self.policies[ai]) {
                (_, Some((p, ck))) => (
                    json!({
                        "policy": p.display().to_string(),
                        "episodes_trained": ck.episodes_done,
                    }),
                    json!(ck.variant.name()),
                ),
                (AgentSpec::Baseline(b), None) => (json!({"baseline": b}), Json::Null),
                _ => (Json::Null, Json::Null),
            };
            let per_run: Vec<Json> = runs_of
                .iter()
                .enumerate()
                .map(|(k, x)| {
                    json!({
                        "seed": seed + k as u64,
                        "micro_f1": x.micro_f1,
                        "macro_f1": x.macro_f1,
                        "accuracy": x.accuracy,
                        "imbalance": x.imbalance,
                        "label_std": x.label_std,
                        "counts": x.counts,
                        "queries": x.queries,
                        "seconds": x.seconds,
                        "picks": x.picks,
                    })
                })
                .collect();
            agents_doc.insert(
                name.clone(),
                json!({
                    "agent": kind,
                    "variant": variant,
                    "micro_f1": {"mean": micro, "std": micro_sd},
                    "macro_f1": {"mean": macro_, "std": macro_sd},
                    "accuracy": {"mean": acc, "std": acc_sd},
                    "imbalance": {"mean": imb, "std": imb_sd},
                    "label_std": {"mean": lstd, "std": lstd_sd},
                    "counts_mean": counts,
                    "oracle_cost_mean": cost,
                    "seconds_per_run": secs,
                    "colour": colour,
                    "runs": per_run,
                }),
            );
            let field = format!("{}{name}", self.config.prefix);
            r.set(
                &format!("{field}_curve"),
                f32_vec(curve.iter().map(|c| c.0)),
            );
            for (m, v) in [
                ("micro_f1", micro),
                ("macro_f1", macro_),
                ("imbalance", imb),
                ("label_std", lstd),
                ("micro_f1_std", micro_sd),
                ("macro_f1_std", macro_sd),
                ("imbalance_std", imb_sd),
            ] {
                r.set(&format!("{field}_{m}"), Value::Scalar(v));
            }
            let counts_t = ArrayD::from_shape_vec(
                vec![counts.len()],
                counts.iter().map(|&c| c as f32).collect(),
            )
            .expect("shape");
            r.set(
                &format!("{field}_counts"),
                Value::Tensor(Tensor::f32(counts_t)),
            );
        }
        let mut metrics = json!({
                "graph": r.key.as_ref(),
                "budget": settings.budget,
                "runs": runs,
                "seed": seed,
                "classes": problem.classes,
                "pool": split.pool.len(),
                "val": split.val.len(),
                "test": split.test.len(),
                "classifier": settings.classifier,
                "cap": settings.cap,
                "oracle_noise": settings.oracle_noise,
                "std": "population standard deviation over runs",
                "agents": agents_doc,
        });
        if let LabelOracle::File(f) = &settings.oracle {
            let folder = f.answers_file().parent().unwrap_or(Path::new(""));
            metrics["oracle_dir"] = json!(folder.display().to_string());
        }
        write_json(&dir.join("metrics.json"), &metrics)?;
        write_json(&dir.join("curves.json"), &Json::Object(curves_doc))?;
        let labels = Labels {
            x: "labels used".into(),
            y: "test macro-F1 (mean, std band)".into(),
            names,
        };
        if let Some(img) = labelled_chart(&series, &labels) {
            save_png(&img, &dir.join("curves.png"))?;
        }
        Ok(())
    }
}

impl Stage for Gcbr {
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
