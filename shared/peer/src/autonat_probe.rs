//! AutoNAT (v1) without the peer's circuit addresses.
//!
//! AutoNAT's client asks the server to dial back every address the peer listens on or was
//! seen at, in one request the server reads only up to 1 024 bytes. A peer holding a
//! reservation listens on one circuit address per address of its relay (about 95 bytes
//! each), and a relay listening on all interfaces has many: past about ten of them the
//! request no longer fits, the server drops the stream unread, the client retries at once,
//! and the verdict never comes (seen with two NAT tests side by side, whose routers give the
//! coordinator's relay twelve addresses). A server never dials a circuit address anyway (it
//! skips them), so this wrapper keeps them from AutoNAT: it sees the peer's direct addresses
//! only.

use libp2p::autonat;
use libp2p::core::{transport::PortUse, Endpoint};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};
use std::task::{Context, Poll};

/// [`autonat::Behaviour`], blind to circuit addresses.
pub(crate) struct Autonat(pub(crate) autonat::Behaviour);

fn is_circuit(a: &Multiaddr) -> bool {
    a.iter().any(|p| p == Protocol::P2pCircuit)
}

impl NetworkBehaviour for Autonat {
    type ConnectionHandler = <autonat::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = autonat::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.0
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0
            .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.0.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        let circuit = match &event {
            FromSwarm::NewListenAddr(e) => is_circuit(e.addr),
            FromSwarm::ExpiredListenAddr(e) => is_circuit(e.addr),
            FromSwarm::NewExternalAddrCandidate(e) => is_circuit(e.addr),
            FromSwarm::ExternalAddrConfirmed(e) => is_circuit(e.addr),
            FromSwarm::ExternalAddrExpired(e) => is_circuit(e.addr),
            _ => false,
        };
        if !circuit {
            self.0.on_swarm_event(event);
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.0
            .on_connection_handler_event(peer_id, connection_id, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.0.poll(cx)
    }
}
