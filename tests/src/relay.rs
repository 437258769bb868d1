//! A user-space UDP delay hub: imposes one-way network delays between test hosts.
//!
//! The kernel of the CI machines has no `netem` qdisc, so latency is added in user space. QUIC
//! runs over UDP, so a relay that holds each datagram for a while and passes it on unchanged is
//! transparent to it.
//!
//! # Model
//! Every test host binds its own loopback address (`127.0.0.2`, `127.0.0.3`, …: Linux routes
//! all of `127.0.0.0/8` to `lo` without any set-up) and has a one-way delay to the *hub*. A
//! datagram from host A to host B waits `delay(A) + delay(B)`, so RTT(A, B) = 2 (dA + dB): the
//! star topology of a WAN where every site has its own access link. Hosts reach each other only
//! through the hub's ports: [`Hub::port`] opens a front socket on the hub's address that relays
//! to one target (a node's or the coordinator's real address), and the target advertises that
//! front address. The hub tells senders apart by their source IP, which is why each host needs
//! its own address; unknown sources (e.g. `127.0.0.1`) have delay 0, i.e. sit at the hub.
//!
//! # Bounds
//! At most [`MAX_FLOWS`] flows per port (idle ones are evicted first), at most [`MAX_QUEUED`]
//! datagrams waiting per direction of a flow (more are dropped, as a congested link would),
//! datagrams up to 64 KiB.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Flows (distinct sources) relayed per port.
pub const MAX_FLOWS: usize = 256;
/// Datagrams waiting per direction of a flow.
pub const MAX_QUEUED: usize = 4096;
/// A flow with no traffic for this long may be evicted when the port is full.
const IDLE: Duration = Duration::from_secs(30);

#[derive(Default)]
struct HostState {
    delay: Duration,
    down: bool,
}

#[derive(Default)]
struct Net {
    hosts: Mutex<HashMap<IpAddr, HostState>>,
    dropped: AtomicU64,
    forwarded: AtomicU64,
}

impl Net {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, HostState>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The delay from `a` to `b`, or `None` when either host is down.
    fn path(&self, a: IpAddr, b: IpAddr) -> Option<Duration> {
        let hosts = self.lock();
        let get = |ip| {
            hosts
                .get(&ip)
                .map_or((Duration::ZERO, false), |h| (h.delay, h.down))
        };
        let (da, down_a) = get(a);
        let (db, down_b) = get(b);
        (!down_a && !down_b).then_some(da + db)
    }
}

/// The hub. Dropping it stops every port.
pub struct Hub {
    ip: IpAddr,
    net: Arc<Net>,
    ports: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        for t in self.ports.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            t.abort();
        }
    }
}

/// A front socket on the hub that relays to one target.
#[derive(Debug, Clone)]
pub struct Port {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
}

impl Port {
    /// Where hosts send to reach the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Set (or change) where datagrams go. Until set, they are dropped.
    pub fn set_target(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(target);
    }
}

impl Hub {
    /// A hub on `ip` (e.g. `127.0.0.100`).
    pub fn new(ip: IpAddr) -> Hub {
        Hub {
            ip,
            net: Arc::new(Net::default()),
            ports: Mutex::new(Vec::new()),
        }
    }

    /// Set the one-way delay between `host` and the hub.
    pub fn set_delay(&self, host: IpAddr, one_way: Duration) {
        self.net.lock().entry(host).or_default().delay = one_way;
    }

    /// Cut `host` off (every datagram to or from it is dropped) or bring it back.
    pub fn set_down(&self, host: IpAddr, down: bool) {
        self.net.lock().entry(host).or_default().down = down;
    }

    /// Datagrams relayed and dropped so far, all ports together.
    pub fn counters(&self) -> (u64, u64) {
        (
            self.net.forwarded.load(Ordering::Relaxed),
            self.net.dropped.load(Ordering::Relaxed),
        )
    }

    /// Open a front port relaying to `target` (or to a target set later with
    /// [`Port::set_target`]).
    pub async fn port(&self, target: Option<SocketAddr>) -> io::Result<Port> {
        let front = Arc::new(bind(SocketAddr::new(self.ip, 0))?);
        let port = Port {
            addr: front.local_addr()?,
            target: Arc::new(Mutex::new(target)),
        };
        let task = tokio::spawn(front_loop(
            front,
            self.ip,
            port.target.clone(),
            self.net.clone(),
        ));
        self.ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
        Ok(port)
    }
}

/// A hub socket with the buffers of a mesh endpoint (`skein_net::endpoint::udp_socket`): the
/// link, not the kernel's socket buffer, decides what is queued or dropped.
fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let window = skein_net::TransportProfile::default().bounded_initial_window();
    let socket = skein_net::endpoint::udp_socket(addr, window).map_err(io::Error::other)?;
    UdpSocket::from_std(socket)
}

/// Aborts its tasks when dropped.
struct Flow {
    target: SocketAddr,
    to_target: mpsc::Sender<(Instant, Vec<u8>)>,
    last_seen: Arc<AtomicU64>,
    tasks: [JoinHandle<()>; 3],
}

impl Drop for Flow {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn front_loop(
    front: Arc<UdpSocket>,
    hub_ip: IpAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    net: Arc<Net>,
) {
    let epoch = Instant::now();
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, src)) = front.recv_from(&mut buf).await else {
            continue;
        };
        let Some(dst) = *target.lock().unwrap_or_else(|p| p.into_inner()) else {
            net.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let now_ms = epoch.elapsed().as_millis() as u64;
        if flows.get(&src).is_some_and(|f| f.target != dst) {
            flows.remove(&src);
        }
        if !flows.contains_key(&src) {
            if flows.len() >= MAX_FLOWS {
                let idle_ms = IDLE.as_millis() as u64;
                flows.retain(|_, f| {
                    now_ms.saturating_sub(f.last_seen.load(Ordering::Relaxed)) < idle_ms
                });
            }
            if flows.len() >= MAX_FLOWS {
                net.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match open_flow(&front, hub_ip, src, dst, &net, epoch).await {
                Ok(f) => {
                    flows.insert(src, f);
                }
                Err(e) => {
                    eprintln!("relay: cannot open a flow {src} -> {dst}: {e}");
                    net.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        }
        let Some(flow) = flows.get(&src) else {
            continue;
        };
        flow.last_seen.store(now_ms, Ordering::Relaxed);
        let Some(delay) = net.path(src.ip(), dst.ip()) else {
            net.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        if flow
            .to_target
            .try_send((Instant::now() + delay, buf[..n].to_vec()))
            .is_err()
        {
            net.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn open_flow(
    front: &Arc<UdpSocket>,
    hub_ip: IpAddr,
    src: SocketAddr,
    dst: SocketAddr,
    net: &Arc<Net>,
    epoch: Instant,
) -> io::Result<Flow> {
    let upstream = Arc::new(bind(SocketAddr::new(hub_ip, 0))?);
    upstream.connect(dst).await?;
    let last_seen = Arc::new(AtomicU64::new(0));
    let (to_target, rx_target) = mpsc::channel(MAX_QUEUED);
    let (to_source, rx_source) = mpsc::channel(MAX_QUEUED);
    let send_up = {
        let upstream = upstream.clone();
        let net = net.clone();
        tokio::spawn(delayed_sender(rx_target, net, move |bytes| {
            let upstream = upstream.clone();
            async move { upstream.send(&bytes).await.map(|_| ()) }
        }))
    };
    let send_back = {
        let front = front.clone();
        let net = net.clone();
        tokio::spawn(delayed_sender(rx_source, net, move |bytes| {
            let front = front.clone();
            async move { front.send_to(&bytes, src).await.map(|_| ()) }
        }))
    };
    let recv_up = {
        let net = net.clone();
        let last_seen = last_seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok(n) = upstream.recv(&mut buf).await else {
                    // e.g. ICMP port unreachable while the target restarts: keep listening.
                    continue;
                };
                last_seen.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                let Some(delay) = net.path(dst.ip(), src.ip()) else {
                    net.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if to_source
                    .try_send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    net.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    Ok(Flow {
        target: dst,
        to_target,
        last_seen,
        tasks: [send_up, send_back, recv_up],
    })
}

/// Send each queued datagram once its time has come, in order.
async fn delayed_sender<F, Fut>(mut rx: mpsc::Receiver<(Instant, Vec<u8>)>, net: Arc<Net>, send: F)
where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = io::Result<()>>,
{
    while let Some((due, bytes)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        match send(bytes).await {
            Ok(()) => net.forwarded.fetch_add(1, Ordering::Relaxed),
            Err(_) => net.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo(ip: &str) -> SocketAddr {
        let s = UdpSocket::bind((ip, 0)).await.expect("bind echo");
        let addr = s.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    /// Wait (bounded) until the hub has dropped `n` datagrams.
    async fn dropped(hub: &Hub, n: u64) {
        let until = Instant::now() + Duration::from_secs(5);
        while hub.counters().1 < n {
            assert!(Instant::now() < until, "datagram not dropped");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn round_trip_through_the_hub_takes_both_hosts_delays_twice() {
        let hub = Hub::new("127.0.0.100".parse().expect("ip"));
        let target = echo("127.0.0.2").await;
        hub.set_delay("127.0.0.2".parse().expect("ip"), Duration::from_millis(15));
        hub.set_delay("127.0.0.3".parse().expect("ip"), Duration::from_millis(5));
        let port = hub.port(Some(target)).await.expect("port");
        let client = UdpSocket::bind("127.0.0.3:0").await.expect("bind client");
        for i in 0..3u8 {
            let t0 = Instant::now();
            client.send_to(&[i; 100], port.addr()).await.expect("send");
            let mut buf = [0u8; 200];
            let (n, from) = client.recv_from(&mut buf).await.expect("recv");
            let rtt = t0.elapsed();
            assert_eq!((n, buf[0], from), (100, i, port.addr()));
            // 2 × (15 + 5) ms; a timer may fire late, never early.
            assert!(rtt >= Duration::from_millis(40), "rtt {rtt:?}");
            assert!(rtt < Duration::from_secs(2), "rtt {rtt:?}");
        }
        assert!(hub.counters().0 >= 6);
    }

    #[tokio::test]
    async fn a_host_that_is_down_gets_nothing_and_unknown_sources_sit_at_the_hub() {
        let hub = Hub::new("127.0.0.100".parse().expect("ip"));
        let target = echo("127.0.0.4").await;
        let port = hub.port(None).await.expect("port");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
        // No target yet: dropped.
        client.send_to(b"x", port.addr()).await.expect("send");
        dropped(&hub, 1).await;
        port.set_target(target);
        hub.set_down("127.0.0.4".parse().expect("ip"), true);
        client.send_to(b"y", port.addr()).await.expect("send");
        dropped(&hub, 2).await;
        hub.set_down("127.0.0.4".parse().expect("ip"), false);
        let t0 = Instant::now();
        client.send_to(b"z", port.addr()).await.expect("send");
        let mut buf = [0u8; 8];
        let (n, _) = client.recv_from(&mut buf).await.expect("recv");
        assert_eq!(&buf[..n], b"z", "x and y were dropped");
        assert!(t0.elapsed() < Duration::from_secs(1), "no delay configured");
        assert_eq!(hub.counters().1, 2);
    }
}
