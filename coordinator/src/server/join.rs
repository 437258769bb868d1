//! `Join`: a node brings a join token and a certificate signing request, and leaves with its
//! certificate, its node id (derived from its key) and the mesh CA.

use super::{err, internal, Reply, Shared};
use crate::access::{now_ms, ROOT_TENANT};
use crate::join_token::JoinToken;
use skein_net::tls::pem_fingerprint;
use skein_proto::{CtlResponse, ErrorCode, JoinRequest, Joined, WireError};
use skein_store::{NodeRecord, TokenCheck};

impl Shared {
    /// `Join`: checks the token, then the identity, and only then uses the token up.
    pub(super) fn join(&self, req: JoinRequest) -> Reply {
        let token: JoinToken = req
            .token
            .parse()
            .map_err(|e: crate::join_token::BadToken| {
                err(ErrorCode::InvalidJoinToken, e.to_string())
            })?;
        if token.ca_fingerprint != self.ca.fingerprint() {
            return Err(err(
                ErrorCode::InvalidJoinToken,
                "the join token belongs to another mesh (its CA fingerprint does not match this coordinator)",
            ));
        }
        // The token is checked, then the identity, and only then used up: a revoked node does
        // not burn a token. Every use of a known token, and every refusal of one (used up,
        // expired), is in the audit log as `join_tokens.use`; unknown tokens are not, so
        // strangers cannot fill the log.
        let hash = token.secret_hash();
        let hostname: String = req.hostname.chars().take(253).collect();
        let check_token = |consume: bool, node: &str| -> Result<(), WireError> {
            // The use and the count it leaves under one lock (joins racing for one token get
            // distinct counts), released before the arms take it again.
            let (check, record) = {
                let st = self.state();
                let check = st.registry.use_join_token(&hash, now_ms(), consume)?;
                (check, st.registry.join_token(&hash)?)
            };
            let r = match check {
                TokenCheck::Valid if !consume => return Ok(()),
                TokenCheck::Valid => Ok(()),
                TokenCheck::Unknown => {
                    return Err(err(
                        ErrorCode::InvalidJoinToken,
                        "the join token is not known to this coordinator",
                    ))
                }
                TokenCheck::Used => Err(self.used_up(&hash)),
                TokenCheck::Expired => Err(err(
                    ErrorCode::ExpiredJoinToken,
                    "the join token has expired; ask the admin for a new one",
                )),
            };
            let (uses, max) = record.map_or((0, None), |t| (t.uses, t.grant.max_uses));
            let id = hash.get(..12).unwrap_or(&hash);
            let of = max.map_or_else(|| "unlimited".to_string(), |m| m.to_string());
            let host: String = hostname
                .chars()
                .map(|c| {
                    if c.is_whitespace() || c == ',' {
                        '_'
                    } else {
                        c
                    }
                })
                .collect();
            // `use=3/50` on a join; `used=50/50` on a refusal (nothing was used).
            let what = if r.is_ok() { "use" } else { "used" };
            let target = format!("{id},{what}={uses}/{of},host={host}");
            let actor = if node.is_empty() { "join" } else { node };
            self.access
                .audit_as(actor, ROOT_TENANT, "join_tokens.use", &target, &r);
            r
        };
        check_token(false, "")?;
        let (node_id, cert_pem) = self.ca.sign_node_csr(&req.csr_pem).map_err(|e| {
            err(
                ErrorCode::Malformed,
                format!("bad certificate signing request: {e}"),
            )
        })?;
        if self.state().registry.node_revoked(&node_id)? {
            return Err(err(
                ErrorCode::Forbidden,
                format!("node identity {node_id} has been revoked; start the node with a fresh data dir (a new key)"),
            ));
        }
        // The node's libp2p identity, proven for this node id, checked before the token is
        // used up.
        let peer_id = match &req.peer {
            Some(b) => Some(
                skein_peer::binding::verify(b, &node_id)
                    .map_err(|e| err(ErrorCode::Malformed, format!("join refused: {e}")))?,
            ),
            None => None,
        };
        check_token(true, &node_id)?;
        // The token's labels are the node's from now on (they override its own in heartbeats).
        let labels = self
            .state()
            .registry
            .join_token(&hash)?
            .map(|t| t.grant.labels)
            .unwrap_or_default();
        let fingerprint = pem_fingerprint(&cert_pem).map_err(internal)?;
        self.state().registry.upsert_node(
            &NodeRecord {
                node_id: node_id.clone(),
                fingerprint,
                hostname: hostname.clone(),
                revoked_unix_ms: None,
                labels,
            },
            now_ms(),
        )?;
        if let Some(p) = peer_id {
            self.state().peer_ids.insert(node_id.clone(), p.to_base58());
        }
        tracing::info!(%node_id, %hostname, peer_id = ?peer_id, "node joined");
        Ok(CtlResponse::Joined(Joined {
            node_id,
            cert_pem,
            ca_pem: self.ca.cert_pem().to_string(),
        }))
    }

    /// The refusal of a token with no uses left, saying how many it had.
    fn used_up(&self, hash: &str) -> WireError {
        let max = self
            .state()
            .registry
            .join_token(hash)
            .ok()
            .flatten()
            .and_then(|t| t.grant.max_uses)
            .unwrap_or(1);
        if max == 1 {
            err(
                ErrorCode::InvalidJoinToken,
                "the join token has been used already (it admits one node); mint another with `skein join-token`",
            )
        } else {
            err(
                ErrorCode::InvalidJoinToken,
                format!("the join token has been used up: it admitted the {max} nodes it was minted for; mint another with `skein join-token --uses N`"),
            )
        }
    }
}
