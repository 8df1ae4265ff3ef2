//! The mode vocabulary: the names `geoml compare`, `geoml cartel-bench` and
//! every report use for how datacenters train together, one enum each,
//! named once (clap's `ValueEnum` spells them on the command line).
//!
//! Which modes are *global* is [`InterDatacenterModel::is_global`]; a
//! [`Mode`] only maps a name to a SyncPolicy's model and back.

use clap::ValueEnum;
use serde::Serialize;

use crate::manifest::ResolvedJob;
use crate::sync_policy::InterDatacenterModel;
use crate::training_job::ModelKind;

/// A mode of `geoml run` / `geoml compare`: a SyncPolicy inter-datacenter
/// model under the name reports print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Mode {
    /// `LAN`: all datacenters as one local network.
    Lan,
    /// `BSP` over the emulated WAN.
    BspWan,
    /// `SSP` over the emulated WAN.
    SspWan,
    /// `ASP`: Gaia's approximate synchronous parallel.
    Gaia,
    /// `FedAvg`: federated averaging.
    Fedavg,
    /// `DiLoCo`: averaging rounds with an outer Nesterov-momentum step.
    Diloco,
    /// `Centralized`: every datacenter's data shipped to the first.
    Centralized,
    /// `Isolated`: every datacenter trains alone.
    Isolated,
    /// `Collaborative`: Cartel.
    Cartel,
}

impl Mode {
    /// The modes `geoml compare` runs by default, in its order (every mode
    /// with parameter servers).
    pub const COMPARED: [Mode; 8] = [
        Mode::Lan,
        Mode::BspWan,
        Mode::SspWan,
        Mode::Gaia,
        Mode::Fedavg,
        Mode::Diloco,
        Mode::Centralized,
        Mode::Isolated,
    ];

    /// The name reports and `--modes` use (`lan`, `bsp-wan`, `gaia`, ...).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Mode::Lan => "lan",
            Mode::BspWan => "bsp-wan",
            Mode::SspWan => "ssp-wan",
            Mode::Gaia => "gaia",
            Mode::Fedavg => "fedavg",
            Mode::Diloco => "diloco",
            Mode::Centralized => "centralized",
            Mode::Isolated => "isolated",
            Mode::Cartel => "cartel",
        }
    }

    /// The SyncPolicy model the mode runs.
    #[must_use]
    pub fn model(self) -> InterDatacenterModel {
        match self {
            Mode::Lan => InterDatacenterModel::Lan,
            Mode::BspWan => InterDatacenterModel::Bsp,
            Mode::SspWan => InterDatacenterModel::Ssp,
            Mode::Gaia => InterDatacenterModel::Asp,
            Mode::Fedavg => InterDatacenterModel::FedAvg,
            Mode::Diloco => InterDatacenterModel::DiLoCo,
            Mode::Centralized => InterDatacenterModel::Centralized,
            Mode::Isolated => InterDatacenterModel::Isolated,
            Mode::Cartel => InterDatacenterModel::Collaborative,
        }
    }
}

impl From<InterDatacenterModel> for Mode {
    fn from(model: InterDatacenterModel) -> Self {
        match model {
            InterDatacenterModel::Lan => Mode::Lan,
            InterDatacenterModel::Bsp => Mode::BspWan,
            InterDatacenterModel::Ssp => Mode::SspWan,
            InterDatacenterModel::Asp => Mode::Gaia,
            InterDatacenterModel::FedAvg => Mode::Fedavg,
            InterDatacenterModel::DiLoCo => Mode::Diloco,
            InterDatacenterModel::Centralized => Mode::Centralized,
            InterDatacenterModel::Isolated => Mode::Isolated,
            InterDatacenterModel::Collaborative => Mode::Cartel,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the sites of a Collaborative job learn (`geoml site --mode`,
/// `geoml cartel-bench --modes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ValueEnum)]
pub enum CollaborativeMode {
    /// Cartel: per-site models that borrow from logical neighbours on drift.
    Cartel,
    /// Every site learns alone.
    Isolated,
    /// Every site ships its raw data to one place, which trains one model and ships it back.
    Centralized,
    /// One global model: every site trains a copy and all copies are
    /// averaged every `metadataIntervalBatches` batches.
    Global,
}

impl CollaborativeMode {
    /// The name reports use.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            CollaborativeMode::Cartel => "cartel",
            CollaborativeMode::Isolated => "isolated",
            CollaborativeMode::Centralized => "centralized",
            CollaborativeMode::Global => "global",
        }
    }

    /// The mode a job runs in, if it is collaborative: every Collaborative
    /// job (as `cartel`), and jobs of the small per-site models
    /// (`OnlineLinear`, `OnlineForest`) with the baselines' inter-datacenter
    /// models — `Isolated`, `Centralized`, and `FedAvg` as `global` — which is
    /// how `geoml compare --modes cartel,isolated,centralized` runs a
    /// Collaborative job's baselines.
    #[must_use]
    pub fn of_job(job: &ResolvedJob<'_>) -> Option<CollaborativeMode> {
        let small = matches!(
            job.job.spec.model.kind,
            ModelKind::OnlineLinear | ModelKind::OnlineForest
        );
        match job.sync_policy.spec.inter_datacenter.model {
            InterDatacenterModel::Collaborative => Some(CollaborativeMode::Cartel),
            InterDatacenterModel::Isolated if small => Some(CollaborativeMode::Isolated),
            InterDatacenterModel::Centralized if small => Some(CollaborativeMode::Centralized),
            InterDatacenterModel::FedAvg if small => Some(CollaborativeMode::Global),
            _ => None,
        }
    }

    /// The mode called `name` (`cartel`, `isolated`, `centralized`, `global`).
    #[must_use]
    pub fn from_name(name: &str) -> Option<CollaborativeMode> {
        CollaborativeMode::value_variants()
            .iter()
            .copied()
            .find(|m| m.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_clap() {
        for &mode in Mode::value_variants() {
            assert_eq!(Mode::from(mode.model()), mode);
            let clap_name = mode.to_possible_value().map(|v| v.get_name().to_owned());
            assert_eq!(clap_name.as_deref(), Some(mode.name()));
        }
        for &mode in CollaborativeMode::value_variants() {
            assert_eq!(CollaborativeMode::from_name(mode.name()), Some(mode));
            let clap_name = mode.to_possible_value().map(|v| v.get_name().to_owned());
            assert_eq!(clap_name.as_deref(), Some(mode.name()));
        }
    }
}
