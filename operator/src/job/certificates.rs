//! mTLS for a job's pods. The job's CA is made on its first reconciliation
//! and kept in Secret `<job>-ca` next to the job; in every datacenter each
//! role has a `kubernetes.io/tls` Secret with the CA and a certificate
//! naming that datacenter and role, which its pods mount. A certificate is
//! renewed (a new key and certificate in the same Secret) two thirds into
//! its life, or when the job's CA did not issue it; the kubelet updates the
//! mounted files and the servers serve the new certificate without a
//! restart.
//!
//! With `spec.tls.issuerRef` the operator makes no CA: it applies one
//! cert-manager `Certificate` per role and datacenter, cert-manager writes
//! (and renews) the same Secrets, and the job's pods wait until every one
//! is issued and all name the same CA.

use std::time::{Duration, SystemTime};

use geoml_crds::pki::{
    CA_FILE, CA_KEY_FILE, CERTIFICATE_LIFETIME, CertificateAuthority, renew_after,
};
use geoml_crds::training_job::IssuerRef;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};

use super::build::{
    self, CERTIFICATE_NAME_ANNOTATION, JobView, Placement, certificate_ready, certificate_resource,
    names, secret_text,
};
use super::objects::{apply_object, ensure_namespace};
use super::resolve::Blocked;
use crate::Error;
use crate::clusters::{Cluster, Unavailable};

/// How often the operator looks again at Certificates cert-manager has
/// issued (it renews them itself): to report one it no longer keeps ready.
const ISSUED_RECHECK: Duration = Duration::from_secs(600);

/// What the step found.
pub(super) enum Certificates {
    /// Every role's TLS Secret is current; look again after this long.
    Current(Duration),
    /// Some are not (cert-manager has not issued them yet, or they cannot
    /// work together): the job's pods wait, and `Created` says why.
    Pending(Blocked),
}

/// Makes sure every available datacenter has a current TLS Secret for each
/// of its roles: signed by the job's CA, or with `spec.tls.issuerRef` by
/// cert-manager.
#[tracing::instrument(skip_all)]
pub(super) async fn step(
    view: &JobView,
    clusters: &[Result<Cluster, Unavailable>],
    hub: &Client,
) -> Result<Certificates, Error> {
    let issuer = view
        .job
        .spec
        .tls
        .as_ref()
        .and_then(|t| t.issuer_ref.as_ref());
    match issuer {
        Some(issuer) => by_cert_manager(view, clusters, issuer).await,
        None => by_job_ca(view, clusters, hub)
            .await
            .map(Certificates::Current),
    }
}

/// The operator's own certificates. Returns how long until the next
/// renewal is due.
async fn by_job_ca(
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
            let mut existing = api
                .get_opt(&name)
                .await
                .map_err(Error::kube(format!("reading Secret {name}")))?;
            if let Some(certificate) = existing
                .as_ref()
                .and_then(|s| s.annotations().get(CERTIFICATE_NAME_ANNOTATION))
            {
                // The job named an issuer before: cert-manager would keep
                // rewriting the Secret. Its Certificate and Secret go.
                forget_certificate(cluster, &p.namespace, certificate).await?;
                super::objects::delete_ignoring_missing(&api, &name).await?;
                existing = None;
            }
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

/// Deletes Certificate `name` and thereby cert-manager's hold on its Secret.
pub(super) async fn forget_certificate(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
) -> Result<(), Error> {
    let api = Api::<DynamicObject>::namespaced_with(
        cluster.client.clone(),
        namespace,
        &certificate_resource(),
    );
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        // Credentials that may not touch Certificates could not have made
        // one either (the job stayed CertificatesForbidden): nothing to
        // delete, and a job must stay deletable.
        Err(kube::Error::Api(s)) if s.code == 403 => {
            tracing::warn!(namespace, name, message = %s.message, "may not delete Certificate; leaving it");
            Ok(())
        }
        Err(e) => Err(Error::kube(format!(
            "deleting Certificate {namespace}/{name}"
        ))(e)),
    }
}

/// cert-manager's certificates: applies every role's `Certificate` in every
/// available datacenter, and reports them current once cert-manager has
/// issued all of them and their Secrets name one CA.
async fn by_cert_manager(
    view: &JobView,
    clusters: &[Result<Cluster, Unavailable>],
    issuer: &IssuerRef,
) -> Result<Certificates, Error> {
    let mut waiting = Vec::new();
    let mut ready = Vec::new();
    for (p, cluster) in view.placements.iter().zip(clusters) {
        let Ok(cluster) = cluster else { continue };
        if !p.owned {
            ensure_namespace(&cluster.client, &p.namespace).await?;
        }
        let api = Api::<DynamicObject>::namespaced_with(
            cluster.client.clone(),
            &p.namespace,
            &certificate_resource(),
        );
        for role in view.roles(p) {
            let desired = view.certificate(p, role, issuer);
            let name = desired.name_any();
            let applied = match apply_certificate(&api, p, &desired).await? {
                Ok(applied) => applied,
                Err(blocked) => return Ok(Certificates::Pending(blocked)),
            };
            match certificate_ready(&applied) {
                Ok(()) => ready.push((&cluster.client, p, name)),
                Err(why) => waiting.push(format!(
                    "{}/{name} in datacenter {} ({why})",
                    p.namespace,
                    p.name()
                )),
            }
        }
    }
    if !waiting.is_empty() {
        return Ok(Certificates::Pending(Blocked {
            reason: "CertificatesPending",
            message: format!(
                "waiting for cert-manager ({} {}/{}) to issue Certificate {}",
                issuer.kind,
                issuer.group,
                issuer.name,
                waiting.join(", ")
            ),
        }));
    }
    // Roles trust the CA in their own Secret: every datacenter's must be
    // the same one, or mirrors between them fail their handshakes.
    let mut authorities: Vec<(String, String)> = Vec::new();
    for (client, p, name) in ready {
        let secret = Api::<Secret>::namespaced(client.clone(), &p.namespace)
            .get_opt(&name)
            .await
            .map_err(Error::kube(format!("reading Secret {name}")))?;
        let Some(ca) = secret.as_ref().and_then(|s| secret_text(s, CA_FILE)) else {
            return Ok(Certificates::Pending(Blocked {
                reason: "CertificateWithoutCA",
                message: format!(
                    "spec.tls.issuerRef: Secret {}/{name} in datacenter {} has no {CA_FILE}; the issuer must write its CA (cert-manager's CA issuer does)",
                    p.namespace,
                    p.name()
                ),
            }));
        };
        if let Some((first, _)) = authorities.iter().find(|(_, c)| *c != ca) {
            return Ok(Certificates::Pending(Blocked {
                reason: "CertificateAuthoritiesDiffer",
                message: format!(
                    "spec.tls.issuerRef: the issuer signs with another CA in datacenter {} than in datacenter {first}; every datacenter's issuer must sign with the same CA",
                    p.name()
                ),
            }));
        }
        authorities.push((p.name().to_owned(), ca));
    }
    Ok(Certificates::Current(ISSUED_RECHECK))
}

/// Applies Certificate `desired` in datacenter `p`: the object as stored,
/// or why that cluster cannot take it.
async fn apply_certificate(
    api: &Api<DynamicObject>,
    p: &Placement,
    desired: &DynamicObject,
) -> Result<Result<DynamicObject, Blocked>, Error> {
    let name = desired.name_any();
    let params = PatchParams::apply(build::MANAGER).force();
    match api.patch(&name, &params, &Patch::Apply(desired)).await {
        Ok(applied) => Ok(Ok(applied)),
        // No such resource: cert-manager's CRDs are not installed.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Err(Blocked {
            reason: "CertManagerMissing",
            message: format!(
                "spec.tls.issuerRef: datacenter {}'s cluster has no cert-manager Certificate resource (cert-manager.io/v1); install cert-manager there",
                p.name()
            ),
        })),
        // The datacenter's credentials may not manage Certificates.
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(Err(Blocked {
            reason: "CertificatesForbidden",
            message: format!(
                "spec.tls.issuerRef: datacenter {}'s cluster refuses the operator Certificates (cert-manager.io) in namespace {}: {}; grant it the chart's rules for certificates",
                p.name(),
                p.namespace,
                s.message
            ),
        })),
        Err(e) => Err(Error::kube(format!(
            "applying Certificate {}/{name}",
            p.namespace
        ))(e)),
    }
}
