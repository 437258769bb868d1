//! Placement constraints (data residency, device class): a model restricted to a region is
//! held and served only by nodes labelled with that region, also under failover, and a node
//! outside the region refuses it even when addressed directly.

use skein_node::Node;
use skein_proto::{DeploymentSettings, ErrorCode, NodeHealth};
use skein_tests::{case, check, wait_for, TestMesh};
use std::time::Duration;

/// Send one inference request straight to a node (no routing), returning its error.
async fn direct_call(
    mesh: &TestMesh,
    node_id: &str,
    addr: std::net::SocketAddr,
    inputs: &[skein_proto::Tensor],
) -> anyhow::Result<skein_proto::WireError> {
    use skein_net::endpoint::{client_config, connect, TransportLimits};
    let limits = TransportLimits::default();
    let cfg = client_config(
        &mesh.profile.credentials(),
        skein_proto::ALPN_INFER,
        &limits,
    )?;
    let endpoint = skein_net::client_endpoint("127.0.0.1:0".parse()?)?;
    let name = skein_net::node_server_name(node_id);
    let conn = connect(&endpoint, cfg, addr, &name, Duration::from_secs(5)).await?;
    let req = skein_proto::InferRequest {
        id: 1,
        model: "ppocr_cls".into(),
        version: None,
        inputs: inputs.iter().map(|t| t.descriptor()).collect(),
        outputs: vec![],
        timeout_ms: Some(10_000),
        // A genuine ticket: the node must refuse on placement alone.
        ticket: mesh.client.resolve("ppocr_cls", None).await?.ticket,
        trace: None,
        kind: skein_proto::RequestKind::Infer,
    };
    let parts: Vec<skein_proto::Bytes> = inputs.iter().map(|t| t.bytes().clone()).collect();
    let frame = skein_net::stream::call(&conn, &req, &parts, limits.max_frame_len).await?;
    match frame.header::<skein_proto::InferResponse>()? {
        skein_proto::InferResponse::Err(e) => Ok(e),
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }
}

async fn mesh_with_regions(regions: &[&str]) -> anyhow::Result<TestMesh> {
    let mut mesh = TestMesh::start(0).await?;
    for (i, region) in regions.iter().enumerate() {
        let mut cfg = mesh.node_config(i);
        cfg.labels.insert("region".into(), region.to_string());
        mesh.nodes.push(Some(Node::start(cfg).await?));
    }
    Ok(mesh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_restricted_model_is_never_served_elsewhere_even_when_its_node_dies(
) -> anyhow::Result<()> {
    let mut mesh = mesh_with_regions(&["eu", "eu", "us"]).await?;
    let us = mesh.nodes[2].as_ref().expect("node").node_id().to_string();
    let settings = DeploymentSettings {
        regions: vec!["us".into()],
        ..Default::default()
    };
    mesh.deploy_with("ppocr_cls", settings).await?;
    let single = case("ppocr_cls", "single");
    for _ in 0..30 {
        let r = mesh
            .client
            .infer("ppocr_cls", single.inputs.clone())
            .await?;
        check(&r.outputs, &single);
        assert_eq!(r.meta.node, us, "served outside region us");
    }
    // The coordinator offers only the us node.
    let route = mesh.client.resolve("ppocr_cls", None).await?;
    assert!(route.candidates.iter().all(|c| c.node_id == us));
    // An eu node addressed directly refuses it.
    let eu = mesh.nodes[0].as_ref().expect("node");
    let e = direct_call(&mesh, eu.node_id(), eu.addr(), &single.inputs).await?;
    assert_eq!(e.code, ErrorCode::NoCapacity, "{e}");
    assert!(e.message.contains("a region in [us]"), "{e}");

    // The only us node dies: calls fail clearly instead of going to eu.
    mesh.nodes[2].take().expect("node").kill();
    wait_for("the us node dead", Duration::from_secs(10), || async {
        let nodes = mesh.client.nodes().await.ok()?;
        nodes
            .iter()
            .any(|n| n.node_id == us && n.health == NodeHealth::Dead)
            .then_some(())
    })
    .await?;
    let err = mesh
        .client
        .infer("ppocr_cls", single.inputs.clone())
        .await
        .expect_err("no node in region us is left");
    assert_eq!(err.code(), Some(ErrorCode::NoCapacity), "{err}");
    assert!(err.to_string().contains("a region in [us]"), "{err}");

    // Lifting the restriction lets the eu nodes serve it.
    let patch = skein_proto::SettingsPatch {
        regions: Some(vec![]),
        ..Default::default()
    };
    mesh.client.scale("ppocr_cls", None, patch).await?;
    let r = wait_for("an eu node serves", Duration::from_secs(10), || async {
        mesh.client
            .infer("ppocr_cls", single.inputs.clone())
            .await
            .ok()
    })
    .await?;
    check(&r.outputs, &single);
    assert_ne!(r.meta.node, us);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_constraints_are_refused_at_deploy() -> anyhow::Result<()> {
    let mesh = mesh_with_regions(&["eu"]).await?;
    let settings = DeploymentSettings {
        regions: vec!["not a label!".into()],
        ..Default::default()
    };
    let err = mesh
        .deploy_with("ppocr_cls", settings)
        .await
        .expect_err("a bad region label");
    assert!(format!("{err:#}").contains("is not a label"), "{err:#}");
    // A device class no node has: refused with the reason, never run on the CPU node.
    let settings = DeploymentSettings {
        device_class: "gpu".into(),
        ..Default::default()
    };
    mesh.deploy_with("ppocr_cls", settings).await?;
    let single = case("ppocr_cls", "single");
    let err = mesh
        .client
        .infer("ppocr_cls", single.inputs.clone())
        .await
        .expect_err("no gpu node");
    assert_eq!(err.code(), Some(ErrorCode::NoCapacity), "{err}");
    assert!(err.to_string().contains("device class `gpu`"), "{err}");
    Ok(())
}
