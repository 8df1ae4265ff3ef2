//! A job's certificate authority and the certificates it issues to roles,
//! written in the layout of a Kubernetes `kubernetes.io/tls` Secret mount
//! (`ca.crt`, `tls.crt`, `tls.key`): `geoml run` makes a throwaway one per
//! run, and the operator one per job, kept in a Secret
//! ([`CertificateAuthority::from_pem`]).

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::identity::{Identity, SERVER_NAME};

/// The CA certificate (PEM) in a TLS directory.
pub const CA_FILE: &str = "ca.crt";
/// The role's certificate (PEM) in a TLS directory.
pub const CERT_FILE: &str = "tls.crt";
/// The role's private key (PEM) in a TLS directory.
pub const KEY_FILE: &str = "tls.key";
/// The CA's private key (PEM), in the Secret the operator keeps a job's CA in.
pub const CA_KEY_FILE: &str = "ca.key";

/// How long a role certificate is valid; the operator renews it after two
/// thirds of that ([`renew_after`]).
pub const CERTIFICATE_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long a CA is valid: longer than any job.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Clocks of the machines a certificate is checked on may be this far
/// behind the issuer's.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// When a certificate issued at `issued` for `lifetime` is renewed: once two
/// thirds of its life are over, long before it expires.
#[must_use]
pub fn renew_after(issued: SystemTime, lifetime: Duration) -> SystemTime {
    issued + lifetime * 2 / 3
}

/// What can go wrong issuing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or could not sign.
    #[error("issuing a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    /// A stored CA is incomplete.
    #[error("{0}")]
    Stored(String),
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
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
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
        validity(&mut params, SystemTime::now(), CA_LIFETIME);
        let certified = CertifiedIssuer::self_signed(params.clone(), KeyPair::generate()?)?;
        let cert_pem = certified.pem();
        // The issuer again, owning its key (a `CertifiedIssuer` lends it).
        let key = KeyPair::from_pem(&certified.key().serialize_pem())?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// The CA whose certificate and key [`Self::pem`] and [`Self::key_pem`]
    /// gave.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let issuer = Issuer::from_ca_cert_pem(cert_pem, KeyPair::from_pem(key_pem)?)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// The CA certificate, PEM (a TLS directory's `ca.crt`).
    #[must_use]
    pub fn pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA's private key, PEM: for the operator's Secret only.
    #[must_use]
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A certificate for `identity`, valid from now for
    /// [`CERTIFICATE_LIFETIME`] and good for serving and for calling: its
    /// subject alternative names are the identity's URI and [`SERVER_NAME`].
    pub fn issue(&self, identity: &Identity) -> Result<IssuedCertificate, PkiError> {
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        validity(&mut params, SystemTime::now(), CERTIFICATE_LIFETIME);
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

/// Valid from a little before `now` (clocks differ) for `lifetime`.
fn validity(params: &mut CertificateParams, now: SystemTime, lifetime: Duration) {
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + lifetime).into();
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

    #[test]
    fn a_stored_ca_issues_certificates_named_after_it() {
        use x509_parser::pem::parse_x509_pem;
        let stored = CertificateAuthority::new("job").unwrap();
        let ca = CertificateAuthority::from_pem(&stored.pem(), &stored.key_pem()).unwrap();
        assert_eq!(ca.pem(), stored.pem());
        let issued = ca.issue(&Identity::new("eu-west", Role::Worker)).unwrap();
        let (_, ca_pem) = parse_x509_pem(stored.pem().as_bytes()).unwrap();
        let (_, leaf_pem) = parse_x509_pem(issued.cert_pem.as_bytes()).unwrap();
        let (ca_cert, leaf) = (ca_pem.parse_x509().unwrap(), leaf_pem.parse_x509().unwrap());
        assert_eq!(leaf.issuer(), ca_cert.subject());
        let validity = leaf.validity();
        let life = validity.not_after.timestamp() - validity.not_before.timestamp();
        let expected = (CERTIFICATE_LIFETIME + CLOCK_SKEW).as_secs();
        assert_eq!(u64::try_from(life).unwrap(), expected);
    }
}
