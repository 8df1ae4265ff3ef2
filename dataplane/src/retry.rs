//! Retrying a call with backoff while its peer is unreachable.

use std::time::Duration;

use backon::ExponentialBuilder;
use tonic::{Code, Status};

/// Waits between attempts to reach a peer: 50 ms, doubling up to `max`,
/// for as long as the caller's `when` allows.
pub(crate) fn backoff(max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(max)
        .without_max_times()
}

/// Whether `status` says the peer could not be reached (it may come back: a
/// partition heals, a restarted process listens again) rather than that it
/// refused the call.
pub(crate) fn unreachable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}
