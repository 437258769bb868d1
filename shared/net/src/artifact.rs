//! [`fetch`]: the one way an artifact is downloaded, by the node's cache (every load and
//! pre-warm) and by the SDK: in fixed-size chunks, in parallel from the coordinator and from
//! mesh nodes that hold the artifact, every chunk checked against the artifact's chunk
//! manifest as it arrives, written at its offset in a `.partial` file (a later fetch resumes
//! from it, re-checking what is there), bounded in size, and the whole file checked against
//! its sha256 before anything is stored or returned.
//!
//! ```text
//!  fetch_with(source, peers, request)
//!    source.sources(id) ─▶ manifest + holders (nearest first) + grant
//!    ChunkScheduler (skein-policy): which chunk from whom ◀─ verdicts ─┐
//!      ├─ Source::Coordinator ─▶ source.range(id, offset, len) ────────┤ sha256(chunk) ==
//!      └─ Source::Peer(k)     ─▶ peers.range(holder k, grant, ...) ────┘ manifest[i]?
//!    verified chunk ─▶ <dest>.partial at its offset; all verified ─▶ sha256(file) == id
//!    ─▶ rename to <dest>
//! ```
//!
//! A bad chunk (its digest is not the manifest's) is dropped, its source banned with
//! exponential backoff and the chunk asked of another source; nothing unverified is ever
//! written to `<dest>`. Without holders (or without a peer layer: [`NoPeers`]) the coordinator
//! alone serves every chunk, through the same code. Memory is bounded by the chunks in flight
//! ([`FetchConfig::max_in_flight`] × the chunk size) plus the returned artifact.
//!
//! The sources are traits: [`ArtifactSource`] (the coordinator: the manifest and any byte
//! range; [`CoordinatorSource`]) and [`PeerChunks`] (byte ranges from a holder, implemented
//! by the node over its peer layer's `/skein/artifact/1`).

use crate::ctl::{CtlClient, CtlError};
use crate::NetError;
use futures::stream::{FuturesUnordered, StreamExt};
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use skein_policy::artifact::{
    ChunkIndex, ChunkManifest, ChunkScheduler, ChunkVerdict, FetchConfig, PeerSource, Source,
};
use skein_proto::{
    ArtifactHolder, ArtifactId, ArtifactManifest, ArtifactSources, CtlEnvelope, CtlRequest,
    CtlResponse, ErrorCode, SignedTicket, WireError,
};
use std::collections::HashSet;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Chunk size of new manifests: 1 MiB. Over an 8 Mbit/s uplink a chunk takes about a second,
/// so a bad source costs at most that much before it is caught, a 20 MB model is spread over
/// 20 chunks among its sources, and chunks in flight hold a few MiB of memory; the manifest
/// costs 32 bytes per MiB. Artifacts over [`MAX_MANIFEST_CHUNKS`] MiB get larger chunks.
pub const CHUNK_BYTES: u64 = 1 << 20;

/// Chunks a manifest has at most (its digests stay within 512 KiB of a control frame).
pub const MAX_MANIFEST_CHUNKS: u64 = 16_384;

/// The largest chunk (or range) asked of one source at once, bytes.
pub const MAX_CHUNK_BYTES: u64 = 16 << 20;

/// A chunk request not answered within this is failed (and its source banned with backoff).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// The chunk size of an artifact of `total` bytes: [`CHUNK_BYTES`], doubled until it has at
/// most [`MAX_MANIFEST_CHUNKS`] chunks.
pub fn chunk_size_for(total: u64) -> u64 {
    let mut c = CHUNK_BYTES;
    while total.div_ceil(c) > MAX_MANIFEST_CHUNKS && c < MAX_CHUNK_BYTES {
        c *= 2;
    }
    c
}

/// The chunk manifest of the bytes `r` yields (one pass: each chunk's sha256 and the whole
/// file's), with `chunk_bytes` per chunk.
pub fn manifest_of_reader(mut r: impl Read, chunk_bytes: u64) -> std::io::Result<ChunkManifest> {
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; usize::try_from(chunk_bytes).unwrap_or(1 << 20).max(1)];
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = r.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        whole.update(&buf[..filled]);
        chunks.push(Sha256::digest(&buf[..filled]).into());
        total += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    ChunkManifest::new(total, chunk_bytes, whole.finalize().into(), chunks)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

/// The wire form of `m`.
pub fn manifest_to_wire(m: &ChunkManifest) -> ArtifactManifest {
    ArtifactManifest {
        sha256: ArtifactId::from_digest(m.sha256()).to_string(),
        total: m.total_bytes(),
        chunk_bytes: m.chunk_bytes(),
        chunks: (0..m.chunk_count())
            .filter_map(|i| m.chunk_digest(i).copied())
            .collect(),
    }
}

/// The manifest `wire` describes, checked to be artifact `id`'s and sane (chunk size within
/// bounds, one digest per chunk).
pub fn manifest_from_wire(
    id: &ArtifactId,
    wire: &ArtifactManifest,
) -> Result<ChunkManifest, FetchError> {
    let bad = |m: String| FetchError::BadManifest {
        id: id.clone(),
        message: m,
    };
    if wire.sha256 != id.as_str() {
        return Err(bad(format!("it describes artifact {}", wire.sha256)));
    }
    if wire.chunk_bytes == 0 || wire.chunk_bytes > MAX_CHUNK_BYTES {
        return Err(bad(format!(
            "chunk size {} is out of bounds",
            wire.chunk_bytes
        )));
    }
    let digest: [u8; 32] = hex::decode(&wire.sha256)
        .ok()
        .and_then(|d| d.try_into().ok())
        .ok_or_else(|| bad("its sha256 is not hex".into()))?;
    ChunkManifest::new(wire.total, wire.chunk_bytes, digest, wire.chunks.clone())
        .map_err(|e| bad(e.to_string()))
}

/// The digest binding a chunk manifest (hex sha256 over a domain tag, the artifact's id, its
/// size, the chunk size and every chunk digest): the coordinator hands it to the nodes in
/// heartbeat answers (`HeartbeatAck::manifest_digests`), so that a manifest from a LAN holder
/// is used offline only when it is the coordinator's.
pub fn manifest_digest(m: &ArtifactManifest) -> String {
    let mut h = Sha256::new();
    h.update(b"skein/manifest/1\0");
    h.update(m.sha256.as_bytes());
    h.update([0]);
    h.update(m.total.to_le_bytes());
    h.update(m.chunk_bytes.to_le_bytes());
    h.update((m.chunks.len() as u64).to_le_bytes());
    for c in &m.chunks {
        h.update(c);
    }
    hex::encode(h.finalize())
}

/// `wire`, checked to be the manifest of `id` that `digest` ([`manifest_digest`]) binds: a
/// manifest from an untrusted source (a LAN holder while the coordinator is unreachable).
pub fn bound_manifest(
    id: &ArtifactId,
    wire: &ArtifactManifest,
    digest: &str,
) -> Result<ChunkManifest, FetchError> {
    let m = manifest_from_wire(id, wire)?;
    let actual = manifest_digest(wire);
    if actual != digest {
        return Err(FetchError::BadManifest {
            id: id.clone(),
            message: format!(
                "its digest {actual} is not the {digest} the coordinator gave; refused"
            ),
        });
    }
    Ok(m)
}

/// The coordinator (or anything holding every byte of an artifact): the chunk manifest with
/// the holders, and any byte range.
pub trait ArtifactSource {
    /// The manifest of artifact `id`, its holders nearest first, and the grant to present to
    /// them.
    fn sources(
        &self,
        id: &ArtifactId,
    ) -> impl Future<Output = Result<ArtifactSources, FetchError>> + Send;

    /// Whether [`range`](Self::range) can serve bytes (default: yes). A source that only
    /// names holders (the LAN's, while the coordinator is unreachable) says no: every chunk
    /// then comes from the holders.
    fn serves_ranges(&self) -> bool {
        true
    }

    /// Bytes `[offset, offset + len)` of artifact `id` (fewer only at its end).
    fn range(
        &self,
        id: &ArtifactId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<u8>, FetchError>> + Send;
}

/// Byte ranges from a holder (a node's peer layer, `/skein/artifact/1`).
pub trait PeerChunks {
    /// Bytes `[offset, offset + len)` of artifact `id` from `holder`, presenting `grant`.
    fn range(
        &self,
        holder: &ArtifactHolder,
        grant: &SignedTicket,
        id: &ArtifactId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<u8>, FetchError>> + Send;
}

/// No peer layer: the coordinator alone ([`fetch`]).
#[derive(Debug, Clone, Copy)]
pub struct NoPeers;

impl PeerChunks for NoPeers {
    async fn range(
        &self,
        _: &ArtifactHolder,
        _: &SignedTicket,
        _: &ArtifactId,
        _: u64,
        _: u64,
    ) -> Result<Vec<u8>, FetchError> {
        Err(FetchError::Unexpected("no peer layer".into()))
    }
}

/// Counters of every fetch through one [`FetchStats`] (a node's `/metrics`).
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Verified bytes received from the coordinator.
    pub from_coordinator: AtomicU64,
    /// Verified bytes received from peers.
    pub from_peers: AtomicU64,
    /// Chunks whose digest did not match the manifest (dropped).
    pub bad_chunks: AtomicU64,
    /// Sources banned (a bad chunk, or a failed request), each time.
    pub bans: AtomicU64,
}

/// What to fetch and where to keep it.
#[derive(Debug, Clone)]
pub struct FetchRequest<'a> {
    /// The artifact.
    pub id: &'a ArtifactId,
    /// Its size, when the caller knows it (an assignment names it): the source must agree.
    pub size: Option<u64>,
    /// The largest artifact accepted, bytes.
    pub max_size: u64,
    /// Where the verified artifact is stored; the download goes to `<dest>.partial` first, and
    /// a later fetch resumes from it. `None`: in memory only (nothing to resume).
    pub dest: Option<&'a Path>,
}

/// A finished fetch.
#[derive(Debug)]
pub struct Fetched {
    /// The artifact's bytes, verified against its id.
    pub bytes: Vec<u8>,
    /// Bytes of verified chunks found in an earlier partial download (0: from the start).
    pub resumed_from: u64,
    /// Bytes received (and verified) by this fetch.
    pub received: u64,
    /// Of those, from the coordinator.
    pub from_coordinator: u64,
    /// Of those, from peers.
    pub from_peers: u64,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The source refused (unknown artifact, not allowed), with its wire error.
    #[error(transparent)]
    Remote(WireError),
    /// The source could not be reached or the transfer broke.
    #[error("fetching artifact {id}: {source}")]
    Transfer {
        /// The artifact.
        id: ArtifactId,
        /// What broke.
        #[source]
        source: NetError,
    },
    /// The source answered something other than an artifact.
    #[error("unexpected answer to an artifact fetch: {0}")]
    Unexpected(String),
    /// The source's artifact does not have the expected size.
    #[error("artifact {id} is {total} bytes at the source, {expected} expected")]
    SizeMismatch {
        /// The artifact.
        id: ArtifactId,
        /// Its size at the source.
        total: u64,
        /// The size the caller named.
        expected: u64,
    },
    /// The artifact is larger than allowed.
    #[error("artifact {id} is {size} bytes, more than the {max} allowed")]
    TooLarge {
        /// The artifact.
        id: ArtifactId,
        /// Its size.
        size: u64,
        /// The bound.
        max: u64,
    },
    /// The downloaded bytes do not hash to the artifact's id; the partial download is deleted.
    #[error("downloaded artifact hashes to {actual}, expected {id}; it will be fetched again")]
    HashMismatch {
        /// The artifact expected.
        id: ArtifactId,
        /// What the bytes hash to.
        actual: ArtifactId,
    },
    /// Local disk IO failed (full disk, unwritable directory).
    #[error("artifact cache on this host: {context}: {source} (is the disk full or the cache directory unwritable?)")]
    Disk {
        /// What was being done.
        context: &'static str,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The chunk manifest the coordinator sent is not usable.
    #[error("chunk manifest of artifact {id}: {message}")]
    BadManifest {
        /// The artifact.
        id: ArtifactId,
        /// What is wrong.
        message: String,
    },
    /// A source sent a chunk whose digest is not the manifest's (it is banned).
    #[error("artifact {id}: {from} sent a corrupt chunk {chunk}; it is banned")]
    BadChunk {
        /// The artifact.
        id: ArtifactId,
        /// The source: `the coordinator`, or `peer <PeerId>`.
        from: String,
        /// The chunk.
        chunk: ChunkIndex,
    },
}

impl From<FetchError> for WireError {
    fn from(e: FetchError) -> Self {
        let code = match &e {
            FetchError::Remote(w) => return w.clone(),
            FetchError::Transfer { source, .. } => match source {
                NetError::Timeout(_) => ErrorCode::DeadlineExceeded,
                _ => ErrorCode::Internal,
            },
            FetchError::Unexpected(_) | FetchError::BadManifest { .. } => ErrorCode::Malformed,
            FetchError::SizeMismatch { .. }
            | FetchError::HashMismatch { .. }
            | FetchError::BadChunk { .. } => ErrorCode::HashMismatch,
            FetchError::TooLarge { .. } | FetchError::Disk { .. } => ErrorCode::Internal,
        };
        WireError::new(code, e.to_string())
    }
}

fn disk(context: &'static str) -> impl FnOnce(std::io::Error) -> FetchError {
    move |source| FetchError::Disk { context, source }
}

/// The partial-download path of `dest`: `<dest>.partial`.
pub fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dest.with_file_name(name)
}

/// Where verified chunks go: the partial file (at their offsets) or memory.
enum Output {
    File {
        file: std::fs::File,
        partial: PathBuf,
    },
    Memory(Vec<u8>),
}

impl Output {
    /// Open `<dest>.partial` (kept when it exists, sized to `total`), or a buffer of `total`
    /// bytes. Returns it and the length of the partial file found (0: none).
    fn open(dest: Option<&Path>, total: u64) -> Result<(Output, u64), FetchError> {
        let Some(dest) = dest else {
            let len = usize::try_from(total).map_err(|_| {
                FetchError::Unexpected(format!("{total} bytes do not fit in memory"))
            })?;
            return Ok((Output::Memory(vec![0; len]), 0));
        };
        let partial = partial_path(dest);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(disk("opening the partial download"))?;
        let found = file
            .metadata()
            .map_err(disk("reading the partial download"))?
            .len();
        // More than the artifact holds: not this artifact's download.
        let found = if found > total {
            file.set_len(0)
                .map_err(disk("truncating the partial download"))?;
            0
        } else {
            found
        };
        file.set_len(total)
            .map_err(disk("sizing the partial download"))?;
        Ok((Output::File { file, partial }, found))
    }

    fn read_at(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, FetchError> {
        let n = usize::try_from(len).unwrap_or(0);
        match self {
            Output::File { file, .. } => {
                let mut buf = vec![0u8; n];
                file.seek(SeekFrom::Start(offset))
                    .and_then(|_| file.read_exact(&mut buf))
                    .map_err(disk("reading the partial download"))?;
                Ok(buf)
            }
            Output::Memory(m) => {
                let at = usize::try_from(offset).unwrap_or(usize::MAX);
                Ok(m.get(at..at.saturating_add(n)).unwrap_or_default().to_vec())
            }
        }
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<(), FetchError> {
        match self {
            Output::File { file, .. } => file
                .seek(SeekFrom::Start(offset))
                .and_then(|_| file.write_all(bytes))
                .map_err(disk("writing the download")),
            Output::Memory(m) => {
                let at = usize::try_from(offset).unwrap_or(usize::MAX);
                match m.get_mut(at..at.saturating_add(bytes.len())) {
                    Some(dst) => {
                        dst.copy_from_slice(bytes);
                        Ok(())
                    }
                    None => Err(FetchError::Unexpected("chunk past the end".into())),
                }
            }
        }
    }

    /// Check the whole against `id` and store it at `dest`; returns the bytes. A mismatch
    /// deletes the partial download.
    fn finish(self, id: &ArtifactId, dest: Option<&Path>) -> Result<Vec<u8>, FetchError> {
        let (bytes, partial) = match self {
            Output::File { mut file, partial } => {
                let mut bytes = Vec::new();
                file.seek(SeekFrom::Start(0))
                    .and_then(|_| file.read_to_end(&mut bytes))
                    .map_err(disk("reading the download"))?;
                file.sync_all().map_err(disk("syncing the download"))?;
                (bytes, Some(partial))
            }
            Output::Memory(m) => (m, None),
        };
        let actual = ArtifactId::from_digest(&Sha256::digest(&bytes).into());
        if actual != *id {
            if let Some(p) = &partial {
                let _ = std::fs::remove_file(p);
            }
            return Err(FetchError::HashMismatch {
                id: id.clone(),
                actual,
            });
        }
        if let (Some(p), Some(dest)) = (&partial, dest) {
            std::fs::rename(p, dest).map_err(disk("storing the artifact"))?;
        }
        Ok(bytes)
    }
}

/// The chunks of `m` wholly within the first `found` bytes of `out` whose digest matches.
fn verified_chunks(
    out: &mut Output,
    m: &ChunkManifest,
    found: u64,
) -> Result<Vec<ChunkIndex>, FetchError> {
    let mut good = Vec::new();
    for i in 0..m.chunk_count() {
        let (off, len) = (m.chunk_offset(i).unwrap_or(0), m.chunk_len(i).unwrap_or(0));
        if off + len > found {
            break;
        }
        let bytes = out.read_at(off, len)?;
        if m.verify(i, &Sha256::digest(&bytes).into()) {
            good.push(i);
        }
    }
    Ok(good)
}

/// [`fetch_with`] from the coordinator alone (the SDK).
pub async fn fetch<S: ArtifactSource>(
    source: &S,
    req: &FetchRequest<'_>,
) -> Result<Fetched, FetchError> {
    fetch_with(source, None::<&NoPeers>, req, &FetchStats::default()).await
}

fn source_name(src: Source, holders: &[ArtifactHolder]) -> String {
    match src {
        Source::Coordinator => "the coordinator".into(),
        Source::Peer(k) => holders
            .get(k as usize)
            .map_or_else(|| format!("peer #{k}"), |h| format!("peer {}", h.peer_id)),
    }
}

/// Fetch `req.id` (see the [module docs](self)): ask `source` for the manifest and holders,
/// fetch the chunks the partial download lacks from the holders (through `peers`; none when
/// `None`) and `source`, verify each, store the verified whole at `dest`. Counts go to
/// `stats` as they happen (also for a fetch that fails). A fetch fails when no source can
/// serve a missing chunk without waiting out a ban (every one refused, broke or sent bad
/// data): with the last error, keeping the verified chunks for the next fetch.
pub async fn fetch_with<S: ArtifactSource, P: PeerChunks>(
    source: &S,
    peers: Option<&P>,
    req: &FetchRequest<'_>,
    stats: &FetchStats,
) -> Result<Fetched, FetchError> {
    let id = req.id;
    if let Some(size) = req.size.filter(|&s| s > req.max_size) {
        return Err(FetchError::TooLarge {
            id: id.clone(),
            size,
            max: req.max_size,
        });
    }
    let plan = source.sources(id).await?;
    let manifest = manifest_from_wire(id, &plan.manifest)?;
    let total = manifest.total_bytes();
    if let Some(expected) = req.size.filter(|&s| s != total) {
        return Err(FetchError::SizeMismatch {
            id: id.clone(),
            total,
            expected,
        });
    }
    if total > req.max_size {
        return Err(FetchError::TooLarge {
            id: id.clone(),
            size: total,
            max: req.max_size,
        });
    }
    let holders: &[ArtifactHolder] = if peers.is_some() { &plan.holders } else { &[] };
    let grant = &plan.grant;
    let (mut out, found) = Output::open(req.dest, total)?;
    let count = manifest.chunk_count();
    // Seeded here, at the IO shell, so that nodes starting together draw different orders.
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let mut config = FetchConfig::default();
    if !source.serves_ranges() {
        config.coordinator_in_flight = 0;
    }
    let mut sched = ChunkScheduler::new(count, config, &mut rng);
    let span = |i: ChunkIndex| {
        (
            manifest.chunk_offset(i).unwrap_or(0),
            manifest.chunk_len(i).unwrap_or(0),
        )
    };
    // Resume: every whole chunk of the partial file is checked, never trusted (read and
    // hashed on the blocking pool).
    let mut resumed_from = 0u64;
    if found > 0 {
        let (o, m) = (out, manifest.clone());
        let (o, good) = tokio::task::spawn_blocking(move || {
            let mut o = o;
            let good = verified_chunks(&mut o, &m, found);
            (o, good)
        })
        .await
        .map_err(|e| FetchError::Unexpected(format!("checking the partial download: {e}")))?;
        out = o;
        for i in good? {
            sched.mark_verified(i);
            resumed_from += span(i).1;
        }
    }
    for (k, h) in holders.iter().enumerate() {
        let info = PeerSource {
            rtt_us: h.rtt_us,
            max_in_flight: None,
        };
        sched.set_peer(k as u64, info);
        sched.peer_has_all(k as u64);
    }
    let started = tokio::time::Instant::now();
    let now_us = || u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut in_flight = FuturesUnordered::new();
    // Requests the scheduler still counts (an abandoned one's answer is stale).
    let mut live: HashSet<(ChunkIndex, Source)> = HashSet::new();
    let mut last_error: Option<FetchError> = None;
    let (mut from_coordinator, mut from_peers, mut bad) = (0u64, 0u64, 0u64);
    while !sched.is_complete() {
        for (i, src) in sched.next_requests(now_us()) {
            let (off, len) = span(i);
            live.insert((i, src));
            in_flight.push(async move {
                let read = async {
                    match (src, peers) {
                        (Source::Coordinator, _) => source.range(id, off, len).await,
                        (Source::Peer(k), Some(p)) => match holders.get(k as usize) {
                            Some(h) => p.range(h, grant, id, off, len).await,
                            None => Err(FetchError::Unexpected("unknown holder".into())),
                        },
                        (Source::Peer(_), None) => Err(FetchError::Unexpected("no peers".into())),
                    }
                };
                let r = tokio::time::timeout(CHUNK_TIMEOUT, read)
                    .await
                    .unwrap_or_else(|_| {
                        Err(FetchError::Transfer {
                            id: id.clone(),
                            source: NetError::Timeout(CHUNK_TIMEOUT),
                        })
                    });
                (i, src, r)
            });
        }
        let Some((i, src, r)) = in_flight.next().await else {
            // Nothing in flight and nothing to ask: every source that could serve the
            // missing chunks is banned. Give up now (the verified chunks stay for the next
            // fetch) rather than wait out a ban.
            return Err(last_error.unwrap_or_else(|| {
                FetchError::Unexpected(format!("no source can serve artifact {id}"))
            }));
        };
        let current = live.remove(&(i, src));
        match r {
            Ok(bytes) => {
                let digest: [u8; 32] = Sha256::digest(&bytes).into();
                match sched.on_chunk(&manifest, i, src, &digest, now_us()) {
                    ChunkVerdict::Verified => {
                        let (off, _) = span(i);
                        out.write_at(off, &bytes)?;
                        let n = bytes.len() as u64;
                        match src {
                            Source::Coordinator => {
                                from_coordinator += n;
                                stats.from_coordinator.fetch_add(n, Ordering::Relaxed);
                            }
                            Source::Peer(_) => {
                                from_peers += n;
                                stats.from_peers.fetch_add(n, Ordering::Relaxed);
                            }
                        }
                    }
                    ChunkVerdict::Corrupt {
                        banned_until_us,
                        abandoned,
                    } => {
                        bad += 1;
                        stats.bad_chunks.fetch_add(1, Ordering::Relaxed);
                        for a in abandoned {
                            live.remove(&(a, src));
                        }
                        let name = source_name(src, holders);
                        if current {
                            stats.bans.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(artifact = %id, chunk = i, source = %name, banned_for_ms = banned_until_us.saturating_sub(now_us()) / 1000, "corrupt chunk: source banned, chunk asked elsewhere");
                        }
                        last_error = Some(FetchError::BadChunk {
                            id: id.clone(),
                            from: name,
                            chunk: i,
                        });
                    }
                    ChunkVerdict::Unneeded => {}
                }
            }
            Err(e) if current => {
                let until = sched.on_failed(i, src, now_us());
                stats.bans.fetch_add(1, Ordering::Relaxed);
                tracing::info!(artifact = %id, chunk = i, source = %source_name(src, holders), error = %e, banned_for_ms = until.saturating_sub(now_us()) / 1000, "chunk request failed: source banned for a while");
                last_error = Some(e);
            }
            // A request abandoned earlier (its source was banned meanwhile).
            Err(_) => {}
        }
    }
    drop(in_flight);
    // The whole file's hash, on the blocking pool.
    let (owned_id, dest) = (id.clone(), req.dest.map(Path::to_path_buf));
    let bytes = tokio::task::spawn_blocking(move || out.finish(&owned_id, dest.as_deref()))
        .await
        .map_err(|e| FetchError::Unexpected(format!("checking the download: {e}")))??;
    let received = from_coordinator + from_peers;
    tracing::info!(
        artifact = %id,
        bytes = total,
        resumed_from,
        from_coordinator,
        from_peers,
        bad_chunks = bad,
        holders = holders.len(),
        ms = started.elapsed().as_millis() as u64,
        "artifact fetched"
    );
    Ok(Fetched {
        bytes,
        resumed_from,
        received,
        from_coordinator,
        from_peers,
    })
}

/// Artifacts from the coordinator: `ArtifactSources` for the manifest and holders, and
/// `FetchArtifactRange { sha256, offset, len }` for bytes, answered by `Artifact { total,
/// size }` and `size` raw bytes on the same stream.
#[derive(Debug)]
pub struct CoordinatorSource<'a> {
    ctl: &'a CtlClient,
    api_key: Option<String>,
}

impl<'a> CoordinatorSource<'a> {
    /// Fetch through `ctl`, sending `api_key` (nodes: none, their certificate names them).
    pub fn new(ctl: &'a CtlClient, api_key: Option<String>) -> Self {
        CoordinatorSource { ctl, api_key }
    }
}

impl ArtifactSource for CoordinatorSource<'_> {
    async fn sources(&self, id: &ArtifactId) -> Result<ArtifactSources, FetchError> {
        let req = CtlEnvelope::new(
            CtlRequest::ArtifactSources {
                sha256: id.to_string(),
            },
            self.api_key.clone(),
        );
        match self.ctl.call(&req).await {
            Ok((CtlResponse::ArtifactSources(s), _)) => Ok(s),
            Ok((other, _)) => Err(FetchError::Unexpected(format!("{other:?}"))),
            Err(CtlError::Remote(w)) => Err(FetchError::Remote(w)),
            Err(CtlError::Net(n) | CtlError::Unreachable { source: n, .. }) => {
                Err(FetchError::Transfer {
                    id: id.clone(),
                    source: n,
                })
            }
        }
    }

    async fn range(&self, id: &ArtifactId, offset: u64, len: u64) -> Result<Vec<u8>, FetchError> {
        let transfer = |source: NetError| FetchError::Transfer {
            id: id.clone(),
            source,
        };
        if len > MAX_CHUNK_BYTES {
            return Err(FetchError::Unexpected(format!(
                "{len} bytes at once is more than the {MAX_CHUNK_BYTES} allowed"
            )));
        }
        let conn = self.ctl.connection().await.map_err(|e| match e {
            CtlError::Remote(w) => FetchError::Remote(w),
            CtlError::Net(n) | CtlError::Unreachable { source: n, .. } => transfer(n),
        })?;
        let max = self.ctl.config().max_frame_len;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| transfer(NetError::Connection(e)))?;
        let req = CtlEnvelope::new(
            CtlRequest::FetchArtifactRange {
                sha256: id.to_string(),
                offset,
                len,
            },
            self.api_key.clone(),
        );
        crate::stream::write_frame(&mut send, &req, &[], max)
            .await
            .map_err(transfer)?;
        let _ = send.finish();
        let frame = crate::stream::read_frame(&mut recv, max)
            .await
            .map_err(transfer)?;
        let size = match frame
            .header::<CtlResponse>()
            .map_err(|e| transfer(e.into()))?
        {
            CtlResponse::Artifact { total, size }
                if size <= len && offset.checked_add(size).is_some_and(|end| end <= total) =>
            {
                size
            }
            CtlResponse::Artifact { total, size } => {
                return Err(FetchError::Unexpected(format!(
                "the coordinator sends {size} bytes of {total} from offset {offset}, {len} asked"
            )))
            }
            CtlResponse::Error(e) => return Err(FetchError::Remote(e)),
            other => return Err(FetchError::Unexpected(format!("{other:?}"))),
        };
        let mut bytes = vec![0u8; usize::try_from(size).unwrap_or(0)];
        recv.read_exact(&mut bytes).await.map_err(|e| {
            transfer(match e {
                quinn::ReadExactError::FinishedEarly(_) => NetError::Closed,
                quinn::ReadExactError::ReadError(e) => NetError::Read(e.to_string()),
            })
        })?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// An in-memory coordinator: the manifest at `chunk` bytes per chunk, ranges from its
    /// bytes; after `fail_after` ranges every range fails (a broken link). Records offsets.
    struct Memory {
        bytes: Vec<u8>,
        chunk: u64,
        fail_after: Option<usize>,
        holders: Vec<ArtifactHolder>,
        offsets: Mutex<Vec<u64>>,
    }

    impl Memory {
        fn new(bytes: Vec<u8>, chunk: u64) -> Self {
            Memory {
                bytes,
                chunk,
                fail_after: None,
                holders: Vec::new(),
                offsets: Mutex::new(Vec::new()),
            }
        }

        fn offsets(&self) -> Vec<u64> {
            let mut o = self.offsets.lock().unwrap().clone();
            o.sort_unstable();
            o
        }
    }

    impl ArtifactSource for Memory {
        async fn sources(&self, _id: &ArtifactId) -> Result<ArtifactSources, FetchError> {
            let m = manifest_of_reader(&self.bytes[..], self.chunk).unwrap();
            Ok(ArtifactSources {
                manifest: manifest_to_wire(&m),
                holders: self.holders.clone(),
                grant: SignedTicket::default(),
            })
        }

        async fn range(
            &self,
            id: &ArtifactId,
            offset: u64,
            len: u64,
        ) -> Result<Vec<u8>, FetchError> {
            let mut o = self.offsets.lock().unwrap();
            if self.fail_after.is_some_and(|n| o.len() >= n) {
                return Err(FetchError::Transfer {
                    id: id.clone(),
                    source: NetError::Closed,
                });
            }
            o.push(offset);
            let end = (offset + len).min(self.bytes.len() as u64);
            Ok(self.bytes[offset as usize..end as usize].to_vec())
        }
    }

    /// Peers holding `bytes`; those named in `corrupt` flip a bit of every chunk they send.
    struct Peers {
        bytes: Vec<u8>,
        corrupt: Vec<String>,
        served: Mutex<HashMap<String, u32>>,
    }

    impl PeerChunks for Peers {
        async fn range(
            &self,
            holder: &ArtifactHolder,
            _grant: &SignedTicket,
            _id: &ArtifactId,
            offset: u64,
            len: u64,
        ) -> Result<Vec<u8>, FetchError> {
            *self
                .served
                .lock()
                .unwrap()
                .entry(holder.peer_id.clone())
                .or_default() += 1;
            let end = (offset + len).min(self.bytes.len() as u64);
            let mut b = self.bytes[offset as usize..end as usize].to_vec();
            if self.corrupt.contains(&holder.peer_id) {
                b[0] ^= 1;
            }
            Ok(b)
        }
    }

    fn holder(name: &str, rtt_us: f64) -> ArtifactHolder {
        ArtifactHolder {
            node_id: name.into(),
            peer_id: name.into(),
            addrs: Vec::new(),
            rtt_us,
        }
    }

    fn artifact(len: usize) -> (Vec<u8>, ArtifactId) {
        // A fixed pattern (no RNG needed): every byte depends on its position.
        let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let d: [u8; 32] = Sha256::digest(&bytes).into();
        (bytes, ArtifactId::from_digest(&d))
    }

    fn request<'a>(id: &'a ArtifactId, size: u64, dest: Option<&'a Path>) -> FetchRequest<'a> {
        FetchRequest {
            id,
            size: Some(size),
            max_size: 1 << 30,
            dest,
        }
    }

    #[test]
    fn manifests_cover_the_bytes_and_chunk_sizes_grow_for_huge_artifacts() {
        let (bytes, id) = artifact(10_500);
        let m = manifest_of_reader(&bytes[..], 1000).unwrap();
        assert_eq!((m.total_bytes(), m.chunk_count()), (10_500, 11));
        assert_eq!(m.chunk_len(10), Some(500));
        assert_eq!(ArtifactId::from_digest(m.sha256()), id);
        let d: [u8; 32] = Sha256::digest(&bytes[1000..2000]).into();
        assert!(m.verify(1, &d));
        let wire = manifest_to_wire(&m);
        assert_eq!(manifest_from_wire(&id, &wire).unwrap(), m);
        // Another artifact's manifest, or a tampered one, is refused.
        let other = ArtifactId::from_digest(&[9; 32]);
        assert!(matches!(
            manifest_from_wire(&other, &wire),
            Err(FetchError::BadManifest { .. })
        ));
        let mut short = wire.clone();
        short.chunks.pop();
        assert!(manifest_from_wire(&id, &short).is_err());
        let mut huge = wire;
        huge.chunk_bytes = MAX_CHUNK_BYTES + 1;
        assert!(manifest_from_wire(&id, &huge).is_err());
        // Empty file: no chunk.
        assert_eq!(manifest_of_reader(&[][..], 1000).unwrap().chunk_count(), 0);
        assert_eq!(chunk_size_for(20 << 20), 1 << 20);
        assert_eq!(chunk_size_for(64 << 30), 4 << 20);
        assert!((64u64 << 30).div_ceil(chunk_size_for(64 << 30)) <= MAX_MANIFEST_CHUNKS);
    }

    #[tokio::test]
    async fn a_broken_download_resumes_from_its_verified_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, id) = artifact(100_000);
        let dest = dir.path().join(id.as_str());
        let req = request(&id, bytes.len() as u64, Some(&dest));
        // The link breaks after 3 chunks of 10.
        let mut cut = Memory::new(bytes.clone(), 10_000);
        cut.fail_after = Some(3);
        let e = fetch(&cut, &req).await.unwrap_err();
        assert!(
            matches!(
                &e,
                FetchError::Transfer {
                    source: NetError::Closed,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!dest.exists());
        let first = cut.offsets();
        assert_eq!(first.len(), 3);
        // The next fetch asks for the other 7 chunks only, and checks the whole.
        let whole = Memory::new(bytes.clone(), 10_000);
        let got = fetch(&whole, &req).await.unwrap();
        let mut all = first.clone();
        all.extend(whole.offsets());
        all.sort_unstable();
        assert_eq!(all, (0..10).map(|i| i * 10_000).collect::<Vec<_>>());
        assert_eq!((got.resumed_from, got.received), (30_000, 70_000));
        assert_eq!(got.from_coordinator, 70_000);
        assert_eq!(got.bytes, bytes);
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        assert!(!partial_path(&dest).exists());
    }

    #[tokio::test]
    async fn a_corrupted_chunk_in_a_partial_download_is_fetched_again_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, id) = artifact(50_000);
        let dest = dir.path().join(id.as_str());
        // A partial file with chunks 0..4 present, chunk 2 damaged on disk.
        let mut partial = bytes[..40_000].to_vec();
        partial[25_000] ^= 0x40;
        std::fs::write(partial_path(&dest), &partial).unwrap();
        let src = Memory::new(bytes.clone(), 10_000);
        let got = fetch(&src, &request(&id, 50_000, Some(&dest)))
            .await
            .unwrap();
        assert_eq!(src.offsets(), vec![20_000, 40_000]);
        assert_eq!((got.resumed_from, got.received), (30_000, 20_000));
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        // A partial file longer than the artifact is not its download: started over.
        std::fs::remove_file(&dest).unwrap();
        std::fs::write(partial_path(&dest), vec![0u8; 60_000]).unwrap();
        let src = Memory::new(bytes.clone(), 10_000);
        let got = fetch(&src, &request(&id, 50_000, Some(&dest)))
            .await
            .unwrap();
        assert_eq!((got.resumed_from, got.received), (0, 50_000));
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    }

    #[tokio::test]
    async fn a_bad_peer_is_banned_at_its_first_bad_chunk_and_the_rest_comes_from_others() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, id) = artifact(200_000);
        let dest = dir.path().join(id.as_str());
        let mut coordinator = Memory::new(bytes.clone(), 10_000);
        // The bad peer is the nearest: asked first.
        coordinator.holders = vec![holder("bad", 100.0), holder("good", 200.0)];
        let peers = Peers {
            bytes: bytes.clone(),
            corrupt: vec!["bad".into()],
            served: Mutex::new(HashMap::new()),
        };
        let stats = FetchStats::default();
        let got = fetch_with(
            &coordinator,
            Some(&peers),
            &request(&id, bytes.len() as u64, Some(&dest)),
            &stats,
        )
        .await
        .unwrap();
        assert_eq!(got.bytes, bytes);
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        let served = peers.served.lock().unwrap().clone();
        // Its first requests (two in flight at once) and no more.
        assert!(served["bad"] <= 2, "{served:?}");
        assert_eq!(stats.bans.load(Ordering::Relaxed), 1);
        assert_eq!(
            stats.bad_chunks.load(Ordering::Relaxed),
            u64::from(served["bad"])
        );
        // The good peer served (nearly) everything; the coordinator only what no peer slot
        // was free for.
        assert_eq!(got.from_peers + got.from_coordinator, 200_000);
        assert_eq!(
            stats.from_peers.load(Ordering::Relaxed)
                + stats.from_coordinator.load(Ordering::Relaxed),
            200_000
        );
        assert!(got.from_peers >= 150_000, "{got:?}");
    }

    #[test]
    fn a_manifest_is_used_only_when_it_matches_the_bound_digest() {
        let (bytes, id) = artifact(50_000);
        let wire = manifest_to_wire(&manifest_of_reader(&bytes[..], 10_000).unwrap());
        let digest = manifest_digest(&wire);
        assert_eq!(digest.len(), 64);
        let m = bound_manifest(&id, &wire, &digest).unwrap();
        assert_eq!((m.total_bytes(), m.chunk_count()), (50_000, 5));
        // A holder that serves another chunk digest, chunk size or size: refused, though
        // the manifest is well formed and names the right artifact.
        let mut bad = wire.clone();
        bad.chunks[3][0] ^= 1;
        let other = manifest_to_wire(&manifest_of_reader(&bytes[..], 25_000).unwrap());
        for liar in [bad, other] {
            let e = bound_manifest(&id, &liar, &digest).unwrap_err();
            assert!(matches!(e, FetchError::BadManifest { .. }), "{e}");
            assert!(e.to_string().contains("not the"), "{e}");
        }
        // No digest known (an old saved answer): refused too.
        assert!(bound_manifest(&id, &wire, "").is_err());
        // The manifest of another artifact, with its own digest: refused as before.
        let (other_bytes, _) = artifact(50_001);
        let other = manifest_to_wire(&manifest_of_reader(&other_bytes[..], 10_000).unwrap());
        assert!(bound_manifest(&id, &other, &manifest_digest(&other)).is_err());
    }

    /// Names holders but serves no bytes (the LAN while the coordinator is unreachable).
    struct HoldersOnly(Memory);

    impl ArtifactSource for HoldersOnly {
        async fn sources(&self, id: &ArtifactId) -> Result<ArtifactSources, FetchError> {
            self.0.sources(id).await
        }

        fn serves_ranges(&self) -> bool {
            false
        }

        async fn range(&self, _: &ArtifactId, _: u64, _: u64) -> Result<Vec<u8>, FetchError> {
            panic!("a source that serves no ranges was asked for one")
        }
    }

    #[tokio::test]
    async fn a_source_serving_no_ranges_leaves_every_chunk_to_the_holders() {
        let (bytes, id) = artifact(100_000);
        let mut lan = Memory::new(bytes.clone(), 10_000);
        lan.holders = vec![holder("bad", 1.0), holder("good", 2.0)];
        let lan = HoldersOnly(lan);
        let peers = Peers {
            bytes: bytes.clone(),
            corrupt: vec!["bad".into()],
            served: Mutex::new(HashMap::new()),
        };
        let stats = FetchStats::default();
        let req = request(&id, bytes.len() as u64, None);
        let got = fetch_with(&lan, Some(&peers), &req, &stats).await.unwrap();
        assert_eq!(got.bytes, bytes);
        assert_eq!((got.from_peers, got.from_coordinator), (100_000, 0));
        assert_eq!(stats.bans.load(Ordering::Relaxed), 1);
        // Only the bad holder: it is banned at its first chunk and nothing else can serve.
        let mut lan = Memory::new(bytes.clone(), 10_000);
        lan.holders = vec![holder("bad", 1.0)];
        let e = fetch_with(&HoldersOnly(lan), Some(&peers), &req, &stats)
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::BadChunk { .. }), "{e}");
    }

    #[tokio::test]
    async fn without_a_peer_layer_holders_are_ignored_and_the_coordinator_serves_all() {
        let (bytes, id) = artifact(30_000);
        let mut coordinator = Memory::new(bytes.clone(), 10_000);
        coordinator.holders = vec![holder("a", 1.0)];
        let got = fetch(&coordinator, &request(&id, 30_000, None))
            .await
            .unwrap();
        assert_eq!(got.bytes, bytes);
        assert_eq!((got.from_coordinator, got.from_peers), (30_000, 0));
    }

    #[tokio::test]
    async fn a_manifest_unlike_the_artifact_fails_the_whole_check_and_deletes_the_partial() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, id) = artifact(10_000);
        let dest = dir.path().join(id.as_str());
        /// Serves other bytes with a manifest of them, under this artifact's id.
        struct Liar(Memory, ArtifactId);
        impl ArtifactSource for Liar {
            async fn sources(&self, id: &ArtifactId) -> Result<ArtifactSources, FetchError> {
                let mut s = self.0.sources(id).await?;
                s.manifest.sha256 = self.1.to_string();
                Ok(s)
            }
            async fn range(
                &self,
                id: &ArtifactId,
                offset: u64,
                len: u64,
            ) -> Result<Vec<u8>, FetchError> {
                self.0.range(id, offset, len).await
            }
        }
        let other: Vec<u8> = bytes.iter().map(|b| b ^ 1).collect();
        let liar = Liar(Memory::new(other, 4_000), id.clone());
        let e = fetch(&liar, &request(&id, 10_000, Some(&dest)))
            .await
            .unwrap_err();
        let FetchError::HashMismatch { id: want, actual } = &e else {
            panic!("expected a hash mismatch, got {e:?}");
        };
        assert_eq!(want, &id);
        assert_ne!(actual, &id);
        assert!(e.to_string().contains("fetched again"), "{e}");
        assert_eq!(WireError::from(e).code, ErrorCode::HashMismatch);
        assert!(!partial_path(&dest).exists(), "the bad partial is gone");
        assert!(!dest.exists());
        // The next fetch, from an honest source, starts over and succeeds.
        let got = fetch(
            &Memory::new(bytes.clone(), 4_000),
            &request(&id, 10_000, Some(&dest)),
        )
        .await
        .unwrap();
        assert_eq!((got.resumed_from, got.received), (0, 10_000));
    }

    #[tokio::test]
    async fn sizes_beyond_the_bound_or_unlike_the_announced_one_are_refused_before_reading() {
        let (bytes, id) = artifact(5_000);
        let src = Memory::new(bytes.clone(), 1_000);
        let req = |size, max_size| FetchRequest {
            id: &id,
            size,
            max_size,
            dest: None,
        };
        // Announced too large: the source is not even asked.
        let e = fetch(&src, &req(Some(5_000), 4_999)).await.unwrap_err();
        assert!(
            matches!(
                e,
                FetchError::TooLarge {
                    size: 5_000,
                    max: 4_999,
                    ..
                }
            ),
            "{e:?}"
        );
        // Unannounced, the source's size is bounded too.
        let e = fetch(&src, &req(None, 4_999)).await.unwrap_err();
        assert!(
            matches!(e, FetchError::TooLarge { size: 5_000, .. }),
            "{e:?}"
        );
        // The source disagrees with the announced size.
        let e = fetch(&src, &req(Some(4_000), 1 << 20)).await.unwrap_err();
        assert!(
            matches!(
                e,
                FetchError::SizeMismatch {
                    total: 5_000,
                    expected: 4_000,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(src.offsets().is_empty(), "no byte asked for");
        // In memory, within bounds: the bytes, checked.
        let got = fetch(&src, &req(None, 5_000)).await.unwrap();
        assert_eq!(got.bytes, bytes);
    }

    #[tokio::test]
    async fn from_the_coordinator_over_loopback_a_cut_fetch_resumes_and_checks() {
        use crate::ctl::tests::{artifact, stand, CUT_RANGE};
        use std::sync::atomic::Ordering;
        let s = stand().await;
        let (bytes, id) = artifact();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join(id.as_str());
        let req = request(&id, bytes.len() as u64, Some(&dest));
        let source = CoordinatorSource::new(&s.client, None);
        // The stand ends the first range early.
        let e = fetch(&source, &req).await.unwrap_err();
        assert!(matches!(e, FetchError::Transfer { .. }), "{e:?}");
        let got = fetch(&source, &req).await.unwrap();
        assert_eq!(got.resumed_from + got.received, bytes.len() as u64);
        // Every byte sent once, plus the cut range's first bytes.
        assert_eq!(
            s.sent.load(Ordering::SeqCst),
            bytes.len() as u64 + CUT_RANGE
        );
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        // An artifact the source does not have: its wire error, as sent.
        let other = ArtifactId::from_digest(&[7u8; 32]);
        let e = fetch(&source, &request(&other, 10, None))
            .await
            .unwrap_err();
        let w = WireError::from(e);
        assert_eq!(w.code, ErrorCode::UnknownArtifact);
        assert!(w.message.contains(other.as_str()), "{}", w.message);
        s.cancel.cancel();
    }
}
