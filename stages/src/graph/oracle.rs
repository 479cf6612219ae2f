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
//! A file-based oracle for people (queries written out, answers read back) would implement the
//! same [`Oracle`] trait.
// TODO: a file-based oracle that writes queries and waits for a person's answers; the GCBR
// stage only uses ground truth so far.

/// Answers label queries.
pub trait Oracle: Send {
    /// The label of `node`, or why it cannot be given.
    fn query(&mut self, node: usize) -> Result<i64, String>;
    /// Queries answered so far.
    fn queries(&self) -> usize;
    /// Total cost of the queries answered so far.
    fn cost(&self) -> f64;
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
}
