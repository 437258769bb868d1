//! Vivaldi network coordinates, height-vector variant (as in Serf and Consul).
//!
//! Each node keeps a [`Coordinate`]: a point in an 8-dimensional Euclidean space plus a
//! non-negative *height* (the access link every packet crosses, Dabek et al. 2004, "Vivaldi: a
//! decentralized network coordinate system"), an *error* estimate (how much the node trusts its
//! own position) and an *adjustment* term (Serf: the mean residual of recent samples, which
//! absorbs what the Euclidean model cannot). The predicted RTT between two nodes is
//! [`CoordinateExt::distance_us`]. All times are µs, as `f64`.
//!
//! A node updates its own coordinate from a measured RTT to a peer and the peer's coordinate
//! ([`Vivaldi::update`]): both are spring forces, weighted by the relative errors (the adaptive
//! timestep of the paper), plus a weak gravity toward the origin ("Network coordinates in the
//! wild", Ledlie et al. 2007) that stops the whole system drifting away.
//!
//! [`LatencyFilter`] is an optional per-peer median filter over the last few RTT samples that
//! removes single outliers before they reach [`Vivaldi::update`].

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Dimensions of the Euclidean part of a coordinate.
pub const DIMENSIONS: usize = 8;

/// The largest RTT sample accepted by [`Vivaldi::update`], µs (10 s).
pub const MAX_RTT_US: f64 = 10_000_000.0;

/// A coordinate's error below which it is considered settled (see [`CoordinateExt::settled`]).
///
/// A new coordinate starts at [`VivaldiConfig::error_max`] (1.5); the error is an EWMA of the
/// relative prediction error, so 0.5 means recent predictions were off by about half or less,
/// which beats a region/zone label prior for ranking.
pub const SETTLED_ERROR: f64 = 0.5;

/// Distances below this are treated as zero (µs).
const ZERO_THRESHOLD: f64 = 1.0;

pub use skein_proto::Coordinate;

/// What this module computes over a [`Coordinate`] (a wire type of skein-proto, so its
/// methods live in this trait): bring it into scope with
/// `use skein_policy::vivaldi::CoordinateExt`.
pub trait CoordinateExt {
    /// The origin with the default minimum height and the maximum error (a new node).
    fn origin() -> Self;

    /// Right number of dimensions and every field finite.
    fn is_valid(&self) -> bool;

    /// The error is below [`SETTLED_ERROR`] (and the coordinate is valid): its distances are
    /// better RTT estimates than a label prior.
    fn settled(&self) -> bool;

    /// Euclidean distance plus both heights, µs (no adjustment). Mismatched lengths compare the
    /// common prefix; never NaN (an invalid coordinate gives `f64::MAX`).
    fn raw_distance_us(&self, other: &Coordinate) -> f64;

    /// Predicted RTT to `other`, µs: [`raw_distance_us`](Self::raw_distance_us) plus both
    /// adjustments; when that sum is not positive the raw distance is used (as Serf does).
    /// Always finite and `>= 0`.
    fn distance_us(&self, other: &Coordinate) -> f64;
}

impl CoordinateExt for Coordinate {
    fn origin() -> Self {
        let c = VivaldiConfig::default();
        Coordinate {
            vec: vec![0.0; DIMENSIONS],
            height: c.height_min_us,
            error: c.error_max,
            adjustment: 0.0,
        }
    }

    fn is_valid(&self) -> bool {
        self.vec.len() == DIMENSIONS
            && self.vec.iter().all(|x| x.is_finite())
            && self.height.is_finite()
            && self.error.is_finite()
            && self.adjustment.is_finite()
    }

    fn settled(&self) -> bool {
        self.is_valid() && self.error >= 0.0 && self.error < SETTLED_ERROR
    }

    fn raw_distance_us(&self, other: &Coordinate) -> f64 {
        let sq: f64 = self
            .vec
            .iter()
            .zip(&other.vec)
            .map(|(a, b)| (a - b) * (a - b))
            .sum();
        let d = sq.sqrt() + self.height + other.height;
        if d.is_nan() {
            f64::MAX
        } else {
            d.clamp(0.0, f64::MAX)
        }
    }

    fn distance_us(&self, other: &Coordinate) -> f64 {
        let raw = self.raw_distance_us(other);
        let adjusted = raw + self.adjustment + other.adjustment;
        if adjusted.is_finite() && adjusted > 0.0 {
            adjusted
        } else {
            raw
        }
    }
}

/// Tuning of the Vivaldi update; [`Default`] holds Serf's constants, in µs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VivaldiConfig {
    /// Largest (and initial) error; 1.5.
    pub error_max: f64,
    /// Weight of a new sample in the error EWMA (c_e in the paper); 0.25.
    pub ce: f64,
    /// Step size of the position update (c_c in the paper); 0.25.
    pub cc: f64,
    /// Samples averaged into the adjustment term; 20 (0 turns adjustment off).
    pub adjustment_window: usize,
    /// Smallest height, µs; 10 µs.
    pub height_min_us: f64,
    /// Gravity toward the origin, µs: each update pulls the coordinate
    /// `(distance_to_origin / rho)²` µs toward it; 150 ms. `0` or non-finite turns it off.
    pub gravity_rho_us: f64,
    /// Samples in a [`LatencyFilter`]'s median window; 3.
    pub latency_filter_size: usize,
}

impl Default for VivaldiConfig {
    fn default() -> Self {
        VivaldiConfig {
            error_max: 1.5,
            ce: 0.25,
            cc: 0.25,
            adjustment_window: 20,
            height_min_us: 10.0,
            gravity_rho_us: 150_000.0,
            latency_filter_size: 3,
        }
    }
}

/// Why [`Vivaldi::update`] rejected a sample (the state is then unchanged).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VivaldiError {
    /// The peer's coordinate has the wrong number of dimensions.
    WrongDimensions {
        /// [`DIMENSIONS`].
        expected: usize,
        /// What the peer sent.
        got: usize,
    },
    /// The peer's coordinate holds a NaN or an infinity.
    InvalidCoordinate,
    /// The RTT is not finite, not positive, or above [`MAX_RTT_US`].
    InvalidRtt(f64),
}

impl fmt::Display for VivaldiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VivaldiError::WrongDimensions { expected, got } => write!(
                f,
                "peer coordinate has {got} dimensions, expected {expected}"
            ),
            VivaldiError::InvalidCoordinate => {
                write!(f, "peer coordinate holds a non-finite value")
            }
            VivaldiError::InvalidRtt(rtt) => write!(
                f,
                "rtt {rtt} µs rejected: it must be finite, > 0 and <= {MAX_RTT_US} µs"
            ),
        }
    }
}

impl std::error::Error for VivaldiError {}

/// One node's own Vivaldi state: its coordinate and the samples behind its adjustment.
#[derive(Debug, Clone, PartialEq)]
pub struct Vivaldi {
    config: VivaldiConfig,
    coord: Coordinate,
    adjustment_samples: Vec<f64>,
    adjustment_next: usize,
    resets: u64,
}

impl Vivaldi {
    /// A node at the origin with the maximum error.
    pub fn new(config: VivaldiConfig) -> Self {
        Vivaldi {
            coord: origin_for(&config),
            config,
            adjustment_samples: Vec::new(),
            adjustment_next: 0,
            resets: 0,
        }
    }

    /// The current coordinate (send this to peers).
    pub fn coordinate(&self) -> &Coordinate {
        &self.coord
    }

    /// The configuration.
    pub fn config(&self) -> &VivaldiConfig {
        &self.config
    }

    /// How often the coordinate became invalid and was reset to the origin.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// The coordinate is settled: its error is below [`SETTLED_ERROR`] (0.5).
    pub fn settled(&self) -> bool {
        self.coord.settled()
    }

    /// Predicted RTT from this node to `other`, µs.
    pub fn distance_us(&self, other: &Coordinate) -> f64 {
        self.coord.distance_us(other)
    }

    /// Move toward the position that explains `rtt_us` to a peer at `other`.
    ///
    /// Rejects (and leaves the state unchanged) a peer coordinate of the wrong length or with a
    /// non-finite field, and an RTT that is not finite, `<= 0` or above [`MAX_RTT_US`]. When both
    /// points coincide the push goes in a random direction drawn from `rng`. Should the result
    /// be invalid (huge but finite peer values can overflow) the coordinate is
    /// reset to the origin and [`resets`](Self::resets) counts it.
    pub fn update(
        &mut self,
        other: &Coordinate,
        rtt_us: f64,
        rng: &mut impl Rng,
    ) -> Result<(), VivaldiError> {
        if other.vec.len() != DIMENSIONS {
            return Err(VivaldiError::WrongDimensions {
                expected: DIMENSIONS,
                got: other.vec.len(),
            });
        }
        if !other.is_valid() {
            return Err(VivaldiError::InvalidCoordinate);
        }
        if !(rtt_us.is_finite() && rtt_us > 0.0 && rtt_us <= MAX_RTT_US) {
            return Err(VivaldiError::InvalidRtt(rtt_us));
        }
        // Our own coordinate can only be invalid if the config is absurd; start over then.
        if !self.coord.is_valid() {
            self.reset();
        }
        self.update_vivaldi(other, rtt_us, rng);
        self.update_adjustment(other, rtt_us);
        self.update_gravity(rng);
        if !self.coord.is_valid() {
            self.reset();
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.coord = origin_for(&self.config);
        self.adjustment_samples.clear();
        self.adjustment_next = 0;
        self.resets = self.resets.saturating_add(1);
    }

    fn error_max(&self) -> f64 {
        let e = self.config.error_max;
        if e.is_finite() && e > 0.0 {
            e
        } else {
            1.5
        }
    }

    fn update_vivaldi(&mut self, other: &Coordinate, rtt_us: f64, rng: &mut impl Rng) {
        let rtt = rtt_us.max(ZERO_THRESHOLD);
        let dist = self.coord.distance_us(other);
        let wrongness = (dist - rtt).abs() / rtt;
        let error_max = self.error_max();
        let own_error = self.coord.error.clamp(0.0, error_max);
        let other_error = other.error.clamp(0.0, error_max);
        let total_error = (own_error + other_error).max(1e-6);
        let weight = own_error / total_error;
        let ce = finite_unit(self.config.ce);
        let error = ce * weight * wrongness + own_error * (1.0 - ce * weight);
        self.coord.error = error.clamp(0.0, error_max);
        let force = finite_unit(self.config.cc) * weight * (rtt - dist);
        self.apply_force(force, other, rng);
    }

    /// Push this coordinate `force` µs away from `other` (toward it when negative).
    fn apply_force(&mut self, force: f64, other: &Coordinate, rng: &mut impl Rng) {
        let (unit, mag) = unit_vector_at(&self.coord.vec, &other.vec, rng);
        for (x, u) in self.coord.vec.iter_mut().zip(&unit) {
            *x += u * force;
        }
        let height_min = self.height_min();
        if mag > ZERO_THRESHOLD {
            let h = self.coord.height;
            self.coord.height = (h + other.height.max(0.0)) * force / mag + h;
        }
        self.coord.height = self.coord.height.max(height_min);
    }

    fn height_min(&self) -> f64 {
        let h = self.config.height_min_us;
        if h.is_finite() && h >= 0.0 {
            h
        } else {
            10.0
        }
    }

    fn update_adjustment(&mut self, other: &Coordinate, rtt_us: f64) {
        let window = self.config.adjustment_window;
        if window == 0 {
            self.coord.adjustment = 0.0;
            return;
        }
        let sample = rtt_us - self.coord.raw_distance_us(other);
        if !sample.is_finite() {
            return;
        }
        if self.adjustment_samples.len() < window {
            self.adjustment_samples.push(sample);
        } else {
            let i = self.adjustment_next % window;
            self.adjustment_samples[i] = sample;
        }
        self.adjustment_next = (self.adjustment_next + 1) % window;
        let sum: f64 = self.adjustment_samples.iter().sum();
        // Serf divides by twice the window: both ends add their adjustment to a distance.
        self.coord.adjustment = sum / (2.0 * window as f64);
    }

    fn update_gravity(&mut self, rng: &mut impl Rng) {
        let rho = self.config.gravity_rho_us;
        if !(rho.is_finite() && rho > 0.0) {
            return;
        }
        let origin = origin_for(&self.config);
        let dist = origin.distance_us(&self.coord);
        let force = -(dist / rho).powi(2);
        if force.is_finite() {
            self.apply_force(force, &origin, rng);
        }
    }
}

impl Default for Vivaldi {
    fn default() -> Self {
        Vivaldi::new(VivaldiConfig::default())
    }
}

fn origin_for(config: &VivaldiConfig) -> Coordinate {
    let height = if config.height_min_us.is_finite() && config.height_min_us >= 0.0 {
        config.height_min_us
    } else {
        10.0
    };
    let error = if config.error_max.is_finite() && config.error_max > 0.0 {
        config.error_max
    } else {
        1.5
    };
    Coordinate {
        vec: vec![0.0; DIMENSIONS],
        height,
        error,
        adjustment: 0.0,
    }
}

/// A factor clamped to `[0, 1]` (NaN → 0).
fn finite_unit(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}

/// Unit vector pointing from `b` to `a` and the distance between them; a random direction
/// when they (nearly) coincide, with distance 0.
fn unit_vector_at(a: &[f64], b: &[f64], rng: &mut impl Rng) -> (Vec<f64>, f64) {
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mag = diff.iter().map(|x| x * x).sum::<f64>().sqrt();
    if mag.is_finite() && mag > ZERO_THRESHOLD {
        return (diff.into_iter().map(|x| x / mag).collect(), mag);
    }
    for _ in 0..8 {
        let r: Vec<f64> = (0..a.len()).map(|_| rng.gen::<f64>() - 0.5).collect();
        let m = r.iter().map(|x| x * x).sum::<f64>().sqrt();
        if m > 1e-9 {
            return (r.into_iter().map(|x| x / m).collect(), 0.0);
        }
    }
    let mut e = vec![0.0; a.len()];
    if let Some(first) = e.first_mut() {
        *first = 1.0;
    }
    (e, 0.0)
}

/// A per-peer median filter over the last few RTT samples (Serf's latency filter), bounded in
/// the number of peers it remembers (the least recently updated peer is forgotten first).
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyFilter {
    size: usize,
    max_peers: usize,
    seq: u64,
    peers: BTreeMap<String, (u64, VecDeque<f64>)>,
}

impl LatencyFilter {
    /// A filter keeping `size` samples (at least 1) for up to `max_peers` peers (at least 1).
    pub fn new(size: usize, max_peers: usize) -> Self {
        LatencyFilter {
            size: size.max(1),
            max_peers: max_peers.max(1),
            seq: 0,
            peers: BTreeMap::new(),
        }
    }

    /// Record a sample for `peer` and return the median of its recent samples; `None` (and
    /// nothing recorded) for a sample that is not finite or not positive.
    pub fn push(&mut self, peer: &str, rtt_us: f64) -> Option<f64> {
        if !(rtt_us.is_finite() && rtt_us > 0.0) {
            return None;
        }
        self.seq = self.seq.saturating_add(1);
        if !self.peers.contains_key(peer) && self.peers.len() >= self.max_peers {
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(_, (seq, _))| *seq)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.peers.remove(&k);
            }
        }
        let entry = self
            .peers
            .entry(peer.to_owned())
            .or_insert_with(|| (0, VecDeque::new()));
        entry.0 = self.seq;
        entry.1.push_back(rtt_us);
        while entry.1.len() > self.size {
            entry.1.pop_front();
        }
        let mut sorted: Vec<f64> = entry.1.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied()
    }

    /// Forget a peer (it left).
    pub fn forget(&mut self, peer: &str) {
        self.peers.remove(peer);
    }

    /// Peers remembered.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// No peer remembered.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

impl Default for LatencyFilter {
    fn default() -> Self {
        LatencyFilter::new(VivaldiConfig::default().latency_filter_size, 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// Run `rounds` rounds where every node samples one random peer; return the nodes.
    fn simulate(rtt: &[Vec<f64>], rounds: usize, seed: u64) -> Vec<Vivaldi> {
        let n = rtt.len();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut nodes: Vec<Vivaldi> = (0..n).map(|_| Vivaldi::default()).collect();
        for _ in 0..rounds {
            for i in 0..n {
                let mut j = rng.gen_range(0..n - 1);
                if j >= i {
                    j += 1;
                }
                let peer = nodes[j].coordinate().clone();
                nodes[i].update(&peer, rtt[i][j], &mut rng).unwrap();
            }
        }
        nodes
    }

    fn median_relative_error(nodes: &[Vivaldi], rtt: &[Vec<f64>]) -> f64 {
        let mut errs = Vec::new();
        for i in 0..nodes.len() {
            for j in 0..nodes.len() {
                if i != j {
                    let p = nodes[i].distance_us(nodes[j].coordinate());
                    errs.push((p - rtt[i][j]).abs() / rtt[i][j]);
                }
            }
        }
        errs.sort_by(f64::total_cmp);
        errs[errs.len() / 2]
    }

    #[test]
    fn hub_topology_converges() {
        // A star: every path crosses the hub, rtt(i, j) = d_i + d_j, d in 1..50 ms.
        let mut rng = StdRng::seed_from_u64(1);
        let d: Vec<f64> = (0..10).map(|_| rng.gen_range(1_000.0..50_000.0)).collect();
        let rtt: Vec<Vec<f64>> = (0..10)
            .map(|i| (0..10).map(|j| d[i] + d[j]).collect())
            .collect();
        for seed in 0..5 {
            let nodes = simulate(&rtt, 300, seed);
            let med = median_relative_error(&nodes, &rtt);
            assert!(med < 0.15, "seed {seed}: median relative error {med}");
            assert!(nodes.iter().all(|n| n.coordinate().is_valid()));
            assert!(nodes.iter().filter(|n| n.settled()).count() >= 8);
        }
    }

    #[test]
    fn geometric_topology_with_access_links_converges() {
        // Points on a 2-D map (up to 40 ms apart) plus a 1..5 ms access link at each end.
        let mut rng = StdRng::seed_from_u64(3);
        let pts: Vec<(f64, f64, f64)> = (0..10)
            .map(|_| {
                (
                    rng.gen_range(0.0..30_000.0),
                    rng.gen_range(0.0..30_000.0),
                    rng.gen_range(1_000.0..5_000.0),
                )
            })
            .collect();
        let rtt: Vec<Vec<f64>> = pts
            .iter()
            .map(|a| {
                pts.iter()
                    .map(|b| ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt() + a.2 + b.2)
                    .collect()
            })
            .collect();
        for seed in 0..5 {
            let nodes = simulate(&rtt, 500, seed);
            let med = median_relative_error(&nodes, &rtt);
            assert!(med < 0.15, "seed {seed}: median relative error {med}");
        }
    }

    #[test]
    fn invalid_inputs_are_rejected_and_leave_state_unchanged() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut v = Vivaldi::default();
        let peer = Coordinate::origin();
        v.update(&peer, 10_000.0, &mut rng).unwrap();
        let before = v.clone();

        let mut nan = peer.clone();
        nan.vec[3] = f64::NAN;
        assert_eq!(
            v.update(&nan, 1_000.0, &mut rng),
            Err(VivaldiError::InvalidCoordinate)
        );
        let mut inf = peer.clone();
        inf.height = f64::INFINITY;
        assert_eq!(
            v.update(&inf, 1_000.0, &mut rng),
            Err(VivaldiError::InvalidCoordinate)
        );
        let mut short = peer.clone();
        short.vec.pop();
        assert_eq!(
            v.update(&short, 1_000.0, &mut rng),
            Err(VivaldiError::WrongDimensions {
                expected: DIMENSIONS,
                got: DIMENSIONS - 1
            })
        );
        for rtt in [0.0, -1.0, f64::NAN, f64::INFINITY, MAX_RTT_US * 1.01] {
            let e = v.update(&peer, rtt, &mut rng).unwrap_err();
            assert!(matches!(e, VivaldiError::InvalidRtt(_)));
            assert!(!e.to_string().is_empty());
        }
        assert_eq!(v, before);
    }

    #[test]
    fn coinciding_points_separate_in_a_random_direction() {
        let mut rng = StdRng::seed_from_u64(6);
        let mut v = Vivaldi::default();
        v.update(&Coordinate::origin(), 20_000.0, &mut rng).unwrap();
        let c = v.coordinate();
        assert!(c.vec.iter().any(|x| *x != 0.0));
        assert!(v.distance_us(&Coordinate::origin()) > 1_000.0);
    }

    #[test]
    fn extreme_values_stay_finite() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut v = Vivaldi::default();
        let mut far = Coordinate::origin();
        far.vec = vec![1e300; DIMENSIONS];
        far.height = 1e300;
        far.error = -5.0;
        far.adjustment = -1e300;
        for rtt in [1e-300, 1.0, MAX_RTT_US, 0.5] {
            v.update(&far, rtt, &mut rng).unwrap();
            assert!(v.coordinate().is_valid());
            assert!(v.distance_us(&far).is_finite());
        }
        let mut big = Coordinate::origin();
        big.vec = vec![f64::MAX; DIMENSIONS];
        big.height = f64::MAX;
        big.error = f64::MAX;
        big.adjustment = f64::MAX;
        v.update(&big, MAX_RTT_US, &mut rng).unwrap();
        assert!(v.coordinate().is_valid());
        let d = big.distance_us(&Coordinate::origin());
        assert!(d.is_finite() && d >= 0.0);
        let mut nan = Coordinate::origin();
        nan.vec[0] = f64::NAN;
        let d = nan.distance_us(&Coordinate::origin());
        assert!(!d.is_nan() && d >= 0.0);
        let mut neg = Coordinate::origin();
        neg.height = -1e9;
        assert_eq!(neg.distance_us(&Coordinate::origin()), 0.0);
    }

    #[test]
    fn distance_uses_adjustment_unless_it_goes_negative() {
        let mut a = Coordinate::origin();
        a.vec[0] = 3_000.0;
        let mut b = Coordinate::origin();
        b.vec[1] = 4_000.0;
        assert_eq!(a.raw_distance_us(&b), 5_020.0);
        a.adjustment = 100.0;
        assert_eq!(a.distance_us(&b), 5_120.0);
        b.adjustment = -10_000.0;
        assert_eq!(a.distance_us(&b), 5_020.0);
        assert!(!a.settled(), "a new coordinate is not settled");
        a.error = 0.2;
        assert!(a.settled());
    }

    #[test]
    fn coordinate_round_trips_over_bincode() {
        let mut c = Coordinate::origin();
        c.vec[2] = 1.5;
        c.adjustment = -3.0;
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&c, cfg).unwrap();
        let (back, _): (Coordinate, usize) =
            bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn latency_filter_takes_the_median_and_is_bounded() {
        let mut f = LatencyFilter::new(3, 2);
        assert_eq!(f.push("a", 10.0), Some(10.0));
        assert_eq!(f.push("a", 1_000.0), Some(1_000.0));
        assert_eq!(f.push("a", 12.0), Some(12.0));
        assert_eq!(
            f.push("a", 11.0),
            Some(12.0),
            "the 10 fell out of the window"
        );
        assert_eq!(f.push("a", f64::NAN), None);
        f.push("b", 5.0);
        f.push("c", 5.0);
        assert_eq!(
            f.len(),
            2,
            "the least recently updated peer (a) was forgotten"
        );
        assert_eq!(f.push("a", 7.0), Some(7.0));
        f.forget("a");
        assert_eq!(f.len(), 1);
    }

    /// A coordinator at a hub and three nodes on access links of 2, 15 and 40 ms one way, on
    /// the nodes' real schedule (heartbeats each second, peer probes every 250 ms while
    /// unsettled); seconds until each of the four settles, within `secs`. `asymmetric`: a probe
    /// from A to B measures only B's link (a delay in front of B's address but not A's), so A
    /// and B disagree about the same pair.
    fn star(seed: u64, asymmetric: bool, secs: u32) -> ([Option<f64>; 4], Vec<Vivaldi>) {
        use rand::seq::SliceRandom;
        let mut rng = StdRng::seed_from_u64(seed);
        let d = [0.0, 2_000.0, 15_000.0, 40_000.0];
        let rtt = |a: usize, b: usize| 2.0 * (d[a] + d[b]);
        let mut v: Vec<Vivaldi> = (0..4)
            .map(|_| Vivaldi::new(VivaldiConfig::default()))
            .collect();
        let mut settled = [None; 4];
        for tick in 1..=secs * 4 {
            let now = tick as f64 / 4.0;
            if tick % 4 == 0 {
                for i in 1..4 {
                    let (hub, node) = (v[0].coordinate().clone(), v[i].coordinate().clone());
                    v[0].update(&node, rtt(0, i), &mut rng).unwrap();
                    v[i].update(&hub, rtt(0, i), &mut rng).unwrap();
                }
            }
            for i in 1..4 {
                if v[i].settled() && tick % 4 != 0 {
                    continue;
                }
                let mut peers: Vec<usize> = (1..4).filter(|&j| j != i).collect();
                peers.shuffle(&mut rng);
                for j in peers {
                    let sample = if asymmetric { 2.0 * d[j] } else { rtt(i, j) };
                    let c = v[j].coordinate().clone();
                    v[i].update(&c, sample, &mut rng).unwrap();
                }
            }
            for (at, node) in settled.iter_mut().zip(&v) {
                if at.is_none() && node.settled() {
                    *at = Some(now);
                }
            }
        }
        (settled, v)
    }

    #[test]
    fn a_star_of_sites_settles_and_asymmetric_paths_never_do() {
        for seed in 0..5 {
            let (settled, v) = star(seed, false, 30);
            assert!(
                settled.iter().all(|s| s.is_some_and(|s| s <= 20.0)),
                "seed {seed}: settled at {settled:?}"
            );
            // The coordinator's estimates to the nodes follow the true 4, 30 and 80 ms.
            let est: Vec<f64> = (1..4)
                .map(|i| v[0].distance_us(v[i].coordinate()))
                .collect();
            assert!(est[0] < est[1] && est[1] < est[2], "seed {seed}: {est:?}");
            // One way only: no embedding fits, the errors stay high and nothing settles,
            // which is why a fresh caller is ranked on the coordinator's measurements.
            let (settled, v) = star(seed, true, 60);
            assert_eq!(settled, [None; 4], "seed {seed}");
            assert!(v.iter().all(|n| n.coordinate().error > 1.0), "seed {seed}");
        }
    }
}
