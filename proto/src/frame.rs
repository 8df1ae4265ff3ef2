//! The lean row transport's frames: pushes and pulls of rows between workers
//! and parameter-server shards over plain TCP (or TLS), without gRPC's
//! framing and copies.
//!
//! A connection starts with [`MAGIC`] from the client (over TLS it also
//! negotiates [`ALPN`]); then the client sends requests and the server
//! answers each, in order. A request is a [`Request`] header of
//! [`HEADER_BYTES`] followed by its keys (little-endian `u32`) and values
//! (little-endian `f32`), exactly the bytes of [`crate::Rows`]' fields. A
//! reply is a [`Reply`] header followed by the pulled keys and values, or,
//! when the request was refused, by the error message (UTF-8); its `code`
//! is the gRPC status code the gRPC path would have answered (0: OK).
//! Every integer is little-endian.

/// What a client sends first, so that a server sharing its port with gRPC
/// (whose clients start with `PRI * HTTP/2.0`) tells the two apart by the
/// first byte.
pub const MAGIC: [u8; 8] = *b"GEOMLRW1";

/// The TLS application protocol of the row transport (gRPC's is `h2`).
pub const ALPN: &[u8] = b"geoml-rows/1";

/// Bytes of a request or reply header.
pub const HEADER_BYTES: usize = 32;

/// Largest payload (keys, values, message) one frame may carry: the limit
/// of a gRPC message.
pub const MAX_PAYLOAD_BYTES: usize = crate::MAX_MESSAGE_BYTES;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Apply a gradient (a `Push` RPC).
    Push,
    /// Read rows (a `Pull` RPC).
    Pull,
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::Push => 1,
            Op::Pull => 2,
        }
    }
}

/// Why a frame is malformed. The connection it came on is closed after the
/// error is answered: what follows it cannot be trusted to be a frame.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The connection did not start with [`MAGIC`].
    #[error("row transport: the connection does not start with the row protocol's magic bytes")]
    Magic,
    /// The request's operation is unknown.
    #[error("row transport: unknown operation {0}")]
    UnknownOp(u8),
    /// Reserved bits or bytes are set.
    #[error("row transport: reserved header bits are set")]
    Reserved,
    /// The payload is larger than [`MAX_PAYLOAD_BYTES`].
    #[error("row transport: a frame of {len} bytes is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The payload's length.
        len: u64,
        /// The limit.
        limit: usize,
    },
}

/// A too large frame is refused as gRPC refuses a too large message; any
/// other malformed frame is the caller's mistake.
impl From<FrameError> for tonic::Status {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { .. } => tonic::Status::resource_exhausted(e.to_string()),
            _ => tonic::Status::invalid_argument(e.to_string()),
        }
    }
}

fn check_size(lens: &[u32]) -> Result<(), FrameError> {
    let len: u64 = lens.iter().map(|&l| u64::from(l)).sum();
    if len > MAX_PAYLOAD_BYTES as u64 {
        return Err(FrameError::TooLarge {
            len,
            limit: MAX_PAYLOAD_BYTES,
        });
    }
    Ok(())
}

fn u32_at(bytes: &[u8; HEADER_BYTES], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn u64_at(bytes: &[u8; HEADER_BYTES], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// A request header: op (1 byte), flags (1: all rows), 2 reserved bytes,
/// id, clock (8 bytes), worker, keys' bytes, values' bytes, 4 reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// What is asked.
    pub op: Op,
    /// Echoed in the reply.
    pub id: u32,
    /// The worker's clock (the pushed clock, or the clock it reads at).
    pub clock: u64,
    /// The worker's index.
    pub worker: u32,
    /// Every row the shard owns (the dense form); `keys_len` is then 0.
    pub all: bool,
    /// Bytes of keys following the header.
    pub keys_len: u32,
    /// Bytes of values following the keys.
    pub values_len: u32,
}

const ALL: u8 = 1;
const STOP: u8 = 2;
const TARGET_MET: u8 = 4;

impl Request {
    /// The header's bytes.
    #[must_use]
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0; HEADER_BYTES];
        out[0] = self.op.code();
        out[1] = if self.all { ALL } else { 0 };
        out[4..8].copy_from_slice(&self.id.to_le_bytes());
        out[8..16].copy_from_slice(&self.clock.to_le_bytes());
        out[16..20].copy_from_slice(&self.worker.to_le_bytes());
        out[20..24].copy_from_slice(&self.keys_len.to_le_bytes());
        out[24..28].copy_from_slice(&self.values_len.to_le_bytes());
        out
    }

    /// A header from its bytes, checked (operation, reserved bits, size).
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Self, FrameError> {
        let op = match bytes[0] {
            1 => Op::Push,
            2 => Op::Pull,
            other => return Err(FrameError::UnknownOp(other)),
        };
        if bytes[1] & !ALL != 0 || bytes[2..4] != [0, 0] || bytes[28..32] != [0; 4] {
            return Err(FrameError::Reserved);
        }
        let request = Self {
            op,
            id: u32_at(bytes, 4),
            clock: u64_at(bytes, 8),
            worker: u32_at(bytes, 16),
            all: bytes[1] & ALL != 0,
            keys_len: u32_at(bytes, 20),
            values_len: u32_at(bytes, 24),
        };
        check_size(&[request.keys_len, request.values_len])?;
        Ok(request)
    }
}

/// A reply header: gRPC status code (2 bytes), flags (1: all rows, 2:
/// training stopped, 4: the target was met), 1 reserved byte, the
/// request's id, the shard's lowest clock (8 bytes), keys' bytes, values'
/// bytes, the error message's bytes, 4 reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The gRPC status code; 0 (OK) unless the request was refused.
    pub code: u16,
    /// The request's id.
    pub id: u32,
    /// Lowest clock over all workers.
    pub min_clock: u64,
    /// Training has stopped.
    pub stop: bool,
    /// This datacenter or a peer met the target metric.
    pub target_met: bool,
    /// The pulled rows are every row of the shard.
    pub all: bool,
    /// Bytes of keys following the header.
    pub keys_len: u32,
    /// Bytes of values following the keys.
    pub values_len: u32,
    /// Bytes of the error message following the values.
    pub message_len: u32,
}

impl Reply {
    /// The header's bytes.
    #[must_use]
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0; HEADER_BYTES];
        out[0..2].copy_from_slice(&self.code.to_le_bytes());
        let flag = |set: bool, bit: u8| if set { bit } else { 0 };
        out[2] = flag(self.all, ALL) | flag(self.stop, STOP) | flag(self.target_met, TARGET_MET);
        out[4..8].copy_from_slice(&self.id.to_le_bytes());
        out[8..16].copy_from_slice(&self.min_clock.to_le_bytes());
        out[16..20].copy_from_slice(&self.keys_len.to_le_bytes());
        out[20..24].copy_from_slice(&self.values_len.to_le_bytes());
        out[24..28].copy_from_slice(&self.message_len.to_le_bytes());
        out
    }

    /// A header from its bytes, checked (reserved bits, size).
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Self, FrameError> {
        if bytes[2] & !(ALL | STOP | TARGET_MET) != 0 || bytes[3] != 0 || bytes[28..32] != [0; 4] {
            return Err(FrameError::Reserved);
        }
        let reply = Self {
            code: u16::from_le_bytes([bytes[0], bytes[1]]),
            id: u32_at(bytes, 4),
            min_clock: u64_at(bytes, 8),
            stop: bytes[2] & STOP != 0,
            target_met: bytes[2] & TARGET_MET != 0,
            all: bytes[2] & ALL != 0,
            keys_len: u32_at(bytes, 16),
            values_len: u32_at(bytes, 20),
            message_len: u32_at(bytes, 24),
        };
        check_size(&[reply.keys_len, reply.values_len, reply.message_len])?;
        Ok(reply)
    }

    /// The reply refusing request `id` with `status`, whose message follows
    /// the header.
    #[must_use]
    pub fn refusal(id: u32, status: &tonic::Status) -> Self {
        Self {
            code: u16::try_from(status.code() as i32).unwrap_or(u16::MAX),
            id,
            min_clock: 0,
            stop: false,
            target_met: false,
            all: false,
            keys_len: 0,
            values_len: 0,
            message_len: u32::try_from(status.message().len()).unwrap_or(0),
        }
    }

    /// Bytes following the header.
    #[must_use]
    pub fn payload_len(&self) -> usize {
        self.keys_len as usize + self.values_len as usize + self.message_len as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let request = Request {
            op: Op::Pull,
            id: 7,
            clock: u64::MAX - 1,
            worker: 3,
            all: true,
            keys_len: 0,
            values_len: 4096,
        };
        assert_eq!(Request::decode(&request.encode()), Ok(request));
        let reply = Reply {
            code: 0,
            id: 7,
            min_clock: 12,
            stop: true,
            target_met: true,
            all: false,
            keys_len: 8,
            values_len: 16,
            message_len: 0,
        };
        assert_eq!(Reply::decode(&reply.encode()), Ok(reply));
        assert_eq!(reply.payload_len(), 24);
        let mut unknown_flag = reply.encode();
        unknown_flag[2] |= 8;
        assert_eq!(Reply::decode(&unknown_flag), Err(FrameError::Reserved));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let request = Request {
            op: Op::Push,
            id: 1,
            clock: 1,
            worker: 0,
            all: false,
            keys_len: 4,
            values_len: 4,
        };
        let mut bytes = request.encode();
        bytes[0] = 9;
        assert_eq!(Request::decode(&bytes), Err(FrameError::UnknownOp(9)));
        let mut bytes = request.encode();
        bytes[1] = 0x80;
        assert_eq!(Request::decode(&bytes), Err(FrameError::Reserved));
        let mut bytes = request.encode();
        bytes[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        let status = tonic::Status::from(Request::decode(&bytes).unwrap_err());
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("larger than the limit"));
    }

    #[test]
    fn a_refusal_carries_the_status() {
        let status = tonic::Status::invalid_argument("gradient: value 3 is not finite");
        let reply = Reply::refusal(5, &status);
        assert_eq!(reply.code, tonic::Code::InvalidArgument as u16);
        assert_eq!(reply.payload_len(), status.message().len());
    }
}
