//! Deployments: `Deploy` (an upload, checked, stored and registered), `Scale`, `SetTraffic`,
//! `GetTraffic` and `ListModels`.

use super::{err, internal, Reply, Shared, CHUNK};
use crate::access::{now_ms, Caller};
use crate::artifacts::artifact_id;
use sha2::{Digest, Sha256};
use skein_proto::{CtlResponse, DeployRequest, ErrorCode, ModelInfo, SettingsPatch, WireError};
use skein_store::Scope;
use std::collections::HashMap;
use tokio::time::Instant;

/// Names of models and versions: 1 to 64 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// `Deploy` from a caller with API key `key`: the upload, checked, stored and registered;
/// audited whatever the outcome.
pub(super) async fn deploy(
    shared: &Shared,
    key: Option<&str>,
    req: DeployRequest,
    recv: &mut quinn::RecvStream,
) -> Reply {
    let caller = match shared.access.caller(key, "deploy models") {
        Ok(c) => c,
        Err(e) => {
            let _ = recv.stop(0u32.into());
            return Err(e);
        }
    };
    let target = format!("{}:{}", req.name, req.version.as_deref().unwrap_or("next"));
    let r = deploy_checked(shared, &caller, req, recv).await;
    shared.access.audit(&caller, "models.deploy", &target, &r);
    r
}

async fn deploy_checked(
    shared: &Shared,
    caller: &Caller,
    req: DeployRequest,
    recv: &mut quinn::RecvStream,
) -> Reply {
    if let Err(e) = caller.require(Scope::Deploy, "deploy models") {
        let _ = recv.stop(0u32.into());
        return Err(e);
    }
    let existing = shared.state().registry.model(&req.name, None)?;
    if let Some(existing) = existing {
        if !caller.may_change(&existing) {
            let _ = recv.stop(0u32.into());
            return Err(err(
                ErrorCode::Forbidden,
                format!(
                    "the model name `{}` is taken by another tenant; model names are unique in the mesh",
                    req.name
                ),
            ));
        }
    }
    if !valid_name(&req.name) {
        return Err(err(
            ErrorCode::Malformed,
            format!(
                "model name `{}` is invalid: use 1-64 of A-Z a-z 0-9 _ . -",
                req.name
            ),
        ));
    }
    if let Some(v) = &req.version {
        if !valid_name(v) {
            return Err(err(
                ErrorCode::Malformed,
                format!("version `{v}` is invalid: use 1-64 of A-Z a-z 0-9 _ . -"),
            ));
        }
    }
    if let Some(p) = req.settings.problem() {
        let _ = recv.stop(0u32.into());
        return Err(err(ErrorCode::Malformed, format!("invalid settings: {p}")));
    }
    if let Some(v) = &req.version {
        let existing = shared.state().registry.model(&req.name, Some(v))?;
        if let Some(existing) = existing {
            if existing.sha256 != req.sha256.to_ascii_lowercase() {
                let _ = recv.stop(0u32.into());
                return Err(err(
                    ErrorCode::VersionConflict,
                    format!(
                        "model `{}` version `{v}` already exists with different content (sha256 {}); deploy under a new version",
                        req.name, existing.sha256
                    ),
                ));
            }
        }
    }
    let _permit = shared.uploads.acquire().await.map_err(internal)?;
    let bytes = receive_upload(shared, &req, recv).await?;
    let sha = artifact_id(&bytes);
    let gpu_required = req.settings.accelerator == skein_proto::Accelerator::Gpu;
    let (meta, bytes) =
        tokio::task::spawn_blocking(move || (skein_onnx::inspect_for(&bytes, gpu_required), bytes))
            .await
            .map_err(internal)?;
    let meta = meta.map_err(|e| err(e.code(), e.to_string()))?;
    let store = shared.store.clone();
    let sha2 = sha.clone();
    tokio::task::spawn_blocking(move || store.put(&sha2, &bytes))
        .await
        .map_err(internal)?
        .map_err(|e| internal(format!("storing the artifact: {e}")))?;
    let st = shared.state();
    let reg = &st.registry;
    let version = match req.version {
        Some(v) => v,
        None => reg.next_version(&req.name)?,
    };
    let info = ModelInfo {
        name: req.name,
        version,
        sha256: sha.to_string(),
        size: req.size,
        created_unix_ms: now_ms(),
        inputs: meta.inputs,
        outputs: meta.outputs,
        loaded_on: vec![],
        settings: req.settings,
        warm_replicas: 0,
        loading_replicas: 0,
        cold_starts: 0,
        replicas: vec![],
        scaling: None,
        owner: caller.tenant.clone(),
    };
    let stored = reg.insert_model(&info)??;
    tracing::info!(model = %stored.name, version = %stored.version, sha256 = %stored.sha256, "model deployed");
    Ok(CtlResponse::Deployed(stored))
}

async fn receive_upload(
    shared: &Shared,
    req: &DeployRequest,
    recv: &mut quinn::RecvStream,
) -> Result<Vec<u8>, WireError> {
    if req.size > shared.config.max_upload_bytes {
        let _ = recv.stop(0u32.into());
        return Err(err(
            ErrorCode::UploadTooLarge,
            format!(
                "upload of {} bytes exceeds the coordinator's limit of {} bytes",
                req.size, shared.config.max_upload_bytes
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(req.size.min(64 << 20) as usize);
    let mut hasher = Sha256::new();
    while (bytes.len() as u64) < req.size {
        let want = ((req.size - bytes.len() as u64) as usize).min(CHUNK);
        match recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => {
                hasher.update(&chunk.bytes);
                bytes.extend_from_slice(&chunk.bytes);
            }
            Ok(None) => {
                return Err(err(
                    ErrorCode::Malformed,
                    format!("upload ended after {} of {} bytes", bytes.len(), req.size),
                ))
            }
            Err(e) => return Err(err(ErrorCode::Malformed, format!("upload failed: {e}"))),
        }
    }
    let got = hex::encode(hasher.finalize());
    if got != req.sha256.to_ascii_lowercase() {
        return Err(err(
            ErrorCode::HashMismatch,
            format!(
                "uploaded bytes hash to sha256 {got}, the request announced {}; the upload was corrupted",
                req.sha256
            ),
        ));
    }
    Ok(bytes)
}

impl Shared {
    pub(super) fn scale(
        &self,
        caller: &Caller,
        name: &str,
        version: Option<&str>,
        patch: &SettingsPatch,
    ) -> Reply {
        let st = self.state();
        let mut model = st.owned_model(caller, name, version)?;
        let settings = patch.apply(&model.settings);
        if let Some(p) = settings.problem() {
            return Err(err(ErrorCode::Malformed, format!("invalid settings: {p}")));
        }
        st.registry
            .update_settings(&model.name, &model.version, &settings)?;
        tracing::info!(model = %model.name, version = %model.version, ?settings, "deployment scaled");
        model.settings = settings;
        st.membership
            .fill_replicas(&mut model, Instant::now(), self.thresholds());
        Ok(CtlResponse::Deployed(model))
    }

    pub(super) fn set_traffic(
        &self,
        caller: &Caller,
        name: &str,
        weights: Vec<skein_proto::VersionWeight>,
    ) -> Reply {
        let st = self.state();
        st.owned_model(caller, name, None)?;
        /// Versions one split may name.
        const MAX_SPLIT: usize = 16;
        if weights.len() > MAX_SPLIT {
            return Err(err(
                ErrorCode::Malformed,
                format!("a traffic split names at most {MAX_SPLIT} versions"),
            ));
        }
        if !weights.is_empty() && weights.iter().all(|w| w.weight == 0) {
            return Err(err(
                ErrorCode::Malformed,
                "a traffic split needs a version with a weight above 0",
            ));
        }
        let mut seen = Vec::new();
        for w in &weights {
            if seen.contains(&&w.version) {
                return Err(err(
                    ErrorCode::Malformed,
                    format!("version `{}` appears twice in the split", w.version),
                ));
            }
            seen.push(&w.version);
            st.find_model(name, Some(&w.version))?;
        }
        if weights.is_empty() {
            // Clearing needs the model to exist too.
            st.find_model(name, None)?;
        }
        st.registry.set_traffic(name, &weights)?;
        drop(st);
        tracing::info!(model = %name, ?weights, "traffic split set");
        Ok(CtlResponse::Traffic(weights))
    }

    pub(super) fn get_traffic(&self, caller: &Caller, name: &str) -> Reply {
        let st = self.state();
        st.visible_model(caller, name, None)?;
        Ok(CtlResponse::Traffic(st.registry.traffic(name)?))
    }

    pub(super) fn list_models(&self, caller: &Caller) -> Reply {
        let st = self.state();
        let mut models = st.registry.models()?;
        // Visibility is per model: its latest version's owner and sharing decide.
        let latest: HashMap<String, ModelInfo> =
            models.iter().map(|m| (m.name.clone(), m.clone())).collect();
        models.retain(|m| latest.get(&m.name).is_some_and(|l| caller.may_see(l)));
        let now = Instant::now();
        for m in &mut models {
            st.membership.fill_replicas(m, now, self.thresholds());
            m.scaling = st.scaler.plan(&m.name, &m.version).map(|p| p.info.clone());
        }
        Ok(CtlResponse::Models(models))
    }
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn names_are_checked() {
        for ok in ["ppocr_cls", "a", "v1.2-rc", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(65), "ü"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
