//! NumPy `.npy` (format 1.0–3.0) encoding and decoding, for C-order little-endian arrays.

use crate::tensor::{element_count, DataType, Tensor};

const MAGIC: &[u8] = b"\x93NUMPY";
/// Largest header accepted (numpy itself writes < 4 KiB).
const MAX_HEADER: usize = 64 << 10;

/// Why a `.npy` file could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NpyError {
    /// Not a `.npy` file.
    #[error("not a .npy file (missing \\x93NUMPY magic)")]
    NotNpy,
    /// The file is shorter than its header says.
    #[error("truncated .npy file")]
    Truncated,
    /// The header is not the dictionary numpy writes.
    #[error("malformed .npy header: {0}")]
    Header(String),
    /// The dtype has no V2 datatype.
    #[error("unsupported .npy dtype `{0}` (supported: little-endian bool, int8-64, uint8-64, float16/32/64)")]
    UnsupportedDtype(String),
    /// Fortran-order arrays are not supported.
    #[error("Fortran-order arrays are not supported; save with np.ascontiguousarray")]
    FortranOrder,
    /// Data and shape disagree.
    #[error(transparent)]
    Tensor(#[from] crate::tensor::TensorError),
}

fn dtype_of(descr: &str) -> Result<DataType, NpyError> {
    Ok(match descr {
        "|b1" | "<b1" => DataType::Bool,
        "|u1" | "<u1" => DataType::Uint8,
        "<u2" => DataType::Uint16,
        "<u4" => DataType::Uint32,
        "<u8" => DataType::Uint64,
        "|i1" | "<i1" => DataType::Int8,
        "<i2" => DataType::Int16,
        "<i4" => DataType::Int32,
        "<i8" => DataType::Int64,
        "<f2" => DataType::Fp16,
        "<f4" => DataType::Fp32,
        "<f8" => DataType::Fp64,
        other => return Err(NpyError::UnsupportedDtype(other.to_string())),
    })
}

fn descr_of(d: DataType) -> Option<&'static str> {
    Some(match d {
        DataType::Bool => "|b1",
        DataType::Uint8 => "|u1",
        DataType::Uint16 => "<u2",
        DataType::Uint32 => "<u4",
        DataType::Uint64 => "<u8",
        DataType::Int8 => "|i1",
        DataType::Int16 => "<i2",
        DataType::Int32 => "<i4",
        DataType::Int64 => "<i8",
        DataType::Fp16 => "<f2",
        DataType::Fp32 => "<f4",
        DataType::Fp64 => "<f8",
        DataType::Bf16 | DataType::Bytes => return None,
    })
}

/// Value of `key` in numpy's header dict, as the raw text up to the next top-level comma.
fn field<'a>(header: &'a str, key: &str) -> Result<&'a str, NpyError> {
    let pat_a = format!("'{key}':");
    let pat_b = format!("\"{key}\":");
    let start = header
        .find(&pat_a)
        .map(|i| i + pat_a.len())
        .or_else(|| header.find(&pat_b).map(|i| i + pat_b.len()))
        .ok_or_else(|| NpyError::Header(format!("missing `{key}`")))?;
    let rest = header[start..].trim_start();
    if rest.starts_with('(') {
        let end = rest
            .find(')')
            .ok_or_else(|| NpyError::Header("unclosed shape".into()))?;
        Ok(&rest[..=end])
    } else {
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Ok(rest[..end].trim())
    }
}

/// Decode a `.npy` file into a tensor named `name`.
pub fn decode(name: &str, bytes: &[u8]) -> Result<Tensor, NpyError> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(NpyError::NotNpy);
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(NpyError::Truncated);
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(NpyError::Header(format!("unknown format version {v}"))),
    };
    if header_len > MAX_HEADER {
        return Err(NpyError::Header(format!(
            "header of {header_len} bytes is too long"
        )));
    }
    let end = start + header_len;
    if bytes.len() < end {
        return Err(NpyError::Truncated);
    }
    let header = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| NpyError::Header("header is not UTF-8".into()))?;
    let descr = field(header, "descr")?.trim_matches(|c| c == '\'' || c == '"');
    let datatype = dtype_of(descr)?;
    if field(header, "fortran_order")? != "False" {
        return Err(NpyError::FortranOrder);
    }
    let shape_txt = field(header, "shape")?;
    let inner = shape_txt
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| NpyError::Header(format!("shape `{shape_txt}` is not a tuple")))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<u64>()
                .map_err(|_| NpyError::Header(format!("bad dimension `{s}`")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let data = &bytes[end..];
    let count = element_count(&shape).ok_or_else(|| NpyError::Header("shape overflows".into()))?;
    let need = count.saturating_mul(datatype.element_size().unwrap_or(1) as u64);
    if (data.len() as u64) < need {
        return Err(NpyError::Truncated);
    }
    Ok(Tensor::new(
        name,
        datatype,
        shape,
        data[..need as usize].to_vec(),
    )?)
}

/// Encode a tensor as a `.npy` (format 1.0) file. BF16 is widened to float32; BYTES is refused.
pub fn encode(t: &Tensor) -> Result<Vec<u8>, NpyError> {
    let (descr, data): (&str, std::borrow::Cow<'_, [u8]>) = match descr_of(t.datatype()) {
        Some(d) => (d, t.data().into()),
        None if t.datatype() == DataType::Bf16 => {
            let v: Vec<u8> = t
                .data()
                .chunks_exact(2)
                .flat_map(|c| {
                    half::bf16::from_le_bytes([c[0], c[1]])
                        .to_f32()
                        .to_le_bytes()
                })
                .collect();
            ("<f4", v.into())
        }
        None => return Err(NpyError::UnsupportedDtype(t.datatype().to_string())),
    };
    let shape = match t.shape() {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that the data starts on a 64-byte boundary, header ending in '\n'.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_including_rank_zero() {
        let t = Tensor::from_f32("x", vec![2, 3], &[1., 2., 3., 4., 5., 6.]).unwrap();
        let b = encode(&t).unwrap();
        assert_eq!(decode("x", &b).unwrap(), t);
        let s = Tensor::from_i64("sr", vec![], &[16000]).unwrap();
        assert_eq!(decode("sr", &encode(&s).unwrap()).unwrap(), s);
        let v = Tensor::from_i64("v", vec![1], &[3]).unwrap();
        assert_eq!(decode("v", &encode(&v).unwrap()).unwrap(), v);
    }

    #[test]
    fn reads_numpy_written_header() {
        // Bytes as numpy 2.x writes np.zeros((1, 2), np.float32).
        let mut b =
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }"
                .to_vec();
        while b.len() < 127 {
            b.push(b' ');
        }
        b.push(b'\n');
        b.extend([0u8; 8]);
        let t = decode("x", &b).unwrap();
        assert_eq!(t.shape(), &[1, 2]);
        assert_eq!(t.datatype(), DataType::Fp32);
    }

    #[test]
    fn bad_files_are_errors() {
        assert!(matches!(decode("x", b"hello world"), Err(NpyError::NotNpy)));
        let t = Tensor::from_f32("x", vec![4], &[1., 2., 3., 4.]).unwrap();
        let b = encode(&t).unwrap();
        assert!(matches!(
            decode("x", &b[..b.len() - 1]),
            Err(NpyError::Truncated)
        ));
        let big = String::from_utf8_lossy(&b).replace("'<f4'", "'>f4'");
        assert!(matches!(
            decode("x", big.as_bytes()),
            Err(NpyError::UnsupportedDtype(_)) | Err(NpyError::NotNpy)
        ));
    }
}
