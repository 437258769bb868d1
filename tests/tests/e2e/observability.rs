//! Observability: a node's own `/metrics` counts requests by model, version, tenant and outcome
//! with latency histograms and per-model gauges, and its `/ready` follows reality (it turns 503
//! when the coordinator stops answering its heartbeats).

use skein_gateway::http_client::HttpClient;
use skein_proto::{ErrorCode, Tensor};
use skein_tests::{case, wait_for, TestMesh};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_metrics_count_requests_by_outcome_and_ready_follows_the_coordinator(
) -> anyhow::Result<()> {
    let mut mesh = TestMesh::start_with(
        1,
        |_| {},
        |n| n.metrics_listen = Some("127.0.0.1:0".parse().expect("addr")),
    )
    .await?;
    mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    let addr = mesh.nodes[0]
        .as_ref()
        .and_then(|n| n.metrics_addr())
        .expect("metrics endpoint");
    let single = case("ppocr_cls", "single");
    for _ in 0..3 {
        mesh.client
            .infer("ppocr_cls", single.inputs.clone())
            .await?;
    }
    let wrong = Tensor::from_f32("x", vec![1, 2], &[0.0, 0.0])?;
    let e = mesh
        .client
        .infer("ppocr_cls", vec![wrong])
        .await
        .expect_err("wrong shape");
    assert_eq!(e.code(), Some(ErrorCode::InvalidInput));

    let mut http = HttpClient::new(addr);
    let r = http.get("/metrics").await?;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")));
    let text = String::from_utf8(r.body)?;
    let value = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
    };
    assert_eq!(
        value(r#"skein_requests_total{model="ppocr_cls",version="1",tenant="root",code="ok"}"#),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(
            r#"skein_requests_total{model="ppocr_cls",version="1",tenant="root",code="invalid_input"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(r#"skein_request_duration_seconds_count{model="ppocr_cls",version="1"}"#),
        Some(4.0)
    );
    assert_eq!(
        value(r#"skein_request_duration_seconds_bucket{model="ppocr_cls",version="1",le="+Inf"}"#),
        Some(4.0)
    );
    assert_eq!(
        value(r#"skein_model_loaded{model="ppocr_cls",version="1",state="loaded"}"#),
        Some(1.0)
    );
    assert!(
        value(r#"skein_model_runs_total{model="ppocr_cls",version="1",state="loaded"}"#)
            .is_some_and(|n| n >= 3.0)
    );
    assert_eq!(
        value(r#"skein_model_loads_total{model="ppocr_cls",version="1",result="ok"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(r#"skein_model_loads_total{model="ppocr_cls",version="1",result="failed"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(r#"skein_model_unloads_total{model="ppocr_cls",version="1",reason="idle"}"#),
        Some(0.0)
    );
    let node_id = mesh.nodes[0]
        .as_ref()
        .map(|n| n.node_id().to_string())
        .unwrap_or_default();
    assert_eq!(
        value(&format!(r#"skein_node_ready{{node="{node_id}"}}"#)),
        Some(1.0)
    );
    // Every sample belongs to a declared family.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap_or_default();
        let family = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{name} has no TYPE line"
        );
    }
    assert_eq!(http.get("/ready").await?.status, 200);

    // The coordinator goes away: heartbeats fail, the node says it is not ready.
    mesh.stop_coordinator().await;
    wait_for(
        "the node to report not ready",
        Duration::from_secs(30),
        || {
            let mut http = HttpClient::new(addr);
            async move { (http.get("/ready").await.ok()?.status == 503).then_some(()) }
        },
    )
    .await?;
    Ok(())
}
