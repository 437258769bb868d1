//! Hosts behind a NAT router, for the peer layer's tests: the kernel's own NAT (nftables
//! masquerade), in network namespaces made and removed by the test.
//!
//! ```text
//!  test process (the "internet": coordinator, relay, SDK)
//!     │ host_ip            veth
//!     └──────────────── wan_ip [router ns: nft masquerade] lan 192.168.N.1
//!                                                      │ veth
//!                                     192.168.N.2 [host ns: the node]
//! ```
//!
//! The host behind the router reaches the test's side through the masquerade; nothing on the
//! test's side has a route to the private network, so the host is reachable only through
//! connections it opened (a relay circuit, or a hole punch).
//!
//! The test's namespace is the "internet" between routers: each router's default route points
//! at it, and it forwards between the routers' WAN links (forwarding is switched on for those
//! two interfaces only, not host-wide). A caller behind a second router runs in a thread that
//! entered that router's host namespace ([`NsClient`]).

use crate::{ip, NetNs};
use anyhow::Context;

/// How the router maps ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// `masquerade`: the source port is kept where it can be (endpoint-independent mapping,
    /// "cone"): hole punching works.
    Cone,
    /// `masquerade fully-random`: a new random port per destination ("symmetric"): hole
    /// punching fails, calls stay relayed.
    Symmetric,
}

/// A NAT router (a namespace joined to this one) and one host behind it.
pub struct NatHost {
    /// The router; `router.host_ip` is this side's address on its WAN link.
    pub router: NetNs,
    /// The host's namespace (`ip netns exec NAME ...`).
    pub name: String,
    /// The host's private address.
    pub ip: std::net::Ipv4Addr,
}

pub(crate) fn nft(ns: &str, script: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            if let Some(mut stdin) = c.stdin.take() {
                stdin.write_all(script.as_bytes())?;
            }
            c.wait_with_output()
        })
        .context("running nft (nftables)")?;
    anyhow::ensure!(
        out.status.success(),
        "nft in {ns}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Join host namespace `host` to router namespace `router` by a veth pair (`router_if` stays in
/// the router, up, for the caller to address or bridge; `host_if` goes to the host with
/// `host_cidr`), the host's loopback up and its default route via `gateway`.
pub(crate) fn attach_host(
    router: &str,
    host: &str,
    router_if: &str,
    host_if: &str,
    host_cidr: &str,
    gateway: &str,
) -> anyhow::Result<()> {
    ip(&[
        "-n", router, "link", "add", router_if, "type", "veth", "peer", "name", host_if,
    ])?;
    ip(&["-n", router, "link", "set", host_if, "netns", host])?;
    ip(&["-n", router, "link", "set", router_if, "up"])?;
    ip(&["-n", host, "addr", "add", host_cidr, "dev", host_if])?;
    ip(&["-n", host, "link", "set", host_if, "up"])?;
    ip(&["-n", host, "link", "set", "lo", "up"])?;
    ip(&["-n", host, "route", "add", "default", "via", gateway])
}

impl NatHost {
    /// Whether NAT tests can run here: root, iproute2 and nftables (see [`crate::root_tests`]).
    pub fn required() -> bool {
        crate::root_tests("NAT routers", &["nft", "--version"]) && NetNs::required()
    }

    /// Router number `index` (a [`NetNs`] index, 0..64) of `kind`, with one host behind it.
    pub fn create(index: u8, kind: NatKind) -> anyhow::Result<NatHost> {
        let router = NetNs::create(index)?;
        let r = router.name.clone();
        let pid = std::process::id();
        let name = format!("skein-{}x{index}h", pid % 100_000);
        let (lan_r, lan_h) = (
            format!("sk{}x{index}l", pid % 100_000),
            format!("sk{}x{index}p", pid % 100_000),
        );
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let lan = format!("192.168.{}", 100 + index);
        let host = NatHost {
            router,
            name: name.clone(),
            ip: format!("{lan}.2").parse()?,
        };
        attach_host(
            &r,
            &name,
            &lan_r,
            &lan_h,
            &format!("{lan}.2/24"),
            &format!("{lan}.1"),
        )?;
        ip(&[
            "-n",
            &r,
            "addr",
            "add",
            &format!("{lan}.1/24"),
            "dev",
            &lan_r,
        ])?;
        // The router forwards, masquerading the private network behind its WAN address.
        let ok = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &r,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .status()
            .context("sysctl")?
            .success();
        anyhow::ensure!(ok, "enabling forwarding in {r}");
        // The router's WAN side: its default route points at the test's namespace, which
        // forwards between routers on these links only (IPv4 forwarding is per input
        // interface).
        ip(&[
            "-n",
            &r,
            "route",
            "add",
            "default",
            "via",
            &host.router.host_ip.to_string(),
        ])?;
        let ok = std::process::Command::new("sysctl")
            .args([
                "-qw",
                &format!("net.ipv4.conf.{}.forwarding=1", host.router.host_if()),
            ])
            .status()
            .context("sysctl")?
            .success();
        anyhow::ensure!(ok, "enabling forwarding on {}", host.router.host_if());
        // Like a home router's firewall, it drops unsolicited packets from outside addressed
        // to itself (`input`: new connections not from the LAN). That matters for hole
        // punching: without it the kernel records such a packet (the far side's first punch,
        // arriving before this side's own) as a connection, and this side's punch, leaving
        // a moment later towards the same address and port, collides with that entry and is
        // masqueraded to another port, so neither side's packets ever match. On a link with
        // no delay the two punches cannot cross in flight, so without the rule every punch
        // failed (measured: 3 of 3 DCUtR dials timed out; with it, the first succeeds).
        let masq = match kind {
            NatKind::Cone => "masquerade",
            NatKind::Symmetric => "masquerade fully-random",
        };
        nft(
            &r,
            &format!(
                "table ip skein_nat {{\n  chain post {{\n    type nat hook postrouting priority srcnat;\n    ip saddr {lan}.0/24 oifname != \"{lan_r}\" {masq}\n  }}\n  chain input {{\n    type filter hook input priority filter;\n    iifname != \"{lan_r}\" ct state new counter drop\n  }}\n}}\n"
            ),
        )?;
        Ok(host)
    }

    /// Drop UDP forwarded through the router, except to and from `port` on the far side (the
    /// coordinator's control port: the mesh's control plane is QUIC), so the peer layer (relay
    /// and hole punching) must use its TCP fallback. Dropped packets are counted
    /// ([`udp_dropped`](Self::udp_dropped)).
    pub fn block_udp_except(&self, port: u16) -> anyhow::Result<()> {
        nft(
            &self.router.name,
            &format!(
                "table ip skein_block {{\n  chain udp_filter {{\n    type filter hook forward priority filter;\n    udp dport {port} accept\n    udp sport {port} accept\n    meta l4proto udp counter drop\n  }}\n}}\n"
            ),
        )
    }

    /// UDP packets dropped so far by [`block_udp_except`](Self::block_udp_except).
    pub fn udp_dropped(&self) -> anyhow::Result<u64> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.router.name])
            .args(["nft", "list", "table", "ip", "skein_block"])
            .output()
            .context("running nft")?;
        anyhow::ensure!(
            out.status.success(),
            "nft list: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let n = text
            .split("counter packets ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no drop counter in:\n{text}"))?;
        Ok(n)
    }
}

impl Drop for NatHost {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// What an [`NsClient`] is asked to do.
enum Job {
    Infer {
        model: String,
        inputs: Vec<skein_proto::Tensor>,
        reply: tokio::sync::oneshot::Sender<Result<skein_client::InferResult, String>>,
    },
    HolePunches(tokio::sync::oneshot::Sender<(u64, u64)>),
}

/// An SDK [`Client`](skein_client::Client) living in another network namespace (a host behind
/// a NAT router): a thread that entered the namespace (`setns` moves only the calling
/// thread), with a single-threaded runtime, so every socket the client and its peer layer
/// open is in that namespace. Dropping it ends the thread.
pub struct NsClient {
    jobs: Option<tokio::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Move the calling thread into network namespace `name` (`ip netns add NAME`).
#[allow(unsafe_code)]
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{name}");
    let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns(2) with a file descriptor that stays open for the call and a constant
    // namespace type; it changes only this thread's network namespace and touches no memory
    // of this process.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("setns({path})"));
    }
    Ok(())
}

impl NsClient {
    /// Start a client with `profile` (its coordinator address as seen from inside the
    /// namespace) and `config`, in namespace `ns`; returns once it has connected.
    pub async fn start(
        ns: &str,
        profile: skein_client::Profile,
        config: skein_client::ClientConfig,
    ) -> anyhow::Result<NsClient> {
        let (jobs, mut rx) = tokio::sync::mpsc::channel::<Job>(16);
        let (ready_tx, ready) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        let ns = ns.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("client-in-{ns}"))
            .spawn(move || {
                let started = enter_netns(&ns).and_then(|()| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("a runtime")
                });
                let rt = match started {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let client =
                        match skein_client::Client::from_profile_with(&profile, config).await {
                            Ok(c) => c,
                            Err(e) => {
                                let _ = ready_tx.send(Err(anyhow::anyhow!("connecting: {e}")));
                                return;
                            }
                        };
                    let _ = ready_tx.send(Ok(()));
                    while let Some(job) = rx.recv().await {
                        match job {
                            Job::Infer {
                                model,
                                inputs,
                                reply,
                            } => {
                                // Calls run side by side (a benchmark's concurrent callers).
                                let client = client.clone();
                                tokio::spawn(async move {
                                    let r = client.infer(&model, inputs).await;
                                    let _ = reply.send(r.map_err(|e| e.to_string()));
                                });
                            }
                            Job::HolePunches(reply) => {
                                let _ = reply.send(client.hole_punches());
                            }
                        }
                    }
                });
            })
            .context("spawning the client's thread")?;
        let mut c = NsClient {
            jobs: Some(jobs),
            thread: Some(thread),
        };
        match ready.await {
            Ok(Ok(())) => Ok(c),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                c.jobs = None;
                Err(anyhow::anyhow!(
                    "the client's thread ended before it connected"
                ))
            }
        }
    }

    /// `Client::infer` in the namespace.
    pub async fn infer(
        &self,
        model: &str,
        inputs: Vec<skein_proto::Tensor>,
    ) -> anyhow::Result<skein_client::InferResult> {
        self.caller()?.infer(model, inputs).await
    }

    /// A handle that calls through this client from other tasks (concurrent callers); the
    /// client's thread ends once this and every handle are dropped.
    pub fn caller(&self) -> anyhow::Result<NsCaller> {
        let jobs = self.jobs.as_ref().context("the client has stopped")?;
        Ok(NsCaller { jobs: jobs.clone() })
    }

    /// `Client::hole_punches` (tried, made) in the namespace.
    pub async fn hole_punches(&self) -> anyhow::Result<(u64, u64)> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.send(Job::HolePunches(reply)).await?;
        answer.await.context("the client's thread ended")
    }

    async fn send(&self, job: Job) -> anyhow::Result<()> {
        let jobs = self.jobs.as_ref().context("the client has stopped")?;
        jobs.send(job)
            .await
            .map_err(|_| anyhow::anyhow!("the client's thread ended"))
    }
}

/// A handle on an [`NsClient`] ([`NsClient::caller`]).
#[derive(Clone)]
pub struct NsCaller {
    jobs: tokio::sync::mpsc::Sender<Job>,
}

impl NsCaller {
    /// `Client::infer` in the client's namespace; calls from several tasks run side by side.
    pub async fn infer(
        &self,
        model: &str,
        inputs: Vec<skein_proto::Tensor>,
    ) -> anyhow::Result<skein_client::InferResult> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job::Infer {
                model: model.to_string(),
                inputs,
                reply,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the client's thread ended"))?;
        answer
            .await
            .context("the client's thread ended")?
            .map_err(|e| anyhow::anyhow!("{model}: {e}"))
    }
}

impl Drop for NsClient {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop; the client and its runtime go with it.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `GET path` over plain HTTP/1.1 at `addr`, from inside network namespace `ns` (a thread of
/// its own enters it); the response body. Blocking: call it from `spawn_blocking`.
pub fn http_get_in(ns: &str, addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    let ns = ns.to_string();
    let path = path.to_string();
    std::thread::spawn(move || -> anyhow::Result<String> {
        use std::io::{Read, Write};
        enter_netns(&ns)?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr} in {ns}"))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("no HTTP response from {addr}: {text:?}"))?;
        anyhow::ensure!(
            head.starts_with("HTTP/1.1 200"),
            "GET {path} at {addr}: {head}"
        );
        Ok(body.to_string())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the HTTP thread panicked"))?
}
