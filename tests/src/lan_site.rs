//! An edge site for the offline tests (issue 20): a LAN in a network namespace of the test's
//! own, holding the node processes and a LAN client (mDNS works among them, and never leaves
//! the namespace), and the coordinator process on the host side of the namespace's link (the
//! site's uplink). The coordinator can be killed and started again on the same address and
//! data dir; nodes can be killed and restarted from their data dirs.
//!
//! ```text
//!   host: coordinator-process (host_ip:port)
//!     │ veth (the uplink: kill the coordinator, or take the link down)
//!   namespace: node-process ×N (ns_ip:0, [lan] mdns)   LanLoad (SDK, ClientConfig::lan)
//! ```
//!
//! Made to be reused: a site test with a shaped or cut uplink builds on [`LanSite`] and
//! [`LanLoad`] (which runs in any namespace, e.g. a host of `site::Site`).

use crate::{fast_coordinator, wait_for, CoordinatorProcess, NetNs, NodeProcess, Outcome};
use anyhow::Context;
use skein_client::{Client, ClientConfig, Profile};
use skein_coordinator::CoordinatorConfig;
use skein_node::NodeConfig;
use skein_proto::{AdminRequest, AdminResponse, UsageQuery};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The binaries a [`LanSite`] runs (pass `env!("CARGO_BIN_EXE_node-process")` and
/// `env!("CARGO_BIN_EXE_coordinator-process")`).
#[derive(Debug, Clone)]
pub struct SiteExes {
    /// `node-process`.
    pub node: String,
    /// `coordinator-process`.
    pub coordinator: String,
}

/// A coordinator on the host side, nodes in the site's namespace.
pub struct LanSite {
    /// The namespace of the site's LAN (and its link to the host).
    pub ns: NetNs,
    /// Every data directory.
    pub dir: tempfile::TempDir,
    exes: SiteExes,
    config: CoordinatorConfig,
    /// The coordinator process (`None` while down).
    pub coordinator: Option<CoordinatorProcess>,
    /// Where the coordinator listens (the same across restarts).
    pub addr: SocketAddr,
    /// The mesh CA (PEM).
    pub ca: String,
    /// The platform admin's API key.
    pub root_key: String,
    /// An admin client on the host side (reconnects on its own after a restart).
    pub admin: Client,
    /// Node processes by index (`None` while killed).
    pub nodes: Vec<Option<NodeProcess>>,
    node_configs: Vec<NodeConfig>,
}

impl LanSite {
    /// Make namespace `index` (see [`NetNs::create`]), start the coordinator (the fast test
    /// config with `coordinator_fn` applied) on its host side and `n` node processes (tract,
    /// LAN discovery on, `node_fn` applied) inside it.
    pub async fn start(
        index: u8,
        exes: SiteExes,
        n: usize,
        coordinator_fn: impl FnOnce(&mut CoordinatorConfig),
        node_fn: impl Fn(&mut NodeConfig),
    ) -> anyhow::Result<LanSite> {
        let ns = NetNs::create(index)?;
        let dir = tempfile::tempdir()?;
        let mut config = fast_coordinator(dir.path().join("coordinator"));
        config.listen = SocketAddr::new(ns.host_ip.into(), 0);
        coordinator_fn(&mut config);
        let coordinator = CoordinatorProcess::spawn(&exes.coordinator, &config).await?;
        let addr = coordinator.addr;
        config.listen = addr;
        let ca = std::fs::read_to_string(config.data_dir.join("ca.crt"))?;
        let root_key = std::fs::read_to_string(config.data_dir.join("admin-key"))?
            .trim()
            .to_string();
        let admin = Client::from_profile_with(
            &Profile::with_key(addr.to_string(), &ca, &root_key),
            ClientConfig {
                timeout: Duration::from_secs(20),
                ..ClientConfig::default()
            },
        )
        .await?;
        let mut site = LanSite {
            ns,
            dir,
            exes,
            config,
            coordinator: Some(coordinator),
            addr,
            ca,
            root_key,
            admin,
            nodes: Vec::new(),
            node_configs: Vec::new(),
        };
        for i in 0..n {
            let token = match site
                .admin
                .admin(AdminRequest::MintJoinToken {
                    ttl_s: 600,
                    uses: 1,
                    labels: Default::default(),
                })
                .await?
            {
                AdminResponse::JoinToken { token, .. } => token,
                other => anyhow::bail!("minting a join token: {other:?}"),
            };
            let mut cfg = NodeConfig {
                coordinator: addr.to_string(),
                join_token: Some(token),
                listen: SocketAddr::new(site.ns.ns_ip.into(), 0),
                data_dir: site.dir.path().join(format!("node-{i}")),
                max_concurrency: 2,
                backend: skein_node::backend::BackendChoice::Tract,
                ..NodeConfig::default()
            };
            cfg.lan.mdns = true;
            cfg.peer.enabled = false;
            node_fn(&mut cfg);
            let node = NodeProcess::spawn_in(Some(&site.ns), &site.exes.node, &cfg, &[]).await?;
            cfg.join_token = None;
            site.node_configs.push(cfg);
            site.nodes.push(Some(node));
        }
        Ok(site)
    }

    /// A profile for `key` (the coordinator's address as seen from the namespace too).
    pub fn profile(&self, key: &str) -> Profile {
        Profile::with_key(self.addr.to_string(), &self.ca, key)
    }

    /// A steady load on `model` from a LAN client inside the site's namespace (the root key,
    /// [`lan_client_config`]), one call of `case` every `every`.
    pub async fn lan_load(
        &self,
        model: &str,
        case: &skein_onnx::reference::Case,
        every: Duration,
    ) -> anyhow::Result<LanLoad> {
        LanLoad::start(
            &self.ns.name,
            self.profile(&self.root_key),
            lan_client_config(),
            model,
            case,
            every,
        )
        .await
    }

    /// The node id of node `i` (while it runs).
    pub fn node_id(&self, i: usize) -> Option<String> {
        self.nodes.get(i)?.as_ref().map(|n| n.node_id.clone())
    }

    /// `kill -9` the coordinator (its data dir stays).
    pub fn kill_coordinator(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.coordinator.take() {
            c.kill9()?;
        }
        Ok(())
    }

    /// Start the coordinator again on the same address and data dir.
    pub async fn start_coordinator(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.coordinator.is_none(), "the coordinator runs already");
        self.coordinator =
            Some(CoordinatorProcess::spawn(&self.exes.coordinator, &self.config).await?);
        Ok(())
    }

    /// `kill -9` node `i`.
    pub fn kill_node(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut n) = self.nodes.get_mut(i).and_then(Option::take) {
            n.kill9()?;
        }
        Ok(())
    }

    /// Start node `i` again from its data dir (a new port; no join token); returns once it
    /// serves.
    pub async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let cfg = self.node_configs.get(i).context("no such node")?.clone();
        let node = NodeProcess::spawn_in(Some(&self.ns), &self.exes.node, &cfg, &[]).await?;
        self.nodes[i] = Some(node);
        Ok(())
    }

    /// Requests of `tenant` in the coordinator's ledger (`None` while it cannot be asked).
    pub async fn ledger(&self, tenant: &str) -> Option<u64> {
        ledger(&self.admin, tenant).await
    }

    /// Wait until the ledger holds `n` requests of `tenant` (and never more).
    pub async fn wait_ledger(&self, tenant: &str, n: u64, timeout: Duration) -> anyhow::Result<()> {
        wait_ledger(&self.admin, tenant, n, timeout).await
    }

    /// The data dir of node `i`.
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{i}"))
    }
}

/// Requests of `tenant` in the ledger of the coordinator `admin` speaks to (`None` while it
/// cannot be asked).
pub async fn ledger(admin: &Client, tenant: &str) -> Option<u64> {
    let rows = admin.usage(UsageQuery::default()).await.ok()?;
    Some(
        rows.iter()
            .filter(|r| r.tenant == tenant)
            .map(|r| r.requests)
            .sum(),
    )
}

/// Wait until that ledger holds `n` requests of `tenant`; more than `n` fails at once
/// (a record counted twice).
pub async fn wait_ledger(
    admin: &Client,
    tenant: &str,
    n: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    wait_for(
        &format!("{n} requests of {tenant} in the ledger"),
        timeout,
        || async move {
            let got = ledger(admin, tenant).await?;
            assert!(got <= n, "{got} ledger records for {n} served calls");
            (got == n).then_some(())
        },
    )
    .await
}

/// What a [`LanLoad`] saw.
#[derive(Debug, Default)]
pub struct LanLoadReport {
    /// Every call, in order.
    pub outcomes: Vec<Outcome>,
    /// Calls made while the client held its coordinator for down (LAN routes).
    pub lan_calls: u64,
    /// Whether the client held its coordinator for down after its last call.
    pub down_now: bool,
}

impl LanLoadReport {
    /// Every failed call: `call I at T (LATENCY): ERROR`.
    pub fn failed(&self) -> Vec<String> {
        self.outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                let e = o.result.as_ref().err()?;
                Some(format!(
                    "call {i} at {:?} ({:?}): {e}",
                    o.started, o.latency
                ))
            })
            .collect()
    }

    /// Calls answered correctly.
    pub fn served(&self) -> u64 {
        self.outcomes.iter().filter(|o| o.result.is_ok()).count() as u64
    }

    /// p50, p99 and the largest latency of the `n` calls from call `from` on.
    pub fn latencies(&self, from: usize, n: usize) -> [Duration; 3] {
        let mut l: Vec<Duration> = self
            .outcomes
            .iter()
            .skip(from)
            .take(n)
            .map(|o| o.latency)
            .collect();
        l.sort();
        [
            crate::quantile(&l, 0.5),
            crate::quantile(&l, 0.99),
            l.last().copied().unwrap_or_default(),
        ]
    }
}

/// The SDK settings of a LAN client in these tests: LAN discovery on, the coordinator given up
/// on after 1 s, every call bounded by 30 s.
pub fn lan_client_config() -> ClientConfig {
    ClientConfig {
        timeout: Duration::from_secs(30),
        coordinator_timeout: Duration::from_secs(1),
        lan: Some(skein_client::LanConfig::default()),
        ..ClientConfig::default()
    }
}

/// One caller with LAN discovery on, inside the site's namespace (a thread that entered it,
/// with a runtime of its own), calling `model` with a reference case back to back (a pause
/// of `gap` between calls) until stopped. Every answer is checked against the case.
pub struct LanLoad {
    stop: Arc<AtomicBool>,
    progress: Arc<Mutex<LanLoadReport>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl LanLoad {
    /// Connect (with `config`, whose `lan` should be set) in namespace `ns` and start calling;
    /// returns once the first call has been answered.
    pub async fn start(
        ns: &str,
        profile: Profile,
        config: ClientConfig,
        model: &str,
        case: &skein_onnx::reference::Case,
        gap: Duration,
    ) -> anyhow::Result<LanLoad> {
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Mutex::new(LanLoadReport::default()));
        let (ready_tx, ready) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let (ns, model, case) = (ns.to_string(), model.to_string(), case.clone());
        let (stop2, progress2) = (stop.clone(), progress.clone());
        let thread = std::thread::Builder::new()
            .name(format!("lan-load-in-{ns}"))
            .spawn(move || -> anyhow::Result<()> {
                crate::nat::enter_netns(&ns)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let client = match Client::from_profile_with(&profile, config).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("connecting: {e}")));
                            return Ok(());
                        }
                    };
                    let t0 = tokio::time::Instant::now();
                    let mut ready_tx = Some(ready_tx);
                    while !stop2.load(Ordering::SeqCst) {
                        let started = t0.elapsed();
                        let lan = client.coordinator_down();
                        let answer = client.infer(&model, case.inputs.clone()).await;
                        let result = match answer {
                            Ok(r) => crate::matches_reference(&r.outputs, &case)
                                .map(|()| (r.meta.node.clone(), r.failovers))
                                .map_err(|e| format!("wrong answer from {}: {e}", r.meta.node)),
                            Err(e) => Err(e.to_string()),
                        };
                        if let Some(tx) = ready_tx.take() {
                            if let Err(e) = &result {
                                let _ = tx.send(Err(format!("first call: {e}")));
                                return Ok(());
                            }
                            let _ = tx.send(Ok(()));
                        }
                        {
                            let mut p = progress2.lock().unwrap_or_else(|p| p.into_inner());
                            let down = client.coordinator_down();
                            p.lan_calls += u64::from(lan || down);
                            p.down_now = down;
                            p.outcomes.push(Outcome {
                                started,
                                latency: t0.elapsed() - started,
                                result,
                            });
                        }
                        tokio::time::sleep(gap).await;
                    }
                    Ok(())
                })
            })?;
        let mut load = LanLoad {
            stop,
            progress,
            thread: Some(thread),
        };
        match ready.await {
            Ok(Ok(())) => Ok(load),
            Ok(Err(e)) => {
                load.stop.store(true, Ordering::SeqCst);
                Err(anyhow::anyhow!("LAN load: {e}"))
            }
            Err(_) => {
                let r = load.thread.take().map(|t| t.join());
                Err(anyhow::anyhow!(
                    "LAN load thread ended before its first call: {r:?}"
                ))
            }
        }
    }

    /// Calls answered correctly so far.
    pub fn ok(&self) -> u64 {
        let p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        p.outcomes.iter().filter(|o| o.result.is_ok()).count() as u64
    }

    /// Calls answered correctly by `node` so far, among those started after `after`.
    pub fn served_by_since(&self, node: &str, after: usize) -> u64 {
        let p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        p.outcomes
            .iter()
            .skip(after)
            .filter(|o| matches!(&o.result, Ok((n, _)) if n == node))
            .count() as u64
    }

    /// Calls made so far.
    pub fn calls(&self) -> usize {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .outcomes
            .len()
    }

    /// Calls made with LAN routes so far.
    pub fn lan_calls(&self) -> u64 {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lan_calls
    }

    /// Whether the client held its coordinator for down after its last call.
    pub fn coordinator_down(&self) -> bool {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .down_now
    }

    /// Stop after the call in flight; everything seen.
    pub async fn stop(mut self) -> anyhow::Result<LanLoadReport> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            tokio::task::spawn_blocking(move || t.join())
                .await?
                .map_err(|_| anyhow::anyhow!("the LAN load thread panicked"))??;
        }
        let mut p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        Ok(std::mem::take(&mut *p))
    }
}

impl Drop for LanLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
