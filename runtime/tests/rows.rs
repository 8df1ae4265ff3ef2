//! The row transport of a real `geoml ps` process, on its gRPC port over
//! loopback TCP: pushes and pulls give what the same gRPC calls give,
//! refusals carry the gRPC path's codes and messages, a malformed frame is
//! answered and closes only its own connection, and a shard with mTLS
//! serves rows only over mTLS. `geoml bench` measures over it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{doc, example, free_port, geoml, set, write};
use geoml_crds::identity::{Identity, Role};
use geoml_crds::pki::CertificateAuthority;
use geoml_dataplane::ps::rows::RowClient;
use geoml_dataplane::tls::{Expect, Transport};
use geoml_proto as pb;
use geoml_proto::frame::{self, HEADER_BYTES, MAGIC, Op, Reply, Request};
use geoml_proto::parameter_server_client::ParameterServerClient;
use geoml_proto::rows::{Values, pack_keys, pack_values};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic::transport::Channel;

/// Shard 0 of 2 for the digits softmax model (65 rows of 10), 2 workers,
/// with `tls` (a TLS directory) or plaintext; its gRPC client once it
/// answers, over `transport`.
async fn start(
    dir: &Path,
    tls: Option<&Path>,
    transport: &Transport,
) -> (
    tokio::process::Child,
    String,
    ParameterServerClient<Channel>,
) {
    let mut docs = example("fashion-mnist-lan.yaml");
    set(
        doc(&mut docs, "TrainingJob"),
        "spec.dataset.name",
        "Digits".into(),
    );
    set(
        doc(&mut docs, "TrainingJob"),
        "spec.datacenters",
        geoml_crds::yaml::from_str("[{name: lan, parameterServers: 2, workers: 2}]").unwrap(),
    );
    let manifest = write(dir, &docs);
    let port = free_port();
    let topology = dir.join("topology.yaml");
    let other = format!("http://127.0.0.1:{}", free_port());
    std::fs::write(
        &topology,
        format!("datacenter: lan\nparameterServers: [http://127.0.0.1:{port}, {other}]\n"),
    )
    .unwrap();
    let security = tls.map_or("--insecure-plaintext".to_owned(), |tls| {
        format!("--tls-dir={}", tls.display())
    });
    let process = tokio::process::Command::new(env!("CARGO_BIN_EXE_geoml"))
        .args(["ps", "--shard=0"])
        .arg(format!("--topology={}", topology.display()))
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--metrics-listen=127.0.0.1:{}", free_port()))
        .arg(format!("--manifest={}", manifest.display()))
        .arg(security)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let address = format!("http://127.0.0.1:{port}");
    let server = Expect::role(Role::ParameterServer);
    for _ in 0..300 {
        if let Ok(channel) = transport.connect(&address, &server).await {
            return (process, address, ParameterServerClient::new(channel));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("geoml ps did not start");
}

fn grpc_pull(worker: u32, keys: Option<&[u32]>) -> pb::PullRequest {
    pb::PullRequest {
        worker,
        clock: 0,
        rows: Some(pb::Rows {
            keys: keys.map(|k| pack_keys(k).into()).unwrap_or_default(),
            values: bytes::Bytes::new(),
            all: keys.is_none(),
        }),
    }
}

fn grpc_push(worker: u32, clock: u64, keys: Option<&[u32]>, values: &[f32]) -> pb::PushRequest {
    pb::PushRequest {
        worker,
        clock,
        gradient: Some(pb::Rows {
            keys: keys.map(|k| pack_keys(k).into()).unwrap_or_default(),
            values: pack_values(values).into(),
            all: keys.is_none(),
        }),
    }
}

/// A raw connection of the row transport, the magic sent.
async fn raw(address: &str) -> TcpStream {
    let mut socket = TcpStream::connect(address.trim_start_matches("http://"))
        .await
        .unwrap();
    socket.write_all(&MAGIC).await.unwrap();
    socket
}

/// Sends `header` and `payload` on `socket`; the reply and its payload.
async fn exchange(socket: &mut TcpStream, header: &[u8], payload: &[u8]) -> (Reply, Vec<u8>) {
    socket.write_all(header).await.unwrap();
    socket.write_all(payload).await.unwrap();
    read_reply(socket).await
}

async fn read_reply(socket: &mut TcpStream) -> (Reply, Vec<u8>) {
    let mut header = [0; HEADER_BYTES];
    socket.read_exact(&mut header).await.unwrap();
    let reply = Reply::decode(&header).unwrap();
    let mut payload = vec![0; reply.payload_len()];
    socket.read_exact(&mut payload).await.unwrap();
    (reply, payload)
}

/// Whether the server closed `socket` (reads end).
async fn closed(socket: &mut TcpStream) -> bool {
    let mut byte = [0];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), socket.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn rows_travel_as_over_grpc_and_refusals_carry_the_same_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (mut process, address, mut grpc) = start(dir.path(), None, &Transport::Plaintext).await;
    let rows = RowClient::new(&address, &Transport::Plaintext);

    // Pulls, dense and sparse, give what gRPC gives.
    for keys in [None, Some(&[0, 2, 64][..])] {
        let over_grpc = grpc.pull(grpc_pull(0, keys)).await.unwrap().into_inner();
        let over_rows = rows.pull(0, 0, keys).await.unwrap();
        assert_eq!(over_rows, over_grpc, "keys {keys:?}");
    }

    // A sparse push over the row transport and a dense one over gRPC are
    // applied alike: both show in pulls over either path.
    let sparse: Vec<f32> = (0..20_u8).map(|i| f32::from(i) * 0.5).collect();
    let pushed = rows
        .push(0, 1, Some(&[0, 2]), Values::of(&sparse))
        .await
        .unwrap();
    assert!(!pushed.stop);
    let dense = vec![0.25_f32; 33 * 10];
    grpc.push(grpc_push(1, 1, None, &dense)).await.unwrap();
    let over_rows = rows.pull(0, 1, None).await.unwrap();
    let over_grpc = grpc.pull(grpc_pull(0, None)).await.unwrap().into_inner();
    assert_eq!(over_rows.rows, over_grpc.rows);
    assert_eq!(over_rows.min_clock, 1);
    // A dense push over the row transport, and a retried (duplicate) one.
    rows.push(0, 2, None, Values::of(&dense)).await.unwrap();
    rows.push(0, 2, None, Values::of(&dense)).await.unwrap();
    let status = grpc
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.worker_clocks, [2, 1]);
    assert_eq!(status.updates_applied, 3);

    // Refusals: the gRPC path's code and message, and the connection
    // keeps serving.
    let nan = vec![f32::NAN; 10];
    let cases: Vec<(&str, tonic::Status, tonic::Status)> = vec![
        (
            "not finite",
            rows.push(0, 3, Some(&[0]), Values::of(&nan))
                .await
                .unwrap_err(),
            grpc.push(grpc_push(0, 3, Some(&[0]), &nan))
                .await
                .unwrap_err(),
        ),
        (
            "wrong shape",
            rows.push(0, 3, Some(&[0, 2]), Values::of(&[1.0; 3]))
                .await
                .unwrap_err(),
            grpc.push(grpc_push(0, 3, Some(&[0, 2]), &[1.0; 3]))
                .await
                .unwrap_err(),
        ),
        (
            "clock jump",
            rows.push(0, 9, Some(&[0]), Values::of(&[1.0; 10]))
                .await
                .unwrap_err(),
            grpc.push(grpc_push(0, 9, Some(&[0]), &[1.0; 10]))
                .await
                .unwrap_err(),
        ),
        (
            "key of another shard",
            rows.pull(0, 0, Some(&[1])).await.unwrap_err(),
            grpc.pull(grpc_pull(0, Some(&[1]))).await.unwrap_err(),
        ),
        (
            "unsorted keys",
            rows.pull(0, 0, Some(&[4, 2])).await.unwrap_err(),
            grpc.pull(grpc_pull(0, Some(&[4, 2]))).await.unwrap_err(),
        ),
        (
            "unknown worker",
            rows.pull(7, 0, Some(&[0])).await.unwrap_err(),
            grpc.pull(grpc_pull(7, Some(&[0]))).await.unwrap_err(),
        ),
    ];
    for (case, over_rows, over_grpc) in &cases {
        assert_eq!(over_rows.code(), over_grpc.code(), "{case}: {over_rows:?}");
        assert_eq!(over_rows.message(), over_grpc.message(), "{case}");
        assert_ne!(over_rows.code(), Code::Ok, "{case}");
    }
    assert!(cases[0].1.message().contains("not finite"));
    assert!(process.try_wait().unwrap().is_none(), "the server exited");
}

#[tokio::test]
async fn a_malformed_frame_closes_only_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (mut process, address, mut grpc) = start(dir.path(), None, &Transport::Plaintext).await;

    // Malformed frames, each on its own connection: answered, then that
    // connection alone is closed.
    let push = |keys_len, values_len| Request {
        op: Op::Push,
        id: 41,
        clock: 3,
        worker: 0,
        all: false,
        keys_len,
        values_len,
    };
    // Truncated keys: refused as gRPC refuses them; the connection stays.
    let mut socket = raw(&address).await;
    let (reply, message) = exchange(&mut socket, &push(5, 0).encode(), &[0; 5]).await;
    assert_eq!(reply.code, Code::InvalidArgument as u16);
    assert_eq!(reply.id, 41);
    let message = String::from_utf8(message).unwrap();
    assert!(message.contains("keys has 5 bytes"), "{message}");
    let pull = Request {
        op: Op::Pull,
        all: true,
        clock: 0,
        ..push(0, 0)
    };
    let (reply, values) = exchange(&mut socket, &pull.encode(), &[]).await;
    assert_eq!((reply.code, reply.all), (0, true));
    assert_eq!(values.len(), 4 * 33 * 10);

    // An unknown operation.
    let mut socket = raw(&address).await;
    let mut header = push(0, 0).encode();
    header[0] = 77;
    let (reply, message) = exchange(&mut socket, &header, &[]).await;
    assert_eq!(reply.code, Code::InvalidArgument as u16);
    assert!(
        String::from_utf8(message)
            .unwrap()
            .contains("unknown operation 77")
    );
    assert!(closed(&mut socket).await, "the connection stayed open");

    // A payload over the limit, refused before it is sent.
    let mut socket = raw(&address).await;
    let mut header = push(0, 0).encode();
    header[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    let (reply, message) = exchange(&mut socket, &header, &[]).await;
    assert_eq!(reply.code, Code::ResourceExhausted as u16);
    assert!(
        String::from_utf8(message)
            .unwrap()
            .contains("larger than the limit")
    );
    assert!(closed(&mut socket).await, "the connection stayed open");

    // Wrong magic bytes after a first byte that looks like the transport's.
    let mut socket = TcpStream::connect(address.trim_start_matches("http://"))
        .await
        .unwrap();
    socket.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let (reply, message) = read_reply(&mut socket).await;
    assert_eq!(reply.code, Code::InvalidArgument as u16);
    assert!(String::from_utf8(message).unwrap().contains("magic"));
    assert!(closed(&mut socket).await, "the connection stayed open");

    // A connection cut in the middle of a frame.
    let mut socket = raw(&address).await;
    socket.write_all(&push(0, 4000).encode()).await.unwrap();
    socket.write_all(&[0; 100]).await.unwrap();
    drop(socket);

    // The server is alive and serves new connections, both kinds; nothing
    // malformed changed anything.
    let rows = RowClient::new(&address, &Transport::Plaintext);
    let after = rows.pull(0, 0, None).await.unwrap();
    let before = grpc.pull(grpc_pull(0, None)).await.unwrap().into_inner();
    assert_eq!(after, before);
    rows.push(0, 1, Some(&[0]), Values::of(&[1.0; 10]))
        .await
        .unwrap();
    let status = grpc
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.worker_clocks, [1, 0]);
    assert_eq!(status.updates_applied, 1);
    assert!(process.try_wait().unwrap().is_none(), "the server exited");
    assert!(frame::MAX_PAYLOAD_BYTES < u32::MAX as usize);
}

#[tokio::test]
async fn a_shard_with_mtls_serves_rows_only_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::new("job").unwrap();
    let ps_tls = dir.path().join("tls-ps");
    ca.write_dir(&Identity::new("lan", Role::ParameterServer), &ps_tls)
        .unwrap();
    let worker_tls = dir.path().join("tls-worker");
    ca.write_dir(&Identity::new("lan", Role::Worker), &worker_tls)
        .unwrap();
    let worker = Transport::mtls(&worker_tls).unwrap();
    let (_process, address, mut grpc) = start(dir.path(), Some(&ps_tls), &worker).await;

    // A worker of the job's CA pulls and pushes over TLS.
    let rows = RowClient::new(&address, &worker);
    let pulled = rows.pull(0, 0, Some(&[0, 2])).await.unwrap();
    let over_grpc = grpc
        .pull(grpc_pull(0, Some(&[0, 2])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pulled, over_grpc);
    rows.push(0, 1, Some(&[0]), Values::of(&[0.5; 10]))
        .await
        .unwrap();

    // Plaintext frames get no answer, and the rows are not changed.
    let mut socket = raw(&address).await;
    let pull = Request {
        op: Op::Pull,
        id: 1,
        clock: 0,
        worker: 0,
        all: true,
        keys_len: 0,
        values_len: 0,
    };
    let _ = socket.write_all(&pull.encode()).await;
    // At most a TLS alert comes back (7 bytes), then the connection closes.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer));
    assert!(read.await.is_ok(), "the connection stayed open");
    assert!(
        answer.len() < HEADER_BYTES,
        "plaintext was served: {answer:?}"
    );
    let plaintext = RowClient::new(&address, &Transport::Plaintext);
    let refused = plaintext.pull(0, 0, None).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // A certificate of another CA is refused too.
    let other = CertificateAuthority::new("someone else").unwrap();
    let stranger_tls = dir.path().join("tls-stranger");
    other
        .write_dir(&Identity::new("lan", Role::Worker), &stranger_tls)
        .unwrap();
    let stranger = RowClient::new(&address, &Transport::mtls(&stranger_tls).unwrap());
    let refused = stranger.pull(0, 0, None).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    let status = grpc
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.worker_clocks, [1, 0]);
}

/// `geoml bench` measures every pattern over the row transport next to raw
/// TCP, prints them and writes the same figures as JSON.
#[tokio::test]
async fn geoml_bench_prints_and_writes_every_pattern_against_raw_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let (ok, table, stderr) = geoml(&[
        "bench",
        "--rows",
        "64",
        "--width",
        "8",
        "--messages",
        "8",
        "--json",
        json.to_str().unwrap(),
    ])
    .await;
    assert!(ok, "{table}{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 6, "{table}");
    for result in results {
        let name = result["name"].as_str().unwrap();
        assert!(table.contains(name), "{name} is not in\n{table}");
        let figure = |field: &str| result[field].as_f64().unwrap();
        let (rate, raw) = (figure("mb_per_second"), figure("raw_mb_per_second"));
        assert!(rate > 0.0 && raw > 0.0, "{result}");
        assert!(
            (figure("ratio_to_raw") - rate / raw).abs() < 1e-9,
            "{result}"
        );
    }
}
