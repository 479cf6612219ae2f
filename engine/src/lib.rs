//! The latentflow engine: declarative machine-learning pipelines on timely dataflow, with
//! models run by ONNX Runtime.
//!
//! A pipeline is read from a YAML file ([`spec`]), checked and planned before anything runs
//! ([`plan`]), and executed by timely workers ([`exec`]). Records ([`value::Record`]) are keyed
//! bags of typed fields. Stages, sources and sinks are pluggable ([`stage::Registry`]); the
//! built-in ones live in the `latentflow-stages` crate, and a program can register its own.
//! Models are packages of an ONNX file and a manifest ([`model`]), served by one batching
//! inference service per model and device ([`inference`]). Runs keep a journal of completed
//! epochs ([`journal`]), so a crashed or killed run can be resumed without redoing or losing
//! anything.
#![warn(missing_docs)]

pub mod build;
pub mod exec;
pub mod grad;
pub mod inference;
pub mod journal;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod runtime;
pub mod spec;
pub mod stage;
pub mod value;
pub mod yaml;

pub use exec::{run, RunError, RunOptions, RunSummary};
pub use plan::{plan_file, plan_text, Diagnostic, Diagnostics, Pipeline, PlanOptions};
pub use stage::{
    Completion, Failure, KindInfo, Outcome, ParamKind, ParamSpec, Params, PendingBatch, Plan,
    PlanIssue, Registry, Sink, SinkFactory, Source, SourceFactory, Stage, StageContext,
    StageFactory, Waker,
};
pub use value::{DType, Dim, FieldType, Graph, Record, Schema, Shape, Tensor, Value};
