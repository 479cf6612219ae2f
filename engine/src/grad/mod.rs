//! Exact gradients through ONNX models, and finite differences.
//!
//! ONNX Runtime runs forward graphs only. Latent optimisation (GAN inversion), region
//! factorisation (Jacobians of generators) and fine-tuning need derivatives of a model's output
//! with respect to its inputs or weights. This module builds, from a forward ONNX model, a
//! second ONNX model that computes a vector-Jacobian product (reverse mode), made of ordinary
//! ONNX operators, so ONNX Runtime runs it like any model, on CPU or CUDA:
//!
//! - inputs: every input of the forward model, plus `grad_in__<output>`, the cotangent, shaped
//!   like the differentiated output;
//! - outputs: `<output>` itself (the forward value, free since it is computed anyway), and
//!   `grad__<x>` for every tensor `x` differentiated against (graph inputs or initializers),
//!   shaped like `x`.
//!
//! For a batched model the cotangent has the output's batch axis and input gradients are per
//! example; gradients with respect to weights are summed over the batch, as training expects.
//!
//! [`Differentiable`] is the API stages use: it builds (or finds in the cache) the VJP model of
//! a package, opens it, and offers [`Differentiable::vjp`], [`Differentiable::jacobian`] and
//! [`Differentiable::finite_difference_jacobian`] on ndarrays. [`vjp_model`] and
//! [`write_vjp_model`] build the VJP model file alone; the latter is `latentflow models grad`.
//!
//! Decisions:
//! - ONNX files are read and written with protobuf types generated from the vendored
//!   `onnx.proto` (`engine/proto/`), compiled by `protox` and `prost-build` in `engine/build.rs`,
//!   so no `protoc` is needed anywhere.
//! - The reverse graph is built op by op ([`SUPPORTED_OPERATORS`]); anything on the path from the
//!   differentiated tensors to the output without a rule is an error naming the operator and
//!   the node, never a silently wrong gradient. See the `vjp` and `rules` submodules.
//! - Built models are cached beside the package, in `<package>/.grad/<sha256 of the ONNX
//!   file>-<output>-<wrt>.onnx` (a `.gitignore` there keeps them out of git). A changed model
//!   file gets a new name; a model built by another version of the builder is rebuilt.
//! - The VJP model runs in a plain ONNX Runtime session owned by the [`Differentiable`], not
//!   through the batching [`crate::inference::InferenceService`]: weight gradients are sums over
//!   the batch, so requests from different callers must not be stacked, and weights fed for
//!   fine-tuning have no batch axis. Callers that want cross-worker batching of input
//!   gradients can open the cached file through a package of their own.
//! - Finite differences ([`fd`]) stack many perturbations along the batch axis, so a whole
//!   Jacobian costs a few model calls; [`Differentiable::jacobian`] uses them when the input is
//!   smaller than the output (a generator's latent), and VJP rows otherwise (an encoder).

pub mod compose;
mod diff;
mod emit;
pub mod fd;
pub mod gates;
mod onnx;
mod rules;
mod shape;
mod vjp;

use std::io;
use std::path::{Path, PathBuf};

use prost::Message;

pub use diff::{Differentiable, GradOptions, Gradients, JacobianMethod, DEFAULT_STEP};
pub use rules::SUPPORTED as SUPPORTED_OPERATORS;
pub use vjp::{cotangent_name, gradient_name, BUILDER_VERSION};

use crate::model::{ModelError, ModelPackage};
use crate::runtime::RuntimeError;

/// The cache folder inside a package.
pub const CACHE_DIR: &str = ".grad";

/// Why a gradient could not be built or computed.
#[derive(Debug, thiserror::Error)]
pub enum GradError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },

    /// The file is not an ONNX model.
    #[error("{}: not a readable ONNX model: {reason}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the protobuf decoder reported.
        reason: String,
    },

    /// The model cannot be differentiated as a whole (opset, external data, no graph).
    #[error("cannot differentiate the model: {reason}")]
    Model {
        /// What is wrong.
        reason: String,
    },

    /// The model package is broken.
    #[error(transparent)]
    Package(#[from] ModelError),

    /// An output or a tensor to differentiate against does not exist.
    #[error("no {role} `{name}` in the model: {hint}")]
    UnknownTensor {
        /// `output`, or `input or initializer` for a tensor to differentiate against.
        role: &'static str,
        /// The name asked for.
        name: String,
        /// What exists instead.
        hint: String,
    },

    /// The tensor exists but has no gradient (an integer tensor).
    #[error("`{name}` cannot be differentiated: {reason}")]
    NotDifferentiable {
        /// The tensor.
        name: String,
        /// Why.
        reason: String,
    },

    /// A node on the path from the differentiated tensors to the output has no gradient rule,
    /// or its rule cannot handle the node's attributes.
    #[error("cannot differentiate {node}: {reason}")]
    Unsupported {
        /// The operator type.
        op: String,
        /// The node, by name or index, with its operator.
        node: String,
        /// Why.
        reason: String,
    },

    /// ONNX Runtime could not be started.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),

    /// ONNX Runtime could not open a model.
    #[error("ONNX Runtime cannot open {what}: {reason}")]
    Session {
        /// Which model (the VJP model of a file, or the forward model).
        what: String,
        /// What ONNX Runtime reported.
        reason: String,
    },

    /// A call's inputs do not fit the model.
    #[error("bad gradient request for {model}: {reason}")]
    Request {
        /// The forward model.
        model: String,
        /// What is wrong.
        reason: String,
    },

    /// ONNX Runtime failed while running a model.
    #[error("running {what} failed: {reason}")]
    Run {
        /// Which model.
        what: String,
        /// What ONNX Runtime reported.
        reason: String,
    },
}

/// A name made safe for a file name: anything but letters, digits, `-`, `_` and `.` becomes
/// `_`.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The cache file name for a model with SHA-256 `sha`, differentiating `output` with respect to
/// `wrt`. Long lists of tensors are replaced by a hash of the list.
pub fn cache_file_name(sha: &str, output: &str, wrt: &[String]) -> String {
    use sha2::{Digest, Sha256};
    let mut key = wrt
        .iter()
        .map(|w| file_safe(w))
        .collect::<Vec<_>>()
        .join("+");
    if key.len() > 80 {
        let digest = Sha256::digest(wrt.join("\n").as_bytes());
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        key = format!("{}-tensors-{hex}", wrt.len());
    }
    format!("{sha}-{}-{key}.onnx", file_safe(output))
}

/// Reads and decodes an ONNX file, with its SHA-256.
fn read_model(path: &Path) -> Result<(onnx::ModelProto, String), GradError> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).map_err(|source| GradError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let sha: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let model = onnx::ModelProto::decode(bytes.as_slice()).map_err(|e| GradError::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok((model, sha))
}

/// Whether `path` holds a VJP model written by this version of the builder.
fn cached_model_is_current(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let Ok(model) = onnx::ModelProto::decode(bytes.as_slice()) else {
        return false;
    };
    model.metadata_props.iter().any(|p| {
        p.key.as_deref() == Some(vjp::VERSION_KEY) && p.value.as_deref() == Some(BUILDER_VERSION)
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see half a
/// file and concurrent builders do not clash.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), GradError> {
    let io_err = |source| GradError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    let tmp = path.with_extension(format!(
        "tmp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&tmp, bytes).map_err(io_err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(e)
    })
}

/// Makes sure the cache folder exists and keeps its contents out of git.
fn prepare_cache_dir(dir: &Path) -> Result<(), GradError> {
    std::fs::create_dir_all(dir).map_err(|source| GradError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let ignore = dir.join(".gitignore");
    if !ignore.exists() {
        std::fs::write(
            &ignore,
            "# VJP models built by latentflow from the package's ONNX file; rebuilt on demand.\n*\n",
        )
        .map_err(|source| GradError::Io {
            path: ignore,
            source,
        })?;
    }
    Ok(())
}

/// Builds the VJP model of the ONNX file `source` for `output` with respect to `wrt` and writes
/// it to `dest`.
pub fn build_vjp_file(
    source: &Path,
    output: &str,
    wrt: &[String],
    dest: &Path,
) -> Result<(), GradError> {
    let (model, _) = read_model(source)?;
    let built = vjp::build(&model, output, wrt)?;
    write_atomically(dest, &built.encode_to_vec())
}

/// The VJP model of `package` for `output` with respect to `wrt` (inputs or initializers):
/// the cached file when it is current, built and cached otherwise. Returns its path.
pub fn vjp_model(
    package: &ModelPackage,
    output: &str,
    wrt: &[String],
) -> Result<PathBuf, GradError> {
    let source = package.onnx_path();
    let (model, sha) = read_model(&source)?;
    check_checksum(package, &source, &sha)?;
    let dir = package.dir().join(CACHE_DIR);
    cached_vjp(&model, &sha, output, wrt, &dir).map(|(path, _)| path)
}

fn check_checksum(package: &ModelPackage, file: &Path, sha: &str) -> Result<(), GradError> {
    let expected = &package.manifest().sha256;
    if !expected.eq_ignore_ascii_case(sha) {
        return Err(GradError::Package(ModelError::Checksum {
            package: package.dir().to_path_buf(),
            file: file.to_path_buf(),
            expected: expected.clone(),
            actual: sha.to_string(),
        }));
    }
    Ok(())
}

/// Finds or builds the VJP model in `dir`; the flag says whether it was built now.
fn cached_vjp(
    model: &onnx::ModelProto,
    sha: &str,
    output: &str,
    wrt: &[String],
    dir: &Path,
) -> Result<(PathBuf, bool), GradError> {
    let path = dir.join(cache_file_name(sha, output, wrt));
    if cached_model_is_current(&path) {
        tracing::debug!(path = %path.display(), "using cached VJP model");
        return Ok((path, false));
    }
    let started = std::time::Instant::now();
    let built = vjp::build(model, output, wrt)?;
    prepare_cache_dir(dir)?;
    write_atomically(&path, &built.encode_to_vec())?;
    tracing::info!(
        path = %path.display(),
        seconds = started.elapsed().as_secs_f64(),
        "built VJP model"
    );
    Ok((path, true))
}

/// One input or output of a VJP model, for display.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Its element type (`float`, `int64`, ...).
    pub elem: String,
    /// Its axes: lengths, symbolic names, or `?`; `None` when even the rank is not declared.
    pub shape: Option<Vec<String>>,
    /// Whether the input may be left out (a weight, which defaults to its stored value).
    pub optional: bool,
}

impl std::fmt::Display for TensorInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.elem)?;
        match &self.shape {
            Some(dims) => write!(f, " [{}]", dims.join(", "))?,
            None => f.write_str(" [?]")?,
        }
        if self.optional {
            f.write_str("  (optional: defaults to the stored weight)")?;
        }
        Ok(())
    }
}

/// A VJP model written (or found current) by [`write_vjp_model`].
#[derive(Clone, Debug)]
pub struct VjpModel {
    /// The file.
    pub path: PathBuf,
    /// Whether it was built now (false: a current cached file was reused).
    pub built: bool,
    /// The differentiated output.
    pub output: String,
    /// The tensors differentiated against.
    pub wrt: Vec<String>,
    /// The model's inputs: the forward inputs, the cotangent, and weights differentiated
    /// against (which default to their stored values).
    pub inputs: Vec<TensorInfo>,
    /// The model's outputs: the forward output and one gradient per tensor of `wrt`.
    pub outputs: Vec<TensorInfo>,
}

/// Writes the VJP model of a model package (a folder) or of a plain ONNX file, for `output`
/// with respect to `wrt`: to `out` when given (always built anew), else to the cache beside
/// the model (`.grad/`, reused when current). This is `latentflow models grad`.
///
/// `output` defaults to the model's first output, and an empty `wrt` means every
/// floating-point input of the model. Entries of `wrt` may also be comma-separated lists.
pub fn write_vjp_model(
    model: &Path,
    output: Option<&str>,
    wrt: &[String],
    out: Option<&Path>,
) -> Result<VjpModel, GradError> {
    let (source, cache) = if model.is_dir() {
        let package = ModelPackage::load(model)?;
        (package.onnx_path(), Some(package))
    } else {
        (model.to_path_buf(), None)
    };
    let (proto, sha) = read_model(&source)?;
    if let Some(package) = &cache {
        check_checksum(package, &source, &sha)?;
    }
    let graph = proto.graph.as_ref().ok_or_else(|| GradError::Model {
        reason: "the model has no graph".into(),
    })?;

    let output = match output {
        Some(o) => o.to_string(),
        None => graph
            .output
            .first()
            .and_then(|o| o.name.clone())
            .ok_or_else(|| GradError::Model {
                reason: "the model has no outputs".into(),
            })?,
    };
    let mut wrt: Vec<String> = wrt
        .iter()
        .flat_map(|w| w.split(','))
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect();
    if wrt.is_empty() {
        let initializers: Vec<&str> = graph
            .initializer
            .iter()
            .filter_map(|t| t.name.as_deref())
            .collect();
        wrt = graph
            .input
            .iter()
            .filter(|i| {
                let elem = i
                    .r#type
                    .as_ref()
                    .and_then(onnx::tensor_type)
                    .map_or(onnx::elem::UNDEFINED, |(e, _)| e);
                onnx::is_float(elem)
            })
            .filter_map(|i| i.name.clone())
            .filter(|n| !initializers.contains(&n.as_str()))
            .collect();
    }

    let (path, built) = match out {
        Some(dest) => {
            let built = vjp::build(&proto, &output, &wrt)?;
            write_atomically(dest, &built.encode_to_vec())?;
            (dest.to_path_buf(), true)
        }
        None => {
            let dir = source
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(CACHE_DIR);
            cached_vjp(&proto, &sha, &output, &wrt, &dir)?
        }
    };

    let (written, _) = read_model(&path)?;
    let written_graph = written.graph.unwrap_or_default();
    let stored: Vec<&str> = written_graph
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .collect();
    let describe = |list: &[onnx::ValueInfoProto]| -> Vec<TensorInfo> {
        list.iter()
            .map(|v| {
                let (elem, dims) = v
                    .r#type
                    .as_ref()
                    .and_then(onnx::tensor_type)
                    .unwrap_or((onnx::elem::UNDEFINED, None));
                let name = v.name.clone().unwrap_or_default();
                TensorInfo {
                    optional: stored.contains(&name.as_str()),
                    name,
                    elem: onnx::elem_name(elem),
                    shape: dims.map(|dims| dims.iter().map(onnx::dim_name).collect()),
                }
            })
            .collect()
    };
    Ok(VjpModel {
        path,
        built,
        output,
        wrt,
        inputs: describe(&written_graph.input),
        outputs: describe(&written_graph.output),
    })
}
