//! The GPU backend in a mesh (burn on wgpu; lavapipe where there is no GPU): a model that
//! requires a GPU is served by the wgpu node only, and fails clearly, never on a CPU, once that
//! node is gone; a model the GPU backend cannot run falls back to tract on the same node.
//!
//! Without a Vulkan adapter these tests skip, unless `SKEIN_EXPECT_GPU` is set (as `.ci/run`
//! does): then they fail.

use skein_node::backend::BackendChoice;
use skein_node::Node;
use skein_proto::{Accelerator, DeploymentSettings, ErrorCode, NodeHealth};
use skein_tests::{case, check, model_bytes, wait_for, TestMesh};
use std::time::Duration;

fn have_vulkan() -> bool {
    match skein_onnx::skein_gpu::default_device("wgpu") {
        Ok(_) => true,
        Err(e) if std::env::var_os("SKEIN_EXPECT_GPU").is_some() => {
            panic!("SKEIN_EXPECT_GPU is set but: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

/// A mesh with node 0 on wgpu and node 1 on tract.
async fn mixed_mesh() -> anyhow::Result<TestMesh> {
    let mut mesh = TestMesh::start(0).await?;
    let mut gpu = mesh.node_config(0);
    gpu.backend = BackendChoice::Wgpu;
    mesh.nodes.push(Some(Node::start(gpu).await?));
    let cpu = mesh.node_config(1);
    mesh.nodes.push(Some(Node::start(cpu).await?));
    Ok(mesh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_required_model_is_served_on_the_wgpu_node_only() -> anyhow::Result<()> {
    if !have_vulkan() {
        return Ok(());
    }
    let mut mesh = mixed_mesh().await?;
    let gpu = mesh.nodes[0].as_ref().expect("node").node_id().to_string();
    let cpu = mesh.nodes[1].as_ref().expect("node").node_id().to_string();

    // Both nodes tell what they run on; `skein nodes` shows it.
    let nodes = mesh.client.nodes().await?;
    let g = nodes.iter().find(|n| n.node_id == gpu).expect("gpu node");
    assert_eq!(g.capacity.backends, vec!["burn-wgpu".to_string()]);
    assert!(g.capacity.accelerators.iter().any(|a| a.in_use), "{g:?}");
    assert_eq!(g.labels.get("accelerator").map(String::as_str), Some("gpu"));
    let c = nodes.iter().find(|n| n.node_id == cpu).expect("cpu node");
    assert_eq!(c.capacity.backends, vec!["tract-cpu".to_string()]);
    assert!(!c.labels.contains_key("accelerator"));

    let settings = DeploymentSettings {
        accelerator: Accelerator::Gpu,
        ..Default::default()
    };
    mesh.deploy_with("ppocr_cls", settings).await?;
    for name in ["single", "batch4"] {
        let c = case("ppocr_cls", name);
        for _ in 0..3 {
            let r = mesh.client.infer("ppocr_cls", c.inputs.clone()).await?;
            check(&r.outputs, &c);
            assert_eq!(r.meta.node, gpu, "a GPU-required model ran on the CPU node");
        }
    }
    let route = mesh.client.resolve("ppocr_cls", None).await?;
    assert!(route.candidates.iter().all(|c| c.node_id == gpu));
    // The detector too (Resize, ConvTranspose, Sigmoid), through the mesh.
    mesh.deploy_with(
        "ppocr_det",
        DeploymentSettings {
            accelerator: Accelerator::Gpu,
            ..Default::default()
        },
    )
    .await?;
    let det = case("ppocr_det", "single_256");
    let r = mesh.client.infer("ppocr_det", det.inputs.clone()).await?;
    check(&r.outputs, &det);
    assert_eq!(r.meta.node, gpu);

    // The wgpu node dies: a clear error, not a CPU run.
    mesh.nodes[0].take().expect("node").kill();
    wait_for("the wgpu node dead", Duration::from_secs(10), || async {
        let nodes = mesh.client.nodes().await.ok()?;
        nodes
            .iter()
            .any(|n| n.node_id == gpu && n.health == NodeHealth::Dead)
            .then_some(())
    })
    .await?;
    let single = case("ppocr_cls", "single");
    let err = mesh
        .client
        .infer("ppocr_cls", single.inputs.clone())
        .await
        .expect_err("no GPU node is left");
    assert_eq!(err.code(), Some(ErrorCode::NoCapacity), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("no capable node") && msg.contains("GPU"),
        "{msg}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_gpu_uses_the_gpu_node_and_falls_back_to_cpu_without_it() -> anyhow::Result<()> {
    if !have_vulkan() {
        return Ok(());
    }
    let mut mesh = mixed_mesh().await?;
    let gpu = mesh.nodes[0].as_ref().expect("node").node_id().to_string();
    let cpu = mesh.nodes[1].as_ref().expect("node").node_id().to_string();
    let settings = DeploymentSettings {
        accelerator: Accelerator::PreferGpu,
        ..Default::default()
    };
    mesh.deploy_with("ppocr_cls", settings).await?;
    let single = case("ppocr_cls", "single");
    for _ in 0..3 {
        let r = mesh
            .client
            .infer("ppocr_cls", single.inputs.clone())
            .await?;
        check(&r.outputs, &single);
        assert_eq!(r.meta.node, gpu);
    }
    mesh.nodes[0].take().expect("node").kill();
    let r = wait_for("the CPU node serves", Duration::from_secs(15), || async {
        mesh.client
            .infer("ppocr_cls", single.inputs.clone())
            .await
            .ok()
            .filter(|r| r.meta.node == cpu)
    })
    .await?;
    check(&r.outputs, &single);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_the_gpu_backend_cannot_run_falls_back_to_tract_on_that_node() -> anyhow::Result<()>
{
    if !have_vulkan() {
        return Ok(());
    }
    let mut mesh = TestMesh::start(0).await?;
    let mut cfg = mesh.node_config(0);
    cfg.backend = BackendChoice::Wgpu;
    mesh.nodes.push(Some(Node::start(cfg).await?));
    // silero_vad has operators the interpreter lacks (If, LSTM-like loops).
    mesh.deploy("silero_vad").await?;
    let c = case("silero_vad", "stream_step0");
    let r = mesh.client.infer("silero_vad", c.inputs.clone()).await?;
    check(&r.outputs, &c);
    // Required on a GPU, it is refused at deploy, with the operators named.
    let settings = DeploymentSettings {
        accelerator: Accelerator::Gpu,
        ..Default::default()
    };
    let err = mesh
        .client
        .deploy_with(
            "vad_on_gpu",
            None,
            &model_bytes("silero_vad"),
            settings,
            |_| {},
        )
        .await
        .expect_err("the GPU backend cannot run silero_vad");
    assert_eq!(err.code(), Some(ErrorCode::UnsupportedOperator), "{err}");
    assert!(err.to_string().contains("GPU backend"), "{err}");
    assert!(err.to_string().contains("If"), "{err}");
    Ok(())
}
