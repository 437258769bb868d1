//! The KServe V2 HTTP gateway against an in-process mesh: every endpoint, JSON and binary
//! tensors compared to the reference cases, compression, and every error status.

use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use serde_json::{json, Value};
use skein_gateway::http_client::{HttpClient, HttpResponse};
use skein_gateway::GatewayConfig;
use skein_onnx::reference;
use skein_proto::{DataType, Tensor};
use skein_tests::{case, models_dir, wait_for, TestGateway, TestMesh};
use std::io::{Read, Write};
use std::time::Duration;

const ATOL: f64 = 1e-3;
const RTOL: f64 = 1e-2;

/// A tensor's elements as JSON numbers (or booleans/strings).
fn json_data(t: &Tensor) -> Value {
    match t.datatype() {
        DataType::Int64 => json!(t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<_>>()),
        DataType::Fp32 => json!(t.as_f32_vec().unwrap()),
        other => panic!("test helper does not handle {other}"),
    }
}

/// The same elements nested by shape (`[[..],[..]]`).
fn nest(flat: &[Value], shape: &[u64]) -> Value {
    match shape {
        [] => flat[0].clone(),
        [_] => Value::Array(flat.to_vec()),
        [n, rest @ ..] => {
            let step = flat.len() / *n as usize;
            Value::Array(
                flat.chunks(step.max(1))
                    .take(*n as usize)
                    .map(|c| nest(c, rest))
                    .collect(),
            )
        }
    }
}

fn json_input(t: &Tensor, nested: bool) -> Value {
    let data = json_data(t);
    let data = if nested {
        nest(data.as_array().unwrap(), t.shape())
    } else {
        data
    };
    json!({"name": t.name(), "datatype": t.datatype().as_str(), "shape": t.shape(), "data": data})
}

/// A binary-extension body: JSON header (all inputs binary) then the bytes.
fn binary_body(inputs: &[Tensor], extra: Value) -> (Vec<u8>, String) {
    let mut req = extra;
    req["inputs"] = inputs
        .iter()
        .map(|t| {
            json!({"name": t.name(), "datatype": t.datatype().as_str(), "shape": t.shape(),
                        "parameters": {"binary_data_size": t.data().len()}})
        })
        .collect();
    let mut body = req.to_string().into_bytes();
    let header_len = body.len().to_string();
    for t in inputs {
        body.extend_from_slice(t.data());
    }
    (body, header_len)
}

/// Output tensors of a response, JSON or binary.
fn outputs(resp: &HttpResponse) -> Vec<Tensor> {
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let (head, mut tail) = match resp.header("inference-header-content-length") {
        Some(n) => {
            let n: usize = n.parse().unwrap();
            (&resp.body[..n], &resp.body[n..])
        }
        None => (&resp.body[..], &[][..]),
    };
    let v: Value = serde_json::from_slice(head).unwrap();
    v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let dt: DataType = o["datatype"].as_str().unwrap().parse().unwrap();
            let shape: Vec<u64> = serde_json::from_value(o["shape"].clone()).unwrap();
            let name = o["name"].as_str().unwrap();
            let bytes = if let Some(n) = o["parameters"]["binary_data_size"].as_u64() {
                assert!(o.get("data").is_none());
                let (b, rest) = tail.split_at(n as usize);
                tail = rest;
                b.to_vec()
            } else {
                let data = o["data"].as_array().unwrap();
                match dt {
                    DataType::Fp32 => data
                        .iter()
                        .flat_map(|x| (x.as_f64().unwrap() as f32).to_le_bytes())
                        .collect(),
                    DataType::Int64 => data
                        .iter()
                        .flat_map(|x| x.as_i64().unwrap().to_le_bytes())
                        .collect(),
                    other => panic!("unexpected output datatype {other}"),
                }
            };
            Tensor::new(name, dt, shape, bytes).unwrap()
        })
        .collect()
}

fn check(model: &str, case: &reference::Case, got: &[Tensor], what: &str) {
    assert_eq!(
        got.len(),
        case.outputs.len(),
        "{model}/{} {what}",
        case.name
    );
    for (a, e) in got.iter().zip(&case.outputs) {
        assert_eq!(a.name(), e.name());
        reference::compare(a, e, ATOL, RTOL)
            .unwrap_or_else(|err| panic!("{model}/{} {what}: {err}", case.name));
    }
}

fn assert_error(resp: &HttpResponse, status: u16, what: &str) {
    let body = String::from_utf8_lossy(&resp.body);
    assert_eq!(resp.status, status, "{what}: {body}");
    assert_eq!(
        resp.header("content-type"),
        Some("application/json"),
        "{what}"
    );
    let v = resp
        .json()
        .unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
    assert!(
        v["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{what}: {body}"
    );
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap();
    out
}

async fn post_json(http: &mut HttpClient, path: &str, v: &Value) -> HttpResponse {
    http.post(
        path,
        &[("Content-Type", "application/json")],
        v.to_string().as_bytes(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_health_metadata_readiness_and_openapi() -> anyhow::Result<()> {
    let mesh = TestMesh::start(1).await?;
    mesh.deploy("ppocr_cls").await?;
    mesh.deploy("silero_vad").await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    mesh.wait_loaded("silero_vad", 1).await?;
    let gw = TestGateway::start(&mesh, GatewayConfig::default()).await?;
    let mut http = gw.http();

    let r = http.get("/v2/health/live").await?;
    assert_eq!((r.status, r.json()?), (200, json!({"live": true})));
    let r = http.get("/v2/health/ready").await?;
    assert_eq!((r.status, r.json()?), (200, json!({"ready": true})));

    let r = http.get("/v2").await?;
    assert_eq!(r.status, 200);
    let v = r.json()?;
    assert_eq!(v["name"], "skein");
    assert!(v["extensions"]
        .as_array()
        .unwrap()
        .contains(&json!("binary_tensor_data")));

    // Metadata as the ONNX graph declares it (-1 for dynamic dimensions).
    let infos = mesh.client.models().await?;
    for name in ["ppocr_cls", "silero_vad"] {
        let info = infos.iter().find(|m| m.name == name).unwrap();
        for path in [
            format!("/v2/models/{name}"),
            format!("/v2/models/{name}/versions/{}", info.version),
        ] {
            let r = http.get(&path).await?;
            assert_eq!(r.status, 200, "{path}");
            let v = r.json()?;
            assert_eq!(v["name"], name);
            assert_eq!(v["versions"], json!([info.version]));
            assert_eq!(v["platform"], "onnx");
            for (key, specs) in [("inputs", &info.inputs), ("outputs", &info.outputs)] {
                let want: Vec<Value> = specs
                    .iter()
                    .map(|s| json!({"name": s.name, "datatype": s.datatype.as_str(), "shape": s.shape}))
                    .collect();
                assert_eq!(v[key], Value::Array(want), "{path} {key}");
            }
        }
    }
    let v = http.get("/v2/models/ppocr_cls").await?.json()?;
    assert_eq!(v["inputs"][0]["datatype"], "FP32");
    assert_eq!(v["inputs"][0]["shape"][0], -1, "dynamic batch: {v}");
    let v = http.get("/v2/models/silero_vad").await?.json()?;
    let sr = v["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "sr")
        .unwrap();
    assert_eq!(
        (sr["datatype"].clone(), sr["shape"].clone()),
        (json!("INT64"), json!([]))
    );

    for path in [
        "/v2/models/ppocr_cls/ready",
        "/v2/models/ppocr_cls/versions/1/ready",
    ] {
        let r = http.get(path).await?;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.json()?["ready"], true);
    }
    // A model scaled to zero (nothing loaded) is still ready: a call would be held while it loads.
    mesh.deploy_with("ppocr_det", skein_proto::DeploymentSettings::default())
        .await?;
    // (the gateway's model list is cached for up to a second)
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = http.get("/v2/models/ppocr_det/ready").await?;
        if r.status != 404 || tokio::time::Instant::now() > until {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.status, 200, "scaled to zero but servable");
    let r = http.get("/v2/health/ready").await?;
    assert_eq!(
        r.status, 200,
        "the server is ready with a model at zero replicas"
    );
    for path in [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/ppocr_cls/versions/9",
        "/v2/models/ppocr_cls/versions/9/ready",
        "/v2/nothing/here",
    ] {
        assert_error(&http.get(path).await?, 404, path);
    }
    assert_error(
        &http.get("/v2/models/%FF%FE").await?,
        400,
        "bad percent-encoding",
    );
    let r = http.request("DELETE", "/v2/health/live", &[], &[]).await?;
    assert_error(&r, 405, "DELETE live");
    let r = http.get("/v2/models/ppocr_cls/infer").await?;
    assert_error(&r, 405, "GET infer");

    // The OpenAPI description covers every route.
    let r = http.get("/openapi.json").await?;
    assert_eq!(r.status, 200);
    let spec = r.json()?;
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2",
        "/v2/models/{model_name}",
        "/v2/models/{model_name}/versions/{model_version}",
        "/v2/models/{model_name}/ready",
        "/v2/models/{model_name}/versions/{model_version}/ready",
        "/v2/models/{model_name}/infer",
        "/v2/models/{model_name}/versions/{model_version}/infer",
        "/openapi.json",
        "/metrics",
    ] {
        assert!(spec["paths"].get(p).is_some(), "openapi lacks {p}");
    }

    // Prometheus metrics: the nodes are up, and served requests show up as runs (heartbeats
    // carry them, so wait for the count).
    let single = case("ppocr_cls", "single");
    mesh.client
        .infer("ppocr_cls", single.inputs.clone())
        .await?;
    let text = wait_for("runs in /metrics", Duration::from_secs(10), || {
        let mut http = gw.http();
        async move {
            let r = http.get("/metrics").await.ok()?;
            assert_eq!(r.status, 200);
            assert!(r
                .header("content-type")?
                .starts_with("text/plain; version=0.0.4"));
            let text = String::from_utf8(r.body).ok()?;
            let runs = text.lines().find_map(|l| {
                l.strip_prefix("skein_model_runs_total{model=\"ppocr_cls\",version=\"1\"} ")
            })?;
            (runs.parse::<f64>().ok()? >= 1.0).then_some(text)
        }
    })
    .await?;
    assert!(
        text.lines()
            .filter(|l| l.starts_with("skein_node_up{"))
            .all(|l| l.ends_with(" 1")),
        "{text}"
    );
    assert!(text.contains("# TYPE skein_model_cold_starts_total counter"));

    // The gateway's own counters: HTTP inference requests by model, version and status, with
    // a latency histogram.
    let body = skein_tests::v2_json_body(&single.inputs);
    let mut http = gw.http();
    let json = [("Content-Type", "application/json")];
    let ok = http
        .post("/v2/models/ppocr_cls/infer", &json, body.as_bytes())
        .await?;
    assert_eq!(ok.status, 200);
    let bad = http.post("/v2/models/ppocr_cls/infer", &json, b"{").await?;
    assert_eq!(bad.status, 400);
    let text = String::from_utf8(http.get("/metrics").await?.body)?;
    let count = |code: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "skein_http_requests_total{{model=\"ppocr_cls\",version=\"-\",code=\"{code}\"}} "
                ))
            })
            .and_then(|n| n.parse::<u64>().ok())
    };
    assert!(count("200") >= Some(1), "{text}");
    assert!(count("400") >= Some(1), "{text}");
    assert!(text.contains(
        "skein_http_request_duration_seconds_bucket{model=\"ppocr_cls\",version=\"-\",le=\"+Inf\"}"
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_json_and_binary_inference_match_the_reference_cases() -> anyhow::Result<()> {
    let mesh = TestMesh::start(2).await?;
    for m in ["ppocr_cls", "ppocr_det", "silero_vad"] {
        mesh.deploy(m).await?;
    }
    for m in ["ppocr_cls", "ppocr_det", "silero_vad"] {
        mesh.wait_loaded(m, 1).await?;
    }
    let gw = TestGateway::start(&mesh, GatewayConfig::default()).await?;
    let mut http = gw.http();
    for model in ["ppocr_cls", "ppocr_det", "silero_vad"] {
        let path = format!("/v2/models/{model}/infer");
        for case in reference::load_cases(&models_dir().join(model))? {
            // JSON in, JSON out (flat data).
            let req = json!({"inputs": case.inputs.iter().map(|t| json_input(t, false)).collect::<Vec<_>>()});
            let r = post_json(&mut http, &path, &req).await;
            assert!(r.header("inference-header-content-length").is_none());
            let v = r.json()?;
            assert_eq!(v["model_name"], model);
            assert_eq!(v["model_version"], "1");
            check(model, &case, &outputs(&r), "json");

            // Binary in, binary out (what tritonclient's everyday infer does).
            let (body, hl) = binary_body(
                &case.inputs,
                json!({"parameters": {"binary_data_output": true}}),
            );
            let r = http
                .post(
                    &path,
                    &[
                        ("Inference-Header-Content-Length", &hl),
                        ("Content-Type", "application/octet-stream"),
                    ],
                    &body,
                )
                .await?;
            assert!(r.header("inference-header-content-length").is_some());
            check(model, &case, &outputs(&r), "binary");
        }
    }

    let cls = reference::load_cases(&models_dir().join("ppocr_cls"))?;
    let case = cls.iter().find(|c| c.name == "single").unwrap();

    // Nested data, id echoed, unknown parameters tolerated, versioned path.
    let req = json!({
        "id": "req-42",
        "parameters": {"sequence_id": 7, "priority": 1, "timeout": 5000000, "custom": "x"},
        "inputs": case.inputs.iter().map(|t| json_input(t, true)).collect::<Vec<_>>(),
    });
    let r = post_json(&mut http, "/v2/models/ppocr_cls/versions/1/infer", &req).await;
    assert_eq!(r.json()?["id"], "req-42");
    check("ppocr_cls", case, &outputs(&r), "nested");

    // Output selection, and per-output binary_data on a JSON request (mixed).
    let vad = reference::load_cases(&models_dir().join("silero_vad"))?;
    let step = vad.iter().find(|c| c.name == "stream_step0").unwrap();
    let req = json!({
        "inputs": step.inputs.iter().map(|t| json_input(t, false)).collect::<Vec<_>>(),
        "outputs": [{"name": "stateN", "parameters": {"binary_data": true}}],
    });
    let r = post_json(&mut http, "/v2/models/silero_vad/infer", &req).await;
    let got = outputs(&r);
    assert_eq!(got.len(), 1, "only the requested output");
    assert_eq!(got[0].name(), "stateN");
    let expected = step.outputs.iter().find(|t| t.name() == "stateN").unwrap();
    reference::compare(&got[0], expected, ATOL, RTOL).map_err(|e| anyhow::anyhow!("{e}"))?;
    let req = json!({
        "inputs": step.inputs.iter().map(|t| json_input(t, false)).collect::<Vec<_>>(),
        "outputs": [{"name": "output"}],
    });
    let r = post_json(&mut http, "/v2/models/silero_vad/infer", &req).await;
    let got = outputs(&r);
    assert_eq!((got.len(), got[0].name()), (1, "output"));

    // gzip and deflate request bodies; gzip and deflate responses on Accept-Encoding.
    let req =
        json!({"inputs": case.inputs.iter().map(|t| json_input(t, false)).collect::<Vec<_>>()})
            .to_string();
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(req.as_bytes())?;
    let gz = gz.finish()?;
    let r = http
        .post(
            "/v2/models/ppocr_cls/infer",
            &[("Content-Encoding", "gzip"), ("Accept-Encoding", "gzip")],
            &gz,
        )
        .await?;
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    let plain = HttpResponse {
        body: gunzip(&r.body),
        ..r.clone()
    };
    check("ppocr_cls", case, &outputs(&plain), "gzip");
    let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
    z.write_all(req.as_bytes())?;
    let z = z.finish()?;
    let r = http
        .post(
            "/v2/models/ppocr_cls/infer",
            &[
                ("Content-Encoding", "deflate"),
                ("Accept-Encoding", "deflate"),
            ],
            &z,
        )
        .await?;
    assert_eq!(r.header("content-encoding"), Some("deflate"));
    let mut body = Vec::new();
    flate2::read::ZlibDecoder::new(&r.body[..]).read_to_end(&mut body)?;
    check(
        "ppocr_cls",
        case,
        &outputs(&HttpResponse { body, ..r }),
        "deflate",
    );

    // Binary outputs with gzip: the header length counts the uncompressed JSON.
    let (body, hl) = binary_body(
        &case.inputs,
        json!({"parameters": {"binary_data_output": true}}),
    );
    let r = http
        .post(
            "/v2/models/ppocr_cls/infer",
            &[
                ("Inference-Header-Content-Length", &hl),
                ("Accept-Encoding", "gzip"),
            ],
            &body,
        )
        .await?;
    let plain = HttpResponse {
        body: gunzip(&r.body),
        ..r.clone()
    };
    check("ppocr_cls", case, &outputs(&plain), "binary+gzip");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_answers_client_mistakes_with_4xx_never_5xx() -> anyhow::Result<()> {
    let mesh = TestMesh::start(1).await?;
    mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    let limit = 2 << 20;
    let gw = TestGateway::start(
        &mesh,
        GatewayConfig {
            max_body_bytes: limit,
            ..GatewayConfig::default()
        },
    )
    .await?;
    let mut http = gw.http();
    let path = "/v2/models/ppocr_cls/infer";
    let x = |dt: &str, shape: Value, data: Value| json!({"inputs": [{"name": "x", "datatype": dt, "shape": shape, "data": data}]});
    let zeros = |n: usize| json!(vec![0.0; n]);
    let n = 3 * 48 * 192;

    let cases: Vec<(&str, Value, u16)> = vec![
        (
            "wrong datatype",
            x("INT64", json!([1, 3, 48, 192]), json!(vec![0; n])),
            400,
        ),
        (
            "wrong shape",
            x("FP32", json!([1, 3, 48]), zeros(3 * 48)),
            400,
        ),
        (
            "data count",
            x("FP32", json!([1, 3, 48, 192]), zeros(10)),
            400,
        ),
        ("unknown datatype", x("FLOAT", json!([1]), zeros(1)), 400),
        ("negative dim", x("FP32", json!([-1, 3]), zeros(3)), 400),
        (
            "missing input",
            json!({"inputs": [{"name": "y", "datatype": "FP32", "shape": [1], "data": [0.0]}]}),
            400,
        ),
        ("no inputs", json!({"inputs": []}), 400),
        (
            "unknown output",
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192], "data": zeros(n)}], "outputs": [{"name": "nope"}]}),
            400,
        ),
        (
            "no data",
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}),
            400,
        ),
        (
            "id not a string",
            json!({"id": {}, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}),
            400,
        ),
    ];
    for (what, body, status) in cases {
        assert_error(&post_json(&mut http, path, &body).await, status, what);
    }
    assert_error(
        &post_json(
            &mut http,
            "/v2/models/nope/infer",
            &x("FP32", json!([1]), zeros(1)),
        )
        .await,
        404,
        "unknown model",
    );
    assert_error(
        &post_json(
            &mut http,
            "/v2/models/ppocr_cls/versions/9/infer",
            &x("FP32", json!([1, 3, 48, 192]), zeros(n)),
        )
        .await,
        404,
        "unknown version",
    );
    let r = http.post(path, &[], b"{\"inputs\": [").await?;
    assert_error(&r, 400, "malformed json");
    let r = http.post(path, &[], b"not json at all").await?;
    assert_error(&r, 400, "not json");

    // Binary sizes that disagree.
    let t = Tensor::from_f32("x", vec![1, 3, 48, 192], &vec![0.0; n])?;
    let head = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192], "parameters": {"binary_data_size": 100}}]}).to_string();
    let mut body = head.clone().into_bytes();
    body.extend_from_slice(&t.data()[..100]);
    let hl = head.len().to_string();
    let r = http
        .post(path, &[("Inference-Header-Content-Length", &hl)], &body)
        .await?;
    assert_error(&r, 400, "byte size mismatch");
    body.extend_from_slice(&[0; 4]);
    let r = http
        .post(path, &[("Inference-Header-Content-Length", &hl)], &body)
        .await?;
    assert_error(&r, 400, "extra binary bytes");
    let r = http
        .post(
            path,
            &[("Inference-Header-Content-Length", "999999")],
            &body,
        )
        .await?;
    assert_error(&r, 400, "header length past the body");
    let r = http
        .post(path, &[("Inference-Header-Content-Length", "ten")], &body)
        .await?;
    assert_error(&r, 400, "header length not a number");

    // Size limits: the body, and what a compressed body expands to.
    // (Declared larger than the limit: answered before the body is read.)
    let declared = (limit + 1).to_string();
    let r = http
        .post(path, &[("Content-Length", &declared)], &[])
        .await?;
    assert_error(&r, 413, "body too large");
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&vec![b' '; 8 * limit])?;
    let bomb = gz.finish()?;
    assert!(bomb.len() < limit);
    let r = http
        .post(path, &[("Content-Encoding", "gzip")], &bomb)
        .await?;
    assert_error(&r, 413, "gzip bomb");
    let r = http
        .post(
            path,
            &[("Content-Encoding", "gzip")],
            b"definitely not gzip",
        )
        .await?;
    assert_error(&r, 400, "corrupt gzip");
    let r = http
        .post(path, &[("Content-Encoding", "br")], b"{}")
        .await?;
    assert_error(&r, 415, "unsupported encoding");

    // After all that, the gateway still serves.
    let r = post_json(
        &mut http,
        path,
        &x("FP32", json!([1, 3, 48, 192]), zeros(n)),
    )
    .await;
    assert_eq!(r.status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_maps_mesh_failures_to_503_and_504_and_shuts_down() -> anyhow::Result<()> {
    let n = 3 * 48 * 192;
    let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192], "data": vec![0.0; n]}]});

    // No node: no capacity (503, Retry-After); neither the server nor the model is ready.
    let empty = TestMesh::start(0).await?;
    empty.deploy("ppocr_cls").await?;
    let gw = TestGateway::start(&empty, GatewayConfig::default()).await?;
    let mut http = gw.http();
    let r = post_json(&mut http, "/v2/models/ppocr_cls/infer", &body).await;
    assert_error(&r, 503, "no capacity");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_error(
        &http.get("/v2/health/ready").await?,
        400,
        "server not ready",
    );
    assert_error(
        &http.get("/v2/models/ppocr_cls/ready").await?,
        400,
        "model not ready",
    );
    assert_eq!(http.get("/v2/health/live").await?.status, 200);
    drop(gw);

    let mesh = TestMesh::start(1).await?;
    mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;

    // A deadline that cannot be met: 504.
    let gw = TestGateway::start(
        &mesh,
        GatewayConfig {
            request_timeout: Duration::from_micros(1),
            ..GatewayConfig::default()
        },
    )
    .await?;
    let r = post_json(&mut gw.http(), "/v2/models/ppocr_cls/infer", &body).await;
    assert_error(&r, 504, "deadline");
    drop(gw);

    // The gateway's own in-flight bound: 503 with Retry-After.
    let gw = TestGateway::start(
        &mesh,
        GatewayConfig {
            max_in_flight: 0,
            ..GatewayConfig::default()
        },
    )
    .await?;
    let r = post_json(&mut gw.http(), "/v2/models/ppocr_cls/infer", &body).await;
    assert_error(&r, 503, "busy");
    assert_eq!(r.header("retry-after"), Some("1"));
    drop(gw);

    // The per-key rate: a burst of 2, then 429 with Retry-After, naming the rate.
    let gw = TestGateway::start(
        &mesh,
        GatewayConfig {
            key_rate: Some(skein_gateway::KeyRateLimit {
                per_second: 0.01,
                burst: 2,
            }),
            ..GatewayConfig::default()
        },
    )
    .await?;
    let mut http = gw.http();
    for _ in 0..2 {
        let r = post_json(&mut http, "/v2/models/ppocr_cls/infer", &body).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let r = post_json(&mut http, "/v2/models/ppocr_cls/infer", &body).await;
    assert_error(&r, 429, "rate");
    assert!(r
        .header("retry-after")
        .is_some_and(|s| s.parse::<u32>().is_ok_and(|s| s >= 1)));
    drop(gw);

    // Shutdown: serve returns promptly once cancelled.
    let mut gw = TestGateway::start(&mesh, GatewayConfig::default()).await?;
    assert_eq!(
        post_json(&mut gw.http(), "/v2/models/ppocr_cls/infer", &body)
            .await
            .status,
        200
    );
    gw.cancel.cancel();
    let task = gw.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), task).await???;
    Ok(())
}

/// `POST /admin/v1/models/{name}` takes every deployment setting from its query, stores them
/// with the upload (a region-restricted model is only ever placed in its regions), and reads
/// them back; unknown query parameters and body fields anywhere in the admin API are refused
/// with a 400 that names them, never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_deploy_over_http_takes_every_setting_and_unknown_fields_are_refused(
) -> anyhow::Result<()> {
    let mut mesh = TestMesh::start(0).await?;
    for (i, region) in ["eu", "us"].iter().enumerate() {
        let mut cfg = mesh.node_config(i);
        cfg.labels.insert("region".into(), region.to_string());
        mesh.nodes.push(Some(skein_node::Node::start(cfg).await?));
    }
    let us = mesh.nodes[1].as_ref().map(|n| n.node_id().to_string());
    let eu = mesh.nodes[0].as_ref().map(|n| n.node_id().to_string());
    let gw = TestGateway::start(&mesh, GatewayConfig::default()).await?;
    let mut root = gw.http();
    let onnx = [("Content-Type", "application/octet-stream")];
    let json_h = [("Content-Type", "application/json")];
    let cls = skein_tests::model_bytes("ppocr_cls");
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|m| m["name"].to_string()).collect())
            .unwrap_or_default()
    };

    let r = root
        .post(
            "/admin/v1/models/http_cls?version=5&min_replicas=1&max_replicas=1\
             &idle_timeout_ms=2000&max_concurrency=3&max_batch_size=4&max_queue_delay_us=1500\
             &memory_estimate=33554432&timeout_ms=9000&regions=us,mars&device_class=\
             &shared=true&accelerator=prefer-gpu",
            &onnx,
            &cls,
        )
        .await?;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let want = json!({
        "min_replicas": 1, "max_replicas": 1, "idle_timeout_ms": 2000, "max_concurrency": 3,
        "max_batch_size": 4, "max_queue_delay_us": 1500, "memory_estimate": 33554432,
        "timeout_ms": 9000, "regions": ["us", "mars"], "device_class": "", "shared": true,
        "accelerator": "prefer-gpu",
        // Set by the coordinator's operator check, never by the caller: any engine runs it.
        "engines": {"engines": [], "ops": []},
    });
    let deployed = r.json()?;
    assert_eq!(deployed["version"], "5");
    assert_eq!(deployed["settings"], want);
    let listed = root.get("/admin/v1/models").await?.json()?;
    let m = listed
        .as_array()
        .and_then(|a| a.iter().find(|m| m["name"] == "http_cls"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(m["settings"], want, "GET /admin/v1/models reads them back");
    // Placed on the `us` node only: never on the `eu` one, not even for a moment.
    mesh.wait_loaded("http_cls", 1).await?;
    let models = mesh.client.models().await?;
    let m = models.iter().find(|m| m.name == "http_cls");
    assert_eq!(
        m.map(|m| m.loaded_on.clone()),
        Some(us.into_iter().collect::<Vec<_>>())
    );
    // (Every node lists every model, as `cached` until it fetches or loads it.)
    let nodes = mesh.client.nodes().await?;
    let eu_node = nodes.iter().find(|n| Some(&n.node_id) == eu.as_ref());
    assert!(
        eu_node.is_some_and(|n| n
            .models
            .iter()
            .all(|m| m.name != "http_cls" || m.state == skein_proto::ModelState::Cached)),
        "the eu node holds a model restricted to us, mars"
    );
    let sha = deployed["sha256"].as_str().unwrap_or_default();
    let cached = |i: usize| mesh.dir.path().join(format!("node-{i}/cache")).join(sha);
    assert!(!cached(0).exists(), "the artifact reached the eu node");
    assert!(cached(1).exists(), "the us node has the artifact");

    // Unknown or bad query parameters: 400 naming them, and nothing deployed.
    for (query, says) in [
        ("min_replica=1", "unknown field `min_replica`"),
        ("idle_timeout=2s", "unknown field `idle_timeout`"),
        ("region=us", "unknown field `region`"),
        ("accelerator=tpu", "tpu"),
        ("idle_timeout_ms=2s", "idle_timeout_ms"),
        (
            "min_replicas=3&max_replicas=2",
            "min_replicas (3) exceeds max_replicas (2)",
        ),
        ("max_batch_size=0", "max_batch_size must be 1..=1024"),
        ("regions=bad%20label", "region `bad label` is not a label"),
    ] {
        let r = root
            .post(&format!("/admin/v1/models/bad_cls?{query}"), &onnx, &cls)
            .await?;
        assert_error(&r, 400, query);
        let body = String::from_utf8_lossy(&r.body);
        assert!(body.contains(says), "{query}: {body}");
    }
    let r = root.get("/admin/v1/models").await?;
    assert!(!names(&r.json()?).iter().any(|n| n.contains("bad_cls")));

    // Unknown body fields: 400 naming them; nothing changes.
    for (method, path, body, says) in [
        (
            "PATCH",
            "/admin/v1/models/http_cls",
            r#"{"max_batch": 8}"#,
            "`max_batch`",
        ),
        (
            "PATCH",
            "/admin/v1/models/http_cls/versions/5",
            r#"{"idle_timeout": 1}"#,
            "`idle_timeout`",
        ),
        (
            "POST",
            "/admin/v1/tenants",
            r#"{"name": "acme", "quota": {"max_rsp": 5}}"#,
            "`quota.max_rsp`",
        ),
        (
            "POST",
            "/admin/v1/tenants",
            r#"{"name": "acme", "qouta": {}}"#,
            "`qouta`",
        ),
        (
            "POST",
            "/admin/v1/keys",
            r#"{"scopes": ["invoke"], "tenat": "acme"}"#,
            "`tenat`",
        ),
        (
            "PUT",
            "/admin/v1/models/http_cls/traffic",
            r#"[{"version": "5", "weight": 1, "wieght": 1}]"#,
            "wieght",
        ),
        ("POST", "/admin/v1/join-tokens", r#"{"ttl": 60}"#, "`ttl`"),
        (
            "POST",
            "/admin/v1/join-tokens",
            r#"{"ttl_s": 2592001}"#,
            "30 days",
        ),
    ] {
        let r = root.request(method, path, &json_h, body.as_bytes()).await?;
        let what = format!("{method} {path} {body}");
        assert_error(&r, 400, &what);
        assert!(
            String::from_utf8_lossy(&r.body).contains(says),
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let r = root.get("/admin/v1/tenants").await?;
    assert!(!names(&r.json()?).iter().any(|n| n.contains("acme")));
    let listed = root.get("/admin/v1/models").await?.json()?;
    let m = listed
        .as_array()
        .and_then(|a| a.iter().find(|m| m["name"] == "http_cls"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(m["settings"], want, "a refused patch changed nothing");
    // A tenant with a quota, then a quota with a misspelt limit: refused, the quota kept.
    let r = root
        .post(
            "/admin/v1/tenants",
            &json_h,
            br#"{"name": "acme", "quota": {"max_rps": 5}}"#,
        )
        .await?;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = root
        .request(
            "PUT",
            "/admin/v1/tenants/acme/quota",
            &json_h,
            br#"{"max_rsp": 50}"#,
        )
        .await?;
    assert_error(&r, 400, "PUT quota with max_rsp");
    let r = root.get("/admin/v1/tenants").await?.json()?;
    let acme = r
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == "acme"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(acme["quota"]["max_rps"], 5, "{acme}");

    // Unknown query parameters of the listing routes.
    for path in [
        "/admin/v1/usage?model=http_cls&sinse_ms=1",
        "/admin/v1/audit?limt=1",
        "/admin/v1/keys?tenat=acme",
    ] {
        let r = root.get(path).await?;
        assert_error(&r, 400, path);
        assert!(
            String::from_utf8_lossy(&r.body).contains("unknown field"),
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // The valid ones still work.
    assert_eq!(
        root.get("/admin/v1/usage?model=http_cls&since_ms=1&until_ms=99999999999999")
            .await?
            .status,
        200
    );
    let r = root
        .get("/admin/v1/audit?action=models.deploy&limit=1")
        .await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()?.as_array().map(Vec::len), Some(1));
    Ok(())
}
