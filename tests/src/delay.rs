//! A delay on a network namespace's link, for benchmarks over a "far" network: the kernel has
//! no `netem` (and no `fq`, so no delay by departure time either), so packets are held in
//! user space. Every IPv4 packet that enters or leaves namespace `ns` through interface `dev`
//! is queued to this process through netfilter's queue (`NFQUEUE`, iptables-legacy's `mangle`
//! table: `PREROUTING -i dev` and `POSTROUTING -o dev`), and let through after the delay.
//!
//! Unlike a UDP relay in front of a host, the delay is transparent: addresses, ports and the
//! NAT routers' mappings are those of the real path, so hole punching sees what it would see
//! across a real WAN. Packets keep their order (one delay for all, let through in arrival
//! order). The kernel bounds the queue (`MAX_QUEUED` packets; past it a packet is dropped, as
//! a congested link would); the rules say `--queue-bypass`, so nothing is held once the line
//! is dropped.
//!
//! Needs root and `iptables-legacy` (Debian's `iptables` package); the kernel's
//! `nfnetlink_queue` and the legacy `mangle` table.

// A thread of its own, no async: the clock is the real one.
#![allow(clippy::disallowed_types)]

use anyhow::Context;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Packets the kernel holds for the line at most (`NFQA_CFG_QUEUE_MAXLEN`).
const MAX_QUEUED: u32 = 8192;
/// The queue socket's receive buffer, bytes.
const SOCKET_BUFFER: libc::c_int = 16 << 20;

/// A delay on one link; removed (rules and thread) on drop.
pub struct DelayLine {
    ns: String,
    rules: Vec<Vec<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<u64>>>,
}

/// Whether delay lines can be made here: root, iptables-legacy (see [`crate::root_tests`]).
pub fn required() -> bool {
    crate::root_tests("delay lines", &["iptables-legacy", "--version"])
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    anyhow::ensure!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl DelayLine {
    /// Delay every packet crossing interface `dev` of namespace `ns`, in each direction, by
    /// `delay`; returns once the queue is bound and the rules are in place.
    pub fn start(ns: &str, dev: &str, delay: Duration) -> anyhow::Result<DelayLine> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::sync_channel::<anyhow::Result<()>>(1);
        let thread = {
            let (ns, stop) = (ns.to_string(), stop.clone());
            std::thread::Builder::new()
                .name(format!("delay-{ns}"))
                .spawn(move || -> anyhow::Result<u64> {
                    let queue = crate::nat::enter_netns(&ns).and_then(|()| Queue::bind(0));
                    let queue = match queue {
                        Ok(q) => {
                            let _ = ready_tx.send(Ok(()));
                            q
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(0);
                        }
                    };
                    queue.serve(delay, &stop)
                })
                .context("spawning the delay thread")?
        };
        let mut line = DelayLine {
            ns: ns.to_string(),
            rules: Vec::new(),
            stop,
            thread: Some(thread),
        };
        ready
            .recv()
            .context("the delay thread ended before it bound its queue")??;
        for (chain, dir) in [("PREROUTING", "-i"), ("POSTROUTING", "-o")] {
            let rule: Vec<String> = [
                "-t",
                "mangle",
                "-A",
                chain,
                dir,
                dev,
                "-j",
                "NFQUEUE",
                "--queue-num",
                "0",
                "--queue-bypass",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut args = vec!["ip", "netns", "exec", ns, "iptables-legacy"];
            args.extend(rule.iter().map(String::as_str));
            run(&args)?;
            line.rules.push(rule);
        }
        Ok(line)
    }

    /// Stop: remove the rules, end the thread; the packets it let through.
    pub fn finish(mut self) -> anyhow::Result<u64> {
        self.stop_now()
    }

    /// Packets the kernel dropped instead of queueing them to the line so far (the queue
    /// full, or its socket): from `/proc/net/netfilter/nfnetlink_queue` in the namespace.
    pub fn dropped(&self) -> anyhow::Result<u64> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "cat"])
            .arg("/proc/net/netfilter/nfnetlink_queue")
            .output()
            .context("reading nfnetlink_queue")?;
        // queue, portid, queued, copy mode, copy range, queue dropped, user dropped, ...
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some("0"))
            .with_context(|| format!("no queue 0 in {text:?}"))?;
        let f: Vec<u64> = line
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        anyhow::ensure!(f.len() >= 7, "nfnetlink_queue line {line:?}");
        Ok(f[5] + f[6])
    }

    fn stop_now(&mut self) -> anyhow::Result<u64> {
        for rule in std::mem::take(&mut self.rules) {
            let mut args = vec!["ip", "netns", "exec", &self.ns, "iptables-legacy"];
            args.extend(
                rule.iter()
                    .map(|s| if s == "-A" { "-D" } else { s.as_str() }),
            );
            let _ = run(&args);
        }
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the delay thread panicked"))?,
            None => Ok(0),
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        let _ = self.stop_now();
    }
}

// nfnetlink_queue (linux/netfilter/nfnetlink_queue.h), in the wire's byte orders.
const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NF_ACCEPT: u32 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;

/// A bound netlink queue socket.
struct Queue {
    fd: std::os::fd::OwnedFd,
    num: u16,
    seq: u32,
}

/// Append a netlink attribute (padded to 4 bytes).
fn attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

impl Queue {
    #[allow(unsafe_code)]
    fn bind(num: u16) -> anyhow::Result<Queue> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: socket(2) with constant arguments; the descriptor is owned from here on.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_NETFILTER) };
        anyhow::ensure!(
            fd >= 0,
            "netlink socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just opened and is not owned elsewhere.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // Room for a burst of queued-packet messages (about 200 bytes each): when the socket is
        // full the kernel drops the packet (counted, see `DelayLine::finish`), which a
        // benchmark would read as loss on the link. Root may exceed `rmem_max`.
        let size: libc::c_int = SOCKET_BUFFER;
        // SAFETY: setsockopt(2) with a pointer to an int that lives for the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        anyhow::ensure!(
            rc == 0,
            "netlink socket buffer: {}",
            std::io::Error::last_os_error()
        );
        let mut q = Queue { fd, num, seq: 0 };
        let mut cmd = Vec::new();
        attr(
            &mut cmd,
            NFQA_CFG_CMD,
            &[NFQNL_CFG_CMD_BIND, 0, 0, libc::AF_INET as u8],
        );
        q.request(NFQNL_MSG_CONFIG, libc::AF_INET as u8, &cmd)
            .context("binding netfilter queue 0 (is another process bound to it?)")?;
        let mut params = Vec::new();
        let mut p = 0u32.to_be_bytes().to_vec(); // copy_range: nothing of the payload
        p.push(NFQNL_COPY_META);
        attr(&mut params, NFQA_CFG_PARAMS, &p);
        attr(
            &mut params,
            NFQA_CFG_QUEUE_MAXLEN,
            &MAX_QUEUED.to_be_bytes(),
        );
        q.request(NFQNL_MSG_CONFIG, libc::AF_UNSPEC as u8, &params)
            .context("configuring the netfilter queue")?;
        Ok(q)
    }

    /// Send an nfnetlink message of `kind` with `attrs`; with `ack`, wait for the answer.
    fn send(&mut self, kind: u16, family: u8, attrs: &[u8], ack: bool) -> anyhow::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let len = 16 + 4 + attrs.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
        let flags = NLM_F_REQUEST | if ack { NLM_F_ACK } else { 0 };
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[family, 0]);
        m.extend_from_slice(&self.num.to_be_bytes());
        m.extend_from_slice(attrs);
        use std::os::fd::AsRawFd;
        // SAFETY: send(2) of a buffer that lives for the call, on an open socket.
        #[allow(unsafe_code)]
        let n = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                m.as_ptr().cast(),
                m.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        anyhow::ensure!(
            n == m.len() as isize,
            "netlink send: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// A configuration request, acknowledged.
    fn request(&mut self, kind: u16, family: u8, attrs: &[u8]) -> anyhow::Result<()> {
        self.send(kind, family, attrs, true)?;
        let mut buf = vec![0u8; 8192];
        let n = self.recv(&mut buf, Some(Duration::from_secs(5)))?;
        anyhow::ensure!(n >= 20, "no netlink acknowledgement");
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        anyhow::ensure!(kind == NLMSG_ERROR, "unexpected netlink answer {kind}");
        let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        anyhow::ensure!(
            code == 0,
            "netlink: {}",
            std::io::Error::from_raw_os_error(-code)
        );
        Ok(())
    }

    /// Receive one datagram, waiting at most `wait` (`None`: not at all); 0 when none came.
    #[allow(unsafe_code)]
    fn recv(&self, buf: &mut [u8], wait: Option<Duration>) -> anyhow::Result<usize> {
        use std::os::fd::AsRawFd;
        let fd = self.fd.as_raw_fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let wait = wait.unwrap_or_default();
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: ppoll(2) on one pollfd that lives for the call, no signal mask.
        let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            anyhow::ensure!(e.kind() == std::io::ErrorKind::Interrupted, "ppoll: {e}");
            return Ok(0);
        }
        if r == 0 {
            return Ok(0);
        }
        // SAFETY: recv(2) into a buffer of the length given, which lives for the call.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // ENOBUFS: the kernel dropped notifications (we fell behind); carry on.
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                return Ok(0);
            }
            anyhow::bail!("netlink recv: {e}");
        }
        Ok(n as usize)
    }

    /// Let packet `id` through.
    fn accept(&mut self, id: u32) -> anyhow::Result<()> {
        let mut v = Vec::new();
        let mut hdr = NF_ACCEPT.to_be_bytes().to_vec();
        hdr.extend_from_slice(&id.to_be_bytes());
        attr(&mut v, NFQA_VERDICT_HDR, &hdr);
        self.send(NFQNL_MSG_VERDICT, libc::AF_UNSPEC as u8, &v, false)
    }

    /// Let each packet through `delay` after it was queued, until `stop`; the packets let
    /// through.
    fn serve(mut self, delay: Duration, stop: &AtomicBool) -> anyhow::Result<u64> {
        let mut held: VecDeque<(Instant, u32)> = VecDeque::new();
        let mut buf = vec![0u8; 65536];
        let mut passed = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            while let Some(&(due, id)) = held.front() {
                if due > now {
                    break;
                }
                held.pop_front();
                self.accept(id)?;
                passed += 1;
            }
            let wait = held.front().map_or(Duration::from_millis(50), |&(due, _)| {
                due.saturating_duration_since(Instant::now())
            });
            let n = self.recv(&mut buf, Some(wait))?;
            let arrived = Instant::now();
            let mut at = 0usize;
            while at + 16 <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into()?) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if len < 16 || at + len > n {
                    break;
                }
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                    if let Some(id) = packet_id(&buf[at + 20..at + len]) {
                        held.push_back((arrived + delay, id));
                    }
                }
                at += len.next_multiple_of(4);
            }
        }
        // Whatever is still held goes through now.
        for (_, id) in held {
            self.accept(id)?;
            passed += 1;
        }
        Ok(passed)
    }
}

/// The packet id in a queued packet's attributes.
fn packet_id(mut attrs: &[u8]) -> Option<u32> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NFQA_PACKET_HDR && len >= 8 {
            return Some(u32::from_be_bytes(attrs[4..8].try_into().ok()?));
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    None
}
