//! Route tickets: Ed25519-signed grants the coordinator hands out with each resolve and nodes
//! check offline, with no database on the hot path.
//!
//! ```text
//!  coordinator: TicketSigner ──sign──▶ SignedTicket ──(resolve)──▶ SDK ──(infer)──▶ node
//!       │ public keys (heartbeat ack)                                                │
//!       └──────────────────────────────▶ TicketVerifier ◀──────────────verify────────┘
//! ```
//!
//! **Rotation without downtime.** [`TicketSigner::rotate`] adds a key that only *activates*
//! (starts signing) after a delay long enough for every node to have learnt it from a heartbeat;
//! the old key stays published until every ticket it signed has expired.

use crate::tls::{read_file, write_private};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use skein_proto::{RouteTicket, SignedTicket, TicketKey};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Largest ticket body accepted.
const MAX_TICKET_LEN: usize = 4096;

/// Clock skew tolerated between coordinator and node.
pub const CLOCK_SKEW_MS: u64 = 60_000;

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_TICKET_LEN>()
}

/// Why a ticket was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TicketError {
    /// The request carries no ticket.
    #[error("the request carries no route ticket: resolve the model first")]
    Missing,
    /// Signed by a key this node does not know (rotated out, or another mesh).
    #[error("route ticket signed by unknown key {0}")]
    UnknownKey(u32),
    /// The signature does not match.
    #[error("route ticket signature is not valid")]
    BadSignature,
    /// The body does not decode.
    #[error("route ticket is malformed")]
    Malformed,
    /// Past its expiry.
    #[error("route ticket expired {0} ms ago: resolve again")]
    Expired(u64),
    /// Issued for another model.
    #[error("route ticket is for model `{ticket}`, not `{asked}`")]
    WrongModel {
        /// The ticket's model.
        ticket: String,
        /// The model asked.
        asked: String,
    },
    /// The version asked is not among the ticket's.
    #[error("route ticket does not cover version `{0}`")]
    WrongVersion(String),
    /// Checked by a node that cannot reach its coordinator ([`Reach::Offline`]), and issued
    /// longer ago than its tenant's offline validity.
    #[error("this node cannot reach its coordinator (offline) and the route ticket was issued {}s ago, past its tenant's offline validity of {}s: a new ticket needs the coordinator", age_ms / 1000, validity_ms / 1000)]
    OfflineExpired {
        /// The ticket's offline validity, ms.
        validity_ms: u64,
        /// Its age, ms since issue.
        age_ms: u64,
    },
}

impl TicketError {
    /// The wire code a node answers with: `ticket_offline_expired` for
    /// [`TicketError::OfflineExpired`], `invalid_ticket` for the others.
    pub fn code(&self) -> skein_proto::ErrorCode {
        match self {
            TicketError::OfflineExpired { .. } => skein_proto::ErrorCode::TicketOfflineExpired,
            _ => skein_proto::ErrorCode::InvalidTicket,
        }
    }
}

/// Whether the node checking a ticket reaches its coordinator; it decides which validity
/// applies.
///
/// The one rule: online, a ticket is good until `expires_unix_ms`; offline, it is good until
/// `issued_unix_ms + offline_validity_ms` (the tenant's offline validity), and nothing else
/// is accepted. Both allow the node's clock skew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The coordinator answers: the ticket's expiry applies.
    Online,
    /// The coordinator does not answer: the ticket's offline validity applies.
    Offline,
}

/// Errors of the signing-key file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignerError {
    /// Reading or writing the key file.
    #[error(transparent)]
    Io(#[from] crate::TlsError),
    /// The key file does not parse.
    #[error("ticket key file {path}: {message}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The key could not be made or encoded.
    #[error("ticket key: {0}")]
    Crypto(String),
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    id: u32,
    /// PKCS#8 document, hex.
    pkcs8: String,
    /// Signs tickets from this instant on (ms since the Unix epoch).
    activate_ms: u64,
}

struct SigningKey {
    stored: StoredKey,
    pair: Ed25519KeyPair,
}

/// The coordinator's ticket signing keys, persisted in one file (mode 0600).
pub struct TicketSigner {
    keys: Vec<SigningKey>,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for TicketSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketSigner")
            .field(
                "key_ids",
                &self.keys.iter().map(|k| k.stored.id).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn new_key(id: u32, activate_ms: u64) -> Result<SigningKey, SignerError> {
    let rng = ring::rand::SystemRandom::new();
    let doc =
        Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| SignerError::Crypto(e.to_string()))?;
    let stored = StoredKey {
        id,
        pkcs8: hex::encode(doc.as_ref()),
        activate_ms,
    };
    let pair =
        Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| SignerError::Crypto(e.to_string()))?;
    Ok(SigningKey { stored, pair })
}

impl TicketSigner {
    /// Load the keys from `path`, or create the file with one key active now.
    pub fn load_or_create(path: &Path, now_ms: u64) -> Result<TicketSigner, SignerError> {
        let corrupt = |message: String| SignerError::Corrupt {
            path: path.display().to_string(),
            message,
        };
        let mut signer = match read_file(path)? {
            Some(text) => {
                let stored: Vec<StoredKey> =
                    serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
                let mut keys = Vec::with_capacity(stored.len());
                for s in stored {
                    let der = hex::decode(&s.pkcs8).map_err(|e| corrupt(e.to_string()))?;
                    let pair = Ed25519KeyPair::from_pkcs8(&der)
                        .map_err(|e| corrupt(format!("key {}: {e}", s.id)))?;
                    keys.push(SigningKey { stored: s, pair });
                }
                if keys.is_empty() {
                    return Err(corrupt("no keys".into()));
                }
                TicketSigner {
                    keys,
                    path: Some(path.to_path_buf()),
                }
            }
            None => {
                let s = TicketSigner {
                    keys: vec![new_key(1, now_ms)?],
                    path: Some(path.to_path_buf()),
                };
                s.save()?;
                s
            }
        };
        signer.keys.sort_by_key(|k| k.stored.id);
        Ok(signer)
    }

    /// Keys kept in memory only (tests).
    pub fn ephemeral(now_ms: u64) -> Result<TicketSigner, SignerError> {
        Ok(TicketSigner {
            keys: vec![new_key(1, now_ms)?],
            path: None,
        })
    }

    fn save(&self) -> Result<(), SignerError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let stored: Vec<&StoredKey> = self.keys.iter().map(|k| &k.stored).collect();
        let text = serde_json::to_string_pretty(&stored)
            .map_err(|e| SignerError::Crypto(e.to_string()))?;
        write_private(path, &text)?;
        Ok(())
    }

    /// The newest key active at `now_ms` (the oldest when none is, which cannot happen for a
    /// signer made here).
    fn active(&self, now_ms: u64) -> &SigningKey {
        self.keys
            .iter()
            .rev()
            .find(|k| k.stored.activate_ms <= now_ms)
            .unwrap_or(&self.keys[0])
    }

    /// The id of the key that signs at `now_ms`.
    pub fn active_key_id(&self, now_ms: u64) -> u32 {
        self.active(now_ms).stored.id
    }

    /// Sign `ticket` with the key active at `now_ms` (its `key_id` is set here).
    pub fn sign(&self, mut ticket: RouteTicket, now_ms: u64) -> SignedTicket {
        let key = self.active(now_ms);
        ticket.key_id = key.stored.id;
        // Encoding a plain struct of strings and integers into a Vec cannot fail; should it
        // ever, the empty body is refused by every node as malformed.
        let body = bincode::serde::encode_to_vec(&ticket, codec()).unwrap_or_default();
        let signature = key.pair.sign(&body).as_ref().to_vec();
        SignedTicket { body, signature }
    }

    /// Every published key, oldest first: nodes accept tickets signed by any of them.
    pub fn public_keys(&self) -> Vec<TicketKey> {
        self.keys
            .iter()
            .map(|k| TicketKey {
                id: k.stored.id,
                public: k.pair.public_key().as_ref().to_vec(),
            })
            .collect()
    }

    /// Add a key that starts signing at `now_ms + activate_after_ms`, and drop the keys whose
    /// tickets have all expired (superseded more than `retire_after_ms` before `now_ms`).
    /// Returns the new key's id.
    pub fn rotate(
        &mut self,
        now_ms: u64,
        activate_after_ms: u64,
        retire_after_ms: u64,
    ) -> Result<u32, SignerError> {
        let id = self.keys.iter().map(|k| k.stored.id).max().unwrap_or(0) + 1;
        self.keys
            .push(new_key(id, now_ms.saturating_add(activate_after_ms))?);
        self.retire(now_ms, retire_after_ms)?;
        self.save()?;
        Ok(id)
    }

    /// Drop the keys whose tickets have all expired: superseded (the next key active) more
    /// than `retire_after_ms` before `now_ms`. Returns whether any was dropped (and saved).
    pub fn retire(&mut self, now_ms: u64, retire_after_ms: u64) -> Result<bool, SignerError> {
        // Key i is superseded when key i+1 activates.
        let superseded: Vec<u64> = self
            .keys
            .iter()
            .skip(1)
            .map(|k| k.stored.activate_ms)
            .collect();
        let before = self.keys.len();
        let mut i = 0;
        self.keys.retain(|_| {
            let keep = superseded
                .get(i)
                .is_none_or(|&until| until.saturating_add(retire_after_ms) > now_ms);
            i += 1;
            keep
        });
        let dropped = self.keys.len() != before;
        if dropped {
            self.save()?;
        }
        Ok(dropped)
    }
}

/// Until when (unix ms, before clock skew) an offline node accepts `ticket`.
pub fn offline_limit_ms(ticket: &RouteTicket) -> u64 {
    ticket
        .issued_unix_ms
        .saturating_add(ticket.offline_validity_ms)
}

/// A node's set of trusted ticket keys.
pub struct TicketVerifier {
    keys: HashMap<u32, UnparsedPublicKey<Vec<u8>>>,
    skew_ms: u64,
    /// Tickets whose signature already checked out, by signature (with their body, compared on
    /// every hit): a client reuses one ticket for many calls, and an Ed25519 check costs tens
    /// of µs on the hot path. Bounded; emptied when full. Expiry, model and version are still
    /// checked on every call.
    verified: std::sync::Mutex<HashMap<Vec<u8>, Verified>>,
}

/// A ticket body and what it decoded to, under its checked signature.
type Verified = (Vec<u8>, RouteTicket);

/// Verified tickets remembered at most.
const MAX_VERIFIED: usize = 1024;

impl Default for TicketVerifier {
    fn default() -> Self {
        TicketVerifier::new(&[])
    }
}

impl std::fmt::Debug for TicketVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketVerifier")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TicketVerifier {
    /// Trust exactly `keys`.
    pub fn new(keys: &[TicketKey]) -> TicketVerifier {
        TicketVerifier {
            keys: keys
                .iter()
                .map(|k| (k.id, UnparsedPublicKey::new(&ED25519, k.public.clone())))
                .collect(),
            skew_ms: CLOCK_SKEW_MS,
            verified: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Tolerate `skew_ms` of clock difference with the coordinator (default
    /// [`CLOCK_SKEW_MS`]).
    pub fn with_skew(mut self, skew_ms: u64) -> TicketVerifier {
        self.skew_ms = skew_ms;
        self
    }

    /// Whether no key is known yet (the node has not heard from its coordinator).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Check `signed` at `now_ms` for `model` (and `version`, when known) and return what it
    /// grants.
    pub fn verify(
        &self,
        signed: &SignedTicket,
        now_ms: u64,
        model: &str,
        version: Option<&str>,
    ) -> Result<RouteTicket, TicketError> {
        self.verify_at(signed, now_ms, model, version, Reach::Online)
    }

    /// Like [`verify`](Self::verify), by a node that reaches its coordinator or not
    /// ([`Reach`]: the expiry online, the offline validity offline).
    pub fn verify_at(
        &self,
        signed: &SignedTicket,
        now_ms: u64,
        model: &str,
        version: Option<&str>,
        reach: Reach,
    ) -> Result<RouteTicket, TicketError> {
        if signed.body.is_empty() && signed.signature.is_empty() {
            return Err(TicketError::Missing);
        }
        let ticket = self.authentic(signed)?;
        match reach {
            Reach::Online => {
                let limit = ticket.expires_unix_ms.saturating_add(self.skew_ms);
                if now_ms > limit {
                    return Err(TicketError::Expired(now_ms - ticket.expires_unix_ms));
                }
            }
            Reach::Offline => {
                let limit = offline_limit_ms(&ticket).saturating_add(self.skew_ms);
                if now_ms > limit {
                    return Err(TicketError::OfflineExpired {
                        validity_ms: ticket.offline_validity_ms,
                        age_ms: now_ms.saturating_sub(ticket.issued_unix_ms),
                    });
                }
            }
        }
        if ticket.model != model {
            return Err(TicketError::WrongModel {
                ticket: ticket.model,
                asked: model.to_string(),
            });
        }
        if let Some(v) = version {
            if !ticket.versions.iter().any(|t| t == v) {
                return Err(TicketError::WrongVersion(v.to_string()));
            }
        }
        Ok(ticket)
    }

    /// The ticket `signed` carries, once its signature is known good (remembered).
    fn authentic(&self, signed: &SignedTicket) -> Result<RouteTicket, TicketError> {
        let lock = || self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((body, ticket)) = lock().get(&signed.signature) {
            if *body == signed.body {
                return Ok(ticket.clone());
            }
        }
        if signed.body.len() > MAX_TICKET_LEN {
            return Err(TicketError::Malformed);
        }
        let (ticket, used): (RouteTicket, usize) =
            bincode::serde::decode_from_slice(&signed.body, codec())
                .map_err(|_| TicketError::Malformed)?;
        if used != signed.body.len() {
            return Err(TicketError::Malformed);
        }
        let key = self
            .keys
            .get(&ticket.key_id)
            .ok_or(TicketError::UnknownKey(ticket.key_id))?;
        key.verify(&signed.body, &signed.signature)
            .map_err(|_| TicketError::BadSignature)?;
        let mut verified = lock();
        if verified.len() >= MAX_VERIFIED {
            verified.clear();
        }
        verified.insert(
            signed.signature.clone(),
            (signed.body.clone(), ticket.clone()),
        );
        Ok(ticket)
    }
}

// Signing other messages with the ticket keys (artifact grants, `crate::grant`): the message
// is the caller's, domain-separated by it so that it can never be read as a route ticket.
impl TicketSigner {
    /// Sign `message(key_id)` with the key active at `now_ms`; returns the message and its
    /// signature.
    pub(crate) fn sign_message(
        &self,
        now_ms: u64,
        message: impl FnOnce(u32) -> Vec<u8>,
    ) -> (Vec<u8>, Vec<u8>) {
        let key = self.active(now_ms);
        let body = message(key.stored.id);
        let signature = key.pair.sign(&body).as_ref().to_vec();
        (body, signature)
    }
}

impl TicketVerifier {
    /// Check `signature` over `message` with key `key_id`.
    pub(crate) fn check_message(
        &self,
        key_id: u32,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), TicketError> {
        let key = self
            .keys
            .get(&key_id)
            .ok_or(TicketError::UnknownKey(key_id))?;
        key.verify(message, signature)
            .map_err(|_| TicketError::BadSignature)
    }

    /// Tolerated clock skew, ms.
    pub(crate) fn skew_ms(&self) -> u64 {
        self.skew_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(model: &str, expires: u64) -> RouteTicket {
        RouteTicket {
            key_id: 0,
            tenant: "acme".into(),
            model: model.into(),
            versions: vec!["1".into(), "2".into()],
            expires_unix_ms: expires,
            max_rps: Some(5),
            max_concurrent: None,
            issued_unix_ms: expires.saturating_sub(5_000),
            offline_validity_ms: 60_000,
        }
    }

    /// The one rule, online and offline, within and past each validity: online the expiry
    /// (whatever the offline validity), offline the offline validity from issue (whatever the
    /// expiry), each with the clock skew; offline refusals say so and name the validity.
    #[test]
    fn online_the_expiry_offline_the_offline_validity() {
        let s = TicketSigner::ephemeral(0).unwrap();
        let v = TicketVerifier::new(&s.public_keys()).with_skew(1_000);
        let at = |issued: u64, expires: u64, validity: u64| {
            let mut t = ticket("m", expires);
            t.issued_unix_ms = issued;
            t.offline_validity_ms = validity;
            s.sign(t, 0)
        };
        let check =
            |t: &SignedTicket, now: u64, reach: Reach| v.verify_at(t, now, "m", None, reach);
        // Short-lived ticket (expires 10 s after issue), long offline validity (15 min).
        let long = at(100_000, 110_000, 900_000);
        assert!(
            check(&long, 111_000, Reach::Online).is_ok(),
            "expiry + skew"
        );
        assert_eq!(
            check(&long, 111_001, Reach::Online),
            Err(TicketError::Expired(1_001))
        );
        assert!(
            check(&long, 111_001, Reach::Offline).is_ok(),
            "offline: past expiry, within validity"
        );
        assert!(
            check(&long, 1_001_000, Reach::Offline).is_ok(),
            "validity + skew"
        );
        let past = check(&long, 1_001_001, Reach::Offline).unwrap_err();
        assert_eq!(
            past,
            TicketError::OfflineExpired {
                validity_ms: 900_000,
                age_ms: 901_001
            }
        );
        assert_eq!(past.code(), skein_proto::ErrorCode::TicketOfflineExpired);
        let msg = past.to_string();
        assert!(msg.contains("offline validity of 900s"), "{msg}");
        assert!(msg.contains("issued 901s ago"), "{msg}");
        // Long-lived ticket (5 min), short offline validity (2 s): offline it is refused
        // once 2 s old although it has not expired; online it is still good.
        let short = at(100_000, 400_000, 2_000);
        assert!(check(&short, 103_000, Reach::Offline).is_ok());
        assert!(matches!(
            check(&short, 103_001, Reach::Offline),
            Err(TicketError::OfflineExpired {
                validity_ms: 2_000,
                ..
            })
        ));
        assert!(check(&short, 103_001, Reach::Online).is_ok());
        assert_eq!(
            check(&short, 400_000, Reach::Online).map(|t| t.offline_validity_ms),
            Ok(2_000)
        );
        // Everything else is checked offline as online: model, signature.
        assert!(matches!(
            v.verify_at(&long, 111_001, "other", None, Reach::Offline),
            Err(TicketError::WrongModel { .. })
        ));
        let mut forged = long.clone();
        forged.signature[0] ^= 1;
        assert_eq!(
            v.verify_at(&forged, 111_001, "m", None, Reach::Offline),
            Err(TicketError::BadSignature)
        );
        assert_eq!(
            TicketError::Expired(1).code(),
            skein_proto::ErrorCode::InvalidTicket
        );
    }

    #[test]
    fn signs_verifies_and_refuses_tampering() {
        let s = TicketSigner::ephemeral(0).unwrap();
        let v = TicketVerifier::new(&s.public_keys());
        let t = s.sign(ticket("m", 10_000), 0);
        let got = v.verify(&t, 5_000, "m", Some("2")).unwrap();
        assert_eq!(got.tenant, "acme");
        assert_eq!(got.key_id, 1);
        assert_eq!(
            v.verify(&t, 10_000 + CLOCK_SKEW_MS + 1, "m", None),
            Err(TicketError::Expired(CLOCK_SKEW_MS + 1))
        );
        assert!(matches!(
            v.verify(&t, 0, "other", None),
            Err(TicketError::WrongModel { .. })
        ));
        assert_eq!(
            v.verify(&t, 0, "m", Some("3")),
            Err(TicketError::WrongVersion("3".into()))
        );
        // Flip one bit anywhere in the body: the signature no longer matches (or the body
        // no longer decodes).
        for i in 0..t.body.len() {
            let mut forged = t.clone();
            forged.body[i] ^= 1;
            assert!(v.verify(&forged, 0, "m", None).is_err(), "byte {i}");
        }
        // The genuine ticket is now remembered: the same signature over another body is still
        // refused, and the remembered one still expires.
        let mut swapped = t.clone();
        swapped.body[0] ^= 1;
        assert!(v.verify(&swapped, 0, "m", None).is_err());
        assert!(v.verify(&t, 5_000, "m", Some("2")).is_ok());
        assert!(matches!(
            v.verify(&t, 10_000 + CLOCK_SKEW_MS + 1, "m", None),
            Err(TicketError::Expired(_))
        ));
        let mut forged = t.clone();
        forged.signature[3] ^= 0x80;
        assert_eq!(
            v.verify(&forged, 0, "m", None),
            Err(TicketError::BadSignature)
        );
        assert_eq!(
            v.verify(&SignedTicket::default(), 0, "m", None),
            Err(TicketError::Missing)
        );
        // Another coordinator's key with the same id: refused.
        let other = TicketSigner::ephemeral(0).unwrap();
        let foreign = other.sign(ticket("m", 10_000), 0);
        assert_eq!(
            v.verify(&foreign, 0, "m", None),
            Err(TicketError::BadSignature)
        );
    }

    #[test]
    fn rotation_publishes_before_signing_and_retires_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ticket-keys.json");
        let mut s = TicketSigner::load_or_create(&path, 0).unwrap();
        let before = s.sign(ticket("m", 100_000), 1_000);
        let id = s.rotate(1_000, 2_000, 300_000).unwrap();
        assert_eq!(id, 2);
        // Published at once, not signing yet.
        let v = TicketVerifier::new(&s.public_keys());
        assert_eq!(s.public_keys().len(), 2);
        assert_eq!(s.sign(ticket("m", 100_000), 2_999).body, {
            let mut t = ticket("m", 100_000);
            t.key_id = 1;
            bincode::serde::encode_to_vec(&t, codec()).unwrap()
        });
        let after = s.sign(ticket("m", 100_000), 3_000);
        assert_eq!(v.verify(&after, 3_000, "m", None).unwrap().key_id, 2);
        assert_eq!(v.verify(&before, 3_000, "m", None).unwrap().key_id, 1);
        // Reloaded from disk: the same keys.
        let again = TicketSigner::load_or_create(&path, 0).unwrap();
        assert_eq!(again.public_keys(), s.public_keys());
        // Not yet retired just before its last ticket can expire; retired just after.
        assert!(!s.retire(3_000 + 299_999, 300_000).unwrap());
        assert!(s.retire(3_000 + 300_000, 300_000).unwrap());
        let ids: Vec<u32> = s.public_keys().iter().map(|k| k.id).collect();
        assert_eq!(ids, vec![2]);
        assert_eq!(
            TicketSigner::load_or_create(&path, 0)
                .unwrap()
                .public_keys(),
            s.public_keys()
        );
        let v = TicketVerifier::new(&s.public_keys());
        assert_eq!(
            v.verify(&before, 3_000, "m", None),
            Err(TicketError::UnknownKey(1))
        );
    }
}
