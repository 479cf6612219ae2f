//! End-to-end runs through the CLI: real model, real data, outputs checked against independent
//! references (ONNX Runtime's Python API, closed-form arithmetic).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{latentflow, max_abs_diff, read_npy, root, scratch, text, write_pipeline};

fn digits_pipeline(dir: &Path, device: &str) -> PathBuf {
    let r = root();
    let yaml = format!(
        "name: digits
sources:
  - name: digits
    kind: npy
    params:
      arrays: {{pixels: {data}/test-pixels.npy, label: {data}/test-labels.npy}}
stages:
  - name: mlp
    kind: onnx
    params: {{model: {model}, device: {device}, max_batch: 32}}
sinks:
  - name: arrays
    kind: npy
    params: {{fields: [logits, probs, label]}}
  - name: lines
    kind: jsonl
    params: {{fields: [label, probs]}}
",
        data = r.join("data/digits").display(),
        model = r.join("models/digits-mlp").display(),
    );
    write_pipeline(dir, "digits.yaml", &yaml)
}

#[test]
fn onnx_outputs_match_onnxruntime_python() {
    let dir = scratch("ort");
    let file = digits_pipeline(&dir, "cpu");
    let out = dir.join("out");
    let o = latentflow(&[
        "run",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));

    // Reference computed now by ONNX Runtime's Python API on the same inputs.
    let py = root().join(".venv/bin/python");
    let refdir = dir.join("ref");
    let r = Command::new(&py)
        .arg(root().join("scripts/ort_reference.py"))
        .arg(root().join("models/digits-mlp/model.onnx"))
        .arg(&refdir)
        .arg(format!(
            "pixels={}",
            root().join("data/digits/test-pixels.npy").display()
        ))
        .output()
        .expect("the project's Python (scripts/setup.sh creates .venv)");
    assert!(r.status.success(), "{}", text(&r));
    for name in ["logits", "probs"] {
        let (shape, ours) = read_npy(&out.join(format!("{name}.npy")));
        let (rshape, theirs) = read_npy(&refdir.join(format!("{name}.npy")));
        assert_eq!(shape, rshape);
        assert_eq!(shape, vec![360, 10]);
        let d = max_abs_diff(&ours, &theirs);
        assert!(d <= 1e-5, "{name}: max abs difference {d}");
        // And the reference committed with the model package (its first 32 rows).
        let saved = root().join(format!("models/digits-mlp/reference/outputs/{name}.npy"));
        let (_, saved) = read_npy(&saved);
        assert!(max_abs_diff(&ours[..saved.len()], &saved) <= 1e-5);
    }
    // Labels pass through untouched and in source order.
    let (_, labels) = read_npy(&out.join("label.npy"));
    let (_, want) = read_npy(&root().join("data/digits/test-labels.npy"));
    assert_eq!(labels, want);
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["records_read"], 360);
    assert_eq!(metrics["entries"]["mlp"]["records_out"], 360);
    assert!(!out.join("errors.jsonl").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_and_two_workers_write_identical_files() {
    let dir = scratch("workers");
    let file = digits_pipeline(&dir, "cpu");
    let mut outs = Vec::new();
    for w in ["1", "2", "3"] {
        let out = dir.join(format!("out{w}"));
        let o = latentflow(&[
            "run",
            file.to_str().unwrap(),
            "-w",
            w,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        outs.push(out);
    }
    for f in [
        "logits.npy",
        "probs.npy",
        "label.npy",
        "keys.txt",
        "records.jsonl",
    ] {
        let a = std::fs::read(outs[0].join(f)).unwrap();
        for o in &outs[1..] {
            assert!(
                a == std::fs::read(o.join(f)).unwrap(),
                "{f} differs in {}",
                o.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn loops_run_each_record_for_its_budget() {
    // Each round halves x; record i has budget i % 5 (the synthetic int field), so the output
    // must be x * 0.5^(i % 5), capped at max_rounds = 3.
    let dir = scratch("loop");
    let yaml = "name: halving
settings: {epoch_size: 7}
sources:
  - {name: numbers, kind: synthetic, params: {count: 50, shape: [3], seed: 4, int_field: steps, int_max: 4}}
stages:
  - name: copy
    kind: scale
    params: {field: x, output: x0}
  - name: refine
    loop:
      max_rounds: 3
      budget: steps
      stages:
        - {name: halve, kind: scale, params: {field: x, factor: 0.5}}
sinks:
  - {name: out, kind: npy, params: {fields: [x0, x, steps]}}
";
    let file = write_pipeline(&dir, "loop.yaml", yaml);
    for w in ["1", "2"] {
        let out = dir.join(format!("out{w}"));
        let o = latentflow(&[
            "run",
            file.to_str().unwrap(),
            "-w",
            w,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let (_, x0) = read_npy(&out.join("x0.npy"));
        let (_, x) = read_npy(&out.join("x.npy"));
        let (_, steps) = read_npy(&out.join("steps.npy"));
        assert_eq!(steps.len(), 50);
        for i in 0..50 {
            assert_eq!(steps[i] as usize, i % 5);
            let rounds = (i % 5).min(3) as i32;
            for j in 0..3 {
                let want = x0[i * 3 + j] * 0.5f64.powi(rounds);
                assert!(
                    (x[i * 3 + j] - want).abs() < 1e-7,
                    "record {i}: {} vs {want}",
                    x[i * 3 + j]
                );
            }
        }
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap())
                .unwrap();
        // Rounds run = sum over records of min(i % 5, 3) = 10 * (0 + 1 + 2 + 3 + 3).
        assert_eq!(m["entries"]["halve"]["records_out"], 90);
        assert_eq!(m["entries"]["refine"]["records_out"], 50);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn failing_records_go_to_the_errors_file_and_the_run_goes_on() {
    let dir = scratch("errors");
    let yaml = "name: with-nans
sources:
  - {name: noise, kind: synthetic, params: {count: 40, shape: [4], nan_every: 10}}
stages:
  - {name: guard, kind: check-finite, params: {fields: [x]}}
sinks:
  - {name: out, kind: jsonl, params: {path: ok.jsonl}}
";
    let file = write_pipeline(&dir, "nans.yaml", yaml);
    let out = dir.join("out");
    let o = latentflow(&[
        "run",
        file.to_str().unwrap(),
        "-w",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "exit code 3 means: finished, some records failed\n{}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("4 failed"),
        "{}",
        text(&o)
    );
    let errors = std::fs::read_to_string(out.join("errors.jsonl")).unwrap();
    let mut keys: Vec<String> = errors
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["stage"], "guard");
            assert!(v["reason"].as_str().unwrap().contains("NaN"), "{l}");
            v["key"].as_str().unwrap().to_string()
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "synthetic:00000009",
            "synthetic:00000019",
            "synthetic:00000029",
            "synthetic:00000039"
        ]
    );
    let ok = std::fs::read_to_string(out.join("ok.jsonl")).unwrap();
    assert_eq!(ok.lines().count(), 36);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn records_the_model_cannot_take_fail_alone() {
    // The synthetic tensors have 65 values; the model takes 64. Validation catches that when
    // the field is typed, so feed it through a jsonl source whose type leaves the length open.
    let dir = scratch("shape");
    let mut lines = String::new();
    for i in 0..6 {
        let n = if i == 2 { 65 } else { 64 };
        let v: Vec<String> = (0..n).map(|j| ((i + j) % 17).to_string()).collect();
        lines.push_str(&format!(
            "{{\"key\": \"r{i}\", \"pixels\": [{}]}}\n",
            v.join(",")
        ));
    }
    lines.push_str("{not json\n");
    std::fs::write(dir.join("in.jsonl"), lines).unwrap();
    let yaml = format!(
        "name: shapes
sources:
  - {{name: rows, kind: jsonl, params: {{path: in.jsonl, fields: {{pixels: 'f32[n]'}}}}}}
stages:
  - {{name: mlp, kind: onnx, params: {{model: {}, device: cpu}}}}
sinks:
  - {{name: out, kind: jsonl, params: {{fields: [probs]}}}}
",
        root().join("models/digits-mlp").display()
    );
    let file = write_pipeline(&dir, "shapes.yaml", &yaml);
    let out = dir.join("out");
    let o = latentflow(&[
        "run",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let errors = std::fs::read_to_string(out.join("errors.jsonl")).unwrap();
    assert_eq!(errors.lines().count(), 2, "{errors}");
    assert!(
        errors.contains("\"key\":\"r2\"") && errors.contains("[65]"),
        "{errors}"
    );
    assert!(errors.contains("line 7"), "{errors}");
    let ok = std::fs::read_to_string(out.join("records.jsonl")).unwrap();
    assert_eq!(ok.lines().count(), 5);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cuda_fails_loudly_and_auto_falls_back_with_a_reason() {
    if std::env::var("LATENTFLOW_EXPECT_GPU").is_ok() {
        return; // the GPU check script covers machines with a GPU
    }
    let dir = scratch("device");
    let file = digits_pipeline(&dir, "cuda");
    let o = latentflow(&[
        "run",
        file.to_str().unwrap(),
        "--out",
        dir.join("cuda").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("CUDA"), "{err}");
    assert!(!dir.join("cuda/arrays").exists());

    let file = digits_pipeline(&dir, "auto");
    let o = latentflow(&[
        "run",
        file.to_str().unwrap(),
        "--out",
        dir.join("auto").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("WARN") && err.contains("using CPU"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_processes_on_loopback_match_one_process() {
    let dir = scratch("cluster");
    let file = digits_pipeline(&dir, "cpu");
    let single = dir.join("single");
    let o = latentflow(&[
        "run",
        file.to_str().unwrap(),
        "--out",
        single.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let hosts = dir.join("hosts.txt");
    std::fs::write(
        &hosts,
        format!("127.0.0.1:{port}\n127.0.0.1:{}\n", port + 1),
    )
    .unwrap();
    let multi = dir.join("multi");
    let children: Vec<_> = (0..2)
        .map(|p| {
            Command::new(env!("CARGO_BIN_EXE_latentflow"))
                .args([
                    "run",
                    file.to_str().unwrap(),
                    "--out",
                    multi.to_str().unwrap(),
                ])
                .args(["--processes", "2", "--process", &p.to_string()])
                .args(["--hostfile", hosts.to_str().unwrap()])
                .env("RUST_LOG", "warn")
                .current_dir(root())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        let status = c.wait().unwrap();
        assert!(status.success());
    }
    for f in [
        "logits.npy",
        "probs.npy",
        "label.npy",
        "keys.txt",
        "records.jsonl",
    ] {
        assert!(
            std::fs::read(single.join(f)).unwrap() == std::fs::read(multi.join(f)).unwrap(),
            "{f} differs between one and two processes"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_bundled_pipelines_validate_and_the_main_job_runs() {
    for entry in std::fs::read_dir(root().join("pipelines")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            let shared = root().join("../shared/data");
            let text_in = std::fs::read_to_string(&p).unwrap();
            if text_in.contains("shared/data/") && !shared.exists() {
                eprintln!("skipping {}: {} is absent", p.display(), shared.display());
                continue;
            }
            let o = latentflow(&["validate", p.to_str().unwrap()]);
            assert!(o.status.success(), "{}: {}", p.display(), text(&o));
        }
    }
    let dir = scratch("main");
    let o = latentflow(&[
        "run",
        "pipelines/classify-digits.yaml",
        "-w",
        "2",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    // The model package's README reports 0.9833 (354 of 360) for this split.
    assert_eq!(report["records"], 360);
    assert!(
        (report["accuracy"].as_f64().unwrap() - 354.0 / 360.0).abs() < 1e-9,
        "{report}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn memory_stays_flat_when_the_input_grows_tenfold() {
    // 1 KiB per record: 200k records are 200 MiB of data, far more than the pipeline may hold
    // (max_in_flight × epoch_size records). Peak memory must not grow with the input.
    let dir = scratch("memory");
    let mut peaks = Vec::new();
    for count in [20_000, 200_000] {
        let yaml = format!(
            "name: big
settings: {{epoch_size: 64, max_in_flight: 4}}
sources:
  - {{name: noise, kind: synthetic, params: {{count: {count}, shape: [256], int_field: k, int_max: 9}}}}
stages:
  - {{name: half, kind: scale, params: {{field: x, factor: 0.5}}}}
sinks:
  - {{name: out, kind: npy, params: {{fields: [k]}}}}
"
        );
        let file = write_pipeline(&dir, &format!("big{count}.yaml"), &yaml);
        let out = dir.join(format!("out{count}"));
        let o = latentflow(&[
            "run",
            file.to_str().unwrap(),
            "-w",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap())
                .unwrap();
        assert_eq!(m["records_read"], count);
        peaks.push(m["peak_rss_mib"].as_f64().unwrap());
    }
    assert!(
        peaks[1] < 100.0,
        "peak {} MiB for 200 MiB of input",
        peaks[1]
    );
    assert!(
        peaks[1] < peaks[0] * 1.5 + 8.0,
        "peak grew from {} to {} MiB",
        peaks[0],
        peaks[1]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
