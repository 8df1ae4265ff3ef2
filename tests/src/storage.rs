//! Volumes on a test cluster's node: the data-set claim, bound to the host's
//! data cache, and a default StorageClass whose claims a small provisioner
//! (running with the cluster) binds to new directories on the node, as a
//! cloud's or local-path provisioner would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeSpec,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::Error;

/// The default StorageClass of test clusters.
pub const STORAGE_CLASS: &str = "geoml-local";
/// Its provisioner's name.
const PROVISIONER: &str = "geoml.io/test-hostpath";

/// Creates the default StorageClass and runs its provisioner until the
/// returned task is aborted: every claim of the class gets a new directory
/// under `volumes` (writable by the pods' non-root user) as a hostPath
/// PersistentVolume bound to it.
pub async fn start_provisioner(
    client: kube::Client,
    volumes: PathBuf,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let classes: Api<StorageClass> = Api::all(client.clone());
    let class = json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": STORAGE_CLASS,
            "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
        },
        "provisioner": PROVISIONER,
        "volumeBindingMode": "Immediate",
        "reclaimPolicy": "Delete",
    });
    classes
        .patch(
            STORAGE_CLASS,
            &PatchParams::apply("geoml-tests").force(),
            &Patch::Apply(&class),
        )
        .await
        .map_err(|e| Error::Client(format!("creating StorageClass {STORAGE_CLASS}: {e}")))?;
    Ok(tokio::spawn(async move {
        let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
        let pvs: Api<PersistentVolume> = Api::all(client);
        let mut events = watcher(claims, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            let Ok(claim) = event else { continue };
            if let Err(e) = provision(&pvs, &claim, &volumes).await {
                eprintln!("test provisioner: {e}");
            }
        }
    }))
}

/// Binds `claim` to a new hostPath volume, if it is an unbound claim of
/// [`STORAGE_CLASS`].
async fn provision(
    pvs: &Api<PersistentVolume>,
    claim: &PersistentVolumeClaim,
    volumes: &Path,
) -> Result<(), Error> {
    let Some(spec) = &claim.spec else {
        return Ok(());
    };
    if spec.storage_class_name.as_deref() != Some(STORAGE_CLASS) || spec.volume_name.is_some() {
        return Ok(());
    }
    let uid = claim.uid().unwrap_or_default();
    let name = format!("pvc-{uid}");
    let dir = volumes.join(&name);
    std::fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    set_mode(&dir, 0o777)?;
    let capacity = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k == "storage")
        .collect::<BTreeMap<_, _>>();
    let pv = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: spec.access_modes.clone(),
            capacity: Some(capacity),
            claim_ref: Some(ObjectReference {
                namespace: claim.namespace(),
                name: Some(claim.name_any()),
                uid: Some(uid),
                ..ObjectReference::default()
            }),
            host_path: Some(HostPathVolumeSource {
                path: dir.display().to_string(),
                type_: Some("Directory".to_owned()),
            }),
            storage_class_name: Some(STORAGE_CLASS.to_owned()),
            persistent_volume_reclaim_policy: Some("Retain".to_owned()),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    };
    match pvs.create(&PostParams::default(), &pv).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(Error::Client(format!(
            "creating PersistentVolume {name}: {e}"
        ))),
    }
}

/// Creates claim `claim` in `namespace`, bound to a read-only hostPath
/// volume of `dir` (the host's data cache, in the layout `geoml data fetch`
/// writes).
pub async fn provide_data(
    client: &kube::Client,
    namespace: &str,
    claim: &str,
    dir: &Path,
) -> Result<(), Error> {
    let pv_name = format!("{claim}-{namespace}");
    let apply = PatchParams::apply("geoml-tests").force();
    let pv = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "capacity": {"storage": "10Gi"},
            "hostPath": {"path": dir.display().to_string(), "type": "Directory"},
            "storageClassName": "",
            "claimRef": {"namespace": namespace, "name": claim},
            "persistentVolumeReclaimPolicy": "Retain",
        },
    });
    Api::<PersistentVolume>::all(client.clone())
        .patch(&pv_name, &apply, &Patch::Apply(&pv))
        .await
        .map_err(|e| Error::Client(format!("creating PersistentVolume {pv_name}: {e}")))?;
    let pvc = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": namespace},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "resources": {"requests": {"storage": "10Gi"}},
            "storageClassName": "",
            "volumeName": pv_name,
        },
    });
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace)
        .patch(claim, &apply, &Patch::Apply(&pvc))
        .await
        .map_err(|e| Error::Client(format!("creating PersistentVolumeClaim {claim}: {e}")))?;
    Ok(())
}

fn set_mode(dir: &Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("setting the mode of {}", dir.display())))
}
