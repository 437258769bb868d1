//! Metering, and a coordinator crash under load: every served request becomes exactly one
//! usage record in the coordinator's ledger, also when the coordinator is killed (`kill -9`) and
//! restarted while requests flow; warm callers keep being served meanwhile (cached routes,
//! valid tickets); usage and cost are reported by tenant, model and version.

use skein_client::{Client, ClientConfig, Profile};
use skein_coordinator::CoordinatorConfig;
use skein_node::{Node, NodeConfig};
use skein_proto::{AdminRequest, AdminResponse, DeploymentSettings, Quota, UsageQuery};
use skein_tests::{case, check, fast_coordinator, model_bytes, wait_for, CoordinatorProcess};
use std::time::Duration;

const COORDINATOR_EXE: &str = env!("CARGO_BIN_EXE_coordinator-process");

async fn connect(addr: &str, ca: &str, key: &str) -> anyhow::Result<Client> {
    Ok(Client::from_profile_with(
        &Profile::with_key(addr, ca, key),
        ClientConfig {
            timeout: Duration::from_secs(30),
            ..ClientConfig::default()
        },
    )
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_metered_exactly_once_across_a_coordinator_kill() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config: CoordinatorConfig = fast_coordinator(dir.path().join("coordinator"));
    config.pricing.per_request = 0.001;
    config.pricing.default_per_compute_second = 2.0;
    let mut coordinator = CoordinatorProcess::spawn(COORDINATOR_EXE, &config).await?;
    let addr = coordinator.addr.to_string();
    let ca = std::fs::read_to_string(config.data_dir.join("ca.crt"))?;
    let root_key = std::fs::read_to_string(config.data_dir.join("admin-key"))?;
    let root = connect(&addr, &ca, root_key.trim()).await?;

    let token = match root
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
    let node = Node::start(NodeConfig {
        coordinator: addr.clone(),
        join_token: Some(token),
        data_dir: dir.path().join("node"),
        max_concurrency: 2,
        ..NodeConfig::default()
    })
    .await?;
    let settings = DeploymentSettings {
        min_replicas: 1,
        shared: true,
        ..Default::default()
    };
    root.deploy_with(
        "ppocr_cls",
        None,
        &model_bytes("ppocr_cls"),
        settings,
        |_| {},
    )
    .await?;
    root.admin(AdminRequest::CreateTenant {
        name: "acme".into(),
        quota: Quota::default(),
    })
    .await?;
    let key = match root
        .admin(AdminRequest::CreateKey {
            tenant: Some("acme".into()),
            scopes: vec!["invoke".into(), "read-usage".into()],
            label: None,
        })
        .await?
    {
        AdminResponse::NewKey(k) => k.key,
        other => anyhow::bail!("{other:?}"),
    };
    let acme = connect(&addr, &ca, &key).await?;
    let single = case("ppocr_cls", "single");

    // Calls go on while the coordinator dies: the SDK keeps its route and ticket, the node
    // keeps serving and holds the usage records until the coordinator is back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = {
        let (acme, single, stop) = (acme.clone(), single.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ok = 0u64;
            let mut failed = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                // A call counts as served only with the reference outputs.
                let answer = acme
                    .infer("ppocr_cls", single.inputs.clone())
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| skein_tests::matches_reference(&r.outputs, &single));
                match answer {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        failed += 1;
                        eprintln!("call failed: {e}");
                    }
                }
            }
            (ok, failed)
        })
    };
    let ledger = |acme: Client| async move {
        let rows = acme.usage(UsageQuery::default()).await.ok()?;
        Some(rows.iter().map(|r| r.requests).sum::<u64>())
    };
    // Kill it once some usage has been acknowledged, in the middle of the stream.
    let before = wait_for("some usage in the ledger", Duration::from_secs(60), || {
        let acme = acme.clone();
        async move { ledger(acme).await.filter(|&n| n >= 10) }
    })
    .await?;
    coordinator.kill9()?;
    let mut config2 = config.clone();
    config2.listen = coordinator.addr;
    let _coordinator = CoordinatorProcess::spawn(COORDINATOR_EXE, &config2).await?;
    // Records of calls served after the restart arrive too; then stop calling.
    wait_for(
        "usage recorded after the restart",
        Duration::from_secs(60),
        || {
            let acme = acme.clone();
            async move { ledger(acme).await.filter(|&n| n >= before + 20) }
        },
    )
    .await?;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = caller.await?;
    assert!(ok >= before + 20, "{ok} calls served, {failed} failed");
    // Warm callers did not notice: cached routes and valid tickets carried them through.
    assert_eq!(failed, 0, "calls failed while the coordinator was down");

    // Every served call is in the ledger exactly once: none lost, none counted twice.
    let rows = wait_for(
        "the ledger to hold every call",
        Duration::from_secs(60),
        || {
            let acme = &acme;
            async move {
                let rows = acme.usage(UsageQuery::default()).await.ok()?;
                let n: u64 = rows.iter().map(|r| r.requests).sum();
                assert!(n <= ok, "{n} records for {ok} served calls");
                (n == ok).then_some(rows)
            }
        },
    )
    .await?;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = &rows[0];
    assert_eq!(
        (
            row.tenant.as_str(),
            row.model.as_str(),
            row.version.as_str()
        ),
        ("acme", "ppocr_cls", "1")
    );
    assert!(row.compute_us > 0);
    assert!(row.bytes_in >= ok * single.inputs[0].data().len() as u64);
    let want = ok as f64 * 0.001 + row.compute_us as f64 / 1e6 * 2.0;
    assert!((row.cost - want).abs() < 1e-9, "{} vs {want}", row.cost);
    // The tenant sees only its own usage; the platform admin sees it by tenant.
    let all = root.usage(UsageQuery::default()).await?;
    assert!(all.iter().any(|r| r.tenant == "acme" && r.requests == ok));
    let r = acme
        .usage(UsageQuery {
            tenant: Some("root".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(
        r.err().and_then(|e| e.code()),
        Some(skein_proto::ErrorCode::Forbidden)
    );
    // Still serving correctly after all that.
    let r = acme.infer("ppocr_cls", single.inputs.clone()).await?;
    check(&r.outputs, &single);
    node.shutdown().await;
    Ok(())
}

/// Records served while the coordinator is down are spooled on the node's disk; the node
/// crashes (`kill`) during the outage and starts again from its data dir once the coordinator
/// is back: the ledger holds exactly the calls served, none lost, none twice. (A node restarted
/// during the outage itself is in `offline.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_spooled_during_an_outage_survives_a_node_crash() -> anyhow::Result<()> {
    let mut mesh = skein_tests::TestMesh::start_with(
        1,
        |_| {},
        |n| n.metrics_listen = Some("127.0.0.1:0".parse().expect("addr")),
    )
    .await?;
    mesh.deploy("ppocr_cls").await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    let single = case("ppocr_cls", "single");
    let metrics = mesh.nodes[0]
        .as_ref()
        .and_then(|n| n.metrics_addr())
        .expect("metrics endpoint");
    let ledger = |client: Client| async move {
        let rows = client.usage(UsageQuery::default()).await.ok()?;
        Some(rows.iter().map(|r| r.requests).sum::<u64>())
    };

    // Warm: routes and tickets cached, these records stored.
    const BEFORE: u64 = 5;
    for _ in 0..BEFORE {
        let r = mesh
            .client
            .infer("ppocr_cls", single.inputs.clone())
            .await?;
        check(&r.outputs, &single);
    }
    wait_for(
        "the warm calls in the ledger",
        Duration::from_secs(30),
        || {
            let c = mesh.client.clone();
            async move { ledger(c).await.filter(|&n| n == BEFORE) }
        },
    )
    .await?;
    wait_for("nothing unsent", Duration::from_secs(30), || async move {
        skein_tests::node_metric(metrics, "skein_node_usage_unsent", "")
            .await
            .filter(|&v| v == 0.0)
    })
    .await?;

    // The coordinator goes away; the warm client keeps being served.
    let addr = mesh.stop_coordinator().await;
    const OFFLINE: u64 = 12;
    for _ in 0..OFFLINE {
        let r = mesh
            .client
            .infer("ppocr_cls", single.inputs.clone())
            .await?;
        check(&r.outputs, &single);
    }
    assert_eq!(
        skein_tests::node_metric(metrics, "skein_node_usage_unsent", "").await,
        Some(OFFLINE as f64)
    );
    wait_for(
        "the node to report the coordinator unseen for a second",
        Duration::from_secs(30),
        || async move {
            skein_tests::node_metric(metrics, "skein_node_coordinator_last_seen_seconds", "")
                .await
                .filter(|&s| s >= 1.0)
        },
    )
    .await?;
    let spool = mesh
        .dir
        .path()
        .join("node-0")
        .join(skein_node::metering::SPOOL_FILE);
    assert!(
        std::fs::metadata(&spool)?.len() > 0,
        "nothing in {}",
        spool.display()
    );

    // The node crashes during the outage: what it held in memory is gone, the spool is not.
    mesh.nodes[0].take().expect("running").kill();
    mesh.restart_coordinator(addr).await?;
    let mut cfg = mesh.node_config(0);
    cfg.join_token = None;
    cfg.metrics_listen = Some("127.0.0.1:0".parse()?);
    let node = Node::start(cfg).await?;
    let metrics = node.metrics_addr().expect("metrics endpoint");
    mesh.nodes[0] = Some(node);
    wait_for(
        "the spooled records sent",
        Duration::from_secs(30),
        || async move {
            skein_tests::node_metric(metrics, "skein_node_usage_unsent", "")
                .await
                .filter(|&v| v == 0.0)
        },
    )
    .await?;
    let client = mesh.client.clone();
    let n = wait_for("the client to reconnect", Duration::from_secs(30), || {
        let c = client.clone();
        async move { ledger(c).await }
    })
    .await?;
    assert_eq!(
        n,
        BEFORE + OFFLINE,
        "ledger rows for {} served calls",
        BEFORE + OFFLINE
    );
    Ok(())
}
