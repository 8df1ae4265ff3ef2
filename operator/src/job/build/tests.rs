//! Builders checked against the example manifests.

use super::*;
use geoml_crds::Topology;
use geoml_crds::datacenter::PeerAccess;
use geoml_crds::datacenter::PeerServiceType;
use geoml_crds::manifest::Manifest;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
use k8s_openapi::api::core::v1::{Pod, Service, ServicePort, ServiceSpec};

/// The example manifest's objects, placed in namespace `ml`, with every
/// datacenter's shards reachable at `http://<dc>-lb-<shard>:7070`.
fn view(example: &str) -> JobView {
    let path = format!(
        "{}/../manifests/examples/{example}",
        env!("CARGO_MANIFEST_DIR")
    );
    let manifest = Manifest::load(path.as_ref()).unwrap();
    let mut view = JobView::from_manifest(&manifest, "ml", "geoml:test").unwrap();
    view.job.metadata.uid = Some("uid-1".into());
    view
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
        "ps --shard=0 --listen=0.0.0.0:7070 --drain-timeout=300 \
         --termination-log=/dev/termination-log --manifest=/etc/geoml/job/manifest.yaml \
         --topology=/etc/geoml/job/topology.yaml --seed=42 --metrics-listen=0.0.0.0:9090 \
         --data-dir=/var/lib/geoml/data --no-fetch"
    );
    assert_eq!(ps.subdomain.as_deref(), Some("fashion-mnist-gaia-eu-west"));
    assert_eq!(ps.restart_policy.as_deref(), Some("Never"));
    let worker = &pods[2].spec.as_ref().unwrap().containers[0];
    assert_eq!(
        worker.args.as_deref().unwrap().join(" "),
        "worker --index=1 --eval-every=20 --manifest=/etc/geoml/job/manifest.yaml \
         --topology=/etc/geoml/job/topology.yaml --seed=42 --metrics-listen=0.0.0.0:9090 \
         --data-dir=/var/lib/geoml/data --no-fetch"
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
        "site --manifest=/etc/geoml/job/manifest.yaml --data-dir=/var/lib/geoml/data --no-fetch \
         --topology=/etc/geoml/job/topology.yaml --listen=0.0.0.0:7072 \
         --advertise=http://192.0.2.1:30072 --mode=cartel --expect-sites=3 --finish-poll=1 \
         --registry-grace=5 --finish-timeout=3600"
    );
    assert_eq!(
        args(&first[1]),
        "registry --listen=0.0.0.0:7071 --state-dir=/var/lib/geoml/registry \
         --exit-when-finished=3 --exit-grace=5"
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
    let kinds: Vec<String> = geoml_crds::yaml::documents(&data["manifest.yaml"])
        .unwrap()
        .into_iter()
        .map(|v| {
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

#[test]
fn peer_access_applies_only_when_the_job_spans_clusters() {
    // Every example Datacenter is `local`: one cluster, cluster IPs.
    let mut gaia = view("gaia-3dc.yaml");
    assert!(
        gaia.placements
            .iter()
            .all(|p| !gaia.peers_use_peer_access(p))
    );
    // A gateway is dialled even in one cluster.
    gaia.placements[1]
        .datacenter
        .spec
        .peer_access
        .gateway_address = Some("gw:9000".into());
    assert!(gaia.peers_use_peer_access(&gaia.placements[1]));
    assert!(!gaia.peers_use_peer_access(&gaia.placements[0]));
    // One remote datacenter: every datacenter is reached through its peerAccess.
    gaia.placements[2].datacenter.spec.cluster = serde_json::from_value(serde_json::json!({
        "remote": {"kubeconfigSecretRef": {"name": "eu", "namespace": "geoml-system"}}
    }))
    .unwrap();
    assert!(
        gaia.placements
            .iter()
            .all(|p| gaia.peers_use_peer_access(p))
    );
    // One datacenter has no peers.
    let lan = view("fashion-mnist-lan.yaml");
    assert!(!lan.peers_use_peer_access(&lan.placements[0]));
}

/// Every pod mounts its role's TLS Secret where roles read it by default,
/// and that Secret holds the CA and a certificate naming the datacenter and
/// the role.
#[test]
fn every_pod_mounts_the_tls_secret_of_its_datacenter_and_role() {
    use geoml_crds::pki::{CA_FILE, CERT_FILE, CertificateAuthority, KEY_FILE};
    use geoml_crds::roles::DEFAULT_TLS_DIR;
    for (example, roles) in [
        ("gaia-3dc.yaml", vec![Role::ParameterServer, Role::Worker]),
        ("cartel-flights.yaml", vec![Role::Site, Role::Registry]),
    ] {
        let view = view(example);
        let first = &view.placements[0];
        assert_eq!(view.roles(first), roles, "{example}");
        for pod in view.pods(first, "") {
            let spec = pod.spec.as_ref().unwrap();
            let role = pod.labels()[ROLE_LABEL].clone();
            let mount = spec.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.mount_path == DEFAULT_TLS_DIR)
                .unwrap_or_else(|| panic!("{}: no TLS mount", pod.name_any()));
            assert_eq!(mount.read_only, Some(true));
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .unwrap();
            let secret = volume.secret.as_ref().unwrap();
            let dc = first.name();
            assert_eq!(
                secret.secret_name.as_deref(),
                Some(format!("{}-{dc}-{role}-tls", view.job.name_any()).as_str())
            );
            assert_eq!(secret.default_mode, Some(0o440));
            let args = spec.containers[0].args.as_deref().unwrap().join(" ");
            assert!(!args.contains("plaintext"), "{args}");
        }
    }
    let view = view("gaia-3dc.yaml");
    let eu = &view.placements[1];
    let ca = CertificateAuthority::new("test").unwrap();
    let identity = JobView::identity(eu, Role::Worker);
    assert_eq!(identity.uri(), "geoml://eu-west/worker");
    let issued = ca.issue(&identity).unwrap();
    let renew = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(2_000_000_000);
    let secret = view.tls_secret(eu, Role::Worker, &ca.pem(), &issued, renew);
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(secret.name_any(), "fashion-mnist-gaia-eu-west-worker-tls");
    assert_eq!(secret_text(&secret, CA_FILE), Some(ca.pem()));
    assert_eq!(secret_text(&secret, CERT_FILE), Some(issued.cert_pem));
    assert_eq!(secret_text(&secret, KEY_FILE), Some(issued.key_pem));
    assert_eq!(renewal_due(&secret), Some(renew));
}

/// With `spec.tls.issuerRef`, a role's Certificate asks cert-manager for
/// the Secret the pod mounts, with the identity and usages the roles check.
#[test]
fn a_certificate_asks_the_issuer_for_the_roles_secret_and_identity() {
    use geoml_crds::training_job::IssuerRef;
    let view = view("gaia-3dc.yaml");
    let eu = &view.placements[1];
    let issuer = IssuerRef {
        name: "geoml-ca".into(),
        kind: "ClusterIssuer".into(),
        group: "cert-manager.io".into(),
    };
    let cert = view.certificate(eu, Role::ParameterServer, &issuer);
    assert_eq!(cert.name_any(), "fashion-mnist-gaia-eu-west-ps-tls");
    let types = cert.types.as_ref().unwrap();
    assert_eq!(
        (types.api_version.as_str(), types.kind.as_str()),
        ("cert-manager.io/v1", "Certificate")
    );
    assert_eq!(cert.labels()[JOB_LABEL], "fashion-mnist-gaia");
    let spec = &cert.data["spec"];
    assert_eq!(spec["secretName"], "fashion-mnist-gaia-eu-west-ps-tls");
    assert_eq!(spec["uris"], serde_json::json!(["geoml://eu-west/ps"]));
    assert_eq!(
        spec["dnsNames"],
        serde_json::json!([geoml_crds::identity::SERVER_NAME])
    );
    assert_eq!(
        spec["usages"],
        serde_json::json!(["digital signature", "server auth", "client auth"])
    );
    assert_eq!(
        spec["duration"], "2592000s",
        "30 days, as the operator's own"
    );
    assert_eq!(spec["renewBefore"], "864000s", "renewed two thirds in");
    assert_eq!(
        spec["issuerRef"],
        serde_json::json!({"name": "geoml-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
    );
    assert_eq!(
        spec["secretTemplate"]["labels"][DATACENTER_LABEL],
        "eu-west"
    );
}

#[test]
fn a_certificate_is_ready_when_cert_manager_says_so_for_its_generation() {
    let with_status = |generation: i64, status: serde_json::Value| {
        let mut cert = kube::api::DynamicObject::new("c", &certificate_resource());
        cert.metadata.generation = Some(generation);
        cert.data = serde_json::json!({ "status": status });
        cert
    };
    let ready = |status: &str, reason: &str, seen: i64| {
        serde_json::json!({"conditions": [{"type": "Ready", "status": status,
            "reason": reason, "message": "m", "observedGeneration": seen}]})
    };
    assert_eq!(
        certificate_ready(&with_status(1, ready("True", "Ready", 1))),
        Ok(())
    );
    assert_eq!(
        certificate_ready(&with_status(1, serde_json::json!({}))),
        Err("not issued yet".into())
    );
    assert_eq!(
        certificate_ready(&with_status(1, ready("False", "DoesNotExist", 1))),
        Err("DoesNotExist: m".into())
    );
    assert_eq!(
        certificate_ready(&with_status(2, ready("True", "Ready", 1))),
        Err("not issued yet for its current spec".into())
    );
}
