//! Packing rows of keys and values into the wire's byte form and back.

use std::ops::Range;

use bytes::Bytes;

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
    /// A byte field's length is not a multiple of its values' width.
    #[error("{field} has {len} bytes, not a multiple of {width} (truncated?)")]
    Misaligned {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// Bytes per value.
        width: usize,
    },
    /// The varint-coded index starting at this byte ends mid-number or
    /// overflows.
    #[error("indexes: malformed varint at byte {0}")]
    Varint(usize),
    /// A message carries its indexes both as varints and as a bitmap.
    #[error("indexes as varints and as a bitmap: one form only")]
    IndexForms,
    /// An index bitmap is longer than a shard of this many elements needs.
    #[error("index bitmap of {bytes} bytes is longer than a shard of {elements} elements needs")]
    Bitmap {
        /// Its length.
        bytes: usize,
        /// The shard's elements.
        elements: usize,
    },
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

/// `keys` seen as their little-endian bytes (no copy).
#[must_use]
pub fn keys_bytes(keys: &[u32]) -> &[u8] {
    bytemuck::cast_slice(keys)
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

/// Sorted, unique `indexes` as a bitmap: bit `i % 8` (least significant
/// first) of byte `i / 8` set for each index `i`, as long as the last index
/// needs. An eighth of a byte an element, present or not: shorter than
/// [`pack_indexes`] when more than about one element in eight is present.
#[must_use]
pub fn pack_bitmap(indexes: &[u32]) -> Vec<u8> {
    let mut out = vec![0; indexes.last().map_or(0, |&last| last as usize / 8 + 1)];
    for &i in indexes {
        out[i as usize / 8] |= 1 << (i % 8);
    }
    out
}

/// The indexes of a bitmap packed by [`pack_bitmap`], ascending, for a
/// shard of `elements` elements: a bitmap longer than it needs is refused
/// before anything is allocated.
pub fn unpack_bitmap(bytes: &[u8], elements: usize) -> Result<Vec<u32>, RowsError> {
    if bytes.len() > elements.div_ceil(8) {
        return Err(RowsError::Bitmap {
            bytes: bytes.len(),
            elements,
        });
    }
    let mut out = Vec::with_capacity(bytes.iter().map(|b| b.count_ones() as usize).sum());
    // Eight bytes at a time, one step per set bit (sparse bitmaps are
    // mostly zero words).
    for (word, chunk) in (0_u32..).zip(bytes.chunks(8)) {
        let mut le = [0; 8];
        le[..chunk.len()].copy_from_slice(chunk);
        let mut bits = u64::from_le_bytes(le);
        while bits != 0 {
            out.push(word * 64 + bits.trailing_zeros());
            bits &= bits - 1;
        }
    }
    Ok(out)
}

/// Little-endian bytes of `values`.
#[must_use]
pub fn pack_values(values: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

/// Little-endian bytes of `values` as a `bytes` field of [`crate::Rows`].
#[must_use]
pub fn values_bytes(values: &[f32]) -> Bytes {
    Bytes::copy_from_slice(bytemuck::cast_slice(values))
}

/// Appends the little-endian bytes of `values` to `out`.
pub fn extend_values(out: &mut Vec<u8>, values: &[f32]) {
    out.extend_from_slice(bytemuck::cast_slice(values));
}

/// Packed values read where they lie (in the received buffer): whole
/// little-endian f32 words, never copied into a `Vec<f32>` first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Values<'a>(&'a [u8]);

impl<'a> Values<'a> {
    /// The values packed in `bytes`; its length must be a multiple of 4.
    pub fn new(bytes: &'a [u8]) -> Result<Self, RowsError> {
        if bytes.len().is_multiple_of(4) {
            Ok(Self(bytes))
        } else {
            Err(RowsError::Truncated {
                field: "values",
                len: bytes.len(),
            })
        }
    }

    /// `values` seen as packed (no copy).
    #[must_use]
    pub fn of(values: &'a [f32]) -> Self {
        Self(bytemuck::cast_slice(values))
    }

    /// The packed bytes.
    #[must_use]
    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }

    /// Number of values.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len() / 4
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The values `range` (counted in values); `None` past the end.
    #[must_use]
    pub fn get(&self, range: Range<usize>) -> Option<Values<'a>> {
        self.0
            .get(range.start.checked_mul(4)?..range.end.checked_mul(4)?)
            .map(Values)
    }

    /// The values as `f32`s in place, when the bytes happen to be aligned.
    #[must_use]
    pub fn aligned(&self) -> Option<&'a [f32]> {
        bytemuck::try_cast_slice(self.0).ok()
    }

    /// Copies the values into `out`, which must hold exactly [`Self::len`]
    /// values (otherwise nothing is copied and `false` returned).
    pub fn copy_to(&self, out: &mut [f32]) -> bool {
        let out: &mut [u8] = bytemuck::cast_slice_mut(out);
        if out.len() != self.0.len() {
            return false;
        }
        out.copy_from_slice(self.0);
        true
    }

    /// The values, copied.
    #[must_use]
    pub fn to_vec(&self) -> Vec<f32> {
        bytemuck::pod_collect_to_vec(self.0)
    }

    /// Index of the first value that is NaN or infinite.
    #[must_use]
    pub fn first_non_finite(&self) -> Option<usize> {
        // Exponent bits all set: infinite or NaN.
        const EXPONENT: u32 = 0x7f80_0000;
        // Whole blocks without an early exit (they vectorise); the index is
        // searched for only in a block that has one.
        const BLOCK: usize = 256;
        let non_finite =
            |w: &[u8]| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) & EXPONENT == EXPONENT;
        for (b, block) in self.0.chunks(BLOCK).enumerate() {
            let any = block
                .chunks_exact(4)
                .fold(false, |any, w| any | non_finite(w));
            if any {
                let at = block.chunks_exact(4).position(non_finite)?;
                return Some(b * BLOCK / 4 + at);
            }
        }
        None
    }
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

/// `value` rounded to the nearest bfloat16 (the upper 16 bits of an f32;
/// ties to even), as those 16 bits.
#[must_use]
pub fn to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        // Keep it a NaN (rounding could carry into the exponent).
        return u16::try_from((bits >> 16) | 0x40).unwrap_or(u16::MAX);
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    u16::try_from(rounded >> 16).unwrap_or(u16::MAX)
}

/// The f32 a bfloat16 stands for.
#[must_use]
pub fn from_bf16(half: u16) -> f32 {
    f32::from_bits(u32::from(half) << 16)
}

/// `values` as little-endian bfloat16s, 2 bytes each ([`to_bf16`]).
#[must_use]
pub fn pack_bf16(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| to_bf16(v).to_le_bytes())
        .collect()
}

/// Values packed by [`pack_bf16`].
pub fn unpack_bf16(bytes: &[u8]) -> Result<Vec<f32>, RowsError> {
    if !bytes.len().is_multiple_of(2) {
        return Err(RowsError::Misaligned {
            field: "deltas",
            len: bytes.len(),
            width: 2,
        });
    }
    Ok(bytes
        .chunks_exact(2)
        .map(|c| from_bf16(u16::from_le_bytes([c[0], c[1]])))
        .collect())
}

/// The step of 8-bit linear coding for `values`: the largest magnitude over
/// 127 (0 when all are 0).
#[must_use]
pub fn int8_scale(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0
}

/// `value` in steps of `scale`, rounded to nearest and held to ±127 (0 when
/// `scale` is 0).
#[must_use]
pub fn to_int8(value: f32, scale: f32) -> i8 {
    if scale <= 0.0 || !scale.is_finite() {
        return 0;
    }
    #[allow(clippy::cast_possible_truncation)] // held to ±127 first
    let q = (value / scale).round().clamp(-127.0, 127.0) as i8;
    q
}

/// The value a byte of 8-bit coding in steps of `scale` stands for.
#[must_use]
pub fn from_int8(q: i8, scale: f32) -> f32 {
    f32::from(q) * scale
}

/// Values coded one byte each in steps of `scale` ([`to_int8`]).
#[must_use]
pub fn pack_int8(values: &[f32], scale: f32) -> Vec<u8> {
    values
        .iter()
        .map(|&v| to_int8(v, scale).cast_unsigned())
        .collect()
}

/// Values packed by [`pack_int8`] in steps of `scale`.
#[must_use]
pub fn unpack_int8(bytes: &[u8], scale: f32) -> Vec<f32> {
    bytes
        .iter()
        .map(|&b| from_int8(b.cast_signed(), scale))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_round_trip_as_a_bitmap_no_longer_than_the_shard_needs() {
        let indexes = [0, 1, 7, 8, 130, 131];
        let packed = pack_bitmap(&indexes);
        assert_eq!(packed.len(), 17);
        assert_eq!(&packed[..2], [0b1000_0011, 0b0000_0001]);
        assert_eq!(unpack_bitmap(&packed, 132).unwrap(), indexes);
        assert_eq!(unpack_bitmap(&packed, 136).unwrap(), indexes);
        assert_eq!(
            unpack_bitmap(&packed, 128),
            Err(RowsError::Bitmap {
                bytes: 17,
                elements: 128
            })
        );
        // Across the eight-byte words the reader takes, and a short last one.
        let indexes = [63, 64, 127, 128, 191, 192, 200];
        assert_eq!(unpack_bitmap(&pack_bitmap(&indexes), 201).unwrap(), indexes);
        assert!(pack_bitmap(&[]).is_empty());
        assert!(unpack_bitmap(&[], 0).unwrap().is_empty());
    }

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
    #[allow(clippy::float_cmp)] // the values compared are exact
    fn values_read_in_place() {
        let values = [0.5, -1.25, 3.0, 4.0];
        let packed = pack_values(&values);
        // Unaligned on purpose: one byte in.
        let mut shifted = vec![9];
        shifted.extend_from_slice(&packed);
        let view = Values::new(&shifted[1..]).unwrap();
        assert_eq!(view.len(), 4);
        assert_eq!(view.to_vec(), values);
        assert_eq!(view.get(1..3).unwrap().to_vec(), [-1.25, 3.0]);
        assert!(view.get(3..5).is_none());
        let mut out = [0.0; 2];
        assert!(view.get(2..4).unwrap().copy_to(&mut out));
        assert_eq!(out, [3.0, 4.0]);
        assert!(!view.copy_to(&mut out));
        assert_eq!(Values::of(&values), Values::new(&packed).unwrap());
        assert_eq!(
            Values::new(&[0, 0, 0]),
            Err(RowsError::Truncated {
                field: "values",
                len: 3
            })
        );
    }

    #[test]
    fn finds_the_first_non_finite_value() {
        let mut values = vec![1.0_f32; 1000];
        assert_eq!(Values::of(&values).first_non_finite(), None);
        values[700] = f32::INFINITY;
        values[900] = f32::NAN;
        assert_eq!(Values::of(&values).first_non_finite(), Some(700));
        values[3] = f32::NEG_INFINITY;
        assert_eq!(Values::of(&values).first_non_finite(), Some(3));
        assert_eq!(Values::of(&[f32::MAX, f32::MIN]).first_non_finite(), None);
    }

    #[test]
    #[allow(clippy::float_cmp)] // exact codings
    fn compact_codings_round_to_nearest() {
        // 1 + 2^-8 lies halfway between two bfloat16s: ties go to even (1).
        let values = [1.0, -2.5, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, 0.0];
        let coded = unpack_bf16(&pack_bf16(&values)).unwrap();
        assert_eq!(coded, [1.0, -2.5, 1.0, 1.0 + 4.0 / 256.0, 0.0]);
        assert_eq!(pack_bf16(&values).len(), 2 * values.len());
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert!(unpack_bf16(&[0, 0, 0]).is_err());

        let values = [1.27, -0.5, 0.004, 0.006];
        let scale = int8_scale(&values);
        assert_eq!(scale, 1.27 / 127.0);
        let bytes = pack_int8(&values, scale);
        assert_eq!(
            bytes.iter().map(|&b| b.cast_signed()).collect::<Vec<_>>(),
            [127, -50, 0, 1]
        );
        assert_eq!(unpack_int8(&bytes, scale)[0], 127.0 * scale);
        assert_eq!(pack_int8(&[0.0, 0.0], int8_scale(&[0.0, 0.0])), [0, 0]);
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
