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
