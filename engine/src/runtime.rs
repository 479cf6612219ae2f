//! Finding and starting the ONNX Runtime library.
//!
//! The `ort` crate is built with `load-dynamic`: nothing of ONNX Runtime is linked into the binary,
//! and the shared library is opened when the process first needs it. [`ensure_runtime`] does that
//! once per process and every model-facing function calls it first, so a missing library is
//! reported as an error that says what to do instead of a panic deep inside `ort`.
//!
//! Decisions:
//! - Where the library comes from, in order: the `ORT_DYLIB_PATH` environment variable when it is
//!   set and not empty (it must name an existing file; a wrong path is an error, never silently
//!   replaced by another library); otherwise `.ort/libonnxruntime.so` in the current directory or
//!   one of its ancestors (so commands run anywhere inside a checkout find the library that
//!   `scripts/setup.sh` put there); otherwise `.ort/libonnxruntime.so` in an ancestor of the
//!   running executable's directory (so `target/debug/latentflow` finds the checkout it was
//!   built in, whatever the current directory is).
//! - The outcome, success or failure, is computed once and cached for the process: `ort` can load
//!   one library and create one environment per process, so retrying after a failure could not
//!   pick up a fixed path anyway.
//! - The `ort` environment is kept alive for the whole process: `ort` remembers it only through a
//!   weak reference and refuses to build a second one, so dropping it would leave later sessions
//!   without an environment.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

/// The environment variable that overrides where the ONNX Runtime library is looked for.
pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// Where, relative to a checkout's root, `scripts/setup.sh` puts the ONNX Runtime library.
pub const LOCAL_DYLIB: &str = ".ort/libonnxruntime.so";

/// Why ONNX Runtime could not be started.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RuntimeError {
    /// `ORT_DYLIB_PATH` is set but names no file.
    #[error(
        "{DYLIB_ENV}={} does not name a file; point it at libonnxruntime.so, or unset it to use \
         {LOCAL_DYLIB} as installed by `scripts/setup.sh`",
        path.display()
    )]
    EnvPathMissing {
        /// The value of `ORT_DYLIB_PATH`.
        path: PathBuf,
    },

    /// No library was found in any of the searched places.
    #[error(
        "ONNX Runtime library not found: {DYLIB_ENV} is not set and {LOCAL_DYLIB} is not in the \
         current directory, the directory of the executable, or any of their ancestors \
         (searched: {}); run `scripts/setup.sh` in the latentflow checkout, or set {DYLIB_ENV} to \
         the path of libonnxruntime.so",
        searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotFound {
        /// The candidate paths that were tried, in order.
        searched: Vec<PathBuf>,
    },

    /// The library exists but could not be opened, or is too old.
    #[error(
        "cannot load ONNX Runtime from {}: {reason}; run `scripts/setup.sh` to install the \
         supported version, or set {DYLIB_ENV} to another libonnxruntime.so",
        path.display()
    )]
    Load {
        /// The library that was opened.
        path: PathBuf,
        /// What `ort` reported.
        reason: String,
    },

    /// The library loaded but its environment could not be created.
    #[error("cannot create the ONNX Runtime environment (library {}): {reason}", path.display())]
    Environment {
        /// The library that was opened.
        path: PathBuf,
        /// What ONNX Runtime reported.
        reason: String,
    },
}

struct Runtime {
    path: PathBuf,
    environment: Environment,
}

static RUNTIME: OnceLock<Result<Runtime, RuntimeError>> = OnceLock::new();

/// Loads ONNX Runtime and creates its process-wide environment, once.
///
/// Later calls return the first call's outcome without looking again. Every function in this crate
/// that touches `ort` calls this first; call it yourself before using `ort` directly.
pub fn ensure_runtime() -> Result<(), RuntimeError> {
    runtime().map(|_| ())
}

/// The library [`ensure_runtime`] loaded, or `None` when it has not run or failed.
pub fn runtime_path() -> Option<PathBuf> {
    match RUNTIME.get() {
        Some(Ok(rt)) => Some(rt.path.clone()),
        _ => None,
    }
}

/// The process-wide `ort` environment, starting the runtime if needed.
///
/// Sessions are built from it: `ort::session::Session::builder(environment()?)`.
pub fn environment() -> Result<&'static Environment, RuntimeError> {
    runtime().map(|rt| &rt.environment)
}

fn runtime() -> Result<&'static Runtime, RuntimeError> {
    RUNTIME.get_or_init(start).as_ref().map_err(Clone::clone)
}

fn start() -> Result<Runtime, RuntimeError> {
    let path = locate()?;
    tracing::debug!(path = %path.display(), "loading ONNX Runtime");

    let builder = ort::init_from(&path).map_err(|e| RuntimeError::Load {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let environment = builder
        .with_name("latentflow")
        .with_telemetry(false)
        .build()
        .map_err(|e| RuntimeError::Environment {
            path: path.clone(),
            reason: e.to_string(),
        })?;

    tracing::debug!(path = %path.display(), "ONNX Runtime loaded");
    Ok(Runtime { path, environment })
}

/// Decides which library file to load, without loading it.
fn locate() -> Result<PathBuf, RuntimeError> {
    let cwd = env::current_dir().ok();
    let exe_dir = env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let starts: Vec<PathBuf> = cwd.into_iter().chain(exe_dir).collect();
    locate_from(env::var_os(DYLIB_ENV), &starts)
}

/// [`locate`] with the environment variable's value and the search roots given, for tests.
fn locate_from(env_value: Option<OsString>, starts: &[PathBuf]) -> Result<PathBuf, RuntimeError> {
    if let Some(value) = env_value.filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        if !path.is_file() {
            return Err(RuntimeError::EnvPathMissing { path });
        }
        // `ort` resolves a relative path against the executable's directory before the current
        // one; make it absolute so the file checked here is the file loaded.
        return Ok(std::path::absolute(&path).unwrap_or(path));
    }

    let mut searched = Vec::new();
    for start in starts {
        for dir in start.ancestors() {
            let candidate = dir.join(LOCAL_DYLIB);
            // `is_file` follows the symlink set-up makes, so a dangling link is skipped.
            if candidate.is_file() {
                return Ok(candidate);
            }
            searched.push(candidate);
        }
    }
    Err(RuntimeError::NotFound { searched })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_starts_from_the_crate_directory() {
        ensure_runtime().expect("run scripts/setup.sh before the tests");
        let path = runtime_path().expect("a path once the runtime is up");
        assert!(path.is_file(), "{}", path.display());
        // The cached outcome is returned again.
        ensure_runtime().unwrap();
        assert_eq!(runtime_path(), Some(path));
    }

    #[test]
    fn a_wrong_env_path_is_an_error_naming_it() {
        let wrong = OsString::from("/nonexistent/libonnxruntime.so");
        let err = locate_from(Some(wrong), &[env::current_dir().unwrap()]).unwrap_err();
        assert!(
            matches!(err, RuntimeError::EnvPathMissing { .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("ORT_DYLIB_PATH=/nonexistent/libonnxruntime.so"),
            "{text}"
        );
    }

    #[test]
    fn the_checkout_library_is_found_from_a_subdirectory() {
        // Cargo runs unit tests in engine/; the library sits in the checkout root's .ort/.
        let cwd = env::current_dir().unwrap();
        let found = locate_from(None, std::slice::from_ref(&cwd)).unwrap();
        assert!(found.ends_with(LOCAL_DYLIB), "{}", found.display());
        // A relative ORT_DYLIB_PATH is taken from the current directory and made absolute.
        let relative = OsString::from(format!("../{LOCAL_DYLIB}"));
        let given = locate_from(Some(relative), std::slice::from_ref(&cwd)).unwrap();
        assert!(
            given.is_absolute() && given.is_file(),
            "{}",
            given.display()
        );
        // An empty variable counts as unset.
        assert_eq!(locate_from(Some(OsString::new()), &[cwd]).unwrap(), found);
    }

    #[test]
    fn not_found_error_lists_the_search_and_says_what_to_do() {
        let err = locate_from(None, &[PathBuf::from("/")]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/.ort/libonnxruntime.so"), "{text}");
        assert!(text.contains("scripts/setup.sh"), "{text}");
        assert!(text.contains("ORT_DYLIB_PATH"), "{text}");
    }
}
