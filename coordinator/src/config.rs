//! Coordinator configuration.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the coordinator needs to start. Defaults are documented per field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CoordinatorConfig {
    /// UDP address of the `skein/ctl` endpoint (default `127.0.0.1:7070`).
    pub listen: SocketAddr,
    /// Where the CA, the SQLite registry and the artifacts live (default `./skein-data`).
    pub data_dir: PathBuf,
    /// A reusable join token to accept (no expiry), for fleets provisioned with one token;
    /// otherwise mint single-use tokens with `skein join-token`.
    pub join_token: Option<String>,
    /// Interval nodes are told to heartbeat at (default 1 s).
    #[serde(with = "duration_ms")]
    pub heartbeat_interval: Duration,
    /// A node silent this long is suspect (default 3 s).
    #[serde(with = "duration_ms")]
    pub suspect_after: Duration,
    /// A node silent this long is dead: no traffic is routed to it (default 6 s).
    #[serde(with = "duration_ms")]
    pub dead_after: Duration,
    /// Largest model upload accepted, bytes (default 512 MiB).
    pub max_upload_bytes: u64,
    /// Largest frame accepted, bytes (default 64 MiB).
    pub max_frame_len: u32,
    /// Concurrent connections accepted (default 4096); more are refused.
    pub max_connections: usize,
    /// How long clients may cache a resolve answer (default 5 s).
    #[serde(with = "duration_ms")]
    pub route_ttl: Duration,
    /// The autoscaler (`[scaling]`: histogram bins, target utilisation, ...).
    pub scaling: crate::scaler::ScalingConfig,
    /// API keys and route tickets (`[security]`).
    pub security: SecurityConfig,
    /// Prices for `skein usage` (`[pricing]`: `per_request`, `default_per_compute_second`,
    /// and `[pricing.per_compute_second]` by node class).
    pub pricing: skein_store::Pricing,
    /// The circuit relay for nodes behind NAT (`[relay]`, issue 19): on by default.
    pub relay: RelayConfig,
}

/// `[relay]`: the coordinator as a libp2p circuit relay v2 server, so that callers reach
/// nodes behind NAT (relayed at once, then hole-punched). Every reservation and circuit is
/// bounded; see docs/operations.md, "Nodes behind NAT".
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RelayConfig {
    /// Run the relay (default true).
    pub enabled: bool,
    /// Multiaddrs to listen on (default: QUIC and TCP on the `listen` IP, port 0; give fixed
    /// ports to open them on a firewall, e.g. `/ip4/0.0.0.0/udp/7071/quic-v1` and
    /// `/ip4/0.0.0.0/tcp/7071`).
    pub listen: Vec<String>,
    /// Reservations held at once (default 128).
    pub max_reservations: usize,
    /// Reservations one peer may hold (default 4).
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before renewal (default 1 h).
    #[serde(with = "duration_ms")]
    pub reservation_duration: Duration,
    /// Circuits open at once (default 64).
    pub max_circuits: usize,
    /// Circuits one peer may have open (default 8).
    pub max_circuits_per_peer: usize,
    /// A circuit is closed after this long (default 2 min).
    #[serde(with = "duration_ms")]
    pub max_circuit_duration: Duration,
    /// A circuit is closed after relaying this many bytes each way (default 64 MiB).
    pub max_circuit_bytes: u64,
    /// Reservations one node may make (default 30 at once, then one per 2 min).
    pub reservation_rate_per_peer: RateConfig,
    /// Reservations from one IP address (default 60 at once, then one per min).
    pub reservation_rate_per_ip: RateConfig,
    /// Circuits one caller may open (default 30 at once, then one per 2 min).
    pub circuit_rate_per_peer: RateConfig,
    /// Circuits callers from one IP address may open (default 60 at once, then one per min).
    pub circuit_rate_per_ip: RateConfig,
    /// What routing assumes the relay forwards, Mbit/s (default 100): a relayed request's
    /// transfer time is estimated at the lesser of this and the node's link. An estimate for
    /// ranking, not a limit the relay enforces.
    pub routing_bandwidth_mbps: f64,
    /// What routing adds to a call through the relay, ms (default 10: the relay's extra hops
    /// and its second encryption, measured at 8–11 ms over a direct call on the same round
    /// trip; docs/benchmarks.md, "Nodes behind NAT"). Shown as `RELAY` in `skein route`.
    pub routing_penalty_ms: f64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        let l = skein_peer::RelayLimits::default();
        RelayConfig {
            enabled: true,
            listen: Vec::new(),
            max_reservations: l.max_reservations,
            max_reservations_per_peer: l.max_reservations_per_peer,
            reservation_duration: l.reservation_duration,
            max_circuits: l.max_circuits,
            max_circuits_per_peer: l.max_circuits_per_peer,
            max_circuit_duration: l.max_circuit_duration,
            max_circuit_bytes: l.max_circuit_bytes,
            reservation_rate_per_peer: RateConfig::from(l.reservation_rate_per_peer),
            reservation_rate_per_ip: RateConfig::from(l.reservation_rate_per_ip),
            circuit_rate_per_peer: RateConfig::from(l.circuit_rate_per_peer),
            circuit_rate_per_ip: RateConfig::from(l.circuit_rate_per_ip),
            routing_bandwidth_mbps: 100.0,
            routing_penalty_ms: 10.0,
        }
    }
}

/// A relay rate limit (`{ burst = N, every_ms = MS }`): `burst` at once, then one more every
/// `every_ms`; `burst = 0` lifts the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// What may be used at once; 0: no limit.
    pub burst: u32,
    /// How often one more is allowed, ms (at least 1 when `burst` is not 0).
    pub every_ms: u64,
}

impl From<Option<skein_peer::Rate>> for RateConfig {
    fn from(r: Option<skein_peer::Rate>) -> RateConfig {
        match r {
            Some(r) => RateConfig {
                burst: r.burst.get(),
                every_ms: r.every.as_millis() as u64,
            },
            None => RateConfig {
                burst: 0,
                every_ms: 0,
            },
        }
    }
}

impl RateConfig {
    fn rate(&self) -> Option<skein_peer::Rate> {
        skein_peer::Rate::new(self.burst, Duration::from_millis(self.every_ms))
    }
}

impl RelayConfig {
    /// Refuse settings routing cannot use.
    pub fn check(&self) -> anyhow::Result<()> {
        for (name, r) in [
            ("reservation_rate_per_peer", &self.reservation_rate_per_peer),
            ("reservation_rate_per_ip", &self.reservation_rate_per_ip),
            ("circuit_rate_per_peer", &self.circuit_rate_per_peer),
            ("circuit_rate_per_ip", &self.circuit_rate_per_ip),
        ] {
            anyhow::ensure!(
                r.burst == 0 || r.every_ms > 0,
                "[relay] {name}: every_ms must be at least 1 when burst is {} (burst = 0 lifts the limit)",
                r.burst
            );
        }
        anyhow::ensure!(
            self.routing_bandwidth_mbps.is_finite() && self.routing_bandwidth_mbps > 0.0,
            "[relay] routing_bandwidth_mbps must be a positive number of Mbit/s, not {}",
            self.routing_bandwidth_mbps
        );
        anyhow::ensure!(
            self.routing_penalty_ms.is_finite() && self.routing_penalty_ms >= 0.0,
            "[relay] routing_penalty_ms must be 0 or more ms, not {}",
            self.routing_penalty_ms
        );
        Ok(())
    }

    /// What routing adds for a node reached through a relay.
    pub fn routing_cost(&self) -> skein_policy::routing::RelayCost {
        skein_policy::routing::RelayCost {
            bandwidth_bps: self.routing_bandwidth_mbps * 1e6,
            penalty_us: self.routing_penalty_ms * 1e3,
        }
    }

    /// The relay's limits.
    pub fn limits(&self) -> skein_peer::RelayLimits {
        skein_peer::RelayLimits {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: self.reservation_duration,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            reservation_rate_per_peer: self.reservation_rate_per_peer.rate(),
            reservation_rate_per_ip: self.reservation_rate_per_ip.rate(),
            circuit_rate_per_peer: self.circuit_rate_per_peer.rate(),
            circuit_rate_per_ip: self.circuit_rate_per_ip.rate(),
        }
    }
}

/// `[security]`: how callers are checked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SecurityConfig {
    /// Requests without an API key act as the platform admin (default false). For a laptop
    /// only: anyone who can reach the coordinator controls the mesh.
    pub insecure_dev: bool,
    /// How long a route ticket is valid (default 5 min). Clients get a new one with every
    /// resolve; a revoked key keeps working through tickets it already holds at most this long.
    #[serde(with = "duration_ms")]
    pub ticket_ttl: Duration,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            insecure_dev: false,
            ticket_ttl: Duration::from_secs(300),
        }
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from("skein-data"),
            join_token: None,
            heartbeat_interval: Duration::from_secs(1),
            suspect_after: Duration::from_secs(3),
            dead_after: Duration::from_secs(6),
            max_upload_bytes: 512 << 20,
            max_frame_len: skein_proto::DEFAULT_MAX_FRAME_LEN,
            max_connections: 4096,
            route_ttl: Duration::from_secs(5),
            scaling: crate::scaler::ScalingConfig::default(),
            security: SecurityConfig::default(),
            pricing: skein_store::Pricing::default(),
            relay: RelayConfig::default(),
        }
    }
}

/// Durations as milliseconds in config files.
pub mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Serialize as integer milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    /// Deserialize from integer milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_rate_limits_default_to_libp2ps_and_are_read_from_the_config_file() {
        let defaults = CoordinatorConfig::default().relay;
        let l = defaults.limits();
        assert_eq!(l, skein_peer::RelayLimits::default());
        let rate = |burst, secs| skein_peer::Rate::new(burst, Duration::from_secs(secs));
        assert_eq!(l.reservation_rate_per_peer, rate(30, 120));
        assert_eq!(l.circuit_rate_per_ip, rate(60, 60));
        let c: CoordinatorConfig = toml::from_str(
            "[relay]\n\
             circuit_rate_per_ip = { burst = 2, every_ms = 3600000 }\n\
             reservation_rate_per_peer = { burst = 0, every_ms = 0 }\n",
        )
        .unwrap();
        c.relay.check().unwrap();
        let l = c.relay.limits();
        assert_eq!(l.circuit_rate_per_ip, rate(2, 3600));
        // burst = 0: no limit.
        assert_eq!(l.reservation_rate_per_peer, None);
        // Unset ones keep their defaults.
        assert_eq!(l.circuit_rate_per_peer, rate(30, 120));
        let bad: CoordinatorConfig =
            toml::from_str("[relay]\ncircuit_rate_per_peer = { burst = 1, every_ms = 0 }\n")
                .unwrap();
        assert!(bad.relay.check().is_err());
    }
}
