//! Which engine the node runs models on: tract on the CPU, ONNX Runtime (builds with the `ort`
//! feature, on by default; the library is loaded at run time), or burn on an accelerator
//! (builds with the `gpu` feature). Chosen once at start from `--backend` and what the host
//! offers.

use serde::{Deserialize, Serialize};
use skein_onnx::Engine;
use skein_proto::AcceleratorInfo;

/// The `backend` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// A hardware GPU when the build has the GPU backend and wgpu finds one (a software
    /// rasteriser such as lavapipe does not count); else ONNX Runtime when its library loads
    /// and its version is supported; else tract (the fall-back is logged).
    #[default]
    Auto,
    /// tract on the CPU.
    Tract,
    /// ONNX Runtime (`--ort-lib`): fails to start when the library is missing, of an
    /// unsupported version or broken.
    Ort,
    /// burn on wgpu (Vulkan, Metal, DX12; lavapipe counts): fails to start without an adapter.
    Wgpu,
    /// burn on CUDA (builds with the `cuda` feature).
    Cuda,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "tract" => Ok(BackendChoice::Tract),
            "ort" => Ok(BackendChoice::Ort),
            "wgpu" => Ok(BackendChoice::Wgpu),
            "cuda" => Ok(BackendChoice::Cuda),
            other => Err(format!(
                "backend `{other}`: expected auto, tract, ort, wgpu or cuda"
            )),
        }
    }
}

/// The engine chosen, and what the node advertises about it.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Runs every model, unless it falls back to tract.
    pub engine: Engine,
    /// `tract-cpu`, `ort-cpu`, `ort-cuda`, `ort-tensorrt`, `burn-wgpu` or `burn-cuda`.
    pub name: &'static str,
    /// The accelerators found, the one in use marked.
    pub accelerators: Vec<AcceleratorInfo>,
    /// ONNX Runtime's version when the node runs it (else empty).
    pub ort_version: String,
    /// ONNX Runtime's execution providers in use (else empty).
    pub ort_providers: Vec<String>,
}

/// How ONNX Runtime is found and run (`--ort-lib`, `--ort-ep`, `--ort-threads`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OrtConfig {
    /// `libonnxruntime.so`; unset: `SKEIN_ORT_LIB`, then `ORT_DYLIB_PATH`, then the dynamic
    /// loader's search path.
    pub lib: Option<std::path::PathBuf>,
    /// Execution provider: `cpu` (default), `cuda` or `tensorrt` (the `onnxruntime-gpu`
    /// library).
    pub ep: String,
    /// Intra-op threads per model; 0: the node's share of the cores.
    pub threads: usize,
}

impl Backend {
    /// Whether models run on an accelerator.
    pub fn is_gpu(&self) -> bool {
        !matches!(self.name, "tract-cpu" | "ort-cpu")
    }

    /// The node's [`skein_proto::ENGINE_LABEL`]: `tract`, `ort` or `burn`.
    pub fn engine_label(&self) -> &'static str {
        match self.name.split('-').next() {
            Some("ort") => "ort",
            Some("burn") => "burn",
            _ => "tract",
        }
    }

    /// tract on the CPU.
    pub fn tract() -> Backend {
        Backend {
            engine: Engine::Tract,
            name: "tract-cpu",
            accelerators: Vec::new(),
            ort_version: String::new(),
            ort_providers: Vec::new(),
        }
    }

    /// ONNX Runtime as `cfg` says, `threads` intra-op threads per model when `cfg` leaves it
    /// at 0; an error naming what is missing.
    pub fn ort(cfg: &OrtConfig, threads: usize) -> Result<Backend, String> {
        #[cfg(feature = "ort")]
        {
            use skein_onnx::{OrtEngine, OrtEp, OrtOptions};
            let ep: OrtEp = if cfg.ep.is_empty() {
                OrtEp::Cpu
            } else {
                cfg.ep.parse()?
            };
            let engine = OrtEngine::load(&OrtOptions {
                lib: cfg.lib.clone(),
                intra_threads: if cfg.threads > 0 {
                    cfg.threads
                } else {
                    threads
                },
                ep,
            })?;
            Ok(Backend {
                name: match ep {
                    OrtEp::Cpu => "ort-cpu",
                    OrtEp::Cuda => "ort-cuda",
                    OrtEp::TensorRt => "ort-tensorrt",
                },
                accelerators: Vec::new(),
                ort_version: engine.version().to_string(),
                ort_providers: engine.providers(),
                engine: Engine::Ort(engine),
            })
        }
        #[cfg(not(feature = "ort"))]
        {
            let _ = (cfg, threads);
            Err("backend `ort` needs a build with ONNX Runtime: cargo build --features ort".into())
        }
    }

    /// Choose as `choice` says (`ort` and `auto` load ONNX Runtime as `ort` says, with
    /// `threads` intra-op threads per model unless it sets them); an error when the choice
    /// cannot be met on this host or build.
    pub fn select(
        choice: BackendChoice,
        ort: &OrtConfig,
        threads: usize,
    ) -> Result<Backend, String> {
        let tract_or_ort = |tract: Backend| -> Result<Backend, String> {
            match choice {
                BackendChoice::Ort => Backend::ort(ort, threads),
                BackendChoice::Auto if cfg!(feature = "ort") => match Backend::ort(ort, threads) {
                    Ok(b) => Ok(Backend {
                        accelerators: tract.accelerators,
                        ..b
                    }),
                    Err(e) => {
                        tracing::info!(reason = %e, "ONNX Runtime is not available; running models on tract");
                        Ok(tract)
                    }
                },
                _ => Ok(tract),
            }
        };
        #[cfg(feature = "gpu")]
        {
            let b = gpu::select(choice)?;
            if b.engine_label() == "tract" {
                return tract_or_ort(b);
            }
            Ok(b)
        }
        #[cfg(not(feature = "gpu"))]
        match choice {
            BackendChoice::Auto | BackendChoice::Tract | BackendChoice::Ort => {
                tract_or_ort(Backend::tract())
            }
            other => Err(format!(
                "backend `{}` needs a build with the GPU backend: cargo build --features gpu{}",
                format!("{other:?}").to_lowercase(),
                if other == BackendChoice::Cuda {
                    ",cuda"
                } else {
                    ""
                }
            )),
        }
    }
}

#[cfg(feature = "gpu")]
mod gpu {
    use super::*;
    use skein_gpu::{adapters, default_device, Adapter};

    fn info(a: &Adapter, in_use: bool) -> AcceleratorInfo {
        AcceleratorInfo {
            name: a.name.clone(),
            backend: a.backend.clone(),
            device_type: a.device_type.clone(),
            max_buffer_bytes: a.max_buffer_bytes,
            in_use,
        }
    }

    pub(super) fn select(choice: BackendChoice) -> Result<Backend, String> {
        let found = adapters();
        let hardware = |a: &Adapter| a.device_type != "Cpu" && a.device_type != "Other";
        let wgpu = |found: &[Adapter]| -> Result<Backend, String> {
            let device = default_device("wgpu").map_err(|e| e.to_string())?;
            Ok(Backend {
                engine: Engine::Gpu(device),
                name: "burn-wgpu",
                ort_version: String::new(),
                ort_providers: Vec::new(),
                accelerators: found
                    .iter()
                    .enumerate()
                    .map(|(i, a)| info(a, i == 0))
                    .collect(),
            })
        };
        let listed = |found: &[Adapter]| found.iter().map(|a| info(a, false)).collect();
        match choice {
            BackendChoice::Tract | BackendChoice::Ort => Ok(Backend {
                accelerators: listed(&found),
                ..Backend::tract()
            }),
            BackendChoice::Wgpu => wgpu(&found),
            BackendChoice::Auto if found.first().is_some_and(hardware) => wgpu(&found),
            BackendChoice::Auto => Ok(Backend {
                accelerators: listed(&found),
                ..Backend::tract()
            }),
            BackendChoice::Cuda => {
                let device = default_device("cuda").map_err(|e| e.to_string())?;
                Ok(Backend {
                    engine: Engine::Gpu(device),
                    name: "burn-cuda",
                    ort_version: String::new(),
                    ort_providers: Vec::new(),
                    accelerators: vec![AcceleratorInfo {
                        name: "CUDA device 0".into(),
                        backend: "Cuda".into(),
                        device_type: "DiscreteGpu".into(),
                        max_buffer_bytes: 0,
                        in_use: true,
                    }],
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_choices_parse_and_name_the_alternatives() {
        assert_eq!("ort".parse::<BackendChoice>(), Ok(BackendChoice::Ort));
        assert_eq!("tract".parse::<BackendChoice>(), Ok(BackendChoice::Tract));
        let e = "onnx".parse::<BackendChoice>().unwrap_err();
        assert!(e.contains("auto, tract, ort, wgpu or cuda"), "{e}");
    }

    #[cfg(feature = "ort")]
    #[test]
    fn a_missing_ort_library_fails_ort_and_falls_back_under_auto() {
        let missing = OrtConfig {
            lib: Some("/nonexistent/skein-test/libonnxruntime.so".into()),
            ..Default::default()
        };
        let e = Backend::select(BackendChoice::Ort, &missing, 1).unwrap_err();
        assert!(
            e.contains("/nonexistent/skein-test/libonnxruntime.so") && e.contains("--ort-lib"),
            "{e}"
        );
        let b = Backend::select(BackendChoice::Auto, &missing, 1).unwrap();
        assert_ne!(b.engine_label(), "ort");
        assert!(b.ort_version.is_empty());
        let t = Backend::select(BackendChoice::Tract, &missing, 1).unwrap();
        assert_eq!((t.name, t.engine_label()), ("tract-cpu", "tract"));
        // A file that is no library: a clear error too, never a crash.
        let dir = tempfile::tempdir().unwrap();
        let broken = dir.path().join("libonnxruntime.so.1.31.1");
        std::fs::write(&broken, b"not an ELF file").unwrap();
        let cfg = OrtConfig {
            lib: Some(broken.clone()),
            ..Default::default()
        };
        let e = Backend::select(BackendChoice::Ort, &cfg, 1).unwrap_err();
        assert!(
            e.contains("ONNX Runtime") && e.contains(&*broken.to_string_lossy()),
            "{e}"
        );
        assert_ne!(
            Backend::select(BackendChoice::Auto, &cfg, 1)
                .unwrap()
                .engine_label(),
            "ort"
        );
        // A wrong execution provider is named.
        let bad_ep = OrtConfig {
            ep: "npu".into(),
            ..missing
        };
        let e = Backend::select(BackendChoice::Ort, &bad_ep, 1).unwrap_err();
        assert!(e.contains("cpu, cuda or tensorrt"), "{e}");
    }
}
