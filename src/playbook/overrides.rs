//! Changes to a playbook from the command line, so the shipped playbooks
//! run unedited on any cluster: `--context`, `--namespace` (every
//! Kubernetes stack), `--stack NAME` (only that stack, and the faults that
//! apply to it), and `--set path=value` for any field.
//!
//! A path is dotted keys and `[index]`es as errors print them
//! (`load.rate`, `faults[1].at`), and a list of named items (stacks,
//! faults) may be indexed by name: `stacks.aibrix.endpoint`. A value is
//! YAML: `--set load.rate=8`, `--set 'load.slo={ ttft: 500ms }'`.
//!
//! They apply to the document before it is typed and checked, so a bad
//! value gets the same error as in the file. The playbook as run (written
//! to the run directory) is the document after them, with a header that
//! says which were given.

use serde_json::{Map, Value};

/// What the command line changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub context: Option<String>,
    pub namespace: Option<String>,
    pub stack: Option<String>,
    /// `path=value` pairs, applied in order.
    pub set: Vec<String>,
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        *self == Overrides::default()
    }

    /// As a shell would pass them, for the header of the playbook as run.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = &self.context {
            parts.push(format!("--context {c}"));
        }
        if let Some(n) = &self.namespace {
            parts.push(format!("--namespace {n}"));
        }
        if let Some(s) = &self.stack {
            parts.push(format!("--stack {s}"));
        }
        for set in &self.set {
            parts.push(format!("--set '{set}'"));
        }
        parts.join(" ")
    }

    /// Applies them to a document; `Err` says which one cannot apply.
    pub fn apply(&self, doc: &mut Value) -> Result<(), String> {
        let stacks = doc.get_mut("stacks").and_then(Value::as_array_mut).ok_or(
            "the playbook has no `stacks` list to apply --context, --namespace or --stack to",
        )?;
        if let Some(name) = &self.stack {
            let known: Vec<String> = stacks
                .iter()
                .filter_map(|s| s["name"].as_str().map(|n| format!("`{n}`")))
                .collect();
            stacks.retain(|s| s["name"].as_str() == Some(name.as_str()));
            if stacks.is_empty() {
                return Err(format!(
                    "--stack {name}: the playbook has no such stack; its stacks are {}",
                    known.join(", ")
                ));
            }
        }
        for stack in stacks.iter_mut() {
            let Some(cluster) = stack.get_mut("cluster").and_then(Value::as_object_mut) else {
                continue;
            };
            if cluster.get("kind").and_then(Value::as_str) != Some("kubernetes") {
                continue;
            }
            if let Some(context) = &self.context {
                cluster.insert("context".into(), Value::String(context.clone()));
            }
            if let Some(namespace) = &self.namespace {
                cluster.insert("namespace".into(), Value::String(namespace.clone()));
            }
        }
        if let Some(name) = &self.stack {
            // Faults limited to other stacks go; those for this one stay.
            if let Some(faults) = doc.get_mut("faults").and_then(Value::as_array_mut) {
                faults.retain(|f| match f.get("stacks").and_then(Value::as_array) {
                    None => true,
                    Some(names) => names.iter().any(|n| n.as_str() == Some(name.as_str())),
                });
            }
        }
        for set in &self.set {
            let (path, value) = set.split_once('=').ok_or_else(|| {
                format!("--set {set}: write it as `path=value`, such as `load.rate=8`")
            })?;
            let value: Value = crate::playbook::yaml::from_str(value)
                .map_err(|err| format!("--set {set}: the value is not YAML: {}", err.message))?;
            set_path(doc, path.trim(), value).map_err(|why| format!("--set {set}: {why}"))?;
        }
        Ok(())
    }
}

/// One step of a `--set` path.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn steps(path: &str) -> Result<Vec<Step<'_>>, String> {
    let mut steps = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            steps.push(Step::Key(key));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let end = inner
                .find(']')
                .ok_or_else(|| format!("`{path}` has an unclosed `[`"))?;
            let index = inner[..end]
                .parse()
                .map_err(|_| format!("`{path}`: `[{}]` is not an index", &inner[..end]))?;
            steps.push(Step::Index(index));
            rest = &inner[end + 1..];
        }
    }
    if steps.is_empty() {
        return Err("the path is empty".into());
    }
    Ok(steps)
}

/// Sets the field at `path`, making mappings on the way; a key on a list
/// of named items picks the item of that name.
fn set_path(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    let steps = steps(path)?;
    let mut node = doc;
    for (i, step) in steps.iter().enumerate() {
        let last = i + 1 == steps.len();
        node = match (step, node) {
            (Step::Key(key), Value::Array(items)) => {
                let item = items
                    .iter_mut()
                    .find(|item| item["name"].as_str() == Some(key))
                    .ok_or_else(|| format!("no item named `{key}` in the list at `{path}`"))?;
                if last {
                    *item = value;
                    return Ok(());
                }
                item
            }
            (Step::Key(key), node) => {
                if node.is_null() {
                    *node = Value::Object(Map::new());
                }
                let map = node
                    .as_object_mut()
                    .ok_or_else(|| format!("`{key}` is set on something that is not a mapping"))?;
                if last {
                    map.insert((*key).to_string(), value);
                    return Ok(());
                }
                map.entry((*key).to_string()).or_insert(Value::Null)
            }
            (Step::Index(index), Value::Array(items)) => {
                let len = items.len();
                let item = items
                    .get_mut(*index)
                    .ok_or_else(|| format!("[{index}] is past the end of a list of {len}"))?;
                if last {
                    *item = value;
                    return Ok(());
                }
                item
            }
            (Step::Index(index), _) => {
                return Err(format!("[{index}] indexes something that is not a list"));
            }
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        serde_json::json!({
            "stacks": [
                {"name": "a", "cluster": {"kind": "kubernetes", "context": "staging"}},
                {"name": "b", "cluster": {"kind": "local"}},
            ],
            "load": {"rate": 4},
            "faults": [
                {"name": "k", "at": "5s", "stacks": ["b"]},
                {"name": "j", "at": "6s"},
            ],
        })
    }

    #[test]
    fn context_namespace_and_stack_apply_where_they_mean_something() {
        let mut d = doc();
        Overrides {
            context: Some("kind-dev".into()),
            namespace: Some("llm".into()),
            stack: Some("a".into()),
            set: vec![],
        }
        .apply(&mut d)
        .unwrap();
        assert_eq!(d["stacks"].as_array().unwrap().len(), 1);
        assert_eq!(d["stacks"][0]["cluster"]["context"], "kind-dev");
        assert_eq!(d["stacks"][0]["cluster"]["namespace"], "llm");
        let faults: Vec<&str> = d["faults"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(faults, vec!["j"], "the fault of stack b only went");
    }

    #[test]
    fn set_takes_paths_indexes_names_and_yaml_values() {
        let mut d = doc();
        Overrides {
            set: vec![
                "load.rate=8".into(),
                "faults[1].at=7s".into(),
                "stacks.b.endpoint=http://127.0.0.1:9".into(),
                "load.slo={ ttft: 500ms }".into(),
            ],
            ..Overrides::default()
        }
        .apply(&mut d)
        .unwrap();
        assert_eq!(d["load"]["rate"], 8);
        assert_eq!(d["faults"][1]["at"], "7s");
        assert_eq!(d["stacks"][1]["endpoint"], "http://127.0.0.1:9");
        assert_eq!(d["load"]["slo"]["ttft"], "500ms");
        let err = Overrides {
            set: vec!["stacks.c.endpoint=x".into()],
            ..Overrides::default()
        }
        .apply(&mut doc())
        .unwrap_err();
        assert!(err.contains("no item named `c`"), "{err}");
        let err = Overrides {
            stack: Some("z".into()),
            ..Overrides::default()
        }
        .apply(&mut doc())
        .unwrap_err();
        assert!(err.contains("`a`, `b`"), "{err}");
    }
}
