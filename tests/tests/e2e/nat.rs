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

/// A node behind a cone NAT (the kernel's masquerade) that no caller can reach at its address:
/// the SDK's first call goes through the coordinator's relay at once, DCUtR then makes a
/// direct connection through the NAT, and later calls take it (the path is asserted per
/// call); every answer equals the reference. Then the relay dies with the coordinator and the
/// hole-punched path keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_nat_is_called_through_the_relay_then_hole_punched() -> anyhow::Result<()> {
    use skein_client::CallPath;
    use skein_tests::nat::{NatHost, NatKind};
    if !NatHost::required() {
        return Ok(());
    }
    let nat = NatHost::create(2, NatKind::Cone)?;
    let mut mesh =
        TestMesh::start_with(0, |c| c.listen = "0.0.0.0:0".parse().expect("addr"), |_| {}).await?;
    let port = mesh.coordinator().addr().port();
    let mut config = mesh.node_config(0);
    config.coordinator = format!("{}:{port}", nat.router.host_ip);
    config.listen = "0.0.0.0:0".parse()?;
    let node = skein_tests::NodeProcess::spawn_in_named(
        Some(&nat.name),
        env!("CARGO_BIN_EXE_node-process"),
        &config,
        &[],
    )
    .await?;
    // It advertises its private address, which this side cannot reach.
    assert!(node.addr.starts_with(&nat.ip.to_string()), "{}", node.addr);

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
    let single = case("ppocr_cls", "single");

    // The first call: relayed, at once.
    let first = mesh
        .client
        .infer("ppocr_cls", single.inputs.clone())
        .await?;
    check(&first.outputs, &single);
    assert_eq!(first.meta.node, node.node_id);
    assert_eq!(first.path, CallPath::Relayed, "the first call");

    // Within a few seconds a hole-punched connection exists and calls take it.
    let mut paths = vec![first.path];
    let punched = wait_for(
        "a call on the hole-punched path",
        Duration::from_secs(20),
        || {
            let client = &mesh.client;
            let single = &single;
            let paths = &mut paths;
            async move {
                let r = client
                    .infer("ppocr_cls", single.inputs.clone())
                    .await
                    .ok()?;
                check(&r.outputs, single);
                paths.push(r.path);
                (r.path == CallPath::HolePunched).then_some(r)
            }
        },
    )
    .await?;
    assert_eq!(punched.meta.node, node.node_id);
    eprintln!("paths until hole-punched: {paths:?}");
    let (tried, made) = mesh.client.hole_punches();
    assert!(
        made >= 1 || tried >= 1,
        "hole punches: {tried} tried, {made} made"
    );
    for _ in 0..5 {
        let r = mesh
            .client
            .infer("ppocr_cls", single.inputs.clone())
            .await?;
        check(&r.outputs, &single);
        assert_eq!(r.path, CallPath::HolePunched, "a call after the hole punch");
    }

    // The relay dies with the coordinator: the hole-punched path keeps serving (the SDK keeps
    // its route while the coordinator cannot be asked).
    mesh.stop_coordinator().await;
    for _ in 0..5 {
        let r = mesh
            .client
            .infer("ppocr_cls", single.inputs.clone())
            .await?;
        check(&r.outputs, &single);
        assert_eq!(r.path, CallPath::HolePunched, "a call with the relay gone");
    }
    let by_path = mesh.client.calls_by_path();
    eprintln!("calls by path: {by_path:?}");
    drop(node);
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
            peer: Some(peer),
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
