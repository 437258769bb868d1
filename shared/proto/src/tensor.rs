//! Tensors as they cross the wire: a V2 datatype, a concrete shape and raw little-endian bytes.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The Open Inference Protocol (KServe V2) datatypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[non_exhaustive]
pub enum DataType {
    /// Boolean, one byte per element (0 or 1).
    Bool,
    /// Unsigned 8-bit integer.
    Uint8,
    /// Unsigned 16-bit integer.
    Uint16,
    /// Unsigned 32-bit integer.
    Uint32,
    /// Unsigned 64-bit integer.
    Uint64,
    /// Signed 8-bit integer.
    Int8,
    /// Signed 16-bit integer.
    Int16,
    /// Signed 32-bit integer.
    Int32,
    /// Signed 64-bit integer.
    Int64,
    /// IEEE half precision float.
    Fp16,
    /// bfloat16.
    Bf16,
    /// IEEE single precision float.
    Fp32,
    /// IEEE double precision float.
    Fp64,
    /// Variable-length byte strings; each element is a `u32` LE length followed by the bytes.
    Bytes,
}

impl DataType {
    /// Every datatype, in V2 order.
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The V2 name: `"FP32"`, `"INT64"`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Size of one element in bytes; `None` for [`DataType::Bytes`].
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DataType {
    type Err = TensorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DataType::ALL
            .into_iter()
            .find(|d| d.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| TensorError::UnknownDatatype(s.to_string()))
    }
}

/// Why a tensor is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// The datatype name is not one of the V2 set.
    #[error("unknown datatype `{0}` (expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, BF16, FP32, FP64, BYTES)")]
    UnknownDatatype(String),
    /// The element count of the shape overflows.
    #[error("tensor `{name}`: shape {shape:?} has too many elements")]
    ShapeOverflow {
        /// Tensor name.
        name: String,
        /// Offending shape.
        shape: Vec<u64>,
    },
    /// The byte length does not match shape × element size.
    #[error("tensor `{name}`: {datatype} shape {shape:?} needs {expected} bytes, got {actual}")]
    ByteSizeMismatch {
        /// Tensor name.
        name: String,
        /// Datatype.
        datatype: DataType,
        /// Shape.
        shape: Vec<u64>,
        /// Bytes the shape needs.
        expected: u64,
        /// Bytes given.
        actual: u64,
    },
    /// A BYTES tensor whose elements do not parse as `u32` length + bytes.
    #[error("tensor `{name}`: malformed BYTES data: {reason}")]
    MalformedBytes {
        /// Tensor name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A BOOL element other than 0 or 1.
    #[error("tensor `{name}`: BOOL elements must be 0 or 1")]
    InvalidBool {
        /// Tensor name.
        name: String,
    },
}

/// Describes one tensor in a frame ([`Tensor::descriptor`]); its bytes follow in the frame
/// payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDesc {
    /// Tensor name as the model declares it.
    pub name: String,
    /// V2 datatype.
    pub datatype: DataType,
    /// Concrete shape.
    pub shape: Vec<u64>,
    /// Bytes of this tensor in the payload.
    pub byte_len: u64,
}

/// A named tensor: V2 datatype, concrete shape and raw little-endian row-major bytes.
///
/// Construct with [`Tensor::new`] (checked) or the typed helpers such as [`Tensor::from_f32`].
/// The bytes are shared ([`Bytes`]): a clone, a tensor split out of a received frame and a
/// tensor handed to the transport all point at the same memory, never a copy of it.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    name: String,
    datatype: DataType,
    shape: Vec<u64>,
    data: Bytes,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("name", &self.name)
            .field("datatype", &self.datatype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// Number of elements of `shape`, or `None` on overflow.
pub fn element_count(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

impl Tensor {
    /// A checked tensor: the byte length must match the shape, BYTES elements must be framed.
    pub fn new(
        name: impl Into<String>,
        datatype: DataType,
        shape: Vec<u64>,
        data: Vec<u8>,
    ) -> Result<Self, TensorError> {
        Tensor::from_bytes(name, datatype, shape, Bytes::from(data))
    }

    /// A checked tensor over shared bytes (a slice of a received frame, say), not copied.
    pub fn from_bytes(
        name: impl Into<String>,
        datatype: DataType,
        shape: Vec<u64>,
        data: Bytes,
    ) -> Result<Self, TensorError> {
        let name = name.into();
        validate(&name, datatype, &shape, &data)?;
        Ok(Tensor {
            name,
            datatype,
            shape,
            data,
        })
    }

    /// An FP32 tensor from values.
    pub fn from_f32(
        name: impl Into<String>,
        shape: Vec<u64>,
        values: &[f32],
    ) -> Result<Self, TensorError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(name, DataType::Fp32, shape, data)
    }

    /// An INT64 tensor from values.
    pub fn from_i64(
        name: impl Into<String>,
        shape: Vec<u64>,
        values: &[i64],
    ) -> Result<Self, TensorError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(name, DataType::Int64, shape, data)
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Rename the tensor.
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
    }
    /// The V2 datatype.
    pub fn datatype(&self) -> DataType {
        self.datatype
    }
    /// The concrete shape.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }
    /// Raw little-endian bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    /// The raw bytes, shared: cloning them copies nothing.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }
    /// Take the raw bytes (copied only if another tensor still shares them).
    pub fn into_data(self) -> Vec<u8> {
        Vec::from(self.data)
    }
    /// Number of elements.
    pub fn len(&self) -> u64 {
        element_count(&self.shape).unwrap_or(0)
    }
    /// True when the tensor has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements as `f64`, for any numeric datatype (None for BYTES).
    pub fn to_f64_vec(&self) -> Option<Vec<f64>> {
        let d = &self.data;
        macro_rules! conv {
            ($t:ty, $n:expr) => {
                d.chunks_exact($n)
                    .map(|c| {
                        let mut b = [0u8; $n];
                        b.copy_from_slice(c);
                        <$t>::from_le_bytes(b) as f64
                    })
                    .collect()
            };
        }
        Some(match self.datatype {
            DataType::Bool | DataType::Uint8 => d.iter().map(|&b| b as f64).collect(),
            DataType::Int8 => d.iter().map(|&b| b as i8 as f64).collect(),
            DataType::Uint16 => conv!(u16, 2),
            DataType::Int16 => conv!(i16, 2),
            DataType::Uint32 => conv!(u32, 4),
            DataType::Int32 => conv!(i32, 4),
            DataType::Uint64 => conv!(u64, 8),
            DataType::Int64 => conv!(i64, 8),
            DataType::Fp32 => conv!(f32, 4),
            DataType::Fp64 => conv!(f64, 8),
            DataType::Fp16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            DataType::Bf16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            DataType::Bytes => return None,
        })
    }

    /// Elements as `f32` when the datatype is FP32.
    pub fn as_f32_vec(&self) -> Option<Vec<f32>> {
        (self.datatype == DataType::Fp32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    /// Elements of a BYTES tensor.
    pub fn bytes_elements(&self) -> Option<Vec<&[u8]>> {
        if self.datatype != DataType::Bytes {
            return None;
        }
        let mut out = Vec::new();
        let mut rest = &self.data[..];
        while rest.len() >= 4 {
            let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            out.push(&rest[4..4 + n]);
            rest = &rest[4 + n..];
        }
        Some(out)
    }

    /// A descriptor of this tensor (no data) for a frame header.
    pub fn descriptor(&self) -> TensorDesc {
        TensorDesc {
            name: self.name.clone(),
            datatype: self.datatype,
            shape: self.shape.clone(),
            byte_len: self.data.len() as u64,
        }
    }
}

fn validate(name: &str, datatype: DataType, shape: &[u64], data: &[u8]) -> Result<(), TensorError> {
    let count = element_count(shape).ok_or_else(|| TensorError::ShapeOverflow {
        name: name.to_string(),
        shape: shape.to_vec(),
    })?;
    match datatype.element_size() {
        Some(size) => {
            let expected =
                count
                    .checked_mul(size as u64)
                    .ok_or_else(|| TensorError::ShapeOverflow {
                        name: name.to_string(),
                        shape: shape.to_vec(),
                    })?;
            if expected != data.len() as u64 {
                return Err(TensorError::ByteSizeMismatch {
                    name: name.to_string(),
                    datatype,
                    shape: shape.to_vec(),
                    expected,
                    actual: data.len() as u64,
                });
            }
            if datatype == DataType::Bool && data.iter().any(|&b| b > 1) {
                return Err(TensorError::InvalidBool {
                    name: name.to_string(),
                });
            }
        }
        None => {
            let mut rest = data;
            let mut seen = 0u64;
            while !rest.is_empty() {
                if rest.len() < 4 {
                    return Err(TensorError::MalformedBytes {
                        name: name.to_string(),
                        reason: "truncated element length".into(),
                    });
                }
                let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                if rest.len() - 4 < n {
                    return Err(TensorError::MalformedBytes {
                        name: name.to_string(),
                        reason: format!(
                            "element {seen} declares {n} bytes, {} left",
                            rest.len() - 4
                        ),
                    });
                }
                rest = &rest[4 + n..];
                seen += 1;
            }
            if seen != count {
                return Err(TensorError::MalformedBytes {
                    name: name.to_string(),
                    reason: format!("shape {shape:?} needs {count} elements, data holds {seen}"),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(d.as_str().parse::<DataType>().unwrap(), d);
        }
        assert!("FLOAT".parse::<DataType>().is_err());
    }

    #[test]
    fn byte_size_is_checked() {
        let e = Tensor::new("x", DataType::Fp32, vec![2, 3], vec![0; 23]).unwrap_err();
        assert!(matches!(
            e,
            TensorError::ByteSizeMismatch {
                expected: 24,
                actual: 23,
                ..
            }
        ));
        assert!(Tensor::new("x", DataType::Fp32, vec![2, 3], vec![0; 24]).is_ok());
        // rank 0 holds exactly one element
        assert!(Tensor::new("sr", DataType::Int64, vec![], vec![0; 8]).is_ok());
        assert!(Tensor::new("x", DataType::Fp32, vec![u64::MAX, 2], vec![]).is_err());
    }

    #[test]
    fn bytes_elements_are_framed() {
        let mut data = Vec::new();
        for s in ["ab", "", "xyz"] {
            data.extend((s.len() as u32).to_le_bytes());
            data.extend(s.as_bytes());
        }
        let t = Tensor::new("s", DataType::Bytes, vec![3], data.clone()).unwrap();
        assert_eq!(t.bytes_elements().unwrap(), vec![&b"ab"[..], b"", b"xyz"]);
        assert!(Tensor::new("s", DataType::Bytes, vec![2], data.clone()).is_err());
        data.pop();
        assert!(Tensor::new("s", DataType::Bytes, vec![3], data).is_err());
    }

    #[test]
    fn bool_must_be_zero_or_one() {
        assert!(Tensor::new("b", DataType::Bool, vec![2], vec![0, 2]).is_err());
    }
}
