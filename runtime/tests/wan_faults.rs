//! Fault injection in the WAN emulator: a real `geoml wan-proxy` between
//! three datacenters on loopback, driven through its fault API and through
//! `geoml wan-fault`; echo servers stand for each route's target.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{free_port, geoml};
use geoml_launcher::wan::control;
use geoml_launcher::wan::{FaultOp, FaultState, Link, Route, Scope, WanConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Long enough for anything that should happen to happen.
const GENEROUS: Duration = Duration::from_secs(30);
/// How long bytes must stay away to count as not delivered (the links of
/// these tests have no latency, so delivery takes well under this).
const QUIET: Duration = Duration::from_secs(1);

/// The routes of the test WAN: connections from the first datacenter to
/// the second.
const ROUTES: [(&str, &str); 3] = [("a", "b"), ("a", "c"), ("b", "c")];

/// A target: echoes every byte back and reports what it received.
async fn echo_server() -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buffer = [0; 1024];
                while let Ok(n @ 1..) = stream.read(&mut buffer).await {
                    let _ = tx.send(buffer[..n].to_vec());
                    if stream.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// A `geoml wan-proxy` process (killed when dropped) and its targets.
struct Proxy {
    _child: Child,
    _dir: tempfile::TempDir,
    control: SocketAddr,
    metrics: SocketAddr,
    listen: HashMap<(&'static str, &'static str), SocketAddr>,
    received: HashMap<(&'static str, &'static str), mpsc::UnboundedReceiver<Vec<u8>>>,
}

impl Proxy {
    async fn start() -> Self {
        let names: Vec<(String, f64, Option<f64>)> = ["a", "b", "c"]
            .iter()
            .map(|n| ((*n).to_owned(), 0.0, None))
            .collect();
        let links: Vec<Link> = WanConfig::mesh(&names);
        let mut routes = Vec::new();
        let mut listen = HashMap::new();
        let mut received = HashMap::new();
        for (from, to) in ROUTES {
            let (target, rx) = echo_server().await;
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            routes.push(Route {
                from: from.to_owned(),
                to: to.to_owned(),
                listen: addr,
                target,
            });
            listen.insert((from, to), addr);
            received.insert((from, to), rx);
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("wan.yaml");
        std::fs::write(
            &config,
            geoml_crds::yaml::to_string(&WanConfig { links, routes }).unwrap(),
        )
        .unwrap();
        let control = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(env!("CARGO_BIN_EXE_geoml"))
            .arg("wan-proxy")
            .arg(format!("--config={}", config.display()))
            .arg(format!("--metrics-listen={metrics}"))
            .arg(format!("--control-listen={control}"))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let proxy = Self {
            _child: child,
            _dir: dir,
            control,
            metrics,
            listen,
            received,
        };
        tokio::time::timeout(GENEROUS, async {
            while control::status(control).await.is_err()
                || TcpStream::connect(metrics).await.is_err()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the proxy serves its fault API");
        proxy
    }

    /// A connection through the route `from → to`.
    async fn connect(&self, from: &'static str, to: &'static str) -> TcpStream {
        TcpStream::connect(self.listen[&(from, to)]).await.unwrap()
    }

    async fn apply(&self, op: FaultOp) -> FaultState {
        control::apply(self.control, &op).await.unwrap()
    }

    /// Whether the target of route `from → to` received nothing so far.
    fn target_received_nothing(&mut self, from: &'static str, to: &'static str) -> bool {
        self.received
            .get_mut(&(from, to))
            .unwrap()
            .try_recv()
            .is_err()
    }

    /// The next `n` bytes the target of route `from → to` receives.
    async fn target_receives(&mut self, from: &'static str, to: &'static str, n: usize) -> Vec<u8> {
        let rx = self.received.get_mut(&(from, to)).unwrap();
        let mut bytes = Vec::new();
        while bytes.len() < n {
            let chunk = tokio::time::timeout(GENEROUS, rx.recv())
                .await
                .expect("the target receives the bytes")
                .unwrap();
            bytes.extend(chunk);
        }
        bytes
    }
}

fn cut(scope: Scope) -> FaultOp {
    FaultOp::Cut { scope }
}

fn heal(scope: Scope) -> FaultOp {
    FaultOp::Heal { scope }
}

fn link(from: &str, to: &str) -> Scope {
    Scope::Link {
        from: from.to_owned(),
        to: to.to_owned(),
    }
}

/// The next `n` bytes on `stream`, or `None` if they do not all come within `wait`.
async fn read_within(stream: &mut TcpStream, n: usize, wait: Duration) -> Option<Vec<u8>> {
    let mut bytes = vec![0; n];
    match tokio::time::timeout(wait, stream.read_exact(&mut bytes)).await {
        Ok(Ok(_)) => Some(bytes),
        Ok(Err(e)) => panic!("reading through the proxy: {e}"),
        Err(_) => None,
    }
}

/// Writes `message` and asserts it comes back (through both links).
async fn echoes(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    assert_eq!(
        read_within(stream, message.len(), GENEROUS)
            .await
            .as_deref(),
        Some(message),
        "the echo comes back"
    );
}

/// Writes `message` and asserts that nothing comes back for a while.
async fn stalls(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    assert_eq!(
        read_within(stream, 1, QUIET).await,
        None,
        "nothing comes back"
    );
}

#[tokio::test]
async fn a_cut_link_holds_bytes_and_a_heal_delivers_them() {
    let mut proxy = Proxy::start().await;
    let mut open = proxy.connect("a", "b").await;
    echoes(&mut open, b"before").await;
    assert_eq!(proxy.target_receives("a", "b", 6).await, b"before");

    let state = proxy.apply(cut(link("a", "b"))).await;
    assert!(state.link("a", "b").unwrap().fault.cut);
    assert!(
        !state.link("b", "a").unwrap().fault.cut,
        "links are directed"
    );
    assert_eq!(state.link("a", "b").unwrap().connections, 1);
    assert_eq!(
        proxy.apply(cut(link("a", "b"))).await,
        state,
        "a second cut changes nothing"
    );

    // Bytes on the open connection and on a new one go nowhere.
    stalls(&mut open, b"during").await;
    let mut fresh = proxy.connect("a", "b").await;
    stalls(&mut fresh, b"fresh").await;
    assert!(proxy.target_received_nothing("a", "b"));

    let healed = proxy.apply(heal(link("a", "b"))).await;
    assert!(healed.links.iter().all(|l| !l.fault.cut));
    // Held bytes arrive and both connections work as before.
    assert_eq!(
        read_within(&mut open, 6, GENEROUS).await.as_deref(),
        Some(&b"during"[..])
    );
    assert_eq!(
        read_within(&mut fresh, 5, GENEROUS).await.as_deref(),
        Some(&b"fresh"[..])
    );
    echoes(&mut open, b"after").await;
}

#[tokio::test]
async fn a_cut_reply_link_delivers_requests_but_holds_replies() {
    let mut proxy = Proxy::start().await;
    let mut open = proxy.connect("a", "b").await;
    echoes(&mut open, b"before").await;
    assert_eq!(proxy.target_receives("a", "b", 6).await, b"before");

    proxy.apply(cut(link("b", "a"))).await;
    stalls(&mut open, b"request").await;
    assert_eq!(
        proxy.target_receives("a", "b", 7).await,
        b"request",
        "a→b still delivers"
    );
    proxy.apply(heal(link("b", "a"))).await;
    assert_eq!(
        read_within(&mut open, 7, GENEROUS).await.as_deref(),
        Some(&b"request"[..])
    );
}

#[tokio::test]
async fn reset_closes_the_open_connections_of_a_datacenter_only() {
    let proxy = Proxy::start().await;
    let mut to_b = proxy.connect("a", "b").await;
    let mut to_c = proxy.connect("a", "c").await;
    echoes(&mut to_b, b"hello").await;
    echoes(&mut to_c, b"hello").await;

    let state = proxy
        .apply(FaultOp::Reset {
            scope: Scope::Datacenter("b".into()),
        })
        .await;
    assert!(
        state.links.iter().all(|l| !l.fault.cut),
        "a reset cuts nothing"
    );
    let mut buffer = [0; 16];
    let closed = tokio::time::timeout(GENEROUS, to_b.read(&mut buffer))
        .await
        .expect("the connection through b closes");
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "EOF or reset, not {closed:?}"
    );
    echoes(&mut to_c, b"still here").await;
    let mut again = proxy.connect("a", "b").await;
    echoes(&mut again, b"new connection").await;
}

#[tokio::test]
async fn a_cut_datacenter_cuts_its_links_and_no_others() {
    let proxy = Proxy::start().await;
    let mut a_b = proxy.connect("a", "b").await;
    let mut a_c = proxy.connect("a", "c").await;
    let mut b_c = proxy.connect("b", "c").await;
    for stream in [&mut a_b, &mut a_c, &mut b_c] {
        echoes(stream, b"hi").await;
    }

    let state = proxy.apply(cut(Scope::Datacenter("c".into()))).await;
    for l in &state.links {
        assert_eq!(
            l.fault.cut,
            l.from == "c" || l.to == "c",
            "{}→{}",
            l.from,
            l.to
        );
    }
    stalls(&mut a_c, b"to c").await;
    stalls(&mut b_c, b"to c").await;
    echoes(&mut a_b, b"a and b still talk").await;

    let metrics = geoml_dataplane::metrics::scrape(proxy.metrics)
        .await
        .unwrap();
    let sample = |name: &str, labels: &[&str]| {
        metrics
            .lines()
            .find(|line| {
                line.starts_with(&format!("{name}{{")) && labels.iter().all(|l| line.contains(l))
            })
            .and_then(|line| line.rsplit(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(
        sample(
            "geoml_wan_faults_total",
            &["from=\"a\"", "to=\"c\"", "op=\"cut\""]
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(
        sample("geoml_wan_link_cut", &["from=\"c\"", "to=\"b\""]).as_deref(),
        Some("1")
    );
    assert_eq!(
        sample("geoml_wan_link_cut", &["from=\"a\"", "to=\"b\""]).as_deref(),
        Some("0")
    );

    proxy.apply(heal(Scope::Datacenter("c".into()))).await;
    assert_eq!(
        read_within(&mut a_c, 4, GENEROUS).await.as_deref(),
        Some(&b"to c"[..])
    );
    assert_eq!(
        read_within(&mut b_c, 4, GENEROUS).await.as_deref(),
        Some(&b"to c"[..])
    );
}

#[tokio::test]
async fn a_delay_holds_bytes_longer_and_a_heal_removes_it() {
    let proxy = Proxy::start().await;
    let mut open = proxy.connect("a", "b").await;
    let state = proxy
        .apply(FaultOp::Delay {
            scope: link("a", "b"),
            ms: 60_000,
        })
        .await;
    assert_eq!(state.link("a", "b").unwrap().fault.extra_delay_ms, 60_000);
    // A minute of delay: the bytes are on their way but not there yet.
    stalls(&mut open, b"slow").await;
    let state = proxy
        .apply(FaultOp::Delay {
            scope: link("a", "b"),
            ms: 0,
        })
        .await;
    assert_eq!(state.link("a", "b").unwrap().fault.extra_delay_ms, 0);
    echoes(&mut proxy.connect("a", "b").await, b"fast again").await;
}

#[tokio::test]
async fn malformed_requests_get_400_and_the_proxy_keeps_forwarding() {
    let proxy = Proxy::start().await;
    let mut open = proxy.connect("a", "b").await;
    echoes(&mut open, b"before").await;
    for (body, says) in [
        ("not json", "malformed fault request"),
        (r#"{"op":"melt","scope":"all"}"#, "malformed fault request"),
        (r#"{"op":"cut"}"#, "malformed fault request"),
        (
            r#"{"op":"cut","scope":{"datacenter":"nowhere"}}"#,
            "unknown datacenter \"nowhere\" (the WAN links a, b, c)",
        ),
        (
            r#"{"op":"heal","scope":{"link":{"from":"a","to":"a"}}}"#,
            "unknown link a→a",
        ),
    ] {
        let (status, answer) = control::send(proxy.control, "POST", control::PATH, body)
            .await
            .unwrap();
        assert_eq!(status, 400, "{body}: {answer}");
        let error: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert!(
            error["error"].as_str().unwrap().contains(says),
            "{body}: {answer}"
        );
    }
    // Not even HTTP.
    let mut garbage = TcpStream::connect(proxy.control).await.unwrap();
    garbage
        .write_all(b"\x00\x01 nonsense\r\n\r\n")
        .await
        .unwrap();
    let mut ignored = Vec::new();
    let _ = tokio::time::timeout(GENEROUS, garbage.read_to_end(&mut ignored)).await;

    let state = control::status(proxy.control).await.unwrap();
    assert_eq!(state.links.len(), 6);
    assert!(state.links.iter().all(|l| !l.fault.cut));
    echoes(&mut open, b"still forwarding").await;
}

#[tokio::test]
async fn geoml_wan_fault_drives_the_proxy() {
    let proxy = Proxy::start().await;
    let control = proxy.control.to_string();
    let mut open = proxy.connect("a", "b").await;
    echoes(&mut open, b"before").await;

    let (ok, out, err) = geoml(&[
        "wan-fault",
        "--control",
        &control,
        "cut",
        "--datacenter",
        "b",
    ])
    .await;
    assert!(ok, "{err}");
    let state: FaultState = serde_json::from_str(&out).unwrap();
    assert!(state.link("a", "b").unwrap().fault.cut);
    assert!(!state.link("a", "c").unwrap().fault.cut);
    stalls(&mut open, b"during").await;

    let (ok, out, err) = geoml(&["wan-fault", "--control", &control, "status"]).await;
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<FaultState>(&out).unwrap(), state);

    let (ok, _, err) = geoml(&["wan-fault", "--control", &control, "heal", "--all"]).await;
    assert!(ok, "{err}");
    assert_eq!(
        read_within(&mut open, 6, GENEROUS).await.as_deref(),
        Some(&b"during"[..])
    );

    let (ok, _, err) = geoml(&[
        "wan-fault",
        "--control",
        &control,
        "cut",
        "--datacenter",
        "nowhere",
    ])
    .await;
    assert!(!ok);
    assert!(
        err.contains("answered 400: unknown datacenter \"nowhere\""),
        "{err}"
    );
}

#[tokio::test]
async fn geoml_run_names_what_is_wrong_with_a_fault_spec() {
    let (ok, _, err) = geoml(&[
        "run",
        "manifests/examples/gaia-3dc.yaml",
        "--fault",
        "cut:us-east@20x+60s",
    ])
    .await;
    assert!(!ok);
    assert!(
        err.contains("start \"20x\": unit \"x\" is not ms, s or m"),
        "{err}"
    );
}
