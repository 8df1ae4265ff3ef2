//! A job's mTLS material as Secrets: its CA, next to the job, and per
//! datacenter one `kubernetes.io/tls` Secret per role (the CA, and a
//! certificate naming the datacenter and the role), which the role's pods
//! mount at [`DEFAULT_TLS_DIR`](geoml_crds::roles::DEFAULT_TLS_DIR).

use std::collections::BTreeMap;
use std::time::SystemTime;

use geoml_crds::identity::Identity;
use geoml_crds::pki::{
    CA_FILE, CA_KEY_FILE, CERT_FILE, CertificateAuthority, IssuedCertificate, KEY_FILE,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::{JOB_LABEL, JOB_NAMESPACE_LABEL, JobView, MANAGED_BY, MANAGER, Placement, Role, names};

/// Annotation on a role's TLS Secret: when the operator renews its
/// certificate (RFC 3339).
pub const RENEW_AFTER_ANNOTATION: &str = "geoml.io/renew-after";

impl JobView {
    /// The roles whose pods run in datacenter `p`, each with its TLS Secret.
    #[must_use]
    pub fn roles(&self, p: &Placement) -> Vec<Role> {
        if !self.collaborative() {
            return vec![Role::ParameterServer, Role::Worker];
        }
        let first = self
            .placements
            .first()
            .is_some_and(|f| f.name() == p.name());
        let mut roles = vec![Role::Site];
        if first {
            roles.push(Role::Registry);
        }
        roles
    }

    /// Who `role`'s pods in datacenter `p` are, as their certificate says.
    #[must_use]
    pub fn identity(p: &Placement, role: Role) -> Identity {
        Identity::new(p.name(), role.identity_role())
    }

    /// Secret `<job>-ca`: the job's CA certificate and key, in the job's
    /// namespace and owned by the job (deleted with it).
    #[must_use]
    pub fn ca_secret(&self, ca: &CertificateAuthority) -> Secret {
        let job = self.job_name();
        let labels = BTreeMap::from([
            (MANAGED_BY.to_owned(), MANAGER.to_owned()),
            (JOB_LABEL.to_owned(), job.clone()),
            (
                JOB_NAMESPACE_LABEL.to_owned(),
                self.job.namespace().unwrap_or_default(),
            ),
        ]);
        Secret {
            metadata: ObjectMeta {
                name: Some(names::ca(&job)),
                namespace: self.job.namespace(),
                labels: Some(labels),
                owner_references: self.owner_reference(),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(data([(CA_FILE, ca.pem()), (CA_KEY_FILE, ca.key_pem())])),
            ..Secret::default()
        }
    }

    /// The TLS Secret of `role` in datacenter `p`: the CA (`ca_pem`), the
    /// role's certificate and key, and when to renew them.
    #[must_use]
    pub fn tls_secret(
        &self,
        p: &Placement,
        role: Role,
        ca_pem: &str,
        issued: &IssuedCertificate,
        renew_after: SystemTime,
    ) -> Secret {
        let mut metadata = self.meta(p, names::tls(&self.job_name(), p.name(), role), &[]);
        let renew = Timestamp::try_from(renew_after).unwrap_or(Timestamp::MAX);
        metadata.annotations = Some(BTreeMap::from([(
            RENEW_AFTER_ANNOTATION.to_owned(),
            renew.to_string(),
        )]));
        Secret {
            metadata,
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(data([
                (CA_FILE, ca_pem.to_owned()),
                (CERT_FILE, issued.cert_pem.clone()),
                (KEY_FILE, issued.key_pem.clone()),
            ])),
            ..Secret::default()
        }
    }
}

fn data<const N: usize>(entries: [(&str, String); N]) -> BTreeMap<String, ByteString> {
    entries
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.into_bytes())))
        .collect()
}

/// A Secret's entry `key` as text.
#[must_use]
pub fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// When the certificate in a role's TLS Secret is due for renewal (`None`:
/// unknown, so now).
#[must_use]
pub fn renewal_due(secret: &Secret) -> Option<SystemTime> {
    let stamp: Timestamp = secret
        .annotations()
        .get(RENEW_AFTER_ANNOTATION)?
        .parse()
        .ok()?;
    Some(SystemTime::from(stamp))
}
