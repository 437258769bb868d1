//! Artifacts from LAN holders while the coordinator is unreachable (issue 20).
//!
//! ```text
//!  fetch_with(Fallback)
//!    Fallback::sources ─▶ coordinator: ArtifactSources ──ok──▶ as always
//!                         └─ unreachable (a transfer error, not a refusal) ─▶ LanSource:
//!       mDNS `_skein-peer._udp` peers ──/skein/artifact/1 ChunkRequest{manifest, membership
//!       grant}──▶ each: its manifest, kept only when its digest is the one of the saved
//!       heartbeat answer ─▶ holders = the peers that answered so; no coordinator source
//!    then the same scheduler, bans, resume and bounds; the whole file's sha256 at the end
//! ```
//!
//! **Admission.** Offline no artifact grant can be had, so the fetcher presents its
//! *membership grant* (`HeartbeatAck::membership_grant`: its PeerId, any artifact, valid 50 to
//! 60 min after the answer that brought it, saved with the answer); holders check it as any
//! grant (signature with the route-ticket keys, expiry, the connection's PeerId).
//!
//! **The manifest.** A LAN holder's manifest is used only when its digest is the coordinator's
//! (`HeartbeatAck::manifest_digests`, saved with the answer): every chunk is then checked
//! against the coordinator's chunk digests, as online. An artifact the saved answer binds no
//! digest for cannot be fetched offline.

use crate::peer_artifacts::PeerChunkSource;
use skein_client::lan::{LanBrowser, LanPeer};
use skein_net::artifact::{ArtifactSource, CoordinatorSource, FetchError};
use skein_proto::{
    ArtifactHolder, ArtifactId, ArtifactSources, ErrorCode, HeartbeatAck, SignedTicket, WireError,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

/// How long a fetch waits for LAN peers to be discovered and to answer, at most.
pub const LAN_WAIT: Duration = Duration::from_secs(10);
/// LAN peers asked for a manifest at once, at most (the first ones of the mDNS list).
pub const MAX_LAN_HOLDERS: usize = 8;
/// One manifest request, at most.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Between two looks at the LAN peers.
const POLL: Duration = Duration::from_millis(250);
/// The RTT given to a LAN holder (unmeasured): a LAN round trip.
const LAN_RTT_US: f64 = 1_000.0;

/// What the last heartbeat answer (fresh or saved) gives for offline fetches.
#[derive(Debug, Default, Clone)]
pub struct Bindings {
    /// The membership grant.
    pub grant: SignedTicket,
    /// Manifest digest by artifact sha256.
    pub digests: HashMap<String, String>,
}

impl Bindings {
    /// From `ack`.
    pub fn of(ack: &HeartbeatAck) -> Bindings {
        Bindings {
            grant: ack.membership_grant.clone(),
            digests: ack
                .assignments
                .iter()
                .zip(&ack.manifest_digests)
                .filter(|(_, d)| !d.is_empty())
                .map(|(a, d)| (a.sha256.clone(), d.clone()))
                .collect(),
        }
    }
}

/// The LAN as an artifact source: holders from mDNS, manifests from them (bound), no bytes of
/// its own ([`ArtifactSource::serves_ranges`] is false).
pub struct LanSource<'a> {
    /// The peer layer.
    pub peers: &'a PeerChunkSource<'a>,
    /// LAN discovery (set once it runs).
    pub lan: &'a OnceLock<LanBrowser>,
    /// This node's PeerId (not a holder).
    pub own_peer_id: String,
    /// From the last heartbeat answer.
    pub bindings: Arc<RwLock<Bindings>>,
}

fn unavailable(id: &ArtifactId, why: String) -> FetchError {
    FetchError::Remote(WireError::new(
        ErrorCode::UnknownArtifact,
        format!("the coordinator is unreachable and no LAN holder serves artifact {id}: {why}"),
    ))
}

impl LanSource<'_> {
    fn lan_peers(&self) -> Vec<LanPeer> {
        let mut v = self.lan.get().map(|b| b.peers()).unwrap_or_default();
        v.retain(|p| p.peer_id.as_ref().is_some_and(|id| id != &self.own_peer_id));
        v.truncate(MAX_LAN_HOLDERS);
        v
    }
}

impl ArtifactSource for LanSource<'_> {
    async fn sources(&self, id: &ArtifactId) -> Result<ArtifactSources, FetchError> {
        let (grant, digest) = {
            let b = self.bindings.read().unwrap_or_else(|p| p.into_inner());
            (b.grant.clone(), b.digests.get(id.as_str()).cloned())
        };
        let Some(digest) = digest else {
            return Err(unavailable(
                id,
                "the last heartbeat answer binds no manifest digest for it".into(),
            ));
        };
        if grant.body.is_empty() {
            return Err(unavailable(
                id,
                "no membership grant from the coordinator (no peer layer bound?)".into(),
            ));
        }
        let deadline = tokio::time::Instant::now() + LAN_WAIT;
        let mut last = String::from("no LAN peer with a peer layer was discovered (mDNS)");
        loop {
            let found = self.lan_peers();
            if !found.is_empty() {
                let asks = found.iter().map(|p| {
                    let holder = ArtifactHolder {
                        node_id: p.node_id.clone(),
                        peer_id: p.peer_id.clone().unwrap_or_default(),
                        addrs: p.peer_addrs.clone(),
                        rtt_us: LAN_RTT_US,
                    };
                    let grant = &grant;
                    async move {
                        let m = tokio::time::timeout(
                            MANIFEST_TIMEOUT,
                            self.peers.manifest(&holder, grant, id),
                        )
                        .await
                        .unwrap_or_else(|_| {
                            Err(FetchError::Unexpected("no manifest in time".into()))
                        });
                        (holder, m)
                    }
                });
                let mut manifest = None;
                let mut holders = Vec::new();
                for (holder, m) in futures::future::join_all(asks).await {
                    match m.and_then(|w| {
                        skein_net::artifact::bound_manifest(id, &w, &digest).map(|_| w)
                    }) {
                        Ok(w) => {
                            manifest.get_or_insert(w);
                            holders.push(holder);
                        }
                        Err(e) => {
                            if matches!(e, FetchError::BadManifest { .. }) {
                                tracing::warn!(artifact = %id, peer = %holder.peer_id, error = %e, "LAN holder's manifest refused");
                            }
                            last = format!("{} answered: {e}", holder.node_id);
                        }
                    }
                }
                if let Some(manifest) = manifest {
                    return Ok(ArtifactSources {
                        manifest,
                        holders,
                        grant,
                    });
                }
            }
            if tokio::time::Instant::now() + POLL > deadline {
                return Err(unavailable(id, last));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn serves_ranges(&self) -> bool {
        false
    }

    async fn range(&self, id: &ArtifactId, _: u64, _: u64) -> Result<Vec<u8>, FetchError> {
        Err(unavailable(
            id,
            "the LAN serves chunks from holders only".into(),
        ))
    }
}

/// The coordinator, and the LAN ([`LanSource`]) when the coordinator cannot be reached.
pub struct Fallback<'a> {
    /// The coordinator.
    pub coordinator: CoordinatorSource<'a>,
    /// The LAN; `None` without a peer layer.
    pub lan: Option<LanSource<'a>>,
    /// Counts fetches that went to the LAN.
    pub lan_fetches: &'a AtomicU64,
    on_lan: AtomicBool,
}

impl<'a> Fallback<'a> {
    /// `coordinator`, else `lan`.
    pub fn new(
        coordinator: CoordinatorSource<'a>,
        lan: Option<LanSource<'a>>,
        lan_fetches: &'a AtomicU64,
    ) -> Self {
        Fallback {
            coordinator,
            lan,
            lan_fetches,
            on_lan: AtomicBool::new(false),
        }
    }
}

impl ArtifactSource for Fallback<'_> {
    async fn sources(&self, id: &ArtifactId) -> Result<ArtifactSources, FetchError> {
        match (self.coordinator.sources(id).await, &self.lan) {
            // Unreachable (not a refusal): the LAN's holders.
            (Err(e @ FetchError::Transfer { .. }), Some(lan)) => {
                tracing::warn!(artifact = %id, error = %e, "the coordinator is unreachable: fetching the artifact from LAN holders");
                let s = lan.sources(id).await?;
                self.on_lan.store(true, Ordering::SeqCst);
                self.lan_fetches.fetch_add(1, Ordering::Relaxed);
                tracing::info!(artifact = %id, holders = s.holders.len(), "LAN holders found");
                Ok(s)
            }
            (r, _) => r,
        }
    }

    fn serves_ranges(&self) -> bool {
        !self.on_lan.load(Ordering::SeqCst)
    }

    async fn range(&self, id: &ArtifactId, offset: u64, len: u64) -> Result<Vec<u8>, FetchError> {
        match &self.lan {
            Some(lan) if self.on_lan.load(Ordering::SeqCst) => lan.range(id, offset, len).await,
            _ => self.coordinator.range(id, offset, len).await,
        }
    }
}
