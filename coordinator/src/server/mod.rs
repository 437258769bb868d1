//! The coordinator's `skein/ctl` endpoint and the [`Coordinator`] handle.
//!
//! Every control request arrives on a QUIC stream of its own; `handle_stream` reads it,
//! hands it to the handler of its kind and writes the answer (or the error).
//!
//! # Layout
//! - `mod.rs`: `Shared` (what every handler shares), the dispatcher.
//! - `state`: `State` under one lock, and the model and node lookups.
//! - `join`: `Join`.
//! - `heartbeat`: `Heartbeat` and `ReportUsage` (what nodes report).
//! - `resolve`: `Resolve`.
//! - `deploy`: `Deploy`, `Scale`, `SetTraffic`, `GetTraffic`, `ListModels`.
//! - `fetch`: `FetchArtifact`, `FetchArtifactRange`, `ArtifactSources` (manifest, holders, grant).
//! - `admin`: `Admin` (join tokens, node revocation; the rest in [`Access`]) and `ListNodes`.
//! - `coordinator`: the [`Coordinator`] handle, the accept loop and the timers, [`run`].

mod admin;
mod coordinator;
mod deploy;
mod fetch;
mod heartbeat;
mod join;
mod resolve;
mod state;

pub use coordinator::{run, Coordinator};
pub use deploy::valid_name;

use crate::access::Access;
use crate::artifacts::ArtifactStore;
use crate::config::CoordinatorConfig;
use crate::membership::Thresholds;
use crate::nodeview::NodeView;
use skein_net::stream::{read_frame, write_frame};
use skein_net::MeshCa;
use skein_proto::{CtlEnvelope, CtlRequest, CtlResponse, ErrorCode, WireError};
use state::State;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Chunk size when streaming artifacts.
const CHUNK: usize = 256 * 1024;

/// What every request handler shares.
///
/// # Locking
/// Everything the coordinator knows about the mesh is one [`State`] under one mutex
/// ([`Shared::state`]); there is no second lock to order it against. A handler takes it for
/// the synchronous part of its work, and never across an `.await`: uploads, artifact streams
/// and every other network I/O run with the lock released, and a connection found in
/// `State::node_conns` is closed only after the lock is dropped. [`Access`] locks its own
/// SQLite store and is called only with the state unlocked.
struct Shared {
    /// The circuit relay for nodes behind NAT, when `[relay]` is enabled; its addresses are
    /// told to nodes in heartbeat answers.
    relay: Option<skein_peer::Peer>,
    config: CoordinatorConfig,
    ca: MeshCa,
    /// The registry, membership, coordinates, autoscaler and node connections.
    state: Mutex<State>,
    store: ArtifactStore,
    uploads: Semaphore,
    /// Resolves answered (the tick of the routing order).
    resolves: AtomicU64,
    /// API keys, tenants, tickets, audit log, usage ledger.
    access: Access,
}

type Reply = Result<CtlResponse, WireError>;

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

fn internal(e: impl std::fmt::Display) -> WireError {
    err(ErrorCode::Internal, e.to_string())
}

impl Shared {
    fn thresholds(&self) -> Thresholds {
        Thresholds {
            suspect_after: self.config.suspect_after,
            dead_after: self.config.dead_after,
        }
    }

    /// The mesh state, locked (see [`Shared`] on how long it may be held).
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run the autoscaler over every deployed model version.
    fn scale_tick(&self) -> Result<(), WireError> {
        let mut guard = self.state();
        let st = &mut *guard;
        let models = st.registry.models()?;
        let now = Instant::now();
        // A node hears of a decision at its next heartbeat: lead pre-warms by two intervals.
        let lead = self.config.heartbeat_interval.as_micros() as u64 * 2;
        let view = NodeView::new(&st.membership, now, self.thresholds());
        st.scaler.tick(&models, &view, lead, now);
        Ok(())
    }
}

/// The dispatcher: one control request per stream, answered by the handler of its kind.
async fn handle_stream(shared: Arc<Shared>, r: skein_net::serve::Request) {
    let skein_net::serve::Request {
        peer,
        rtt,
        mut send,
        mut recv,
        conn,
    } = r;
    let max = shared.config.max_frame_len;
    let reply: Result<Option<CtlResponse>, WireError> = async {
        let frame = read_frame(&mut recv, max).await.map_err(WireError::from)?;
        let CtlEnvelope { api_key, request } = frame
            .header()
            .map_err(|e| err(ErrorCode::Malformed, format!("not a control request: {e}")))?;
        let peer = peer.as_deref();
        let key = api_key.as_deref();
        let access = &shared.access;
        match request {
            CtlRequest::Join(j) => shared.join(j),
            CtlRequest::Heartbeat(hb) => shared.heartbeat(peer, &conn, rtt, hb),
            CtlRequest::ReportUsage(records) => shared.report_usage(peer, records),
            CtlRequest::FetchArtifact { sha256, offset } => {
                fetch::fetch_artifact(&shared, peer, key, &sha256, offset, &mut send).await?;
                let _ = send.finish();
                return Ok(None);
            }
            CtlRequest::FetchArtifactRange {
                sha256,
                offset,
                len,
            } => {
                fetch::fetch_artifact_range(&shared, peer, key, &sha256, (offset, len), &mut send)
                    .await?;
                let _ = send.finish();
                return Ok(None);
            }
            CtlRequest::ArtifactSources { sha256 } => {
                fetch::artifact_sources(&shared, peer, key, &sha256).await
            }
            CtlRequest::Deploy(d) => deploy::deploy(&shared, key, d, &mut recv).await,
            CtlRequest::Resolve(r) => shared.resolve_request(key, r, rtt),
            CtlRequest::ListModels => shared.list_models(&access.caller(key, "list models")?),
            CtlRequest::ListNodes => {
                access
                    .caller(key, "list nodes")?
                    .require_platform("list nodes")?;
                shared.list_nodes()
            }
            CtlRequest::Scale {
                name,
                version,
                patch,
            } => {
                let caller = access.caller(key, "scale models")?;
                let r = shared.scale(&caller, &name, version.as_deref(), &patch);
                access.audit(&caller, "models.scale", &name, &r);
                r
            }
            CtlRequest::SetTraffic { name, weights } => {
                let caller = access.caller(key, "set traffic splits")?;
                let r = shared.set_traffic(&caller, &name, weights);
                access.audit(&caller, "models.traffic", &name, &r);
                r
            }
            CtlRequest::GetTraffic { name } => {
                shared.get_traffic(&access.caller(key, "read traffic splits")?, &name)
            }
            CtlRequest::Admin(a) => shared.admin(&access.caller(key, "administer")?, a),
            CtlRequest::CheckKey { api_key } => {
                // A node's HTTP ingress asks; nobody else may use this as a key oracle.
                shared.state().node(peer, "checking API keys")?;
                access
                    .check_key(api_key.as_deref())
                    .map(CtlResponse::KeyChecked)
            }
            _ => Err(err(
                ErrorCode::Malformed,
                "request not supported by this coordinator",
            )),
        }
        .map(Some)
    }
    .await;
    let response = match reply {
        Ok(None) => return,
        Ok(Some(r)) => r,
        Err(e) => {
            tracing::debug!(error = %e, "control request failed");
            CtlResponse::Error(e)
        }
    };
    if let Err(e) = write_frame(&mut send, &response, &[], max).await {
        tracing::debug!(error = %e, "could not answer control request");
    }
    let _ = send.finish();
}
