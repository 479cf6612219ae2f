//! The run journal: what lets `--resume` finish a crashed or killed run without redoing or
//! losing anything.
//!
//! A run journals into `<out>/.journal/` (process 0; process `p` of a cluster uses
//! `<out>/.journal.<p>/`):
//!
//! - `header.json`: the journal format version, the sha256 of the pipeline's canonical content,
//!   the sha256 of every model package the pipeline refers to, the epoch size and the number of
//!   processes. A resume is refused unless all of these are what the run would use now, and the
//!   refusal names what changed and what to do.
//! - `epochs-<first>-<last>.rec`, segments of completed epochs, written atomically (temporary
//!   name, `fsync`, rename, `fsync` of the folder) in epoch order. For each epoch: the records
//!   every sink received, whole and in the order the sinks got them, and the records that
//!   failed in that epoch (key, position, entry, reason), so `errors.jsonl` is reproduced too.
//!   Sinks that read the same entry share one copy.
//! - `complete.json` once the run has finished: a resume then replays every epoch and computes
//!   nothing.
//!
//! Decisions:
//! - **What is hashed.** The pipeline's canonical content (the parsed file as JSON, so comments
//!   and layout do not matter) without `settings.max_in_flight`, which changes memory use but
//!   not results. A model package is hashed as its `manifest.json` plus the ONNX file the
//!   manifest names; packages are found by looking at every parameter value of every entry
//!   (strings inside lists and mappings too) that resolves to a folder holding `manifest.json`.
//!   Input data files are not hashed (they can be large): resuming after changing the inputs
//!   is the user's mistake to avoid.
//! - **Segments, not a file per epoch.** An `fsync` costs milliseconds (6.5 ms for file and
//!   folder on the disk this was measured on), which is more than a small epoch takes to
//!   compute: one file per epoch made a run of 3125 small epochs several times slower. The
//!   journal is written on a thread of its own, which writes whatever epochs have completed
//!   since its last write as one segment with one `fsync` (group commit): one epoch per file
//!   when epochs are slow, many when they are fast, and the workers never wait for the disk
//!   unless it falls far behind.
//! - **Epoch encoding** is a small binary format of its own, little-endian throughout, tensors
//!   as raw element bytes (in their memory order, with a flag for column-major arrays so sinks
//!   see the same layout again), each epoch closed by a trailer holding its length, a checksum
//!   (FNV-1a over 8-byte words) and a magic word. A segment that is not whole is never renamed
//!   into place, so the journal is always a run of complete epochs `0..n`; a damaged segment
//!   ends the run of epochs there (the rest is computed again).
//! - **Sink failures are not journaled**: a replayed epoch is written to the sinks again, so a
//!   sink that fails on it fails again and reports it then.
//! - **Kept after success.** The journal stays in place after a run finishes, so `--resume` of
//!   a finished run is a replay that computes nothing; it is about the size of the records the
//!   sinks received. A run without `--resume` clears it first, and `--no-journal` runs without
//!   one (and removes a stale one).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn, ShapeBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::model::MANIFEST_FILE;
use crate::plan::{Node, Pipeline};
use crate::stage::{Failure, Params};
use crate::value::{Graph, Record, Tensor, Value};

/// Version of the journal's files; a journal of another version is not resumed.
pub const FORMAT: u32 = 1;

const HEADER_FILE: &str = "header.json";
const COMPLETE_FILE: &str = "complete.json";
const EPOCH_MAGIC: &[u8; 4] = b"LFJE";
const TRAILER_MAGIC: &[u8; 4] = b"LFJ.";
const TRAILER_LEN: usize = 8 + 8 + 4;

/// The journal folder of `process` in `out_dir`.
pub fn journal_dir(out_dir: &Path, process: usize) -> PathBuf {
    if process == 0 {
        out_dir.join(".journal")
    } else {
        out_dir.join(format!(".journal.{process}"))
    }
}

/// What a journal was written for; a resume must match it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The journal format ([`FORMAT`]).
    pub format: u32,
    /// The pipeline's name.
    pub pipeline: String,
    /// The pipeline file, for messages (not compared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_file: Option<PathBuf>,
    /// sha256 of the pipeline's canonical content.
    pub pipeline_sha256: String,
    /// sha256 of each model package the pipeline refers to, by its folder.
    pub models: BTreeMap<PathBuf, String>,
    /// Records per source epoch (what an epoch file holds depends on it).
    pub epoch_size: u64,
    /// Processes in the computation (each keeps a journal of its own failures).
    pub processes: usize,
}

impl Header {
    /// The header a run of `pipeline` on `processes` processes would write now.
    pub fn of(pipeline: &Pipeline, processes: usize) -> io::Result<Header> {
        let mut models = BTreeMap::new();
        for dir in model_packages(pipeline) {
            let sha = package_sha256(&dir)?;
            models.insert(dir, sha);
        }
        Ok(Header {
            format: FORMAT,
            pipeline: pipeline.spec.name.clone(),
            pipeline_file: pipeline.file.clone(),
            pipeline_sha256: pipeline_sha256(pipeline),
            models,
            epoch_size: pipeline.spec.settings.epoch_size.max(1) as u64,
            processes: processes.max(1),
        })
    }

    /// What differs between this (journaled) header and `now`, one sentence each, each saying
    /// what to do.
    pub fn differences(&self, now: &Header) -> Vec<String> {
        let short = |s: &str| s.chars().take(12).collect::<String>();
        let mut out = Vec::new();
        let fresh = "or run without --resume to start over (this clears the journal)";
        if self.format != now.format {
            out.push(format!(
                "the journal has format {} and this latentflow writes format {}; run without \
                 --resume to start over",
                self.format, now.format
            ));
            return out;
        }
        if self.epoch_size != now.epoch_size {
            out.push(format!(
                "settings.epoch_size was {} and is now {}; set it back to {}, {fresh}",
                self.epoch_size, now.epoch_size, self.epoch_size
            ));
        }
        if self.pipeline_sha256 != now.pipeline_sha256 {
            let what = match &now.pipeline_file {
                Some(f) => format!("the pipeline file {}", f.display()),
                None => format!("the pipeline `{}`", now.pipeline),
            };
            out.push(format!(
                "{what} changed since the journaled run (sha256 {}… then, {}… now); restore it \
                 as it was, {fresh}",
                short(&self.pipeline_sha256),
                short(&now.pipeline_sha256)
            ));
        }
        for (dir, sha) in &now.models {
            match self.models.get(dir) {
                Some(old) if old != sha => out.push(format!(
                    "the model package {} changed since the journaled run (sha256 {}… then, {}… \
                     now); restore the package as it was, {fresh}",
                    dir.display(),
                    short(old),
                    short(sha)
                )),
                Some(_) => {}
                None => out.push(format!(
                    "the pipeline now uses the model package {}, which the journaled run did \
                     not; {fresh}",
                    dir.display()
                )),
            }
        }
        for dir in self.models.keys() {
            if !now.models.contains_key(dir) {
                out.push(format!(
                    "the journaled run used the model package {}, which the pipeline no longer \
                     uses; {fresh}",
                    dir.display()
                ));
            }
        }
        if self.processes != now.processes {
            out.push(format!(
                "the journaled run had {} processes and this one has {}; resume with \
                 --processes {}, {fresh}",
                self.processes, now.processes, self.processes
            ));
        }
        out
    }
}

/// sha256 of the pipeline's canonical content: the parsed file as JSON, without
/// `settings.max_in_flight` (it bounds memory and does not change any result).
pub fn pipeline_sha256(pipeline: &Pipeline) -> String {
    let mut spec = serde_json::to_value(&pipeline.spec).expect("pipeline specs serialise");
    if let Some(settings) = spec.get_mut("settings").and_then(Json::as_object_mut) {
        settings.remove("max_in_flight");
    }
    let bytes = serde_json::to_vec(&spec).expect("JSON serialises");
    hex(&Sha256::digest(&bytes))
}

/// The model packages a pipeline refers to: every parameter value (strings nested in lists and
/// mappings included) that resolves to a folder holding `manifest.json`, or to such a manifest,
/// canonicalised and without repeats.
pub fn model_packages(pipeline: &Pipeline) -> Vec<PathBuf> {
    let mut entries: Vec<(Vec<&'static str>, &Params)> = Vec::new();
    for s in &pipeline.sources {
        entries.push((names(&s.factory.info().params), &s.params));
    }
    for n in &pipeline.nodes {
        match n {
            Node::Stage(s) => entries.push((names(&s.factory.info().params), &s.params)),
            Node::Loop { body, .. } => {
                for s in body {
                    entries.push((names(&s.factory.info().params), &s.params));
                }
            }
        }
    }
    for s in &pipeline.sinks {
        entries.push((names(&s.factory.info().params), &s.params));
    }
    let mut found = std::collections::BTreeSet::new();
    for (params, values) in entries {
        for name in params {
            if let Some(v) = values.get(name) {
                collect_packages(v, values, &mut found);
            }
        }
    }
    found.into_iter().collect()
}

fn names(specs: &[crate::stage::ParamSpec]) -> Vec<&'static str> {
    specs.iter().map(|p| p.name).collect()
}

fn collect_packages(v: &Json, params: &Params, found: &mut std::collections::BTreeSet<PathBuf>) {
    match v {
        Json::String(s) if !s.is_empty() => {
            let p = params.resolve(s);
            let dir = if p.is_dir() && p.join(MANIFEST_FILE).is_file() {
                Some(p)
            } else if p.file_name().is_some_and(|n| n == MANIFEST_FILE) && p.is_file() {
                p.parent().map(Path::to_path_buf)
            } else {
                None
            };
            if let Some(d) = dir {
                found.insert(std::fs::canonicalize(&d).unwrap_or(d));
            }
        }
        Json::Array(a) => a.iter().for_each(|x| collect_packages(x, params, found)),
        Json::Object(m) => m.values().for_each(|x| collect_packages(x, params, found)),
        _ => {}
    }
}

/// sha256 of a model package: its manifest's bytes, then the bytes of the ONNX file the
/// manifest names (when the manifest names one that exists).
pub fn package_sha256(dir: &Path) -> io::Result<String> {
    let manifest = std::fs::read(dir.join(MANIFEST_FILE))?;
    let mut h = Sha256::new();
    h.update((manifest.len() as u64).to_le_bytes());
    h.update(&manifest);
    let file = serde_json::from_slice::<Json>(&manifest)
        .ok()
        .and_then(|m| m.get("file").and_then(Json::as_str).map(String::from));
    if let Some(f) = file {
        if let Ok(mut onnx) = File::open(dir.join(f)) {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = onnx.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What one epoch left behind: the records each sink input received, and the failures.
#[derive(Clone, Debug, Default)]
pub struct EpochData {
    /// The epoch.
    pub epoch: u64,
    /// Records by the entry the sinks read them from, in the order the sinks received them.
    pub streams: BTreeMap<String, Vec<Record>>,
    /// Records that failed in this epoch (in sources and stages).
    pub failures: Vec<Failure>,
}

/// Why a journal cannot be resumed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The journal was written for something else.
    #[error("{}", .0.join("; "))]
    Mismatch(Vec<String>),
    /// The journal is unreadable.
    #[error("{0}")]
    Corrupt(String),
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What an existing journal holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Epochs `0..epochs` are journaled.
    pub epochs: u64,
    /// The run finished: nothing after these epochs remains to be done.
    pub complete: bool,
}

impl Stored {
    /// Source epochs below this are not read again (all of them when the run finished).
    pub fn skip(&self) -> u64 {
        if self.complete {
            u64::MAX
        } else {
            self.epochs
        }
    }
}

/// A journal folder.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Starts an empty journal in `dir`, removing any journal there.
    pub fn create(dir: &Path, header: &Header) -> io::Result<Journal> {
        remove(dir)?;
        std::fs::create_dir_all(dir)?;
        let j = Journal {
            dir: dir.to_path_buf(),
        };
        let text = serde_json::to_string_pretty(header).expect("headers serialise");
        j.write_durable(HEADER_FILE, text.as_bytes())?;
        Ok(j)
    }

    /// Opens the journal in `dir` to resume from it: `Ok(None)` when there is none, an error
    /// naming every difference when it was written for another pipeline or model.
    pub fn resume(dir: &Path, header: &Header) -> Result<Option<(Journal, Stored)>, JournalError> {
        let path = dir.join(HEADER_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let old: Header = serde_json::from_str(&text).map_err(|e| {
            JournalError::Corrupt(format!(
                "{} is not a journal header ({e}); run without --resume to start over",
                path.display()
            ))
        })?;
        let diffs = old.differences(header);
        if !diffs.is_empty() {
            return Err(JournalError::Mismatch(diffs));
        }
        let j = Journal {
            dir: dir.to_path_buf(),
        };
        let stored = j.scan()?;
        Ok(Some((j, stored)))
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The segment files, by first epoch (not checked).
    fn segments(&self) -> io::Result<Vec<Segment>> {
        let mut v = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some((first, last)) = parse_segment(&name) {
                v.push(Segment {
                    first,
                    last,
                    path: entry.path(),
                });
            }
        }
        v.sort_by_key(|s| (s.first, s.last));
        Ok(v)
    }

    /// Finds the run of whole epochs `0..n`, removing temporary files a crash left behind.
    fn scan(&self) -> io::Result<Stored> {
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                std::fs::remove_file(entry.path())?;
            }
        }
        let segments = self.segments()?;
        let mut n = 0u64;
        let mut used = 0;
        for s in &segments {
            if s.first != n || check_segment(&std::fs::read(&s.path)?, s).is_err() {
                break;
            }
            n = s.last + 1;
            used += 1;
        }
        let complete = self.dir.join(COMPLETE_FILE).exists() && used == segments.len();
        Ok(Stored {
            epochs: n,
            complete,
        })
    }

    /// Removes epochs from `from` on and the completion mark, so they are computed again.
    pub fn truncate(&self, from: u64) -> io::Result<()> {
        let _ = std::fs::remove_file(self.dir.join(COMPLETE_FILE));
        for s in self.segments()? {
            if s.first >= from {
                std::fs::remove_file(&s.path)?;
            } else if s.last >= from {
                // Keep the part before `from` as a segment of its own.
                let bytes = std::fs::read(&s.path)?;
                let kept: Vec<&[u8]> = check_segment(&bytes, &s)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
                    .into_iter()
                    .take((from - s.first) as usize)
                    .collect();
                self.write_segment(s.first, from - 1, &kept)?;
                std::fs::remove_file(&s.path)?;
            }
        }
        sync_dir(&self.dir)
    }

    /// Writes consecutive epochs durably as one segment (one `fsync` for all of them).
    pub fn write_epochs(&self, epochs: &[EpochData]) -> io::Result<()> {
        let (Some(first), Some(last)) = (epochs.first(), epochs.last()) else {
            return Ok(());
        };
        let blobs: Vec<Vec<u8>> = epochs.iter().map(encode).collect();
        let blobs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
        self.write_segment(first.epoch, last.epoch, &blobs)
    }

    fn write_segment(&self, first: u64, last: u64, blobs: &[&[u8]]) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(blobs.iter().map(|b| b.len() + 8).sum());
        for b in blobs {
            put_u64(&mut bytes, b.len() as u64);
            bytes.extend_from_slice(b);
        }
        self.write_durable(&segment_name(first, last), &bytes)
    }

    /// Reads epochs `0..upto` back in order, handing each to `f`.
    pub fn replay(&self, upto: u64, mut f: impl FnMut(EpochData)) -> Result<(), JournalError> {
        let mut next = 0u64;
        for s in self.segments()? {
            if next >= upto {
                break;
            }
            if s.last < next {
                // Left over from a truncation that a crash interrupted; already covered.
                continue;
            }
            let damaged = |e: String| {
                JournalError::Corrupt(format!(
                    "{} is damaged ({e}); run without --resume to start over",
                    s.path.display()
                ))
            };
            if s.first != next {
                return Err(damaged(format!("epoch {next} is missing")));
            }
            let bytes = std::fs::read(&s.path)?;
            for blob in check_segment(&bytes, &s).map_err(damaged)? {
                if next >= upto {
                    break;
                }
                let data = decode(blob).map_err(damaged)?;
                if data.epoch != next {
                    return Err(damaged(format!(
                        "epoch {} where {next} belongs",
                        data.epoch
                    )));
                }
                f(data);
                next += 1;
            }
        }
        if next < upto {
            return Err(JournalError::Corrupt(format!(
                "the journal in {} ends at epoch {next}; run without --resume to start over",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// Marks the run finished after `epochs` epochs.
    pub fn mark_complete(&self, epochs: u64) -> io::Result<()> {
        let text = serde_json::json!({ "epochs": epochs }).to_string();
        self.write_durable(COMPLETE_FILE, text.as_bytes())
    }

    fn write_durable(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)
    }
}

/// Removes a journal folder if there is one.
pub fn remove(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    // Makes the rename durable; not every platform can open a folder, which is no error.
    match File::open(dir) {
        Ok(d) => d.sync_all().or(Ok(())),
        Err(_) => Ok(()),
    }
}

/// A segment file: epochs `first..=last`, each as an encoded epoch preceded by its length.
struct Segment {
    first: u64,
    last: u64,
    path: PathBuf,
}

fn segment_name(first: u64, last: u64) -> String {
    format!("epochs-{first}-{last}.rec")
}

/// The epochs a segment file holds, from its name.
pub fn parse_segment(name: &str) -> Option<(u64, u64)> {
    let (a, b) = name
        .strip_prefix("epochs-")?
        .strip_suffix(".rec")?
        .split_once('-')?;
    let (a, b) = (a.parse().ok()?, b.parse().ok()?);
    (a <= b).then_some((a, b))
}

/// The epochs of a segment, each checked (length, trailer, checksum, epoch number).
fn check_segment<'a>(bytes: &'a [u8], s: &Segment) -> Result<Vec<&'a [u8]>, String> {
    let mut out = Vec::new();
    let mut r = Reader { b: bytes, at: 0 };
    let mut epoch = s.first;
    while r.at < bytes.len() {
        let n = r.len()?;
        let blob = r.take(n)?;
        let b = body(blob)?;
        if b.len() < 16 || u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")) != epoch {
            return Err(format!("epoch {epoch} is not where it belongs"));
        }
        out.push(blob);
        epoch += 1;
    }
    if epoch != s.last + 1 {
        return Err("the file is cut short".into());
    }
    Ok(out)
}

/// The body of an epoch file, once its trailer and checksum are checked.
fn body(bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.len() < TRAILER_LEN + 8 || &bytes[bytes.len() - 4..] != TRAILER_MAGIC {
        return Err("the file is cut short".into());
    }
    let body_len = bytes.len() - TRAILER_LEN;
    let t = &bytes[body_len..];
    let len = u64::from_le_bytes(t[..8].try_into().expect("8 bytes"));
    let sum = u64::from_le_bytes(t[8..16].try_into().expect("8 bytes"));
    if len != body_len as u64 {
        return Err("the file is cut short".into());
    }
    let body = &bytes[..body_len];
    if checksum(body) != sum {
        return Err("checksum mismatch".into());
    }
    Ok(body)
}

/// FNV-1a over 8-byte little-endian words (then the remaining bytes): a cheap checksum that
/// catches damaged files, not an adversary.
fn checksum(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let words = bytes.chunks_exact(8);
    let rest = words.remainder();
    for w in words {
        h ^= u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = h.wrapping_mul(PRIME);
    }
    for b in rest {
        h ^= *b as u64;
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// Encodes an epoch: `LFJE`, format, epoch, streams (name, records), failures, then the
/// trailer (body length, FNV-1a of the body, `LFJ.`).
pub fn encode(data: &EpochData) -> Vec<u8> {
    let mut w = Vec::new();
    w.extend_from_slice(EPOCH_MAGIC);
    put_u32(&mut w, FORMAT);
    put_u64(&mut w, data.epoch);
    put_u32(&mut w, data.streams.len() as u32);
    for (name, records) in &data.streams {
        put_str(&mut w, name);
        put_u64(&mut w, records.len() as u64);
        for r in records {
            put_record(&mut w, r);
        }
    }
    put_u64(&mut w, data.failures.len() as u64);
    for f in &data.failures {
        put_str(&mut w, &f.key);
        put_u64(&mut w, f.seq);
        put_str(&mut w, &f.stage);
        put_str(&mut w, &f.reason);
    }
    let body = w.len() as u64;
    let sum = checksum(&w);
    put_u64(&mut w, body);
    put_u64(&mut w, sum);
    w.extend_from_slice(TRAILER_MAGIC);
    w
}

/// Decodes what [`encode`] wrote, checking the trailer.
pub fn decode(bytes: &[u8]) -> Result<EpochData, String> {
    let body = body(bytes)?;
    let mut r = Reader { b: body, at: 0 };
    if r.take(4)? != EPOCH_MAGIC {
        return Err("not an epoch file".into());
    }
    let format = r.u32()?;
    if format != FORMAT {
        return Err(format!("format {format}, expected {FORMAT}"));
    }
    let epoch = r.u64()?;
    let mut streams = BTreeMap::new();
    for _ in 0..r.u32()? {
        let name = r.string()?;
        let n = r.u64()?;
        let mut records = Vec::with_capacity(n.min(1 << 16) as usize);
        for _ in 0..n {
            records.push(r.record()?);
        }
        streams.insert(name, records);
    }
    let mut failures = Vec::new();
    for _ in 0..r.u64()? {
        failures.push(Failure {
            key: Arc::from(r.string()?),
            seq: r.u64()?,
            stage: r.string()?,
            reason: r.string()?,
        });
    }
    if r.at != body.len() {
        return Err("trailing bytes".into());
    }
    Ok(EpochData {
        epoch,
        streams,
        failures,
    })
}

fn put_u8(w: &mut Vec<u8>, v: u8) {
    w.push(v);
}

fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    put_u64(w, s.len() as u64);
    w.extend_from_slice(s.as_bytes());
}

/// Writes an array's shape, layout flag (0 row-major, 1 column-major) and its `N`-byte
/// elements in that order.
fn put_array<T: Copy, const N: usize>(w: &mut Vec<u8>, a: &ArrayD<T>, bytes: fn(T) -> [u8; N]) {
    put_u32(w, a.ndim() as u32);
    for &d in a.shape() {
        put_u64(w, d as u64);
    }
    let column_major = a.ndim() > 1 && !a.is_standard_layout() && a.t().is_standard_layout();
    put_u8(w, column_major as u8);
    let start = w.len();
    w.resize(start + a.len() * N, 0);
    let out = w[start..].chunks_exact_mut(N);
    match (column_major, a.as_slice_memory_order()) {
        // Row-major or column-major and contiguous: the memory order is the order written.
        (_, Some(s)) if column_major || a.is_standard_layout() => {
            out.zip(s).for_each(|(o, &x)| o.copy_from_slice(&bytes(x)))
        }
        (true, _) => out
            .zip(a.t().iter())
            .for_each(|(o, &x)| o.copy_from_slice(&bytes(x))),
        (false, _) => out
            .zip(a.iter())
            .for_each(|(o, &x)| o.copy_from_slice(&bytes(x))),
    }
}

fn put_f32s(w: &mut Vec<u8>, a: &ArrayD<f32>) {
    put_array(w, a, f32::to_le_bytes);
}

fn put_i64s(w: &mut Vec<u8>, a: &ArrayD<i64>) {
    put_array(w, a, i64::to_le_bytes);
}

fn put_record(w: &mut Vec<u8>, r: &Record) {
    put_str(w, &r.key);
    put_u64(w, r.seq);
    put_u32(w, r.round);
    put_u32(w, r.fields.len() as u32);
    for (name, v) in &r.fields {
        put_str(w, name);
        match v {
            Value::Tensor(Tensor::F32(a)) => {
                put_u8(w, 0);
                put_f32s(w, a);
            }
            Value::Tensor(Tensor::I64(a)) => {
                put_u8(w, 1);
                put_i64s(w, a);
            }
            Value::Scalar(x) => {
                put_u8(w, 2);
                put_u64(w, x.to_bits());
            }
            Value::Int(x) => {
                put_u8(w, 3);
                put_u64(w, *x as u64);
            }
            Value::Text(s) => {
                put_u8(w, 4);
                put_str(w, s);
            }
            Value::Graph(g) => {
                put_u8(w, 5);
                put_u64(w, g.num_nodes as u64);
                put_i64s(w, &g.edge_index);
                match &g.features {
                    Some(f) => {
                        put_u8(w, 1);
                        put_f32s(w, f);
                    }
                    None => put_u8(w, 0),
                }
            }
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("unexpected end of data")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    fn len(&mut self) -> Result<usize, String> {
        usize::try_from(self.u64()?).map_err(|_| "length out of range".to_string())
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.len()?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| "text is not UTF-8".to_string())
    }

    fn array<T>(&mut self, size: usize, from: impl Fn(&[u8]) -> T) -> Result<ArrayD<T>, String> {
        let ndim = self.u32()? as usize;
        let mut shape = Vec::with_capacity(ndim.min(64));
        for _ in 0..ndim {
            shape.push(self.len()?);
        }
        let column_major = self.u8()? == 1;
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or("shape out of range")?;
        let bytes = self.take(n.checked_mul(size).ok_or("shape out of range")?)?;
        let data: Vec<T> = bytes.chunks_exact(size).map(from).collect();
        ArrayD::from_shape_vec(IxDyn(&shape).set_f(column_major), data).map_err(|e| e.to_string())
    }

    fn f32s(&mut self) -> Result<ArrayD<f32>, String> {
        self.array(4, |c| f32::from_le_bytes(c.try_into().expect("4")))
    }

    fn i64s(&mut self) -> Result<ArrayD<i64>, String> {
        self.array(8, |c| i64::from_le_bytes(c.try_into().expect("8")))
    }

    fn record(&mut self) -> Result<Record, String> {
        let key = self.string()?;
        let seq = self.u64()?;
        let mut r = Record::new(key, seq);
        r.round = self.u32()?;
        for _ in 0..self.u32()? {
            let name = self.string()?;
            let v = match self.u8()? {
                0 => Value::Tensor(Tensor::f32(self.f32s()?)),
                1 => Value::Tensor(Tensor::i64(self.i64s()?)),
                2 => Value::Scalar(f64::from_bits(self.u64()?)),
                3 => Value::Int(self.u64()? as i64),
                4 => Value::Text(Arc::from(self.string()?)),
                5 => {
                    let num_nodes = self.len()?;
                    let edge_index = Arc::new(self.i64s()?);
                    let features = match self.u8()? {
                        1 => Some(Arc::new(self.f32s()?)),
                        _ => None,
                    };
                    Value::Graph(Arc::new(Graph {
                        num_nodes,
                        edge_index,
                        features,
                    }))
                }
                t => return Err(format!("unknown value tag {t}")),
            };
            r.fields.insert(Arc::from(name), v);
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EpochData {
        let col =
            ArrayD::from_shape_vec(IxDyn(&[2, 3]).f(), vec![1.0f32, 2., 3., 4., 5., 6.]).unwrap();
        let g = Graph {
            num_nodes: 3,
            edge_index: Arc::new(
                ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![0i64, 1, 1, 2]).unwrap(),
            ),
            features: Some(Arc::new(ArrayD::zeros(IxDyn(&[3, 1])))),
        };
        let r = Record::new("a:1", 7)
            .with("col", Value::Tensor(Tensor::f32(col)))
            .with(
                "ids",
                Value::Tensor(Tensor::i64(ArrayD::from_elem(IxDyn(&[4]), -3))),
            )
            .with("s", Value::Scalar(f64::NAN))
            .with("n", Value::Int(-9))
            .with("t", Value::Text(Arc::from("héllo")))
            .with("g", Value::Graph(Arc::new(g)));
        let mut streams = BTreeMap::new();
        streams.insert("mlp".to_string(), vec![r, Record::new("a:2", 8)]);
        EpochData {
            epoch: 3,
            streams,
            failures: vec![Failure {
                key: Arc::from("a:0"),
                seq: 6,
                stage: "guard".into(),
                reason: "NaN".into(),
            }],
        }
    }

    #[test]
    fn epochs_round_trip_with_layouts() {
        let d = sample();
        let bytes = encode(&d);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.epoch, 3);
        assert_eq!(back.failures[0].reason, "NaN");
        let r = &back.streams["mlp"][0];
        let col = r.tensor("col").unwrap().as_f32().unwrap();
        assert!(!col.is_standard_layout(), "column-major arrays stay so");
        assert_eq!(
            col,
            d.streams["mlp"][0].tensor("col").unwrap().as_f32().unwrap()
        );
        assert!(matches!(r.get("s"), Some(Value::Scalar(x)) if x.is_nan()));
        assert!(matches!(r.get("t"), Some(Value::Text(s)) if &**s == "héllo"));
        // Re-encoding gives the same bytes.
        assert_eq!(encode(&back), bytes);
    }

    fn epoch(n: u64) -> EpochData {
        let mut d = sample();
        d.epoch = n;
        d
    }

    fn header() -> Header {
        Header {
            format: FORMAT,
            pipeline: "p".into(),
            pipeline_file: Some("p.yaml".into()),
            pipeline_sha256: "a".repeat(64),
            models: BTreeMap::from([(PathBuf::from("/m"), "b".repeat(64))]),
            epoch_size: 8,
            processes: 1,
        }
    }

    #[test]
    fn segments_scan_truncate_and_replay() {
        let dir = std::env::temp_dir().join(format!("lf-journal-unit-{}", std::process::id()));
        let h = header();
        let j = Journal::create(&dir, &h).unwrap();
        j.write_epochs(&[epoch(0), epoch(1), epoch(2)]).unwrap();
        j.write_epochs(&[epoch(3), epoch(4)]).unwrap();
        // A segment that skips epochs, and a temporary file a crash left behind.
        j.write_epochs(&[epoch(7)]).unwrap();
        std::fs::write(dir.join("epochs-5-6.rec.tmp"), b"half").unwrap();
        j.mark_complete(8).unwrap();
        let (j, stored) = Journal::resume(&dir, &h).unwrap().unwrap();
        assert_eq!(
            stored,
            Stored {
                epochs: 5,
                complete: false
            }
        );
        assert!(!dir.join("epochs-5-6.rec.tmp").exists());

        // Truncating inside a segment keeps its first part.
        j.truncate(2).unwrap();
        let (j, stored) = Journal::resume(&dir, &h).unwrap().unwrap();
        assert_eq!(stored.epochs, 2);
        let mut seen = Vec::new();
        j.replay(2, |d| seen.push(d.epoch)).unwrap();
        assert_eq!(seen, [0, 1]);
        assert!(j.replay(3, |_| {}).is_err(), "epoch 2 is gone");

        // A damaged segment ends the journal there.
        j.write_epochs(&[epoch(2), epoch(3)]).unwrap();
        j.write_epochs(&[epoch(4)]).unwrap();
        j.mark_complete(5).unwrap();
        assert_eq!(
            Journal::resume(&dir, &h).unwrap().unwrap().1,
            Stored {
                epochs: 5,
                complete: true
            }
        );
        let seg = dir.join("epochs-2-3.rec");
        let mut bytes = std::fs::read(&seg).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0xff;
        std::fs::write(&seg, bytes).unwrap();
        assert_eq!(
            Journal::resume(&dir, &h).unwrap().unwrap().1,
            Stored {
                epochs: 2,
                complete: false
            }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_different_header_names_each_change() {
        let old = header();
        let mut now = header();
        assert!(old.differences(&now).is_empty());
        now.pipeline_sha256 = "c".repeat(64);
        now.models.insert(PathBuf::from("/m"), "d".repeat(64));
        now.epoch_size = 16;
        let d = old.differences(&now);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(
            d[0].contains("settings.epoch_size was 8 and is now 16"),
            "{d:?}"
        );
        assert!(d[1].contains("pipeline file p.yaml changed"), "{d:?}");
        assert!(d[2].contains("model package /m changed"), "{d:?}");
        assert!(d.iter().all(|m| m.contains("without --resume")), "{d:?}");
        match Journal::resume(Path::new("/nonexistent/journal"), &now) {
            Ok(None) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn damage_is_detected() {
        let bytes = encode(&sample());
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert!(decode(&bad).unwrap_err().contains("checksum"));
        assert!(decode(&bytes[..bytes.len() - 3]).is_err());
    }
}
