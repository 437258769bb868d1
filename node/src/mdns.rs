//! The HTTP ingress made findable on the LAN: a DNS-SD service `_skein-v2._tcp` over multicast
//! DNS (RFC 6762/6763), with the pure-Rust `mdns-sd` responder (its own thread, no system
//! daemon; one [`Responder`] per node, which also publishes and browses LAN discovery's
//! `_skein-peer._udp`, see skein-client's `lan`). Instance name: the node id; TXT: `node` (the id), `api=v2`, `path=/v2`. An app finds
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

/// The node's one mDNS responder (the `mdns-sd` daemon, a thread of its own): every record
/// the node publishes (`_skein-v2._tcp` for the HTTP ingress, `_skein-peer._udp` for LAN
/// discovery) and the LAN browse go through it.
pub struct Responder {
    daemon: ServiceDaemon,
    registered: std::sync::Mutex<Vec<String>>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("registered", &self.registered)
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// Start the responder.
    pub fn start() -> Result<Responder, mdns_sd::Error> {
        Ok(Responder {
            daemon: ServiceDaemon::new()?,
            registered: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The daemon (to browse with).
    pub fn daemon(&self) -> &ServiceDaemon {
        &self.daemon
    }

    /// Publish `info`; returns its full name.
    pub fn register(&self, info: ServiceInfo) -> Result<String, mdns_sd::Error> {
        let fullname = info.get_fullname().to_string();
        self.daemon.register(info)?;
        self.registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(fullname.clone());
        Ok(fullname)
    }

    /// Withdraw every record (goodbye packets) and stop the daemon.
    pub async fn shutdown(self) {
        let names = std::mem::take(&mut *self.registered.lock().unwrap_or_else(|p| p.into_inner()));
        let daemon = self.daemon;
        let _ = tokio::task::spawn_blocking(move || {
            for name in names {
                if let Ok(rx) = daemon.unregister(&name) {
                    let _ = rx.recv_timeout(Duration::from_secs(1));
                }
            }
            if let Ok(rx) = daemon.shutdown() {
                let _ = rx.recv_timeout(Duration::from_secs(1));
            }
        })
        .await;
    }
}

/// Advertise the ingress until `cancel`, then withdraw it (a goodbye packet) and stop the
/// responder. Failing to advertise is logged, never fatal: the ingress serves regardless.
pub async fn advertise(node_id: String, listen: SocketAddr, cancel: CancellationToken) {
    let responder = match Responder::start() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "mDNS: cannot start the responder; the ingress is not advertised");
            return;
        }
    };
    advertise_ingress(&responder, &node_id, listen);
    cancel.cancelled().await;
    responder.shutdown().await;
}

/// Publish the ingress's record on `responder` (logged, never fatal).
pub fn advertise_ingress(responder: &Responder, node_id: &str, listen: SocketAddr) {
    match service_info(node_id, listen).and_then(|i| responder.register(i)) {
        Ok(service) => tracing::info!(%service, %listen, "HTTP ingress advertised over mDNS"),
        Err(e) => {
            tracing::warn!(error = %e, "mDNS: cannot register; the ingress is not advertised")
        }
    }
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
