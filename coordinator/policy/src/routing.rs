//! Routing: rank the nodes that can serve a model by expected completion time.
//!
//! `expected = queue_wait + service + cold_penalty`, where
//! `queue_wait = (queued + in_flight) × service / concurrency` and the cold penalty is the
//! measured (or default) load time when the model is not loaded there. Unhealthy nodes and nodes
//! that cannot serve the model are filtered out. Later: network RTT from the caller's coordinates
//! and payload transfer time.

/// What the router knows about one node for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLoad {
    /// Index or id chosen by the caller; returned untouched.
    pub key: usize,
    /// Heartbeats arrive on time.
    pub healthy: bool,
    /// The node holds (or may load) this model.
    pub can_serve: bool,
    /// The model is loaded and ready there.
    pub loaded: bool,
    /// Requests waiting on that node for this model.
    pub queued: u32,
    /// Requests running on that node for this model.
    pub in_flight: u32,
    /// Requests that may run at once for this model there (at least 1 is assumed).
    pub concurrency: u32,
    /// EWMA compute time per request, µs; `None` when not measured yet.
    pub service_us: Option<f64>,
    /// Measured load time, µs; `None` when not measured yet.
    pub load_us: Option<f64>,
}

/// Defaults used when a node has no measurement yet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingDefaults {
    /// Assumed compute time, µs.
    pub service_us: f64,
    /// Assumed load time for a model not loaded yet, µs.
    pub load_us: f64,
}

impl Default for RoutingDefaults {
    fn default() -> Self {
        RoutingDefaults {
            service_us: 5_000.0,
            load_us: 500_000.0,
        }
    }
}

/// A node with its expected completion time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    /// The caller's key.
    pub key: usize,
    /// Expected completion time, µs.
    pub expected_us: f64,
}

fn finite_or(v: Option<f64>, default: f64) -> f64 {
    match v {
        Some(x) if x.is_finite() && x >= 0.0 => x,
        _ => default,
    }
}

/// Expected completion time of a request on `n`, µs.
pub fn expected_completion(n: &NodeLoad, d: &RoutingDefaults) -> f64 {
    let service = finite_or(n.service_us, d.service_us);
    let concurrency = n.concurrency.max(1) as f64;
    let waiting = n.queued as f64 + n.in_flight as f64;
    // A request starts at once while a slot is free.
    let queue_wait = ((waiting + 1.0 - concurrency).max(0.0)) * service / concurrency;
    let cold = if n.loaded {
        0.0
    } else {
        finite_or(n.load_us, d.load_us)
    };
    let total = queue_wait + service + cold;
    if total.is_finite() {
        total
    } else {
        f64::MAX
    }
}

/// Healthy nodes that can serve the model, best (least expected completion) first. Ties keep
/// the input order, so a caller that shuffles or rotates its input spreads equal nodes.
pub fn rank(nodes: &[NodeLoad], d: &RoutingDefaults) -> Vec<Ranked> {
    let mut out: Vec<Ranked> = nodes
        .iter()
        .filter(|n| n.healthy && n.can_serve)
        .map(|n| Ranked {
            key: n.key,
            expected_us: expected_completion(n, d),
        })
        .collect();
    out.sort_by(|a, b| a.expected_us.total_cmp(&b.expected_us));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(key: usize) -> NodeLoad {
        NodeLoad {
            key,
            healthy: true,
            can_serve: true,
            loaded: true,
            queued: 0,
            in_flight: 0,
            concurrency: 1,
            service_us: Some(1_000.0),
            load_us: Some(100_000.0),
        }
    }

    #[test]
    fn filters_unhealthy_and_incapable_nodes() {
        let mut a = node(0);
        a.healthy = false;
        let mut b = node(1);
        b.can_serve = false;
        let c = node(2);
        let r = rank(&[a, b, c], &RoutingDefaults::default());
        assert_eq!(r.iter().map(|r| r.key).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn prefers_idle_over_queued_and_warm_over_cold() {
        let mut busy = node(0);
        busy.queued = 5;
        let idle = node(1);
        let mut cold = node(2);
        cold.loaded = false;
        let r = rank(&[busy, idle, cold], &RoutingDefaults::default());
        assert_eq!(r[0].key, 1);
        assert_eq!(r[1].key, 0, "five queued 1 ms requests beat a 100 ms load");
        assert_eq!(r[2].key, 2);
    }

    #[test]
    fn concurrency_absorbs_in_flight_work() {
        let mut wide = node(0);
        wide.in_flight = 3;
        wide.concurrency = 4;
        let d = RoutingDefaults::default();
        assert_eq!(expected_completion(&wide, &d), 1_000.0);
        wide.in_flight = 4;
        assert_eq!(expected_completion(&wide, &d), 1_250.0);
    }

    #[test]
    fn extreme_inputs_stay_finite_and_ordered() {
        let mut a = node(0);
        a.service_us = Some(f64::NAN);
        a.queued = u32::MAX;
        a.in_flight = u32::MAX;
        let mut b = node(1);
        b.service_us = Some(f64::INFINITY);
        b.concurrency = 0;
        let r = rank(&[a, b, node(2)], &RoutingDefaults::default());
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|x| !x.expected_us.is_nan()));
        assert_eq!(r[0].key, 2);
    }
}
