//! Playbook checking at scale: every shipped playbook is valid, and every
//! playbook of the bad corpus (`tests/playbooks/invalid/`, one defect each,
//! its expected line and field in its first line) gets a located error and
//! exit code 2 from `shakedown validate`, never a panic.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_shakedown");

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_playbook_is_valid() {
    let files = yaml_files("playbooks");
    assert!(files.len() >= 4);
    for file in files {
        if let Err(err) = shakedown::faults::load_playbook(&file) {
            panic!("{err}");
        }
    }
}

#[test]
fn every_bad_playbook_is_refused_where_the_defect_is() {
    let files = yaml_files("tests/playbooks/invalid");
    assert!(
        files.len() >= 50,
        "the corpus has {} playbooks",
        files.len()
    );
    let mut wrong = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let header = text
            .lines()
            .next()
            .unwrap()
            .strip_prefix("# expect: ")
            .unwrap();
        let (line, field) = header.split_once(' ').unwrap_or((header, ""));
        let err = match shakedown::faults::load_playbook(file) {
            Ok(_) => {
                wrong.push(format!("{}: accepted", file.display()));
                continue;
            }
            Err(err) => err,
        };
        let line_ok = match line {
            "*" => err.line.is_some(),
            n => err.line == n.parse().ok(),
        };
        if !line_ok || !err.field.starts_with(field) || err.message.is_empty() {
            wrong.push(format!("expected line {line} field `{field}`, got: {err}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn validate_exits_2_with_one_located_error_per_bad_playbook() {
    let files = yaml_files("tests/playbooks/invalid");
    let output = Command::new(BIN)
        .arg("validate")
        .args(&files)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), files.len(), "{stderr}");
    for error in errors {
        assert!(error.contains(".yaml:"), "not located: {error}");
    }
}

#[test]
fn empty_missing_and_binary_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.yaml");
    std::fs::write(&empty, "").unwrap();
    let binary = dir.path().join("binary.yaml");
    std::fs::write(&binary, [0x7f, b'E', b'L', b'F', 0xff, 0xfe, 0, 1, 2]).unwrap();
    let missing = dir.path().join("missing.yaml");
    for (file, says) in [
        (&empty, "empty"),
        (&binary, "not a text file"),
        (&missing, "cannot read"),
    ] {
        let output = Command::new(BIN)
            .arg("validate")
            .arg(file)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{}", file.display());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{stderr}");
        let run = Command::new(BIN)
            .args(["run", "-q"])
            .arg(file)
            .output()
            .unwrap();
        assert_eq!(run.status.code(), Some(2), "run {}", file.display());
    }
}

/// The committed JSON Schema is what `shakedown schema` prints, every
/// shipped playbook points editors at it, validates against it, and a
/// sample of the bad corpus (what a schema can see: unknown fields, types,
/// units, names, ranges) is refused by it.
#[test]
fn the_json_schema_is_in_sync_and_checks_playbooks_as_an_editor_would() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(BIN).arg("schema").output().unwrap();
    assert!(output.status.success());
    let committed = std::fs::read_to_string(root.join("playbook.schema.json")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        committed,
        "playbook.schema.json is stale: run `shakedown schema > playbook.schema.json`"
    );
    let output = Command::new(BIN)
        .args(["schema", "--markdown"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        std::fs::read_to_string(root.join("docs/playbook.md")).unwrap(),
        "docs/playbook.md is stale: run `shakedown schema --markdown > docs/playbook.md`"
    );
    let shipped = yaml_files("playbooks");
    for file in &shipped {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            text.starts_with("# yaml-language-server: $schema=../playbook.schema.json\n"),
            "{}: no schema line for editors",
            file.display()
        );
    }
    let bad = [
        "01-api-version",
        "05-seed-text",
        "06-duration-no-unit",
        "12-stacks-not-a-list",
        "19-nodes-typo",
        "24-engine-field-typo",
        "35-arrival-unknown",
        "38-rate-absurd",
        "43-api-unknown",
        "47-max-in-flight-zero",
        "94-max-in-flight-huge",
    ];
    let mut args: Vec<String> = shipped
        .iter()
        .map(|f| format!("+{}", f.display()))
        .collect();
    args.extend(bad.iter().map(|name| {
        format!(
            "-{}",
            root.join(format!("tests/playbooks/invalid/{name}.yaml"))
                .display()
        )
    }));
    let output = Command::new("python3")
        .arg(root.join("tests/scripts/check_schema.py"))
        .arg(root.join("playbook.schema.json"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
