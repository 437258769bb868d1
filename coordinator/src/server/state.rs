//! [`State`]: everything the coordinator knows about the mesh, behind one lock
//! ([`Shared::state`]), and the lookups every request kind uses (a model a caller may see or
//! change, the joined node that holds a certificate).
//!
//! [`Shared::state`]: super::Shared::state

use super::err;
use crate::access::Caller;
use crate::membership::Membership;
use crate::scaler::Scaler;
use skein_policy::vivaldi::Vivaldi;
use skein_proto::{ErrorCode, ModelInfo, WireError};
use skein_store::{NodeRecord, Registry, Scope};
use std::collections::HashMap;

/// The coordinator's view of the mesh: changed only under the lock of
/// [`Shared::state`](super::Shared::state), so every handler sees (and leaves) the parts
/// consistent with each other.
pub(super) struct State {
    /// Model versions, traffic splits, join tokens, node identities (`registry.sqlite`).
    pub(super) registry: Registry,
    /// Nodes, their heartbeats, load and health.
    pub(super) membership: Membership,
    /// The coordinator's own network coordinate, updated from every heartbeat's RTT.
    pub(super) vivaldi: Vivaldi,
    /// Replicas, warm nodes, keep-alive and pre-warming per model version.
    pub(super) scaler: Scaler,
    /// Each joined node's control connection (closed when the node is revoked).
    pub(super) node_conns: HashMap<String, quinn::Connection>,
    /// Each node's libp2p PeerId, bound at join (or at its first heartbeat with a proven
    /// binding, for a node that joined before this coordinator started): a heartbeat naming
    /// another is refused, so callers that dial the PeerId reach this node.
    pub(super) peer_ids: HashMap<String, String>,
    /// Pre-warm staggering (issue 20): which node fetches an artifact no node holds yet.
    pub(super) first_fetches: crate::artifacts::FirstFetches,
}

impl State {
    /// The joined, unrevoked node that holds the certificate `peer`.
    pub(super) fn node(&self, peer: Option<&str>, to: &str) -> Result<NodeRecord, WireError> {
        let rec = self.node_even_revoked(peer, to)?;
        if rec.revoked_unix_ms.is_some() {
            return Err(err(
                ErrorCode::Forbidden,
                format!(
                    "node {} has been revoked; start it with a fresh data dir and a new join token",
                    rec.node_id
                ),
            ));
        }
        Ok(rec)
    }

    /// The joined node that holds the certificate `peer`, revoked or not.
    pub(super) fn node_even_revoked(
        &self,
        peer: Option<&str>,
        to: &str,
    ) -> Result<NodeRecord, WireError> {
        let fp = peer.ok_or_else(|| {
            err(
                ErrorCode::Unauthenticated,
                format!("{to} needs the node's certificate"),
            )
        })?;
        let rec = self.registry.node_by_fingerprint(fp)?.ok_or_else(|| {
            err(
                ErrorCode::UnknownNode,
                "this certificate belongs to no joined node; join again with a join token",
            )
        })?;
        Ok(rec)
    }

    pub(super) fn find_model(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<ModelInfo, WireError> {
        let reg = &self.registry;
        // With a traffic split, the default version is its heaviest one (the pointer).
        let pointer = match version {
            Some(_) => None,
            None => reg
                .traffic(name)?
                .into_iter()
                .max_by_key(|w| w.weight)
                .map(|w| w.version),
        };
        let version = version.or(pointer.as_deref());
        match reg.model(name, version)? {
            Some(m) => Ok(m),
            None if version.is_some() && reg.has_model(name)? => Err(err(
                ErrorCode::UnknownVersion,
                format!(
                    "model `{name}` has no version `{}`; `skein models` lists the versions",
                    version.unwrap_or_default()
                ),
            )),
            None => Err(err(
                ErrorCode::UnknownModel,
                format!("no model named `{name}` is deployed; `skein models` lists them"),
            )),
        }
    }

    /// Like [`find_model`](Self::find_model), for `caller`: another tenant's private model
    /// is as unknown as a model never deployed.
    pub(super) fn visible_model(
        &self,
        caller: &Caller,
        name: &str,
        version: Option<&str>,
    ) -> Result<ModelInfo, WireError> {
        let hidden = || {
            err(
                ErrorCode::UnknownModel,
                format!("no model named `{name}` is deployed; `skein models` lists them"),
            )
        };
        // Visibility is decided on the latest version (owner and sharing are per model).
        let latest = self.find_model(name, None).map_err(|e| match e.code {
            ErrorCode::UnknownModel => hidden(),
            _ => e,
        })?;
        if !caller.may_see(&latest) {
            return Err(hidden());
        }
        match version {
            None => Ok(latest),
            Some(_) => self.find_model(name, version),
        }
    }

    /// A model `caller` may change (scale, split, deploy versions of).
    pub(super) fn owned_model(
        &self,
        caller: &Caller,
        name: &str,
        version: Option<&str>,
    ) -> Result<ModelInfo, WireError> {
        caller.require(Scope::Deploy, "change deployments")?;
        let m = self.visible_model(caller, name, version)?;
        if !caller.may_change(&m) {
            return Err(err(
                ErrorCode::Forbidden,
                format!("model `{name}` is shared with you by tenant `{}`; only its owner may change it", m.owner),
            ));
        }
        Ok(m)
    }
}
