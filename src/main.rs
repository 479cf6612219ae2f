//! The `latentflow` command line: run, validate and inspect pipelines and model packages.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use latentflow_engine::grad;
use latentflow_engine::model::ModelPackage;
use latentflow_engine::plan::describe_params;
use latentflow_engine::{plan_file, run, PlanOptions, Registry, RunOptions};
use serde_json::{json, Value as Json};

/// Declarative machine-learning pipelines on timely dataflow with ONNX Runtime.
#[derive(Parser)]
#[command(name = "latentflow", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline file.
    Run {
        /// The pipeline file.
        file: PathBuf,
        /// Worker threads in this process.
        #[arg(short, long, default_value_t = 1)]
        workers: usize,
        /// Output folder (default: the file's `settings.output`, else `runs/<name>`).
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Processes in the computation (timely cluster mode).
        #[arg(long, default_value_t = 1)]
        processes: usize,
        /// This process's index, from 0.
        #[arg(long, default_value_t = 0)]
        process: usize,
        /// File with one `host:port` per process.
        #[arg(long)]
        hostfile: Option<PathBuf>,
        /// Go on from the journal of an earlier run in the output folder (after a crash or a
        /// kill): journaled epochs are replayed, not computed. Refused if the pipeline file or a
        /// model package changed since.
        #[arg(long, conflicts_with = "no_journal")]
        resume: bool,
        /// Keep no journal (the run cannot be resumed); removes any journal in the output
        /// folder.
        #[arg(long)]
        no_journal: bool,
    },
    /// Check pipeline files without running them.
    Validate {
        /// The pipeline files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Skip loading model packages (no ONNX Runtime needed).
        #[arg(long)]
        no_models: bool,
    },
    /// Print the JSON Schema of pipeline files.
    Schema,
    /// List the stage, source and sink kinds with their parameters.
    Stages {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List or check model packages.
    Models {
        #[command(subcommand)]
        action: Option<ModelsAction>,
        /// Folder to list packages in.
        #[arg(long, default_value = "models")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelsAction {
    /// Verify a package: manifest, sha256 and ONNX signature.
    Check {
        /// Package folders.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Build the vector-Jacobian-product (gradient) model of a package or an ONNX file.
    ///
    /// The VJP model takes the model's inputs plus `grad_in__<output>`, a cotangent shaped like
    /// the output, and returns the output and `grad__<x>` for each tensor differentiated
    /// against. It is cached in `.grad/` beside the model unless `--out` is given.
    Grad {
        /// A package folder or an ONNX file.
        model: PathBuf,
        /// The output to differentiate (default: the model's first output).
        #[arg(long)]
        output: Option<String>,
        /// Inputs or initializers (weights) to differentiate with respect to (default: every
        /// float input). Repeat the flag or separate names with commas.
        #[arg(long, num_args = 1..)]
        wrt: Vec<String>,
        /// Write the VJP model to this file instead of the cache.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn registry() -> Registry {
    latentflow_stages::builtin()
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run {
            file,
            workers,
            out,
            processes,
            process,
            hostfile,
            resume,
            no_journal,
        } => {
            let reg = registry();
            let pipeline = match plan_file(&file, &reg, PlanOptions::default()) {
                Ok(p) => p,
                Err(d) => {
                    eprintln!("{d}");
                    bail!(
                        "{} problem(s) in {}; nothing was run",
                        d.0.len(),
                        file.display()
                    );
                }
            };
            let out_dir = out.unwrap_or_else(|| match &pipeline.spec.settings.output {
                Some(o) => pipeline.base_dir.join(o),
                None => PathBuf::from("runs").join(&pipeline.spec.name),
            });
            let opts = RunOptions {
                workers,
                processes,
                process,
                hostfile,
                out_dir,
                resume,
                journal: !no_journal,
            };
            let summary = run(&pipeline, &opts)?;
            let m = &summary.metrics;
            println!(
                "{}: {} records read, {} failed, {:.2}s",
                pipeline.spec.name, m.records_read, m.records_failed, m.wall_seconds
            );
            let j = &m.journal;
            if let Some(dir) = &j.folder {
                println!(
                    "  journal {}: {} epochs replayed, {} computed",
                    dir.display(),
                    j.epochs_replayed,
                    j.epochs_computed
                );
            } else if resume || j.epochs_replayed > 0 {
                println!(
                    "  epochs  {} replayed, {} computed",
                    j.epochs_replayed, j.epochs_computed
                );
            }
            for o in &m.outputs {
                println!("  wrote {}", o.display());
            }
            println!(
                "  metrics {}",
                summary.out_dir.join("metrics.json").display()
            );
            if let Some(e) = &summary.errors_file {
                println!("  errors  {} ({} records)", e.display(), m.records_failed);
                return Ok(ExitCode::from(3));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { files, no_models } => {
            let reg = registry();
            let mut bad = 0;
            for f in &files {
                match plan_file(
                    f,
                    &reg,
                    PlanOptions {
                        check_models: !no_models,
                    },
                ) {
                    Ok(p) => println!(
                        "ok: {} ({} sources, {} stages, {} sinks)",
                        f.display(),
                        p.sources.len(),
                        p.nodes.len(),
                        p.sinks.len()
                    ),
                    Err(d) => {
                        bad += 1;
                        eprintln!("{d}");
                    }
                }
            }
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Schema => {
            println!("{}", serde_json::to_string_pretty(&schema(&registry()))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Stages { json } => {
            let reg = registry();
            if json {
                println!("{}", serde_json::to_string_pretty(&kinds_json(&reg))?);
            } else {
                for (title, infos) in [
                    ("Sources", reg.source_infos()),
                    ("Stages", reg.stage_infos()),
                    ("Sinks", reg.sink_infos()),
                ] {
                    println!("{title}:");
                    for i in infos {
                        println!(
                            "  {}  {}",
                            i.name,
                            i.doc.split_whitespace().collect::<Vec<_>>().join(" ")
                        );
                        if !i.params.is_empty() {
                            println!("{}", describe_params(&i.params));
                        }
                    }
                    println!();
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Models { action: None, dir } => {
            list_models(&dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Models {
            action: Some(ModelsAction::Check { dirs }),
            ..
        } => {
            let mut bad = 0;
            for d in &dirs {
                match ModelPackage::load(d).and_then(|p| p.check().map(|_| p)) {
                    Ok(p) => println!("ok: {} ({})", d.display(), p.manifest().name),
                    Err(e) => {
                        bad += 1;
                        eprintln!("error: {e}");
                    }
                }
            }
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Models {
            action:
                Some(ModelsAction::Grad {
                    model,
                    output,
                    wrt,
                    out,
                }),
            ..
        } => {
            let vjp = grad::write_vjp_model(&model, output.as_deref(), &wrt, out.as_deref())?;
            let verb = if vjp.built { "wrote" } else { "found current" };
            println!("{verb} {}", vjp.path.display());
            let wrt: Vec<String> = vjp.wrt.iter().map(|w| format!("`{w}`")).collect();
            println!(
                "  gradient of `{}` with respect to {}",
                vjp.output,
                wrt.join(", ")
            );
            for t in &vjp.inputs {
                println!("  in   {t}");
            }
            for t in &vjp.outputs {
                println!("  out  {t}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn list_models(dir: &Path) -> Result<()> {
    let mut found = 0;
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("manifest.json").exists())
        .collect();
    entries.sort();
    for p in entries {
        found += 1;
        match ModelPackage::load(&p) {
            Ok(pkg) => {
                let m = pkg.manifest();
                println!("{}  ({})", m.name, p.display());
                println!("    {}", m.description);
                for t in &m.inputs {
                    println!("    in   {t}");
                }
                for t in &m.outputs {
                    println!("    out  {t}");
                }
            }
            Err(e) => println!("{}  (broken: {e})", p.display()),
        }
    }
    if found == 0 {
        println!("no model packages under {}", dir.display());
    }
    Ok(())
}

fn kind_json(i: &latentflow_engine::KindInfo) -> Json {
    json!({
        "name": i.name,
        "doc": i.doc.split_whitespace().collect::<Vec<_>>().join(" "),
        "params": i.params.iter().map(|p| json!({
            "name": p.name,
            "type": p.kind.describe(),
            "required": p.default.is_none(),
            "default": p.default,
            "doc": p.doc,
        })).collect::<Vec<_>>(),
    })
}

fn kinds_json(reg: &Registry) -> Json {
    json!({
        "sources": reg.source_infos().iter().map(kind_json).collect::<Vec<_>>(),
        "stages": reg.stage_infos().iter().map(kind_json).collect::<Vec<_>>(),
        "sinks": reg.sink_infos().iter().map(kind_json).collect::<Vec<_>>(),
    })
}

/// The pipeline schema with each entry's `kind` restricted to the registered kinds and
/// `params` described per kind.
fn schema(reg: &Registry) -> Json {
    let mut s = latentflow_engine::spec::json_schema();
    let kinds = [
        ("SourceSpec", reg.source_infos()),
        ("StageSpec", reg.stage_infos()),
        ("SinkSpec", reg.sink_infos()),
    ];
    for (def, infos) in kinds {
        let Some(d) = s.pointer_mut(&format!("/$defs/{def}")) else {
            continue;
        };
        let names: Vec<&str> = infos.iter().map(|i| i.name).collect();
        if let Some(k) = d.pointer_mut("/properties/kind") {
            k["enum"] = json!(names);
        }
        let branches: Vec<Json> = infos
            .iter()
            .map(|i| {
                let props: serde_json::Map<String, Json> = i
                    .params
                    .iter()
                    .map(|p| {
                        let mut v = p.kind.json_schema();
                        v["description"] = json!(p.doc);
                        (p.name.to_string(), v)
                    })
                    .collect();
                let required: Vec<&str> = i
                    .params
                    .iter()
                    .filter(|p| p.default.is_none())
                    .map(|p| p.name)
                    .collect();
                json!({
                    "if": {"properties": {"kind": {"const": i.name}}, "required": ["kind"]},
                    "then": {"properties": {"params": {
                        "type": "object",
                        "properties": props,
                        "required": required,
                        "additionalProperties": false,
                    }}},
                })
            })
            .collect();
        d["allOf"] = json!(branches);
    }
    s
}
