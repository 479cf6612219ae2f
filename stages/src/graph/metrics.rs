//! Scores of a node classifier on a set of nodes: accuracy, micro-F1 and macro-F1.
//!
//! Macro-F1 averages the per-class F1 over the classes that occur among the true or the
//! predicted labels of the scored nodes, and a class with no true positive scores 0: the
//! definition of scikit-learn's `f1_score(average="macro")`. Nodes whose true label is negative
//! (unlabelled) are not scored.

use std::collections::BTreeMap;

/// Scores on one set of nodes; `NaN` when the set has no labelled node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    /// Nodes scored.
    pub count: usize,
    /// Share of nodes predicted right.
    pub accuracy: f64,
    /// F1 of the pooled counts over all classes (equal to accuracy for single-label tasks).
    pub micro_f1: f64,
    /// Unweighted mean of the per-class F1.
    pub macro_f1: f64,
}

impl Scores {
    /// Scores of `predicted` against `truth` on `nodes`.
    pub fn of(truth: &[i64], predicted: &[i64], nodes: &[usize]) -> Scores {
        // Per class: true positives, false positives, false negatives.
        let mut per_class: BTreeMap<i64, [usize; 3]> = BTreeMap::new();
        let mut count = 0;
        let mut correct = 0;
        for &i in nodes {
            let (t, p) = (truth[i], predicted[i]);
            if t < 0 {
                continue;
            }
            count += 1;
            if t == p {
                correct += 1;
                per_class.entry(t).or_default()[0] += 1;
            } else {
                per_class.entry(p).or_default()[1] += 1;
                per_class.entry(t).or_default()[2] += 1;
            }
        }
        if count == 0 {
            return Scores {
                count,
                accuracy: f64::NAN,
                micro_f1: f64::NAN,
                macro_f1: f64::NAN,
            };
        }
        let f1 = |[tp, fp, fn_]: [usize; 3]| {
            let denom = 2 * tp + fp + fn_;
            if denom == 0 {
                0.0
            } else {
                2.0 * tp as f64 / denom as f64
            }
        };
        let pooled = per_class.values().fold([0; 3], |acc, c| {
            [acc[0] + c[0], acc[1] + c[1], acc[2] + c[2]]
        });
        let macro_f1 =
            per_class.values().map(|&c| f1(c)).sum::<f64>() / per_class.len().max(1) as f64;
        Scores {
            count,
            accuracy: correct as f64 / count as f64,
            micro_f1: f1(pooled),
            macro_f1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_f1_by_hand() {
        // Class 0: tp 1, fn 1 -> F1 2/3. Class 1: tp 1, fp 1, fn 1 -> 1/2. Class 3: predicted
        // once, never true -> 0. Node 4 is unlabelled, so class 2 does not count.
        let truth = [0, 0, 1, 1, -1];
        let pred = [0, 1, 1, 3, 2];
        let s = Scores::of(&truth, &pred, &[0, 1, 2, 3, 4]);
        assert_eq!(s.count, 4);
        assert!((s.accuracy - 0.5).abs() < 1e-12);
        assert!((s.micro_f1 - 0.5).abs() < 1e-12);
        let expected = (2.0 / 3.0 + 0.5 + 0.0) / 3.0;
        assert!((s.macro_f1 - expected).abs() < 1e-12, "{}", s.macro_f1);
        assert!(Scores::of(&truth, &pred, &[4]).accuracy.is_nan());
    }
}
