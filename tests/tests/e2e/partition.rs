//! A network partition, for real: one node runs in a network namespace of its own, joined to
//! the test's by a veth pair, and the link is taken down under load, then brought back. The
//! coordinator notices within 3 s, traffic moves to the other node without a failed call, the
//! node rejoins by itself once the link is back and serves again, and the usage ledger ends
//! with every served request once: the records the node held during the partition arrive
//! after it, none twice.

use skein_proto::{DeploymentSettings, NodeHealth, UsageQuery};
use skein_tests::{case, failed_calls, wait_for, Load, NetNs, NodeProcess, TestMesh};
use std::time::Duration;
use tokio::time::Instant;

const NODE_EXE: &str = env!("CARGO_BIN_EXE_node-process");

async fn health(mesh: &TestMesh, node: &str) -> Option<NodeHealth> {
    let nodes = mesh.client.nodes().await.ok()?;
    nodes.iter().find(|n| n.node_id == node).map(|n| n.health)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_is_routed_around_and_rejoins_by_itself() -> anyhow::Result<()> {
    if !NetNs::required() {
        return Ok(());
    }
    let ns = NetNs::create(0)?;
    // The coordinator listens on every address, so the namespace reaches it over the veth.
    let mesh =
        TestMesh::start_with(1, |c| c.listen = "0.0.0.0:0".parse().expect("addr"), |_| {}).await?;
    let port = mesh.coordinator().addr().port();
    let mut config = mesh.node_config(1);
    config.coordinator = format!("{}:{port}", ns.host_ip);
    config.listen = format!("{}:0", ns.ns_ip).parse()?;
    let far = NodeProcess::spawn_in(Some(&ns), NODE_EXE, &config, &[]).await?;
    let settings = DeploymentSettings {
        min_replicas: 2,
        ..Default::default()
    };
    mesh.deploy_with("ppocr_cls", settings).await?;
    mesh.wait_loaded("ppocr_cls", 2).await?;

    let single = case("ppocr_cls", "single");
    let load = Load::start(&mesh.client, "ppocr_cls", &single, 4);
    wait_for(
        "calls served by the node in the namespace",
        Duration::from_secs(30),
        || async { (load.served_by().get(&far.node_id).copied().unwrap_or(0) >= 20).then_some(()) },
    )
    .await?;

    // Cut the link.
    let cut = Instant::now();
    ns.partition()?;
    wait_for("the partition noticed", Duration::from_secs(10), || async {
        matches!(
            health(&mesh, &far.node_id).await,
            Some(NodeHealth::Suspect | NodeHealth::Dead)
        )
        .then_some(())
    })
    .await?;
    let noticed = cut.elapsed();
    wait_for(
        "the node declared dead",
        Duration::from_secs(10),
        || async { (health(&mesh, &far.node_id).await == Some(NodeHealth::Dead)).then_some(()) },
    )
    .await?;
    let dead = cut.elapsed();
    // Calls keep being served, by the other node.
    load.run_for(100).await?;
    let far_before_heal = load.served_by().get(&far.node_id).copied().unwrap_or(0);

    // Bring it back: the node's heartbeats get through again and it serves without anyone
    // touching it.
    let healed = Instant::now();
    ns.heal()?;
    wait_for("the node alive again", Duration::from_secs(30), || async {
        (health(&mesh, &far.node_id).await == Some(NodeHealth::Alive)).then_some(())
    })
    .await?;
    let rejoined = healed.elapsed();
    wait_for(
        "calls served by the rejoined node",
        Duration::from_secs(60),
        || async {
            let n = load.served_by().get(&far.node_id).copied().unwrap_or(0);
            (n >= far_before_heal + 20).then_some(())
        },
    )
    .await?;
    let outcomes = load.stop().await?;
    let failed = failed_calls(&outcomes);
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    let ok = outcomes.len() as u64;
    let failovers: u64 = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok().map(|r| u64::from(r.1)))
        .sum();

    // Every served call is in the ledger once. A call whose answer was cut off and that was
    // then served by the other node was served twice, so up to `failovers` more.
    let ledger = wait_for(
        "every call in the ledger",
        Duration::from_secs(60),
        || async {
            let rows = mesh.client.usage(UsageQuery::default()).await.ok()?;
            let n: u64 = rows.iter().map(|r| r.requests).sum();
            (n >= ok).then_some(n)
        },
    )
    .await?;
    assert!(
        ledger <= ok + failovers,
        "{ledger} usage records for {ok} calls with {failovers} failovers: duplicates"
    );
    eprintln!(
        "partition noticed (suspect) after {noticed:?}, declared dead after {dead:?}; rejoined \
         {rejoined:?} after the heal; {ok} calls, 0 failed, {failovers} failovers; ledger {ledger}"
    );
    assert!(
        noticed < Duration::from_secs(3),
        "the partition was noticed after {noticed:?}"
    );
    Ok(())
}
