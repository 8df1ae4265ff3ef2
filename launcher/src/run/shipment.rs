//! The `centralized` mode's cost of moving things: every datacenter's
//! training examples shipped to the first over the emulated WAN, and the
//! trained model back, measured on real links.

use std::net::SocketAddr;

use geoml_crds::manifest::ResolvedJob;
use geoml_dataplane::data::Examples;
use kube::ResourceExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::wan_proxy::Wan;
use super::{Processes, free_port};
use crate::error::{RunError, io};
use crate::report::LinkBytes;
use crate::wan::Route;

/// Ships every datacenter's training examples to the first datacenter over
/// the emulated WAN, and the trained model back: the `centralized` mode's
/// cost of moving things, measured on real links.
pub(super) struct Shipment {
    wan: Wan,
    /// Route addresses from each datacenter to the first, and back.
    inbound: Vec<SocketAddr>,
    pub(super) outbound: Vec<SocketAddr>,
    sink: tokio::task::JoinHandle<()>,
}

impl Shipment {
    pub(super) async fn start(
        processes: &Processes,
        job: &ResolvedJob<'_>,
    ) -> Result<Self, RunError> {
        let sink = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(io("listening for shipped data"))?;
        let target = sink
            .local_addr()
            .map_err(io("listening for shipped data"))?;
        // Reads every connection to its end: the bytes have arrived.
        let sink = tokio::spawn(async move {
            while let Ok((mut stream, _)) = sink.accept().await {
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
                    let _ = stream.write_all(b"k").await;
                });
            }
        });
        let names: Vec<String> = job.datacenters.iter().map(|d| d.name_any()).collect();
        let mut routes = Vec::new();
        let (mut inbound, mut outbound) = (Vec::new(), Vec::new());
        for name in names.iter().skip(1) {
            for (from, to, list) in [
                (name, &names[0], &mut inbound),
                (&names[0], name, &mut outbound),
            ] {
                let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
                routes.push(Route {
                    from: from.clone(),
                    to: to.clone(),
                    listen,
                    target,
                });
                list.push(listen);
            }
        }
        let wan = Wan::start(processes, job, routes, &[]).await?;
        Ok(Self {
            wan,
            inbound,
            outbound,
            sink,
        })
    }

    /// Sends `payloads[i]` through `routes[i]`, all at once; returns when
    /// every byte has arrived.
    pub(super) async fn send(
        routes: &[SocketAddr],
        payloads: Vec<Vec<u8>>,
    ) -> Result<(), RunError> {
        let sends = routes
            .iter()
            .zip(payloads)
            .map(|(&route, payload)| async move {
                let mut stream = tokio::net::TcpStream::connect(route).await?;
                stream.write_all(&payload).await?;
                stream.shutdown().await?;
                let mut ack = [0; 1];
                stream.read_exact(&mut ack).await?;
                Ok::<_, std::io::Error>(())
            });
        futures::future::try_join_all(sends)
            .await
            .map_err(io("shipping over the WAN"))?;
        Ok(())
    }

    /// Ships the training examples of every datacenter but the first (the
    /// partitions its workers would train on) to the first.
    pub(super) async fn ship_data(
        &self,
        job: &ResolvedJob<'_>,
        train: &Examples,
        seed: u64,
    ) -> Result<(), RunError> {
        let spec = &job.job.spec;
        // The same partitions the workers draw with the run's seed.
        let parts = geoml_dataplane::data::partition(
            train,
            job.plan.total_workers(),
            &spec.dataset.partitioning,
            seed,
        );
        let mut payloads = Vec::new();
        let mut offset = job.plan.datacenters[0].workers;
        for dc in job.plan.datacenters.iter().skip(1) {
            let indices: Vec<usize> = parts[offset..offset + dc.workers].concat();
            payloads.push(example_bytes(&train.select(&indices)));
            offset += dc.workers;
        }
        Self::send(&self.inbound, payloads).await
    }

    pub(super) async fn finish(
        mut self,
        processes: &Processes,
    ) -> Result<Vec<LinkBytes>, RunError> {
        let links = self.wan.link_bytes().await?;
        processes.stop(&mut self.wan.role).await?;
        self.sink.abort();
        Ok(links)
    }
}

/// Examples as bytes, the way they would be shipped: features as
/// little-endian f32 and a u16 label, or (user u32, item u32, rating f32).
fn example_bytes(examples: &Examples) -> Vec<u8> {
    let mut out = Vec::new();
    match examples {
        Examples::Classification(c) => {
            for (row, label) in c.features.rows().into_iter().zip(&c.labels) {
                for x in row {
                    out.extend_from_slice(&x.to_le_bytes());
                }
                out.extend_from_slice(&label.to_le_bytes());
            }
        }
        Examples::Ratings(r) => {
            for ((u, i), x) in r.users.iter().zip(&r.items).zip(&r.ratings) {
                out.extend_from_slice(&u.to_le_bytes());
                out.extend_from_slice(&i.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
    out
}
