//! GPU backend benchmark: every reference case of ppocr_cls and ppocr_det on tract (CPU), on
//! the burn backend (wgpu; CUDA too in a build with `skein-gpu/cuda`) and on ONNX Runtime (where
//! `SKEIN_ORT_LIB` names the library), checked against the reference outputs, then timed. One
//! run, one machine, ratios printed.
//!
//! Usage: `bench-gpu [ITERATIONS]` (default 20). Build with `cargo build --release --workspace
//! --all-targets` (the workspace build has the GPU backend) and run
//! `target/release/bench-gpu`, or use `scripts/bench-gpu`, which also does the CUDA build where
//! the toolkit exists.

// Synchronous timing of synchronous work: no async clock to follow.
#![allow(clippy::disallowed_types)]

use skein_onnx::reference::{compare, load_cases};
use skein_onnx::{skein_gpu, Engine, LoadedModel, PlanCacheConfig};
use std::time::Instant;

const ATOL: f64 = 1e-3;
const RTOL: f64 = 1e-2;

fn engines() -> Vec<(String, Engine)> {
    let mut out = vec![("tract-cpu".to_string(), Engine::Tract)];
    for a in skein_gpu::adapters() {
        println!(
            "adapter: {} ({} {}, max buffer {} MiB)",
            a.name,
            a.backend,
            a.device_type,
            a.max_buffer_bytes >> 20
        );
    }
    for backend in ["wgpu", "cuda"] {
        match skein_gpu::default_device(backend) {
            Ok(d) => out.push((format!("burn-{backend}"), Engine::Gpu(d))),
            Err(e) => println!("burn-{backend}: not measured: {e}"),
        }
    }
    // ONNX Runtime, one intra-op thread like tract, where SKEIN_ORT_LIB (or ORT_DYLIB_PATH)
    // names the library (e.g. `SKEIN_ORT_LIB=$(scripts/ort-lib)`).
    match skein_onnx::OrtEngine::load(&skein_onnx::OrtOptions {
        intra_threads: 1,
        ..Default::default()
    }) {
        Ok(e) => {
            println!("onnxruntime {} at {}", e.version(), e.path().display());
            out.push(("ort-cpu".to_string(), Engine::Ort(e)));
        }
        Err(e) => println!("ort-cpu: not measured: {e}"),
    }
    out
}

fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20);
    let engines = engines();
    // SKEIN_MODELS for a prebuilt binary run away from its checkout.
    let models = std::env::var_os("SKEIN_MODELS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(skein_tests::models_dir);
    println!(
        "\n{:<12} {:<14} {:<10} {:>10} {:>10} {:>10} {:>9}",
        "model", "case", "engine", "load ms", "first ms", "p50 ms", "vs tract"
    );
    for model in ["ppocr_cls", "ppocr_det"] {
        let dir = models.join(model);
        let bytes = std::fs::read(dir.join("model.onnx"))?;
        let cases = load_cases(&dir)?;
        for case in &cases {
            let mut tract_p50 = None;
            for (name, engine) in &engines {
                let t0 = Instant::now();
                let m = LoadedModel::load_on(&bytes, PlanCacheConfig::default(), engine)?;
                let load_ms = t0.elapsed().as_secs_f64() * 1e3;
                let t1 = Instant::now();
                let out = m.run(case.inputs.clone())?;
                let first_ms = t1.elapsed().as_secs_f64() * 1e3;
                for (a, e) in out.outputs.iter().zip(&case.outputs) {
                    compare(a, e, ATOL, RTOL)
                        .map_err(|e| anyhow::anyhow!("{model}/{} on {name}: {e}", case.name))?;
                }
                let mut times = Vec::with_capacity(iters);
                for _ in 0..iters {
                    let t = Instant::now();
                    m.run(case.inputs.clone())?;
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
                times.sort_by(f64::total_cmp);
                let p50 = times[times.len() / 2];
                let ratio = match tract_p50 {
                    None => {
                        tract_p50 = Some(p50);
                        "1.00x".to_string()
                    }
                    Some(t) => format!("{:.2}x", t / p50),
                };
                println!(
                    "{model:<12} {:<14} {name:<10} {load_ms:>10.1} {first_ms:>10.1} {p50:>10.2} {ratio:>9}",
                    case.name
                );
            }
        }
    }
    println!("\n(vs tract: tract's p50 divided by this engine's; above 1 is faster than tract)");
    Ok(())
}
