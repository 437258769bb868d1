//! The usage spool: the node's unsent usage records, on disk.
//!
//! ```text
//!  <data_dir>/usage.spool  =  frame*        frame = len: u32 LE | check: u32 LE | record (JSON, len bytes)
//!                                                    check = the first 4 bytes of sha256(record)
//! ```
//!
//! A record is appended (one `write`) before the response that made it is sent, so it survives
//! the node process crashing or being killed; [`UsageSpool::sync`] (every 200 ms, and on drain)
//! makes it survive an OS crash or power loss too. Acknowledged records are removed by truncating
//! the file when nothing is left, or by rewriting the live records once the acknowledged prefix is
//! at least half of the file (and over 1 MiB). An acknowledged record that comes back after a
//! crash is sent again and ignored by the ledger (deduplication by record id).
//!
//! On start the file is read frame by frame; the first frame that is short (a write torn by a
//! crash), has a bad check, or does not decode ends it: it and everything after it are dropped,
//! with a warning naming how many bytes and frames, and the file is cut back to the good prefix.

use sha2::{Digest, Sha256};
use skein_proto::UsageRecord;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The spool's file name in the node's data dir.
pub const SPOOL_FILE: &str = "usage.spool";
/// Frame header: length and check.
const HEADER: usize = 8;
/// Largest record accepted when reading the spool back (a longer length means corruption).
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Compact only when the acknowledged prefix is at least this long.
const COMPACT_MIN_BYTES: u64 = 1 << 20;

/// What [`UsageSpool::open`] found in the file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Records read back intact, oldest first.
    pub records: Vec<UsageRecord>,
    /// Bytes dropped at the end (a torn or corrupt tail); 0 when the file was clean.
    pub dropped_bytes: u64,
    /// Frames in the dropped tail (at least 1 when bytes were dropped).
    pub dropped_frames: u64,
}

/// The spool file of one node (the in-memory queue lives in `UsageBuffer`).
#[derive(Debug)]
pub struct UsageSpool {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    len: u64,
    /// Bytes of the acknowledged prefix still in the file.
    acked: u64,
    /// Whether something was written since the last sync.
    dirty: bool,
}

fn check(payload: &[u8]) -> u32 {
    let d = Sha256::digest(payload);
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// One record as a frame.
pub(crate) fn encode(r: &UsageRecord) -> Vec<u8> {
    let payload = serde_json::to_vec(r).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&check(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The records of `bytes` up to the first bad frame, and where the good prefix ends.
fn decode_all(bytes: &[u8]) -> (Vec<UsageRecord>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let sum = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        let len = len as usize;
        if len > MAX_RECORD_BYTES || bytes.len() - at - HEADER < len {
            break;
        }
        let payload = &bytes[at + HEADER..at + HEADER + len];
        if check(payload) != sum {
            break;
        }
        let Ok(r) = serde_json::from_slice::<UsageRecord>(payload) else {
            break;
        };
        records.push(r);
        at += HEADER + len;
    }
    (records, at)
}

/// Frames that the headers of a dropped tail describe (at least 1).
fn count_frames(mut tail: &[u8]) -> u64 {
    let mut n = 0;
    while !tail.is_empty() {
        n += 1;
        if tail.len() < HEADER {
            break;
        }
        let len = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) as usize;
        if len > MAX_RECORD_BYTES || tail.len() - HEADER < len {
            break;
        }
        tail = &tail[HEADER + len..];
    }
    n.max(1)
}

impl UsageSpool {
    /// Open (or create) the spool at `path` and read back what it holds.
    pub fn open(path: &Path) -> std::io::Result<(UsageSpool, Recovered)> {
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (records, good) = decode_all(&bytes);
        let dropped_bytes = (bytes.len() - good) as u64;
        let dropped_frames = if dropped_bytes > 0 {
            count_frames(&bytes[good..])
        } else {
            0
        };
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        if dropped_bytes > 0 {
            file.set_len(good as u64)?;
            file.sync_all()?;
        }
        let spool = UsageSpool {
            path: path.to_path_buf(),
            file,
            len: good as u64,
            acked: 0,
            dirty: false,
        };
        Ok((
            spool,
            Recovered {
                records,
                dropped_bytes,
                dropped_frames,
            },
        ))
    }

    /// Where the spool lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the file, acknowledged prefix included.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of records not yet acknowledged.
    pub fn live_bytes(&self) -> u64 {
        self.len - self.acked
    }

    /// Append one frame (one `write`: in the OS page cache once this returns).
    pub fn append(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write_all(frame)?;
        self.len += frame.len() as u64;
        self.dirty = true;
        Ok(())
    }

    /// A handle to fsync outside the caller's lock, when something is unsynced.
    pub fn to_sync(&mut self) -> std::io::Result<Option<File>> {
        if !std::mem::take(&mut self.dirty) {
            return Ok(None);
        }
        self.file.try_clone().map(Some)
    }

    /// `bytes` at the front are acknowledged; `rest` are the records still waiting, oldest
    /// first. Truncates or compacts the file when that pays.
    pub fn ack<'a>(
        &mut self,
        bytes: u64,
        rest: impl ExactSizeIterator<Item = &'a UsageRecord>,
    ) -> std::io::Result<()> {
        self.acked = (self.acked + bytes).min(self.len);
        if rest.len() == 0 {
            self.file.set_len(0)?;
            self.len = 0;
            self.acked = 0;
            return Ok(());
        }
        if self.acked >= COMPACT_MIN_BYTES && self.acked * 2 >= self.len {
            self.compact(rest)?;
        }
        Ok(())
    }

    /// Rewrite the file with `rest` only (a temporary file, fsync'd, renamed over the spool).
    fn compact<'a>(&mut self, rest: impl Iterator<Item = &'a UsageRecord>) -> std::io::Result<()> {
        let tmp = self.path.with_extension("spool.tmp");
        // Append mode, as the spool itself (a later truncation must move the write position).
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut out = OpenOptions::new().create(true).append(true).open(&tmp)?;
        let mut len = 0u64;
        let mut buf = Vec::new();
        for r in rest {
            let f = encode(r);
            len += f.len() as u64;
            buf.extend_from_slice(&f);
        }
        out.write_all(&buf)?;
        out.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        // From here on the renamed file is the spool: keep writing through this very handle
        // (reopening could fail and leave appends going to the replaced file).
        self.file = out;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.len = len;
        self.acked = 0;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn rec(id: &str) -> UsageRecord {
        UsageRecord {
            id: id.into(),
            request_id: id.len() as u64,
            tenant: "t".into(),
            model: "m".into(),
            version: "1".into(),
            node: "n".into(),
            node_class: "cpu".into(),
            compute_us: 7,
            queue_us: 1,
            bytes_in: 2,
            bytes_out: 3,
            cold_start: true,
            ts_ms: 42,
        }
    }

    #[test]
    fn frames_round_trip_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_FILE);
        let (mut s, found) = UsageSpool::open(&path).unwrap();
        assert_eq!(found, Recovered::default());
        let want: Vec<_> = (0..5).map(|i| rec(&format!("r{i}"))).collect();
        for r in &want {
            s.append(&encode(r)).unwrap();
        }
        let f = s.to_sync().unwrap().expect("dirty");
        f.sync_data().unwrap();
        assert!(s.to_sync().unwrap().is_none());
        drop(s);
        let (s, found) = UsageSpool::open(&path).unwrap();
        assert_eq!(found.records, want);
        assert_eq!(found.dropped_bytes, 0);
        assert_eq!(s.len(), std::fs::metadata(&path).unwrap().len());
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_FILE);
        let (mut s, _) = UsageSpool::open(&path).unwrap();
        for i in 0..3 {
            s.append(&encode(&rec(&format!("r{i}")))).unwrap();
        }
        let good = s.len();
        // A write torn half way.
        let torn = encode(&rec("torn"));
        s.append(&torn[..torn.len() / 2]).unwrap();
        drop(s);
        let (s, found) = UsageSpool::open(&path).unwrap();
        assert_eq!(found.records.len(), 3);
        assert_eq!(found.dropped_bytes, (torn.len() / 2) as u64);
        assert_eq!(found.dropped_frames, 1);
        // The file was cut back to the good prefix: appending continues cleanly.
        assert_eq!(s.len(), good);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        drop(s);

        // A flipped byte in the second record: it and the third are dropped.
        let mut bytes = std::fs::read(&path).unwrap();
        let first = encode(&rec("r0")).len();
        bytes[first + HEADER + 3] ^= 0x20;
        std::fs::write(&path, &bytes).unwrap();
        let (_, found) = UsageSpool::open(&path).unwrap();
        assert_eq!(found.records, vec![rec("r0")]);
        assert_eq!(found.dropped_frames, 2);

        // Garbage (a length far too large) never panics.
        std::fs::write(&path, [0xff; 5]).unwrap();
        let (s, found) = UsageSpool::open(&path).unwrap();
        assert!(found.records.is_empty());
        assert_eq!((found.dropped_bytes, found.dropped_frames), (5, 1));
        assert!(s.is_empty());
    }

    #[test]
    fn acknowledged_records_are_truncated_or_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SPOOL_FILE);
        let (mut s, _) = UsageSpool::open(&path).unwrap();
        let all: Vec<_> = (0..12_000)
            .map(|i| rec(&format!("record-{i:06}")))
            .collect();
        for r in &all {
            s.append(&encode(r)).unwrap();
        }
        let frame = encode(&all[0]).len() as u64;
        assert!(frame * 7010 >= COMPACT_MIN_BYTES && frame * 7010 * 2 >= frame * 12_000);
        // A small prefix: kept in the file (resent after a crash is harmless).
        s.ack(frame * 10, all[10..].iter()).unwrap();
        assert_eq!(s.len(), frame * 12_000);
        assert_eq!(s.live_bytes(), frame * 11_990);
        // Over half acknowledged (and over 1 MiB): the file holds the live records only.
        s.ack(frame * 7000, all[7010..].iter()).unwrap();
        assert_eq!(s.len(), frame * 4990);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), frame * 4990);
        s.append(&encode(&rec("after"))).unwrap();
        drop(s);
        let (mut s, found) = UsageSpool::open(&path).unwrap();
        assert_eq!(found.records.len(), 4991);
        assert_eq!(found.records[0], all[7010]);
        assert_eq!(found.records[4990], rec("after"));
        // Everything acknowledged: an empty file.
        s.ack(s.len(), [].iter()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // Writing goes on at the start of the emptied file.
        let next = encode(&rec("next"));
        s.append(&next).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), next);
    }
}
