//! Central finite differences: the fallback when a model cannot be differentiated exactly,
//! the cheaper way to a whole Jacobian when the input is much smaller than the output, and the
//! reference the exact gradients are tested against.
//!
//! Decisions:
//! - One model call evaluates many perturbations: the points `x ± h·e_i` for a block of
//!   columns `i` are stacked along the batch axis, so a Jacobian with `n` columns costs `2n`
//!   rows of forward passes in `ceil(2n / max_batch)` calls.
//! - Each column is divided by the step actually taken in float32 (`(x + h) − (x − h)` after
//!   rounding), not by `2h`, and differences are formed in float64, which removes most of the
//!   rounding error a float32 model adds.

use ndarray::{Array2, ArrayD, Axis, IxDyn};

/// The Jacobian of `f` at `x` by central differences, as `[outputs, inputs]` (both flattened).
///
/// `x` is one example without a batch axis; `f` maps a batch `[B, x.shape...]` to
/// `[B, output shape...]`. Columns are evaluated `max_batch / 2` at a time. `step` is the
/// perturbation `h` (use about `1e-3 × scale of x` for float32 models).
pub fn central_difference_jacobian<E>(
    mut f: impl FnMut(ArrayD<f32>) -> Result<ArrayD<f32>, E>,
    x: &ArrayD<f32>,
    step: f32,
    max_batch: usize,
) -> Result<Array2<f64>, E> {
    let n_in = x.len();
    let flat: Vec<f32> = x.iter().copied().collect();
    let per_call = (max_batch / 2).max(1);
    let mut columns: Vec<Vec<f64>> = Vec::with_capacity(n_in);
    let mut n_out = 0;
    for start in (0..n_in).step_by(per_call) {
        let count = per_call.min(n_in - start);
        let mut shape = vec![2 * count];
        shape.extend_from_slice(x.shape());
        let mut batch = Vec::with_capacity(2 * count * n_in);
        let mut taken = Vec::with_capacity(count);
        for i in start..start + count {
            let plus = flat[i] + step;
            let minus = flat[i] - step;
            taken.push(plus as f64 - minus as f64);
            for sign in [plus, minus] {
                let mut row = flat.clone();
                row[i] = sign;
                batch.extend_from_slice(&row);
            }
        }
        let batch = ArrayD::from_shape_vec(IxDyn(&shape), batch).expect("shape matches data");
        let out = f(batch)?;
        n_out = out.len() / (2 * count);
        for (j, h) in taken.iter().enumerate() {
            let plus = out.index_axis(Axis(0), 2 * j);
            let minus = out.index_axis(Axis(0), 2 * j + 1);
            columns.push(
                plus.iter()
                    .zip(minus.iter())
                    .map(|(&p, &m)| (p as f64 - m as f64) / h)
                    .collect(),
            );
        }
    }
    let mut jac = Array2::<f64>::zeros((n_out, n_in));
    for (i, col) in columns.iter().enumerate() {
        for (o, v) in col.iter().enumerate() {
            jac[[o, i]] = *v;
        }
    }
    Ok(jac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobian_of_a_known_function() {
        // f(x) = [x0 * x1, x1^2, sin(x0)] per row.
        let f = |b: ArrayD<f32>| -> Result<ArrayD<f32>, ()> {
            let rows = b.shape()[0];
            let mut out = Vec::new();
            for r in 0..rows {
                let (a, c) = (b[[r, 0]], b[[r, 1]]);
                out.extend([a * c, c * c, a.sin()]);
            }
            Ok(ArrayD::from_shape_vec(IxDyn(&[rows, 3]), out).unwrap())
        };
        let x = ArrayD::from_shape_vec(IxDyn(&[2]), vec![0.5f32, -1.5]).unwrap();
        let j = central_difference_jacobian(f, &x, 1e-2, 3).unwrap();
        let want = [[-1.5, 0.5], [0.0, -3.0], [0.5f64.cos(), 0.0]];
        for o in 0..3 {
            for i in 0..2 {
                assert!((j[[o, i]] - want[o][i]).abs() < 1e-3, "{j:?}");
            }
        }
    }
}
