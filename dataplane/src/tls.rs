//! Transport security of every gRPC server and client of a role: mutual TLS
//! with the job's CA (the default), or plaintext when the role was told so.
//!
//! A role's TLS directory holds `ca.crt`, `tls.crt` and `tls.key`, as a
//! `kubernetes.io/tls` Secret is mounted ([`geoml_crds::pki`] writes one).
//! Servers require a client certificate of that CA and refuse a handshake
//! without one, or whose certificate carries no geoml identity
//! ([`geoml_crds::identity`]); the identity of an accepted connection is in
//! every request's extensions ([`Peer`], read with [`peer_identity`]).
//! Clients check the server's identity the same way: every dial names the
//! role (and, where it is known, the datacenter) it means to reach
//! ([`Expect`]), and a server whose certificate states another is refused.
//! A role re-reads its certificate and key when the files change, for the
//! connections it accepts and those it makes, so a rotated certificate
//! needs no restart; the CA is read once, at start.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use geoml_crds::identity::{Identity, Role, SERVER_NAME};
use geoml_crds::pki::{CA_FILE, CERT_FILE, KEY_FILE};
use geoml_crds::roles::TlsArgs;
use geoml_proto::frame::ALPN as ROWS_ALPN;
use hyper_util::rt::TokioIo;
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::Uri;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

/// Longest a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of the TLS directory could not be read or parsed.
    #[error("{path}: {reason}")]
    Material {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn material(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Material {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// How a role's gRPC servers and clients talk: mutual TLS or plaintext.
#[derive(Clone, Debug)]
pub enum Transport {
    /// Mutual TLS with the job's CA.
    Mtls(Arc<Mtls>),
    /// No TLS: anyone who reaches a port is served, and peers are who
    /// their messages say.
    Plaintext,
}

/// A role's TLS material, loaded.
#[derive(Debug)]
pub struct Mtls {
    client: Arc<rustls::ClientConfig>,
    /// The same as `client`, negotiating the row transport
    /// ([`geoml_proto::frame::ALPN`]) instead of HTTP/2.
    rows_client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl Mtls {
    fn connector(&self, server: &Expect) -> Connector {
        Connector {
            tls: TlsConnector::from(self.client.clone()),
            server: server.clone(),
        }
    }
}

/// The server a client means to reach. Its certificate must state this
/// role, and this datacenter when one is named: a certificate of the job's
/// CA alone proves nothing more than membership of the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    role: Role,
    datacenter: Option<String>,
}

impl Expect {
    /// A server of `role` in any datacenter of the job.
    #[must_use]
    pub fn role(role: Role) -> Self {
        Self {
            role,
            datacenter: None,
        }
    }

    /// The server `identity` and no other.
    #[must_use]
    pub fn identity(identity: Identity) -> Self {
        Self {
            role: identity.role,
            datacenter: Some(identity.datacenter),
        }
    }

    /// Refuses a server whose certificate states another identity.
    fn check(&self, server: &Identity) -> Result<(), String> {
        let datacenter_matches = self
            .datacenter
            .as_ref()
            .is_none_or(|dc| *dc == server.datacenter);
        if server.role == self.role && datacenter_matches {
            Ok(())
        } else {
            Err(format!(
                "the server's certificate is the {server}, but this client dials {self}"
            ))
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.datacenter {
            Some(dc) => write!(f, "the {} of {dc}", self.role.name()),
            None => write!(f, "a {}", self.role.name()),
        }
    }
}

/// Dials TCP (with `TCP_NODELAY`) and runs the client side of a TLS
/// handshake over it, then checks that the server is the one expected: the
/// connector of a channel with TLS.
#[derive(Clone)]
struct Connector {
    tls: TlsConnector,
    server: Expect,
}

type Connecting<T> = Pin<Box<dyn Future<Output = std::io::Result<T>> + Send>>;

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let Self { tls, server } = self.clone();
        Box::pin(async move { Ok(TokioIo::new(connect_tls(&tls, &server, &uri).await?)) })
    }
}

/// Dials `uri` over TCP (with `TCP_NODELAY`), runs the client side of a
/// TLS handshake and checks that the server is the one expected.
async fn connect_tls(
    tls: &TlsConnector,
    server: &Expect,
    uri: &Uri,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let error = |kind, what: String| std::io::Error::new(kind, format!("{uri}: {what}"));
    let invalid = |what| error(std::io::ErrorKind::InvalidInput, what);
    let tcp = connect_tcp(uri).await?;
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| invalid(e.to_string()))?;
    let stream = tls.connect(name, tcp).await?;
    let refused = |what| error(std::io::ErrorKind::PermissionDenied, what);
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(<[_]>::first)
        .ok_or_else(|| refused("no server certificate".into()))?;
    server
        .check(&identity(cert).map_err(refused)?)
        .map_err(refused)?;
    Ok(stream)
}

/// Dials `uri` over TCP with `TCP_NODELAY`.
async fn connect_tcp(uri: &Uri) -> std::io::Result<TcpStream> {
    let invalid = |what: &str| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}: {what}"))
    };
    let host = uri.host().ok_or_else(|| invalid("no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().ok_or_else(|| invalid("no port"))?;
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// A connection of the row transport, plaintext or TLS.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| material(path, e))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| material(path, e))?;
    if certs.is_empty() {
        return Err(material(path, "no certificate"));
    }
    Ok(certs)
}

/// The certificate and key at `cert` and `key`, checked to belong together.
fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = certificates(cert)?;
    let der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| material(key, e))?;
    let signer = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| material(key, e))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| material(key, e))?;
    Ok(Arc::new(certified))
}

impl Transport {
    /// The transport a role's `--tls-dir` / `--insecure-plaintext` ask
    /// for; plaintext is logged as a warning, as it must be chosen.
    pub fn from_args(args: &TlsArgs) -> Result<Self, TlsError> {
        if let Some(dir) = args.dir() {
            return Self::mtls(&dir);
        }
        warn!(
            "TLS IS OFF (--insecure-plaintext): this role serves anyone who reaches its ports \
             and believes every peer's declared name"
        );
        Ok(Self::Plaintext)
    }

    /// Mutual TLS with the material in the TLS directory `dir`.
    pub fn mtls(dir: &Path) -> Result<Self, TlsError> {
        let ca_path = dir.join(CA_FILE);
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(&ca_path)? {
            roots.add(cert).map_err(|e| material(&ca_path, e))?;
        }
        let roots = Arc::new(roots);
        let own = Arc::new(ReloadingCert::new(dir.join(CERT_FILE), dir.join(KEY_FILE))?);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(own.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), ROWS_ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_cert_resolver(own);
        let mut rows_client = client.clone();
        client.alpn_protocols = vec![b"h2".to_vec()];
        rows_client.alpn_protocols = vec![ROWS_ALPN.to_vec()];
        Ok(Self::Mtls(Arc::new(Mtls {
            client: Arc::new(client),
            rows_client: Arc::new(rows_client),
            server: Arc::new(server),
        })))
    }

    /// An endpoint for `address` (`http://host:port`), to be configured and
    /// then dialled with [`Self::lazy`] or [`Self::dial`], which add TLS.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, tonic::transport::Error> {
        let authority = address
            .strip_prefix("http://")
            .or_else(|| address.strip_prefix("https://"))
            .unwrap_or(address);
        Endpoint::from_shared(format!("http://{authority}"))
    }

    /// A channel to `endpoint`, the server `server`, that dials at its
    /// first call (and again after a failure). With TLS, every connection
    /// verifies the server against the CA, [`SERVER_NAME`] and `server`, and
    /// presents this role's current certificate.
    #[must_use]
    pub fn lazy(&self, endpoint: &Endpoint, server: &Expect) -> Channel {
        match self {
            Self::Mtls(tls) => endpoint.connect_with_connector_lazy(tls.connector(server)),
            Self::Plaintext => endpoint.connect_lazy(),
        }
    }

    /// A channel to `endpoint`, dialled now (see [`Self::lazy`]).
    pub async fn dial(
        &self,
        endpoint: &Endpoint,
        server: &Expect,
    ) -> Result<Channel, tonic::transport::Error> {
        match self {
            Self::Mtls(tls) => endpoint.connect_with_connector(tls.connector(server)).await,
            Self::Plaintext => endpoint.connect().await,
        }
    }

    /// A connection to `address`, dialled now (see [`Self::lazy`]).
    pub async fn connect(
        &self,
        address: &str,
        server: &Expect,
    ) -> Result<Channel, tonic::transport::Error> {
        self.dial(&self.endpoint(address)?, server).await
    }

    /// A connection of the row transport to `address` (`http://host:port`
    /// or `host:port`), the server `server`, dialled now: TLS negotiating
    /// [`ROWS_ALPN`], verified as [`Self::lazy`] verifies, or plain TCP.
    /// Either way with `TCP_NODELAY`.
    pub async fn connect_rows(
        &self,
        address: &str,
        server: &Expect,
    ) -> std::io::Result<Box<dyn ByteStream>> {
        let authority = address
            .strip_prefix("http://")
            .or_else(|| address.strip_prefix("https://"))
            .unwrap_or(address);
        let uri: Uri = format!("http://{authority}").parse().map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{address}: {e}"))
        })?;
        Ok(match self {
            Self::Mtls(tls) => {
                let connector = TlsConnector::from(tls.rows_client.clone());
                Box::new(connect_tls(&connector, server, &uri).await?)
            }
            Self::Plaintext => Box::new(connect_tcp(&uri).await?),
        })
    }

    /// The connections `listener` accepts, for tonic's
    /// `serve_with_incoming*` (see [`Self::incoming_with_rows`]); those of
    /// the row transport are closed.
    #[must_use]
    pub fn incoming(&self, listener: TcpListener) -> ReceiverStream<std::io::Result<Conn>> {
        self.incoming_with_rows(listener).0
    }

    /// The connections `listener` accepts: gRPC ones for tonic's
    /// `serve_with_incoming*`, and those of the row transport
    /// ([`geoml_proto::frame`]) apart. TLS handshakes run beside the accept
    /// loop, and a failed one (no certificate, another CA, no identity) is
    /// logged and dropped, never handed to a server. Over TLS the
    /// negotiated application protocol tells the two kinds apart, over
    /// plaintext the first byte the client sends. Every connection has
    /// `TCP_NODELAY`: small messages must not wait for Nagle.
    #[must_use]
    pub fn incoming_with_rows(
        &self,
        listener: TcpListener,
    ) -> (ReceiverStream<std::io::Result<Conn>>, mpsc::Receiver<Conn>) {
        let (tx, rx) = mpsc::channel(64);
        let (rows_tx, rows_rx) = mpsc::channel(64);
        let transport = self.clone();
        tokio::spawn(async move {
            loop {
                let (stream, addr) = tokio::select! {
                    () = tx.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            warn!("accepting a connection: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(%addr, "TCP_NODELAY: {e}");
                }
                let (tx, rows_tx) = (tx.clone(), rows_tx.clone());
                let tls = match &transport {
                    Transport::Mtls(tls) => Some(TlsAcceptor::from(tls.server.clone())),
                    Transport::Plaintext => None,
                };
                tokio::spawn(async move {
                    let conn = match tls {
                        None => Conn::Plain(stream),
                        Some(acceptor) => match handshake(&acceptor, stream).await {
                            Ok(conn) => conn,
                            Err(e) => {
                                warn!(%addr, "TLS connection refused: {e}");
                                return;
                            }
                        },
                    };
                    if speaks_rows(&conn).await {
                        let _ = rows_tx.send(conn).await;
                    } else {
                        let _ = tx.send(Ok(conn)).await;
                    }
                });
            }
        });
        (ReceiverStream::new(rx), rows_rx)
    }
}

/// Whether `conn` is of the row transport: over TLS it negotiated
/// [`ROWS_ALPN`]; over plaintext its first byte is that of
/// [`geoml_proto::frame::MAGIC`] (gRPC's is `P`). A client silent for
/// [`HANDSHAKE_TIMEOUT`] is taken for gRPC.
async fn speaks_rows(conn: &Conn) -> bool {
    match conn {
        Conn::Tls(tls, _) => tls.get_ref().1.alpn_protocol() == Some(ROWS_ALPN),
        Conn::Plain(tcp) => {
            let mut first = [0];
            matches!(
                tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await,
                Ok(Ok(1)) if first[0] == geoml_proto::frame::MAGIC[0]
            )
        }
    }
}

/// Completes the server side of a TLS handshake on `stream` and reads the
/// client's identity from its certificate.
async fn handshake(acceptor: &TlsAcceptor, stream: TcpStream) -> Result<Conn, String> {
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(<[_]>::first)
        .ok_or("no client certificate")?;
    let identity = identity(cert)?;
    debug!(%identity, "TLS connection accepted");
    Ok(Conn::Tls(Box::new(tls), identity))
}

/// The geoml identity in a certificate's URI subject alternative names.
pub fn identity(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let names = parsed
        .subject_alternative_name()
        .map_err(|e| format!("certificate: {e}"))?
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default();
    names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Identity::from_uri(uri),
            _ => None,
        })
        .ok_or_else(|| "the certificate names no geoml identity (geoml://DC/ROLE)".into())
}

/// A role's own certificate, served to clients and presented to servers:
/// re-read from its files whenever they change (a rotated Secret), checked
/// on every handshake. A pair that does not load (a half-written rotation)
/// is logged, and the last good one used.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    loaded: Mutex<(Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    fn new(cert: PathBuf, key: PathBuf) -> Result<Self, TlsError> {
        let stamp = Self::stamp(&cert, &key);
        let loaded = certified_key(&cert, &key)?;
        Ok(Self {
            cert,
            key,
            loaded: Mutex::new((stamp, loaded)),
        })
    }

    /// The later modification time of the two files.
    fn stamp(cert: &Path, key: &Path) -> Option<SystemTime> {
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        modified(cert).max(modified(key))
    }
}

impl ReloadingCert {
    /// The certificate to serve now, re-read if its files changed.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stamp = Self::stamp(&self.cert, &self.key);
        if stamp != loaded.0 {
            match certified_key(&self.cert, &self.key) {
                Ok(key) => {
                    info!(cert = %self.cert.display(), "using the renewed certificate");
                    *loaded = (stamp, key);
                }
                Err(e) => warn!("keeping the current certificate: {e}"),
            }
        }
        loaded.1.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for ReloadingCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// An accepted connection.
#[derive(Debug)]
pub enum Conn {
    /// Plaintext.
    Plain(TcpStream),
    /// Mutual TLS, with the client's identity from its certificate.
    Tls(Box<TlsStream<TcpStream>>, Identity),
}

/// Who is on the other end of a request's connection: in every request's
/// extensions on a server fed by [`Transport::incoming`].
#[derive(Clone, Debug)]
pub struct Peer {
    /// The remote address.
    pub addr: Option<SocketAddr>,
    /// The identity its certificate states; `None` over plaintext.
    pub identity: Option<Identity>,
}

/// The identity the caller's certificate states; `None` over plaintext.
#[must_use]
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<&Identity> {
    request
        .extensions()
        .get::<Peer>()
        .and_then(|p| p.identity.as_ref())
}

/// Refuses a message that claims to come from `claimed` unless the
/// caller's certificate says it is: `PermissionDenied`, naming both. Over
/// plaintext there is no certificate, and the claim is believed.
pub fn check_claim<T>(
    request: &tonic::Request<T>,
    claimed: &Identity,
) -> Result<(), tonic::Status> {
    match peer_identity(request) {
        Some(identity) if identity != claimed => {
            let message = format!(
                "the caller's certificate is the {identity}, but the message claims to come \
                 from the {claimed}"
            );
            warn!("message refused: {message}");
            Err(tonic::Status::permission_denied(message))
        }
        _ => Ok(()),
    }
}

impl Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        let (tcp, identity) = match self {
            Self::Plain(tcp) => (tcp, None),
            Self::Tls(tls, identity) => (tls.get_ref().0, Some(identity.clone())),
        };
        Peer {
            addr: tcp.connect_info().remote_addr(),
            identity,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connections of the row transport for tests.
#[cfg(test)]
pub(crate) mod testing {
    use geoml_crds::pki::CertificateAuthority;
    use tokio::io::DuplexStream;

    use super::*;

    /// A directory with `identity`'s certificate and key, signed by `ca`.
    pub(crate) fn tls_dir(ca: &CertificateAuthority, identity: &Identity) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        ca.write_dir(identity, dir.path()).unwrap();
        dir
    }

    /// A worker's and a shard's ends of a row-transport connection with
    /// mTLS, handshake done, over an in-memory pipe that holds `capacity`
    /// bytes each way (a socket buffer as small as wanted).
    pub(crate) async fn rows_pair(
        capacity: usize,
    ) -> (
        tokio_rustls::client::TlsStream<DuplexStream>,
        TlsStream<DuplexStream>,
    ) {
        let ca = CertificateAuthority::new("test").unwrap();
        let dir = |role| tls_dir(&ca, &Identity::new("dc", role));
        let (ps_dir, worker_dir) = (dir(Role::ParameterServer), dir(Role::Worker));
        let (Transport::Mtls(ps), Transport::Mtls(worker)) = (
            Transport::mtls(ps_dir.path()).unwrap(),
            Transport::mtls(worker_dir.path()).unwrap(),
        ) else {
            unreachable!("mtls() makes mutual TLS");
        };
        let (client, server) = tokio::io::duplex(capacity);
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let (client, server) = tokio::join!(
            TlsConnector::from(worker.rows_client.clone()).connect(name, client),
            TlsAcceptor::from(ps.server.clone()).accept(server),
        );
        (client.unwrap(), server.unwrap())
    }
}

#[cfg(test)]
mod tests {
    use geoml_crds::identity::Role;
    use geoml_crds::pki::CertificateAuthority;

    use super::testing::tls_dir;
    use super::*;

    #[test]
    fn the_identity_is_read_from_the_certificate() {
        let ca = CertificateAuthority::new("test").unwrap();
        let identity = Identity::new("eu-west", Role::Site);
        let dir = tls_dir(&ca, &identity);
        let cert = &certificates(&dir.path().join(CERT_FILE)).unwrap()[0];
        assert_eq!(super::identity(cert), Ok(identity));
    }

    #[test]
    fn a_client_accepts_only_the_server_it_expects() {
        let ps = Identity::new("us-east", Role::ParameterServer);
        assert_eq!(Expect::identity(ps.clone()).check(&ps), Ok(()));
        assert_eq!(Expect::role(Role::ParameterServer).check(&ps), Ok(()));
        let other_datacenter = Expect::identity(Identity::new("eu-west", Role::ParameterServer));
        assert_eq!(
            other_datacenter.check(&ps),
            Err(
                "the server's certificate is the ps of us-east, but this client dials \
                 the ps of eu-west"
                    .into()
            )
        );
        let other_role = Expect::role(Role::Registry);
        assert!(
            other_role
                .check(&ps)
                .unwrap_err()
                .ends_with("dials a registry")
        );
    }

    #[test]
    fn a_renewed_certificate_is_served_and_a_broken_one_is_not() {
        let ca = CertificateAuthority::new("test").unwrap();
        let identity = Identity::new("us-east", Role::ParameterServer);
        let dir = tls_dir(&ca, &identity);
        let (cert, key) = (dir.path().join(CERT_FILE), dir.path().join(KEY_FILE));
        let served = ReloadingCert::new(cert.clone(), key.clone()).unwrap();
        let first = served.current().cert[0].clone();
        assert_eq!(served.current().cert[0], first, "nothing changed");

        // The operator rotates the Secret: a new key and certificate.
        std::thread::sleep(Duration::from_millis(20));
        ca.write_dir(&identity, dir.path()).unwrap();
        let renewed = served.current().cert[0].clone();
        assert_ne!(renewed, first, "the renewed certificate is not served");

        // Half a rotation (a new certificate, the old key) keeps the last
        // good pair.
        std::thread::sleep(Duration::from_millis(20));
        let other = tls_dir(&ca, &identity);
        std::fs::copy(other.path().join(CERT_FILE), &cert).unwrap();
        assert_eq!(served.current().cert[0], renewed);
    }

    /// A client presents its renewed certificate on its next connection,
    /// without a restart: the server reads the new identity from it.
    #[tokio::test]
    async fn a_renewed_client_certificate_is_presented_on_the_next_connection() {
        use tokio_stream::StreamExt as _;
        use tower::Service as _;
        let ca = CertificateAuthority::new("test").unwrap();
        let (ps, worker) = (
            Identity::new("eu-west", Role::ParameterServer),
            Identity::new("eu-west", Role::Worker),
        );
        let server_dir = tls_dir(&ca, &Identity::new("us-east", Role::ParameterServer));
        let client_dir = tls_dir(&ca, &ps);
        let server = Transport::mtls(server_dir.path()).unwrap();
        let Transport::Mtls(client) = Transport::mtls(client_dir.path()).unwrap() else {
            unreachable!("mtls() makes mutual TLS");
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let mut incoming = server.incoming(listener);
        let mut connector = client.connector(&Expect::role(Role::ParameterServer));
        for expected in [&ps, &worker] {
            if expected == &worker {
                // The Secret is rotated (here: to another identity, to tell
                // the certificates apart).
                std::thread::sleep(Duration::from_millis(20));
                ca.write_dir(&worker, client_dir.path()).unwrap();
            }
            let _client = connector.call(uri.clone()).await.unwrap();
            match incoming.next().await {
                Some(Ok(Conn::Tls(_, identity))) => assert_eq!(&identity, expected),
                other => panic!("no TLS connection: {other:?}"),
            }
        }
    }
}
