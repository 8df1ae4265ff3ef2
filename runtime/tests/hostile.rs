//! Hostile input cannot crash a role: random, truncated and bit-flipped
//! bytes sent as the body of every gRPC method of a real `geoml ps` (the
//! ParameterServer and Mirror services of a Gaia shard), a real `geoml
//! registry` and a real `geoml site` (its ModelExchange) get an answer or an
//! error, and every process keeps serving.
//! A pull with an absurd clock does not get past the consistency gate.
//!
//! The number of cases is proptest's (256 per property unless
//! `PROPTEST_CASES` says otherwise); docs/benchmarks.md has the longer run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::process::Stdio;
use std::time::Duration;

use bytes::{Buf, BufMut};
use common::{doc, example, free_port, write};
use geoml_proto as pb;
use geoml_proto::rows::{pack_bitmap, pack_indexes, pack_keys, pack_values};
use proptest::prelude::*;
use prost::Message;
use serde_json::json;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

const SECOND: Duration = Duration::from_secs(1);

/// A codec that sends and receives message bodies as they are.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let body = buf.chunk().to_vec();
        buf.advance(body.len());
        Ok(Some(body))
    }
}

/// A role process, killed when dropped.
struct Role {
    _process: tokio::process::Child,
    address: String,
    channel: Channel,
}

async fn spawn(args: Vec<String>, port: u16) -> Role {
    let process = tokio::process::Command::new(env!("CARGO_BIN_EXE_geoml"))
        .args(args)
        .arg("--insecure-plaintext")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let address = format!("http://127.0.0.1:{port}");
    for _ in 0..300 {
        if let Ok(channel) = Channel::from_shared(address.clone())
            .unwrap()
            .connect()
            .await
        {
            return Role {
                _process: process,
                address,
                channel,
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("geoml did not start listening on {address}");
}

/// Shard 0 of datacenter us-east of a 3-datacenter Gaia job (one shard and
/// two workers per datacenter, mirrors at ports nobody answers on).
async fn gaia_shard(dir: &std::path::Path) -> Role {
    let mut docs = example("gaia-3dc.yaml");
    doc(&mut docs, "TrainingJob")["spec"]["datacenters"] = json!([
        {"name": "us-east", "parameterServers": 1, "workers": 2},
        {"name": "eu-west", "parameterServers": 1, "workers": 2},
        {"name": "ap-southeast", "parameterServers": 1, "workers": 2},
    ]);
    let manifest = write(dir, &docs);
    let port = free_port();
    let topology = dir.join("topology.yaml");
    std::fs::write(
        &topology,
        format!(
            "datacenter: us-east\nparameterServers: [http://127.0.0.1:{port}]\nmirrors:\n  \
             eu-west: [http://127.0.0.1:{}]\n  ap-southeast: [http://127.0.0.1:{}]\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    spawn(
        vec![
            "ps".into(),
            "--shard=0".into(),
            format!("--topology={}", topology.display()),
            format!("--listen=127.0.0.1:{port}"),
            format!("--manifest={}", manifest.display()),
        ],
        port,
    )
    .await
}

async fn registry() -> Role {
    let port = free_port();
    spawn(
        vec!["registry".into(), format!("--listen=127.0.0.1:{port}")],
        port,
    )
    .await
}

/// Site `site-a` of `cartel-fashion.yaml`, registered with `registry` and
/// waiting for more sites than the job has: it serves its model exchange
/// and never trains.
async fn site(registry: &Role) -> Role {
    let port = free_port();
    let manifest = common::repo_root().join("manifests/examples/cartel-fashion.yaml");
    spawn(
        vec![
            "site".into(),
            format!("--manifest={}", manifest.display()),
            "--site=site-a".into(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--registry={}", registry.address),
            "--expect-sites=99".into(),
        ],
        port,
    )
    .await
}

/// Sends `body` to `method` with a deadline; the reply or the status.
async fn call(
    channel: &Channel,
    method: &'static str,
    body: Vec<u8>,
    deadline: Duration,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(body);
    request.set_timeout(deadline);
    grpc.unary(request, PathAndQuery::from_static(method), Raw)
        .await
        .map(tonic::Response::into_inner)
}

/// Well-formed bodies, one per method of a shard: the seeds that cases
/// mutate.
fn shard_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let rows = |keys: &[u32], values: &[f32]| pb::Rows {
        keys: pack_keys(keys).into(),
        values: pack_values(values).into(),
        all: false,
    };
    vec![
        (
            "/geoml.ps.v1.ParameterServer/Pull",
            pb::PullRequest {
                worker: 0,
                clock: 0,
                rows: Some(rows(&[0, 1], &[])),
            }
            .encode_to_vec(),
        ),
        (
            "/geoml.ps.v1.ParameterServer/Push",
            pb::PushRequest {
                worker: 1,
                clock: 1,
                gradient: Some(rows(&[0], &[0.01; 10])),
            }
            .encode_to_vec(),
        ),
        (
            "/geoml.ps.v1.ParameterServer/Report",
            pb::ReportRequest {
                worker: 0,
                clock: 1,
                metric: 0.5,
                model_change: 0.1,
            }
            .encode_to_vec(),
        ),
        ("/geoml.ps.v1.ParameterServer/Status", Vec::new()),
        (
            "/geoml.ps.v1.ParameterServer/Leave",
            pb::LeaveRequest::default().encode_to_vec(),
        ),
        (
            "/geoml.mirror.v1.Mirror/Announce",
            pb::mirror::Announcement {
                datacenter: "eu-west".into(),
                seq: 1,
                indexes: pack_indexes(&[0, 7, 9]),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/geoml.mirror.v1.Mirror/Update",
            pb::mirror::MirrorUpdate {
                datacenter: "ap-southeast".into(),
                seq: 1,
                indexes: pack_indexes(&[0, 7, 9]),
                deltas: pack_values(&[0.1, -0.2, 0.3]),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/geoml.mirror.v1.Mirror/Update",
            pb::mirror::MirrorUpdate {
                datacenter: "ap-southeast".into(),
                seq: 2,
                index_bitmap: pack_bitmap(&[0, 7, 9]),
                deltas: pack_values(&[0.1, -0.2, 0.3]),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/geoml.mirror.v1.Mirror/Tick",
            pb::mirror::ClockTick {
                datacenter: "eu-west".into(),
                mirror_clock: 2,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        ("/geoml.mirror.v1.Mirror/Snapshot", Vec::new()),
    ]
}

/// The seeds of the registry's and a site's methods.
fn cartel_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let cartel = pb::cartel::SiteMetadata {
        site: "us-east".into(),
        address: "http://127.0.0.1:1".into(),
        class_priors: vec![0.1; 10],
        feature_histogram: vec![0.5; 8],
        model_kind: "SoftmaxRegression".into(),
        batches: 3,
        classes: vec![0, 1, 2],
        ..Default::default()
    };
    vec![
        ("/geoml.cartel.v1.Registry/Publish", cartel.encode_to_vec()),
        (
            "/geoml.cartel.v1.Registry/Neighbours",
            pb::cartel::NeighboursRequest {
                site: "us-east".into(),
                class_priors: vec![0.1; 10],
                feature_histogram: vec![0.5; 8],
                k: 2,
            }
            .encode_to_vec(),
        ),
        ("/geoml.cartel.v1.Registry/Sites", Vec::new()),
        (
            "/geoml.cartel.v1.ModelExchange/FetchPortions",
            pb::cartel::PortionsRequest {
                site: "site-b".into(),
                classes: vec![0, 1, 7],
            }
            .encode_to_vec(),
        ),
    ]
}

/// How a case changes a seed.
#[derive(Clone, Debug)]
enum Mutation {
    /// Random bytes instead of the seed.
    Replace(Vec<u8>),
    /// The seed cut at a position (modulo its length).
    Truncate(usize),
    /// Bytes of the seed XORed at positions (modulo its length).
    Flip(Vec<(usize, u8)>),
    /// Random bytes appended.
    Append(Vec<u8>),
}

fn mutate(seed: &[u8], mutation: &Mutation) -> Vec<u8> {
    match mutation {
        Mutation::Replace(bytes) => bytes.clone(),
        Mutation::Truncate(at) => seed[..at % (seed.len() + 1)].to_vec(),
        Mutation::Flip(flips) => {
            let mut out = seed.to_vec();
            if !out.is_empty() {
                let len = out.len();
                for (at, bits) in flips {
                    out[at % len] ^= bits;
                }
            }
            out
        }
        Mutation::Append(bytes) => [seed, bytes].concat(),
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512).prop_map(Mutation::Replace),
        any::<usize>().prop_map(Mutation::Truncate),
        prop::collection::vec((any::<usize>(), 1..=255u8), 1..8).prop_map(Mutation::Flip),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
    ]
}

/// Codes a role may answer hostile input with: anything but a crash, which
/// shows as `Unavailable` (connection gone) or `Unknown`/`Internal` from a
/// panicking handler.
fn acceptable(result: &Result<Vec<u8>, Status>) -> bool {
    match result {
        Ok(_) => true,
        Err(status) => {
            matches!(
                status.code(),
                Code::InvalidArgument
                    | Code::OutOfRange
                    | Code::NotFound
                    | Code::FailedPrecondition
                    | Code::ResourceExhausted
                    | Code::DeadlineExceeded
                    | Code::Cancelled
            ) || (status.code() == Code::Internal && status.message().contains("decode"))
        }
    }
}

#[test]
fn hostile_bodies_on_every_method_get_an_answer_and_roles_keep_serving() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (shard, registry, site) = runtime.block_on(async {
        let registry = registry().await;
        let site = site(&registry).await;
        (gaia_shard(dir.path()).await, registry, site)
    });
    let seeds = [shard_seeds(), cartel_seeds()].concat();
    let channel_of = |method: &str| {
        if method.starts_with("/geoml.cartel.v1.Registry") {
            registry.channel.clone()
        } else if method.starts_with("/geoml.cartel.v1.ModelExchange") {
            site.channel.clone()
        } else {
            shard.channel.clone()
        }
    };
    proptest!(|(which in 0..seeds.len(), mutation in mutation())| {
        let (method, seed) = &seeds[which];
        let body = mutate(seed, &mutation);
        // A pull whose clock the mutation raised waits at the gate: its
        // deadline ends it.
        let deadline = Duration::from_millis(300);
        let result = runtime.block_on(call(&channel_of(method), method, body.clone(), deadline));
        prop_assert!(acceptable(&result), "{method} with {body:?}: {result:?}");
    });
    // All still answer well-formed requests.
    runtime.block_on(async {
        let status = call(
            &shard.channel,
            "/geoml.ps.v1.ParameterServer/Status",
            Vec::new(),
            SECOND,
        )
        .await;
        pb::StatusResponse::decode(status.unwrap().as_slice()).unwrap();
        let sites = call(
            &registry.channel,
            "/geoml.cartel.v1.Registry/Sites",
            Vec::new(),
            SECOND,
        )
        .await;
        pb::cartel::SitesReply::decode(sites.unwrap().as_slice()).unwrap();
        let portions = call(
            &site.channel,
            "/geoml.cartel.v1.ModelExchange/FetchPortions",
            pb::cartel::PortionsRequest::default().encode_to_vec(),
            SECOND,
        )
        .await;
        pb::cartel::PortionsReply::decode(portions.unwrap().as_slice()).unwrap();
    });
}

#[test]
fn a_pull_with_an_absurd_clock_waits_at_the_consistency_gate() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let shard = gaia_shard(dir.path()).await;
        for clock in [u64::MAX, u64::MAX - 1, 1 << 63, 1_000_000] {
            let pull = pb::PullRequest {
                worker: 0,
                clock,
                rows: Some(pb::Rows {
                    all: true,
                    ..Default::default()
                }),
            };
            // No worker pushed anything: no read past clock 0 may be served.
            let result = call(
                &shard.channel,
                "/geoml.ps.v1.ParameterServer/Pull",
                pull.encode_to_vec(),
                SECOND,
            )
            .await;
            // The deadline ends it: tonic's server answers a request whose
            // grpc-timeout passed with Cancelled "Timeout expired".
            match result {
                Err(status)
                    if status.code() == Code::DeadlineExceeded
                        || (status.code() == Code::Cancelled
                            && status.message() == "Timeout expired") => {}
                other => panic!("pull at clock {clock} answered {other:?}"),
            }
        }
        // The server still serves.
        call(
            &shard.channel,
            "/geoml.ps.v1.ParameterServer/Status",
            Vec::new(),
            SECOND,
        )
        .await
        .unwrap();
    });
}

/// Every example manifest and invalid fixture, cut, bit-flipped or spliced:
/// reading it gives a manifest or an error, never a panic.
#[test]
fn mangled_manifests_are_read_or_refused_without_a_panic() {
    let root = common::repo_root();
    let texts: Vec<String> = ["manifests/examples", "tests/fixtures/invalid"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(root.join(dir)).unwrap())
        .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
        .collect();
    proptest!(|(which in 0..texts.len(), mutation in mutation())| {
        let bytes = mutate(texts[which].as_bytes(), &mutation);
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(manifest) = geoml_crds::manifest::Manifest::from_yaml(&text) {
            let _ = manifest.job();
        }
    });
}
