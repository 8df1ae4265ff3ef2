//! mTLS for a job's pods. The job's CA is made on its first reconciliation
//! and kept in Secret `<job>-ca` next to the job; in every datacenter each
//! role has a `kubernetes.io/tls` Secret with the CA and a certificate
//! naming that datacenter and role, which its pods mount. A certificate is
//! renewed (a new key and certificate in the same Secret) two thirds into
//! its life, or when the job's CA did not issue it; the kubelet updates the
//! mounted files and the servers serve the new certificate without a
//! restart.

use std::time::{Duration, SystemTime};

use geoml_crds::pki::{
    CA_FILE, CA_KEY_FILE, CERTIFICATE_LIFETIME, CertificateAuthority, renew_after,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};

use super::build::{self, JobView, names, secret_text};
use super::objects::{apply_object, ensure_namespace};
use crate::Error;
use crate::clusters::{Cluster, Unavailable};

/// Makes sure every available datacenter has a current TLS Secret for each
/// of its roles. Returns how long until the next renewal is due.
pub(super) async fn step(
    view: &JobView,
    clusters: &[Result<Cluster, Unavailable>],
    hub: &Client,
) -> Result<Duration, Error> {
    let ca = job_ca(view, hub).await?;
    let now = SystemTime::now();
    let mut next = now + CERTIFICATE_LIFETIME;
    for (p, cluster) in view.placements.iter().zip(clusters) {
        let Ok(cluster) = cluster else { continue };
        if !p.owned {
            ensure_namespace(&cluster.client, &p.namespace).await?;
        }
        let api = Api::<Secret>::namespaced(cluster.client.clone(), &p.namespace);
        for role in view.roles(p) {
            let name = names::tls(&view.job.name_any(), p.name(), role);
            let existing = api
                .get_opt(&name)
                .await
                .map_err(Error::kube(format!("reading Secret {name}")))?;
            let current = existing.as_ref().and_then(|secret| {
                let renew = build::renewal_due(secret)?;
                (secret_text(secret, CA_FILE)? == ca.pem() && renew > now).then_some(renew)
            });
            let renew = if let Some(renew) = current {
                renew
            } else {
                let issued = ca.issue(&JobView::identity(p, role))?;
                let renew = renew_after(now, CERTIFICATE_LIFETIME);
                let secret = view.tls_secret(p, role, &ca.pem(), &issued, renew);
                apply_object(&cluster.client, &p.namespace, &secret).await?;
                tracing::info!(secret = %name, datacenter = p.name(), "issued a certificate");
                renew
            };
            next = next.min(renew);
        }
    }
    Ok(next.duration_since(now).unwrap_or_default())
}

/// The job's CA: read from its Secret, or made and stored there on the
/// job's first reconciliation.
async fn job_ca(view: &JobView, hub: &Client) -> Result<CertificateAuthority, Error> {
    let namespace = view.job.namespace().unwrap_or_default();
    let api = Api::<Secret>::namespaced(hub.clone(), &namespace);
    let name = names::ca(&view.job.name_any());
    loop {
        let found = api
            .get_opt(&name)
            .await
            .map_err(Error::kube(format!("reading Secret {name}")))?;
        if let Some(secret) = found {
            let (Some(cert), Some(key)) = (
                secret_text(&secret, CA_FILE),
                secret_text(&secret, CA_KEY_FILE),
            ) else {
                return Err(geoml_crds::pki::PkiError::Stored(format!(
                    "Secret {namespace}/{name} lacks {CA_FILE} or {CA_KEY_FILE}"
                ))
                .into());
            };
            return Ok(CertificateAuthority::from_pem(&cert, &key)?);
        }
        let ca =
            CertificateAuthority::new(&format!("geoml job {namespace}/{}", view.job.name_any()))?;
        // Created, never applied over: another reconciliation's CA that got
        // there first wins, and is read back.
        match api
            .create(&PostParams::default(), &view.ca_secret(&ca))
            .await
        {
            Ok(_) => return Ok(ca),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(Error::kube(format!("creating Secret {name}"))(e)),
        }
    }
}
