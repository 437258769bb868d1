//! An edge site (tests/src/site.rs): nodes on one LAN behind a router whose uplink to the
//! coordinator is thin (tbf) and can be cut. Root, network namespaces, nftables, tc.
//! Namespace indices 30..40 are this module's.

use anyhow::Context;
use skein_tests::site::Site;
use std::io::{Read, Write};
use std::time::Duration;

/// A TCP connection from a thread in namespace `connect_ns` to a listener on `listen_ip` in
/// `listen_ns` (`None`: the test's own namespace); the listener sends `bytes` bytes and the
/// connector reads them all and acknowledges. The seconds from connect to the acknowledgement.
#[allow(clippy::disallowed_types)] // threads and the real clock
fn tcp_transfer(
    listen_ns: Option<&str>,
    listen_ip: std::net::Ipv4Addr,
    connect_ns: Option<&str>,
    bytes: usize,
) -> anyhow::Result<f64> {
    let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
    let listen_ns = listen_ns.map(str::to_string);
    let sender = std::thread::spawn(move || -> anyhow::Result<()> {
        if let Some(ns) = &listen_ns {
            skein_tests::nat::enter_netns(ns)?;
        }
        let l = std::net::TcpListener::bind((listen_ip, 0))?;
        l.set_nonblocking(true)?;
        let _ = ready_tx.send(l.local_addr()?);
        // Accept within 4 s (a connector that cannot reach us gives up after 3).
        let deadline = std::time::Instant::now() + Duration::from_secs(4);
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    anyhow::ensure!(std::time::Instant::now() < deadline, "nobody connected");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(&vec![7u8; bytes])?;
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack)?;
        Ok(())
    });
    let addr = ready.recv().context("the listener thread")?;
    let connect_ns = connect_ns.map(str::to_string);
    let receiver = std::thread::spawn(move || -> anyhow::Result<f64> {
        if let Some(ns) = &connect_ns {
            skein_tests::nat::enter_netns(ns)?;
        }
        let start = std::time::Instant::now();
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut got = 0;
        let mut buf = vec![0u8; 64 << 10];
        while got < bytes {
            let n = s.read(&mut buf)?;
            anyhow::ensure!(n > 0, "{got} of {bytes} bytes before the end");
            got += n;
        }
        s.write_all(b"k")?;
        Ok(start.elapsed().as_secs_f64())
    });
    let secs = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?;
    let secs = secs?;
    sent?;
    Ok(secs)
}

/// The site kit itself: a download over the 8 Mbit/s uplink runs at about 8 Mbit/s (the
/// shaping is real), the LAN between two hosts is many times faster, the test side's counter
/// sees the download, and a cut uplink lets nothing through until it is restored.
#[test]
#[allow(clippy::disallowed_types)] // sync code, the real clock
fn a_site_has_a_thin_uplink_a_fast_lan_and_an_uplink_that_can_be_cut() -> anyhow::Result<()> {
    if !Site::required() {
        return Ok(());
    }
    let site = Site::create(30, 2)?;
    site.shape_uplink(8_000)?;
    let (a, b) = (site.hosts[0].clone(), site.hosts[1].clone());
    let before = site.downlink_bytes()?;
    // 2 MB down the uplink: 2 s at 8 Mbit/s.
    let down = tcp_transfer(None, site.router.host_ip, Some(&a.name), 2_000_000)?;
    let mbit = 2_000_000.0 * 8.0 / down / 1e6;
    let counted = site.downlink_bytes()? - before;
    // 8 MB across the LAN.
    let lan = tcp_transfer(Some(&a.name), a.ip, Some(&b.name), 8_000_000)?;
    let lan_mbit = 8_000_000.0 * 8.0 / lan / 1e6;
    eprintln!(
        "uplink down {mbit:.2} Mbit/s ({down:.2} s, {counted} bytes counted), LAN {lan_mbit:.0} Mbit/s"
    );
    assert!(
        (5.0..=9.0).contains(&mbit),
        "the uplink carried {mbit:.2} Mbit/s, shaped to 8"
    );
    assert!(
        counted >= 2_000_000,
        "{counted} bytes counted down the uplink"
    );
    assert!(
        lan_mbit > 10.0 * mbit,
        "the LAN ({lan_mbit:.0} Mbit/s) is not much faster than the uplink ({mbit:.2})"
    );
    site.cut_uplink()?;
    assert!(
        tcp_transfer(None, site.router.host_ip, Some(&a.name), 1000).is_err(),
        "a transfer crossed the cut uplink"
    );
    site.restore_uplink()?;
    // Traffic flows again within seconds (the link and its neighbours come back).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tcp_transfer(None, site.router.host_ip, Some(&a.name), 1000) {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("after the restore, not yet: {e:#}");
            }
            Err(e) => return Err(e.context("10 s after the uplink is restored")),
        }
    }
    Ok(())
}

/// The site tests' model (tests/src/synth.rs), 20 MB of weights, deployed like any model:
/// one node loads it and answers `x · W` for two inputs (checked against the product computed
/// in the test), so what the site tests move is a model that runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_synthetic_20_mb_model_loads_and_answers() -> anyhow::Result<()> {
    let model = skein_tests::synth::SynthModel::of_size(20 << 20, 42);
    assert!(model.bytes.len() >= 20 << 20, "{}", model.bytes.len());
    let mesh = skein_tests::TestMesh::start(1).await?;
    mesh.client
        .deploy_with(
            "synth20",
            None,
            &model.bytes,
            skein_proto::DeploymentSettings {
                min_replicas: 1,
                ..Default::default()
            },
            |_| {},
        )
        .await?;
    mesh.wait_loaded("synth20", 1).await?;
    for seed in [1, 2] {
        let x = model.input(seed);
        let r = mesh.client.infer("synth20", vec![x.clone()]).await?;
        model
            .check(&x, &r.outputs)
            .map_err(|e| anyhow::anyhow!("input {seed}: {e}"))?;
    }
    Ok(())
}

/// Where a site node serves `/metrics`, inside its own namespace.
const NODE_METRICS: &str = "127.0.0.1:9464";

/// A site of `nodes` node processes (and one more host for a client) behind an uplink shaped
/// to `uplink_kbit`, the coordinator on the test's side; each node's config changed by `f`.
struct SiteMesh {
    mesh: skein_tests::TestMesh,
    nodes: Vec<skein_tests::NodeProcess>,
    /// Each node's data directory.
    data_dirs: Vec<std::path::PathBuf>,
    /// Each node's config, to start it again (no join token: it has joined).
    configs: Vec<skein_node::NodeConfig>,
    // Dropped last: the namespaces go after the processes in them.
    site: Site,
}

impl SiteMesh {
    async fn start(
        index: u8,
        nodes: usize,
        uplink_kbit: u32,
        f: impl Fn(usize, &mut skein_node::NodeConfig),
    ) -> anyhow::Result<SiteMesh> {
        SiteMesh::start_with(index, nodes, uplink_kbit, |_| {}, f).await
    }

    /// [`start`](Self::start), the coordinator's config changed by `c` first.
    async fn start_with(
        index: u8,
        nodes: usize,
        uplink_kbit: u32,
        c: impl FnOnce(&mut skein_coordinator::CoordinatorConfig),
        f: impl Fn(usize, &mut skein_node::NodeConfig),
    ) -> anyhow::Result<SiteMesh> {
        let site = Site::create(index, nodes + 1)?;
        site.shape_uplink(uplink_kbit)?;
        let mesh = skein_tests::TestMesh::start_with(
            0,
            |config| {
                config.listen = "0.0.0.0:0".parse().expect("addr");
                c(config);
            },
            |_| {},
        )
        .await?;
        let port = mesh.coordinator().addr().port();
        let mut procs = Vec::new();
        let mut data_dirs = Vec::new();
        let mut configs = Vec::new();
        for (i, host) in site.hosts.iter().take(nodes).enumerate() {
            let mut config = mesh.node_config(i);
            config.coordinator = site.coordinator_addr(port);
            config.listen = "0.0.0.0:0".parse()?;
            config.metrics_listen = Some(NODE_METRICS.parse()?);
            f(i, &mut config);
            data_dirs.push(config.data_dir.clone());
            procs.push(
                skein_tests::NodeProcess::spawn_in_named(
                    Some(&host.name),
                    env!("CARGO_BIN_EXE_node-process"),
                    &config,
                    &[],
                )
                .await?,
            );
            config.join_token = None;
            configs.push(config);
        }
        Ok(SiteMesh {
            mesh,
            nodes: procs,
            data_dirs,
            configs,
            site,
        })
    }

    /// An SDK client on the site's LAN (its last host), reaching the coordinator up the uplink
    /// and the nodes on the LAN.
    async fn lan_client(&self) -> anyhow::Result<skein_tests::nat::NsClient> {
        let host = self
            .site
            .hosts
            .last()
            .context("a site with a client host")?;
        let mut profile = self.mesh.profile.clone();
        profile.coordinator = self
            .site
            .coordinator_addr(self.mesh.coordinator().addr().port());
        skein_tests::nat::NsClient::start(
            &host.name,
            profile,
            skein_client::ClientConfig {
                timeout: Duration::from_secs(20),
                ..Default::default()
            },
        )
        .await
    }

    /// `kill -9` node `i` and start it again from its data dir (the same namespace, a new
    /// port); returns its new process's node id once it serves.
    async fn restart_node(&mut self, i: usize) -> anyhow::Result<String> {
        self.nodes[i].kill9()?;
        self.nodes[i] = skein_tests::NodeProcess::spawn_in_named(
            Some(&self.site.hosts[i].name),
            env!("CARGO_BIN_EXE_node-process"),
            &self.configs[i],
            &[],
        )
        .await?;
        Ok(self.nodes[i].node_id.clone())
    }

    /// Node `i`'s `/metrics` text.
    async fn metrics(&self, i: usize) -> anyhow::Result<String> {
        let ns = self.site.hosts[i].name.clone();
        tokio::task::spawn_blocking(move || {
            skein_tests::nat::http_get_in(&ns, NODE_METRICS.parse()?, "/metrics")
        })
        .await?
    }
}

/// What warming a model on every node of a site took.
#[derive(Debug)]
struct Warmed {
    /// Deploy to loaded on every node.
    secs: f64,
    /// Bytes down the uplink meanwhile.
    downlink: u64,
}

/// Deploy `model` with a replica on every node of `t` and wait until all have loaded it.
async fn warm_all(t: &SiteMesh, model: &skein_tests::synth::SynthModel) -> anyhow::Result<Warmed> {
    let n = t.nodes.len();
    let before = t.site.downlink_bytes()?;
    let start = tokio::time::Instant::now();
    t.mesh
        .client
        .deploy_with(
            "synth",
            None,
            &model.bytes,
            skein_proto::DeploymentSettings {
                min_replicas: n as u32,
                ..Default::default()
            },
            |_| {},
        )
        .await?;
    skein_tests::wait_for(
        &format!("synth loaded on {n} site nodes"),
        Duration::from_secs(600),
        || async {
            let models = t.mesh.client.models().await.ok()?;
            models
                .iter()
                .any(|m| m.name == "synth" && m.loaded_on.len() >= n)
                .then_some(())
        },
    )
    .await?;
    Ok(Warmed {
        secs: start.elapsed().as_secs_f64(),
        downlink: t.site.downlink_bytes()? - before,
    })
}

/// The site: three nodes on one LAN bridge, the coordinator beyond an 8 Mbit/s uplink.
/// A 20 MB model deployed with a replica on each crosses the uplink about once: one node
/// fetches it from the coordinator, the other two take (almost) every chunk from the LAN
/// (bytes by source in each node's `/metrics`); all three hold the same artifact, verified
/// (their cached files hash to its id), and answer `x · W` from a client on the LAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_warms_a_model_with_one_copy_over_its_uplink() -> anyhow::Result<()> {
    if !Site::required() {
        return Ok(());
    }
    let model = skein_tests::synth::SynthModel::of_size(20 << 20, 7);
    let size = model.bytes.len() as u64;
    let t = SiteMesh::start(34, 3, 8_000, |_, _| {}).await?;
    let w = warm_all(&t, &model).await?;
    let copies = w.downlink as f64 / size as f64;
    eprintln!(
        "warm on 3 nodes in {:.1} s, {copies:.2} copies down the uplink",
        w.secs
    );
    let mut from_coordinator = Vec::new();
    let mut from_peers = Vec::new();
    for i in 0..3 {
        let text = t.metrics(i).await?;
        let metric = |source: &str| {
            skein_tests::metric_sample(
                &text,
                "skein_node_artifact_fetched_bytes_total",
                &format!("source=\"{source}\""),
            )
            .map(|v| v as u64)
            .with_context(|| format!("node {i}: bytes fetched from {source}"))
        };
        from_coordinator.push(metric("coordinator")?);
        from_peers.push(metric("peer")?);
    }
    eprintln!("bytes by source: coordinator {from_coordinator:?}, peers {from_peers:?}");
    // One node took the model from the coordinator; each other took at least 90 % from peers.
    let first = (0..3)
        .max_by_key(|&i| from_coordinator[i])
        .context("three nodes")?;
    assert_eq!(from_coordinator[first] + from_peers[first], size);
    for i in (0..3).filter(|&i| i != first) {
        assert_eq!(from_coordinator[i] + from_peers[i], size, "node {i}");
        assert!(
            from_peers[i] * 10 >= size * 9,
            "node {i} took {} of {size} bytes from peers",
            from_peers[i]
        );
    }
    assert!(
        copies < 1.5,
        "{copies:.2} copies of the model crossed the uplink"
    );
    // Every node holds the same artifact, and it is the one deployed.
    let id = skein_coordinator::artifacts::sha256_hex(&model.bytes);
    for i in 0..3 {
        let cached = t.data_dirs[i].join("cache").join(&id);
        let bytes = std::fs::read(&cached).with_context(|| format!("{}", cached.display()))?;
        assert_eq!(
            skein_coordinator::artifacts::sha256_hex(&bytes),
            id,
            "node {i}"
        );
    }
    let client = t.lan_client().await?;
    for seed in 0..6 {
        let x = model.input(seed);
        let r = client.infer("synth", vec![x.clone()]).await?;
        model.check(&x, &r.outputs).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// Benchmark: time to warm a 20 MB model on the three nodes of a site behind an 8 Mbit/s
/// uplink, and the bytes that crossed it, coordinator-only (the nodes' peer layer off) and
/// peer-assisted (the default), in one run; the ratio (`scripts/bench-site`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: scripts/bench-site"]
async fn bench_site_warm() -> anyhow::Result<()> {
    if !Site::required() {
        return Ok(());
    }
    let mb: usize = std::env::var("SKEIN_BENCH_SITE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let kbit: u32 = std::env::var("SKEIN_BENCH_SITE_UPLINK_KBIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8_000);
    let model = skein_tests::synth::SynthModel::of_size(mb << 20, 42);
    let mut rows = Vec::new();
    for (index, mode, peer) in [(32, "coordinator-only", false), (33, "peer-assisted", true)] {
        let t = SiteMesh::start(index, 3, kbit, |_, c| c.peer.enabled = peer).await?;
        let w = warm_all(&t, &model).await?;
        // Calls from the site's LAN (from the test's side a node on it is reachable only
        // through its peer layer, off in the first run).
        let client = t.lan_client().await?;
        for i in 0..3 {
            let x = model.input(i as u64);
            let r = client.infer("synth", vec![x.clone()]).await?;
            model.check(&x, &r.outputs).map_err(anyhow::Error::msg)?;
        }
        for i in 0..3 {
            let text = t.metrics(i).await?;
            let artifact: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("skein_node_artifact"))
                .collect();
            eprintln!("{mode}: node {i}: {artifact:?}");
        }
        eprintln!(
            "{mode}: warm on 3 nodes in {:.1} s, {} bytes down the uplink ({:.2} copies)",
            w.secs,
            w.downlink,
            w.downlink as f64 / model.bytes.len() as f64
        );
        rows.push((mode, w));
    }
    eprintln!(
        "\n| {} MB model, 3 nodes, uplink {} kbit/s | time to warm all | bytes down the uplink |\n|---|---|---|",
        mb, kbit
    );
    for (mode, w) in &rows {
        eprintln!("| {mode} | {:.1} s | {} |", w.secs, w.downlink);
    }
    eprintln!(
        "speed-up (coordinator-only time / peer-assisted time): {:.2}x; uplink bytes ratio {:.2}",
        rows[0].1.secs / rows[1].1.secs,
        rows[0].1.downlink as f64 / rows[1].1.downlink.max(1) as f64
    );
    Ok(())
}

/// How long the uplink stays cut in the outage test: `SKEIN_SITE_OUTAGE_S` seconds (default
/// 60, the figure).
fn site_outage() -> Duration {
    let s = std::env::var("SKEIN_SITE_OUTAGE_S")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(60);
    Duration::from_secs(s.max(5))
}

/// The outage: three nodes on the site's LAN (LAN discovery on), steady load from a
/// client on the same LAN with LAN discovery, and the uplink cut for 60 s. Route tickets live
/// 10 s, so most calls of the outage run on the tickets' offline validity. Midway node 0 is
/// killed and started again (offline: from its saved heartbeat answer and cached model, on a
/// new port, found again over mDNS) and serves. 0 failed calls; once the uplink is back the
/// client is back on the coordinator's routes and the ledger holds exactly the calls served
/// (node 0's spooled records from before its crash included, none twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_keeps_serving_its_lan_through_an_uplink_outage() -> anyhow::Result<()> {
    if !Site::required() {
        return Ok(());
    }
    let outage = site_outage();
    let mut t = SiteMesh::start_with(
        35,
        3,
        8_000,
        |c| c.security.ticket_ttl = Duration::from_secs(10),
        |_, n| {
            n.lan.mdns = true;
            n.ticket_clock_skew_ms = 500;
        },
    )
    .await?;
    t.mesh
        .deploy_with(
            "ppocr_cls",
            skein_proto::DeploymentSettings {
                min_replicas: 3,
                ..Default::default()
            },
        )
        .await?;
    t.mesh.wait_loaded("ppocr_cls", 3).await?;
    let client_host = t.site.hosts.last().context("a client host")?.name.clone();
    let mut profile = t.mesh.profile.clone();
    profile.coordinator = t.site.coordinator_addr(t.mesh.coordinator().addr().port());
    let load = skein_tests::lan_site::LanLoad::start(
        &client_host,
        profile,
        skein_tests::lan_site::lan_client_config(),
        "ppocr_cls",
        &skein_tests::case("ppocr_cls", "single"),
        Duration::from_millis(20),
    )
    .await?;
    let calls_before = |n: u64| {
        let ok = load.ok();
        async move { (ok >= n).then_some(()) }
    };
    skein_tests::wait_for(
        "20 calls before the outage",
        Duration::from_secs(30),
        || calls_before(20),
    )
    .await?;

    t.site.cut_uplink()?;
    let cut = tokio::time::Instant::now();
    let at_cut = load.calls();
    skein_tests::wait_for(
        "the client to call LAN nodes",
        Duration::from_secs(30),
        || {
            let n = load.lan_calls();
            async move { (n >= 5).then_some(()) }
        },
    )
    .await?;
    // Midway, node 0 crashes and starts again while the site is cut off.
    tokio::time::sleep((outage / 2).saturating_sub(cut.elapsed())).await;
    let node0 = t.restart_node(0).await?;
    let at_restart = load.calls();
    skein_tests::wait_for(
        "the restarted node to serve",
        Duration::from_secs(60),
        || {
            let n = load.served_by_since(&node0, at_restart);
            async move { (n >= 3).then_some(()) }
        },
    )
    .await?;
    // The rest of the outage, the load going on.
    tokio::time::sleep(outage.saturating_sub(cut.elapsed())).await;
    let outage_calls = load.calls() - at_cut;
    let outage_took = cut.elapsed();
    t.site.restore_uplink()?;
    skein_tests::wait_for(
        "the client back on the coordinator's routes",
        Duration::from_secs(60),
        || {
            let down = load.coordinator_down();
            async move { (!down).then_some(()) }
        },
    )
    .await?;
    let mark = load.calls();
    skein_tests::wait_for("10 more calls", Duration::from_secs(60), || {
        let calls = load.calls();
        async move { (calls >= mark + 10).then_some(()) }
    })
    .await?;
    let report = load.stop().await?;
    let failed = report.failed();
    let served = report.served();
    let [p50, p99, max] = report.latencies(at_cut, outage_calls);
    eprintln!(
        "uplink cut for {outage_took:.1?}: {} calls, {outage_calls} during the cut ({} on LAN routes), {} failed; during the cut p50 {p50:?}, p99 {p99:?}, max {max:?}",
        report.outcomes.len(),
        report.lan_calls,
        failed.len(),
    );
    assert!(failed.is_empty(), "calls failed: {failed:?}");
    assert!(
        outage_calls >= 100,
        "only {outage_calls} calls during the outage"
    );
    skein_tests::lan_site::wait_ledger(&t.mesh.client, "root", served, Duration::from_secs(60))
        .await?;
    Ok(())
}
