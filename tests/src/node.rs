//! A real Kubernetes node: containerd (with runc and the CNI plugins),
//! kubelet and kube-proxy, inside the node's network namespace and a mount
//! namespace of its own.
//!
//! `ip netns exec` would remount `/sys` and hide the cgroup hierarchies, so a
//! *holder* process enters the network namespace, unshares the mount
//! namespace (propagation `slave`: nothing mounted here reaches the host),
//! mounts a fresh sysfs with the host's cgroups bound into it, and
//! bind-mounts a private directory over every path that two nodes would
//! otherwise share. containerd, kubelet and kube-proxy then join the
//! holder's namespaces with `nsenter`. containerd (and so every shim) runs in
//! cgroup `<node>-runtime`, the pods under cgroup `<node>` (kubelet's
//! `cgroupRoot`); stopping the node kills everything in both and removes
//! them, so nothing outlives a test even when it fails.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::Api;
use tempfile::TempDir;

use crate::control_plane::{Process, in_netns, write_kubeconfig};
use crate::image::{Image, PAUSE_IMAGE};
use crate::network::NodeNetwork;
use crate::{ControlPlane, Error, cgroup, run};

const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Paths every node must have to itself (from the recipe: shared, they
/// mix two nodes' devices, logs, CNI results and shim sockets).
const PRIVATE_PATHS: [&str; 7] = [
    "/var/lib/kubelet/device-plugins",
    "/var/log/containers",
    "/var/log/pods",
    "/var/lib/cni",
    "/run/containerd/s",
    "/run/containerd/runc",
    // The pods' network namespaces.
    "/run/netns",
];

/// Where the CNI plugins are (Debian's `containernetworking-plugins`).
const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// A running node. Dropping it stops its processes, kills its pods and
/// removes its cgroups; its network namespace goes with its [`NodeNetwork`].
pub struct Node {
    name: String,
    socket: PathBuf,
    // Stopped on drop in this order, before `dir` goes.
    kube_proxy: Option<Process>,
    kubelet: Option<Process>,
    containerd: Option<Process>,
    holder: Option<Process>,
    cgroup: String,
    dir: TempDir,
}

impl Node {
    /// Starts a node called `name` in `net`, registered with `plane`, with
    /// `images` (and the pause image) loaded into containerd; returns once
    /// the Node object is `Ready`.
    pub async fn start(
        name: &str,
        net: &NodeNetwork,
        plane: &ControlPlane,
        images: &[Image],
    ) -> Result<Self, Error> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("geoml-node-{name}-"))
            .tempdir()
            .map_err(Error::io("creating the node's directory"))?;
        let d = dir.path();
        let netns = net.netns();
        let cgroup = net.cgroup();
        let mut node = Self {
            name: name.to_owned(),
            socket: d.join("containerd.sock"),
            kube_proxy: None,
            kubelet: None,
            containerd: None,
            holder: None,
            cgroup: cgroup.clone(),
            dir,
        };
        let d = node.dir.path().to_owned();
        write_configs(&d, name, net, plane)?;

        // The holder: mounts, then sleeps; its namespaces are the node's.
        let mut script = format!(
            "set -e\nmkdir -p {d}/sys\nmount -t sysfs sysfs {d}/sys\n\
             mount --rbind /sys/fs/cgroup {d}/sys/fs/cgroup\nmount --move {d}/sys /sys\n",
            d = d.display()
        );
        for path in PRIVATE_PATHS {
            let private = d.join(format!("private{path}"));
            let _ = writeln!(
                script,
                "mkdir -p {private} {path}\nmount --bind {private} {path}",
                private = private.display()
            );
        }
        let _ = writeln!(
            script,
            "touch {}/holder.ready\nexec sleep infinity",
            d.display()
        );
        let mut holder = in_netns(Some(&netns), Path::new("unshare"));
        holder.args(["--mount", "--propagation", "slave", "sh", "-c", &script]);
        let mut holder = Process::spawn("holder", &mut holder, &d)?;
        wait_for(&mut holder, || d.join("holder.ready").exists())?;
        let pid = holder.id();
        node.holder = Some(holder);

        let enter = |script: String| {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--target={pid}"))
                .args(["--net", "--mount", "--", "sh", "-c", &script]);
            cmd
        };
        let runtime_cgroup = cgroup::join_script(&format!("{cgroup}-runtime"));
        let mut containerd = Process::spawn(
            "containerd",
            &mut enter(format!(
                "{runtime_cgroup}\nexec containerd --config {}",
                d.join("containerd.toml").display()
            )),
            &d,
        )?;
        let socket = node.socket.clone();
        wait_for(&mut containerd, || socket.exists())?;
        node.containerd = Some(containerd);

        for image in images {
            node.load(image)?;
        }

        // kubelet's cgroupRoot must exist in every hierarchy.
        cgroup::create(&cgroup);
        let bin = plane.bin();
        node.kubelet = Some(Process::spawn(
            "kubelet",
            &mut enter(format!(
                "exec {} --config={d}/kubelet.yaml --kubeconfig={d}/kubelet.kubeconfig \
                 --root-dir={d}/kubelet --hostname-override={name} --node-ip={ip}",
                bin.join("kubelet").display(),
                d = d.display(),
                ip = net.address(),
            )),
            &d,
        )?);
        node.kube_proxy = Some(Process::spawn(
            "kube-proxy",
            &mut enter(format!(
                "exec {} --config={}/kube-proxy.yaml",
                bin.join("kube-proxy").display(),
                d.display()
            )),
            &d,
        )?);
        node.wait_ready(plane).await?;
        Ok(node)
    }

    /// The node's name (its Node object's).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Directory holding the node's configuration, state and logs.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Imports an image archive into the node's containerd (namespace
    /// `k8s.io`, where kubelet finds it; pods need no pull).
    pub fn load(&self, image: &Image) -> Result<(), Error> {
        run(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.socket)
                .args(["-n", "k8s.io", "images", "import"])
                .arg(&image.archive),
            None,
        )
        .map(drop)
    }

    async fn wait_ready(&mut self, plane: &ControlPlane) -> Result<(), Error> {
        let nodes: Api<NodeObject> = Api::all(plane.client());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(node) = nodes.get(&self.name).await {
                let ready = node
                    .status
                    .and_then(|s| s.conditions)
                    .into_iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                if ready {
                    return Ok(());
                }
            }
            for process in [
                &mut self.kubelet,
                &mut self.containerd,
                &mut self.kube_proxy,
            ]
            .into_iter()
            .flatten()
            {
                if process.exited() {
                    return Err(process.not_ready());
                }
            }
            if Instant::now() > deadline {
                return Err(self.kubelet.as_ref().map_or_else(
                    || Error::Command("kubelet did not start".into()),
                    Process::not_ready,
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kube_proxy = None;
        self.kubelet = None;
        // The pods, then containerd's shims (they outlive containerd).
        cgroup::remove_all(&self.cgroup);
        self.containerd = None;
        self.holder = None;
    }
}

/// Polls `done` until it holds, or fails with `process`'s log if it exits or
/// takes too long.
fn wait_for(process: &mut Process, mut done: impl FnMut() -> bool) -> Result<(), Error> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while !done() {
        if process.exited() || Instant::now() > deadline {
            return Err(process.not_ready());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Writes containerd's, the CNI's, kubelet's and kube-proxy's configuration
/// and the kubelet's kubeconfig into `d`.
#[allow(clippy::too_many_lines)] // four configuration files, written out in full
fn write_configs(
    d: &Path,
    name: &str,
    net: &NodeNetwork,
    plane: &ControlPlane,
) -> Result<(), Error> {
    let write = |file: &str, text: String| {
        let path = d.join(file);
        std::fs::write(&path, text).map_err(Error::io(format!("writing {}", path.display())))
    };
    let p = |path: &Path| path.display().to_string();
    std::fs::create_dir_all(d.join("cni")).map_err(Error::io("creating the CNI directory"))?;
    write(
        "containerd.toml",
        format!(
            r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d}/cni"
"#,
            d = p(d)
        ),
    )?;
    write(
        "cni/10-geoml.conflist",
        format!(
            r#"{{"cniVersion": "0.4.0", "name": "geoml", "plugins": [
  {{"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{cidr}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}]}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}},
  {{"type": "loopback"}}
]}}
"#,
            cidr = net.pod_cidr()
        ),
    )?;
    let pki = plane.pki();
    let (cert, key) = pki.client("kubelet", &format!("system:node:{name}"), "system:nodes")?;
    let server = format!("https://{}:6443", net.address());
    write_kubeconfig(
        &d.join("kubelet.kubeconfig"),
        name,
        &server,
        &pki.ca_cert,
        &cert,
        &key,
    )?;
    write(
        "kubelet.yaml",
        format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://{d}/containerd.sock
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
podLogsDir: {d}/pod-logs
address: {ip}
readOnlyPort: 0
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
failSwapOn: false
resolvConf: \"\"
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
",
            d = p(d),
            cgroup = net.cgroup(),
            ip = net.address(),
            ca = p(&pki.ca_cert),
        ),
    )?;
    write(
        "kube-proxy.yaml",
        format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {kubeconfig}}}
mode: iptables
hostnameOverride: {name}
clusterCIDR: {cidr}
conntrack: {{maxPerCore: 0}}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
",
            kubeconfig = p(plane.kubeconfig()),
            cidr = net.pod_cidr(),
        ),
    )
}
