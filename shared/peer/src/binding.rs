//! The binding of a node's libp2p identity to its mesh identity: the node signs its node id
//! with its libp2p key ([`bind`]); the coordinator checks the signature ([`verify`]) on the
//! node's mutually authenticated control connection, records the PeerId at join and refuses
//! another one later. A caller that dials the PeerId the coordinator named, and checks it in
//! the handshake ([`crate::Peer::open`]), knows it reached that node.

use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use skein_proto::PeerBinding;

/// What is signed: this prefix, then the node id.
const CONTEXT: &[u8] = b"skein-peer-binding/1:";

/// Why a binding is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BindingError {
    /// The public key does not decode.
    #[error("the peer binding's public key is not a libp2p key: {0}")]
    BadKey(String),
    /// The PeerId named is not the key's.
    #[error("the peer binding names {named} but its key is {actual}")]
    PeerIdMismatch {
        /// The PeerId in the binding.
        named: String,
        /// The PeerId of the key.
        actual: String,
    },
    /// The signature does not verify for this node id.
    #[error("the peer binding's signature does not verify for node {0}")]
    BadSignature(String),
    /// Signing failed.
    #[error("signing the peer binding: {0}")]
    Sign(String),
}

/// Sign `node_id` with `key`.
pub fn bind(key: &Keypair, node_id: &str) -> Result<PeerBinding, BindingError> {
    let signature = key
        .sign(&message(node_id))
        .map_err(|e| BindingError::Sign(e.to_string()))?;
    Ok(PeerBinding {
        peer_id: key.public().to_peer_id().to_base58(),
        public_key: key.public().encode_protobuf(),
        signature,
    })
}

/// The PeerId `binding` proves for `node_id`.
pub fn verify(binding: &PeerBinding, node_id: &str) -> Result<PeerId, BindingError> {
    let key = PublicKey::try_decode_protobuf(&binding.public_key)
        .map_err(|e| BindingError::BadKey(e.to_string()))?;
    let actual = key.to_peer_id();
    if actual.to_base58() != binding.peer_id {
        return Err(BindingError::PeerIdMismatch {
            named: binding.peer_id.chars().take(64).collect(),
            actual: actual.to_base58(),
        });
    }
    if !key.verify(&message(node_id), &binding.signature) {
        return Err(BindingError::BadSignature(node_id.to_string()));
    }
    Ok(actual)
}

fn message(node_id: &str) -> Vec<u8> {
    let mut m = CONTEXT.to_vec();
    m.extend_from_slice(node_id.as_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> Keypair {
        Keypair::ed25519_from_bytes([seed; 32]).unwrap()
    }

    #[test]
    fn a_binding_verifies_for_its_node_only() {
        let k = key(1);
        let b = bind(&k, "node-a").unwrap();
        assert_eq!(verify(&b, "node-a").unwrap(), k.public().to_peer_id());
        assert_eq!(
            verify(&b, "node-b").unwrap_err(),
            BindingError::BadSignature("node-b".into())
        );
    }

    #[test]
    fn a_binding_naming_another_peer_is_refused() {
        let mut b = bind(&key(1), "node-a").unwrap();
        b.peer_id = key(2).public().to_peer_id().to_base58();
        assert!(matches!(
            verify(&b, "node-a"),
            Err(BindingError::PeerIdMismatch { .. })
        ));
        // Another key's signature under the first key's name.
        let mut b = bind(&key(1), "node-a").unwrap();
        b.signature = bind(&key(2), "node-a").unwrap().signature;
        assert!(matches!(
            verify(&b, "node-a"),
            Err(BindingError::BadSignature(_))
        ));
        let mut b = bind(&key(1), "node-a").unwrap();
        b.public_key = vec![1, 2, 3];
        assert!(matches!(verify(&b, "node-a"), Err(BindingError::BadKey(_))));
    }
}
