//! The stage interface and the registry of stage kinds.
//!
//! A kind of stage is described by a factory: its parameters (checked by the validator before
//! anything runs), a `plan` step that states which fields it reads and what its output schema
//! is, and a `build` step that makes one instance per worker. Sources and sinks have factories
//! of their own with the same shape.
//!
//! Stages process batches and may finish them later: [`Completion::Pending`] lets a stage hand
//! work to another thread (an inference service) and keep accepting input, so single records
//! from many workers can be batched together. The pending work calls the [`Waker`] when it is
//! done, which schedules the stage's operator again.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value as Json};

use crate::value::{FieldType, Record, Schema};

/// The kind of value a parameter takes.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamKind {
    /// Any string.
    String,
    /// A file or folder path, relative to the pipeline file.
    Path,
    /// A whole number.
    Int,
    /// A number.
    Float,
    /// `true` or `false`.
    Bool,
    /// The name of a record field.
    Field,
    /// A list of record field names.
    FieldList,
    /// A mapping of names to names (for example model input → record field).
    NameMap,
    /// A list of numbers.
    FloatList,
    /// One of a fixed set of strings.
    Choice(&'static [&'static str]),
}

impl ParamKind {
    /// A short name for listings and errors.
    pub fn describe(&self) -> String {
        match self {
            ParamKind::String => "string".into(),
            ParamKind::Path => "path".into(),
            ParamKind::Int => "integer".into(),
            ParamKind::Float => "number".into(),
            ParamKind::Bool => "boolean".into(),
            ParamKind::Field => "field name".into(),
            ParamKind::FieldList => "list of field names".into(),
            ParamKind::NameMap => "mapping of names".into(),
            ParamKind::FloatList => "list of numbers".into(),
            ParamKind::Choice(c) => format!("one of {}", c.join(" | ")),
        }
    }

    /// The JSON Schema fragment for values of this kind.
    pub fn json_schema(&self) -> Json {
        use serde_json::json;
        match self {
            ParamKind::String | ParamKind::Path | ParamKind::Field => json!({"type": "string"}),
            ParamKind::Int => json!({"type": "integer"}),
            ParamKind::Float => json!({"type": "number"}),
            ParamKind::Bool => json!({"type": "boolean"}),
            ParamKind::FieldList => json!({"type": "array", "items": {"type": "string"}}),
            ParamKind::FloatList => json!({"type": "array", "items": {"type": "number"}}),
            ParamKind::NameMap => {
                json!({"type": "object", "additionalProperties": {"type": "string"}})
            }
            ParamKind::Choice(c) => json!({"enum": c}),
        }
    }

    /// Whether a JSON value has this kind.
    pub fn accepts(&self, v: &Json) -> bool {
        match self {
            ParamKind::String | ParamKind::Path | ParamKind::Field => v.is_string(),
            ParamKind::Int => v.is_i64() || v.is_u64(),
            ParamKind::Float => v.is_number(),
            ParamKind::Bool => v.is_boolean(),
            ParamKind::FieldList => v
                .as_array()
                .is_some_and(|a| a.iter().all(|x| x.is_string())),
            ParamKind::FloatList => v
                .as_array()
                .is_some_and(|a| a.iter().all(|x| x.is_number())),
            ParamKind::NameMap => v
                .as_object()
                .is_some_and(|m| m.values().all(|x| x.is_string())),
            ParamKind::Choice(c) => v.as_str().is_some_and(|s| c.contains(&s)),
        }
    }
}

/// One parameter of a stage kind.
#[derive(Clone, Debug)]
pub struct ParamSpec {
    /// Name as written in the pipeline file.
    pub name: &'static str,
    /// What values it takes.
    pub kind: ParamKind,
    /// The value used when the file does not give one; `None` makes it required.
    pub default: Option<Json>,
    /// One sentence for `latentflow stages` and the schema.
    pub doc: &'static str,
}

impl ParamSpec {
    /// A required parameter.
    pub fn required(name: &'static str, kind: ParamKind, doc: &'static str) -> Self {
        ParamSpec {
            name,
            kind,
            default: None,
            doc,
        }
    }

    /// An optional parameter with a default.
    pub fn optional(name: &'static str, kind: ParamKind, default: Json, doc: &'static str) -> Self {
        ParamSpec {
            name,
            kind,
            default: Some(default),
            doc,
        }
    }
}

/// What a stage kind is, for listings, the schema and the validator.
#[derive(Clone, Debug)]
pub struct KindInfo {
    /// The name used in `kind:`.
    pub name: &'static str,
    /// One or two sentences.
    pub doc: &'static str,
    /// Its parameters.
    pub params: Vec<ParamSpec>,
}

/// Parameters of one entry, with defaults filled in and paths resolved.
#[derive(Clone, Debug)]
pub struct Params {
    values: Map<String, Json>,
    base_dir: PathBuf,
}

impl Params {
    /// Parameters from a map, resolving relative paths against `base_dir`.
    pub fn new(values: Map<String, Json>, base_dir: impl Into<PathBuf>) -> Self {
        Params {
            values,
            base_dir: base_dir.into(),
        }
    }

    /// Fills in defaults for parameters that are absent.
    pub fn with_defaults(mut self, specs: &[ParamSpec]) -> Self {
        for spec in specs {
            if let (false, Some(d)) = (self.values.contains_key(spec.name), &spec.default) {
                self.values.insert(spec.name.to_string(), d.clone());
            }
        }
        self
    }

    /// The raw value.
    pub fn get(&self, name: &str) -> Option<&Json> {
        self.values.get(name).filter(|v| !v.is_null())
    }

    /// A string parameter.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.as_str())
    }

    /// A string parameter that the validator guarantees to be present.
    pub fn str_req(&self, name: &str) -> &str {
        self.str(name).unwrap_or_default()
    }

    /// A path parameter, resolved against the pipeline file's folder.
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        self.str(name).map(|s| self.resolve(s))
    }

    /// Resolves a path written in the pipeline file.
    pub fn resolve(&self, s: &str) -> PathBuf {
        let p = FsPath::new(s);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// An integer parameter.
    pub fn int(&self, name: &str) -> Option<i64> {
        self.get(name).and_then(|v| v.as_i64())
    }

    /// A number parameter.
    pub fn float(&self, name: &str) -> Option<f64> {
        self.get(name).and_then(|v| v.as_f64())
    }

    /// A boolean parameter.
    pub fn bool(&self, name: &str) -> Option<bool> {
        self.get(name).and_then(|v| v.as_bool())
    }

    /// A list of strings.
    pub fn strings(&self, name: &str) -> Vec<String> {
        self.get(name)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A list of numbers.
    pub fn floats(&self, name: &str) -> Vec<f64> {
        self.get(name)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default()
    }

    /// A mapping of names, in file order.
    pub fn name_map(&self, name: &str) -> Vec<(String, String)> {
        self.get(name)
            .and_then(|v| v.as_object())
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.into())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The folder relative paths are resolved against.
    pub fn base_dir(&self) -> &FsPath {
        &self.base_dir
    }
}

/// A problem found while planning an entry. `at` is the path below the entry
/// (e.g. `["params", "inputs", "pixels"]`) so the validator can point at the file position.
#[derive(Clone, Debug)]
pub struct PlanIssue {
    /// Where, relative to the entry.
    pub at: Vec<String>,
    /// The record field concerned, if any.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
    /// Point at the key that `at` ends with rather than at its value (for a misspelt name).
    pub on_key: bool,
}

impl PlanIssue {
    /// An issue about a parameter.
    pub fn param(name: &str, message: impl Into<String>) -> Self {
        PlanIssue {
            at: vec!["params".into(), name.into()],
            field: None,
            message: message.into(),
            hint: None,
            on_key: false,
        }
    }

    /// Points at the key itself (for a misspelt name) rather than at its value.
    pub fn on_key(mut self) -> Self {
        self.on_key = true;
        self
    }

    /// Adds a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Points deeper than the parameter itself (e.g. at one key of a mapping).
    pub fn at_key(mut self, key: &str) -> Self {
        self.at.push(key.into());
        self
    }
}

/// What a stage or sink needs from its input and what a stage produces.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Fields read, with the type required, and where in the entry each is named
    /// (path below the entry, for error positions).
    pub reads: Vec<FieldRead>,
    /// Fields added or replaced (stages only).
    pub writes: Schema,
    /// Fields removed (stages only).
    pub drops: Vec<String>,
}

/// One field a stage reads.
#[derive(Clone, Debug)]
pub struct FieldRead {
    /// The field's name.
    pub field: String,
    /// The type required.
    pub ty: FieldType,
    /// Where the field is named, relative to the entry.
    pub at: Vec<String>,
}

impl Plan {
    /// Declares a read of `field`, named at `params.<param>`.
    pub fn read(mut self, field: &str, ty: FieldType, param: &[&str]) -> Self {
        let mut at = vec!["params".to_string()];
        at.extend(param.iter().map(|s| s.to_string()));
        self.reads.push(FieldRead {
            field: field.into(),
            ty,
            at,
        });
        self
    }

    /// Declares a written field.
    pub fn write(mut self, field: &str, ty: FieldType) -> Self {
        self.writes.insert(field.into(), ty);
        self
    }

    /// The output schema given the input schema.
    pub fn apply(&self, input: &Schema) -> Schema {
        let mut out = input.clone();
        for d in &self.drops {
            out.remove(d);
        }
        out.extend(self.writes.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }
}

/// A record that could not be processed, with the reason.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    /// The record's key.
    pub key: Arc<str>,
    /// The record's position in its source.
    pub seq: u64,
    /// The entry that failed it.
    pub stage: String,
    /// Why.
    pub reason: String,
}

impl Failure {
    /// A failure of `record` in `stage`.
    pub fn of(record: &Record, stage: &str, reason: impl Into<String>) -> Self {
        Failure {
            key: record.key.clone(),
            seq: record.seq,
            stage: stage.into(),
            reason: reason.into(),
        }
    }
}

/// The result of processing one record.
pub type Outcome = Result<Record, Failure>;

/// Work a stage finishes later.
pub trait PendingBatch {
    /// The outcomes, once they are ready; `None` while the work goes on.
    fn poll(&mut self) -> Option<Vec<Outcome>>;
}

/// What [`Stage::process`] returns.
pub enum Completion {
    /// Done now.
    Ready(Vec<Outcome>),
    /// Finishes later; the pending work calls the context's waker when it is ready.
    Pending(Box<dyn PendingBatch>),
}

/// Wakes the operator that owns a pending batch; safe to call from any thread.
#[derive(Clone)]
pub struct Waker(Arc<dyn Fn() + Send + Sync>);

impl Waker {
    /// A waker that calls `f`.
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        Waker(Arc::new(f))
    }

    /// A waker that does nothing (for stages run outside a dataflow).
    pub fn noop() -> Self {
        Waker::new(|| {})
    }

    /// Schedules the operator.
    pub fn wake(&self) {
        (self.0)()
    }
}

/// What a stage instance knows about where it runs.
#[derive(Clone)]
pub struct StageContext {
    /// The entry's name.
    pub name: String,
    /// Index of this worker.
    pub worker: usize,
    /// Number of workers in the whole computation.
    pub peers: usize,
    /// Wakes this stage's operator.
    pub waker: Waker,
    /// The run's output folder, for stages that write artefacts of their own (computed once
    /// per run, like a factorisation), beside what the sinks write.
    pub out_dir: PathBuf,
}

/// A running stage (one instance per worker).
pub trait Stage {
    /// Processes a batch of records.
    fn process(&mut self, batch: Vec<Record>, cx: &StageContext) -> Completion;
}

/// A running sink (one instance per writer).
pub trait Sink {
    /// Writes records, given in source order within each epoch and epochs in order.
    fn write(&mut self, records: &[Record]) -> Result<(), String>;
    /// Completes the output (for example renames temporary files into place) and returns the
    /// files written.
    fn finish(&mut self) -> Result<Vec<PathBuf>, String>;
}

/// A readable input: records are produced by global position, and a worker reads only its
/// own share (`seq % parts == part`).
pub trait Source: Send {
    /// Number of records, when known in advance (for progress).
    fn len(&self) -> Option<u64>;
    /// Whether the source is known to be empty.
    fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }
    /// The records of one share, in increasing `seq`; a record that cannot be read is a
    /// failure, and reading goes on.
    fn read(&self, part: usize, parts: usize) -> Box<dyn Iterator<Item = Outcome> + Send + '_>;
}

/// Describes and builds one kind of stage.
pub trait StageFactory: Send + Sync {
    /// Name, doc and parameters.
    fn info(&self) -> KindInfo;
    /// The fields read and written, given the input schema; checks parameter values.
    fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>>;
    /// Extra checks that need files (models); run by `validate` and before a run.
    fn check(&self, _params: &Params) -> Result<(), Vec<PlanIssue>> {
        Ok(())
    }
    /// One instance for one worker.
    fn build(&self, params: &Params, cx: &StageContext) -> Result<Box<dyn Stage>, String>;
}

/// Describes and opens one kind of source.
pub trait SourceFactory: Send + Sync {
    /// Name, doc and parameters.
    fn info(&self) -> KindInfo;
    /// The schema of the records produced.
    fn plan(&self, params: &Params) -> Result<Schema, Vec<PlanIssue>>;
    /// Opens the source.
    fn open(&self, params: &Params) -> Result<Box<dyn Source>, String>;
}

/// Describes and builds one kind of sink.
pub trait SinkFactory: Send + Sync {
    /// Name, doc and parameters.
    fn info(&self) -> KindInfo;
    /// The fields the sink reads.
    fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>>;
    /// Builds the writer. `out_dir` is the run's output folder.
    fn build(&self, params: &Params, out_dir: &FsPath) -> Result<Box<dyn Sink>, String>;
}

/// The stage, source and sink kinds a pipeline may use.
#[derive(Clone, Default)]
pub struct Registry {
    stages: BTreeMap<String, Arc<dyn StageFactory>>,
    sources: BTreeMap<String, Arc<dyn SourceFactory>>,
    sinks: BTreeMap<String, Arc<dyn SinkFactory>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a stage kind (replacing one of the same name).
    pub fn add_stage(&mut self, f: impl StageFactory + 'static) -> &mut Self {
        self.stages.insert(f.info().name.to_string(), Arc::new(f));
        self
    }

    /// Adds a source kind.
    pub fn add_source(&mut self, f: impl SourceFactory + 'static) -> &mut Self {
        self.sources.insert(f.info().name.to_string(), Arc::new(f));
        self
    }

    /// Adds a sink kind.
    pub fn add_sink(&mut self, f: impl SinkFactory + 'static) -> &mut Self {
        self.sinks.insert(f.info().name.to_string(), Arc::new(f));
        self
    }

    /// A stage kind by name.
    pub fn stage(&self, name: &str) -> Option<&Arc<dyn StageFactory>> {
        self.stages.get(name)
    }

    /// A source kind by name.
    pub fn source(&self, name: &str) -> Option<&Arc<dyn SourceFactory>> {
        self.sources.get(name)
    }

    /// A sink kind by name.
    pub fn sink(&self, name: &str) -> Option<&Arc<dyn SinkFactory>> {
        self.sinks.get(name)
    }

    /// Names and descriptions of all stage kinds.
    pub fn stage_infos(&self) -> Vec<KindInfo> {
        self.stages.values().map(|f| f.info()).collect()
    }

    /// Names and descriptions of all source kinds.
    pub fn source_infos(&self) -> Vec<KindInfo> {
        self.sources.values().map(|f| f.info()).collect()
    }

    /// Names and descriptions of all sink kinds.
    pub fn sink_infos(&self) -> Vec<KindInfo> {
        self.sinks.values().map(|f| f.info()).collect()
    }
}
