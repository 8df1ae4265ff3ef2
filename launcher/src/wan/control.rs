//! The WAN proxy's fault API over HTTP on loopback: the server and its client.
//!
//! The API (JSON in and out):
//!
//! - `GET /faults`: the [`FaultState`] of every link.
//! - `POST /faults` with a [`FaultOp`], e.g.
//!   `{"op":"cut","scope":{"datacenter":"us-east"}}`: applies it and answers
//!   `200` with the new [`FaultState`]; a body that is not an operation, or
//!   that names a datacenter or link the proxy does not have, gets `400`
//!   with `{"error": "..."}` and changes nothing.
//!
//! It listens on its own address (`geoml wan-proxy --control-listen`), apart
//! from `/metrics`, which the data plane's shared endpoint serves.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::Network;
use super::fault::{FaultError, FaultOp, FaultState};

/// The path of the API.
pub const PATH: &str = "/faults";

/// A JSON answer.
fn json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    match serde_json::to_string(body) {
        Ok(text) => (status, [(CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// A `400` naming what is wrong.
fn bad_request(error: &FaultError) -> Response {
    tracing::warn!("wan-proxy: refused a fault request: {error}");
    json(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({ "error": error.to_string() }),
    )
}

/// Applies the operation in `body`.
fn post(network: &Network, body: &str) -> Response {
    let op: FaultOp = match serde_json::from_str(body) {
        Ok(op) => op,
        Err(e) => return bad_request(&FaultError::Malformed(e.to_string())),
    };
    match network.apply(&op) {
        Ok(state) => json(StatusCode::OK, &state),
        Err(e) => bad_request(&e),
    }
}

/// Serves the API on `listener` until the task is dropped.
pub(super) async fn serve(listener: TcpListener, network: Arc<Network>) {
    let read = network.clone();
    let app = Router::new()
        .route(
            PATH,
            get(move || async move { json(StatusCode::OK, &read.state()) })
                .post(move |body: String| async move { post(&network, &body) }),
        )
        .fallback(|| async {
            json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({ "error": format!("no such endpoint: GET or POST {PATH}") }),
            )
        });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("wan-proxy control endpoint: {e}");
    }
}

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The proxy could not be reached or the exchange broke off.
    #[error("wan-proxy control at {addr}: {source}")]
    Io {
        /// The control address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The proxy refused the request.
    #[error("wan-proxy control at {addr} answered {status}: {message}")]
    Refused {
        /// The control address.
        addr: SocketAddr,
        /// The HTTP status.
        status: u16,
        /// The proxy's message.
        message: String,
    },
    /// The answer is not a [`FaultState`].
    #[error("wan-proxy control at {addr}: unexpected answer: {source}")]
    Answer {
        /// The control address.
        addr: SocketAddr,
        /// Why it does not parse.
        source: serde_json::Error,
    },
}

/// Sends one HTTP/1.0 request (enough for this API) and returns the
/// status code and the body of the answer.
///
/// # Errors
///
/// The connection fails or the answer is not HTTP.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let malformed = || std::io::Error::other(format!("not an HTTP answer: {answer:?}"));
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)?;
    Ok((status, body.to_owned()))
}

/// Sends `method` `body` to the API and reads the state it answers.
async fn call(addr: SocketAddr, method: &str, body: &str) -> Result<FaultState, ControlError> {
    let (status, body) = send(addr, method, PATH, body)
        .await
        .map_err(|source| ControlError::Io { addr, source })?;
    if status != 200 {
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or(body);
        return Err(ControlError::Refused {
            addr,
            status,
            message,
        });
    }
    serde_json::from_str(&body).map_err(|source| ControlError::Answer { addr, source })
}

/// The state of every link of the proxy whose control endpoint is `addr`.
///
/// # Errors
///
/// See [`ControlError`].
pub async fn status(addr: SocketAddr) -> Result<FaultState, ControlError> {
    call(addr, "GET", "").await
}

/// Applies `op` on the proxy whose control endpoint is `addr`; returns the
/// new state.
///
/// # Errors
///
/// See [`ControlError`]; an unknown datacenter or link is
/// [`ControlError::Refused`] with status 400.
pub async fn apply(addr: SocketAddr, op: &FaultOp) -> Result<FaultState, ControlError> {
    let body = serde_json::to_string(op).map_err(|source| ControlError::Answer { addr, source })?;
    call(addr, "POST", &body).await
}
