//! The playbook's JSON Schema and its reference page, both generated from
//! the types `validate` reads, so neither can drift from what shakedown
//! accepts: `shakedown schema` prints the schema (committed as
//! `playbook.schema.json`, which every shipped playbook names for editors),
//! and [`playbook_reference`] renders it as `docs/playbook.md`. Tests keep
//! both files equal to what these functions make.
//!
//! A schema sees the shape (fields, types, units, names, ranges); checks
//! across fields (a fault after the run, more replicas than GPUs) stay
//! `shakedown validate`'s.

use serde_json::{Map, Value, json};

use super::{FaultSpec, playbook};
use crate::playbook::{HumanDuration, Params};

/// One action's fields, with the fields every fault has and its name as
/// the only `action` it accepts.
pub(super) fn action_schema<T: schemars::JsonSchema>(
    generator: &mut schemars::SchemaGenerator,
    action: &str,
) -> Value {
    let own = Value::from(T::json_schema(generator));
    let mut schema = Map::new();
    schema.insert("type".into(), "object".into());
    if let Some(description) = own.get("description") {
        schema.insert("description".into(), description.clone());
    }
    let mut properties = own
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let duration = Value::from(generator.subschema_for::<HumanDuration>());
    properties.insert(
        "name".into(),
        json!({ "type": "string", "description": "Unique in the playbook." }),
    );
    properties.insert(
        "at".into(),
        json!({ "allOf": [duration], "description": "When, from the start of each stack's load." }),
    );
    properties.insert("action".into(), json!({ "const": action }));
    properties.insert(
        "target".into(),
        json!({ "type": "string", "description": "A role: `engine`, `router`, or one the stack names." }),
    );
    properties.insert(
        "stacks".into(),
        json!({ "type": "array", "items": { "type": "string" }, "description": "Only these stacks; all when left out." }),
    );
    let mut required: Vec<Value> = ["name", "at", "action", "target"].map(Value::from).to_vec();
    if let Some(own_required) = own.get("required").and_then(Value::as_array) {
        required.extend(own_required.iter().cloned());
    }
    schema.insert("properties".into(), properties.into());
    schema.insert("required".into(), required.into());
    schema.insert("additionalProperties".into(), false.into());
    Value::Object(schema)
}

impl schemars::JsonSchema for crate::playbook::Fault<Params> {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Fault".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        FaultSpec::fault_schema(generator)
    }
}

/// The playbook's JSON Schema (draft 2020-12).
pub fn playbook_schema() -> Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .for_deserialize()
        .into_generator();
    let mut schema = Value::from(generator.into_root_schema_for::<playbook::Playbook<Params>>());
    if let Some(object) = schema.as_object_mut() {
        object.insert(
            "$id".into(),
            "https://shakedown.dev/schema/playbook.schema.json".into(),
        );
        object.insert("title".into(), "shakedown playbook".into());
    }
    schema
}

const INTRO: &str = "# Playbook reference

Generated from the types `shakedown validate` reads (`cargo test` keeps it
in sync): every field, its type, its default and what it means. The
playbooks in [`playbooks/`](../playbooks) are commented examples of each
scenario; [`playbook.schema.json`](../playbook.schema.json) is the same
reference as a JSON Schema, which every shipped playbook names on its first
line so editors with a YAML language server complete and check it:

```yaml
# yaml-language-server: $schema=../playbook.schema.json
```

Durations are strings with a unit: `200ms`, `8s`, `1.5s`, `5m`, `1h30m`.
Rates are per second. A field without a default is required. The schema
sees shapes (fields, types, units, ranges); `shakedown validate` also checks
across fields (a fault after the run's end, more replicas than GPUs) and
names the file, line and field of every problem.

";

/// `docs/playbook.md`: the schema as tables, one per object, in the order a
/// playbook reads.
pub fn playbook_reference() -> String {
    let schema = playbook_schema();
    let empty = Map::new();
    let defs = schema
        .get("$defs")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mut out = String::from(INTRO);
    out.push_str("## Playbook\n\nThe top level.\n\n");
    out.push_str(&fields_table(&schema));
    // Definitions in the order they are first referred to, top down.
    let mut order: Vec<String> = Vec::new();
    let mut queue = vec![schema.clone()];
    while let Some(node) = queue.pop() {
        let mut found = Vec::new();
        refs(&node, &mut found);
        for name in found.into_iter().rev() {
            if !order.contains(&name)
                && let Some(def) = defs.get(&name)
            {
                order.push(name);
                queue.insert(0, def.clone());
            }
        }
    }
    for name in order {
        let Some(def) = defs.get(&name) else { continue };
        out.push_str(&format!("## {name}\n\n"));
        if let Some(description) = def.get("description").and_then(Value::as_str) {
            out.push_str(&format!("{}\n\n", one_line(description)));
        }
        if let Some(variants) = def.get("oneOf").and_then(Value::as_array)
            && def.get("properties").is_none()
            && variants.iter().all(|v| v.get("properties").is_some())
        {
            // The faults: a table per action.
            for variant in variants {
                let action = variant
                    .pointer("/properties/action/const")
                    .and_then(Value::as_str)
                    .unwrap_or("?");
                out.push_str(&format!("### action: `{action}`\n\n"));
                if let Some(description) = variant.get("description").and_then(Value::as_str) {
                    out.push_str(&format!("{}\n\n", one_line(description)));
                }
                out.push_str(&fields_table(variant));
            }
        } else if def.get("properties").is_some() {
            out.push_str(&fields_table(def));
        } else {
            out.push_str(&format!("One of: {}.\n\n", type_of(def)));
        }
    }
    out
}

/// Every `$ref` name under `node`, in order.
fn refs(node: &Value, found: &mut Vec<String>) {
    match node {
        Value::Object(map) => {
            for (key, value) in map {
                if key == "$ref" {
                    if let Some(name) = value.as_str().and_then(|r| r.strip_prefix("#/$defs/")) {
                        found.push(name.to_string());
                    }
                } else if key != "$defs" {
                    refs(value, found);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
        _ => {}
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A field's type in words, with links to the tables of named types.
fn type_of(node: &Value) -> String {
    if let Some(name) = node
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
    {
        return format!("[{name}](#{})", name.to_lowercase());
    }
    if let Some(value) = node.get("const") {
        return format!(
            "`{}`",
            value.as_str().map_or(value.to_string(), String::from)
        );
    }
    if let Some(values) = node.get("enum").and_then(Value::as_array) {
        return values
            .iter()
            .map(|v| format!("`{}`", v.as_str().map_or(v.to_string(), String::from)))
            .collect::<Vec<_>>()
            .join(", ");
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(options) = node.get(key).and_then(Value::as_array) {
            let shown: Vec<String> = options
                .iter()
                .filter(|o| o.get("type").and_then(Value::as_str) != Some("null"))
                .map(type_of)
                .collect();
            return shown.join(" or ");
        }
    }
    let kind = match node.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        Some(Value::Array(kinds)) => kinds
            .iter()
            .filter_map(Value::as_str)
            .filter(|k| *k != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "any".into(),
    };
    match kind.as_str() {
        "array" => format!(
            "list of {}",
            node.get("items").map_or_else(|| "any".into(), type_of)
        ),
        "integer" | "number" => {
            let mut range = Vec::new();
            if let Some(min) = node.get("minimum").filter(|m| m.as_f64() != Some(0.0)) {
                range.push(format!("≥ {min}"));
            }
            if let Some(min) = node.get("exclusiveMinimum") {
                range.push(format!("> {min}"));
            }
            if let Some(max) = node.get("maximum") {
                range.push(format!("≤ {max}"));
            }
            if range.is_empty() {
                kind
            } else {
                format!("{kind} {}", range.join(", "))
            }
        }
        _ => kind,
    }
}

fn fields_table(object: &Value) -> String {
    let empty = Map::new();
    let properties = object
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let required: Vec<&str> = object
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut out = String::from("| field | type | default | meaning |\n|---|---|---|---|\n");
    for (name, field) in properties {
        let default = match field.get("default") {
            Some(Value::Null) => "–".into(),
            Some(Value::Object(_)) => "its fields' defaults".into(),
            Some(Value::String(text)) if text.is_empty() => "empty".into(),
            Some(value) => format!(
                "`{}`",
                value.as_str().map_or(value.to_string(), String::from)
            ),
            None if required.contains(&name.as_str()) => "required".into(),
            None => "–".into(),
        };
        let description = field
            .get("description")
            .and_then(Value::as_str)
            .map(one_line)
            .unwrap_or_default();
        out.push_str(&format!(
            "| `{name}` | {} | {default} | {} |\n",
            type_of(field).replace('|', "\\|"),
            description.replace('|', "\\|")
        ));
    }
    out.push('\n');
    out
}
