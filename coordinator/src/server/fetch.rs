//! `FetchArtifact` and `FetchArtifactRange`: model files streamed from the artifact store,
//! from any offset; `ArtifactSources`: an artifact's chunk manifest, the nodes that hold it
//! (nearest the asker first) and a grant to fetch chunks from them (issue 20).

use super::{err, internal, Reply, Shared, CHUNK};
use crate::membership::Membership;
use skein_net::stream::write_frame;
use skein_policy::vivaldi::CoordinateExt;
use skein_proto::{
    ArtifactHolder, ArtifactId, ArtifactSources, CtlResponse, ErrorCode, NodeHealth, WireError,
};
use skein_store::Scope;

/// Holders named in one `ArtifactSources` answer, at most.
const MAX_HOLDERS: usize = 8;

/// `FetchArtifact`: the bytes of artifact `sha256` from `offset` on, to a node (by its
/// certificate) or to a person with a `deploy` key who may see a model that uses it.
pub(super) async fn fetch_artifact(
    shared: &Shared,
    peer: Option<&str>,
    key: Option<&str>,
    sha256: &str,
    offset: u64,
    send: &mut quinn::SendStream,
) -> Result<(), WireError> {
    authorize(shared, peer, key, sha256)?;
    send_artifact(shared, sha256, offset, None, send).await
}

/// `FetchArtifactRange`: `len` bytes of artifact `sha256` from `offset` (fewer at its end), to
/// whom [`fetch_artifact`] serves.
pub(super) async fn fetch_artifact_range(
    shared: &Shared,
    peer: Option<&str>,
    key: Option<&str>,
    sha256: &str,
    (offset, len): (u64, u64),
    send: &mut quinn::SendStream,
) -> Result<(), WireError> {
    if len > skein_net::artifact::MAX_CHUNK_BYTES {
        return Err(err(
            ErrorCode::Malformed,
            format!(
                "{len} bytes at once is more than the {} allowed",
                skein_net::artifact::MAX_CHUNK_BYTES
            ),
        ));
    }
    authorize(shared, peer, key, sha256)?;
    send_artifact(shared, sha256, offset, Some(len), send).await
}

/// `ArtifactSources`: the manifest of artifact `sha256`, and for a node (by its certificate,
/// with a bound peer layer) up to [`MAX_HOLDERS`] alive nodes holding it, nearest first by
/// Vivaldi distance, with a grant naming the asker's PeerId. A person (see
/// [`fetch_artifact`]) gets the manifest only.
pub(super) async fn artifact_sources(
    shared: &Shared,
    peer: Option<&str>,
    key: Option<&str>,
    sha256: &str,
) -> Reply {
    let node = match key {
        Some(_) => None,
        None => shared.state().node(peer, "fetching artifacts").ok(),
    };
    if node.is_none() {
        authorize(shared, peer, key, sha256)?;
    }
    let id = sha256
        .parse::<ArtifactId>()
        .ok()
        .filter(|id| shared.store.contains(id))
        .ok_or_else(|| err(ErrorCode::UnknownArtifact, format!("no artifact {sha256}")))?;
    let store = shared.store.clone();
    let manifest = tokio::task::spawn_blocking(move || store.manifest(&id))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let (holders, peer_id) = match &node {
        Some(rec) => {
            let st = shared.state();
            let holders = holders(&st.membership, &rec.node_id, sha256, shared.thresholds());
            (holders, st.peer_ids.get(&rec.node_id).cloned())
        }
        None => (Vec::new(), None),
    };
    let (holders, grant) = match peer_id {
        Some(p) => {
            let grant =
                shared
                    .access
                    .artifact_grant(&p, sha256, skein_net::grant::DEFAULT_GRANT_TTL_MS);
            (holders, grant)
        }
        // No peer layer: nothing to fetch from peers with.
        None => (Vec::new(), Default::default()),
    };
    Ok(CtlResponse::ArtifactSources(ArtifactSources {
        manifest: skein_net::artifact::manifest_to_wire(&manifest),
        holders,
        grant,
    }))
}

/// Alive nodes other than `asker` that hold `sha256` and run a peer layer (of the asker's
/// `site` when it has that label: peers across sites would load each other's uplinks), nearest
/// `asker` first (Vivaldi; unknown distances last), at most [`MAX_HOLDERS`]. Their addresses:
/// listen (reachable on a LAN) and observed ones, then relay circuits.
fn holders(
    membership: &Membership,
    asker: &str,
    sha256: &str,
    t: crate::membership::Thresholds,
) -> Vec<ArtifactHolder> {
    let now = tokio::time::Instant::now();
    let from = membership.member(asker).and_then(|m| m.coordinate.clone());
    let site = membership.member(asker).and_then(|m| m.site());
    let mut out: Vec<ArtifactHolder> = membership
        .holders_of(sha256)
        .filter(|(id, m)| {
            id.as_str() != asker
                && site.is_none_or(|s| m.site() == Some(s))
                && Membership::health(m, now, t) == NodeHealth::Alive
        })
        .filter_map(|(id, m)| {
            let route = m.peer_route()?;
            let rtt_us = match (&from, &m.coordinate) {
                (Some(a), Some(b)) => a.distance_us(b),
                _ => f64::MAX,
            };
            let mut addrs = route.addrs;
            addrs.extend(route.relayed);
            Some(ArtifactHolder {
                node_id: id.clone(),
                peer_id: route.peer_id,
                addrs,
                rtt_us,
            })
        })
        .collect();
    out.sort_by(|a, b| {
        a.rtt_us
            .total_cmp(&b.rtt_us)
            .then_with(|| a.node_id.cmp(&b.node_id))
    });
    out.truncate(MAX_HOLDERS);
    out
}

/// Nodes fetch with their certificate; people with a `deploy` key, and only artifacts of
/// models they may see.
fn authorize(
    shared: &Shared,
    peer: Option<&str>,
    key: Option<&str>,
    sha256: &str,
) -> Result<(), WireError> {
    if key.is_some() || shared.state().node(peer, "fetching artifacts").is_err() {
        let caller = shared.access.caller(key, "fetch artifacts")?;
        caller.require(Scope::Deploy, "fetch artifacts")?;
        let visible = shared
            .state()
            .registry
            .models()?
            .iter()
            .any(|m| m.sha256 == sha256 && caller.may_see(m));
        if !visible {
            return Err(err(
                ErrorCode::UnknownArtifact,
                format!("no artifact {sha256}"),
            ));
        }
    }
    Ok(())
}

/// The bytes of `sha256` from `offset`: `len` of them (fewer at the end), or all the rest.
async fn send_artifact(
    shared: &Shared,
    sha256: &str,
    offset: u64,
    len: Option<u64>,
    send: &mut quinn::SendStream,
) -> Result<(), WireError> {
    let path = sha256
        .parse::<ArtifactId>()
        .map(|id| shared.store.path(&id))
        .ok()
        .filter(|p| p.is_file())
        .ok_or_else(|| err(ErrorCode::UnknownArtifact, format!("no artifact {sha256}")))?;
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(&path).await.map_err(internal)?;
    let total = file.metadata().await.map_err(internal)?.len();
    if offset > total {
        return Err(err(
            ErrorCode::Malformed,
            format!("offset {offset} is past the end of the {total}-byte artifact"),
        ));
    }
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(internal)?;
    let max = shared.config.max_frame_len;
    let size = len.map_or(total - offset, |l| l.min(total - offset));
    write_frame(send, &CtlResponse::Artifact { total, size }, &[], max)
        .await
        .map_err(WireError::from)?;
    let mut buf = vec![0u8; CHUNK];
    let mut left = size;
    while left > 0 {
        let n = file
            .read(&mut buf[..(left.min(CHUNK as u64) as usize)])
            .await
            .map_err(internal)?;
        if n == 0 {
            return Err(internal("artifact shrank while being sent"));
        }
        send.write_all(&buf[..n]).await.map_err(internal)?;
        shared.store.count_sent(n as u64);
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::Thresholds;
    use skein_proto::{Capacity, Coordinate, Heartbeat, PeerBinding, PeerReport};
    use std::time::Duration;

    fn hb(x: f64, cached: &[&str], peer: Option<&str>) -> Heartbeat {
        let mut vec = vec![0.0; skein_policy::vivaldi::DIMENSIONS];
        vec[0] = x;
        Heartbeat {
            addr: "127.0.0.1:1".into(),
            capacity: Capacity::default(),
            labels: Default::default(),
            models: Vec::new(),
            seq: 0,
            draining: false,
            coordinate: Some(Coordinate {
                vec,
                height: 0.0,
                error: 0.2,
                adjustment: 0.0,
            }),
            ingress: None,
            usage_unsent: 0,
            peer: peer.map(|id| {
                Box::new(PeerReport {
                    binding: PeerBinding {
                        peer_id: id.into(),
                        public_key: Vec::new(),
                        signature: Vec::new(),
                    },
                    reachability: "public".into(),
                    listen: vec![format!("/ip4/192.168.1.2/udp/1/quic-v1/{id}")],
                    observed: Vec::new(),
                    relayed: vec![format!("/relay/p2p-circuit/{id}")],
                })
            }),
            cached: cached.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn holders_are_alive_peers_holding_it_nearest_the_asker_first() {
        let t = Thresholds {
            suspect_after: Duration::from_secs(3),
            dead_after: Duration::from_secs(6),
        };
        let now = tokio::time::Instant::now();
        let long_ago = now.checked_sub(Duration::from_secs(10)).unwrap_or(now);
        let mut m = Membership::default();
        // The asker holds it too (a stale report): never its own holder.
        m.heartbeat("asker", "h", hb(0.0, &["a"], Some("P0")), None, now);
        m.heartbeat("far", "h", hb(5_000.0, &["a", "b"], Some("P1")), None, now);
        m.heartbeat("near", "h", hb(1_000.0, &["a"], Some("P2")), None, now);
        // No peer layer, another artifact, or dead: not holders.
        m.heartbeat("no-peer", "h", hb(10.0, &["a"], None), None, now);
        m.heartbeat("other", "h", hb(10.0, &["b"], Some("P3")), None, now);
        m.heartbeat("dead", "h", hb(1.0, &["a"], Some("P4")), None, long_ago);
        let h = holders(&m, "asker", "a", t);
        let ids: Vec<&str> = h.iter().map(|h| h.node_id.as_str()).collect();
        assert_eq!(ids, ["near", "far"]);
        assert!(h[0].rtt_us < h[1].rtt_us, "{h:?}");
        assert_eq!(h[0].peer_id, "P2");
        // LAN (listen) addresses first, relay circuits last.
        assert!(
            h[0].addrs[0].starts_with("/ip4/192.168.1.2"),
            "{:?}",
            h[0].addrs
        );
        assert!(h[0].addrs.last().is_some_and(|a| a.contains("p2p-circuit")));
        // At most MAX_HOLDERS.
        for i in 0..20 {
            let id = format!("n{i}");
            m.heartbeat(&id, "h", hb(100.0 + i as f64, &["a"], Some("P")), None, now);
        }
        assert_eq!(holders(&m, "asker", "a", t).len(), MAX_HOLDERS);
        // An asker on a site gets holders of its site only.
        let on = |site: &str, x: f64| {
            let mut b = hb(x, &["a"], Some("P"));
            b.labels.insert("site".into(), site.into());
            b
        };
        m.heartbeat("asker", "h", on("berlin", 0.0), None, now);
        m.heartbeat("b1", "h", on("berlin", 3_000.0), None, now);
        m.heartbeat("p1", "h", on("paris", 1.0), None, now);
        let ids: Vec<String> = holders(&m, "asker", "a", t)
            .into_iter()
            .map(|h| h.node_id)
            .collect();
        assert_eq!(ids, ["b1"]);
    }
}
