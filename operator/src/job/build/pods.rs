//! The job's pods, their command lines, volumes and security, and the
//! checkpoint claim.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use geoml_crds::mode::CollaborativeMode;
use geoml_crds::roles::{
    DEFAULT_EVAL_EVERY, DEFAULT_TLS_DIR, DataDirArgs, JobRoleArgs, ParameterServerArgs,
    RegistryArgs, SiteArgs, TlsArgs, WorkerArgs,
};
use geoml_crds::training_job::DatasetName;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, TCPSocketAction,
    Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    CHECKPOINT_DIR, CONFIG_DIR, DATA_DIR, INDEX_LABEL, JobView, METRICS_PORT, NONROOT_UID, PS_PORT,
    Placement, REGISTRY_PORT, REGISTRY_STATE_DIR, ROLE_LABEL, Role, SITE_PORT,
    SPEC_HASH_ANNOTATION, TERMINATION_LOG, content_hash, names,
};

impl JobView {
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
        let mut ports = Vec::new();
        let mut mounts = Vec::new();
        let mut volumes = Vec::new();
        if role != Role::Registry {
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
        // The data set's claim, read-only, for the roles that train or evaluate.
        let data = role != Role::Registry && self.job.spec.dataset.name != DatasetName::Digits;
        if data {
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
        let data_dir = DataDirArgs {
            data_dir: data.then(|| DATA_DIR.into()),
        };
        let config = |file: &str| Path::new(CONFIG_DIR).join(file);
        // The role's certificate and the job's CA, where roles look by default.
        mounts.push(VolumeMount {
            read_only: Some(true),
            ..mount("tls", DEFAULT_TLS_DIR, None)
        });
        volumes.push(Volume {
            name: "tls".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names::tls(&job, p.name(), role)),
                // Readable by the pod's group (fsGroup) only.
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        let tls = TlsArgs::default();
        let mut job_role = JobRoleArgs::new(config("manifest.yaml"), config("topology.yaml"));
        job_role.metrics_listen = Some(any_address(METRICS_PORT));
        job_role.data = data_dir.clone();
        job_role.no_fetch = data;
        job_role.tls = tls.clone();
        let index_u32 = u32::try_from(index).unwrap_or_default();
        let sites = self.placements.len();
        let args = match role {
            Role::ParameterServer => {
                ports.push(container_port("grpc", PS_PORT));
                let mut args = ParameterServerArgs::new(index_u32, any_address(PS_PORT), job_role);
                args.termination_log = Some(TERMINATION_LOG.into());
                if let Some(claim) = self.checkpoint_claim(p) {
                    args.checkpoint_dir = Some(CHECKPOINT_DIR.into());
                    // One claim holds every shard's checkpoints, each in its own directory.
                    let sub_path = format!("{}/ps-{index}", p.name());
                    mounts.push(mount("checkpoints", CHECKPOINT_DIR, Some(sub_path)));
                    volumes.push(claim_volume("checkpoints", &claim, false));
                }
                args.command_line()
            }
            Role::Worker => WorkerArgs {
                index: index_u32,
                eval_every: DEFAULT_EVAL_EVERY,
                role: job_role,
            }
            .command_line(),
            Role::Site => {
                ports.push(container_port("grpc", SITE_PORT));
                let mut args = SiteArgs::new(
                    config("manifest.yaml"),
                    any_address(SITE_PORT),
                    CollaborativeMode::Cartel,
                );
                args.topology = Some(config("topology.yaml"));
                args.advertise = Some(site_url.to_owned());
                args.expect_sites = sites;
                args.data = data_dir;
                args.no_fetch = data;
                args.tls = tls;
                args.command_line()
            }
            Role::Registry => {
                ports.push(container_port("grpc", REGISTRY_PORT));
                mounts.push(mount("state", REGISTRY_STATE_DIR, None));
                volumes.push(Volume {
                    name: "state".to_owned(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                });
                let mut args = RegistryArgs::new(any_address(REGISTRY_PORT));
                args.state_dir = Some(REGISTRY_STATE_DIR.into());
                args.exit_when_finished = Some(sites);
                args.tls = tls;
                args.command_line()
            }
        };
        if matches!(role, Role::ParameterServer | Role::Worker) {
            ports.push(container_port("metrics", METRICS_PORT));
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
            content_hash(&spec),
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

/// `0.0.0.0:port`: every interface of the pod.
fn any_address(port: i32) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], u16::try_from(port).unwrap_or_default()))
}

fn non_empty(map: &BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    (!map.is_empty()).then(|| map.clone())
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
