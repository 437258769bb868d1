//! Artifacts between mesh nodes over the peer layer's `/skein/artifact/1` (issue 20): this
//! node fetching chunks from holders ([`PeerChunkSource`], driven by skein-net's
//! `artifact::fetch_with`), and serving chunks of the artifacts it holds ([`PeerArtifacts::serve`]).
//!
//! ```text
//!  fetch_with ──▶ PeerChunkSource ──/skein/artifact/1: ChunkRequest{range, grant}──▶ holder
//!  peer layer ──inbound (bounded, 8)──▶ serve: ≤ SERVE_SLOTS at once
//!       grant ok for this PeerId + artifact? held complete? ──▶ read (blocking pool)
//!       ──▶ upload budget (token bucket, --peer-upload-limit) ──▶ ChunkResponse + bytes
//! ```
//!
//! Serving never slows this node's own inference: at most [`SERVE_SLOTS`] streams are served
//! at once (the others wait in the peer layer's bounded queue, then are reset), file reads run
//! on the blocking pool, and the bytes sent per second are capped by the upload limit.

use skein_net::artifact::{FetchError, FetchStats, PeerChunks};
use skein_peer::codec::{read_frame, write_frame, FrameIoError};
use skein_peer::{Multiaddr, Peer, PeerId};
use skein_proto::{
    ArtifactHolder, ArtifactId, ArtifactManifest, ChunkRequest, ChunkResponse, ErrorCode,
    SignedTicket, WireError,
};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Streams served at once.
pub const SERVE_SLOTS: usize = 2;
/// Opening a stream to a holder (dialling it first when not connected), at most.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Reading a request from a fetcher, at most (a request is a few hundred bytes, sent with the
/// stream's opening): a peer that opens streams and sends nothing holds a serving slot no
/// longer than this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// An upload budget: a token bucket of `rate` bytes per second holding at most `burst`
/// bytes. Bytes are taken before they are sent; a take beyond the tokens left goes into
/// debt, and [`take`](Self::take) says how long to wait before sending, so the bytes sent by
/// any instant never exceed `burst + rate × elapsed` plus one take. Decisions only: the
/// caller passes the time.
#[derive(Debug, Clone)]
pub struct UploadBudget {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl UploadBudget {
    /// `rate` bytes per second, `burst` bytes at most at once, full at `now`.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        UploadBudget {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Take `n` bytes at `now`; returns how long to wait before sending them.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// The node's peer-to-peer artifact state: fetch counters, serving counters and limits.
#[derive(Debug)]
pub struct PeerArtifacts {
    /// Counters of this node's fetches (by source, bad chunks, bans).
    pub stats: FetchStats,
    /// Fetches that went to LAN holders because the coordinator was unreachable.
    pub lan_fetches: AtomicU64,
    served_bytes: AtomicU64,
    served_chunks: AtomicU64,
    refused: AtomicU64,
    slots: Arc<tokio::sync::Semaphore>,
    budget: Option<Mutex<UploadBudget>>,
    max_frame: u32,
    /// Manifests of held artifacts served to LAN fetchers (hashed once each; bounded).
    manifests: Mutex<std::collections::HashMap<String, ArtifactManifest>>,
}

/// Manifests [`PeerArtifacts`] keeps in memory at most (then it starts over).
const MAX_MANIFESTS: usize = 16;

/// What a request on `/skein/artifact/1` is answered with.
enum Answer {
    /// The artifact's size and the bytes asked for.
    Bytes(u64, Vec<u8>),
    /// The chunk manifest asked for.
    Manifest(ArtifactManifest),
}

impl PeerArtifacts {
    /// Serving with an upload cap of `upload_limit` bytes per second (`None`: uncapped).
    pub fn new(upload_limit: Option<f64>) -> Self {
        let budget = upload_limit.filter(|r| *r > 0.0).map(|rate| {
            // A burst of one chunk (or a second's worth, when smaller).
            let burst = rate.min(skein_net::artifact::CHUNK_BYTES as f64);
            Mutex::new(UploadBudget::new(rate, burst, Instant::now()))
        });
        PeerArtifacts {
            stats: FetchStats::default(),
            lan_fetches: AtomicU64::new(0),
            served_bytes: AtomicU64::new(0),
            served_chunks: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            slots: Arc::new(tokio::sync::Semaphore::new(SERVE_SLOTS)),
            budget,
            max_frame: (skein_peer::artifact::MAX_RANGE as u32)
                + skein_peer::artifact::MAX_RESPONSE_OVERHEAD,
            manifests: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Bytes served to peers.
    pub fn served_bytes(&self) -> u64 {
        self.served_bytes.load(Ordering::Relaxed)
    }

    /// Serve inbound `/skein/artifact/1` streams until `cancel`: chunks of the artifacts
    /// `held` names (a complete, verified copy's path), to bearers of a grant `check` accepts
    /// (`check(grant, asker PeerId, sha256)`).
    pub async fn serve<H, C>(
        self: Arc<Self>,
        mut inbound: tokio::sync::mpsc::Receiver<skein_peer::streams::Inbound>,
        held: H,
        check: C,
        cancel: CancellationToken,
    ) where
        H: Fn(&str) -> Option<std::path::PathBuf> + Send + Sync + 'static,
        C: Fn(&SignedTicket, &str, &str) -> Result<(), String> + Send + Sync + 'static,
    {
        let held = Arc::new(held);
        let check = Arc::new(check);
        loop {
            // A slot first: streams beyond it wait in the peer layer's bounded queue.
            let permit = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                p = self.slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                next = inbound.recv() => next,
            };
            let Some(inb) = next else { break };
            let (me, held, check) = (self.clone(), held.clone(), check.clone());
            tokio::spawn(async move {
                let _permit = permit;
                me.serve_one(inb.peer, inb.stream, &*held, &*check).await;
            });
        }
    }

    async fn serve_one(
        &self,
        asker: PeerId,
        mut stream: skein_peer::Stream,
        held: &(dyn Fn(&str) -> Option<std::path::PathBuf> + Send + Sync),
        check: &(dyn Fn(&SignedTicket, &str, &str) -> Result<(), String> + Send + Sync),
    ) {
        use futures::AsyncWriteExt;
        let answer = async {
            let frame = tokio::time::timeout(
                REQUEST_TIMEOUT,
                read_frame(&mut stream, skein_peer::artifact::MAX_REQUEST_FRAME),
            )
            .await
            .map_err(|_| WireError::new(ErrorCode::DeadlineExceeded, "no request in time"))?
            .map_err(|e| match e {
                FrameIoError::Frame(f) => WireError::from(f),
                other => WireError::new(ErrorCode::Malformed, other.to_string()),
            })?;
            let req: ChunkRequest = frame.header().map_err(WireError::from)?;
            if req.manifest {
                self.manifest(&asker.to_base58(), &req, held, check)
                    .await
                    .map(Answer::Manifest)
            } else {
                self.chunk(&asker.to_base58(), &req, held, check)
                    .await
                    .map(|(total, bytes)| Answer::Bytes(total, bytes))
            }
        }
        .await;
        let written = match answer {
            Ok(Answer::Manifest(m)) => {
                write_frame(
                    &mut stream,
                    &ChunkResponse::Manifest(m),
                    &[],
                    self.max_frame,
                )
                .await
            }
            Ok(Answer::Bytes(total, bytes)) => {
                let n = bytes.len() as u64;
                if let Some(b) = &self.budget {
                    let wait = b
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take(n, Instant::now());
                    tokio::time::sleep(wait).await;
                }
                let r = write_frame(
                    &mut stream,
                    &ChunkResponse::Ok { total },
                    &[&bytes],
                    self.max_frame,
                )
                .await;
                if r.is_ok() {
                    self.served_bytes.fetch_add(n, Ordering::Relaxed);
                    self.served_chunks.fetch_add(1, Ordering::Relaxed);
                }
                r
            }
            Err(e) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = %asker, error = %e, "artifact chunk refused");
                write_frame(&mut stream, &ChunkResponse::Err(e), &[], self.max_frame).await
            }
        };
        if let Err(e) = written {
            tracing::debug!(peer = %asker, error = %e, "could not answer a chunk request");
        }
        let _ = stream.close().await;
    }

    /// The chunk manifest of the artifact `req` names, when `asker` may have it (a fetcher
    /// whose coordinator is unreachable; it checks the manifest against the digest its
    /// coordinator gave). Built from the held copy on the blocking pool, once per artifact.
    async fn manifest(
        &self,
        asker: &str,
        req: &ChunkRequest,
        held: &(dyn Fn(&str) -> Option<std::path::PathBuf> + Send + Sync),
        check: &(dyn Fn(&SignedTicket, &str, &str) -> Result<(), String> + Send + Sync),
    ) -> Result<ArtifactManifest, WireError> {
        check(&req.grant, asker, &req.sha256)
            .map_err(|m| WireError::new(ErrorCode::Forbidden, m))?;
        let path = held(&req.sha256).ok_or_else(|| {
            WireError::new(
                ErrorCode::UnknownArtifact,
                format!("this node holds no complete artifact {}", req.sha256),
            )
        })?;
        if let Some(m) = lock(&self.manifests).get(&req.sha256) {
            return Ok(m.clone());
        }
        let m = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path)?;
            let len = f.metadata()?.len();
            skein_net::artifact::manifest_of_reader(
                std::io::BufReader::new(f),
                skein_net::artifact::chunk_size_for(len),
            )
        })
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("reading the artifact: {e}")))?;
        let m = skein_net::artifact::manifest_to_wire(&m);
        if m.sha256 != req.sha256 {
            return Err(WireError::new(
                ErrorCode::Internal,
                format!("the held copy of {} is corrupt", req.sha256),
            ));
        }
        let mut memo = lock(&self.manifests);
        if memo.len() >= MAX_MANIFESTS {
            memo.clear();
        }
        memo.insert(req.sha256.clone(), m.clone());
        Ok(m)
    }

    /// The bytes `req` asks for, and the artifact's size, when `asker` may have them.
    async fn chunk(
        &self,
        asker: &str,
        req: &ChunkRequest,
        held: &(dyn Fn(&str) -> Option<std::path::PathBuf> + Send + Sync),
        check: &(dyn Fn(&SignedTicket, &str, &str) -> Result<(), String> + Send + Sync),
    ) -> Result<(u64, Vec<u8>), WireError> {
        check(&req.grant, asker, &req.sha256)
            .map_err(|m| WireError::new(ErrorCode::Forbidden, m))?;
        if req.len == 0 || req.len > skein_peer::artifact::MAX_RANGE {
            return Err(WireError::new(
                ErrorCode::Malformed,
                format!(
                    "a range of {} bytes: 1 to {} at once",
                    req.len,
                    skein_peer::artifact::MAX_RANGE
                ),
            ));
        }
        let path = held(&req.sha256).ok_or_else(|| {
            WireError::new(
                ErrorCode::UnknownArtifact,
                format!("this node holds no complete artifact {}", req.sha256),
            )
        })?;
        let (offset, len) = (req.offset, req.len);
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::File::open(&path)?;
            let total = f.metadata()?.len();
            if offset >= total {
                return Ok(Err(total));
            }
            let n = len.min(total - offset);
            let mut buf = vec![0u8; n as usize];
            f.seek(SeekFrom::Start(offset))?;
            f.read_exact(&mut buf)?;
            Ok::<_, std::io::Error>(Ok((total, buf)))
        })
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("reading the artifact: {e}")))?
        .map_err(|total| {
            WireError::new(
                ErrorCode::Malformed,
                format!("offset {offset} is past the end of the {total}-byte artifact"),
            )
        })
    }

    /// Prometheus text: artifact bytes fetched by source, bytes and chunks served to peers,
    /// chunk requests refused, bad chunks received, sources banned.
    pub fn render(&self, node: &str) -> String {
        let node = skein_proto::prom::esc(node);
        let mut out = String::new();
        let _ = writeln!(out, "# HELP skein_node_artifact_fetched_bytes_total Verified artifact bytes this node fetched, by source.");
        let _ = writeln!(
            out,
            "# TYPE skein_node_artifact_fetched_bytes_total counter"
        );
        for (source, v) in [
            ("coordinator", &self.stats.from_coordinator),
            ("peer", &self.stats.from_peers),
        ] {
            let _ = writeln!(
                out,
                "skein_node_artifact_fetched_bytes_total{{node=\"{node}\",source=\"{source}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        for (name, help, v) in [
            (
                "skein_node_artifact_served_bytes_total",
                "Artifact bytes this node served to peers.",
                &self.served_bytes,
            ),
            (
                "skein_node_artifact_served_chunks_total",
                "Artifact chunk requests this node served to peers.",
                &self.served_chunks,
            ),
            (
                "skein_node_artifact_refused_total",
                "Artifact chunk requests this node refused (no valid grant, not held, malformed).",
                &self.refused,
            ),
            (
                "skein_node_artifact_bad_chunks_total",
                "Artifact chunks received whose sha256 was not the manifest's (dropped).",
                &self.stats.bad_chunks,
            ),
            (
                "skein_node_artifact_lan_fetches_total",
                "Artifact fetches this node made from LAN holders because the coordinator was unreachable.",
                &self.lan_fetches,
            ),
            (
                "skein_node_artifact_source_bans_total",
                "Artifact sources banned by this node's fetches (a bad chunk or a failed request).",
                &self.stats.bans,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(
                out,
                "{name}{{node=\"{node}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// Chunks from holders over this node's peer layer.
pub struct PeerChunkSource<'a> {
    peer: &'a Peer,
}

impl<'a> PeerChunkSource<'a> {
    /// Through `peer`.
    pub fn new(peer: &'a Peer) -> Self {
        PeerChunkSource { peer }
    }
}

fn remote(e: impl std::fmt::Display) -> FetchError {
    FetchError::Remote(WireError::new(ErrorCode::Overloaded, e.to_string()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PeerChunkSource<'_> {
    /// Send `req` to `holder` on `/skein/artifact/1` and read its answer (at most `max`
    /// bytes).
    async fn ask(
        &self,
        holder: &ArtifactHolder,
        req: &ChunkRequest,
        max: u32,
    ) -> Result<skein_proto::frame::Frame, FetchError> {
        use futures::AsyncWriteExt;
        let peer: PeerId = holder
            .peer_id
            .parse()
            .map_err(|e| FetchError::Unexpected(format!("holder PeerId: {e}")))?;
        let addrs: Vec<Multiaddr> = holder.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        let (mut stream, _path) = self
            .peer
            .open_protocol(peer, addrs, skein_peer::artifact::PROTOCOL, OPEN_TIMEOUT)
            .await
            .map_err(remote)?;
        write_frame(
            &mut stream,
            req,
            &[],
            skein_peer::artifact::MAX_REQUEST_FRAME,
        )
        .await
        .map_err(remote)?;
        let frame = read_frame(&mut stream, max).await.map_err(remote)?;
        let _ = stream.close().await;
        Ok(frame)
    }

    /// The chunk manifest of artifact `id` from `holder` (presenting `grant`), unchecked: the
    /// caller binds it (`skein_net::artifact::bound_manifest`).
    pub async fn manifest(
        &self,
        holder: &ArtifactHolder,
        grant: &SignedTicket,
        id: &ArtifactId,
    ) -> Result<ArtifactManifest, FetchError> {
        let req = ChunkRequest {
            sha256: id.to_string(),
            offset: 0,
            len: 0,
            grant: grant.clone(),
            manifest: true,
        };
        // A manifest is at most `MAX_MANIFEST_CHUNKS` digests.
        let max = (skein_net::artifact::MAX_MANIFEST_CHUNKS * 33) as u32
            + skein_peer::artifact::MAX_RESPONSE_OVERHEAD;
        let frame = self.ask(holder, &req, max).await?;
        match frame.header::<ChunkResponse>().map_err(remote)? {
            ChunkResponse::Manifest(m) => Ok(m),
            ChunkResponse::Err(e) => Err(FetchError::Remote(e)),
            ChunkResponse::Ok { .. } => {
                Err(FetchError::Unexpected("bytes asked for a manifest".into()))
            }
        }
    }
}

impl PeerChunks for PeerChunkSource<'_> {
    async fn range(
        &self,
        holder: &ArtifactHolder,
        grant: &SignedTicket,
        id: &ArtifactId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, FetchError> {
        let req = ChunkRequest {
            sha256: id.to_string(),
            offset,
            len,
            grant: grant.clone(),
            manifest: false,
        };
        let max = u32::try_from(len)
            .unwrap_or(u32::MAX)
            .saturating_add(skein_peer::artifact::MAX_RESPONSE_OVERHEAD);
        let frame = self.ask(holder, &req, max).await?;
        match frame.header::<ChunkResponse>().map_err(remote)? {
            ChunkResponse::Ok { .. } => Ok(frame.payload().to_vec()),
            ChunkResponse::Err(e) => Err(FetchError::Remote(e)),
            ChunkResponse::Manifest(_) => Err(FetchError::Unexpected(
                "a manifest where bytes were asked for".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "ab";

    fn request(offset: u64, len: u64, grant: &[u8]) -> ChunkRequest {
        ChunkRequest {
            sha256: SHA.into(),
            offset,
            len,
            grant: SignedTicket {
                body: grant.to_vec(),
                signature: Vec::new(),
            },
            manifest: false,
        }
    }

    #[tokio::test]
    async fn chunks_are_served_only_with_a_grant_only_if_held_and_only_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("artifact");
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&file, &bytes).unwrap();
        let served = PeerArtifacts::new(None);
        let held = |sha: &str| (sha == SHA).then(|| file.clone());
        // The grant check stands in for `grant::verify`: it admits the body `ok` for peer `A`.
        let check = |g: &SignedTicket, asker: &str, sha: &str| {
            if g.body == b"ok" && asker == "A" && sha == SHA {
                Ok(())
            } else {
                Err(format!("refused {asker}"))
            }
        };
        let ask = |asker: &'static str, req: ChunkRequest| {
            let served = &served;
            async move { served.chunk(asker, &req, &held, &check).await }
        };
        // Granted and held: the bytes, and the size; the last range is cut at the end.
        let (total, got) = ask("A", request(1000, 500, b"ok")).await.unwrap();
        assert_eq!((total, got.as_slice()), (10_000, &bytes[1000..1500]));
        let (_, got) = ask("A", request(9_900, 500, b"ok")).await.unwrap();
        assert_eq!(got, &bytes[9_900..]);
        // No grant, or a grant for another peer: forbidden, before anything is read.
        for (asker, grant) in [("A", &b""[..]), ("B", &b"ok"[..])] {
            let e = ask(asker, request(0, 10, grant)).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::Forbidden, "{e:?}");
        }
        // Not held (complete) here.
        let mut other = request(0, 10, b"ok");
        other.sha256 = "cd".into();
        let e = served
            .chunk("A", &other, &held, &|_, _, _| Ok(()))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownArtifact, "{e:?}");
        // Empty, oversized, or past the end.
        for req in [
            request(0, 0, b"ok"),
            request(0, skein_peer::artifact::MAX_RANGE + 1, b"ok"),
            request(10_000, 10, b"ok"),
        ] {
            let e = ask("A", req).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::Malformed, "{e:?}");
        }
    }

    #[tokio::test]
    async fn manifests_are_served_only_with_a_grant_and_only_if_held() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("artifact");
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&file, &bytes).unwrap();
        let sha = skein_net::artifact::manifest_of_reader(&bytes[..], 1 << 20)
            .map(|m| skein_net::artifact::manifest_to_wire(&m))
            .unwrap();
        let served = PeerArtifacts::new(None);
        let held = |s: &str| (s == sha.sha256).then(|| file.clone());
        let check = |g: &SignedTicket, asker: &str, _: &str| {
            (g.body == b"ok" && asker == "A")
                .then_some(())
                .ok_or_else(|| format!("refused {asker}"))
        };
        let mut req = request(0, 0, b"ok");
        req.sha256 = sha.sha256.clone();
        req.manifest = true;
        // The holder's manifest is the coordinator's (same chunking): its digest binds.
        let m = served.manifest("A", &req, &held, &check).await.unwrap();
        assert_eq!(m, sha);
        assert_eq!(m.chunks.len(), 3);
        // Another peer: refused before anything is read.
        let e = served.manifest("B", &req, &held, &check).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden, "{e:?}");
        req.sha256 = "cd".into();
        let e = served.manifest("A", &req, &held, &check).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownArtifact, "{e:?}");
    }

    #[test]
    fn the_upload_budget_caps_the_rate_after_one_burst() {
        let t0 = Instant::now();
        let mut b = UploadBudget::new(1_000_000.0, 1_000_000.0, t0);
        // The burst goes at once.
        assert_eq!(b.take(1_000_000, t0), Duration::ZERO);
        // Then a second per MB.
        assert_eq!(b.take(500_000, t0), Duration::from_millis(500));
        // Half a second later, the debt is paid: the next 1 MB waits a full second.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(b.take(1_000_000, t1), Duration::from_secs(1));
        // Tokens never exceed the burst, however long idle.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!(b.take(1_000_000, t2), Duration::ZERO);
        assert_eq!(b.take(1, t2), Duration::from_micros(1));
    }
}
