//! Labelling oracles: who answers the label of a node that an active-learning agent picks.
//!
//! [`TruthOracle`] answers from the ground-truth labels of the graph, optionally wrong with a
//! given probability (a noisy annotator), and counts queries and their cost. Noise is decided
//! per node by hashing `(seed, node)`, so asking about the same node twice gives the same
//! answer and a seed fixes every answer whatever the order of the queries.
//!
//! A wrong answer is one of the other classes, chosen uniformly. A node whose true label is
//! negative (unlabelled in the data set) cannot be answered: agents keep such nodes out of
//! their candidate pool.
//!
//! [`FileOracle`] asks a person, through two files in a folder.
//!
//! # The file oracle's files
//!
//! `answers.csv` is the person's: one `node,label` line per answered node, the node's id in
//! the graph and its label as a class id in `0..classes`. Lines starting with `#` are comments
//! and so is anything after a `#`; blank lines are skipped, and a first line `node,label` is
//! a header. `;` or a tab may stand for the comma (spreadsheets in some locales write them),
//! fields may be quoted, and empty fields at the end of a line are ignored. A line whose label
//! is left empty (`1207,`) is a node not answered yet. Lines may be in any order and may label
//! nodes that were never asked (labelling ahead); the same node on two lines must have the
//! same label. The oracle creates the file, with a comment saying all this, when it is
//! missing.
//!
//! ```text
//! # my labels for the Cora run
//! node,label
//! 1207,3
//! 88,0     # a clear case
//! ```
//!
//! `queries.jsonl` is the oracle's: one JSON object per line for every node it had to ask
//! about, written once per node however often it is asked, with `seq` (the line's number,
//! from 1), `node`, `time` (UTC, RFC 3339), `classes`, and, when the agent passes them,
//! `degree` (neighbours of the node), `predicted` (the classifier's class for it) and
//! `confidence` (the classifier's probability of that class), such as (on one line)
//!
//! ```text
//! {"seq":1,"node":1207,"time":"2026-12-04T17:06:27Z","classes":7,
//!  "degree":4,"predicted":2,"confidence":0.41}
//! ```
//!
//! # How a person answers
//!
//! A query for a node in `answers.csv` is answered at once. Otherwise the oracle writes the
//! query, logs one line naming the node and the file to fill in, and re-reads `answers.csv`
//! whenever its modification time or length changes (checking every poll interval) until the
//! node's line appears or the timeout passes. Then the query fails with an error that names
//! the node and the file. With a timeout of 0 the oracle does not wait at all: each query
//! without an answer is written out and fails at once.
//!
//! A failed query stops the labelling run, and running it again resumes it: a seeded run
//! picks the same nodes as long as it gets the same answers, so the rerun replays the answered
//! picks from `answers.csv` without asking again and stops at the first node still
//! unanswered. Several runs sharing the folder (other seeds, other agents) make a batch: with
//! timeout 0 every run writes its next query before the labelling stops, the person answers
//! them together, and the next rerun brings the next batch.
//!
//! Decisions:
//! - Answers are CSV, not JSON lines: a person fills them in with a text editor or a
//!   spreadsheet. Queries are JSON lines: written by a program, read by people and programs.
//! - Answers belong to nodes, not to runs: every run and agent using a folder gets the same
//!   answer for a node, as a person would give.
//! - A malformed answers file fails the opening of the oracle (before any work) or the query
//!   at once, naming the file and the line: the person fixes it and reruns. While the oracle is waiting, it only logs the problem and
//!   keeps waiting, since a person in the middle of editing may save a half-written line.
//! - Clones of a [`FileOracle`] (and [`FileOracle::share`]) share the folder, the answers read
//!   and the queries written (runs on several threads append each node once), and count their
//!   queries apart. When one of them gives up waiting, the others stop waiting too: the
//!   labelling fails anyway, and the person should not wait for another timeout.
//! - Class names are not accepted as labels: the graph records carry class ids only.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Answers label queries.
pub trait Oracle: Send {
    /// The label of `node`, or why it cannot be given.
    fn query(&mut self, node: usize) -> Result<i64, String>;
    /// The label of `node`, asked with what the agent knows about it; an oracle that shows
    /// queries to a person passes `hint` on. By default the same as [`Oracle::query`].
    fn query_with(&mut self, node: usize, hint: &Hint) -> Result<i64, String> {
        let _ = hint;
        self.query(node)
    }
    /// Queries answered so far.
    fn queries(&self) -> usize;
    /// Total cost of the queries answered so far.
    fn cost(&self) -> f64;
}

/// What the agent knows about a node it asks about, shown to a person who answers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Hint {
    /// Neighbours of the node.
    pub degree: Option<usize>,
    /// The classifier's predicted class for the node and its probability.
    pub prediction: Option<(usize, f32)>,
}

/// Ground truth, with optional label noise and a cost per query.
#[derive(Clone, Debug)]
pub struct TruthOracle<'a> {
    labels: &'a [i64],
    classes: usize,
    noise: f64,
    seed: u64,
    cost_per_query: f64,
    queries: usize,
}

/// A 64-bit mix of two words (SplitMix64's finaliser).
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<'a> TruthOracle<'a> {
    /// An oracle over `labels` (`classes` classes) that answers wrong with probability `noise`
    /// (decided per node from `seed`) and charges `cost_per_query` per answer.
    pub fn new(
        labels: &'a [i64],
        classes: usize,
        noise: f64,
        seed: u64,
        cost_per_query: f64,
    ) -> Self {
        TruthOracle {
            labels,
            classes,
            noise: noise.clamp(0.0, 1.0),
            seed,
            cost_per_query,
            queries: 0,
        }
    }

    /// An exact oracle at cost 1 per query.
    pub fn exact(labels: &'a [i64], classes: usize) -> Self {
        Self::new(labels, classes, 0.0, 0, 1.0)
    }

    /// The answer for `node` without counting a query.
    pub fn answer(&self, node: usize) -> Result<i64, String> {
        let truth = *self.labels.get(node).ok_or_else(|| {
            format!(
                "node {node} is not in the graph ({} nodes)",
                self.labels.len()
            )
        })?;
        if truth < 0 {
            return Err(format!("node {node} has no label in the data set"));
        }
        if self.noise == 0.0 || self.classes < 2 {
            return Ok(truth);
        }
        let h = mix(self.seed, node as u64);
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        if u >= self.noise {
            return Ok(truth);
        }
        // One of the other classes, uniformly.
        let shift = 1 + (mix(h, 0x0AC1_E5EE) % (self.classes as u64 - 1)) as i64;
        Ok((truth + shift) % self.classes as i64)
    }
}

impl Oracle for TruthOracle<'_> {
    fn query(&mut self, node: usize) -> Result<i64, String> {
        let a = self.answer(node)?;
        self.queries += 1;
        Ok(a)
    }

    fn queries(&self) -> usize {
        self.queries
    }

    fn cost(&self) -> f64 {
        self.queries as f64 * self.cost_per_query
    }
}

// ---------------------------------------------------------------------------------------------
// A person, through files.

/// The file a person writes answers into, in a [`FileOracle`]'s folder.
pub const ANSWERS_FILE: &str = "answers.csv";

/// The file a [`FileOracle`] writes its queries into, in its folder.
pub const QUERIES_FILE: &str = "queries.jsonl";

/// Asks a person for labels through files in a folder (see the module docs): answers come
/// from `answers.csv`, and queries without an answer go to `queries.jsonl` while the oracle
/// waits for their answers.
#[derive(Clone, Debug)]
pub struct FileOracle {
    folder: Arc<Folder>,
    timeout: Duration,
    poll: Duration,
    cost_per_query: f64,
    queries: usize,
}

/// The files of a file oracle, shared by its clones.
struct Folder {
    answers: PathBuf,
    queries: PathBuf,
    classes: usize,
    book: Mutex<Book>,
}

/// What a file oracle has read and written.
#[derive(Default)]
struct Book {
    /// The answers file as last read.
    answers: HashMap<usize, i64>,
    /// The answers file's state when last read; `None` before the first read.
    stamp: Option<Stamp>,
    /// Why the answers file, as last read, cannot be used.
    broken: Option<String>,
    /// The nodes in the queries file, with the line of their query.
    asked: HashMap<usize, usize>,
    /// Lines in the queries file (the next query goes on the line after).
    lines: usize,
    /// Whether the queries file lacks a final newline (someone edited it).
    unterminated: bool,
    /// A node whose wait ran out: other queries stop waiting.
    gave_up: Option<usize>,
}

/// Modification time and length of a file, or its absence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stamp {
    Missing,
    File(Option<SystemTime>, u64),
}

impl fmt::Debug for Folder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Folder")
            .field("answers", &self.answers)
            .field("queries", &self.queries)
            .field("classes", &self.classes)
            .finish_non_exhaustive()
    }
}

impl FileOracle {
    /// An oracle on the files in `dir` (created when missing) for a graph of `classes`
    /// classes. It reads the answers and the queries written so far, and writes an answers
    /// file with a commented header when there is none. It waits up to an hour for each
    /// answer, reading the answers file every second, and charges 1 per query.
    pub fn open(dir: impl Into<PathBuf>, classes: usize) -> Result<FileOracle, String> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create the oracle's folder {}: {e}", dir.display()))?;
        let folder = Folder {
            answers: dir.join(ANSWERS_FILE),
            queries: dir.join(QUERIES_FILE),
            classes,
            book: Mutex::new(Book::default()),
        };
        folder.write_template()?;
        {
            let mut book = folder.lock();
            folder.read_queries(&mut book)?;
            folder.refresh(&mut book)?;
        }
        Ok(FileOracle {
            folder: Arc::new(folder),
            timeout: Duration::from_secs(3600),
            poll: Duration::from_secs(1),
            cost_per_query: 1.0,
            queries: 0,
        })
    }

    /// Waits up to `timeout` for each answer; zero does not wait.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Checks the answers file every `poll` while waiting.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Charges `cost_per_query` per answer.
    pub fn with_cost(mut self, cost_per_query: f64) -> Self {
        self.cost_per_query = cost_per_query;
        self
    }

    /// Another oracle on the same files with the same settings, with no query counted yet
    /// (one per labelling run).
    pub fn share(&self) -> FileOracle {
        FileOracle {
            queries: 0,
            ..self.clone()
        }
    }

    /// The answers file.
    pub fn answers_file(&self) -> &Path {
        &self.folder.answers
    }

    /// The queries file.
    pub fn queries_file(&self) -> &Path {
        &self.folder.queries
    }

    /// Why `node` is not answered, in a message that says what to do about it.
    fn unanswered(&self, book: &Book, node: usize, seq: usize, why: &str) -> String {
        let f = &self.folder;
        let mut m = format!(
            "{why}: node {node} has no label yet; add the line `{node},<class id from 0 to {}>` \
             to {} (its query is line {seq} of {}) and run again: the rerun replays the \
             answered picks and resumes where this run stopped",
            f.classes.saturating_sub(1),
            f.answers.display(),
            f.queries.display()
        );
        if let Some(b) = &book.broken {
            m.push_str(&format!("; first fix the answers file: {b}"));
        }
        m
    }
}

/// Equal when on the same answers file with the same settings.
impl PartialEq for FileOracle {
    fn eq(&self, other: &Self) -> bool {
        self.folder.answers == other.folder.answers
            && self.folder.classes == other.folder.classes
            && self.timeout == other.timeout
            && self.poll == other.poll
            && self.cost_per_query == other.cost_per_query
    }
}

impl Folder {
    fn lock(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes an answers file holding only its explanation, unless there is one.
    fn write_template(&self) -> Result<(), String> {
        let text = format!(
            "# Labels for the nodes that an active-learning run asks about: one `node,label` line\n\
             # per node, the label a class id from 0 to {}. The nodes waiting for a label are in\n\
             # {QUERIES_FILE}, beside this file. `#` starts a comment. A waiting run notices when\n\
             # this file is saved.\n\
             node,label\n",
            self.classes.saturating_sub(1)
        );
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.answers);
        match created {
            Ok(mut f) => f.write_all(text.as_bytes()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|e| format!("cannot write {}: {e}", self.answers.display()))
    }

    /// Reads the queries written so far.
    fn read_queries(&self, book: &mut Book) -> Result<(), String> {
        let text = match std::fs::read(&self.queries) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("cannot read {}: {e}", self.queries.display())),
        };
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let node = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|q| q.get("node")?.as_u64())
                .ok_or_else(|| {
                    format!(
                        "{} line {}: not a query written by the file oracle (a JSON object \
                         with a `node`); remove the line, or the whole file, which only lists \
                         the queries",
                        self.queries.display(),
                        i + 1
                    )
                })?;
            book.asked.entry(node as usize).or_insert(i + 1);
        }
        book.lines = text.lines().count();
        book.unterminated = !text.is_empty() && !text.ends_with('\n');
        Ok(())
    }

    /// Re-reads the answers file if it changed since last read. Fails when the file as it
    /// stands cannot be used.
    fn refresh(&self, book: &mut Book) -> Result<(), String> {
        let stamp = match std::fs::metadata(&self.answers) {
            Ok(m) => Stamp::File(m.modified().ok(), m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stamp::Missing,
            Err(e) => return Err(format!("cannot read {}: {e}", self.answers.display())),
        };
        if book.stamp != Some(stamp) {
            book.stamp = Some(stamp);
            let read = match stamp {
                Stamp::Missing => Ok(HashMap::new()),
                Stamp::File(..) => std::fs::read(&self.answers)
                    .map_err(|e| format!("cannot read {}: {e}", self.answers.display()))
                    .and_then(|bytes| {
                        parse_answers(
                            &String::from_utf8_lossy(&bytes),
                            &self.answers,
                            self.classes,
                        )
                    }),
            };
            match read {
                Ok(answers) => {
                    book.answers = answers;
                    book.broken = None;
                }
                Err(e) => {
                    book.answers.clear();
                    book.broken = Some(e);
                }
            }
        }
        match &book.broken {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Writes the query for `node` unless it was written before; its line in the file.
    fn ask(&self, book: &mut Book, node: usize, hint: &Hint) -> Result<usize, String> {
        if let Some(&seq) = book.asked.get(&node) {
            return Ok(seq);
        }
        let seq = book.lines + 1;
        let mut q = serde_json::Map::new();
        q.insert("seq".into(), seq.into());
        q.insert("node".into(), node.into());
        q.insert("time".into(), rfc3339(SystemTime::now()).into());
        q.insert("classes".into(), self.classes.into());
        if let Some(d) = hint.degree {
            q.insert("degree".into(), d.into());
        }
        if let Some((class, p)) = hint.prediction {
            q.insert("predicted".into(), class.into());
            // Rounded: a person reads it, and f32 noise digits help nobody.
            let p = (f64::from(p) * 1e4).round() / 1e4;
            q.insert("confidence".into(), p.into());
        }
        let mut line = serde_json::Value::Object(q).to_string();
        line.push('\n');
        if book.unterminated {
            line.insert(0, '\n');
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.queries)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| format!("cannot write {}: {e}", self.queries.display()))?;
        book.unterminated = false;
        book.lines = seq;
        book.asked.insert(node, seq);
        Ok(seq)
    }
}

impl Oracle for FileOracle {
    fn query(&mut self, node: usize) -> Result<i64, String> {
        self.query_with(node, &Hint::default())
    }

    fn query_with(&mut self, node: usize, hint: &Hint) -> Result<i64, String> {
        let folder = self.folder.clone();
        let mut book = folder.lock();
        folder.refresh(&mut book)?;
        if let Some(&a) = book.answers.get(&node) {
            self.queries += 1;
            return Ok(a);
        }
        let seq = folder.ask(&mut book, node, hint)?;
        let waits = !self.timeout.is_zero() && book.gave_up.is_none();
        tracing::info!(
            "node {node} needs a label: add the line `{node},<class id from 0 to {}>` to {} \
             (query {seq} in {}); {}",
            folder.classes.saturating_sub(1),
            folder.answers.display(),
            folder.queries.display(),
            if waits {
                format!("waiting up to {} s", self.timeout.as_secs_f64())
            } else {
                "not waiting".into()
            }
        );
        if self.timeout.is_zero() {
            return Err(self.unanswered(&book, node, seq, "the oracle does not wait (timeout 0)"));
        }
        if let Some(other) = book.gave_up {
            let why = format!("no answer for node {other} in time, so no more waiting");
            return Err(self.unanswered(&book, node, seq, &why));
        }
        drop(book);

        let start = Instant::now();
        loop {
            let left = self.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                let mut book = folder.lock();
                book.gave_up.get_or_insert(node);
                let why = format!("no answer after {} s", self.timeout.as_secs_f64());
                return Err(self.unanswered(&book, node, seq, &why));
            }
            std::thread::sleep(self.poll.min(left));
            let mut book = folder.lock();
            let before = book.stamp;
            match folder.refresh(&mut book) {
                Ok(()) => {
                    if let Some(&a) = book.answers.get(&node) {
                        self.queries += 1;
                        tracing::info!(node, label = a, "answer read");
                        return Ok(a);
                    }
                }
                // Perhaps saved in the middle of an edit: say so, and wait for the next save.
                Err(e) if book.stamp != before => {
                    tracing::warn!("{e} (still waiting for node {node})")
                }
                Err(_) => {}
            }
            if let Some(other) = book.gave_up {
                let why = format!("no answer for node {other} in time, so no more waiting");
                return Err(self.unanswered(&book, node, seq, &why));
            }
        }
    }

    fn queries(&self) -> usize {
        self.queries
    }

    fn cost(&self) -> f64 {
        self.queries as f64 * self.cost_per_query
    }
}

/// Reads the lines of an answers file (see the module docs) for a graph of `classes` classes.
fn parse_answers(text: &str, path: &Path, classes: usize) -> Result<HashMap<usize, i64>, String> {
    let mut answers: HashMap<usize, (i64, usize)> = HashMap::new();
    let mut first = true;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim_start_matches('\u{feff}');
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let bad = |what: String| format!("{} line {n}: {what}", path.display());
        let mut fields: Vec<&str> = line
            .split([',', ';', '\t'])
            .map(|f| f.trim().trim_matches('"').trim())
            .collect();
        while fields.len() > 2 && fields.last() == Some(&"") {
            fields.pop();
        }
        if std::mem::take(&mut first) && fields[0].eq_ignore_ascii_case("node") {
            continue;
        }
        if fields.len() != 2 {
            return Err(bad(format!(
                "`{line}` has {} field(s), not two; write one node and its label per line, \
                 e.g. `12,3`",
                fields.len()
            )));
        }
        let node: usize = fields[0].parse().map_err(|_| {
            bad(format!(
                "`{}` is not a node id (a whole number from 0); write `node,label`, e.g. `12,3`",
                fields[0]
            ))
        })?;
        if fields[1].is_empty() {
            continue;
        }
        let top = classes.saturating_sub(1);
        let label: i64 = fields[1].parse().map_err(|_| {
            bad(format!(
                "the label `{}` of node {node} is not a class id; write a whole number from 0 \
                 to {top}, or leave it empty until you know",
                fields[1]
            ))
        })?;
        if label < 0 || label as usize >= classes {
            return Err(bad(format!(
                "the label {label} of node {node} is not a class: the graph's classes are 0 to \
                 {top}"
            )));
        }
        match answers.get(&node) {
            Some(&(l, at)) if l != label => {
                return Err(bad(format!(
                    "node {node} is labelled {label} here but {l} on line {at}; keep one of \
                     the two lines"
                )))
            }
            Some(_) => {}
            None => {
                answers.insert(node, (label, n));
            }
        }
    }
    Ok(answers.into_iter().map(|(k, (l, _))| (k, l)).collect())
}

/// `t` in UTC as RFC 3339, to the second (`2026-12-04T17:06:27Z`).
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, s) = ((secs / 86_400) as i64, secs % 86_400);
    // The civil date of a day count (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_noisy_and_costed() {
        let labels: Vec<i64> = (0..4000).map(|i| (i % 4) as i64).collect();
        let mut exact = TruthOracle::exact(&labels, 4);
        assert_eq!(exact.query(6), Ok(2));
        assert_eq!(exact.queries(), 1);

        let mut noisy = TruthOracle::new(&labels, 4, 0.2, 9, 0.5);
        let wrong = (0..4000)
            .filter(|&i| noisy.query(i).unwrap() != labels[i])
            .count();
        assert!((wrong as f64 / 4000.0 - 0.2).abs() < 0.02, "{wrong}");
        assert_eq!(noisy.queries(), 4000);
        assert!((noisy.cost() - 2000.0).abs() < 1e-9);
        // Same node, same answer; answers stay valid classes.
        assert_eq!(noisy.answer(17), noisy.answer(17));
        assert!((0..4000).all(|i| (0..4).contains(&noisy.answer(i).unwrap())));

        let missing = [-1i64, 0];
        assert!(TruthOracle::exact(&missing, 1).query(0).is_err());
        assert!(TruthOracle::exact(&missing, 1).query(5).is_err());
    }

    /// A fresh folder for one test.
    fn folder(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lf-oracle-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn query_lines(o: &FileOracle) -> Vec<serde_json::Value> {
        std::fs::read_to_string(o.queries_file())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn stored_answers_are_given_at_once() {
        let dir = folder("stored");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(ANSWERS_FILE),
            "\u{feff}# labelled by hand\nnode,label\n\n12,3\n5;0   # a clear case\n\"7\",\"2\",,\n\
             40,1\n12,3\n99,\n",
        )
        .unwrap();
        let mut o = FileOracle::open(&dir, 4)
            .unwrap()
            .with_timeout(Duration::from_secs(30))
            .with_cost(0.5);
        let start = Instant::now();
        assert_eq!(o.query(12), Ok(3));
        assert_eq!(o.query(5), Ok(0));
        assert_eq!(o.query(7), Ok(2));
        assert_eq!(o.query(12), Ok(3));
        assert!(start.elapsed() < Duration::from_secs(10), "it waited");
        assert_eq!(o.queries(), 4);
        assert!((o.cost() - 2.0).abs() < 1e-12);
        // Nothing was asked; a share counts its own queries.
        assert!(!o.queries_file().exists());
        let mut s = o.share();
        assert_eq!((s.query(40), s.queries(), o.queries()), (Ok(1), 1, 4));
        // An empty label is a node not answered yet.
        let e = o
            .clone()
            .with_timeout(Duration::ZERO)
            .query(99)
            .unwrap_err();
        assert!(e.contains("node 99 has no label"), "{e}");
    }

    #[test]
    fn a_missing_answers_file_is_created_with_its_explanation() {
        let dir = folder("template");
        let mut o = FileOracle::open(dir.join("deep"), 7)
            .unwrap()
            .with_timeout(Duration::ZERO);
        let text = std::fs::read_to_string(o.answers_file()).unwrap();
        assert!(
            text.contains("from 0 to 6") && text.ends_with("node,label\n"),
            "{text}"
        );
        assert!(o.query(0).is_err());
        // A person adds a line below the header; a new oracle on the folder reads it.
        std::fs::write(o.answers_file(), text + "0,6\n").unwrap();
        assert_eq!(
            FileOracle::open(dir.join("deep"), 7).unwrap().query(0),
            Ok(6)
        );
        // And so does the old one, since the file changed.
        assert_eq!(o.query(0), Ok(6));
    }

    #[test]
    fn a_query_waits_until_its_answer_is_written() {
        let dir = folder("wait");
        let mut o = FileOracle::open(&dir, 3)
            .unwrap()
            .with_timeout(Duration::from_secs(30))
            .with_poll(Duration::from_millis(10));
        let answers = o.answers_file().to_path_buf();
        let start = Instant::now();
        let person = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(answers)
                .unwrap();
            f.write_all(b"31,2\n").unwrap();
        });
        let hint = Hint {
            degree: Some(4),
            prediction: Some((1, 0.612_345)),
        };
        assert_eq!(o.query_with(31, &hint), Ok(2));
        let waited = start.elapsed();
        person.join().unwrap();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(10), "{waited:?}");
        assert_eq!(o.queries(), 1);

        let q = query_lines(&o);
        assert_eq!(q.len(), 1);
        assert_eq!(
            (&q[0]["seq"], &q[0]["node"], &q[0]["classes"]),
            (&1.into(), &31.into(), &3.into())
        );
        assert_eq!(
            (&q[0]["degree"], &q[0]["predicted"]),
            (&4.into(), &1.into())
        );
        assert_eq!(q[0]["confidence"], 0.6123);
        let time = q[0]["time"].as_str().unwrap();
        assert!(
            time.len() == 20 && time.starts_with("20") && time.ends_with('Z'),
            "{time}"
        );
    }

    #[test]
    fn without_waiting_a_query_fails_and_is_written_once() {
        let dir = folder("nowait");
        let mut o = FileOracle::open(&dir, 5)
            .unwrap()
            .with_timeout(Duration::ZERO);
        let answers = o.answers_file().display().to_string();
        let start = Instant::now();
        for _ in 0..2 {
            let e = o.query(8).unwrap_err();
            assert!(e.contains("node 8") && e.contains(&answers), "{e}");
            assert!(
                e.contains("`8,<class id from 0 to 4>`") && e.contains("run again"),
                "{e}"
            );
            assert!(e.contains("line 1 of"), "{e}");
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(o.queries(), 0);
        let e = o.query(3).unwrap_err();
        assert!(e.contains("line 2 of"), "{e}");
        let q = query_lines(&o);
        let nodes: Vec<_> = q
            .iter()
            .map(|x| (x["seq"].clone(), x["node"].clone()))
            .collect();
        assert_eq!(nodes, [(1.into(), 8.into()), (2.into(), 3.into())]);

        // Reopened, as by a rerun: pending queries are not written again, new ones follow.
        let mut again = FileOracle::open(&dir, 5)
            .unwrap()
            .with_timeout(Duration::ZERO);
        assert!(again.query(8).is_err());
        assert!(again.query(11).unwrap_err().contains("line 3 of"));
        assert_eq!(query_lines(&again).len(), 3);
        // Answered, they come back at once.
        std::fs::write(again.answers_file(), "8,4\n3,0\n").unwrap();
        assert_eq!((again.query(8), again.query(3)), (Ok(4), Ok(0)));
        assert_eq!(query_lines(&again).len(), 3);
    }

    #[test]
    fn a_timeout_stops_the_other_waits_too() {
        let dir = folder("gaveup");
        let slow = FileOracle::open(&dir, 2)
            .unwrap()
            .with_poll(Duration::from_millis(10));
        let mut quick = slow.share().with_timeout(Duration::from_millis(300));
        let mut patient = slow.with_timeout(Duration::from_secs(60));
        let start = Instant::now();
        let waiting = std::thread::spawn(move || patient.query(1));
        let e = quick.query(2).unwrap_err();
        assert!(e.contains("no answer after 0.3 s"), "{e}");
        assert!(e.contains("node 2"), "{e}");
        let other = waiting.join().unwrap().unwrap_err();
        assert!(other.contains("no answer for node 2 in time") && other.contains("node 1"));
        assert!(start.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn malformed_answers_name_the_file_and_the_line() {
        let dir = folder("malformed");
        let cases = [
            ("1,0\n2\n", "line 2", "has 1 field(s), not two"),
            ("1,0,2\n", "line 1", "has 3 field(s)"),
            (
                "# c\nnode,label\nx12,1\n",
                "line 3",
                "`x12` is not a node id",
            ),
            ("-3,1\n", "line 1", "`-3` is not a node id"),
            (
                "4,bird\n",
                "line 1",
                "the label `bird` of node 4 is not a class id",
            ),
            (
                "4,3\n",
                "line 1",
                "the label 3 of node 4 is not a class: the graph's classes",
            ),
            ("4,-1\n", "line 1", "the label -1 of node 4 is not a class"),
            (
                "4,1\n5,1\n4,2\n",
                "line 3",
                "labelled 2 here but 1 on line 1",
            ),
            (
                "node,label\nnode,label\n",
                "line 2",
                "`node` is not a node id",
            ),
        ];
        for (text, line, what) in cases {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(ANSWERS_FILE), text).unwrap();
            let path = dir.join(ANSWERS_FILE).display().to_string();
            let e = FileOracle::open(&dir, 3).unwrap_err();
            assert!(
                e.starts_with(&format!("{path} {line}: ")) && e.contains(what),
                "{text:?}: {e}"
            );
        }
        // Broken after opening: the next query fails, even for an answered node.
        std::fs::write(dir.join(ANSWERS_FILE), "4,1\n").unwrap();
        let mut o = FileOracle::open(&dir, 3).unwrap();
        assert_eq!(o.query(4), Ok(1));
        std::fs::write(dir.join(ANSWERS_FILE), "4,1\n5,one\n").unwrap();
        let e = o.query(4).unwrap_err();
        assert!(e.contains("line 2") && e.contains("`one`"), "{e}");

        // Broken while waiting: the oracle waits on until the file is fixed.
        std::fs::write(dir.join(ANSWERS_FILE), "4,1\n").unwrap();
        let mut o = FileOracle::open(&dir, 3)
            .unwrap()
            .with_timeout(Duration::from_secs(30))
            .with_poll(Duration::from_millis(10));
        let answers = o.answers_file().to_path_buf();
        let person = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            std::fs::write(&answers, "4,1\n6,\n6").unwrap();
            std::thread::sleep(Duration::from_millis(150));
            std::fs::write(&answers, "4,1\n6,2\n").unwrap();
        });
        assert_eq!(o.query(6), Ok(2));
        person.join().unwrap();
    }

    #[test]
    fn broken_query_files_are_named() {
        let dir = folder("queries");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(QUERIES_FILE), "{\"seq\":1,\"node\":3}\nnot json\n").unwrap();
        let e = FileOracle::open(&dir, 2).unwrap_err();
        assert!(e.contains(QUERIES_FILE) && e.contains("line 2"), "{e}");
        // An edited file without a final newline is continued on a line of its own.
        std::fs::write(dir.join(QUERIES_FILE), "{\"seq\":1,\"node\":3}").unwrap();
        let mut o = FileOracle::open(&dir, 2)
            .unwrap()
            .with_timeout(Duration::ZERO);
        assert!(o.query(3).is_err() && o.query(4).is_err());
        let q = query_lines(&o);
        assert_eq!(q.len(), 2);
        assert_eq!((&q[1]["seq"], &q[1]["node"]), (&2.into(), &4.into()));
    }

    #[test]
    fn times_are_utc_rfc3339() {
        let at = |s: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_796_404_005), "2026-12-04T17:06:45Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
    }
}
