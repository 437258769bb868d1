//! An edge site, for the peer-to-peer artifact and offline tests: hosts on one LAN (a bridge)
//! behind the site's router, whose uplink to the test's side (the coordinator: "the cloud") is
//! thin — shaped with the kernel's token bucket filter (`tc ... tbf`; the kernel has no netem)
//! — and can be cut.
//!
//! ```text
//!  test process (coordinator)
//!     │ router.host_ip   veth, tbf RATE each way
//!     └──────────────── router.ns_ip [router ns: nft masquerade, bridge 192.168.N.1/24]
//!                                        │ veth     │ veth     │ veth
//!                               192.168.N.2      .3         .4 ...  (a namespace each)
//! ```
//!
//! Hosts reach the coordinator through the router's masquerade (a site behind one public
//! address, as most are); they reach each other directly on the bridge, at LAN speed.

use crate::nat::{attach_host, nft};
use crate::{ip, NetNs};
use anyhow::Context;

/// One host of the site.
#[derive(Debug, Clone)]
pub struct SiteHost {
    /// Its namespace (`ip netns exec NAME ...`).
    pub name: String,
    /// Its LAN address.
    pub ip: std::net::Ipv4Addr,
}

/// A site: the router (a [`NetNs`] joined to the test's namespace: the uplink) and its hosts.
pub struct Site {
    /// The router; `router.host_ip` is the test side's address on the uplink.
    pub router: NetNs,
    /// The hosts on the LAN, in order.
    pub hosts: Vec<SiteHost>,
}

fn tc(ns: Option<&str>, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, "tc"]);
            c
        }
        None => std::process::Command::new("tc"),
    };
    let out = cmd.args(args).output().context("running tc (iproute2)")?;
    anyhow::ensure!(
        out.status.success(),
        "tc {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn sysctl_in(ns: &str, setting: &str) -> anyhow::Result<()> {
    let ok = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw", setting])
        .status()
        .context("sysctl")?
        .success();
    anyhow::ensure!(ok, "sysctl {setting} in {ns}");
    Ok(())
}

impl Site {
    /// Whether site tests can run here: root, iproute2 (`tc`) and nftables.
    pub fn required() -> bool {
        crate::nat::NatHost::required()
            && crate::root_tests("shaped links", &["tc", "qdisc", "show"])
    }

    /// Site number `index` (a [`NetNs`] index, 0..64; LAN `192.168.(150 + index).0/24`) with
    /// `hosts` hosts (at most 200), its uplink not shaped yet.
    pub fn create(index: u8, hosts: usize) -> anyhow::Result<Site> {
        anyhow::ensure!(hosts <= 200, "{hosts} hosts on one site");
        anyhow::ensure!(index < 64, "site index {index} out of range");
        let router = NetNs::create(index)?;
        let r = router.name.clone();
        let tag = format!("{}x{index}", std::process::id() % 100_000);
        let lan = format!("192.168.{}", 150 + u16::from(index));
        let bridge = format!("sk{tag}b");
        ip(&["-n", &r, "link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "-n",
            &r,
            "addr",
            "add",
            &format!("{lan}.1/24"),
            "dev",
            &bridge,
        ])?;
        ip(&["-n", &r, "link", "set", &bridge, "up"])?;
        let mut site = Site {
            router,
            hosts: Vec::new(),
        };
        for h in 0..hosts {
            let name = format!("skein-{tag}s{h}");
            let (lan_r, lan_h) = (format!("sk{tag}s{h}r"), format!("sk{tag}s{h}h"));
            let host_ip: std::net::Ipv4Addr = format!("{lan}.{}", h + 2).parse()?;
            let _ = ip(&["netns", "del", &name]);
            ip(&["netns", "add", &name])?;
            // Recorded at once: dropped with the site even if the rest fails.
            site.hosts.push(SiteHost {
                name: name.clone(),
                ip: host_ip,
            });
            attach_host(
                &r,
                &name,
                &lan_r,
                &lan_h,
                &format!("{host_ip}/24"),
                &format!("{lan}.1"),
            )?;
            ip(&["-n", &r, "link", "set", &lan_r, "master", &bridge])?;
        }
        // The router forwards between the LAN and the uplink, masquerading the LAN behind its
        // uplink address, and drops what nobody inside asked for.
        sysctl_in(&r, "net.ipv4.ip_forward=1")?;
        ip(&[
            "-n",
            &r,
            "route",
            "add",
            "default",
            "via",
            &site.router.host_ip.to_string(),
        ])?;
        nft(
            &r,
            &format!(
                "table ip skein_site {{\n  chain post {{\n    type nat hook postrouting priority srcnat;\n    ip saddr {lan}.0/24 oifname != \"{bridge}\" masquerade\n  }}\n  chain input {{\n    type filter hook input priority filter;\n    iifname != \"{bridge}\" ct state new counter drop\n  }}\n}}\n"
            ),
        )?;
        Ok(site)
    }

    /// Shape the uplink to `kbit_per_s` each way (a token bucket on each end's outgoing side,
    /// 32 KiB burst, packets held at most 200 ms beyond the rate before they are dropped).
    pub fn shape_uplink(&self, kbit_per_s: u32) -> anyhow::Result<()> {
        let rate = format!("{kbit_per_s}kbit");
        let spec = [
            "root", "tbf", "rate", &rate, "burst", "32kb", "latency", "200ms",
        ];
        let mut down = vec!["qdisc", "replace", "dev", self.router.host_if()];
        down.extend(spec);
        tc(None, &down)?;
        let mut up = vec!["qdisc", "replace", "dev", self.router.ns_if()];
        up.extend(spec);
        tc(Some(&self.router.name), &up)
    }

    /// Cut the uplink: nothing crosses until [`restore_uplink`](Self::restore_uplink).
    pub fn cut_uplink(&self) -> anyhow::Result<()> {
        self.router.partition()
    }

    /// Bring the uplink back (its shaping stays). Neighbour entries that failed while it was
    /// down are flushed on both ends, so the first packet after it is resolved afresh instead
    /// of failing with "no route to host".
    pub fn restore_uplink(&self) -> anyhow::Result<()> {
        self.router.heal()?;
        ip(&["neigh", "flush", "dev", self.router.host_if()])?;
        ip(&[
            "-n",
            &self.router.name,
            "neigh",
            "flush",
            "dev",
            self.router.ns_if(),
        ])
    }

    /// Bytes sent down the uplink to the site so far (the test side's counter).
    pub fn downlink_bytes(&self) -> anyhow::Result<u64> {
        let path = format!(
            "/sys/class/net/{}/statistics/tx_bytes",
            self.router.host_if()
        );
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        text.trim()
            .parse()
            .with_context(|| format!("{path}: {text:?}"))
    }

    /// The coordinator's address `port` as the site's hosts reach it.
    pub fn coordinator_addr(&self, port: u16) -> String {
        format!("{}:{port}", self.router.host_ip)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.name]);
        }
        // The router (and the bridge and uplink in it) goes with `self.router`.
    }
}
