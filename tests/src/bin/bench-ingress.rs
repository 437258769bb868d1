//! Node ingress benchmark (issue 24): an HTTP client beside an edge node, the coordinator 40 ms
//! (round trip) away. The same V2 call (`ppocr_cls`, the `single` reference case, JSON), back to
//! back, through the node's own HTTP ingress (`skein-node --http`: the model is loaded there and
//! runs there) and through the coordinator's gateway (HTTP to the coordinator, then QUIC back
//! to the node).
//!
//! Topology: the coordinator at the delay hub; the node on `127.0.0.2` with 20 ms one-way delay
//! to the hub (its QUIC traffic, control and inference, 40 ms round trip to the coordinator);
//! the client on the node's host: its TCP connection to the node's ingress is plain loopback,
//! and the one to the coordinator's gateway goes through a TCP delay proxy of 20 ms each way
//! (the same 40 ms round trip; the UDP hub cannot delay TCP).
//!
//! Usage: `bench-ingress [CALLS] [binary|json]` (defaults 200, binary: the binary tensor
//! extension, as tritonclient sends by default; `json` measures the JSON codec too). Build with
//! `cargo build --workspace --all-targets` and run `target/debug/bench-ingress`, or use
//! `scripts/bench-ingress`.

use skein_gateway::http_client::HttpClient;
use skein_proto::DeploymentSettings;
use skein_tests::{case, v2_json_body, TestGateway, WanMesh};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// One-way delay between the node's host and the coordinator's.
const ONE_WAY: Duration = Duration::from_millis(20);

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Copy `r` to `w`, each chunk held `delay` first (order kept, at most 1024 chunks queued).
async fn delayed_pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0
                || tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .await
                    .is_err()
            {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// A TCP proxy to `target` that delays each direction by `one_way`; returns its address.
async fn tcp_delay_proxy(target: SocketAddr, one_way: Duration) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(delayed_pipe(cr, sw, one_way), delayed_pipe(sr, cw, one_way));
            });
        }
    });
    Ok(addr)
}

struct Path {
    name: &'static str,
    latencies_us: Vec<u64>,
    compute_us: Vec<u64>,
    /// Per call: latency minus the node's compute and queue time.
    overhead_us: Vec<u64>,
    served: std::collections::BTreeMap<String, u64>,
}

/// A V2 request body, binary tensors (tritonclient's everyday call) or JSON.
struct Body {
    bytes: Vec<u8>,
    header_len: Option<String>,
}

async fn measure(
    name: &'static str,
    http: &mut HttpClient,
    body: &Body,
    calls: usize,
) -> anyhow::Result<Path> {
    let mut p = Path {
        name,
        latencies_us: Vec::new(),
        compute_us: Vec::new(),
        overhead_us: Vec::new(),
        served: Default::default(),
    };
    for i in 0..calls + 20 {
        let t = Instant::now();
        let r = match &body.header_len {
            Some(hl) => {
                http.post(
                    "/v2/models/ppocr_cls/infer",
                    &[
                        ("Inference-Header-Content-Length", hl.as_str()),
                        ("Content-Type", "application/octet-stream"),
                    ],
                    &body.bytes,
                )
                .await?
            }
            None => {
                http.post(
                    "/v2/models/ppocr_cls/infer",
                    &[("Content-Type", "application/json")],
                    &body.bytes,
                )
                .await?
            }
        };
        let us = t.elapsed().as_micros() as u64;
        anyhow::ensure!(
            r.status == 200,
            "{name}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        if i < 20 {
            continue; // warm-up: connections, route cache, plan cache
        }
        let json_len = r
            .header("inference-header-content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(r.body.len())
            .min(r.body.len());
        let v: serde_json::Value = serde_json::from_slice(&r.body[..json_len])?;
        let compute = v["parameters"]["skein_compute_us"].as_u64().unwrap_or(0);
        let queue = v["parameters"]["skein_queue_us"].as_u64().unwrap_or(0);
        p.latencies_us.push(us);
        p.compute_us.push(compute);
        p.overhead_us.push(us.saturating_sub(compute + queue));
        *p.served
            .entry(
                v["parameters"]["skein_path"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
            )
            .or_default() += 1;
    }
    p.latencies_us.sort_unstable();
    p.compute_us.sort_unstable();
    p.overhead_us.sort_unstable();
    Ok(p)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let wan = WanMesh::start(&[ONE_WAY], |cfg| {
        cfg.http.listen = Some(SocketAddr::new(cfg.listen.ip(), 0));
        cfg.http.mdns = false;
    })
    .await?;
    let settings = DeploymentSettings {
        min_replicas: 1,
        ..Default::default()
    };
    wan.mesh.deploy_with("ppocr_cls", settings).await?;
    wan.mesh.wait_loaded("ppocr_cls", 1).await?;
    let node = wan.nodes[0].node.as_ref().expect("node");
    let ingress = node.http_addr().expect("the node has an ingress");
    let gw = TestGateway::start(&wan.mesh, skein_gateway::GatewayConfig::default()).await?;
    let far_gw = tcp_delay_proxy(gw.addr, ONE_WAY).await?;
    let inputs = case("ppocr_cls", "single").inputs;
    let binary = std::env::args().nth(2).as_deref() != Some("json");
    let body = if binary {
        let (bytes, hl) = skein_gateway::codec::encode_request(&inputs, true)?;
        Body {
            bytes,
            header_len: hl.map(|n| n.to_string()),
        }
    } else {
        Body {
            bytes: v2_json_body(&inputs).into_bytes(),
            header_len: None,
        }
    };

    let mut near = HttpClient::new(ingress).with_bearer(&gw.key);
    let mut far = HttpClient::new(far_gw).with_bearer(&gw.key);
    let local = measure("node ingress (beside the node)", &mut near, &body, calls).await?;
    let remote = measure("coordinator gateway (40 ms away)", &mut far, &body, calls).await?;
    println!(
        "ppocr_cls single ({}), {calls} calls back to back each after 20 warm-up calls; \
         node at {} ms one way from the coordinator",
        if binary { "binary tensors" } else { "JSON" },
        ONE_WAY.as_millis()
    );
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>12} {:>13}  served",
        "path", "p50 ms", "p90 ms", "p99 ms", "compute p50", "overhead p50"
    );
    for p in [&local, &remote] {
        println!(
            "{:<34} {:>8.2} {:>8.2} {:>8.2} {:>9.2} ms {:>10.2} ms  {:?}",
            p.name,
            pct(&p.latencies_us, 0.5) as f64 / 1e3,
            pct(&p.latencies_us, 0.9) as f64 / 1e3,
            pct(&p.latencies_us, 0.99) as f64 / 1e3,
            pct(&p.compute_us, 0.5) as f64 / 1e3,
            pct(&p.overhead_us, 0.5) as f64 / 1e3,
            p.served
        );
    }
    let overhead = pct(&local.latencies_us, 0.5) as f64 - pct(&local.compute_us, 0.5) as f64;
    println!(
        "node ingress: p50 - compute p50 = {:.2} ms, per-call overhead (latency - compute - \
         queue) p50 = {:.2} ms (goal <= 2 ms: {}); coordinator gateway p50 - node ingress p50 = \
         {:.2} ms (goal >= one 40 ms round trip: {})",
        overhead / 1e3,
        pct(&local.overhead_us, 0.5) as f64 / 1e3,
        if overhead <= 2_000.0 {
            "met"
        } else {
            "NOT met"
        },
        (pct(&remote.latencies_us, 0.5) as f64 - pct(&local.latencies_us, 0.5) as f64) / 1e3,
        if pct(&remote.latencies_us, 0.5) >= pct(&local.latencies_us, 0.5) + 40_000 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
