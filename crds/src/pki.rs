//! A job's certificate authority and the certificates it issues to roles,
//! written in the layout of a Kubernetes `kubernetes.io/tls` Secret mount
//! (`ca.crt`, `tls.crt`, `tls.key`): `geoml run` makes a throwaway one per
//! run, and the operator can issue the same per job.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::identity::{Identity, SERVER_NAME};

/// The CA certificate (PEM) in a TLS directory.
pub const CA_FILE: &str = "ca.crt";
/// The role's certificate (PEM) in a TLS directory.
pub const CERT_FILE: &str = "tls.crt";
/// The role's private key (PEM) in a TLS directory.
pub const KEY_FILE: &str = "tls.key";

/// What can go wrong issuing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or could not sign.
    #[error("issuing a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A role's certificate and private key, PEM.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// A certificate authority: a self-signed CA certificate and its key.
pub struct CertificateAuthority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new CA with a fresh key, named `name` (its common name).
    pub fn new(name: &str) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    /// The CA certificate, PEM (a TLS directory's `ca.crt`).
    #[must_use]
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `identity`, good for serving and for calling:
    /// its subject alternative names are the identity's URI and
    /// [`SERVER_NAME`].
    pub fn issue(&self, identity: &Identity) -> Result<IssuedCertificate, PkiError> {
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        params
            .subject_alt_names
            .push(SanType::URI(identity.uri().try_into()?));
        params
            .distinguished_name
            .push(DnType::CommonName, identity.uri());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate for `identity` and writes a TLS directory at
    /// `dir` (created if missing): `ca.crt`, `tls.crt` and `tls.key`, the
    /// key readable by its owner only.
    pub fn write_dir(&self, identity: &Identity, dir: &Path) -> Result<(), PkiError> {
        use std::os::unix::fs::PermissionsExt;
        let issued = self.issue(identity)?;
        let failed = |path: &Path| {
            let path = path.display().to_string();
            move |source| PkiError::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(failed(dir))?;
        let key = dir.join(KEY_FILE);
        std::fs::write(&key, "").map_err(failed(&key))?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .map_err(failed(&key))?;
        for (file, text) in [
            (CA_FILE, self.pem()),
            (CERT_FILE, issued.cert_pem),
            (KEY_FILE, issued.key_pem),
        ] {
            let path = dir.join(file);
            std::fs::write(&path, text).map_err(failed(&path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;

    #[test]
    fn writes_a_tls_directory() {
        let ca = CertificateAuthority::new("test").unwrap();
        let dir = tempfile::tempdir().unwrap();
        ca.write_dir(&Identity::new("us-east", Role::ParameterServer), dir.path())
            .unwrap();
        for file in [CA_FILE, CERT_FILE, KEY_FILE] {
            let text = std::fs::read_to_string(dir.path().join(file)).unwrap();
            assert!(text.starts_with("-----BEGIN "), "{file}: {text}");
        }
    }
}
