//! `metav1.Condition` lists: set a condition, keeping its transition time
//! while its status stays the same.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Sets condition `type_` in `conditions`. `lastTransitionTime` changes only
/// when the status does, so that re-applying the same facts is a no-op.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" };
    let transition = conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    let condition = Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time: transition,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => *existing = condition,
        None => conditions.push(condition),
    }
}

/// Whether condition `type_` is present with status True.
#[must_use]
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// The condition `type_`, if present.
#[must_use]
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let mut conditions = Vec::new();
        set(
            &mut conditions,
            "Active",
            true,
            "Connected",
            "",
            Some(1),
            &time(10),
        );
        set(
            &mut conditions,
            "Active",
            true,
            "Connected",
            "again",
            Some(2),
            &time(20),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, time(10));
        assert_eq!(conditions[0].message, "again");
        set(
            &mut conditions,
            "Active",
            false,
            "Unreachable",
            "down",
            Some(2),
            &time(30),
        );
        assert_eq!(conditions[0].last_transition_time, time(30));
        assert!(!is_true(&conditions, "Active"));
        assert_eq!(get(&conditions, "Active").unwrap().reason, "Unreachable");
        assert!(get(&conditions, "Running").is_none());
    }
}
