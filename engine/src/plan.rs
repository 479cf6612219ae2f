//! Validation and planning: everything that can be checked before a run starts.
//!
//! The planner reads a pipeline file, checks its syntax and structure (unknown keys, types),
//! resolves every `kind` against the registry, checks each entry's parameters, wires entries
//! by name, and walks the pipeline in order carrying the schema of the records at each point,
//! so that every field a stage reads is known to be produced upstream with a compatible type
//! and shape. Stages that use model packages check them too.
//!
//! It reports every problem it finds, not just the first, each with the file, line and
//! column, the entry, the field, and — where a name was mistyped — the nearest valid name.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use serde_json::Value as Json;

use crate::spec::{LoopSpec, PipelineSpec, StageSpec};
use crate::stage::{
    KindInfo, ParamKind, ParamSpec, Params, Plan, PlanIssue, Registry, SinkFactory, SourceFactory,
    StageFactory,
};
use crate::value::{FieldType, Schema};
use crate::yaml::{self, Path, Pos, SpanIndex};

/// One problem in a pipeline file.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    /// The pipeline file.
    pub file: PathBuf,
    /// Where in it.
    pub pos: Pos,
    /// The entry (source, stage or sink name) concerned, if any.
    pub entry: Option<String>,
    /// The record field or key concerned, if any.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: error: {}",
            self.file.display(),
            self.pos,
            self.message
        )?;
        if let Some(e) = &self.entry {
            write!(f, "\n  entry: {e}")?;
        }
        if let Some(x) = &self.field {
            write!(f, "\n  field: {x}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "\n  help: {h}")?;
        }
        Ok(())
    }
}

/// All problems found in a pipeline file.
#[derive(Clone, Debug)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// The nearest of `candidates` to `name`, if it is close enough to be a likely typo.
pub fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let all: Vec<&str> = candidates.into_iter().collect();
    match nearest(name, all.iter().copied()) {
        Some(n) => Some(format!("did you mean `{n}`?")),
        None if all.is_empty() => None,
        None if all.len() <= 12 => Some(format!("expected one of: {}", all.join(", "))),
        None => None,
    }
}

/// A source, ready to open.
#[derive(Clone)]
pub struct SourceNode {
    /// Entry name.
    pub name: String,
    /// Its factory.
    pub factory: Arc<dyn SourceFactory>,
    /// Parameters with defaults.
    pub params: Params,
    /// Schema of its records.
    pub schema: Schema,
}

/// A single stage, ready to build.
#[derive(Clone)]
pub struct StageNode {
    /// Entry name.
    pub name: String,
    /// The upstream entry.
    pub input: String,
    /// Its factory.
    pub factory: Arc<dyn StageFactory>,
    /// Parameters with defaults.
    pub params: Params,
    /// Schema of its output records.
    pub schema: Schema,
}

/// A stage entry: a stage or a loop.
#[derive(Clone)]
pub enum Node {
    /// One stage.
    Stage(StageNode),
    /// A bounded loop over a group of stages.
    Loop {
        /// Entry name.
        name: String,
        /// The upstream entry.
        input: String,
        /// Upper bound on rounds.
        max_rounds: u32,
        /// Per-record budget field.
        budget: Option<String>,
        /// The stages of one round.
        body: Vec<StageNode>,
        /// Schema of the records leaving the loop.
        schema: Schema,
    },
}

impl Node {
    /// Entry name.
    pub fn name(&self) -> &str {
        match self {
            Node::Stage(s) => &s.name,
            Node::Loop { name, .. } => name,
        }
    }

    /// The upstream entry.
    pub fn input(&self) -> &str {
        match self {
            Node::Stage(s) => &s.input,
            Node::Loop { input, .. } => input,
        }
    }
}

/// A sink, ready to build.
#[derive(Clone)]
pub struct SinkNode {
    /// Entry name.
    pub name: String,
    /// The upstream entry.
    pub input: String,
    /// Its factory.
    pub factory: Arc<dyn SinkFactory>,
    /// Parameters with defaults.
    pub params: Params,
}

/// A pipeline that passed validation.
#[derive(Clone)]
pub struct Pipeline {
    /// The parsed file.
    pub spec: PipelineSpec,
    /// Where it came from (for messages); `None` for pipelines built in code.
    pub file: Option<PathBuf>,
    /// Relative paths in parameters are resolved against this folder.
    pub base_dir: PathBuf,
    /// Sources in file order.
    pub sources: Vec<SourceNode>,
    /// Stage entries in file order.
    pub nodes: Vec<Node>,
    /// Sinks in file order.
    pub sinks: Vec<SinkNode>,
}

impl Pipeline {
    /// Names of all entries (sources, stages, loop bodies, sinks), in file order.
    pub fn entry_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.sources.iter().map(|s| s.name.clone()).collect();
        for n in &self.nodes {
            match n {
                Node::Stage(s) => names.push(s.name.clone()),
                Node::Loop { name, body, .. } => {
                    names.push(name.clone());
                    names.extend(body.iter().map(|s| s.name.clone()));
                }
            }
        }
        names.extend(self.sinks.iter().map(|s| s.name.clone()));
        names
    }
}

/// Collects diagnostics while planning.
struct Checker<'a> {
    file: PathBuf,
    spans: SpanIndex,
    registry: &'a Registry,
    base_dir: PathBuf,
    diags: Vec<Diagnostic>,
    check_models: bool,
    /// Fields written by entries that had errors: their types are guesses, so type checks
    /// downstream would only repeat the first error.
    poisoned: HashSet<String>,
}

impl Checker<'_> {
    fn report(
        &mut self,
        at: Pos,
        entry: Option<&str>,
        field: Option<&str>,
        msg: String,
        hint: Option<String>,
    ) {
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            pos: at,
            entry: entry.map(String::from),
            field: field.map(String::from),
            message: msg,
            hint,
        });
    }

    fn issue(&mut self, base: &Path, entry: &str, issue: PlanIssue) {
        let mut p = base.clone();
        for k in &issue.at {
            p = p.key(k);
        }
        let pos = if issue.on_key {
            self.spans.key(&p)
        } else {
            self.spans.value(&p)
        };
        self.report(
            pos,
            Some(entry),
            issue.field.as_deref(),
            issue.message,
            issue.hint,
        );
    }

    /// Reports a `kind` that is not registered for `role`, pointing out when it is a kind of
    /// another role (a sink listed under stages) or a likely typo.
    fn unknown_kind(&mut self, base: &Path, entry: &str, role: &str, kind: &str) {
        let pos = self.spans.value(&base.key("kind"));
        let reg = self.registry;
        let elsewhere: Vec<(&str, &str)> = [
            ("source", "sources", reg.source(kind).is_some()),
            ("stage", "stages", reg.stage(kind).is_some()),
            ("sink", "sinks", reg.sink(kind).is_some()),
        ]
        .into_iter()
        .filter(|(r, _, found)| *found && *r != role)
        .map(|(r, list, _)| (r, list))
        .collect();
        let hint = match elsewhere.as_slice() {
            [(r, list)] => Some(format!("`{kind}` is a {r}; list it under `{list}`")),
            [(r1, l1), (r2, l2)] => Some(format!(
                "`{kind}` is a {r1} and a {r2}; list it under `{l1}` or `{l2}`"
            )),
            _ => {
                let infos = match role {
                    "source" => reg.source_infos(),
                    "sink" => reg.sink_infos(),
                    _ => reg.stage_infos(),
                };
                did_you_mean(kind, infos.iter().map(|i| i.name))
            }
        };
        self.report(
            pos,
            Some(entry),
            None,
            format!("unknown {role} kind `{kind}`"),
            hint,
        );
    }

    /// Checks parameter names and types against the kind's declaration.
    fn check_params(
        &mut self,
        base: &Path,
        entry: &str,
        info: &KindInfo,
        raw: &serde_json::Map<String, Json>,
    ) -> Params {
        let names: Vec<&str> = info.params.iter().map(|p| p.name).collect();
        for (k, v) in raw {
            let at = base.key("params").key(k);
            match info.params.iter().find(|p| p.name == k) {
                None => {
                    let hint = did_you_mean(k, names.iter().copied());
                    let pos = self.spans.key(&at);
                    self.report(
                        pos,
                        Some(entry),
                        Some(k),
                        format!("`{}` has no parameter `{k}`", info.name),
                        hint,
                    );
                }
                Some(spec) if !v.is_null() && !spec.kind.accepts(v) => {
                    let pos = self.spans.value(&at);
                    let (wanted, hint) = match (&spec.kind, v.as_str()) {
                        (ParamKind::Choice(options), Some(_)) => {
                            (format!("one of {}", options.join(", ")), None)
                        }
                        (kind, _) => (with_article(&kind.describe()), None),
                    };
                    self.report(
                        pos,
                        Some(entry),
                        Some(k),
                        format!(
                            "parameter `{k}` of `{}` must be {wanted}, found {}",
                            info.name,
                            describe_json(v)
                        ),
                        hint.or_else(|| Some(spec.doc.to_string())),
                    );
                }
                Some(_) => {}
            }
        }
        for spec in info.params.iter().filter(|p| p.default.is_none()) {
            if raw.get(spec.name).is_none_or(|v| v.is_null()) {
                let pos = self.spans.key(base);
                let at = if raw.is_empty() {
                    pos
                } else {
                    self.spans.key(&base.key("params"))
                };
                self.report(
                    at,
                    Some(entry),
                    Some(spec.name),
                    format!(
                        "`{}` needs the parameter `{}` ({})",
                        info.name,
                        spec.name,
                        spec.kind.describe()
                    ),
                    Some(spec.doc.to_string()),
                );
            }
        }
        Params::new(raw.clone(), self.base_dir.clone()).with_defaults(&info.params)
    }

    fn check_reads(
        &mut self,
        base: &Path,
        entry: &str,
        plan: &Plan,
        input: &Schema,
        upstream: &str,
    ) {
        for r in &plan.reads {
            let mut p = base.clone();
            for k in &r.at {
                p = p.key(k);
            }
            let pos = self.spans.value(&p);
            match input.get(&r.field) {
                None => {
                    let hint = did_you_mean(&r.field, input.keys().map(|s| s.as_str()))
                        .or_else(|| Some(format!("`{upstream}` produces no fields")));
                    self.report(
                        pos,
                        Some(entry),
                        Some(&r.field),
                        format!(
                            "reads field `{}`, which `{upstream}` does not produce",
                            r.field
                        ),
                        hint,
                    );
                }
                Some(ty) if !ty.satisfies(&r.ty) && !self.poisoned.contains(&r.field) => {
                    self.report(
                        pos,
                        Some(entry),
                        Some(&r.field),
                        format!(
                            "field `{}` is {ty} upstream, but `{entry}` needs {}",
                            r.field, r.ty
                        ),
                        None,
                    );
                }
                Some(_) => {}
            }
        }
    }

    /// Plans one stage entry; returns its node and output schema.
    fn plan_stage(
        &mut self,
        base: &Path,
        spec: &StageSpec,
        input: &str,
        schema: &Schema,
    ) -> Option<StageNode> {
        let kind = spec.kind.as_deref()?;
        let Some(factory) = self.registry.stage(kind).cloned() else {
            self.unknown_kind(base, &spec.name, "stage", kind);
            return None;
        };
        let info = factory.info();
        let n = self.diags.len();
        let params = self.check_params(base, &spec.name, &info, &spec.params);
        if self.diags.len() > n {
            return None;
        }
        match factory.plan(&params, schema) {
            Ok(plan) => {
                // A model that does not match its manifest makes every type derived from the
                // manifest suspect: report the model and skip the field checks.
                let model_issues = if self.check_models {
                    factory.check(&params).err()
                } else {
                    None
                };
                match model_issues {
                    Some(issues) => {
                        for i in issues {
                            self.issue(base, &spec.name, i);
                        }
                    }
                    None => self.check_reads(base, &spec.name, &plan, schema, input),
                }
                if self.diags.len() > n {
                    self.poisoned.extend(plan.writes.keys().cloned());
                }
                Some(StageNode {
                    name: spec.name.clone(),
                    input: input.to_string(),
                    factory,
                    params,
                    schema: plan.apply(schema),
                })
            }
            Err(issues) => {
                for i in issues {
                    self.issue(base, &spec.name, i);
                }
                None
            }
        }
    }

    fn plan_loop(
        &mut self,
        base: &Path,
        spec: &StageSpec,
        l: &LoopSpec,
        input: &str,
        schema: &Schema,
    ) -> Option<Node> {
        let lbase = base.key("loop");
        if l.max_rounds == 0 {
            let pos = self.spans.value(&lbase.key("max_rounds"));
            self.report(
                pos,
                Some(&spec.name),
                None,
                "`max_rounds` must be at least 1".into(),
                None,
            );
        }
        if let Some(b) = &l.budget {
            let pos = self.spans.value(&lbase.key("budget"));
            match schema.get(b) {
                Some(FieldType::Int) => {}
                Some(t) => self.report(
                    pos,
                    Some(&spec.name),
                    Some(b),
                    format!("the budget field `{b}` is {t}; it must be an int"),
                    None,
                ),
                None => {
                    let hint = did_you_mean(b, schema.keys().map(|s| s.as_str()));
                    self.report(
                        pos,
                        Some(&spec.name),
                        Some(b),
                        format!("the budget field `{b}` is not produced by `{input}`"),
                        hint,
                    );
                }
            }
        }
        if l.stages.is_empty() {
            let pos = self.spans.value(&lbase.key("stages"));
            self.report(
                pos,
                Some(&spec.name),
                None,
                "a loop needs at least one stage".into(),
                None,
            );
            return None;
        }
        let mut body = Vec::new();
        let mut current = schema.clone();
        let mut prev = input.to_string();
        let mut ok = true;
        for (j, s) in l.stages.iter().enumerate() {
            let sbase = lbase.key("stages").index(j);
            if s.loop_.is_some() {
                let pos = self.spans.key(&sbase.key("loop"));
                self.report(
                    pos,
                    Some(&s.name),
                    None,
                    "loops cannot be nested".into(),
                    Some("move the inner loop out, after this one".into()),
                );
                ok = false;
                continue;
            }
            if !self.check_kind_present(&sbase, s) {
                ok = false;
                continue;
            }
            let upstream = match &s.input {
                Some(i)
                    if body.iter().any(|b: &StageNode| &b.name == i) || (j == 0 && i == input) =>
                {
                    i.clone()
                }
                Some(i) => {
                    let pos = self.spans.value(&sbase.key("input"));
                    let names: Vec<&str> = body.iter().map(|b| b.name.as_str()).collect();
                    self.report(
                        pos,
                        Some(&s.name),
                        None,
                        format!("`{i}` is not an earlier stage of loop `{}`", spec.name),
                        did_you_mean(i, names),
                    );
                    ok = false;
                    continue;
                }
                None => prev.clone(),
            };
            match self.plan_stage(&sbase, s, &upstream, &current) {
                Some(node) => {
                    current = node.schema.clone();
                    prev = node.name.clone();
                    body.push(node);
                }
                None => ok = false,
            }
        }
        if !ok {
            return None;
        }
        for (field, ty) in schema {
            match current.get(field) {
                Some(t) if t.satisfies(ty) => {}
                other => {
                    let pos = self.spans.key(&lbase.key("stages"));
                    let found = other
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "dropped".into());
                    self.report(
                        pos,
                        Some(&spec.name),
                        Some(field),
                        format!("field `{field}` enters the loop as {ty} but leaves a round as {found}"),
                        Some("the stages of a loop must hand every field to the next round unchanged in type".into()),
                    );
                    return None;
                }
            }
        }
        Some(Node::Loop {
            name: spec.name.clone(),
            input: input.to_string(),
            max_rounds: l.max_rounds,
            budget: l.budget.clone(),
            body,
            schema: current,
        })
    }

    fn check_kind_present(&mut self, base: &Path, s: &StageSpec) -> bool {
        match (&s.kind, &s.loop_) {
            (Some(_), Some(_)) => {
                let pos = self.spans.key(&base.key("loop"));
                self.report(
                    pos,
                    Some(&s.name),
                    None,
                    "an entry is either a stage (`kind`) or a loop (`loop`), not both".into(),
                    None,
                );
                false
            }
            (None, None) => {
                let pos = self.spans.value(base);
                self.report(
                    pos,
                    Some(&s.name),
                    None,
                    "this stage has no `kind`".into(),
                    Some(
                        "add `kind: <stage kind>` (see `latentflow stages`) or a `loop:` block"
                            .into(),
                    ),
                );
                false
            }
            _ => true,
        }
    }
}

fn with_article(noun: &str) -> String {
    let vowel = noun.chars().next().is_some_and(|c| "aeiou".contains(c));
    format!("{} {noun}", if vowel { "an" } else { "a" })
}

/// A JSON value as a message shows it: its kind, and short scalars themselves.
fn describe_json(v: &Json) -> String {
    match v {
        Json::String(s) if s.chars().count() <= 40 => format!("the string `{s}`"),
        Json::Number(n) => format!("{} `{n}`", json_kind(v)),
        Json::Bool(b) => format!("`{b}`"),
        _ => json_kind(v).to_string(),
    }
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "a mapping",
    }
}

/// Converts a serde error path into a document path.
fn serde_path(p: &serde_path_to_error::Path) -> Path {
    let mut out = Path::root();
    for seg in p.iter() {
        out = match seg {
            serde_path_to_error::Segment::Seq { index } => out.index(*index),
            serde_path_to_error::Segment::Map { key } => out.key(key),
            serde_path_to_error::Segment::Enum { variant } => out.key(variant),
            serde_path_to_error::Segment::Unknown => out,
        };
    }
    out
}

/// Names between backquotes in a serde message (`unknown field `x`, expected one of `a`, `b``).
fn backquoted(msg: &str) -> Vec<&str> {
    msg.split('`').skip(1).step_by(2).collect()
}

fn entry_at(spec_json: &Json, path: &Path) -> Option<String> {
    use crate::yaml::Seg;
    let (Some(Seg::Key(list)), Some(Seg::Index(i))) = (path.0.first(), path.0.get(1)) else {
        return None;
    };
    spec_json
        .get(list)?
        .get(i)?
        .get("name")?
        .as_str()
        .map(String::from)
}

/// Options for [`plan_file`] and [`plan_text`].
#[derive(Clone, Copy, Debug)]
pub struct PlanOptions {
    /// Load model packages and compare them with their manifests (needs ONNX Runtime).
    pub check_models: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions { check_models: true }
    }
}

/// Reads, validates and plans a pipeline file.
pub fn plan_file(
    path: &FsPath,
    registry: &Registry,
    opts: PlanOptions,
) -> Result<Pipeline, Diagnostics> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Diagnostics(vec![Diagnostic {
            file: path.to_path_buf(),
            pos: Pos { line: 1, col: 1 },
            entry: None,
            field: None,
            message: format!("cannot read the pipeline file: {e}"),
            hint: Some("check the path; pipeline files live in `pipelines/`".into()),
        }])
    })?;
    let base = path.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    plan_text(&text, path, &base, registry, opts)
}

/// Validates and plans pipeline text; `file` names it in messages and `base_dir` resolves
/// relative paths.
pub fn plan_text(
    text: &str,
    file: &FsPath,
    base_dir: &FsPath,
    registry: &Registry,
    opts: PlanOptions,
) -> Result<Pipeline, Diagnostics> {
    let diag = |pos: Pos,
                entry: Option<String>,
                field: Option<String>,
                message: String,
                hint: Option<String>| {
        Diagnostics(vec![Diagnostic {
            file: file.to_path_buf(),
            pos,
            entry,
            field,
            message,
            hint,
        }])
    };
    let (json, spans) = yaml::parse(text).map_err(|e| {
        let hint = if let Some(key) = e.message.strip_prefix("duplicate key ") {
            format!("remove one of the two {key} keys")
        } else if e.message.contains("one YAML document") {
            "remove the `---` line and everything after it, or move it to a file of its own".into()
        } else {
            "check indentation and brackets near this position".into()
        };
        diag(
            e.pos,
            None,
            None,
            format!("invalid YAML: {}", e.message),
            Some(hint),
        )
    })?;
    if !json.is_object() {
        return Err(diag(
            Pos { line: 1, col: 1 },
            None,
            None,
            "a pipeline file must be a mapping with `name`, `sources`, `stages` and `sinks`".into(),
            None,
        ));
    }
    let spec: PipelineSpec = serde_path_to_error::deserialize(&json).map_err(|e| {
        let path = serde_path(e.path());
        let msg = e.inner().to_string();
        let names = backquoted(&msg);
        let entry = entry_at(&json, &path);
        if msg.starts_with("unknown field") {
            let unknown = names.first().copied().unwrap_or_default();
            let path = if path.0.last() == Some(&crate::yaml::Seg::Key(unknown.to_string())) {
                path
            } else {
                path.key(unknown)
            };
            let hint = did_you_mean(unknown, names.iter().skip(1).copied());
            diag(
                spans.key(&path),
                entry,
                Some(unknown.to_string()),
                format!("unknown key `{unknown}` in {}", describe_parent(&path)),
                hint,
            )
        } else if msg.starts_with("missing field") {
            let missing = names.first().copied().unwrap_or_default();
            diag(
                spans.value(&path),
                entry,
                Some(missing.to_string()),
                format!(
                    "{} needs the key `{missing}`",
                    describe_parent(&path.key(missing))
                ),
                None,
            )
        } else if let Some(rest) = msg.strip_prefix("invalid type: ") {
            // serde says "invalid type: string \"many\", expected usize".
            let (found, expected) = rest
                .split_once(", expected ")
                .unwrap_or((rest, "another type"));
            let expected = match expected {
                "usize" | "u32" | "u64" => "a whole number",
                "a string" | "a sequence" | "a map" => expected,
                other => other,
            };
            let field = match path.0.last() {
                Some(crate::yaml::Seg::Key(k)) => Some(k.clone()),
                _ => None,
            };
            diag(
                spans.value(&path),
                entry,
                field,
                format!("`{path}` must be {expected}, found {found}"),
                None,
            )
        } else {
            let field = match path.0.last() {
                Some(crate::yaml::Seg::Key(k)) => Some(k.clone()),
                _ => None,
            };
            diag(
                spans.value(&path),
                entry,
                field,
                format!("{} at `{path}`", msg),
                None,
            )
        }
    })?;

    let mut c = Checker {
        file: file.to_path_buf(),
        spans,
        registry,
        base_dir: base_dir.to_path_buf(),
        diags: Vec::new(),
        check_models: opts.check_models,
        poisoned: HashSet::new(),
    };
    let root = Path::root();

    if spec.settings.epoch_size == 0 || spec.settings.max_in_flight == 0 {
        let k = if spec.settings.epoch_size == 0 {
            "epoch_size"
        } else {
            "max_in_flight"
        };
        let pos = c.spans.value(&root.key("settings").key(k));
        c.report(
            pos,
            None,
            Some(k),
            format!("`settings.{k}` must be at least 1"),
            None,
        );
    }
    for (list, empty) in [
        ("sources", spec.sources.is_empty()),
        ("sinks", spec.sinks.is_empty()),
    ] {
        if empty {
            let pos = c.spans.key(&root.key(list));
            c.report(
                pos,
                None,
                None,
                format!("a pipeline needs at least one entry in `{list}`"),
                None,
            );
        }
    }

    // Names are unique across the whole file.
    let mut seen: HashSet<String> = HashSet::new();
    let mut all_entries: Vec<(Path, &str)> = Vec::new();
    for (i, s) in spec.sources.iter().enumerate() {
        all_entries.push((root.key("sources").index(i), &s.name));
    }
    for (i, s) in spec.stages.iter().enumerate() {
        all_entries.push((root.key("stages").index(i), &s.name));
        if let Some(l) = &s.loop_ {
            for (j, b) in l.stages.iter().enumerate() {
                all_entries.push((
                    root.key("stages")
                        .index(i)
                        .key("loop")
                        .key("stages")
                        .index(j),
                    &b.name,
                ));
            }
        }
    }
    for (i, s) in spec.sinks.iter().enumerate() {
        all_entries.push((root.key("sinks").index(i), &s.name));
    }
    for (p, name) in &all_entries {
        if name.is_empty() {
            let pos = c.spans.value(&p.key("name"));
            c.report(
                pos,
                None,
                None,
                "entry names must not be empty".into(),
                None,
            );
        } else if !seen.insert(name.to_string()) {
            let pos = c.spans.value(&p.key("name"));
            c.report(
                pos,
                Some(name),
                None,
                format!("the name `{name}` is used twice"),
                Some("give every source, stage and sink its own name".into()),
            );
        }
    }

    // Sources.
    let mut sources = Vec::new();
    let mut schemas: Vec<(String, Schema)> = Vec::new();
    for (i, s) in spec.sources.iter().enumerate() {
        let base = root.key("sources").index(i);
        let Some(factory) = registry.source(&s.kind).cloned() else {
            c.unknown_kind(&base, &s.name, "source", &s.kind);
            continue;
        };
        let info = factory.info();
        let n = c.diags.len();
        let params = c.check_params(&base, &s.name, &info, &s.params);
        if c.diags.len() > n {
            continue;
        }
        match factory.plan(&params) {
            Ok(schema) => {
                schemas.push((s.name.clone(), schema.clone()));
                sources.push(SourceNode {
                    name: s.name.clone(),
                    factory,
                    params,
                    schema,
                });
            }
            Err(issues) => {
                for is in issues {
                    c.issue(&base, &s.name, is);
                }
            }
        }
    }

    // Stages, in order; each sees the schema of its input.
    let mut nodes = Vec::new();
    let source_names: BTreeSet<&str> = spec.sources.iter().map(|s| s.name.as_str()).collect();
    let mut defined: Vec<String> = spec.sources.iter().map(|s| s.name.clone()).collect();
    for (i, s) in spec.stages.iter().enumerate() {
        let base = root.key("stages").index(i);
        let input = match &s.input {
            Some(x) => x.clone(),
            None if i == 0 && spec.sources.len() == 1 => spec.sources[0].name.clone(),
            None if i == 0 => {
                let pos = c.spans.value(&base);
                c.report(
                    pos,
                    Some(&s.name),
                    None,
                    "this stage does not say which source it reads".into(),
                    Some(format!(
                        "add `input: <source>`; sources: {}",
                        source_names.iter().copied().collect::<Vec<_>>().join(", ")
                    )),
                );
                defined.push(s.name.clone());
                continue;
            }
            None => spec.stages[i - 1].name.clone(),
        };
        defined.push(s.name.clone());
        let Some((_, schema)) = schemas.iter().find(|(n, _)| *n == input).cloned() else {
            if !defined[..defined.len() - 1].contains(&input) {
                let pos = c.spans.value(&base.key("input"));
                let later = spec.stages.iter().skip(i + 1).any(|x| x.name == input);
                let hint = if input == s.name {
                    Some("a stage cannot read its own output; name the entry before it".into())
                } else if later {
                    Some(format!("`{input}` comes later in the file; entries read only from entries listed before them"))
                } else {
                    did_you_mean(&input, defined.iter().map(|s| s.as_str()))
                };
                c.report(
                    pos,
                    Some(&s.name),
                    None,
                    format!("input `{input}` is not a source or an earlier stage"),
                    hint,
                );
            }
            continue;
        };
        if !c.check_kind_present(&base, s) {
            continue;
        }
        let node = match &s.loop_ {
            Some(l) => c.plan_loop(&base, s, l, &input, &schema),
            None => c.plan_stage(&base, s, &input, &schema).map(Node::Stage),
        };
        if let Some(node) = node {
            let out = match &node {
                Node::Stage(n) => n.schema.clone(),
                Node::Loop { schema, .. } => schema.clone(),
            };
            schemas.push((s.name.clone(), out));
            nodes.push(node);
        }
    }

    // Sinks.
    let mut sinks = Vec::new();
    for (i, s) in spec.sinks.iter().enumerate() {
        let base = root.key("sinks").index(i);
        let input = match &s.input {
            Some(x) => x.clone(),
            None => match spec.stages.last().or(None) {
                Some(last) => last.name.clone(),
                None if spec.sources.len() == 1 => spec.sources[0].name.clone(),
                None => {
                    let pos = c.spans.value(&base);
                    c.report(
                        pos,
                        Some(&s.name),
                        None,
                        "this sink does not say what it writes".into(),
                        Some("add `input: <source or stage>`".into()),
                    );
                    continue;
                }
            },
        };
        let Some(factory) = registry.sink(&s.kind).cloned() else {
            c.unknown_kind(&base, &s.name, "sink", &s.kind);
            continue;
        };
        // Parameters are checked even when the input is broken, so every problem shows.
        let info = factory.info();
        let n = c.diags.len();
        let params = c.check_params(&base, &s.name, &info, &s.params);
        let Some((_, schema)) = schemas.iter().find(|(n, _)| *n == input).cloned() else {
            if !defined.contains(&input) {
                let pos = c.spans.value(&base.key("input"));
                let hint = did_you_mean(&input, defined.iter().map(|s| s.as_str()));
                c.report(
                    pos,
                    Some(&s.name),
                    None,
                    format!("input `{input}` is not a source or a stage"),
                    hint,
                );
            }
            continue;
        };
        if c.diags.len() > n {
            continue;
        }
        match factory.plan(&params, &schema) {
            Ok(plan) => {
                c.check_reads(&base, &s.name, &plan, &schema, &input);
                sinks.push(SinkNode {
                    name: s.name.clone(),
                    input,
                    factory,
                    params,
                });
            }
            Err(issues) => {
                for is in issues {
                    c.issue(&base, &s.name, is);
                }
            }
        }
    }

    if !c.diags.is_empty() {
        c.diags.sort_by_key(|d| (d.pos.line, d.pos.col));
        return Err(Diagnostics(c.diags));
    }
    Ok(Pipeline {
        spec,
        file: Some(file.to_path_buf()),
        base_dir: base_dir.to_path_buf(),
        sources,
        nodes,
        sinks,
    })
}

fn describe_parent(path: &Path) -> String {
    use crate::yaml::Seg;
    let parent = path.parent();
    match parent.0.as_slice() {
        [] => "the pipeline".into(),
        [Seg::Key(k)] if k == "settings" => "`settings`".into(),
        [Seg::Key(list), Seg::Index(i)] => {
            format!("{} entry {}", list.trim_end_matches('s'), i + 1)
        }
        _ => format!("`{parent}`"),
    }
}

/// Lists a kind's parameters as text, one per line.
pub fn describe_params(params: &[ParamSpec]) -> String {
    params
        .iter()
        .map(|p| {
            let d = match &p.default {
                None => "required".to_string(),
                Some(v) => format!("default {v}"),
            };
            format!(
                "    {:<14} {:<22} {d}. {}",
                p.name,
                p.kind.describe(),
                p.doc
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("name", &self.spec.name)
            .field("file", &self.file)
            .field("entries", &self.entry_names())
            .finish()
    }
}
