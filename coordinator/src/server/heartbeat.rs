//! `Heartbeat` and `ReportUsage`: what a joined node tells the coordinator (its address,
//! coordinate, labels and models; what it served) and what it hears back (its assignments,
//! peers to probe, the ticket keys).

use super::{err, Reply, Shared};
use crate::nodeview;
use skein_proto::{Assignment, CtlResponse, ErrorCode, Heartbeat, HeartbeatAck, UsageRecord};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

/// Peers each heartbeat answer offers a node to probe for RTT.
const PROBE_PEERS: usize = 4;

impl Shared {
    /// `Heartbeat` from the node that holds the certificate `peer`, on connection `conn`.
    pub(super) fn heartbeat(
        &self,
        peer: Option<&str>,
        conn: &quinn::Connection,
        rtt: Duration,
        mut hb: Heartbeat,
    ) -> Reply {
        let mut guard = self.state();
        let st = &mut *guard;
        let rec = st.node(peer, "heartbeating")?;
        if st
            .node_conns
            .get(&rec.node_id)
            .is_none_or(|c| c.stable_id() != conn.stable_id())
        {
            st.node_conns.insert(rec.node_id.clone(), conn.clone());
        }
        if hb.addr.parse::<SocketAddr>().is_err() {
            return Err(err(
                ErrorCode::Malformed,
                format!("heartbeat address `{}` is not host:port", hb.addr),
            ));
        }
        if let Some(report) = &hb.peer {
            let proven = skein_peer::binding::verify(&report.binding, &rec.node_id)
                .map_err(|e| err(ErrorCode::Forbidden, format!("heartbeat refused: {e}")))?
                .to_base58();
            match st.peer_ids.get(&rec.node_id) {
                Some(bound) if *bound != proven => {
                    return Err(err(
                        ErrorCode::Forbidden,
                        format!(
                            "heartbeat refused: node {} reports peer {proven}, but peer {bound} is bound to it",
                            rec.node_id
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    st.peer_ids.insert(rec.node_id.clone(), proven);
                }
            }
        }
        if let Some(r) = hb.peer.as_mut() {
            // Bounded, like everything a node reports.
            const MAX_ADDRS: usize = 16;
            r.listen.truncate(MAX_ADDRS);
            r.observed.truncate(MAX_ADDRS);
            r.relayed.truncate(MAX_ADDRS);
            if !matches!(r.reachability.as_str(), "public" | "nat" | "unknown") {
                r.reachability = "unknown".into();
            }
        }
        let now = Instant::now();
        if let Some(c) = &hb.coordinate {
            // Invalid coordinates or RTTs are refused by the update and change nothing.
            let _ = st
                .vivaldi
                .update(c, rtt.as_secs_f64() * 1e6, &mut rand::thread_rng());
        }
        let own = st.vivaldi.coordinate().clone();
        let models = st.registry.models()?;
        let idle_timeouts: HashMap<(String, String), u64> = models
            .iter()
            .map(|m| {
                (
                    (m.name.clone(), m.version.clone()),
                    m.settings.idle_timeout_ms,
                )
            })
            .collect();
        // The labels of the join token that admitted the node are its own, whatever it says
        // (a fleet token's `site=...` cannot be changed from the device).
        hb.labels
            .extend(rec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        st.scaler
            .observe_heartbeat(&rec.node_id, &hb.models, &idle_timeouts, now);
        st.membership
            .heartbeat(&rec.node_id, &rec.hostname, hb, Some(rtt), now);
        let (membership, scaler, first_fetches) =
            (&st.membership, &st.scaler, &mut st.first_fetches);
        let has_peer_layer = membership
            .member(&rec.node_id)
            .is_some_and(|m| m.peer.is_some());
        let site = membership
            .member(&rec.node_id)
            .and_then(|m| m.site())
            .map(str::to_string);
        let owners: Vec<String> = models.iter().map(|m| m.owner.clone()).collect();
        let assignments: Vec<Assignment> = models
            .into_iter()
            .map(|m| {
                let allowed =
                    nodeview::allowed_on(membership, &rec.node_id, &m, now, self.thresholds());
                let (keep_warm, unload_idle, prewarm) = match scaler.plan(&m.name, &m.version) {
                    Some(p) => {
                        let at = p.warm.iter().position(|n| n == &rec.node_id);
                        (
                            at.is_some_and(|i| i < m.settings.min_replicas as usize),
                            scaler.unload_idle(&m.name, &m.version),
                            at.is_some(),
                        )
                    }
                    // Before the autoscaler's first decision: the provisioned replicas.
                    None => (
                        membership
                            .warm_set(
                                &m.name,
                                &m.version,
                                m.settings.min_replicas as usize,
                                now,
                                self.thresholds(),
                            )
                            .contains(&rec.node_id),
                        false,
                        false,
                    ),
                };
                let (mut keep_warm, mut prewarm) = (keep_warm && allowed, prewarm && allowed);
                // Pre-warm staggering (see `FirstFetches`): nodes with a peer layer load an
                // artifact nobody (of their site, when they have a `site` label) holds one at
                // a time.
                if (keep_warm || prewarm) && has_peer_layer {
                    let held = membership.holders_of(&m.sha256).any(|(id, mb)| {
                        id != &rec.node_id
                            && site.as_deref().is_none_or(|s| mb.site() == Some(s))
                            && crate::membership::Membership::health(mb, now, self.thresholds())
                                == skein_proto::NodeHealth::Alive
                    });
                    let own = membership.holds(&rec.node_id, &m.sha256);
                    let group = match &site {
                        Some(s) => format!("{}@{s}", m.sha256),
                        None => m.sha256.clone(),
                    };
                    if !first_fetches.admit(&group, m.size, &rec.node_id, held || own, now) {
                        tracing::debug!(node = %rec.node_id, model = %m.name, "pre-warm deferred: another node fetches the artifact first");
                        keep_warm = false;
                        prewarm = false;
                    }
                }
                Assignment {
                    name: m.name,
                    version: m.version,
                    sha256: m.sha256,
                    size: m.size,
                    settings: m.settings,
                    keep_warm,
                    unload_idle: unload_idle && !keep_warm && !prewarm,
                    prewarm,
                }
            })
            .collect();
        let peers = membership.probe_peers(
            &rec.node_id,
            PROBE_PEERS,
            now,
            self.thresholds(),
            &mut rand::thread_rng(),
        );
        let peer_id = st.peer_ids.get(&rec.node_id).cloned();
        drop(guard);
        // Offline artifact fetches from LAN holders (issue 20): the node's membership grant
        // (with a bound peer layer) and the digest of each assigned artifact's manifest.
        let membership_grant = peer_id
            .map(|p| self.access.membership_grant(&p))
            .unwrap_or_default();
        let manifest_digests = assignments
            .iter()
            .map(|a: &Assignment| {
                a.sha256
                    .parse::<skein_proto::ArtifactId>()
                    .ok()
                    .and_then(|id| self.store.manifest_digest(&id))
                    .unwrap_or_default()
            })
            .collect();
        Ok(CtlResponse::HeartbeatAck(HeartbeatAck {
            node_id: rec.node_id,
            assignments,
            interval_ms: self.config.heartbeat_interval.as_millis() as u64,
            coordinate: Some(own),
            peers,
            ticket_keys: self.access.ticket_keys(),
            revoked_keys: self.access.revoked_keys(),
            owners,
            relays: self
                .relay
                .as_ref()
                .map(super::coordinator::relay_addrs)
                .unwrap_or_default(),
            membership_grant,
            manifest_digests,
        }))
    }

    /// `ReportUsage`: a node hands in what it served; the records are in the ledger when this
    /// answers.
    pub(super) fn report_usage(&self, peer: Option<&str>, records: Vec<UsageRecord>) -> Reply {
        // A revoked node may still hand in what it served before the revocation.
        let node = self.state().node_even_revoked(peer, "reporting usage")?;
        // The class the coordinator last saw in the node's heartbeats; before the
        // first heartbeat after a coordinator restart, the node's own word.
        let class = self.state().membership.member(&node.node_id).map(|m| {
            m.labels
                .get("device_class")
                .cloned()
                .unwrap_or_else(|| "cpu".into())
        });
        self.access
            .record_usage(&node.node_id, class.as_deref(), records)
            .map(|new| CtlResponse::UsageStored { new })
    }
}
