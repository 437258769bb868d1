//! Demand tracking per model (or per model and caller area): arrival rate with trend, and the
//! inter-arrival-time (IAT) histogram of the *hybrid histogram policy* of Shahrad et al.,
//! "Serverless in the Wild" (USENIX ATC 2020), which yields a keep-alive window and a pre-warm
//! time.
//!
//! # Rate
//! Two exponentially decayed event counts, a fast one (`rate_decay_us`) and a slow one (four
//! times longer). Each is a rate estimate whose mean age is its decay time, so
//! `trend = (fast - slow) / (slow_decay - fast_decay)` (per s²) and
//! [`Demand::predicted_rate_per_s`] extrapolates the fast rate `horizon` ahead, never below 0.
//!
//! # Hybrid histogram policy
//! Every arrival after the first records the time since the previous one. IATs within the
//! range (`bins × bin_width_us`) go into their bin; longer ones are *out of bounds* (OOB).
//! [`Demand::keep_alive`] then decides, in this order:
//! 1. fewer than `min_samples` IATs: the fixed keep-alive (`fallback_keep_alive_us`), no
//!    pre-warm;
//! 2. more than `oob_fraction` of the IATs are OOB: the histogram cannot say when the next call
//!    comes; as in the paper, a time-series forecast of the next IAT is used instead. The paper
//!    uses ARIMA; here the forecast is an EWMA of the logarithm of the OOB IATs (robust to
//!    heavy tails, O(1) memory). Pre-warm at `forecast × (1 - oob_margin)`, keep alive until
//!    `forecast × (1 + oob_margin)`;
//! 3. the bin counts have a coefficient of variation below `cv_threshold` (the counts are flat:
//!    no pattern): the fixed keep-alive, no pre-warm (the paper's "not representative" case);
//! 4. otherwise the histogram decides: `head` = the lower edge of the bin holding the
//!    `prewarm_percentile` (5th) IAT, `tail` = the upper edge of the bin holding the
//!    `keep_alive_percentile` (99th); pre-warm after `head × (1 - margin)` (none when that is
//!    0), keep alive until `tail × (1 + margin)`.
//!
//! # Keep-alive by worth (an addition to the paper)
//! The 99th percentile is a poor end for the window both ways: with heavy-tailed IATs (e.g.
//! Pareto) it lies hours after the last call, and keeping a replica that long costs far more
//! than the cold starts it saves; for a frequent app the last percent of IATs can still come
//! soon enough to be worth waiting for. When `cold_start_cost_us` is set (one cold start is
//! counted as worth that much idle replica time), rule 4 ends the window instead at the bin
//! edge `K ≥ head` that maximises, over the histogram,
//! `cold_start_cost × #(head ≤ IAT < K) − Σ (min(IAT, K) − pre-warm)⁺` (calls caught warm
//! against idle time held; OOB IATs count as beyond `K`, the smallest such `K` on ties), then
//! adds the margin. A replica is thus kept while the hazard of a call stays above about one
//! per `cold_start_cost_us` of waiting. 0 disables this (the paper's policy as published).
//!
//! All times are measured from the last arrival. Memory is bounded by [`MAX_BINS`]; counts
//! saturate; no input panics or yields NaN.

use crate::ewma::Ewma;

/// The most histogram bins a [`Demand`] keeps (a larger `bins` is clamped).
pub const MAX_BINS: usize = 4_096;

/// Tuning of a [`Demand`].
#[derive(Debug, Clone, PartialEq)]
pub struct DemandConfig {
    /// Width of one histogram bin, µs (paper: 1 minute).
    pub bin_width_us: u64,
    /// Number of bins (paper: 240, i.e. 4 hours); clamped to `1..=MAX_BINS`.
    pub bins: usize,
    /// Percentile of the IATs that sets the pre-warm time (paper: 0.05).
    pub prewarm_percentile: f64,
    /// Percentile of the IATs that sets the keep-alive window (paper: 0.99).
    pub keep_alive_percentile: f64,
    /// Safety margin: the pre-warm time shrinks and the keep-alive grows by this fraction
    /// (paper: 0.10).
    pub margin: f64,
    /// Fewer IATs than this: fixed keep-alive.
    pub min_samples: u64,
    /// Bin counts with a coefficient of variation below this are not representative (paper: 2).
    pub cv_threshold: f64,
    /// Fixed keep-alive used when the histogram is not representative, µs.
    pub fallback_keep_alive_us: u64,
    /// Fraction of OOB IATs above which the OOB forecast decides (paper: 0.5).
    pub oob_fraction: f64,
    /// Margin around the OOB forecast (paper: 0.15).
    pub oob_margin: f64,
    /// Decay of the fast rate estimate, µs.
    pub rate_decay_us: u64,
    /// Worth of one avoided cold start in idle replica time, µs, for the keep-alive by worth
    /// (see the module docs); 0 = the paper's tail percentile.
    pub cold_start_cost_us: u64,
}

impl Default for DemandConfig {
    /// The paper's scale: 1-minute bins over 4 hours, 5th/99th percentiles, 10 % margin,
    /// CV threshold 2; 10-minute fallback; 10 s rate decay; a cold start worth 10 minutes of
    /// an idle replica (the fallback keep-alive's own bet).
    fn default() -> Self {
        DemandConfig {
            bin_width_us: 60_000_000,
            bins: 240,
            prewarm_percentile: 0.05,
            keep_alive_percentile: 0.99,
            margin: 0.10,
            min_samples: 5,
            cv_threshold: 2.0,
            fallback_keep_alive_us: 600_000_000,
            oob_fraction: 0.5,
            oob_margin: 0.15,
            rate_decay_us: 10_000_000,
            cold_start_cost_us: 600_000_000,
        }
    }
}

/// Which rule produced a [`KeepAlive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeepAliveSource {
    /// Too few IATs: fixed keep-alive.
    FewSamples,
    /// Flat bin counts: fixed keep-alive.
    NotRepresentative,
    /// Percentiles of the histogram.
    Histogram,
    /// Forecast of out-of-range IATs.
    OutOfBounds,
}

/// When to keep a model loaded, measured from its last arrival.
#[derive(Debug, Clone, PartialEq)]
pub struct KeepAlive {
    /// `Some(p)`: unload once idle and load again (pre-warm) so it is ready `p` µs after the
    /// last arrival; `None`: stay loaded from the last arrival on.
    pub prewarm_after_us: Option<u64>,
    /// Unload when no request came for this long after the last arrival, µs (always at least
    /// `prewarm_after_us`).
    pub keep_alive_us: u64,
    /// Which rule decided.
    pub source: KeepAliveSource,
    /// Human-readable explanation.
    pub reason: String,
}

/// Arrival statistics of one model (or one model from one caller area).
#[derive(Debug, Clone)]
pub struct Demand {
    cfg: DemandConfig,
    counts: Vec<u64>,
    in_range: u64,
    oob: u64,
    /// Σ counts², for the coefficient of variation in O(1).
    sum_sq: f64,
    oob_log: Ewma,
    fast: f64,
    slow: f64,
    rate_at_us: u64,
    last_arrival_us: Option<u64>,
    first_arrival_us: Option<u64>,
    arrivals: u64,
}

fn finite_fraction(x: f64, default: f64) -> f64 {
    if x.is_finite() {
        x.clamp(0.0, 1.0)
    } else {
        default
    }
}

/// `x` as µs, saturating, 0 for NaN or negative.
fn to_us(x: f64) -> u64 {
    if x.is_nan() || x <= 0.0 {
        0
    } else if x >= u64::MAX as f64 {
        u64::MAX
    } else {
        x as u64
    }
}

fn fmt_us(us: u64) -> String {
    let s = us as f64 / 1e6;
    if s >= 3_600.0 {
        format!("{:.1}h", s / 3_600.0)
    } else if s >= 60.0 {
        format!("{:.1}min", s / 60.0)
    } else if s >= 1.0 {
        format!("{s:.1}s")
    } else {
        format!("{:.0}ms", s * 1e3)
    }
}

impl Demand {
    /// An empty tracker. Out-of-range settings are clamped (at least 1 bin of at least 1 µs,
    /// fractions to `0..=1`).
    pub fn new(cfg: DemandConfig) -> Self {
        let mut cfg = cfg;
        cfg.bins = cfg.bins.clamp(1, MAX_BINS);
        cfg.bin_width_us = cfg.bin_width_us.max(1);
        cfg.rate_decay_us = cfg.rate_decay_us.max(1);
        cfg.prewarm_percentile = finite_fraction(cfg.prewarm_percentile, 0.05);
        cfg.keep_alive_percentile = finite_fraction(cfg.keep_alive_percentile, 0.99);
        cfg.margin = finite_fraction(cfg.margin, 0.1);
        cfg.oob_fraction = finite_fraction(cfg.oob_fraction, 0.5);
        cfg.oob_margin = finite_fraction(cfg.oob_margin, 0.15);
        if !cfg.cv_threshold.is_finite() {
            cfg.cv_threshold = 2.0;
        }
        Demand {
            counts: vec![0; cfg.bins],
            in_range: 0,
            oob: 0,
            sum_sq: 0.0,
            // The OOB forecast weighs arrivals, not time: a decay of 1 µs-per-"sample" is
            // emulated by observing at increasing fake timestamps (one per OOB IAT).
            oob_log: Ewma::new(3),
            fast: 0.0,
            slow: 0.0,
            rate_at_us: 0,
            last_arrival_us: None,
            first_arrival_us: None,
            arrivals: 0,
            cfg,
        }
    }

    /// The (clamped) configuration.
    pub fn config(&self) -> &DemandConfig {
        &self.cfg
    }

    fn slow_decay_us(&self) -> f64 {
        self.cfg.rate_decay_us as f64 * 4.0
    }

    fn decay_to(&mut self, now_us: u64) {
        if now_us > self.rate_at_us {
            let dt = (now_us - self.rate_at_us) as f64;
            self.fast *= (-dt / self.cfg.rate_decay_us as f64).exp();
            self.slow *= (-dt / self.slow_decay_us()).exp();
            self.rate_at_us = now_us;
        }
    }

    /// Record an arrival at `now_us`. Arrivals out of order count for the rate but not as IATs.
    pub fn observe(&mut self, now_us: u64) {
        self.decay_to(now_us);
        // Each event adds 1/τ to a rate whose weight decays over τ (per µs, scaled to per s
        // on read).
        self.fast += 1.0 / self.cfg.rate_decay_us as f64;
        self.slow += 1.0 / self.slow_decay_us();
        self.arrivals = self.arrivals.saturating_add(1);
        if self.first_arrival_us.is_none() {
            self.first_arrival_us = Some(now_us);
        }
        if let Some(last) = self.last_arrival_us {
            if now_us >= last {
                self.record_iat(now_us - last);
            }
        }
        self.last_arrival_us = Some(self.last_arrival_us.map_or(now_us, |l| l.max(now_us)));
    }

    /// Record one inter-arrival time directly (e.g. when replaying history).
    pub fn record_iat(&mut self, iat_us: u64) {
        let bin = iat_us / self.cfg.bin_width_us;
        if bin < self.cfg.bins as u64 {
            let c = &mut self.counts[bin as usize];
            if *c < u64::MAX {
                self.sum_sq += 2.0 * *c as f64 + 1.0;
                *c += 1;
                self.in_range += 1;
            }
        } else {
            self.oob = self.oob.saturating_add(1);
            let t = self.oob.saturating_mul(3);
            self.oob_log.observe(t, (iat_us.max(1) as f64).ln());
        }
    }

    /// Arrivals seen.
    pub fn arrivals(&self) -> u64 {
        self.arrivals
    }

    /// Time of the last arrival, µs.
    pub fn last_arrival_us(&self) -> Option<u64> {
        self.last_arrival_us
    }

    /// IATs recorded (in range and out of bounds).
    pub fn samples(&self) -> u64 {
        self.in_range.saturating_add(self.oob)
    }

    /// Both decayed rates, per s, corrected for the start-up bias (a decayed count that began
    /// `e` µs ago holds only `1 - exp(-e/τ)` of its steady value; `e` is taken as at least
    /// τ/10, so one arrival does not read as a huge rate).
    fn rates_at(&self, now_us: u64) -> (f64, f64) {
        let dt = now_us.saturating_sub(self.rate_at_us) as f64;
        let tf = self.cfg.rate_decay_us as f64;
        let ts = self.slow_decay_us();
        let e = self
            .first_arrival_us
            .map_or(0.0, |f| now_us.saturating_sub(f) as f64);
        let fix = |tau: f64| 1.0 / (1.0 - (-(e.max(tau / 10.0)) / tau).exp());
        let f = self.fast * (-dt / tf).exp() * fix(tf);
        let s = self.slow * (-dt / ts).exp() * fix(ts);
        (f * 1e6, s * 1e6)
    }

    /// Arrival rate at `now_us`, per second (the fast estimate).
    pub fn rate_per_s(&self, now_us: u64) -> f64 {
        let r = self.rates_at(now_us).0;
        if r.is_finite() {
            r.max(0.0)
        } else {
            0.0
        }
    }

    /// Trend of the rate, per s² (positive while demand grows).
    pub fn trend_per_s2(&self, now_us: u64) -> f64 {
        let (f, s) = self.rates_at(now_us);
        let span_s = (self.slow_decay_us() - self.cfg.rate_decay_us as f64) / 1e6;
        let t = (f - s) / span_s;
        if t.is_finite() {
            t
        } else {
            0.0
        }
    }

    /// The rate expected `horizon_us` from now: the fast rate (whose mean age is its decay
    /// time) extrapolated along the trend, never below 0 nor above 10× the current rate.
    pub fn predicted_rate_per_s(&self, now_us: u64, horizon_us: u64) -> f64 {
        let r = self.rate_per_s(now_us);
        let ahead_s = (self.cfg.rate_decay_us as f64 + horizon_us as f64) / 1e6;
        let p = r + self.trend_per_s2(now_us) * ahead_s;
        if p.is_finite() {
            p.clamp(0.0, r * 10.0)
        } else {
            r
        }
    }

    /// Coefficient of variation of the bin counts (0 when empty).
    pub fn bin_cv(&self) -> f64 {
        let n = self.counts.len() as f64;
        let total = self.in_range as f64;
        if total <= 0.0 {
            return 0.0;
        }
        let mean = total / n;
        let var = (self.sum_sq / n - mean * mean).max(0.0);
        let cv = var.sqrt() / mean;
        if cv.is_finite() {
            cv
        } else {
            0.0
        }
    }

    /// The bin holding the `p` quantile of the in-range IATs.
    fn percentile_bin(&self, p: f64) -> usize {
        // The smallest bin whose cumulative count reaches ceil(p × total) (at least 1).
        let need = ((p * self.in_range as f64).ceil() as u64).max(1);
        let mut acc = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            acc = acc.saturating_add(*c);
            if acc >= need {
                return i;
            }
        }
        self.counts.len().saturating_sub(1)
    }

    /// The IAT at quantile `p` (0..=1) as the lower edge of its bin, µs; `None` without
    /// in-range samples.
    pub fn iat_percentile_us(&self, p: f64) -> Option<u64> {
        if self.in_range == 0 {
            return None;
        }
        let b = self.percentile_bin(finite_fraction(p, 0.5)) as u64;
        Some(b.saturating_mul(self.cfg.bin_width_us))
    }

    fn fixed(&self, source: KeepAliveSource, why: String) -> KeepAlive {
        let ka = self.cfg.fallback_keep_alive_us;
        KeepAlive {
            prewarm_after_us: None,
            keep_alive_us: ka,
            source,
            reason: format!("fixed keep-alive {} ({why})", fmt_us(ka)),
        }
    }

    /// The bin edge (µs after the last call, at or after the bin `head_bin`) that maximises
    /// the net worth of keeping a replica until then (see the module docs); `None` when
    /// `cold_start_cost_us` is 0.
    fn worth_keeping_until(&self, head_bin: u64, pre_us: u64) -> Option<u64> {
        let cost = self.cfg.cold_start_cost_us as f64;
        if cost <= 0.0 {
            return None;
        }
        let w = self.cfg.bin_width_us as f64;
        let pre = pre_us as f64;
        let last = self.counts.len().saturating_sub(1);
        let first = (head_bin as usize).min(last);
        // IATs beyond bin b (in range) plus the OOB ones.
        let mut above = self.oob as f64 + self.in_range as f64;
        let mut idle_below = 0.0; // Σ over IATs in bins ≤ b of (mid − pre)⁺
        let mut hits = 0.0;
        let mut best: Option<(f64, u64)> = None;
        for (b, &n) in self.counts.iter().enumerate().take(last + 1) {
            let n = n as f64;
            above -= n;
            let mid = (b as f64 + 0.5) * w;
            idle_below += n * (mid - pre).max(0.0);
            if b < first {
                continue;
            }
            hits += n;
            let k = (b as f64 + 1.0) * w;
            let net = cost * hits - idle_below - above.max(0.0) * (k - pre).max(0.0);
            if best.is_none_or(|x| net > x.0) {
                best = Some((net, (b as u64 + 1).saturating_mul(self.cfg.bin_width_us)));
            }
        }
        best.map(|b| b.1)
    }

    /// The keep-alive window and pre-warm time for the next idle period (see the module docs).
    pub fn keep_alive(&self) -> KeepAlive {
        let c = &self.cfg;
        let samples = self.samples();
        if samples < c.min_samples {
            return self.fixed(
                KeepAliveSource::FewSamples,
                format!("{samples} IATs < {}", c.min_samples),
            );
        }
        let oob_share = self.oob as f64 / samples.max(1) as f64;
        if oob_share > c.oob_fraction {
            if let Some(l) = self.oob_log.get() {
                let forecast = l.clamp(0.0, 43.0).exp();
                let pre = to_us(forecast * (1.0 - c.oob_margin));
                let ka = to_us(forecast * (1.0 + c.oob_margin)).max(pre);
                return KeepAlive {
                    prewarm_after_us: (pre > 0).then_some(pre),
                    keep_alive_us: ka,
                    source: KeepAliveSource::OutOfBounds,
                    reason: format!(
                        "{:.0}% of IATs beyond the {} histogram: next call forecast in {}, \
                         pre-warm after {}, keep alive until {}",
                        oob_share * 100.0,
                        fmt_us(c.bin_width_us.saturating_mul(c.bins as u64)),
                        fmt_us(to_us(forecast)),
                        fmt_us(pre),
                        fmt_us(ka)
                    ),
                };
            }
        }
        if self.in_range == 0 {
            return self.fixed(
                KeepAliveSource::NotRepresentative,
                "no IAT within the histogram".into(),
            );
        }
        let cv = self.bin_cv();
        if cv < c.cv_threshold {
            return self.fixed(
                KeepAliveSource::NotRepresentative,
                format!("IAT histogram flat, CV {cv:.2} < {:.2}", c.cv_threshold),
            );
        }
        let w = c.bin_width_us;
        let head_bin = self.percentile_bin(c.prewarm_percentile) as u64;
        let tail_bin = self.percentile_bin(c.keep_alive_percentile) as u64;
        let head = head_bin.saturating_mul(w);
        let tail = tail_bin.saturating_add(1).saturating_mul(w);
        let pre = to_us(head as f64 * (1.0 - c.margin));
        let (end, by_worth) = match self.worth_keeping_until(head_bin, pre) {
            Some(k) if k != tail => (k, true),
            _ => (tail, false),
        };
        let ka = to_us(end as f64 * (1.0 + c.margin)).max(pre);
        KeepAlive {
            prewarm_after_us: (pre > 0).then_some(pre),
            keep_alive_us: ka,
            source: KeepAliveSource::Histogram,
            reason: format!(
                "IAT histogram ({} samples, CV {cv:.1}): p{:.0} {} → {}, p{:.0} {} → keep alive {}",
                self.in_range,
                c.prewarm_percentile * 100.0,
                fmt_us(head),
                if pre > 0 {
                    format!("pre-warm after {}", fmt_us(pre))
                } else {
                    "stay loaded".to_string()
                },
                c.keep_alive_percentile * 100.0,
                fmt_us(tail),
                if by_worth {
                    format!(
                        "{} (window by worth: calls after {} {} the wait)",
                        fmt_us(ka),
                        fmt_us(end),
                        if end < tail {
                            "too rare to pay for"
                        } else {
                            "still worth"
                        }
                    )
                } else {
                    fmt_us(ka)
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;

    fn small() -> DemandConfig {
        DemandConfig {
            bin_width_us: S,
            bins: 100,
            fallback_keep_alive_us: 30 * S,
            ..DemandConfig::default()
        }
    }

    #[test]
    fn rate_tracks_poisson_like_arrivals_and_decays() {
        let mut d = Demand::new(DemandConfig::default());
        for i in 0..1_000u64 {
            d.observe(i * 100_000); // 10/s for 100 s
        }
        let r = d.rate_per_s(100 * S);
        assert!((r - 10.0).abs() < 0.5, "{r}");
        assert!(d.trend_per_s2(100 * S).abs() < 0.2);
        assert!(d.rate_per_s(200 * S) < 0.01);
        assert_eq!(Demand::new(small()).rate_per_s(0), 0.0);
    }

    #[test]
    fn trend_is_positive_on_a_ramp() {
        let mut d = Demand::new(DemandConfig::default());
        let mut t = 0u64;
        // The rate grows from 1/s to 50/s over 50 s.
        for sec in 1..=50u64 {
            for _ in 0..sec {
                t += S / sec;
                d.observe(t);
            }
        }
        assert!(d.trend_per_s2(t) > 0.2, "{}", d.trend_per_s2(t));
        assert!(d.predicted_rate_per_s(t, 5 * S) > d.rate_per_s(t));
    }

    #[test]
    fn periodic_arrivals_give_prewarm_and_tight_keep_alive() {
        let mut d = Demand::new(small());
        for i in 0..20u64 {
            d.observe(i * 30 * S + 200_000); // every 30 s
        }
        let k = d.keep_alive();
        assert_eq!(k.source, KeepAliveSource::Histogram, "{}", k.reason);
        // Bin 30: head 30 s × 0.9 = 27 s; tail 31 s × 1.1 = 34.1 s.
        assert_eq!(k.prewarm_after_us, Some(27 * S));
        assert_eq!(k.keep_alive_us, 34_100_000);
        assert!(k.reason.contains("pre-warm"), "{}", k.reason);
        assert_eq!(d.iat_percentile_us(0.5), Some(30 * S));
    }

    #[test]
    fn keep_alive_by_worth_cuts_a_rare_tail_and_keeps_a_busy_one() {
        // 90 IATs of 1.5 s and 10 of 80.5 s: the 99th percentile is in bin 80.
        let with_cost = |cost_s: u64| {
            let mut d = Demand::new(DemandConfig {
                cold_start_cost_us: cost_s * S,
                ..small()
            });
            for _ in 0..90 {
                d.record_iat(1_500_000);
            }
            for _ in 0..10 {
                d.record_iat(80_500_000);
            }
            d.keep_alive()
        };
        // The paper: tail 81 s × 1.1.
        let k = with_cost(0);
        assert_eq!(k.keep_alive_us, 89_100_000, "{}", k.reason);
        // A cold start worth 10 s: waiting 80 s for 10 % of the calls is not.
        let k = with_cost(10);
        assert_eq!(k.keep_alive_us, 2_200_000, "{}", k.reason);
        assert!(k.reason.contains("too rare"), "{}", k.reason);
        // Worth 10 min: it is.
        assert_eq!(with_cost(600).keep_alive_us, 89_100_000);
        // A busy tail beyond the 99th percentile (1 in 200 calls after 20 s, worth 10 min
        // each) extends the window.
        let mut d = Demand::new(small());
        for _ in 0..199 {
            d.record_iat(500_000);
        }
        d.record_iat(20_500_000);
        let k = d.keep_alive();
        assert_eq!(k.keep_alive_us, 23_100_000, "{}", k.reason);
        assert!(k.reason.contains("still worth"), "{}", k.reason);
    }

    #[test]
    fn frequent_arrivals_stay_loaded() {
        let mut d = Demand::new(small());
        for i in 0..100u64 {
            d.observe(i * 300_000);
        }
        let k = d.keep_alive();
        assert_eq!(k.prewarm_after_us, None);
        assert_eq!(k.keep_alive_us, 1_100_000);
    }

    #[test]
    fn fallback_with_few_samples_and_with_flat_histogram() {
        let mut d = Demand::new(small());
        d.observe(0);
        d.observe(10 * S);
        let k = d.keep_alive();
        assert_eq!(k.source, KeepAliveSource::FewSamples);
        assert_eq!(k.keep_alive_us, 30 * S);
        assert_eq!(k.prewarm_after_us, None);
        // IATs spread evenly over all 100 bins: CV 0.
        let mut d = Demand::new(small());
        for b in 0..100u64 {
            d.record_iat(b * S + 1);
        }
        assert!(d.bin_cv() < 0.01);
        let k = d.keep_alive();
        assert_eq!(k.source, KeepAliveSource::NotRepresentative, "{}", k.reason);
        assert_eq!(k.keep_alive_us, 30 * S);
    }

    #[test]
    fn out_of_bounds_iats_use_the_forecast() {
        let mut d = Demand::new(small());
        for _ in 0..10 {
            d.record_iat(1_000 * S); // far beyond the 100 s range
        }
        let k = d.keep_alive();
        assert_eq!(k.source, KeepAliveSource::OutOfBounds, "{}", k.reason);
        let pre = k.prewarm_after_us.unwrap();
        assert!((840 * S..=860 * S).contains(&pre), "{pre}");
        assert!((1_140 * S..=1_160 * S).contains(&k.keep_alive_us));
    }

    #[test]
    fn extreme_inputs_are_clamped_and_safe() {
        let cfg = DemandConfig {
            bin_width_us: 0,
            bins: usize::MAX,
            prewarm_percentile: f64::NAN,
            keep_alive_percentile: 7.0,
            margin: f64::INFINITY,
            cv_threshold: f64::NAN,
            rate_decay_us: 0,
            ..DemandConfig::default()
        };
        let mut d = Demand::new(cfg);
        assert_eq!(d.config().bins, MAX_BINS);
        for t in [0, u64::MAX, 5, u64::MAX, 0] {
            d.observe(t);
        }
        d.record_iat(u64::MAX);
        d.record_iat(0);
        for _ in 0..10 {
            d.record_iat(3);
        }
        let k = d.keep_alive();
        assert!(k.keep_alive_us >= k.prewarm_after_us.unwrap_or(0));
        for v in [
            d.rate_per_s(u64::MAX),
            d.trend_per_s2(0),
            d.predicted_rate_per_s(0, u64::MAX),
            d.bin_cv(),
        ] {
            assert!(v.is_finite(), "{v}");
        }
        let mut d = Demand::new(small());
        for _ in 0..20 {
            d.record_iat(u64::MAX);
        }
        let k = d.keep_alive();
        assert_eq!(k.source, KeepAliveSource::OutOfBounds);
        assert!(k.keep_alive_us >= k.prewarm_after_us.unwrap_or(0));
    }
}
