//! What accelerators this host offers, and the device models run on.

use crate::GpuError;
use burn_tensor::Device;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake};

/// One wgpu adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    /// The adapter's name (`llvmpipe (LLVM 15.0.6, 256 bits)`, `NVIDIA H200`...).
    pub name: String,
    /// The graphics API wgpu reaches it through (`Vulkan`, `Metal`, `Dx12`, `Gl`).
    pub backend: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu` (a software rasteriser such as
    /// lavapipe) or `Other`.
    pub device_type: String,
    /// The largest buffer the adapter allows, bytes (wgpu does not report total memory).
    pub max_buffer_bytes: u64,
}

/// Poll a future to completion on this thread (wgpu's enumeration is a future that is ready
/// at once on native platforms).
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

/// The wgpu adapters of this host (primary backends: Vulkan, Metal, DX12), best first:
/// discrete, integrated, virtual, then software.
pub fn adapters() -> Vec<Adapter> {
    use burn_tensor::wgpu::wgpu;
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::PRIMARY;
    let instance = wgpu::Instance::new(desc);
    let mut out: Vec<Adapter> = block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
        .into_iter()
        .map(|a| {
            let info = a.get_info();
            Adapter {
                name: info.name,
                backend: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                max_buffer_bytes: a.limits().max_buffer_size,
            }
        })
        .collect();
    let rank = |t: &str| match t {
        "DiscreteGpu" => 0,
        "IntegratedGpu" => 1,
        "VirtualGpu" => 2,
        "Cpu" => 3,
        _ => 4,
    };
    out.sort_by_key(|a| rank(&a.device_type));
    out.dedup();
    out
}

/// The device for `backend` (`wgpu`, or `cuda` when built with that feature), checked with a
/// small computation: an error when this host has no such adapter or it does not work, so a
/// node never claims an accelerator it lacks.
pub fn default_device(backend: &str) -> Result<Device, GpuError> {
    let device = pick(backend)?;
    let sum = crate::guarded("probing the device", || {
        let t = burn_tensor::Tensor::<1>::from_data(
            burn_tensor::TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [4]),
            &device,
        );
        t.sum()
            .into_data()
            .try_to_vec_as::<f32>()
            .map_err(|e| GpuError::NoAdapter(format!("{e:?}")))
    })
    .map_err(|e| GpuError::NoAdapter(format!("the {backend} device does not work: {e}")))?;
    if sum.first().copied() != Some(10.0) {
        return Err(GpuError::NoAdapter(format!(
            "the {backend} device computed 1+2+3+4 = {sum:?}"
        )));
    }
    Ok(device)
}

fn pick(backend: &str) -> Result<Device, GpuError> {
    match backend {
        "wgpu" => {
            if adapters().is_empty() {
                return Err(GpuError::NoAdapter(
                    "wgpu found no Vulkan, Metal or DX12 adapter (on Linux without a GPU, install \
                     mesa-vulkan-drivers for lavapipe)"
                        .into(),
                ));
            }
            Ok(Device::wgpu(burn_tensor::DeviceKind::DefaultDevice))
        }
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(0usize)),
        other => Err(GpuError::NoAdapter(format!(
            "backend `{other}` is not built in (this build has: wgpu{})",
            if cfg!(feature = "cuda") { ", cuda" } else { "" }
        ))),
    }
}
