//! Content-addressed artifact cache: `<data_dir>/cache/<sha256>`, fetched from the coordinator
//! in chunks, resumable (`.partial` files), verified before use.

use sha2::{Digest, Sha256};
use skein_net::stream::{read_exact, read_frame, write_frame};
use skein_proto::{CtlEnvelope, CtlRequest, CtlResponse, ErrorCode, WireError};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Chunk read from the stream at a time.
const CHUNK: usize = 256 * 1024;

/// The artifact cache.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    budget: u64,
}

/// Remove least recently used artifacts (by modification time) until the cache holds at most
/// `budget` bytes; `keep` stays. Partial downloads count too and go first when oldest.
pub fn evict(dir: &Path, budget: u64, keep: &str) -> std::io::Result<u64> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let meta = e.metadata()?;
        if meta.is_file() {
            files.push((meta.modified()?, meta.len(), e.path()));
        }
    }
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    files.sort();
    let mut freed = 0;
    for (_, len, path) in files {
        if total <= budget {
            break;
        }
        if path.file_name().and_then(|n| n.to_str()) == Some(keep) {
            continue;
        }
        std::fs::remove_file(&path)?;
        tracing::info!(artifact = %path.display(), "evicted from the artifact cache");
        total -= len;
        freed += len;
    }
    Ok(freed)
}

fn valid_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn io(ctx: &str, e: std::io::Error) -> WireError {
    // Disk full, read-only or missing directory: say where, so the operator can fix it.
    WireError::new(
        ErrorCode::Internal,
        format!("artifact cache on this node: {ctx}: {e} (is the disk full or the cache directory unwritable?)"),
    )
}

impl ArtifactCache {
    /// Open (or create) the cache under `data_dir`, holding at most `budget` bytes.
    pub fn open(data_dir: &Path, budget: u64) -> std::io::Result<ArtifactCache> {
        let dir = data_dir.join("cache");
        std::fs::create_dir_all(&dir)?;
        Ok(ArtifactCache { dir, budget })
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
                // Recently used: last out when the cache is over budget.
                if let Ok(f) = std::fs::File::options().write(true).open(&path) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
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
        let req = CtlEnvelope::anonymous(CtlRequest::FetchArtifact {
            sha256: sha256.to_string(),
            offset: have.len() as u64,
        });
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
        if let Err(e) = evict(&self.dir, self.budget, sha256) {
            tracing::warn!(error = %e, "artifact cache eviction failed");
        }
        Ok(have)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_removes_least_recently_used_first_and_keeps_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let p = dir.path().join(name);
            std::fs::write(&p, vec![0u8; 100]).unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(t0 + std::time::Duration::from_secs(i as u64 * 10))
                .unwrap();
        }
        // "a" is the oldest but kept; "b" goes next.
        assert_eq!(evict(dir.path(), 200, "a").unwrap(), 100);
        assert!(dir.path().join("a").exists());
        assert!(!dir.path().join("b").exists());
        assert!(dir.path().join("c").exists());
        assert_eq!(evict(dir.path(), 1000, "x").unwrap(), 0);
    }
}
