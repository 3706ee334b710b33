//! The run's live figures in Prometheus text format (version 0.0.4), on
//! `--metrics-listen ADDR` at `/metrics`, for the operator's Prometheus to
//! scrape beside the engines: requests by outcome, in flight, and which
//! fault is in force, per stack. [`render`] is pure; [`serve`] is the
//! listener.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{FaultState, Telemetry};
use crate::load::LiveStats;

/// A label value, escaped as the text format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric family: its help and type lines, then a sample per labels.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// Every stack's counters and faults.
pub fn render(
    stacks: &[(String, Arc<LiveStats>)],
    faults: &BTreeMap<(String, String), FaultState>,
) -> String {
    let per_stack = |value: fn(&LiveStats) -> u64| -> Vec<(String, u64)> {
        stacks
            .iter()
            .map(|(stack, live)| (format!("stack=\"{}\"", label(stack)), value(live)))
            .collect()
    };
    let per_fault = |value: fn(&FaultState) -> u64| -> Vec<(String, u64)> {
        faults
            .iter()
            .map(|((stack, fault), state)| {
                (
                    format!("stack=\"{}\",fault=\"{}\"", label(stack), label(fault)),
                    value(state),
                )
            })
            .collect()
    };
    let mut out = String::new();
    let by_outcome = stacks
        .iter()
        .flat_map(|(stack, live)| {
            [
                ("ok", &live.ok),
                ("failed", &live.failed),
                ("dropped", &live.dropped),
            ]
            .map(|(outcome, counter)| {
                (
                    format!("stack=\"{}\",outcome=\"{outcome}\"", label(stack)),
                    counter.load(Ordering::Relaxed),
                )
            })
        })
        .collect();
    family(
        &mut out,
        "shakedown_requests_total",
        "counter",
        "Requests shakedown sent and saw end, by how they ended.",
        by_outcome,
    );
    family(
        &mut out,
        "shakedown_requests_sent_total",
        "counter",
        "Requests shakedown sent.",
        per_stack(|live| live.sent.load(Ordering::Relaxed)),
    );
    family(
        &mut out,
        "shakedown_requests_in_flight",
        "gauge",
        "Requests sent and not yet ended.",
        per_stack(|live| live.in_flight.load(Ordering::Relaxed)),
    );
    family(
        &mut out,
        "shakedown_fault_in_force",
        "gauge",
        "1 while the fault is in force (a pod kill never is: it is instantaneous).",
        per_fault(|state| u64::from(state.in_force)),
    );
    family(
        &mut out,
        "shakedown_fault_injections_total",
        "counter",
        "Times the fault was injected.",
        per_fault(|state| state.injections),
    );
    out
}

/// Serves `/metrics` on `listener` until `stop`.
pub async fn serve(
    telemetry: Arc<Telemetry>,
    listener: tokio::net::TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let telemetry = telemetry.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    telemetry.exposition(),
                )
            }
        }),
    );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { crate::stopped(&mut stop).await })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_faults_in_the_text_format() {
        let live = Arc::new(LiveStats::default());
        live.ok.store(7, Ordering::Relaxed);
        live.in_flight.store(2, Ordering::Relaxed);
        let faults = BTreeMap::from([(
            ("a\"b".to_string(), "kill".to_string()),
            FaultState {
                injections: 1,
                in_force: true,
            },
        )]);
        let text = render(&[("a\"b".into(), live)], &faults);
        assert!(text.contains("shakedown_requests_total{stack=\"a\\\"b\",outcome=\"ok\"} 7\n"));
        assert!(text.contains("shakedown_requests_in_flight{stack=\"a\\\"b\"} 2\n"));
        assert!(text.contains("shakedown_fault_in_force{stack=\"a\\\"b\",fault=\"kill\"} 1\n"));
        assert!(text.contains("# TYPE shakedown_fault_injections_total counter\n"));
    }
}
