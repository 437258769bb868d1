//! The node's HTTP ingress (`skein-node --http`, issue 24) against an in-process mesh of an
//! edge node (with the ingress) and a cloud node: a model loaded on the edge node runs there,
//! handed straight to its executor; one loaded only in the cloud is forwarded over the mesh;
//! keys are checked with the coordinator once and cached; a revocation arrives with the next
//! heartbeat answer; cached keys outlive the coordinator only within the offline grace.
//! The unmodified `tritonclient[http]` against the real `skein-node` binary is in
//! `ingress_binary.rs`.

use anyhow::Context;
use skein_gateway::http_client::{HttpClient, HttpResponse};
use skein_node::Node;
use skein_proto::{AdminRequest, AdminResponse, DeploymentSettings};
use skein_tests::{case, check, v2_json_body, v2_json_outputs, wait_for, TestMesh};
use std::time::Duration;

/// An edge node (index 0, region `edge`, HTTP ingress on `127.0.0.1:0`, mDNS off) and a cloud
/// node (index 1, region `cloud`); `ppocr_cls` provisioned on the edge node only and, with
/// `cloud_model`, `ppocr_det` on the cloud node only. `ingress` adjusts the edge node's
/// ingress settings.
pub(crate) async fn edge_and_cloud(
    cloud_model: bool,
    ingress: impl Fn(&mut skein_node::config::HttpIngressConfig),
) -> anyhow::Result<TestMesh> {
    let mut mesh = TestMesh::start(0).await?;
    for (i, region) in ["edge", "cloud"].iter().enumerate() {
        let mut cfg = mesh.node_config(i);
        cfg.labels.insert("region".into(), region.to_string());
        if i == 0 {
            cfg.http.listen = Some("127.0.0.1:0".parse()?);
            cfg.http.mdns = false;
            ingress(&mut cfg.http);
        }
        mesh.nodes.push(Some(Node::start(cfg).await?));
    }
    let models = [("ppocr_cls", "edge"), ("ppocr_det", "cloud")];
    for (model, region) in &models[..if cloud_model { 2 } else { 1 }] {
        let settings = DeploymentSettings {
            min_replicas: 1,
            regions: vec![region.to_string()],
            ..Default::default()
        };
        mesh.deploy_with(model, settings).await?;
        mesh.wait_loaded(model, 1).await?;
    }
    Ok(mesh)
}

/// A key of the `root` tenant (which owns the models the admin deployed) with `scopes`.
pub(crate) async fn root_key(mesh: &TestMesh, scopes: &[&str]) -> anyhow::Result<(String, String)> {
    match mesh
        .client
        .admin(AdminRequest::CreateKey {
            tenant: None,
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            label: Some("ingress-test".into()),
        })
        .await?
    {
        AdminResponse::NewKey(k) => Ok((k.info.id, k.key)),
        other => anyhow::bail!("{other:?}"),
    }
}

fn edge(mesh: &TestMesh) -> &Node {
    mesh.nodes[0].as_ref().expect("edge node")
}

fn cloud(mesh: &TestMesh) -> &Node {
    mesh.nodes[1].as_ref().expect("cloud node")
}

async fn infer(
    http: &mut HttpClient,
    model: &str,
    case_name: &str,
) -> anyhow::Result<HttpResponse> {
    let c = case(model, case_name);
    let body = v2_json_body(&c.inputs);
    Ok(http
        .post(
            &format!("/v2/models/{model}/infer"),
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_ingress_runs_local_models_here_and_forwards_the_rest() -> anyhow::Result<()> {
    let mesh = edge_and_cloud(true, |_| {}).await?;
    let (_, key) = root_key(&mesh, &["invoke"]).await?;
    let addr = edge(&mesh)
        .http_addr()
        .expect("the edge node has an ingress");
    let mut http = HttpClient::new(addr).with_bearer(&key);

    // Loaded here: run here, no hop.
    let r = infer(&mut http, "ppocr_cls", "single").await?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("skein-path"), Some("local"));
    assert_eq!(r.header("skein-node"), Some(edge(&mesh).node_id()));
    let v = r.json()?;
    assert_eq!(v["parameters"]["skein_path"], "local", "{v}");
    assert_eq!(v["parameters"]["skein_node"], edge(&mesh).node_id(), "{v}");
    check(&v2_json_outputs(&r.body)?, &case("ppocr_cls", "single"));

    // Loaded only in the cloud: forwarded over the mesh, and correct.
    let r = infer(&mut http, "ppocr_det", "single_256").await?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("skein-path"), Some("mesh"));
    assert_eq!(r.header("skein-node"), Some(cloud(&mesh).node_id()));
    check(&v2_json_outputs(&r.body)?, &case("ppocr_det", "single_256"));

    // The local call was metered like any call: its record reaches the ledger.
    wait_for(
        "the local call in the usage ledger",
        Duration::from_secs(20),
        || async {
            match mesh
                .client
                .admin(AdminRequest::Usage(Default::default()))
                .await
                .ok()?
            {
                AdminResponse::Usage(rows) => rows
                    .iter()
                    .any(|u| u.model == "ppocr_cls" && u.requests >= 1)
                    .then_some(()),
                _ => None,
            }
        },
    )
    .await?;

    // Health, readiness and metadata on the same port.
    let mut anon = HttpClient::new(addr);
    assert_eq!(anon.get("/v2/health/live").await?.status, 200);
    assert_eq!(anon.get("/v2/health/ready").await?.status, 200);
    let md = http.get("/v2/models/ppocr_cls").await?;
    assert_eq!(md.status, 200);
    assert_eq!(md.json()?["name"], "ppocr_cls");
    // The coordinator lists the ingress address (what `skein nodes` shows).
    let nodes = mesh.client.nodes().await?;
    let me = nodes
        .iter()
        .find(|n| n.node_id == edge(&mesh).node_id())
        .expect("the edge node is listed");
    assert_eq!(me.ingress.as_deref(), Some(addr.to_string().as_str()));
    let other = nodes
        .iter()
        .find(|n| n.node_id == cloud(&mesh).node_id())
        .expect("the cloud node is listed");
    assert_eq!(other.ingress, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_ingress_asks_about_a_key_once_and_hears_of_its_revocation_with_a_heartbeat(
) -> anyhow::Result<()> {
    let mesh = edge_and_cloud(false, |_| {}).await?;
    let addr = edge(&mesh).http_addr().expect("ingress");
    let checks = || edge(&mesh).key_checks();

    // A wrong key and no key: 401, the coordinator asked once per key however often.
    let before = checks();
    let wrong = format!("skn_000000000000_{}", "0".repeat(64));
    for _ in 0..5 {
        let mut bad = HttpClient::new(addr).with_bearer(&wrong);
        assert_eq!(infer(&mut bad, "ppocr_cls", "single").await?.status, 401);
        let mut none = HttpClient::new(addr);
        assert_eq!(infer(&mut none, "ppocr_cls", "single").await?.status, 401);
    }
    assert_eq!(checks() - before, 2, "one check per key");

    // A valid key: checked once, then served from the cache.
    let (id, key) = root_key(&mesh, &["invoke"]).await?;
    let mut http = HttpClient::new(addr).with_bearer(&key);
    let before = checks();
    for _ in 0..5 {
        let r = infer(&mut http, "ppocr_cls", "single").await?;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(checks() - before, 1, "one check for five calls");

    // A key without the invoke scope: 403.
    let (_, usage_only) = root_key(&mesh, &["read-usage"]).await?;
    let mut ro = HttpClient::new(addr).with_bearer(&usage_only);
    assert_eq!(infer(&mut ro, "ppocr_cls", "single").await?.status, 403);

    // Revoked: refused as soon as the next heartbeat answer names it (heartbeats every
    // 100 ms here), long before the 60 s key TTL would end.
    mesh.client
        .admin(AdminRequest::RevokeKey { id: id.clone() })
        .await?;
    let revoked_at = tokio::time::Instant::now();
    wait_for(
        "the revoked key refused",
        Duration::from_secs(5),
        || async {
            let mut http = HttpClient::new(addr).with_bearer(&key);
            let r = infer(&mut http, "ppocr_cls", "single").await.ok()?;
            (r.status == 401).then_some(())
        },
    )
    .await?;
    let took = revoked_at.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "revocation took {took:?}, not one heartbeat"
    );
    // Refused before any routing: a model not loaded here (here: not even deployed) too.
    assert_eq!(
        infer(&mut http, "ppocr_det", "single_256").await?.status,
        401
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_outlive_the_coordinator_only_within_the_offline_grace() -> anyhow::Result<()> {
    let mut mesh = edge_and_cloud(false, |h| {
        h.key_ttl_ms = 300;
        h.key_offline_grace_ms = 4_000;
    })
    .await?;
    let addr = edge(&mesh).http_addr().expect("ingress");
    let (_, key) = root_key(&mesh, &["invoke"]).await?;
    let mut http = HttpClient::new(addr).with_bearer(&key);
    // Taken before the call: the key is cached during it, so its age is at most this.
    let cached_at = tokio::time::Instant::now();
    assert_eq!(infer(&mut http, "ppocr_cls", "single").await?.status, 200);
    mesh.stop_coordinator().await;

    // Past the TTL, within the grace: the local model is still served.
    let r = wait_for(
        "a call past the key TTL",
        Duration::from_secs(5),
        || async {
            if cached_at.elapsed() < Duration::from_millis(400) {
                return None;
            }
            let mut http = HttpClient::new(addr).with_bearer(&key);
            infer(&mut http, "ppocr_cls", "single").await.ok()
        },
    )
    .await?;
    if cached_at.elapsed() < Duration::from_millis(4_300) {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("skein-path"), Some("local"));
    }
    // A key never seen: refused (it cannot be checked), once the node has noticed.
    wait_for(
        "the node to notice the coordinator is gone",
        Duration::from_secs(10),
        || async {
            let r = HttpClient::new(addr).get("/v2/health/ready").await.ok()?;
            (r.status != 200).then_some(())
        },
    )
    .await?;
    let mut unknown =
        HttpClient::new(addr).with_bearer(&format!("skn_111111111111_{}", "1".repeat(64)));
    let r = infer(&mut unknown, "ppocr_cls", "single").await?;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    // Past TTL + grace: refused as well.
    let r = wait_for(
        "the cached key refused after its grace",
        Duration::from_secs(20),
        || async {
            let mut http = HttpClient::new(addr).with_bearer(&key);
            let r = infer(&mut http, "ppocr_cls", "single").await.ok()?;
            (r.status != 200).then_some(r)
        },
    )
    .await?;
    assert!(
        cached_at.elapsed() >= Duration::from_millis(4_300),
        "refused after {:?}, before TTL + grace: {} {}",
        cached_at.elapsed(),
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    Ok(())
}

/// The Python of the venv with tritonclient: `SKEIN_TEST_PYTHON` (set by `scripts/test`), else
/// `target/py-venv` when `scripts/tritonclient-check` made it.
fn python() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("SKEIN_TEST_PYTHON") {
        return Some(p.into());
    }
    let p = skein_tests::models_dir().join("../target/py-venv/bin/python");
    p.exists().then_some(p)
}

/// `Some(ADDR)` as the node's JSON log writes an optional address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_against_the_ingress_of_the_skein_node_binary() -> anyhow::Result<()> {
    let Some(python) = python() else {
        eprintln!(
            "skipped: no Python with tritonclient (SKEIN_TEST_PYTHON unset and no target/py-venv; \
             ./scripts/test makes it)"
        );
        return Ok(());
    };
    let mut mesh = TestMesh::start(0).await?;
    // The edge node: the real binary, with `--http`.
    let mut cfg = mesh.node_config(0);
    cfg.labels.insert("region".into(), "edge".into());
    cfg.metrics_listen = Some("127.0.0.1:0".parse()?);
    // The per-key rate, from the config file: room for the Python check, then a refill of one
    // request a second (checked after it).
    cfg.http.key_rps = 1;
    cfg.http.key_burst = 300;
    let edge = skein_tests::RealNode::spawn_in(None, &cfg, &["--http", "127.0.0.1:0"]).await?;
    let edge_id = edge.node_id.clone();
    let http = edge
        .http
        .clone()
        .context("no HTTP ingress in the node's log")?;
    let metrics = edge.metrics;
    // The cloud node, in this process.
    let mut cfg = mesh.node_config(1);
    cfg.labels.insert("region".into(), "cloud".into());
    let cloud = Node::start(cfg).await?;
    let cloud_id = cloud.node_id().to_string();
    mesh.nodes.push(Some(cloud));
    for (model, region) in [("ppocr_cls", "edge"), ("ppocr_det", "cloud")] {
        let settings = DeploymentSettings {
            min_replicas: 1,
            regions: vec![region.into()],
            ..Default::default()
        };
        mesh.deploy_with(model, settings).await?;
    }
    mesh.wait_loaded("ppocr_cls", 1).await?;
    mesh.wait_loaded("ppocr_det", 1).await?;
    // The coordinator's gateway, for the admin REST calls (create and revoke a key).
    let gw =
        skein_tests::TestGateway::start(&mesh, skein_gateway::GatewayConfig::default()).await?;
    let key_file = mesh.dir.path().join("admin-key");
    std::fs::write(&key_file, &gw.key)?;
    let hb_ms = skein_tests::fast_coordinator(mesh.dir.path().into())
        .heartbeat_interval
        .as_millis()
        .to_string();
    let args = [
        skein_tests::models_dir()
            .join("../tests/python/ingress_check.py")
            .display()
            .to_string(),
        http.clone(),
        format!("http://{metrics}/metrics"),
        format!("http://{}", gw.addr),
        key_file.display().to_string(),
        skein_tests::models_dir().display().to_string(),
        edge_id,
        cloud_id,
        hb_ms,
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python).args(&args).output()
    })
    .await??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    anyhow::ensure!(out.status.success(), "ingress_check.py failed: {text}");
    // `[http] key_rps = 1, key_burst = 300` of the binary's config: one key's requests are
    // refused with 429 and Retry-After once its burst is spent (an empty body is refused with
    // 400 after the rate check, so nothing runs).
    let mut client = HttpClient::new(http.parse()?).with_bearer(&gw.key);
    let mut first_429 = None;
    for i in 0..400 {
        let r = client
            .post(
                "/v2/models/ppocr_cls/infer",
                &[("Content-Type", "application/json")],
                b"{}",
            )
            .await?;
        match r.status {
            429 => {
                anyhow::ensure!(r.header("retry-after").is_some(), "429 without Retry-After");
                first_429 = Some(i);
                break;
            }
            400 => {}
            s => anyhow::bail!(
                "request {i}: status {s}: {}",
                String::from_utf8_lossy(&r.body)
            ),
        }
    }
    let i = first_429.ok_or_else(|| anyhow::anyhow!("no 429 in 400 requests of one key"))?;
    anyhow::ensure!(
        i <= 310, // the burst, plus one refill a second while the loop ran
        "the 429 came after {i} requests, well beyond the burst of 300"
    );
    drop(edge);
    Ok(())
}

/// The ingress's DNS-SD record, advertised by the node's own code and found by a browser, in a
/// network namespace of the test's own (multicast never leaves this machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_is_found_over_mdns_as_skein_v2_tcp() -> anyhow::Result<()> {
    if !skein_tests::NetNs::required() {
        return Ok(());
    }
    let ns = skein_tests::NetNs::create(41)?;
    let node_id = "9c1f0d3a5b7e4c2f8a6d1e0b3c5a7f9e";
    let listen = format!("{}:8080", ns.ns_ip);
    let out = tokio::task::spawn_blocking({
        let name = ns.name.clone();
        move || {
            std::process::Command::new("ip")
                .args(["netns", "exec", &name, env!("CARGO_BIN_EXE_mdns-check")])
                .args([listen.as_str(), node_id])
                .output()
        }
    })
    .await??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "mdns-check failed: {text}");
    assert!(text.contains(&format!("found {node_id}")), "{text}");
    assert!(text.contains(&ns.ns_ip.to_string()), "{text}");
    assert!(text.trim_end().ends_with(" 8080"), "{text}");
    Ok(())
}
