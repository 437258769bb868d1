//! Offline operation (issue 20): what a node does when its coordinator does not answer.
//!
//! **Offline, precisely.** A node is offline when its coordinator has not answered (a
//! heartbeat or a usage report) for [`OFFLINE_AFTER_BEATS`] heartbeat intervals (the
//! interval of the last answer, 1 s by default), and from a start made without an answer
//! (from the saved answer, below) until the first answer. It is
//! shown by `skein_node_offline` (1/0) beside `skein_node_coordinator_last_seen_seconds` on
//! `/metrics`, and logged when it changes.
//!
//! **What holds offline.** The deployments, their settings and the keep-alive / scale-to-zero
//! decisions of the last heartbeat answer, which is saved in `<data_dir>/last-heartbeat.json`
//! (replaced atomically when it changes) so that a node restarted during an outage starts from
//! it; models keep serving, and a model not loaded loads from the artifact cache when called.
//! Route tickets are accepted within their tenant's offline validity from issue (skein-net's
//! `Reach::Offline`), cached API keys at the HTTP ingress likewise; nothing else. Usage records
//! wait in the spool (`metering`).

use super::{lock, Shared};
use skein_net::ticket::Reach;
use skein_proto::{HeartbeatAck, ServedModel, ServedModels};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Heartbeat intervals without an answer after which a node is offline.
pub const OFFLINE_AFTER_BEATS: u64 = 3;

/// The platform's tenant (the coordinator's `root`): it sees every model.
const PLATFORM_TENANT: &str = "root";

/// The last heartbeat answer, in the data dir.
pub const SAVED_ANSWER_FILE: &str = "last-heartbeat.json";

/// Whether a node is offline, and its saved heartbeat answer.
#[derive(Debug, Default)]
pub(crate) struct OfflineState {
    /// Started from the saved answer, and no answer since.
    started_offline: AtomicBool,
    /// Offline at the last look (to log changes).
    was_offline: AtomicBool,
    /// The bytes last saved (not written again while unchanged).
    saved: Mutex<Vec<u8>>,
}

fn saved_path(dir: &Path) -> PathBuf {
    dir.join(SAVED_ANSWER_FILE)
}

/// The saved answer of `dir` and how long ago it was saved, if there is a readable one.
pub(crate) fn load_answer(dir: &Path) -> Option<(HeartbeatAck, Duration)> {
    let path = saved_path(dir);
    let bytes = std::fs::read(&path).ok()?;
    let age = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .unwrap_or_default();
    match serde_json::from_slice(&bytes) {
        Ok(ack) => Some((ack, age)),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the saved heartbeat answer does not parse; ignoring it");
            None
        }
    }
}

impl OfflineState {
    /// Save `ack` in `dir` when it differs from the last saved (write, fsync, rename).
    pub(crate) fn save(&self, dir: &Path, ack: &HeartbeatAck) {
        // The peers to probe and the coordinator's coordinate change with every answer and
        // matter only online: leaving them out, the file is rewritten only when something
        // that holds offline changes.
        let kept = HeartbeatAck {
            peers: Vec::new(),
            coordinate: None,
            ..ack.clone()
        };
        let Ok(bytes) = serde_json::to_vec(&kept) else {
            return;
        };
        let mut saved = lock(&self.saved);
        if *saved == bytes {
            return;
        }
        let path = saved_path(dir);
        let tmp = path.with_extension("json.tmp");
        let written = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        match written {
            Ok(()) => *saved = bytes,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not save the heartbeat answer")
            }
        }
    }

    /// This start had no answer: offline until the first one.
    pub(crate) fn start_offline(&self) {
        self.started_offline.store(true, Ordering::SeqCst);
        self.was_offline.store(true, Ordering::SeqCst);
    }

    /// The coordinator answered.
    pub(crate) fn answered(&self) {
        self.started_offline.store(false, Ordering::SeqCst);
    }
}

impl Shared {
    /// Whether this node is offline now (see the module doc).
    pub(crate) fn is_offline(&self) -> bool {
        if self.offline.started_offline.load(Ordering::SeqCst) {
            return true;
        }
        // By the age of the last answer, not the last heartbeat's result: a heartbeat to a
        // coordinator that died under its connection hangs rather than fails.
        let interval = Duration::from_millis(self.interval_ms.load(Ordering::Relaxed));
        lock(&self.coordinator_seen).elapsed() >= interval * OFFLINE_AFTER_BEATS as u32
    }

    /// Which ticket validity applies now.
    pub(crate) fn reach(&self) -> Reach {
        if self.is_offline() {
            Reach::Offline
        } else {
            Reach::Online
        }
    }

    /// Check `req`'s route ticket for its model (and `version`, when given) now, by the rule of
    /// `reach` (offline: its tenant's offline validity instead of its expiry).
    pub(crate) fn verify_ticket(
        &self,
        req: &skein_proto::InferRequest,
        version: Option<&str>,
        reach: Reach,
    ) -> Result<skein_proto::RouteTicket, skein_proto::WireError> {
        self.tickets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .verify_at(&req.ticket, crate::unix_ms(), &req.model, version, reach)
            .map_err(|e| skein_proto::WireError::new(e.code(), e.to_string()))
    }

    /// Log a change between online and offline (called after each heartbeat).
    pub(crate) fn log_reach(&self) {
        let now = self.is_offline();
        let before = self.offline.was_offline.swap(now, Ordering::SeqCst);
        let seen = lock(&self.coordinator_seen).elapsed().as_secs_f64();
        match (before, now) {
            (false, true) => tracing::warn!(
                unseen_s = seen,
                coordinator = %self.ctl.addr(),
                "offline: the coordinator has not answered for {OFFLINE_AFTER_BEATS} heartbeat intervals; serving the deployments of its last answer, route tickets accepted within their offline validity, usage kept in the spool"
            ),
            (true, false) => tracing::info!(
                coordinator = %self.ctl.addr(),
                "online: the coordinator answers again"
            ),
            _ => {}
        }
    }

    /// The answer to a `Served` request: what this node serves, to a caller whose route
    /// ticket (for any model) it accepts now.
    pub(crate) fn served(
        &self,
        req: &skein_proto::InferRequest,
    ) -> Result<ServedModels, skein_proto::WireError> {
        let ticket = self.verify_ticket(req, None, self.reach())?;
        Ok(self.served_models(Some(&ticket.tenant)))
    }

    /// What this node serves: to `tenant`, its own models and shared ones (every model to the
    /// platform's `root` tenant, or with `None`).
    pub(crate) fn served_models(&self, tenant: Option<&str>) -> ServedModels {
        let latest = self
            .latest
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let owners = self
            .owners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let visible = |s: &crate::executor::Slot| match tenant {
            None | Some(PLATFORM_TENANT) => true,
            Some(t) => {
                s.settings().shared
                    || owners
                        .get(&(s.name.clone(), s.version.clone()))
                        .is_some_and(|o| o == t)
            }
        };
        let mut models: Vec<ServedModel> = self
            .slot_list()
            .iter()
            .filter(|s| visible(s))
            .map(|s| ServedModel {
                name: s.name.clone(),
                version: s.version.clone(),
                loaded: s.is_loaded(),
                latest: latest.get(&s.name) == Some(&s.version),
            })
            .collect();
        models.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
        ServedModels {
            node_id: self.node_id.clone(),
            addr: self.advertise.to_string(),
            offline: self.is_offline(),
            models,
        }
    }

    /// The node's offline gauge, as Prometheus text.
    pub(crate) fn render_offline(&self, out: &mut String) {
        use std::fmt::Write as _;
        let node = self.node_id.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(
            out,
            "# HELP skein_node_offline 1 while the node is offline: its coordinator has not answered for {OFFLINE_AFTER_BEATS} heartbeat intervals (or it started without an answer); it serves from its last heartbeat answer.\n# TYPE skein_node_offline gauge\nskein_node_offline{{node=\"{node}\"}} {}",
            u8::from(self.is_offline())
        );
    }
}

/// `Instant::now()` less `age` (now when that is before the clock's start).
pub(crate) fn ago(age: Duration) -> Instant {
    let now = Instant::now();
    now.checked_sub(age).unwrap_or(now)
}

/// Publish this node's `_skein-peer._udp` record on `responder` and browse for the LAN's
/// other nodes (logged, never fatal).
pub(super) fn start_lan(
    shared: &Shared,
    responder: &crate::mdns::Responder,
) -> Option<skein_client::lan::LanBrowser> {
    use skein_client::lan;
    let status = shared.peer.as_ref().map(|p| p.status());
    let peer_id = status.as_ref().map(|s| s.peer_id.to_string());
    let addrs: Vec<String> = status
        .iter()
        .flat_map(|s| s.listen.iter().chain(&s.observed))
        .map(|a| a.to_string())
        .filter(|a| !a.contains("/ip4/127.") && !a.contains("/ip4/0.0.0.0"))
        .collect();
    let record = lan::service_info(
        &shared.node_id,
        shared.advertise,
        peer_id.as_deref(),
        &addrs,
    );
    match record.and_then(|r| responder.register(r)) {
        Ok(service) => {
            tracing::info!(%service, infer = %shared.advertise, "LAN discovery: advertised over mDNS")
        }
        Err(e) => tracing::warn!(error = %e, "LAN discovery: cannot advertise over mDNS"),
    }
    let config = lan::LanPeersConfig {
        max_peers: shared.config.lan.max_peers.max(1),
        ttl: Duration::from_millis(shared.config.lan.peer_ttl_ms.max(1_000)),
    };
    match lan::LanBrowser::start(responder.daemon(), config) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!(error = %e, "LAN discovery: cannot browse mDNS");
            None
        }
    }
}
