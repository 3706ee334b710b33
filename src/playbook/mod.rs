//! Playbooks: what to run, where, under which load, with which faults.
//!
//! Start at [`load`]: it reads a file, parses it strictly ([`schema`]) and
//! checks what the schema alone cannot ([`validate`]). Every failure is a
//! [`PlaybookError`] that names the file, the line, the field and what
//! would be valid, so `shakedown validate` can print it as it is.

pub mod duration;
pub mod lengths;
pub mod locate;
pub mod prompts;
pub mod yaml;
pub mod schema;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use duration::HumanDuration;
pub use locate::FieldPath;
pub use schema::*;

/// A playbook that could not be used, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaybookError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The field path, such as `faults[1].at`; empty for the whole file.
    pub field: String,
    pub message: String,
}

impl fmt::Display for PlaybookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for PlaybookError {}

/// A playbook as read, with the text it came from (kept for the run directory).
#[derive(Debug, Clone)]
pub struct LoadedPlaybook {
    pub path: PathBuf,
    pub text: String,
    pub playbook: Playbook,
    /// The questions of `load.request.prompts`, read once.
    pub prompts: Option<std::sync::Arc<Vec<String>>>,
}

/// Reads, parses and validates a playbook file, without the data files it
/// names: for a run directory's copy, whose data stayed where it was.
pub fn read(path: &Path) -> Result<Playbook, PlaybookError> {
    parse(path, &read_text(path)?)
}

/// Reads, parses and validates a playbook file and reads the data files it
/// names, ready to run.
pub fn load(path: &Path) -> Result<LoadedPlaybook, PlaybookError> {
    let text = read_text(path)?;
    let playbook = parse(path, &text)?;
    let prompts = match &playbook.load.request.prompts {
        None => None,
        Some(file) => {
            // Relative to the playbook, so a playbook and its data travel together.
            let file = path.parent().unwrap_or(Path::new(".")).join(file);
            let questions = crate::playbook::prompts::read_sharegpt(&file).map_err(|err| {
                let field = FieldPath::default()
                    .key("load")
                    .key("request")
                    .key("prompts");
                located(
                    path,
                    &text,
                    validate::Problem {
                        path: field,
                        message: format!("{err:#}"),
                    },
                )
            })?;
            Some(std::sync::Arc::new(questions))
        }
    };
    Ok(LoadedPlaybook {
        path: path.to_path_buf(),
        text,
        playbook,
        prompts,
    })
}

/// Reads a gate policy file: the fields of a playbook's `gate:` section.
pub fn load_gate_policy(path: &Path) -> Result<Gate, PlaybookError> {
    let text = read_text(path)?;
    let gate: Gate = deserialize_located(path, &text)?;
    validate::validate_gate(&gate, FieldPath::default())
        .map_err(|problem| located(path, &text, problem))?;
    Ok(gate)
}

fn read_text(path: &Path) -> Result<String, PlaybookError> {
    let bytes = std::fs::read(path).map_err(|err| PlaybookError {
        file: path.to_path_buf(),
        line: None,
        column: None,
        field: String::new(),
        message: format!("cannot read the file: {err}"),
    })?;
    String::from_utf8(bytes).map_err(|err| {
        let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
        PlaybookError {
            file: path.to_path_buf(),
            line: Some(valid.iter().filter(|&&b| b == b'\n').count() + 1),
            column: None,
            field: String::new(),
            message: "this is not a text file (it is not UTF-8): a playbook is YAML text; see playbooks/quickstart.yaml".into(),
        }
    })
}

/// Strict deserialisation with the field path and the line of any error.
fn deserialize_located<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
) -> Result<T, PlaybookError> {
    let deserializer = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let field = err.path().to_string();
        let field = if field == "." { String::new() } else { field };
        let inner = err.into_inner();
        let location = inner.location();
        PlaybookError {
            file: file.to_path_buf(),
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            message: explain_serde(&inner.to_string(), &field),
            field,
        }
    })
}

/// A problem found after parsing, located at the field it blames.
fn located(file: &Path, text: &str, problem: validate::Problem) -> PlaybookError {
    let location = locate::locate(text, &problem.path);
    PlaybookError {
        file: file.to_path_buf(),
        line: location.map(|l| l.0),
        column: location.map(|l| l.1),
        field: problem.path.to_string(),
        message: problem.message,
    }
}

/// Parses and validates playbook text; `file` only names it in errors.
pub fn parse(file: &Path, text: &str) -> Result<Playbook, PlaybookError> {
    if text.trim().is_empty()
        || text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err(PlaybookError {
            file: file.to_path_buf(),
            line: Some(1),
            column: None,
            field: String::new(),
            message: "the playbook is empty: it starts with `apiVersion: shakedown/v1`; see playbooks/quickstart.yaml".into(),
        });
    }
    let playbook: Playbook = deserialize_located(file, text)?;
    validate::validate(&playbook).map_err(|problem| located(file, text, problem))?;
    Ok(playbook)
}

/// serde_yaml's messages carry the path in front and the location at the
/// end; we print both in front, like a compiler, so we take them off. Rust
/// type names become what a playbook author would call them.
fn explain_serde(message: &str, field: &str) -> String {
    let mut message = match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    if let Some((head, rest)) = message.split_once(": ")
        && !head.contains(' ')
        && (head == "." || field.starts_with(head))
    {
        message = rest;
    }
    let mut message = message.to_string();
    for (rust, words) in [
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected u32", "expected a whole number, 0 or more"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected `true` or `false`"),
        (
            "expected a sequence",
            "expected a list (`- item` lines, or `[a, b]`)",
        ),
    ] {
        message = message.replace(rust, words);
    }
    if message.starts_with("invalid type: unit value") {
        message.push_str(" (the field is there but has no value)");
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> PlaybookError {
        parse(Path::new("p.yaml"), text).unwrap_err()
    }

    const GOOD: &str = r#"apiVersion: shakedown/v1
name: t
duration: 30s
stacks:
  - name: a
    cluster: { kind: local, nodes: 2, gpus_per_node: 1, engine: { replicas: 2 } }
load:
  rate: 5
  request: { prompt_tokens: 64, max_tokens: 8 }
steady_state: { warmup: 2s, baseline: 5s }
faults:
  - { name: kill, at: 10s, action: pod-kill, target: engine, count: 1 }
"#;

    #[test]
    fn a_good_playbook_parses() {
        let pb = parse(Path::new("p.yaml"), GOOD).unwrap();
        assert_eq!(pb.stacks[0].name, "a");
        assert_eq!(pb.faults[0].at.as_secs_f64(), 10.0);
    }

    #[test]
    fn unknown_field_is_located_and_lists_what_is_valid() {
        let e = err(&GOOD.replace("nodes: 2", "nodez: 2"));
        assert_eq!(e.line, Some(6));
        assert_eq!(e.field, "stacks[0].cluster.nodez");
        assert!(e.message.contains("unknown field `nodez`"), "{e}");
        assert!(e.message.contains("`nodes`"), "{e}");
    }

    #[test]
    fn wrong_type_is_located() {
        let e = err(&GOOD.replace("rate: 5", "rate: fast"));
        assert_eq!(e.line, Some(8));
        assert_eq!(e.field, "load.rate");
        assert!(e.message.contains("invalid type"), "{e}");
    }

    #[test]
    fn duration_without_unit_is_located() {
        let e = err(&GOOD.replace("duration: 30s", "duration: 30"));
        assert_eq!((e.line, e.field.as_str()), (Some(3), "duration"));
        assert!(e.message.contains("`30s`"), "{e}");
    }

    #[test]
    fn fault_outside_the_run_is_located() {
        let e = err(&GOOD.replace("at: 10s", "at: 45s"));
        assert_eq!((e.line, e.field.as_str()), (Some(12), "faults[0].at"));
        assert!(e.message.contains("30s"), "{e}");
    }

    #[test]
    fn unknown_role_is_located() {
        let e = err(&GOOD.replace("target: engine", "target: gateway"));
        assert_eq!((e.line, e.field.as_str()), (Some(12), "faults[0].target"));
        assert!(e.message.contains("engine"), "{e}");
    }

    #[test]
    fn missing_field_names_it() {
        let e = err(&GOOD.replace("  rate: 5\n", ""));
        assert!(e.message.contains("missing field `rate`"), "{e}");
        assert_eq!(e.field, "load");
        assert!(e.line.is_some());
    }

    #[test]
    fn empty_and_bad_yaml_are_errors_not_panics() {
        assert!(err("").message.contains("empty"));
        assert!(err("# only a comment\n").message.contains("empty"));
        let e = err("apiVersion: [unclosed\n");
        assert!(e.line.is_some(), "{e}");
    }

    #[test]
    fn the_error_reads_like_a_compiler_message() {
        let e = err(&GOOD.replace("at: 10s", "at: 45s"));
        assert!(e.to_string().starts_with("p.yaml:12:"), "{e}");
    }
}
