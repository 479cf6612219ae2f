//! Multinomial logistic regression on node features or frozen node embeddings (a linear
//! probe): `softmax(X · W + b)`, trained full-batch by Adam on the mean cross-entropy of the
//! training nodes plus `weight_decay / 2 · ‖W‖²`. The problem is convex, so weights start at
//! zero and the result does not depend on a seed.

use ndarray::{Array1, Array2, Axis};

use super::{check_node_task, softmax_rows, softmax_xent, Adam, Csr, Graph, NodeResult};

/// Hyper-parameters of [`train`].
#[derive(Clone, Debug, PartialEq)]
pub struct LogregSettings {
    /// Adam learning rate.
    pub lr: f32,
    /// L2 penalty on the weights.
    pub weight_decay: f32,
    /// Full-batch training epochs.
    pub epochs: usize,
}

impl Default for LogregSettings {
    fn default() -> Self {
        LogregSettings {
            lr: 0.01,
            weight_decay: 5e-4,
            epochs: 200,
        }
    }
}

/// The loss and its gradient with respect to `w` and `b`.
pub fn loss_and_grad(
    w: &Array2<f32>,
    b: &Array1<f32>,
    x: &Csr,
    labels: &[i64],
    train: &[usize],
    weight_decay: f32,
) -> (f64, Array2<f32>, Array1<f32>) {
    let mut logits = x.matmul(w);
    logits += b;
    let (xent, g) = softmax_xent(&logits, labels, train);
    let penalty = 0.5 * weight_decay as f64 * w.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
    let mut gw = x.t_matmul(&g);
    gw.scaled_add(weight_decay, w);
    (xent + penalty, gw, g.sum_axis(Axis(0)))
}

/// Trains on the graph's training nodes (its features are the inputs; edges are ignored) and
/// scores on all three parts of its split.
pub fn train(g: &Graph, settings: &LogregSettings) -> Result<NodeResult, String> {
    let (classes, labels, split) = check_node_task(g)?;
    let x = &g.features;
    let mut w = Array2::<f32>::zeros((x.cols, classes));
    let mut b = Array1::<f32>::zeros(classes);
    let mut adam = Adam::new(settings.lr, &[w.len(), b.len()]);
    let mut losses = Vec::with_capacity(settings.epochs);
    for _ in 0..settings.epochs {
        let (loss, gw, gb) = loss_and_grad(&w, &b, x, labels, &split.train, settings.weight_decay);
        adam.step(
            &mut [
                w.as_slice_mut().expect("standard layout"),
                b.as_slice_mut().expect("standard layout"),
            ],
            &[
                gw.as_slice().expect("standard layout"),
                gb.as_slice().expect("standard layout"),
            ],
        );
        losses.push(loss as f32);
    }
    if let Some(e) = losses.iter().position(|l| !l.is_finite()) {
        return Err(format!(
            "the training loss became {} at epoch {}; lower the learning rate",
            losses[e],
            e + 1
        ));
    }
    let mut logits = x.matmul(&w);
    logits += &b;
    Ok(NodeResult::new(
        softmax_rows(&logits),
        None,
        losses,
        labels,
        split,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Rng, Split};

    #[test]
    fn gradient_matches_central_differences() {
        let mut rng = Rng::new(3);
        let x = Array2::from_shape_simple_fn((9, 4), || rng.uniform() - 0.5);
        let x = Csr::from_dense(x.view());
        let w = Array2::from_shape_simple_fn((4, 3), || rng.uniform() - 0.5);
        let b = Array1::from_shape_simple_fn(3, || rng.uniform() - 0.5);
        let labels: Vec<i64> = (0..9).map(|i| i % 3).collect();
        let train = [0, 2, 3, 5, 7];
        let (_, gw, gb) = loss_and_grad(&w, &b, &x, &labels, &train, 0.1);
        let eps = 1e-2;
        for i in 0..w.len() {
            let mut plus = w.clone();
            plus.as_slice_mut().unwrap()[i] += eps;
            let mut minus = w.clone();
            minus.as_slice_mut().unwrap()[i] -= eps;
            let fd = (loss_and_grad(&plus, &b, &x, &labels, &train, 0.1).0
                - loss_and_grad(&minus, &b, &x, &labels, &train, 0.1).0)
                / (2.0 * eps as f64);
            let an = gw.as_slice().unwrap()[i] as f64;
            assert!((fd - an).abs() < 1e-3, "w[{i}]: {fd} vs {an}");
        }
        for i in 0..b.len() {
            let mut plus = b.clone();
            plus[i] += eps;
            let mut minus = b.clone();
            minus[i] -= eps;
            let fd = (loss_and_grad(&w, &plus, &x, &labels, &train, 0.1).0
                - loss_and_grad(&w, &minus, &x, &labels, &train, 0.1).0)
                / (2.0 * eps as f64);
            assert!(
                (fd - gb[i] as f64).abs() < 1e-3,
                "b[{i}]: {fd} vs {}",
                gb[i]
            );
        }
    }

    #[test]
    fn separates_separable_classes() {
        let x = ndarray::array![[1.0f32, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.8]];
        let g = Graph {
            num_nodes: 4,
            edges: vec![],
            features: Csr::from_dense(x.view()),
            labels: Some(vec![0, 0, 1, 1]),
            graph_label: None,
            split: Some(Split {
                train: vec![0, 2],
                val: vec![1],
                test: vec![3],
            }),
        };
        let r = train(&g, &LogregSettings::default()).unwrap();
        assert_eq!(r.predictions, vec![0, 0, 1, 1]);
        assert_eq!(r.test.accuracy, 1.0);
    }
}
