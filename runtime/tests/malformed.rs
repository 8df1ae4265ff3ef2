//! A real `geoml ps` process answers malformed requests with
//! `InvalidArgument` or `ResourceExhausted` and a clear message, changes
//! nothing, and keeps serving well-formed ones.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{doc, example, free_port, set, write};
use geoml_proto as pb;
use geoml_proto::parameter_server_client::ParameterServerClient;
use geoml_proto::rows::{pack_keys, pack_values};
use tonic::Code;
use tonic::transport::Channel;

struct Server {
    process: tokio::process::Child,
    client: ParameterServerClient<Channel>,
    metrics_port: u16,
}

/// `GET /metrics` over plain HTTP/1.1.
async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    socket.read_to_string(&mut body).await.unwrap();
    body
}

/// Shard 0 of 2 for the digits softmax model (65 rows of 10), 2 workers.
async fn start(dir: &std::path::Path) -> Server {
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
    let (port, metrics_port) = (free_port(), free_port());
    let topology = dir.join("topology.yaml");
    let other = format!("http://127.0.0.1:{}", free_port());
    std::fs::write(
        &topology,
        format!("datacenter: lan\nparameterServers: [http://127.0.0.1:{port}, {other}]\n"),
    )
    .unwrap();
    let process = tokio::process::Command::new(env!("CARGO_BIN_EXE_geoml"))
        .args(["ps", "--shard=0"])
        .arg(format!("--topology={}", topology.display()))
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--metrics-listen=127.0.0.1:{metrics_port}"))
        .arg(format!("--manifest={}", manifest.display()))
        .arg("--insecure-plaintext")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let address = format!("http://127.0.0.1:{port}");
    for _ in 0..300 {
        if let Ok(client) = ParameterServerClient::connect(address.clone()).await {
            return Server {
                process,
                client: client.max_encoding_message_size(usize::MAX),
                metrics_port,
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("geoml ps did not start");
}

fn pull(keys: Vec<u8>) -> pb::PullRequest {
    pb::PullRequest {
        worker: 0,
        clock: 0,
        rows: Some(pb::Rows {
            keys: keys.into(),
            values: bytes::Bytes::new(),
            all: false,
        }),
    }
}

fn push(keys: &[u32], values: Vec<u8>) -> pb::PushRequest {
    pb::PushRequest {
        worker: 0,
        clock: 1,
        gradient: Some(pb::Rows {
            keys: pack_keys(keys).into(),
            values: values.into(),
            all: false,
        }),
    }
}

#[tokio::test]
#[allow(clippy::too_many_lines)] // one table of cases
async fn malformed_requests_get_clear_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path()).await;
    let client = &mut server.client;
    let before = client
        .pull(pull(pack_keys(&[0, 2])))
        .await
        .unwrap()
        .into_inner();

    let cases: Vec<(&str, Code, &str, tonic::Status)> = vec![
        (
            "truncated keys",
            Code::InvalidArgument,
            "keys has 5 bytes",
            client.pull(pull(vec![0; 5])).await.unwrap_err(),
        ),
        (
            "unsorted keys",
            Code::InvalidArgument,
            "sorted and unique",
            client.pull(pull(pack_keys(&[4, 2]))).await.unwrap_err(),
        ),
        (
            "key of another shard",
            Code::InvalidArgument,
            "key 1 is not a row of shard 0",
            client.pull(pull(pack_keys(&[1]))).await.unwrap_err(),
        ),
        (
            "key beyond the model",
            Code::InvalidArgument,
            "key 1000 is not a row",
            client.pull(pull(pack_keys(&[1000]))).await.unwrap_err(),
        ),
        (
            "more keys than the shard has",
            Code::ResourceExhausted,
            "keys asked for",
            client
                .pull(pull(pack_keys(
                    &(0..10_000).map(|k| k * 2).collect::<Vec<_>>(),
                )))
                .await
                .unwrap_err(),
        ),
        (
            "unknown worker",
            Code::InvalidArgument,
            "worker 7 does not exist",
            client
                .pull(pb::PullRequest {
                    worker: 7,
                    ..pull(pack_keys(&[0]))
                })
                .await
                .unwrap_err(),
        ),
        (
            "missing rows",
            Code::InvalidArgument,
            "rows: missing",
            client
                .pull(pb::PullRequest {
                    rows: None,
                    ..pull(Vec::new())
                })
                .await
                .unwrap_err(),
        ),
        (
            "wrong shape",
            Code::InvalidArgument,
            "expected 20 values for the rows named, got 3",
            client
                .push(push(&[0, 2], pack_values(&[1.0; 3])))
                .await
                .unwrap_err(),
        ),
        (
            "truncated values",
            Code::InvalidArgument,
            "values has 7 bytes",
            client.push(push(&[0], vec![0; 7])).await.unwrap_err(),
        ),
        (
            "not finite",
            Code::InvalidArgument,
            "not finite",
            client
                .push(push(&[0], pack_values(&[f32::NAN; 10])))
                .await
                .unwrap_err(),
        ),
        (
            "clock jump",
            Code::InvalidArgument,
            "expected 1",
            client
                .push(pb::PushRequest {
                    clock: 9,
                    ..push(&[0], pack_values(&[0.0; 10]))
                })
                .await
                .unwrap_err(),
        ),
        (
            "absurd size",
            Code::ResourceExhausted,
            "too large",
            client
                .push(push(&[0], vec![0; 65 << 20]))
                .await
                .unwrap_err(),
        ),
    ];
    for (case, code, message, status) in &cases {
        assert_eq!(status.code(), *code, "{case}: {status:?}");
        assert!(
            status.message().contains(message),
            "{case}: {:?} lacks {message:?}",
            status.message()
        );
    }

    // Nothing changed, and well-formed requests are still served.
    let after = client
        .pull(pull(pack_keys(&[0, 2])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before, after);
    client
        .push(push(&[0], pack_values(&[1.0; 10])))
        .await
        .unwrap();
    let status = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.worker_clocks, [1, 0]);
    assert!(
        server.process.try_wait().unwrap().is_none(),
        "the server exited"
    );

    // Every refusal is counted by reason on the Prometheus endpoint.
    let metrics = scrape(server.metrics_port).await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for (reason, count) in [
        ("malformed", 4),
        ("unknown_key", 2),
        ("too_large", 1),
        ("unknown_worker", 1),
        ("invalid_update", 3),
    ] {
        let line = format!(
            "geoml_ps_requests_rejected_total{{datacenter=\"lan\",reason=\"{reason}\",shard=\"0\"}} {count}"
        );
        assert!(metrics.contains(&line), "{line} missing from:\n{metrics}");
    }
    assert!(
        metrics.contains("geoml_ps_updates_applied_total{datacenter=\"lan\",shard=\"0\"} 1"),
        "{metrics}"
    );
}
