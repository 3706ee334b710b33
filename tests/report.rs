//! The report and the gate on a fixed run (`tests/fixtures/golden-run`):
//! the tables are exactly the expected ones, the gate passes and fails
//! where it should and writes JUnit that validates against the schema CI
//! systems read, and the HTML page renders its charts in a real browser.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::BIN;

fn fixture() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("20261124T000000Z-golden");
    std::fs::create_dir(&run).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden-run");
    for file in ["playbook.yaml", "events.jsonl", "requests.jsonl"] {
        std::fs::copy(source.join(file), run.join(file)).unwrap();
    }
    (dir, run)
}

/// A tool the test needs: `.ci/install-test-tools` installs it; a missing
/// one fails the test unless SHAKEDOWN_NO_BROWSER=1 says to do without.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() && std::env::var_os("SHAKEDOWN_NO_BROWSER").is_none() {
        panic!(
            "`{name}` is needed by this test: run .ci/install-test-tools (or set SHAKEDOWN_NO_BROWSER=1 to skip)"
        );
    }
    found
}

#[test]
fn the_report_of_a_fixed_run_is_exactly_the_expected_one() {
    let (_dir, run) = fixture();
    shakedown::report::rebuild(&run).unwrap();
    let got = std::fs::read_to_string(run.join("report.md")).unwrap();
    let expected_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden-expected/report.md");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&expected_path, &got).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap();
    assert_eq!(
        got, expected,
        "report.md changed; if on purpose, rerun with UPDATE_GOLDEN=1 and review the diff"
    );
}

#[test]
fn the_gate_fails_what_the_policy_forbids_and_writes_valid_junit() {
    let (_dir, run) = fixture();
    let output = Command::new(BIN).arg("gate").arg(&run).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let failing: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with('│') && l.contains("FAIL"))
        .collect();
    // alpha: availability 91.79% < 95%, 3 truncated streams > 1; beta passes.
    assert_eq!(failing.len(), 2, "{stdout}");
    assert!(failing.iter().all(|l| l.contains("alpha")));
    assert!(
        failing
            .iter()
            .any(|l| l.contains("availability") && l.contains("91.79%"))
    );
    assert!(failing.iter().any(|l| l.contains("truncated streams")));

    let junit = run.join("junit.xml");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert_eq!(xml.matches("<failure ").count(), 2);
    if let Some(xmllint) = tool("xmllint") {
        let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/junit.xsd");
        let check = Command::new(xmllint)
            .arg("--noout")
            .arg("--schema")
            .arg(&schema)
            .arg(&junit)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

#[test]
fn a_policy_file_and_a_baseline_are_honoured() {
    let (dir, run) = fixture();
    let lenient = dir.path().join("policy.yaml");
    std::fs::write(
        &lenient,
        "availability: 0.9\nmax_recovery: 5s\nmax_truncated_streams: 5\n",
    )
    .unwrap();
    let output = Command::new(BIN)
        .arg("gate")
        .arg(&run)
        .arg("--policy")
        .arg(&lenient)
        .arg("--baseline")
        .arg(&run)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("recovery kill-engine vs baseline"),
        "{stdout}"
    );

    // A bad policy is located like a playbook error, and cannot judge.
    std::fs::write(&lenient, "availabilty: 0.9\n").unwrap();
    let output = Command::new(BIN)
        .arg("gate")
        .arg(&run)
        .arg("--policy")
        .arg(&lenient)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("policy.yaml:1:1") && stderr.contains("unknown field `availabilty`"),
        "{stderr}"
    );
}

#[test]
fn an_unreadable_run_cannot_be_judged() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .arg("gate")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read the run"));
}

#[test]
fn several_runs_are_compared_as_if_one() {
    let (dir, run) = fixture();
    // A second run of the same playbook, a day later.
    let later = dir.path().join("20261125T000000Z-golden");
    std::fs::create_dir(&later).unwrap();
    for file in ["playbook.yaml", "requests.jsonl"] {
        std::fs::copy(run.join(file), later.join(file)).unwrap();
    }
    let events = std::fs::read_to_string(run.join("events.jsonl")).unwrap();
    std::fs::write(
        later.join("events.jsonl"),
        events.replace("20261124T000000Z", "20261125T000000Z"),
    )
    .unwrap();

    let out = dir.path().join("compare");
    let output = Command::new(BIN)
        .arg("report")
        .arg(&run)
        .arg(&later)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for stack in [
        "alpha @ 20261124T000000Z-golden",
        "beta @ 20261124T000000Z-golden",
        "alpha @ 20261125T000000Z-golden",
        "beta @ 20261125T000000Z-golden",
    ] {
        // A row in the stacks, validity and outcomes tables, a column per fault table.
        assert_eq!(
            md.lines()
                .filter(|l| l.starts_with(&format!("| {stack} ")))
                .count(),
            3,
            "{stack}: {md}"
        );
    }
    let fault_header = md
        .lines()
        .find(|l| l.contains("alpha @") && l.starts_with("|  "))
        .unwrap();
    assert_eq!(fault_header.matches('@').count(), 4, "{fault_header}");
    assert!(out.join("report.html").exists());
}

#[test]
fn the_html_report_is_self_contained_and_renders_its_charts_in_chromium() {
    let (dir, run) = fixture();
    shakedown::report::rebuild(&run).unwrap();
    let html_path = run.join("report.html");
    let html = std::fs::read_to_string(&html_path).unwrap();
    // Self-contained: nothing to fetch.
    for fetch in [
        "src=\"http",
        "href=\"http",
        "@import",
        "url(http",
        "<script src",
    ] {
        assert!(
            !html.contains(fetch),
            "report.html fetches something: {fetch}"
        );
    }
    // One recovery chart, one timeline per stack.
    assert_eq!(html.matches("<svg").count(), 3);
    let Some(chromium) = tool("chromium") else {
        return;
    };
    let profile = dir.path().join("chromium-profile");
    let output = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=2000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("file://{}", html_path.display()))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dom = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The browser parsed the charts: each drew lines and shapes.
    assert_eq!(
        dom.matches("<svg").count(),
        3,
        "charts missing from the rendered page"
    );
    assert!(dom.matches("<polyline").count() >= 10, "no lines drawn");
    assert!(dom.contains("Recovery time by fault"));
    let console_errors: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            l.contains("CONSOLE")
                || l.contains("Uncaught")
                || l.contains("Refused to")
                || l.contains("net::ERR")
        })
        .collect();
    assert!(
        console_errors.is_empty(),
        "console errors: {console_errors:#?}"
    );
}
