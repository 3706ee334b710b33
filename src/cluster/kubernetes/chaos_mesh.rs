//! Delays through Chaos Mesh, where it is installed: a `NetworkChaos`
//! (chaos-mesh.org/v1alpha1) with the fault's delay, jitter and duration,
//! selecting the role's pods. Chaos Mesh applies and removes the delay
//! itself; shakedown deletes the object on revert, and `cleanup` deletes
//! any that carries its annotation.

use std::time::Duration;

use anyhow::{Context, bail};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};

use super::{ANNOTATION, KubeCluster, OWNER_ANNOTATION, Target};

pub const GROUP: &str = "chaos-mesh.org";
pub const VERSION: &str = "v1alpha1";

fn resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, "NetworkChaos");
    ApiResource::from_gvk_with_plural(&gvk, "networkchaos")
}

/// Chaos Mesh selects by label equality: `a=b,c=d` as a map.
fn label_map(selector: &str) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut labels = serde_json::Map::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match term.split_once('=') {
            Some((key, value)) if !key.ends_with('!') && !value.starts_with('=') => {
                labels.insert(key.trim().into(), value.trim().into());
            }
            _ => bail!("Chaos Mesh selects pods by label equality (`app=vllm`), not `{term}`"),
        }
    }
    Ok(labels)
}

/// The NetworkChaos that delays what the target's pods send.
pub fn network_chaos(
    name: &str,
    target: &Target,
    run_id: &str,
    delay: Duration,
    jitter: Duration,
    lasts: Duration,
) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "NetworkChaos",
        "metadata": {
            "name": name,
            "namespace": target.namespace,
            "annotations": { ANNOTATION: run_id, OWNER_ANNOTATION: super::owner() },
        },
        "spec": {
            "action": "delay",
            "mode": "all",
            "selector": {
                "namespaces": [target.namespace],
                "labelSelectors": label_map(&target.selector)?,
            },
            "delay": {
                "latency": format!("{}ms", delay.as_millis()),
                "jitter": format!("{}ms", jitter.as_millis()),
            },
            "direction": "to",
            "duration": format!("{}s", lasts.as_secs_f64().ceil() as u64),
        },
    }))
}

/// Reads NetworkChaos objects, for a fault waiting for Chaos Mesh to say
/// its delay is in force.
#[derive(Clone)]
pub struct ChaosReader {
    client: kube::Client,
}

impl ChaosReader {
    /// Whether Chaos Mesh says the delay is injected in every selected pod
    /// (its `AllInjected` condition), and why not when it says no.
    pub async fn injected(&self, namespace: &str, name: &str) -> anyhow::Result<(bool, String)> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &resource());
        let object = api
            .get(name)
            .await
            .with_context(|| format!("cannot read NetworkChaos {namespace}/{name}"))?;
        let conditions = object
            .data
            .pointer("/status/conditions")
            .and_then(|c| c.as_array())
            .cloned()
            .unwrap_or_default();
        let all = conditions.iter().find(|c| c["type"] == "AllInjected");
        Ok(match all {
            Some(c) => (
                c["status"] == "True",
                c["reason"].as_str().unwrap_or_default().to_string(),
            ),
            None => (false, "no status from Chaos Mesh".into()),
        })
    }
}

impl KubeCluster {
    pub fn chaos_reader(&self) -> ChaosReader {
        ChaosReader {
            client: self.client().clone(),
        }
    }

    /// Whether the API server serves NetworkChaos.
    pub async fn chaos_mesh_installed(&self) -> anyhow::Result<bool> {
        match self
            .client()
            .list_api_group_resources(&format!("{GROUP}/{VERSION}"))
            .await
        {
            Ok(list) => Ok(list.resources.iter().any(|r| r.kind == "NetworkChaos")),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
            Err(err) => {
                Err(err).context("cannot ask the API server whether Chaos Mesh is installed")
            }
        }
    }

    pub async fn create_network_chaos(&self, object: serde_json::Value) -> anyhow::Result<()> {
        let object: DynamicObject =
            serde_json::from_value(object).context("a NetworkChaos object")?;
        let namespace = object.metadata.namespace.clone().unwrap_or_default();
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client().clone(), &namespace, &resource());
        api.create(&PostParams::default(), &object)
            .await
            .with_context(|| format!("cannot create a Chaos Mesh NetworkChaos in {namespace}"))?;
        Ok(())
    }

    pub async fn delete_network_chaos(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client().clone(), namespace, &resource());
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(err) => {
                Err(err).with_context(|| format!("cannot delete NetworkChaos {namespace}/{name}"))
            }
        }
    }
}

/// Deletes every NetworkChaos that carries shakedown's annotation with
/// `run_id` (any run's when `None`), of runs provably dead (or all with
/// `force`); none when Chaos Mesh is not installed. Returns the
/// `namespace/name`s deleted, and what was left alone and why.
pub async fn cleanup(
    client: &kube::Client,
    run_id: Option<&str>,
    force: bool,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource());
    let list = match api.list(&ListParams::default()).await {
        Ok(list) => list,
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok((Vec::new(), Vec::new())),
        Err(err) => return Err(err).context("cannot list Chaos Mesh NetworkChaos objects"),
    };
    let mut deleted = Vec::new();
    let mut left_alone = Vec::new();
    for object in list.items {
        let ours = super::marked_by(&object.metadata, run_id);
        let (Some(namespace), Some(name)) = (
            object.metadata.namespace.clone(),
            object.metadata.name.clone(),
        ) else {
            continue;
        };
        if ours && let Err(why) = super::may_clean(&object.metadata, force) {
            left_alone.push(format!("NetworkChaos {namespace}/{name}: {why}"));
            continue;
        }
        if ours {
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &namespace, &resource());
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => deleted.push(format!("{namespace}/{name}")),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(err) => {
                    return Err(err)
                        .with_context(|| format!("cannot delete NetworkChaos {namespace}/{name}"));
                }
            }
        }
    }
    Ok((deleted, left_alone))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chaos_selects_the_role_and_ends_by_itself() {
        let target = Target {
            role: "router".into(),
            namespace: "gw".into(),
            selector: "app=router, tier=edge".into(),
        };
        let chaos = network_chaos(
            "d",
            &target,
            "run-1",
            Duration::from_millis(200),
            Duration::from_millis(20),
            Duration::from_secs(45),
        )
        .unwrap();
        assert_eq!(
            chaos["spec"]["selector"]["labelSelectors"],
            serde_json::json!({"app": "router", "tier": "edge"})
        );
        assert_eq!(
            chaos["spec"]["delay"],
            serde_json::json!({"latency": "200ms", "jitter": "20ms"})
        );
        assert_eq!(chaos["spec"]["duration"], "45s");
        assert_eq!(chaos["metadata"]["annotations"][ANNOTATION], "run-1");
        let set_based = Target {
            selector: "app in (a,b)".into(),
            ..target
        };
        assert!(
            network_chaos(
                "d",
                &set_based,
                "r",
                Duration::ZERO,
                Duration::ZERO,
                Duration::ZERO
            )
            .is_err()
        );
    }
}
