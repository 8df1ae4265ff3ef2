//! Generated files are never hand-edited: they match what the code generates.

#![allow(clippy::unwrap_used)] // test code

use std::path::Path;

#[test]
fn crd_yaml_in_manifests_and_chart_is_up_to_date() {
    let expected = geoml_crds::crds_yaml().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in ["manifests/crds.yaml", "charts/geoml/crds/geoml-crds.yaml"] {
        let found = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        assert!(
            found == expected,
            "{file} is stale or missing: run `make generate` and commit the result"
        );
    }
}
