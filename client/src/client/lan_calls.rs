//! Calls without the coordinator (issue 20): routes held from earlier resolves, and the LAN
//! nodes (mDNS) that say they serve the model (`Served` over `skein/infer`).

use super::{lock, Client};
use crate::lan::{key_digest, save_held, HeldRoute, LanPeer, MAX_HELD};
use crate::{ApiKey, Error};
use skein_net::stream::{read_frame, write_frame};
use skein_proto::{
    Candidate, InferRequest, InferResponse, RequestKind, Resolution, ServedModels, WireError,
};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// How long one node may take to answer `Served`.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// LAN nodes asked at once.
const QUERY_FANOUT: usize = 16;
/// A node's answer to `Served` older than this is not used.
const SERVED_MAX_AGE: Duration = Duration::from_secs(30);

impl Client {
    /// Keep `r` (the last resolve of this route, ticket included) for calls while the
    /// coordinator cannot be reached; written to the ticket file when its ticket is new.
    pub(super) fn hold(
        &self,
        key: Option<&ApiKey>,
        model: &str,
        version: Option<&str>,
        r: &Resolution,
    ) {
        let Some(lan) = &self.inner.lan else { return };
        let held = HeldRoute {
            key_sha256: key_digest(key.map(ApiKey::as_str)),
            model: model.to_string(),
            version: version.map(str::to_string),
            resolution: r.clone(),
        };
        let snapshot = {
            let mut all = lock(&lan.held);
            let same = |h: &HeldRoute| {
                h.key_sha256 == held.key_sha256
                    && h.model == held.model
                    && h.version == held.version
            };
            let unchanged = all
                .iter()
                .any(|h| same(h) && h.resolution.ticket == r.ticket);
            all.retain(|h| !same(h));
            if all.len() >= MAX_HELD {
                all.remove(0);
            }
            all.push(held);
            if unchanged {
                return;
            }
            all.clone()
        };
        if let Some(path) = &lan.config.ticket_file {
            if let Err(e) = save_held(path, &snapshot) {
                tracing::warn!(path = %path.display(), error = %e, "LAN: could not save the held route tickets");
            }
        }
    }

    /// A route without the coordinator: the held route's ticket, and as candidates the LAN
    /// nodes that serve its version (loaded first), then the held route's own nodes.
    pub(super) async fn lan_route(
        &self,
        key: Option<&ApiKey>,
        model: &str,
        version: Option<&str>,
    ) -> Result<Resolution, Error> {
        let Some(lan) = &self.inner.lan else {
            return Err(self.coordinator_unreachable("LAN discovery is off".into()));
        };
        let digest = key_digest(key.map(ApiKey::as_str));
        let held = {
            let all = lock(&lan.held);
            let mine = |h: &&HeldRoute| h.key_sha256 == digest && h.model == model;
            all.iter()
                .rev()
                .filter(mine)
                .find(|h| h.version.as_deref() == version)
                .or_else(|| {
                    all.iter().rev().filter(mine).find(|h| {
                        version.is_some_and(|v| {
                            h.resolution.version == v
                                || h.resolution.split.iter().any(|w| w.version == v)
                        })
                    })
                })
                .map(|h| h.resolution.clone())
        };
        let Some(held) = held else {
            return Err(self.coordinator_unreachable(format!(
                "and this client holds no route ticket for `{model}` from an earlier resolve (LAN nodes accept only tickets)"
            )));
        };
        let want = version.unwrap_or(&held.version).to_string();
        let found = self.lan_serving(&held).await;
        let mut lan_nodes: Vec<Candidate> = Vec::new();
        for (peer, s) in found {
            let Some(m) = s
                .models
                .iter()
                .find(|m| m.name == held.model && m.version == want)
            else {
                continue;
            };
            lan_nodes.push(Candidate {
                node_id: s.node_id.clone(),
                addr: peer.infer.to_string(),
                loaded: m.loaded,
                expected_us: if m.loaded { 0.0 } else { 1e6 },
                parts: Default::default(),
                rtt_source: "lan".into(),
                coordinate: None,
                concurrency: 1,
                peer: None,
            });
        }
        lan_nodes.sort_by_key(|c| !c.loaded);
        let mut candidates = lan_nodes;
        for c in &held.candidates {
            if !candidates.iter().any(|x| x.node_id == c.node_id) {
                candidates.push(c.clone());
            }
        }
        tracing::debug!(model, version = %want, nodes = candidates.len(), "LAN route");
        Ok(Resolution {
            version: want,
            candidates,
            ..held
        })
    }

    /// The LAN nodes seen; when none is yet, waits up to `wait` for the first mDNS answers.
    async fn lan_peers_waiting(&self, wait: Duration) -> Vec<LanPeer> {
        let until = Instant::now() + wait;
        loop {
            let peers = self.lan_peers();
            if !peers.is_empty() || Instant::now() >= until {
                return peers;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The LAN nodes and what each serves. Answers younger than [`SERVED_MAX_AGE`] are used
    /// at once (those older than [`crate::LanConfig::served_ttl`] asked again in the
    /// background, one round at a time); only when none is usable are the nodes asked while
    /// the call waits.
    async fn lan_serving(&self, held: &Resolution) -> Vec<(LanPeer, ServedModels)> {
        let Some(lan) = &self.inner.lan else {
            return Vec::new();
        };
        let peers = self.lan_peers_waiting(lan.config.browse_wait).await;
        self.drop_moved(&peers);
        let now = Instant::now();
        let mut usable = Vec::new();
        let mut ask = Vec::new();
        {
            let served = lock(&lan.served);
            for p in &peers {
                match served.get(&p.node_id) {
                    Some((at, s)) if now.saturating_duration_since(*at) < SERVED_MAX_AGE => {
                        if now.saturating_duration_since(*at) >= lan.config.served_ttl {
                            ask.push(p.clone());
                        }
                        usable.push((p.clone(), s.clone()));
                    }
                    _ => ask.push(p.clone()),
                }
            }
        }
        let serves = |v: &[(LanPeer, ServedModels)]| {
            v.iter()
                .any(|(_, s)| s.models.iter().any(|m| m.name == held.model))
        };
        if serves(&usable) {
            if !ask.is_empty() && !lan.refreshing.swap(true, Ordering::SeqCst) {
                let (me, held) = (self.clone(), held.clone());
                tokio::spawn(async move {
                    me.ask_served(ask, &held).await;
                    if let Some(lan) = &me.inner.lan {
                        lan.refreshing.store(false, Ordering::SeqCst);
                    }
                });
            }
            return usable;
        }
        let mut got = self.ask_served(ask, held).await;
        got.extend(usable);
        got
    }

    /// Ask each of `peers` (at most [`QUERY_FANOUT`] at once, each within
    /// [`QUERY_TIMEOUT`]) what it serves; the answers, also remembered.
    async fn ask_served(
        &self,
        peers: Vec<LanPeer>,
        held: &Resolution,
    ) -> Vec<(LanPeer, ServedModels)> {
        let Some(lan) = &self.inner.lan else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for chunk in peers.chunks(QUERY_FANOUT) {
            let mut ask = tokio::task::JoinSet::new();
            for p in chunk {
                let (me, p, held) = (self.clone(), p.clone(), held.clone());
                ask.spawn(async move {
                    let r = tokio::time::timeout(QUERY_TIMEOUT, me.query_served(&p, &held))
                        .await
                        .unwrap_or(Err(Error::Timeout(QUERY_TIMEOUT)));
                    (p, r)
                });
            }
            while let Some(done) = ask.join_next().await {
                let Ok((p, r)) = done else { continue };
                match r {
                    Ok(s) => {
                        let mut served = lock(&lan.served);
                        let max = lan.config.peers.max_peers.max(1);
                        if !served.contains_key(&p.node_id) && served.len() >= max {
                            let now = Instant::now();
                            served.retain(|_, (at, _)| {
                                now.saturating_duration_since(*at) < SERVED_MAX_AGE
                            });
                            if served.len() >= max {
                                served.clear();
                            }
                        }
                        served.insert(p.node_id.clone(), (Instant::now(), s.clone()));
                        out.push((p, s));
                    }
                    Err(e) => {
                        tracing::debug!(node = %p.node_id, addr = %p.infer, error = %e, "LAN node did not say what it serves")
                    }
                }
            }
        }
        out
    }

    /// Close pooled connections to LAN nodes that now announce another address (restarted):
    /// a call in flight there fails over now, not at the connection's idle timeout.
    pub(super) fn drop_moved(&self, peers: &[LanPeer]) {
        let mut nodes = lock(&self.inner.nodes);
        for p in peers {
            if let Some(super::Pooled::Ready(c)) = nodes.get(&p.node_id) {
                if c.conn.remote_address() != p.infer {
                    c.conn.close(0u32.into(), b"node moved");
                    nodes.remove(&p.node_id);
                }
            }
        }
    }

    /// Ask `peer` what it serves, presenting `held`'s ticket (over `skein/infer`).
    async fn query_served(&self, peer: &LanPeer, held: &Resolution) -> Result<ServedModels, Error> {
        let (conn, _) = self
            .node_conn(&peer.node_id, &peer.infer.to_string(), Instant::now())
            .await?;
        let req = InferRequest {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            model: held.model.clone(),
            version: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
            timeout_ms: Some(QUERY_TIMEOUT.as_millis() as u64),
            ticket: held.ticket.clone(),
            trace: None,
            kind: RequestKind::Served,
        };
        let max = self.inner.config.max_frame_len;
        let (mut send, mut recv) = conn
            .conn
            .open_bi()
            .await
            .map_err(|e| Error::Transport(e.to_string()))?;
        write_frame(&mut send, &req, &[], max).await?;
        let _ = send.finish();
        let frame = read_frame(&mut recv, max).await?;
        match frame
            .header::<InferResponse>()
            .map_err(skein_net::NetError::from)?
        {
            InferResponse::Served(s) if s.node_id == peer.node_id => Ok(s),
            InferResponse::Served(s) => Err(Error::Remote(WireError::new(
                skein_proto::ErrorCode::Malformed,
                format!("node {} answered as {}", peer.node_id, s.node_id),
            ))),
            InferResponse::Err(e) => Err(Error::Remote(e)),
            _ => Err(Error::Transport(
                "a node answered `Served` with an inference".into(),
            )),
        }
    }
}
