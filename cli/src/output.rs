//! Tables and JSON for data the CLI prints.

use serde::Serialize;
use skein_proto::{DataType, Tensor};

/// Print `v` as pretty JSON.
pub(crate) fn json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Print rows under headers, columns padded.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(headers.to_vec()));
    for r in rows {
        println!("{}", line(r.iter().map(String::as_str).collect()));
    }
}

/// Tensor elements for JSON: floats printed shortest-round-trip in their own precision.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(crate) enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    U64(Vec<u64>),
    Bool(Vec<bool>),
    Str(Vec<String>),
}

/// A tensor as the `--output json` contract prints it.
#[derive(Debug, Serialize)]
pub(crate) struct JsonTensor {
    pub(crate) datatype: DataType,
    pub(crate) shape: Vec<u64>,
    pub(crate) data: Data,
}

pub(crate) fn tensor_json(t: &Tensor) -> JsonTensor {
    let d = t.data();
    let data = match t.datatype() {
        DataType::Fp32 => Data::F32(t.as_f32_vec().unwrap_or_default()),
        DataType::Fp16 | DataType::Bf16 => Data::F32(
            t.to_f64_vec()
                .unwrap_or_default()
                .into_iter()
                .map(|v| v as f32)
                .collect(),
        ),
        DataType::Fp64 => Data::F64(t.to_f64_vec().unwrap_or_default()),
        DataType::Bool => Data::Bool(d.iter().map(|&b| b != 0).collect()),
        DataType::Uint64 => Data::U64(
            d.chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        DataType::Int64 => Data::I64(
            d.chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        DataType::Bytes => Data::Str(
            t.bytes_elements()
                .unwrap_or_default()
                .into_iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect(),
        ),
        _ => Data::I64(
            t.to_f64_vec()
                .unwrap_or_default()
                .into_iter()
                .map(|v| v as i64)
                .collect(),
        ),
    };
    JsonTensor {
        datatype: t.datatype(),
        shape: t.shape().to_vec(),
        data,
    }
}
