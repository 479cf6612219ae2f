//! Small record transforms: arithmetic on tensors, finiteness checks, class decisions.

use latentflow_engine::{
    Completion, DType, Failure, FieldType, KindInfo, Outcome, ParamKind, ParamSpec, Params, Plan,
    PlanIssue, Record, Schema, Shape, Stage, StageContext, StageFactory, Tensor, Value,
};
use ndarray::{ArrayD, Axis};
use serde_json::json;

fn ready(outcomes: Vec<Outcome>) -> Completion {
    Completion::Ready(outcomes)
}

/// `y = factor * x + offset` on a float tensor or scalar field.
pub struct ScaleStage;

struct Scale {
    field: String,
    output: String,
    factor: f32,
    offset: f32,
}

impl StageFactory for ScaleStage {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "scale",
            doc: "Computes factor × x + offset elementwise on a float tensor or scalar field.",
            params: vec![
                ParamSpec::required("field", ParamKind::Field, "the field to read"),
                ParamSpec::optional("factor", ParamKind::Float, json!(1.0), "multiplier"),
                ParamSpec::optional(
                    "offset",
                    ParamKind::Float,
                    json!(0.0),
                    "added after multiplying",
                ),
                ParamSpec::optional(
                    "output",
                    ParamKind::String,
                    json!(null),
                    "field to write (default: replace `field`)",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let field = params.str_req("field");
        let ty = match input.get(field) {
            Some(t @ FieldType::Scalar) => t.clone(),
            _ => FieldType::f32(Shape::any()),
        };
        let out_ty = input
            .get(field)
            .filter(|t| t.satisfies(&ty))
            .cloned()
            .unwrap_or(ty.clone());
        Ok(Plan::default()
            .read(field, ty, &["field"])
            .write(params.str("output").unwrap_or(field), out_ty))
    }

    fn build(&self, params: &Params, _cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        let field = params.str_req("field").to_string();
        Ok(Box::new(Scale {
            output: params.str("output").unwrap_or(&field).to_string(),
            field,
            factor: params.float("factor").unwrap_or(1.0) as f32,
            offset: params.float("offset").unwrap_or(0.0) as f32,
        }))
    }
}

impl Stage for Scale {
    fn process(&mut self, batch: Vec<Record>, cx: &StageContext) -> Completion {
        ready(
            batch
                .into_iter()
                .map(|mut r| {
                    let v = match r.get(&self.field) {
                        Some(Value::Tensor(Tensor::F32(a))) => {
                            Value::Tensor(Tensor::f32(a.mapv(|x| self.factor * x + self.offset)))
                        }
                        Some(Value::Scalar(x)) => {
                            Value::Scalar(self.factor as f64 * x + self.offset as f64)
                        }
                        other => {
                            let found = other.map(|v| v.describe()).unwrap_or("nothing".into());
                            let reason =
                                format!("field `{}` is {found}, expected f32 data", self.field);
                            return Err(Failure::of(&r, &cx.name, reason));
                        }
                    };
                    r.set(&self.output, v);
                    Ok(r)
                })
                .collect(),
        )
    }
}

/// Fails records whose tensors hold NaN or infinite values.
pub struct CheckFiniteStage;

struct CheckFinite {
    fields: Vec<String>,
}

impl StageFactory for CheckFiniteStage {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "check-finite",
            doc: "Sends records whose listed tensor fields hold NaN or ±inf to the errors file \
                  instead of passing them on.",
            params: vec![ParamSpec::required(
                "fields",
                ParamKind::FieldList,
                "tensor fields to check",
            )],
        }
    }

    fn plan(&self, params: &Params, _input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let mut plan = Plan::default();
        for (i, f) in params.strings("fields").iter().enumerate() {
            plan = plan.read(f, FieldType::f32(Shape::any()), &["fields", &i.to_string()]);
        }
        Ok(plan)
    }

    fn build(&self, params: &Params, _cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        Ok(Box::new(CheckFinite {
            fields: params.strings("fields"),
        }))
    }
}

impl Stage for CheckFinite {
    fn process(&mut self, batch: Vec<Record>, cx: &StageContext) -> Completion {
        ready(
            batch
                .into_iter()
                .map(|r| {
                    for f in &self.fields {
                        if let Some(Value::Tensor(Tensor::F32(a))) = r.get(f) {
                            let bad = a.iter().filter(|v| !v.is_finite()).count();
                            if bad > 0 {
                                let reason =
                                    format!("field `{f}` has {bad} NaN or infinite values");
                                return Err(Failure::of(&r, &cx.name, reason));
                            }
                        }
                    }
                    Ok(r)
                })
                .collect(),
        )
    }
}

/// Index of the largest value along the last axis.
pub struct ArgmaxStage;

struct Argmax {
    field: String,
    output: String,
}

impl StageFactory for ArgmaxStage {
    fn info(&self) -> KindInfo {
        KindInfo {
            name: "argmax",
            doc: "Writes the index of the largest value of a float tensor along its last axis: \
                  an int for a vector, an i64 tensor otherwise.",
            params: vec![
                ParamSpec::required("field", ParamKind::Field, "float tensor to read"),
                ParamSpec::optional(
                    "output",
                    ParamKind::String,
                    json!("predicted"),
                    "field to write",
                ),
            ],
        }
    }

    fn plan(&self, params: &Params, input: &Schema) -> Result<Plan, Vec<PlanIssue>> {
        let field = params.str_req("field");
        let out_ty = match input.get(field) {
            Some(FieldType::Tensor {
                shape: Shape(Some(dims)),
                ..
            }) if dims.len() == 1 => FieldType::Int,
            Some(FieldType::Tensor {
                shape: Shape(Some(dims)),
                ..
            }) if dims.is_empty() => {
                return Err(vec![PlanIssue::param(
                    "field",
                    format!("`{field}` is a 0-d tensor; argmax needs at least one axis"),
                )]);
            }
            Some(FieldType::Tensor {
                shape: Shape(Some(dims)),
                ..
            }) => FieldType::Tensor {
                dtype: DType::I64,
                shape: Shape(Some(dims[..dims.len() - 1].to_vec())),
            },
            _ => FieldType::Tensor {
                dtype: DType::I64,
                shape: Shape::any(),
            },
        };
        Ok(Plan::default()
            .read(field, FieldType::f32(Shape::any()), &["field"])
            .write(params.str_req("output"), out_ty))
    }

    fn build(&self, params: &Params, _cx: &StageContext) -> Result<Box<dyn Stage>, String> {
        Ok(Box::new(Argmax {
            field: params.str_req("field").into(),
            output: params.str_req("output").into(),
        }))
    }
}

fn argmax_last(a: &ArrayD<f32>) -> ArrayD<i64> {
    let last = Axis(a.ndim() - 1);
    a.map_axis(last, |lane| {
        let mut best = 0usize;
        for (i, v) in lane.iter().enumerate() {
            if *v > lane[best] {
                best = i;
            }
        }
        best as i64
    })
}

impl Stage for Argmax {
    fn process(&mut self, batch: Vec<Record>, cx: &StageContext) -> Completion {
        ready(
            batch
                .into_iter()
                .map(|mut r| {
                    let Some(Value::Tensor(Tensor::F32(a))) = r.get(&self.field) else {
                        let reason = format!("field `{}` is not an f32 tensor", self.field);
                        return Err(Failure::of(&r, &cx.name, reason));
                    };
                    if a.ndim() == 0 || a.is_empty() {
                        return Err(Failure::of(
                            &r,
                            &cx.name,
                            format!("field `{}` is empty", self.field),
                        ));
                    }
                    let idx = argmax_last(a);
                    let v = if a.ndim() == 1 {
                        Value::Int(idx.iter().next().copied().unwrap_or(0))
                    } else {
                        Value::Tensor(Tensor::i64(idx))
                    };
                    r.set(&self.output, v);
                    Ok(r)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn argmax_along_last_axis() {
        let a =
            ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![0.1f32, 0.9, 0.0, 5.0, -1.0, 4.0]).unwrap();
        assert_eq!(argmax_last(&a).as_slice().unwrap(), &[1, 0]);
    }
}
