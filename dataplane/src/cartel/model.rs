//! The small per-site model of Cartel: an online multinomial logistic
//! regression whose parameters are per-class weight blocks, so that a site
//! can hold only the classes it sees and borrow single classes from its
//! logical neighbours.

use std::collections::{BTreeMap, BTreeSet};

use ndarray::ArrayView2;

use super::pb;

/// One class's weights (`features` weights, then the bias) and the number
/// of examples of that class it was trained on.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassBlock {
    /// The weights, bias last.
    pub weights: Vec<f32>,
    /// Examples of this class seen.
    pub examples: u64,
}

/// Online linear classifier with one weight block per class it has seen.
#[derive(Clone, Debug)]
pub struct OnlineLinear {
    features: usize,
    learning_rate: f32,
    l2: f32,
    blocks: BTreeMap<u16, ClassBlock>,
}

impl OnlineLinear {
    /// An empty model over `features` inputs.
    #[must_use]
    pub fn new(features: usize, learning_rate: f32, l2: f32) -> Self {
        Self {
            features,
            learning_rate,
            l2,
            blocks: BTreeMap::new(),
        }
    }

    /// Inputs per example.
    #[must_use]
    pub fn features(&self) -> usize {
        self.features
    }

    /// Classes the model holds a block for, ascending.
    #[must_use]
    pub fn classes(&self) -> Vec<u16> {
        self.blocks.keys().copied().collect()
    }

    /// Bytes of the parameters: blocks × (features + 1) × 4.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        (self.blocks.len() * (self.features + 1) * 4) as u64
    }

    fn logits(&self, x: &[f32], out: &mut Vec<(u16, f32)>) {
        out.clear();
        for (&class, block) in &self.blocks {
            let (w, b) = block.weights.split_at(self.features);
            let dot: f32 = w.iter().zip(x).map(|(a, b)| a * b).sum();
            out.push((class, dot + b[0]));
        }
    }

    /// The predicted class of one example; `None` without any block.
    #[must_use]
    pub fn predict(&self, x: &[f32]) -> Option<u16> {
        let mut logits = Vec::new();
        self.logits(x, &mut logits);
        logits
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(c, _)| *c)
    }

    /// Share of `labels` predicted correctly; 0 for no examples.
    #[must_use]
    #[allow(clippy::needless_pass_by_value)] // a view is a cheap handle, as ndarray's own APIs take it
    pub fn accuracy(&self, x: ArrayView2<'_, f32>, labels: &[u16]) -> f64 {
        if labels.is_empty() {
            return 0.0;
        }
        let mut logits = Vec::new();
        let mut correct = 0usize;
        for (row, &label) in x.rows().into_iter().zip(labels) {
            let row = row.as_slice().map_or_else(|| row.to_vec(), <[f32]>::to_vec);
            self.logits(&row, &mut logits);
            let best = logits
                .iter()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(c, _)| *c);
            correct += usize::from(best == Some(label));
        }
        #[allow(clippy::cast_precision_loss)] // batch sizes are small
        let share = correct as f64 / labels.len() as f64;
        share
    }

    /// One step of SGD on the softmax loss over the classes held, creating
    /// (zero) blocks for labels not seen before.
    #[allow(clippy::needless_pass_by_value)] // a view is a cheap handle, as ndarray's own APIs take it
    pub fn train(&mut self, x: ArrayView2<'_, f32>, labels: &[u16]) {
        if labels.is_empty() {
            return;
        }
        for &label in labels {
            let block = self.blocks.entry(label).or_insert_with(|| ClassBlock {
                weights: vec![0.0; self.features + 1],
                examples: 0,
            });
            block.examples += 1;
        }
        let width = self.features + 1;
        let mut grads: BTreeMap<u16, Vec<f32>> =
            self.blocks.keys().map(|&c| (c, vec![0.0; width])).collect();
        let mut logits = Vec::new();
        for (row, &label) in x.rows().into_iter().zip(labels) {
            let row = row.as_slice().map_or_else(|| row.to_vec(), <[f32]>::to_vec);
            self.logits(&row, &mut logits);
            let max = logits.iter().map(|l| l.1).fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = logits.iter().map(|l| (l.1 - max).exp()).sum();
            for &(class, logit) in &logits {
                let p = (logit - max).exp() / total;
                let g = p - f32::from(u8::from(class == label));
                if let Some(grad) = grads.get_mut(&class) {
                    for (gi, xi) in grad.iter_mut().zip(&row) {
                        *gi += g * xi;
                    }
                    grad[self.features] += g;
                }
            }
        }
        #[allow(clippy::cast_precision_loss)] // batch sizes are small
        let scale = self.learning_rate / labels.len() as f32;
        for (class, grad) in grads {
            if let Some(block) = self.blocks.get_mut(&class) {
                for (i, (w, g)) in block.weights.iter_mut().zip(&grad).enumerate() {
                    let decay = if i < self.features { self.l2 * *w } else { 0.0 };
                    *w -= scale * g + self.learning_rate * decay;
                }
            }
        }
    }

    /// The blocks of `classes` the model holds, as the exchange sends them.
    #[must_use]
    pub fn portions(&self, classes: &[u16]) -> Vec<pb::ClassBlock> {
        classes
            .iter()
            .filter_map(|c| self.blocks.get(c).map(|b| (c, b)))
            .map(|(&class, block)| pb::ClassBlock {
                class: u32::from(class),
                weights: block.weights.iter().flat_map(|w| w.to_le_bytes()).collect(),
                examples: block.examples,
            })
            .collect()
    }

    /// Every block, as a whole-model message carries them.
    #[must_use]
    pub fn all_portions(&self) -> Vec<pb::ClassBlock> {
        self.portions(&self.classes())
    }

    /// Merges blocks from a neighbour: a class the model lacks is copied, a
    /// class it holds becomes the example-weighted average of both. Blocks of
    /// the wrong width are ignored; returns how many were merged.
    pub fn merge(&mut self, blocks: &[pb::ClassBlock]) -> usize {
        let mut merged = 0;
        for block in blocks {
            let Ok(class) = u16::try_from(block.class) else {
                continue;
            };
            if block.weights.len() != (self.features + 1) * 4 {
                continue;
            }
            let theirs: Vec<f32> = block
                .weights
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            match self.blocks.get_mut(&class) {
                Some(mine) => {
                    let total = (mine.examples + block.examples).max(1);
                    #[allow(clippy::cast_precision_loss)] // a weight in [0, 1]
                    let share = block.examples as f32 / total as f32;
                    for (w, t) in mine.weights.iter_mut().zip(&theirs) {
                        *w += share * (t - *w);
                    }
                    mine.examples = total;
                }
                None => {
                    self.blocks.insert(
                        class,
                        ClassBlock {
                            weights: theirs,
                            examples: block.examples,
                        },
                    );
                }
            }
            merged += 1;
        }
        merged
    }

    /// Drops every block whose class is not in `keep`.
    pub fn retain(&mut self, keep: &BTreeSet<u16>) {
        self.blocks.retain(|c, _| keep.contains(c));
    }

    /// Example-weighted average of several models' blocks, class by class
    /// (the global baseline's averaging step).
    #[must_use]
    pub fn average(models: &[&OnlineLinear]) -> Option<OnlineLinear> {
        let first = models.first()?;
        let mut out = OnlineLinear::new(first.features, first.learning_rate, first.l2);
        let mut sums: BTreeMap<u16, (Vec<f64>, u64)> = BTreeMap::new();
        for model in models {
            for (&class, block) in &model.blocks {
                let entry = sums
                    .entry(class)
                    .or_insert_with(|| (vec![0.0; first.features + 1], 0));
                #[allow(clippy::cast_precision_loss)] // example counts fit f64
                let weight = block.examples.max(1) as f64;
                for (s, w) in entry.0.iter_mut().zip(&block.weights) {
                    *s += weight * f64::from(*w);
                }
                entry.1 += block.examples.max(1);
            }
        }
        for (class, (sum, examples)) in sums {
            #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)] // averaging
            let weights = sum.iter().map(|s| (s / examples as f64) as f32).collect();
            // Each site keeps counting its own examples after the average.
            let per_site = examples / models.len() as u64;
            out.blocks.insert(
                class,
                ClassBlock {
                    weights,
                    examples: per_site,
                },
            );
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use ndarray::array;

    use super::*;

    #[test]
    fn learns_two_separable_classes_and_moves_a_block() {
        let x = array![[1.0f32, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]];
        let y = [3u16, 7, 3, 7];
        let mut m = OnlineLinear::new(2, 0.5, 0.0);
        for _ in 0..50 {
            m.train(x.view(), &y);
        }
        assert!((m.accuracy(x.view(), &y) - 1.0).abs() < 1e-9);
        assert_eq!(m.classes(), [3, 7]);
        assert_eq!(m.bytes(), 2 * 3 * 4);
        let mut other = OnlineLinear::new(2, 0.5, 0.0);
        assert_eq!(other.merge(&m.portions(&[7])), 1);
        assert_eq!(other.classes(), [7]);
        other.retain(&BTreeSet::new());
        assert!(other.classes().is_empty());
    }
}
