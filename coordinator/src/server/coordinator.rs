//! The [`Coordinator`] handle: opens the data dir, binds the endpoint, runs the accept loop
//! and the timers (dead-member pruning, the autoscaler), and hands out keys and join tokens
//! to the process that embeds it. [`run`] is the `skein coordinator` entry point.

use super::{handle_stream, Shared, State};
use crate::access::{now_ms, Access};
use crate::artifacts::ArtifactStore;
use crate::config::CoordinatorConfig;
use crate::join_token::JoinToken;
use crate::membership::Membership;
use crate::scaler::Scaler;
use anyhow::Context;
use skein_net::endpoint::TransportLimits;
use skein_net::tls::ClientAuth;
use skein_net::{Credentials, MeshCa};
use skein_policy::vivaldi::{Vivaldi, VivaldiConfig};
use skein_proto::ALPN_CTL;
use skein_store::{Registry, Scope};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Concurrent uploads held in memory at once.
const MAX_CONCURRENT_UPLOADS: usize = 2;
/// Members dead this long are forgotten.
const FORGET_DEAD_AFTER: Duration = Duration::from_secs(600);

/// Write a secret file readable only by its owner.
fn write_secret(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A running coordinator.
pub struct Coordinator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    admin_key: Option<String>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// Open the data dir, bind the endpoint and start serving.
    pub async fn start(config: CoordinatorConfig) -> anyhow::Result<Coordinator> {
        config.relay.check()?;
        let scaling = config.scaling.clone();
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Keys, the CA, the ledger: the data dir is for the coordinator's user only.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", dir.display()))?;
        }
        let ca = MeshCa::load_or_create(&dir.join("ca")).context("loading the mesh CA")?;
        let creds = ca.issue_coordinator()?;
        let registry =
            Registry::open(&dir.join("registry.sqlite")).context("opening the registry")?;
        let store = ArtifactStore::open(&dir).context("opening the artifact store")?;

        let access = Access::open(
            &dir,
            config.security.clone(),
            config.pricing.clone(),
            config.heartbeat_interval,
        )
        .context("opening the security store")?;
        let admin_key = access.bootstrap_admin_key()?;
        if let Some(key) = &admin_key {
            write_secret(&dir.join("admin-key"), &format!("{key}\n"))?;
        }
        // A configured token is the operator's own choice: reusable, no expiry.
        if let Some(extra) = &config.join_token {
            let t: JoinToken = extra.parse().context("the configured join token")?;
            anyhow::ensure!(
                t.ca_fingerprint == ca.fingerprint(),
                "the configured join token names another CA (fingerprint {})",
                t.ca_fingerprint
            );
            registry.add_join_token(&t.secret_hash(), None, false, now_ms())?;
        }
        std::fs::write(dir.join("ca.crt"), ca.cert_pem())?;

        let limits = TransportLimits {
            max_frame_len: config.max_frame_len,
            ..TransportLimits::default()
        };
        let endpoint = skein_net::server_endpoint(
            config.listen,
            &creds,
            &[ALPN_CTL],
            ClientAuth::Optional,
            &limits,
        )
        .with_context(|| format!("binding {}", config.listen))?;
        let addr = endpoint.local_addr()?;
        let relay = if config.relay.enabled {
            Some(start_relay(&config, &dir).await?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            relay,
            config,
            ca,
            state: Mutex::new(State {
                registry,
                membership: Membership::default(),
                vivaldi: Vivaldi::new(VivaldiConfig::default()),
                scaler: Scaler::new(scaling),
                node_conns: HashMap::new(),
                peer_ids: HashMap::new(),
                first_fetches: Default::default(),
            }),
            store,
            uploads: Semaphore::new(MAX_CONCURRENT_UPLOADS),
            resolves: AtomicU64::new(0),
            access,
        });
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(shared.clone(), endpoint, cancel.clone()));
        tracing::info!(%addr, "coordinator listening");
        Ok(Coordinator {
            shared,
            addr,
            admin_key,
            cancel,
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Artifact bytes sent to nodes and clients since the start (a resumed fetch counts only
    /// the part the fetcher did not have yet).
    pub fn artifact_bytes_sent(&self) -> u64 {
        self.shared.store.bytes_sent()
    }

    /// The `root` admin API key, when this start created it (the first start on a data dir);
    /// it is also in `<data_dir>/admin-key`. Later starts return `None`.
    pub fn admin_key(&self) -> Option<&str> {
        self.admin_key.as_deref()
    }

    /// Create an API key for `tenant` (created if missing) with `scopes`, as the
    /// coordinator's own process (audited as `local`).
    pub fn create_api_key(
        &self,
        tenant: &str,
        scopes: &[&str],
        label: Option<&str>,
    ) -> anyhow::Result<String> {
        let scopes = scopes
            .iter()
            .map(|s| s.parse::<Scope>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self
            .shared
            .access
            .create_key_local(tenant, &scopes, label)?
            .key)
    }

    /// A `root` admin key for an in-process service (the HTTP gateway), kept in
    /// `<data_dir>/<name>-key` and reused across restarts while it stays valid.
    pub fn service_key(&self, name: &str) -> anyhow::Result<String> {
        let path = self.shared.config.data_dir.join(format!("{name}-key"));
        if let Ok(k) = std::fs::read_to_string(&path) {
            let k = k.trim();
            if matches!(self.shared.access.authenticate(Some(k)), Ok(Some(_))) {
                return Ok(k.to_string());
            }
        }
        let key = self.create_api_key(crate::access::ROOT_TENANT, &["admin"], Some(name))?;
        write_secret(&path, &format!("{key}\n"))?;
        Ok(key)
    }

    /// Mint a single-use join token valid for `ttl` (one hour when `None`).
    pub fn mint_join_token(&self, ttl: Option<Duration>) -> anyhow::Result<String> {
        let t = JoinToken::generate(&self.shared.ca.fingerprint());
        let expires = now_ms() + ttl.unwrap_or(Duration::from_secs(3600)).as_millis() as u64;
        self.shared.state().registry.add_join_token(
            &t.secret_hash(),
            Some(expires),
            true,
            now_ms(),
        )?;
        Ok(t.to_string())
    }

    /// The mesh CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.shared.ca.cert_pem().to_string()
    }

    /// Issue client credentials (for the CLI or an SDK user) named `name`.
    pub fn issue_client_credentials(&self, name: &str) -> anyhow::Result<Credentials> {
        Ok(self.shared.ca.issue_client(name)?)
    }

    /// A token that stops the coordinator when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stop serving and wait until the endpoint is closed.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
        if let Some(r) = &self.shared.relay {
            r.stop();
        }
    }

    /// The relay's multiaddrs (each ending in `/p2p/ID`), as nodes are told them.
    pub fn relay_addrs(&self) -> Vec<String> {
        self.shared
            .relay
            .as_ref()
            .map(relay_addrs)
            .unwrap_or_default()
    }

    /// Wait until the coordinator stops (its cancel token fired).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Start the circuit relay, with the libp2p key kept in the data dir (`peer.key`).
async fn start_relay(
    config: &CoordinatorConfig,
    dir: &std::path::Path,
) -> anyhow::Result<skein_peer::Peer> {
    let ip = config.listen.ip();
    let listen: Vec<skein_peer::Multiaddr> = if config.relay.listen.is_empty() {
        vec![
            format!("/ip4/{ip}/udp/0/quic-v1").parse()?,
            format!("/ip4/{ip}/tcp/0").parse()?,
        ]
    } else {
        config
            .relay
            .listen
            .iter()
            .map(|a| {
                a.parse()
                    .with_context(|| format!("[relay] listen address `{a}` is not a multiaddr"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let key = skein_peer::key::load_or_create(dir).context("the relay's libp2p key")?;
    let peer_config = skein_peer::PeerConfig {
        listen: listen.clone(),
        relay_server: Some(config.relay.limits()),
        ..skein_peer::PeerConfig::default()
    };
    let (peer, _inbound) = skein_peer::Peer::start(key, peer_config)
        .await
        .context("starting the circuit relay")?;
    tracing::info!(peer_id = %peer.peer_id(), addrs = ?peer.status().listen, "circuit relay listening");
    Ok(peer)
}

/// `peer`'s listen addresses with its PeerId: where nodes reserve.
pub(super) fn relay_addrs(peer: &skein_peer::Peer) -> Vec<String> {
    let id = peer.peer_id();
    peer.status()
        .listen
        .iter()
        .map(|a| format!("{a}/p2p/{id}"))
        .collect()
}

async fn serve(shared: Arc<Shared>, endpoint: quinn::Endpoint, cancel: CancellationToken) {
    let pruner = {
        let (shared, cancel) = (shared.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => shared.state().membership.prune(Instant::now(), FORGET_DEAD_AFTER),
                }
            }
        })
    };
    let autoscaler = {
        let (shared, cancel) = (shared.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(shared.config.heartbeat_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {
                        if let Err(e) = shared.scale_tick() {
                            tracing::warn!(error = %e, "autoscaler tick failed");
                        }
                    }
                }
            }
        })
    };
    let max = shared.config.max_connections;
    skein_net::serve::accept_loop(endpoint.clone(), cancel, max, move |r| {
        handle_stream(shared.clone(), r)
    })
    .await;
    let _ = pruner.await;
    let _ = autoscaler.await;
    endpoint.close(0u32.into(), b"coordinator shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    tracing::info!("coordinator stopped");
}

/// Run a coordinator until `shutdown` is cancelled (the `skein coordinator` entry point).
pub async fn run(config: CoordinatorConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let c = Coordinator::start(config).await?;
    let inner = c.cancel_token();
    tokio::select! {
        _ = shutdown.cancelled() => inner.cancel(),
        _ = inner.cancelled() => {}
    }
    c.wait().await;
    Ok(())
}
