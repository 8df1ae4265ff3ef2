//! Packing rows of keys and values into the wire's byte form and back.

use crate::pb;

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
}

/// Little-endian bytes of `keys`.
#[must_use]
pub fn pack_keys(keys: &[u32]) -> Vec<u8> {
    keys.iter().flat_map(|k| k.to_le_bytes()).collect()
}

/// Little-endian bytes of `values`.
#[must_use]
pub fn pack_values(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Keys from little-endian bytes; they must be sorted and unique.
pub fn unpack_keys(bytes: &[u8]) -> Result<Vec<u32>, RowsError> {
    let keys = words(bytes, "keys")?
        .map(u32::from_le_bytes)
        .collect::<Vec<_>>();
    if let Some(w) = keys.windows(2).find(|w| w[0] >= w[1]) {
        return Err(RowsError::Unsorted(w[1]));
    }
    Ok(keys)
}

/// Values from little-endian bytes.
pub fn unpack_values(bytes: &[u8]) -> Result<Vec<f32>, RowsError> {
    Ok(words(bytes, "values")?.map(f32::from_le_bytes).collect())
}

fn words<'a>(
    bytes: &'a [u8],
    field: &'static str,
) -> Result<impl Iterator<Item = [u8; 4]> + 'a, RowsError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(RowsError::Truncated {
            field,
            len: bytes.len(),
        });
    }
    Ok(bytes.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]))
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
