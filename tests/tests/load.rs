//! Fixed-rate load, in a test binary of its own so that nothing else shares the two cores: an
//! open-loop SDK load of 200 requests a second on three node processes, and one of them killed
//! with `kill -9` in the middle. No call fails; the latency of the calls in flight during the
//! event is printed.

use skein_tests::{
    by_node, case, declared_dead, finish_without_failures, node_processes, process_of, Load,
    Outcome,
};
use std::time::Duration;

const NODE_EXE: &str = env!("CARGO_BIN_EXE_node-process");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_one_of_three_nodes_under_200_requests_a_second_loses_no_call() -> anyhow::Result<()>
{
    // Room to queue a burst (a CPU hiccup on the shared cores) instead of shedding it: this
    // test is about the kill, not overload.
    let (mesh, mut procs) =
        node_processes(NODE_EXE, 3, "ppocr_cls", |c| c.max_queue = 1024).await?;
    let single = case("ppocr_cls", "single");
    // Open loop: a call every 5 ms whatever the answers take.
    let load = Load::at_rate(&mesh.client, "ppocr_cls", &single, 200, 1024);
    let stalls = load.stalls();
    load.run_for(400).await?;
    let victim = load.busiest().expect("calls served");
    let proc = process_of(&mut procs, &victim);
    let killed_at = load.elapsed();
    proc.kill9()?;
    declared_dead(&mesh, &victim).await?;
    let dead_at = load.elapsed();
    let outcomes = finish_without_failures(load, "kill").await?;
    let latencies = |f: &dyn Fn(&Outcome) -> bool| -> Vec<Duration> {
        outcomes
            .iter()
            .filter(|o| f(o))
            .map(|o| o.latency)
            .collect()
    };
    let before = latencies(&|o| o.started < killed_at);
    let during = latencies(&|o| o.started <= dead_at && o.started + o.latency >= killed_at);
    let q = skein_tests::quantile;
    eprintln!(
        "200 req/s, {} calls, 0 failed, served by {:?}; \
         before the kill p50 {:?} p99 {:?}; during it ({} calls in flight between the kill and \
         the dead declaration {:?} later) p50 {:?} p99 {:?}",
        outcomes.len(),
        by_node(&outcomes),
        q(&before, 0.5),
        q(&before, 0.99),
        during.len(),
        dead_at - killed_at,
        q(&during, 0.5),
        q(&during, 0.99),
    );
    assert!(!during.is_empty());
    // The load stayed open-loop: it never had 1024 calls out and had to wait for room.
    let stalls = stalls.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(stalls, 0, "the 200 req/s schedule slipped {stalls} times");
    Ok(())
}
