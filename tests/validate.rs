//! `latentflow validate` on broken pipeline files, as a user meets them.
//!
//! Each case is one kind of mistake: a small fixture in `tests/broken/`, or, where the mistake
//! is in a file the pipeline refers to (a damaged model package, a bad `.npy` file), a pipeline
//! written into a temporary folder next to that file. The tests run the real binary and pin
//! down what a user sees: exit code 1, the file position of each error, the key words of its
//! message, and its `entry:`, `field:` and `help:` lines. The positions were counted by hand
//! from the fixtures (1-based lines and columns, comment lines included).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value as Json};

/// The checkout root. Commands run from here, so fixture paths (and the data they reference
/// relative to themselves) stay short in the diagnostics.
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs the `latentflow` binary from the checkout root.
fn latentflow(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_latentflow"))
        .args(args)
        .current_dir(ROOT)
        // Keeps the runtime's info logs out of stderr, so a failing test shows only diagnostics.
        .env("RUST_LOG", "warn")
        .output()
        .expect("the latentflow binary starts")
}

/// Runs `latentflow validate ARGS` and returns its exit code and stderr.
fn validate(args: &[&str]) -> (i32, String) {
    let mut all = vec!["validate"];
    all.extend_from_slice(args);
    let out = latentflow(&all);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

/// One diagnostic: `FILE:LINE:COL: error: MESSAGE` and the indented lines under it.
#[derive(Clone, Debug, Default)]
struct Diag {
    /// `FILE:LINE:COL`.
    at: String,
    /// The message, with its continuation lines (a model mismatch lists one per line).
    message: String,
    entry: Option<String>,
    field: Option<String>,
    help: Option<String>,
}

/// The diagnostics in `stderr`, in the order printed.
fn diagnostics(stderr: &str) -> Vec<Diag> {
    let mut out: Vec<Diag> = Vec::new();
    for line in stderr.lines() {
        if !line.starts_with(' ') {
            if let Some((at, message)) = line.split_once(": error: ") {
                out.push(Diag {
                    at: at.to_string(),
                    message: message.to_string(),
                    ..Diag::default()
                });
            }
            continue;
        }
        let Some(d) = out.last_mut() else { continue };
        if let Some(v) = line.strip_prefix("  entry: ") {
            d.entry = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("  field: ") {
            d.field = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("  help: ") {
            d.help = Some(v.to_string());
        } else {
            d.message.push('\n');
            d.message.push_str(line.trim());
        }
    }
    out
}

/// Validates `file`, which must be broken in exactly `errors` places: asserts exit code 1 and
/// the number of diagnostics, and returns stderr.
fn broken(file: &str, errors: usize) -> String {
    let (code, stderr) = validate(&[file]);
    assert_eq!(
        code, 1,
        "`validate {file}` should exit 1; stderr:\n{stderr}"
    );
    let found = diagnostics(&stderr).len();
    assert_eq!(
        found, errors,
        "{file}: expected {errors} error(s); stderr:\n{stderr}"
    );
    stderr
}

/// Asserts that `stderr` has an error at `file:line:col` whose message holds each of `words`,
/// and returns it so that the caller can check its `entry:`, `field:` and `help:` lines.
fn assert_error(stderr: &str, file: &str, line: usize, col: usize, words: &[&str]) -> Diag {
    let at = format!("{file}:{line}:{col}");
    let Some(d) = diagnostics(stderr).into_iter().find(|d| d.at == at) else {
        panic!("no error at {at}; stderr:\n{stderr}");
    };
    for w in words {
        assert!(
            d.message.contains(w),
            "the error at {at} should mention {w:?}; stderr:\n{stderr}"
        );
    }
    d
}

/// The path of a fixture in `tests/broken/`, as `validate` prints it.
fn fixture(name: &str) -> String {
    format!("tests/broken/{name}.yaml")
}

/// A folder of its own for one test under the system temp folder, removed on drop (so also
/// when the test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("latentflow-validate-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the temp folder");
        TempDir(dir)
    }

    /// A path inside the folder, as a string for command lines and diagnostics.
    fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A file of the digits data set that the fixtures use.
fn digits_file(name: &str) -> PathBuf {
    Path::new(ROOT).join("data/digits").join(name)
}

// ---------------------------------------------------------------------------------------------
// Syntax and structure of the file

#[test]
fn yaml_syntax_error() {
    let file = fixture("yaml-syntax");
    let err = broken(&file, 1);
    // The parser notices the misindented `kind` at its `:`.
    let d = assert_error(&err, &file, 5, 8, &["invalid YAML"]);
    assert_eq!(d.entry, None);
    assert!(d.help.unwrap().contains("indentation"));
}

#[test]
fn duplicate_key() {
    let file = fixture("duplicate-key");
    let err = broken(&file, 1);
    assert_error(&err, &file, 6, 5, &["duplicate key `kind`"]);
}

#[test]
fn two_yaml_documents() {
    let file = fixture("two-documents");
    let err = broken(&file, 1);
    assert_error(&err, &file, 10, 1, &["one YAML document"]);
}

#[test]
fn alias_to_an_unknown_anchor() {
    let file = fixture("unknown-alias");
    let err = broken(&file, 1);
    assert_error(&err, &file, 6, 22, &["invalid YAML", "unknown anchor"]);
}

#[test]
fn file_that_is_not_a_mapping() {
    let file = fixture("not-a-mapping");
    let err = broken(&file, 1);
    assert_error(
        &err,
        &file,
        1,
        1,
        &["must be a mapping", "`sources`", "`sinks`"],
    );
}

#[test]
fn pipeline_file_that_does_not_exist() {
    let file = fixture("does-not-exist");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 1, 1, &["cannot read the pipeline file"]);
    assert!(d.help.unwrap().contains("check the path"));
}

#[test]
fn unknown_top_level_key_suggests_the_nearest() {
    let file = fixture("unknown-top-key");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 7, 1, &["unknown key `stagse`", "the pipeline"]);
    assert_eq!(d.entry, None);
    assert_eq!(d.field.as_deref(), Some("stagse"));
    assert_eq!(d.help.as_deref(), Some("did you mean `stages`?"));
}

#[test]
fn unknown_key_in_an_entry_suggests_the_nearest() {
    let file = fixture("unknown-entry-key");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        10,
        5,
        &["unknown key `parms`", "stage entry 1"],
    );
    assert_eq!(d.entry.as_deref(), Some("decide"));
    assert_eq!(d.field.as_deref(), Some("parms"));
    assert_eq!(d.help.as_deref(), Some("did you mean `params`?"));
}

#[test]
fn unknown_key_in_settings_suggests_the_nearest() {
    let file = fixture("unknown-setting");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        4,
        3,
        &["unknown key `max_inflight`", "`settings`"],
    );
    assert_eq!(d.field.as_deref(), Some("max_inflight"));
    assert_eq!(d.help.as_deref(), Some("did you mean `max_in_flight`?"));
}

#[test]
fn unknown_key_in_a_loop_suggests_the_nearest() {
    let file = fixture("unknown-loop-key");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 10, 7, &["unknown key `max_round`"]);
    assert_eq!(d.entry.as_deref(), Some("refine"));
    assert_eq!(d.field.as_deref(), Some("max_round"));
    assert_eq!(d.help.as_deref(), Some("did you mean `max_rounds`?"));
}

#[test]
fn missing_pipeline_name() {
    let file = fixture("missing-name");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 2, 1, &["the pipeline needs the key `name`"]);
    assert_eq!(d.field.as_deref(), Some("name"));
}

#[test]
fn missing_sources() {
    let file = fixture("missing-sources");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 2, 1, &["the pipeline needs the key `sources`"]);
    assert_eq!(d.field.as_deref(), Some("sources"));
}

#[test]
fn missing_entry_name() {
    let file = fixture("missing-entry-name");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 10, 5, &["sink entry 2 needs the key `name`"]);
    assert_eq!(d.entry, None);
    assert_eq!(d.field.as_deref(), Some("name"));
}

#[test]
fn empty_entry_name() {
    let file = fixture("empty-name");
    let err = broken(&file, 1);
    assert_error(&err, &file, 4, 11, &["names must not be empty"]);
}

#[test]
fn duplicate_entry_names() {
    let file = fixture("duplicate-names");
    let err = broken(&file, 1);
    // The second use is the mistake; the first one stands.
    let d = assert_error(&err, &file, 12, 11, &["`decide` is used twice"]);
    assert_eq!(d.entry.as_deref(), Some("decide"));
    assert!(d.help.unwrap().contains("its own name"));
}

#[test]
fn no_sinks() {
    let file = fixture("no-sinks");
    let err = broken(&file, 1);
    assert_error(&err, &file, 11, 1, &["at least one entry in `sinks`"]);
}

// ---------------------------------------------------------------------------------------------
// Settings

#[test]
fn setting_of_the_wrong_type() {
    let file = fixture("setting-wrong-type");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        4,
        15,
        &["must be a whole number", "\"many\"", "epoch_size"],
    );
    assert_eq!(d.field.as_deref(), Some("epoch_size"));
}

#[test]
fn epoch_size_zero() {
    let file = fixture("epoch-size-zero");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        5,
        15,
        &["`settings.epoch_size` must be at least 1"],
    );
    assert_eq!(d.field.as_deref(), Some("epoch_size"));
}

// ---------------------------------------------------------------------------------------------
// Kinds and parameters

#[test]
fn unknown_source_kind_suggests_the_nearest() {
    let file = fixture("unknown-source-kind");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 5, 11, &["unknown source kind `nyp`"]);
    assert_eq!(d.entry.as_deref(), Some("digits"));
    assert_eq!(d.help.as_deref(), Some("did you mean `npy`?"));
}

#[test]
fn unknown_stage_kind_suggests_the_nearest() {
    let file = fixture("unknown-stage-kind");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 9, 11, &["unknown stage kind `onx`"]);
    assert_eq!(d.entry.as_deref(), Some("mlp"));
    assert_eq!(d.field, None);
    assert_eq!(d.help.as_deref(), Some("did you mean `onnx`?"));
}

#[test]
fn sink_kind_used_as_a_stage() {
    let file = fixture("sink-as-stage");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        11,
        11,
        &["unknown stage kind `classification-report`"],
    );
    assert_eq!(d.entry.as_deref(), Some("report"));
    assert_eq!(
        d.help.as_deref(),
        Some("`classification-report` is a sink; list it under `sinks`")
    );
}

#[test]
fn stage_kind_used_as_a_source() {
    let file = fixture("stage-as-source");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 5, 11, &["unknown source kind `argmax`"]);
    assert_eq!(d.entry.as_deref(), Some("digits"));
    assert_eq!(
        d.help.as_deref(),
        Some("`argmax` is a stage; list it under `stages`")
    );
}

#[test]
fn stage_kind_used_as_a_sink() {
    let file = fixture("stage-as-sink");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 9, 11, &["unknown sink kind `argmax`"]);
    assert_eq!(d.entry.as_deref(), Some("decide"));
    assert_eq!(
        d.help.as_deref(),
        Some("`argmax` is a stage; list it under `stages`")
    );
}

#[test]
fn unknown_parameter_suggests_the_nearest() {
    let file = fixture("unknown-param");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 12, 7, &["`onnx` has no parameter `max_btach`"]);
    assert_eq!(d.entry.as_deref(), Some("mlp"));
    assert_eq!(d.field.as_deref(), Some("max_btach"));
    assert_eq!(d.help.as_deref(), Some("did you mean `max_batch`?"));
}

#[test]
fn parameter_of_the_wrong_type() {
    let file = fixture("param-wrong-type");
    let err = broken(&file, 1);
    let words = [
        "parameter `max_batch` of `onnx`",
        "must be an integer",
        "found the string `lots`",
    ];
    let d = assert_error(&err, &file, 12, 18, &words);
    assert_eq!(d.entry.as_deref(), Some("mlp"));
    assert_eq!(d.field.as_deref(), Some("max_batch"));
    // The parameter's documentation says what the number means.
    assert_eq!(d.help.as_deref(), Some("most records per model call"));
}

#[test]
fn parameter_outside_its_choices() {
    let file = fixture("bad-choice");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        10,
        54,
        &[
            "parameter `device`",
            "one of cpu, cuda, auto",
            "found the string `gpu`",
        ],
    );
    assert_eq!(d.entry.as_deref(), Some("mlp"));
    assert_eq!(d.field.as_deref(), Some("device"));
}

#[test]
fn required_parameter_missing() {
    let file = fixture("missing-param");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 10, 5, &["`npy` needs the parameter `fields`"]);
    assert_eq!(d.entry.as_deref(), Some("arrays"));
    assert_eq!(d.field.as_deref(), Some("fields"));
    assert_eq!(d.help.as_deref(), Some("fields to write"));
}

#[test]
fn required_stage_parameter_missing_is_one_error() {
    let file = fixture("missing-stage-param");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        10,
        5,
        &["`argmax` needs the parameter `field`"],
    );
    assert_eq!(d.entry.as_deref(), Some("decide"));
    assert_eq!(d.field.as_deref(), Some("field"));
}

// ---------------------------------------------------------------------------------------------
// Wiring: `input` and the fields that flow between entries

#[test]
fn input_naming_no_entry_suggests_the_nearest() {
    let file = fixture("unknown-input");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 10, 12, &["input `digts` is not a source"]);
    assert_eq!(d.entry.as_deref(), Some("decide"));
    assert_eq!(d.help.as_deref(), Some("did you mean `digits`?"));
}

#[test]
fn input_naming_a_later_stage() {
    let file = fixture("later-input");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 10, 12, &["input `decide`", "earlier stage"]);
    assert_eq!(d.entry.as_deref(), Some("scaled"));
    assert!(d.help.unwrap().contains("`decide` comes later in the file"));
}

#[test]
fn input_naming_the_stage_itself() {
    let file = fixture("self-input");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 10, 12, &["input `scaled`"]);
    assert_eq!(d.entry.as_deref(), Some("scaled"));
    let help = d.help.unwrap_or_default();
    assert!(!help.contains("comes later"), "misleading hint: {help}");
}

#[test]
fn sink_input_naming_no_entry_suggests_the_nearest() {
    let file = fixture("sink-unknown-input");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        14,
        12,
        &["input `mpl` is not a source or a stage"],
    );
    assert_eq!(d.entry.as_deref(), Some("out"));
    assert_eq!(d.help.as_deref(), Some("did you mean `mlp`?"));
}

#[test]
fn first_stage_without_input_among_several_sources() {
    let file = fixture("stage-without-input");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 11, 5, &["does not say which source it reads"]);
    assert_eq!(d.entry.as_deref(), Some("decide"));
    assert_eq!(
        d.help.as_deref(),
        Some("add `input: <source>`; sources: digits, labels")
    );
}

#[test]
fn stage_reads_a_field_nobody_produces() {
    let file = fixture("unknown-field");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        13,
        21,
        &["reads field `prob`", "`mlp` does not produce"],
    );
    assert_eq!(d.entry.as_deref(), Some("decide"));
    assert_eq!(d.field.as_deref(), Some("prob"));
    assert_eq!(d.help.as_deref(), Some("did you mean `probs`?"));
}

#[test]
fn sink_reads_a_field_nobody_produces() {
    let file = fixture("sink-unknown-field");
    let err = broken(&file, 1);
    let words = ["reads field `predicted`", "`decide` does not produce"];
    let d = assert_error(&err, &file, 17, 25, &words);
    assert_eq!(d.entry.as_deref(), Some("report"));
    assert_eq!(d.field.as_deref(), Some("predicted"));
    // No name is close, so the hint lists what there is.
    assert_eq!(
        d.help.as_deref(),
        Some("expected one of: class, label, pixels")
    );
}

#[test]
fn scale_on_an_int_field() {
    let file = fixture("field-type-mismatch");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        13,
        21,
        &["field `label` is int", "tensor<f32>"],
    );
    assert_eq!(d.entry.as_deref(), Some("scaled"));
    assert_eq!(d.field.as_deref(), Some("label"));
}

#[test]
fn model_input_fed_an_int_field() {
    let file = fixture("model-input-int");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        15,
        24,
        &["field `label` is int", "tensor<f32>[64]"],
    );
    assert_eq!(d.entry.as_deref(), Some("mlp"));
    assert_eq!(d.field.as_deref(), Some("label"));
}

#[test]
fn several_errors_are_all_reported_in_file_order() {
    let file = fixture("many-errors");
    let err = broken(&file, 4);
    let at: Vec<String> = diagnostics(&err).into_iter().map(|d| d.at).collect();
    let expected: Vec<String> = ["4:15", "11:11", "14:12", "20:32"]
        .iter()
        .map(|p| format!("{file}:{p}"))
        .collect();
    assert_eq!(at, expected, "stderr:\n{err}");
    assert_error(&err, &file, 4, 15, &["epoch_size` must be at least 1"]);
    assert_error(&err, &file, 11, 11, &["unknown stage kind `onx`"]);
    assert_error(&err, &file, 14, 12, &["input `digts`"]);
    let d = assert_error(&err, &file, 20, 32, &["no parameter `pth`"]);
    assert_eq!(d.help.as_deref(), Some("did you mean `path`?"));
}

// ---------------------------------------------------------------------------------------------
// Loops

#[test]
fn loop_of_zero_rounds() {
    let file = fixture("loop-zero-rounds");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 10, 19, &["`max_rounds` must be at least 1"]);
    assert_eq!(d.entry.as_deref(), Some("refine"));
}

#[test]
fn loop_budget_field_missing_suggests_the_nearest() {
    let file = fixture("loop-budget-missing");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        14,
        15,
        &["budget field `lable` is not produced"],
    );
    assert_eq!(d.entry.as_deref(), Some("refine"));
    assert_eq!(d.field.as_deref(), Some("lable"));
    assert_eq!(d.help.as_deref(), Some("did you mean `label`?"));
}

#[test]
fn loop_budget_field_not_an_int() {
    let file = fixture("loop-budget-not-int");
    let err = broken(&file, 1);
    let words = ["budget field `pixels` is tensor<f32>[64]", "must be an int"];
    let d = assert_error(&err, &file, 14, 15, &words);
    assert_eq!(d.entry.as_deref(), Some("refine"));
    assert_eq!(d.field.as_deref(), Some("pixels"));
}

#[test]
fn nested_loop() {
    let file = fixture("loop-nested");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 13, 11, &["loops cannot be nested"]);
    assert_eq!(d.entry.as_deref(), Some("inner"));
    assert!(d.help.unwrap().contains("move the inner loop out"));
}

#[test]
fn loop_body_changes_a_field_type() {
    let file = fixture("loop-changes-type");
    let err = broken(&file, 1);
    let words = [
        "field `pixels` enters the loop as tensor<f32>[64]",
        "leaves a round as int",
    ];
    let d = assert_error(&err, &file, 11, 7, &words);
    assert_eq!(d.entry.as_deref(), Some("refine"));
    assert_eq!(d.field.as_deref(), Some("pixels"));
    assert!(d.help.unwrap().contains("unchanged in type"));
}

#[test]
fn loop_without_stages() {
    let file = fixture("loop-empty");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 11, 15, &["a loop needs at least one stage"]);
    assert_eq!(d.entry.as_deref(), Some("refine"));
}

#[test]
fn loop_stage_reading_outside_the_loop_body() {
    let file = fixture("loop-input-outside");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        17,
        18,
        &["`halv` is not an earlier stage of loop `refine`"],
    );
    assert_eq!(d.entry.as_deref(), Some("shift"));
    assert_eq!(d.help.as_deref(), Some("did you mean `halve`?"));
}

#[test]
fn entry_with_both_kind_and_loop() {
    let file = fixture("kind-and-loop");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        11,
        5,
        &["either a stage (`kind`) or a loop (`loop`)"],
    );
    assert_eq!(d.entry.as_deref(), Some("refine"));
}

#[test]
fn entry_with_neither_kind_nor_loop() {
    let file = fixture("no-kind");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 8, 5, &["this stage has no `kind`"]);
    assert_eq!(d.entry.as_deref(), Some("decide"));
    assert!(d.help.unwrap().contains("`loop:`"));
}

// ---------------------------------------------------------------------------------------------
// Model packages

#[test]
fn model_package_that_does_not_exist() {
    let file = fixture("missing-model");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        11,
        14,
        &["digits-cnn", "cannot read", "manifest.json"],
    );
    assert_eq!(d.entry.as_deref(), Some("mlp"));
    assert!(d.help.unwrap().contains("package folder"));
}

#[test]
fn unknown_model_input_suggests_the_nearest() {
    let file = fixture("unknown-model-input");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        12,
        16,
        &["model `digits-mlp` has no input `pixel`"],
    );
    assert_eq!(d.entry.as_deref(), Some("mlp"));
    assert_eq!(
        d.help.as_deref(),
        Some("did you mean `pixels`? inputs: pixels")
    );
}

#[test]
fn unknown_model_output_suggests_the_nearest() {
    let file = fixture("unknown-model-output");
    let err = broken(&file, 1);
    let d = assert_error(
        &err,
        &file,
        13,
        9,
        &["model `digits-mlp` has no output `prob`"],
    );
    assert_eq!(d.entry.as_deref(), Some("mlp"));
    assert_eq!(
        d.help.as_deref(),
        Some("did you mean `probs`? outputs: logits, probs")
    );
}

/// A pipeline that runs the package in `pkg/` on `pixels.npy`, both next to it.
const MODEL_PIPELINE: &str = "\
name: damaged-model
sources:
  - name: digits
    kind: npy
    params: {arrays: {pixels: pixels.npy}}
stages:
  - name: mlp
    kind: onnx
    params: {model: pkg}
sinks:
  - name: out
    kind: jsonl
";

/// Where in `MODEL_PIPELINE` package errors point: the value of `model`.
const MODEL_AT: (usize, usize) = (9, 21);

/// A temp folder with `pipeline.yaml` (`MODEL_PIPELINE`), the digits pixels, and a copy of the
/// digits-mlp package whose manifest `edit` has changed.
fn damaged_model(test: &str, edit: impl FnOnce(&mut Json)) -> TempDir {
    let dir = TempDir::new(test);
    let src = Path::new(ROOT).join("models/digits-mlp");
    let pkg = dir.0.join("pkg");
    fs::create_dir(&pkg).unwrap();
    fs::copy(src.join("model.onnx"), pkg.join("model.onnx")).unwrap();
    let mut manifest: Json =
        serde_json::from_str(&fs::read_to_string(src.join("manifest.json")).unwrap()).unwrap();
    edit(&mut manifest);
    let text = serde_json::to_string_pretty(&manifest).unwrap();
    fs::write(pkg.join("manifest.json"), text).unwrap();
    fs::copy(digits_file("test-pixels.npy"), dir.0.join("pixels.npy")).unwrap();
    fs::write(dir.0.join("pipeline.yaml"), MODEL_PIPELINE).unwrap();
    dir
}

#[test]
fn model_file_differs_from_the_manifest_checksum() {
    let dir = damaged_model("checksum", |m| m["sha256"] = json!("0".repeat(64)));
    let file = dir.path("pipeline.yaml");
    let err = broken(&file, 1);
    let (line, col) = MODEL_AT;
    let d = assert_error(
        &err,
        &file,
        line,
        col,
        &["SHA-256", "the manifest says 0000"],
    );
    assert_eq!(d.entry.as_deref(), Some("mlp"));
    assert!(d.help.unwrap().contains("latentflow models check"));
}

#[test]
fn manifest_input_shape_differs_from_the_model() {
    // The records are as wide as the manifest says (65), so only the model check can object.
    let dir = damaged_model("input-shape", |m| m["inputs"][0]["shape"][1] = json!(65));
    ndarray_npy::write_npy(
        dir.path("pixels.npy"),
        &ndarray::Array2::<f32>::zeros((4, 65)),
    )
    .unwrap();
    let file = dir.path("pipeline.yaml");
    let err = broken(&file, 1);
    let (line, col) = MODEL_AT;
    let words = [
        "the manifest does not match",
        "input `pixels` axis 1: manifest says fixed 65, ONNX file says fixed 64",
    ];
    let d = assert_error(&err, &file, line, col, &words);
    assert_eq!(d.entry.as_deref(), Some("mlp"));
}

#[test]
fn manifest_input_shape_differs_from_the_model_and_the_data() {
    let dir = damaged_model("input-shape-data", |m| {
        m["inputs"][0]["shape"][1] = json!(65)
    });
    let file = dir.path("pipeline.yaml");
    let (code, err) = validate(&[&file]);
    assert_eq!(code, 1, "{err}");
    let found = diagnostics(&err)
        .iter()
        .any(|d| d.message.contains("the manifest does not match"));
    assert!(
        found,
        "the manifest mismatch should be reported; stderr:\n{err}"
    );
}

#[test]
fn no_models_skips_the_model_check() {
    // Without ONNX Runtime the checksum and signature cannot be compared; wiring still is.
    let dir = damaged_model("no-models", |m| m["sha256"] = json!("0".repeat(64)));
    let (code, err) = validate(&["--no-models", &dir.path("pipeline.yaml")]);
    assert_eq!(code, 0, "stderr:\n{err}");
}

// ---------------------------------------------------------------------------------------------
// Array files of an `npy` source

/// A pipeline reading `pixels.npy` and `label.npy` next to it.
const ARRAYS_PIPELINE: &str = "\
name: damaged-arrays
sources:
  - name: digits
    kind: npy
    params:
      arrays:
        pixels: pixels.npy
        label: label.npy
sinks:
  - name: out
    kind: jsonl
";

/// A temp folder with `pipeline.yaml` (`ARRAYS_PIPELINE`) and the digits arrays.
fn arrays(test: &str) -> TempDir {
    let dir = TempDir::new(test);
    fs::copy(digits_file("test-pixels.npy"), dir.path("pixels.npy")).unwrap();
    fs::copy(digits_file("test-labels.npy"), dir.path("label.npy")).unwrap();
    fs::write(dir.path("pipeline.yaml"), ARRAYS_PIPELINE).unwrap();
    dir
}

#[test]
fn truncated_npy_file() {
    let dir = arrays("truncated");
    let whole = fs::read(digits_file("test-pixels.npy")).unwrap();
    fs::write(dir.path("pixels.npy"), &whole[..1000]).unwrap();
    let file = dir.path("pipeline.yaml");
    let err = broken(&file, 1);
    let words = [
        "pixels.npy",
        "truncated",
        "promises 92288 bytes",
        "has 1000",
    ];
    let d = assert_error(&err, &file, 7, 17, &words);
    assert_eq!(d.entry.as_deref(), Some("digits"));
}

#[test]
fn file_that_is_not_npy() {
    let dir = arrays("not-npy");
    fs::write(dir.path("label.npy"), "label\n7\n3\n1\n").unwrap();
    let file = dir.path("pipeline.yaml");
    let err = broken(&file, 1);
    let d = assert_error(&err, &file, 8, 16, &["label.npy", "not a .npy file"]);
    assert_eq!(d.entry.as_deref(), Some("digits"));
}

#[test]
fn npy_files_of_different_lengths() {
    let dir = arrays("row-counts");
    ndarray_npy::write_npy(dir.path("label.npy"), &ndarray::Array1::<i64>::zeros(5)).unwrap();
    let file = dir.path("pipeline.yaml");
    let err = broken(&file, 1);
    let words = ["`label.npy` has 5 rows", "`pixels.npy` has 360"];
    let d = assert_error(&err, &file, 8, 16, &words);
    assert_eq!(d.entry.as_deref(), Some("digits"));
    assert!(d.help.unwrap().contains("same number of rows"));
}

// ---------------------------------------------------------------------------------------------
// Valid files and the descriptions of the format

#[test]
fn shipped_pipelines_are_valid() {
    let mut files: Vec<String> = fs::read_dir(Path::new(ROOT).join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .map(|n| format!("pipelines/{n}"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no pipelines in pipelines/");
    let shared = Path::new(ROOT).join("../shared/data");
    for f in &files {
        let text = fs::read_to_string(Path::new(ROOT).join(f)).unwrap();
        if text.contains("shared/data/") && !shared.exists() {
            eprintln!(
                "skipping {f}: it reads {}, which is absent",
                shared.display()
            );
            continue;
        }
        for flags in [&[][..], &["--no-models"][..]] {
            let mut args = flags.to_vec();
            args.push(f);
            let (code, err) = validate(&args);
            assert_eq!(
                code,
                0,
                "`validate {}` should pass; stderr:\n{err}",
                args.join(" ")
            );
        }
    }
}

#[test]
fn schema_is_json_listing_the_stage_kinds() {
    let out = latentflow(&["schema"]);
    assert!(out.status.success());
    let schema: Json = serde_json::from_slice(&out.stdout).expect("`schema` prints JSON");
    let kinds = schema
        .pointer("/$defs/StageSpec/properties/kind/enum")
        .and_then(Json::as_array)
        .expect("StageSpec.kind has an enum");
    assert!(kinds.contains(&json!("onnx")), "kinds: {kinds:?}");
}

#[test]
fn stages_lists_onnx_with_max_batch() {
    let out = latentflow(&["stages"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // A kind is a line indented by two spaces; its parameters follow, indented by four.
    let mut lines = text.lines().skip_while(|l| !l.starts_with("  onnx "));
    assert!(lines.next().is_some(), "no `onnx` kind in:\n{text}");
    let params: Vec<&str> = lines.take_while(|l| l.starts_with("    ")).collect();
    assert!(
        params
            .iter()
            .any(|l| l.trim_start().starts_with("max_batch ")),
        "`onnx` lists no `max_batch`:\n{text}"
    );
}
