//! Records and the values they carry, and the static types the planner checks.
//!
//! A [`Record`] is a keyed bag of named fields. Large payloads (tensors, graphs) sit behind
//! `Arc`, so cloning a record to fan it out to several consumers copies pointers, not data.
//! Every field has a [`FieldType`] known before the run starts; the planner uses these types to
//! check a pipeline, and stages use them to check each record they receive.
//!
//! A tensor field holds one example: it has no batch axis. Stages that call a model stack the
//! tensors of many records along a new leading axis and split the results again.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit signed integer.
    I64,
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
        })
    }
}

/// A dense tensor of one example.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Tensor {
    /// 32-bit float data.
    F32(Arc<ArrayD<f32>>),
    /// 64-bit integer data.
    I64(Arc<ArrayD<i64>>),
}

impl Tensor {
    /// Wraps a float array.
    pub fn f32(array: ArrayD<f32>) -> Self {
        Tensor::F32(Arc::new(array))
    }

    /// Wraps an integer array.
    pub fn i64(array: ArrayD<i64>) -> Self {
        Tensor::I64(Arc::new(array))
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::I64(_) => DType::I64,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32(a) => a.shape(),
            Tensor::I64(a) => a.shape(),
        }
    }

    /// The float data, if this is a float tensor.
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            Tensor::I64(_) => None,
        }
    }

    /// The integer data, if this is an integer tensor.
    pub fn as_i64(&self) -> Option<&ArrayD<i64>> {
        match self {
            Tensor::I64(a) => Some(a),
            Tensor::F32(_) => None,
        }
    }

    /// Whether every element is finite (always true for integers).
    pub fn is_finite(&self) -> bool {
        match self {
            Tensor::F32(a) => a.iter().all(|v| v.is_finite()),
            Tensor::I64(_) => true,
        }
    }
}

/// A graph in coordinate form: `edge_index` is `[2, E]` (source row, target row).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Graph {
    /// Number of nodes.
    pub num_nodes: usize,
    /// Edges as `[2, E]` node indices.
    pub edge_index: Arc<ArrayD<i64>>,
    /// Node features `[N, F]`, when the graph has them.
    pub features: Option<Arc<ArrayD<f32>>>,
}

/// A field's value.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Value {
    /// A dense tensor.
    Tensor(Tensor),
    /// A floating-point number.
    Scalar(f64),
    /// An integer.
    Int(i64),
    /// A string.
    Text(Arc<str>),
    /// A graph.
    Graph(Arc<Graph>),
}

impl Value {
    /// The tensor, if this value is one.
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }

    /// A short description of the value's runtime type, for error messages.
    pub fn describe(&self) -> String {
        match self {
            Value::Tensor(t) => format!("tensor<{}>{:?}", t.dtype(), t.shape()),
            Value::Scalar(_) => "scalar".into(),
            Value::Int(_) => "int".into(),
            Value::Text(_) => "text".into(),
            Value::Graph(_) => "graph".into(),
        }
    }

    /// Whether this value has the static type `ty`.
    pub fn conforms(&self, ty: &FieldType) -> bool {
        match (self, ty) {
            (Value::Tensor(t), FieldType::Tensor { dtype, shape }) => {
                t.dtype() == *dtype && shape.accepts(t.shape())
            }
            (Value::Scalar(_), FieldType::Scalar)
            | (Value::Int(_), FieldType::Int)
            | (Value::Text(_), FieldType::Text)
            | (Value::Graph(_), FieldType::Graph) => true,
            _ => false,
        }
    }
}

/// One unit of work flowing through a pipeline.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Identifies the record in outputs, the errors file and the journal.
    pub key: Arc<str>,
    /// Position in its source; sinks order their output by it, so results do not depend on
    /// how many workers ran.
    pub seq: u64,
    /// Rounds completed in the loop the record is in (0 outside loops).
    pub round: u32,
    /// The named fields.
    pub fields: BTreeMap<Arc<str>, Value>,
}

impl Record {
    /// A record with no fields.
    pub fn new(key: impl Into<Arc<str>>, seq: u64) -> Self {
        Record {
            key: key.into(),
            seq,
            round: 0,
            fields: BTreeMap::new(),
        }
    }

    /// Sets a field, replacing any earlier value.
    pub fn with(mut self, name: &str, value: Value) -> Self {
        self.set(name, value);
        self
    }

    /// Sets a field, replacing any earlier value.
    pub fn set(&mut self, name: &str, value: Value) {
        self.fields.insert(Arc::from(name), value);
    }

    /// A field's value.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.get(name)
    }

    /// A tensor field, or an error naming the field and what was found.
    pub fn tensor(&self, name: &str) -> Result<&Tensor, String> {
        match self.fields.get(name) {
            Some(Value::Tensor(t)) => Ok(t),
            Some(other) => Err(format!(
                "field `{name}` is {}, expected a tensor",
                other.describe()
            )),
            None => Err(format!("field `{name}` is missing")),
        }
    }
}

/// One axis of a static shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    /// A fixed length.
    Fixed(usize),
    /// Any length; the name documents what the axis is (e.g. `nodes`).
    Named(String),
}

impl Dim {
    fn accepts(&self, n: usize) -> bool {
        match self {
            Dim::Fixed(m) => *m == n,
            Dim::Named(_) => true,
        }
    }

    fn compatible(&self, other: &Dim) -> bool {
        match (self, other) {
            (Dim::Fixed(a), Dim::Fixed(b)) => a == b,
            _ => true,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Named(s) => f.write_str(s),
        }
    }
}

/// A static tensor shape: `None` when even the rank is unknown.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Shape(pub Option<Vec<Dim>>);

impl Shape {
    /// A shape of unknown rank.
    pub fn any() -> Self {
        Shape(None)
    }

    /// A fully fixed shape.
    pub fn fixed(dims: &[usize]) -> Self {
        Shape(Some(dims.iter().map(|&d| Dim::Fixed(d)).collect()))
    }

    /// Whether a concrete shape fits.
    pub fn accepts(&self, shape: &[usize]) -> bool {
        match &self.0 {
            None => true,
            Some(dims) => {
                dims.len() == shape.len() && dims.iter().zip(shape).all(|(d, &n)| d.accepts(n))
            }
        }
    }

    /// Whether some concrete shape fits both.
    pub fn compatible(&self, other: &Shape) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.compatible(y))
            }
            _ => true,
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("[..]"),
            Some(dims) => {
                let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
                write!(f, "[{}]", parts.join(", "))
            }
        }
    }
}

/// The static type of a field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FieldType {
    /// A tensor with an element type and a (possibly partial) shape.
    Tensor {
        /// Element type.
        dtype: DType,
        /// Shape of one example.
        shape: Shape,
    },
    /// A floating-point number.
    Scalar,
    /// An integer.
    Int,
    /// A string.
    Text,
    /// A graph.
    Graph,
}

impl FieldType {
    /// A float tensor type.
    pub fn f32(shape: Shape) -> Self {
        FieldType::Tensor {
            dtype: DType::F32,
            shape,
        }
    }

    /// Whether a value produced with type `self` may be read where `wanted` is required.
    pub fn satisfies(&self, wanted: &FieldType) -> bool {
        match (self, wanted) {
            (
                FieldType::Tensor {
                    dtype: a,
                    shape: sa,
                },
                FieldType::Tensor {
                    dtype: b,
                    shape: sb,
                },
            ) => a == b && sa.compatible(sb),
            (a, b) => a == b,
        }
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldType::Tensor { dtype, shape } => write!(f, "tensor<{dtype}>{shape}"),
            FieldType::Scalar => f.write_str("scalar"),
            FieldType::Int => f.write_str("int"),
            FieldType::Text => f.write_str("text"),
            FieldType::Graph => f.write_str("graph"),
        }
    }
}

/// The fields a stream of records is known to carry, with their types.
pub type Schema = BTreeMap<String, FieldType>;

/// Stacks equally shaped arrays along a new leading axis.
pub fn stack<T: Clone>(arrays: &[&ArrayD<T>]) -> Option<ArrayD<T>> {
    let first = arrays.first()?;
    let mut shape = vec![arrays.len()];
    shape.extend_from_slice(first.shape());
    let mut data = Vec::with_capacity(shape.iter().product());
    for a in arrays {
        if a.shape() != first.shape() {
            return None;
        }
        match a.as_slice() {
            Some(s) => data.extend_from_slice(s),
            None => data.extend(a.iter().cloned()),
        }
    }
    ArrayD::from_shape_vec(IxDyn(&shape), data).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_accept_and_compare() {
        let s = Shape(Some(vec![Dim::Named("n".into()), Dim::Fixed(3)]));
        assert!(s.accepts(&[7, 3]));
        assert!(!s.accepts(&[7, 4]));
        assert!(!s.accepts(&[3]));
        assert!(s.compatible(&Shape::fixed(&[2, 3])));
        assert!(!s.compatible(&Shape::fixed(&[2, 2])));
        assert!(Shape::any().compatible(&s));
        assert_eq!(s.to_string(), "[n, 3]");
    }

    #[test]
    fn stacking_adds_a_leading_axis() {
        let a = ArrayD::from_shape_vec(IxDyn(&[2]), vec![1.0f32, 2.0]).unwrap();
        let b = ArrayD::from_shape_vec(IxDyn(&[2]), vec![3.0f32, 4.0]).unwrap();
        let s = stack(&[&a, &b]).unwrap();
        assert_eq!(s.shape(), &[2, 2]);
        assert_eq!(s.as_slice().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
        let c = ArrayD::from_shape_vec(IxDyn(&[1]), vec![0.0f32]).unwrap();
        assert!(stack(&[&a, &c]).is_none());
    }
}

impl std::str::FromStr for FieldType {
    type Err = String;

    /// Parses `int`, `scalar`, `text`, `graph`, or a tensor type such as `f32[3, 64, 64]`,
    /// `i64[n]` (a named axis accepts any length) or `f32[..]` (any shape).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "int" => return Ok(FieldType::Int),
            "scalar" => return Ok(FieldType::Scalar),
            "text" => return Ok(FieldType::Text),
            "graph" => return Ok(FieldType::Graph),
            _ => {}
        }
        let (dtype, rest) = if let Some(r) = s.strip_prefix("f32") {
            (DType::F32, r)
        } else if let Some(r) = s.strip_prefix("i64") {
            (DType::I64, r)
        } else {
            return Err(format!(
                "unknown type `{s}`; expected int, scalar, text, graph, f32[..] or i64[..]"
            ));
        };
        let inner = rest
            .trim()
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .ok_or_else(|| {
                format!("tensor type `{s}` needs a shape in brackets, e.g. f32[3, 8]")
            })?;
        let inner = inner.trim();
        if inner == ".." {
            return Ok(FieldType::Tensor {
                dtype,
                shape: Shape::any(),
            });
        }
        let mut dims = Vec::new();
        for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.parse::<usize>() {
                Ok(n) => dims.push(Dim::Fixed(n)),
                Err(_) if part.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                    dims.push(Dim::Named(part.to_string()))
                }
                Err(_) => return Err(format!("bad axis `{part}` in `{s}`")),
            }
        }
        Ok(FieldType::Tensor {
            dtype,
            shape: Shape(Some(dims)),
        })
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn parses_type_strings() {
        assert_eq!("int".parse::<FieldType>().unwrap(), FieldType::Int);
        let t: FieldType = "f32[3, n]".parse().unwrap();
        assert_eq!(t.to_string(), "tensor<f32>[3, n]");
        assert_eq!(
            "i64[..]".parse::<FieldType>().unwrap().to_string(),
            "tensor<i64>[..]"
        );
        assert!("f16[2]".parse::<FieldType>().is_err());
        assert!("f32".parse::<FieldType>().is_err());
    }
}
