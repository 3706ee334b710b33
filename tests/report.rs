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

/// A copy of `run` beside it, named `name`, its events rewritten.
fn another_run(run: &Path, name: &str, events: impl Fn(String) -> String) -> PathBuf {
    let copy = run.parent().unwrap().join(name);
    std::fs::create_dir(&copy).unwrap();
    for file in ["playbook.yaml", "requests.jsonl"] {
        std::fs::copy(run.join(file), copy.join(file)).unwrap();
    }
    let text = std::fs::read_to_string(run.join("events.jsonl")).unwrap();
    std::fs::write(copy.join("events.jsonl"), events(text)).unwrap();
    copy
}

#[test]
fn several_runs_are_compared_as_if_one() {
    let (dir, run) = fixture();
    // A second run of the same playbook, a day later.
    let later = another_run(&run, "20261125T000000Z-golden", |events| {
        events.replace("20261124T000000Z", "20261125T000000Z")
    });

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

/// Runs labelled by release (`run --label`) are named by their labels and
/// get a trend per stack and fault, oldest first, with the changes.
#[test]
fn runs_of_several_releases_show_a_trend_named_by_their_labels() {
    let (dir, run) = fixture();
    let mut runs = Vec::new();
    for (day, label) in [("20261124", "v0.3.0"), ("20261125", "v0.3.1")] {
        runs.push(another_run(
            &run,
            &format!("{day}T000000Z-golden-{label}"),
            |events| {
                events
                    .replace("20261124T000000Z", &format!("{day}T000000Z"))
                    .replacen(
                        "\"event\": \"run_started\"",
                        &format!("\"event\": \"run_started\", \"label\": \"{label}\""),
                        1,
                    )
            },
        ));
    }
    let out = dir.path().join("trend");
    let output = Command::new(BIN)
        .arg("report")
        .args(&runs)
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
    assert!(md.contains("## Across runs"), "{md}");
    assert!(
        md.contains("| alpha @ v0.3.0 "),
        "stacks named by label: {md}"
    );
    let trend: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| alpha | kill-engine"))
        .collect();
    assert_eq!(trend.len(), 2, "{md}");
    assert!(trend[0].contains("v0.3.0") && trend[1].contains("v0.3.1"));
    // The same figures twice: no change.
    assert!(trend[1].contains("| same "), "{}", trend[1]);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["trend"][0]["points"][1]["run"], "v0.3.1");
}

/// The quick start's own run (`make run`, copied from a real run into
/// `tests/fixtures/quickstart-run`), with its engines' scraped metrics.
fn quickstart() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("20261125T061620Z-quickstart");
    std::fs::create_dir(&run).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quickstart-run");
    for file in [
        "playbook.yaml",
        "events.jsonl",
        "requests.jsonl",
        "metrics.jsonl",
    ] {
        std::fs::copy(source.join(file), run.join(file)).unwrap();
    }
    (dir, run)
}

/// The `<figure>`s of a page, by their `data-metric`.
fn figures(html: &str) -> Vec<(String, String)> {
    html.split("<figure class=\"chart\" data-metric=\"")
        .skip(1)
        .map(|rest| {
            let (metric, body) = rest.split_once('"').unwrap();
            let body = body.split("</figure>").next().unwrap();
            (metric.to_string(), body.to_string())
        })
        .collect()
}

#[test]
fn the_html_report_is_self_contained_and_renders_its_charts_in_chromium() {
    let (dir, run) = quickstart();
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
    check_page(&html);
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
    // What the browser parsed is the page as written: verdict, charts, labels.
    check_page(&dom);
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

/// The quick start's page: the verdict first, one chart per metric with a
/// line per stack, and a 0 s recovery drawn and labelled.
fn check_page(page: &str) {
    let verdict = page.find("<h2>Verdict</h2>").expect("no verdict");
    assert!(
        verdict < page.find("<h2>Stacks</h2>").unwrap(),
        "the verdict comes first"
    );
    assert!(
        page.contains("kill-engine: watch-retry lost 1 request and recovered at once; probe-no-retry lost 9 requests and took 2.49 s to recover. watch-retry did better"),
        "verdict sentence missing"
    );
    assert!(
        page.contains("Gate (the playbook"),
        "gate missing from the verdict"
    );
    let figures = figures(page);
    let metrics: Vec<&str> = figures.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(
        metrics,
        [
            "recovery",
            "success-rate",
            "ttft-p99",
            "in-flight",
            "output-tokens",
            "requests-sent",
            "engine-running",
            "kv-cache"
        ],
        "one chart per metric; none for the engines' waiting queue, flat at 0 in this run"
    );
    for (metric, svg) in &figures[1..] {
        assert_eq!(svg.matches("<svg").count(), 1, "{metric}: one chart");
        for stack in ["watch-retry", "probe-no-retry"] {
            assert!(svg.contains(stack), "{metric}: no line for {stack}");
        }
        assert!(
            svg.matches("<polyline").count() >= 2,
            "{metric}: lines not drawn"
        );
    }
    let recovery = &figures[0].1;
    // Bars in order: watch-retry's kill-engine (0 s), kill-router; then
    // probe-no-retry's. The 0 s one is drawn and labelled.
    let labels: Vec<&str> = recovery
        .split("<text")
        .skip(1)
        .filter_map(|t| t.split_once('>'))
        .map(|(_, rest)| rest.split("</text>").next().unwrap().trim())
        .collect();
    for label in ["0.00 s", "1.10 s", "2.49 s"] {
        assert!(
            labels.contains(&label),
            "bar {label} not labelled: {labels:?}"
        );
    }
    // Each stack: two bars (the 0 s one too) and its legend swatch.
    for colour in ["#1F77B4", "#FF7F0E"] {
        let drawn = recovery
            .split("<rect")
            .filter(|r| r.contains(&format!("fill=\"{colour}\"")))
            .count();
        assert_eq!(drawn, 3, "bars of colour {colour}");
    }
}

/// A `vllm bench serve --save-result` file (made with `--goodput` and
/// `--percentile-metrics ttft,tpot,itl,e2el`, the keys vLLM writes) and
/// shakedown's export of each phase are read by the same script into the
/// same keys, so a dashboard fed by one reads the other.
#[test]
fn each_phase_is_exported_as_a_vllm_bench_serve_result_the_same_script_reads() {
    let (_dir, run) = quickstart();
    shakedown::report::rebuild(&run).unwrap();
    let exports = run.join("vllm-bench");
    let mut names: Vec<String> = std::fs::read_dir(&exports)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert!(
        names.contains(&"watch-retry.baseline.json".to_string())
            && names.contains(&"probe-no-retry.during-kill-router.json".to_string()),
        "{names:?}"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/read_bench.py");
    let read = |file: &Path| -> serde_json::Map<String, serde_json::Value> {
        let out = Command::new("python3")
            .arg(&script)
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let vllm = read(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vllm-bench-serve-result.json"),
    );
    let ours = read(&exports.join("watch-retry.baseline.json"));
    let keys =
        |m: &serde_json::Map<String, serde_json::Value>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&vllm), keys(&ours));
    // The baseline's figures are the report's, in vLLM's units.
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let baseline = summary["stacks"][0]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "baseline")
        .unwrap();
    assert_eq!(ours["p99_ttft_ms"], baseline["ttft_ms"]["p99"]);
    assert_eq!(ours["request_throughput"], baseline["request_throughput"]);
    assert_eq!(ours["request_rate"], serde_json::json!(10.0));
    assert!(
        ours["request_goodput"].as_f64().unwrap() > 0.0,
        "the quick start sets an SLO"
    );
}

/// The README's `gate:` example, pasted into a file as it is, is a policy
/// `--policy` accepts.
#[test]
fn the_readme_s_gate_example_works_as_a_policy_file() {
    let (dir, run) = fixture();
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let example = readme
        .split("```yaml\ngate:")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .map(|body| format!("gate:{body}"))
        .expect("no `gate:` example in the README");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, example).unwrap();
    let output = Command::new(BIN)
        .arg("gate")
        .arg(&run)
        .arg("--policy")
        .arg(&policy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("error"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("availability"),
        "the policy's checks were not run"
    );
}
