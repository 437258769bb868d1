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

fn nft(ns: &str, script: &str) -> anyhow::Result<()> {
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
        ip(&[
            "-n", &r, "link", "add", &lan_r, "type", "veth", "peer", "name", &lan_h,
        ])?;
        ip(&["-n", &r, "link", "set", &lan_h, "netns", &name])?;
        ip(&[
            "-n",
            &r,
            "addr",
            "add",
            &format!("{lan}.1/24"),
            "dev",
            &lan_r,
        ])?;
        ip(&["-n", &r, "link", "set", &lan_r, "up"])?;
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{lan}.2/24"),
            "dev",
            &lan_h,
        ])?;
        ip(&["-n", &name, "link", "set", &lan_h, "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &name,
            "route",
            "add",
            "default",
            "via",
            &format!("{lan}.1"),
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
        let masq = match kind {
            NatKind::Cone => "masquerade",
            NatKind::Symmetric => "masquerade fully-random",
        };
        nft(
            &r,
            &format!(
                "table ip skein_nat {{\n  chain post {{\n    type nat hook postrouting priority srcnat;\n    ip saddr {lan}.0/24 oifname != \"{lan_r}\" {masq}\n  }}\n}}\n"
            ),
        )?;
        Ok(host)
    }

    /// Drop UDP forwarded through the router (QUIC cannot pass; TCP still does).
    pub fn block_udp(&self) -> anyhow::Result<()> {
        nft(
            &self.router.name,
            "table ip skein_block {\n  chain fwd {\n    type filter hook forward priority filter;\n    meta l4proto udp drop\n  }\n}\n",
        )
    }
}

impl Drop for NatHost {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
