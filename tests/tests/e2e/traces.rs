//! Distributed tracing: one trace id from the caller to the node. The SDK sends its trace
//! context with the resolve and with the request; the coordinator's and the node's spans are
//! its children and reach an OpenTelemetry collector (OTLP/HTTP JSON, here a stand-in on
//! loopback) from processes of their own. Through the HTTP gateway the W3C `traceparent`
//! header continues the caller's trace and comes back on the answer.

use skein_client::{Client, ClientConfig, InferOptions, Profile};
use skein_node::backend::BackendChoice;
use skein_node::NodeConfig;
use skein_proto::{AdminRequest, AdminResponse, DeploymentSettings, TraceContext};
use skein_tests::{
    case, check, fast_coordinator, model_bytes, v2_json_body, CoordinatorProcess, NodeProcess,
    OtlpCollector, TestGateway, TestMesh,
};
use std::time::Duration;

const COORDINATOR_EXE: &str = env!("CARGO_BIN_EXE_coordinator-process");
const NODE_EXE: &str = env!("CARGO_BIN_EXE_node-process");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_call_is_one_trace_across_coordinator_and_node() -> anyhow::Result<()> {
    let collector = OtlpCollector::start().await?;
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str())];
    let dir = tempfile::tempdir()?;
    let config = fast_coordinator(dir.path().join("coordinator"));
    let coordinator = CoordinatorProcess::spawn_env(COORDINATOR_EXE, &config, &env).await?;
    let addr = coordinator.addr.to_string();
    let ca = std::fs::read_to_string(config.data_dir.join("ca.crt"))?;
    let key = std::fs::read_to_string(config.data_dir.join("admin-key"))?;
    let client = Client::from_profile_with(
        &Profile::with_key(&addr, &ca, key.trim()),
        ClientConfig {
            timeout: Duration::from_secs(60),
            ..ClientConfig::default()
        },
    )
    .await?;
    let token = match client
        .admin(AdminRequest::MintJoinToken {
            ttl_s: 600,
            uses: 1,
            labels: Default::default(),
        })
        .await?
    {
        AdminResponse::JoinToken { token, .. } => token,
        other => anyhow::bail!("{other:?}"),
    };
    let node_config = NodeConfig {
        coordinator: addr.clone(),
        join_token: Some(token),
        data_dir: dir.path().join("node"),
        backend: BackendChoice::Tract,
        ..NodeConfig::default()
    };
    let node = NodeProcess::spawn_env(NODE_EXE, &node_config, &env).await?;
    client
        .deploy_with(
            "ppocr_cls",
            None,
            &model_bytes("ppocr_cls"),
            DeploymentSettings::default(),
            |_| {},
        )
        .await?;

    // The caller's own span (say, of a web request it serves) is the parent.
    let parent = TraceContext::fresh(0x5ce1_0000_0000_0000_0000_0000_0000_0001, 0xca11);
    let single = case("ppocr_cls", "single");
    let r = client
        .infer_with(
            "ppocr_cls",
            single.inputs.clone(),
            InferOptions {
                trace: Some(parent),
                ..Default::default()
            },
        )
        .await?;
    check(&r.outputs, &single);
    assert_eq!(r.trace_id, parent.trace_id);
    let trace = parent.trace_hex();
    let resolve = collector
        .wait_span("skein.coordinator.resolve", &trace)
        .await?;
    let infer = collector.wait_span("skein.node.infer", &trace).await?;
    eprintln!("{resolve:?}\n{infer:?}");
    assert_eq!(resolve.service, "skein-coordinator");
    assert_eq!(infer.service, "skein-node");
    // Both are children of the SDK's span, which is a child of the caller's.
    assert_eq!(resolve.parent_span_id, infer.parent_span_id);
    assert_ne!(infer.parent_span_id, parent.span_hex());
    assert_eq!(infer.parent_span_id.len(), 16);
    assert_ne!(infer.span_id, resolve.span_id);
    assert_eq!((infer.kind, infer.status), (2, 1), "server span, ok");
    assert_eq!(infer.attributes["model"], "ppocr_cls");
    assert_eq!(infer.attributes["code"], "ok");
    assert_eq!(infer.attributes["cold_start"], true);
    assert_eq!(infer.attributes["version"], "1");
    assert!(infer.attributes.contains_key("compute_us"));
    assert_eq!(resolve.attributes["code"], "ok");

    // A call without a context starts a trace of its own; the warm call needs no resolve.
    let again = client.infer("ppocr_cls", single.inputs.clone()).await?;
    assert_ne!(again.trace_id, parent.trace_id);
    let trace = format!("{:032x}", again.trace_id);
    let warm = collector.wait_span("skein.node.infer", &trace).await?;
    assert_eq!(warm.attributes["cold_start"], false);
    assert!(!collector
        .spans()
        .iter()
        .any(|s| s.trace_id == trace && s.name == "skein.coordinator.resolve"));

    // An error is a span with error status and the code.
    let bad = client
        .infer_with(
            "ppocr_cls",
            // A wrong datatype: FP32 expected.
            vec![skein_proto::Tensor::from_i64(
                "x",
                vec![1, 3, 48, 192],
                &[0; 3 * 48 * 192],
            )?],
            InferOptions {
                trace: Some(TraceContext::fresh(0xbad, 1)),
                ..Default::default()
            },
        )
        .await;
    assert!(bad.is_err());
    let failed = collector
        .wait_span("skein.node.infer", &format!("{:032x}", 0xbad))
        .await?;
    assert_eq!(failed.status, 2);
    assert_eq!(failed.attributes["code"], "invalid_input");
    drop(node);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_continues_the_traceparent_of_an_http_request() -> anyhow::Result<()> {
    let collector = OtlpCollector::start().await?;
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str())];
    let mesh = TestMesh::start(0).await?;
    let _node = NodeProcess::spawn_env(NODE_EXE, &mesh.node_config(0), &env).await?;
    mesh.deploy("ppocr_cls").await?;
    let gw = TestGateway::start(&mesh, skein_gateway::GatewayConfig::default()).await?;
    let x = &case("ppocr_cls", "single").inputs[0];
    let body = v2_json_body(std::slice::from_ref(x));
    let sent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = gw
        .http()
        .post(
            "/v2/models/ppocr_cls/infer",
            &[("Content-Type", "application/json"), ("traceparent", sent)],
            body.as_bytes(),
        )
        .await?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The answer names the gateway's span: same trace, a span of its own.
    let back = r.header("traceparent").expect("traceparent on the answer");
    let back = TraceContext::parse_traceparent(back).expect("a valid traceparent");
    assert_eq!(back.trace_hex(), "0af7651916cd43dd8448eb211c80319c");
    assert_ne!(back.span_hex(), "b7ad6b7169203331");
    let infer = collector
        .wait_span("skein.node.infer", "0af7651916cd43dd8448eb211c80319c")
        .await?;
    assert_eq!(infer.attributes["code"], "ok");
    // Node span → SDK span (in the gateway, not exported here) → gateway span.
    assert_ne!(infer.parent_span_id, back.span_hex());

    // A malformed header starts a new trace instead of failing the request.
    let r = gw
        .http()
        .post(
            "/v2/models/ppocr_cls/infer",
            &[
                ("Content-Type", "application/json"),
                ("traceparent", "00-zz-01"),
            ],
            body.as_bytes(),
        )
        .await?;
    assert_eq!(r.status, 200);
    let fresh = TraceContext::parse_traceparent(r.header("traceparent").expect("traceparent"))
        .expect("valid");
    collector
        .wait_span("skein.node.infer", &fresh.trace_hex())
        .await?;
    // Errors carry it too.
    let r = gw
        .http()
        .post(
            "/v2/models/ppocr_cls/infer",
            &[("Content-Type", "application/json"), ("traceparent", sent)],
            b"{not json",
        )
        .await?;
    assert_eq!(r.status, 400);
    assert!(r.header("traceparent").is_some());
    Ok(())
}
