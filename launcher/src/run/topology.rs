//! How the processes of a local run reach each other: every datacenter's
//! topology file and the WAN routes between them, from the ports of each
//! datacenter's shards.

use std::net::SocketAddr;

use geoml_crds::Topology;

use super::free_port;
use crate::error::RunError;
use crate::wan::Route;

/// The topology of every datacenter, given the ports of each one's shards,
/// and the WAN routes they need: in the global modes workers reach other
/// datacenters' shards (over the WAN when `over_wan`); in the per-datacenter
/// modes each datacenter's workers use its own shards, and over the WAN each
/// shard reaches its mirrors.
pub(super) fn wire(
    names: &[String],
    ports: &[Vec<u16>],
    global: bool,
    over_wan: bool,
) -> Result<(Vec<Topology>, Vec<Route>), RunError> {
    let direct = |port: u16| format!("http://127.0.0.1:{port}");
    let mut routes = Vec::new();
    let mut route = |from: usize, to: usize, port: u16| -> Result<String, RunError> {
        let listen = free_port()?;
        routes.push(Route {
            from: names[from].clone(),
            to: names[to].clone(),
            listen: SocketAddr::from(([127, 0, 0, 1], listen)),
            target: SocketAddr::from(([127, 0, 0, 1], port)),
        });
        Ok(direct(listen))
    };
    let mut topologies = Vec::new();
    for (d, name) in names.iter().enumerate() {
        let mut topology = Topology {
            datacenter: name.clone(),
            ..Topology::default()
        };
        for (e, shard_ports) in ports.iter().enumerate() {
            for &port in shard_ports {
                if e == d || (global && !over_wan) {
                    topology.parameter_servers.push(direct(port));
                } else if global {
                    topology.parameter_servers.push(route(d, e, port)?);
                }
            }
            if over_wan && !global && e != d {
                let mirrors = shard_ports
                    .iter()
                    .map(|&port| route(d, e, port))
                    .collect::<Result<_, _>>()?;
                topology.mirrors.insert(names[e].clone(), mirrors);
            }
        }
        topologies.push(topology);
    }
    Ok((topologies, routes))
}
