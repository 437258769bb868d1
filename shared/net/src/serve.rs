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
                    connection(incoming, cancel, handle).await;
                    active.fetch_sub(1, Ordering::AcqRel);
                });
            }
        }
    }
}

async fn connection<F, Fut>(incoming: quinn::Incoming, cancel: CancellationToken, handle: F)
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
    };
    let peer = crate::tls::peer_fingerprint(&conn);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    tokio::spawn(handle(Request { peer: peer.clone(), send, recv, rtt: conn.rtt(), conn: conn.clone() }));
                }
                Err(_) => break,
            },
        }
    }
}
