//! The node's own address as others reach it, when it listens on every interface.

use std::net::{IpAddr, SocketAddr, UdpSocket};

/// The local address this host sends from towards `peer`: the kernel's route choice, read
/// from a UDP socket connected to `peer` (connecting a UDP socket sends nothing). Unlike a
/// QUIC connection's `local_ip()`, which a wildcard socket often leaves empty, this works on
/// every platform and in network namespaces behind a NAT router.
pub fn route_source_ip(peer: SocketAddr) -> std::io::Result<IpAddr> {
    let bind: SocketAddr = if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind)?;
    socket.connect(peer)?;
    let ip = socket.local_addr()?.ip();
    if ip.is_unspecified() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("no route towards {peer}"),
        ));
    }
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_towards_loopback_starts_at_loopback() {
        let ip = route_source_ip("127.0.0.1:9".parse().unwrap()).unwrap();
        assert!(ip.is_loopback(), "{ip}");
    }
}
