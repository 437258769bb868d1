//! `Admin` (join tokens and node revocation here; tenants, keys, quotas, usage and the audit
//! log in [`Access::admin`](crate::access::Access::admin)) and `ListNodes`.

use super::{err, Reply, Shared};
use crate::access::{now_ms, Caller};
use crate::join_token::JoinToken;
use skein_proto::{AdminRequest, AdminResponse, CtlResponse, ErrorCode, WireError};
use skein_store::JoinTokenGrant;
use std::collections::BTreeMap;
use tokio::time::Instant;

/// The most nodes one join token may admit.
const MAX_JOIN_TOKEN_USES: u32 = 100_000;
/// The most labels one join token may give.
const MAX_JOIN_TOKEN_LABELS: usize = 32;

/// The number of nodes a minted token admits (0 asks for one), and its labels checked:
/// out-of-range counts and unusable labels are refused, never cut.
fn check_join_token_grant(uses: u32, labels: &BTreeMap<String, String>) -> Result<u32, WireError> {
    if uses > MAX_JOIN_TOKEN_USES {
        return Err(err(
            ErrorCode::Malformed,
            format!("a join token admits at most {MAX_JOIN_TOKEN_USES} nodes, not {uses}"),
        ));
    }
    if labels.len() > MAX_JOIN_TOKEN_LABELS {
        return Err(err(
            ErrorCode::Malformed,
            format!("a join token gives at most {MAX_JOIN_TOKEN_LABELS} labels"),
        ));
    }
    let name_ok = |k: &str| {
        !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    };
    for (k, v) in labels {
        if !name_ok(k) || v.len() > 253 || v.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(err(
                ErrorCode::Malformed,
                format!(
                    "label `{k}={v}`: keys are 1-63 of [A-Za-z0-9-_./], values at most 253 characters without spaces"
                ),
            ));
        }
    }
    Ok(uses.max(1))
}

/// How the audit log names a join token: the first 12 hex digits of its secret's hash (which
/// the registry keeps; the secret itself is never stored), then what it grants, in one word:
/// `3f1c9a27be05,uses=50,site=berlin-3`.
pub(super) fn join_token_audit_target(
    secret_hash: &str,
    uses: u32,
    labels: &BTreeMap<String, String>,
) -> String {
    let id = secret_hash.get(..12).unwrap_or(secret_hash);
    let mut t = format!("{id},uses={uses}");
    for (k, v) in labels {
        t.push_str(&format!(",{k}={v}"));
    }
    t
}

impl Shared {
    pub(super) fn list_nodes(&self) -> Reply {
        Ok(CtlResponse::Nodes(
            self.state()
                .membership
                .infos(Instant::now(), self.thresholds()),
        ))
    }

    /// Admin requests: join tokens and node revocation here, the rest in
    /// [`Access::admin`](crate::access::Access::admin).
    pub(super) fn admin(&self, caller: &Caller, req: AdminRequest) -> Reply {
        let r = match req {
            AdminRequest::MintJoinToken {
                ttl_s,
                uses,
                labels,
            } => {
                let mut target = String::new();
                let r = caller.require_platform("mint join tokens").and_then(|()| {
                    let ttl = if ttl_s == 0 {
                        3600
                    } else {
                        ttl_s.min(30 * 86_400)
                    };
                    let uses = check_join_token_grant(uses, &labels)?;
                    let t = JoinToken::generate(&self.ca.fingerprint());
                    let expires_ms = now_ms() + ttl * 1000;
                    target = join_token_audit_target(&t.secret_hash(), uses, &labels);
                    self.state().registry.add_join_token_grant(
                        &t.secret_hash(),
                        &JoinTokenGrant {
                            expires_unix_ms: Some(expires_ms),
                            max_uses: Some(uses),
                            labels: labels.clone(),
                        },
                        now_ms(),
                    )?;
                    Ok(AdminResponse::JoinToken {
                        token: t.to_string(),
                        expires_ms,
                        uses,
                        labels,
                    })
                });
                self.access.audit(caller, "join_tokens.mint", &target, &r);
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
