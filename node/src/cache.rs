//! Content-addressed artifact cache: `<data_dir>/cache/<sha256>`, fetched from the coordinator
//! in chunks, resumable (`.partial` files), verified before use.

use sha2::{Digest, Sha256};
use skein_net::stream::{read_exact, read_frame, write_frame};
use skein_proto::{CtlRequest, CtlResponse, ErrorCode, WireError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Chunk read from the stream at a time.
const CHUNK: usize = 256 * 1024;

/// The artifact cache.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
}

fn valid_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn io(ctx: &str, e: std::io::Error) -> WireError {
    WireError::new(ErrorCode::Internal, format!("{ctx}: {e}"))
}

impl ArtifactCache {
    /// Open (or create) the cache under `data_dir`.
    pub fn open(data_dir: &Path) -> std::io::Result<ArtifactCache> {
        let dir = data_dir.join("cache");
        std::fs::create_dir_all(&dir)?;
        Ok(ArtifactCache { dir })
    }

    fn path(&self, sha256: &str) -> Result<PathBuf, WireError> {
        if !valid_hash(sha256) {
            return Err(WireError::new(
                ErrorCode::Malformed,
                format!("`{sha256}` is not a sha256"),
            ));
        }
        Ok(self.dir.join(sha256))
    }

    /// Whether a verified copy is on disk.
    pub fn contains(&self, sha256: &str) -> bool {
        self.path(sha256).is_ok_and(|p| p.is_file())
    }

    /// The artifact's bytes: from disk, or fetched over `conn` (resuming a partial download),
    /// verified against `sha256` and `size` before they are stored or returned.
    pub async fn get(
        &self,
        conn: &quinn::Connection,
        sha256: &str,
        size: u64,
        max_frame_len: u32,
    ) -> Result<Vec<u8>, WireError> {
        let path = self.path(sha256)?;
        if let Ok(bytes) = tokio::fs::read(&path).await {
            if hex::encode(Sha256::digest(&bytes)) == sha256 {
                return Ok(bytes);
            }
            tracing::warn!(%sha256, "cached artifact is corrupt; fetching it again");
            let _ = tokio::fs::remove_file(&path).await;
        }
        let partial = path.with_extension("partial");
        let mut have = tokio::fs::read(&partial).await.unwrap_or_default();
        if have.len() as u64 > size {
            have.clear();
        }
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("fetching {sha256}: {e}")))?;
        let req = CtlRequest::FetchArtifact {
            sha256: sha256.to_string(),
            offset: have.len() as u64,
        };
        write_frame(&mut send, &req, &[], max_frame_len)
            .await
            .map_err(WireError::from)?;
        let _ = send.finish();
        let frame = read_frame(&mut recv, max_frame_len)
            .await
            .map_err(WireError::from)?;
        let left = match frame.header::<CtlResponse>().map_err(WireError::from)? {
            CtlResponse::Artifact { total, size: left }
                if total == size && have.len() as u64 + left == total =>
            {
                left
            }
            CtlResponse::Artifact { total, .. } => {
                return Err(WireError::new(
                    ErrorCode::HashMismatch,
                    format!(
                        "artifact {sha256} is {total} bytes at the coordinator, {size} expected"
                    ),
                ))
            }
            CtlResponse::Error(e) => return Err(e),
            other => {
                return Err(WireError::new(
                    ErrorCode::Malformed,
                    format!("unexpected answer to fetch: {other:?}"),
                ))
            }
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&partial)
            .map_err(|e| io("opening the partial download", e))?;
        if file.metadata().map(|m| m.len()).unwrap_or(0) != have.len() as u64 {
            file.set_len(0)
                .map_err(|e| io("truncating the partial download", e))?;
            file.write_all(&have)
                .map_err(|e| io("rewriting the partial download", e))?;
        }
        let mut got = 0u64;
        let mut buf = vec![0u8; CHUNK];
        while got < left {
            let n = (left - got).min(CHUNK as u64) as usize;
            read_exact(&mut recv, &mut buf[..n])
                .await
                .map_err(WireError::from)?;
            file.write_all(&buf[..n])
                .map_err(|e| io("writing the download", e))?;
            have.extend_from_slice(&buf[..n]);
            got += n as u64;
        }
        file.sync_all().map_err(|e| io("syncing the download", e))?;
        let actual = hex::encode(Sha256::digest(&have));
        if actual != sha256 {
            let _ = std::fs::remove_file(&partial);
            return Err(WireError::new(
                ErrorCode::HashMismatch,
                format!("downloaded artifact hashes to {actual}, expected {sha256}; it will be fetched again"),
            ));
        }
        std::fs::rename(&partial, &path).map_err(|e| io("storing the artifact", e))?;
        Ok(have)
    }
}
