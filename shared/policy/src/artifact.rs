//! Peer-assisted artifact fetch: the chunk manifest, and which chunk to ask of which source next.
//!
//! An artifact is cut into fixed-size chunks ([`ChunkManifest`]: the chunk size, a sha256 per
//! chunk and the whole file's sha256, its name). A node that fetches it runs one
//! [`ChunkScheduler`]: it is told which peers hold which chunks (with their estimated RTT, from
//! Vivaldi, and how many requests each takes from this node at once), asks
//! [`ChunkScheduler::next_requests`] what to request from whom, and reports every answer
//! ([`ChunkScheduler::on_chunk`] with the digest it computed, or
//! [`ChunkScheduler::on_failed`]). The scheduler checks each digest against the manifest, so a
//! bad peer is caught at its first bad chunk, banned with exponential backoff, and its chunks
//! are asked of other sources.
//!
//! Source choice, per chunk, rarest chunk first (fewest known holders; ties in an order drawn
//! once from the caller's seeded RNG, so that nodes starting together ask for different chunks):
//! 1. the nearest holder (lowest RTT) that is not banned and has a free slot, among at most
//!    [`FetchConfig::max_peers`] peers in use at once;
//! 2. otherwise wait, when a peer will serve it soon: a holder with upload slots while this
//!    node has requests in flight to peers (a slot frees as soon as one answers, and a LAN
//!    answer beats a thin uplink), or a peer that said it is fetching
//!    the chunk ([`ChunkScheduler::peer_fetching`]: nodes of one site then do not pull the same
//!    chunk over their shared uplink);
//! 3. otherwise the coordinator, the source of last resort: no usable peer holds the chunk, or
//!    every holder is saturated (has no upload slot for this node: [`PeerSource::max_in_flight`]
//!    `Some(0)`, e.g. after a "busy" answer).
//!
//! Nothing here does IO or reads a clock: time is `now_us`, hashing is the caller's. The node's
//! fetch and `skein-sim`'s `artifact` scenario drive the very same scheduler.

use std::fmt;

use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_BYTES: u64 = 4 << 20;

/// A chunk's index in its manifest (0-based).
pub type ChunkIndex = u32;

/// A sha256 digest.
pub type Digest = [u8; 32];

/// A peer, as the caller numbers it (a node id's index, a connection slot).
pub type PeerKey = u64;

/// Why a [`ChunkManifest`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManifestError {
    /// The chunk size is 0.
    ZeroChunkSize,
    /// The number of chunk digests does not match the size and the chunk size.
    ChunkCount {
        /// `ceil(total_bytes / chunk_bytes)`.
        expected: u64,
        /// Digests given.
        got: u64,
    },
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestError::ZeroChunkSize => write!(f, "chunk size is 0"),
            ManifestError::ChunkCount { expected, got } => {
                write!(f, "manifest has {got} chunk digests, size needs {expected}")
            }
        }
    }
}

impl std::error::Error for ManifestError {}

/// An artifact cut into fixed-size chunks, each with its sha256; the last chunk may be shorter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkManifest {
    total_bytes: u64,
    chunk_bytes: u64,
    sha256: Digest,
    chunks: Vec<Digest>,
}

impl ChunkManifest {
    /// Chunks a file of `total_bytes` has at `chunk_bytes` per chunk (0 for an empty file or a
    /// chunk size of 0).
    pub fn chunk_count_for(total_bytes: u64, chunk_bytes: u64) -> u64 {
        if chunk_bytes == 0 {
            return 0;
        }
        total_bytes.div_ceil(chunk_bytes)
    }

    /// A manifest; `chunks` holds one digest per chunk, in order.
    pub fn new(
        total_bytes: u64,
        chunk_bytes: u64,
        sha256: Digest,
        chunks: Vec<Digest>,
    ) -> Result<Self, ManifestError> {
        if chunk_bytes == 0 {
            return Err(ManifestError::ZeroChunkSize);
        }
        let expected = Self::chunk_count_for(total_bytes, chunk_bytes);
        let got = chunks.len() as u64;
        if expected != got || expected > u64::from(ChunkIndex::MAX) {
            return Err(ManifestError::ChunkCount { expected, got });
        }
        Ok(ChunkManifest {
            total_bytes,
            chunk_bytes,
            sha256,
            chunks,
        })
    }

    /// File size, bytes.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Chunk size, bytes (the last chunk may be shorter).
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// The whole file's sha256 (the artifact's name).
    pub fn sha256(&self) -> &Digest {
        &self.sha256
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> ChunkIndex {
        // `new` checked that it fits.
        self.chunks.len() as ChunkIndex
    }

    /// Where chunk `i` starts in the file, bytes; `None` past the end.
    pub fn chunk_offset(&self, i: ChunkIndex) -> Option<u64> {
        ((i as usize) < self.chunks.len()).then(|| u64::from(i) * self.chunk_bytes)
    }

    /// Length of chunk `i`, bytes; `None` past the end.
    pub fn chunk_len(&self, i: ChunkIndex) -> Option<u64> {
        let start = self.chunk_offset(i)?;
        Some(self.chunk_bytes.min(self.total_bytes - start))
    }

    /// The expected sha256 of chunk `i`.
    pub fn chunk_digest(&self, i: ChunkIndex) -> Option<&Digest> {
        self.chunks.get(i as usize)
    }

    /// Chunk `i` exists and `digest` is its sha256.
    pub fn verify(&self, i: ChunkIndex, digest: &Digest) -> bool {
        self.chunk_digest(i) == Some(digest)
    }
}

/// Where a chunk is fetched from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// The coordinator's artifact store: always holds every chunk, the source of last resort.
    Coordinator,
    /// A peer holding (part of) the artifact.
    Peer(PeerKey),
}

/// Tuning of a [`ChunkScheduler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchConfig {
    /// Requests in flight at once over all sources; 8.
    pub max_in_flight: u32,
    /// Requests in flight at once to one peer unless the peer says fewer
    /// ([`PeerSource::max_in_flight`]); 2.
    pub peer_in_flight: u32,
    /// Requests in flight at once to the coordinator; 2.
    pub coordinator_in_flight: u32,
    /// Peers with requests in flight at once (the N of "up to N peers and the coordinator"); 4.
    pub max_peers: u32,
    /// Ban after a source's first bad chunk or failed request, µs; 10 s. The `n`-th doubles it.
    pub ban_base_us: u64,
    /// Longest ban, µs; 10 min.
    pub ban_max_us: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            max_in_flight: 8,
            peer_in_flight: 2,
            coordinator_in_flight: 2,
            max_peers: 4,
            ban_base_us: 10_000_000,
            ban_max_us: 600_000_000,
        }
    }
}

/// What the caller knows of a peer that may hold chunks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerSource {
    /// Estimated RTT to it, µs (Vivaldi); nearer peers are asked first.
    pub rtt_us: f64,
    /// Requests it takes from this node at once (its upload slots); `None`:
    /// [`FetchConfig::peer_in_flight`]. The smaller of the two applies.
    pub max_in_flight: Option<u32>,
}

/// What [`ChunkScheduler::on_chunk`] made of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkVerdict {
    /// The digest matches: the chunk is verified and may be written where it belongs.
    Verified,
    /// The digest does not match: drop the data. The source is banned until `banned_until_us`;
    /// its other requests in flight (`abandoned`) are no longer counted and go elsewhere, so the
    /// caller should cancel them.
    Corrupt {
        /// When the ban ends, µs.
        banned_until_us: u64,
        /// Chunks that were in flight from this source, now missing again.
        abandoned: Vec<ChunkIndex>,
    },
    /// Already verified, or not a chunk of this artifact: drop the data.
    Unneeded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Missing,
    InFlight(Source),
    Verified,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Ban {
    failures: u32,
    until_us: u64,
    /// It once sent a bad chunk: a good one later does not clear its record.
    corrupt: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Peer {
    key: PeerKey,
    rtt_us: f64,
    limit: u32,
    /// Bit `i` set: holds chunk `i`.
    have: Vec<u64>,
    /// Bit `i` set: said it is fetching chunk `i`.
    fetching: Vec<u64>,
    in_flight: u32,
    ban: Ban,
}

fn bit(bits: &[u64], i: ChunkIndex) -> bool {
    bits.get(i as usize / 64)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

fn set_bit(bits: &mut [u64], i: ChunkIndex, on: bool) {
    if let Some(w) = bits.get_mut(i as usize / 64) {
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
}

impl Peer {
    fn has(&self, i: ChunkIndex) -> bool {
        bit(&self.have, i)
    }

    fn is_fetching(&self, i: ChunkIndex) -> bool {
        bit(&self.fetching, i)
    }
}

/// One node's fetch of one artifact: which chunks it has, which are in flight from where, which
/// peers hold what, and which sources are banned. See the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkScheduler {
    cfg: FetchConfig,
    chunks: Vec<ChunkState>,
    /// Tie-break among equally rare chunks: `order[i]` is chunk `i`'s rank.
    order: Vec<u32>,
    /// Sorted by (RTT, key).
    peers: Vec<Peer>,
    coordinator_in_flight: u32,
    coordinator_ban: Ban,
    in_flight: u32,
    verified: u32,
}

fn sanitize_rtt(rtt_us: f64) -> f64 {
    if rtt_us.is_nan() {
        f64::MAX
    } else {
        rtt_us.clamp(0.0, f64::MAX)
    }
}

impl ChunkScheduler {
    /// A fetch of `chunk_count` chunks, none held yet; `rng` draws the order among equally rare
    /// chunks.
    pub fn new(chunk_count: ChunkIndex, cfg: FetchConfig, rng: &mut impl Rng) -> Self {
        let mut perm: Vec<u32> = (0..chunk_count).collect();
        perm.shuffle(rng);
        let mut order = vec![0u32; chunk_count as usize];
        for (rank, &c) in perm.iter().enumerate() {
            order[c as usize] = rank as u32;
        }
        ChunkScheduler {
            cfg,
            chunks: vec![ChunkState::Missing; chunk_count as usize],
            order,
            peers: Vec::new(),
            coordinator_in_flight: 0,
            coordinator_ban: Ban::default(),
            in_flight: 0,
            verified: 0,
        }
    }

    /// The tuning.
    pub fn config(&self) -> &FetchConfig {
        &self.cfg
    }

    /// Chunks in the artifact.
    pub fn chunk_count(&self) -> ChunkIndex {
        self.chunks.len() as ChunkIndex
    }

    /// Chunks verified so far.
    pub fn verified(&self) -> ChunkIndex {
        self.verified
    }

    /// Every chunk is verified.
    pub fn is_complete(&self) -> bool {
        self.verified as usize == self.chunks.len()
    }

    /// Chunk `i` is verified.
    pub fn has(&self, i: ChunkIndex) -> bool {
        self.chunks.get(i as usize) == Some(&ChunkState::Verified)
    }

    /// Chunk `i` is neither verified nor in flight.
    pub fn wants(&self, i: ChunkIndex) -> bool {
        self.chunks.get(i as usize) == Some(&ChunkState::Missing)
    }

    /// Requests in flight over all sources.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Requests in flight to `source`.
    pub fn in_flight_to(&self, source: Source) -> u32 {
        match source {
            Source::Coordinator => self.coordinator_in_flight,
            Source::Peer(k) => self.peer(k).map_or(0, |p| p.in_flight),
        }
    }

    /// `source` is banned at `now_us`.
    pub fn banned(&self, source: Source, now_us: u64) -> bool {
        match source {
            Source::Coordinator => now_us < self.coordinator_ban.until_us,
            Source::Peer(k) => self.peer(k).is_some_and(|p| now_us < p.ban.until_us),
        }
    }

    /// Chunk `i` was found already verified on disk (a resumed download): no need to fetch it.
    pub fn mark_verified(&mut self, i: ChunkIndex) {
        match self.chunks.get(i as usize).copied() {
            Some(ChunkState::Missing) => {}
            Some(ChunkState::InFlight(s)) => self.release(s),
            Some(ChunkState::Verified) | None => return,
        }
        self.chunks[i as usize] = ChunkState::Verified;
        self.verified += 1;
    }

    /// Add a peer (holding nothing yet) or update its RTT and limit.
    pub fn set_peer(&mut self, key: PeerKey, info: PeerSource) {
        let limit = info
            .max_in_flight
            .map_or(self.cfg.peer_in_flight, |m| m.min(self.cfg.peer_in_flight));
        let rtt_us = sanitize_rtt(info.rtt_us);
        let words = self.chunks.len().div_ceil(64);
        let mut peer = match self.peers.iter().position(|p| p.key == key) {
            Some(at) => self.peers.remove(at),
            None => Peer {
                key,
                rtt_us,
                limit,
                have: vec![0; words],
                fetching: vec![0; words],
                in_flight: 0,
                ban: Ban::default(),
            },
        };
        peer.rtt_us = rtt_us;
        peer.limit = limit;
        let at = self
            .peers
            .partition_point(|p| (p.rtt_us, p.key) < (peer.rtt_us, peer.key));
        self.peers.insert(at, peer);
    }

    /// Forget a peer (it left). Its requests in flight are no longer counted and their chunks
    /// are missing again; they are returned so the caller can cancel them.
    pub fn remove_peer(&mut self, key: PeerKey) -> Vec<ChunkIndex> {
        let abandoned = self.abandon(Source::Peer(key));
        self.peers.retain(|p| p.key != key);
        abandoned
    }

    /// Peer `key` holds chunk `i` (ignored for an unknown peer or chunk).
    pub fn peer_has(&mut self, key: PeerKey, i: ChunkIndex) {
        if let Some(p) = self.peers.iter_mut().find(|p| p.key == key) {
            set_bit(&mut p.have, i, true);
            set_bit(&mut p.fetching, i, false);
        }
    }

    /// Peer `key` is fetching chunk `i` (`true`), or stopped without it (`false`): while it is,
    /// this node waits for it rather than ask the coordinator for the same chunk. The caller
    /// must say when such a fetch ends without the chunk (or remove the peer).
    pub fn peer_fetching(&mut self, key: PeerKey, i: ChunkIndex, fetching: bool) {
        if let Some(p) = self.peers.iter_mut().find(|p| p.key == key) {
            if !p.has(i) {
                set_bit(&mut p.fetching, i, fetching);
            }
        }
    }

    /// Peer `key` holds every chunk.
    pub fn peer_has_all(&mut self, key: PeerKey) {
        for i in 0..self.chunk_count() {
            self.peer_has(key, i);
        }
    }

    /// What to request next, and from where: `(chunk, source)` pairs, now counted as in flight,
    /// until the per-source and overall limits are reached. Empty when everything is verified
    /// or in flight, or every source is banned or saturated.
    pub fn next_requests(&mut self, now_us: u64) -> Vec<(ChunkIndex, Source)> {
        let mut out = Vec::new();
        if self.in_flight >= self.cfg.max_in_flight {
            return out;
        }
        // Missing chunks, rarest first (holders among usable peers), ties by the drawn order.
        let mut wanted: Vec<(u32, u32, ChunkIndex)> = Vec::new();
        for (i, s) in self.chunks.iter().enumerate() {
            if *s != ChunkState::Missing {
                continue;
            }
            let i = i as ChunkIndex;
            let holders = self
                .peers
                .iter()
                .filter(|p| now_us >= p.ban.until_us && p.has(i))
                .count() as u32;
            wanted.push((holders, self.order[i as usize], i));
        }
        wanted.sort_unstable();
        let coordinator_usable = now_us >= self.coordinator_ban.until_us;
        for (_, _, i) in wanted {
            if self.in_flight >= self.cfg.max_in_flight {
                break;
            }
            let peers_in_use = self.peers.iter().filter(|p| p.in_flight > 0).count() as u32;
            let peer = self.peers.iter().position(|p| {
                now_us >= p.ban.until_us
                    && p.in_flight < p.limit
                    && (p.in_flight > 0 || peers_in_use < self.cfg.max_peers)
                    && p.has(i)
            });
            let source = match peer {
                Some(at) => Source::Peer(self.peers[at].key),
                None => {
                    let to_peers = self.in_flight.saturating_sub(self.coordinator_in_flight);
                    let soon = self.peers.iter().any(|p| {
                        now_us >= p.ban.until_us
                            && (p.is_fetching(i) || (to_peers > 0 && p.limit > 0 && p.has(i)))
                    });
                    if soon
                        || !coordinator_usable
                        || self.coordinator_in_flight >= self.cfg.coordinator_in_flight
                    {
                        // A later chunk may still have a free holder.
                        continue;
                    }
                    // No usable holder, or every holder saturated: the coordinator.
                    Source::Coordinator
                }
            };
            self.take(i, source);
            out.push((i, source));
        }
        out
    }

    /// When a ban that blocks progress ends, µs: `Some` only when nothing is in flight, chunks
    /// are missing, and every source that could serve them is banned at `now_us` (call
    /// [`next_requests`](Self::next_requests) again then).
    pub fn retry_at_us(&self, now_us: u64) -> Option<u64> {
        if self.in_flight > 0 || self.is_complete() {
            return None;
        }
        let mut at = self.coordinator_ban.until_us;
        if at <= now_us {
            return None;
        }
        for p in &self.peers {
            if p.ban.until_us > now_us {
                at = at.min(p.ban.until_us);
            } else if p.limit > 0
                && self
                    .chunks
                    .iter()
                    .enumerate()
                    .any(|(i, s)| *s == ChunkState::Missing && p.has(i as ChunkIndex))
            {
                return None;
            }
        }
        Some(at)
    }

    /// An answer for chunk `i` from `source` arrived; `digest` is the sha256 the caller computed
    /// over it. Checked against `manifest`: see [`ChunkVerdict`]. Data from an earlier,
    /// abandoned request is still used when it verifies.
    pub fn on_chunk(
        &mut self,
        manifest: &ChunkManifest,
        i: ChunkIndex,
        source: Source,
        digest: &Digest,
        now_us: u64,
    ) -> ChunkVerdict {
        let Some(state) = self.chunks.get(i as usize).copied() else {
            return ChunkVerdict::Unneeded;
        };
        let current = state == ChunkState::InFlight(source);
        if manifest.verify(i, digest) {
            if state == ChunkState::Verified {
                if current {
                    self.release(source);
                }
                return ChunkVerdict::Unneeded;
            }
            if let ChunkState::InFlight(s) = state {
                // From `source`, or a late answer that beat a newer request elsewhere (whose
                // answer will then be unneeded; its slot is freed now).
                self.release(s);
            }
            self.chunks[i as usize] = ChunkState::Verified;
            self.verified += 1;
            if let Some(b) = self.ban_mut(source) {
                if !b.corrupt {
                    b.failures = 0;
                }
            }
            return ChunkVerdict::Verified;
        }
        if !current && self.banned(source, now_us) {
            // A late answer to a request abandoned when this source was banned: the same
            // incident, no longer ban.
            return ChunkVerdict::Corrupt {
                banned_until_us: self.ban_mut(source).map_or(now_us, |b| b.until_us),
                abandoned: Vec::new(),
            };
        }
        if current {
            self.chunks[i as usize] = ChunkState::Missing;
            self.release(source);
        }
        let abandoned = self.abandon(source);
        let banned_until_us = self.ban(source, now_us, true);
        ChunkVerdict::Corrupt {
            banned_until_us,
            abandoned,
        }
    }

    /// A request for chunk `i` to `source` failed without data (refused, timed out, connection
    /// lost): the chunk is missing again and the source banned with backoff. Returns when the
    /// ban ends, µs.
    pub fn on_failed(&mut self, i: ChunkIndex, source: Source, now_us: u64) -> u64 {
        if self.chunks.get(i as usize) == Some(&ChunkState::InFlight(source)) {
            self.chunks[i as usize] = ChunkState::Missing;
            self.release(source);
        }
        self.ban(source, now_us, false)
    }

    fn peer(&self, key: PeerKey) -> Option<&Peer> {
        self.peers.iter().find(|p| p.key == key)
    }

    fn ban_mut(&mut self, source: Source) -> Option<&mut Ban> {
        match source {
            Source::Coordinator => Some(&mut self.coordinator_ban),
            Source::Peer(k) => self
                .peers
                .iter_mut()
                .find(|p| p.key == k)
                .map(|p| &mut p.ban),
        }
    }

    fn ban(&mut self, source: Source, now_us: u64, corrupt: bool) -> u64 {
        let (base, max) = (self.cfg.ban_base_us, self.cfg.ban_max_us);
        let Some(b) = self.ban_mut(source) else {
            return now_us;
        };
        b.failures = b.failures.saturating_add(1);
        b.corrupt |= corrupt;
        let factor = 1u64.checked_shl(b.failures - 1).unwrap_or(u64::MAX);
        b.until_us = now_us.saturating_add(base.saturating_mul(factor).min(max));
        b.until_us
    }

    fn take(&mut self, i: ChunkIndex, source: Source) {
        self.chunks[i as usize] = ChunkState::InFlight(source);
        self.in_flight += 1;
        match source {
            Source::Coordinator => self.coordinator_in_flight += 1,
            Source::Peer(k) => {
                if let Some(p) = self.peers.iter_mut().find(|p| p.key == k) {
                    p.in_flight += 1;
                }
            }
        }
    }

    fn release(&mut self, source: Source) {
        self.in_flight = self.in_flight.saturating_sub(1);
        match source {
            Source::Coordinator => {
                self.coordinator_in_flight = self.coordinator_in_flight.saturating_sub(1);
            }
            Source::Peer(k) => {
                if let Some(p) = self.peers.iter_mut().find(|p| p.key == k) {
                    p.in_flight = p.in_flight.saturating_sub(1);
                }
            }
        }
    }

    /// Every chunk in flight from `source` goes back to missing; returns them.
    fn abandon(&mut self, source: Source) -> Vec<ChunkIndex> {
        let mut out = Vec::new();
        for i in 0..self.chunks.len() {
            if self.chunks[i] == ChunkState::InFlight(source) {
                self.chunks[i] = ChunkState::Missing;
                self.release(source);
                out.push(i as ChunkIndex);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const C: Source = Source::Coordinator;

    fn digest(i: ChunkIndex) -> Digest {
        let mut d = [0u8; 32];
        d[..4].copy_from_slice(&i.to_le_bytes());
        d[31] = 0x5a;
        d
    }

    fn bad_digest(i: ChunkIndex) -> Digest {
        let mut d = digest(i);
        d[0] ^= 0xff;
        d
    }

    fn manifest(chunks: ChunkIndex) -> ChunkManifest {
        let total = u64::from(chunks) * 1000 - 10;
        ChunkManifest::new(total, 1000, [7; 32], (0..chunks).map(digest).collect()).unwrap()
    }

    fn sched(chunks: ChunkIndex, cfg: FetchConfig) -> ChunkScheduler {
        ChunkScheduler::new(chunks, cfg, &mut StdRng::seed_from_u64(1))
    }

    fn peer(rtt_us: f64) -> PeerSource {
        PeerSource {
            rtt_us,
            max_in_flight: None,
        }
    }

    /// Answer every request at once, correctly except those from `bad`; returns the requests.
    fn drain(
        s: &mut ChunkScheduler,
        m: &ChunkManifest,
        bad: Option<PeerKey>,
    ) -> Vec<(ChunkIndex, Source)> {
        let mut log = Vec::new();
        for _ in 0..1000 {
            let reqs = s.next_requests(0);
            if reqs.is_empty() {
                break;
            }
            for (i, src) in reqs {
                let d = if Some(src) == bad.map(Source::Peer) {
                    bad_digest(i)
                } else {
                    digest(i)
                };
                s.on_chunk(m, i, src, &d, 0);
                log.push((i, src));
            }
        }
        log
    }

    #[test]
    fn manifest_layout_and_errors() {
        let m = manifest(3);
        assert_eq!(m.chunk_count(), 3);
        assert_eq!(m.total_bytes(), 2990);
        assert_eq!(m.chunk_len(0), Some(1000));
        assert_eq!(m.chunk_len(2), Some(990));
        assert_eq!(m.chunk_offset(2), Some(2000));
        assert_eq!(m.chunk_len(3), None);
        assert!(m.verify(1, &digest(1)));
        assert!(!m.verify(1, &digest(2)));
        assert!(!m.verify(9, &digest(9)));
        assert_eq!(ChunkManifest::chunk_count_for(0, 4), 0);
        assert_eq!(ChunkManifest::chunk_count_for(9, 4), 3);
        assert_eq!(
            ChunkManifest::new(10, 0, [0; 32], vec![]),
            Err(ManifestError::ZeroChunkSize)
        );
        let e = ChunkManifest::new(10, 4, [0; 32], vec![[0; 32]; 2]).unwrap_err();
        assert_eq!(
            e,
            ManifestError::ChunkCount {
                expected: 3,
                got: 2
            }
        );
        assert_eq!(e.to_string(), "manifest has 2 chunk digests, size needs 3");
        let empty = ChunkManifest::new(0, 4, [0; 32], vec![]).unwrap();
        assert_eq!(empty.chunk_count(), 0);
        assert!(
            ChunkScheduler::new(0, FetchConfig::default(), &mut StdRng::seed_from_u64(1))
                .is_complete()
        );
    }

    #[test]
    fn coordinator_alone_fetches_everything_within_its_limit() {
        let m = manifest(10);
        let mut s = sched(10, FetchConfig::default());
        let first = s.next_requests(0);
        assert_eq!(first.len(), 2, "coordinator_in_flight is 2: {first:?}");
        assert!(first.iter().all(|(_, src)| *src == C));
        assert!(s.next_requests(0).is_empty(), "saturated");
        for (i, src) in first {
            assert_eq!(
                s.on_chunk(&m, i, src, &digest(i), 0),
                ChunkVerdict::Verified
            );
        }
        drain(&mut s, &m, None);
        assert!(s.is_complete());
        assert_eq!(s.in_flight(), 0);
        // A second copy of a verified chunk is unneeded.
        assert_eq!(s.on_chunk(&m, 0, C, &digest(0), 0), ChunkVerdict::Unneeded);
    }

    #[test]
    fn nearest_holder_is_preferred() {
        let mut s = sched(
            4,
            FetchConfig {
                peer_in_flight: 1,
                ..FetchConfig::default()
            },
        );
        s.set_peer(1, peer(30_000.0));
        s.set_peer(2, peer(500.0));
        s.set_peer(3, peer(2_000.0));
        for k in 1..=3 {
            s.peer_has_all(k);
        }
        let reqs = s.next_requests(0);
        let sources: Vec<Source> = reqs.iter().map(|r| r.1).collect();
        // One slot each: nearest first, then the next nearest. The fourth chunk waits for a
        // slot (one frees as soon as a LAN answer arrives) rather than take the coordinator.
        assert_eq!(
            sources,
            vec![Source::Peer(2), Source::Peer(3), Source::Peer(1)]
        );
        assert_eq!(s.in_flight_to(C), 0);
    }

    #[test]
    fn coordinator_only_for_chunks_no_peer_holds_or_when_holders_are_saturated() {
        let m = manifest(6);
        let mut s = sched(6, FetchConfig::default());
        s.set_peer(1, peer(500.0));
        s.peer_has(1, 0);
        s.peer_has(1, 1);
        s.peer_has(1, 2);
        let reqs = s.next_requests(0);
        // Rarest first: the chunks nobody holds (3..6) go to the coordinator, up to its limit
        // (2); the holder takes two held ones (peer_in_flight); the rest waits.
        let to_coordinator: Vec<ChunkIndex> =
            reqs.iter().filter(|r| r.1 == C).map(|r| r.0).collect();
        let to_peer: Vec<ChunkIndex> = reqs
            .iter()
            .filter(|r| r.1 == Source::Peer(1))
            .map(|r| r.0)
            .collect();
        assert_eq!(to_coordinator.len(), 2, "{reqs:?}");
        assert!(to_coordinator.iter().all(|i| *i >= 3), "{reqs:?}");
        assert_eq!(to_peer.len(), 2, "{reqs:?}");
        assert!(to_peer.iter().all(|i| *i <= 2), "{reqs:?}");

        // When every chunk is held and the holder has free slots, the coordinator is not used.
        let mut s = sched(6, FetchConfig::default());
        s.set_peer(1, peer(500.0));
        s.set_peer(2, peer(700.0));
        s.set_peer(3, peer(900.0));
        s.set_peer(4, peer(900.0));
        for k in 1..=4 {
            s.peer_has_all(k);
        }
        let log = drain(&mut s, &m, None);
        assert!(s.is_complete());
        assert!(log.iter().all(|r| r.1 != C), "{log:?}");

        // Holders saturated (no upload slot for this node, e.g. after a "busy" answer):
        // the coordinator serves; once one has a slot again, it serves instead.
        let mut s = sched(6, FetchConfig::default());
        let busy = PeerSource {
            rtt_us: 500.0,
            max_in_flight: Some(0),
        };
        s.set_peer(1, busy);
        s.set_peer(2, busy);
        s.peer_has_all(1);
        s.peer_has_all(2);
        let reqs = s.next_requests(0);
        assert_eq!(reqs.len(), 2);
        assert!(reqs.iter().all(|r| r.1 == C), "{reqs:?}");
        s.set_peer(2, peer(500.0));
        let reqs = s.next_requests(0);
        assert_eq!(reqs.len(), 2, "two slots of peer 2: {reqs:?}");
        assert!(reqs.iter().all(|r| r.1 == Source::Peer(2)), "{reqs:?}");
    }

    #[test]
    fn a_chunk_a_peer_is_fetching_is_awaited_not_asked_of_the_coordinator() {
        let m = manifest(4);
        let mut s = sched(4, FetchConfig::default());
        s.set_peer(1, peer(500.0));
        for i in 0..3 {
            s.peer_fetching(1, i, true);
        }
        // Only chunk 3 is neither held nor coming: the coordinator gets it alone.
        assert_eq!(s.next_requests(0), vec![(3, C)]);
        // Peer 1 got chunk 0, gave up on chunk 1: 0 from it, 1 from the coordinator.
        s.peer_has(1, 0);
        s.peer_fetching(1, 1, false);
        let mut reqs = s.next_requests(0);
        reqs.sort_unstable();
        assert_eq!(reqs, vec![(0, Source::Peer(1)), (1, C)]);
        // A banned peer's promise does not count: chunk 2 goes to the coordinator.
        let v = s.on_chunk(&m, 0, Source::Peer(1), &bad_digest(0), 0);
        assert!(matches!(v, ChunkVerdict::Corrupt { .. }));
        s.on_chunk(&m, 3, C, &digest(3), 0);
        let mut reqs = s.next_requests(0);
        reqs.sort_unstable();
        assert_eq!(
            reqs,
            vec![(0, C)],
            "coordinator limit 2: chunk 1 and 0 in flight"
        );
        s.on_chunk(&m, 1, C, &digest(1), 0);
        assert_eq!(s.next_requests(0), vec![(2, C)]);
    }

    #[test]
    fn in_flight_is_bounded_per_source_and_overall() {
        let m = manifest(40);
        let cfg = FetchConfig {
            max_in_flight: 5,
            peer_in_flight: 2,
            coordinator_in_flight: 1,
            max_peers: 2,
            ..FetchConfig::default()
        };
        let mut s = sched(40, cfg);
        for k in 0..6 {
            s.set_peer(k, peer(100.0 * k as f64));
            s.peer_has_all(k);
        }
        let mut rng = StdRng::seed_from_u64(3);
        let mut pending: Vec<(ChunkIndex, Source)> = Vec::new();
        let mut steps = 0;
        while !s.is_complete() {
            steps += 1;
            assert!(steps < 1000);
            pending.extend(s.next_requests(0));
            assert!(s.in_flight() <= 5);
            assert_eq!(s.in_flight() as usize, pending.len());
            assert!(s.in_flight_to(C) <= 1);
            let used = (0..6)
                .filter(|k| s.in_flight_to(Source::Peer(*k)) > 0)
                .count();
            assert!(used <= 2, "max_peers");
            for k in 0..6 {
                assert!(s.in_flight_to(Source::Peer(k)) <= 2);
            }
            // Answer one at random.
            let (i, src) = pending.swap_remove(rng.gen_range(0..pending.len()));
            assert_eq!(
                s.on_chunk(&m, i, src, &digest(i), 0),
                ChunkVerdict::Verified
            );
        }
        assert_eq!(s.verified(), 40);
    }

    #[test]
    fn bad_peer_is_banned_at_its_first_bad_chunk_and_its_chunks_come_from_elsewhere() {
        let m = manifest(12);
        let mut s = sched(12, FetchConfig::default());
        s.set_peer(9, peer(100.0)); // nearest, and bad
        s.set_peer(2, peer(800.0));
        s.peer_has_all(9);
        s.peer_has_all(2);
        let reqs = s.next_requests(1_000);
        let from_bad: Vec<ChunkIndex> = reqs
            .iter()
            .filter(|r| r.1 == Source::Peer(9))
            .map(|r| r.0)
            .collect();
        assert_eq!(from_bad.len(), 2, "{reqs:?}");
        // Its first answer is bad: banned with the base ban, its other request abandoned.
        let v = s.on_chunk(
            &m,
            from_bad[0],
            Source::Peer(9),
            &bad_digest(from_bad[0]),
            1_000,
        );
        assert_eq!(
            v,
            ChunkVerdict::Corrupt {
                banned_until_us: 10_001_000,
                abandoned: vec![from_bad[1]],
            }
        );
        assert!(s.banned(Source::Peer(9), 1_000));
        assert!(!s.has(from_bad[0]) && s.wants(from_bad[0]) && s.wants(from_bad[1]));
        assert_eq!(s.in_flight_to(Source::Peer(9)), 0);
        // A late bad answer to the abandoned request is dropped, verifies nothing and does not
        // lengthen the ban (the same incident).
        let late = s.on_chunk(
            &m,
            from_bad[1],
            Source::Peer(9),
            &bad_digest(from_bad[1]),
            1_000,
        );
        assert_eq!(
            late,
            ChunkVerdict::Corrupt {
                banned_until_us: 10_001_000,
                abandoned: vec![],
            }
        );
        assert!(s.wants(from_bad[1]));
        // Everything completes from the good peer (and the coordinator), never the banned one.
        for (i, src) in reqs.iter().filter(|r| r.1 != Source::Peer(9)) {
            s.on_chunk(&m, *i, *src, &digest(*i), 1_000);
        }
        let mut log = Vec::new();
        for _ in 0..100 {
            let r = s.next_requests(2_000);
            if r.is_empty() {
                break;
            }
            for (i, src) in r {
                assert_ne!(src, Source::Peer(9));
                s.on_chunk(&m, i, src, &digest(i), 2_000);
                log.push((i, src));
            }
        }
        assert!(s.is_complete());
        assert!(log.iter().any(|r| r.0 == from_bad[0]));
        assert!(log.iter().any(|r| r.0 == from_bad[1]));
        // After the ban the peer is tried again; a second bad chunk doubles the ban.
        let mut s2 = sched(4, FetchConfig::default());
        s2.set_peer(9, peer(100.0));
        s2.peer_has_all(9);
        let r = s2.next_requests(0);
        let v = s2.on_chunk(&m, r[0].0, r[0].1, &bad_digest(r[0].0), 0);
        assert!(matches!(
            v,
            ChunkVerdict::Corrupt {
                banned_until_us: 10_000_000,
                ..
            }
        ));
        // Banned: the coordinator serves now.
        assert!(s2.next_requests(5).iter().all(|r| r.1 == C));
        let r = s2.next_requests(10_000_000);
        let r = r.iter().find(|r| r.1 == Source::Peer(9)).copied().unwrap();
        let v = s2.on_chunk(&m, r.0, r.1, &bad_digest(r.0), 10_000_000);
        assert!(matches!(
            v,
            ChunkVerdict::Corrupt {
                banned_until_us: 30_000_000,
                ..
            }
        ));
    }

    #[test]
    fn failures_ban_with_backoff_and_retry_at_says_when() {
        let mut s = sched(3, FetchConfig::default());
        let r = s.next_requests(0);
        assert_eq!(r.len(), 2);
        assert_eq!(s.on_failed(r[0].0, C, 0), 10_000_000);
        assert_eq!(s.retry_at_us(0), None, "one request still in flight");
        assert_eq!(s.on_failed(r[1].0, C, 0), 20_000_000);
        assert!(s.next_requests(5).is_empty());
        assert_eq!(s.retry_at_us(5), Some(20_000_000));
        let r = s.next_requests(20_000_000);
        assert_eq!(r.len(), 2);
        // A verified chunk resets a source's failures (it never sent bad data): base ban again.
        let m = manifest(3);
        assert_eq!(
            s.on_chunk(&m, r[0].0, C, &digest(r[0].0), 20_000_000),
            ChunkVerdict::Verified
        );
        assert_eq!(s.on_failed(r[1].0, C, 20_000_000), 30_000_000);
        assert_eq!(s.retry_at_us(20_000_000), Some(30_000_000));
        // A holder that is not banned and holds a missing chunk: no waiting for the ban.
        s.set_peer(4, peer(100.0));
        s.peer_has(4, r[1].0);
        assert_eq!(s.retry_at_us(20_000_000), None);
        assert_eq!(s.next_requests(20_000_000), vec![(r[1].0, Source::Peer(4))]);
    }

    #[test]
    fn resume_and_partial_holders() {
        let m = manifest(8);
        let mut s = sched(8, FetchConfig::default());
        for i in 0..4 {
            s.mark_verified(i);
        }
        s.mark_verified(0);
        assert_eq!(s.verified(), 4);
        s.set_peer(5, peer(300.0));
        s.peer_has(5, 6);
        s.peer_has(5, 99); // ignored
        let log = drain(&mut s, &m, None);
        assert!(s.is_complete());
        assert_eq!(log.len(), 4, "only the missing chunks: {log:?}");
        assert!(log.contains(&(6, Source::Peer(5))));
        // Removing a peer gives back its requests.
        let mut s = sched(8, FetchConfig::default());
        s.set_peer(5, peer(300.0));
        s.peer_has_all(5);
        let r = s.next_requests(0);
        let mut gone = s.remove_peer(5);
        gone.sort_unstable();
        let mut expect: Vec<ChunkIndex> = r
            .iter()
            .filter(|x| x.1 == Source::Peer(5))
            .map(|x| x.0)
            .collect();
        expect.sort_unstable();
        assert_eq!(gone, expect);
        assert_eq!(s.in_flight(), s.in_flight_to(C));
    }

    #[test]
    fn the_drawn_order_spreads_nodes_that_start_together() {
        let a = ChunkScheduler::new(64, FetchConfig::default(), &mut StdRng::seed_from_u64(1))
            .next_requests(0);
        let b = ChunkScheduler::new(64, FetchConfig::default(), &mut StdRng::seed_from_u64(2))
            .next_requests(0);
        assert_ne!(a, b);
        let again = ChunkScheduler::new(64, FetchConfig::default(), &mut StdRng::seed_from_u64(1))
            .next_requests(0);
        assert_eq!(a, again);
    }

    #[test]
    fn random_answers_keep_every_invariant_and_finish() {
        // Seeded random runs: peers (some bad) appear and learn chunks, answers come back in
        // random order, some requests fail, time moves on.
        let (mut from_peers, mut corrupt_seen) = (0, 0);
        for seed in 0..40u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let chunks = rng.gen_range(1..80);
            let m = manifest(chunks);
            let cfg = FetchConfig {
                max_in_flight: rng.gen_range(1..10),
                peer_in_flight: rng.gen_range(1..4),
                coordinator_in_flight: rng.gen_range(1..4),
                max_peers: rng.gen_range(1..5),
                ..FetchConfig::default()
            };
            let mut s = ChunkScheduler::new(chunks, cfg, &mut rng);
            let bad: Vec<bool> = (0..8).map(|_| rng.gen_bool(0.3)).collect();
            let mut pending: Vec<(ChunkIndex, Source)> = Vec::new();
            let mut now = 0u64;
            let mut steps = 0;
            while !s.is_complete() {
                steps += 1;
                assert!(steps < 200_000, "seed {seed}: stuck");
                match rng.gen_range(0..10) {
                    0 => {
                        let k = rng.gen_range(0..8u64);
                        s.set_peer(k, peer(rng.gen_range(100.0..50_000.0)));
                        for _ in 0..rng.gen_range(0..chunks) {
                            s.peer_has(k, rng.gen_range(0..chunks));
                        }
                    }
                    1 => now += rng.gen_range(0..5_000_000),
                    2..=4 => {
                        let reqs = s.next_requests(now);
                        for r in &reqs {
                            assert!(pending.iter().all(|p| p.0 != r.0), "seed {seed}: twice");
                            assert!(!s.banned(r.1, now), "seed {seed}: banned source used");
                        }
                        pending.extend(reqs);
                    }
                    _ if pending.is_empty() => {
                        if let Some(at) = s.retry_at_us(now) {
                            assert!(at > now);
                            now = at;
                        }
                    }
                    _ => {
                        let (i, src) = pending.swap_remove(rng.gen_range(0..pending.len()));
                        if rng.gen_bool(0.05) {
                            s.on_failed(i, src, now);
                            continue;
                        }
                        let corrupt = matches!(src, Source::Peer(k) if bad[k as usize]);
                        let d = if corrupt { bad_digest(i) } else { digest(i) };
                        match s.on_chunk(&m, i, src, &d, now) {
                            ChunkVerdict::Verified => {
                                assert!(!corrupt && s.has(i));
                                from_peers += usize::from(src != C);
                            }
                            ChunkVerdict::Corrupt { abandoned, .. } => {
                                assert!(corrupt && !s.has(i));
                                corrupt_seen += 1;
                                // The caller cancels the abandoned requests.
                                pending.retain(|p| !(p.1 == src && abandoned.contains(&p.0)));
                            }
                            ChunkVerdict::Unneeded => panic!("seed {seed}: no duplicate asked"),
                        }
                    }
                }
                assert_eq!(s.in_flight() as usize, pending.len(), "seed {seed}");
                assert!(s.in_flight() <= cfg.max_in_flight);
                assert!(s.in_flight_to(C) <= cfg.coordinator_in_flight);
                let used = (0..8)
                    .filter(|k| s.in_flight_to(Source::Peer(*k)) > 0)
                    .count();
                assert!(used as u32 <= cfg.max_peers, "seed {seed}");
                for k in 0..8 {
                    assert!(s.in_flight_to(Source::Peer(k)) <= cfg.peer_in_flight);
                }
                let verified = (0..chunks).filter(|i| s.has(*i)).count();
                assert_eq!(verified as u32, s.verified());
            }
        }
        assert!(
            from_peers > 100 && corrupt_seen > 10,
            "{from_peers} {corrupt_seen}"
        );
    }
}
