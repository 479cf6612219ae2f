//! Crash and resume, end to end through the CLI: runs are killed (`SIGKILL`) after a chosen
//! number of journaled epochs, resumed with `--resume`, and every output file is compared byte
//! for byte with an uninterrupted run. Also: failures before the crash appear once, a changed
//! pipeline file or model package is refused, an unwritable output folder and a full disk are
//! reported (and the run resumes once the disk has room), and resuming a finished run computes
//! nothing.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{latentflow, root, scratch, text, write_pipeline};
use latentflow_engine::journal::parse_segment;

/// Epochs of the test pipeline: 360 digits (and 360 noise records) in epochs of 8.
const EPOCHS: u64 = 45;

/// The digits classifier behind a loop of `rounds` no-op rounds (to make epochs take time),
/// and beside it a noise source whose every 31st record holds a NaN and fails.
fn pipeline(dir: &Path, model: &Path, rounds: u32, name: &str) -> PathBuf {
    let data = root().join("data/digits");
    let yaml = format!(
        "name: resume
settings: {{epoch_size: 8, max_in_flight: 3}}
sources:
  - name: digits
    kind: npy
    params:
      arrays: {{pixels: {data}/test-pixels.npy, label: {data}/test-labels.npy}}
  - {{name: noise, kind: synthetic, params: {{count: 360, shape: [4], nan_every: 31}}}}
stages:
  - name: slow
    input: digits
    loop:
      max_rounds: {rounds}
      stages:
        - {{name: step, kind: scale, params: {{field: pixels, factor: 1.0}}}}
  - name: mlp
    kind: onnx
    params: {{model: {model}, device: cpu, max_batch: 8}}
  - name: decide
    kind: argmax
    params: {{field: probs, output: predicted}}
  - {{name: guard, input: noise, kind: check-finite, params: {{fields: [x]}}}}
sinks:
  - {{name: arrays, input: decide, kind: npy, params: {{fields: [logits, probs, label]}}}}
  - {{name: lines, input: decide, kind: jsonl, params: {{fields: [label, predicted]}}}}
  - {{name: report, input: decide, kind: classification-report, params: {{label: label, predicted: predicted}}}}
  - {{name: kept, input: guard, kind: jsonl, params: {{path: noise.jsonl}}}}
",
        data = data.display(),
        model = model.display(),
    );
    write_pipeline(dir, name, &yaml)
}

fn digits_model() -> PathBuf {
    root().join("models/digits-mlp")
}

fn run_args(file: &Path, out: &Path, workers: usize, resume: bool) -> Vec<String> {
    let mut a = vec![
        "run".to_string(),
        file.display().to_string(),
        "-w".into(),
        workers.to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    if resume {
        a.push("--resume".into());
    }
    a
}

fn run(file: &Path, out: &Path, workers: usize, resume: bool) -> Output {
    let args = run_args(file, out, workers, resume);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    latentflow(&args)
}

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_latentflow"))
        .args(args)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("latentflow starts")
}

/// Epochs in a journal folder's segment files (`epochs-<first>-<last>.rec`).
fn journaled(journal: &Path) -> u64 {
    std::fs::read_dir(journal)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| parse_segment(&e.file_name().to_string_lossy()))
                .map(|(first, last)| last + 1 - first)
                .sum()
        })
        .unwrap_or(0)
}

/// Kills `children` with SIGKILL once `journal` holds at least `k` epochs; returns how many
/// it held then.
fn kill_after(children: Vec<Child>, journal: &Path, k: u64) -> u64 {
    let start = Instant::now();
    while journaled(journal) < k {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} never reached {k} epochs",
            journal.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    for mut c in children {
        let _ = c.kill();
        let status = c.wait().unwrap();
        assert!(
            status.code().is_none(),
            "the run finished before it was killed at {k} epochs ({status}); make it slower"
        );
    }
    journaled(journal)
}

/// `(replayed, computed)` from the summary line `journal …: R epochs replayed, C computed`.
fn epochs(o: &Output) -> (u64, u64) {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("epochs replayed"))
        .unwrap_or_else(|| panic!("no journal line\n{}", text(o)));
    let nums: Vec<u64> = line
        .rsplit(':')
        .next()
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    (nums[0], nums[1])
}

fn metrics(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap()
}

/// Every file of a run folder but `metrics.json` (timings) and the journal, by name.
fn outputs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if e.file_type().unwrap().is_file() && name != "metrics.json" && !name.starts_with('.') {
            files.insert(name, std::fs::read(e.path()).unwrap());
        }
    }
    files
}

fn assert_same(reference: &BTreeMap<String, Vec<u8>>, dir: &Path, what: &str) {
    let got = outputs(dir);
    assert_eq!(
        reference.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>(),
        "{what}: different files"
    );
    for (name, bytes) in reference {
        assert!(
            bytes == &got[name],
            "{what}: {name} differs from the uninterrupted run"
        );
    }
}

/// Keys in an errors file, each once, or a panic naming the repeated one.
fn error_keys(files: &[PathBuf]) -> Vec<String> {
    let mut keys = Vec::new();
    for f in files {
        if let Ok(t) = std::fs::read_to_string(f) {
            for l in t.lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                keys.push(v["key"].as_str().unwrap().to_string());
            }
        }
    }
    let mut sorted = keys.clone();
    sorted.sort();
    for w in sorted.windows(2) {
        assert_ne!(w[0], w[1], "{} is in the errors file twice", w[0]);
    }
    sorted
}

/// A reference run: its outputs and error keys.
fn reference(dir: &Path, file: &Path) -> BTreeMap<String, Vec<u8>> {
    let out = dir.join("reference");
    let o = run(file, &out, 1, false);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_eq!(epochs(&o), (0, EPOCHS));
    let r = outputs(&out);
    assert!(r.contains_key("errors.jsonl") && r.contains_key("probs.npy"));
    r
}

/// Kills one run at five points and resumes each; one of them is killed again while resuming.
#[test]
fn killed_runs_resume_to_the_same_bytes() {
    let dir = scratch("resume-kill");
    let file = pipeline(&dir, &digits_model(), 60, "slow.yaml");
    let want = reference(&dir, &file);
    let want_errors = error_keys(&[dir.join("reference/errors.jsonl")]);
    for k in [1, 8, 16, 25, 34] {
        let out = dir.join(format!("k{k}"));
        let held = kill_after(
            vec![spawn(&run_args(&file, &out, 1, false))],
            &out.join(".journal"),
            k,
        );
        let o = run(&file, &out, 1, true);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        let (replayed, computed) = epochs(&o);
        assert!(replayed >= k && replayed <= held, "k={k}: {}", text(&o));
        assert_eq!(replayed + computed, EPOCHS, "k={k}");
        assert_same(&want, &out, &format!("killed after {k} epochs"));
        // The first NaN record (seq 30, epoch 3) failed before the crash: it is replayed from
        // the journal, and in the errors file once.
        assert_eq!(error_keys(&[out.join("errors.jsonl")]), want_errors);
        let m = metrics(&out);
        assert_eq!(m["journal"]["epochs_replayed"], replayed);
        if replayed > 3 {
            assert!(m["journal"]["failures_replayed"].as_u64().unwrap() >= 1);
        }
    }

    // Killed, resumed, killed again while resuming, resumed again.
    let out = dir.join("twice");
    kill_after(
        vec![spawn(&run_args(&file, &out, 1, false))],
        &out.join(".journal"),
        12,
    );
    let held = kill_after(
        vec![spawn(&run_args(&file, &out, 1, true))],
        &out.join(".journal"),
        28,
    );
    let o = run(&file, &out, 1, true);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let (replayed, _) = epochs(&o);
    assert!((28..=held).contains(&replayed), "{}", text(&o));
    assert_same(&want, &out, "killed twice");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two workers: killed at two points, resumed with two workers and with one.
#[test]
fn killed_runs_with_two_workers_resume_to_the_same_bytes() {
    let dir = scratch("resume-workers");
    let file = pipeline(&dir, &digits_model(), 60, "slow.yaml");
    let want = reference(&dir, &file);
    for (k, resume_workers) in [(6, 2), (27, 1)] {
        let out = dir.join(format!("k{k}"));
        kill_after(
            vec![spawn(&run_args(&file, &out, 2, false))],
            &out.join(".journal"),
            k,
        );
        let o = run(&file, &out, resume_workers, true);
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        let (replayed, computed) = epochs(&o);
        assert!(replayed >= k, "{}", text(&o));
        assert_eq!(replayed + computed, EPOCHS);
        assert_same(&want, &out, &format!("two workers killed after {k} epochs"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two processes on loopback, both killed, both resumed.
#[test]
fn killed_two_process_runs_resume_to_the_same_records() {
    let dir = scratch("resume-cluster");
    let file = pipeline(&dir, &digits_model(), 60, "slow.yaml");
    let want = reference(&dir, &file);
    let want_errors = error_keys(&[dir.join("reference/errors.jsonl")]);
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
    let out = dir.join("multi");
    let args = |p: usize, resume: bool| {
        let mut a = run_args(&file, &out, 1, resume);
        a.extend([
            "--processes".into(),
            "2".into(),
            "--process".into(),
            p.to_string(),
            "--hostfile".into(),
            hosts.display().to_string(),
        ]);
        a
    };
    kill_after(
        vec![spawn(&args(0, false)), spawn(&args(1, false))],
        &out.join(".journal"),
        20,
    );
    let children: Vec<_> = (0..2)
        .map(|p| {
            Command::new(env!("CARGO_BIN_EXE_latentflow"))
                .args(args(p, true))
                .current_dir(root())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut counts = Vec::new();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(matches!(o.status.code(), Some(0 | 3)), "{}", text(&o));
        let (replayed, computed) = epochs(&o);
        // Process 1 journals its failures a little behind process 0 at times; both go on from
        // the epoch both have.
        assert!(replayed >= 10, "{}", text(&o));
        assert_eq!(replayed + computed, EPOCHS, "{}", text(&o));
        counts.push(replayed);
    }
    assert_eq!(counts[0], counts[1], "the processes agree where to go on");
    // Process 0 writes the sinks' files; each process writes the failures it saw.
    for (name, bytes) in &want {
        if name != "errors.jsonl" {
            assert!(
                bytes == &std::fs::read(out.join(name)).unwrap(),
                "{name} differs"
            );
        }
    }
    let errors = error_keys(&[out.join("errors.jsonl"), out.join("errors.1.jsonl")]);
    assert_eq!(errors, want_errors);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Resuming a finished run replays every epoch and computes nothing; `--resume` without a
/// journal starts from the beginning.
#[test]
fn resuming_a_finished_run_computes_nothing() {
    let dir = scratch("resume-done");
    let file = pipeline(&dir, &digits_model(), 1, "quick.yaml");
    let out = dir.join("out");
    let o = run(&file, &out, 1, true);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_eq!(
        epochs(&o),
        (0, EPOCHS),
        "no journal yet: computed from the start"
    );
    let first = outputs(&out);
    let o = run(&file, &out, 2, true);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_eq!(epochs(&o), (EPOCHS, 0));
    assert_same(&first, &out, "replayed run");
    let m = metrics(&out);
    assert_eq!(m["records_read"], 0);
    assert_eq!(m["entries"]["mlp"]["records_in"], 0);
    assert_eq!(m["entries"]["guard"]["records_in"], 0);
    assert_eq!(m["entries"]["lines"]["records_out"], 360);
    assert_eq!(m["records_failed"], 11);
    assert_eq!(m["journal"]["resumed"], true);
    assert_eq!(m["journal"]["epochs_computed"], 0);
    // A run without --resume starts over (and clears the journal first).
    let o = run(&file, &out, 1, false);
    assert_eq!(epochs(&o), (0, EPOCHS));
    assert_same(&first, &out, "fresh run");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A changed pipeline file or model package is refused, naming what changed and what to do,
/// and leaves the output folder as it was; a comment does not count as a change.
#[test]
fn changed_pipelines_and_models_are_refused() {
    let dir = scratch("resume-changed");
    let pkg = dir.join("pkg");
    std::fs::create_dir_all(&pkg).unwrap();
    for f in ["manifest.json", "model.onnx"] {
        std::fs::copy(digits_model().join(f), pkg.join(f)).unwrap();
    }
    let file = pipeline(&dir, &pkg, 1, "quick.yaml");
    let out = dir.join("out");
    let o = run(&file, &out, 1, false);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let before = outputs(&out);

    // The pipeline file.
    let original = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, original.replace("factor: 1.0", "factor: 1.5")).unwrap();
    let o = run(&file, &out, 1, true);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot resume"), "{err}");
    assert!(
        err.contains(&format!("pipeline file {} changed", file.display())),
        "{err}"
    );
    assert!(
        err.contains("restore it") && err.contains("without --resume"),
        "{err}"
    );
    assert_same(&before, &out, "refused resume");

    // Only a comment: the same pipeline.
    std::fs::write(&file, format!("# a note\n{original}")).unwrap();
    let o = run(&file, &out, 1, true);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_eq!(epochs(&o), (EPOCHS, 0));

    // The model package's manifest.
    let manifest = std::fs::read_to_string(pkg.join("manifest.json")).unwrap();
    std::fs::write(
        pkg.join("manifest.json"),
        manifest.replace("Two-layer MLP", "Two-layer perceptron"),
    )
    .unwrap();
    let o = run(&file, &out, 1, true);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    let canonical = std::fs::canonicalize(&pkg).unwrap();
    assert!(
        err.contains(&format!("model package {} changed", canonical.display())),
        "{err}"
    );
    assert!(err.contains("without --resume"), "{err}");
    assert!(
        !err.contains("pipeline file"),
        "only the model changed: {err}"
    );
    assert_same(&before, &out, "refused resume");

    // Restored: resumes again.
    std::fs::write(pkg.join("manifest.json"), manifest).unwrap();
    let o = run(&file, &out, 1, true);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_eq!(epochs(&o), (EPOCHS, 0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An output folder that cannot be written is reported before anything runs.
#[test]
fn an_unwritable_output_folder_is_a_clear_error() {
    let dir = scratch("resume-unwritable");
    let file = pipeline(&dir, &digits_model(), 1, "quick.yaml");

    // Below a regular file: fails for every user, root included.
    std::fs::write(dir.join("file.txt"), "not a folder").unwrap();
    let out = dir.join("file.txt/out");
    let o = run(&file, &out, 1, false);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "cannot write to the output folder {}",
            out.display()
        )),
        "{err}"
    );

    // A read-only folder (root ignores permissions, so only checked where they hold).
    use std::os::unix::fs::PermissionsExt;
    let ro = dir.join("read-only");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(ro.join("probe"), "x").is_err() {
        let o = run(&file, &ro, 1, false);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!(
                "cannot write to the output folder {}",
                ro.display()
            )),
            "{err}"
        );
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// How to get a private mount namespace for a test: as root, or as a user where user
/// namespaces are allowed; `None` where neither works.
fn mount_namespace() -> Option<Vec<&'static str>> {
    [
        vec!["unshare", "--mount"],
        vec!["unshare", "--map-root-user", "--mount"],
    ]
    .into_iter()
    .find(|cmd| {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .args(["sh", "-c", "mount -t tmpfs -o size=4k tmpfs /tmp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A disk that fills up part-way: the output folder is a small tmpfs (in a private mount
/// namespace), so the run fails with "No space left on device"; then the tmpfs grows and the
/// run resumes to the same bytes as an uninterrupted run, each failed record reported once.
#[test]
fn a_full_disk_is_a_clear_error_and_the_run_resumes() {
    let Some(ns) = mount_namespace() else {
        eprintln!("skipped: no mount namespace here (needs root or user namespaces)");
        return;
    };
    let dir = scratch("resume-full");
    let file = pipeline(&dir, &digits_model(), 1, "quick.yaml");
    let want = reference(&dir, &file);
    let want_errors = error_keys(&[dir.join("reference/errors.jsonl")]);
    let total: u64 = walk_size(&dir.join("reference"));
    let bin = env!("CARGO_BIN_EXE_latentflow");
    // Sizes as a share of the finished run folder (outputs and journal): the disk fills while
    // the journal is written, while the sinks write, or as they move their files into place.
    for share in [0.15, 0.45, 0.8] {
        let size = ((total as f64 * share) as u64).max(4096);
        let tag = format!("{}", (share * 100.0) as u32);
        let out = dir.join(format!("mnt-{tag}"));
        let keep = dir.join(format!("full-{tag}"));
        std::fs::create_dir_all(&out).unwrap();
        let q = |p: &Path| format!("'{}'", p.display());
        let script = format!(
            "set -u
mount -t tmpfs -o size={size} tmpfs {out} || exit 90
{bin} run {file} --out {out} >{d}/first.out 2>{d}/first.err; echo $? >{d}/first.rc
mount -o remount,size=64m {out} || exit 91
{bin} run {file} --out {out} --resume >{d}/second.out 2>{d}/second.err; echo $? >{d}/second.rc
cp -a {out} {keep}",
            out = q(&out),
            file = q(&file),
            keep = q(&keep),
            d = q(&dir),
        );
        let status = Command::new(ns[0])
            .args(&ns[1..])
            .args(["sh", "-c", &script])
            .current_dir(root())
            .env("RUST_LOG", "warn")
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{share}: the test's shell failed: {status}"
        );
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        let (first, second) = (read("first.err"), read("second.err"));
        assert_eq!(read("first.rc").trim(), "1", "{share}: {first}");
        assert!(
            first.contains("No space left on device"),
            "{share}: {first}"
        );
        assert!(!first.contains("panicked"), "{share}: {first}");
        eprintln!(
            "disk full at {tag}%: {}",
            first.lines().last().unwrap_or_default()
        );
        assert_eq!(read("second.rc").trim(), "3", "{share}: {second}");
        assert_same(
            &want,
            &keep,
            &format!("disk full at {tag}% of the run's size"),
        );
        assert_eq!(error_keys(&[keep.join("errors.jsonl")]), want_errors);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bytes in the files under `dir`.
fn walk_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk_size(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}
