//! Update rules a parameter server applies to its rows: SGD, momentum, Adam.

use geoml_crds::training_job::Optimizer;

use geoml_proto::rows::{pack_keys, pack_values, unpack_values};

const MOMENTUM: f32 = 0.9;
const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPSILON: f32 = 1e-8;

/// Optimiser state for every float of a shard.
#[derive(Clone, Debug, PartialEq)]
pub enum OptimizerState {
    /// Plain SGD keeps no state.
    Sgd,
    /// Heavy-ball momentum: one velocity per float.
    Momentum {
        /// Velocity of every float.
        velocity: Vec<f32>,
    },
    /// Adam: moment estimates per float and a step count per row.
    Adam {
        /// First moments.
        m: Vec<f32>,
        /// Second moments.
        v: Vec<f32>,
        /// Updates applied to every row.
        steps: Vec<u32>,
    },
}

impl OptimizerState {
    /// Fresh state for `floats` parameters in `rows` rows.
    #[must_use]
    pub fn new(kind: Optimizer, floats: usize, rows: usize) -> Self {
        match kind {
            Optimizer::Sgd => Self::Sgd,
            Optimizer::Momentum => Self::Momentum {
                velocity: vec![0.0; floats],
            },
            Optimizer::Adam => Self::Adam {
                m: vec![0.0; floats],
                v: vec![0.0; floats],
                steps: vec![0; rows],
            },
        }
    }

    /// Applies `gradient` to `params`, the floats `start..` of local row `row`.
    pub fn step(
        &mut self,
        learning_rate: f32,
        row: usize,
        start: usize,
        params: &mut [f32],
        gradient: &[f32],
    ) {
        match self {
            Self::Sgd => {
                for (p, g) in params.iter_mut().zip(gradient) {
                    *p -= learning_rate * g;
                }
            }
            Self::Momentum { velocity } => {
                let velocity = &mut velocity[start..start + params.len()];
                for ((p, v), g) in params.iter_mut().zip(velocity).zip(gradient) {
                    *v = MOMENTUM * *v + g;
                    *p -= learning_rate * *v;
                }
            }
            Self::Adam { m, v, steps } => {
                steps[row] += 1;
                #[allow(clippy::cast_possible_wrap)] // steps stay far below i32::MAX
                let t = steps[row].min(i32::MAX as u32) as i32;
                let correct1 = 1.0 - BETA1.powi(t);
                let correct2 = 1.0 - BETA2.powi(t);
                let end = start + params.len();
                for (((p, m), v), g) in params
                    .iter_mut()
                    .zip(&mut m[start..end])
                    .zip(&mut v[start..end])
                    .zip(gradient)
                {
                    *m = BETA1 * *m + (1.0 - BETA1) * g;
                    *v = BETA2 * *v + (1.0 - BETA2) * g * g;
                    *p -= learning_rate * (*m / correct1) / ((*v / correct2).sqrt() + EPSILON);
                }
            }
        }
    }

    /// The state as bytes, for checkpoints.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Self::Sgd => Vec::new(),
            Self::Momentum { velocity } => pack_values(velocity),
            Self::Adam { m, v, steps } => {
                let mut out = pack_values(m);
                out.extend(pack_values(v));
                out.extend(pack_keys(steps));
                out
            }
        }
    }

    /// Restores state written by [`Self::to_bytes`] for the same shape;
    /// `None` when the bytes do not fit it.
    #[must_use]
    pub fn from_bytes(kind: Optimizer, floats: usize, rows: usize, bytes: &[u8]) -> Option<Self> {
        let state = match kind {
            Optimizer::Sgd => bytes.is_empty().then_some(Self::Sgd)?,
            Optimizer::Momentum => Self::Momentum {
                velocity: unpack_values(bytes).ok().filter(|v| v.len() == floats)?,
            },
            Optimizer::Adam => {
                if bytes.len() != 8 * floats + 4 * rows {
                    return None;
                }
                let (m, rest) = bytes.split_at(4 * floats);
                let (v, steps) = rest.split_at(4 * floats);
                Self::Adam {
                    m: unpack_values(m).ok()?,
                    v: unpack_values(v).ok()?,
                    // Step counts are not sorted keys; read them as raw words.
                    steps: steps
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                }
            }
        };
        Some(state)
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // the values compared are exact
mod tests {
    use super::*;

    #[test]
    fn sgd_and_momentum_follow_their_formulas() {
        let mut p = [1.0_f32, 2.0];
        OptimizerState::new(Optimizer::Sgd, 2, 1).step(0.5, 0, 0, &mut p, &[1.0, -2.0]);
        assert_eq!(p, [0.5, 3.0]);

        let mut state = OptimizerState::new(Optimizer::Momentum, 2, 1);
        let mut p = [0.0_f32, 0.0];
        state.step(1.0, 0, 0, &mut p, &[1.0, 1.0]);
        state.step(1.0, 0, 0, &mut p, &[1.0, 1.0]);
        // v1 = 1, v2 = 0.9 + 1 = 1.9; p = -(1 + 1.9)
        assert!((p[0] + 2.9).abs() < 1e-6);
    }

    #[test]
    fn adam_first_step_moves_by_the_learning_rate() {
        let mut state = OptimizerState::new(Optimizer::Adam, 2, 1);
        let mut p = [0.0_f32, 0.0];
        state.step(0.01, 0, 0, &mut p, &[3.0, -0.5]);
        assert!(
            (p[0] + 0.01).abs() < 1e-5 && (p[1] - 0.01).abs() < 1e-5,
            "{p:?}"
        );
    }

    #[test]
    fn state_round_trips_through_bytes() {
        for kind in [Optimizer::Sgd, Optimizer::Momentum, Optimizer::Adam] {
            let mut state = OptimizerState::new(kind, 3, 2);
            let mut p = [0.0_f32; 3];
            state.step(0.1, 1, 0, &mut p, &[1.0, 2.0, 3.0]);
            let restored = OptimizerState::from_bytes(kind, 3, 2, &state.to_bytes());
            assert_eq!(restored, Some(state));
        }
        assert_eq!(
            OptimizerState::from_bytes(Optimizer::Adam, 3, 2, &[0; 5]),
            None
        );
    }
}
