//! The transport profile of mesh connections: initial congestion window, congestion
//! controller, pacing.
//!
//! quinn's defaults suit the open Internet: an initial window of about 14.7 KB (RFC 9002) and a
//! pacer that spreads every window over a round trip. On a mesh link that costs a 110 KB
//! request four flights of slow start on a fresh connection and about one round trip to leave
//! on a warm one. A [`TransportProfile`] sizes the first flight for typical requests and, with
//! [`Pacing::Window`], lets a request that fits the window leave at once.
//!
//! [`Pacing::Window`] is a thin [`Controller`] wrapper ([`WindowPacing`]): while the bytes in
//! flight plus a margin fit the inner controller's window, it reports a window quinn's pacer
//! treats as "do not pace" (above `u32::MAX`); once the window is nearly full it reports the
//! inner window again, so the congestion limit itself is never lifted. Its estimate of the
//! bytes in flight only errs high (re-synchronised from quinn's own count on every ACK), so it
//! never lets more than the inner window out.

// quinn's `Controller` trait takes `std::time::Instant`.
#![allow(clippy::disallowed_types)]

use quinn::congestion::{Controller, ControllerFactory};
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

/// Smallest initial window accepted: quinn's own default (RFC 9002: ten 1472-byte datagrams).
pub const MIN_INITIAL_WINDOW: u64 = 14_720;
/// Largest initial window accepted (a burst this size into a shallow buffer is a loss).
pub const MAX_INITIAL_WINDOW: u64 = 16 << 20;

/// A congestion controller quinn offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Congestion {
    /// RFC 9002's NewReno.
    NewReno,
    /// CUBIC (RFC 9438), quinn's default.
    #[default]
    Cubic,
    /// BBR (quinn's experimental BBRv1).
    Bbr,
}

/// How the sender spreads what the congestion window allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pacing {
    /// Anything that fits the congestion window leaves at once; quinn's pacer applies only
    /// once the window is nearly full (TCP without pacing behaves the same way).
    #[default]
    Window,
    /// quinn's pacer: every window spread over one round trip (gentler on shallow buffers; a
    /// request as large as the window takes about a round trip to leave).
    Rtt,
}

impl std::str::FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "new_reno" | "newreno" | "new-reno" => Ok(Congestion::NewReno),
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            _ => Err(format!(
                "unknown congestion controller `{s}` (new_reno, cubic, bbr)"
            )),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Congestion::NewReno => "new_reno",
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
        })
    }
}

impl std::str::FromStr for Pacing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "window" => Ok(Pacing::Window),
            "rtt" => Ok(Pacing::Rtt),
            _ => Err(format!("unknown pacing `{s}` (window, rtt)")),
        }
    }
}

impl std::fmt::Display for Pacing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pacing::Window => "window",
            Pacing::Rtt => "rtt",
        })
    }
}

/// Transport settings of mesh connections (`skein/infer`, `skein/ctl`, artifact fetches).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransportProfile {
    /// Congestion window of a fresh connection, bytes (default 192 KiB, bounded to
    /// [`MIN_INITIAL_WINDOW`]..=[`MAX_INITIAL_WINDOW`]). Large enough for a typical request
    /// (110 KB plus QUIC's overhead, in 1200-byte datagrams before MTU discovery) to leave in
    /// the first flight, and the largest burst [`Pacing::Window`] sends unpaced. The
    /// trade-off: a new connection's first burst is that large, about 13 times RFC 9002's,
    /// which a shallow buffer on the path can drop (measured in docs/benchmarks.md).
    pub initial_window: u64,
    /// Congestion controller (default CUBIC).
    pub congestion: Congestion,
    /// Pacing (default [`Pacing::Window`]).
    pub pacing: Pacing,
}

impl Default for TransportProfile {
    fn default() -> Self {
        TransportProfile {
            initial_window: 192 << 10,
            congestion: Congestion::default(),
            pacing: Pacing::default(),
        }
    }
}

/// The profile quinn would use unchanged: RFC 9002's initial window, CUBIC, pacing over a
/// round trip (benchmarks compare against it).
impl TransportProfile {
    /// quinn's defaults.
    pub fn quinn_default() -> TransportProfile {
        TransportProfile {
            initial_window: MIN_INITIAL_WINDOW,
            congestion: Congestion::Cubic,
            pacing: Pacing::Rtt,
        }
    }

    /// The initial window, clamped to its bounds.
    pub fn bounded_initial_window(&self) -> u64 {
        self.initial_window
            .clamp(MIN_INITIAL_WINDOW, MAX_INITIAL_WINDOW)
    }

    /// The controller factory for this profile.
    pub fn controller(&self) -> Arc<dyn ControllerFactory + Send + Sync> {
        let w = self.bounded_initial_window();
        let inner: Arc<dyn ControllerFactory + Send + Sync> = match self.congestion {
            Congestion::NewReno => {
                let mut c = quinn::congestion::NewRenoConfig::default();
                c.initial_window(w);
                Arc::new(c)
            }
            Congestion::Cubic => {
                let mut c = quinn::congestion::CubicConfig::default();
                c.initial_window(w);
                Arc::new(c)
            }
            Congestion::Bbr => {
                let mut c = quinn::congestion::BbrConfig::default();
                c.initial_window(w);
                Arc::new(c)
            }
        };
        match self.pacing {
            Pacing::Rtt => inner,
            Pacing::Window => Arc::new(WindowPacingFactory { inner, burst: w }),
        }
    }

    /// The controller factory for connections that carry no 0-RTT data (the peer layer's
    /// libp2p QUIC connections): [`controller`](Self::controller), except that the loss of a
    /// packet sent before the connection's first acknowledgement arrived does not shrink the
    /// window ([`ProvenPath`]). Before that acknowledgement only handshake packets have left,
    /// and losing one says the path was not open yet (a hole punch's first packets reaching
    /// a NAT before its mapping exists), not that it is congested; counted as congestion, it
    /// left a hole-punched connection in CUBIC's slow regrowth for seconds (docs/benchmarks.md,
    /// "Nodes behind NAT").
    pub fn handshake_tolerant_controller(&self) -> Arc<dyn ControllerFactory + Send + Sync> {
        Arc::new(ProvenPathFactory {
            inner: self.controller(),
        })
    }

    /// Apply the profile to `t`.
    pub fn apply(&self, t: &mut quinn::TransportConfig) {
        t.congestion_controller_factory(self.controller());
    }
}

/// Builds [`ProvenPath`] controllers around another factory's.
struct ProvenPathFactory {
    inner: Arc<dyn ControllerFactory + Send + Sync>,
}

impl ControllerFactory for ProvenPathFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(ProvenPath {
            inner: self.inner.clone().build(now, current_mtu),
            first_ack: None,
        })
    }
}

/// Passes everything to the inner controller but the congestion events of packets sent before
/// the first acknowledgement arrived: the path was not proven open when they left.
pub struct ProvenPath {
    inner: Box<dyn Controller>,
    /// When the first acknowledgement arrived (`None` until then).
    first_ack: Option<Instant>,
}

impl ProvenPath {
    /// Whether a loss whose newest lost packet was sent at `sent` happened before the path
    /// was proven.
    fn unproven(&self, sent: Instant) -> bool {
        self.first_ack.is_none_or(|at| sent < at)
    }

    /// An acknowledgement arrived at `now`.
    fn acked(&mut self, now: Instant) {
        self.first_ack.get_or_insert(now);
    }
}

impl Controller for ProvenPath {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number)
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.acked(now);
        self.inner.on_ack(now, sent, bytes, app_limited, rtt)
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked)
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if self.unproven(sent) {
            tracing::debug!(
                lost_bytes,
                "a packet sent before the path was proven was lost: not counted as congestion"
            );
            return;
        }
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes)
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu)
    }

    fn window(&self) -> u64 {
        self.inner.window()
    }

    fn metrics(&self) -> quinn::congestion::ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(ProvenPath {
            inner: self.inner.clone_box(),
            first_ack: self.first_ack,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Builds [`WindowPacing`] controllers around another factory's.
struct WindowPacingFactory {
    inner: Arc<dyn ControllerFactory + Send + Sync>,
    burst: u64,
}

impl ControllerFactory for WindowPacingFactory {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(WindowPacing {
            inner: self.inner.clone().build(now, current_mtu),
            burst: self.burst,
            burst_left: self.burst,
            in_flight: 0,
            mtu: current_mtu,
        })
    }
}

/// A window above this makes quinn's pacer step aside (`Pacer::delay`).
const UNPACED: u64 = u32::MAX as u64 + 1;

/// Lifts quinn's pacer while what is in flight leaves room in the inner controller's window.
pub struct WindowPacing {
    inner: Box<dyn Controller>,
    /// Most bytes sent unpaced after the connection was idle (the initial window): a grown
    /// window still leaves in bursts no larger than the first flight, then at quinn's pace
    /// (window per RTT × 1.25) until everything sent has been acknowledged.
    burst: u64,
    /// What is left of the current burst; refilled when an ACK leaves nothing in flight.
    burst_left: u64,
    /// Bytes in flight, never below quinn's count: set from it on every ACK batch, raised by
    /// every transmission since (which counts ACK-only packets too, so it errs high).
    in_flight: u64,
    mtu: u16,
}

impl WindowPacing {
    /// Whether one more GSO segment (two datagrams' worth, the most quinn checks at once)
    /// still fits the inner window, and the burst is not spent.
    ///
    /// quinn sends MTU probes outside congestion control and without telling the controller
    /// (`on_sent`); one may be in flight uncounted until the next ACK, as it would be without
    /// this wrapper.
    fn has_room(&self) -> bool {
        let segment = 2 * u64::from(self.mtu);
        self.in_flight.saturating_add(segment) <= self.inner.window() && self.burst_left >= segment
    }
}

impl Controller for WindowPacing {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.in_flight = self.in_flight.saturating_add(bytes);
        self.burst_left = self.burst_left.saturating_sub(bytes);
        self.inner.on_sent(now, bytes, last_packet_number)
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt)
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.in_flight = in_flight;
        if in_flight == 0 {
            // Idle again: the next request may leave at once.
            self.burst_left = self.burst;
        }
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked)
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        // Lost bytes leave quinn's count too, but the next ACK batch says by how much; until
        // then the estimate stays high, which only paces sooner.
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes)
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
        self.inner.on_mtu_update(new_mtu)
    }

    fn window(&self) -> u64 {
        if self.has_room() {
            UNPACED
        } else {
            self.inner.window()
        }
    }

    fn metrics(&self) -> quinn::congestion::ControllerMetrics {
        self.inner.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(WindowPacing {
            inner: self.inner.clone_box(),
            burst: self.burst,
            burst_left: self.burst_left,
            in_flight: self.in_flight,
            mtu: self.mtu,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built(profile: &TransportProfile) -> Box<dyn Controller> {
        profile.controller().build(Instant::now(), 1200)
    }

    #[test]
    fn the_initial_window_is_applied_for_every_controller_and_bounded() {
        for congestion in [Congestion::NewReno, Congestion::Cubic, Congestion::Bbr] {
            for pacing in [Pacing::Window, Pacing::Rtt] {
                let p = TransportProfile {
                    initial_window: 200_000,
                    congestion,
                    pacing,
                };
                assert_eq!(built(&p).initial_window(), 200_000, "{congestion} {pacing}");
            }
        }
        let tiny = TransportProfile {
            initial_window: 1,
            ..TransportProfile::default()
        };
        assert_eq!(built(&tiny).initial_window(), MIN_INITIAL_WINDOW);
        let huge = TransportProfile {
            initial_window: u64::MAX,
            ..TransportProfile::default()
        };
        assert_eq!(built(&huge).initial_window(), MAX_INITIAL_WINDOW);
        assert_eq!(
            TransportProfile::default().bounded_initial_window(),
            192 << 10
        );
        // The baseline is quinn's own.
        let q = TransportProfile::quinn_default();
        assert_eq!(built(&q).initial_window(), MIN_INITIAL_WINDOW);
        assert_eq!(built(&q).window(), MIN_INITIAL_WINDOW);
    }

    #[test]
    fn window_pacing_lifts_the_pacer_only_while_the_window_has_room() {
        let p = TransportProfile {
            initial_window: 256 << 10,
            congestion: Congestion::Cubic,
            pacing: Pacing::Window,
        };
        let now = Instant::now();
        let mut c = built(&p);
        assert_eq!(c.window(), UNPACED, "an idle connection is not paced");
        // 200 KB out: two more datagrams still fit 256 KiB.
        c.on_sent(now, 200_000, 1);
        assert_eq!(c.window(), UNPACED);
        // Nearly full: the real window comes back, so quinn's congestion check holds.
        c.on_sent(now, 60_000, 2);
        assert_eq!(c.window(), 256 << 10);
        // An ACK batch that leaves bytes in flight does not start a new burst: what follows
        // a burst is paced until everything has been acknowledged.
        c.on_end_acks(now, 10_000, false, Some(2));
        assert_eq!(c.window(), 256 << 10);
        c.on_end_acks(now, 0, false, Some(2));
        assert_eq!(c.window(), UNPACED, "idle again: a new burst");
        // A larger MTU widens the margin.
        c.on_mtu_update(60_000);
        c.on_sent(now, 150_000, 3);
        assert_eq!(c.window(), 256 << 10);
        // A loss shrinks the inner window (CUBIC: × 0.7): 100 KB plus two 60 KB datagrams
        // still fit 256 KiB but no longer the shrunk window, which the wrapper then reports.
        c.on_end_acks(now, 0, false, Some(3));
        c.on_congestion_event(now, now, false, 1_200);
        c.on_sent(now, 100_000, 4);
        assert!(c.window() < 200_000, "window {}", c.window());
        // A small initial window is a small burst.
        let small = TransportProfile {
            initial_window: 64 << 10,
            ..p.clone()
        };
        let mut c2 = built(&small);
        c2.on_sent(now, 64_000, 1);
        assert_eq!(c2.window(), 64 << 10);
        // A clone keeps the state.
        assert_eq!(c.clone_box().window(), c.window());
    }

    #[test]
    fn losses_before_the_first_ack_do_not_shrink_the_window_of_a_handshake_tolerant_controller() {
        let p = TransportProfile {
            initial_window: 100_000,
            congestion: Congestion::NewReno,
            pacing: Pacing::Rtt,
        };
        let t0 = Instant::now();
        let later = |ms| t0 + std::time::Duration::from_millis(ms);
        let mut c = ProvenPath {
            inner: p.controller().build(t0, 1200),
            first_ack: None,
        };
        let mut plain = p.controller().build(t0, 1200);
        assert_eq!(
            p.handshake_tolerant_controller()
                .build(t0, 1200)
                .initial_window(),
            100_000
        );
        // The first Initial, lost at a NAT that had no mapping yet; found lost after the
        // handshake's first acknowledgement.
        // (quinn's controllers ignore packets sent at or before their own creation.)
        c.on_sent(later(1), 1_200, 0);
        c.on_congestion_event(later(3), later(1), false, 1_200);
        plain.on_sent(later(1), 1_200, 0);
        plain.on_congestion_event(later(3), later(1), false, 1_200);
        assert_eq!(
            c.window(),
            100_000,
            "a loss before any ack is not congestion"
        );
        assert!(plain.window() < 100_000, "the plain controller counts it");
        // The handshake's first acknowledgement (`on_ack` notes it).
        c.on_sent(later(2), 1_200, 1);
        c.acked(later(22));
        // Still forgiven: sent before the first acknowledgement, reported after it.
        c.on_congestion_event(later(23), later(1), false, 1_200);
        assert_eq!(c.window(), 100_000);
        // Sent after it: congestion, the window shrinks (NewReno: halved).
        c.on_sent(later(30), 1_200, 2);
        c.on_congestion_event(later(60), later(30), false, 1_200);
        assert!(c.window() < 100_000, "window {}", c.window());
        assert_eq!(c.clone_box().window(), c.window());
    }

    #[test]
    fn rtt_pacing_is_quinns_controller_unchanged() {
        let p = TransportProfile {
            pacing: Pacing::Rtt,
            ..TransportProfile::default()
        };
        assert_eq!(built(&p).window(), 192 << 10);
    }

    #[test]
    fn names_parse_and_print() {
        for c in [Congestion::NewReno, Congestion::Cubic, Congestion::Bbr] {
            assert_eq!(c.to_string().parse::<Congestion>(), Ok(c));
        }
        for p in [Pacing::Window, Pacing::Rtt] {
            assert_eq!(p.to_string().parse::<Pacing>(), Ok(p));
        }
        assert!("vegas".parse::<Congestion>().is_err());
        assert!("never".parse::<Pacing>().is_err());
        let toml: TransportProfile =
            serde_json::from_str(r#"{"initial_window": 131072, "congestion": "bbr"}"#).unwrap();
        assert_eq!(toml.initial_window, 131072);
        assert_eq!(toml.congestion, Congestion::Bbr);
        assert_eq!(toml.pacing, Pacing::Window);
    }
}
