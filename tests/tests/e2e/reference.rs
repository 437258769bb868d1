//! Every reference case of the bundled models, through the mesh (SDK → coordinator resolve →
//! node over QUIC), matches onnxruntime's outputs within the tolerances of `models/README.md`.

use skein_onnx::reference;
use skein_proto::{ErrorCode, Tensor};
use skein_tests::{models_dir, TestMesh};

/// Tolerances for an engine other than onnxruntime (models/README.md).
const ATOL: f64 = 1e-3;
const RTOL: f64 = 1e-2;

async fn run_cases(mesh: &TestMesh, model: &str) -> anyhow::Result<usize> {
    let cases = reference::load_cases(&models_dir().join(model))?;
    assert!(!cases.is_empty(), "{model} has reference cases");
    let mut checked = 0;
    for case in &cases {
        let r = mesh.client.infer(model, case.inputs.clone()).await?;
        assert_eq!(r.outputs.len(), case.outputs.len(), "{model}/{}", case.name);
        for (actual, expected) in r.outputs.iter().zip(&case.outputs) {
            reference::compare(actual, expected, ATOL, RTOL)
                .map_err(|e| anyhow::anyhow!("{model}/{}: {e}", case.name))?;
        }
        assert!(!r.meta.node.is_empty());
        checked += 1;
    }
    Ok(checked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundled_models_match_their_reference_cases_through_the_mesh() -> anyhow::Result<()> {
    let mesh = TestMesh::start(2).await?;
    for m in ["ppocr_cls", "ppocr_det", "silero_vad"] {
        mesh.deploy(m).await?;
    }
    assert_eq!(run_cases(&mesh, "ppocr_cls").await?, 2);
    assert_eq!(run_cases(&mesh, "ppocr_det").await?, 2);

    // silero_vad as a stream: each step's `state` is the previous step's `stateN`.
    let dir = models_dir().join("silero_vad");
    let cases = reference::load_cases(&dir)?;
    let mut state: Option<Tensor> = None;
    for step in ["stream_step0", "stream_step1", "stream_step2"] {
        let case = cases.iter().find(|c| c.name == step).expect("case exists");
        let mut inputs = case.inputs.clone();
        if let Some(prev) = state.take() {
            let slot = inputs
                .iter_mut()
                .find(|t| t.name() == "state")
                .expect("state input");
            let mut fed = prev;
            fed.set_name("state");
            *slot = fed;
        }
        let r = mesh.client.infer("silero_vad", inputs).await?;
        for (actual, expected) in r.outputs.iter().zip(&case.outputs) {
            reference::compare(actual, expected, ATOL, RTOL)
                .map_err(|e| anyhow::anyhow!("{step}: {e}"))?;
        }
        state = r.output("stateN").cloned();
    }
    let batch = cases
        .iter()
        .find(|c| c.name == "batch2_step0")
        .expect("batch case");
    let r = mesh
        .client
        .infer("silero_vad", batch.inputs.clone())
        .await?;
    for (a, e) in r.outputs.iter().zip(&batch.outputs) {
        reference::compare(a, e, ATOL, RTOL).map_err(|e| anyhow::anyhow!("batch2_step0: {e}"))?;
    }

    // Response metadata: a warm repeat is not a cold start and reports compute time.
    let single = reference::load_cases(&models_dir().join("ppocr_cls"))?
        .into_iter()
        .find(|c| c.name == "single")
        .expect("single case");
    let r = mesh
        .client
        .infer("ppocr_cls", single.inputs.clone())
        .await?;
    let r2 = mesh
        .client
        .infer("ppocr_cls", single.inputs.clone())
        .await?;
    assert!(r.meta.compute_us > 0 && r2.meta.compute_us > 0);
    assert!(
        !r2.meta.cold_start || r2.meta.node != r.meta.node,
        "same node, same shape: warm"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onnxruntime_only_model_is_refused_naming_the_operator() -> anyhow::Result<()> {
    let mesh = TestMesh::start(1).await?;
    let e = mesh
        .deploy("ddddocr_int8")
        .await
        .expect_err("tract cannot run it");
    let w = skein_tests::wire_error(&e).expect("a typed error");
    assert_eq!(w.code, ErrorCode::UnsupportedOperator, "{w}");
    assert!(w.message.contains("DynamicQuantizeLSTM"), "{w}");
    // Nothing half-deployed, and the coordinator keeps serving.
    assert!(mesh
        .client
        .models()
        .await?
        .iter()
        .all(|m| m.name != "ddddocr_int8"));
    mesh.deploy("ppocr_cls").await?;
    Ok(())
}
