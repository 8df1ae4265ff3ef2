//! scikit-learn's 8x8 handwritten digits, embedded in the binary.
//!
//! 1797 images of the digits 0 to 9, each 64 pixels valued 0 to 16, from
//! `dataplane/data/digits.csv.gz` (BSD-3-Clause, the scikit-learn developers;
//! see `dataplane/data/README.md`). Small enough for quick tests and demos:
//! loading it needs no network and no cache. Every fifth example (index
//! `% 5 == 4`) is held out for test, the rest are for training.

use std::io::Read;

use flate2::read::GzDecoder;
use ndarray::Array2;

use super::{Classification, DataError, DataSet, Examples, fetch};

/// The gzipped CSV: one image a line, 64 pixels then the label.
pub const CSV_GZ: &[u8] = include_bytes!("../../data/digits.csv.gz");

/// SHA-256 of [`CSV_GZ`].
pub const SHA256: &str = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22";

/// Number of examples.
pub const EXAMPLES: usize = 1797;

/// Pixels per image (8x8).
pub const PIXELS: usize = 64;

/// Number of classes.
pub const CLASSES: usize = 10;

/// Largest pixel value; pixels are divided by it.
const MAX_PIXEL: f32 = 16.0;

/// Name of the embedded file in errors.
const FILE: &str = "digits.csv.gz";

/// Loads the embedded digits, split into train and test.
pub fn load() -> Result<DataSet, DataError> {
    fetch::verify(FILE.as_ref(), CSV_GZ, SHA256)?;
    let mut csv = String::new();
    GzDecoder::new(CSV_GZ)
        .read_to_string(&mut csv)
        .map_err(|e| DataError::Format {
            file: FILE.to_owned(),
            detail: format!("cannot decompress: {e}"),
        })?;
    let all = Examples::Classification(parse_csv(&csv)?);
    let (train, test): (Vec<usize>, Vec<usize>) = (0..all.len()).partition(|i| i % 5 != 4);
    Ok(DataSet {
        train: all.select(&train),
        test: all.select(&test),
    })
}

/// Parses lines of 64 pixels (0 to 16) and a label (0 to 9), separated by
/// commas, into examples with pixels scaled to [0, 1].
pub fn parse_csv(text: &str) -> Result<Classification, DataError> {
    let bad = |line: usize, detail: String| DataError::Format {
        file: FILE.to_owned(),
        detail: format!("line {line}: {detail}"),
    };
    let mut features = Vec::with_capacity(EXAMPLES * PIXELS);
    let mut labels = Vec::with_capacity(EXAMPLES);
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let values = line
            .split(',')
            .map(|v| v.trim().parse::<u8>())
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|e| bad(i + 1, format!("not a small integer: {e}")))?;
        let [pixels @ .., label] = &values[..] else {
            return Err(bad(i + 1, "empty line".to_owned()));
        };
        if pixels.len() != PIXELS {
            return Err(bad(i + 1, format!("{} pixels, not {PIXELS}", pixels.len())));
        }
        if let Some(p) = pixels.iter().find(|&&p| f32::from(p) > MAX_PIXEL) {
            return Err(bad(i + 1, format!("pixel {p} is above {MAX_PIXEL}")));
        }
        if usize::from(*label) >= CLASSES {
            return Err(bad(i + 1, format!("label {label} is not below {CLASSES}")));
        }
        features.extend(pixels.iter().map(|&p| f32::from(p) / MAX_PIXEL));
        labels.push(u16::from(*label));
    }
    let features = Array2::from_shape_vec((labels.len(), PIXELS), features)
        .map_err(|e| bad(0, format!("not a matrix: {e}")))?;
    Ok(Classification {
        features,
        labels,
        classes: CLASSES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_file_has_the_recorded_hash() {
        assert_eq!(fetch::sha256_hex(CSV_GZ), SHA256);
    }

    #[test]
    fn loads_with_the_right_shapes() {
        let data = load().unwrap();
        let (Examples::Classification(train), Examples::Classification(test)) =
            (&data.train, &data.test)
        else {
            panic!("digits are classification");
        };
        assert_eq!(train.features.dim(), (1438, 64));
        assert_eq!(test.features.dim(), (359, 64));
        assert_eq!(train.labels.len() + test.labels.len(), EXAMPLES);
        assert_eq!((train.classes, test.classes), (10, 10));
        assert!(train.labels.iter().chain(&test.labels).all(|&l| l < 10));
        assert!(train.features.iter().all(|&p| (0.0..=1.0).contains(&p)));
        assert!(
            train
                .features
                .iter()
                .any(|&p| (p - 1.0).abs() < f32::EPSILON)
        );
        // Each digit appears, in both halves.
        for digit in 0..10 {
            assert!(train.labels.contains(&digit) && test.labels.contains(&digit));
        }
        // The first example of the file is a zero, and index 4 (test) a four.
        assert_eq!((train.labels[0], test.labels[0]), (0, 4));
    }

    #[test]
    fn rejects_bad_rows() {
        let row = |pixels: usize, value: &str, label: &str| {
            let mut v = vec![value; pixels];
            v.push(label);
            v.join(",")
        };
        assert!(parse_csv(&row(64, "3", "7")).is_ok());
        for (text, words) in [
            (row(63, "3", "7"), "63 pixels"),
            (row(64, "17", "7"), "above"),
            (row(64, "3", "10"), "label 10"),
            (row(64, "x", "1"), "small integer"),
        ] {
            let err = parse_csv(&text).unwrap_err().to_string();
            assert!(err.contains(words), "{err}");
        }
    }
}
