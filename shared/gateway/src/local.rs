//! [`LocalNode`]: what a gateway running inside a node (`skein-node --http`) asks that node
//! before the mesh: whether the caller's key is valid (the node caches the coordinator's
//! answer), and whether the model runs right here.
//!
//! ```text
//!  HTTP ──▶ routes ──▶ LocalNode::authorize ──▶ LocalNode::infer ──▶ the node's executor
//!                                                      └─ NotHere ──▶ skein_client ──QUIC──▶ nodes
//! ```

use skein_client::{ApiKey, InferOptions, InferResult};
use skein_proto::Tensor;
use std::future::Future;
use std::pin::Pin;

/// A boxed future that can cross threads (the trait is used as `dyn LocalNode`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the node did with a request.
#[derive(Debug)]
pub enum LocalOutcome {
    /// The node ran it (or refused it, e.g. overloaded): this is the answer.
    Served(Result<InferResult, skein_client::Error>),
    /// The model is not loaded here: the inputs, given back to go over the mesh.
    NotHere(Vec<Tensor>),
}

/// The node a gateway serves from.
pub trait LocalNode: Send + Sync + 'static {
    /// Whether `key` (`None`: the request had none) may call models: `Unauthenticated` (401)
    /// for an unknown or revoked key, `Forbidden` (403) without the `invoke` scope, a transport
    /// error (503) when it cannot be checked now.
    fn authorize<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
    ) -> BoxFuture<'a, Result<(), skein_client::Error>>;

    /// Run `model` here when it is loaded here (`opts.api_key` has passed
    /// [`authorize`](Self::authorize)); otherwise give the inputs back.
    fn infer<'a>(
        &'a self,
        model: &'a str,
        inputs: Vec<Tensor>,
        opts: &'a InferOptions,
    ) -> BoxFuture<'a, LocalOutcome>;

    /// `Ok` while the node serves (its coordinator answers its heartbeats and it is not
    /// draining); else why not. `/v2/health/ready` answers this.
    fn ready(&self) -> Result<(), String>;
}
