//! `Content-Encoding` of request bodies and `Accept-Encoding` of responses (gzip, deflate),
//! with the decompressed size bounded (gzip bombs).

use crate::V2Error;
use flate2::read::{DeflateDecoder, GzDecoder, ZlibDecoder};
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use std::io::{Read, Write};

/// A body coding the gateway reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// gzip (RFC 1952).
    Gzip,
    /// HTTP `deflate`: zlib (RFC 1950); raw deflate (RFC 1951) is accepted on requests too.
    Deflate,
}

impl Coding {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }
}

/// The coding named by a `Content-Encoding` header (`None`: identity).
pub fn content_coding(header: Option<&str>) -> Result<Option<Coding>, V2Error> {
    let Some(h) = header else { return Ok(None) };
    match h.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(None),
        "gzip" | "x-gzip" => Ok(Some(Coding::Gzip)),
        "deflate" => Ok(Some(Coding::Deflate)),
        other => Err(V2Error::UnsupportedEncoding(other.to_string())),
    }
}

/// The coding to answer with, from `Accept-Encoding` (gzip preferred; `q=0` honoured).
pub fn accepted_coding(header: Option<&str>) -> Option<Coding> {
    let h = header?;
    let mut gzip = false;
    let mut deflate = false;
    for item in h.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let refused = parts.any(|p| {
            let p = p.trim();
            p.strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        if refused {
            continue;
        }
        match name.as_str() {
            "gzip" | "x-gzip" => gzip = true,
            "deflate" => deflate = true,
            _ => {}
        }
    }
    if gzip {
        Some(Coding::Gzip)
    } else if deflate {
        Some(Coding::Deflate)
    } else {
        None
    }
}

fn read_bounded(mut r: impl Read, limit: usize) -> Result<Vec<u8>, V2Error> {
    let mut out = Vec::new();
    (&mut r)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| V2Error::BadRequest(format!("the compressed body is corrupt: {e}")))?;
    if out.len() > limit {
        return Err(V2Error::PayloadTooLarge { limit });
    }
    Ok(out)
}

/// Decompress `body`, refusing output larger than `limit` bytes.
pub fn decode(coding: Coding, body: &[u8], limit: usize) -> Result<Vec<u8>, V2Error> {
    match coding {
        Coding::Gzip => read_bounded(GzDecoder::new(body), limit),
        Coding::Deflate => {
            // zlib is what HTTP means by deflate; some clients send raw deflate.
            let zlib_header = body.len() >= 2
                && body[0] & 0x0f == 8
                && (u16::from(body[0]) << 8 | u16::from(body[1])) % 31 == 0;
            if zlib_header {
                read_bounded(ZlibDecoder::new(body), limit)
            } else {
                read_bounded(DeflateDecoder::new(body), limit)
            }
        }
    }
}

/// Compress `body` (fast level: the gateway's CPU is shared with the mesh).
pub fn encode(coding: Coding, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let out = Vec::with_capacity(body.len() / 2 + 64);
    match coding {
        Coding::Gzip => {
            let mut e = GzEncoder::new(out, Compression::fast());
            e.write_all(body)?;
            e.finish()
        }
        Coding::Deflate => {
            let mut e = ZlibEncoder::new(out, Compression::fast());
            e.write_all(body)?;
            e.finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_bombs_are_bounded() {
        let data = vec![7u8; 100_000];
        for c in [Coding::Gzip, Coding::Deflate] {
            let z = encode(c, &data).unwrap();
            assert_eq!(decode(c, &z, 100_000).unwrap(), data);
            let e = decode(c, &z, 99_999).unwrap_err();
            assert_eq!(e.status(), 413);
        }
        let mut raw = DeflateEncoderHelper::raw(&data);
        assert_eq!(decode(Coding::Deflate, &raw, 100_000).unwrap(), data);
        raw.truncate(3);
        assert_eq!(decode(Coding::Gzip, &raw, 10).unwrap_err().status(), 400);
    }

    struct DeflateEncoderHelper;
    impl DeflateEncoderHelper {
        fn raw(data: &[u8]) -> Vec<u8> {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
    }

    #[test]
    fn accept_encoding_is_negotiated() {
        assert_eq!(accepted_coding(None), None);
        assert_eq!(accepted_coding(Some("gzip, deflate")), Some(Coding::Gzip));
        assert_eq!(accepted_coding(Some("deflate")), Some(Coding::Deflate));
        assert_eq!(
            accepted_coding(Some("gzip;q=0, deflate;q=0.5")),
            Some(Coding::Deflate)
        );
        assert_eq!(accepted_coding(Some("br, identity")), None);
        assert_eq!(content_coding(Some("GZIP")).unwrap(), Some(Coding::Gzip));
        assert_eq!(content_coding(Some("br")).unwrap_err().status(), 415);
    }
}
