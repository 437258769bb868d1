//! Offline operation and LAN discovery (issue 20): a site whose coordinator goes away keeps
//! serving; its nodes restart from their saved heartbeat answer and cached models; a LAN client
//! finds them over mDNS and calls them with the tickets it holds; usage arrives exactly once
//! when the coordinator is back. The limits: a ticket past its tenant's offline validity is
//! refused with `ticket_offline_expired`, a client without LAN discovery gets "coordinator
//! unreachable" quickly. mDNS runs in a network namespace of the test's own (root; skipped
//! elsewhere unless `SKEIN_EXPECT_ROOT` is set), as in `ingress.rs`.

use skein_node::Node;
use skein_proto::{DeploymentSettings, UsageQuery};
use skein_tests::lan_site::{LanSite, SiteExes};
use skein_tests::{case, model_bytes, wait_for, TestMesh};
use std::time::Duration;

fn exes() -> SiteExes {
    SiteExes {
        node: env!("CARGO_BIN_EXE_node-process").into(),
        coordinator: env!("CARGO_BIN_EXE_coordinator-process").into(),
    }
}

/// How long the coordinator stays down in the outage test: `SKEIN_OFFLINE_OUTAGE_S` seconds
/// (default 8; the netns site test runs it with 60).
fn outage() -> Duration {
    let s = std::env::var("SKEIN_OFFLINE_OUTAGE_S")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(8);
    Duration::from_secs(s.max(4))
}

async fn deploy_warm(site: &LanSite, replicas: u32) -> anyhow::Result<()> {
    site.admin
        .deploy_with(
            "ppocr_cls",
            None,
            &model_bytes("ppocr_cls"),
            DeploymentSettings {
                min_replicas: replicas,
                shared: true,
                ..Default::default()
            },
            |_| {},
        )
        .await?;
    wait_for(
        "ppocr_cls loaded on every node",
        Duration::from_secs(60),
        || async {
            let models = site.admin.models().await.ok()?;
            models
                .iter()
                .any(|m| m.name == "ppocr_cls" && m.loaded_on.len() >= replicas as usize)
                .then_some(())
        },
    )
    .await
}

/// Steady load from a LAN client (SDK, LAN discovery on) while the coordinator is killed for
/// [`outage`]; during it, node 0 is killed and restarted (from its saved heartbeat answer and
/// its cached model, on a new port, found again over mDNS), then node 1 is killed, so that
/// for a while only the restarted node can serve, then restarted too. Route tickets live 3 s: most calls of the
/// outage run on the tickets' offline validity. 0 failed calls; once the coordinator is back,
/// calls go back to its routes and the ledger holds exactly the calls served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lan_site_serves_through_a_coordinator_outage_and_node_restarts() -> anyhow::Result<()> {
    if !skein_tests::NetNs::required() {
        return Ok(());
    }
    let mut site = LanSite::start(
        43,
        exes(),
        2,
        |c| c.security.ticket_ttl = Duration::from_secs(3),
        |n| n.ticket_clock_skew_ms = 500,
    )
    .await?;
    deploy_warm(&site, 2).await?;
    let single = case("ppocr_cls", "single");
    let load = site
        .lan_load("ppocr_cls", &single, Duration::from_millis(20))
        .await?;
    wait_for(
        "some calls before the outage",
        Duration::from_secs(30),
        || {
            let n = load.ok();
            async move { (n >= 20).then_some(()) }
        },
    )
    .await?;

    // The uplink's far end goes away.
    site.kill_coordinator()?;
    let down = tokio::time::Instant::now();
    let at_down = load.calls();
    wait_for(
        "the client to call LAN nodes",
        Duration::from_secs(30),
        || {
            let n = load.lan_calls();
            async move { (n >= 5).then_some(()) }
        },
    )
    .await?;
    // Node 0 crashes and starts again without the coordinator; then node 1 crashes, so
    // only the restarted node 0 (new address, found over mDNS) can serve.
    let node0 = site.node_id(0).expect("node 0 runs");
    let at_kill0 = load.calls();
    site.kill_node(0)?;
    site.start_node(0).await?;
    let at_restart = load.calls();
    wait_for(
        "the restarted node to serve",
        Duration::from_secs(60),
        || {
            let n = load.served_by_since(&node0, at_restart);
            async move { (n >= 3).then_some(()) }
        },
    )
    .await?;
    let at_kill1 = load.calls();
    site.kill_node(1)?;
    let mark = load.calls();
    eprintln!(
        "calls: {at_kill0} at node 0's kill, {at_restart} at its restart, {at_kill1} at node 1's kill"
    );
    wait_for(
        "the restarted node to serve alone",
        Duration::from_secs(60),
        || {
            let n = load.served_by_since(&node0, mark);
            async move { (n >= 10).then_some(()) }
        },
    )
    .await?;
    site.start_node(1).await?;
    // The rest of the outage, calls going on.
    let left = outage().saturating_sub(down.elapsed());
    tokio::time::sleep(left).await;
    let outage_calls = load.calls() - at_down;
    let outage_took = down.elapsed();
    eprintln!("calls: {} at the coordinator's restart", load.calls());
    site.start_coordinator().await?;
    // Back on the coordinator's routes: the client hears from it, and no call after that
    // takes a LAN route.
    wait_for(
        "the client back on the coordinator's routes",
        Duration::from_secs(60),
        || {
            let down = load.coordinator_down();
            async move { (!down).then_some(()) }
        },
    )
    .await?;
    let (lan_before, calls_before) = (load.lan_calls(), load.calls());
    wait_for("10 more calls", Duration::from_secs(60), || {
        let calls = load.calls();
        async move { (calls >= calls_before + 10).then_some(()) }
    })
    .await?;
    assert_eq!(
        load.lan_calls(),
        lan_before,
        "calls still took LAN routes with the coordinator back"
    );
    let report = load.stop().await?;
    let failed = report.failed();
    let served = report.served();
    let [p50, p99, max] = report.latencies(at_down, outage_calls);
    eprintln!(
        "outage {outage_took:.1?} (asked {:?}): {} calls, {outage_calls} during the outage ({} on LAN routes), {} failed; latency during the outage p50 {p50:?}, p99 {p99:?}, max {max:?}",
        outage(),
        report.outcomes.len(),
        report.lan_calls,
        failed.len(),
    );
    assert!(failed.is_empty(), "calls failed: {failed:?}");
    assert!(
        outage_calls >= 10,
        "only {outage_calls} calls during the outage"
    );
    // Every served call is in the ledger exactly once: the spooled records of both crashed
    // nodes included, none twice.
    site.wait_ledger("root", served, Duration::from_secs(60))
        .await?;
    Ok(())
}

/// The offline limits, through the `skein` binary (inside the site's namespace, as a LAN
/// device runs it): a tenant's offline validity set with `skein tenants create
/// --offline-validity`; `skein infer --lan` served by an offline node; without `--lan`,
/// "coordinator unreachable" within seconds; a ticket older than its tenant's offline validity
/// refused with `ticket_offline_expired`, naming the validity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_limits_and_skein_infer_lan() -> anyhow::Result<()> {
    if !skein_tests::NetNs::required() {
        return Ok(());
    }
    let mut site = LanSite::start(44, exes(), 1, |_| {}, |n| n.ticket_clock_skew_ms = 200).await?;
    deploy_warm(&site, 1).await?;
    let skein = skein_tests::workspace_exe("skein")?;
    let dir = site.dir.path().to_path_buf();
    let root_profile = dir.join("root.toml");
    site.profile(&site.root_key).save(&root_profile)?;
    let run = |ns: Option<&str>, profile: &std::path::Path, args: &[&str]| {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&skein);
                c
            }
            None => std::process::Command::new(&skein),
        };
        cmd.arg("--profile").arg(profile).args(args);
        let started = tokio::time::Instant::now();
        let out = cmd.output();
        (out, started.elapsed())
    };
    // The tenant's offline validity, through the CLI.
    let (out, _) = run(
        None,
        &root_profile,
        &["tenants", "create", "edge", "--offline-validity", "3s"],
    );
    let out = out?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .next()
            .unwrap_or("")
            .contains("OFFLINE_VALIDITY"),
        "{table}"
    );
    let tenants = skein_tests::skein_json(&skein, &root_profile, &["tenants", "list"]).await?;
    let edge = tenants
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "edge"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(edge["quota"]["offline_validity_ms"], 3000, "{tenants}");
    let key = skein_tests::skein_json(
        &skein,
        &root_profile,
        &["keys", "create", "--tenant", "edge", "--scope", "invoke"],
    )
    .await?;
    let edge_key = key["key"].as_str().unwrap_or_default().to_string();
    let edge_profile = dir.join("edge.toml");
    site.profile(&edge_key).save(&edge_profile)?;

    let single = case("ppocr_cls", "single");
    let npy = dir.join("x.npy");
    std::fs::write(&npy, skein_proto::npy::encode(&single.inputs[0])?)?;
    let input = format!("{}={}", single.inputs[0].name(), npy.display());
    let infer = |lan: bool| {
        let mut a = vec![
            "infer",
            "ppocr_cls",
            "-i",
            input.as_str(),
            "--output",
            "json",
        ];
        if lan {
            a.push("--lan");
        }
        a.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    let ns = site.ns.name.clone();
    let call = |profile: &std::path::Path, lan: bool| {
        let args = infer(lan);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(Some(&ns), profile, &args)
    };
    // While the coordinator answers, `--lan` resolves as usual and keeps the ticket.
    for p in [&root_profile, &edge_profile] {
        let (out, _) = call(p, true);
        let out = out?;
        assert!(
            out.status.success(),
            "skein infer --lan (coordinator up): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(root_profile.with_extension("lan-tickets.json").exists());

    site.kill_coordinator()?;
    // Without --lan: a clear error, quickly.
    let (out, took) = call(&root_profile, false);
    let out = out?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("coordinator unreachable"), "{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
    // With --lan: found over mDNS, served by the offline node with the held ticket.
    let node = site.node_id(0).expect("node runs");
    let (out, _) = call(&root_profile, true);
    let out = out?;
    assert!(
        out.status.success(),
        "skein infer --lan during the outage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(answer["metadata"]["node"], node.as_str(), "{answer}");
    // The edge tenant's ticket is older than its 3 s offline validity by now (or soon): the
    // offline node refuses it, saying why.
    let refusal = wait_for(
        "the edge ticket refused past its offline validity",
        Duration::from_secs(30),
        || {
            let (out, _) = call(&edge_profile, true);
            async move {
                let out = out.ok()?;
                (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
            }
        },
    )
    .await?;
    assert!(refusal.contains("ticket_offline_expired"), "{refusal}");
    assert!(refusal.contains("offline validity of 3s"), "{refusal}");
    // The node's own ledger of it: the calls served offline arrive once the coordinator is back.
    site.start_coordinator().await?;
    wait_for(
        "usage of the offline calls",
        Duration::from_secs(60),
        || async {
            let rows = site.admin.usage(UsageQuery::default()).await.ok()?;
            let root: u64 = rows
                .iter()
                .filter(|r| r.tenant == "root")
                .map(|r| r.requests)
                .sum();
            (root == 2).then_some(())
        },
    )
    .await?;
    Ok(())
}

/// No root needed: a node shows `skein_node_offline` 1 once the coordinator has not answered
/// for three heartbeat intervals; a node started while the coordinator is down starts (it
/// used to fail) from its saved heartbeat answer, offline, with its deployments, its cached
/// model loaded and its HTTP ingress up; it goes back online when the coordinator is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_offline_from_its_saved_heartbeat_answer() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start_with(
        1,
        |_| {},
        |n| n.metrics_listen = Some("127.0.0.1:0".parse().expect("addr")),
    )
    .await?;
    mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    let metrics = mesh.nodes[0]
        .as_ref()
        .and_then(Node::metrics_addr)
        .expect("metrics endpoint");
    assert_eq!(
        skein_tests::node_metric(metrics, "skein_node_offline", "").await,
        Some(0.0)
    );
    let saved = mesh.dir.path().join("node-0").join("last-heartbeat.json");
    assert!(saved.exists(), "{} missing", saved.display());

    let addr = mesh.stop_coordinator().await;
    wait_for(
        "the node to say it is offline",
        Duration::from_secs(30),
        || async move {
            skein_tests::node_metric(metrics, "skein_node_offline", "")
                .await
                .filter(|&v| v == 1.0)
        },
    )
    .await?;
    // A restart while the coordinator is down.
    mesh.nodes[0].take().expect("running").kill();
    let mut cfg = skein_node::NodeConfig {
        coordinator: addr.to_string(),
        data_dir: mesh.dir.path().join("node-0"),
        max_concurrency: 2,
        backend: skein_node::backend::BackendChoice::Tract,
        metrics_listen: Some("127.0.0.1:0".parse()?),
        ..skein_node::NodeConfig::default()
    };
    // With its HTTP ingress too, whose SDK client cannot reach the coordinator either.
    cfg.http.listen = Some("127.0.0.1:0".parse()?);
    cfg.http.mdns = false;
    let node = Node::start(cfg).await?;
    let metrics = node.metrics_addr().expect("metrics endpoint");
    let ingress = node.http_addr().expect("the HTTP ingress");
    let live = skein_gateway::http_client::HttpClient::new(ingress)
        .get("/v2/health/live")
        .await?;
    assert_eq!(live.status, 200);
    mesh.nodes[0] = Some(node);
    assert_eq!(
        skein_tests::node_metric(metrics, "skein_node_offline", "").await,
        Some(1.0)
    );
    wait_for(
        "the cached model loaded offline",
        Duration::from_secs(60),
        || async move {
            let mut http = skein_gateway::http_client::HttpClient::new(metrics);
            let text = String::from_utf8(http.get("/metrics").await.ok()?.body).ok()?;
            text.lines()
                .any(|l| {
                    l.starts_with("skein_model_loaded{model=\"ppocr_cls\"") && l.ends_with(" 1")
                })
                .then_some(())
        },
    )
    .await
    .map_err(|e| {
        let text = std::fs::read_dir(mesh.dir.path().join("node-0")).map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        });
        anyhow::anyhow!("{e}; node dir: {text:?}")
    })?;
    let seen = skein_tests::node_metric(metrics, "skein_node_coordinator_last_seen_seconds", "")
        .await
        .unwrap_or_default();
    assert!(seen > 0.0, "last seen {seen} s ago");

    mesh.restart_coordinator(addr).await?;
    wait_for(
        "the node back online",
        Duration::from_secs(30),
        || async move {
            skein_tests::node_metric(metrics, "skein_node_offline", "")
                .await
                .filter(|&v| v == 0.0)
        },
    )
    .await?;
    Ok(())
}

/// The series of `name` whose labels contain `label` (e.g. `source="peer"`), from `/metrics`.
async fn node_series(addr: std::net::SocketAddr, name: &str, label: &str) -> Option<f64> {
    let mut http = skein_gateway::http_client::HttpClient::new(addr);
    let text = String::from_utf8(http.get("/metrics").await.ok()?.body).ok()?;
    text.lines().find_map(|l| {
        let (labels, v) = l.strip_prefix(name)?.strip_prefix('{')?.split_once("} ")?;
        labels.contains(label).then(|| v.trim().parse().ok())?
    })
}

/// Issue 20, LAN holders while the coordinator is unreachable: two nodes with a peer layer and
/// LAN discovery hold a provisioned model; the coordinator is killed; node 1 is killed, its
/// artifact cache deleted (a device reset at the site) and started again offline. It loads the
/// model from node 0 over the LAN (its membership grant admits it, node 0's manifest checked
/// against the digest of its saved heartbeat answer): every byte from a peer, none from the
/// coordinator, one LAN fetch, the cached file hashing to the artifact's id; and with node 0
/// gone too, it alone answers a LAN client's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_node_loads_its_model_from_a_lan_holder() -> anyhow::Result<()> {
    if !skein_tests::NetNs::required() {
        return Ok(());
    }
    let mut site = LanSite::start(
        47,
        exes(),
        2,
        |_| {},
        |n| {
            let ip = n.listen.ip();
            n.peer.enabled = true;
            n.peer.listen = vec![format!("/ip4/{ip}/udp/0/quic-v1")];
            n.metrics_listen = Some(std::net::SocketAddr::new(ip, 0));
        },
    )
    .await?;
    deploy_warm(&site, 2).await?;
    let bytes = model_bytes("ppocr_cls");
    let sha = skein_coordinator::artifacts::sha256_hex(&bytes);
    let single = case("ppocr_cls", "single");
    let load = site
        .lan_load("ppocr_cls", &single, Duration::from_millis(50))
        .await?;

    site.kill_coordinator()?;
    site.kill_node(1)?;
    let cache = site.node_dir(1).join("cache");
    std::fs::remove_dir_all(&cache)?;
    site.start_node(1).await?;
    let node1 = site.node_id(1).expect("node 1 runs");
    let metrics = site.nodes[1]
        .as_ref()
        .and_then(|n| n.metrics)
        .expect("node 1's metrics endpoint");
    let fetched = "skein_node_artifact_fetched_bytes_total";
    wait_for(
        "node 1 to fetch the model from the LAN holder",
        Duration::from_secs(60),
        || async move {
            node_series(metrics, fetched, "source=\"peer\"")
                .await
                .filter(|&v| v > 0.0)
        },
    )
    .await?;
    wait_for(
        "the model in node 1's cache",
        Duration::from_secs(60),
        || {
            let path = cache.join(&sha);
            async move { std::fs::read(path).ok() }
        },
    )
    .await?;
    let from_peer = node_series(metrics, fetched, "source=\"peer\"").await;
    let from_coordinator = node_series(metrics, fetched, "source=\"coordinator\"").await;
    let lan_fetches =
        skein_tests::node_metric(metrics, "skein_node_artifact_lan_fetches_total", "").await;
    eprintln!(
        "node 1 offline: {from_peer:?} bytes from peers, {from_coordinator:?} from the coordinator, {lan_fetches:?} LAN fetches; the model is {} bytes",
        bytes.len()
    );
    assert_eq!(from_peer, Some(bytes.len() as f64));
    assert_eq!(from_coordinator, Some(0.0));
    assert_eq!(lan_fetches, Some(1.0));
    let cached = std::fs::read(cache.join(&sha))?;
    assert_eq!(skein_coordinator::artifacts::sha256_hex(&cached), sha);
    assert_eq!(
        skein_tests::node_metric(metrics, "skein_node_offline", "").await,
        Some(1.0)
    );

    // Node 0 goes too: node 1 alone answers the LAN client, with the model it fetched.
    site.kill_node(0)?;
    let mark = load.calls();
    wait_for(
        "node 1 to answer LAN calls alone",
        Duration::from_secs(60),
        || {
            let n = load.served_by_since(&node1, mark);
            async move { (n >= 5).then_some(()) }
        },
    )
    .await?;
    let report = load.stop().await?;
    let failed = report.outcomes.iter().filter(|o| o.result.is_err()).count();
    eprintln!(
        "LAN client: {} calls, {} on LAN routes, {failed} failed",
        report.outcomes.len(),
        report.lan_calls
    );
    Ok(())
}

/// `skein-node --lan`, the real binary with its flag (its config file leaves LAN discovery
/// off): while the coordinator is down the node restarts on a new port, and a LAN device's
/// `skein infer --lan` finds it there over mDNS (the address it held from its last resolve is
/// dead) and gets the reference answer from it. Without the flag the node is not advertised
/// and the call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skein_node_lan_is_found_by_skein_infer_lan_while_the_coordinator_is_down(
) -> anyhow::Result<()> {
    if !skein_tests::NetNs::required() {
        return Ok(());
    }
    let mut site = LanSite::start(45, exes(), 0, |_| {}, |_| {}).await?;
    let token = match site
        .admin
        .admin(skein_proto::AdminRequest::MintJoinToken {
            ttl_s: 600,
            uses: 1,
            labels: Default::default(),
        })
        .await?
    {
        skein_proto::AdminResponse::JoinToken { token, .. } => token,
        other => anyhow::bail!("minting a join token: {other:?}"),
    };
    let mut cfg = skein_node::NodeConfig {
        coordinator: site.addr.to_string(),
        join_token: Some(token),
        listen: std::net::SocketAddr::new(site.ns.ns_ip.into(), 0),
        data_dir: site.dir.path().join("real-node"),
        metrics_listen: Some("127.0.0.1:0".parse()?),
        backend: skein_node::backend::BackendChoice::Tract,
        ..skein_node::NodeConfig::default()
    };
    cfg.peer.enabled = false;
    assert!(!cfg.lan.mdns, "LAN discovery must come from the flag alone");
    let ns = site.ns.name.clone();
    let node = skein_tests::RealNode::spawn_in(Some(&ns), &cfg, &["--lan"]).await?;
    deploy_warm(&site, 1).await?;

    let skein = skein_tests::workspace_exe("skein")?;
    let dir = site.dir.path().to_path_buf();
    let profile = dir.join("root.toml");
    site.profile(&site.root_key).save(&profile)?;
    let single = case("ppocr_cls", "single");
    let npy = dir.join("x.npy");
    std::fs::write(&npy, skein_proto::npy::encode(&single.inputs[0])?)?;
    let input = format!("{}={}", single.inputs[0].name(), npy.display());
    let infer = || {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&skein)
            .arg("--profile")
            .arg(&profile)
            .args([
                "infer",
                "ppocr_cls",
                "-i",
                &input,
                "--output",
                "json",
                "--lan",
            ])
            .output()
    };
    // While the coordinator answers: resolved as usual, the route and ticket kept for later.
    let out = infer()?;
    assert!(
        out.status.success(),
        "skein infer --lan (coordinator up): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The coordinator goes away; the node restarts (offline, from its saved heartbeat answer
    // and cached model) on another port.
    site.kill_coordinator()?;
    let node_id = node.node_id.clone();
    drop(node);
    cfg.join_token = None;
    let node = skein_tests::RealNode::spawn_in(Some(&ns), &cfg, &["--lan"]).await?;
    assert_eq!(node.node_id, node_id);
    let out = infer()?;
    assert!(
        out.status.success(),
        "skein infer --lan with the coordinator down: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(answer["metadata"]["node"], node_id.as_str(), "{answer}");
    // `skein infer --output json`: outputs by name, FP32 here; the reference's tolerances.
    let outputs = answer["outputs"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(name, t)| {
                    let shape: Vec<u64> = serde_json::from_value(t["shape"].clone())?;
                    let data: Vec<f32> = serde_json::from_value(t["data"].clone())?;
                    Ok(skein_proto::Tensor::from_f32(name.as_str(), shape, &data)?)
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .transpose()?
        .unwrap_or_default();
    skein_tests::check(&outputs, &single);
    Ok(())
}
