//! YAML in and out, for manifests, topology files and generated CRDs.
//!
//! One parser for the workspace: serde-saphyr, the one kube uses. Documents
//! whose kind is not known yet are [`serde_json::Value`]s: Kubernetes objects
//! are JSON, and a JSON value says everything a manifest can.

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use serde_saphyr::{Error, SerializeError};

/// The documents of a multi-document YAML stream; empty documents are skipped.
pub fn documents(text: &str) -> Result<Vec<serde_json::Value>, Error> {
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)?;
    Ok(documents.into_iter().filter(|d| !d.is_null()).collect())
}

/// One YAML document as a `T`.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    serde_saphyr::from_str(text)
}

/// `value` as one YAML document.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, SerializeError> {
    serde_saphyr::to_string(value)
}

/// `values` as one multi-document YAML stream, each document opened by `---`.
pub fn to_stream<'a, T: Serialize + 'a>(
    values: impl IntoIterator<Item = &'a T>,
) -> Result<String, SerializeError> {
    let mut out = String::new();
    for value in values {
        out.push_str("---\n");
        out.push_str(&to_string(value)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_round_trip_and_skip_empty_documents() {
        let docs = documents("a: 1\n---\n---\nb: [x, 2]\n").unwrap();
        assert_eq!(
            docs,
            [
                serde_json::json!({"a": 1}),
                serde_json::json!({"b": ["x", 2]})
            ]
        );
        let text = to_stream(&docs).unwrap();
        assert_eq!(documents(&text).unwrap(), docs);
    }

    /// The CRDs' descriptions are long, folded prose: reading the generated
    /// file gives back exactly the objects written.
    #[test]
    fn the_generated_crds_read_back_unchanged() {
        let written: Vec<serde_json::Value> = crate::crds()
            .iter()
            .map(|crd| serde_json::to_value(crd).unwrap())
            .collect();
        assert_eq!(documents(&crate::crds_yaml().unwrap()).unwrap(), written);
    }

    #[test]
    fn errors_name_the_line() {
        let e = documents("a: [1\n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }
}
