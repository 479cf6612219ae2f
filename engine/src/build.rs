//! Building pipelines in code.
//!
//! [`PipelineBuilder`] produces the same [`PipelineSpec`] a file would, and plans it with the
//! same planner, so a pipeline built in Rust is checked exactly like one read from YAML and
//! can be saved as a file with [`PipelineBuilder::to_yaml`].
//!
//! ```no_run
//! use latentflow_engine::build::PipelineBuilder;
//! use latentflow_engine::{Registry, RunOptions, PlanOptions};
//! use serde_json::json;
//!
//! # fn demo(registry: &Registry) -> Result<(), Box<dyn std::error::Error>> {
//! let pipeline = PipelineBuilder::new("demo")
//!     .source("numbers", "synthetic", json!({"count": 100, "field": "x", "shape": [4]}))
//!     .stage("double", "scale", json!({"field": "x", "factor": 2.0}))
//!     .sink("out", "jsonl", json!({"path": "out.jsonl"}))
//!     .plan(registry, PlanOptions::default())?;
//! latentflow_engine::run(&pipeline, &RunOptions::local(2, "runs/demo"))?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json};

use crate::plan::{plan_text, Diagnostics, Pipeline, PlanOptions};
use crate::spec::{LoopSpec, PipelineSpec, Settings, SinkSpec, SourceSpec, StageSpec};
use crate::stage::Registry;

fn params(v: Json) -> Map<String, Json> {
    match v {
        Json::Object(m) => m,
        Json::Null => Map::new(),
        other => {
            let mut m = Map::new();
            m.insert("value".into(), other);
            m
        }
    }
}

/// Builds a pipeline in code.
#[derive(Clone, Debug)]
pub struct PipelineBuilder {
    spec: PipelineSpec,
    base_dir: PathBuf,
}

impl PipelineBuilder {
    /// A pipeline with no entries; relative paths resolve against the current directory.
    pub fn new(name: &str) -> Self {
        PipelineBuilder {
            spec: PipelineSpec {
                name: name.into(),
                description: None,
                settings: Settings::default(),
                sources: Vec::new(),
                stages: Vec::new(),
                sinks: Vec::new(),
            },
            base_dir: PathBuf::from("."),
        }
    }

    /// Resolves relative paths in parameters against `dir`.
    pub fn base_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.base_dir = dir.as_ref().to_path_buf();
        self
    }

    /// Changes the execution settings.
    pub fn settings(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        f(&mut self.spec.settings);
        self
    }

    /// Adds a source.
    pub fn source(mut self, name: &str, kind: &str, p: Json) -> Self {
        self.spec.sources.push(SourceSpec {
            name: name.into(),
            kind: kind.into(),
            params: params(p),
        });
        self
    }

    /// Adds a stage reading from the entry before it.
    pub fn stage(self, name: &str, kind: &str, p: Json) -> Self {
        self.stage_from(name, kind, None, p)
    }

    /// Adds a stage reading from a named entry.
    pub fn stage_from(mut self, name: &str, kind: &str, input: Option<&str>, p: Json) -> Self {
        self.spec.stages.push(StageSpec {
            name: name.into(),
            kind: Some(kind.into()),
            input: input.map(String::from),
            params: params(p),
            loop_: None,
        });
        self
    }

    /// Adds a loop whose round is the stages of `body` (built with [`PipelineBuilder::new`];
    /// only its stages are used).
    pub fn repeat(
        mut self,
        name: &str,
        max_rounds: u32,
        budget: Option<&str>,
        body: PipelineBuilder,
    ) -> Self {
        self.spec.stages.push(StageSpec {
            name: name.into(),
            kind: None,
            input: None,
            params: Map::new(),
            loop_: Some(LoopSpec {
                max_rounds,
                budget: budget.map(String::from),
                stages: body.spec.stages,
            }),
        });
        self
    }

    /// Adds a sink reading from the last stage (or the only source).
    pub fn sink(self, name: &str, kind: &str, p: Json) -> Self {
        self.sink_from(name, kind, None, p)
    }

    /// Adds a sink reading from a named entry.
    pub fn sink_from(mut self, name: &str, kind: &str, input: Option<&str>, p: Json) -> Self {
        self.spec.sinks.push(SinkSpec {
            name: name.into(),
            kind: kind.into(),
            input: input.map(String::from),
            params: params(p),
        });
        self
    }

    /// The pipeline as a YAML file's text.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(&self.spec).expect("pipeline specs serialise")
    }

    /// Validates and plans the pipeline.
    pub fn plan(&self, registry: &Registry, opts: PlanOptions) -> Result<Pipeline, Diagnostics> {
        let text = self.to_yaml();
        let label = PathBuf::from(format!("<pipeline `{}` built in code>", self.spec.name));
        let mut p = plan_text(&text, &label, &self.base_dir, registry, opts)?;
        p.file = None;
        Ok(p)
    }
}
