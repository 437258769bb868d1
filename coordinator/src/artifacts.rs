//! Content-addressed model artifacts on disk: `<dir>/sha256/<hex>`, written atomically. An
//! [`ArtifactId`] is a valid sha256, so it is safe as a file name.
//!
//! Beside each artifact, its chunk manifest (issue 20): `<dir>/manifests/<hex>`, written at
//! upload and rebuilt from the artifact when missing or unreadable (artifacts stored before
//! manifests existed). Its format: `SKM1`, the chunk size and the total size (u64 LE each),
//! then the sha256 of every chunk.

use sha2::{Digest, Sha256};
use skein_policy::artifact::ChunkManifest;
use skein_proto::ArtifactId;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The id (sha256) of `bytes`.
pub fn artifact_id(bytes: &[u8]) -> ArtifactId {
    ArtifactId::from_digest(&Sha256::digest(bytes).into())
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    artifact_id(bytes).to_string()
}

/// The artifact store.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
    /// Artifact bytes sent to fetchers since the store was opened (shared by clones).
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Manifest digests by artifact (issue 20: heartbeat answers name them), read once.
    digests: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<ArtifactId, String>>>,
}

/// Manifest digests [`ArtifactStore::manifest_digest`] keeps in memory at most (then it
/// starts over: a re-read costs one small file).
const MAX_DIGESTS: usize = 4096;

impl ArtifactStore {
    /// Open (or create) the store under `dir`.
    pub fn open(dir: &Path) -> std::io::Result<ArtifactStore> {
        let dir = dir.join("artifacts");
        std::fs::create_dir_all(dir.join("sha256"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        std::fs::create_dir_all(dir.join("manifests"))?;
        Ok(ArtifactStore {
            dir,
            sent: Default::default(),
            digests: Default::default(),
        })
    }

    /// The digest of artifact `id`'s chunk manifest (`skein_net::artifact::manifest_digest`),
    /// from memory or the manifest file beside it; `None` when that file is missing or
    /// unreadable (it is never rebuilt here: this runs in the heartbeat's path; the next
    /// `ArtifactSources` rebuilds it).
    pub fn manifest_digest(&self, id: &ArtifactId) -> Option<String> {
        let mut memo = self.digests.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = memo.get(id) {
            return Some(d.clone());
        }
        let m = std::fs::read(self.manifest_path(id))
            .ok()
            .and_then(|b| decode_manifest(&b, id))?;
        let d = skein_net::artifact::manifest_digest(&skein_net::artifact::manifest_to_wire(&m));
        if memo.len() >= MAX_DIGESTS {
            memo.clear();
        }
        memo.insert(id.clone(), d.clone());
        Some(d)
    }

    /// Count `n` artifact bytes sent to a fetcher.
    pub fn count_sent(&self, n: u64) {
        self.sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Artifact bytes sent to fetchers since the store was opened: a resumed fetch adds only
    /// what the fetcher did not have.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Path of the artifact `id`.
    pub fn path(&self, id: &ArtifactId) -> PathBuf {
        self.dir.join("sha256").join(id.as_str())
    }

    /// Whether the artifact is present.
    pub fn contains(&self, id: &ArtifactId) -> bool {
        self.path(id).is_file()
    }

    /// Store `bytes` whose hash the caller has verified to be `id`; durable on return.
    pub fn put(&self, id: &ArtifactId, bytes: &[u8]) -> std::io::Result<PathBuf> {
        let dest = self.path(id);
        if dest.is_file() {
            return Ok(dest);
        }
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{id}.{}", std::process::id()));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &dest)?;
        let m = skein_net::artifact::manifest_of_reader(
            bytes,
            skein_net::artifact::chunk_size_for(bytes.len() as u64),
        )?;
        self.write_manifest(id, &m)?;
        Ok(dest)
    }

    fn manifest_path(&self, id: &ArtifactId) -> PathBuf {
        self.dir.join("manifests").join(id.as_str())
    }

    /// The chunk manifest of artifact `id` (present): read from beside it, or built from its
    /// bytes and written there (blocking IO: call it off the async runtime).
    pub fn manifest(&self, id: &ArtifactId) -> std::io::Result<ChunkManifest> {
        let file = std::fs::File::open(self.path(id))?;
        let len = file.metadata()?.len();
        if let Some(m) = std::fs::read(self.manifest_path(id))
            .ok()
            .and_then(|b| decode_manifest(&b, id))
            .filter(|m| m.total_bytes() == len)
        {
            return Ok(m);
        }
        let m = skein_net::artifact::manifest_of_reader(
            std::io::BufReader::new(file),
            skein_net::artifact::chunk_size_for(len),
        )?;
        if m.sha256() != &digest_of(id) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("stored artifact {id} does not hash to its name"),
            ));
        }
        tracing::info!(artifact = %id, chunks = m.chunk_count(), "chunk manifest rebuilt");
        self.write_manifest(id, &m)?;
        Ok(m)
    }

    fn write_manifest(&self, id: &ArtifactId, m: &ChunkManifest) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(20 + 32 * m.chunk_count() as usize);
        b.extend_from_slice(MANIFEST_MAGIC);
        b.extend_from_slice(&m.chunk_bytes().to_le_bytes());
        b.extend_from_slice(&m.total_bytes().to_le_bytes());
        for i in 0..m.chunk_count() {
            b.extend_from_slice(m.chunk_digest(i).map_or(&[0u8; 32][..], |d| &d[..]));
        }
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{id}.manifest.{}", std::process::id()));
        std::fs::write(&tmp, &b)?;
        std::fs::rename(&tmp, self.manifest_path(id))
    }
}

/// Pre-warm staggering: while no node holds an artifact, one node at a time is told to
/// pre-load it (and so fetch it from the coordinator); the others are told once a node
/// reports holding it, and then fetch its chunks from that node (and from each other) over
/// the peer layer, instead of all pulling it over the coordinator's uplink at once. A first
/// fetcher that takes longer than [`FirstFetches::wait`] releases the others (it may have
/// died; they then fetch from the coordinator as before).
///
/// The coordinator side was chosen over a fetcher that waits for holders: only the
/// coordinator sees every node's assignment at once, the wait costs nothing on nodes, and a
/// request-triggered load is never delayed (it does not go through pre-warm assignments).
#[derive(Debug, Default)]
pub struct FirstFetches {
    /// Artifact → the node fetching it first, since when.
    first: std::collections::HashMap<String, (String, tokio::time::Instant)>,
}

/// Artifacts being first-fetched that are remembered at most.
const MAX_FIRST_FETCHES: usize = 1024;

impl FirstFetches {
    /// How long the others wait for the first fetcher of an artifact of `size` bytes: 60 s
    /// plus a second per MiB (an uplink of 8 Mbit/s moves about a MiB a second).
    pub fn wait(size: u64) -> std::time::Duration {
        std::time::Duration::from_secs(60 + size / (1 << 20))
    }

    /// Whether `node` may pre-load artifact `sha256` (`size` bytes) at `now`, given whether
    /// any alive node holds it already. (`sha256` may carry a group, `<sha256>@<site>`: then
    /// each site has its first fetcher.)
    pub fn admit(
        &mut self,
        sha256: &str,
        size: u64,
        node: &str,
        held: bool,
        now: tokio::time::Instant,
    ) -> bool {
        if held {
            self.first.remove(sha256);
            return true;
        }
        match self.first.get(sha256) {
            Some((first, since)) => {
                first == node || now.saturating_duration_since(*since) >= Self::wait(size)
            }
            None => {
                if self.first.len() >= MAX_FIRST_FETCHES {
                    self.first.clear();
                }
                self.first
                    .insert(sha256.to_string(), (node.to_string(), now));
                true
            }
        }
    }
}

const MANIFEST_MAGIC: &[u8; 4] = b"SKM1";

fn digest_of(id: &ArtifactId) -> [u8; 32] {
    let mut d = [0u8; 32];
    if let Ok(b) = hex::decode(id.as_str()) {
        if b.len() == 32 {
            d.copy_from_slice(&b);
        }
    }
    d
}

fn decode_manifest(b: &[u8], id: &ArtifactId) -> Option<ChunkManifest> {
    let rest = b.strip_prefix(MANIFEST_MAGIC)?;
    let chunk_bytes = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let total = u64::from_le_bytes(rest.get(8..16)?.try_into().ok()?);
    let digests = rest.get(16..)?;
    if digests.len() % 32 != 0 {
        return None;
    }
    let chunks: Vec<[u8; 32]> = digests
        .chunks_exact(32)
        .filter_map(|c| c.try_into().ok())
        .collect();
    // The whole file's digest is the artifact's name.
    ChunkManifest::new(total, chunk_bytes, digest_of(id), chunks).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node_fetches_an_artifact_nobody_holds_the_others_once_it_is_held_or_late() {
        let mut f = FirstFetches::default();
        let t0 = tokio::time::Instant::now();
        let size = 20 << 20;
        assert!(f.admit("a", size, "n1", false, t0));
        // The first fetcher keeps its assignment; the others wait.
        assert!(f.admit("a", size, "n1", false, t0));
        assert!(!f.admit("a", size, "n2", false, t0));
        assert!(!f.admit("a", size, "n3", false, t0));
        // Another artifact has its own first fetcher.
        assert!(f.admit("b", size, "n2", false, t0));
        // Held somewhere: everyone.
        assert!(f.admit("a", size, "n2", true, t0));
        assert!(f.admit("a", size, "n3", true, t0));
        // A first fetcher that takes too long releases the others.
        let late = t0 + FirstFetches::wait(size);
        assert!(!f.admit(
            "b",
            size,
            "n3",
            false,
            late - std::time::Duration::from_secs(1)
        ));
        assert!(f.admit("b", size, "n3", false, late));
        assert_eq!(FirstFetches::wait(size).as_secs(), 80);
    }

    #[test]
    fn put_is_content_addressed_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let s = ArtifactStore::open(dir.path()).unwrap();
        let h = artifact_id(b"abc");
        assert_eq!(h.as_str(), sha256_hex(b"abc"));
        assert!(!s.contains(&h));
        let p = s.put(&h, b"abc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        assert_eq!(p.file_name().unwrap(), h.as_str());
        s.put(&h, b"abc").unwrap();
        assert!(s.contains(&h));
        // Its manifest was recorded at upload, and is rebuilt when missing.
        let m = s.manifest(&h).unwrap();
        assert_eq!((m.total_bytes(), m.chunk_count()), (3, 1));
        assert_eq!(m.sha256(), &digest_of(&h));
        std::fs::remove_file(s.manifest_path(&h)).unwrap();
        assert_eq!(s.manifest(&h).unwrap(), m);
        assert!(s.manifest_path(&h).is_file());
        // A damaged manifest file is rebuilt too.
        std::fs::write(s.manifest_path(&h), b"SKM1junk").unwrap();
        assert_eq!(s.manifest(&h).unwrap(), m);
        // Names that are not a sha256 (paths, upper case) never become an id, so never a path.
        assert!("../etc/passwd".parse::<ArtifactId>().is_err());
        assert!(h
            .as_str()
            .to_ascii_uppercase()
            .parse::<ArtifactId>()
            .is_err());
    }
}
