//! Artifact grants: the coordinator's signed word that a PeerId belongs to a mesh member
//! fetching one artifact. Holders check it offline, with the route-ticket keys they already
//! hold from heartbeats, before they serve a chunk on `/skein/artifact/1`.
//!
//! ```text
//!  node A ──ArtifactSources──▶ coordinator: TicketSigner ──sign(A's PeerId, artifact, expiry)──▶ A
//!  A ──ChunkRequest { grant }──▶ holder B: verify(grant, B's view of A's PeerId, artifact, now)
//! ```
//!
//! The PeerId in the grant is the one bound to the asking node (its heartbeat proves it), and
//! a holder compares it with the connection's *authenticated* remote PeerId: a grant copied to
//! another peer is worthless.
//!
//! **Domain separation.** The signed message is [`DOMAIN`] followed by the grant's bincode;
//! [`SignedTicket::body`] carries the bincode alone. A route ticket's signed body starts with
//! its `key_id` varint, never the byte 0xFF (bincode's 128-bit marker, invalid for a `u32`),
//! so no grant signature is a ticket signature, nor the other way round.

use crate::ticket::{TicketError, TicketSigner, TicketVerifier};
use skein_proto::{ArtifactGrant, SignedTicket};

/// Prefix of every signed grant message.
pub const DOMAIN: &[u8] = b"\xffskein/artifact-grant/1\0";

/// How long a grant is valid by default, ms: a fetch asks again when it needs longer.
pub const DEFAULT_GRANT_TTL_MS: u64 = 15 * 60 * 1000;

/// The artifact a *membership grant* names: any. The coordinator puts one in each heartbeat
/// answer (`HeartbeatAck::membership_grant`), so that a node whose coordinator is unreachable
/// can still show LAN holders it is a mesh member (no artifact id is `*`: ids are hex).
pub const ANY_ARTIFACT: &str = "*";

/// A membership grant is valid this long at most, ms: 1 h.
pub const MEMBERSHIP_TTL_MS: u64 = 60 * 60 * 1000;

/// A membership grant's expiry moves in steps of this, ms (10 min): every heartbeat answer
/// carries one, but the same one for 10 minutes, so the node's saved answer is not rewritten
/// at every heartbeat. A grant is thus valid 50 to 60 min after the answer that brought it.
pub const MEMBERSHIP_STEP_MS: u64 = 10 * 60 * 1000;

/// Largest grant body accepted.
const MAX_GRANT_LEN: usize = 1024;

fn codec() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_GRANT_LEN>()
}

fn message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + body.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(body);
    m
}

/// Why a grant was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantError {
    /// The request carries no grant.
    #[error("no artifact grant: ask the coordinator for the artifact's sources first")]
    Missing,
    /// The grant's body does not decode.
    #[error("artifact grant is malformed")]
    Malformed,
    /// Signed by an unknown key, or the signature does not match.
    #[error("artifact grant refused: {0}")]
    Signature(TicketError),
    /// Past its expiry.
    #[error("artifact grant expired {0} ms ago: ask the coordinator again")]
    Expired(u64),
    /// Granted to another peer than the one asking.
    #[error("artifact grant names peer {granted}, but {asker} asks")]
    WrongPeer {
        /// The PeerId in the grant.
        granted: String,
        /// The authenticated PeerId of the connection.
        asker: String,
    },
    /// Granted for another artifact.
    #[error("artifact grant is for artifact {granted}, not {asked}")]
    WrongArtifact {
        /// The grant's artifact.
        granted: String,
        /// The one asked for.
        asked: String,
    },
}

/// Sign a grant for `peer_id` to fetch `sha256` until `now_ms + ttl_ms`.
pub fn sign(
    signer: &TicketSigner,
    peer_id: &str,
    sha256: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> SignedTicket {
    let (signed, signature) = signer.sign_message(now_ms, |key_id| {
        let grant = ArtifactGrant {
            key_id,
            peer_id: peer_id.to_string(),
            sha256: sha256.to_string(),
            expires_unix_ms: now_ms.saturating_add(ttl_ms),
        };
        // A struct of strings and integers always encodes; should it not, the empty body is
        // refused by every holder as malformed.
        message(&bincode::serde::encode_to_vec(&grant, codec()).unwrap_or_default())
    });
    SignedTicket {
        body: signed[DOMAIN.len()..].to_vec(),
        signature,
    }
}

/// Sign the membership grant of `peer_id` at `now_ms`: any artifact ([`ANY_ARTIFACT`]),
/// expiring [`MEMBERSHIP_TTL_MS`] after `now_ms` rounded down to [`MEMBERSHIP_STEP_MS`].
pub fn sign_membership(signer: &TicketSigner, peer_id: &str, now_ms: u64) -> SignedTicket {
    let expires = membership_expiry(now_ms);
    sign(
        signer,
        peer_id,
        ANY_ARTIFACT,
        now_ms,
        expires.saturating_sub(now_ms),
    )
}

/// When a membership grant signed at `now_ms` expires: the same for every grant signed in one
/// [`MEMBERSHIP_STEP_MS`] step, so the grant of a peer (its body and, Ed25519 being
/// deterministic, its signature) changes only once a step or when the signing key does.
pub fn membership_expiry(now_ms: u64) -> u64 {
    (now_ms - now_ms % MEMBERSHIP_STEP_MS).saturating_add(MEMBERSHIP_TTL_MS)
}

/// Check `signed` at `now_ms`: signed by a known key, not expired (with the verifier's clock
/// skew), naming `asker` (the connection's authenticated PeerId) and `sha256` (or any
/// artifact: a membership grant, [`ANY_ARTIFACT`]).
pub fn verify(
    verifier: &TicketVerifier,
    signed: &SignedTicket,
    now_ms: u64,
    asker: &str,
    sha256: &str,
) -> Result<ArtifactGrant, GrantError> {
    if signed.body.is_empty() && signed.signature.is_empty() {
        return Err(GrantError::Missing);
    }
    if signed.body.len() > MAX_GRANT_LEN {
        return Err(GrantError::Malformed);
    }
    let (grant, used): (ArtifactGrant, usize) =
        bincode::serde::decode_from_slice(&signed.body, codec())
            .map_err(|_| GrantError::Malformed)?;
    if used != signed.body.len() {
        return Err(GrantError::Malformed);
    }
    verifier
        .check_message(grant.key_id, &message(&signed.body), &signed.signature)
        .map_err(GrantError::Signature)?;
    if now_ms > grant.expires_unix_ms.saturating_add(verifier.skew_ms()) {
        return Err(GrantError::Expired(now_ms - grant.expires_unix_ms));
    }
    if grant.peer_id != asker {
        return Err(GrantError::WrongPeer {
            granted: grant.peer_id,
            asker: asker.to_string(),
        });
    }
    if grant.sha256 != sha256 && grant.sha256 != ANY_ARTIFACT {
        return Err(GrantError::WrongArtifact {
            granted: grant.sha256,
            asked: sha256.to_string(),
        });
    }
    Ok(grant)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_proto::RouteTicket;

    const NOW: u64 = 1_700_000_000_000;
    const A: &str = "12D3KooWA";
    const SHA: &str = "aa";

    fn setup() -> (TicketSigner, TicketVerifier) {
        let signer = TicketSigner::ephemeral(NOW).unwrap();
        let verifier = TicketVerifier::new(&signer.public_keys());
        (signer, verifier)
    }

    #[test]
    fn a_grant_admits_its_peer_for_its_artifact_until_it_expires() {
        let (signer, verifier) = setup();
        let g = sign(&signer, A, SHA, NOW, 60_000);
        let ok = verify(&verifier, &g, NOW + 1000, A, SHA).unwrap();
        assert_eq!((ok.peer_id.as_str(), ok.sha256.as_str()), (A, SHA));
        // Another peer presenting it.
        let e = verify(&verifier, &g, NOW, "12D3KooWB", SHA).unwrap_err();
        assert!(matches!(e, GrantError::WrongPeer { .. }), "{e}");
        assert!(e.to_string().contains("12D3KooWB"), "{e}");
        // Another artifact.
        let e = verify(&verifier, &g, NOW, A, "bb").unwrap_err();
        assert!(matches!(e, GrantError::WrongArtifact { .. }), "{e}");
        // Expired (past the skew too).
        let late = NOW + 60_000 + crate::ticket::CLOCK_SKEW_MS + 5;
        assert_eq!(
            verify(&verifier, &g, late, A, SHA).unwrap_err(),
            GrantError::Expired(crate::ticket::CLOCK_SKEW_MS + 5)
        );
        // Within the skew: still valid.
        assert!(verify(&verifier, &g, NOW + 60_000 + 1, A, SHA).is_ok());
        // None at all.
        assert_eq!(
            verify(&verifier, &SignedTicket::default(), NOW, A, SHA).unwrap_err(),
            GrantError::Missing
        );
    }

    #[test]
    fn a_membership_grant_admits_its_peer_for_any_artifact_until_it_expires() {
        let (signer, verifier) = setup();
        let now = NOW + 7 * 60 * 1000 + 123;
        let g = sign_membership(&signer, A, now);
        // Any artifact, for its peer.
        for sha in [SHA, "bb"] {
            let ok = verify(&verifier, &g, now + 1000, A, sha).unwrap();
            assert_eq!(ok.sha256, ANY_ARTIFACT);
        }
        // Its expiry: the issue time rounded down to the step, plus the validity; the same
        // grant (same bytes) for the whole step.
        let expires = now - now % MEMBERSHIP_STEP_MS + MEMBERSHIP_TTL_MS;
        let ok = verify(&verifier, &g, now, A, SHA).unwrap();
        assert_eq!(ok.expires_unix_ms, expires);
        assert!(expires - now > MEMBERSHIP_TTL_MS - MEMBERSHIP_STEP_MS);
        assert_eq!(sign_membership(&signer, A, now + 60_000), g);
        assert_ne!(
            sign_membership(
                &signer,
                A,
                now - now % MEMBERSHIP_STEP_MS + MEMBERSHIP_STEP_MS
            ),
            g
        );
        // Another peer presenting it.
        let e = verify(&verifier, &g, now, "12D3KooWB", SHA).unwrap_err();
        assert!(matches!(e, GrantError::WrongPeer { .. }), "{e}");
        // Expired (past the skew).
        let late = expires + crate::ticket::CLOCK_SKEW_MS + 1;
        assert_eq!(
            verify(&verifier, &g, late, A, SHA).unwrap_err(),
            GrantError::Expired(crate::ticket::CLOCK_SKEW_MS + 1)
        );
        // An artifact grant is no membership grant: it still names its one artifact.
        let one = sign(&signer, A, SHA, now, 60_000);
        assert!(matches!(
            verify(&verifier, &one, now, A, "bb").unwrap_err(),
            GrantError::WrongArtifact { .. }
        ));
    }

    #[test]
    fn unknown_keys_forged_bodies_and_route_tickets_are_refused() {
        let (signer, verifier) = setup();
        let g = sign(&signer, A, SHA, NOW, 60_000);
        // Another mesh's coordinator (a key this holder does not know under that id, or a
        // different key under the same id).
        let (other, _) = setup();
        let foreign = sign(&other, A, SHA, NOW, 60_000);
        let e = verify(&verifier, &foreign, NOW, A, SHA).unwrap_err();
        assert!(
            matches!(e, GrantError::Signature(TicketError::BadSignature)),
            "{e}"
        );
        let e = verify(&TicketVerifier::new(&[]), &g, NOW, A, SHA).unwrap_err();
        assert!(
            matches!(e, GrantError::Signature(TicketError::UnknownKey(1))),
            "{e}"
        );
        // A body changed after signing (another peer id swapped in).
        let mut grant: ArtifactGrant = bincode::serde::decode_from_slice(&g.body, codec())
            .unwrap()
            .0;
        grant.peer_id = "12D3KooWB".into();
        let forged = SignedTicket {
            body: bincode::serde::encode_to_vec(&grant, codec()).unwrap(),
            signature: g.signature.clone(),
        };
        let e = verify(&verifier, &forged, NOW, "12D3KooWB", SHA).unwrap_err();
        assert!(matches!(e, GrantError::Signature(_)), "{e}");
        // Garbage.
        let junk = SignedTicket {
            body: vec![0xff; 8],
            signature: vec![1; 64],
        };
        assert_eq!(
            verify(&verifier, &junk, NOW, A, SHA).unwrap_err(),
            GrantError::Malformed
        );
        // A route ticket (same keys) is no grant, and a grant is no route ticket.
        let t = signer.sign(
            RouteTicket {
                key_id: 0,
                tenant: A.into(),
                model: SHA.into(),
                versions: vec!["1".into()],
                expires_unix_ms: NOW + 60_000,
                max_rps: None,
                max_concurrent: None,
                issued_unix_ms: NOW,
                offline_validity_ms: 60_000,
            },
            NOW,
        );
        assert!(verify(&verifier, &t, NOW, A, SHA).is_err());
        assert!(verifier.verify(&g, NOW, SHA, None).is_err());
    }
}
