//! Nodes away from the coordinator's network: the real `skein-node` binary in a network
//! namespace of its own.
//!
//! A node that listens on every interface (`--listen 0.0.0.0:PORT`, no `--advertise`) finds
//! the address it reaches the coordinator from, advertises it, and serves calls there.

use anyhow::Context;
use skein_tests::{case, check, wait_for, NetNs, TestMesh};
use std::time::Duration;

/// The `skein-node` binary beside this package's helper binaries (`scripts/test` builds every
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_listening_on_all_interfaces_advertises_its_address_towards_the_coordinator(
) -> anyhow::Result<()> {
    if !NetNs::required() {
        return Ok(());
    }
    let ns = NetNs::create(1)?;
    let mesh =
        TestMesh::start_with(0, |c| c.listen = "0.0.0.0:0".parse().expect("addr"), |_| {}).await?;
    let port = mesh.coordinator().addr().port();
    let config = mesh.node_config(0);
    let token = config.join_token.clone().context("a join token")?;
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.name])
        .arg(skein_tests::workspace_exe("skein-node")?)
        .args(["--coordinator", &format!("{}:{port}", ns.host_ip)])
        .args(["--listen", "0.0.0.0:0", "--backend", "tract"])
        .args(["--join-token", &token, "--data-dir"])
        .arg(&config.data_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let mut node = skein_tests::KillOnDrop(cmd.spawn().context("starting skein-node")?);

    let info = wait_for("the node joined", Duration::from_secs(60), || {
        let exited = node.0.try_wait().ok().flatten();
        let client = &mesh.client;
        async move {
            if let Some(status) = exited {
                panic!("skein-node exited with {status} (its stderr is above)");
            }
            client.nodes().await.ok()?.into_iter().next()
        }
    })
    .await?;
    let addr: std::net::SocketAddr = info.addr.parse()?;
    assert_eq!(
        addr.ip(),
        std::net::IpAddr::V4(ns.ns_ip),
        "the node advertises {addr}, not its address on the link towards the coordinator"
    );
    assert_ne!(addr.port(), 0, "the advertised port is the bound one");

    // The advertised address serves calls.
    mesh.deploy_with(
        "ppocr_cls",
        skein_proto::DeploymentSettings {
            min_replicas: 1,
            ..Default::default()
        },
    )
    .await?;
    mesh.wait_loaded("ppocr_cls", 1).await?;
    let single = case("ppocr_cls", "single");
    let r = mesh
        .client
        .infer("ppocr_cls", single.inputs.clone())
        .await?;
    assert_eq!(r.meta.node, info.node_id);
    check(&r.outputs, &single);
    drop(node);
    Ok(())
}
