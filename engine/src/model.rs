//! Model packages: an ONNX file and the manifest that describes it.
//!
//! A package is a folder holding `manifest.json` and the ONNX file it names. Stages refer to a
//! package by its folder; the planner loads every package a pipeline uses and calls
//! [`ModelPackage::check`] before anything runs, so a wrong file, a stale checksum or a manifest
//! that does not match the graph is reported up front with the package's path.
//!
//! Decisions:
//! - The manifest is strict (`deny_unknown_fields`): a misspelt key is an error, not silently
//!   ignored. Additions that are not part of the schema yet (a generator's latent size, say) go
//!   under `extra`, a free-form JSON object.
//! - Every tensor's first axis is the batch axis. [`TensorSpec::example_shape`] drops it to give
//!   the shape of one record's field, which is what pipeline stages see.
//! - A symbolic (dynamic) ONNX axis is written as a string in the manifest (the string names the
//!   axis) and a fixed ONNX axis as an integer; [`ModelPackage::check`] holds the two to that, so
//!   the planner can trust the manifest's shapes without opening the graph itself.
//! - The signature is read from an ONNX Runtime session (what the runtime will actually accept),
//!   not by parsing the protobuf, which would need a second ONNX implementation.
//! - Errors carry the package folder, and manifest errors the manifest file with line and column,
//!   because one pipeline can use several packages.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::runtime::{self, RuntimeError};
use crate::value::{DType, Dim, FieldType, Shape};

/// The manifest's file name inside a package folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Name, element type and shape of one model input or output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// The tensor's name in the ONNX graph.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape including the leading batch axis: integers are fixed lengths, strings name dynamic
    /// axes.
    pub shape: Vec<Dim>,
    /// Inclusive range of meaningful values, when the model has one (pixel values, probabilities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<[f64; 2]>,
}

fn batched_default() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl Manifest {
    /// The field type records carry for this tensor: one example (without the batch axis) for
    /// batched models, the whole tensor otherwise.
    pub fn field_type(&self, t: &TensorSpec) -> FieldType {
        if self.batch {
            t.example_type()
        } else {
            FieldType::Tensor {
                dtype: t.dtype,
                shape: Shape(Some(t.shape.clone())),
            }
        }
    }
}

impl TensorSpec {
    /// The batch axis (the first one); `None` only for a shape of rank 0, which
    /// [`ModelPackage::load`] refuses.
    pub fn batch_axis(&self) -> Option<&Dim> {
        self.shape.first()
    }

    /// The shape of one example: the manifest shape without its batch axis.
    pub fn example_shape(&self) -> &[Dim] {
        self.shape.get(1..).unwrap_or_default()
    }

    /// The field type of one example of this tensor, as records carry it.
    pub fn example_type(&self) -> FieldType {
        FieldType::Tensor {
            dtype: self.dtype,
            shape: Shape(Some(self.example_shape().to_vec())),
        }
    }
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` {}{}",
            self.name,
            self.dtype,
            Shape(Some(self.shape.clone()))
        )
    }
}

/// The contents of a package's `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Short name of the model.
    pub name: String,
    /// What the model does.
    pub description: String,
    /// The ONNX file, relative to the package folder.
    pub file: String,
    /// SHA-256 of the ONNX file, lowercase hex.
    pub sha256: String,
    /// Where the model came from: how it was trained or converted, from what.
    pub origin: String,
    /// Licence of the weights and of the data they were trained on.
    pub licence: String,
    /// The model's inputs.
    pub inputs: Vec<TensorSpec>,
    /// The model's outputs.
    pub outputs: Vec<TensorSpec>,
    /// Whether the first axis of every input and output is a batch axis along which requests
    /// may be stacked (the default). Models that take one whole structure per call — a graph
    /// as node features `[nodes, F]` and `edge_index` `[2, edges]` — set this to `false`:
    /// each record then carries the complete input tensors and each request runs alone.
    #[serde(default = "batched_default", skip_serializing_if = "is_true")]
    pub batch: bool,
    /// Further keys not (yet) part of the schema, such as a generator's latent size.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// One disagreement between a manifest and its ONNX graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The tensor concerned, e.g. "input `pixels`".
    pub tensor: String,
    /// The property that differs, e.g. "element type" or "axis 1".
    pub property: String,
    /// What the manifest says.
    pub manifest: String,
    /// What the ONNX file says.
    pub onnx: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: manifest says {}, ONNX file says {}",
            self.tensor, self.property, self.manifest, self.onnx
        )
    }
}

/// Why a model package could not be loaded or does not check out.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The manifest could not be read.
    #[error("model package {}: cannot read {}: {source}", package.display(), manifest.display())]
    Read {
        /// The package folder.
        package: PathBuf,
        /// The manifest file.
        manifest: PathBuf,
        /// The I/O error.
        source: io::Error,
    },

    /// The manifest is not valid JSON or does not follow the schema.
    #[error(
        "{}:{line}:{column}: {message}{}",
        manifest.display(),
        field.as_ref().map(|f| format!(" (at `{f}`)")).unwrap_or_default()
    )]
    Manifest {
        /// The package folder.
        package: PathBuf,
        /// The manifest file.
        manifest: PathBuf,
        /// Line of the error, from 1.
        line: usize,
        /// Column of the error, from 1.
        column: usize,
        /// The offending field as a path such as `inputs[0].dtype`, when known.
        field: Option<String>,
        /// What is wrong.
        message: String,
    },

    /// The manifest parses but says something impossible.
    #[error("{}: {reason}", manifest.display())]
    Invalid {
        /// The package folder.
        package: PathBuf,
        /// The manifest file.
        manifest: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The ONNX file named by the manifest does not exist or cannot be read.
    #[error(
        "model package {}: cannot read the model file {}: {source}",
        package.display(),
        file.display()
    )]
    ModelFile {
        /// The package folder.
        package: PathBuf,
        /// The ONNX file.
        file: PathBuf,
        /// The I/O error.
        source: io::Error,
    },

    /// The ONNX file's SHA-256 differs from the manifest's.
    #[error(
        "model package {}: {} has SHA-256 {actual} but the manifest says {expected}; the file \
         was changed or replaced; if that was intended, update `sha256` in the manifest",
        package.display(),
        file.display()
    )]
    Checksum {
        /// The package folder.
        package: PathBuf,
        /// The ONNX file.
        file: PathBuf,
        /// The manifest's checksum.
        expected: String,
        /// The file's checksum.
        actual: String,
    },

    /// ONNX Runtime could not be started.
    #[error("model package {}: {source}", package.display())]
    Runtime {
        /// The package folder.
        package: PathBuf,
        /// Why the runtime did not start.
        source: RuntimeError,
    },

    /// ONNX Runtime could not open the model.
    #[error(
        "model package {}: ONNX Runtime cannot open {}: {reason}",
        package.display(),
        file.display()
    )]
    Session {
        /// The package folder.
        package: PathBuf,
        /// The ONNX file.
        file: PathBuf,
        /// What ONNX Runtime reported.
        reason: String,
    },

    /// The manifest's inputs and outputs differ from the ONNX graph's.
    #[error(
        "model package {}: the manifest does not match {}:\n{}",
        package.display(),
        file.display(),
        mismatches.iter().map(|m| format!("  - {m}")).collect::<Vec<_>>().join("\n")
    )]
    Signature {
        /// The package folder.
        package: PathBuf,
        /// The ONNX file.
        file: PathBuf,
        /// Every disagreement found.
        mismatches: Vec<Mismatch>,
    },
}

/// A model package: its folder and its parsed manifest.
#[derive(Clone, Debug)]
pub struct ModelPackage {
    dir: PathBuf,
    manifest: Manifest,
}

impl ModelPackage {
    /// Loads the package in `dir` (a package folder, or its `manifest.json`).
    ///
    /// Reads and validates the manifest only; [`ModelPackage::check`] compares it with the ONNX
    /// file.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let mut dir = dir.as_ref().to_path_buf();
        if dir.file_name().is_some_and(|n| n == MANIFEST_FILE) && dir.is_file() {
            dir.pop();
            if dir.as_os_str().is_empty() {
                dir.push(".");
            }
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path).map_err(|source| ModelError::Read {
            package: dir.clone(),
            manifest: manifest_path.clone(),
            source,
        })?;

        let manifest_error = |e: serde_json::Error, field: Option<String>| ModelError::Manifest {
            package: dir.clone(),
            manifest: manifest_path.clone(),
            line: e.line(),
            column: e.column(),
            field,
            message: strip_position(&e.to_string()),
        };
        let mut de = serde_json::Deserializer::from_str(&text);
        let manifest: Manifest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            // serde_path_to_error writes `?` for a segment it could not name (a syntax error).
            let mut path = e.path().to_string();
            while let Some(rest) = path.strip_suffix(".?").or_else(|| path.strip_suffix('?')) {
                path = rest.to_string();
            }
            let field = (!path.is_empty() && path != ".").then_some(path);
            manifest_error(e.into_inner(), field)
        })?;
        // Trailing characters after the object are an error too.
        de.end().map_err(|e| manifest_error(e, None))?;

        Self::from_manifest(dir, manifest)
    }

    /// A package from a manifest already in memory, validated as [`ModelPackage::load`] does.
    pub fn from_manifest(dir: impl Into<PathBuf>, manifest: Manifest) -> Result<Self, ModelError> {
        let dir = dir.into();
        if let Err(reason) = validate(&manifest) {
            return Err(ModelError::Invalid {
                manifest: dir.join(MANIFEST_FILE),
                package: dir,
                reason,
            });
        }
        Ok(ModelPackage { dir, manifest })
    }

    /// The package folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The ONNX file.
    pub fn onnx_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.file)
    }

    /// The input called `name`.
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.manifest.inputs.iter().find(|t| t.name == name)
    }

    /// The output called `name`.
    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.manifest.outputs.iter().find(|t| t.name == name)
    }

    /// Checks the package against its ONNX file: the file exists, its SHA-256 is the manifest's,
    /// and its inputs and outputs are the manifest's (names, element types, ranks, fixed and
    /// dynamic axes).
    ///
    /// Opens a session to read the signature, so this starts ONNX Runtime if needed.
    pub fn check(&self) -> Result<(), ModelError> {
        let file = self.onnx_path();
        let actual = sha256_file(&file).map_err(|source| ModelError::ModelFile {
            package: self.dir.clone(),
            file: file.clone(),
            source,
        })?;
        if !actual.eq_ignore_ascii_case(&self.manifest.sha256) {
            return Err(ModelError::Checksum {
                package: self.dir.clone(),
                file,
                expected: self.manifest.sha256.clone(),
                actual,
            });
        }

        let session = self.open_for_inspection()?;
        self.check_session(&session)?;
        tracing::debug!(package = %self.dir.display(), "model package checked");
        Ok(())
    }

    /// Compares the manifest with the inputs and outputs of a session on this package's model.
    pub(crate) fn check_session(&self, session: &Session) -> Result<(), ModelError> {
        let mut mismatches = Vec::new();
        compare(
            "input",
            &self.manifest.inputs,
            session.inputs(),
            &mut mismatches,
        );
        compare(
            "output",
            &self.manifest.outputs,
            session.outputs(),
            &mut mismatches,
        );
        if mismatches.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Signature {
                package: self.dir.clone(),
                file: self.onnx_path(),
                mismatches,
            })
        }
    }

    /// A CPU session with no graph optimisation: enough to read the signature, and quick to open.
    fn open_for_inspection(&self) -> Result<Session, ModelError> {
        let env = runtime::environment().map_err(|source| ModelError::Runtime {
            package: self.dir.clone(),
            source,
        })?;
        let file = self.onnx_path();
        let session_error = |reason: String| ModelError::Session {
            package: self.dir.clone(),
            file: file.clone(),
            reason,
        };
        Session::builder(env)
            .map_err(|e| session_error(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Disable)
            .map_err(|e| session_error(e.to_string()))?
            .commit_from_file(&file)
            .map_err(|e| session_error(e.to_string()))
    }
}

/// Checks what serde cannot: non-empty, unique tensor names, a batch axis, sane ranges, and a
/// well-formed checksum.
fn validate(m: &Manifest) -> Result<(), String> {
    if m.file.is_empty() {
        return Err("`file` is empty".into());
    }
    if m.sha256.len() != 64 || !m.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "`sha256` must be 64 hexadecimal digits, got {:?}",
            m.sha256
        ));
    }
    for (kind, specs) in [("inputs", &m.inputs), ("outputs", &m.outputs)] {
        if specs.is_empty() {
            return Err(format!("`{kind}` is empty; a model has at least one"));
        }
        for (i, spec) in specs.iter().enumerate() {
            let at = format!("{kind}[{i}] (`{}`)", spec.name);
            if spec.name.is_empty() {
                return Err(format!("{kind}[{i}]: `name` is empty"));
            }
            if specs[..i].iter().any(|s| s.name == spec.name) {
                return Err(format!("{at}: the name is used twice in `{kind}`"));
            }
            if spec.shape.is_empty() {
                return Err(format!(
                    "{at}: `shape` is empty; the first axis is the batch axis"
                ));
            }
            if let Some([lo, hi]) = spec.range {
                if lo.is_nan() || hi.is_nan() || lo > hi {
                    return Err(format!("{at}: `range` [{lo}, {hi}] is empty"));
                }
            }
        }
    }
    Ok(())
}

/// serde_json appends " at line L column C" to its messages; the error shows the position first.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Compares one side (inputs or outputs) of the manifest with the graph's.
fn compare(
    kind: &str,
    specs: &[TensorSpec],
    outlets: &[ort::value::Outlet],
    out: &mut Vec<Mismatch>,
) {
    let graph_names = || {
        let names: Vec<String> = outlets.iter().map(|o| format!("`{}`", o.name())).collect();
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };

    for spec in specs {
        let tensor = format!("{kind} `{}`", spec.name);
        let Some(outlet) = outlets.iter().find(|o| o.name() == spec.name) else {
            out.push(Mismatch {
                tensor,
                property: "presence".into(),
                manifest: format!("{} {}", spec.dtype, Shape(Some(spec.shape.clone()))),
                onnx: format!("no such {kind} (the graph's {kind}s: {})", graph_names()),
            });
            continue;
        };
        let ValueType::Tensor {
            ty,
            shape,
            dimension_symbols,
        } = outlet.dtype()
        else {
            out.push(Mismatch {
                tensor,
                property: "kind".into(),
                manifest: "a tensor".into(),
                onnx: outlet.dtype().to_string(),
            });
            continue;
        };

        let onnx_dtype = match ty {
            TensorElementType::Float32 => Some(DType::F32),
            TensorElementType::Int64 => Some(DType::I64),
            _ => None,
        };
        if onnx_dtype != Some(spec.dtype) {
            let onnx = match onnx_dtype {
                Some(d) => d.to_string(),
                None => format!("{ty} (not supported by latentflow: use f32 or i64)"),
            };
            out.push(Mismatch {
                tensor: tensor.clone(),
                property: "element type".into(),
                manifest: spec.dtype.to_string(),
                onnx,
            });
        }

        if shape.len() != spec.shape.len() {
            out.push(Mismatch {
                tensor,
                property: "rank".into(),
                manifest: format!("{} {}", spec.shape.len(), Shape(Some(spec.shape.clone()))),
                onnx: format!("{} {}", shape.len(), onnx_shape(shape, dimension_symbols)),
            });
            continue;
        }
        for (axis, (dim, &len)) in spec.shape.iter().zip(shape.iter()).enumerate() {
            let onnx = if len < 0 {
                match dimension_symbols.get(axis).filter(|s| !s.is_empty()) {
                    Some(sym) => format!("dynamic (`{sym}`)"),
                    None => "dynamic".to_string(),
                }
            } else {
                format!("fixed {len}")
            };
            let agrees = match dim {
                Dim::Fixed(n) => len >= 0 && *n as i64 == len,
                Dim::Named(_) => len < 0,
            };
            if !agrees {
                let manifest = match dim {
                    Dim::Fixed(n) => format!("fixed {n}"),
                    Dim::Named(s) => format!("dynamic (`{s}`)"),
                };
                out.push(Mismatch {
                    tensor: tensor.clone(),
                    property: format!("axis {axis}"),
                    manifest,
                    onnx,
                });
            }
        }
    }

    for outlet in outlets {
        if !specs.iter().any(|s| s.name == outlet.name()) {
            out.push(Mismatch {
                tensor: format!("{kind} `{}`", outlet.name()),
                property: "presence".into(),
                manifest: format!("not listed in `{kind}s`"),
                onnx: describe(outlet.dtype()),
            });
        }
    }
}

/// An ONNX value type the way the manifest writes one: `f32 [batch, 64]`.
fn describe(ty: &ValueType) -> String {
    match ty {
        ValueType::Tensor {
            ty,
            shape,
            dimension_symbols,
        } => {
            let dtype = match ty {
                TensorElementType::Float32 => "f32".to_string(),
                TensorElementType::Int64 => "i64".to_string(),
                other => other.to_string(),
            };
            format!("{dtype} {}", onnx_shape(shape, dimension_symbols))
        }
        other => other.to_string(),
    }
}

/// An ONNX shape with dynamic axes shown by their symbol, or `?` when they have none.
fn onnx_shape(shape: &[i64], symbols: &[String]) -> String {
    let axes: Vec<String> = shape
        .iter()
        .enumerate()
        .map(|(i, &len)| match symbols.get(i).filter(|s| !s.is_empty()) {
            _ if len >= 0 => len.to_string(),
            Some(sym) => sym.clone(),
            None => "?".to_string(),
        })
        .collect();
    format!("[{}]", axes.join(", "))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The digits model package shipped in the repository (tests run in `engine/`).
    pub(crate) fn digits_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits-mlp")
    }

    /// A fresh, empty directory under the system temp dir.
    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("latentflow-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A copy of the digits package whose manifest text is `edit`ed.
    fn altered_digits(tag: &str, edit: impl FnOnce(&str) -> String) -> PathBuf {
        let dir = temp_dir(tag);
        std::fs::copy(digits_dir().join("model.onnx"), dir.join("model.onnx")).unwrap();
        let text = std::fs::read_to_string(digits_dir().join(MANIFEST_FILE)).unwrap();
        std::fs::write(dir.join(MANIFEST_FILE), edit(&text)).unwrap();
        dir
    }

    #[test]
    fn digits_package_loads_and_checks() {
        let pkg = ModelPackage::load(digits_dir()).unwrap();
        assert_eq!(pkg.manifest().name, "digits-mlp");
        let pixels = pkg.input("pixels").unwrap();
        assert_eq!(pixels.example_shape(), &[Dim::Fixed(64)]);
        assert_eq!(pixels.batch_axis(), Some(&Dim::Named("batch".into())));
        assert_eq!(pixels.example_type().to_string(), "tensor<f32>[64]");
        assert_eq!(pkg.output("probs").unwrap().range, Some([0.0, 1.0]));
        assert!(pkg.output("nope").is_none());
        pkg.check().unwrap();

        // The manifest file itself is accepted too.
        let again = ModelPackage::load(digits_dir().join(MANIFEST_FILE)).unwrap();
        assert_eq!(again.manifest(), pkg.manifest());
    }

    #[test]
    fn malformed_json_reports_file_line_and_column() {
        let dir = altered_digits("badjson", |t| t.replacen("\"file\":", "\"file\" ", 1));
        let err = ModelPackage::load(&dir).unwrap_err();
        let ModelError::Manifest {
            line,
            column,
            ref manifest,
            ..
        } = err
        else {
            panic!("{err:?}")
        };
        assert_eq!(line, 4, "{err}");
        assert!(column > 1);
        assert_eq!(manifest, &dir.join(MANIFEST_FILE));
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("{}:4:", dir.join(MANIFEST_FILE).display())),
            "{text}"
        );
    }

    #[test]
    fn missing_field_is_named() {
        let dir = altered_digits("nosha", |t| {
            let start = t.find("  \"sha256\"").unwrap();
            let end = start + t[start..].find('\n').unwrap() + 1;
            format!("{}{}", &t[..start], &t[end..])
        });
        let text = ModelPackage::load(&dir).unwrap_err().to_string();
        assert!(text.contains("missing field `sha256`"), "{text}");
        assert!(
            text.contains(&dir.join(MANIFEST_FILE).display().to_string()),
            "{text}"
        );
    }

    #[test]
    fn wrong_type_and_unknown_field_name_the_path() {
        let dir = altered_digits("dtype", |t| {
            t.replacen("\"dtype\": \"f32\"", "\"dtype\": \"f16\"", 1)
        });
        let err = ModelPackage::load(&dir).unwrap_err();
        let ModelError::Manifest { field, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(field.as_deref(), Some("inputs[0].dtype"), "{err}");
        assert!(err.to_string().contains("(at `inputs[0].dtype`)"), "{err}");

        let dir = altered_digits("unknown", |t| t.replacen("\"range\"", "\"rnage\"", 1));
        let text = ModelPackage::load(&dir).unwrap_err().to_string();
        assert!(text.contains("unknown field `rnage`"), "{text}");

        // `extra` takes what the schema does not know yet.
        let dir = altered_digits("extra", |t| {
            t.replacen(
                "\"inputs\"",
                "\"extra\": {\"latent\": 100},\n  \"inputs\"",
                1,
            )
        });
        let pkg = ModelPackage::load(&dir).unwrap();
        assert_eq!(pkg.manifest().extra["latent"], 100);
    }

    #[test]
    fn impossible_manifest_is_invalid() {
        let dir = altered_digits("norank", |t| t.replacen("[\"batch\", 64]", "[]", 1));
        let text = ModelPackage::load(&dir).unwrap_err().to_string();
        assert!(
            text.contains("inputs[0] (`pixels`): `shape` is empty"),
            "{text}"
        );
    }

    #[test]
    fn checksum_mismatch_is_detected() {
        let dir = altered_digits("sha", |t| t.to_string());
        let mut bytes = std::fs::read(dir.join("model.onnx")).unwrap();
        bytes.push(0);
        std::fs::write(dir.join("model.onnx"), bytes).unwrap();
        let err = ModelPackage::load(&dir).unwrap().check().unwrap_err();
        assert!(matches!(err, ModelError::Checksum { .. }), "{err:?}");
        assert!(err.to_string().contains("12acb5e5"), "{err}");

        std::fs::remove_file(dir.join("model.onnx")).unwrap();
        let err = ModelPackage::load(&dir).unwrap().check().unwrap_err();
        assert!(matches!(err, ModelError::ModelFile { .. }), "{err:?}");
    }

    #[test]
    fn signature_mismatches_are_all_listed() {
        let dir = altered_digits("sig", |t| {
            t.replacen("[\"batch\", 64]", "[\"batch\", 63]", 1)
                .replacen(
                    "\"name\": \"logits\", \"dtype\": \"f32\", \"shape\": [\"batch\", 10]",
                    "\"name\": \"logit\", \"dtype\": \"f32\", \"shape\": [\"batch\", 10]",
                    1,
                )
                .replacen(
                    "\"name\": \"probs\", \"dtype\": \"f32\", \"shape\": [\"batch\", 10]",
                    "\"name\": \"probs\", \"dtype\": \"i64\", \"shape\": [1, 10]",
                    1,
                )
        });
        let err = ModelPackage::load(&dir).unwrap().check().unwrap_err();
        let ModelError::Signature { mismatches, .. } = &err else {
            panic!("{err:?}")
        };
        let found: Vec<(&str, &str)> = mismatches
            .iter()
            .map(|m| (m.tensor.as_str(), m.property.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("input `pixels`", "axis 1"),
                ("output `logit`", "presence"),
                ("output `probs`", "element type"),
                ("output `probs`", "axis 0"),
                ("output `logits`", "presence"),
            ],
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("input `pixels` axis 1: manifest says fixed 63, ONNX file says fixed 64"),
            "{text}"
        );
        assert!(
            text.contains(
                "output `probs` axis 0: manifest says fixed 1, ONNX file says dynamic (`batch`)"
            ),
            "{text}"
        );
    }
}
