//! cert-manager's real controller (v1.11, built by `tests/tools/build.sh`
//! from the Go module proxy) against a control plane: its CRDs installed,
//! the controllers an issuer of the CA and self-signed kinds needs running
//! as a process. No webhook: nothing here needs its defaulting.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::{ControlPlane, Error, k8s_bin_dir};

/// The controllers started: certificates, their requests (approved by
/// cert-manager's own approver) and the CA and self-signed issuers.
const CONTROLLERS: &str = "issuers,clusterissuers,certificaterequests-approver,\
certificaterequests-issuer-ca,certificaterequests-issuer-selfsigned,certificates-trigger,\
certificates-issuing,certificates-key-manager,certificates-request-manager,\
certificates-readiness,certificates-revision-manager";

/// Namespace where the controller keeps what `ClusterIssuer`s refer to
/// (a CA issuer's Secret).
pub const CLUSTER_RESOURCE_NAMESPACE: &str = "cert-manager";

/// The `ClusterIssuer` that [`CertManager::install_ca_issuer`] makes.
pub const CA_ISSUER: &str = "geoml-ca";
/// Its CA's Secret, in [`CLUSTER_RESOURCE_NAMESPACE`], and the CA's name.
pub const CA_SECRET: &str = "geoml-root";
/// The CA's subject.
pub const CA_SUBJECT: &str = "CN=geoml test root";

/// A running cert-manager controller; dropping it stops the process.
pub struct CertManager {
    child: Child,
    log: PathBuf,
}

impl CertManager {
    /// Installs cert-manager's CRDs in `plane` (waiting until they are
    /// established), creates [`CLUSTER_RESOURCE_NAMESPACE`] and starts the
    /// controller with `plane`'s admin kubeconfig, logging to
    /// `cert-manager.log` in the plane's directory.
    pub fn start(plane: &ControlPlane) -> Result<Self, Error> {
        let bin = k8s_bin_dir()?;
        let crds = bin.join("cert-manager-crds");
        crate::run(
            plane
                .kubectl()
                .args(["apply", "--server-side", "-f"])
                .arg(&crds),
            None,
        )?;
        crate::run(
            plane.kubectl().args([
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/certificates.cert-manager.io",
                "crd/certificaterequests.cert-manager.io",
                "crd/issuers.cert-manager.io",
                "crd/clusterissuers.cert-manager.io",
            ]),
            None,
        )?;
        crate::run(
            plane
                .kubectl()
                .args(["create", "namespace", CLUSTER_RESOURCE_NAMESPACE]),
            None,
        )?;
        let log = plane.dir().join("cert-manager.log");
        let out = File::create(&log).map_err(Error::io("creating cert-manager.log"))?;
        let err = out
            .try_clone()
            .map_err(Error::io("creating cert-manager.log"))?;
        let child = Command::new(bin.join("cert-manager-controller"))
            .arg("--kubeconfig")
            .arg(plane.kubeconfig())
            .args([
                "--leader-elect=false",
                &format!("--cluster-resource-namespace={CLUSTER_RESOURCE_NAMESPACE}"),
                &format!("--controllers={CONTROLLERS}"),
                "--metrics-listen-address=127.0.0.1:0",
                "--v=2",
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(Error::io("starting cert-manager-controller"))?;
        Ok(Self { child, log })
    }

    /// A CA made by cert-manager itself (a self-signed `ClusterIssuer`
    /// signs it, into Secret [`CA_SECRET`]) and the CA `ClusterIssuer`
    /// [`CA_ISSUER`] that signs with it.
    pub fn install_ca_issuer(plane: &ControlPlane) -> Result<(), Error> {
        let objects = format!(
            r"
apiVersion: cert-manager.io/v1
kind: ClusterIssuer
metadata: {{name: selfsigned}}
spec: {{selfSigned: {{}}}}
---
apiVersion: cert-manager.io/v1
kind: Certificate
metadata: {{name: {CA_SECRET}, namespace: {CLUSTER_RESOURCE_NAMESPACE}}}
spec:
  isCA: true
  commonName: geoml test root
  secretName: {CA_SECRET}
  privateKey: {{algorithm: ECDSA, size: 256}}
  issuerRef: {{name: selfsigned, kind: ClusterIssuer, group: cert-manager.io}}
---
apiVersion: cert-manager.io/v1
kind: ClusterIssuer
metadata: {{name: {CA_ISSUER}}}
spec: {{ca: {{secretName: {CA_SECRET}}}}}
"
        );
        crate::run(plane.kubectl().args(["apply", "-f", "-"]), Some(&objects))?;
        Ok(())
    }

    /// The controller's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        // Best effort: the process may already be gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
