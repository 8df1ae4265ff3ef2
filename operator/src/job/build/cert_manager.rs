//! cert-manager `Certificate`s: with `spec.tls.issuerRef` a role's TLS
//! Secret is written (and renewed) by cert-manager from one of these, not
//! by the operator. Same Secret name, files, subject alternative names and
//! key usages as the operator's own certificates ([`geoml_crds::pki`]).

use std::time::{Duration, UNIX_EPOCH};

use geoml_crds::identity::SERVER_NAME;
use geoml_crds::pki::{CERTIFICATE_LIFETIME, renew_after};
use geoml_crds::training_job::{CERT_MANAGER_GROUP, IssuerRef};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::{JobView, Placement, Role, names};

/// Annotation cert-manager puts on the Secrets it writes: the name of their
/// `Certificate`.
pub const CERTIFICATE_NAME_ANNOTATION: &str = "cert-manager.io/certificate-name";

/// cert-manager's `Certificate` (`cert-manager.io/v1`), namespaced.
#[must_use]
pub fn certificate_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(CERT_MANAGER_GROUP, "v1", "Certificate"),
        "certificates",
    )
}

/// A duration as Go's `time.ParseDuration` reads it.
fn go_duration(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

impl JobView {
    /// The `Certificate` of `role` in datacenter `p`, issued by `issuer`:
    /// cert-manager writes Secret [`names::tls`] with `ca.crt`, `tls.crt`
    /// and `tls.key`, renews it two thirds into its life as the operator
    /// would (with a new key), and labels it like the job's other objects.
    #[must_use]
    pub fn certificate(&self, p: &Placement, role: Role, issuer: &IssuerRef) -> DynamicObject {
        let name = names::tls(&self.job_name(), p.name(), role);
        let mut object = DynamicObject::new(&name, &certificate_resource());
        object.metadata = self.meta(p, name.clone(), &[]);
        let identity = Self::identity(p, role);
        let renew_before = CERTIFICATE_LIFETIME.saturating_sub(
            renew_after(UNIX_EPOCH, CERTIFICATE_LIFETIME)
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        object.data = json!({
            "spec": {
                "secretName": name,
                "secretTemplate": { "labels": self.labels(p) },
                "dnsNames": [SERVER_NAME],
                "uris": [identity.uri()],
                "duration": go_duration(CERTIFICATE_LIFETIME),
                "renewBefore": go_duration(renew_before),
                "privateKey": {
                    "algorithm": "ECDSA",
                    "size": 256,
                    "encoding": "PKCS8",
                    "rotationPolicy": "Always",
                },
                "usages": ["digital signature", "server auth", "client auth"],
                "issuerRef": {
                    "name": issuer.name,
                    "kind": issuer.kind,
                    "group": issuer.group,
                },
            }
        });
        object
    }
}

/// Whether cert-manager has issued `certificate` as it now reads: `Ok` once
/// its `Ready` condition is true for the current generation, otherwise what
/// it says (or that it has said nothing yet).
pub fn certificate_ready(certificate: &DynamicObject) -> Result<(), String> {
    let generation = certificate.metadata.generation;
    let ready = certificate.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready");
    let Some(ready) = ready else {
        return Err("not issued yet".to_owned());
    };
    let text = |key: &str| ready[key].as_str().unwrap_or_default().to_owned();
    let current = match (ready["observedGeneration"].as_i64(), generation) {
        (Some(seen), Some(now)) => seen >= now,
        _ => true,
    };
    if ready["status"] == "True" && current {
        return Ok(());
    }
    if !current {
        return Err("not issued yet for its current spec".to_owned());
    }
    Err(format!("{}: {}", text("reason"), text("message")))
}
