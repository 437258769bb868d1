//! Client profiles: the coordinator's address and the credentials to use, in one TOML file.
//!
//! `skein up` writes one to `$XDG_CONFIG_HOME/skein/profile.toml` (or
//! `$HOME/.config/skein/profile.toml`); `SKEIN_PROFILE` or `--profile` point elsewhere.

use crate::Error;
use serde::{Deserialize, Serialize};
use skein_net::Credentials;
use std::path::{Path, PathBuf};

/// Where the mesh is and who we are.
#[derive(Clone, Serialize, Deserialize)]
pub struct Profile {
    /// Coordinator `host:port`.
    pub coordinator: String,
    /// Mesh CA certificate (PEM).
    pub ca: String,
    /// Client certificate (PEM); empty: none (the API key identifies the caller).
    #[serde(default)]
    pub cert: String,
    /// Client private key (PEM); empty with `cert`.
    #[serde(default)]
    pub key: String,
    /// API key (`skn_...`); `SKEIN_API_KEY` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("coordinator", &self.coordinator)
            .finish_non_exhaustive()
    }
}

impl Profile {
    /// A profile for `coordinator` with `creds`.
    pub fn new(coordinator: impl Into<String>, creds: &Credentials) -> Profile {
        Profile {
            coordinator: coordinator.into(),
            ca: creds.ca_pem.clone(),
            cert: creds.cert_pem.clone(),
            key: creds.key_pem.clone(),
            api_key: None,
        }
    }

    /// A profile for `coordinator` trusting the mesh CA `ca_pem`, known by `api_key` alone.
    pub fn with_key(coordinator: impl Into<String>, ca_pem: &str, api_key: &str) -> Profile {
        Profile {
            coordinator: coordinator.into(),
            ca: ca_pem.to_string(),
            cert: String::new(),
            key: String::new(),
            api_key: Some(api_key.to_string()),
        }
    }

    /// The credentials in this profile.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            ca_pem: self.ca.clone(),
            cert_pem: self.cert.clone(),
            key_pem: self.key.clone(),
        }
    }

    /// `SKEIN_PROFILE`, else `$XDG_CONFIG_HOME/skein/profile.toml`, else
    /// `$HOME/.config/skein/profile.toml`.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("SKEIN_PROFILE").filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        Some(base.join("skein").join("profile.toml"))
    }

    /// Load a profile file.
    pub fn load(path: &Path) -> Result<Profile, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the profile {}: {e}; run `skein up` or pass --profile",
                path.display()
            ))
        })?;
        let mut p: Profile = toml::from_str(&text)
            .map_err(|e| Error::Config(format!("profile {}: {e}", path.display())))?;
        if let Some(k) = std::env::var("SKEIN_API_KEY")
            .ok()
            .filter(|k| !k.trim().is_empty())
        {
            p.api_key = Some(k.trim().to_string());
        }
        Ok(p)
    }

    /// Load the default profile.
    pub fn load_default() -> Result<Profile, Error> {
        let path = Self::default_path()
            .ok_or_else(|| Error::Config("no profile path: set SKEIN_PROFILE or HOME".into()))?;
        Self::load(&path)
    }

    /// Write the profile (mode 0600), creating its directory.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let io = |e: std::io::Error| Error::Config(format!("writing {}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = toml::to_string(self).map_err(|e| Error::Config(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)
    }
}
