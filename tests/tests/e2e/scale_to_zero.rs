//! Scale to zero and back. The node runs in a process of its own, so the resident memory the
//! test measures is the node's alone, not that of the other tests running beside it in the
//! test process.

use skein_proto::DeploymentSettings;
use skein_tests::{case, check, model_info, wait_for, warm_replicas, NodeProcess, TestMesh};
use std::time::Duration;

const NODE_EXE: &str = env!("CARGO_BIN_EXE_node-process");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_replica_scales_to_zero_and_comes_back_on_the_next_call() -> anyhow::Result<()> {
    let mesh = TestMesh::start(0).await?;
    let node = NodeProcess::spawn(NODE_EXE, &mesh.node_config(0)).await?;
    let settings = DeploymentSettings {
        min_replicas: 0,
        idle_timeout_ms: 300,
        ..Default::default()
    };
    mesh.deploy_with("ppocr_cls", settings).await?;
    assert_eq!(
        warm_replicas(&mesh, "ppocr_cls").await,
        0,
        "nothing loads before the first call"
    );
    let single = case("ppocr_cls", "single");

    let rss_before = node.resident_bytes()?;
    let r = mesh
        .client
        .infer("ppocr_cls", single.inputs.clone())
        .await?;
    assert!(r.meta.cold_start, "the first call loads the model");
    assert_eq!(r.meta.node, node.node_id);
    check(&r.outputs, &single);
    wait_for("one warm replica", Duration::from_secs(10), || async {
        (warm_replicas(&mesh, "ppocr_cls").await == 1).then_some(())
    })
    .await?;
    let rss_loaded = node.resident_bytes()?;

    // Idle past the keep-alive window: unloaded, reported as 0 warm.
    wait_for("scale to zero", Duration::from_secs(10), || async {
        (warm_replicas(&mesh, "ppocr_cls").await == 0).then_some(())
    })
    .await?;
    let rss_unloaded = node.resident_bytes()?;
    eprintln!("node RSS before {rss_before}, loaded {rss_loaded}, unloaded {rss_unloaded}");
    assert!(rss_loaded > rss_before, "loading takes memory");
    assert!(rss_unloaded < rss_loaded, "unloading gives memory back");

    // The next call is held while the replica loads, then answered correctly.
    let r = mesh
        .client
        .infer("ppocr_cls", single.inputs.clone())
        .await?;
    assert!(
        r.meta.cold_start,
        "the call after scale-to-zero is a cold start"
    );
    check(&r.outputs, &single);
    // Counted by the node and reported with its next heartbeat.
    let info = wait_for(
        "two cold starts counted",
        Duration::from_secs(10),
        || async {
            model_info(&mesh, "ppocr_cls")
                .await
                .filter(|m| m.cold_starts >= 2)
        },
    )
    .await?;
    assert_eq!(info.settings.idle_timeout_ms, 300);
    // Warm again: the remembered shape was warmed at load, so the next call is not cold.
    let r = mesh
        .client
        .infer("ppocr_cls", single.inputs.clone())
        .await?;
    assert!(!r.meta.cold_start);
    check(&r.outputs, &single);
    Ok(())
}
