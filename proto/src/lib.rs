//! The geoml gRPC protocols: generated tonic/prost code for the parameter
//! server (`ps.proto`, at the crate root), Gaia's mirror sync
//! ([`mirror`]) and Cartel's registry and model exchange ([`cartel`]), plus
//! the packed form rows take on the wire ([`rows`]), the frames of the lean
//! row transport ([`frame`]) and the transport limits both ends of a
//! connection agree on.
//!
//! The data plane decodes bytes only through this crate; nothing here knows
//! about shards, workers or the launcher.

pub mod frame;
pub mod rows;

/// Generated code, linted as little as any generated file.
#[allow(missing_docs, clippy::pedantic)]
mod generated {
    pub mod ps {
        tonic::include_proto!("geoml.ps.v1");
    }
    pub mod mirror {
        tonic::include_proto!("geoml.mirror.v1");
    }
    pub mod cartel {
        tonic::include_proto!("geoml.cartel.v1");
    }
}

pub use generated::ps::*;

/// The mirror protocol between datacenters (`mirror.proto`).
pub mod mirror {
    pub use super::generated::mirror::*;
}

/// Cartel's registry and model exchange (`registry.proto`).
pub mod cartel {
    pub use super::generated::cartel::*;
}

/// HTTP/2 flow-control window per stream, large enough for a dense push.
pub const WINDOW_BYTES: u32 = 8 << 20;

/// HTTP/2 frame size both ends accept: a megabyte push travels in a few
/// frames, not in 16 KiB ones.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// Largest message a server decodes; larger ones get `ResourceExhausted`
/// (tonic's limit) before any work is done.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
