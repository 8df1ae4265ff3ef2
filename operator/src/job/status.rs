//! What a job's pods say about it, computed without a cluster: replica
//! counts, failures, readiness.

use geoml_crds::training_job::ReplicaCounts;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::build::{ROLE_LABEL, Role};

/// The pod's phase (`Pending` when unset).
#[must_use]
pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Whether the pod runs and is not reported unready.
#[must_use]
pub fn is_ready(pod: &Pod) -> bool {
    let unready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status != "True"));
    phase(pod) == "Running" && !unready
}

/// Whether the pod is of `role`.
#[must_use]
pub fn has_role(pod: &Pod, role: Role) -> bool {
    pod.labels().get(ROLE_LABEL).map(String::as_str) == Some(role.as_str())
}

/// Replica counts of `role` among `pods`, with `desired` replicas asked for.
#[must_use]
pub fn counts<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    role: Role,
    desired: i32,
) -> ReplicaCounts {
    let mut counts = ReplicaCounts {
        desired,
        ready: 0,
        failed: 0,
    };
    for pod in pods.into_iter().filter(|p| has_role(p, role)) {
        if is_ready(pod) {
            counts.ready += 1;
        } else if phase(pod) == "Failed" {
            counts.failed += 1;
        }
    }
    counts
}

/// Whether the pod has ended, successfully or not.
#[must_use]
pub fn is_done(pod: &Pod) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

/// When the pod's last container ended, if every container has.
#[must_use]
pub fn finished_at(pod: &Pod) -> Option<Time> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses
        .iter()
        .map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.clone())
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .max_by_key(|t| t.0)
}

/// What a pod that is not ready is doing: its phase and, when known, why
/// its first container waits (for example `Pending: ImagePullBackOff`).
#[must_use]
pub fn waiting(pod: &Pod) -> String {
    let phase = phase(pod);
    let reason = pod.status.as_ref().and_then(|s| {
        let waiting = s
            .container_statuses
            .iter()
            .flatten()
            .find_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone());
        waiting.or_else(|| s.reason.clone())
    });
    match reason {
        Some(reason) => format!("{phase}: {reason}"),
        None => phase.to_owned(),
    }
}

/// Why a failed pod failed: the pod's reason and message, else its
/// containers' termination reasons and exit codes.
#[must_use]
pub fn failure(pod: &Pod) -> String {
    let Some(status) = &pod.status else {
        return "failed".to_owned();
    };
    let mut parts: Vec<String> = Vec::new();
    if let Some(reason) = &status.reason {
        parts.push(reason.clone());
    }
    if let Some(message) = &status.message {
        parts.push(message.clone());
    }
    for container in status.container_statuses.iter().flatten() {
        let terminated = container.state.as_ref().and_then(|s| s.terminated.as_ref());
        if let Some(t) = terminated {
            let reason = t.reason.as_deref().unwrap_or("Terminated");
            parts.push(format!(
                "container {} {reason} (exit code {})",
                container.name, t.exit_code
            ));
        }
    }
    if parts.is_empty() {
        "failed".to_owned()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(role: &str, phase: &str, extra: &serde_json::Value) -> Pod {
        let mut status = json!({ "phase": phase });
        if let (Some(s), Some(e)) = (status.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        serde_json::from_value(json!({
            "metadata": { "name": "p", "labels": { ROLE_LABEL: role } },
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn counts_ready_and_failed_replicas_per_role() {
        let pods = [
            pod("ps", "Running", &json!({})),
            pod("ps", "Failed", &json!({})),
            pod(
                "worker",
                "Running",
                &json!({ "conditions": [{ "type": "Ready", "status": "False" }] }),
            ),
            pod(
                "worker",
                "Running",
                &json!({ "conditions": [{ "type": "Ready", "status": "True" }] }),
            ),
            pod("worker", "Pending", &json!({})),
        ];
        let ps = counts(&pods, Role::ParameterServer, 2);
        assert_eq!((ps.desired, ps.ready, ps.failed), (2, 1, 1));
        let workers = counts(&pods, Role::Worker, 4);
        assert_eq!((workers.desired, workers.ready, workers.failed), (4, 1, 0));
    }

    #[test]
    fn failure_names_the_pod_reason_and_container_exit_codes() {
        let failed = pod(
            "ps",
            "Failed",
            &json!({
                "reason": "Evicted",
                "message": "node ran out of memory",
                "containerStatuses": [{
                    "name": "ps", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                    "state": { "terminated": { "exitCode": 137, "reason": "OOMKilled" } },
                }],
            }),
        );
        assert_eq!(
            failure(&failed),
            "Evicted: node ran out of memory: container ps OOMKilled (exit code 137)"
        );
        assert_eq!(failure(&pod("ps", "Failed", &json!({}))), "failed");
    }

    #[test]
    fn waiting_names_the_phase_and_the_containers_reason() {
        let pulling = pod(
            "worker",
            "Pending",
            &json!({ "containerStatuses": [{
                "name": "worker", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": { "waiting": { "reason": "ImagePullBackOff" } },
            }] }),
        );
        assert_eq!(waiting(&pulling), "Pending: ImagePullBackOff");
        assert_eq!(waiting(&pod("ps", "Pending", &json!({}))), "Pending");
    }
}
