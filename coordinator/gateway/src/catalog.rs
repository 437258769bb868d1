//! [`Catalog`]: model metadata and readiness from the coordinator, cached for a short time.

use crate::GatewayError;
use skein_proto::ModelInfo;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The deployed model versions as the coordinator lists them, refreshed at most once per `ttl`.
/// One snapshot is kept (bounded by what the coordinator lists); concurrent refreshes collapse
/// into one call.
#[derive(Debug)]
pub struct Catalog {
    client: skein_client::Client,
    ttl: Duration,
    snapshot: tokio::sync::Mutex<Option<(Instant, Arc<Vec<ModelInfo>>)>>,
}

impl Catalog {
    /// A catalog over `client` that refreshes after `ttl`.
    pub fn new(client: skein_client::Client, ttl: Duration) -> Self {
        Catalog {
            client,
            ttl,
            snapshot: tokio::sync::Mutex::new(None),
        }
    }

    /// Every deployed model version.
    pub async fn models(&self) -> Result<Arc<Vec<ModelInfo>>, GatewayError> {
        let mut snap = self.snapshot.lock().await;
        if let Some((at, models)) = snap.as_ref() {
            if at.elapsed() < self.ttl {
                return Ok(models.clone());
            }
        }
        let models = Arc::new(self.client.models().await?);
        *snap = Some((Instant::now(), models.clone()));
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
