//! Checks a geoml object against its CRD, as the apiserver does, so `geoml
//! run` refuses exactly what `kubectl apply` would.
//!
//! The schema is the one [`crate::crds`] generates from the Rust types — the
//! same text the apiserver is given — walked the way the apiserver walks a
//! structural schema: `null`s of non-nullable fields are pruned, defaults
//! filled in, then unknown fields, types, `enum`, `minimum`/`maximum`,
//! lengths, item counts, list-map keys and required fields are checked, and
//! every `x-kubernetes-validations` rule is evaluated with the `cel` crate on
//! the defaulted object. Each refusal names the field as the apiserver does
//! (`spec.significance.threshold`). A unit test fails when the generated
//! schemas start using a keyword this walk does not check.

use std::fmt::Write;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    ValidationRule,
};
use serde_json::{Map, Value};

/// Every refusal of one object, `field: why`, in schema order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct Invalid(pub Vec<String>);

/// Fills in the defaults of `object` and checks it against the served
/// version of `crd`. On success `object` is what the apiserver would store.
pub fn object(crd: &CustomResourceDefinition, object: &mut Value) -> Result<(), Invalid> {
    let schema = crd
        .spec
        .versions
        .iter()
        .find(|v| v.served)
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref());
    let Some(schema) = schema else {
        return Err(Invalid(vec![format!(
            "{}: the CRD has no schema",
            crd.spec.names.kind
        )]));
    };
    let mut errors = Vec::new();
    check(schema, object, "", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Invalid(errors))
    }
}

/// Fields every object has that the CRD schema does not describe.
const OBJECT_FIELDS: [&str; 3] = ["apiVersion", "kind", "metadata"];

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Checks `value` at `path`; returns whether it passed.
fn check(
    schema: &JSONSchemaProps,
    value: &mut Value,
    path: &str,
    errors: &mut Vec<String>,
) -> bool {
    let before = errors.len();
    if !has_type(schema, value) {
        let expected = schema.type_.as_deref().unwrap_or("any");
        errors.push(format!(
            "{path}: must be of type {expected}, got {} {value}",
            type_name(value)
        ));
        return false;
    }
    if schema.type_.as_deref() == Some("number") && value.is_i64() | value.is_u64() {
        // CEL sees a number field as a double, whatever the YAML wrote.
        if let Some(n) = value.as_f64().and_then(serde_json::Number::from_f64) {
            *value = Value::Number(n);
        }
    }
    if let Some(allowed) = &schema.enum_
        && !allowed.iter().any(|a| a.0 == *value)
    {
        let list: Vec<String> = allowed.iter().map(|a| a.0.to_string()).collect();
        errors.push(format!(
            "{path}: unsupported value {value}: supported values: {}",
            list.join(", ")
        ));
    }
    match value {
        Value::Number(n) => bounds(schema, n.as_f64().unwrap_or(f64::NAN), path, errors),
        Value::String(s) => lengths(schema, s.chars().count(), path, errors),
        Value::Array(items) => array(schema, items, path, errors),
        Value::Object(fields) => object_fields(schema, fields, path, errors),
        Value::Null | Value::Bool(_) => {}
    }
    if errors.len() == before {
        for rule in schema.x_kubernetes_validations.iter().flatten() {
            if let Some(error) = evaluate(rule, value, path) {
                errors.push(error);
            }
        }
    }
    errors.len() == before
}

fn has_type(schema: &JSONSchemaProps, value: &Value) -> bool {
    if schema.x_kubernetes_int_or_string == Some(true) {
        return value.is_i64() || value.is_u64() || value.is_string();
    }
    match schema.type_.as_deref() {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some("number") => value.is_number(),
        Some("integer") => {
            value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        _ => true,
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn bounds(schema: &JSONSchemaProps, n: f64, path: &str, errors: &mut Vec<String>) {
    if let Some(min) = schema.minimum {
        if schema.exclusive_minimum == Some(true) && n <= min {
            errors.push(format!("{path}: should be greater than {min}, got {n}"));
        } else if n < min {
            errors.push(format!(
                "{path}: should be greater than or equal to {min}, got {n}"
            ));
        }
    }
    if let Some(max) = schema.maximum {
        if schema.exclusive_maximum == Some(true) && n >= max {
            errors.push(format!("{path}: should be less than {max}, got {n}"));
        } else if n > max {
            errors.push(format!(
                "{path}: should be less than or equal to {max}, got {n}"
            ));
        }
    }
}

fn lengths(schema: &JSONSchemaProps, len: usize, path: &str, errors: &mut Vec<String>) {
    let len = i64::try_from(len).unwrap_or(i64::MAX);
    if let Some(min) = schema.min_length.filter(|&min| len < min) {
        errors.push(format!("{path}: should be at least {min} chars long"));
    }
    if let Some(max) = schema.max_length.filter(|&max| len > max) {
        errors.push(format!("{path}: may not be more than {max} chars long"));
    }
}

fn array(schema: &JSONSchemaProps, items: &mut [Value], path: &str, errors: &mut Vec<String>) {
    let len = i64::try_from(items.len()).unwrap_or(i64::MAX);
    if let Some(min) = schema.min_items.filter(|&min| len < min) {
        errors.push(format!("{path}: should have at least {min} items"));
    }
    if let Some(max) = schema.max_items.filter(|&max| len > max) {
        errors.push(format!("{path}: should have at most {max} items"));
    }
    if let Some(JSONSchemaPropsOrArray::Schema(item)) = &schema.items {
        for (i, value) in items.iter_mut().enumerate() {
            check(item, value, &format!("{path}[{i}]"), errors);
        }
    }
    if schema.x_kubernetes_list_type.as_deref() == Some("map") {
        let keys = schema
            .x_kubernetes_list_map_keys
            .as_deref()
            .unwrap_or_default();
        let key = |item: &Value| -> Vec<Value> {
            keys.iter()
                .map(|k| item.get(k).cloned().unwrap_or(Value::Null))
                .collect()
        };
        for (i, item) in items.iter().enumerate() {
            if items[..i].iter().any(|earlier| key(earlier) == key(item)) {
                let mut shown = String::new();
                for (k, v) in keys.iter().zip(key(item)) {
                    let _ = write!(shown, "{}{k}={v}", if shown.is_empty() { "" } else { "," });
                }
                errors.push(format!("{path}[{i}]: duplicate entry with {shown}"));
            }
        }
    }
}

fn object_fields(
    schema: &JSONSchemaProps,
    fields: &mut Map<String, Value>,
    path: &str,
    errors: &mut Vec<String>,
) {
    let properties = schema.properties.as_ref();
    // Pruning and defaulting come first, as in the apiserver.
    for (name, property) in properties.into_iter().flatten() {
        if fields.get(name).is_some_and(Value::is_null) && property.nullable != Some(true) {
            fields.remove(name);
        }
        if let Some(default) = property
            .default
            .as_ref()
            .filter(|_| !fields.contains_key(name))
        {
            fields.insert(name.clone(), default.0.clone());
        }
    }
    for (name, value) in fields.iter_mut() {
        let field = child(path, name);
        match (
            properties.and_then(|p| p.get(name)),
            &schema.additional_properties,
        ) {
            (Some(property), _) => {
                if !(value.is_null() && property.nullable == Some(true)) {
                    check(property, value, &field, errors);
                }
            }
            (None, Some(JSONSchemaPropsOrBool::Schema(property))) => {
                check(property, value, &field, errors);
            }
            (None, Some(JSONSchemaPropsOrBool::Bool(true))) => {}
            (None, _) => {
                let known = path.is_empty() && OBJECT_FIELDS.contains(&name.as_str());
                if !known && schema.x_kubernetes_preserve_unknown_fields != Some(true) {
                    errors.push(format!("{field}: unknown field"));
                }
            }
        }
    }
    for name in schema.required.iter().flatten() {
        if !fields.contains_key(name) {
            errors.push(format!("{}: required value", child(path, name)));
        }
    }
}

/// Evaluates one CEL rule with `self` bound to `value`; the refusal, if any.
fn evaluate(rule: &ValidationRule, value: &Value, path: &str) -> Option<String> {
    let field = match &rule.field_path {
        Some(sub) => format!("{path}{sub}"),
        None => path.to_owned(),
    };
    let refused = |why: String| Some(format!("{field}: {why}"));
    let program = match cel::Program::compile(&rule.rule) {
        Ok(program) => program,
        Err(e) => return refused(format!("rule {:?} does not compile: {e}", rule.rule)),
    };
    let mut context = cel::Context::default();
    match cel::to_value(value) {
        Ok(bound) => context.add_variable_from_value("self", bound),
        Err(e) => return refused(format!("rule {:?}: {e}", rule.rule)),
    }
    match program.execute(&context) {
        Ok(cel::Value::Bool(true)) => None,
        Ok(cel::Value::Bool(false)) => {
            let message = rule
                .message
                .clone()
                .unwrap_or_else(|| format!("failed rule: {}", rule.rule));
            match value {
                Value::Object(_) | Value::Array(_) => refused(message),
                scalar => refused(format!("{message}, got {scalar}")),
            }
        }
        Ok(other) => refused(format!(
            "rule {:?} gave {other:?}, not a boolean",
            rule.rule
        )),
        Err(e) => refused(format!("rule {:?}: {e}", rule.rule)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;
    use crate::{SyncPolicy, TrainingJob};
    use kube::CustomResourceExt;
    use serde_json::json;

    #[allow(clippy::needless_pass_by_value)] // every caller passes a json! literal
    fn policy(spec: Value) -> Result<Value, Invalid> {
        let mut policy = json!({
            "apiVersion": "geoml.io/v1alpha1",
            "kind": "SyncPolicy",
            "metadata": {"name": "p"},
            "spec": spec,
        });
        object(&SyncPolicy::crd(), &mut policy).map(|()| policy)
    }

    #[test]
    fn defaults_are_filled_in_and_numbers_become_doubles() {
        let stored = policy(json!({"significance": {"threshold": 1}})).unwrap();
        assert_eq!(stored["spec"]["significance"]["threshold"], json!(1.0));
        assert_eq!(stored["spec"]["interDatacenter"]["model"], "ASP");
        let typed: SyncPolicy = serde_json::from_value(stored).unwrap();
        assert!((typed.spec.significance.threshold - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn cel_rules_and_ranges_name_the_field() {
        let error = policy(json!({"significance": {"threshold": 5}})).unwrap_err();
        assert_eq!(
            error.to_string(),
            "spec.significance.threshold: must be in (0, 1], got 5.0"
        );
        let error = policy(json!({"significance": {"threshold": 0.5, "floor": 0.9,
            "schedule": "LinearToFloor", "decayClocks": 10}}))
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "spec.significance.floor: floor must be below threshold"
        );
        let error = policy(json!({"interDatacenter": {"model": "SSP"}})).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("spec.interDatacenter.staleness: model SSP needs")
        );
    }

    #[test]
    fn unknown_fields_wrong_types_and_enums_are_refused() {
        let error = policy(json!({"significance": {"treshold": 0.1}})).unwrap_err();
        assert_eq!(
            error.to_string(),
            "spec.significance.treshold: unknown field"
        );
        let error = policy(json!({"significance": {"threshold": "high"}})).unwrap_err();
        assert_eq!(
            error.to_string(),
            "spec.significance.threshold: must be of type number, got string \"high\""
        );
        let error = policy(json!({"interDatacenter": {"model": "Gossip"}})).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("spec.interDatacenter.model: unsupported value \"Gossip\""),
            "{error}"
        );
    }

    #[test]
    fn required_fields_item_counts_and_duplicate_keys_are_refused() {
        let mut job = json!({
            "apiVersion": "geoml.io/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": "j"},
            "spec": {
                "model": {"kind": "SoftmaxRegression"},
                "dataset": {"name": "FashionMNIST"},
                "datacenters": [{"name": "a"}, {"name": "a", "workers": -1}],
            },
        });
        let error = object(&TrainingJob::crd(), &mut job).unwrap_err();
        assert_eq!(
            error.0,
            [
                "spec.datacenters[1].workers: should be greater than or equal to 1, got -1",
                "spec.datacenters[1]: duplicate entry with name=\"a\"",
                "spec.syncPolicyRef: required value",
            ]
        );
    }

    /// Keywords the walk above checks or that carry no constraint. A new
    /// keyword in a generated schema must be implemented before it is used.
    #[test]
    fn the_generated_schemas_use_only_keywords_this_walk_checks() {
        const UNDERSTOOD: [&str; 25] = [
            "type",
            "format",
            "description",
            "title",
            "nullable",
            "default",
            "properties",
            "additionalProperties",
            "required",
            "items",
            "enum",
            "minimum",
            "maximum",
            "exclusiveMinimum",
            "exclusiveMaximum",
            "minLength",
            "maxLength",
            "minItems",
            "maxItems",
            "x-kubernetes-validations",
            "x-kubernetes-list-type",
            "x-kubernetes-list-map-keys",
            "x-kubernetes-int-or-string",
            "x-kubernetes-preserve-unknown-fields",
            "x-kubernetes-map-type",
        ];
        fn walk(schema: &Value, path: &str, unknown: &mut Vec<String>) {
            let Some(fields) = schema.as_object() else {
                return;
            };
            for (keyword, value) in fields {
                if !UNDERSTOOD.contains(&keyword.as_str()) {
                    unknown.push(format!("{path}: {keyword}"));
                }
                match keyword.as_str() {
                    "properties" => {
                        for (name, property) in value.as_object().into_iter().flatten() {
                            walk(property, &child(path, name), unknown);
                        }
                    }
                    "items" | "additionalProperties" => walk(value, &format!("{path}[]"), unknown),
                    _ => {}
                }
            }
        }
        let mut unknown = Vec::new();
        for crd in crate::crds() {
            for version in &crd.spec.versions {
                let schema = serde_json::to_value(&version.schema).unwrap();
                walk(
                    &schema["openAPIV3Schema"],
                    &crd.spec.names.kind,
                    &mut unknown,
                );
            }
        }
        assert!(unknown.is_empty(), "not checked by validate: {unknown:?}");
    }
}
