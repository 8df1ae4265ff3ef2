//! Packing rows of keys and values into the wire's byte form and back.

use crate as pb;

/// Why packed rows are malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RowsError {
    /// A byte field's length is not a multiple of 4.
    #[error("{field} has {len} bytes, not a multiple of 4 (truncated?)")]
    Truncated {
        /// `keys` or `values`.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// Keys are not strictly increasing.
    #[error("keys must be sorted and unique (key {0} is out of order)")]
    Unsorted(u32),
    /// The varint-coded index starting at this byte ends mid-number or
    /// overflows.
    #[error("indexes: malformed varint at byte {0}")]
    Varint(usize),
}

/// Malformed rows are the caller's mistake.
impl From<RowsError> for tonic::Status {
    fn from(e: RowsError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

// Keys and values travel as little-endian words, which on a little-endian
// host are their bytes in memory: `bytemuck` casts them without a copy loop.
#[cfg(not(target_endian = "little"))]
compile_error!(
    "the packed rows are little-endian words cast from memory: build for a little-endian target"
);

/// Little-endian bytes of `keys`.
#[must_use]
pub fn pack_keys(keys: &[u32]) -> Vec<u8> {
    bytemuck::cast_slice(keys).to_vec()
}

/// Sorted, unique `indexes` as LEB128 varints of their gaps (the first
/// counted from −1): about one byte each when indexes are dense.
#[must_use]
pub fn pack_indexes(indexes: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(indexes.len() + 4);
    let mut previous: Option<u32> = None;
    for &i in indexes {
        let gap = previous.map_or(i, |p| i - p - 1);
        previous = Some(i);
        prost::encoding::encode_varint(u64::from(gap), &mut out);
    }
    out
}

/// Indexes packed by [`pack_indexes`].
pub fn unpack_indexes(bytes: &[u8]) -> Result<Vec<u32>, RowsError> {
    let mut rest = bytes;
    let mut out = Vec::new();
    let mut next: u64 = 0;
    while !rest.is_empty() {
        let at = bytes.len() - rest.len();
        let gap = prost::encoding::decode_varint(&mut rest).map_err(|_| RowsError::Varint(at))?;
        let index = next.checked_add(gap).and_then(|i| u32::try_from(i).ok());
        let index = index.ok_or(RowsError::Varint(at))?;
        out.push(index);
        next = u64::from(index) + 1;
    }
    Ok(out)
}

/// Little-endian bytes of `values`.
#[must_use]
pub fn pack_values(values: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

/// Keys from little-endian bytes; they must be sorted and unique.
pub fn unpack_keys(bytes: &[u8]) -> Result<Vec<u32>, RowsError> {
    let keys: Vec<u32> = words(bytes, "keys")?;
    if let Some(w) = keys.windows(2).find(|w| w[0] >= w[1]) {
        return Err(RowsError::Unsorted(w[1]));
    }
    Ok(keys)
}

/// Values from little-endian bytes.
pub fn unpack_values(bytes: &[u8]) -> Result<Vec<f32>, RowsError> {
    words(bytes, "values")
}

/// `bytes` as 4-byte words (copied: wire bytes need not be aligned).
fn words<T: bytemuck::Pod>(bytes: &[u8], field: &'static str) -> Result<Vec<T>, RowsError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(RowsError::Truncated {
            field,
            len: bytes.len(),
        });
    }
    Ok(bytemuck::pod_collect_to_vec(bytes))
}

/// Rows naming `keys` (`None`: all rows) with `values`.
#[must_use]
pub fn rows(keys: Option<&[u32]>, values: &[f32]) -> pb::Rows {
    pb::Rows {
        keys: keys.map(pack_keys).unwrap_or_default(),
        values: pack_values(values),
        all: keys.is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_round_trip_as_gap_varints() {
        let indexes = [0, 1, 2, 130, 131, 100_000, u32::MAX];
        let packed = pack_indexes(&indexes);
        assert_eq!(&packed[..3], [0, 0, 0]);
        assert_eq!(unpack_indexes(&packed).unwrap(), indexes);
        assert!(unpack_indexes(&[]).unwrap().is_empty());
        assert!(matches!(unpack_indexes(&[0x80]), Err(RowsError::Varint(0))));
        assert!(unpack_indexes(&[0xff; 8]).is_err());
        // Past u32::MAX.
        let mut over = pack_indexes(&[u32::MAX]);
        over.push(0);
        assert!(unpack_indexes(&over).is_err());
    }

    #[test]
    fn round_trips() {
        let keys = [1, 5, 9];
        let values = [0.5, -1.25, f32::MAX];
        assert_eq!(unpack_keys(&pack_keys(&keys)).unwrap(), keys);
        assert_eq!(unpack_values(&pack_values(&values)).unwrap(), values);
    }

    #[test]
    fn rejects_truncated_and_unsorted() {
        assert_eq!(
            unpack_values(&[0, 0, 0]),
            Err(RowsError::Truncated {
                field: "values",
                len: 3
            })
        );
        assert_eq!(
            unpack_keys(&pack_keys(&[3, 3])),
            Err(RowsError::Unsorted(3))
        );
        assert_eq!(
            unpack_keys(&pack_keys(&[4, 2])),
            Err(RowsError::Unsorted(2))
        );
    }
}
