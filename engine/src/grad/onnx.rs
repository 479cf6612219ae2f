//! The ONNX protobuf messages and the few helpers the gradient builder needs to read and write
//! them: attributes, element types, small constant tensors.
//!
//! The message types are generated at build time from `engine/proto/onnx.proto` (vendored from
//! the onnx Python wheel) by `engine/build.rs`. They stay private to the crate: the public API of
//! [`crate::grad`] speaks in files, names and ndarrays.

#[allow(missing_docs, clippy::all, clippy::pedantic, dead_code)]
pub(crate) mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub(crate) use proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto,
};

/// `TensorProto.DataType` values used here.
pub(crate) mod elem {
    pub const UNDEFINED: i32 = 0;
    pub const FLOAT: i32 = 1;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const BOOL: i32 = 9;
    pub const FLOAT16: i32 = 10;
    pub const DOUBLE: i32 = 11;
    pub const BFLOAT16: i32 = 16;
}

/// `AttributeProto.AttributeType` values used here.
mod attr_type {
    pub const FLOAT: i32 = 1;
    pub const INT: i32 = 2;
    pub const STRING: i32 = 3;
    pub const TENSOR: i32 = 4;
    pub const INTS: i32 = 7;
}

/// `TensorProto.DataLocation.EXTERNAL`.
const EXTERNAL: i32 = 1;

/// Whether an element type is a floating-point type (the only ones that carry gradients).
pub(crate) fn is_float(t: i32) -> bool {
    matches!(
        t,
        elem::FLOAT | elem::DOUBLE | elem::FLOAT16 | elem::BFLOAT16
    )
}

/// The ONNX name of an element type, for messages.
pub(crate) fn elem_name(t: i32) -> String {
    match proto::tensor_proto::DataType::try_from(t) {
        Ok(d) => d.as_str_name().to_ascii_lowercase(),
        Err(_) => format!("element type {t}"),
    }
}

/// Reading a node's fields and attributes.
pub(crate) trait NodeExt {
    /// The operator type.
    fn op(&self) -> &str;
    /// The operator domain, `""` for the default ONNX domain.
    fn domain_name(&self) -> &str;
    /// The attribute called `name`.
    fn attr(&self, name: &str) -> Option<&AttributeProto>;
    /// An integer attribute.
    fn attr_i(&self, name: &str) -> Option<i64> {
        self.attr(name).and_then(|a| a.i)
    }
    /// A float attribute.
    fn attr_f(&self, name: &str) -> Option<f32> {
        self.attr(name).and_then(|a| a.f)
    }
    /// An integer-list attribute.
    fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }
    /// A string attribute.
    fn attr_s(&self, name: &str) -> Option<&str> {
        self.attr(name)
            .and_then(|a| a.s.as_deref())
            .and_then(|s| std::str::from_utf8(s).ok())
    }
    /// A tensor attribute.
    fn attr_t(&self, name: &str) -> Option<&TensorProto> {
        self.attr(name).and_then(|a| a.t.as_ref())
    }
    /// Input `i` when present and not the empty name of an omitted optional input.
    fn input_at(&self, i: usize) -> Option<&str>;
}

impl NodeExt for NodeProto {
    fn op(&self) -> &str {
        self.op_type.as_deref().unwrap_or("")
    }

    fn domain_name(&self) -> &str {
        match self.domain.as_deref() {
            Some("ai.onnx") | None => "",
            Some(d) => d,
        }
    }

    fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
    }

    fn input_at(&self, i: usize) -> Option<&str> {
        self.input
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// An integer attribute.
pub(crate) fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attr_type::INT),
        i: Some(v),
        ..Default::default()
    }
}

/// A float attribute.
pub(crate) fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attr_type::FLOAT),
        f: Some(v),
        ..Default::default()
    }
}

/// An integer-list attribute.
pub(crate) fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attr_type::INTS),
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// A string attribute.
pub(crate) fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attr_type::STRING),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

/// A tensor attribute.
pub(crate) fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(attr_type::TENSOR),
        t: Some(t),
        ..Default::default()
    }
}

/// Whether the tensor's data lives in an external file.
pub(crate) fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(EXTERNAL) || !t.external_data.is_empty()
}

/// Number of elements of a tensor with these dimensions.
fn count(dims: &[i64]) -> usize {
    dims.iter().map(|&d| d.max(0) as usize).product()
}

/// The values of an integer tensor (int64 or int32), if it holds its data inline.
pub(crate) fn tensor_ints(t: &TensorProto) -> Option<Vec<i64>> {
    if is_external(t) {
        return None;
    }
    let n = count(&t.dims);
    let values: Vec<i64> = match t.data_type? {
        elem::INT64 => match &t.raw_data {
            Some(raw) => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            None => t.int64_data.clone(),
        },
        elem::INT32 => match &t.raw_data {
            Some(raw) => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
            None => t.int32_data.iter().map(|&v| v as i64).collect(),
        },
        _ => return None,
    };
    (values.len() == n).then_some(values)
}

/// The values of a float or double tensor as f64, if it holds its data inline.
pub(crate) fn tensor_floats(t: &TensorProto) -> Option<Vec<f64>> {
    if is_external(t) {
        return None;
    }
    let n = count(&t.dims);
    let values: Vec<f64> = match t.data_type? {
        elem::FLOAT => match &t.raw_data {
            Some(raw) => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
                .collect(),
            None => t.float_data.iter().map(|&v| v as f64).collect(),
        },
        elem::DOUBLE => match &t.raw_data {
            Some(raw) => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            None => t.double_data.clone(),
        },
        _ => return None,
    };
    (values.len() == n).then_some(values)
}

/// An int64 tensor.
pub(crate) fn int_tensor(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(elem::INT64),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

/// A float tensor of element type `elem_type` (float or double).
pub(crate) fn float_tensor(
    name: &str,
    elem_type: i32,
    dims: &[i64],
    values: &[f64],
) -> TensorProto {
    let raw: Vec<u8> = match elem_type {
        elem::DOUBLE => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => values
            .iter()
            .flat_map(|&v| (v as f32).to_le_bytes())
            .collect(),
    };
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(elem_type),
        raw_data: Some(raw),
        ..Default::default()
    }
}

/// The values of a float32 tensor, if it holds its data inline.
pub(crate) fn tensor_f32(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != Some(elem::FLOAT) || is_external(t) {
        return None;
    }
    let values: Vec<f32> = match &t.raw_data {
        Some(raw) => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        None => t.float_data.clone(),
    };
    (values.len() == count(&t.dims)).then_some(values)
}

/// The element type and dimensions (`None` for a symbolic or unknown axis) of a tensor type.
pub(crate) fn tensor_type(
    t: &TypeProto,
) -> Option<(i32, Option<Vec<proto::tensor_shape_proto::Dimension>>)> {
    match &t.value {
        Some(proto::type_proto::Value::TensorType(tt)) => Some((
            tt.elem_type.unwrap_or(elem::UNDEFINED),
            tt.shape.as_ref().map(|s| s.dim.clone()),
        )),
        _ => None,
    }
}

/// A tensor type with the given element type and dimensions (`Err(name)` for a symbolic axis,
/// `Ok(n)` for a fixed one, `None` for an unnamed dynamic one).
pub(crate) fn make_tensor_type(
    elem_type: i32,
    dims: Option<&[Option<Result<i64, String>>]>,
) -> TypeProto {
    use proto::tensor_shape_proto::{dimension, Dimension};
    let shape = dims.map(|dims| proto::TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dimension {
                value: match d {
                    Some(Ok(n)) => Some(dimension::Value::DimValue(*n)),
                    Some(Err(s)) => Some(dimension::Value::DimParam(s.clone())),
                    None => None,
                },
                denotation: None,
            })
            .collect(),
    });
    TypeProto {
        value: Some(proto::type_proto::Value::TensorType(
            proto::type_proto::Tensor {
                elem_type: Some(elem_type),
                shape,
            },
        )),
        denotation: None,
    }
}

/// A dimension as text: its length, its symbolic name, or `?`.
pub(crate) fn dim_name(d: &proto::tensor_shape_proto::Dimension) -> String {
    use proto::tensor_shape_proto::dimension::Value;
    match &d.value {
        Some(Value::DimValue(n)) => n.to_string(),
        Some(Value::DimParam(s)) if !s.is_empty() => s.clone(),
        _ => "?".to_string(),
    }
}

/// A value-info record.
pub(crate) fn value_info(name: &str, ty: TypeProto) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(ty),
        ..Default::default()
    }
}
