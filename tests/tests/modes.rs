//! The operator's topology files fit the runtime's placement in every
//! inter-datacenter mode: for each datacenter of a 3-datacenter job, the
//! topology `geoml-operator` writes and the manifest it mounts are what
//! `geoml ps` and `geoml worker` accept, and the shard and worker counts
//! both sides derive agree.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeSet;

use geoml_crds::manifest::Manifest;
use geoml_crds::sync_policy::InterDatacenterModel;
use geoml_dataplane::placement::RolePlace;
use geoml_operator::job::build::{Endpoints, JobView};

/// Every inter-datacenter model. The match below stops compiling when a
/// model is added, so that it gets added here too.
const MODELS: [InterDatacenterModel; 9] = [
    InterDatacenterModel::Asp,
    InterDatacenterModel::Bsp,
    InterDatacenterModel::Ssp,
    InterDatacenterModel::FedAvg,
    InterDatacenterModel::DiLoCo,
    InterDatacenterModel::Centralized,
    InterDatacenterModel::Isolated,
    InterDatacenterModel::Collaborative,
    InterDatacenterModel::Lan,
];

/// Whether shard i of every datacenter mirrors shard i of the others.
fn mirrored(model: InterDatacenterModel) -> bool {
    match model {
        InterDatacenterModel::Asp | InterDatacenterModel::FedAvg | InterDatacenterModel::DiLoCo => {
            true
        }
        InterDatacenterModel::Bsp
        | InterDatacenterModel::Ssp
        | InterDatacenterModel::Centralized
        | InterDatacenterModel::Isolated
        | InterDatacenterModel::Collaborative
        | InterDatacenterModel::Lan => false,
    }
}

/// `gaia-3dc.yaml` with the policy's model replaced by `model`, as the
/// operator sees it. Shards per datacenter are uneven where the mode allows
/// it (mirrored modes need the same count everywhere), and so are workers.
fn view(model: InterDatacenterModel) -> JobView {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/examples/gaia-3dc.yaml"
    );
    let mut manifest = Manifest::load(path.as_ref()).unwrap();
    let policy = &mut manifest.sync_policies[0].spec.inter_datacenter;
    policy.model = model;
    if model == InterDatacenterModel::Ssp {
        policy.staleness = Some(2);
    }
    let shards = if mirrored(model) {
        [2, 2, 2]
    } else {
        [2, 1, 3]
    };
    for (d, dc) in manifest.training_jobs[0]
        .spec
        .datacenters
        .iter_mut()
        .enumerate()
    {
        dc.parameter_servers = shards[d];
        dc.workers = [3, 1, 2][d];
    }
    let mut view = JobView::from_manifest(&manifest, "ml", "geoml:test").unwrap();
    view.job.metadata.uid = Some("uid-1".into());
    view
}

/// Every datacenter's shards at made-up addresses, as Services would give.
fn endpoints(view: &JobView) -> Endpoints {
    let urls = |kind: &str| -> Vec<Vec<String>> {
        view.placements
            .iter()
            .map(|p| {
                (0..p.spec.parameter_servers)
                    .map(|i| format!("http://{}-{kind}-{i}:7070", p.name()))
                    .collect()
            })
            .collect()
    };
    Endpoints {
        local: urls("local"),
        peer: urls("peer"),
        registry: Some((
            "http://registry.ml.svc:7071".into(),
            "http://registry-gw:30071".into(),
        )),
        sites: Vec::new(),
    }
}

#[test]
fn every_mode_places_every_shard_and_worker_of_the_operators_topologies() {
    for model in MODELS {
        // Collaborative jobs run `geoml site` pods, no parameter servers.
        if model == InterDatacenterModel::Collaborative {
            continue;
        }
        let view = view(model);
        let endpoints = endpoints(&view);
        // The manifest exactly as the operator mounts it.
        let manifest = Manifest::from_yaml(&view.manifest_yaml().unwrap()).unwrap();
        let job = manifest.job().unwrap();
        let counts: Vec<(usize, usize)> = view
            .placements
            .iter()
            .map(|p| {
                (
                    usize::try_from(p.spec.parameter_servers).unwrap(),
                    usize::try_from(p.spec.workers).unwrap(),
                )
            })
            .collect();
        let total_shards: usize = counts.iter().map(|c| c.0).sum();
        let total_workers: usize = counts.iter().map(|c| c.1).sum();
        let global = model.is_global();
        let (mut shard_indexes, mut partitions) = (BTreeSet::new(), BTreeSet::new());
        for (dc, &(own_shards, own_workers)) in counts.iter().enumerate() {
            let topology = view.topology(dc, &endpoints);
            let place = RolePlace::new(&job, &topology)
                .unwrap_or_else(|e| panic!("{model:?}, datacenter {dc}: {e}"));
            let what = format!("{model:?}, datacenter {}", topology.datacenter);
            assert_eq!(place.datacenter, topology.datacenter, "{what}");
            assert_eq!(place.global, global, "{what}");
            assert_eq!(
                place.shards as usize,
                topology.parameter_servers.len(),
                "{what}"
            );
            assert_eq!(
                place.shards as usize,
                if global { total_shards } else { own_shards },
                "{what}"
            );
            assert_eq!(place.own_shards as usize, own_shards, "{what}");
            assert_eq!(
                place.workers,
                if global { total_workers } else { own_workers },
                "{what}"
            );
            assert_eq!(place.total_workers, total_workers, "{what}");
            assert_eq!(place.exchange.is_some(), mirrored(model), "{what}: mirrors");
            for shard in 0..place.own_shards {
                let index = place.shard(shard).unwrap();
                assert!(index < place.shards, "{what}: shard {shard} is {index}");
                // The shard a pod serves is the one its datacenter's
                // workers find at that index of the topology.
                assert!(
                    topology.parameter_servers[index as usize].contains("-local-"),
                    "{what}: shard {shard} at {}",
                    topology.parameter_servers[index as usize]
                );
                shard_indexes.insert((if global { 0 } else { dc }, index));
                let mirrors = place.mirrors(&topology, shard).unwrap();
                if mirrored(model) {
                    assert_eq!(mirrors.len(), counts.len() - 1, "{what}: mirrors");
                    assert!(
                        mirrors.iter().all(|m| m.contains("-peer-")
                            && m.ends_with(&format!("-{shard}:7070"))),
                        "{what}: shard {shard} mirrors {mirrors:?}"
                    );
                } else {
                    assert!(mirrors.is_empty(), "{what}: {mirrors:?}");
                }
            }
            assert!(place.shard(place.own_shards).is_err(), "{what}");
            for index in 0..u32::try_from(own_workers).unwrap() {
                let (local, partition) = place.worker(index).unwrap();
                assert!((local as usize) < place.workers, "{what}: worker {index}");
                assert!(place.local_workers().contains(&local), "{what}");
                assert!(
                    partitions.insert(partition),
                    "{what}: partition {partition} twice"
                );
            }
            assert!(
                place.worker(u32::try_from(own_workers).unwrap()).is_err(),
                "{what}"
            );
        }
        // Every shard is served once, every data partition trained once.
        let expected_shards = if global {
            total_shards
        } else {
            counts.iter().map(|c| c.0).sum()
        };
        assert_eq!(shard_indexes.len(), expected_shards, "{model:?}");
        assert_eq!(
            partitions,
            (0..total_workers).collect::<BTreeSet<_>>(),
            "{model:?}"
        );
    }
}
