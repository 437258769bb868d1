//! The HTTP ingress made findable on the LAN: a DNS-SD service `_skein-v2._tcp` over multicast
//! DNS (RFC 6762/6763), with the pure-Rust `mdns-sd` responder (its own thread, no system
//! daemon). Instance name: the node id; TXT: `node` (the id), `api=v2`, `path=/v2`. An app finds
//! the nearest nodes with any DNS-SD browser (`avahi-browse -r _skein-v2._tcp`, `dns-sd -B
//! _skein-v2._tcp`, python-zeroconf). Off with `[http] mdns = false` or `--no-mdns`.

use mdns_sd::{ServiceDaemon, ServiceInfo};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The DNS-SD service type of a node's V2 HTTP ingress.
pub const SERVICE_TYPE: &str = "_skein-v2._tcp.local.";

/// The DNS-SD record of node `node_id`'s ingress listening on `listen`: its own addresses when
/// `listen` is a wildcard (kept up to date by the responder), else `listen`'s address.
pub fn service_info(node_id: &str, listen: SocketAddr) -> Result<ServiceInfo, mdns_sd::Error> {
    let short: String = node_id.chars().take(12).collect();
    let host = format!("skein-{short}.local.");
    let props = [("node", node_id), ("api", "v2"), ("path", "/v2")];
    if listen.ip().is_unspecified() {
        Ok(
            ServiceInfo::new(SERVICE_TYPE, node_id, &host, "", listen.port(), &props[..])?
                .enable_addr_auto(),
        )
    } else {
        let ip: IpAddr = listen.ip();
        ServiceInfo::new(SERVICE_TYPE, node_id, &host, ip, listen.port(), &props[..])
    }
}

/// Advertise the ingress until `cancel`, then withdraw it (a goodbye packet) and stop the
/// responder. Failing to advertise is logged, never fatal: the ingress serves regardless.
pub async fn advertise(node_id: String, listen: SocketAddr, cancel: CancellationToken) {
    let daemon = match ServiceDaemon::new() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "mDNS: cannot start the responder; the ingress is not advertised");
            return;
        }
    };
    let info = match service_info(&node_id, listen) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "mDNS: bad service record; the ingress is not advertised");
            let _ = daemon.shutdown();
            return;
        }
    };
    let fullname = info.get_fullname().to_string();
    if let Err(e) = daemon.register(info) {
        tracing::warn!(error = %e, "mDNS: cannot register; the ingress is not advertised");
        let _ = daemon.shutdown();
        return;
    }
    tracing::info!(service = %fullname, %listen, "HTTP ingress advertised over mDNS");
    cancel.cancelled().await;
    let withdrawn = daemon.unregister(&fullname);
    let _ = tokio::task::spawn_blocking(move || {
        if let Ok(rx) = withdrawn {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
        if let Ok(rx) = daemon.shutdown() {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
    })
    .await;
}

/// A node ingress found on the LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The node's id (its instance name and TXT `node`).
    pub node_id: String,
    /// The ingress's addresses.
    pub addrs: Vec<IpAddr>,
    /// The ingress's port.
    pub port: u16,
}

/// Browse the LAN for node ingresses for at most `timeout`, returning once `enough` are
/// found (blocking: run it off the async threads). For tools and tests; apps use any DNS-SD
/// browser.
// Blocking code on a thread of its own (the mDNS responder's channel): the wall clock.
#[allow(clippy::disallowed_types)]
pub fn browse(timeout: Duration, enough: usize) -> Result<Vec<Found>, mdns_sd::Error> {
    let daemon = ServiceDaemon::new()?;
    let events = daemon.browse(SERVICE_TYPE)?;
    let until = std::time::Instant::now() + timeout;
    let mut found: Vec<Found> = Vec::new();
    while found.len() < enough {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let Ok(event) = events.recv_timeout(left) else {
            break;
        };
        if let mdns_sd::ServiceEvent::ServiceResolved(s) = event {
            let node_id = s
                .get_property_val_str("node")
                .unwrap_or_default()
                .to_string();
            if found.iter().any(|f| f.node_id == node_id) {
                continue;
            }
            let mut addrs: Vec<IpAddr> = s.get_addresses().iter().map(|a| a.to_ip_addr()).collect();
            addrs.sort();
            found.push(Found {
                node_id,
                addrs,
                port: s.get_port(),
            });
        }
    }
    let _ = daemon.stop_browse(SERVICE_TYPE);
    if let Ok(rx) = daemon.shutdown() {
        let _ = rx.recv_timeout(Duration::from_secs(1));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_names_the_node_its_port_and_the_api() {
        let id = "9c1f0d3a5b7e4c2f8a6d1e0b3c5a7f9e";
        let info = service_info(id, "192.168.1.20:8080".parse().unwrap()).unwrap();
        assert_eq!(info.get_type(), SERVICE_TYPE);
        assert_eq!(info.get_fullname(), format!("{id}.{SERVICE_TYPE}"));
        assert_eq!(info.get_port(), 8080);
        assert_eq!(info.get_hostname(), "skein-9c1f0d3a5b7e.local.");
        assert_eq!(info.get_property_val_str("node"), Some(id));
        assert_eq!(info.get_property_val_str("api"), Some("v2"));
        let ip: std::net::Ipv4Addr = "192.168.1.20".parse().unwrap();
        assert!(info.get_addresses_v4().contains(&&ip));
        // A wildcard listen address: the responder fills in the host's addresses.
        let auto = service_info(id, "0.0.0.0:8080".parse().unwrap()).unwrap();
        assert!(auto.is_addr_auto());
        assert!(auto.get_addresses().is_empty());
    }
}
