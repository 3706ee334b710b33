//! Fault windows as Grafana annotations (`--grafana URL`, token from
//! `GRAFANA_TOKEN`), through Grafana's HTTP API: `POST /api/annotations`
//! when a fault goes in, `PATCH /api/annotations/:id` with its `timeEnd`
//! when it is reverted, so a lasting fault is a shaded region over every
//! dashboard and a pod kill is a line. Tagged `shakedown`, the run id, the
//! stack, the fault and its action, for an annotation query to pick.
//!
//! Grafana being down never stops a run; what could not be posted is
//! counted and said at the run's end.

use std::collections::HashMap;

use serde_json::json;
use tokio::sync::broadcast;

use crate::events::{Event, EventKind};

/// Where annotations go.
#[derive(Debug, Clone)]
pub struct Grafana {
    pub url: String,
    pub token: Option<String>,
}

/// What was posted.
#[derive(Debug, Default)]
pub struct Posted {
    pub annotations: u64,
    pub failures: Vec<String>,
}

impl Grafana {
    fn request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let request = client.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Posts an annotation; its id, for the end of its window.
    async fn post(
        &self,
        client: &reqwest::Client,
        body: serde_json::Value,
    ) -> Result<Option<u64>, String> {
        let response = self
            .request(client, reqwest::Method::POST, "/api/annotations")
            .json(&body)
            .send()
            .await
            .map_err(|err| crate::http::error_chain(&err))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(format!("HTTP {status}: {}", text.trim()));
        }
        let answer: serde_json::Value = response.json().await.unwrap_or_default();
        Ok(answer.get("id").and_then(serde_json::Value::as_u64))
    }

    async fn end(&self, client: &reqwest::Client, id: u64, end_ms: i64) -> Result<(), String> {
        let response = self
            .request(
                client,
                reqwest::Method::PATCH,
                &format!("/api/annotations/{id}"),
            )
            .json(&json!({ "timeEnd": end_ms }))
            .send()
            .await
            .map_err(|err| crate::http::error_chain(&err))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", response.status()))
        }
    }

    /// Annotates the run's faults as their events come, until the run ends.
    pub async fn annotate(self, mut events: broadcast::Receiver<Event>) -> Posted {
        let client = crate::http::client_builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        let mut posted = Posted::default();
        let mut run_id = String::new();
        let mut open: HashMap<(String, String), u64> = HashMap::new();
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    posted
                        .failures
                        .push(format!("{missed} events went by too fast to annotate"));
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            };
            let at_ms = event.utc.timestamp_millis();
            let stack = event.stack.clone().unwrap_or_default();
            let result = match &event.kind {
                EventKind::RunStarted { run_id: id, .. } => {
                    run_id = id.clone();
                    Ok(())
                }
                EventKind::RunFinished { .. } => break,
                EventKind::FaultInjected {
                    fault,
                    action,
                    targets,
                    ..
                } => {
                    let text = format!(
                        "shakedown: {fault} ({action}) injected on stack {stack}{}",
                        if targets.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", targets.join(", "))
                        }
                    );
                    let body = json!({
                        "time": at_ms,
                        "tags": ["shakedown", run_id, stack, fault, action],
                        "text": text,
                    });
                    self.post(&client, body).await.map(|id| {
                        if let Some(id) = id {
                            open.insert((stack.clone(), fault.clone()), id);
                        }
                    })
                }
                EventKind::FaultReverted { fault } => {
                    match open.remove(&(stack.clone(), fault.clone())) {
                        Some(id) => self.end(&client, id, at_ms).await,
                        None => Ok(()),
                    }
                }
                EventKind::FaultFailed { fault, error } => {
                    let body = json!({
                        "time": at_ms,
                        "tags": ["shakedown", run_id, stack, fault, "failed"],
                        "text": format!("shakedown: {fault} on stack {stack} failed: {error}"),
                    });
                    self.post(&client, body).await.map(|_| ())
                }
                _ => Ok(()),
            };
            match result {
                Ok(()) => {
                    if matches!(
                        event.kind,
                        EventKind::FaultInjected { .. }
                            | EventKind::FaultReverted { .. }
                            | EventKind::FaultFailed { .. }
                    ) {
                        posted.annotations += 1;
                    }
                }
                Err(err) => posted.failures.push(err),
            }
        }
        posted
    }
}
