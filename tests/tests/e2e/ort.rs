//! ONNX Runtime in a mesh: a model only ONNX Runtime runs (`ddddocr_int8`, with the contrib
//! operator `com.microsoft::DynamicQuantizeLSTM`) deploys when the mesh has an `ort` node, is
//! placed and routed there only, and once that node is gone fails with `no_capacity` naming the
//! operator, never with a tract error. A mesh without an `ort` node refuses the deploy.
//!
//! The library comes from `SKEIN_TEST_ORT_LIB` (scripts/test installs the pinned `onnxruntime`
//! wheel and sets it), `SKEIN_ORT_LIB` or `ORT_DYLIB_PATH`. Without it the ORT tests skip,
//! unless `SKEIN_EXPECT_ORT=1` (as `.ci/run` sets): then they fail.

use skein_node::backend::{BackendChoice, OrtConfig};
use skein_node::Node;
use skein_proto::{DeploymentSettings, ErrorCode, NodeHealth};
use skein_tests::{case, check, wait_for, TestMesh};
use std::path::PathBuf;
use std::time::Duration;

fn ort_lib() -> Option<PathBuf> {
    let found = ["SKEIN_TEST_ORT_LIB", "SKEIN_ORT_LIB", "ORT_DYLIB_PATH"]
        .iter()
        .find_map(|v| std::env::var_os(v).filter(|v| !v.is_empty()))
        .map(PathBuf::from);
    match found {
        Some(p) if p.is_file() => Some(p),
        other if std::env::var_os("SKEIN_EXPECT_ORT").is_some_and(|v| v == "1") => {
            panic!("SKEIN_EXPECT_ORT=1 but no ONNX Runtime library: {other:?} (set SKEIN_TEST_ORT_LIB)")
        }
        other => {
            eprintln!("skipped: no ONNX Runtime library ({other:?}); set SKEIN_TEST_ORT_LIB");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ort_only_model_is_served_by_the_ort_node_only() -> anyhow::Result<()> {
    let Some(lib) = ort_lib() else {
        return Ok(());
    };
    let mut mesh = TestMesh::start(0).await?;
    let mut cfg = mesh.node_config(0);
    cfg.backend = BackendChoice::Ort;
    cfg.ort = OrtConfig {
        lib: Some(lib),
        threads: 1,
        ..Default::default()
    };
    mesh.nodes.push(Some(Node::start(cfg).await?));
    let cfg = mesh.node_config(1);
    mesh.nodes.push(Some(Node::start(cfg).await?));
    let ort = mesh.nodes[0].as_ref().expect("node").node_id().to_string();
    let tract = mesh.nodes[1].as_ref().expect("node").node_id().to_string();

    // Each node says what it runs on (`skein nodes`).
    let nodes = mesh.client.nodes().await?;
    let o = nodes.iter().find(|n| n.node_id == ort).expect("ort node");
    assert_eq!(o.capacity.backends, vec!["ort-cpu".to_string()]);
    assert!(o.capacity.ort_version.starts_with("1."), "{o:?}");
    assert!(
        o.capacity
            .ort_providers
            .iter()
            .any(|p| p == "CPUExecutionProvider"),
        "{o:?}"
    );
    assert_eq!(o.labels.get("engine").map(String::as_str), Some("ort"));
    let t = nodes
        .iter()
        .find(|n| n.node_id == tract)
        .expect("tract node");
    assert_eq!(t.capacity.backends, vec!["tract-cpu".to_string()]);
    assert!(t.capacity.ort_version.is_empty());
    assert_eq!(t.labels.get("engine").map(String::as_str), Some("tract"));

    // Deployed with no placement setting at all: the operator check decides.
    let info = mesh
        .deploy_with(
            "ddddocr_int8",
            DeploymentSettings {
                min_replicas: 2,
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(info.settings.engines.engines, vec!["ort".to_string()]);
    assert!(info
        .settings
        .engines
        .ops
        .iter()
        .any(|o| o == "com.microsoft::DynamicQuantizeLSTM"));
    let c = case("ddddocr_int8", "captcha_a7kd3");
    for _ in 0..3 {
        let r = mesh.client.infer("ddddocr_int8", c.inputs.clone()).await?;
        assert_eq!(r.meta.node, ort, "ddddocr_int8 ran on the tract node");
        for (a, e) in r.outputs.iter().zip(&c.outputs) {
            skein_onnx::reference::compare(a, e, c.atol, c.rtol).map_err(anyhow::Error::msg)?;
        }
    }
    let route = mesh.client.resolve("ddddocr_int8", None).await?;
    assert!(!route.candidates.is_empty());
    assert!(
        route.candidates.iter().all(|c| c.node_id == ort),
        "{route:?}"
    );
    // min_replicas 2 asks for two; only the ort node may hold it.
    let models = mesh.client.models().await?;
    let m = models
        .iter()
        .find(|m| m.name == "ddddocr_int8")
        .expect("deployed");
    assert!(m.loaded_on.iter().all(|n| *n == ort), "{:?}", m.loaded_on);

    // A model both engines run goes to both, and matches its reference on each.
    mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 2).await?;
    let single = case("ppocr_cls", "single");
    let r = mesh
        .client
        .infer("ppocr_cls", single.inputs.clone())
        .await?;
    check(&r.outputs, &single);

    // The ort node dies: `no_capacity` naming the operator, not a tract error.
    mesh.nodes[0].take().expect("node").kill();
    wait_for("the ort node dead", Duration::from_secs(10), || async {
        let nodes = mesh.client.nodes().await.ok()?;
        nodes
            .iter()
            .any(|n| n.node_id == ort && n.health == NodeHealth::Dead)
            .then_some(())
    })
    .await?;
    let err = mesh
        .client
        .infer("ddddocr_int8", c.inputs.clone())
        .await
        .expect_err("no ort node is left");
    assert_eq!(err.code(), Some(ErrorCode::NoCapacity), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("com.microsoft::DynamicQuantizeLSTM") && msg.contains("ort"),
        "{msg}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_without_an_ort_node_refuses_an_ort_only_model() -> anyhow::Result<()> {
    let mesh = TestMesh::start(1).await?;
    let err = mesh
        .deploy_with("ddddocr_int8", DeploymentSettings::default())
        .await
        .expect_err("no node runs ONNX Runtime");
    let wire = skein_tests::wire_error(&err).expect("a wire error");
    assert_eq!(wire.code, ErrorCode::UnsupportedOperator, "{wire:?}");
    assert!(
        wire.message.contains("com.microsoft::DynamicQuantizeLSTM") && wire.message.contains("ort"),
        "{}",
        wire.message
    );
    Ok(())
}
