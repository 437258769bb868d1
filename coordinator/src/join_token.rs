//! Join tokens: `skein1-<secret>-<ca sha256>`.
//!
//! The secret admits a node; the CA fingerprint lets the node verify the coordinator on its very
//! first connection (as kubeadm's discovery hash does), so the token is all an operator copies.

use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// 32 hex characters of secret.
    pub secret: String,
    /// 64 hex characters: sha256 of the mesh CA certificate.
    pub ca_fingerprint: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "skein1-{}-{}", self.secret, self.ca_fingerprint)
    }
}

/// The token text is not a Skein join token.
#[derive(Debug, thiserror::Error)]
#[error("not a Skein join token (expected skein1-<32 hex>-<64 hex>)")]
pub struct BadToken;

impl FromStr for JoinToken {
    type Err = BadToken;
    fn from_str(s: &str) -> Result<Self, BadToken> {
        let mut parts = s.trim().split('-');
        let (Some("skein1"), Some(secret), Some(fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BadToken);
        };
        let hex_ok = |x: &str, n: usize| x.len() == n && x.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_ok(secret, 32) || !hex_ok(fp, 64) {
            return Err(BadToken);
        }
        Ok(JoinToken {
            secret: secret.to_ascii_lowercase(),
            ca_fingerprint: fp.to_ascii_lowercase(),
        })
    }
}

impl JoinToken {
    /// A fresh random token for the CA with `ca_fingerprint`.
    pub fn generate(ca_fingerprint: &str) -> JoinToken {
        let mut b = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut b);
        JoinToken {
            secret: hex::encode(b),
            ca_fingerprint: ca_fingerprint.to_string(),
        }
    }

    /// The hash stored in the registry (the secret itself is never stored).
    pub fn secret_hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let t = JoinToken::generate(&"ab".repeat(32));
        let back: JoinToken = t.to_string().parse().unwrap();
        assert_eq!(back, t);
        for bad in [
            "",
            "skein1",
            "skein1-xyz-abc",
            "skein2-00-00",
            &format!("{t}-x"),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad}");
        }
        assert!(!format!("{t:?}").contains(&t.secret));
    }
}
