//! `FetchArtifact`: model files streamed from the artifact store, resumable at any offset.

use super::{err, internal, Shared, CHUNK};
use skein_net::stream::write_frame;
use skein_proto::{CtlResponse, ErrorCode, WireError};
use skein_store::Scope;

/// `FetchArtifact`: the bytes of artifact `sha256` from `offset` on, to a node (by its
/// certificate) or to a person with a `deploy` key who may see a model that uses it.
pub(super) async fn fetch_artifact(
    shared: &Shared,
    peer: Option<&str>,
    key: Option<&str>,
    sha256: &str,
    offset: u64,
    send: &mut quinn::SendStream,
) -> Result<(), WireError> {
    // Nodes fetch with their certificate; people with a `deploy` key, and only
    // artifacts of models they may see.
    if key.is_some() || shared.state().node(peer, "fetching artifacts").is_err() {
        let caller = shared.access.caller(key, "fetch artifacts")?;
        caller.require(Scope::Deploy, "fetch artifacts")?;
        let visible = shared
            .state()
            .registry
            .models()?
            .iter()
            .any(|m| m.sha256 == sha256 && caller.may_see(m));
        if !visible {
            return Err(err(
                ErrorCode::UnknownArtifact,
                format!("no artifact {sha256}"),
            ));
        }
    }
    send_artifact(shared, sha256, offset, send).await
}

async fn send_artifact(
    shared: &Shared,
    sha256: &str,
    offset: u64,
    send: &mut quinn::SendStream,
) -> Result<(), WireError> {
    let path = sha256
        .parse::<skein_proto::ArtifactId>()
        .map(|id| shared.store.path(&id))
        .ok()
        .filter(|p| p.is_file())
        .ok_or_else(|| err(ErrorCode::UnknownArtifact, format!("no artifact {sha256}")))?;
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(&path).await.map_err(internal)?;
    let total = file.metadata().await.map_err(internal)?.len();
    if offset > total {
        return Err(err(
            ErrorCode::Malformed,
            format!("offset {offset} is past the end of the {total}-byte artifact"),
        ));
    }
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(internal)?;
    let max = shared.config.max_frame_len;
    write_frame(
        send,
        &CtlResponse::Artifact {
            total,
            size: total - offset,
        },
        &[],
        max,
    )
    .await
    .map_err(WireError::from)?;
    let mut buf = vec![0u8; CHUNK];
    let mut left = total - offset;
    while left > 0 {
        let n = file
            .read(&mut buf[..(left.min(CHUNK as u64) as usize)])
            .await
            .map_err(internal)?;
        if n == 0 {
            return Err(internal("artifact shrank while being sent"));
        }
        send.write_all(&buf[..n]).await.map_err(internal)?;
        shared.store.count_sent(n as u64);
        left -= n as u64;
    }
    Ok(())
}
