//! quinn endpoints and transport settings.

use crate::tls::{self, ClientAuth, Credentials};
use crate::transport::TransportProfile;
use crate::NetError;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Bounds of every connection.
#[derive(Debug, Clone)]
pub struct TransportLimits {
    /// Largest frame accepted or sent (default 64 MiB).
    pub max_frame_len: u32,
    /// A connection silent this long is dead (default 10 s).
    pub idle_timeout: Duration,
    /// Keep-alive ping interval (default 2 s).
    pub keep_alive: Duration,
    /// Concurrent bidirectional streams a peer may open (default 256).
    pub max_concurrent_streams: u32,
    /// Largest UDP payload path MTU discovery may probe for (default 65 527; loopback and
    /// jumbo-frame links benefit, other paths settle lower on their own).
    pub max_udp_payload: u16,
    /// Initial window, congestion controller and pacing ([`TransportProfile`]).
    pub profile: TransportProfile,
    /// 0-RTT: a server accepts requests in a returning client's first flight, a client may
    /// send them (default off). Only for replay-safe protocols: the node's `skein/infer`,
    /// which deduplicates by request id; never `skein/ctl`.
    pub zero_rtt: bool,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            max_frame_len: skein_proto::DEFAULT_MAX_FRAME_LEN,
            idle_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(2),
            max_concurrent_streams: 256,
            max_udp_payload: 65_527,
            profile: TransportProfile::default(),
            zero_rtt: false,
        }
    }
}

fn transport(limits: &TransportLimits) -> Result<Arc<quinn::TransportConfig>, NetError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(limits.idle_timeout).map_err(|e| {
        NetError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            e.to_string(),
        ))
    })?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(limits.keep_alive));
    t.max_concurrent_bidi_streams(limits.max_concurrent_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Room for a large tensor in flight on one stream without stalling on flow control.
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    // Probe for large datagrams: loopback and LAN/jumbo paths carry tensors in far fewer
    // packets; paths that drop them keep the default 1200-1452 bytes.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(limits.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    limits.profile.apply(&mut t);
    Ok(Arc::new(t))
}

/// A server endpoint bound to `addr`, offering `alpns`, that can also open client connections.
pub fn server_endpoint(
    addr: SocketAddr,
    creds: &Credentials,
    alpns: &[&[u8]],
    auth: ClientAuth,
    limits: &TransportLimits,
) -> Result<quinn::Endpoint, NetError> {
    crate::install_crypto_provider();
    let mut rustls_cfg = tls::server_config(creds, alpns, auth)?;
    if limits.zero_rtt {
        // QUIC allows 0 or u32::MAX. rustls accepts early data only with its stateful,
        // single-use session tickets (the default store, 256 sessions): one ticket, one
        // accepted first flight per node process.
        rustls_cfg.max_early_data_size = u32::MAX;
    }
    let quic = QuicServerConfig::try_from(rustls_cfg)
        .map_err(|e| NetError::Tls(tls::TlsError::Verifier(e.to_string())))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport(limits)?);
    Ok(quinn::Endpoint::server(cfg, addr)?)
}

/// A client-only endpoint bound to `addr` (usually `0.0.0.0:0` or `127.0.0.1:0`).
pub fn client_endpoint(addr: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    crate::install_crypto_provider();
    Ok(quinn::Endpoint::client(addr)?)
}

/// Client configuration presenting `creds` and trusting the mesh CA.
pub fn client_config(
    creds: &Credentials,
    alpn: &[u8],
    limits: &TransportLimits,
) -> Result<quinn::ClientConfig, NetError> {
    crate::install_crypto_provider();
    let mut rustls_cfg = tls::client_config(creds, alpn)?;
    // Session tickets are kept in rustls's in-memory store (256 servers) either way; with
    // 0-RTT the SDK may send a request in the first flight to a node it has talked to.
    rustls_cfg.enable_early_data = limits.zero_rtt;
    quic_client(rustls_cfg, limits)
}

/// Client configuration for a node's first join: no client certificate, CA pinned by fingerprint.
pub fn join_client_config(
    ca_fingerprint: &str,
    limits: &TransportLimits,
) -> Result<quinn::ClientConfig, NetError> {
    crate::install_crypto_provider();
    let rustls_cfg = tls::pinned_client_config(ca_fingerprint, skein_proto::ALPN_CTL)?;
    quic_client(rustls_cfg, limits)
}

fn quic_client(
    rustls_cfg: rustls::ClientConfig,
    limits: &TransportLimits,
) -> Result<quinn::ClientConfig, NetError> {
    let quic = QuicClientConfig::try_from(rustls_cfg)
        .map_err(|e| NetError::Tls(tls::TlsError::Verifier(e.to_string())))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport(limits)?);
    Ok(cfg)
}

/// Connect to `addr` as `server_name`, giving up after `timeout`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<quinn::Connection, NetError> {
    let connecting = endpoint.connect_with(cfg, addr, server_name)?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(NetError::Timeout(timeout)),
    }
}

/// How [`connect_early`] connected.
pub enum Early {
    /// Resumed with 0-RTT: usable at once. The future resolves when the handshake completes,
    /// `true` if the server accepted the early data.
    ZeroRtt(quinn::ZeroRttAccepted),
    /// A full handshake, completed.
    Handshake,
}

impl std::fmt::Debug for Early {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Early::ZeroRtt(_) => "ZeroRtt",
            Early::Handshake => "Handshake",
        })
    }
}

/// Connect to `addr` as `server_name`, with 0-RTT when `cfg` allows early data and holds a
/// session ticket for `server_name`; otherwise a full handshake bounded by `timeout`.
pub async fn connect_early(
    endpoint: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<(quinn::Connection, Early), NetError> {
    let connecting = endpoint.connect_with(cfg, addr, server_name)?;
    match connecting.into_0rtt() {
        Ok((conn, accepted)) => Ok((conn, Early::ZeroRtt(accepted))),
        Err(connecting) => match tokio::time::timeout(timeout, connecting).await {
            Ok(r) => Ok((r?, Early::Handshake)),
            Err(_) => Err(NetError::Timeout(timeout)),
        },
    }
}
