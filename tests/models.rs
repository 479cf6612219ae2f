//! Every committed model package, run through a pipeline on its reference inputs, must give
//! the outputs that ONNX Runtime's Python API gave when the package was made (saved in
//! `reference/outputs/`), and its manifest must describe its ONNX file exactly.

mod common;

use std::path::{Path, PathBuf};

use common::{latentflow, read_npy, root, scratch, text, write_pipeline};

fn packages() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("manifest.json").exists())
        .collect();
    dirs.sort();
    dirs
}

fn names(manifest: &serde_json::Value, key: &str) -> Vec<String> {
    manifest[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

/// Runs one package on its reference inputs and compares every output.
fn check_package(dir: &Path) {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let batched = manifest["batch"].as_bool().unwrap_or(true);
    let inputs = names(&manifest, "inputs");
    let outputs = names(&manifest, "outputs");
    let reference = dir.join("reference");
    assert!(
        reference.join("inputs").is_dir(),
        "{}: no reference/inputs",
        dir.display()
    );

    let arrays: Vec<String> = inputs
        .iter()
        .map(|i| {
            format!(
                "{i}: {}",
                reference.join(format!("inputs/{i}.npy")).display()
            )
        })
        .collect();
    let wiring: Vec<String> = outputs.iter().map(|o| format!("{o}: out_{o}")).collect();
    let fields: Vec<String> = outputs.iter().map(|o| format!("out_{o}")).collect();
    let yaml = format!(
        "name: package-check
sources:
  - name: reference
    kind: npy
    params: {{arrays: {{{}}}, whole: {}}}
stages:
  - name: model
    kind: onnx
    params: {{model: {}, device: cpu, outputs: {{{}}}}}
sinks:
  - {{name: out, kind: npy, params: {{fields: [{}]}}}}
",
        arrays.join(", "),
        !batched,
        dir.display(),
        wiring.join(", "),
        fields.join(", ")
    );
    let name = dir.file_name().unwrap().to_string_lossy().to_string();
    let work = scratch(&format!("pkg-{name}"));
    let file = write_pipeline(&work, "check.yaml", &yaml);
    let out = work.join("out");
    let o = latentflow(&[
        "run",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{name}: {}", text(&o));

    for o in &outputs {
        let (want_shape, want) = read_npy(&reference.join(format!("outputs/{o}.npy")));
        let (mut shape, got) = read_npy(&out.join(format!("out_{o}.npy")));
        if !batched {
            // The sink stacks the single record's tensor under a leading axis of 1.
            assert_eq!(shape[0], 1);
            shape.remove(0);
        }
        assert_eq!(shape, want_shape, "{name}: output `{o}` shape");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs() / (1.0 + w.abs()))
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-5,
            "{name}: output `{o}` differs by {worst:e} (relative to 1 + |ref|)"
        );
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn every_package_matches_its_manifest() {
    let dirs = packages();
    assert!(!dirs.is_empty());
    let mut args = vec!["models", "check"];
    let paths: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    args.extend(paths.iter().map(|s| s.as_str()));
    let o = latentflow(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).matches("ok: ").count(),
        dirs.len()
    );
}

#[test]
fn every_package_reproduces_its_reference_outputs() {
    for dir in packages() {
        check_package(&dir);
    }
}

#[test]
fn a_damaged_package_is_refused() {
    let work = scratch("damaged");
    let src = root().join("models/digits-mlp");
    for f in ["manifest.json", "model.onnx"] {
        std::fs::copy(src.join(f), work.join(f)).unwrap();
    }
    let mut bytes = std::fs::read(work.join("model.onnx")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(work.join("model.onnx"), bytes).unwrap();
    let o = latentflow(&["models", "check", work.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("sha256"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn the_models_command_lists_packages_with_their_tensors() {
    let o = latentflow(&["models"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("digits-mlp"), "{s}");
    assert!(s.contains("in   `pixels` f32[batch, 64]"), "{s}");
    assert!(s.contains("out  `probs` f32[batch, 10]"), "{s}");
}
