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

/// Every stack's counters and faults.
pub fn render(
    stacks: &[(String, Arc<LiveStats>)],
    faults: &BTreeMap<(String, String), FaultState>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP shakedown_requests_total Requests shakedown sent and saw end, by how they ended.\n# TYPE shakedown_requests_total counter"
    );
    for (stack, live) in stacks {
        for (outcome, counter) in [
            ("ok", &live.ok),
            ("failed", &live.failed),
            ("dropped", &live.dropped),
        ] {
            let _ = writeln!(
                out,
                "shakedown_requests_total{{stack=\"{}\",outcome=\"{outcome}\"}} {}",
                label(stack),
                counter.load(Ordering::Relaxed)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP shakedown_requests_sent_total Requests shakedown sent.\n# TYPE shakedown_requests_sent_total counter"
    );
    for (stack, live) in stacks {
        let _ = writeln!(
            out,
            "shakedown_requests_sent_total{{stack=\"{}\"}} {}",
            label(stack),
            live.sent.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP shakedown_requests_in_flight Requests sent and not yet ended.\n# TYPE shakedown_requests_in_flight gauge"
    );
    for (stack, live) in stacks {
        let _ = writeln!(
            out,
            "shakedown_requests_in_flight{{stack=\"{}\"}} {}",
            label(stack),
            live.in_flight.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP shakedown_fault_in_force 1 while the fault is in force (a pod kill never is: it is instantaneous).\n# TYPE shakedown_fault_in_force gauge"
    );
    for ((stack, fault), state) in faults {
        let _ = writeln!(
            out,
            "shakedown_fault_in_force{{stack=\"{}\",fault=\"{}\"}} {}",
            label(stack),
            label(fault),
            u8::from(state.in_force)
        );
    }
    let _ = writeln!(
        out,
        "# HELP shakedown_fault_injections_total Times the fault was injected.\n# TYPE shakedown_fault_injections_total counter"
    );
    for ((stack, fault), state) in faults {
        let _ = writeln!(
            out,
            "shakedown_fault_injections_total{{stack=\"{}\",fault=\"{}\"}} {}",
            label(stack),
            label(fault),
            state.injections
        );
    }
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
