//! `Admin` (join tokens and node revocation here; tenants, keys, quotas, usage and the audit
//! log in [`Access::admin`](crate::access::Access::admin)) and `ListNodes`.

use super::{err, Reply, Shared};
use crate::access::{now_ms, Caller};
use crate::join_token::JoinToken;
use skein_proto::{AdminRequest, AdminResponse, CtlResponse, ErrorCode};
use tokio::time::Instant;

impl Shared {
    pub(super) fn list_nodes(&self) -> Reply {
        Ok(CtlResponse::Nodes(
            self.state()
                .membership
                .infos(Instant::now(), self.thresholds()),
        ))
    }

    /// Admin requests: join tokens and node revocation here, the rest in [`Access::admin`].
    pub(super) fn admin(&self, caller: &Caller, req: AdminRequest) -> Reply {
        let r = match req {
            AdminRequest::MintJoinToken { ttl_s } => {
                let r = caller.require_platform("mint join tokens").and_then(|()| {
                    let ttl = if ttl_s == 0 {
                        3600
                    } else {
                        ttl_s.min(30 * 86_400)
                    };
                    let t = JoinToken::generate(&self.ca.fingerprint());
                    let expires_ms = now_ms() + ttl * 1000;
                    self.state().registry.add_join_token(
                        &t.secret_hash(),
                        Some(expires_ms),
                        true,
                        now_ms(),
                    )?;
                    Ok(AdminResponse::JoinToken {
                        token: t.to_string(),
                        expires_ms,
                    })
                });
                self.access.audit(caller, "join_tokens.mint", "", &r);
                r
            }
            AdminRequest::RevokeNode { node_id } => {
                let r = caller.require_platform("revoke nodes").and_then(|()| {
                    let conn = {
                        let mut st = self.state();
                        if !st.registry.revoke_node(&node_id, now_ms())? {
                            return Err(err(
                                ErrorCode::NotFound,
                                format!("no node `{node_id}` ever joined"),
                            ));
                        }
                        st.membership.remove(&node_id);
                        st.node_conns.remove(&node_id)
                    };
                    // Closed with the state unlocked.
                    if let Some(c) = conn {
                        c.close(1u32.into(), b"node revoked");
                    }
                    tracing::warn!(%node_id, "node revoked");
                    Ok(AdminResponse::Done)
                });
                self.access.audit(caller, "nodes.revoke", &node_id, &r);
                r
            }
            other => self.access.admin(caller, other),
        };
        r.map(CtlResponse::Admin)
    }
}
