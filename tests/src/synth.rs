//! Synthetic ONNX models of a chosen size, for tests that move artifacts (peer-to-peer fetch,
//! an edge site's thin uplink): `y = x · W`, one `MatMul` whose weight `W` (`k × m` FP32, from
//! a seeded RNG) makes up almost all of the file. The expected output of any input is computed
//! here, so a test can check that the artifact a node loaded is the one deployed and that it
//! runs.

use rand::{Rng, SeedableRng};
use skein_onnx::proto::Pb;
use tract_onnx::pb;

/// A synthetic model: its ONNX bytes and the weight they hold.
#[derive(Clone)]
pub struct SynthModel {
    /// The ONNX file.
    pub bytes: Vec<u8>,
    /// Rows of `W` (the input's length).
    pub k: usize,
    /// Columns of `W` (the output's length).
    pub m: usize,
    weight: Vec<f32>,
}

impl std::fmt::Debug for SynthModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SynthModel")
            .field("bytes", &self.bytes.len())
            .field("k", &self.k)
            .field("m", &self.m)
            .finish()
    }
}

fn value_info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(Value::DimValue(*d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl SynthModel {
    /// A model whose weight is `k × m` FP32 values drawn from `seed` (`4·k·m` bytes and a few
    /// hundred more): input `x` `[1, k]`, output `y` `[1, m]`.
    pub fn matmul(k: usize, m: usize, seed: u64) -> SynthModel {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let weight: Vec<f32> = (0..k * m).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let raw: Vec<u8> = weight.iter().flat_map(|v| v.to_le_bytes()).collect();
        let graph = pb::GraphProto {
            name: "synthetic_matmul".into(),
            node: vec![pb::NodeProto {
                name: "matmul".into(),
                op_type: "MatMul".into(),
                input: vec!["x".into(), "W".into()],
                output: vec!["y".into()],
                ..Default::default()
            }],
            initializer: vec![pb::TensorProto {
                name: "W".into(),
                dims: vec![k as i64, m as i64],
                data_type: pb::tensor_proto::DataType::Float as i32,
                raw_data: raw,
                ..Default::default()
            }],
            input: vec![value_info("x", &[1, k as i64])],
            output: vec![value_info("y", &[1, m as i64])],
            ..Default::default()
        };
        let model = Pb {
            ir_version: 8,
            producer_name: "skein-tests synth".into(),
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(graph),
            ..Default::default()
        };
        SynthModel {
            bytes: prost::Message::encode_to_vec(&model),
            k,
            m,
            weight,
        }
    }

    /// A model of at least `bytes` bytes: `k` 256, `m` as needed.
    pub fn of_size(bytes: usize, seed: u64) -> SynthModel {
        let k = 256;
        let m = bytes.div_ceil(4 * k).max(1);
        SynthModel::matmul(k, m, seed)
    }

    /// An input drawn from `seed`: `x`, `[1, k]`.
    pub fn input(&self, seed: u64) -> skein_proto::Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let x: Vec<f32> = (0..self.k).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        skein_proto::Tensor::from_f32("x", vec![1, self.k as u64], &x)
            .expect("a [1, k] FP32 tensor")
    }

    /// `x · W`, computed here in f64.
    pub fn expected(&self, x: &skein_proto::Tensor) -> Vec<f32> {
        let x = x.as_f32_vec().expect("an FP32 input");
        (0..self.m)
            .map(|j| {
                (0..self.k)
                    .map(|i| x[i] as f64 * self.weight[i * self.m + j] as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    }

    /// Whether `outputs` is `x · W` (within 1e-4 of the largest magnitude, FP32 sums of `k`
    /// terms); the first difference otherwise.
    pub fn check(
        &self,
        x: &skein_proto::Tensor,
        outputs: &[skein_proto::Tensor],
    ) -> Result<(), String> {
        let y = outputs
            .iter()
            .find(|t| t.name() == "y")
            .ok_or_else(|| format!("no output `y` in {outputs:?}"))?;
        if y.shape() != [1, self.m as u64] {
            return Err(format!("y has shape {:?}, not [1, {}]", y.shape(), self.m));
        }
        let got = y.as_f32_vec().ok_or("y is not FP32")?;
        let want = self.expected(x);
        let scale = want.iter().fold(1.0f32, |a, v| a.max(v.abs()));
        match got
            .iter()
            .zip(&want)
            .enumerate()
            .find(|(_, (g, w))| (*g - *w).abs() > 1e-4 * scale)
        {
            Some((j, (g, w))) => Err(format!("y[{j}] = {g}, expected {w}")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_as_large_as_asked_and_declares_its_shapes() {
        let m = SynthModel::of_size(1 << 20, 7);
        assert!(m.bytes.len() >= 1 << 20, "{}", m.bytes.len());
        assert!(m.bytes.len() < (1 << 20) + 8192, "{}", m.bytes.len());
        let meta = skein_onnx::inspect(&m.bytes).expect("a valid model");
        assert_eq!(meta.inputs.len(), 1);
        assert_eq!(meta.inputs[0].name, "x");
        assert_eq!(meta.inputs[0].shape, vec![1, 256]);
        assert_eq!(meta.outputs[0].shape, vec![1, m.m as i64]);
        // Another seed, other weights.
        assert_ne!(SynthModel::of_size(1 << 20, 8).bytes, m.bytes);
    }

    #[test]
    fn check_catches_a_wrong_output() {
        let m = SynthModel::matmul(4, 3, 1);
        let x = m.input(2);
        let y = skein_proto::Tensor::from_f32("y", vec![1, 3], &m.expected(&x)).unwrap();
        assert_eq!(m.check(&x, std::slice::from_ref(&y)), Ok(()));
        let mut bad = m.expected(&x);
        bad[2] += 0.5;
        let y = skein_proto::Tensor::from_f32("y", vec![1, 3], &bad).unwrap();
        assert!(m.check(&x, &[y]).unwrap_err().starts_with("y[2]"));
    }
}
