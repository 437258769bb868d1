//! skein-peer: the Skein peer layer, a libp2p swarm beside a node's (and a caller's) quinn
//! endpoint, for nodes that no caller can reach directly (behind NAT, no port forwarding).
//!
//! Entry point: [`Peer::start`] with a key ([`key::load_or_create`]) and a [`PeerConfig`];
//! [`Peer::open`] opens an `/skein/infer/1` stream to a node, which carries exactly the frames
//! of `skein/infer` ([`codec`], the very [`skein_proto::frame`] codec of the QUIC path).
//!
//! # Layout
//! - [`key`]: the node's libp2p key beside its node key.
//! - [`binding`]: the proof binding that key's [`PeerId`] to the node id, checked by the coordinator.
//! - [`codec`]: `skein/infer` frames on a libp2p stream, bounded like the QUIC path's.
//! - [`streams`]: the one request-stream behaviour: streams of any of its protocols opened on
//!   the connection the caller picks, inbound ones to one bounded channel per protocol.
//! - [`infer`]: `/skein/infer/1` (inference, the `skein/infer` frames).
//! - [`artifact`]: `/skein/artifact/1` (artifact chunks between mesh nodes; issue 20).
//! - `swarm`: the actor owning the swarm: QUIC (TCP + noise + yamux where UDP is blocked),
//!   identify, AutoNAT, relay client (and server when [`PeerConfig::relay_server`] is set),
//!   DCUtR hole punching, ping; and the [`Peer`] handle.
//!
//! Every queue is bounded: the command inbox, inbound streams, opens waiting for a dial, the
//! relay's reservations and circuits ([`RelayLimits`]).
//!
//! libp2p is pinned to 0.56: 0.57 pulls in aws-lc-sys and forces a wasm-bindgen downgrade in
//! this workspace.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod artifact;
mod autonat_probe;
pub mod binding;
pub mod codec;
pub mod infer;
pub mod key;
pub mod streams;
mod swarm;

pub use libp2p::identity::Keypair;
pub use libp2p::{multiaddr, Multiaddr, PeerId, Stream};
pub use swarm::Peer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The identify protocol version Skein peers announce.
pub const IDENTIFY_PROTOCOL: &str = "/skein/1";

/// The way a call reached its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// A connection to an address the node listens on.
    Direct,
    /// A direct connection made by hole punching (DCUtR) out of a relayed one.
    HolePunched,
    /// A circuit through a relay.
    Relayed,
}

impl Path {
    /// The name used in metrics and logs: `direct`, `hole-punched`, `relayed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::HolePunched => "hole-punched",
            Path::Relayed => "relayed",
        }
    }

    /// Lower is preferred.
    fn rank(self) -> u8 {
        match self {
            Path::Direct | Path::HolePunched => 0,
            Path::Relayed => 1,
        }
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether others can dial this peer, as AutoNAT found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reachability {
    /// Not known yet.
    #[default]
    Unknown,
    /// Dialable at an address it listens on.
    Public,
    /// Behind NAT or a firewall: reachable through a relay only (until a hole punch).
    Nat,
}

impl Reachability {
    /// `unknown`, `public`, `nat`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reachability::Unknown => "unknown",
            Reachability::Public => "public",
            Reachability::Nat => "nat",
        }
    }
}

impl std::fmt::Display for Reachability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a peer knows about itself now.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    /// Its id.
    pub peer_id: PeerId,
    /// Addresses it listens on.
    pub listen: Vec<Multiaddr>,
    /// Addresses others saw it at (identify), confirmed ones included (bounded).
    pub observed: Vec<Multiaddr>,
    /// AutoNAT's verdict.
    pub reachability: Reachability,
    /// Its circuit addresses on the relays where it holds a reservation.
    pub relayed: Vec<Multiaddr>,
}

impl Default for PeerStatus {
    fn default() -> Self {
        PeerStatus {
            peer_id: PeerId::random(),
            listen: Vec::new(),
            observed: Vec::new(),
            reachability: Reachability::Unknown,
            relayed: Vec::new(),
        }
    }
}

/// Counters of a peer, for `/metrics`.
#[derive(Debug, Default)]
pub struct PeerMetrics {
    /// Streams opened on a direct connection.
    pub opened_direct: AtomicU64,
    /// Streams opened on a hole-punched connection.
    pub opened_hole_punched: AtomicU64,
    /// Streams opened through a relay.
    pub opened_relayed: AtomicU64,
    /// Hole punches that made a direct connection: the first direct connection to a peer
    /// reached through a relay, whichever side's DCUtR dial made it.
    pub hole_punch_successes: AtomicU64,
    /// DCUtR dials that failed while no hole-punched connection to the peer was up (DCUtR
    /// tries up to three times; the connection stays relayed).
    pub hole_punch_failures: AtomicU64,
    /// Relay reservations accepted (renewals excluded): one per relay while a reservation
    /// holds; more mean reservations were lost and made again.
    pub relay_reservations: AtomicU64,
    /// Relay reservations lost (their circuit listener closed); each is made again at the
    /// next retry.
    pub relay_reservations_lost: AtomicU64,
}

impl PeerMetrics {
    fn count_open(&self, path: Path) {
        let c = match path {
            Path::Direct => &self.opened_direct,
            Path::HolePunched => &self.opened_hole_punched,
            Path::Relayed => &self.opened_relayed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Hole punches tried (successes and failures).
    pub fn hole_punch_attempts(&self) -> u64 {
        self.hole_punch_successes.load(Ordering::Relaxed)
            + self.hole_punch_failures.load(Ordering::Relaxed)
    }
}

/// How a peer runs. Defaults are documented per field.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Addresses to listen on (default: QUIC on `/ip4/0.0.0.0/udp/0/quic-v1` and the TCP
    /// fallback on `/ip4/0.0.0.0/tcp/0`).
    pub listen: Vec<Multiaddr>,
    /// Addresses known to be reachable from outside, announced as such (default none; a relay
    /// on a public address sets its own).
    pub external: Vec<Multiaddr>,
    /// Relays to hold a reservation on, each `.../p2p/RELAY_ID` (default none).
    pub relays: Vec<Multiaddr>,
    /// How often a lost relay reservation is retried (default 2 s).
    pub relay_retry: Duration,
    /// Serve as a circuit relay v2, with these limits (default off).
    pub relay_server: Option<RelayLimits>,
    /// A connection with no stream open is closed after this (default 60 s; pings keep NAT
    /// mappings open meanwhile).
    pub idle_timeout: Duration,
    /// Inbound `/skein/infer/1` streams waiting to be served; more are reset (default 64).
    pub max_inbound_streams: usize,
    /// Inbound `/skein/artifact/1` streams waiting to be served, apart from the inference
    /// ones; more are reset (default 8).
    pub max_inbound_artifact_streams: usize,
    /// AutoNAT probing.
    pub autonat: AutonatConfig,
    /// The congestion controller (and so the pacing) of QUIC connections (default quinn's:
    /// CUBIC, RFC 9002's initial window, every window paced over a round trip). Nodes and
    /// the SDK pass their mesh transport profile's (`skein_net::TransportProfile`), so a
    /// request leaves as fast on a hole-punched or relayed path as on the direct one.
    pub congestion: Option<Congestion>,
    /// UDP receive and send buffer asked for each QUIC socket, bytes (default 4 MiB, as the
    /// mesh's own endpoints: `skein_net::endpoint::SOCKET_BUFFER`; the kernel caps it at
    /// `net.core.rmem_max`). Linux's 208 KiB default drops part of a burst of concurrent
    /// requests; `None` leaves the system's default.
    pub udp_socket_buffer: Option<usize>,
}

/// A quinn congestion controller factory ([`PeerConfig::congestion`]).
#[derive(Clone)]
pub struct Congestion(pub std::sync::Arc<dyn quinn::congestion::ControllerFactory + Send + Sync>);

impl std::fmt::Debug for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Congestion(..)")
    }
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            listen: vec![
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
                "/ip4/0.0.0.0/tcp/0"
                    .parse()
                    .unwrap_or_else(|_| Multiaddr::empty()),
            ],
            external: Vec::new(),
            relays: Vec::new(),
            relay_retry: Duration::from_secs(2),
            relay_server: None,
            idle_timeout: Duration::from_secs(60),
            max_inbound_streams: 64,
            max_inbound_artifact_streams: 8,
            autonat: AutonatConfig::default(),
            congestion: None,
            udp_socket_buffer: Some(4 << 20),
        }
    }
}

/// AutoNAT probing settings.
#[derive(Debug, Clone)]
pub struct AutonatConfig {
    /// Delay before the first probe (default 2 s).
    pub boot_delay: Duration,
    /// Interval between probes once the verdict is known (default 60 s).
    pub refresh_interval: Duration,
    /// Interval between probes while it is not, or when a probe found no server (default 5 s).
    pub retry_interval: Duration,
    /// Probe and answer for global addresses only (default false: Skein meshes are often
    /// private networks).
    pub only_global_ips: bool,
}

impl Default for AutonatConfig {
    fn default() -> Self {
        AutonatConfig {
            boot_delay: Duration::from_secs(2),
            refresh_interval: Duration::from_secs(60),
            retry_interval: Duration::from_secs(5),
            only_global_ips: false,
        }
    }
}

/// The limits of a circuit relay v2 server: every reservation and circuit is bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayLimits {
    /// Reservations held at once (default 128).
    pub max_reservations: usize,
    /// Reservations one peer may hold (default 4).
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before its holder renews it (default 1 h).
    pub reservation_duration: Duration,
    /// Circuits open at once (default 64).
    pub max_circuits: usize,
    /// Circuits one peer may have open (default 8).
    pub max_circuits_per_peer: usize,
    /// A circuit is closed after this long (default 2 min); by then calls have usually moved
    /// to a hole-punched connection.
    pub max_circuit_duration: Duration,
    /// A circuit is closed after relaying this many bytes each way (default 64 MiB).
    pub max_circuit_bytes: u64,
    /// Reservations one peer may make (default 30, then one per 2 min); `None`: no limit.
    pub reservation_rate_per_peer: Option<Rate>,
    /// Reservations one IP address may make (default 60, then one per min); `None`: no limit.
    pub reservation_rate_per_ip: Option<Rate>,
    /// Circuits one caller may open (default 30, then one per 2 min); `None`: no limit.
    pub circuit_rate_per_peer: Option<Rate>,
    /// Circuits callers from one IP address may open (default 60, then one per min); `None`:
    /// no limit.
    pub circuit_rate_per_ip: Option<Rate>,
}

/// A rate limit as a token bucket: `burst` at once, then one more every `every` (libp2p's
/// relay rate limiters; the defaults are libp2p's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// What may be used at once (at least 1).
    pub burst: std::num::NonZeroU32,
    /// How often one more is allowed.
    pub every: Duration,
}

impl Rate {
    /// `burst` at once, then one per `every`; `None` when `burst` is 0 (no limit).
    pub fn new(burst: u32, every: Duration) -> Option<Rate> {
        std::num::NonZeroU32::new(burst).map(|burst| Rate { burst, every })
    }
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_reservations: 128,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(3600),
            max_circuits: 64,
            max_circuits_per_peer: 8,
            max_circuit_duration: Duration::from_secs(120),
            max_circuit_bytes: 64 << 20,
            reservation_rate_per_peer: Rate::new(30, Duration::from_secs(120)),
            reservation_rate_per_ip: Rate::new(60, Duration::from_secs(60)),
            circuit_rate_per_peer: Rate::new(30, Duration::from_secs(120)),
            circuit_rate_per_ip: Rate::new(60, Duration::from_secs(60)),
        }
    }
}

impl RelayLimits {
    fn to_libp2p(&self) -> libp2p::relay::Config {
        let mut c = libp2p::relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: self.reservation_duration,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            reservation_rate_limiters: Vec::new(),
            circuit_src_rate_limiters: Vec::new(),
        };
        if let Some(r) = self.reservation_rate_per_peer {
            c = c.reservation_rate_per_peer(r.burst, r.every);
        }
        if let Some(r) = self.reservation_rate_per_ip {
            c = c.reservation_rate_per_ip(r.burst, r.every);
        }
        if let Some(r) = self.circuit_rate_per_peer {
            c = c.circuit_src_per_peer(r.burst, r.every);
        }
        if let Some(r) = self.circuit_rate_per_ip {
            c = c.circuit_src_per_ip(r.burst, r.every);
        }
        c
    }
}

/// Errors of the peer layer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The swarm could not be built.
    #[error("peer layer setup: {0}")]
    Setup(String),
    /// An address could not be listened on.
    #[error("cannot listen on {0}: {1}")]
    Listen(Multiaddr, String),
    /// The peer could not be reached.
    #[error("cannot reach peer {0}: {1}")]
    Dial(PeerId, String),
    /// The peer at the address is not the one named: it holds another key.
    #[error(
        "refused: the peer at {address} is {obtained}, not {expected} as the coordinator named it"
    )]
    WrongPeer {
        /// The PeerId the caller was told.
        expected: PeerId,
        /// The one the remote proved.
        obtained: PeerId,
        /// Where.
        address: Multiaddr,
    },
    /// The stream could not be opened on the connection.
    #[error("opening a stream: {0}")]
    Open(String),
    /// Too many opens wait for dials.
    #[error("too many calls waiting for connections")]
    Busy,
    /// The operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The peer layer was stopped.
    #[error("the peer layer stopped")]
    Stopped,
}

impl From<infer::OpenError> for PeerError {
    fn from(e: infer::OpenError) -> Self {
        PeerError::Open(e.to_string())
    }
}
