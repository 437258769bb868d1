//! What an install writes, decided without IO: the config file, the systemd unit, the
//! directories and the link that enables the unit, each with its mode and owner.

use crate::backend::BackendChoice;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The system user (and group) the service runs as.
pub const SERVICE_USER: &str = "skein";
/// The unit's name.
pub const UNIT_NAME: &str = "skein-node.service";
/// Where the config file goes (under the root).
pub const CONFIG_PATH: &str = "/etc/skein/node.toml";
/// The node's state: key, certificate, artifact cache (systemd's `StateDirectory=skein`).
pub const STATE_DIR: &str = "/var/lib/skein";
/// Where the unit goes.
pub const UNIT_PATH: &str = "/etc/systemd/system/skein-node.service";
/// The link `systemctl enable` would make (the unit is `WantedBy=multi-user.target`).
pub const WANTS_LINK: &str = "/etc/systemd/system/multi-user.target.wants/skein-node.service";
/// Where `install` copies the running binary when it is not already installed in place.
pub const INSTALLED_BIN: &str = "/usr/local/bin/skein-node";
/// Where the `.deb` puts the binary (used in place: nothing is copied).
pub const PACKAGED_BIN: &str = "/usr/bin/skein-node";
/// `metrics_listen` of an installed node unless told otherwise: `skein-node status` reads
/// `/ready` and `/metrics` there.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9102";
/// `LimitNOFILE`: connections, sockets and the artifact cache's files.
pub const LIMIT_NOFILE: u64 = 65_536;

/// The flags of `skein-node install`: what the config file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallSpec {
    /// Coordinator `host:port`.
    pub coordinator: String,
    /// Join token (needed until the node has joined once).
    pub join_token: Option<String>,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// What runs the models; the node's default (`auto`) when `None`.
    pub backend: Option<BackendChoice>,
    /// The infer endpoint's UDP address; the node's default when `None`.
    pub listen: Option<SocketAddr>,
    /// Address advertised to clients.
    pub advertise: Option<SocketAddr>,
    /// `/metrics` and `/ready` (default [`DEFAULT_METRICS_LISTEN`]).
    pub metrics_listen: SocketAddr,
    /// Requests of one model that run at once.
    pub max_concurrency: Option<u32>,
    /// Requests of one model that may wait.
    pub max_queue: Option<u32>,
    /// Memory loaded models may hold, bytes; also sets the unit's `MemoryMax`.
    pub memory_budget: Option<u64>,
    /// Disk the artifact cache may hold, bytes.
    pub cache_budget: Option<u64>,
    /// The binary the unit runs (an absolute path on the target system).
    pub bin: PathBuf,
}

/// One thing an install puts on the system, at a path relative to the install root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Absolute path on the target system.
        path: PathBuf,
        /// Permission bits.
        mode: u32,
        /// Owner user and group names.
        owner: (String, String),
    },
    /// A file with this content.
    File {
        /// Absolute path on the target system.
        path: PathBuf,
        /// The bytes.
        content: Vec<u8>,
        /// Permission bits.
        mode: u32,
        /// Owner user and group names.
        owner: (String, String),
    },
    /// A copy of the file at `from` (on this machine): the binary.
    Copy {
        /// Absolute path on the target system.
        path: PathBuf,
        /// The file copied.
        from: PathBuf,
        /// Permission bits.
        mode: u32,
    },
    /// A symbolic link.
    Link {
        /// Absolute path on the target system.
        path: PathBuf,
        /// What it points to.
        target: PathBuf,
    },
}

impl Entry {
    /// The entry's path on the target system.
    pub fn path(&self) -> &Path {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Copy { path, .. }
            | Entry::Link { path, .. } => path,
        }
    }
}

/// Everything an install writes, in the order it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallPlan {
    /// The entries.
    pub entries: Vec<Entry>,
}

fn root_owned() -> (String, String) {
    ("root".into(), "root".into())
}

impl InstallPlan {
    /// The plan for `spec`; `copy_from` is the binary to copy to `spec.bin` (`None`: it is
    /// there already).
    pub fn new(spec: &InstallSpec, copy_from: Option<&Path>) -> InstallPlan {
        let mut entries = Vec::new();
        if let Some(from) = copy_from {
            entries.push(Entry::Copy {
                path: spec.bin.clone(),
                from: from.to_path_buf(),
                mode: 0o755,
            });
        }
        let service = (SERVICE_USER.to_string(), SERVICE_USER.to_string());
        entries.push(Entry::Dir {
            path: "/etc/skein".into(),
            mode: 0o750,
            owner: ("root".into(), SERVICE_USER.into()),
        });
        entries.push(Entry::File {
            path: CONFIG_PATH.into(),
            content: node_toml(spec).into_bytes(),
            // It holds the join token: readable by the service, nobody else.
            mode: 0o640,
            owner: ("root".into(), SERVICE_USER.into()),
        });
        entries.push(Entry::Dir {
            path: STATE_DIR.into(),
            mode: 0o750,
            owner: service,
        });
        entries.push(Entry::File {
            path: UNIT_PATH.into(),
            content: unit_file(&spec.bin, spec.memory_budget.map(memory_max)).into_bytes(),
            mode: 0o644,
            owner: root_owned(),
        });
        entries.push(Entry::Link {
            path: WANTS_LINK.into(),
            target: UNIT_PATH.into(),
        });
        InstallPlan { entries }
    }
}

/// `MemoryMax` for a node whose models may hold `budget` bytes: the budget plus room for the
/// runtime, connections and buffers (a quarter more, at least 256 MiB).
pub fn memory_max(budget: u64) -> u64 {
    budget.saturating_add((budget / 4).max(256 << 20))
}

/// The node's config file: only what the flags set (the node's defaults, such as its cores and
/// memory, are then read on the device at each start), and the state directory.
pub fn node_toml(spec: &InstallSpec) -> String {
    let mut t = toml::Table::new();
    t.insert("coordinator".into(), spec.coordinator.clone().into());
    if let Some(v) = &spec.join_token {
        t.insert("join_token".into(), v.clone().into());
    }
    t.insert("data_dir".into(), STATE_DIR.into());
    if let Some(v) = spec.listen {
        t.insert("listen".into(), v.to_string().into());
    }
    if let Some(v) = spec.advertise {
        t.insert("advertise".into(), v.to_string().into());
    }
    t.insert(
        "metrics_listen".into(),
        spec.metrics_listen.to_string().into(),
    );
    if let Some(v) = spec.backend {
        if let Ok(v) = toml::Value::try_from(v) {
            t.insert("backend".into(), v);
        }
    }
    if let Some(v) = spec.max_concurrency {
        t.insert("max_concurrency".into(), i64::from(v).into());
    }
    if let Some(v) = spec.max_queue {
        t.insert("max_queue".into(), i64::from(v).into());
    }
    for (key, v) in [
        ("memory_budget", spec.memory_budget),
        ("cache_budget", spec.cache_budget),
    ] {
        if let Some(v) = v {
            t.insert(key.into(), i64::try_from(v).unwrap_or(i64::MAX).into());
        }
    }
    if !spec.labels.is_empty() {
        let labels: toml::Table = spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), toml::Value::from(v.clone())))
            .collect();
        t.insert("labels".into(), labels.into());
    }
    format!(
        "# Written by `skein-node install`; run it again to change this file, or edit it and\n\
         # `systemctl restart skein-node`. Keys: docs/skein-node.example.toml.\n{}",
        toml::to_string(&t).unwrap_or_default()
    )
}

/// The hardened systemd unit running `bin` with the installed config.
pub fn unit_file(bin: &Path, memory_max: Option<u64>) -> String {
    let memory = memory_max
        .map(|m| format!("MemoryMax={m}\n"))
        .unwrap_or_default();
    format!(
        "# The Skein node agent as a hardened service, written by `skein-node install` or its package.\n\
[Unit]\n\
Description=Skein node agent\n\
Documentation=https://example.invalid/skein/docs/operations.md\n\
Wants=network-online.target\n\
After=network-online.target\n\
\n\
[Service]\n\
Type=simple\n\
User={SERVICE_USER}\n\
Group={SERVICE_USER}\n\
ExecStart={bin} --config {CONFIG_PATH}\n\
Restart=on-failure\n\
RestartSec=2s\n\
# The node drains for up to 30 s on SIGTERM.\n\
TimeoutStopSec=45s\n\
StateDirectory=skein\n\
StateDirectoryMode=0750\n\
LimitNOFILE={LIMIT_NOFILE}\n\
{memory}\
NoNewPrivileges=yes\n\
ProtectSystem=strict\n\
ProtectHome=yes\n\
PrivateTmp=yes\n\
ProtectKernelTunables=yes\n\
ProtectKernelModules=yes\n\
ProtectControlGroups=yes\n\
RestrictSUIDSGID=yes\n\
LockPersonality=yes\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n",
        bin = bin.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstallSpec {
        InstallSpec {
            coordinator: "mesh.example:7070".into(),
            join_token: Some("skein1-x".into()),
            labels: BTreeMap::from([("site".into(), "berlin-3".into())]),
            backend: Some(BackendChoice::Tract),
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 7071))),
            advertise: None,
            metrics_listen: DEFAULT_METRICS_LISTEN.parse().unwrap(),
            max_concurrency: Some(2),
            max_queue: None,
            memory_budget: Some(1 << 30),
            cache_budget: None,
            bin: INSTALLED_BIN.into(),
        }
    }

    #[test]
    fn the_config_file_is_a_node_config_with_only_what_was_set() {
        let text = node_toml(&spec());
        let c: crate::NodeConfig = toml::from_str(&text).unwrap();
        assert_eq!(c.coordinator, "mesh.example:7070");
        assert_eq!(c.join_token.as_deref(), Some("skein1-x"));
        assert_eq!(c.data_dir, Path::new(STATE_DIR));
        assert_eq!(c.labels["site"], "berlin-3");
        assert_eq!(c.backend, BackendChoice::Tract);
        assert_eq!(c.max_concurrency, 2);
        assert_eq!(c.memory_budget, 1 << 30);
        assert_eq!(c.metrics_listen, Some(spec().metrics_listen));
        // Unset limits stay out of the file: the device's own defaults apply at each start.
        assert!(!text.contains("max_queue") && !text.contains("cache_budget"));
    }

    #[test]
    fn the_unit_is_hardened_and_caps_memory_only_with_a_budget() {
        let u = unit_file(Path::new(INSTALLED_BIN), Some(memory_max(1 << 30)));
        for line in [
            "ExecStart=/usr/local/bin/skein-node --config /etc/skein/node.toml",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "StateDirectory=skein",
            "LimitNOFILE=65536",
            "MemoryMax=1342177280",
            "User=skein",
        ] {
            assert!(u.lines().any(|l| l == line), "no `{line}` in:\n{u}");
        }
        assert!(!unit_file(Path::new(INSTALLED_BIN), None).contains("MemoryMax"));
        assert_eq!(memory_max(100 << 20), (100 << 20) + (256 << 20));
    }

    #[test]
    fn the_plan_copies_the_binary_only_when_asked() {
        let p = InstallPlan::new(&spec(), Some(Path::new("/tmp/skein-node")));
        assert!(
            matches!(&p.entries[0], Entry::Copy { path, .. } if path == Path::new(INSTALLED_BIN))
        );
        let p = InstallPlan::new(&spec(), None);
        assert!(p.entries.iter().all(|e| !matches!(e, Entry::Copy { .. })));
        let paths: Vec<_> = p.entries.iter().map(|e| e.path().to_path_buf()).collect();
        for want in [CONFIG_PATH, STATE_DIR, UNIT_PATH, WANTS_LINK] {
            assert!(paths.iter().any(|p| p == Path::new(want)), "{want}");
        }
    }

    /// The `.deb` ships the unit an install without a memory budget writes, byte for byte.
    #[test]
    fn the_packaged_unit_is_the_one_install_writes() {
        assert_eq!(
            include_str!("../../../packaging/deb/skein-node.service"),
            unit_file(Path::new(PACKAGED_BIN), None)
        );
    }
}
