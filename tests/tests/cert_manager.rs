//! `spec.tls.issuerRef` against cert-manager's real controller and a real
//! apiserver: the operator, authenticated as the chart's ServiceAccount and
//! bound only to the chart's RBAC, asks cert-manager for every role's
//! certificate instead of signing them itself; its pods wait until
//! cert-manager has issued them; the Secrets carry the identity the roles
//! check and one CA, the data plane's TLS layer accepts them, and
//! cert-manager renews them in place.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;
use std::time::Duration;

use futures::StreamExt as _;
use geoml_crds::TrainingJob;
use geoml_crds::identity::{Identity, Role, SERVER_NAME};
use geoml_crds::pki::{CA_FILE, CERT_FILE, KEY_FILE};
use geoml_dataplane::tls::{Conn, Expect, Transport};
use geoml_operator::job::build::secret_text;
use geoml_operator::{Operator, Settings};
use geoml_tests::cert_manager::{CA_ISSUER, CA_SECRET, CA_SUBJECT, CLUSTER_RESOURCE_NAMESPACE};
use geoml_tests::{CertManager, ControlPlane, eventually};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

const JOB: &str = "issued";
/// The job's two datacenters, both in this one cluster: `us-east` next to
/// the job, `eu-west` in a namespace of its own.
const DATACENTERS: [(&str, &str); 2] = [("us-east", "ml"), ("eu-west", "ml-eu")];

fn kubectl(plane: &ControlPlane, args: &[&str], stdin: Option<&str>) -> String {
    geoml_tests::run(plane.kubectl().args(args), stdin).unwrap()
}

/// A client of `plane` that authenticates with the bearer token `token`.
async fn token_client(plane: &ControlPlane, token: &str) -> Client {
    let admin: serde_json::Value =
        geoml_crds::yaml::from_str(&std::fs::read_to_string(plane.kubeconfig()).unwrap()).unwrap();
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "hub", "cluster": admin["clusters"][0]["cluster"] }],
        "users": [{ "name": "operator", "user": { "token": token } }],
        "contexts": [{ "name": "operator", "context": { "cluster": "hub", "user": "operator" } }],
        "current-context": "operator",
    });
    let kubeconfig: Kubeconfig = serde_json::from_value(config).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn certificates(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
        "certificates",
    );
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// The job's `Created` condition: status, reason, message.
async fn created(client: &Client) -> Option<(String, String, String)> {
    let job = Api::<TrainingJob>::namespaced(client.clone(), "ml")
        .get_opt(JOB)
        .await
        .unwrap()?;
    let conditions = job.status?.conditions;
    let c = conditions.into_iter().find(|c| c.type_ == "Created")?;
    Some((c.status, c.reason, c.message))
}

/// The URI and DNS subject alternative names and the issuer of PEM
/// certificate `pem`.
fn names(pem: &str) -> (Vec<String>, Vec<String>, String) {
    use x509_parser::extensions::GeneralName;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let sans = cert.subject_alternative_name().unwrap().unwrap();
    let (mut uris, mut dns) = (Vec::new(), Vec::new());
    for name in &sans.value.general_names {
        match name {
            GeneralName::URI(uri) => uris.push((*uri).to_owned()),
            GeneralName::DNSName(name) => dns.push((*name).to_owned()),
            _ => {}
        }
    }
    (uris, dns, cert.issuer().to_string())
}

/// A role's TLS Secret written out as the pod's mount would be.
fn tls_dir(secret: &Secret) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in [CA_FILE, CERT_FILE, KEY_FILE] {
        std::fs::write(dir.path().join(file), secret_text(secret, file).unwrap()).unwrap();
    }
    dir
}

/// The identity the server at `server` reads from the certificate in
/// `client`, after both sides checked each other against their `ca.crt`.
async fn handshake(server: &Path, client: &Path, expect: Identity) -> Identity {
    let server = Transport::mtls(server).unwrap();
    let client = Transport::mtls(client).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let mut incoming = server.incoming(listener);
    let dialling = tokio::spawn(async move {
        let _ = client.connect(&address, &Expect::identity(expect)).await;
    });
    let accepted = tokio::time::timeout(Duration::from_secs(20), incoming.next())
        .await
        .expect("no TLS handshake completed");
    dialling.abort();
    match accepted {
        Some(Ok(Conn::Tls(_, identity))) => identity,
        other => panic!("no TLS connection: {other:?}"),
    }
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one scenario on one control plane
async fn cert_manager_issues_the_certificates_of_a_job_that_names_an_issuer() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let plane = ControlPlane::start("cert-manager").await.unwrap();
    plane.install_crds().await.unwrap();
    let cert_manager = CertManager::start(&plane).unwrap();
    let admin = plane.client();
    let token = plane.chart_operator_token("geoml-system").unwrap();
    kubectl(&plane, &["create", "namespace", "ml"], None);
    let settings = Settings {
        default_image: "geoml:test".into(),
        namespace: "geoml-system".into(),
        probe_interval: Duration::from_secs(1),
        max_backoff: Duration::from_secs(2),
        progress_interval: Duration::from_secs(30),
    };
    let operator = Operator::new(token_client(&plane, &token).await, settings).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(operator.run(async move {
        let _ = stopped.await;
    }));

    // The job names a ClusterIssuer that does not exist yet.
    kubectl(
        &plane,
        &["apply", "--server-side", "-n", "ml", "-f", "-"],
        Some(&format!(
            r"
apiVersion: geoml.io/v1alpha1
kind: Datacenter
metadata: {{name: us-east}}
spec:
  region: us-east-1
  cluster: {{local: {{}}}}
  peerAccess: {{serviceType: ClusterIP}}
---
apiVersion: geoml.io/v1alpha1
kind: Datacenter
metadata: {{name: eu-west}}
spec:
  region: eu-west-1
  cluster: {{local: {{namespace: ml-eu}}}}
  peerAccess: {{serviceType: ClusterIP}}
---
apiVersion: geoml.io/v1alpha1
kind: SyncPolicy
metadata: {{name: gaia}}
spec: {{}}
---
apiVersion: geoml.io/v1alpha1
kind: TrainingJob
metadata: {{name: {JOB}}}
spec:
  model: {{kind: SoftmaxRegression}}
  dataset: {{name: Digits}}
  datacenters: [{{name: us-east}}, {{name: eu-west}}]
  syncPolicyRef: {{name: gaia}}
  tls:
    issuerRef: {{name: {CA_ISSUER}, kind: ClusterIssuer}}
"
        )),
    );

    // Until cert-manager has issued every certificate: a reason, and no pods.
    let message = eventually("Created=False while the issuer is missing", || async {
        match created(&admin).await {
            Some((status, reason, message))
                if status == "False" && reason == "CertificatesPending" =>
            {
                Some(message)
            }
            _ => None,
        }
    })
    .await;
    assert!(
        message.contains("ml/issued-us-east-ps-tls") && message.contains("ClusterIssuer"),
        "{message}"
    );
    for (dc, namespace) in DATACENTERS {
        for role in ["ps", "worker"] {
            let name = format!("{JOB}-{dc}-{role}-tls");
            let cert = eventually(&format!("Certificate {namespace}/{name}"), || async {
                certificates(&admin, namespace)
                    .get_opt(&name)
                    .await
                    .unwrap()
            })
            .await;
            assert_eq!(cert.data["spec"]["secretName"], name.as_str());
            assert_eq!(
                cert.data["spec"]["uris"],
                json!([format!("geoml://{dc}/{role}")])
            );
            assert_eq!(cert.data["spec"]["issuerRef"]["kind"], "ClusterIssuer");
            assert_eq!(cert.labels()["geoml.io/job"], JOB);
            // Next to the job, owned by it; elsewhere, labelled.
            let owners: Vec<String> = cert
                .owner_references()
                .iter()
                .map(|o| format!("{}/{}", o.kind, o.name))
                .collect();
            if namespace == "ml" {
                assert_eq!(owners, [format!("TrainingJob/{JOB}")]);
            } else {
                assert!(owners.is_empty(), "{owners:?}");
            }
        }
    }
    let pods = Api::<Pod>::namespaced(admin.clone(), "ml")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(pods.items.is_empty(), "pods before their certificates");
    let ca_secret = Api::<Secret>::namespaced(admin.clone(), "ml")
        .get_opt(&format!("{JOB}-ca"))
        .await
        .unwrap();
    assert!(ca_secret.is_none(), "the operator made a CA of its own");

    // A CA, made by cert-manager too: a self-signed root and a CA issuer.
    CertManager::install_ca_issuer(&plane).unwrap();
    let root = eventually("the root CA's Secret", || async {
        Api::<Secret>::namespaced(admin.clone(), CLUSTER_RESOURCE_NAMESPACE)
            .get_opt(CA_SECRET)
            .await
            .unwrap()
    })
    .await;
    let root_pem = secret_text(&root, CERT_FILE).unwrap();

    let (reason, message) = geoml_tests::eventually_within(
        Duration::from_secs(120),
        "Created=True once cert-manager issued",
        || async {
            match created(&admin).await {
                Some((status, reason, message)) if status == "True" => Some((reason, message)),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(reason, "ObjectsCreated", "{message}");

    // Every role's Secret: written by cert-manager, the identity the roles
    // check, the server name clients verify, and the one root as ca.crt.
    let mut dirs = Vec::new();
    for (dc, namespace) in DATACENTERS {
        for role in ["ps", "worker"] {
            let name = format!("{JOB}-{dc}-{role}-tls");
            let secret = Api::<Secret>::namespaced(admin.clone(), namespace)
                .get(&name)
                .await
                .unwrap();
            assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
            assert_eq!(
                secret.annotations()["cert-manager.io/issuer-name"],
                CA_ISSUER
            );
            assert_eq!(secret.labels()["geoml.io/datacenter"], dc);
            let (uris, dns, issuer) = names(&secret_text(&secret, CERT_FILE).unwrap());
            assert_eq!(uris, [format!("geoml://{dc}/{role}")]);
            assert_eq!(dns, [SERVER_NAME]);
            assert_eq!(issuer, CA_SUBJECT);
            assert_eq!(secret_text(&secret, CA_FILE).unwrap(), root_pem);
            dirs.push(((dc, role), tls_dir(&secret)));
        }
        let pods = Api::<Pod>::namespaced(admin.clone(), namespace)
            .list(&ListParams::default().labels(&format!("geoml.io/job={JOB}")))
            .await
            .unwrap();
        assert_eq!(pods.items.len(), 2, "a ps and a worker in {dc}");
    }

    // The data plane's mTLS takes them: eu-west's ps dials us-east's, each
    // side checks the other against the issuer's CA, and the server reads
    // the caller's identity from cert-manager's certificate.
    let dir = |dc: &str, role: &str| {
        dirs.iter()
            .find(|((d, r), _)| *d == dc && *r == role)
            .map(|(_, dir)| dir.path().to_owned())
            .unwrap()
    };
    let caller = handshake(
        &dir("us-east", "ps"),
        &dir("eu-west", "ps"),
        Identity::new("us-east", Role::ParameterServer),
    )
    .await;
    assert_eq!(caller, Identity::new("eu-west", Role::ParameterServer));

    // Renewal is cert-manager's: asked to renew (as `cmctl renew` does,
    // through the Issuing condition), it writes a new key and certificate
    // into the same Secret, with the same identity and CA; the roles serve
    // the new files without a restart (the data plane re-reads them).
    let name = format!("{JOB}-us-east-ps-tls");
    let secrets = Api::<Secret>::namespaced(admin.clone(), "ml");
    let before = secrets.get(&name).await.unwrap();
    let cert = certificates(&admin, "ml").get(&name).await.unwrap();
    let mut conditions = cert.data["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    conditions.push(json!({
        "type": "Issuing",
        "status": "True",
        "reason": "ManuallyTriggered",
        "message": "renewal requested by the test",
        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
    }));
    certificates(&admin, "ml")
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "conditions": conditions } })),
        )
        .await
        .unwrap();
    let after = eventually("a renewed certificate in the same Secret", || async {
        let now = secrets.get(&name).await.unwrap();
        (secret_text(&now, CERT_FILE) != secret_text(&before, CERT_FILE)).then_some(now)
    })
    .await;
    assert_ne!(
        secret_text(&after, KEY_FILE),
        secret_text(&before, KEY_FILE),
        "renewed without a new key"
    );
    assert_eq!(secret_text(&after, CA_FILE).unwrap(), root_pem);
    let (uris, _, _) = names(&secret_text(&after, CERT_FILE).unwrap());
    assert_eq!(uris, ["geoml://us-east/ps"]);

    // Deleting the job deletes its Certificates and their Secrets too.
    Api::<TrainingJob>::namespaced(admin.clone(), "ml")
        .delete(JOB, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the job, its Certificates and Secrets gone", || async {
        let job = Api::<TrainingJob>::namespaced(admin.clone(), "ml")
            .get_opt(JOB)
            .await
            .unwrap();
        let mut left = usize::from(job.is_some());
        for (dc, namespace) in DATACENTERS {
            for role in ["ps", "worker"] {
                let name = format!("{JOB}-{dc}-{role}-tls");
                let cert = certificates(&admin, namespace)
                    .get_opt(&name)
                    .await
                    .unwrap();
                let secret = Api::<Secret>::namespaced(admin.clone(), namespace)
                    .get_opt(&name)
                    .await
                    .unwrap();
                left += usize::from(cert.is_some()) + usize::from(secret.is_some());
            }
        }
        (left == 0).then_some(())
    })
    .await;

    let forbidden = plane.forbidden_requests();
    assert!(
        forbidden.is_empty(),
        "requests the chart's RBAC refused: {forbidden:#?}"
    );
    drop(cert_manager);
    let _ = stop.send(());
    running.await.unwrap();
}
