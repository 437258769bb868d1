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
    tcp_transfer(None, site.router.host_ip, Some(&a.name), 1000)
        .context("after the uplink is restored")?;
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
        let site = Site::create(index, nodes + 1)?;
        site.shape_uplink(uplink_kbit)?;
        let mesh = skein_tests::TestMesh::start_with(
            0,
            |c| c.listen = "0.0.0.0:0".parse().expect("addr"),
            |_| {},
        )
        .await?;
        let port = mesh.coordinator().addr().port();
        let mut procs = Vec::new();
        for (i, host) in site.hosts.iter().take(nodes).enumerate() {
            let mut config = mesh.node_config(i);
            config.coordinator = site.coordinator_addr(port);
            config.listen = "0.0.0.0:0".parse()?;
            config.metrics_listen = Some(NODE_METRICS.parse()?);
            f(i, &mut config);
            procs.push(
                skein_tests::NodeProcess::spawn_in_named(
                    Some(&host.name),
                    env!("CARGO_BIN_EXE_node-process"),
                    &config,
                    &[],
                )
                .await?,
            );
        }
        Ok(SiteMesh {
            mesh,
            nodes: procs,
            site,
        })
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
        for i in 0..3 {
            let x = model.input(i as u64);
            let r = t.mesh.client.infer("synth", vec![x.clone()]).await?;
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
