//! Backend conformance: every reference case of `models/` through the tract backend, plus the
//! behaviour of the plan cache, input validation and hostile model bytes.

use skein_onnx::reference::{self, load_cases};
use skein_onnx::{inspect, LoadedModel, OnnxError, PlanCacheConfig};
use skein_proto::{DataType, Tensor};
use std::path::PathBuf;

/// Tolerance for an engine other than onnxruntime (models/README.md).
const ATOL: f64 = 1e-3;
const RTOL: f64 = 1e-2;

fn dir(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(model)
}

fn bytes(model: &str) -> Vec<u8> {
    std::fs::read(dir(model).join("model.onnx")).unwrap()
}

fn load(model: &str) -> LoadedModel {
    LoadedModel::load(&bytes(model), PlanCacheConfig::default()).unwrap()
}

fn check_all_cases(model: &str) -> usize {
    check_cases_on(&load(model), model)
}

fn check_cases_on(m: &LoadedModel, model: &str) -> usize {
    let cases = load_cases(&dir(model)).unwrap();
    for c in &cases {
        let out = m
            .run(c.inputs.clone())
            .unwrap_or_else(|e| panic!("{model}/{}: {e}", c.name));
        assert_eq!(out.outputs.len(), c.outputs.len());
        for (a, e) in out.outputs.iter().zip(&c.outputs) {
            reference::compare(a, e, ATOL, RTOL)
                .unwrap_or_else(|e| panic!("{model}/{}: {e}", c.name));
        }
    }
    cases.len()
}

#[test]
fn ppocr_cls_matches_reference() {
    assert_eq!(check_all_cases("ppocr_cls"), 2);
}

#[test]
fn ppocr_det_matches_reference() {
    assert_eq!(check_all_cases("ppocr_det"), 2);
}

#[test]
fn silero_vad_streams_with_state_fed_back() {
    let m = load("silero_vad");
    assert_eq!(m.metadata().specialised_inputs, vec!["sr".to_string()]);
    let cases = load_cases(&dir("silero_vad")).unwrap();
    let mut state: Option<Tensor> = None;
    for step in ["stream_step0", "stream_step1", "stream_step2"] {
        let c = cases.iter().find(|c| c.name == step).unwrap();
        let mut inputs = c.inputs.clone();
        if let Some(mut s) = state.take() {
            s.set_name("state");
            *inputs.iter_mut().find(|t| t.name() == "state").unwrap() = s;
        }
        let out = m.run(inputs).unwrap();
        for (a, e) in out.outputs.iter().zip(&c.outputs) {
            reference::compare(a, e, ATOL, RTOL).unwrap_or_else(|e| panic!("{step}: {e}"));
        }
        state = out.outputs.into_iter().find(|t| t.name() == "stateN");
    }
    let batch = cases.iter().find(|c| c.name == "batch2_step0").unwrap();
    let out = m.run(batch.inputs.clone()).unwrap();
    for (a, e) in out.outputs.iter().zip(&batch.outputs) {
        reference::compare(a, e, ATOL, RTOL).unwrap();
    }
}

#[test]
fn onnxruntime_contrib_ops_are_named() {
    let e = inspect(&bytes("ddddocr_int8")).unwrap_err();
    match &e {
        OnnxError::UnsupportedOperator { ops } => {
            assert!(
                ops.iter()
                    .any(|o| o == "com.microsoft::DynamicQuantizeLSTM"),
                "{ops:?}"
            )
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("DynamicQuantizeLSTM"));
    assert!(LoadedModel::load(&bytes("ddddocr_int8"), PlanCacheConfig::default()).is_err());
}

#[test]
fn metadata_matches_the_reference_cases() {
    for model in ["ppocr_cls", "ppocr_det", "silero_vad"] {
        let meta = inspect(&bytes(model)).unwrap();
        let case = &load_cases(&dir(model)).unwrap()[0];
        for (kind, specs) in [("inputs", &meta.inputs), ("outputs", &meta.outputs)] {
            let declared = case.json[kind].as_array().unwrap();
            assert_eq!(declared.len(), specs.len(), "{model} {kind}");
            for (d, s) in declared.iter().zip(specs.iter()) {
                assert_eq!(d["name"].as_str().unwrap(), s.name);
                assert_eq!(d["datatype"].as_str().unwrap(), s.datatype.as_str());
                let shape: Vec<i64> = d["model_shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect();
                assert_eq!(shape, s.shape, "{model} {}", s.name);
            }
        }
    }
}

#[test]
fn plan_cache_hits_misses_and_stays_bounded() {
    let m = LoadedModel::load(&bytes("ppocr_cls"), PlanCacheConfig { capacity: 2 }).unwrap();
    let x = |w: u64| {
        Tensor::from_f32("x", vec![1, 3, 48, w], &vec![0.0; (3 * 48 * w) as usize]).unwrap()
    };
    assert!(m.run(vec![x(192)]).unwrap().plan_built);
    let again = m.run(vec![x(192)]).unwrap();
    assert!(!again.plan_built && again.plan_us == 0);
    assert!(m.run(vec![x(96)]).unwrap().plan_built);
    assert!(m.run(vec![x(64)]).unwrap().plan_built);
    assert_eq!(m.cached_plans(), 2);
    // 192 was the least recently used: evicted, rebuilt.
    assert!(m.run(vec![x(192)]).unwrap().plan_built);
}

#[test]
fn bad_inputs_are_invalid_input() {
    let m = load("ppocr_cls");
    let f = |name: &str, shape: Vec<u64>| {
        let n: u64 = shape.iter().product();
        Tensor::from_f32(name, shape, &vec![0.0; n as usize]).unwrap()
    };
    let cases: Vec<Vec<Tensor>> = vec![
        vec![],
        vec![f("y", vec![1, 3, 48, 192])],
        vec![f("x", vec![1, 3, 48, 192]), f("x", vec![1, 3, 48, 192])],
        vec![f("x", vec![3, 48, 192])],
        vec![f("x", vec![1, 4, 48, 192])],
        vec![Tensor::new("x", DataType::Int32, vec![1, 3, 1, 1], vec![0; 12]).unwrap()],
        vec![f("x", vec![1, 3, 48, 192]), f("z", vec![1])],
    ];
    for inputs in cases {
        let shown = format!("{inputs:?}");
        match m.run(inputs) {
            Err(OnnxError::InvalidInput(msg)) => assert!(!msg.is_empty()),
            other => panic!("{shown}: {other:?}"),
        }
    }
    let e = m
        .run(vec![f("x", vec![1, 4, 48, 192])])
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected FP32 [-1, 3, -1, -1]"), "{e}");
}

#[test]
fn hostile_bytes_are_invalid_models() {
    let cls = bytes("ppocr_cls");
    let samples: Vec<Vec<u8>> = vec![
        vec![],
        b"not a model at all".to_vec(),
        cls[..cls.len() / 2].to_vec(),
        cls[..100].to_vec(),
        vec![0xff; 4096],
        // a protobuf length field claiming far more bytes than present
        vec![0x3a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01],
    ];
    for s in samples {
        match inspect(&s) {
            Err(OnnxError::InvalidModel(_)) => {}
            other => panic!("{} bytes: {other:?}", s.len()),
        }
    }
}

#[test]
fn external_data_is_refused_so_models_cannot_read_node_files() {
    use prost::Message;
    use tract_onnx_pb_access::decode;
    let mut proto = decode(&bytes("ppocr_cls"));
    let graph = proto.graph.as_mut().unwrap();
    // Weights live in initializers or in Constant nodes, depending on the exporter.
    let tensor = match graph.initializer.first_mut() {
        Some(t) => t,
        None => graph
            .node
            .iter_mut()
            .flat_map(|n| n.attribute.iter_mut())
            .find_map(|a| a.t.as_mut())
            .expect("a constant tensor"),
    };
    tensor.data_location = Some(1); // EXTERNAL
    tensor.external_data.push(Default::default());
    let hostile = proto.encode_to_vec();
    match inspect(&hostile) {
        Err(OnnxError::InvalidModel(m)) => assert!(m.contains("external"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(LoadedModel::load(&hostile, PlanCacheConfig::default()).is_err());
}

#[test]
fn hostile_graphs_are_refused_before_the_engine_sees_them() {
    use prost::Message;
    use tract_onnx_pb_access::decode;
    let refused = |proto: &skein_onnx::proto::Pb, what: &str| {
        let bytes = proto.encode_to_vec();
        match inspect(&bytes) {
            Err(OnnxError::InvalidModel(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("{what}: {other:?}"),
        }
        assert!(LoadedModel::load(&bytes, PlanCacheConfig::default()).is_err());
    };
    let base = decode(&bytes("ppocr_cls"));
    // A weight tensor whose dims claim far more than it carries (terabytes from a few bytes).
    let mut huge = base.clone();
    let g = huge.graph.as_mut().unwrap();
    let t = match g.initializer.first_mut() {
        Some(t) => t,
        None => g
            .node
            .iter_mut()
            .flat_map(|n| n.attribute.iter_mut())
            .find_map(|a| a.t.as_mut())
            .expect("a constant tensor"),
    };
    t.dims = vec![1 << 20, 1 << 20, 1 << 10];
    refused(&huge, "elements");
    // Dims whose product overflows, on an initializer (`ppocr_cls` has none, its weights are
    // Constant nodes, so the test adds one) and on a Constant node's tensor.
    let mut overflow = base.clone();
    let g = overflow.graph.as_mut().unwrap();
    assert!(
        g.initializer.is_empty(),
        "ppocr_cls keeps its weights in Constant nodes"
    );
    g.initializer.push(tract_onnx::pb::TensorProto {
        name: "overflowing".into(),
        data_type: tract_onnx::pb::tensor_proto::DataType::Float as i32,
        dims: vec![i64::MAX, i64::MAX],
        raw_data: vec![0; 4],
        ..Default::default()
    });
    refused(&overflow, "tensor `overflowing` declares dims");
    refused(&overflow, "more elements than can exist");
    let mut overflow = base.clone();
    let g = overflow.graph.as_mut().unwrap();
    let t = g
        .node
        .iter_mut()
        .flat_map(|n| n.attribute.iter_mut())
        .find_map(|a| a.t.as_mut())
        .expect("a constant tensor");
    t.dims = vec![i64::MAX, i64::MAX];
    refused(&overflow, "more elements than can exist");
    // A cycle: the first node consumes the last node's output.
    let mut cyclic = base.clone();
    let g = cyclic.graph.as_mut().unwrap();
    let last = g.node.last().unwrap().output[0].clone();
    g.node[0].input.push(last);
    refused(&cyclic, "cycle");
    // A value produced twice.
    let mut twice = base.clone();
    let g = twice.graph.as_mut().unwrap();
    let out = g.node[0].output[0].clone();
    g.node[1].output[0] = out;
    refused(&twice, "more than one node");
    // A huge declared graph input is only a declaration: nothing is allocated from it, and
    // real inputs are checked against it.
    let mut declared = base.clone();
    let g = declared.graph.as_mut().unwrap();
    let Some(tract_onnx::pb::type_proto::Value::TensorType(tt)) =
        g.input[0].r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        panic!("ppocr_cls's first input is a tensor");
    };
    for d in tt.shape.as_mut().unwrap().dim.iter_mut() {
        d.value = Some(tract_onnx::pb::tensor_shape_proto::dimension::Value::DimValue(1 << 40));
    }
    let bytes = declared.encode_to_vec();
    let m = LoadedModel::load(&bytes, PlanCacheConfig::default())
        .unwrap_or_else(|e| panic!("a huge declared input is only a declaration: {e}"));
    let x = Tensor::from_f32("x", vec![1, 3, 48, 192], &vec![0.0; 3 * 48 * 192]).unwrap();
    match m.run(vec![x]) {
        Err(OnnxError::InvalidInput(msg)) => assert!(msg.contains("1099511627776"), "{msg}"),
        other => panic!("an input that does not match the declared shape: {other:?}"),
    }
}

mod tract_onnx_pb_access {
    pub(crate) fn decode(bytes: &[u8]) -> skein_onnx::proto::Pb {
        skein_onnx::proto::decode(bytes).unwrap()
    }
}

/// The same suite on the burn engine (wgpu). CI sets `SKEIN_EXPECT_GPU=1`: there a missing
/// adapter fails the test instead of skipping it.
#[cfg(feature = "gpu")]
mod gpu {
    use super::*;
    use skein_onnx::{skein_gpu, Engine};

    fn engine() -> Option<Engine> {
        match skein_gpu::default_device("wgpu") {
            Ok(d) => Some(Engine::Gpu(d)),
            Err(e) if std::env::var_os("SKEIN_EXPECT_GPU").is_some() => {
                panic!("SKEIN_EXPECT_GPU is set but: {e}")
            }
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    fn load_gpu(model: &str) -> Option<LoadedModel> {
        let e = engine()?;
        Some(LoadedModel::load_on(&bytes(model), PlanCacheConfig::default(), &e).unwrap())
    }

    #[test]
    fn ppocr_cls_matches_reference_on_wgpu() {
        if let Some(m) = load_gpu("ppocr_cls") {
            assert_eq!(m.engine(), "gpu");
            assert_eq!(check_cases_on(&m, "ppocr_cls"), 2);
        }
    }

    #[test]
    fn ppocr_det_matches_reference_on_wgpu() {
        if let Some(m) = load_gpu("ppocr_det") {
            assert_eq!(check_cases_on(&m, "ppocr_det"), 2);
        }
    }

    #[test]
    fn unsupported_operators_are_named_at_load() {
        let Some(e) = engine() else { return };
        // silero_vad has If (and an LSTM inside it), which the interpreter lacks.
        match LoadedModel::load_on(&bytes("silero_vad"), PlanCacheConfig::default(), &e) {
            Err(OnnxError::GpuUnsupported { ops }) => {
                assert!(ops.iter().any(|o| o == "If"), "{ops:?}");
                let msg = OnnxError::GpuUnsupported { ops: ops.clone() }.to_string();
                assert!(msg.contains("GPU backend"), "{msg}");
                assert!(msg.contains(&ops[0]), "{msg}");
            }
            other => panic!("expected unsupported operators, got {other:?}"),
        }
    }
}

/// The same suite on ONNX Runtime, loaded from `SKEIN_TEST_ORT_LIB` (the
/// `onnxruntime` wheel's `onnxruntime/capi/libonnxruntime.so.*`). Without the library the tests
/// skip, unless `SKEIN_EXPECT_ORT=1` (CI): then they fail. The reference outputs were made by
/// onnxruntime, so its tolerances are the tight ones of models/README.md.
#[cfg(feature = "ort")]
mod ort {
    use super::*;
    use skein_onnx::{Engine, OrtEngine, OrtOptions};

    const ORT_ATOL: f64 = 1e-4;
    const ORT_RTOL: f64 = 1e-3;

    /// `SKEIN_TEST_ORT_LIB` (what scripts/test sets), else `SKEIN_ORT_LIB`, else
    /// `ORT_DYLIB_PATH`.
    pub(super) fn engine() -> Option<Engine> {
        let lib = std::iter::once("SKEIN_TEST_ORT_LIB")
            .chain(skein_onnx::onnxruntime::LIB_ENV)
            .find_map(|v| std::env::var_os(v).filter(|v| !v.is_empty()));
        let expected = std::env::var_os("SKEIN_EXPECT_ORT").is_some_and(|v| v == "1");
        if lib.is_none() && !expected {
            eprintln!("skipped: set SKEIN_TEST_ORT_LIB to libonnxruntime.so to run the ONNX Runtime suite");
            return None;
        }
        match OrtEngine::load(&OrtOptions {
            lib: lib.map(PathBuf::from),
            intra_threads: 1,
            ..Default::default()
        }) {
            Ok(e) => Some(Engine::Ort(e)),
            Err(e) if expected => panic!("SKEIN_EXPECT_ORT=1 but: {e}"),
            Err(e) => {
                eprintln!("skipped: {e}");
                None
            }
        }
    }

    fn load_ort(model: &str) -> Option<LoadedModel> {
        let e = engine()?;
        let m = LoadedModel::load_on(&bytes(model), PlanCacheConfig::default(), &e)
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        assert_eq!(m.engine(), "ort");
        Some(m)
    }

    fn check(m: &LoadedModel, model: &str, atol: f64, rtol: f64) -> Vec<(String, Vec<Tensor>)> {
        let cases = load_cases(&dir(model)).unwrap();
        let mut outs = Vec::new();
        for c in &cases {
            let out = m
                .run(c.inputs.clone())
                .unwrap_or_else(|e| panic!("{model}/{}: {e}", c.name));
            assert_eq!(out.outputs.len(), c.outputs.len(), "{model}/{}", c.name);
            for (a, e) in out.outputs.iter().zip(&c.outputs) {
                assert_eq!(a.name(), e.name(), "{model}/{}", c.name);
                reference::compare(a, e, atol, rtol)
                    .unwrap_or_else(|e| panic!("{model}/{}: {e}", c.name));
            }
            outs.push((c.name.clone(), out.outputs));
        }
        outs
    }

    #[test]
    fn every_reference_case_of_the_cpu_models_matches_on_ort() {
        for (model, n) in [("ppocr_cls", 2), ("ppocr_det", 2), ("silero_vad", 4)] {
            if let Some(m) = load_ort(model) {
                assert_eq!(check(&m, model, ORT_ATOL, ORT_RTOL).len(), n, "{model}");
                // A second run of a seen shape builds nothing.
                let c = &load_cases(&dir(model)).unwrap()[0];
                assert!(!m.run(c.inputs.clone()).unwrap().plan_built);
            }
        }
    }

    /// ORT reads inputs in place when their bytes are aligned for the element type (a
    /// received payload's buffer) and from a converted copy when they are not: both give the
    /// reference outputs, FP32 and INT64 inputs alike.
    #[test]
    fn inputs_at_any_alignment_match_the_reference_on_ort() {
        for model in ["ppocr_cls", "silero_vad"] {
            let Some(m) = load_ort(model) else {
                return;
            };
            for c in load_cases(&dir(model)).unwrap() {
                for offset in [0usize, 1, 4] {
                    let inputs: Vec<Tensor> = c
                        .inputs
                        .iter()
                        .map(|t| {
                            let mut buf = vec![0u8; offset];
                            buf.extend_from_slice(t.data());
                            let shared = skein_proto::Bytes::from(buf).slice(offset..);
                            Tensor::from_bytes(t.name(), t.datatype(), t.shape().to_vec(), shared)
                                .unwrap()
                        })
                        .collect();
                    if offset == 1 {
                        assert!(inputs.iter().all(|t| t.data().as_ptr() as usize % 2 == 1));
                    }
                    let out = m
                        .run(inputs)
                        .unwrap_or_else(|e| panic!("{model}/{} at +{offset}: {e}", c.name));
                    for (a, e) in out.outputs.iter().zip(&c.outputs) {
                        reference::compare(a, e, ORT_ATOL, ORT_RTOL)
                            .unwrap_or_else(|e| panic!("{model}/{} at +{offset}: {e}", c.name));
                    }
                }
            }
        }
    }

    #[test]
    fn ddddocr_int8_runs_on_ort_and_decodes_its_captcha() {
        let Some(m) = load_ort("ddddocr_int8") else {
            return;
        };
        let cases = load_cases(&dir("ddddocr_int8")).unwrap();
        // models/README.md: atol 2e-2, rtol 1e-2, and the per-step argmax equal.
        let outs = check(&m, "ddddocr_int8", 2e-2, 1e-2);
        assert_eq!(outs.len(), cases.len());
        for ((name, out), c) in outs.iter().zip(&cases) {
            let expected: Vec<u64> = c.json["expected_argmax"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            let t = &out[0];
            let classes = *t.shape().last().unwrap() as usize;
            let v = t.to_f64_vec().unwrap();
            let argmax: Vec<u64> = v
                .chunks(classes)
                .map(|row| {
                    row.iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .unwrap()
                        .0 as u64
                })
                .collect();
            assert_eq!(argmax, expected, "{name}");
        }
    }

    #[test]
    fn bad_inputs_are_invalid_input_on_ort() {
        let Some(m) = load_ort("ppocr_cls") else {
            return;
        };
        let f = |name: &str, shape: Vec<u64>| {
            let n: u64 = shape.iter().product();
            Tensor::from_f32(name, shape, &vec![0.0; n as usize]).unwrap()
        };
        for inputs in [
            vec![],
            vec![f("y", vec![1, 3, 48, 192])],
            vec![f("x", vec![1, 4, 48, 192])],
            vec![Tensor::new("x", DataType::Int32, vec![1, 3, 1, 1], vec![0; 12]).unwrap()],
        ] {
            let shown = format!("{inputs:?}");
            match m.run(inputs) {
                Err(OnnxError::InvalidInput(_)) => {}
                other => panic!("{shown}: {other:?}"),
            }
        }
        // An ORT failure at run time (H and W too small for the network) is an error, not a
        // panic, and the session serves the next request.
        match m.run(vec![f("x", vec![1, 3, 1, 1])]) {
            Err(OnnxError::Execution(msg)) => assert!(msg.contains("ONNX Runtime"), "{msg}"),
            Ok(_) => {}
            other => panic!("{other:?}"),
        }
        let c = &load_cases(&dir("ppocr_cls")).unwrap()[0];
        assert!(m.run(c.inputs.clone()).is_ok());
    }

    #[test]
    fn hostile_models_are_refused_by_ort_as_by_tract() {
        use prost::Message;
        let Some(e) = engine() else { return };
        let load = |b: &[u8]| LoadedModel::load_on(b, PlanCacheConfig::default(), &e);
        let cls = bytes("ppocr_cls");
        for s in [
            vec![],
            b"not a model at all".to_vec(),
            cls[..cls.len() / 2].to_vec(),
            cls[..100].to_vec(),
            vec![0xff; 4096],
            vec![0x3a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01],
        ] {
            match load(&s) {
                Err(OnnxError::InvalidModel(_)) => {}
                other => panic!("{} bytes: {other:?}", s.len()),
            }
        }
        let base = tract_onnx_pb_access::decode(&cls);
        let mut cyclic = base.clone();
        let g = cyclic.graph.as_mut().unwrap();
        let last = g.node.last().unwrap().output[0].clone();
        g.node[0].input.push(last);
        let mut external = base.clone();
        let t = external
            .graph
            .as_mut()
            .unwrap()
            .node
            .iter_mut()
            .flat_map(|n| n.attribute.iter_mut())
            .find_map(|a| a.t.as_mut())
            .unwrap();
        t.data_location = Some(1);
        t.external_data.push(Default::default());
        let mut huge = base.clone();
        let t = huge
            .graph
            .as_mut()
            .unwrap()
            .node
            .iter_mut()
            .flat_map(|n| n.attribute.iter_mut())
            .find_map(|a| a.t.as_mut())
            .unwrap();
        t.dims = vec![1 << 20, 1 << 20, 1 << 10];
        for (proto, what) in [
            (cyclic, "cycle"),
            (external, "external"),
            (huge, "elements"),
        ] {
            match load(&proto.encode_to_vec()) {
                Err(OnnxError::InvalidModel(m)) => assert!(m.contains(what), "{m}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        // An operator no engine implements is named, as tract names it.
        let mut unknown = base.clone();
        unknown.graph.as_mut().unwrap().node[0].domain = "org.example".into();
        match load(&unknown.encode_to_vec()) {
            Err(OnnxError::UnsupportedOperator { ops }) => {
                assert!(
                    ops.iter().any(|o| o.starts_with("org.example::")),
                    "{ops:?}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn deploy_check_knows_each_engines_operators() {
    // tract runs it: no engine needed.
    let (_, need) = skein_onnx::inspect_engines(&bytes("ppocr_cls"), false).unwrap();
    assert!(need.engines.is_empty());
    // Only ONNX Runtime runs it: accepted, for `ort` nodes, naming what tract lacks.
    let (meta, need) = skein_onnx::inspect_engines(&bytes("ddddocr_int8"), false).unwrap();
    assert_eq!(meta.inputs[0].name, "input1");
    assert_eq!(need.engines, vec!["ort".to_string()]);
    assert!(
        need.ops
            .iter()
            .any(|o| o == "com.microsoft::DynamicQuantizeLSTM"),
        "{:?}",
        need.ops
    );
    // A GPU-only deployment of it: the GPU backend lacks it, refused.
    assert!(skein_onnx::inspect_engines(&bytes("ddddocr_int8"), true).is_err());
    // No engine runs it: refused, naming the operator and the engines.
    use prost::Message;
    let mut p = tract_onnx_pb_access::decode(&bytes("ppocr_cls"));
    let n = &mut p.graph.as_mut().unwrap().node[0];
    n.domain = "org.example".into();
    n.op_type = "NoSuchOp".into();
    match skein_onnx::inspect_engines(&p.encode_to_vec(), false) {
        Err(e @ OnnxError::NoEngine { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains("org.example::") && m.contains("tract") && m.contains("ONNX Runtime"),
                "{m}"
            );
            assert_eq!(e.code(), skein_proto::ErrorCode::UnsupportedOperator);
        }
        other => panic!("{other:?}"),
    }
}
