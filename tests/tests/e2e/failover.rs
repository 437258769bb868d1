//! A failing node costs a caller a retry, not an error: nodes in processes of their own are
//! killed (`kill -9`) or stopped (SIGTERM, drain) under steady load from the SDK.

use skein_tests::{
    by_node, case, declared_dead, finish_without_failures, node_processes, process_of, wait_for,
    Load, NodeProcess, TestMesh,
};
use std::time::Duration;

const NODE_EXE: &str = env!("CARGO_BIN_EXE_node-process");

async fn two_node_processes() -> anyhow::Result<(TestMesh, Vec<NodeProcess>)> {
    node_processes(NODE_EXE, 2, "ppocr_cls", |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_a_node_process_under_load_loses_no_call() -> anyhow::Result<()> {
    let (mesh, mut procs) = two_node_processes().await?;
    let single = case("ppocr_cls", "single");
    let load = Load::start(&mesh.client, "ppocr_cls", &single, 4);
    load.run_for(40).await?;
    // Kill the node that carries the load.
    let victim = load.busiest().expect("calls served");
    let proc = process_of(&mut procs, &victim);
    proc.kill9()?;
    // Until the coordinator declares the node dead and the callers have moved on.
    declared_dead(&mesh, &victim).await?;
    // One route TTL later every caller has heard.
    let outcomes = finish_without_failures(load, "kill").await?;
    let failovers: u32 = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok().map(|r| r.1))
        .sum();
    eprintln!(
        "{} calls, 0 failed, {failovers} failovers, served by {:?}",
        outcomes.len(),
        by_node(&outcomes)
    );
    // The kill was felt and absorbed: the calls in flight on the busiest node, and those routed
    // to it before the callers heard, failed over; each of them was answered by the survivor,
    // and none took more than the one failover that a single dead node can cost.
    assert!(
        failovers >= 1,
        "killing the busiest node under load made no call fail over"
    );
    for o in &outcomes {
        if let Ok((node, n)) = &o.result {
            assert!(*n <= 1, "a call failed over {n} times: {o:?}");
            assert!(
                *n == 0 || *node != victim,
                "a failed-over call was answered by the killed node: {o:?}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_node_under_load_without_a_failed_call() -> anyhow::Result<()> {
    let (mesh, mut procs) = two_node_processes().await?;
    let single = case("ppocr_cls", "single");
    let load = Load::start(&mesh.client, "ppocr_cls", &single, 4);
    load.run_for(40).await?;
    let draining = load.busiest().expect("calls served");
    let proc = process_of(&mut procs, &draining);
    let status = proc.terminate().await?;
    assert!(
        status.success(),
        "the node exits cleanly after draining: {status}"
    );
    let outcomes = finish_without_failures(load, "drain").await?;
    eprintln!(
        "{} calls, 0 failed, served by {:?}",
        outcomes.len(),
        by_node(&outcomes)
    );
    // The coordinator knows it is gone or going, and routes only to the other node.
    let r = mesh.client.resolve("ppocr_cls", None).await?;
    assert!(r.candidates.iter().all(|c| c.node_id != draining));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_a_node_process_under_http_load_fails_no_http_request() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let (mesh, mut procs) = two_node_processes().await?;
    let gw =
        skein_tests::TestGateway::start(&mesh, skein_gateway::GatewayConfig::default()).await?;
    let single = Arc::new(case("ppocr_cls", "single"));
    let body = Arc::new(skein_tests::v2_json_body(&single.inputs));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t0 = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (mut http, body, single, stop, done) = (
                gw.http(),
                body.clone(),
                single.clone(),
                stop.clone(),
                done.clone(),
            );
            tokio::spawn(async move {
                // When it started, how long it took, and whether it was answered with 200 and
                // the reference outputs.
                let mut out: Vec<(Duration, Duration, Result<(), String>)> = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let started = t0.elapsed();
                    let answer = http
                        .post(
                            "/v2/models/ppocr_cls/infer",
                            &[("Content-Type", "application/json")],
                            body.as_bytes(),
                        )
                        .await;
                    let checked = match answer {
                        Ok(r) if r.status == 200 => skein_tests::v2_json_outputs(&r.body)
                            .map_err(|e| format!("{e:#}"))
                            .and_then(|o| skein_tests::matches_reference(&o, &single)),
                        Ok(r) => Err(format!(
                            "HTTP {}: {}",
                            r.status,
                            String::from_utf8_lossy(&r.body)
                        )),
                        Err(e) => Err(format!("{e:#}")),
                    };
                    out.push((started, t0.elapsed() - started, checked));
                    done.fetch_add(1, Ordering::SeqCst);
                }
                out
            })
        })
        .collect();
    // Some load first, then the kill, then until the coordinator has declared it dead and 40
    // more requests have been answered.
    let served = |n: u64| {
        let done = done.clone();
        move || {
            let done = done.clone();
            async move { (done.load(Ordering::SeqCst) >= n).then_some(()) }
        }
    };
    wait_for("HTTP load under way", Duration::from_secs(30), served(20)).await?;
    let killed_at = t0.elapsed();
    procs[0].kill9()?;
    let victim = procs[0].node_id.clone();
    declared_dead(&mesh, &victim).await?;
    let healed_at = t0.elapsed();
    let after = done.load(Ordering::SeqCst) + 40;
    wait_for(
        "HTTP requests after the failover",
        Duration::from_secs(30),
        served(after),
    )
    .await?;
    stop.store(true, Ordering::SeqCst);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let failed: Vec<_> = all.iter().filter(|r| r.2.is_err()).collect();
    assert!(failed.is_empty(), "HTTP requests failed: {failed:?}");
    let during: Vec<Duration> = all
        .iter()
        // In flight at some point between the kill and the dead declaration.
        .filter(|r| r.0 <= healed_at && r.0 + r.1 >= killed_at)
        .map(|r| r.1)
        .collect();
    let p99 = skein_tests::quantile(&during, 0.99);
    assert!(!during.is_empty());
    eprintln!(
        "{} HTTP requests, 0 failed; {} in flight during the kill, p99 {:?} there",
        all.len(),
        during.len(),
        p99
    );
    Ok(())
}
