//! Certificates and keys of a throwaway control plane: a CA, the apiserver's
//! serving certificate, an admin client certificate, the service-account
//! signing key and, for clusters with a node, the client certificates of the
//! apiserver (to its kubelet) and of the kubelet.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::Error;

/// Paths of the PEM files written by [`write`], and the CA that signed them.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

/// Generates all certificates and keys and writes them under `dir`; the
/// apiserver's serving certificate also names `extra_sans` (a node's address,
/// the `kubernetes` Service's cluster IP).
pub fn write(dir: &Path, extra_sans: &[String]) -> Result<Pki, Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "geoml-test-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate()?;
    let mut sans = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ];
    sans.extend(extra_sans.iter().cloned());
    let mut server = CertificateParams::new(sans)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer)?;

    // system:masters is bound to cluster-admin by the apiserver's bootstrap RBAC.
    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::default();
    admin
        .distinguished_name
        .push(DnType::CommonName, "geoml-admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &issuer)?;

    let service_account = KeyPair::generate()?;

    let pki = Pki {
        issuer,
        dir: dir.to_owned(),
        ca_cert: dir.join("ca.crt"),
        server_cert: dir.join("apiserver.crt"),
        server_key: dir.join("apiserver.key"),
        admin_cert: dir.join("admin.crt"),
        admin_key: dir.join("admin.key"),
        service_account_key: dir.join("sa.key"),
        service_account_pub: dir.join("sa.pub"),
    };
    for (path, pem) in [
        (&pki.ca_cert, ca_cert.pem()),
        (&pki.server_cert, server_cert.pem()),
        (&pki.server_key, server_key.serialize_pem()),
        (&pki.admin_cert, admin_cert.pem()),
        (&pki.admin_key, admin_key.serialize_pem()),
        (&pki.service_account_key, service_account.serialize_pem()),
        (&pki.service_account_pub, service_account.public_key_pem()),
    ] {
        std::fs::write(path, pem).map_err(Error::io(format!("writing {}", path.display())))?;
    }
    Ok(pki)
}

impl Pki {
    /// Writes a client certificate for user `user` in `group`, signed by the
    /// CA, as `<file>.crt` and `<file>.key`, and returns their paths.
    pub fn client(&self, file: &str, user: &str, group: &str) -> Result<(PathBuf, PathBuf), Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, user);
        params
            .distinguished_name
            .push(DnType::OrganizationName, group);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        let paths = (
            self.dir.join(format!("{file}.crt")),
            self.dir.join(format!("{file}.key")),
        );
        for (path, pem) in [(&paths.0, cert.pem()), (&paths.1, key.serialize_pem())] {
            std::fs::write(path, pem).map_err(Error::io(format!("writing {}", path.display())))?;
        }
        Ok(paths)
    }
}
