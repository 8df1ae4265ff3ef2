//! A Cartel site: its small model, drift detector and metadata, the loop
//! that trains on its stream, and — in the Collaborative mode — publishing
//! to the registry and borrowing model portions from logical neighbours on
//! drift. `geoml site` runs one as a process; the model exchange it serves
//! hands out per-class weight blocks, never examples. Once its stream has
//! ended a site tells the registry it finished and keeps serving its
//! exchange until the registry says every site of the job has (see
//! [`FinishWait`]), then exits.
//!
//! The learning loop ([`SiteEngine`]) is here; what a site does over the
//! network — the exchange it serves, the registry it talks to, borrowing
//! and waiting for the others — is in `site/network.rs`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use ndarray::Array2;
use prost::Message;
use serde::{Deserialize, Serialize};

use super::divergence::{Summary, normalise, total_variation};
use super::drift::{Adwin, DriftDetector, WindowLimit};
use super::model::OnlineLinear;
use super::pb::SiteMetadata;
use super::scenario::Scenario;
use super::{CollaborativeMode, SiteConfig};

mod network;

pub use network::{Exchange, FinishWait, Links, everyone_finished, run_site};

/// Bytes a message takes on the wire at the application level: its
/// protobuf encoding plus gRPC's 5-byte length prefix (HTTP/2 and TCP
/// headers are not counted).
#[must_use]
pub fn wire_bytes(message: &impl Message) -> u64 {
    message.encoded_len() as u64 + 5
}

/// One borrowing of model portions.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Transfer {
    /// Batch at which the site borrowed.
    pub batch: usize,
    /// The neighbour lent by.
    pub from: String,
    /// Its Jensen–Shannon divergence to the site.
    pub divergence: f64,
    /// Classes received.
    pub classes: Vec<u16>,
    /// Bytes of the request and the reply.
    pub bytes: u64,
}

/// What one site did, written as JSON at its end.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SiteReport {
    /// The site.
    pub site: String,
    /// `cartel`, `isolated`, `centralized` or `global`.
    pub mode: String,
    /// Held-out accuracy on the site's current distribution after each batch.
    pub accuracy: Vec<f64>,
    /// Error on each batch before training on it (prequential).
    pub errors: Vec<f64>,
    /// Seconds since the site started, after each batch.
    pub seconds: Vec<f64>,
    /// Batches at which the drift detector fired.
    pub detections: Vec<usize>,
    /// Batches at which the distribution changed (from the scenario).
    pub drifts: Vec<usize>,
    /// Every borrowing of model portions.
    pub transfers: Vec<Transfer>,
    /// Bytes the site moved to or from other sites and the registry, by message type.
    pub bytes_by_type: BTreeMap<String, u64>,
    /// Model bytes at the end.
    pub model_bytes_final: u64,
    /// Largest model bytes during the run.
    pub model_bytes_peak: u64,
    /// Seconds spent training (not evaluating or talking).
    pub training_seconds: f64,
}

impl SiteReport {
    /// Adds `bytes` under message type `kind`.
    pub fn count(&mut self, kind: &str, bytes: u64) {
        *self.bytes_by_type.entry(kind.to_owned()).or_default() += bytes;
    }
}

/// A site's model, learning loop and summaries, without any networking.
pub struct SiteEngine<'a> {
    scenario: &'a Scenario,
    index: usize,
    config: SiteConfig,
    /// The model, shared with the model exchange.
    pub model: Arc<Mutex<OnlineLinear>>,
    detector: Box<dyn DriftDetector>,
    /// (labels, feature histogram, error) of recent batches, newest last.
    recent: VecDeque<(Vec<u16>, Vec<f64>, f64)>,
    tests: Vec<(Array2<f32>, Vec<u16>)>,
    published: Option<Vec<f64>>,
    since_publish: usize,
    /// What the site did so far.
    pub report: SiteReport,
    started: Instant,
}

/// The outcome of looking at a batch before training on it.
pub struct Observed {
    /// The batch's features.
    pub x: Array2<f32>,
    /// Its labels.
    pub labels: Vec<u16>,
    /// The drift detector fired.
    pub drift: bool,
}

impl<'a> SiteEngine<'a> {
    /// Site `index` of `scenario`.
    #[must_use]
    pub fn new(
        scenario: &'a Scenario,
        index: usize,
        config: SiteConfig,
        mode: CollaborativeMode,
    ) -> Self {
        let plan = &scenario.sites[index];
        let detector: Box<dyn DriftDetector> = if config.adwin {
            Box::new(Adwin::new(0.002, 200))
        } else {
            Box::new(WindowLimit::new(config.window, config.limit))
        };
        Self {
            scenario,
            index,
            model: Arc::new(Mutex::new(OnlineLinear::new(
                scenario.train.features.ncols(),
                config.learning_rate,
                config.l2,
            ))),
            detector,
            recent: VecDeque::new(),
            tests: plan
                .phase_tests
                .iter()
                .map(|rows| scenario.test_rows(rows))
                .collect(),
            published: None,
            since_publish: 0,
            report: SiteReport {
                site: plan.name.clone(),
                mode: mode.name().to_owned(),
                drifts: plan.drifts.clone(),
                ..SiteReport::default()
            },
            config,
            started: Instant::now(),
        }
    }

    /// Batches in the site's stream.
    #[must_use]
    pub fn batches(&self) -> usize {
        self.scenario.sites[self.index].batches.len()
    }

    /// The site's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.scenario.sites[self.index].name
    }

    fn model(&self) -> std::sync::MutexGuard<'_, OnlineLinear> {
        self.model.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Predicts batch `b` before training on it and feeds the error to the
    /// drift detector.
    pub fn observe(&mut self, b: usize) -> Observed {
        let (x, labels) = self
            .scenario
            .train_rows(&self.scenario.sites[self.index].batches[b]);
        let error = 1.0 - self.model().accuracy(x.view(), &labels);
        // A new model errs on everything: the detector starts once the site
        // has trained for a metadata interval and a full window.
        let warm_up = self.config.window + self.config.metadata_interval;
        let drift = b >= warm_up && self.detector.observe(error);
        if drift {
            self.report.detections.push(b);
        }
        self.report.errors.push(error);
        let histogram = self.scenario.histogram(x.view());
        self.recent.push_back((labels.clone(), histogram, error));
        let keep = self.config.window.max(self.config.metadata_interval);
        while self.recent.len() > keep {
            self.recent.pop_front();
        }
        self.since_publish += 1;
        Observed { x, labels, drift }
    }

    /// Trains on an observed batch, then evaluates on the current held-out set.
    pub fn train(&mut self, b: usize, observed: &Observed) {
        let started = Instant::now();
        self.model().train(observed.x.view(), &observed.labels);
        self.report.training_seconds += started.elapsed().as_secs_f64();
        let phase = self.scenario.sites[self.index].phase_of_batch[b];
        let model = self
            .model
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        self.record(phase, &model);
    }

    /// Evaluates `model` (the site's own, or one shipped to it) on the
    /// held-out set of `phase` and records it.
    pub fn record(&mut self, phase: usize, model: &OnlineLinear) {
        let accuracy = self
            .tests
            .get(phase)
            .map_or(0.0, |(x, y)| model.accuracy(x.view(), y));
        self.report.accuracy.push(accuracy);
        self.report
            .seconds
            .push(self.started.elapsed().as_secs_f64());
        let bytes = model.bytes();
        self.report.model_bytes_final = bytes;
        self.report.model_bytes_peak = self.report.model_bytes_peak.max(bytes);
    }

    fn summary_of<'b>(
        &self,
        batches: impl Iterator<Item = &'b (Vec<u16>, Vec<f64>, f64)>,
    ) -> Summary {
        let mut priors = vec![0.0; self.scenario.train.classes];
        let mut histogram = vec![0.0; self.scenario.histogram_columns.len()];
        for (labels, h, _) in batches {
            for &l in labels {
                if let Some(p) = priors.get_mut(usize::from(l)) {
                    *p += 1.0;
                }
            }
            for (a, b) in histogram.iter_mut().zip(h) {
                *a += b;
            }
        }
        Summary {
            class_priors: normalise(&priors),
            feature_histogram: if histogram.is_empty() {
                histogram
            } else {
                normalise(&histogram)
            },
        }
    }

    /// Summaries over the last `metadataIntervalBatches` batches.
    #[must_use]
    pub fn recent_summary(&self) -> Summary {
        let skip = self
            .recent
            .len()
            .saturating_sub(self.config.metadata_interval);
        self.summary_of(self.recent.iter().skip(skip))
    }

    /// Summaries and classes of the batches that show the drift: the
    /// trailing batches whose error is above the limit (at least the last).
    #[must_use]
    pub fn drift_summary(&self) -> (Summary, BTreeSet<u16>) {
        let trailing = self
            .recent
            .iter()
            .rev()
            .take(self.config.window)
            .take_while(|(_, _, e)| *e > self.config.limit)
            .count()
            .max(1);
        let from = self.recent.len().saturating_sub(trailing);
        let classes = self
            .recent
            .iter()
            .skip(from)
            .flat_map(|(l, _, _)| l.iter().copied())
            .collect();
        (self.summary_of(self.recent.iter().skip(from)), classes)
    }

    /// True when the metadata is due: every `m` batches, or when the priors
    /// moved by more than the change threshold since last published.
    #[must_use]
    pub fn metadata_due(&self) -> bool {
        match &self.published {
            None => true,
            Some(published) => {
                self.since_publish >= self.config.metadata_interval
                    || total_variation(published, &self.recent_summary().class_priors)
                        > self.config.metadata_change
            }
        }
    }

    /// The metadata to publish now; marks it published.
    pub fn metadata(&mut self, address: &str) -> SiteMetadata {
        // Before its first batch a site has no summary to offer.
        let summary = if self.recent.is_empty() {
            Summary::default()
        } else {
            self.recent_summary()
        };
        self.published = Some(summary.class_priors.clone());
        self.since_publish = 0;
        let model = self.model();
        #[allow(clippy::cast_possible_truncation)] // probabilities as f32
        let floats = |v: &[f64]| v.iter().map(|p| *p as f32).collect();
        SiteMetadata {
            site: self.name().to_owned(),
            address: address.to_owned(),
            class_priors: floats(&summary.class_priors),
            feature_histogram: floats(&summary.feature_histogram),
            model_kind: "OnlineLinear".to_owned(),
            model_bytes: model.bytes(),
            drifting: self.detector.mean() > self.config.limit,
            batches: self.report.errors.len() as u64,
            classes: model.classes().into_iter().map(u32::from).collect(),
            forwarded: false,
            finished: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(finished: &[bool]) -> Vec<SiteMetadata> {
        finished
            .iter()
            .enumerate()
            .map(|(i, &finished)| SiteMetadata {
                site: format!("site-{i}"),
                finished,
                ..SiteMetadata::default()
            })
            .collect()
    }

    #[test]
    fn everyone_finished_counts_the_jobs_sites_not_only_the_ones_listed() {
        // Told the job has three sites, two finished of two listed is not all.
        assert!(!everyone_finished(&listed(&[true, true]), 3));
        assert!(!everyone_finished(&listed(&[true, false, true]), 3));
        assert!(everyone_finished(&listed(&[true, true, true]), 3));
        // Without a job size, every listed site must have finished.
        assert!(!everyone_finished(&listed(&[true, false]), 0));
        assert!(everyone_finished(&listed(&[true, true]), 0));
        assert!(!everyone_finished(&[], 0));
    }
}
