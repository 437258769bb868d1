//! Client-side load feedback, faster than heartbeats: peak-EWMA latency, a hysteretic re-rank of
//! the coordinator's ordering between resolves, and backoff for failing nodes.
//!
//! - [`PeakEwma`]: latency that jumps up at once and decays down slowly (Finagle/linkerd).
//! - [`rerank`]: reorder the coordinator's candidates with what this client saw since.
//! - [`BanList`]: avoid a node that keeps failing, with exponential backoff; and
//!   [`retry_delay_us`], full-jitter backoff between retries.

use std::collections::BTreeMap;

use rand::Rng;

/// A finite, non-negative value (NaN and +∞ → `f64::MAX`, negative → 0).
fn cap(x: f64) -> f64 {
    if x.is_nan() {
        f64::MAX
    } else {
        x.clamp(0.0, f64::MAX)
    }
}

/// Peak-sensitive EWMA of latency, µs.
///
/// A sample above the current value replaces it at once (a slow node is penalised on its first
/// slow answer); a sample below it pulls the value down with weight `1 - exp(-dt / decay)`,
/// `dt` being the time since the previous sample. Reading it ([`get`](Self::get)) decays the
/// value toward 0 with the time since the last sample, so a node penalised long ago drifts back
/// to the front and gets probed again, as in Finagle and linkerd.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeakEwma {
    value: Option<f64>,
    last_us: u64,
    decay_us: f64,
}

impl PeakEwma {
    /// No sample yet; old values' weight falls to 1/e in `decay_us` µs (at least 1).
    pub fn new(decay_us: u64) -> Self {
        PeakEwma {
            value: None,
            last_us: 0,
            decay_us: decay_us.max(1) as f64,
        }
    }

    fn weight(&self, now_us: u64) -> f64 {
        let dt = now_us.saturating_sub(self.last_us) as f64;
        (-dt / self.decay_us).exp()
    }

    /// Record a latency sample taken at `now_us`. Non-finite and negative samples are ignored;
    /// a clock going backwards counts as no time passing.
    pub fn observe(&mut self, now_us: u64, latency_us: f64) {
        if !(latency_us.is_finite() && latency_us >= 0.0) {
            return;
        }
        self.value = Some(match self.value {
            Some(v) if latency_us <= v => {
                let w = self.weight(now_us);
                v * w + latency_us * (1.0 - w)
            }
            _ => latency_us,
        });
        self.last_us = self.last_us.max(now_us);
    }

    /// The latency estimate at `now_us` (decayed toward 0 since the last sample); `None` before
    /// the first sample.
    pub fn get(&self, now_us: u64) -> Option<f64> {
        self.value.map(|v| cap(v * self.weight(now_us)))
    }

    /// Load cost: `latency × (outstanding + 1)` (0 before the first sample, so an unmeasured node
    /// gets tried). Finite.
    pub fn cost(&self, now_us: u64, outstanding: u32) -> f64 {
        cap(self.get(now_us).unwrap_or(0.0) * (outstanding as f64 + 1.0))
    }
}

/// What one client knows about one candidate between two resolves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalView {
    /// The caller's key (e.g. [`crate::routing::Ranked::key`]).
    pub key: usize,
    /// The coordinator's expected completion time at the last resolve, µs.
    pub expected_us: f64,
    /// Compute time per request, µs (the resolve's `parts.service_us`).
    pub service_us: f64,
    /// Slots for this model on the node (at least 1 is assumed).
    pub concurrency: u32,
    /// This client's observed latency to the node, µs ([`PeakEwma::get`]); `None` if none.
    pub latency_us: Option<f64>,
    /// Requests this client has outstanding on the node.
    pub outstanding: u32,
    /// Queue depth the node reported on its last response; `None` if none.
    pub queue_depth: Option<u32>,
    /// When that queue depth was received, µs.
    pub queue_at_us: u64,
}

impl LocalView {
    /// A view of a resolved candidate with no local observation yet.
    pub fn new(key: usize, expected_us: f64, service_us: f64) -> Self {
        LocalView {
            key,
            expected_us,
            service_us,
            concurrency: 1,
            latency_us: None,
            outstanding: 0,
            queue_depth: None,
            queue_at_us: 0,
        }
    }

    /// The local score, µs (see [`rerank`]). Finite and `>= 0`.
    pub fn score(&self, now_us: u64, cfg: &RerankConfig) -> f64 {
        let base = match self.latency_us {
            Some(l) if l.is_finite() && l >= 0.0 => l,
            _ => cap(self.expected_us),
        };
        let per_slot = cap(self.service_us) / self.concurrency.max(1) as f64;
        let fresh = now_us.saturating_sub(self.queue_at_us) <= cfg.queue_ttl_us;
        let queue = match self.queue_depth {
            Some(q) if fresh => q as f64,
            _ => 0.0,
        };
        cap(base + cap((self.outstanding as f64 + queue) * per_slot))
    }
}

/// Tuning of [`rerank_with`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RerankConfig {
    /// A node moves below its successor only if its score exceeds the successor's by more than
    /// this fraction; 0.10.
    pub hysteresis: f64,
    /// … and by more than this many µs; 100 µs.
    pub min_gap_us: f64,
    /// A piggybacked queue depth older than this is ignored, µs; 2 s.
    pub queue_ttl_us: u64,
}

impl Default for RerankConfig {
    fn default() -> Self {
        RerankConfig {
            hysteresis: 0.10,
            min_gap_us: 100.0,
            queue_ttl_us: 2_000_000,
        }
    }
}

/// [`rerank_with`] with [`RerankConfig::default`].
pub fn rerank(cands: &mut [LocalView], now_us: u64) {
    rerank_with(cands, now_us, &RerankConfig::default());
}

/// Reorder the coordinator's candidates (given best first) with this client's observations.
///
/// Each candidate's score ([`LocalView::score`]) is
///
/// ```text
/// score = base + (outstanding + queue) × service / concurrency
/// base  = observed peak-EWMA latency if any, else the coordinator's expected_us
/// queue = the piggybacked queue depth if received within queue_ttl, else 0
/// ```
///
/// (the observed latency already holds the RTT and service time; the outstanding requests and
/// the reported queue are work the next request waits behind). Then two neighbours swap only
/// when the earlier one is *clearly* worse: `score_a > score_b × (1 + hysteresis) + min_gap`;
/// swaps repeat until no neighbours qualify. Tiny differences therefore never reorder the
/// coordinator's choice, and the result is deterministic. Each swap removes one clearly
/// inverted pair, so it ends after at most n²/2 swaps.
pub fn rerank_with(cands: &mut [LocalView], now_us: u64, cfg: &RerankConfig) {
    let h = if cfg.hysteresis.is_finite() {
        cfg.hysteresis.max(0.0)
    } else {
        0.0
    };
    let gap = if cfg.min_gap_us.is_finite() {
        cfg.min_gap_us.max(0.0)
    } else {
        0.0
    };
    let mut scored: Vec<(f64, LocalView)> =
        cands.iter().map(|c| (c.score(now_us, cfg), *c)).collect();
    loop {
        let mut swapped = false;
        for i in 1..scored.len() {
            let (a, b) = (scored[i - 1].0, scored[i].0);
            if a > b * (1.0 + h) + gap {
                scored.swap(i - 1, i);
                swapped = true;
            }
        }
        if !swapped {
            break;
        }
    }
    for (slot, (_, c)) in cands.iter_mut().zip(scored) {
        *slot = c;
    }
}

/// Tuning of a [`BanList`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BanConfig {
    /// Ban after the first failure, µs; 1 s.
    pub base_us: u64,
    /// Longest ban, µs; 60 s.
    pub max_us: u64,
    /// Nodes remembered at most; the least recently failed is forgotten first; 1 024.
    pub capacity: usize,
}

impl Default for BanConfig {
    fn default() -> Self {
        BanConfig {
            base_us: 1_000_000,
            max_us: 60_000_000,
            capacity: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BanEntry {
    failures: u32,
    until_us: u64,
    seq: u64,
}

/// Nodes to avoid for a while after they fail (Petals style).
///
/// The `n`-th consecutive failure bans the node for `base × 2^(n-1)`, at most `max`; a success
/// forgets it. The failure count survives the ban's end, so a node that fails again right after
/// is banned for twice as long. At most `capacity` nodes are remembered. Keys are the caller's
/// node ids; ordered maps keep it deterministic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanList {
    cfg: BanConfig,
    seq: u64,
    entries: BTreeMap<String, BanEntry>,
}

impl BanList {
    /// An empty list.
    pub fn new(cfg: BanConfig) -> Self {
        BanList {
            cfg,
            seq: 0,
            entries: BTreeMap::new(),
        }
    }

    /// Ban length after `failures` consecutive failures, µs.
    pub fn ban_us(&self, failures: u32) -> u64 {
        if failures == 0 {
            return 0;
        }
        let factor = 1u64.checked_shl(failures - 1).unwrap_or(u64::MAX);
        self.cfg.base_us.saturating_mul(factor).min(self.cfg.max_us)
    }

    /// `key` failed at `now_us`; returns when its ban ends, µs.
    pub fn fail(&mut self, key: &str, now_us: u64) -> u64 {
        self.seq = self.seq.saturating_add(1);
        if !self.entries.contains_key(key) && self.entries.len() >= self.cfg.capacity.max(1) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.seq)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.entries.remove(&k);
            }
        }
        let seq = self.seq;
        let entry = self.entries.entry(key.to_owned()).or_insert(BanEntry {
            failures: 0,
            until_us: 0,
            seq,
        });
        entry.failures = entry.failures.saturating_add(1);
        entry.seq = seq;
        let failures = entry.failures;
        let until = now_us.saturating_add(self.ban_us(failures));
        if let Some(e) = self.entries.get_mut(key) {
            e.until_us = until;
        }
        until
    }

    /// `key` answered: forget its failures.
    pub fn succeed(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// `key` is banned at `now_us`.
    pub fn banned(&self, key: &str, now_us: u64) -> bool {
        self.entries.get(key).is_some_and(|e| now_us < e.until_us)
    }

    /// When `key`'s current or last ban ends, µs; `None` if it has no recorded failure.
    pub fn banned_until(&self, key: &str) -> Option<u64> {
        self.entries.get(key).map(|e| e.until_us)
    }

    /// Consecutive failures recorded for `key`.
    pub fn failures(&self, key: &str) -> u32 {
        self.entries.get(key).map_or(0, |e| e.failures)
    }

    /// Nodes remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No node remembered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Default for BanList {
    fn default() -> Self {
        BanList::new(BanConfig::default())
    }
}

/// Full-jitter exponential backoff: a delay drawn uniformly from
/// `[0, min(max_us, base_us × 2^attempt)]`, µs (attempt 0 is the first retry).
pub fn retry_delay_us(attempt: u32, base_us: u64, max_us: u64, rng: &mut impl Rng) -> u64 {
    let factor = 1u64.checked_shl(attempt).unwrap_or(u64::MAX);
    let ceiling = base_us.saturating_mul(factor).min(max_us);
    rng.gen_range(0..=ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let mut p = PeakEwma::new(1_000_000);
        assert_eq!(p.get(0), None);
        assert_eq!(p.cost(0, 5), 0.0);
        p.observe(0, 1_000.0);
        assert_eq!(p.get(0), Some(1_000.0));
        p.observe(10, 50_000.0);
        assert_eq!(
            p.get(10),
            Some(50_000.0),
            "a peak replaces the value at once"
        );
        p.observe(20, 1_000.0);
        assert!(
            p.get(20).unwrap() > 49_000.0,
            "a fast sample right after barely moves it"
        );
        for t in 1..=10 {
            p.observe(20 + t * 500_000, 1_000.0);
        }
        let v = p.get(5_000_020).unwrap();
        assert!(v < 2_000.0, "fast samples over seconds bring it down: {v}");
        assert_eq!(p.cost(5_000_020, 3), v * 4.0);
        // Idle: the value fades toward 0.
        assert!(p.get(50_000_000).unwrap() < 1.0);
    }

    #[test]
    fn peak_ewma_ignores_bad_samples_and_stays_finite() {
        let mut p = PeakEwma::new(0);
        for s in [f64::NAN, f64::INFINITY, -1.0, f64::NEG_INFINITY] {
            p.observe(5, s);
        }
        assert_eq!(p.get(5), None);
        p.observe(u64::MAX, f64::MAX);
        p.observe(0, 1.0); // clock going backwards
        assert!(p.get(u64::MAX).unwrap().is_finite());
        assert!(p.cost(u64::MAX, u32::MAX).is_finite());
        assert!(p.cost(0, u32::MAX).is_finite());
    }

    fn view(key: usize, expected_us: f64) -> LocalView {
        LocalView::new(key, expected_us, 1_000.0)
    }

    fn keys(v: &[LocalView]) -> Vec<usize> {
        v.iter().map(|c| c.key).collect()
    }

    #[test]
    fn rerank_keeps_order_for_small_differences() {
        let mut v = vec![view(0, 5_000.0), view(1, 5_100.0), view(2, 9_000.0)];
        v[0].latency_us = Some(5_400.0); // 6 % above its neighbour: not clearly worse
        rerank(&mut v, 0);
        assert_eq!(keys(&v), vec![0, 1, 2]);
        rerank(&mut v, 0);
        assert_eq!(keys(&v), vec![0, 1, 2], "stable when repeated");
    }

    #[test]
    fn rerank_demotes_a_node_observed_slow() {
        let mut v = vec![view(0, 5_000.0), view(1, 5_100.0), view(2, 9_000.0)];
        v[0].latency_us = Some(40_000.0);
        rerank(&mut v, 0);
        assert_eq!(keys(&v), vec![1, 2, 0]);
    }

    #[test]
    fn rerank_counts_outstanding_and_fresh_queue_only() {
        let mut v = vec![view(0, 5_000.0), view(1, 5_100.0)];
        v[0].outstanding = 3;
        rerank(&mut v, 0);
        assert_eq!(
            keys(&v),
            vec![1, 0],
            "three of ours in flight there: 8 ms vs 5.1 ms"
        );

        let mut v = vec![view(0, 5_000.0), view(1, 5_100.0)];
        v[0].queue_depth = Some(10);
        v[0].queue_at_us = 1_000_000;
        let mut stale = v.clone();
        rerank(&mut v, 1_500_000);
        assert_eq!(keys(&v), vec![1, 0], "a fresh deep queue demotes");
        rerank(&mut stale, 10_000_000);
        assert_eq!(keys(&stale), vec![0, 1], "a stale one is ignored");

        let mut v = vec![view(0, 5_000.0), view(1, 5_100.0)];
        v[0].concurrency = 8;
        v[0].outstanding = 3;
        rerank(&mut v, 0);
        assert_eq!(keys(&v), vec![0, 1], "eight slots absorb three requests");
    }

    #[test]
    fn rerank_is_a_permutation_and_finite_for_wild_inputs() {
        let mut rng = StdRng::seed_from_u64(21);
        let wild = [f64::NAN, f64::INFINITY, -1.0, 0.0, f64::MAX, 1e3, 5e3];
        for _ in 0..500 {
            let n = rng.gen_range(0..10);
            let mut v: Vec<LocalView> = (0..n)
                .map(|k| LocalView {
                    key: k,
                    expected_us: wild[rng.gen_range(0..wild.len())],
                    service_us: wild[rng.gen_range(0..wild.len())],
                    concurrency: [0, 1, 4, u32::MAX][rng.gen_range(0..4)],
                    latency_us: rng
                        .gen_bool(0.5)
                        .then(|| wild[rng.gen_range(0..wild.len())]),
                    outstanding: [0, 2, u32::MAX][rng.gen_range(0..3)],
                    queue_depth: rng.gen_bool(0.5).then(|| rng.gen()),
                    queue_at_us: rng.gen(),
                })
                .collect();
            let now = rng.gen();
            let cfg = RerankConfig::default();
            assert!(v.iter().all(|c| {
                let s = c.score(now, &cfg);
                s.is_finite() && s >= 0.0
            }));
            rerank(&mut v, now);
            let mut k = keys(&v);
            k.sort_unstable();
            assert_eq!(k, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn ban_list_doubles_to_the_cap_and_forgets_on_success() {
        let mut b = BanList::default();
        assert!(!b.banned("a", 0));
        assert_eq!(b.fail("a", 0), 1_000_000);
        assert!(b.banned("a", 999_999));
        assert!(!b.banned("a", 1_000_000));
        assert_eq!(b.fail("a", 1_000_000), 3_000_000);
        assert_eq!(b.fail("a", 3_000_000), 7_000_000);
        assert_eq!(b.failures("a"), 3);
        for _ in 0..100 {
            b.fail("a", 10_000_000);
        }
        assert_eq!(b.banned_until("a"), Some(70_000_000), "capped at 60 s");
        b.succeed("a");
        assert!(!b.banned("a", 10_000_001));
        assert_eq!(b.failures("a"), 0);
        assert_eq!(b.fail("a", u64::MAX), u64::MAX, "no overflow");
        assert_eq!(b.ban_us(u32::MAX), 60_000_000);
    }

    #[test]
    fn ban_list_is_bounded_and_evicts_the_oldest() {
        let mut b = BanList::new(BanConfig {
            capacity: 2,
            ..BanConfig::default()
        });
        b.fail("a", 0);
        b.fail("b", 0);
        b.fail("a", 1);
        b.fail("c", 2);
        assert_eq!(b.len(), 2);
        assert!(b.banned("a", 2));
        assert!(
            !b.banned("b", 2),
            "b failed least recently and was forgotten"
        );
        assert!(b.banned("c", 2));
    }

    #[test]
    fn retry_delay_is_full_jitter_and_capped() {
        let mut rng = StdRng::seed_from_u64(22);
        for attempt in [0, 1, 5, 63, 64, u32::MAX] {
            for _ in 0..100 {
                let d = retry_delay_us(attempt, 100_000, 10_000_000, &mut rng);
                let ceiling = (100_000u64 << attempt.min(20)).min(10_000_000);
                assert!(d <= ceiling, "{attempt}: {d}");
            }
        }
        let delays: Vec<u64> = (0..200)
            .map(|_| retry_delay_us(3, 1_000, 1_000_000, &mut rng))
            .collect();
        assert!(delays.iter().any(|d| *d < 2_000) && delays.iter().any(|d| *d > 6_000));
        assert_eq!(retry_delay_us(9, 0, 5, &mut rng), 0);
        // The extremes do not overflow or panic.
        let _ = retry_delay_us(u32::MAX, u64::MAX, u64::MAX, &mut rng);
    }
}
