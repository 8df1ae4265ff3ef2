//! Who a role process is, as its TLS certificate says: the one definition
//! that issuing ([`crate::pki`]) and checking (the data plane's TLS layer)
//! share.
//!
//! A role's certificate carries its identity as a URI subject alternative
//! name `geoml://<datacenter>/<role>`, e.g. `geoml://us-east/ps`. A server
//! takes its caller's identity from that name, never from a field of a
//! message. Every certificate also carries the DNS name [`SERVER_NAME`],
//! which clients verify the server against: addresses differ (loopback
//! ports, WAN proxy routes, pod IPs), the name does not.

use std::fmt;

use crate::roles::{ParameterServerArgs, RegistryArgs, SiteArgs, WorkerArgs};

/// The URI scheme of an identity.
pub const SCHEME: &str = "geoml";

/// The DNS name in every role's certificate, which clients check the
/// server's certificate against (`ClientTlsConfig::domain_name`).
pub const SERVER_NAME: &str = "roles.geoml.internal";

/// The kind of process a certificate belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A parameter-server shard (`geoml ps`), which also serves and sends
    /// mirror updates.
    ParameterServer,
    /// A worker (`geoml worker`).
    Worker,
    /// Cartel's registry (`geoml registry`).
    Registry,
    /// A Cartel site (`geoml site`).
    Site,
    /// A launcher reading statuses and results (`geoml run`, the operator).
    Launcher,
}

impl Role {
    /// Every role.
    pub const ALL: [Self; 5] = [
        Self::ParameterServer,
        Self::Worker,
        Self::Registry,
        Self::Site,
        Self::Launcher,
    ];

    /// The role's name in an identity: the `geoml` subcommand that runs it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::ParameterServer => ParameterServerArgs::SUBCOMMAND,
            Self::Worker => WorkerArgs::SUBCOMMAND,
            Self::Registry => RegistryArgs::SUBCOMMAND,
            Self::Site => SiteArgs::SUBCOMMAND,
            Self::Launcher => "launcher",
        }
    }
}

/// A role of a datacenter: what a certificate vouches for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The datacenter (a `Datacenter`'s name).
    pub datacenter: String,
    /// The role.
    pub role: Role,
}

impl Identity {
    /// Role `role` of `datacenter`.
    #[must_use]
    pub fn new(datacenter: impl Into<String>, role: Role) -> Self {
        Self {
            datacenter: datacenter.into(),
            role,
        }
    }

    /// The URI subject alternative name: `geoml://<datacenter>/<role>`.
    #[must_use]
    pub fn uri(&self) -> String {
        format!("{SCHEME}://{}/{}", self.datacenter, self.role.name())
    }

    /// The identity a URI subject alternative name states, if it is one.
    #[must_use]
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(SCHEME)?.strip_prefix("://")?;
        let (datacenter, role) = rest.split_once('/')?;
        let role = Role::ALL.into_iter().find(|r| r.name() == role)?;
        let valid = !datacenter.is_empty()
            && datacenter
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        valid.then(|| Self::new(datacenter, role))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {}", self.role.name(), self.datacenter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_round_trips_through_its_uri() {
        for role in Role::ALL {
            let id = Identity::new("us-east", role);
            assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        }
        assert_eq!(
            Identity::new("eu-west", Role::ParameterServer).uri(),
            "geoml://eu-west/ps"
        );
    }

    #[test]
    fn other_uris_are_no_identity() {
        for uri in [
            "https://us-east/ps",
            "geoml://us-east",
            "geoml:///ps",
            "geoml://us-east/admin",
            "geoml://US_EAST/ps",
            "geoml://us-east/ps/extra",
        ] {
            assert_eq!(Identity::from_uri(uri), None, "{uri}");
        }
    }
}
