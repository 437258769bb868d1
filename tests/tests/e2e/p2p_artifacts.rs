//! Peer-to-peer artifacts (issue 20) with the real `skein-node` binary on loopback: a model
//! pre-warmed on three nodes moves over the coordinator's link once; a node whose cached copy
//! is corrupt is caught at its first chunk and banned; `--peer-upload-limit` caps what a node
//! serves, and a request without a grant is refused.

use anyhow::Context;
use skein_proto::{ChunkRequest, ChunkResponse, ErrorCode, SettingsPatch};
use skein_tests::{case, check, model_bytes, wait_for, RealNode, TestMesh};
use std::time::Duration;

const MODEL: &str = "ppocr_det";

/// Start `skein-node --config <node i's config> ARGS`, with a metrics endpoint on `:0`; returns
/// once it logs `node serving`.
async fn spawn_node(mesh: &TestMesh, i: usize, args: &[&str]) -> anyhow::Result<RealNode> {
    let mut cfg = mesh.node_config(i);
    cfg.metrics_listen = Some("127.0.0.1:0".parse()?);
    RealNode::spawn_in(None, &cfg, args).await
}

/// The node's metric `name` whose labels include `label` (`""`: its one series).
async fn metric(node: &RealNode, name: &str, label: &str) -> anyhow::Result<u64> {
    skein_tests::node_metric(node.metrics, name, label)
        .await
        .map(|v| v as u64)
        .with_context(|| format!("{name}{{{label}}} in the metrics of {}", node.node_id))
}

async fn fetched(node: &RealNode, source: &str) -> anyhow::Result<u64> {
    metric(
        node,
        "skein_node_artifact_fetched_bytes_total",
        &format!("source=\"{source}\""),
    )
    .await
}

/// Whether `node` holds `sha256` complete in its cache, and it hashes to its name.
fn holds_verified(node: &RealNode, sha256: &str) -> bool {
    std::fs::read(node.cache.join(sha256))
        .is_ok_and(|b| skein_coordinator::artifacts::sha256_hex(&b) == sha256)
}

/// Wait until `model` is loaded on exactly the nodes `ids` (at least).
async fn wait_loaded_on(mesh: &TestMesh, ids: &[&str]) -> anyhow::Result<()> {
    wait_for(
        &format!("{MODEL} loaded on {ids:?}"),
        Duration::from_secs(120),
        || async {
            let models = mesh.client.models().await.ok()?;
            let m = models.iter().find(|m| m.name == MODEL)?;
            ids.iter()
                .all(|id| m.loaded_on.iter().any(|n| n == id))
                .then_some(())
        },
    )
    .await
}

async fn scale_to(mesh: &TestMesh, replicas: u32) -> anyhow::Result<()> {
    mesh.client
        .scale(
            MODEL,
            None,
            SettingsPatch {
                min_replicas: Some(replicas),
                ..Default::default()
            },
        )
        .await?;
    Ok(())
}

/// `skein deploy` (the real CLI) of the model, provisioned on `replicas` nodes.
fn skein_deploy(mesh: &TestMesh, replicas: u32) -> anyhow::Result<String> {
    let profile = mesh.dir.path().join("cli-profile.toml");
    mesh.profile.save(&profile)?;
    let file = skein_tests::models_dir().join(MODEL).join("model.onnx");
    let out = std::process::Command::new(skein_tests::workspace_exe("skein")?)
        .arg("--profile")
        .arg(&profile)
        .arg("deploy")
        .arg(&file)
        .args(["--name", MODEL, "--min-replicas", &replicas.to_string()])
        .args(["--output", "json"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "skein deploy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(skein_coordinator::artifacts::sha256_hex(&model_bytes(
        MODEL,
    )))
}

/// Three nodes, a model provisioned on all three: the coordinator sends it about once (to the
/// first node, which the coordinator lets pre-warm alone while nobody holds the artifact);
/// the other two fetch most of its bytes from peers, and all three load the verified artifact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_prewarmed_on_three_nodes_crosses_the_coordinator_link_once() -> anyhow::Result<()>
{
    let mesh = TestMesh::start(0).await?;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(spawn_node(&mesh, i, &[]).await?);
    }
    let size = model_bytes(MODEL).len() as u64;
    let sha = skein_deploy(&mesh, 3)?;
    let ids: Vec<&str> = nodes.iter().map(|n| n.node_id.as_str()).collect();
    wait_loaded_on(&mesh, &ids).await?;

    let sent = mesh.coordinator().artifact_bytes_sent();
    let mut from_coordinator = Vec::new();
    let mut from_peers = Vec::new();
    for n in &nodes {
        assert!(
            holds_verified(n, &sha),
            "{} holds the verified artifact",
            n.node_id
        );
        from_coordinator.push(fetched(n, "coordinator").await?);
        from_peers.push(fetched(n, "peer").await?);
    }
    eprintln!(
        "{size}-byte model: coordinator sent {sent}; by node from the coordinator \
         {from_coordinator:?}, from peers {from_peers:?}"
    );
    // Every node fetched the whole artifact, from one source or the other.
    for (c, p) in from_coordinator.iter().zip(&from_peers) {
        assert_eq!(c + p, size);
    }
    // The coordinator sent about one copy (not three); two nodes got most bytes from peers.
    assert!(
        sent < size * 3 / 2,
        "coordinator sent {sent} of a {size}-byte model"
    );
    assert_eq!(from_coordinator.iter().sum::<u64>(), sent);
    let mostly_from_peers = from_peers.iter().filter(|&&p| p > size / 2).count();
    assert_eq!(mostly_from_peers, 2, "from peers: {from_peers:?}");
    let served: u64 = {
        let mut s = 0;
        for n in &nodes {
            s += metric(n, "skein_node_artifact_served_bytes_total", "").await?;
        }
        s
    };
    assert_eq!(served, from_peers.iter().sum::<u64>());

    // The mesh answers the reference case (every node holds the same verified artifact).
    let c = case(MODEL, "single_256");
    for _ in 0..3 {
        let r = mesh.client.infer(MODEL, c.inputs.clone()).await?;
        check(&r.outputs, &c);
    }
    Ok(())
}

/// A node whose cached copy was corrupted on disk after it was verified (a failing disk: it
/// still lists the artifact as held and serves it): the next node to fetch it catches its
/// first chunk, bans it and fetches everything from the coordinator; nothing corrupt is stored
/// or loaded. A real node rather than a stand-in, so the serving path is the one users run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_serving_corrupt_chunks_is_banned_at_its_first_and_the_load_succeeds(
) -> anyhow::Result<()> {
    let mesh = TestMesh::start(0).await?;
    let bad = spawn_node(&mesh, 0, &[]).await?;
    let sha = skein_deploy(&mesh, 1)?;
    wait_loaded_on(&mesh, &[&bad.node_id]).await?;
    // Corrupt every chunk of its cached copy (a byte in each MiB), same length.
    let path = bad.cache.join(&sha);
    let mut bytes = std::fs::read(&path)?;
    let size = bytes.len() as u64;
    for at in (100..bytes.len()).step_by(1 << 20) {
        bytes[at] ^= 0x5a;
    }
    std::fs::write(&path, &bytes)?;

    let good = spawn_node(&mesh, 1, &[]).await?;
    let sent_before = mesh.coordinator().artifact_bytes_sent();
    scale_to(&mesh, 2).await?;
    wait_loaded_on(&mesh, &[&bad.node_id, &good.node_id]).await?;

    let served_chunks = metric(&bad, "skein_node_artifact_served_chunks_total", "").await?;
    let bad_chunks = metric(&good, "skein_node_artifact_bad_chunks_total", "").await?;
    let bans = metric(&good, "skein_node_artifact_source_bans_total", "").await?;
    eprintln!("bad peer served {served_chunks} chunks; {bad_chunks} bad chunks seen, {bans} bans");
    // Caught at its first chunk (two may be in flight at once), banned, never asked again.
    assert!((1..=2).contains(&served_chunks), "{served_chunks}");
    assert_eq!(bad_chunks, served_chunks);
    assert_eq!(bans, 1);
    // Everything came from the coordinator; the stored copy verifies.
    assert_eq!(fetched(&good, "peer").await?, 0);
    assert_eq!(fetched(&good, "coordinator").await?, size);
    assert_eq!(mesh.coordinator().artifact_bytes_sent() - sent_before, size);
    assert!(holds_verified(&good, &sha));
    let c = case(MODEL, "single_256");
    let r = mesh.client.infer(MODEL, c.inputs.clone()).await?;
    check(&r.outputs, &c);
    Ok(())
}

/// `--peer-upload-limit 1` (MB/s): a node fetching the model from it takes at least as long as
/// the cap allows (the bytes served over the time taken stay within it, with a generous
/// margin; uncapped on loopback it takes well under a second). A peer without a grant from
/// the coordinator is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_limit_caps_serving_and_a_request_without_a_grant_is_refused(
) -> anyhow::Result<()> {
    const LIMIT: f64 = 1e6;
    let mesh = TestMesh::start(0).await?;
    let capped = spawn_node(&mesh, 0, &["--peer-upload-limit", "1"]).await?;
    let sha = skein_deploy(&mesh, 1)?;
    wait_loaded_on(&mesh, &[&capped.node_id]).await?;

    // A peer of the mesh's peer layer, but no mesh member: no grant.
    let route = mesh
        .client
        .nodes()
        .await?
        .into_iter()
        .find(|n| n.node_id == capped.node_id)
        .and_then(|n| n.peer)
        .context("the node's peer report")?;
    let (stranger, _inbound) = skein_peer::Peer::start(
        skein_peer::Keypair::generate_ed25519(),
        skein_peer::PeerConfig {
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?],
            ..Default::default()
        },
    )
    .await?;
    let addrs = route.listen.iter().filter_map(|a| a.parse().ok()).collect();
    let (mut stream, _) = stranger
        .open_protocol(
            route.binding.peer_id.parse()?,
            addrs,
            skein_peer::artifact::PROTOCOL,
            Duration::from_secs(10),
        )
        .await?;
    let req = ChunkRequest {
        sha256: sha.clone(),
        offset: 0,
        len: 1 << 20,
        grant: Default::default(),
        manifest: false,
    };
    skein_peer::codec::write_frame(&mut stream, &req, &[], 1 << 16).await?;
    let frame = skein_peer::codec::read_frame(&mut stream, 1 << 16).await?;
    match frame.header::<ChunkResponse>()? {
        ChunkResponse::Err(e) => {
            assert_eq!(e.code, ErrorCode::Forbidden, "{e:?}");
            assert!(e.message.contains("grant"), "{}", e.message);
        }
        other => panic!("served without a grant: {other:?}"),
    }
    assert!(frame.payload().is_empty());
    assert_eq!(
        metric(&capped, "skein_node_artifact_refused_total", "").await?,
        1
    );
    stranger.shutdown().await;

    // A second node fetches the model from the capped one.
    let other = spawn_node(&mesh, 1, &[]).await?;
    let started = tokio::time::Instant::now();
    scale_to(&mesh, 2).await?;
    wait_loaded_on(&mesh, &[&capped.node_id, &other.node_id]).await?;
    let took = started.elapsed().as_secs_f64();
    let served = metric(&capped, "skein_node_artifact_served_bytes_total", "").await?;
    eprintln!(
        "served {served} bytes in at most {took:.2} s ({:.2} MB/s over that span; cap 1 MB/s)",
        served as f64 / took / 1e6
    );
    assert!(
        served > (2 << 20),
        "most of the model came from the capped peer: {served}"
    );
    // The bucket's burst (1 MB) goes at once; the rest at the cap at most. 20% margin.
    let least = (served as f64 - LIMIT) / LIMIT * 0.8;
    assert!(
        took >= least,
        "{served} bytes served in {took:.2} s: more than 1 MB/s (at least {least:.2} s expected)"
    );
    assert!(holds_verified(&other, &sha));
    Ok(())
}
