//! The baselines Cartel is measured against, run in one process with the
//! bytes they would move counted from the same protobuf messages:
//!
//! - centralized: every site ships each raw batch ([`pb::RawBatch`], one
//!   byte per feature, as pixels are stored) to one central place, which
//!   trains a single model on everything and ships it back to every site
//!   every `metadataIntervalBatches` batches;
//! - global: every site trains a copy of one global model on its own data,
//!   and every `metadataIntervalBatches` batches all copies are averaged
//!   (each site uploads its model and downloads the average).
//!
//! Isolated learning is the Cartel site process without a registry.

use std::time::Instant;

use geoml_dataplane::cartel::model::OnlineLinear;
use geoml_dataplane::cartel::pb;
use geoml_dataplane::cartel::scenario::Scenario;
use geoml_dataplane::cartel::site::{SiteEngine, SiteReport, wire_bytes};
use geoml_dataplane::cartel::{CollaborativeMode, SiteConfig};

fn raw_batch(site: &str, x: &ndarray::Array2<f32>, labels: &[u16]) -> pb::RawBatch {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // quantised to a byte
    let values = x
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    pb::RawBatch {
        site: site.to_owned(),
        features: u32::try_from(x.ncols()).unwrap_or(u32::MAX),
        values,
        labels: labels
            .iter()
            .map(|&l| u8::try_from(l).unwrap_or(u8::MAX))
            .collect(),
        quantized: true,
    }
}

fn model_message(site: &str, model: &OnlineLinear) -> pb::ModelMessage {
    pb::ModelMessage {
        site: site.to_owned(),
        features: u32::try_from(model.features()).unwrap_or(u32::MAX),
        blocks: model.all_portions(),
    }
}

/// The centralized baseline: every site's reports, and the central place's
/// training seconds.
#[must_use]
pub fn centralized(scenario: &Scenario, config: SiteConfig) -> (Vec<SiteReport>, f64) {
    let mut engines: Vec<SiteEngine<'_>> = (0..scenario.sites.len())
        .map(|i| SiteEngine::new(scenario, i, config, CollaborativeMode::Centralized))
        .collect();
    let mut central = OnlineLinear::new(
        scenario.train.features.ncols(),
        config.learning_rate,
        config.l2,
    );
    let mut shipped: Vec<OnlineLinear> = vec![central.clone(); engines.len()];
    let mut training = 0.0;
    let batches = engines.iter().map(SiteEngine::batches).max().unwrap_or(0);
    for b in 0..batches {
        for (i, engine) in engines.iter_mut().enumerate() {
            if b >= engine.batches() {
                continue;
            }
            let observed = engine.observe(b);
            let message = raw_batch(engine.name(), &observed.x, &observed.labels);
            engine.report.count("raw_batch", wire_bytes(&message));
            let started = Instant::now();
            central.train(observed.x.view(), &observed.labels);
            training += started.elapsed().as_secs_f64();
            if (b + 1) % config.metadata_interval == 0 || b == 0 {
                let message = model_message("central", &central);
                engine.report.count("model", wire_bytes(&message));
                shipped[i] = central.clone();
            }
        }
        for (i, engine) in engines.iter_mut().enumerate() {
            if b < engine.batches() {
                let phase = scenario.sites[i].phase_of_batch[b];
                engine.record(phase, &shipped[i]);
            }
        }
    }
    for engine in &mut engines {
        // The sites' own detectors watched no model of theirs.
        engine.report.detections.clear();
        engine.report.training_seconds = training;
        engine.report.model_bytes_final = central.bytes();
    }
    (engines.into_iter().map(|e| e.report).collect(), training)
}

/// The global-model baseline: every site's report.
#[must_use]
pub fn global(scenario: &Scenario, config: SiteConfig) -> Vec<SiteReport> {
    let mut engines: Vec<SiteEngine<'_>> = (0..scenario.sites.len())
        .map(|i| SiteEngine::new(scenario, i, config, CollaborativeMode::Global))
        .collect();
    let batches = engines.iter().map(SiteEngine::batches).max().unwrap_or(0);
    for b in 0..batches {
        for engine in &mut engines {
            if b < engine.batches() {
                let observed = engine.observe(b);
                engine.train(b, &observed);
            }
        }
        if (b + 1) % config.metadata_interval == 0 {
            let models: Vec<OnlineLinear> = engines
                .iter()
                .map(|e| {
                    e.model
                        .lock()
                        .map_or_else(|p| p.into_inner().clone(), |m| m.clone())
                })
                .collect();
            let refs: Vec<&OnlineLinear> = models.iter().collect();
            if let Some(average) = OnlineLinear::average(&refs) {
                let down = wire_bytes(&model_message("global", &average));
                for (engine, model) in engines.iter_mut().zip(&models) {
                    let up = wire_bytes(&model_message(engine.name(), model));
                    engine.report.count("model", up + down);
                    if let Ok(mut m) = engine.model.lock() {
                        *m = average.clone();
                    }
                }
            }
        }
    }
    engines.into_iter().map(|e| e.report).collect()
}
