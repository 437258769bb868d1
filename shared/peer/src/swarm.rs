//! The peer actor: one task owns the libp2p [`Swarm`]; a [`Peer`] handle talks to it through a
//! bounded command inbox.
//!
//! ```text
//!  Peer::open ──Command──▶ actor ──▶ Swarm (QUIC | TCP+noise+yamux | relay circuit)
//!                          │  identify, autonat, relay client (+ server), dcutr, ping
//!                          └─▶ streams::Behaviour ──/skein/infer/1 streams (bounded)──▶ the node
//!                                                └─/skein/artifact/1 streams (bounded)──▶ the node
//! ```
//!
//! The actor keeps, per connection, the [`Path`] it is: `direct` (dialled or accepted at a
//! plain address), `relayed` (a circuit through a relay) or `hole-punched` (the direct
//! connection DCUtR made out of a relayed one). [`Peer::open`] uses the best connection to
//! the peer (hole-punched or direct before relayed) and says which path it took.
//!
//! Dials are staged per peer ([`Dialing`]): QUIC addresses at once, TCP ones after
//! [`TCP_FALLBACK_AFTER`] (at once when every QUIC dial failed); a circuit only once its
//! relay is connected (dialled the same way) and identify has told this peer, on that
//! connection, the address the relay sees it at: DCUtR sends that address to the callee as
//! this peer's hole-punch candidate, and QUIC dials leave from the listening socket, so it is
//! the address a punch reaches.

use crate::streams::{self, Inbound, OpenError};
use crate::{Path, PeerConfig, PeerError, PeerMetrics, PeerStatus, Reachability};
use futures::channel::oneshot;
use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    behaviour::toggle::Toggle, ConnectionId, DialError, NetworkBehaviour, SwarmEvent,
};
use libp2p::{autonat, dcutr, identify, identity::Keypair, noise, ping, relay, tcp, yamux};
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol, Swarm};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Opens parked while their peer is being dialled, in all; more are refused (`busy`).
const MAX_PARKED: usize = 256;
/// Commands waiting for the actor.
const INBOX: usize = 64;
/// Observed addresses kept in the status.
const MAX_OBSERVED: usize = 8;

#[derive(NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
struct Behaviour {
    relay_client: relay::client::Behaviour,
    relay_server: Toggle<relay::Behaviour>,
    identify: identify::Behaviour,
    autonat: crate::autonat_probe::Autonat,
    dcutr: dcutr::Behaviour,
    ping: ping::Behaviour,
    streams: streams::Behaviour,
}

type StreamReply = oneshot::Receiver<Result<Stream, OpenError>>;
type OpenAnswer = oneshot::Sender<Result<(Path, StreamReply), PeerError>>;

enum Command {
    Open {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        protocol: StreamProtocol,
        reply: OpenAnswer,
    },
    Paths {
        peer: PeerId,
        reply: oneshot::Sender<Vec<Path>>,
    },
    AddRelay(Multiaddr),
}

/// Relays (distinct PeerIds) a peer holds reservations on, at most.
const MAX_RELAYS: usize = 4;
/// Addresses kept per relay, at most (QUIC and TCP, IPv4 and IPv6).
const MAX_ADDRS_PER_RELAY: usize = 4;

/// A running peer; dropping it does not stop it: call [`shutdown`](Self::shutdown).
pub struct Peer {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<PeerStatus>>,
    metrics: Arc<PeerMetrics>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// Inbound `/skein/artifact/1` streams, until taken.
    artifact_inbound: Mutex<Option<mpsc::Receiver<Inbound>>>,
}

impl Peer {
    /// Start a peer with `key` and `config`: listening (the addresses are bound when this
    /// returns), reserving on the configured relays, serving as a relay when configured.
    /// Inbound `/skein/infer/1` streams arrive on the returned receiver (bounded); inbound
    /// `/skein/artifact/1` ones on [`take_artifact_inbound`](Self::take_artifact_inbound)'s.
    pub async fn start(
        key: Keypair,
        config: PeerConfig,
    ) -> Result<(Peer, mpsc::Receiver<Inbound>), PeerError> {
        let peer_id = key.public().to_peer_id();
        let (inbound_tx, inbound_rx) = mpsc::channel(config.max_inbound_streams.max(1));
        let (artifact_tx, artifact_rx) = mpsc::channel(config.max_inbound_artifact_streams.max(1));
        let relay_limits = config.relay_server.clone();
        let serves_relay = relay_limits.is_some();
        let autonat_cfg = config.autonat.clone();
        let congestion = config.congestion.clone();
        let udp_buffer = config.udp_socket_buffer;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| PeerError::Setup(e.to_string()))?
            .with_quic_config(|c| {
                let c = match &congestion {
                    Some(factory) => c.congestion_controller_factory(factory.0.clone()),
                    None => c,
                };
                match udp_buffer {
                    Some(bytes) => c.socket_buffer_size(bytes),
                    None => c,
                }
            })
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| PeerError::Setup(e.to_string()))?
            .with_behaviour(|key, relay_client| {
                let local = key.public().to_peer_id();
                Behaviour {
                    relay_client,
                    relay_server: Toggle::from(
                        relay_limits.map(|l| relay::Behaviour::new(local, l.to_libp2p())),
                    ),
                    identify: identify::Behaviour::new(
                        identify::Config::new(crate::IDENTIFY_PROTOCOL.into(), key.public())
                            .with_agent_version(format!("skein/{}", env!("CARGO_PKG_VERSION"))),
                    ),
                    autonat: crate::autonat_probe::Autonat(autonat::Behaviour::new(
                        local,
                        autonat::Config {
                            boot_delay: autonat_cfg.boot_delay,
                            refresh_interval: autonat_cfg.refresh_interval,
                            retry_interval: autonat_cfg.retry_interval,
                            only_global_ips: autonat_cfg.only_global_ips,
                            throttle_server_period: Duration::ZERO,
                            // Probe through the relays only (added below), never through
                            // any peer this one happens to be connected to: a caller or a
                            // node answering a probe dials back from a fresh port, and those
                            // connections churned every retry interval.
                            use_connected: false,
                            // Only a relay answers probes (it is the one peers reserve on).
                            throttle_clients_global_max: if serves_relay { 30 } else { 0 },
                            ..Default::default()
                        },
                    )),
                    dcutr: dcutr::Behaviour::new(local),
                    ping: ping::Behaviour::new(ping::Config::new()),
                    streams: streams::Behaviour::new(vec![
                        (crate::infer::PROTOCOL, inbound_tx),
                        (crate::artifact::PROTOCOL, artifact_tx),
                    ]),
                }
            })
            .map_err(|e| PeerError::Setup(e.to_string()))?
            .with_swarm_config(|c| {
                // 0-RTT protocol negotiation: a stream's first bytes carry its protocol name
                // and, at once, its data (multistream-select `V1Lazy`; the wire format is
                // V1's). With plain V1 every call waited one round trip for the remote to
                // confirm `/skein/infer/1` before sending its request (measured: +20 ms on a
                // path of 10 ms each way). Every stream here proposes a single protocol.
                c.with_idle_connection_timeout(config.idle_timeout)
                    .with_substream_upgrade_protocol_override(
                        libp2p::core::upgrade::Version::V1Lazy,
                    )
            })
            .build();

        let mut listeners = HashSet::new();
        for addr in &config.listen {
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| PeerError::Listen(addr.clone(), e.to_string()))?;
            listeners.insert(id);
        }
        // A relay tells the peers reserving on it where it is reached (the reservation
        // carries its external addresses; a reservation without any is refused by the
        // client): its listen addresses, unless configured.
        let announce_listen = serves_relay && config.external.is_empty();
        for addr in &config.external {
            swarm.add_external_address(addr.clone());
        }
        let status = Arc::new(Mutex::new(PeerStatus {
            peer_id,
            ..PeerStatus::default()
        }));
        // Wait until every listener has bound (bounded in time).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listeners.is_empty() {
            let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
                .await
                .map_err(|_| PeerError::Setup("listeners did not bind within 10 s".into()))?;
            match event {
                SwarmEvent::NewListenAddr {
                    listener_id,
                    address,
                } => {
                    listeners.remove(&listener_id);
                    if announce_listen {
                        swarm.add_external_address(address.clone());
                    }
                    lock(&status).listen.push(address);
                }
                SwarmEvent::ListenerClosed {
                    listener_id,
                    reason: Err(e),
                    ..
                } if listeners.contains(&listener_id) => {
                    return Err(PeerError::Setup(format!("a listener failed: {e}")));
                }
                _ => {}
            }
        }
        let metrics = Arc::new(PeerMetrics::default());
        let cancel = CancellationToken::new();
        let (commands, inbox) = mpsc::channel(INBOX);
        let mut actor = Actor {
            swarm,
            inbox,
            status: status.clone(),
            metrics: metrics.clone(),
            conns: HashMap::new(),
            parked: HashMap::new(),
            parked_total: 0,
            relays: config.relays.clone(),
            relay_listeners: HashMap::new(),
            dialing: HashMap::new(),
            connected_at: HashMap::new(),
            observed_by: HashSet::new(),
            punches: HashMap::new(),
            announce_listen,
        };
        for relay in &config.relays {
            if let Some(Protocol::P2p(id)) = relay.iter().last() {
                actor
                    .swarm
                    .behaviour_mut()
                    .autonat
                    .0
                    .add_server(id, Some(relay.clone()));
            }
        }
        actor.reserve_on_relays();
        let task = tokio::spawn(actor.run(cancel.clone(), config.relay_retry));
        Ok((
            Peer {
                peer_id,
                commands,
                status,
                metrics,
                cancel,
                task,
                artifact_inbound: Mutex::new(Some(artifact_rx)),
            },
            inbound_rx,
        ))
    }

    /// This peer's id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Listen addresses, observed addresses, reachability, relay reservation, now.
    pub fn status(&self) -> PeerStatus {
        lock(&self.status).clone()
    }

    /// Counters (paths of opened streams, hole punches).
    pub fn metrics(&self) -> &PeerMetrics {
        &self.metrics
    }

    /// Open an `/skein/infer/1` stream to `peer`: on its best existing connection, else after
    /// dialling `addrs` (direct addresses and relay circuits, tried at once; the first to
    /// connect wins). The connection's handshake proves the remote holds `peer`'s key: a
    /// peer that answers at those addresses with another key is refused
    /// ([`PeerError::WrongPeer`]). Bounded by `timeout`.
    pub async fn open(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        timeout: Duration,
    ) -> Result<(Stream, Path), PeerError> {
        self.open_protocol(peer, addrs, crate::infer::PROTOCOL, timeout)
            .await
    }

    /// Open a stream of `protocol` (`/skein/infer/1` or `/skein/artifact/1`) to `peer`, as
    /// [`open`](Self::open) does.
    pub async fn open_protocol(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        protocol: StreamProtocol,
        timeout: Duration,
    ) -> Result<(Stream, Path), PeerError> {
        let work = async {
            let (reply, answer) = oneshot::channel();
            self.commands
                .send(Command::Open {
                    peer,
                    addrs,
                    protocol,
                    reply,
                })
                .await
                .map_err(|_| PeerError::Stopped)?;
            let (path, stream) = answer.await.map_err(|_| PeerError::Stopped)??;
            let stream = stream.await.map_err(|_| {
                PeerError::Open("the connection closed before the stream opened".into())
            })??;
            self.metrics.count_open(path);
            Ok((stream, path))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| PeerError::Timeout(timeout))?
    }

    /// The inbound `/skein/artifact/1` streams (bounded: [`crate::PeerConfig`]'s
    /// `max_inbound_artifact_streams`); `None` once taken. Until taken they queue up to the
    /// bound, then are reset.
    pub fn take_artifact_inbound(&self) -> Option<mpsc::Receiver<Inbound>> {
        self.artifact_inbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The paths of the connections to `peer` now (empty when not connected).
    pub async fn paths(&self, peer: PeerId) -> Vec<Path> {
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(Command::Paths { peer, reply })
            .await
            .is_err()
        {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// Hold a reservation on `relay` too (a multiaddr ending in `/p2p/RELAY_ID`); a relay
    /// already known, or one past the fourth, changes nothing.
    pub async fn add_relay(&self, relay: Multiaddr) {
        let _ = self.commands.send(Command::AddRelay(relay)).await;
    }

    /// Stop without waiting (what [`shutdown`](Self::shutdown) does, from a shared handle).
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Stop: close every connection and end the actor.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

fn lock(m: &Mutex<PeerStatus>) -> std::sync::MutexGuard<'_, PeerStatus> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Actor {
    swarm: Swarm<Behaviour>,
    inbox: mpsc::Receiver<Command>,
    status: Arc<Mutex<PeerStatus>>,
    metrics: Arc<PeerMetrics>,
    conns: HashMap<ConnectionId, (PeerId, Path)>,
    parked: HashMap<PeerId, Vec<(StreamProtocol, OpenAnswer)>>,
    parked_total: usize,
    relays: Vec<Multiaddr>,
    /// The circuit listener on each relay (by the relay's PeerId: one, whatever number of
    /// its addresses are configured), while there is one, and the address it listens at.
    relay_listeners: HashMap<PeerId, (Multiaddr, libp2p::core::transport::ListenerId)>,
    /// Peers being dialled (callees and relays), QUIC first.
    dialing: HashMap<PeerId, Dialing>,
    /// When this peer's first direct connection to each peer came up (relays: circuits wait
    /// for identify's observation on it, at most [`OBSERVATION_WAIT`]).
    connected_at: HashMap<PeerId, Instant>,
    /// Peers whose identify told this peer the address they see it at, on a live connection.
    observed_by: HashSet<PeerId>,
    /// DCUtR's dials (the hole punches), by connection, to the peer they punch to.
    punches: HashMap<ConnectionId, PeerId>,
    /// A relay without configured external addresses announces its listen addresses.
    announce_listen: bool,
}

/// QUIC dials are alone for this long; then the TCP addresses are dialled too (at once when
/// every QUIC dial has failed). UDP may be blocked, and a blocked QUIC dial only times out.
const TCP_FALLBACK_AFTER: Duration = Duration::from_millis(1500);
/// A dial that has connected nothing by then gives up.
const DIAL_GIVE_UP: Duration = Duration::from_secs(30);
/// Circuits through a relay wait, at most this long after the connection to it came up, for
/// identify's answer on it: the address the relay sees this peer at is the hole-punch
/// candidate DCUtR sends to the callee, and DCUtR takes its candidates when the relayed
/// connection is established.
const OBSERVATION_WAIT: Duration = Duration::from_secs(1);
/// How often pending dials are looked at (fallbacks, waits, give-ups).
const DIAL_TICK: Duration = Duration::from_millis(100);

/// A peer being dialled: QUIC addresses first, TCP after [`TCP_FALLBACK_AFTER`] or once every
/// QUIC dial failed; circuits once their relay is connected and has observed this peer.
struct Dialing {
    started: Instant,
    /// TCP (and other non-QUIC) addresses not dialled yet.
    tcp: Vec<Multiaddr>,
    /// Circuits waiting for their relay: (relay, circuit address), one per relay.
    circuits: Vec<(PeerId, Multiaddr)>,
    /// Dials in flight.
    inflight: HashSet<ConnectionId>,
    /// The last dial error, for the opens failed when nothing is left to try.
    last_error: Option<PeerError>,
    /// Every address given for this dial (bounded by what callers pass).
    known: HashSet<Multiaddr>,
}

fn is_circuit(a: &Multiaddr) -> bool {
    a.iter().any(|p| p == Protocol::P2pCircuit)
}

fn is_quic(a: &Multiaddr) -> bool {
    a.iter()
        .take_while(|p| *p != Protocol::P2pCircuit)
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

/// The relay of a circuit address and the relay's own address (`.../p2p/RELAY`).
fn relay_of(circuit: &Multiaddr) -> Option<(PeerId, Multiaddr)> {
    let mut relay = Multiaddr::empty();
    for p in circuit.iter() {
        if p == Protocol::P2pCircuit {
            break;
        }
        relay.push(p);
    }
    match relay.iter().last() {
        Some(Protocol::P2p(id)) => Some((id, relay)),
        _ => None,
    }
}

impl Actor {
    async fn run(mut self, cancel: CancellationToken, relay_retry: Duration) {
        let mut retry = tokio::time::interval(relay_retry);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dial_tick = tokio::time::interval(DIAL_TICK);
        dial_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                cmd = self.inbox.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.event(event),
                _ = retry.tick() => self.reserve_on_relays(),
                _ = dial_tick.tick(), if !self.dialing.is_empty() => self.progress(),
            }
        }
        for (_, answers) in self.parked.drain() {
            for (_, a) in answers {
                let _ = a.send(Err(PeerError::Stopped));
            }
        }
    }

    /// Reserve on every configured relay not reserved on yet: over the connection to it when
    /// there is one (the relay client reuses it), else after dialling it (QUIC first).
    ///
    /// One circuit listener per relay, however many of its addresses are configured (a node
    /// gets the coordinator's QUIC and TCP ones): libp2p's relay client holds one reservation
    /// per connection to a relay, and a second listener's reservation replaces the first's,
    /// whose listener then closes. With a listener per address the two took turns, one
    /// reservation every retry, until the relay's rate limit refused them and every circuit
    /// to this peer was denied.
    fn reserve_on_relays(&mut self) {
        let mut dial: Vec<(PeerId, Multiaddr)> = Vec::new();
        for relay in self.relays.clone() {
            let Some(Protocol::P2p(id)) = relay.iter().last() else {
                continue;
            };
            if self.relay_listeners.contains_key(&id) {
                continue;
            }
            if !self.swarm.is_connected(&id) {
                let dialled = self
                    .dialing
                    .get(&id)
                    .is_some_and(|d| d.known.contains(&relay));
                if !dialled {
                    dial.push((id, relay));
                }
                continue;
            }
            match self
                .swarm
                .listen_on(relay.clone().with(Protocol::P2pCircuit))
            {
                Ok(lid) => {
                    self.relay_listeners.insert(id, (relay, lid));
                }
                Err(e) => tracing::debug!(%relay, error = %e, "cannot listen through the relay"),
            }
        }
        for (id, relay) in dial {
            self.dial(id, vec![relay]);
        }
    }

    /// Start dialling `peer` at `addrs`: QUIC now, TCP later, circuits once their relay is
    /// ready (its connection is dialled here when there is none).
    fn dial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let mut quic = Vec::new();
        let mut tcp = Vec::new();
        let mut circuits: Vec<(PeerId, Multiaddr)> = Vec::new();
        let mut relay_addrs: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        let known = self.dialing.get(&peer).map(|d| &d.known);
        let addrs: Vec<Multiaddr> = addrs
            .into_iter()
            .filter(|a| !known.is_some_and(|k| k.contains(a)))
            .collect();
        let given: HashSet<Multiaddr> = addrs.iter().cloned().collect();
        for a in addrs {
            if is_circuit(&a) {
                if let Some((relay, at)) = relay_of(&a) {
                    if relay == *self.swarm.local_peer_id() || relay == peer {
                        continue;
                    }
                    relay_addrs.entry(relay).or_default().push(at);
                    if !circuits.iter().any(|(r, _)| *r == relay) {
                        circuits.push((relay, a));
                    }
                }
            } else if is_quic(&a) {
                quic.push(a);
            } else {
                tcp.push(a);
            }
        }
        if let Some(mut entry) = self.dialing.remove(&peer) {
            // More addresses for a dial under way (a relay's QUIC and TCP addresses arrive
            // one by one): QUIC dialled now, the rest joins the fallback.
            self.start_dial(peer, &mut entry, quic);
            entry.known.extend(given);
            for a in tcp {
                if !entry.tcp.contains(&a) {
                    entry.tcp.push(a);
                }
            }
            for (relay, c) in circuits {
                if !entry.circuits.iter().any(|(r, _)| *r == relay) {
                    entry.circuits.push((relay, c));
                }
            }
            self.dialing.insert(peer, entry);
        } else {
            let mut entry = Dialing {
                started: Instant::now(),
                tcp,
                circuits,
                inflight: HashSet::new(),
                last_error: None,
                known: given,
            };
            if quic.is_empty() && entry.circuits.is_empty() {
                let tcp = std::mem::take(&mut entry.tcp);
                self.start_dial(peer, &mut entry, tcp);
            } else {
                self.start_dial(peer, &mut entry, quic);
            }
            self.dialing.insert(peer, entry);
        }
        for (relay, addrs) in relay_addrs {
            if !self.swarm.is_connected(&relay) && !self.dialing.contains_key(&relay) {
                self.dial(relay, addrs);
            }
        }
        self.progress();
    }

    fn start_dial(&mut self, peer: PeerId, entry: &mut Dialing, addrs: Vec<Multiaddr>) {
        if addrs.is_empty() {
            return;
        }
        tracing::debug!(%peer, ?addrs, "dialling");
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::Disconnected)
            .build();
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                entry.inflight.insert(id);
            }
            Err(e) => entry.last_error = Some(dial_error(peer, &e)),
        }
    }

    /// A relay is ready for circuits: connected, and its identify has told this peer the
    /// address it sees (or [`OBSERVATION_WAIT`] passed).
    fn relay_ready(&self, relay: PeerId, now: Instant) -> bool {
        self.swarm.is_connected(&relay)
            && (self.observed_by.contains(&relay)
                || self
                    .connected_at
                    .get(&relay)
                    .is_some_and(|t| now.duration_since(*t) >= OBSERVATION_WAIT))
    }

    /// Move every pending dial on: circuits whose relay is ready, TCP fallbacks that are due,
    /// dials with nothing left to try (or past [`DIAL_GIVE_UP`]) failed.
    fn progress(&mut self) {
        let now = Instant::now();
        let peers: Vec<PeerId> = self.dialing.keys().copied().collect();
        for peer in peers {
            let Some(mut entry) = self.dialing.remove(&peer) else {
                continue;
            };
            if self.swarm.is_connected(&peer) {
                continue;
            }
            // Circuits through ready relays.
            let mut waiting = Vec::new();
            for (relay, circuit) in std::mem::take(&mut entry.circuits) {
                if self.relay_ready(relay, now) {
                    self.start_dial(peer, &mut entry, vec![circuit]);
                } else if self.dialing.contains_key(&relay) || self.swarm.is_connected(&relay) {
                    waiting.push((relay, circuit));
                } else {
                    // The relay could not be reached.
                    entry.last_error.get_or_insert_with(|| {
                        PeerError::Dial(peer, format!("its relay {relay} cannot be reached"))
                    });
                }
            }
            entry.circuits = waiting;
            let age = now.duration_since(entry.started);
            if !entry.tcp.is_empty() && (age >= TCP_FALLBACK_AFTER || entry.inflight.is_empty()) {
                let tcp = std::mem::take(&mut entry.tcp);
                self.start_dial(peer, &mut entry, tcp);
            }
            let nothing_left =
                entry.inflight.is_empty() && entry.tcp.is_empty() && entry.circuits.is_empty();
            if nothing_left || age >= DIAL_GIVE_UP {
                let e = entry
                    .last_error
                    .take()
                    .unwrap_or_else(|| PeerError::Dial(peer, "no address connected".into()));
                tracing::debug!(%peer, error = %e, "dial failed");
                self.fail_parked(peer, e);
            } else {
                self.dialing.insert(peer, entry);
            }
        }
    }

    /// Whether a hole-punched connection to `peer` is up.
    fn punched_to(&self, peer: PeerId) -> bool {
        self.conns
            .values()
            .any(|(p, path)| *p == peer && *path == Path::HolePunched)
    }

    /// The best connection to `peer`: hole-punched or direct before relayed.
    fn best(&self, peer: PeerId) -> Option<(ConnectionId, Path)> {
        self.conns
            .iter()
            .filter(|(_, (p, _))| *p == peer)
            .map(|(c, (_, path))| (*c, *path))
            .min_by_key(|(c, path)| (path.rank(), *c))
    }

    fn open_on(
        &mut self,
        peer: PeerId,
        conn: ConnectionId,
        path: Path,
        protocol: StreamProtocol,
        answer: OpenAnswer,
    ) {
        let (tx, rx) = oneshot::channel();
        self.swarm
            .behaviour_mut()
            .streams
            .open(peer, conn, protocol, tx);
        let _ = answer.send(Ok((path, rx)));
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Open {
                peer,
                addrs,
                protocol,
                reply,
            } => {
                if peer == *self.swarm.local_peer_id() {
                    let _ = reply.send(Err(PeerError::Dial(peer, "that is this peer".into())));
                    return;
                }
                if let Some((conn, path)) = self.best(peer) {
                    self.open_on(peer, conn, path, protocol, reply);
                    return;
                }
                if self.parked_total >= MAX_PARKED {
                    let _ = reply.send(Err(PeerError::Busy));
                    return;
                }
                self.parked.entry(peer).or_default().push((protocol, reply));
                self.parked_total += 1;
                if !self.dialing.contains_key(&peer) {
                    self.dial(peer, addrs);
                }
            }
            Command::AddRelay(relay) => {
                // Bounded by relays, not addresses: one relay given by its QUIC and TCP
                // addresses is one relay.
                let id = match relay.iter().last() {
                    Some(Protocol::P2p(id)) => Some(id),
                    _ => None,
                };
                let of = |r: &Multiaddr| match r.iter().last() {
                    Some(Protocol::P2p(i)) => Some(i),
                    _ => None,
                };
                let same = self.relays.iter().filter(|r| of(r) == id).count();
                let mut ids: Vec<PeerId> = self.relays.iter().filter_map(of).collect();
                ids.sort();
                ids.dedup();
                let room = if same > 0 {
                    same < MAX_ADDRS_PER_RELAY
                } else {
                    ids.len() < MAX_RELAYS
                };
                if !self.relays.contains(&relay) && room {
                    if let Some(id) = id {
                        self.swarm
                            .behaviour_mut()
                            .autonat
                            .0
                            .add_server(id, Some(relay.clone()));
                    }
                    self.relays.push(relay);
                    self.reserve_on_relays();
                }
            }
            Command::Paths { peer, reply } => {
                let paths = self
                    .conns
                    .values()
                    .filter(|(p, _)| *p == peer)
                    .map(|(_, path)| *path)
                    .collect();
                let _ = reply.send(paths);
            }
        }
    }

    fn fail_parked(&mut self, peer: PeerId, e: PeerError) {
        if let Some(answers) = self.parked.remove(&peer) {
            self.parked_total -= answers.len();
            for (_, a) in answers {
                let _ = a.send(Err(e.clone()));
            }
        }
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                // A direct connection to a peer this one reaches through a relay is the hole
                // punch's (whichever side's dial made it), and so is one to a peer already
                // hole-punched to: it goes through the same hole (a late dial to the peer's
                // observed address, completing after the relay is gone).
                let relayed_to = self
                    .conns
                    .values()
                    .any(|(p, path)| *p == peer_id && *path != Path::Direct);
                let path = if endpoint.is_relayed() {
                    Path::Relayed
                } else if relayed_to || self.punches.contains_key(&connection_id) {
                    Path::HolePunched
                } else {
                    Path::Direct
                };
                tracing::debug!(peer = %peer_id, %path, ?connection_id, ?endpoint, "connected");
                self.punches.remove(&connection_id);
                // A success is the first hole-punched connection to the peer, whichever
                // side's dial made it (both usually do, one after the other).
                if path == Path::HolePunched && !self.punched_to(peer_id) {
                    self.metrics
                        .hole_punch_successes
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(peer = %peer_id, "hole punched: direct connection");
                }
                self.conns.insert(connection_id, (peer_id, path));
                if !endpoint.is_relayed() {
                    self.connected_at
                        .entry(peer_id)
                        .or_insert_with(Instant::now);
                }
                self.dialing.remove(&peer_id);
                if let Some(answers) = self.parked.remove(&peer_id) {
                    self.parked_total -= answers.len();
                    for (protocol, a) in answers {
                        self.open_on(peer_id, connection_id, path, protocol, a);
                    }
                }
                if self
                    .relays
                    .iter()
                    .any(|r| r.iter().last() == Some(Protocol::P2p(peer_id)))
                {
                    self.reserve_on_relays();
                }
                self.progress();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.conns.remove(&connection_id);
                if num_established == 0 {
                    self.connected_at.remove(&peer_id);
                    self.observed_by.remove(&peer_id);
                }
            }
            SwarmEvent::Dialing {
                peer_id: Some(peer),
                connection_id,
            } => {
                // A dial this actor did not make, to a peer reached through a relay: DCUtR's.
                let ours = self
                    .dialing
                    .values()
                    .any(|d| d.inflight.contains(&connection_id));
                let relayed_to = self
                    .conns
                    .values()
                    .any(|(p, path)| *p == peer && *path == Path::Relayed);
                if !ours && relayed_to && self.punches.len() < MAX_PARKED {
                    tracing::debug!(%peer, ?connection_id, "hole punch: dialling");
                    self.punches.insert(connection_id, peer);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                if let Some(peer) = self.punches.remove(&connection_id) {
                    // The other side's dial may have made the connection already.
                    if !self.punched_to(peer) {
                        self.metrics
                            .hole_punch_failures
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::info!(%peer, error = %error, "hole punch dial failed");
                }
                let ours = peer_id.and_then(|p| Some((p, self.dialing.get_mut(&p)?)));
                if let Some((peer, entry)) = ours {
                    if entry.inflight.remove(&connection_id) {
                        tracing::debug!(%peer, error = %error, "a dial failed");
                        entry.last_error = Some(dial_error(peer, &error));
                        self.progress();
                    }
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                let mut s = lock(&self.status);
                if address.iter().any(|p| p == Protocol::P2pCircuit) {
                    if !s.relayed.contains(&address)
                        && s.relayed.len() < MAX_RELAYS * MAX_ADDRS_PER_RELAY
                    {
                        s.relayed.push(address);
                    }
                } else if !s.listen.contains(&address) {
                    s.listen.push(address.clone());
                    drop(s);
                    if self.announce_listen {
                        self.swarm.add_external_address(address);
                    }
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let mut s = lock(&self.status);
                s.listen.retain(|a| *a != address);
                s.relayed.retain(|a| *a != address);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                let relay = self
                    .relay_listeners
                    .iter()
                    .find(|(_, (_, id))| *id == listener_id)
                    .map(|(peer, (addr, _))| (*peer, addr.clone()));
                if let Some((peer, relay)) = relay {
                    tracing::info!(%relay, ?reason, "relay reservation lost; retrying");
                    self.metrics
                        .relay_reservations_lost
                        .fetch_add(1, Ordering::Relaxed);
                    self.relay_listeners.remove(&peer);
                    // Its circuit addresses, at whichever of the relay's addresses.
                    let through = format!("/p2p/{peer}/p2p-circuit");
                    lock(&self.status)
                        .relayed
                        .retain(|a| !a.to_string().contains(&through));
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                let mut s = lock(&self.status);
                push_bounded(&mut s.observed, address);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                connection_id,
                peer_id,
                info,
            })) => {
                tracing::debug!(
                    peer = %peer_id,
                    ?connection_id,
                    observed = %info.observed_addr,
                    "identify: observed address"
                );
                if self.observed_by.insert(peer_id) {
                    self.progress();
                }
            }
            SwarmEvent::NewExternalAddrCandidate { address } => {
                tracing::debug!(%address, "external address candidate");
                let mut s = lock(&self.status);
                push_bounded(&mut s.observed, address);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(conn) => {
                    if let Some(entry) = self.conns.get_mut(&conn) {
                        entry.1 = Path::HolePunched;
                    }
                    tracing::info!(peer = %remote_peer_id, "DCUtR: direct connection");
                }
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, error = %e, "DCUtR failed; staying relayed");
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                new,
                ..
            })) => {
                let r = match new {
                    autonat::NatStatus::Public(_) => Reachability::Public,
                    autonat::NatStatus::Private => Reachability::Nat,
                    autonat::NatStatus::Unknown => Reachability::Unknown,
                };
                tracing::info!(reachability = %r, "reachability");
                lock(&self.status).reachability = r;
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal,
                    ..
                },
            )) => {
                if !renewal {
                    self.metrics
                        .relay_reservations
                        .fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(relay = %relay_peer_id, renewal, "relay reservation accepted");
            }
            _ => {}
        }
    }
}

#[allow(dead_code)]
fn remote(endpoint: &ConnectedPoint) -> &Multiaddr {
    endpoint.get_remote_address()
}

fn push_bounded(list: &mut Vec<Multiaddr>, a: Multiaddr) {
    if list.contains(&a) {
        return;
    }
    if list.len() >= MAX_OBSERVED {
        list.remove(0);
    }
    list.push(a);
}

fn dial_error(peer: PeerId, e: &DialError) -> PeerError {
    match e {
        DialError::WrongPeerId { obtained, address } => PeerError::WrongPeer {
            expected: peer,
            obtained: *obtained,
            address: address.clone(),
        },
        other => PeerError::Dial(peer, other.to_string()),
    }
}
