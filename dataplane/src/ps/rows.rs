//! The row transport: pushes and pulls of rows between workers and a shard
//! as lean frames ([`geoml_proto::frame`]) on the shard's own port, beside
//! gRPC, which keeps every other call.
//!
//! A request's keys and values are read from the socket straight into one
//! buffer each and handed to the same checks, write-ahead log and apply as
//! a gRPC push or pull ([`ShardService::push_rows`],
//! [`ShardService::pull_rows`]); a refusal is answered with the gRPC code
//! and message the gRPC path gives. A malformed frame is answered, then its
//! connection (only) is closed. A connection's requests are served one at a
//! time, in order, so a shard applies a worker's clocks in the order it
//! sent them; a client with several requests in flight uses a connection
//! for each.

use std::io::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::{Code, Status};
use tracing::{debug, instrument};

use geoml_crds::identity::Role;
use geoml_proto::frame::{FrameError, HEADER_BYTES, MAGIC, Op, Reply, Request};
use geoml_proto::rows::{Values, keys_bytes};

use super::service::{ShardService, Wire};
use crate::pb;
use crate::tls::{ByteStream, Conn, Expect, Transport};

/// Longest a client waits for a connection to a shard.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest buffer reserved ahead of the bytes that fill it: a header
/// claiming a huge payload makes no huge allocation before the bytes come.
const READ_AHEAD: usize = 4 << 20;

/// Serves every connection of the row transport `connections` brings, each
/// on its own task, until the sender is gone; dropped, it closes them all.
pub(crate) async fn serve(service: Arc<ShardService>, mut connections: mpsc::Receiver<Conn>) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            conn = connections.recv() => match conn {
                Some(conn) => {
                    tasks.spawn(connection(service.clone(), conn));
                }
                None => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Why a connection ends.
enum End {
    /// The client closed it between requests.
    Closed,
    /// Reading or writing failed.
    Io(std::io::Error),
    /// A malformed frame, answered.
    Malformed(FrameError),
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> Self {
        End::Io(e)
    }
}

/// Serves one connection's requests in order until it ends.
async fn connection(service: Arc<ShardService>, mut conn: Conn) {
    let end = match serve_requests(&service, &mut conn).await {
        Ok(()) | Err(End::Closed) => return,
        Err(end) => end,
    };
    match end {
        End::Malformed(e) => {
            let status = service.reject("malformed", e.into());
            debug!("row transport: closing the connection after {status:?}");
        }
        End::Io(e) => debug!("row transport: connection lost: {e}"),
        End::Closed => {}
    }
    let _ = conn.shutdown().await;
}

async fn serve_requests(service: &ShardService, conn: &mut Conn) -> Result<(), End> {
    let mut magic = [0; MAGIC.len()];
    conn.read_exact(&mut magic).await?;
    if magic != MAGIC {
        return Err(refuse(conn, 0, FrameError::Magic).await);
    }
    loop {
        let mut header = [0; HEADER_BYTES];
        match conn.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Err(End::Closed),
            Err(e) => return Err(e.into()),
        }
        let request = match Request::decode(&header) {
            Ok(request) => request,
            Err(e) => {
                let id = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
                return Err(refuse(conn, id, e).await);
            }
        };
        let keys = read_payload(conn, request.keys_len).await?;
        let values = read_payload(conn, request.values_len).await?;
        let received = HEADER_BYTES + keys.len() + values.len();
        let rows = pb::Rows {
            keys,
            values,
            all: request.all,
        };
        let reply = answer(service, &request, rows, received).await;
        write_reply(conn, request.id, reply).await?;
    }
}

/// Answers `request`, whose rows came with it: the same checks, log and
/// apply as the gRPC path.
#[instrument(skip_all, fields(worker = request.worker, clock = request.clock))]
async fn answer(
    service: &ShardService,
    request: &Request,
    rows: pb::Rows,
    received: usize,
) -> Result<pb::PullResponse, Status> {
    match request.op {
        Op::Push => {
            let push = pb::PushRequest {
                worker: request.worker,
                clock: request.clock,
                gradient: Some(rows),
            };
            let response = service.push_rows(&push, received, Wire::Rows)?;
            Ok(pb::PullResponse {
                rows: None,
                min_clock: response.min_clock,
                stop: response.stop,
                target_met: false,
            })
        }
        Op::Pull => {
            let pull = pb::PullRequest {
                worker: request.worker,
                clock: request.clock,
                rows: Some(rows),
            };
            service.pull_rows(pull, received, Wire::Rows).await
        }
    }
}

/// Answers a malformed frame with its error; the connection then ends.
async fn refuse(conn: &mut Conn, id: u32, error: FrameError) -> End {
    let status = Status::from(error.clone());
    if let Err(e) = write_reply(conn, id, Err(status)).await {
        return End::Io(e);
    }
    End::Malformed(error)
}

/// Writes the reply to request `id`: the rows pulled (none for a push), or
/// the refusal's code and message.
async fn write_reply<W: AsyncWrite + Unpin>(
    conn: &mut W,
    id: u32,
    reply: Result<pb::PullResponse, Status>,
) -> std::io::Result<()> {
    match reply {
        Ok(response) => {
            let rows = response.rows.unwrap_or_default();
            let header = Reply {
                code: 0,
                id,
                min_clock: response.min_clock,
                stop: response.stop,
                target_met: response.target_met,
                all: rows.all,
                keys_len: length(rows.keys.len())?,
                values_len: length(rows.values.len())?,
                message_len: 0,
            };
            let header = header.encode();
            let mut out = Buf::chain(&header[..], rows.keys).chain(rows.values);
            conn.write_all_buf(&mut out).await?;
        }
        Err(status) => {
            let header = Reply::refusal(id, &status);
            let message = status.message().as_bytes();
            let message = &message[..header.message_len as usize];
            let header = header.encode();
            let mut out = Buf::chain(&header[..], message);
            conn.write_all_buf(&mut out).await?;
        }
    }
    // Over TLS the last bytes may still be in the session, not the socket:
    // the worker would wait for them forever.
    conn.flush().await
}

/// `len` as a frame's length field.
fn length(len: usize) -> std::io::Result<u32> {
    u32::try_from(len).map_err(|_| std::io::Error::other(format!("{len} bytes do not fit a frame")))
}

/// Reads the `len` bytes that follow into one buffer, reserved as they come
/// (at most [`READ_AHEAD`] ahead), never zeroed first.
async fn read_payload<R: AsyncRead + Unpin + ?Sized>(
    conn: &mut R,
    len: u32,
) -> std::io::Result<Bytes> {
    let len = len as usize;
    let mut buf = BytesMut::with_capacity(len.min(READ_AHEAD));
    let mut limited = conn.take(len as u64);
    while buf.len() < len {
        buf.reserve((len - buf.len()).min(READ_AHEAD));
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

/// A worker's row transport to one shard: one connection, dialled at the
/// first call and again after a failure; one request at a time on it.
/// Clones share the connection.
#[derive(Clone)]
pub struct RowClient {
    address: Arc<str>,
    transport: Transport,
    conn: Arc<tokio::sync::Mutex<Option<Box<dyn ByteStream>>>>,
    next_id: Arc<AtomicU32>,
}

impl std::fmt::Debug for RowClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowClient")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl RowClient {
    /// A client of the shard at `address` (`http://host:port`), reached
    /// over `transport`; nothing is dialled yet.
    #[must_use]
    pub fn new(address: &str, transport: &Transport) -> Self {
        Self {
            address: address.into(),
            transport: transport.clone(),
            conn: Arc::default(),
            next_id: Arc::default(),
        }
    }

    /// Pushes `values` for `keys` (`None`: every row of the shard) as
    /// `worker`'s iteration `clock`. Answers as a gRPC `Push` does; an
    /// unreachable shard is `Unavailable`.
    pub async fn push(
        &self,
        worker: u32,
        clock: u64,
        keys: Option<&[u32]>,
        values: Values<'_>,
    ) -> Result<pb::PushResponse, Status> {
        let response = self
            .call(Op::Push, worker, clock, keys, values.bytes())
            .await?;
        Ok(pb::PushResponse {
            min_clock: response.min_clock,
            stop: response.stop,
        })
    }

    /// Pulls `keys` (`None`: every row of the shard) for `worker` reading
    /// at `clock`. Answers as a gRPC `Pull` does.
    pub async fn pull(
        &self,
        worker: u32,
        clock: u64,
        keys: Option<&[u32]>,
    ) -> Result<pb::PullResponse, Status> {
        self.call(Op::Pull, worker, clock, keys, &[]).await
    }

    async fn call(
        &self,
        op: Op,
        worker: u32,
        clock: u64,
        keys: Option<&[u32]>,
        values: &[u8],
    ) -> Result<pb::PullResponse, Status> {
        let key_bytes = keys.map_or(&[][..], keys_bytes);
        let too_large = |_| Status::resource_exhausted("rows: too many bytes for one frame");
        let mut slot = self.conn.lock().await;
        let request = Request {
            op,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            clock,
            worker,
            all: keys.is_none(),
            keys_len: u32::try_from(key_bytes.len()).map_err(too_large)?,
            values_len: u32::try_from(values.len()).map_err(too_large)?,
        };
        // A reply that is no frame is the server's fault: not retried.
        let lost = |e: std::io::Error| {
            let message = format!("row transport to {}: {e}", self.address);
            if e.kind() == ErrorKind::InvalidData {
                Status::internal(message)
            } else {
                Status::unavailable(message)
            }
        };
        // Taken out while in use: a call abandoned half-way drops its
        // connection rather than leave it in the middle of a frame.
        let mut conn = match slot.take() {
            Some(conn) => conn,
            // Unreachable, or a handshake refused (as over gRPC).
            None => self.dial().await.map_err(|e| {
                Status::unavailable(format!("row transport to {}: {e}", self.address))
            })?,
        };
        let answer = exchange(&mut conn, &request, key_bytes, values)
            .await
            .map_err(lost)?;
        *slot = Some(conn);
        answer
    }

    /// A new connection to the shard, introduced by [`MAGIC`].
    async fn dial(&self) -> std::io::Result<Box<dyn ByteStream>> {
        let server = Expect::role(Role::ParameterServer);
        let mut conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.transport.connect_rows(&self.address, &server),
        )
        .await
        .map_err(|_| std::io::Error::new(ErrorKind::TimedOut, "connecting timed out"))??;
        conn.write_all(&MAGIC).await?;
        conn.flush().await?;
        Ok(conn)
    }
}

/// Sends `request` with its keys and values in one write and reads the
/// reply: the rows pulled, or the refusal as the gRPC status it stands for.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut S,
    request: &Request,
    keys: &[u8],
    values: &[u8],
) -> std::io::Result<Result<pb::PullResponse, Status>> {
    let header = request.encode();
    let mut out = Buf::chain(&header[..], keys).chain(values);
    conn.write_all_buf(&mut out).await?;
    // Over TLS the last bytes may still be in the session, not the socket.
    conn.flush().await?;
    let mut header = [0; HEADER_BYTES];
    conn.read_exact(&mut header).await?;
    let invalid = |what: String| std::io::Error::new(ErrorKind::InvalidData, what);
    let reply = Reply::decode(&header).map_err(|e| invalid(e.to_string()))?;
    if reply.id != request.id {
        return Err(invalid(format!(
            "reply to request {} where {} was sent",
            reply.id, request.id
        )));
    }
    let keys = read_payload(conn, reply.keys_len).await?;
    let values = read_payload(conn, reply.values_len).await?;
    let message = read_payload(conn, reply.message_len).await?;
    if reply.code != 0 {
        let message = String::from_utf8_lossy(&message).into_owned();
        return Ok(Err(Status::new(Code::from(i32::from(reply.code)), message)));
    }
    Ok(Ok(pb::PullResponse {
        rows: Some(pb::Rows {
            keys,
            values,
            all: reply.all,
        }),
        min_clock: reply.min_clock,
        stop: reply.stop,
        target_met: reply.target_met,
    }))
}

#[cfg(test)]
mod tests {
    use geoml_proto::rows::pack_values;

    use super::*;
    use crate::tls::testing::rows_pair;

    /// Over TLS a write can end with bytes still in the TLS session (the
    /// socket was full): they leave only when flushed. A request and its
    /// reply larger than the socket buffer must still arrive whole, or a
    /// worker and its shard wait for each other forever.
    #[tokio::test]
    async fn a_request_and_reply_larger_than_the_socket_buffer_arrive_over_tls() {
        let (mut worker, mut shard) = rows_pair(4096).await;
        let values = pack_values(&vec![0.5; 16_000]);
        let request = Request {
            op: Op::Push,
            id: 7,
            clock: 3,
            worker: 1,
            all: true,
            keys_len: 0,
            values_len: u32::try_from(values.len()).unwrap(),
        };
        let serve = async {
            let mut header = [0; HEADER_BYTES];
            shard.read_exact(&mut header).await.unwrap();
            let got = Request::decode(&header).unwrap();
            let keys = read_payload(&mut shard, got.keys_len).await.unwrap();
            let pushed = read_payload(&mut shard, got.values_len).await.unwrap();
            assert_eq!((got.id, keys.len(), pushed.len()), (7, 0, values.len()));
            let reply = pb::PullResponse {
                rows: Some(pb::Rows {
                    keys: Bytes::new(),
                    values: pushed,
                    all: true,
                }),
                min_clock: 3,
                stop: false,
                target_met: false,
            };
            write_reply(&mut shard, got.id, Ok(reply)).await.unwrap();
        };
        let call = exchange(&mut worker, &request, &[], &values);
        let (reply, ()) =
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(call, serve) })
                .await
                .expect("the worker and the shard wait for each other");
        let reply = reply.unwrap().unwrap();
        assert_eq!(reply.min_clock, 3);
        assert_eq!(reply.rows.unwrap().values, values);
    }
}
