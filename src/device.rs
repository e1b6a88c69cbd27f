//! The device this process computes on (`--device cpu|cuda:N`).
//!
//! One process trains on one device, and its memory is measured by one meter
//! ([`crate::memory::install`]); both are chosen together by [`select`]. Models are
//! initialised on the host (so a seed gives the same weights on every device) and moved to
//! [`current`] by [`crate::model::Model::build`]; batches are moved by whoever feeds them
//! ([`to_current`]). Everything else follows its inputs' device.

use anyhow::{bail, Context as _, Result};
use candle_core::{Device, Tensor};
use std::sync::RwLock;

static CURRENT: RwLock<Option<Device>> = RwLock::new(None);

/// What a `--device` flag names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N`; the error names the flag.
    pub fn parse(flag: &str) -> Result<Self> {
        let s = flag.trim();
        if s == "cpu" {
            return Ok(Self::Cpu);
        }
        if let Some(rest) = s.strip_prefix("cuda") {
            let idx = rest.strip_prefix(':').unwrap_or(rest);
            if idx.is_empty() && rest.is_empty() {
                return Ok(Self::Cuda(0));
            }
            if let Ok(n) = idx.parse::<usize>() {
                if rest.starts_with(':') {
                    return Ok(Self::Cuda(n));
                }
            }
        }
        bail!("--device `{flag}`: expected cpu or cuda:N")
    }

    /// `cpu` / `cuda:N`, as the flag takes it (child processes get it back).
    pub fn name(self) -> String {
        match self {
            Self::Cpu => "cpu".into(),
            Self::Cuda(n) => format!("cuda:{n}"),
        }
    }

    /// Opens the device: a clear error when this binary has no CUDA or the card is absent.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open_cuda(n),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device> {
    Device::new_cuda(n).with_context(|| {
        format!("--device cuda:{n}: could not open CUDA device {n} (is there an NVIDIA GPU with that index and a driver for CUDA 13?)")
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<Device> {
    bail!(
        "--device cuda:{n}: this actrain binary was built without CUDA support; \
         rebuild with `bash scripts/build-cuda.sh` (see README, GPU section)"
    )
}

/// Parses and opens `--device`, makes it the process's compute device and installs its memory
/// meter (the host's counting allocator for the CPU, the CUDA pool meter for a GPU).
pub fn select_flag(flag: &str) -> Result<Device> {
    let spec = DeviceSpec::parse(flag)?;
    // Already selected (max-batch reads a GPU's free memory before it runs): keep that device,
    // its stream and its meter instead of opening a second handle.
    let cur = current();
    if spec_of(&cur) == Some(spec) {
        return Ok(cur);
    }
    let dev = spec.open()?;
    select(&dev).with_context(|| format!("--device {flag}: setting up memory accounting"))?;
    Ok(dev)
}

/// im2col workspace of one convolution call on a GPU: a GPU wants few large launches, where
/// the host's 8 MiB default would split a layer into one launch per sample.
pub const GPU_CONV_WORKSPACE_BYTES: usize = 256 << 20;

/// Makes `dev` the compute device, installs its memory meter and sets the per-device op
/// defaults (the convolution workspace).
pub fn select(dev: &Device) -> Result<()> {
    use crate::ops::conv::{set_workspace_bytes, DEFAULT_WORKSPACE_BYTES};
    match dev {
        Device::Cpu => {
            crate::memory::install(None);
            // Back from a GPU only: a workspace set on the host (tests, benchmarks) stays.
            if !current().is_cpu() {
                set_workspace_bytes(DEFAULT_WORKSPACE_BYTES);
            }
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(c) => {
            let meter = crate::memory::cuda::CudaMeter::new(c)?;
            crate::memory::install(Some(Box::new(meter)));
            set_workspace_bytes(GPU_CONV_WORKSPACE_BYTES);
        }
        #[allow(unreachable_patterns)]
        other => bail!("device {other:?} is not supported"),
    }
    *CURRENT.write().unwrap_or_else(|e| e.into_inner()) = Some(dev.clone());
    Ok(())
}

/// The compute device ([`Device::Cpu`] until [`select`] says otherwise).
pub fn current() -> Device {
    CURRENT
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or(Device::Cpu)
}

/// `t` on the compute device (no copy when it already is there).
pub fn to_current(t: &Tensor) -> Result<Tensor> {
    let dev = current();
    if t.device().same_device(&dev) {
        return Ok(t.clone());
    }
    Ok(t.to_device(&dev)?)
}

/// What `dev` is as a flag would name it (`None` for other backends).
fn spec_of(dev: &Device) -> Option<DeviceSpec> {
    match dev.location() {
        candle_core::DeviceLocation::Cpu => Some(DeviceSpec::Cpu),
        candle_core::DeviceLocation::Cuda { gpu_id } => Some(DeviceSpec::Cuda(gpu_id)),
        _ => None,
    }
}

/// The `cuda:N` / `cpu` name of a device, for reports.
pub fn name(dev: &Device) -> String {
    match spec_of(dev) {
        Some(spec) => spec.name(),
        None => format!("{:?}", dev.location()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_flag_and_names_it_in_errors() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        for bad in ["tpu", "cuda3", "cuda:", "cuda:x", "CPU0", ""] {
            let e = DeviceSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--device"), "{bad}: {e}");
        }
        assert_eq!(DeviceSpec::Cuda(1).name(), "cuda:1");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_refuses_cuda_with_a_rebuild_hint() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("without CUDA support"), "{e}");
    }

    #[test]
    fn the_default_compute_device_is_the_cpu() {
        assert!(current().is_cpu());
    }
}
