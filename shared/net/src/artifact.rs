//! [`fetch`]: the one way an artifact is downloaded, by the node's cache and by the SDK:
//! resumable from a `.partial` file, bounded in size, and checked against its sha256 before
//! anything is stored or returned.
//!
//! Where the bytes come from is an [`ArtifactSource`]: something that opens the artifact's
//! bytes from an offset. [`CoordinatorSource`] asks the coordinator (`FetchArtifact` on the
//! control protocol); another source (a peer node) plugs in the same way, and the fetch logic
//! (resume, bounds, hash, rename) stays here, once.
//!
//! ```text
//!   fetch(source, request) ── have <dest>.partial? ── source.open(id, offset) ──▶ bytes
//!        │                                                                         │
//!        └── sha256(partial ‖ bytes) == id ? rename to <dest> : delete partial, Err ◀┘
//! ```

use crate::ctl::{CtlClient, CtlError};
use crate::NetError;
use sha2::{Digest, Sha256};
use skein_proto::{ArtifactId, CtlEnvelope, CtlRequest, CtlResponse, ErrorCode, WireError};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes read from a source at a time.
const CHUNK: usize = 256 * 1024;

/// An opened artifact: its total size and a stream of its bytes from the requested offset.
#[derive(Debug)]
pub struct ArtifactStream<R> {
    /// The artifact's whole size, bytes.
    pub total: u64,
    /// The bytes from the offset to the end (`total - offset` of them).
    pub bytes: R,
}

/// Where artifact bytes come from.
pub trait ArtifactSource {
    /// The byte stream an opened artifact is read from.
    type Stream: AsyncRead + Unpin + Send;

    /// Open artifact `id` from byte `offset` (0: from the start).
    fn open(
        &self,
        id: &ArtifactId,
        offset: u64,
    ) -> impl Future<Output = Result<ArtifactStream<Self::Stream>, FetchError>> + Send;
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
    /// Bytes taken from an earlier partial download (0: from the start).
    pub resumed_from: u64,
    /// Bytes received from the source by this fetch.
    pub received: u64,
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
}

impl From<FetchError> for WireError {
    fn from(e: FetchError) -> Self {
        let code = match &e {
            FetchError::Remote(w) => return w.clone(),
            FetchError::Transfer { source, .. } => match source {
                NetError::Timeout(_) => ErrorCode::DeadlineExceeded,
                _ => ErrorCode::Internal,
            },
            FetchError::Unexpected(_) => ErrorCode::Malformed,
            FetchError::SizeMismatch { .. } | FetchError::HashMismatch { .. } => {
                ErrorCode::HashMismatch
            }
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

/// Fetch `req.id` from `source` (see the [module docs](self)): resume from `<dest>.partial`
/// when there is one, check size bounds before receiving, hash what arrived, and store the
/// verified artifact at `dest` (renamed from the partial file). A mismatching hash deletes the
/// partial download and fails with [`FetchError::HashMismatch`]; a broken transfer keeps what
/// arrived, for the next fetch to resume from.
pub async fn fetch<S: ArtifactSource>(
    source: &S,
    req: &FetchRequest<'_>,
) -> Result<Fetched, FetchError> {
    let id = req.id;
    if let Some(size) = req.size.filter(|&s| s > req.max_size) {
        return Err(FetchError::TooLarge {
            id: id.clone(),
            size,
            max: req.max_size,
        });
    }
    let partial = req.dest.map(partial_path);
    let mut have = match &partial {
        Some(p) => match std::fs::read(p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(disk("reading the partial download")(e)),
        },
        None => Vec::new(),
    };
    // More than the artifact holds: not a prefix of it.
    if have.len() as u64 > req.size.unwrap_or(req.max_size) {
        have.clear();
    }
    let resumed_from = have.len() as u64;
    let opened = source.open(id, resumed_from).await?;
    let total = opened.total;
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
    if resumed_from > total {
        return Err(FetchError::Unexpected(format!(
            "the source has {total} bytes of {id}, the partial download {resumed_from}"
        )));
    }
    let left = total - resumed_from;
    let mut file = match &partial {
        Some(p) => {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(disk("opening the partial download"))?;
            // The file changed since it was read, or held more than the artifact: rewrite it.
            if f.metadata().map(|m| m.len()).unwrap_or(0) != resumed_from {
                f.set_len(0)
                    .map_err(disk("truncating the partial download"))?;
                f.write_all(&have)
                    .map_err(disk("rewriting the partial download"))?;
            }
            Some(f)
        }
        None => None,
    };
    // `total` is bounded by `max_size` above; reserve at most 1 GiB ahead of the bytes.
    have.reserve_exact(usize::try_from(left.min(1 << 30)).unwrap_or(0));
    let mut stream = opened.bytes;
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(left).unwrap_or(CHUNK)).max(1)];
    let mut received = 0u64;
    while received < left {
        let n = (left - received).min(buf.len() as u64) as usize;
        let got = stream
            .read(&mut buf[..n])
            .await
            .map_err(|e| FetchError::Transfer {
                id: id.clone(),
                source: NetError::Read(e.to_string()),
            })?;
        if got == 0 {
            return Err(FetchError::Transfer {
                id: id.clone(),
                source: NetError::Closed,
            });
        }
        if let Some(f) = file.as_mut() {
            f.write_all(&buf[..got])
                .map_err(disk("writing the download"))?;
        }
        have.extend_from_slice(&buf[..got]);
        received += got as u64;
    }
    let digest: [u8; 32] = Sha256::digest(&have).into();
    let actual = ArtifactId::from_digest(&digest);
    if actual != *id {
        if let Some(p) = &partial {
            drop(file);
            let _ = std::fs::remove_file(p);
        }
        return Err(FetchError::HashMismatch {
            id: id.clone(),
            actual,
        });
    }
    if let (Some(f), Some(p), Some(dest)) = (file, &partial, req.dest) {
        f.sync_all().map_err(disk("syncing the download"))?;
        std::fs::rename(p, dest).map_err(disk("storing the artifact"))?;
    }
    Ok(Fetched {
        bytes: have,
        resumed_from,
        received,
    })
}

/// Artifacts from the coordinator: `FetchArtifact { sha256, offset }` on the control
/// connection, answered by `Artifact { total, size }` and `size` raw bytes on the same stream.
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
    type Stream = quinn::RecvStream;

    async fn open(
        &self,
        id: &ArtifactId,
        offset: u64,
    ) -> Result<ArtifactStream<quinn::RecvStream>, FetchError> {
        let transfer = |source: NetError| FetchError::Transfer {
            id: id.clone(),
            source,
        };
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
            CtlRequest::FetchArtifact {
                sha256: id.to_string(),
                offset,
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
        match frame
            .header::<CtlResponse>()
            .map_err(|e| transfer(e.into()))?
        {
            CtlResponse::Artifact { total, size } if offset.checked_add(size) == Some(total) => {
                Ok(ArtifactStream { total, bytes: recv })
            }
            CtlResponse::Artifact { total, size } => Err(FetchError::Unexpected(format!(
                "the coordinator sends {size} bytes of {total} from offset {offset}"
            ))),
            CtlResponse::Error(e) => Err(FetchError::Remote(e)),
            other => Err(FetchError::Unexpected(format!("{other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An in-memory source that delivers at most `cut` bytes per open (then the stream ends
    /// early, as a broken transfer does) and records the offsets it was asked for.
    struct Memory {
        bytes: Vec<u8>,
        cut: Option<usize>,
        offsets: Mutex<Vec<u64>>,
    }

    impl Memory {
        fn new(bytes: Vec<u8>, cut: Option<usize>) -> Self {
            Memory {
                bytes,
                cut,
                offsets: Mutex::new(Vec::new()),
            }
        }
    }

    impl ArtifactSource for Memory {
        type Stream = std::io::Cursor<Vec<u8>>;

        async fn open(
            &self,
            _id: &ArtifactId,
            offset: u64,
        ) -> Result<ArtifactStream<Self::Stream>, FetchError> {
            self.offsets.lock().unwrap().push(offset);
            let rest = &self.bytes[offset as usize..];
            let n = self.cut.map_or(rest.len(), |c| c.min(rest.len()));
            Ok(ArtifactStream {
                total: self.bytes.len() as u64,
                bytes: std::io::Cursor::new(rest[..n].to_vec()),
            })
        }
    }

    fn artifact(len: usize) -> (Vec<u8>, ArtifactId) {
        // A fixed pattern (no RNG needed): every byte depends on its position.
        let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let d: [u8; 32] = Sha256::digest(&bytes).into();
        (bytes, ArtifactId::from_digest(&d))
    }

    #[tokio::test]
    async fn a_cut_download_resumes_from_its_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, id) = artifact(1_000_000);
        let dest = dir.path().join(id.as_str());
        let req = FetchRequest {
            id: &id,
            size: Some(bytes.len() as u64),
            max_size: 1 << 30,
            dest: Some(&dest),
        };
        // The first transfer breaks after 300 000 bytes: they stay in the partial file.
        let cut = Memory::new(bytes.clone(), Some(300_000));
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
        assert_eq!(
            std::fs::metadata(partial_path(&dest)).unwrap().len(),
            300_000
        );
        assert!(!dest.exists());
        // The next fetch asks for the rest only, and checks the whole.
        let whole = Memory::new(bytes.clone(), None);
        let got = fetch(&whole, &req).await.unwrap();
        assert_eq!(*whole.offsets.lock().unwrap(), vec![300_000]);
        assert_eq!(got.resumed_from, 300_000);
        assert_eq!(got.received, 700_000);
        assert_eq!(got.bytes, bytes);
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        assert!(!partial_path(&dest).exists());
    }

    #[tokio::test]
    async fn a_hash_mismatch_deletes_the_partial_download_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, id) = artifact(10_000);
        let dest = dir.path().join(id.as_str());
        // A partial file whose content is not a prefix of the artifact.
        std::fs::write(partial_path(&dest), vec![0xffu8; 4_000]).unwrap();
        let req = FetchRequest {
            id: &id,
            size: Some(bytes.len() as u64),
            max_size: 1 << 20,
            dest: Some(&dest),
        };
        let e = fetch(&Memory::new(bytes.clone(), None), &req)
            .await
            .unwrap_err();
        let FetchError::HashMismatch { id: want, actual } = &e else {
            panic!("expected a hash mismatch, got {e:?}");
        };
        assert_eq!(want, &id);
        assert_ne!(actual, &id);
        assert!(e.to_string().contains(id.as_str()), "{e}");
        assert!(e.to_string().contains("fetched again"), "{e}");
        assert_eq!(WireError::from(e).code, ErrorCode::HashMismatch);
        assert!(!partial_path(&dest).exists(), "the bad partial is gone");
        assert!(!dest.exists());
        // The next fetch starts over and succeeds.
        let got = fetch(&Memory::new(bytes.clone(), None), &req)
            .await
            .unwrap();
        assert_eq!((got.resumed_from, got.received), (0, 10_000));
    }

    #[tokio::test]
    async fn sizes_beyond_the_bound_or_unlike_the_announced_one_are_refused_before_reading() {
        let (bytes, id) = artifact(5_000);
        let src = Memory::new(bytes.clone(), None);
        // Announced too large: the source is not even asked.
        let e = fetch(
            &src,
            &FetchRequest {
                id: &id,
                size: Some(5_000),
                max_size: 4_999,
                dest: None,
            },
        )
        .await
        .unwrap_err();
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
        assert!(src.offsets.lock().unwrap().is_empty());
        // Unannounced, the source's size is bounded too.
        let e = fetch(
            &src,
            &FetchRequest {
                id: &id,
                size: None,
                max_size: 4_999,
                dest: None,
            },
        )
        .await
        .unwrap_err();
        assert!(
            matches!(e, FetchError::TooLarge { size: 5_000, .. }),
            "{e:?}"
        );
        // The source disagrees with the announced size.
        let e = fetch(
            &src,
            &FetchRequest {
                id: &id,
                size: Some(4_000),
                max_size: 1 << 20,
                dest: None,
            },
        )
        .await
        .unwrap_err();
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
        // In memory, within bounds: the bytes, checked.
        let got = fetch(
            &src,
            &FetchRequest {
                id: &id,
                size: None,
                max_size: 5_000,
                dest: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(got.bytes, bytes);
    }

    #[tokio::test]
    async fn from_the_coordinator_over_loopback_a_cut_fetch_resumes_and_checks() {
        use crate::ctl::tests::{artifact, stand, CUT};
        use std::sync::atomic::Ordering;
        let s = stand().await;
        let (bytes, id) = artifact();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join(id.as_str());
        let req = FetchRequest {
            id: &id,
            size: Some(bytes.len() as u64),
            max_size: 1 << 30,
            dest: Some(&dest),
        };
        let source = CoordinatorSource::new(&s.client, None);
        // The stand ends the first transfer early.
        let e = fetch(&source, &req).await.unwrap_err();
        assert!(matches!(e, FetchError::Transfer { .. }), "{e:?}");
        assert_eq!(std::fs::metadata(partial_path(&dest)).unwrap().len(), CUT);
        let got = fetch(&source, &req).await.unwrap();
        assert_eq!(got.resumed_from, CUT);
        assert_eq!(got.received, bytes.len() as u64 - CUT);
        assert_eq!(s.sent.load(Ordering::SeqCst), bytes.len() as u64);
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        // An artifact the source does not have: its wire error, as sent.
        let other = ArtifactId::from_digest(&[7u8; 32]);
        let e = fetch(
            &source,
            &FetchRequest {
                id: &other,
                size: None,
                max_size: 1 << 30,
                dest: None,
            },
        )
        .await
        .unwrap_err();
        let w = WireError::from(e);
        assert_eq!(w.code, ErrorCode::UnknownArtifact);
        assert!(w.message.contains(other.as_str()), "{}", w.message);
        s.cancel.cancel();
    }
}
