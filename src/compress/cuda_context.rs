//! Saved contexts that stay on the GPU (feature `cuda`): what [`super::policy`] stores for a
//! tensor that lives on a CUDA device. Same algorithms, layouts and byte counts as the host
//! contexts beside them (the kernels are bit-identical to the CPU's, `tests/cuda.rs`), so
//! `profile-memory` rows and the allocator see the same numbers on either device.

use super::cuda::{
    dequantize_cuda, dequantize_samples_cuda, mask_pack_cuda, mask_unpack_cuda, quantize_cuda,
    uints_pack_cuda, uints_unpack_cuda, CudaBitMask, CudaPackedUints, CudaQuantized,
};
use super::policy::{bits_per_element, sample_rows};
use super::QuantParams;
use crate::tape::PackedContext;
use anyhow::{Context as _, Result};
use candle_core::{DType, Device, Shape, Tensor};

/// `t` (any float dtype on a CUDA device) quantized per sample of `sample_len` elements.
pub(crate) fn pack_activation(
    t: &Tensor,
    sample_len: usize,
    params: &QuantParams,
) -> Result<Box<dyn PackedContext>> {
    let t = if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    };
    let q = quantize_cuda(&t, sample_len, params).context("quantizing a saved context")?;
    Ok(Box::new(CudaQuantContext(q)))
}

/// The `x > 0` mask of `t`, one bit per element.
pub(crate) fn pack_sign_mask(t: &Tensor) -> Result<Box<dyn PackedContext>> {
    let t = if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    };
    let m = mask_pack_cuda(&t).context("packing a saved mask")?;
    Ok(Box::new(CudaMaskContext(m)))
}

/// U8 indices (< 2^bits) packed densely.
pub(crate) fn pack_index(t: &Tensor, bits: u8) -> Result<Box<dyn PackedContext>> {
    let p = uints_pack_cuda(t, bits).context("packing saved indices")?;
    Ok(Box::new(CudaIndexContext(p)))
}

/// `t` as `dtype` on `device` (the kernels produce f32 / u8 on the context's GPU).
fn finish(t: Tensor, dtype: DType, device: &Device) -> Result<Tensor> {
    let t = if t.dtype() == dtype {
        t
    } else {
        t.to_dtype(dtype)?
    };
    Ok(if t.device().same_device(device) {
        t
    } else {
        t.to_device(device)?
    })
}

struct CudaQuantContext(CudaQuantized);

impl PackedContext for CudaQuantContext {
    fn unpack(&self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = dequantize_cuda(&self.0, shape.clone()).context("dequantizing a saved context")?;
        finish(t, dtype, device)
    }
    fn unpack_rows(
        &self,
        shape: &Shape,
        dtype: DType,
        device: &Device,
        first: usize,
        count: usize,
    ) -> Result<Tensor> {
        let Some(dims) = sample_rows(shape, self.0.n_samples(), count) else {
            return Ok(self.unpack(shape, dtype, device)?.narrow(0, first, count)?);
        };
        let t = dequantize_samples_cuda(&self.0, first, count, dims)
            .context("dequantizing a saved context")?;
        finish(t, dtype, device)
    }
    fn stored_bytes(&self) -> usize {
        self.0.stored_bytes()
    }
    fn bits(&self) -> f32 {
        bits_per_element(self.0.stored_bytes(), self.0.len)
    }
    fn label(&self) -> String {
        format!("q{}", self.0.bits)
    }
}

struct CudaMaskContext(CudaBitMask);

impl PackedContext for CudaMaskContext {
    fn unpack(&self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let t =
            mask_unpack_cuda(&self.0, 1.0, 0.0, shape.clone()).context("unpacking a saved mask")?;
        finish(t, dtype, device)
    }
    fn stored_bytes(&self) -> usize {
        self.0.stored_bytes()
    }
    fn bits(&self) -> f32 {
        bits_per_element(self.0.stored_bytes(), self.0.len)
    }
    fn label(&self) -> String {
        // The host mask's label, so reports read the same on both devices (the row-chunked
        // ReLU backward that keys on it runs only on host gradients).
        "mask1".into()
    }
}

struct CudaIndexContext(CudaPackedUints);

impl PackedContext for CudaIndexContext {
    fn unpack(&self, shape: &Shape, _dtype: DType, device: &Device) -> Result<Tensor> {
        let t = uints_unpack_cuda(&self.0, shape.clone()).context("unpacking saved indices")?;
        finish(t, DType::U8, device)
    }
    fn stored_bytes(&self) -> usize {
        self.0.stored_bytes()
    }
    fn bits(&self) -> f32 {
        bits_per_element(self.0.stored_bytes(), self.0.len)
    }
    fn label(&self) -> String {
        format!("idx{}", self.0.bits)
    }
}
