//! The serverless lifecycle: scale to zero and back, held cold requests, one load for many
//! cold callers, overload answered at once, memory budget.

use skein_proto::{DeploymentSettings, ErrorCode, Tensor};
use skein_tests::{case, check, model_info, wait_for, warm_replicas, TestMesh};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_share_one_load() -> anyhow::Result<()> {
    let mesh = TestMesh::start(1).await?;
    mesh.deploy_with("ppocr_cls", DeploymentSettings::default())
        .await?;
    let single = case("ppocr_cls", "single");
    let calls = (0..8).map(|_| {
        let (client, inputs) = (mesh.client.clone(), single.inputs.clone());
        async move { client.infer("ppocr_cls", inputs).await }
    });
    let results = futures_join_all(calls).await;
    let mut cold = 0;
    for r in results {
        let r = r?;
        // Callers that arrived during the load waited for it (cold); late ones found it warm.
        cold += usize::from(r.meta.cold_start);
        check(&r.outputs, &single);
    }
    assert!(cold >= 1, "the first caller found no replica");
    // Counted by the node and reported with its next heartbeat.
    let info = wait_for(
        "the heartbeat after the load",
        Duration::from_secs(5),
        || async {
            model_info(&mesh, "ppocr_cls")
                .await
                .filter(|m| m.cold_starts > 0)
        },
    )
    .await?;
    assert_eq!(
        info.cold_starts, 1,
        "one fetch and load for 8 cold callers ({:?})",
        info.replicas
    );
    Ok(())
}

/// `join_all` without a futures dependency: spawn each on the runtime.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_queue_is_refused_at_once_and_the_rest_served() -> anyhow::Result<()> {
    let mesh = TestMesh::start_with(
        1,
        |_| {},
        |n| {
            n.max_queue = 2;
        },
    )
    .await?;
    let settings = DeploymentSettings {
        min_replicas: 1,
        max_concurrency: 1,
        ..Default::default()
    };
    mesh.deploy_with("ppocr_det", settings).await?;
    mesh.wait_loaded("ppocr_det", 1).await?;
    let c = case("ppocr_det", "single_256");
    let burst = (0..12).map(|_| {
        let (client, inputs) = (mesh.client.clone(), c.inputs.clone());
        async move { client.infer("ppocr_det", inputs).await }
    });
    let results = tokio::time::timeout(Duration::from_secs(120), futures_join_all(burst))
        .await
        .expect("nothing hangs");
    let (mut ok, mut overloaded) = (0, 0);
    for r in results {
        match r {
            Ok(r) => {
                check(&r.outputs, &c);
                ok += 1;
            }
            Err(skein_client::Error::Remote(e)) if e.code == ErrorCode::Overloaded => {
                assert!(e.retry_after_ms.is_some_and(|ms| ms > 0), "{e:?}");
                overloaded += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert!(
        ok >= 1 && overloaded >= 1,
        "ok {ok}, overloaded {overloaded}"
    );
    assert_eq!(ok + overloaded, 12);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_budget_unloads_the_least_recently_used_idle_replica() -> anyhow::Result<()> {
    let mesh = TestMesh::start_with(1, |_| {}, |n| n.memory_budget = 100 << 20).await?;
    let est = |mib: u64| DeploymentSettings {
        memory_estimate: mib << 20,
        ..Default::default()
    };
    mesh.deploy_with("ppocr_cls", est(60)).await?;
    mesh.deploy_with("silero_vad", est(60)).await?;
    mesh.deploy_with("ppocr_det", est(500)).await?;

    let cls = case("ppocr_cls", "single");
    mesh.client.infer("ppocr_cls", cls.inputs.clone()).await?;
    // silero does not fit next to ppocr_cls (60 + 60 > 100 MiB): ppocr_cls, idle, is unloaded.
    let vad = case("silero_vad", "stream_step0");
    let r = mesh.client.infer("silero_vad", vad.inputs.clone()).await?;
    check(&r.outputs, &vad);
    wait_for(
        "ppocr_cls unloaded, silero_vad loaded",
        Duration::from_secs(10),
        || async {
            let cls = warm_replicas(&mesh, "ppocr_cls").await;
            let vad = warm_replicas(&mesh, "silero_vad").await;
            (cls == 0 && vad == 1).then_some(())
        },
    )
    .await?;
    // A model that can never fit is refused with a clear error, and nothing else is unloaded.
    let det = case("ppocr_det", "single_256");
    match mesh.client.infer("ppocr_det", det.inputs.clone()).await {
        Err(skein_client::Error::Remote(e)) => {
            assert_eq!(e.code, ErrorCode::NoCapacity, "{e}");
            assert!(e.message.contains("budget"), "{e}");
        }
        other => panic!("expected no capacity, got {other:?}"),
    }
    assert_eq!(warm_replicas(&mesh, "silero_vad").await, 1);
    Ok(())
}

/// Split the batch4 case of ppocr_cls into four single-image requests and their expected rows.
fn cls_rows() -> Vec<(Tensor, Vec<f32>)> {
    let c = case("ppocr_cls", "batch4");
    let x = &c.inputs[0];
    let y = c.outputs[0].as_f32_vec().expect("fp32");
    let row = x.data().len() / 4;
    (0..4)
        .map(|i| {
            let t = Tensor::new(
                "x",
                x.datatype(),
                vec![1, 3, 48, 192],
                x.data()[i * row..(i + 1) * row].to_vec(),
            )
            .expect("row");
            (t, y[i * 2..i * 2 + 2].to_vec())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_single_images_are_micro_batched_and_each_caller_gets_its_row(
) -> anyhow::Result<()> {
    let mesh = TestMesh::start_with(
        1,
        |_| {},
        |n| {
            n.batch_policy = skein_node::batcher::BatchPolicy::Always;
        },
    )
    .await?;
    let settings = DeploymentSettings {
        min_replicas: 1,
        max_concurrency: 1,
        max_batch_size: 4,
        max_queue_delay_us: 200_000,
        ..Default::default()
    };
    mesh.deploy_with("ppocr_cls", settings).await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    let rows = cls_rows();
    let runs_before = runs(&mesh).await;
    let calls = (0..8).map(|i| {
        let (client, (x, want)) = (mesh.client.clone(), rows[i % 4].clone());
        async move {
            let r = client.infer("ppocr_cls", vec![x]).await?;
            Ok::<_, anyhow::Error>((r, want))
        }
    });
    for r in futures_join_all(calls).await {
        let (r, want) = r?;
        let got = r.outputs[0].as_f32_vec().expect("fp32");
        assert_eq!(
            r.outputs[0].shape(),
            &[1, 2],
            "each caller gets exactly its row"
        );
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-3 + 1e-2 * w.abs(),
                "{got:?} vs {want:?}"
            );
        }
    }
    let used = runs(&mesh).await - runs_before;
    assert!(used < 8, "8 requests served in {used} model runs");

    // A mixed-shape burst is never merged across shapes, and stays correct.
    let narrow = Tensor::new("x", skein_proto::DataType::Fp32, vec![1, 3, 48, 96], {
        let x = &rows[0].0;
        let mut d = Vec::new();
        for c in 0..3 * 48 {
            d.extend_from_slice(&x.data()[c * 192 * 4..c * 192 * 4 + 96 * 4]);
        }
        d
    })?;
    let alone = mesh.client.infer("ppocr_cls", vec![narrow.clone()]).await?;
    let mixed = (0..6).map(|i| {
        let client = mesh.client.clone();
        let x = if i % 2 == 0 {
            narrow.clone()
        } else {
            rows[1].0.clone()
        };
        async move { client.infer("ppocr_cls", vec![x]).await }
    });
    for (i, r) in futures_join_all(mixed).await.into_iter().enumerate() {
        let got = r?.outputs[0].as_f32_vec().expect("fp32");
        let want = if i % 2 == 0 {
            alone.outputs[0].as_f32_vec().expect("fp32")
        } else {
            rows[1].1.clone()
        };
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-3 + 1e-2 * w.abs(),
                "request {i}: {got:?} vs {want:?}"
            );
        }
    }
    Ok(())
}

async fn runs(mesh: &TestMesh) -> u64 {
    // Runs are reported by heartbeat; ask until the count stops moving.
    let mut last = u64::MAX;
    loop {
        let now: u64 = mesh
            .client
            .models()
            .await
            .expect("models")
            .iter()
            .flat_map(|m| m.replicas.iter().map(|r| r.runs))
            .sum();
        if now == last {
            return now;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
