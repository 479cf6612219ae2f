//! YAML with positions.
//!
//! Pipeline files are parsed twice over one event stream: into a `serde_json::Value` that
//! serde turns into the typed pipeline, and into a [`SpanIndex`] that remembers, for every
//! node, the line and column where it starts. Any later error that knows the path of the
//! offending node (`stages[2].params.model`) can then point at the right place in the file.
//!
//! Scalars are resolved with the YAML 1.2 core schema (`true`, `null`, `12`, `1.5e-3`);
//! quoted scalars stay strings. Anchors and aliases are supported; duplicate keys are errors.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Number, Value as Json};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A position in a file (1-based line and column).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Pos {
    /// Line, starting at 1.
    pub line: usize,
    /// Column, starting at 1.
    pub col: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// One step of a path into a YAML document.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Seg {
    /// A mapping key.
    Key(String),
    /// A sequence index.
    Index(usize),
}

/// A path from the document root to a node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Path(pub Vec<Seg>);

impl Path {
    /// The root.
    pub fn root() -> Self {
        Path(Vec::new())
    }

    /// This path extended by a key.
    pub fn key(&self, k: &str) -> Path {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_string()));
        p
    }

    /// This path extended by an index.
    pub fn index(&self, i: usize) -> Path {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    /// The path without its last step.
    pub fn parent(&self) -> Path {
        let mut p = self.clone();
        p.0.pop();
        p
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(document)");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Where each node of a document starts, and where each mapping key stands.
#[derive(Clone, Debug, Default)]
pub struct SpanIndex {
    values: HashMap<Path, Pos>,
    keys: HashMap<Path, Pos>,
}

impl SpanIndex {
    /// Position of the node at `path`, or of its nearest ancestor that has one.
    pub fn value(&self, path: &Path) -> Pos {
        let mut p = path.clone();
        loop {
            if let Some(pos) = self.values.get(&p) {
                return *pos;
            }
            if p.0.is_empty() {
                return Pos { line: 1, col: 1 };
            }
            p.0.pop();
        }
    }

    /// Position of the key that introduces `path` (falls back to the value's position).
    pub fn key(&self, path: &Path) -> Pos {
        self.keys
            .get(path)
            .copied()
            .unwrap_or_else(|| self.value(path))
    }
}

/// A YAML syntax or structure error with its position.
#[derive(Clone, Debug)]
pub struct YamlError {
    /// Where the problem is.
    pub pos: Pos,
    /// What is wrong.
    pub message: String,
}

fn pos(m: &Marker) -> Pos {
    // yaml-rust2 counts columns from 0.
    Pos {
        line: m.line(),
        col: m.col() + 1,
    }
}

enum Frame {
    Seq {
        path: Path,
        items: Vec<Json>,
        anchor: usize,
    },
    Map {
        path: Path,
        map: Map<String, Json>,
        pending_key: Option<(String, Pos)>,
        anchor: usize,
    },
}

struct Builder {
    stack: Vec<Frame>,
    root: Option<Json>,
    anchors: HashMap<usize, Json>,
    spans: SpanIndex,
    error: Option<YamlError>,
    documents: usize,
}

impl Builder {
    /// The path the next node will have, and whether it is a mapping key.
    fn next_path(&self) -> (Path, bool) {
        match self.stack.last() {
            None => (Path::root(), false),
            Some(Frame::Seq { path, items, .. }) => (path.index(items.len()), false),
            Some(Frame::Map {
                path,
                pending_key: Some((k, _)),
                ..
            }) => (path.key(k), false),
            Some(Frame::Map { path, .. }) => (path.clone(), true),
        }
    }

    fn fail(&mut self, at: Pos, message: String) {
        if self.error.is_none() {
            self.error = Some(YamlError { pos: at, message });
        }
    }

    fn push_value(&mut self, value: Json, at: Pos) {
        let (path, _) = self.next_path();
        self.spans.values.entry(path).or_insert(at);
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Frame::Seq { items, .. }) => items.push(value),
            Some(Frame::Map {
                map, pending_key, ..
            }) => {
                let (k, _) = pending_key.take().expect("value follows a key");
                map.insert(k, value);
            }
        }
    }

    fn push_key(&mut self, key: String, at: Pos) {
        let dup = match self.stack.last() {
            Some(Frame::Map { map, .. }) => map.contains_key(&key),
            _ => false,
        };
        if dup {
            self.fail(at, format!("duplicate key `{key}`"));
        }
        if let Some(Frame::Map {
            path,
            pending_key,
            map,
            ..
        }) = self.stack.last_mut()
        {
            // A block mapping's start event is marked at the `:` after its first key; the
            // mapping really starts at that key.
            if map.is_empty() {
                if let Some(start) = self.spans.values.get_mut(path) {
                    if (at.line, at.col) < (start.line, start.col) {
                        *start = at;
                    }
                }
            }
            self.spans.keys.insert(path.key(&key), at);
            *pending_key = Some((key, at));
        }
    }
}

fn resolve_plain(s: &str) -> Json {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Json::Null,
        "true" | "True" | "TRUE" => return Json::Bool(true),
        "false" | "False" | "FALSE" => return Json::Bool(false),
        _ => {}
    }
    if let Ok(i) = s.parse::<i64>() {
        return Json::Number(i.into());
    }
    let looks_numeric = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || "+-.".contains(c));
    if looks_numeric {
        if let Ok(f) = s.parse::<f64>() {
            if let Some(n) = Number::from_f64(f) {
                return Json::Number(n);
            }
        }
    }
    match s {
        ".inf" | "+.inf" | ".Inf" => Json::String("inf".into()),
        _ => Json::String(s.to_string()),
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let at = pos(&mark);
        match ev {
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    self.fail(at, "a pipeline file holds one YAML document".into());
                }
            }
            Event::Scalar(text, style, anchor, _tag) => {
                let (_, is_key) = self.next_path();
                if is_key {
                    self.push_key(text, at);
                    return;
                }
                let value = if style == TScalarStyle::Plain {
                    resolve_plain(&text)
                } else {
                    Json::String(text)
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, value.clone());
                }
                self.push_value(value, at);
            }
            Event::Alias(id) => {
                let (_, is_key) = self.next_path();
                match self.anchors.get(&id).cloned() {
                    Some(Json::String(s)) if is_key => self.push_key(s, at),
                    Some(_) if is_key => {
                        self.fail(at, "an alias used as a key must name a string".into())
                    }
                    Some(v) => self.push_value(v, at),
                    None => self.fail(at, "alias refers to an unknown anchor".into()),
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                let (path, is_key) = self.next_path();
                if is_key {
                    self.fail(at, "mapping keys must be plain strings".into());
                    return;
                }
                self.spans.values.entry(path.clone()).or_insert(at);
                let frame = if matches!(ev, Event::SequenceStart(..)) {
                    Frame::Seq {
                        path,
                        items: Vec::new(),
                        anchor,
                    }
                } else {
                    Frame::Map {
                        path,
                        map: Map::new(),
                        pending_key: None,
                        anchor,
                    }
                };
                self.stack.push(frame);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (value, anchor, start) = match self.stack.pop() {
                    Some(Frame::Seq {
                        items,
                        anchor,
                        path,
                    }) => (Json::Array(items), anchor, self.spans.value(&path)),
                    Some(Frame::Map {
                        map, anchor, path, ..
                    }) => (Json::Object(map), anchor, self.spans.value(&path)),
                    None => return,
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, value.clone());
                }
                match self.stack.last_mut() {
                    None => self.root = Some(value),
                    Some(Frame::Seq { items, .. }) => items.push(value),
                    Some(Frame::Map {
                        map, pending_key, ..
                    }) => {
                        if let Some((k, _)) = pending_key.take() {
                            map.insert(k, value);
                        }
                    }
                }
                let _ = start;
            }
            _ => {}
        }
    }
}

/// Parses one YAML document into JSON values and a span index.
pub fn parse(text: &str) -> Result<(Json, SpanIndex), YamlError> {
    let mut builder = Builder {
        stack: Vec::new(),
        root: None,
        anchors: HashMap::new(),
        spans: SpanIndex::default(),
        error: None,
        documents: 0,
    };
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        let m = e.marker();
        return Err(YamlError {
            pos: pos(m),
            message: e.info().to_string(),
        });
    }
    if let Some(e) = builder.error {
        return Err(e);
    }
    Ok((builder.root.unwrap_or(Json::Null), builder.spans))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_nested_nodes() {
        let text = "name: x\nstages:\n  - name: a\n    params:\n      k: 3\n";
        let (json, spans) = parse(text).unwrap();
        assert_eq!(json["stages"][0]["params"]["k"], 3);
        let p = Path::root().key("stages").index(0).key("params").key("k");
        // Block mappings start at their first key.
        assert_eq!(
            spans.value(&Path::root().key("stages").index(0)),
            Pos { line: 3, col: 5 }
        );
        assert_eq!(spans.value(&Path::root()), Pos { line: 1, col: 1 });
        assert_eq!(spans.value(&p), Pos { line: 5, col: 10 });
        assert_eq!(spans.key(&p), Pos { line: 5, col: 7 });
        assert_eq!(
            spans
                .key(&Path::root().key("stages").index(0).key("name"))
                .line,
            3
        );
        assert_eq!(p.to_string(), "stages[0].params.k");
    }

    #[test]
    fn scalars_resolve_by_core_schema() {
        let (json, _) = parse("a: 1\nb: 1.5\nc: true\nd: '1'\ne: ~\nf: text\n").unwrap();
        assert_eq!(json["a"], 1);
        assert_eq!(json["b"], 1.5);
        assert_eq!(json["c"], true);
        assert_eq!(json["d"], "1");
        assert!(json["e"].is_null());
        assert_eq!(json["f"], "text");
    }

    #[test]
    fn duplicate_keys_and_syntax_errors_have_positions() {
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(e.pos.line, 3);
        assert!(e.message.contains("duplicate key `a`"));
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1);
    }

    #[test]
    fn aliases_copy_anchored_nodes() {
        let (json, _) = parse("base: &b {x: 1}\nother: *b\n").unwrap();
        assert_eq!(json["other"]["x"], 1);
    }
}
