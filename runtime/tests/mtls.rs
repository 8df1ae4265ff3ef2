//! mTLS between roles, with real `geoml ps` (and its mirror service),
//! `geoml registry` and `geoml site` processes over loopback TCP, each given
//! a TLS directory of a test CA: every service refuses a client without a
//! certificate of the job's CA, and a parameter server cannot send mirror
//! messages in another datacenter's name.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{doc, example, free_port, set, write};
use geoml_crds::identity::{Identity, Role, SERVER_NAME};
use geoml_crds::pki::{CA_FILE, CertificateAuthority};
use geoml_dataplane::tls::{Expect, Transport};
use geoml_proto as pb;
use geoml_proto::cartel::model_exchange_client::ModelExchangeClient;
use geoml_proto::cartel::registry_client::RegistryClient;
use geoml_proto::mirror::mirror_client::MirrorClient;
use geoml_proto::parameter_server_client::ParameterServerClient;
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A TLS directory for `identity` from `ca`, at `dir/name`.
fn tls_dir(ca: &CertificateAuthority, dir: &Path, name: &str, identity: &Identity) -> PathBuf {
    let path = dir.join("tls").join(name);
    ca.write_dir(identity, &path).unwrap();
    path
}

/// A role process, killed when dropped; its log in `dir/<name>.log`.
fn spawn(dir: &Path, name: &str, args: &[String]) -> tokio::process::Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_geoml"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// `gaia-3dc.yaml` on Digits, written to `dir`.
fn gaia_job(dir: &Path) -> PathBuf {
    let mut docs = example("gaia-3dc.yaml");
    let job = doc(&mut docs, "TrainingJob");
    set(job, "spec.dataset.name", "Digits".into());
    write(dir, &docs)
}

/// A Collaborative job on Digits, written to `dir/cartel`.
fn cartel_job(dir: &Path) -> PathBuf {
    let mut docs = example("cartel-fashion.yaml");
    let job = doc(&mut docs, "TrainingJob");
    set(job, "spec.dataset.name", Value::from("Digits"));
    let dir = dir.join("cartel");
    std::fs::create_dir_all(&dir).unwrap();
    write(&dir, &docs)
}

/// us-east's shard of the Gaia job, mirroring eu-west and ap-southeast
/// (whose addresses lead nowhere), with `tls`; returns its address.
fn start_parameter_server(dir: &Path, tls: &Path) -> (tokio::process::Child, String) {
    let manifest = gaia_job(dir);
    let port = free_port();
    let address = format!("http://127.0.0.1:{port}");
    let topology = dir.join("topology-us-east.yaml");
    std::fs::write(
        &topology,
        format!(
            "datacenter: us-east\nparameterServers: [{address}]\nmirrors:\n  \
             eu-west: [http://127.0.0.1:{}]\n  ap-southeast: [http://127.0.0.1:{}]\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let child = spawn(
        dir,
        "us-east-ps-0",
        &[
            "ps".into(),
            "--shard=0".into(),
            "--keep-serving".into(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--topology={}", topology.display()),
            format!("--manifest={}", manifest.display()),
            format!("--tls-dir={}", tls.display()),
        ],
    );
    (child, address)
}

/// A channel to `address`, the server `server`, over `transport`, once the
/// server answers.
async fn ready(address: &str, server: &Expect, transport: &Transport) -> Channel {
    for _ in 0..300 {
        if let Ok(channel) = transport.connect(address, server).await {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing answers at {address}");
}

/// A client without a certificate of the job's CA.
enum Stranger {
    /// Plaintext to a TLS port.
    Plaintext,
    /// TLS, trusting the job's CA (given, PEM), presenting no certificate.
    NoCertificate(Vec<u8>),
    /// A certificate of another CA, with a geoml identity.
    AnotherCa(Transport),
}

impl Stranger {
    /// A channel to `address`, the server `server`, if the handshake got
    /// that far.
    async fn connect(&self, address: &str, server: &Expect) -> Option<Channel> {
        match self {
            Self::Plaintext => Transport::Plaintext.connect(address, server).await.ok(),
            Self::NoCertificate(ca) => {
                let tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name(SERVER_NAME);
                let https = address.replace("http://", "https://");
                Endpoint::from_shared(https)
                    .unwrap()
                    .tls_config(tls)
                    .unwrap()
                    .connect()
                    .await
                    .ok()
            }
            Self::AnotherCa(transport) => transport.connect(address, server).await.ok(),
        }
    }
}

/// The addresses of one running `geoml ps` (with its mirror service),
/// `geoml registry` and `geoml site`.
struct Services {
    ps: String,
    registry: String,
    site: String,
}

impl Services {
    /// The server each service's certificate names.
    fn ps_server() -> Expect {
        Expect::identity(Identity::new("us-east", Role::ParameterServer))
    }
    fn registry_server() -> Expect {
        Expect::role(Role::Registry)
    }
    fn site_server() -> Expect {
        Expect::identity(Identity::new("site-a", Role::Site))
    }

    /// One call to each service through the channels `connect` makes to an
    /// address and the server expected there; a connection that fails
    /// counts as refused.
    async fn call_each(
        &self,
        connect: impl AsyncFn(&str, &Expect) -> Option<Channel>,
    ) -> Vec<(&'static str, Result<(), tonic::Status>)> {
        let no_connection = || Err(tonic::Status::unavailable("no connection"));
        let ps = connect(&self.ps, &Self::ps_server()).await;
        let status = match ps.clone() {
            Some(c) => ParameterServerClient::new(c)
                .status(pb::StatusRequest {})
                .await
                .map(drop),
            None => no_connection(),
        };
        let snapshot = match ps {
            Some(c) => MirrorClient::new(c)
                .snapshot(pb::mirror::SnapshotRequest {})
                .await
                .map(drop),
            None => no_connection(),
        };
        let sites = match connect(&self.registry, &Self::registry_server()).await {
            Some(c) => RegistryClient::new(c)
                .sites(pb::cartel::SitesRequest {})
                .await
                .map(drop),
            None => no_connection(),
        };
        let portions = match connect(&self.site, &Self::site_server()).await {
            Some(c) => ModelExchangeClient::new(c)
                .fetch_portions(pb::cartel::PortionsRequest {
                    site: "site-b".into(),
                    classes: vec![0],
                })
                .await
                .map(drop),
            None => no_connection(),
        };
        vec![
            ("the parameter server", status),
            ("the mirror service", snapshot),
            ("the registry", sites),
            ("the site's model exchange", portions),
        ]
    }
}

/// Starts us-east's shard, a registry and site-a (which waits for two more
/// sites that never come, serving its model exchange meanwhile, and
/// reaches the registry over mTLS), each with a certificate of `ca`.
fn start_services(dir: &Path, ca: &CertificateAuthority) -> (Vec<tokio::process::Child>, Services) {
    let ps_tls = tls_dir(
        ca,
        dir,
        "ps",
        &Identity::new("us-east", Role::ParameterServer),
    );
    let (ps_child, ps) = start_parameter_server(dir, &ps_tls);
    let registry_port = free_port();
    let registry_tls = tls_dir(
        ca,
        dir,
        "registry",
        &Identity::new("site-a", Role::Registry),
    );
    let registry_child = spawn(
        dir,
        "registry",
        &[
            "registry".into(),
            format!("--listen=127.0.0.1:{registry_port}"),
            format!("--tls-dir={}", registry_tls.display()),
        ],
    );
    let site_port = free_port();
    let site_tls = tls_dir(ca, dir, "site", &Identity::new("site-a", Role::Site));
    let site_child = spawn(
        dir,
        "site-a",
        &[
            "site".into(),
            format!("--manifest={}", cartel_job(dir).display()),
            "--site=site-a".into(),
            format!("--listen=127.0.0.1:{site_port}"),
            format!("--registry=http://127.0.0.1:{registry_port}"),
            "--expect-sites=3".into(),
            "--no-fetch".into(),
            format!("--tls-dir={}", site_tls.display()),
        ],
    );
    let services = Services {
        ps,
        registry: format!("http://127.0.0.1:{registry_port}"),
        site: format!("http://127.0.0.1:{site_port}"),
    };
    (vec![ps_child, registry_child, site_child], services)
}

#[tokio::test]
async fn every_service_refuses_a_client_without_a_certificate_of_the_jobs_ca() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ca = CertificateAuthority::new("job").unwrap();
    let (_children, services) = start_services(dir, &ca);

    // (d) A client with a certificate of the job's CA is served by all,
    // once each answers; the site registered itself over mTLS.
    let valid = Transport::mtls(&tls_dir(
        &ca,
        dir,
        "client",
        &Identity::new("us-east", Role::Launcher),
    ))
    .unwrap();
    let mut registry =
        RegistryClient::new(ready(&services.registry, &Services::registry_server(), &valid).await);
    for _ in 0..300 {
        let sites = registry.sites(pb::cartel::SitesRequest {}).await.unwrap();
        if !sites.into_inner().sites.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ready(&services.ps, &Services::ps_server(), &valid).await;
    ready(&services.site, &Services::site_server(), &valid).await;
    for (service, result) in services
        .call_each(async |a, server| valid.connect(a, server).await.ok())
        .await
    {
        assert!(
            result.is_ok(),
            "{service} refused a valid client: {result:?}"
        );
    }

    // (a), (b) Without one, no service answers.
    let ca_pem = std::fs::read(dir.join("tls/ps").join(CA_FILE)).unwrap();
    let other = CertificateAuthority::new("someone else").unwrap();
    let other_tls = tls_dir(
        &other,
        dir,
        "stranger",
        &Identity::new("us-east", Role::ParameterServer),
    );
    let strangers = [
        ("plaintext", Stranger::Plaintext),
        ("no certificate", Stranger::NoCertificate(ca_pem)),
        (
            "another CA's certificate",
            Stranger::AnotherCa(Transport::mtls(&other_tls).unwrap()),
        ),
    ];
    for (who, stranger) in &strangers {
        for (service, result) in services
            .call_each(async |a, server| stranger.connect(a, server).await)
            .await
        {
            assert!(result.is_err(), "{service} served a client with {who}");
        }
    }
    let ps_log = std::fs::read_to_string(dir.join("us-east-ps-0.log")).unwrap();
    assert!(ps_log.contains("TLS connection refused"), "{ps_log}");
}

#[tokio::test]
async fn a_peer_cannot_send_mirror_messages_in_another_datacenters_name() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ca = CertificateAuthority::new("job").unwrap();
    let ps_tls = tls_dir(
        &ca,
        dir,
        "ps",
        &Identity::new("us-east", Role::ParameterServer),
    );
    let (_ps, ps) = start_parameter_server(dir, &ps_tls);
    let eu_west = Transport::mtls(&tls_dir(
        &ca,
        dir,
        "eu-west",
        &Identity::new("eu-west", Role::ParameterServer),
    ))
    .unwrap();
    let mut mirror = MirrorClient::new(ready(&ps, &Services::ps_server(), &eu_west).await);
    let tick = |datacenter: &str| pb::mirror::ClockTick {
        datacenter: datacenter.into(),
        mirror_clock: 1,
        epoch: 1,
        ..pb::mirror::ClockTick::default()
    };

    // eu-west's certificate, ap-southeast's name: refused, naming both.
    for refused in [
        mirror.tick(tick("ap-southeast")).await.map(drop),
        mirror
            .update(pb::mirror::MirrorUpdate {
                datacenter: "ap-southeast".into(),
                seq: 1,
                epoch: 1,
                ..pb::mirror::MirrorUpdate::default()
            })
            .await
            .map(drop),
        mirror
            .announce(pb::mirror::Announcement {
                datacenter: "ap-southeast".into(),
                seq: 1,
                epoch: 1,
                ..pb::mirror::Announcement::default()
            })
            .await
            .map(drop),
    ] {
        let status = refused.unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("eu-west") && status.message().contains("ap-southeast"),
            "{status:?}"
        );
    }
    let status = ParameterServerClient::new(ready(&ps, &Services::ps_server(), &eu_west).await)
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let peers = &status.mirror.unwrap().peers;
    let ap = peers
        .iter()
        .find(|p| p.datacenter == "ap-southeast")
        .unwrap();
    assert!(ap.mirror_clock == 0, "a refused tick counted: {ap:?}");

    // In its own name it is heard.
    let echoed = mirror.tick(tick("eu-west")).await.unwrap().into_inner();
    assert_eq!(echoed.datacenter, "eu-west");

    // A worker of eu-west is no mirror, even in its own datacenter's name.
    let worker = Transport::mtls(&tls_dir(
        &ca,
        dir,
        "eu-west-worker",
        &Identity::new("eu-west", Role::Worker),
    ))
    .unwrap();
    let status = MirrorClient::new(ready(&ps, &Services::ps_server(), &worker).await)
        .tick(tick("eu-west"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // Nor does a client take the server for another: us-east's shard is
    // not ap-southeast's, nor a registry.
    for other in [
        Expect::identity(Identity::new("ap-southeast", Role::ParameterServer)),
        Expect::role(Role::Registry),
    ] {
        let refused = eu_west.connect(&ps, &other).await.unwrap_err();
        let message =
            std::iter::successors(Some(&refused as &dyn std::error::Error), |e| e.source())
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(": ");
        assert!(
            message.contains("the ps of us-east") && message.contains(&other.to_string()),
            "{message}"
        );
    }
}

#[tokio::test]
async fn a_site_cannot_publish_in_another_sites_name() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ca = CertificateAuthority::new("job").unwrap();
    let port = free_port();
    let registry_tls = tls_dir(
        &ca,
        dir,
        "registry",
        &Identity::new("site-a", Role::Registry),
    );
    let _registry = spawn(
        dir,
        "registry",
        &[
            "registry".into(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--tls-dir={}", registry_tls.display()),
        ],
    );
    let site_a = Transport::mtls(&tls_dir(
        &ca,
        dir,
        "site-a",
        &Identity::new("site-a", Role::Site),
    ))
    .unwrap();
    let mut registry = RegistryClient::new(
        ready(
            &format!("http://127.0.0.1:{port}"),
            &Services::registry_server(),
            &site_a,
        )
        .await,
    );
    let metadata = |site: &str, forwarded: bool| pb::cartel::SiteMetadata {
        site: site.into(),
        address: "http://127.0.0.1:1".into(),
        forwarded,
        ..pb::cartel::SiteMetadata::default()
    };
    for (claim, forwarded) in [("site-b", false), ("site-b", true), ("site-a", true)] {
        let status = registry
            .publish(metadata(claim, forwarded))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }
    registry.publish(metadata("site-a", false)).await.unwrap();
    let sites = registry
        .sites(pb::cartel::SitesRequest {})
        .await
        .unwrap()
        .into_inner()
        .sites;
    assert_eq!(sites.len(), 1, "{sites:?}");
}
