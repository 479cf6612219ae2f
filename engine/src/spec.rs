//! The pipeline file format.
//!
//! These types are the documentation of the format: `latentflow schema` prints the JSON Schema
//! derived from them, and unknown keys are rejected everywhere. A pipeline has sources that
//! read records, stages that transform them, and sinks that write them. Each entry has a
//! unique `name`; `input` wires it to an upstream entry by that name, and defaults to the entry
//! listed just before it (so a straight pipeline needs no wiring at all).
//!
//! ```yaml
//! name: classify-digits
//! sources:
//!   - name: digits
//!     kind: npy
//!     params: {arrays: {pixels: ../data/digits/test-pixels.npy}}
//! stages:
//!   - name: mlp
//!     kind: onnx
//!     params: {model: ../models/digits-mlp, inputs: {pixels: pixels}, outputs: {probs: probs}}
//! sinks:
//!   - name: predictions
//!     kind: jsonl
//!     params: {path: predictions.jsonl, fields: [probs]}
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

/// A whole pipeline file.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Name of the pipeline; it also names the run's output folder (`runs/<name>`).
    pub name: String,
    /// What the pipeline does, for people reading the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Execution settings shared by every entry.
    #[serde(default)]
    pub settings: Settings,
    /// Entries that read records (files, generators).
    pub sources: Vec<SourceSpec>,
    /// Entries that transform records, in order.
    #[serde(default)]
    pub stages: Vec<StageSpec>,
    /// Entries that write records out.
    pub sinks: Vec<SinkSpec>,
}

/// Execution settings.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Records each source emits per epoch. An epoch is the unit of progress tracking: sinks
    /// write an epoch once every record of it has been processed.
    #[serde(default = "default_epoch_size")]
    pub epoch_size: usize,
    /// How many epochs may be in flight at once. Sources stop reading until older epochs
    /// complete, which bounds memory on inputs of any size.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Output folder, relative to the pipeline file; defaults to `runs/<name>` under the
    /// current directory. `--out` on the command line overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

fn default_epoch_size() -> usize {
    64
}

fn default_max_in_flight() -> usize {
    8
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            epoch_size: default_epoch_size(),
            max_in_flight: default_max_in_flight(),
            output: None,
        }
    }
}

/// A source entry.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Unique name; records carry it as the prefix of their keys.
    pub name: String,
    /// Which source to use (see `latentflow stages`).
    pub kind: String,
    /// The source's parameters.
    #[serde(default)]
    pub params: Map<String, Json>,
}

/// A stage entry: either a single stage (`kind` + `params`) or a bounded loop over a group
/// of stages (`loop`).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// Unique name; the metrics and the errors file refer to the stage by it.
    pub name: String,
    /// Which stage to use (see `latentflow stages`). Omitted for loops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The upstream entry whose records this stage receives; defaults to the entry before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// The stage's parameters.
    #[serde(default)]
    pub params: Map<String, Json>,
    /// Makes this entry a loop: its stages run again on each record until the record's
    /// budget of rounds is spent.
    #[serde(default, rename = "loop", skip_serializing_if = "Option::is_none")]
    pub loop_: Option<LoopSpec>,
}

/// A bounded loop.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoopSpec {
    /// Upper bound on the rounds any record makes.
    pub max_rounds: u32,
    /// An `int` field giving each record's own number of rounds (capped by `max_rounds`).
    /// Without it every record makes `max_rounds` rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    /// The stages of one round, in order. They must write back every field they read, with
    /// the same type, so that the next round can read it again.
    pub stages: Vec<StageSpec>,
}

/// A sink entry.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SinkSpec {
    /// Unique name.
    pub name: String,
    /// Which sink to use (see `latentflow stages`).
    pub kind: String,
    /// The upstream entry whose records are written; defaults to the last stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// The sink's parameters.
    #[serde(default)]
    pub params: Map<String, Json>,
}

/// The JSON Schema of pipeline files.
pub fn json_schema() -> Json {
    serde_json::to_value(schemars::schema_for!(PipelineSpec)).expect("schema serialises")
}
