//! LAN discovery (issue 20): nodes advertise their `skein/infer` endpoint and peer layer over
//! DNS-SD/mDNS as `_skein-peer._udp`; nodes and LAN clients browse it and keep a bounded,
//! expiring list of the nodes seen ([`LanPeers`]).
//!
//! ```text
//!  node ──mDNS announce──▶ _skein-peer._udp ◀──browse── LanBrowser ──▶ LanPeers (bounded, expiring)
//!   TXT: node=<id> peer=<PeerId> infer=<ip:port> addrs=<multiaddr,...>
//! ```
//!
//! The list is decisions only (time comes in as `now`); [`LanBrowser`] feeds it from the mDNS
//! responder's events on a thread of its own. Which of the nodes serve a model is asked of
//! each node with a `Served` request over `skein/infer` (the client's [`crate::Client`]).

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The DNS-SD service type of a node's `skein/infer` endpoint and peer layer.
pub const SERVICE_TYPE: &str = "_skein-peer._udp.local.";

/// Longest TXT value (a DNS character-string holds 255 bytes, `key=` included).
const MAX_TXT_VALUE: usize = 240;

/// A node found on the LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanPeer {
    /// The node's id (its instance name and TXT `node`).
    pub node_id: String,
    /// Its peer layer's PeerId (TXT `peer`), when it runs one.
    pub peer_id: Option<String>,
    /// Its `skein/infer` address (TXT `infer`, else the record's first address and port).
    pub infer: SocketAddr,
    /// Its peer layer's addresses (multiaddrs, TXT `addrs`, comma-separated).
    pub peer_addrs: Vec<String>,
}

/// Bounds of a [`LanPeers`] list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LanPeersConfig {
    /// Nodes kept at most (default 256); a new one then replaces the one seen longest ago.
    pub max_peers: usize,
    /// A node not announced again for this long is dropped (default 120 s; mDNS responders
    /// re-announce well within it, and a node that leaves says goodbye).
    pub ttl: Duration,
}

impl Default for LanPeersConfig {
    fn default() -> Self {
        LanPeersConfig {
            max_peers: 256,
            ttl: Duration::from_secs(120),
        }
    }
}

/// The nodes seen on the LAN: bounded ([`LanPeersConfig::max_peers`]) and expiring
/// ([`LanPeersConfig::ttl`]). Decisions only: time comes in as `now`.
#[derive(Debug)]
pub struct LanPeers {
    config: LanPeersConfig,
    entries: HashMap<String, (LanPeer, Instant)>,
}

impl LanPeers {
    /// An empty list.
    pub fn new(config: LanPeersConfig) -> LanPeers {
        LanPeers {
            config,
            entries: HashMap::new(),
        }
    }

    /// `peer` was announced at `now` (added, or its record and time refreshed).
    pub fn observe(&mut self, peer: LanPeer, now: Instant) {
        self.expire(now);
        let max = self.config.max_peers.max(1);
        if !self.entries.contains_key(&peer.node_id) && self.entries.len() >= max {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, seen))| *seen)
                .map(|(id, _)| id.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(peer.node_id.clone(), (peer, now));
    }

    /// `node_id` withdrew its record (an mDNS goodbye).
    pub fn remove(&mut self, node_id: &str) {
        self.entries.remove(node_id);
    }

    /// Drop the nodes not announced for [`LanPeersConfig::ttl`].
    pub fn expire(&mut self, now: Instant) {
        let ttl = self.config.ttl;
        self.entries
            .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < ttl);
    }

    /// The nodes seen within the TTL at `now`, most recently announced first.
    pub fn list(&self, now: Instant) -> Vec<LanPeer> {
        let ttl = self.config.ttl;
        let mut live: Vec<(&LanPeer, Instant)> = self
            .entries
            .values()
            .filter(|(_, seen)| now.saturating_duration_since(*seen) < ttl)
            .map(|(p, seen)| (p, *seen))
            .collect();
        live.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.node_id.cmp(&b.0.node_id)));
        live.into_iter().map(|(p, _)| p.clone()).collect()
    }

    /// How many nodes the list holds (expired ones included until the next change).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The DNS-SD record of node `node_id` whose `skein/infer` endpoint listens on `infer`, with
/// its peer layer's `peer_id` and `peer_addrs` (as many as fit one TXT value). On a wildcard
/// `infer` address the responder publishes the host's own addresses.
pub fn service_info(
    node_id: &str,
    infer: SocketAddr,
    peer_id: Option<&str>,
    peer_addrs: &[String],
) -> Result<ServiceInfo, mdns_sd::Error> {
    let short: String = node_id.chars().take(12).collect();
    let host = format!("skein-{short}.local.");
    let mut addrs = String::new();
    for a in peer_addrs {
        if addrs.len() + a.len() + 1 > MAX_TXT_VALUE {
            break;
        }
        if !addrs.is_empty() {
            addrs.push(',');
        }
        addrs.push_str(a);
    }
    let infer_text = infer.to_string();
    let mut props: Vec<(&str, &str)> = vec![("node", node_id), ("infer", &infer_text)];
    if let Some(p) = peer_id {
        props.push(("peer", p));
    }
    if !addrs.is_empty() {
        props.push(("addrs", &addrs));
    }
    if infer.ip().is_unspecified() {
        Ok(
            ServiceInfo::new(SERVICE_TYPE, node_id, &host, "", infer.port(), &props[..])?
                .enable_addr_auto(),
        )
    } else {
        ServiceInfo::new(
            SERVICE_TYPE,
            node_id,
            &host,
            infer.ip(),
            infer.port(),
            &props[..],
        )
    }
}

/// A [`LanPeer`] from a resolved record: TXT `node` is required; `infer` is the TXT address
/// unless that is a wildcard, else the record's first address (IPv4 first) and port.
pub fn peer_of(
    node: Option<&str>,
    infer: Option<&str>,
    peer: Option<&str>,
    addrs: Option<&str>,
    record_addrs: &[IpAddr],
    port: u16,
) -> Option<LanPeer> {
    let node_id = node.filter(|n| !n.is_empty())?.to_string();
    let from_txt = infer
        .and_then(|i| i.parse::<SocketAddr>().ok())
        .filter(|a| !a.ip().is_unspecified());
    let infer = match from_txt {
        Some(a) => a,
        None => {
            let mut ips: Vec<IpAddr> = record_addrs.to_vec();
            ips.sort_by_key(|ip| (ip.is_ipv6(), *ip));
            SocketAddr::new(*ips.first()?, port)
        }
    };
    Some(LanPeer {
        node_id,
        peer_id: peer.filter(|p| !p.is_empty()).map(str::to_string),
        infer,
        peer_addrs: addrs
            .map(|a| {
                a.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Browses `_skein-peer._udp` on `daemon` into a shared [`LanPeers`] (a thread of its own,
/// ended when the daemon stops browsing or shuts down).
#[derive(Debug, Clone)]
pub struct LanBrowser {
    peers: Arc<Mutex<LanPeers>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LanBrowser {
    /// Start browsing on `daemon`.
    pub fn start(
        daemon: &ServiceDaemon,
        config: LanPeersConfig,
    ) -> Result<LanBrowser, mdns_sd::Error> {
        let events = daemon.browse(SERVICE_TYPE)?;
        let peers = Arc::new(Mutex::new(LanPeers::new(config)));
        let list = peers.clone();
        std::thread::Builder::new()
            .name("skein-lan-browse".into())
            .spawn(move || {
                while let Ok(event) = events.recv() {
                    match event {
                        ServiceEvent::ServiceResolved(s) => {
                            let ips: Vec<IpAddr> =
                                s.get_addresses().iter().map(|a| a.to_ip_addr()).collect();
                            let found = peer_of(
                                s.get_property_val_str("node"),
                                s.get_property_val_str("infer"),
                                s.get_property_val_str("peer"),
                                s.get_property_val_str("addrs"),
                                &ips,
                                s.get_port(),
                            );
                            if let Some(p) = found {
                                tracing::debug!(node = %p.node_id, infer = %p.infer, "LAN peer seen");
                                lock(&list).observe(p, Instant::now());
                            }
                        }
                        ServiceEvent::ServiceRemoved(_, fullname) => {
                            if let Some(id) = fullname.strip_suffix(&format!(".{SERVICE_TYPE}")) {
                                lock(&list).remove(id);
                            }
                        }
                        ServiceEvent::SearchStopped(_) => break,
                        _ => {}
                    }
                }
            })
            .map_err(|e| mdns_sd::Error::Msg(format!("spawning the LAN browser: {e}")))?;
        Ok(LanBrowser { peers })
    }

    /// The nodes seen within the TTL now, most recently announced first.
    pub fn peers(&self) -> Vec<LanPeer> {
        lock(&self.peers).list(Instant::now())
    }
}

/// LAN discovery of an SDK client ([`crate::ClientConfig::lan`]; off by default).
///
/// With it on, when the coordinator does not answer within
/// [`crate::ClientConfig::coordinator_timeout`], the client finds the nodes on its LAN that
/// serve the model (mDNS, then a `Served` request to each) and calls them with the route
/// ticket of its last resolve of that model, until the coordinator answers again. Nodes that
/// cannot reach their coordinator accept a ticket within its tenant's offline validity.
#[derive(Debug, Clone)]
pub struct LanConfig {
    /// Where the routes (tickets included) of the last resolves are kept, so a new process
    /// (`skein infer --lan`) holds them too; `None` (the default): in memory only. Written
    /// with mode 0600: tickets are bearer credentials until their offline validity ends.
    pub ticket_file: Option<std::path::PathBuf>,
    /// How long a call waits for the first mDNS answers when no LAN node is known yet
    /// (default 3 s).
    pub browse_wait: Duration,
    /// How long a node's answer to the `Served` request is reused (default 2 s).
    pub served_ttl: Duration,
    /// Bounds of the list of LAN nodes.
    pub peers: LanPeersConfig,
}

impl Default for LanConfig {
    fn default() -> Self {
        LanConfig {
            ticket_file: None,
            browse_wait: Duration::from_secs(3),
            served_ttl: Duration::from_secs(2),
            peers: LanPeersConfig::default(),
        }
    }
}

/// Routes (with their tickets) kept at most for LAN calls.
pub(crate) const MAX_HELD: usize = 64;

/// One held route as stored in [`LanConfig::ticket_file`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct HeldRoute {
    /// sha256 (hex) of the API key the route was resolved with (`None`: no key).
    pub(crate) key_sha256: Option<String>,
    pub(crate) model: String,
    pub(crate) version: Option<String>,
    pub(crate) resolution: skein_proto::Resolution,
}

/// The sha256 (hex) a key is stored under.
pub(crate) fn key_digest(key: Option<&str>) -> Option<String> {
    use sha2::Digest;
    key.map(|k| hex::encode(sha2::Sha256::digest(k.as_bytes())))
}

/// Read the held routes of `path` (none when it is missing or unreadable).
pub(crate) fn load_held(path: &std::path::Path) -> Vec<HeldRoute> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<Vec<HeldRoute>>(&bytes) {
            Ok(mut v) => {
                v.truncate(MAX_HELD);
                v
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "LAN: ignoring an unreadable ticket file");
                Vec::new()
            }
        },
        Err(_) => Vec::new(),
    }
}

/// Write `routes` to `path` (mode 0600, replaced atomically).
pub(crate) fn save_held(path: &std::path::Path, routes: &[HeldRoute]) -> std::io::Result<()> {
    use std::io::Write;
    let text = serde_json::to_vec(routes).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, port: u16) -> LanPeer {
        LanPeer {
            node_id: id.into(),
            peer_id: None,
            infer: SocketAddr::from(([192, 168, 1, 20], port)),
            peer_addrs: Vec::new(),
        }
    }

    #[test]
    fn the_list_is_bounded_and_expires() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = LanPeers::new(LanPeersConfig {
            max_peers: 3,
            ttl: s(120),
        });
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            l.observe(peer(id, 1), t0 + s(i as u64));
        }
        // Full: a new node replaces the one announced longest ago (a).
        l.observe(peer("d", 1), t0 + s(3));
        let ids = |l: &LanPeers, now| {
            l.list(now)
                .into_iter()
                .map(|p| p.node_id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&l, t0 + s(3)), ["d", "c", "b"]);
        assert_eq!(l.len(), 3);
        // A known node announced again refreshes its record and time, evicting nobody.
        l.observe(peer("b", 2), t0 + s(4));
        assert_eq!(ids(&l, t0 + s(4)), ["b", "d", "c"]);
        assert_eq!(l.list(t0 + s(4))[0].infer.port(), 2);
        // c (seen at 2 s) is gone 120 s later; b (4 s) stays until 124 s.
        assert_eq!(ids(&l, t0 + s(122)), ["b", "d"]);
        assert_eq!(ids(&l, t0 + s(124)), Vec::<String>::new());
        l.expire(t0 + s(124));
        assert!(l.is_empty());
        // A goodbye removes at once.
        l.observe(peer("e", 1), t0 + s(200));
        l.remove("e");
        assert!(l.list(t0 + s(200)).is_empty());
    }

    #[test]
    fn the_record_carries_the_node_its_peer_and_its_addresses() {
        let id = "9c1f0d3a5b7e4c2f8a6d1e0b3c5a7f9e";
        let long: Vec<String> = (0..20)
            .map(|i| format!("/ip4/192.168.1.20/udp/{}/quic-v1", 4000 + i))
            .collect();
        let info = service_info(
            id,
            "192.168.1.20:7001".parse().unwrap(),
            Some("12D3KooWabc"),
            &long,
        )
        .unwrap();
        assert_eq!(info.get_type(), SERVICE_TYPE);
        assert_eq!(info.get_fullname(), format!("{id}.{SERVICE_TYPE}"));
        assert_eq!(info.get_port(), 7001);
        assert_eq!(info.get_property_val_str("node"), Some(id));
        assert_eq!(info.get_property_val_str("peer"), Some("12D3KooWabc"));
        assert_eq!(
            info.get_property_val_str("infer"),
            Some("192.168.1.20:7001")
        );
        let addrs = info.get_property_val_str("addrs").unwrap();
        assert!(addrs.len() <= MAX_TXT_VALUE, "{}", addrs.len());
        assert!(addrs.starts_with("/ip4/192.168.1.20/udp/4000/quic-v1,"));
        let got = peer_of(
            Some(id),
            info.get_property_val_str("infer"),
            info.get_property_val_str("peer"),
            Some(addrs),
            &[],
            7001,
        )
        .unwrap();
        assert_eq!(got.infer, "192.168.1.20:7001".parse().unwrap());
        assert_eq!(got.peer_addrs[0], long[0]);
        // A wildcard `infer`: the record's address (IPv4 first) with its port.
        let ips: Vec<IpAddr> = vec!["fe80::1".parse().unwrap(), "10.0.0.7".parse().unwrap()];
        let got = peer_of(Some(id), Some("0.0.0.0:7001"), None, None, &ips, 7001).unwrap();
        assert_eq!(got.infer, "10.0.0.7:7001".parse().unwrap());
        assert_eq!(got.peer_id, None);
        // No node id, or no usable address: not a peer.
        assert_eq!(peer_of(None, Some("10.0.0.7:1"), None, None, &[], 1), None);
        assert_eq!(peer_of(Some(id), None, None, None, &[], 1), None);
    }
}
