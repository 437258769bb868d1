//! Failures a mesh must survive: a node dying, the coordinator restarting (models, artifacts,
//! join tokens and node revocations survive it).

use skein_node::Node;
use skein_proto::{AdminRequest, AdminResponse, ErrorCode, NodeHealth, Tensor};
use skein_tests::{models_dir, wait_for, TestMesh};
use std::time::Duration;

fn cls_input() -> Tensor {
    let bytes =
        std::fs::read(models_dir().join("ppocr_cls/cases/single/input_0.npy")).expect("case input");
    skein_proto::npy::decode("x", &bytes).expect("npy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_is_marked_dead_and_the_model_is_still_served() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start(2).await?;
    mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 2).await?;
    let first = mesh.client.infer("ppocr_cls", vec![cls_input()]).await?;

    // Kill the node that just served; the client's cached route still points at it.
    let idx = mesh
        .nodes
        .iter()
        .position(|n| n.as_ref().is_some_and(|n| n.node_id() == first.meta.node))
        .expect("serving node is ours");
    let victim = mesh.nodes[idx].take().expect("node running");
    let victim_id = victim.node_id().to_string();
    victim.kill();

    // Served by the survivor, through failover, without an error reaching the caller.
    for _ in 0..5 {
        let r = mesh.client.infer("ppocr_cls", vec![cls_input()]).await?;
        assert_ne!(r.meta.node, victim_id);
    }
    // The coordinator marks the silent node dead and stops routing to it.
    let client = mesh.client.clone();
    let vid = victim_id.clone();
    wait_for(
        "the killed node to be marked dead",
        Duration::from_secs(10),
        || {
            let (client, vid) = (client.clone(), vid.clone());
            async move {
                let nodes = client.nodes().await.ok()?;
                nodes
                    .iter()
                    .any(|n| n.node_id == vid && n.health == NodeHealth::Dead)
                    .then_some(())
            }
        },
    )
    .await?;
    let r = mesh.client.resolve("ppocr_cls", None).await?;
    assert!(r.candidates.iter().all(|c| c.node_id != victim_id));
    assert_eq!(r.candidates.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restart_keeps_registry_and_artifacts() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start(1).await?;
    let deployed = mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    // A join token minted before the restart still admits a node after it.
    let token = mesh.coordinator().mint_join_token(None)?;

    let addr = mesh.stop_coordinator().await;
    mesh.restart_coordinator(addr).await?;

    // The registry survived: same model, version and content hash.
    let client = mesh.client.clone();
    let models = wait_for("the client to reconnect", Duration::from_secs(10), || {
        let client = client.clone();
        async move { client.models().await.ok() }
    })
    .await?;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].sha256, deployed.sha256);
    assert_eq!(models[0].version, deployed.version);
    assert_eq!(models[0].inputs, deployed.inputs);

    // The artifact survived: a brand-new node joins, fetches it from the coordinator, serves it.
    let mut cfg = mesh.node_config(7);
    cfg.join_token = Some(token);
    let fresh = Node::start(cfg).await?;
    let fresh_id = fresh.node_id().to_string();
    // The old node re-registers by heartbeating with its stored certificate; provisioning two
    // warm replicas (a live `scale`) makes the fresh node fetch and load the artifact.
    let patch = skein_proto::SettingsPatch {
        min_replicas: Some(2),
        ..Default::default()
    };
    let scaled = mesh.client.scale("ppocr_cls", None, patch).await?;
    assert_eq!(scaled.settings.min_replicas, 2);
    mesh.wait_loaded("ppocr_cls", 2).await?;
    let r = mesh.client.resolve("ppocr_cls", None).await?;
    assert!(r.candidates.iter().any(|c| c.node_id == fresh_id));
    let out = mesh.client.infer("ppocr_cls", vec![cls_input()]).await?;
    assert_eq!(out.outputs[0].shape(), &[1, 2]);
    mesh.nodes.push(Some(fresh));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_keeps_its_identity_across_restarts() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start(1).await?;
    let node = mesh.nodes[0].take().expect("running");
    let id = node.node_id().to_string();
    node.shutdown().await;
    // Restart without a join token: the stored key and certificate are enough.
    let mut cfg = mesh.node_config(0);
    cfg.join_token = None;
    let again = Node::start(cfg).await?;
    assert_eq!(again.node_id(), id);
    mesh.nodes[0] = Some(again);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_and_revocations_survive_a_coordinator_restart() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start(2).await?;
    let victim = mesh.nodes[1].as_ref().map(|n| n.node_id().to_string());
    let victim = victim.unwrap_or_default();
    match mesh
        .client
        .admin(AdminRequest::RevokeNode {
            node_id: victim.clone(),
        })
        .await?
    {
        AdminResponse::Done => {}
        other => anyhow::bail!("{other:?}"),
    }
    if let Some(n) = mesh.nodes[1].take() {
        n.shutdown().await;
    }
    // A single-use token spent before the restart, and one minted and left unused.
    let spent = mesh.coordinator().mint_join_token(None)?;
    let mut cfg = mesh.node_config(2);
    cfg.join_token = Some(spent.clone());
    mesh.nodes.push(Some(Node::start(cfg).await?));
    let unused = mesh.coordinator().mint_join_token(None)?;

    let addr = mesh.stop_coordinator().await;
    mesh.restart_coordinator(addr).await?;

    // The revoked identity is still refused: its stored certificate no longer works.
    let mut again = mesh.node_config(1);
    again.join_token = None;
    let e = Node::start(again).await.expect_err("revoked identity");
    assert_eq!(
        skein_tests::wire_error(&e).map(|w| w.code),
        Some(ErrorCode::Forbidden),
        "{e:#}"
    );
    // The spent token stays spent.
    let mut cfg = mesh.node_config(3);
    cfg.join_token = Some(spent);
    let e = Node::start(cfg).await.expect_err("spent token");
    assert_eq!(
        skein_tests::wire_error(&e).map(|w| w.code),
        Some(ErrorCode::InvalidJoinToken),
        "{e:#}"
    );
    // The unused one admits one node.
    let mut cfg = mesh.node_config(4);
    cfg.join_token = Some(unused);
    let admitted = Node::start(cfg).await?;
    assert_ne!(admitted.node_id(), victim);
    mesh.nodes.push(Some(admitted));
    // The mesh lists every node but the revoked one once they heartbeat again.
    let client = mesh.client.clone();
    let listed = wait_for("three live nodes", Duration::from_secs(20), || {
        let client = client.clone();
        async move {
            let nodes = client.nodes().await.ok()?;
            (nodes.len() == 3).then_some(nodes)
        }
    })
    .await?;
    assert!(listed.iter().all(|n| n.node_id != victim));
    Ok(())
}
