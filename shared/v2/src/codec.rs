//! The V2 inference body, both ways: JSON tensors (flat or nested `data`) and the binary tensor
//! data extension (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data`,
//! `binary_data_output`).
//!
//! Decoding never trusts a size from the request: element counts are checked against the data
//! actually present before anything is allocated for them.

use crate::request_json::{RequestJson, Scalar, Scalars};
use crate::V2Error;
use serde::ser::{SerializeSeq, Serializer};
use serde::Serialize;
use skein_proto::tensor::element_count;
use skein_proto::{DataType, Tensor};

fn bad(msg: impl Into<String>) -> V2Error {
    V2Error::BadRequest(msg.into())
}

/// A decoded inference request.
#[derive(Debug, PartialEq)]
pub struct DecodedRequest {
    /// The request `id`, echoed in the response.
    pub id: Option<String>,
    /// Input tensors, in request order.
    pub inputs: Vec<Tensor>,
    /// Outputs asked for (empty: all).
    pub outputs: Vec<String>,
    /// Whether an output is returned as binary data.
    pub binary: OutputBinary,
}

/// Which outputs are returned in the binary section.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputBinary {
    default: bool,
    explicit: Vec<(String, bool)>,
}

impl OutputBinary {
    /// Whether output `name` goes in the binary section.
    pub fn is_binary(&self, name: &str) -> bool {
        self.explicit
            .iter()
            .find(|(n, _)| n == name)
            .map_or(self.default, |(_, b)| *b)
    }
}

/// Split a body into its JSON header and binary section using `Inference-Header-Content-Length`.
pub fn split_body<'a>(
    body: &'a [u8],
    header_len: Option<&str>,
) -> Result<(&'a [u8], &'a [u8]), V2Error> {
    let Some(h) = header_len else {
        return Ok((body, &[]));
    };
    let n: usize = h.trim().parse().map_err(|_| {
        bad(format!(
            "Inference-Header-Content-Length `{h}` is not a byte count"
        ))
    })?;
    if n > body.len() {
        return Err(bad(format!(
            "Inference-Header-Content-Length is {n} but the body has only {} bytes",
            body.len()
        )));
    }
    Ok(body.split_at(n))
}

/// Decode a V2 inference request: `json` is the JSON header, `binary` the binary section.
///
/// The JSON goes through a fast reader for the everyday request shape first, and through
/// serde_json whenever that reader declines (which also gives every error message); both give
/// the same result, which [`decode_request_reference`] lets tests and the fuzzer check.
pub fn decode_request(json: &[u8], binary: &[u8]) -> Result<DecodedRequest, V2Error> {
    match crate::fastjson::parse(json) {
        Some(req) => decode_json(req, binary),
        None => decode_request_reference(json, binary),
    }
}

/// [`decode_request`] with serde_json alone, the reference the fast reader must agree with.
#[doc(hidden)]
pub fn decode_request_reference(json: &[u8], binary: &[u8]) -> Result<DecodedRequest, V2Error> {
    let req: RequestJson = serde_json::from_slice(json).map_err(|e| {
        bad(format!(
            "the request is not a valid V2 inference request: {e}"
        ))
    })?;
    decode_json(req, binary)
}

fn decode_json(req: RequestJson, binary: &[u8]) -> Result<DecodedRequest, V2Error> {
    if req.inputs.is_empty() {
        return Err(bad("the request has no inputs"));
    }
    let mut inputs: Vec<Tensor> = Vec::with_capacity(req.inputs.len());
    let mut offset = 0usize;
    for input in req.inputs {
        if inputs.iter().any(|t| t.name() == input.name) {
            return Err(bad(format!("input `{}` is given twice", input.name)));
        }
        let datatype: DataType = input
            .datatype
            .parse()
            .map_err(|e: skein_proto::TensorError| bad(format!("input `{}`: {e}", input.name)))?;
        let count = element_count(&input.shape).ok_or_else(|| {
            bad(format!(
                "input `{}`: shape {:?} has too many elements",
                input.name, input.shape
            ))
        })?;
        let binary_size = input.parameters.as_ref().and_then(|p| p.binary_data_size);
        let data = match (binary_size, input.data) {
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "input `{}` has both `data` and `binary_data_size`",
                    input.name
                )))
            }
            (Some(size), None) => {
                let end = usize::try_from(size)
                    .ok()
                    .and_then(|s| offset.checked_add(s))
                    .filter(|&e| e <= binary.len())
                    .ok_or_else(|| {
                        bad(format!(
                            "input `{}`: binary_data_size {size} runs past the end of the binary data ({} bytes, {offset} already used)",
                            input.name,
                            binary.len()
                        ))
                    })?;
                let bytes = binary[offset..end].to_vec();
                offset = end;
                bytes
            }
            (None, Some(scalars)) => {
                if scalars.len() as u64 != count {
                    return Err(bad(format!(
                        "input `{}`: shape {:?} needs {count} elements, `data` has {}",
                        input.name,
                        input.shape,
                        scalars.len()
                    )));
                }
                match scalars {
                    Scalars::Numbers(v) => encode_numbers(&input.name, datatype, v)?,
                    mixed => encode_scalars(&input.name, datatype, &mixed.into_mixed())?,
                }
            }
            (None, None) => {
                return Err(bad(format!(
                    "input `{}` has neither `data` nor a `binary_data_size` parameter",
                    input.name
                )))
            }
        };
        let t =
            Tensor::new(input.name, datatype, input.shape, data).map_err(|e| bad(e.to_string()))?;
        inputs.push(t);
    }
    if offset != binary.len() {
        return Err(bad(format!(
            "the binary data is {} bytes but the inputs' binary_data_size add up to {offset}",
            binary.len()
        )));
    }
    let default = req
        .parameters
        .as_ref()
        .and_then(|p| p.binary_data_output)
        .unwrap_or(false);
    let mut outputs = Vec::new();
    let mut explicit = Vec::new();
    for o in req.outputs.unwrap_or_default() {
        if outputs.contains(&o.name) {
            return Err(bad(format!("output `{}` is asked for twice", o.name)));
        }
        if let Some(b) = o.parameters.as_ref().and_then(|p| p.binary_data) {
            explicit.push((o.name.clone(), b));
        }
        outputs.push(o.name);
    }
    Ok(DecodedRequest {
        id: req.id,
        inputs,
        outputs,
        binary: OutputBinary { default, explicit },
    })
}

/// Little-endian bytes of plain numbers as `dt`: FP32 and FP64 directly, integers checked for
/// being whole and in range; other datatypes through [`encode_scalars`].
fn encode_numbers(name: &str, dt: DataType, v: Vec<f64>) -> Result<Vec<u8>, V2Error> {
    macro_rules! ints {
        ($t:ty) => {{
            let mut out = Vec::with_capacity(v.len() * std::mem::size_of::<$t>());
            for x in &v {
                if x.fract() != 0.0 {
                    return Err(bad(format!(
                        "input `{name}`: {dt} elements must be integers, got {x}"
                    )));
                }
                // Exact: `x` is whole and at most 2^53 in magnitude.
                let i = i128::from(*x as i64);
                let t = <$t>::try_from(i)
                    .map_err(|_| bad(format!("input `{name}`: {x} is out of range for {dt}")))?;
                out.extend_from_slice(&t.to_le_bytes());
            }
            Ok(out)
        }};
    }
    match dt {
        DataType::Fp32 => {
            let mut out = Vec::with_capacity(v.len() * 4);
            for x in &v {
                let f = *x as f32;
                if f.is_infinite() {
                    return Err(bad(format!(
                        "input `{name}`: {x} is not representable as FP32"
                    )));
                }
                out.extend_from_slice(&f.to_le_bytes());
            }
            Ok(out)
        }
        DataType::Fp64 => Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        DataType::Int8 => ints!(i8),
        DataType::Int16 => ints!(i16),
        DataType::Int32 => ints!(i32),
        DataType::Int64 => ints!(i64),
        DataType::Uint8 => ints!(u8),
        DataType::Uint16 => ints!(u16),
        DataType::Uint32 => ints!(u32),
        DataType::Uint64 => ints!(u64),
        _ => encode_scalars(name, dt, &Scalars::Numbers(v).into_mixed()),
    }
}

fn scalar_f64(name: &str, s: &Scalar) -> Result<f64, V2Error> {
    Ok(match s {
        Scalar::Float(v) => *v,
        Scalar::Int(v) => *v as f64,
        Scalar::Uint(v) => *v as f64,
        Scalar::Str(v) => match v.to_ascii_lowercase().as_str() {
            "nan" => f64::NAN,
            "inf" | "infinity" => f64::INFINITY,
            "-inf" | "-infinity" => f64::NEG_INFINITY,
            _ => return Err(bad(format!("input `{name}`: `{v}` is not a number"))),
        },
        Scalar::Bool(_) => return Err(bad(format!("input `{name}`: a boolean is not a number"))),
    })
}

fn scalar_int<T: TryFrom<i64> + TryFrom<u64>>(
    name: &str,
    dt: DataType,
    s: &Scalar,
) -> Result<T, V2Error> {
    let out_of_range = || bad(format!("input `{name}`: {s:?} is out of range for {dt}"));
    match s {
        Scalar::Int(v) => T::try_from(*v).map_err(|_| out_of_range()),
        Scalar::Uint(v) => T::try_from(*v).map_err(|_| out_of_range()),
        Scalar::Float(v) if v.fract() == 0.0 && v.abs() < 9.0e15 => {
            T::try_from(*v as i64).map_err(|_| out_of_range())
        }
        _ => Err(bad(format!(
            "input `{name}`: {dt} elements must be integers, got {s:?}"
        ))),
    }
}

/// Little-endian bytes of `scalars` as `dt` (BYTES: `u32` length + bytes per element).
fn encode_scalars(name: &str, dt: DataType, scalars: &[Scalar]) -> Result<Vec<u8>, V2Error> {
    let mut out = Vec::with_capacity(scalars.len() * dt.element_size().unwrap_or(8));
    macro_rules! ints {
        ($t:ty) => {
            for s in scalars {
                out.extend_from_slice(&scalar_int::<$t>(name, dt, s)?.to_le_bytes());
            }
        };
    }
    match dt {
        DataType::Bool => {
            for s in scalars {
                let b = match s {
                    Scalar::Bool(b) => *b,
                    Scalar::Int(0) | Scalar::Uint(0) => false,
                    Scalar::Int(1) | Scalar::Uint(1) => true,
                    _ => {
                        return Err(bad(format!(
                            "input `{name}`: BOOL elements must be true or false, got {s:?}"
                        )))
                    }
                };
                out.push(u8::from(b));
            }
        }
        DataType::Uint8 => ints!(u8),
        DataType::Uint16 => ints!(u16),
        DataType::Uint32 => ints!(u32),
        DataType::Uint64 => ints!(u64),
        DataType::Int8 => ints!(i8),
        DataType::Int16 => ints!(i16),
        DataType::Int32 => ints!(i32),
        DataType::Int64 => ints!(i64),
        DataType::Fp16 | DataType::Bf16 => {
            for s in scalars {
                let v = scalar_f64(name, s)?;
                let (bytes, infinite) = if dt == DataType::Fp16 {
                    let h = half::f16::from_f64(v);
                    (h.to_le_bytes(), h.is_infinite())
                } else {
                    let h = half::bf16::from_f64(v);
                    (h.to_le_bytes(), h.is_infinite())
                };
                if v.is_finite() && infinite {
                    return Err(bad(format!(
                        "input `{name}`: {v} is not representable as {dt}"
                    )));
                }
                out.extend_from_slice(&bytes);
            }
        }
        DataType::Fp32 => {
            for s in scalars {
                let v = scalar_f64(name, s)?;
                let f = v as f32;
                if v.is_finite() && f.is_infinite() {
                    return Err(bad(format!(
                        "input `{name}`: {v} is not representable as FP32"
                    )));
                }
                out.extend_from_slice(&f.to_le_bytes());
            }
        }
        DataType::Fp64 => {
            for s in scalars {
                out.extend_from_slice(&scalar_f64(name, s)?.to_le_bytes());
            }
        }
        DataType::Bytes => {
            for s in scalars {
                let Scalar::Str(v) = s else {
                    return Err(bad(format!(
                        "input `{name}`: BYTES elements must be strings, got {s:?}"
                    )));
                };
                let len = u32::try_from(v.len())
                    .map_err(|_| bad(format!("input `{name}`: a BYTES element is too long")))?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(v.as_bytes());
            }
        }
        other => {
            return Err(bad(format!(
                "input `{name}`: datatype {other} is not supported"
            )))
        }
    }
    Ok(out)
}

/// A tensor's elements as a flat JSON array, decoded from its little-endian bytes on the fly.
struct DataJson<'a>(&'a Tensor);

impl Serialize for DataJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = self.0.data();
        macro_rules! le {
            ($t:ty, $n:expr) => {
                s.collect_seq(d.chunks_exact($n).map(|c| {
                    let mut b = [0u8; $n];
                    b.copy_from_slice(c);
                    <$t>::from_le_bytes(b)
                }))
            };
        }
        match self.0.datatype() {
            DataType::Bool => s.collect_seq(d.iter().map(|&b| b != 0)),
            DataType::Uint8 => s.collect_seq(d.iter()),
            DataType::Int8 => s.collect_seq(d.iter().map(|&b| b as i8)),
            DataType::Uint16 => le!(u16, 2),
            DataType::Int16 => le!(i16, 2),
            DataType::Uint32 => le!(u32, 4),
            DataType::Int32 => le!(i32, 4),
            DataType::Uint64 => le!(u64, 8),
            DataType::Int64 => le!(i64, 8),
            DataType::Fp32 => le!(f32, 4),
            DataType::Fp64 => le!(f64, 8),
            DataType::Fp16 => s.collect_seq(
                d.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            DataType::Bf16 => s.collect_seq(
                d.chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            DataType::Bytes => {
                let elems = self.0.bytes_elements().unwrap_or_default();
                let mut seq = s.serialize_seq(Some(elems.len()))?;
                for e in elems {
                    seq.serialize_element(&String::from_utf8_lossy(e))?;
                }
                seq.end()
            }
            _ => s.collect_seq(std::iter::empty::<u8>()),
        }
    }
}

#[derive(Serialize)]
struct OutputParams {
    binary_data_size: usize,
}

#[derive(Serialize)]
struct OutputOut<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [u64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<OutputParams>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<DataJson<'a>>,
}

#[derive(Serialize)]
struct ResponseOut<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<&'a ServedBy>,
    outputs: Vec<OutputOut<'a>>,
}

/// Where an inference ran, told in the V2 response's `parameters` (and in the `skein-node` and
/// `skein-path` headers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServedBy {
    /// The node that ran the model.
    pub skein_node: String,
    /// `local`: run by the node whose HTTP ingress took the request, handed straight to its
    /// executor; `mesh`: sent over the mesh to the node the SDK's routing chose.
    pub skein_path: &'static str,
    /// The model's run time on that node, µs.
    pub skein_compute_us: u64,
    /// Time waiting for a worker on that node, µs.
    pub skein_queue_us: u64,
}

/// An encoded response body: the JSON header, then the binary section (possibly empty).
#[derive(Debug)]
pub struct EncodedResponse {
    /// JSON header followed by binary output data.
    pub body: Vec<u8>,
    /// Length of the JSON header when the body has a binary section.
    pub header_len: Option<usize>,
}

/// Encode outputs as a V2 response, returning the binary ones after the JSON header.
pub fn encode_response(
    model: &str,
    version: &str,
    id: Option<&str>,
    outputs: &[Tensor],
    binary: &OutputBinary,
) -> Result<EncodedResponse, V2Error> {
    encode_response_served(model, version, id, outputs, binary, None)
}

/// [`encode_response`], telling in `parameters` where the inference ran.
pub fn encode_response_served(
    model: &str,
    version: &str,
    id: Option<&str>,
    outputs: &[Tensor],
    binary: &OutputBinary,
    served: Option<&ServedBy>,
) -> Result<EncodedResponse, V2Error> {
    let mut tail_len = 0usize;
    let outs: Vec<OutputOut<'_>> = outputs
        .iter()
        .map(|t| {
            let is_bin = binary.is_binary(t.name());
            if is_bin {
                tail_len += t.data().len();
            }
            OutputOut {
                name: t.name(),
                datatype: t.datatype().as_str(),
                shape: t.shape(),
                parameters: is_bin.then(|| OutputParams {
                    binary_data_size: t.data().len(),
                }),
                data: (!is_bin).then_some(DataJson(t)),
            }
        })
        .collect();
    let resp = ResponseOut {
        model_name: model,
        model_version: version,
        id,
        parameters: served,
        outputs: outs,
    };
    let mut body = Vec::with_capacity(256 + tail_len);
    serde_json::to_writer(&mut body, &resp)
        .map_err(|e| V2Error::Internal(format!("encoding the response: {e}")))?;
    if tail_len == 0 {
        return Ok(EncodedResponse {
            body,
            header_len: None,
        });
    }
    let header_len = body.len();
    for t in outputs.iter().filter(|t| binary.is_binary(t.name())) {
        body.extend_from_slice(t.data());
    }
    Ok(EncodedResponse {
        body,
        header_len: Some(header_len),
    })
}

#[derive(Serialize)]
struct InputOut<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [u64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<OutputParams>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<DataJson<'a>>,
}

/// Encode `inputs` as a V2 request body, client side (`skein bench --http`): JSON `data`, or
/// the binary extension with every output asked for in binary. Returns the body and, for
/// binary, the `Inference-Header-Content-Length`.
pub fn encode_request(
    inputs: &[Tensor],
    binary: bool,
) -> Result<(Vec<u8>, Option<usize>), V2Error> {
    let ins: Vec<InputOut<'_>> = inputs
        .iter()
        .map(|t| InputOut {
            name: t.name(),
            datatype: t.datatype().as_str(),
            shape: t.shape(),
            parameters: binary.then(|| OutputParams {
                binary_data_size: t.data().len(),
            }),
            data: (!binary).then_some(DataJson(t)),
        })
        .collect();
    let req = if binary {
        serde_json::json!({"inputs": ins, "parameters": {"binary_data_output": true}})
    } else {
        serde_json::json!({ "inputs": ins })
    };
    let mut body = serde_json::to_vec(&req)
        .map_err(|e| V2Error::Internal(format!("encoding the request: {e}")))?;
    if !binary {
        return Ok((body, None));
    }
    let header_len = body.len();
    for t in inputs {
        body.extend_from_slice(t.data());
    }
    Ok((body, Some(header_len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn one(datatype: &str, shape: Value, data: Value) -> Result<Tensor, V2Error> {
        let body =
            json!({"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]});
        let mut r = decode_request(body.to_string().as_bytes(), &[])?;
        Ok(r.inputs.remove(0))
    }

    fn round_trip(t: &Tensor) -> Value {
        let r = encode_response(
            "m",
            "1",
            None,
            std::slice::from_ref(t),
            &OutputBinary::default(),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        v["outputs"][0]["data"].clone()
    }

    #[test]
    fn every_datatype_decodes_from_json_and_encodes_back() {
        let cases: Vec<(&str, Value, Vec<u8>)> = vec![
            ("BOOL", json!([true, false]), vec![1, 0]),
            ("UINT8", json!([0, 255]), vec![0, 255]),
            (
                "UINT16",
                json!([1, 65535]),
                [1u16, 65535].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "UINT32",
                json!([1, 4294967295u64]),
                [1u32, u32::MAX]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                "UINT64",
                json!([1, u64::MAX]),
                [1u64, u64::MAX]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            ("INT8", json!([-128, 127]), vec![0x80, 0x7f]),
            (
                "INT16",
                json!([-2, 3]),
                [-2i16, 3].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "INT32",
                json!([-2, 3]),
                [-2i32, 3].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "INT64",
                json!([i64::MIN, 3]),
                [i64::MIN, 3].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                "FP16",
                json!([1.5, -2.0]),
                [half::f16::from_f32(1.5), half::f16::from_f32(-2.0)]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                "BF16",
                json!([1.5, -2.0]),
                [half::bf16::from_f32(1.5), half::bf16::from_f32(-2.0)]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                "FP32",
                json!([1.25, -3.0]),
                [1.25f32, -3.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                "FP64",
                json!([1.25, -3.0]),
                [1.25f64, -3.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            (
                "BYTES",
                json!(["ab", ""]),
                vec![2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0],
            ),
        ];
        for (dt, data, bytes) in cases {
            let t = one(dt, json!([2]), data.clone()).unwrap_or_else(|e| panic!("{dt}: {e}"));
            assert_eq!(t.data(), &bytes[..], "{dt}");
            assert_eq!(t.datatype().as_str(), dt);
            let back = round_trip(&t);
            if dt == "UINT64" || dt == "INT64" || dt == "BOOL" || dt == "BYTES" {
                assert_eq!(back, data, "{dt}");
            } else {
                let a: Vec<f64> = serde_json::from_value(back).unwrap();
                let b: Vec<f64> = serde_json::from_value(data).unwrap();
                assert_eq!(a, b, "{dt}");
            }
        }
    }

    #[test]
    fn plain_numbers_stay_compact_and_agree_with_general_scalars() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let vals: Vec<f64> = (0..2_000)
            .map(|i| match i % 4 {
                0 => rng.gen_range(-1.0..1.0),
                1 => rng.gen_range(-1e30..1e30),
                2 => rng.gen_range(-1e-30..1e-30),
                _ => rng.gen_range(-1000i32..1000) as f64,
            })
            .collect();
        // Nested, with every kind of JSON whitespace, as one pass of the parser sees it.
        let raw = format!(
            "[[{}],\n\t[ {} ]]",
            vals[..1000]
                .iter()
                .map(|v| format!("{v:e}"))
                .collect::<Vec<_>>()
                .join(","),
            vals[1000..]
                .iter()
                .map(|v| format!("{v}"))
                .collect::<Vec<_>>()
                .join(" ,\r\n")
        );
        let scalars: Scalars = serde_json::from_str(&raw).unwrap();
        assert!(matches!(scalars, Scalars::Numbers(_)));
        assert_eq!(scalars.len(), 2_000);
        let Scalars::Numbers(numbers) = scalars else {
            unreachable!()
        };
        // serde_json's fast float parse (no `float_roundtrip`) may be one ulp off.
        assert_eq!(numbers.len(), vals.len());
        for (a, b) in numbers.iter().zip(&vals) {
            let ulps = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(ulps <= 1, "{a} vs {b}");
        }
        let mixed: Vec<Scalar> = Scalars::Numbers(numbers.clone()).into_mixed();
        for dt in [DataType::Fp32, DataType::Fp64] {
            assert_eq!(
                encode_numbers("x", dt, numbers.clone()).unwrap(),
                encode_scalars("x", dt, &mixed).unwrap(),
                "{dt}"
            );
        }
        let ints: Vec<f64> = vec![-128.0, 0.0, 127.0, -0.0, 5.0];
        let mixed = Scalars::Numbers(ints.clone()).into_mixed();
        for dt in [
            DataType::Int8,
            DataType::Int64,
            DataType::Fp16,
            DataType::Bool,
        ] {
            assert_eq!(
                encode_numbers("x", dt, ints.clone()).map_err(|e| e.to_string()),
                encode_scalars("x", dt, &mixed).map_err(|e| e.to_string()),
                "{dt}"
            );
        }
        // Large integers, strings and booleans switch to general scalars, in order.
        let s: Scalars = serde_json::from_str(&format!("[1.5, 2, {}, \"nan\"]", u64::MAX)).unwrap();
        assert_eq!(
            s,
            Scalars::Mixed(vec![
                Scalar::Float(1.5),
                Scalar::Int(2),
                Scalar::Uint(u64::MAX),
                Scalar::Str("nan".into())
            ])
        );
        assert!(encode_numbers("x", DataType::Fp32, vec![1e39]).is_err());
        assert!(encode_numbers("x", DataType::Uint8, vec![300.0]).is_err());
        assert!(encode_numbers("x", DataType::Int32, vec![1.5]).is_err());
        // Through the whole decoder: strings still work, counts are checked on both paths.
        let t = one("FP32", json!([3]), json!(["nan", "inf", 1.5])).unwrap();
        assert!(f32::from_le_bytes(t.data()[..4].try_into().unwrap()).is_nan());
        let e = one("FP32", json!([3]), json!([[1.0], [2.0]])).unwrap_err();
        assert!(
            e.to_string().contains("needs 3 elements, `data` has 2"),
            "{e}"
        );
        let t = one("UINT64", json!([2]), json!([1, u64::MAX])).unwrap();
        assert_eq!(&t.data()[8..], &u64::MAX.to_le_bytes());
    }

    #[test]
    fn nested_data_is_flattened_row_major_and_rank0_works() {
        let t = one("INT32", json!([2, 2]), json!([[1, 2], [3, 4]])).unwrap();
        assert_eq!(t.data(), &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0]);
        let t = one("INT64", json!([]), json!([16000])).unwrap();
        assert_eq!(t.shape(), &[] as &[u64]);
        let t = one("INT64", json!([]), json!(16000)).unwrap();
        assert_eq!(t.data(), &16000i64.to_le_bytes());
    }

    #[test]
    fn client_mistakes_are_bad_requests() {
        let mistakes = [
            ("FP32", json!([3]), json!([1.0, 2.0])), // too few elements
            ("FLOAT", json!([1]), json!([1.0])),     // unknown datatype
            ("INT8", json!([1]), json!([128])),      // out of range
            ("UINT8", json!([1]), json!([-1])),      // out of range
            ("INT32", json!([1]), json!([1.5])),     // not an integer
            ("BOOL", json!([1]), json!(["yes"])),    // not a boolean
            ("BYTES", json!([1]), json!([1])),       // not a string
            ("FP16", json!([1]), json!([1e10])),     // not representable
            ("FP32", json!([1]), json!([{"a": 1}])), // not a scalar
            ("FP32", json!([1]), json!(["one"])),    // not a number
        ];
        for (dt, shape, data) in mistakes {
            let e = one(dt, shape.clone(), data.clone()).unwrap_err();
            assert_eq!(e.status(), 400, "{dt} {shape} {data}: {e}");
        }
        for body in [
            "{",
            "{\"inputs\": []}",
            "{\"inputs\": [{\"name\": \"x\", \"datatype\": \"FP32\", \"shape\": [1]}]}",
            "{\"inputs\": [{\"name\": \"x\", \"datatype\": \"FP32\", \"shape\": [-1], \"data\": [1]}]}",
            "{\"inputs\": [{\"name\": \"x\", \"datatype\": \"FP32\", \"shape\": [1], \"data\": [1]}, {\"name\": \"x\", \"datatype\": \"FP32\", \"shape\": [1], \"data\": [1]}]}",
        ] {
            let e = decode_request(body.as_bytes(), &[]).unwrap_err();
            assert_eq!(e.status(), 400, "{body}: {e}");
        }
    }

    #[test]
    fn binary_inputs_and_outputs() {
        let json = json!({
            "id": "req-7",
            "parameters": {"binary_data_output": true, "sequence_id": 3, "priority": 1},
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
                {"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 7}},
                {"name": "b", "datatype": "INT64", "shape": [], "data": [5]}
            ],
            "outputs": [{"name": "o1", "parameters": {"binary_data": false}}, {"name": "o2"}]
        })
        .to_string();
        let mut bin: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        bin.extend(3u32.to_le_bytes());
        bin.extend(b"abc");
        let mut body = json.clone().into_bytes();
        body.extend(&bin);
        let hl = json.len().to_string();
        let (j, b) = split_body(&body, Some(&hl)).unwrap();
        let r = decode_request(j, b).unwrap();
        assert_eq!(r.id.as_deref(), Some("req-7"));
        assert_eq!(r.inputs[0].as_f32_vec().unwrap(), vec![1.0, 2.0]);
        assert_eq!(r.inputs[1].bytes_elements().unwrap(), vec![&b"abc"[..]]);
        assert_eq!(r.outputs, vec!["o1", "o2"]);
        assert!(!r.binary.is_binary("o1"));
        assert!(r.binary.is_binary("o2"));

        // sizes that disagree with the binary section
        assert!(decode_request(j, &b[..b.len() - 1]).is_err());
        let mut more = b.to_vec();
        more.push(0);
        assert!(decode_request(j, &more).is_err());
        assert!(split_body(&body, Some("99999")).is_err());
        assert!(split_body(&body, Some("x")).is_err());

        let o1 = Tensor::from_f32("o1", vec![1], &[0.5]).unwrap();
        let o2 = Tensor::from_i64("o2", vec![2], &[7, 8]).unwrap();
        let resp = encode_response("m", "1", r.id.as_deref(), &[o1, o2], &r.binary).unwrap();
        let hl = resp.header_len.unwrap();
        let v: Value = serde_json::from_slice(&resp.body[..hl]).unwrap();
        assert_eq!(v["id"], "req-7");
        assert_eq!(v["outputs"][0]["data"], json!([0.5]));
        assert_eq!(v["outputs"][1]["parameters"]["binary_data_size"], 16);
        assert!(v["outputs"][1].get("data").is_none());
        assert_eq!(resp.body.len() - hl, 16);
    }

    /// The fast reader and serde_json agree on `json`: the same request, bit for bit, or the
    /// same error.
    fn agree(json: &str) {
        let fast = decode_request(json.as_bytes(), &[]);
        let reference = decode_request_reference(json.as_bytes(), &[]);
        match (&fast, &reference) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{json}"),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{json}"),
            _ => panic!("fast {fast:?} vs reference {reference:?} for {json}"),
        }
    }

    fn fast_takes(json: &str) -> bool {
        crate::fastjson::parse(json.as_bytes()).is_some()
    }

    #[test]
    fn the_fast_reader_takes_everyday_requests_and_agrees_with_serde() {
        let everyday = [
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[0.5,-0.25,1,-0]}]}"#,
            r#" { "id" : "aé" , "inputs" : [ { "name" : "x" , "shape" : [ 2 , 2 ] , "datatype" : "FP64" , "data" : [ [ 1.5 , 2e3 ] , [ -3.25E-2 , 0.1 ] ] } ] } "#,
            "{\n\t\"inputs\": [{\"name\": \"é\", \"datatype\": \"INT64\", \"shape\": [3], \"data\": [9007199254740992, -9007199254740992, 0]}]\r\n}",
            r#"{"id":null,"parameters":{"binary_data_output":true,"priority":[1,{"a":null}]},"inputs":[{"name":"x","datatype":"FP32","shape":[1],"parameters":{"binary_data_size":null,"custom":"v"},"data":[1.0000000596046448]}],"outputs":[{"name":"y","parameters":{"binary_data":false}}],"extra":{"nested":[true,false,null,"s",-1.5e-7]}}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[0],"data":[]}],"outputs":null}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":7}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[3],"data":[0.30000000000000004,1e-400,123456789012345678.5]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[[[]],[1],[[2]]]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":null,"parameters":null}]}"#,
        ];
        for json in everyday {
            assert!(fast_takes(json), "the fast reader declined {json}");
            agree(json);
        }
    }

    #[test]
    fn the_fast_reader_leaves_the_rest_to_serde() {
        let declined = [
            // an escape, a control character, a non-UTF-8 byte in a string
            r#"{"inputs":[{"name":"\u0078","datatype":"FP32","shape":[1],"data":[1]}]}"#,
            "{\"inputs\":[{\"name\":\"x\u{1}\",\"datatype\":\"FP32\",\"shape\":[1],\"data\":[1]}]}",
            // integers serde keeps as integers, strings and booleans in `data`
            r#"{"inputs":[{"name":"x","datatype":"INT64","shape":[1],"data":[9007199254740993]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"UINT64","shape":[1],"data":[18446744073709551615]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[2],"data":[1,"nan"]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"BOOL","shape":[1],"data":[true]}]}"#,
            // duplicate fields, wrong types, missing fields, a struct as an array
            r#"{"inputs":[{"name":"x","name":"y","datatype":"FP32","shape":[1],"data":[1]}]}"#,
            r#"{"inputs":[],"inputs":[]}"#,
            r#"{"id":5,"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[-1],"data":[1]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1.0],"data":[1]}]}"#,
            r#"{"inputs":[{"datatype":"FP32","shape":[1],"data":[1]}]}"#,
            r#"{"inputs":[["x",[1],"FP32",null,[1]]]}"#,
            r#"{"parameters":{"binary_data_size":1,"binary_data_size":2},"inputs":[]}"#,
            // not JSON
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[01]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1.]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[.5]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[+1]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1e]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1e999]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1,]}]}"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}]} x"#,
            r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}"#,
            r#"{"inputs":[],"x":tru}"#,
            "[]",
            "",
        ];
        for json in declined {
            assert!(!fast_takes(json), "the fast reader took {json}");
            agree(json);
        }
        let deep = format!(
            r#"{{"inputs":[{{"name":"x","datatype":"FP32","shape":[1],"data":{}1{}}}]}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert!(!fast_takes(&deep));
        agree(&deep);
    }

    /// Seeded random requests, valid and mangled: numbers in every form JSON allows, random
    /// whitespace, then bytes cut, doubled or replaced. The fast reader and serde agree on all.
    #[test]
    fn the_fast_reader_agrees_with_serde_on_random_requests() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5e1f);
        let mut taken = 0;
        for round in 0..3000 {
            let ws = |rng: &mut rand::rngs::StdRng| -> &'static str {
                [" ", "", "", "\n", "\t ", "\r\n"][rng.gen_range(0..6)]
            };
            let mut data = String::from("[");
            for k in 0..rng.gen_range(0..12) {
                if k > 0 {
                    data.push(',');
                }
                data.push_str(ws(&mut rng));
                let n = match rng.gen_range(0..9) {
                    0 => format!("{}", rng.gen::<f32>() * 1e3 - 500.0),
                    1 => format!("{}", rng.gen::<f64>() - 0.5),
                    2 => format!("{:e}", rng.gen::<f64>() * 1e30),
                    3 => format!("{}", rng.gen::<i64>() >> rng.gen_range(0..63)),
                    4 => format!("{}", rng.gen::<u64>()),
                    5 => format!("-0.{}", "0".repeat(rng.gen_range(0..30))),
                    6 => format!("{}.{}", rng.gen_range(0..1000), rng.gen::<u64>()),
                    7 => format!("{}E+{}", rng.gen_range(0..99), rng.gen_range(0..400)),
                    _ => format!("[{}]", rng.gen_range(-9..9)),
                };
                data.push_str(&n);
            }
            data.push(']');
            let json = format!(
                r#"{{{w}"id":{w}"r{round}",{w}"inputs":[{{"name":"x",{w}"datatype":"FP64","shape":[{w}1],"data":{w}{data}{w}}}],"parameters":{{"p":[{w}1.5e3,"q"]}}{w}}}"#,
                w = ws(&mut rng)
            );
            taken += usize::from(fast_takes(&json));
            agree(&json);
            let mut bytes = json.into_bytes();
            for _ in 0..rng.gen_range(1..4) {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.gen_range(0..bytes.len());
                match rng.gen_range(0..3) {
                    0 => {
                        bytes.remove(at);
                    }
                    1 => bytes.insert(at, bytes[at]),
                    _ => {
                        let junk = b"[]{},:\"0-.e9 ";
                        bytes[at] = junk[rng.gen_range(0..junk.len())];
                    }
                }
            }
            if let Ok(mangled) = String::from_utf8(bytes) {
                agree(&mangled);
            }
        }
        assert!(
            taken > 300,
            "the fast reader took only {taken} of 3000 requests"
        );
    }
}
