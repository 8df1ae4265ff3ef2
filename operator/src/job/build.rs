//! Desired objects of one TrainingJob in one datacenter, computed without a cluster.
//!
//! Per datacenter: a headless Service (stable DNS names of the pods), one
//! Service per parameter-server shard (its cluster IP is how the
//! datacenter's workers reach it, so pods need no cluster DNS; with several
//! datacenters it is of the type `peerAccess` names, and how the other
//! datacenters reach it), a ConfigMap with `manifest.yaml` and
//! `topology.yaml`, and the parameter-server and worker pods; in the
//! Collaborative (Cartel) mode instead one site pod and its Service per
//! datacenter, and the registry pod and Service in the job's first one.
//! Every pod has `restartPolicy: Never` and exits 0 when training is done.

use std::collections::BTreeMap;

use geoml_crds::datacenter::{PeerAccess, PeerServiceType};
use geoml_crds::sync_policy::InterDatacenterModel;
use geoml_crds::training_job::{DatacenterPlacement, DatasetName};
use geoml_crds::{Datacenter, SyncPolicy, Topology, TrainingJob};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, Service, ServicePort, ServiceSpec,
    TCPSocketAction, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

/// Port of a parameter server's gRPC service (workers and mirrors).
pub const PS_PORT: i32 = 7070;
/// Port of every role's Prometheus metrics.
pub const METRICS_PORT: i32 = 9090;
/// Port of the Cartel registry.
pub const REGISTRY_PORT: i32 = 7071;
/// Port of a Cartel site's model exchange.
pub const SITE_PORT: i32 = 7072;
/// Where the topology ConfigMap is mounted.
const CONFIG_DIR: &str = "/etc/geoml";
/// Where parameter servers write checkpoints.
const CHECKPOINT_DIR: &str = "/var/lib/geoml/checkpoints";
/// Where a parameter server leaves its final progress for the operator
/// (Kubernetes' default `terminationMessagePath`).
const TERMINATION_LOG: &str = "/dev/termination-log";
/// Where the data set's claim is mounted, read-only.
const DATA_DIR: &str = "/var/lib/geoml/data";
/// The user geoml's image runs as (distroless's `nonroot`).
const NONROOT_UID: i64 = 65_532;
/// Where the registry keeps its state.
const REGISTRY_STATE_DIR: &str = "/var/lib/geoml/registry";

/// Label every object the operator creates carries, with value [`MANAGER`].
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The operator's name: value of [`MANAGED_BY`] and its server-side-apply field manager.
pub const MANAGER: &str = "geoml-operator";
/// Label: name of the TrainingJob an object belongs to.
pub const JOB_LABEL: &str = "geoml.io/job";
/// Label: namespace of the TrainingJob an object belongs to (objects in
/// remote clusters cannot carry an owner reference to it).
pub const JOB_NAMESPACE_LABEL: &str = "geoml.io/job-namespace";
/// Label: the Datacenter an object belongs to.
pub const DATACENTER_LABEL: &str = "geoml.io/datacenter";
/// Label: `ps`, `worker` or `registry`.
pub const ROLE_LABEL: &str = "geoml.io/role";
/// Label: shard or worker index within the datacenter.
pub const INDEX_LABEL: &str = "geoml.io/index";
/// Annotation: hash of a pod's spec; a pod whose hash differs from the
/// desired one is replaced (pod specs are immutable).
pub const SPEC_HASH_ANNOTATION: &str = "geoml.io/spec-hash";

/// A role of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A parameter-server shard.
    ParameterServer,
    /// A worker.
    Worker,
    /// A Cartel site (Collaborative mode): one per datacenter.
    Site,
    /// The Cartel registry (Collaborative mode): one, in the first datacenter.
    Registry,
}

impl Role {
    /// The `geoml` subcommand and label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ParameterServer => "ps",
            Self::Worker => "worker",
            Self::Site => "site",
            Self::Registry => "registry",
        }
    }
}

/// One datacenter of a job with everything needed to place objects there.
#[derive(Clone, Debug)]
pub struct Placement {
    /// The job's entry for this datacenter (replica counts, resources).
    pub spec: DatacenterPlacement,
    /// The Datacenter object.
    pub datacenter: Datacenter,
    /// Namespace the datacenter's objects go to, in its cluster.
    pub namespace: String,
    /// Node selector of the datacenter's pods.
    pub node_selector: BTreeMap<String, String>,
    /// True when the objects live next to the job (local cluster, same
    /// namespace), so that they can carry an owner reference to it.
    pub owned: bool,
}

impl Placement {
    /// Resolves where a job's objects for `datacenter` go.
    #[must_use]
    pub fn new(job: &TrainingJob, spec: DatacenterPlacement, datacenter: Datacenter) -> Self {
        let job_namespace = job.namespace().unwrap_or_default();
        let cluster = &datacenter.spec.cluster;
        let (namespace, node_selector, local) = match (&cluster.local, &cluster.remote) {
            (_, Some(remote)) => (
                remote.namespace.clone(),
                remote.node_selector.clone(),
                false,
            ),
            (Some(local), None) => (local.namespace.clone(), local.node_selector.clone(), true),
            (None, None) => (None, BTreeMap::new(), true),
        };
        let namespace = namespace.unwrap_or_else(|| job_namespace.clone());
        let owned = local && namespace == job_namespace;
        Self {
            spec,
            datacenter,
            namespace,
            node_selector,
            owned,
        }
    }

    /// Name of the datacenter.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// A job with its SyncPolicy and placements: the input of every builder.
#[derive(Clone, Debug)]
pub struct JobView {
    /// The job.
    pub job: TrainingJob,
    /// Its SyncPolicy.
    pub policy: SyncPolicy,
    /// Its datacenters, in `spec.datacenters` order.
    pub placements: Vec<Placement>,
    /// Image of the pods (the job's `spec.image` or the operator's default).
    pub image: String,
}

/// Names of the objects of one job in one datacenter.
pub mod names {
    /// The headless Service that gives the pods stable DNS names.
    #[must_use]
    pub fn headless_service(job: &str, dc: &str) -> String {
        format!("{job}-{dc}")
    }
    /// A pod: `<job>-<dc>-ps-<i>` or `<job>-<dc>-worker-<i>`.
    #[must_use]
    pub fn pod(job: &str, dc: &str, role: super::Role, index: i32) -> String {
        format!("{job}-{dc}-{}-{index}", role.as_str())
    }
    /// The Service that exposes shard `index` to other datacenters.
    #[must_use]
    pub fn peer_service(job: &str, dc: &str, index: i32) -> String {
        format!("{job}-{dc}-ps-{index}-peer")
    }
    /// The topology ConfigMap.
    #[must_use]
    pub fn config_map(job: &str, dc: &str) -> String {
        format!("{job}-{dc}-topology")
    }
    /// The registry pod and Service.
    #[must_use]
    pub fn registry(job: &str) -> String {
        format!("{job}-registry")
    }
    /// The Service through which the other sites reach a datacenter's site.
    #[must_use]
    pub fn site_service(job: &str, dc: &str) -> String {
        format!("{job}-{dc}-site")
    }
    /// The claim the operator creates for a datacenter's checkpoints.
    #[must_use]
    pub fn checkpoints(job: &str, dc: &str) -> String {
        format!("{job}-{dc}-checkpoints")
    }
}

impl JobView {
    fn job_name(&self) -> String {
        self.job.name_any()
    }

    /// True when the job runs Cartel's collaborative learning (with a registry).
    #[must_use]
    pub fn collaborative(&self) -> bool {
        self.policy.spec.inter_datacenter.model == InterDatacenterModel::Collaborative
    }

    /// Labels of every object of this job in datacenter `p`.
    #[must_use]
    pub fn labels(&self, p: &Placement) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY.to_owned(), MANAGER.to_owned()),
            (JOB_LABEL.to_owned(), self.job_name()),
            (
                JOB_NAMESPACE_LABEL.to_owned(),
                self.job.namespace().unwrap_or_default(),
            ),
            (DATACENTER_LABEL.to_owned(), p.name().to_owned()),
        ])
    }

    fn meta(&self, p: &Placement, name: String, extra: &[(&str, String)]) -> ObjectMeta {
        let mut labels = self.labels(p);
        for (k, v) in extra {
            labels.insert((*k).to_owned(), v.clone());
        }
        ObjectMeta {
            name: Some(name),
            namespace: Some(p.namespace.clone()),
            labels: Some(labels),
            owner_references: p.owned.then(|| self.owner_reference()).flatten(),
            ..ObjectMeta::default()
        }
    }

    fn owner_reference(&self) -> Option<Vec<OwnerReference>> {
        self.job.controller_owner_ref(&()).map(|r| vec![r])
    }

    /// The headless Service of datacenter `p`.
    #[must_use]
    pub fn headless_service(&self, p: &Placement) -> Service {
        let job = self.job_name();
        let name = names::headless_service(&job, p.name());
        Service {
            metadata: self.meta(p, name, &[]),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".to_owned()),
                publish_not_ready_addresses: Some(true),
                selector: Some(self.labels(p)),
                ports: Some(vec![port("grpc", PS_PORT), port("metrics", METRICS_PORT)]),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    /// The Service type through which other datacenters reach datacenter
    /// `p`: `peerAccess.serviceType`, or `ClusterIP` when the job has one
    /// datacenter and nothing comes from outside.
    fn service_type(&self, p: &Placement) -> &'static str {
        if self.placements.len() > 1 {
            service_type(&p.datacenter.spec.peer_access)
        } else {
            "ClusterIP"
        }
    }

    /// The Services of datacenter `p`'s shards, one per shard: their cluster
    /// IPs serve the datacenter's own workers, and with several datacenters
    /// they are of the type `peerAccess.serviceType` says. None in the
    /// Collaborative mode, which runs no parameter servers.
    #[must_use]
    pub fn peer_services(&self, p: &Placement) -> Vec<Service> {
        if self.collaborative() {
            return Vec::new();
        }
        let job = self.job_name();
        (0..p.spec.parameter_servers)
            .map(|i| {
                let mut selector = self.labels(p);
                selector.insert(ROLE_LABEL.to_owned(), Role::ParameterServer.as_str().into());
                selector.insert(INDEX_LABEL.to_owned(), i.to_string());
                let extra = [
                    (ROLE_LABEL, Role::ParameterServer.as_str().to_owned()),
                    (INDEX_LABEL, i.to_string()),
                ];
                Service {
                    metadata: self.meta(p, names::peer_service(&job, p.name(), i), &extra),
                    spec: Some(ServiceSpec {
                        type_: Some(self.service_type(p).to_owned()),
                        selector: Some(selector),
                        ports: Some(vec![port("grpc", PS_PORT)]),
                        ..ServiceSpec::default()
                    }),
                    status: None,
                }
            })
            .collect()
    }

    /// The registry's Service (Collaborative mode, first datacenter), of the
    /// datacenter's `peerAccess.serviceType` so that the others reach it.
    #[must_use]
    pub fn registry_service(&self, p: &Placement) -> Service {
        let name = names::registry(&self.job_name());
        let extra = [(ROLE_LABEL, "registry".to_owned())];
        let mut selector = self.labels(p);
        selector.insert(ROLE_LABEL.to_owned(), "registry".to_owned());
        Service {
            metadata: self.meta(p, name, &extra),
            spec: Some(ServiceSpec {
                type_: Some(self.service_type(p).to_owned()),
                selector: Some(selector),
                ports: Some(vec![port("grpc", REGISTRY_PORT)]),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    /// The Service of datacenter `p`'s Cartel site (Collaborative mode),
    /// of the datacenter's `peerAccess.serviceType` so that the other sites
    /// borrow from it.
    #[must_use]
    pub fn site_service(&self, p: &Placement) -> Service {
        let name = names::site_service(&self.job_name(), p.name());
        let extra = [(ROLE_LABEL, Role::Site.as_str().to_owned())];
        let mut selector = self.labels(p);
        selector.insert(ROLE_LABEL.to_owned(), Role::Site.as_str().to_owned());
        Service {
            metadata: self.meta(p, name, &extra),
            spec: Some(ServiceSpec {
                type_: Some(self.service_type(p).to_owned()),
                selector: Some(selector),
                ports: Some(vec![port("grpc", SITE_PORT)]),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    /// The pod of `role` number `index` in datacenter `p`. A site pod
    /// advertises `site_url`, where the other datacenters reach it.
    #[must_use]
    #[allow(clippy::too_many_lines)] // one container spec, field by field
    pub fn pod(&self, p: &Placement, role: Role, index: i32, site_url: &str) -> Pod {
        let job = self.job_name();
        let name = match role {
            Role::Registry => names::registry(&job),
            _ => names::pod(&job, p.name(), role, index),
        };
        let mut args = vec![role.as_str().to_owned()];
        let mut ports = Vec::new();
        let mut mounts = Vec::new();
        let mut volumes = Vec::new();
        if role != Role::Registry {
            args.extend(strings(&[
                "--manifest",
                &format!("{CONFIG_DIR}/manifest.yaml"),
                "--topology",
                &format!("{CONFIG_DIR}/topology.yaml"),
            ]));
            mounts.push(mount("topology", CONFIG_DIR, None));
            volumes.push(Volume {
                name: "topology".to_owned(),
                config_map: Some(ConfigMapVolumeSource {
                    name: names::config_map(&job, p.name()),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            });
        }
        let resources = p.spec.resources.as_ref().and_then(|r| match role {
            Role::ParameterServer | Role::Registry => r.parameter_server.clone(),
            Role::Worker | Role::Site => r.worker.clone(),
        });
        let sites = self.placements.len().to_string();
        match role {
            Role::ParameterServer => {
                args.extend(strings(&[
                    "--shard",
                    &index.to_string(),
                    "--listen",
                    &format!("0.0.0.0:{PS_PORT}"),
                    "--termination-log",
                    TERMINATION_LOG,
                ]));
                ports.push(container_port("grpc", PS_PORT));
                if let Some(claim) = self.checkpoint_claim(p) {
                    args.extend(strings(&["--checkpoint-dir", CHECKPOINT_DIR]));
                    // One claim holds every shard's checkpoints, each in its own directory.
                    let sub_path = format!("{}/ps-{index}", p.name());
                    mounts.push(mount("checkpoints", CHECKPOINT_DIR, Some(sub_path)));
                    volumes.push(claim_volume("checkpoints", &claim, false));
                }
            }
            Role::Worker => args.extend(strings(&["--index", &index.to_string()])),
            Role::Site => {
                args.extend(strings(&[
                    "--listen",
                    &format!("0.0.0.0:{SITE_PORT}"),
                    "--advertise",
                    site_url,
                    "--expect-sites",
                    &sites,
                ]));
                ports.push(container_port("grpc", SITE_PORT));
            }
            Role::Registry => {
                args.extend(strings(&[
                    "--listen",
                    &format!("0.0.0.0:{REGISTRY_PORT}"),
                    "--state-dir",
                    REGISTRY_STATE_DIR,
                    "--exit-when-finished",
                    &sites,
                ]));
                ports.push(container_port("grpc", REGISTRY_PORT));
                mounts.push(mount("state", REGISTRY_STATE_DIR, None));
                volumes.push(Volume {
                    name: "state".to_owned(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                });
            }
        }
        if matches!(role, Role::ParameterServer | Role::Worker) {
            args.extend(strings(&[
                "--metrics-listen",
                &format!("0.0.0.0:{METRICS_PORT}"),
            ]));
            ports.push(container_port("metrics", METRICS_PORT));
        }
        let loads_data = matches!(role, Role::ParameterServer | Role::Worker | Role::Site);
        if loads_data && self.job.spec.dataset.name != DatasetName::Digits {
            args.extend(strings(&["--data-dir", DATA_DIR, "--no-fetch"]));
            mounts.push(VolumeMount {
                read_only: Some(true),
                ..mount("data", DATA_DIR, None)
            });
            volumes.push(claim_volume(
                "data",
                &self.job.spec.dataset.claim_name,
                true,
            ));
        }
        // A server is ready once it accepts connections; workers serve nothing.
        let readiness_probe = (role != Role::Worker).then(|| Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("grpc".to_owned()),
                host: None,
            }),
            period_seconds: Some(2),
            ..Probe::default()
        });
        let container = Container {
            name: role.as_str().to_owned(),
            image: Some(self.image.clone()),
            command: Some(vec!["geoml".to_owned()]),
            args: Some(args),
            env: Some(vec![
                env("GEOML_JOB", &job),
                env("GEOML_DATACENTER", p.name()),
                env("GEOML_ROLE", role.as_str()),
                env("GEOML_INDEX", &index.to_string()),
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
            ]),
            ports: Some(ports),
            resources: resources.filter(|r| *r != ResourceRequirements::default()),
            volume_mounts: Some(mounts),
            readiness_probe,
            security_context: Some(container_security()),
            ..Container::default()
        };
        let spec = PodSpec {
            containers: vec![container],
            hostname: Some(name.clone()),
            subdomain: Some(names::headless_service(&job, p.name())),
            node_selector: non_empty(&p.node_selector),
            restart_policy: Some("Never".to_owned()),
            volumes: Some(volumes),
            // The roles never call the Kubernetes API.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(pod_security()),
            ..PodSpec::default()
        };
        let extra = [
            (ROLE_LABEL, role.as_str().to_owned()),
            (INDEX_LABEL, index.to_string()),
        ];
        let mut metadata = self.meta(p, name, &extra);
        metadata.annotations = Some(BTreeMap::from([(
            SPEC_HASH_ANNOTATION.to_owned(),
            spec_hash(&spec),
        )]));
        Pod {
            metadata,
            spec: Some(spec),
            status: None,
        }
    }

    /// Every pod of datacenter `p`: its shards, then its workers; in the
    /// Collaborative mode its site (advertising `site_url`) and, in the
    /// first datacenter, the registry.
    #[must_use]
    pub fn pods(&self, p: &Placement, site_url: &str) -> Vec<Pod> {
        if self.collaborative() {
            let mut pods = vec![self.pod(p, Role::Site, 0, site_url)];
            if self
                .placements
                .first()
                .is_some_and(|first| first.name() == p.name())
            {
                pods.push(self.pod(p, Role::Registry, 0, site_url));
            }
            return pods;
        }
        let ps =
            (0..p.spec.parameter_servers).map(|i| self.pod(p, Role::ParameterServer, i, site_url));
        let workers = (0..p.spec.workers).map(|i| self.pod(p, Role::Worker, i, site_url));
        ps.chain(workers).collect()
    }

    /// The claim datacenter `p`'s shards keep checkpoints in, when the job
    /// checkpoints: `checkpoint.claimName`, or the job's own
    /// [`Self::checkpoint_pvc`].
    #[must_use]
    pub fn checkpoint_claim(&self, p: &Placement) -> Option<String> {
        let checkpoint = self.job.spec.checkpoint.as_ref()?;
        Some(
            checkpoint
                .claim_name
                .clone()
                .unwrap_or_else(|| names::checkpoints(&self.job_name(), p.name())),
        )
    }

    /// The claim the operator creates for datacenter `p`'s checkpoints when
    /// the job checkpoints without naming a claim: 1 GiB, ReadWriteOnce, of
    /// the cluster's default StorageClass. It outlives failed pods, so a
    /// retried parameter server resumes from its checkpoint.
    #[must_use]
    pub fn checkpoint_pvc(&self, p: &Placement) -> Option<PersistentVolumeClaim> {
        let checkpoint = self.job.spec.checkpoint.as_ref()?;
        if checkpoint.claim_name.is_some() {
            return None;
        }
        Some(PersistentVolumeClaim {
            metadata: self.meta(p, names::checkpoints(&self.job_name(), p.name()), &[]),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_owned(),
                        Quantity("1Gi".to_owned()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            status: None,
        })
    }

    /// The topology of datacenter number `dc`, given where every
    /// datacenter's shards and the registry are reached.
    #[must_use]
    pub fn topology(&self, dc: usize, endpoints: &Endpoints) -> Topology {
        let own = &self.placements[dc];
        let urls = |table: &[Vec<String>], j: usize| table.get(j).cloned().unwrap_or_default();
        let parameter_servers = if self.policy.spec.inter_datacenter.model.is_global() {
            (0..self.placements.len())
                .flat_map(|j| {
                    if j == dc {
                        urls(&endpoints.local, j)
                    } else {
                        urls(&endpoints.peer, j)
                    }
                })
                .collect()
        } else {
            urls(&endpoints.local, dc)
        };
        let mirrors = self
            .placements
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != dc)
            .map(|(j, p)| (p.name().to_owned(), urls(&endpoints.peer, j)))
            .collect();
        let registry = self.collaborative().then(|| {
            let (local, peer) = endpoints.registry.clone().unwrap_or_default();
            if dc == 0 { local } else { peer }
        });
        Topology {
            datacenter: own.name().to_owned(),
            parameter_servers,
            mirrors,
            registry,
        }
    }

    /// `manifest.yaml`: the job's Datacenters, its SyncPolicy and the job
    /// itself (names and specs only), as `geoml_runtime::manifest` reads it.
    pub fn manifest_yaml(&self) -> Result<String, serde_yaml::Error> {
        let mut out = String::new();
        for p in &self.placements {
            let dc = Datacenter {
                metadata: bare_meta(&p.datacenter.metadata),
                spec: p.datacenter.spec.clone(),
                status: None,
            };
            push_document(&mut out, &dc)?;
        }
        let policy = SyncPolicy {
            metadata: bare_meta(&self.policy.metadata),
            spec: self.policy.spec.clone(),
        };
        push_document(&mut out, &policy)?;
        let job = TrainingJob {
            metadata: bare_meta(&self.job.metadata),
            spec: self.job.spec.clone(),
            status: None,
        };
        push_document(&mut out, &job)?;
        Ok(out)
    }

    /// The topology ConfigMap of datacenter number `dc`.
    pub fn config_map(
        &self,
        dc: usize,
        manifest: &str,
        topology: &Topology,
    ) -> Result<ConfigMap, serde_yaml::Error> {
        let p = &self.placements[dc];
        Ok(ConfigMap {
            metadata: self.meta(p, names::config_map(&self.job_name(), p.name()), &[]),
            data: Some(BTreeMap::from([
                ("manifest.yaml".to_owned(), manifest.to_owned()),
                ("topology.yaml".to_owned(), topology.to_yaml()?),
            ])),
            ..ConfigMap::default()
        })
    }
}

/// Where every datacenter's shards, and the registry, are reached; indexed
/// like [`JobView::placements`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// Per datacenter, its shards' URLs from inside its own cluster.
    pub local: Vec<Vec<String>>,
    /// Per datacenter, its shards' URLs from the other datacenters.
    pub peer: Vec<Vec<String>>,
    /// The registry's URL from inside its cluster and from the others.
    pub registry: Option<(String, String)>,
    /// Per datacenter, its Cartel site's URL from the other datacenters
    /// (Collaborative mode).
    pub sites: Vec<String>,
}

/// The URL at which a Service is reached from inside its own cluster: its
/// cluster IP (None until the apiserver has assigned one).
#[must_use]
pub fn local_url(service: &Service) -> Option<String> {
    let spec = service.spec.as_ref()?;
    let ip = spec.cluster_ip.as_ref().filter(|ip| *ip != "None")?;
    let port = spec.ports.as_ref()?.first()?.port;
    Some(format!("http://{ip}:{port}"))
}

/// The URL at which other datacenters reach a Service of datacenter `access`
/// exposes: `peerAccess.gatewayAddress` (its port plus `offset`, so shard
/// `i` of a gateway `host:p` is `host:p+i`), else the address the Service's
/// type gives (load-balancer ingress, `node_address` and node port, or the
/// cluster IP). None while the address is not assigned yet.
#[must_use]
pub fn peer_url(
    access: &PeerAccess,
    service: &Service,
    node_address: Option<&str>,
    offset: i32,
) -> Option<String> {
    if let Some(gateway) = &access.gateway_address {
        let (host, port) = gateway.rsplit_once(':')?;
        let port: i32 = port.parse().ok()?;
        return Some(format!("http://{host}:{}", port + offset));
    }
    let spec = service.spec.as_ref()?;
    let service_port = spec.ports.as_ref()?.first()?;
    let host_port = match access.service_type {
        PeerServiceType::LoadBalancer => {
            let ingress = service
                .status
                .as_ref()?
                .load_balancer
                .as_ref()?
                .ingress
                .as_ref()?
                .first()?;
            let host = ingress.ip.clone().or_else(|| ingress.hostname.clone())?;
            format!("{host}:{}", service_port.port)
        }
        PeerServiceType::NodePort => format!("{}:{}", node_address?, service_port.node_port?),
        PeerServiceType::ClusterIp => return local_url(service),
    };
    Some(format!("http://{host_port}"))
}

fn service_type(access: &PeerAccess) -> &'static str {
    match access.service_type {
        PeerServiceType::LoadBalancer => "LoadBalancer",
        PeerServiceType::NodePort => "NodePort",
        PeerServiceType::ClusterIp => "ClusterIP",
    }
}

fn bare_meta(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        ..ObjectMeta::default()
    }
}

fn push_document<T: serde::Serialize>(
    out: &mut String,
    value: &T,
) -> Result<(), serde_yaml::Error> {
    out.push_str("---\n");
    out.push_str(&serde_yaml::to_string(value)?);
    Ok(())
}

/// FNV-1a of the pod spec's JSON: stable across operator versions and restarts.
fn spec_hash(spec: &PodSpec) -> String {
    let json = serde_json::to_vec(spec).unwrap_or_default();
    let hash = json.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The pod-level security of every geoml pod: the image's non-root user,
/// files it writes group-owned by it, the runtime's default seccomp profile.
fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NONROOT_UID),
        run_as_group: Some(NONROOT_UID),
        fs_group: Some(NONROOT_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

/// The container-level security of every geoml container: a read-only root
/// filesystem (the roles write only to their volumes), no privilege
/// escalation, no capabilities.
fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

fn claim_volume(name: &str, claim: &str, read_only: bool) -> Volume {
    Volume {
        name: name.to_owned(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.to_owned(),
            read_only: read_only.then_some(true),
        }),
        ..Volume::default()
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn non_empty(map: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!map.is_empty()).then(|| map.clone())
}

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        ..ServicePort::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        ..ContainerPort::default()
    }
}

fn mount(name: &str, path: &str, sub_path: Option<String>) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        sub_path,
        ..VolumeMount::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        value_from: None,
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use geoml_crds::datacenter::PeerAccess;
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};

    /// The example manifest's objects, placed in namespace `ml`, with every
    /// datacenter's shards reachable at `http://<dc>-lb-<shard>:7070`.
    fn view(example: &str) -> JobView {
        let path = format!(
            "{}/../manifests/examples/{example}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(path).unwrap();
        let (mut dcs, mut policy, mut job) = (Vec::new(), None, None);
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            match value["kind"].as_str().unwrap() {
                "Datacenter" => dcs.push(serde_yaml::from_value::<Datacenter>(value).unwrap()),
                "SyncPolicy" => policy = Some(serde_yaml::from_value(value).unwrap()),
                _ => job = Some(serde_yaml::from_value::<TrainingJob>(value).unwrap()),
            }
        }
        let mut job = job.unwrap();
        job.metadata.namespace = Some("ml".into());
        job.metadata.uid = Some("uid-1".into());
        let placements = job
            .spec
            .datacenters
            .iter()
            .map(|spec| {
                let dc = dcs.iter().find(|d| d.name_any() == spec.name).unwrap();
                Placement::new(&job, spec.clone(), dc.clone())
            })
            .collect();
        JobView {
            job,
            policy: policy.unwrap(),
            placements,
            image: "geoml:test".into(),
        }
    }

    /// Shard `i` of datacenter `dc` at `http://<dc>-ip-<i>:7070` inside its
    /// cluster and `http://<dc>-lb-<i>:7070` from the others.
    fn endpoints(view: &JobView, registry: Option<&str>) -> Endpoints {
        let table = |kind: &str| {
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
            local: table("ip"),
            peer: table("lb"),
            registry: registry.map(|r| ("http://10.96.0.9:7071".to_owned(), r.to_owned())),
            sites: Vec::new(),
        }
    }

    use serde::Deserialize;

    #[test]
    fn gaia_pods_run_their_role_with_arguments_from_the_spec() {
        let view = view("gaia-3dc.yaml");
        let eu = &view.placements[1];
        let pods = view.pods(eu, "");
        let names: Vec<String> = pods.iter().map(ResourceExt::name_any).collect();
        assert_eq!(
            names,
            [
                "fashion-mnist-gaia-eu-west-ps-0",
                "fashion-mnist-gaia-eu-west-worker-0",
                "fashion-mnist-gaia-eu-west-worker-1"
            ]
        );
        let ps = pods[0].spec.as_ref().unwrap();
        let container = &ps.containers[0];
        assert_eq!(container.command.as_deref().unwrap(), ["geoml"]);
        assert_eq!(
            container.args.as_deref().unwrap().join(" "),
            "ps --manifest /etc/geoml/manifest.yaml --topology /etc/geoml/topology.yaml \
             --shard 0 --listen 0.0.0.0:7070 --termination-log /dev/termination-log \
             --metrics-listen 0.0.0.0:9090 --data-dir /var/lib/geoml/data --no-fetch"
        );
        assert_eq!(ps.subdomain.as_deref(), Some("fashion-mnist-gaia-eu-west"));
        assert_eq!(ps.restart_policy.as_deref(), Some("Never"));
        let worker = &pods[2].spec.as_ref().unwrap().containers[0];
        assert_eq!(
            worker.args.as_deref().unwrap().join(" "),
            "worker --manifest /etc/geoml/manifest.yaml --topology /etc/geoml/topology.yaml \
             --index 1 --metrics-listen 0.0.0.0:9090 --data-dir /var/lib/geoml/data --no-fetch"
        );
        let env: BTreeMap<_, _> = worker
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.as_str(), e.value.as_deref()?)))
            .collect();
        assert_eq!(env["GEOML_DATACENTER"], "eu-west");
        assert_eq!(env["GEOML_ROLE"], "worker");
        assert_eq!(env["GEOML_INDEX"], "1");
        // Local datacenter in the job's namespace: owned by the job.
        assert_eq!(
            pods[0].metadata.owner_references.as_ref().unwrap()[0].name,
            "fashion-mnist-gaia"
        );
        assert_eq!(pods[0].labels()[ROLE_LABEL], "ps");
    }

    #[test]
    fn asp_topology_has_own_shards_and_every_other_datacenters_mirrors() {
        let view = view("gaia-3dc.yaml");
        let topology = view.topology(0, &endpoints(&view, None));
        assert_eq!(topology.datacenter, "us-east");
        assert_eq!(topology.parameter_servers, ["http://us-east-ip-0:7070"]);
        assert_eq!(topology.mirrors.len(), 2);
        assert_eq!(topology.mirrors["eu-west"], ["http://eu-west-lb-0:7070"]);
        assert_eq!(
            topology.mirrors["ap-southeast"],
            ["http://ap-southeast-lb-0:7070"]
        );
        assert_eq!(topology.registry, None);
    }

    #[test]
    fn naive_bsp_topology_lists_every_datacenters_shards_in_spec_order() {
        let view = view("bsp-3dc.yaml");
        let topology = view.topology(1, &endpoints(&view, None));
        let mut expected = Vec::new();
        for (j, p) in view.placements.iter().enumerate() {
            let kind = if j == 1 { "ip" } else { "lb" };
            for i in 0..p.spec.parameter_servers {
                expected.push(format!("http://{}-{kind}-{i}:7070", p.name()));
            }
        }
        assert!(expected.len() >= 3, "{expected:?}");
        assert_eq!(topology.parameter_servers, expected);
    }

    #[test]
    fn cartel_runs_a_site_per_datacenter_and_the_registry_in_the_first() {
        let view = view("cartel-flights.yaml");
        assert!(view.collaborative());
        let endpoints = endpoints(&view, Some("http://203.0.113.9:7071"));
        let first = view.topology(0, &endpoints);
        assert_eq!(first.registry.as_deref(), Some("http://10.96.0.9:7071"));
        let other = view.topology(2, &endpoints);
        assert_eq!(other.registry.as_deref(), Some("http://203.0.113.9:7071"));
        let args = |pod: &Pod| {
            pod.spec.as_ref().unwrap().containers[0]
                .args
                .clone()
                .unwrap()
                .join(" ")
        };
        let first = view.pods(&view.placements[0], "http://192.0.2.1:30072");
        let names: Vec<String> = first.iter().map(ResourceExt::name_any).collect();
        assert_eq!(
            names,
            ["cartel-flights-ewr-site-0", "cartel-flights-registry"]
        );
        assert_eq!(
            args(&first[0]),
            "site --manifest /etc/geoml/manifest.yaml --topology /etc/geoml/topology.yaml \
             --listen 0.0.0.0:7072 --advertise http://192.0.2.1:30072 --expect-sites 3 \
             --data-dir /var/lib/geoml/data --no-fetch"
        );
        assert_eq!(
            args(&first[1]),
            "registry --listen 0.0.0.0:7071 --state-dir /var/lib/geoml/registry --exit-when-finished 3"
        );
        let other = view.pods(&view.placements[1], "http://192.0.2.2:30072");
        assert_eq!(other.len(), 1);
        for pod in first.iter().chain(&other) {
            assert_eq!(
                pod.spec.as_ref().unwrap().restart_policy.as_deref(),
                Some("Never")
            );
        }
    }

    #[test]
    fn config_map_holds_a_manifest_without_status_and_the_topology() {
        let view = view("gaia-3dc.yaml");
        let manifest = view.manifest_yaml().unwrap();
        let topology = view.topology(2, &endpoints(&view, None));
        let cm = view.config_map(2, &manifest, &topology).unwrap();
        let data = cm.data.unwrap();
        assert_eq!(
            Topology::from_yaml(&data["topology.yaml"]).unwrap(),
            topology
        );
        let kinds: Vec<String> = serde_yaml::Deserializer::from_str(&data["manifest.yaml"])
            .map(|d| {
                let v = serde_yaml::Value::deserialize(d).unwrap();
                assert!(v.get("status").is_none());
                v["kind"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "Datacenter",
                "Datacenter",
                "Datacenter",
                "SyncPolicy",
                "TrainingJob"
            ]
        );
    }

    #[test]
    fn peer_urls_follow_the_datacenters_peer_access() {
        let mut service = Service {
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.7".into()),
                ports: Some(vec![ServicePort {
                    port: 7070,
                    node_port: Some(30_070),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        let access = |service_type, gateway: Option<&str>| PeerAccess {
            service_type,
            gateway_address: gateway.map(Into::into),
        };
        // A load balancer without an address yet: wait.
        assert_eq!(
            peer_url(
                &access(PeerServiceType::LoadBalancer, None),
                &service,
                None,
                0
            ),
            None
        );
        service.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("203.0.113.7".into()),
                    ..LoadBalancerIngress::default()
                }]),
            }),
            ..ServiceStatus::default()
        });
        assert_eq!(
            peer_url(
                &access(PeerServiceType::LoadBalancer, None),
                &service,
                None,
                0
            )
            .as_deref(),
            Some("http://203.0.113.7:7070")
        );
        assert_eq!(
            peer_url(
                &access(PeerServiceType::NodePort, None),
                &service,
                Some("192.0.2.1"),
                0
            )
            .as_deref(),
            Some("http://192.0.2.1:30070")
        );
        assert_eq!(
            peer_url(&access(PeerServiceType::NodePort, None), &service, None, 0),
            None
        );
        assert_eq!(
            peer_url(&access(PeerServiceType::ClusterIp, None), &service, None, 0).as_deref(),
            Some("http://10.96.0.7:7070")
        );
        assert_eq!(
            peer_url(
                &access(PeerServiceType::ClusterIp, Some("gw.example.com:8000")),
                &service,
                None,
                2
            )
            .as_deref(),
            Some("http://gw.example.com:8002")
        );
    }
}
