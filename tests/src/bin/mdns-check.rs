//! The node ingress's mDNS advertisement, advertised and browsed for in one process (for a
//! network namespace the test makes: `ip netns exec NS mdns-check ADDR:PORT NODE_ID`). Prints
//! `found NODE_ID ADDRS PORT` and exits 0 when a browser finds the advertised record within
//! 20 s; exits 1 otherwise. The advertisement is withdrawn before exit.

use anyhow::Context;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: std::net::SocketAddr = args
        .next()
        .context("usage: mdns-check ADDR:PORT NODE_ID")?
        .parse()?;
    let node_id = args.next().context("usage: mdns-check ADDR:PORT NODE_ID")?;
    let cancel = CancellationToken::new();
    let advertising = tokio::spawn(skein_node::mdns::advertise(
        node_id.clone(),
        listen,
        cancel.clone(),
    ));
    let found =
        tokio::task::spawn_blocking(|| skein_node::mdns::browse(Duration::from_secs(20), 1))
            .await??;
    cancel.cancel();
    advertising.await?;
    let Some(f) = found.iter().find(|f| f.node_id == node_id) else {
        anyhow::bail!(
            "no `{}` record of node {node_id} found in 20 s (found {found:?})",
            skein_node::mdns::SERVICE_TYPE
        );
    };
    println!("found {} {:?} {}", f.node_id, f.addrs, f.port);
    Ok(())
}
