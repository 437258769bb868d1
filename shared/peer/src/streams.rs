//! The peer layer's request streams: one stream per request, on the connection the caller
//! picks, for every protocol of [`crate::infer`] (`/skein/infer/1`) and [`crate::artifact`]
//! (`/skein/artifact/1`) alike.
//!
//! A [`Behaviour`] that opens outbound streams of a given protocol on a given
//! [`ConnectionId`] (so a caller can prefer a hole-punched connection over a relayed one to the
//! same peer, and knows which path a call took) and hands inbound streams to one bounded
//! channel per protocol; when a protocol's channel is full the stream is dropped (the caller
//! sees its stream reset), never queued without bound, and never at another protocol's
//! expense.

use futures::channel::oneshot;
use libp2p::core::upgrade::{InboundUpgrade, ReadyUpgrade, UpgradeInfo};
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

/// Outbound stream requests a connection holds at once; more are refused at once.
const MAX_PENDING_OPENS: usize = 64;

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The peer does not speak the protocol.
    #[error("the peer does not serve this protocol")]
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
    /// Each protocol served, with the channel its inbound streams go to.
    inbound: Vec<(StreamProtocol, tokio::sync::mpsc::Sender<Inbound>)>,
    to_handlers: VecDeque<(PeerId, ConnectionId, HandlerCommand)>,
    /// Each open connection's peer and path.
    paths: HashMap<ConnectionId, (PeerId, crate::Path)>,
}

impl Behaviour {
    /// A behaviour serving each protocol of `inbound`, handing its inbound streams to its
    /// (bounded) channel.
    pub fn new(inbound: Vec<(StreamProtocol, tokio::sync::mpsc::Sender<Inbound>)>) -> Behaviour {
        Behaviour {
            inbound,
            to_handlers: VecDeque::new(),
            paths: HashMap::new(),
        }
    }

    fn handler(&self) -> Handler {
        Handler {
            protocols: Protocols(self.inbound.iter().map(|(p, _)| p.clone()).collect()),
            to_open: VecDeque::new(),
            events: VecDeque::new(),
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

    /// Open a `protocol` stream on `connection` (to `peer`); the answer comes on `reply`.
    pub fn open(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        protocol: StreamProtocol,
        reply: OpenReply,
    ) {
        if self.to_handlers.len() >= MAX_PENDING_OPENS {
            let _ = reply.send(Err(OpenError::Busy));
            return;
        }
        self.to_handlers
            .push_back((peer, connection, HandlerCommand { protocol, reply }));
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
        Ok(self.handler())
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
        Ok(self.handler())
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
        let HandlerEvent::Inbound(stream, protocol) = event;
        let path = self
            .paths
            .get(&connection)
            .map_or(crate::Path::Direct, |(_, p)| *p);
        let Some((_, to)) = self.inbound.iter().find(|(p, _)| *p == protocol) else {
            return;
        };
        match to.try_send(Inbound {
            peer,
            connection,
            path,
            stream,
        }) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!(%peer, %protocol, "too many inbound streams waiting: one dropped");
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                tracing::debug!(%peer, %protocol, "nobody serves these inbound streams: one dropped");
            }
        }
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.to_handlers.pop_front() {
            Some((peer_id, connection, event)) => Poll::Ready(ToSwarm::NotifyHandler {
                peer_id,
                handler: NotifyHandler::One(connection),
                event,
            }),
            None => Poll::Pending,
        }
    }
}

/// Open an outbound stream of `protocol`; the answer goes to `reply`.
#[derive(Debug)]
pub struct HandlerCommand {
    protocol: StreamProtocol,
    reply: OpenReply,
}

/// What a connection's handler reports.
#[derive(Debug)]
pub enum HandlerEvent {
    /// The remote opened a stream of this protocol.
    Inbound(Stream, StreamProtocol),
}

/// The protocols a connection accepts inbound streams of; an accepted stream comes with the
/// protocol negotiated.
#[derive(Debug, Clone)]
pub struct Protocols(Vec<StreamProtocol>);

impl UpgradeInfo for Protocols {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for Protocols {
    type Output = (Stream, StreamProtocol);
    type Error = std::convert::Infallible;
    type Future = futures::future::Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        futures::future::ready(Ok((stream, protocol)))
    }
}

/// One connection's side of the protocols.
pub struct Handler {
    protocols: Protocols,
    to_open: VecDeque<HandlerCommand>,
    events: VecDeque<HandlerEvent>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = HandlerCommand;
    type ToBehaviour = HandlerEvent;
    type InboundProtocol = Protocols;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = OpenReply;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, ()> {
        SubstreamProtocol::new(self.protocols.clone(), ())
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, OpenReply, Self::ToBehaviour>> {
        if let Some(e) = self.events.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(e));
        }
        if let Some(HandlerCommand { protocol, reply }) = self.to_open.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(ReadyUpgrade::new(protocol), reply),
            });
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, cmd: HandlerCommand) {
        if self.to_open.len() >= MAX_PENDING_OPENS {
            let _ = cmd.reply.send(Err(OpenError::Busy));
            return;
        }
        self.to_open.push_back(cmd);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), OpenReply>,
    ) {
        match event {
            // Over the bound, the stream is dropped (reset) by the catch-all arm.
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: (stream, protocol),
                ..
            }) if self.events.len() < MAX_PENDING_OPENS => {
                self.events
                    .push_back(HandlerEvent::Inbound(stream, protocol));
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
