//! `Join`: a node brings a join token and a certificate signing request, and leaves with its
//! certificate, its node id (derived from its key) and the mesh CA.

use super::{err, internal, Reply, Shared};
use crate::access::now_ms;
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
        // not burn a token.
        let check_token = |consume: bool| -> Result<(), WireError> {
            match self
                .state()
                .registry
                .use_join_token(&token.secret_hash(), now_ms(), consume)?
            {
                TokenCheck::Valid => Ok(()),
                TokenCheck::Used => Err(err(
                    ErrorCode::InvalidJoinToken,
                    "the join token has been used already (join tokens admit one node); mint another with `skein join-token`",
                )),
                TokenCheck::Expired => Err(err(
                    ErrorCode::ExpiredJoinToken,
                    "the join token has expired; ask the admin for a new one",
                )),
                TokenCheck::Unknown => Err(err(
                    ErrorCode::InvalidJoinToken,
                    "the join token is not known to this coordinator",
                )),
            }
        };
        check_token(false)?;
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
        check_token(true)?;
        let fingerprint = pem_fingerprint(&cert_pem).map_err(internal)?;
        let hostname: String = req.hostname.chars().take(253).collect();
        self.state().registry.upsert_node(
            &NodeRecord {
                node_id: node_id.clone(),
                fingerprint,
                hostname: hostname.clone(),
                revoked_unix_ms: None,
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
}
