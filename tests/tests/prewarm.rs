//! Predictive keep-alive and pre-warming with the real coordinator: a stream of calls arriving
//! every 3 s, a deployment whose fixed keep-alive (1 s) is shorter than that. Until the
//! coordinator has seen enough inter-arrival times every call is a cold start; once its
//! histogram is representative it unloads the replica after each call and loads it again, on
//! the node nearest to the caller, before the stream's next call, which then finds it warm.

use skein_proto::{DeploymentSettings, ModelState};
use skein_tests::{case, model_info, wait_for, WanMesh};
use std::time::Duration;

const PERIOD: Duration = Duration::from_secs(3);

/// Wait (at most one period) until the replica on `node` is in `state`.
async fn wait_state(
    wan: &WanMesh,
    node: &str,
    state: ModelState,
    what: &str,
) -> anyhow::Result<()> {
    wait_for(what, PERIOD, || async {
        let info = model_info(&wan.mesh, "ppocr_cls").await?;
        info.replicas
            .iter()
            .any(|r| r.node == node && r.state == state)
            .then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_prewarms_the_nearest_node_before_the_next_call() -> anyhow::Result<()> {
    let delays = [2, 15, 40].map(Duration::from_millis);
    let wan = WanMesh::start_with(
        &delays,
        |c| {
            // Test scale: 100 ms histogram bins over 10 s, decide after 3 inter-arrival times.
            c.scaling.bin_width_ms = 100;
            c.scaling.bins = 100;
            c.scaling.min_samples = 3;
        },
        |_| {},
    )
    .await?;
    let settings = DeploymentSettings {
        min_replicas: 0,
        idle_timeout_ms: 1_000,
        ..Default::default()
    };
    wan.mesh.deploy_with("ppocr_cls", settings).await?;
    wan.wait_coordinates_settled().await?;
    let nearest = wan.nodes[0].node_id.clone();
    let single = case("ppocr_cls", "single");

    let start = tokio::time::Instant::now();
    let mut outcomes = Vec::new();
    for k in 0..9u32 {
        // The stream's schedule is the workload, not a synchronisation.
        tokio::time::sleep_until(start + PERIOD * k).await;
        let r = wan
            .mesh
            .client
            .infer("ppocr_cls", single.inputs.clone())
            .await?;
        eprintln!(
            "call {k}: node {} cold_start {} compute {} µs",
            wan.index(&r.meta.node).unwrap_or(99),
            r.meta.cold_start,
            r.meta.compute_us
        );
        outcomes.push((r.meta.node.clone(), r.meta.cold_start));
        if let Some(s) = model_info(&wan.mesh, "ppocr_cls")
            .await
            .and_then(|i| i.scaling)
        {
            eprintln!("  scaling after call {k}: {s:?}");
        }
        if k >= 5 {
            // After a call the replica is unloaded: no call is expected for a while ...
            wait_state(&wan, &nearest, ModelState::Cached, "the replica unloaded").await?;
            // ... and loaded again on the nearest node before the next call is due.
            let due = start + PERIOD * (k + 1);
            wait_state(&wan, &nearest, ModelState::Loaded, "the replica pre-warmed").await?;
            assert!(
                tokio::time::Instant::now() < due,
                "pre-warmed only after the next call was due"
            );
        }
    }
    // With the fixed 1 s keep-alive the early calls (3 s apart) find nothing loaded.
    assert!(outcomes[1].1, "the second call is cold: {outcomes:?}");
    // Once the histogram decides, the calls are warm and go to the nearest node.
    for (k, (node, cold)) in outcomes.iter().enumerate().skip(6) {
        assert!(!cold, "call {k} found the replica cold: {outcomes:?}");
        assert_eq!(node, &nearest, "call {k} went elsewhere: {outcomes:?}");
    }
    let info = model_info(&wan.mesh, "ppocr_cls").await.expect("deployed");
    let scaling = info.scaling.expect("the autoscaler reports its decision");
    eprintln!("scaling: {scaling:?}");
    assert!(scaling.keep_alive.contains("histogram"), "{scaling:?}");
    Ok(())
}
