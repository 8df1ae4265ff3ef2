//! One Kubernetes control plane: etcd and kube-apiserver as real processes,
//! with RBAC on and client-certificate authentication, on the host's
//! loopback or, for a cluster with a node, inside the node's network
//! namespace together with kube-controller-manager and kube-scheduler.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use tempfile::TempDir;

use crate::network::NodeNetwork;
use crate::{Error, k8s_bin_dir, pki};

const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Audits requests made by ServiceAccounts only (an operator under test),
/// at the Metadata level: enough to find every forbidden request.
pub const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: [\"system:serviceaccounts\"]
- level: None
";

/// A running etcd + kube-apiserver pair. Several can run at once (one per
/// emulated datacenter cluster); dropping it stops both and deletes their data.
pub struct ControlPlane {
    client: kube::Client,
    server: String,
    kubeconfig: PathBuf,
    bin: PathBuf,
    apiserver_args: Vec<String>,
    pki: pki::Pki,
    netns: Option<String>,
    // Stopped on drop, in this order, before `dir` and its files go. The
    // apiserver is None while stopped by `stop_apiserver`.
    _controllers: Vec<Process>,
    apiserver: Option<Process>,
    etcd: Process,
    dir: TempDir,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver on the host's loopback and waits until
    /// the apiserver's `/readyz` answers `ok`. `name` labels the kubeconfig
    /// context and logs.
    pub async fn start(name: &str) -> Result<Self, Error> {
        Self::start_on(name, None).await
    }

    /// Starts a control plane; with `node`, inside that node's network
    /// namespace (listening on the node's address, port 6443), with
    /// kube-controller-manager and kube-scheduler, ServiceAccount tokens and
    /// the Node authorizer, ready for a kubelet.
    pub async fn start_on(name: &str, node: Option<&NodeNetwork>) -> Result<Self, Error> {
        let bin = k8s_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("geoml-{name}-"))
            .tempdir()
            .map_err(Error::io("creating the control plane's directory"))?;
        let address = node.map_or_else(|| "127.0.0.1".to_owned(), |n| n.address().to_string());
        let sans = match node {
            Some(n) => vec![n.address().to_string(), KUBERNETES_SERVICE_IP.to_owned()],
            None => Vec::new(),
        };
        let pki = pki::write(dir.path(), &sans)?;
        let audit_policy = dir.path().join("audit-policy.yaml");
        std::fs::write(&audit_policy, AUDIT_POLICY)
            .map_err(Error::io("writing the audit policy"))?;
        // Inside a node's namespace the ports are the node's own.
        let [etcd_client, etcd_peer, secure] = if node.is_some() {
            [2379, 2380, 6443]
        } else {
            free_ports()?
        };
        let netns = node.map(NodeNetwork::netns);
        let command = |binary: &str| in_netns(netns.as_deref(), &bin.join(binary));

        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let mut etcd = Process::spawn(
            "etcd",
            command("etcd").args([
                "--name=default".to_owned(),
                format!("--data-dir={}", dir.path().join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync".to_owned(),
                "--log-level=warn".to_owned(),
            ]),
            dir.path(),
        )?;
        if node.is_none() {
            etcd.wait_for_port(etcd_client)?;
        }

        let apiserver_args = apiserver_args(
            &etcd_url,
            &address,
            secure,
            dir.path(),
            &pki,
            node.is_some(),
        )?;
        let mut apiserver = Process::spawn(
            "kube-apiserver",
            command("kube-apiserver").args(&apiserver_args),
            dir.path(),
        )?;

        let server = format!("https://{address}:{secure}");
        let kubeconfig = dir.path().join("admin.kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            name,
            &server,
            &pki.ca_cert,
            &pki.admin_cert,
            &pki.admin_key,
        )?;
        let client = client_for(&kubeconfig).await?;
        wait_ready(&client, &mut apiserver, &mut etcd).await?;

        let controllers = if node.is_some() {
            start_controllers(&command, &kubeconfig, &pki, dir.path())?
        } else {
            Vec::new()
        };
        Ok(Self {
            client,
            server,
            kubeconfig,
            bin,
            apiserver_args,
            pki,
            netns,
            _controllers: controllers,
            apiserver: Some(apiserver),
            etcd,
            dir,
        })
    }

    /// Stops kube-apiserver (etcd and the data stay), as when a datacenter's
    /// cluster becomes unreachable.
    pub fn stop_apiserver(&mut self) {
        self.apiserver = None;
    }

    /// Starts kube-apiserver again on the same port and data after
    /// [`Self::stop_apiserver`], and waits until it is ready.
    pub async fn restart_apiserver(&mut self) -> Result<(), Error> {
        self.apiserver = None;
        let mut apiserver = Process::spawn(
            "kube-apiserver",
            in_netns(self.netns.as_deref(), &self.bin.join("kube-apiserver"))
                .args(&self.apiserver_args),
            self.dir.path(),
        )?;
        wait_ready(&self.client, &mut apiserver, &mut self.etcd).await?;
        self.apiserver = Some(apiserver);
        Ok(())
    }

    /// The certificates and keys of this control plane.
    pub(crate) fn pki(&self) -> &pki::Pki {
        &self.pki
    }

    /// The directory of the Kubernetes binaries.
    pub(crate) fn bin(&self) -> &Path {
        &self.bin
    }

    /// A client authenticated as a cluster admin (`system:masters`).
    #[must_use]
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The apiserver's URL, `https://127.0.0.1:PORT`.
    #[must_use]
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Path of an admin kubeconfig with the credentials embedded.
    #[must_use]
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Directory holding the control plane's data, certificates and logs.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The audit log: one JSON event per request made by a ServiceAccount
    /// (see [`AUDIT_POLICY`]), with its verb, resource and response code.
    #[must_use]
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// Namespace `namespace` with the chart's ServiceAccount and RBAC in
    /// it, and an hour's bearer token of that ServiceAccount: the
    /// operator's identity under the chart's rules and nothing else.
    pub fn chart_operator_token(&self, namespace: &str) -> Result<String, Error> {
        let kubectl =
            |args: &[&str], stdin: Option<&str>| crate::run(self.kubectl().args(args), stdin);
        kubectl(&["create", "namespace", namespace], None)?;
        let rbac = crate::Helm::new()?.rbac(namespace)?;
        kubectl(&["apply", "-f", "-"], Some(&rbac))?;
        let token = kubectl(
            &[
                "create",
                "token",
                "geoml-operator",
                "-n",
                namespace,
                "--duration=1h",
            ],
            None,
        )?;
        Ok(token.trim().to_owned())
    }

    /// Requests the apiserver answered 403, from its audit log: user, verb
    /// and URI of each.
    #[must_use]
    pub fn forbidden_requests(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.audit_log()).unwrap_or_default();
        log.lines()
            // A line still being written does not parse yet.
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["responseStatus"]["code"] == 403)
            .map(|event| {
                format!(
                    "{} {} {}",
                    event["user"]["username"], event["verb"], event["requestURI"]
                )
            })
            .collect()
    }

    /// Installs the geoml CRDs with server-side apply and waits until each is
    /// `Established`.
    pub async fn install_crds(&self) -> Result<(), Error> {
        let api: Api<CustomResourceDefinition> = Api::all(self.client());
        for crd in geoml_crds::crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(
                &name,
                &PatchParams::apply("geoml-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .map_err(|e| Error::Client(format!("applying CRD {name}: {e}")))?;
            let established = await_condition(api.clone(), &name, conditions::is_crd_established());
            tokio::time::timeout(READY_TIMEOUT, established)
                .await
                .map_err(|_| Error::Client(format!("CRD {name} not Established in time")))?
                .map_err(|e| Error::Client(format!("watching CRD {name}: {e}")))?;
        }
        Ok(())
    }

    /// The real `kubectl`, pointed at this control plane.
    #[must_use]
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }
}

/// kube-apiserver's arguments; `with_node` adds what a kubelet needs (the
/// Node authorizer, a client certificate for the kubelet API) and keeps the
/// ServiceAccount admission plugin, whose tokens the controller-manager signs.
fn apiserver_args(
    etcd_url: &str,
    address: &str,
    secure: u16,
    dir: &Path,
    pki: &pki::Pki,
    with_node: bool,
) -> Result<Vec<String>, Error> {
    let path = |p: &Path| p.display().to_string();
    let audit_policy = dir.join("audit-policy.yaml");
    let mut args = vec![
        format!("--etcd-servers={etcd_url}"),
        format!("--advertise-address={address}"),
        format!("--secure-port={secure}"),
        format!("--cert-dir={}", dir.join("certs").display()),
        format!("--tls-cert-file={}", path(&pki.server_cert)),
        format!("--tls-private-key-file={}", path(&pki.server_key)),
        format!("--client-ca-file={}", path(&pki.ca_cert)),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
        format!(
            "--service-account-key-file={}",
            path(&pki.service_account_pub)
        ),
        format!(
            "--service-account-signing-key-file={}",
            path(&pki.service_account_key)
        ),
        "--service-cluster-ip-range=10.96.0.0/16".to_owned(),
        "--allow-privileged=true".to_owned(),
        "--enable-priority-and-fairness=false".to_owned(),
        "--profiling=false".to_owned(),
        format!("--audit-policy-file={}", path(&audit_policy)),
        format!("--audit-log-path={}", path(&dir.join("audit.log"))),
    ];
    if with_node {
        let (cert, key) = pki.client(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            "system:masters",
        )?;
        args.extend([
            "--bind-address=0.0.0.0".to_owned(),
            "--authorization-mode=Node,RBAC".to_owned(),
            format!("--kubelet-client-certificate={}", path(&cert)),
            format!("--kubelet-client-key={}", path(&key)),
            // Else `kubectl logs` resolves the node's name, and times out.
            "--kubelet-preferred-address-types=InternalIP".to_owned(),
        ]);
    } else {
        args.extend([
            "--bind-address=127.0.0.1".to_owned(),
            "--authorization-mode=RBAC".to_owned(),
            // No controller-manager creates namespaces' `default`
            // ServiceAccounts, so pods could never be admitted.
            "--disable-admission-plugins=ServiceAccount".to_owned(),
        ]);
    }
    Ok(args)
}

/// Starts kube-controller-manager (ServiceAccounts and their tokens,
/// EndpointSlices, volume binding, garbage collection) and kube-scheduler.
fn start_controllers(
    command: &dyn Fn(&str) -> Command,
    kubeconfig: &Path,
    pki: &pki::Pki,
    dir: &Path,
) -> Result<Vec<Process>, Error> {
    let path = |p: &Path| p.display().to_string();
    let kubeconfig = format!("--kubeconfig={}", path(kubeconfig));
    Ok(vec![
        Process::spawn(
            "kube-controller-manager",
            command("kube-controller-manager").args([
                kubeconfig.clone(),
                format!(
                    "--service-account-private-key-file={}",
                    path(&pki.service_account_key)
                ),
                format!("--root-ca-file={}", path(&pki.ca_cert)),
                "--use-service-account-credentials=false".to_owned(),
                "--leader-elect=false".to_owned(),
                "--bind-address=127.0.0.1".to_owned(),
            ]),
            dir,
        )?,
        Process::spawn(
            "kube-scheduler",
            command("kube-scheduler").args([
                kubeconfig,
                "--leader-elect=false".to_owned(),
                "--bind-address=127.0.0.1".to_owned(),
            ]),
            dir,
        )?,
    ])
}

/// Cluster IP of the `kubernetes` Service (the first of the Service range).
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

/// A command that runs `binary` in network namespace `netns`, if any
/// (`nsenter` execs it: the child's PID is the binary's).
pub(crate) fn in_netns(netns: Option<&str>, binary: &Path) -> Command {
    match netns {
        None => Command::new(binary),
        Some(ns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(binary);
            cmd
        }
    }
}

/// Waits until the apiserver's `/readyz` answers `ok`, or fails with the log
/// of whichever process died or hung.
async fn wait_ready(
    client: &kube::Client,
    apiserver: &mut Process,
    etcd: &mut Process,
) -> Result<(), Error> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let request = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| Error::Client(e.to_string()))?;
        if matches!(client.request_text(request).await, Ok(body) if body.trim() == "ok") {
            return Ok(());
        }
        if etcd.exited() {
            return Err(etcd.not_ready());
        }
        if Instant::now() > deadline || apiserver.exited() {
            return Err(apiserver.not_ready());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A child process whose output goes to `<dir>/<name>.log`; killed on drop.
pub(crate) struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    pub(crate) fn spawn(name: &'static str, cmd: &mut Command, dir: &Path) -> Result<Self, Error> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).map_err(Error::io(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(Error::io("duplicating a log handle"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(Error::io(format!("starting {name}")))?;
        Ok(Self { name, child, log })
    }

    pub(crate) fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn wait_for_port(&mut self, port: u16) -> Result<(), Error> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || self.exited() {
                return Err(self.not_ready());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The process's PID.
    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn not_ready(&self) -> Error {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        Error::NotReady {
            component: self.name,
            seconds: READY_TIMEOUT.as_secs(),
            log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Best effort: the process may already be gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Free loopback ports, all held open at once so that they are distinct.
fn free_ports<const N: usize>() -> Result<[u16; N], Error> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::io("finding a free port"))?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .map_err(Error::io("reading a port"))?
            .port();
    }
    Ok(ports)
}

/// Writes a kubeconfig for `server` with the CA and the client certificate
/// and key embedded.
pub(crate) fn write_kubeconfig(
    path: &Path,
    name: &str,
    server: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<(), Error> {
    let data = |p: &Path| -> Result<String, Error> {
        let bytes = std::fs::read(p).map_err(Error::io(format!("reading {}", p.display())))?;
        Ok(BASE64.encode(bytes))
    };
    let mut yaml = String::new();
    let _ = write!(
        yaml,
        "apiVersion: v1
kind: Config
clusters:
- name: {name}
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {name}-admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {name}
  context:
    cluster: {name}
    user: {name}-admin
current-context: {name}
",
        ca = data(ca)?,
        cert = data(cert)?,
        key = data(key)?,
    );
    std::fs::write(path, yaml).map_err(Error::io(format!("writing {}", path.display())))
}

/// A client for the kubeconfig at `path`.
pub async fn client_for(path: &Path) -> Result<kube::Client, Error> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| Error::Client(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Client(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| Error::Client(e.to_string()))
}
