//! Class-balanced reinforced active learning (GCBR and GCBR++): episodes, the agents that pick
//! nodes in them (a trained policy or a baseline), labelling runs, and advantage actor-critic
//! training of the policy over many episodes.
//!
//! An [`Episode`] starts with no labelled node. Each step an agent picks a node of the
//! candidate pool (the labelled nodes of the graph outside the validation and test parts), the
//! [`Oracle`] answers its label, the GCN classifier trains [`ClassifierSettings::epochs_per_pick`]
//! more epochs on the labels so far ([`Retrainer`]), and the step's outcome ([`Pick`]) records
//! the validation macro-F1 before and after, the class diversity `1 / count(class)` of the
//! picked node, and whether its class now exceeds the cap. After the last pick (the budget)
//! the classifier trains [`ClassifierSettings::final_epochs`] more epochs, and that pick's
//! scores are measured after them.
//!
//! Training ([`Trainer`]) runs rounds of `parallel` episodes \[5\] in lock step (one round is
//! what the published code calls an episode). Every `update_every` steps \[7\] the rewards of the
//! new steps are formed, normalised, and one A2C update of the actor and the critic follows:
//!
//! - reward `r_t = alpha · (F1_t − F1_{t−1}) + (1 − alpha) · cd_t` \[alpha 0.5\], minus the
//!   punishment \[0.05\] for GCBR++ when the picked node's class count, the pick included,
//!   exceeds the cap \[5\] (as in the published code: the class was already at the cap);
//! - rewards are normalised per step index by a running mean and standard deviation (updated
//!   with each round's rewards at a rate of 0.05; the deviation is floored at 0.01 so that a
//!   round whose episodes happen to agree does not blow the rewards up);
//! - TD target `y = r + gamma · V(s')` \[gamma 0.9\], `y = r` after the last pick; critic loss
//!   `mean (V(s) − y)²`; actor loss `−(1/parallel) Σ (y − V(s)) · log π(a|s)`; Adam
//!   \[1e-3\] for both, multiplied by `lr_decay` \[0.3\] at each milestone round
//!   \[1000, 2000, 3000\].
//!
//! The episodes of a round run on `threads` threads. Every episode's randomness (its split,
//! classifier initialisation and dropout, actions) comes from `(seed, round, episode)`, so a
//! training run gives the same policy for any number of threads, and a run resumed from a
//! checkpoint continues exactly as an uninterrupted one.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use super::gcn::GcnInput;
use super::metrics::Scores;
use super::oracle::{FileOracle, Hint, Oracle, TruthOracle};
use super::pagerank::pagerank_feature;
use super::policy::{
    actor_loss_and_grad, critic_loss_and_grad, pool_softmax, ActorSample, Adam64, PolicyNet,
};
use super::retrain::{ClassifierSettings, Retrainer};
use super::state::{node_state, normalised_entropy, StateInputs};
use super::{Graph, Rng, Split};

/// Mixes words into one seed.
pub fn seed_of(parts: &[u64]) -> u64 {
    parts.iter().fold(0x51_7CC1_B727_220A, |acc, &p| {
        let mut z = acc ^ p.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// A uniform `f64` in `[0, 1)`.
fn uniform64(rng: &mut Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

// ---------------------------------------------------------------------------------------------
// The graph, prepared once.

/// What every episode on one graph shares: the classifier's inputs, ground truth, PageRank.
#[derive(Clone, Debug)]
pub struct Problem {
    /// Normalised adjacency and features (the classifier's and the policy's `Â`).
    pub input: GcnInput,
    /// Ground-truth labels (−1: none).
    pub truth: Vec<i64>,
    /// Number of classes.
    pub classes: usize,
    /// The PageRank state feature.
    pub pagerank: Vec<f32>,
    /// The graph's own split, if it has one.
    pub split: Option<Split>,
}

impl Problem {
    /// Prepares a graph with node labels.
    pub fn new(g: &Graph) -> Result<Problem, String> {
        let truth = g
            .labels
            .clone()
            .ok_or("the graph has no node labels (field `y` of i64[nodes])")?;
        if g.features.rows != g.num_nodes || truth.len() != g.num_nodes {
            return Err(format!(
                "{} nodes, but {} feature rows and {} labels",
                g.num_nodes,
                g.features.rows,
                truth.len()
            ));
        }
        let classes = g.num_classes();
        if classes < 2 {
            return Err("active learning needs at least two classes".into());
        }
        Ok(Problem {
            input: GcnInput::new(g),
            pagerank: pagerank_feature(g.num_nodes, &g.edges),
            truth,
            classes,
            split: g.split.clone(),
        })
    }

    /// Number of nodes.
    pub fn num_nodes(&self) -> usize {
        self.truth.len()
    }
}

/// Which nodes an episode may pick, and which score it.
#[derive(Clone, Debug, PartialEq)]
pub struct EpisodeSplit {
    /// Candidates for labelling.
    pub pool: Vec<usize>,
    /// Nodes scoring the reward.
    pub val: Vec<usize>,
    /// Nodes scoring the report.
    pub test: Vec<usize>,
}

impl EpisodeSplit {
    /// The graph's own validation and test parts; every other labelled node is a candidate
    /// (the graph's training part included: the agent chooses the training set).
    pub fn standard(p: &Problem) -> Result<Self, String> {
        let s = p
            .split
            .as_ref()
            .ok_or("the graph has no split (val_mask and test_mask); use split: random")?;
        let mut taken = vec![false; p.num_nodes()];
        s.val.iter().chain(&s.test).for_each(|&i| taken[i] = true);
        let pool = (0..p.num_nodes())
            .filter(|&i| !taken[i] && p.truth[i] >= 0)
            .collect();
        Ok(EpisodeSplit {
            pool,
            val: s.val.clone(),
            test: s.test.clone(),
        })
    }

    /// A random split of the labelled nodes: `test_size` for testing, `val_size` for
    /// validation, the rest candidates (the published training draws one per episode).
    pub fn random(
        p: &Problem,
        val_size: usize,
        test_size: usize,
        rng: &mut Rng,
    ) -> Result<Self, String> {
        let mut nodes: Vec<usize> = (0..p.num_nodes()).filter(|&i| p.truth[i] >= 0).collect();
        if nodes.len() <= val_size + test_size {
            return Err(format!(
                "{} labelled nodes leave no candidate after {val_size} validation and {test_size} \
                 test nodes",
                nodes.len()
            ));
        }
        rng.shuffle(&mut nodes);
        let mut test = nodes[..test_size].to_vec();
        let mut val = nodes[test_size..test_size + val_size].to_vec();
        let mut pool = nodes[test_size + val_size..].to_vec();
        test.sort_unstable();
        val.sort_unstable();
        pool.sort_unstable();
        Ok(EpisodeSplit { pool, val, test })
    }
}

// ---------------------------------------------------------------------------------------------
// Episodes.

/// What one pick did.
#[derive(Clone, Debug, PartialEq)]
pub struct Pick {
    /// The node picked.
    pub node: usize,
    /// The oracle's answer.
    pub answer: i64,
    /// `1 / count(answer)` after the pick.
    pub class_diversity: f64,
    /// Whether the answer's class count now exceeds the cap.
    pub over_cap: bool,
    /// Validation macro-F1 before the pick.
    pub val_macro_before: f64,
    /// Validation macro-F1 after retraining.
    pub val_macro_after: f64,
    /// Test scores after retraining.
    pub test: Scores,
    /// Whether this was the last pick (its scores follow the final epochs).
    pub last: bool,
}

/// One active-learning episode on a graph.
pub struct Episode<'p> {
    problem: &'p Problem,
    classifier: Retrainer,
    oracle: Box<dyn Oracle + 'p>,
    answers: Vec<i64>,
    picked: Vec<usize>,
    counts: Vec<usize>,
    candidate: Vec<bool>,
    split: EpisodeSplit,
    probs: Array2<f32>,
    embeddings: Array2<f32>,
    val_macro: f64,
    cap: usize,
    cap_feature: bool,
    budget: usize,
}

fn argmax_rows(probs: &Array2<f32>) -> Vec<i64> {
    probs
        .rows()
        .into_iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |b, (c, &p)| {
                    if p > b.1 {
                        (c, p)
                    } else {
                        b
                    }
                })
                .0 as i64
        })
        .collect()
}

impl<'p> Episode<'p> {
    /// An episode with no label yet: the classifier freshly initialised from `seed`.
    /// `cap` decides [`Pick::over_cap`]; `cap_feature` adds the GCBR++ state column.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        problem: &'p Problem,
        split: EpisodeSplit,
        classifier: &ClassifierSettings,
        oracle: Box<dyn Oracle + 'p>,
        seed: u64,
        budget: usize,
        cap: usize,
        cap_feature: bool,
    ) -> Self {
        let n = problem.num_nodes();
        let classifier = Retrainer::new(
            problem.input.features.cols,
            problem.classes,
            classifier,
            seed,
        );
        let (probs, embeddings) = classifier.predict(&problem.input);
        let mut candidate = vec![false; n];
        split.pool.iter().for_each(|&i| candidate[i] = true);
        let budget = budget.min(split.pool.len());
        let mut e = Episode {
            problem,
            classifier,
            oracle,
            answers: vec![-1; n],
            picked: Vec::new(),
            counts: vec![0; problem.classes],
            candidate,
            split,
            probs,
            embeddings,
            val_macro: 0.0,
            cap,
            cap_feature,
            budget,
        };
        e.val_macro = e.scores(&e.split.val.clone()).macro_f1;
        e
    }

    /// The graph.
    pub fn problem(&self) -> &'p Problem {
        self.problem
    }

    /// Labels the episode will ask for (the budget, or fewer when the pool is smaller).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Nodes picked so far, in order.
    pub fn picked(&self) -> &[usize] {
        &self.picked
    }

    /// Whether the budget is spent.
    pub fn done(&self) -> bool {
        self.picked.len() >= self.budget
    }

    /// Labelled nodes per class (the oracle's answers).
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// The classifier's current class probabilities.
    pub fn probs(&self) -> &Array2<f32> {
        &self.probs
    }

    /// The oracle's queries and their cost.
    pub fn oracle_use(&self) -> (usize, f64) {
        (self.oracle.queries(), self.oracle.cost())
    }

    /// The candidates still unlabelled, in increasing order.
    pub fn pool(&self) -> Vec<usize> {
        self.split
            .pool
            .iter()
            .copied()
            .filter(|&i| self.candidate[i])
            .collect()
    }

    /// The classifier's scores on `nodes` against the ground truth.
    pub fn scores(&self, nodes: &[usize]) -> Scores {
        Scores::of(&self.problem.truth, &argmax_rows(&self.probs), nodes)
    }

    /// Validation and test scores now.
    pub fn val_test(&self) -> (Scores, Scores) {
        let pred = argmax_rows(&self.probs);
        (
            Scores::of(&self.problem.truth, &pred, &self.split.val),
            Scores::of(&self.problem.truth, &pred, &self.split.test),
        )
    }

    /// The state `[nodes, 5]` (or 6 with the cap feature).
    pub fn state(&self) -> Array2<f32> {
        node_state(&StateInputs {
            probs: &self.probs,
            embeddings: &self.embeddings,
            answers: &self.answers,
            pagerank: &self.problem.pagerank,
            cap: self.cap_feature.then_some(self.cap),
        })
    }

    /// What a person answering about `node` may like to know: its neighbours (self loop aside)
    /// and the classifier's class for it.
    fn hint(&self, node: usize) -> Hint {
        let adj = &self.problem.input.adjacency;
        let mut best = (0, f32::NEG_INFINITY);
        for (c, &p) in self.probs.row(node).iter().enumerate() {
            if p > best.1 {
                best = (c, p);
            }
        }
        Hint {
            degree: Some((adj.indptr[node + 1] - adj.indptr[node]).saturating_sub(1)),
            prediction: Some(best),
        }
    }

    /// Labels `node`, retrains the classifier and scores it.
    pub fn pick(&mut self, node: usize) -> Result<Pick, String> {
        if self.done() {
            return Err(format!("the budget of {} labels is spent", self.budget));
        }
        if !self.candidate.get(node).copied().unwrap_or(false) {
            return Err(format!("node {node} is not an unlabelled candidate"));
        }
        let answer = self.oracle.query_with(node, &self.hint(node))?;
        if answer < 0 || answer as usize >= self.problem.classes {
            return Err(format!("the oracle answered {answer} for node {node}"));
        }
        self.answers[node] = answer;
        self.picked.push(node);
        self.candidate[node] = false;
        self.counts[answer as usize] += 1;
        let count = self.counts[answer as usize];

        let s = self.classifier.settings().clone();
        let input = &self.problem.input;
        self.classifier
            .fit(input, &self.answers, &self.picked, s.epochs_per_pick);
        let last = self.done();
        if last {
            self.classifier
                .fit(input, &self.answers, &self.picked, s.final_epochs);
        }
        (self.probs, self.embeddings) = self.classifier.predict(input);
        if self.probs.iter().any(|p| !p.is_finite()) {
            return Err("the classifier's outputs became non-finite".into());
        }
        let (val, test) = self.val_test();
        let before = std::mem::replace(&mut self.val_macro, val.macro_f1);
        Ok(Pick {
            node,
            answer,
            class_diversity: 1.0 / count as f64,
            over_cap: count > self.cap,
            val_macro_before: before,
            val_macro_after: val.macro_f1,
            test,
            last,
        })
    }
}

/// Smallest over largest class count (0 when some class has no label).
pub fn imbalance_ratio(counts: &[usize]) -> f64 {
    let max = counts.iter().copied().max().unwrap_or(0);
    let min = counts.iter().copied().min().unwrap_or(0);
    if max == 0 {
        0.0
    } else {
        min as f64 / max as f64
    }
}

/// Population standard deviation of the class counts.
pub fn count_std(counts: &[usize]) -> f64 {
    let n = counts.len().max(1) as f64;
    let mean = counts.iter().sum::<usize>() as f64 / n;
    (counts
        .iter()
        .map(|&c| (c as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt()
}

// ---------------------------------------------------------------------------------------------
// Agents.

/// Who picks the nodes.
#[derive(Clone, Copy, Debug)]
pub enum Agent<'a> {
    /// A trained actor: the most probable candidate (or a sample, with `sample`).
    Policy {
        /// The actor network.
        actor: &'a PolicyNet,
        /// Sample from the action distribution instead of taking its mode.
        sample: bool,
    },
    /// A uniformly random candidate.
    Random,
    /// The candidate with the most uncertain prediction (highest entropy).
    Entropy,
    /// The candidate with the highest PageRank.
    PageRank,
}

/// Names of the baseline agents.
pub const BASELINES: [&str; 3] = ["random", "entropy", "pagerank"];

impl Agent<'_> {
    /// A baseline by name.
    pub fn baseline(name: &str) -> Option<Agent<'static>> {
        match name {
            "random" => Some(Agent::Random),
            "entropy" => Some(Agent::Entropy),
            "pagerank" => Some(Agent::PageRank),
            _ => None,
        }
    }

    /// Whether the agent reads the GCBR++ state (a six-feature actor).
    pub fn cap_feature(&self) -> bool {
        matches!(self, Agent::Policy { actor, .. } if actor.features == 6)
    }

    /// Picks a candidate of `pool` (not empty).
    pub fn choose(&self, e: &Episode, pool: &[usize], rng: &mut Rng) -> usize {
        let best = |score: &dyn Fn(usize) -> f64| {
            pool.iter()
                .copied()
                .fold((pool[0], f64::NEG_INFINITY), |b, i| {
                    let s = score(i);
                    if s > b.1 {
                        (i, s)
                    } else {
                        b
                    }
                })
                .0
        };
        match *self {
            Agent::Random => pool[rng.below(pool.len())],
            Agent::PageRank => best(&|i| e.problem().pagerank[i] as f64),
            Agent::Entropy => {
                let h = normalised_entropy(e.probs());
                best(&|i| h[i] as f64)
            }
            Agent::Policy { actor, sample } => {
                let f = actor.forward(&e.problem().input.adjacency, &e.state());
                if sample {
                    pool[sample_index(&pool_softmax(&f.out, pool), rng)]
                } else {
                    best(&|i| f.out[i])
                }
            }
        }
    }
}

/// A draw from a discrete distribution.
fn sample_index(p: &[f64], rng: &mut Rng) -> usize {
    let u = uniform64(rng);
    let mut acc = 0.0;
    for (k, &v) in p.iter().enumerate() {
        acc += v;
        if u < acc {
            return k;
        }
    }
    p.len() - 1
}

// ---------------------------------------------------------------------------------------------
// Labelling a graph.

/// Settings of a labelling run.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelSettings {
    /// Labels to ask for.
    pub budget: usize,
    /// The classifier \[hidden 64, 100 final epochs\].
    pub classifier: ClassifierSettings,
    /// Cap on labels per class for the GCBR++ state feature \[20\].
    pub cap: usize,
    /// Probability that the oracle answers wrong.
    pub oracle_noise: f64,
    /// Cost of one query.
    pub oracle_cost: f64,
    /// Who answers.
    pub oracle: LabelOracle,
}

/// Who answers the queries of labelling runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum LabelOracle {
    /// The graph's labels, with [`LabelSettings::oracle_noise`].
    #[default]
    Truth,
    /// A person, through the files of a [`FileOracle`]. Each run asks its own
    /// [`FileOracle::share`], so every run, whatever its agent or seed, gets the same answer
    /// for a node.
    File(FileOracle),
}

impl Default for LabelSettings {
    fn default() -> Self {
        LabelSettings {
            budget: 140,
            classifier: ClassifierSettings::labelling(),
            cap: 20,
            oracle_noise: 0.0,
            oracle_cost: 1.0,
            oracle: LabelOracle::Truth,
        }
    }
}

/// The outcome of one labelling run.
#[derive(Clone, Debug, Serialize)]
pub struct LabelRun {
    /// Nodes picked, in order.
    pub picks: Vec<usize>,
    /// Test macro-F1 after each pick (the last after the final epochs).
    pub curve: Vec<f64>,
    /// Test micro-F1 at the end.
    pub micro_f1: f64,
    /// Test macro-F1 at the end.
    pub macro_f1: f64,
    /// Test accuracy at the end.
    pub accuracy: f64,
    /// Validation macro-F1 at the end.
    pub val_macro_f1: f64,
    /// Labels per class.
    pub counts: Vec<usize>,
    /// Smallest over largest class count.
    pub imbalance: f64,
    /// Standard deviation of the class counts.
    pub label_std: f64,
    /// Oracle queries.
    pub queries: usize,
    /// Their cost.
    pub cost: f64,
    /// Wall time of the run.
    pub seconds: f64,
}

/// Labels a graph with `agent` until the budget is spent. `seed` fixes the classifier, the
/// oracle's noise and the random agent. The picks also depend on the answers: with a file
/// oracle, the same seed and the same answers give the same run.
pub fn label(
    problem: &Problem,
    split: &EpisodeSplit,
    agent: &Agent,
    settings: &LabelSettings,
    seed: u64,
) -> Result<LabelRun, String> {
    let start = Instant::now();
    let oracle: Box<dyn Oracle + '_> = match &settings.oracle {
        LabelOracle::Truth => Box::new(TruthOracle::new(
            &problem.truth,
            problem.classes,
            settings.oracle_noise,
            seed_of(&[seed, 1]),
            settings.oracle_cost,
        )),
        LabelOracle::File(f) => Box::new(f.share()),
    };
    let mut e = Episode::new(
        problem,
        split.clone(),
        &settings.classifier,
        oracle,
        seed_of(&[seed, 2]),
        settings.budget,
        settings.cap,
        agent.cap_feature(),
    );
    let mut rng = Rng::new(seed_of(&[seed, 3]));
    let mut curve = Vec::with_capacity(e.budget());
    while !e.done() {
        let pool = e.pool();
        let node = agent.choose(&e, &pool, &mut rng);
        curve.push(e.pick(node)?.test.macro_f1);
    }
    let (val, test) = e.val_test();
    let counts = e.counts().to_vec();
    let (queries, cost) = e.oracle_use();
    Ok(LabelRun {
        picks: e.picked().to_vec(),
        curve,
        micro_f1: test.micro_f1,
        macro_f1: test.macro_f1,
        accuracy: test.accuracy,
        val_macro_f1: val.macro_f1,
        imbalance: imbalance_ratio(&counts),
        label_std: count_std(&counts),
        counts,
        queries,
        cost,
        seconds: start.elapsed().as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------------------------
// Training the policy.

/// GCBR (five state features, no punishment) or GCBR++ (the cap feature and the punishment).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Variant {
    /// Class-balanced reinforced active learning.
    #[serde(rename = "gcbr")]
    Gcbr,
    /// With the over-cap state feature and the punishment.
    #[serde(rename = "gcbr++")]
    GcbrPlusPlus,
}

impl Variant {
    /// By name: `gcbr` or `gcbr++`.
    pub fn parse(s: &str) -> Option<Variant> {
        match s {
            "gcbr" => Some(Variant::Gcbr),
            "gcbr++" => Some(Variant::GcbrPlusPlus),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Gcbr => "gcbr",
            Variant::GcbrPlusPlus => "gcbr++",
        }
    }

    /// State features the policy reads.
    pub fn features(self) -> usize {
        match self {
            Variant::Gcbr => 5,
            Variant::GcbrPlusPlus => 6,
        }
    }
}

/// Settings of policy training (defaults: the published ones).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// GCBR or GCBR++.
    pub variant: Variant,
    /// Rounds of `parallel` episodes to train \[4000\].
    pub episodes: usize,
    /// Episodes run side by side per round \[5\].
    pub parallel: usize,
    /// Labels per episode \[35\].
    pub budget: usize,
    /// Steps between A2C updates \[7\].
    pub update_every: usize,
    /// Discount of the TD target \[0.9\].
    pub gamma: f64,
    /// Adam learning rate of actor and critic \[1e-3\].
    pub lr: f64,
    /// Learning-rate factor at each milestone \[0.3\].
    pub lr_decay: f64,
    /// Rounds after which the learning rate decays \[1000, 2000, 3000\].
    pub lr_milestones: Vec<usize>,
    /// Weight of the macro-F1 gain against class diversity in the reward \[0.5\].
    pub alpha: f64,
    /// GCBR++: subtracted from the reward when the picked class exceeds the cap \[0.05\].
    pub punishment: f64,
    /// Labels per class above which a class counts as over the cap \[5\].
    pub cap: usize,
    /// Hidden units of the actor and critic layers \[8\].
    pub policy_hidden: usize,
    /// The classifier retrained in episodes \[hidden 128, 35 final epochs\].
    pub classifier: ClassifierSettings,
    /// Validation nodes drawn per episode \[500\].
    pub val_size: usize,
    /// Test nodes drawn per episode (kept out of the pool) \[1000\].
    pub test_size: usize,
    /// Rate of the running reward mean and deviation \[0.05\].
    pub norm_rate: f64,
    /// Probability that the oracle answers wrong \[0\].
    pub oracle_noise: f64,
    /// Seed of everything.
    pub seed: u64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            variant: Variant::Gcbr,
            episodes: 4000,
            parallel: 5,
            budget: 35,
            update_every: 7,
            gamma: 0.9,
            lr: 1e-3,
            lr_decay: 0.3,
            lr_milestones: vec![1000, 2000, 3000],
            alpha: 0.5,
            punishment: 0.05,
            cap: 5,
            policy_hidden: 8,
            classifier: ClassifierSettings::training(),
            val_size: 500,
            test_size: 1000,
            norm_rate: 0.05,
            oracle_noise: 0.0,
            seed: 0,
        }
    }
}

/// Running mean and variance of the rewards, per step index.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardNorm {
    /// Mean per step.
    pub mean: Vec<f64>,
    /// Variance per step.
    pub var: Vec<f64>,
    /// Whether the step has been seen.
    pub seen: Vec<bool>,
}

/// Smallest standard deviation rewards are divided by.
const MIN_REWARD_STD: f64 = 0.01;

impl RewardNorm {
    /// Updates step `t`'s statistics with this round's rewards and normalises them in place.
    pub fn normalise(&mut self, t: usize, rate: f64, values: &mut [f64]) {
        if self.mean.len() <= t {
            self.mean.resize(t + 1, 0.0);
            self.var.resize(t + 1, 0.0);
            self.seen.resize(t + 1, false);
        }
        let n = values.len().max(1) as f64;
        let bm = values.iter().sum::<f64>() / n;
        if self.seen[t] {
            self.mean[t] = (1.0 - rate) * self.mean[t] + rate * bm;
            let m = self.mean[t];
            let bv = values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n;
            self.var[t] = (1.0 - rate) * self.var[t] + rate * bv;
        } else {
            self.mean[t] = bm;
            self.var[t] = values.iter().map(|v| (v - bm).powi(2)).sum::<f64>() / n;
            self.seen[t] = true;
        }
        let sd = self.var[t].sqrt().max(MIN_REWARD_STD);
        values
            .iter_mut()
            .for_each(|v| *v = (*v - self.mean[t]) / sd);
    }
}

/// Figures of one training round (means over its parallel episodes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundStats {
    /// Round index (0-based).
    pub episode: usize,
    /// Validation macro-F1 after the final epochs.
    pub val_macro_f1: f64,
    /// Validation micro-F1 after the final epochs.
    pub val_micro_f1: f64,
    /// Imbalance ratio of the labelled set.
    pub imbalance: f64,
    /// Standard deviation of the class counts.
    pub label_std: f64,
    /// Mean reward before normalisation.
    pub reward: f64,
    /// Mean actor loss over the round's updates.
    pub actor_loss: f64,
    /// Mean critic loss over the round's updates.
    pub critic_loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Wall time.
    pub seconds: f64,
}

/// How well the policy labels the training graph at some point of its training: labelling
/// runs scored on a validation part, the way checkpoints are compared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// Rounds trained when validated.
    pub episode: usize,
    /// Mean validation macro-F1 of the runs.
    pub val_macro_f1: f64,
    /// Mean imbalance ratio of the runs.
    pub imbalance: f64,
    /// `alpha · val_macro_f1 + (1 − alpha) · imbalance`, the reward's trade-off.
    pub score: f64,
}

/// Identifies policy files.
pub const POLICY_FORMAT: &str = "latentflow-gcbr-policy";

/// A trained or partly trained policy: the networks, the optimisers, the reward statistics and
/// the history, everything needed to label with it or to resume its training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Always [`POLICY_FORMAT`].
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// GCBR or GCBR++.
    pub variant: Variant,
    /// Rounds trained.
    pub episodes_done: usize,
    /// The settings of the training.
    pub settings: TrainSettings,
    /// The actor.
    pub actor: PolicyNet,
    /// The critic.
    pub critic: PolicyNet,
    /// The actor's optimiser.
    pub actor_opt: Adam64,
    /// The critic's optimiser.
    pub critic_opt: Adam64,
    /// Reward statistics.
    pub reward_norm: RewardNorm,
    /// One entry per round trained.
    pub history: Vec<RoundStats>,
    /// Validation of the policy during training (see [`Trainer::validate`]), in order.
    #[serde(default)]
    pub validations: Vec<Validation>,
}

impl Checkpoint {
    /// Reads a policy file.
    pub fn load(path: &Path) -> Result<Checkpoint, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let doc: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
        if doc["format"] != POLICY_FORMAT || doc["version"] != 1 {
            return Err(format!(
                "{} is not a GCBR policy file: format {}, version {} (expected \
                 \"{POLICY_FORMAT}\", 1)",
                path.display(),
                doc["format"],
                doc["version"]
            ));
        }
        let c: Checkpoint = serde_json::from_value(doc)
            .map_err(|e| format!("{} is not a GCBR policy file: {e}", path.display()))?;
        c.actor
            .validate()
            .map_err(|e| format!("{}: actor: {e}", path.display()))?;
        c.critic
            .validate()
            .map_err(|e| format!("{}: critic: {e}", path.display()))?;
        if c.actor.features != c.variant.features() {
            return Err(format!(
                "{}: a {} policy reads {} features, but its actor takes {}",
                path.display(),
                c.variant.name(),
                c.variant.features(),
                c.actor.features
            ));
        }
        Ok(c)
    }

    /// Writes the policy file atomically (temporary name, then rename).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string(self).map_err(|e| e.to_string())? + "\n";
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        latentflow_engine::exec::write_atomic(path, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

/// One step of an episode, kept until the next update.
struct Step {
    state: Arc<Array2<f32>>,
    pool: Vec<usize>,
    action: usize,
    pick: Pick,
    next: Option<Arc<Array2<f32>>>,
}

/// An episode of a training round with its own random stream.
struct Runner<'p> {
    episode: Episode<'p>,
    rng: Rng,
    state: Arc<Array2<f32>>,
    steps: Vec<Step>,
}

impl Runner<'_> {
    /// Whether the episode has steps left before `until`.
    fn wants(&self, until: usize) -> bool {
        self.episode.picked().len() < until && !self.episode.done()
    }

    /// One step: the actor samples a node, the episode labels it.
    fn step(&mut self, actor: &PolicyNet) -> Result<(), String> {
        let adj = &self.episode.problem().input.adjacency;
        let state = self.state.clone();
        let pool = self.episode.pool();
        let f = actor.forward(adj, &state);
        let action = pool[sample_index(&pool_softmax(&f.out, &pool), &mut self.rng)];
        let pick = self.episode.pick(action)?;
        let next = (!pick.last).then(|| Arc::new(self.episode.state()));
        if let Some(n) = &next {
            self.state = n.clone();
        }
        self.steps.push(Step {
            state,
            pool,
            action,
            pick,
            next,
        });
        Ok(())
    }
}

/// Advances every runner to step `until`, on `threads` threads that take single steps of
/// whichever episode is free, so that 5 episodes keep 2 threads equally busy. Each episode's
/// steps depend only on its own state and random stream, so the order does not matter.
fn advance_all(
    runners: &mut [Runner],
    actor: &PolicyNet,
    until: usize,
    threads: usize,
) -> Result<(), String> {
    let threads = threads.clamp(1, runners.len().max(1));
    if threads == 1 {
        for r in runners.iter_mut() {
            while r.wants(until) {
                r.step(actor)?;
            }
        }
        return Ok(());
    }
    let cells: Vec<Mutex<&mut Runner>> = runners.iter_mut().map(Mutex::new).collect();
    let error: Mutex<Option<String>> = Mutex::new(None);
    let work = || loop {
        if error.lock().map_or(true, |e| e.is_some()) {
            return;
        }
        let (mut stepped, mut busy) = (false, false);
        for cell in &cells {
            match cell.try_lock() {
                Ok(mut r) if r.wants(until) => {
                    if let Err(e) = r.step(actor) {
                        if let Ok(mut slot) = error.lock() {
                            slot.get_or_insert(e);
                        }
                        return;
                    }
                    stepped = true;
                }
                Ok(_) => {}
                Err(std::sync::TryLockError::WouldBlock) => busy = true,
                Err(std::sync::TryLockError::Poisoned(_)) => {
                    if let Ok(mut slot) = error.lock() {
                        slot.get_or_insert("an episode thread panicked".into());
                    }
                    return;
                }
            }
        }
        if !stepped {
            if !busy {
                return;
            }
            std::thread::yield_now();
        }
    };
    std::thread::scope(|sc| {
        for _ in 1..threads {
            sc.spawn(work);
        }
        work();
    });
    match error.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(e),
        Err(_) => Err("an episode thread panicked".into()),
    }
}

/// Runs `f(index, item)` on every item, spread over `threads` scoped threads.
fn parallel<T: Send>(
    items: &mut [T],
    threads: usize,
    f: impl Fn(usize, &mut T) -> Result<(), String> + Sync,
) -> Result<(), String> {
    let threads = threads.clamp(1, items.len().max(1));
    let chunk = items.len().div_ceil(threads).max(1);
    let f = &f;
    std::thread::scope(|sc| {
        let handles: Vec<_> = items
            .chunks_mut(chunk)
            .enumerate()
            .map(|(c, part)| {
                sc.spawn(move || {
                    part.iter_mut()
                        .enumerate()
                        .try_for_each(|(i, x)| f(c * chunk + i, x))
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| "a validation thread panicked".to_string())?
        })
    })
}

/// Trains a policy round by round.
pub struct Trainer {
    /// Everything learned so far (what [`Checkpoint::save`] writes).
    pub checkpoint: Checkpoint,
}

impl Trainer {
    /// A fresh policy.
    pub fn new(settings: TrainSettings) -> Trainer {
        let mut rng = Rng::new(seed_of(&[settings.seed, 0xAC]));
        let h = settings.policy_hidden;
        let f = settings.variant.features();
        let actor = PolicyNet::new(f, [h, h], &mut rng);
        let critic = PolicyNet::new(f, [h, h], &mut rng);
        Trainer {
            checkpoint: Checkpoint {
                format: POLICY_FORMAT.into(),
                version: 1,
                variant: settings.variant,
                episodes_done: 0,
                actor_opt: Adam64::new(settings.lr, actor.len()),
                critic_opt: Adam64::new(settings.lr, critic.len()),
                actor,
                critic,
                reward_norm: RewardNorm::default(),
                history: Vec::new(),
                validations: Vec::new(),
                settings,
            },
        }
    }

    /// Continues a checkpoint's training under `settings` (which may ask for more rounds).
    pub fn resume(checkpoint: Checkpoint, settings: TrainSettings) -> Result<Trainer, String> {
        if checkpoint.variant != settings.variant {
            return Err(format!(
                "the checkpoint is a {} policy, but the settings ask for {}",
                checkpoint.variant.name(),
                settings.variant.name()
            ));
        }
        let h = settings.policy_hidden;
        if checkpoint.actor.hidden != [h, h] {
            return Err(format!(
                "the checkpoint's networks have hidden {:?}, the settings {h}",
                checkpoint.actor.hidden
            ));
        }
        let mut checkpoint = checkpoint;
        checkpoint.settings = settings;
        Ok(Trainer { checkpoint })
    }

    /// Rounds trained so far.
    pub fn episodes_done(&self) -> usize {
        self.checkpoint.episodes_done
    }

    /// The learning rate of round `r`.
    fn lr_at(&self, r: usize) -> f64 {
        let s = &self.checkpoint.settings;
        let passed = s.lr_milestones.iter().filter(|&&m| m <= r).count();
        s.lr * s.lr_decay.powi(passed as i32)
    }

    /// Trains one round of `parallel` episodes on `problem`, with `threads` threads.
    pub fn round(&mut self, problem: &Problem, threads: usize) -> Result<RoundStats, String> {
        let start = Instant::now();
        let round = self.checkpoint.episodes_done;
        let s = self.checkpoint.settings.clone();
        let lr = self.lr_at(round);
        self.checkpoint.actor_opt.lr = lr;
        self.checkpoint.critic_opt.lr = lr;
        let cap_feature = s.variant == Variant::GcbrPlusPlus;

        let mut runners = Vec::with_capacity(s.parallel);
        for b in 0..s.parallel {
            let seed = seed_of(&[s.seed, round as u64, b as u64]);
            let mut rng = Rng::new(seed);
            let split = EpisodeSplit::random(problem, s.val_size, s.test_size, &mut rng)?;
            let oracle =
                TruthOracle::new(&problem.truth, problem.classes, s.oracle_noise, seed, 1.0);
            let episode = Episode::new(
                problem,
                split,
                &s.classifier,
                Box::new(oracle),
                seed_of(&[seed, 1]),
                s.budget,
                s.cap,
                cap_feature,
            );
            let state = Arc::new(episode.state());
            runners.push(Runner {
                episode,
                rng,
                state,
                steps: Vec::new(),
            });
        }
        let budget = runners
            .iter()
            .map(|r| r.episode.budget())
            .min()
            .unwrap_or(0);

        let adj = &problem.input.adjacency;
        let (mut actor_losses, mut critic_losses, mut rewards) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut seg = 0;
        while seg < budget {
            let until = (seg + s.update_every.max(1)).min(budget);
            let actor = self.checkpoint.actor.clone();
            advance_all(&mut runners, &actor, until, threads)?;

            // Rewards, normalised per step index across the round's episodes.
            let steps: Vec<Vec<Step>> = runners
                .iter_mut()
                .map(|r| std::mem::take(&mut r.steps))
                .collect();
            let mut normalised: Vec<Vec<f64>> = vec![Vec::new(); steps.len()];
            for t in 0..until - seg {
                let mut vals: Vec<f64> = steps
                    .iter()
                    .map(|st| {
                        let p = &st[t].pick;
                        let mut r = s.alpha * (p.val_macro_after - p.val_macro_before)
                            + (1.0 - s.alpha) * p.class_diversity;
                        if cap_feature && p.over_cap {
                            r -= s.punishment;
                        }
                        r
                    })
                    .collect();
                rewards.extend_from_slice(&vals);
                self.checkpoint
                    .reward_norm
                    .normalise(seg + t, s.norm_rate, &mut vals);
                for (b, v) in vals.into_iter().enumerate() {
                    normalised[b].push(v);
                }
            }

            // TD targets and advantages from the critic before its update.
            let critic = &self.checkpoint.critic;
            let value = |st: &Array2<f32>| critic.forward(adj, st).value();
            let mut critic_samples = Vec::new();
            let mut actor_samples = Vec::new();
            for (b, st) in steps.iter().enumerate() {
                for (t, step) in st.iter().enumerate() {
                    let v = value(&step.state);
                    let target =
                        normalised[b][t] + step.next.as_ref().map_or(0.0, |n| s.gamma * value(n));
                    critic_samples.push((step.state.as_ref(), target));
                    actor_samples.push(ActorSample {
                        state: &step.state,
                        pool: &step.pool,
                        action: step.action,
                        advantage: target - v,
                    });
                }
            }
            let (cl, cg) = critic_loss_and_grad(critic, adj, &critic_samples);
            let (al, ag) =
                actor_loss_and_grad(&self.checkpoint.actor, adj, &actor_samples, s.parallel);
            let c = &mut self.checkpoint;
            c.critic_opt.step(&mut c.critic.theta, &cg);
            c.actor_opt.step(&mut c.actor.theta, &ag);
            actor_losses.push(al);
            critic_losses.push(cl);
            seg = until;
        }

        let n = runners.len().max(1) as f64;
        let mean = |f: &dyn Fn(&Runner) -> f64| runners.iter().map(f).sum::<f64>() / n;
        let mean_of = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let stats = RoundStats {
            episode: round,
            val_macro_f1: mean(&|r| r.episode.val_test().0.macro_f1),
            val_micro_f1: mean(&|r| r.episode.val_test().0.micro_f1),
            imbalance: mean(&|r| imbalance_ratio(r.episode.counts())),
            label_std: mean(&|r| count_std(r.episode.counts())),
            reward: mean_of(&rewards),
            actor_loss: mean_of(&actor_losses),
            critic_loss: mean_of(&critic_losses),
            lr,
            seconds: start.elapsed().as_secs_f64(),
        };
        if !stats.actor_loss.is_finite() || !stats.critic_loss.is_finite() {
            return Err(format!("round {round}: the A2C losses became non-finite"));
        }
        self.checkpoint.episodes_done += 1;
        self.checkpoint.history.push(stats.clone());
        Ok(stats)
    }

    /// Labels `problem` `runs` times (seeds 0, 1, ...) with the current actor taking its most
    /// probable node, scores the runs on `split`'s validation part, and records the result.
    /// The score weighs validation macro-F1 and imbalance ratio by the reward's `alpha`.
    pub fn validate(
        &mut self,
        problem: &Problem,
        split: &EpisodeSplit,
        settings: &LabelSettings,
        runs: usize,
        threads: usize,
    ) -> Result<Validation, String> {
        let agent = Agent::Policy {
            actor: &self.checkpoint.actor,
            sample: false,
        };
        let mut results: Vec<Option<Result<LabelRun, String>>> = vec![None; runs];
        parallel(&mut results, threads, |k, slot| {
            *slot = Some(label(problem, split, &agent, settings, k as u64));
            Ok(())
        })?;
        let runs_done: Vec<LabelRun> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err("a validation run did not finish".into())))
            .collect::<Result<_, _>>()?;
        let n = runs_done.len().max(1) as f64;
        let val_macro_f1 = runs_done.iter().map(|r| r.val_macro_f1).sum::<f64>() / n;
        let imbalance = runs_done.iter().map(|r| r.imbalance).sum::<f64>() / n;
        let alpha = self.checkpoint.settings.alpha;
        let v = Validation {
            episode: self.checkpoint.episodes_done,
            val_macro_f1,
            imbalance,
            score: alpha * val_macro_f1 + (1.0 - alpha) * imbalance,
        };
        self.checkpoint.validations.push(v.clone());
        Ok(v)
    }

    /// The best validation so far, if any.
    pub fn best_validation(&self) -> Option<&Validation> {
        self.checkpoint
            .validations
            .iter()
            .max_by(|a, b| a.score.total_cmp(&b.score))
    }
}
