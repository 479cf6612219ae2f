//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/` and `fuzz/seeds/<target>/`)
//! through the same functions the cargo-fuzz targets call (`fuzz/harness.rs`), on stable Rust
//! and without libFuzzer: every file must be handled without a panic (errors are the expected
//! answer to bad input). This keeps the inputs the fuzzers found, including past crashes, from
//! regressing in CI.
//!
//! `cargo test --test fuzz_corpus`; one test per target.

use std::path::{Path, PathBuf};
use std::time::Instant;

#[path = "../fuzz/harness.rs"]
mod harness;

fn files_in(folder: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(folder)
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Replays a target's corpus and its hand-made seeds (`fuzz/seeds/<target>/`, which hold the
/// inputs of fixed crashes whether or not minimising kept them in the corpus).
fn replay(target: &str) {
    replay_folder("corpus", target);
    replay_folder("seeds", target);
}

/// Replays `fuzz/<folder>/<target>/*` and fails, listing them, if any input panics.
fn replay_folder(folder: &str, target: &str) {
    let run = harness::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .expect("a harness target");
    let files = files_in(folder, target);
    assert!(
        !files.is_empty(),
        "fuzz/{folder}/{target}/ holds no inputs; see fuzz/README.md"
    );
    let start = Instant::now();
    let mut panicked = Vec::new();
    for f in &files {
        let data = std::fs::read(f).expect("read a corpus file");
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panicked.push(f.display().to_string());
        }
    }
    harness::cleanup();
    eprintln!(
        "{target}: {} inputs replayed in {:.2?}",
        files.len(),
        start.elapsed()
    );
    assert!(
        panicked.is_empty(),
        "{} of {} inputs of fuzz/{folder}/{target} panicked:\n  {}",
        panicked.len(),
        files.len(),
        panicked.join("\n  ")
    );
}

#[test]
fn every_target_has_a_test() {
    let names: Vec<&str> = harness::TARGETS.iter().map(|(n, _)| *n).collect();
    let dirs: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus"))
            .expect("fuzz/corpus")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
    for d in &dirs {
        assert!(
            names.contains(&d.as_str()),
            "fuzz/corpus/{d} has no harness target"
        );
    }
    assert_eq!(
        names,
        [
            "pipeline",
            "npy",
            "jsonl",
            "image",
            "graph_npz",
            "graph_tu",
            "graph_csv",
            "graph_ogb"
        ],
        "a new target needs a replay test below"
    );
}

#[test]
fn pipeline() {
    replay("pipeline");
}

#[test]
fn npy() {
    replay("npy");
}

#[test]
fn jsonl() {
    replay("jsonl");
}

#[test]
fn image() {
    replay("image");
}

#[test]
fn graph_npz() {
    replay("graph_npz");
}

#[test]
fn graph_tu() {
    replay("graph_tu");
}

#[test]
fn graph_csv() {
    replay("graph_csv");
}

#[test]
fn graph_ogb() {
    replay("graph_ogb");
}
