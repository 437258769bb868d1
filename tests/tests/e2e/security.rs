//! Tenancy and security end to end: every control request, HTTP endpoint and node call is
//! refused without credentials, with a revoked or malformed key, with a key of the wrong scope
//! or of the wrong tenant; route tickets that are missing, forged, foreign, expired or for
//! another model are refused by nodes; join tokens admit one node; a revoked node is cut off;
//! rotating the ticket key drops no call; quotas trip and recover; admin actions are audited.

use skein_client::{ApiKey, Client, ClientConfig, Profile};
use skein_net::endpoint::{client_config, connect, TransportLimits};
use skein_proto::{
    AdminRequest, AdminResponse, AuditQuery, CtlRequest, CtlResponse, DeploymentSettings,
    ErrorCode, InferRequest, InferResponse, Quota, RouteTicket, SettingsPatch, SignedTicket,
    Tensor, UsageQuery, ALPN_INFER,
};
use skein_tests::{case, model_bytes, wait_for, Load, TestGateway, TestMesh};
use std::time::Duration;

/// The result of a call as the table compares it: `None` for success, else the error code.
fn outcome<T>(r: &Result<T, skein_client::Error>) -> Option<ErrorCode> {
    match r {
        Ok(_) => None,
        Err(e) => Some(e.code().unwrap_or(ErrorCode::Internal)),
    }
}

async fn client_with(mesh: &TestMesh, key: &str) -> anyhow::Result<Client> {
    let p = Profile::with_key(
        mesh.coordinator().addr().to_string(),
        &mesh.coordinator().ca_pem(),
        key,
    );
    Ok(Client::from_profile_with(
        &p,
        ClientConfig {
            timeout: Duration::from_secs(20),
            ..ClientConfig::default()
        },
    )
    .await?)
}

async fn new_key(mesh: &TestMesh, tenant: &str, scopes: &[&str]) -> anyhow::Result<String> {
    match mesh
        .client
        .admin(AdminRequest::CreateKey {
            tenant: Some(tenant.into()),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            label: None,
        })
        .await?
    {
        AdminResponse::NewKey(k) => Ok(k.key),
        other => anyhow::bail!("{other:?}"),
    }
}

async fn new_tenant(mesh: &TestMesh, name: &str, quota: Quota) -> anyhow::Result<()> {
    mesh.client
        .admin(AdminRequest::CreateTenant {
            name: name.into(),
            quota,
        })
        .await?;
    Ok(())
}

/// Tenants `acme` (owns the private model `acme_cls`) and `beta`; keys of every kind.
struct World {
    mesh: TestMesh,
    root: String,
    acme_admin: String,
    acme_deploy: String,
    acme_invoke: String,
    acme_usage: String,
    beta_invoke: String,
    beta_deploy: String,
    revoked: String,
}

async fn world() -> anyhow::Result<World> {
    let mesh = TestMesh::start(1).await?;
    let root = mesh.profile.api_key.clone().unwrap_or_default();
    // The platform's own private model.
    mesh.deploy("ppocr_cls").await?;
    new_tenant(&mesh, "acme", Quota::default()).await?;
    new_tenant(&mesh, "beta", Quota::default()).await?;
    let acme_admin = new_key(&mesh, "acme", &["admin"]).await?;
    let acme_deploy = new_key(&mesh, "acme", &["deploy"]).await?;
    let acme_invoke = new_key(&mesh, "acme", &["invoke"]).await?;
    let acme_usage = new_key(&mesh, "acme", &["read-usage"]).await?;
    let beta_invoke = new_key(&mesh, "beta", &["invoke"]).await?;
    let beta_deploy = new_key(&mesh, "beta", &["deploy"]).await?;
    let revoked = new_key(&mesh, "acme", &["admin"]).await?;
    let revoked_id = revoked.split('_').nth(1).unwrap_or_default().to_string();
    mesh.client
        .admin(AdminRequest::RevokeKey { id: revoked_id })
        .await?;
    // acme deploys its own private model.
    let acme = client_with(&mesh, &acme_deploy).await?;
    let settings = DeploymentSettings {
        min_replicas: 1,
        ..Default::default()
    };
    let info = acme
        .deploy_with(
            "acme_cls",
            None,
            &model_bytes("ppocr_cls"),
            settings,
            |_| {},
        )
        .await?;
    assert_eq!(info.owner, "acme");
    mesh.wait_loaded("acme_cls", 1).await?;
    Ok(World {
        mesh,
        root,
        acme_admin,
        acme_deploy,
        acme_invoke,
        acme_usage,
        beta_invoke,
        beta_deploy,
        revoked,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_control_request_refuses_missing_revoked_wrong_scope_and_wrong_tenant_keys(
) -> anyhow::Result<()> {
    let w = world().await?;
    let c = &w.mesh.client;
    let admin = |r: AdminRequest| CtlRequest::Admin(r);
    let key = |k: &str| Some(ApiKey::new(k));
    let resolve = CtlRequest::Resolve(skein_proto::ResolveRequest {
        model: "acme_cls".into(),
        version: None,
        position: Default::default(),
        payload_bytes: 0,
        trace: None,
    });
    // (request, [wrong-scope key, expected], [wrong-tenant key, expected], right key, expected)
    type Row<'a> = (
        &'a str,
        CtlRequest,
        Option<(&'a str, ErrorCode)>,
        Option<(&'a str, ErrorCode)>,
        &'a str,
        Option<ErrorCode>,
    );
    let rows: Vec<Row> = vec![
        (
            "resolve",
            resolve,
            Some((&w.acme_usage, ErrorCode::Forbidden)),
            Some((&w.beta_invoke, ErrorCode::UnknownModel)),
            &w.acme_invoke,
            None,
        ),
        (
            "scale",
            CtlRequest::Scale {
                name: "acme_cls".into(),
                version: None,
                patch: SettingsPatch {
                    max_batch_size: Some(1),
                    ..Default::default()
                },
            },
            Some((&w.acme_invoke, ErrorCode::Forbidden)),
            Some((&w.beta_deploy, ErrorCode::UnknownModel)),
            &w.acme_deploy,
            None,
        ),
        (
            "set traffic",
            CtlRequest::SetTraffic {
                name: "acme_cls".into(),
                weights: vec![],
            },
            Some((&w.acme_invoke, ErrorCode::Forbidden)),
            Some((&w.beta_deploy, ErrorCode::UnknownModel)),
            &w.acme_deploy,
            None,
        ),
        (
            "get traffic",
            CtlRequest::GetTraffic {
                name: "acme_cls".into(),
            },
            None,
            Some((&w.beta_invoke, ErrorCode::UnknownModel)),
            &w.acme_invoke,
            None,
        ),
        (
            "list nodes",
            CtlRequest::ListNodes,
            Some((&w.acme_admin, ErrorCode::Forbidden)),
            None,
            &w.root,
            None,
        ),
        (
            "create key",
            admin(AdminRequest::CreateKey {
                tenant: Some("acme".into()),
                scopes: vec!["invoke".into()],
                label: None,
            }),
            Some((&w.acme_invoke, ErrorCode::Forbidden)),
            Some((&w.beta_deploy, ErrorCode::Forbidden)),
            &w.acme_admin,
            None,
        ),
        (
            "list keys",
            admin(AdminRequest::ListKeys {
                tenant: Some("beta".into()),
            }),
            Some((&w.acme_usage, ErrorCode::Forbidden)),
            Some((&w.acme_admin, ErrorCode::Forbidden)),
            &w.root,
            None,
        ),
        (
            "usage",
            admin(AdminRequest::Usage(UsageQuery {
                tenant: Some("acme".into()),
                ..Default::default()
            })),
            Some((&w.acme_invoke, ErrorCode::Forbidden)),
            Some((&w.beta_invoke, ErrorCode::Forbidden)),
            &w.acme_usage,
            None,
        ),
        (
            "audit",
            admin(AdminRequest::Audit(AuditQuery {
                tenant: Some("acme".into()),
                ..Default::default()
            })),
            Some((&w.acme_usage, ErrorCode::Forbidden)),
            Some((&w.beta_deploy, ErrorCode::Forbidden)),
            &w.acme_admin,
            None,
        ),
        (
            "create tenant",
            admin(AdminRequest::CreateTenant {
                name: "gamma".into(),
                quota: Quota::default(),
            }),
            Some((&w.acme_admin, ErrorCode::Forbidden)),
            None,
            &w.root,
            None,
        ),
        (
            "mint join token",
            admin(AdminRequest::MintJoinToken {
                ttl_s: 60,
                uses: 1,
                labels: Default::default(),
            }),
            Some((&w.acme_admin, ErrorCode::Forbidden)),
            None,
            &w.root,
            None,
        ),
        (
            "revoke node",
            admin(AdminRequest::RevokeNode {
                node_id: "no-such-node".into(),
            }),
            Some((&w.acme_admin, ErrorCode::Forbidden)),
            None,
            &w.root,
            Some(ErrorCode::NotFound),
        ),
        (
            "rotate ticket key",
            admin(AdminRequest::RotateTicketKey),
            Some((&w.acme_admin, ErrorCode::Forbidden)),
            None,
            &w.root,
            None,
        ),
        (
            "fetch artifact",
            CtlRequest::FetchArtifact {
                sha256: "0".repeat(64),
                offset: 0,
            },
            Some((&w.acme_invoke, ErrorCode::Forbidden)),
            None,
            &w.acme_deploy,
            Some(ErrorCode::UnknownArtifact),
        ),
        (
            "list models",
            CtlRequest::ListModels,
            None,
            None,
            &w.beta_invoke,
            None,
        ),
    ];
    let malformed = "skn_not-a-key";
    let unknown = format!("skn_{}_{}", "0".repeat(12), "0".repeat(64));
    for (what, req, scope, tenant, right, expected) in rows {
        for (label, k) in [
            ("no key", None),
            ("malformed key", key(malformed)),
            ("unknown key", key(&unknown)),
            ("revoked key", key(&w.revoked)),
        ] {
            let r = c.control_as(&req, k.as_ref()).await;
            assert_eq!(
                outcome(&r),
                Some(ErrorCode::Unauthenticated),
                "{what} with {label}: {r:?}"
            );
        }
        for (label, wrong) in [("wrong scope", scope), ("wrong tenant", tenant)] {
            if let Some((k, want)) = wrong {
                let r = c.control_as(&req, key(k).as_ref()).await;
                assert_eq!(outcome(&r), Some(want), "{what} with a {label} key: {r:?}");
            }
        }
        let r = c.control_as(&req, key(right).as_ref()).await;
        assert_eq!(outcome(&r), expected, "{what} with the right key: {r:?}");
    }

    // Deploying: an invoke key may not, and beta may not take over acme's model name.
    let invoke = client_with(&w.mesh, &w.acme_invoke).await?;
    let r = invoke.deploy("x", None, b"irrelevant", |_| {}).await;
    assert_eq!(outcome(&r), Some(ErrorCode::Forbidden), "{r:?}");
    let beta = client_with(&w.mesh, &w.beta_deploy).await?;
    let r = beta
        .deploy("acme_cls", None, &model_bytes("ppocr_cls"), |_| {})
        .await;
    assert_eq!(outcome(&r), Some(ErrorCode::Forbidden), "{r:?}");

    // Artifacts: acme may download its model's bytes, beta may not even learn they exist.
    let acme_sha = match c.control(&CtlRequest::ListModels).await? {
        CtlResponse::Models(m) => m
            .into_iter()
            .find(|m| m.name == "acme_cls")
            .map(|m| m.sha256)
            .unwrap_or_default(),
        other => anyhow::bail!("{other:?}"),
    };
    let acme_deploy = client_with(&w.mesh, &w.acme_deploy).await?;
    assert_eq!(
        acme_deploy.fetch_artifact(&acme_sha).await?,
        model_bytes("ppocr_cls")
    );
    let r = beta.fetch_artifact(&acme_sha).await;
    assert_eq!(outcome(&r), Some(ErrorCode::UnknownArtifact), "{r:?}");

    // Listing: each tenant sees its own models (and shared ones) only.
    let names = |k: String| {
        let c = c.clone();
        async move {
            match c
                .control_as(&CtlRequest::ListModels, Some(&ApiKey::new(k)))
                .await?
            {
                CtlResponse::Models(m) => {
                    Ok::<_, anyhow::Error>(m.into_iter().map(|m| m.name).collect::<Vec<_>>())
                }
                other => anyhow::bail!("{other:?}"),
            }
        }
    };
    assert_eq!(names(w.beta_invoke.clone()).await?, Vec::<String>::new());
    assert_eq!(names(w.acme_invoke.clone()).await?, vec!["acme_cls"]);
    let mut all = names(w.root.clone()).await?;
    all.dedup();
    assert_eq!(all, vec!["acme_cls", "ppocr_cls"]);
    // Sharing makes a model visible and callable for every tenant.
    c.scale(
        "ppocr_cls",
        None,
        SettingsPatch {
            shared: Some(true),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(names(w.beta_invoke.clone()).await?, vec!["ppocr_cls"]);
    let beta_invoke = client_with(&w.mesh, &w.beta_invoke).await?;
    let single = case("ppocr_cls", "single");
    beta_invoke
        .infer("ppocr_cls", single.inputs.clone())
        .await?;
    // ... but not changeable by them.
    let r = beta
        .scale("ppocr_cls", None, SettingsPatch::default())
        .await;
    assert_eq!(outcome(&r), Some(ErrorCode::Forbidden), "{r:?}");

    // The audit log has the refusals and the successes, with who did them.
    let audit = match c
        .admin(AdminRequest::Audit(AuditQuery {
            action: Some("models.deploy".into()),
            ..Default::default()
        }))
        .await?
    {
        AdminResponse::Audit(a) => a,
        other => anyhow::bail!("{other:?}"),
    };
    let acme_deploy_id = w.acme_deploy.split('_').nth(1).unwrap_or_default();
    assert!(audit.iter().any(|a| a.actor == acme_deploy_id
        && a.target.starts_with("acme_cls")
        && a.result == "ok"));
    assert!(audit
        .iter()
        .any(|a| a.tenant == "beta" && a.result == "forbidden"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_surface_refuses_callers_without_the_right_key() -> anyhow::Result<()> {
    use base64::Engine;
    let w = world().await?;
    let gw = TestGateway::start(&w.mesh, skein_gateway::GatewayConfig::default()).await?;
    let single = case("ppocr_cls", "single");
    let x = &single.inputs[0];
    let body = skein_tests::v2_json_body(std::slice::from_ref(x));
    let endpoints: Vec<(&str, &str)> = vec![
        ("GET", "/v2"),
        ("GET", "/v2/models/acme_cls"),
        ("GET", "/v2/models/acme_cls/ready"),
        ("POST", "/v2/models/acme_cls/infer"),
        ("GET", "/metrics"),
    ];
    let mut http = gw.http_anonymous();
    let bearer = |k: &str| Some(format!("Bearer {k}"));
    for (method, path) in endpoints.iter().copied() {
        for (label, auth) in [
            ("no key", None),
            ("garbage scheme", Some("Token abc".to_string())),
            (
                "unknown key",
                bearer(&format!("skn_{}_{}", "1".repeat(12), "2".repeat(64))),
            ),
            ("revoked key", bearer(&w.revoked)),
        ] {
            let r = http_call(&mut http, &body, method, path, auth).await?;
            assert_eq!(
                r.status,
                401,
                "{method} {path} with {label}: {}",
                String::from_utf8_lossy(&r.body)
            );
            assert!(r.header("www-authenticate").is_some());
            assert!(r.json()?["error"].is_string());
        }
        let right = http_call(&mut http, &body, method, path, bearer(&w.acme_invoke)).await?;
        assert_eq!(
            right.status,
            200,
            "{method} {path}: {}",
            String::from_utf8_lossy(&right.body)
        );
    }
    // Another tenant does not even learn the model exists.
    for (method, path) in &endpoints[1..4] {
        let r = http_call(&mut http, &body, method, path, bearer(&w.beta_invoke)).await?;
        assert_eq!(r.status, 404, "{method} {path} as beta");
    }
    // A key of the wrong scope may look but not call.
    let r = http_call(
        &mut http,
        &body,
        "POST",
        "/v2/models/acme_cls/infer",
        bearer(&w.acme_usage),
    )
    .await?;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    // tritonclient's BasicAuth plugin: the key as password.
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("skein:{}", w.acme_invoke))
    );
    let r = http_call(
        &mut http,
        &body,
        "POST",
        "/v2/models/acme_cls/infer",
        Some(basic),
    )
    .await?;
    assert_eq!(r.status, 200);
    // The probes need nothing.
    for path in ["/v2/health/live", "/v2/health/ready"] {
        assert_eq!(
            http_call(&mut http, &body, "GET", path, None).await?.status,
            200,
            "{path}"
        );
    }
    Ok(())
}

/// One HTTP request with an optional `Authorization` value; `body` only for POST.
async fn http_call(
    http: &mut skein_gateway::http_client::HttpClient,
    body: &str,
    method: &str,
    path: &str,
    auth: Option<String>,
) -> anyhow::Result<skein_gateway::http_client::HttpResponse> {
    let h: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let b: &[u8] = if method == "POST" {
        body.as_bytes()
    } else {
        &[]
    };
    Ok(http.request(method, path, &h, b).await?)
}

/// One raw inference request straight to `node`, with `ticket`.
async fn raw_infer(
    mesh: &TestMesh,
    addr: &str,
    node_id: &str,
    model: &str,
    inputs: &[Tensor],
    ticket: SignedTicket,
) -> anyhow::Result<InferResponse> {
    let limits = TransportLimits::default();
    let cfg = client_config(&mesh.profile.credentials(), ALPN_INFER, &limits)?;
    let ep = skein_net::client_endpoint("127.0.0.1:0".parse()?)?;
    let conn = connect(
        &ep,
        cfg,
        addr.parse()?,
        &skein_net::node_server_name(node_id),
        Duration::from_secs(5),
    )
    .await?;
    let req = InferRequest {
        id: 1,
        model: model.into(),
        version: None,
        inputs: inputs.iter().map(|t| t.descriptor()).collect(),
        outputs: vec![],
        timeout_ms: Some(10_000),
        ticket,
        trace: None,
        kind: skein_proto::RequestKind::Infer,
    };
    let parts: Vec<skein_proto::Bytes> = inputs.iter().map(|t| t.bytes().clone()).collect();
    let frame = skein_net::stream::call(&conn, &req, &parts, limits.max_frame_len).await?;
    Ok(frame.header()?)
}

fn refused(r: &InferResponse) -> Option<ErrorCode> {
    match r {
        InferResponse::Err(e) => Some(e.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_refuse_missing_forged_foreign_and_wrong_model_tickets() -> anyhow::Result<()> {
    let w = world().await?;
    let acme = client_with(&w.mesh, &w.acme_invoke).await?;
    let route = acme.resolve("acme_cls", None).await?;
    let node = &route.candidates[0];
    let inputs = case("ppocr_cls", "single").inputs;
    let call = |model: &'static str, t: SignedTicket| {
        raw_infer(&w.mesh, &node.addr, &node.node_id, model, &inputs, t)
    };
    // The genuine ticket works.
    assert_eq!(
        refused(&call("acme_cls", route.ticket.clone()).await?),
        None
    );
    // None at all.
    assert_eq!(
        refused(&call("acme_cls", SignedTicket::default()).await?),
        Some(ErrorCode::InvalidTicket)
    );
    // One bit of the signature flipped; one bit of the body (say, the tenant) flipped.
    let mut forged = route.ticket.clone();
    forged.signature[0] ^= 1;
    assert_eq!(
        refused(&call("acme_cls", forged).await?),
        Some(ErrorCode::InvalidTicket)
    );
    let mut forged = route.ticket.clone();
    let last = forged.body.len() - 1;
    forged.body[last] ^= 1;
    assert_eq!(
        refused(&call("acme_cls", forged).await?),
        Some(ErrorCode::InvalidTicket)
    );
    // Well formed, signed by a key this mesh never published.
    let other = skein_net::ticket::TicketSigner::ephemeral(0)?;
    let foreign = other.sign(
        RouteTicket {
            key_id: 0,
            tenant: "root".into(),
            model: "acme_cls".into(),
            versions: vec!["1".into()],
            expires_unix_ms: u64::MAX / 2,
            max_rps: None,
            max_concurrent: None,
            issued_unix_ms: 0,
            offline_validity_ms: 0,
        },
        0,
    );
    assert_eq!(
        refused(&call("acme_cls", foreign).await?),
        Some(ErrorCode::InvalidTicket)
    );
    // A genuine ticket for acme_cls is no ticket for ppocr_cls.
    assert_eq!(
        refused(&call("ppocr_cls", route.ticket.clone()).await?),
        Some(ErrorCode::InvalidTicket)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tickets_are_refused() -> anyhow::Result<()> {
    // Tickets valid for 1 ms, nodes tolerating no clock skew.
    let mesh = TestMesh::start_with(
        1,
        |c| c.security.ticket_ttl = Duration::from_millis(1),
        |n| n.ticket_clock_skew_ms = 0,
    )
    .await?;
    mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    let route = mesh.client.resolve("ppocr_cls", None).await?;
    let node = &route.candidates[0];
    // Let the wall clock pass the expiry (this waits for time itself, not for another task).
    tokio::time::sleep(Duration::from_millis(20)).await;
    let inputs = case("ppocr_cls", "single").inputs;
    let r = raw_infer(
        &mesh,
        &node.addr,
        &node.node_id,
        "ppocr_cls",
        &inputs,
        route.ticket,
    )
    .await?;
    match r {
        InferResponse::Err(e) => {
            assert_eq!(e.code, ErrorCode::InvalidTicket);
            assert!(e.message.contains("expired"), "{e}");
        }
        other => panic!("an expired ticket was accepted: {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_admit_one_node_and_a_revoked_node_is_cut_off() -> anyhow::Result<()> {
    let mut mesh = TestMesh::start(0).await?;
    let token = mesh.coordinator().mint_join_token(None)?;
    let mut a = mesh.node_config(0);
    a.join_token = Some(token.clone());
    mesh.nodes.push(Some(skein_node::Node::start(a).await?));
    // The same token again: refused.
    let mut again = mesh.node_config(1);
    again.join_token = Some(token);
    let e = skein_node::Node::start(again)
        .await
        .expect_err("used token");
    assert_eq!(
        skein_tests::wire_error(&e).map(|w| w.code),
        Some(ErrorCode::InvalidJoinToken),
        "{e:#}"
    );
    let b = mesh.node_config(2);
    mesh.nodes.push(Some(skein_node::Node::start(b).await?));
    mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 2).await?;
    let victim = mesh.nodes[0]
        .as_ref()
        .map(|n| n.node_id().to_string())
        .unwrap_or_default();
    let victim_addr = mesh.nodes[0]
        .as_ref()
        .map(|n| n.addr().to_string())
        .unwrap_or_default();
    let ticket = mesh.client.resolve("ppocr_cls", None).await?.ticket;
    match mesh
        .client
        .admin(AdminRequest::RevokeNode {
            node_id: victim.clone(),
        })
        .await?
    {
        AdminResponse::Done => {}
        other => anyhow::bail!("{other:?}"),
    }
    // Gone from the mesh at once, and it stops serving as soon as its next heartbeat is
    // refused (even to a caller holding a valid ticket).
    let nodes = mesh.client.nodes().await?;
    assert!(nodes.iter().all(|n| n.node_id != victim));
    let route = mesh.client.resolve("ppocr_cls", None).await?;
    assert!(route.candidates.iter().all(|c| c.node_id != victim));
    let inputs = case("ppocr_cls", "single").inputs;
    wait_for(
        "the revoked node to refuse work",
        Duration::from_secs(10),
        || {
            let (mesh, addr, id, inputs, t) =
                (&mesh, &victim_addr, &victim, &inputs, ticket.clone());
            async move {
                let r = raw_infer(mesh, addr, id, "ppocr_cls", inputs, t)
                    .await
                    .ok()?;
                (refused(&r) == Some(ErrorCode::ShuttingDown)).then_some(())
            }
        },
    )
    .await?;
    for _ in 0..10 {
        let r = mesh.client.infer("ppocr_cls", inputs.clone()).await?;
        assert_ne!(r.meta.node, victim);
    }
    // Its certificate no longer works for anything.
    let audit = match mesh
        .client
        .admin(AdminRequest::Audit(AuditQuery {
            action: Some("nodes.revoke".into()),
            ..Default::default()
        }))
        .await?
    {
        AdminResponse::Audit(a) => a,
        other => anyhow::bail!("{other:?}"),
    };
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].target, victim);
    // The identity stays revoked: the same node (same key) with a brand-new token is refused.
    let dir = mesh.node_config(0).data_dir;
    if let Some(n) = mesh.nodes[0].take() {
        n.shutdown().await;
    }
    let mut again = mesh.node_config(0);
    again.data_dir = dir;
    let e = skein_node::Node::start(again)
        .await
        .expect_err("revoked identity");
    assert_eq!(
        skein_tests::wire_error(&e).map(|w| w.code),
        Some(ErrorCode::Forbidden),
        "{e:#}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_ticket_key_under_load_fails_no_call() -> anyhow::Result<()> {
    let mesh = TestMesh::start(2).await?;
    mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 2).await?;
    let load = Load::start(&mesh.client, "ppocr_cls", &case("ppocr_cls", "single"), 4);
    load.run_for(20).await?;
    let keys = match mesh.client.admin(AdminRequest::RotateTicketKey).await? {
        AdminResponse::TicketKeys(k) => k,
        other => anyhow::bail!("{other:?}"),
    };
    assert_eq!(keys.len(), 2);
    // Well past the new key's activation (3 heartbeats) and a route TTL.
    let after = load.elapsed() + Duration::from_secs(2);
    load.run_past(after, 20).await?;
    let outcomes = load.stop().await?;
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    assert!(
        failed.is_empty(),
        "calls failed across the rotation: {failed:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_trip_with_429_and_recover() -> anyhow::Result<()> {
    let mesh = TestMesh::start(1).await?;
    let info = mesh
        .deploy_with(
            "ppocr_cls",
            DeploymentSettings {
                min_replicas: 1,
                shared: true,
                ..Default::default()
            },
        )
        .await?;
    assert!(info.settings.shared);
    mesh.wait_loaded("ppocr_cls", 1).await?;
    new_tenant(
        &mesh,
        "small",
        Quota {
            max_rps: Some(3),
            ..Default::default()
        },
    )
    .await?;
    let key = new_key(&mesh, "small", &["invoke", "read-usage"]).await?;
    let small = client_with(&mesh, &key).await?;
    let inputs = case("ppocr_cls", "single").inputs;

    // Rate: a burst of 12 at once gets at most 3 (the bucket) plus a refill through.
    let burst = futures_all(&small, &inputs, 12).await;
    let ok = burst.iter().filter(|r| r.is_none()).count();
    let limited: Vec<_> = burst
        .iter()
        .filter(|r| matches!(r, Some((ErrorCode::QuotaExceeded, Some(_)))))
        .collect();
    assert!((1..=6).contains(&ok), "{burst:?}");
    assert_eq!(ok + limited.len(), 12, "{burst:?}");
    // It recovers as the bucket refills.
    wait_for(
        "the rate limit to let a call through",
        Duration::from_secs(5),
        || {
            let (small, inputs) = (&small, &inputs);
            async move { small.infer("ppocr_cls", inputs.clone()).await.ok() }
        },
    )
    .await?;

    // Monthly compute budget: 1 µs, spent by what was just served; the ledger shows it and
    // the next resolve is refused until the quota is raised.
    mesh.client
        .admin(AdminRequest::SetQuota {
            name: "small".into(),
            quota: Quota {
                monthly_compute_us: Some(1),
                ..Default::default()
            },
        })
        .await?;
    wait_for("usage in the ledger", Duration::from_secs(10), || {
        let small = &small;
        async move {
            let rows = small.usage(UsageQuery::default()).await.ok()?;
            (rows.iter().map(|r| r.requests).sum::<u64>() > ok as u64).then_some(())
        }
    })
    .await?;
    let e = wait_for("the budget to trip", Duration::from_secs(10), || {
        let small = &small;
        async move {
            match small.resolve("ppocr_cls", None).await {
                Err(skein_client::Error::Remote(e)) if e.code == ErrorCode::QuotaExceeded => {
                    Some(e)
                }
                _ => None,
            }
        }
    })
    .await?;
    assert!(e.retry_after_ms.is_some_and(|ms| ms > 0), "{e:?}");
    // The HTTP gateway says 429 with Retry-After.
    let gw = TestGateway::start(&mesh, skein_gateway::GatewayConfig::default()).await?;
    let mut http = skein_gateway::http_client::HttpClient::new(gw.addr).with_bearer(&key);
    let x = &inputs[0];
    let body = skein_tests::v2_json_body(std::slice::from_ref(x));
    let r = http
        .post("/v2/models/ppocr_cls/infer", &[], body.as_bytes())
        .await?;
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert!(r
        .header("retry-after")
        .and_then(|s| s.parse::<u64>().ok())
        .is_some_and(|s| s > 0));
    // Raised again: calls go through.
    mesh.client
        .admin(AdminRequest::SetQuota {
            name: "small".into(),
            quota: Quota::default(),
        })
        .await?;
    wait_for("the budget to be lifted", Duration::from_secs(10), || {
        let (small, inputs) = (&small, &inputs);
        async move { small.infer("ppocr_cls", inputs.clone()).await.ok() }
    })
    .await?;
    Ok(())
}

/// `n` calls at once; per call `None` on success, else the code and retry hint.
async fn futures_all(
    client: &Client,
    inputs: &[Tensor],
    n: usize,
) -> Vec<Option<(ErrorCode, Option<u64>)>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (c, i) = (client.clone(), inputs.to_vec());
            tokio::spawn(async move { c.infer("ppocr_cls", i).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(match t.await {
            Ok(Ok(_)) => None,
            Ok(Err(skein_client::Error::Remote(e))) => Some((e.code, e.retry_after_ms)),
            Ok(Err(e)) => Some((e.code().unwrap_or(ErrorCode::Internal), None)),
            Err(_) => Some((ErrorCode::Internal, None)),
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_rest_api_manages_tenants_keys_models_and_usage() -> anyhow::Result<()> {
    let mesh = TestMesh::start(1).await?;
    let gw = TestGateway::start(&mesh, skein_gateway::GatewayConfig::default()).await?;
    let mut root = gw.http();
    let mut anon = gw.http_anonymous();
    let json_h = [("Content-Type", "application/json")];
    // Every admin endpoint needs a key.
    for (method, path) in [
        ("GET", "/admin/v1/whoami"),
        ("GET", "/admin/v1/models"),
        ("GET", "/admin/v1/nodes"),
        ("GET", "/admin/v1/tenants"),
        ("GET", "/admin/v1/keys"),
        ("GET", "/admin/v1/usage"),
        ("GET", "/admin/v1/audit"),
        ("POST", "/admin/v1/join-tokens"),
        ("POST", "/admin/v1/ticket-keys/rotate"),
        ("POST", "/admin/v1/tenants"),
        ("DELETE", "/admin/v1/keys/abc"),
    ] {
        let r = anon.request(method, path, &json_h, b"{}").await?;
        assert_eq!(r.status, 401, "{method} {path}");
    }
    // A tenant, a deploy+invoke key for it, made over HTTP.
    let r = root
        .post(
            "/admin/v1/tenants",
            &json_h,
            br#"{"name": "acme", "quota": {"max_rps": 1000}}"#,
        )
        .await?;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()?["quota"]["max_rps"], 1000);
    let r = root
        .post(
            "/admin/v1/keys",
            &json_h,
            br#"{"tenant": "acme", "scopes": ["deploy", "invoke", "read-usage"]}"#,
        )
        .await?;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let created = r.json()?;
    let key = created["key"].as_str().unwrap_or_default().to_string();
    let id = created["id"].as_str().unwrap_or_default().to_string();
    assert!(key.starts_with(&format!("skn_{id}_")));
    // Listing never shows the secret.
    let r = root.get("/admin/v1/keys?tenant=acme").await?;
    assert_eq!(r.status, 200);
    assert!(!String::from_utf8_lossy(&r.body).contains(&key));
    // The new key deploys (raw ONNX body), scales and calls its model.
    let mut acme = skein_gateway::http_client::HttpClient::new(gw.addr).with_bearer(&key);
    let r = acme
        .post(
            "/admin/v1/models/acme_cls?min_replicas=1",
            &[("Content-Type", "application/octet-stream")],
            &model_bytes("ppocr_cls"),
        )
        .await?;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()?["owner"], "acme");
    let r = acme
        .request(
            "PATCH",
            "/admin/v1/models/acme_cls",
            &json_h,
            br#"{"max_batch_size": 2}"#,
        )
        .await?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()?["settings"]["max_batch_size"], 2);
    let r = acme
        .request("PATCH", "/admin/v1/models/acme_cls", &json_h, b"{not json")
        .await?;
    assert_eq!(r.status, 400);
    mesh.wait_loaded("acme_cls", 1).await?;
    let x = &case("ppocr_cls", "single").inputs[0];
    let body = skein_tests::v2_json_body(std::slice::from_ref(x));
    for _ in 0..3 {
        let r = acme
            .post("/v2/models/acme_cls/infer", &json_h, body.as_bytes())
            .await?;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    // Usage shows the three calls, for acme's key and for the platform admin.
    let rows = wait_for("usage over HTTP", Duration::from_secs(10), || {
        let mut http = skein_gateway::http_client::HttpClient::new(gw.addr).with_bearer(&key);
        async move {
            let r = http.get("/admin/v1/usage?model=acme_cls").await.ok()?;
            let v = r.json().ok()?;
            (v[0]["requests"] == 3).then_some(v)
        }
    })
    .await?;
    assert_eq!(rows[0]["tenant"], "acme");
    assert!(rows[0]["compute_us"].as_u64().is_some_and(|us| us > 0));
    // acme may not see the platform's tenants; root may.
    assert_eq!(acme.get("/admin/v1/tenants").await?.status, 403);
    assert_eq!(root.get("/admin/v1/tenants").await?.status, 200);
    // Revoked over HTTP: refused at once.
    let r = root
        .request("DELETE", &format!("/admin/v1/keys/{id}"), &[], b"")
        .await?;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(acme.get("/admin/v1/whoami").await?.status, 401);
    let r = root.get("/admin/v1/audit?action=keys.revoke").await?;
    assert_eq!(r.json()?[0]["target"], id.as_str());
    // Join tokens over HTTP.
    let r = root
        .post("/admin/v1/join-tokens", &json_h, br#"{"ttl_s": 60}"#)
        .await?;
    assert_eq!(r.status, 201);
    assert!(r.json()?["token"]
        .as_str()
        .is_some_and(|t| t.starts_with("skein1-")));
    assert_eq!(r.json()?["uses"], 1, "single use by default");
    // A fleet token: three nodes of one site, as `skein join-token --uses 3 --label site=...`.
    let r = root
        .post(
            "/admin/v1/join-tokens",
            &json_h,
            br#"{"ttl_s": 600, "uses": 3, "labels": {"site": "berlin-3"}}"#,
        )
        .await?;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let minted = r.json()?;
    assert_eq!(minted["uses"], 3, "{minted}");
    assert_eq!(minted["labels"]["site"], "berlin-3", "{minted}");
    let r = root.get("/admin/v1/audit?action=join_tokens.mint").await?;
    let target = r.json()?[0]["target"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(target.ends_with(",uses=3,site=berlin-3"), "{target}");
    // Over the limits: refused, saying why.
    for (body, why) in [
        (&br#"{"uses": 100001}"#[..], "at most 100000 nodes"),
        (&br#"{"labels": {"bad key": "x"}}"#[..], "label `bad key=x`"),
    ] {
        let r = root.post("/admin/v1/join-tokens", &json_h, body).await?;
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 400, "{text}");
        assert!(text.contains(why), "{text}");
    }
    Ok(())
}
