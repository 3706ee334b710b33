//! Playbooks: what to run, where, under which load, with which faults.
//!
//! Start at [`load`]: it reads a file, checks its YAML ([`yaml`]), parses it
//! strictly ([`schema`]), types each fault's own fields through the fault
//! kinds it is given ([`FaultSpecs`], implemented by [`crate::faults`]),
//! and checks what the schema alone cannot ([`validate`]). Every failure is
//! a [`PlaybookError`] that names the file, the line, the field and what
//! would be valid, so `shakedown validate` can print it as it is; further
//! problems of the same file ride along in [`PlaybookError::more`].
//!
//! This module knows no fault kind: it is below [`crate::faults`], which
//! owns each action's fields, checks and behaviour.

pub mod duration;
pub mod lengths;
pub mod overrides;
pub mod prompts;
pub mod schema;
mod validate;
pub mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};

pub use duration::HumanDuration;
pub use overrides::Overrides;
pub use schema::*;
pub use validate::fits;
pub use yaml::FieldPath;

/// What went wrong in a playbook, at the field to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: FieldPath,
    pub message: String,
}

impl Problem {
    pub fn at(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
        }
    }
}

/// The fault kinds a playbook can hold: how an action's fields become its
/// spec, and the checks only the action knows.
pub trait FaultSpecs: Sized {
    /// Types a fault's action and fields. A problem's path is relative to
    /// the fault (`count`, `action`).
    fn parse(params: &Params) -> Result<Self, Problem>;

    /// The action's own checks of a fault at `path` of `pb`.
    fn check(pb: &Playbook<Self>, fault: &Fault<Self>, path: &FieldPath) -> Result<(), Problem>;
}

/// A playbook that could not be used, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaybookError {
    pub file: PathBuf,
    pub line: Option<u32>,
    pub column: Option<u32>,
    /// The field path, such as `faults[1].at`; empty for the whole file.
    pub field: String,
    pub message: String,
    /// The file's other problems, each located the same way.
    pub more: Vec<PlaybookError>,
}

impl PlaybookError {
    pub fn whole_file(file: &Path, line: Option<u32>, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            line,
            column: None,
            field: String::new(),
            message: message.into(),
            more: Vec::new(),
        }
    }

    /// This problem and the others of the same file, each on its own.
    pub fn all(&self) -> impl Iterator<Item = &PlaybookError> {
        std::iter::once(self).chain(self.more.iter())
    }
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
pub struct LoadedPlaybook<S> {
    pub path: PathBuf,
    pub text: String,
    pub playbook: Playbook<S>,
    /// The questions of `load.request.prompts`, read once.
    pub prompts: Option<std::sync::Arc<Vec<String>>>,
}

/// Reads, parses and validates a playbook file, without the data files it
/// names: for a run directory's copy, whose data stayed where it was.
pub fn read<S: FaultSpecs>(path: &Path) -> Result<Playbook<S>, PlaybookError> {
    parse(path, &read_text(path)?)
}

/// Reads, parses and validates a playbook file and reads the data files it
/// names, ready to run.
pub fn load<S: FaultSpecs>(path: &Path) -> Result<LoadedPlaybook<S>, PlaybookError> {
    load_with(path, &Overrides::default())
}

/// [`load`], with the command line's changes applied first: the text kept
/// (for the run directory) is then the playbook as run, and errors are
/// located in the file where the field is there.
pub fn load_with<S: FaultSpecs>(
    path: &Path,
    overrides: &Overrides,
) -> Result<LoadedPlaybook<S>, PlaybookError> {
    let original = read_text(path)?;
    let (text, playbook) = if overrides.is_empty() {
        let playbook = parse(path, &original)?;
        (original, playbook)
    } else {
        check_syntax(path, &original)?;
        let mut doc: serde_json::Value =
            yaml::from_str(&original).map_err(|err| from_yaml_error(path, err))?;
        overrides
            .apply(&mut doc)
            .map_err(|why| PlaybookError::whole_file(path, None, why))?;
        let text = format!(
            "# The playbook as run: {} with {}\n{}\n",
            path.display(),
            overrides.describe(),
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        );
        let playbook = parse_located_in(path, &text, &original).map_err(|mut err| {
            let note = " (with the command line's overrides)";
            err.message.push_str(note);
            for problem in &mut err.more {
                problem.message.push_str(note);
            }
            err
        })?;
        (text, playbook)
    };
    let prompts = match &playbook.load.request.prompts {
        None => None,
        Some(file) => {
            // Relative to the playbook, so a playbook and its data travel together.
            let file = path.parent().unwrap_or(Path::new(".")).join(file);
            let questions = prompts::read_sharegpt(&file).map_err(|err| {
                let field = FieldPath::default()
                    .key("load")
                    .key("request")
                    .key("prompts");
                located(path, &text, vec![Problem::at(field, format!("{err:#}"))])
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
    /// A policy file may also be the section as a playbook has it, under
    /// `gate:`, pasted as it is.
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Section {
        gate: Gate,
    }
    let text = read_text(path)?;
    check_syntax(path, &text)?;
    let (gate, at) = if text.lines().any(|l| l.starts_with("gate:")) {
        let section: Section = deserialize_located(path, &text)?;
        (section.gate, FieldPath::default().key("gate"))
    } else {
        (deserialize_located(path, &text)?, FieldPath::default())
    };
    validate::validate_gate(&gate, at).map_err(|problem| located(path, &text, vec![problem]))?;
    Ok(gate)
}

fn read_text(path: &Path) -> Result<String, PlaybookError> {
    let bytes = std::fs::read(path).map_err(|err| {
        PlaybookError::whole_file(path, None, format!("cannot read the file: {err}"))
    })?;
    String::from_utf8(bytes).map_err(|err| {
        let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
        PlaybookError::whole_file(
            path,
            Some(u32::try_from(valid.iter().filter(|&&b| b == b'\n').count() + 1).unwrap_or(u32::MAX)),
            "this is not a text file (it is not UTF-8): a playbook is YAML text; see playbooks/quickstart.yaml",
        )
    })
}

fn from_yaml_error(file: &Path, err: yaml::YamlError) -> PlaybookError {
    let field = err.field.to_string();
    PlaybookError {
        file: file.to_path_buf(),
        line: err.position.map(|p| p.line),
        column: err.position.map(|p| p.column),
        message: explain(&err.message, &field),
        field,
        more: Vec::new(),
    }
}

/// A YAML syntax error (or a document past the reader's budgets) is
/// reported at its own line, before any field is looked at.
fn check_syntax(file: &Path, text: &str) -> Result<yaml::Spans, PlaybookError> {
    yaml::Spans::read(text).map_err(|err| PlaybookError {
        file: file.to_path_buf(),
        line: err.position.map(|p| p.line),
        column: err.position.map(|p| p.column),
        field: String::new(),
        message: format!("this is not valid YAML: {}", err.message),
        more: Vec::new(),
    })
}

/// Strict deserialisation with the field path and the line of any error.
fn deserialize_located<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
) -> Result<T, PlaybookError> {
    yaml::from_str(text).map_err(|err| from_yaml_error(file, err))
}

/// Problems found after parsing, each located at the field it blames.
fn located(file: &Path, text: &str, problems: Vec<Problem>) -> PlaybookError {
    let spans = yaml::Spans::read(text).ok();
    let mut errors = problems.into_iter().map(|problem| {
        let position = spans.as_ref().and_then(|s| s.find(&problem.path));
        PlaybookError {
            file: file.to_path_buf(),
            line: position.map(|p| p.line),
            column: position.map(|p| p.column),
            field: problem.path.to_string(),
            message: problem.message,
            more: Vec::new(),
        }
    });
    let mut first = errors
        .next()
        .unwrap_or_else(|| PlaybookError::whole_file(file, None, "the playbook is not valid"));
    first.more = errors.collect();
    first
}

/// Parses and validates playbook text; `file` only names it in errors.
pub fn parse<S: FaultSpecs>(file: &Path, text: &str) -> Result<Playbook<S>, PlaybookError> {
    parse_located_in(file, text, text)
}

/// Parses `text`, locating errors in `source` (the file as written, when
/// `text` is it after the command line's changes).
fn parse_located_in<S: FaultSpecs>(
    file: &Path,
    text: &str,
    source: &str,
) -> Result<Playbook<S>, PlaybookError> {
    if text.trim().is_empty()
        || text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err(PlaybookError::whole_file(
            file,
            Some(1),
            "the playbook is empty: it starts with `apiVersion: shakedown/v1`; see playbooks/quickstart.yaml",
        ));
    }
    check_syntax(file, text)?;
    let read: Playbook<Params> = deserialize_located(file, text).map_err(|mut err| {
        if !std::ptr::eq(text, source) {
            relocate(&mut err, source);
        }
        err
    })?;
    let mut problems = Vec::new();
    let mut faults = Vec::with_capacity(read.faults.len());
    for (i, fault) in read.faults.iter().enumerate() {
        match S::parse(&fault.spec) {
            Ok(spec) => faults.push(fault.with_spec(spec)),
            Err(problem) => {
                let mut path = FieldPath::default().key("faults").index(i);
                path.0.extend(problem.path.0);
                problems.push(Problem::at(path, problem.message));
            }
        }
    }
    if !problems.is_empty() {
        return Err(located(file, source, problems));
    }
    let playbook = read.with_faults(faults);
    let problems = validate::validate(&playbook);
    if !problems.is_empty() {
        return Err(located(file, source, problems));
    }
    Ok(playbook)
}

/// Moves an error's position to where its field is in `source`.
fn relocate(err: &mut PlaybookError, source: &str) {
    let position = yaml::Spans::read(source)
        .ok()
        .and_then(|spans| spans.find(&FieldPath::parse(&err.field)));
    err.line = position.map(|p| p.line);
    err.column = position.map(|p| p.column);
}

/// A serde message as a playbook author would put it: Rust type names
/// become what they mean, the valid names are quoted as a playbook spells
/// them, and a number too large says how large it may be.
pub fn explain(message: &str, field: &str) -> String {
    let _ = field;
    let mut message = message.to_string();
    for (rust, words) in [
        (
            "invalid u64",
            "expected a whole number from 0 to 18446744073709551615",
        ),
        (
            "invalid u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("invalid u16", "expected a whole number from 0 to 65535"),
        ("invalid floating point", "expected a number"),
        ("invalid f64", "expected a number"),
        ("invalid boolean", "expected `true` or `false`"),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected u32", "expected a whole number, 0 or more"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected `true` or `false`"),
        (
            "expected a sequence",
            "expected a list (`- item` lines, or `[a, b]`)",
        ),
        (
            "expected sequence start",
            "expected a list (`- item` lines, or `[a, b]`)",
        ),
        (
            "expected mapping start",
            "expected a mapping (`key: value` lines, or `{ key: value }`)",
        ),
        (
            "expected string scalar",
            "expected a single value (text or a number), not a list or a mapping",
        ),
    ] {
        if message.starts_with(rust) {
            message = format!("{words}{}", &message[rust.len()..]);
            break;
        }
    }
    if let Some((head, names)) = message.split_once("expected one of ") {
        let quoted: Vec<String> = names
            .split(", ")
            .map(|n| format!("`{}`", n.trim_matches('`')))
            .collect();
        message = format!("{head}expected one of {}", quoted.join(", "));
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
        crate::faults::parse_playbook(Path::new("p.yaml"), text).unwrap_err()
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
        let pb = crate::faults::parse_playbook(Path::new("p.yaml"), GOOD).unwrap();
        assert_eq!(pb.stacks[0].name, "a");
        assert_eq!(pb.faults[0].at.as_secs_f64(), 10.0);
    }

    #[test]
    fn slo_takes_e2el_as_vllm_bench_serve_spells_it() {
        let text = GOOD.replace(
            "  rate: 5\n",
            "  rate: 5\n  slo: { ttft: 500ms, e2el: 2s }\n",
        );
        let pb = crate::faults::parse_playbook(Path::new("p.yaml"), &text).unwrap();
        let slo = pb.load.slo.unwrap();
        assert_eq!(slo.e2e.map(|d| d.as_secs_f64()), Some(2.0));
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
        assert!(e.message.contains("expected a number"), "{e}");
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
