//! The test bed's network: a router namespace and one network namespace per
//! node, so that several clusters run side by side, each with its own ports,
//! iptables and pod network, and reach each other's NodePorts through the
//! router.
//!
//! ```text
//!  host ── veth 10.S.0.2/30 ── router ── veth 10.S.N.1/24 ── node N: eth0 10.S.N.2/24
//!                                                              pods 10.244.N.0/24 (bridge cni0)
//! ```
//!
//! `S` is `200 + slot`: each process that builds a network takes a free slot
//! (a lock file), so networks of concurrent test processes never share names
//! or addresses. The host routes `10.S.0.0/16` to the router and never
//! forwards; the router has no default route, so nothing leaves the machine.
//! Dropping the [`Network`] deletes the namespaces and the host's veth.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, Weak};

use crate::Error;
use crate::run;

/// Slots a machine offers (10.200/16 … 10.215/16).
const SLOTS: u8 = 16;

/// The router namespace and the host's route to it; shared by every node of
/// this process (see [`Network::shared`]).
pub struct Network {
    slot: u8,
    nodes: Mutex<Vec<bool>>,
    // Held for the network's lifetime: another process's network uses another slot.
    _lock: File,
}

impl Network {
    /// The network of this process, created on first use and deleted when
    /// the last node that uses it is dropped.
    pub fn shared() -> Result<Arc<Self>, Error> {
        static SHARED: Mutex<Weak<Network>> = Mutex::new(Weak::new());
        let mut shared = SHARED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(network) = shared.upgrade() {
            return Ok(network);
        }
        let network = Arc::new(Self::create()?);
        *shared = Arc::downgrade(&network);
        Ok(network)
    }

    fn create() -> Result<Self, Error> {
        let locks = Path::new("/run/geoml");
        std::fs::create_dir_all(locks).map_err(Error::io("creating /run/geoml"))?;
        for slot in 0..SLOTS {
            let path = locks.join(format!("network-{slot}.lock"));
            let lock =
                File::create(&path).map_err(Error::io(format!("creating {}", path.display())))?;
            if lock.try_lock().is_err() {
                continue;
            }
            let network = Self {
                slot,
                nodes: Mutex::new(Vec::new()),
                _lock: lock,
            };
            // Whatever a process killed before its cleanup left in this slot.
            network.remove();
            network.build()?;
            return Ok(network);
        }
        Err(Error::Command(format!(
            "all {SLOTS} test networks are in use (locks in /run/geoml)"
        )))
    }

    /// Second octet of every address of this network.
    fn octet(&self) -> u8 {
        200 + self.slot
    }

    /// Prefix of every name (namespaces, links, cgroups) of this network.
    #[must_use]
    pub fn prefix(&self) -> String {
        format!("geoml{}", self.slot)
    }

    fn router(&self) -> String {
        format!("{}-router", self.prefix())
    }

    fn build(&self) -> Result<(), Error> {
        let router = self.router();
        let host_link = format!("{}-host", self.prefix());
        let router_link = format!("{}-up", self.prefix());
        let o = self.octet();
        ip(&["netns", "add", &router])?;
        ip(&[
            "link",
            "add",
            &host_link,
            "type",
            "veth",
            "peer",
            "name",
            &router_link,
            "netns",
            &router,
        ])?;
        ip(&["addr", "add", &format!("10.{o}.0.2/30"), "dev", &host_link])?;
        ip(&["link", "set", &host_link, "up"])?;
        ip(&[
            "-n",
            &router,
            "addr",
            "add",
            &format!("10.{o}.0.1/30"),
            "dev",
            &router_link,
        ])?;
        ip(&["-n", &router, "link", "set", &router_link, "up"])?;
        ip(&["-n", &router, "link", "set", "lo", "up"])?;
        sysctl(&router, "net.ipv4.ip_forward=1")?;
        ip(&[
            "route",
            "add",
            &format!("10.{o}.0.0/16"),
            "via",
            &format!("10.{o}.0.1"),
        ])?;
        Ok(())
    }

    /// Takes the next node number and builds its namespace, wired to the
    /// router.
    pub fn add_node(self: &Arc<Self>) -> Result<NodeNetwork, Error> {
        let index = {
            let mut nodes = self
                .nodes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let free = nodes.iter().position(|used| !used);
            let i = free.unwrap_or(nodes.len());
            if i == nodes.len() {
                nodes.push(true);
            } else {
                nodes[i] = true;
            }
            u8::try_from(i + 1).map_err(|_| Error::Command("too many nodes".into()))?
        };
        let node = NodeNetwork {
            network: self.clone(),
            index,
        };
        node.build()?;
        Ok(node)
    }

    /// Deletes the namespaces, links and route of this slot; silent about
    /// what is already gone.
    fn remove(&self) {
        let prefix = self.prefix();
        if let Ok(out) = run(Command::new("ip").args(["netns", "list"]), None) {
            for name in out.lines().filter_map(|l| l.split_whitespace().next()) {
                if name.starts_with(&format!("{prefix}-")) {
                    let _ = ip(&["netns", "delete", name]);
                }
            }
        }
        let _ = ip(&["link", "delete", &format!("{prefix}-host")]);
        crate::cgroup::remove_all(&prefix);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.remove();
    }
}

/// One node's namespace: `eth0` at `10.S.N.2/24`, default route to the router.
pub struct NodeNetwork {
    network: Arc<Network>,
    index: u8,
}

impl NodeNetwork {
    /// Name of the network namespace (`/run/netns/<name>`).
    #[must_use]
    pub fn netns(&self) -> String {
        format!("{}-node{}", self.network.prefix(), self.index)
    }

    /// The node's address: where its apiserver, kubelet and NodePorts listen.
    #[must_use]
    pub fn address(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.network.octet(), self.index, 2)
    }

    /// The node's pod network.
    #[must_use]
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }

    /// Name of the node's cgroups (under every hierarchy's root).
    #[must_use]
    pub fn cgroup(&self) -> String {
        self.netns()
    }

    fn build(&self) -> Result<(), Error> {
        let ns = self.netns();
        let router = self.network.router();
        let link = format!("{}-n{}", self.network.prefix(), self.index);
        let o = self.network.octet();
        let n = self.index;
        let _ = ip(&["netns", "delete", &ns]);
        ip(&["netns", "add", &ns])?;
        ip(&[
            "-n", &router, "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns",
            &ns,
        ])?;
        ip(&[
            "-n",
            &router,
            "addr",
            "add",
            &format!("10.{o}.{n}.1/24"),
            "dev",
            &link,
        ])?;
        ip(&["-n", &router, "link", "set", &link, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.{o}.{n}.2/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.{o}.{n}.1"),
        ])?;
        sysctl(&ns, "net.ipv4.ip_forward=1")?;
        // Bridged pod traffic must pass iptables, or a pod's reply to a pod
        // that reached it through a Service skips the reverse NAT.
        let _ = sysctl(&ns, "net.bridge.bridge-nf-call-iptables=1");
        Ok(())
    }
}

impl Drop for NodeNetwork {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.netns()]);
        crate::cgroup::remove_all(&self.cgroup());
        let mut nodes = self
            .network
            .nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(used) = nodes.get_mut(usize::from(self.index - 1)) {
            *used = false;
        }
    }
}

fn ip(args: &[&str]) -> Result<(), Error> {
    run(Command::new("ip").args(args), None).map(drop)
}

fn sysctl(netns: &str, setting: &str) -> Result<(), Error> {
    run(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["sysctl", "-q", "-w", setting]),
        None,
    )
    .map(drop)
}
