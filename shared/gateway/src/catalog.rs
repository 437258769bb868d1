//! [`Catalog`]: model metadata and readiness from the coordinator, cached for a short time.

use crate::GatewayError;
use skein_client::ApiKey;
use skein_proto::ModelInfo;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The deployed model versions as the coordinator lists them to each caller (a tenant sees its
/// own and shared models), refreshed at most once per `ttl`. One snapshot per API key, at most
/// [`MAX_CALLERS`]; concurrent refreshes collapse into one call.
#[derive(Debug)]
pub struct Catalog {
    client: skein_client::Client,
    ttl: Duration,
    snapshots: tokio::sync::Mutex<HashMap<Option<ApiKey>, Snapshot>>,
}

type Snapshot = (Instant, Arc<Vec<ModelInfo>>);

/// API keys whose model lists are cached at once.
pub const MAX_CALLERS: usize = 1024;

impl Catalog {
    /// A catalog over `client` that refreshes after `ttl`.
    pub fn new(client: skein_client::Client, ttl: Duration) -> Self {
        Catalog {
            client,
            ttl,
            snapshots: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Every model version the holder of `key` may see (`None`: the gateway's own key).
    pub async fn models(&self, key: Option<&ApiKey>) -> Result<Arc<Vec<ModelInfo>>, GatewayError> {
        let mut snaps = self.snapshots.lock().await;
        let cache_key = key.cloned();
        if let Some((at, models)) = snaps.get(&cache_key) {
            if at.elapsed() < self.ttl {
                return Ok(models.clone());
            }
        }
        let models = match self
            .client
            .control_as(
                &skein_proto::CtlRequest::ListModels,
                key.or(self.client.api_key()),
            )
            .await?
        {
            skein_proto::CtlResponse::Models(m) => Arc::new(m),
            other => {
                return Err(GatewayError::Internal(format!(
                    "unexpected answer to a model list: {other:?}"
                )))
            }
        };
        if snaps.len() >= MAX_CALLERS {
            let ttl = self.ttl;
            snaps.retain(|_, (at, _)| at.elapsed() < ttl);
            if snaps.len() >= MAX_CALLERS {
                snaps.clear();
            }
        }
        snaps.insert(cache_key, (Instant::now(), models.clone()));
        Ok(models)
    }
}

/// The versions of `name`, oldest deployment first.
pub fn versions<'a>(models: &'a [ModelInfo], name: &str) -> Vec<&'a ModelInfo> {
    let mut v: Vec<&ModelInfo> = models.iter().filter(|m| m.name == name).collect();
    v.sort_by_key(|m| m.created_unix_ms);
    v
}

/// `name` at `version`, or its latest (most recently deployed) version.
pub fn find<'a>(
    models: &'a [ModelInfo],
    name: &str,
    version: Option<&str>,
) -> Result<&'a ModelInfo, GatewayError> {
    let all = versions(models, name);
    if all.is_empty() {
        return Err(GatewayError::NotFound(format!(
            "unknown model `{name}`: no model of that name is deployed"
        )));
    }
    match version {
        None => all
            .last()
            .copied()
            .ok_or_else(|| GatewayError::NotFound(format!("unknown model `{name}`"))),
        Some(v) => all.into_iter().find(|m| m.version == v).ok_or_else(|| {
            GatewayError::NotFound(format!("unknown version `{v}` of model `{name}`"))
        }),
    }
}
