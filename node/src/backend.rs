//! Which engine the node runs models on: tract on the CPU, or burn on an accelerator (builds
//! with the `gpu` feature). Chosen once at start from `--backend` and what the host offers.

use serde::{Deserialize, Serialize};
use skein_onnx::Engine;
use skein_proto::AcceleratorInfo;

/// The `backend` setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// A hardware GPU when the build has the GPU backend and wgpu finds one (a software
    /// rasteriser such as lavapipe does not count); tract otherwise.
    #[default]
    Auto,
    /// tract on the CPU.
    Tract,
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
            "wgpu" => Ok(BackendChoice::Wgpu),
            "cuda" => Ok(BackendChoice::Cuda),
            other => Err(format!(
                "backend `{other}`: expected auto, tract, wgpu or cuda"
            )),
        }
    }
}

/// The engine chosen, and what the node advertises about it.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Runs every model, unless it falls back to tract.
    pub engine: Engine,
    /// `tract-cpu`, `burn-wgpu` or `burn-cuda`.
    pub name: &'static str,
    /// The accelerators found, the one in use marked.
    pub accelerators: Vec<AcceleratorInfo>,
}

impl Backend {
    /// Whether models run on an accelerator.
    pub fn is_gpu(&self) -> bool {
        self.name != "tract-cpu"
    }

    /// tract on the CPU.
    pub fn tract() -> Backend {
        Backend {
            engine: Engine::Tract,
            name: "tract-cpu",
            accelerators: Vec::new(),
        }
    }

    /// Choose as `choice` says; an error when the choice cannot be met on this host or build.
    pub fn select(choice: BackendChoice) -> Result<Backend, String> {
        #[cfg(feature = "gpu")]
        {
            gpu::select(choice)
        }
        #[cfg(not(feature = "gpu"))]
        match choice {
            BackendChoice::Auto | BackendChoice::Tract => Ok(Backend::tract()),
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
                accelerators: found
                    .iter()
                    .enumerate()
                    .map(|(i, a)| info(a, i == 0))
                    .collect(),
            })
        };
        let listed = |found: &[Adapter]| found.iter().map(|a| info(a, false)).collect();
        match choice {
            BackendChoice::Tract => Ok(Backend {
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
