//! Content-addressed artifact cache: `<data_dir>/cache/<sha256>`, downloaded with
//! [`skein_net::artifact::fetch_with`] (chunks from the coordinator and from peers that hold
//! it, each verified; resumable from `<sha256>.partial`; the whole verified before use),
//! least recently used out first when over budget. Complete files are what the node reports
//! as held ([`ArtifactCache::held`]) and serves to peers ([`ArtifactCache::complete_path`]).

use sha2::{Digest, Sha256};
use skein_net::artifact::{self, ArtifactSource, FetchRequest, FetchStats, PeerChunks};
use skein_proto::{ArtifactId, ErrorCode, WireError};
use std::path::{Path, PathBuf};

/// The largest artifact a node downloads (the coordinator's upload bound is far lower).
const MAX_ARTIFACT: u64 = 64 << 30;

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

fn parse(sha256: &str) -> Result<ArtifactId, WireError> {
    sha256.parse().map_err(|e: skein_proto::InvalidArtifactId| {
        WireError::new(ErrorCode::Malformed, e.to_string())
    })
}

impl ArtifactCache {
    /// Open (or create) the cache under `data_dir`, holding at most `budget` bytes.
    pub fn open(data_dir: &Path, budget: u64) -> std::io::Result<ArtifactCache> {
        let dir = data_dir.join("cache");
        std::fs::create_dir_all(&dir)?;
        Ok(ArtifactCache { dir, budget })
    }

    fn path(&self, id: &ArtifactId) -> PathBuf {
        self.dir.join(id.as_str())
    }

    /// Whether a complete copy is on disk (verified when it was stored; checked again on use).
    pub fn contains(&self, sha256: &str) -> bool {
        parse(sha256).is_ok_and(|id| self.path(&id).is_file())
    }

    /// The path of a complete copy of `sha256` (stored only once verified), if there is one.
    pub fn complete_path(&self, sha256: &str) -> Option<PathBuf> {
        let id = parse(sha256).ok()?;
        let p = self.path(&id);
        p.is_file().then_some(p)
    }

    /// The artifacts held complete (hex sha256), at most `max`, most recently used first.
    pub fn held(&self, max: usize) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found: Vec<(std::time::SystemTime, String)> = dir
            .filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().into_string().ok()?;
                parse(&name).ok()?;
                let modified = e.metadata().ok()?.modified().ok()?;
                Some((modified, name))
            })
            .collect();
        found.sort_by(|a, b| b.cmp(a));
        found.into_iter().take(max).map(|(_, n)| n).collect()
    }

    /// The artifact's bytes: from disk, or fetched from `source` and the holders it names
    /// (through `peers`, when the node runs a peer layer), resuming a partial download, every
    /// chunk and the whole verified against `sha256` and `size` before they are stored or
    /// returned. Bytes by source, bad chunks and bans are counted in `stats`.
    pub async fn get<S: ArtifactSource, P: PeerChunks>(
        &self,
        source: &S,
        peers: Option<&P>,
        stats: &FetchStats,
        sha256: &str,
        size: u64,
    ) -> Result<Vec<u8>, WireError> {
        let id = parse(sha256)?;
        let path = self.path(&id);
        if let Ok(bytes) = tokio::fs::read(&path).await {
            if ArtifactId::from_digest(&Sha256::digest(&bytes).into()) == id {
                // Recently used: last out when the cache is over budget.
                if let Ok(f) = std::fs::File::options().write(true).open(&path) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
                return Ok(bytes);
            }
            tracing::warn!(%sha256, "cached artifact is corrupt; fetching it again");
            let _ = tokio::fs::remove_file(&path).await;
        }
        let fetched = artifact::fetch_with(
            source,
            peers,
            &FetchRequest {
                id: &id,
                size: Some(size),
                max_size: MAX_ARTIFACT,
                dest: Some(&path),
            },
            stats,
        )
        .await?;
        if fetched.resumed_from > 0 {
            tracing::info!(%sha256, resumed_from = fetched.resumed_from, received = fetched.received, "artifact download resumed");
        }
        if let Err(e) = evict(&self.dir, self.budget, id.as_str()) {
            tracing::warn!(error = %e, "artifact cache eviction failed");
        }
        Ok(fetched.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skein_net::artifact::{FetchError, NoPeers};
    use skein_proto::ArtifactSources;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A source holding one artifact, counting how often it is asked for it.
    struct Memory(Vec<u8>, AtomicU32);

    impl ArtifactSource for Memory {
        async fn sources(&self, _id: &ArtifactId) -> Result<ArtifactSources, FetchError> {
            self.1.fetch_add(1, Ordering::SeqCst);
            let m = artifact::manifest_of_reader(&self.0[..], 4).unwrap();
            Ok(ArtifactSources {
                manifest: artifact::manifest_to_wire(&m),
                holders: Vec::new(),
                grant: Default::default(),
            })
        }

        async fn range(
            &self,
            _id: &ArtifactId,
            offset: u64,
            len: u64,
        ) -> Result<Vec<u8>, FetchError> {
            let end = (offset + len).min(self.0.len() as u64);
            Ok(self.0[offset as usize..end as usize].to_vec())
        }
    }

    #[tokio::test]
    async fn a_cached_copy_is_used_a_corrupt_one_fetched_again_and_bad_names_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(dir.path(), 1 << 20).unwrap();
        let bytes = b"model bytes".to_vec();
        let sha = hex::encode(Sha256::digest(&bytes));
        let src = Memory(bytes.clone(), AtomicU32::new(0));
        let stats = FetchStats::default();
        assert!(!cache.contains(&sha));
        assert!(cache.held(8).is_empty());
        let size = bytes.len() as u64;
        assert_eq!(
            cache
                .get(&src, None::<&NoPeers>, &stats, &sha, size)
                .await
                .unwrap(),
            bytes
        );
        assert!(cache.contains(&sha));
        assert_eq!(cache.held(8), vec![sha.clone()]);
        assert!(cache.complete_path(&sha).is_some());
        assert_eq!(stats.from_coordinator.load(Ordering::Relaxed), size);
        // From disk: the source is not asked again.
        assert_eq!(
            cache
                .get(&src, None::<&NoPeers>, &stats, &sha, size)
                .await
                .unwrap(),
            bytes
        );
        assert_eq!(src.1.load(Ordering::SeqCst), 1);
        // A corrupt copy on disk is fetched again.
        std::fs::write(dir.path().join("cache").join(&sha), b"garbage").unwrap();
        assert_eq!(
            cache
                .get(&src, None::<&NoPeers>, &stats, &sha, size)
                .await
                .unwrap(),
            bytes
        );
        assert_eq!(src.1.load(Ordering::SeqCst), 2);
        // Names that are not a sha256 never reach the disk or the source.
        for bad in ["../../etc/passwd", &sha.to_ascii_uppercase()] {
            let e = cache
                .get(&src, None::<&NoPeers>, &stats, bad, size)
                .await
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::Malformed, "{e:?}");
            assert!(!cache.contains(bad));
        }
        assert_eq!(src.1.load(Ordering::SeqCst), 2);
    }

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
