//! `/skein/infer/1`: one request per stream, on the connection the caller picks.
//!
//! A [`Behaviour`] that opens outbound streams on a given [`ConnectionId`] (so a caller can
//! prefer a hole-punched connection over a relayed one to the same peer, and knows which path
//! a call took) and hands inbound streams to a bounded channel; when it is full the stream is
//! dropped (the caller sees its stream reset), never queued without bound.

use futures::channel::oneshot;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::core::{transport::PortUse, Endpoint, Multiaddr};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, NotifyHandler, Stream, StreamProtocol, StreamUpgradeError, SubstreamProtocol,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::PeerId;
use std::collections::{HashMap, VecDeque};
use std::task::{Context, Poll};

/// The protocol name: the `skein/infer` frames, unchanged.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/skein/infer/1");

/// Outbound stream requests a connection holds at once; more are refused at once.
const MAX_PENDING_OPENS: usize = 64;

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The peer does not speak `/skein/infer/1`.
    #[error("the peer does not serve /skein/infer/1")]
    Unsupported,
    /// Opening timed out.
    #[error("opening a stream timed out")]
    Timeout,
    /// Too many streams are being opened on this connection.
    #[error("too many streams being opened on this connection")]
    Busy,
    /// The connection failed or closed.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
}

/// A stream the remote opened: who, on which connection.
#[derive(Debug)]
pub struct Inbound {
    /// The remote peer (authenticated by the connection's handshake).
    pub peer: PeerId,
    /// The connection it came on.
    pub connection: ConnectionId,
    /// That connection's path: relayed (a circuit), hole-punched (direct, made while a relayed
    /// connection to the same peer was open) or direct.
    pub path: crate::Path,
    /// The stream.
    pub stream: Stream,
}

type OpenReply = oneshot::Sender<Result<Stream, OpenError>>;

/// The behaviour; see the module docs.
pub struct Behaviour {
    inbound: tokio::sync::mpsc::Sender<Inbound>,
    to_handlers: VecDeque<(PeerId, ConnectionId, OpenReply)>,
    /// Each open connection's peer and path.
    paths: HashMap<ConnectionId, (PeerId, crate::Path)>,
}

impl Behaviour {
    /// A behaviour handing inbound streams to `inbound` (bounded).
    pub fn new(inbound: tokio::sync::mpsc::Sender<Inbound>) -> Behaviour {
        Behaviour {
            inbound,
            to_handlers: VecDeque::new(),
            paths: HashMap::new(),
        }
    }

    /// Record `connection`'s path; `addrs`: its addresses (a relayed connection has a circuit
    /// in its local address when accepted, in its remote one when dialled).
    fn note(&mut self, connection: ConnectionId, peer: PeerId, addrs: &[&Multiaddr]) {
        use libp2p::multiaddr::Protocol;
        let relayed = addrs
            .iter()
            .any(|a| a.iter().any(|p| p == Protocol::P2pCircuit));
        let path = if relayed {
            crate::Path::Relayed
        } else if self
            .paths
            .values()
            .any(|(p, path)| *p == peer && *path == crate::Path::Relayed)
        {
            crate::Path::HolePunched
        } else {
            crate::Path::Direct
        };
        self.paths.insert(connection, (peer, path));
    }

    /// Open a stream on `connection` (to `peer`); the answer comes on `reply`.
    pub fn open(&mut self, peer: PeerId, connection: ConnectionId, reply: OpenReply) {
        if self.to_handlers.len() >= MAX_PENDING_OPENS {
            let _ = reply.send(Err(OpenError::Busy));
            return;
        }
        self.to_handlers.push_back((peer, connection, reply));
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = std::convert::Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.note(connection, peer, &[local, remote]);
        Ok(Handler::default())
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        remote: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.note(connection, peer, &[remote]);
        Ok(Handler::default())
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(c) = event {
            self.paths.remove(&c.connection_id);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        let HandlerEvent::Inbound(stream) = event;
        let path = self
            .paths
            .get(&connection)
            .map_or(crate::Path::Direct, |(_, p)| *p);
        match self.inbound.try_send(Inbound {
            peer,
            connection,
            path,
            stream,
        }) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!(%peer, "too many inbound infer streams waiting: one dropped");
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                tracing::debug!(%peer, "nobody serves inbound infer streams: one dropped");
            }
        }
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.to_handlers.pop_front() {
            Some((peer_id, connection, reply)) => Poll::Ready(ToSwarm::NotifyHandler {
                peer_id,
                handler: NotifyHandler::One(connection),
                event: HandlerCommand(reply),
            }),
            None => Poll::Pending,
        }
    }
}

/// Open an outbound stream; the answer goes to the sender.
#[derive(Debug)]
pub struct HandlerCommand(OpenReply);

/// What a connection's handler reports.
#[derive(Debug)]
pub enum HandlerEvent {
    /// The remote opened a stream.
    Inbound(Stream),
}

/// One connection's side of the protocol.
#[derive(Default)]
pub struct Handler {
    to_open: VecDeque<OpenReply>,
    events: VecDeque<HandlerEvent>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = HandlerCommand;
    type ToBehaviour = HandlerEvent;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = OpenReply;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, ()> {
        SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL), ())
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, OpenReply, Self::ToBehaviour>> {
        if let Some(e) = self.events.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(e));
        }
        if let Some(reply) = self.to_open.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(ReadyUpgrade::new(PROTOCOL), reply),
            });
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, HandlerCommand(reply): HandlerCommand) {
        if self.to_open.len() >= MAX_PENDING_OPENS {
            let _ = reply.send(Err(OpenError::Busy));
            return;
        }
        self.to_open.push_back(reply);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), OpenReply>,
    ) {
        match event {
            // Over the bound, the stream is dropped (reset) by the catch-all arm.
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: stream,
                ..
            }) if self.events.len() < MAX_PENDING_OPENS => {
                self.events.push_back(HandlerEvent::Inbound(stream));
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                info: reply,
            }) => {
                let _ = reply.send(Ok(stream));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { info: reply, error }) => {
                let e = match error {
                    StreamUpgradeError::Timeout => OpenError::Timeout,
                    StreamUpgradeError::NegotiationFailed => OpenError::Unsupported,
                    StreamUpgradeError::Io(e) => OpenError::Io(e),
                    StreamUpgradeError::Apply(never) => match never {},
                };
                let _ = reply.send(Err(e));
            }
            _ => {}
        }
    }
}
