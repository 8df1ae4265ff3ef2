//! The job's Services: the headless one, one per shard (their cluster IPs
//! are how workers and the other datacenters reach the shards), Cartel's
//! site and registry Services, and the URLs they are reached at.

use geoml_crds::datacenter::{PeerAccess, PeerServiceType};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use super::{
    INDEX_LABEL, JobView, METRICS_PORT, PS_PORT, Placement, REGISTRY_PORT, ROLE_LABEL, Role,
    SITE_PORT, names,
};

impl JobView {
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

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        ..ServicePort::default()
    }
}
