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
    /// Upper bound for path MTU discovery (default 65 527). Discovery never probes above the
    /// peer's announced `max_udp_payload_size`, which every Skein endpoint leaves at quinn's
    /// 1 472 bytes (an Ethernet frame), so paths settle at 1 200 to 1 452 bytes, loopback
    /// included. Announcing 8 952 or 65 527 made loopback paths grow (a 786 KB tensor in about
    /// 90 packets instead of 540), but calls through the test hub's 2 ms link then took 65 to
    /// 110 ms instead of 15 to 20 (per-call times in tests/routing.rs; likely window-limited
    /// sends waiting on delayed ACKs), and the routing test's idle caller sent a tenth to a
    /// quarter of its calls to nodes 7 to 20 times farther away. Not shipped until that is
    /// understood (issue 22).
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
    let socket = udp_socket(addr, limits.profile.bounded_initial_window())?;
    endpoint(socket, Some(cfg))
}

/// A client-only endpoint bound to `addr` (usually `0.0.0.0:0` or `127.0.0.1:0`).
pub fn client_endpoint(addr: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    crate::install_crypto_provider();
    let socket = udp_socket(addr, TransportProfile::default().bounded_initial_window())?;
    endpoint(socket, None)
}

fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, NetError> {
    let runtime = quinn::default_runtime().ok_or_else(|| {
        NetError::Io(std::io::Error::other(
            "no async runtime for the QUIC endpoint (needs tokio)",
        ))
    })?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        runtime,
    )?)
}

/// Socket buffer asked for on every endpoint, bytes (as quic-go does, a few MiB).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Kernel memory one full-size datagram takes in a socket buffer, for a 1200-byte datagram:
/// Linux charges the buffer with the packet's whole allocation (`skb->truesize`), about twice
/// its payload.
const BUFFER_PER_DATAGRAM: u64 = 2_304;

/// Bytes of socket buffer a burst of `window` bytes in 1200-byte datagrams takes.
pub fn buffer_for_burst(window: u64) -> u64 {
    window.div_ceil(1_200) * BUFFER_PER_DATAGRAM
}

/// A UDP socket bound to `addr` with [`SOCKET_BUFFER`]-byte receive and send buffers where
/// the system allows it.
///
/// A fresh connection sends its whole initial window at once, and so do the peers of this
/// endpoint. Linux's default receive buffer (208 KiB, `net.core.rmem_default`) holds about 90
/// such datagrams, fewer than a 110 KB tensor in one flight: the rest are dropped before quinn
/// reads them and the call waits for loss recovery (hundreds of ms on a fresh connection).
/// The kernel caps the request at `net.core.rmem_max` (Linux's default cap still doubles the
/// default buffer, enough for the default 192 KiB window); a buffer smaller than a burst of
/// `window` bytes is logged with the sysctl that lifts the cap.
pub fn udp_socket(addr: SocketAddr, window: u64) -> Result<std::net::UdpSocket, NetError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // As `std::net::UdpSocket::bind` leaves it on Linux: `[::]` takes IPv4 too.
        let _ = socket.set_only_v6(false);
    }
    let recv = grow_buffer(&socket, Buffer::Receive);
    let _ = grow_buffer(&socket, Buffer::Send);
    let needed = buffer_for_burst(window);
    if (recv as u64) < needed {
        tracing::warn!(
            receive_buffer = recv,
            needed,
            "UDP receive buffer smaller than one initial-window burst: datagrams of a fresh \
             connection may be dropped; raise it with `sysctl -w net.core.rmem_max={SOCKET_BUFFER}`"
        );
    } else {
        tracing::debug!(receive_buffer = recv, "UDP socket buffers");
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

#[derive(Clone, Copy)]
enum Buffer {
    Receive,
    Send,
}

/// Ask for [`SOCKET_BUFFER`] bytes (the kernel caps it at `net.core.rmem_max` or
/// `wmem_max`): the buffer's size afterwards, as the kernel reports it (doubled for its
/// bookkeeping), 0 if unknown.
fn grow_buffer(socket: &socket2::Socket, which: Buffer) -> usize {
    let size = match which {
        Buffer::Receive => {
            let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
            socket.recv_buffer_size()
        }
        Buffer::Send => {
            let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
            socket.send_buffer_size()
        }
    };
    size.unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A default initial window's worth of 1200-byte datagrams, sent at once to an endpoint's
    /// socket that has not read yet, is all there when it reads (Linux's default buffer holds
    /// about 90 of them; the kernel's default cap on a larger request still allows this).
    #[test]
    fn an_endpoint_socket_holds_a_whole_initial_window_burst() {
        let window = TransportProfile::default().bounded_initial_window();
        let rx = udp_socket("127.0.0.1:0".parse().unwrap(), window).unwrap();
        rx.set_nonblocking(false).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let n = window.div_ceil(1_200) as usize;
        let datagram = [7u8; 1_200];
        for _ in 0..n {
            tx.send_to(&datagram, rx.local_addr().unwrap()).unwrap();
        }
        // Everything sent is queued on the receiver before the first read; then a marker.
        tx.send_to(b"end", rx.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 2_048];
        let mut got = 0;
        loop {
            let len = rx.recv(&mut buf).expect("the marker arrives");
            if &buf[..len] == b"end" {
                break;
            }
            got += 1;
        }
        assert_eq!(got, n, "datagrams of a {window}-byte burst that arrived");
    }

    #[test]
    fn a_burst_needs_about_twice_its_bytes_of_buffer() {
        assert_eq!(buffer_for_burst(1_200), 2_304);
        assert_eq!(buffer_for_burst(1_201), 4_608);
        assert!(buffer_for_burst(192 << 10) < 2 * 212_992);
    }
}
