//! Nodes away from the coordinator's network: the real `skein-node` binary in a network
//! namespace of its own.
//!
//! A node that listens on every interface (`--listen 0.0.0.0:PORT`, no `--advertise`) finds
//! the address it reaches the coordinator from, advertises it, and serves calls there.

use anyhow::Context;
use skein_tests::{case, check, wait_for, NetNs, TestMesh};
use std::time::Duration;

/// The `skein-node` binary beside this package's helper binaries (`scripts/test` builds every
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_listening_on_all_interfaces_advertises_its_address_towards_the_coordinator(
) -> anyhow::Result<()> {
    if !NetNs::required() {
        return Ok(());
    }
    let ns = NetNs::create(1)?;
    let mesh =
        TestMesh::start_with(0, |c| c.listen = "0.0.0.0:0".parse().expect("addr"), |_| {}).await?;
    let port = mesh.coordinator().addr().port();
    let config = mesh.node_config(0);
    let token = config.join_token.clone().context("a join token")?;
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(skein_tests::workspace_exe("skein-node")?)
        .args(["--coordinator", &format!("{}:{port}", ns.host_ip)])
        .args(["--listen", "0.0.0.0:0", "--backend", "tract"])
        .args(["--join-token", &token, "--data-dir"])
        .arg(&config.data_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let mut node = skein_tests::KillOnDrop(cmd.spawn().context("starting skein-node")?);

    let info = wait_for("the node joined", Duration::from_secs(60), || {
        let exited = node.0.try_wait().ok().flatten();
        let client = &mesh.client;
        async move {
            if let Some(status) = exited {
                panic!("skein-node exited with {status} (its stderr is above)");
            }
            client.nodes().await.ok()?.into_iter().next()
        }
    })
    .await?;
    let addr: std::net::SocketAddr = info.addr.parse()?;
    assert_eq!(
        addr.ip(),
        std::net::IpAddr::V4(ns.ns_ip),
        "the node advertises {addr}, not its address on the link towards the coordinator"
    );
    assert_ne!(addr.port(), 0, "the advertised port is the bound one");

    // The advertised address serves calls.
    mesh.deploy_with(
        "ppocr_cls",
        skein_proto::DeploymentSettings {
            min_replicas: 1,
            ..Default::default()
        },
    )
    .await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    let single = case("ppocr_cls", "single");
    let r = mesh
        .client
        .infer("ppocr_cls", single.inputs.clone())
        .await?;
    assert_eq!(r.meta.node, info.node_id);
    check(&r.outputs, &single);
    drop(node);
    Ok(())
}

/// The node's peer layer as the coordinator reports it (`skein nodes`).
async fn peer_report(mesh: &TestMesh, node: &str) -> Option<skein_proto::PeerReport> {
    let nodes = mesh.client.nodes().await.ok()?;
    nodes.into_iter().find(|n| n.node_id == node)?.peer
}

/// A node behind NAT router `index` (`node_kind`) and an SDK client behind router `index + 1`
/// (`client_kind`); the coordinator (control plane and circuit relay) on the test's side,
/// the "internet" between the routers. The node serves `ppocr_cls`.
struct NatMesh {
    mesh: TestMesh,
    /// The node's peer layer as the coordinator first reported it behind NAT.
    report: skein_proto::PeerReport,
    node: skein_tests::NodeProcess,
    client: skein_tests::nat::NsClient,
    // Dropped last: the namespaces go after the processes and sockets in them.
    client_nat: skein_tests::nat::NatHost,
    node_nat: skein_tests::nat::NatHost,
}

/// Traces of the test (`RUST_LOG`) into its captured output; once per process.
fn trace_to_test_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// The coordinator's `[relay] routing_penalty_ms` in these meshes (not the default 10, so that
/// `skein route` shows the setting was used).
const RELAY_PENALTY_MS: f64 = 7.0;

/// Where a node behind NAT serves `/metrics`, inside its namespace.
const NODE_METRICS: &str = "127.0.0.1:9464";

/// One sample of a node's `/metrics` (the text), by its name and labels.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

async fn nat_mesh(
    index: u8,
    node_kind: skein_tests::nat::NatKind,
    client_kind: skein_tests::nat::NatKind,
) -> anyhow::Result<NatMesh> {
    nat_mesh_with(index, node_kind, client_kind, |_| {}).await
}

/// [`nat_mesh`], with the node's config changed by `f` first.
async fn nat_mesh_with(
    index: u8,
    node_kind: skein_tests::nat::NatKind,
    client_kind: skein_tests::nat::NatKind,
    f: impl FnOnce(&mut skein_node::NodeConfig),
) -> anyhow::Result<NatMesh> {
    use skein_tests::nat::{NatHost, NsClient};
    let node_nat = NatHost::create(index, node_kind)?;
    let client_nat = NatHost::create(index + 1, client_kind)?;
    let mesh = TestMesh::start_with(
        0,
        |c| {
            c.listen = "0.0.0.0:0".parse().expect("addr");
            c.relay.routing_penalty_ms = RELAY_PENALTY_MS;
        },
        |_| {},
    )
    .await?;
    let port = mesh.coordinator().addr().port();
    let mut config = mesh.node_config(0);
    config.coordinator = format!("{}:{port}", node_nat.router.host_ip);
    config.listen = "0.0.0.0:0".parse()?;
    // The namespace is the node's alone: a fixed port is free there.
    config.metrics_listen = Some(NODE_METRICS.parse()?);
    f(&mut config);
    let node = skein_tests::NodeProcess::spawn_in_named(
        Some(&node_nat.name),
        env!("CARGO_BIN_EXE_node-process"),
        &config,
        &[],
    )
    .await?;
    // It advertises its private address, which no caller can reach.
    assert!(
        node.addr.starts_with(&node_nat.ip.to_string()),
        "{}",
        node.addr
    );
    let report = wait_for(
        "AutoNAT's verdict (nat) and a relay reservation, in the heartbeat",
        Duration::from_secs(60),
        || async {
            let r = peer_report(&mesh, &node.node_id).await?;
            (r.reachability == "nat" && !r.relayed.is_empty()).then_some(r)
        },
    )
    .await?;
    eprintln!("node peer report: {report:?}");
    mesh.deploy_with(
        "ppocr_cls",
        skein_proto::DeploymentSettings {
            min_replicas: 1,
            ..Default::default()
        },
    )
    .await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    // The caller behind the second router reaches the coordinator at its address on that
    // router's link.
    let mut profile = mesh.profile.clone();
    profile.coordinator = format!("{}:{port}", client_nat.router.host_ip);
    let client = NsClient::start(
        &client_nat.name,
        profile,
        skein_client::ClientConfig {
            timeout: Duration::from_secs(20),
            ..Default::default()
        },
    )
    .await?;
    Ok(NatMesh {
        mesh,
        report,
        node,
        client,
        client_nat,
        node_nat,
    })
}

/// A node behind a cone NAT (the kernel's masquerade) and a caller behind another: the SDK's
/// first call goes through the coordinator's relay at once, DCUtR then makes a direct
/// connection through both NATs, and later calls take it (the path is asserted per call);
/// every answer equals the reference. Then the relay dies with the coordinator and the
/// hole-punched path keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_nat_is_called_through_the_relay_then_hole_punched() -> anyhow::Result<()> {
    use skein_client::CallPath;
    use skein_tests::nat::{NatHost, NatKind};
    if !NatHost::required() {
        return Ok(());
    }
    trace_to_test_log();
    let mut t = nat_mesh(2, NatKind::Cone, NatKind::Cone).await?;
    let single = case("ppocr_cls", "single");

    // `skein nodes` (the real CLI) shows the node behind NAT and the relay it holds a
    // reservation on: the coordinator's relay, by the tail of its PeerId.
    let relay_id = t
        .report
        .relayed
        .first()
        .and_then(|c| c.split("/p2p-circuit").next())
        .and_then(|r| r.rsplit("/p2p/").next())
        .context("the node's relay circuit names its relay")?
        .to_string();
    let profile = t.mesh.dir.path().join("cli-profile.toml");
    t.mesh.profile.save(&profile)?;
    let skein = skein_tests::workspace_exe("skein")?;
    let out = std::process::Command::new(&skein)
        .arg("--profile")
        .arg(&profile)
        .arg("nodes")
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "skein nodes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Columns are aligned: a cell starts where its header does (cells may hold spaces).
    let header: Vec<char> = table.lines().next().unwrap_or("").chars().collect();
    let row: Vec<char> = table
        .lines()
        .find(|l| l.starts_with(&t.node.node_id))
        .with_context(|| format!("the node's row in\n{table}"))?
        .chars()
        .collect();
    let column = |name: &str| -> Option<String> {
        let name: Vec<char> = name.chars().collect();
        let at = header
            .windows(name.len())
            .position(|w| w == name.as_slice())?;
        let cell: String = row
            .get(at..)?
            .iter()
            .take_while(|c| !c.is_whitespace())
            .collect();
        Some(cell)
    };
    assert_eq!(column("REACH").as_deref(), Some("nat"), "{table}");
    let relay_shown = column("RELAY").unwrap_or_default();
    assert!(
        relay_shown.starts_with('…') && relay_id.ends_with(relay_shown.trim_start_matches('…')),
        "RELAY {relay_shown:?} is not the coordinator's relay {relay_id}:\n{table}"
    );

    // `skein route` prices the node as reached through the relay: the caller's round trip to
    // the coordinator plus the coordinator's to the node (`relay`), and the relay's penalty
    // (`[relay] routing_penalty_ms`, set to 7 ms here) in a part of its own.
    let route = |json: bool| -> anyhow::Result<String> {
        let mut cmd = std::process::Command::new(&skein);
        cmd.arg("--profile")
            .arg(&profile)
            .args(["route", "ppocr_cls"]);
        if json {
            cmd.args(["--output", "json"]);
        }
        let out = cmd.output()?;
        anyhow::ensure!(
            out.status.success(),
            "skein route: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let resolution: serde_json::Value = serde_json::from_str(&route(true)?)?;
    let cand = resolution["candidates"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["node_id"] == t.node.node_id.as_str()))
        .with_context(|| format!("the node among the candidates: {resolution}"))?;
    assert_eq!(cand["rtt_source"], "relay", "{cand}");
    assert_eq!(
        cand["parts"]["relay_us"].as_f64(),
        Some(RELAY_PENALTY_MS * 1e3),
        "{cand}"
    );
    let parts = &cand["parts"];
    let sum: f64 = [
        "rtt_us",
        "queue_us",
        "service_us",
        "cold_us",
        "transfer_us",
        "relay_us",
    ]
    .iter()
    .filter_map(|p| parts[p].as_f64())
    .sum();
    let expected = cand["expected_us"].as_f64().context("expected_us")?;
    assert!(
        (sum - expected).abs() < 1.0,
        "parts {sum} vs expected {expected}: {cand}"
    );
    let text = route(false)?;
    assert!(
        text.lines()
            .next()
            .is_some_and(|l| l.ends_with("+ transfer + relay")),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.contains(&t.node.node_id))
        .with_context(|| format!("the node's row in\n{text}"))?;
    assert!(row.contains("(relay)"), "{text}");
    assert!(
        row.trim_end().ends_with(&format!("{RELAY_PENALTY_MS:.2}")),
        "RELAY is the last column: {text}"
    );

    // The first call: relayed, at once.
    let first = t.client.infer("ppocr_cls", single.inputs.clone()).await?;
    check(&first.outputs, &single);
    assert_eq!(first.meta.node, t.node.node_id);
    assert_eq!(first.path, CallPath::Relayed, "the first call");

    // Within a few seconds DCUtR has made a direct connection through both NATs (polled
    // without calls: each relayed call counts against the circuit's byte limit), and the
    // calls after it take it.
    let punches = wait_for(
        "a hole punch (DCUtR) to succeed",
        Duration::from_secs(20),
        || async {
            let (tried, made) = t.client.hole_punches().await.ok()?;
            (made >= 1).then_some((tried, made))
        },
    )
    .await;
    let (tried, made) = match punches {
        Ok(p) => p,
        Err(e) => {
            let (tried, made) = t.client.hole_punches().await?;
            let name = t.node_nat.name.clone();
            let metrics = tokio::task::spawn_blocking(move || {
                skein_tests::nat::http_get_in(&name, NODE_METRICS.parse()?, "/metrics")
            })
            .await??;
            let node_side: Vec<&str> = metrics
                .lines()
                .filter(|l| {
                    l.starts_with("skein_node_hole_punch")
                        || l.starts_with("skein_node_calls_by_path")
                })
                .collect();
            anyhow::bail!("{e}: the caller's hole punches: {tried} tried, {made} made; the node's: {node_side:?}");
        }
    };
    assert!(tried >= made, "hole punches: {tried} tried, {made} made");
    let punched = 5u64;
    for _ in 0..punched {
        let r = t.client.infer("ppocr_cls", single.inputs.clone()).await?;
        check(&r.outputs, &single);
        assert_eq!(r.meta.node, t.node.node_id);
        assert_eq!(r.path, CallPath::HolePunched, "a call after the hole punch");
    }

    // The node's `/metrics` counts the streams it served by path, and its hole punches.
    let relayed = 1;
    let name = t.node_nat.name.clone();
    let metrics = tokio::task::spawn_blocking(move || {
        skein_tests::nat::http_get_in(&name, NODE_METRICS.parse()?, "/metrics")
    })
    .await??;
    let node = &t.node.node_id;
    let by_path = |p: &str| {
        sample(
            &metrics,
            &format!("skein_node_calls_by_path_total{{node=\"{node}\",path=\"{p}\"}}"),
        )
    };
    assert_eq!(by_path("relayed"), Some(relayed), "{metrics}");
    assert_eq!(
        by_path("hole-punched")
            .zip(by_path("direct"))
            .map(|(h, d)| h + d),
        Some(punched),
        "{metrics}"
    );
    let succeeded = sample(
        &metrics,
        &format!("skein_node_hole_punch_successes_total{{node=\"{node}\"}}"),
    );
    assert!(succeeded.is_some_and(|n| n >= 1), "{metrics}");

    // The relay dies with the coordinator: the hole-punched path keeps serving (the SDK keeps
    // its route while the coordinator cannot be asked).
    t.mesh.stop_coordinator().await;
    for _ in 0..5 {
        let r = t.client.infer("ppocr_cls", single.inputs.clone()).await?;
        check(&r.outputs, &single);
        assert_eq!(r.path, CallPath::HolePunched, "a call with the relay gone");
    }
    drop(t.node);
    Ok(())
}

/// A node behind a symmetric NAT (`masquerade fully-random`: a new port per destination), the
/// caller behind a cone NAT: the address the relay saw the node at is not the one its hole
/// punch comes from, so the punch fails and every call stays relayed, and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_symmetric_nat_every_call_stays_relayed() -> anyhow::Result<()> {
    use skein_client::CallPath;
    use skein_tests::nat::{NatHost, NatKind};
    if !NatHost::required() {
        return Ok(());
    }
    trace_to_test_log();
    let t = nat_mesh(4, NatKind::Symmetric, NatKind::Cone).await?;
    let single = case("ppocr_cls", "single");
    let first = t.client.infer("ppocr_cls", single.inputs.clone()).await?;
    check(&first.outputs, &single);
    assert_eq!(first.path, CallPath::Relayed, "the first call");
    // DCUtR tries (up to three times) and fails; polled without calls (each relayed call
    // counts against the circuit's byte limit).
    let punches = wait_for(
        "the hole punch to be tried",
        Duration::from_secs(30),
        || async {
            let (tried, made) = t.client.hole_punches().await.ok()?;
            (tried >= 1).then_some((tried, made))
        },
    )
    .await;
    let (tried, made) = match punches {
        Ok(p) => p,
        Err(e) => {
            let (tried, made) = t.client.hole_punches().await?;
            let name = t.node_nat.name.clone();
            let metrics = tokio::task::spawn_blocking(move || {
                skein_tests::nat::http_get_in(&name, NODE_METRICS.parse()?, "/metrics")
            })
            .await??;
            let node_side: Vec<&str> = metrics
                .lines()
                .filter(|l| {
                    l.starts_with("skein_node_hole_punch")
                        || l.starts_with("skein_node_calls_by_path")
                })
                .collect();
            anyhow::bail!("{e}: the caller's hole punches: {tried} tried, {made} made; the node's: {node_side:?}");
        }
    };
    assert_eq!(
        made, 0,
        "hole punches through a symmetric NAT: {tried} tried, {made} made"
    );
    for _ in 0..5 {
        let r = t.client.infer("ppocr_cls", single.inputs.clone()).await?;
        check(&r.outputs, &single);
        assert_eq!(
            r.path,
            CallPath::Relayed,
            "a call after the failed hole punch"
        );
    }
    let (_, made) = t.client.hole_punches().await?;
    assert_eq!(made, 0);
    // The node served every call relayed, and made no direct connection either.
    let name = t.node_nat.name.clone();
    let metrics = tokio::task::spawn_blocking(move || {
        skein_tests::nat::http_get_in(&name, NODE_METRICS.parse()?, "/metrics")
    })
    .await??;
    let node = &t.node.node_id;
    let series = |s: &str| sample(&metrics, &format!("skein_node_{s}{{node=\"{node}\"}}"));
    assert_eq!(
        sample(
            &metrics,
            &format!("skein_node_calls_by_path_total{{node=\"{node}\",path=\"relayed\"}}")
        ),
        Some(6),
        "{metrics}"
    );
    assert_eq!(series("hole_punch_successes_total"), Some(0), "{metrics}");
    drop(t.node);
    Ok(())
}

/// A node behind a symmetric NAT keeps taking fresh callers: 12 callers behind a cone NAT,
/// one after the other, each with a new key and peer layer, all reach it through the relay on
/// their first call (outputs equal the reference), and the node made one reservation on the
/// relay and lost none. Before the fix the node held a circuit listener per relay address
/// (QUIC and TCP); libp2p keeps one reservation per connection, so each listener's
/// reservation closed the other's, every retry, until the relay's rate limit (30 reservations
/// a peer, then one per 2 min) refused it and every circuit was denied: from about the 8th
/// fresh caller on with the 2 s retry; at once here, with the node retrying every 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_symmetric_nat_fresh_callers_keep_reaching_the_node() -> anyhow::Result<()> {
    use skein_client::CallPath;
    use skein_tests::nat::{NatHost, NatKind};
    if !NatHost::required() {
        return Ok(());
    }
    trace_to_test_log();
    let t = nat_mesh_with(16, NatKind::Symmetric, NatKind::Cone, |c| {
        c.peer.relay_retry_ms = 100;
    })
    .await?;
    let single = case("ppocr_cls", "single");
    for i in 0..12 {
        let caller = fresh_caller(&t).await?;
        let r = caller
            .infer("ppocr_cls", single.inputs.clone())
            .await
            .with_context(|| format!("fresh caller {i}'s first call"))?;
        check(&r.outputs, &single);
        assert_eq!(r.meta.node, t.node.node_id);
        assert_eq!(r.path, CallPath::Relayed, "fresh caller {i}'s first call");
    }
    let name = t.node_nat.name.clone();
    let metrics = tokio::task::spawn_blocking(move || {
        skein_tests::nat::http_get_in(&name, NODE_METRICS.parse()?, "/metrics")
    })
    .await??;
    let node = &t.node.node_id;
    let series = |s: &str| sample(&metrics, &format!("skein_node_{s}{{node=\"{node}\"}}"));
    assert_eq!(
        series("relay_reservations_lost_total"),
        Some(0),
        "{metrics}"
    );
    assert_eq!(series("relay_reservations_total"), Some(1), "{metrics}");
    Ok(())
}

/// UDP blocked on the caller's router (all but the coordinator's control port: the control
/// plane is QUIC): the peer layer's QUIC dials to the relay and the node are dropped, and its
/// TCP fallback (noise + yamux, through the relay's TCP listener) serves every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_udp_blocked_the_tcp_fallback_serves_the_calls() -> anyhow::Result<()> {
    use skein_client::CallPath;
    use skein_tests::nat::{NatHost, NatKind};
    if !NatHost::required() {
        return Ok(());
    }
    let t = nat_mesh(6, NatKind::Cone, NatKind::Cone).await?;
    let port = t.mesh.coordinator().addr().port();
    t.client_nat.block_udp_except(port)?;
    let single = case("ppocr_cls", "single");
    for i in 0..6 {
        let r = t.client.infer("ppocr_cls", single.inputs.clone()).await?;
        check(&r.outputs, &single);
        assert_eq!(r.meta.node, t.node.node_id);
        assert!(
            matches!(r.path, CallPath::Relayed | CallPath::HolePunched),
            "call {i} went {}, not through the peer layer",
            r.path
        );
    }
    let dropped = t.client_nat.udp_dropped()?;
    assert!(
        dropped > 0,
        "the router dropped no UDP: QUIC was never tried"
    );
    drop(t.node);
    Ok(())
}

/// A node's PeerId is bound at join: a heartbeat naming another PeerId (one the node cannot
/// prove, or another key's), over the node's own certificate, is refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reporting_another_peer_id_is_refused() -> anyhow::Result<()> {
    let mesh = TestMesh::start(1).await?;
    let node_id = mesh.nodes[0]
        .as_ref()
        .context("node")?
        .node_id()
        .to_string();
    let bound = wait_for(
        "the node's PeerId bound",
        Duration::from_secs(10),
        || async { peer_report(&mesh, &node_id).await },
    )
    .await?;
    let dir = mesh.node_config(0).data_dir;
    let creds = skein_node::identity::load(&dir)?.context("the node's credentials")?;
    let as_node =
        skein_client::Client::connect(&mesh.coordinator().addr().to_string(), creds).await?;
    let heartbeat = |peer: skein_proto::PeerReport| {
        skein_proto::CtlRequest::Heartbeat(skein_proto::Heartbeat {
            addr: "127.0.0.1:9".into(),
            capacity: Default::default(),
            labels: Default::default(),
            models: vec![],
            seq: u64::MAX / 2,
            draining: false,
            coordinate: None,
            ingress: None,
            usage_unsent: 0,
            peer: Some(Box::new(peer)),
            cached: Vec::new(),
        })
    };
    // Another key, properly signed for this node: not the PeerId bound at join.
    let other = skein_peer::Keypair::ed25519_from_bytes([7u8; 32])?;
    let lie = skein_proto::PeerReport {
        binding: skein_peer::binding::bind(&other, &node_id)?,
        ..bound.clone()
    };
    let e = as_node
        .control(&heartbeat(lie))
        .await
        .expect_err("a heartbeat with another PeerId");
    let text = e.to_string();
    assert_eq!(e.code(), Some(skein_proto::ErrorCode::Forbidden), "{text}");
    assert!(
        text.contains(&bound.binding.peer_id) && text.contains("bound"),
        "{text}"
    );
    // The bound PeerId without the proof (another key's signature).
    let mut forged = bound.clone();
    forged.binding.signature = skein_peer::binding::bind(&other, &node_id)?.signature;
    let e = as_node
        .control(&heartbeat(forged))
        .await
        .expect_err("a heartbeat with a forged binding");
    assert_eq!(e.code(), Some(skein_proto::ErrorCode::Forbidden), "{e}");
    assert!(e.to_string().contains("signature"), "{e}");
    // The node itself keeps heartbeating with its own.
    let still = wait_for(
        "the node's next report",
        Duration::from_secs(10),
        || async { peer_report(&mesh, &node_id).await },
    )
    .await?;
    assert_eq!(still.binding.peer_id, bound.binding.peer_id);
    Ok(())
}

/// A node process that comes back with another libp2p key than the one bound at its join
/// (`peer.key` swapped in its data dir): its first heartbeat is refused, naming both PeerIds,
/// and the process stops instead of serving under a PeerId the coordinator did not bind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_process_with_another_peer_key_is_refused() -> anyhow::Result<()> {
    let mesh = TestMesh::start(0).await?;
    let config = mesh.node_config(0);
    let exe = env!("CARGO_BIN_EXE_node-process");
    let mut node = skein_tests::NodeProcess::spawn_in_named(None, exe, &config, &[]).await?;
    let node_id = node.node_id.clone();
    let bound = wait_for(
        "the node's PeerId bound",
        Duration::from_secs(10),
        || async { peer_report(&mesh, &node_id).await },
    )
    .await?;
    node.kill9()?;

    // Another key where the node keeps its own.
    let other = tempfile::tempdir()?;
    let other_id = skein_peer::key::load_or_create(other.path())?
        .public()
        .to_peer_id()
        .to_base58();
    assert_ne!(other_id, bound.binding.peer_id);
    std::fs::copy(
        other.path().join(skein_peer::key::PEER_KEY_FILE),
        config.data_dir.join(skein_peer::key::PEER_KEY_FILE),
    )?;
    let path = config.data_dir.join("node.toml");
    let mut child = skein_tests::KillOnDrop(
        std::process::Command::new(exe)
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?,
    );
    let status = wait_for("the lying node to stop", Duration::from_secs(30), || {
        let exited = child.0.try_wait().ok().flatten();
        async move { exited }
    })
    .await?;
    let read = |r: Option<&mut dyn std::io::Read>| {
        let mut s = String::new();
        if let Some(r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    };
    let stdout = read(child.0.stdout.as_mut().map(|r| r as &mut dyn std::io::Read));
    let stderr = read(child.0.stderr.as_mut().map(|r| r as &mut dyn std::io::Read));
    let out = (status, stdout, stderr);
    let (status, stdout, stderr) = out;
    assert!(!status.success(), "the lying node exited with {status}");
    assert!(!stdout.contains("ready"), "the lying node served: {stdout}");
    assert!(
        stderr.contains("heartbeat refused")
            && stderr.contains(&other_id)
            && stderr.contains(&bound.binding.peer_id),
        "{stderr}"
    );
    // The coordinator still names the bound PeerId.
    let still = peer_report(&mesh, &node_id).await.context("the report")?;
    assert_eq!(still.binding.peer_id, bound.binding.peer_id);
    Ok(())
}

/// Benchmark (issue 19; `scripts/bench-nat`, root): p50/p99 of `ppocr_cls` (`single`, every
/// answer checked against the reference, every call's path asserted) at concurrency 1 and 8,
/// from a caller behind a cone NAT to a node on the direct path (not behind NAT), the
/// hole-punched path (a cone NAT) and the relayed path (a symmetric NAT); the time from a
/// fresh caller's first call to its hole punch; hole-punch success over fresh callers for the
/// cone–cone and cone–symmetric pairings. `SKEIN_BENCH_NAT_CALLS` calls per cell (default
/// 200), `SKEIN_BENCH_NAT_ATTEMPTS` fresh callers per pairing (default 20),
/// `SKEIN_BENCH_NAT_WAN_MS` one-way delay between sites (default 10; delay lines,
/// `skein_tests::delay`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: scripts/bench-nat"]
async fn bench_nat_paths() -> anyhow::Result<()> {
    use skein_client::CallPath;
    use skein_tests::nat::{NatHost, NatKind, NsClient};
    if !NatHost::required() {
        return Ok(());
    }
    let env = |name: &str, default: usize| -> anyhow::Result<usize> {
        std::env::var(name).map_or(Ok(default), |v| {
            v.parse()
                .with_context(|| format!("{name}={v:?}: not a count"))
        })
    };
    trace_to_test_log();
    let calls = env("SKEIN_BENCH_NAT_CALLS", 200)?;
    let attempts = env("SKEIN_BENCH_NAT_ATTEMPTS", 20)?;
    // One-way delay between any two sites across the "internet": half of it on each site's
    // link (the routers' WAN links, the public node's link), so a path from one site to
    // another crosses two half-delays each way. The coordinator (and its relay) sits on the
    // internet side with no delay of its own: a relayed path is as long as the direct one.
    let wan_ms = env("SKEIN_BENCH_NAT_WAN_MS", 10)?;
    let half = Duration::from_micros(wan_ms as u64 * 500);
    let delay = |ns: &NetNs| -> anyhow::Result<Option<skein_tests::delay::DelayLine>> {
        if wan_ms == 0 {
            return Ok(None);
        }
        anyhow::ensure!(
            skein_tests::delay::required(),
            "SKEIN_BENCH_NAT_WAN_MS={wan_ms} needs iptables-legacy (Debian: iptables)"
        );
        skein_tests::delay::DelayLine::start(&ns.name, ns.ns_if(), half).map(Some)
    };
    // Packets a delay line dropped (its queue or socket full) would be loss on the link.
    let drops = |lines: &[Option<skein_tests::delay::DelayLine>], what: &str| {
        let mut n = 0;
        for l in lines.iter().flatten() {
            n += l.dropped()?;
        }
        eprintln!("bench: {what}: {n} packets dropped by the delay lines");
        anyhow::Ok(())
    };
    anyhow::ensure!(calls >= 8, "SKEIN_BENCH_NAT_CALLS must be at least 8");
    let single = case("ppocr_cls", "single");
    let mut rows: Vec<String> = Vec::new();
    // (path, concurrency, p50) of every row, for the ratios printed at the end.
    let mut p50s: Vec<(&str, usize, Duration)> = Vec::new();
    let p50 = |(calls, _): &(Vec<(Duration, Duration)>, Duration)| {
        let lat: Vec<Duration> = calls.iter().map(|c| c.0).collect();
        skein_tests::quantile(&lat, 0.5)
    };

    // The direct path: a node on a link of the "internet" (not behind NAT), the caller
    // behind a cone NAT.
    {
        let public = NetNs::create(10)?;
        let client_nat = NatHost::create(11, NatKind::Cone)?;
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let ok = std::process::Command::new(args[0])
                .args(&args[1..])
                .status()
                .with_context(|| format!("{args:?}"))?
                .success();
            anyhow::ensure!(ok, "{args:?} failed");
            Ok(())
        };
        let via = public.host_ip.to_string();
        run(&[
            "ip",
            "-n",
            &public.name,
            "route",
            "add",
            "default",
            "via",
            &via,
        ])?;
        run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{}.forwarding=1", public.host_if()),
        ])?;
        let mesh =
            TestMesh::start_with(0, |c| c.listen = "0.0.0.0:0".parse().expect("addr"), |_| {})
                .await?;
        let port = mesh.coordinator().addr().port();
        let mut config = mesh.node_config(0);
        config.coordinator = format!("{}:{port}", public.host_ip);
        config.listen = "0.0.0.0:0".parse()?;
        let node = skein_tests::NodeProcess::spawn_in_named(
            Some(&public.name),
            env!("CARGO_BIN_EXE_node-process"),
            &config,
            &[],
        )
        .await?;
        mesh.deploy_with(
            "ppocr_cls",
            skein_proto::DeploymentSettings {
                min_replicas: 1,
                ..Default::default()
            },
        )
        .await?;
        mesh.wait_loaded("ppocr_cls", 1).await?;
        let mut profile = mesh.profile.clone();
        profile.coordinator = format!("{}:{port}", client_nat.router.host_ip);
        let client = NsClient::start(
            &client_nat.name,
            profile,
            skein_client::ClientConfig {
                timeout: Duration::from_secs(20),
                ..Default::default()
            },
        )
        .await?;
        let lines = [delay(&public)?, delay(&client_nat.router)?];
        for c in [1, 8] {
            let before = Usage::now(node.pid(), &public.name, &client_nat.name)?;
            let lat =
                bench_calls(&client, &single, &node.node_id, CallPath::Direct, c, calls).await?;
            let used = Usage::now(node.pid(), &public.name, &client_nat.name)?;
            rows.push(bench_row("direct (node not behind NAT)", c, &lat));
            p50s.push(("direct", c, p50(&lat)));
            eprintln!("bench: {}", rows.last().map_or("", |r| r.as_str()));
            eprintln!(
                "bench: direct, c = {c}: {}",
                used.since(&before, calls + 10)
            );
        }
        drops(&lines, "direct")?;
        drop(client);
        drop(node);
        drop(mesh);
    }

    // The hole-punched path: node and caller behind cone NATs; then fresh callers.
    let mut to_direct = Vec::new();
    let cone_cone;
    {
        let t = nat_mesh(12, NatKind::Cone, NatKind::Cone).await?;
        let lines = [delay(&t.node_nat.router)?, delay(&t.client_nat.router)?];
        to_direct.push(first_call_to_punch(&t.client, &single, &t.node.node_id).await?);
        for c in [1, 8] {
            let usage = || Usage::now(t.node.pid(), &t.node_nat.name, &t.client_nat.name);
            let before = usage()?;
            let lat = bench_calls(
                &t.client,
                &single,
                &t.node.node_id,
                CallPath::HolePunched,
                c,
                calls,
            )
            .await?;
            let used = usage()?;
            rows.push(bench_row("hole-punched (cone NAT)", c, &lat));
            p50s.push(("hole-punched", c, p50(&lat)));
            eprintln!("bench: {}", rows.last().map_or("", |r| r.as_str()));
            eprintln!(
                "bench: hole-punched, c = {c}: {}",
                used.since(&before, calls + 10)
            );
        }
        let (mut made, mut failed) = (0, 0);
        for _ in 0..attempts {
            let client = fresh_caller(&t).await?;
            match first_call_to_punch(&client, &single, &t.node.node_id).await {
                Ok(d) => {
                    made += 1;
                    to_direct.push(d);
                }
                Err(e) => {
                    eprintln!("cone–cone attempt failed: {e:#}");
                    failed += 1;
                }
            }
        }
        cone_cone = (made, failed);
        drops(&lines, "hole-punched")?;
        eprintln!("bench: cone–cone punches {made} made, {failed} failed");
        drop(t.node);
    }

    // The relayed path: the node behind a symmetric NAT; then fresh callers.
    let cone_symmetric;
    let refusals;
    {
        let t = nat_mesh(14, NatKind::Symmetric, NatKind::Cone).await?;
        let lines = [delay(&t.node_nat.router)?, delay(&t.client_nat.router)?];
        let first = t.client.infer("ppocr_cls", single.inputs.clone()).await?;
        check(&first.outputs, &single);
        assert_eq!(first.path, CallPath::Relayed);
        punch_outcome(&t.client, Duration::from_secs(30)).await?;
        for c in [1, 8] {
            let usage = || Usage::now(t.node.pid(), &t.node_nat.name, &t.client_nat.name);
            let before = usage()?;
            let lat = bench_calls(
                &t.client,
                &single,
                &t.node.node_id,
                CallPath::Relayed,
                c,
                calls,
            )
            .await?;
            let used = usage()?;
            rows.push(bench_row("relayed (symmetric NAT)", c, &lat));
            p50s.push(("relayed", c, p50(&lat)));
            eprintln!("bench: {}", rows.last().map_or("", |r| r.as_str()));
            eprintln!(
                "bench: relayed, c = {c}: {}",
                used.since(&before, calls + 10)
            );
        }
        let (mut made, mut failed) = (0, 0);
        // A fresh caller's first call is retried every 500 ms for up to 15 s (a node seen
        // as not alive for a moment under load answers `no_capacity`); a caller whose first
        // call never succeeds is counted, and after three such callers in a row the attempts
        // stop (measured: from the ninth fresh caller on, dials to the node fail for good,
        // issue 19's benchmark notes in docs/benchmarks.md).
        let (mut refused, mut dead, mut in_a_row, mut ran) = (0u32, 0u32, 0u32, 0usize);
        for i in 0..attempts {
            if in_a_row >= 3 {
                break;
            }
            ran += 1;
            let client = fresh_caller(&t).await?;
            let start = tokio::time::Instant::now();
            let r = loop {
                match client.infer("ppocr_cls", single.inputs.clone()).await {
                    Ok(r) => break Some(r),
                    Err(e) => {
                        refused += 1;
                        let peer = peer_report(&t.mesh, &t.node.node_id).await;
                        let relayed = peer.as_ref().map(|p| p.relayed.len());
                        let reach = peer.map(|p| p.reachability);
                        eprintln!(
                            "bench: cone–symmetric caller {i}: first call failed after {:.1} s: \
                             {e:#} (the node's report: {reach:?}, {relayed:?} circuit addresses)",
                            start.elapsed().as_secs_f64()
                        );
                        if start.elapsed() >= Duration::from_secs(15) {
                            break None;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            };
            let Some(r) = r else {
                dead += 1;
                in_a_row += 1;
                continue;
            };
            in_a_row = 0;
            check(&r.outputs, &single);
            assert_eq!(r.path, CallPath::Relayed);
            match punch_outcome(&client, Duration::from_secs(30)).await? {
                (_, 0) => failed += 1,
                _ => made += 1,
            }
        }
        cone_symmetric = (made, failed);
        eprintln!(
            "bench: cone–symmetric punches {made} made, {failed} failed; {ran} callers, \
             {dead} never got a first answer, {refused} first calls failed"
        );
        refusals = (ran, dead, refused);
        drops(&lines, "relayed")?;
        drop(t.node);
    }

    println!(
        "\nppocr_cls `single`, {calls} calls per row, caller behind a cone NAT, {wan_ms} ms \
         one way between sites\n"
    );
    println!("| path | concurrency | p50 ms | p99 ms | calls/s | at the node, p50 ms |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    // The goal's ratio, from this run: hole-punched p50 over direct p50 (goal ≤ 1.10).
    for c in [1, 8] {
        let of = |path: &str| {
            p50s.iter()
                .find(|(p, cc, _)| *p == path && *cc == c)
                .map(|(_, _, d)| d.as_secs_f64())
        };
        if let (Some(h), Some(d), Some(r)) = (of("hole-punched"), of("direct"), of("relayed")) {
            println!(
                "p50 ratios at concurrency {c}: hole-punched / direct {:.3} (goal <= 1.10), \
                 relayed / direct {:.3}",
                h / d,
                r / d
            );
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "\ntime from a fresh caller's first call to its hole punch (cone–cone, {} callers): \
         p50 {:.0} ms, max {:.0} ms",
        to_direct.len(),
        ms(skein_tests::quantile(&to_direct, 0.5)),
        ms(skein_tests::quantile(&to_direct, 1.0)),
    );
    println!(
        "hole punches over {attempts} fresh callers: cone–cone {} made, {} failed; \
         cone–symmetric {} made, {} failed",
        cone_cone.0, cone_cone.1, cone_symmetric.0, cone_symmetric.1
    );
    println!(
        "cone–symmetric: {} fresh callers ran, {} never got a first answer (within 15 s), \
         {} first calls failed in all",
        refusals.0, refusals.1, refusals.2
    );
    Ok(())
}

/// A fresh SDK client (its own peer layer and key) behind `t`'s caller router.
async fn fresh_caller(t: &NatMesh) -> anyhow::Result<skein_tests::nat::NsClient> {
    let port = t.mesh.coordinator().addr().port();
    let mut profile = t.mesh.profile.clone();
    profile.coordinator = format!("{}:{port}", t.client_nat.router.host_ip);
    skein_tests::nat::NsClient::start(
        &t.client_nat.name,
        profile,
        skein_client::ClientConfig {
            timeout: Duration::from_secs(20),
            ..Default::default()
        },
    )
    .await
}

/// A fresh caller's first call (relayed, checked) and the time from its start to the
/// caller's first hole punch (polled every 10 ms, without calls); an error when no punch is
/// made within 20 s.
async fn first_call_to_punch(
    client: &skein_tests::nat::NsClient,
    single: &skein_onnx::reference::Case,
    node: &str,
) -> anyhow::Result<Duration> {
    let start = tokio::time::Instant::now();
    let r = client.infer("ppocr_cls", single.inputs.clone()).await?;
    check(&r.outputs, single);
    assert_eq!(r.meta.node, node);
    assert_eq!(r.path, skein_client::CallPath::Relayed, "a first call");
    let deadline = start + Duration::from_secs(20);
    loop {
        let (tried, made) = client.hole_punches().await?;
        if made >= 1 {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no hole punch within 20 s ({tried} tried)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Poll a caller's hole punches until one has succeeded or failed (or `limit` passed).
async fn punch_outcome(
    client: &skein_tests::nat::NsClient,
    limit: Duration,
) -> anyhow::Result<(u64, u64)> {
    wait_for("a hole punch's outcome", limit, || async {
        let (tried, made) = client.hole_punches().await.ok()?;
        (tried >= 1 || made >= 1).then_some((tried, made))
    })
    .await
}

/// `calls` calls from `concurrency` callers at once (after 10 warm-up calls), each answer
/// checked against the reference and taken by `node` over `path`: the latencies.
async fn bench_calls(
    client: &skein_tests::nat::NsClient,
    single: &skein_onnx::reference::Case,
    node: &str,
    path: skein_client::CallPath,
    concurrency: usize,
    calls: usize,
) -> anyhow::Result<(Vec<(Duration, Duration)>, Duration)> {
    let (case, node) = (std::sync::Arc::new(single.clone()), node.to_string());
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let call = move |caller: skein_tests::nat::NsCaller| {
        let (case, node, count) = (case.clone(), node.clone(), count.clone());
        async move {
            let start = tokio::time::Instant::now();
            let r = caller.infer("ppocr_cls", case.inputs.clone()).await;
            let took = start.elapsed();
            let done = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let r = r.with_context(|| format!("after {done} calls on this path's {path} cell"))?;
            check(&r.outputs, &case);
            anyhow::ensure!(r.meta.node == node, "served by {}", r.meta.node);
            anyhow::ensure!(r.path == path, "a call went {}, not {path}", r.path);
            // The node's share: waiting for a worker, then running.
            let at_node = Duration::from_micros(r.meta.queue_us + r.meta.compute_us);
            Ok::<_, anyhow::Error>((took, at_node))
        }
    };
    for _ in 0..10 {
        call(client.caller()?).await?;
    }
    let started = tokio::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let caller = client.caller()?;
        let n = calls / concurrency + usize::from(w < calls % concurrency);
        let call = call.clone();
        set.spawn(async move {
            let mut lat = Vec::with_capacity(n);
            for _ in 0..n {
                lat.push(call(caller.clone()).await?);
            }
            Ok::<_, anyhow::Error>(lat)
        });
    }
    let mut lat = Vec::with_capacity(calls);
    while let Some(r) = set.join_next().await {
        lat.extend(r??);
    }
    Ok((lat, started.elapsed()))
}

/// The coordinator's `[relay] circuit_rate_per_ip`, read from config-file text as
/// `skein coordinator --config` reads it, is what its relay enforces: with two circuits per IP
/// address, two callers on loopback reach a peer through the coordinator's relay and the third
/// is refused at once (libp2p's default would allow 60).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinators_relay_enforces_the_circuit_rate_of_its_config_file() -> anyhow::Result<()>
{
    use skein_peer::{Keypair, Multiaddr, Path, Peer, PeerConfig};
    let file: skein_coordinator::CoordinatorConfig =
        toml::from_str("[relay]\ncircuit_rate_per_ip = { burst = 2, every_ms = 3600000 }\n")?;
    let mesh = TestMesh::start_with(0, |c| c.relay = file.relay.clone(), |_| {}).await?;
    let relays: Vec<Multiaddr> = mesh
        .coordinator()
        .relay_addrs()
        .iter()
        .filter(|a| a.contains("/quic-v1/"))
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(!relays.is_empty(), "the coordinator runs no QUIC relay");
    let quic: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse()?;
    let start = |seed: u8, relays: Vec<Multiaddr>| {
        let config = PeerConfig {
            listen: vec![quic.clone()],
            relays,
            ..PeerConfig::default()
        };
        async move {
            Peer::start(Keypair::ed25519_from_bytes([seed; 32])?, config)
                .await
                .map_err(anyhow::Error::from)
        }
    };
    // A peer behind the relay (its inbound streams are never read: opening one is enough).
    let (behind, _inbound) = start(61, relays).await?;
    let circuit = wait_for(
        "a reservation on the coordinator's relay",
        Duration::from_secs(20),
        || {
            let relayed = behind.status().relayed.first().cloned();
            async move { relayed }
        },
    )
    .await?;
    let t = Duration::from_secs(20);
    for seed in [62, 63] {
        let (caller, _) = start(seed, Vec::new()).await?;
        let (_stream, path) = caller
            .open(behind.peer_id(), vec![circuit.clone()], t)
            .await
            .with_context(|| format!("caller {seed}: a circuit within the rate"))?;
        assert_eq!(path, Path::Relayed);
    }
    let (third, _) = start(64, Vec::new()).await?;
    let refused = third.open(behind.peer_id(), vec![circuit], t).await;
    assert!(
        matches!(refused, Err(skein_peer::PeerError::Dial(..))),
        "a third circuit from 127.0.0.1: {:?}",
        refused.map(|(_, p)| p)
    );
    Ok(())
}

/// Where a benchmark row's resources went: CPU seconds of the node process and of this test
/// process (the coordinator, its relay, the caller and the delay lines), and UDP datagrams the
/// kernel dropped for a full receive buffer in the node's and the caller's namespaces.
struct Usage {
    node_cpu: f64,
    own_cpu: f64,
    node_rcvbuf: u64,
    client_rcvbuf: u64,
}

impl Usage {
    fn now(node_pid: u32, node_ns: &str, client_ns: &str) -> anyhow::Result<Usage> {
        Ok(Usage {
            node_cpu: cpu_seconds(&node_pid.to_string())?,
            own_cpu: cpu_seconds("self")?,
            node_rcvbuf: udp_rcvbuf_errors(node_ns)?,
            client_rcvbuf: udp_rcvbuf_errors(client_ns)?,
        })
    }

    /// What was used since `before`, per call.
    fn since(&self, before: &Usage, calls: usize) -> String {
        let per = |a: f64, b: f64| (a - b) * 1e3 / calls.max(1) as f64;
        format!(
            "CPU per call: node {:.2} ms, test process {:.2} ms; UDP receive-buffer drops: node {}, caller {}",
            per(self.node_cpu, before.node_cpu),
            per(self.own_cpu, before.own_cpu),
            self.node_rcvbuf - before.node_rcvbuf,
            self.client_rcvbuf - before.client_rcvbuf,
        )
    }
}

/// User plus system CPU seconds of process `pid` (a number or `self`).
fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from its closing parenthesis:
    // utime and stime are the 14th and 15th fields of the line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    anyhow::ensure!(f.len() > 13, "/proc/{pid}/stat: {stat}");
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf reads a constant of the C library.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// `RcvbufErrors` of the `Udp:` counters in network namespace `ns`.
fn udp_rcvbuf_errors(ns: &str) -> anyhow::Result<u64> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap_or(""), udp.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no Udp RcvbufErrors in {ns}'s /proc/net/snmp"))
}

/// A markdown row: path, concurrency, p50, p99, throughput, and the p50 of the node's share
/// (its queue and compute time, from each answer's metadata).
fn bench_row(
    path: &str,
    concurrency: usize,
    (calls, wall): &(Vec<(Duration, Duration)>, Duration),
) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let lat: Vec<Duration> = calls.iter().map(|c| c.0).collect();
    let at_node: Vec<Duration> = calls.iter().map(|c| c.1).collect();
    format!(
        "| {path} | {concurrency} | {:.1} | {:.1} | {:.0} | {:.1} |",
        ms(skein_tests::quantile(&lat, 0.5)),
        ms(skein_tests::quantile(&lat, 0.99)),
        lat.len() as f64 / wall.as_secs_f64(),
        ms(skein_tests::quantile(&at_node, 0.5)),
    )
}

/// The benchmark's delay line (`skein_tests::delay`): a UDP round trip through a link delayed
/// by 5 ms each way takes at least 10 ms, every datagram comes back, in order; once the line
/// is dropped the same round trip is fast again (nothing left queued).
#[test]
#[allow(clippy::disallowed_types)] // sync code, the real clock
fn a_delay_line_delays_each_direction_of_a_link() -> anyhow::Result<()> {
    if !NetNs::required() || !skein_tests::delay::required() {
        return Ok(());
    }
    let ns = NetNs::create(20)?;
    // A UDP echo inside the namespace (a thread that entered it).
    let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
    let (name, ns_ip) = (ns.name.clone(), ns.ns_ip);
    std::thread::spawn(move || -> anyhow::Result<()> {
        skein_tests::nat::enter_netns(&name)?;
        let s = std::net::UdpSocket::bind((ns_ip, 0))?;
        let _ = ready_tx.send(s.local_addr()?);
        let mut buf = [0u8; 64];
        loop {
            let (n, from) = s.recv_from(&mut buf)?;
            if &buf[..n] == b"end" {
                return Ok(());
            }
            s.send_to(&buf[..n], from)?;
        }
    });
    let echo = ready.recv().context("the echo thread")?;
    let s = std::net::UdpSocket::bind((ns.host_ip, 0))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let round_trip = |i: u8| -> anyhow::Result<Duration> {
        let start = std::time::Instant::now();
        s.send_to(&[i], echo)?;
        let mut buf = [0u8; 8];
        let (n, _) = s.recv_from(&mut buf).context("no echo within 5 s")?;
        anyhow::ensure!(n == 1 && buf[0] == i, "echo {:?} for {i}", &buf[..n]);
        Ok(start.elapsed())
    };
    let plain = round_trip(0)?;
    let line =
        skein_tests::delay::DelayLine::start(&ns.name, ns.ns_if(), Duration::from_millis(5))?;
    let mut delayed = Vec::new();
    for i in 1..=20 {
        delayed.push(round_trip(i)?);
    }
    // Five datagrams in flight at once come back in the order sent.
    for i in 100..105u8 {
        s.send_to(&[i], echo)?;
    }
    for i in 100..105u8 {
        let mut buf = [0u8; 8];
        let (n, _) = s.recv_from(&mut buf).context("no echo within 5 s")?;
        assert_eq!(&buf[..n], &[i], "echoes in order");
    }
    assert_eq!(line.dropped()?, 0, "packets dropped by the line");
    let passed = line.finish()?;
    let after = round_trip(200)?;
    let min = delayed.iter().min().copied().unwrap_or_default();
    eprintln!(
        "round trips: {plain:?} plain, {min:?}..{:?} delayed, {after:?} after; {passed} packets passed",
        delayed.iter().max()
    );
    assert!(
        min >= Duration::from_millis(10),
        "a delayed round trip took {min:?}"
    );
    assert!(
        passed >= 50,
        "{passed} packets through the line (50 sent or echoed)"
    );
    assert!(
        after < Duration::from_millis(10),
        "after the line: {after:?}"
    );
    s.send_to(b"end", echo)?;
    Ok(())
}
