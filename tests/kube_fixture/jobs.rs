//! batch/v1 Jobs as the Job controller and a kubelet would run an Indexed
//! Job: one pod per completion index (labelled `job-name` and
//! `batch.kubernetes.io/job-completion-index`, with `JOB_COMPLETION_INDEX`
//! in its environment), and, when [`ApiServer::run_jobs_with`] names a
//! binary, its container's command run as a real child process (the
//! command's `shakedown` replaced by that binary), stdout and stderr kept
//! as the pod's log and served by `pods/{name}/log` (`follow=true` too).
//! Deleting the Job sends SIGTERM; each pod goes once its process has
//! ended. [`ApiServer::cut_logs_after`] breaks a log stream once, as a
//! connection that blips would.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use super::{ApiServer, labels_match, status};

/// A pod's log: what its process wrote, and whether it ended.
#[derive(Clone)]
pub struct PodLog {
    text: Arc<std::sync::Mutex<Vec<u8>>>,
    /// (bytes written, ended)
    grown: watch::Sender<(usize, bool)>,
}

impl PodLog {
    fn new() -> Self {
        Self {
            text: Default::default(),
            grown: watch::channel((0, false)).0,
        }
    }

    fn append(&self, bytes: &[u8]) {
        let len = {
            let mut text = self.text.lock().unwrap();
            text.extend_from_slice(bytes);
            text.len()
        };
        self.grown.send_modify(|g| g.0 = len);
    }

    fn end(&self) {
        self.grown.send_modify(|g| g.1 = true);
    }
}

/// What the fixture keeps of Jobs and their processes.
#[derive(Default)]
pub struct Jobs {
    pub jobs: std::collections::BTreeMap<(String, String), Value>,
    pub logs: std::collections::BTreeMap<(String, String), PodLog>,
    /// Pod name → pid of its running process.
    pub pids: std::collections::BTreeMap<String, u32>,
    pub exe: Option<PathBuf>,
    /// Bytes after which the next log stream breaks off, once.
    pub cut_after: Option<usize>,
    /// Log streams opened, per pod.
    pub streams: std::collections::BTreeMap<String, u32>,
    /// Every Job created, as it was sent.
    pub created: Vec<Value>,
}

impl ApiServer {
    /// Runs the containers of the Jobs created from now on as child
    /// processes of `exe` (the `shakedown` binary under test).
    pub fn run_jobs_with(&self, exe: &std::path::Path) {
        self.world.lock().unwrap().jobs.exe = Some(exe.to_path_buf());
    }

    /// Breaks the next log stream after `bytes`, once.
    pub fn cut_logs_after(&self, bytes: usize) {
        self.world.lock().unwrap().jobs.cut_after = Some(bytes);
    }

    /// The Jobs that exist now.
    pub fn job_objects(&self) -> Vec<Value> {
        self.world
            .lock()
            .unwrap()
            .jobs
            .jobs
            .values()
            .cloned()
            .collect()
    }

    /// The pids of the Jobs' processes still running.
    pub fn job_pids(&self) -> Vec<u32> {
        self.world
            .lock()
            .unwrap()
            .jobs
            .pids
            .values()
            .copied()
            .collect()
    }

    fn spawn_container(&self, namespace: &str, pod: &str, container: &Value, index: u32) {
        let Some(exe) = self.world.lock().unwrap().jobs.exe.clone() else {
            return;
        };
        let command: Vec<String> = container["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|c| {
                if c == "shakedown" {
                    exe.display().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect();
        let mut child = tokio::process::Command::new(&command[0]);
        child
            .args(&command[1..])
            .env("JOB_COMPLETION_INDEX", index.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for var in container["env"].as_array().into_iter().flatten() {
            child.env(
                var["name"].as_str().unwrap(),
                var["value"].as_str().unwrap_or(""),
            );
        }
        let mut child = child.spawn().unwrap();
        let log = PodLog::new();
        {
            let mut world = self.world.lock().unwrap();
            world
                .jobs
                .logs
                .insert((namespace.into(), pod.into()), log.clone());
            world.jobs.pids.insert(pod.into(), child.id().unwrap());
        }
        // Both streams into one log, as a container runtime keeps them.
        let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let err_log = log.clone();
        let stderr = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                err_log.append(&buf[..n]);
            }
        });
        let server = self.clone();
        let (namespace, pod) = (namespace.to_string(), pod.to_string());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            while let Ok(n) = out.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                log.append(&buf[..n]);
            }
            let _ = stderr.await;
            let status = child.wait().await.unwrap();
            log.end();
            let code = status.code().unwrap_or(137);
            server.world.lock().unwrap().jobs.pids.remove(&pod);
            let current = server
                .world
                .lock()
                .unwrap()
                .pods
                .get(&(namespace.clone(), pod.clone()))
                .cloned();
            let Some(mut current) = current else {
                return;
            };
            if current.pointer("/metadata/deletionTimestamp").is_some() {
                server.remove(&namespace, &pod);
                return;
            }
            current["status"]["phase"] = json!(if code == 0 { "Succeeded" } else { "Failed" });
            current["status"]["containerStatuses"] = json!([{
                "name": "agent", "ready": false, "restartCount": 0, "image": "", "imageID": "",
                "state": { "terminated": {
                    "exitCode": code,
                    "reason": if code == 0 { "Completed" } else { "Error" },
                }},
            }]);
            server.upsert(current, "MODIFIED");
        });
    }
}

pub async fn create_job(
    State(s): State<ApiServer>,
    Path(ns): Path<String>,
    Json(mut job): Json<Value>,
) -> Response {
    if s.world.lock().unwrap().denies("create", "jobs", Some(&ns)) {
        return status(403, "Forbidden", "jobs.batch is forbidden: cannot create");
    }
    let name = job["metadata"]["name"].as_str().unwrap().to_string();
    job["metadata"]["namespace"] = json!(ns);
    job["metadata"]["uid"] = json!(format!("uid-{name}"));
    job["status"] = json!({});
    {
        let mut world = s.world.lock().unwrap();
        if world.jobs.jobs.contains_key(&(ns.clone(), name.clone())) {
            return status(
                409,
                "AlreadyExists",
                &format!("jobs.batch \"{name}\" already exists"),
            );
        }
        world
            .jobs
            .jobs
            .insert((ns.clone(), name.clone()), job.clone());
        world.jobs.created.push(job.clone());
    }
    let completions = job["spec"]["completions"].as_u64().unwrap_or(1) as u32;
    let template = job["spec"]["template"].clone();
    for index in 0..completions {
        let pod_name = format!("{name}-{index}-abcde");
        let mut labels = template["metadata"]["labels"].clone();
        labels["job-name"] = json!(name);
        labels["batch.kubernetes.io/job-name"] = json!(name);
        labels["batch.kubernetes.io/job-completion-index"] = json!(index.to_string());
        let node = s.world.lock().unwrap().place(false);
        let mut spec = template["spec"].clone();
        spec["nodeName"] = json!(node);
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": pod_name, "namespace": ns, "labels": labels,
                "creationTimestamp": "2026-11-25T00:00:00Z",
                "ownerReferences": [{ "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": format!("uid-{name}"), "controller": true }],
            },
            "spec": spec,
            "status": { "phase": "Running", "conditions": [{ "type": "Ready", "status": "True" }] },
        });
        s.upsert(pod, "ADDED");
        let container = template["spec"]["containers"][0].clone();
        s.spawn_container(&ns, &pod_name, &container, index);
    }
    (axum::http::StatusCode::CREATED, Json(job)).into_response()
}

pub async fn get_job(
    State(s): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    match s.world.lock().unwrap().jobs.jobs.get(&(ns, name.clone())) {
        Some(job) => Json(job.clone()).into_response(),
        None => status(404, "NotFound", &format!("jobs.batch \"{name}\" not found")),
    }
}

/// Background propagation: the Job goes at once, its pods get SIGTERM and
/// go when their processes have ended.
pub async fn delete_job(
    State(s): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    if s.world.lock().unwrap().denies("delete", "jobs", Some(&ns)) {
        return status(403, "Forbidden", "jobs.batch is forbidden: cannot delete");
    }
    let Some(job) = s
        .world
        .lock()
        .unwrap()
        .jobs
        .jobs
        .remove(&(ns.clone(), name.clone()))
    else {
        return status(404, "NotFound", &format!("jobs.batch \"{name}\" not found"));
    };
    let pods = s
        .world
        .lock()
        .unwrap()
        .list(Some(&ns), &format!("job-name={name}"), None);
    for mut pod in pods {
        let pod_name = pod["metadata"]["name"].as_str().unwrap().to_string();
        let pid = s.world.lock().unwrap().jobs.pids.get(&pod_name).copied();
        match pid {
            Some(pid) => {
                pod["metadata"]["deletionTimestamp"] = json!("2026-11-25T00:00:00Z");
                s.upsert(pod, "MODIFIED");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            None => s.remove(&ns, &pod_name),
        }
    }
    Json(job).into_response()
}

#[derive(serde::Deserialize)]
pub struct JobQuery {
    #[serde(rename = "labelSelector")]
    label_selector: Option<String>,
}

pub async fn list_jobs(State(s): State<ApiServer>, Query(q): Query<JobQuery>) -> Response {
    let selector = q.label_selector.unwrap_or_default();
    let items: Vec<Value> = s
        .world
        .lock()
        .unwrap()
        .jobs
        .jobs
        .values()
        .filter(|j| labels_match(&j["metadata"]["labels"], &selector))
        .cloned()
        .collect();
    Json(json!({ "apiVersion": "batch/v1", "kind": "JobList", "metadata": {}, "items": items }))
        .into_response()
}

#[derive(serde::Deserialize)]
pub struct LogQuery {
    follow: Option<bool>,
}

pub async fn pod_log(
    State(s): State<ApiServer>,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<LogQuery>,
) -> Response {
    let (log, cut) = {
        let mut world = s.world.lock().unwrap();
        if world.denies("get", "pods/log", Some(&ns)) {
            return status(403, "Forbidden", "pods \"log\" is forbidden: cannot get");
        }
        if !world.pods.contains_key(&(ns.clone(), name.clone())) {
            return status(404, "NotFound", &format!("pods \"{name}\" not found"));
        }
        *world.jobs.streams.entry(name.clone()).or_default() += 1;
        let cut = world.jobs.cut_after.take();
        (world.jobs.logs.get(&(ns, name)).cloned(), cut)
    };
    let Some(log) = log else {
        return Response::new(Body::empty());
    };
    let follow = q.follow == Some(true);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<super::Line>();
    tokio::spawn(async move {
        let mut grown = log.grown.subscribe();
        let mut sent = 0usize;
        loop {
            let (len, ended) = *grown.borrow_and_update();
            let mut chunk = log.text.lock().unwrap()[sent..len].to_vec();
            if let Some(cut) = cut
                && sent + chunk.len() > cut
            {
                chunk.truncate(cut.saturating_sub(sent));
                let _ = tx.send(Ok(bytes::Bytes::from(chunk)));
                let _ = tx.send(Err(std::io::Error::other("the stream broke off")));
                return;
            }
            sent = len;
            if !chunk.is_empty() && tx.send(Ok(bytes::Bytes::from(chunk))).is_err() {
                return;
            }
            if ended || !follow || grown.changed().await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .header("content-type", "text/plain")
        .body(Body::from_stream(super::tokio_stream_from(rx)))
        .unwrap()
}
