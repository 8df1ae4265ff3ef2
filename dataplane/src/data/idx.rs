//! The IDX format of (Fashion-)MNIST: a big-endian header, then the array.
//!
//! Layout: two zero bytes, a type byte (0x08 for unsigned bytes, the only
//! type geoml reads), a byte with the number of dimensions `d`, `d` sizes as
//! big-endian `u32`, then the elements in row-major order.

use super::DataError;

/// An array of unsigned bytes read from an IDX file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// Size of each dimension, outermost first.
    pub dims: Vec<usize>,
    /// The elements, row-major.
    pub data: Vec<u8>,
}

/// IDX type byte for unsigned 8-bit elements.
const TYPE_U8: u8 = 0x08;

/// Parses an IDX buffer of unsigned bytes, keeping its elements in place
/// (no copy of a 47 MB file); `file` names it in errors.
pub fn parse(mut bytes: Vec<u8>, file: &str) -> Result<IdxArray, DataError> {
    let bad = |detail: String| DataError::Format {
        file: file.to_owned(),
        detail,
    };
    let [zero0, zero1, kind, ndims, rest @ ..] = &bytes[..] else {
        return Err(bad(format!(
            "{} bytes is too short for a header",
            bytes.len()
        )));
    };
    if (*zero0, *zero1) != (0, 0) {
        return Err(bad(format!(
            "magic starts {zero0:#04x} {zero1:#04x}, not 0x00 0x00"
        )));
    }
    if *kind != TYPE_U8 {
        return Err(bad(format!(
            "element type {kind:#04x} is not unsigned byte (0x08)"
        )));
    }
    let ndims = usize::from(*ndims);
    if rest.len() < 4 * ndims {
        return Err(bad(format!("header of {ndims} dimensions is truncated")));
    }
    let (sizes, data) = rest.split_at(4 * ndims);
    let dims: Vec<usize> = sizes
        .chunks_exact(4)
        .map(|c| {
            let size = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            usize::try_from(size).map_err(|_| bad(format!("dimension {size} is too large")))
        })
        .collect::<Result<_, _>>()?;
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    if data.len() != count {
        return Err(bad(format!(
            "dimensions {dims:?} need {count} bytes of data, found {}",
            data.len()
        )));
    }
    bytes.drain(..4 + 4 * ndims);
    Ok(IdxArray { dims, data: bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two 2x3 "images" with pixel values 0..12.
    fn images() -> Vec<u8> {
        let mut buf = vec![0, 0, 0x08, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
        buf.extend(0..12u8);
        buf
    }

    #[test]
    fn parses_a_hand_built_buffer() {
        let array = parse(images(), "t").unwrap();
        assert_eq!(array.dims, vec![2, 2, 3]);
        assert_eq!(array.data, (0..12).collect::<Vec<u8>>());

        let labels = parse(vec![0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9], "l").unwrap();
        assert_eq!(labels.dims, vec![3]);
        assert_eq!(labels.data, vec![7, 8, 9]);
    }

    #[test]
    fn rejects_malformed_buffers() {
        let mut wrong_magic = images();
        wrong_magic[1] = 1;
        let mut wrong_type = images();
        wrong_type[2] = 0x0D;
        let mut short = images();
        short.pop();
        let mut long = images();
        long.push(0);
        for (buf, words) in [
            (&wrong_magic[..], "magic"),
            (&wrong_type[..], "element type"),
            (&short[..], "need 12 bytes"),
            (&long[..], "found 13"),
            (&[0, 0, 8][..], "too short"),
            (&[0, 0, 8, 2, 0, 0, 0][..], "truncated"),
        ] {
            let err = parse(buf.to_vec(), "bad.idx").unwrap_err().to_string();
            assert!(err.contains("bad.idx") && err.contains(words), "{err}");
        }
    }
}
