//! Safe conversion between skein tensors (V2 datatype + raw LE bytes) and tract tensors.

use crate::OnnxError;
use skein_proto::{DataType, Tensor};
use tract_onnx::prelude::{tract_ndarray, DatumType, IntoTensor, Tensor as TTensor};

/// tract's datum type for a V2 datatype, when tract has one.
pub fn datum_type(d: DataType) -> Option<DatumType> {
    Some(match d {
        DataType::Bool => DatumType::Bool,
        DataType::Uint8 => DatumType::U8,
        DataType::Uint16 => DatumType::U16,
        DataType::Uint32 => DatumType::U32,
        DataType::Uint64 => DatumType::U64,
        DataType::Int8 => DatumType::I8,
        DataType::Int16 => DatumType::I16,
        DataType::Int32 => DatumType::I32,
        DataType::Int64 => DatumType::I64,
        DataType::Fp16 => DatumType::F16,
        DataType::Fp32 => DatumType::F32,
        DataType::Fp64 => DatumType::F64,
        DataType::Bytes => DatumType::String,
        _ => return None,
    })
}

/// The V2 datatype of a tract datum type.
pub fn v2_datatype(d: DatumType) -> Option<DataType> {
    Some(match d {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::Uint8,
        DatumType::U16 => DataType::Uint16,
        DatumType::U32 => DataType::Uint32,
        DatumType::U64 => DataType::Uint64,
        DatumType::I8 => DataType::Int8,
        DatumType::I16 => DataType::Int16,
        DatumType::I32 => DataType::Int32,
        DatumType::I64 => DataType::Int64,
        DatumType::F16 => DataType::Fp16,
        DatumType::F32 => DataType::Fp32,
        DatumType::F64 => DataType::Fp64,
        DatumType::String => DataType::Bytes,
        _ => return None,
    })
}

/// A tract tensor holding `t`'s values.
pub fn to_tract(t: &Tensor) -> Result<TTensor, OnnxError> {
    let shape: Vec<usize> = t.shape().iter().map(|&d| d as usize).collect();
    let dt = datum_type(t.datatype()).ok_or_else(|| {
        OnnxError::InvalidInput(format!(
            "input `{}`: datatype {} is not supported by the tract backend",
            t.name(),
            t.datatype()
        ))
    })?;
    if dt == DatumType::String {
        let strings: Vec<String> = t
            .bytes_elements()
            .unwrap_or_default()
            .into_iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        return tract_ndarray::ArrayD::from_shape_vec(shape, strings)
            .map(|a| a.into_tensor())
            .map_err(|e| OnnxError::InvalidInput(format!("input `{}`: {e}", t.name())));
    }
    let mut out =
        TTensor::zero_dt(dt, &shape).map_err(|e| OnnxError::InvalidInput(crate::chain(&e)))?;
    let dst = out.as_bytes_mut();
    if dst.len() != t.data().len() {
        return Err(OnnxError::InvalidInput(format!(
            "input `{}`: {} bytes for {} {:?}",
            t.name(),
            t.data().len(),
            t.datatype(),
            t.shape()
        )));
    }
    dst.copy_from_slice(t.data());
    Ok(out)
}

/// A skein tensor named `name` holding `t`'s values.
pub fn from_tract(name: &str, t: &TTensor) -> Result<Tensor, OnnxError> {
    let datatype = v2_datatype(t.datum_type()).ok_or_else(|| {
        OnnxError::Execution(format!(
            "output `{name}` has type {:?}, which has no V2 datatype",
            t.datum_type()
        ))
    })?;
    let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
    let data = if datatype == DataType::Bytes {
        let view = t
            .to_plain_array_view::<String>()
            .map_err(|e| OnnxError::Execution(crate::chain(&e)))?;
        let mut out = Vec::new();
        for s in view.iter() {
            out.extend((s.len() as u32).to_le_bytes());
            out.extend(s.as_bytes());
        }
        out
    } else {
        t.as_bytes().to_vec()
    };
    Tensor::new(name, datatype, shape, data).map_err(|e| OnnxError::Execution(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_and_string_tensors_round_trip() {
        let x = Tensor::from_f32("x", vec![2, 2], &[1.0, -2.0, 3.5, 0.25]).unwrap();
        assert_eq!(from_tract("x", &to_tract(&x).unwrap()).unwrap(), x);
        let s = Tensor::from_i64("s", vec![], &[16000]).unwrap();
        assert_eq!(from_tract("s", &to_tract(&s).unwrap()).unwrap(), s);
        let b = Tensor::new("b", DataType::Bool, vec![3], vec![1, 0, 1]).unwrap();
        assert_eq!(from_tract("b", &to_tract(&b).unwrap()).unwrap(), b);
        let mut data = Vec::new();
        for w in ["hi", "ü"] {
            data.extend((w.len() as u32).to_le_bytes());
            data.extend(w.as_bytes());
        }
        let st = Tensor::new("w", DataType::Bytes, vec![2], data).unwrap();
        assert_eq!(from_tract("w", &to_tract(&st).unwrap()).unwrap(), st);
        let bf = Tensor::new("h", DataType::Bf16, vec![1], vec![0, 0]).unwrap();
        assert!(matches!(to_tract(&bf), Err(OnnxError::InvalidInput(_))));
    }
}
