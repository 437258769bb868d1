//! The accept loop every Skein server shares: bounded connections, one task per request stream.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// One request stream and who opened it.
#[derive(Debug)]
pub struct Request {
    /// sha256 fingerprint of the peer's certificate, if it presented one.
    pub peer: Option<String>,
    /// Where the answer goes.
    pub send: quinn::SendStream,
    /// Where the request comes from.
    pub recv: quinn::RecvStream,
    /// The connection's smoothed round-trip time when the stream was accepted.
    pub rtt: std::time::Duration,
    /// The connection (to close it when its peer is revoked).
    pub conn: quinn::Connection,
}

/// Whether a server hands out streams before the handshake completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyData {
    /// Streams only once the handshake is complete (and the client's certificate checked).
    Refuse,
    /// Streams from the first flight on (0-RTT, and 0.5-RTT answers): only for a protocol
    /// whose requests are replay-safe and that authenticates each request itself (the node's
    /// route tickets). The endpoint must also accept early data
    /// ([`TransportLimits::zero_rtt`](crate::TransportLimits::zero_rtt)).
    Accept,
}

/// Accept connections on `endpoint` until `cancel` fires, refusing new ones beyond
/// `max_connections`, and run `handle` on its own task for every bidirectional stream.
pub async fn accept_loop<F, Fut>(
    endpoint: quinn::Endpoint,
    cancel: CancellationToken,
    max_connections: usize,
    handle: F,
) where
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    accept_loop_with(
        endpoint,
        cancel,
        max_connections,
        EarlyData::Refuse,
        move |r, _early| handle(r),
    )
    .await
}

/// [`accept_loop`], handing out early streams with [`EarlyData::Accept`]. `handle` also learns
/// whether the stream was accepted before the handshake completed (`early`): it may then have
/// come in a returning client's 0-RTT flight, which an attacker can replay.
pub async fn accept_loop_with<F, Fut>(
    endpoint: quinn::Endpoint,
    cancel: CancellationToken,
    max_connections: usize,
    early: EarlyData,
    handle: F,
) where
    F: Fn(Request, bool) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                if active.fetch_add(1, Ordering::AcqRel) >= max_connections {
                    active.fetch_sub(1, Ordering::AcqRel);
                    incoming.refuse();
                    continue;
                }
                let (active, cancel, handle) = (active.clone(), cancel.clone(), handle.clone());
                tokio::spawn(async move {
                    connection(incoming, cancel, early, handle).await;
                    active.fetch_sub(1, Ordering::AcqRel);
                });
            }
        }
    }
}

async fn connection<F, Fut>(
    incoming: quinn::Incoming,
    cancel: CancellationToken,
    early: EarlyData,
    handle: F,
) where
    F: Fn(Request, bool) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "connection refused");
            return;
        }
    };
    // On the server side `into_0rtt` always succeeds; `handshake` resolves once it completes.
    let (conn, mut handshake) = match early {
        EarlyData::Accept => match connecting.into_0rtt() {
            Ok((conn, done)) => (conn, Some(done)),
            Err(connecting) => match connecting.await {
                Ok(c) => (c, None),
                Err(e) => {
                    tracing::debug!(error = %e, "handshake failed");
                    return;
                }
            },
        },
        EarlyData::Refuse => match connecting.await {
            Ok(c) => (c, None),
            Err(e) => {
                tracing::debug!(error = %e, "handshake failed");
                return;
            }
        },
    };
    let mut peer = crate::tls::peer_fingerprint(&conn);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            // Streams accepted before this fires are early; the peer's identity is known now.
            _ = async {
                match handshake.as_mut() {
                    Some(done) => done.await,
                    None => std::future::pending().await,
                }
            }, if handshake.is_some() => {
                handshake = None;
                peer = crate::tls::peer_fingerprint(&conn);
            }
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let request = Request {
                        peer: peer.clone(),
                        send,
                        recv,
                        rtt: conn.rtt(),
                        conn: conn.clone(),
                    };
                    tokio::spawn(handle(request, handshake.is_some()));
                }
                Err(_) => break,
            },
        }
    }
}
